//! The Raft log and vote, persisted in the engine.
//!
//! Appends are written at once; a single flusher thread serves every append queued while the
//! previous flush ran (group commit). Each entry is stored with a CRC so that a torn or
//! corrupt tail is detected at start-up.
//!
//! A follower acknowledges an append to openraft only after its flush. The leader
//! acknowledges its own new entries at once, so that its flush overlaps their replication
//! (openraft 0.9 sends entries to followers only after the leader's append is acknowledged).
//! openraft then counts the leader's copy in a quorum before it is on disk, so nothing may act
//! on a commit until it is: see [`Durability`].

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, Vote};
use prost::Message;

use super::codec::{self, Entry};
use super::faults::Faults;
use super::{storage_err, StorageError, TypeConfig};
use crate::proto::v1 as pb;
use crate::store::kv::{Batch, Kv, Space};
use crate::store::StoreError;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

fn index_key(index: u64) -> Vec<u8> {
    index.to_be_bytes().to_vec()
}

fn key_index(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// `crc32 (4 bytes, big-endian) ++ protobuf entry`.
fn encode_entry(e: &Entry) -> Vec<u8> {
    let body = codec::entry_to_pb(e).encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("entry is shorter than its checksum")]
    Short,
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
}

fn decode_entry(bytes: &[u8]) -> Result<Entry, EntryError> {
    if bytes.len() < 4 {
        return Err(EntryError::Short);
    }
    let (crc, body) = bytes.split_at(4);
    let stored = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(EntryError::Checksum { stored, computed });
    }
    Ok(codec::entry_from_pb(codec::decode(body, "log entry")?)?)
}

/// An append waiting for the next flush: with openraft's callback, or without one when it was
/// acknowledged already (the leader's own entries).
type FlushJob = Option<LogFlushed<TypeConfig>>;

/// How far this replica's own log is on disk, for the gates that make the leader's early
/// acknowledgement safe.
///
/// openraft commits an entry once a quorum has it, counting the leader as soon as its append
/// is acknowledged. So two things wait here for the leader's copy:
/// - the state machine, before it applies an entry: a write is answered, and read or watched,
///   only once it is applied;
/// - the network, before it tells followers that an entry is committed: a follower applies
///   only what it has been told is committed. If the flush takes longer than a fraction of
///   the heartbeat, the message goes out anyway with the commit lowered to what is on disk,
///   so that a slow disk does not also silence the heartbeats and start an election.
///
/// Anything applied anywhere is then on the leader's disk and on the disk of every follower
/// that acknowledged it (a follower acknowledges only after its own flush), which is a
/// majority. An entry that lost its leader's copy to a crash was never applied or answered,
/// so Raft may still drop it. On a follower the gates are already open when they are reached:
/// its entries are flushed before openraft hears of them.
#[derive(Clone)]
pub struct Durability {
    inner: Arc<DurabilityInner>,
}

struct DurabilityInner {
    written: Mutex<Written>,
    flushed: tokio::sync::watch::Sender<Flushed>,
}

/// The last entry written to the engine, and how many truncations came before it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Written {
    last: Option<LogId<u64>>,
    epoch: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Flushed {
    /// Every entry up to this one is on disk.
    Upto(Option<LogId<u64>>),
    /// A flush failed; nothing after it can be trusted.
    Failed(String),
}

fn index_of(id: &Option<LogId<u64>>) -> u64 {
    id.map_or(0, |l| l.index)
}

/// Why a wait for durability ended without it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the log could not be made durable: {0}")]
pub struct NotDurable(String);

impl Durability {
    /// Everything up to `last` is on disk already.
    pub fn new(last: Option<LogId<u64>>) -> Durability {
        Durability {
            inner: Arc::new(DurabilityInner {
                written: Mutex::new(Written { last, epoch: 0 }),
                flushed: tokio::sync::watch::Sender::new(Flushed::Upto(last)),
            }),
        }
    }

