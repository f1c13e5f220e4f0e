//! Label selectors (equality- and set-based) and field selectors, with Kubernetes' syntax.

use std::collections::HashMap;

use crate::proto::v1 as pb;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {selector:?}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub reason: String,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<LabelSelector, SelectorError> {
        let err = |reason: &str| SelectorError { selector: s.to_string(), reason: reason.to_string() };
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for part in split_top(s) {
            let p = part.trim();
            if p.is_empty() {
                return Err(err("empty requirement"));
            }
            let set = |rest: &str| -> Result<Vec<String>, SelectorError> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| err("expected (values)"))?;
                Ok(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
            };
            let req = if let Some(k) = p.strip_prefix('!') {
                Requirement::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = p.split_once("!=") {
                Requirement::NotEq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = p.split_once("==") {
                Requirement::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = p.split_once('=') {
                Requirement::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, rest)) = p.split_once(" notin ") {
                Requirement::NotIn(k.trim().to_string(), set(rest)?)
            } else if let Some((k, rest)) = p.split_once(" in ") {
                Requirement::In(k.trim().to_string(), set(rest)?)
            } else if p.contains([' ', '(', ')']) {
                return Err(err(&format!("cannot parse {p:?}")));
            } else {
                Requirement::Exists(p.to_string())
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, labels: &HashMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => labels.get(k) == Some(v),
            Requirement::NotEq(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

/// A field selector over the fields Keel indexes: metadata.name, metadata.namespace,
/// spec.nodeName and status.phase (the last two on Pods).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<(String, bool, String)>);

pub const SELECTABLE_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "status.phase",
    // Events, as kubectl describe finds them.
    "involvedObject.kind",
    "involvedObject.name",
    "involvedObject.namespace",
    "involvedObject.uid",
    "reason",
    "type",
];

impl FieldSelector {
    pub fn parse(s: &str) -> Result<FieldSelector, SelectorError> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(SelectorError { selector: s.into(), reason: format!("{part:?} is not field=value") });
            };
            let field = field.trim();
            if !SELECTABLE_FIELDS.contains(&field) {
                return Err(SelectorError {
                    selector: s.into(),
                    reason: format!("field {field:?} is not selectable; use one of {}", SELECTABLE_FIELDS.join(", ")),
                });
            }
            out.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }

    /// `get` returns the value of a selectable field for the object.
    pub fn matches(&self, get: impl Fn(&str) -> String) -> bool {
        self.0.iter().all(|(f, eq, v)| (get(f) == *v) == *eq)
    }
}

/// The value of a selectable field of `obj` (empty when the kind has no such field).
pub fn field_value(obj: &pb::Object, field: &str) -> String {
    let m = crate::api::object::meta(obj);
    match field {
        "metadata.name" => m.map(|m| m.name.clone()).unwrap_or_default(),
        "metadata.namespace" => m.map(|m| m.namespace.clone()).unwrap_or_default(),
        "spec.nodeName" => crate::api::object::pod_fields(obj).map(|f| f.0.to_string()).unwrap_or_default(),
        "status.phase" => crate::api::object::pod_fields(obj).map(|f| f.1.to_string()).unwrap_or_default(),
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

/// A label selector and a field selector together, over whole objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectFilter {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl ObjectFilter {
    pub fn parse(labels: &str, fields: &str) -> Result<ObjectFilter, SelectorError> {
        Ok(ObjectFilter { labels: LabelSelector::parse(labels)?, fields: FieldSelector::parse(fields)? })
    }

    /// No selector at all: every object matches.
    pub fn is_everything(&self) -> bool {
        self.labels.0.is_empty() && self.fields.0.is_empty()
    }

    pub fn matches(&self, obj: &pb::Object) -> bool {
        let empty = Default::default();
        let labels = crate::api::object::meta(obj).map_or(&empty, |m| &m.labels);
        self.labels.matches(labels) && self.fields.matches(|f| field_value(obj, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn equality_and_set_based_selectors_match_as_in_kubernetes() {
        let l = labels(&[("app", "web"), ("tier", "frontend")]);
        let yes = [
            "app=web",
            "app==web",
            "app!=db",
            "tier in (frontend, backend)",
            "env notin (prod)",
            "app",
            "!canary",
            "app=web,tier in (frontend)",
            "",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&l), "{s}");
        }
        let no = ["app=db", "tier notin (frontend)", "canary", "!app", "app=web,tier=backend"];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&l), "{s}");
        }
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn field_selectors_accept_only_indexed_fields() {
        let f = FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed").unwrap();
        assert!(f.matches(|k| if k == "spec.nodeName" { "n1".into() } else { "Running".into() }));
        assert!(!f.matches(|k| if k == "spec.nodeName" { "n2".into() } else { "Running".into() }));
        let e = FieldSelector::parse("spec.foo=1").unwrap_err();
        assert!(e.to_string().contains("not selectable"));
    }

    #[test]
    fn an_object_filter_reads_labels_and_fields_of_the_object() {
        let pod = pb::Object {
            kind: Some(pb::object::Kind::Pod(pb::Pod {
                metadata: Some(pb::ObjectMeta {
                    name: "p".into(),
                    namespace: "web".into(),
                    labels: labels(&[("app", "web")]),
                    ..Default::default()
                }),
                spec: Some(pb::PodSpec { node_name: "n1".into(), ..Default::default() }),
                ..Default::default()
            })),
        };
        assert!(ObjectFilter::parse("app=web", "spec.nodeName=n1,metadata.namespace=web").unwrap().matches(&pod));
        assert!(!ObjectFilter::parse("app=web", "spec.nodeName=n2").unwrap().matches(&pod));
        assert!(ObjectFilter::parse("", "").unwrap().is_everything());
        assert_eq!(field_value(&pod, "status.phase"), "");
    }
}
