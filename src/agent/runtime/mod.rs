//! The container runtime boundary of the agent. Everything the pod workers ask of a runtime
//! goes through [`Runtime`]: import and look up images, create containers from an OCI
//! runtime spec, start, signal and remove them, and list what exists. Two implementations:
//! `containerd` (the real one, containerd's gRPC API with runc underneath) and `fake`
//! (hollow nodes for scale tests). Nothing outside `runtime::containerd` sees containerd's
//! types.

pub mod containerd;
pub mod fake;
pub mod managed;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Labels the agent puts on every container it makes.
pub const LABEL_POD_UID: &str = "io.keel.pod.uid";
pub const LABEL_POD_NAME: &str = "io.keel.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.keel.pod.namespace";
pub const LABEL_CONTAINER: &str = "io.keel.container.name";
/// The attempt number of a container of the pod (its restart count when it was made).
pub const LABEL_ATTEMPT: &str = "io.keel.container.attempt";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime cannot be reached (not started yet, restarting).
    #[error("the container runtime is unavailable: {0}")]
    Unavailable(String),
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    /// The request is wrong (a bad spec, an image that does not unpack): retrying will not help.
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

/// What an image says about how to run it (its OCI config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// An image present on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Its normalized name, e.g. `docker.io/library/busybox:latest`.
    pub name: String,
    /// The manifest's digest (Kubernetes' imageID).
    pub id: String,
    /// Compressed size of its layers, in bytes.
    pub size: u64,
    pub config: ImageConfig,
}

/// A container to create.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    /// Unique on the node; [A-Za-z0-9._-].
    pub id: String,
    /// An image that is present (by its normalized name).
    pub image: String,
    pub spec: oci_spec::runtime::Spec,
    /// stdout and stderr go to this file.
    pub log_path: PathBuf,
    pub labels: HashMap<String, String>,
}

/// Where a container is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// Made, never started (or its start failed).
    Created,
    Running {
        pid: u32,
        started_at: Option<SystemTime>,
    },
    Exited {
        code: i32,
        started_at: Option<SystemTime>,
        finished_at: Option<SystemTime>,
        oom: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    pub state: ContainerState,
    pub log_path: Option<PathBuf>,
}

impl ContainerInfo {
    pub fn label(&self, k: &str) -> &str {
        self.labels.get(k).map(String::as_str).unwrap_or_default()
    }
}

/// One place to pull an image from (a registry or a mirror of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSource {
    /// host[:port] of the registry API.
    pub host: String,
    /// Plain HTTP rather than HTTPS.
    pub http: bool,
    pub insecure_skip_verify: bool,
    pub ca_file: Option<PathBuf>,
    /// The repository there ("library/busybox").
    pub repository: String,
    /// ":tag" or "@sha256:…".
    pub reference: String,
    /// A user name and password.
    pub auth: Option<(String, String)>,
}

/// A command to run in a running container.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    /// A terminal: output comes on stdout only, and the size can be set.
    pub tty: bool,
    pub stdin: bool,
    /// The terminal's first size (columns, rows), set before the command starts.
    pub size: Option<(u32, u32)>,
}

pub type Reader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// A running exec: its streams, and its exit code once it ends (the runtime cleans up
/// after it then).
pub struct Exec {
    pub id: String,
    pub stdin: Option<Writer>,
    pub stdout: Reader,
    pub stderr: Option<Reader>,
    pub exit: futures::future::BoxFuture<'static, Result<i32, RuntimeError>>,
}

