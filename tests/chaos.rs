//! The chaos suite's short profile (see `chaos/`): three rounds of every fault kind against
//! three real `keel server` processes under a mixed workload, then every check. The seed is
//! random unless KEEL_CHAOS_SEED is set; a failing run prints it and keeps the evidence.

use std::path::Path;

use keel::chaos::faults::FaultKind;
use keel::chaos::run::{run, RunConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short_profile_finds_no_violation() {
    let seed = std::env::var("KEEL_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    let dir = tempfile::Builder::new().prefix("keel-chaos-").tempdir().unwrap().keep();
    let cfg = RunConfig::short(Path::new(env!("CARGO_BIN_EXE_keel")).to_path_buf(), dir.clone(), seed);
    let report = run(cfg).await.unwrap_or_else(|e| panic!("chaos harness failed (seed {seed}): {e:#}"));
    println!("{}", report.table());
    for kind in FaultKind::ALL {
        assert!(report.faults_of(kind) >= 3, "{} was injected {} times", kind.name(), report.faults_of(kind));
    }
    assert!(report.ok > 1000, "the workload barely ran: {} operations ok", report.ok);
    assert_eq!(report.violation_count(), 0, "seed {seed}: violations found; evidence in {}", dir.display());
    let _ = std::fs::remove_dir_all(&dir);
}
