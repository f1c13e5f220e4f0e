//! Authentication and coarse authorization of every call.
//!
//! TLS proves the peer holds a key certified by the cluster CA; the certificate's subject
//! names its [`Identity`]. Each service is wrapped in an interceptor that refuses a call
//! without an identity (`UNAUTHENTICATED`, before any data is read) or with one the service
//! does not serve (`PERMISSION_DENIED`), and hands the identity on to the handler in the
//! request's extensions. Finer rules (what a node may touch) live in the handlers.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::{Request, Status};

use super::cluster_state::{self as state, TokenRecord};
use crate::pki::Identity;
use crate::proto::v1 as pb;

/// Users' bearer tokens, as this replica last read them from its store (every second, so a
/// revoked token stops working within about a second on every replica).
#[derive(Default)]
pub struct UserTokens(RwLock<HashMap<String, TokenRecord>>);

impl UserTokens {
    /// The user a bearer token (`<id>.<secret>`) authenticates, if it is valid.
    pub fn lookup(&self, bearer: &str) -> Option<Identity> {
        let (id, secret) = bearer.split_once('.')?;
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        let t = map.get(id)?;
        if t.expired() {
            return None;
        }
        use sha2::Digest;
        let given = hex::encode(sha2::Sha256::digest(secret.as_bytes()));
        // Every user is an administrator: there is no finer authorization of users yet.
        t.secret_matches(&given).then(|| Identity::Admin(t.user.clone()))
    }

    /// Re-reads the tokens from the local store every second, until dropped.
    pub async fn refresh(self: Arc<Self>, store: crate::store::Store) {
        let prefix = state::USER_TOKENS;
        loop {
            let req = pb::RangeRequest { serializable: true, ..crate::store::prefix_request(prefix) };
            if let Ok(r) = store.range(req).await {
                let map = r
                    .kvs
                    .iter()
                    .filter_map(|kv| {
                        let t = state::decode(&kv.key, &kv.value).ok()?;
                        Some((String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned(), t))
                    })
                    .collect();
                *self.0.write().unwrap_or_else(|p| p.into_inner()) = map;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Which identities may call a service.
#[derive(Clone, Copy, Debug)]
pub enum Allow {
    /// Replica-to-replica traffic (Raft).
    Replicas,
    /// The store's internal APIs: replicas and admins.
    ReplicasAndAdmins,
    /// Any identity the cluster CA certified (the Objects API; handlers authorize further).
    Anyone,
}

impl Allow {
    fn permits(self, id: &Identity) -> bool {
        match self {
            Allow::Replicas => id.is_replica(),
            Allow::ReplicasAndAdmins => id.is_replica() || id.is_admin(),
            Allow::Anyone => true,
        }
    }
}

/// The verified identity of the caller: its client certificate, else its bearer token.
pub fn peer_identity<T>(req: &Request<T>, tokens: &UserTokens) -> Option<Identity> {
    if let Some(id) = req.extensions().get::<crate::tls::PeerInfo>().and_then(|i| i.identity.clone()) {
        return Some(id);
    }
    let header = req.metadata().get("authorization")?.to_str().ok()?;
    tokens.lookup(header.strip_prefix("Bearer ")?.trim())
}

/// The identity the interceptor stored for the handler.
pub fn caller<T>(req: &Request<T>) -> Option<&Identity> {
    req.extensions().get::<Identity>()
}

pub fn unauthenticated() -> Status {
    Status::unauthenticated(
        "no valid credentials: every call needs a certificate signed by this cluster's CA or a valid bearer \
         token (keelctl reads them from its context; agents and replicas get certificates when they join)",
    )
}

/// An interceptor for `tonic::service::interceptor::InterceptedService`.
pub fn require(
    allow: Allow,
    tokens: Arc<UserTokens>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut req: Request<()>| {
        let id = peer_identity(&req, &tokens).ok_or_else(unauthenticated)?;
        if !allow.permits(&id) {
            return Err(Status::permission_denied(format!("{id} may not call this service")));
        }
        req.extensions_mut().insert(id);
        Ok(req)
    }
}

/// For services with a call that works before the caller has a certificate (Join): passes
/// the identity on when there is one; the handlers decide.
pub fn optional(
    tokens: Arc<UserTokens>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut req: Request<()>| {
        if let Some(id) = peer_identity(&req, &tokens) {
            req.extensions_mut().insert(id);
        }
        Ok(req)
    }
}
