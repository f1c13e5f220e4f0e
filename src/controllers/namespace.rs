//! The namespace controller: deletes the content of a Terminating namespace, then releases
//! the namespace (removes the `kubernetes` spec finalizer) so that the API server deletes it.
//!
//! Objects in the namespace that hold finalizers of their own keep it Terminating until they
//! go, as in Kubernetes. It reads namespaces from the shared informer and the content with
//! lists, and writes only through the API.

use std::time::Duration;

use crate::api::kinds::{Kind, KINDS};
use crate::api::object;
use crate::api::wellknown::NAMESPACE_FINALIZER;
use crate::client::{DeleteOptions, ListOptions};
use crate::proto::v1 as pb;

use super::runtime::{Action, Context, Controller, ReconcileError};

pub struct NamespaceController {
    /// How soon a Terminating namespace is looked at again while content remains.
    pub retry: Duration,
}

impl Default for NamespaceController {
    fn default() -> NamespaceController {
        NamespaceController { retry: Duration::from_secs(1) }
    }
}

impl Controller for NamespaceController {
    fn name(&self) -> &'static str {
        "namespace"
    }

    fn primary(&self) -> Kind {
        Kind::Namespace
    }

    async fn reconcile(&self, key: &str, ctx: &Context) -> Result<Action, ReconcileError> {
        let Some(obj) = ctx.informers.informer(Kind::Namespace).get(key) else { return Ok(Action::Done) };
        let Some(pb::object::Kind::Namespace(ns)) = obj.kind.clone() else { return Ok(Action::Done) };
        let terminating = ns.metadata.as_ref().is_some_and(|m| !m.deletion_timestamp.is_empty());
        let held = ns.spec.as_ref().is_some_and(|s| s.finalizers.iter().any(|f| f == NAMESPACE_FINALIZER));
        if !terminating || !held {
            return Ok(Action::Done);
        }
        let remaining = delete_content(ctx, key).await?;
        if remaining > 0 {
            return Ok(Action::RequeueAfter(self.retry));
        }
        release(ctx, ns).await
    }
}

/// Deletes what is left in `namespace`; returns how many objects are still there (being
/// deleted, or held by their own finalizers).
async fn delete_content(ctx: &Context, namespace: &str) -> Result<usize, ReconcileError> {
    let mut remaining = 0;
    for info in KINDS.iter().filter(|k| k.namespaced) {
        let items = ctx.client.list_all(info.kind, &ListOptions::namespace(namespace)).await?.items;
        for item in items {
            remaining += 1;
            let m = object::meta(&item).cloned().unwrap_or_default();
            if !m.deletion_timestamp.is_empty() {
                continue;
            }
            match ctx.client.delete(info.kind, namespace, &m.name, &DeleteOptions::default()).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(remaining)
}

/// Removes the finalizer, compared on the revision the cache saw: if the namespace changed
/// since, the update is a conflict and the next reconcile decides on the new state.
async fn release(ctx: &Context, mut ns: pb::Namespace) -> Result<Action, ReconcileError> {
    if let Some(spec) = ns.spec.as_mut() {
        spec.finalizers.retain(|f| f != NAMESPACE_FINALIZER);
    }
    match ctx.client.update(pb::Object { kind: Some(pb::object::Kind::Namespace(ns)) }).await {
        Ok(_) => Ok(Action::Done),
        // Gone already: nothing left to do.
        Err(e) if e.is_not_found() => Ok(Action::Done),
        Err(e) => Err(e.into()),
    }
}