    /// Nothing waits: for a state machine fed entries that no log of this replica holds
    /// (openraft's conformance suite).
    pub fn everything() -> Durability {
        Durability::new(Some(LogId::new(openraft::CommittedLeaderId::new(u64::MAX, 0), u64::MAX)))
    }

    fn written(&self) -> std::sync::MutexGuard<'_, Written> {
        self.inner.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries up to `last` were written to the engine (not yet flushed).
    fn wrote(&self, last: LogId<u64>) {
        self.written().last = Some(last);
    }

    /// Entries after `kept` were removed; earlier flushes say nothing about what replaces
    /// them.
    fn truncated(&self, kept: Option<LogId<u64>>) {
        let mut w = self.written();
        if index_of(&w.last) > index_of(&kept) {
            w.last = kept;
        }
        w.epoch += 1;
        self.inner.flushed.send_modify(|f| {
            if let Flushed::Upto(upto) = f {
                if index_of(upto) > index_of(&kept) {
                    *upto = kept;
                }
            }
        });
    }

    /// What a flush starting now will cover.
    fn mark(&self) -> Written {
        *self.written()
    }

    /// A flush that started at `mark` succeeded.
    fn flushed(&self, mark: Written) {
        let w = self.written();
        if w.epoch != mark.epoch {
            return;
        }
        self.inner.flushed.send_if_modified(|f| match f {
            Flushed::Upto(upto) if index_of(upto) < index_of(&mark.last) => {
                *upto = mark.last;
                true
            }
            _ => false,
        });
    }

    fn failed(&self, why: String) {
        self.inner.flushed.send_replace(Flushed::Failed(why));
    }

    /// Waits until the entry at `index` is on this replica's disk.
    pub async fn reached(&self, index: u64) -> Result<(), NotDurable> {
        let mut rx = self.inner.flushed.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                Flushed::Upto(upto) if index_of(upto) >= index => return Ok(()),
                Flushed::Failed(why) => return Err(NotDurable(why.clone())),
                Flushed::Upto(_) => {}
            }
            // The sender lives as long as `self`.
            if rx.changed().await.is_err() {
                return Err(NotDurable("the log store is gone".into()));
            }
        }
    }

    /// The commit a leader may tell its followers: `commit` once it is on disk here, waiting
    /// up to `patience` for that; after that, the last entry on disk, which is below it.
    pub async fn announceable(
        &self,
        commit: LogId<u64>,
        patience: std::time::Duration,
    ) -> Result<Option<LogId<u64>>, NotDurable> {
        match tokio::time::timeout(patience, self.reached(commit.index)).await {
            Ok(reached) => reached.map(|()| Some(commit)),
            Err(_) => match &*self.inner.flushed.borrow() {
                Flushed::Upto(upto) if index_of(upto) >= commit.index => Ok(Some(commit)),
                Flushed::Upto(upto) => Ok(*upto),
                Flushed::Failed(why) => Err(NotDurable(why.clone())),
            },
        }
    }
}

/// The log store. Cheap to clone; clones share the engine and the flusher.
#[derive(Clone)]
pub struct LogStore {
    kv: Arc<dyn Kv>,
    flusher: std::sync::mpsc::Sender<FlushJob>,
    /// This replica's id: its own entries, as leader, are acknowledged before their flush.
    id: u64,
    /// The last vote saved, so that an append knows whether it is this leader's own.
    vote: Arc<Mutex<Option<Vote<u64>>>>,
    durability: Durability,
}

