//! Real `keel server` processes on loopback, for benchmarks, the durability test and the
//! chaos suite: start, kill -9, stop/continue, restart, and find the leader.
//!
//! Everything binds to 127.0.0.1 ports picked by the kernel. Each node has its own data
//! directory and log file under the cluster's directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use crate::client::Client;
use crate::pki::{Ca, Credentials, Identity};

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Timeout(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// Waits until the replica at `addr` serves the default namespaces (it leads or follows a
/// leader, and the start-up creates went through).
pub async fn wait_default_namespaces(addr: &str, timeout: Duration, creds: &Credentials) -> Result<(), HarnessError> {
    let deadline = Instant::now() + timeout;
    let client = Client::with_certificate(&[addr.to_string()], Duration::from_secs(2), creds)
        .map_err(|e| HarnessError::Timeout(format!("bad address {addr}: {e}")))?;
    loop {
        let mut ready = true;
        for ns in crate::api::wellknown::DEFAULT_NAMESPACES {
            ready &= client.get(crate::api::kinds::Kind::Namespace, "", ns).await.is_ok();
        }
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Timeout(format!(
                "{addr} did not serve the default namespaces within {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A cluster CA made up front, for tests that start replicas with `--initial-cluster`
/// instead of `--cluster-init` and joins: it issues each replica's certificate and an
/// admin's.
pub struct TestPki {
    pub ca: Ca,
    pub admin: Credentials,
    /// One secrets key file for every replica of the cluster.
    pub secrets_key: String,
}

impl TestPki {
    pub fn new() -> Result<TestPki, HarnessError> {
        let pki = |e: crate::pki::PkiError| HarnessError::Timeout(format!("test PKI: {e}"));
        let ca = Ca::generate("test").map_err(pki)?;
        let admin = ca.issue(&Identity::Admin("admin".into()), Duration::from_secs(24 * 3600), &[]).map_err(pki)?;
        let dir = tempfile::tempdir().map_err(io("temporary directory"))?;
        let path = dir.path().join("secrets.key");
        crate::seal::Keyring::load_or_create(&path).map_err(pki)?;
        let secrets_key = std::fs::read_to_string(&path).map_err(io("read secrets key"))?;
        Ok(TestPki { ca, admin, secrets_key })
    }

    pub fn replica(&self, id: u64, addr: &str) -> Result<Credentials, HarnessError> {
        self.ca
            .issue(&Identity::Replica(id), Duration::from_secs(24 * 3600), &[addr.to_string()])
            .map_err(|e| HarnessError::Timeout(format!("test PKI: {e}")))
    }
}

/// An in-process replica with its controller manager, as `keel server` assembles them.
pub struct TestReplica {
    pub server: crate::server::Server,
    controllers: Option<crate::server::run::Controllers>,
}

impl std::ops::Deref for TestReplica {
    type Target = crate::server::Server;

    fn deref(&self) -> &crate::server::Server {
        &self.server
    }
}

impl TestReplica {
    /// Starts the controller manager beside `server` (with fast test timings).
    pub fn new(server: crate::server::Server) -> TestReplica {
        let mut config = crate::controllers::runtime::ManagerConfig::new("test");
        config.leader.lease_duration = Duration::from_secs(3);
        config.leader.renew_deadline = Duration::from_secs(2);
        config.leader.retry_period = Duration::from_millis(200);
        let controllers = crate::server::run::start_controllers(&server, "test", &[], Some(config));
        TestReplica { server, controllers: Some(controllers) }
    }

    /// Waits until the controller manager leads and its informers have synced.
    pub async fn controllers_ready(&self) {
        if let Some(c) = &self.controllers {
            c.ready().await;
        }
    }

    /// Stops the controllers (releasing their Lease), then the replica.
    pub async fn stop(mut self) -> Result<(), crate::server::ServerError> {
        if let Some(c) = self.controllers.take() {
            c.stop().await;
        }
        self.server.stop().await
    }
}

/// One in-process replica (a single-voter cluster) on a free 127.0.0.1 port, with its data
/// under `data_dir`, returned once it serves the default namespaces, with its CA (whose
/// `admin` credentials call it). Its controller manager runs beside it.
pub async fn single_replica(data_dir: &Path) -> Result<(TestReplica, String, TestPki), HarnessError> {
    single_replica_with(data_dir, crate::server::ServeConfig::default()).await
}

/// As [`single_replica`], serving with the limits of `serve`.
pub async fn single_replica_with(
    data_dir: &Path,
    serve: crate::server::ServeConfig,
) -> Result<(TestReplica, String, TestPki), HarnessError> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let listen = addr.parse().map_err(|e| HarnessError::Timeout(format!("bad address {addr}: {e}")))?;
    let pki = TestPki::new()?;
    let mut config = crate::store::StoreConfig::new(1, addr.clone(), data_dir);
    config.cache_bytes = 16 << 20;
    let members = [(1, crate::store::Member { addr: addr.clone(), name: "replica-1".into() })].into();
    let creds = pki.replica(1, &addr)?;
    let server =
        crate::server::Server::start_with(config, serve, listen, Some(members), crate::store::Faults::new(), &creds)
            .await
            .map_err(|e| HarnessError::Timeout(format!("replica failed to start: {e}")))?;
    wait_default_namespaces(&addr, Duration::from_secs(10), &pki.admin).await?;
    let replica = TestReplica::new(server);
    tokio::time::timeout(Duration::from_secs(10), replica.controllers_ready())
        .await
        .map_err(|_| HarnessError::Timeout("the controller manager did not start leading within 10s".into()))?;
    Ok((replica, addr, pki))
}

/// Polls `f` every 50 ms until it gives a value; a test fails (panics) with `what` once
/// `limit` has passed without one.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free port on 127.0.0.1 (the kernel picks it; we release it for the child to bind).
pub fn free_port() -> Result<u16, HarnessError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("bind 127.0.0.1:0"))?;
    Ok(l.local_addr().map_err(io("local addr"))?.port())
}

/// Sends a signal to a process by pid through kill(1), so no libc binding is needed.
pub fn signal(pid: u32, sig: &str) -> Result<(), HarnessError> {
    let st = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().map_err(io("run kill"))?;
    if !st.success() {
        return Err(HarnessError::Io { what: format!("kill -{sig} {pid}"), source: std::io::Error::other("failed") });
    }
    Ok(())
}

pub struct Node {
    pub id: u64,
    pub addr: String,
    /// What peers reach it at, when not `addr` (its fault proxy).
    pub advertise: Option<String>,
    /// The address its peer connections leave from (see `netfault`).
    pub source_ip: Option<std::net::IpAddr>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct ProcCluster {
    pub exe: PathBuf,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub extra_args: Vec<String>,
    /// The cluster CA; each replica's certificate is written to `<data_dir>/tls` up front.
    pub pki: TestPki,
    keep_dir: bool,
}

impl ProcCluster {
    /// Starts `n` replicas as one new cluster under `dir`.
    pub fn start(exe: &Path, dir: &Path, n: usize, extra_args: &[String]) -> Result<ProcCluster, HarnessError> {
        let mut c = ProcCluster::prepare(exe, dir, n, extra_args)?;
        for i in 0..n {
            c.spawn(i)?;
        }
        Ok(c)
    }

    /// Starts `n` replicas whose peer traffic goes through fault proxies (see `netfault`):
    /// each advertises its proxy and sends from its own loopback address.
    pub async fn start_behind_proxies(
        exe: &Path,
        dir: &Path,
        n: usize,
        extra_args: &[String],
    ) -> Result<(ProcCluster, crate::netfault::FaultNet), HarnessError> {
        let mut c = ProcCluster::prepare(exe, dir, n, extra_args)?;
        let targets: Vec<std::net::SocketAddr> = c
            .nodes
            .iter()
            .map(|n| n.addr.parse().map_err(|e| HarnessError::Timeout(format!("bad address {}: {e}", n.addr))))
            .collect::<Result<_, _>>()?;
        let net = crate::netfault::FaultNet::start(&targets).await.map_err(io("start the fault proxies"))?;
        for (i, node) in c.nodes.iter_mut().enumerate() {
            node.advertise = Some(net.proxies[i].to_string());
            node.source_ip = Some(crate::netfault::source_ip(i));
        }
        for i in 0..n {
            c.spawn(i)?;
        }
        Ok((c, net))
    }

    fn prepare(exe: &Path, dir: &Path, n: usize, extra_args: &[String]) -> Result<ProcCluster, HarnessError> {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = i as u64 + 1;
            let port = free_port()?;
            nodes.push(Node {
                id,
                addr: format!("127.0.0.1:{port}"),
                advertise: None,
                source_ip: None,
                data_dir: dir.join(format!("node{id}")),
                log: dir.join(format!("node{id}.log")),
                child: None,
            });
        }
        let pki = TestPki::new()?;
        for n in &nodes {
            let write = |e: crate::pki::PkiError| HarnessError::Timeout(format!("write certificates: {e}"));
            pki.replica(n.id, &n.addr)?.save(&n.data_dir.join("tls")).map_err(write)?;
            crate::pki::write_private(&n.data_dir.join("secrets.key"), &pki.secrets_key).map_err(write)?;
        }
        Ok(ProcCluster {
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            nodes,
            extra_args: extra_args.to_vec(),
            pki,
            keep_dir: false,
        })
    }

    pub fn initial_cluster(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.advertise.as_deref().unwrap_or(&n.addr)))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// Keeps the directory (data and logs) when the cluster is dropped.
    pub fn keep(&mut self) {
        self.keep_dir = true;
    }

    /// (Re)starts node `i` on its address and data directory.
    pub fn spawn(&mut self, i: usize) -> Result<(), HarnessError> {
        let cluster = self.initial_cluster();
        let n = &mut self.nodes[i];
        if n.child.is_some() {
            return Ok(());
        }
        let log =
            File::options().create(true).append(true).open(&n.log).map_err(io(format!("open {}", n.log.display())))?;
        let err = log.try_clone().map_err(io("clone log handle"))?;
        let mut extra = Vec::new();
        if let Some(a) = &n.advertise {
            extra.extend(["--advertise".to_string(), a.clone()]);
        }
        if let Some(ip) = n.source_ip {
            extra.extend(["--peer-source-ip".to_string(), ip.to_string()]);
        }
        let child = Command::new(&self.exe)
            .arg("server")
            .arg("--id")
            .arg(n.id.to_string())
            .arg("--name")
            .arg(format!("r{}", n.id))
            .arg("--listen")
            .arg(&n.addr)
            .arg("--data-dir")
            .arg(&n.data_dir)
            .arg("--initial-cluster")
            .arg(&cluster)
            .args(&extra)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(io(format!("spawn {}", self.exe.display())))?;
        n.child = Some(child);
        Ok(())
    }

    /// kill -9 node `i` and reap it.
    pub fn kill(&mut self, i: usize) -> Result<(), HarnessError> {
        if let Some(mut c) = self.nodes[i].child.take() {
            c.kill().map_err(io("kill -9"))?;
            c.wait().map_err(io("wait"))?;
        }
        Ok(())
    }

    /// Stops node `i` as an operator would (SIGTERM), and kill -9 if it is still running after
    /// `grace`.
    pub async fn stop(&mut self, i: usize, grace: Duration) -> Result<(), HarnessError> {
        let Some(pid) = self.nodes[i].pid() else { return Ok(()) };
        signal(pid, "TERM")?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited(i).is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill(i)
    }

    /// SIGSTOP (pause) or SIGCONT (resume) node `i`.
    pub fn pause(&self, i: usize, paused: bool) -> Result<(), HarnessError> {
        match self.nodes[i].pid() {
            Some(pid) => signal(pid, if paused { "STOP" } else { "CONT" }),
            None => Ok(()),
        }
    }

    /// Whether node `i` exited by itself (e.g. refused to start). Returns its exit status.
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let c = self.nodes[i].child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => {
                self.nodes[i].child = None;
                Some(st)
            }
            _ => None,
        }
    }

    pub fn client(&self, timeout: Duration) -> Client {
        // Addresses come from our own formatting, so they always parse.
        Client::with_certificate(&self.addrs(), timeout, &self.pki.admin)
            .unwrap_or_else(|e| panic!("harness addresses are valid: {e}"))
    }

    /// Waits until a running replica reports itself leader and every running replica agrees.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<usize, HarnessError> {
        let client = self.client(Duration::from_millis(500));
        let deadline = Instant::now() + timeout;
        loop {
            let mut leader = None;
            let mut seen = Vec::new();
            for (i, n) in self.nodes.iter().enumerate() {
                if !n.is_running() {
                    continue;
                }
                match client.status_of(i).await {
                    Ok(s) => {
                        if s.state == "Leader" {
                            leader = Some((i, s.id));
                        }
                        seen.push(Some(s.leader_id));
                    }
                    Err(_) => seen.push(None),
                }
            }
            // Every running replica is up and names the same leader, which says it leads.
            if let Some((i, id)) = leader {
                if seen.iter().all(|s| *s == Some(id)) {
                    return Ok(i);
                }
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(format!(
                    "no agreed leader within {timeout:?}; logs in {}",
                    self.dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for an agreed leader and for every running replica to hold the leader's whole log
    /// (an idle, healthy cluster). Returns the leader's index.
    pub async fn wait_caught_up(&self, timeout: Duration) -> Result<usize, HarnessError> {
        let deadline = Instant::now() + timeout;
        let client = self.client(Duration::from_millis(500));
        loop {
            let leader = self.wait_leader(deadline.saturating_duration_since(Instant::now())).await?;
            let want = client.status_of(leader).await.map(|s| s.last_log_index).unwrap_or(u64::MAX);
            let mut all = true;
            let mut seen = Vec::new();
            for (i, n) in self.nodes.iter().enumerate() {
                if !n.is_running() {
                    continue;
                }
                let applied = client.status_of(i).await.map(|s| s.applied_index).unwrap_or(0);
                seen.push(format!("replica {} applied {applied}", n.id));
                if applied < want {
                    all = false;
                }
            }
            if all {
                return Ok(leader);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(format!(
                    "replicas did not catch up within {timeout:?}: leader {} has log index {want}; {}",
                    leader + 1,
                    seen.join(", ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills every node.
    pub fn kill_all(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.pause(i, false);
            let _ = self.kill(i);
        }
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        self.kill_all();
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
