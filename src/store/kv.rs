//! The storage engine boundary: an ordered byte map split into key spaces, with atomic
//! batches per space and an explicit flush for durability.
//!
//! `SledKv` is the real engine; `MemKv` is its in-memory twin for unit tests. Nothing above
//! this module names sled. This module knows nothing of Raft or of revisions.

use std::collections::BTreeMap;
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
}

pub type KvPair = (Vec<u8>, Vec<u8>);
pub type KvIter<'a> = Box<dyn Iterator<Item = Result<KvPair, KvError>> + Send + 'a>;

/// An ordered byte map in key spaces.
pub trait Kv: Send + Sync + 'static {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Iterates over `range` in key order (or reverse order).
    fn scan(&self, space: Space, range: (Bound<Vec<u8>>, Bound<Vec<u8>>), reverse: bool) -> KvIter<'_>;
    /// Applies the batch atomically: after a crash either all of it or none of it is visible.
    fn write(&self, space: Space, batch: Batch) -> Result<(), KvError>;
    /// Removes every key of a space. Not atomic with anything else.
    fn clear(&self, space: Space) -> Result<(), KvError>;
    /// Makes every write issued before the call durable.
    fn flush(&self) -> BoxFuture<'static, Result<(), KvError>>;
    /// The same, blocking the calling thread (for a dedicated flusher thread).
    fn flush_blocking(&self) -> Result<(), KvError>;
    /// Where the data lives, for error messages.
    fn location(&self) -> &Path;
}

/// The sled engine: one database per replica.
pub struct SledKv {
    db: sled::Db,
    trees: BTreeMap<Space, sled::Tree>,
    path: PathBuf,
}

impl SledKv {
    pub fn open(path: &Path, cache_bytes: u64) -> Result<SledKv, KvError> {
        let err = |source| KvError::Engine { path: path.to_path_buf(), source };
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(err)?;
        let mut trees = BTreeMap::new();
        for space in Space::ALL {
            trees.insert(space, db.open_tree(space.tree_name()).map_err(err)?);
        }
        Ok(SledKv { db, trees, path: path.to_path_buf() })
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
        let mut b = sled::Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        self.tree(space).apply_batch(b).map_err(|e| self.err(e))
    }

    fn clear(&self, space: Space) -> Result<(), KvError> {
        self.tree(space).clear().map_err(|e| self.err(e))
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), KvError>> {
        let db = self.db.clone();
        let path = self.path.clone();
        Box::pin(async move { db.flush_async().await.map(|_| ()).map_err(|source| KvError::Engine { path, source }) })
    }

    fn flush_blocking(&self) -> Result<(), KvError> {
        self.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }

    fn location(&self) -> &Path {
        &self.path
    }
}

type Spaces = BTreeMap<Space, BTreeMap<Vec<u8>, Vec<u8>>>;

/// The in-memory twin of [`SledKv`], for unit tests. Flush is a no-op.
#[derive(Default, Clone)]
pub struct MemKv {
    spaces: Arc<Mutex<Spaces>>,
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
}
