//! The scheduler: binds each pod without a node to one that fits. It runs in `keel server`
//! on the replica holding the `keel-scheduler` Lease, as a controller of the control-loop
//! runtime: pods come from the shared informer, and a bind is an update of `spec.nodeName`
//! at the pod's resourceVersion, so no pod is ever bound twice.
//!
//! Each decision runs the filters of `plugins` against every node (what the node's pods
//! request comes from the informer, plus the pods this scheduler bound that the informer
//! does not show yet) and takes the best-scoring node. A pod that fits nowhere gets
//! `PodScheduled=False` (reason `Unschedulable`) with kube-scheduler's summary and a
//! FailedScheduling Event, and is tried again when a node changes or a pod goes.

pub mod plugins;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use crate::api::kinds::Kind;
use crate::client::informer::{key_of, Event, BY_NODE};
use crate::client::Client;
use crate::controllers::runtime::{
    reference_to, Action, Context, Controller, ControllerManager, LeaderConfig, ManagerConfig, ReconcileError,
    WorkQueue,
};
use crate::proto::v1 as pb;

use plugins::{NodeInfo, Request};

/// The Lease the schedulers of a cluster compete for, in kube-system.
pub const LEASE_NAME: &str = "keel-scheduler";
/// The profile this scheduler serves (`spec.schedulerName`).
pub const SCHEDULER_NAME: &str = "default-scheduler";

/// The scheduler as a controller.
#[derive(Default)]
pub struct Scheduler {
    /// Pods bound by this scheduler: pod key → (node, request), until the informer shows
    /// the pod on its node.
    assumed: Mutex<HashMap<String, (String, Request)>>,
    /// One decision at a time: each sees the binds before it.
    decide: tokio::sync::Mutex<()>,
}

fn is_pending(p: &pb::Pod) -> bool {
    let spec = p.spec.as_ref();
    let scheduler = spec.map(|s| s.scheduler_name.as_str()).unwrap_or_default();
    spec.is_some_and(|s| s.node_name.is_empty())
        && (scheduler.is_empty() || scheduler == SCHEDULER_NAME)
        && p.metadata.as_ref().is_some_and(|m| m.deletion_timestamp.is_empty())
}

fn is_terminal(p: &pb::Pod) -> bool {
    p.status.as_ref().is_some_and(|s| s.phase == "Succeeded" || s.phase == "Failed")
}

/// Queues every pending pod.
fn queue_pending(pods: &crate::client::informer::Informer, queue: &WorkQueue) {
    for o in pods.list() {
        if let Some(pb::object::Kind::Pod(p)) = &o.kind {
            if is_pending(p) {
                queue.add(&key_of(&o));
            }
        }
    }
}

impl Scheduler {
    /// Every node with what its pods (and the pods assumed on it) request.
    fn snapshot(&self, ctx: &Context) -> Vec<NodeInfo> {
        let pods = ctx.informers.informer(Kind::Pod);
        let mut assumed = self.assumed.lock().unwrap_or_else(|p| p.into_inner());
        // An assumed pod the informer shows on a node (or not at all) is counted from there.
        assumed.retain(|key, _| match pods.get(key).as_deref().map(|o| &o.kind) {
            Some(Some(pb::object::Kind::Pod(p))) => p.spec.as_ref().is_some_and(|s| s.node_name.is_empty()),
            _ => false,
        });
        let mut out = Vec::new();
        for o in ctx.informers.informer(Kind::Node).list() {
            let Some(pb::object::Kind::Node(node)) = &o.kind else { continue };
            let mut info = NodeInfo::new(node.clone());
            for po in pods.by_index(BY_NODE, info.name()) {
                if let Some(pb::object::Kind::Pod(p)) = &po.kind {
                    if !is_terminal(p) {
                        info.add(&plugins::request_of(p.spec.as_ref().unwrap_or(&Default::default())));
                    }
                }
            }
            for (node_name, r) in assumed.values() {
                if node_name == info.name() {
                    info.add(r);
                }
            }
            out.push(info);
        }
        out.sort_by(|a, b| a.name().cmp(b.name()));
        out
    }

