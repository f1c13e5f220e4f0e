//! The Node as its agent reports it: pressure conditions from real readings (with thresholds
//! set so that this machine is or is not under pressure), and allocatable resources that
//! keep `--reserved` from pods. A bad threshold stops the agent before it starts anything.

use std::time::Duration;

use keel::api::kinds::Kind;
use keel::api::quantity::Quantity;
use keel::proto::v1 as pb;

use super::*;

async fn node_status(admin: &keel::client::Client) -> Option<pb::NodeStatus> {
    match admin.get(Kind::Node, "", "n1").await.ok()?.kind? {
        pb::object::Kind::Node(n) => n.status,
        _ => None,
    }
}

fn condition<'a>(s: &'a pb::NodeStatus, ty: &str) -> Option<&'a pb::NodeCondition> {
    s.conditions.iter().find(|c| c.r#type == ty)
}

fn milli(s: &pb::NodeStatus, map: &str, k: &str) -> i128 {
    let m = if map == "capacity" { &s.capacity } else { &s.allocatable };
    Quantity::parse(&m[k]).unwrap().milli
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_reports_pressure_from_readings_and_keeps_its_reservations() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let mut node = cluster.node("n1").await;
    let admin = &cluster.admin;
    node.stop().await;
    node.cfg.reserved = "cpu=500m,memory=256Mi,pods=10".into();
    node.cfg.heartbeat = Duration::from_millis(500);
    // Thresholds this machine meets whatever its load (this disk may well be 90% full).
    node.cfg.eviction_hard = "memory.available<1Ki,nodefs.available<1Ki,pid.available<1".into();
    node.start().await;
    let s = eventually("the reserved resources kept from allocatable", Duration::from_secs(20), || async {
        node_status(admin).await.filter(|s| s.allocatable.get("pods").map(String::as_str) == Some("100"))
    })
    .await;
    assert_eq!(milli(&s, "allocatable", "cpu"), milli(&s, "capacity", "cpu") - 500);
    assert_eq!(milli(&s, "allocatable", "memory"), milli(&s, "capacity", "memory") - (256i128 << 20) * 1000);
    for (ty, reason) in [
        ("MemoryPressure", "KubeletHasSufficientMemory"),
        ("DiskPressure", "KubeletHasNoDiskPressure"),
        ("PIDPressure", "KubeletHasSufficientPID"),
    ] {
        let c = condition(&s, ty).unwrap_or_else(|| panic!("no {ty}: {:?}", s.conditions));
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", reason), "{c:?}");
    }
    assert_eq!(condition(&s, "Ready").unwrap().status, "True");

    // Thresholds this machine cannot meet: the readings put it under memory and disk
    // pressure, and the Node says so.
    node.stop().await;
    node.cfg.eviction_hard = "memory.available<1Pi,nodefs.available<100%,pid.available<1".into();
    node.start().await;
    let s = eventually("memory and disk pressure", Duration::from_secs(20), || async {
        node_status(admin).await.filter(|s| {
            condition(s, "MemoryPressure").is_some_and(|c| c.status == "True")
                && condition(s, "DiskPressure").is_some_and(|c| c.status == "True")
        })
    })
    .await;
    assert_eq!(condition(&s, "MemoryPressure").unwrap().reason, "KubeletHasInsufficientMemory");
    assert_eq!(condition(&s, "DiskPressure").unwrap().message, "kubelet has disk pressure");
    assert_eq!(condition(&s, "PIDPressure").unwrap().status, "False");

    // A threshold the kubelet would not take stops the agent before it starts.
    node.stop().await;
    let mut bad = node.cfg.clone();
    bad.eviction_hard = "memory.free<1Gi".into();
    let err = match Box::pin(keel::agent::start(bad)).await {
        Ok(_) => panic!("an agent started with --eviction-hard memory.free<1Gi"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("--eviction-hard") && err.contains("unknown signal \"memory.free\""), "{err}");
    drop(node);
    cluster.stop().await;
}

/// SIGCONT on drop, so that a failing test does not leave containerd frozen.
struct Frozen(i32);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), nix::sys::signal::Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containerd_that_does_not_answer_makes_the_node_not_ready_until_it_does() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let mut node = cluster.node("n1").await;
    let admin = &cluster.admin;
    node.stop().await;
    node.cfg.heartbeat = Duration::from_millis(500);
    node.start().await;
    let ready = |want: &'static str| move |s: &pb::NodeStatus| condition(s, "Ready").is_some_and(|c| c.status == want);
    eventually("Ready", Duration::from_secs(20), || async { node_status(admin).await.filter(ready("True")) }).await;
    let config = node.cfg.data_dir.join("containerd").join("config.toml").display().to_string();
    let pid = processes()
        .into_iter()
        .find(|(_, _, cmd)| cmd.starts_with("containerd") && cmd.contains(&config))
        .map(|(pid, _, _)| pid)
        .expect("the node's managed containerd");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let frozen = Frozen(pid);
    let s =
        eventually("NotReady", Duration::from_secs(30), || async { node_status(admin).await.filter(ready("False")) })
            .await;
    let c = condition(&s, "Ready").unwrap();
    assert_eq!(c.reason, "KubeletNotReady");
    assert!(c.message.starts_with("container runtime is down: "), "{}", c.message);
    drop(frozen);
    eventually("Ready again", Duration::from_secs(30), || async { node_status(admin).await.filter(ready("True")) })
        .await;
    drop(node);
    cluster.stop().await;
}
