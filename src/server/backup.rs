//! Backups of a replica's store: taking one (a linearizable range over every key), checking
//! it restores to the same state, and scheduled backups on the leader. The file format is
//! `crate::backup`.

use std::path::Path;

use crate::backup::{read, write, BackupError};
use crate::proto::v1 as pb;
use crate::seal::Keyring;

pub async fn take(
    store: &crate::store::Store,
    secrets_keys: &str,
) -> Result<pb::BackupPayload, crate::store::StoreError> {
    let r = store.range(pb::RangeRequest { key: vec![0], range_end: vec![0], ..Default::default() }).await?;
    let cluster_id = super::cluster_state::cluster_id_in(&r.kvs);
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
