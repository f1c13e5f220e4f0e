//! The end-of-run checks of a chaos run, on what the workload recorded. Each check returns
//! the violations it found, as sentences that name the key, the revision and the operation.

use std::collections::{BTreeMap, HashMap};

use super::history::{Op, Operation, Outcome, Ret, Version};
use super::linearize::{check_with, Budget, CheckResult};
use super::workload::{Record, Seen, WatchLog};

/// The state of one key at the end of the run, read after the cluster healed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Final {
    pub version: Version,
    pub uid: String,
}

/// Verdicts of the linearizability check.
#[derive(Debug, Default)]
pub struct Linearizability {
    pub keys: usize,
    pub violations: Vec<String>,
    /// Keys whose check ran out of budget (neither proven nor refuted).
    pub undecided: Vec<String>,
}

/// Checks each key's history, with a final read (`finals`, read at `[read_at, read_done]`)
/// appended as one more operation. Keys are checked in parallel on blocking threads.
pub async fn linearizability(
    records: &[Record],
    finals: &HashMap<String, Final>,
    read_at: u64,
    read_done: u64,
    budget: Budget,
) -> Linearizability {
    let mut per_key: BTreeMap<String, Vec<Operation>> = BTreeMap::new();
    for r in records {
        per_key.entry(r.key.clone()).or_default().push(r.op);
    }
    let mut tasks = Vec::new();
    for (key, mut ops) in per_key {
        let seen = finals.get(&key).map(|f| f.version);
        ops.push(Operation {
            client: u64::MAX,
            op: Op::Get,
            outcome: Outcome::Ok(Ret::Got(seen)),
            invoke: read_at,
            complete: read_done,
        });
        tasks.push(tokio::task::spawn_blocking(move || (key.clone(), check_with(&ops, budget), ops)));
    }
    let mut out = Linearizability { keys: tasks.len(), ..Default::default() };
    for t in tasks {
        let Ok((key, verdict, ops)) = t.await else {
            out.violations.push("a linearizability check panicked".into());
            continue;
        };
        match verdict {
            CheckResult::Linearizable => {}
            CheckResult::NotLinearizable(v) => out.violations.push(format!(
                "key {key}: not linearizable ({} operations): {} cannot be placed; after {} operations the key was {:?}; recent: {}",
                ops.len(),
                v.stuck.1,
                v.longest_prefix.len(),
                v.state,
                v.recent.iter().map(|(_, o)| o.to_string()).collect::<Vec<_>>().join("; ")
            )),
            CheckResult::Unknown(e) => {
                out.undecided.push(format!("key {key}: {} operations, the {} budget ran out", ops.len(), e.limit))
            }
            CheckResult::Malformed { op, reason } => {
                out.violations.push(format!("key {key}: the recorder wrote an impossible operation {op}: {reason}"))
            }
        }
    }
    out
}

/// The revision and value an acknowledged create or update wrote.
fn written(r: &Record) -> Option<(u64, u64)> {
    match (r.op.outcome, r.op.op) {
        (Outcome::Ok(Ret::Created { rv }), Op::Create { value }) => Some((rv, value)),
        (Outcome::Ok(Ret::Updated { rv }), Op::Update { value, .. }) => Some((rv, value)),
        _ => None,
    }
}

/// Nothing acknowledged is lost: every acknowledged create is still there at the end, or a
/// delete that could have removed it (acknowledged as deleting that very object, or with an
/// unknown outcome) came after it.
pub fn nothing_lost(records: &[Record], finals: &HashMap<String, Final>) -> Vec<String> {
    let mut out = Vec::new();
    for c in records {
        let (Outcome::Ok(Ret::Created { rv }), Some(uid)) = (c.op.outcome, &c.uid) else { continue };
        if finals.get(&c.key).is_some_and(|f| &f.uid == uid) {
            continue;
        }
        let deleted = records.iter().any(|d| {
            d.key == c.key
                && d.op.op == Op::Delete
                && match d.op.outcome {
                    Outcome::Ok(Ret::Deleted) => d.uid.as_ref() == Some(uid),
                    Outcome::Unknown => true,
                    _ => false,
                }
        });
        if !deleted {
            out.push(format!(
                "key {}: the create acknowledged at rv {rv} (uid {uid}, client {}) is gone and nothing deleted it",
                c.key, c.op.client
            ));
        }
    }
    out
}

