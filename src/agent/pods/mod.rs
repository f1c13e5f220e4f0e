//! Pod workers: the agent's control loop over the pods bound to its node.
//!
//! Level-triggered, like every loop in Keel: for each pod, compare the pod as the API has it
//! with what the node has (its network namespace, its containers in the runtime) and take
//! the steps that close the gap, then write the pod's status if it changed. A pod that is
//! gone from the API has its containers stopped (SIGTERM, then SIGKILL after its grace
//! period), its network detached and its files removed. A periodic sweep finds what is left
//! of pods the agent no longer knows (deleted while it was down).
//!
//! Keys are pod uids; one pod is never synced twice at once (the work queue holds a key
//! while it is worked on).

pub mod images;
pub mod probe;
pub mod refs;
pub mod spec;
pub mod status;
pub mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::api::kinds::Kind;
use crate::client::informer::{Event, Informer, InformerFactory};
use crate::client::{Client, DeleteOptions};
use crate::controllers::runtime::{reference_to, EventLimits, EventRecorder, RateLimits, WorkQueue};
use crate::proto::v1 as pb;

use super::network::{NodeNetwork, PortMapping};
use super::runtime::{
    ContainerConfig, ContainerInfo, ContainerState, Runtime, RuntimeError, LABEL_ATTEMPT, LABEL_CONTAINER,
    LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID,
};
use super::stopped;

/// How pods run on this node.
#[derive(Clone, Debug)]
pub struct PodConfig {
    pub node: String,
    pub node_ip: String,
    /// Where pods keep their files (etc files, logs).
    pub pods_dir: PathBuf,
    /// The first wait before restarting a crashed container; it doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How often running pods are looked at again (exits, status).
    pub resync: Duration,
    pub workers: usize,
    /// The resolv.conf pods get.
    pub resolv_conf: String,
    /// What `limits.*` of a container without limits give (downward API).
    pub allocatable: refs::Allocatable,
    /// How long a ConfigMap or Secret read is used before it is read again.
    pub refs_ttl: Duration,
    /// Where images are pulled from.
    pub registries: Arc<crate::agent::registries::Registries>,
}

impl PodConfig {
    pub fn new(node: &str, node_ip: &str, pods_dir: PathBuf) -> PodConfig {
        PodConfig {
            node: node.to_string(),
            node_ip: node_ip.to_string(),
            pods_dir,
            backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            resync: Duration::from_secs(1),
            workers: 8,
            resolv_conf: std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            allocatable: refs::Allocatable::of_host(),
            refs_ttl: Duration::from_secs(2),
            registries: Arc::default(),
        }
    }
}

/// Why a container is not running, as its status says (`ErrImagePull`, `CrashLoopBackOff`...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// What the worker remembers of a pod between syncs.
#[derive(Default, Clone, Debug)]
pub struct PodMemory {
    /// Per container name: why it waits.
    waiting: HashMap<String, Waiting>,
    /// Per container name: do not start it again before this time.
    not_before: HashMap<String, SystemTime>,
    start_time: Option<String>,
    ip: Option<String>,
    /// The pod's termination grace period, kept for its cleanup once it is gone.
    grace: Duration,
    /// Per container name: the digest of the image it runs.
    image_ids: HashMap<String, String>,
    /// The last FailedMount reported (an Event per new message, not per sync).
    failed_mount: Option<String>,
    /// Per container name: false while its readiness (or startup) probe has not said yes.
    ready: HashMap<String, bool>,
    started: HashMap<String, bool>,
    /// The pod ran past its activeDeadlineSeconds.
    deadline_exceeded: bool,
    /// Per container name: how many failed pulls of its image were reported.
    pull_failures: HashMap<String, u32>,
}

/// The pods of one node.
pub struct PodWorkers {
    client: Client,
    runtime: Arc<dyn Runtime>,
    network: Option<NodeNetwork>,
    config: PodConfig,
    pods: Informer,
    node: Informer,
    memory: Mutex<HashMap<String, PodMemory>>,
    /// Pods being stopped and cleaned up (each in a task of its own: a grace period does not
    /// hold a worker).
    terminating: Mutex<HashSet<String>>,
    refs: refs::Refs,
    events: EventRecorder,
    prober: Arc<probe::Prober>,
    /// Containers being killed after a failed probe.
    killing: Mutex<HashSet<String>>,
    puller: Arc<images::Puller>,
}

/// The id of a pod's container in the runtime: unique on the node, at most 76 characters.
fn container_id(uid: &str, name: &str, attempt: u32) -> String {
    let h = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(uid.as_bytes()));
    let name: String = name.chars().take(48).collect();
    format!("{}-{name}-{attempt}", &h[..12])
}

fn attempt_of(c: &ContainerInfo) -> u32 {
    c.label(LABEL_ATTEMPT).parse().unwrap_or(0)
}

/// An init container that runs beside the app containers (`restartPolicy: Always`).
/// Whether a running container counts as started: at once without a startup probe, else
/// once the probe has said so.
fn has_started(c: &pb::Container, mem: &PodMemory) -> bool {
    c.startup_probe.is_none() || mem.started.get(&c.name) == Some(&true)
}

