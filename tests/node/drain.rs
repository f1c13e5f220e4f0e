//! Cordon, uncordon and drain, as a user runs them with keelctl against a real node: a
//! cordoned node takes no new pods; drain refuses what it cannot move unless told, deletes
//! the rest with their own grace periods and waits for them, and leaves DaemonSet pods.

use std::process::Command;
use std::time::{Duration, Instant};

use keel::api::kinds::Kind;
use keel::proto::v1 as pb;

use super::lifecycle::create;
use super::logs::keelctl_config;
use super::*;

const KEELCTL: &str = env!("CARGO_BIN_EXE_keelctl");

fn scheduled(p: &pb::Pod) -> Option<&pb::PodCondition> {
    p.status.as_ref()?.conditions.iter().find(|c| c.r#type == "PodScheduled")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordon_keeps_new_pods_off_and_drain_moves_pods_with_their_grace() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let node = cluster.node("n1").await;
    let admin = &cluster.admin;
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config");
    keelctl_config(&cluster, &config);
    let keelctl = |args: &[&str]| {
        let out = Command::new(KEELCTL).args(args).env("KEELCONFIG", &config).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // The node lists its images (imported before it registered).
    let (ok, out, err) = keelctl(&["image", "ls"]);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.contains("docker.io/library/busybox:latest")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.starts_with("n1 "), "{out}");
    assert!(out.starts_with("NODE"), "{out}");

    let (ok, out, err) = keelctl(&["cordon", "n1"]);
    assert!(ok, "{err}");
    assert_eq!(out, "node/n1 cordoned\n");
    assert_eq!(keelctl(&["cordon", "node/n1"]).1, "node/n1 already cordoned\n");

    // No node takes the pod while n1 is cordoned; it waits, saying why.
    create(
        admin,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: free}\nspec:\n  terminationGracePeriodSeconds: 10\n  containers:\n  \
         - name: c\n    image: busybox\n    \
           command: [sh, -c, 'trap \"sleep 1; exit 0\" TERM; while true; do sleep 0.2; done']\n",
    )
    .await;
    let p = wait_pod(admin, "free", "Unschedulable", Duration::from_secs(20), |p| {
        scheduled(p).is_some_and(|c| c.status == "False" && c.reason == "Unschedulable")
    })
    .await;
    assert!(scheduled(&p).unwrap().message.contains("node(s) were unschedulable"), "{:?}", scheduled(&p));

    let (ok, out, _) = keelctl(&["uncordon", "n1"]);
    assert!(ok);
    assert_eq!(out, "node/n1 uncordoned\n");
    let p = wait_pod(admin, "free", "Running on n1", Duration::from_secs(60), |p| phase(p) == "Running").await;
    assert_eq!(p.spec.unwrap().node_name, "n1");

    // A DaemonSet's pod on the node.
    create(
        admin,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: ds\n  ownerReferences: [{apiVersion: apps/v1, kind: DaemonSet, name: d, uid: 9b6a1f8e-0000-4000-8000-000000000001, controller: true}]\nspec:\n  \
         nodeName: n1\n  terminationGracePeriodSeconds: 0\n  containers:\n  - {name: c, image: busybox, command: [sleep, '3600']}\n",
    )
    .await;
    wait_pod(admin, "ds", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await;

    // Without --force and --ignore-daemonsets, drain refuses and deletes nothing.
    let (ok, _, err) = keelctl(&["drain", "n1"]);
    assert!(!ok);
    assert!(
        err.contains("cannot delete Pods that declare no controller (use --force to override): default/free"),
        "{err}"
    );
    assert!(
        err.contains("cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore): default/ds"),
        "{err}"
    );
    assert!(pod(admin, "free").await.is_some() && pod(admin, "ds").await.is_some());

    // With them: the pod stops within its own grace period (its TERM handler takes a second),
    // drain waits for it, and the DaemonSet's pod stays.
    let began = Instant::now();
    let (ok, out, err) = keelctl(&["drain", "n1", "--force", "--ignore-daemonsets"]);
    let took = began.elapsed();
    assert!(ok, "{err}");
    assert!(out.contains("node/n1 already cordoned\n"), "{out}");
    assert!(out.contains("evicting pod default/free\n") && out.contains("pod/free evicted\n"), "{out}");
    assert!(out.ends_with("node/n1 drained\n"), "{out}");
    assert!(err.contains("Warning: ignoring DaemonSet-managed Pods: default/ds"), "{err}");
    assert!(took >= Duration::from_secs(1), "drain returned after {took:?}, before the pod's TERM handler ended");
    assert!(pod(admin, "free").await.is_none());
    assert_eq!(phase(&pod(admin, "ds").await.unwrap()), "Running");
    let Some(pb::object::Kind::Node(n)) = admin.get(Kind::Node, "", "n1").await.unwrap().kind else { unreachable!() };
    assert!(n.spec.unwrap().unschedulable);

    admin.delete(Kind::Pod, "default", "ds", &Default::default()).await.unwrap();
    eventually("pod gone", Duration::from_secs(30), || async { pod(admin, "ds").await.is_none().then_some(()) }).await;
    drop(node);
    cluster.stop().await;
}
