//! keelctl against a real replica: apply, re-apply, change, get, delete and bad input.

use std::process::Command;

/// keelctl with the test replica's admin configuration.
fn keelctl(config: &std::path::Path, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    keelctl_env(args, stdin, &[("KEELCONFIG", &config.display().to_string())])
}

/// keelctl with its own environment (KEELCONFIG, EDITOR) and no --server unless given.
fn keelctl_env(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keelctl"));
    cmd.args(args).env_remove("RUST_BACKTRACE").env_remove("KEEL_SERVER").env("KEELCONFIG", "/nonexistent/keel-config");
    cmd.envs(env.iter().copied());
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
    let addr = api.config.clone();
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

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_annotate_scale_edit_describe_and_contexts() {
    let api = super::start().await;
    let addr = api.addr.clone();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config").display().to_string();
    // Contexts: the first points at a dead port, the second at the replica with a namespace.
    let cfg = config.clone();
    let a = addr.clone();
    let run = move |args: &str| {
        let (cfg, args) = (cfg.clone(), args.to_string());
        blocking(move || keelctl_env(&args.split(' ').collect::<Vec<_>>(), None, &[("KEELCONFIG", &cfg)]))
    };
    // Start from the admin configuration: new contexts take the current one's credentials.
    std::fs::copy(&api.config, &config).unwrap();
    let (ok, out, err) = run("config set-context dead --servers 127.0.0.1:1").await;
    assert!(ok && out.contains("created"), "{err}");
    let (ok, _, err) =
        run(&format!("config set-context live --servers 127.0.0.1:1,{a} --default-namespace team")).await;
    assert!(ok, "{err}");
    let (ok, _, _) = run("config use-context nope").await;
    assert!(!ok);
    let (ok, _, err) = run("config use-context live").await;
    assert!(ok, "{err}");
    let (_, out, _) = run("config get-contexts").await;
    assert!(out.lines().any(|l| l.starts_with('*') && l.contains("live") && l.contains("team")), "{out}");
    // The context's namespace is the default; the dead first address is failed over.
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n---\n";
    let cfg = config.clone();
    let (ok, out, err) =
        blocking(move || keelctl_env(&["apply", "-f", "-"], Some(&format!("{ns}{WEB}")), &[("KEELCONFIG", &cfg)]))
            .await;
    assert!(ok, "{err}");
    assert!(out.contains("deployment.apps/web created"), "{out}");
    let (ok, out, _) = run("get deploy -o name").await;
    assert!(ok && out.trim() == "deployment.apps/web", "{out}");
    let (ok, _, err) = run("--context dead get deploy").await;
    assert!(!ok && err.contains("unavailable"), "{err}");

    // label / annotate.
    let (_, out, _) = run("label deploy web tier=front").await;
    assert_eq!(out.trim(), "deployment.apps/web labeled");
    let (ok, _, err) = run("label deploy/web tier=back").await;
    assert!(!ok && err.contains("'tier' already has a value (front), and --overwrite is false"), "{err}");
    let (_, out, _) = run("label deploy/web tier=back --overwrite").await;
    assert_eq!(out.trim(), "deployment.apps/web labeled");
    let (_, out, _) = run("label deploy/web tier=back").await;
    assert_eq!(out.trim(), "deployment.apps/web not labeled");
    let (_, out, _) = run("annotate deploy web owner=ops").await;
    assert_eq!(out.trim(), "deployment.apps/web annotated");
    let (_, out, _) = run("get deploy web -o json").await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["metadata"]["labels"]["tier"], "back");
    assert_eq!(v["metadata"]["annotations"]["owner"], "ops");
    let (_, out, _) = run("label deploy web tier-").await;
    assert_eq!(out.trim(), "deployment.apps/web labeled");

    // scale, with and without a precondition.
    let (ok, _, err) = run("scale deploy web --replicas 5 --current-replicas 3").await;
    assert!(!ok && err.contains("Expected replicas to be 3, was 2"), "{err}");
    let (_, out, _) = run("scale deploy/web --replicas 5").await;
    assert_eq!(out.trim(), "deployment.apps/web scaled");
    let (ok, _, err) = run("scale cm/x --replicas 1").await;
    assert!(!ok, "{err}");

    // edit through an EDITOR script; a bad edit is refused and nothing is written.
    let cfg = config.clone();
    let (ok, out, err) = blocking(move || {
        keelctl_env(
            &["edit", "deploy", "web"],
            None,
            &[("KEELCONFIG", &cfg), ("EDITOR", "sed -i s/nginx:1.14.2/nginx:1.16.1/")],
        )
    })
    .await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "deployment.apps/web edited");
    let cfg = config.clone();
    let (ok, _, err) = blocking(move || {
        keelctl_env(
            &["edit", "deploy", "web"],
            None,
            &[("KEELCONFIG", &cfg), ("EDITOR", "sed -i s/replicas:/replicaz:/")],
        )
    })
    .await;
    assert!(!ok && err.contains("replicaz") && err.contains("not saved"), "{err}");
    let cfg = config.clone();
    let (ok, out, _) =
        blocking(move || keelctl_env(&["edit", "deploy", "web"], None, &[("KEELCONFIG", &cfg), ("EDITOR", "true")]))
            .await;
    assert!(ok && out.trim() == "Edit cancelled, no changes made.", "{out}");
    let (_, out, _) = run("get deploy web -o json").await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["spec"]["replicas"], 5);
    assert_eq!(v["spec"]["template"]["spec"]["containers"][0]["image"], "nginx:1.16.1");
    let uid = v["metadata"]["uid"].as_str().unwrap().to_string();

    // describe shows the object's events, not those of other objects.
    let event = |name: &str, obj: &str, reason: &str| {
        format!(
            "apiVersion: v1\nkind: Event\nmetadata: {{name: {name}, namespace: team}}\n\
             involvedObject: {{kind: Deployment, name: {obj}, namespace: team, uid: {uid}}}\n\
             reason: {reason}\nmessage: Scaled up replica set web-1 to 5\ntype: Normal\n\
             source: {{component: deployment-controller}}\nlastTimestamp: \"2026-11-28T00:00:00Z\"\n"
        )
    };
    let events = format!("{}---\n{}", event("e1", "web", "ScalingReplicaSet"), event("e2", "other", "Elsewhere"));
    let cfg = config.clone();
    let (ok, _, err) =
        blocking(move || keelctl_env(&["apply", "-f", "-"], Some(&events), &[("KEELCONFIG", &cfg)])).await;
    assert!(ok, "{err}");
    let (ok, out, err) = run("describe deploy web").await;
    assert!(ok, "{err}");
    assert!(out.starts_with("Name:         web\nNamespace:    team\n"), "{out}");
    assert!(out.contains("Annotations:  owner=ops\n"), "last-applied is not shown: {out}");
    assert!(out.contains("Replicas:  5"), "{out}");
    assert!(out.contains("ScalingReplicaSet") && out.contains("deployment-controller"), "{out}");
    assert!(!out.contains("Elsewhere"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_string_data_is_stored_as_data_and_reapplies_unchanged() {
    let api = super::start().await;
    let config = api.config.clone();
    let run = move |args: &'static str, stdin: Option<&'static str>| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || keelctl(&config, &args.split(' ').collect::<Vec<_>>(), stdin))
    };
    const SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\nstringData: {user: admin}\n";
    let (ok, out, err) = run("apply -f -", Some(SECRET)).await.unwrap();
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "secret/creds created");
    let (_, out, _) = run("get secret creds -o json", None).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["data"]["user"], "YWRtaW4=", "{v}");
    assert!(v.get("stringData").is_none(), "stringData is write-only: {v}");
    let rv = v["metadata"]["resourceVersion"].clone();
    let (_, out, _) = run("apply -f -", Some(SECRET)).await.unwrap();
    assert_eq!(out.trim(), "secret/creds unchanged");
    let (_, out, _) = run("get secret creds -o json", None).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["metadata"]["resourceVersion"], rv, "re-applying wrote nothing");
}

