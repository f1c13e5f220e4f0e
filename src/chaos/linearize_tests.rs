//! Behaviour of the linearizability checker: hand-written histories with known verdicts, and
//! property tests over histories generated from a simulated Keel key.

use std::time::Instant;

use proptest::prelude::*;

use super::history::{Op, Operation, Outcome, Ret, Version};
use super::linearize::{check, check_with, Budget, CheckResult, Violation};
use super::register::{self, State};

fn ok(client: u64, op: Op, ret: Ret, invoke: u64, complete: u64) -> Operation {
    Operation { client, op, outcome: Outcome::Ok(ret), invoke, complete }
}

fn unknown(client: u64, op: Op, invoke: u64) -> Operation {
    Operation { client, op, outcome: Outcome::Unknown, invoke, complete: invoke + 1 }
}

fn failed(client: u64, op: Op, invoke: u64, complete: u64) -> Operation {
    Operation { client, op, outcome: Outcome::Fail, invoke, complete }
}

fn create(value: u64) -> Op {
    Op::Create { value }
}

fn update(expected_rv: u64, value: u64) -> Op {
    Op::Update { expected_rv, value }
}

fn got(rv: u64, value: u64) -> Ret {
    Ret::Got(Some(Version { rv, value }))
}

fn assert_linearizable(history: &[Operation]) {
    let verdict = check(history);
    assert!(verdict.is_linearizable(), "expected linearizable, got {verdict}");
}

fn assert_rejected(history: &[Operation]) -> Violation {
    match check(history) {
        CheckResult::NotLinearizable(v) => *v,
        other => panic!("expected a violation, got {other}"),
    }
}

#[test]
fn empty_history_is_linearizable() {
    assert_linearizable(&[]);
}

#[test]
fn sequential_lifecycle_is_linearizable() {
    assert_linearizable(&[
        ok(1, Op::Get, Ret::NotFound, 0, 1),
        ok(1, create(10), Ret::Created { rv: 3 }, 2, 3),
        ok(1, Op::Get, got(3, 10), 4, 5),
        ok(1, update(3, 11), Ret::Updated { rv: 7 }, 6, 7),
        ok(1, Op::Get, got(7, 11), 8, 9),
        ok(1, Op::Delete, Ret::Deleted, 10, 11),
        ok(1, Op::Get, Ret::Got(None), 12, 13),
        ok(1, create(12), Ret::Created { rv: 9 }, 14, 15),
        ok(1, Op::Get, got(9, 12), 16, 17),
    ]);
}

#[test]
fn sequential_refusals_that_match_the_state_are_linearizable() {
    assert_linearizable(&[
        ok(1, Op::Delete, Ret::NotFound, 0, 1),
        ok(1, update(1, 5), Ret::NotFound, 2, 3),
        ok(1, create(10), Ret::Created { rv: 3 }, 4, 5),
        ok(1, create(11), Ret::AlreadyExists, 6, 7),
        ok(1, update(2, 12), Ret::Conflict, 8, 9),
        // An update that changes nothing keeps the rv, as Keel answers it.
        ok(1, update(3, 10), Ret::Updated { rv: 3 }, 10, 11),
        ok(1, Op::Get, got(3, 10), 12, 13),
    ]);
}

#[test]
fn input_order_does_not_matter() {
    let mut history = vec![
        ok(1, create(10), Ret::Created { rv: 3 }, 0, 1),
        ok(1, update(3, 11), Ret::Updated { rv: 7 }, 2, 3),
        ok(2, Op::Get, got(7, 11), 4, 5),
    ];
    history.reverse();
    assert_linearizable(&history);
}

#[test]
fn a_read_overlapping_a_create_may_see_it_or_not() {
    assert_linearizable(&[
        ok(1, create(10), Ret::Created { rv: 3 }, 0, 10),
        ok(2, Op::Get, Ret::NotFound, 1, 3),
        ok(3, Op::Get, got(3, 10), 2, 4),
    ]);
}

