//! Admission of the Objects service: server-owned metadata, defaults, validation and size
//! limits for a new or changed object, and authorization of the caller (nodes are held to
//! their own objects, see `authz`). Decisions only: nothing here writes.

use prost::Message;
use tonic::Status;

use super::codec::{decode, now, prefix};
use super::ObjectsService;
use crate::api::kinds::{self, KindInfo};
use crate::api::wellknown::NAMESPACE_FINALIZER;
use crate::api::{defaults, object, validation};
use crate::pki::Identity;
use crate::proto::v1 as pb;
use crate::server::authz::{self, Verb};
use crate::server::status::from_store;
use crate::store::prefix_request;

pub(super) fn invalid(info: &KindInfo, name: &str, errors: Vec<validation::FieldError>) -> Status {
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

pub(super) fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let id = uuid::Uuid::new_v4();
    id.as_bytes().iter().take(5).map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect()
}

impl ObjectsService {
    pub(super) fn admit_new(&self, mut obj: pb::Object) -> Result<(pb::Object, &'static KindInfo), Status> {
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
        if let Some(message) = validation::size_error(&obj) {
            return Err(Status::invalid_argument(message));
        }
        Ok((obj, info))
    }

    pub(super) fn authorize_write(
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
    pub(super) async fn authorize_read(
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
            if crate::api::pod::node_of(&pod) != Some(node.as_str()) {
                continue;
            }
            let Some(pb::object::Kind::Pod(p)) = &pod.kind else { continue };
            let refs = crate::api::pod::references(&p.spec.clone().unwrap_or_default());
            let named = if info.kind == kinds::Kind::Secret { &refs.secrets } else { &refs.config_maps };
            if named.contains(name) {
                return Ok(());
            }
        }
        Err(authz::forbidden(id, verb, info, namespace, name, "no pod bound to this node refers to it"))
    }

    /// The object an update of `current` to `obj` stores: status (or, for UpdateStatus,
    /// everything but status) and server-owned metadata come from `current`; defaulted and
    /// validated; generation bumped when the spec changed.
    pub(super) fn prepare_update(
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
            nm.deletion_grace_period_seconds = cur_meta.deletion_grace_period_seconds;
            nm.generate_name = cur_meta.generate_name.clone();
            nm.generation = cur_meta.generation + i64::from(spec_changed && !status_only && cur_meta.generation > 0);
            nm.resource_version = cur_meta.resource_version.clone();
        }
        object::set_type_meta(&mut next);
        let mut errors = validation::validate(&next);
        errors.extend(validation::validate_update(current, &next));
        if !errors.is_empty() {
            return Err(invalid(info, &cur_meta.name, errors));
        }
        if let Some(message) = validation::size_error(&next) {
            return Err(Status::invalid_argument(message));
        }
        Ok(next)
    }
}
