//! The cluster's certificate authority, the identities it certifies, and join tokens.
//!
//! Every port speaks TLS with certificates from one cluster CA. An identity is a key pair
//! certified by that CA; the certificate's subject says what the holder is, as Kubernetes
//! spells it:
//!
//! | identity | CN | O |
//! |---|---|---|
//! | replica 3 | `system:keel:replica:3` | `system:keel-replicas` |
//! | node `n1` | `system:node:n1` | `system:nodes` |
//! | admin `alice` | `alice` | `system:masters` |
//!
//! Server certificates name [`SERVER_NAME`] (and loopback) whatever their address, and
//! clients check that name: a replica is who its key says, not where it answers, so a
//! replica that moves to a new address keeps its identity.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, ClientTlsConfig, Identity as TlsIdentity, ServerTlsConfig};

/// The DNS name every server certificate carries and every client verifies.
pub const SERVER_NAME: &str = "keel-server";

const REPLICA_PREFIX: &str = "system:keel:replica:";
const REPLICA_GROUP: &str = "system:keel-replicas";
const NODE_PREFIX: &str = "system:node:";
const NODE_GROUP: &str = "system:nodes";
const ADMIN_GROUP: &str = "system:masters";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Who a certificate's holder is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Replica(u64),
    Node(String),
    Admin(String),
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Replica(id) => write!(f, "replica {id}"),
            Identity::Node(n) => write!(f, "node {n}"),
            Identity::Admin(n) => write!(f, "admin {n}"),
        }
    }
}

impl Identity {
    fn subject(&self) -> (String, &'static str) {
        match self {
            Identity::Replica(id) => (format!("{REPLICA_PREFIX}{id}"), REPLICA_GROUP),
            Identity::Node(n) => (format!("{NODE_PREFIX}{n}"), NODE_GROUP),
            Identity::Admin(n) => (n.clone(), ADMIN_GROUP),
        }
    }

    /// The identity a verified peer certificate (DER) names, if it names one.
    pub fn from_cert_der(der: &[u8]) -> Option<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject();
        let cn = subject.iter_common_name().next()?.as_str().ok()?.to_string();
        let org = subject.iter_organization().next()?.as_str().ok()?.to_string();
        match org.as_str() {
            REPLICA_GROUP => cn.strip_prefix(REPLICA_PREFIX)?.parse().ok().map(Identity::Replica),
            NODE_GROUP => cn.strip_prefix(NODE_PREFIX).filter(|n| !n.is_empty()).map(|n| Identity::Node(n.into())),
            ADMIN_GROUP if !cn.is_empty() => Some(Identity::Admin(cn)),
            _ => None,
        }
    }

    pub fn is_replica(&self) -> bool {
        matches!(self, Identity::Replica(_))
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Identity::Admin(_))
    }
}

/// SHA-256 of a certificate's DER, hex: what a join token pins.
pub fn cert_hash(pem: &str) -> Result<String, PkiError> {
    let der = pem_der(pem)?;
    Ok(hex::encode(Sha256::digest(&der)))
}

/// SHA-256 of a certificate's public key (SubjectPublicKeyInfo), hex: a key's fingerprint,
/// stable across renewals of the certificate.
pub fn key_fingerprint(cert_pem: &str) -> Result<String, PkiError> {
    let der = pem_der(cert_pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Invalid(format!("certificate: {e}")))?;
    Ok(hex::encode(Sha256::digest(cert.public_key().raw)))
}

/// A certificate's validity, as seconds since the Unix epoch (not before, not after).
pub fn validity_of(cert_pem: &str) -> Result<(i64, i64), PkiError> {
    let der = pem_der(cert_pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Invalid(format!("certificate: {e}")))?;
    Ok((cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp()))
}

/// When a certificate expires, as seconds since the Unix epoch.
pub fn not_after(cert_pem: &str) -> Result<i64, PkiError> {
    let der = pem_der(cert_pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Invalid(format!("certificate: {e}")))?;
    Ok(cert.validity().not_after.timestamp())
}

fn pem_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    let block = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| PkiError::Invalid(format!("not a PEM certificate: {e}")))?
        .1;
    Ok(block.contents)
}

/// The cluster CA: a certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that disagree by a few seconds.
    params.not_before = now - time::Duration::seconds(60);
    params.not_after = now + time::Duration::seconds(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2));
}

