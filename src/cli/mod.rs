//! keelctl, kubectl's counterpart: commands that read Kubernetes-style YAML at the edge and
//! speak only the cluster's gRPC APIs through `client`. The keelctl binary parses the
//! command line (`args`) and calls [`run`].
//!
//! - `objects`: apply, create, get, delete, describe;
//! - `modify`: label, annotate, scale, edit (read, change, compare-and-swap);
//! - `print` and `jsonpath`: every `-o` format;
//! - `cluster`, `kv`, `config_cmd`: cluster administration, raw keys, contexts.

pub mod args;
pub mod cluster;
pub mod config_cmd;
pub mod describe;
pub mod jsonpath;
pub mod kv;
pub mod modify;
pub mod nodes;
pub mod objects;
pub mod pods;
pub mod print;

use std::path::{Path, PathBuf};

use crate::api::{kinds, manifest, object};
use crate::client::config::{self, ConfigError};
use crate::client::{Client, ClientAuth, ClientConfig, ClientError};
use crate::proto::v1 as pb;
use args::{Cli, Command};

/// What a keelctl command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    #[error("{0}")]
    Message(String),
    /// The command `keelctl exec` ran ended with this code (keelctl exits with it).
    #[error("command terminated with exit code {0}")]
    Exit(i32),
}

pub type Result<T> = std::result::Result<T, CliError>;

/// Returns early with a message, as `anyhow::bail!` would.
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::cli::CliError::Message(format!($($t)*)))
    };
}
pub(crate) use bail;

/// Adds what was being done to an error.
pub trait Context<T> {
    fn context(self, what: impl std::fmt::Display) -> Result<T>;
    fn with_context<S: std::fmt::Display>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| CliError::Message(format!("{what}: {e}")))
    }

    fn with_context<S: std::fmt::Display>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| CliError::Message(format!("{}: {e}", what())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl std::fmt::Display) -> Result<T> {
        self.ok_or_else(|| CliError::Message(what.to_string()))
    }

    fn with_context<S: std::fmt::Display>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.ok_or_else(|| CliError::Message(what().to_string()))
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> CliError {
        CliError::Message(e.to_string())
    }
}

/// The message kubectl would print for an error.
pub fn describe_error(e: &CliError) -> String {
    match e {
        CliError::Client(ClientError::Status { status, .. }) => {
            format!("Error from server ({:?}): {}", status.code(), status.message())
        }
        CliError::Client(ClientError::Unavailable { addr, last, .. }) => {
            format!("error: the server is unavailable: {addr}: {}", last.message())
        }
        CliError::Client(e @ ClientError::Indeterminate { .. }) => format!("error: {e}"),
        CliError::Message(m) if m.starts_with("Error from server") => m.clone(),
        other => format!("error: {other}"),
    }
}

/// The cluster a command talks to, from the configuration file and the flags.
pub struct Session {
    pub client: Client,
    pub auth: ClientAuth,
    pub servers: Vec<String>,
    pub namespace: String,
}

impl Session {
    fn open(cli: &Cli) -> Result<Session> {
        let path = config::read_path();
        let cfg = config::Config::load(&path)?;
        let ctx = match cfg.selected(cli.context.as_deref())? {
            Some(c) => c.clone(),
            None => bail!(
                "no context: {} has no current-context; point KEELCONFIG at the admin configuration that `keel server` wrote (by default {})",
                path.display(),
                config::ADMIN_CONFIG
            ),
        };
        let auth = ctx.auth()?;
        let servers = match &cli.server {
            Some(s) => s.clone(),
            None if !ctx.servers.is_empty() => ctx.servers.clone(),
            None => vec![config::DEFAULT_SERVER.to_string()],
        };
        let namespace = cli
            .namespace
            .clone()
            .or_else(|| Some(ctx.namespace.clone()).filter(|n| !n.is_empty()))
            .unwrap_or_else(|| "default".to_string());
        let client = Client::new(&servers, auth.clone(), ClientConfig::with_timeout(cli.request_timeout))?;
        Ok(Session { client, auth, servers, namespace })
    }

    /// The namespace a command about `info` works in ("" for cluster-scoped kinds).
    pub fn namespace_for(&self, info: &kinds::KindInfo) -> String {
        if info.namespaced {
            self.namespace.clone()
        } else {
            String::new()
        }
    }
}

/// Runs one keelctl command; returns the process's exit code.
pub async fn run(cli: Cli) -> std::process::ExitCode {
    match dispatch(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(CliError::Exit(code)) => {
            eprintln!("command terminated with exit code {code}");
            std::process::ExitCode::from(code.clamp(0, 255) as u8)
        }
        Err(e) => {
            // The message only: a user error is not a crash, so no backtrace.
            eprintln!("{}", describe_error(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    if let Command::Config(c) = cli.command {
        return config_cmd::run(c);
    }
    let s = Session::open(&cli)?;
    match cli.command {
        Command::Config(_) => Ok(()),
        Command::Token(t) => cluster::token(&s, t).await,
        Command::Cluster(c) => cluster::run(&s, c).await,
        Command::Apply(a) => objects::apply(&s, a).await,
        Command::Create(a) => objects::create(&s, a).await,
        Command::Get(g) => objects::get(&s, g).await,
        Command::Delete(d) => objects::delete(&s, d).await,
        Command::Describe(d) => objects::describe(&s, d).await,
        Command::Label(m) => modify::label_or_annotate(&s, m, false).await,
        Command::Annotate(m) => modify::label_or_annotate(&s, m, true).await,
        Command::Scale(a) => modify::scale(&s, a).await,
        Command::Edit(a) => modify::edit(&s, a).await,
        Command::ApiResources => {
            objects::api_resources();
            Ok(())
        }
        Command::Version => {
            println!("keelctl {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Status => kv::status(&s).await,
        Command::Kv(k) => kv::run(&s, k).await,
        Command::Logs(l) => pods::logs(&s, l).await,
        Command::Exec(e) => pods::exec(&s, e).await,
        Command::Cordon(n) => nodes::cordon(&s, n, true).await,
        Command::Uncordon(n) => nodes::cordon(&s, n, false).await,
        Command::Drain(d) => nodes::drain(&s, d).await,
        Command::Image(args::ImageCommand::Ls { node }) => nodes::images(&s, node).await,
    }
}

/// Files named by `-f`: files, directories (with `recursive`, their subdirectories) or `-`.
pub fn manifest_files(paths: &[PathBuf], recursive: bool) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> Result<()> {
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
pub fn read_manifests(files: &[PathBuf]) -> Result<Vec<pb::Object>> {
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

pub fn resolve_kind(kind: &str) -> Result<&'static kinds::KindInfo> {
    kinds::by_name(kind).with_context(|| format!("the server doesn't have a resource type {kind:?}"))
}

/// `deploy/web` or `deploy web`.
pub fn split_ref(kind: &str, name: Option<&str>) -> Result<(String, String)> {
    match (kind.split_once('/'), name) {
        (Some((k, n)), None) => Ok((k.to_string(), n.to_string())),
        (None, Some(n)) => Ok((kind.to_string(), n.to_string())),
        (Some(_), Some(_)) => bail!("there is no need to specify a resource type as a separate argument when passing arguments in resource/name form"),
        (None, None) => bail!("a name is required: KIND NAME or KIND/NAME"),
    }
}
