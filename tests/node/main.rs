//! The node agent on the real path: a replica in this process, agents with a managed
//! containerd (runc underneath) and the standard CNI plugins, each node in a network namespace
//! the test creates. Pods are created through the API and checked where they run: real
//! HTTP to the pod address, containerd's own lists, the host-local IPAM directory, /run/netns.
//!
//! These tests need root, containerd, runc, the CNI plugins and a static busybox. Without
//! them they are skipped, unless `KEEL_E2E=1` (as `.ci/run` sets): then that is a failure.
//!
//! Every test cleans up what it made, also when it fails: `TestNode`'s drop kills what its
//! containerd ran, unmounts and removes the pod namespaces, and deletes the node namespace
//! (with the bridge, veths and routes in it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use keel::agent::{self, AgentConfig, RuntimeKind};
use keel::api::kinds::Kind;
use keel::client::{Client, ClientAuth, ClientConfig};
use keel::harness::{eventually, TestPki, TestReplica};
use keel::pki::Identity;
use keel::proto::v1 as pb;
use tokio::time::Instant;

mod config;
mod drain;
mod images;
mod lifecycle;
mod logs;
mod pods;
mod status;
mod up;

/// Whether the real-path tests can run here; with KEEL_E2E=1 a missing prerequisite fails.
fn prerequisites() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_string());
    }
    for bin in
        ["containerd", "containerd-shim-runc-v2", "runc", "ip", "busybox", "docker-registry", "skopeo", "htpasswd"]
    {
        if which(bin).is_none() {
            missing.push(bin.to_string());
        }
    }
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        if !Path::new("/usr/lib/cni").join(plugin).exists() {
            missing.push(format!("/usr/lib/cni/{plugin}"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("KEEL_E2E").as_deref() != Ok("1"),
        "KEEL_E2E=1 but this machine lacks {}: run scripts/setup.sh as root",
        missing.join(", ")
    );
    eprintln!("skipped: needs {}", missing.join(", "));
    false
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.exists())
}

