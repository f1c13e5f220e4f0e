//! Damaged data on disk: what Raft allows to repair is repaired, anything else makes
//! `keel server` refuse to start with a message naming the file. It never panics.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use keel::harness::ProcCluster;
use keel::store::kv::{Batch, Kv, SledKv, Space};

/// A single replica with `n` acknowledged writes, killed with -9. Returns its data dir.
/// Also returns an admin's credentials for the replica.
async fn replica_with_writes(dir: &Path, n: usize) -> (std::path::PathBuf, keel::pki::Credentials) {
    replica_with_writes_and(dir, n, &[]).await
}

/// The same, with extra `keel server` flags.
async fn replica_with_writes_and(
    dir: &Path,
    n: usize,
    args: &[String],
) -> (std::path::PathBuf, keel::pki::Credentials) {
    let exe = Path::new(env!("CARGO_BIN_EXE_keel"));
    let mut c = ProcCluster::start(exe, dir, 1, args).unwrap();
    c.wait_leader(Duration::from_secs(20)).await.unwrap();
    let client = c.client(Duration::from_secs(5));
    for i in 0..n {
        client.kv_put(format!("c/{i:03}"), "v").await.unwrap();
    }
    c.kill(0).unwrap();
    c.keep();
    (c.nodes[0].data_dir.clone(), c.pki.admin.clone())
}

fn tamper(data_dir: &Path, f: impl FnOnce(&SledKv)) {
    let kv = SledKv::open(&data_dir.join("db"), 1 << 20).unwrap();
    f(&kv);
    futures::executor::block_on(kv.flush()).unwrap();
}

fn set_data_version(data_dir: &Path, version: u32) {
    tamper(data_dir, |kv| {
        let mut b = Batch::default();
        b.put(b"data_version".to_vec(), version.to_be_bytes().to_vec());
        kv.write(Space::RaftMeta, b).unwrap();
    });
}

/// Marks the data as layout `version`, runs a replica on it (it must keep running), and
/// returns the engine after checking that the data now has the current layout version.
fn open_as_version(data: &Path, version: u32) -> SledKv {
    set_data_version(data, version);
    if let Some(out) = start(data, Duration::from_secs(3)) {
        panic!("a version {version} replica must open: {}", String::from_utf8_lossy(&out.stderr));
    }
    let kv = SledKv::open(&data.join("db"), 1 << 20).unwrap();
    assert_eq!(
        kv.get(Space::RaftMeta, b"data_version").unwrap(),
        Some(keel::store::DATA_VERSION.to_be_bytes().to_vec())
    );
    kv
}

/// How many of the `c/` keys that `replica_with_writes` wrote the engine holds.
fn written_keys(kv: &SledKv) -> usize {
    kv.scan(
        Space::State,
        (std::ops::Bound::Included(b"kc/".to_vec()), std::ops::Bound::Excluded(b"kc0".to_vec())),
        false,
    )
    .count()
}

fn last_log_index(kv: &SledKv) -> u64 {
    let (k, _) =
        kv.scan(Space::Log, (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded), true).next().unwrap().unwrap();
    u64::from_be_bytes(k.try_into().unwrap())
}

/// The name a data directory's replica was started with (a restart must keep it).
fn name_of(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("name")).map(|n| n.trim().to_string()).unwrap_or_else(|_| "r1".into())
}

