//! Validation as the API server does it, returning every problem with its field path and a
//! kubectl-style detail ("Required value", "Invalid value: ...").
//!
//! This is the first slice: object names, labels, and the pod template's containers. Kind-
//! specific rules grow here with the admission chain.

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

fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && v.as_bytes()[0].is_ascii_alphanumeric()
            && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric())
}

fn is_qualified_name(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(is_dns1123_subdomain) && !name.is_empty() && is_label_value(name)
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
        let ok = if namespace_kind { is_dns1123_label(&m.name) } else { is_dns1123_subdomain(&m.name) };
        if !ok {
            out.push(fe(
                "metadata.name",
                format!("Invalid value: {:?}: a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-' or '.'", m.name, if namespace_kind { "label" } else { "subdomain" }),
            ));
        }
    }
    let mut keys: Vec<&String> = m.labels.keys().collect();
    keys.sort();
    for k in keys {
        if !is_qualified_name(k) {
            out.push(fe(
                format!("metadata.labels[{k}]"),
                format!("Invalid value: {k:?}: a valid label key is a qualified name"),
            ));
        } else if !is_label_value(&m.labels[k]) {
            out.push(fe(format!("metadata.labels[{k}]"), format!("Invalid value: {:?}: a valid label value must be 63 characters or less and consist of alphanumerics, '-', '_' or '.'", m.labels[k])));
        }
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
        K::ConfigMap(o) => meta(o.metadata.as_ref(), false, &mut out),
        K::Secret(o) => meta(o.metadata.as_ref(), false, &mut out),
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
    }
}
