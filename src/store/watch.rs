//! The watch hub: applied changes fan out to watchers, and a bounded history lets a watcher
//! resume from any revision still inside the window.
//!
//! The hub never blocks the state machine: each watcher has a bounded queue, and a watcher
//! that falls behind is cut off with a resumable error instead of stalling apply or its peers.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokio::sync::mpsc;

use super::txn::KeyRange;
use crate::proto::v1::Event;

/// The changes of one revision that match a watcher's range.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchBatch {
    pub revision: i64,
    /// Shared by every watcher that matches all of the revision's changes (the common case),
    /// so a thousand watchers cost one copy of the events, not a thousand.
    pub events: Arc<Events>,
}

/// Some changes of one revision, and a slot where the layer above keeps what it derives
/// from them (e.g. the decoded and re-encoded objects), computed once for all the watchers
/// that share these events.
#[derive(Default)]
pub struct Events {
    events: Vec<Event>,
    memo: OnceLock<Arc<dyn Any + Send + Sync>>,
}

impl Events {
    pub fn new(events: Vec<Event>) -> Events {
        Events { events, memo: OnceLock::new() }
    }

    /// What `derive` makes of these events, computed by the first caller and shared with the
    /// rest. A caller asking for another type than the first one stored gets `None`.
    pub fn memo<T: Any + Send + Sync>(&self, derive: impl FnOnce(&[Event]) -> T) -> Option<Arc<T>> {
        let any = self.memo.get_or_init(|| Arc::new(derive(&self.events)) as Arc<dyn Any + Send + Sync>);
        any.clone().downcast::<T>().ok()
    }
}

impl std::ops::Deref for Events {
    type Target = [Event];
    fn deref(&self) -> &[Event] {
        &self.events
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.events.fmt(f)
    }
}

impl PartialEq for Events {
    fn eq(&self, other: &Events) -> bool {
        self.events == other.events
    }
}

/// Why a watch ended. Every variant tells the client how to go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WatchError {
    /// The start revision is older than the history window: re-list, then watch from the
    /// revision of the list.
    #[error("revision {requested} is compacted: the history window starts at {oldest}, the current revision is {current}; re-list and watch from the list's revision")]
    Compacted { requested: i64, oldest: i64, current: i64 },
    /// The watcher did not keep up. Every event before `resume` was delivered.
    #[error("watcher fell behind and was cut off; resume from revision {resume}")]
    Slow { resume: i64 },
    /// The replica installed a snapshot or shut down; its history no longer covers the watch.
    #[error("watch reset by the replica ({reason}); re-list and watch again")]
    Reset { reason: &'static str, current: i64 },
}

#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// How many events the history keeps (whole revisions are dropped from the front).
    pub history_events: usize,
    /// How many revisions may queue for one watcher before it is cut off.
    pub queue_len: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig { history_events: 100_000, queue_len: 4096 }
    }
}

struct Watcher {
    range: KeyRange,
    /// Revisions before this were not asked for (a replica can be behind the revision a
    /// client resumes from).
    start: i64,
    tx: mpsc::Sender<WatchBatch>,
    end: Arc<Mutex<Option<WatchError>>>,
}

struct HubState {
    history: VecDeque<(i64, Arc<Events>)>,
    history_len: usize,
    /// The smallest revision R such that every event at R or later is in `history`.
    window_start: i64,
    current: i64,
    watchers: HashMap<u64, Watcher>,
    next_id: u64,
}

