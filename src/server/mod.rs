//! A control-plane replica: the store plus the gRPC services every replica serves
//! (replication, the internal KV API, store administration, the Objects and Cluster APIs,
//! health and reflection), behind TLS, authentication and the in-flight limits. What runs
//! beside the services (the controller manager, backups, membership) is assembled by `run`.

pub mod admin;
pub mod auth;
pub mod authz;
pub mod backup;
pub mod bootstrap;
pub mod cluster;
pub mod cluster_state;
pub mod join;
pub mod kv;
pub mod learners;
pub mod limits;
pub mod metrics;
pub mod objects;
pub mod pods;
pub mod renew;
pub mod run;
pub mod status;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::pki::Credentials;
use crate::proto::{self, v1 as pb};
use crate::store::{Faults, Member, Store, StoreConfig, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("secrets key: {0}")]
    Secrets(crate::pki::PkiError),
}

/// How a replica serves: limits and timeouts of its ports.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// How long the leader keeps a learner it does not hear from.
    pub learner_timeout: std::time::Duration,
    /// Requests a replica works on at once; more are refused (RESOURCE_EXHAUSTED).
    pub max_requests_inflight: usize,
    /// Of those, how many one caller may hold.
    pub max_requests_inflight_per_caller: usize,
    /// Watches one caller may hold open on a replica.
    pub max_watches_per_caller: usize,
    /// The longest a request (not a watch) may take.
    pub request_timeout: std::time::Duration,
}

impl Default for ServeConfig {
    fn default() -> ServeConfig {
        ServeConfig {
            learner_timeout: std::time::Duration::from_secs(60),
            max_requests_inflight: 400,
            max_requests_inflight_per_caller: 200,
            max_watches_per_caller: 1000,
            request_timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// A running replica.
pub struct Server {
    pub store: Store,
    pub addr: SocketAddr,
    /// The address others reach this replica at.
    pub advertise: String,
    /// This replica's credentials as they renew.
    pub creds: Arc<crate::pki::LiveCredentials>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// Creates the default namespaces; it retries until the cluster has a leader.
    bootstrap: tokio::task::JoinHandle<()>,
    /// What every replica runs beside its services: the TLS acceptor, the bearer-token
    /// cache, the learner reaper and certificate renewal.
    loops: Vec<tokio::task::JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    /// Opens the store, binds `listen` and serves. With `initial_cluster`, a replica whose
    /// store is empty initializes a new cluster with those voters.
    pub async fn start(
        config: StoreConfig,
        listen: SocketAddr,
        initial_cluster: Option<BTreeMap<u64, Member>>,
        faults: Arc<Faults>,
        creds: &Credentials,
    ) -> Result<Server, ServerError> {
        Server::start_with(config, ServeConfig::default(), listen, initial_cluster, faults, creds).await
    }

    /// As [`Server::start`], with the serving limits given.
    pub async fn start_with(
        mut config: StoreConfig,
        serve: ServeConfig,
        listen: SocketAddr,
        initial_cluster: Option<BTreeMap<u64, Member>>,
        faults: Arc<Faults>,
        creds: &Credentials,
    ) -> Result<Server, ServerError> {
        config.peer_tls = Some(creds.client_tls());
        let data_dir = config.data_dir.clone();
        let advertise = config.advertise.clone();
        let live = crate::pki::LiveCredentials::new(creds.clone());
        let resolver = crate::tls::Resolver::new(creds).map_err(ServerError::Secrets)?;
        let tls_config = crate::tls::server_config(&creds.ca_pem, resolver.clone()).map_err(ServerError::Secrets)?;
        // Every replica of a cluster must hold the same keys: joiners receive them, and a
        // cluster provisioned by hand gets the same file on every replica.
        let keys = Arc::new(
            crate::seal::Keyring::load_or_create(&config.data_dir.join("secrets.key")).map_err(ServerError::Secrets)?,
        );
        let listener =
            TcpListener::bind(listen).await.map_err(|source| ServerError::Listen { addr: listen, source })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Listen { addr: listen, source })?;
        let store = Store::open(config, faults).await?;
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<pb::kv_server::KvServer<kv::KvService>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        // Many clients (grpcurl, Python's grpcio-reflection) still speak v1alpha.
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        let (incoming, acceptor) = crate::tls::incoming(listener, tls_config);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        use auth::{require, Allow};
        let tokens = Arc::new(auth::UserTokens::default());
        let t = || tokens.clone();
        use tonic::service::interceptor::InterceptedService as Auth;
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .timeout(serve.request_timeout)
            .layer(limits::InflightLayer::new(serve.max_requests_inflight, serve.max_requests_inflight_per_caller))
            .add_service(Auth::new(store.raft_service(), require(Allow::Replicas, t())))
            .add_service(Auth::new(
                pb::kv_server::KvServer::new(kv::KvService::new(store.clone())),
                require(Allow::ReplicasAndAdmins, t()),
            ))
            .add_service(Auth::new(
                pb::objects_server::ObjectsServer::new(objects::ObjectsService::new(
                    store.clone(),
                    keys.clone(),
                    limits::WatchBudget::new(serve.max_watches_per_caller),
                ))
                .max_decoding_message_size(crate::client::MAX_MESSAGE)
                .max_encoding_message_size(crate::client::MAX_MESSAGE),
                require(Allow::Anyone, t()),
            ))
            .add_service(Auth::new(
                pb::store_admin_server::StoreAdminServer::new(admin::AdminService::new(store.clone())),
                require(Allow::ReplicasAndAdmins, t()),
            ))
            .add_service(Auth::new(
                pb::cluster_server::ClusterServer::new(cluster::ClusterService::new(
                    store.clone(),
                    live.clone(),
                    keys.clone(),
                )),
                auth::optional(t()),
            ))
            .add_service(Auth::new(
                pb::pods_server::PodsServer::new(pods::PodsService::new(
                    objects::ObjectsService::new(store.clone(), keys.clone(), limits::WatchBudget::new(1)),
                    live.clone(),
                )),
                require(Allow::Anyone, t()),
            ))
            .add_service(Auth::new(health, require(Allow::Anyone, t())))
            .add_service(Auth::new(reflection, require(Allow::Anyone, t())))
            .add_service(Auth::new(reflection_alpha, require(Allow::Anyone, t())));
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        }));
        if let Some(voters) = initial_cluster {
            store.initialize(voters).await?;
        }
        let bootstrap = tokio::spawn(objects::ensure_default_namespaces(store.clone(), keys.clone()));
        let loops = vec![
            acceptor,
            tokio::spawn(tokens.clone().refresh(store.clone())),
            tokio::spawn(learners::reap(store.clone(), serve.learner_timeout)),
            tokio::spawn(renew::run(store.clone(), live.clone(), resolver, data_dir, advertise.clone(), addr)),
        ];
        Ok(Server { store, addr, advertise, creds: live, task, bootstrap, loops, stop: Some(stop_tx) })
    }

    /// Stops serving and shuts the store down.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.bootstrap.abort();
        for l in &self.loops {
            l.abort();
        }
        self.store.shutdown().await?;
        self.task.abort();
        Ok(())
    }

    /// Serves until the gRPC server ends.
    pub async fn wait(self) -> Result<(), ServerError> {
        match self.task.await {
            Ok(r) => Ok(r?),
            Err(_) => Ok(()),
        }
    }
}