/// Runs `keel server` on the data dir until it exits or `wait` passes.
fn start(data_dir: &Path, wait: Duration) -> Option<Output> {
    let port = keel::harness::free_port().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["server", "--name", &name_of(data_dir), "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_committed_log_entry_refuses_to_start_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = replica_with_writes(&dir.path().join("c"), 20).await;
    tamper(&data, |kv| {
        let mut b = Batch::default();
        b.put(5u64.to_be_bytes().to_vec(), b"\x00\x01garbage".to_vec());
        kv.write(Space::Log, b).unwrap();
    });
    let out = start(&data, Duration::from_secs(10)).expect("a damaged replica must exit, not serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_ne!(out.status.code(), Some(101), "it panicked:\n{err}");
    assert!(err.contains(&data.join("db").display().to_string()), "the message names the file:\n{err}");
    assert!(err.contains("log entry 5 is damaged"), "the message says what is wrong:\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_unacknowledged_tail_is_truncated_and_every_acknowledged_write_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (data, admin) = replica_with_writes(&dir.path().join("c"), 20).await;
    tamper(&data, |kv| {
        // An entry past the end, half written: it was never flushed, so never acknowledged.
        let next = last_log_index(kv) + 1;
        let mut b = Batch::default();
        b.put(next.to_be_bytes().to_vec(), vec![0xde, 0xad]);
        kv.write(Space::Log, b).unwrap();
    });
    // The replica starts and still has every write.
    let exe = Path::new(env!("CARGO_BIN_EXE_keel"));
    let port = keel::harness::free_port().unwrap();
    let mut child = Command::new(exe)
        .args(["server", "--name", &name_of(&data), "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&data)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client =
        keel::client::Client::with_certificate(&[format!("127.0.0.1:{port}")], Duration::from_secs(2), &admin).unwrap();
    let mut got = None;
    for _ in 0..100 {
        if let Ok(r) = client
            .range(keel::proto::v1::RangeRequest {
                key: b"c/".to_vec(),
                range_end: keel::store::prefix_end(b"c/"),
                count_only: true,
                ..Default::default()
            })
            .await
        {
            got = Some(r.count);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got, Some(20), "the replica must start and keep all 20 acknowledged writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_of_another_layout_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = replica_with_writes(&dir.path().join("c"), 3).await;
    set_data_version(&data, 99);
    let out = start(&data, Duration::from_secs(10)).expect("must exit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.status.code() != Some(101), "{err}");
    assert!(err.contains("layout version") && err.contains(&data.join("db").display().to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_of_layout_version_1_is_upgraded_and_keeps_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = replica_with_writes(&dir.path().join("c"), 5).await;
    let kv = open_as_version(&data, 1);
    assert_eq!(written_keys(&kv), 5, "every write survives the upgrade");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_of_layouts_2_and_3_keep_their_snapshot_in_a_file() {
    use keel::store::raft::state_machine::stored_snapshot;
    for version in [2u32, 3] {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = replica_with_writes_and(&dir.path().join("c"), 20, &["--snapshot-every=5".to_string()]).await;
        // Rewrite the snapshot as that version kept it: in the engine, meta and data under two
        // keys (2) or as one value (3), and no file.
        let mut snapshot = None;
        tamper(&data, |kv| {
            let (meta, body) = stored_snapshot(kv).unwrap().expect("a snapshot after 20 writes");
            let mut b = Batch::default();
            if version == 2 {
                b.put(b"meta".to_vec(), meta.clone());
                b.put(b"data".to_vec(), body.clone());
            } else {
                let value = [body.as_slice(), &meta, &(meta.len() as u32).to_be_bytes()].concat();
                b.put(b"current".to_vec(), value);
            }
            b.delete(b"file".to_vec());
            kv.write(Space::Snapshot, b).unwrap();
            for name in kv.list_files().unwrap() {
                kv.remove_file(&name).unwrap();
            }
            snapshot = Some((meta, body));
        });
        let kv = open_as_version(&data, version);
        assert_eq!(stored_snapshot(&kv).unwrap(), snapshot, "the snapshot survives the upgrade from {version}");
        for old in [&b"current"[..], b"meta", b"data"] {
            assert_eq!(kv.get(Space::Snapshot, old).unwrap(), None);
        }
        assert_eq!(kv.list_files().unwrap().len(), 1, "{:?}", kv.list_files());
        assert_eq!(written_keys(&kv), 20, "every write survives the upgrade from {version}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_file_refuses_to_start_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = replica_with_writes_and(&dir.path().join("c"), 20, &["--snapshot-every=5".to_string()]).await;
    // The kill may have caught the next snapshot mid-save: a file cut short (`.partial`),
    // or two whole files of which the engine names one. Damage every whole one.
    let files: Vec<_> = std::fs::read_dir(data.join("db").join("keel-files"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    assert!(!files.is_empty());
    for f in &files {
        let mut bytes = std::fs::read(f).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(f, bytes).unwrap();
    }
    let out = start(&data, Duration::from_secs(10)).expect("must exit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.status.code() != Some(101), "{err}");
    assert!(files.iter().any(|f| err.contains(&f.display().to_string())) && err.contains("damaged"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_engine_file_end_is_a_torn_write_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = replica_with_writes(&dir.path().join("c"), 20).await;
    let file = data.join("db").join("db");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    std::fs::write(&file, bytes).unwrap();
    // It must not refuse or panic; let it run, then check the data with the engine directly.
    if let Some(out) = start(&data, Duration::from_secs(3)) {
        panic!("replica exited after a torn engine write: {}", String::from_utf8_lossy(&out.stderr));
    }
    let kv = SledKv::open(&data.join("db"), 1 << 20).unwrap();
    assert_eq!(written_keys(&kv), 20);
}