#[test]
fn reads_overlapping_a_create_cannot_see_it_then_lose_it() {
    // Once client 2 saw the object, client 3's later read cannot miss it.
    let v = assert_rejected(&[
        ok(1, create(10), Ret::Created { rv: 3 }, 0, 10),
        ok(2, Op::Get, got(3, 10), 1, 3),
        ok(3, Op::Get, Ret::NotFound, 4, 6),
    ]);
    assert_eq!(v.stuck.0, 2);
}

#[test]
fn concurrent_updates_linearize_in_the_only_order_their_rvs_allow() {
    // The history lists B before A and B starts first, but only A-then-B explains the rvs.
    assert_linearizable(&[
        ok(1, create(10), Ret::Created { rv: 1 }, 0, 1),
        ok(3, update(5, 12), Ret::Updated { rv: 6 }, 2, 20),
        ok(2, update(1, 11), Ret::Updated { rv: 5 }, 3, 20),
        ok(4, Op::Get, got(5, 11), 4, 21),
        ok(4, Op::Get, got(6, 12), 22, 23),
    ]);
}

#[test]
fn a_completed_delete_is_not_undone() {
    let base = [ok(1, create(10), Ret::Created { rv: 2 }, 0, 10), ok(2, Op::Delete, Ret::Deleted, 0, 10)];
    // The delete must follow the create, so once both are done the key is gone.
    let mut gone = base.to_vec();
    gone.push(ok(3, Op::Get, Ret::NotFound, 11, 12));
    assert_linearizable(&gone);

    let mut back = base.to_vec();
    back.push(ok(3, Op::Get, got(2, 10), 11, 12));
    assert_rejected(&back);
}

#[test]
fn stale_read_after_a_completed_update_is_rejected() {
    let v = assert_rejected(&[
        ok(1, create(10), Ret::Created { rv: 3 }, 0, 1),
        ok(1, update(3, 11), Ret::Updated { rv: 4 }, 2, 3),
        ok(2, Op::Get, got(3, 10), 4, 5),
    ]);
    // The update must go next, but placing it would leave the stale read behind for good.
    assert_eq!(v.longest_prefix, vec![0]);
    assert_eq!(v.stuck.0, 1);
    assert_eq!(v.strandings.iter().map(|s| (s.placing.0, s.strands.0)).collect::<Vec<_>>(), vec![(1, 2)]);
    let text = v.to_string();
    assert!(text.contains("leaving the key at rv 3 value 10; then #1 (client 1: Update"), "{text}");
    assert!(text.contains("would leave #2 (client 2: Get -> Got(rv 3 value 10) [4..5]) behind"), "{text}");
}

#[test]
fn explanation_names_the_operation_that_cannot_be_placed() {
    // Nothing strands here: the read names a value that was never written.
    let v = assert_rejected(&[
        ok(1, create(10), Ret::Created { rv: 3 }, 0, 1),
        ok(2, Op::Get, got(3, 11), 4, 5),
        ok(1, Op::Delete, Ret::Deleted, 6, 7),
    ]);
    assert_eq!(v.longest_prefix, vec![0]);
    assert_eq!(v.stuck.0, 1);
    assert!(v.strandings.is_empty());
    let text = v.to_string();
    assert!(text.contains("leaving the key at rv 3 value 10; then #1 (client 2: Get -> Got(rv 3 value 11)"), "{text}");
}

#[test]
fn two_acknowledged_creates_without_a_delete_are_rejected() {
    assert_rejected(&[
        ok(1, create(10), Ret::Created { rv: 3 }, 0, 10),
        ok(2, create(11), Ret::Created { rv: 4 }, 0, 10),
    ]);
}

#[test]
fn two_updates_from_the_same_rv_cannot_both_succeed() {
    assert_rejected(&[
        ok(1, create(10), Ret::Created { rv: 1 }, 0, 1),
        ok(2, update(1, 11), Ret::Updated { rv: 5 }, 2, 20),
        ok(3, update(1, 12), Ret::Updated { rv: 6 }, 2, 20),
    ]);
}