impl Ca {
    /// A new CA, valid for ten years.
    pub fn generate(cluster_id: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("keel-ca@{cluster_id}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, Duration::from_secs(10 * 365 * 24 * 3600));
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    pub fn hash(&self) -> Result<String, PkiError> {
        cert_hash(&self.cert_pem)
    }

    fn params(identity: &Identity, lifetime: Duration, addresses: &[String]) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let (cn, org) = identity.subject();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, org);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if !matches!(identity, Identity::Admin(_)) {
            // Replicas and nodes also serve.
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
            let mut sans = vec![SanType::DnsName(SERVER_NAME.try_into()?), SanType::DnsName("localhost".try_into()?)];
            sans.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
            for a in addresses {
                let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h).trim_matches(['[', ']']);
                match host.parse::<std::net::IpAddr>() {
                    Ok(ip) if !ip.is_loopback() => sans.push(SanType::IpAddress(ip)),
                    Ok(_) => {}
                    Err(_) if !host.is_empty() && host != "localhost" => sans.push(SanType::DnsName(host.try_into()?)),
                    Err(_) => {}
                }
            }
            params.subject_alt_names = sans;
        }
        validity(&mut params, lifetime);
        Ok(params)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, key)?)
    }

    /// A new key pair and its certificate for `identity`.
    pub fn issue(
        &self,
        identity: &Identity,
        lifetime: Duration,
        addresses: &[String],
    ) -> Result<Credentials, PkiError> {
        let key = KeyPair::generate()?;
        let cert = Self::params(identity, lifetime, addresses)?.signed_by(&key, &self.issuer()?)?;
        Ok(Credentials { ca_pem: self.cert_pem.clone(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A new certificate for the key `creds` already hold (renewal: the key, and so the
    /// identity's fingerprint, stay the same).
    pub fn renew(
        &self,
        creds: &Credentials,
        identity: &Identity,
        lifetime: Duration,
        addresses: &[String],
    ) -> Result<Credentials, PkiError> {
        let key = KeyPair::from_pem(&creds.key_pem)?;
        let cert = Self::params(identity, lifetime, addresses)?.signed_by(&key, &self.issuer()?)?;
        Ok(Credentials { ca_pem: self.cert_pem.clone(), cert_pem: cert.pem(), key_pem: creds.key_pem.clone() })
    }

    /// Certifies the key of a signing request (PEM) as `identity`; the request's own subject
    /// and extensions are ignored.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        identity: &Identity,
        lifetime: Duration,
        addresses: &[String],
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("certificate signing request: {e}")))?;
        let cert = Self::params(identity, lifetime, addresses)?.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(cert.pem())
    }
}

/// A new key pair and a signing request for it: what a joiner sends instead of a key.
pub fn new_request() -> Result<(KeyPair, String), PkiError> {
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(Vec::<String>::new())?;
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// A signing request for a key already held (PEM), to renew its certificate.
pub fn request_for(key_pem: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem)?;
    Ok(CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?.pem()?)
}

/// The fingerprint of the key in a signing request.
pub fn request_fingerprint(csr_pem: &str) -> Result<String, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::Invalid(format!("certificate signing request: {e}")))?;
    Ok(hex::encode(Sha256::digest(csr.public_key.subject_public_key_info())))
}

/// What a TLS party holds: the CA to trust, its certificate and its key (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.display().to_string(), source })
}

/// Writes through a temporary file and a rename, so a crash never leaves half a key.
pub fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io { path: path.display().to_string(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl Credentials {
    /// The certificate's identity.
    pub fn identity(&self) -> Option<Identity> {
        Identity::from_cert_der(&pem_der(&self.cert_pem).ok()?)
    }

    /// Reads `ca.crt`, `tls.crt` and `tls.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Credentials, PkiError> {
        Ok(Credentials {
            ca_pem: read(&dir.join("ca.crt"))?,
            cert_pem: read(&dir.join("tls.crt"))?,
            key_pem: read(&dir.join("tls.key"))?,
        })
    }

    pub fn exists(dir: &Path) -> bool {
        dir.join("tls.key").exists()
    }

    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        write_private(&dir.join("ca.crt"), &self.ca_pem)?;
        write_private(&dir.join("tls.crt"), &self.cert_pem)?;
        write_private(&dir.join("tls.key"), &self.key_pem)
    }

    /// TLS for a client of any replica: trust the cluster CA, present this certificate.
    pub fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(TlsIdentity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(SERVER_NAME)
    }

    /// TLS for a replica's port. A client certificate is optional at the TLS layer, since a
    /// joiner has none yet; every call but Join then requires one (see `server::auth`).
    pub fn server_tls(&self) -> ServerTlsConfig {
        // The chain ends with the CA, so that a joiner can read it and check it against the
        // hash its token pins (see `client::join`).
        let chain = format!("{}\n{}", self.cert_pem.trim_end(), self.ca_pem);
        ServerTlsConfig::new()
            .identity(TlsIdentity::from_pem(chain, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true)
    }
}

/// Credentials that renew while they are in use: readers take a copy of the current ones.
/// The generation rises with every change, so that a holder of connections made with older
/// credentials knows to make new ones.
#[derive(Debug)]
pub struct LiveCredentials {
    current: std::sync::RwLock<Credentials>,
    generation: std::sync::atomic::AtomicU64,
}

impl LiveCredentials {
    pub fn new(creds: Credentials) -> std::sync::Arc<LiveCredentials> {
        std::sync::Arc::new(LiveCredentials {
            current: std::sync::RwLock::new(creds),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn get(&self) -> Credentials {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, creds: Credentials) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = creds;
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// TLS for a client that has no certificate yet (a joiner): trust only `ca_pem`.
pub fn anonymous_client_tls(ca_pem: &str) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name(SERVER_NAME)
}

/// What a join token lets its holder become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRole {
    Server,
    Agent,
}

impl fmt::Display for TokenRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenRole::Server => "server",
            TokenRole::Agent => "agent",
        })
    }
}

