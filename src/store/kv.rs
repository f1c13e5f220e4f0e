//! The storage engine boundary: an ordered byte map split into key spaces, with atomic
//! batches per space and an explicit flush for durability.
//!
//! `SledKv` is the real engine; `MemKv` is its in-memory twin for unit tests. Nothing above
//! this module names sled. This module knows nothing of Raft or of revisions.
//!
//! `SledKv` does not use sled's own `apply_batch` for atomic batches. That call takes a
//! process-wide write lock and seals sled's IO buffer twice, each seal a buffer write handed to
//! sled's thread pool; on the write path it cost more than the writes themselves (a one-entry
//! log append took 25-70 µs instead of 1-10 µs). Instead, a batch of one operation is written
//! as it is, and a larger batch first stores a redo record of the whole batch, then each
//! operation, then removes the record. sled recovers a prefix of its log in write order, so
//! after a crash either the record is gone with everything after it, or it is there and
//! [`SledKv::open`] applies it again; its operations set absolute values, so applying them
//! twice is harmless.
//!
//! sled's own flush is not enough for a power loss. It makes its log stable with
//! `sync_file_range`, which neither empties the device's write cache nor records a grown
//! file's new size, and it writes values over about 128 KiB to files under `blobs/` with no
//! sync at all. [`SledKv`]'s flush therefore also `fdatasync`s the database file and every
//! new blob file (and the `blobs` directory) before it returns, as etcd does for its WAL.
//!
//! Values of many megabytes (snapshots) are whole files beside the engine instead
//! ([`Kv::write_file`]). In the engine they would be blobs, which every flush after them must
//! sync: the log's next flush, and every write waiting for it, would wait for all of it to
//! reach the disk. A file is written in slices, each synced before the next, so that no flush
//! of the log (ext4 commits every file's newly written data with its journal) waits for more
//! than a slice.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

/// The key spaces of one replica's database. Each is a separate sled tree; writes within one
/// space can be made atomic with [`Batch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    /// Raft log: big-endian index -> encoded entry.
    Log,
    /// Raft metadata: vote, committed, last purged; plus the data version header.
    RaftMeta,
    /// The state machine: user keys (prefix `k`) and state-machine metadata (prefix `m`), in one
    /// tree so that applying a batch of entries is one atomic write.
    State,
    /// The current snapshot of the state machine.
    Snapshot,
}

impl Space {
    pub const ALL: [Space; 4] = [Space::Log, Space::RaftMeta, Space::State, Space::Snapshot];

    fn tree_name(self) -> &'static str {
        match self {
            Space::Log => "raft_log",
            Space::RaftMeta => "raft_meta",
            Space::State => "state",
            Space::Snapshot => "snapshot",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("storage engine error in {path}: {source}")]
    Engine {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("the batch journal in {path} is damaged: {what}")]
    Journal { path: PathBuf, what: String },
    #[error("cannot {action} {path}: {source}")]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make {path} durable: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One atomic group of writes to a space.
#[derive(Default, Debug, Clone)]
pub struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The operations, in order: a key and its new value, or None for a delete.
    pub fn ops(&self) -> &[(Vec<u8>, Option<Vec<u8>>)] {
        &self.ops
    }
}

pub type KvPair = (Vec<u8>, Vec<u8>);
pub type KvIter<'a> = Box<dyn Iterator<Item = Result<KvPair, KvError>> + Send + 'a>;

/// An ordered byte map in key spaces.
pub trait Kv: Send + Sync + 'static {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Iterates over `range` in key order (or reverse order).
    fn scan(&self, space: Space, range: (Bound<Vec<u8>>, Bound<Vec<u8>>), reverse: bool) -> KvIter<'_>;
    /// Applies the batch atomically: after a crash either all of it or none of it is visible.
    /// Readers running at the same time may see part of it; a caller that needs isolation
    /// provides it (the state machine holds its revision lock).
    fn write(&self, space: Space, batch: Batch) -> Result<(), KvError>;
    /// Removes every key of a space. Not atomic with anything else.
    fn clear(&self, space: Space) -> Result<(), KvError>;
    /// Makes every write issued before the call durable.
    fn flush(&self) -> BoxFuture<'static, Result<(), KvError>>;
    /// The same, blocking the calling thread (for a dedicated flusher thread).
    fn flush_blocking(&self) -> Result<(), KvError>;
    /// Where the data lives, for error messages.
    fn location(&self) -> &Path;
    /// Writes a whole file beside the data, durably: once this returns it survives a crash.
    /// A file of the same name is replaced atomically.
    fn write_file(&self, name: &str, data: &[u8]) -> Result<(), KvError>;
    /// A file's content; None if it does not exist.
    fn read_file(&self, name: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// The names of the files, including any left half-written by a crash.
    fn list_files(&self) -> Result<Vec<String>, KvError>;
    fn remove_file(&self, name: &str) -> Result<(), KvError>;
    /// Where a file lives, for error messages.
    fn file_location(&self, name: &str) -> PathBuf;
}

