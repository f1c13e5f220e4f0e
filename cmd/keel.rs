//! `keel`: a control-plane replica (`keel server`), a node agent (`keel agent`), a whole
//! single-machine cluster (`keel up`, `keel down`) and the process-level benchmarks. It parses flags and calls the library; nothing else.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use keel::server::bootstrap::BootstrapOptions;
use keel::server::run::ServerOptions;
use keel::server::ServeConfig;
use keel::store::{Member, StoreConfig};

// glibc malloc showed up as ~12% of CPU under write load; mimalloc is a drop-in.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "keel", version, about = "Keel control plane")]
struct Cli {
    /// Threads of the async runtime (default: one per core).
    #[arg(long, global = true, env = "KEEL_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a control-plane replica.
    Server(Box<ServerArgs>),
    /// Manage this replica's secrets key file (<data-dir>/secrets.key).
    #[command(subcommand)]
    SecretsKey(SecretsKeyCommand),
    /// Run a node agent: join with a token once, register the Node, run its pods.
    Agent(Box<keel::agent::args::AgentArgs>),
    /// Bring up a whole cluster on this machine (a replica, an agent, a managed containerd)
    /// in the background, with its defaults.
    Up(Box<keel::up::UpArgs>),
    /// Stop what `keel up` started and remove what it made (`--purge`: its data too).
    Down(keel::up::DownArgs),
    /// containerd's logging binary for a container's output (started by its shim).
    #[command(hide = true)]
    LogDriver { config: String },
    /// Run a benchmark against real processes on loopback.
    #[command(subcommand)]
    Bench(keel::bench::BenchCommand),
}

