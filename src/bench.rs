//! Benchmarks against real processes on loopback (`keel bench store`, `api`, `watch`): three
//! `keel server` replicas and, as the peer, three etcd members, driven by the same client
//! harness in the same run. The benchmarks only talk to servers over gRPC; they never reach
//! into the store.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::harness::{free_port, ProcCluster};
use crate::proto::{etcd, v1 as pb};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Puts against three replicas (fsync on), beside etcd, plus leader-kill recovery.
    Store(StoreBench),
    /// ConfigMap creates through the whole Objects API, beside raw store puts and etcd puts.
    Api(ApiBench),
    /// Watch fan-out: many watchers of one namespace, fixed and maximal update rates, beside
    /// etcd watchers of the same prefix.
    Watch(WatchBench),
}

/// The load every benchmark shares.
#[derive(Args, Clone)]
pub struct LoadArgs {
    /// Seconds per run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// gRPC connections per replica shared by the clients.
    #[arg(long, default_value_t = 4)]
    pub conns_per_replica: usize,
    /// The etcd binary to compare with ("" skips etcd).
    #[arg(long, default_value = "etcd")]
    pub etcd: String,
}

#[derive(Args, Clone)]
pub struct ApiBench {
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Working directory, kept afterwards with the servers' data and logs (default: a new
    /// directory under the system temp dir, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct StoreBench {
    /// Concurrent clients, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub clients: Vec<usize>,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Leader kills to time (0 skips).
    #[arg(long, default_value_t = 10)]
    pub kills: usize,
    /// Replicas per cluster (3 for the comparison; 1 shows the cost without replication).
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Send every client to the leader instead of spreading them over all replicas (keel and
    /// etcd alike).
    #[arg(long, conflicts_with = "follower_only")]
    pub leader_only: bool,
    /// Send every client to one follower, so every write is forwarded to the leader (keel and
    /// etcd alike).
    #[arg(long)]
    pub follower_only: bool,
    /// Extra flags for every `keel server` (e.g. --server-args=--max-in-flight=4).
    #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
    pub server_args: Vec<String>,
    /// Working directory (default: a new directory under the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Store(b) => store(b).await,
        BenchCommand::Api(b) => api(b).await,
        BenchCommand::Watch(b) => watch(b).await,
    }
}

async fn api(b: ApiBench) -> anyhow::Result<()> {
    let dir = match &b.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("keel-bench-api-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    println!(
        "keel bench api: 3 replicas, {} clients, {}-byte values, {} s per run",
        b.clients, b.load.value_size, b.load.seconds
    );
    let mut rows = Vec::new();
    {
        let mut cluster = ProcCluster::start(&exe, &dir.join("keel"), 3, &[])?;
        if b.dir.is_some() {
            cluster.keep();
        }
        cluster.wait_caught_up(Duration::from_secs(20)).await?;
        let chans = channels(&cluster.addrs(), b.load.conns_per_replica, Some(&cluster.pki.admin))?;
        for addr in cluster.addrs() {
            crate::harness::wait_default_namespaces(&addr, Duration::from_secs(20), &cluster.pki.admin).await?;
        }
        let objects = Target::Objects(chans.iter().cloned().map(pb::objects_client::ObjectsClient::new).collect());
        let f = put_load(&objects, b.clients, b.load.seconds, b.load.value_size, "api").await;
        rows.push(("keel Objects.Create (ConfigMap)", f));
        let raw = Target::Keel(chans.into_iter().map(pb::kv_client::KvClient::new).collect());
        let f = put_load(&raw, b.clients, b.load.seconds, b.load.value_size, "raw").await;
        rows.push(("keel raw store put", f));
    }
    if !b.load.etcd.is_empty() {
        let e = Etcd::start(&b.load.etcd, &dir.join("etcd"))?;
        e.leader(Duration::from_secs(30)).await?;
        let t = Target::Etcd(
            channels(&e.client_addrs, b.load.conns_per_replica, None)?
                .into_iter()
                .map(etcd::kv_client::KvClient::new)
                .collect(),
        );
        let f = put_load(&t, b.clients, b.load.seconds, b.load.value_size, "etcd").await;
        rows.push(("etcd put", f));
    }
    println!();
    println!("| path | writes/s | p50 ms | p99 ms | max ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, f) in &rows {
        println!("| {name} | {:.0} | {:.2} | {:.2} | {:.1} | {} |", f.per_sec, f.p50_ms, f.p99_ms, f.max_ms, f.errors);
    }
    if b.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

#[derive(Clone)]
enum Target {
    Keel(Vec<pb::kv_client::KvClient<Channel>>),
    Etcd(Vec<etcd::kv_client::KvClient<Channel>>),
    /// The full object API: each put creates a ConfigMap holding the value.
    Objects(Vec<pb::objects_client::ObjectsClient<Channel>>),
}

impl Target {
    fn conns(&self) -> usize {
        match self {
            Target::Keel(c) => c.len(),
            Target::Etcd(c) => c.len(),
            Target::Objects(c) => c.len(),
        }
    }

    async fn put(&self, conn: usize, key: Vec<u8>, value: Vec<u8>) -> Result<(), tonic::Status> {
        let timeout = Duration::from_secs(2);
        match self {
            Target::Keel(c) => {
                let mut req = tonic::Request::new(pb::PutRequest { key, value, prev_kv: false });
                req.set_timeout(timeout);
                c[conn % c.len()].clone().put(req).await.map(|_| ())
            }
            Target::Etcd(c) => {
                let mut req = tonic::Request::new(etcd::PutRequest { key, value, ..Default::default() });
                req.set_timeout(timeout);
                c[conn % c.len()].clone().put(req).await.map(|_| ())
            }
            Target::Objects(c) => {
                let name = String::from_utf8_lossy(&key).trim_start_matches("bench/").replace('/', "-");
                let cm = pb::ConfigMap {
                    metadata: Some(pb::ObjectMeta { name, namespace: "default".into(), ..Default::default() }),
                    data: [("v".to_string(), String::from_utf8_lossy(&value).into_owned())].into(),
                    ..Default::default()
                };
                let object = pb::Object { kind: Some(pb::object::Kind::ConfigMap(cm)) };
                let mut req = tonic::Request::new(pb::CreateRequest { object: Some(object) });
                req.set_timeout(timeout);
                c[conn % c.len()].clone().create(req).await.map(|_| ())
            }
        }
    }
}

/// `per` channels to each address: TLS with `creds` (keel), plain HTTP/2 without (etcd).
fn channels(addrs: &[String], per: usize, creds: Option<&crate::pki::Credentials>) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::new();
    for _ in 0..per.max(1) {
        for a in addrs {
            let endpoint = match creds {
                Some(c) => crate::client::endpoint(a, c)?,
                None => Endpoint::from_shared(format!("http://{a}"))?,
            };
            out.push(endpoint.connect_timeout(Duration::from_millis(500)).tcp_nodelay(true).connect_lazy());
        }
    }
    Ok(out)
}