pub fn is_sidecar(c: &pb::Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

fn is_terminal(pod: &pb::Pod) -> bool {
    pod.status.as_ref().is_some_and(|s| s.phase == "Succeeded" || s.phase == "Failed")
}

impl PodWorkers {
    pub fn new(
        client: Client,
        informers: &InformerFactory,
        runtime: Arc<dyn Runtime>,
        network: Option<NodeNetwork>,
        config: PodConfig,
    ) -> Arc<PodWorkers> {
        let pods = informers.informer_with(Kind::Pod, "", "", &format!("spec.nodeName={}", config.node));
        let node = informers.informer_with(Kind::Node, "", "", &format!("metadata.name={}", config.node));
        let refs = refs::Refs::new(client.clone(), config.refs_ttl);
        let events = EventRecorder::new(client.clone(), "kubelet", &config.node, EventLimits::default());
        Arc::new(PodWorkers {
            refs,
            events,
            prober: Arc::new(probe::Prober::default()),
            puller: Arc::new(images::Puller::new(
                runtime.clone(),
                config.registries.clone(),
                &config.node,
                config.backoff,
            )),
            killing: Mutex::new(HashSet::new()),
            client,
            runtime,
            network,
            config,
            pods,
            node,
            memory: Mutex::new(HashMap::new()),
            terminating: Mutex::new(HashSet::new()),
        })
    }

    /// An Event about `pod`, as the kubelet posts them.
    fn event(&self, pod: &pb::Pod, kind: &str, reason: &str, message: &str) {
        let obj = pb::Object { kind: Some(pb::object::Kind::Pod(pod.clone())) };
        self.events.emit(&reference_to(&obj), kind, reason, message);
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodMemory>> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pod `namespace/name` bound to this node, as the informer has it.
    pub fn pod_by_name(&self, namespace: &str, name: &str) -> Option<pb::Pod> {
        match &self.pods.get_by_name(namespace, name)?.kind {
            Some(pb::object::Kind::Pod(p)) => Some(p.clone()),
            _ => None,
        }
    }

    /// Where container `name` of pod `uid` logs its attempt `attempt`.
    pub fn log_path(&self, uid: &str, name: &str, attempt: u32) -> PathBuf {
        super::logs::log_path(&self.config.pods_dir, uid, name, attempt)
    }

    /// The pod with `uid`, as the informer has it.
    fn pod(&self, uid: &str) -> Option<pb::Pod> {
        self.pods.list().into_iter().find_map(|o| match &o.kind {
            Some(pb::object::Kind::Pod(p)) if p.metadata.as_ref().is_some_and(|m| m.uid == uid) => Some(p.clone()),
            _ => None,
        })
    }

    fn pod_cidr(&self) -> Option<String> {
        let node = self.node.get(&self.config.node)?;
        match &node.kind {
            Some(pb::object::Kind::Node(n)) => n.spec.as_ref().map(|s| s.pod_cidr.clone()).filter(|c| !c.is_empty()),
            _ => None,
        }
    }

    /// Runs the workers until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let queue = WorkQueue::new(
            "pods",
            RateLimits {
                base_delay: Duration::from_millis(100),
                max_delay: Duration::from_secs(30),
                qps: 50.0,
                burst: 200.0,
            },
        );
        {
            let q = queue.clone();
            self.pods.add_handler(Arc::new(move |e: &Event| {
                if let Some(pb::object::Kind::Pod(p)) = &e.object().kind {
                    if let Some(m) = &p.metadata {
                        q.add(&m.uid);
                    }
                }
            }));
        }
        self.pods.start();
        self.node.start();
        tokio::select! {
            _ = async { self.pods.wait_synced().await; self.node.wait_synced().await } => {}
            _ = stopped(&mut stop) => return,
        }
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..self.config.workers.max(1) {
            let (me, q) = (self.clone(), queue.clone());
            workers.spawn(async move {
                while let Some(uid) = q.get().await {
                    match me.sync(&uid).await {
                        Ok(Some(after)) => {
                            q.forget(&uid);
                            q.add_after(&uid, after);
                        }
                        Ok(None) => q.forget(&uid),
                        Err(e) => {
                            tracing::debug!(pod = uid, error = %e, "pod sync failed; retrying");
                            q.add_rate_limited(&uid);
                        }
                    }
                    q.done(&uid);
                }
            });
        }
        // The sweep: every pod the informer knows, and every sandbox or container the node has.
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = sweep.tick() => {
                    let mut uids: HashSet<String> = self.pods.list().iter().filter_map(|o| match &o.kind {
                        Some(pb::object::Kind::Pod(p)) => p.metadata.as_ref().map(|m| m.uid.clone()),
                        _ => None,
                    }).collect();
                    if let Ok(cs) = self.runtime.containers().await {
                        uids.extend(cs.iter().map(|c| c.label(LABEL_POD_UID).to_string()).filter(|u| !u.is_empty()));
                    }
                    if let Some(n) = &self.network {
                        uids.extend(n.sandboxes());
                    }
                    for u in uids {
                        queue.add(&u);
                    }
                }
                _ = stopped(&mut stop) => break,
            }
        }
        queue.shutdown();
        workers.abort_all();
        while workers.join_next().await.is_some() {}
    }

    /// One pass over the pod `uid`; when to look again.
    pub async fn sync(self: &Arc<Self>, uid: &str) -> Result<Option<Duration>, SyncError> {
        let observed: Vec<ContainerInfo> =
            self.runtime.containers().await?.into_iter().filter(|c| c.label(LABEL_POD_UID) == uid).collect();
        let pod = self.pod(uid);
        let deleting = pod.as_ref().and_then(|p| p.metadata.as_ref()).is_some_and(|m| !m.deletion_timestamp.is_empty());
        if pod.is_none() || deleting {
            if !self.terminating.lock().unwrap_or_else(|p| p.into_inner()).insert(uid.to_string()) {
                return Ok(None);
            }
            let (me, uid) = (self.clone(), uid.to_string());
            tokio::spawn(async move {
                if let Err(e) = me.terminate(&uid, pod, observed).await {
                    // The sweep brings the pod back while anything of it is left.
                    tracing::warn!(pod = uid, error = %e, "pod not cleaned up yet; retrying");
                }
                me.terminating.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
            });
            return Ok(None);
        }
        let Some(pod) = pod else { return Ok(None) };
        let spec = pod.spec.clone().unwrap_or_default();
        let grace = Duration::from_secs(spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64);
        self.memory().entry(uid.to_string()).or_default().grace = grace;
        if is_terminal(&pod) {
            // Finished for good: stop what still runs and keep the rest for logs and status.
            for c in observed.iter().filter(|c| matches!(c.state, ContainerState::Running { .. })) {
                self.stop(c, grace, None).await?;
            }
            return Ok(None);
        }
        let mut mem = self.memory().get(uid).cloned().unwrap_or_default();
        let started = mem.start_time.as_deref().and_then(|t| humantime::parse_rfc3339(t).ok());
        let deadline = spec.active_deadline_seconds.filter(|d| *d >= 0).map(|d| Duration::from_secs(d as u64));
        if let (Some(started), Some(deadline)) = (started, deadline) {
            if SystemTime::now() >= started + deadline && !mem.deadline_exceeded {
                mem.deadline_exceeded = true;
                self.event(
                    &pod,
                    "Normal",
                    "DeadlineExceeded",
                    "Pod was active on the node longer than the specified deadline",
                );
                for c in observed.iter().filter(|c| matches!(c.state, ContainerState::Running { .. })) {
                    self.stop(c, grace, self.pre_stop(&pod, c, &mem)).await?;
                }
            }
        }
        let result =
            if mem.deadline_exceeded { Ok(()) } else { self.sync_running(&pod, &spec, &observed, &mut mem).await };
        let observed: Vec<ContainerInfo> =
            self.runtime.containers().await?.into_iter().filter(|c| c.label(LABEL_POD_UID) == uid).collect();
        let next = status::compute(&pod, &observed, &mem, &self.config, SystemTime::now());
        self.memory().insert(uid.to_string(), mem);
        self.write_status(&pod, next).await?;
        match result {
            // Not a failure: look again soon (a pull under way).
            Err(SyncError::Pending(after)) => return Ok(Some(after)),
            r => r?,
        }
        Ok(Some(self.config.resync))
    }

    /// The sandbox, then the init containers in order, then the app containers.
    async fn sync_running(
        self: &Arc<Self>,
        pod: &pb::Pod,
        spec: &pb::PodSpec,
        observed: &[ContainerInfo],
        mem: &mut PodMemory,
    ) -> Result<(), SyncError> {
        let meta = pod.metadata.clone().unwrap_or_default();
        let uid = meta.uid.as_str();
        let dir = self.config.pods_dir.join(uid);
        let netns = match &self.network {
            None => PathBuf::from("/proc/self/ns/net"),
            Some(net) => {
                let Some(cidr) = self.pod_cidr() else {
                    for c in &spec.containers {
                        mem.waiting.insert(
                            c.name.clone(),
                            Waiting {
                                reason: "ContainerCreating".into(),
                                message: format!("node {} has no podCIDR yet", self.config.node),
                            },
                        );
                    }
                    return Err(SyncError::Waiting("the node has no podCIDR yet".into()));
                };
                let ports: Vec<PortMapping> = spec
                    .containers
                    .iter()
                    .flat_map(|c| c.ports.iter())
                    .filter(|p| p.host_port > 0)
                    .map(|p| PortMapping {
                        host_port: p.host_port,
                        container_port: p.container_port,
                        protocol: if p.protocol.is_empty() { "tcp".into() } else { p.protocol.to_ascii_lowercase() },
                        host_ip: p.host_ip.clone(),
                    })
                    .collect();
                let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}", meta.namespace, meta.name);
                match net.attach(uid, &cidr, ports, &args).await {
                    Ok((path, ip)) => {
                        mem.ip = Some(ip);
                        path
                    }
                    Err(e) => {
                        for c in &spec.containers {
                            mem.waiting.insert(
                                c.name.clone(),
                                Waiting { reason: "ContainerCreating".into(), message: format!("pod network: {e}") },
                            );
                        }
                        return Err(SyncError::Network(e.to_string()));
                    }
                }
            }
        };
        if mem.start_time.is_none() {
            mem.start_time = Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
        }
        let mut sandbox = self.write_pod_files(pod, &dir, netns, mem.ip.as_deref())?;
        // The pod as the downward API shows it: with the addresses it has by now.
        let view = {
            let mut v = pod.clone();
            let st = v.status.get_or_insert_with(Default::default);
            if let Some(ip) = &mem.ip {
                st.pod_ip = ip.clone();
                st.pod_ips = vec![pb::PodIp { ip: ip.clone() }];
            }
            st.host_ip = self.config.node_ip.clone();
            st.host_ips = vec![pb::HostIp { ip: self.config.node_ip.clone() }];
            v
        };
        match volumes::set_up(&view, &dir, &self.refs, self.config.allocatable).await {
            Ok(v) => sandbox.volumes = v,
            Err(e) => {
                let message = e.to_string();
                let all = spec.init_containers.iter().chain(&spec.containers);
                for c in all.filter(|c| latest(observed, &c.name).is_none()) {
                    mem.waiting.insert(
                        c.name.clone(),
                        Waiting { reason: "ContainerCreating".into(), message: message.clone() },
                    );
                }
                if mem.failed_mount.as_deref() != Some(message.as_str()) {
                    self.event(pod, "Warning", "FailedMount", &message);
                    mem.failed_mount = Some(message.clone());
                }
                return Err(SyncError::Waiting(message));
            }
        }
        mem.failed_mount = None;
        let policy = if spec.restart_policy.is_empty() { "Always" } else { spec.restart_policy.as_str() };
        // Init containers, one after another; a failure is retried as the policy says.
        for init in &spec.init_containers {
            let latest = latest(observed, &init.name);
            if is_sidecar(init) {
                // A sidecar runs on beside the app containers, restarted whatever the pod's
                // policy; the next init container waits until it has started.
                match latest.map(|c| &c.state) {
                    Some(ContainerState::Running { .. }) if has_started(init, mem) => {
                        mem.waiting.remove(&init.name);
                        continue;
                    }
                    Some(ContainerState::Running { .. }) => return Ok(()),
                    _ => {
                        self.run_container(&view, spec, init, latest, &sandbox, mem, observed).await?;
                        return Ok(());
                    }
                }
            }
            match latest.map(|c| &c.state) {
                Some(ContainerState::Exited { code: 0, .. }) => continue,
                Some(ContainerState::Running { .. }) => return Ok(()),
                Some(ContainerState::Exited { .. }) if policy == "Never" => return Ok(()),
                _ => {
                    self.run_container(&view, spec, init, latest, &sandbox, mem, observed).await?;
                    return Ok(());
                }
            }
        }
        for c in &spec.containers {
            let latest = latest(observed, &c.name);
            let restart = match latest.map(|l| &l.state) {
                None => true,
                Some(ContainerState::Created) => true,
                Some(ContainerState::Running { .. }) => false,
                Some(ContainerState::Exited { code, .. }) => match policy {
                    "Never" => false,
                    "OnFailure" => *code != 0,
                    _ => true,
                },
            };
            if restart {
                self.run_container(&view, spec, c, latest, &sandbox, mem, observed).await?;
            } else if matches!(latest.map(|l| &l.state), Some(ContainerState::Running { .. })) {
                mem.waiting.remove(&c.name);
            }
        }
        self.probe(pod, spec, observed, mem);
        Ok(())
    }

    /// The image of container `c`, pulled as its policy says; None while a pull is under
    /// way. Reports `ErrImagePull` (once per failed pull), then `ImagePullBackOff`, with the
    /// kubelet's Events.
    async fn image_for(
        &self,
        pod: &pb::Pod,
        c: &pb::Container,
        mem: &mut PodMemory,
    ) -> Result<Option<crate::agent::runtime::ImageInfo>, SyncError> {
        let meta = pod.metadata.clone().unwrap_or_default();
        let mut secrets = HashMap::new();
        for s in pod.spec.as_ref().map(|s| s.image_pull_secrets.as_slice()).unwrap_or_default() {
            match self.refs.secret(&meta.namespace, &s.name).await {
                Ok(Some(data)) => match crate::agent::registries::pull_secret_credentials(&data) {
                    Ok(c) => secrets.extend(c),
                    Err(e) => tracing::warn!(pod = meta.name, secret = s.name, error = %e, "pull secret ignored"),
                },
                // As the kubelet: a missing pull secret is not fatal; the pull goes without it.
                _ => tracing::warn!(pod = meta.name, secret = s.name, "pull secret not found"),
            }
        }
        let ensure = self.puller.ensure(&c.image, &c.image_pull_policy, &secrets).await?;
        let wait = |mem: &mut PodMemory, reason: &str, message: String| {
            let w = Waiting { reason: reason.into(), message };
            let new = mem.waiting.get(&c.name) != Some(&w);
            mem.waiting.insert(c.name.clone(), w);
            new
        };
        match ensure {
            images::Ensure::Ready { info, pulled } => {
                match pulled {
                    Some(took) if mem.pull_failures.get(&c.name) != Some(&u32::MAX) => {
                        self.event(
                            pod,
                            "Normal",
                            "Pulled",
                            &format!(
                                "Successfully pulled image {:?} in {:.3}s. Image size: {} bytes.",
                                c.image,
                                took.as_secs_f64(),
                                info.size
                            ),
                        );
                        // Once per pull.
                        mem.pull_failures.insert(c.name.clone(), u32::MAX);
                    }
                    None if c.image_pull_policy != "Always" => {
                        self.event(
                            pod,
                            "Normal",
                            "Pulled",
                            &format!("Container image {:?} already present on machine", c.image),
                        );
                    }
                    _ => {}
                }
                Ok(Some(info))
            }
            images::Ensure::Pulling { started } => {
                if started {
                    self.event(pod, "Normal", "Pulling", &format!("Pulling image {:?}", c.image));
                    mem.pull_failures.remove(&c.name);
                }
                if !matches!(mem.waiting.get(&c.name), Some(w) if w.reason == "ErrImagePull" || w.reason == "ImagePullBackOff")
                {
                    wait(mem, "ContainerCreating", String::new());
                }
                Ok(None)
            }
            images::Ensure::Failed { reason, message, failure, at } => {
                // A failed pull shows as ErrImagePull for a while (about one regular look),
                // then as ImagePullBackOff until the next attempt.
                let shown_for = self.config.resync.max(Duration::from_secs(1));
                let fresh = reason == "ImagePullBackOff" && at.elapsed() < shown_for;
                let (reason, message) = if fresh {
                    ("ErrImagePull", message)
                } else if reason == "ImagePullBackOff" {
                    ("ImagePullBackOff", format!("Back-off pulling image {:?}", c.image))
                } else {
                    (reason, message)
                };
                let seen = mem.pull_failures.get(&c.name).copied().unwrap_or(0);
                if reason == "ErrImagePull" && (seen == u32::MAX || seen < failure) {
                    mem.pull_failures.insert(c.name.clone(), failure);
                    self.event(pod, "Warning", "Failed", &format!("Failed to pull image {:?}: {message}", c.image));
                    self.event(pod, "Warning", "Failed", "Error: ErrImagePull");
                }
                if wait(mem, reason, message.clone()) {
                    match reason {
                        "ImagePullBackOff" => self.event(pod, "Normal", "BackOff", &message),
                        "ErrImageNeverPull" => self.event(pod, "Warning", "ErrImageNeverPull", &message),
                        _ => {}
                    }
                }
                if fresh {
                    return Err(SyncError::Pending(shown_for.saturating_sub(at.elapsed()) + Duration::from_millis(50)));
                }
                // The reason stays on show until the next regular look.
                Err(SyncError::Pending(self.config.resync))
            }
        }
    }

    /// Runs the due probes of the pod's running containers and acts on what they said: a
    /// failed startup or liveness probe kills the container (its restart policy restarts
    /// it), readiness and startup decide `ready` and `started`.
    fn probe(self: &Arc<Self>, pod: &pb::Pod, spec: &pb::PodSpec, observed: &[ContainerInfo], mem: &mut PodMemory) {
        use probe::Kind;
        let pod_ip = mem.ip.clone().unwrap_or_default();
        for c in spec.init_containers.iter().filter(|c| is_sidecar(c)).chain(&spec.containers) {
            let Some(l) = latest(observed, &c.name) else { continue };
            let ContainerState::Running { started_at, .. } = l.state else {
                mem.ready.remove(&c.name);
                mem.started.remove(&c.name);
                continue;
            };
            if self.killing.lock().unwrap_or_else(|p| p.into_inner()).contains(&l.id) {
                continue;
            }
            let started_at = started_at.unwrap_or_else(SystemTime::now);
            let target = probe::Target { pod_ip: pod_ip.clone(), container_id: l.id.clone(), container: c.clone() };
            let check = |kind: Kind, p: &pb::Probe| {
                self.prober.check(kind, p, target.clone(), started_at, self.runtime.clone(), self.network.clone())
            };
            let started = match &c.startup_probe {
                Some(p) => {
                    let v = check(Kind::Startup, p);
                    if v.ok == Some(false) {
                        self.kill_unhealthy(pod, c, l, Kind::Startup, p, v.message, mem);
                        continue;
                    }
                    v.ok == Some(true)
                }
                None => true,
            };
            mem.started.insert(c.name.clone(), started);
            if !started {
                mem.ready.insert(c.name.clone(), false);
                continue;
            }
            if let Some(p) = &c.liveness_probe {
                let v = check(Kind::Liveness, p);
                if v.ok == Some(false) {
                    self.kill_unhealthy(pod, c, l, Kind::Liveness, p, v.message, mem);
                    continue;
                }
            }
            match &c.readiness_probe {
                Some(p) => {
                    let v = check(Kind::Readiness, p);
                    let was = mem.ready.insert(c.name.clone(), v.ok == Some(true));
                    if v.ok == Some(false) && was != Some(false) {
                        self.event(pod, "Warning", "Unhealthy", &v.message);
                    }
                }
                None => {
                    mem.ready.remove(&c.name);
                }
            }
        }
    }

    /// Kills a container whose startup or liveness probe failed, in the background (its
    /// preStop hook first), with the kubelet's Events.
    #[allow(clippy::too_many_arguments)]
    fn kill_unhealthy(
        self: &Arc<Self>,
        pod: &pb::Pod,
        c: &pb::Container,
        l: &ContainerInfo,
        kind: probe::Kind,
        p: &pb::Probe,
        message: String,
        mem: &PodMemory,
    ) {
        self.event(pod, "Warning", "Unhealthy", &message);
        self.event(
            pod,
            "Normal",
            "Killing",
            &format!("Container {} failed {} probe, will be restarted", c.name, kind.word().to_ascii_lowercase()),
        );
        self.killing.lock().unwrap_or_else(|p| p.into_inner()).insert(l.id.clone());
        let spec_grace = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30);
        let grace = Duration::from_secs(p.termination_grace_period_seconds.unwrap_or(spec_grace).max(0) as u64);
        let hook = self.pre_stop(pod, l, mem);
        let (me, l) = (self.clone(), l.clone());
        tokio::spawn(async move {
            if let Err(e) = me.stop(&l, grace, hook).await {
                tracing::warn!(container = l.id, error = %e, "unhealthy container not stopped");
            }
            me.prober.reset(&l.id, kind);
            me.killing.lock().unwrap_or_else(|p| p.into_inner()).remove(&l.id);
        });
    }

    /// The preStop hook of the container `l` of `pod`, with its target.
    fn pre_stop(&self, pod: &pb::Pod, l: &ContainerInfo, mem: &PodMemory) -> Option<(probe::Handler, probe::Target)> {
        let spec = pod.spec.as_ref()?;
        let c = spec.containers.iter().chain(&spec.init_containers).find(|c| c.name == l.label(LABEL_CONTAINER))?;
        let h = c.lifecycle.as_ref()?.pre_stop.as_ref()?;
        let target = probe::Target {
            pod_ip: mem.ip.clone().unwrap_or_default(),
            container_id: l.id.clone(),
            container: c.clone(),
        };
        Some((probe::Handler::from(h), target))
    }

    /// Creates and starts the next attempt of container `c`, unless its back-off holds it.
    #[allow(clippy::too_many_arguments)]
    async fn run_container(
        &self,
        pod: &pb::Pod,
        spec: &pb::PodSpec,
        c: &pb::Container,
        latest: Option<&ContainerInfo>,
        sandbox: &spec::Sandbox,
        mem: &mut PodMemory,
        observed: &[ContainerInfo],
    ) -> Result<(), SyncError> {
        let meta = pod.metadata.clone().unwrap_or_default();
        let now = SystemTime::now();
        let exited = matches!(latest.map(|l| &l.state), Some(ContainerState::Exited { .. }));
        if exited {
            let restarts = latest.map(attempt_of).unwrap_or(0) + 1;
            let not_before = *mem.not_before.entry(c.name.clone()).or_insert_with(|| {
                let finished = match latest.map(|l| &l.state) {
                    Some(ContainerState::Exited { finished_at: Some(t), .. }) => *t,
                    _ => now,
                };
                let backoff =
                    self.config.backoff.saturating_mul(1u32 << (restarts - 1).min(16)).min(self.config.max_backoff);
                finished + backoff
            });
            if now < not_before {
                let wait = not_before.duration_since(now).unwrap_or_default();
                mem.waiting.insert(
                    c.name.clone(),
                    Waiting {
                        reason: "CrashLoopBackOff".into(),
                        message: format!(
                            "back-off {}s restarting failed container={} pod={}_{}({})",
                            wait.as_secs().max(1),
                            c.name,
                            meta.name,
                            meta.namespace,
                            meta.uid
                        ),
                    },
                );
                return Ok(());
            }
        }
        let attempt = match latest {
            None => 0,
            Some(l) if matches!(l.state, ContainerState::Created) => attempt_of(l),
            Some(l) => attempt_of(l) + 1,
        };
        // Image.
        let image = match self.image_for(pod, c, mem).await? {
            Some(i) => i,
            None => return Err(SyncError::Pending(Duration::from_millis(250))),
        };
        let config_error = |mem: &mut PodMemory, message: String| {
            let waiting = Waiting { reason: "CreateContainerConfigError".into(), message: message.clone() };
            if mem.waiting.get(&c.name) != Some(&waiting) {
                self.event(pod, "Warning", "Failed", &format!("Error: {message}"));
            }
            mem.waiting.insert(c.name.clone(), waiting);
            SyncError::Waiting(message)
        };
        let resolved = match refs::resolve_env(pod, c, &self.refs, self.config.allocatable).await {
            Ok(r) => r,
            Err(e) => return Err(config_error(mem, e.0)),
        };
        let env = spec::environment(c, &image.config, &resolved);
        let binds = match volumes::mounts_for(c, &sandbox.volumes, &env) {
            Ok(b) => b,
            Err(e) => return Err(config_error(mem, e)),
        };
        let id = container_id(&meta.uid, &c.name, attempt);
        let oci = match spec::build(spec, c, &image.config, sandbox, &env, &binds, &id) {
            Ok(s) => s,
            Err(e) => return Err(config_error(mem, e.0)),
        };
        // Keep the previous attempt (its exit is the container's lastState), drop older ones.
        for old in observed.iter().filter(|o| o.label(LABEL_CONTAINER) == c.name && attempt_of(o) + 1 < attempt) {
            self.runtime.remove(&old.id).await?;
        }
        if latest.is_some_and(|l| matches!(l.state, ContainerState::Created)) {
            self.runtime.remove(&id).await?;
        }
        let labels = [
            (LABEL_POD_UID.to_string(), meta.uid.clone()),
            (LABEL_POD_NAME.to_string(), meta.name.clone()),
            (LABEL_POD_NAMESPACE.to_string(), meta.namespace.clone()),
            (LABEL_CONTAINER.to_string(), c.name.clone()),
            (LABEL_ATTEMPT.to_string(), attempt.to_string()),
        ]
        .into();
        let log_path = sandbox
            .hosts
            .parent()
            .unwrap_or(&self.config.pods_dir)
            .join("logs")
            .join(&c.name)
            .join(format!("{attempt}.log"));
        let config = ContainerConfig { id: id.clone(), image: image.name.clone(), spec: oci, log_path, labels };
        if let Err(e) = self.runtime.create(config).await {
            mem.waiting
                .insert(c.name.clone(), Waiting { reason: "CreateContainerError".into(), message: e.to_string() });
            return Err(e.into());
        }
        if let Err(e) = self.runtime.start(&id).await {
            mem.waiting.insert(c.name.clone(), Waiting { reason: "RunContainerError".into(), message: e.to_string() });
            return Err(e.into());
        }
        if let Some(h) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()) {
            let target = probe::Target {
                pod_ip: mem.ip.clone().unwrap_or_default(),
                container_id: id.clone(),
                container: c.clone(),
            };
            let grace = Duration::from_secs(spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64);
            if let Err(m) =
                probe::run(self.runtime.as_ref(), self.network.as_ref(), &target, &probe::Handler::from(h), grace).await
            {
                let message = format!("PostStartHook failed: {m}");
                self.event(pod, "Warning", "FailedPostStartHook", &message);
                let _ = self.runtime.signal(&id, 9).await;
                mem.waiting
                    .insert(c.name.clone(), Waiting { reason: "PostStartHookError".into(), message: message.clone() });
                return Err(SyncError::Waiting(message));
            }
        }
        mem.waiting.remove(&c.name);
        mem.not_before.remove(&c.name);
        mem.image_ids.insert(c.name.clone(), image.id.clone());
        tracing::info!(pod = meta.name, namespace = meta.namespace, container = c.name, attempt, "container started");
        Ok(())
    }

    /// /etc/hosts, /etc/hostname and /etc/resolv.conf of the pod.
    fn write_pod_files(
        &self,
        pod: &pb::Pod,
        dir: &std::path::Path,
        netns: PathBuf,
        ip: Option<&str>,
    ) -> Result<spec::Sandbox, SyncError> {
        let meta = pod.metadata.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let hostname = if spec.hostname.is_empty() { meta.name.clone() } else { spec.hostname.clone() };
        let io = |what: &std::path::Path, e: std::io::Error| SyncError::Io(format!("{}: {e}", what.display()));
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut hosts = String::from(
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        );
        if let Some(ip) = ip {
            hosts.push_str(&format!("{ip}\t{hostname}\n"));
        }
        for a in &spec.host_aliases {
            hosts.push_str(&format!("{}\t{}\n", a.ip, a.hostnames.join("\t")));
        }
        let files =
            [("hosts", hosts), ("hostname", format!("{hostname}\n")), ("resolv.conf", self.config.resolv_conf.clone())];
        for (name, text) in files {
            let p = dir.join(name);
            if std::fs::read_to_string(&p).ok().as_deref() != Some(text.as_str()) {
                std::fs::write(&p, text).map_err(|e| io(&p, e))?;
            }
        }
        Ok(spec::Sandbox {
            netns,
            hostname,
            hosts: dir.join("hosts"),
            hostname_file: dir.join("hostname"),
            resolv_conf: dir.join("resolv.conf"),
            cgroup_parent: format!("/keel/{}", meta.uid),
            volumes: Default::default(),
        })
    }

    /// The preStop hook (if any), then SIGTERM, then SIGKILL once `grace` has passed since
    /// the start (at least 2 s after SIGTERM when the hook used it all, as the kubelet does).
    async fn stop(
        &self,
        c: &ContainerInfo,
        grace: Duration,
        hook: Option<(probe::Handler, probe::Target)>,
    ) -> Result<(), SyncError> {
        if !matches!(c.state, ContainerState::Running { .. }) {
            return Ok(());
        }
        let begin = tokio::time::Instant::now();
        if let Some((h, t)) = hook {
            if let Err(m) = probe::run(self.runtime.as_ref(), self.network.as_ref(), &t, &h, grace).await {
                tracing::info!(container = c.id, error = m, "preStop hook failed");
            }
        }
        self.runtime.signal(&c.id, 15).await?;
        let deadline = (begin + grace).max(tokio::time::Instant::now() + Duration::from_secs(2).min(grace));
        while tokio::time::Instant::now() < deadline {
            let still = self
                .runtime
                .containers()
                .await?
                .into_iter()
                .any(|x| x.id == c.id && matches!(x.state, ContainerState::Running { .. }));
            if !still {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.runtime.signal(&c.id, 9).await?;
        Ok(())
    }

    /// Stops a pod being deleted (or gone already) within its grace period, removes what is
    /// left of it (containers, network, files), then deletes a pod still in the API for good.
    async fn terminate(&self, uid: &str, pod: Option<pb::Pod>, observed: Vec<ContainerInfo>) -> Result<(), SyncError> {
        let meta = pod.as_ref().and_then(|p| p.metadata.clone()).unwrap_or_default();
        let remembered = self.memory().get(uid).map(|m| m.grace).unwrap_or(Duration::from_secs(30));
        let grace = meta.deletion_grace_period_seconds.map_or(remembered, |g| Duration::from_secs(g.max(0) as u64));
        let mem = self.memory().get(uid).cloned().unwrap_or_default();
        let hooks: Vec<_> = observed.iter().map(|c| pod.as_ref().and_then(|p| self.pre_stop(p, c, &mem))).collect();
        let stops = observed.iter().zip(hooks).map(|(c, h)| self.stop(c, grace, h));
        for r in futures::future::join_all(stops).await {
            r?;
        }
        for c in &observed {
            self.runtime.remove(&c.id).await?;
        }
        if let Some(n) = &self.network {
            n.detach(uid).await.map_err(|e| SyncError::Network(e.to_string()))?;
        }
        let dir = self.config.pods_dir.join(uid);
        if dir.exists() {
            // Memory-backed volumes first: what is removed must be the pod's own files.
            volumes::tear_down(&dir).map_err(SyncError::Io)?;
            std::fs::remove_dir_all(&dir).map_err(|e| SyncError::Io(format!("{}: {e}", dir.display())))?;
        }
        remove_cgroups(uid).map_err(SyncError::Io)?;
        if self.memory().remove(uid).is_some() || !observed.is_empty() {
            tracing::info!(pod = uid, name = meta.name, containers = observed.len(), "pod stopped and cleaned up");
        }
        if pod.is_some() {
            let opts = DeleteOptions { grace_period_seconds: Some(0), uid: uid.to_string(), ..Default::default() };
            match self.client.delete(Kind::Pod, &meta.namespace, &meta.name, &opts).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() || e.is_conflict() => {}
                Err(e) => return Err(SyncError::Client(e.to_string())),
            }
        }
        Ok(())
    }

    /// Writes `next` as the pod's status if it differs from what the API has.
    async fn write_status(&self, pod: &pb::Pod, next: pb::PodStatus) -> Result<(), SyncError> {
        if pod.status.as_ref() == Some(&next) {
            return Ok(());
        }
        let mut updated = pod.clone();
        updated.status = Some(next.clone());
        let result = match self.client.update_status(pb::Object { kind: Some(pb::object::Kind::Pod(updated)) }).await {
            // Our informer has not seen our last write yet: the status is ours to set, so
            // set it on the newest version rather than lose a state that lasts one sync.
            Err(e) if e.is_conflict() => {
                let meta = pod.metadata.clone().unwrap_or_default();
                match self.client.get(crate::api::kinds::Kind::Pod, &meta.namespace, &meta.name).await {
                    Ok(pb::Object { kind: Some(pb::object::Kind::Pod(mut latest)) })
                        if latest.metadata.as_ref().map(|m| &m.uid) == Some(&meta.uid) =>
                    {
                        latest.status = Some(next);
                        self.client.update_status(pb::Object { kind: Some(pb::object::Kind::Pod(latest)) }).await
                    }
                    Ok(_) => return Ok(()),
                    Err(e) => Err(e),
                }
            }
            r => r,
        };
        match result {
            Ok(_) => Ok(()),
            // Deleted meanwhile: the next sync cleans up.
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(SyncError::Client(e.to_string())),
        }
    }
}

