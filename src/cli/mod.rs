//! keelctl's object commands: apply, create, get, delete. They read manifests at the edge
//! and speak only the gRPC Objects API, failing over between replicas.

pub mod cluster;
pub mod commands;
pub mod config;
pub mod print;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::{AuthChannel, ClientAuth};
use anyhow::{bail, Context};
use tonic::Code;

use crate::api::{kinds, manifest, object};
use crate::proto::v1 as pb;
use crate::proto::v1::objects_client::ObjectsClient;

/// Objects API clients for every replica; calls go to the first that answers.
pub struct Api {
    clients: Vec<(String, ObjectsClient<AuthChannel>)>,
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown)
}

impl Api {
    pub fn new(servers: &[String], auth: &ClientAuth) -> anyhow::Result<Api> {
        let mut clients = Vec::new();
        for s in servers {
            let ch = crate::client::auth_channel(s, auth, Duration::from_secs(2))
                .with_context(|| format!("invalid server address {s:?}"))?;
            clients.push((s.clone(), ObjectsClient::new(ch)));
        }
        if clients.is_empty() {
            bail!("no server given (--server or KEEL_SERVER)");
        }
        Ok(Api { clients })
    }

    /// Runs `f` against each replica in turn while the failure means "try another one".
    /// Only calls that are safe to repeat go through here.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: Fn(ObjectsClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = None;
        for (_, c) in &self.clients {
            match f(c.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if retryable(&s) => last = Some(s),
                Err(s) => return Err(s),
            }
        }
        Err(last.unwrap_or_else(|| tonic::Status::unavailable("no replica answered")))
    }
}

/// Files named by `-f`: files, directories (with `recursive`, their subdirectories) or `-`.
pub fn manifest_files(paths: &[PathBuf], recursive: bool) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("read {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                if recursive {
                    walk(&p, recursive, out)?;
                }
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" || p.is_file() {
            out.push(p.clone());
        } else if p.is_dir() {
            walk(p, recursive, &mut out)?;
        } else {
            bail!("the path {:?} does not exist", p.display().to_string());
        }
    }
    Ok(out)
}

/// Reads and parses every document; any error stops before anything is sent.
pub fn read_manifests(files: &[PathBuf]) -> anyhow::Result<Vec<pb::Object>> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        let (name, text) = if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
            ("<stdin>".to_string(), s)
        } else {
            (f.display().to_string(), std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?)
        };
        for r in manifest::parse_file(&name, &text) {
            match r {
                Ok(o) => objects.push(o),
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    if !errors.is_empty() {
        bail!("{}\nnothing was applied", errors.join("\n"));
    }
    Ok(objects)
}

fn set_namespace(obj: &mut pb::Object, namespace: &str) -> anyhow::Result<()> {
    let info = object::info(obj).context("object without a kind")?;
    if let Some(m) = object::meta_mut(obj) {
        if info.namespaced {
            if m.namespace.is_empty() {
                m.namespace = namespace.to_string();
            } else if m.namespace != namespace && namespace != "default" {
                bail!(
                    "the namespace from the provided object {:?} does not match the namespace {namespace:?}; you must pass '--namespace={}' to perform this operation",
                    m.namespace,
                    m.namespace
                );
            }
        }
    }
    Ok(())
}

/// `kind/name` as kubectl prints it (`deployment.apps/web`).
pub fn display_name(obj: &pb::Object) -> String {
    let info = object::info(obj);
    let name = object::meta(obj).map(|m| m.name.clone()).unwrap_or_default();
    match info {
        Some(i) => match i.api_version.split_once('/') {
            Some((group, _)) => format!("{}.{group}/{name}", i.name.to_ascii_lowercase()),
            None => format!("{}/{name}", i.name.to_ascii_lowercase()),
        },
        None => name,
    }
}

/// Applies manifests through the server's three-way merge, one object per transaction, or
/// (with `atomic`) all of them in one. Prints one line per object, as kubectl does; with one
/// object per transaction, a failure does not stop the others.
pub async fn apply(
    api: &Api,
    objects: Vec<pb::Object>,
    namespace: &str,
    atomic: bool,
    dry_run: bool,
) -> anyhow::Result<()> {
    let mut objects = objects;
    for obj in &mut objects {
        set_namespace(obj, namespace)?;
    }
    let suffix = if dry_run { " (server dry run)" } else { "" };
    let send = |objects: Vec<pb::Object>| {
        // Applying the same manifests twice ends in the same state, so it is safe to retry.
        api.call(move |mut c| {
            let objects = objects.clone();
            async move { c.apply(pb::ApplyRequest { objects, dry_run }).await }
        })
    };
    let print = |r: pb::ApplyResponse| {
        for res in r.results {
            if let Some(o) = res.object {
                println!("{} {}{suffix}", display_name(&o), res.action);
            }
        }
    };
    if atomic {
        let n = objects.len();
        print(send(objects).await.map_err(status_error).context(format!("none of the {n} objects was applied"))?);
        return Ok(());
    }
    let mut failed = Vec::new();
    for obj in objects {
        match send(vec![obj]).await {
            Ok(r) => print(r),
            Err(s) => failed.push(status_error(s).to_string()),
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }
    Ok(())
}

/// Creates one object (a create is retried on another replica only if the first was
/// unreachable).
pub async fn create(api: &Api, obj: pb::Object) -> anyhow::Result<pb::Object> {
    api.call(|mut c| {
        let o = obj.clone();
        async move { c.create(pb::CreateRequest { object: Some(o) }).await }
    })
    .await
    .map_err(status_error)
}

/// Turns an API status into the message kubectl would print.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        Code::Unavailable => anyhow::anyhow!("the server is unavailable: {}", s.message()),
        _ => anyhow::anyhow!("Error from server ({:?}): {}", s.code(), s.message()),
    }
}

pub fn resolve_kind(kind: &str) -> anyhow::Result<&'static kinds::KindInfo> {
    kinds::by_name(kind).with_context(|| format!("the server doesn't have a resource type {kind:?}"))
}
