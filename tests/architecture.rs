//! The layering of `docs/architecture.md`, checked on the source: each rule names a folder of
//! `src/` and the top-level modules it must not reach. A forbidden edge fails the build with
//! the file, the line and the rule it breaks.
//!
//! Edges are found by reading paths: `crate::<module>` anywhere in a file (uses, types,
//! calls), `use crate::{a, b}` groups, and `keel::<module>` in the binaries.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The top-level modules of the library.
fn modules() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(root().join("src")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if name != "lib" {
            out.insert(name);
        }
    }
    out
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every `<prefix>::<module>` reference in `text`, with its line.
fn references(text: &str, prefix: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a::x, b}`: each item's first segment.
                let inner = group.split('}').next().unwrap_or_default();
                for item in inner.split(',') {
                    let m: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if !m.is_empty() {
                        out.push((n + 1, m));
                    }
                }
                continue;
            }
            let m: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !m.is_empty() {
                out.push((n + 1, m));
            }
        }
    }
    out
}

/// The top-level module a file of `src/` belongs to.
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(root().join("src")).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
    first.trim_end_matches(".rs").to_string()
}

struct Rule {
    /// The module the rule is about.
    from: &'static str,
    /// What it may not reach.
    forbidden: &'static [&'static str],
    why: &'static str,
}

const RULES: &[Rule] = &[
    Rule {
        from: "api",
        forbidden: &[
            "store",
            "server",
            "client",
            "cli",
            "agent",
            "controllers",
            "scheduler",
            "proxy",
            "pki",
            "seal",
            "backup",
            "grpc",
            "harness",
            "bench",
            "chaos",
            "netfault",
        ],
        why: "api is shared vocabulary: it imports only proto",
    },
    Rule {
        from: "proto",
        forbidden: &["store", "server", "client", "cli", "agent", "controllers", "api", "pki", "harness"],
        why: "proto is the generated vocabulary everything else builds on",
    },
    Rule {
        from: "store",
        forbidden: &["api", "server", "client", "pki", "cli", "agent", "controllers", "scheduler", "proxy", "harness"],
        why: "the store knows keys and revisions, not objects, servers, clients or certificates",
    },
    Rule {
        from: "client",
        forbidden: &["store", "server", "cli", "agent", "controllers", "scheduler", "proxy", "harness"],
        why: "the client talks to servers over gRPC only",
    },
    Rule {
        from: "agent",
        forbidden: &["store", "server", "cli", "scheduler", "proxy", "harness"],
        why: "the agent reaches the cluster only through client",
    },
    Rule {
        from: "controllers",
        forbidden: &["store", "server", "cli", "agent", "scheduler", "proxy", "harness"],
        why: "controllers reach the cluster only through client and never call another component",
    },
    Rule {
        from: "scheduler",
        forbidden: &["store", "server", "cli", "agent", "proxy", "harness"],
        why: "the scheduler reaches the cluster only through client",
    },
    Rule {
        from: "proxy",
        forbidden: &["store", "server", "cli", "agent", "scheduler", "harness"],
        why: "the proxy reaches the cluster only through client",
    },
    Rule {
        from: "cli",
        forbidden: &["store", "server", "agent", "controllers", "scheduler", "proxy", "harness"],
        why: "keelctl reaches the cluster only through client",
    },
    Rule {
        from: "server",
        forbidden: &["cli", "agent", "proxy", "harness", "chaos", "bench"],
        why: "a replica serves the API; it uses no command-line or node code",
    },
    Rule {
        from: "seal",
        forbidden: &["store", "server", "client", "cli", "agent", "controllers", "api"],
        why: "sealing is a leaf: bytes in, sealed bytes out",
    },
    Rule {
        from: "grpc",
        forbidden: &["store", "server", "client", "cli", "api", "pki"],
        why: "grpc is a leaf of wire facts",
    },
    Rule {
        from: "up",
        forbidden: &["store", "server", "cli", "controllers", "scheduler", "proxy", "harness"],
        why: "keel up starts processes and talks to them through the client",
    },
    Rule { from: "pki", forbidden: &["store", "server", "client", "cli", "api"], why: "pki is a leaf" },
    Rule {
        from: "tls",
        forbidden: &[
            "store",
            "server",
            "client",
            "cli",
            "api",
            "agent",
            "controllers",
            "scheduler",
            "proxy",
            "harness",
        ],
        why: "tls turns credentials into rustls configurations for servers and clients alike; it uses only pki",
    },
];

#[test]
fn no_module_imports_what_its_layer_forbids() {
    let modules = modules();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut broken = Vec::new();
    let mut edges = 0;
    for f in &files {
        let from = module_of(f);
        let text = std::fs::read_to_string(f).unwrap();
        for (line, to) in references(&text, "crate::") {
            if !modules.contains(&to) || to == from {
                continue;
            }
            edges += 1;
            for rule in RULES.iter().filter(|r| r.from == from) {
                if rule.forbidden.contains(&to.as_str()) {
                    broken.push(format!("{}:{line}: {from} -> {to} ({})", f.display(), rule.why));
                }
            }
            // The agent, the scheduler and the proxy run their loops on the control-loop
            // runtime, and use nothing else of the controllers.
            let code = text.lines().nth(line - 1).unwrap_or_default();
            if ["agent", "scheduler", "proxy"].contains(&from.as_str())
                && to == "controllers"
                && !code.contains("controllers::runtime")
            {
                broken.push(format!(
                    "{}:{line}: {from} -> controllers beyond controllers::runtime (components never call each other)",
                    f.display()
                ));
            }
            // Only the composition root of a replica starts the controllers.
            if from == "server" && (to == "controllers" || to == "scheduler") && !f.ends_with("server/run.rs") {
                broken.push(format!(
                    "{}:{line}: server -> controllers outside server/run.rs (the gRPC server never starts loops)",
                    f.display()
                ));
            }
        }
    }
    assert!(edges > 50, "the scan found only {edges} edges: it is not reading the source");
    assert!(broken.is_empty(), "forbidden imports:\n{}", broken.join("\n"));
}

#[test]
fn only_the_keelctl_main_uses_the_cli() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    rust_files(&root().join("cmd"), &mut files);
    rust_files(&root().join("chaos"), &mut files);
    let mut broken = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let in_cli = f.starts_with(root().join("src/cli"));
        let is_keelctl = f.ends_with("cmd/keelctl.rs");
        for (prefix, name) in [("crate::", "crate"), ("keel::", "keel")] {
            for (line, to) in references(&text, prefix) {
                if to == "cli" && !in_cli && !is_keelctl {
                    broken.push(format!("{}:{line}: {name}::cli", f.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "only cmd/keelctl.rs may use the cli:\n{}", broken.join("\n"));
}

/// The mains parse flags and call the library: no store, no server internals in keelctl, and
/// no store in keel beyond its configuration type.
#[test]
fn the_mains_only_parse_flags_and_call_the_library() {
    let keelctl = std::fs::read_to_string(root().join("cmd/keelctl.rs")).unwrap();
    let used: BTreeSet<String> = references(&keelctl, "keel::").into_iter().map(|(_, m)| m).collect();
    assert_eq!(used, BTreeSet::from(["cli".to_string()]), "keelctl's main uses only keel::cli");
    let keel = std::fs::read_to_string(root().join("cmd/keel.rs")).unwrap();
    for (line, m) in references(&keel, "keel::") {
        assert!(
            ["server", "agent", "bench", "api", "store", "seal", "up"].contains(&m.as_str()),
            "cmd/keel.rs:{line}: keel::{m}"
        );
    }
    let lines = keel.lines().count();
    assert!(lines < 400, "cmd/keel.rs has {lines} lines: logic belongs in the library");
    let functions = keel.matches("\nasync fn ").count() + keel.matches("\nfn ").count();
    assert!(functions <= 8, "cmd/keel.rs has {functions} functions: flags and calls only");
}

#[test]
fn the_reference_scanner_sees_groups_and_paths() {
    let text = "use crate::{api::kinds, client::Client};\nlet x = crate::store::Store::open();\n// crate::cli in a comment\nmycrate::server";
    let refs: Vec<String> = references(text, "crate::").into_iter().map(|(_, m)| m).collect();
    assert_eq!(refs, ["api", "client", "store"]);
}