#[test]
fn update_acknowledged_against_an_rv_that_was_never_current_is_rejected() {
    assert_rejected(&[
        ok(1, create(10), Ret::Created { rv: 3 }, 0, 1),
        ok(2, update(2, 11), Ret::Updated { rv: 4 }, 2, 3),
    ]);
}

#[test]
fn conflict_while_the_expected_rv_was_current_is_rejected() {
    assert_rejected(&[ok(1, create(10), Ret::Created { rv: 3 }, 0, 1), ok(2, update(3, 11), Ret::Conflict, 2, 3)]);
}

#[test]
fn read_of_a_write_not_yet_invoked_is_rejected() {
    assert_rejected(&[ok(2, Op::Get, got(3, 10), 0, 1), ok(1, create(10), Ret::Created { rv: 3 }, 2, 3)]);
}

#[test]
fn lost_acknowledged_create_is_rejected() {
    assert_rejected(&[ok(1, create(10), Ret::Created { rv: 3 }, 0, 1), ok(2, Op::Get, Ret::NotFound, 5, 6)]);
}

#[test]
fn already_exists_on_an_absent_key_is_rejected() {
    assert_rejected(&[ok(1, create(10), Ret::AlreadyExists, 0, 1)]);
}

#[test]
fn resource_versions_never_go_backwards() {
    assert_rejected(&[
        ok(1, create(10), Ret::Created { rv: 5 }, 0, 1),
        ok(1, Op::Delete, Ret::Deleted, 2, 3),
        ok(1, create(11), Ret::Created { rv: 4 }, 4, 5),
    ]);
}

#[test]
fn unknown_create_that_took_effect_explains_later_reads() {
    assert_linearizable(&[
        unknown(1, create(10), 0),
        ok(2, Op::Get, got(9, 10), 5, 6),
        ok(2, update(9, 11), Ret::Updated { rv: 12 }, 7, 8),
        ok(2, Op::Get, got(12, 11), 9, 10),
    ]);
}

#[test]
fn unknown_create_that_did_not_take_effect_is_fine() {
    assert_linearizable(&[unknown(1, create(10), 0), ok(2, Op::Get, Ret::NotFound, 5, 6)]);
}

#[test]
fn unknown_write_may_take_effect_long_after_its_client_gave_up() {
    assert_linearizable(&[
        ok(1, create(10), Ret::Created { rv: 3 }, 0, 1),
        unknown(1, update(3, 11), 2),
        ok(2, Op::Get, got(3, 10), 10, 11),
        ok(2, Op::Get, got(3, 10), 20, 21),
        ok(2, Op::Get, got(8, 11), 30, 31),
    ]);
}

#[test]
fn unknown_write_cannot_take_effect_before_it_was_invoked() {
    assert_rejected(&[ok(2, Op::Get, got(9, 10), 0, 1), unknown(1, create(10), 5)]);
}

#[test]
fn unknown_write_takes_effect_at_most_once() {
    assert_rejected(&[
        ok(1, create(10), Ret::Created { rv: 3 }, 0, 1),
        unknown(1, update(3, 11), 2),
        ok(2, Op::Get, got(8, 11), 10, 11),
        ok(2, Op::Get, got(3, 10), 20, 21),
    ]);
}

#[test]
fn rv_of_an_unknown_write_is_fixed_once_seen() {
    assert_rejected(&[unknown(1, create(10), 0), ok(2, Op::Get, got(5, 10), 5, 6), ok(2, Op::Get, got(6, 10), 7, 8)]);
}

#[test]
fn unknown_delete_may_or_may_not_have_happened() {
    let base = [ok(1, create(10), Ret::Created { rv: 3 }, 0, 1), unknown(1, Op::Delete, 2)];
    for seen in [Ret::NotFound, got(3, 10)] {
        let mut h = base.to_vec();
        h.push(ok(2, Op::Get, seen, 10, 11));
        assert_linearizable(&h);
    }
    // But not both ways round.
    let mut flip = base.to_vec();
    flip.push(ok(2, Op::Get, Ret::NotFound, 10, 11));
    flip.push(ok(2, Op::Get, got(3, 10), 12, 13));
    assert_rejected(&flip);
}

