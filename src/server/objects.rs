//! The `keel.v1.Objects` service: Kubernetes-shaped objects over the store.
//!
//! Every write runs admission (defaulting, then validation) and one store transaction that
//! compares the object's revision, so writers never overwrite each other blindly. Keys are
//! `/registry/<resource>/<namespace>/<name>`; `metadata.resourceVersion` is the key's
//! mod_revision and is never stored inside the value.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use prost::Message;
use tonic::{Request, Response, Status};

use super::auth::caller;
use super::authz::{self, Verb};
use super::secrets::Keyring;
use super::status::from_store;
use crate::api::kinds::{self, KindInfo};
use crate::api::selector::{FieldSelector, LabelSelector};
use crate::api::{apply, defaults, object, validation};
use crate::pki::Identity;
use crate::proto::v1 as pb;
use crate::store::{delete_op, mod_equals, prefix_end, prefix_request, put_op, KeyRange, Store, WatchError};

pub const DEFAULT_NAMESPACES: &[&str] = &["default", "kube-system", super::authz::NODE_LEASE_NAMESPACE];

/// The spec finalizer that holds a deleted namespace until the namespace controller has
/// deleted its content.
pub const NAMESPACE_FINALIZER: &str = "kubernetes";

/// Whether a deleted object may go now: its finalizers (and a namespace's spec finalizers)
/// are all gone.
fn releasable(obj: &pb::Object) -> bool {
    let spec_held = match obj.kind.as_ref() {
        Some(pb::object::Kind::Namespace(n)) => n.spec.as_ref().is_some_and(|s| !s.finalizers.is_empty()),
        _ => false,
    };
    object::meta(obj).is_some_and(|m| m.finalizers.is_empty()) && !spec_held
}

pub struct ObjectsService {
    store: Store,
    keys: Arc<Keyring>,
}

impl ObjectsService {
    pub fn new(store: Store, keys: Arc<Keyring>) -> ObjectsService {
        ObjectsService { store, keys }
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// `deployments.apps` or `pods`, as Kubernetes names a resource in its messages.
fn resource_name(info: &KindInfo) -> String {
    match info.api_version.split_once('/') {
        Some((group, _)) => format!("{}.{group}", info.resource),
        None => info.resource.to_string(),
    }
}

fn key(info: &KindInfo, namespace: &str, name: &str) -> String {
    if info.namespaced {
        format!("/registry/{}/{namespace}/{name}", info.resource)
    } else {
        format!("/registry/{}/{name}", info.resource)
    }
}

fn prefix(info: &KindInfo, namespace: &str) -> String {
    if info.namespaced && !namespace.is_empty() {
        format!("/registry/{}/{namespace}/", info.resource)
    } else {
        format!("/registry/{}/", info.resource)
    }
}

fn lookup_kind(kind: &str) -> Result<&'static KindInfo, Status> {
    kinds::by_name(kind).ok_or_else(|| Status::not_found(format!("the server doesn't have a resource type {kind:?}")))
}

fn decode(kv: &pb::KeyValue, keys: &Keyring) -> Result<pb::Object, Status> {
    let plain = keys.open(&kv.value).map_err(|e| {
        Status::internal(format!("stored object at {} cannot be decrypted: {e}", String::from_utf8_lossy(&kv.key)))
    })?;
    let mut obj = pb::Object::decode(&*plain).map_err(|e| {
        Status::internal(format!("stored object at {} is damaged: {e}", String::from_utf8_lossy(&kv.key)))
    })?;
    if let Some(m) = object::meta_mut(&mut obj) {
        m.resource_version = kv.mod_revision.to_string();
    }
    object::set_type_meta(&mut obj);
    Ok(obj)
}

/// The stored form: protobuf, sealed for Secrets (see `secrets`).
fn encode(obj: &pb::Object, keys: &Keyring) -> Vec<u8> {
    // The revision is the store's, never part of the value; copy only to drop one.
    let bytes = if object::meta(obj).is_some_and(|m| !m.resource_version.is_empty()) {
        let mut stored = obj.clone();
        if let Some(m) = object::meta_mut(&mut stored) {
            m.resource_version.clear();
        }
        stored.encode_to_vec()
    } else {
        obj.encode_to_vec()
    };
    if object::kind(obj) == Some(kinds::Kind::Secret) {
        keys.seal(&bytes)
    } else {
        bytes
    }
}

fn invalid(info: &KindInfo, name: &str, errors: Vec<validation::FieldError>) -> Status {
    let summary = errors.iter().map(|e| format!("{}: {}", e.field, e.detail)).collect::<Vec<_>>().join(", ");
    let details = pb::FieldViolations {
        kind: info.name.to_string(),
        name: name.to_string(),
        violations: errors.into_iter().map(|e| pb::FieldViolation { field: e.field, detail: e.detail }).collect(),
    };
    Status::with_details(
        tonic::Code::InvalidArgument,
        format!("The {} {name:?} is invalid: {summary}", info.name),
        details.encode_to_vec().into(),
    )
}

/// How often an update or delete re-reads after losing a race to another writer.
const MAX_RETRIES: usize = 16;

/// The reads of a read-decide-compare loop (update, delete, apply): the replica's own copy
/// first, then a bounded number of linearizable reads. Each item says whether that read may be
/// local. The write compares the revision read, so a stale local read can only fail it;
/// an answer given without writing must come from a linearizable read.
struct Reads {
    local: bool,
    /// Linearizable reads still allowed.
    left: usize,
}

impl Default for Reads {
    fn default() -> Reads {
        Reads::up_to(MAX_RETRIES)
    }
}

impl Reads {
    /// The local read, then at most `linearizable` more.
    fn up_to(linearizable: usize) -> Reads {
        Reads { local: true, left: linearizable }
    }

