//! The real runtime: containerd's own gRPC API (containerd-client), runc underneath, every
//! object in one containerd namespace (`keel`).
//!
//! A container here is a containerd container (its OCI spec, its rootfs snapshot) plus its
//! task (the running process). stdout and stderr go to a file through the shim (`file://`),
//! so a container never blocks on an agent that is down. Images are imported from the
//! client side (`images`), since containerd 1.6 has no transfer service.
//!
//! Nothing outside this module sees containerd's or protobuf's types.

mod images;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1 as c;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::tonic;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::{ContainerConfig, ContainerInfo, ContainerState, Exec, ExecRequest, ImageInfo, Runtime, RuntimeError};

/// The containerd namespace every Keel object lives in.
pub const NAMESPACE: &str = "keel";
const RUNC: &str = "io.containerd.runc.v2";
const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
const PROCESS_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// Labels of Keel's own on a containerd container.
const LABEL_LOG: &str = "io.keel.log-path";
const LABEL_STARTED: &str = "io.keel.started-at";
const LABEL_CGROUP: &str = "io.keel.cgroup";
/// Containers carry their specs: lists can be larger than tonic's 4 MiB default.
const MAX_MESSAGE: usize = 64 << 20;

/// Adds the namespace header to every call.
#[derive(Clone)]
struct Namespace(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Namespace {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        r.metadata_mut().insert("containerd-namespace", self.0.clone());
        Ok(r)
    }
}

type Ch = InterceptedService<Channel, Namespace>;

/// What unpacking an image left: its description and the snapshot its containers start from.
#[derive(Clone)]
struct Unpacked {
    info: ImageInfo,
    /// The chain ID of its top layer (the parent of a container's rootfs).
    top: String,
}

pub struct Containerd {
    channel: Channel,
    /// Where the FIFOs of execs are made.
    fifo_dir: PathBuf,
    /// The keel binary that writes container logs (`keel log-driver`), and its rotation;
    /// without one, the shim writes output to the log file as it comes.
    log_driver: Option<(PathBuf, u64, u32)>,
    namespace: Namespace,
    snapshotter: String,
    /// runc's state directory (beside the socket: a managed containerd keeps it with its
    /// own state; the system's gets runc's default, /run/containerd/runc).
    runc_root: PathBuf,
    /// Images looked up so far, by name (their content never changes for a digest).
    images: Mutex<HashMap<String, Unpacked>>,
}

fn rpc(what: impl std::fmt::Display) -> impl Fn(Status) -> RuntimeError {
    let what = what.to_string();
    move |s: Status| match s.code() {
        Code::NotFound => RuntimeError::NotFound { what: what.clone() },
        Code::AlreadyExists => RuntimeError::AlreadyExists { what: what.clone() },
        Code::Unavailable => RuntimeError::Unavailable(format!("{what}: {}", s.message())),
        Code::InvalidArgument | Code::FailedPrecondition => RuntimeError::Invalid(format!("{what}: {}", s.message())),
        _ => RuntimeError::Failed(format!("{what}: {}", s.message())),
    }
}

fn system_time(ts: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    let ts = ts.as_ref()?;
    // containerd sends the zero time (year 1) for "not yet".
    if ts.seconds <= 0 {
        return None;
    }
    Some(UNIX_EPOCH + Duration::new(ts.seconds as u64, ts.nanos.max(0) as u32))
}

/// The runc shim's options (`containerd.runc.v1.Options`); only the root is set.
#[derive(Clone, PartialEq, prost::Message)]
struct RuncOptions {
    #[prost(string, tag = "7")]
    root: String,
}

fn runc_options(root: &Path) -> prost_types::Any {
    use prost::Message;
    let value = RuncOptions { root: root.display().to_string() }.encode_to_vec();
    prost_types::Any { type_url: "containerd.runc.v1.Options".into(), value }
}

fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

