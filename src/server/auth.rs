//! Authentication and coarse authorization of every call.
//!
//! TLS proves the peer holds a key certified by the cluster CA; the certificate's subject
//! names its [`Identity`]. Each service is wrapped in an interceptor that refuses a call
//! without an identity (`UNAUTHENTICATED`, before any data is read) or with one the service
//! does not serve (`PERMISSION_DENIED`), and hands the identity on to the handler in the
//! request's extensions. Finer rules (what a node may touch) live in the handlers.

use tonic::{Request, Status};

use crate::pki::Identity;

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

/// The verified identity of the caller, if it presented a client certificate.
pub fn peer_identity<T>(req: &Request<T>) -> Option<Identity> {
    let info = req.extensions().get::<super::tls::PeerInfo>()?;
    Identity::from_cert_der(info.certs.as_ref()?.first()?)
}

/// The identity the interceptor stored for the handler.
pub fn caller<T>(req: &Request<T>) -> Option<&Identity> {
    req.extensions().get::<Identity>()
}

pub fn unauthenticated() -> Status {
    Status::unauthenticated(
        "no valid client certificate: every call needs a certificate signed by this cluster's CA \
         (keelctl reads it from its context; agents and replicas get theirs when they join)",
    )
}

/// An interceptor for `tonic::service::interceptor::InterceptedService`.
pub fn require(allow: Allow) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut req: Request<()>| {
        let id = peer_identity(&req).ok_or_else(unauthenticated)?;
        if !allow.permits(&id) {
            return Err(Status::permission_denied(format!("{id} may not call this service")));
        }
        req.extensions_mut().insert(id);
        Ok(req)
    }
}

/// For services with a call that works before the caller has a certificate (Join): passes
/// the identity on when there is one; the handlers decide.
pub fn optional() -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut req: Request<()>| {
        if let Some(id) = peer_identity(&req) {
            req.extensions_mut().insert(id);
        }
        Ok(req)
    }
}
