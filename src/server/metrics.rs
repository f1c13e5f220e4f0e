//! Prometheus metrics over HTTPS (`keel server --metrics-listen`): Raft and store state,
//! certificate expiry (alert on `keel_certificate_expiry_seconds < 30 * 86400`), and what the
//! process's loops record through the `metrics` facade (per controller: `workqueue_depth`,
//! `workqueue_adds_total`, `workqueue_retries_total`, `keel_controller_reconcile_seconds`,
//! `keel_controller_reconcile_errors_total`; refused requests).
//!
//! Like every Keel port it speaks TLS with the replica's certificate and wants a client
//! certificate from the cluster CA (configure the scraper with one, e.g. an admin's).

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// The process-wide recorder that loops (controllers, the in-flight limit) record into,
/// installed once per process; None if something else installed one first.
pub fn global() -> Option<&'static PrometheusHandle> {
    static GLOBAL: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    GLOBAL
        .get_or_init(|| {
            let buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full("keel_controller_reconcile_seconds".into()), &buckets)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|_| handle)
        })
        .as_ref()
}

use crate::pki::{self, LiveCredentials};
use crate::store::Store;

/// The metrics text for this replica now.
pub fn render(recorder: &PrometheusRecorder, store: &Store, creds: &pki::Credentials) -> String {
    let st = store.status();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    metrics::with_local_recorder(recorder, || {
        metrics::gauge!("keel_raft_term").set(st.term as f64);
        metrics::gauge!("keel_raft_is_leader").set(f64::from(u8::from(st.leader_id == st.id && st.id != 0)));
        metrics::gauge!("keel_raft_last_log_index").set(st.last_log_index as f64);
        metrics::gauge!("keel_raft_commit_index").set(st.committed_index as f64);
        metrics::gauge!("keel_raft_applied_index").set(st.applied_index as f64);
        metrics::gauge!("keel_raft_voters").set(st.members.iter().filter(|m| m.voter).count() as f64);
        metrics::gauge!("keel_store_revision").set(st.revision as f64);
        for (subject, pem) in [("ca", &creds.ca_pem), ("replica", &creds.cert_pem)] {
            if let Ok(end) = pki::not_after(pem) {
                metrics::gauge!("keel_certificate_expiry_seconds", "certificate" => subject).set((end - now) as f64);
            }
        }
    });
    let mut text = recorder.handle().render();
    if let Some(g) = global() {
        text.push_str(&g.render());
    }
    text
}

/// Serves `/metrics` on `listen` until the task is aborted.
pub async fn serve(listen: SocketAddr, store: Store, creds: Arc<LiveCredentials>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let current = creds.get();
    let resolver = crate::tls::Resolver::new(&current).map_err(std::io::Error::other)?;
    let mut config =
        (*crate::tls::server_config(&current.ca_pem, resolver.clone()).map_err(std::io::Error::other)?).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let (mut incoming, _accept) = crate::tls::incoming(listener, Arc::new(config));
    let recorder = Arc::new(PrometheusBuilder::new().build_recorder());
    tokio::spawn(async move {
        let _accept = _accept;
        use tokio_stream::StreamExt;
        while let Some(Ok(conn)) = incoming.next().await {
            let authenticated = conn.peer_certs().is_some();
            // The listener's certificate follows renewals.
            let _ = resolver.replace(&creds.get());
            let (store, creds, recorder) = (store.clone(), creds.clone(), recorder.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (store, creds, recorder) = (store.clone(), creds.clone(), recorder.clone());
                    async move {
                        let (status, body) = if !authenticated {
                            (401, "a client certificate from the cluster CA is required\n".to_string())
                        } else if req.uri().path() != "/metrics" {
                            (404, "only /metrics is served here\n".to_string())
                        } else {
                            (200, render(&recorder, &store, &creds.get()))
                        };
                        hyper::Response::builder()
                            .status(status)
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(body)))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(conn);
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    Ok(addr)
}
