//! A replica's side of membership after it joined: become a voter at its address, through
//! any replica that answers. Safe to run at every start.

use std::time::Duration;

use crate::client::{Client, ClientAuth, ClientConfig};
use crate::pki::Credentials;
use crate::proto::v1 as pb;
use crate::store::Store;

/// Makes this replica a voter at `advertise`, through any replica that answers: the
/// `seeds` (the --server it joined through) and the members its own store knows. Returns
/// once the membership holds it as a voter at that address. Safe to run at every start.
pub async fn ensure_member(store: Store, creds: Credentials, advertise: String, seeds: Vec<String>) {
    let id = store.id();
    let mut delay = Duration::from_millis(200);
    loop {
        let st = store.status();
        let me = st.members.iter().find(|m| m.id == id);
        if me.is_some_and(|m| m.voter && m.node.as_ref().is_some_and(|n| n.addr == advertise)) {
            return;
        }
        let mut targets: Vec<String> = seeds.iter().map(|s| crate::client::bare_addr(s).to_string()).collect();
        targets
            .extend(st.members.iter().filter(|m| m.id != id).filter_map(|m| m.node.as_ref().map(|n| n.addr.clone())));
        targets.dedup();
        let config = ClientConfig {
            request_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(1),
            retry_for: Duration::ZERO,
            local_address: None,
        };
        let mut done = false;
        if let Ok(client) = Client::new(&targets, ClientAuth::Certificate(creds.clone()), config) {
            match client.promote(pb::PromoteRequest { advertise: advertise.clone() }).await {
                Ok(r) => {
                    tracing::info!(action = r.action, "membership confirmed");
                    done = true;
                }
                Err(e) => tracing::debug!(error = %e, "promotion not done yet"),
            }
        }
        // A single replica that moved leads itself: it updates its own address.
        if !done && st.members.len() == 1 && me.is_some() && store.is_leader() {
            let req = pb::ChangeMembershipRequest {
                set_nodes: [(
                    id,
                    pb::ReplicaNode {
                        addr: advertise.clone(),
                        name: me.and_then(|m| m.node.clone()).unwrap_or_default().name,
                    },
                )]
                .into(),
                ..Default::default()
            };
            done = store.change_members(req).await.is_ok();
        }
        if done {
            // Check again from the store's own view on the next turn.
            delay = Duration::from_millis(200);
        } else {
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        tokio::time::sleep(delay).await;
    }
}