impl Containerd {
    /// Connects to the containerd at `socket`, retrying for up to `wait` while it starts.
    pub async fn connect(socket: &Path, wait: Duration) -> Result<Containerd, RuntimeError> {
        let deadline = tokio::time::Instant::now() + wait;
        let channel = loop {
            match containerd_client::connect(socket).await {
                Ok(ch) => break ch,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(socket = %socket.display(), error = %e, "containerd not up yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(RuntimeError::Unavailable(format!("containerd at {}: {e}", socket.display())));
                }
            }
        };
        let ns = NAMESPACE.parse().map_err(|_| RuntimeError::Invalid("namespace".into()))?;
        Ok(Containerd {
            fifo_dir: socket.parent().unwrap_or(Path::new("/run")).join("keel-fifo"),
            runc_root: socket.parent().unwrap_or(Path::new("/run/containerd")).join("runc"),
            log_driver: None,
            channel,
            namespace: Namespace(ns),
            snapshotter: "overlayfs".into(),
            images: Mutex::new(HashMap::new()),
        })
    }

    /// Container output goes through `exe log-driver`: CRI log lines, rotated at `max_size`
    /// bytes, `max_files` files kept.
    pub fn with_log_driver(mut self, exe: PathBuf, max_size: u64, max_files: u32) -> Containerd {
        self.log_driver = Some((exe, max_size, max_files));
        self
    }

    /// The container record `id` (its spec, labels, snapshot key).
    async fn container_record(&self, id: &str) -> Result<c::Container, RuntimeError> {
        Ok(self
            .containers_api()
            .get(c::GetContainerRequest { id: id.to_string() })
            .await
            .map_err(rpc(format!("container {id}")))?
            .into_inner()
            .container
            .unwrap_or_default())
    }

    fn ch(&self) -> Ch {
        InterceptedService::new(self.channel.clone(), self.namespace.clone())
    }

    fn containers_api(&self) -> c::containers_client::ContainersClient<Ch> {
        c::containers_client::ContainersClient::new(self.ch()).max_decoding_message_size(MAX_MESSAGE)
    }

    fn tasks_api(&self) -> c::tasks_client::TasksClient<Ch> {
        c::tasks_client::TasksClient::new(self.ch())
    }

    fn snapshots_api(&self) -> SnapshotsClient<Ch> {
        SnapshotsClient::new(self.ch())
    }