/// The test images (built once per machine from busybox-static).
fn images() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("keel-test-images");
        if !dir.join("busybox.tar").exists() || !dir.join("entrypoint.tar").exists() {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-test-images.sh");
            let out = Command::new("bash").arg(&script).arg(&dir).output().expect("run build-test-images.sh");
            assert!(out.status.success(), "build-test-images.sh: {}", String::from_utf8_lossy(&out.stderr));
        }
        dir
    })
    .clone()
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A network namespace this test made (a node's), deleted on drop with all in it.
struct Netns {
    name: String,
}

impl Netns {
    fn create(prefix: &str) -> Netns {
        let name = format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        run("ip", &["netns", "add", &name]).unwrap();
        run("ip", &["-n", &name, "link", "set", "lo", "up"]).unwrap();
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `cmd` inside the namespace.
    fn exec(&self, cmd: &[&str]) -> Result<String, String> {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend(cmd);
        run("ip", &args)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A replica in this process with an admin client; its nodes are added with `node`.
struct Cluster {
    dir: tempfile::TempDir,
    replica: Option<TestReplica>,
    addr: String,
    pki: TestPki,
    admin: Client,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let (replica, addr, pki) = Box::pin(keel::harness::single_replica(&dir.path().join("r1"))).await.unwrap();
        let admin = Client::new(
            std::slice::from_ref(&addr),
            ClientAuth::Certificate(pki.admin.clone()),
            ClientConfig::default(),
        )
        .unwrap();
        Cluster { dir, replica: Some(replica), addr, pki, admin }
    }

    /// Node `name`, in a namespace of its own, with its agent started (a managed containerd,
    /// the test images imported) and its podCIDR given.
    async fn node(&self, name: &str) -> TestNode {
        let netns = Netns::create("keelt");
        let dir = self.dir.path().join(name);
        let mut cfg = AgentConfig::new(name, &dir.join("data"), vec![self.addr.clone()]);
        cfg.run_dir = dir.join("run");
        cfg.runtime = RuntimeKind::Containerd { socket: None };
        cfg.images_dir = Some(images());
        cfg.node_netns = Some(netns.path());
        cfg.restart_backoff = Duration::from_millis(500);
        cfg.kubelet_port = 0;
        cfg.log_driver = Some(PathBuf::from(env!("CARGO_BIN_EXE_keel")));
        // No pull leaves the machine: offline, unless a test maps a registry to its own.
        let registries = dir.join("registries.yaml");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&registries, "offline: true\n").unwrap();
        cfg.registries = Some(registries);
        // The node's certificate, as a join would give it.
        let creds = self.pki.ca.issue(&Identity::Node(name.into()), Duration::from_secs(3600), &[]).unwrap();
        creds.save(&cfg.data_dir.join("tls")).unwrap();
        let mut node = TestNode { name: name.into(), netns, cfg, running: None };
        node.start().await;
        let admin = self.admin.clone();
        eventually(&format!("node {name} has a podCIDR"), Duration::from_secs(20), || {
            let admin = admin.clone();
            let name = name.to_string();
            async move {
                match admin.get(Kind::Node, "", &name).await.ok()?.kind {
                    Some(pb::object::Kind::Node(n)) => n.spec.filter(|s| !s.pod_cidr.is_empty()).map(|_| ()),
                    _ => None,
                }
            }
        })
        .await;
        node
    }

    async fn stop(mut self) {
        if let Some(r) = self.replica.take() {
            r.stop().await.unwrap();
        }
    }
}

/// A node: its namespace, its agent's configuration and, while it runs, the agent.
struct TestNode {
    name: String,
    netns: Netns,
    cfg: AgentConfig,
    running: Option<agent::Running>,
}

impl TestNode {
    async fn start(&mut self) {
        self.running = Some(Box::pin(agent::start(self.cfg.clone())).await.unwrap());
    }

    /// Stops the agent and its containerd; the containers go on.
    async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    fn socket(&self) -> PathBuf {
        self.cfg.run_dir.join("containerd.sock")
    }

    /// What is left of pods on this node: containers in containerd, addresses in the
    /// host-local directory, pod namespaces in /run/netns, pod cgroups, pod directories.
    async fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(r) = &self.running {
            for c in r.runtime.containers().await.unwrap() {
                out.push(format!("container {}", c.id));
            }
        }
        let ipam = self.cfg.data_dir.join("ipam").join("keel");
        for e in std::fs::read_dir(&ipam).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.parse::<std::net::IpAddr>().is_ok() {
                out.push(format!("address {n}"));
            }
        }
        for uid in self.sandbox_uids() {
            if Path::new("/run/netns").join(format!("keel-{uid}")).exists() {
                out.push(format!("netns keel-{uid}"));
            }
            for d in keel::agent::pods::cgroup_dirs(&uid) {
                out.push(format!("cgroup {}", d.display()));
            }
        }
        for e in std::fs::read_dir(self.cfg.data_dir.join("pods")).into_iter().flatten().flatten() {
            out.push(format!("pod directory {}", e.path().display()));
        }
        out
    }

    /// The pods this node ever had a sandbox or directory for.
    fn sandbox_uids(&self) -> Vec<String> {
        let mut uids: Vec<String> = std::fs::read_dir(self.cfg.data_dir.join("cni"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".json").map(String::from))
            .collect();
        uids.extend(
            std::fs::read_dir(self.cfg.data_dir.join("pods"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string()),
        );
        uids
    }
}

impl Drop for TestNode {
    /// Whatever the test left: the agent's tasks and containerd stop with `running`; the
    /// containers its shims run are killed, then the shims; pod namespaces are unmounted and
    /// removed, pod cgroups removed, mounts under its directories detached. The node
    /// namespace goes with `netns`.
    fn drop(&mut self) {
        drop(self.running.take());
        let socket = self.socket().display().to_string();
        for pid in shims_of(&socket) {
            for child in children_of(pid) {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(child, libc::SIGKILL) };
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for uid in self.sandbox_uids() {
            let ns = Path::new("/run/netns").join(format!("keel-{uid}"));
            if ns.exists() {
                let _ = nix::mount::umount2(&ns, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_file(&ns);
            }
            for d in keel::agent::pods::cgroup_dirs(&uid) {
                let _ = Command::new("find").arg(&d).args(["-depth", "-type", "d", "-delete"]).status();
            }
        }
        let roots = [self.cfg.data_dir.display().to_string(), self.cfg.run_dir.display().to_string()];
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| roots.iter().any(|r| m.starts_with(r.as_str())))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The containerd-shim processes serving the containerd at `socket`.
fn shims_of(socket: &str) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|(_, _, cmd)| cmd.contains("containerd-shim") && cmd.contains(socket))
        .map(|p| p.0)
        .collect()
}

/// Every process below `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let all = processes();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for (c, parent, _) in &all {
            if *parent == p {
                out.push(*c);
                frontier.push(*c);
            }
        }
    }
    out
}

/// (pid, parent pid, command line) of every process.
fn processes() -> Vec<(i32, i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // The parent is the second field after the parenthesized command.
        let ppid =
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse().ok());
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if let Some(ppid) = ppid {
            out.push((pid, ppid, cmd));
        }
    }
    out
}

/// Parses one manifest.
fn manifest(yaml: &str) -> pb::Object {
    keel::api::manifest::parse_document("test.yaml", &keel::api::manifest::split(yaml)[0]).unwrap()
}

/// The pod `name` in `default`, if it exists.
async fn pod(admin: &Client, name: &str) -> Option<pb::Pod> {
    match admin.get_opt(Kind::Pod, "default", name).await.unwrap()?.kind {
        Some(pb::object::Kind::Pod(p)) => Some(p),
        _ => None,
    }
}

/// Waits until pod `name` satisfies `ok`, and returns it; the failure shows its last status.
async fn wait_pod(admin: &Client, name: &str, what: &str, limit: Duration, ok: impl Fn(&pb::Pod) -> bool) -> pb::Pod {
    let deadline = Instant::now() + limit;
    loop {
        let p = pod(admin, name).await;
        if let Some(p) = p.as_ref().filter(|p| ok(p)) {
            return p.clone();
        }
        assert!(
            Instant::now() < deadline,
            "pod {name}: {what}: not within {limit:?}; status: {:?}",
            p.and_then(|p| p.status)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn phase(p: &pb::Pod) -> &str {
    p.status.as_ref().map(|s| s.phase.as_str()).unwrap_or_default()
}

fn container_status<'a>(p: &'a pb::Pod, name: &str) -> Option<&'a pb::ContainerStatus> {
    p.status.as_ref()?.container_statuses.iter().find(|c| c.name == name)
}
