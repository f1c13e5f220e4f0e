//! Names and the stored form of objects: store keys, Kubernetes' resource names in
//! messages, the codec (protobuf, sealed for Secrets) and the errors every part words the
//! same way.

use std::time::SystemTime;

use prost::Message;
use tonic::Status;

use crate::api::kinds::{self, KindInfo};
use crate::api::object;
use crate::proto::v1 as pb;
use crate::seal::Keyring;

/// Timestamps as the server stamps them (RFC 3339, seconds).
pub(super) fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// `deployments.apps` or `pods`, as Kubernetes names a resource in its messages.
pub(super) fn resource_name(info: &KindInfo) -> String {
    match info.api_version.split_once('/') {
        Some((group, _)) => format!("{}.{group}", info.resource),
        None => info.resource.to_string(),
    }
}

pub(super) fn key(info: &KindInfo, namespace: &str, name: &str) -> String {
    if info.namespaced {
        format!("/registry/{}/{namespace}/{name}", info.resource)
    } else {
        format!("/registry/{}/{name}", info.resource)
    }
}

pub(super) fn prefix(info: &KindInfo, namespace: &str) -> String {
    if info.namespaced && !namespace.is_empty() {
        format!("/registry/{}/{namespace}/", info.resource)
    } else {
        format!("/registry/{}/", info.resource)
    }
}

pub(super) fn lookup_kind(kind: &str) -> Result<&'static KindInfo, Status> {
    kinds::by_name(kind).ok_or_else(|| Status::not_found(format!("the server doesn't have a resource type {kind:?}")))
}

pub(super) fn decode(kv: &pb::KeyValue, keys: &Keyring) -> Result<pb::Object, Status> {
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
pub(super) fn encode(obj: &pb::Object, keys: &Keyring) -> Result<Vec<u8>, Status> {
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
        keys.seal(&bytes).map_err(|e| Status::invalid_argument(format!("the Secret cannot be sealed: {e}")))
    } else {
        Ok(bytes)
    }
}

pub(super) fn conflict(info: &KindInfo, name: &str) -> Status {
    Status::aborted(format!(
        "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
        resource_name(info)
    ))
}

pub(super) fn not_found(info: &KindInfo, name: &str) -> Status {
    Status::not_found(format!("{} {name:?} not found", resource_name(info)))
}
