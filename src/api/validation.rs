//! Validation as the API server does it, returning every problem with its field path and a
//! kubectl-style detail ("Required value", "Invalid value: ..."), with upstream's wording.
//!
//! Object names, labels, annotations, the size limits of ConfigMaps, Secrets and stored
//! objects, and the pod template's containers. Kind-specific rules grow here with the
//! admission chain.

use std::collections::HashSet;
use std::str::FromStr;

use crate::proto::v1 as pb;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub detail: String,
}

fn fe(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), detail: detail.into() }
}

/// RFC 1123 label: at most 63 lowercase alphanumerics or '-', starting and ending alphanumeric.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// The most data a ConfigMap or Secret may hold, as in Kubernetes.
pub const MAX_DATA_BYTES: usize = 1 << 20;
/// The most an object may take once encoded for the store (etcd's default request limit,
/// which Kubernetes inherits).
pub const MAX_OBJECT_BYTES: usize = 3 << 19;
/// The most all of an object's annotations may take.
pub const MAX_ANNOTATION_BYTES: usize = 256 << 10;

const SUBDOMAIN_HELP: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_HELP: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const LABEL_VALUE_HELP: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const NAME_PART_HELP: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const CONFIG_KEY_HELP: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')";

fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && v.as_bytes()[0].is_ascii_alphanumeric()
            && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric())
}

#[cfg(test)]
fn is_qualified_name(k: &str) -> bool {
    qualified_name_error(k).is_none()
}

/// Why `k` is not a qualified name (a label or annotation key), in upstream's words.
fn qualified_name_error(k: &str) -> Option<String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        if p.is_empty() {
            return Some("prefix part must be non-empty".into());
        }
        if !is_dns1123_subdomain(p) {
            return Some(format!("prefix part {SUBDOMAIN_HELP}"));
        }
    }
    if name.is_empty() {
        return Some("name part must be non-empty".into());
    }
    if name.len() > 63 {
        return Some("name part must be no more than 63 characters".into());
    }
    if !is_label_value(name) || name.contains('/') {
        return Some(NAME_PART_HELP.into());
    }
    None
}

fn is_config_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        && k != "."
        && k != ".."
}

/// Why an object is too large to store, in the words a user sees; None when it fits.
pub fn size_error(obj: &pb::Object) -> Option<String> {
    use prost::Message;
    let len = obj.encoded_len();
    if len <= MAX_OBJECT_BYTES {
        return None;
    }
    let info = crate::api::object::info(obj)?;
    let name = crate::api::object::meta(obj).map(|m| m.name.as_str()).unwrap_or_default();
    Some(format!(
        "Request entity too large: the {} {name:?} is {len} bytes encoded, more than the {MAX_OBJECT_BYTES} bytes an object may have",
        info.name
    ))
}

/// The keys and total size of a ConfigMap's or Secret's data.
fn data_map<'a>(
    entries: impl Iterator<Item = (&'a String, usize)>,
    field: &str,
    total: &mut usize,
    out: &mut Vec<FieldError>,
) {
    let mut keys: Vec<(&String, usize)> = entries.collect();
    keys.sort();
    for (k, len) in keys {
        *total += k.len() + len;
        if !is_config_key(k) {
            out.push(fe(format!("{field}[{k}]"), format!("Invalid value: {k:?}: {CONFIG_KEY_HELP}")));
        }
    }
}

fn data_size(total: usize, out: &mut Vec<FieldError>) {
    if total > MAX_DATA_BYTES {
        out.push(fe("[]", format!("Too long: must have at most {MAX_DATA_BYTES} bytes")));
    }
}

fn meta(m: Option<&pb::ObjectMeta>, namespace_kind: bool, out: &mut Vec<FieldError>) {
    let Some(m) = m else {
        out.push(fe("metadata.name", "Required value: name or generateName is required"));
        return;
    };
    if m.name.is_empty() {
        if m.generate_name.is_empty() {
            out.push(fe("metadata.name", "Required value: name or generateName is required"));
        }
    } else {
        let (ok, max, help) = if namespace_kind {
            (is_dns1123_label(&m.name), 63, LABEL_HELP)
        } else {
            (is_dns1123_subdomain(&m.name), 253, SUBDOMAIN_HELP)
        };
        if m.name.len() > max {
            out.push(fe(
                "metadata.name",
                format!("Invalid value: {:?}: must be no more than {max} characters", m.name),
            ));
        } else if !ok {
            out.push(fe("metadata.name", format!("Invalid value: {:?}: {help}", m.name)));
        }
    }
    let mut keys: Vec<&String> = m.labels.keys().collect();
    keys.sort();
    for k in keys {
        let v = &m.labels[k];
        if let Some(why) = qualified_name_error(k) {
            out.push(fe("metadata.labels", format!("Invalid value: {k:?}: {why}")));
        } else if v.len() > 63 {
            out.push(fe("metadata.labels", format!("Invalid value: {v:?}: must be no more than 63 characters")));
        } else if !is_label_value(v) {
            out.push(fe("metadata.labels", format!("Invalid value: {v:?}: {LABEL_VALUE_HELP}")));
        }
    }
    let mut keys: Vec<&String> = m.annotations.keys().collect();
    keys.sort();
    let mut total = 0;
    for k in keys {
        total += k.len() + m.annotations[k].len();
        if let Some(why) = qualified_name_error(&k.to_ascii_lowercase()) {
            out.push(fe("metadata.annotations", format!("Invalid value: {k:?}: {why}")));
        }
    }
    if total > MAX_ANNOTATION_BYTES {
        out.push(fe("metadata.annotations", format!("Too long: must have at most {MAX_ANNOTATION_BYTES} bytes")));
    }
}