impl LogStore {
    /// Opens the log of replica `id`, checks it from end to end, and repairs a corrupt tail
    /// that was never acknowledged. Corruption anywhere else is refused. `faults` may hold its
    /// flushes (tests).
    pub fn open(kv: Arc<dyn Kv>, id: u64, faults: Arc<Faults>) -> Result<LogStore, StoreError> {
        verify_and_repair(kv.as_ref())?;
        // What was read back counts as durable: the engine syncs its files as it opens
        // (`SledKv::open`), so even a page cache left by a killed process is on disk by now.
        let durability = Durability::new(match last_log_id(kv.as_ref()) {
            Some(last) => Some(last),
            None => last_purged(kv.as_ref())?,
        });
        let vote = stored_vote(kv.as_ref())?;
        let (tx, rx) = std::sync::mpsc::channel();
        let engine = kv.clone();
        let flushes = durability.clone();
        std::thread::Builder::new()
            .name("log flusher".into())
            .spawn(move || flusher(engine, rx, flushes, move || faults.wait_log_flush(id)))
            .map_err(|e| StoreError::Stopped(format!("cannot start the log flusher thread: {e}")))?;
        Ok(LogStore { kv, flusher: tx, id, vote: Arc::new(Mutex::new(vote)), durability })
    }

    /// The durability of this log, for the state machine and the network.
    pub fn durability(&self) -> Durability {
        self.durability.clone()
    }

    /// The leader id of entries this replica creates as the established leader, if it is one.
    fn own_leader(&self) -> Option<openraft::LeaderId<u64>> {
        let vote = self.vote.lock().unwrap_or_else(|p| p.into_inner());
        vote.as_ref().filter(|v| v.is_committed() && v.leader_id().voted_for() == Some(self.id)).map(|v| *v.leader_id())
    }

    fn read_log_id(&self, key: &[u8]) -> Result<Option<LogId<u64>>, StorageError> {
        fn err<E: std::error::Error + 'static>(e: E) -> StorageError {
            storage_err(ErrorSubject::Store, ErrorVerb::Read, e)
        }
        match self.kv.get(Space::RaftMeta, key).map_err(err)? {
            None => Ok(None),
            Some(b) => {
                let id: pb::LogId = codec::decode(&b, "log id").map_err(err)?;
                Ok(Some(codec::log_id_from_pb(&id).map_err(err)?))
            }
        }
    }

    fn write_meta(&self, key: &[u8], value: Option<Vec<u8>>, subject: ErrorSubject<u64>) -> Result<(), StorageError> {
        let mut b = Batch::default();
        match value {
            Some(v) => b.put(key.to_vec(), v),
            None => b.delete(key.to_vec()),
        }
        self.kv.write(Space::RaftMeta, b).map_err(|e| storage_err(subject, ErrorVerb::Write, e))
    }

    async fn flush(&self, subject: ErrorSubject<u64>) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        let mark = self.durability.mark();
        if let Err(e) = self.kv.flush().await {
            self.durability.failed(e.to_string());
            return Err(storage_err(subject, ErrorVerb::Write, e));
        }
        self.durability.flushed(mark);
        warn_if_slow(started, &subject);
        Ok(())
    }
}

/// The purge point (`raft_meta/last_purged`), if the log was ever purged.
fn last_purged(kv: &dyn Kv) -> Result<Option<LogId<u64>>, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt { file: kv.location().to_path_buf(), what };
    match kv.get(Space::RaftMeta, LAST_PURGED).map_err(StoreError::Engine)? {
        Some(b) => {
            let id: pb::LogId = codec::decode(&b, "last purged log id").map_err(|e| corrupt(e.to_string()))?;
            Ok(Some(codec::log_id_from_pb(&id).map_err(|e| corrupt(e.to_string()))?))
        }
        None => Ok(None),
    }
}

/// The id of the last entry in the log, if any.
pub fn last_log_id(kv: &dyn Kv) -> Option<LogId<u64>> {
    let (_, v) = kv.scan(Space::Log, (Bound::Unbounded, Bound::Unbounded), true).next()?.ok()?;
    decode_entry(&v).ok().map(|e| e.log_id)
}

/// A stored vote (`raft_meta/vote`).
fn decode_vote(bytes: &[u8]) -> Result<Vote<u64>, codec::CodecError> {
    codec::vote_from_pb(&Some(codec::decode::<pb::Vote>(bytes, "vote")?))
}

