//! One chaos run: three real `keel server` processes behind fault proxies, the workload of
//! `workload` running against them, faults from a seeded `Schedule` one after another, then
//! the checks of `verify` and a report.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use comfy_table::Table;

use super::faults::{inject, FaultKind, Injected, Schedule};
use super::history::{Op, Outcome};
use super::linearize::Budget;
use super::verify::{self, Final};
use super::workload::{since, Record, WatchLog, Workload, WorkloadConfig, NAMESPACE};
use crate::client::ClientAuth;
use crate::harness::ProcCluster;
use crate::proto::v1 as pb;

#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The `keel` binary to run replicas with.
    pub keel: PathBuf,
    /// Where replicas keep data and logs, and where evidence goes on a violation.
    pub dir: PathBuf,
    pub seed: u64,
    /// Stop after this many rounds of faults (each round is every kind once)...
    pub rounds: Option<usize>,
    /// ...or once this much time has passed, whichever comes first.
    pub duration: Option<Duration>,
    pub workload: WorkloadConfig,
    /// Extra `keel server` flags.
    pub server_args: Vec<String>,
    /// Budget of each key's linearizability check.
    pub budget: Budget,
    /// Keep the evidence and the replicas' data and logs even when nothing is wrong.
    pub keep: bool,
}

impl RunConfig {
    /// The CI profile: four rounds (32 faults), about two minutes.
    pub fn short(keel: PathBuf, dir: PathBuf, seed: u64) -> RunConfig {
        RunConfig {
            keel,
            dir,
            seed,
            rounds: Some(4),
            duration: None,
            workload: WorkloadConfig {
                clients: 6,
                probes: 1,
                probe_timeout: Duration::from_millis(250),
                watchers: 2,
                keys: 5,
                key_lifetime: Duration::from_secs(15),
                request_timeout: Duration::from_secs(1),
                seed,
            },
            server_args: Vec::new(),
            budget: Budget { timeout: Some(Duration::from_secs(60)), ..Budget::default() },
            keep: false,
        }
    }
}

/// Unavailability of one fault kind: injection to the first write that succeeded after it.
#[derive(Debug, Clone, Default)]
pub struct Unavailability {
    pub count: usize,
    pub samples_ms: Vec<f64>,
    /// Faults after which no write succeeded before the run ended.
    pub never: usize,
}

impl Unavailability {
    pub fn p50(&self) -> Option<f64> {
        percentile(&self.samples_ms, 0.5)
    }
    pub fn max(&self) -> Option<f64> {
        self.samples_ms.iter().copied().reduce(f64::max)
    }
}

fn percentile(xs: &[f64], p: f64) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    (!v.is_empty()).then(|| v[((v.len() as f64 - 1.0) * p).round() as usize])
}

/// What a run found.
#[derive(Debug, Default)]
pub struct RunReport {
    pub seed: u64,
    pub elapsed: Duration,
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
    pub keys: usize,
    pub faults: Vec<Injected>,
    pub by_kind: BTreeMap<FaultKind, Unavailability>,
    /// Per fault (in `faults` order): ms from injection to the first successful write.
    pub resumed_ms: Vec<Option<f64>>,
    pub watch_events: usize,
    pub watch_reconnects: usize,
    pub watch_relists: usize,
    /// Every violation, by check.
    pub violations: BTreeMap<&'static str, Vec<String>>,
    pub undecided: Vec<String>,
    /// Where the evidence of a failed run was kept.
    pub kept: Option<PathBuf>,
}

impl RunReport {
    pub fn violation_count(&self) -> usize {
        self.violations.values().map(Vec::len).sum()
    }

    pub fn faults_of(&self, kind: FaultKind) -> usize {
        self.faults.iter().filter(|f| f.plan.kind == kind).count()
    }

    /// The table the run prints.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "chaos run, seed {}, {:.0} s: {} operations ok, {} failed, {} unknown on {} keys; {} faults; {} watch events ({} reconnects, {} re-lists)",
            self.seed,
            self.elapsed.as_secs_f64(),
            self.ok,
            self.failed,
            self.unknown,
            self.keys,
            self.faults.len(),
            self.watch_events,
            self.watch_reconnects,
            self.watch_relists
        );
        let mut t = Table::new();
        t.set_header(["fault", "injected", "writes resumed p50 ms", "max ms", "no write after"]);
        let ms = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.0}"));
        for (kind, u) in &self.by_kind {
            t.add_row([kind.name().to_string(), u.count.to_string(), ms(u.p50()), ms(u.max()), u.never.to_string()]);
        }
        let _ = writeln!(out, "{t}");
        let mut v = Table::new();
        v.set_header(["check", "violations"]);
        for check in CHECKS {
            v.add_row([check.to_string(), self.violations.get(check).map_or(0, Vec::len).to_string()]);
        }
        let _ = writeln!(out, "{v}");
        for (check, list) in &self.violations {
            for l in list.iter().take(10) {
                let _ = writeln!(out, "VIOLATION [{check}] {l}");
            }
        }
        for u in &self.undecided {
            let _ = writeln!(out, "undecided: {u}");
        }
        if let Some(k) = &self.kept {
            let _ = writeln!(out, "history, fault log and replica logs kept in {}", k.display());
        }
        out
    }
}

