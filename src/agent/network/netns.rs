//! Named network namespaces, pinned by a bind mount at `/run/netns/<name>` as `ip netns add`
//! does, so that they outlive every process in them and every container of a pod joins the
//! same one by its path.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where named network namespaces live.
pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
#[error("network namespace {path}: {why}")]
pub struct NetnsError {
    pub path: String,
    pub why: String,
}

fn err(path: &Path, why: impl std::fmt::Display) -> NetnsError {
    NetnsError { path: path.display().to_string(), why: why.to_string() }
}

pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Makes /run/netns a shared mount point, so a pin made here is seen (and freed) everywhere.
fn prepare_dir() -> Result<(), NetnsError> {
    let dir = Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let shared = || mount(None::<&str>, dir, None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>);
    if shared().is_err() {
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .map_err(|e| err(dir, e))?;
        shared().map_err(|e| err(dir, e))?;
    }
    Ok(())
}

/// Creates the named network namespace `name` (nothing if it exists already); its path.
pub fn create(name: &str) -> Result<PathBuf, NetnsError> {
    let path = path_of(name);
    if is_netns(&path) {
        return Ok(path);
    }
    prepare_dir()?;
    std::fs::File::options().write(true).create(true).truncate(false).open(&path).map_err(|e| err(&path, e))?;
    // unshare() moves the calling thread: do it on a thread of its own that then ends, never on
    // a runtime's worker, which would stay in the new namespace.
    let p = path.clone();
    let made = std::thread::spawn(move || -> Result<(), NetnsError> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| err(&p, format!("unshare: {e}")))?;
        let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
        mount(Some(own.as_str()), &p, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| err(&p, format!("pin: {e}")))
    })
    .join()
    .map_err(|_| err(&path, "the thread that made it panicked"))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Whether `path` is a pinned network namespace.
pub fn is_netns(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Unpins and removes the named namespace (nothing if it does not exist).
pub fn delete(name: &str) -> Result<(), NetnsError> {
    let path = path_of(name);
    if !path.exists() {
        return Ok(());
    }
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(err(&path, format!("unmount: {e}"))),
    }
    std::fs::remove_file(&path).map_err(|e| err(&path, e))
}

/// Names of the pinned namespaces that start with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(prefix)).collect()
}

/// Runs `f` with the calling thread inside the namespace at `path`, on a thread of its own.
pub fn run_in<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
    let file = std::fs::File::open(path).map_err(|e| err(path, e))?;
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| err(&p, format!("setns: {e}")))?;
        Ok(f())
    })
    .join()
    .map_err(|_| err(path, "the thread panicked"))?
}