#[test]
fn failed_operations_had_no_effect() {
    assert_linearizable(&[failed(1, create(10), 0, 1), ok(2, Op::Get, Ret::NotFound, 5, 6)]);
    assert_rejected(&[failed(1, create(10), 0, 1), ok(2, Op::Get, got(3, 10), 5, 6)]);
}

#[test]
fn touching_operations_count_as_concurrent() {
    // The read is invoked at the instant the write completes: either order is allowed.
    assert_linearizable(&[ok(1, create(10), Ret::Created { rv: 3 }, 0, 5), ok(2, Op::Get, Ret::NotFound, 5, 6)]);
}

#[test]
fn malformed_history_is_reported_not_judged() {
    let verdict = check(&[ok(1, create(10), Ret::Created { rv: 3 }, 0, 1), ok(1, Op::Get, Ret::Deleted, 2, 3)]);
    match &verdict {
        CheckResult::Malformed { op: 1, reason } => assert!(reason.contains("Deleted cannot answer Get"), "{reason}"),
        other => panic!("expected malformed, got {other}"),
    }
}

/// Twenty creates and twenty deletes, all concurrent and acknowledged, then a read of a value
/// nobody wrote. The creates' rvs fix their order, but any delete can follow any create, so
/// proving that no order explains the read visits about 2^20 configurations.
fn pathological() -> Vec<Operation> {
    let mut h = Vec::new();
    for i in 1..=20 {
        h.push(ok(i, create(i), Ret::Created { rv: 10 * i }, 2, 100));
        h.push(ok(100 + i, Op::Delete, Ret::Deleted, 2, 100));
    }
    h.push(ok(999, Op::Get, got(500, 999), 200, 201));
    h
}

#[test]
fn pathological_history_reports_an_exhausted_step_budget() {
    let budget = Budget { max_steps: 100_000, ..Budget::default() };
    match check_with(&pathological(), budget) {
        CheckResult::Unknown(e) => {
            assert_eq!(e.limit, "steps");
            assert!(e.steps > 100_000);
        }
        other => panic!("expected an exhausted budget, got {other}"),
    }
}

#[test]
fn pathological_history_reports_an_exhausted_memory_budget() {
    let budget = Budget { max_memo_bytes: 100_000, ..Budget::default() };
    match check_with(&pathological(), budget) {
        CheckResult::Unknown(e) => assert_eq!(e.limit, "memo bytes"),
        other => panic!("expected an exhausted budget, got {other}"),
    }
}