#[derive(Subcommand)]
enum SecretsKeyCommand {
    /// Put a new key first: Secrets written after the next start are sealed with it. Copy
    /// the file to every replica, restart them, then `keelctl cluster reencrypt-secrets`.
    Rotate {
        #[arg(long, default_value = "/var/lib/keel", env = "KEEL_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Args)]
struct ServerArgs {
    /// This replica's id, for --cluster-init (default 1) and --initial-cluster. A joining
    /// replica is given one; a restarted replica reads it from its certificate.
    #[arg(long, env = "KEEL_ID")]
    id: Option<u64>,
    /// This replica's name, unique in the cluster and bound to its key (default: the hostname).
    #[arg(long, env = "KEEL_NAME")]
    name: Option<String>,
    /// Join the cluster of this replica (host:port or https://host:port) with --token.
    #[arg(long, env = "KEEL_SERVER_URL", requires = "token")]
    server: Option<String>,
    /// A server join token (K1<ca-hash>::server::<id>.<secret>), from `keelctl token create
    /// --role server` or <data-dir>/token of the first replica.
    #[arg(long, env = "KEEL_TOKEN")]
    token: Option<String>,
    /// Address to serve gRPC on.
    #[arg(long, default_value = "127.0.0.1:7001", env = "KEEL_LISTEN")]
    listen: SocketAddr,
    /// Address peers reach this replica at (defaults to --listen).
    #[arg(long)]
    advertise: Option<String>,
    #[arg(long, default_value = "/var/lib/keel", env = "KEEL_DATA_DIR")]
    data_dir: PathBuf,
    /// Start a new cluster: a new CA, this replica's certificate, an admin configuration
    /// (its path is printed) and join tokens. A plain `keel server` on an empty data
    /// directory does the same.
    #[arg(long)]
    cluster_init: bool,
    /// Voters of a new cluster, as id=host:port,... for a cluster whose certificates were
    /// provisioned beforehand (each replica's in <data-dir>/tls). Every listed replica
    /// starts with the same list; a replica with existing data ignores it.
    #[arg(long, conflicts_with_all = ["cluster_init", "server"])]
    initial_cluster: Option<String>,
    /// With --cluster-init: start the new cluster from this backup (`keelctl cluster snapshot
    /// save`), at this replica's address.
    #[arg(long, requires = "cluster_init")]
    restore: Option<PathBuf>,
    /// Quorum recovery, on the most up-to-date survivor (see `keelctl cluster recover
    /// --plan`), stopped: make it the only voter, keeping all its data, in a new cluster
    /// epoch that fences the old members out. Then join new replicas to it.
    #[arg(long, conflicts_with_all = ["cluster_init", "server", "initial_cluster"])]
    force_new_cluster: bool,
    /// With --cluster-init: how long replica and node certificates are valid (they renew
    /// when a third is left), e.g. 365d, 24h, 30s.
    #[arg(long, default_value = "365d", value_parser = parse_lifetime)]
    cert_lifetime: Duration,
    /// The local address that connections to peers leave from (the chaos suite's fault
    /// proxies tell replicas apart by it).
    #[arg(long)]
    peer_source_ip: Option<std::net::IpAddr>,
    /// Serve Prometheus metrics over HTTPS (client certificate required) on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Take a verified snapshot (a backup file) this often while leading; 0 turns it off.
    #[arg(long, default_value = "12h", value_parser = parse_duration)]
    snapshot_interval: Duration,
    /// Scheduled snapshots kept.
    #[arg(long, default_value_t = 5)]
    snapshot_retention: usize,
    /// Where scheduled snapshots go (default <data-dir>/snapshots).
    #[arg(long)]
    snapshot_dir: Option<PathBuf>,
    /// The recovery key file a sealed backup was made with.
    #[arg(long, requires = "restore")]
    recovery_key: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    heartbeat_ms: u64,
    #[arg(long, default_value_t = 100)]
    election_timeout_min_ms: u64,
    #[arg(long, default_value_t = 200)]
    election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries.
    #[arg(long, default_value_t = 10_000)]
    snapshot_every: u64,
    /// Log entries kept after a snapshot.
    #[arg(long, default_value_t = 1_000)]
    keep_logs: u64,
    /// Events kept for watches to resume from.
    #[arg(long, default_value_t = 100_000)]
    watch_history: usize,
    #[arg(long, default_value_t = 5_000)]
    write_timeout_ms: u64,
    /// Transactions gathered into one log entry at most (group commit).
    #[arg(long, default_value_t = 512)]
    max_batch: usize,
    /// Gathered log entries proposed at once.
    #[arg(long, default_value_t = 1)]
    max_in_flight: usize,
    /// How long the leader keeps a learner it does not hear from.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    learner_timeout: Duration,
    /// Requests this replica works on at once; more are refused with RESOURCE_EXHAUSTED
    /// and a retry hint (kube-apiserver's --max-requests-inflight).
    #[arg(long, default_value_t = 400)]
    max_requests_inflight: usize,
    /// Of those, how many one client (certificate or token) may hold.
    #[arg(long, default_value_t = 200)]
    max_requests_inflight_per_client: usize,
    /// Watches one client may hold open on this replica.
    #[arg(long, default_value_t = 1000)]
    max_watches_per_client: usize,
    /// The longest a request (not a watch) may take.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Controller manager election: how long a Lease not renewed stays its holder's.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_elect_lease_duration: Duration,
    /// How long the holder keeps leading without renewing (less than the lease duration).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    leader_elect_renew_deadline: Duration,
    /// How often candidates try to acquire or renew.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    leader_elect_retry_period: Duration,
    /// The pod network of the cluster; each Node gets a block of it as its podCIDR.
    #[arg(long, default_value = "10.42.0.0/16")]
    cluster_cidr: String,
    /// The prefix length of each Node's block of the cluster CIDR.
    #[arg(long, default_value_t = 24)]
    node_cidr_mask_size: u8,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    keel::api::duration::parse(s).map_err(|e| e.to_string())
}

fn parse_cluster(s: &str) -> anyhow::Result<BTreeMap<u64, Member>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (id, addr) =
            part.split_once('=').with_context(|| format!("--initial-cluster: {part:?} is not id=host:port"))?;
        let id: u64 = id.trim().parse().with_context(|| format!("--initial-cluster: {id:?} is not a replica id"))?;
        if id == 0 {
            bail!("--initial-cluster: replica id 0 is reserved");
        }
        out.insert(id, Member { addr: addr.trim().to_string(), name: format!("replica-{id}") });
    }
    if out.is_empty() {
        bail!("--initial-cluster is empty");
    }
    Ok(out)
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(10) {
        return Err(format!("{s:?}: a certificate must last at least 10s"));
    }
    Ok(d)
}