/// Files beside sled's own, inside its directory (sled ignores names it does not know).
const FILES_DIR: &str = "keel-files";
/// A file is written and synced in slices of this size.
const FILE_SLICE: usize = 1 << 20;
/// The suffix of a file being written; renamed away once it is whole and synced.
const PARTIAL: &str = ".partial";

/// The sled engine: one database per replica.
pub struct SledKv {
    db: sled::Db,
    trees: BTreeMap<Space, sled::Tree>,
    /// Redo records of batches being written, one key per space (see the module docs).
    journal: sled::Tree,
    /// One batch at a time per space, since each space has one journal slot.
    writing: BTreeMap<Space, Mutex<()>>,
    files: Arc<DeviceSync>,
    path: PathBuf,
}

/// The error of a failed open or sync of `path`.
fn sync_err(path: &Path) -> impl FnOnce(std::io::Error) -> KvError {
    let path = path.to_path_buf();
    move |source| KvError::Sync { path, source }
}

/// What a flush must sync after sled's own flush (see the module docs).
struct DeviceSync {
    /// sled's single data file, `db`.
    db: File,
    db_path: PathBuf,
    blobs: PathBuf,
    /// Blob files synced so far, with how many times (1 or 2); see `sync_blobs`.
    synced_blobs: Mutex<HashMap<OsString, u8>>,
}

impl DeviceSync {
    fn open(dir: &Path) -> Result<DeviceSync, KvError> {
        let db_path = dir.join("db");
        let db = File::open(&db_path).map_err(sync_err(&db_path))?;
        let files = DeviceSync { db, db_path, blobs: dir.join("blobs"), synced_blobs: Mutex::new(HashMap::new()) };
        // The first start created the directory's files; their names must survive too.
        File::open(dir).and_then(|d| d.sync_all()).map_err(sync_err(dir))?;
        files.sync()?;
        Ok(files)
    }

    /// Runs after sled's flush: blobs first, since the log may point at them.
    fn sync(&self) -> Result<(), KvError> {
        self.sync_blobs()?;
        self.db.sync_data().map_err(sync_err(&self.db_path))
    }

    /// Syncs every blob file at the first two flushes that find it, and never again.
    ///
    /// sled never rewrites a blob, but one may still be being written when a flush lists the
    /// directory: sled writes a blob after reserving its place in the log, so a flush waits
    /// for every blob whose reservation came before the flush began, but not for later ones.
    /// Such a blob is therefore complete by the end of the next flush, which covers its
    /// reservation, and the sync there covers all of it. Listing names only (no `stat` per
    /// file) keeps a flush cheap when many blobs exist.
    fn sync_blobs(&self) -> Result<(), KvError> {
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(sync_err(&self.blobs)(e)),
        };
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut present = HashMap::with_capacity(synced.len());
        let mut new = false;
        for entry in entries {
            let entry = entry.map_err(sync_err(&self.blobs))?;
            let name = entry.file_name();
            let times = synced.get(&name).copied().unwrap_or(0);
            if times < 2 {
                let path = entry.path();
                match File::open(&path).and_then(|f| f.sync_data()) {
                    Ok(()) => new |= times == 0,
                    // Removed by sled's collector since the listing.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(sync_err(&path)(e)),
                }
            }
            present.insert(name, (times + 1).min(2));
        }
        if new {
            File::open(&self.blobs).and_then(|d| d.sync_all()).map_err(sync_err(&self.blobs))?;
        }
        *synced = present;
        Ok(())
    }
}

const JOURNAL_TREE: &str = "batch_journal";
const JOURNAL_VERSION: u8 = 1;