    /// A lease that keeps what is written under it from garbage collection for an hour, or
    /// until it is deleted.
    async fn lease(&self) -> Result<String, RuntimeError> {
        let id = format!("keel-{}", uuid::Uuid::new_v4().simple());
        let expire = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600)).to_string();
        let req = c::CreateRequest { id: id.clone(), labels: [("containerd.io/gc.expire".to_string(), expire)].into() };
        c::leases_client::LeasesClient::new(self.ch()).create(req).await.map_err(rpc("lease"))?;
        Ok(id)
    }

    async fn drop_lease(&self, id: &str) {
        let req = c::DeleteRequest { id: id.to_string(), sync: false };
        if let Err(e) = c::leases_client::LeasesClient::new(self.ch()).delete(req).await {
            tracing::debug!(lease = id, error = %e, "lease not deleted; it expires by itself");
        }
    }

    /// The process of container `id`, if it has a task.
    async fn task(&self, id: &str) -> Result<Option<containerd_client::types::v1::Process>, RuntimeError> {
        let req = c::GetRequest { container_id: id.to_string(), exec_id: String::new() };
        match self.tasks_api().get(req).await {
            Ok(r) => Ok(r.into_inner().process),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(rpc(format!("task {id}"))(s)),
        }
    }

    async fn set_label(&self, id: &str, key: &str, value: &str) -> Result<(), RuntimeError> {
        let container = c::Container {
            id: id.to_string(),
            labels: [(key.to_string(), value.to_string())].into(),
            ..Default::default()
        };
        let mask = prost_types::FieldMask { paths: vec![format!("labels.{key}")] };
        let req = c::UpdateContainerRequest { container: Some(container), update_mask: Some(mask) };
        self.containers_api().update(req).await.map_err(rpc(format!("container {id}")))?;
        Ok(())
    }

    fn state_of(
        labels: &HashMap<String, String>,
        task: Option<&containerd_client::types::v1::Process>,
    ) -> ContainerState {
        use containerd_client::types::v1::Status as S;
        let started_at = labels
            .get(LABEL_STARTED)
            .and_then(|s| s.parse::<u64>().ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        match task {
            None => ContainerState::Created,
            Some(p) => match S::try_from(p.status).unwrap_or(S::Unknown) {
                S::Running | S::Paused | S::Pausing => ContainerState::Running { pid: p.pid, started_at },
                S::Stopped => ContainerState::Exited {
                    code: p.exit_status as i32,
                    started_at,
                    finished_at: system_time(&p.exited_at),
                    // The kernel's count of OOM kills in the container's cgroup, which stays
                    // until the task is deleted.
                    oom: p.exit_status == 137 && labels.get(LABEL_CGROUP).is_some_and(|cg| oom_killed(cg)),
                },
                S::Created | S::Unknown => ContainerState::Created,
            },
        }
    }

    /// Kills the task of `id` and waits (at most `grace`) for it to stop.
    async fn kill_and_wait(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let kill = c::KillRequest { container_id: id.to_string(), exec_id: String::new(), signal: 9, all: true };
        match self.tasks_api().kill(kill).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => return Ok(()),
            Err(s) => tracing::debug!(container = id, error = %s, "kill"),
        }
        let wait = c::WaitRequest { container_id: id.to_string(), exec_id: String::new() };
        match tokio::time::timeout(grace, self.tasks_api().wait(wait)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) if s.code() == Code::NotFound => Ok(()),
            Ok(Err(s)) => Err(rpc(format!("wait for {id}"))(s)),
            Err(_) => Err(RuntimeError::Failed(format!("container {id} did not stop within {grace:?} of SIGKILL"))),
        }
    }
}

/// Whether the kernel OOM-killed a process of the cgroup at `path` (v1 or v2).
fn oom_killed(path: &str) -> bool {
    let rel = path.trim_start_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    let (file, at) = if root.join("cgroup.controllers").exists() {
        (root.join(rel).join("memory.events"), "oom_kill ")
    } else {
        (root.join("memory").join(rel).join("memory.oom_control"), "oom_kill ")
    };
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(at))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

#[tonic::async_trait]
impl Runtime for Containerd {
    async fn version(&self) -> Result<String, RuntimeError> {
        let v = c::version_client::VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map_err(|s| RuntimeError::Unavailable(s.message().to_string()))?
            .into_inner();
        Ok(format!("containerd://{}", v.version))
    }

    async fn import(&self, archive: &Path) -> Result<Vec<ImageInfo>, RuntimeError> {
        self.import_archive(archive).await
    }

    async fn pull(&self, name: &str, sources: &[super::PullSource]) -> Result<ImageInfo, RuntimeError> {
        self.pull_image(&super::normalize_image(name), sources).await
    }

    async fn image(&self, name: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        Ok(self.resolve(name).await?.map(|u| u.info))
    }

