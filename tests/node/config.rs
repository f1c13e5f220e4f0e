//! What a pod's spec configures reaches its containers: environment from ConfigMaps,
//! Secrets and the downward API; volumes (updated in place when their source changes);
//! cgroup limits, with an OOM kill reported as such; and bad references reported with the
//! kubelet's reasons while a healthy pod beside them runs.

use std::time::Duration;

use keel::api::kinds::Kind;
use keel::client::{Client, DeleteOptions};
use keel::proto::v1 as pb;

use super::*;

async fn apply(admin: &Client, yaml: &str) {
    for doc in keel::api::manifest::split(yaml) {
        let obj = keel::api::manifest::parse_document("test.yaml", &doc).unwrap();
        admin.apply(vec![obj], false).await.unwrap();
    }
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The pod's `emptyDir` named `out` on the host.
fn out_dir(node: &TestNode, uid: &str) -> PathBuf {
    node.cfg.data_dir.join("pods").join(uid).join("volumes/empty-dir/out")
}

fn mounted(path: &Path) -> Option<String> {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some(p.as_str()))
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_volumes_and_limits_reach_the_container() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let node = cluster.node("n1").await;
    let admin = &cluster.admin;
    let host_dir = tempfile::tempdir().unwrap();
    let host = host_dir.path().join("made-by-kubelet");
    apply(
        admin,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: '1', b: two, bad.key: x}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {token: sekret}\n",
    )
    .await;
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: cfg, labels: {{app: cfg}}}}
spec:
  nodeName: n1
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox
    command: [sh, -c, 'env > /out/env; cat /cm/b > /out/b; cat /sec/token > /out/token; cat /down/labels > /out/labels; cat /sub > /out/sub; echo hi > /host/file; df -k /mem | tail -1 > /out/mem; while true; do cat /cm/a > /out/a.tmp; mv /out/a.tmp /out/a; sleep 0.2; done']
    env:
    - {{name: FROM_CM, valueFrom: {{configMapKeyRef: {{name: cm, key: a}}}}}}
    - {{name: FROM_SECRET, valueFrom: {{secretKeyRef: {{name: s, key: token}}}}}}
    - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
    - {{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
    - {{name: MEM_MI, valueFrom: {{resourceFieldRef: {{resource: limits.memory, divisor: 1Mi}}}}}}
    - {{name: MISSING_OK, valueFrom: {{configMapKeyRef: {{name: nope, key: x, optional: true}}}}}}
    envFrom:
    - {{prefix: CM_, configMapRef: {{name: cm}}}}
    resources:
      requests: {{cpu: 250m, memory: 32Mi}}
      limits: {{cpu: 500m, memory: 64Mi}}
    volumeMounts:
    - {{name: out, mountPath: /out}}
    - {{name: cm, mountPath: /cm, readOnly: true}}
    - {{name: sec, mountPath: /sec}}
    - {{name: down, mountPath: /down}}
    - {{name: mem, mountPath: /mem}}
    - {{name: host, mountPath: /host}}
    - {{name: cm, mountPath: /sub, subPath: b}}
  volumes:
  - {{name: out, emptyDir: {{}}}}
  - {{name: cm, configMap: {{name: cm}}}}
  - {{name: sec, secret: {{secretName: s, defaultMode: 0400}}}}
  - name: down
    downwardAPI:
      items: [{{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}]
  - {{name: mem, emptyDir: {{medium: Memory, sizeLimit: 2Mi}}}}
  - {{name: host, hostPath: {{path: {host}, type: DirectoryOrCreate}}}}
"#,
        host = host.display()
    );
    let created = admin.create(manifest(&yaml)).await.unwrap();
    let uid = keel::api::object::meta(&created).unwrap().uid.clone();
    let p = wait_pod(admin, "cfg", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await;
    let ip = p.status.as_ref().unwrap().pod_ip.clone();
    let out = out_dir(&node, &uid);
    let a =
        eventually("the container wrote its files", Duration::from_secs(20), || async { read(&out.join("a")) }).await;
    assert_eq!(a, "1");
    let env = read(&out.join("env")).unwrap();
    for want in
        ["FROM_CM=1", "FROM_SECRET=sekret", "POD_NAME=cfg", &format!("POD_IP={ip}"), "MEM_MI=64", "CM_a=1", "CM_b=two"]
    {
        assert!(env.lines().any(|l| l == want), "{want} not in the environment:\n{env}");
    }
    assert!(!env.contains("MISSING_OK") && !env.contains("bad.key"), "{env}");
    assert_eq!(read(&out.join("b")).unwrap(), "two");
    assert_eq!(read(&out.join("sub")).unwrap(), "two", "subPath of a ConfigMap volume");
    assert_eq!(read(&out.join("token")).unwrap(), "sekret");
    assert_eq!(read(&out.join("labels")).unwrap(), "app=\"cfg\"");
    assert_eq!(read(&host.join("file")).unwrap(), "hi\n", "hostPath, created as a directory");
    let mem_kib: u64 = read(&out.join("mem")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(mem_kib, 2048, "a Memory emptyDir is a tmpfs of its sizeLimit");
    // Secrets never touch the node's disk: their volume is a tmpfs, the file mode as asked.
    let sec = node.cfg.data_dir.join("pods").join(&uid).join("volumes/secret/sec");
    assert!(mounted(&sec).is_some_and(|m| m.contains(" - tmpfs ")), "secret volume not on tmpfs");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(sec.join("token")).unwrap().permissions().mode() & 0o777, 0o400);
    // cgroups from requests and limits.
    let cg = |ctrl: &str, file: &str| -> String {
        let base = Path::new("/sys/fs/cgroup").join(ctrl).join("keel").join(&uid);
        let dir = std::fs::read_dir(&base).unwrap().flatten().find(|e| e.path().is_dir()).unwrap().path();
        read(&dir.join(file)).unwrap().trim().to_string()
    };
    if Path::new("/sys/fs/cgroup/cpu").exists() {
        assert_eq!(cg("cpu", "cpu.shares"), "256");
        assert_eq!(cg("cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(cg("memory", "memory.limit_in_bytes"), (64u64 << 20).to_string());
    }
    let status = p.status.unwrap();
    assert_eq!(status.qos_class, "Burstable");

    // The ConfigMap changes: the file in the running container follows.
    apply(admin, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: changed, b: two}\n").await;
    eventually("the ConfigMap volume shows the update", Duration::from_secs(20), || async {
        (read(&out.join("a")).as_deref() == Some("changed")).then_some(())
    })
    .await;

    admin.delete(Kind::Pod, "default", "cfg", &DeleteOptions::default()).await.unwrap();
    eventually("pod cfg gone", Duration::from_secs(30), || async { pod(admin, "cfg").await.is_none().then_some(()) })
        .await;
    assert!(mounted(&sec).is_none(), "the secret tmpfs is unmounted");
    super::pods::clean(&node).await;
    drop(node);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_and_bad_references_are_reported_as_kubernetes_does() {
    if !prerequisites() {
        return;
    }
    let cluster = Cluster::start().await;
    let node = cluster.node("n1").await;
    let admin = &cluster.admin;
    apply(admin, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: '1'}\n").await;
    let pod_yaml = |name: &str, rest: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: n1\n  terminationGracePeriodSeconds: 1\n{rest}")
    };
    admin
        .create(manifest(&pod_yaml(
            "healthy",
            "  containers:\n  - {name: c, image: busybox, command: [sleep, '3600']}\n",
        )))
        .await
        .unwrap();
    admin
        .create(manifest(&pod_yaml(
            "oom",
            "  restartPolicy: Never\n  containers:\n  - name: c\n    image: busybox\n    \
             command: [sh, -c, 'x=$(dd if=/dev/zero bs=1048576 count=96 2>/dev/null | tr \"\\000\" a); echo ${#x}']\n    \
             resources: {limits: {memory: 16Mi}}\n",
        )))
        .await
        .unwrap();
    admin
        .create(manifest(&pod_yaml(
            "missing-key",
            "  containers:\n  - name: c\n    image: busybox\n    command: [sleep, '3600']\n    \
             env: [{name: X, valueFrom: {configMapKeyRef: {name: cm, key: nope}}}]\n",
        )))
        .await
        .unwrap();
    admin
        .create(manifest(&pod_yaml(
            "missing-volume",
            "  containers:\n  - name: c\n    image: busybox\n    command: [sleep, '3600']\n    \
             volumeMounts: [{name: v, mountPath: /v}]\n  volumes: [{name: v, configMap: {name: absent}}]\n",
        )))
        .await
        .unwrap();
    admin
        .create(manifest(&pod_yaml(
            "bad-command",
            "  restartPolicy: Never\n  containers:\n  - {name: c, image: busybox, command: [/no/such/binary]}\n",
        )))
        .await
        .unwrap();

    wait_pod(admin, "healthy", "Running", Duration::from_secs(60), |p| phase(p) == "Running").await;
    let p = wait_pod(admin, "oom", "OOMKilled", Duration::from_secs(60), |p| phase(p) == "Failed").await;
    let t = container_status(&p, "c").unwrap().state.clone().unwrap().terminated.unwrap();
    assert_eq!((t.reason.as_str(), t.exit_code), ("OOMKilled", 137));
    let waiting = |name: &'static str, reason: &'static str| async move {
        wait_pod(admin, name, reason, Duration::from_secs(30), |p| {
            container_status(p, "c").and_then(|c| c.state.as_ref()?.waiting.clone()).is_some_and(|w| w.reason == reason)
        })
        .await
    };
    let p = waiting("missing-key", "CreateContainerConfigError").await;
    let w = container_status(&p, "c").unwrap().state.clone().unwrap().waiting.unwrap();
    assert_eq!(w.message, "couldn't find key nope in ConfigMap default/cm");
    let p = waiting("missing-volume", "ContainerCreating").await;
    let w = container_status(&p, "c").unwrap().state.clone().unwrap().waiting.unwrap();
    assert!(w.message.contains("configmap \"absent\" not found"), "{}", w.message);
    let p = wait_pod(admin, "bad-command", "failed to start", Duration::from_secs(30), |p| {
        container_status(p, "c")
            .and_then(|c| c.state.as_ref()?.waiting.clone())
            .is_some_and(|w| w.reason == "RunContainerError")
            || phase(p) == "Failed"
    })
    .await;
    let st = container_status(&p, "c").unwrap().state.clone().unwrap();
    let message = st.waiting.map(|w| w.message).or(st.terminated.map(|t| t.message)).unwrap_or_default();
    assert!(message.contains("/no/such/binary"), "{message}");
    // Each got an Event naming the pod.
    let events = admin.list_all(Kind::Event, &keel::client::ListOptions::namespace("default")).await.unwrap().items;
    let reasons: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::object::Kind::Event(ev)) => Some((ev.involved_object.as_ref()?.name.clone(), ev.reason.clone())),
            _ => None,
        })
        .collect();
    for (pod_name, reason) in [("missing-key", "Failed"), ("missing-volume", "FailedMount")] {
        assert!(
            reasons.iter().any(|(n, r)| n == pod_name && r == reason),
            "no {reason} event for {pod_name}: {reasons:?}"
        );
    }
    // The healthy pod never noticed.
    let h = pod(admin, "healthy").await.unwrap();
    assert_eq!(container_status(&h, "c").unwrap().restart_count, 0);
    for name in ["healthy", "oom", "missing-key", "missing-volume", "bad-command"] {
        admin.delete(Kind::Pod, "default", name, &DeleteOptions::default()).await.unwrap();
    }
    for name in ["healthy", "oom", "missing-key", "missing-volume", "bad-command"] {
        eventually(&format!("pod {name} gone"), Duration::from_secs(30), || async {
            pod(admin, name).await.is_none().then_some(())
        })
        .await;
    }
    super::pods::clean(&node).await;
    drop(node);
    cluster.stop().await;
}