/// `version ++ (op ++ key_len ++ key [++ value_len ++ value])*`, op 1 = put, 0 = delete,
/// lengths as 4-byte big-endian.
fn encode_journal(ops: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<u8> {
    let size: usize = ops.iter().map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, Vec::len)).sum();
    let mut out = Vec::with_capacity(1 + size);
    out.push(JOURNAL_VERSION);
    for (k, v) in ops {
        out.push(u8::from(v.is_some()));
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        if let Some(v) = v {
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
    out
}

type Ops = Vec<(Vec<u8>, Option<Vec<u8>>)>;

fn decode_journal(mut b: &[u8]) -> Result<Ops, String> {
    fn take<'a>(b: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err(format!("record ends inside a {what}"));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn len(b: &mut &[u8], what: &str) -> Result<usize, String> {
        let l = take(b, 4, what)?;
        Ok(u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
    }
    match take(&mut b, 1, "version")?[0] {
        JOURNAL_VERSION => {}
        v => return Err(format!("record format {v} is not known (this build writes {JOURNAL_VERSION})")),
    }
    let mut ops = Vec::new();
    while !b.is_empty() {
        let op = take(&mut b, 1, "operation")?[0];
        let n = len(&mut b, "key length")?;
        let key = take(&mut b, n, "key")?.to_vec();
        let value = match op {
            1 => {
                let n = len(&mut b, "value length")?;
                Some(take(&mut b, n, "value")?.to_vec())
            }
            0 => None,
            other => return Err(format!("unknown operation {other}")),
        };
        ops.push((key, value));
    }
    Ok(ops)
}

impl SledKv {
    pub fn open(path: &Path, cache_bytes: u64) -> Result<SledKv, KvError> {
        let err = |source| KvError::Engine { path: path.to_path_buf(), source };
        let config = sled::Config::new().path(path).cache_capacity(cache_bytes).mode(sled::Mode::HighThroughput);
        // sled releases its file lock only when the last of its pool's jobs for a closed
        // database has finished, which can be just after the close returned: reopening in the
        // same process (quorum recovery, then serving) waits for that rather than failing.
        // sled reports the lock as an error of kind Other whose text names the lock.
        let locked = |e: &std::io::Error| {
            e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e)) if locked(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other.map_err(err)?,
            }
        };
        let mut trees = BTreeMap::new();
        let mut writing = BTreeMap::new();
        for space in Space::ALL {
            trees.insert(space, db.open_tree(space.tree_name()).map_err(err)?);
            writing.insert(space, Mutex::new(()));
        }
        let journal = db.open_tree(JOURNAL_TREE).map_err(err)?;
        let files = Arc::new(DeviceSync::open(path)?);
        let kv = SledKv { db, trees, journal, writing, files, path: path.to_path_buf() };
        kv.finish_interrupted_batches()?;
        Ok(kv)
    }

    /// Applies again every batch whose redo record survived a crash, then removes the records.
    fn finish_interrupted_batches(&self) -> Result<(), KvError> {
        let mut finished = 0;
        for item in self.journal.iter() {
            let (name, record) = item.map_err(|e| self.err(e))?;
            let space = Space::ALL.into_iter().find(|s| s.tree_name().as_bytes() == &name[..]).ok_or_else(|| {
                KvError::Journal {
                    path: self.path.clone(),
                    what: format!("a record names the unknown key space {:?}", String::from_utf8_lossy(&name)),
                }
            })?;
            let ops = decode_journal(&record).map_err(|what| KvError::Journal {
                path: self.path.clone(),
                what: format!("record for {}: {what}", space.tree_name()),
            })?;
            self.apply_ops(space, ops)?;
            self.journal.remove(&name).map_err(|e| self.err(e))?;
            finished += 1;
        }
        if finished > 0 {
            self.flush_blocking()?;
            tracing::info!(path = %self.path.display(), batches = finished, "finished batches interrupted by a crash");
        }
        Ok(())
    }

    fn apply_ops(&self, space: Space, ops: Ops) -> Result<(), KvError> {
        let tree = self.tree(space);
        for (k, v) in ops {
            match v {
                Some(v) => tree.insert(k, v).map(|_| ()),
                None => tree.remove(k).map(|_| ()),
            }
            .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Stores the redo record of a batch and applies none of it: a crash right after.
    #[cfg(test)]
    fn write_record_only(&self, space: Space, batch: &Batch) {
        self.journal.insert(space.tree_name(), encode_journal(&batch.ops)).unwrap();
    }

    fn tree(&self, space: Space) -> &sled::Tree {
        // Every space is opened in `open`, so the lookup cannot fail.
        &self.trees[&space]
    }

    fn err(&self, source: sled::Error) -> KvError {
        KvError::Engine { path: self.path.clone(), source }
    }
}

impl Kv for SledKv {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.tree(space).get(key).map_err(|e| self.err(e))?.map(|v| v.to_vec()))
    }

    fn scan(&self, space: Space, range: (Bound<Vec<u8>>, Bound<Vec<u8>>), reverse: bool) -> KvIter<'_> {
        let iter = self.tree(space).range(range);
        let map = move |r: Result<(sled::IVec, sled::IVec), sled::Error>| {
            r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(|e| self.err(e))
        };
        if reverse {
            Box::new(iter.rev().map(map))
        } else {
            Box::new(iter.map(map))
        }
    }

    fn write(&self, space: Space, batch: Batch) -> Result<(), KvError> {
        // Even a single operation waits for a batch in progress: written between the batch's
        // operations, it could be undone by the batch's replay after a crash.
        let _one_at_a_time = self.writing[&space].lock().unwrap_or_else(|p| p.into_inner());
        if batch.ops.len() <= 1 {
            return self.apply_ops(space, batch.ops);
        }
        let name = space.tree_name();
        self.journal.insert(name, encode_journal(&batch.ops)).map_err(|e| self.err(e))?;
        self.apply_ops(space, batch.ops)?;
        self.journal.remove(name).map_err(|e| self.err(e))?;
        Ok(())
    }

    fn clear(&self, space: Space) -> Result<(), KvError> {
        self.tree(space).clear().map_err(|e| self.err(e))
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), KvError>> {
        let db = self.db.clone();
        let files = self.files.clone();
        let path = self.path.clone();
        Box::pin(async move {
            db.flush_async().await.map_err(|source| KvError::Engine { path: path.clone(), source })?;
            // fdatasync blocks, for as long as a big blob takes: not on a runtime thread.
            tokio::task::spawn_blocking(move || files.sync())
                .await
                .map_err(|e| KvError::Sync { path, source: std::io::Error::other(e.to_string()) })?
        })
    }

    fn flush_blocking(&self) -> Result<(), KvError> {
        self.db.flush().map_err(|e| self.err(e))?;
        self.files.sync()
    }

    fn location(&self) -> &Path {
        &self.path
    }

    fn write_file(&self, name: &str, data: &[u8]) -> Result<(), KvError> {
        use std::io::Write;
        let dir = self.path.join(FILES_DIR);
        let file_err = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| KvError::File { action, path, source }
        };
        if !dir.exists() {
            std::fs::create_dir(&dir).map_err(file_err("create", &dir))?;
            File::open(&self.path).and_then(|d| d.sync_all()).map_err(sync_err(&self.path))?;
        }
        let partial = dir.join(format!("{name}{PARTIAL}"));
        let mut f = File::create(&partial).map_err(file_err("create", &partial))?;
        for slice in data.chunks(FILE_SLICE) {
            f.write_all(slice).map_err(file_err("write", &partial))?;
            f.sync_data().map_err(sync_err(&partial))?;
        }
        f.sync_all().map_err(sync_err(&partial))?;
        let path = dir.join(name);
        std::fs::rename(&partial, &path).map_err(file_err("rename into place", &path))?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(sync_err(&dir))
    }

    fn read_file(&self, name: &str) -> Result<Option<Vec<u8>>, KvError> {
        let path = self.file_location(name);
        match std::fs::read(&path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(KvError::File { action: "read", path, source }),
        }
    }

    fn list_files(&self) -> Result<Vec<String>, KvError> {
        let dir = self.path.join(FILES_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(KvError::File { action: "list", path: dir, source }),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| KvError::File { action: "list", path: dir.clone(), source })?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn remove_file(&self, name: &str) -> Result<(), KvError> {
        let path = self.file_location(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(KvError::File { action: "remove", path, source: e })
            }
            _ => Ok(()),
        }
    }

    fn file_location(&self, name: &str) -> PathBuf {
        self.path.join(FILES_DIR).join(name)
    }
}

