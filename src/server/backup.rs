//! Backups: a consistent copy of the store in one checksummed file, optionally sealed with a
//! recovery key, and the restore that starts a new cluster from it.
//!
//! File layout:
//!
//! ```text
//! KEEL-BACKUP v1\n
//! {"cluster_id":..,"revision":..,"created":..,"sha256":..,"sealed_with":..}\n
//! <payload>
//! ```
//!
//! The payload is an encoded `BackupPayload` (every key with its value, the secrets keys,
//! the cluster id), sealed with AES-256-GCM when a recovery key is given. `sha256` covers the
//! payload as stored, so damage is found before any key is needed. The copy holds the
//! cluster CA's key and the secrets keys: keep it as safe as the cluster itself, and seal it.

use std::path::Path;

use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::secrets::Keyring;
use crate::pki::hex;
use crate::proto::v1 as pb;

const MAGIC: &str = "KEEL-BACKUP v1\n";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Header {
    pub cluster_id: String,
    pub revision: i64,
    pub created: String,
    pub sha256: String,
    /// The recovery key's name, when the payload is sealed.
    #[serde(default)]
    pub sealed_with: String,
    pub keys: usize,
}

/// Writes a backup file (through a temporary file and a rename).
pub fn write(path: &Path, payload: &pb::BackupPayload, recovery: Option<&Keyring>) -> Result<Header, BackupError> {
    let io = |source| BackupError::Io { path: path.display().to_string(), source };
    let plain = payload.encode_to_vec();
    let (body, sealed_with) = match recovery {
        Some(k) => (k.seal(&plain), k.active().to_string()),
        None => (plain, String::new()),
    };
    let data = payload.data.clone().unwrap_or_default();
    let header = Header {
        cluster_id: payload.cluster_id.clone(),
        revision: data.revision,
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        sha256: hex(&Sha256::digest(&body)),
        sealed_with,
        keys: data.kvs.len(),
    };
    let mut out = MAGIC.as_bytes().to_vec();
    out.extend_from_slice(serde_json::to_string(&header).unwrap_or_default().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&body);
    let tmp = path.with_extension("partial");
    {
        // It holds the CA key: readable by its owner only.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
        f.write_all(&out).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(header)
}

/// Reads and checks a backup file; opens it with `recovery` when it is sealed.
pub fn read(path: &Path, recovery: Option<&Keyring>) -> Result<(Header, pb::BackupPayload), BackupError> {
    let p = path.display().to_string();
    let invalid = |why: String| BackupError::Invalid { path: p.clone(), why };
    let bytes = std::fs::read(path).map_err(|source| BackupError::Io { path: p.clone(), source })?;
    let rest = bytes
        .strip_prefix(MAGIC.as_bytes())
        .ok_or_else(|| invalid("not a Keel backup (no KEEL-BACKUP v1 line)".into()))?;
    let nl = rest.iter().position(|b| *b == b'\n').ok_or_else(|| invalid("the header line is cut off".into()))?;
    let header: Header =
        serde_json::from_slice(&rest[..nl]).map_err(|e| invalid(format!("the header is damaged: {e}")))?;
    let body = &rest[nl + 1..];
    let sum = hex(&Sha256::digest(body));
    if sum != header.sha256 {
        return Err(invalid(format!(
            "checksum mismatch: the file says {} but its content hashes to {sum}; the file is damaged or truncated",
            header.sha256
        )));
    }
    let plain = match (header.sealed_with.is_empty(), recovery) {
        (true, _) => body.to_vec(),
        (false, None) => {
            return Err(invalid(format!(
                "the backup is sealed with recovery key {:?}; give that key",
                header.sealed_with
            )))
        }
        (false, Some(k)) => {
            k.open(body).map_err(|e| invalid(format!("cannot open with the recovery key: {e}")))?.into_owned()
        }
    };
    let payload =
        pb::BackupPayload::decode(plain.as_slice()).map_err(|e| invalid(format!("the payload is damaged: {e}")))?;
    Ok((header, payload))
}

/// The payload of a backup: one linearizable range over every key.
pub async fn take(
    store: &crate::store::Store,
    secrets_keys: &str,
) -> Result<pb::BackupPayload, crate::store::StoreError> {
    let r = store.range(pb::RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() }).await?;
    let cluster_id = r
        .kvs
        .iter()
        .find(|kv| kv.key == super::cluster::CLUSTER_ID_KEY.as_bytes())
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .unwrap_or_default();
    Ok(pb::BackupPayload {
        data: Some(pb::SnapshotData { format_version: 1, revision: r.header.map_or(0, |h| h.revision), kvs: r.kvs }),
        secrets_keys: secrets_keys.to_string(),
        cluster_id,
    })
}

