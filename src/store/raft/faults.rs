//! Fault switches that tests throw inside a store: links between replicas that are cut, and
//! log flushes that are held as a stalled disk would hold them. Empty, and so inert, in
//! production.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

/// Directed links that are cut: `(from, to)` drops every message from `from` to `to`; and
/// replicas whose log flushes are held, as a stalled disk would hold them. Shared by every
/// replica of an in-process test cluster; empty in production.
#[derive(Default, Debug)]
pub struct Faults {
    cut: RwLock<HashSet<(u64, u64)>>,
    stalled: Mutex<HashSet<u64>>,
    unstalled: std::sync::Condvar,
}

impl Faults {
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults::default())
    }

    /// Drops messages from `from` to `to` (one direction).
    pub fn cut(&self, from: u64, to: u64) {
        self.cut.write().unwrap_or_else(|p| p.into_inner()).insert((from, to));
    }

    /// Cuts every link between `node` and `others`, both ways.
    pub fn isolate(&self, node: u64, others: &[u64]) {
        for o in others {
            self.cut(node, *o);
            self.cut(*o, node);
        }
    }

    pub fn heal(&self) {
        self.cut.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn is_cut(&self, from: u64, to: u64) -> bool {
        self.cut.read().unwrap_or_else(|p| p.into_inner()).contains(&(from, to))
    }

    /// Holds (or releases) the log flushes of replica `id`.
    pub fn stall_log_flushes(&self, id: u64, stalled: bool) {
        let mut s = self.stalled.lock().unwrap_or_else(|p| p.into_inner());
        if stalled {
            s.insert(id);
        } else {
            s.remove(&id);
        }
        self.unstalled.notify_all();
    }

    /// Blocks the calling (flusher) thread while replica `id`'s log flushes are held.
    pub(crate) fn wait_log_flush(&self, id: u64) {
        let s = self.stalled.lock().unwrap_or_else(|p| p.into_inner());
        let _released = self.unstalled.wait_while(s, |s| s.contains(&id)).unwrap_or_else(|p| p.into_inner());
    }
}
