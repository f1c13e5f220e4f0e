//! The replicated state machine: applies committed transactions to the engine, publishes
//! their events to the watch hub, and builds and installs snapshots.
//!
//! A batch of entries is applied through one overlay and written in one atomic engine batch,
//! together with the applied log id, the membership and the revision. The state machine is
//! not flushed on its own: the log is the durable record, and a restart re-applies whatever
//! the engine had not yet persisted.
//!
//! A snapshot reads the whole state while entries go on being applied: the changes made during
//! the read are recorded and laid over what it read, which gives the state as of the moment
//! the read ended (see `build_snapshot`).

use std::collections::BTreeMap;
use std::io::Cursor;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StoredMembership,
};
use prost::Message;

use super::codec::{self, Entry};
use super::log_store::Durability;
use super::{storage_err, Member, Response, StorageError, TypeConfig};
use crate::proto::v1 as pb;
use crate::store::kv::{Batch, Kv, KvPair, Space};
use crate::store::txn::{self, Overlay, USER_PREFIX};
use crate::store::watch::WatchHub;
use crate::store::StoreError;

const APPLIED: &[u8] = b"m/applied";
const MEMBERSHIP: &[u8] = b"m/membership";
const REVISION: &[u8] = b"m/revision";
/// Where the current snapshot is (layout 4): its data is a file beside the engine's
/// (`Kv::write_file`), and this value (`pb::SnapshotFile`) names it, with the data's size and
/// SHA-256 and the snapshot's meta.
const SNAPSHOT_FILE: &[u8] = b"file";
/// The files that hold snapshots' data are named `snapshot-<id>-<unique>.bin`.
const SNAPSHOT_FILE_PREFIX: &str = "snapshot-";
/// Layout 3 kept the current snapshot in the engine as one value: its data, then its encoded
/// meta, then the meta's length (4 bytes, big-endian).
const SNAPSHOT: &[u8] = b"current";
/// Layout versions 1 and 2 kept the meta and the data under two keys, written as one batch.
const OLD_SNAP_META: &[u8] = b"meta";
const OLD_SNAP_DATA: &[u8] = b"data";
const SNAPSHOT_FORMAT: u32 = 1;

/// State shared between the state machine (one writer) and readers.
pub struct Shared {
    /// The revision of the data in the engine. Readers hold the read lock while they range so
    /// that the revision they report matches what they read.
    pub revision: RwLock<i64>,
    pub hub: Arc<WatchHub>,
    pub member_id: u64,
    /// Held shared by every change to the state, and exclusively for a moment where a
    /// snapshot read starts and ends (or for all of it, see `build_snapshot`). Async, so that
    /// a change waiting for it holds up no runtime thread (and so no heartbeat or vote).
    changes: tokio::sync::RwLock<()>,
    /// The changes made while a snapshot reads the state. Switched only under `changes` held
    /// exclusively, and added to only under `changes` held shared.
    recording: std::sync::Mutex<Recording>,
    /// Held from saving a snapshot until the engine's pointer to it is flushed and the files
    /// it replaced are removed, so that a build and an install never remove each other's file.
    saving: tokio::sync::Mutex<()>,
}

/// What a snapshot read needs to know about the changes made during it.
enum Recording {
    Off,
    /// Every engine key of the state written since the read began, with its last value
    /// (None: deleted).
    On(BTreeMap<Vec<u8>, Option<Vec<u8>>>),
    /// The whole state was replaced (a snapshot was installed) during the read.
    Lost,
}

