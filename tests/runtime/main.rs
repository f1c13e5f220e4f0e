//! The shared client and the control-loop runtime against real replicas: informers through
//! kill -9 and compaction, leader election with a fencing counter, the event recorder, the
//! controller manager, the in-flight limits and the client's retry policy.

use std::time::Duration;

use keel::harness::{eventually, ProcCluster};

mod client;
mod controller;
mod events;
mod informer;
mod leader;
mod limits;

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// Three replicas on loopback under `dir`, with `extra` flags, once they agree on a leader.
async fn cluster(dir: &std::path::Path, extra: &[&str]) -> ProcCluster {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let c = ProcCluster::start(std::path::Path::new(KEEL), dir, 3, &extra).unwrap();
    c.wait_caught_up(Duration::from_secs(60)).await.unwrap();
    c
}

/// A namespace, created through `client`.
async fn namespace(client: &keel::client::Client, name: &str) {
    use keel::proto::v1 as pb;
    let ns = pb::Namespace {
        metadata: Some(pb::ObjectMeta { name: name.into(), ..Default::default() }),
        ..Default::default()
    };
    match client.create(pb::Object { kind: Some(pb::object::Kind::Namespace(ns)) }).await {
        Ok(_) => {}
        Err(e) if e.is_already_exists() => {}
        Err(e) => panic!("create namespace {name}: {e}"),
    }
}

fn config_map(namespace: &str, name: &str, value: &str) -> keel::proto::v1::Object {
    use keel::proto::v1 as pb;
    pb::Object {
        kind: Some(pb::object::Kind::ConfigMap(pb::ConfigMap {
            metadata: Some(pb::ObjectMeta { name: name.into(), namespace: namespace.into(), ..Default::default() }),
            data: [("v".to_string(), value.to_string())].into(),
            ..Default::default()
        })),
    }
}
