//! Manifests at the edge: YAML or JSON text -> typed objects. Every error names the file, the
//! document, the line where it can, and the field path.
//!
//! Parsing is strict, as kubectl's strict validation is: an unknown field, a value of the
//! wrong type, a duplicate key, a tab in indentation or an unterminated quote is an error.

// A manifest error is a cold path carrying everything a person needs to fix the input;
// boxing it would only make every caller's code noisier.
#![allow(clippy::result_large_err)]

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::kinds::{self, Kind, KindError};
use super::validation;
use crate::proto::v1 as pb;

/// One YAML document of a file, with where it starts.
#[derive(Debug, Clone, Copy)]
pub struct Document<'a> {
    /// 1-based position among the file's non-empty documents.
    pub index: usize,
    /// 1-based line of the document's first line in the file.
    pub line: usize,
    pub text: &'a str,
}

/// Why a document was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Not well-formed YAML or JSON.
    Syntax,
    /// A kind (or apiVersion) this Keel does not serve.
    Unsupported,
    /// Well-formed, but not a valid object.
    Invalid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: String,
    pub document: usize,
    pub line: Option<usize>,
    /// Field path, e.g. `spec.template.spec.containers[0].image`.
    pub field: Option<String>,
    pub reason: Reason,
    /// The kind named by the document, when it named one.
    pub kind: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)?;
        if let Some(l) = self.line {
            write!(f, ", line {l}")?;
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ManifestError {}

fn is_separator(line: &str) -> bool {
    let rest = match line.strip_prefix("---") {
        Some(r) => r,
        None => return false,
    };
    rest.is_empty() || rest.starts_with([' ', '\t', '#', '\r'])
}

fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "..."
    })
}

/// Splits a file into its non-empty YAML documents (`---` separated). JSON is one document.
pub fn split(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1usize;
    let mut offset = 0usize;
    fn push<'a>(text: &'a str, from: usize, to: usize, line: usize, docs: &mut Vec<Document<'a>>) {
        let t = &text[from..to];
        if !is_blank(t) {
            let index = docs.len() + 1;
            docs.push(Document { index, line, text: t });
        }
    }
    for (line_no, line) in (1usize..).zip(text.split_inclusive('\n')) {
        if is_separator(line.trim_end_matches(['\n', '\r'])) {
            push(text, start, offset, start_line, &mut docs);
            start = offset + line.len();
            start_line = line_no + 1;
        }
        offset += line.len();
    }
    push(text, start, text.len(), start_line, &mut docs);
    docs
}

