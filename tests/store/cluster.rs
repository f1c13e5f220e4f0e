//! In-process clusters: real replicas (store + gRPC services) on 127.0.0.1 ports in one test
//! process, sharing a `Faults` table that cuts links between them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keel::client::Client;
use keel::harness::{free_port, TestPki};
use keel::pki::Credentials;
use keel::proto::v1 as pb;
use keel::server::Server;
use keel::store::{prefix_end, Faults, Member, StoreConfig, StoreError};
use tokio::time::Instant;

struct TestCluster {
    _dir: tempfile::TempDir,
    pki: TestPki,
    creds: Vec<Credentials>,
    faults: Arc<Faults>,
    configs: Vec<StoreConfig>,
    addrs: Vec<SocketAddr>,
    servers: Vec<Option<Server>>,
}

fn test_config(id: u64, addr: SocketAddr, dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(id, addr.to_string(), dir.join(format!("node{id}")));
    c.write_timeout = Duration::from_secs(2);
    c.cache_bytes = 16 << 20;
    c
}

impl TestCluster {
    async fn start(n: usize, tune: impl Fn(&mut StoreConfig)) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let addrs: Vec<SocketAddr> =
            (0..n).map(|_| format!("127.0.0.1:{}", free_port().unwrap()).parse().unwrap()).collect();
        let voters: BTreeMap<u64, Member> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (i as u64 + 1, Member { addr: a.to_string(), name: format!("replica-{}", i + 1) }))
            .collect();
        let pki = TestPki::new().unwrap();
        let mut configs = Vec::new();
        let mut servers = Vec::new();
        let mut creds = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let mut c = test_config(i as u64 + 1, *addr, dir.path());
            tune(&mut c);
            configs.push(c.clone());
            let cr = pki.replica(i as u64 + 1, &addr.to_string()).unwrap();
            servers.push(Some(Server::start(c, *addr, Some(voters.clone()), faults.clone(), &cr).await.unwrap()));
            creds.push(cr);
        }
        let c = TestCluster { _dir: dir, pki, creds, faults, configs, addrs, servers };
        c.leader().await;
        c
    }

    fn server(&self, i: usize) -> &Server {
        self.servers[i].as_ref().expect("server is running")
    }

    fn addr_strings(&self, idx: &[usize]) -> Vec<String> {
        idx.iter().map(|i| self.addrs[*i].to_string()).collect()
    }

    fn client(&self, idx: &[usize]) -> Client {
        Client::with_certificate(&self.addr_strings(idx), Duration::from_secs(3), &self.pki.admin).unwrap()
    }

    /// Waits for a leader among the running, connected replicas and returns its index.
    async fn leader(&self) -> usize {
        self.leader_among(&(0..self.servers.len()).collect::<Vec<_>>()).await
    }

    async fn leader_among(&self, idx: &[usize]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            for &i in idx {
                if let Some(s) = &self.servers[i] {
                    if s.store.is_leader() {
                        // Only count it when the others in the group follow it.
                        let id = s.store.id();
                        let agreed = idx
                            .iter()
                            .filter_map(|j| self.servers[*j].as_ref())
                            .all(|o| o.store.current_leader() == Some(id));
                        if agreed {
                            return i;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader among {idx:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&mut self, i: usize) {
        if let Some(s) = self.servers[i].take() {
            s.stop().await.unwrap();
        }
    }

    async fn restart(&mut self, i: usize) {
        // The previous instance releases the sled lock once its tasks have wound down.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Server::start(self.configs[i].clone(), self.addrs[i], None, self.faults.clone(), &self.creds[i]).await
            {
                Ok(s) => {
                    self.servers[i] = Some(s);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("restart {i}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("restart of replica {i} failed: {e}"),
            }
        }
    }

    /// Every key under `prefix`, read (stale) from replica i.
    async fn keys_on(&self, i: usize, prefix: &str) -> BTreeSet<String> {
        let r = self
            .server(i)
            .store
            .range(pb::RangeRequest {
                key: prefix.into(),
                range_end: prefix_end(prefix.as_bytes()),
                serializable: true,
                ..Default::default()
            })
            .await
            .unwrap();
        r.kvs.into_iter().map(|kv| String::from_utf8(kv.key).unwrap()).collect()
    }
}

fn put(key: &str, value: &str) -> pb::TxnRequest {
    pb::TxnRequest {
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: key.into(),
                value: value.into(),
                prev_kv: false,
            })),
        }],
        ..Default::default()
    }
}