    fn next(&mut self) -> Option<bool> {
        if std::mem::replace(&mut self.local, false) {
            return Some(true);
        }
        (self.left > 0).then(|| {
            self.left -= 1;
            false
        })
    }
}

fn conflict(info: &KindInfo, name: &str) -> Status {
    Status::aborted(format!(
        "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
        resource_name(info)
    ))
}

fn not_found(info: &KindInfo, name: &str) -> Status {
    Status::not_found(format!("{} {name:?} not found", resource_name(info)))
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let id = uuid::Uuid::new_v4();
    id.as_bytes().iter().take(5).map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect()
}

impl ObjectsService {
    async fn read(&self, key: &str) -> Result<Option<pb::KeyValue>, Status> {
        self.read_with(key, false).await
    }

    /// A stale (`serializable`) read is only for values that a transaction then compares, so a
    /// stale answer fails the write instead of deciding it.
    async fn read_with(&self, key: &str, serializable: bool) -> Result<Option<pb::KeyValue>, Status> {
        let req = pb::RangeRequest { key: key.into(), serializable, ..Default::default() };
        let r = self.store.range(req).await.map_err(from_store)?;
        Ok(r.kvs.into_iter().next())
    }

    /// One read of an update's or a delete's loop: the object, checked against the caller's
    /// resourceVersion (if any). NotFound and Conflict are answered from a linearizable read
    /// only; after a local read they give `Ok(None)`: read again.
    async fn read_current(
        &self,
        key: &str,
        serializable: bool,
        resource_version: &str,
        info: &KindInfo,
        name: &str,
    ) -> Result<Option<pb::KeyValue>, Status> {
        let verdict = match self.read_with(key, serializable).await? {
            None => Err(not_found(info, name)),
            Some(kv) if !resource_version.is_empty() && resource_version != kv.mod_revision.to_string() => {
                Err(conflict(info, name))
            }
            Some(kv) => Ok(kv),
        };
        match verdict {
            Err(_) if serializable => Ok(None),
            other => other.map(Some),
        }
    }

    /// Checks that a namespaced object's namespace exists and is not terminating; returns the
    /// namespace key and revision to compare in the write.
    async fn check_namespace(&self, namespace: &str, serializable: bool) -> Result<(String, i64), Status> {
        let ns_key = key(kinds::info(kinds::Kind::Namespace), "", namespace);
        let kv = self
            .read_with(&ns_key, serializable)
            .await?
            .ok_or_else(|| Status::not_found(format!("namespaces {namespace:?} not found")))?;
        let ns = decode(&kv, &self.keys)?;
        if object::meta(&ns).is_some_and(|m| !m.deletion_timestamp.is_empty()) {
            return Err(Status::failed_precondition(format!(
                "unable to create new content in namespace {namespace} because it is being terminated"
            )));
        }
        Ok((ns_key, kv.mod_revision))
    }

    /// Admission for a create: names, defaults, validation, server-owned metadata.
    fn admit_new(&self, mut obj: pb::Object) -> Result<(pb::Object, &'static KindInfo), Status> {
        let info = object::info(&obj).ok_or_else(|| Status::invalid_argument("object: Required value"))?;
        {
            let m = object::meta_mut(&mut obj).ok_or_else(|| Status::invalid_argument("object: Required value"))?;
            if info.namespaced {
                if m.namespace.is_empty() {
                    m.namespace = "default".into();
                }
            } else {
                m.namespace.clear();
            }
            if m.name.is_empty() && !m.generate_name.is_empty() {
                m.name = format!("{}{}", m.generate_name, random_suffix());
            }
            m.uid = uuid::Uuid::new_v4().to_string();
            m.creation_timestamp = now();
            m.deletion_timestamp.clear();
            m.resource_version.clear();
        }
        // A namespace is held by the namespace controller until its content is gone.
        if let Some(pb::object::Kind::Namespace(n)) = obj.kind.as_mut() {
            let spec = n.spec.get_or_insert_with(Default::default);
            if spec.finalizers.is_empty() {
                spec.finalizers.push(NAMESPACE_FINALIZER.to_string());
            }
        }
        let has_spec = object::has_status(&obj);
        if let Some(m) = object::meta_mut(&mut obj) {
            m.generation = if has_spec { 1 } else { 0 };
        }
        object::set_type_meta(&mut obj);
        defaults::apply(&mut obj);
        let errors = validation::validate(&obj);
        if !errors.is_empty() {
            let name = object::meta(&obj).map(|m| m.name.clone()).unwrap_or_default();
            return Err(invalid(info, &name, errors));
        }
        Ok((obj, info))
    }

