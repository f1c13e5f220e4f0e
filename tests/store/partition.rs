//! Real replica processes behind fault proxies (`keel::netfault`): a network partition
//! between processes, not an in-process link table.

use std::path::Path;
use std::time::Duration;

use keel::client::Client;
use keel::harness::ProcCluster;
use keel::proto::v1 as pb;
use tokio::time::Instant;

fn client(c: &ProcCluster, i: usize) -> Client {
    Client::with_certificate(&[c.nodes[i].addr.clone()], Duration::from_secs(2), &c.pki.admin).unwrap()
}

async fn get(c: &Client, key: &str) -> Option<Vec<u8>> {
    let r = c.range(pb::RangeRequest { key: key.as_bytes().to_vec(), ..Default::default() }).await;
    let r = r.unwrap_or_else(|e| panic!("read {key}: {e}"));
    r.kvs.into_iter().next().map(|kv| kv.value)
}

/// Writes `after` through replica `i` until one is acknowledged; fails with `what` after
/// `within`.
async fn put_until_accepted(c: &ProcCluster, i: usize, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while client(c, i).kv_put("after", "1").await.is_err() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_isolated_by_the_network_loses_its_quorum_and_the_majority_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_keel"));
    let (c, net) = ProcCluster::start_behind_proxies(exe, dir.path(), 3, &[]).await.unwrap();
    let leader = c.wait_caught_up(Duration::from_secs(30)).await.unwrap();
    client(&c, leader).kv_put("before", "1").await.unwrap();

    net.isolate(leader, 3);
    // The old leader cannot commit: its write fails or stays unanswered, never succeeds.
    let zombie = client(&c, leader).kv_put("zombie", "1").await;
    assert!(zombie.is_err(), "an isolated leader acknowledged a write");
    // The other two elect a leader and take writes.
    let other = (leader + 1) % 3;
    put_until_accepted(&c, other, Duration::from_secs(20), "the majority never took a write").await;

    net.heal();
    c.wait_caught_up(Duration::from_secs(30)).await.unwrap();
    for i in 0..3 {
        let cl = client(&c, i);
        assert_eq!(get(&cl, "before").await.as_deref(), Some(&b"1"[..]), "replica {i}");
        assert_eq!(get(&cl, "after").await.as_deref(), Some(&b"1"[..]), "replica {i}");
        assert_eq!(get(&cl, "zombie").await, None, "the zombie write was never committed (replica {i})");
    }
}

/// A leader that can send but not receive: its heartbeats reach the followers, their answers
/// never come back. Without check-quorum the heartbeats keep the followers from ever electing
/// and no write commits until the network heals; with it the leader goes quiet and the
/// followers elect one of themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_can_send_but_not_receive_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_keel"));
    let (c, net) = ProcCluster::start_behind_proxies(exe, dir.path(), 3, &[]).await.unwrap();
    let leader = c.wait_caught_up(Duration::from_secs(30)).await.unwrap();
    client(&c, leader).kv_put("before", "1").await.unwrap();

    for f in (0..3).filter(|f| *f != leader) {
        net.drop_replies(leader, f);
        net.cut(f, leader, false);
    }
    let other = (leader + 1) % 3;
    // Not a speed target but a liveness bound: without check-quorum only the HTTP/2
    // keep-alive (5 s + 5 s) ends the stall, by breaking the leader's connections. With it a
    // new leader takes writes about a second after the partition.
    put_until_accepted(
        &c,
        other,
        Duration::from_secs(6),
        "the followers did not replace a leader that can send but not receive",
    )
    .await;
    let status = c.client(Duration::from_secs(2)).status_of(other).await.unwrap();
    assert_ne!(status.leader_id, leader as u64 + 1, "the new leader is one of the followers");

    net.heal();
    c.wait_caught_up(Duration::from_secs(30)).await.unwrap();
    for i in 0..3 {
        assert_eq!(get(&client(&c, i), "after").await.as_deref(), Some(&b"1"[..]), "replica {i}");
    }
}

/// A leader whose followers both died stops sending (check-quorum). When one of them comes
/// back with a shorter log than the leader's, it cannot win an election, so the leader must
/// reach it: a lost quorum still probes each voter now and then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_left_alone_takes_back_the_first_follower_that_returns() {
    let dir = tempfile::tempdir().unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_keel"));
    let mut c = keel::harness::ProcCluster::start(exe, dir.path(), 3, &[]).unwrap();
    let leader = c.wait_caught_up(Duration::from_secs(30)).await.unwrap();
    client(&c, leader).kv_put("before", "1").await.unwrap();
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for f in &followers {
        c.kill(*f).unwrap();
    }
    // The leader appends this and cannot commit it: its log is now longer than theirs.
    let alone =
        Client::with_certificate(&[c.nodes[leader].addr.clone()], Duration::from_millis(500), &c.pki.admin).unwrap();
    assert!(alone.kv_put("uncommitted", "1").await.is_err(), "a leader alone acknowledged a write");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    c.spawn(followers[0]).unwrap();
    // A liveness bound, not a speed target: without the probe nothing commits until the
    // second follower returns, which it never does here.
    put_until_accepted(
        &c,
        leader,
        Duration::from_secs(10),
        "the leader and the returning follower never formed a quorum",
    )
    .await;
    assert_eq!(get(&client(&c, followers[0]), "before").await.as_deref(), Some(&b"1"[..]));
}
