//! The storage half of the Objects service: store keys, the stored form of an object
//! (protobuf, sealed for Secrets), and the read-decide-compare loops of every write
//! (Kubernetes' GuaranteedUpdate): create, update, delete, apply, and paged lists.
//!
//! A write compares the revision it decided on, so a concurrent writer makes it read again
//! instead of being overwritten; the first read may be the replica's own copy, since a stale
//! one can only fail the compare, and every answer given without writing is read again
//! linearizably.

use std::collections::HashSet;

use tonic::Status;

use super::codec::{conflict, decode, encode, key, lookup_kind, not_found, now, prefix, resource_name};
use super::ObjectsService;
use crate::api::kinds::{self, KindInfo};
use crate::api::selector::ObjectFilter;
use crate::api::wellknown::DEFAULT_NAMESPACES;
use crate::api::{apply, object};
use crate::pki::Identity;
use crate::proto::v1 as pb;
use crate::seal::Keyring;
use crate::server::authz::Verb;
use crate::server::status::from_store;
use crate::store::{delete_op, mod_equals, prefix_end, put_op};

/// How often an update or delete re-reads after losing a race to another writer.
pub(super) const MAX_RETRIES: usize = 16;

/// The reads of a read-decide-compare loop (update, delete, apply): the replica's own copy
/// first, then a bounded number of linearizable reads. Each item says whether that read may be
/// local. The write compares the revision read, so a stale local read can only fail it;
/// an answer given without writing must come from a linearizable read.
pub(super) struct Reads {
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
    pub(super) fn up_to(linearizable: usize) -> Reads {
        Reads { local: true, left: linearizable }
    }

    pub(super) fn next(&mut self) -> Option<bool> {
        if std::mem::replace(&mut self.local, false) {
            return Some(true);
        }
        (self.left > 0).then(|| {
            self.left -= 1;
            false
        })
    }
}

impl ObjectsService {
    pub(super) async fn read(&self, key: &str) -> Result<Option<pb::KeyValue>, Status> {
        self.read_with(key, false).await
    }

    /// A stale (`serializable`) read is only for values that a transaction then compares, so a
    /// stale answer fails the write instead of deciding it.
    pub(super) async fn read_with(&self, key: &str, serializable: bool) -> Result<Option<pb::KeyValue>, Status> {
        let req = pb::RangeRequest { key: key.into(), serializable, ..Default::default() };
        let r = self.store.range(req).await.map_err(from_store)?;
        Ok(r.kvs.into_iter().next())
    }

