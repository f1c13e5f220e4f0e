//! The client's retry policy against a real replica and broken ways to it: a port nobody
//! listens on (the request is never sent), a listener that accepts and never speaks (a frozen
//! replica), and a proxy that delivers requests but holds the answers back (sent, applied,
//! no answer).

use std::time::Duration;

use keel::api::kinds::Kind;
use keel::client::{Client, ClientAuth, ClientConfig, ClientError};

use super::config_map;

fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_unsent_writes_fail_over_but_an_indeterminate_create_is_never_resent() {
    let dir = tempfile::tempdir().unwrap();
    let (_replica, addr, pki) = keel::harness::single_replica(&dir.path().join("r")).await.unwrap();
    let config = ClientConfig {
        request_timeout: Duration::from_millis(700),
        connect_timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    };
    let auth = ClientAuth::Certificate(pki.admin.clone());

    // Never sent: a write goes to the next replica.
    let refused = Client::new(&[dead_addr(), addr.clone()], auth.clone(), config.clone()).unwrap();
    let created = refused.create(config_map("default", "via-failover", "1")).await.unwrap();
    assert!(keel::api::object::meta(&created).is_some_and(|m| !m.uid.is_empty()));

    // A listener that accepts and never speaks: every attempt is bounded, and a read goes on.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let frozen =
        Client::new(&[silent.local_addr().unwrap().to_string(), addr.clone()], auth.clone(), config.clone()).unwrap();
    let t = tokio::time::Instant::now();
    let got = frozen.get(Kind::ConfigMap, "default", "via-failover").await.unwrap();
    assert_eq!(keel::api::object::meta(&got).unwrap().name, "via-failover");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // Requests delivered, answers held back: the create happened, the client cannot know.
    let net = keel::netfault::FaultNet::start(&[addr.parse().unwrap()]).await.unwrap();
    let held = ClientConfig { local_address: Some(keel::netfault::source_ip(7)), ..config };
    let hung = Client::new(&[net.proxies[0].to_string(), addr.clone()], auth, held).unwrap();
    // The connection is up (a handshake needs answers), then the answers stop.
    hung.get(Kind::Namespace, "", "default").await.unwrap();
    net.drop_replies(7, 0);
    let e = hung.create(config_map("default", "unknown", "1")).await.unwrap_err();
    // Resent to the next replica it would have come back AlreadyExists, for this client's
    // own object.
    assert!(matches!(e, ClientError::Indeterminate { .. }), "{e:?}");
    assert!(e.to_string().contains("the result is unknown") && e.to_string().contains("check with get"), "{e}");
    let direct = Client::with_certificate(std::slice::from_ref(&addr), Duration::from_secs(5), &pki.admin).unwrap();
    assert!(direct.get_opt(Kind::ConfigMap, "default", "unknown").await.unwrap().is_some(), "it did happen, once");

    // A read, and an apply (the same manifest again ends the same), go on to the next one.
    let got = hung.get(Kind::ConfigMap, "default", "unknown").await.unwrap();
    assert_eq!(keel::api::object::meta(&got).unwrap().name, "unknown");
    hung.prefer(0);
    let applied = hung.apply(vec![config_map("default", "applied", "1")], false).await.unwrap();
    // The held attempt applied it already; sent again, the same manifest changes nothing.
    assert_eq!(applied.results[0].action, "unchanged");
    // A delete whose outcome is unknown is not resent either.
    hung.prefer(0);
    let e = hung.delete(Kind::ConfigMap, "default", "via-failover", &Default::default()).await.unwrap_err();
    assert!(e.is_indeterminate(), "{e:?}");
    drop(silent);
}
