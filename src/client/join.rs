//! The joiner's side of a join (replicas and agents alike): check the server's CA against the
//! token, send a signing request with the token, keep the certificate.
//!
//! The token is sent only to a server whose CA hashes to the token's pin: the joiner first
//! completes a TLS handshake that accepts any certificate chain just to read the CA the
//! server presents, compares its SHA-256 with the token, and only then connects again
//! verifying the server against that CA and sends the token. A server of another cluster
//! (or anyone in the middle) gets nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::Code;

use crate::pki::{self, Credentials, JoinToken, TokenRole};
use crate::proto::v1 as pb;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Token(#[from] pki::PkiError),
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error(
        "the server at {addr} presents a CA whose SHA-256 is {got}, but the token pins {want}: it is not the cluster \
         the token is for (or someone is in between); the token was not sent"
    )]
    WrongCa { addr: String, got: String, want: String },
    #[error("the server at {addr} refused the join: {message}")]
    Refused { addr: String, code: Code, message: String },
}

/// Records the chain a server presents, and checks only that it holds the leaf's key.
#[derive(Debug)]
struct Capture {
    chain: Arc<Mutex<Vec<Vec<u8>>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Capture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = self.chain.lock().unwrap_or_else(|p| p.into_inner());
        chain.push(end_entity.to_vec());
        chain.extend(intermediates.iter().map(|c| c.to_vec()));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The CA certificate (PEM) the server at `addr` presents: the last certificate of its chain.
pub async fn presented_ca(addr: &str) -> Result<String, JoinError> {
    let unreachable = |reason: String| JoinError::Unreachable { addr: addr.to_string(), reason };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = Arc::new(Mutex::new(Vec::new()));
    let verifier = Capture { chain: chain.clone(), provider: provider.clone() };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| unreachable(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let name = ServerName::try_from(pki::SERVER_NAME).map_err(|e| unreachable(e.to_string()))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| unreachable(format!("TLS handshake: {e}")))?;
    let chain = chain.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let ca = chain.last().ok_or_else(|| unreachable("the server presented no certificate".into()))?;
    Ok(der_to_pem(ca))
}

/// Joins the cluster at `addr` (host:port, or https://host:port) as `name`. Returns the new
/// credentials (the key was made here and never sent) and the server's answer.
pub async fn join(
    addr: &str,
    token: &str,
    role: TokenRole,
    name: &str,
    advertise: &str,
) -> Result<(Credentials, pb::JoinResponse), JoinError> {
    join_with_key(addr, token, role, name, advertise, None).await
}

/// As [`join`], for the key in `key_pem` when given (re-attesting keeps the identity's key),
/// else a new one.
pub async fn join_with_key(
    addr: &str,
    token: &str,
    role: TokenRole,
    name: &str,
    advertise: &str,
    key_pem: Option<&str>,
) -> Result<(Credentials, pb::JoinResponse), JoinError> {
    let addr = super::auth::bare_addr(addr);
    let token: JoinToken = token.parse()?;
    let ca_pem = presented_ca(addr).await?;
    let got = pki::cert_hash(&ca_pem)?;
    if got != token.ca_hash {
        return Err(JoinError::WrongCa { addr: addr.to_string(), got, want: token.ca_hash });
    }
    let (key_pem, csr) = match key_pem {
        Some(k) => (k.to_string(), pki::request_for(k)?),
        None => {
            let (key, csr) = pki::new_request()?;
            (key.serialize_pem(), csr)
        }
    };
    let unreachable = |reason: String| JoinError::Unreachable { addr: addr.to_string(), reason };
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| unreachable(e.to_string()))?
        .tls_config(pki::anonymous_client_tls(&ca_pem))
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let req = pb::JoinRequest {
        token: token.to_string(),
        role: role.to_string(),
        name: name.to_string(),
        csr_pem: csr,
        advertise: advertise.to_string(),
    };
    let resp = pb::cluster_client::ClusterClient::new(ch).join(req).await.map_err(|s| JoinError::Refused {
        addr: addr.to_string(),
        code: s.code(),
        message: s.message().to_string(),
    })?;
    let resp = resp.into_inner();
    let creds = Credentials { ca_pem: resp.ca_pem.clone(), cert_pem: resp.certificate_pem.clone(), key_pem };
    Ok((creds, resp))
}
