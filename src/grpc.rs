//! Facts of the wire shared by the store (which serves the KV API and forwards writes from
//! followers to the leader) and the client (which fails over between replicas): what a
//! failed call says about its request, and the KV API's key-range convention.

use tonic::Status;

/// What a failed call tells about whether its request took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The server answered with this status: its code is the server's word (for Keel,
    /// UNAVAILABLE promises that a write was never proposed).
    Answered,
    /// No connection could be made: the request never left this process.
    NotSent,
    /// The connection failed or timed out after the request may have been sent: a write may
    /// or may not have been applied.
    Lost,
}

/// Tells a status the server sent from one tonic made up for a transport failure. Tonic
/// reports both as UNAVAILABLE (or UNKNOWN), but only the first says anything about the
/// request; a status made from a transport error carries that error as its source.
pub fn delivery(status: &Status) -> Delivery {
    let mut source = std::error::Error::source(status);
    if source.is_none() {
        return Delivery::Answered;
    }
    while let Some(e) = source {
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            return Delivery::NotSent;
        }
        source = e.source();
    }
    Delivery::Lost
}

/// The end of the range of every key that starts with `prefix` (etcd's convention: the
/// prefix with its last byte below 0xff raised by one; `[0]`, the whole keyspace, when every
/// byte is 0xff).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proto::v1 as pb;
    use tonic::transport::Endpoint;

    #[tokio::test]
    async fn a_refused_connection_never_sent_the_request() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ch = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy();
        let err = pb::kv_client::KvClient::new(ch).range(pb::RangeRequest::default()).await.unwrap_err();
        assert_eq!(delivery(&err), Delivery::NotSent, "{err:?}");
        assert_eq!(delivery(&Status::unavailable("no leader")), Delivery::Answered);
    }

    #[tokio::test]
    async fn a_timeout_or_a_dropped_connection_may_have_delivered_it() {
        // A listener that accepts and never answers: the request is sent, no answer comes.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let ch = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        let mut req = tonic::Request::new(pb::RangeRequest::default());
        req.set_timeout(Duration::from_millis(200));
        let err = pb::kv_client::KvClient::new(ch).range(req).await.unwrap_err();
        assert_eq!(delivery(&err), Delivery::Lost, "{err:?}");
        drop(l);
    }
}
