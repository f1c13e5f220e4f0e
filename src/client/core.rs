//! The failover core every call goes through: one lazily connected channel per replica, the
//! replica that last answered tried first, and [`retry::decide`] after each failure.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use super::auth::{auth_channel, bare_addr, AuthChannel, ClientAuth};
use super::retry::{self, CallKind, Verdict};
use super::ClientError;
use crate::grpc::{delivery, Delivery};

/// Timeouts and retry budget.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How long one attempt may take before its outcome counts as lost.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long to keep going round the replicas while they answer that they cannot serve
    /// yet (no leader, too busy). Replicas that cannot be reached at all end the call after
    /// one round: nothing will change by asking them again at once.
    pub retry_for: Duration,
    /// The local address connections leave from (None: the kernel's choice).
    pub local_address: Option<std::net::IpAddr>,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            retry_for: Duration::from_secs(5),
            local_address: None,
        }
    }
}

impl ClientConfig {
    pub fn with_timeout(request_timeout: Duration) -> ClientConfig {
        ClientConfig { request_timeout, ..ClientConfig::default() }
    }
}

struct Replica {
    addr: String,
    /// The channel and the credentials generation it was made with.
    channel: Mutex<(u64, AuthChannel)>,
}

struct Shared {
    replicas: Vec<Replica>,
    preferred: AtomicUsize,
    auth: ClientAuth,
    config: ClientConfig,
}

/// A client of a set of replicas: the Objects, Cluster and KV APIs, with failover. Cheap to
/// clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    /// Set for a view pinned to one replica: one attempt, no failover.
    only: Option<usize>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("replicas", &self.addrs()).field("only", &self.only).finish()
    }
}

/// The status of an attempt that got no answer in time. Whether its request left this
/// process cannot be told, so it carries its cause as a source: the policy counts it as lost.
fn no_answer(addr: &str, limit: Duration) -> Status {
    let e = std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer from {addr} within {limit:?}"));
    Status::from_error(Box::new(e))
}

impl Client {
    /// A client of the replicas at `addrs` (host:port); connections are made on first use.
    pub fn new(addrs: &[String], auth: ClientAuth, config: ClientConfig) -> Result<Client, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let generation = auth.generation();
        let mut replicas = Vec::new();
        for a in addrs {
            let addr = bare_addr(a).to_string();
            let channel = auth_channel(&addr, &auth, &config)?;
            replicas.push(Replica { addr, channel: Mutex::new((generation, channel)) });
        }
        Ok(Client { shared: Arc::new(Shared { replicas, preferred: AtomicUsize::new(0), auth, config }), only: None })
    }

    /// A client with a certificate and a request timeout (tests, tools).
    pub fn with_certificate(
        addrs: &[String],
        request_timeout: Duration,
        creds: &crate::pki::Credentials,
    ) -> Result<Client, ClientError> {
        Client::new(addrs, ClientAuth::Certificate(creds.clone()), ClientConfig::with_timeout(request_timeout))
    }

    pub fn addrs(&self) -> Vec<String> {
        self.shared.replicas.iter().map(|r| r.addr.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.shared.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.replicas.is_empty()
    }

    pub fn config(&self) -> &ClientConfig {
        &self.shared.config
    }

    /// A view of this client that sends each call once, to replica `i` only.
    pub fn pinned(&self, i: usize) -> Client {
        Client { shared: self.shared.clone(), only: Some(i % self.shared.replicas.len()) }
    }

    /// Prefers replica `i` for the next calls.
    pub fn prefer(&self, i: usize) {
        self.shared.preferred.store(i % self.shared.replicas.len(), Ordering::Relaxed);
    }

    /// Moves away from the replica at `addr` if it is the preferred one (its stream ended,
    /// it looks unwell): the next call starts at the one after it.
    pub fn avoid(&self, addr: &str) {
        let n = self.shared.replicas.len();
        if let Some(i) = self.shared.replicas.iter().position(|r| r.addr == addr) {
            let _ = self.shared.preferred.compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// A request carrying the per-attempt timeout (as gRPC's deadline).
    pub(crate) fn request<M>(&self, msg: M) -> tonic::Request<M> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.shared.config.request_timeout);
        r
    }

    /// The channel to replica `i`, made again if the credentials renewed since.
    pub(crate) fn channel(&self, i: usize) -> Result<AuthChannel, ClientError> {
        let r = &self.shared.replicas[i];
        let generation = self.shared.auth.generation();
        let mut slot = r.channel.lock().unwrap_or_else(|p| p.into_inner());
        if slot.0 != generation {
            *slot = (generation, auth_channel(&r.addr, &self.shared.auth, &self.shared.config)?);
        }
        Ok(slot.1.clone())
    }

    fn order(&self) -> Vec<usize> {
        if let Some(i) = self.only {
            return vec![i];
        }
        let n = self.shared.replicas.len();
        let start = self.shared.preferred.load(Ordering::Relaxed) % n;
        (0..n).map(|k| (start + k) % n).collect()
    }

    /// Runs `f` against the replicas in turn, as the retry policy allows for a call of
    /// `kind`. Returns the answer and the address of the replica that gave it.
    pub(crate) async fn call<T, F, Fut>(&self, kind: CallKind, f: F) -> Result<(T, String), ClientError>
    where
        F: Fn(AuthChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.shared.config.retry_for;
        let mut backoff = Duration::from_millis(50);
        let mut tried = 0;
        loop {
            let mut last: Option<(String, Status)> = None;
            // Whether some replica said "not now" (rather than not answering at all).
            let mut busy = false;
            let mut pushback = Duration::ZERO;
            for i in self.order() {
                let addr = &self.shared.replicas[i].addr;
                // tonic bounds neither a TLS handshake that never finishes (a frozen replica
                // accepts connections) nor waiting for a connection at all: bound the attempt.
                let limit = self.shared.config.request_timeout + self.shared.config.connect_timeout;
                let result = match tokio::time::timeout(limit, f(self.channel(i)?)).await {
                    Ok(r) => r,
                    Err(_) => Err(no_answer(addr, limit)),
                };
                tried += 1;
                let status = match result {
                    Ok(r) => {
                        if self.only.is_none() {
                            self.shared.preferred.store(i, Ordering::Relaxed);
                        }
                        return Ok((r.into_inner(), addr.clone()));
                    }
                    Err(s) => s,
                };
                match retry::decide(kind, &status) {
                    Verdict::Answer => return Err(ClientError::Status { addr: addr.clone(), status }),
                    Verdict::Indeterminate => return Err(ClientError::Indeterminate { addr: addr.clone(), status }),
                    Verdict::Retry => {
                        if delivery(&status) == Delivery::Answered {
                            busy = true;
                            pushback = pushback.max(retry::pushback(&status).unwrap_or_default());
                        }
                        last = Some((addr.clone(), status));
                    }
                }
            }
            let Some((addr, last)) = last else { return Err(ClientError::NoEndpoints) };
            let wait = backoff.max(pushback);
            if self.only.is_some() || !busy || Instant::now() + wait > deadline {
                return Err(ClientError::Unavailable { tried, addr, last });
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}
