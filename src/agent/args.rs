//! `keel agent`'s flags.

use std::path::PathBuf;

use super::{AgentConfig, RuntimeKind};

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// Replica to join through and talk to (host:port or https://host:port).
    #[arg(long, env = "KEEL_SERVER_URL")]
    pub server: String,
    /// An agent join token; needed only for the first start (or after the node certificate
    /// expired).
    #[arg(long, env = "KEEL_TOKEN")]
    pub token: Option<String>,
    /// The node's name (default: the hostname).
    #[arg(long, env = "KEEL_NODE_NAME")]
    pub name: Option<String>,
    #[arg(long, default_value = "/var/lib/keel-agent", env = "KEEL_AGENT_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The address other nodes reach this one at.
    #[arg(long, default_value = "127.0.0.1")]
    pub node_ip: String,
    /// The container runtime: `containerd` (the real one) or `fake` (nothing runs: a hollow
    /// node for scale tests).
    #[arg(long, default_value = "containerd", value_parser = ["containerd", "fake"])]
    pub runtime: String,
    /// An existing containerd's socket; without it the agent starts and manages its own.
    #[arg(long, env = "KEEL_CONTAINERD_SOCKET")]
    pub containerd_socket: Option<PathBuf>,
    /// Runtime state of the managed containerd (its socket, its tasks).
    #[arg(long, default_value = "/run/keel-agent")]
    pub run_dir: PathBuf,
    /// Image tarballs (OCI or docker-archive) imported at start and whenever one appears:
    /// how images reach a node that cannot reach a registry.
    #[arg(long)]
    pub images_dir: Option<PathBuf>,
    /// Where images are pulled from: mirrors, credentials and `offline` (k3s's
    /// registries.yaml format). Default: /etc/keel/registries.yaml when it exists.
    #[arg(long)]
    pub registries: Option<PathBuf>,
    /// The pod network of the whole cluster; routed nowhere outside the nodes.
    #[arg(long, default_value = "10.42.0.0/16")]
    pub cluster_cidr: String,
    /// The Service address range; routed nowhere outside the nodes.
    #[arg(long, default_value = "10.43.0.0/16")]
    pub service_cidr: String,
    /// Where the CNI plugins are.
    #[arg(long, default_value = "/usr/lib/cni")]
    pub cni_bin_dir: PathBuf,
    /// The pods' bridge on this node.
    #[arg(long, default_value = "keel0")]
    pub bridge: String,
    /// Run the pod network in this network namespace instead of the agent's own (a node
    /// simulated in a namespace).
    #[arg(long)]
    pub node_netns: Option<PathBuf>,
    /// The first wait before a crashed container restarts; it doubles up to five minutes.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub restart_backoff: std::time::Duration,
    /// The port replicas call for logs and exec (mutual TLS; replicas only).
    #[arg(long, default_value_t = 10250)]
    pub kubelet_port: u16,
    /// A container's log file is rotated at this size (bytes, or with Ki/Mi/Gi).
    #[arg(long, default_value = "10Mi", value_parser = parse_bytes)]
    pub container_log_max_size: u64,
    /// How many log files of a container are kept (the current one included).
    #[arg(long, default_value_t = 5)]
    pub container_log_max_files: u32,
    /// Resources kept from pods, e.g. cpu=500m,memory=512Mi,ephemeral-storage=1Gi,pods=10
    /// (the Node's allocatable is its capacity minus these).
    #[arg(long, default_value = "")]
    pub reserved: String,
    /// When the node is under pressure (MemoryPressure, DiskPressure, PIDPressure), in the
    /// kubelet's syntax.
    #[arg(long, default_value = crate::agent::pressure::DEFAULT_EVICTION_HARD)]
    pub eviction_hard: String,
    /// How often the node's Lease is renewed and its pressure read (the status is reported
    /// every sixth time, or at once when a pressure condition changes).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat: std::time::Duration,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    crate::api::quantity::Quantity::parse(s).map(|q| (q.milli / 1000) as u64).map_err(|e| format!("{s:?}: {e}"))
}

impl AgentArgs {
    /// The agent's configuration; `hostname` names the node without `--name`.
    pub fn config(self, hostname: String) -> AgentConfig {
        let mut cfg = AgentConfig::new(&self.name.unwrap_or(hostname), &self.data_dir, vec![self.server]);
        cfg.token = self.token;
        cfg.node_ip = self.node_ip;
        cfg.run_dir = self.run_dir;
        cfg.runtime = match self.runtime.as_str() {
            "fake" => RuntimeKind::Fake,
            _ => RuntimeKind::Containerd { socket: self.containerd_socket },
        };
        cfg.images_dir = self.images_dir;
        cfg.registries =
            self.registries.or_else(|| Some(PathBuf::from("/etc/keel/registries.yaml")).filter(|p| p.exists()));
        cfg.cluster_cidr = self.cluster_cidr;
        cfg.service_cidr = self.service_cidr;
        cfg.cni_bin_dir = self.cni_bin_dir;
        cfg.bridge = self.bridge;
        cfg.node_netns = self.node_netns;
        cfg.restart_backoff = self.restart_backoff;
        cfg.kubelet_port = self.kubelet_port;
        cfg.log_max_size = self.container_log_max_size;
        cfg.log_max_files = self.container_log_max_files;
        cfg.reserved = self.reserved;
        cfg.eviction_hard = self.eviction_hard;
        cfg.heartbeat = self.heartbeat;
        cfg
    }
}
