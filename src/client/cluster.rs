//! The Cluster API (membership, tokens, certificates, backups) and the store's internal KV
//! and administration APIs, through the same failover core as objects.

use crate::proto::v1 as pb;
use crate::proto::v1::cluster_client::ClusterClient;
use crate::proto::v1::kv_client::KvClient;

use super::retry::CallKind;
use super::{AuthChannel, Client, ClientError};

/// A unary call of the generated client `$api` as a method of `Client`, with the retry
/// policy of `$kind`.
macro_rules! unary {
    ($api:ident, $(#[$doc:meta])* $name:ident, $kind:expr, $req:ty => $resp:ty) => {
        $(#[$doc])*
        pub async fn $name(&self, req: $req) -> Result<$resp, ClientError> {
            let (r, _) = self
                .call($kind, |ch| {
                    let req = self.request(req.clone());
                    async move { $api::new(ch).$name(req).await }
                })
                .await?;
            Ok(r)
        }
    };
}

macro_rules! cluster_call {
    ($($t:tt)*) => { unary!(ClusterClient, $($t)*); };
}

macro_rules! kv_call {
    ($($t:tt)*) => { unary!(KvClient, $($t)*); };
}

impl Client {
    cluster_call!(
        /// Makes the calling replica a voter at its address; safe to repeat.
        promote, CallKind::Idempotent, pb::PromoteRequest => pb::PromoteResponse);
    cluster_call!(
        /// Prints once: a token created twice is two tokens, so an unknown outcome is not
        /// sent again.
        create_token, CallKind::Write, pb::CreateTokenRequest => pb::CreateTokenResponse);
    cluster_call!(list_tokens, CallKind::Read, pb::ListTokensRequest => pb::ListTokensResponse);
    cluster_call!(revoke_token, CallKind::Write, pb::RevokeTokenRequest => pb::RevokeTokenResponse);
    cluster_call!(members, CallKind::Read, pb::MembersRequest => pb::MembersResponse);
    cluster_call!(remove_member, CallKind::Write, pb::RemoveMemberRequest => pb::RemoveMemberResponse);
    cluster_call!(transfer_leader, CallKind::Write, pb::TransferLeaderRequest => pb::TransferLeaderResponse);
    cluster_call!(certificates, CallKind::Read, pb::CertificatesRequest => pb::CertificatesResponse);
    cluster_call!(
        /// Re-seals every Secret with the active key; repeating it re-seals nothing more.
        reencrypt_secrets, CallKind::Idempotent, pb::ReencryptSecretsRequest => pb::ReencryptSecretsResponse);
    cluster_call!(
        /// Signs a new certificate for the caller's own key; a second one is as good.
        renew_certificate, CallKind::Idempotent, pb::RenewCertificateRequest => pb::RenewCertificateResponse);

    /// A backup of the whole store, streamed in chunks from one replica.
    pub async fn snapshot(&self) -> Result<Vec<u8>, ClientError> {
        let (mut stream, addr) = self
            .call(CallKind::Read, |ch| {
                let req = tonic::Request::new(pb::SnapshotRequest {});
                async move { ClusterClient::new(ch).snapshot(req).await }
            })
            .await?;
        let mut bytes = Vec::new();
        while let Some(chunk) =
            stream.message().await.map_err(|status| ClientError::Status { addr: addr.clone(), status })?
        {
            bytes.extend_from_slice(&chunk.data);
        }
        Ok(bytes)
    }

    kv_call!(range, CallKind::Read, pb::RangeRequest => pb::RangeResponse);
    kv_call!(
        /// A raw write, not repeated when its outcome is unknown (compare revisions in a
        /// txn to make a write safe to repeat).
        put, CallKind::Write, pb::PutRequest => pb::PutResponse);
    kv_call!(txn, CallKind::Write, pb::TxnRequest => pb::TxnResponse);
    kv_call!(delete_range, CallKind::Write, pb::DeleteRangeRequest => pb::DeleteRangeResponse);

    /// One key's value.
    pub async fn kv_get(&self, key: impl Into<Vec<u8>>) -> Result<Option<pb::KeyValue>, ClientError> {
        let r = self.range(pb::RangeRequest { key: key.into(), ..Default::default() }).await?;
        Ok(r.kvs.into_iter().next())
    }

    /// Writes `value` at `key`.
    pub async fn kv_put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<pb::PutResponse, ClientError> {
        self.put(pb::PutRequest { key: key.into(), value: value.into(), prev_kv: false }).await
    }

    /// Opens a raw watch on the first replica that accepts it.
    pub async fn kv_watch(&self, req: pb::WatchRequest) -> Result<tonic::Streaming<pb::WatchResponse>, ClientError> {
        let (s, _) = self
            .call(CallKind::Read, |ch| {
                let req = tonic::Request::new(req.clone());
                async move { KvClient::new(ch).watch(req).await }
            })
            .await?;
        Ok(s)
    }

    /// The store status of replica `i` itself, without failover.
    pub async fn status_of(&self, i: usize) -> Result<pb::StoreStatusResponse, ClientError> {
        let (r, _) = self
            .pinned(i)
            .call(CallKind::Read, |ch: AuthChannel| {
                let req = self.request(pb::StoreStatusRequest {});
                async move { pb::store_admin_client::StoreAdminClient::new(ch).status(req).await }
            })
            .await?;
        Ok(r)
    }
}
