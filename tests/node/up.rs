//! `keel up` as the README runs it, inside a network namespace this test makes (so that the
//! replica's 127.0.0.1:7001, the bridge and the pod addresses are the test's own): the
//! cluster comes up, `examples/web.yaml` is applied with keelctl, the scheduler binds the
//! pod, and its httpd answers at the pod IP; `keel down --purge` leaves nothing behind.

use std::process::Command;
use std::time::Duration;

use super::*;

const KEEL: &str = env!("CARGO_BIN_EXE_keel");
const KEELCTL: &str = env!("CARGO_BIN_EXE_keelctl");

/// A command run inside `netns` (network only: the mounts, /sys and cgroups stay the
/// host's, as for a real node), with `home` as HOME.
fn inside(netns: &Netns, home: &Path, exe: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns.path().display())).arg(exe).args(args).env("HOME", home).env_remove("KEELCONFIG");
    c
}

fn output(mut c: Command) -> Result<String, String> {
    let out = c.output().map_err(|e| e.to_string())?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Where `keel up` keeps things in this test.
struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    fn args(&self) -> Vec<String> {
        let r = self.root.path();
        vec![
            "--name".into(),
            "tour".into(),
            "--data-dir".into(),
            r.join("server").display().to_string(),
            "--agent-data-dir".into(),
            r.join("agent").display().to_string(),
            "--run-dir".into(),
            r.join("run").display().to_string(),
        ]
    }
}

/// `keel down --purge` whatever happened, then the namespace goes.
struct Tour {
    netns: Netns,
    dirs: Dirs,
    home: PathBuf,
}

impl Drop for Tour {
    fn drop(&mut self) {
        let mut args = vec!["down", "--purge"];
        let extra = self.dirs.args();
        args.extend(extra.iter().map(String::as_str));
        let _ = inside(&self.netns, &self.home, KEEL, &args).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_up_runs_the_example_and_keel_down_removes_everything() {
    if !prerequisites() {
        return;
    }
    let netns = Netns::create("keelup");
    let dirs = Dirs { root: tempfile::tempdir().unwrap() };
    let home = dirs.root.path().join("home");
    let images = dirs.root.path().join("agent").join("images");
    std::fs::create_dir_all(&images).unwrap();
    for f in ["busybox.tar", "entrypoint.tar"] {
        std::fs::copy(super::images().join(f), images.join(f)).unwrap();
    }
    // No pull leaves the machine.
    let registries = dirs.root.path().join("registries.yaml");
    std::fs::write(&registries, "offline: true\n").unwrap();
    let tour = Tour { netns, dirs, home: home.clone() };
    let mut up = vec!["up".to_string(), "--registries".into(), registries.display().to_string()];
    up.extend(tour.dirs.args());
    let up: Vec<&str> = up.iter().map(String::as_str).collect();
    let printed = output(inside(&tour.netns, &home, KEEL, &up)).unwrap_or_else(|e| panic!("keel up: {e}"));
    assert!(printed.contains("Keel is up") && printed.contains("keelctl apply -f examples/web.yaml"), "{printed}");
    assert!(home.join(".keel/config").exists(), "keel up writes the admin's configuration where keelctl looks");
    // Again: it finds the cluster up.
    let again = output(inside(&tour.netns, &home, KEEL, &up)).unwrap();
    assert!(again.contains("Keel is up"), "{again}");

    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/web.yaml");
    let applied =
        output(inside(&tour.netns, &home, KEELCTL, &["apply", "-f", &example.display().to_string()])).unwrap();
    assert!(applied.contains("pod/web created"), "{applied}");
    let ip = eventually("the example pod Running with an address", Duration::from_secs(60), || async {
        let out = output(inside(
            &tour.netns,
            &home,
            KEELCTL,
            &["get", "pod", "web", "-o", "jsonpath={.status.phase} {.status.podIP} {.spec.nodeName}"],
        ))
        .ok()?;
        let f: Vec<&str> = out.split_whitespace().collect();
        (f.len() == 3 && f[0] == "Running").then(|| {
            assert_eq!(f[2], "tour", "the scheduler bound it to the node");
            f[1].to_string()
        })
    })
    .await;
    let body = eventually("the pod answers HTTP at its address", Duration::from_secs(20), || async {
        super::pods::http_get(&tour.netns.path(), &ip, 80, "/").ok()
    })
    .await;
    assert_eq!(body.trim(), "Hello from Keel");

    // Down, with the data: nothing of the cluster is left in the namespace or on disk.
    let extra = tour.dirs.args();
    let mut down = vec!["down", "--purge"];
    down.extend(extra.iter().map(String::as_str));
    let printed = output(inside(&tour.netns, &home, KEEL, &down)).unwrap();
    assert!(printed.contains("stopped agent and server") && printed.contains("removed 1 containers"), "{printed}");
    let links = tour.netns.exec(&["ip", "-o", "link"]).unwrap();
    assert_eq!(links.lines().count(), 1, "only lo is left: {links}");
    let routes = tour.netns.exec(&["ip", "route", "show", "table", "all", "type", "unreachable"]).unwrap();
    assert!(routes.trim().is_empty(), "{routes}");
    for d in ["server", "agent", "run"] {
        assert!(!tour.dirs.root.path().join(d).exists(), "{d} purged");
    }
    let run = tour.dirs.root.path().join("run").display().to_string();
    assert!(shims_of(&run).is_empty(), "no shim of the cluster's containerd is left");
    assert!(!processes().iter().any(|(_, _, cmd)| cmd.contains(&run)), "no process of the cluster is left");
}
