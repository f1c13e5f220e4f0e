//! A container's life as the kubelet runs it: probes (exec, httpGet, tcpSocket, grpc) that
//! gate readiness and restart the unhealthy, postStart and preStop hooks around SIGTERM,
//! sidecar init containers, activeDeadlineSeconds, and exec through the runtime.

use std::time::Duration;

use keel::agent::runtime::{exec_sync, ContainerState, LABEL_POD_UID};
use keel::api::kinds::Kind;
use keel::client::{Client, DeleteOptions};
use keel::proto::v1 as pb;

use super::*;

pub(super) async fn create(admin: &Client, yaml: &str) -> pb::Pod {
    match admin.create(manifest(yaml)).await.unwrap().kind {
        Some(pb::object::Kind::Pod(p)) => p,
        other => panic!("not a pod: {other:?}"),
    }
}

fn ready(p: &pb::Pod) -> bool {
    p.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.r#type == "Ready" && c.status == "True"))
}

/// The runtime id of the running container `name` of pod `uid`.
async fn running_id(node: &TestNode, uid: &str, name: &str) -> Option<String> {
    let rt = &node.running.as_ref()?.runtime;
    rt.containers().await.ok()?.into_iter().find_map(|c| {
        (c.label(LABEL_POD_UID) == uid
            && c.label(keel::agent::runtime::LABEL_CONTAINER) == name
            && matches!(c.state, ContainerState::Running { .. }))
        .then_some(c.id)
    })
}

