//! A controller on the runtime against a real replica: every change queues its key, a
//! failure comes back after its back-off, RequeueAfter looks again, a resync queues every
//! key, and one key is never reconciled twice at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::api::kinds::Kind;
use keel::client::informer::{InformerFactory, InformerOptions};
use keel::client::Client;
use keel::controllers::runtime::{
    controller, Action, Context, Controller, EventLimits, EventRecorder, RateLimits, ReconcileError, RunConfig,
};

use super::{config_map, eventually};

#[derive(Default)]
struct Seen {
    calls: HashMap<String, usize>,
    running: HashSet<String>,
    overlaps: usize,
}

struct Counter(Arc<Mutex<Seen>>);

impl Controller for Counter {
    fn name(&self) -> &'static str {
        "counter"
    }

    fn primary(&self) -> Kind {
        Kind::ConfigMap
    }

    async fn reconcile(&self, key: &str, ctx: &Context) -> Result<Action, ReconcileError> {
        let n = {
            let mut s = self.0.lock().unwrap();
            if !s.running.insert(key.to_string()) {
                s.overlaps += 1;
            }
            let n = s.calls.entry(key.to_string()).or_default();
            *n += 1;
            *n
        };
        // Long enough that a second worker would overlap if it got the same key.
        tokio::time::sleep(Duration::from_millis(30)).await;
        // Reads come from the shared cache, as a real controller's do.
        let _cached = ctx.informers.informer(Kind::ConfigMap).get(key);
        self.0.lock().unwrap().running.remove(key);
        match key {
            "default/flaky" if n <= 2 => Err(ReconcileError::Failed(format!("attempt {n} fails"))),
            "default/later" if n == 1 => Ok(Action::RequeueAfter(Duration::from_millis(300))),
            _ => Ok(Action::Done),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_reconciles_changes_retries_failures_requeues_and_resyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (_replica, addr, pki) = keel::harness::single_replica(&dir.path().join("r")).await.unwrap();
    let client = Client::with_certificate(&[addr], Duration::from_secs(5), &pki.admin).unwrap();
    let ctx = Context {
        informers: InformerFactory::new(client.clone(), InformerOptions::default()),
        recorder: EventRecorder::new(client.clone(), "test", "host", EventLimits::default()),
        client: client.clone(),
    };
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let config = RunConfig {
        workers: 3,
        resync: Duration::from_millis(1500),
        limits: RateLimits { base_delay: Duration::from_millis(100), ..RateLimits::default() },
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(controller::run(Arc::new(Counter(seen.clone())), ctx, config, stop));
    let calls = |k: &str| seen.lock().unwrap().calls.get(k).copied().unwrap_or(0);

    client.create(config_map("default", "a", "1")).await.unwrap();
    eventually("a new object is reconciled", Duration::from_secs(10), || async {
        (calls("default/a") >= 1).then_some(())
    })
    .await;
    // A burst of changes while it works: reconciled again, never twice at once.
    for v in 2..8 {
        let mut o = client.get(Kind::ConfigMap, "default", "a").await.unwrap();
        if let Some(keel::proto::v1::object::Kind::ConfigMap(cm)) = o.kind.as_mut() {
            cm.data.insert("v".into(), v.to_string());
        }
        client.update(o).await.unwrap();
    }
    let t = tokio::time::Instant::now();
    client.create(config_map("default", "flaky", "1")).await.unwrap();
    client.create(config_map("default", "later", "1")).await.unwrap();
    eventually("a failing key comes back until it succeeds", Duration::from_secs(10), || async {
        (calls("default/flaky") >= 3).then_some(())
    })
    .await;
    assert!(t.elapsed() >= Duration::from_millis(300), "100 then 200 ms of back-off: {:?}", t.elapsed());
    eventually("RequeueAfter looks again", Duration::from_secs(10), || async {
        (calls("default/later") >= 2).then_some(())
    })
    .await;
    // Nothing changes now; the resync still brings every key back.
    let before = calls("default/a");
    eventually("a resync queues every key", Duration::from_secs(10), || async {
        (calls("default/a") > before).then_some(())
    })
    .await;
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), run).await.expect("the controller stops").unwrap();
    let s = seen.lock().unwrap();
    assert_eq!(s.overlaps, 0, "a key was reconciled twice at once");
    assert!(s.calls["default/a"] < 12, "changes were coalesced: {}", s.calls["default/a"]);
}