/// The vote stored in `raft_meta/vote`, if any.
fn stored_vote(kv: &dyn Kv) -> Result<Option<Vote<u64>>, StoreError> {
    match kv.get(Space::RaftMeta, VOTE).map_err(StoreError::Engine)? {
        Some(b) => Ok(Some(
            decode_vote(&b)
                .map_err(|e| StoreError::Corrupt { file: kv.location().to_path_buf(), what: format!("vote: {e}") })?,
        )),
        None => Ok(None),
    }
}

/// Stores a vote and makes it durable, outside openraft (recovery and start-up).
fn store_vote_blocking(kv: &dyn Kv, vote: &Vote<u64>) -> Result<(), StoreError> {
    let mut b = Batch::default();
    b.put(VOTE.to_vec(), codec::vote_to_pb(vote).encode_to_vec());
    kv.write(Space::RaftMeta, b).map_err(StoreError::Engine)?;
    kv.flush_blocking().map_err(StoreError::Engine)
}

/// A replica that was leader when it stopped starts again as a candidate of its old term
/// rather than as leader. Returns whether it was leader.
///
/// openraft 0.9 restores such a replica as leader at once, in the same term and with no new
/// entry. Its read index is then the larger of its term's first entry and its stored commit
/// marker, and that marker is not flushed (see `save_committed`), so it can be older than
/// writes the replica acknowledged before it stopped: a linearizable read served right after
/// the restart could miss them (the kill -9 test caught this about once in ten runs). As a
/// candidate, it or another replica wins a new term, whose first entry commits everything
/// before it, and read indexes are taken from there. The vote keeps its term and candidate,
/// so it grants nothing it had not granted before.
pub fn step_down_at_start(kv: &dyn Kv, id: u64) -> Result<bool, StoreError> {
    let Some(vote) = stored_vote(kv)? else { return Ok(false) };
    if !vote.is_committed() || vote.leader_id().voted_for() != Some(id) {
        return Ok(false);
    }
    store_vote_blocking(kv, &Vote::new(vote.leader_id().term, id))?;
    Ok(true)
}

/// What `force_single_voter` did.
#[derive(Debug, Clone, Copy)]
pub struct Forced {
    /// The last log index before the new membership entry.
    pub last_index: u64,
    pub term: u64,
}

/// Quorum recovery: appends a membership entry that makes `id` the only voter, in a term
/// above every term this log has seen, and votes for itself in it. Nothing else changes:
/// every entry this replica holds is kept and, once it elects itself, committed.
pub fn force_single_voter(kv: &dyn Kv, id: u64, member: crate::store::Member) -> Result<Forced, StoreError> {
    verify_and_repair(kv)?;
    let last = match kv.scan(Space::Log, (Bound::Unbounded, Bound::Unbounded), true).next() {
        Some(item) => {
            let (_, v) = item.map_err(StoreError::Engine)?;
            Some(decode_entry(&v).map_err(|e| StoreError::Stopped(format!("last log entry: {e}")))?.log_id)
        }
        None => None,
    };
    let purged = match kv.get(Space::RaftMeta, LAST_PURGED).map_err(StoreError::Engine)? {
        Some(b) => {
            let id: pb::LogId = codec::decode(&b, "log id").map_err(|e| StoreError::Stopped(e.to_string()))?;
            Some(codec::log_id_from_pb(&id).map_err(|e| StoreError::Stopped(e.to_string()))?)
        }
        None => None,
    };
    let last = last.or(purged);
    let vote_term = match kv.get(Space::RaftMeta, VOTE).map_err(StoreError::Engine)? {
        Some(b) => decode_vote(&b).map_err(|e| StoreError::Stopped(e.to_string()))?.leader_id.term,
        None => 0,
    };
    let term = vote_term.max(last.map_or(0, |l| l.leader_id.term)) + 1;
    let index = last.map_or(0, |l| l.index) + 1;
    let membership = openraft::Membership::new(
        vec![[id].into()],
        [(id, member)].into_iter().collect::<std::collections::BTreeMap<_, _>>(),
    );
    let entry = Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(term, id), index),
        payload: openraft::EntryPayload::Membership(membership),
    };
    let mut log = Batch::default();
    log.put(index_key(index), encode_entry(&entry));
    kv.write(Space::Log, log).map_err(StoreError::Engine)?;
    store_vote_blocking(kv, &Vote::new(term, id))?;
    Ok(Forced { last_index: index - 1, term })
}

