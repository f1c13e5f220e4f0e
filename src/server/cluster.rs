//! The `keel.v1.Cluster` service: join by token, promotion to voter, join tokens,
//! membership and status.
//!
//! Cluster state lives in the store under `/keel/`, next to the objects (see
//! `cluster_state` for every key and its record).
//!
//! A name is bound to a key: a replica or node that joins again under its name with the
//! same key gets its identity back; another key is refused with the command that removes
//! the old registration.

use std::collections::BTreeSet;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::auth::{caller, unauthenticated};
use super::cluster_state::{
    self as state, cert_lifetime, read, read_record, rfc3339, unix_now, CaRecord, Registration, TokenRecord,
    CLUSTER_ID, JOIN_TOKENS, NEXT_REPLICA_ID, REPLICAS, USER_TOKENS,
};
use super::status::from_store;
use crate::client::{Client, ClientAuth, ClientConfig, ClientError};
use crate::pki::{self, Ca, Credentials, Identity, JoinToken, TokenRole};
use crate::proto::v1 as pb;
use crate::store::{delete_op, exists, mod_equals, prefix_request, put_op, Member, Store};

/// Writes a new cluster's state (id, CA, the first replica's registration, a server and an
/// agent token) into the store of its first replica. Returns the two tokens.
pub async fn initialize(
    store: &Store,
    ca: &Ca,
    cluster_id: &str,
    name: &str,
    id: u64,
    creds: &Credentials,
    cert_lifetime: Duration,
) -> Result<(JoinToken, JoinToken), Status> {
    let ca_hash = ca.hash().map_err(|e| Status::internal(e.to_string()))?;
    let server = JoinToken::generate(&ca_hash, TokenRole::Server);
    let agent = JoinToken::generate(&ca_hash, TokenRole::Agent);
    let fingerprint = pki::key_fingerprint(&creds.cert_pem).map_err(|e| Status::internal(e.to_string()))?;
    let token = |t: &JoinToken, what: &str| {
        TokenRecord::issued(t, &t.role.to_string(), 0, format!("created by --cluster-init ({what})"), String::new())
    };
    let txn = pb::TxnRequest {
        // Only once: a cluster that has an id keeps it.
        compare: vec![mod_equals(CLUSTER_ID, 0)],
        success: vec![
            put_op(CLUSTER_ID, cluster_id.as_bytes().to_vec()),
            put_op(state::CA, state::encode(&CaRecord::of(ca))),
            put_op(&state::replica_key(name), state::encode(&Registration { id, fingerprint })),
            put_op(NEXT_REPLICA_ID, (id + 1).to_string().into_bytes()),
            put_op(state::CERT_LIFETIME, cert_lifetime.as_secs().to_string().into_bytes()),
            put_op(&state::join_token_key(&server.id), state::encode(&token(&server, "servers"))),
            put_op(&state::join_token_key(&agent.id), state::encode(&token(&agent, "agents"))),
        ],
        failure: vec![],
    };
    // The replica has just started: retry until it leads itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match store.txn(txn.clone(), true).await {
            Ok(r) if r.succeeded => return Ok((server, agent)),
            Ok(_) => return Err(Status::already_exists("this cluster was initialized before")),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "cluster state not written yet; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(from_store(e)),
        }
    }
}

/// Writes a backup's keys into the store of a new cluster's first replica, which becomes the
/// only registered replica. Values are copied as they are (Secrets stay sealed); revisions
/// start over. Returns the number of keys written.
pub async fn load_backup(
    store: &Store,
    payload: &pb::BackupPayload,
    name: &str,
    id: u64,
    creds: &Credentials,
) -> Result<usize, Status> {
    let kvs = payload.data.as_ref().map(|d| d.kvs.as_slice()).unwrap_or_default();
    let keep = |k: &[u8]| !k.starts_with(REPLICAS.as_bytes()) && k != NEXT_REPLICA_ID.as_bytes();
    let kept: Vec<&pb::KeyValue> = kvs.iter().filter(|kv| keep(&kv.key)).collect();
    let fingerprint = pki::key_fingerprint(&creds.cert_pem).map_err(|e| Status::internal(e.to_string()))?;
    let mut ops: Vec<pb::RequestOp> = kept
        .iter()
        .map(|kv| pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: kv.key.clone(),
                value: kv.value.clone(),
                prev_kv: false,
            })),
        })
        .collect();
    ops.push(put_op(&state::replica_key(name), state::encode(&Registration { id, fingerprint })));
    ops.push(put_op(NEXT_REPLICA_ID, (id + 1).to_string().into_bytes()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for batch in ops.chunks(256) {
        let txn = pb::TxnRequest { compare: vec![], success: batch.to_vec(), failure: vec![] };
        loop {
            match store.txn(txn.clone(), true).await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "restore write not done yet; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(from_store(e)),
            }
        }
    }
    Ok(kept.len())
}

