//! Pods through the whole path: API → agent → containerd/runc and CNI → status back.

use std::io::{Read, Write};
use std::time::Duration;

use keel::api::kinds::Kind;
use keel::client::{Client, DeleteOptions};
use keel::proto::v1 as pb;

use super::*;

/// GET `path` from `ip:port` inside the namespace at `netns`; the body.
pub(crate) fn http_get(netns: &Path, ip: &str, port: u16, path: &str) -> Result<String, String> {
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().map_err(|e| format!("{ip}: {e}"))?;
    let path = path.to_string();
    keel::agent::network::netns::run_in(netns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| format!("read from {addr}: {e}"))?;
        let (head, body) = out.split_once("\r\n\r\n").ok_or_else(|| format!("no HTTP answer: {out:?}"))?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(format!("{addr}{path}: {}", head.lines().next().unwrap_or_default()));
        }
        Ok(body.to_string())
    })
    .map_err(|e| e.to_string())?
}

async fn create(admin: &Client, yaml: &str) -> pb::Pod {
    match admin.create(manifest(yaml)).await.unwrap().kind {
        Some(pb::object::Kind::Pod(p)) => p,
        other => panic!("not a pod: {other:?}"),
    }
}

fn running(p: &pb::Pod) -> bool {
    phase(p) == "Running"
        && p.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.r#type == "Ready" && c.status == "True"))
}

fn node_pod(name: &str, node: &str, rest: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n{rest}")
}

