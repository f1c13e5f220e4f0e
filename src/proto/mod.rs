//! Types generated from `proto/`, and the one message written by hand (`WatchEvent`, whose
//! object travels pre-encoded). Conversions and helpers live beside the code that needs
//! them.

pub mod watch_event;

/// Keel's own API, package `keel.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("keel.v1");
    // serde with Kubernetes' JSON names (pbjson), for manifests and printing only.
    include!(concat!(env!("OUT_DIR"), "/keel.v1.serde.rs"));
    /// Written by hand (see `build.rs`), and named here with the generated types.
    pub use super::watch_event::WatchEvent;
}

/// The encoded file descriptor set of `keel.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keel_descriptor");

/// etcd's wire protocol, for the benchmark's etcd peer only.
#[allow(clippy::all, missing_docs)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}