/// A container runtime as the agent uses it.
#[tonic::async_trait]
pub trait Runtime: Send + Sync {
    /// The runtime's name and version ("containerd 1.6.20"), which also says it is up.
    async fn version(&self) -> Result<String, RuntimeError>;
    /// Imports an OCI image layout or docker-archive tarball; the images it named.
    async fn import(&self, archive: &Path) -> Result<Vec<ImageInfo>, RuntimeError>;
    async fn image(&self, name: &str) -> Result<Option<ImageInfo>, RuntimeError>;
    /// Pulls image `name` (normalized) from the first of `sources` that has it, and records it
    /// under `name`.
    async fn pull(&self, name: &str, sources: &[PullSource]) -> Result<ImageInfo, RuntimeError>;
    async fn images(&self) -> Result<Vec<ImageInfo>, RuntimeError>;
    async fn create(&self, config: ContainerConfig) -> Result<(), RuntimeError>;
    async fn start(&self, id: &str) -> Result<(), RuntimeError>;
    /// Sends `signal` to the container's main process (a container already gone is fine).
    async fn signal(&self, id: &str, signal: i32) -> Result<(), RuntimeError>;
    /// Removes the container and everything it holds (its process, if any, is killed).
    /// Removing a container that does not exist succeeds.
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    async fn containers(&self) -> Result<Vec<ContainerInfo>, RuntimeError>;
    /// Starts `req` in running container `id`.
    async fn exec(&self, id: &str, req: ExecRequest) -> Result<Exec, RuntimeError>;
    /// Kills exec `exec_id` of container `id` (one that ended already is fine).
    async fn kill_exec(&self, id: &str, exec_id: &str) -> Result<(), RuntimeError>;
    /// Sets the terminal size of exec `exec_id` in container `id`.
    async fn resize(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<(), RuntimeError>;
    /// Ends the input of exec `exec_id` in container `id`, after the caller closed its writer.
    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), RuntimeError>;
}

/// Runs `cmd` in container `id` without input, up to `timeout`: its exit code and its output
/// (each stream up to 64 KiB). A command still running at the timeout is killed with its
/// container's other execs untouched, and reported as an error.
pub async fn exec_sync(
    rt: &dyn Runtime,
    id: &str,
    cmd: Vec<String>,
    timeout: std::time::Duration,
) -> Result<(i32, Vec<u8>, Vec<u8>), RuntimeError> {
    use tokio::io::AsyncReadExt;
    let what = cmd.join(" ");
    let exec = rt.exec(id, ExecRequest { cmd, tty: false, stdin: false, size: None }).await?;
    let read = |r: Reader| async move {
        let mut buf = Vec::new();
        let _ = r.take(64 << 10).read_to_end(&mut buf).await;
        buf
    };
    let stderr = exec.stderr.map(|e| tokio::spawn(read(e)));
    let stdout = tokio::spawn(read(exec.stdout));
    let exec_id = exec.id.clone();
    let code = match tokio::time::timeout(timeout, exec.exit).await {
        Ok(r) => r?,
        Err(_) => {
            let _ = rt.kill_exec(id, &exec_id).await;
            stdout.abort();
            if let Some(e) = &stderr {
                e.abort();
            }
            return Err(RuntimeError::Failed(format!("command {what:?} timed out after {timeout:?}")));
        }
    };
    let out = stdout.await.unwrap_or_default();
    let err = match stderr {
        Some(e) => e.await.unwrap_or_default(),
        None => Vec::new(),
    };
    Ok((code, out, err))
}

/// Normalizes an image reference as Docker and Kubernetes do: `busybox` is
/// `docker.io/library/busybox:latest`, `nginx:1.14.2` is `docker.io/library/nginx:1.14.2`,
/// `registry:5000/app` gains `:latest`; a digest reference keeps its digest.
pub fn normalize_image(reference: &str) -> String {
    let (name, suffix) = match reference.split_once('@') {
        Some((n, d)) => (n, format!("@{d}")),
        None => (reference, String::new()),
    };
    let (repo, tag) = match name.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, Some(t)),
        _ => (name, None),
    };
    let first = repo.split('/').next().unwrap_or_default();
    let has_registry = repo.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let repo = if has_registry {
        repo.to_string()
    } else if repo.contains('/') {
        format!("docker.io/{repo}")
    } else {
        format!("docker.io/library/{repo}")
    };
    match (tag, suffix.is_empty()) {
        (Some(t), _) => format!("{repo}:{t}{suffix}"),
        (None, true) => format!("{repo}:latest"),
        (None, false) => format!("{repo}{suffix}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn image_references_normalize_as_docker_does() {
        let n = super::normalize_image;
        assert_eq!(n("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(n("nginx:1.14.2"), "docker.io/library/nginx:1.14.2");
        assert_eq!(n("keel/entrypoint"), "docker.io/keel/entrypoint:latest");
        assert_eq!(n("docker.io/library/busybox:latest"), "docker.io/library/busybox:latest");
        assert_eq!(n("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(n("127.0.0.1:5000/a/b:v1"), "127.0.0.1:5000/a/b:v1");
        assert_eq!(n("quay.io/x/y@sha256:abc"), "quay.io/x/y@sha256:abc");
        assert_eq!(n("busybox:1@sha256:abc"), "docker.io/library/busybox:1@sha256:abc");
    }
}
