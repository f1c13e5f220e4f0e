//! The namespace controller: deletes the content of a Terminating namespace, then releases
//! the namespace (removes the `kubernetes` spec finalizer) so that the API server deletes it.
//!
//! Objects in the namespace that hold finalizers of their own keep it Terminating until they
//! go, as in Kubernetes.

use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::api::kinds::{self, KINDS};
use crate::proto::v1 as pb;
use crate::proto::v1::objects_client::ObjectsClient;
use crate::server::objects::NAMESPACE_FINALIZER;

/// How often a Terminating namespace is looked at again while content remains.
const RETRY: Duration = Duration::from_millis(500);
/// A full re-list even when no watch event came.
const RESYNC: Duration = Duration::from_secs(30);

/// Runs until the task is dropped, against the replica at `addr`, as the replica itself
/// (its credentials renew; the client reconnects with the current ones after an error).
pub async fn run(addr: std::net::SocketAddr, creds: std::sync::Arc<crate::pki::LiveCredentials>) {
    let connect =
        || crate::client::endpoint(&addr.to_string(), &creds.get()).map(|e| ObjectsClient::new(e.connect_lazy()));
    let Ok(mut client) = connect() else { return };
    loop {
        match sweep(&mut client).await {
            Ok((rv, busy)) => wait_for_change(&mut client, rv, if busy { RETRY } else { RESYNC }).await,
            Err(s) => {
                tracing::debug!(error = %s, "namespace controller: list failed; retrying");
                tokio::time::sleep(RETRY).await;
                if let Ok(c) = connect() {
                    client = c;
                }
            }
        }
    }
}

/// Finalizes every Terminating namespace once. Returns the list's resourceVersion and
/// whether some namespace is still waiting for its content to go.
async fn sweep(c: &mut ObjectsClient<Channel>) -> Result<(String, bool), Status> {
    let list = c.list(pb::ListRequest { kind: "Namespace".into(), ..Default::default() }).await?.into_inner();
    let mut busy = false;
    for obj in list.items {
        let Some(pb::object::Kind::Namespace(ns)) = obj.kind else { continue };
        let m = ns.metadata.clone().unwrap_or_default();
        let held = ns.spec.as_ref().is_some_and(|s| s.finalizers.iter().any(|f| f == NAMESPACE_FINALIZER));
        if m.deletion_timestamp.is_empty() || !held {
            continue;
        }
        match finalize(c, ns).await {
            Ok(done) => busy |= !done,
            Err(s) => {
                tracing::debug!(namespace = m.name, error = %s, "namespace controller: will retry");
                busy = true;
            }
        }
    }
    Ok((list.resource_version, busy))
}

/// Deletes what is left in the namespace; releases it once nothing is. True when released.
async fn finalize(c: &mut ObjectsClient<Channel>, mut ns: pb::Namespace) -> Result<bool, Status> {
    let name = ns.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
    let mut remaining = 0;
    for info in KINDS.iter().filter(|k| k.namespaced) {
        let req = pb::ListRequest { kind: info.name.into(), namespace: name.clone(), ..Default::default() };
        for item in c.list(req).await?.into_inner().items {
            remaining += 1;
            let m = crate::api::object::meta(&item).cloned().unwrap_or_default();
            if !m.deletion_timestamp.is_empty() {
                continue;
            }
            let r = pb::ObjectRef { kind: info.name.into(), namespace: name.clone(), name: m.name.clone() };
            match c.delete(pb::DeleteRequest { r#ref: Some(r), ..Default::default() }).await {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(s),
            }
        }
    }
    if remaining > 0 {
        return Ok(false);
    }
    if let Some(spec) = ns.spec.as_mut() {
        spec.finalizers.retain(|f| f != NAMESPACE_FINALIZER);
    }
    let obj = pb::Object { kind: Some(pb::object::Kind::Namespace(ns)) };
    match c.update(pb::UpdateRequest { object: Some(obj) }).await {
        Ok(_) => Ok(true),
        // Another replica released it first, or it changed: look again next sweep.
        Err(s) if matches!(s.code(), Code::NotFound | Code::Aborted) => Ok(false),
        Err(s) => Err(s),
    }
}

/// Waits for a namespace event after `rv`, or `limit`, whichever comes first.
async fn wait_for_change(c: &mut ObjectsClient<Channel>, rv: String, limit: Duration) {
    let kind = kinds::info(kinds::Kind::Namespace).name.to_string();
    let req = pb::WatchObjectsRequest { kind, resource_version: rv, ..Default::default() };
    let wait = async {
        match c.watch(req).await {
            Ok(s) => {
                let _ = s.into_inner().message().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let _ = tokio::time::timeout(limit, wait).await;
}