/// Revisions never go backwards for a key: an operation that starts after another one ended
/// sees (or writes) a revision at least as new. Also, one revision of a key is never two
/// different versions.
pub fn monotonic(records: &[Record]) -> Vec<String> {
    let mut out = Vec::new();
    let mut per_key: HashMap<&str, Vec<(u64, u64, u64, &Record)>> = HashMap::new();
    let mut at_rv: HashMap<(&str, u64), (u64, &Record)> = HashMap::new();
    for r in records {
        let seen = match r.op.outcome {
            Outcome::Ok(Ret::Got(Some(v))) => Some((v.rv, v.value)),
            _ => written(r),
        };
        let Some((rv, value)) = seen else { continue };
        per_key.entry(&r.key).or_default().push((r.op.invoke, r.op.complete, rv, r));
        match at_rv.get(&(r.key.as_str(), rv)) {
            Some((v, other)) if *v != value => out.push(format!(
                "key {}: rv {rv} holds value {v} for client {} and value {value} for client {}",
                r.key, other.op.client, r.op.client
            )),
            _ => {
                at_rv.insert((&r.key, rv), (value, r));
            }
        }
    }
    for (key, mut ops) in per_key {
        // By completion time, with the newest revision completed so far.
        ops.sort_by_key(|o| o.1);
        let mut newest = Vec::with_capacity(ops.len());
        let mut best: Option<(u64, &Record)> = None;
        for o in &ops {
            if best.is_none_or(|(rv, _)| o.2 > rv) {
                best = Some((o.2, o.3));
            }
            newest.push((o.1, best));
        }
        for o in &ops {
            // The newest revision among operations that completed before this one started.
            let done_before = newest.partition_point(|(complete, _)| *complete < o.0);
            if done_before == 0 {
                continue;
            }
            if let (_, Some((rv, earlier))) = newest[done_before - 1] {
                if o.2 < rv {
                    out.push(format!(
                        "key {key}: {} saw rv {} after {} had already seen rv {rv}",
                        o.3.op, o.2, earlier.op
                    ));
                }
            }
        }
    }
    out
}

/// No uid names two objects: a uid belongs to one key and one create.
pub fn unique_uids(records: &[Record], watches: &[WatchLog]) -> Vec<String> {
    let mut out = Vec::new();
    let add =
        |uid: &str, key: &str, rv: u64, out: &mut Vec<String>, owner: &mut HashMap<String, (String, u64)>| match owner
            .get(uid)
        {
            Some((k, r)) if k != key || *r != rv => {
                out.push(format!("uid {uid} was created twice: key {k} at rv {r} and key {key} at rv {rv}"))
            }
            Some(_) => {}
            None => {
                owner.insert(uid.to_string(), (key.to_string(), rv));
            }
        };
    let mut owners: HashMap<String, (String, u64)> = HashMap::new();
    for r in records {
        if let (Outcome::Ok(Ret::Created { rv }), Some(uid)) = (r.op.outcome, &r.uid) {
            add(uid, &r.key, rv, &mut out, &mut owners);
        }
    }
    for w in watches {
        for s in &w.segments {
            for e in s.events.iter().filter(|e| e.kind == "ADDED") {
                add(&e.uid, &e.key, e.rv, &mut out, &mut owners);
            }
        }
    }
    out
}

/// What the watches saw, summed up.
#[derive(Debug, Default)]
pub struct WatchReport {
    pub events: usize,
    pub reconnects: usize,
    pub relists: usize,
    pub violations: Vec<String>,
}

