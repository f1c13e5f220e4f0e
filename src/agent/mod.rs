//! The node agent (`keel agent`), Keel's kubelet: it joins with a token once, then
//! authenticates with the node certificate it got; keeps its Node and Lease alive (`node`);
//! runs the pods bound to it (`pods`) through a container runtime (`runtime`: containerd, or
//! a fake for hollow nodes) and the pod network (`network`: CNI plugins, pinned namespaces).
//! It reaches the cluster only through `client`.

pub mod args;
pub mod kubelet;
pub mod logs;
pub mod network;
pub mod node;
pub mod pods;
pub mod pressure;
pub mod registries;
pub mod runtime;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::client::informer::{InformerFactory, InformerOptions};
use crate::client::{Client, ClientAuth, ClientConfig, ClientError};
use crate::pki::{self, Credentials, Identity, LiveCredentials, TokenRole};

pub use node::Agent;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    #[error("join through {seed}: {source}")]
    Join {
        seed: String,
        #[source]
        source: crate::client::join::JoinError,
    },
    #[error("{0}")]
    Setup(String),
}

/// Which container runtime runs the pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeKind {
    /// containerd at this socket, or (None) one the agent starts and manages itself.
    Containerd { socket: Option<PathBuf> },
    /// Nothing runs: a hollow node for scale tests.
    Fake,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub data_dir: PathBuf,
    /// Runtime state (the managed containerd's socket and state).
    pub run_dir: PathBuf,
    /// Replica addresses (host:port); the first one is used to join, all of them after.
    pub servers: Vec<String>,
    pub token: Option<String>,
    /// The address other nodes reach this one at.
    pub node_ip: String,
    pub runtime: RuntimeKind,
    /// Image tarballs imported at start and whenever new ones appear.
    pub images_dir: Option<PathBuf>,
    /// The registries configuration (mirrors, credentials, offline); none: pull from each
    /// image's own registry.
    pub registries: Option<PathBuf>,
    pub cluster_cidr: String,
    pub service_cidr: String,
    pub cni_bin_dir: PathBuf,
    pub bridge: String,
    /// Run the CNI plugins and node routes in this network namespace rather than the
    /// agent's own (a test's node namespace).
    pub node_netns: Option<PathBuf>,
    /// The first wait before a crashed container restarts (doubling up to five minutes).
    pub restart_backoff: Duration,
    /// The keel binary containerd's shims run to write container logs (`keel log-driver`).
    pub log_driver: Option<PathBuf>,
    /// A container's log file is rotated at this size; this many files are kept.
    pub log_max_size: u64,
    pub log_max_files: u32,
    /// The port replicas call for logs and exec (mutual TLS, replicas only).
    pub kubelet_port: u16,
    /// Resources kept from pods: `cpu=500m,memory=512Mi` (allocatable = capacity - this).
    pub reserved: String,
    /// When the node is under pressure: the kubelet's `--eviction-hard` syntax.
    pub eviction_hard: String,
    /// How often the Lease is renewed and the pressure conditions read.
    pub heartbeat: Duration,
}

impl AgentConfig {
    /// Defaults for node `name` with its data in `data_dir`.
    pub fn new(name: &str, data_dir: &Path, servers: Vec<String>) -> AgentConfig {
        AgentConfig {
            name: name.to_string(),
            data_dir: data_dir.to_path_buf(),
            run_dir: PathBuf::from("/run/keel-agent"),
            servers,
            token: None,
            node_ip: "127.0.0.1".into(),
            runtime: RuntimeKind::Containerd { socket: None },
            images_dir: None,
            registries: None,
            cluster_cidr: "10.42.0.0/16".into(),
            service_cidr: "10.43.0.0/16".into(),
            cni_bin_dir: PathBuf::from("/usr/lib/cni"),
            bridge: "keel0".into(),
            node_netns: None,
            restart_backoff: Duration::from_secs(10),
            // This program, when it is keel (a test binary is not).
            log_driver: std::env::current_exe()
                .ok()
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == "keel")),
            log_max_size: 10 << 20,
            log_max_files: 5,
            kubelet_port: 10250,
            reserved: String::new(),
            eviction_hard: pressure::DEFAULT_EVICTION_HARD.to_string(),
            heartbeat: Duration::from_secs(10),
        }
    }
}

