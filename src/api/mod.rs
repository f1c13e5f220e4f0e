//! Shared vocabulary of the object API: the Kubernetes-shaped types, the kind registry and
//! manifest parsing. Knows nothing of Raft or storage.

pub mod apply;
pub mod defaults;
pub mod duration;
mod intstr;
pub mod json;
pub mod kinds;
pub mod manifest;
pub mod object;
pub mod pod;
pub mod quantity;
pub mod selector;
pub mod validation;
pub mod wellknown;

pub use intstr::{int_or_string, IntOrString};
