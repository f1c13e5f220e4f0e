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

use tonic::Status;

use crate::api::kinds::{Kind, KindInfo};
use crate::api::wellknown::NODE_LEASE_NAMESPACE;
use crate::pki::Identity;
use crate::proto::v1 as pb;

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
        (Kind::Pod, Verb::UpdateStatus | Verb::Delete) if current.and_then(crate::api::pod::node_of) == Some(node) => {
            Ok(())
        }
        (Kind::Pod, _) => Err("a node may only update the status of, or delete, pods bound to it"),
        _ => Err("a node may not write this kind"),
    }
}
