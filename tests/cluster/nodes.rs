//! Agents: join once with a token, then live on their node certificate; and the node
//! authorizer: a node touches only its own objects and the Secrets its pods use.

use std::time::Duration;

use keel::api::manifest;
use keel::pki::Credentials;
use keel::proto::v1 as pb;
use keel::proto::v1::objects_client::ObjectsClient;
use tonic::transport::Channel;
use tonic::Code;

use super::{admin, args, wait_for, Proc, Replica};

fn parse(yaml: &str) -> pb::Object {
    manifest::parse_document("test.yaml", &manifest::split(yaml)[0]).unwrap()
}

fn objects(addr: &str, creds: &Credentials) -> ObjectsClient<Channel> {
    ObjectsClient::new(keel::client::endpoint(addr, creds).unwrap().connect_lazy())
}

fn r(kind: &str, ns: &str, name: &str) -> Option<pb::ObjectRef> {
    Some(pb::ObjectRef { kind: kind.into(), namespace: ns.into(), name: name.into() })
}

fn agent(dir: &std::path::Path, name: &str, data: &str, server: &str, token: Option<&str>) -> Proc {
    let mut a = args(&format!("agent --name {name} --server {server} --data-dir {}", dir.join(data).display()));
    if let Some(t) = token {
        a.extend(["--token".to_string(), t.to_string()]);
    }
    // Agents share this machine's addresses: each kubelet server takes a free port.
    a.extend(["--runtime".to_string(), "fake".to_string(), "--kubelet-port".to_string(), "0".to_string()]);
    Proc::spawn(dir, data, &a)
}

