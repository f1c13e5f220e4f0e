//! A containerd the agent runs itself, as k3s does: its own configuration, socket, root and
//! state under the agent's data directory, restarted if it dies, and stopped (SIGTERM) when
//! the agent stops. Running containers survive both, through their shims.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::RuntimeError;

/// Where a managed containerd keeps its files.
#[derive(Debug, Clone)]
pub struct ManagedPaths {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl ManagedPaths {
    /// The files of a containerd under `data_dir` (the socket under `run_dir`, since a unix
    /// socket path is at most 108 bytes and runtime state belongs in /run).
    pub fn new(data_dir: &Path, run_dir: &Path) -> ManagedPaths {
        ManagedPaths {
            config: data_dir.join("containerd").join("config.toml"),
            socket: run_dir.join("containerd.sock"),
            root: data_dir.join("containerd").join("root"),
            state: run_dir.join("containerd"),
            log: data_dir.join("containerd").join("containerd.log"),
        }
    }

    /// containerd's configuration: its own paths, the CRI plugin off (it would manage CNI and
    /// images of its own), and a bounded wait for its database lock.
    pub fn config_text(&self) -> String {
        format!(
            r#"# Written by keel agent; changes are overwritten at its next start.
version = 2
root = "{root}"
state = "{state}"
oom_score = -999
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = ""

[timeouts]
  "io.containerd.timeout.bolt.open" = "10s"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
"#,
            root = self.root.display(),
            state = self.state.display(),
            socket = self.socket.display(),
        )
    }
}

/// A running managed containerd; dropping it stops it.
pub struct Managed {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub paths: ManagedPaths,
}

fn spawn(paths: &ManagedPaths) -> Result<Child, RuntimeError> {
    let io = |what: &str, source| RuntimeError::Io { what: format!("{what} {}", paths.log.display()), source };
    let log = std::fs::File::options().create(true).append(true).open(&paths.log).map_err(|e| io("open", e))?;
    let err = log.try_clone().map_err(|e| io("open", e))?;
    let mut cmd = Command::new("containerd");
    cmd.arg("--config").arg(&paths.config).stdin(Stdio::null()).stdout(log).stderr(err);
    // Its own process group: a Ctrl-C meant for the agent is not containerd's.
    cmd.process_group(0);
    // Never left behind by a test whose runtime ends without stopping it.
    cmd.kill_on_drop(true);
    cmd.spawn().map_err(|source| RuntimeError::Io { what: "start containerd (is it installed?)".into(), source })
}

impl Managed {
    /// Writes the configuration and starts containerd; it is restarted whenever it exits
    /// until the returned value is dropped or stopped.
    pub fn start(paths: ManagedPaths) -> Result<Managed, RuntimeError> {
        for dir in [paths.config.parent(), paths.socket.parent(), Some(paths.root.as_path())].into_iter().flatten() {
            std::fs::create_dir_all(dir)
                .map_err(|source| RuntimeError::Io { what: format!("create {}", dir.display()), source })?;
        }
        std::fs::write(&paths.config, paths.config_text())
            .map_err(|source| RuntimeError::Io { what: format!("write {}", paths.config.display()), source })?;
        let mut child = spawn(&paths)?;
        let (stop, mut stopped) = watch::channel(false);
        let p = paths.clone();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                tokio::select! {
                    status = child.wait() => {
                        tracing::warn!(?status, log = %p.log.display(), "managed containerd exited; restarting it");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        match spawn(&p) {
                            Ok(c) => child = c,
                            Err(e) => {
                                tracing::error!(error = %e, "managed containerd does not start");
                                continue;
                            }
                        }
                    }
                    _ = stopped.changed() => {
                        if let Some(pid) = child.id() {
                            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
                        }
                        if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                            let _ = child.kill().await;
                        }
                        return;
                    }
                }
            }
        });
        Ok(Managed { stop, task: Some(task), paths })
    }

    /// Stops containerd (SIGTERM; running containers go on under their shims).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
