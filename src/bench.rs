//! Benchmarks that need real processes (`keel bench ...`).
