//! Turns a recorded history into the operations the search may linearize, and shrinks the
//! search where unknown outcomes would otherwise make it exponential.
//!
//! Every reduction here keeps verdicts exact; each rests on an argument given where it is made:
//! - Failed operations and unanswered reads are dropped: they change nothing.
//! - An unanswered create whose value no answer could ever reveal gets a stand-in value shared
//!   by all such creates, so they become interchangeable.
//! - Interchangeable unanswered operations (the same request) are applied in invoke order only.
//! - An unanswered update that can never take effect again is left out of the memo key, so
//!   configurations that differ only in whether it happened are explored once.
//! - A configuration in which some acknowledged operation can never be placed any more (its
//!   rv is behind the key's) is abandoned at once, instead of when its completion is reached.

use std::collections::{HashMap, HashSet};

use super::history::{Op, Operation, Outcome, Ret, Version};
use super::register::State;

/// An operation the search may linearize.
pub(super) struct Candidate {
    /// Its index in the checked history.
    pub index: usize,
    pub op: Op,
    /// `None` for an unknown outcome, which need not be linearized.
    pub ret: Option<Ret>,
    /// For an unknown outcome: the previous unknown operation with the same request, which
    /// must be linearized first.
    pub after: Option<usize>,
}

pub(super) struct Candidates {
    pub ops: Vec<Candidate>,
    /// Unanswered updates as (expected rv, candidate id), by expected rv.
    updates: Vec<(u64, usize)>,
    /// Acknowledged operations whose answer names an rv, as (rv, candidate id), by rv.
    pinned: Vec<(u64, usize)>,
}

impl Candidates {
    pub fn new(history: &[Operation]) -> Candidates {
        let mut ops = Vec::new();
        for (index, o) in history.iter().enumerate() {
            let ret = match (o.outcome, o.op) {
                (Outcome::Ok(ret), _) => Some(ret),
                (Outcome::Fail, _) | (Outcome::Unknown, Op::Get) => continue,
                (Outcome::Unknown, _) => None,
            };
            ops.push(Candidate { index, op: o.op, ret, after: None });
        }

        // A value is compared only by reads, by updates that answered without writing, and by
        // unanswered updates (which write nothing over an equal value). Objects from creates
        // whose value is none of those behave the same whatever that value is, so give them
        // one value: any of theirs, since it is equally unobservable.
        let mut observable = HashSet::new();
        for c in &ops {
            match (c.op, c.ret) {
                (_, Some(Ret::Got(Some(v)))) => {
                    observable.insert(v.value);
                }
                (Op::Update { expected_rv, value }, Some(Ret::Updated { rv })) if rv == expected_rv => {
                    observable.insert(value);
                }
                (Op::Update { value, .. }, None) => {
                    observable.insert(value);
                }
                _ => {}
            }
        }
        let hidden = |c: &Candidate| match c.op {
            Op::Create { value } if c.ret.is_none() && !observable.contains(&value) => Some(value),
            _ => None,
        };
        if let Some(stand_in) = ops.iter().filter_map(hidden).min() {
            for c in ops.iter_mut() {
                if hidden(c).is_some() {
                    c.op = Op::Create { value: stand_in };
                }
            }
        }

        // If a linearization applies some unanswered operations with the same request, swapping
        // them so the earliest-invoked are applied, in invoke order, is still a linearization:
        // none has a completion to respect, and each now sits after its invoke.
        let mut order: Vec<usize> = (0..ops.len()).filter(|&i| ops[i].ret.is_none()).collect();
        order.sort_by_key(|&i| (history[ops[i].index].invoke, i));
        let mut last: HashMap<Op, usize> = HashMap::new();
        for i in order {
            ops[i].after = last.insert(ops[i].op, i);
        }

        let mut updates: Vec<(u64, usize)> = (0..ops.len())
            .filter_map(|i| match (ops[i].op, ops[i].ret) {
                (Op::Update { expected_rv, .. }, None) => Some((expected_rv, i)),
                _ => None,
            })
            .collect();
        updates.sort_unstable();

        let mut pinned: Vec<(u64, usize)> = (0..ops.len())
            .filter_map(|i| match ops[i].ret {
                Some(Ret::Created { rv } | Ret::Updated { rv } | Ret::Got(Some(Version { rv, .. }))) => Some((rv, i)),
                _ => None,
            })
            .collect();
        pinned.sort_unstable();
        Candidates { ops, updates, pinned }
    }

    /// An acknowledged operation not in `placed` that moving from `before` to `after` leaves
    /// unable ever to be placed, if any: then this configuration cannot be completed.
    ///
    /// Every later rv of the key lies above `after.floor`, which never decreases. A create or
    /// a writing update answered with rv `r` needs the floor below `r`. A read of rv `r`, or an
    /// update answered with its expected rv `r` (it wrote nothing), needs the object at rv `r`:
    /// the floor at `r` with the object known to be at `r`, or the floor below `r`. Operations
    /// with an rv below `before.floor` were checked on the way to `before`.
    pub fn stranded(&self, before: &State, after: &State, placed: &[u64]) -> Option<usize> {
        let from = self.pinned.partition_point(|(rv, _)| *rv < before.floor);
        let current = after.object.and_then(|o| o.rv);
        let mut reachable = self.pinned[from..].iter().take_while(|(rv, _)| *rv <= after.floor);
        let stranded = reachable.find(|&&(rv, id)| {
            if placed[id / 64] & (1 << (id % 64)) != 0 {
                return false;
            }
            let needs_the_object_at_rv = match (self.ops[id].op, self.ops[id].ret) {
                (_, Some(Ret::Got(_))) => true,
                (Op::Update { expected_rv, .. }, Some(Ret::Updated { rv })) => rv == expected_rv,
                _ => false,
            };
            rv < after.floor || !needs_the_object_at_rv || current != Some(rv)
        });
        stranded.map(|&(_, id)| id)
    }