/// The cgroup of a pod's containers (`/keel/<uid>`), in every hierarchy it is in.
pub fn cgroup_dirs(uid: &str) -> Vec<PathBuf> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let mut out = Vec::new();
    if root.join("cgroup.controllers").exists() {
        // cgroup v2: one hierarchy.
        out.push(root.join("keel").join(uid));
    } else if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            out.push(e.path().join("keel").join(uid));
        }
    }
    out.retain(|p| p.is_dir());
    out
}

/// Removes the pod's (empty) cgroups, which runc leaves when it removes a container's.
pub fn remove_cgroups(uid: &str) -> Result<(), String> {
    for dir in cgroup_dirs(uid) {
        // Children first: a cgroup goes only once it has none.
        let mut dirs = vec![dir.clone()];
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
        for d in dirs.iter().rev() {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cgroup {}: {e}", d.display())),
            }
        }
    }
    Ok(())
}

/// The newest attempt of container `name`.
fn latest<'a>(observed: &'a [ContainerInfo], name: &str) -> Option<&'a ContainerInfo> {
    observed.iter().filter(|c| c.label(LABEL_CONTAINER) == name).max_by_key(|c| attempt_of(c))
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("pod network: {0}")]
    Network(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Client(String),
    /// Not an error of the agent: the pod waits for something (an image, the podCIDR).
    #[error("{0}")]
    Waiting(String),
    /// Something is under way (an image pull): look again after this long.
    #[error("pending; again in {0:?}")]
    Pending(Duration),
}
