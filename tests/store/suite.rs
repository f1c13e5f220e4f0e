// openraft fixes StorageError as the builder's error type.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use keel::store::kv::{Kv, MemKv, SledKv};
use keel::store::raft::log_store::{Durability, LogStore};
use keel::store::raft::state_machine::StateMachine;
use keel::store::raft::TypeConfig;
use keel::store::watch::{WatchConfig, WatchHub};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

struct SledBuilder;
struct MemBuilder;

fn stores(kv: Arc<dyn Kv>) -> Result<(LogStore, StateMachine), StorageError<u64>> {
    let wrap = |e: keel::store::StoreError| {
        StorageError::from(openraft::StorageIOError::<u64>::new(
            openraft::ErrorSubject::Store,
            openraft::ErrorVerb::Read,
            openraft::AnyError::new(&e),
        ))
    };
    let log = LogStore::open(kv.clone(), 1, keel::store::Faults::new()).map_err(wrap)?;
    // The suite applies entries it never appended to this log, so the state machine does not
    // wait for the log's flushes here.
    let durable = Durability::everything();
    let sm = StateMachine::open(kv, |rev| WatchHub::new(rev, WatchConfig::default()), 1, durable).map_err(wrap)?;
    Ok((log, sm))
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let kv: Arc<dyn Kv> = Arc::new(SledKv::open(&dir.path().join("db"), 8 << 20).expect("open sled"));
        let (log, sm) = stores(kv)?;
        Ok((dir, log, sm))
    }
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, ()> for MemBuilder {
    async fn build(&self) -> Result<((), LogStore, StateMachine), StorageError<u64>> {
        let (log, sm) = stores(Arc::new(MemKv::new()))?;
        Ok(((), log, sm))
    }
}

#[test]
fn sled_storage_passes_openraft_conformance_suite() {
    Suite::test_all(SledBuilder).expect("openraft storage suite on sled");
}

#[test]
fn memory_storage_passes_openraft_conformance_suite() {
    Suite::test_all(MemBuilder).expect("openraft storage suite in memory");
}
