//! Objects as Kubernetes JSON values, both ways.
//!
//! pbjson writes 64-bit integers as strings, as the proto3 JSON mapping says; Kubernetes
//! writes them as numbers (`generation: 3`, `runAsUser: 1000`). [`to_value`] walks the
//! schema of `keel.v1` (its file descriptor set) and turns those strings back into numbers,
//! so printed objects and the last-applied annotation look as they do under kubectl. Reading
//! accepts both forms.

use std::collections::HashMap;
use std::sync::OnceLock;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use serde_json::Value;

use super::kinds::{self, Kind};
use crate::proto::v1 as pb;
use pb::object::Kind as K;

/// Message descriptors by full name (`.keel.v1.Pod`, `.keel.v1.Pod.LabelsEntry`).
fn schema() -> &'static HashMap<String, DescriptorProto> {
    static SCHEMA: OnceLock<HashMap<String, DescriptorProto>> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        fn add(prefix: &str, msg: &DescriptorProto, out: &mut HashMap<String, DescriptorProto>) {
            let name = format!("{prefix}.{}", msg.name());
            for nested in &msg.nested_type {
                add(&name, nested, out);
            }
            out.insert(name, msg.clone());
        }
        let mut out = HashMap::new();
        // The set is compiled into the binary by build.rs; it always decodes.
        let set = FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap_or_default();
        for file in &set.file {
            for msg in &file.message_type {
                add(&format!(".{}", file.package()), msg, &mut out);
            }
        }
        out
    })
}

fn json_name(f: &FieldDescriptorProto) -> String {
    if let Some(n) = f.json_name.as_ref().filter(|n| !n.is_empty()) {
        return n.clone();
    }
    let mut out = String::new();
    let mut upper = false;
    for c in f.name().chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn is_int64(t: Type) -> bool {
    matches!(t, Type::Int64 | Type::Sint64 | Type::Sfixed64 | Type::Uint64 | Type::Fixed64)
}

fn number(v: &mut Value) {
    if let Value::String(s) = v {
        if let Ok(n) = s.parse::<i64>() {
            *v = Value::from(n);
        } else if let Ok(n) = s.parse::<u64>() {
            *v = Value::from(n);
        }
    }
}

/// Rewrites 64-bit integer strings inside `v`, a JSON form of message `msg`, as numbers.
fn numbers(v: &mut Value, msg: &str) {
    let schema = schema();
    let (Some(desc), Value::Object(map)) = (schema.get(msg), v) else { return };
    for f in &desc.field {
        let Some(val) = map.get_mut(&json_name(f)) else { continue };
        let repeated = f.label() == Label::Repeated;
        if is_int64(f.r#type()) {
            match val {
                Value::Array(items) if repeated => items.iter_mut().for_each(number),
                other => number(other),
            }
        } else if f.r#type() == Type::Message {
            let entry = schema.get(f.type_name()).filter(|d| d.options.as_ref().is_some_and(|o| o.map_entry()));
            match (entry, val) {
                (Some(entry), Value::Object(m)) => {
                    let Some(vf) = entry.field.iter().find(|x| x.number() == 2) else { continue };
                    for item in m.values_mut() {
                        if is_int64(vf.r#type()) {
                            number(item);
                        } else if vf.r#type() == Type::Message {
                            numbers(item, vf.type_name());
                        }
                    }
                }
                (None, Value::Array(items)) if repeated => items.iter_mut().for_each(|i| numbers(i, f.type_name())),
                (None, item) => numbers(item, f.type_name()),
                _ => {}
            }
        }
    }
}

/// The proto message name of a kind's top-level type.
fn message_name(kind: Kind) -> String {
    match kind {
        Kind::Event => ".keel.v1.CoreEvent".to_string(),
        _ => format!(".keel.v1.{}", kinds::info(kind).name),
    }
}

