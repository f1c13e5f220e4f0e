//! The chaos suite's load: clients that create, compare-and-set, delete and read a small,
//! rotating set of ConfigMaps through the public Objects API, and watchers that follow every
//! change. Every request becomes a history entry (invoke, then ok, fail or unknown); the
//! checks in `verify` judge those entries afterwards.
//!
//! A client sends each request to a random replica. When a request fails for a reason that
//! another replica may not have (unavailable, timed out, connection lost) the client's next
//! request goes to another replica, as keelctl fails over. Every attempt is its own history
//! entry with its own value: a request whose outcome is unknown is never resent, so one value
//! is never written twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tonic::Code;

use super::history::{Op, Operation, Outcome, Ret, Version};
use crate::api::kinds::Kind;
use crate::client::{Client, ClientAuth, ClientConfig, ClientError, DeleteOptions, ListOptions, WatchOptions};
use crate::proto::v1 as pb;

/// The namespace the suite works in.
pub const NAMESPACE: &str = "chaos";

/// Shape of the load.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub clients: usize,
    /// Extra clients with a short timeout that write only, so that the time writes resume
    /// after a fault is measured by the cluster, not by how long the ordinary clients wait
    /// for an answer that will not come.
    pub probes: usize,
    /// The probes' request timeout.
    pub probe_timeout: Duration,
    pub watchers: usize,
    /// Keys written at the same time; the set rotates every `key_lifetime` so that no key's
    /// history grows too long to check.
    pub keys: usize,
    pub key_lifetime: Duration,
    /// How long a client waits for an answer before it calls the outcome unknown.
    pub request_timeout: Duration,
    pub seed: u64,
}

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: String,
    pub op: Operation,
    /// The object's uid, when the answer carried one (created, read, updated or deleted).
    pub uid: Option<String>,
    pub replica: usize,
    /// The error, for requests that did not get an answer.
    pub error: Option<String>,
}

/// One change a watcher saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub rv: u64,
    pub key: String,
    /// ADDED, MODIFIED or DELETED.
    pub kind: String,
    pub value: u64,
    pub uid: String,
}

/// A stretch of one watch that had no gap: it starts after revision `from` (a List's, or the
/// first watch's) and holds every change after it up to `to`, across reconnects that resumed
/// from the last revision seen. A re-list starts a new segment.
#[derive(Debug, Clone, Default)]
pub struct Segment {
    pub from: u64,
    pub to: u64,
    pub events: Vec<Seen>,
    /// What the List that opened the segment returned (empty for the first segment).
    pub listed: Vec<Seen>,
    pub reconnects: usize,
    /// Why each stream of the segment ended.
    pub ends: Vec<String>,
}

/// Everything one watcher saw.
#[derive(Debug, Clone, Default)]
pub struct WatchLog {
    pub watcher: usize,
    pub segments: Vec<Segment>,
}

/// Shared state of the running workload.
pub struct Workload {
    config: WorkloadConfig,
    /// One attempt per request, each to the replica the driver picks.
    client: Client,
    /// The same, with the probes' shorter timeout.
    probe_client: Client,
    start: Instant,
    next_value: AtomicU64,
    keys_used: Mutex<Vec<String>>,
}