/// A log flush slower than this is logged: every write waits for it.
const SLOW_FLUSH: std::time::Duration = std::time::Duration::from_millis(20);

/// Logs a flush that began at `started` and took longer than `SLOW_FLUSH`; `of` says what
/// it made durable (formatted only then).
fn warn_if_slow(started: std::time::Instant, of: &dyn std::fmt::Debug) {
    let took = started.elapsed();
    if took > SLOW_FLUSH {
        tracing::warn!(ms = took.as_millis() as u64, of = ?of, "a log flush was slow");
    }
}

/// Completes every queued append with one flush. A dedicated thread: the flush blocks, and
/// calling it directly skips a hop through the engine's own thread pool.
fn flusher(kv: Arc<dyn Kv>, rx: std::sync::mpsc::Receiver<FlushJob>, durability: Durability, stall: impl Fn()) {
    while let Ok(first) = rx.recv() {
        stall();
        let mut jobs = vec![first];
        while let Ok(more) = rx.try_recv() {
            jobs.push(more);
        }
        // Every queued append was written before it was queued, so the flush covers it.
        let mark = durability.mark();
        let started = std::time::Instant::now();
        let result = kv.flush_blocking();
        warn_if_slow(started, &format_args!("{} appends", jobs.len()));
        // The gates open before openraft hears of the flush.
        match &result {
            Ok(()) => durability.flushed(mark),
            Err(e) => durability.failed(e.to_string()),
        }
        for job in jobs.into_iter().flatten() {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            job.log_io_completed(r);
        }
    }
}

