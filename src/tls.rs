//! TLS for Keel's ports: a listener whose certificate can be replaced while it serves (a
//! replica's, an agent's), and a client configuration that pins who the server must be.
//!
//! tonic's own TLS fixes the certificate when the server starts; certificates here renew
//! continuously, so connections are accepted with tokio-rustls and a certificate resolver
//! that always hands out the current certificate. Each connection carries its verified
//! client certificate chain as [`PeerInfo`] in every request's extensions.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;

use crate::pki::{Credentials, PkiError};

/// What a connection proved at its handshake.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The client's certificate chain, verified against the cluster CA; None without one.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// Who the client certificate names, read once at the handshake rather than per call.
    pub identity: Option<crate::pki::Identity>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(what: &str, e: impl std::fmt::Display) -> PkiError {
    PkiError::Invalid(format!("{what}: {e}"))
}

/// The server certificate chain (leaf then CA, so a joiner can read the CA) and its key.
fn certified(creds: &Credentials) -> Result<Arc<CertifiedKey>, PkiError> {
    let mut chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(creds.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("certificate", e))?;
    chain.extend(
        CertificateDer::pem_slice_iter(creds.ca_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("CA certificate", e))?,
    );
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).map_err(|e| invalid("private key", e))?;
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider()).map_err(|e| invalid("certificate and key", e))?))
}

/// Hands out the current certificate; [`Resolver::replace`] swaps it for new handshakes.
#[derive(Debug)]
pub struct Resolver(RwLock<Arc<CertifiedKey>>);

impl Resolver {
    pub fn new(creds: &Credentials) -> Result<Arc<Resolver>, PkiError> {
        Ok(Arc::new(Resolver(RwLock::new(certified(creds)?))))
    }

    pub fn replace(&self, creds: &Credentials) -> Result<(), PkiError> {
        let next = certified(creds)?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The rustls configuration of a replica's port: client certificates from the cluster CA
/// are verified when presented, and optional at this layer (a joiner has none; every call
/// but Join then requires one, see `auth`).
pub fn server_config(ca_pem: &str, resolver: Arc<Resolver>) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.map_err(|e| invalid("CA certificate", e))?).map_err(|e| invalid("CA certificate", e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| invalid("client verifier", e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// One accepted TLS connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl TlsConn {
    /// The verified client certificate chain, if the client sent one.
    pub fn peer_certs(&self) -> Option<&Arc<Vec<CertificateDer<'static>>>> {
        self.info.certs.as_ref()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts connections on `listener` and completes their handshakes concurrently (a slow
/// or silent client holds up nobody); the stream ends when the returned task is aborted.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> (ReceiverStream<std::io::Result<TlsConn>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small gRPC frames must not wait for Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
                let certs = stream.get_ref().1.peer_certificates().map(|c| Arc::new(c.to_vec()));
                let identity =
                    certs.as_ref().and_then(|c| c.first()).and_then(|c| crate::pki::Identity::from_cert_der(c));
                let info = PeerInfo { remote: Some(remote), certs, identity };
                let _ = tx.send(Ok(TlsConn { inner: stream, info })).await;
            });
        }
    });
    (ReceiverStream::new(rx), task)
}

/// Accepts a server certificate only when the cluster CA signed it for `keel-server` and it
/// names `expected`: a replica calling node N's agent talks to N and to nobody else, whatever
/// address N's Node object gives.
#[derive(Debug)]
struct Pinned {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    expected: crate::pki::Identity,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from(crate::pki::SERVER_NAME)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        self.inner.verify_server_cert(end_entity, intermediates, &name, ocsp, now)?;
        match crate::pki::Identity::from_cert_der(end_entity) {
            Some(id) if id == self.expected => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => Err(rustls::Error::General(format!("the server is {other:?}, not {:?}", self.expected))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client configuration presenting `creds`, for a server that must be `expected`.
pub fn pinned_client_config(
    creds: &Credentials,
    expected: crate::pki::Identity,
) -> Result<Arc<rustls::ClientConfig>, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(creds.ca_pem.as_bytes()) {
        roots.add(c.map_err(|e| invalid("CA certificate", e))?).map_err(|e| invalid("CA certificate", e))?;
    }
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| invalid("server verifier", e))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(creds.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("certificate", e))?;
    let key = PrivateKeyDer::from_pem_slice(creds.key_pem.as_bytes()).map_err(|e| invalid("private key", e))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS versions", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { inner, expected }))
        .with_client_auth_cert(chain, key)
        .map_err(|e| invalid("client certificate", e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A gRPC channel to `addr` over TLS with `config` (see [`pinned_client_config`]).
pub async fn connect(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<tonic::transport::Channel, String> {
    let target = addr.to_string();
    let connector = tower::service_fn(move |_: http::Uri| {
        let (target, config) = (target.clone(), config.clone());
        async move {
            let tcp = TcpStream::connect(&target).await?;
            let _ = tcp.set_nodelay(true);
            let name =
                rustls::pki_types::ServerName::try_from(crate::pki::SERVER_NAME).map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("{addr}: {e}"))?
        .connect_timeout(timeout);
    tokio::time::timeout(timeout, endpoint.connect_with_connector(connector))
        .await
        .map_err(|_| format!("{addr}: no connection within {timeout:?}"))?
        .map_err(|e| format!("{addr}: {e}"))
}
