//! The controller manager: registered controllers run on whichever process holds the
//! manager's Lease, and only there.
//!
//! Each leading term starts afresh: new informers, a new event recorder, every controller's
//! workers. When the term ends (lost, expired, released) all of it is dropped at once, so a
//! process that does not lead watches nothing and acts on nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use super::controller::{self, Context, Controller, RunConfig};
use super::events::{EventLimits, EventRecorder};
use super::leader::{LeaderConfig, LeaderElector, Leadership};
use crate::client::informer::{InformerFactory, InformerOptions};
use crate::client::Client;

/// The name of the controller manager's Lease in `kube-system`.
pub const LEASE_NAME: &str = "keel-controller-manager";

#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub leader: LeaderConfig,
    pub run: RunConfig,
    pub informers: InformerOptions,
    pub events: EventLimits,
    /// The component name on Events, and the host.
    pub component: String,
    pub host: String,
    /// The pod network of the cluster, cut into one `/node_cidr_mask_size` block per Node.
    pub cluster_cidr: String,
    pub node_cidr_mask_size: u8,
}

impl ManagerConfig {
    /// Kubernetes' defaults, competing as `identity`.
    pub fn new(identity: &str) -> ManagerConfig {
        ManagerConfig {
            leader: LeaderConfig::new(crate::api::wellknown::SYSTEM_NAMESPACE, LEASE_NAME, identity),
            run: RunConfig::default(),
            informers: InformerOptions::default(),
            events: EventLimits::default(),
            component: "keel-controller-manager".into(),
            host: identity.to_string(),
            cluster_cidr: "10.42.0.0/16".into(),
            node_cidr_mask_size: 24,
        }
    }
}

type Boxed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A controller of any type, as the manager holds it.
trait Runnable: Send + Sync {
    fn primary(&self) -> crate::api::kinds::Kind;
    fn run(self: Arc<Self>, ctx: Context, config: RunConfig, stop: watch::Receiver<bool>) -> Boxed;
}

impl<C: Controller> Runnable for C {
    fn primary(&self) -> crate::api::kinds::Kind {
        Controller::primary(self)
    }

    fn run(self: Arc<Self>, ctx: Context, config: RunConfig, stop: watch::Receiver<bool>) -> Boxed {
        Box::pin(controller::run(self, ctx, config, stop))
    }
}

pub struct ControllerManager {
    client: Client,
    config: ManagerConfig,
    controllers: Vec<Arc<dyn Runnable>>,
    ready: watch::Sender<bool>,
}

impl ControllerManager {
    pub fn new(client: Client, config: ManagerConfig) -> ControllerManager {
        ControllerManager { client, config, controllers: Vec::new(), ready: watch::channel(false).0 }
    }

    /// True while this manager leads and its controllers' informers have synced.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    pub fn register<C: Controller>(&mut self, controller: C) {
        self.controllers.push(Arc::new(controller));
    }

    /// Competes for the Lease until `stop` turns true; runs every controller while leading.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let elector = LeaderElector::new(self.client.clone(), self.config.leader.clone());
        let (client, config, controllers, ready) = (self.client, self.config, self.controllers, Arc::new(self.ready));
        let flag = ready.clone();
        elector
            .run(stop, move |leadership: Leadership| {
                let (client, config, controllers, ready) =
                    (client.clone(), config.clone(), controllers.clone(), ready.clone());
                async move { lead(client, config, controllers, leadership, ready).await }
            })
            .await;
        flag.send_replace(false);
    }
}

/// Clears the ready flag when a term ends, however it ends.
struct NotReady(Arc<watch::Sender<bool>>);

impl Drop for NotReady {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
}

/// One leading term: runs until its future is dropped by the elector.
async fn lead(
    client: Client,
    config: ManagerConfig,
    controllers: Vec<Arc<dyn Runnable>>,
    mut leadership: Leadership,
    ready: Arc<watch::Sender<bool>>,
) {
    let _clear = NotReady(ready.clone());
    let ctx = Context {
        informers: InformerFactory::new(client.clone(), config.informers.clone()),
        recorder: EventRecorder::new(client.clone(), &config.component, &config.host, config.events.clone()),
        client,
    };
    // Every controller's primary informer exists before any starts, so that "synced"
    // below covers them all.
    for c in &controllers {
        ctx.informers.informer(c.primary());
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for c in controllers {
        tasks.spawn(c.run(ctx.clone(), config.run.clone(), stop_rx.clone()));
    }
    ctx.informers.start();
    tokio::select! {
        _ = ctx.informers.wait_synced() => { ready.send_replace(true); }
        _ = leadership.lost() => {}
    }
    leadership.lost().await;
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
}