impl Shared {
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, i64> {
        self.revision.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, i64> {
        self.revision.write().unwrap_or_else(|p| p.into_inner())
    }

    fn recording(&self) -> std::sync::MutexGuard<'_, Recording> {
        self.recording.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a batch of changes to the state. The caller holds `changes` shared.
    fn change(&self, kv: &dyn Kv, batch: Batch) -> Result<(), crate::store::kv::KvError> {
        let recorded = matches!(*self.recording(), Recording::On(_)).then(|| batch.ops().to_vec());
        kv.write(Space::State, batch)?;
        if let (Some(ops), Recording::On(changed)) = (recorded, &mut *self.recording()) {
            changed.extend(ops);
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct StateMachine {
    kv: Arc<dyn Kv>,
    shared: Arc<Shared>,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, Member>,
    /// This replica's log on disk: nothing is applied before it (see `Durability`).
    durability: Durability,
}

struct Persisted {
    applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, Member>,
    revision: i64,
}

fn read_persisted(kv: &dyn Kv) -> Result<Persisted, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt { file: kv.location().to_path_buf(), what };
    let applied = match kv.get(Space::State, APPLIED).map_err(StoreError::Engine)? {
        Some(b) => {
            let id: pb::LogId = codec::decode(&b, "applied log id").map_err(|e| corrupt(e.to_string()))?;
            Some(codec::log_id_from_pb(&id).map_err(|e| corrupt(e.to_string()))?)
        }
        None => None,
    };
    let membership = match kv.get(Space::State, MEMBERSHIP).map_err(StoreError::Engine)? {
        Some(b) => {
            let m: pb::StoredMembership = codec::decode(&b, "membership").map_err(|e| corrupt(e.to_string()))?;
            codec::stored_membership_from_pb(&m).map_err(|e| corrupt(e.to_string()))?
        }
        None => StoredMembership::default(),
    };
    let revision = match kv.get(Space::State, REVISION).map_err(StoreError::Engine)? {
        Some(b) => i64::from_be_bytes(b.as_slice().try_into().map_err(|_| corrupt("revision is not 8 bytes".into()))?),
        None => 0,
    };
    Ok(Persisted { applied, membership, revision })
}

fn meta_batch(batch: &mut Batch, applied: &Option<LogId<u64>>, m: &StoredMembership<u64, Member>, revision: i64) {
    if let Some(a) = applied {
        batch.put(APPLIED.to_vec(), codec::log_id_to_pb(a).encode_to_vec());
    }
    batch.put(MEMBERSHIP.to_vec(), codec::stored_membership_to_pb(m).encode_to_vec());
    batch.put(REVISION.to_vec(), revision.to_be_bytes().to_vec());
}

impl StateMachine {
    /// Opens the state machine. If a stored snapshot is newer than the applied state (a crash
    /// in the middle of installing it), the snapshot is installed again first.
    pub fn open(
        kv: Arc<dyn Kv>,
        shared_hub: impl FnOnce(i64) -> Arc<WatchHub>,
        member_id: u64,
        durability: Durability,
    ) -> Result<StateMachine, StoreError> {
        let mut p = read_persisted(kv.as_ref())?;
        keep_only_current(kv.as_ref())?;
        if let Some((meta, data)) = read_snapshot(kv.as_ref())? {
            if meta.last_log_id > p.applied {
                tracing::warn!(snapshot = %meta.snapshot_id, "re-installing a snapshot that was not fully installed");
                install(kv.as_ref(), &meta, &data)?;
                p = read_persisted(kv.as_ref())?;
            }
        }
        let shared = Arc::new(Shared {
            revision: RwLock::new(p.revision),
            hub: shared_hub(p.revision),
            member_id,
            changes: tokio::sync::RwLock::new(()),
            recording: std::sync::Mutex::new(Recording::Off),
            saving: tokio::sync::Mutex::new(()),
        });
        Ok(StateMachine { kv, shared, last_applied: p.applied, membership: p.membership, durability })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }
}

type StoredSnapshot = (SnapshotMeta<u64, Member>, Vec<u8>);

/// The engine's record of the current snapshot: its file's name, the data's size and SHA-256,
/// and the snapshot's meta.
fn read_snapshot_file(kv: &dyn Kv) -> Result<Option<pb::SnapshotFile>, StoreError> {
    let Some(value) = kv.get(Space::Snapshot, SNAPSHOT_FILE).map_err(StoreError::Engine)? else {
        return Ok(None);
    };
    let corrupt = |what: String| StoreError::Corrupt {
        file: kv.location().to_path_buf(),
        what: format!("stored snapshot: {what}"),
    };
    let f: pb::SnapshotFile = codec::decode(&value, "snapshot file record").map_err(|e| corrupt(e.to_string()))?;
    if !f.name.starts_with(SNAPSHOT_FILE_PREFIX) || f.name.contains('/') {
        return Err(corrupt(format!("{:?} is not a snapshot file name", f.name)));
    }
    if f.sha256.len() != 32 {
        return Err(corrupt(format!("a checksum of {} bytes", f.sha256.len())));
    }
    Ok(Some(f))
}

fn meta_of(kv: &dyn Kv, f: &pb::SnapshotFile) -> Result<SnapshotMeta<u64, Member>, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt { file: kv.location().to_path_buf(), what };
    let meta = f.meta.as_ref().ok_or_else(|| corrupt("stored snapshot: no meta".into()))?;
    codec::snapshot_meta_from_pb(meta).map_err(|e| corrupt(e.to_string()))
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(data).into()
}

fn read_snapshot(kv: &dyn Kv) -> Result<Option<StoredSnapshot>, StoreError> {
    let Some(f) = read_snapshot_file(kv)? else { return Ok(None) };
    let meta = meta_of(kv, &f)?;
    let corrupt = |what: String| StoreError::Corrupt { file: kv.file_location(&f.name), what };
    let data = kv
        .read_file(&f.name)
        .map_err(StoreError::Engine)?
        .ok_or_else(|| corrupt(format!("the current snapshot's data ({}) is missing", meta.snapshot_id)))?;
    if data.len() as u64 != f.size || sha256(&data)[..] != f.sha256[..] {
        return Err(corrupt(format!(
            "the current snapshot's data ({}) is damaged: {} bytes where {} were written, or a checksum mismatch",
            meta.snapshot_id,
            data.len(),
            f.size
        )));
    }
    Ok(Some((meta, data)))
}

/// A snapshot's encoded meta and its data.
pub type EncodedSnapshot = (Vec<u8>, Vec<u8>);

/// The current snapshot, for tools and tests outside this module.
pub fn stored_snapshot(kv: &dyn Kv) -> Result<Option<EncodedSnapshot>, StoreError> {
    Ok(read_snapshot(kv)?.map(|(meta, data)| (codec::snapshot_meta_to_pb(&meta).encode_to_vec(), data)))
}

/// Removes every snapshot file but `keep`, and whatever a crash left half-written.
fn remove_snapshot_files_but(kv: &dyn Kv, keep: Option<&str>) -> Result<(), StoreError> {
    for name in kv.list_files().map_err(StoreError::Engine)? {
        if name.starts_with(SNAPSHOT_FILE_PREFIX) && Some(name.as_str()) != keep {
            kv.remove_file(&name).map_err(StoreError::Engine)?;
        }
    }
    Ok(())
}

/// The data's length and the encoded meta of a stored snapshot value.
fn split_snapshot(value: &[u8]) -> Result<(usize, &[u8]), String> {
    let n = value.len();
    let len_bytes: [u8; 4] = value
        .get(n.saturating_sub(4)..)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{n} bytes is too short"))?;
    let meta_len = u32::from_be_bytes(len_bytes) as usize;
    let data_len = (n - 4).checked_sub(meta_len).ok_or_else(|| format!("meta length {meta_len} exceeds the value"))?;
    Ok((data_len, &value[data_len..n - 4]))
}

fn snapshot_value(meta: &[u8], data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + meta.len() + 4);
    v.extend_from_slice(data);
    v.extend_from_slice(meta);
    v.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    v
}

/// Layout 2 -> 3: moves a snapshot stored under two keys into one value. Safe to run again
/// after a crash part-way: the new value is written before the old keys go.
pub fn upgrade_snapshot_layout(kv: &dyn Kv) -> Result<(), StoreError> {
    let meta = kv.get(Space::Snapshot, OLD_SNAP_META).map_err(StoreError::Engine)?;
    let data = kv.get(Space::Snapshot, OLD_SNAP_DATA).map_err(StoreError::Engine)?;
    if let (Some(meta), Some(data)) = (&meta, &data) {
        let mut b = Batch::default();
        b.put(SNAPSHOT.to_vec(), snapshot_value(meta, data));
        kv.write(Space::Snapshot, b).map_err(StoreError::Engine)?;
    }
    for (key, present) in [(OLD_SNAP_META, meta.is_some()), (OLD_SNAP_DATA, data.is_some())] {
        if present {
            let mut b = Batch::default();
            b.delete(key.to_vec());
            kv.write(Space::Snapshot, b).map_err(StoreError::Engine)?;
        }
    }
    Ok(())
}

/// Replaces the whole state with the snapshot's, in one atomic batch.
fn install(kv: &dyn Kv, meta: &SnapshotMeta<u64, Member>, data: &[u8]) -> Result<i64, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt { file: kv.location().to_path_buf(), what };
    let snap: pb::SnapshotData = codec::decode(data, "snapshot data").map_err(|e| corrupt(e.to_string()))?;
    if snap.format_version != SNAPSHOT_FORMAT {
        return Err(corrupt(format!(
            "snapshot format {} is not supported (want {SNAPSHOT_FORMAT})",
            snap.format_version
        )));
    }
    let mut batch = Batch::default();
    for item in kv.scan(Space::State, (Bound::Unbounded, Bound::Unbounded), false) {
        let (k, _) = item.map_err(StoreError::Engine)?;
        batch.delete(k);
    }
    for kv_ in &snap.kvs {
        let mut key = vec![USER_PREFIX];
        key.extend_from_slice(&kv_.key);
        batch.put(key, pb::KeyValue { key: Vec::new(), ..kv_.clone() }.encode_to_vec());
    }
    meta_batch(&mut batch, &meta.last_log_id, &meta.last_membership, snap.revision);
    kv.write(Space::State, batch).map_err(StoreError::Engine)?;
    Ok(snap.revision)
}

