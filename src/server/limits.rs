//! Bounds on what one replica takes on at once, as kube-apiserver's max-requests-inflight
//! does: past the bound a request is refused at once with RESOURCE_EXHAUSTED and a retry
//! hint (gRPC's `grpc-retry-pushback-ms`), instead of joining a queue that grows without
//! limit. Clients may send a refused request elsewhere or later: it was never read.
//!
//! - A replica holds at most `max_inflight` requests; one caller (a certificate's identity or
//!   a bearer token) at most `max_inflight_per_caller` of them, so that one busy client
//!   cannot take every slot from the others.
//! - Replication, forwarding between replicas, health and reflection are never refused:
//!   the cluster must keep working while clients are turned away.
//! - Watches hold no slot (a slot is held until the response starts); each caller may have
//!   at most `max_watches_per_caller` open at once.
//!
//! The limits are a tower layer, the request deadline is tower's timeout (tonic's
//! `Server::timeout`), both in front of every service.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::client::retry::PUSHBACK;

/// How long a refused caller is asked to wait before it tries again.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// Paths never refused: replica-to-replica traffic and probes.
const EXEMPT: &[&str] = &[
    "/keel.v1.Raft/",
    "/keel.v1.Kv/ForwardTxns",
    "/keel.v1.Kv/ReadIndex",
    "/keel.v1.StoreAdmin/",
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
];

#[derive(Debug)]
struct Limits {
    max: usize,
    per_caller: usize,
    global: Arc<Semaphore>,
    callers: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// The in-flight limit as a tower layer, shared by every connection of a replica.
#[derive(Clone, Debug)]
pub struct InflightLayer {
    limits: Arc<Limits>,
}

impl InflightLayer {
    pub fn new(max: usize, per_caller: usize) -> InflightLayer {
        let max = max.max(1);
        InflightLayer {
            limits: Arc::new(Limits {
                max,
                per_caller: per_caller.clamp(1, max),
                global: Arc::new(Semaphore::new(max)),
                callers: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl<S> tower::Layer<S> for InflightLayer {
    type Service = Inflight<S>;

    fn layer(&self, inner: S) -> Inflight<S> {
        Inflight { inner, limits: self.limits.clone() }
    }
}

#[derive(Clone, Debug)]
pub struct Inflight<S> {
    inner: S,
    limits: Arc<Limits>,
}

/// Who is calling, as far as the connection and headers say before authentication: the
/// certificate's identity, a bearer token's id, or the peer address.
fn caller_of<B>(req: &http::Request<B>) -> String {
    let peer = req.extensions().get::<crate::tls::PeerInfo>();
    if let Some(id) = peer.and_then(|p| p.identity.as_ref()) {
        return id.to_string();
    }
    if let Some(token) = req.headers().get("authorization").and_then(|v| v.to_str().ok()) {
        let id = token.trim_start_matches("Bearer ").split('.').next().unwrap_or_default();
        return format!("token:{id}");
    }
    format!("anonymous:{:?}", peer.and_then(|p| p.remote).map(|a| a.ip()))
}

fn refused(what: String) -> Status {
    let mut s = Status::resource_exhausted(format!("{what}; retry in {} ms", RETRY_AFTER.as_millis()));
    if let Ok(v) = RETRY_AFTER.as_millis().to_string().parse() {
        s.metadata_mut().insert(PUSHBACK, v);
    }
    s
}

impl Limits {
    /// A slot for `caller`, or the refusal.
    fn admit(&self, caller: &str) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), Status> {
        let mine = {
            let mut callers = self.callers.lock().unwrap_or_else(|p| p.into_inner());
            // Forget callers with nothing in flight, so the map stays small.
            if callers.len() > 1024 {
                callers.retain(|_, s| s.available_permits() < self.per_caller);
            }
            callers.entry(caller.to_string()).or_insert_with(|| Arc::new(Semaphore::new(self.per_caller))).clone()
        };
        let mine = mine.try_acquire_owned().map_err(|_| {
            metrics::counter!("keel_requests_refused_total", "why" => "caller").increment(1);
            refused(format!("too many requests in flight from {caller} on this replica (limit {})", self.per_caller))
        })?;
        let global = self.global.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("keel_requests_refused_total", "why" => "replica").increment(1);
            refused(format!("too many requests in flight on this replica (limit {})", self.max))
        })?;
        Ok((global, mine))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower::Service<http::Request<B>> for Inflight<S>
where
    S: tower::Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The clone that was made ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if EXEMPT.iter().any(|p| req.uri().path().starts_with(p)) {
            let fut = inner.call(req);
            return Box::pin(async move { fut.await.map_err(Into::into) });
        }
        let permits = match self.limits.admit(&caller_of(&req)) {
            Ok(p) => p,
            Err(status) => return Box::pin(async move { Err(Box::new(status) as BoxError) }),
        };
        let fut = inner.call(req);
        Box::pin(async move {
            let r = fut.await.map_err(Into::into);
            drop(permits);
            r
        })
    }
}

/// Open watches per caller.
#[derive(Debug)]
pub struct WatchBudget {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One open watch; it gives its place back when dropped (the stream ended).
#[derive(Debug)]
pub struct WatchSlot {
    budget: Arc<WatchBudget>,
    caller: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.budget.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

impl WatchBudget {
    pub fn new(max: usize) -> Arc<WatchBudget> {
        Arc::new(WatchBudget { max: max.max(1), open: Mutex::new(HashMap::new()) })
    }

    /// A place for one more watch of `caller`, or why not.
    pub fn open(self: &Arc<Self>, caller: &str) -> Result<WatchSlot, Status> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(caller.to_string()).or_insert(0);
        if *n >= self.max {
            return Err(Status::resource_exhausted(format!(
                "{caller} has {} watches open on this replica, the most one client may have; close some first",
                self.max
            )));
        }
        *n += 1;
        Ok(WatchSlot { budget: self.clone(), caller: caller.to_string() })
    }

    pub fn open_for(&self, caller: &str) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(caller).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_past_its_share_is_refused_with_a_pushback_and_others_still_get_in() {
        let l = InflightLayer::new(4, 2).limits;
        let a1 = l.admit("a").unwrap();
        let _a2 = l.admit("a").unwrap();
        let e = l.admit("a").unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("from a on this replica (limit 2)"), "{}", e.message());
        assert_eq!(crate::client::retry::pushback(&e), Some(RETRY_AFTER));
        let _b1 = l.admit("b").unwrap();
        let _b2 = l.admit("b").unwrap();
        let e = l.admit("c").unwrap_err();
        assert!(e.message().contains("on this replica (limit 4)"), "{}", e.message());
        drop(a1);
        assert!(l.admit("c").is_ok(), "a slot given back is free again");
    }

    #[test]
    fn watches_are_counted_per_caller_until_their_streams_end() {
        let b = WatchBudget::new(2);
        let w1 = b.open("a").unwrap();
        let _w2 = b.open("a").unwrap();
        let e = b.open("a").unwrap_err();
        assert!(e.message().contains("has 2 watches open"), "{}", e.message());
        assert_eq!(crate::client::retry::pushback(&e), None, "not to be retried blindly");
        assert!(b.open("b").is_ok());
        drop(w1);
        assert_eq!(b.open_for("a"), 1);
        assert!(b.open("a").is_ok());
    }
}
