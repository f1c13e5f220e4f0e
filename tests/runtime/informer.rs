//! An informer rides through a kill -9 of the replica it watches and through a compaction
//! of the history it would resume from, and ends with a cache equal to a fresh
//! linearizable list; no handler ever sees a version older than one it already saw.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::api::kinds::Kind;
use keel::client::informer::{Event, Informer, InformerOptions};
use keel::client::{Client, ClientAuth, ClientConfig, DeleteOptions, ListOptions};
use keel::netfault::{source_ip, FaultNet};
use rand::{RngExt, SeedableRng};

use super::{cluster, config_map, eventually, namespace};

const NS: &str = "informed";

fn revision(o: &keel::proto::v1::Object) -> i64 {
    keel::api::object::meta(o).map(|m| m.resource_version.parse().unwrap()).unwrap()
}

/// Creates, updates and deletes ConfigMaps of `NS` until `stop`; returns how many writes
/// succeeded.
async fn write_load(client: Client, stop: tokio::sync::watch::Receiver<bool>) -> usize {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut ok = 0;
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        let key = format!("k{}", rng.random_range(0..20));
        let r = match rng.random_range(0..10) {
            0 => client.delete(Kind::ConfigMap, NS, &key, &DeleteOptions::default()).await.map(|_| ()),
            _ => match client.get_opt(Kind::ConfigMap, NS, &key).await {
                Ok(Some(mut o)) => {
                    if let Some(keel::proto::v1::object::Kind::ConfigMap(cm)) = o.kind.as_mut() {
                        cm.data.insert("v".into(), n.to_string());
                    }
                    client.update(o).await.map(|_| ())
                }
                Ok(None) => client.create(config_map(NS, &key, &n.to_string())).await.map(|_| ()),
                Err(e) => Err(e),
            },
        };
        ok += usize::from(r.is_ok());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_informer_rides_through_a_kill_9_and_a_compaction_and_ends_equal_to_a_fresh_list() {
    let dir = tempfile::tempdir().unwrap();
    // A short history, so that a few seconds cut off make the resume point expire.
    let mut c = cluster(dir.path(), &["--watch-history", "150"]).await;
    let writer = Client::with_certificate(&c.addrs(), Duration::from_secs(3), &c.pki.admin).unwrap();
    namespace(&writer, NS).await;

    // The informer reaches the replicas through fault proxies, from its own address, so
    // the test can cut it off while the others go on.
    let targets: Vec<std::net::SocketAddr> = c.nodes.iter().map(|n| n.addr.parse().unwrap()).collect();
    let net = FaultNet::start(&targets).await.unwrap();
    const ME: usize = 5;
    let config = ClientConfig {
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_millis(300),
        retry_for: Duration::from_secs(1),
        local_address: Some(source_ip(ME)),
    };
    let proxies: Vec<String> = net.proxies.iter().map(|p| p.to_string()).collect();
    let client = Client::new(&proxies, ClientAuth::Certificate(c.pki.admin.clone()), config).unwrap();
    let opts = InformerOptions {
        namespace: NS.into(),
        page_size: 7,
        idle_timeout: Duration::from_secs(3),
        max_backoff: Duration::from_millis(500),
        ..Default::default()
    };
    let informer = Informer::new(client, Kind::ConfigMap, opts);
    // Every version a handler saw, per key; a version no newer than one seen is a violation.
    let seen: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let (s, v) = (seen.clone(), violations.clone());
    informer.add_handler(Arc::new(move |e: &Event| {
        let o = e.object();
        let k = keel::client::informer::key_of(o);
        let rv = revision(o);
        let mut seen = s.lock().unwrap();
        let last = seen.get(&k).copied().unwrap_or(0);
        let older = match e {
            Event::Deleted(_) => rv < last,
            _ => rv <= last,
        };
        if older {
            v.lock().unwrap().push(format!("{k}: {e:?} at {rv} after {last}"));
        }
        seen.insert(k, rv.max(last));
    }));

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(write_load(writer.clone(), stop.clone()));
    informer.start();
    tokio::time::timeout(Duration::from_secs(20), informer.wait_synced()).await.expect("synced");
    tokio::time::sleep(Duration::from_millis(800)).await;

    // 1. kill -9 the replica the informer is watching (it starts on the first).
    c.kill(0).unwrap();
    eventually("the watch resumes elsewhere", Duration::from_secs(20), || {
        let r = informer.stats().reconnects;
        async move { (r >= 1).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.spawn(0).unwrap();

    // 2. Cut the informer off while more than the history window is written.
    for to in 0..3 {
        net.cut(ME, to, false);
    }
    let from = writer.list(Kind::ConfigMap, &ListOptions::namespace(NS)).await.unwrap().resource_version;
    let from: i64 = from.parse().unwrap();
    eventually("the history moves past the informer", Duration::from_secs(60), || {
        let w = writer.clone();
        async move {
            let rv: i64 =
                w.list(Kind::ConfigMap, &ListOptions::namespace(NS)).await.ok()?.resource_version.parse().ok()?;
            (rv > from + 400).then_some(())
        }
    })
    .await;
    net.heal();
    eventually("the informer re-lists after its revision expired", Duration::from_secs(30), || {
        let e = informer.stats().expired;
        async move { (e >= 1).then_some(()) }
    })
    .await;

    // 3. Quiesce, then compare with a fresh linearizable list.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    let writes = load.await.unwrap();
    let fresh = writer.list_all(Kind::ConfigMap, &ListOptions::namespace(NS)).await.unwrap();
    let want: i64 = fresh.resource_version.parse().unwrap();
    eventually("the informer catches up", Duration::from_secs(30), || {
        let r = informer.revision();
        async move { (r >= want).then_some(()) }
    })
    .await;
    let cache: Vec<(String, i64)> = informer.snapshot().into_iter().map(|(k, (rv, _))| (k, rv)).collect();
    let mut listed: Vec<(String, i64)> =
        fresh.items.iter().map(|o| (keel::client::informer::key_of(o), revision(o))).collect();
    listed.sort();
    assert_eq!(cache, listed, "the cache equals a fresh list");
    let v = violations.lock().unwrap();
    assert!(v.is_empty(), "handlers saw older versions:\n{}", v.join("\n"));
    let st = informer.stats();
    println!(
        "informer: {writes} writes, {} objects at the end; lists {} (expired {}), reconnects {}, events {}, stale dropped {}",
        listed.len(),
        st.lists,
        st.expired,
        st.reconnects,
        st.events,
        st.stale
    );
    assert!(st.lists >= 2 && st.expired >= 1 && st.reconnects >= 1, "{st:?}");
}