/// SHA-256 over the state the given keys make, as the state machine stores it.
pub fn state_checksum(kvs: &[pb::KeyValue]) -> String {
    use sha2::{Digest, Sha256};
    let mut sorted: Vec<&pb::KeyValue> = kvs.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    let mut h = Sha256::new();
    for kv_ in sorted {
        let mut key = vec![USER_PREFIX];
        key.extend_from_slice(&kv_.key);
        h.update((key.len() as u64).to_be_bytes());
        h.update(&key);
        let value = pb::KeyValue { key: Vec::new(), ..kv_.clone() }.encode_to_vec();
        h.update((value.len() as u64).to_be_bytes());
        h.update(&value);
    }
    hex::encode(h.finalize())
}

/// Installs snapshot data into a fresh in-memory state machine, exactly as a replica would,
/// and returns the checksum of the state it ends up with: equal to `state_checksum` of the
/// snapshot's source keys when the snapshot is sound.
pub fn verify_snapshot(data: &pb::SnapshotData) -> Result<String, StoreError> {
    use sha2::{Digest, Sha256};
    let mem = crate::store::MemKv::new();
    let meta = SnapshotMeta { last_log_id: None, last_membership: Default::default(), snapshot_id: "verify".into() };
    install(&mem, &meta, &data.encode_to_vec())?;
    let mut h = Sha256::new();
    for item in mem.scan(Space::State, (Bound::Unbounded, Bound::Unbounded), false) {
        let (k, v) = item.map_err(StoreError::Engine)?;
        if k.first() != Some(&USER_PREFIX) {
            continue;
        }
        h.update((k.len() as u64).to_be_bytes());
        h.update(&k);
        h.update((v.len() as u64).to_be_bytes());
        h.update(&v);
    }
    Ok(hex::encode(h.finalize()))
}

