//! The work queue of a controller, with client-go's workqueue semantics:
//!
//! - a key is queued once however often it is added (deduplicated);
//! - a key being worked on is never handed out again until its worker calls `done`; an add
//!   meanwhile queues it again after `done`, so the latest state is always reconciled;
//! - failures come back after a per-key exponential back-off, and every retry also waits
//!   for a token of an overall rate limit, so that many failing keys cannot spin;
//! - delayed adds (`add_after`) wait on tokio's clock, so paused-time tests drive them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Retry pacing. Kubernetes' defaults: 5 ms doubling to 1000 s per key, and 10 retries a
/// second with bursts of 100 overall.
#[derive(Clone, Debug)]
pub struct RateLimits {
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Retries per second over all keys.
    pub qps: f64,
    pub burst: f64,
}

impl Default for RateLimits {
    fn default() -> RateLimits {
        RateLimits {
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_secs(1000),
            qps: 10.0,
            burst: 100.0,
        }
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<String>,
    /// Keys queued or waiting to be queued again after their worker is done.
    dirty: HashSet<String>,
    processing: HashSet<String>,
    failures: HashMap<String, u32>,
    shutting_down: bool,
    tokens: f64,
    refilled: Option<Instant>,
}

struct Inner {
    name: String,
    limits: RateLimits,
    state: Mutex<State>,
    ready: Notify,
}

/// A deduplicating, rate-limited queue of object keys. Clones share the queue.
#[derive(Clone)]
pub struct WorkQueue {
    inner: Arc<Inner>,
}

impl WorkQueue {
    pub fn new(name: &str, limits: RateLimits) -> WorkQueue {
        let state = State { tokens: limits.burst, ..Default::default() };
        WorkQueue {
            inner: Arc::new(Inner { name: name.to_string(), limits, state: Mutex::new(state), ready: Notify::new() }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Queues `key` unless it is queued already.
    pub fn add(&self, key: &str) {
        {
            let mut s = self.state();
            if s.shutting_down || !s.dirty.insert(key.to_string()) {
                return;
            }
            metrics::counter!("workqueue_adds_total", "name" => self.inner.name.clone()).increment(1);
            if s.processing.contains(key) {
                return;
            }
            s.queue.push_back(key.to_string());
            metrics::gauge!("workqueue_depth", "name" => self.inner.name.clone()).set(s.queue.len() as f64);
        }
        self.inner.ready.notify_one();
    }

    /// Queues `key` after `delay`.
    pub fn add_after(&self, key: &str, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        let q = self.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.add(&key);
        });
    }

    /// Queues `key` again after its back-off: the per-key delay, doubled by each failure
    /// since the last `forget`, or the wait for an overall token, whichever is longer.
    pub fn add_rate_limited(&self, key: &str) {
        let delay = {
            let mut s = self.state();
            let n = s.failures.entry(key.to_string()).or_insert(0);
            let exp = self.inner.limits.base_delay.saturating_mul(1u32 << (*n).min(31));
            *n += 1;
            exp.min(self.inner.limits.max_delay).max(self.reserve(&mut s))
        };
        metrics::counter!("workqueue_retries_total", "name" => self.inner.name.clone()).increment(1);
        self.add_after(key, delay);
    }

    /// Takes a token of the overall bucket; returns how long until it is really there.
    fn reserve(&self, s: &mut State) -> Duration {
        let l = &self.inner.limits;
        let now = Instant::now();
        if let Some(last) = s.refilled {
            s.tokens = (s.tokens + now.duration_since(last).as_secs_f64() * l.qps).min(l.burst);
        }
        s.refilled = Some(now);
        s.tokens -= 1.0;
        if s.tokens >= 0.0 || l.qps <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / l.qps)
        }
    }

    /// Clears `key`'s failure count (after it reconciled).
    pub fn forget(&self, key: &str) {
        self.state().failures.remove(key);
    }

    /// Failures of `key` since the last `forget`.
    pub fn requeues(&self, key: &str) -> u32 {
        self.state().failures.get(key).copied().unwrap_or(0)
    }

