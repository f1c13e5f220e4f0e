//! keelctl against a real replica: apply, re-apply, change, get, delete and bad input.

use std::process::Command;

fn keelctl(addr: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keelctl"));
    cmd.args(["--server", addr]).args(args).env_remove("RUST_BACKTRACE");
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const WEB: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: nginx
        image: nginx:1.14.2
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_is_idempotent_and_reports_created_unchanged_configured() {
    let api = super::start().await;
    let addr = api.addr.clone();
    let run = move |args: Vec<String>, stdin: Option<String>| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            keelctl(&addr, &a, stdin.as_deref())
        })
    };
    let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
    let (ok, out, err) = run(args("apply -f -"), Some(WEB.into())).await.unwrap();
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "deployment.apps/web created");
    let (_, out, _) = run(args("apply -f -"), Some(WEB.into())).await.unwrap();
    assert_eq!(out.trim(), "deployment.apps/web unchanged");
    let (_, out, _) = run(args("apply -f -"), Some(WEB.replace("1.14.2", "1.16.1"))).await.unwrap();
    assert_eq!(out.trim(), "deployment.apps/web configured");
    let (_, out, _) = run(args("get deploy -o name"), None).await.unwrap();
    assert_eq!(out.trim(), "deployment.apps/web");
    let (_, out, _) = run(args("get deployments web -o json"), None).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1.16.1");
    assert_eq!(v["metadata"]["generation"], 2, "int64 fields print as numbers");
    let (_, out, _) = run(args("get deploy"), None).await.unwrap();
    assert!(out.starts_with("NAME") && out.contains("web") && out.contains("0/2"), "{out}");

    // Bad input: nothing is sent, and the error says where.
    let bad = format!("{WEB}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm\ndata:\n  a: [1]\n");
    let (ok, _, err) = run(args("apply -f -"), Some(bad)).await.unwrap();
    assert!(!ok);
    assert!(err.contains("<stdin>: document 2, line 20: data.a:"), "{err}");
    let (_, out, _) = run(args("get cm -o name"), None).await.unwrap();
    assert_eq!(out.trim(), "", "the valid first document was not applied either");

    // A label dropped from the manifest is dropped from the object.
    let labelled = WEB.replace("  name: web\n", "  name: web\n  labels: {tier: front}\n");
    let (_, out, _) = run(args("apply -f -"), Some(labelled)).await.unwrap();
    assert_eq!(out.trim(), "deployment.apps/web configured");
    let (_, out, _) = run(args("apply -f -"), Some(WEB.replace("1.14.2", "1.16.1"))).await.unwrap();
    assert_eq!(out.trim(), "deployment.apps/web configured");
    let (_, out, _) = run(args("get deploy web -o json"), None).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["metadata"].get("labels").is_none(), "{v}");

    // --atomic: one invalid object and none is applied.
    let set = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: one}\n---\n\
               apiVersion: v1\nkind: ConfigMap\nmetadata: {name: two, namespace: missing}\n";
    let (ok, _, err) = run(args("apply --atomic -f -"), Some(set.into())).await.unwrap();
    assert!(!ok);
    assert!(
        err.contains("none of the 2 objects was applied") && err.contains("namespaces \"missing\" not found"),
        "{err}"
    );
    let (_, out, _) = run(args("get cm -o name"), None).await.unwrap();
    assert_eq!(out.trim(), "");
    let (ok, out, err) = run(args("apply --atomic -f -"), Some(set.replace(", namespace: missing", ""))).await.unwrap();
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "configmap/one created\nconfigmap/two created");

    let (ok, out, _) = run(args("delete deploy web"), None).await.unwrap();
    assert!(ok);
    assert_eq!(out.trim(), "deployment.apps/web deleted");
    let (ok, _, err) = run(args("get deploy web"), None).await.unwrap();
    assert!(!ok && err.contains("deployments.apps \"web\" not found"), "{err}");
}