pub struct ClusterService {
    store: Store,
    /// This replica's own credentials (they renew), to ask other replicas for their status.
    creds: std::sync::Arc<pki::LiveCredentials>,
    keys: std::sync::Arc<crate::seal::Keyring>,
    /// One membership change at a time from this replica.
    membership: tokio::sync::Mutex<()>,
}

impl ClusterService {
    pub fn new(
        store: Store,
        creds: std::sync::Arc<pki::LiveCredentials>,
        keys: std::sync::Arc<crate::seal::Keyring>,
    ) -> ClusterService {
        ClusterService { store, creds, keys, membership: tokio::sync::Mutex::new(()) }
    }

    async fn ca(&self) -> Result<Ca, Status> {
        let (ca, _) = read_record::<CaRecord>(&self.store, state::CA).await?.ok_or_else(|| {
            Status::failed_precondition("this cluster has no CA in its store (it was not started with --cluster-init)")
        })?;
        Ok(ca.into_ca())
    }

    /// Checks a join token; returns its role.
    async fn check_token(&self, token: &JoinToken, ca: &Ca) -> Result<TokenRole, Status> {
        let hash = ca.hash().map_err(|e| Status::internal(e.to_string()))?;
        if token.ca_hash != hash {
            return Err(Status::permission_denied(
                "the join token belongs to another cluster: its CA hash does not match this cluster's CA",
            ));
        }
        let key = state::join_token_key(&token.id);
        let (stored, _) = read_record::<TokenRecord>(&self.store, &key).await?.ok_or_else(|| {
            Status::unauthenticated(format!("join token {:?} is not valid: it does not exist or was revoked", token.id))
        })?;
        if !stored.secret_matches(&token.secret_hash()) {
            return Err(Status::unauthenticated(format!("join token {:?}: wrong secret", token.id)));
        }
        if stored.expired() {
            return Err(Status::unauthenticated(format!(
                "join token {:?} expired at {}; create a new one with `keelctl token create --role {}`",
                token.id,
                rfc3339(stored.expires),
                stored.role
            )));
        }
        let role: TokenRole = stored.role.parse().map_err(|e: pki::PkiError| Status::internal(e.to_string()))?;
        if role != token.role {
            return Err(Status::unauthenticated(format!("join token {:?}: wrong role", token.id)));
        }
        Ok(role)
    }

    fn members(&self) -> (BTreeSet<u64>, BTreeSet<u64>) {
        let st = self.store.status();
        let voters = st.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
        let all = st.members.iter().map(|m| m.id).collect();
        (voters, all)
    }