    /// One read of an update's or a delete's loop: the object, checked against the caller's
    /// resourceVersion (if any). NotFound and Conflict are answered from a linearizable read
    /// only; after a local read they give `Ok(None)`: read again.
    pub(super) async fn read_current(
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
    pub(super) async fn check_namespace(&self, namespace: &str, serializable: bool) -> Result<(String, i64), Status> {
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
    pub(super) async fn create_object(&self, obj: pb::Object) -> Result<pb::Object, Status> {
        let (mut obj, info) = self.admit_new(obj)?;
        let (namespace, name) = object::meta(&obj).map(|m| (m.namespace.clone(), m.name.clone())).unwrap_or_default();
        let k = key(info, &namespace, &name);
        let value = encode(&obj, &self.keys)?;
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
    pub(super) async fn update_object(
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
            // The caller's resourceVersion is checked after authorization: a caller that may
            // not write the object learns nothing from a conflict.
            let Some(kv) = self.read_current(&k, serializable, "", info, &m.name).await? else {
                continue;
            };
            let current = decode(&kv, &self.keys)?;
            let verb = if status_only { Verb::UpdateStatus } else { Verb::Update };
            // A refusal (forbidden, invalid against the current object) is decided on the
            // latest state too.
            let stale = !m.resource_version.is_empty() && m.resource_version != kv.mod_revision.to_string();
            let decided = self
                .authorize_write(who, verb, info, &namespace, &m.name, Some(&current))
                .and_then(|()| if stale { Err(conflict(info, &m.name)) } else { Ok(()) })
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
                success: vec![write_op(&k, &next, &self.keys)?],
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
    pub(super) async fn namespace_for_create(
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
    pub(super) async fn plan_apply(
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
                op: Some(put_op(&k, encode(&obj, &self.keys)?)),
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
        Ok(Planned { op: Some(write_op(&k, &next, &self.keys)?), key: k, compare, object: next, action: "configured" })
    }

    /// Applies every object in one transaction, re-planning when another writer got there
    /// between the reads and the commit.
    pub(super) async fn apply_objects(
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
pub(super) struct Planned {
    key: String,
    compare: Vec<pb::Compare>,
    op: Option<pb::RequestOp>,
    object: pb::Object,
    action: &'static str,
}

/// The write that stores `next`: a put, or the delete of an object whose deletion was
/// requested and whose last finalizer just went.
pub(super) fn write_op(k: &str, next: &pb::Object, keys: &Keyring) -> Result<pb::RequestOp, Status> {
    let finished = object::meta(next).is_some_and(|m| !m.deletion_timestamp.is_empty()) && object::releasable(next);
    if finished {
        Ok(delete_op(k))
    } else {
        Ok(put_op(k, encode(next, keys)?))
    }
}

impl ObjectsService {
    /// One page of a list, read at the first page's revision (the continue token carries it).
    pub(super) async fn list_objects(
        &self,
        r: pb::ListRequest,
        who: Option<&Identity>,
    ) -> Result<pb::ListResponse, Status> {
        let info = lookup_kind(&r.kind)?;
        self.authorize_read(who, Verb::List, info, &r.namespace, "").await?;
        let filter = ObjectFilter::parse(&r.label_selector, &r.field_selector)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let p = prefix(info, &r.namespace);
        // The token carries the first page's revision, so that every page reports it and a
        // watch from it replays whatever changed while the pages were read.
        let (first_rev, start) = if r.r#continue.is_empty() {
            (None, p.clone().into_bytes())
        } else {
            hex::decode(&r.r#continue)
                .ok()
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
            hex::encode(&t)
        };
        Ok(pb::ListResponse {
            items,
            resource_version: rev.to_string(),
            r#continue: if resp.more { token(&resp.next_key) } else { String::new() },
        })
    }

    /// A delete: the object goes, or (held by finalizers) is marked with a deletionTimestamp.
    pub(super) async fn delete_object(
        &self,
        r: pb::DeleteRequest,
        who: Option<&Identity>,
    ) -> Result<pb::DeleteResponse, Status> {
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
            match self.authorize_write(who, Verb::Delete, info, scope, &reference.name, Some(&obj)) {
                Err(_) if serializable => continue,
                other => other?,
            }
            if !r.uid.is_empty() && object::meta(&obj).is_some_and(|m| m.uid != r.uid) {
                return Err(Status::aborted(format!(
                    "Operation cannot be fulfilled on {} {:?}: Precondition failed: UID in precondition: {}, UID in object meta: {}",
                    info.resource,
                    reference.name,
                    r.uid,
                    object::meta(&obj).map(|m| m.uid.as_str()).unwrap_or_default()
                )));
            }
            if let Some(g) = r.grace_period_seconds.filter(|g| *g < 0) {
                return Err(Status::invalid_argument(format!(
                    "DeleteOptions.gracePeriodSeconds: Invalid value: {g}: must be greater than or equal to 0"
                )));
            }
            // A Pod its node still runs gets its grace period: it stays, Terminating, until
            // the node has stopped it and deletes it with 0.
            let grace = graceful(&obj, r.grace_period_seconds);
            let already = object::meta(&obj).and_then(|m| m.deletion_grace_period_seconds);
            if let Some(g) = grace.filter(|g| *g > 0) {
                if already.is_some_and(|a| a <= g) {
                    // A grace period only shrinks: nothing changes.
                    return Ok(pb::DeleteResponse { object: Some(obj), deleted: false });
                }
            }
            if let Some(m) = object::meta_mut(&mut obj) {
                if let Some(g) = grace {
                    if g > 0 {
                        let at = std::time::SystemTime::now() + std::time::Duration::from_secs(g as u64);
                        m.deletion_timestamp = humantime::format_rfc3339_seconds(at).to_string();
                    }
                    m.deletion_grace_period_seconds = Some(g);
                }
                if let Some(f) = policy {
                    if !m.finalizers.iter().any(|x| x == f) {
                        m.finalizers.push(f.to_string());
                    }
                }
            }
            let holds = !object::releasable(&obj);
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
            let op = if holds { put_op(&k, encode(&obj, &self.keys)?) } else { delete_op(&k) };
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
            return Ok(pb::DeleteResponse { object: Some(obj), deleted: !holds });
        }
        Err(conflict(info, &reference.name))
    }
}

/// The grace period a delete gives `obj`: only a Pod bound to a node and not finished has
/// one (the request's, else its terminationGracePeriodSeconds); None: deleted as any object.
fn graceful(obj: &pb::Object, requested: Option<i64>) -> Option<i64> {
    let Some(pb::object::Kind::Pod(p)) = &obj.kind else { return None };
    let spec = p.spec.as_ref()?;
    let phase = p.status.as_ref().map(|s| s.phase.as_str()).unwrap_or_default();
    if spec.node_name.is_empty() || phase == "Succeeded" || phase == "Failed" {
        return Some(0);
    }
    Some(requested.unwrap_or(spec.termination_grace_period_seconds.unwrap_or(30)).max(0))
}

/// Names the object a status is about, when a request carries several.
pub(super) fn about(s: Status, index: usize, obj: &pb::Object, many: bool) -> Status {
    if !many {
        return s;
    }
    let info = object::info(obj);
    let name = object::meta(obj).map(|m| m.name.as_str()).unwrap_or_default();
    let what = info.map(|i| format!("{}/{name}", resource_name(i))).unwrap_or_default();
    Status::with_details(s.code(), format!("objects[{index}] ({what}): {}", s.message()), s.details().to_vec().into())
}