fn pod(name: &str, node: &str, secret: &str, map: &str) -> pb::Object {
    parse(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  \
         - name: c\n    image: busybox\n    envFrom: [{{configMapRef: {{name: {map}}}}}]\n  volumes:\n  \
         - name: s\n    secret: {{secretName: {secret}}}\n"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_join_once_and_a_node_touches_only_what_is_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r1 = Replica::init(d, "r1");
    let token_path = r1.data.join("agent-token");
    wait_for("the agent token", Duration::from_secs(20), || async { token_path.exists().then_some(()) }).await;
    let creds = admin(&r1);
    let token = r1.token("agent-token");
    let mut adm = objects(&r1.addr, &creds);

    let a1 = agent(d, "n1", "a1", &r1.addr, Some(&token));
    let _a2 = agent(d, "n2", "a2", &r1.addr, Some(&token));
    for n in ["n1", "n2"] {
        let mut c = adm.clone();
        wait_for(&format!("node {n} Ready with a Lease"), Duration::from_secs(30), || {
            let mut c2 = c.clone();
            let mut c = c.clone();
            async move {
                let node = c.get(pb::GetRequest { r#ref: r("node", "", n) }).await.ok()?.into_inner();
                let ready = match node.kind? {
                    pb::object::Kind::Node(n) => {
                        n.status?.conditions.iter().any(|c| c.r#type == "Ready" && c.status == "True")
                    }
                    _ => false,
                };
                let lease = c2.get(pb::GetRequest { r#ref: r("lease", "kube-node-lease", n) }).await.ok()?;
                (ready && lease.into_inner().kind.is_some()).then_some(())
            }
        })
        .await;
        c = adm.clone();
        let _ = c;
    }
    // keelctl cluster certs lists the nodes' certificates too.
    let cfg = keel::server::bootstrap::DataDir::new(&r1.data).admin_config();
    let (ok, certs) = super::keelctl(&cfg, &["cluster", "certs"]);
    assert!(ok && certs.contains("node n1") && certs.contains("replica 1") && certs.contains("ca "), "{certs}");
    // The token is needed only once: a restart runs on the node certificate.
    drop(a1);
    let a1 = agent(d, "n1", "a1", &r1.addr, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a1.output().contains("Node n1 registered."), "{}", a1.output());

    // The same name with another key is refused, with the way out; after removal it joins.
    let (ok, out) = agent(d, "n1", "impostor", &r1.addr, Some(&token)).exit(Duration::from_secs(20)).await;
    assert!(!ok && out.contains("keelctl cluster remove node/n1"), "{out}");

    // Pods bound to each node, each using its own Secret and ConfigMap.
    for yaml in [
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s1}\nstringData: {k: one}\n",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s2}\nstringData: {k: two}\n",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c1}\ndata: {k: v}\n",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c2}\ndata: {k: v}\n",
    ] {
        adm.create(pb::CreateRequest { object: Some(parse(yaml)) }).await.unwrap();
    }
    adm.create(pb::CreateRequest { object: Some(pod("p1", "n1", "s1", "c1")) }).await.unwrap();
    adm.create(pb::CreateRequest { object: Some(pod("p2", "n2", "s2", "c2")) }).await.unwrap();

    let n1 = Credentials::load(&d.join("a1/tls")).unwrap();
    assert_eq!(n1.identity(), Some(keel::pki::Identity::Node("n1".into())));
    let mut node = objects(&r1.addr, &n1);
    let denied = |r: Result<tonic::Response<pb::Object>, tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e}");
        assert!(e.message().contains("User \"system:node:n1\""), "{}", e.message());
    };

    // Secrets and ConfigMaps: only those its own pods use, and one by one.
    node.get(pb::GetRequest { r#ref: r("secret", "default", "s1") }).await.unwrap();
    node.get(pb::GetRequest { r#ref: r("cm", "default", "c1") }).await.unwrap();
    denied(node.get(pb::GetRequest { r#ref: r("secret", "default", "s2") }).await, "another node's secret");
    denied(node.get(pb::GetRequest { r#ref: r("cm", "default", "c2") }).await, "another node's configmap");
    let list =
        node.list(pb::ListRequest { kind: "Secret".into(), namespace: "default".into(), ..Default::default() }).await;
    assert_eq!(list.unwrap_err().code(), Code::PermissionDenied, "no listing secrets");
    let watch = node
        .watch(pb::WatchObjectsRequest { kind: "Secret".into(), namespace: "default".into(), ..Default::default() })
        .await;
    assert_eq!(watch.err().map(|e| e.code()), Some(Code::PermissionDenied), "no watching secrets");
    // Other kinds it may read.
    node.get(pb::GetRequest { r#ref: r("pod", "default", "p2") }).await.unwrap();

    // Pods: the status of its own, nothing of others', never the spec.
    let set_phase = |mut p: pb::Object, phase: &str| {
        if let Some(pb::object::Kind::Pod(pod)) = p.kind.as_mut() {
            pod.status.get_or_insert_with(Default::default).phase = phase.into();
        }
        p
    };
    let p1 = adm.get(pb::GetRequest { r#ref: r("pod", "default", "p1") }).await.unwrap().into_inner();
    let p2 = adm.get(pb::GetRequest { r#ref: r("pod", "default", "p2") }).await.unwrap().into_inner();
    node.update_status(pb::UpdateRequest { object: Some(set_phase(p1.clone(), "Running")) }).await.unwrap();
    denied(
        node.update_status(pb::UpdateRequest { object: Some(set_phase(p2.clone(), "Failed")) }).await,
        "another node's pod status",
    );
    let mut relabel = p1.clone();
    keel::api::object::meta_mut(&mut relabel).unwrap().labels.insert("x".into(), "y".into());
    keel::api::object::meta_mut(&mut relabel).unwrap().resource_version.clear();
    denied(node.update(pb::UpdateRequest { object: Some(relabel) }).await, "a pod's spec or metadata");
    let del = node.delete(pb::DeleteRequest { r#ref: r("pod", "default", "p2"), ..Default::default() }).await;
    assert_eq!(del.unwrap_err().code(), Code::PermissionDenied, "another node's pod");

    // Nodes and Leases: its own only.
    let n2_node = adm.get(pb::GetRequest { r#ref: r("node", "", "n2") }).await.unwrap().into_inner();
    denied(node.update_status(pb::UpdateRequest { object: Some(n2_node) }).await, "another node's Node");
    let lease = parse(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {name: n2, namespace: kube-node-lease}\nspec: {holderIdentity: n1}\n",
    );
    denied(node.create(pb::CreateRequest { object: Some(lease) }).await, "another node's Lease");
    let own = node.get(pb::GetRequest { r#ref: r("node", "", "n1") }).await.unwrap().into_inner();
    node.update_status(pb::UpdateRequest { object: Some(own) }).await.unwrap();
    // Nor the store's internal API.
    let kv = pb::kv_client::KvClient::new(keel::client::endpoint(&r1.addr, &n1).unwrap().connect_lazy())
        .range(pb::RangeRequest { key: b"/".to_vec(), ..Default::default() })
        .await;
    assert_eq!(kv.unwrap_err().code(), Code::PermissionDenied);
    drop(a1);
}
