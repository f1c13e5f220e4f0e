//! openraft wiring: the type config, the sled-backed log store and state machine, and the
//! gRPC transport between replicas. Nothing outside `store` names openraft.

// openraft's storage traits fix `StorageError` as the error type, large as it is.
#![allow(clippy::result_large_err)]

pub mod codec;
pub mod faults;
pub mod log_store;
pub mod network;
pub mod service;
pub mod state_machine;

use std::fmt;
use std::io::Cursor;

use prost::Message;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::proto::v1 as pb;

/// A replica as Raft knows it: where to reach it and its name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub addr: String,
    pub name: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// The application command carried by the log: a batch of transactions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request(pub pb::TxnBatch);

/// What applying a log entry produced: one response per transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Response(pub pb::TxnBatchResponse);

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "txn batch of {}", self.0.txns.len())
    }
}

// openraft's serde bound: both travel as their protobuf bytes.
macro_rules! serde_as_protobuf {
    ($t:ident, $inner:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0.encode_to_vec())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let bytes: Vec<u8> = serde::de::Deserialize::deserialize(d)?;
                <$inner>::decode(bytes.as_slice()).map($t).map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_protobuf!(Request, pb::TxnBatch);
serde_as_protobuf!(Response, pb::TxnBatchResponse);

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type StorageError = openraft::StorageError<u64>;

/// Wraps an engine or codec failure as openraft's storage error.
pub(crate) fn storage_err(
    subject: openraft::ErrorSubject<u64>,
    verb: openraft::ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}