    async fn create_object(&self, obj: pb::Object) -> Result<pb::Object, Status> {
        let (mut obj, info) = self.admit_new(obj)?;
        let (namespace, name) = object::meta(&obj).map(|m| (m.namespace.clone(), m.name.clone())).unwrap_or_default();
        let k = key(info, &namespace, &name);
        let value = encode(&obj, &self.keys);
        // First with a local read of the namespace (the transaction compares its revision, so
        // a stale read only fails the write), then once more with a linearizable read.
        for serializable in [true, false] {
            let mut compare = vec![mod_equals(&k, 0)];
            if info.namespaced {
                let (ns_key, ns_rev) = match self.check_namespace(&namespace, serializable).await {
                    Err(e) if serializable && e.code() == tonic::Code::NotFound => continue,
                    other => other?,
                };
                compare.push(mod_equals(&ns_key, ns_rev));
            }
            let txn = pb::TxnRequest { compare, success: vec![put_op(&k, value.clone())], failure: vec![] };
            let resp = self.store.txn(txn, true).await.map_err(from_store)?;
            if resp.succeeded {
                if let Some(m) = object::meta_mut(&mut obj) {
                    m.resource_version = resp.header.map_or(0, |h| h.revision).to_string();
                }
                return Ok(obj);
            }
            if self.read(&k).await?.is_some() {
                return Err(Status::already_exists(format!("{} {name:?} already exists", resource_name(info))));
            }
        }
        Err(Status::aborted(format!("namespace {namespace:?} changed during the create; retry")))
    }

    /// A write by `who`; nodes are held to their own objects (see `authz`).
    fn authorize_write(
        &self,
        who: Option<&Identity>,
        verb: Verb,
        info: &'static KindInfo,
        namespace: &str,
        name: &str,
        current: Option<&pb::Object>,
    ) -> Result<(), Status> {
        match who {
            Some(id @ Identity::Node(node)) => authz::node_may_write(node, verb, info, namespace, name, current)
                .map_err(|why| authz::forbidden(id, verb, info, namespace, name, why)),
            _ => Ok(()),
        }
    }

    /// A read by `who`: a node reads Secrets and ConfigMaps only one by one, and only those
    /// that pods bound to it refer to.
    async fn authorize_read(
        &self,
        who: Option<&Identity>,
        verb: Verb,
        info: &'static KindInfo,
        namespace: &str,
        name: &str,
    ) -> Result<(), Status> {
        let Some(id @ Identity::Node(node)) = who else { return Ok(()) };
        if !matches!(info.kind, kinds::Kind::Secret | kinds::Kind::ConfigMap) {
            return Ok(());
        }
        if verb != Verb::Get {
            return Err(authz::forbidden(
                id,
                verb,
                info,
                namespace,
                name,
                "a node may only get the ones its pods use, one by one",
            ));
        }
        let pods = kinds::info(kinds::Kind::Pod);
        let p = prefix(pods, namespace);
        let r = self.store.range(prefix_request(&p)).await.map_err(from_store)?;
        for kv in &r.kvs {
            let pod = decode(kv, &self.keys)?;
            if authz::pod_node(&pod) != Some(node.as_str()) {
                continue;
            }
            let (secrets, maps) = authz::pod_references(&pod);
            let refs = if info.kind == kinds::Kind::Secret { secrets } else { maps };
            if refs.iter().any(|r| r == name) {
                return Ok(());
            }
        }
        Err(authz::forbidden(id, verb, info, namespace, name, "no pod bound to this node refers to it"))
    }

