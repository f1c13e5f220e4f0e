//! Real-world input: every upstream example manifest in shared/compat is read, every time,
//! with no list of exceptions hidden in code. Documents of a supported kind must be accepted;
//! documents of other kinds must be refused naming the kind; the invalid documents listed in
//! shared/compat/README.md (and tests/compat-invalid.txt) must be refused with file,
//! document, field path and line.
//!
//! Accepted documents are then applied through the Objects API of a real replica, each file
//! in a fresh namespace (unless the document names its own, which is created first).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use keel::api::manifest::{self, Reason};

fn compat_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("KEEL_COMPAT_DIR") {
        return Some(PathBuf::from(d));
    }
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/compat");
    d.exists().then_some(d)
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(p);
        }
    }
}

/// Known-invalid documents: the README's list (by path) plus tests/compat-invalid.txt (path and field).
fn known_invalid(root: &Path) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap_or_default();
    for line in readme.lines() {
        if let Some(rest) = line.strip_prefix("- `") {
            if let Some((path, _)) = rest.split_once('`') {
                if path.ends_with(".yaml") {
                    out.insert(path.to_string(), None);
                }
            }
        }
    }
    let extra =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat-invalid.txt")).unwrap();
    for line in extra.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let mut parts = line.split('\t');
        let path = parts.next().unwrap().to_string();
        out.insert(path, parts.next().map(str::to_string));
    }
    out
}

#[derive(Default)]
struct Tally {
    accepted: usize,
    unsupported: usize,
    invalid: usize,
}

struct Cluster {
    _dir: tempfile::TempDir,
    _server: keel::harness::TestReplica,
    client: keel::proto::v1::objects_client::ObjectsClient<tonic::transport::Channel>,
}

async fn start() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr, pki) = keel::harness::single_replica(&dir.path().join("n1")).await.unwrap();
    let ch = keel::client::endpoint(&addr, &pki.admin).unwrap().connect().await.unwrap();
    Cluster { _dir: dir, _server: server, client: keel::proto::v1::objects_client::ObjectsClient::new(ch) }
}

fn namespace_object(name: &str) -> keel::proto::v1::Object {
    use keel::proto::v1 as pb;
    pb::Object {
        kind: Some(pb::object::Kind::Namespace(pb::Namespace {
            metadata: Some(pb::ObjectMeta { name: name.into(), ..Default::default() }),
            ..Default::default()
        })),
    }
}

/// Applies the object, together with its namespace, in one Apply transaction. A name that
/// another document already took (a shared namespace such as kube-system, or two documents of
/// one file) is merged over, as re-applying with kubectl would.
async fn apply(c: &mut Cluster, file_ns: &str, mut obj: keel::proto::v1::Object) -> Result<(), tonic::Status> {
    use keel::proto::v1 as pb;
    let info = keel::api::object::info(&obj).unwrap();
    let mut objects = Vec::new();
    if info.namespaced {
        let m = keel::api::object::meta_mut(&mut obj).unwrap();
        if m.namespace.is_empty() {
            m.namespace = file_ns.to_string();
        }
        objects.push(namespace_object(&m.namespace));
    }
    objects.push(obj);
    c.client.apply(pb::ApplyRequest { objects, dry_run: false }).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upstream_example_is_accepted_or_refused_with_a_precise_reason() {
    let Some(root) = compat_dir() else {
        assert!(
            std::env::var("KEEL_E2E").as_deref() != Ok("1"),
            "KEEL_E2E=1 but shared/compat is missing (set KEEL_COMPAT_DIR)"
        );
        eprintln!("skipping: shared/compat not found");
        return;
    };
    let docs_root = root.join("k8s-docs");
    let invalid = known_invalid(&root);
    assert!(invalid.len() >= 5, "the README's list of invalid documents was not found");
    let mut files = Vec::new();
    yaml_files(&docs_root, &mut files);
    assert!(files.len() > 100, "only {} files found under {}", files.len(), docs_root.display());

    let mut cluster = start().await;
    let mut table: BTreeMap<String, Tally> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut refused_invalid = BTreeSet::new();
    for (file_index, file) in files.iter().enumerate() {
        let file_ns = format!("compat-{file_index}");
        let rel = file.strip_prefix(&docs_root).unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(file).unwrap();
        for result in manifest::parse_file(&rel, &text) {
            match result {
                Ok(obj) => {
                    let kind = match obj.kind.as_ref().unwrap() {
                        keel::proto::v1::object::Kind::Event(_) => "Event".to_string(),
                        other => format!("{other:?}").split('(').next().unwrap().to_string(),
                    };
                    if let Err(status) = apply(&mut cluster, &file_ns, obj).await {
                        problems.push(format!("{rel}: parsed but the API refused it: {}", status.message()));
                    }
                    table.entry(kind).or_default().accepted += 1;
                    if invalid.contains_key(&rel) {
                        problems.push(format!("{rel}: listed as invalid but a document was accepted"));
                    }
                }
                Err(e) => {
                    let kind = e.kind.clone().unwrap_or_else(|| "(none)".into());
                    let entry = table.entry(kind.clone()).or_default();
                    match e.reason {
                        Reason::Unsupported => {
                            entry.unsupported += 1;
                            if !e.message.contains(&kind) && !e.message.contains("removed") {
                                problems.push(format!("{e}: the refusal does not name the kind {kind}"));
                            }
                        }
                        Reason::Invalid | Reason::Syntax => {
                            entry.invalid += 1;
                            refused_invalid.insert(rel.clone());
                            match invalid.get(&rel) {
                                None => problems.push(format!("refused but not known to be invalid: {e}")),
                                Some(want) => {
                                    let field = e.field.clone().unwrap_or_default();
                                    if field.is_empty() || e.line.is_none() {
                                        problems.push(format!("{e}: an invalid document must name a field and a line"));
                                    }
                                    if let Some(want) = want {
                                        if !field.starts_with(want.as_str()) {
                                            problems.push(format!("{e}: expected the error at {want}"));
                                        }
                                    }
                                    println!("refused as invalid, as expected: {e}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    // Every known-invalid document of a supported kind was refused as invalid; those of
    // unsupported kinds were refused as unsupported (counted above).
    for path in invalid.keys() {
        let text = std::fs::read_to_string(docs_root.join(path)).unwrap_or_default();
        let refused_unsupported =
            manifest::parse_file(path, &text).iter().any(|r| matches!(r, Err(e) if e.reason == Reason::Unsupported));
        if !refused_invalid.contains(path) && !refused_unsupported {
            problems.push(format!("{path}: listed as invalid but not refused"));
        }
    }

    println!("{:<28} {:>9} {:>12} {:>8}", "KIND", "APPLIED", "UNSUPPORTED", "INVALID");
    let mut total = Tally::default();
    for (kind, t) in &table {
        println!("{kind:<28} {:>9} {:>12} {:>8}", t.accepted, t.unsupported, t.invalid);
        total.accepted += t.accepted;
        total.unsupported += t.unsupported;
        total.invalid += t.invalid;
    }
    println!("{:<28} {:>9} {:>12} {:>8}", "total", total.accepted, total.unsupported, total.invalid);
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
    assert!(total.accepted > 100, "suspiciously few accepted documents");
}
