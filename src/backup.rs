//! The backup file: a consistent copy of the store in one checksummed file, optionally sealed
//! with a recovery key. This module reads and writes the file only; taking a backup from a
//! replica and restoring one are the server's (`server::backup`).
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

use crate::proto::v1 as pb;
use crate::seal::{Keyring, SealError};

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
    #[error("{path}: {source}")]
    Seal {
        path: String,
        #[source]
        source: SealError,
    },
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
        Some(k) => (
            k.seal(&plain).map_err(|source| BackupError::Seal { path: path.display().to_string(), source })?,
            k.active().to_string(),
        ),
        None => (plain, String::new()),
    };
    let data = payload.data.clone().unwrap_or_default();
    let header = Header {
        cluster_id: payload.cluster_id.clone(),
        revision: data.revision,
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        sha256: hex::encode(Sha256::digest(&body)),
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
    let sum = hex::encode(Sha256::digest(body));
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
}
