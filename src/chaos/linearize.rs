//! Decides whether one key's history is linearizable with respect to the register in
//! `register`: the Wing & Gong search with Lowe's just-in-time linearization and memoized
//! (linearized set, state) pairs, the algorithm Knossos and Porcupine call WGL.
//!
//! The search walks the history's call and return events in time order, kept in a doubly
//! linked list. At each point it tries to linearize an operation whose call comes before the
//! first pending return; a return reached means every candidate failed, so it backtracks. A
//! configuration already explored (same operations linearized, same state) is never explored
//! twice, which keeps histories of thousands of operations per key fast.
//!
//! Operations with an unknown outcome have no return event: they may be linearized anywhere
//! after their call, or never. Two refinements keep them from making the search exponential
//! in practice: an answer that leaves the state unchanged is placed as soon as it can be,
//! without branching (see `run`), and `candidates` merges configurations that differ only in
//! unknown operations that cannot matter any more.
//!
//! The search is bounded by a [`Budget`]; it reports [`CheckResult::Unknown`] rather than hang.
//!
//! Histories are checked one key at a time, which is sound because linearizability is
//! compositional (Herlihy & Wing): a history is linearizable iff each key's is.

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant};

use super::candidates::Candidates;
use super::history::Operation;
use super::register::{self, Object, State};

/// Bounds on one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Search steps (one candidate tried, or one backtrack).
    pub max_steps: u64,
    /// Memory for the configurations remembered, each about `n / 8 + 80` bytes for a history
    /// of `n` operations. The estimate leaves out the history itself.
    pub max_memo_bytes: usize,
    /// Wall-clock limit, for runs where determinism matters less than a bounded wait.
    pub timeout: Option<Duration>,
}

impl Default for Budget {
    /// Roughly 5 to 15 seconds of a debug build before giving up, and 512 MiB.
    fn default() -> Self {
        Budget { max_steps: 20_000_000, max_memo_bytes: 512 << 20, timeout: None }
    }
}

/// The verdict on one key's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    Linearizable,
    NotLinearizable(Box<Violation>),
    /// The budget ran out before the search could decide.
    Unknown(Exhausted),
    /// The history itself is impossible, e.g. an answer that does not fit its request. This is
    /// a bug in the recorder, not in the cluster.
    Malformed {
        op: usize,
        reason: String,
    },
}

impl CheckResult {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, CheckResult::Linearizable)
    }
}

/// Why a history is not linearizable: how far the search got, and what it could not place.
/// Operations are named by their index in the checked slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The longest linearization found, in order. It includes the unknown-outcome operations it
    /// chose to apply.
    pub longest_prefix: Vec<usize>,
    /// The key's state after `longest_prefix`.
    pub state: State,
    /// An acknowledged operation that had to come next and could not: every operation that
    /// could have been linearized before its completion was tried there and failed.
    pub stuck: (usize, Operation),
    /// The operations that could have come next at that point (at most eight).
    pub candidates: Vec<(usize, Operation)>,
    /// The last few operations of `longest_prefix`, for context.
    pub recent: Vec<(usize, Operation)>,
    /// Placements refused at that point because they would have moved the key past an rv that
    /// another acknowledged operation still had to see (at most four). When the stuck
    /// operation is innocent, the stranded one is usually the culprit.
    pub strandings: Vec<Stranding>,
    /// How many operations had to be linearized (the acknowledged ones).
    pub acknowledged: usize,
}

/// A placement the search refused: after `placing`, `strands` could never be placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stranding {
    pub placing: (usize, Operation),
    pub strands: (usize, Operation),
}

/// How far a search got before its budget ran out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exhausted {
    /// Which limit was hit: "steps", "memo bytes" or "timeout".
    pub limit: &'static str,
    pub steps: u64,
    pub memo_entries: usize,
    pub memo_bytes: usize,
    /// The length of the longest linearization found before stopping.
    pub longest_prefix: usize,
}

/// Checks one key's history with the default [`Budget`]. The key is absent when the history
/// starts. The order of `history` does not matter; its times do.
pub fn check(history: &[Operation]) -> CheckResult {
    check_with(history, Budget::default())
}

