//! The sequential specification the checker holds one key to: a register holding at most one
//! object version, with Keel's create / compare-and-set update / delete / get semantics.
//!
//! The model never invents resourceVersions. An acknowledged write brings its rv with it, and
//! the model only checks that it is newer than every rv the key had before (store revisions
//! only grow). A write whose answer was lost leaves an object whose rv is not known yet; the
//! next read or update that names an rv for it pins it down.
//!
//! One imprecision, on the permissive side: a Conflict answered while the rv was still unknown
//! is accepted without remembering which rv it ruled out, so a later read revealing exactly
//! that rv is not caught.
//!
//! `step` is a pure function; the search in `linearize` decides where to apply it.

use std::fmt;

use super::history::{Op, Ret, Version};

/// The object a key holds, as far as the history has revealed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Object {
    /// `None` while the object comes from a write whose answer was lost: its rv is then known
    /// only to be above the state's `floor`.
    pub rv: Option<u64>,
    pub value: u64,
}

/// What one key holds at a point of a linearization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct State {
    pub object: Option<Object>,
    /// The key has had no rv above this one, except an unknown `object.rv`, which lies above it.
    pub floor: u64,
}

impl State {
    fn with(rv: Option<u64>, value: u64, floor: u64) -> State {
        State { object: Some(Object { rv, value }), floor }
    }
}

/// The state after `op` takes effect with answer `ret` in state `s`, or `None` if `s` could not
/// have given that answer.
///
/// `ret == None` stands for an operation whose answer is unknown. Only its effectful branch is
/// modelled: "it answered with a refusal" and "it never happened" both leave the state alone,
/// and the search covers them by not linearizing the operation at all.
pub fn step(s: &State, op: &Op, ret: Option<&Ret>) -> Option<State> {
    match ret {
        Some(ret) => answered(s, op, ret),
        None => unanswered(s, op),
    }
}

fn answered(s: &State, op: &Op, ret: &Ret) -> Option<State> {
    let floor = s.floor;
    match (op, ret, s.object) {
        (Op::Create { value }, Ret::Created { rv }, None) => (*rv > floor).then(|| State::with(Some(*rv), *value, *rv)),
        (Op::Create { .. }, Ret::AlreadyExists, Some(_)) => Some(*s),

        (Op::Update { expected_rv, value }, Ret::Updated { rv }, Some(cur)) => {
            // The expected rv must be the current one (pinning it down if it was unknown).
            let matches = match cur.rv {
                Some(r) => r == *expected_rv,
                None => *expected_rv > floor,
            };
            if !matches {
                None
            } else if rv > expected_rv {
                Some(State::with(Some(*rv), *value, *rv))
            } else if rv == expected_rv && *value == cur.value {
                // Keel does not write an update that changes nothing.
                Some(State::with(Some(*rv), *value, *rv))
            } else {
                None
            }
        }
        // An unknown rv could differ from the expected one; that the very same rv is revealed
        // later is not caught (the model does not remember the excluded rv).
        (Op::Update { expected_rv, .. }, Ret::Conflict, Some(cur)) => (cur.rv != Some(*expected_rv)).then_some(*s),
        (Op::Update { .. }, Ret::NotFound, None) => Some(*s),

        (Op::Delete, Ret::Deleted, Some(_)) => Some(State { object: None, floor }),
        (Op::Delete, Ret::NotFound, None) => Some(*s),

        (Op::Get, Ret::Got(Some(seen)), Some(cur)) => read(s, cur, seen),
        (Op::Get, Ret::Got(None) | Ret::NotFound, None) => Some(*s),

        _ => None,
    }
}

fn read(s: &State, cur: Object, seen: &Version) -> Option<State> {
    if seen.value != cur.value {
        return None;
    }
    match cur.rv {
        Some(r) => (r == seen.rv).then_some(*s),
        None => (seen.rv > s.floor).then(|| State::with(Some(seen.rv), cur.value, seen.rv)),
    }
}

