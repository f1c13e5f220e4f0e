//! `keel server`'s composition root: bootstrap the data directory, open the store and serve,
//! write a new cluster's state, then start what runs beside the services (membership,
//! metrics, scheduled backups, the controller manager) and stop it all on a signal.
//!
//! Nothing here decides anything of its own; it only assembles the parts in order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

use super::bootstrap::{self, BootstrapOptions, DataDir, Start};
use super::{ServeConfig, Server};
use crate::client::{Client, ClientAuth, ClientConfig};
use crate::controllers::runtime::ManagerConfig;
use crate::store::{Faults, Member, StoreConfig};

/// Every flag of `keel server`.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub bootstrap: BootstrapOptions,
    pub listen: SocketAddr,
    /// Voters of a new cluster whose certificates were provisioned beforehand.
    pub initial_cluster: Option<BTreeMap<u64, Member>>,
    pub store: StoreConfig,
    pub serve: ServeConfig,
    pub metrics_listen: Option<SocketAddr>,
    /// Scheduled backups: how often (None: off), how many kept, where.
    pub snapshot_interval: Option<Duration>,
    pub snapshot_retention: usize,
    pub snapshot_dir: Option<PathBuf>,
    /// Leader election of the controller manager.
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    /// The pod network, one `/node_cidr_mask_size` block per Node.
    pub cluster_cidr: String,
    pub node_cidr_mask_size: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error("replica {id} failed to start: {source}")]
    Start {
        id: u64,
        #[source]
        source: super::ServerError,
    },
    #[error("--force-new-cluster on {dir}: {source}")]
    Force {
        dir: String,
        #[source]
        source: crate::store::StoreError,
    },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
}

/// The controller manager running beside a replica.
pub struct Controllers {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    ready: watch::Receiver<bool>,
}

impl Controllers {
    /// Waits until this replica's manager leads and its informers have synced.
    pub async fn ready(&self) {
        let mut r = self.ready.clone();
        let _ = r.wait_for(|ready| *ready).await;
    }

