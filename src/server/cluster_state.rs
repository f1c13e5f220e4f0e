//! Cluster state that is not Kubernetes objects: one typed home for every key under `/keel/`
//! in the same store as the objects, with the record each key holds.
//!
//! ```text
//! /keel/cluster-id             the cluster's id (text)
//! /keel/pki/ca                 the CA certificate and key        CaRecord (JSON)
//! /keel/cert-lifetime          seconds replica and node certificates last (text)
//! /keel/next-replica-id        the next replica id to hand out (text)
//! /keel/tokens/<id>            a join token                       TokenRecord (JSON)
//! /keel/user-tokens/<id>       a user's bearer token              TokenRecord (JSON)
//! /keel/replicas/<name>        a replica's id and key fingerprint Registration (JSON)
//! /keel/nodes/<name>           a node's key fingerprint           Registration (JSON)
//! ```
//!
//! Everything that reads or writes these keys (the Cluster service, authentication of bearer
//! tokens, backups, certificate renewal) goes through this module, so none of them imports
//! another for a key name. It knows keys and records, not the services that use them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tonic::Status;

use super::status::from_store;
use crate::pki::{Ca, JoinToken};
use crate::proto::v1 as pb;
use crate::store::Store;

pub const PREFIX: &str = "/keel/";
pub const CLUSTER_ID: &str = "/keel/cluster-id";
pub const CA: &str = "/keel/pki/ca";
pub const CERT_LIFETIME: &str = "/keel/cert-lifetime";
pub const NEXT_REPLICA_ID: &str = "/keel/next-replica-id";
pub const JOIN_TOKENS: &str = "/keel/tokens/";
pub const USER_TOKENS: &str = "/keel/user-tokens/";
pub const REPLICAS: &str = "/keel/replicas/";
pub const NODES: &str = "/keel/nodes/";

/// Lifetime of replica and node certificates when the cluster has no setting (a year).
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

pub fn join_token_key(id: &str) -> String {
    format!("{JOIN_TOKENS}{id}")
}

pub fn user_token_key(id: &str) -> String {
    format!("{USER_TOKENS}{id}")
}

pub fn replica_key(name: &str) -> String {
    format!("{REPLICAS}{name}")
}

pub fn node_key(name: &str) -> String {
    format!("{NODES}{name}")
}

/// The cluster CA at [`CA`].
#[derive(Serialize, Deserialize)]
pub struct CaRecord {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CaRecord {
    pub fn of(ca: &Ca) -> CaRecord {
        CaRecord { cert_pem: ca.cert_pem.clone(), key_pem: ca.key_pem.clone() }
    }

    pub fn into_ca(self) -> Ca {
        Ca { cert_pem: self.cert_pem, key_pem: self.key_pem }
    }
}

/// A join token or a user's bearer token: only a hash of its secret is kept.
#[derive(Serialize, Deserialize, Clone)]
pub struct TokenRecord {
    pub role: String,
    pub secret_sha256: String,
    /// Unix seconds; 0 never expires.
    pub expires: i64,
    pub created: String,
    #[serde(default)]
    pub description: String,
    /// User tokens: whom the token authenticates.
    #[serde(default)]
    pub user: String,
}

impl TokenRecord {
    /// What is kept of a token issued now: its role, a hash of its secret, and when it
    /// expires (`ttl_seconds` 0: never).
    pub fn issued(t: &JoinToken, role: &str, ttl_seconds: u64, description: String, user: String) -> TokenRecord {
        TokenRecord {
            role: role.to_string(),
            secret_sha256: t.secret_hash(),
            expires: if ttl_seconds == 0 { 0 } else { unix_now() + ttl_seconds as i64 },
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            description,
            user,
        }
    }

    /// Whether `secret_sha256` is this token's, compared in constant time so that the time
    /// taken does not say how much matched.
    pub fn secret_matches(&self, given_sha256: &str) -> bool {
        given_sha256.len() == self.secret_sha256.len()
            && given_sha256.bytes().zip(self.secret_sha256.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    pub fn expired(&self) -> bool {
        self.expires != 0 && unix_now() >= self.expires
    }
}

/// A name bound to a key: a replica (with its id) or a node.
#[derive(Serialize, Deserialize, Clone)]
pub struct Registration {
    /// Replicas only.
    #[serde(default)]
    pub id: u64,
    pub fingerprint: String,
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

pub fn rfc3339(unix: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64)).to_string()
}

/// The stored form of a JSON record. Our records are plain structs of strings and numbers,
/// which serde_json always encodes.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

pub fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], value: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(value)
        .map_err(|e| Status::internal(format!("{} is damaged: {e}", String::from_utf8_lossy(key))))
}

/// A linearizable read of one key.
pub async fn read(store: &Store, key: &str) -> Result<Option<pb::KeyValue>, Status> {
    let r = store.range(pb::RangeRequest { key: key.into(), ..Default::default() }).await.map_err(from_store)?;
    Ok(r.kvs.into_iter().next())
}

/// A record and the revision it was written at.
pub async fn read_record<T: for<'de> Deserialize<'de>>(store: &Store, key: &str) -> Result<Option<(T, i64)>, Status> {
    match read(store, key).await? {
        None => Ok(None),
        Some(kv) => decode(&kv.key, &kv.value).map(|v| Some((v, kv.mod_revision))),
    }
}

/// The cluster's certificate lifetime for replicas and nodes, if the store answers.
pub async fn stored_cert_lifetime(store: &Store) -> Option<Duration> {
    let kv = read(store, CERT_LIFETIME).await.ok()??;
    String::from_utf8_lossy(&kv.value).parse().map(Duration::from_secs).ok()
}

/// The cluster's certificate lifetime for replicas and nodes (a year unless set).
pub async fn cert_lifetime(store: &Store) -> Duration {
    stored_cert_lifetime(store).await.unwrap_or(DEFAULT_CERT_LIFETIME)
}

/// The cluster id among a copy of the store's keys (a backup's).
pub fn cluster_id_in(kvs: &[pb::KeyValue]) -> String {
    kvs.iter()
        .find(|kv| kv.key == CLUSTER_ID.as_bytes())
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .unwrap_or_default()
}

/// The CA among a copy of the store's keys (a backup's).
pub fn ca_in(kvs: &[pb::KeyValue]) -> Option<Ca> {
    let kv = kvs.iter().find(|kv| kv.key == CA.as_bytes())?;
    decode::<CaRecord>(&kv.key, &kv.value).ok().map(CaRecord::into_ca)
}
