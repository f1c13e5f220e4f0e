//! `keel`: a control-plane replica (`keel server`) and the process-level benchmarks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use keel::pki::{Credentials, Identity, TokenRole};
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
    Server(Box<ServerArgs>),
    /// Manage this replica's secrets key file (<data-dir>/secrets.key).
    #[command(subcommand)]
    SecretsKey(SecretsKeyCommand),
    /// Run a node agent: join with a token once, register the Node, keep its Lease.
    Agent(AgentArgs),
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
struct AgentArgs {
    /// Replica to join through and talk to (host:port or https://host:port).
    #[arg(long, env = "KEEL_SERVER_URL")]
    server: String,
    /// An agent join token; needed only for the first start (or after the node certificate
    /// expired).
    #[arg(long, env = "KEEL_TOKEN")]
    token: Option<String>,
    /// The node's name (default: the hostname).
    #[arg(long, env = "KEEL_NODE_NAME")]
    name: Option<String>,
    #[arg(long, default_value = "/var/lib/keel-agent", env = "KEEL_AGENT_DATA_DIR")]
    data_dir: PathBuf,
    /// The address other nodes reach this one at.
    #[arg(long, default_value = "127.0.0.1")]
    node_ip: String,
}

async fn agent(a: AgentArgs) -> anyhow::Result<()> {
    let cfg = keel::agent::AgentConfig {
        name: a.name.unwrap_or_else(hostname),
        data_dir: a.data_dir,
        servers: vec![a.server],
        token: a.token,
        node_ip: a.node_ip,
    };
    let creds = keel::agent::credentials(&cfg).await?;
    let name = cfg.name.clone();
    let mut agent = keel::agent::Agent::new(cfg, &creds)?;
    agent.register().await.with_context(|| format!("register node {name}"))?;
    println!("Node {name} registered.");
    let task = tokio::spawn(agent.run());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    task.abort();
    Ok(())
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
    #[arg(long, default_value = "12h", value_parser = keel::cli::cluster::parse_ttl)]
    snapshot_interval: u64,
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
    let secs = keel::cli::cluster::parse_ttl(s).map_err(|e| e.to_string())?;
    if secs < 10 {
        return Err(format!("{s:?}: a certificate must last at least 10s"));
    }
    Ok(Duration::from_secs(secs))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_ascii_lowercase())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keel".to_string())
}

/// Where this replica's credentials come from, decided before anything starts.
enum Start {
    /// A new cluster: CA, certificate, admin configuration, then tokens once Raft runs.
    Init { ca: keel::pki::Ca, cluster_id: String },
    /// A new cluster from a backup: its CA and keys, then its content once Raft runs.
    Restore { payload: Box<keel::proto::v1::BackupPayload>, marker: PathBuf },
    /// Joined through `seed` just now or earlier: never initializes a cluster of its own.
    Joined { seed: String },
    /// Certificates were provisioned beforehand (--initial-cluster) or this is a restart.
    Existing,
}