/// The object as Kubernetes JSON (`{"apiVersion": .., "kind": .., "metadata": ..}`).
pub fn to_value(obj: &pb::Object) -> Value {
    let v = match obj.kind.as_ref() {
        Some(K::Namespace(o)) => serde_json::to_value(o),
        Some(K::Node(o)) => serde_json::to_value(o),
        Some(K::Pod(o)) => serde_json::to_value(o),
        Some(K::Service(o)) => serde_json::to_value(o),
        Some(K::Endpoints(o)) => serde_json::to_value(o),
        Some(K::ConfigMap(o)) => serde_json::to_value(o),
        Some(K::Secret(o)) => serde_json::to_value(o),
        Some(K::Event(o)) => serde_json::to_value(o),
        Some(K::Lease(o)) => serde_json::to_value(o),
        Some(K::ReplicaSet(o)) => serde_json::to_value(o),
        Some(K::ReplicationController(o)) => serde_json::to_value(o),
        Some(K::Deployment(o)) => serde_json::to_value(o),
        Some(K::DaemonSet(o)) => serde_json::to_value(o),
        Some(K::StatefulSet(o)) => serde_json::to_value(o),
        Some(K::ControllerRevision(o)) => serde_json::to_value(o),
        Some(K::Job(o)) => serde_json::to_value(o),
        Some(K::CronJob(o)) => serde_json::to_value(o),
        None => Ok(Value::Null),
    };
    let mut v = v.unwrap_or(Value::Null);
    if let Some(kind) = super::object::kind(obj) {
        numbers(&mut v, &message_name(kind));
    }
    v
}

/// Reads a JSON value of the given kind back into a typed object.
pub fn from_value(kind: Kind, v: Value) -> Result<pb::Object, serde_json::Error> {
    use serde_json::from_value as f;
    let k = match kind {
        Kind::Namespace => K::Namespace(f(v)?),
        Kind::Node => K::Node(f(v)?),
        Kind::Pod => K::Pod(f(v)?),
        Kind::Service => K::Service(f(v)?),
        Kind::Endpoints => K::Endpoints(f(v)?),
        Kind::ConfigMap => K::ConfigMap(f(v)?),
        Kind::Secret => K::Secret(f(v)?),
        Kind::Event => K::Event(f(v)?),
        Kind::Lease => K::Lease(f(v)?),
        Kind::ReplicaSet => K::ReplicaSet(f(v)?),
        Kind::ReplicationController => K::ReplicationController(f(v)?),
        Kind::Deployment => K::Deployment(f(v)?),
        Kind::DaemonSet => K::DaemonSet(f(v)?),
        Kind::StatefulSet => K::StatefulSet(f(v)?),
        Kind::ControllerRevision => K::ControllerRevision(f(v)?),
        Kind::Job => K::Job(f(v)?),
        Kind::CronJob => K::CronJob(f(v)?),
    };
    Ok(pb::Object { kind: Some(k) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> pb::Object {
        let docs = super::super::manifest::parse_file("t.yaml", yaml);
        docs.into_iter().next().unwrap().unwrap()
    }

    #[test]
    fn int64_fields_print_as_numbers_and_read_back() {
        let mut obj = parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {generation: \"7\"}}\nspec:\n  \
             terminationGracePeriodSeconds: 30\n  securityContext: {runAsUser: 1000}\n  \
             containers: [{name: c, image: nginx}]\n",
        );
        if let Some(m) = super::super::object::meta_mut(&mut obj) {
            m.generation = 4;
        }
        let v = to_value(&obj);
        assert_eq!(v["metadata"]["generation"], Value::from(4));
        assert_eq!(v["spec"]["terminationGracePeriodSeconds"], Value::from(30));
        assert_eq!(v["spec"]["securityContext"]["runAsUser"], Value::from(1000));
        // A label value is a string map entry, whatever its key says.
        assert_eq!(v["metadata"]["labels"]["generation"], Value::from("7"));
        assert_eq!(from_value(Kind::Pod, v).unwrap(), obj);
    }
}
