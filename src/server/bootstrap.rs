//! What a replica needs on disk before it can serve, and how it gets there: the bootstrap
//! state machine of `keel server` (a new cluster, a join, a restore from a backup, a forced
//! recovery, or a restart of an existing replica), behind [`DataDir`], which names every
//! file of the data directory.
//!
//! A restart with the same command line is always safe: once the data directory holds a
//! replica, `--cluster-init`, `--restore` and `--server/--token` are ignored with a log line,
//! as k3s and etcd do, unless they contradict the data (another cluster's token or backup,
//! another name), which is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::config::{Config, Context};
use crate::pki::{write_private, Ca, Credentials, Identity, JoinToken, PkiError, TokenRole};
use crate::proto::v1 as pb;

/// Lifetime of the admin's certificate.
pub const ADMIN_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// The files of a replica's data directory.
///
/// ```text
/// tls/ca.crt tls/tls.crt tls/tls.key   this replica's credentials (keys 0600)
/// tls/ca.key                            the cluster CA's key (replicas sign joins)
/// cluster-id  epoch  name               the cluster, its recovery epoch, this replica's name
/// secrets.key                           keys that seal Secrets (the same on every replica)
/// admin.yaml                            a keelctl configuration for the admin
/// token  agent-token                    join tokens written by --cluster-init
/// joined-via                            the replica this one joined through
/// restore-pending                       a restore that has not finished
/// snapshots/                            scheduled backups
/// db/                                   the store (see docs/store.md)
/// ```
#[derive(Clone, Debug)]
pub struct DataDir(PathBuf);

