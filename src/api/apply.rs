//! Declarative apply: a three-way merge of the manifest, the live object and the manifest
//! applied last time, as `kubectl apply` does it.
//!
//! The manifest as applied is kept in the `kubectl.kubernetes.io/last-applied-configuration`
//! annotation. A field that the last manifest had and the new one lacks is removed; a field
//! the manifest never had (set by the server, a controller or another writer) is kept. Lists
//! whose items have a merge key (containers by `name`, container ports by `containerPort`,
//! volume mounts by `mountPath`, ...) merge item by item, as strategic merge patch does;
//! other lists are replaced whole.

use serde_json::{Map, Value};

use super::json;
use super::object;
use crate::proto::v1 as pb;

pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Merge keys of lists, by the list's field name; the first key that every item of both
/// lists carries is used.
fn merge_keys(field: &str) -> &'static [&'static str] {
    match field {
        "containers" | "initContainers" | "ephemeralContainers" | "volumes" | "env" | "imagePullSecrets" => &["name"],
        "volumeMounts" => &["mountPath"],
        "volumeDevices" => &["devicePath"],
        "ports" => &["containerPort", "port"],
        "hostAliases" => &["ip"],
        _ => &[],
    }
}

/// The manifest as it is recorded: no status, no server-owned metadata, no annotation of
/// its own.
pub fn applied_config(manifest: &pb::Object) -> Value {
    let mut v = json::to_value(manifest);
    if let Value::Object(m) = &mut v {
        m.remove("status");
        if let Some(Value::Object(meta)) = m.get_mut("metadata") {
            for k in ["uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp"] {
                meta.remove(k);
            }
            if let Some(Value::Object(a)) = meta.get_mut("annotations") {
                a.remove(LAST_APPLIED);
                if a.is_empty() {
                    meta.remove("annotations");
                }
            }
        }
    }
    v
}

/// The manifest, ready to create: it carries its own last-applied annotation.
pub fn for_create(manifest: &pb::Object) -> pb::Object {
    let mut obj = manifest.clone();
    let config = applied_config(manifest).to_string();
    if let Some(m) = object::meta_mut(&mut obj) {
        m.annotations.insert(LAST_APPLIED.to_string(), config);
    }
    obj
}

/// The object that applying `manifest` over `live` asks for. Its status is `live`'s; the
/// server still defaults and validates it.
pub fn merge(live: &pb::Object, manifest: &pb::Object) -> Result<pb::Object, String> {
    let kind = object::kind(manifest).ok_or("object: Required value")?;
    let new = applied_config(manifest);
    let last: Option<Value> =
        object::meta(live).and_then(|m| m.annotations.get(LAST_APPLIED)).and_then(|s| serde_json::from_str(s).ok());
    let mut live_v = json::to_value(live);
    if let Value::Object(m) = &mut live_v {
        m.remove("status");
    }
    let mut merged = three_way(live_v, last.as_ref(), &new);
    if let Some(Value::Object(meta)) = merged.get_mut("metadata") {
        let annotations = meta.entry("annotations").or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(a) = annotations {
            a.insert(LAST_APPLIED.to_string(), Value::String(new.to_string()));
        }
    }
    let mut out = json::from_value(kind, merged).map_err(|e| format!("merged object: {e}"))?;
    object::copy_status(live, &mut out);
    Ok(out)
}

/// Merges `new` into `live`, deleting what `last` had and `new` does not.
fn three_way(live: Value, last: Option<&Value>, new: &Value) -> Value {
    match (live, new) {
        (Value::Object(mut live), Value::Object(new)) => {
            let last = last.and_then(Value::as_object);
            if let Some(last) = last {
                for k in last.keys() {
                    if !new.contains_key(k) {
                        live.remove(k);
                    }
                }
            }
            for (k, nv) in new {
                let lv = live.remove(k).unwrap_or(Value::Null);
                let merged = match (nv, &lv) {
                    (Value::Array(na), Value::Array(la)) => {
                        merge_list(k, la, last.and_then(|l| l.get(k)), na).unwrap_or_else(|| Value::Array(na.clone()))
                    }
                    _ => three_way(lv, last.and_then(|l| l.get(k)), nv),
                };
                live.insert(k.clone(), merged);
            }
            Value::Object(live)
        }
        (_, new) => new.clone(),
    }
}