fn pod_spec(spec: Option<&pb::PodSpec>, path: &str, out: &mut Vec<FieldError>) {
    let Some(spec) = spec else {
        out.push(fe(path, "Required value"));
        return;
    };
    if spec.containers.is_empty() {
        out.push(fe(format!("{path}.containers"), "Required value"));
    }
    let mut names = HashSet::new();
    let groups = [("initContainers", &spec.init_containers), ("containers", &spec.containers)];
    for (group, containers) in groups {
        for (i, c) in containers.iter().enumerate() {
            let p = format!("{path}.{group}[{i}]");
            if c.name.is_empty() {
                out.push(fe(format!("{p}.name"), "Required value"));
            } else if !is_dns1123_label(&c.name) {
                out.push(fe(format!("{p}.name"), format!("Invalid value: {:?}: must be a DNS-1123 label", c.name)));
            } else if !names.insert(c.name.as_str()) {
                out.push(fe(format!("{p}.name"), format!("Duplicate value: {:?}", c.name)));
            }
            if c.image.is_empty() {
                out.push(fe(format!("{p}.image"), "Required value"));
            } else if oci_spec::distribution::Reference::from_str(&c.image).is_err() {
                out.push(fe(
                    format!("{p}.image"),
                    format!("Invalid value: {:?}: not a valid image reference", c.image),
                ));
            }
            if let Some(res) = &c.resources {
                for (what, map) in [("limits", &res.limits), ("requests", &res.requests)] {
                    let mut names: Vec<&String> = map.keys().collect();
                    names.sort();
                    for name in names {
                        let field = format!("{p}.resources.{what}[{name}]");
                        match crate::api::quantity::Quantity::parse(&map[name]) {
                            Err(e) => out.push(fe(field, format!("Invalid value: {:?}: {e}", map[name]))),
                            Ok(q) if q.milli < 0 => out.push(fe(
                                field,
                                format!("Invalid value: {:?}: must be greater than or equal to 0", map[name]),
                            )),
                            Ok(_) => {}
                        }
                    }
                }
                for (name, limit) in &res.limits {
                    if let (Some(req), Ok(l)) = (res.requests.get(name), crate::api::quantity::Quantity::parse(limit)) {
                        if crate::api::quantity::Quantity::parse(req).is_ok_and(|r| r > l) {
                            out.push(fe(
                                format!("{p}.resources.requests[{name}]"),
                                format!(
                                    "Invalid value: {req:?}: must be less than or equal to {name} limit of {limit}"
                                ),
                            ));
                        }
                    }
                }
            }
            let mut ports = HashSet::new();
            for (j, port) in c.ports.iter().enumerate() {
                if !(1..=65535).contains(&port.container_port) {
                    out.push(fe(
                        format!("{p}.ports[{j}].containerPort"),
                        format!("Invalid value: {}: must be between 1 and 65535, inclusive", port.container_port),
                    ));
                }
                let proto = if port.protocol.is_empty() { "TCP" } else { port.protocol.as_str() };
                if !["TCP", "UDP", "SCTP"].contains(&proto) {
                    out.push(fe(
                        format!("{p}.ports[{j}].protocol"),
                        format!("Unsupported value: {proto:?}: supported values: \"SCTP\", \"TCP\", \"UDP\""),
                    ));
                }
                if !ports.insert((port.container_port, proto.to_string())) {
                    out.push(fe(
                        format!("{p}.ports[{j}].containerPort"),
                        format!("Duplicate value: {}/{proto}", port.container_port),
                    ));
                }
            }
        }
    }
}