/// Reads a written backup back and restores it into an in-memory state machine; the state
/// must hash the same as the keys it was taken from.
pub fn verify(path: &Path, source: &pb::BackupPayload) -> Result<(), BackupError> {
    let (_, read_back) = read(path, None)?;
    let data = read_back.data.unwrap_or_default();
    let want = crate::store::raft::state_machine::state_checksum(&source.data.clone().unwrap_or_default().kvs);
    let got = crate::store::raft::state_machine::verify_snapshot(&data)
        .map_err(|e| BackupError::Invalid { path: path.display().to_string(), why: e.to_string() })?;
    if got != want {
        return Err(BackupError::Invalid {
            path: path.display().to_string(),
            why: format!("restored state hashes to {got}, the source to {want}"),
        });
    }
    Ok(())
}

/// Scheduled snapshots: every `interval` the leader writes a backup into `dir`, verifies it
/// by restoring it in memory, and keeps the newest `retention`.
pub async fn schedule(
    store: crate::store::Store,
    keys: std::sync::Arc<Keyring>,
    dir: std::path::PathBuf,
    interval: std::time::Duration,
    retention: usize,
) {
    loop {
        tokio::time::sleep(interval).await;
        if !store.is_leader() {
            continue;
        }
        let payload = match take(&store, keys.text()).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "scheduled snapshot not taken");
                continue;
            }
        };
        let rev = payload.data.as_ref().map_or(0, |d| d.revision);
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let path = dir.join(format!("keel-{stamp}-r{rev}.snap"));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(error = %e, dir = %dir.display(), "scheduled snapshot directory");
            continue;
        }
        match write(&path, &payload, None).and_then(|_| verify(&path, &payload)) {
            Ok(()) => tracing::info!(path = %path.display(), revision = rev, "scheduled snapshot written and verified"),
            Err(e) => {
                tracing::warn!(error = %e, "scheduled snapshot failed verification; removed");
                let _ = std::fs::remove_file(&path);
                continue;
            }
        }
        prune(&dir, retention);
    }
}

/// Keeps the newest `retention` snapshots in `dir`.
pub fn prune(dir: &Path, retention: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut snaps: Vec<(i64, std::path::PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            let stamp = name.strip_prefix("keel-")?.split('-').next()?.parse().ok()?;
            name.ends_with(".snap").then_some((stamp, p))
        })
        .collect();
    snaps.sort();
    let excess = snaps.len().saturating_sub(retention.max(1));
    for (_, p) in snaps.into_iter().take(excess) {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_sealed_and_damage_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let key = Keyring::load_or_create(&dir.path().join("recovery.key")).unwrap();
        let payload = pb::BackupPayload {
            data: Some(pb::SnapshotData {
                format_version: 1,
                revision: 7,
                kvs: vec![pb::KeyValue { key: b"a".to_vec(), value: b"plain-canary".to_vec(), ..Default::default() }],
            }),
            secrets_keys: "key1:x\n".into(),
            cluster_id: "c".into(),
        };
        let path = dir.path().join("b.snap");
        let h = write(&path, &payload, Some(&key)).unwrap();
        assert_eq!((h.revision, h.keys), (7, 1));
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(12).any(|w| w == b"plain-canary"), "sealed");
        assert_eq!(read(&path, Some(&key)).unwrap().1, payload);
        assert!(read(&path, None).unwrap_err().to_string().contains("sealed with recovery key"));
        let mut bad = raw.clone();
        let n = bad.len() - 3;
        bad[n] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        assert!(read(&path, Some(&key)).unwrap_err().to_string().contains("checksum mismatch"));
        std::fs::write(&path, &raw[..raw.len() / 2]).unwrap();
        assert!(read(&path, Some(&key)).is_err());
    }

    #[test]
    fn a_snapshot_restores_in_memory_to_the_same_state_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let kv = |k: &str, v: &str, rev| pb::KeyValue {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
        };
        let payload = pb::BackupPayload {
            data: Some(pb::SnapshotData {
                format_version: 1,
                revision: 3,
                kvs: vec![kv("a", "1", 2), kv("b", "2", 3)],
            }),
            ..Default::default()
        };
        let path = dir.path().join("keel-100-r3.snap");
        write(&path, &payload, None).unwrap();
        verify(&path, &payload).unwrap();
        let mut other = payload.clone();
        other.data.as_mut().unwrap().kvs[0].value = b"changed".to_vec();
        assert!(verify(&path, &other).unwrap_err().to_string().contains("hashes to"));
        for stamp in [101, 102, 103] {
            write(&dir.path().join(format!("keel-{stamp}-r3.snap")), &payload, None).unwrap();
        }
        prune(dir.path(), 2);
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["keel-102-r3.snap", "keel-103-r3.snap"]);
    }
}
