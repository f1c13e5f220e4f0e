//! The `keel.v1.Objects` service: Kubernetes-shaped objects over the store.
//!
//! Every write runs admission (defaulting, then validation) and one store transaction that
//! compares the object's revision, so writers never overwrite each other blindly. Keys are
//! `/registry/<resource>/<namespace>/<name>`; `metadata.resourceVersion` is the key's
//! mod_revision and is never stored inside the value.
//!
//! The parts, by job: the handlers here (they only unpack requests and name the caller),
//! `admission` (metadata, defaults, validation, authorization), `codec` (keys, names, the
//! stored form), `storage` (the read-decide-compare loops) and `watch` (store watches as watch events).

mod admission;
mod codec;
mod storage;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::auth::caller;
use super::authz::Verb;
use super::limits::WatchBudget;
use crate::api::object;
use crate::api::wellknown::DEFAULT_NAMESPACES;
use crate::proto::v1 as pb;
use crate::seal::Keyring;
use crate::store::Store;
use codec::{decode, key, lookup_kind, not_found};

pub struct ObjectsService {
    store: Store,
    keys: Arc<Keyring>,
    watches: Arc<WatchBudget>,
}

impl ObjectsService {
    pub fn new(store: Store, keys: Arc<Keyring>, watches: Arc<WatchBudget>) -> ObjectsService {
        ObjectsService { store, keys, watches }
    }

    /// The object `kind` `namespace/name`, read for the replica's own use (no caller checks).
    pub(in crate::server) async fn read_object(
        &self,
        kind: crate::api::kinds::Kind,
        namespace: &str,
        name: &str,
    ) -> Result<pb::Object, Status> {
        let info = crate::api::kinds::info(kind);
        let kv = self.read(&key(info, namespace, name)).await?.ok_or_else(|| not_found(info, name))?;
        decode(&kv, &self.keys)
    }
}

#[tonic::async_trait]
impl pb::objects_server::Objects for ObjectsService {
    async fn create(&self, request: Request<pb::CreateRequest>) -> Result<Response<pb::Object>, Status> {
        let who = caller(&request).cloned();
        let obj = request.into_inner().object.ok_or_else(|| Status::invalid_argument("object: Required value"))?;
        if let Some(info) = object::info(&obj) {
            let m = object::meta(&obj).cloned().unwrap_or_default();
            let ns = if info.namespaced && m.namespace.is_empty() { "default".to_string() } else { m.namespace };
            self.authorize_write(who.as_ref(), Verb::Create, info, &ns, &m.name, None)?;
        }
        self.create_object(obj).await.map(Response::new)
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::Object>, Status> {
        let who = caller(&request).cloned();
        let r = request.into_inner().r#ref.unwrap_or_default();
        let info = lookup_kind(&r.kind)?;
        let ns = if r.namespace.is_empty() { "default" } else { r.namespace.as_str() };
        self.authorize_read(who.as_ref(), Verb::Get, info, if info.namespaced { ns } else { "" }, &r.name).await?;
        let kv = self.read(&key(info, ns, &r.name)).await?.ok_or_else(|| not_found(info, &r.name))?;
        decode(&kv, &self.keys).map(Response::new)
    }

    async fn update(&self, request: Request<pb::UpdateRequest>) -> Result<Response<pb::Object>, Status> {
        let who = caller(&request).cloned();
        let obj = request.into_inner().object.ok_or_else(|| Status::invalid_argument("object: Required value"))?;
        self.update_object(obj, false, who.as_ref()).await.map(Response::new)
    }

    async fn update_status(&self, request: Request<pb::UpdateRequest>) -> Result<Response<pb::Object>, Status> {
        let who = caller(&request).cloned();
        let obj = request.into_inner().object.ok_or_else(|| Status::invalid_argument("object: Required value"))?;
        self.update_object(obj, true, who.as_ref()).await.map(Response::new)
    }

    async fn apply(&self, request: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let who = caller(&request).cloned();
        let r = request.into_inner();
        self.apply_objects(r.objects, r.dry_run, who.as_ref()).await.map(Response::new)
    }

    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let who = caller(&request).cloned();
        self.list_objects(request.into_inner(), who.as_ref()).await.map(Response::new)
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let who = caller(&request).cloned();
        self.delete_object(request.into_inner(), who.as_ref()).await.map(Response::new)
    }

    type WatchStream = watch::WatchStream;

    async fn watch(&self, request: Request<pb::WatchObjectsRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let who = caller(&request).cloned();
        self.open_watch(request.into_inner(), who.as_ref()).await.map(Response::new)
    }
}

/// Creates `default` and `kube-system` if they do not exist, retrying until the cluster
/// has a leader. Every replica runs it; the create is idempotent.
pub async fn ensure_default_namespaces(store: Store, keys: Arc<Keyring>) {
    let svc = ObjectsService::new(store, keys, WatchBudget::new(1));
    for name in DEFAULT_NAMESPACES {
        let ns = pb::Object {
            kind: Some(pb::object::Kind::Namespace(pb::Namespace {
                metadata: Some(pb::ObjectMeta { name: name.to_string(), ..Default::default() }),
                ..Default::default()
            })),
        };
        loop {
            match svc.create_object(ns.clone()).await {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::AlreadyExists => break,
                Err(s) => {
                    tracing::debug!(namespace = name, error = %s, "default namespace not created yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}