#[test]
fn pathological_history_reports_a_timeout() {
    let budget =
        Budget { timeout: Some(std::time::Duration::from_millis(50)), max_steps: u64::MAX, max_memo_bytes: usize::MAX };
    let started = Instant::now();
    match check_with(&pathological(), budget) {
        CheckResult::Unknown(e) => assert_eq!(e.limit, "timeout"),
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(started.elapsed().as_secs() < 10);
}

/// Settings for a simulated run against one key.
#[derive(Clone, Copy, Debug)]
struct Run {
    seed: u64,
    ops: usize,
    clients: u64,
    /// Percent of requests whose answer is lost (half of them took effect).
    unknown_pct: u64,
    /// Percent of requests refused before reaching the leader.
    fail_pct: u64,
}

/// A deterministic generator (splitmix64), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

/// Simulates `run.clients` clients, each with one request in flight, against a correct key:
/// every request takes effect atomically at a point between its invoke and its completion, in
/// the order of those points, so the history is linearizable by construction.
fn simulate(run: Run) -> Vec<Operation> {
    let mut rng = Rng(run.seed);
    let mut revision = 0u64; // the store's global revision; other keys bump it too
    let mut current: Option<Version> = None;
    let mut past_rvs: Vec<u64> = Vec::new();
    let mut next_value = 1u64;
    // Per client: (point at which its pending request takes effect, its invoke time).
    let mut pending: Vec<(u64, u64)> = (0..run.clients)
        .map(|_| {
            let invoke = rng.below(50);
            (invoke + rng.below(60), invoke)
        })
        .collect();
    let mut history = Vec::with_capacity(run.ops);

    while history.len() < run.ops {
        let client = (0..pending.len()).min_by_key(|&c| pending[c].0).unwrap_or(0);
        let (point, invoke) = pending[client];
        let complete = point + rng.below(60);

        let op = match current {
            None => match rng.below(10) {
                0..=5 => Op::Create { value: next_value },
                6 | 7 => Op::Get,
                8 => Op::Update { expected_rv: past_rvs.last().copied().unwrap_or(1), value: next_value },
                _ => Op::Delete,
            },
            Some(v) => match rng.below(20) {
                0..=8 => Op::Get,
                9..=13 => Op::Update { expected_rv: v.rv, value: next_value },
                14 => Op::Update { expected_rv: v.rv, value: v.value }, // changes nothing
                15 | 16 => {
                    let stale = past_rvs.get(rng.below(past_rvs.len() as u64 + 1) as usize).copied();
                    Op::Update { expected_rv: stale.unwrap_or(v.rv + 1000), value: next_value }
                }
                17 => Op::Create { value: next_value },
                _ => Op::Delete,
            },
        };
        next_value += 1;

        let lost = rng.percent(run.unknown_pct);
        let refused = !lost && rng.percent(run.fail_pct);
        let applies = !refused && (!lost || rng.percent(50));
        let mut write = |revision: &mut u64| {
            *revision += 1 + rng.below(3);
            *revision
        };
        let ret = if !applies {
            None
        } else {
            Some(match (op, current) {
                (Op::Create { value }, None) => {
                    let rv = write(&mut revision);
                    current = Some(Version { rv, value });
                    Ret::Created { rv }
                }
                (Op::Create { .. }, Some(_)) => Ret::AlreadyExists,
                (Op::Update { expected_rv, value }, Some(v)) if v.rv == expected_rv => {
                    if value != v.value {
                        past_rvs.push(v.rv);
                        let rv = write(&mut revision);
                        current = Some(Version { rv, value });
                        Ret::Updated { rv }
                    } else {
                        Ret::Updated { rv: v.rv }
                    }
                }
                (Op::Update { .. }, Some(_)) => Ret::Conflict,
                (Op::Update { .. } | Op::Delete, None) => Ret::NotFound,
                (Op::Delete, Some(v)) => {
                    past_rvs.push(v.rv);
                    write(&mut revision);
                    current = None;
                    Ret::Deleted
                }
                (Op::Get, v) => Ret::Got(v),
            })
        };
        let outcome = match ret {
            _ if refused => Outcome::Fail,
            _ if lost => Outcome::Unknown,
            Some(ret) => Outcome::Ok(ret),
            None => Outcome::Fail,
        };
        history.push(Operation { client: client as u64, op, outcome, invoke, complete });

        let next_invoke = complete + rng.below(20);
        pending[client] = (next_invoke + rng.below(60), next_invoke);
    }
    history
}

fn runs() -> impl Strategy<Value = Run> {
    (any::<u64>(), 1usize..150, 1u64..8, 0u64..10, 0u64..10)
        .prop_map(|(seed, ops, clients, unknown_pct, fail_pct)| Run { seed, ops, clients, unknown_pct, fail_pct })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn histories_of_a_correct_key_are_linearizable(run in runs()) {
        let mut history = simulate(run);
        let verdict = check(&history);
        prop_assert!(verdict.is_linearizable(), "{:?}: {}", run, verdict);
        history.reverse();
        prop_assert!(check(&history).is_linearizable(), "{:?} reversed", run);
    }

    #[test]
    fn a_read_of_a_value_never_written_is_rejected(run in runs(), pick in any::<prop::sample::Index>()) {
        let mut history = simulate(run);
        let reads: Vec<usize> = (0..history.len())
            .filter(|&i| matches!(history[i].outcome, Outcome::Ok(Ret::Got(Some(_)))))
            .collect();
        prop_assume!(!reads.is_empty());
        let i = reads[pick.index(reads.len())];
        if let Outcome::Ok(Ret::Got(Some(v))) = &mut history[i].outcome {
            v.value = u64::MAX;
        }
        let verdict = check(&history);
        prop_assert!(matches!(verdict, CheckResult::NotLinearizable(_)), "{:?}: {}", run, verdict);
    }

    #[test]
    fn a_read_of_the_wrong_rv_is_rejected_when_every_answer_arrived(
        run in runs(),
        pick in any::<prop::sample::Index>(),
        delta in 1u64..5,
    ) {
        let mut history = simulate(Run { unknown_pct: 0, ..run });
        let reads: Vec<usize> = (0..history.len())
            .filter(|&i| matches!(history[i].outcome, Outcome::Ok(Ret::Got(Some(_)))))
            .collect();
        prop_assume!(!reads.is_empty());
        let i = reads[pick.index(reads.len())];
        if let Outcome::Ok(Ret::Got(Some(v))) = &mut history[i].outcome {
            v.rv += delta;
        }
        let verdict = check(&history);
        prop_assert!(matches!(verdict, CheckResult::NotLinearizable(_)), "{:?}: {}", run, verdict);
    }
}

/// Realistic sizes, with a step budget a tenth of the default (the 32-client refutation needs
/// about 600,000 steps), so that an algorithmic regression fails here deterministically
/// rather than showing up as a slow test. Run with `--nocapture` to see the timings.
#[test]
fn two_thousand_op_histories_are_decided_within_a_tenth_of_the_default_budget() {
    let budget = Budget { max_steps: 2_000_000, ..Budget::default() };
    for (seed, clients, unknown_pct) in [(1, 8, 0), (2, 8, 2), (3, 8, 5), (4, 32, 2)] {
        let history = simulate(Run { seed, ops: 2_000, clients, unknown_pct, fail_pct: 2 });
        let started = Instant::now();
        let verdict = check_with(&history, budget);
        let took = started.elapsed();
        assert!(verdict.is_linearizable(), "seed {seed}: {verdict}");
        println!("2000 ops, {clients} clients, {unknown_pct}% unknown: linearizable in {took:?}");

        // A read in the middle made stale by one rv, and the last read made up.
        for from_end in [history.len() / 2, 0] {
            let mut bad = history.clone();
            let mut reads = bad.iter_mut().rev().skip(from_end);
            let Some(read) = reads.find(|o| matches!(o.outcome, Outcome::Ok(Ret::Got(Some(_))))) else {
                continue;
            };
            if let Outcome::Ok(Ret::Got(Some(v))) = &mut read.outcome {
                *v = if from_end == 0 { Version { rv: 1, value: u64::MAX } } else { Version { rv: v.rv - 1, ..*v } };
            }
            let started = Instant::now();
            let verdict = check_with(&bad, budget);
            let took = started.elapsed();
            assert!(matches!(verdict, CheckResult::NotLinearizable(_)), "seed {seed}: {verdict}");
            println!("  read {from_end} from the end corrupted: rejected in {took:?}");
        }
    }
}

/// The definition, executed: tries every order of the operations and every subset of the
/// unknown ones, respecting real time. Exponential; for histories of a few operations.
fn brute_force(history: &[Operation]) -> bool {
    fn open(ops: &[Operation], placed: &[bool], j: usize) -> bool {
        !placed[j] && matches!(ops[j].outcome, Outcome::Ok(_))
    }
    fn extend(ops: &[Operation], placed: &mut [bool], state: State) -> bool {
        if !(0..ops.len()).any(|j| open(ops, placed, j)) {
            return true;
        }
        for i in 0..ops.len() {
            let x = &ops[i];
            let ret = match x.outcome {
                _ if placed[i] => continue,
                Outcome::Ok(ret) => Some(ret),
                Outcome::Unknown => None,
                Outcome::Fail => continue,
            };
            // Real time: an operation that completed before `x` was invoked goes first.
            if (0..ops.len()).any(|j| open(ops, placed, j) && ops[j].complete < x.invoke) {
                continue;
            }
            if let Some(next) = register::step(&state, &x.op, ret.as_ref()) {
                placed[i] = true;
                if extend(ops, placed, next) {
                    return true;
                }
                placed[i] = false;
            }
        }
        false
    }
    extend(history, &mut vec![false; history.len()], State::default())
}

/// Any well-formed operation over a small domain, so that rvs and values collide often.
fn small_operation() -> impl Strategy<Value = Operation> {
    (0u8..4, 0u8..4, 1u64..5, 1u64..4, 0u64..12, 0u64..6, 0u8..10, 0u64..3).prop_map(
        |(kind, answer, rv, value, invoke, len, outcome, client)| {
            let (op, rets) = match kind {
                0 => (Op::Create { value }, vec![Ret::Created { rv }, Ret::AlreadyExists]),
                1 => (
                    Op::Update { expected_rv: rv.saturating_sub(answer as u64 % 2).max(1), value },
                    vec![Ret::Updated { rv }, Ret::Conflict, Ret::NotFound],
                ),
                2 => (Op::Delete, vec![Ret::Deleted, Ret::NotFound]),
                _ => (Op::Get, vec![got(rv, value), Ret::NotFound]),
            };
            let outcome = match outcome {
                0 => Outcome::Unknown,
                1 => Outcome::Fail,
                _ => Outcome::Ok(rets[answer as usize % rets.len()]),
            };
            Operation { client, op, outcome, invoke, complete: invoke + len }
        },
    )
}

/// Changes one answer of a history, usually making it non-linearizable but only just.
fn mutate(history: &mut [Operation], which: usize, how: u8) {
    let Some(o) = history.get_mut(which) else { return };
    o.outcome = match (o.outcome, how % 4) {
        (Outcome::Ok(Ret::Got(Some(v))), 0) => Outcome::Ok(Ret::Got(Some(Version { rv: v.rv + 1, ..v }))),
        (Outcome::Ok(Ret::Got(Some(_))), 1) => Outcome::Ok(Ret::NotFound),
        (Outcome::Ok(Ret::Created { rv }), _) => Outcome::Ok(Ret::Created { rv: rv.saturating_sub(2) }),
        (Outcome::Ok(Ret::Updated { rv }), 0) => Outcome::Ok(Ret::Updated { rv: rv + 1 }),
        (Outcome::Ok(Ret::Updated { .. }), _) => Outcome::Ok(Ret::Conflict),
        (Outcome::Ok(Ret::Conflict), _) => Outcome::Ok(Ret::Updated { rv: 1_000 }),
        (Outcome::Ok(Ret::NotFound), _) if o.op == Op::Get => Outcome::Ok(Ret::Got(Some(Version { rv: 1, value: 1 }))),
        (Outcome::Ok(_), 2) => Outcome::Fail,
        (Outcome::Unknown, _) => Outcome::Fail,
        (other, _) => other,
    };
    if how % 8 == 7 {
        // Or shift it in time, which changes what it overlaps.
        o.invoke += 3;
        o.complete += 3;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn small_random_histories_agree_with_brute_force(history in prop::collection::vec(small_operation(), 0..7)) {
        let verdict = check(&history);
        prop_assert_eq!(verdict.is_linearizable(), brute_force(&history), "{}", verdict);
    }

    #[test]
    fn small_near_miss_histories_agree_with_brute_force(
        run in runs(),
        which in 0usize..9,
        how in any::<u8>(),
    ) {
        let mut history = simulate(Run { ops: run.ops % 9 + 1, unknown_pct: run.unknown_pct * 3, ..run });
        mutate(&mut history, which, how);
        let verdict = check(&history);
        prop_assert_eq!(verdict.is_linearizable(), brute_force(&history), "{:?} {}", history, verdict);
    }
}