/// Reads the committed marker and scans the log. A bad entry with valid entries after it, or
/// at or below the committed index, cannot be repaired; a bad tail above it is truncated.
fn verify_and_repair(kv: &dyn Kv) -> Result<(), StoreError> {
    let file = kv.location().to_path_buf();
    let committed = match kv.get(Space::RaftMeta, COMMITTED).map_err(StoreError::Engine)? {
        Some(b) => {
            let id: pb::LogId = codec::decode(&b, "committed log id")
                .map_err(|e| StoreError::Corrupt { file: file.clone(), what: format!("committed marker: {e}") })?;
            Some(id.index)
        }
        None => None,
    };
    let mut first_bad: Option<(u64, String)> = None;
    let mut prev: Option<u64> = None;
    for item in kv.scan(Space::Log, (Bound::Unbounded, Bound::Unbounded), false) {
        let (k, v) = item.map_err(StoreError::Engine)?;
        let index = key_index(&k).ok_or_else(|| StoreError::Corrupt {
            file: file.clone(),
            what: format!("log key {k:?} is not an index"),
        })?;
        let problem = match decode_entry(&v) {
            Err(e) => Some(e.to_string()),
            Ok(e) if e.log_id.index != index => {
                Some(format!("entry stored at {index} claims index {}", e.log_id.index))
            }
            Ok(_) => match prev {
                Some(p) if p + 1 != index => Some(format!("gap in the log between {p} and {index}")),
                _ => None,
            },
        };
        match (&first_bad, problem) {
            (None, Some(what)) => first_bad = Some((index, what)),
            (Some((bad, what)), None) => {
                return Err(StoreError::Corrupt {
                    file,
                    what: format!("log entry {bad} is damaged ({what}) but later entries are intact; this is not a torn tail and cannot be repaired"),
                })
            }
            _ => {}
        }
        prev = Some(index);
    }
    if let Some((bad, what)) = first_bad {
        if committed.is_some_and(|c| bad <= c) {
            return Err(StoreError::Corrupt {
                file,
                what: format!(
                    "committed log entry {bad} is damaged ({what}); restore this replica from a peer or a snapshot"
                ),
            });
        }
        tracing::warn!(file = %file.display(), index = bad, problem = %what, "truncating a damaged, unacknowledged log tail");
        let mut batch = Batch::default();
        for item in kv.scan(Space::Log, (Bound::Included(index_key(bad)), Bound::Unbounded), false) {
            let (k, _) = item.map_err(StoreError::Engine)?;
            batch.delete(k);
        }
        kv.write(Space::Log, batch).map_err(StoreError::Engine)?;
    }
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.kv.scan(Space::Log, (start, end), false) {
            let (_, v) = item.map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            out.push(decode_entry(&v).map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged = self.read_log_id(LAST_PURGED)?;
        let last = self.kv.scan(Space::Log, (Bound::Unbounded, Bound::Unbounded), true).next();
        let last_log_id = match last {
            Some(item) => {
                let (_, v) = item.map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
                Some(decode_entry(&v).map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))?.log_id)
            }
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.write_meta(VOTE, Some(codec::vote_to_pb(vote).encode_to_vec()), ErrorSubject::Vote)?;
        // A vote must be durable before it is acted on.
        self.flush(ErrorSubject::Vote).await?;
        *self.vote.lock().unwrap_or_else(|p| p.into_inner()) = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        fn err<E: std::error::Error + 'static>(e: E) -> StorageError {
            storage_err(ErrorSubject::Vote, ErrorVerb::Read, e)
        }
        match self.kv.get(Space::RaftMeta, VOTE).map_err(err)? {
            None => Ok(None),
            Some(b) => Ok(Some(decode_vote(&b).map_err(err)?)),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageError> {
        // Not flushed: a stale committed marker only makes a restart re-apply from the state
        // machine's own applied index, which is always safe.
        self.write_meta(COMMITTED, committed.map(|c| codec::log_id_to_pb(&c).encode_to_vec()), ErrorSubject::Store)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError> {
        self.read_log_id(COMMITTED)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let leader = self.own_leader();
        let mut own = leader.is_some();
        let mut last: Option<LogId<u64>> = None;
        let mut batch = Batch::default();
        for e in entries {
            own &= leader.as_ref() == Some(&e.log_id.leader_id);
            last = Some(e.log_id);
            batch.put(index_key(e.log_id.index), encode_entry(&e));
        }
        self.kv.write(Space::Log, batch).map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        if let Some(last) = last {
            self.durability.wrote(last);
        }
        // The leader's own entries are acknowledged now and flushed behind the gates of
        // `Durability`; anything else only once the flusher has made it durable.
        let job = if own && last.is_some() {
            callback.log_io_completed(Ok(()));
            None
        } else {
            Some(callback)
        };
        if let Err(std::sync::mpsc::SendError(job)) = self.flusher.send(job) {
            self.durability.failed("log flusher stopped".into());
            if let Some(job) = job {
                job.log_io_completed(Err(std::io::Error::other("log flusher stopped")));
            }
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let mut batch = Batch::default();
        for item in self.kv.scan(Space::Log, (Bound::Included(index_key(log_id.index)), Bound::Unbounded), false) {
            let (k, _) = item.map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            batch.delete(k);
        }
        self.kv.write(Space::Log, batch).map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        let kept = match log_id.index.checked_sub(1) {
            Some(prev) => match self.kv.get(Space::Log, &index_key(prev)) {
                Ok(Some(v)) => decode_entry(&v).ok().map(|e| e.log_id),
                _ => last_purged(self.kv.as_ref()).ok().flatten().filter(|p| p.index == prev),
            },
            None => None,
        };
        self.durability.truncated(kept);
        self.flush(ErrorSubject::Logs).await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        // Record the purge point first: a crash in between leaves extra entries, never a hole.
        self.write_meta(LAST_PURGED, Some(codec::log_id_to_pb(&log_id).encode_to_vec()), ErrorSubject::Logs)?;
        let mut batch = Batch::default();
        for item in self.kv.scan(Space::Log, (Bound::Unbounded, Bound::Included(index_key(log_id.index))), false) {
            let (k, _) = item.map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            batch.delete(k);
        }
        self.kv.write(Space::Log, batch).map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    pub(crate) fn blank(index: u64) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    fn put_raw(kv: &dyn Kv, index: u64, bytes: Vec<u8>) {
        let mut b = Batch::default();
        b.put(index_key(index), bytes);
        kv.write(Space::Log, b).unwrap();
    }

    #[tokio::test]
    async fn damaged_unacknowledged_tail_is_truncated() {
        let kv = crate::store::kv::MemKv::new();
        for i in 1..=5 {
            put_raw(&kv, i, encode_entry(&blank(i)));
        }
        let mut torn = encode_entry(&blank(6));
        torn.truncate(torn.len() - 2);
        put_raw(&kv, 6, torn);
        let kv: Arc<dyn Kv> = Arc::new(kv);
        let mut store = LogStore::open(kv.clone(), 1, Faults::new()).unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(5));
    }

    #[tokio::test]
    async fn damage_below_the_commit_point_or_mid_log_refuses_to_start() {
        let mid = crate::store::kv::MemKv::new();
        for i in 1..=5 {
            put_raw(&mid, i, encode_entry(&blank(i)));
        }
        put_raw(&mid, 3, b"garbage!".to_vec());
        let err = verify_and_repair(&mid).unwrap_err().to_string();
        assert!(err.contains("log entry 3 is damaged") && err.contains("cannot be repaired"), "{err}");

        let tail = crate::store::kv::MemKv::new();
        for i in 1..=5 {
            put_raw(&tail, i, encode_entry(&blank(i)));
        }
        put_raw(&tail, 5, b"garbage!".to_vec());
        let mut b = Batch::default();
        b.put(COMMITTED.to_vec(), codec::log_id_to_pb(&blank(5).log_id).encode_to_vec());
        tail.write(Space::RaftMeta, b).unwrap();
        let err = verify_and_repair(&tail).unwrap_err().to_string();
        assert!(err.contains("committed log entry 5 is damaged"), "{err}");
    }

    fn entry_of(term: u64, leader: u64, index: u64) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(term, leader), index), payload: EntryPayload::Blank }
    }

    const SHORT: std::time::Duration = std::time::Duration::from_millis(200);
    const LONG: std::time::Duration = std::time::Duration::from_secs(10);

    #[tokio::test]
    async fn only_the_leaders_own_entries_are_acknowledged_before_their_flush() {
        use openraft::storage::RaftLogStorageExt;
        let kv = Arc::new(crate::store::kv::gated::GatedKv::default());
        let mut store = LogStore::open(kv.clone(), 1, Faults::new()).unwrap();
        let durable = store.durability();

        // Replica 1 leads term 3: its entries are acknowledged at once, durable only later.
        store.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
        kv.hold_flushes(true);
        tokio::time::timeout(LONG, store.blocking_append([entry_of(3, 1, 1), entry_of(3, 1, 2)]))
            .await
            .expect("the leader's own append is acknowledged while its flush is held")
            .unwrap();
        assert!(tokio::time::timeout(SHORT, durable.reached(2)).await.is_err(), "durable before the flush");
        kv.hold_flushes(false);
        tokio::time::timeout(LONG, durable.reached(2)).await.unwrap().unwrap();

        // Replica 2 leads term 4, and its entries (and an old one of replica 1's, resent by
        // it) are acknowledged only after their flush.
        store.save_vote(&Vote::new_committed(4, 2)).await.unwrap();
        for (i, e) in [entry_of(4, 2, 3), entry_of(3, 1, 4)].into_iter().enumerate() {
            kv.hold_flushes(true);
            let mut s = store.clone();
            let append = tokio::spawn(async move { s.blocking_append([e]).await });
            tokio::time::sleep(SHORT).await;
            assert!(!append.is_finished(), "follower append {i} acknowledged before its flush");
            kv.hold_flushes(false);
            tokio::time::timeout(LONG, append).await.unwrap().unwrap().unwrap();
        }
        tokio::time::timeout(SHORT, durable.reached(4)).await.unwrap().unwrap();

        // A truncation takes back what it removed until the replacement is flushed.
        store.truncate(entry_of(4, 2, 3).log_id).await.unwrap();
        assert!(tokio::time::timeout(SHORT, durable.reached(3)).await.is_err(), "removed entries stay durable");
        store.blocking_append([entry_of(4, 2, 3)]).await.unwrap();
        tokio::time::timeout(SHORT, durable.reached(3)).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn nothing_is_applied_before_the_leaders_own_copy_is_on_disk() {
        use crate::store::raft::state_machine::StateMachine;
        use crate::store::raft::Request;
        use crate::store::watch::{WatchConfig, WatchHub};
        use openraft::storage::{RaftLogStorageExt, RaftStateMachine};
        let kv = Arc::new(crate::store::kv::gated::GatedKv::default());
        let mut store = LogStore::open(kv.clone(), 1, Faults::new()).unwrap();
        let mut sm =
            StateMachine::open(kv.clone(), |rev| WatchHub::new(rev, WatchConfig::default()), 1, store.durability())
                .unwrap();
        let shared = sm.shared();
        store.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
        kv.hold_flushes(true);
        let put = pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: b"/k".to_vec(),
                    value: b"v".to_vec(),
                    prev_kv: false,
                })),
            }],
            ..Default::default()
        };
        let entry = Entry {
            log_id: entry_of(3, 1, 1).log_id,
            payload: EntryPayload::Normal(Request(pb::TxnBatch { txns: vec![put] })),
        };
        store.blocking_append([entry.clone()]).await.unwrap();
        let apply = tokio::spawn(async move { sm.apply([entry]).await });
        tokio::time::sleep(SHORT).await;
        assert!(!apply.is_finished(), "applied before the leader's copy was flushed");
        assert_eq!(*shared.read(), 0, "the write is visible before it is durable");
        kv.hold_flushes(false);
        let out = tokio::time::timeout(LONG, apply).await.unwrap().unwrap().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(*shared.read(), 1);
    }

    #[tokio::test]
    async fn a_failed_flush_fails_every_wait() {
        let d = Durability::new(Some(entry_of(1, 1, 1).log_id));
        d.wrote(entry_of(1, 1, 5).log_id);
        let mark = d.mark();
        let waiting = tokio::spawn({
            let d = d.clone();
            async move { d.reached(5).await }
        });
        d.failed("disk gone".into());
        let e = tokio::time::timeout(LONG, waiting).await.unwrap().unwrap().unwrap_err();
        assert!(e.to_string().contains("disk gone"), "{e}");
        d.flushed(mark);
        assert!(d.reached(1).await.is_err(), "a failure is final");
    }

    #[test]
    fn a_replica_that_was_leader_starts_as_a_candidate_of_its_term() {
        let kv = crate::store::kv::MemKv::new();
        let stored =
            |kv: &crate::store::kv::MemKv| decode_vote(&kv.get(Space::RaftMeta, VOTE).unwrap().unwrap()).unwrap();
        let save = |kv: &crate::store::kv::MemKv, v: Vote<u64>| store_vote_blocking(kv, &v).unwrap();
        assert!(!step_down_at_start(&kv, 1).unwrap(), "no vote yet");
        save(&kv, Vote::new_committed(7, 1));
        assert!(step_down_at_start(&kv, 1).unwrap());
        assert_eq!(stored(&kv), Vote::new(7, 1), "same term and candidate, no longer committed");
        assert!(!step_down_at_start(&kv, 1).unwrap(), "a candidate stays as it is");
        save(&kv, Vote::new_committed(8, 2));
        assert!(!step_down_at_start(&kv, 1).unwrap(), "a follower keeps its leader's vote");
        assert_eq!(stored(&kv), Vote::new_committed(8, 2));
    }
}