/// Checks one key's history within `budget`.
pub fn check_with(history: &[Operation], budget: Budget) -> CheckResult {
    for (i, o) in history.iter().enumerate() {
        if let Some(reason) = o.malformed() {
            return CheckResult::Malformed { op: i, reason };
        }
    }
    Search::new(history, budget).run()
}

const NIL: usize = usize::MAX;

/// A call or return event, a node of the event list.
struct Event {
    /// Index into `Candidates::ops`.
    op: usize,
    /// For a call: the node of its return, or `NIL` when it has none.
    ret: usize,
    is_call: bool,
}

struct Search<'h> {
    history: &'h [Operation],
    budget: Budget,
    candidates: Candidates,
    events: Vec<Event>,
    /// Circular doubly linked list over `events`; node `events.len()` is the head sentinel.
    next: Vec<usize>,
    prev: Vec<usize>,
    head: usize,
    memo: Memo,
    steps: u64,
    started: Instant,
    best: Best,
}

/// One operation placed in the linearization being built.
struct Placed {
    /// Its call event.
    node: usize,
    /// The state before it.
    before: State,
    /// Placed without trying alternatives at this point (see `run`).
    forced: bool,
}

/// The deepest point the search reached, for the explanation.
#[derive(Default)]
struct Best {
    depth: usize,
    state: State,
    /// Taken at the first backtrack out of the deepest point, since most searches never need
    /// them: the placed operations, the stuck one, and those that could have gone next.
    prefix: Vec<usize>,
    stuck: Option<(usize, Vec<usize>)>,
    /// Placements refused there because they would strand another operation: (op, stranded).
    strandings: Vec<(usize, usize)>,
}

impl<'h> Search<'h> {
    fn new(history: &'h [Operation], budget: Budget) -> Self {
        let candidates = Candidates::new(history);
        let ops = &candidates.ops;

        // Calls sort before returns at the same instant, so touching operations count as
        // concurrent: equal timestamps do not say which came first.
        let mut timeline: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, c) in ops.iter().enumerate() {
            let o = &history[c.index];
            timeline.push((o.invoke, false, i));
            if c.ret.is_some() {
                timeline.push((o.complete, true, i));
            }
        }
        timeline.sort_unstable();

        let mut events: Vec<Event> =
            timeline.iter().map(|&(_, is_return, op)| Event { op, ret: NIL, is_call: !is_return }).collect();
        let mut call_node = vec![NIL; ops.len()];
        for (node, e) in events.iter().enumerate() {
            if e.is_call {
                call_node[e.op] = node;
            }
        }
        for node in 0..events.len() {
            if !events[node].is_call {
                let call = call_node[events[node].op];
                events[call].ret = node;
            }
        }