/// Scripts parse keelctl's output: a list prints as one `List` document in json and yaml,
/// and jsonpath, custom-columns and --show-labels follow kubectl's syntax.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_output_is_one_document_and_jsonpath_and_custom_columns_work() {
    let api = super::start().await;
    let cfg = api.config.clone();
    let run = move |args: Vec<String>, stdin: Option<String>| {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            keelctl(&cfg, &a, stdin.as_deref())
        })
    };
    let maps = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, labels: {app: web, tier: fe}}\ndata: {k: v}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\ndata: {k: v, k2: v2}\n";
    let (ok, _, err) = run(vec!["apply".into(), "-f".into(), "-".into()], Some(maps.into())).await.unwrap();
    assert!(ok, "{err}");
    let get = |extra: &[&str]| {
        let mut a: Vec<String> = vec!["get".into(), "cm".into()];
        a.extend(extra.iter().map(|s| s.to_string()));
        run(a, None)
    };
    let (ok, out, err) = get(&["-o", "json"]).await.unwrap();
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON document, as json.load takes it");
    assert_eq!((v["apiVersion"].as_str(), v["kind"].as_str()), (Some("v1"), Some("List")));
    let names: Vec<&str> =
        v["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b"]);
    let (_, out, _) = get(&["-o", "yaml"]).await.unwrap();
    let y: serde_json::Value = serde_saphyr::from_str(&out).expect("one YAML document");
    assert_eq!(y["kind"], "List");
    assert_eq!(y["items"][1]["data"]["k2"], "v2");
    let (_, out, _) = get(&["-o", "jsonpath={.items[*].metadata.name}"]).await.unwrap();
    assert_eq!(out, "a b");
    let (_, out, _) = get(&["-o", "jsonpath={range .items[*]}{.metadata.name}={.data.k}{\"\\n\"}{end}"]).await.unwrap();
    assert_eq!(out, "a=v\nb=v\n");
    let (_, out, _) = get(&["a", "-o", "jsonpath={.metadata.labels.app}"]).await.unwrap();
    assert_eq!(out, "web", "a named get is the object itself");
    let (_, out, _) = get(&["-o", "custom-columns=NAME:.metadata.name,APP:.metadata.labels.app"]).await.unwrap();
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows, [vec!["NAME", "APP"], vec!["a", "web"], vec!["b", "<none>"]]);
    let (_, out, _) = get(&["--show-labels"]).await.unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].trim_end().ends_with("LABELS"), "{out}");
    assert!(lines[1].trim_end().ends_with("app=web,tier=fe"), "{out}");
    assert!(lines[2].trim_end().ends_with("<none>"), "{out}");
    let (ok, _, err) = get(&["-o", "jsonpath={.items[*"]).await.unwrap();
    assert!(!ok && err.contains("error parsing jsonpath"), "{err}");
    let (ok, _, err) = get(&["-o", "xml"]).await.unwrap();
    assert!(!ok && err.contains("allowed formats are"), "{err}");
}

/// A create sent to a replica that takes the connection and never answers: keelctl says the
/// result is unknown and how to find out, and does not send it to another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_create_is_reported_unknown_and_not_resent() {
    let api = super::start().await;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let servers = format!("{},{}", silent.local_addr().unwrap(), api.addr);
    let cfg = api.config.display().to_string();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        let args = ["--server", servers.as_str(), "--request-timeout", "500ms", "create", "-f", "-"];
        keelctl_env(
            &args,
            Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: maybe}\ndata: {k: v}\n"),
            &[("KEELCONFIG", cfg.as_str())],
        )
    })
    .await
    .unwrap();
    assert!(!ok, "{out}");
    assert!(err.contains("the result is unknown") && err.contains("check with get"), "{err}");
    let mut c = api.client.clone();
    let r = keel::proto::v1::ObjectRef { kind: "ConfigMap".into(), namespace: "default".into(), name: "maybe".into() };
    let e = c.get(keel::proto::v1::GetRequest { r#ref: Some(r) }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "the live replica never got it");
    drop(silent);
}