/// The node's credentials: from its data directory while the certificate is valid, else by
/// joining with the token (re-attesting with the same name).
pub async fn credentials(cfg: &AgentConfig) -> Result<Credentials, AgentError> {
    let tls = cfg.data_dir.join("tls");
    let mut key = None;
    if Credentials::exists(&tls) {
        let creds = Credentials::load(&tls)?;
        let left = pki::not_after(&creds.cert_pem)? - time::OffsetDateTime::now_utc().unix_timestamp();
        if left > 0 {
            match creds.identity() {
                Some(Identity::Node(n)) if n == cfg.name => return Ok(creds),
                other => {
                    return Err(AgentError::Setup(format!(
                        "{}/tls.crt is for {other:?}, not node {:?}; use another --data-dir or --name",
                        tls.display(),
                        cfg.name
                    )))
                }
            }
        }
        // Re-attest with the same key: the node stays the node it was.
        key = Some(creds.key_pem.clone());
        if cfg.token.is_none() {
            return Err(AgentError::Setup(format!(
                "the node certificate in {} expired; start the agent once with --token (a fresh agent join token) to re-attest",
                tls.display()
            )));
        }
    }
    let token = cfg
        .token
        .as_deref()
        .ok_or_else(|| AgentError::Setup("this node has no certificate yet: give --token to join".into()))?;
    let seed = cfg.servers.first().ok_or_else(|| AgentError::Setup("no --server to join through".into()))?;
    let (creds, _) = crate::client::join::join_with_key(seed, token, TokenRole::Agent, &cfg.name, "", key.as_deref())
        .await
        .map_err(|source| AgentError::Join { seed: seed.clone(), source })?;
    creds.save(&tls)?;
    Ok(creds)
}

/// Imports every tarball in `dir` not imported before (by name, size and modification
/// time); returns how many were.
async fn import_images(rt: &dyn runtime::Runtime, dir: &Path, seen: &mut std::collections::HashSet<String>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "tar") {
            continue;
        }
        let stamp =
            e.metadata().map(|m| format!("{}:{}:{:?}", path.display(), m.len(), m.modified().ok())).unwrap_or_default();
        if !seen.insert(stamp) {
            continue;
        }
        match rt.import(&path).await {
            Ok(images) => {
                n += 1;
                for i in images {
                    tracing::info!(image = i.name, from = %path.display(), "image imported");
                }
            }
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "image not imported"),
        }
    }
    n
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once `stop` says true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A running agent: its loops and what it started.
pub struct Running {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
    managed: Option<runtime::managed::Managed>,
    pub runtime: Arc<dyn runtime::Runtime>,
    pub network: Option<network::NodeNetwork>,
}

impl Running {
    /// Stops the loops and a managed containerd; running containers go on.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::timeout_at(deadline, self.tasks.join_next()).await.ok().flatten().is_some() {}
        self.tasks.abort_all();
        if let Some(m) = self.managed.take() {
            m.stop().await;
        }
    }
}

type Opened = (Arc<dyn runtime::Runtime>, Option<runtime::managed::Managed>, Option<network::NodeNetwork>);

/// The runtime (a managed containerd started, or the one at the socket) and the pod network
/// of the node `cfg` describes.
async fn open_runtime(cfg: &AgentConfig) -> Result<Opened, AgentError> {
    match &cfg.runtime {
        RuntimeKind::Fake => Ok((Arc::new(runtime::fake::FakeRuntime::new()), None, None)),
        RuntimeKind::Containerd { socket } => {
            let (socket, managed) = match socket {
                Some(s) => (s.clone(), None),
                None => {
                    let paths = runtime::managed::ManagedPaths::new(&cfg.data_dir, &cfg.run_dir);
                    let socket = paths.socket.clone();
                    (socket, Some(runtime::managed::Managed::start(paths)?))
                }
            };
            let mut rt = runtime::containerd::Containerd::connect(&socket, Duration::from_secs(30)).await?;
            if let Some(exe) = &cfg.log_driver {
                rt = rt.with_log_driver(exe.clone(), cfg.log_max_size, cfg.log_max_files);
            }
            let net = network::NodeNetwork {
                cni: network::Cni {
                    bin_dir: cfg.cni_bin_dir.clone(),
                    state_dir: cfg.data_dir.join("cni"),
                    ipam_dir: cfg.data_dir.join("ipam"),
                    bridge: cfg.bridge.clone(),
                    host_netns: cfg.node_netns.clone(),
                },
                cluster_cidr: cfg.cluster_cidr.clone(),
                service_cidr: cfg.service_cidr.clone(),
            };
            Ok((Arc::new(rt), managed, Some(net)))
        }
    }
}

/// What `reset` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reset {
    pub containers: usize,
    pub sandboxes: usize,
    pub pod_dirs: usize,
}