        let n = events.len();
        let head = n;
        let next = (0..=n).map(|i| if i == n { 0 } else { i + 1 }).collect();
        let prev = (0..=n).map(|i| if i == 0 { n } else { i - 1 }).collect();
        let words = ops.len().div_ceil(64);
        Search {
            history,
            budget,
            candidates,
            events,
            next,
            prev,
            head,
            memo: Memo { seen: HashSet::new(), words, bytes: 0 },
            steps: 0,
            started: Instant::now(),
            best: Best::default(),
        }
    }

    fn run(mut self) -> CheckResult {
        let mut must_place = self.candidates.ops.iter().filter(|c| c.ret.is_some()).count();
        let acknowledged = must_place;
        let mut state = State::default();
        let mut linearized = vec![0u64; self.memo.words];
        let mut key = vec![0u64; self.memo.words + STATE_WORDS];
        let mut stack: Vec<Placed> = Vec::new();
        let mut cur = self.next[self.head];

        loop {
            if must_place == 0 {
                return CheckResult::Linearizable;
            }
            if let Some(limit) = self.over_budget() {
                return CheckResult::Unknown(Exhausted {
                    limit,
                    steps: self.steps,
                    memo_entries: self.memo.seen.len(),
                    memo_bytes: self.memo.bytes,
                    longest_prefix: self.best.depth,
                });
            }

            // With an acknowledged operation left, its return lies ahead, so `cur` never runs
            // off the end; treat the sentinel like a return all the same.
            if cur != self.head && self.events[cur].is_call {
                let id = self.events[cur].op;
                let c = &self.candidates.ops[id];
                let (op, ret) = (c.op, c.ret);
                let in_turn = c.after.is_none_or(|first| get(&linearized, first));
                let Some(after) = register::step(&state, &op, ret.as_ref()).filter(|_| in_turn) else {
                    cur = self.next[cur];
                    continue;
                };
                // An answer that leaves the state as it is can be placed now: everything that
                // must precede it is placed already, and in this register an operation that
                // changes nothing in one state changes nothing in any later state either. So
                // if placing it now fails, this configuration fails.
                let forced = ret.is_some() && after == state;
                set(&mut linearized, id, true);
                let (bits, encoded) = key.split_at_mut(self.memo.words);
                bits.copy_from_slice(&linearized);
                self.candidates.mask_dead(&after, bits);
                encoded.copy_from_slice(&encode(&after));
                let stranded = if forced { None } else { self.candidates.stranded(&state, &after, &linearized) };
                if let Some(left) = stranded {
                    let seen = self.best.strandings.contains(&(id, left));
                    if stack.len() == self.best.depth && self.best.strandings.len() < 4 && !seen {
                        self.best.strandings.push((id, left));
                    }
                }
                if stranded.is_none() && self.memo.insert(&key) {
                    stack.push(Placed { node: cur, before: state, forced });
                    state = after;
                    self.lift(cur);
                    if ret.is_some() {
                        must_place -= 1;
                    }
                    if stack.len() > self.best.depth {
                        self.best = Best { depth: stack.len(), state, ..Best::default() };
                    }
                    cur = self.next[self.head];
                    continue;
                }
                set(&mut linearized, id, false);
                if !forced {
                    cur = self.next[cur];
                    continue;
                }
            }

            if stack.len() == self.best.depth && self.best.stuck.is_none() {
                self.best.prefix = stack.iter().map(|p| self.events[p.node].op).collect();
                self.best.stuck = self.first_return().map(|r| (self.events[r].op, self.calls_before(r, &state)));
            }

            // Backtrack to the latest placement that had alternatives, and try the next one.
            loop {
                let Some(p) = stack.pop() else {
                    return CheckResult::NotLinearizable(Box::new(self.violation(acknowledged)));
                };
                let id = self.events[p.node].op;
                state = p.before;
                set(&mut linearized, id, false);
                self.unlift(p.node);
                if self.candidates.ops[id].ret.is_some() {
                    must_place += 1;
                }
                if !p.forced {
                    cur = self.next[p.node];
                    break;
                }
            }
        }
    }

    fn over_budget(&mut self) -> Option<&'static str> {
        self.steps += 1;
        if self.steps > self.budget.max_steps {
            return Some("steps");
        }
        if self.memo.bytes > self.budget.max_memo_bytes {
            return Some("memo bytes");
        }
        if let Some(limit) = self.budget.timeout {
            if self.steps.is_multiple_of(4096) && self.started.elapsed() > limit {
                return Some("timeout");
            }
        }
        None
    }

    /// Takes a call and its return out of the list.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        let ret = self.events[call].ret;
        if ret != NIL {
            self.unlink(ret);
        }
    }

    /// Undoes the latest `lift`, which must have been of `call`.
    fn unlift(&mut self, call: usize) {
        let ret = self.events[call].ret;
        if ret != NIL {
            self.relink(ret);
        }
        self.relink(call);
    }

    fn unlink(&mut self, n: usize) {
        let (p, q) = (self.prev[n], self.next[n]);
        self.next[p] = q;
        self.prev[q] = p;
    }

    fn relink(&mut self, n: usize) {
        let (p, q) = (self.prev[n], self.next[n]);
        self.next[p] = n;
        self.prev[q] = n;
    }

    /// The first pending return: the operation that must be placed before anything after it.
    fn first_return(&self) -> Option<usize> {
        let mut n = self.next[self.head];
        while n != self.head {
            if !self.events[n].is_call {
                return Some(n);
            }
            n = self.next[n];
        }
        None
    }

    /// The operations whose calls precede node `until`, those that could go next: at most
    /// eight, acknowledged ones first. Unknown ones that could not take effect in `state` are
    /// left out: they linger here long after their invoke.
    fn calls_before(&self, until: usize, state: &State) -> Vec<usize> {
        let mut out = Vec::new();
        let mut n = self.next[self.head];
        while n != until && n != self.head {
            let c = &self.candidates.ops[self.events[n].op];
            if self.events[n].is_call && (c.ret.is_some() || register::step(state, &c.op, None).is_some()) {
                out.push(self.events[n].op);
            }
            n = self.next[n];
        }
        out.sort_by_key(|&id| self.candidates.ops[id].ret.is_none());
        out.truncate(8);
        out
    }

    fn violation(&self, acknowledged: usize) -> Violation {
        let named = |id: usize| {
            let index = self.candidates.ops[id].index;
            (index, self.history[index])
        };
        // A history that cannot be linearized has an acknowledged operation, so a return was
        // pending at the deepest point.
        let (stuck, candidates) = self.best.stuck.clone().unwrap_or_default();
        let prefix = &self.best.prefix;
        Violation {
            longest_prefix: prefix.iter().map(|&id| self.candidates.ops[id].index).collect(),
            state: self.best.state,
            stuck: named(stuck),
            candidates: candidates.into_iter().map(named).collect(),
            recent: prefix[prefix.len().saturating_sub(4)..].iter().map(|&id| named(id)).collect(),
            strandings: self
                .best
                .strandings
                .iter()
                .map(|&(op, left)| Stranding { placing: named(op), strands: named(left) })
                .collect(),
            acknowledged,
        }
    }
}