fn template(t: Option<&pb::PodTemplateSpec>, path: &str, out: &mut Vec<FieldError>) {
    match t {
        Some(t) => pod_spec(t.spec.as_ref(), &format!("{path}.spec"), out),
        None => out.push(fe(path, "Required value")),
    }
}

/// Every problem found in the object, in field order.
pub fn validate(obj: &pb::Object) -> Vec<FieldError> {
    use pb::object::Kind as K;
    let mut out = Vec::new();
    let Some(kind) = &obj.kind else {
        return vec![fe("kind", "Required value")];
    };
    match kind {
        K::Namespace(o) => meta(o.metadata.as_ref(), true, &mut out),
        K::Node(o) => meta(o.metadata.as_ref(), false, &mut out),
        K::Pod(o) => {
            meta(o.metadata.as_ref(), false, &mut out);
            pod_spec(o.spec.as_ref(), "spec", &mut out);
        }
        K::Service(o) => meta(o.metadata.as_ref(), true, &mut out),
        K::Endpoints(o) => meta(o.metadata.as_ref(), false, &mut out),
        K::ConfigMap(o) => {
            meta(o.metadata.as_ref(), false, &mut out);
            let mut total = 0;
            data_map(o.data.iter().map(|(k, v)| (k, v.len())), "data", &mut total, &mut out);
            data_map(o.binary_data.iter().map(|(k, v)| (k, v.len())), "binaryData", &mut total, &mut out);
            for k in o.binary_data.keys().filter(|k| o.data.contains_key(*k)) {
                out.push(fe(
                    format!("data[{k}]"),
                    format!("Invalid value: {k:?}: duplicate of key present in binaryData"),
                ));
            }
            data_size(total, &mut out);
        }
        K::Secret(o) => {
            meta(o.metadata.as_ref(), false, &mut out);
            let mut total = 0;
            data_map(o.data.iter().map(|(k, v)| (k, v.len())), "data", &mut total, &mut out);
            data_map(o.string_data.iter().map(|(k, v)| (k, v.len())), "stringData", &mut total, &mut out);
            data_size(total, &mut out);
        }
        K::Event(o) => meta(o.metadata.as_ref(), false, &mut out),
        K::Lease(o) => meta(o.metadata.as_ref(), false, &mut out),
        K::ControllerRevision(o) => meta(o.metadata.as_ref(), false, &mut out),
        K::ReplicaSet(o) => {
            meta(o.metadata.as_ref(), false, &mut out);
            template(o.spec.as_ref().and_then(|s| s.template.as_ref()), "spec.template", &mut out);
        }
        K::ReplicationController(o) => {
            meta(o.metadata.as_ref(), false, &mut out);
            template(o.spec.as_ref().and_then(|s| s.template.as_ref()), "spec.template", &mut out);
        }
        K::Deployment(o) => {
            meta(o.metadata.as_ref(), false, &mut out);
            template(o.spec.as_ref().and_then(|s| s.template.as_ref()), "spec.template", &mut out);
        }
        K::DaemonSet(o) => {
            meta(o.metadata.as_ref(), false, &mut out);
            template(o.spec.as_ref().and_then(|s| s.template.as_ref()), "spec.template", &mut out);
        }
        K::StatefulSet(o) => {
            meta(o.metadata.as_ref(), false, &mut out);
            template(o.spec.as_ref().and_then(|s| s.template.as_ref()), "spec.template", &mut out);
        }
        K::Job(o) => {
            meta(o.metadata.as_ref(), false, &mut out);
            template(o.spec.as_ref().and_then(|s| s.template.as_ref()), "spec.template", &mut out);
        }
        K::CronJob(o) => {
            meta(o.metadata.as_ref(), false, &mut out);
            let job = o.spec.as_ref().and_then(|s| s.job_template.as_ref()).and_then(|j| j.spec.as_ref());
            template(job.and_then(|j| j.template.as_ref()), "spec.jobTemplate.spec.template", &mut out);
        }
    }
    out
}

