//! The one client of a Keel cluster. keelctl, the agent, the controllers, the scheduler,
//! certificate renewal, the chaos workload and the test harness all reach the cluster
//! through it, and only through it.
//!
//! - [`Client`]: the Objects, Cluster and KV APIs of a set of replicas, failing over between
//!   them as [`retry`] allows for each kind of call;
//! - [`informer`]: list, watch and cache a kind, shared by every loop of a process;
//! - [`config`]: keelctl's configuration file (contexts);
//! - [`join`]: the joining side of a join.
//!
//! It speaks gRPC only: nothing here reaches into the store or the server.

mod auth;
mod cluster;
pub mod config;
mod core;
mod error;
pub mod informer;
pub mod join;
mod objects;
mod pods;
pub mod retry;

pub use self::auth::{auth_channel, bare_addr, endpoint, AuthChannel, AuthHeader, ClientAuth};
pub use self::core::{Client, ClientConfig};
pub use self::error::ClientError;
pub use self::objects::{namespaced_name, DeleteOptions, ListOptions, ObjectList, WatchOptions, WatchStream};
pub use crate::grpc::{delivery, Delivery};

/// The largest gRPC message the client sends or takes: above every object limit the server
/// enforces (1.5 MiB an object), so that an object's own error is what a user sees.
pub const MAX_MESSAGE: usize = 64 << 20;
