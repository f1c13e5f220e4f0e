//! How the client proves who it is, and the TLS channels that carry it: a certificate from the
//! cluster CA (fixed, or renewing while in use), or a bearer token over TLS that trusts the
//! cluster CA. Every Keel port speaks TLS.

use std::sync::Arc;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use super::{ClientConfig, ClientError};
use crate::pki::{Credentials, LiveCredentials};

/// How a client authenticates.
#[derive(Clone, Debug)]
pub enum ClientAuth {
    /// A certificate signed by the cluster CA (users, nodes).
    Certificate(Credentials),
    /// A certificate that renews while in use (a replica's own loops): connections are made
    /// again with the new one after each renewal.
    Live(Arc<LiveCredentials>),
    /// A user's bearer token (`keelctl token create --role user`).
    Bearer { ca_pem: String, token: String },
}

impl ClientAuth {
    pub fn ca_pem(&self) -> String {
        match self {
            ClientAuth::Certificate(c) => c.ca_pem.clone(),
            ClientAuth::Live(l) => l.get().ca_pem,
            ClientAuth::Bearer { ca_pem, .. } => ca_pem.clone(),
        }
    }

    /// Which credentials channels made now would carry; channels made for an older
    /// generation are made again.
    pub(crate) fn generation(&self) -> u64 {
        match self {
            ClientAuth::Live(l) => l.generation(),
            _ => 0,
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

/// `host:port`, also when given as `https://host:port/`.
pub fn bare_addr(addr: &str) -> &str {
    addr.trim_start_matches("https://").trim_end_matches('/')
}

/// An endpoint for the replica at `addr` with TLS for the caller's certificate.
pub fn endpoint(addr: &str, creds: &Credentials) -> Result<Endpoint, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://{}", bare_addr(addr)))?.tls_config(creds.client_tls())
}

/// A lazily connected, authenticated channel to the replica at `addr`.
pub fn auth_channel(addr: &str, auth: &ClientAuth, config: &ClientConfig) -> Result<AuthChannel, ClientError> {
    let bad = |source| ClientError::BadAddress { addr: addr.to_string(), source };
    let (endpoint, header) = match auth {
        ClientAuth::Certificate(c) => (endpoint(addr, c).map_err(bad)?, None),
        ClientAuth::Live(l) => (endpoint(addr, &l.get()).map_err(bad)?, None),
        ClientAuth::Bearer { ca_pem, token } => {
            let e = Endpoint::from_shared(format!("https://{}", bare_addr(addr)))
                .and_then(|e| e.tls_config(crate::pki::anonymous_client_tls(ca_pem)))
                .map_err(bad)?;
            let v = format!("Bearer {token}").parse().map_err(|_| ClientError::BadToken)?;
            (e, Some(v))
        }
    };
    let ch = endpoint
        .connect_timeout(config.connect_timeout)
        .local_address(config.local_address)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(tonic::service::interceptor::InterceptedService::new(ch, AuthHeader(header)))
}