/// Every watch stream saw each committed change exactly once and in revision order, across
/// reconnects; a re-list starts over from the list's revision. The committed changes are the
/// union of what all watchers saw and every acknowledged write; two watchers must agree on
/// every revision they both saw.
pub fn watches(records: &[Record], logs: &[WatchLog]) -> WatchReport {
    let mut report = WatchReport::default();
    let mut reference: BTreeMap<u64, Seen> = BTreeMap::new();
    for log in logs {
        for seg in &log.segments {
            report.reconnects += seg.reconnects;
            report.events += seg.events.len();
            for e in &seg.events {
                match reference.get(&e.rv) {
                    Some(r) if r != e => report.violations.push(format!(
                        "watchers disagree about rv {}: watcher {} saw {:?}, another saw {:?}",
                        e.rv, log.watcher, e, r
                    )),
                    Some(_) => {}
                    None => {
                        reference.insert(e.rv, e.clone());
                    }
                }
            }
        }
        report.relists += log.segments.len().saturating_sub(1);
    }
    // An acknowledged write is a committed change, whether or not a watcher saw it.
    for r in records {
        let Some((rv, value)) = written(r) else { continue };
        match reference.get(&rv) {
            Some(e) if e.key != r.key || e.value != value => report.violations.push(format!(
                "rv {rv}: client {} wrote {} = {value}, the watches saw {} = {} ({})",
                r.op.client, r.key, e.key, e.value, e.kind
            )),
            Some(_) => {}
            None => {
                let kind = if matches!(r.op.op, Op::Create { .. }) { "ADDED" } else { "MODIFIED" };
                let uid = r.uid.clone().unwrap_or_default();
                reference.insert(rv, Seen { rv, key: r.key.clone(), kind: kind.into(), value, uid });
            }
        }
    }
    for log in logs {
        let mut last = 0u64;
        for (n, seg) in log.segments.iter().enumerate() {
            for e in &seg.events {
                if e.rv <= last {
                    report.violations.push(format!(
                        "watcher {} segment {n}: rv {} ({} {}) arrived after rv {last}: {}",
                        log.watcher,
                        e.rv,
                        e.kind,
                        e.key,
                        if e.rv == last { "a duplicate" } else { "out of order" }
                    ));
                }
                last = last.max(e.rv);
            }
            let mut got: Vec<u64> = seg.events.iter().map(|e| e.rv).collect();
            got.sort_unstable();
            let mut missing = reference.range(seg.from + 1..=seg.to).filter(|(rv, _)| got.binary_search(rv).is_err());
            if let Some((rv, e)) = missing.next() {
                let more = missing.count();
                report.violations.push(format!(
                    "watcher {} segment {n} (rv {}..={}) missed rv {rv} ({} {} = {}) and {more} more",
                    log.watcher, seg.from, seg.to, e.kind, e.key, e.value
                ));
            }
            for l in &seg.listed {
                if let Some(e) = reference.get(&l.rv) {
                    if e.key != l.key || e.value != l.value || (!e.uid.is_empty() && e.uid != l.uid) {
                        report.violations.push(format!(
                            "watcher {} listed {} = {} at rv {}, the change at rv {} was {} = {}",
                            log.watcher, l.key, l.value, l.rv, e.rv, e.key, e.value
                        ));
                    }
                }
            }
            last = last.max(seg.to);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::workload::Segment;

    fn rec(key: &str, op: Op, outcome: Outcome, invoke: u64, complete: u64, uid: Option<&str>) -> Record {
        Record {
            key: key.into(),
            op: Operation { client: 1, op, outcome, invoke, complete },
            uid: uid.map(String::from),
            replica: 0,
            error: None,
        }
    }

    fn seen(rv: u64, key: &str, kind: &str, value: u64) -> Seen {
        Seen { rv, key: key.into(), kind: kind.into(), value, uid: format!("u-{key}") }
    }

    #[test]
    fn an_acknowledged_create_that_vanished_is_lost_unless_a_delete_explains_it() {
        let create = rec("a", Op::Create { value: 1 }, Outcome::Ok(Ret::Created { rv: 5 }), 0, 10, Some("u1"));
        let none = HashMap::new();
        assert_eq!(nothing_lost(std::slice::from_ref(&create), &none).len(), 1);

        let there =
            HashMap::from([("a".to_string(), Final { version: Version { rv: 5, value: 1 }, uid: "u1".into() })]);
        assert!(nothing_lost(std::slice::from_ref(&create), &there).is_empty());

        let other_delete = rec("a", Op::Delete, Outcome::Ok(Ret::Deleted), 20, 30, Some("u0"));
        assert_eq!(nothing_lost(&[create.clone(), other_delete], &none).len(), 1, "a delete of another object");
        let delete = rec("a", Op::Delete, Outcome::Ok(Ret::Deleted), 20, 30, Some("u1"));
        assert!(nothing_lost(&[create.clone(), delete], &none).is_empty());
        let maybe = rec("a", Op::Delete, Outcome::Unknown, 20, 0, None);
        assert!(nothing_lost(&[create, maybe], &none).is_empty());
    }

    #[test]
    fn a_read_older_than_one_that_finished_before_it_is_flagged() {
        let got = |rv, value, invoke, complete| {
            rec("a", Op::Get, Outcome::Ok(Ret::Got(Some(Version { rv, value }))), invoke, complete, Some("u"))
        };
        assert!(monotonic(&[got(5, 1, 0, 10), got(7, 2, 11, 20)]).is_empty());
        assert!(monotonic(&[got(7, 2, 0, 10), got(5, 1, 5, 20)]).is_empty(), "overlapping reads may disagree");
        assert_eq!(monotonic(&[got(7, 2, 0, 10), got(5, 1, 11, 20)]).len(), 1);
        assert_eq!(monotonic(&[got(7, 2, 0, 10), got(7, 3, 11, 20)]).len(), 1, "one rv, two values");
    }

    #[test]
    fn a_uid_that_names_two_creates_is_flagged() {
        let a = rec("a", Op::Create { value: 1 }, Outcome::Ok(Ret::Created { rv: 5 }), 0, 10, Some("u1"));
        let b = rec("b", Op::Create { value: 2 }, Outcome::Ok(Ret::Created { rv: 6 }), 0, 10, Some("u1"));
        assert!(unique_uids(std::slice::from_ref(&a), &[]).is_empty());
        assert_eq!(unique_uids(&[a, b], &[]).len(), 1);
    }

    fn log(watcher: usize, segments: Vec<Segment>) -> WatchLog {
        WatchLog { watcher, segments }
    }

    fn segment(from: u64, to: u64, events: Vec<Seen>) -> Segment {
        Segment { from, to, events, ..Default::default() }
    }

    #[test]
    fn watches_must_see_each_change_once_in_order() {
        let full = vec![seen(2, "a", "ADDED", 1), seen(3, "a", "MODIFIED", 2), seen(4, "a", "DELETED", 2)];
        let good = [log(1, vec![segment(1, 4, full.clone())]), log(2, vec![segment(1, 4, full.clone())])];
        assert!(watches(&[], &good).violations.is_empty());

        let missed = [
            log(1, vec![segment(1, 4, full.clone())]),
            log(2, vec![segment(1, 4, vec![full[0].clone(), full[2].clone()])]),
        ];
        let v = watches(&[], &missed).violations;
        assert!(v.len() == 1 && v[0].contains("missed rv 3"), "{v:?}");

        let twice =
            [log(1, vec![segment(1, 4, vec![full[0].clone(), full[1].clone(), full[1].clone(), full[2].clone()])])];
        let v = watches(&[], &twice).violations;
        assert!(v.iter().any(|x| x.contains("a duplicate")), "{v:?}");

        let disagree =
            [log(1, vec![segment(1, 4, full.clone())]), log(2, vec![segment(1, 2, vec![seen(2, "a", "ADDED", 9)])])];
        let v = watches(&[], &disagree).violations;
        assert!(v.iter().any(|x| x.contains("disagree")), "{v:?}");

        // An acknowledged write that no watcher saw, inside a watched range, is missed.
        let write =
            rec("a", Op::Update { expected_rv: 4, value: 7 }, Outcome::Ok(Ret::Updated { rv: 5 }), 0, 1, Some("u-a"));
        let v = watches(&[write], &[log(1, vec![segment(1, 6, full.clone())])]).violations;
        assert!(v.iter().any(|x| x.contains("missed rv 5")), "{v:?}");

        // A re-list starts a new segment: what happened between the two is not owed.
        let relisted = [log(1, vec![segment(1, 2, vec![full[0].clone()]), segment(3, 4, vec![full[2].clone()])])];
        assert!(watches(&[], &[log(2, vec![segment(1, 4, full)]), relisted[0].clone()]).violations.is_empty());
    }
}
