//! Store tests: openraft's conformance suite on both engines, and in-process three-replica
//! clusters on 127.0.0.1 with links the tests can cut.

mod bench_smoke;
mod cluster;
mod corruption;
mod durability;
mod partition;
mod suite;