pub struct WatchHub {
    state: Mutex<HubState>,
    config: WatchConfig,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent (each critical section
    // is a few assignments), so recover instead of poisoning the replica.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The events of `all` in `range`: `all` itself when every one matches, a new set when some
/// do, None when none do.
fn matching(range: &KeyRange, all: &Arc<Events>) -> Option<Arc<Events>> {
    let hit = |e: &Event| e.kv.as_ref().is_some_and(|kv| range.contains(&kv.key));
    let n = all.iter().filter(|e| hit(e)).count();
    if n == all.len() {
        Some(all.clone())
    } else if n == 0 {
        None
    } else {
        Some(Arc::new(Events::new(all.iter().filter(|e| hit(e)).cloned().collect())))
    }
}

impl WatchHub {
    /// A hub whose history starts after `current`.
    pub fn new(current: i64, config: WatchConfig) -> Arc<WatchHub> {
        Arc::new(WatchHub {
            state: Mutex::new(HubState {
                history: VecDeque::new(),
                history_len: 0,
                window_start: current + 1,
                current,
                watchers: HashMap::new(),
                next_id: 0,
            }),
            config,
        })
    }

    pub fn current_revision(&self) -> i64 {
        lock(&self.state).current
    }

    /// The oldest revision a new watch can start from.
    pub fn window_start(&self) -> i64 {
        lock(&self.state).window_start
    }

    pub fn watcher_count(&self) -> usize {
        lock(&self.state).watchers.len()
    }

    /// Records the changes of `revision` and hands them to every matching watcher.
    pub fn publish(&self, revision: i64, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let events = Arc::new(Events::new(events));
        let mut s = lock(&self.state);
        s.current = revision;
        s.history_len += events.len();
        s.history.push_back((revision, events.clone()));
        while s.history_len > self.config.history_events && s.history.len() > 1 {
            if let Some((_, old)) = s.history.pop_front() {
                s.history_len -= old.len();
            }
            s.window_start = s.history.front().map_or(revision + 1, |(r, _)| *r);
        }
        s.watchers.retain(|_, w| {
            if revision < w.start {
                return !w.tx.is_closed();
            }
            let Some(mine) = matching(&w.range, &events) else {
                return !w.tx.is_closed();
            };
            match w.tx.try_send(WatchBatch { revision, events: mine }) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    *lock(&w.end) = Some(WatchError::Slow { resume: revision });
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Ends every watch and forgets the history, e.g. after a snapshot replaced the state.
    pub fn reset(&self, current: i64, reason: &'static str) {
        let mut s = lock(&self.state);
        for (_, w) in s.watchers.drain() {
            *lock(&w.end) = Some(WatchError::Reset { reason, current });
        }
        s.history.clear();
        s.history_len = 0;
        s.current = current;
        s.window_start = current + 1;
    }

    /// Starts a watch of `range` from `start` (inclusive; 0 means after the current revision).
    pub fn watch(self: &Arc<Self>, range: KeyRange, start: i64) -> Result<Watch, WatchError> {
        let mut s = lock(&self.state);
        let start = if start <= 0 { s.current + 1 } else { start };
        if start <= s.current && start < s.window_start {
            return Err(WatchError::Compacted { requested: start, oldest: s.window_start, current: s.current });
        }
        let backlog = s
            .history
            .iter()
            .filter(|(rev, _)| *rev >= start)
            .filter_map(|(rev, events)| {
                matching(&range, events).map(|mine| WatchBatch { revision: *rev, events: mine })
            })
            .collect();
        let (tx, rx) = mpsc::channel(self.config.queue_len.max(1));
        let end = Arc::new(Mutex::new(None));
        let id = s.next_id;
        s.next_id += 1;
        s.watchers.insert(id, Watcher { range, start, tx, end: end.clone() });
        Ok(Watch { backlog, rx, end, hub: Arc::downgrade(self), id, start_current: s.current })
    }
}

/// One watcher's stream of batches.
pub struct Watch {
    backlog: VecDeque<WatchBatch>,
    rx: mpsc::Receiver<WatchBatch>,
    end: Arc<Mutex<Option<WatchError>>>,
    hub: Weak<WatchHub>,
    id: u64,
    start_current: i64,
}

impl Watch {
    /// The next batch, in revision order. An error ends the watch.
    pub async fn next(&mut self) -> Result<WatchBatch, WatchError> {
        std::future::poll_fn(|cx| self.poll_batch(cx)).await
    }

    /// The next batch, for a hand-written `Stream`: as `next`, without an async fn.
    pub fn poll_batch(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<WatchBatch, WatchError>> {
        if let Some(b) = self.backlog.pop_front() {
            return std::task::Poll::Ready(Ok(b));
        }
        self.rx.poll_recv(cx).map(|b| b.ok_or_else(|| self.ended()))
    }

    /// The next batch if one is already queued, without waiting.
    pub fn try_next(&mut self) -> Option<Result<WatchBatch, WatchError>> {
        if let Some(b) = self.backlog.pop_front() {
            return Some(Ok(b));
        }
        match self.rx.try_recv() {
            Ok(b) => Some(Ok(b)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(Err(self.ended())),
        }
    }

    /// Why the hub closed this watch's queue.
    fn ended(&self) -> WatchError {
        lock(&self.end)
            .clone()
            .unwrap_or(WatchError::Reset { reason: "replica shutting down", current: self.start_current })
    }

    /// The revision the hub was at when this watch started.
    pub fn started_at(&self) -> i64 {
        self.start_current
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            lock(&hub.state).watchers.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::{event, KeyValue};

    fn ev(key: &str, rev: i64) -> Event {
        Event {
            r#type: event::EventType::Put as i32,
            kv: Some(KeyValue { key: key.into(), mod_revision: rev, ..Default::default() }),
            prev_kv: None,
        }
    }

    fn all() -> KeyRange {
        KeyRange::new(b"", &[0])
    }

    #[tokio::test]
    async fn watch_from_a_revision_in_the_window_replays_then_follows() {
        let hub = WatchHub::new(0, WatchConfig { history_events: 100, queue_len: 16 });
        for rev in 1..=5 {
            hub.publish(rev, vec![ev(&format!("k{rev}"), rev)]);
        }
        let mut w = hub.watch(all(), 3).unwrap();
        hub.publish(6, vec![ev("k6", 6)]);
        let revs: Vec<i64> = [w.next().await, w.next().await, w.next().await, w.next().await]
            .into_iter()
            .map(|b| b.unwrap().revision)
            .collect();
        assert_eq!(revs, vec![3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn revision_older_than_the_window_is_compacted_with_the_current_revision() {
        let hub = WatchHub::new(0, WatchConfig { history_events: 3, queue_len: 16 });
        for rev in 1..=10 {
            hub.publish(rev, vec![ev("k", rev)]);
        }
        assert_eq!(hub.window_start(), 8);
        match hub.watch(all(), 2) {
            Err(WatchError::Compacted { requested: 2, oldest: 8, current: 10 }) => {}
            Err(other) => panic!("expected Compacted, got {other:?}"),
            Ok(_) => panic!("expected Compacted, got a watch"),
        }
        assert!(hub.watch(all(), 8).is_ok());
        // The future is always watchable.
        assert!(hub.watch(all(), 11).is_ok());
        assert!(hub.watch(all(), 0).is_ok());
    }

    #[tokio::test]
    async fn a_watch_from_ahead_of_the_replica_skips_revisions_before_its_start() {
        let hub = WatchHub::new(0, WatchConfig::default());
        hub.publish(1, vec![ev("k", 1)]);
        // The client saw revision 3 elsewhere; this replica is still at 1.
        let mut w = hub.watch(all(), 4).unwrap();
        hub.publish(2, vec![ev("k", 2)]);
        hub.publish(3, vec![ev("k", 3)]);
        hub.publish(4, vec![ev("k", 4)]);
        assert_eq!(w.next().await.unwrap().revision, 4);
    }

    #[tokio::test]
    async fn prefix_filter_delivers_only_matching_keys() {
        let hub = WatchHub::new(0, WatchConfig::default());
        let mut w = hub.watch(KeyRange::prefix(b"a/"), 0).unwrap();
        hub.publish(1, vec![ev("b/1", 1)]);
        hub.publish(2, vec![ev("a/1", 2), ev("b/2", 2)]);
        let b = w.next().await.unwrap();
        assert_eq!(b.revision, 2);
        assert_eq!(b.events.len(), 1);
        assert_eq!(b.events[0].kv.as_ref().unwrap().key, b"a/1");
    }

    #[tokio::test]
    async fn slow_watcher_is_cut_off_resumably_without_stalling_others() {
        let hub = WatchHub::new(0, WatchConfig { history_events: 1000, queue_len: 2 });
        let mut slow = hub.watch(all(), 0).unwrap();
        let mut fast = hub.watch(all(), 0).unwrap();
        for rev in 1..=5 {
            hub.publish(rev, vec![ev("k", rev)]);
            assert_eq!(fast.next().await.unwrap().revision, rev);
        }
        assert_eq!(hub.watcher_count(), 1, "the slow watcher was removed");
        assert_eq!(slow.next().await.unwrap().revision, 1);
        assert_eq!(slow.next().await.unwrap().revision, 2);
        let err = slow.next().await.unwrap_err();
        assert_eq!(err, WatchError::Slow { resume: 3 });
        // Resuming from there sees the rest exactly once.
        let mut resumed = hub.watch(all(), 3).unwrap();
        for rev in 3..=5 {
            assert_eq!(resumed.next().await.unwrap().revision, rev);
        }
    }

    #[tokio::test]
    async fn reset_ends_watches_and_dropping_a_watch_unregisters_it() {
        let hub = WatchHub::new(0, WatchConfig::default());
        let w1 = hub.watch(all(), 0).unwrap();
        drop(w1);
        assert_eq!(hub.watcher_count(), 0);
        let mut w2 = hub.watch(all(), 0).unwrap();
        hub.reset(50, "snapshot installed");
        assert!(matches!(w2.next().await, Err(WatchError::Reset { current: 50, .. })));
        assert!(matches!(hub.watch(all(), 10), Err(WatchError::Compacted { .. })));
    }

    #[tokio::test]
    async fn watchers_of_a_whole_revision_share_its_events_and_their_memo() {
        let hub = WatchHub::new(0, WatchConfig::default());
        let mut a = hub.watch(all(), 0).unwrap();
        let mut b = hub.watch(KeyRange::prefix(b"a/"), 0).unwrap();
        let mut c = hub.watch(KeyRange::prefix(b"a/1"), 0).unwrap();
        hub.publish(1, vec![ev("a/1", 1), ev("a/2", 1)]);
        let (ba, bb, bc) = (a.next().await.unwrap(), b.next().await.unwrap(), c.next().await.unwrap());
        assert!(Arc::ptr_eq(&ba.events, &bb.events), "both take every event: one copy");
        assert!(!Arc::ptr_eq(&ba.events, &bc.events), "a subset is its own set");
        assert_eq!(bc.events.len(), 1);
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let derive = |e: &[Event]| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            e.len()
        };
        assert_eq!(ba.events.memo(derive).as_deref(), Some(&2));
        assert_eq!(bb.events.memo(derive).as_deref(), Some(&2));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "derived once for both");
        assert_eq!(ba.events.memo(|_| "another type"), None, "a second type gets nothing");
    }
}
