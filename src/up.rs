//! `keel up` and `keel down`: a whole cluster on one machine, with its defaults.
//!
//! `up` starts a replica (`keel server --cluster-init`) and an agent (`keel agent`, with a
//! managed containerd and the images of its images directory) as background processes of
//! their own, each logging to a file beside its data, waits until the node is Ready with its
//! podCIDR, writes the admin's configuration where keelctl finds it, and prints how to use
//! the cluster. Run again, it reports the running cluster, or restarts what stopped.
//!
//! `down` stops both and removes what they made on the machine: containers, pod namespaces,
//! network attachments, the bridge and the routes, pod cgroups; with `purge`, the data too.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::agent::AgentConfig;
use crate::api::kinds::Kind;
use crate::client::config::Config;
use crate::client::{Client, ClientConfig};
use crate::proto::v1 as pb;

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    #[error(transparent)]
    Config(#[from] crate::client::config::ConfigError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
}

#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The keel binary to run the server and the agent with.
    pub exe: PathBuf,
    /// The replica's and the node's name.
    pub name: String,
    /// The replica's data (`keel server --data-dir`).
    pub data_dir: PathBuf,
    /// The agent's data (`keel agent --data-dir`).
    pub agent_dir: PathBuf,
    /// Process ids and the managed containerd's runtime state.
    pub run_dir: PathBuf,
    /// The replica's address.
    pub listen: String,
    /// Image tarballs the agent imports.
    pub images_dir: PathBuf,
    /// The agent's registries configuration (mirrors, credentials, offline).
    pub registries: Option<PathBuf>,
    /// Where keelctl looks for its configuration (`$KEELCONFIG`, else `~/.keel/config`).
    pub config_path: PathBuf,
    /// How long `up` waits for the node to be Ready.
    pub timeout: Duration,
}

impl UpOptions {
    /// The defaults for node `name`: data in /var/lib/keel and /var/lib/keel-agent, runtime
    /// state in /run/keel, the replica on 127.0.0.1:7001.
    pub fn new(exe: PathBuf, name: &str) -> UpOptions {
        UpOptions {
            exe,
            name: name.to_string(),
            data_dir: PathBuf::from("/var/lib/keel"),
            agent_dir: PathBuf::from("/var/lib/keel-agent"),
            run_dir: PathBuf::from("/run/keel"),
            listen: crate::client::config::DEFAULT_SERVER.to_string(),
            images_dir: PathBuf::from("/var/lib/keel-agent/images"),
            registries: None,
            config_path: crate::client::config::path(),
            timeout: Duration::from_secs(120),
        }
    }

    fn pid_file(&self, what: &str) -> PathBuf {
        self.run_dir.join(format!("{what}.pid"))
    }

    fn log_file(&self, what: &str) -> PathBuf {
        match what {
            "server" => self.data_dir.join("server.log"),
            _ => self.agent_dir.join("agent.log"),
        }
    }

    /// The agent's configuration, as `up` starts it (and `down` resets it).
    pub fn agent_config(&self) -> AgentConfig {
        let mut cfg = AgentConfig::new(&self.name, &self.agent_dir, vec![self.listen.clone()]);
        cfg.run_dir = self.run_dir.join("agent");
        cfg.images_dir = Some(self.images_dir.clone());
        cfg.registries = self.registries.clone();
        cfg
    }
}

/// The pid in `file` if that process is alive and is a keel.
fn running(file: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmd.split(|b| *b == 0).next().unwrap_or_default();
    let name = Path::new(std::str::from_utf8(argv0).ok()?).file_name()?.to_string_lossy().to_string();
    name.starts_with("keel").then_some(pid)
}