    /// The object an update of `current` to `obj` stores: status (or, for UpdateStatus,
    /// everything but status) and server-owned metadata come from `current`; defaulted and
    /// validated; generation bumped when the spec changed.
    fn prepare_update(
        &self,
        info: &'static KindInfo,
        namespace: &str,
        current: &pb::Object,
        obj: &pb::Object,
        status_only: bool,
    ) -> Result<pb::Object, Status> {
        let mut next = if status_only {
            let mut n = current.clone();
            object::copy_status(obj, &mut n);
            n
        } else {
            object::with_status_of(obj, current)
        };
        let cur_meta = object::meta(current).cloned().unwrap_or_default();
        // Compare defaulted to defaulted, so that re-sending a manifest is not a change.
        defaults::apply(&mut next);
        let spec_changed = object::spec_changed(current, &next);
        if let Some(nm) = object::meta_mut(&mut next) {
            nm.namespace = if info.namespaced { namespace.to_string() } else { String::new() };
            nm.uid = cur_meta.uid.clone();
            nm.creation_timestamp = cur_meta.creation_timestamp.clone();
            nm.deletion_timestamp = cur_meta.deletion_timestamp.clone();
            nm.generate_name = cur_meta.generate_name.clone();
            nm.generation = cur_meta.generation + i64::from(spec_changed && !status_only && cur_meta.generation > 0);
            nm.resource_version = cur_meta.resource_version.clone();
        }
        object::set_type_meta(&mut next);
        let errors = validation::validate(&next);
        if !errors.is_empty() {
            return Err(invalid(info, &cur_meta.name, errors));
        }
        Ok(next)
    }

    async fn update_object(
        &self,
        obj: pb::Object,
        status_only: bool,
        who: Option<&Identity>,
    ) -> Result<pb::Object, Status> {
        let info = object::info(&obj).ok_or_else(|| Status::invalid_argument("object: Required value"))?;
        let m = object::meta(&obj).cloned().unwrap_or_default();
        let namespace =
            if info.namespaced && m.namespace.is_empty() { "default".to_string() } else { m.namespace.clone() };
        let k = key(info, &namespace, &m.name);
        // As Kubernetes' GuaranteedUpdate: when another writer commits between the read and
        // this transaction, read again and decide on the new state. The caller's
        // resourceVersion (if any) is checked against each read, so a stale one is a
        // conflict, an object deleted meanwhile is NotFound, and an update without one is
        // applied to the latest state.
        //
        // The first read is local (serializable), which spares a read-index round. The
        // transaction compares the revision that read saw, so a stale read can only fail the
        // write; every answer a stale read could get wrong without writing (NotFound, a
        // conflict, nothing to change) is taken again from a linearizable read.
        let mut reads = Reads::default();
        while let Some(serializable) = reads.next() {
            let Some(kv) = self.read_current(&k, serializable, &m.resource_version, info, &m.name).await? else {
                continue;
            };
            let current = decode(&kv, &self.keys)?;
            let verb = if status_only { Verb::UpdateStatus } else { Verb::Update };
            // A refusal (forbidden, invalid against the current object) is decided on the
            // latest state too.
            let decided = self
                .authorize_write(who, verb, info, &namespace, &m.name, Some(&current))
                .and_then(|()| self.prepare_update(info, &namespace, &current, &obj, status_only));
            let mut next = match decided {
                Err(_) if serializable => continue,
                other => other?,
            };
            if next == current {
                if serializable {
                    continue;
                }
                return Ok(current);
            }
            let txn = pb::TxnRequest {
                compare: vec![mod_equals(&k, kv.mod_revision)],
                success: vec![write_op(&k, &next, &self.keys)],
                failure: vec![],
            };
            let resp = self.store.txn(txn, true).await.map_err(from_store)?;
            if !resp.succeeded {
                continue;
            }
            if let Some(nm) = object::meta_mut(&mut next) {
                nm.resource_version = resp.header.map_or(0, |h| h.revision).to_string();
            }
            return Ok(next);
        }
        Err(conflict(info, &m.name))
    }

    /// A namespace that new objects may go into: its key and revision to compare, or None
    /// when it does not exist yet but `batch` (the same transaction) creates it.
    async fn namespace_for_create(
        &self,
        namespace: &str,
        batch: &HashSet<String>,
        serializable: bool,
    ) -> Result<Option<(String, i64)>, Status> {
        match self.check_namespace(namespace, serializable).await {
            Err(e) if e.code() == tonic::Code::NotFound && batch.contains(namespace) => Ok(None),
            other => other.map(Some),
        }
    }