fn others(n: usize, i: usize) -> Vec<usize> {
    (0..n).filter(|j| *j != i).collect()
}

fn ids(idx: &[usize]) -> Vec<u64> {
    idx.iter().map(|i| *i as u64 + 1).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_elects_a_new_one_and_loses_no_acknowledged_write() {
    let mut c = TestCluster::start(3, |_| {}).await;
    let client = c.client(&[0, 1, 2]);
    let mut acked = BTreeSet::new();
    for i in 0..50 {
        let k = format!("a/{i:03}");
        client.kv_put(k.clone(), "v").await.unwrap();
        acked.insert(k);
    }
    let old = c.leader().await;
    c.stop(old).await;
    let survivors = others(3, old);
    let new = c.leader_among(&survivors).await;
    assert_ne!(new, old);
    let client = c.client(&survivors);
    for i in 50..100 {
        let k = format!("a/{i:03}");
        client.kv_put(k.clone(), "v").await.unwrap();
        acked.insert(k);
    }
    // A linearizable read on either survivor sees every acknowledged write.
    for &s in &survivors {
        let r = c
            .server(s)
            .store
            .range(pb::RangeRequest { key: b"a/".to_vec(), range_end: prefix_end(b"a/"), ..Default::default() })
            .await
            .unwrap();
        let got: BTreeSet<String> = r.kvs.into_iter().map(|kv| String::from_utf8(kv.key).unwrap()).collect();
        assert_eq!(got, acked, "replica {s} lost acknowledged writes");
    }
    // The old leader comes back as a follower and catches up.
    c.restart(old).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.keys_on(old, "a/").await != acked {
        assert!(Instant::now() < deadline, "restarted replica did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The leader acknowledges its own entries to Raft before they are flushed, so that the
/// flush overlaps replication. Until its copy is on disk, the write must not be answered or
/// applied anywhere, though a follower already holds it; and the followers must keep hearing
/// from the leader, so that a slow disk does not turn into an election.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_is_answered_and_applied_nowhere_before_the_leaders_copy_is_on_disk() {
    let c = TestCluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let id = l as u64 + 1;
    let store = c.server(l).store.clone();
    store.txn(put("/held/warm", "1"), true).await.unwrap();
    let before = store.status();

    c.faults.stall_log_flushes(id, true);
    let write = tokio::spawn(async move { store.txn(put("/held/k", "v"), true).await });
    // A quorum needs one follower.
    let deadline = Instant::now() + Duration::from_secs(5);
    while others(3, l).iter().all(|f| c.server(*f).store.status().last_log_index <= before.last_log_index) {
        assert!(Instant::now() < deadline, "no follower received the entry while the leader's flush was held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Several election timeouts (100-200 ms) with the flush held.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    if write.is_finished() {
        panic!("the write ended while the leader's flush was held: {:?}", write.await.unwrap());
    }
    for i in 0..3 {
        assert!(c.keys_on(i, "/held/k").await.is_empty(), "replica {i} applied the write before the leader's flush");
    }
    let during = c.server(l).store.status();
    assert_eq!((during.term, during.leader_id), (before.term, id), "a held flush cost the leader its term");

    c.faults.stall_log_flushes(id, false);
    write.await.unwrap().expect("the write completes once the leader's flush does");
    let deadline = Instant::now() + Duration::from_secs(5);
    for i in 0..3 {
        while c.keys_on(i, "/held/k").await.is_empty() {
            assert!(Instant::now() < deadline, "replica {i} never applied the write");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_old_leader_cannot_commit_or_serve_linearizable_reads() {
    let c = TestCluster::start(3, |_| {}).await;
    let old = c.leader().await;
    let rest = others(3, old);
    c.client(&[0, 1, 2]).kv_put("p/before", "1").await.unwrap();
    c.faults.isolate(old as u64 + 1, &ids(&rest));

    // A write through the isolated leader fails; it never reports success.
    let w = c.server(old).store.txn(put("p/zombie", "x"), true).await;
    assert!(w.is_err(), "write through a partitioned leader reported success: {w:?}");
    // So does a linearizable read.
    let r = c.server(old).store.range(pb::RangeRequest { key: b"p/before".to_vec(), ..Default::default() }).await;
    assert!(r.is_err(), "linearizable read on a partitioned leader succeeded: {r:?}");

    // The majority elects a new leader and keeps committing.
    let new = c.leader_among(&rest).await;
    assert_ne!(new, old);
    c.client(&rest).kv_put("p/after", "2").await.unwrap();

    c.faults.heal();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys = c.keys_on(old, "p/").await;
        if keys.contains("p/after") {
            assert!(!keys.contains("p/zombie"), "the zombie write was committed");
            break;
        }
        assert!(Instant::now() < deadline, "old leader never caught up after the heal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in 0..3 {
        assert!(!c.keys_on(s, "p/").await.contains("p/zombie"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_restarted_after_a_log_purge_catches_up_by_snapshot() {
    let mut c = TestCluster::start(3, |cfg| {
        cfg.snapshot_every = 50;
        cfg.keep_logs = 5;
        cfg.snapshot_chunk_bytes = 4096;
    })
    .await;
    let leader = c.leader().await;
    let follower = others(3, leader)[0];
    let before = c.server(follower).store.status();
    c.stop(follower).await;
    let live = others(3, follower);
    let client = c.client(&live);
    let value = "x".repeat(200);
    for i in 0..300 {
        client.kv_put(format!("s/{i:04}"), value.clone()).await.unwrap();
    }
    let leader_status = c.server(c.leader_among(&live).await).store.status();
    assert!(
        leader_status.purged_index > before.last_log_index,
        "the leader must have purged past the follower's log (purged {}, follower had {})",
        leader_status.purged_index,
        before.last_log_index
    );
    c.restart(follower).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if c.keys_on(follower, "s/").await.len() == 300 {
            break;
        }
        assert!(Instant::now() < deadline, "follower did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = c.server(follower).store.status();
    assert!(st.snapshot_index > before.last_log_index, "follower caught up without installing a snapshot: {st:?}");
    assert_eq!(st.revision, c.server(c.leader().await).store.revision());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_that_reconnects_from_its_last_revision_sees_every_event_once_in_order() {
    let mut c = TestCluster::start(3, |_| {}).await;
    let leader = c.leader().await;
    let watched = others(3, leader)[0];
    let fallback = others(3, leader)[1];
    let mut stream = c
        .client(&[watched])
        .kv_watch(pb::WatchRequest { key: b"w/".to_vec(), range_end: prefix_end(b"w/"), ..Default::default() })
        .await
        .unwrap();
    let created = stream.message().await.unwrap().unwrap();
    let start_rev = created.header.unwrap().revision;

    let writer = {
        let client = c.client(&[leader]);
        tokio::spawn(async move {
            for i in 0..200 {
                client.kv_put(format!("w/{i:03}"), "v").await.unwrap();
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };

    let mut seen: Vec<(i64, String)> = Vec::new();
    // Read a part of the stream, then lose the replica it came from.
    while seen.len() < 60 {
        let msg = stream.message().await.unwrap().expect("stream open");
        for e in msg.events {
            let kv = e.kv.unwrap();
            seen.push((kv.mod_revision, String::from_utf8(kv.key).unwrap()));
        }
    }
    c.stop(watched).await;
    let last = seen.last().unwrap().0;
    let mut stream = c
        .client(&[fallback])
        .kv_watch(pb::WatchRequest {
            key: b"w/".to_vec(),
            range_end: prefix_end(b"w/"),
            start_revision: last + 1,
            ..Default::default()
        })
        .await
        .unwrap();
    while seen.len() < 200 {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
        assert!(!msg.canceled, "watch canceled: {}", msg.cancel_reason);
        for e in msg.events {
            let kv = e.kv.unwrap();
            seen.push((kv.mod_revision, String::from_utf8(kv.key).unwrap()));
        }
    }
    writer.await.unwrap();
    let revs: Vec<i64> = seen.iter().map(|s| s.0).collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "revisions out of order or repeated: {seen:?}");
    assert!(revs[0] > start_rev);
    let keys: BTreeSet<&String> = seen.iter().map(|s| &s.1).collect();
    assert_eq!(keys.len(), 200, "every key exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_from_a_compacted_revision_gets_a_distinct_error_with_the_current_revision() {
    let c = TestCluster::start(1, |cfg| cfg.watch.history_events = 10).await;
    let client = c.client(&[0]);
    for i in 0..30 {
        client.kv_put(format!("c/{i}"), "v").await.unwrap();
    }
    let mut stream = client
        .kv_watch(pb::WatchRequest {
            key: b"c/".to_vec(),
            range_end: prefix_end(b"c/"),
            start_revision: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let msg = stream.message().await.unwrap().unwrap();
    assert!(msg.canceled);
    assert!(msg.compact_revision > 1, "{msg:?}");
    assert_eq!(msg.header.unwrap().revision, c.server(0).store.revision());
    assert!(msg.cancel_reason.contains("compacted"), "{}", msg.cancel_reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_and_linearizable_reads_work_through_any_follower() {
    let c = TestCluster::start(3, |_| {}).await;
    let leader = c.leader().await;
    let f = others(3, leader);
    let resp = c.server(f[0]).store.txn(put("f/1", "via-follower"), true).await.unwrap();
    assert!(resp.succeeded);
    // Immediately visible to a linearizable read on the other follower.
    let r = c.server(f[1]).store.range(pb::RangeRequest { key: b"f/1".to_vec(), ..Default::default() }).await.unwrap();
    assert_eq!(r.kvs[0].value, b"via-follower");
    assert!(r.header.unwrap().revision >= resp.header.unwrap().revision);
    // A request that was already forwarded once is not forwarded again.
    let e = c.server(f[0]).store.txn(put("f/2", "x"), false).await.unwrap_err();
    assert!(matches!(e, StoreError::NotLeader { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_learner_is_added_promoted_and_a_member_removed() {
    let mut c = TestCluster::start(3, |_| {}).await;
    let client = c.client(&[0, 1, 2]);
    for i in 0..20 {
        client.kv_put(format!("m/{i}"), "v").await.unwrap();
    }
    // A fourth replica starts empty and is added as a learner through a follower.
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap()).parse().unwrap();
    let cfg = test_config(4, addr, c._dir.path());
    c.configs.push(cfg.clone());
    c.addrs.push(addr);
    let cr = c.pki.replica(4, &addr.to_string()).unwrap();
    c.servers.push(Some(Server::start(cfg, addr, None, c.faults.clone(), &cr).await.unwrap()));
    c.creds.push(cr);
    let leader = c.leader_among(&[0, 1, 2]).await;
    let via = others(3, leader)[0];
    c.server(via)
        .store
        .add_learner(4, Member { addr: addr.to_string(), name: "replica-4".into() }, true)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.keys_on(3, "m/").await.len() != 20 {
        assert!(Instant::now() < deadline, "learner did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = c.server(leader).store.status();
    assert!(st.members.iter().any(|m| m.id == 4 && !m.voter));

    // Promote it, then remove replica of index `via`.
    c.server(leader).store.change_membership([1, 2, 3, 4].into(), false).await.unwrap();
    let removed = via as u64 + 1;
    let remaining: BTreeSet<u64> = [1u64, 2, 3, 4].into_iter().filter(|i| *i != removed).collect();
    let leader = c.leader().await;
    c.server(leader).store.change_membership(remaining.clone(), false).await.unwrap();
    let st = c.server(c.leader().await).store.status();
    let voters: BTreeSet<u64> = st.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    assert_eq!(voters, remaining);
    assert!(!st.members.iter().any(|m| m.id == removed), "removed member is gone entirely");
    // The cluster still commits without the removed replica.
    c.stop(via).await;
    let live: Vec<usize> = (0..4).filter(|i| *i != via).collect();
    c.client(&live).kv_put("m/after", "v").await.unwrap();
    let counts: HashMap<usize, usize> = {
        let mut m = HashMap::new();
        for &i in &live {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let n = c.keys_on(i, "m/").await.len();
                if n == 21 || Instant::now() > deadline {
                    m.insert(i, n);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        m
    };
    assert!(counts.values().all(|n| *n == 21), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_write_whose_answer_is_lost_is_reported_as_indeterminate_not_unavailable() {
    let c = TestCluster::start(3, |_| {}).await;
    let leader = c.leader().await;
    let follower = others(3, leader)[0];
    // The follower can reach the leader, but nothing comes back.
    c.faults.cut(leader as u64 + 1, follower as u64 + 1);
    let e = c.server(follower).store.txn(put("i/lost-answer", "v"), true).await.unwrap_err();
    assert!(matches!(e, StoreError::Indeterminate(_)), "{e}");
    assert_eq!(keel::server::status::from_store(e).code(), tonic::Code::Unknown);
    c.faults.heal();
    // It did apply: "indeterminate" was the honest answer.
    let r = c
        .server(leader)
        .store
        .range(pb::RangeRequest { key: b"i/lost-answer".to_vec(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(r.kvs.len(), 1);
}
