//! Cluster lifecycle against real `keel` processes on 127.0.0.1: bootstrap with
//! --cluster-init, joins by token (good, wrong secret, wrong CA, expired, concurrent),
//! restart on a new port, agents and what a node may touch.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keel::pki::Credentials;
use keel::proto::v1 as pb;
use tokio::time::Instant;
use tonic::Code;

mod nodes;
mod runbook;

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// A `keel` process, killed when dropped; its output goes to `<dir>/<name>.log`.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(dir: &Path, name: &str, args: &[String]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::options().create(true).append(true).open(&log).unwrap();
        let child = Command::new(KEEL)
            .args(args)
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit by itself; its exit status and output.
    async fn exit(mut self, limit: Duration) -> (bool, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st.success(), self.output());
            }
            assert!(Instant::now() < deadline, "keel did not exit within {limit:?}:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn port() -> String {
    format!("127.0.0.1:{}", keel::harness::free_port().unwrap())
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

/// A replica process, with what it needs to be restarted.
struct Replica {
    proc: Option<Proc>,
    name: String,
    data: PathBuf,
    addr: String,
}

impl Replica {
    fn init(dir: &Path, name: &str) -> Replica {
        let addr = port();
        let data = dir.join(name);
        let a = args(&format!("server --cluster-init --name {name} --listen {addr} --data-dir {}", data.display()));
        Replica { proc: Some(Proc::spawn(dir, name, &a)), name: name.into(), data, addr }
    }

    fn init_with(dir: &Path, name: &str, extra: &str) -> Replica {
        let addr = port();
        let data = dir.join(name);
        let a =
            args(&format!("server --cluster-init --name {name} --listen {addr} --data-dir {} {extra}", data.display()));
        Replica { proc: Some(Proc::spawn(dir, name, &a)), name: name.into(), data, addr }
    }

    fn join(dir: &Path, name: &str, seed: &str, token: &str) -> Replica {
        let addr = port();
        let data = dir.join(name);
        let a = args(&format!(
            "server --name {name} --listen {addr} --data-dir {} --server {seed} --token {token}",
            data.display()
        ));
        Replica { proc: Some(Proc::spawn(dir, name, &a)), name: name.into(), data, addr }
    }

    /// Restarts from its data directory (no token), on `addr`.
    fn restart(&mut self, dir: &Path, addr: &str) {
        self.proc = None;
        self.addr = addr.to_string();
        let a = args(&format!("server --name {} --listen {addr} --data-dir {}", self.name, self.data.display()));
        self.proc = Some(Proc::spawn(dir, &self.name, &a));
    }

    fn token(&self, kind: &str) -> String {
        std::fs::read_to_string(self.data.join(kind)).unwrap().trim().to_string()
    }
}

/// Waits until `first` has bootstrapped the cluster (its join token is on disk), then
/// returns the admin credentials it wrote.
async fn bootstrapped(first: &Replica) -> Credentials {
    let token_path = first.data.join("token");
    wait_for("the token", Duration::from_secs(20), || async { token_path.exists().then_some(()) }).await;
    admin(first)
}

/// The admin credentials `--cluster-init` wrote.
fn admin(first: &Replica) -> Credentials {
    let cfg =
        keel::client::config::Config::load(&keel::server::bootstrap::DataDir::new(&first.data).admin_config()).unwrap();
    cfg.selected(None).unwrap().unwrap().credentials().unwrap()
}

async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cluster_client(addr: &str, creds: &Credentials) -> pb::cluster_client::ClusterClient<tonic::transport::Channel> {
    let ch = keel::client::endpoint(addr, creds).unwrap().connect_timeout(Duration::from_secs(1)).connect_lazy();
    pb::cluster_client::ClusterClient::new(ch)
}

/// The membership as the cluster reports it, once every member answers.
async fn members(addr: &str, creds: &Credentials) -> Option<pb::MembersResponse> {
    let r = cluster_client(addr, creds).members(pb::MembersRequest {}).await.ok()?.into_inner();
    r.members.iter().all(|m| m.status.is_some()).then_some(r)
}

/// Waits until the cluster has exactly `want` voters (and no learner), all answering.
async fn wait_voters(addr: &str, creds: &Credentials, want: usize) -> pb::MembersResponse {
    wait_for(&format!("{want} voters"), Duration::from_secs(60), || async {
        members(addr, creds)
            .await
            .filter(|r| r.members.len() == want && r.members.iter().all(|m| m.role == "voter") && r.leader_id != 0)
    })
    .await
}

async fn write_config_map(addr: &str, creds: &Credentials, name: &str) -> Result<(), tonic::Status> {
    let ch = keel::client::endpoint(addr, creds).unwrap().connect_lazy();
    let cm = pb::ConfigMap {
        metadata: Some(pb::ObjectMeta { name: name.into(), namespace: "default".into(), ..Default::default() }),
        ..Default::default()
    };
    let req =
        pb::ApplyRequest { objects: vec![pb::Object { kind: Some(pb::object::Kind::ConfigMap(cm)) }], dry_run: false };
    pb::objects_client::ObjectsClient::new(ch).apply(req).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_bootstrap_by_token_join_concurrently_and_survive_a_move() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r1 = Replica::init(d, "r1");
    let creds = bootstrapped(&r1).await;
    let server_token = r1.token("token");
    assert!(server_token.starts_with("K1") && server_token.contains("::server::"), "{server_token}");
    assert!(r1.proc.as_ref().unwrap().output().contains("Admin configuration:"));

    // Two replicas join at the same time through the first one.
    let r2 = Replica::join(d, "r2", &r1.addr, &server_token);
    let mut r3 = Replica::join(d, "r3", &r1.addr, &server_token);
    let m = wait_voters(&r1.addr, &creds, 3).await;
    let mut ids: Vec<u64> = m.members.iter().map(|m| m.id).collect();
    ids.sort();
    assert_eq!(ids, [1, 2, 3], "each joiner got its own id");
    let names: Vec<&str> = m.members.iter().map(|m| m.name.as_str()).collect();
    assert!(names.contains(&"r2") && names.contains(&"r3"), "{names:?}");
    write_config_map(&r2.addr, &creds, "through-a-joined-replica").await.unwrap();

    // r3 comes back on another port: its certificate, not its address, is its identity,
    // and the membership follows it.
    let r3_id = m.members.iter().find(|m| m.name == "r3").unwrap().id;
    let new_addr = port();
    r3.restart(d, &new_addr);
    let moved = wait_for("r3's new address in the membership", Duration::from_secs(60), || async {
        members(&r1.addr, &creds)
            .await
            .filter(|r| r.members.iter().any(|m| m.id == r3_id && m.address == new_addr && m.role == "voter"))
    })
    .await;
    assert_eq!(moved.members.len(), 3, "no member was added or lost by the move");
    write_config_map(&new_addr, &creds, "through-the-moved-replica").await.unwrap();

    // A restart in place changes nothing: no second membership change.
    let before = cluster_client(&r1.addr, &creds).members(pb::MembersRequest {}).await.unwrap().into_inner();
    let log_before = before.members.iter().find(|m| m.id == before.leader_id).unwrap().status.clone().unwrap();
    let mut r2 = r2;
    let r2_addr = r2.addr.clone();
    r2.restart(d, &r2_addr);
    let after = wait_voters(&r1.addr, &creds, 3).await;
    let m2: Vec<_> = after.members.iter().map(|m| (m.id, m.address.clone())).collect();
    let b2: Vec<_> = before.members.iter().map(|m| (m.id, m.address.clone())).collect();
    assert_eq!(m2, b2);
    let _ = log_before;

    // The admin configuration drives keelctl against the joined cluster.
    let cfg = keel::server::bootstrap::DataDir::new(&r1.data).admin_config();
    let out = Command::new(env!("CARGO_BIN_EXE_keelctl"))
        .args(["--server", &format!("{},{},{}", r1.addr, r2.addr, new_addr), "cluster", "members"])
        .env("KEELCONFIG", &cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("ID  NAME") && text.matches(" voter ").count() == 3, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_with_a_bad_token_get_a_clear_error_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r1 = Replica::init(d, "r1");
    let creds = bootstrapped(&r1).await;
    let good: keel::pki::JoinToken = r1.token("token").parse().unwrap();

    let try_join = |name: &str, token: String| {
        let data = d.join(name);
        let a = args(&format!(
            "server --name {name} --listen {} --data-dir {} --server {} --token {token}",
            port(),
            data.display(),
            r1.addr
        ));
        (Proc::spawn(d, name, &a), data)
    };
    let refused = |(p, data): (Proc, PathBuf), want: &'static str| async move {
        let (ok, out) = p.exit(Duration::from_secs(20)).await;
        assert!(!ok, "the join must fail:\n{out}");
        assert!(out.contains(want), "expected {want:?} in:\n{out}");
        assert!(!data.join("tls").exists(), "a refused join leaves no certificate behind");
    };

    let mut wrong = good.clone();
    wrong.secret = "x".repeat(32);
    refused(try_join("bad-secret", wrong.to_string()), "wrong secret").await;

    // A second cluster posing as the first: its token pins its own CA, which the first
    // cluster does not present, so the token is never sent.
    let other = Replica::init(d, "other");
    let other_token = other.data.join("token");
    wait_for("the other cluster's token", Duration::from_secs(20), || async { other_token.exists().then_some(()) })
        .await;
    refused(try_join("bad-ca", other.token("token")), "the token was not sent").await;

    // An expired token.
    let short = cluster_client(&r1.addr, &creds)
        .create_token(pb::CreateTokenRequest {
            role: "server".into(),
            ttl_seconds: 1,
            description: "short".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    refused(try_join("expired", short.token.clone()), "expired at").await;

    // A revoked token, and an agent token used for a server.
    let revoked = cluster_client(&r1.addr, &creds)
        .create_token(pb::CreateTokenRequest { role: "server".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let id = revoked.info.unwrap().id;
    cluster_client(&r1.addr, &creds).revoke_token(pb::RevokeTokenRequest { id: id.clone() }).await.unwrap();
    refused(try_join("revoked", revoked.token), "does not exist or was revoked").await;
    refused(try_join("agent-token", r1.token("agent-token")), "an agent token cannot join a server").await;
    refused(try_join("garbage", "K1nope".into()), "malformed join token").await;

    // Nothing joined: one voter, and the tokens list shows what exists.
    let m = wait_voters(&r1.addr, &creds, 1).await;
    assert_eq!(m.members.len(), 1);
    let list = cluster_client(&r1.addr, &creds).list_tokens(pb::ListTokensRequest {}).await.unwrap().into_inner();
    assert!(list.tokens.iter().all(|t| t.id != id), "revoked tokens are gone");
    assert!(list.tokens.iter().any(|t| t.description == "short" && !t.expires.is_empty()));

    // Without a certificate, no call gets through; with the admin's, tokens are managed.
    let anon = tonic::transport::Endpoint::from_shared(format!("https://{}", r1.addr))
        .unwrap()
        .tls_config(keel::pki::anonymous_client_tls(&creds.ca_pem))
        .unwrap()
        .connect_lazy();
    let e = pb::cluster_client::ClusterClient::new(anon).list_tokens(pb::ListTokensRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secrets_key_reseals_every_secret() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r1 = Replica::init(d, "r1");
    let creds = bootstrapped(&r1).await;
    let secret = pb::Secret {
        metadata: Some(pb::ObjectMeta { name: "db".into(), namespace: "default".into(), ..Default::default() }),
        data: [("password".to_string(), b"hunter2".to_vec())].into(),
        ..Default::default()
    };
    let ch = keel::client::endpoint(&r1.addr, &creds).unwrap().connect_lazy();
    pb::objects_client::ObjectsClient::new(ch)
        .create(pb::CreateRequest { object: Some(pb::Object { kind: Some(pb::object::Kind::Secret(secret)) }) })
        .await
        .unwrap();
    let raw = |addr: String| {
        let creds = creds.clone();
        async move {
            let ch = keel::client::endpoint(&addr, &creds).unwrap().connect_lazy();
            let r = pb::kv_client::KvClient::new(ch)
                .range(pb::RangeRequest { key: b"/registry/secrets/default/db".to_vec(), ..Default::default() })
                .await
                .ok()?;
            r.into_inner().kvs.into_iter().next().map(|kv| kv.value)
        }
    };
    let before = raw(r1.addr.clone()).await.unwrap();
    assert!(before.starts_with(b"k8s:enc:aesgcm:v1:key1:"));

    let out = Command::new(KEEL).args(["secrets-key", "rotate", "--data-dir"]).arg(&r1.data).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let addr = r1.addr.clone();
    r1.restart(d, &addr);
    let cfg = keel::server::bootstrap::DataDir::new(&r1.data).admin_config();
    let text = wait_for("re-encryption", Duration::from_secs(30), || async {
        let out = Command::new(env!("CARGO_BIN_EXE_keelctl"))
            .args(["--server", &addr, "cluster", "reencrypt-secrets"])
            .env("KEELCONFIG", &cfg)
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await;
    assert_eq!(text.trim(), "1 secrets re-sealed with key2, 0 already were");
    let after = raw(addr.clone()).await.unwrap();
    assert!(after.starts_with(b"k8s:enc:aesgcm:v1:key2:"), "{}", String::from_utf8_lossy(&after[..24]));
    let ch = keel::client::endpoint(&addr, &creds).unwrap().connect_lazy();
    let got = pb::objects_client::ObjectsClient::new(ch)
        .get(pb::GetRequest {
            r#ref: Some(pb::ObjectRef { kind: "Secret".into(), namespace: "default".into(), name: "db".into() }),
        })
        .await
        .unwrap()
        .into_inner();
    match got.kind {
        Some(pb::object::Kind::Secret(s)) => assert_eq!(s.data["password"], b"hunter2"),
        other => panic!("{other:?}"),
    }
}

fn keelctl(cfg: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keelctl"))
        .args(args)
        .env("KEELCONFIG", cfg)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_backup_restores_into_a_new_cluster_at_a_new_address() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r1 = Replica::init(d, "r1");
    let creds = bootstrapped(&r1).await;
    let cfg = keel::server::bootstrap::DataDir::new(&r1.data).admin_config();
    let old_token = r1.token("token");
    let manifests = d.join("app.yaml");
    std::fs::write(
        &manifests,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {mode: blue}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {name: db}\nstringData: {password: hunter2}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  \
         template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: nginx}]}\n",
    )
    .unwrap();
    let (ok, out) = keelctl(&cfg, &["apply", "-f", &manifests.display().to_string()]);
    assert!(ok, "{out}");

    let key = d.join("recovery.key");
    let file = d.join("backup.snap");
    let (ok, out) = keelctl(&cfg, &["cluster", "snapshot", "new-key", &key.display().to_string()]);
    assert!(ok, "{out}");
    let (ok, out) = keelctl(
        &cfg,
        &["cluster", "snapshot", "save", &file.display().to_string(), "--recovery-key", &key.display().to_string()],
    );
    assert!(ok && out.contains("sealed"), "{out}");
    let (ok, out) = keelctl(
        &cfg,
        &["cluster", "snapshot", "verify", &file.display().to_string(), "--recovery-key", &key.display().to_string()],
    );
    assert!(ok && out.contains(": OK"), "{out}");
    drop(r1);

    // A damaged copy is refused before anything is written.
    let damaged = d.join("damaged.snap");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len() - 10;
    bytes[n] ^= 0x55;
    std::fs::write(&damaged, &bytes).unwrap();
    let bad_dir = d.join("bad");
    let a = args(&format!(
        "server --cluster-init --restore {} --recovery-key {} --data-dir {} --listen {}",
        damaged.display(),
        key.display(),
        bad_dir.display(),
        port()
    ));
    let (ok, out) = Proc::spawn(d, "bad", &a).exit(Duration::from_secs(20)).await;
    assert!(!ok && out.contains("checksum mismatch"), "{out}");
    assert!(!bad_dir.join("tls").exists(), "a refused restore writes nothing");

    // The restore: a new single-replica cluster at a new address, with the old CA.
    let addr = port();
    let data = d.join("restored");
    let a = args(&format!(
        "server --cluster-init --name r1 --restore {} --recovery-key {} --data-dir {} --listen {addr}",
        file.display(),
        key.display(),
        data.display()
    ));
    let restored = Proc::spawn(d, "restored", &a);
    let m = wait_voters(&addr, &creds, 1).await;
    assert_eq!(m.members[0].address, addr, "the new address was written in one step");
    wait_for("the restored content", Duration::from_secs(20), || async {
        restored.output().contains("Restored").then_some(())
    })
    .await;
    // The old admin credential still works: same CA.
    let ch = keel::client::endpoint(&addr, &creds).unwrap().connect_lazy();
    let mut c = pb::objects_client::ObjectsClient::new(ch);
    let get = |kind: &str, name: &str| pb::GetRequest {
        r#ref: Some(pb::ObjectRef { kind: kind.into(), namespace: "default".into(), name: name.into() }),
    };
    c.get(get("Deployment", "web")).await.unwrap();
    match c.get(get("ConfigMap", "settings")).await.unwrap().into_inner().kind {
        Some(pb::object::Kind::ConfigMap(m)) => assert_eq!(m.data["mode"], "blue"),
        other => panic!("{other:?}"),
    }
    match c.get(get("Secret", "db")).await.unwrap().into_inner().kind {
        Some(pb::object::Kind::Secret(s)) => {
            let v = s
                .data
                .get("password")
                .cloned()
                .or_else(|| s.string_data.get("password").map(|v| v.clone().into_bytes()));
            assert_eq!(v.as_deref(), Some(&b"hunter2"[..]));
        }
        other => panic!("{other:?}"),
    }
    // And the old cluster's server token joins a second replica.
    let _r2 = Replica::join(d, "r2", &addr, &old_token);
    wait_voters(&addr, &creds, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_losing_quorum_the_survivor_recovers_with_its_data_and_fences_the_old_members() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r1 = Replica::init(d, "r1");
    let creds = bootstrapped(&r1).await;
    let cfg = keel::server::bootstrap::DataDir::new(&r1.data).admin_config();
    let token = r1.token("token");
    let mut r2 = Replica::join(d, "r2", &r1.addr, &token);
    let r3 = Replica::join(d, "r3", &r1.addr, &token);
    wait_voters(&r1.addr, &creds, 3).await;
    for i in 0..30 {
        write_config_map(&r1.addr, &creds, &format!("before-{i}")).await.unwrap();
    }

    // Two of three are gone for good: no quorum, no writes.
    let r2_addr = r2.addr.clone();
    r2.proc = None;
    drop(r3);
    let lost = tokio::time::timeout(Duration::from_secs(15), write_config_map(&r1.addr, &creds, "no-quorum")).await;
    assert!(!matches!(lost, Ok(Ok(()))), "a write without quorum must not succeed");

    // The plan, from the survivor alone.
    let (ok, plan) = keelctl(&cfg, &["--server", &r1.addr, "cluster", "recover", "--plan"]);
    assert!(ok, "{plan}");
    assert!(plan.contains("Most up-to-date survivor: replica 1"), "{plan}");
    assert!(plan.contains("No committed entry is missing"), "{plan}");

    // Recover: r1 alone, data intact.
    r1.proc = None;
    let a =
        args(&format!("server --force-new-cluster --name r1 --listen {} --data-dir {}", r1.addr, r1.data.display()));
    let forced = Proc::spawn(d, "r1-forced", &a);
    wait_voters(&r1.addr, &creds, 1).await;
    assert!(forced.output().contains("Forced a new cluster"), "{}", forced.output());
    let ch = keel::client::endpoint(&r1.addr, &creds).unwrap().connect_lazy();
    let list = pb::objects_client::ObjectsClient::new(ch)
        .list(pb::ListRequest { kind: "ConfigMap".into(), namespace: "default".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> =
        list.items.iter().filter_map(|o| keel::api::object::meta(o).map(|m| m.name.clone())).collect();
    for i in 0..30 {
        assert!(names.contains(&format!("before-{i}")), "acknowledged write before-{i} lost: {names:?}");
    }

    // Two fresh replicas join; the cluster is whole again.
    let _r4 = Replica::join(d, "r4", &r1.addr, &token);
    let _r5 = Replica::join(d, "r5", &r1.addr, &token);
    let m = wait_voters(&r1.addr, &creds, 3).await;
    let mut ids: Vec<u64> = m.members.iter().map(|m| m.id).collect();
    ids.sort();
    assert_eq!(ids, [1, 4, 5]);
    write_config_map(&r1.addr, &creds, "after").await.unwrap();

    // The old r2 comes back with its stale data: it is refused and changes nothing.
    r2.restart(d, &r2_addr);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = wait_voters(&r1.addr, &creds, 3).await;
    let mut ids: Vec<u64> = m.members.iter().map(|m| m.id).collect();
    ids.sort();
    assert_eq!(ids, [1, 4, 5], "the old member did not get back in");
    write_config_map(&r1.addr, &creds, "after-old-member").await.unwrap();
    let logs: String = ["r1-forced", "r2", "r4", "r5"]
        .iter()
        .map(|n| std::fs::read_to_string(d.join(format!("{n}.log"))).unwrap_or_default())
        .collect();
    assert!(logs.contains("refused a Raft message from another cluster epoch"), "the fence held, and says so:\n{logs}");
}

fn cert_end(r: &Replica) -> i64 {
    let pem = std::fs::read_to_string(r.data.join("tls/tls.crt")).unwrap();
    keel::pki::validity_of(&pem).unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_second_certificates_renew_again_and_again_while_the_cluster_serves() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r1 = Replica::init_with(d, "r1", "--cert-lifetime 30s");
    let creds = bootstrapped(&r1).await;
    let token = r1.token("token");
    let r2 = Replica::join(d, "r2", &r1.addr, &token);
    let r3 = Replica::join(d, "r3", &r1.addr, &token);
    wait_voters(&r1.addr, &creds, 3).await;
    let agent_token = r1.token("agent-token");
    let agent = |name: &str, token: Option<&str>| {
        let mut a = args(&format!(
            "agent --name {name} --runtime fake --kubelet-port 0 --server {} --data-dir {}",
            r1.addr,
            d.join(name).display()
        ));
        if let Some(t) = token {
            a.extend(["--token".to_string(), t.to_string()]);
        }
        Proc::spawn(d, name, &a)
    };
    // n1 runs throughout; n2 registers, then stays down until its certificate has expired.
    let n1 = agent("n1", Some(&agent_token));
    let n2 = agent("n2", Some(&agent_token));
    let n2_cert = d.join("n2/tls/tls.crt");
    wait_for("n2 registered", Duration::from_secs(20), || async { n2.output().contains("registered").then_some(()) })
        .await;
    drop(n2);
    let n2_uid = {
        let ch = keel::client::endpoint(&r1.addr, &creds).unwrap().connect_lazy();
        let node = pb::objects_client::ObjectsClient::new(ch)
            .get(pb::GetRequest {
                r#ref: Some(pb::ObjectRef { kind: "Node".into(), namespace: String::new(), name: "n2".into() }),
            })
            .await
            .unwrap()
            .into_inner();
        keel::api::object::meta(&node).unwrap().uid.clone()
    };
    let replicas = [&r1, &r2, &r3];
    let first: Vec<i64> = replicas.iter().map(|r| cert_end(r)).collect();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for (r, end) in replicas.iter().zip(&first) {
        assert!(*end - now <= 31, "{} got a 30-second certificate, not one ending in {}s", r.name, end - now);
    }

    // Well past the first certificates' end, writes keep going through every replica.
    let until = Instant::now() + Duration::from_secs(75);
    let (mut ok, mut failed) = (0, 0);
    let mut i = 0usize;
    while Instant::now() < until {
        let r = replicas[i % 3];
        match write_config_map(&r.addr, &creds, &format!("w{i}")).await {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                eprintln!("write {i} through {}: {e}", r.name);
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok > 200, "{ok} writes went through");
    assert!(failed * 100 <= ok, "{failed} of {} writes failed across renewals", ok + failed);
    let m = wait_voters(&r1.addr, &creds, 3).await;
    assert_eq!(m.members.len(), 3);
    for (r, end) in replicas.iter().zip(&first) {
        let renewals = r.proc.as_ref().unwrap().output().matches("certificate renewed").count();
        assert!(renewals >= 3, "{} renewed {renewals} times in 75 s of 30 s certificates", r.name);
        assert!(cert_end(r) > end + 40, "{}'s certificate on disk is the renewed one", r.name);
    }
    let renewed = n1.output().matches("node certificate renewed").count();
    assert!(renewed >= 2, "the agent renewed its certificate {renewed} times:\n{}", n1.output());

    // n2's certificate expired while it was down: without a token it says what to do; with
    // a fresh one it re-attests under its name and key, and its Node is the same object.
    let end = keel::pki::validity_of(&std::fs::read_to_string(&n2_cert).unwrap()).unwrap().1;
    assert!(end < time::OffsetDateTime::now_utc().unix_timestamp(), "n2's certificate has expired");
    let (ok, out) = agent("n2", None).exit(Duration::from_secs(20)).await;
    assert!(!ok && out.contains("expired") && out.contains("--token"), "{out}");
    let ch = keel::client::endpoint(&r1.addr, &creds).unwrap().connect_lazy();
    let fresh = pb::cluster_client::ClusterClient::new(ch)
        .create_token(pb::CreateTokenRequest { role: "agent".into(), ttl_seconds: 600, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .token;
    let n2 = agent("n2", Some(&fresh));
    wait_for("n2 re-attested with a new certificate", Duration::from_secs(20), || async {
        let pem = std::fs::read_to_string(&n2_cert).ok()?;
        let end = keel::pki::validity_of(&pem).ok()?.1;
        (end > time::OffsetDateTime::now_utc().unix_timestamp() + 10).then_some(())
    })
    .await;
    wait_for("n2 registered again", Duration::from_secs(20), || async {
        n2.output().matches("Node n2 registered.").count().ge(&2).then_some(())
    })
    .await;
    let ch = keel::client::endpoint(&r1.addr, &creds).unwrap().connect_lazy();
    let node = pb::objects_client::ObjectsClient::new(ch)
        .get(pb::GetRequest {
            r#ref: Some(pb::ObjectRef { kind: "Node".into(), namespace: String::new(), name: "n2".into() }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keel::api::object::meta(&node).unwrap().uid, n2_uid, "the same Node, not a new one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_takes_verified_snapshots_on_schedule_and_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r1 = Replica::init_with(d, "r1", "--snapshot-interval 1s --snapshot-retention 2");
    let creds = bootstrapped(&r1).await;
    write_config_map(&r1.addr, &creds, "in-the-snapshot").await.unwrap();
    let snaps = r1.data.join("snapshots");
    let proc = r1.proc.as_ref().unwrap();
    wait_for("four verified snapshots", Duration::from_secs(30), || async {
        (proc.output().matches("scheduled snapshot written and verified").count() >= 4).then_some(())
    })
    .await;
    let files: Vec<PathBuf> = std::fs::read_dir(&snaps).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(files.len(), 2, "retention keeps the newest two: {files:?}");
    let cfg = keel::server::bootstrap::DataDir::new(&r1.data).admin_config();
    for f in &files {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(f).unwrap().permissions().mode() & 0o077, 0, "a snapshot holds the CA key");
        let (ok, out) = keelctl(&cfg, &["cluster", "snapshot", "verify", &f.display().to_string()]);
        assert!(ok && out.contains(": OK"), "{out}");
        let (_, payload) = keel::backup::read(f, None).unwrap();
        assert!(payload.data.unwrap().kvs.iter().any(|kv| kv.key.ends_with(b"/in-the-snapshot")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_cannot_renew_raises_a_warning_event_before_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r1 = Replica::init_with(d, "r1", "--cert-lifetime 30s");
    let creds = bootstrapped(&r1).await;
    // Without the CA key this replica cannot renew.
    std::fs::remove_file(r1.data.join("tls/ca.key")).unwrap();
    let ch = keel::client::endpoint(&r1.addr, &creds).unwrap().connect_lazy();
    let mut c = pb::objects_client::ObjectsClient::new(ch);
    let event = wait_for("a CertificateExpiring event", Duration::from_secs(40), || {
        let mut c = c.clone();
        async move {
            let list = c
                .list(pb::ListRequest {
                    kind: "Event".into(),
                    namespace: "kube-system".into(),
                    field_selector: "reason=CertificateExpiring".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            list.items.into_iter().next()
        }
    })
    .await;
    match event.kind {
        Some(pb::object::Kind::Event(e)) => {
            assert_eq!(e.r#type, "Warning");
            assert!(e.message.contains("replica 1") && e.message.contains("renewal fails"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    c = c.clone();
    let _ = c;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_authenticate_with_a_bearer_token_until_it_is_revoked_or_expires() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r1 = Replica::init(d, "r1");
    let creds = bootstrapped(&r1).await;
    let cfg = keel::server::bootstrap::DataDir::new(&r1.data).admin_config();
    let (ok, token) = keelctl(&cfg, &["token", "create", "--role", "user", "--user", "alice", "--ttl", "1h"]);
    assert!(ok, "{token}");
    let token = token.trim().to_string();

    // A context with only the CA and the token.
    let user_cfg = d.join("alice.yaml");
    let ca = d.join("ca.crt");
    std::fs::write(&ca, &creds.ca_pem).unwrap();
    std::fs::write(
        &user_cfg,
        format!(
            "current-context: alice\ncontexts:\n- name: alice\n  servers: [{}]\n  certificate-authority-data: |\n{}  token: {token}\n",
            r1.addr,
            creds.ca_pem.lines().map(|l| format!("    {l}\n")).collect::<String>()
        ),
    )
    .unwrap();
    // Replicas pick up new tokens within about a second.
    let out = wait_for("the token to reach the replica", Duration::from_secs(10), || async {
        let (ok, out) = keelctl(&user_cfg, &["get", "ns"]);
        ok.then_some(out)
    })
    .await;
    assert!(out.contains("kube-system"), "{out}");
    let (ok, out) = keelctl(&cfg, &["token", "list"]);
    assert!(ok && out.contains("user:alice"), "{out}");

    // A wrong secret, then the revoked token, get nothing.
    let id = token.split('.').next().unwrap().to_string();
    let wrong = d.join("wrong.yaml");
    std::fs::write(&wrong, std::fs::read_to_string(&user_cfg).unwrap().replace(&token, &format!("{id}.nope"))).unwrap();
    let (ok, out) = keelctl(&wrong, &["get", "ns"]);
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    let (ok, out) = keelctl(&cfg, &["token", "revoke", &id]);
    assert!(ok, "{out}");
    let out = wait_for("the revocation to reach the replica", Duration::from_secs(10), || async {
        let (ok, out) = keelctl(&user_cfg, &["get", "ns"]);
        (!ok).then_some(out)
    })
    .await;
    assert!(out.contains("Unauthenticated"), "{out}");

    // An expired one.
    let (ok, short) = keelctl(&cfg, &["token", "create", "--role", "user", "--user", "bob", "--ttl", "1s"]);
    assert!(ok, "{short}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let bob = d.join("bob.yaml");
    std::fs::write(&bob, std::fs::read_to_string(&user_cfg).unwrap().replace(&token, short.trim())).unwrap();
    let (ok, out) = keelctl(&bob, &["get", "ns"]);
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_that_never_answers_does_not_stay_in_the_membership() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let addr = port();
    let data = d.join("r1");
    let a = args(&format!(
        "server --cluster-init --name r1 --listen {addr} --data-dir {} --learner-timeout 2s",
        data.display()
    ));
    let log = d.join("r1.log");
    let out = std::fs::File::create(&log).unwrap();
    let proc = Proc {
        child: Command::new(KEEL)
            .args(&a)
            .env_remove("RUST_BACKTRACE")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
        log,
    };
    let r1 = Replica { proc: Some(proc), name: "r1".into(), data: data.clone(), addr: addr.clone() };
    let creds = bootstrapped(&r1).await;
    // A learner at an address where nothing listens: a join that died half way.
    let ch = keel::client::endpoint(&addr, &creds).unwrap().connect_lazy();
    pb::store_admin_client::StoreAdminClient::new(ch)
        .add_learner(pb::AddLearnerRequest {
            id: 9,
            node: Some(pb::ReplicaNode { addr: port(), name: "gone".into() }),
            blocking: false,
        })
        .await
        .unwrap();
    let has_learner = |r: &pb::MembersResponse| r.members.iter().any(|m| m.id == 9);
    let first = cluster_client(&addr, &creds).members(pb::MembersRequest {}).await.unwrap().into_inner();
    assert!(has_learner(&first), "the learner was added");
    wait_for("the silent learner to be removed", Duration::from_secs(30), || async {
        let r = cluster_client(&addr, &creds).members(pb::MembersRequest {}).await.ok()?.into_inner();
        (!has_learner(&r)).then_some(())
    })
    .await;
    wait_voters(&addr, &creds, 1).await;
}

/// GET https://addr/metrics over TLS, with a client certificate or without; the raw response.
async fn scrape(addr: &str, ca_pem: &str, client: Option<&Credentials>) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(c) => {
            let chain = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(keel::pki::SERVER_NAME).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    let _ = tls.read_to_string(&mut out).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_over_tls_to_certified_scrapers_with_certificate_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let metrics = port();
    let r1 = Replica::init_with(d, "r1", &format!("--metrics-listen {metrics}"));
    let creds = bootstrapped(&r1).await;
    let text = scrape(&metrics, &creds.ca_pem, Some(&creds)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for want in
        ["keel_raft_is_leader 1", "keel_raft_voters 1", "keel_certificate_expiry_seconds{certificate=\"replica\"}"]
    {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    // The controller manager's loops, per controller: deleting a namespace runs one.
    let cfg = keel::server::bootstrap::DataDir::new(&r1.data).admin_config();
    let ns = d.join("ns.yaml");
    std::fs::write(&ns, "apiVersion: v1\nkind: Namespace\nmetadata: {name: gone}\n").unwrap();
    for a in [vec!["create", "-f", ns.to_str().unwrap()], vec!["delete", "namespace", "gone"]] {
        let (ok, out) = keelctl(&cfg, &a);
        assert!(ok, "{a:?}: {out}");
    }
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape(&metrics, &creds.ca_pem, Some(&creds)).await;
        if text.contains("keel_controller_reconcile_seconds_count{controller=\"namespace\"} ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for want in [
        "workqueue_depth{name=\"namespace\"}",
        "workqueue_adds_total{name=\"namespace\"}",
        "workqueue_retries_total{name=\"namespace\"}",
        "keel_controller_reconcile_errors_total{controller=\"namespace\"}",
        "keel_controller_reconcile_seconds_bucket{controller=\"namespace\",le=\"0.005\"}",
        "keel_controller_reconcile_seconds_count{controller=\"namespace\"}",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    let adds = text
        .lines()
        .find(|l| l.starts_with("workqueue_adds_total{name=\"namespace\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(adds >= 4.0, "the default namespaces and the deleted one were queued: {adds}");
    let anonymous = scrape(&metrics, &creds.ca_pem, None).await;
    assert!(anonymous.starts_with("HTTP/1.1 401"), "{anonymous}");
}

/// A systemd unit runs the same command line at every boot: `--cluster-init` on a data
/// directory that holds the cluster already is ignored (with a log line), while flags that
/// contradict the data (another name, another cluster's token) are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_command_line_restarts_an_initialized_replica_and_conflicting_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut r1 = Replica::init(d, "r1");
    let creds = bootstrapped(&r1).await;
    let cfg = keel::server::bootstrap::DataDir::new(&r1.data).admin_config();
    let manifest = d.join("cm.yaml");
    std::fs::write(&manifest, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: kept}\ndata: {k: v}\n").unwrap();
    let (ok, out) = keelctl(&cfg, &["create", "-f", manifest.to_str().unwrap()]);
    assert!(ok, "{out}");
    let same = format!("server --cluster-init --name r1 --listen {} --data-dir {}", r1.addr, r1.data.display());
    r1.proc = None;

    // The same command line again: it serves the same cluster, with its data.
    let again = Proc::spawn(d, "r1-again", &args(&same));
    wait_for("the restarted replica serves", Duration::from_secs(30), || async {
        let (ok, out) = keelctl(&cfg, &["get", "cm", "kept", "-o", "name"]);
        (ok && out.trim() == "configmap/kept").then_some(())
    })
    .await;
    assert!(again.output().contains("--cluster-init is ignored"), "{}", again.output());
    assert_eq!(admin(&r1), creds, "no new CA or admin credential");
    drop(again);

    // Another name for the same data: refused, and it says which name the data has.
    let renamed = same.replace("--name r1", "--name r9");
    let (ok, out) = Proc::spawn(d, "r1-renamed", &args(&renamed)).exit(Duration::from_secs(20)).await;
    assert!(!ok, "{out}");
    assert!(out.contains("belongs to replica \"r1\""), "{out}");

    // Another cluster's token: refused before anything is sent.
    let r2 = Replica::init(d, "r2");
    bootstrapped(&r2).await;
    let foreign = format!(
        "server --name r1 --listen {} --data-dir {} --server {} --token {}",
        r1.addr,
        r1.data.display(),
        r2.addr,
        r2.token("token")
    );
    let (ok, out) = Proc::spawn(d, "r1-foreign", &args(&foreign)).exit(Duration::from_secs(20)).await;
    assert!(!ok, "{out}");
    assert!(out.contains("--token is for another cluster"), "{out}");
}