    async fn unschedulable(
        &self,
        ctx: &Context,
        obj: &pb::Object,
        pod: &pb::Pod,
        message: String,
    ) -> Result<(), ReconcileError> {
        let current = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.r#type == "PodScheduled"))
            .map(|c| (c.status.clone(), c.message.clone()));
        if current == Some(("False".into(), message.clone())) {
            return Ok(());
        }
        ctx.recorder.emit(&reference_to(obj), "Warning", "FailedScheduling", &message);
        let mut updated = pod.clone();
        let status = updated.status.get_or_insert_with(Default::default);
        status.conditions.retain(|c| c.r#type != "PodScheduled");
        status.conditions.push(pb::PodCondition {
            r#type: "PodScheduled".into(),
            status: "False".into(),
            reason: "Unschedulable".into(),
            message,
            last_transition_time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            ..Default::default()
        });
        if status.phase.is_empty() {
            status.phase = "Pending".into();
        }
        match ctx.client.update_status(pb::Object { kind: Some(pb::object::Kind::Pod(updated)) }).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_conflict() || e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Controller for Scheduler {
    fn name(&self) -> &'static str {
        "scheduler"
    }

    fn primary(&self) -> Kind {
        Kind::Pod
    }

    fn watch(&self, ctx: &Context, queue: &WorkQueue) {
        let pods = ctx.informers.informer(Kind::Pod);
        pods.index_by_node();
        // What can make a pending pod fit: a node added or changed, a pod gone or finished.
        let (p, q) = (pods.clone(), queue.clone());
        ctx.informers.informer(Kind::Node).add_handler(std::sync::Arc::new(move |_e: &Event| queue_pending(&p, &q)));
        let (p, q) = (pods.clone(), queue.clone());
        pods.add_handler(std::sync::Arc::new(move |e: &Event| {
            let freed = match e {
                Event::Deleted(_) => true,
                Event::Updated { new, .. } => matches!(&new.kind, Some(pb::object::Kind::Pod(p)) if is_terminal(p)),
                _ => false,
            };
            if freed {
                queue_pending(&p, &q);
            }
        }));
    }

    async fn reconcile(&self, key: &str, ctx: &Context) -> Result<Action, ReconcileError> {
        let Some(obj) = ctx.informers.informer(Kind::Pod).get(key) else { return Ok(Action::Done) };
        let Some(pb::object::Kind::Pod(pod)) = obj.kind.clone() else { return Ok(Action::Done) };
        if !is_pending(&pod) {
            return Ok(Action::Done);
        }
        let spec = pod.spec.clone().unwrap_or_default();
        if !spec.scheduling_gates.is_empty() {
            return Ok(Action::Done);
        }
        let _one = self.decide.lock().await;
        let request = plugins::request_of(&spec);
        let nodes = self.snapshot(ctx);
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut best: Option<(i64, &NodeInfo)> = None;
        for n in &nodes {
            match plugins::filter(&spec, &request, n) {
                Ok(()) => {
                    let s = plugins::score(&request, n);
                    if best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, n));
                    }
                }
                Err(r) => *reasons.entry(r).or_default() += 1,
            }
        }
        let Some((_, chosen)) = best else {
            let message = plugins::summary(nodes.len(), &reasons);
            self.unschedulable(ctx, &obj, &pod, message).await?;
            // Node and pod events bring it back sooner; this is the fallback.
            return Ok(Action::RequeueAfter(Duration::from_secs(30)));
        };
        let node_name = chosen.name().to_string();
        let mut bound = pod.clone();
        bound.spec.get_or_insert_with(Default::default).node_name = node_name.clone();
        // The update carries the pod's resourceVersion: a pod changed or bound meanwhile is
        // a conflict, never a second bind.
        match ctx.client.update(pb::Object { kind: Some(pb::object::Kind::Pod(bound)) }).await {
            Ok(_) => {
                self.assumed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.to_string(), (node_name.clone(), request));
                let meta = pod.metadata.clone().unwrap_or_default();
                ctx.recorder.emit(
                    &reference_to(&obj),
                    "Normal",
                    "Scheduled",
                    &format!("Successfully assigned {}/{} to {node_name}", meta.namespace, meta.name),
                );
                Ok(Action::Done)
            }
            Err(e) if e.is_conflict() || e.is_not_found() => Ok(Action::Done),
            Err(e) => Err(e.into()),
        }
    }
}

/// The scheduler, competing for its own Lease as `identity`.
pub fn manager(client: Client, mut config: ManagerConfig) -> ControllerManager {
    config.leader = LeaderConfig { name: LEASE_NAME.into(), ..config.leader };
    config.component = SCHEDULER_NAME.into();
    let mut m = ControllerManager::new(client, config);
    m.register(Scheduler::default());
    m
}
