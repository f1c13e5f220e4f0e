//! The node's identity and liveness: its Node object (registration, addresses, node info,
//! the Ready condition, the certificate's end) and its Lease in kube-node-lease, renewed
//! every few seconds, plus the renewal of the node's certificate.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{AgentConfig, AgentError};
use crate::api::kinds::Kind;
use crate::api::wellknown::{CERT_EXPIRES_ANNOTATION as CERT_EXPIRES, NODE_LEASE_NAMESPACE};
use crate::client::{Client, ClientError};
use crate::pki::{self, Credentials, LiveCredentials};
use crate::proto::v1 as pb;

/// How long a node's Lease lasts without renewal.
pub const LEASE_SECONDS: i32 = 40;

fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

pub struct Agent {
    cfg: AgentConfig,
    creds: Arc<LiveCredentials>,
    client: Client,
    runtime_version: String,
    kubelet_port: u16,
    /// Where the images the Node lists come from.
    runtime: Option<Arc<dyn crate::agent::runtime::Runtime>>,
    thresholds: super::pressure::Thresholds,
    reserved: std::collections::HashMap<String, crate::api::quantity::Quantity>,
    /// The pressure conditions' statuses last reported.
    reported: Vec<&'static str>,
    /// Whether the runtime answered at the last report.
    runtime_reported: bool,
}

impl Agent {
    pub fn new(cfg: AgentConfig, creds: Arc<LiveCredentials>, client: Client) -> Agent {
        Agent {
            cfg,
            creds,
            client,
            runtime_version: String::new(),
            kubelet_port: 0,
            runtime: None,
            thresholds: super::pressure::Thresholds::default(),
            reserved: Default::default(),
            reported: Vec::new(),
            runtime_reported: true,
        }
    }

    /// The port replicas call for logs and exec.
    pub fn set_kubelet_port(&mut self, port: u16) {
        self.kubelet_port = port;
    }

    /// When the node is under pressure, and what it keeps from pods.
    pub fn set_pressure(
        &mut self,
        thresholds: super::pressure::Thresholds,
        reserved: std::collections::HashMap<String, crate::api::quantity::Quantity>,
    ) {
        self.thresholds = thresholds;
        self.reserved = reserved;
    }

