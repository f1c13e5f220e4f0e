//! A runtime that runs nothing: containers are records that move through their states when
//! asked. Hollow nodes (`keel agent --runtime fake`) use it to stand in for thousands of
//! nodes in scale tests of the scheduler and the controllers; no test of the real path does.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use super::{
    normalize_image, ContainerConfig, ContainerInfo, ContainerState, ImageConfig, ImageInfo, Runtime, RuntimeError,
};

#[derive(Default)]
pub struct FakeRuntime {
    images: Mutex<HashMap<String, ImageInfo>>,
    containers: Mutex<HashMap<String, ContainerInfo>>,
}

impl FakeRuntime {
    /// A fake runtime on which every image is present.
    pub fn new() -> FakeRuntime {
        FakeRuntime::default()
    }

    /// Makes the container `id` exit with `code` (a test's crash).
    pub fn exit(&self, id: &str, code: i32) {
        let mut cs = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cs.get_mut(id) {
            let started_at = match c.state {
                ContainerState::Running { started_at, .. } => started_at,
                _ => None,
            };
            c.state = ContainerState::Exited { code, started_at, finished_at: Some(SystemTime::now()), oom: false };
        }
    }
}

#[tonic::async_trait]
impl Runtime for FakeRuntime {
    async fn version(&self) -> Result<String, RuntimeError> {
        Ok("fake://1".into())
    }

    async fn import(&self, archive: &Path) -> Result<Vec<ImageInfo>, RuntimeError> {
        Err(RuntimeError::Invalid(format!("{}: the fake runtime imports nothing", archive.display())))
    }

    async fn pull(&self, name: &str, _sources: &[super::PullSource]) -> Result<ImageInfo, RuntimeError> {
        // A hollow node has every image; a pull only records it.
        self.image(name).await?.ok_or_else(|| RuntimeError::NotFound { what: name.to_string() })
    }

    async fn image(&self, name: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        let name = normalize_image(name);
        let mut images = self.images.lock().unwrap_or_else(|p| p.into_inner());
        let info = images.entry(name.clone()).or_insert_with(|| ImageInfo {
            id: format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(name.as_bytes()))),
            name,
            size: 0,
            config: ImageConfig { cmd: vec!["sh".into()], ..Default::default() },
        });
        Ok(Some(info.clone()))
    }

    async fn images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        Ok(self.images.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect())
    }

    async fn create(&self, config: ContainerConfig) -> Result<(), RuntimeError> {
        let mut cs = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        if cs.contains_key(&config.id) {
            return Err(RuntimeError::AlreadyExists { what: format!("container {}", config.id) });
        }
        let info = ContainerInfo {
            id: config.id.clone(),
            image: normalize_image(&config.image),
            labels: config.labels,
            state: ContainerState::Created,
            log_path: Some(config.log_path),
        };
        cs.insert(config.id, info);
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let mut cs = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        let c = cs.get_mut(id).ok_or_else(|| RuntimeError::NotFound { what: format!("container {id}") })?;
        c.state = ContainerState::Running { pid: 1, started_at: Some(SystemTime::now()) };
        Ok(())
    }

    async fn signal(&self, id: &str, signal: i32) -> Result<(), RuntimeError> {
        if matches!(signal, 9 | 15) {
            self.exit(id, 128 + signal);
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        Ok(())
    }

    async fn containers(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        Ok(self.containers.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect())
    }

    /// A hollow node's containers do nothing: every command succeeds at once, silently.
    async fn exec(&self, id: &str, _req: super::ExecRequest) -> Result<super::Exec, RuntimeError> {
        let running = self
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|c| matches!(c.state, ContainerState::Running { .. }));
        if !running {
            return Err(RuntimeError::Invalid(format!("container {id} is not running")));
        }
        Ok(super::Exec {
            id: "fake".into(),
            stdin: None,
            stdout: Box::new(tokio::io::empty()),
            stderr: Some(Box::new(tokio::io::empty())),
            exit: Box::pin(async { Ok(0) }),
        })
    }

    async fn kill_exec(&self, _id: &str, _exec_id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn resize(&self, _id: &str, _exec_id: &str, _width: u32, _height: u32) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn close_stdin(&self, _id: &str, _exec_id: &str) -> Result<(), RuntimeError> {
        Ok(())
    }
}
