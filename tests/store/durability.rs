//! kill -9 of real `keel server` processes under write load: nothing acknowledged is lost,
//! and no replica refuses to start afterwards.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::harness::ProcCluster;
use keel::proto::v1 as pb;
use keel::store::prefix_end;
use tokio::time::Instant;

fn log_tails(c: &ProcCluster) -> String {
    let mut out = String::new();
    for n in &c.nodes {
        let text = std::fs::read_to_string(&n.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        out.push_str(&format!(
            "--- {} ---\n{}\n",
            n.log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    out
}

async fn all_keys(c: &ProcCluster, prefix: &str) -> BTreeSet<String> {
    let client = c.client(Duration::from_secs(5));
    let mut keys = BTreeSet::new();
    let mut req = pb::RangeRequest {
        key: prefix.into(),
        range_end: prefix_end(prefix.as_bytes()),
        limit: 5000,
        ..Default::default()
    };
    loop {
        let r = client.range(req.clone()).await.unwrap_or_else(|e| panic!("range failed: {e}\n{}", log_tails(c)));
        keys.extend(r.kvs.into_iter().map(|kv| String::from_utf8(kv.key).unwrap()));
        if !r.more {
            return keys;
        }
        req.key = r.next_key;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_kill_9_cycles_under_write_load_lose_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_keel"));
    let mut c = ProcCluster::start(exe, &dir.path().join("cluster"), 3, &[]).unwrap();
    c.wait_leader(Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&c)));
    let mut total_acked = 0usize;
    for cycle in 0..20 {
        let acked = Arc::new(Mutex::new(Vec::<String>::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..8 {
            let client = c.client(Duration::from_secs(2));
            client.prefer(w);
            let acked = acked.clone();
            let stop = stop.clone();
            writers.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("d/{cycle:02}/{w}/{n:05}");
                    n += 1;
                    if client.kv_put(key.clone(), "payload").await.is_ok() {
                        acked.lock().unwrap().push(key);
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Even cycles kill the leader; odd cycles kill every replica at once, so that only
        // what reached the disks can survive.
        let victims: Vec<usize> = if cycle % 2 == 0 {
            vec![c.wait_leader(Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&c)))]
        } else {
            vec![0, 1, 2]
        };
        for &v in &victims {
            c.kill(v).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        for &v in &victims {
            c.spawn(v).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        if let Err(e) = c.wait_leader(Duration::from_secs(30)).await {
            for i in 0..3 {
                if let Some(st) = c.exited(i) {
                    panic!("replica {} refused to start ({st}) in cycle {cycle}\n{}", i + 1, log_tails(&c));
                }
            }
            panic!("cycle {cycle}: {e}\n{}", log_tails(&c));
        }
        assert!(Instant::now() < deadline);
        let acked = acked.lock().unwrap().clone();
        assert!(!acked.is_empty(), "cycle {cycle} acknowledged no write at all");
        let present = all_keys(&c, &format!("d/{cycle:02}/")).await;
        let lost: Vec<&String> = acked.iter().filter(|k| !present.contains(*k)).collect();
        assert!(
            lost.is_empty(),
            "cycle {cycle} lost {} acknowledged writes, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        total_acked += acked.len();
    }
    eprintln!("20 kill -9 cycles: {total_acked} acknowledged writes, none lost");
    // Nothing from earlier cycles went missing either.
    let present = all_keys(&c, "d/").await;
    assert!(present.len() >= total_acked, "{} keys present, {} acknowledged", present.len(), total_acked);
    for i in 0..3 {
        assert!(c.exited(i).is_none(), "replica {} exited", i + 1);
    }
}

/// A leader killed and started again at once, before the others could elect, must not take up
/// its old term as leader: its commit marker may be stale, and its reads would be too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_at_once_wins_a_new_term_before_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let exe = Path::new(env!("CARGO_BIN_EXE_keel"));
    let mut c = ProcCluster::start(exe, &dir.path().join("cluster"), 3, &[]).unwrap();
    let leader = c.wait_leader(Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&c)));
    let client = c.client(Duration::from_secs(5));
    client.kv_put("k", "v").await.unwrap();
    let before = client.status_of(leader).await.unwrap().term;
    c.kill(leader).unwrap();
    c.spawn(leader).unwrap();
    let now = c.wait_leader(Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e}\n{}", log_tails(&c)));
    let after = client.status_of(now).await.unwrap().term;
    assert!(after > before, "leadership went on in term {before} after the leader restarted (now term {after})");
    assert_eq!(all_keys(&c, "k").await.len(), 1);
}
