//! A controller: `reconcile(key, ctx) -> Result<Action>`, level-triggered and idempotent,
//! fed by informer events through a work queue, with a periodic resync of every key.
//!
//! The runner owns the loop: N workers take keys from the queue (one key is never worked on
//! twice at once), call `reconcile`, and requeue as its answer says: `Done` forgets the
//! key's failures, `RequeueAfter` looks again later, an error comes back after the key's
//! back-off. Metrics per controller: queue depth, adds and retries (from the queue),
//! reconcile latency and errors.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::events::EventRecorder;
use super::queue::{RateLimits, WorkQueue};
use crate::api::kinds::Kind;
use crate::client::informer::{key_of, Event, InformerFactory};
use crate::client::{Client, ClientError};

/// What a reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The key is where it should be; the next change (or resync) brings it back.
    Done,
    /// Look again after this long (waiting for something that sends no event).
    RequeueAfter(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Failed(String),
}

/// What every reconcile may use: the client, the process's shared informers, and an event
/// recorder.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub informers: InformerFactory,
    pub recorder: EventRecorder,
}

/// One control loop.
pub trait Controller: Send + Sync + 'static {
    /// Its name, in logs, metrics and its queue's name.
    fn name(&self) -> &'static str;

    /// The kind whose keys it reconciles: every change of it queues its key, and every
    /// cached key is queued again at each resync.
    fn primary(&self) -> Kind;

    /// Registers further event sources (objects owned by a primary, say) that queue keys.
    fn watch(&self, _ctx: &Context, _queue: &WorkQueue) {}

    /// Takes `key` (`namespace/name`, or `name`) one idempotent step toward its desired state.
    fn reconcile(&self, key: &str, ctx: &Context) -> impl Future<Output = Result<Action, ReconcileError>> + Send;
}

/// How a controller runs.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub workers: usize,
    /// Every cached key of the primary kind is queued again this often.
    pub resync: Duration,
    pub limits: RateLimits,
}

impl Default for RunConfig {
    fn default() -> RunConfig {
        RunConfig { workers: 2, resync: Duration::from_secs(300), limits: RateLimits::default() }
    }
}

/// Runs `controller` until `stop` turns true: feeds the queue from the informers, waits for
/// them to sync, then works the queue with `config.workers` workers.
pub async fn run<C: Controller>(controller: Arc<C>, ctx: Context, config: RunConfig, mut stop: watch::Receiver<bool>) {
    let name = controller.name();
    // Every series exists from the start, at zero, so that dashboards and alerts see it.
    metrics::gauge!("workqueue_depth", "name" => name).set(0.0);
    metrics::counter!("workqueue_adds_total", "name" => name).increment(0);
    metrics::counter!("workqueue_retries_total", "name" => name).increment(0);
    metrics::counter!("keel_controller_reconcile_errors_total", "controller" => name).increment(0);
    let queue = WorkQueue::new(name, config.limits.clone());
    let primary = ctx.informers.informer(controller.primary());
    {
        let q = queue.clone();
        primary.add_handler(Arc::new(move |e: &Event| q.add(&key_of(e.object()))));
    }
    controller.watch(&ctx, &queue);
    ctx.informers.start();
    tokio::select! {
        _ = ctx.informers.wait_synced() => {}
        _ = stop.wait_for(|s| *s) => return,
    }
    tracing::info!(controller = name, "controller started");
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.workers.max(1) {
        let (c, ctx, q) = (controller.clone(), ctx.clone(), queue.clone());
        workers.spawn(async move { work(c, ctx, q).await });
    }
    let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + config.resync, config.resync);
    loop {
        tokio::select! {
            _ = resync.tick() => {
                for k in primary.keys() {
                    queue.add(&k);
                }
            }
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    queue.shutdown();
    // A worker in the middle of a reconcile is stopped there: the loop's work is idempotent,
    // and whoever leads next takes it up again.
    workers.abort_all();
    while workers.join_next().await.is_some() {}
    tracing::info!(controller = name, "controller stopped");
}

async fn work<C: Controller>(controller: Arc<C>, ctx: Context, queue: WorkQueue) {
    let name = controller.name();
    while let Some(key) = queue.get().await {
        let start = tokio::time::Instant::now();
        let result = controller.reconcile(&key, &ctx).await;
        metrics::histogram!("keel_controller_reconcile_seconds", "controller" => name)
            .record(start.elapsed().as_secs_f64());
        match result {
            Ok(Action::Done) => queue.forget(&key),
            Ok(Action::RequeueAfter(d)) => {
                queue.forget(&key);
                queue.add_after(&key, d);
            }
            Err(e) => {
                metrics::counter!("keel_controller_reconcile_errors_total", "controller" => name).increment(1);
                tracing::debug!(controller = name, key, error = %e, retries = queue.requeues(&key), "reconcile failed; will retry");
                queue.add_rate_limited(&key);
            }
        }
        queue.done(&key);
    }
}