    /// Binds `name` to `fingerprint` and returns its replica id (the old one on a rejoin).
    async fn register_replica(&self, name: &str, fingerprint: &str) -> Result<u64, Status> {
        let key = state::replica_key(name);
        for _ in 0..10 {
            let existing = read_record::<Registration>(&self.store, &key).await?;
            let (_, members) = self.members();
            let (id, mut compare, mut ops) = match existing {
                Some((reg, _)) if reg.fingerprint == fingerprint => return Ok(reg.id),
                Some((reg, _)) if members.contains(&reg.id) => {
                    return Err(Status::already_exists(format!(
                        "replica name {name:?} belongs to member {} with another key. If that replica is gone for good, \
                         remove it with `keelctl cluster remove {}` and join again; otherwise start this one with another --name",
                        reg.id, reg.id
                    )))
                }
                // Registered but never became a member (a join that failed half way): the
                // name is free again, the id is kept.
                Some((reg, rev)) => (reg.id, vec![mod_equals(&key, rev)], vec![]),
                None => {
                    let next = read(&self.store, NEXT_REPLICA_ID).await?;
                    let (stored_next, rev) = next
                        .map(|kv| (String::from_utf8_lossy(&kv.value).parse::<u64>().unwrap_or(1), kv.mod_revision))
                        .unwrap_or((1, 0));
                    let id = stored_next.max(members.iter().max().map_or(1, |m| m + 1));
                    (
                        id,
                        vec![mod_equals(&key, 0), mod_equals(NEXT_REPLICA_ID, rev)],
                        vec![put_op(NEXT_REPLICA_ID, (id + 1).to_string().into_bytes())],
                    )
                }
            };
            ops.push(put_op(&key, state::encode(&Registration { id, fingerprint: fingerprint.to_string() })));
            compare.retain(|c| !c.key.is_empty());
            let r = self.store.txn(pb::TxnRequest { compare, success: ops, failure: vec![] }, true).await;
            if r.map_err(from_store)?.succeeded {
                return Ok(id);
            }
        }
        Err(Status::aborted("replica registrations kept changing; retry the join"))
    }

    async fn register_node(&self, name: &str, fingerprint: &str) -> Result<(), Status> {
        let key = state::node_key(name);
        let rev = match read_record::<Registration>(&self.store, &key).await? {
            Some((reg, _)) if reg.fingerprint == fingerprint => return Ok(()),
            Some(_) => {
                return Err(Status::already_exists(format!(
                    "node name {name:?} is registered with another key. If that machine is gone for good, remove it with \
                     `keelctl cluster remove node/{name}` and join again; otherwise start this agent with another --name"
                )))
            }
            None => 0,
        };
        let txn = pb::TxnRequest {
            compare: vec![mod_equals(&key, rev)],
            success: vec![put_op(&key, state::encode(&Registration { id: 0, fingerprint: fingerprint.to_string() }))],
            failure: vec![],
        };
        if self.store.txn(txn, true).await.map_err(from_store)?.succeeded {
            Ok(())
        } else {
            Err(Status::aborted(format!("node {name:?} registered concurrently; retry the join")))
        }
    }

    fn replica_caller<T>(req: &Request<T>) -> Result<u64, Status> {
        match caller(req) {
            Some(Identity::Replica(id)) => Ok(*id),
            Some(other) => Err(Status::permission_denied(format!("{other} is not a replica"))),
            None => Err(unauthenticated()),
        }
    }

    fn admin_caller<T>(req: &Request<T>) -> Result<(), Status> {
        match caller(req) {
            Some(id) if id.is_admin() || id.is_replica() => Ok(()),
            Some(other) => Err(Status::permission_denied(format!("{other} may not manage the cluster"))),
            None => Err(unauthenticated()),
        }
    }

    /// A client of the replica at `addr`, as this replica.
    fn peer(&self, addr: &str, timeout: Duration) -> Result<Client, ClientError> {
        let config = ClientConfig {
            request_timeout: timeout,
            connect_timeout: Duration::from_millis(500),
            retry_for: Duration::ZERO,
            local_address: None,
        };
        Client::new(&[addr.to_string()], ClientAuth::Live(self.creds.clone()), config)
    }