    /// Why the container runtime does not answer (within 2 s), if it does not.
    async fn runtime_down(&self) -> Option<String> {
        let rt = self.runtime.as_ref()?;
        match tokio::time::timeout(Duration::from_secs(2), rt.version()).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("no answer within 2s".into()),
        }
    }

    /// The pressure conditions now, from fresh readings.
    fn pressure(&self) -> [super::pressure::Condition; 3] {
        super::pressure::conditions(&super::pressure::read(&self.cfg.data_dir), &self.thresholds)
    }

    /// The runtime whose images the Node lists.
    pub fn set_runtime(&mut self, rt: Arc<dyn crate::agent::runtime::Runtime>) {
        self.runtime = Some(rt);
    }

    /// What the Node reports as its container runtime.
    pub fn set_runtime_version(&mut self, v: String) {
        self.runtime_version = v;
    }

    /// Renews the node certificate, for the same key, once a third of its life is left;
    /// later calls use the new one. True when it renewed.
    pub async fn renew_if_due(&mut self) -> Result<bool, AgentError> {
        let creds = self.creds.get();
        let (not_before, not_after) = pki::validity_of(&creds.cert_pem)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let lifetime = (not_after - not_before - 60).max(1);
        if not_after - now > lifetime / 3 {
            return Ok(false);
        }
        let csr = pki::request_for(&creds.key_pem)?;
        let r = self.client.renew_certificate(pb::RenewCertificateRequest { csr_pem: csr }).await?;
        let next = Credentials { ca_pem: r.ca_pem, cert_pem: r.certificate_pem, key_pem: creds.key_pem.clone() };
        next.save(&self.cfg.data_dir.join("tls"))?;
        // The client makes its connections again with the new certificate.
        self.creds.set(next);
        tracing::info!("node certificate renewed");
        Ok(true)
    }

    /// Creates the Node if it does not exist, then reports it Ready; a Node changed
    /// meanwhile (its podCIDR given, say) is read again.
    pub async fn register(&mut self) -> Result<pb::Object, ClientError> {
        let mut attempt = 0;
        loop {
            match self.register_once().await {
                Err(e) if e.is_conflict() && attempt < 5 => attempt += 1,
                other => return other,
            }
        }
    }

    async fn register_once(&mut self) -> Result<pb::Object, ClientError> {
        let current = match self.client.get_opt(Kind::Node, "", &self.cfg.name).await? {
            Some(n) => n,
            None => {
                let labels = [
                    ("kubernetes.io/hostname".to_string(), self.cfg.name.clone()),
                    ("kubernetes.io/os".to_string(), "linux".to_string()),
                    ("kubernetes.io/arch".to_string(), std::env::consts::ARCH.replace("x86_64", "amd64")),
                ]
                .into();
                let node = pb::Node {
                    metadata: Some(pb::ObjectMeta { name: self.cfg.name.clone(), labels, ..Default::default() }),
                    ..Default::default()
                };
                let obj = pb::Object { kind: Some(pb::object::Kind::Node(node)) };
                match self.client.create(obj).await {
                    Ok(o) => o,
                    // Created meanwhile (by an earlier attempt of this agent whose answer was
                    // lost): read it.
                    Err(e) if e.is_already_exists() || e.is_indeterminate() => {
                        self.client.get(Kind::Node, "", &self.cfg.name).await?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        self.report_ready(current).await
    }

    async fn report_ready(&mut self, mut obj: pb::Object) -> Result<pb::Object, ClientError> {
        // The node certificate's end, for `keelctl cluster certs`.
        let end = pki::validity_of(&self.creds.get().cert_pem).map(|v| v.1).unwrap_or(0);
        let stamp = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(end.max(0) as u64))
            .to_string();
        if crate::api::object::meta(&obj).and_then(|m| m.annotations.get(CERT_EXPIRES)) != Some(&stamp) {
            let mut annotated = obj.clone();
            if let Some(m) = crate::api::object::meta_mut(&mut annotated) {
                m.annotations.insert(CERT_EXPIRES.to_string(), stamp);
            }
            obj = self.client.update(annotated).await?;
        }
        // Whether the runtime answers, and the node's images, largest first, at most 50 (the
        // kubelet's nodeStatusMaxImages).
        let mut runtime_down = self.runtime_down().await;
        let images = match (&self.runtime, &runtime_down) {
            // Bounded too: the runtime may stop answering between the two calls.
            (Some(rt), None) => match tokio::time::timeout(Duration::from_secs(2), rt.images()).await {
                Ok(Ok(i)) => i,
                Ok(Err(e)) => {
                    runtime_down = Some(e.to_string());
                    Vec::new()
                }
                Err(_) => {
                    runtime_down = Some("no answer within 2s".into());
                    Vec::new()
                }
            },
            _ => Vec::new(),
        };
        if let Some(pb::object::Kind::Node(n)) = obj.kind.as_mut() {
            let status = n.status.get_or_insert_with(Default::default);
            let mut listed: Vec<pb::ContainerImage> = images
                .iter()
                .map(|i| {
                    let repo =
                        i.name.rsplit_once(':').filter(|(_, t)| !t.contains('/')).map_or(i.name.as_str(), |r| r.0);
                    let mut names = vec![format!("{repo}@{}", i.id), i.name.clone()];
                    names.dedup();
                    pb::ContainerImage { names, size_bytes: i.size as i64 }
                })
                .collect();
            listed.sort_by(|a, b| b.size_bytes.cmp(&a.size_bytes).then_with(|| a.names.cmp(&b.names)));
            listed.truncate(50);
            // A runtime that does not answer lists nothing: keep what was listed.
            if runtime_down.is_none() {
                status.images = listed;
            }
            let t = now();
            let ready = if runtime_down.is_none() { "True" } else { "False" };
            let transition = status
                .conditions
                .iter()
                .find(|c| c.r#type == "Ready" && c.status == ready)
                .map_or(t.clone(), |c| c.last_transition_time.clone());
            let pressure = self.pressure();
            let mut conditions: Vec<pb::NodeCondition> = pressure
                .iter()
                .map(|(ty, st, reason, message)| {
                    let since = status
                        .conditions
                        .iter()
                        .find(|c| c.r#type == *ty && c.status == *st)
                        .map_or(t.clone(), |c| c.last_transition_time.clone());
                    pb::NodeCondition {
                        r#type: (*ty).into(),
                        status: (*st).into(),
                        last_heartbeat_time: t.clone(),
                        last_transition_time: since,
                        reason: (*reason).into(),
                        message: (*message).into(),
                    }
                })
                .collect();
            self.reported = pressure.iter().map(|c| c.1).collect();
            let (reason, message) = match &runtime_down {
                None => ("KeelAgentReady".to_string(), "keel agent is posting ready status".to_string()),
                Some(why) => ("KubeletNotReady".to_string(), format!("container runtime is down: {why}")),
            };
            self.runtime_reported = runtime_down.is_none();
            conditions.push(pb::NodeCondition {
                r#type: "Ready".into(),
                status: ready.into(),
                last_heartbeat_time: t,
                last_transition_time: transition,
                reason,
                message,
            });
            // Conditions of others (none yet) stay.
            status
                .conditions
                .retain(|c| !["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"].contains(&c.r#type.as_str()));
            status.conditions.extend(conditions);
            status.addresses = vec![
                pb::NodeAddress { r#type: "InternalIP".into(), address: self.cfg.node_ip.clone() },
                pb::NodeAddress { r#type: "Hostname".into(), address: self.cfg.name.clone() },
            ];
            status.capacity = capacity(&self.cfg.data_dir);
            status.daemon_endpoints = Some(pb::NodeDaemonEndpoints {
                kubelet_endpoint: Some(pb::DaemonEndpoint { port: i32::from(self.kubelet_port) }),
            });
            status.allocatable = super::pressure::allocatable(&status.capacity, &self.reserved);
            let info = status.node_info.get_or_insert_with(Default::default);
            info.kubelet_version = format!("keel-{}", env!("CARGO_PKG_VERSION"));
            info.operating_system = "linux".into();
            info.architecture = std::env::consts::ARCH.replace("x86_64", "amd64");
            info.kernel_version =
                std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().into();
            info.container_runtime_version = self.runtime_version.clone();
            info.os_image = os_image();
        }
        self.client.update_status(obj).await
    }

    /// Creates or renews this node's Lease in kube-node-lease.
    pub async fn renew_lease(&mut self) -> Result<(), ClientError> {
        let spec = |acquire: String| pb::LeaseSpec {
            holder_identity: Some(self.cfg.name.clone()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            acquire_time: acquire,
            renew_time: now(),
            ..Default::default()
        };
        match self.client.get_opt(Kind::Lease, NODE_LEASE_NAMESPACE, &self.cfg.name).await? {
            Some(mut o) => {
                if let Some(pb::object::Kind::Lease(l)) = o.kind.as_mut() {
                    let acquire = l.spec.as_ref().map(|s| s.acquire_time.clone()).unwrap_or_default();
                    l.spec = Some(spec(acquire));
                }
                self.client.update(o).await?;
            }
            None => {
                let lease = pb::Lease {
                    metadata: Some(pb::ObjectMeta {
                        name: self.cfg.name.clone(),
                        namespace: NODE_LEASE_NAMESPACE.into(),
                        ..Default::default()
                    }),
                    spec: Some(spec(now())),
                    ..Default::default()
                };
                self.client.create(pb::Object { kind: Some(pb::object::Kind::Lease(lease)) }).await?;
            }
        }
        Ok(())
    }

    /// Renews the Lease every heartbeat and reports the status every sixth time (or when a
    /// pressure condition changes), until
    /// dropped. Errors are logged and retried.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat.max(Duration::from_millis(100)));
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            // The whole status every sixth beat, and at once when a pressure condition turns.
            let turned = self.pressure().iter().map(|c| c.1).collect::<Vec<_>>() != self.reported
                || self.runtime_down().await.is_none() != self.runtime_reported;
            if n.is_multiple_of(6) || turned {
                if let Err(e) = self.register().await {
                    tracing::warn!(error = %e, "node status not reported; retrying");
                }
            }
            if let Err(e) = self.renew_lease().await {
                tracing::warn!(error = %e, "lease not renewed; retrying");
            }
            if let Err(e) = self.renew_if_due().await {
                tracing::warn!(error = %e, "node certificate not renewed; retrying");
            }
            n += 1;
        }
    }
}

/// PRETTY_NAME of /etc/os-release.
fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
        .unwrap_or_default()
}

/// This machine's name, lower-cased: the default name of its node and replica.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_ascii_lowercase())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "keel".to_string())
}

/// What the node has: cores, memory, the disk of its data directory, and room for 110 pods
/// (the kubelet's default).
pub fn capacity(data_dir: &std::path::Path) -> std::collections::HashMap<String, String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let mut dir = data_dir.to_path_buf();
    while !dir.exists() && dir.pop() {}
    let disk = nix::sys::statvfs::statvfs(&dir).map_or(0, |s| s.blocks() * s.fragment_size());
    [
        ("cpu".to_string(), cpus.to_string()),
        ("memory".to_string(), format!("{mem_kib}Ki")),
        ("ephemeral-storage".to_string(), disk.to_string()),
        ("pods".to_string(), "110".to_string()),
    ]
    .into()
}
