//! The internal `keel.v1.Kv` service: the store's Range, Txn and Watch over gRPC.
//! Once cluster security lands, only admin and replica identities may call it.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::status::from_store;
use crate::proto::v1 as pb;
use crate::store::{KeyRange, Store, WatchError, FORWARDED_HEADER};

pub struct KvService {
    store: Store,
}

impl KvService {
    pub fn new(store: Store) -> KvService {
        KvService { store }
    }
}

fn may_forward<T>(req: &Request<T>) -> bool {
    req.metadata().get(FORWARDED_HEADER).is_none()
}

fn single(op: pb::request_op::Request) -> pb::TxnRequest {
    pb::TxnRequest { compare: vec![], success: vec![pb::RequestOp { request: Some(op) }], failure: vec![] }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

enum Next {
    Batch(Result<crate::store::WatchBatch, WatchError>),
    Progress(i64),
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn range(&self, request: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        self.store.range(request.into_inner()).await.map(Response::new).map_err(from_store)
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let fwd = may_forward(&request);
        let txn = single(pb::request_op::Request::RequestPut(request.into_inner()));
        let resp = self.store.txn(txn, fwd).await.map_err(from_store)?;
        let mut put = match resp.responses.into_iter().next().and_then(|r| r.response) {
            Some(pb::response_op::Response::ResponsePut(p)) => p,
            _ => pb::PutResponse::default(),
        };
        put.header = resp.header;
        Ok(Response::new(put))
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let fwd = may_forward(&request);
        let txn = single(pb::request_op::Request::RequestDeleteRange(request.into_inner()));
        let resp = self.store.txn(txn, fwd).await.map_err(from_store)?;
        let mut del = match resp.responses.into_iter().next().and_then(|r| r.response) {
            Some(pb::response_op::Response::ResponseDeleteRange(d)) => d,
            _ => pb::DeleteRangeResponse::default(),
        };
        del.header = resp.header;
        Ok(Response::new(del))
    }

    async fn txn(&self, request: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let fwd = may_forward(&request);
        self.store.txn(request.into_inner(), fwd).await.map(Response::new).map_err(from_store)
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        let header = |rev| pb::ResponseHeader { revision: rev, member_id: self.store.id(), raft_term: 0 };
        let (tx, rx) = mpsc::channel(64);
        match self.store.watch(KeyRange::new(&req.key, &req.range_end), req.start_revision) {
            Err(e @ WatchError::Compacted { .. }) => {
                let WatchError::Compacted { current, oldest, .. } = e else { unreachable!() };
                let msg = pb::WatchResponse {
                    header: Some(header(current)),
                    compact_revision: oldest,
                    canceled: true,
                    cancel_reason: e.to_string(),
                    ..Default::default()
                };
                let _ = tx.send(Ok(msg)).await;
            }
            Err(e) => return Err(super::status::from_watch(&e)),
            Ok(mut watch) => {
                let store = self.store.clone();
                let progress =
                    (req.progress_interval_ms > 0).then(|| Duration::from_millis(req.progress_interval_ms.into()));
                let prev_kv = req.prev_kv;
                // Confirms the watch is registered, with the revision it starts after.
                let created = pb::WatchResponse { header: Some(header(watch.started_at())), ..Default::default() };
                tokio::spawn(async move {
                    if tx.send(Ok(created)).await.is_err() {
                        return;
                    }
                    loop {
                        let idle = tokio::time::sleep(progress.unwrap_or(Duration::MAX));
                        let next = tokio::select! {
                            biased;
                            // A client that went away ends the watch, even on a quiet range.
                            _ = tx.closed() => return,
                            b = watch.next() => Next::Batch(b),
                            _ = idle, if progress.is_some() => {
                                // Read the revision first: everything up to it is already queued
                                // for this watch, so a queued batch goes out before any notice.
                                let rev = store.watch_revision();
                                match watch.try_next() {
                                    Some(b) => Next::Batch(b),
                                    None => Next::Progress(rev),
                                }
                            }
                        };
                        let msg = match next {
                            // Idle: a progress notification with a revision up to which every
                            // event was delivered.
                            Next::Progress(revision) => pb::WatchResponse {
                                header: Some(pb::ResponseHeader { revision, member_id: store.id(), raft_term: 0 }),
                                ..Default::default()
                            },
                            Next::Batch(Ok(batch)) => {
                                let mut events = batch.events.to_vec();
                                if !prev_kv {
                                    for e in &mut events {
                                        e.prev_kv = None;
                                    }
                                }
                                pb::WatchResponse {
                                    header: Some(pb::ResponseHeader {
                                        revision: batch.revision,
                                        member_id: store.id(),
                                        raft_term: 0,
                                    }),
                                    events,
                                    ..Default::default()
                                }
                            }
                            Next::Batch(Err(e)) => {
                                let (compact, resume) = match &e {
                                    WatchError::Slow { resume } => (0, *resume),
                                    WatchError::Reset { current, .. } => (current + 1, 0),
                                    WatchError::Compacted { oldest, .. } => (*oldest, 0),
                                };
                                let _ = tx
                                    .send(Ok(pb::WatchResponse {
                                        header: Some(pb::ResponseHeader {
                                            revision: store.revision(),
                                            member_id: store.id(),
                                            raft_term: 0,
                                        }),
                                        canceled: true,
                                        cancel_reason: e.to_string(),
                                        compact_revision: compact,
                                        resume_revision: resume,
                                        ..Default::default()
                                    }))
                                    .await;
                                return;
                            }
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn forward_txns(&self, request: Request<pb::TxnBatch>) -> Result<Response<pb::TxnBatchResponse>, Status> {
        let txns = request.into_inner().txns;
        let responses = self.store.txns(txns, false).await.map_err(from_store)?;
        Ok(Response::new(pb::TxnBatchResponse { responses }))
    }

    async fn read_index(
        &self,
        _request: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexResponse>, Status> {
        let index = self.store.read_index().await.map_err(from_store)?;
        Ok(Response::new(pb::ReadIndexResponse { read_index: index, leader_id: self.store.id() }))
    }
}
