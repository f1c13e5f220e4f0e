//! Image pulls against real registries (Debian's docker-registry on 127.0.0.1, filled with
//! skopeo): a mirror with a rewrite, a private registry with basic auth and a pull secret,
//! `offline`, and the pull policies.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keel::api::kinds::Kind;
use keel::proto::v1 as pb;

use super::lifecycle::events_for;
use super::{container_status, images, manifest, phase, prerequisites, wait_pod, Cluster};

/// A docker-registry on 127.0.0.1, with users when `htpasswd` is given; killed on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Registry {
    fn start(users: &[(&str, &str)]) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if !users.is_empty() {
            let file = dir.path().join("htpasswd");
            for (i, (u, p)) in users.iter().enumerate() {
                let mut args = vec!["-bB"];
                if i == 0 {
                    args.push("-c");
                }
                let f = file.display().to_string();
                args.extend([f.as_str(), u, p]);
                assert!(Command::new("htpasswd").args(&args).output().unwrap().status.success());
            }
            config.push_str(&format!("auth:\n  htpasswd: {{realm: keel-test, path: {}}}\n", file.display()));
        }
        let path = dir.path().join("config.yml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("docker-registry")
            .args(["serve", &path.display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Registry { child, port, _dir: dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "docker-registry did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Copies an image tarball (an OCI layout) into the registry as `repo:tag`.
    fn push(&self, tarball: &Path, target: &str, creds: Option<&str>) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some(creds) = creds {
            c.args(["--dest-creds", creds]);
        }
        c.arg(format!("oci-archive:{}", tarball.display())).arg(format!("docker://{}/{target}", self.host()));
        let out = c.output().unwrap();
        assert!(out.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn waiting(p: &pb::Pod, c: &str) -> Option<(String, String)> {
    let w = container_status(p, c)?.state.as_ref()?.waiting.as_ref()?;
    Some((w.reason.clone(), w.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_pulled_from_mirrors_and_private_registries_and_never_when_offline() {
    if !prerequisites() {
        return;
    }
    let private = Registry::start(&[("puller", "s3cret")]);
    let mirror = Registry::start(&[]);
    private.push(&images().join("busybox.tar"), "private/box:1", Some("puller:s3cret"));
    mirror.push(&images().join("entrypoint.tar"), "mirrored/web:2", None);

    let cluster = Cluster::start().await;
    let mut node = cluster.node("n1").await;
    // docker.io goes to the mirror (keel/* rewritten to mirrored/*); the private registry is
    // reached as itself; everything else is offline.
    node.stop().await;
    let registries: PathBuf = node.cfg.registries.clone().unwrap();
    std::fs::write(
        &registries,
        format!(
            "offline: true\nmirrors:\n  docker.io:\n    endpoint: [\"http://{m}\"]\n    rewrite: {{\"^keel/(.*)$\": \"mirrored/$1\"}}\n  \"{p}\":\n    endpoint: [\"http://{p}\"]\n",
            m = mirror.host(),
            p = private.host()
        ),
    )
    .unwrap();
    node.start().await;
    let admin = &cluster.admin;
    let pod = |name: &str, image: &str, extra: &str| {
        manifest(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: n1\n  terminationGracePeriodSeconds: 0\n{extra}  containers:\n  \
             - {{name: c, image: \"{image}\", command: [sleep, '3600']}}\n"
        ))
    };

    // Through the mirror: pulled, with the kubelet's Events, and running.
    admin.create(pod("mirrored", "keel/web:2", "")).await.unwrap();
    let p = wait_pod(admin, "mirrored", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await;
    let status = container_status(&p, "c").unwrap();
    assert!(status.image_id.starts_with("sha256:"), "{status:?}");
    let events = events_for(admin, "mirrored").await;
    assert!(events.iter().any(|(r, m)| r == "Pulling" && m == "Pulling image \"keel/web:2\""), "{events:?}");
    assert!(
        events.iter().any(|(r, m)| r == "Pulled" && m.starts_with("Successfully pulled image \"keel/web:2\" in ")),
        "{events:?}"
    );
    let rt = node.running.as_ref().unwrap().runtime.clone();
    assert!(rt.image("docker.io/keel/web:2").await.unwrap().is_some(), "recorded under the name the pod used");

    // The private registry refuses a pull without credentials: ErrImagePull with the reason,
    // then ImagePullBackOff.
    let image = format!("{}/private/box:1", private.host());
    admin.create(pod("nocreds", &image, "")).await.unwrap();
    let p = wait_pod(admin, "nocreds", "ErrImagePull", Duration::from_secs(30), |p| {
        waiting(p, "c").is_some_and(|(r, _)| r == "ErrImagePull")
    })
    .await;
    let (_, message) = waiting(&p, "c").unwrap();
    assert!(message.contains(&format!("failed to pull and unpack image \"{image}\"")), "{message}");
    assert!(message.to_lowercase().contains("not authorized"), "{message}");
    wait_pod(admin, "nocreds", "ImagePullBackOff", Duration::from_secs(30), |p| {
        waiting(p, "c")
            .is_some_and(|(r, m)| r == "ImagePullBackOff" && m == format!("Back-off pulling image \"{image}\""))
    })
    .await;
    let events = events_for(admin, "nocreds").await;
    assert!(
        events.iter().any(|(r, m)| r == "Failed" && m.starts_with(&format!("Failed to pull image \"{image}\": "))),
        "{events:?}"
    );
    assert!(events.iter().any(|(r, m)| r == "BackOff" && m.starts_with("Back-off pulling image")), "{events:?}");

    // With a dockerconfigjson pull secret, the same image pulls.
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "puller:s3cret");
    let config = format!("{{\"auths\":{{\"{}\":{{\"auth\":\"{auth}\"}}}}}}", private.host());
    admin
        .create(manifest(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: regcred}}\ntype: kubernetes.io/dockerconfigjson\nstringData:\n  .dockerconfigjson: '{config}'\n"
        )))
        .await
        .unwrap();
    admin.create(pod("withcreds", &image, "  imagePullSecrets: [{name: regcred}]\n")).await.unwrap();
    wait_pod(admin, "withcreds", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await;

    // Offline: an image from a registry without a mirror fails at once, saying why.
    admin.create(pod("offline", "quay.io/nowhere/thing:1", "")).await.unwrap();
    let p = wait_pod(admin, "offline", "ErrImagePull", Duration::from_secs(30), |p| {
        waiting(p, "c").is_some_and(|(r, _)| r == "ErrImagePull")
    })
    .await;
    let (_, message) = waiting(&p, "c").unwrap();
    assert!(message.contains("the registries are offline and quay.io has no mirror"), "{message}");

    // Never: only what is present.
    admin.create(pod("never", "keel/absent:1", "")).await.unwrap();
    let never = manifest(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: never2}\nspec:\n  nodeName: n1\n  containers:\n  \
         - {name: c, image: \"keel/absent:9\", imagePullPolicy: Never, command: [sleep, '1']}\n",
    );
    admin.create(never).await.unwrap();
    wait_pod(admin, "never2", "ErrImageNeverPull", Duration::from_secs(30), |p| {
        waiting(p, "c").is_some_and(|(r, m)| {
            r == "ErrImageNeverPull"
                && m == "Container image \"keel/absent:9\" is not present with pull policy of Never"
        })
    })
    .await;

    for name in ["mirrored", "nocreds", "withcreds", "offline", "never", "never2"] {
        admin.delete(Kind::Pod, "default", name, &Default::default()).await.unwrap();
    }
    super::eventually("pods gone", Duration::from_secs(30), || async {
        let list = admin.list_all(Kind::Pod, &keel::client::ListOptions::namespace("default")).await.ok()?;
        list.items.is_empty().then_some(())
    })
    .await;
    drop(node);
    cluster.stop().await;
}
