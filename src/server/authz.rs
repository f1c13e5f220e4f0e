//! Who may do what through the Objects API.
//!
//! Admins and replicas (whose controllers run as the replica) may do anything. A node is
//! held to what its agent needs, as Kubernetes' Node authorizer and NodeRestriction
//! admission do:
//!
//! - it may write only its own Node, its own Lease (in `kube-node-lease`), Events, and the
//!   status of pods bound to it; it may delete pods bound to it;
//! - it may read Secrets and ConfigMaps only one by one, and only those that a pod bound
//!   to it refers to (volumes, env, envFrom, projected sources, imagePullSecrets);
//! - it may read every other kind.

use serde_json::Value;
use tonic::Status;

use crate::api::json;
use crate::api::kinds::{Kind, KindInfo};
use crate::pki::Identity;
use crate::proto::v1 as pb;

pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    UpdateStatus,
    Delete,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::UpdateStatus => "update status of",
            Verb::Delete => "delete",
        }
    }
}

/// The refusal Kubernetes would print, with the rule that applied.
pub fn forbidden(who: &Identity, verb: Verb, info: &KindInfo, namespace: &str, name: &str, why: &str) -> Status {
    let user = match who {
        Identity::Node(n) => format!("system:node:{n}"),
        Identity::Replica(id) => format!("system:keel:replica:{id}"),
        Identity::Admin(n) => n.clone(),
    };
    let what = if name.is_empty() { info.resource.to_string() } else { format!("{} {name:?}", info.resource) };
    let scope = if namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace {namespace:?}")
    };
    Status::permission_denied(format!(
        "{what} is forbidden: User {user:?} cannot {} resource {:?} {scope}: {why}",
        verb.as_str(),
        info.resource
    ))
}

/// The node a stored pod is bound to.
pub fn pod_node(obj: &pb::Object) -> Option<&str> {
    match obj.kind.as_ref()? {
        pb::object::Kind::Pod(p) => p.spec.as_ref().map(|s| s.node_name.as_str()).filter(|n| !n.is_empty()),
        _ => None,
    }
}

/// The Secrets and ConfigMaps a pod refers to, by name.
pub fn pod_references(pod: &pb::Object) -> (Vec<String>, Vec<String>) {
    fn walk(v: &Value, parent: &str, secrets: &mut Vec<String>, maps: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                let name = m.get("name").and_then(Value::as_str).map(str::to_string);
                match parent {
                    "secret" | "secretRef" | "secretKeyRef" => secrets.extend(name),
                    "configMap" | "configMapRef" | "configMapKeyRef" => maps.extend(name),
                    "imagePullSecrets" => secrets.extend(name),
                    _ => {}
                }
                if let Some(s) = m.get("secretName").and_then(Value::as_str) {
                    secrets.push(s.to_string());
                }
                for (k, child) in m {
                    walk(child, k, secrets, maps);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, parent, secrets, maps)),
            _ => {}
        }
    }
    let mut secrets = Vec::new();
    let mut maps = Vec::new();
    let v = json::to_value(pod);
    if let Some(spec) = v.get("spec") {
        walk(spec, "spec", &mut secrets, &mut maps);
    }
    (secrets, maps)
}

/// A node's write, decided on the object as stored (`current`) and as sent (`new`).
pub fn node_may_write(
    node: &str,
    verb: Verb,
    info: &KindInfo,
    namespace: &str,
    name: &str,
    current: Option<&pb::Object>,
) -> Result<(), &'static str> {
    match (info.kind, verb) {
        (Kind::Node, Verb::Create | Verb::Update | Verb::UpdateStatus) if name == node => Ok(()),
        (Kind::Node, _) => Err("a node may only create and update its own Node object"),
        (Kind::Lease, Verb::Create | Verb::Update | Verb::Delete)
            if namespace == NODE_LEASE_NAMESPACE && name == node =>
        {
            Ok(())
        }
        (Kind::Lease, _) => Err("a node may only write its own Lease in kube-node-lease"),
        (Kind::Event, Verb::Create | Verb::Update) => Ok(()),
        (Kind::Pod, Verb::UpdateStatus | Verb::Delete) if current.and_then(pod_node) == Some(node) => Ok(()),
        (Kind::Pod, _) => Err("a node may only update the status of, or delete, pods bound to it"),
        _ => Err("a node may not write this kind"),
    }
}