pub(crate) async fn events_for(admin: &Client, pod: &str) -> Vec<(String, String)> {
    admin
        .list_all(Kind::Event, &keel::client::ListOptions::namespace("default"))
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::object::Kind::Event(ev)) if ev.involved_object.as_ref().is_some_and(|o| o.name == pod) => {
                Some((ev.reason.clone(), ev.message.clone()))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_gate_readiness_and_restart_unhealthy_containers() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let node = cluster.node("n1").await;
    let admin = &cluster.admin;
    // Ready once /tmp/w/ready exists (httpGet), live while /tmp/alive exists (exec), started
    // once port 8081 listens (tcpSocket).
    let web = create(
        admin,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: probed}\nspec:\n  nodeName: n1\n  terminationGracePeriodSeconds: 1\n  containers:\n  \
         - name: c\n    image: busybox\n    \
           command: [sh, -c, 'mkdir -p /tmp/w; touch /tmp/alive; (sleep 1; exec httpd -f -p 8081 -h /tmp) & exec httpd -f -p 8080 -h /tmp/w']\n    \
           ports: [{name: http, containerPort: 8080}]\n    \
           startupProbe: {tcpSocket: {port: 8081}, periodSeconds: 1, failureThreshold: 30}\n    \
           readinessProbe: {httpGet: {path: /ready, port: http}, periodSeconds: 1}\n    \
           livenessProbe: {exec: {command: [cat, /tmp/alive]}, periodSeconds: 1, failureThreshold: 2}\n",
    )
    .await;
    let uid = web.metadata.unwrap().uid;
    let p = wait_pod(admin, "probed", "Running and started", Duration::from_secs(60), |p| {
        phase(p) == "Running" && container_status(p, "c").is_some_and(|c| c.started == Some(true))
    })
    .await;
    assert!(!ready(&p), "not Ready before its readiness probe passes");
    assert!(!container_status(&p, "c").unwrap().ready);
    let id = running_id(&node, &uid, "c").await.unwrap();
    let rt = node.running.as_ref().unwrap().runtime.clone();

    // exec through the runtime: separate streams and the exit code.
    let (code, out, err) = exec_sync(
        rt.as_ref(),
        &id,
        vec!["sh".into(), "-c".into(), "echo out; echo err >&2; exit 7".into()],
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!((code, out.as_slice(), err.as_slice()), (7, &b"out\n"[..], &b"err\n"[..]));
    let timed_out = exec_sync(rt.as_ref(), &id, vec!["sleep".into(), "30".into()], Duration::from_millis(500)).await;
    assert!(timed_out.unwrap_err().to_string().contains("timed out"));

    exec_sync(rt.as_ref(), &id, vec!["touch".into(), "/tmp/w/ready".into()], Duration::from_secs(10)).await.unwrap();
    wait_pod(admin, "probed", "Ready", Duration::from_secs(20), ready).await;
    // Not ready again when the page goes.
    exec_sync(rt.as_ref(), &id, vec!["rm".into(), "/tmp/w/ready".into()], Duration::from_secs(10)).await.unwrap();
    wait_pod(admin, "probed", "not Ready", Duration::from_secs(20), |p| !ready(p) && phase(p) == "Running").await;

    // The liveness probe fails twice: the container is killed and started again.
    exec_sync(rt.as_ref(), &id, vec!["rm".into(), "/tmp/alive".into()], Duration::from_secs(10)).await.unwrap();
    let p = wait_pod(admin, "probed", "restarted by its liveness probe", Duration::from_secs(40), |p| {
        container_status(p, "c").is_some_and(|c| c.restart_count >= 1)
    })
    .await;
    let last = container_status(&p, "c").unwrap().last_state.clone().unwrap().terminated.unwrap();
    assert!(last.exit_code == 137 || last.exit_code == 143, "{last:?}");
    let events = events_for(admin, "probed").await;
    assert!(
        events.iter().any(|(r, m)| r == "Killing" && m == "Container c failed liveness probe, will be restarted"),
        "{events:?}"
    );
    assert!(events.iter().any(|(r, m)| r == "Unhealthy" && m.starts_with("Liveness probe failed")), "{events:?}");
    admin.delete(Kind::Pod, "default", "probed", &DeleteOptions::default()).await.unwrap();
    eventually("pod gone", Duration::from_secs(30), || async { pod(admin, "probed").await.is_none().then_some(()) })
        .await;
    super::pods::clean(&node).await;
    drop(node);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_probe_asks_the_standard_health_service() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let node = cluster.node("n1").await;
    // A health server on the node namespace's loopback.
    let net = node.running.as_ref().unwrap().network.clone().unwrap();
    let host = "127.0.0.1".to_string();
    let addr: std::net::SocketAddr = format!("{host}:0").parse().unwrap();
    let listener = keel::agent::network::netns::run_in(&node.netns.path(), move || std::net::TcpListener::bind(addr))
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("keel.Probe", tonic_health::ServingStatus::NotServing).await;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let target = keel::agent::pods::probe::Target {
        pod_ip: host.clone(),
        container_id: String::new(),
        container: pb::Container::default(),
    };
    let handler = |service: &str| keel::agent::pods::probe::Handler {
        grpc: Some(pb::GrpcAction { port: port as i32, service: Some(service.into()) }),
        ..Default::default()
    };
    let rt = node.running.as_ref().unwrap().runtime.clone();
    let t = Duration::from_secs(2);
    keel::agent::pods::probe::run(rt.as_ref(), Some(&net), &target, &handler(""), t).await.unwrap();
    let e =
        keel::agent::pods::probe::run(rt.as_ref(), Some(&net), &target, &handler("keel.Probe"), t).await.unwrap_err();
    assert!(e.contains("NOT_SERVING"), "{e}");
    reporter.set_service_status("keel.Probe", tonic_health::ServingStatus::Serving).await;
    keel::agent::pods::probe::run(rt.as_ref(), Some(&net), &target, &handler("keel.Probe"), t).await.unwrap();
    server.abort();
    drop(node);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_sidecars_and_deadlines() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let node = cluster.node("n1").await;
    let admin = &cluster.admin;
    let host = tempfile::tempdir().unwrap();
    let log = host.path().join("log");
    // postStart writes before anything else can; preStop then SIGTERM, in that order.
    create(
        admin,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: hooked}}\nspec:\n  nodeName: n1\n  terminationGracePeriodSeconds: 5\n  \
             initContainers:\n  - name: sidecar\n    image: busybox\n    restartPolicy: Always\n    command: [sleep, '3600']\n  \
             containers:\n  - name: c\n    image: busybox\n    \
               command: [sh, -c, 'trap \"echo term >> /h/log; exit 0\" TERM; while true; do sleep 0.1; done']\n    \
               volumeMounts: [{{name: h, mountPath: /h}}]\n    \
               lifecycle:\n      postStart: {{exec: {{command: [sh, -c, 'echo post-start >> /h/log']}}}}\n      \
               preStop: {{exec: {{command: [sh, -c, 'echo pre-stop >> /h/log']}}}}\n  \
             volumes: [{{name: h, hostPath: {{path: {}}}}}]\n",
            host.path().display()
        ),
    )
    .await;
    let p = wait_pod(admin, "hooked", "Running with its sidecar", Duration::from_secs(60), |p| {
        phase(p) == "Running" && ready(p)
    })
    .await;
    let side =
        p.status.as_ref().unwrap().init_container_statuses.iter().find(|c| c.name == "sidecar").cloned().unwrap();
    assert!(side.state.unwrap().running.is_some(), "the sidecar keeps running beside the app");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "post-start\n");
    admin.delete(Kind::Pod, "default", "hooked", &DeleteOptions::default()).await.unwrap();
    eventually("pod gone", Duration::from_secs(30), || async { pod(admin, "hooked").await.is_none().then_some(()) })
        .await;
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "post-start\npre-stop\nterm\n");

    // activeDeadlineSeconds: stopped and Failed with DeadlineExceeded.
    create(
        admin,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: deadline}\nspec:\n  nodeName: n1\n  activeDeadlineSeconds: 2\n  \
         terminationGracePeriodSeconds: 1\n  containers:\n  - {name: c, image: busybox, command: [sleep, '3600']}\n",
    )
    .await;
    let p = wait_pod(admin, "deadline", "Failed past its deadline", Duration::from_secs(30), |p| phase(p) == "Failed")
        .await;
    let st = p.status.unwrap();
    assert_eq!(st.reason, "DeadlineExceeded");
    assert_eq!(st.message, "Pod was active on the node longer than the specified deadline");
    admin.delete(Kind::Pod, "default", "deadline", &DeleteOptions::default()).await.unwrap();
    super::pods::clean(&node).await;
    drop(node);
    cluster.stop().await;
}