    async fn images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        let list = c::images_client::ImagesClient::new(self.ch())
            .list(c::ListImagesRequest { filters: vec![] })
            .await
            .map_err(rpc("images"))?
            .into_inner();
        let mut out = Vec::new();
        for i in list.images {
            if let Some(u) = self.resolve(&i.name).await? {
                out.push(u.info);
            }
        }
        Ok(out)
    }

    async fn create(&self, config: ContainerConfig) -> Result<(), RuntimeError> {
        let id = config.id.clone();
        let image = self
            .resolve(&config.image)
            .await?
            .ok_or_else(|| RuntimeError::NotFound { what: format!("image {}", config.image) })?;
        let spec = serde_json::to_vec(&config.spec)
            .map_err(|e| RuntimeError::Invalid(format!("the runtime spec of {id} does not encode: {e}")))?;
        if let Some(dir) = config.log_path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|source| RuntimeError::Io { what: format!("create {}", dir.display()), source })?;
        }
        let lease = self.lease().await?;
        let result = async {
            let mut prep = Request::new(PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: id.clone(),
                parent: image.top.clone(),
                labels: HashMap::new(),
            });
            prep.metadata_mut()
                .insert("containerd-lease", lease.parse().map_err(|_| RuntimeError::Invalid("lease".into()))?);
            match self.snapshots_api().prepare(prep).await {
                Ok(_) => {}
                // Left by an attempt that did not finish: reuse it.
                Err(s) if s.code() == Code::AlreadyExists => {}
                Err(s) => return Err(rpc(format!("rootfs of {id}"))(s)),
            }
            let mut labels = config.labels.clone();
            labels.insert(LABEL_LOG.into(), config.log_path.display().to_string());
            if let Some(cg) = config.spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) {
                labels.insert(LABEL_CGROUP.into(), cg.display().to_string());
            }
            let container = c::Container {
                id: id.clone(),
                labels,
                image: image.info.name.clone(),
                runtime: Some(c::container::Runtime { name: RUNC.into(), options: None }),
                spec: Some(prost_types::Any { type_url: SPEC_TYPE.into(), value: spec }),
                snapshotter: self.snapshotter.clone(),
                snapshot_key: id.clone(),
                ..Default::default()
            };
            self.containers_api()
                .create(c::CreateContainerRequest { container: Some(container) })
                .await
                .map_err(rpc(format!("container {id}")))?;
            Ok(())
        }
        .await;
        self.drop_lease(&lease).await;
        if result.is_err() {
            // Leave nothing half made: a retry starts from scratch.
            let _ = self.remove(&id).await;
        }
        result
    }

    /// Creates the container's task (runc create: the process, its namespaces and cgroup,
    /// output to its log file) and starts it. A container whose start fails stays created.
    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let container = self.container_record(id).await?;
        let req = MountsRequest { snapshotter: self.snapshotter.clone(), key: container.snapshot_key.clone() };
        let mounts =
            self.snapshots_api().mounts(req).await.map_err(rpc(format!("rootfs of {id}")))?.into_inner().mounts;
        let log = match (container.labels.get(LABEL_LOG), &self.log_driver) {
            (Some(p), Some((exe, max_size, max_files))) => {
                let config =
                    crate::agent::logs::DriverConfig { path: p.into(), max_size: *max_size, max_files: *max_files };
                crate::agent::logs::driver_uri(exe, &config)
            }
            (Some(p), None) => file_uri(Path::new(p)),
            (None, _) => String::new(),
        };
        let task = c::CreateTaskRequest {
            container_id: id.to_string(),
            rootfs: mounts,
            stdout: log.clone(),
            stderr: log,
            options: Some(runc_options(&self.runc_root)),
            ..Default::default()
        };
        match self.tasks_api().create(task.clone()).await {
            Ok(_) => {}
            // A task of an earlier container of this name outlived its container (the
            // runtime stopped in between): end it, then create ours.
            Err(s) if s.code() == Code::AlreadyExists => {
                tracing::info!(container = id, "a stale task of this name is removed");
                self.kill_and_wait(id, Duration::from_secs(10)).await?;
                let _ = self.tasks_api().delete(c::DeleteTaskRequest { container_id: id.to_string() }).await;
                self.tasks_api().create(task).await.map_err(rpc(format!("start {id}")))?;
            }
            Err(s) => return Err(rpc(format!("start {id}"))(s)),
        }
        let req = c::StartRequest { container_id: id.to_string(), exec_id: String::new() };
        if let Err(s) = self.tasks_api().start(req).await {
            let _ = self.tasks_api().delete(c::DeleteTaskRequest { container_id: id.to_string() }).await;
            return Err(rpc(format!("start {id}"))(s));
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        self.set_label(id, LABEL_STARTED, &now.to_string()).await
    }

    async fn signal(&self, id: &str, signal: i32) -> Result<(), RuntimeError> {
        let req =
            c::KillRequest { container_id: id.to_string(), exec_id: String::new(), signal: signal as u32, all: false };
        match self.tasks_api().kill(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            // An exited process: nothing to signal.
            Err(s) if s.message().contains("process already finished") => Ok(()),
            Err(s) => Err(rpc(format!("signal {id}"))(s)),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(p) = self.task(id).await? {
            use containerd_client::types::v1::Status as S;
            if S::try_from(p.status).unwrap_or(S::Unknown) != S::Stopped {
                self.kill_and_wait(id, Duration::from_secs(10)).await?;
            }
            match self.tasks_api().delete(c::DeleteTaskRequest { container_id: id.to_string() }).await {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(rpc(format!("task of {id}"))(s)),
            }
        }
        match self.containers_api().delete(c::DeleteContainerRequest { id: id.to_string() }).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(rpc(format!("container {id}"))(s)),
        }
        let req = RemoveSnapshotRequest { snapshotter: self.snapshotter.clone(), key: id.to_string() };
        match self.snapshots_api().remove(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(rpc(format!("rootfs of {id}"))(s)),
        }
    }

    async fn containers(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let list = self
            .containers_api()
            .list(c::ListContainersRequest { filters: vec![] })
            .await
            .map_err(rpc("containers"))?
            .into_inner();
        let tasks = self.tasks_api().list(c::ListTasksRequest::default()).await.map_err(rpc("tasks"))?.into_inner();
        // containerd 1.6 names a listed task by `id` (the container's) and leaves
        // `container_id` empty.
        let by_id: HashMap<&str, &containerd_client::types::v1::Process> = tasks
            .tasks
            .iter()
            .map(|t| (if t.container_id.is_empty() { t.id.as_str() } else { t.container_id.as_str() }, t))
            .collect();
        Ok(list
            .containers
            .into_iter()
            .map(|ct| {
                let state = Self::state_of(&ct.labels, by_id.get(ct.id.as_str()).copied());
                let log_path = ct.labels.get(LABEL_LOG).map(PathBuf::from);
                ContainerInfo { id: ct.id, image: ct.image, labels: ct.labels, state, log_path }
            })
            .collect())
    }

    async fn exec(&self, id: &str, req: ExecRequest) -> Result<Exec, RuntimeError> {
        use tokio::net::unix::pipe;
        let container = self.container_record(id).await?;
        let spec: oci_spec::runtime::Spec = serde_json::from_slice(&container.spec.unwrap_or_default().value)
            .map_err(|e| RuntimeError::Invalid(format!("the spec of {id}: {e}")))?;
        let mut process = spec.process().clone().unwrap_or_default();
        process.set_args(Some(req.cmd.clone()));
        process.set_terminal(Some(req.tty));
        if let (true, Some((width, height))) = (req.tty, req.size) {
            let size = oci_spec::runtime::BoxBuilder::default()
                .width(u64::from(width))
                .height(u64::from(height))
                .build()
                .map_err(|e| RuntimeError::Invalid(format!("console size: {e}")))?;
            process.set_console_size(Some(size));
        }
        let process = serde_json::to_vec(&process).map_err(|e| RuntimeError::Invalid(format!("exec process: {e}")))?;
        let exec_id = format!("exec-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = self.fifo_dir.join(format!("{id}-{exec_id}"));
        let io = |what: &str| {
            let what = format!("{what} {}", dir.display());
            move |source: std::io::Error| RuntimeError::Io { what: what.clone(), source }
        };
        std::fs::create_dir_all(&dir).map_err(io("create"))?;
        let fifo = |name: &str| -> Result<PathBuf, RuntimeError> {
            let p = dir.join(name);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|e| RuntimeError::Io { what: format!("mkfifo {}", p.display()), source: e.into() })?;
            Ok(p)
        };
        let result = async {
            // The read ends open before the shim opens the write ends (it blocks until then).
            let out_path = fifo("stdout")?;
            let stdout = pipe::OpenOptions::new().open_receiver(&out_path).map_err(io("open stdout in"))?;
            let (err_path, stderr) = if req.tty {
                (None, None)
            } else {
                let p = fifo("stderr")?;
                let r = pipe::OpenOptions::new().open_receiver(&p).map_err(io("open stderr in"))?;
                (Some(p), Some(r))
            };
            let (in_path, stdin) = if req.stdin {
                let p = fifo("stdin")?;
                // Read-write, so that the open does not wait for (or fail without) the reader.
                let w = pipe::OpenOptions::new().read_write(true).open_sender(&p).map_err(io("open stdin in"))?;
                (Some(p), Some(w))
            } else {
                (None, None)
            };
            let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            let exec = c::ExecProcessRequest {
                container_id: id.to_string(),
                exec_id: exec_id.clone(),
                stdin: path(&in_path),
                stdout: out_path.display().to_string(),
                stderr: path(&err_path),
                terminal: req.tty,
                spec: Some(prost_types::Any { type_url: PROCESS_TYPE.into(), value: process }),
            };
            self.tasks_api().exec(exec).await.map_err(rpc(format!("exec in {id}")))?;
            let start = c::StartRequest { container_id: id.to_string(), exec_id: exec_id.clone() };
            if let Err(s) = self.tasks_api().start(start).await {
                let del = c::DeleteProcessRequest { container_id: id.to_string(), exec_id: exec_id.clone() };
                let _ = self.tasks_api().delete_process(del).await;
                return Err(rpc(format!("exec {:?} in {id}", req.cmd.join(" ")))(s));
            }
            Ok((stdout, stderr, stdin))
        }
        .await;
        let (stdout, stderr, stdin) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // The exit: wait, then free the process and the FIFOs, whoever waits for it.
        let tasks = self.tasks_api();
        let (cid, eid) = (id.to_string(), exec_id.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut tasks = tasks;
            let wait = c::WaitRequest { container_id: cid.clone(), exec_id: eid.clone() };
            let code = tasks
                .wait(wait)
                .await
                .map(|r| r.into_inner().exit_status as i32)
                .map_err(rpc(format!("exec {eid} in {cid}")));
            let del = c::DeleteProcessRequest { container_id: cid, exec_id: eid };
            let _ = tasks.delete_process(del).await;
            let _ = std::fs::remove_dir_all(&dir);
            let _ = tx.send(code);
        });
        let exit =
            Box::pin(async move { rx.await.map_err(|_| RuntimeError::Failed("the exec's waiter ended".into()))? });
        Ok(Exec {
            id: exec_id,
            stdin: stdin.map(|w| Box::new(w) as super::Writer),
            stdout: Box::new(stdout),
            stderr: stderr.map(|r| Box::new(r) as super::Reader),
            exit,
        })
    }

    async fn kill_exec(&self, id: &str, exec_id: &str) -> Result<(), RuntimeError> {
        let req = c::KillRequest { container_id: id.to_string(), exec_id: exec_id.to_string(), signal: 9, all: false };
        match self.tasks_api().kill(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound || s.message().contains("process already finished") => Ok(()),
            Err(s) => Err(rpc(format!("kill exec {exec_id} in {id}"))(s)),
        }
    }

    async fn resize(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<(), RuntimeError> {
        let req = c::ResizePtyRequest { container_id: id.to_string(), exec_id: exec_id.to_string(), width, height };
        self.tasks_api().resize_pty(req).await.map_err(rpc(format!("resize exec {exec_id} in {id}")))?;
        Ok(())
    }

    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), RuntimeError> {
        // The shim holds the stdin FIFO open for reading and writing, so that closing the
        // caller's end is not an end of input by itself; CloseIO is.
        let req = c::CloseIoRequest { container_id: id.to_string(), exec_id: exec_id.to_string(), stdin: true };
        match self.tasks_api().close_io(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound || s.message().contains("process already finished") => Ok(()),
            Err(s) => Err(rpc(format!("close the input of exec {exec_id} in {id}"))(s)),
        }
    }
}
