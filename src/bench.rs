//! Benchmarks against real processes on loopback (`keel bench store`): three `keel server`
//! replicas and, as the peer, three etcd members, driven by the same client harness.

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
    /// Send every client to the leader instead of spreading them over all replicas.
    #[arg(long)]
    pub leader_only: bool,
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
    }
}

async fn api(b: ApiBench) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("keel-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    println!(
        "keel bench api: 3 replicas, {} clients, {}-byte values, {} s per run",
        b.clients, b.load.value_size, b.load.seconds
    );
    let mut rows = Vec::new();
    {
        let cluster = ProcCluster::start(&exe, &dir.join("keel"), 3, &[])?;
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
    println!("| path | writes/s | p50 ms | p99 ms | errors |");
    println!("|---|---:|---:|---:|---:|");
    for (name, f) in &rows {
        println!("| {name} | {:.0} | {:.2} | {:.2} | {} |", f.per_sec, f.p50_ms, f.p99_ms, f.errors);
    }
    let _ = std::fs::remove_dir_all(&dir);
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
            let mut n = 0u64;
            while Instant::now() < deadline {
                let key = format!("bench/{tag}/{c}/{n}").into_bytes();
                n += 1;
                let t = Instant::now();
                match target.put(c, key, value.to_vec()).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            lat.extend(l);
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    Figures {
        ops: lat.len(),
        errors,
        per_sec: lat.len() as f64 / elapsed,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
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
    let addrs = if b.leader_only { vec![cluster.nodes[leader].addr.clone()] } else { cluster.addrs() };
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
        e.leader(Duration::from_secs(30)).await?;
        let target = Target::Etcd(
            channels(&e.client_addrs, b.load.conns_per_replica, None)?
                .into_iter()
                .map(etcd::kv_client::KvClient::new)
                .collect(),
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