async fn server(a: ServerArgs) -> anyhow::Result<()> {
    if a.id == Some(0) {
        bail!("--id: replica id 0 is reserved");
    }
    let advertise = a.advertise.clone().unwrap_or_else(|| a.listen.to_string());
    let name = a.name.clone().unwrap_or_else(hostname);
    let tls = bootstrap::tls_dir(&a.data_dir);
    let joined_marker = a.data_dir.join("joined-via");
    let (creds, start) = if Credentials::exists(&tls) {
        if a.cluster_init {
            bail!(
                "--cluster-init: {} already holds a cluster's certificates; start without --cluster-init to restart this replica, or use an empty --data-dir for a new cluster",
                a.data_dir.display()
            );
        }
        let creds = Credentials::load(&tls)?;
        let _ = a.force_new_cluster;
        let pending = a.data_dir.join("restore-pending");
        if pending.exists() {
            bail!(
                "{}: a restore into this directory did not finish; remove the directory and run the restore again",
                a.data_dir.display()
            );
        }
        let start = match std::fs::read_to_string(&joined_marker) {
            Ok(seed) => Start::Joined { seed: seed.trim().to_string() },
            Err(_) => Start::Existing,
        };
        (creds, start)
    } else if a.force_new_cluster {
        bail!(
            "--force-new-cluster: {} holds no replica (no tls/); run it on a survivor's data directory",
            a.data_dir.display()
        );
    } else if a.initial_cluster.is_some() {
        bail!(
            "--initial-cluster needs this replica's certificates in {} (ca.crt, tls.crt, tls.key, signed by the cluster CA); \
             to start a cluster without them, run `keel server --cluster-init` on one replica and join the others with its token",
            tls.display()
        );
    } else if let (Some(seed), Some(token)) = (&a.server, &a.token) {
        let (creds, resp) = keel::server::join::join(seed, token, TokenRole::Server, &name, &advertise)
            .await
            .with_context(|| format!("join through {seed}"))?;
        creds.save(&tls)?;
        bootstrap::save_ca(
            &a.data_dir,
            &keel::pki::Ca { cert_pem: resp.ca_pem.clone(), key_pem: resp.ca_key_pem.clone() },
        )?;
        keel::pki::write_private(&a.data_dir.join("cluster-id"), &resp.cluster_id)?;
        keel::pki::write_private(&a.data_dir.join("secrets.key"), &resp.secrets_keys)?;
        keel::pki::write_private(&a.data_dir.join("epoch"), &resp.epoch)?;
        keel::pki::write_private(&joined_marker, seed)?;
        println!("Joined cluster {} as replica {} ({name}).", resp.cluster_id, resp.replica_id);
        (creds, Start::Joined { seed: seed.clone() })
    } else if let Some(file) = &a.restore {
        let recovery = match &a.recovery_key {
            Some(k) => Some(keel::server::secrets::Keyring::parse(
                &std::fs::read_to_string(k).with_context(|| format!("read {}", k.display()))?,
                &k.display().to_string(),
            )?),
            None => None,
        };
        let (header, payload) = keel::server::backup::read(file, recovery.as_ref())?;
        let ca = keel::server::cluster::backup_ca(&payload)
            .with_context(|| format!("{}: the backup holds no cluster CA", file.display()))?;
        let id = a.id.unwrap_or(1);
        let marker = a.data_dir.join("restore-pending");
        keel::pki::write_private(&marker, &file.display().to_string())?;
        let creds =
            bootstrap::init_from_backup(&a.data_dir, id, &advertise, &ca, &header.cluster_id, &payload.secrets_keys)?;
        println!(
            "Restoring cluster {} from {} (revision {}, {} keys, taken {}).",
            header.cluster_id,
            file.display(),
            header.revision,
            header.keys,
            header.created
        );
        (creds, Start::Restore { payload: Box::new(payload), marker })
    } else {
        let id = a.id.unwrap_or(1);
        let (creds, ca) = bootstrap::init_cluster(&a.data_dir, id, &advertise, a.cert_lifetime)?;
        let cluster_id = std::fs::read_to_string(a.data_dir.join("cluster-id")).unwrap_or_default();
        (creds, Start::Init { ca, cluster_id })
    };
    let id = match creds.identity() {
        Some(Identity::Replica(id)) => id,
        other => bail!("{}/tls.crt is not a replica certificate (it names {other:?})", tls.display()),
    };
    if a.id.is_some_and(|want| want != id) {
        bail!("--id {} does not match this replica's certificate, which is for replica {id}", a.id.unwrap_or(0));
    }
    let mut config = StoreConfig::new(id, advertise.clone(), &a.data_dir);
    config.name = name.clone();
    config.heartbeat = Duration::from_millis(a.heartbeat_ms);
    config.election_timeout_min = Duration::from_millis(a.election_timeout_min_ms);
    config.election_timeout_max = Duration::from_millis(a.election_timeout_max_ms);
    config.snapshot_every = a.snapshot_every;
    config.keep_logs = a.keep_logs;
    config.watch.history_events = a.watch_history;
    config.write_timeout = Duration::from_millis(a.write_timeout_ms);
    config.max_batch = a.max_batch;
    config.max_in_flight = a.max_in_flight;
    config.peer_source = a.peer_source_ip;
    let epoch_file = a.data_dir.join("epoch");
    if a.force_new_cluster {
        let epoch = uuid::Uuid::new_v4().to_string();
        let forced = keel::store::Store::force_new_cluster(&config)
            .with_context(|| format!("--force-new-cluster on {}", a.data_dir.display()))?;
        keel::pki::write_private(&epoch_file, &epoch)?;
        println!(
            "Forced a new cluster: replica {id} is the only voter, all {} log entries kept, term {}, epoch {epoch}. \
             Join new replicas with a server token; replicas of the old cluster are refused.",
            forced.last_index, forced.term
        );
    }
    config.epoch = std::fs::read_to_string(&epoch_file).map(|e| e.trim().to_string()).unwrap_or_default();
    // Only a replica that did not join may found a cluster (and only while its store is
    // empty: Store::initialize does nothing otherwise).
    let initial = match (&start, &a.initial_cluster) {
        (Start::Joined { .. }, _) => None,
        _ if a.force_new_cluster => None,
        (_, Some(s)) => Some(parse_cluster(s)?),
        (_, None) => Some([(id, Member { addr: advertise.clone(), name: name.clone() })].into()),
    };
    if initial.as_ref().is_some_and(|c| !c.contains_key(&id)) {
        bail!("--initial-cluster does not list this replica's id {id}");
    }
    let server = keel::server::Server::start(config, a.listen, initial, Faults::new(), &creds)
        .await
        .with_context(|| format!("replica {id} failed to start"))?;
    tracing::info!(id, name, addr = %server.addr, data_dir = %a.data_dir.display(), "keel server ready");
    if let Start::Init { ca, cluster_id } = &start {
        let (server_token, agent_token) =
            keel::server::cluster::initialize(&server.store, ca, cluster_id, &name, id, &creds, a.cert_lifetime)
                .await?;
        keel::pki::write_private(&a.data_dir.join("token"), &format!("{server_token}\n"))?;
        keel::pki::write_private(&a.data_dir.join("agent-token"), &format!("{agent_token}\n"))?;
        let admin = bootstrap::admin_config_path(&a.data_dir);
        println!("New cluster {cluster_id} initialized.");
        println!("  Admin configuration: {}   (export KEELCONFIG={})", admin.display(), admin.display());
        println!("  Server join token:   {}", a.data_dir.join("token").display());
        println!("  Agent join token:    {}", a.data_dir.join("agent-token").display());
        println!(
            "  Join another replica: keel server --server {advertise} --token $(cat {}) ...",
            a.data_dir.join("token").display()
        );
    }
    if let Start::Restore { payload, marker } = &start {
        let n = keel::server::cluster::load_backup(&server.store, payload, &name, id, &creds).await?;
        std::fs::remove_file(marker).with_context(|| format!("remove {}", marker.display()))?;
        let admin = bootstrap::admin_config_path(&a.data_dir);
        println!("Restored {n} keys. Admin configuration: {}", admin.display());
        println!("  Join tokens of the old cluster still work; `keelctl token create` makes new ones.");
    }
    let seeds = match &start {
        Start::Joined { seed } => vec![seed.clone()],
        _ => Vec::new(),
    };
    let member =
        tokio::spawn(keel::server::join::ensure_member(server.store.clone(), creds.clone(), advertise.clone(), seeds));
    if let Some(listen) = a.metrics_listen {
        let at = keel::server::metrics::serve(listen, server.store.clone(), server.creds.clone())
            .await
            .with_context(|| format!("--metrics-listen {listen}"))?;
        tracing::info!(%at, "metrics on https://{at}/metrics");
    }
    let snapshots = (a.snapshot_interval > 0).then(|| {
        let keys = keel::server::secrets::Keyring::load_or_create(&a.data_dir.join("secrets.key"));
        let dir = a.snapshot_dir.clone().unwrap_or_else(|| a.data_dir.join("snapshots"));
        let interval = Duration::from_secs(a.snapshot_interval);
        keys.ok().map(|k| {
            tokio::spawn(keel::server::backup::schedule(
                server.store.clone(),
                std::sync::Arc::new(k),
                dir,
                interval,
                a.snapshot_retention,
            ))
        })
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    member.abort();
    if let Some(Some(t)) = snapshots {
        t.abort();
    }
    tracing::info!("shutting down");
    server.stop().await?;
    Ok(())
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
            Command::Agent(a) => agent(a).await,
            Command::SecretsKey(SecretsKeyCommand::Rotate { data_dir }) => {
                let name = keel::server::secrets::Keyring::rotate(&data_dir.join("secrets.key"))?;
                println!("{} now seals with {name} (after a restart)", data_dir.join("secrets.key").display());
                Ok(())
            }
            Command::Bench(b) => keel::bench::run(b).await,
        }
    })
}