type Spaces = BTreeMap<Space, BTreeMap<Vec<u8>, Vec<u8>>>;

/// The in-memory twin of [`SledKv`], for unit tests. Flush is a no-op.
#[derive(Default, Clone)]
pub struct MemKv {
    spaces: Arc<Mutex<Spaces>>,
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl MemKv {
    pub fn new() -> MemKv {
        MemKv::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Spaces) -> R) -> R {
        let mut guard = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

impl Kv for MemKv {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.with(|s| s.get(&space).and_then(|t| t.get(key).cloned())))
    }

    fn scan(&self, space: Space, range: (Bound<Vec<u8>>, Bound<Vec<u8>>), reverse: bool) -> KvIter<'_> {
        // Snapshot the matching pairs so that the iterator holds no lock.
        let mut items: Vec<KvPair> = self.with(|s| match s.get(&space) {
            Some(t) => t.range(range).map(|(k, v)| (k.clone(), v.clone())).collect(),
            None => Vec::new(),
        });
        if reverse {
            items.reverse();
        }
        Box::new(items.into_iter().map(Ok))
    }

    fn write(&self, space: Space, batch: Batch) -> Result<(), KvError> {
        self.with(|s| {
            let t = s.entry(space).or_default();
            for (k, v) in batch.ops {
                match v {
                    Some(v) => t.insert(k, v),
                    None => t.remove(&k),
                };
            }
        });
        Ok(())
    }

    fn clear(&self, space: Space) -> Result<(), KvError> {
        self.with(|s| s.remove(&space));
        Ok(())
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), KvError>> {
        Box::pin(async { Ok(()) })
    }

    fn flush_blocking(&self) -> Result<(), KvError> {
        Ok(())
    }

    fn location(&self) -> &Path {
        Path::new("<memory>")
    }

    fn write_file(&self, name: &str, data: &[u8]) -> Result<(), KvError> {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), data.to_vec());
        Ok(())
    }

    fn read_file(&self, name: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.files.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned())
    }

    fn list_files(&self) -> Result<Vec<String>, KvError> {
        Ok(self.files.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect())
    }

    fn remove_file(&self, name: &str) -> Result<(), KvError> {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        Ok(())
    }

    fn file_location(&self, name: &str) -> PathBuf {
        Path::new("<memory>").join(name)
    }
}