impl FromStr for TokenRole {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<TokenRole, PkiError> {
        match s {
            "server" => Ok(TokenRole::Server),
            "agent" => Ok(TokenRole::Agent),
            other => Err(PkiError::Invalid(format!("token role {other:?}: expected \"server\" or \"agent\""))),
        }
    }
}

/// `K1<sha256 of the CA certificate>::<role>::<id>.<secret>`. The id names the token (for
/// list and revoke); only a hash of the secret is stored.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_hash: String,
    pub role: TokenRole,
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "K1{}::{}::{}.<secret>", self.ca_hash, self.role, self.id)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "K1{}::{}::{}.{}", self.ca_hash, self.role, self.id, self.secret)
    }
}

fn random_chars(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; n];
    rand::fill(&mut bytes[..]);
    bytes.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect()
}

impl JoinToken {
    pub fn generate(ca_hash: &str, role: TokenRole) -> JoinToken {
        JoinToken { ca_hash: ca_hash.to_string(), role, id: random_chars(6), secret: random_chars(32) }
    }

    /// The stored form of the secret.
    pub fn secret_hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }
}

impl FromStr for JoinToken {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<JoinToken, PkiError> {
        let bad = |why: &str| {
            PkiError::Invalid(format!("malformed join token ({why}); expected K1<ca-hash>::<role>::<id>.<secret>"))
        };
        let rest = s.trim().strip_prefix("K1").ok_or_else(|| bad("no K1 prefix"))?;
        let mut parts = rest.split("::");
        let (Some(hash), Some(role), Some(cred), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("wrong number of :: separated parts"));
        };
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("the CA hash is not 64 hex digits"));
        }
        let (id, secret) = cred.split_once('.').ok_or_else(|| bad("no id.secret"))?;
        if id.is_empty() || secret.is_empty() {
            return Err(bad("empty id or secret"));
        }
        Ok(JoinToken { ca_hash: hash.to_ascii_lowercase(), role: role.parse()?, id: id.into(), secret: secret.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_certificates_and_requests() {
        let ca = Ca::generate("test").unwrap();
        for id in [Identity::Replica(3), Identity::Node("n1".into()), Identity::Admin("alice".into())] {
            let creds = ca.issue(&id, Duration::from_secs(3600), &["10.1.2.3:7001".into()]).unwrap();
            assert_eq!(creds.identity(), Some(id.clone()));
        }
        let (key, csr) = new_request().unwrap();
        let cert = ca.sign_request(&csr, &Identity::Node("n2".into()), Duration::from_secs(60), &[]).unwrap();
        let creds = Credentials { ca_pem: ca.cert_pem.clone(), cert_pem: cert.clone(), key_pem: key.serialize_pem() };
        assert_eq!(creds.identity(), Some(Identity::Node("n2".into())));
        assert_eq!(key_fingerprint(&cert).unwrap(), request_fingerprint(&csr).unwrap());
        let left = not_after(&cert).unwrap() - time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((50..=61).contains(&left), "{left}");
        // Another CA's hash differs.
        assert_ne!(ca.hash().unwrap(), Ca::generate("other").unwrap().hash().unwrap());
    }

    #[test]
    fn tokens_parse_and_print() {
        let t = JoinToken::generate(&"ab".repeat(32), TokenRole::Agent);
        let s = t.to_string();
        assert!(s.starts_with(&format!("K1{}::agent::", "ab".repeat(32))));
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        assert!(!format!("{t:?}").contains(&t.secret));
        for bad in [
            "",
            "K1abc::server::a.b",
            &format!("K1{}::root::a.b", "0".repeat(64)),
            &format!("K1{}::server::ab", "0".repeat(64)),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
    }
}