/// Starts `args` of the keel binary in a session of its own, output to `log`; its pid is
/// written to `pid_file`.
fn spawn(o: &UpOptions, what: &str, args: &[String]) -> Result<i32, UpError> {
    let log_path = o.log_file(what);
    if let Some(d) = log_path.parent() {
        std::fs::create_dir_all(d).map_err(|e| UpError::Setup(format!("{}: {e}", d.display())))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| UpError::Setup(format!("{}: {e}", log_path.display())))?;
    let err = log.try_clone().map_err(|e| UpError::Setup(format!("{}: {e}", log_path.display())))?;
    let mut cmd = Command::new(&o.exe);
    cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(err);
    // SAFETY: setsid(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(|e| std::io::Error::from_raw_os_error(e as i32)));
    }
    let child = cmd.spawn().map_err(|e| UpError::Setup(format!("start {} {what}: {e}", o.exe.display())))?;
    let pid = child.id() as i32;
    std::fs::create_dir_all(&o.run_dir).map_err(|e| UpError::Setup(format!("{}: {e}", o.run_dir.display())))?;
    std::fs::write(o.pid_file(what), format!("{pid}\n"))
        .map_err(|e| UpError::Setup(format!("{}: {e}", o.pid_file(what).display())))?;
    // Not waited for: it lives on after `up` returns (its parent becomes init).
    std::mem::forget(child);
    Ok(pid)
}

