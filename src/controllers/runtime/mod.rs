//! The control-loop runtime every controller is built on: a deduplicating, rate-limited work
//! queue; `reconcile(key, ctx) -> Result<Action>` run by workers fed from shared informers
//! with periodic resync; leader election on a Lease; an event recorder that aggregates as
//! client-go's does; and the manager that runs registered controllers on the Lease holder.
//!
//! Loops reach the cluster only through `client`; none calls another.

pub mod controller;
pub mod events;
pub mod leader;
pub mod manager;
pub mod queue;

pub use controller::{Action, Context, Controller, ReconcileError, RunConfig};
pub use events::{reference_to, EventLimits, EventRecorder};
pub use leader::{LeaderConfig, LeaderElector, Leadership};
pub use manager::{ControllerManager, ManagerConfig};
pub use queue::{RateLimits, WorkQueue};
