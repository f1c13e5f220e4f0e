//! docs/operations.md runs as written: its `sh` blocks, in order, in one bash, against real
//! processes on loopback ports picked here.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::port;

fn script(doc: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in doc.lines() {
        match (inside, line.trim_start()) {
            (false, "```sh") => inside = true,
            (true, "```") => inside = false,
            (true, _) => {
                out.push_str(line);
                out.push('\n');
            }
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_runbook_runs_as_written() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
    let script = script(&doc);
    assert!(script.lines().count() > 40, "the runbook has its command blocks:\n{script}");
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_keel")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let log = dir.path().join("runbook.log");
    let out = std::fs::File::create(&log).unwrap();
    // Its own session, so that every server it starts in the background goes with it.
    let mut child = Command::new("setsid")
        .args(["bash", "-c", &format!("set -x\n{script}")])
        .env("PATH", path)
        .env("HOME", dir.path())
        .env("DIR", dir.path().join("run"))
        .env("R1", port())
        .env("R2", port())
        .env("R3", port())
        .env("R4", port())
        .env_remove("KEELCONFIG")
        .env_remove("KEEL_SERVER")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = Command::new("kill").args(["-9", "--", &format!("-{pid}")]).status();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.is_some_and(|s| s.success()), "the runbook failed ({status:?}):\n{text}");
    // What each runbook shows, it showed.
    for want in [
        "Leader: replica 1",
        "node1",
        "restored",
        "secrets re-sealed with key2",
        "CERTIFICATE",
        "3 removed",
        "Most up-to-date survivor: replica 1",
        " r5 ",
    ] {
        assert!(text.contains(want), "{want:?} missing from the runbook's output:\n{text}");
    }
}
