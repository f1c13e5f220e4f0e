//! No stuck learners: a replica that joined as a learner and then went away (its join
//! failed, it crashed while catching up) would stay in the membership forever, receiving
//! nothing. The leader removes a learner it has not heard from for `timeout`; the replica,
//! if it ever comes back, asks to be added again (`join::ensure_member`). Learners do not
//! vote, so this never touches the quorum; voters are never removed here.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::proto::v1 as pb;
use crate::store::Store;

pub async fn reap(store: Store, timeout: Duration) {
    let mut silent_since: HashMap<u64, Instant> = HashMap::new();
    loop {
        tokio::time::sleep((timeout / 4).max(Duration::from_millis(250))).await;
        if !store.is_leader() {
            silent_since.clear();
            continue;
        }
        let st = store.status();
        let learners: Vec<&pb::MemberStatus> = st.members.iter().filter(|m| !m.voter).collect();
        silent_since.retain(|id, _| learners.iter().any(|m| m.id == *id));
        for m in learners {
            // The leader's own view: -1 means it never heard from it.
            let heard = m.last_contact_ms >= 0 && (m.last_contact_ms as u128) < timeout.as_millis();
            if heard {
                silent_since.remove(&m.id);
                continue;
            }
            let since = *silent_since.entry(m.id).or_insert_with(Instant::now);
            if since.elapsed() < timeout {
                continue;
            }
            let req = pb::ChangeMembershipRequest { remove_nodes: vec![m.id], ..Default::default() };
            match store.change_members(req).await {
                Ok(_) => {
                    tracing::warn!(id = m.id, "removed a learner that stopped answering; it rejoins when it returns");
                    silent_since.remove(&m.id);
                }
                Err(e) => tracing::debug!(id = m.id, error = %e, "learner not removed yet"),
            }
        }
    }
}