fn store_err(subject: ErrorSubject<u64>, verb: ErrorVerb) -> impl Fn(StoreError) -> StorageError {
    move |e| storage_err(subject.clone(), verb, e)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, StoredMembership<u64, Member>), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let err = |e| storage_err(ErrorSubject::StateMachine, ErrorVerb::Write, e);
        let mut revision = *self.shared.read();
        let mut view = Overlay::new(self.kv.as_ref());
        let mut responses = Vec::new();
        let mut published = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response::default()),
                EntryPayload::Normal(req) => {
                    let mut out = Vec::with_capacity(req.0.txns.len());
                    for t in &req.0.txns {
                        let applied = txn::apply(&mut view, revision, t, self.shared.member_id).map_err(err)?;
                        revision = applied.revision;
                        if !applied.events.is_empty() {
                            published.push((applied.revision, applied.events));
                        }
                        out.push(applied.response);
                    }
                    responses.push(Response(pb::TxnBatchResponse { responses: out }));
                }
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    responses.push(Response::default());
                }
            }
        }
        let mut batch = view.into_batch();
        meta_batch(&mut batch, &self.last_applied, &self.membership, revision);
        // Worked out while the leader's own copy may still be flushing; made visible only
        // once it is on disk.
        if let Some(last) = self.last_applied {
            self.durability
                .reached(last.index)
                .await
                .map_err(|e| storage_err(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        }
        {
            let _change = self.shared.changes.read().await;
            let mut rev = self.shared.write();
            self.shared.change(self.kv.as_ref(), batch).map_err(err)?;
            *rev = revision;
        }
        for (rev, events) in published {
            self.shared.hub.publish(rev, events);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        // Keep the snapshot first, so that a crash mid-install is finished at the next start.
        let shared = self.shared.clone();
        let _saving = shared.saving.lock().await;
        // Writing and syncing the file takes a while: not on a runtime thread.
        let (kv, saved_meta) = (self.kv.clone(), meta.clone());
        let data = tokio::task::spawn_blocking(move || save_snapshot(kv.as_ref(), &saved_meta, &data).map(|()| data))
            .await
            .map_err(|e| StoreError::Stopped(format!("snapshot task: {e}")))
            .and_then(|r| r)
            .map_err(store_err(ErrorSubject::Snapshot(None), ErrorVerb::Write))?;
        let revision = {
            let _change = self.shared.changes.read().await;
            let mut rev = self.shared.write();
            let mut recording = self.shared.recording();
            if matches!(*recording, Recording::On(_)) {
                *recording = Recording::Lost;
            }
            drop(recording);
            let r = install(self.kv.as_ref(), meta, &data)
                .map_err(store_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write))?;
            *rev = r;
            r
        };
        self.kv.flush().await.map_err(|e| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        keep_only_current(self.kv.as_ref()).map_err(store_err(ErrorSubject::Snapshot(None), ErrorVerb::Delete))?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.shared.hub.reset(revision, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let snap = read_snapshot(self.kv.as_ref()).map_err(store_err(ErrorSubject::Snapshot(None), ErrorVerb::Read))?;
        Ok(snap.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

/// Writes the snapshot's data to a new file and points the engine at it, unless the stored
/// snapshot is already newer (a build that read the state before an install). The previous
/// file stays until the engine's pointer to the new one is flushed (`keep_only_current`).
fn save_snapshot(kv: &dyn Kv, meta: &SnapshotMeta<u64, Member>, data: &[u8]) -> Result<(), StoreError> {
    if let Some(current) = read_snapshot_file(kv)? {
        if meta_of(kv, &current)?.last_log_id > meta.last_log_id {
            return Ok(());
        }
    }
    save_snapshot_file(kv, codec::snapshot_meta_to_pb(meta), data)
}

/// Removes every snapshot file but the one the engine points to. Only after that pointer is
/// flushed: until then a crash comes back to the previous file.
fn keep_only_current(kv: &dyn Kv) -> Result<(), StoreError> {
    let current = read_snapshot_file(kv)?.map(|f| f.name);
    remove_snapshot_files_but(kv, current.as_deref())
}

/// Writes the data to a new file, then records it as the current snapshot.
fn save_snapshot_file(kv: &dyn Kv, meta: pb::SnapshotMeta, data: &[u8]) -> Result<(), StoreError> {
    let safe: String =
        meta.snapshot_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{SNAPSHOT_FILE_PREFIX}{safe}-{}.bin", &unique[..12]);
    kv.write_file(&name, data).map_err(StoreError::Engine)?;
    let f = pb::SnapshotFile { name, size: data.len() as u64, sha256: sha256(data).to_vec(), meta: Some(meta) };
    let mut batch = Batch::default();
    batch.put(SNAPSHOT_FILE.to_vec(), f.encode_to_vec());
    kv.write(Space::Snapshot, batch).map_err(StoreError::Engine)
}

/// Layout 3 -> 4: moves the snapshot's data out of the engine into a file. Safe to run again
/// after a crash part-way: the old value goes only after the new pointer is written (and the
/// caller flushes before recording the new layout version).
pub fn move_snapshot_to_file(kv: &dyn Kv) -> Result<(), StoreError> {
    let Some(mut value) = kv.get(Space::Snapshot, SNAPSHOT).map_err(StoreError::Engine)? else {
        return Ok(());
    };
    let corrupt = |what: String| StoreError::Corrupt { file: kv.location().to_path_buf(), what };
    let (data_len, meta) = split_snapshot(&value).map_err(|what| corrupt(format!("stored snapshot: {what}")))?;
    let meta: pb::SnapshotMeta = codec::decode(meta, "snapshot meta").map_err(|e| corrupt(e.to_string()))?;
    value.truncate(data_len);
    save_snapshot_file(kv, meta, &value)?;
    let mut b = Batch::default();
    b.delete(SNAPSHOT.to_vec());
    kv.write(Space::Snapshot, b).map_err(StoreError::Engine)
}

/// Every user key of the state as the engine stores it (engine key, record), in key order,
/// read off the runtime's threads. Nothing is decoded: a snapshot is built from the records
/// as they are (`encode_snapshot_data`).
async fn read_state(kv: Arc<dyn Kv>) -> Result<Vec<KvPair>, StoreError> {
    tokio::task::spawn_blocking(move || {
        let range = (Bound::Included(vec![USER_PREFIX]), Bound::Excluded(vec![USER_PREFIX + 1]));
        kv.scan(Space::State, range, false).collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| StoreError::Stopped(format!("snapshot task: {e}")))?
    .map_err(StoreError::Engine)
}

/// Lays the engine writes recorded during a read over what it read (user keys only).
/// Both are in key order, so one merge pass does it.
fn lay_over(read: Vec<KvPair>, changed: BTreeMap<Vec<u8>, Option<Vec<u8>>>) -> Vec<KvPair> {
    let mut out = Vec::with_capacity(read.len() + changed.len());
    let mut read = read.into_iter().peekable();
    for (key, value) in changed.into_iter().filter(|(k, _)| k.first() == Some(&USER_PREFIX)) {
        while let Some(kv) = read.next_if(|(k, _)| *k < key) {
            out.push(kv);
        }
        read.next_if(|(k, _)| *k == key);
        out.extend(value.map(|v| (key, v)));
    }
    out.extend(read);
    out
}

/// The encoded `SnapshotData` of the state's records, without decoding them: a record is a
/// `KeyValue` encoded without its key, so the key is appended to it as field 1.
fn encode_snapshot_data(revision: i64, records: &[KvPair]) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    let key_field_len = |key: &[u8]| key_len(1) + encoded_len_varint(key.len() as u64) + key.len();
    let size: usize = records
        .iter()
        .map(|(k, v)| {
            let body = v.len() + key_field_len(&k[1..]);
            key_len(3) + encoded_len_varint(body as u64) + body
        })
        .sum();
    let mut out = Vec::with_capacity(size + 32);
    prost::encoding::uint32::encode(1, &SNAPSHOT_FORMAT, &mut out);
    if revision != 0 {
        prost::encoding::int64::encode(2, &revision, &mut out);
    }
    for (k, v) in records {
        let key = &k[1..];
        encode_key(3, WireType::LengthDelimited, &mut out);
        encode_varint((v.len() + key_field_len(key)) as u64, &mut out);
        out.extend_from_slice(v);
        // After the record, so that it is the key even if a record ever carried one.
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(key.len() as u64, &mut out);
        out.extend_from_slice(key);
    }
    out
}

impl StateMachine {
    /// Reads the state while changes go on, recording them. The changes made during the read
    /// are then laid over it, which gives the state as it was when the read ended, taken
    /// with the meta of that moment. None if a snapshot was installed meanwhile, or if another
    /// such read is under way.
    async fn read_while_changing(&self) -> Result<Option<(Persisted, Vec<KvPair>)>, StoreError> {
        {
            let _quiet = self.shared.changes.write().await;
            let mut recording = self.shared.recording();
            if !matches!(*recording, Recording::Off) {
                return Ok(None);
            }
            *recording = Recording::On(BTreeMap::new());
        }
        // A build dropped midway stops recording too.
        struct Stop<'a>(&'a Shared);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                *self.0.recording() = Recording::Off;
            }
        }
        let stop = Stop(&self.shared);
        let read = read_state(self.kv.clone()).await;
        let (recorded, persisted) = {
            let _quiet = self.shared.changes.write().await;
            let recorded = std::mem::replace(&mut *self.shared.recording(), Recording::Off);
            std::mem::forget(stop);
            (recorded, read_persisted(self.kv.as_ref()))
        };
        let (read, persisted) = (read?, persisted?);
        let Recording::On(changed) = recorded else { return Ok(None) };
        Ok(Some((persisted, lay_over(read, changed))))
    }

    /// Reads the state with every change held off until the read is done.
    async fn read_quiet(&self) -> Result<(Persisted, Vec<KvPair>), StoreError> {
        let _quiet = self.shared.changes.write().await;
        let persisted = read_persisted(self.kv.as_ref())?;
        Ok((persisted, read_state(self.kv.clone()).await?))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let err = store_err(ErrorSubject::Snapshot(None), ErrorVerb::Read);
        let (persisted, records) = match self.read_while_changing().await.map_err(&err)? {
            Some(read) => read,
            None => self.read_quiet().await.map_err(&err)?,
        };
        let snapshot_id = match &persisted.applied {
            Some(l) => format!("{}-{}-{}-r{}", l.leader_id.term, l.leader_id.node_id, l.index, persisted.revision),
            None => format!("empty-r{}", persisted.revision),
        };
        let meta = SnapshotMeta { last_log_id: persisted.applied, last_membership: persisted.membership, snapshot_id };
        // Encoded and saved once changes may run again, still off the runtime's threads.
        let stopped = |e: tokio::task::JoinError| StoreError::Stopped(format!("snapshot task: {e}"));
        let (kv, saved_meta, revision) = (self.kv.clone(), meta.clone(), persisted.revision);
        let _saving = self.shared.saving.lock().await;
        let data = tokio::task::spawn_blocking(move || {
            let data = encode_snapshot_data(revision, &records);
            save_snapshot(kv.as_ref(), &saved_meta, &data).map(|()| data)
        })
        .await
        .map_err(|e| err(stopped(e)))?
        .map_err(store_err(ErrorSubject::Snapshot(None), ErrorVerb::Write))?;
        self.kv.flush().await.map_err(|e| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        keep_only_current(self.kv.as_ref()).map_err(store_err(ErrorSubject::Snapshot(None), ErrorVerb::Delete))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kv::gated::GatedKv;
    use crate::store::kv::MemKv;

    fn meta() -> SnapshotMeta<u64, Member> {
        SnapshotMeta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(3, 1), 42)),
            last_membership: StoredMembership::default(),
            snapshot_id: "3-1-42-r40".into(),
        }
    }

    fn entry(index: u64, ops: Vec<pb::request_op::Request>) -> Entry {
        let txn = pb::TxnRequest {
            success: ops.into_iter().map(|r| pb::RequestOp { request: Some(r) }).collect(),
            ..Default::default()
        };
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(super::super::Request(pb::TxnBatch { txns: vec![txn] })),
        }
    }

    fn put(key: &str, value: &str) -> pb::request_op::Request {
        pb::request_op::Request::RequestPut(pb::PutRequest { key: key.into(), value: value.into(), prev_kv: false })
    }

    fn state_of(kvs: &[pb::KeyValue]) -> Vec<(String, String, i64)> {
        kvs.iter()
            .map(|kv| {
                (String::from_utf8_lossy(&kv.key).into(), String::from_utf8_lossy(&kv.value).into(), kv.mod_revision)
            })
            .collect()
    }

    const LONG: std::time::Duration = std::time::Duration::from_secs(10);

    type Build = tokio::task::JoinHandle<Result<Snapshot<TypeConfig>, StorageError>>;

    /// A state machine holding a=1 and b=1 (entry 1), and a snapshot build of it whose read
    /// of the state is held after its first key.
    async fn build_with_its_read_held() -> (Arc<GatedKv>, StateMachine, Build) {
        use crate::store::watch::{WatchConfig, WatchHub};
        let kv = Arc::new(GatedKv::default());
        let hub = |rev| WatchHub::new(rev, WatchConfig::default());
        let mut sm = StateMachine::open(kv.clone(), hub, 1, Durability::everything()).unwrap();
        sm.apply([entry(1, vec![put("a", "1"), put("b", "1")])]).await.unwrap();
        kv.hold_read(true);
        let mut builder = sm.get_snapshot_builder().await;
        let build = tokio::spawn(async move { builder.build_snapshot().await });
        while !kv.read_waiting() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        (kv, sm, build)
    }

    #[tokio::test]
    async fn a_snapshot_read_holds_up_no_change_and_gives_the_state_at_its_end() {
        let (kv, mut sm, build) = build_with_its_read_held().await;
        // The read is under way and held: changes still go through.
        let delete_b = pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
            key: "b".into(),
            ..Default::default()
        });
        tokio::time::timeout(LONG, sm.apply([entry(2, vec![put("a", "2"), delete_b, put("c", "1")])]))
            .await
            .expect("a change waited for the snapshot's read")
            .unwrap();
        assert!(!build.is_finished());
        kv.hold_read(false);

        let snap = tokio::time::timeout(LONG, build).await.unwrap().unwrap().unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(2), "the meta is of the read's end");
        let data: pb::SnapshotData = codec::decode(snap.snapshot.get_ref(), "snapshot").unwrap();
        assert_eq!(data.revision, 2);
        assert_eq!(state_of(&data.kvs), [("a".into(), "2".into(), 2), ("c".into(), "1".into(), 2)]);
        let now = Overlay::new(kv.as_ref()).range(&txn::KeyRange::new(b"", &[0])).unwrap();
        assert_eq!(data.kvs, now, "the snapshot is the state as it stands");
        assert!(matches!(*sm.shared().recording(), Recording::Off), "recording stopped");
    }

    #[tokio::test]
    async fn a_snapshot_installed_during_a_snapshot_read_is_what_the_read_gives() {
        let (kv, mut sm, build) = build_with_its_read_held().await;
        let x = pb::KeyValue { key: "x".into(), value: "9".into(), create_revision: 7, mod_revision: 7, version: 1 };
        let installed = pb::SnapshotData { format_version: SNAPSHOT_FORMAT, revision: 7, kvs: vec![x] };
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(2, 2), 5)),
            last_membership: StoredMembership::default(),
            snapshot_id: "2-2-5-r7".into(),
        };
        tokio::time::timeout(LONG, sm.install_snapshot(&meta, Box::new(Cursor::new(installed.encode_to_vec()))))
            .await
            .expect("an install waited for the snapshot's read")
            .unwrap();
        kv.hold_read(false);

        let snap = tokio::time::timeout(LONG, build).await.unwrap().unwrap().unwrap();
        assert_eq!(snap.meta.last_log_id, meta.last_log_id);
        let data: pb::SnapshotData = codec::decode(snap.snapshot.get_ref(), "snapshot").unwrap();
        assert_eq!((data.revision, state_of(&data.kvs)), (7, vec![("x".into(), "9".into(), 7)]));
        assert!(matches!(*sm.shared().recording(), Recording::Off), "recording stopped");
    }

    #[test]
    fn snapshot_data_built_from_stored_records_decodes_to_those_records() {
        let kv = |key: &[u8], value: Vec<u8>, rev: i64| pb::KeyValue {
            key: key.to_vec(),
            value,
            create_revision: rev,
            mod_revision: rev + 1,
            version: 2,
        };
        let kvs = vec![kv(b"a", b"1".to_vec(), 1), kv(b"b/\xff\x00", vec![7; 300], 5), kv(b"c", Vec::new(), 9)];
        let records: Vec<KvPair> = kvs
            .iter()
            .map(|k| {
                ([&[USER_PREFIX][..], &k.key].concat(), pb::KeyValue { key: Vec::new(), ..k.clone() }.encode_to_vec())
            })
            .collect();
        for revision in [0, 42] {
            let data = encode_snapshot_data(revision, &records);
            let decoded = pb::SnapshotData::decode(&data[..]).unwrap();
            assert_eq!(decoded, pb::SnapshotData { format_version: SNAPSHOT_FORMAT, revision, kvs: kvs.clone() });
        }
        assert_eq!(pb::SnapshotData::decode(&encode_snapshot_data(3, &[])[..]).unwrap().kvs, vec![]);
    }

    fn snapshot_files(kv: &dyn Kv) -> Vec<String> {
        kv.list_files().unwrap().into_iter().filter(|n| n.starts_with(SNAPSHOT_FILE_PREFIX)).collect()
    }

    #[test]
    fn a_saved_snapshot_reads_back_whole_from_its_file_and_replaces_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let kv = crate::store::kv::SledKv::open(dir.path(), 1 << 20).unwrap();
        assert!(read_snapshot(&kv).unwrap().is_none());
        let mut newer = meta();
        for data in [Vec::new(), vec![9u8; 3 << 20]] {
            newer.last_log_id.as_mut().unwrap().index += 1;
            save_snapshot(&kv, &newer, &data).unwrap();
            kv.flush_blocking().unwrap();
            keep_only_current(&kv).unwrap();
            assert_eq!(read_snapshot(&kv).unwrap().unwrap(), (newer.clone(), data));
            assert_eq!(snapshot_files(&kv).len(), 1, "the replaced file is gone");
        }
        // The data is not in the engine: no blob of its size exists.
        let blobs = std::fs::read_dir(dir.path().join("blobs")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(blobs, 0);
        // An older snapshot (a build that read the state before an install) replaces nothing.
        save_snapshot(&kv, &meta(), b"older").unwrap();
        assert_eq!(read_snapshot(&kv).unwrap().unwrap().0, newer);
        drop(kv);
        let kv = crate::store::kv::SledKv::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(read_snapshot(&kv).unwrap().unwrap().1.len(), 3 << 20, "it survives a reopen");
    }

    #[test]
    fn a_damaged_or_missing_snapshot_is_refused_by_name() {
        let kv = MemKv::default();
        let named = |name: &str, sha: usize| {
            pb::SnapshotFile { name: name.into(), sha256: vec![0; sha], ..Default::default() }.encode_to_vec()
        };
        for bad in [
            vec![1u8],
            vec![0, 200, b's'],
            named("../db", 32),
            named("snapshot-1.bin", 31),
            named("snapshot-1.bin", 32),
        ] {
            let mut b = Batch::default();
            b.put(SNAPSHOT_FILE.to_vec(), bad);
            kv.write(Space::Snapshot, b).unwrap();
            let e = read_snapshot(&kv).unwrap_err().to_string();
            assert!(e.contains("stored snapshot"), "{e}");
        }
        let mut b = Batch::default();
        b.delete(SNAPSHOT_FILE.to_vec());
        kv.write(Space::Snapshot, b).unwrap();
        save_snapshot(&kv, &meta(), b"the state").unwrap();
        let name = snapshot_files(&kv).pop().unwrap();
        kv.write_file(&name, b"the stale").unwrap();
        let e = read_snapshot(&kv).unwrap_err().to_string();
        assert!(e.contains(&name) && e.contains("damaged"), "{e}");
        kv.remove_file(&name).unwrap();
        let e = read_snapshot(&kv).unwrap_err().to_string();
        assert!(e.contains(&name) && e.contains("missing"), "{e}");
    }

    #[test]
    fn snapshots_of_layouts_2_and_3_are_moved_into_a_file() {
        let kv = MemKv::default();
        let state = pb::SnapshotData { format_version: SNAPSHOT_FORMAT, revision: 40, kvs: vec![] }.encode_to_vec();
        let mut b = Batch::default();
        b.put(OLD_SNAP_META.to_vec(), codec::snapshot_meta_to_pb(&meta()).encode_to_vec());
        b.put(OLD_SNAP_DATA.to_vec(), state.clone());
        kv.write(Space::Snapshot, b).unwrap();
        // A second run (a crash before the version was written) changes nothing.
        for _ in 0..2 {
            upgrade_snapshot_layout(&kv).unwrap();
            move_snapshot_to_file(&kv).unwrap();
        }
        assert_eq!(read_snapshot(&kv).unwrap().unwrap(), (meta(), state.clone()));
        for old in [OLD_SNAP_META, OLD_SNAP_DATA, SNAPSHOT] {
            assert_eq!(kv.get(Space::Snapshot, old).unwrap(), None);
        }
        assert_eq!(snapshot_files(&kv).len(), 1);
        // A crash after the file, before the old value went: the run again leaves one file
        // in use, and opening removes the other.
        let mut b = Batch::default();
        b.put(SNAPSHOT.to_vec(), snapshot_value(&codec::snapshot_meta_to_pb(&meta()).encode_to_vec(), &state));
        kv.write(Space::Snapshot, b).unwrap();
        move_snapshot_to_file(&kv).unwrap();
        assert_eq!(snapshot_files(&kv).len(), 2);
        let hub = |rev| crate::store::watch::WatchHub::new(rev, crate::store::watch::WatchConfig::default());
        StateMachine::open(Arc::new(kv.clone()), hub, 1, Durability::everything()).unwrap();
        assert_eq!(snapshot_files(&kv).len(), 1);
        assert_eq!(read_snapshot(&kv).unwrap().unwrap(), (meta(), state.clone()));
    }
}