    /// Marks in `key` the unanswered updates that can no longer take effect in `state` or any
    /// state after it. Whether such an update was applied earlier does not change what can
    /// follow, so configurations that differ only there share one memo entry.
    ///
    /// An update expecting rv `x` needs the object's rv to be `x`. The floor never decreases
    /// and every rv the key gets later is above it, so the update is dead once the floor is
    /// above `x`, or at `x` without the object being at rv `x` now.
    pub fn mask_dead(&self, state: &State, key: &mut [u64]) {
        let current = state.object.and_then(|o| o.rv);
        for &(x, id) in self.updates.iter().take_while(|(x, _)| *x <= state.floor) {
            if x < state.floor || current != Some(x) {
                key[id / 64] |= 1 << (id % 64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::register::Object;

    fn op(op: Op, outcome: Outcome, invoke: u64) -> Operation {
        Operation { client: 0, op, outcome, invoke, complete: invoke + 1 }
    }

    #[test]
    fn operations_without_information_are_dropped() {
        let c = Candidates::new(&[
            op(Op::Create { value: 1 }, Outcome::Fail, 0),
            op(Op::Get, Outcome::Unknown, 1),
            op(Op::Get, Outcome::Ok(Ret::NotFound), 2),
        ]);
        assert_eq!(c.ops.iter().map(|c| c.index).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn unobservable_creates_become_interchangeable() {
        let c = Candidates::new(&[
            op(Op::Create { value: 5 }, Outcome::Unknown, 3),
            op(Op::Create { value: 4 }, Outcome::Unknown, 2),
            op(Op::Create { value: 9 }, Outcome::Unknown, 1),
            op(Op::Get, Outcome::Ok(Ret::Got(Some(Version { rv: 3, value: 9 }))), 4),
        ]);
        let ops: Vec<Op> = c.ops.iter().map(|c| c.op).collect();
        assert_eq!(ops[..3], [Op::Create { value: 4 }, Op::Create { value: 4 }, Op::Create { value: 9 }]);
        // Applied in invoke order: the create invoked at 2 before the one invoked at 3.
        assert_eq!(c.ops[0].after, Some(1));
        assert_eq!(c.ops[1].after, None);
        assert_eq!(c.ops[2].after, None);
    }

    #[test]
    fn updates_die_once_the_key_moved_past_their_rv() {
        let c = Candidates::new(&[
            op(Op::Update { expected_rv: 3, value: 1 }, Outcome::Unknown, 0),
            op(Op::Update { expected_rv: 5, value: 1 }, Outcome::Unknown, 0),
            op(Op::Update { expected_rv: 7, value: 1 }, Outcome::Unknown, 0),
        ]);
        let mut key = [0u64];
        let at_5 = State { object: Some(Object { rv: Some(5), value: 0 }), floor: 5 };
        c.mask_dead(&at_5, &mut key);
        assert_eq!(key[0], 0b001);
        let mut key = [0u64];
        let gone = State { object: None, floor: 5 };
        c.mask_dead(&gone, &mut key);
        assert_eq!(key[0], 0b011);
    }

    #[test]
    fn acknowledged_operations_are_stranded_once_the_key_moved_past_their_rv() {
        let ok = |op, ret| Operation { client: 0, op, outcome: Outcome::Ok(ret), invoke: 0, complete: 1 };
        let c = Candidates::new(&[
            ok(Op::Create { value: 1 }, Ret::Created { rv: 4 }),
            ok(Op::Get, Ret::Got(Some(Version { rv: 4, value: 1 }))),
            ok(Op::Update { expected_rv: 4, value: 1 }, Ret::Updated { rv: 4 }),
            ok(Op::Update { expected_rv: 4, value: 2 }, Ret::Updated { rv: 6 }),
        ]);
        let start = State::default();
        let at = |rv| State { object: Some(Object { rv: Some(rv), value: 1 }), floor: rv };
        let gone = |floor| State { object: None, floor };
        // Placing the create at rv 4 strands nothing; reaching rv 4 some other way strands it.
        assert_eq!(c.stranded(&start, &at(4), &[0b0001]), None);
        assert_eq!(c.stranded(&start, &at(4), &[0b0000]), Some(0));
        // At rv 4 the read and the no-op update can still go; after a delete at rv 4 they cannot.
        assert_eq!(c.stranded(&at(4), &at(4), &[0b0001]), None);
        assert_eq!(c.stranded(&at(4), &gone(4), &[0b0001]), Some(1));
        assert_eq!(c.stranded(&at(4), &gone(4), &[0b0111]), None);
        // Past rv 6 the writing update is stranded too.
        assert_eq!(c.stranded(&at(4), &at(6), &[0b1111]), None);
        assert_eq!(c.stranded(&at(4), &gone(7), &[0b0111]), Some(3));
    }
}