/// YAML as Kubernetes reads it: YAML 1.1 octals (`mode: 0644`) are numbers.
fn yaml_options() -> serde_saphyr::Options {
    let mut o = serde_saphyr::Options::default();
    o.legacy_octal_numbers = true;
    o
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

fn short_message(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    // pbjson lists every expected field after an unknown one; the field name is what matters.
    match text.find(", expected one of") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn err(
    file: &str,
    doc: &Document<'_>,
    reason: Reason,
    kind: Option<&str>,
    field: Option<String>,
    line: Option<usize>,
    message: String,
) -> ManifestError {
    ManifestError {
        file: file.to_string(),
        document: doc.index,
        line,
        field,
        reason,
        kind: kind.map(str::to_string),
        message,
    }
}

fn doc_line(doc: &Document<'_>, e: &serde_saphyr::Error) -> Option<usize> {
    e.location().map(|l| doc.line + l.line().saturating_sub(1) as usize)
}

/// Finds the line of the last key of `path` in the document, for errors that carry no
/// location of their own.
fn line_of_path(doc: &Document<'_>, path: &str) -> Option<usize> {
    // The last key: `a.b[key.with.dots]` -> `key.with.dots`; `a.b[3]` -> `b`; `a.b` -> `b`.
    let key = match path.strip_suffix(']').and_then(|p| p.rsplit_once('[')) {
        Some((_, inside)) if inside.parse::<usize>().is_err() => inside,
        Some((before, _)) => before.rsplit('.').next()?,
        None => path.rsplit('.').next()?,
    };
    let key = key.split('[').next()?;
    if key.is_empty() || key == "?" {
        return None;
    }
    doc.text
        .lines()
        .position(|l| {
            let t = l.trim_start().trim_start_matches("- ");
            t.starts_with(&format!("{key}:")) || t.starts_with(&format!("\"{key}\":"))
        })
        .map(|i| doc.line + i)
}

fn typed<T: DeserializeOwned>(file: &str, doc: &Document<'_>, kind: &str) -> Result<T, ManifestError> {
    // The field path is taken out of the closure on the side: the YAML layer reports the
    // error itself (with its location) once the closure fails.
    let mut path: Option<String> = None;
    let result = serde_saphyr::with_deserializer_from_str_with_options(doc.text, yaml_options(), |de| {
        serde_path_to_error::deserialize::<_, T>(de).map_err(|pe| {
            path = Some(pe.path().to_string());
            pe.into_inner()
        })
    });
    match result {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = path.filter(|p| p != "." && !p.is_empty());
            let line = doc_line(doc, &e).or_else(|| path.as_deref().and_then(|p| line_of_path(doc, p)));
            let reason = if path.is_some() { Reason::Invalid } else { Reason::Syntax };
            Err(err(file, doc, reason, Some(kind), path, line, short_message(&e)))
        }
    }
}

macro_rules! typed_object {
    ($kind:expr, $file:expr, $doc:expr, $name:expr, { $($k:ident => $msg:ident / $arm:ident),* $(,)? }) => {
        match $kind {
            $(Kind::$k => pb::object::Kind::$arm(typed::<pb::$msg>($file, $doc, $name)?),)*
        }
    };
}

/// Parses one document into a typed object and validates it.
pub fn parse_document(file: &str, doc: &Document<'_>) -> Result<pb::Object, ManifestError> {
    let head: Head = serde_saphyr::from_str_with_options(doc.text, yaml_options())
        .map_err(|e| err(file, doc, Reason::Syntax, None, None, doc_line(doc, &e), short_message(&e)))?;
    let kind_name = head.kind.unwrap_or_default();
    let api_version = head.api_version.unwrap_or_default();
    if api_version.is_empty() {
        let line = line_of_path(doc, "apiVersion");
        return Err(err(file, doc, Reason::Invalid, None, Some("apiVersion".into()), line, "Required value".into()));
    }
    if kind_name.is_empty() {
        return Err(err(file, doc, Reason::Invalid, None, Some("kind".into()), None, "Required value".into()));
    }
    let info = kinds::lookup(&api_version, &kind_name).map_err(|e| {
        let reason = match e {
            KindError::Unsupported { .. } | KindError::Removed { .. } => Reason::Unsupported,
            KindError::WrongVersion { .. } => Reason::Invalid,
        };
        err(
            file,
            doc,
            reason,
            Some(&kind_name),
            Some("apiVersion".into()),
            line_of_path(doc, "apiVersion"),
            e.to_string(),
        )
    })?;
    let object = typed_object!(info.kind, file, doc, &kind_name, {
        Namespace => Namespace / Namespace,
        Node => Node / Node,
        Pod => Pod / Pod,
        Service => Service / Service,
        Endpoints => Endpoints / Endpoints,
        ConfigMap => ConfigMap / ConfigMap,
        Secret => Secret / Secret,
        Event => CoreEvent / Event,
        Lease => Lease / Lease,
        ReplicaSet => ReplicaSet / ReplicaSet,
        ReplicationController => ReplicationController / ReplicationController,
        Deployment => Deployment / Deployment,
        DaemonSet => DaemonSet / DaemonSet,
        StatefulSet => StatefulSet / StatefulSet,
        ControllerRevision => ControllerRevision / ControllerRevision,
        Job => Job / Job,
        CronJob => CronJob / CronJob,
    });
    if info.kind == Kind::Secret {
        check_secret_base64(file, doc)?;
    }
    let object = pb::Object { kind: Some(object) };
    if let Some(first) = validation::validate(&object).into_iter().next() {
        let line = line_of_path(doc, &first.field);
        return Err(err(file, doc, Reason::Invalid, Some(&kind_name), Some(first.field), line, first.detail));
    }
    Ok(object)
}

/// Secret `data` must be standard base64, as the API server requires. (The typed decoder also
/// takes the URL-safe alphabet, which Kubernetes refuses.)
fn check_secret_base64(file: &str, doc: &Document<'_>) -> Result<(), ManifestError> {
    #[derive(Deserialize)]
    struct Data {
        data: Option<std::collections::BTreeMap<String, String>>,
    }
    let Ok(Data { data: Some(data) }) = serde_saphyr::from_str_with_options::<Data>(doc.text, yaml_options()) else {
        return Ok(());
    };
    for (key, value) in data {
        let v: String = value.chars().filter(|c| !c.is_whitespace()).collect();
        let ok = v.len().is_multiple_of(4)
            && v.trim_end_matches('=').bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
            && v.len() - v.trim_end_matches('=').len() <= 2;
        if !ok {
            let field = format!("data[{key}]");
            let line = line_of_path(doc, &field);
            return Err(err(
                file,
                doc,
                Reason::Invalid,
                Some("Secret"),
                Some(field),
                line,
                "Invalid value: not valid base64 (standard alphabet)".into(),
            ));
        }
    }
    Ok(())
}

/// Parses every document of a file.
pub fn parse_file(file: &str, text: &str) -> Vec<Result<pb::Object, ManifestError>> {
    split(text).iter().map(|d| parse_document(file, d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: nginx
        image: nginx:1.14.2
        ports:
        - containerPort: 80
";

    fn one(text: &str) -> Result<pb::Object, ManifestError> {
        let docs = split(text);
        assert_eq!(docs.len(), 1, "{docs:?}");
        parse_document("x.yaml", &docs[0])
    }

    #[test]
    fn a_deployment_parses_into_typed_fields() {
        let obj = one(DEPLOYMENT).unwrap();
        let Some(pb::object::Kind::Deployment(d)) = obj.kind else { panic!("not a deployment") };
        assert_eq!(d.metadata.as_ref().unwrap().name, "web");
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.unwrap().spec.unwrap();
        assert_eq!(pod.containers[0].image, "nginx:1.14.2");
        assert_eq!(pod.containers[0].ports[0].container_port, 80);
    }

    #[test]
    fn documents_split_on_separators_and_keep_their_lines() {
        let text = format!("# leading comment\n---\n{DEPLOYMENT}---\n\n--- # empty\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: dev\n");
        let docs = split(&text);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].line, 3);
        assert_eq!(docs[1].index, 2);
        assert!(docs[1].text.starts_with("apiVersion: v1"));
        assert_eq!(docs[1].line, 26);
    }

    #[test]
    fn an_unknown_field_names_its_path_and_line() {
        let bad = DEPLOYMENT
            .replace("        image: nginx:1.14.2\n", "        image: nginx:1.14.2\n        imagePullPolice: Always\n");
        let e = one(&bad).unwrap_err();
        assert_eq!(e.reason, Reason::Invalid);
        assert_eq!(e.field.as_deref(), Some("spec.template.spec.containers[0].imagePullPolice"), "{e}");
        assert_eq!(e.line, Some(19), "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn a_wrong_type_names_its_path() {
        let bad = DEPLOYMENT.replace("  replicas: 2", "  replicas: [2]");
        let e = one(&bad).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("spec.replicas"), "{e}");
        assert_eq!(e.line, Some(7), "{e}");
    }

    #[test]
    fn syntax_errors_point_to_the_line() {
        for (text, line) in [
            ("apiVersion: v1\nkind: Namespace\nmetadata:\n\tname: x\n", 4),
            ("apiVersion: v1\nkind: Namespace\nkind: Namespace\nmetadata: {name: x}\n", 3),
            ("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"x\n", 4),
        ] {
            let e = one(text).unwrap_err();
            assert_eq!(e.reason, Reason::Syntax, "{e}");
            assert!(e.line.is_some_and(|l| l >= line - 1 && l <= line), "expected line {line}: {e}");
        }
    }

    #[test]
    fn unsupported_and_removed_kinds_are_named() {
        let e = one("apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: x}\n").unwrap_err();
        assert_eq!(e.reason, Reason::Unsupported);
        assert!(e.to_string().contains("Ingress"), "{e}");
        let e = one("apiVersion: batch/v1beta1\nkind: CronJob\nmetadata: {name: x}\n").unwrap_err();
        assert!(e.to_string().contains("batch/v1"), "{e}");
    }

    #[test]
    fn json_manifests_parse_too() {
        let obj = one(r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80, "targetPort": "http"}]}}"#).unwrap();
        let Some(pb::object::Kind::Service(s)) = obj.kind else { panic!() };
        assert_eq!(s.spec.unwrap().ports[0].target_port, Some(crate::api::IntOrString::string("http")));
    }

    #[test]
    fn validation_errors_read_like_kubectl() {
        let e = one(&DEPLOYMENT.replace("image: nginx:1.14.2", "image: <your-image>")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("spec.template.spec.containers[0].image"));
        let e = one(
            &DEPLOYMENT.replace("        ports:\n", "        resources: {limits: {memory: 2GB}}\n        ports:\n")
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("spec.template.spec.containers[0].resources.limits[memory]"), "{e}");
        assert!(e.message.contains("\"2GB\""), "{e}");
        let e = one("apiVersion: v1\nkind: Namespace\nmetadata:\n  labels: {a: b}\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("metadata.name"));
        assert!(e.message.contains("Required value"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

        /// Arbitrary text never panics the parser; it parses or gets an error.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            for r in parse_file("fuzz.yaml", &text) {
                if let Err(e) = r {
                    proptest::prop_assert!(!e.to_string().is_empty());
                }
            }
        }

        /// Damaged real manifests never panic, and errors always name a document.
        #[test]
        fn damaged_manifests_never_panic(cut in 0usize..400, insert in "[ :\\-\\[\\]{}\"'\t\n#a-z0-9]{0,6}") {
            let mut text = DEPLOYMENT.to_string();
            let at = cut.min(text.len());
            let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
            text.insert_str(at, &insert);
            for r in parse_file("fuzz.yaml", &text) {
                if let Err(e) = r {
                    proptest::prop_assert!(e.document >= 1);
                }
            }
        }
    }
}