/// Throughput and latency of one run.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub ops: usize,
    pub errors: usize,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The slowest write: a stall (an election, a snapshot) shows here first.
    pub max_ms: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn put_load(target: &Target, clients: usize, seconds: f64, value_size: usize, tag: &str) -> Figures {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let value = Arc::new(vec![b'x'; value_size]);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let target = target.clone();
        let value = value.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut first_error = None;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let key = format!("bench/{tag}/{c}/{n}").into_bytes();
                n += 1;
                let t = Instant::now();
                match target.put(c, key, value.to_vec()).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{:?}: {}", e.code(), e.message()));
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        if let Ok((l, e, first)) = t.await {
            lat.extend(l);
            errors += e;
            if let Some(first) = first {
                *kinds.entry(first).or_default() += 1;
            }
        }
    }
    // Failed writes are counted, not hidden: say what they were.
    for (what, clients) in &kinds {
        eprintln!("  {tag}: first error of {clients} client(s): {what}");
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    Figures {
        ops: lat.len(),
        errors,
        per_sec: lat.len() as f64 / elapsed,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        max_ms: lat.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
    }
}

/// Writes until one succeeds; returns how long that took.
async fn first_write(target: &Target, tag: &str, limit: Duration) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut n = 0usize;
    loop {
        let key = format!("bench/kill/{tag}/{n}").into_bytes();
        if target.put(n, key, b"v".to_vec()).await.is_ok() {
            return Ok(t0.elapsed());
        }
        n += 1;
        if t0.elapsed() > limit {
            bail!("no write succeeded within {limit:?} after the kill");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn median_ms(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let max = v.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    (percentile(&v, 0.5), max)
}

async fn keel_kills(cluster: &mut ProcCluster, kills: usize) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::new();
    for k in 0..kills {
        // Kill the leader of a healthy cluster: every replica caught up.
        let leader = cluster.wait_caught_up(Duration::from_secs(20)).await?;
        // Clients that talk to the surviving replicas only: one that keeps calling the dead
        // leader would only measure its own connect timeouts.
        let survivors: Vec<String> =
            cluster.nodes.iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, n)| n.addr.clone()).collect();
        let target = Target::Keel(
            channels(&survivors, 1, Some(&cluster.pki.admin))?.into_iter().map(pb::kv_client::KvClient::new).collect(),
        );
        // Warm the connections so the measurement starts from a working client.
        target.put(0, b"bench/kill/warm0".to_vec(), b"v".to_vec()).await.ok();
        target.put(1, b"bench/kill/warm1".to_vec(), b"v".to_vec()).await.ok();
        cluster.kill(leader)?;
        out.push(first_write(&target, &format!("keel{k}"), Duration::from_secs(20)).await?);
        cluster.spawn(leader)?;
    }
    cluster.wait_leader(Duration::from_secs(20)).await?;
    Ok(out)
}

struct Etcd {
    children: Vec<Option<Child>>,
    args: Vec<Vec<String>>,
    client_addrs: Vec<String>,
    bin: String,
    logs: Vec<PathBuf>,
}