/// What an update may not change, checked on top of `validate`: a Pod's spec beyond its
/// images, activeDeadlineSeconds, added tolerations and terminationGracePeriodSeconds, a
/// bound Pod's node, and a Node's podCIDR once set (upstream's wording).
pub fn validate_update(current: &pb::Object, next: &pb::Object) -> Vec<FieldError> {
    use pb::object::Kind as K;
    let mut out = Vec::new();
    match (&current.kind, &next.kind) {
        (Some(K::Pod(cur)), Some(K::Pod(nxt))) => {
            let (Some(a), Some(b)) = (&cur.spec, &nxt.spec) else { return out };
            // Compare with what may change taken from the new spec.
            let mut allowed = a.clone();
            for (c, n) in allowed.containers.iter_mut().zip(&b.containers) {
                c.image = n.image.clone();
            }
            for (c, n) in allowed.init_containers.iter_mut().zip(&b.init_containers) {
                c.image = n.image.clone();
            }
            allowed.active_deadline_seconds = b.active_deadline_seconds;
            allowed.termination_grace_period_seconds = b.termination_grace_period_seconds;
            if b.tolerations.len() >= a.tolerations.len() && b.tolerations[..a.tolerations.len()] == a.tolerations[..] {
                allowed.tolerations = b.tolerations.clone();
            }
            if !a.node_name.is_empty() && a.node_name != b.node_name {
                out.push(fe("spec.nodeName", "Forbidden: pod is already bound to a node"));
            } else if allowed != *b {
                if a.node_name.is_empty() && !b.node_name.is_empty() {
                    allowed.node_name = b.node_name.clone();
                }
                if allowed != *b {
                    out.push(fe(
                        "spec",
                        "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, \
                         `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` \
                         (only additions to existing tolerations) or `spec.terminationGracePeriodSeconds`",
                    ));
                }
            }
        }
        (Some(K::Node(cur)), Some(K::Node(nxt))) => {
            let was = cur.spec.as_ref().map(|s| s.pod_cidr.as_str()).unwrap_or_default();
            let now = nxt.spec.as_ref().map(|s| s.pod_cidr.as_str()).unwrap_or_default();
            if !was.is_empty() && was != now {
                out.push(fe(
                    "spec.podCIDRs",
                    "Forbidden: node updates may not change podCIDR except from \"\" to valid",
                ));
            }
            if !now.is_empty() && now.parse::<ipnet::IpNet>().is_err() {
                out.push(fe("spec.podCIDR", format!("Invalid value: {now:?}: must be a valid CIDR")));
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_follow_rfc_1123() {
        assert!(is_dns1123_label("web-1"));
        assert!(!is_dns1123_label("Web"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1123_subdomain("a.b-c.d"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(is_qualified_name("app.kubernetes.io/name"));
        assert!(!is_qualified_name("bad key"));
        assert!(!is_qualified_name("a/b/c"));
        assert!(!is_qualified_name(&"x".repeat(64)));
        assert!(is_config_key("key.name") && is_config_key("KEY_NAME") && !is_config_key("bad key"));
    }

    fn config_map(data: &[(&str, usize)]) -> pb::Object {
        pb::Object {
            kind: Some(pb::object::Kind::ConfigMap(pb::ConfigMap {
                metadata: Some(pb::ObjectMeta { name: "big".into(), ..Default::default() }),
                data: data.iter().map(|(k, n)| (k.to_string(), "x".repeat(*n))).collect(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn config_map_data_is_limited_to_a_mebibyte_and_keys_to_config_keys() {
        assert!(validate(&config_map(&[("a", 1000), ("b", 1000)])).is_empty());
        let errs = validate(&config_map(&[("a", 700 << 10), ("b", 400 << 10)]));
        assert_eq!(errs, vec![fe("[]", "Too long: must have at most 1048576 bytes")]);
        let errs = validate(&config_map(&[("bad key", 1)]));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "data[bad key]");
        assert!(errs[0].detail.contains("a valid config key"), "{errs:?}");
    }

    #[test]
    fn an_object_larger_than_the_store_takes_is_named_with_its_size() {
        assert_eq!(size_error(&config_map(&[("a", 1000)])), None);
        let e = size_error(&config_map(&[("a", 2 << 20)])).unwrap();
        assert!(e.starts_with("Request entity too large: the ConfigMap \"big\" is 20971"), "{e}");
        assert!(e.contains("1572864"), "{e}");
    }

    #[test]
    fn names_and_labels_are_refused_with_upstream_messages() {
        let mut o = config_map(&[]);
        if let Some(pb::object::Kind::ConfigMap(c)) = o.kind.as_mut() {
            let m = c.metadata.as_mut().unwrap();
            m.name = "Bad_Name".into();
            m.labels.insert("app".into(), "-web".into());
            m.labels.insert("bad key".into(), "x".into());
            m.annotations.insert("huge".into(), "x".repeat(300 << 10));
        }
        let errs = validate(&o);
        let text: Vec<String> = errs.iter().map(|e| format!("{}: {}", e.field, e.detail)).collect();
        assert_eq!(text.len(), 4, "{text:#?}");
        assert!(
            text[0].starts_with("metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"),
            "{text:#?}"
        );
        assert!(text[1].contains("\"-web\": a valid label must be an empty string"), "{text:#?}");
        assert!(text[2].contains("\"bad key\": name part must consist of"), "{text:#?}");
        assert_eq!(text[3], "metadata.annotations: Too long: must have at most 262144 bytes");
    }
}