    /// What applying one manifest does, from a read of its current state: the replica's own
    /// copy when `serializable` (see `apply_objects`), else a linearizable read.
    async fn plan_apply(
        &self,
        manifest: &pb::Object,
        batch: &HashSet<String>,
        who: Option<&Identity>,
        serializable: bool,
    ) -> Result<Planned, Status> {
        let info = object::info(manifest).ok_or_else(|| Status::invalid_argument("object: Required value"))?;
        let m = object::meta(manifest).cloned().unwrap_or_default();
        if m.name.is_empty() {
            return Err(Status::invalid_argument(format!(
                "The {} \"\" is invalid: metadata.name: Required value: apply needs a name (generateName is for create)",
                info.name
            )));
        }
        let namespace = match (info.namespaced, m.namespace.is_empty()) {
            (false, _) => String::new(),
            (true, true) => "default".to_string(),
            (true, false) => m.namespace.clone(),
        };
        let mut manifest = manifest.clone();
        if let Some(mm) = object::meta_mut(&mut manifest) {
            mm.namespace.clone_from(&namespace);
        }
        let k = key(info, &namespace, &m.name);
        let Some(kv) = self.read_with(&k, serializable).await? else {
            self.authorize_write(who, Verb::Create, info, &namespace, &m.name, None)?;
            let (obj, _) = self.admit_new(apply::for_create(&manifest))?;
            let mut compare = vec![mod_equals(&k, 0)];
            if info.namespaced {
                if let Some((ns_key, rev)) = self.namespace_for_create(&namespace, batch, serializable).await? {
                    compare.push(mod_equals(&ns_key, rev));
                }
            }
            return Ok(Planned {
                op: Some(put_op(&k, encode(&obj, &self.keys))),
                key: k,
                compare,
                object: obj,
                action: "created",
            });
        };
        if !m.resource_version.is_empty() && m.resource_version != kv.mod_revision.to_string() {
            return Err(conflict(info, &m.name));
        }
        let current = decode(&kv, &self.keys)?;
        self.authorize_write(who, Verb::Update, info, &namespace, &m.name, Some(&current))?;
        let desired = apply::merge(&current, &manifest).map_err(Status::invalid_argument)?;
        let next = self.prepare_update(info, &namespace, &current, &desired, false)?;
        let compare = vec![mod_equals(&k, kv.mod_revision)];
        if next == current {
            return Ok(Planned { op: None, key: k, compare, object: current, action: "unchanged" });
        }
        Ok(Planned { op: Some(write_op(&k, &next, &self.keys)), key: k, compare, object: next, action: "configured" })
    }