fn unanswered(s: &State, op: &Op) -> Option<State> {
    match (op, s.object) {
        (Op::Create { value }, None) => Some(State::with(None, *value, s.floor)),
        (Op::Update { expected_rv, value }, Some(cur)) => {
            let matches = match cur.rv {
                Some(r) => r == *expected_rv,
                None => *expected_rv > s.floor,
            };
            // An update to the same value writes nothing, so it is the same as not happening.
            (matches && *value != cur.value).then(|| State::with(None, *value, *expected_rv))
        }
        (Op::Delete, Some(_)) => Some(State { object: None, floor: s.floor }),
        _ => None,
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.object {
            None if self.floor == 0 => write!(f, "no object"),
            None => write!(f, "no object (last rv {})", self.floor),
            Some(Object { rv: Some(rv), value }) => write!(f, "rv {rv} value {value}"),
            Some(Object { rv: None, value }) => {
                write!(f, "value {value} at an rv above {} from an unacknowledged write", self.floor)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABSENT: State = State { object: None, floor: 0 };

    fn at(rv: u64, value: u64) -> State {
        State::with(Some(rv), value, rv)
    }

    fn unknown(value: u64, floor: u64) -> State {
        State::with(None, value, floor)
    }

    fn got(rv: u64, value: u64) -> Ret {
        Ret::Got(Some(Version { rv, value }))
    }

    #[test]
    fn answered_operations_follow_keel_semantics() {
        let create = Op::Create { value: 7 };
        let cas = |expected_rv, value| Op::Update { expected_rv, value };
        // (state, op, answer, state after or None if the answer is impossible)
        let table: Vec<(State, Op, Ret, Option<State>)> = vec![
            (ABSENT, create, Ret::Created { rv: 3 }, Some(at(3, 7))),
            (ABSENT, create, Ret::AlreadyExists, None),
            (at(3, 1), create, Ret::AlreadyExists, Some(at(3, 1))),
            (at(3, 1), create, Ret::Created { rv: 4 }, None),
            // A re-created object gets a newer rv than the deleted one had.
            (State { object: None, floor: 5 }, create, Ret::Created { rv: 5 }, None),
            (State { object: None, floor: 5 }, create, Ret::Created { rv: 9 }, Some(at(9, 7))),
            (at(3, 1), cas(3, 2), Ret::Updated { rv: 4 }, Some(at(4, 2))),
            (at(3, 1), cas(3, 2), Ret::Updated { rv: 2 }, None),
            (at(3, 1), cas(2, 2), Ret::Updated { rv: 4 }, None),
            (at(3, 1), cas(3, 1), Ret::Updated { rv: 3 }, Some(at(3, 1))),
            (at(3, 1), cas(3, 2), Ret::Updated { rv: 3 }, None),
            (at(3, 1), cas(2, 2), Ret::Conflict, Some(at(3, 1))),
            (at(3, 1), cas(3, 2), Ret::Conflict, None),
            (ABSENT, cas(3, 2), Ret::NotFound, Some(ABSENT)),
            (ABSENT, cas(3, 2), Ret::Conflict, None),
            (at(3, 1), Op::Delete, Ret::Deleted, Some(State { object: None, floor: 3 })),
            (at(3, 1), Op::Delete, Ret::NotFound, None),
            (ABSENT, Op::Delete, Ret::NotFound, Some(ABSENT)),
            (at(3, 1), Op::Get, got(3, 1), Some(at(3, 1))),
            (at(3, 1), Op::Get, got(3, 2), None),
            (at(3, 1), Op::Get, got(4, 1), None),
            (at(3, 1), Op::Get, Ret::NotFound, None),
            (ABSENT, Op::Get, Ret::Got(None), Some(ABSENT)),
            (ABSENT, Op::Get, Ret::NotFound, Some(ABSENT)),
            // An unknown rv is pinned down by the first answer that names one.
            (unknown(1, 3), Op::Get, got(5, 1), Some(at(5, 1))),
            (unknown(1, 3), Op::Get, got(3, 1), None),
            (unknown(1, 3), Op::Get, got(5, 2), None),
            (unknown(1, 3), cas(5, 2), Ret::Updated { rv: 6 }, Some(at(6, 2))),
            (unknown(1, 3), cas(2, 2), Ret::Updated { rv: 6 }, None),
            (unknown(1, 3), cas(5, 1), Ret::Updated { rv: 5 }, Some(at(5, 1))),
            (unknown(1, 3), cas(5, 2), Ret::Conflict, Some(unknown(1, 3))),
        ];
        for (before, op, ret, after) in table {
            assert_eq!(step(&before, &op, Some(&ret)), after, "{op} -> {ret} in state {before}");
        }
    }

    #[test]
    fn unanswered_writes_model_only_their_effect() {
        let table: Vec<(State, Op, Option<State>)> = vec![
            (ABSENT, Op::Create { value: 7 }, Some(unknown(7, 0))),
            (at(3, 1), Op::Create { value: 7 }, None),
            (at(3, 1), Op::Update { expected_rv: 3, value: 2 }, Some(unknown(2, 3))),
            (at(3, 1), Op::Update { expected_rv: 2, value: 2 }, None),
            (at(3, 1), Op::Update { expected_rv: 3, value: 1 }, None),
            (unknown(1, 3), Op::Update { expected_rv: 5, value: 2 }, Some(unknown(2, 5))),
            (unknown(1, 3), Op::Update { expected_rv: 3, value: 2 }, None),
            (at(3, 1), Op::Delete, Some(State { object: None, floor: 3 })),
            (ABSENT, Op::Delete, None),
            (at(3, 1), Op::Get, None),
        ];
        for (before, op, after) in table {
            assert_eq!(step(&before, &op, None), after, "{op} -> unknown in state {before}");
        }
    }

    /// Every state the register can be in over a small domain: a known rv always equals the
    /// floor, an unknown one lies above it.
    fn all_states() -> Vec<State> {
        let mut out = Vec::new();
        for floor in 0..4 {
            out.push(State { object: None, floor });
            for value in 0..3 {
                out.push(State::with(None, value, floor));
                if floor > 0 {
                    out.push(State::with(Some(floor), value, floor));
                }
            }
        }
        out
    }

    fn all_answered() -> Vec<(Op, Ret)> {
        let mut out = vec![(Op::Delete, Ret::Deleted), (Op::Delete, Ret::NotFound), (Op::Get, Ret::NotFound)];
        for rv in 0..5 {
            for value in 0..3 {
                out.push((Op::Create { value }, Ret::Created { rv }));
                out.push((Op::Get, got(rv, value)));
                for expected_rv in 0..4 {
                    let op = Op::Update { expected_rv, value };
                    out.extend([(op, Ret::Updated { rv }), (op, Ret::Conflict), (op, Ret::NotFound)]);
                }
            }
        }
        out.push((Op::Create { value: 0 }, Ret::AlreadyExists));
        out
    }

    /// The search places an answer that changes nothing as soon as it can; that is sound only
    /// because such an answer changes nothing in any later state where it is legal either.
    #[test]
    fn an_answer_that_changes_nothing_never_changes_anything_later() {
        let states = all_states();
        for s in &states {
            for (op, ret) in all_answered() {
                if step(s, &op, Some(&ret)) != Some(*s) {
                    continue;
                }
                for later in states.iter().filter(|l| l.floor >= s.floor) {
                    if let Some(t) = step(later, &op, Some(&ret)) {
                        assert_eq!(t, *later, "{op} -> {ret}: no-op in {s} but not in {later}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_floor_never_goes_down_and_a_known_rv_is_the_floor() {
        for s in all_states() {
            let unanswered = [Op::Create { value: 1 }, Op::Update { expected_rv: 2, value: 1 }, Op::Delete];
            let steps = all_answered()
                .into_iter()
                .filter_map(|(op, ret)| step(&s, &op, Some(&ret)))
                .chain(unanswered.iter().filter_map(|op| step(&s, op, None)));
            for t in steps {
                assert!(t.floor >= s.floor, "{s} -> {t}");
                if let Some(Object { rv: Some(rv), .. }) = t.object {
                    assert_eq!(rv, t.floor, "{s} -> {t}");
                }
            }
        }
    }
}
