//! The Objects API against a real replica (store + gRPC) on 127.0.0.1.

use std::collections::HashMap;
use std::time::Duration;

use keel::api::manifest;
use keel::proto::v1 as pb;
use keel::proto::v1::objects_client::ObjectsClient;
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;

mod keelctl;
mod python;

struct Api {
    _dir: tempfile::TempDir,
    _server: keel::harness::TestReplica,
    client: ObjectsClient<Channel>,
    addr: String,
    admin: keel::pki::Credentials,
    pki: keel::harness::TestPki,
    /// A keelctl configuration with the admin's credentials (context "test").
    config: std::path::PathBuf,
}

async fn start() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr, pki) = keel::harness::single_replica(&dir.path().join("node1")).await.unwrap();
    let admin = pki.admin.clone();
    let ch = keel::client::endpoint(&addr, &admin).unwrap().connect().await.unwrap();
    keel::server::bootstrap::DataDir::new(dir.path()).write_admin_config(&addr, &admin).unwrap();
    let config = keel::server::bootstrap::DataDir::new(dir.path()).admin_config();
    Api { _dir: dir, _server: server, client: ObjectsClient::new(ch), addr, admin, pki, config }
}

fn parse(yaml: &str) -> pb::Object {
    let docs = manifest::split(yaml);
    manifest::parse_document("test.yaml", &docs[0]).unwrap()
}