    async fn status_of(&self, addr: &str) -> Result<pb::StoreStatusResponse, String> {
        let client = self.peer(addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        client.status_of(0).await.map_err(|e| e.message())
    }

    /// Stores a newly issued token under `key`, which must be free (ids are random).
    async fn store_new_token(&self, key: &str, stored: &TokenRecord) -> Result<(), Status> {
        let txn = pb::TxnRequest {
            compare: vec![mod_equals(key, 0)],
            success: vec![put_op(key, state::encode(stored))],
            failure: vec![],
        };
        if !self.store.txn(txn, true).await.map_err(from_store)?.succeeded {
            return Err(Status::aborted("token id collision; retry"));
        }
        Ok(())
    }

    /// Deletes `key` if it exists; whether it did.
    async fn delete_if_present(&self, key: &str) -> Result<bool, Status> {
        let txn = pb::TxnRequest { compare: vec![exists(key)], success: vec![delete_op(key)], failure: vec![] };
        Ok(self.store.txn(txn, true).await.map_err(from_store)?.succeeded)
    }

    /// A bearer token for a user: `<id>.<secret>`; only a hash of the secret is stored.
    async fn create_user_token(&self, r: pb::CreateTokenRequest) -> Result<pb::CreateTokenResponse, Status> {
        if !crate::api::validation::is_dns1123_subdomain(&r.user) {
            return Err(Status::invalid_argument(format!("user {:?}: a lowercase RFC 1123 name is required", r.user)));
        }
        let t = JoinToken::generate("", TokenRole::Agent);
        let stored = TokenRecord::issued(&t, "user", r.ttl_seconds, r.description, r.user);
        self.store_new_token(&state::user_token_key(&t.id), &stored).await?;
        Ok(pb::CreateTokenResponse { token: format!("{}.{}", t.id, t.secret), info: Some(token_info(&t.id, &stored)) })
    }

    async fn name_of(&self, id: u64) -> Result<Option<String>, Status> {
        let r = self.store.range(prefix_request(REPLICAS)).await.map_err(from_store)?;
        for kv in r.kvs {
            if serde_json::from_slice::<Registration>(&kv.value).is_ok_and(|reg| reg.id == id) {
                return Ok(Some(String::from_utf8_lossy(&kv.key[REPLICAS.len()..]).into_owned()));
            }
        }
        Ok(None)
    }
}

fn token_info(id: &str, t: &TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id: id.to_string(),
        role: t.role.clone(),
        expires: if t.expires == 0 { String::new() } else { rfc3339(t.expires) },
        created: t.created.clone(),
        description: t.description.clone(),
        user: t.user.clone(),
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let r = request.into_inner();
        let token: JoinToken = r.token.parse().map_err(|e: pki::PkiError| Status::invalid_argument(e.to_string()))?;
        let role: TokenRole = r.role.parse().map_err(|e: pki::PkiError| Status::invalid_argument(e.to_string()))?;
        if !crate::api::validation::is_dns1123_subdomain(&r.name) {
            return Err(Status::invalid_argument(format!(
                "name {:?}: must be a lowercase RFC 1123 subdomain (letters, digits, '-' and '.')",
                r.name
            )));
        }
        let ca = self.ca().await?;
        let token_role = self.check_token(&token, &ca).await?;
        // A server token may join agents too (as with k3s); an agent token only agents.
        if role == TokenRole::Server && token_role != TokenRole::Server {
            return Err(Status::permission_denied("an agent token cannot join a server; use a server token"));
        }
        let fingerprint = pki::request_fingerprint(&r.csr_pem).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cluster_id = read(&self.store, CLUSTER_ID)
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default();
        let lifetime = cert_lifetime(&self.store).await;
        let sign = |id: &Identity, addrs: &[String]| {
            ca.sign_request(&r.csr_pem, id, lifetime, addrs).map_err(|e| Status::invalid_argument(e.to_string()))
        };
        match role {
            TokenRole::Server => {
                if r.advertise.is_empty() {
                    return Err(Status::invalid_argument("advertise: Required value for a server"));
                }
                let id = self.register_replica(&r.name, &fingerprint).await?;
                let cert = sign(&Identity::Replica(id), std::slice::from_ref(&r.advertise))?;
                tracing::info!(name = r.name, id, "replica joined");
                Ok(Response::new(pb::JoinResponse {
                    certificate_pem: cert,
                    ca_pem: ca.cert_pem.clone(),
                    replica_id: id,
                    cluster_id,
                    ca_key_pem: ca.key_pem.clone(),
                    secrets_keys: self.keys.text().to_string(),
                    epoch: self.store.epoch().to_string(),
                }))
            }
            TokenRole::Agent => {
                self.register_node(&r.name, &fingerprint).await?;
                let cert = sign(&Identity::Node(r.name.clone()), &[])?;
                tracing::info!(name = r.name, "node joined");
                Ok(Response::new(pb::JoinResponse {
                    certificate_pem: cert,
                    ca_pem: ca.cert_pem.clone(),
                    replica_id: 0,
                    cluster_id,
                    ca_key_pem: String::new(),
                    secrets_keys: String::new(),
                    epoch: String::new(),
                }))
            }
        }
    }