    /// Applies every object in one transaction, re-planning when another writer got there
    /// between the reads and the commit.
    async fn apply_objects(
        &self,
        objects: Vec<pb::Object>,
        dry_run: bool,
        who: Option<&Identity>,
    ) -> Result<pb::ApplyResponse, Status> {
        if objects.is_empty() {
            return Err(Status::invalid_argument("objects: Required value"));
        }
        let many = objects.len() > 1;
        let batch: HashSet<String> = objects
            .iter()
            .filter(|o| object::kind(o) == Some(kinds::Kind::Namespace))
            .filter_map(|o| object::meta(o).map(|m| m.name.clone()))
            .collect();
        // The first plan reads the replica's own copies: the transaction compares every
        // revision the plan read, so stale copies can only fail it. An answer given without
        // writing (an error, a dry run, nothing to change) comes from linearizable reads.
        let mut reads = Reads::up_to(5);
        while let Some(serializable) = reads.next() {
            let mut plans: Vec<Planned> = Vec::with_capacity(objects.len());
            for (i, obj) in objects.iter().enumerate() {
                let p = match self.plan_apply(obj, &batch, who, serializable).await {
                    Ok(p) => p,
                    Err(_) if serializable => break,
                    Err(s) => return Err(about(s, i, obj, many)),
                };
                if let Some(j) = plans.iter().position(|q| q.key == p.key) {
                    return Err(Status::invalid_argument(format!(
                        "objects[{i}] and objects[{j}] are the same object ({}); apply each object once",
                        p.key.trim_start_matches("/registry/")
                    )));
                }
                plans.push(p);
            }
            let writes: Vec<pb::RequestOp> = plans.iter().filter_map(|p| p.op.clone()).collect();
            let results = |plans: Vec<Planned>, rev: Option<i64>| {
                plans
                    .into_iter()
                    .map(|mut p| {
                        if let (Some(rev), Some(_), Some(m)) = (rev, &p.op, object::meta_mut(&mut p.object)) {
                            m.resource_version = rev.to_string();
                        }
                        pb::ApplyResult { object: Some(p.object), action: p.action.to_string() }
                    })
                    .collect()
            };
            if serializable && (plans.len() < objects.len() || dry_run || writes.is_empty()) {
                continue;
            }
            if dry_run || writes.is_empty() {
                return Ok(pb::ApplyResponse { results: results(plans, None), resource_version: String::new() });
            }
            let compare = plans.iter().flat_map(|p| p.compare.iter().cloned()).collect();
            let resp = self
                .store
                .txn(pb::TxnRequest { compare, success: writes, failure: vec![] }, true)
                .await
                .map_err(from_store)?;
            if resp.succeeded {
                let rev = resp.header.map_or(0, |h| h.revision);
                return Ok(pb::ApplyResponse { results: results(plans, Some(rev)), resource_version: rev.to_string() });
            }
        }
        Err(Status::aborted("the objects kept changing while they were applied; retry"))
    }
}

/// One object's part of an Apply transaction.
struct Planned {
    key: String,
    compare: Vec<pb::Compare>,
    op: Option<pb::RequestOp>,
    object: pb::Object,
    action: &'static str,
}

/// The write that stores `next`: a put, or the delete of an object whose deletion was
/// requested and whose last finalizer just went.
fn write_op(k: &str, next: &pb::Object, keys: &Keyring) -> pb::RequestOp {
    let finished = object::meta(next).is_some_and(|m| !m.deletion_timestamp.is_empty()) && releasable(next);
    if finished {
        delete_op(k)
    } else {
        put_op(k, encode(next, keys))
    }
}

/// Names the object a status is about, when a request carries several.
fn about(s: Status, index: usize, obj: &pb::Object, many: bool) -> Status {
    if !many {
        return s;
    }
    let info = object::info(obj);
    let name = object::meta(obj).map(|m| m.name.as_str()).unwrap_or_default();
    let what = info.map(|i| format!("{}/{name}", resource_name(i))).unwrap_or_default();
    Status::with_details(s.code(), format!("objects[{index}] ({what}): {}", s.message()), s.details().to_vec().into())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

fn field_value(obj: &pb::Object, field: &str) -> String {
    let m = object::meta(obj);
    match field {
        "metadata.name" => m.map(|m| m.name.clone()).unwrap_or_default(),
        "metadata.namespace" => m.map(|m| m.namespace.clone()).unwrap_or_default(),
        "spec.nodeName" => object::pod_fields(obj).map(|f| f.0.to_string()).unwrap_or_default(),
        "status.phase" => object::pod_fields(obj).map(|f| f.1.to_string()).unwrap_or_default(),
        _ => match obj.kind.as_ref() {
            Some(pb::object::Kind::Event(e)) => {
                let r = e.involved_object.clone().unwrap_or_default();
                match field {
                    "involvedObject.kind" => r.kind,
                    "involvedObject.name" => r.name,
                    "involvedObject.namespace" => r.namespace,
                    "involvedObject.uid" => r.uid,
                    "reason" => e.reason.clone(),
                    "type" => e.r#type.clone(),
                    _ => String::new(),
                }
            }
            _ => String::new(),
        },
    }
}

struct Filter {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn parse(labels: &str, fields: &str) -> Result<Filter, Status> {
        Ok(Filter {
            labels: LabelSelector::parse(labels).map_err(|e| Status::invalid_argument(e.to_string()))?,
            fields: FieldSelector::parse(fields).map_err(|e| Status::invalid_argument(e.to_string()))?,
        })
    }

    /// No selector at all: every object matches.
    fn is_everything(&self) -> bool {
        self.labels.0.is_empty() && self.fields.0.is_empty()
    }

    fn matches(&self, obj: &pb::Object) -> bool {
        let empty = Default::default();
        let labels = object::meta(obj).map_or(&empty, |m| &m.labels);
        self.labels.matches(labels) && self.fields.matches(|f| field_value(obj, f))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
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

    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let who = caller(&request).cloned();
        let r = request.into_inner();
        let info = lookup_kind(&r.kind)?;
        self.authorize_read(who.as_ref(), Verb::List, info, &r.namespace, "").await?;
        let filter = Filter::parse(&r.label_selector, &r.field_selector)?;
        let p = prefix(info, &r.namespace);
        // The token carries the first page's revision, so that every page reports it and a
        // watch from it replays whatever changed while the pages were read.
        let (first_rev, start) = if r.r#continue.is_empty() {
            (None, p.clone().into_bytes())
        } else {
            unhex(&r.r#continue)
                .filter(|t| t.len() > 8 && t[8..].starts_with(p.as_bytes()))
                .map(|t| (Some(i64::from_be_bytes(t[..8].try_into().unwrap_or_default())), t[8..].to_vec()))
                .ok_or_else(|| Status::invalid_argument("continue: not a token from a previous list of this kind"))?
        };
        let resp = self
            .store
            .range(pb::RangeRequest {
                key: start,
                range_end: prefix_end(p.as_bytes()),
                limit: r.limit.max(0),
                ..Default::default()
            })
            .await
            .map_err(from_store)?;
        let mut items = Vec::new();
        for kv in &resp.kvs {
            let obj = decode(kv, &self.keys)?;
            if filter.matches(&obj) {
                items.push(obj);
            }
        }
        let rev = first_rev.unwrap_or_else(|| resp.header.map_or(0, |h| h.revision));
        let token = |next: &[u8]| {
            let mut t = rev.to_be_bytes().to_vec();
            t.extend_from_slice(next);
            hex(&t)
        };
        Ok(Response::new(pb::ListResponse {
            items,
            resource_version: rev.to_string(),
            r#continue: if resp.more { token(&resp.next_key) } else { String::new() },
        }))
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

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let who = caller(&request).cloned();
        let r = request.into_inner();
        let reference = r.r#ref.unwrap_or_default();
        let info = lookup_kind(&reference.kind)?;
        let ns = if reference.namespace.is_empty() { "default" } else { reference.namespace.as_str() };
        if info.kind == kinds::Kind::Namespace && DEFAULT_NAMESPACES.contains(&reference.name.as_str()) {
            return Err(Status::permission_denied(format!(
                "namespaces {:?} is forbidden: this namespace may not be deleted",
                reference.name
            )));
        }
        let policy = match r.propagation_policy.as_str() {
            "" | "Background" => None,
            "Foreground" => Some("foregroundDeletion"),
            "Orphan" => Some("orphan"),
            other => {
                return Err(Status::invalid_argument(format!(
                    "propagationPolicy: Unsupported value: {other:?}: supported values: \"Background\", \"Foreground\", \"Orphan\""
                )))
            }
        };
        let k = key(info, ns, &reference.name);
        // Another writer between the read and the commit: read again (see update_object,
        // also for the local first read). Only the caller's own precondition makes a delete
        // a conflict.
        let mut reads = Reads::default();
        while let Some(serializable) = reads.next() {
            let Some(kv) = self.read_current(&k, serializable, &r.resource_version, info, &reference.name).await?
            else {
                continue;
            };
            let mut obj = decode(&kv, &self.keys)?;
            let scope = if info.namespaced { ns } else { "" };
            match self.authorize_write(who.as_ref(), Verb::Delete, info, scope, &reference.name, Some(&obj)) {
                Err(_) if serializable => continue,
                other => other?,
            }
            if let Some(m) = object::meta_mut(&mut obj) {
                if let Some(f) = policy {
                    if !m.finalizers.iter().any(|x| x == f) {
                        m.finalizers.push(f.to_string());
                    }
                }
            }
            let holds = !releasable(&obj);
            if holds {
                if let Some(m) = object::meta_mut(&mut obj) {
                    if m.deletion_timestamp.is_empty() {
                        m.deletion_timestamp = now();
                    }
                }
                if let Some(pb::object::Kind::Namespace(n)) = obj.kind.as_mut() {
                    n.status.get_or_insert_with(Default::default).phase = "Terminating".into();
                }
            }
            let op = if holds { put_op(&k, encode(&obj, &self.keys)) } else { delete_op(&k) };
            let txn =
                pb::TxnRequest { compare: vec![mod_equals(&k, kv.mod_revision)], success: vec![op], failure: vec![] };
            let resp = self.store.txn(txn, true).await.map_err(from_store)?;
            if !resp.succeeded {
                continue;
            }
            if holds {
                if let Some(m) = object::meta_mut(&mut obj) {
                    m.resource_version = resp.header.map_or(0, |h| h.revision).to_string();
                }
            }
            return Ok(Response::new(pb::DeleteResponse { object: Some(obj), deleted: !holds }));
        }
        Err(conflict(info, &reference.name))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<pb::WatchObjectsRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let who = caller(&request).cloned();
        let r = request.into_inner();
        let info = lookup_kind(&r.kind)?;
        self.authorize_read(who.as_ref(), Verb::Watch, info, &r.namespace, "").await?;
        let filter = Filter::parse(&r.label_selector, &r.field_selector)?;
        let start = match r.resource_version.as_str() {
            "" | "0" => 0,
            v => v
                .parse::<i64>()
                .ok()
                .filter(|rv| *rv >= 0)
                .and_then(|rv| rv.checked_add(1))
                .ok_or_else(|| Status::invalid_argument(format!("resourceVersion: Invalid value: {v:?}")))?,
        };
        let p = prefix(info, &r.namespace);
        let watch = self.store.watch(KeyRange::prefix(p.as_bytes()), start).map_err(|e| match e {
            WatchError::Compacted { requested, oldest, .. } => Status::out_of_range(format!(
                "too old resource version: {} ({}); re-list and watch from the list's resourceVersion",
                requested - 1,
                oldest - 1
            )),
            other => super::status::from_watch(&other),
        })?;
        let bookmarks = r.allow_bookmarks.then(|| {
            let period = Duration::from_secs(1);
            tokio::time::interval_at(tokio::time::Instant::now() + period, period)
        });
        let stream = ObjectWatch {
            watch,
            filter,
            keys: self.keys.clone(),
            store: self.store.clone(),
            bookmarks,
            pending: VecDeque::new(),
            done: false,
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Sends one batch's events that pass the filter, mapping selector transitions (an object
/// that stops matching is DELETED for this watcher). False when the watch is over.
/// One object of a watch event as every watcher of the revision shares it: decoded (for
/// selectors) and encoded (for the wire), with its resourceVersion set to the revision.
struct SharedObject {
    object: pb::Object,
    encoded: prost::bytes::Bytes,
}

/// A change as every watcher of the revision shares it.
struct SharedEvent {
    new: Option<SharedObject>,
    old: Option<SharedObject>,
}

/// The changes of one revision, decoded and encoded once (`Events::memo`), or why they
/// cannot be.
type SharedEvents = Result<Vec<SharedEvent>, (tonic::Code, String)>;

fn share(events: &[pb::Event], revision: i64, keys: &Keyring) -> SharedEvents {
    let rev = revision.to_string();
    let one = |kv: &Option<pb::KeyValue>| -> Result<Option<SharedObject>, (tonic::Code, String)> {
        let Some(kv) = kv.as_ref().filter(|kv| !kv.value.is_empty()) else { return Ok(None) };
        let mut object = decode(kv, keys).map_err(|s| (s.code(), s.message().to_string()))?;
        if let Some(m) = object::meta_mut(&mut object) {
            m.resource_version.clone_from(&rev);
        }
        let encoded = object.encode_to_vec().into();
        Ok(Some(SharedObject { object, encoded }))
    };
    events
        .iter()
        .map(|e| {
            let is_delete = e.r#type == pb::event::EventType::Delete as i32;
            Ok(SharedEvent { new: if is_delete { None } else { one(&e.kv)? }, old: one(&e.prev_kv)? })
        })
        .collect()
}

/// The response stream of one Watch: pulls batches from the store's watch as the client
/// takes events, so each event costs one hop from the hub to the wire (no task, no channel
/// of its own). A client that stops reading stops pulling; the hub then cuts it off as slow,
/// with a resumable error.
struct ObjectWatch {
    watch: crate::store::Watch,
    filter: Filter,
    keys: Arc<Keyring>,
    store: Store,
    bookmarks: Option<tokio::time::Interval>,
    pending: VecDeque<Result<pb::WatchEvent, Status>>,
    done: bool,
}

impl ObjectWatch {
    /// Queues the watch events of one batch (or the error that ends the watch).
    fn expand(&mut self, batch: Result<crate::store::WatchBatch, WatchError>) {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                self.pending.push_back(Err(super::status::from_watch(&e)));
                self.done = true;
                return;
            }
        };
        let revision = batch.revision;
        let keys = &self.keys;
        let shared = batch
            .events
            .memo(|events| share(events, revision, keys))
            .unwrap_or_else(|| Arc::new(share(&batch.events, revision, keys)));
        let events = match shared.as_ref() {
            Ok(events) => events,
            Err((code, message)) => {
                self.pending.push_back(Err(Status::new(*code, message.clone())));
                self.done = true;
                return;
            }
        };
        let everything = self.filter.is_everything();
        let filter = &self.filter;
        for e in events {
            let matches =
                |o: &Option<SharedObject>| o.as_ref().is_some_and(|o| everything || filter.matches(&o.object));
            let was = matches(&e.old);
            let (kind, obj) = match &e.new {
                Some(n) if everything || filter.matches(&n.object) => (if was { "MODIFIED" } else { "ADDED" }, n),
                Some(n) if was => ("DELETED", n),
                Some(_) => continue,
                None => match &e.old {
                    Some(o) if was => ("DELETED", o),
                    _ => continue,
                },
            };
            self.pending.push_back(Ok(pb::WatchEvent::encoded(kind, obj.encoded.clone(), revision.to_string())));
        }
    }
}

impl Stream for ObjectWatch {
    type Item = Result<pb::WatchEvent, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if let Some(ev) = this.pending.pop_front() {
                return Poll::Ready(Some(ev));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Poll::Ready(batch) = this.watch.poll_batch(cx) {
                this.expand(batch);
                continue;
            }
            let due = this.bookmarks.as_mut().is_some_and(|b| b.poll_tick(cx).is_ready());
            if !due {
                return Poll::Pending;
            }
            // Every event up to `rev` is queued for this watch already: queue them first, so
            // that the bookmark never runs ahead of what was delivered.
            let rev = this.store.watch_revision();
            while let Some(b) = this.watch.try_next() {
                this.expand(b);
                if this.done {
                    break;
                }
            }
            if !this.done {
                let ev = pb::WatchEvent {
                    r#type: "BOOKMARK".into(),
                    resource_version: rev.to_string(),
                    ..Default::default()
                };
                this.pending.push_back(Ok(ev));
            }
        }
    }
}

/// Creates `default` and `kube-system` if they do not exist, retrying until the cluster
/// has a leader. Every replica runs it; the create is idempotent.
pub async fn ensure_default_namespaces(store: Store, keys: Arc<Keyring>) {
    let svc = ObjectsService::new(store, keys);
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
