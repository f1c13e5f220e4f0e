//! `keel`: a control-plane replica (`keel server`) and the process-level benchmarks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use keel::pki::Credentials;
use keel::server::bootstrap;
use keel::store::{Faults, Member, StoreConfig};

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
    Server(ServerArgs),
    /// Run a benchmark against real processes on loopback.
    #[command(subcommand)]
    Bench(keel::bench::BenchCommand),
}

#[derive(Args)]
struct ServerArgs {
    /// This replica's id, unique in the cluster.
    #[arg(long, default_value_t = 1, env = "KEEL_ID")]
    id: u64,
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
    #[arg(long, conflicts_with = "cluster_init")]
    initial_cluster: Option<String>,
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

async fn server(a: ServerArgs) -> anyhow::Result<()> {
    if a.id == 0 {
        bail!("--id: replica id 0 is reserved");
    }
    let advertise = a.advertise.clone().unwrap_or_else(|| a.listen.to_string());
    let mut config = StoreConfig::new(a.id, advertise.clone(), &a.data_dir);
    config.heartbeat = Duration::from_millis(a.heartbeat_ms);
    config.election_timeout_min = Duration::from_millis(a.election_timeout_min_ms);
    config.election_timeout_max = Duration::from_millis(a.election_timeout_max_ms);
    config.snapshot_every = a.snapshot_every;
    config.keep_logs = a.keep_logs;
    config.watch.history_events = a.watch_history;
    config.write_timeout = Duration::from_millis(a.write_timeout_ms);
    config.max_batch = a.max_batch;
    config.max_in_flight = a.max_in_flight;
    let cluster = match &a.initial_cluster {
        Some(s) => parse_cluster(s)?,
        None => [(a.id, Member { addr: advertise.clone(), name: config.name.clone() })].into(),
    };
    if !cluster.contains_key(&a.id) {
        bail!("--initial-cluster does not list this replica's --id {}", a.id);
    }
    let tls = bootstrap::tls_dir(&a.data_dir);
    let mut initialized = false;
    let creds = if Credentials::exists(&tls) {
        if a.cluster_init {
            bail!(
                "--cluster-init: {} already holds a cluster's certificates; start without --cluster-init to restart this replica, or use an empty --data-dir for a new cluster",
                a.data_dir.display()
            );
        }
        Credentials::load(&tls)?
    } else if a.initial_cluster.is_some() {
        bail!(
            "--initial-cluster needs this replica's certificates in {} (ca.crt, tls.crt, tls.key, signed by the cluster CA); \
             to start a cluster without them, run `keel server --cluster-init` on one replica and join the others with its token",
            tls.display()
        );
    } else {
        std::fs::create_dir_all(&a.data_dir).with_context(|| format!("create {}", a.data_dir.display()))?;
        initialized = true;
        bootstrap::init_cluster(&a.data_dir, a.id, &advertise)?.0
    };
    let server = keel::server::Server::start(config, a.listen, Some(cluster), Faults::new(), &creds)
        .await
        .with_context(|| format!("replica {} failed to start", a.id))?;
    tracing::info!(id = a.id, addr = %server.addr, data_dir = %a.data_dir.display(), "keel server ready");
    if initialized {
        let admin = bootstrap::admin_config_path(&a.data_dir);
        println!("New cluster initialized. Admin configuration: {}", admin.display());
        println!("  export KEELCONFIG={}", admin.display());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    server.stop().await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
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
            Command::Server(a) => server(a).await,
            Command::Bench(b) => keel::bench::run(b).await,
        }
    })
}