fn get(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

fn set(bits: &mut [u64], i: usize, on: bool) {
    let mask = 1u64 << (i % 64);
    if on {
        bits[i / 64] |= mask;
    } else {
        bits[i / 64] &= !mask;
    }
}

/// The configurations already explored, each one allocation: the linearized set with dead
/// unknown updates masked (see `Candidates::mask_dead`), then the encoded state.
struct Memo {
    seen: HashSet<Box<[u64]>>,
    /// Words in the linearized set.
    words: usize,
    /// An estimate of the memory held, for the budget.
    bytes: usize,
}

/// A memo entry's cost beyond its words: the table slot, its spare capacity, allocator overhead.
const ENTRY_OVERHEAD: usize = 48;

const STATE_WORDS: usize = 4;

fn encode(s: &State) -> [u64; STATE_WORDS] {
    match s.object {
        None => [0, 0, 0, s.floor],
        Some(Object { rv: None, value }) => [1, 0, value, s.floor],
        Some(Object { rv: Some(rv), value }) => [2, rv, value, s.floor],
    }
}

impl Memo {
    /// Remembers a configuration; false if it was already known.
    fn insert(&mut self, key: &[u64]) -> bool {
        // One hash per attempt; a repeat costs an allocation instead of a second hash.
        let new = self.seen.insert(key.into());
        if new {
            self.bytes += ENTRY_OVERHEAD + 8 * key.len();
        }
        new
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Linearizable => write!(f, "linearizable"),
            CheckResult::NotLinearizable(v) => write!(f, "{v}"),
            CheckResult::Unknown(e) => write!(
                f,
                "undecided: the {} budget ran out after {} steps and {} remembered configurations \
                 ({} MiB; longest linearization found: {} operations); raise the Budget or check a \
                 shorter history",
                e.limit,
                e.steps,
                e.memo_entries,
                e.memo_bytes >> 20,
                e.longest_prefix
            ),
            CheckResult::Malformed { op, reason } => write!(f, "malformed history: operation #{op} {reason}"),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (i, op) = &self.stuck;
        writeln!(
            f,
            "not linearizable: the longest linearization places {} operations ({} acknowledged in the history), \
             leaving the key at {}; then #{i} ({op}) cannot be placed",
            self.longest_prefix.len(),
            self.acknowledged,
            self.state
        )?;
        for (i, op) in &self.recent {
            writeln!(f, "  placed last: #{i} {op}")?;
        }
        for (i, op) in &self.candidates {
            writeln!(f, "  could go next, none fits: #{i} {op}")?;
        }
        for Stranding { placing: (i, op), strands: (j, left) } in &self.strandings {
            writeln!(f, "  placing #{i} ({op}) would leave #{j} ({left}) behind the key's rv")?;
        }
        Ok(())
    }
}