impl Etcd {
    fn start(bin: &str, dir: &std::path::Path) -> anyhow::Result<Etcd> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let mut peers = Vec::new();
        let mut clients = Vec::new();
        for i in 0..3 {
            peers.push((format!("e{i}"), free_port()?));
            clients.push(free_port()?);
        }
        let initial = peers.iter().map(|(n, p)| format!("{n}=http://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let mut e = Etcd {
            children: Vec::new(),
            args: Vec::new(),
            client_addrs: Vec::new(),
            bin: bin.into(),
            logs: Vec::new(),
        };
        for i in 0..3 {
            let (name, pport) = &peers[i];
            let c = clients[i];
            e.args.push(vec![
                format!("--name={name}"),
                format!("--data-dir={}", dir.join(name).display()),
                format!("--listen-client-urls=http://127.0.0.1:{c}"),
                format!("--advertise-client-urls=http://127.0.0.1:{c}"),
                format!("--listen-peer-urls=http://127.0.0.1:{pport}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{pport}"),
                format!("--initial-cluster={initial}"),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=keel-bench".into(),
            ]);
            e.client_addrs.push(format!("127.0.0.1:{c}"));
            e.logs.push(dir.join(format!("{name}.log")));
            e.children.push(None);
            e.spawn(i)?;
        }
        Ok(e)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let log = std::fs::File::options().create(true).append(true).open(&self.logs[i])?;
        let child = Command::new(&self.bin)
            .args(&self.args[i])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {} (install Debian's etcd-server, or pass --etcd '')", self.bin))?;
        self.children[i] = Some(child);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The index of the member that leads, as every running member reports it.
    async fn leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut ids = Vec::new();
            let mut leader = None;
            for (i, a) in self.client_addrs.iter().enumerate() {
                if self.children[i].is_none() {
                    ids.push(None);
                    continue;
                }
                let ch = Endpoint::from_shared(format!("http://{a}"))?.connect_timeout(Duration::from_millis(300));
                let st = match ch.connect().await {
                    Ok(ch) => {
                        etcd::maintenance_client::MaintenanceClient::new(ch).status(etcd::StatusRequest {}).await.ok()
                    }
                    Err(_) => None,
                };
                let st = st.map(|r| r.into_inner());
                if let Some(s) = &st {
                    if s.leader != 0 {
                        leader = Some(s.leader);
                    }
                }
                ids.push(st.and_then(|s| s.header.map(|h| h.member_id)));
            }
            if let Some(l) = leader {
                if let Some(i) = ids.iter().position(|m| *m == Some(l)) {
                    return Ok(i);
                }
            }
            if Instant::now() > deadline {
                bail!("etcd has no leader after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

async fn etcd_kills(e: &mut Etcd, kills: usize) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::new();
    for k in 0..kills {
        let leader = e.leader(Duration::from_secs(20)).await?;
        let survivors: Vec<String> =
            e.client_addrs.iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, a)| a.clone()).collect();
        let target =
            Target::Etcd(channels(&survivors, 1, None)?.into_iter().map(etcd::kv_client::KvClient::new).collect());
        target.put(0, b"bench/kill/warm0".to_vec(), b"v".to_vec()).await.ok();
        target.put(1, b"bench/kill/warm1".to_vec(), b"v".to_vec()).await.ok();
        e.kill(leader);
        out.push(first_write(&target, &format!("etcd{k}"), Duration::from_secs(30)).await?);
        e.spawn(leader)?;
        // Let the restarted member rejoin before the next kill.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(out)
}

/// The addresses the clients use, by `--leader-only` / `--follower-only`, and what the first
/// client (the whole 1-client run) talks to.
fn route(b: &StoreBench, addrs: &[String], leader: usize, system: &str) -> anyhow::Result<Vec<String>> {
    let chosen = if b.leader_only {
        vec![addrs[leader].clone()]
    } else if b.follower_only {
        let follower = (0..addrs.len()).find(|i| *i != leader).context("--follower-only needs two replicas or more")?;
        vec![addrs[follower].clone()]
    } else {
        addrs.to_vec()
    };
    let first = if chosen[0] == addrs[leader] { "the leader" } else { "a follower" };
    println!("  {system}: the first client writes through {first}");
    Ok(chosen)
}

async fn store(b: StoreBench) -> anyhow::Result<()> {
    let dir = match &b.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("keel-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    let mut rows: Vec<(usize, Figures, Option<Figures>)> = Vec::new();

    println!(
        "keel bench store: {} replicas on loopback, fsync on, {}-byte values, {} s per run",
        b.replicas, b.load.value_size, b.load.seconds
    );
    let mut cluster = ProcCluster::start(&exe, &dir.join("keel"), b.replicas, &b.server_args)?;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
    let addrs = route(&b, &cluster.addrs(), leader, "keel")?;
    let keel = Target::Keel(
        channels(&addrs, b.load.conns_per_replica, Some(&cluster.pki.admin))?
            .into_iter()
            .map(pb::kv_client::KvClient::new)
            .collect(),
    );
    for &c in &b.clients {
        let f = put_load(&keel, c, b.load.seconds, b.load.value_size, &format!("c{c}")).await;
        println!(
            "  keel {c:>4} clients: {:>8.0} writes/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} errors)",
            f.per_sec, f.p50_ms, f.p99_ms, f.errors
        );
        rows.push((c, f, None));
    }
    let keel_kill = if b.kills > 0 { Some(keel_kills(&mut cluster, b.kills).await?) } else { None };
    if b.dir.is_some() {
        cluster.keep();
    }
    drop(cluster);

    let mut etcd_kill = None;
    if !b.load.etcd.is_empty() {
        let mut e = Etcd::start(&b.load.etcd, &dir.join("etcd"))?;
        let leader = e.leader(Duration::from_secs(30)).await?;
        let addrs = route(&b, &e.client_addrs, leader, "etcd")?;
        let target = Target::Etcd(
            channels(&addrs, b.load.conns_per_replica, None)?.into_iter().map(etcd::kv_client::KvClient::new).collect(),
        );
        debug_assert!(target.conns() > 0);
        for row in rows.iter_mut() {
            let f = put_load(&target, row.0, b.load.seconds, b.load.value_size, &format!("c{}", row.0)).await;
            println!(
                "  etcd {:>4} clients: {:>8.0} writes/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} errors)",
                row.0, f.per_sec, f.p50_ms, f.p99_ms, f.errors
            );
            row.2 = Some(f);
        }
        if b.kills > 0 {
            etcd_kill = Some(etcd_kills(&mut e, b.kills).await?);
        }
    }

    println!();
    println!("| clients | keel writes/s | keel p50 ms | keel p99 ms | etcd writes/s | etcd p50 ms | etcd p99 ms | keel/etcd |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (c, k, e) in &rows {
        match e {
            Some(e) => println!(
                "| {c} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2}x |",
                k.per_sec,
                k.p50_ms,
                k.p99_ms,
                e.per_sec,
                e.p50_ms,
                e.p99_ms,
                k.per_sec / e.per_sec
            ),
            None => println!("| {c} | {:.0} | {:.2} | {:.2} | - | - | - | - |", k.per_sec, k.p50_ms, k.p99_ms),
        }
    }
    if let Some(k) = keel_kill {
        let (p50, max) = median_ms(k.clone());
        println!();
        println!("leader kill -9 -> next committed write, {} kills:", k.len());
        println!(
            "  keel: median {p50:.0} ms, max {max:.0} ms  (all: {:?})",
            k.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
        );
        if let Some(e) = etcd_kill {
            let (p50, max) = median_ms(e.clone());
            println!(
                "  etcd: median {p50:.0} ms, max {max:.0} ms  (all: {:?})",
                e.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
            );
        }
    }
    if b.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// keel bench watch: watch fan-out.
//
// Every watcher is one Watch stream (keel: `Objects/Watch` of ConfigMaps in `default`; etcd: a
// watch of `/registry/configmaps/default/`). Each update carries, in the ConfigMap's data, the
// writer slot, a sequence number and its send time, so a watcher can measure the delivery
// delay (send of the update -> receipt by the watcher, commit included) and note which updates
// it saw. Two workloads per system:
//  - fixed: an open-loop pacer sends `--rate` updates/s over `--objects` ConfigMaps;
//  - max: `--writers` closed-loop writers, each owning one ConfigMap, each sending its next
//    update once every watcher received its previous one. That is the highest update rate
//    the system sustains without watchers falling behind, with at most `--writers` updates
//    in flight.
// ---------------------------------------------------------------------------------------------

#[derive(Args, Clone)]
pub struct WatchBench {
    /// Concurrent watchers (one Watch stream each), spread over every replica and connection.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Updates per second of the fixed-rate workload.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds each workload is measured.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Closed-loop writers of the max-rate workload (0 skips it).
    #[arg(long, default_value_t = 32)]
    pub writers: usize,
    /// ConfigMaps the fixed-rate workload updates in turn.
    #[arg(long, default_value_t = 16)]
    pub objects: usize,
    /// Bytes of padding in every update's data (the ConfigMap is ~100 bytes more).
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// gRPC connections per replica shared by watchers and writers.
    #[arg(long, default_value_t = 8)]
    pub conns_per_replica: usize,
    /// The etcd binary to compare with ("" skips etcd).
    #[arg(long, default_value = "etcd")]
    pub etcd: String,
    /// Skip the keel cluster (measure etcd only).
    #[arg(long)]
    pub skip_keel: bool,
    /// Extra flags for every `keel server` (e.g. --server-args=--watch-history=200000).
    #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
    pub server_args: Vec<String>,
    /// Working directory, kept afterwards with the servers' data and logs (default: a new
    /// directory under the system temp dir, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// An update's identity inside the ConfigMap: its writer slot, its sequence number in the
/// workload (0 is the warm-up marker) and when it was sent, in ns since the bench's epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stamp {
    slot: usize,
    seq: u64,
    sent_ns: u64,
}

const MARKER: u64 = 0;
const WATCH_PREFIX: &str = "/registry/configmaps/default/";
/// Low bits of a slot's state count the watchers that saw the slot's current sequence number.
const SLOT_BITS: u32 = 20;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;

/// A ConfigMap carrying `stamp`, shaped like the one keel stores (type meta, uid, creation
/// time), so that etcd's values are the same size as keel's.
fn stamped_configmap(name: &str, stamp: Stamp, pad: &str) -> pb::Object {
    let cm = pb::ConfigMap {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        metadata: Some(pb::ObjectMeta {
            name: name.into(),
            namespace: "default".into(),
            uid: "00000000-0000-4000-8000-000000000000".into(),
            creation_timestamp: "2026-11-28T00:00:00Z".into(),
            ..Default::default()
        }),
        data: [
            ("slot".to_string(), stamp.slot.to_string()),
            ("seq".to_string(), stamp.seq.to_string()),
            ("sent".to_string(), stamp.sent_ns.to_string()),
            ("pad".to_string(), pad.to_string()),
        ]
        .into(),
        ..Default::default()
    };
    pb::Object { kind: Some(pb::object::Kind::ConfigMap(cm)) }
}

fn stamp_of(obj: &pb::Object) -> Option<Stamp> {
    let Some(pb::object::Kind::ConfigMap(cm)) = obj.kind.as_ref() else {
        return None;
    };
    let n = |k: &str| cm.data.get(k).and_then(|v| v.parse::<u64>().ok());
    Some(Stamp { slot: usize::try_from(n("slot")?).ok()?, seq: n("seq")?, sent_ns: n("sent")? })
}

/// The end of the key range of every key starting with `prefix`.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// CPU seconds (user + system) `pid` has used so far, from /proc (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is the 3rd field overall,
    // utime the 14th and stime the 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// What the watchers of one workload share: the clock, per-writer-slot delivery counts (the
/// closed-loop writers' flow control and the warm-up marker), and the measurement window.
struct Fanout {
    watchers: usize,
    epoch: Instant,
    /// Per slot: `seq << SLOT_BITS | watchers that saw seq`, and a wake-up for its writer.
    slots: Vec<(std::sync::atomic::AtomicU64, tokio::sync::Notify)>,
    /// First deliveries so far, duplicates not counted.
    delivered: std::sync::atomic::AtomicU64,
    /// Deliveries received inside [start, end) (ns since epoch) count towards deliveries/s.
    window: [std::sync::atomic::AtomicU64; 2],
}

impl Fanout {
    fn new(watchers: usize, slots: usize, epoch: Instant) -> Fanout {
        use std::sync::atomic::AtomicU64;
        Fanout {
            watchers,
            epoch,
            slots: (0..slots.max(1)).map(|_| (AtomicU64::new(u64::MAX), tokio::sync::Notify::new())).collect(),
            delivered: AtomicU64::new(0),
            window: [AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)],
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn in_window(&self, ns: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        ns >= self.window[0].load(Relaxed) && ns < self.window[1].load(Relaxed)
    }

    fn set_window(&self, start: u64, end: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.window[1].store(end, Relaxed);
        self.window[0].store(start, Relaxed);
    }

    /// Starts counting the watchers that see `seq` of `slot`.
    fn arm(&self, slot: usize, seq: u64) {
        self.slots[slot].0.store(seq << SLOT_BITS, std::sync::atomic::Ordering::Release);
    }

    fn seen_by(&self, slot: usize, seq: u64) -> usize {
        let s = self.slots[slot].0.load(std::sync::atomic::Ordering::Acquire);
        if s >> SLOT_BITS == seq {
            (s & SLOT_MASK) as usize
        } else {
            0
        }
    }

    /// A watcher saw `seq` of `slot` for the first time.
    fn saw(&self, slot: usize, seq: u64) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let Some((state, notify)) = self.slots.get(slot) else {
            return;
        };
        let mut cur = state.load(Acquire);
        while cur >> SLOT_BITS == seq {
            match state.compare_exchange_weak(cur, cur + 1, AcqRel, Acquire) {
                Ok(_) => {
                    if (cur & SLOT_MASK) as usize + 1 == self.watchers {
                        // notify_one keeps a permit when the writer is not waiting yet.
                        notify.notify_one();
                    }
                    return;
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Waits until every watcher saw `seq` of `slot`; false on timeout.
    async fn wait_all(&self, slot: usize, seq: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.slots[slot].1.notified();
            if self.seen_by(slot, seq) >= self.watchers {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.seen_by(slot, seq) >= self.watchers;
            }
        }
    }
}

/// What one watcher saw. Delays only, never whole events, so 1,000 watchers stay small.
#[derive(Default)]
struct WatcherLog {
    /// Bitmap of the sequence numbers seen.
    seen: Vec<u64>,
    delays_us: Vec<u32>,
    in_window: u64,
    duplicates: u64,
    /// Streams re-opened from the last revision seen (the server cut the watch off).
    resumes: u64,
    failure: Option<String>,
}

impl WatcherLog {
    fn record(&mut self, fan: &Fanout, s: Stamp) {
        let now = fan.now_ns();
        let (word, bit) = ((s.seq / 64) as usize, 1u64 << (s.seq % 64));
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= bit;
        fan.delivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        fan.saw(s.slot, s.seq);
        if s.seq != MARKER {
            self.delays_us.push(u32::try_from(now.saturating_sub(s.sent_ns) / 1000).unwrap_or(u32::MAX));
            if fan.in_window(now) {
                self.in_window += 1;
            }
        }
    }

    fn has(&self, seq: u64) -> bool {
        self.seen.get((seq / 64) as usize).is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    /// How many of the acknowledged updates this watcher never saw.
    fn missed(&self, acked: &[u64]) -> u64 {
        acked.iter().filter(|s| !self.has(**s)).count() as u64
    }
}

/// Resumes a watcher may do before it counts as failed.
const MAX_RESUMES: u64 = 100;

#[derive(Clone)]
enum WatchTarget {
    Keel(Vec<pb::objects_client::ObjectsClient<Channel>>),
    Etcd(Vec<Channel>),
}

/// A system under test: its clients and its server processes (for CPU accounting).
struct System {
    target: WatchTarget,
    pids: Vec<u32>,
}

impl WatchTarget {
    fn name(&self) -> &'static str {
        match self {
            WatchTarget::Keel(_) => "keel",
            WatchTarget::Etcd(_) => "etcd",
        }
    }

    /// The current revision of the watched range: watches start after it.
    async fn revision(&self) -> anyhow::Result<i64> {
        match self {
            WatchTarget::Keel(c) => {
                let req = pb::ListRequest {
                    kind: "ConfigMap".into(),
                    namespace: "default".into(),
                    limit: 1,
                    ..Default::default()
                };
                let rv = c[0].clone().list(req).await?.into_inner().resource_version;
                rv.parse().with_context(|| format!("list returned resourceVersion {rv:?}"))
            }
            WatchTarget::Etcd(c) => {
                let req = etcd::RangeRequest {
                    key: WATCH_PREFIX.into(),
                    range_end: range_end(WATCH_PREFIX),
                    count_only: true,
                    ..Default::default()
                };
                let r = etcd::kv_client::KvClient::new(c[0].clone()).range(req).await?.into_inner();
                Ok(r.header.map_or(0, |h| h.revision))
            }
        }
    }

    /// Creates (keel) or puts (etcd) ConfigMap `name`.
    async fn create(&self, name: &str, obj: pb::Object) -> anyhow::Result<()> {
        match self {
            WatchTarget::Keel(c) => match c[0].clone().create(pb::CreateRequest { object: Some(obj) }).await {
                Err(s) if s.code() != tonic::Code::AlreadyExists => Err(s).with_context(|| format!("create {name}")),
                _ => Ok(()),
            },
            WatchTarget::Etcd(_) => self.update(0, name, obj).await.with_context(|| format!("put {name}")),
        }
    }

    /// An unconditional update of ConfigMap `name` (keel: empty resourceVersion; etcd: a put).
    async fn update(&self, conn: usize, name: &str, obj: pb::Object) -> Result<(), tonic::Status> {
        let timeout = Duration::from_secs(5);
        match self {
            WatchTarget::Keel(c) => {
                let mut req = tonic::Request::new(pb::UpdateRequest { object: Some(obj) });
                req.set_timeout(timeout);
                c[conn % c.len()].clone().update(req).await.map(|_| ())
            }
            WatchTarget::Etcd(c) => {
                use prost::Message;
                let key = format!("{WATCH_PREFIX}{name}").into_bytes();
                let mut req =
                    tonic::Request::new(etcd::PutRequest { key, value: obj.encode_to_vec(), ..Default::default() });
                req.set_timeout(timeout);
                etcd::kv_client::KvClient::new(c[conn % c.len()].clone()).put(req).await.map(|_| ())
            }
        }
    }

    /// Sends `stamp` as an update of `name`. A keel update reads then compares the revision,
    /// so a concurrent update of the same ConfigMap aborts it; it is retried (it did not apply).
    async fn send(&self, conn: usize, name: &str, stamp: Stamp, pad: &str) -> Result<(), tonic::Status> {
        let mut attempt = 0;
        loop {
            match self.update(conn + attempt, name, stamped_configmap(name, stamp, pad)).await {
                Err(s) if s.code() == tonic::Code::Aborted && attempt < 10 => attempt += 1,
                other => return other,
            }
        }
    }

    /// Runs watcher `i` from after revision `after` until `stop`, re-opening its stream from
    /// the last revision seen when the server ends it.
    async fn watcher(
        self,
        i: usize,
        after: i64,
        fan: Arc<Fanout>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> WatcherLog {
        let mut log = WatcherLog::default();
        let mut last = after;
        loop {
            let ended = match &self {
                WatchTarget::Keel(c) => keel_watch(c[i % c.len()].clone(), &mut last, &fan, &mut log, &mut stop).await,
                WatchTarget::Etcd(c) => etcd_watch(c[i % c.len()].clone(), &mut last, &fan, &mut log, &mut stop).await,
            };
            match ended {
                Ok(true) => return log,
                Ok(false) if log.resumes < MAX_RESUMES => {
                    log.resumes += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(false) => {
                    log.failure = Some(format!("watcher {i}: stream ended {MAX_RESUMES} times; gave up"));
                    return log;
                }
                Err(e) => {
                    log.failure = Some(format!("watcher {i}: {e}"));
                    return log;
                }
            }
        }
    }
}

/// One keel watch stream. Ok(true): stopped; Ok(false): the stream ended, resume after `last`.
async fn keel_watch(
    mut client: pb::objects_client::ObjectsClient<Channel>,
    last: &mut i64,
    fan: &Fanout,
    log: &mut WatcherLog,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<bool, tonic::Status> {
    let req = pb::WatchObjectsRequest {
        kind: "ConfigMap".into(),
        namespace: "default".into(),
        resource_version: last.to_string(),
        ..Default::default()
    };
    let mut stream = tokio::select! {
        _ = stop.changed() => return Ok(true),
        r = client.watch(req) => match r {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::OutOfRange => return Err(s),
            Err(_) => return Ok(false),
        },
    };
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return Ok(true),
            m = stream.message() => match m {
                Ok(Some(ev)) => {
                    if let Some(s) = ev.object.as_ref().and_then(stamp_of) {
                        log.record(fan, s);
                    }
                    if let Ok(rv) = ev.resource_version.parse::<i64>() {
                        *last = rv;
                    }
                }
                Err(s) if s.code() == tonic::Code::OutOfRange => return Err(s),
                Ok(None) | Err(_) => return Ok(false),
            },
        }
    }
}

/// One etcd watch stream (one watch per gRPC stream, as keel's). Same contract as keel_watch.
async fn etcd_watch(
    channel: Channel,
    last: &mut i64,
    fan: &Fanout,
    log: &mut WatcherLog,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<bool, tonic::Status> {
    use futures::StreamExt;
    use prost::Message;
    let create = etcd::WatchCreateRequest {
        key: WATCH_PREFIX.into(),
        range_end: range_end(WATCH_PREFIX),
        start_revision: *last + 1,
        ..Default::default()
    };
    let req = etcd::WatchRequest { request_union: Some(etcd::watch_request::RequestUnion::CreateRequest(create)) };
    // The request side stays open: etcd ends the watch when its client half-closes.
    let requests = futures::stream::iter([req]).chain(futures::stream::pending());
    let mut client = etcd::watch_client::WatchClient::new(channel);
    let mut stream = tokio::select! {
        _ = stop.changed() => return Ok(true),
        r = client.watch(requests) => match r {
            Ok(r) => r.into_inner(),
            Err(_) => return Ok(false),
        },
    };
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return Ok(true),
            m = stream.message() => match m {
                Ok(Some(resp)) => {
                    if resp.compact_revision > 0 {
                        return Err(tonic::Status::out_of_range(format!("etcd compacted to {}", resp.compact_revision)));
                    }
                    for ev in &resp.events {
                        let Some(kv) = ev.kv.as_ref() else { continue };
                        if let Some(s) = pb::Object::decode(kv.value.as_slice()).ok().as_ref().and_then(stamp_of) {
                            log.record(fan, s);
                        }
                        *last = kv.mod_revision;
                    }
                    if resp.canceled {
                        return Ok(false);
                    }
                }
                Ok(None) | Err(_) => return Ok(false),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Workload {
    /// Open loop: this many updates per second.
    Fixed(f64),
    /// Closed loop: this many writers, each waiting for full delivery of its last update.
    Max(usize),
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workload::Fixed(r) => write!(f, "fixed {r} updates/s"),
            Workload::Max(w) => write!(f, "max ({w} writers)"),
        }
    }
}

/// The outcome of one workload against one system.
#[derive(Debug, Clone, Default)]
struct FanoutFigures {
    updates: usize,
    write_errors: usize,
    /// Writers that gave up waiting for every watcher to see an update.
    stalls: usize,
    updates_per_sec: f64,
    deliveries_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    expected: u64,
    missed: u64,
    duplicated: u64,
    resumes: u64,
    failures: Vec<String>,
    /// Cores busy during the measurement: all server processes, and this bench process.
    server_cores: f64,
    client_cores: f64,
}

fn percentile_us(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// The updates a workload's writers sent: acknowledged sequence numbers, errors, stalls.
#[derive(Default)]
struct Sent {
    acked: Vec<u64>,
    errors: usize,
    first_error: Option<String>,
    stalls: usize,
}

impl Sent {
    fn error(&mut self, e: String) {
        self.errors += 1;
        self.first_error.get_or_insert(e);
    }

    fn merge(&mut self, o: Sent) {
        self.acked.extend(o.acked);
        self.errors += o.errors;
        self.stalls += o.stalls;
        if let Some(e) = o.first_error {
            self.first_error.get_or_insert(e);
        }
    }
}

async fn fixed_writer(
    target: &WatchTarget,
    fan: &Fanout,
    names: &[String],
    rate: f64,
    seconds: f64,
    pad: &Arc<str>,
) -> Sent {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    let mut seq = MARKER;
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        seq += 1;
        let (target, name, pad) = (target.clone(), names[seq as usize % names.len()].clone(), pad.clone());
        let stamp = Stamp { slot: 0, seq, sent_ns: fan.now_ns() };
        tasks.spawn(async move { (seq, target.send(seq as usize, &name, stamp, &pad).await) });
    }
    let mut sent = Sent::default();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((seq, Ok(()))) => sent.acked.push(seq),
            Ok((seq, Err(s))) => sent.error(format!("update {seq}: {s}")),
            Err(e) => sent.error(format!("writer task: {e}")),
        }
    }
    sent
}

async fn closed_loop_writers(
    target: &WatchTarget,
    fan: &Arc<Fanout>,
    names: &[String],
    writers: usize,
    seconds: f64,
    pad: &Arc<str>,
) -> Sent {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(MARKER + 1));
    let mut tasks = Vec::new();
    // Writer w owns ConfigMap w, so that keel's read-compare-write updates never conflict.
    for (w, name) in names.iter().take(writers).enumerate() {
        let (target, fan, next, pad, name) = (target.clone(), fan.clone(), next.clone(), pad.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = Sent::default();
            while Instant::now() < end {
                let seq = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                fan.arm(w, seq);
                let stamp = Stamp { slot: w, seq, sent_ns: fan.now_ns() };
                if let Err(s) = target.send(w, &name, stamp, &pad).await {
                    sent.error(format!("update {seq} of {name}: {s}"));
                    continue;
                }
                sent.acked.push(seq);
                if !fan.wait_all(w, seq, Duration::from_secs(5)).await {
                    sent.stalls += 1;
                }
            }
            sent
        }));
    }
    let mut all = Sent::default();
    for t in tasks {
        match t.await {
            Ok(s) => all.merge(s),
            Err(e) => all.error(format!("writer task: {e}")),
        }
    }
    all
}

/// Runs one workload: opens the watchers, waits until all see a marker, measures, drains,
/// and checks that every watcher saw every acknowledged update exactly once.
async fn run_fanout(
    sys: &System,
    b: &WatchBench,
    workload: Workload,
    names: &[String],
    epoch: Instant,
) -> anyhow::Result<FanoutFigures> {
    let slots = match workload {
        Workload::Fixed(_) => 1,
        Workload::Max(w) => w,
    };
    let target = &sys.target;
    let fan = Arc::new(Fanout::new(b.watchers, slots, epoch));
    let after = target.revision().await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watchers: Vec<_> =
        (0..b.watchers).map(|i| tokio::spawn(target.clone().watcher(i, after, fan.clone(), stop_rx.clone()))).collect();
    let pad: Arc<str> = "x".repeat(b.value_size).into();

    // Warm-up: every watch stream is open and delivering before the clock starts.
    let t = Instant::now();
    fan.arm(0, MARKER);
    let marker = Stamp { slot: 0, seq: MARKER, sent_ns: fan.now_ns() };
    target.send(0, &names[0], marker, &pad).await.context("warm-up marker update")?;
    if !fan.wait_all(0, MARKER, Duration::from_secs(60)).await {
        let _ = stop_tx.send(true);
        bail!(
            "{}: only {} of {} watchers saw the warm-up marker within 60 s",
            target.name(),
            fan.seen_by(0, MARKER),
            b.watchers
        );
    }
    println!(
        "  {} {workload}: {} watchers established in {:.1} s",
        target.name(),
        b.watchers,
        t.elapsed().as_secs_f64()
    );

    let me = std::process::id();
    let cpu0 = (cpu_of(&sys.pids), cpu_seconds(me));
    let start = fan.now_ns();
    fan.set_window(start, start + (b.seconds * 1e9) as u64);
    let sent = match workload {
        Workload::Fixed(rate) => fixed_writer(target, &fan, names, rate, b.seconds, &pad).await,
        Workload::Max(writers) => closed_loop_writers(target, &fan, names, writers, b.seconds, &pad).await,
    };
    let elapsed = (fan.now_ns() - start) as f64 / 1e9;
    let cpu1 = (cpu_of(&sys.pids), cpu_seconds(me));
    // Drain: every acknowledged update (and the marker) reaches every watcher, or time is up.
    let expected_fresh = (sent.acked.len() as u64 + 1) * b.watchers as u64;
    let drain = Instant::now() + Duration::from_secs(10);
    while fan.delivered.load(std::sync::atomic::Ordering::Relaxed) < expected_fresh && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);

    let mut f = FanoutFigures {
        updates: sent.acked.len(),
        write_errors: sent.errors,
        stalls: sent.stalls,
        updates_per_sec: sent.acked.len() as f64 / elapsed,
        expected: sent.acked.len() as u64 * b.watchers as u64,
        server_cores: (cpu1.0 - cpu0.0) / elapsed,
        client_cores: (cpu1.1 - cpu0.1) / elapsed,
        ..Default::default()
    };
    if let Some(e) = &sent.first_error {
        println!("  {} {workload}: first write error: {e}", target.name());
    }
    let mut delays = Vec::new();
    let mut in_window = 0;
    for (i, w) in watchers.into_iter().enumerate() {
        let log = match w.await {
            Ok(l) => l,
            Err(e) => {
                f.failures.push(format!("watcher {i} panicked: {e}"));
                f.missed += sent.acked.len() as u64;
                continue;
            }
        };
        let missed = log.missed(&sent.acked);
        if missed > 0 && f.failures.len() < 5 {
            f.failures.push(format!("watcher {i} missed {missed} of {} updates", sent.acked.len()));
        }
        f.missed += missed;
        f.duplicated += log.duplicates;
        f.resumes += log.resumes;
        in_window += log.in_window;
        f.failures.extend(log.failure);
        delays.extend(log.delays_us);
    }
    delays.sort_unstable();
    f.deliveries_per_sec = in_window as f64 / elapsed;
    f.p50_ms = percentile_us(&delays, 0.5);
    f.p99_ms = percentile_us(&delays, 0.99);
    f.max_ms = delays.last().map_or(f64::NAN, |d| f64::from(*d) / 1000.0);
    println!(
        "  {} {workload}: {} updates ({:.0}/s), {} write errors, {} stalls; {} of {} deliveries missed, {} duplicated, {} resumes; deliveries {:.0}/s, delay p50 {:.2} ms p99 {:.2} ms max {:.1} ms; CPU servers {:.2} cores, bench client {:.2} cores",
        target.name(),
        f.updates,
        f.updates_per_sec,
        f.write_errors,
        f.stalls,
        f.missed,
        f.expected,
        f.duplicated,
        f.resumes,
        f.deliveries_per_sec,
        f.p50_ms,
        f.p99_ms,
        f.max_ms,
        f.server_cores,
        f.client_cores
    );
    Ok(f)
}

/// Both workloads against one system, on ConfigMaps it creates first.
async fn watch_system(sys: &System, b: &WatchBench, epoch: Instant) -> anyhow::Result<Vec<(Workload, FanoutFigures)>> {
    let names: Vec<String> = (0..b.objects.max(b.writers).max(1)).map(|i| format!("watch-bench-{i}")).collect();
    let pad = "x".repeat(b.value_size);
    for n in &names {
        sys.target.create(n, stamped_configmap(n, Stamp { slot: 0, seq: MARKER, sent_ns: 0 }, &pad)).await?;
    }
    let mut out = Vec::new();
    let fixed = Workload::Fixed(b.rate);
    out.push((fixed, run_fanout(sys, b, fixed, &names[..b.objects.max(1)], epoch).await?));
    if b.writers > 0 {
        let max = Workload::Max(b.writers);
        out.push((max, run_fanout(sys, b, max, &names, epoch).await?));
    }
    Ok(out)
}

async fn watch(b: WatchBench) -> anyhow::Result<()> {
    if b.watchers == 0 || b.watchers as u64 > SLOT_MASK {
        bail!("--watchers must be between 1 and {SLOT_MASK}");
    }
    let dir = match &b.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("keel-bench-watch-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    let epoch = Instant::now();
    let size = {
        use prost::Message;
        let pad = "x".repeat(b.value_size);
        stamped_configmap("watch-bench-0", Stamp { slot: 0, seq: 1, sent_ns: 1 << 40 }, &pad).encoded_len()
    };
    println!(
        "keel bench watch: 3 replicas, {} watchers over {} connections per replica, ~{size}-byte ConfigMaps, {} s per workload",
        b.watchers, b.conns_per_replica, b.seconds
    );
    let mut rows: Vec<(&'static str, Workload, FanoutFigures)> = Vec::new();
    if !b.skip_keel {
        let mut cluster = ProcCluster::start(&exe, &dir.join("keel"), 3, &b.server_args)?;
        if b.dir.is_some() {
            cluster.keep();
        }
        cluster.wait_caught_up(Duration::from_secs(20)).await?;
        for addr in cluster.addrs() {
            crate::harness::wait_default_namespaces(&addr, Duration::from_secs(20), &cluster.pki.admin).await?;
        }
        let chans = channels(&cluster.addrs(), b.conns_per_replica, Some(&cluster.pki.admin))?;
        let target = WatchTarget::Keel(chans.into_iter().map(pb::objects_client::ObjectsClient::new).collect());
        let sys = System { target, pids: cluster.nodes.iter().filter_map(|n| n.pid()).collect() };
        for (w, f) in watch_system(&sys, &b, epoch).await? {
            rows.push(("keel", w, f));
        }
    }
    if !b.etcd.is_empty() {
        let e = Etcd::start(&b.etcd, &dir.join("etcd"))?;
        e.leader(Duration::from_secs(30)).await?;
        let target = WatchTarget::Etcd(channels(&e.client_addrs, b.conns_per_replica, None)?);
        let sys = System { target, pids: e.children.iter().flatten().map(|c| c.id()).collect() };
        for (w, f) in watch_system(&sys, &b, epoch).await? {
            rows.push(("etcd", w, f));
        }
    }
    if b.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }

    println!();
    println!(
        "| system | workload | updates/s | deliveries/s | delay p50 ms | delay p99 ms | delay max ms | missed | duplicated | server cores | client cores |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (sys, w, f) in &rows {
        println!(
            "| {sys} | {w} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} | {} of {} | {} | {:.2} | {:.2} |",
            f.updates_per_sec,
            f.deliveries_per_sec,
            f.p50_ms,
            f.p99_ms,
            f.max_ms,
            f.missed,
            f.expected,
            f.duplicated,
            f.server_cores,
            f.client_cores
        );
    }
    let find =
        |sys: &str, max: bool| rows.iter().find(|r| r.0 == sys && matches!(r.1, Workload::Max(_)) == max).map(|r| &r.2);
    if let (Some(k), Some(e)) = (find("keel", true), find("etcd", true)) {
        println!();
        println!(
            "max rate: keel/etcd deliveries/s {:.2}x (target >= 2x), p99 keel {:.2} ms vs etcd {:.2} ms (target: keel <= etcd)",
            k.deliveries_per_sec / e.deliveries_per_sec,
            k.p99_ms,
            e.p99_ms
        );
    }
    if let (Some(k), Some(e)) = (find("keel", false), find("etcd", false)) {
        println!(
            "fixed rate: p99 keel {:.2} ms vs etcd {:.2} ms, p50 keel {:.2} ms vs etcd {:.2} ms",
            k.p99_ms, e.p99_ms, k.p50_ms, e.p50_ms
        );
    }
    let broken: Vec<String> = rows
        .iter()
        .filter(|(_, _, f)| f.missed > 0 || f.duplicated > 0 || !f.failures.is_empty())
        .map(|(sys, w, f)| {
            let mut why = f.failures.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
            if f.failures.len() > 5 {
                why.push_str(&format!("; and {} more", f.failures.len() - 5));
            }
            format!("{sys} {w}: {} missed, {} duplicated deliveries; {why}", f.missed, f.duplicated)
        })
        .collect();
    if !broken.is_empty() {
        println!();
        for line in &broken {
            println!("FAIL: {line}");
        }
        bail!("{} workload(s) did not deliver every event to every watcher exactly once", broken.len());
    }
    println!();
    println!("OK: every watcher saw every acknowledged update exactly once");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fanout(watchers: usize, slots: usize) -> Fanout {
        Fanout::new(watchers, slots, Instant::now())
    }

    #[test]
    fn a_stamp_survives_the_configmap_round_trip_through_protobuf() {
        use prost::Message;
        let stamp = Stamp { slot: 7, seq: 123_456, sent_ns: 9_876_543_210 };
        let bytes = stamped_configmap("watch-bench-7", stamp, "xxxx").encode_to_vec();
        let back = pb::Object::decode(bytes.as_slice()).expect("a ConfigMap decodes");
        assert_eq!(stamp_of(&back), Some(stamp));
        assert_eq!(stamp_of(&pb::Object::default()), None);
    }

    #[test]
    fn the_range_end_of_a_prefix_covers_exactly_its_keys() {
        assert_eq!(range_end(WATCH_PREFIX), b"/registry/configmaps/default0".to_vec());
        assert_eq!(range_end("ab"), b"ac".to_vec());
    }

    #[test]
    fn a_watcher_log_counts_duplicates_once_and_reports_what_it_missed() {
        let fan = fanout(1, 1);
        let mut log = WatcherLog::default();
        for seq in [1, 2, 2, 200, 1] {
            log.record(&fan, Stamp { slot: 0, seq, sent_ns: 0 });
        }
        assert_eq!(log.duplicates, 2);
        assert_eq!(log.delays_us.len(), 3, "one delay per first delivery");
        assert_eq!(fan.delivered.load(std::sync::atomic::Ordering::Relaxed), 3);
        assert_eq!(log.missed(&[1, 2, 3, 200, 201]), 2);
    }

    #[test]
    fn the_marker_is_tracked_but_not_measured() {
        let fan = fanout(1, 1);
        let mut log = WatcherLog::default();
        log.record(&fan, Stamp { slot: 0, seq: MARKER, sent_ns: 0 });
        assert!(log.has(MARKER));
        assert!(log.delays_us.is_empty());
    }

    #[tokio::test]
    async fn a_slot_completes_only_when_every_watcher_saw_its_current_sequence() {
        let fan = Arc::new(fanout(3, 2));
        fan.arm(1, 10);
        fan.saw(1, 9); // a late delivery of the previous update does not count
        fan.saw(1, 10);
        fan.saw(0, 10); // another writer's slot
        fan.saw(1, 10);
        assert_eq!(fan.seen_by(1, 10), 2);
        assert!(!fan.wait_all(1, 10, Duration::from_millis(20)).await);
        let waiter = {
            let fan = fan.clone();
            tokio::spawn(async move { fan.wait_all(1, 10, Duration::from_secs(5)).await })
        };
        fan.saw(1, 10);
        assert!(waiter.await.expect("waiter runs"));
        // Re-arming starts the count again, and a stored wake-up of the old one does not
        // complete the new sequence.
        fan.arm(1, 11);
        assert!(!fan.wait_all(1, 11, Duration::from_millis(20)).await);
    }

    #[test]
    fn only_deliveries_inside_the_window_count_towards_the_rate() {
        let fan = fanout(1, 1);
        assert!(!fan.in_window(5), "no window before the measurement starts");
        fan.set_window(10, 20);
        assert!(!fan.in_window(9));
        assert!(fan.in_window(10));
        assert!(!fan.in_window(20));
    }
}