    /// The next key to work on, once there is one; None after `shutdown`.
    pub async fn get(&self) -> Option<String> {
        loop {
            let ready = self.inner.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            {
                let mut s = self.state();
                if let Some(k) = s.queue.pop_front() {
                    s.dirty.remove(&k);
                    s.processing.insert(k.clone());
                    metrics::gauge!("workqueue_depth", "name" => self.inner.name.clone()).set(s.queue.len() as f64);
                    // Another worker may be waiting for the next key.
                    if !s.queue.is_empty() {
                        self.inner.ready.notify_one();
                    }
                    return Some(k);
                }
                if s.shutting_down {
                    return None;
                }
            }
            ready.await;
        }
    }

    /// Marks `key` finished; if it was added meanwhile, it is queued again now.
    pub fn done(&self, key: &str) {
        let requeued = {
            let mut s = self.state();
            s.processing.remove(key);
            let again = s.dirty.contains(key) && !s.shutting_down;
            if again {
                s.queue.push_back(key.to_string());
            }
            again
        };
        if requeued {
            self.inner.ready.notify_one();
        }
    }

    /// Keys queued now (not those being worked on).
    pub fn len(&self) -> usize {
        self.state().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops handing out keys: waiting `get`s return None.
    pub fn shutdown(&self) {
        self.state().shutting_down = true;
        self.inner.ready.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> RateLimits {
        RateLimits {
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(1),
            qps: 1000.0,
            burst: 1000.0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_added_many_times_is_queued_once() {
        let q = WorkQueue::new("t", fast());
        for _ in 0..5 {
            q.add("a");
        }
        q.add("b");
        assert_eq!(q.len(), 2);
        assert_eq!(q.get().await.as_deref(), Some("a"));
        assert_eq!(q.get().await.as_deref(), Some("b"));
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_in_progress_is_not_handed_out_again_until_done_and_then_it_is() {
        let q = WorkQueue::new("t", fast());
        q.add("a");
        let k = q.get().await.unwrap();
        q.add("a");
        q.add("a");
        assert!(q.is_empty(), "a key being worked on is held back");
        let second = tokio::time::timeout(Duration::from_millis(100), q.get()).await;
        assert!(second.is_err(), "no second worker gets it");
        q.done(&k);
        assert_eq!(q.len(), 1, "the adds during the work queue it once more");
        assert_eq!(q.get().await.as_deref(), Some("a"));
        q.done("a");
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_per_key_and_forget_resets() {
        let q = WorkQueue::new("t", fast());
        let start = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..4 {
            q.add_rate_limited("a");
            let k = q.get().await.unwrap();
            waits.push(start.elapsed());
            q.done(&k);
        }
        // 10, 20, 40, 80 ms after one another.
        let gaps: Vec<u128> =
            waits.iter().scan(Duration::ZERO, |prev, w| Some((*w - std::mem::replace(prev, *w)).as_millis())).collect();
        assert_eq!(gaps, [10, 20, 40, 80]);
        assert_eq!(q.requeues("a"), 4);
        q.forget("a");
        assert_eq!(q.requeues("a"), 0);
        let t = Instant::now();
        q.add_rate_limited("a");
        q.get().await.unwrap();
        assert_eq!(t.elapsed().as_millis(), 10, "back to the base delay");
    }

    #[tokio::test(start_paused = true)]
    async fn the_overall_rate_limit_spaces_retries_of_many_keys() {
        let limits = RateLimits {
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_secs(1),
            qps: 10.0,
            burst: 2.0,
        };
        let q = WorkQueue::new("t", limits);
        let start = Instant::now();
        for k in ["a", "b", "c", "d"] {
            q.add_rate_limited(k);
        }
        let mut at = Vec::new();
        for _ in 0..4 {
            q.get().await.unwrap();
            at.push(start.elapsed().as_millis());
        }
        // Two from the burst, then one every 100 ms.
        assert_eq!(at, [1, 1, 100, 200]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_wakes_waiting_workers() {
        let q = WorkQueue::new("t", fast());
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.get().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        q.shutdown();
        assert_eq!(waiter.await.unwrap(), None);
        q.add("late");
        assert!(q.is_empty(), "nothing is queued after shutdown");
    }
}