async fn server(a: ServerArgs) -> anyhow::Result<()> {
    if a.leader_elect_renew_deadline >= a.leader_elect_lease_duration {
        bail!("--leader-elect-renew-deadline must be shorter than --leader-elect-lease-duration");
    }
    let advertise = a.advertise.clone().unwrap_or_else(|| a.listen.to_string());
    let bootstrap = BootstrapOptions {
        data_dir: a.data_dir.clone(),
        id: a.id,
        name: a.name.clone().unwrap_or_else(keel::agent::node::hostname),
        advertise: advertise.clone(),
        cluster_init: a.cluster_init,
        join: a.server.clone().zip(a.token.clone()),
        initial_cluster: a.initial_cluster.is_some(),
        restore: a.restore.clone(),
        recovery_key: a.recovery_key.clone(),
        force_new_cluster: a.force_new_cluster,
        cert_lifetime: a.cert_lifetime,
    };
    let mut store = StoreConfig::new(a.id.unwrap_or(1), advertise, &a.data_dir);
    store.heartbeat = Duration::from_millis(a.heartbeat_ms);
    store.election_timeout_min = Duration::from_millis(a.election_timeout_min_ms);
    store.election_timeout_max = Duration::from_millis(a.election_timeout_max_ms);
    store.snapshot_every = a.snapshot_every;
    store.keep_logs = a.keep_logs;
    store.watch.history_events = a.watch_history;
    store.write_timeout = Duration::from_millis(a.write_timeout_ms);
    store.max_batch = a.max_batch;
    store.max_in_flight = a.max_in_flight;
    store.peer_source = a.peer_source_ip;
    let options = ServerOptions {
        bootstrap,
        listen: a.listen,
        initial_cluster: a.initial_cluster.as_deref().map(parse_cluster).transpose()?,
        store,
        serve: ServeConfig {
            learner_timeout: a.learner_timeout,
            max_requests_inflight: a.max_requests_inflight,
            max_requests_inflight_per_caller: a.max_requests_inflight_per_client,
            max_watches_per_caller: a.max_watches_per_client,
            request_timeout: a.request_timeout,
        },
        metrics_listen: a.metrics_listen,
        snapshot_interval: Some(a.snapshot_interval).filter(|d| !d.is_zero()),
        snapshot_retention: a.snapshot_retention,
        snapshot_dir: a.snapshot_dir.clone(),
        lease_duration: a.leader_elect_lease_duration,
        renew_deadline: a.leader_elect_renew_deadline,
        retry_period: a.leader_elect_retry_period,
        cluster_cidr: a.cluster_cidr,
        node_cidr_mask_size: a.node_cidr_mask_size,
    };
    Ok(keel::server::run::run(options).await?)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes says what went wrong and where; a backtrace would not help.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Command::Server(a) => server(*a).await,
            Command::Agent(a) => Ok(keel::agent::run(a.config(keel::agent::node::hostname())).await?),
            Command::Up(a) => Ok(keel::up::run(*a).await?),
            Command::Down(a) => Ok(keel::up::run_down(a).await?),
            Command::LogDriver { config } => keel::agent::logs::run_driver(&config).map_err(anyhow::Error::msg),
            Command::SecretsKey(SecretsKeyCommand::Rotate { data_dir }) => {
                let path = keel::server::bootstrap::DataDir::new(&data_dir).secrets_key();
                let name = keel::seal::Keyring::rotate(&path)?;
                println!("{} now seals with {name} (after a restart)", path.display());
                Ok(())
            }
            Command::Bench(b) => keel::bench::run(b).await,
        }
    })
}