    async fn promote(&self, request: Request<pb::PromoteRequest>) -> Result<Response<pb::PromoteResponse>, Status> {
        let id = Self::replica_caller(&request)?;
        let advertise = request.into_inner().advertise;
        if advertise.is_empty() {
            return Err(Status::invalid_argument("advertise: Required value"));
        }
        let _one = self.membership.lock().await;
        let name = self.name_of(id).await?.unwrap_or_else(|| format!("replica-{id}"));
        let member = Member { addr: advertise.clone(), name };
        let st = self.store.status();
        let current = st.members.iter().find(|m| m.id == id);
        let mut action = "unchanged";
        let mut membership = None;
        match current {
            Some(m) => {
                if m.node.as_ref().map(|n| n.addr.as_str()) != Some(advertise.as_str()) {
                    let req = pb::ChangeMembershipRequest {
                        set_nodes: [(id, crate::store::member_to_pb(&member))].into(),
                        ..Default::default()
                    };
                    membership = self.store.change_members(req).await.map_err(from_store)?.membership;
                    action = "address updated";
                }
                if !m.voter {
                    let req = pb::ChangeMembershipRequest { add_voters: vec![id], ..Default::default() };
                    membership = self.store.change_members(req).await.map_err(from_store)?.membership;
                    action = "promoted";
                }
            }
            None => {
                // Catch up as a learner first, so that the new voter never slows the quorum.
                self.store.add_learner(id, member, true).await.map_err(from_store)?;
                let req = pb::ChangeMembershipRequest { add_voters: vec![id], ..Default::default() };
                membership = self.store.change_members(req).await.map_err(from_store)?.membership;
                action = "added";
            }
        }
        tracing::info!(id, action, "replica membership");
        Ok(Response::new(pb::PromoteResponse { membership, action: action.to_string() }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        Self::admin_caller(&request)?;
        let r = request.into_inner();
        if r.role == "user" {
            return self.create_user_token(r).await.map(Response::new);
        }
        let role: TokenRole = r.role.parse().map_err(|e: pki::PkiError| Status::invalid_argument(e.to_string()))?;
        let ca = self.ca().await?;
        let token = JoinToken::generate(&ca.hash().map_err(|e| Status::internal(e.to_string()))?, role);
        let stored = TokenRecord::issued(&token, &role.to_string(), r.ttl_seconds, r.description, String::new());
        self.store_new_token(&state::join_token_key(&token.id), &stored).await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: token.to_string(),
            info: Some(token_info(&token.id, &stored)),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        Self::admin_caller(&request)?;
        let r = self.store.range(prefix_request(JOIN_TOKENS)).await.map_err(from_store)?;
        let users = self.store.range(prefix_request(USER_TOKENS)).await.map_err(from_store)?;
        let tokens = r
            .kvs
            .iter()
            .map(|kv| (JOIN_TOKENS.len(), kv))
            .chain(users.kvs.iter().map(|kv| (USER_TOKENS.len(), kv)))
            .filter_map(|(n, kv)| {
                let t: TokenRecord = serde_json::from_slice(&kv.value).ok()?;
                Some(token_info(&String::from_utf8_lossy(&kv.key[n..]), &t))
            })
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        Self::admin_caller(&request)?;
        let id = request.into_inner().id;
        for prefix in [JOIN_TOKENS, USER_TOKENS] {
            if self.delete_if_present(&format!("{prefix}{id}")).await? {
                return Ok(Response::new(pb::RevokeTokenResponse {}));
            }
        }
        Err(Status::not_found(format!("token {id:?} not found")))
    }

    async fn members(&self, request: Request<pb::MembersRequest>) -> Result<Response<pb::MembersResponse>, Status> {
        Self::admin_caller(&request)?;
        let local = self.store.status();
        // The leader's view has replication progress and last contact.
        let leader_view = match local.members.iter().find(|m| m.id == local.leader_id) {
            Some(_) if local.leader_id == local.id => Some(local.clone()),
            Some(m) => self.status_of(&m.node.clone().unwrap_or_default().addr).await.ok(),
            None => None,
        };
        let view = leader_view.as_ref().unwrap_or(&local);
        let mut members = Vec::new();
        for m in &view.members {
            let node = m.node.clone().unwrap_or_default();
            let (status, error) = if m.id == local.id {
                (Some(local.clone()), String::new())
            } else {
                match self.status_of(&node.addr).await {
                    Ok(s) => (Some(s), String::new()),
                    Err(e) => (None, e),
                }
            };
            members.push(pb::MemberInfo {
                id: m.id,
                name: node.name,
                address: node.addr,
                role: if m.voter { "voter" } else { "learner" }.into(),
                status,
                error,
                last_contact_ms: m.last_contact_ms,
            });
        }
        Ok(Response::new(pb::MembersResponse { members, leader_id: view.leader_id }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        Self::admin_caller(&request)?;
        let r = request.into_inner();
        if !r.node.is_empty() {
            let key = state::node_key(&r.node);
            let node_key = format!("/registry/nodes/{}", r.node);
            let txn = pb::TxnRequest {
                compare: vec![exists(&key)],
                success: vec![delete_op(&key), delete_op(&node_key)],
                failure: vec![],
            };
            if !self.store.txn(txn, true).await.map_err(from_store)?.succeeded {
                return Err(Status::not_found(format!("node {:?} is not registered", r.node)));
            }
            return Ok(Response::new(pb::RemoveMemberResponse { membership: None }));
        }
        let id = r.id;
        let _one = self.membership.lock().await;
        let (voters, all) = self.members();
        if !all.contains(&id) && self.name_of(id).await?.is_none() {
            return Err(Status::not_found(format!("replica {id} is not a member")));
        }
        if voters.contains(&id) && all.contains(&id) {
            if voters.len() == 1 {
                return Err(Status::failed_precondition("cannot remove the last voter"));
            }
            let req = pb::ChangeMembershipRequest { remove_voters: vec![id], retain: false, ..Default::default() };
            self.store.change_members(req).await.map_err(from_store)?;
        }
        let (_, all) = self.members();
        let mut membership = None;
        if all.contains(&id) {
            let req = pb::ChangeMembershipRequest { remove_nodes: vec![id], ..Default::default() };
            membership = self.store.change_members(req).await.map_err(from_store)?.membership;
        }
        // Free its name: the registration goes with the member.
        if let Some(name) = self.name_of(id).await? {
            let del = pb::TxnRequest {
                compare: vec![],
                success: vec![delete_op(&state::replica_key(&name))],
                failure: vec![],
            };
            self.store.txn(del, true).await.map_err(from_store)?;
        }
        Ok(Response::new(pb::RemoveMemberResponse { membership }))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        Self::admin_caller(&request)?;
        let id = request.into_inner().id;
        let (voters, _) = self.members();
        if !voters.contains(&id) {
            return Err(Status::invalid_argument(format!("replica {id} is not a voter")));
        }
        if self.store.current_leader() == Some(id) {
            return Ok(Response::new(pb::TransferLeaderResponse { leader_id: id }));
        }
        if self.store.id() != id {
            // The target itself must start the election.
            let addr = self
                .store
                .status()
                .members
                .into_iter()
                .find(|m| m.id == id)
                .and_then(|m| m.node)
                .map(|n| n.addr)
                .ok_or_else(|| Status::not_found(format!("replica {id} has no address")))?;
            let client = self.peer(&addr, Duration::from_secs(10)).map_err(|e| Status::internal(e.to_string()))?;
            return match client.transfer_leader(pb::TransferLeaderRequest { id }).await {
                Ok(r) => Ok(Response::new(r)),
                Err(ClientError::Status { status, .. }) => Err(status),
                Err(e) => Err(Status::new(e.code().unwrap_or(tonic::Code::Unavailable), e.to_string())),
            };
        }
        let leader = self.store.campaign(Duration::from_secs(5)).await.map_err(from_store)?;
        if leader != id {
            return Err(Status::unavailable(format!(
                "replica {id} called an election but replica {leader} leads; the voters kept the current leader \
                 (its lease was still valid). Retry, or stop the leader to force a change"
            )));
        }
        Ok(Response::new(pb::TransferLeaderResponse { leader_id: leader }))
    }

    async fn reencrypt_secrets(
        &self,
        request: Request<pb::ReencryptSecretsRequest>,
    ) -> Result<Response<pb::ReencryptSecretsResponse>, Status> {
        Self::admin_caller(&request)?;
        const SECRETS: &str = "/registry/secrets/";
        let active = self.keys.active().to_string();
        let (mut resealed, mut unchanged) = (0, 0);
        let r = self.store.range(prefix_request(SECRETS)).await.map_err(from_store)?;
        for kv in r.kvs {
            if crate::seal::Keyring::sealed_with(&kv.value) == Some(active.as_str()) {
                unchanged += 1;
                continue;
            }
            let plain = self
                .keys
                .open(&kv.value)
                .map_err(|e| Status::failed_precondition(format!("{}: {e}", String::from_utf8_lossy(&kv.key))))?;
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            // Compare the revision read: a Secret written meanwhile is sealed with the
            // active key already.
            let txn = pb::TxnRequest {
                compare: vec![mod_equals(&key, kv.mod_revision)],
                success: vec![put_op(
                    &key,
                    self.keys.seal(&plain).map_err(|e| Status::internal(format!("re-seal {key}: {e}")))?,
                )],
                failure: vec![],
            };
            if self.store.txn(txn, true).await.map_err(from_store)?.succeeded {
                resealed += 1;
            } else {
                unchanged += 1;
            }
        }
        Ok(Response::new(pb::ReencryptSecretsResponse { resealed, unchanged, active_key: active }))
    }

    type SnapshotStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::SnapshotChunk, Status>> + Send>>;

    async fn snapshot(&self, request: Request<pb::SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        Self::admin_caller(&request)?;
        // One linearizable range over every key: a consistent copy at one revision.
        let payload = super::backup::take(&self.store, self.keys.text()).await.map_err(from_store)?;
        let bytes = prost::Message::encode_to_vec(&payload);
        let chunks: Vec<Result<pb::SnapshotChunk, Status>> =
            bytes.chunks(1 << 20).map(|c| Ok(pb::SnapshotChunk { data: c.to_vec() })).collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        let who = caller(&request).cloned().ok_or_else(unauthenticated)?;
        let Identity::Node(name) = &who else {
            return Err(Status::permission_denied(format!("{who} renews its certificate itself")));
        };
        let csr = request.into_inner().csr_pem;
        // The same key as registered: a renewal never changes who the node is.
        let fingerprint = pki::request_fingerprint(&csr).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key = state::node_key(name);
        match read_record::<Registration>(&self.store, &key).await? {
            Some((reg, _)) if reg.fingerprint == fingerprint => {}
            Some(_) => {
                return Err(Status::permission_denied(
                    "the signing request is for another key than node's registration",
                ))
            }
            None => return Err(Status::permission_denied(format!("node {name:?} is not registered"))),
        }
        let ca = self.ca().await?;
        let lifetime = cert_lifetime(&self.store).await;
        let cert = ca.sign_request(&csr, &who, lifetime, &[]).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::RenewCertificateResponse { certificate_pem: cert, ca_pem: ca.cert_pem }))
    }

    async fn certificates(
        &self,
        request: Request<pb::CertificatesRequest>,
    ) -> Result<Response<pb::CertificatesResponse>, Status> {
        Self::admin_caller(&request)?;
        let now = unix_now();
        let info = |subject: String, pem: &str| -> Result<pb::CertificateInfo, Status> {
            let t = pki::not_after(pem).map_err(|e| Status::internal(e.to_string()))?;
            Ok(pb::CertificateInfo { subject, not_after: rfc3339(t), seconds_left: t - now })
        };
        let creds = self.creds.get();
        let own = creds.identity().map_or_else(|| "this replica".to_string(), |i| i.to_string());
        let certificates = vec![info("ca".into(), &creds.ca_pem)?, info(own, &creds.cert_pem)?];
        Ok(Response::new(pb::CertificatesResponse { certificates }))
    }
}