/// An in-memory engine whose flushes and reads tests can hold, to see what waits for them.
#[cfg(test)]
pub(crate) mod gated {
    use super::*;
    use std::sync::Condvar;

    #[derive(Default)]
    struct Gates {
        flushes_held: bool,
        read_held: bool,
        /// A read is the one being held (it started while `read_held` was on).
        read_claimed: bool,
        /// That read has given its first item and is waiting.
        read_waiting: bool,
    }

    /// Flushes wait while `hold_flushes` is on. The first read that starts while `hold_read`
    /// is on stops after its first item until it is turned off; it reads what was there when
    /// it started. Everything else goes to a [`MemKv`].
    #[derive(Default)]
    pub struct GatedKv {
        kv: MemKv,
        gates: Arc<(Mutex<Gates>, Condvar)>,
    }

    impl GatedKv {
        fn set(&self, f: impl FnOnce(&mut Gates)) {
            f(&mut self.gates.0.lock().unwrap());
            self.gates.1.notify_all();
        }

        pub fn hold_flushes(&self, on: bool) {
            self.set(|g| g.flushes_held = on);
        }

        pub fn hold_read(&self, on: bool) {
            self.set(|g| {
                g.read_held = on;
                g.read_claimed &= on;
            });
        }

        /// Whether the held read is waiting after its first item.
        pub fn read_waiting(&self) -> bool {
            self.gates.0.lock().unwrap().read_waiting
        }

        fn wait_for_flushes(gates: &(Mutex<Gates>, Condvar)) {
            let _open = gates.1.wait_while(gates.0.lock().unwrap(), |g| g.flushes_held).unwrap();
        }
    }

