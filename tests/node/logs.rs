//! Logs and exec through a replica to the pod's node: CRI-format files rotated by size, tail,
//! since, timestamps, follow, previous; exec with separate streams, stdin, exit codes and a
//! real terminal (a pty, resized); and only replicas may call an agent's kubelet port.

use std::io::{Read, Write};
use std::time::Duration;

use keel::api::kinds::Kind;
use keel::client::{Client, DeleteOptions};
use keel::proto::v1 as pb;

use super::*;

const KEELCTL: &str = env!("CARGO_BIN_EXE_keelctl");

async fn logs(admin: &Client, req: pb::LogsRequest) -> Result<String, String> {
    let mut s = admin.logs(req).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(c) = s.message().await.map_err(|e| e.message().to_string())? {
        out.extend(c.data);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn req(pod: &str) -> pb::LogsRequest {
    pb::LogsRequest { namespace: "default".into(), pod: pod.into(), ..Default::default() }
}

async fn exec(admin: &Client, pod: &str, cmd: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    use pb::exec_input::Input;
    use pb::exec_output::Output;
    let start = pb::ExecStart {
        namespace: "default".into(),
        pod: pod.into(),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        stdin: stdin.is_some(),
        ..Default::default()
    };
    let mut input = vec![pb::ExecInput { input: Some(Input::Start(start)) }];
    if let Some(data) = stdin {
        input.push(pb::ExecInput { input: Some(Input::Stdin(data.to_vec())) });
    }
    input.push(pb::ExecInput { input: Some(Input::CloseStdin(true)) });
    let mut s = admin.exec(tokio_stream::iter(input)).await.unwrap();
    let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
    while let Some(m) = s.message().await.unwrap() {
        match m.output {
            Some(Output::Stdout(d)) => out.extend(d),
            Some(Output::Stderr(d)) => err.extend(d),
            Some(Output::ExitCode(c)) => code = Some(c),
            None => {}
        }
    }
    (
        code.expect("an exit code"),
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_rotate_and_read_back_as_kubectl_reads_them() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let mut node = cluster.node("n1").await;
    // Small files, so that a few hundred lines rotate.
    node.stop().await;
    node.cfg.log_max_size = 4096;
    node.cfg.log_max_files = 3;
    node.start().await;
    let admin = &cluster.admin;
    admin
        .create(manifest(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: talker}\nspec:\n  nodeName: n1\n  terminationGracePeriodSeconds: 1\n  containers:\n  \
             - name: c\n    image: busybox\n    \
               command: [sh, -c, 'i=0; while [ $i -lt 300 ]; do echo \"line $i\"; i=$((i+1)); done; sleep 0.3; echo oops >&2; sleep 0.3; echo done; \
               while [ ! -e /tmp/go ]; do sleep 0.1; done; echo late; sleep 3600']\n",
        ))
        .await
        .unwrap();
    let uid = wait_pod(admin, "talker", "Running", Duration::from_secs(60), |p| phase(p) == "Running")
        .await
        .metadata
        .unwrap()
        .uid;
    let all = eventually("the whole output", Duration::from_secs(20), || async {
        logs(admin, req("talker")).await.ok().filter(|t| t.ends_with("done\n"))
    })
    .await;
    // Rotation kept the newest lines, in order, within three files.
    let dir = node.cfg.data_dir.join("pods").join(&uid).join("logs/c");
    let files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    assert!(files.contains(&"0.log.1".to_string()) && files.contains(&"0.log.2".to_string()), "{files:?}");
    assert!(!files.contains(&"0.log.3".to_string()), "{files:?}");
    for f in &files {
        assert!(std::fs::metadata(dir.join(f)).unwrap().len() <= 4096);
    }
    assert!(!all.contains("line 0\n"), "the oldest lines were rotated away");
    assert!(all.contains("line 299\noops\ndone\n"), "{all}");
    let current = std::fs::read_to_string(dir.join("0.log")).unwrap();
    let last = current.lines().last().unwrap();
    assert!(last.contains(" stdout F done"), "CRI format: {last}");
    assert!(current.contains(" stderr F oops"), "stderr is tagged: {current}");

    let tail = logs(admin, pb::LogsRequest { tail_lines: Some(2), ..req("talker") }).await.unwrap();
    assert_eq!(tail, "oops\ndone\n");
    let stamped =
        logs(admin, pb::LogsRequest { tail_lines: Some(1), timestamps: true, ..req("talker") }).await.unwrap();
    let (stamp, text) = stamped.trim_end().split_once(' ').unwrap();
    assert!(humantime::parse_rfc3339(stamp).is_ok(), "{stamped}");
    assert_eq!(text, "done");
    let limited =
        logs(admin, pb::LogsRequest { tail_lines: Some(1), limit_bytes: Some(2), ..req("talker") }).await.unwrap();
    assert_eq!(limited, "do");

    // Follow: what is written later arrives on the open stream.
    let mut follow = admin.logs(pb::LogsRequest { follow: true, tail_lines: Some(0), ..req("talker") }).await.unwrap();
    let id = {
        let rt = &node.running.as_ref().unwrap().runtime;
        rt.containers()
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.label(keel::agent::runtime::LABEL_POD_UID) == uid)
            .unwrap()
            .id
    };
    let rt = node.running.as_ref().unwrap().runtime.clone();
    keel::agent::runtime::exec_sync(
        rt.as_ref(),
        &id,
        vec!["sh".into(), "-c".into(), "echo go > /tmp/go".into()],
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let got =
        tokio::time::timeout(Duration::from_secs(10), follow.message()).await.expect("followed").unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&got.data), "late\n");

    // keelctl logs, as a user runs it.
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config");
    keelctl_config(&cluster, &config);
    let out = std::process::Command::new(KEELCTL)
        .args(["logs", "pod/talker", "--tail", "3"])
        .env("KEELCONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "oops\ndone\nlate\n", "{}", String::from_utf8_lossy(&out.stderr));
    let missing = logs(admin, pb::LogsRequest { previous: true, ..req("talker") }).await.unwrap_err();
    assert!(missing.contains("previous terminated container \"c\" in pod \"talker\" not found"), "{missing}");

    admin.delete(Kind::Pod, "default", "talker", &DeleteOptions::default()).await.unwrap();
    eventually("pod gone", Duration::from_secs(30), || async { pod(admin, "talker").await.is_none().then_some(()) })
        .await;
    drop(node);
    cluster.stop().await;
}

/// A keelctl configuration for the cluster's admin at `path`.
pub(super) fn keelctl_config(cluster: &Cluster, path: &Path) {
    let a = &cluster.pki.admin;
    let config = keel::client::config::Config {
        current_context: "t".into(),
        contexts: vec![keel::client::config::Context {
            name: "t".into(),
            servers: vec![cluster.addr.clone()],
            certificate_authority_data: a.ca_pem.clone(),
            client_certificate_data: a.cert_pem.clone(),
            client_key_data: a.key_pem.clone(),
            ..Default::default()
        }],
    };
    config.save(path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_commands_with_their_streams_codes_and_a_terminal() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let node = cluster.node("n1").await;
    let admin = &cluster.admin;
    admin
        .create(manifest(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: box}\nspec:\n  nodeName: n1\n  terminationGracePeriodSeconds: 1\n  containers:\n  \
             - {name: c, image: busybox, command: [sleep, '3600']}\n  - {name: d, image: busybox, command: [sleep, '3600']}\n",
        ))
        .await
        .unwrap();
    wait_pod(admin, "box", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await;
    let two = admin
        .exec(tokio_stream::iter(vec![pb::ExecInput {
            input: Some(pb::exec_input::Input::Start(pb::ExecStart {
                namespace: "default".into(),
                pod: "box".into(),
                command: vec!["true".into()],
                ..Default::default()
            })),
        }]))
        .await
        .unwrap_err();
    assert!(two.to_string().contains("a container name must be specified for pod box, choose one of: [c d]"), "{two}");

    let single = |cmd: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: one}}\nspec:\n  nodeName: n1\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: c, image: busybox, command: [{cmd}]}}\n")
    };
    admin.create(manifest(&single("sleep, '3600'"))).await.unwrap();
    wait_pod(admin, "one", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await;
    let (code, out, err) = exec(admin, "one", &["sh", "-c", "echo out; echo err >&2; exit 3"], None).await;
    assert_eq!((code, out.as_str(), err.as_str()), (3, "out\n", "err\n"));
    let (code, out, _) = exec(admin, "one", &["cat"], Some(b"from stdin\n")).await;
    assert_eq!((code, out.as_str()), (0, "from stdin\n"));

    // keelctl exec passes the exit code on.
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config");
    keelctl_config(&cluster, &config);
    let out = std::process::Command::new(KEELCTL)
        .args(["exec", "one", "--", "sh", "-c", "echo hi; exit 7"])
        .env("KEELCONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("command terminated with exit code 7"));

    // -it through a real pty: a terminal inside, the window size passed on and resized.
    let pty = nix::pty::openpty(Some(&nix::pty::Winsize { ws_row: 40, ws_col: 100, ws_xpixel: 0, ws_ypixel: 0 }), None)
        .unwrap();
    let slave: std::os::fd::OwnedFd = pty.slave;
    let mut cmd = std::process::Command::new(KEELCTL);
    cmd.args(["exec", "-it", "one", "--", "sh", "-c", "tty; stty size; read x; stty size; exit 4"])
        .env("KEELCONFIG", &config)
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // SAFETY: setsid and TIOCSCTTY between fork and exec make the pty the controlling
    // terminal, so that a resize sends SIGWINCH.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(slave);
    let mut master = std::fs::File::from(pty.master);
    // Everything the terminal shows, as it comes.
    let (shown, screen) = std::sync::mpsc::channel::<String>();
    let mut m = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = m.read(&mut buf) {
            if n == 0 || shown.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut read_until = |want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !seen.contains(want) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match screen.recv_timeout(left) {
                Ok(s) => seen.push_str(&s),
                Err(_) => panic!("{want:?} not seen in {seen:?}"),
            }
        }
        seen.clone()
    };
    let first = read_until("40 100");
    assert!(first.contains("/dev/pts/"), "a terminal inside: {first:?}");
    // Resize the terminal: keelctl gets SIGWINCH and passes the size on.
    let ws = libc::winsize { ws_row: 50, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads the winsize given.
    assert_eq!(unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&master), libc::TIOCSWINSZ, &ws) }, 0);
    std::thread::sleep(Duration::from_millis(500));
    master.write_all(b"\r").unwrap();
    read_until("50 120");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(4));

    // Only replicas call a kubelet: the admin, straight to the agent's port, is refused.
    let node_obj = admin.get(Kind::Node, "", "n1").await.unwrap();
    let Some(pb::object::Kind::Node(n)) = node_obj.kind else { unreachable!() };
    let port = n.status.unwrap().daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port;
    let config = keel::tls::pinned_client_config(&cluster.pki.admin, keel::pki::Identity::Node("n1".into())).unwrap();
    let ch = keel::tls::connect(&format!("127.0.0.1:{port}"), config, Duration::from_secs(5)).await.unwrap();
    let refused = pb::kubelet_client::KubeletClient::new(ch).logs(req("one")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("only replicas"), "{}", refused.message());
    // And the replica will not call anyone but the pod's node.
    let wrong = keel::tls::pinned_client_config(&cluster.pki.admin, keel::pki::Identity::Node("n2".into())).unwrap();
    let handshake = keel::tls::connect(&format!("127.0.0.1:{port}"), wrong, Duration::from_secs(5)).await;
    assert!(handshake.is_err(), "a server that is not the expected node is refused");

    for name in ["box", "one"] {
        admin.delete(Kind::Pod, "default", name, &DeleteOptions::default()).await.unwrap();
    }
    drop(node);
    cluster.stop().await;
}