/// Nanoseconds since `start`: a history's clock.
pub fn since(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

impl Workload {
    pub fn new(
        addrs: &[String],
        auth: &ClientAuth,
        config: WorkloadConfig,
        start: Instant,
    ) -> anyhow::Result<Workload> {
        let make = |timeout| {
            let c = ClientConfig {
                request_timeout: timeout,
                connect_timeout: Duration::from_millis(500),
                retry_for: Duration::ZERO,
                local_address: None,
            };
            Client::new(addrs, auth.clone(), c)
        };
        let client = make(config.request_timeout)?;
        let probe_client = make(config.probe_timeout)?;
        Ok(Workload {
            config,
            client,
            probe_client,
            start,
            next_value: AtomicU64::new(1),
            keys_used: Mutex::new(Vec::new()),
        })
    }

    pub fn now(&self) -> u64 {
        since(self.start)
    }

    pub fn replicas(&self) -> usize {
        self.client.len()
    }

    /// The client pinned to `replica`: one attempt, no failover.
    pub fn client(&self, replica: usize) -> Client {
        self.client.pinned(replica)
    }

    /// Every key any client used, in the order first used.
    pub fn keys_used(&self) -> Vec<String> {
        self.keys_used.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn key(&self, rng: &mut StdRng) -> String {
        let generation = self.start.elapsed().as_millis() / self.config.key_lifetime.as_millis().max(1);
        let key = format!("k{generation}-{}", rng.random_range(0..self.config.keys.max(1)));
        let mut used = self.keys_used.lock().unwrap_or_else(|p| p.into_inner());
        if !used.contains(&key) {
            used.push(key.clone());
        }
        key
    }

    /// Runs client `id` until `stop` is set; returns what it recorded. A probe writes only
    /// and gives up on an answer after `probe_timeout`.
    pub async fn run_client(
        self: Arc<Self>,
        id: u64,
        probe: bool,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Vec<Record> {
        let mut rng = StdRng::seed_from_u64(self.config.seed.wrapping_mul(31).wrapping_add(id));
        let mut known: HashMap<String, u64> = HashMap::new();
        let mut replica = rng.random_range(0..self.replicas());
        let mut out = Vec::new();
        while !*stop.borrow() {
            let key = self.key(&mut rng);
            let roll = if probe { rng.random_range(30..100) } else { rng.random_range(0..100) };
            let op = match (roll, known.get(&key)) {
                (0..30, _) => Op::Get,
                (30..50, _) => Op::Create { value: self.next_value.fetch_add(1, Ordering::Relaxed) },
                (50..85, Some(rv)) => {
                    Op::Update { expected_rv: *rv, value: self.next_value.fetch_add(1, Ordering::Relaxed) }
                }
                (50..85, None) => Op::Get,
                _ => Op::Delete,
            };
            let invoke = self.now();
            let answer = self.send(replica, &key, op, probe).await;
            let complete = self.now();
            let (outcome, uid, error) = match answer {
                Ok((ret, uid)) => (Outcome::Ok(ret), uid, None),
                Err((outcome, e)) => (outcome, None, Some(e)),
            };
            match outcome {
                Outcome::Ok(Ret::Created { rv } | Ret::Updated { rv }) => {
                    known.insert(key.clone(), rv);
                }
                Outcome::Ok(Ret::Got(Some(v))) => {
                    known.insert(key.clone(), v.rv);
                }
                Outcome::Ok(Ret::Got(None) | Ret::Deleted | Ret::NotFound) => {
                    known.remove(&key);
                }
                Outcome::Ok(_) => {}
                // Fail over: the next request goes to another replica, after a pause as a
                // real client would make (a refused connection fails in microseconds).
                Outcome::Fail | Outcome::Unknown => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let n = self.replicas();
                    replica = (replica + 1 + rng.random_range(0..n.max(2) - 1)) % n;
                }
            }
            if rng.random_range(0..4) == 0 {
                replica = rng.random_range(0..self.replicas());
            }
            out.push(Record { key, op: Operation { client: id, op, outcome, invoke, complete }, uid, replica, error });
        }
        out
    }

    /// One request. `Ok` is an answer the checker holds the cluster to; `Err` carries the
    /// outcome (failed or unknown) and what went wrong.
    async fn send(
        &self,
        replica: usize,
        key: &str,
        op: Op,
        probe: bool,
    ) -> Result<(Ret, Option<String>), (Outcome, String)> {
        let c = if probe { self.probe_client.pinned(replica) } else { self.client(replica) };
        let result = match op {
            Op::Create { value } => c
                .create(config_map(key, value, None))
                .await
                .map(|r| version_of(&r).map(|(v, uid)| (Ret::Created { rv: v.rv }, Some(uid)))),
            Op::Update { expected_rv, value } => c
                .update(config_map(key, value, Some(expected_rv)))
                .await
                .map(|r| version_of(&r).map(|(v, uid)| (Ret::Updated { rv: v.rv }, Some(uid)))),
            Op::Delete => c.delete(Kind::ConfigMap, NAMESPACE, key, &DeleteOptions::default()).await.map(|r| {
                let uid = r.object.as_ref().and_then(|o| version_of(o).ok()).map(|(_, uid)| uid);
                if r.deleted {
                    Ok((Ret::Deleted, uid))
                } else {
                    Err("the delete answered without deleting (a finalizer?)".to_string())
                }
            }),
            Op::Get => c
                .get(Kind::ConfigMap, NAMESPACE, key)
                .await
                .map(|r| version_of(&r).map(|(v, uid)| (Ret::Got(Some(v)), Some(uid)))),
        };
        match result {
            Ok(Ok(answer)) => Ok(answer),
            // An answer the driver cannot read: the request did something, but what is unknown.
            Ok(Err(why)) => Err((Outcome::Unknown, why)),
            Err(e) => classify(op, &e),
        }
    }
}

/// What a failed call means for the history. The client classified the failure already:
/// a replica's answer, nothing done (no replica could take it), or unknown.
fn classify(op: Op, e: &ClientError) -> Result<(Ret, Option<String>), (Outcome, String)> {
    if let ClientError::Status { status, .. } = e {
        match (status.code(), op) {
            (Code::NotFound, Op::Get) => return Ok((Ret::Got(None), None)),
            (Code::NotFound, Op::Update { .. } | Op::Delete) => return Ok((Ret::NotFound, None)),
            (Code::AlreadyExists, Op::Create { .. }) => return Ok((Ret::AlreadyExists, None)),
            (Code::Aborted, Op::Update { .. }) => return Ok((Ret::Conflict, None)),
            _ => {}
        }
    }
    let why = e.to_string();
    // A read that got no answer changed nothing, whatever happened to it.
    if op == Op::Get {
        return Err((Outcome::Fail, why));
    }
    let outcome = match e {
        // Not sent, or refused with Keel's promise that it was never proposed.
        ClientError::Unavailable { .. } => Outcome::Fail,
        _ => Outcome::Unknown,
    };
    Err((outcome, why))
}

fn config_map(name: &str, value: u64, expected_rv: Option<u64>) -> pb::Object {
    let cm = pb::ConfigMap {
        metadata: Some(pb::ObjectMeta {
            name: name.into(),
            namespace: NAMESPACE.into(),
            resource_version: expected_rv.map(|rv| rv.to_string()).unwrap_or_default(),
            ..Default::default()
        }),
        data: [("v".to_string(), value.to_string())].into(),
        ..Default::default()
    };
    pb::Object { kind: Some(pb::object::Kind::ConfigMap(cm)) }
}

/// The version and uid of a ConfigMap the driver wrote.
fn version_of(o: &pb::Object) -> Result<(Version, String), String> {
    let Some(pb::object::Kind::ConfigMap(cm)) = &o.kind else {
        return Err(format!("expected a ConfigMap, got {o:?}"));
    };
    let meta = cm.metadata.as_ref().ok_or("a ConfigMap without metadata")?;
    let rv = meta.resource_version.parse().map_err(|_| format!("bad resourceVersion {:?}", meta.resource_version))?;
    let value = cm.data.get("v").and_then(|v| v.parse().ok()).ok_or_else(|| format!("bad data {:?}", cm.data))?;
    Ok((Version { rv, value }, meta.uid.clone()))
}

fn seen_of(kind: &str, rv: u64, o: &pb::Object) -> Result<Seen, String> {
    let (v, uid) = version_of(o)?;
    let key = match &o.kind {
        Some(pb::object::Kind::ConfigMap(cm)) => cm.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
        _ => String::new(),
    };
    Ok(Seen { rv, key, kind: kind.to_string(), value: v.value, uid })
}

/// How a watch stream ended.
enum WatchEnd {
    /// Stopped by the run.
    Stopped,
    /// The start revision is gone: re-list.
    Relist(String),
    /// Anything else: resume from the last revision on another replica.
    Resume(String),
}

impl Workload {
    /// Runs watcher `id` until `stop` is set.
    pub async fn run_watcher(self: Arc<Self>, id: usize, mut stop: tokio::sync::watch::Receiver<bool>) -> WatchLog {
        let mut rng = StdRng::seed_from_u64(self.config.seed.wrapping_mul(17).wrapping_add(id as u64));
        let mut log = WatchLog { watcher: id, segments: Vec::new() };
        let mut replica = rng.random_range(0..self.replicas());
        let mut relist = true;
        while !*stop.borrow() {
            if relist {
                match self.list(replica).await {
                    Ok((from, listed)) => {
                        log.segments.push(Segment { from, to: from, listed, ..Default::default() });
                        relist = false;
                    }
                    Err(_) => {
                        replica = (replica + 1) % self.replicas();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let Some(seg) = log.segments.last_mut() else { continue };
            match self.follow(replica, seg, &mut stop).await {
                WatchEnd::Stopped => break,
                WatchEnd::Relist(why) => {
                    seg.ends.push(format!("re-list: {why}"));
                    relist = true;
                }
                WatchEnd::Resume(why) => {
                    seg.ends.push(format!("replica {}: {why}", replica + 1));
                    seg.reconnects += 1;
                    replica = (replica + 1) % self.replicas();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        log
    }

    async fn list(&self, replica: usize) -> Result<(u64, Vec<Seen>), String> {
        let r = self
            .client(replica)
            .list(Kind::ConfigMap, &ListOptions::namespace(NAMESPACE))
            .await
            .map_err(|e| e.to_string())?;
        let rv = r.resource_version.parse().map_err(|_| "bad list resourceVersion".to_string())?;
        let mut listed = Vec::new();
        for o in &r.items {
            let (v, _) = version_of(o)?;
            listed.push(seen_of("LISTED", v.rv, o)?);
        }
        Ok((rv, listed))
    }

    /// Follows one watch stream from the segment's last revision, appending to it.
    async fn follow(
        &self,
        replica: usize,
        seg: &mut Segment,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> WatchEnd {
        let opts = WatchOptions {
            namespace: NAMESPACE.into(),
            resource_version: seg.to.to_string(),
            bookmarks: true,
            ..Default::default()
        };
        let mut stream = match self.client(replica).watch(Kind::ConfigMap, &opts).await {
            Ok(s) => s,
            Err(e) => return end_of(&e),
        };
        loop {
            // Bookmarks come every second; a silent stream is a stuck replica (paused or cut
            // off), so the watcher moves on.
            let next = tokio::select! {
                _ = stop.changed() => return WatchEnd::Stopped,
                n = tokio::time::timeout(Duration::from_secs(3), stream.next()) => n,
            };
            let ev = match next {
                Err(_) => return WatchEnd::Resume("no event or bookmark for 3 s".into()),
                Ok(Err(s)) => return end_of(&s),
                Ok(Ok(None)) => return WatchEnd::Resume("the stream ended".into()),
                Ok(Ok(Some(ev))) => ev,
            };
            let Ok(rv) = ev.resource_version.parse::<u64>() else {
                return WatchEnd::Resume(format!("bad resourceVersion {:?}", ev.resource_version));
            };
            if ev.r#type != "BOOKMARK" {
                let seen = ev
                    .object
                    .as_ref()
                    .ok_or_else(|| "an event without an object".to_string())
                    .and_then(|o| seen_of(&ev.r#type, rv, o));
                match seen {
                    Ok(s) => seg.events.push(s),
                    Err(e) => return WatchEnd::Resume(e),
                }
            }
            seg.to = seg.to.max(rv);
        }
    }
}

fn end_of(e: &ClientError) -> WatchEnd {
    if e.is_expired() {
        WatchEnd::Relist(e.message())
    } else {
        WatchEnd::Resume(e.message())
    }
}