impl DataDir {
    pub fn new(path: impl Into<PathBuf>) -> DataDir {
        DataDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn tls(&self) -> PathBuf {
        self.0.join("tls")
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.tls().join("ca.crt")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.tls().join("ca.key")
    }

    pub fn cluster_id(&self) -> PathBuf {
        self.0.join("cluster-id")
    }

    pub fn epoch(&self) -> PathBuf {
        self.0.join("epoch")
    }

    pub fn name(&self) -> PathBuf {
        self.0.join("name")
    }

    pub fn secrets_key(&self) -> PathBuf {
        self.0.join("secrets.key")
    }

    pub fn admin_config(&self) -> PathBuf {
        self.0.join("admin.yaml")
    }

    pub fn server_token(&self) -> PathBuf {
        self.0.join("token")
    }

    pub fn agent_token(&self) -> PathBuf {
        self.0.join("agent-token")
    }

    pub fn joined_via(&self) -> PathBuf {
        self.0.join("joined-via")
    }

    pub fn restore_pending(&self) -> PathBuf {
        self.0.join("restore-pending")
    }

    pub fn snapshots(&self) -> PathBuf {
        self.0.join("snapshots")
    }

    /// Whether a replica lives here (it has its credentials).
    pub fn holds_replica(&self) -> bool {
        Credentials::exists(&self.tls())
    }

    fn read(&self, path: &Path) -> Option<String> {
        std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    }

    /// The CA of this replica's cluster, when this replica holds its key.
    pub fn load_ca(&self) -> Option<Ca> {
        Some(Ca {
            cert_pem: std::fs::read_to_string(self.ca_cert()).ok()?,
            key_pem: std::fs::read_to_string(self.ca_key()).ok()?,
        })
    }

    pub fn save_ca(&self, ca: &Ca) -> Result<(), PkiError> {
        write_private(&self.ca_key(), &ca.key_pem)?;
        write_private(&self.ca_cert(), &ca.cert_pem)
    }

    /// Writes `admin.yaml`: one context, `default`, with the admin's credentials.
    pub fn write_admin_config(&self, server: &str, admin: &Credentials) -> Result<(), PkiError> {
        write_admin_config(&self.admin_config(), server, admin)
    }
}

/// Writes a keelctl configuration at `path` with one context, `default`, for `admin`.
pub fn write_admin_config(path: &Path, server: &str, admin: &Credentials) -> Result<(), PkiError> {
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
    let text = config.to_yaml().map_err(|e| PkiError::Invalid(format!("admin configuration: {e}")))?;
    write_private(path, &text)
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{0}")]
    Refused(String),
    #[error("join through {seed}: {source}")]
    Join {
        seed: String,
        #[source]
        source: crate::client::join::JoinError,
    },
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
}

/// The bootstrap flags of `keel server`.
#[derive(Clone, Debug, Default)]
pub struct BootstrapOptions {
    pub data_dir: PathBuf,
    pub id: Option<u64>,
    pub name: String,
    pub advertise: String,
    pub cluster_init: bool,
    /// `--server` and `--token`: join the cluster of that replica.
    pub join: Option<(String, String)>,
    pub initial_cluster: bool,
    pub restore: Option<PathBuf>,
    pub recovery_key: Option<PathBuf>,
    pub force_new_cluster: bool,
    pub cert_lifetime: Duration,
}

/// Where this replica's credentials came from, decided before anything starts.
pub enum Start {
    /// A new cluster: CA, certificate, admin configuration, then tokens once Raft runs.
    Init { ca: Ca, cluster_id: String },
    /// A new cluster from a backup: its CA and keys, then its content once Raft runs.
    Restore { payload: Box<pb::BackupPayload> },
    /// Joined through `seed` just now or earlier: never initializes a cluster of its own.
    Joined { seed: String },
    /// Certificates were provisioned beforehand (--initial-cluster) or this is a restart.
    Existing,
}

/// The replica's credentials and how it came by them.
pub struct Prepared {
    pub creds: Credentials,
    pub id: u64,
    pub start: Start,
}

fn refuse(msg: String) -> BootstrapError {
    BootstrapError::Refused(msg)
}

/// Runs the bootstrap state machine for `o`: leaves the data directory ready to serve.
pub async fn prepare(o: &BootstrapOptions) -> Result<Prepared, BootstrapError> {
    let dir = DataDir::new(&o.data_dir);
    let (creds, start) = if dir.holds_replica() {
        restart(&dir, o)?
    } else if o.force_new_cluster {
        return Err(refuse(format!(
            "--force-new-cluster: {} holds no replica (no tls/); run it on a survivor's data directory",
            o.data_dir.display()
        )));
    } else if o.initial_cluster {
        return Err(refuse(format!(
            "--initial-cluster needs this replica's certificates in {} (ca.crt, tls.crt, tls.key, signed by the cluster CA); \
             to start a cluster without them, run `keel server --cluster-init` on one replica and join the others with its token",
            dir.tls().display()
        )));
    } else if let Some((seed, token)) = &o.join {
        join(&dir, o, seed, token).await?
    } else if let Some(file) = &o.restore {
        restore(&dir, o, file)?
    } else {
        let id = o.id.unwrap_or(1);
        let (creds, ca) = init_cluster(&dir, id, &o.advertise, o.cert_lifetime)?;
        write_private(&dir.name(), &o.name)?;
        let cluster_id = dir.read(&dir.cluster_id()).unwrap_or_default();
        (creds, Start::Init { ca, cluster_id })
    };
    let id = match creds.identity() {
        Some(Identity::Replica(id)) => id,
        other => {
            return Err(refuse(format!(
                "{}/tls.crt is not a replica certificate (it names {other:?})",
                dir.tls().display()
            )))
        }
    };
    if let Some(want) = o.id.filter(|want| *want != id) {
        return Err(refuse(format!(
            "--id {want} does not match this replica's certificate, which is for replica {id}"
        )));
    }
    Ok(Prepared { creds, id, start })
}

/// A data directory that holds a replica: flags that would found or join a cluster are
/// ignored if they agree with the data, and refused if they do not.
fn restart(dir: &DataDir, o: &BootstrapOptions) -> Result<(Credentials, Start), BootstrapError> {
    let creds = Credentials::load(&dir.tls())?;
    if dir.restore_pending().exists() {
        return Err(refuse(format!(
            "{}: a restore into this directory did not finish; remove the directory and run the restore again",
            o.data_dir.display()
        )));
    }
    match dir.read(&dir.name()) {
        Some(stored) if stored != o.name => {
            return Err(refuse(format!(
                "--name {:?}: this data directory belongs to replica {stored:?}; start it with --name {stored}, or use another --data-dir",
                o.name
            )))
        }
        Some(_) => {}
        // Data from before names were kept: the name it starts with now is its name.
        None => write_private(&dir.name(), &o.name)?,
    }
    let ca_hash = crate::pki::cert_hash(&creds.ca_pem)?;
    if let Some((_, token)) = &o.join {
        let token: JoinToken = token.parse()?;
        if token.ca_hash != ca_hash {
            return Err(refuse(format!(
                "--token is for another cluster (it pins CA {}, this replica's cluster has CA {ca_hash}); \
                 this data directory already holds a replica: start it without --server/--token, or use an empty --data-dir",
                token.ca_hash
            )));
        }
        tracing::info!("this data directory already joined the cluster; --server and --token are ignored");
    }
    if o.cluster_init {
        tracing::info!(
            data_dir = %o.data_dir.display(),
            "this data directory already holds a replica of a cluster; --cluster-init is ignored"
        );
    }
    if let Some(file) = &o.restore {
        let recovery = recovery_key(o)?;
        let (header, _) = crate::backup::read(file, recovery.as_ref())?;
        let ours = dir.read(&dir.cluster_id()).unwrap_or_default();
        if header.cluster_id != ours {
            return Err(refuse(format!(
                "--restore {}: the backup is of cluster {}, but this data directory holds cluster {ours}; use an empty --data-dir to restore",
                file.display(),
                header.cluster_id
            )));
        }
        tracing::info!(backup = %file.display(), "this data directory was restored from the backup already; --restore is ignored");
    }
    let start = match dir.read(&dir.joined_via()) {
        Some(seed) => Start::Joined { seed },
        None => Start::Existing,
    };
    Ok((creds, start))
}

async fn join(
    dir: &DataDir,
    o: &BootstrapOptions,
    seed: &str,
    token: &str,
) -> Result<(Credentials, Start), BootstrapError> {
    let (creds, resp) = crate::client::join::join(seed, token, TokenRole::Server, &o.name, &o.advertise)
        .await
        .map_err(|source| BootstrapError::Join { seed: seed.to_string(), source })?;
    creds.save(&dir.tls())?;
    dir.save_ca(&Ca { cert_pem: resp.ca_pem.clone(), key_pem: resp.ca_key_pem.clone() })?;
    write_private(&dir.cluster_id(), &resp.cluster_id)?;
    write_private(&dir.secrets_key(), &resp.secrets_keys)?;
    write_private(&dir.epoch(), &resp.epoch)?;
    write_private(&dir.name(), &o.name)?;
    write_private(&dir.joined_via(), seed)?;
    println!("Joined cluster {} as replica {} ({}).", resp.cluster_id, resp.replica_id, o.name);
    Ok((creds, Start::Joined { seed: seed.to_string() }))
}

fn recovery_key(o: &BootstrapOptions) -> Result<Option<crate::seal::Keyring>, BootstrapError> {
    let Some(k) = &o.recovery_key else { return Ok(None) };
    let text = std::fs::read_to_string(k).map_err(|source| PkiError::Io { path: k.display().to_string(), source })?;
    Ok(Some(crate::seal::Keyring::parse(&text, &k.display().to_string())?))
}

fn restore(dir: &DataDir, o: &BootstrapOptions, file: &Path) -> Result<(Credentials, Start), BootstrapError> {
    let recovery = recovery_key(o)?;
    let (header, payload) = crate::backup::read(file, recovery.as_ref())?;
    let kvs = payload.data.as_ref().map(|d| d.kvs.as_slice()).unwrap_or_default();
    let ca = super::cluster_state::ca_in(kvs)
        .ok_or_else(|| refuse(format!("{}: the backup holds no cluster CA", file.display())))?;
    let id = o.id.unwrap_or(1);
    write_private(&dir.restore_pending(), &file.display().to_string())?;
    let creds = init_from_backup(dir, id, &o.advertise, &ca, &header.cluster_id, &payload.secrets_keys)?;
    write_private(&dir.name(), &o.name)?;
    println!(
        "Restoring cluster {} from {} (revision {}, {} keys, taken {}).",
        header.cluster_id,
        file.display(),
        header.revision,
        header.keys,
        header.created
    );
    Ok((creds, Start::Restore { payload: Box::new(payload) }))
}

/// Creates a new cluster's CA, this replica's certificate and the admin's configuration.
/// Returns the replica's credentials and the CA.
pub fn init_cluster(
    dir: &DataDir,
    id: u64,
    advertise: &str,
    lifetime: Duration,
) -> Result<(Credentials, Ca), PkiError> {
    let cluster_id = uuid::Uuid::new_v4().to_string();
    let ca = Ca::generate(&cluster_id)?;
    let creds = ca.issue(&Identity::Replica(id), lifetime, &[advertise.to_string()])?;
    let admin = ca.issue(&Identity::Admin("admin".into()), ADMIN_CERT_LIFETIME, &[])?;
    dir.save_ca(&ca)?;
    creds.save(&dir.tls())?;
    write_private(&dir.cluster_id(), &cluster_id)?;
    dir.write_admin_config(advertise, &admin)?;
    Ok((creds, ca))
}

/// A new cluster's first replica from a backup: the backup's CA (so certificates it signed,
/// agents' included, stay valid) and secrets keys, a new certificate for this replica, and
/// an admin configuration.
pub fn init_from_backup(
    dir: &DataDir,
    id: u64,
    advertise: &str,
    ca: &Ca,
    cluster_id: &str,
    secrets_keys: &str,
) -> Result<Credentials, PkiError> {
    let creds = ca.issue(&Identity::Replica(id), ADMIN_CERT_LIFETIME, &[advertise.to_string()])?;
    let admin = ca.issue(&Identity::Admin("admin".into()), ADMIN_CERT_LIFETIME, &[])?;
    dir.save_ca(ca)?;
    creds.save(&dir.tls())?;
    write_private(&dir.cluster_id(), cluster_id)?;
    if !secrets_keys.is_empty() {
        write_private(&dir.secrets_key(), secrets_keys)?;
    }
    dir.write_admin_config(advertise, &admin)?;
    Ok(creds)
}

/// Writes the new cluster's join tokens where `--cluster-init` promises them.
pub fn save_tokens(dir: &DataDir, server: &JoinToken, agent: &JoinToken) -> Result<(), PkiError> {
    write_private(&dir.server_token(), &format!("{server}\n"))?;
    write_private(&dir.agent_token(), &format!("{agent}\n"))
}
