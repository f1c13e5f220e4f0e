//! What a replica needs on disk before it can serve: its certificate, and for the first
//! replica of a cluster (`--cluster-init`, or a plain `keel server` on an empty data
//! directory) a new CA and an admin credential.
//!
//! Layout under the data directory:
//!
//! ```text
//! tls/ca.crt  tls/tls.crt  tls/tls.key   this replica's credentials (keys 0600)
//! tls/ca.key                              the cluster CA's key (replicas sign joins)
//! cluster-id
//! admin.yaml                              a keelctl configuration for the admin
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::config::{Config, Context};
use crate::pki::{write_private, Ca, Credentials, Identity, PkiError};

/// Lifetime of the admin's certificate and, until renewal lands, of replica certificates.
pub const CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

pub fn admin_config_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.yaml")
}

/// The CA of this replica's cluster, when this replica holds its key.
pub fn load_ca(data_dir: &Path) -> Option<Ca> {
    let dir = tls_dir(data_dir);
    Some(Ca {
        cert_pem: std::fs::read_to_string(dir.join("ca.crt")).ok()?,
        key_pem: std::fs::read_to_string(dir.join("ca.key")).ok()?,
    })
}

pub fn save_ca(data_dir: &Path, ca: &Ca) -> Result<(), PkiError> {
    let dir = tls_dir(data_dir);
    write_private(&dir.join("ca.key"), &ca.key_pem)?;
    write_private(&dir.join("ca.crt"), &ca.cert_pem)
}

/// Creates a new cluster's CA, this replica's certificate and the admin's configuration.
/// Returns the replica's credentials and the CA.
pub fn init_cluster(
    data_dir: &Path,
    id: u64,
    advertise: &str,
    lifetime: Duration,
) -> Result<(Credentials, Ca), PkiError> {
    let cluster_id = uuid::Uuid::new_v4().to_string();
    let ca = Ca::generate(&cluster_id)?;
    let creds = ca.issue(&Identity::Replica(id), lifetime, &[advertise.to_string()])?;
    let admin = ca.issue(&Identity::Admin("admin".into()), CERT_LIFETIME, &[])?;
    save_ca(data_dir, &ca)?;
    creds.save(&tls_dir(data_dir))?;
    write_private(&data_dir.join("cluster-id"), &cluster_id)?;
    write_admin_config(data_dir, advertise, &admin)?;
    Ok((creds, ca))
}

/// A new cluster's first replica from a backup: the backup's CA (so certificates it signed,
/// agents' included, stay valid) and secrets keys, a new certificate for this replica, and
/// an admin configuration.
pub fn init_from_backup(
    data_dir: &Path,
    id: u64,
    advertise: &str,
    ca: &Ca,
    cluster_id: &str,
    secrets_keys: &str,
) -> Result<Credentials, PkiError> {
    let creds = ca.issue(&Identity::Replica(id), CERT_LIFETIME, &[advertise.to_string()])?;
    let admin = ca.issue(&Identity::Admin("admin".into()), CERT_LIFETIME, &[])?;
    save_ca(data_dir, ca)?;
    creds.save(&tls_dir(data_dir))?;
    write_private(&data_dir.join("cluster-id"), cluster_id)?;
    if !secrets_keys.is_empty() {
        write_private(&data_dir.join("secrets.key"), secrets_keys)?;
    }
    write_admin_config(data_dir, advertise, &admin)?;
    Ok(creds)
}

/// Writes `admin.yaml`: one context, `default`, with the admin's credentials.
pub fn write_admin_config(data_dir: &Path, server: &str, admin: &Credentials) -> Result<(), PkiError> {
    let config = Config {
        current_context: "default".into(),
        contexts: vec![Context {
            name: "default".into(),
            servers: vec![server.to_string()],
            namespace: String::new(),
            certificate_authority_data: admin.ca_pem.clone(),
            client_certificate_data: admin.cert_pem.clone(),
            client_key_data: admin.key_pem.clone(),
            token: String::new(),
        }],
    };
    let text = serde_saphyr::to_string(&config).map_err(|e| PkiError::Invalid(format!("admin configuration: {e}")))?;
    write_private(&admin_config_path(data_dir), &text)
}
