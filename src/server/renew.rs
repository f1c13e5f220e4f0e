//! Certificates that never brick the cluster: a replica renews its own certificate, for the
//! same key, once two thirds of its life have passed, and swaps it into its listener and its
//! connections to peers without a restart. Every replica holds the CA key, so none depends
//! on another to renew. A replica that was down past its certificate's end renews at start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::bootstrap::DataDir;
use crate::pki::{self, LiveCredentials};
use crate::store::Store;
use crate::tls::Resolver;

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Renews when a third of the lifetime is left; checks again in proportion to what is left.
pub async fn run(
    store: Store,
    live: Arc<LiveCredentials>,
    resolver: Arc<Resolver>,
    data_dir: PathBuf,
    advertise: String,
    addr: std::net::SocketAddr,
) {
    let mut last_event: Option<tokio::time::Instant> = None;
    loop {
        let creds = live.get();
        let Ok((not_before, not_after)) = pki::validity_of(&creds.cert_pem) else { return };
        // The cluster's setting; without a quorum to read it, the lifetime this certificate
        // was issued with (less the minute of clock slack in front).
        let lifetime = match super::cluster_state::stored_cert_lifetime(&store).await {
            Some(d) => d.as_secs() as i64,
            None => (not_after - not_before - 60).max(1),
        };
        let left = not_after - unix_now();
        if left <= lifetime / 3 {
            match renew(&creds, &data_dir, &advertise, lifetime) {
                Ok(next) => {
                    let until = pki::validity_of(&next.cert_pem).map(|v| v.1).unwrap_or(0);
                    if let Err(e) = resolver.replace(&next) {
                        tracing::warn!(error = %e, "renewed certificate not usable; keeping the old one");
                    } else {
                        store.set_peer_tls(next.client_tls());
                        live.set(next);
                        tracing::info!(valid_for_s = until - unix_now(), "certificate renewed");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, left_s = left, "certificate renewal failed; retrying");
                    // Renewal starts at a third of the life left; a certificate down to its
                    // last 30 days (or last quarter, for short test lifetimes) means renewal
                    // keeps failing: say so where operators look, at most every few minutes.
                    let due = left < (30 * 86_400).min(lifetime / 4);
                    let quiet = last_event
                        .is_none_or(|t| t.elapsed() > Duration::from_secs((lifetime as u64 / 10).clamp(5, 600)));
                    if due && quiet {
                        let who = creds.identity().map_or_else(|| "this replica".to_string(), |i| i.to_string());
                        let msg = format!(
                            "the certificate of {who} expires in {left}s and renewal fails: {e}; see docs/operations.md (certificates)"
                        );
                        match warning_event(addr, &creds, &who, &msg).await {
                            Ok(()) => last_event = Some(tokio::time::Instant::now()),
                            Err(s) => tracing::warn!(error = %s, "certificate warning event not written"),
                        }
                    }
                }
            }
        }
        let left = (not_after - unix_now()).max(0) as u64;
        let wait = Duration::from_secs((left / 6).clamp(1, 300));
        tokio::time::sleep(wait).await;
    }
}

/// A Warning Event in kube-system about this replica's certificate, written through the
/// Objects API as the replica.
async fn warning_event(
    addr: std::net::SocketAddr,
    creds: &pki::Credentials,
    who: &str,
    message: &str,
) -> Result<(), crate::client::ClientError> {
    use crate::proto::v1 as pb;
    let client = crate::client::Client::with_certificate(&[addr.to_string()], Duration::from_secs(10), creds)?;
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let name = who.replace(' ', "-");
    let event = pb::CoreEvent {
        metadata: Some(pb::ObjectMeta {
            generate_name: format!("{name}.cert-"),
            namespace: crate::api::wellknown::SYSTEM_NAMESPACE.into(),
            ..Default::default()
        }),
        involved_object: Some(pb::ObjectReference {
            kind: "Replica".into(),
            name,
            namespace: crate::api::wellknown::SYSTEM_NAMESPACE.into(),
            ..Default::default()
        }),
        reason: "CertificateExpiring".into(),
        message: message.to_string(),
        r#type: "Warning".into(),
        source: Some(pb::EventSource { component: "keel-server".into(), ..Default::default() }),
        first_timestamp: now.clone(),
        last_timestamp: now,
        count: 1,
        ..Default::default()
    };
    client.create(pb::Object { kind: Some(pb::object::Kind::Event(event)) }).await.map(|_| ())
}

fn renew(
    creds: &pki::Credentials,
    data_dir: &std::path::Path,
    advertise: &str,
    lifetime: i64,
) -> Result<pki::Credentials, String> {
    let dir = DataDir::new(data_dir);
    let ca = dir.load_ca().ok_or("this replica holds no CA key (tls/ca.key)")?;
    let identity = creds.identity().ok_or("the certificate names no identity")?;
    let next = ca
        .renew(creds, &identity, Duration::from_secs(lifetime.max(1) as u64), &[advertise.to_string()])
        .map_err(|e| e.to_string())?;
    pki::write_private(&dir.tls().join("tls.crt"), &next.cert_pem).map_err(|e| e.to_string())?;
    Ok(next)
}
