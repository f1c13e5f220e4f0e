//! The node agent (`keel agent`): joins with a token once, then authenticates with the node
//! certificate it got; registers its Node, keeps its Lease renewed and reports Ready.
//!
//! Running pods through containerd is the node-agent issue; this is the part of the agent
//! that cluster lifecycle needs: identity, registration and liveness.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tonic::transport::Channel;
use tonic::Code;

use crate::pki::{self, Credentials, Identity, TokenRole};
use crate::proto::v1 as pb;
use crate::proto::v1::objects_client::ObjectsClient;
use crate::server::authz::NODE_LEASE_NAMESPACE;

pub const LEASE_SECONDS: i32 = 40;
/// The Node annotation that says when the node's certificate ends (RFC 3339).
pub const CERT_EXPIRES: &str = "keel.dev/certificate-expires";
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: String,
    pub data_dir: PathBuf,
    /// Replica addresses (host:port); the first one is used to join.
    pub servers: Vec<String>,
    pub token: Option<String>,
    /// The address other nodes reach this one at.
    pub node_ip: String,
}

fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// The node's credentials: from its data directory while the certificate is valid, else by
/// joining with the token (re-attesting with the same name).
pub async fn credentials(cfg: &AgentConfig) -> anyhow::Result<Credentials> {
    let tls = cfg.data_dir.join("tls");
    let mut key = None;
    if Credentials::exists(&tls) {
        let creds = Credentials::load(&tls)?;
        let left = pki::not_after(&creds.cert_pem)? - time::OffsetDateTime::now_utc().unix_timestamp();
        if left > 0 {
            match creds.identity() {
                Some(Identity::Node(n)) if n == cfg.name => return Ok(creds),
                other => anyhow::bail!(
                    "{}/tls.crt is for {other:?}, not node {:?}; use another --data-dir or --name",
                    tls.display(),
                    cfg.name
                ),
            }
        }
        // Re-attest with the same key: the node stays the node it was.
        key = Some(creds.key_pem.clone());
        if cfg.token.is_none() {
            anyhow::bail!(
                "the node certificate in {} expired; start the agent once with --token (a fresh agent join token) to re-attest",
                tls.display()
            );
        }
    }
    let token = cfg.token.as_deref().context("this node has no certificate yet: give --token to join")?;
    let seed = cfg.servers.first().context("no --server to join through")?;
    let (creds, _) = crate::server::join::join_with_key(seed, token, TokenRole::Agent, &cfg.name, "", key.as_deref())
        .await
        .with_context(|| format!("join through {seed}"))?;
    creds.save(&tls)?;
    Ok(creds)
}

pub struct Agent {
    cfg: AgentConfig,
    creds: Credentials,
    client: ObjectsClient<Channel>,
}

impl Agent {
    pub fn new(cfg: AgentConfig, creds: &Credentials) -> anyhow::Result<Agent> {
        let client = Self::connect(&cfg, creds)?;
        Ok(Agent { cfg, creds: creds.clone(), client })
    }

    fn addr(cfg: &AgentConfig) -> anyhow::Result<String> {
        // One replica for now; the failover client of keelctl is the model for more.
        Ok(cfg.servers.first().context("no --server")?.trim_start_matches("https://").to_string())
    }

    fn connect(cfg: &AgentConfig, creds: &Credentials) -> anyhow::Result<ObjectsClient<Channel>> {
        let ch =
            crate::client::endpoint(&Self::addr(cfg)?, creds)?.connect_timeout(Duration::from_secs(2)).connect_lazy();
        Ok(ObjectsClient::new(ch))
    }

    /// Renews the node certificate, for the same key, once a third of its life is left;
    /// later calls use the new one. True when it renewed.
    pub async fn renew_if_due(&mut self) -> anyhow::Result<bool> {
        let (not_before, not_after) = pki::validity_of(&self.creds.cert_pem)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let lifetime = (not_after - not_before - 60).max(1);
        if not_after - now > lifetime / 3 {
            return Ok(false);
        }
        let ch = crate::client::endpoint(&Self::addr(&self.cfg)?, &self.creds)?.connect_lazy();
        let csr = pki::request_for(&self.creds.key_pem)?;
        let r = pb::cluster_client::ClusterClient::new(ch)
            .renew_certificate(pb::RenewCertificateRequest { csr_pem: csr })
            .await?
            .into_inner();
        let next = Credentials { ca_pem: r.ca_pem, cert_pem: r.certificate_pem, key_pem: self.creds.key_pem.clone() };
        next.save(&self.cfg.data_dir.join("tls"))?;
        self.client = Self::connect(&self.cfg, &next)?;
        self.creds = next;
        tracing::info!("node certificate renewed");
        Ok(true)
    }

    fn node_ref(&self) -> pb::ObjectRef {
        pb::ObjectRef { kind: "Node".into(), namespace: String::new(), name: self.cfg.name.clone() }
    }