/// Waits until nothing of any pod is left on `node`.
pub(crate) async fn clean(node: &TestNode) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = node.leftovers().await;
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind on {}: {left:#?}", node.name);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_answers_http_and_leaves_nothing_behind() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let node = cluster.node("n1").await;
    let admin = &cluster.admin;

    // The node's network: its podCIDR on the bridge, and no cluster address leaves it.
    let routes = node.netns.exec(&["ip", "route", "show", "type", "unreachable"]).unwrap();
    assert!(routes.contains("10.42.0.0/16") && routes.contains("10.43.0.0/16"), "unreachable routes: {routes}");

    let created = create(
        admin,
        &node_pod(
            "web",
            "n1",
            "  terminationGracePeriodSeconds: 2\n  containers:\n  - name: httpd\n    image: busybox\n    \
             command: [sh, -c, 'mkdir -p /tmp/w && cp /etc/hosts /tmp/w/hosts && hostname > /tmp/w/name && exec httpd -f -p 8080 -h /tmp/w']\n",
        ),
    )
    .await;
    let p = wait_pod(admin, "web", "Running and Ready", Duration::from_secs(60), running).await;
    let status = p.status.clone().unwrap();
    let cidr: ipnet::Ipv4Net = match admin.get(Kind::Node, "", "n1").await.unwrap().kind {
        Some(pb::object::Kind::Node(n)) => n.spec.unwrap().pod_cidr.parse().unwrap(),
        _ => unreachable!(),
    };
    let ip: std::net::Ipv4Addr = status.pod_ip.parse().unwrap();
    assert!(cidr.contains(&ip), "pod IP {ip} outside the node's podCIDR {cidr}");
    assert_eq!(status.pod_ips.iter().map(|i| i.ip.as_str()).collect::<Vec<_>>(), [status.pod_ip.as_str()]);
    assert_eq!(status.qos_class, "BestEffort");
    assert!(!status.start_time.is_empty());
    for t in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        assert!(
            status.conditions.iter().any(|c| c.r#type == t && c.status == "True"),
            "condition {t}: {:?}",
            status.conditions
        );
    }
    let c = container_status(&p, "httpd").unwrap();
    assert!(c.container_id.starts_with("containerd://"), "{}", c.container_id);
    assert!(c.image_id.starts_with("sha256:"), "{}", c.image_id);
    assert!(c.ready && c.restart_count == 0 && c.started == Some(true));
    assert!(!c.state.as_ref().unwrap().running.as_ref().unwrap().started_at.is_empty());

    // Real HTTP from the node to the pod; the pod's own files say who it is.
    let body = eventually("the pod's httpd answers", Duration::from_secs(10), || async {
        http_get(&node.netns.path(), &ip.to_string(), 8080, "/name").ok()
    })
    .await;
    assert_eq!(body.trim(), "web");
    let hosts = http_get(&node.netns.path(), &ip.to_string(), 8080, "/hosts").unwrap();
    assert!(
        hosts.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == [ip.to_string().as_str(), "web"]),
        "{hosts}"
    );

    // Graceful deletion: Terminating until the node has stopped it, then gone, with nothing
    // left on the node.
    let uid = created.metadata.unwrap().uid;
    let del = admin.delete(Kind::Pod, "default", "web", &DeleteOptions::default()).await.unwrap();
    assert!(!del.deleted, "a running pod is deleted gracefully");
    let terminating = pod(admin, "web").await.expect("still there while its node stops it");
    let meta = terminating.metadata.unwrap();
    assert!(!meta.deletion_timestamp.is_empty());
    assert_eq!(meta.deletion_grace_period_seconds, Some(2));
    eventually("the pod is gone", Duration::from_secs(20), || async {
        pod(admin, "web").await.is_none().then_some(())
    })
    .await;
    clean(&node).await;
    assert!(!Path::new("/run/netns").join(format!("keel-{uid}")).exists());
    assert!(http_get(&node.netns.path(), &ip.to_string(), 8080, "/name").is_err(), "the pod still answers");
    drop(node);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_args_and_exit_codes_follow_kubernetes() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let node = cluster.node("n1").await;
    let admin = &cluster.admin;
    let created = create(
        admin,
        &node_pod(
            "entry",
            "n1",
            "  restartPolicy: Never\n  containers:\n  \
             - {name: image-defaults, image: docker.io/keel/entrypoint}\n  \
             - {name: args-only, image: docker.io/keel/entrypoint, args: [from-args]}\n  \
             - {name: command-only, image: docker.io/keel/entrypoint, command: [echo, from-command]}\n  \
             - {name: workdir, image: docker.io/keel/entrypoint, command: [pwd]}\n  \
             - name: env\n    image: busybox\n    command: [sh, -c, 'echo \"$GREETING $(id -u)\"']\n    \
               env: [{name: GREETING, value: hello}]\n    securityContext: {runAsUser: 65534}\n  \
             - {name: fails, image: busybox, command: [sh, -c, 'exit 3']}\n",
        ),
    )
    .await;
    let p = wait_pod(admin, "entry", "Failed", Duration::from_secs(60), |p| phase(p) == "Failed").await;
    let terminated = |name: &str| container_status(&p, name).unwrap().state.clone().unwrap().terminated.unwrap();
    for name in ["image-defaults", "args-only", "command-only", "workdir", "env"] {
        let t = terminated(name);
        assert_eq!((t.exit_code, t.reason.as_str()), (0, "Completed"), "{name}");
        assert!(!t.finished_at.is_empty());
    }
    let t = terminated("fails");
    assert_eq!((t.exit_code, t.reason.as_str()), (3, "Error"));
    // What each printed, from its log file on the node.
    let uid = created.metadata.unwrap().uid;
    let log = |name: &str| {
        let path = node.cfg.data_dir.join("pods").join(&uid).join("logs").join(name).join("0.log");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    assert!(log("image-defaults").contains("entrypoint from-cmd"), "{}", log("image-defaults"));
    assert!(log("args-only").contains("entrypoint from-args"), "{}", log("args-only"));
    assert!(log("command-only").contains("from-command") && !log("command-only").contains("entrypoint"));
    assert!(log("workdir").contains("/tmp"), "the image's WorkingDir: {}", log("workdir"));
    assert!(log("env").contains("hello 65534"), "{}", log("env"));
    // A finished pod is deleted at once: no grace period for what no longer runs.
    let del = admin.delete(Kind::Pod, "default", "entry", &DeleteOptions::default()).await.unwrap();
    assert!(del.deleted, "a finished pod goes at once");
    clean(&node).await;
    drop(node);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_back_off_and_a_missing_image_waits_beside_a_healthy_pod() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let node = cluster.node("n1").await;
    let admin = &cluster.admin;
    let sleeper =
        "  terminationGracePeriodSeconds: 1\n  containers:\n  - {name: c, image: busybox, command: [sleep, '3600']}\n";
    create(admin, &node_pod("healthy", "n1", sleeper)).await;
    create(
        admin,
        &node_pod(
            "crash",
            "n1",
            "  containers:\n  - {name: c, image: busybox, command: [sh, -c, 'echo crashing; exit 1']}\n",
        ),
    )
    .await;
    create(
        admin,
        &node_pod(
            "no-image",
            "n1",
            "  containers:\n  - {name: c, image: 'registry.invalid/none:1', imagePullPolicy: Never}\n",
        ),
    )
    .await;
    wait_pod(admin, "healthy", "Running", Duration::from_secs(60), running).await;
    let p = wait_pod(admin, "crash", "CrashLoopBackOff after restarts", Duration::from_secs(60), |p| {
        container_status(p, "c").is_some_and(|c| {
            c.restart_count >= 2
                && c.state.as_ref().and_then(|s| s.waiting.as_ref()).is_some_and(|w| w.reason == "CrashLoopBackOff")
        })
    })
    .await;
    let c = container_status(&p, "c").unwrap();
    let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()).expect("lastState.terminated");
    assert_eq!((last.exit_code, last.reason.as_str()), (1, "Error"));
    assert!(c.state.as_ref().unwrap().waiting.as_ref().unwrap().message.contains("back-off"));
    assert_eq!(phase(&p), "Running", "a crash-looping pod with restartPolicy Always is Running");
    let p = wait_pod(admin, "no-image", "ErrImageNeverPull", Duration::from_secs(30), |p| {
        container_status(p, "c")
            .and_then(|c| c.state.as_ref()?.waiting.clone())
            .is_some_and(|w| w.reason == "ErrImageNeverPull")
    })
    .await;
    let w = container_status(&p, "c").unwrap().state.clone().unwrap().waiting.unwrap();
    assert!(w.message.contains("registry.invalid/none:1"), "{}", w.message);
    assert_eq!(phase(&p), "Pending");
    // The healthy pod never noticed.
    let h = pod(admin, "healthy").await.unwrap();
    assert_eq!(container_status(&h, "c").unwrap().restart_count, 0);
    for name in ["healthy", "crash", "no-image"] {
        admin.delete(Kind::Pod, "default", name, &DeleteOptions::default()).await.unwrap();
    }
    for name in ["healthy", "crash", "no-image"] {
        eventually(&format!("pod {name} gone"), Duration::from_secs(30), || async {
            pod(admin, name).await.is_none().then_some(())
        })
        .await;
    }
    clean(&node).await;
    drop(node);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_its_containers_and_cleans_up_pods_deleted_meanwhile() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let mut node = cluster.node("n1").await;
    let admin = &cluster.admin;
    let sleeper =
        "  terminationGracePeriodSeconds: 1\n  containers:\n  - {name: c, image: busybox, command: [sleep, '3600']}\n";
    create(admin, &node_pod("keep", "n1", sleeper)).await;
    create(admin, &node_pod("gone", "n1", sleeper)).await;
    let before = wait_pod(admin, "keep", "Running", Duration::from_secs(60), running).await;
    wait_pod(admin, "gone", "Running", Duration::from_secs(60), running).await;
    let gone_uid = pod(admin, "gone").await.unwrap().metadata.unwrap().uid;

    node.stop().await;
    // Its containers run on without the agent and without containerd.
    let socket = node.socket().display().to_string();
    assert_eq!(shims_of(&socket).len(), 2, "both pods' shims outlive the agent");
    // Deleted while the node is down: Terminating until the node is back to stop it.
    admin.delete(Kind::Pod, "default", "gone", &DeleteOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(pod(admin, "gone").await.is_some(), "a pod its node has not stopped stays Terminating");

    node.start().await;
    eventually("the pod deleted meanwhile is gone", Duration::from_secs(30), || async {
        pod(admin, "gone").await.is_none().then_some(())
    })
    .await;
    let after = wait_pod(admin, "keep", "Running", Duration::from_secs(30), running).await;
    let (b, a) = (container_status(&before, "c").unwrap(), container_status(&after, "c").unwrap());
    assert_eq!(a.container_id, b.container_id, "adopted, not started again");
    assert_eq!(a.restart_count, 0);
    assert_eq!(
        a.state.as_ref().unwrap().running.as_ref().unwrap().started_at,
        b.state.as_ref().unwrap().running.as_ref().unwrap().started_at
    );
    let left = node.leftovers().await;
    assert!(!left.iter().any(|l| l.contains(&gone_uid)), "{left:#?}");
    assert_eq!(left.iter().filter(|l| l.starts_with("container ")).count(), 1, "{left:#?}");
    admin.delete(Kind::Pod, "default", "keep", &DeleteOptions::default()).await.unwrap();
    eventually("pod keep gone", Duration::from_secs(30), || async { pod(admin, "keep").await.is_none().then_some(()) })
        .await;
    clean(&node).await;
    drop(node);
    cluster.stop().await;
}