const CHECKS: [&str; 7] = [
    "linearizable",
    "nothing lost",
    "watches exactly once",
    "revisions monotonic",
    "uids unique",
    "recovery",
    "replicas",
];

/// Runs the whole thing. Errors are failures of the harness itself (a binary that does not
/// start, a directory that cannot be written); what the cluster does wrong is in the report.
pub async fn run(cfg: RunConfig) -> anyhow::Result<RunReport> {
    let start = Instant::now();
    let now = move || since(start);
    let mut report = RunReport { seed: cfg.seed, ..Default::default() };
    let cluster_dir = cfg.dir.join("cluster");
    let (mut c, net) = ProcCluster::start_behind_proxies(&cfg.keel, &cluster_dir, 3, &cfg.server_args).await?;
    c.wait_caught_up(Duration::from_secs(60)).await?;
    let auth = ClientAuth::Certificate(c.pki.admin.clone());
    let work = Arc::new(Workload::new(&c.addrs(), &auth, cfg.workload.clone(), start)?);
    create_namespace(&work).await?;

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let clients: Vec<_> = (0..cfg.workload.clients + cfg.workload.probes)
        .map(|i| tokio::spawn(work.clone().run_client(i as u64 + 1, i >= cfg.workload.clients, stop.clone())))
        .collect();
    let watchers: Vec<_> =
        (0..cfg.workload.watchers).map(|i| tokio::spawn(work.clone().run_watcher(i + 1, stop.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut schedule = Schedule::new(cfg.seed);
    let rounds = cfg.rounds.map(|r| r * FaultKind::ALL.len());
    let mut problems: Vec<(&'static str, String)> = Vec::new();
    loop {
        if rounds.is_some_and(|r| report.faults.len() >= r) || cfg.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        let plan = schedule.next_plan();
        let mut injected = match inject(&mut c, &net, plan, &now).await {
            Ok(i) => i,
            Err(e) => {
                problems.push(("recovery", format!("{}: could not inject: {e}", plan.kind.name())));
                net.heal();
                recover(&mut c);
                continue;
            }
        };
        for (i, n) in c.nodes.iter().enumerate() {
            if !n.is_running() {
                problems.push(("replicas", format!("replica {} was not running after {}", i + 1, plan.kind.name())));
            }
        }
        for i in 0..c.nodes.len() {
            if let Some(st) = c.exited(i) {
                problems.push((
                    "replicas",
                    format!("replica {} exited by itself ({st}) during {}", i + 1, plan.kind.name()),
                ));
            }
        }
        recover(&mut c);
        match c.wait_caught_up(Duration::from_secs(30)).await {
            Ok(_) => injected.recovered = Some(now()),
            Err(e) => problems.push(("recovery", format!("after {} ({}): {e}", plan.kind.name(), injected.target))),
        }
        tracing::info!(fault = plan.kind.name(), target = %injected.target, "fault done");
        report.faults.push(injected);
        tokio::time::sleep(plan.calm).await;
    }

    let _ = stop_tx.send(true);
    let mut records: Vec<Record> = Vec::new();
    for t in clients {
        records.extend(t.await.context("a workload client panicked")?);
    }
    let mut logs: Vec<WatchLog> = Vec::new();
    for t in watchers {
        logs.push(t.await.context("a watcher panicked")?);
    }

    // The final state, read once the cluster is whole again.
    c.wait_caught_up(Duration::from_secs(60)).await?;
    let read_at = now();
    let finals = final_state(&work).await?;
    let read_done = now();

    report.elapsed = start.elapsed();
    for r in &records {
        match r.op.outcome {
            Outcome::Ok(_) => report.ok += 1,
            Outcome::Fail => report.failed += 1,
            Outcome::Unknown => report.unknown += 1,
        }
    }
    unavailability(&mut report, &records);

    let lin = verify::linearizability(&records, &finals, read_at, read_done, cfg.budget).await;
    report.keys = lin.keys;
    report.undecided = lin.undecided;
    let watch = verify::watches(&records, &logs);
    report.watch_events = watch.events;
    report.watch_reconnects = watch.reconnects;
    report.watch_relists = watch.relists;
    let mut add = |check: &'static str, list: Vec<String>| {
        if !list.is_empty() {
            report.violations.entry(check).or_default().extend(list);
        }
    };
    add("linearizable", lin.violations);
    add("nothing lost", verify::nothing_lost(&records, &finals));
    add("watches exactly once", watch.violations);
    add("revisions monotonic", verify::monotonic(&records));
    add("uids unique", verify::unique_uids(&records, &logs));
    for (check, p) in problems {
        add(check, vec![p]);
    }

    if cfg.keep || report.violation_count() > 0 {
        let evidence = cfg.dir.join("evidence");
        write_evidence(&evidence, &records, &logs, &report).context("keep the evidence")?;
        c.keep();
        report.kept = Some(cfg.dir.clone());
    }
    drop(c);
    drop(net);
    Ok(report)
}

/// Restarts any replica that is not running (one that exited by itself, or a step that
/// failed halfway) and resumes any paused one.
fn recover(c: &mut ProcCluster) {
    for i in 0..c.nodes.len() {
        let _ = c.pause(i, false);
        if !c.nodes[i].is_running() {
            let _ = c.spawn(i);
        }
    }
}

async fn create_namespace(work: &Workload) -> anyhow::Result<()> {
    let ns = pb::Namespace {
        metadata: Some(pb::ObjectMeta { name: NAMESPACE.into(), ..Default::default() }),
        ..Default::default()
    };
    let object = pb::Object { kind: Some(pb::object::Kind::Namespace(ns)) };
    let mut last = None;
    for attempt in 0..50 {
        match work.client(attempt % work.replicas()).create(object.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_already_exists() => return Ok(()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("could not create namespace {NAMESPACE}: {last:?}")
}

/// Every ConfigMap of the namespace, by name, read linearizably.
async fn final_state(work: &Workload) -> anyhow::Result<HashMap<String, Final>> {
    let mut last = None;
    for attempt in 0..20 {
        let opts = crate::client::ListOptions::namespace(NAMESPACE);
        match work.client(attempt % work.replicas()).list_all(crate::api::kinds::Kind::ConfigMap, &opts).await {
            Ok(r) => {
                let mut out = HashMap::new();
                for o in r.items {
                    let Some(pb::object::Kind::ConfigMap(cm)) = o.kind else { continue };
                    let meta = cm.metadata.unwrap_or_default();
                    let rv = meta.resource_version.parse().context("final list: resourceVersion")?;
                    let value = cm.data.get("v").and_then(|v| v.parse().ok()).context("final list: data")?;
                    out.insert(meta.name, Final { version: super::Version { rv, value }, uid: meta.uid });
                }
                return Ok(out);
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("could not read the final state: {last:?}")
}

/// For each fault: from injection to the first write, sent after it, that succeeded.
fn unavailability(report: &mut RunReport, records: &[Record]) {
    let mut writes: Vec<(u64, u64)> = records
        .iter()
        .filter(|r| r.op.op != Op::Get && matches!(r.op.outcome, Outcome::Ok(_)))
        .map(|r| (r.op.invoke, r.op.complete))
        .collect();
    writes.sort_unstable();
    for f in &report.faults {
        let u = report.by_kind.entry(f.plan.kind).or_default();
        u.count += 1;
        // Writes are sorted by invoke; the first to complete among those invoked after `at`.
        let first = writes[writes.partition_point(|w| w.0 < f.at)..].iter().map(|w| w.1).min();
        let resumed = first.map(|done| (done - f.at) as f64 / 1e6);
        match resumed {
            Some(ms) => u.samples_ms.push(ms),
            None => u.never += 1,
        }
        report.resumed_ms.push(resumed);
    }
}

fn write_evidence(dir: &Path, records: &[Record], logs: &[WatchLog], report: &RunReport) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut history = String::new();
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.key.clone(), r.op.invoke));
    for r in sorted {
        let _ = writeln!(
            history,
            "{}\t{}\treplica {}\tuid {}\t{}",
            r.key,
            r.op,
            r.replica + 1,
            r.uid.as_deref().unwrap_or("-"),
            r.error.as_deref().unwrap_or("")
        );
    }
    std::fs::write(dir.join("history.tsv"), history)?;
    let mut watches = String::new();
    for l in logs {
        for (n, s) in l.segments.iter().enumerate() {
            let _ = writeln!(
                watches,
                "watcher {} segment {n}: from {} to {}, {} reconnects",
                l.watcher, s.from, s.to, s.reconnects
            );
            for e in &s.listed {
                let _ = writeln!(watches, "  listed rv {} {} = {} uid {}", e.rv, e.key, e.value, e.uid);
            }
            for e in &s.events {
                let _ = writeln!(watches, "  rv {} {} {} = {} uid {}", e.rv, e.kind, e.key, e.value, e.uid);
            }
            for e in &s.ends {
                let _ = writeln!(watches, "  ended: {e}");
            }
        }
    }
    std::fs::write(dir.join("watches.txt"), watches)?;
    let mut faults = String::new();
    for (i, f) in report.faults.iter().enumerate() {
        let resumed = report.resumed_ms.get(i).copied().flatten();
        let _ = writeln!(
            faults,
            "{:>10.3}s {} on {} (hold {:?}, then {:?}), lifted {:.3}s, writes resumed after {}, recovered {}",
            f.at as f64 / 1e9,
            f.plan.kind.name(),
            f.target,
            f.plan.hold,
            f.plan.hold2,
            f.lifted as f64 / 1e9,
            resumed.map_or("never".into(), |ms| format!("{ms:.0} ms")),
            f.recovered.map_or("never".into(), |r| format!("{:.3}s", r as f64 / 1e9))
        );
    }
    std::fs::write(dir.join("faults.txt"), faults)?;
    std::fs::write(dir.join("report.txt"), report.table())?;
    Ok(())
}
