//! What one replica takes on at once, and how large an object may be: a flood from one
//! client is refused early with a retry hint while another client still gets answers;
//! watches per client are bounded; oversized objects get Kubernetes' object errors, never a
//! transport error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel::api::kinds::Kind;
use keel::client::{Client, ListOptions};
use keel::pki::Identity;
use keel::proto::v1 as pb;
use keel::server::ServeConfig;
use tonic::Code;

use super::config_map;

fn serve(max: usize, per_caller: usize, watches: usize) -> ServeConfig {
    ServeConfig {
        max_requests_inflight: max,
        max_requests_inflight_per_caller: per_caller,
        max_watches_per_caller: watches,
        ..ServeConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_client_is_refused_with_a_hint_while_another_client_still_gets_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (_replica, addr, pki) =
        keel::harness::single_replica_with(&dir.path().join("r"), serve(8, 4, 100)).await.unwrap();
    let admin = Client::with_certificate(std::slice::from_ref(&addr), Duration::from_secs(10), &pki.admin).unwrap();
    // Enough objects that each list takes a moment.
    for i in 0..200 {
        admin.create(config_map("default", &format!("c{i}"), &"x".repeat(1000))).await.unwrap();
    }
    // The flooder: raw generated clients, so that every refusal is seen, not retried.
    let ch = keel::client::endpoint(&addr, &pki.admin).unwrap().connect().await.unwrap();
    let (ok, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let hint = Arc::new(std::sync::Mutex::new(None));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut flood = Vec::new();
    for _ in 0..48 {
        let (ch, ok, refused, hint) = (ch.clone(), ok.clone(), refused.clone(), hint.clone());
        flood.push(tokio::spawn(async move {
            let mut c = pb::objects_client::ObjectsClient::new(ch).max_decoding_message_size(64 << 20);
            while tokio::time::Instant::now() < deadline {
                let req =
                    pb::ListRequest { kind: "ConfigMap".into(), namespace: "default".into(), ..Default::default() };
                match c.list(req).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        *hint.lock().unwrap() = Some((s.message().to_string(), keel::client::retry::pushback(&s)));
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(s) => panic!("the flooder got {s:?}"),
                };
            }
        }));
    }
    // Another client, another identity, during the flood: every call answered, promptly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = pki.ca.issue(&Identity::Admin("other".into()), Duration::from_secs(3600), &[]).unwrap();
    let second = Client::with_certificate(std::slice::from_ref(&addr), Duration::from_secs(5), &other).unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let t = tokio::time::Instant::now();
        second.create(config_map("default", &format!("second-{i}"), "v")).await.expect("the second client's create");
        second.get(Kind::ConfigMap, "default", &format!("second-{i}")).await.expect("the second client's get");
        slowest = slowest.max(t.elapsed());
    }
    for f in flood {
        f.await.unwrap();
    }
    let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    println!("flood: {ok} lists served, {refused} refused; the second client's slowest create+get {slowest:?}");
    assert!(refused > 0, "the flood never met the limit ({ok} served)");
    assert!(ok > 0);
    let (message, pushback) = hint.lock().unwrap().clone().unwrap();
    assert!(message.contains("too many requests in flight") && message.contains("retry in"), "{message}");
    assert!(pushback.is_some(), "a refusal carries grpc-retry-pushback-ms");
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_per_client_are_bounded_and_a_closed_one_frees_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let (_replica, addr, pki) =
        keel::harness::single_replica_with(&dir.path().join("r"), serve(100, 50, 3)).await.unwrap();
    let client = Client::with_certificate(std::slice::from_ref(&addr), Duration::from_secs(5), &pki.admin).unwrap();
    let opts = keel::client::WatchOptions { namespace: "default".into(), ..Default::default() };
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(client.watch(Kind::ConfigMap, &opts).await.unwrap());
    }
    let e = client.watch(Kind::ConfigMap, &opts).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("has 3 watches open"), "{e}");
    // Another identity has its own budget.
    let other = pki.ca.issue(&Identity::Admin("other".into()), Duration::from_secs(3600), &[]).unwrap();
    let second = Client::with_certificate(&[addr], Duration::from_secs(5), &other).unwrap();
    let _theirs = second.watch(Kind::ConfigMap, &opts).await.unwrap();
    open.pop();
    super::eventually("a closed watch frees its place", Duration::from_secs(5), || {
        let c = client.clone();
        let o = opts.clone();
        async move { c.watch(Kind::ConfigMap, &o).await.ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_objects_get_kubernetes_object_errors_not_transport_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_replica, addr, pki) = keel::harness::single_replica(&dir.path().join("r")).await.unwrap();
    let client = Client::with_certificate(std::slice::from_ref(&addr), Duration::from_secs(20), &pki.admin).unwrap();
    for mib in [3usize, 5] {
        let e = client.create(config_map("default", &format!("big{mib}"), &"x".repeat(mib << 20))).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{mib} MiB: {e}");
        assert!(
            e.message().contains(&format!("The ConfigMap \"big{mib}\" is invalid"))
                && e.message().contains("Too long: must have at most 1048576 bytes"),
            "{mib} MiB: {}",
            e.message()
        );
    }
    // Through the raw generated client too (no client-side check): the server's own error.
    let ch = keel::client::endpoint(&addr, &pki.admin).unwrap().connect().await.unwrap();
    let mut raw = pb::objects_client::ObjectsClient::new(ch).max_encoding_message_size(64 << 20);
    let obj = config_map("default", "raw", &"x".repeat(5 << 20));
    let e = raw.create(pb::CreateRequest { object: Some(obj) }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("Too long: must have at most 1048576 bytes"), "{}", e.message());
    // A kind without a data limit, over the stored-object limit: named, with its size.
    let mut pod = keel::api::manifest::parse_document(
        "p.yaml",
        &keel::api::manifest::split(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: huge}\nspec: {containers: [{name: c, image: busybox}]}\n",
        )[0],
    )
    .unwrap();
    if let Some(pb::object::Kind::Pod(p)) = pod.kind.as_mut() {
        let c = &mut p.spec.as_mut().unwrap().containers[0];
        c.env = (0..20)
            .map(|i| pb::EnvVar { name: format!("V{i}"), value: "x".repeat(100 << 10), ..Default::default() })
            .collect();
    }
    let e = client.create(pod).await.unwrap_err();
    assert!(e.message().starts_with("Request entity too large: the Pod \"huge\" is 20"), "{}", e.message());
    // Nothing was written.
    let left = client.list_all(Kind::ConfigMap, &ListOptions::namespace("default")).await.unwrap();
    assert!(left.items.is_empty(), "{:?}", left.items.len());
}