fn deployment(name: &str, labels: &str, image: &str) -> pb::Object {
    parse(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  labels: {labels}\nspec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      containers:\n      - {{name: main, image: \"{image}\"}}\n"
    ))
}

fn meta(o: &pb::Object) -> pb::ObjectMeta {
    keel::api::object::meta(o).cloned().unwrap()
}

fn deploy_spec(o: &pb::Object) -> pb::DeploymentSpec {
    match &o.kind {
        Some(pb::object::Kind::Deployment(d)) => d.spec.clone().unwrap(),
        _ => panic!("not a deployment"),
    }
}

fn r(kind: &str, ns: &str, name: &str) -> Option<pb::ObjectRef> {
    Some(pb::ObjectRef { kind: kind.into(), namespace: ns.into(), name: name.into() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_defaults_and_get_round_trip_with_server_metadata() {
    let mut api = start().await;
    let created = api
        .client
        .create(pb::CreateRequest { object: Some(deployment("web", "{app: web}", "nginx:1.14.2")) })
        .await
        .unwrap()
        .into_inner();
    let m = meta(&created);
    assert_eq!(m.namespace, "default");
    assert!(!m.uid.is_empty() && !m.creation_timestamp.is_empty());
    assert_eq!(m.generation, 1);
    assert!(m.resource_version.parse::<i64>().unwrap() > 0);
    assert_eq!(deploy_spec(&created).replicas, Some(1), "defaulted");
    let got = api.client.get(pb::GetRequest { r#ref: r("deploy", "default", "web") }).await.unwrap().into_inner();
    assert_eq!(got, created);

    let dup = api
        .client
        .create(pb::CreateRequest { object: Some(deployment("web", "{app: web}", "nginx")) })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert!(dup.message().contains("deployments.apps \"web\" already exists"), "{}", dup.message());

    let mut elsewhere = deployment("web", "{app: web}", "nginx");
    keel::api::object::meta_mut(&mut elsewhere).unwrap().namespace = "nope".into();
    let e = api.client.create(pb::CreateRequest { object: Some(elsewhere) }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("namespaces \"nope\" not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_carry_kubectl_style_messages_and_field_details() {
    let mut api = start().await;
    let mut bad = deployment("web", "{app: web}", "nginx");
    if let Some(pb::object::Kind::Deployment(d)) = bad.kind.as_mut() {
        d.spec.as_mut().unwrap().template.as_mut().unwrap().spec.as_mut().unwrap().containers[0].image.clear();
    }
    let e = api.client.create(pb::CreateRequest { object: Some(bad) }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "The Deployment \"web\" is invalid: spec.template.spec.containers[0].image: Required value"
    );
    let details = pb::FieldViolations::decode(e.details()).unwrap();
    assert_eq!(details.violations[0].field, "spec.template.spec.containers[0].image");
    // Nothing was written.
    let e = api.client.get(pb::GetRequest { r#ref: r("deployments", "default", "web") }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_compare_resource_version_and_keep_spec_and_status_apart() {
    let mut api = start().await;
    let v1 = api
        .client
        .create(pb::CreateRequest { object: Some(deployment("web", "{app: web}", "nginx:1")) })
        .await
        .unwrap()
        .into_inner();
    // A no-op update writes nothing.
    let same = api.client.update(pb::UpdateRequest { object: Some(v1.clone()) }).await.unwrap().into_inner();
    assert_eq!(meta(&same).resource_version, meta(&v1).resource_version);
    // A spec change bumps generation; a status sent through Update is ignored.
    let mut v2 = deployment("web", "{app: web}", "nginx:2");
    keel::api::object::meta_mut(&mut v2).unwrap().resource_version = meta(&v1).resource_version.clone();
    if let Some(pb::object::Kind::Deployment(d)) = v2.kind.as_mut() {
        d.status = Some(pb::DeploymentStatus { replicas: 9, ..Default::default() });
    }
    let v2 = api.client.update(pb::UpdateRequest { object: Some(v2) }).await.unwrap().into_inner();
    assert_eq!(meta(&v2).generation, 2);
    assert_eq!(meta(&v2).uid, meta(&v1).uid);
    let Some(pb::object::Kind::Deployment(d)) = &v2.kind else { panic!() };
    assert_eq!(d.status.as_ref().map_or(0, |s| s.replicas), 0, "status is not writable through Update");
    // A stale resourceVersion conflicts.
    let stale = api.client.update(pb::UpdateRequest { object: Some(v1.clone()) }).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert!(stale.message().contains("the object has been modified"));
    // UpdateStatus changes status only, without a generation bump.
    let mut st = v2.clone();
    if let Some(pb::object::Kind::Deployment(d)) = st.kind.as_mut() {
        d.status = Some(pb::DeploymentStatus { replicas: 3, ..Default::default() });
        d.spec.as_mut().unwrap().replicas = Some(50);
    }
    let v3 = api.client.update_status(pb::UpdateRequest { object: Some(st) }).await.unwrap().into_inner();
    assert_eq!(meta(&v3).generation, 2);
    assert_eq!(deploy_spec(&v3).replicas, Some(1), "spec is not writable through UpdateStatus");
    let Some(pb::object::Kind::Deployment(d)) = &v3.kind else { panic!() };
    assert_eq!(d.status.as_ref().unwrap().replicas, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_label_and_field_selectors_and_pages() {
    let mut api = start().await;
    for (i, tier) in ["a", "b", "a", "b", "a"].iter().enumerate() {
        let d = deployment(&format!("d{i}"), &format!("{{tier: {tier}}}"), "nginx");
        api.client.create(pb::CreateRequest { object: Some(d) }).await.unwrap();
    }
    let names = |l: &pb::ListResponse| l.items.iter().map(|o| meta(o).name).collect::<Vec<_>>();
    let all =
        api.client.list(pb::ListRequest { kind: "deploy".into(), ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(names(&all), ["d0", "d1", "d2", "d3", "d4"]);
    let a = api
        .client
        .list(pb::ListRequest {
            kind: "deploy".into(),
            label_selector: "tier in (a),tier!=b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&a), ["d0", "d2", "d4"]);
    let one = api
        .client
        .list(pb::ListRequest {
            kind: "deploy".into(),
            field_selector: "metadata.name=d3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&one), ["d3"]);
    let mut seen = Vec::new();
    let mut cont = String::new();
    let mut first_rv = None;
    loop {
        let page = api
            .client
            .list(pb::ListRequest { kind: "deploy".into(), limit: 2, r#continue: cont.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.items.len() <= 2);
        // Every page reports the first page's revision, even after other writes.
        assert_eq!(*first_rv.get_or_insert(page.resource_version.clone()), page.resource_version);
        let cm = parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {generateName: between-pages-}\n");
        api.client.create(pb::CreateRequest { object: Some(cm) }).await.unwrap();
        seen.extend(names(&page));
        if page.r#continue.is_empty() {
            break;
        }
        cont = page.r#continue;
    }
    assert_eq!(seen, names(&all));
    let e = api
        .client
        .list(pb::ListRequest { kind: "deploy".into(), field_selector: "spec.replicas=1".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalizers_hold_a_deleted_object_until_the_last_one_goes() {
    let mut api = start().await;
    let mut d = deployment("held", "{app: held}", "nginx");
    keel::api::object::meta_mut(&mut d).unwrap().finalizers = vec!["example.com/cleanup".into()];
    api.client.create(pb::CreateRequest { object: Some(d) }).await.unwrap();
    let del = api
        .client
        .delete(pb::DeleteRequest { r#ref: r("deploy", "", "held"), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(!del.deleted);
    let held = api.client.get(pb::GetRequest { r#ref: r("deploy", "", "held") }).await.unwrap().into_inner();
    assert!(!meta(&held).deletion_timestamp.is_empty());
    let mut release = held.clone();
    keel::api::object::meta_mut(&mut release).unwrap().finalizers.clear();
    api.client.update(pb::UpdateRequest { object: Some(release) }).await.unwrap();
    let gone = api.client.get(pb::GetRequest { r#ref: r("deploy", "", "held") }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    // Foreground deletion is recorded as Kubernetes does, with a finalizer.
    api.client.create(pb::CreateRequest { object: Some(deployment("fg", "{app: fg}", "nginx")) }).await.unwrap();
    let fg = api
        .client
        .delete(pb::DeleteRequest {
            r#ref: r("deploy", "", "fg"),
            propagation_policy: "Foreground".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta(&fg.object.unwrap()).finalizers, ["foregroundDeletion"]);
    let e =
        api.client.delete(pb::DeleteRequest { r#ref: r("ns", "", "default"), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_list_sees_added_modified_and_deleted_in_order() {
    let mut api = start().await;
    let list =
        api.client.list(pb::ListRequest { kind: "deploy".into(), ..Default::default() }).await.unwrap().into_inner();
    let mut stream = api
        .client
        .watch(pb::WatchObjectsRequest {
            kind: "deploy".into(),
            resource_version: list.resource_version.clone(),
            label_selector: "team=x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let created = api
        .client
        .create(pb::CreateRequest { object: Some(deployment("w", "{team: x}", "nginx:1")) })
        .await
        .unwrap()
        .into_inner();
    let mut next = created.clone();
    if let Some(pb::object::Kind::Deployment(d)) = next.kind.as_mut() {
        d.spec.as_mut().unwrap().replicas = Some(3);
    }
    api.client.update(pb::UpdateRequest { object: Some(next) }).await.unwrap();
    // Leaving the selector is a DELETED for this watcher; an object it never saw is skipped.
    api.client.create(pb::CreateRequest { object: Some(deployment("other", "{team: y}", "nginx")) }).await.unwrap();
    api.client.delete(pb::DeleteRequest { r#ref: r("deploy", "", "w"), ..Default::default() }).await.unwrap();
    let mut types = Vec::new();
    let mut revs = Vec::new();
    while types.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
        revs.push(ev.resource_version.parse::<i64>().unwrap());
        types.push(ev.r#type.clone());
        assert_eq!(meta(ev.object.as_ref().unwrap()).name, "w");
    }
    assert_eq!(types, ["ADDED", "MODIFIED", "DELETED"]);
    assert!(revs.windows(2).all(|w| w[0] < w[1]));
    // Bookmarks arrive when asked for.
    let mut marks = api
        .client
        .watch(pb::WatchObjectsRequest { kind: "pods".into(), allow_bookmarks: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let ev = tokio::time::timeout(Duration::from_secs(5), marks.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(ev.r#type, "BOOKMARK");
    let _ = HashMap::<(), ()>::new();
}

fn apply_req(objects: Vec<pb::Object>) -> pb::ApplyRequest {
    pb::ApplyRequest { objects, dry_run: false }
}

fn config_map(ns: &str, name: &str) -> pb::Object {
    parse(&format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {ns}}}\ndata: {{k: v}}\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_merges_three_ways_keeping_what_others_wrote() {
    let mut api = start().await;
    let first = deployment("web", "{a: '1', b: '2'}", "nginx:1.14.2");
    let r1 = api.client.apply(apply_req(vec![first.clone()])).await.unwrap().into_inner();
    assert_eq!(r1.results[0].action, "created");
    let created = r1.results[0].object.clone().unwrap();
    assert!(meta(&created).annotations.contains_key(keel::api::apply::LAST_APPLIED));

    // Another writer adds an annotation; an agent writes status.
    let mut other = created.clone();
    keel::api::object::meta_mut(&mut other).unwrap().annotations.insert("team".into(), "blue".into());
    let other = api.client.update(pb::UpdateRequest { object: Some(other) }).await.unwrap().into_inner();
    let mut st = other.clone();
    if let Some(pb::object::Kind::Deployment(d)) = st.kind.as_mut() {
        d.status = Some(pb::DeploymentStatus { replicas: 1, ..Default::default() });
    }
    let st = api.client.update_status(pb::UpdateRequest { object: Some(st) }).await.unwrap().into_inner();

    // Re-applying the same manifest writes nothing.
    let same = api.client.apply(apply_req(vec![first.clone()])).await.unwrap().into_inner();
    assert_eq!(same.results[0].action, "unchanged");
    assert_eq!(same.resource_version, "");
    assert_eq!(meta(same.results[0].object.as_ref().unwrap()).resource_version, meta(&st).resource_version);

    // Label b and the image change go; the foreign annotation and the status stay.
    let second = deployment("web", "{a: '1'}", "nginx:1.16.1");
    let r2 = api.client.apply(apply_req(vec![second.clone()])).await.unwrap().into_inner();
    assert_eq!(r2.results[0].action, "configured");
    let got = api.client.get(pb::GetRequest { r#ref: r("deploy", "default", "web") }).await.unwrap().into_inner();
    let m = meta(&got);
    assert_eq!(m.labels, HashMap::from([("a".to_string(), "1".to_string())]));
    assert_eq!(m.annotations.get("team").map(String::as_str), Some("blue"));
    assert_eq!(m.generation, 2);
    assert_eq!(deploy_spec(&got).template.unwrap().spec.unwrap().containers[0].image, "nginx:1.16.1");
    match &got.kind {
        Some(pb::object::Kind::Deployment(d)) => assert_eq!(d.status.as_ref().unwrap().replicas, 1),
        _ => panic!(),
    }

    // A dry run reports the change and writes nothing.
    let third = deployment("web", "{a: '2'}", "nginx:1.16.1");
    let dry = api.client.apply(pb::ApplyRequest { objects: vec![third], dry_run: true }).await.unwrap().into_inner();
    assert_eq!(dry.results[0].action, "configured");
    let after = api.client.get(pb::GetRequest { r#ref: r("deploy", "default", "web") }).await.unwrap().into_inner();
    assert_eq!(after, got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_of_a_set_is_one_transaction_all_or_nothing() {
    let mut api = start().await;
    let ns = parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n");
    let mut bad = deployment("broken", "{a: '1'}", "nginx");
    if let Some(pb::object::Kind::Deployment(d)) = bad.kind.as_mut() {
        d.spec.as_mut().unwrap().template.as_mut().unwrap().spec.as_mut().unwrap().containers[0].image.clear();
    }
    let err = api
        .client
        .apply(apply_req(vec![ns.clone(), config_map("team", "cm"), bad]))
        .await
        .expect_err("an invalid member fails the whole set");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("objects[2] (deployments.apps/broken): The Deployment \"broken\" is invalid"),
        "{}",
        err.message()
    );
    let gone = api.client.get(pb::GetRequest { r#ref: r("ns", "", "team") }).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "nothing of the set was written");

    // A namespace and its content in one set: the namespace need not exist beforehand.
    let set = vec![ns.clone(), config_map("team", "cm"), config_map("default", "cm2")];
    let ok = api.client.apply(apply_req(set.clone())).await.unwrap().into_inner();
    assert_eq!(ok.results.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(), ["created"; 3]);
    for res in &ok.results {
        assert_eq!(meta(res.object.as_ref().unwrap()).resource_version, ok.resource_version, "one revision");
    }
    let again = api.client.apply(apply_req(set)).await.unwrap().into_inner();
    assert!(again.results.iter().all(|r| r.action == "unchanged"));

    let dup = api.client.apply(apply_req(vec![config_map("team", "x"), config_map("team", "x")])).await.unwrap_err();
    assert_eq!(dup.code(), Code::InvalidArgument);
    assert!(dup.message().contains("same object"), "{}", dup.message());
    let no_ns = api.client.apply(apply_req(vec![config_map("nowhere", "x")])).await.unwrap_err();
    assert_eq!(no_ns.code(), Code::NotFound);
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_namespace_terminates_its_content_then_goes() {
    let mut api = start().await;
    let ns = parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n");
    let mut held = config_map("team", "held");
    keel::api::object::meta_mut(&mut held).unwrap().finalizers = vec!["example.com/hold".into()];
    api.client.apply(apply_req(vec![ns, config_map("team", "plain"), held])).await.unwrap();

    let del = api.client.delete(pb::DeleteRequest { r#ref: r("ns", "", "team"), ..Default::default() }).await.unwrap();
    let del = del.into_inner();
    assert!(!del.deleted, "held by its spec finalizer");
    match del.object.and_then(|o| o.kind) {
        Some(pb::object::Kind::Namespace(n)) => {
            assert_eq!(n.status.unwrap().phase, "Terminating");
            assert_eq!(n.spec.unwrap().finalizers, ["kubernetes"]);
        }
        other => panic!("{other:?}"),
    }
    let refused = api.client.create(pb::CreateRequest { object: Some(config_map("team", "late")) }).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("being terminated"), "{}", refused.message());

    // The controller deletes the plain object and marks the held one; the namespace waits.
    let mut c = api.client.clone();
    eventually("the plain ConfigMap is deleted", || {
        let mut c = c.clone();
        async move { c.get(pb::GetRequest { r#ref: r("cm", "team", "plain") }).await.is_err() }
    })
    .await;
    let held = c.get(pb::GetRequest { r#ref: r("cm", "team", "held") }).await.unwrap().into_inner();
    assert!(!meta(&held).deletion_timestamp.is_empty());
    assert!(c.get(pb::GetRequest { r#ref: r("ns", "", "team") }).await.is_ok(), "still terminating");

    let mut release = held;
    keel::api::object::meta_mut(&mut release).unwrap().finalizers.clear();
    c.update(pb::UpdateRequest { object: Some(release) }).await.unwrap();
    eventually("the namespace is gone", || {
        let mut c = c.clone();
        async move {
            matches!(c.get(pb::GetRequest { r#ref: r("ns", "", "team") }).await, Err(s) if s.code() == Code::NotFound)
        }
    })
    .await;
    // The name can be used again.
    let again = parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n");
    api.client.create(pb::CreateRequest { object: Some(again) }).await.unwrap();
    c = api.client.clone();
    assert!(c.get(pb::GetRequest { r#ref: r("ns", "", "team") }).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_needs_a_certificate_of_this_cluster() {
    use keel::pki::{anonymous_client_tls, Ca, Identity};
    let api = start().await;
    let get = pb::GetRequest { r#ref: r("ns", "", "default") };
    // TLS without a client certificate: the handshake works, every call is refused.
    let anon = tonic::transport::Endpoint::from_shared(format!("https://{}", api.addr))
        .unwrap()
        .tls_config(anonymous_client_tls(&api.admin.ca_pem))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let e = ObjectsClient::new(anon.clone()).get(get.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = pb::kv_client::KvClient::new(anon.clone())
        .range(pb::RangeRequest { key: b"/".to_vec(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let health = tonic_health::pb::health_client::HealthClient::new(anon)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap_err();
    assert_eq!(health.code(), Code::Unauthenticated);

    // Plain HTTP/2 gets no answer at all.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", api.addr)).unwrap().connect().await;
    if let Ok(ch) = plain {
        assert!(ObjectsClient::new(ch).get(get.clone()).await.is_err());
    }

    // A certificate from another CA (a cluster posing as this one's user) fails the handshake.
    let other = Ca::generate("other").unwrap();
    let mut foreign = other.issue(&Identity::Admin("admin".into()), Duration::from_secs(60), &[]).unwrap();
    foreign.ca_pem = api.admin.ca_pem.clone();
    let ch = keel::client::endpoint(&api.addr, &foreign).unwrap().connect().await;
    if let Ok(ch) = ch {
        let e = ObjectsClient::new(ch).get(get.clone()).await.unwrap_err();
        assert!(
            matches!(e.code(), Code::Unavailable | Code::Unknown | Code::Cancelled),
            "the handshake is refused: {e}"
        );
    }

    // A node identity may use the Objects API but not the store's internal KV API.
    let node = api.pki.ca.issue(&Identity::Node("n1".into()), Duration::from_secs(60), &[]).unwrap();
    let ch = keel::client::endpoint(&api.addr, &node).unwrap().connect().await.unwrap();
    ObjectsClient::new(ch.clone()).get(get).await.unwrap();
    let e = pb::kv_client::KvClient::new(ch)
        .range(pb::RangeRequest { key: b"/".to_vec(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("node n1 may not call this service"), "{}", e.message());
}

/// Every file under `dir`, read whole.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node1");
    let (server, addr, pki) = keel::harness::single_replica(&data).await.unwrap();
    let mut c = ObjectsClient::new(keel::client::endpoint(&addr, &pki.admin).unwrap().connect().await.unwrap());
    // "canary-bytes-0042" in base64.
    let secret = parse(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: db}\nstringData: {password: hunter2-plaintext-canary}\n\
         data: {token: Y2FuYXJ5LWJ5dGVzLTAwNDI=}\n",
    );
    c.create(pb::CreateRequest { object: Some(secret) }).await.unwrap();
    let cm = parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: plain}\ndata: {k: configmap-plaintext-canary}\n");
    c.create(pb::CreateRequest { object: Some(cm) }).await.unwrap();
    let got = c.get(pb::GetRequest { r#ref: r("secret", "default", "db") }).await.unwrap().into_inner();
    match got.kind {
        Some(pb::object::Kind::Secret(s)) => {
            assert_eq!(s.data.get("token").map(Vec::as_slice), Some(&b"canary-bytes-0042"[..]));
        }
        other => panic!("{other:?}"),
    }
    server.stop().await.unwrap();

    let found = |needle: &[u8]| {
        files_under(&data.join("db")).into_iter().filter(|(_, b)| b.windows(needle.len()).any(|w| w == needle)).count()
    };
    // The check can see plaintext: the ConfigMap's value is there, in the log or the tree.
    assert!(found(b"configmap-plaintext-canary") > 0, "the scan must find unencrypted values");
    assert_eq!(found(b"hunter2-plaintext-canary"), 0, "a Secret's stringData is on disk in the clear");
    assert_eq!(found(b"canary-bytes-0042"), 0, "a Secret's data is on disk in the clear");
    assert_eq!(found(b"Y2FuYXJ5LWJ5dGVzLTAwNDI="), 0, "a Secret's data is on disk base64-encoded");
    assert!(found(b"k8s:enc:aesgcm:v1:key1:") > 0, "sealed values carry their key name");
}

/// Found by the chaos suite: a write that loses a race between its read and its commit must
/// answer as Kubernetes does. Unconditional updates and deletes retry on the new state (never
/// a conflict), and an update whose object was deleted meanwhile is NotFound, not a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_get_kubernetes_answers_not_spurious_conflicts() {
    let api = start().await;
    let mut c = api.client.clone();
    c.create(pb::CreateRequest { object: Some(config_map("default", "race")) }).await.unwrap();
    let updates: Vec<_> = (0..16)
        .map(|i| {
            let mut c = api.client.clone();
            let mut o = config_map("default", "race");
            if let Some(pb::object::Kind::ConfigMap(cm)) = o.kind.as_mut() {
                cm.data.insert("k".into(), format!("v{i}"));
            }
            tokio::spawn(async move { c.update(pb::UpdateRequest { object: Some(o) }).await })
        })
        .collect();
    for u in updates {
        let r = u.await.unwrap();
        assert!(r.is_ok(), "an update without a resourceVersion failed: {:?}", r.err());
    }

    // Conditional updates racing a delete: each is Updated, Conflict (it lost to another
    // update) or NotFound (it lost to the delete) and nothing else; the delete always wins
    // through.
    let rv = meta(&c.get(pb::GetRequest { r#ref: r("ConfigMap", "default", "race") }).await.unwrap().into_inner())
        .resource_version;
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let mut c = api.client.clone();
            let mut o = config_map("default", "race");
            if let Some(pb::object::Kind::ConfigMap(cm)) = o.kind.as_mut() {
                cm.data.insert("k".into(), format!("w{i}"));
                cm.metadata.as_mut().unwrap().resource_version = rv.clone();
            }
            tokio::spawn(async move { c.update(pb::UpdateRequest { object: Some(o) }).await })
        })
        .collect();
    let deleted = c.delete(pb::DeleteRequest { r#ref: r("ConfigMap", "default", "race"), ..Default::default() }).await;
    assert!(deleted.is_ok(), "a delete without preconditions failed: {:?}", deleted.err());
    for u in racers {
        if let Err(s) = u.await.unwrap() {
            assert!(matches!(s.code(), tonic::Code::Aborted | tonic::Code::NotFound), "{s:?}");
        }
    }
    let after = c.update(pb::UpdateRequest { object: Some(config_map("default", "race")) }).await.unwrap_err();
    assert_eq!(after.code(), tonic::Code::NotFound, "{after:?}");
}

/// A Watch response pulls from the store's hub as the client reads. A client that goes away,
/// even on a quiet range, must give its place in the hub back, or every dropped watch would
/// leak a queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_the_client_drops_releases_its_place_in_the_hub() {
    let api = start().await;
    let before = api._server.store.watcher_count();
    let watch = |ns: &str| pb::WatchObjectsRequest {
        kind: "ConfigMap".into(),
        namespace: ns.into(),
        allow_bookmarks: true,
        ..Default::default()
    };
    let quiet = api.client.clone().watch(watch("kube-system")).await.unwrap().into_inner();
    let mut busy = api.client.clone().watch(watch("default")).await.unwrap().into_inner();
    let mut c = api.client.clone();
    c.create(pb::CreateRequest { object: Some(config_map("default", "seen")) }).await.unwrap();
    let ev = busy.message().await.unwrap().unwrap();
    assert_eq!(ev.r#type, "ADDED");
    assert_eq!(meta(ev.object.as_ref().unwrap()).name, "seen");
    assert_eq!(api._server.store.watcher_count(), before + 2);

    drop(quiet);
    drop(busy);
    eventually("both watches leave the hub", || {
        let n = api._server.store.watcher_count();
        async move { n == before }
    })
    .await;
}

/// An update, delete or apply sent to a follower whose own copy is behind is decided on the
/// latest state.
/// The follower reads locally first; that read can miss an object the leader has just
/// committed, or see an older revision, and must then not answer NotFound or Conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_a_lagging_follower_are_decided_on_the_latest_object() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_keel"));
    let mut c = keel::harness::ProcCluster::start(exe, dir.path(), 3, &[]).unwrap();
    let leader = c.wait_leader(Duration::from_secs(20)).await.unwrap();
    let admin = c.pki.admin.clone();
    keel::harness::wait_default_namespaces(&c.nodes[leader].addr, Duration::from_secs(20), &admin).await.unwrap();
    let follower = (leader + 1) % 3;
    let connect =
        |i: usize| ObjectsClient::new(keel::client::endpoint(&c.nodes[i].addr, &admin).unwrap().connect_lazy());
    let (mut via_leader, mut via_follower) = (connect(leader), connect(follower));
    via_follower.get(pb::GetRequest { r#ref: r("Namespace", "", "default") }).await.unwrap();
    for round in 0..5 {
        // The follower misses the create while it is stopped; the other two commit it.
        c.pause(follower, true).unwrap();
        let name = format!("lag-{round}");
        let created = via_leader.create(pb::CreateRequest { object: Some(config_map("default", &name)) }).await;
        c.pause(follower, false).unwrap();
        let created = created.unwrap().into_inner();
        let mut next = created.clone();
        if let Some(pb::object::Kind::ConfigMap(cm)) = next.kind.as_mut() {
            cm.data.insert("round".into(), round.to_string());
        }
        let updated = via_follower
            .update(pb::UpdateRequest { object: Some(next) })
            .await
            .unwrap_or_else(|s| panic!("round {round}: update through the follower: {s:?}"))
            .into_inner();
        assert!(
            meta(&updated).resource_version.parse::<i64>().unwrap()
                > meta(&created).resource_version.parse::<i64>().unwrap(),
            "round {round}: the update was written"
        );
        let Some(pb::object::Kind::ConfigMap(cm)) = updated.kind.clone() else { panic!("a ConfigMap") };
        assert_eq!(cm.data.get("round"), Some(&round.to_string()));

        // Now the follower holds the object but misses a newer revision of it: the caller's
        // (current) resourceVersion must not look like a conflict.
        c.pause(follower, true).unwrap();
        let mut newer = updated.clone();
        if let Some(pb::object::Kind::ConfigMap(cm)) = newer.kind.as_mut() {
            cm.data.insert("by".into(), "leader".into());
        }
        let newer = via_leader.update(pb::UpdateRequest { object: Some(newer) }).await;
        c.pause(follower, false).unwrap();
        let mut last = newer.unwrap().into_inner();
        if let Some(pb::object::Kind::ConfigMap(cm)) = last.kind.as_mut() {
            cm.data.insert("by".into(), "follower".into());
        }
        let last = via_follower
            .update(pb::UpdateRequest { object: Some(last) })
            .await
            .unwrap_or_else(|s| panic!("round {round}: update with the current resourceVersion: {s:?}"))
            .into_inner();
        let Some(pb::object::Kind::ConfigMap(cm)) = last.kind else { panic!("a ConfigMap") };
        assert_eq!(cm.data.get("by").map(String::as_str), Some("follower"));

        // A delete through the follower of an object it has not seen yet.
        c.pause(follower, true).unwrap();
        let gone = format!("gone-{round}");
        let created = via_leader.create(pb::CreateRequest { object: Some(config_map("default", &gone)) }).await;
        c.pause(follower, false).unwrap();
        let rv = meta(&created.unwrap().into_inner()).resource_version;
        let deleted = via_follower
            .delete(pb::DeleteRequest {
                r#ref: r("ConfigMap", "default", &gone),
                resource_version: rv,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("round {round}: delete through the follower: {s:?}"))
            .into_inner();
        assert!(deleted.deleted, "round {round}: no finalizers, so the object is gone");

        // Apply: the follower has an older version that equals the manifest, so its own copy
        // says "unchanged"; the latest version differs, and the apply must configure it.
        let manifest = |v: &str| {
            parse(&format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: ap-{round}, namespace: default}}\ndata: {{k: {v}}}\n"
            ))
        };
        via_leader.apply(apply_req(vec![manifest("a")])).await.unwrap();
        via_follower.get(pb::GetRequest { r#ref: r("ConfigMap", "default", &format!("ap-{round}")) }).await.unwrap();
        c.pause(follower, true).unwrap();
        let b = via_leader.apply(apply_req(vec![manifest("b")])).await;
        c.pause(follower, false).unwrap();
        assert_eq!(b.unwrap().into_inner().results[0].action, "configured");
        let back = via_follower
            .apply(apply_req(vec![manifest("a")]))
            .await
            .unwrap_or_else(|s| panic!("round {round}: apply through the follower: {s:?}"))
            .into_inner();
        assert_eq!(back.results[0].action, "configured", "round {round}: decided on a stale copy");
        let Some(pb::object::Kind::ConfigMap(cm)) = back.results[0].object.clone().and_then(|o| o.kind) else {
            panic!("a ConfigMap")
        };
        assert_eq!(cm.data.get("k").map(String::as_str), Some("a"));
    }
    c.kill_all();
}