/// Removes everything the agent made on this node while it does not run: every container
/// (killed), every pod's network attachment and namespace, pod volumes and directories, pod
/// cgroups, the routes and the bridge. The node's data (its certificate, its images) stays.
pub async fn reset(cfg: &AgentConfig) -> Result<Reset, AgentError> {
    let (runtime, managed, network) = open_runtime(cfg).await?;
    let mut out = Reset::default();
    let result = async {
        for c in runtime.containers().await? {
            runtime.remove(&c.id).await?;
            out.containers += 1;
        }
        if let Some(net) = &network {
            for uid in net.sandboxes() {
                net.detach(&uid).await?;
                out.sandboxes += 1;
            }
            net.teardown().await?;
        }
        let pods = cfg.data_dir.join("pods");
        for e in std::fs::read_dir(&pods).into_iter().flatten().flatten() {
            pods::volumes::tear_down(&e.path()).map_err(AgentError::Setup)?;
            std::fs::remove_dir_all(e.path())
                .map_err(|err| AgentError::Setup(format!("{}: {err}", e.path().display())))?;
            pods::remove_cgroups(&e.file_name().to_string_lossy()).map_err(AgentError::Setup)?;
            out.pod_dirs += 1;
        }
        Ok::<_, AgentError>(())
    }
    .await;
    if let Some(m) = managed {
        m.stop().await;
    }
    result.map(|_| out)
}

/// Starts the agent: credentials, the Node, the runtime, the pod network, the pod workers.
pub async fn start(cfg: AgentConfig) -> Result<Running, AgentError> {
    // Flags first: a bad one stops the agent before it touches anything.
    let thresholds = pressure::Thresholds::parse(&cfg.eviction_hard)
        .map_err(|e| AgentError::Setup(format!("--eviction-hard: {e}")))?;
    let reserved =
        pressure::parse_reserved(&cfg.reserved).map_err(|e| AgentError::Setup(format!("--reserved: {e}")))?;
    let creds = credentials(&cfg).await?;
    let live = LiveCredentials::new(creds);
    let config = ClientConfig { connect_timeout: Duration::from_secs(2), ..ClientConfig::default() };
    let client = Client::new(&cfg.servers, ClientAuth::Live(live.clone()), config)?;
    let mut agent = Agent::new(cfg.clone(), live.clone(), client.clone());
    agent.set_pressure(thresholds, reserved);
    let (runtime, managed, network) = open_runtime(&cfg).await?;
    if let Some(net) = &network {
        net.install_routes().await?;
    }
    agent.set_runtime_version(runtime.version().await?);
    agent.set_runtime(runtime.clone());
    let informers = InformerFactory::new(client.clone(), InformerOptions::default());
    let mut pod_config = pods::PodConfig::new(&cfg.name, &cfg.node_ip, cfg.data_dir.join("pods"));
    pod_config.backoff = cfg.restart_backoff;
    if let Some(path) = &cfg.registries {
        pod_config.registries = std::sync::Arc::new(registries::Registries::load(path).map_err(AgentError::Setup)?);
    }
    let workers = pods::PodWorkers::new(client, &informers, runtime.clone(), network.clone(), pod_config);
    let addr: std::net::SocketAddr = format!("{}:{}", cfg.node_ip, cfg.kubelet_port)
        .parse()
        .map_err(|e| AgentError::Setup(format!("--node-ip {:?}: {e}", cfg.node_ip)))?;
    let (bound, kubelet) = kubelet::serve(addr, live, workers.clone(), runtime.clone(), cfg.log_max_files)
        .await
        .map_err(AgentError::Setup)?;
    agent.set_kubelet_port(bound.port());
    // The images there before the Node is reported and the pods start: the Node lists them,
    // and no pod waits for one it could have.
    let mut seen = std::collections::HashSet::new();
    if let Some(dir) = &cfg.images_dir {
        import_images(runtime.as_ref(), dir, &mut seen).await;
    }
    agent.register().await.map_err(|e| AgentError::Setup(format!("register node {}: {e}", cfg.name)))?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    {
        let mut rx = stop_rx.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = agent.run() => {}
                _ = stopped(&mut rx) => {}
            }
        });
    }
    if let Some(dir) = cfg.images_dir.clone() {
        let (rt, mut rx) = (runtime.clone(), stop_rx.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stopped(&mut rx) => return,
                }
                import_images(rt.as_ref(), &dir, &mut seen).await;
            }
        });
    }
    let mut rx = stop_rx.clone();
    tasks.spawn(workers.run(stop_rx));
    tasks.spawn(async move {
        // The server goes when the agent stops (or this task is aborted).
        let _server = AbortOnDrop(kubelet);
        stopped(&mut rx).await;
    });
    Ok(Running { stop, tasks, managed, runtime, network })
}

/// `keel agent`: start, then run until SIGINT or SIGTERM.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let name = cfg.name.clone();
    let running = start(cfg).await?;
    println!("Node {name} registered.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| AgentError::Setup(format!("SIGTERM handler: {e}")))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    running.stop().await;
    Ok(())
}