async fn wait_for<T, F, Fut>(what: &str, o: &UpOptions, log: &str, mut f: F) -> Result<T, UpError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + o.timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            let tail = std::fs::read_to_string(o.log_file(log)).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(UpError::Setup(format!(
                "{what}: not within {:?}; the last lines of {}:\n{}",
                o.timeout,
                o.log_file(log).display(),
                tail.join("\n")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What `up` found or started.
#[derive(Debug, Clone)]
pub struct Up {
    pub server_pid: i32,
    pub agent_pid: i32,
    pub node: String,
    pub pod_cidr: String,
    /// Whether the admin's configuration was written to `config_path`.
    pub wrote_config: bool,
}

/// Brings the cluster up (or finds it up) and returns once its node is Ready.
pub async fn up(o: &UpOptions) -> Result<Up, UpError> {
    let server_pid = match running(&o.pid_file("server")) {
        Some(pid) => pid,
        None => {
            let args = [
                "server",
                "--cluster-init",
                "--name",
                &o.name,
                "--data-dir",
                &o.data_dir.display().to_string(),
                "--listen",
                &o.listen,
            ];
            spawn(o, "server", &args.map(String::from))?
        }
    };
    let admin_path = o.data_dir.join("admin.yaml");
    let token_path = o.data_dir.join("agent-token");
    wait_for("the replica's admin configuration", o, "server", || async {
        (admin_path.exists() && token_path.exists()).then_some(())
    })
    .await?;
    let config = Config::load(&admin_path)?;
    let ctx = config
        .selected(None)?
        .cloned()
        .ok_or_else(|| UpError::Setup(format!("{}: no context", admin_path.display())))?;
    let client = Client::new(&ctx.servers, ctx.auth()?, ClientConfig::default())?;
    wait_for("the replica to serve", o, "server", || async {
        client.get_opt(Kind::Namespace, "", "default").await.ok().flatten().map(|_| ())
    })
    .await?;
    let agent_pid = match running(&o.pid_file("agent")) {
        Some(pid) => pid,
        None => {
            let token = std::fs::read_to_string(&token_path)
                .map_err(|e| UpError::Setup(format!("{}: {e}", token_path.display())))?;
            let cfg = o.agent_config();
            let mut args = vec![
                "agent".to_string(),
                "--name".into(),
                o.name.clone(),
                "--server".into(),
                o.listen.clone(),
                "--token".into(),
                token.trim().to_string(),
                "--data-dir".into(),
                cfg.data_dir.display().to_string(),
                "--run-dir".into(),
                cfg.run_dir.display().to_string(),
                "--images-dir".into(),
                o.images_dir.display().to_string(),
            ];
            if let Some(r) = &o.registries {
                args.extend(["--registries".into(), r.display().to_string()]);
            }
            spawn(o, "agent", &args)?
        }
    };
    let name = o.name.clone();
    let pod_cidr = wait_for(&format!("node {name} to be Ready"), o, "agent", || async {
        let node = client.get_opt(Kind::Node, "", &name).await.ok().flatten()?;
        let Some(pb::object::Kind::Node(n)) = node.kind else { return None };
        let ready = n.status.as_ref()?.conditions.iter().any(|c| c.r#type == "Ready" && c.status == "True");
        let cidr = n.spec.map(|s| s.pod_cidr).unwrap_or_default();
        (ready && !cidr.is_empty()).then_some(cidr)
    })
    .await?;
    // The admin's configuration where keelctl looks, unless a configuration is there.
    let wrote_config = !o.config_path.exists();
    if wrote_config {
        config.save(&o.config_path)?;
    }
    Ok(Up { server_pid, agent_pid, node: o.name.clone(), pod_cidr, wrote_config })
}

/// How to use the cluster `up` brought up.
pub fn usage(o: &UpOptions, up: &Up) -> String {
    let config = if up.wrote_config
        || Config::load(&o.config_path)
            .is_ok_and(|c| c == Config::load(&o.data_dir.join("admin.yaml")).unwrap_or_default())
    {
        String::new()
    } else {
        format!("  export KEELCONFIG={}\n", o.data_dir.join("admin.yaml").display())
    };
    format!(
        "Keel is up: a replica on {listen} and node {node} (pods in {cidr}).\n\n\
         Try it:\n{config}  \
         keelctl get nodes\n  \
         keelctl apply -f examples/web.yaml\n  \
         keelctl get pods -o wide            # then: curl http://<pod IP>/\n\n\
         Logs: {server_log} and {agent_log}\n\
         Stop: keel down   (keel down --purge also deletes the cluster's data)\n",
        listen = o.listen,
        node = up.node,
        cidr = up.pod_cidr,
        server_log = o.log_file("server").display(),
        agent_log = o.log_file("agent").display(),
    )
}

/// Sends SIGTERM to the process in `file` and waits (SIGKILL after `grace`).
async fn stop(file: &Path, grace: Duration) -> bool {
    let Some(pid) = running(file) else {
        let _ = std::fs::remove_file(file);
        return false;
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while running(file).is_some() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if running(file).is_some() {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let _ = std::fs::remove_file(file);
    true
}

/// What `down` did.
#[derive(Debug, Clone, Default)]
pub struct Down {
    pub stopped: Vec<&'static str>,
    pub reset: crate::agent::Reset,
    pub purged: Vec<PathBuf>,
}

/// Stops the agent and the replica and removes what they made on the machine; with
/// `purge`, their data and the configuration `up` wrote too.
pub async fn down(o: &UpOptions, purge: bool) -> Result<Down, UpError> {
    let mut out = Down::default();
    if stop(&o.pid_file("agent"), Duration::from_secs(15)).await {
        out.stopped.push("agent");
    }
    // The node is cleaned with the agent's own configuration, while the replica still runs
    // (nothing here needs it).
    if o.agent_dir.exists() {
        out.reset = crate::agent::reset(&o.agent_config()).await?;
    }
    if stop(&o.pid_file("server"), Duration::from_secs(15)).await {
        out.stopped.push("server");
    }
    if purge {
        let admin = Config::load(&o.data_dir.join("admin.yaml")).ok();
        if admin.is_some() && Config::load(&o.config_path).ok() == admin {
            let _ = std::fs::remove_file(&o.config_path);
            out.purged.push(o.config_path.clone());
        }
        for dir in [&o.data_dir, &o.agent_dir, &o.run_dir] {
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(|e| UpError::Setup(format!("remove {}: {e}", dir.display())))?;
                out.purged.push(dir.clone());
            }
        }
    }
    Ok(out)
}

/// `keel up`'s flags.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// The replica's and the node's name (default: the hostname).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "/var/lib/keel")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "/var/lib/keel-agent")]
    pub agent_data_dir: PathBuf,
    /// Process ids and the managed containerd's runtime state.
    #[arg(long, default_value = "/run/keel")]
    pub run_dir: PathBuf,
    #[arg(long, default_value = crate::client::config::DEFAULT_SERVER)]
    pub listen: String,
    /// Image tarballs the agent imports (default: <agent-data-dir>/images).
    #[arg(long)]
    pub images_dir: Option<PathBuf>,
    /// Where images are pulled from (mirrors, credentials, `offline: true`), in k3s's
    /// registries.yaml format (default: /etc/keel/registries.yaml when it exists).
    #[arg(long)]
    pub registries: Option<PathBuf>,
    /// How long to wait for the node to be Ready.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Stop the cluster instead (as `keel down`).
    #[arg(long)]
    pub down: bool,
    /// With --down: delete the cluster's data too.
    #[arg(long, requires = "down")]
    pub purge: bool,
}

/// `keel down`'s flags.
#[derive(clap::Args, Debug)]
pub struct DownArgs {
    /// Delete the cluster's data (and the keelctl configuration `keel up` wrote) too.
    #[arg(long)]
    pub purge: bool,
    #[command(flatten)]
    pub dirs: Dirs,
}

/// Where `keel up` put things, for `keel down`.
#[derive(clap::Args, Debug)]
pub struct Dirs {
    #[arg(long, default_value = "/var/lib/keel")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "/var/lib/keel-agent")]
    pub agent_data_dir: PathBuf,
    #[arg(long, default_value = "/run/keel")]
    pub run_dir: PathBuf,
    /// The node's name (default: the hostname).
    #[arg(long)]
    pub name: Option<String>,
}

impl UpArgs {
    fn options(&self) -> Result<UpOptions, UpError> {
        let exe = std::env::current_exe().map_err(|e| UpError::Setup(format!("this program's path: {e}")))?;
        let mut o = UpOptions::new(exe, &self.name.clone().unwrap_or_else(crate::agent::node::hostname));
        o.data_dir = self.data_dir.clone();
        o.agent_dir = self.agent_data_dir.clone();
        o.run_dir = self.run_dir.clone();
        o.listen = self.listen.clone();
        o.images_dir = self.images_dir.clone().unwrap_or_else(|| self.agent_data_dir.join("images"));
        o.registries = self.registries.clone();
        o.timeout = self.timeout;
        Ok(o)
    }
}

/// `keel up`: brings the cluster up and prints how to use it.
pub async fn run(a: UpArgs) -> Result<(), UpError> {
    let o = a.options()?;
    if a.down {
        return print_down(&o, a.purge).await;
    }
    if !o.images_dir.join("busybox.tar").exists() {
        eprintln!(
            "note: {} has no busybox.tar; build the test images with scripts/build-test-images.sh {}",
            o.images_dir.display(),
            o.images_dir.display()
        );
    }
    let up = up(&o).await?;
    print!("{}", usage(&o, &up));
    Ok(())
}

/// `keel down`.
pub async fn run_down(a: DownArgs) -> Result<(), UpError> {
    let up = UpArgs {
        name: a.dirs.name,
        data_dir: a.dirs.data_dir,
        agent_data_dir: a.dirs.agent_data_dir,
        run_dir: a.dirs.run_dir,
        listen: crate::client::config::DEFAULT_SERVER.into(),
        images_dir: None,
        registries: None,
        timeout: Duration::from_secs(120),
        down: true,
        purge: a.purge,
    };
    print_down(&up.options()?, a.purge).await
}

async fn print_down(o: &UpOptions, purge: bool) -> Result<(), UpError> {
    let d = down(o, purge).await?;
    let stopped = if d.stopped.is_empty() {
        "nothing was running".to_string()
    } else {
        format!("stopped {}", d.stopped.join(" and "))
    };
    println!(
        "Keel is down: {stopped}; removed {} containers, {} pod networks, {} pod directories, the bridge and the routes.",
        d.reset.containers, d.reset.sandboxes, d.reset.pod_dirs
    );
    for p in d.purged {
        println!("deleted {}", p.display());
    }
    Ok(())
}
