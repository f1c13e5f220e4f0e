//! Keel: a container orchestrator on the Kubernetes model, with an embedded Raft store.
//!
//! The crate is one library with two thin binaries (`keel`, `keelctl`). Dependencies point
//! one way: `proto` (shared vocabulary) -> `store` -> `server`; `client` talks to servers
//! only over gRPC.

pub mod agent;
pub mod api;
pub mod backup;
pub mod bench;
pub mod chaos;
pub mod cli;
pub mod client;
pub mod controllers;
pub mod grpc;
pub mod harness;
pub mod netfault;
pub mod pki;
pub mod proto;
pub mod scheduler;
pub mod seal;
pub mod server;
pub mod store;
pub mod tls;
pub mod up;