    /// Stops the controllers and releases the manager's Lease if this replica holds it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// Starts the controller manager and the scheduler of `server`: each competes for the manager's Lease as this
/// replica (its renewing certificate) through the API, this replica first, then `peers`.
pub fn start_controllers(server: &Server, name: &str, peers: &[String], config: Option<ManagerConfig>) -> Controllers {
    let mut addrs = vec![server.advertise.clone()];
    addrs.extend(peers.iter().filter(|p| **p != server.advertise).cloned());
    let identity = format!("{name}_{}", uuid::Uuid::new_v4());
    let mut config = config.unwrap_or_else(|| ManagerConfig::new(&identity));
    config.leader.identity = identity;
    config.host = name.to_string();
    let (stop, rx) = watch::channel(false);
    let client = Client::new(&addrs, ClientAuth::Live(server.creds.clone()), ClientConfig::default());
    let (task, ready) = match client {
        Ok(client) => {
            let scheduler = crate::scheduler::manager(client.clone(), config.clone());
            let manager = crate::controllers::manager(client, config);
            let ready = manager.ready();
            let rx2 = rx.clone();
            (
                tokio::spawn(async move {
                    tokio::join!(manager.run(rx), scheduler.run(rx2));
                }),
                ready,
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "the controller manager cannot start");
            (tokio::spawn(async {}), watch::channel(false).1)
        }
    };
    Controllers { stop, task, ready }
}

/// Runs a replica until SIGINT or SIGTERM.
pub async fn run(o: ServerOptions) -> Result<(), RunError> {
    // Before any loop records a metric.
    super::metrics::global();
    let b = &o.bootstrap;
    if b.id == Some(0) {
        return Err(RunError::Setup("--id: replica id 0 is reserved".into()));
    }
    // Checked before anything is written: a bad range stops the replica with its reason.
    crate::controllers::nodeipam::NodeIpamController::new(&o.cluster_cidr, o.node_cidr_mask_size)
        .map_err(RunError::Setup)?;
    let dir = DataDir::new(&b.data_dir);
    let prepared = bootstrap::prepare(b).await?;
    let (creds, id) = (prepared.creds, prepared.id);
    let mut config = o.store.clone();
    config.id = id;
    config.name = b.name.clone();
    config.advertise = b.advertise.clone();
    config.data_dir = b.data_dir.clone();
    if b.force_new_cluster {
        let epoch = uuid::Uuid::new_v4().to_string();
        let forced = crate::store::Store::force_new_cluster(&config)
            .map_err(|source| RunError::Force { dir: b.data_dir.display().to_string(), source })?;
        crate::pki::write_private(&dir.epoch(), &epoch)?;
        println!(
            "Forced a new cluster: replica {id} is the only voter, all {} log entries kept, term {}, epoch {epoch}. \
             Join new replicas with a server token; replicas of the old cluster are refused.",
            forced.last_index, forced.term
        );
    }
    config.epoch = std::fs::read_to_string(dir.epoch()).map(|e| e.trim().to_string()).unwrap_or_default();
    // Only a replica that did not join may found a cluster (and only while its store is
    // empty: Store::initialize does nothing otherwise).
    let initial = match (&prepared.start, &o.initial_cluster) {
        (Start::Joined { .. }, _) => None,
        _ if b.force_new_cluster => None,
        (_, Some(c)) => Some(c.clone()),
        (_, None) => Some([(id, Member { addr: b.advertise.clone(), name: b.name.clone() })].into()),
    };
    if initial.as_ref().is_some_and(|c| !c.contains_key(&id)) {
        return Err(RunError::Setup(format!("--initial-cluster does not list this replica's id {id}")));
    }
    let server = Server::start_with(config, o.serve.clone(), o.listen, initial, Faults::new(), &creds)
        .await
        .map_err(|source| RunError::Start { id, source })?;
    tracing::info!(id, name = b.name, addr = %server.addr, data_dir = %b.data_dir.display(), "keel server ready");
    match &prepared.start {
        Start::Init { ca, cluster_id } => {
            let (server_token, agent_token) =
                super::cluster::initialize(&server.store, ca, cluster_id, &b.name, id, &creds, b.cert_lifetime)
                    .await
                    .map_err(|s| RunError::Setup(format!("write the new cluster's state: {}", s.message())))?;
            bootstrap::save_tokens(&dir, &server_token, &agent_token)?;
            let admin = dir.admin_config();
            println!("New cluster {cluster_id} initialized.");
            println!("  Admin configuration: {}   (export KEELCONFIG={})", admin.display(), admin.display());
            println!("  Server join token:   {}", dir.server_token().display());
            println!("  Agent join token:    {}", dir.agent_token().display());
            println!(
                "  Join another replica: keel server --server {} --token $(cat {}) ...",
                b.advertise,
                dir.server_token().display()
            );
        }
        Start::Restore { payload } => {
            let n = super::cluster::load_backup(&server.store, payload, &b.name, id, &creds)
                .await
                .map_err(|s| RunError::Setup(format!("load the backup: {}", s.message())))?;
            std::fs::remove_file(dir.restore_pending())
                .map_err(|e| RunError::Setup(format!("remove {}: {e}", dir.restore_pending().display())))?;
            println!("Restored {n} keys. Admin configuration: {}", dir.admin_config().display());
            println!("  Join tokens of the old cluster still work; `keelctl token create` makes new ones.");
        }
        Start::Joined { .. } | Start::Existing => {}
    }
    let seeds = match &prepared.start {
        Start::Joined { seed } => vec![seed.clone()],
        _ => Vec::new(),
    };
    let member = tokio::spawn(super::join::ensure_member(
        server.store.clone(),
        creds.clone(),
        b.advertise.clone(),
        seeds.clone(),
    ));
    if let Some(listen) = o.metrics_listen {
        let at = super::metrics::serve(listen, server.store.clone(), server.creds.clone())
            .await
            .map_err(|e| RunError::Setup(format!("--metrics-listen {listen}: {e}")))?;
        tracing::info!(%at, "metrics on https://{at}/metrics");
    }
    let backups = match o.snapshot_interval {
        None => None,
        Some(interval) => {
            // A replica that cannot read its keys must not go on without its backups.
            let keys = crate::seal::Keyring::load_or_create(&dir.secrets_key())?;
            let to = o.snapshot_dir.clone().unwrap_or_else(|| dir.snapshots());
            Some(tokio::spawn(super::backup::schedule(
                server.store.clone(),
                std::sync::Arc::new(keys),
                to,
                interval,
                o.snapshot_retention,
            )))
        }
    };
    let mut peers: Vec<String> =
        server.store.status().members.iter().filter_map(|m| m.node.as_ref().map(|n| n.addr.clone())).collect();
    peers.extend(seeds);
    let mut manager = ManagerConfig::new(&b.name);
    manager.leader.lease_duration = o.lease_duration;
    manager.leader.renew_deadline = o.renew_deadline;
    manager.leader.retry_period = o.retry_period;
    manager.cluster_cidr = o.cluster_cidr.clone();
    manager.node_cidr_mask_size = o.node_cidr_mask_size;
    let controllers = start_controllers(&server, &b.name, &peers, Some(manager));
    wait_for_signal().await;
    tracing::info!("shutting down");
    member.abort();
    if let Some(t) = backups {
        t.abort();
    }
    controllers.stop().await;
    server.stop().await.map_err(|source| RunError::Start { id, source })?;
    Ok(())
}

async fn wait_for_signal() {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