    impl Kv for GatedKv {
        fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
            self.kv.get(space, key)
        }
        fn scan(&self, space: Space, range: (Bound<Vec<u8>>, Bound<Vec<u8>>), reverse: bool) -> KvIter<'_> {
            let items: Vec<_> = self.kv.scan(space, range, reverse).collect();
            let held = {
                let mut g = self.gates.0.lock().unwrap();
                let held = g.read_held && !g.read_claimed;
                g.read_claimed |= held;
                held
            };
            Box::new(items.into_iter().enumerate().map(move |(i, item)| {
                if held && i == 1 {
                    let mut g = self.gates.0.lock().unwrap();
                    g.read_waiting = true;
                    g = self.gates.1.wait_while(g, |g| g.read_held).unwrap();
                    g.read_waiting = false;
                }
                item
            }))
        }
        fn write(&self, space: Space, batch: Batch) -> Result<(), KvError> {
            self.kv.write(space, batch)
        }
        fn clear(&self, space: Space) -> Result<(), KvError> {
            self.kv.clear(space)
        }
        fn flush(&self) -> BoxFuture<'static, Result<(), KvError>> {
            let gates = self.gates.clone();
            Box::pin(async move {
                tokio::task::spawn_blocking(move || GatedKv::wait_for_flushes(&gates)).await.unwrap();
                Ok(())
            })
        }
        fn flush_blocking(&self) -> Result<(), KvError> {
            GatedKv::wait_for_flushes(&self.gates);
            Ok(())
        }
        fn location(&self) -> &Path {
            self.kv.location()
        }
        fn write_file(&self, name: &str, data: &[u8]) -> Result<(), KvError> {
            self.kv.write_file(name, data)
        }
        fn read_file(&self, name: &str) -> Result<Option<Vec<u8>>, KvError> {
            self.kv.read_file(name)
        }
        fn list_files(&self) -> Result<Vec<String>, KvError> {
            self.kv.list_files()
        }
        fn remove_file(&self, name: &str) -> Result<(), KvError> {
            self.kv.remove_file(name)
        }
        fn file_location(&self, name: &str) -> PathBuf {
            self.kv.file_location(name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engines() -> Vec<(Box<dyn Kv>, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let sled = SledKv::open(&dir.path().join("db"), 1 << 20).unwrap();
        vec![(Box::new(MemKv::new()), None), (Box::new(sled), Some(dir))]
    }

    #[test]
    fn every_engine_scans_in_order_and_applies_batches_whole() {
        for (kv, _dir) in engines() {
            let mut b = Batch::default();
            b.put(b"b".to_vec(), b"2".to_vec());
            b.put(b"a".to_vec(), b"1".to_vec());
            b.put(b"c".to_vec(), b"3".to_vec());
            b.delete(b"c".to_vec());
            kv.write(Space::State, b).unwrap();
            let all: Vec<_> =
                kv.scan(Space::State, (Bound::Unbounded, Bound::Unbounded), false).map(|r| r.unwrap().0).collect();
            assert_eq!(all, vec![b"a".to_vec(), b"b".to_vec()]);
            let rev: Vec<_> =
                kv.scan(Space::State, (Bound::Unbounded, Bound::Unbounded), true).map(|r| r.unwrap().0).collect();
            assert_eq!(rev, vec![b"b".to_vec(), b"a".to_vec()]);
            assert_eq!(kv.get(Space::State, b"a").unwrap(), Some(b"1".to_vec()));
            assert_eq!(kv.get(Space::Log, b"a").unwrap(), None, "spaces are separate");
            kv.clear(Space::State).unwrap();
            assert_eq!(kv.get(Space::State, b"a").unwrap(), None);
        }
    }

    /// A batch of puts (`Some`) and deletes (`None`).
    fn batch(ops: &[(&str, Option<&str>)]) -> Batch {
        let mut b = Batch::default();
        for (k, v) in ops {
            match v {
                Some(v) => b.put(k.as_bytes(), v.as_bytes()),
                None => b.delete(k.as_bytes()),
            }
        }
        b
    }

    #[test]
    fn a_batch_interrupted_by_a_crash_is_finished_when_the_engine_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let kv = SledKv::open(&path, 1 << 20).unwrap();
            kv.write(Space::State, batch(&[("x", Some("old")), ("z", Some("doomed"))])).unwrap();
            let interrupted = batch(&[("x", Some("new")), ("y", Some("1")), ("z", None)]);
            // The crash came after the record and the first operation.
            kv.write_record_only(Space::State, &interrupted);
            kv.tree(Space::State).insert(b"x", b"new".to_vec()).unwrap();
        }
        {
            let kv = SledKv::open(&path, 1 << 20).unwrap();
            assert_eq!(kv.get(Space::State, b"x").unwrap(), Some(b"new".to_vec()));
            assert_eq!(kv.get(Space::State, b"y").unwrap(), Some(b"1".to_vec()));
            assert_eq!(kv.get(Space::State, b"z").unwrap(), None);
            assert!(kv.journal.is_empty(), "a finished batch leaves no record");
            kv.write(Space::State, batch(&[("x", Some("later"))])).unwrap();
        }
        let kv = SledKv::open(&path, 1 << 20).unwrap();
        assert_eq!(kv.get(Space::State, b"x").unwrap(), Some(b"later".to_vec()), "the batch is not replayed twice");
    }

    #[test]
    fn a_damaged_batch_record_refuses_to_open_and_names_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let kv = SledKv::open(&path, 1 << 20).unwrap();
            let mut record = encode_journal(&batch(&[("a", Some("1")), ("b", Some("2"))]).ops);
            record.truncate(record.len() - 1);
            kv.journal.insert(Space::Log.tree_name(), record).unwrap();
        }
        let err = SledKv::open(&path, 1 << 20).err().expect("a damaged record is refused").to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("raft_log") && err.contains("record ends inside a value"), "{err}");
    }

    #[test]
    fn journal_records_round_trip() {
        let ops: Ops = vec![(b"k".to_vec(), Some(vec![])), (vec![], None), (b"v".to_vec(), Some(vec![9; 300]))];
        assert_eq!(decode_journal(&encode_journal(&ops)).unwrap(), ops);
        assert!(decode_journal(&[2]).unwrap_err().contains("format 2"));
        assert!(decode_journal(&[JOURNAL_VERSION, 7, 0, 0, 0, 0]).unwrap_err().contains("unknown operation 7"));
    }

    /// Run under strace by `a_flush_reaches_the_device`: a small write and a blob-sized
    /// write, each flushed between two marker `stat`s the trace can find. Ignored in a
    /// normal run (it is a child process's body, not a test); its parent runs it with
    /// `--ignored`, and without its parent's directory it fails rather than pass idle.
    #[test]
    #[ignore = "the child process of a_flush_reaches_the_device"]
    fn device_sync_child() {
        let dir = std::env::var_os("KEEL_SYNC_CHILD").expect("run by a_flush_reaches_the_device (KEEL_SYNC_CHILD)");
        let dir = PathBuf::from(dir);
        let kv = SledKv::open(&dir.join("data"), 1 << 20).unwrap();
        for (name, size) in [("small", 200), ("blob", 300 << 10)] {
            let _ = std::fs::metadata(dir.join(format!("{name}-before")));
            let mut b = Batch::default();
            b.put(name.as_bytes().to_vec(), vec![7u8; size]);
            kv.write(Space::State, b).unwrap();
            kv.flush_blocking().unwrap();
            let _ = std::fs::metadata(dir.join(format!("{name}-after")));
        }
        // A blob still being written when a flush synced it: the next flush syncs it again,
        // and later flushes leave it alone.
        let grown = dir.join("data").join("blobs").join("999999999");
        std::fs::write(&grown, b"part").unwrap();
        kv.flush_blocking().unwrap();
        let _ = std::fs::metadata(dir.join("grown-before"));
        std::io::Write::write_all(&mut std::fs::OpenOptions::new().append(true).open(&grown).unwrap(), b"rest")
            .unwrap();
        kv.flush_blocking().unwrap();
        let _ = std::fs::metadata(dir.join("grown-after"));
        let _ = std::fs::metadata(dir.join("settled-before"));
        kv.flush_blocking().unwrap();
        let _ = std::fs::metadata(dir.join("settled-after"));
    }

    /// sled alone makes its log stable with `sync_file_range`, which leaves the data in the
    /// device's write cache, and never syncs blobs: a power loss could take writes we had
    /// acknowledged. A flush must `fdatasync` the database file, and new blobs with their
    /// directory, before it returns.
    #[test]
    fn a_flush_reaches_the_device() {
        if std::process::Command::new("strace").arg("-V").output().is_err() {
            assert!(
                std::env::var("KEEL_E2E").as_deref() != Ok("1"),
                "KEEL_E2E=1 but strace is missing (scripts/setup.sh installs it)"
            );
            eprintln!("skipping: strace is not installed and KEEL_E2E is not set");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let trace = dir.path().join("trace");
        let status = std::process::Command::new("strace")
            .args(["-f", "-qq", "-y", "-e", "trace=fdatasync,fsync,statx,newfstatat", "-o"])
            .arg(&trace)
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "store::kv::tests::device_sync_child", "--ignored", "--nocapture"])
            .env("KEEL_SYNC_CHILD", dir.path())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "the child failed under strace: {status}");
        let trace = std::fs::read_to_string(&trace).unwrap();
        let window = |name: &str| -> Vec<&str> {
            let lines: Vec<&str> = trace.lines().collect();
            let start = lines.iter().position(|l| l.contains(&format!("{name}-before"))).expect("before marker");
            let end = lines.iter().position(|l| l.contains(&format!("{name}-after"))).expect("after marker");
            lines[start..end].to_vec()
        };
        let synced = |lines: &[&str], call: &str, path: &str| {
            lines.iter().any(|l| l.contains(&format!("{call}(")) && l.contains(path) && l.contains(") = 0"))
        };
        // `want` says whether the window must (or must not) hold the call; `what` is the failure.
        let expect = |name: &str, call: &str, path: &str, want: bool, what: &str| {
            let lines = window(name);
            assert_eq!(synced(&lines, call, path), want, "{what} in:\n{}", lines.join("\n"));
        };
        expect("small", "fdatasync", "/data/db>", true, "no fdatasync of the database file");
        expect("blob", "fdatasync", "/data/blobs/", true, "no fdatasync of the new blob");
        expect("blob", "fsync", "/data/blobs>", true, "no fsync of the blobs directory");
        expect("blob", "fdatasync", "/data/db>", true, "no fdatasync of the database file");
        expect("grown", "fdatasync", "/data/blobs/999999999>", true, "a grown blob was not synced again");
        expect("settled", "fdatasync", "/data/db>", true, "no fdatasync of the database file");
        expect("settled", "fdatasync", "/data/blobs/", false, "a blob synced twice already was synced again");
    }

    /// Run by `batches_stay_whole_across_kill_9` in a child process: writes batches until
    /// killed. Ignored in a normal run; its parent runs it with `--ignored`.
    #[test]
    #[ignore = "the child process of batches_stay_whole_across_kill_9"]
    fn journal_crash_child() {
        let dir = std::env::var_os("KEEL_JOURNAL_CHILD")
            .expect("run by batches_stay_whole_across_kill_9 (KEEL_JOURNAL_CHILD)");
        let kv = Arc::new(SledKv::open(Path::new(&dir), 1 << 20).unwrap());
        // Flushes land at any point of a batch, as they would from other writers.
        let flusher = kv.clone();
        std::thread::spawn(move || loop {
            flusher.flush_blocking().unwrap();
        });
        let start = match kv.get(Space::State, b"a").unwrap() {
            Some(v) => u64::from_be_bytes(v.try_into().unwrap()) + 1,
            None => 0,
        };
        for n in start.. {
            let mut b = Batch::default();
            b.put(b"a".to_vec(), n.to_be_bytes().to_vec());
            b.put(format!("c/{n:012}").into_bytes(), vec![7; 200]);
            if n > 0 {
                b.delete(format!("c/{:012}", n - 1).into_bytes());
            }
            b.put(b"b".to_vec(), n.to_be_bytes().to_vec());
            kv.write(Space::State, b).unwrap();
        }
    }

    #[test]
    fn batches_stay_whole_across_kill_9() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let mut last = None;
        for cycle in 0..20u64 {
            let mut child = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "store::kv::tests::journal_crash_child", "--ignored", "--nocapture"])
                .env("KEEL_JOURNAL_CHILD", &db)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(150 + 13 * cycle));
            child.kill().unwrap();
            child.wait().unwrap();
            let kv = SledKv::open(&db, 1 << 20).unwrap();
            let a = kv.get(Space::State, b"a").unwrap().map(|v| u64::from_be_bytes(v.try_into().unwrap()));
            let b = kv.get(Space::State, b"b").unwrap().map(|v| u64::from_be_bytes(v.try_into().unwrap()));
            assert_eq!(a, b, "cycle {cycle}: a batch was torn");
            let c: Vec<_> = kv
                .scan(Space::State, (Bound::Included(b"c/".to_vec()), Bound::Excluded(b"c0".to_vec())), false)
                .map(|r| String::from_utf8(r.unwrap().0).unwrap())
                .collect();
            let n = a.expect("the child wrote at least one batch");
            assert_eq!(c, vec![format!("c/{n:012}")], "cycle {cycle}: a batch was torn");
            assert!(last.is_none_or(|l| n >= l), "cycle {cycle}: flushed batches went missing");
            last = Some(n);
        }
    }
}
