//! Control loops. Each is an ordinary client of the Objects API: it reads and writes only
//! through gRPC, so it can run on any replica or in a process of its own.
//!
//! For now the only loop is the namespace controller, which every replica runs: its work is
//! idempotent (deletes that find nothing, a release that compares resourceVersion), so
//! replicas racing each other cost a few conflicts and nothing else. The controller-manager
//! issue moves loops under a Lease so that one replica runs each.

pub mod namespace;
