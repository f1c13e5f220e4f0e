//! A client for a set of replicas that fails over between them. It only speaks gRPC: nothing
//! here reaches into the store.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::pki::Credentials;
use crate::proto::v1 as pb;

/// An endpoint for the replica at `addr` (host:port): TLS with the cluster CA and the
/// caller's certificate. Every Keel port speaks TLS.
pub fn endpoint(addr: &str, creds: &Credentials) -> Result<Endpoint, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://{addr}"))?.tls_config(creds.client_tls())
}

/// How a client proves who it is: a certificate from the cluster CA, or a bearer token
/// (`keelctl token create --role user`) over TLS that trusts the cluster CA.
#[derive(Clone, Debug)]
pub enum ClientAuth {
    Certificate(Credentials),
    Bearer { ca_pem: String, token: String },
}

impl ClientAuth {
    pub fn ca_pem(&self) -> &str {
        match self {
            ClientAuth::Certificate(c) => &c.ca_pem,
            ClientAuth::Bearer { ca_pem, .. } => ca_pem,
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call when the client uses a token.
#[derive(Clone)]
pub struct AuthHeader(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for AuthHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that authenticates as `ClientAuth` says.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<Channel, AuthHeader>;

/// A lazily connected, authenticated channel to the replica at `addr`.
pub fn auth_channel(addr: &str, auth: &ClientAuth, connect_timeout: Duration) -> Result<AuthChannel, ClientError> {
    let bad = |source| ClientError::BadAddress { addr: addr.to_string(), source };
    let (endpoint, header) = match auth {
        ClientAuth::Certificate(c) => (endpoint(addr, c).map_err(bad)?, None),
        ClientAuth::Bearer { ca_pem, token } => {
            let e = Endpoint::from_shared(format!("https://{addr}"))
                .and_then(|e| e.tls_config(crate::pki::anonymous_client_tls(ca_pem)))
                .map_err(bad)?;
            let v = format!("Bearer {token}").parse().map_err(|_| ClientError::BadToken)?;
            (e, Some(v))
        }
    };
    let ch = endpoint.connect_timeout(connect_timeout).tcp_nodelay(true).connect_lazy();
    Ok(tonic::service::interceptor::InterceptedService::new(ch, AuthHeader(header)))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no replica address given")]
    NoEndpoints,
    #[error("invalid replica address {addr:?}: {source}")]
    BadAddress {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{addr}: {status}")]
    Rpc { addr: String, status: Status },
    #[error("the bearer token holds characters that cannot go in a header")]
    BadToken,
}

impl ClientError {
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// What a failed call tells about whether its request took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The server answered with this status: its code is the server's word (for Keel,
    /// UNAVAILABLE promises that a write was never proposed).
    Answered,
    /// No connection could be made: the request never left this process.
    NotSent,
    /// The connection failed or timed out after the request may have been sent: a write may
    /// or may not have been applied.
    Lost,
}

/// Tells a status the server sent from one tonic made up for a transport failure. Tonic
/// reports both as UNAVAILABLE (or UNKNOWN), but only the first says anything about the
/// request; a status made from a transport error carries that error as its source.
pub fn delivery(status: &Status) -> Delivery {
    let mut source = std::error::Error::source(status);
    if source.is_none() {
        return Delivery::Answered;
    }
    while let Some(e) = source {
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            return Delivery::NotSent;
        }
        source = e.source();
    }
    Delivery::Lost
}

/// Whether trying another replica may help.
fn fail_over(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled)
}

/// Talks to the internal KV API of a set of replicas.
pub struct KvClient {
    endpoints: Vec<(String, AuthChannel)>,
    preferred: AtomicUsize,
    timeout: Duration,
}

impl KvClient {
    /// `addrs` are host:port. Connections are made on first use.
    pub fn new(addrs: &[String], timeout: Duration, creds: &Credentials) -> Result<KvClient, ClientError> {
        KvClient::with_auth(addrs, timeout, &ClientAuth::Certificate(creds.clone()))
    }

    pub fn with_auth(addrs: &[String], timeout: Duration, auth: &ClientAuth) -> Result<KvClient, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let mut endpoints = Vec::new();
        for addr in addrs {
            endpoints.push((addr.clone(), auth_channel(addr, auth, Duration::from_millis(500))?));
        }
        Ok(KvClient { endpoints, preferred: AtomicUsize::new(0), timeout })
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        self.endpoints.iter().map(|(a, _)| a.as_str())
    }

    /// Prefers replica `i` (mod the number of replicas) for the next calls.
    pub fn prefer(&self, i: usize) {
        self.preferred.store(i % self.endpoints.len(), Ordering::Relaxed);
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    /// Calls `f` on the preferred replica, then on the others while the failure is one that
    /// another replica may not have. A write retried this way may apply twice; Keel's writers
    /// make writes idempotent with compares on mod_revision.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(pb::kv_client::KvClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let (addr, ch) = &self.endpoints[idx];
            match f(pb::kv_client::KvClient::new(ch.clone())).await {
                Ok(r) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Err(status) if fail_over(&status) => last = Some(ClientError::Rpc { addr: addr.clone(), status }),
                Err(status) => return Err(ClientError::Rpc { addr: addr.clone(), status }),
            }
        }
        Err(last.unwrap_or(ClientError::NoEndpoints))
    }

    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<pb::PutResponse, ClientError> {
        let req = pb::PutRequest { key: key.into(), value: value.into(), prev_kv: false };
        self.call(|mut c| {
            let r = self.request(req.clone());
            async move { c.put(r).await }
        })
        .await
    }

    pub async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, ClientError> {
        self.call(|mut c| {
            let r = self.request(req.clone());
            async move { c.txn(r).await }
        })
        .await
    }

    pub async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, ClientError> {
        self.call(|mut c| {
            let r = self.request(req.clone());
            async move { c.range(r).await }
        })
        .await
    }

    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<pb::KeyValue>, ClientError> {
        let r = self.range(pb::RangeRequest { key: key.into(), ..Default::default() }).await?;
        Ok(r.kvs.into_iter().next())
    }

    /// Opens a watch on one replica (the preferred one, then the others).
    pub async fn watch(&self, req: pb::WatchRequest) -> Result<tonic::Streaming<pb::WatchResponse>, ClientError> {
        self.call(|mut c| {
            let r = tonic::Request::new(req.clone());
            async move { c.watch(r).await }
        })
        .await
    }

    /// The status of replica `i`, without failover.
    pub async fn status_of(&self, i: usize) -> Result<pb::StoreStatusResponse, ClientError> {
        let (addr, ch) = &self.endpoints[i % self.endpoints.len()];
        pb::store_admin_client::StoreAdminClient::new(ch.clone())
            .status(self.request(pb::StoreStatusRequest {}))
            .await
            .map(|r| r.into_inner())
            .map_err(|status| ClientError::Rpc { addr: addr.clone(), status })
    }
}

#[cfg(test)]
mod delivery_tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_never_sent_the_request() {
        let port = crate::harness::free_port().unwrap();
        let ch = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy();
        let err = pb::kv_client::KvClient::new(ch).range(pb::RangeRequest::default()).await.unwrap_err();
        assert_eq!(delivery(&err), Delivery::NotSent, "{err:?}");
        assert_eq!(delivery(&Status::unavailable("no leader")), Delivery::Answered);
    }

    #[tokio::test]
    async fn a_timeout_or_a_dropped_connection_may_have_delivered_it() {
        // A listener that accepts and never answers: the request is sent, no answer comes.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let ch = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        let mut req = tonic::Request::new(pb::RangeRequest::default());
        req.set_timeout(Duration::from_millis(200));
        let err = pb::kv_client::KvClient::new(ch).range(req).await.unwrap_err();
        assert_eq!(delivery(&err), Delivery::Lost, "{err:?}");
        drop(l);
    }
}