/// Item-by-item merge of a keyed list; None when the list has no merge key usable here.
fn merge_list(field: &str, live: &[Value], last: Option<&Value>, new: &[Value]) -> Option<Value> {
    let last = last.and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    let key = merge_keys(field).iter().find(|k| {
        let has = |v: &Value| v.get(**k).is_some_and(|x| !x.is_null());
        live.iter().chain(last).chain(new).all(has)
    })?;
    let find = |list: &[Value], id: &Value| list.iter().find(|v| v.get(*key) == Some(id)).cloned();
    let mut out = Vec::new();
    for n in new {
        let id = n.get(*key)?;
        let l = find(live, id).unwrap_or(Value::Null);
        let prev = find(last, id);
        out.push(three_way(l, prev.as_ref(), n));
    }
    // Items someone else added stay; items the last manifest had and this one dropped go.
    for l in live {
        let id = l.get(*key)?;
        if find(new, id).is_none() && find(last, id).is_none() {
            out.push(l.clone());
        }
    }
    Some(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(yaml: &str) -> pb::Object {
        super::super::manifest::parse_file("t.yaml", yaml).into_iter().next().unwrap().unwrap()
    }

    #[test]
    fn removed_fields_go_and_foreign_fields_stay() {
        let live = json!({"a": 1, "b": 2, "c": {"x": 1, "y": 2}, "server": "set"});
        let last = json!({"a": 1, "b": 2, "c": {"x": 1, "y": 2}});
        let new = json!({"a": 5, "c": {"x": 1}});
        let out = three_way(live, Some(&last), &new);
        assert_eq!(out, json!({"a": 5, "c": {"x": 1}, "server": "set"}));
    }

    #[test]
    fn keyed_lists_merge_by_key() {
        let live = json!({"containers": [
            {"name": "a", "image": "x:1", "imagePullPolicy": "IfNotPresent"},
            {"name": "sidecar", "image": "s"},
            {"name": "old", "image": "o"}]});
        let last = json!({"containers": [{"name": "a", "image": "x:1"}, {"name": "old", "image": "o"}]});
        let new = json!({"containers": [{"name": "a", "image": "x:2"}]});
        let out = three_way(live, Some(&last), &new);
        assert_eq!(
            out,
            json!({"containers": [
                {"name": "a", "image": "x:2", "imagePullPolicy": "IfNotPresent"},
                {"name": "sidecar", "image": "s"}]})
        );
    }

    #[test]
    fn unkeyed_lists_are_replaced() {
        let live = json!({"args": ["a", "b"], "tolerations": [{"key": "k"}]});
        let new = json!({"args": ["c"], "tolerations": [{"key": "j"}]});
        assert_eq!(three_way(live, None, &new), json!({"args": ["c"], "tolerations": [{"key": "j"}]}));
    }

    #[test]
    fn apply_removes_a_label_and_keeps_server_fields_and_status() {
        let first = doc("apiVersion: v1\nkind: Service\nmetadata: {name: s, labels: {a: '1', b: '2'}}\nspec:\n  \
                         selector: {app: x}\n  ports: [{port: 80}]\n");
        let mut live = for_create(&first);
        if let Some(pb::object::Kind::Service(s)) = live.kind.as_mut() {
            s.spec.as_mut().unwrap().cluster_ip = "10.43.0.10".into();
            s.status = Some(Default::default());
        }
        let second = doc("apiVersion: v1\nkind: Service\nmetadata: {name: s, labels: {a: '1'}}\nspec:\n  \
                          selector: {app: x}\n  ports: [{port: 81}]\n");
        let out = merge(&live, &second).unwrap();
        let m = object::meta(&out).unwrap();
        assert_eq!(m.labels.len(), 1, "{m:?}");
        let Some(pb::object::Kind::Service(s)) = out.kind.as_ref() else { panic!() };
        let spec = s.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip, "10.43.0.10");
        assert_eq!(spec.ports.len(), 1);
        assert_eq!(spec.ports[0].port, 81);
        assert!(s.status.is_some());
        let recorded: Value = serde_json::from_str(&m.annotations[LAST_APPLIED]).unwrap();
        assert_eq!(recorded["metadata"]["labels"], json!({"a": "1"}));
        // Applying the same manifest again changes nothing.
        assert_eq!(merge(&out, &second).unwrap(), out);
    }
}
