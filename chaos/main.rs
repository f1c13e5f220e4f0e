//! `keel-chaos`: the chaos suite by hand. Starts three `keel server` processes, runs the
//! workload and the fault schedule against them, checks the history and prints the table.
//! Exits 1 on any violation, keeping the evidence in a folder it names.
//!
//!     chaos/run --duration 30m --seed 7

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use keel::chaos::run::{run, RunConfig};

#[derive(Parser)]
#[command(
    name = "keel-chaos",
    about = "Kill, pause and partition real keel replicas under load, then check the history"
)]
struct Args {
    /// Run faults for this long (e.g. 30m, 2h).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many rounds (each round is every fault kind once, in a seeded order).
    #[arg(long)]
    rounds: Option<usize>,
    /// Reproduces the fault schedule. Default: from the clock, printed.
    #[arg(long)]
    seed: Option<u64>,
    /// Concurrent workload clients.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// The keel binary (default: `keel` next to this one).
    #[arg(long)]
    keel: Option<PathBuf>,
    /// Where the replicas' data and logs go (default: a new directory under /tmp). Kept only
    /// when a violation is found.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the history, fault log and replica logs even when no violation is found.
    #[arg(long)]
    keep: bool,
    /// Extra `keel server` flags, e.g. --server-args=--snapshot-every=300 to take and install
    /// snapshots while faults run.
    #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
    server_args: Vec<String>,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())).init();
    if let Err(e) = go(Args::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

async fn go(a: Args) -> anyhow::Result<()> {
    let keel = match a.keel {
        Some(k) => k,
        None => std::env::current_exe()?.with_file_name("keel"),
    };
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    let dir = match a.dir {
        Some(d) => d,
        None => tempfile::Builder::new().prefix("keel-chaos-").tempdir()?.keep(),
    };
    let mut cfg = RunConfig::short(keel, dir.clone(), seed);
    cfg.workload.clients = a.clients;
    cfg.rounds = a.rounds;
    cfg.duration = a.duration;
    cfg.keep = a.keep;
    cfg.server_args = a.server_args;
    if cfg.rounds.is_none() && cfg.duration.is_none() {
        cfg.rounds = Some(3);
    }
    println!("chaos run: seed {seed}, data in {}", dir.display());
    let report = run(cfg).await?;
    print!("{}", report.table());
    if report.violation_count() > 0 {
        std::process::exit(1);
    }
    if !a.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