    /// Creates the Node if it does not exist, then reports it Ready.
    pub async fn register(&mut self) -> Result<pb::Object, tonic::Status> {
        let current = match self.client.get(pb::GetRequest { r#ref: Some(self.node_ref()) }).await {
            Ok(n) => n.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
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
                match self.client.create(pb::CreateRequest { object: Some(obj) }).await {
                    Ok(o) => o.into_inner(),
                    Err(s) if s.code() == Code::AlreadyExists => {
                        self.client.get(pb::GetRequest { r#ref: Some(self.node_ref()) }).await?.into_inner()
                    }
                    Err(s) => return Err(s),
                }
            }
            Err(s) => return Err(s),
        };
        self.report_ready(current).await
    }

    async fn report_ready(&mut self, mut obj: pb::Object) -> Result<pb::Object, tonic::Status> {
        // The node certificate's end, for `keelctl cluster certs`.
        let end = pki::validity_of(&self.creds.cert_pem).map(|v| v.1).unwrap_or(0);
        let stamp = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(end.max(0) as u64))
            .to_string();
        if crate::api::object::meta(&obj).and_then(|m| m.annotations.get(CERT_EXPIRES)) != Some(&stamp) {
            let mut annotated = obj.clone();
            if let Some(m) = crate::api::object::meta_mut(&mut annotated) {
                m.annotations.insert(CERT_EXPIRES.to_string(), stamp);
            }
            obj = self.client.update(pb::UpdateRequest { object: Some(annotated) }).await?.into_inner();
        }
        if let Some(pb::object::Kind::Node(n)) = obj.kind.as_mut() {
            let status = n.status.get_or_insert_with(Default::default);
            let t = now();
            let was_ready = status.conditions.iter().any(|c| c.r#type == "Ready" && c.status == "True");
            let transition = status
                .conditions
                .iter()
                .find(|c| c.r#type == "Ready")
                .filter(|_| was_ready)
                .map_or(t.clone(), |c| c.last_transition_time.clone());
            status.conditions.retain(|c| c.r#type != "Ready");
            status.conditions.push(pb::NodeCondition {
                r#type: "Ready".into(),
                status: "True".into(),
                last_heartbeat_time: t,
                last_transition_time: transition,
                reason: "KeelAgentReady".into(),
                message: "keel agent is posting ready status".into(),
            });
            status.addresses = vec![
                pb::NodeAddress { r#type: "InternalIP".into(), address: self.cfg.node_ip.clone() },
                pb::NodeAddress { r#type: "Hostname".into(), address: self.cfg.name.clone() },
            ];
            let info = status.node_info.get_or_insert_with(Default::default);
            info.kubelet_version = format!("keel-{}", env!("CARGO_PKG_VERSION"));
            info.operating_system = "linux".into();
            info.architecture = std::env::consts::ARCH.replace("x86_64", "amd64");
            info.kernel_version =
                std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().into();
        }
        Ok(self.client.update_status(pb::UpdateRequest { object: Some(obj) }).await?.into_inner())
    }

    /// Creates or renews this node's Lease in kube-node-lease.
    pub async fn renew_lease(&mut self) -> Result<(), tonic::Status> {
        let r =
            pb::ObjectRef { kind: "Lease".into(), namespace: NODE_LEASE_NAMESPACE.into(), name: self.cfg.name.clone() };
        let spec = |acquire: String| pb::LeaseSpec {
            holder_identity: Some(self.cfg.name.clone()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            acquire_time: acquire,
            renew_time: now(),
            ..Default::default()
        };
        match self.client.get(pb::GetRequest { r#ref: Some(r.clone()) }).await {
            Ok(o) => {
                let mut o = o.into_inner();
                if let Some(pb::object::Kind::Lease(l)) = o.kind.as_mut() {
                    let acquire = l.spec.as_ref().map(|s| s.acquire_time.clone()).unwrap_or_default();
                    l.spec = Some(spec(acquire));
                }
                self.client.update(pb::UpdateRequest { object: Some(o) }).await?;
            }
            Err(s) if s.code() == Code::NotFound => {
                let lease = pb::Lease {
                    metadata: Some(pb::ObjectMeta {
                        name: self.cfg.name.clone(),
                        namespace: NODE_LEASE_NAMESPACE.into(),
                        ..Default::default()
                    }),
                    spec: Some(spec(now())),
                    ..Default::default()
                };
                let obj = pb::Object { kind: Some(pb::object::Kind::Lease(lease)) };
                self.client.create(pb::CreateRequest { object: Some(obj) }).await?;
            }
            Err(s) => return Err(s),
        }
        Ok(())
    }

    /// Registers, then renews the Lease every 10 s and reports Ready every minute, until
    /// dropped. Errors are logged and retried.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(RENEW_EVERY);
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            if n.is_multiple_of(6) {
                if let Err(s) = self.register().await {
                    tracing::warn!(error = %s, "node status not reported; retrying");
                }
            }
            if let Err(s) = self.renew_lease().await {
                tracing::warn!(error = %s, "lease not renewed; retrying");
            }
            if let Err(e) = self.renew_if_due().await {
                tracing::warn!(error = %e, "node certificate not renewed; retrying");
            }
            n += 1;
        }
    }
}
