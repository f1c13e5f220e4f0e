//! Clients in another language: Python generated from proto/ alone, and Python that knows
//! only the address and discovers the API through gRPC reflection.

use std::process::Command;

fn python_ready() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools, grpc_reflection"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("KEEL_E2E").as_deref() != Ok("1"),
            "KEEL_E2E=1 but python3 with grpcio, grpcio-tools and grpcio-reflection is missing (scripts/setup.sh installs them)"
        );
        eprintln!("skipping: python3 grpcio not installed");
    }
    ok
}

fn run(script: &str, addr: &str, tls: &std::path::Path) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(script);
    let out = Command::new("python3").arg(&path).arg(addr).arg(tls).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_generated_from_the_protos_creates_updates_and_watches() {
    if !python_ready() {
        return;
    }
    let api = super::start().await;
    let addr = api.addr.clone();
    let tls = api.config.with_file_name("admin-tls");
    api.admin.save(&tls).unwrap();
    let out = tokio::task::spawn_blocking(move || run("python_client.py", &addr, &tls)).await.unwrap();
    assert!(out.contains("ADDED py-web (replicas 2), MODIFIED py-web (replicas 3)"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_that_only_uses_reflection_creates_updates_and_watches() {
    if !python_ready() {
        return;
    }
    let api = super::start().await;
    let addr = api.addr.clone();
    let tls = api.config.with_file_name("admin-tls");
    api.admin.save(&tls).unwrap();
    let out = tokio::task::spawn_blocking(move || run("python_reflection_client.py", &addr, &tls)).await.unwrap();
    assert!(out.contains("ADDED greeting='hello', MODIFIED greeting='hello again'"), "{out}");
}
