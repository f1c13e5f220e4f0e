//! Group commit at the proposal level. openraft 0.9 appends one entry per client write and
//! waits for its flush before taking the next, so concurrent transactions are gathered here
//! and proposed together as one log entry: one append, one flush and one replication round for
//! the whole batch. Each transaction still applies at its own revision.
//!
//! On a follower the gathered batch is forwarded to the leader in one call, and the leader
//! gathers forwarded batches with its own. A batch that was forwarded once is never forwarded
//! again.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use super::raft::network::Peers;
use super::raft::{Raft, Request};
use super::{await_leader, forwarded_request, StoreError};
use crate::proto::v1 as pb;

/// A failure shared by every transaction of a batch.
#[derive(Debug, Clone)]
pub(crate) enum ProposeError {
    NoLeader,
    NotLeader {
        leader: Option<u64>,
    },
    Forwarded {
        addr: String,
        status: tonic::Status,
    },
    Timeout,
    Failed(String),
    /// The write was proposed or sent, and then its answer was lost: it may have applied.
    Indeterminate(String),
}

impl ProposeError {
    pub(crate) fn into_store(self, id: u64, timeout: Duration) -> StoreError {
        match self {
            ProposeError::NoLeader => StoreError::NoLeader(timeout),
            ProposeError::NotLeader { leader } => StoreError::NotLeader { id, leader },
            ProposeError::Forwarded { addr, status } => super::forwarded_write_error(addr, status),
            ProposeError::Timeout => StoreError::Timeout { what: "the write", after: timeout },
            ProposeError::Failed(e) => StoreError::Stopped(e),
            ProposeError::Indeterminate(e) => StoreError::Indeterminate(e),
        }
    }
}

type Reply = oneshot::Sender<Result<Vec<pb::TxnResponse>, ProposeError>>;

struct Pending {
    txns: Vec<pb::TxnRequest>,
    may_forward: bool,
    reply: Reply,
    /// When the caller stops waiting. Nothing is proposed or forwarded for it after that,
    /// so a write reported as timed out cannot be started later.
    deadline: Instant,
}

pub(crate) struct Proposer {
    tx: mpsc::Sender<Pending>,
}

#[derive(Clone)]
struct Ctx {
    raft: Raft,
    peers: Arc<Peers>,
}

impl Proposer {
    /// `max_batch` transactions at most per entry; `in_flight` batches dispatched at once.
    pub(crate) fn start(raft: Raft, peers: Arc<Peers>, max_batch: usize, in_flight: usize) -> Proposer {
        let (tx, rx) = mpsc::channel(4096);
        let ctx = Ctx { raft, peers };
        tokio::spawn(run(ctx, rx, max_batch.max(1), Arc::new(Semaphore::new(in_flight.max(1)))));
        Proposer { tx }
    }

    /// Proposes `txns` (in order, adjacent in the log). `may_forward` is false for a batch a
    /// follower already forwarded to us.
    pub(crate) async fn propose(
        &self,
        txns: Vec<pb::TxnRequest>,
        may_forward: bool,
        deadline: Instant,
    ) -> Result<Vec<pb::TxnResponse>, ProposeError> {
        let (reply, rx) = oneshot::channel();
        let pending = Pending { txns, may_forward, reply, deadline };
        let wait = async {
            self.tx.send(pending).await.map_err(|_| ProposeError::Failed("proposer stopped".into()))?;
            rx.await
                .map_err(|_| ProposeError::Indeterminate("the proposal was dropped before it was answered".into()))?
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(r) => r,
            Err(_) => Err(ProposeError::Timeout),
        }
    }
}

async fn run(ctx: Ctx, mut rx: mpsc::Receiver<Pending>, max_batch: usize, slots: Arc<Semaphore>) {
    while let Some(first) = rx.recv().await {
        // While every slot is busy, more proposals queue up and join this batch.
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let mut count = first.txns.len();
        let mut batch = vec![first];
        while count < max_batch {
            match rx.try_recv() {
                Ok(p) => {
                    count += p.txns.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            dispatch(&ctx, batch, permit).await;
        });
    }
}

/// Hands each pending its slice of the responses.
fn deliver(batch: Vec<Pending>, result: Result<Vec<pb::TxnResponse>, ProposeError>) {
    match result {
        Ok(responses) => {
            let mut it = responses.into_iter();
            for p in batch {
                let mine: Vec<pb::TxnResponse> = it.by_ref().take(p.txns.len()).collect();
                let r = if mine.len() == p.txns.len() {
                    Ok(mine)
                } else {
                    Err(ProposeError::Failed("the state machine returned fewer responses than transactions".into()))
                };
                let _ = p.reply.send(r);
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

fn all_txns(batch: &[Pending]) -> Vec<pb::TxnRequest> {
    batch.iter().flat_map(|p| p.txns.iter().cloned()).collect()
}

/// Proposes or forwards one batch. `slot` is held while proposing, so that proposals queue
/// up into the next batch meanwhile (group commit); a forward gives it back at once, so a
/// leader that stops answering holds up only the batch sent to it, not every write after it.
async fn dispatch(ctx: &Ctx, mut batch: Vec<Pending>, slot: tokio::sync::OwnedSemaphorePermit) {
    let Some(deadline) = batch.iter().map(|p| p.deadline).min() else { return };
    loop {
        // Whoever stopped waiting gets nothing started on their behalf.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() || Instant::now() >= deadline {
            return deliver(batch, Err(ProposeError::Timeout));
        }
        let (state, leader, addr, me) = {
            let m = ctx.raft.metrics();
            let m = m.borrow();
            let addr =
                m.current_leader.and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.addr.clone()));
            (m.state, m.current_leader, addr, m.id)
        };
        if state == ServerState::Leader {
            let write = ctx.raft.client_write(Request(pb::TxnBatch { txns: all_txns(&batch) }));
            let result = match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), write).await {
                Err(_) => Err(ProposeError::Timeout),
                Ok(Ok(resp)) => {
                    let term = resp.log_id.leader_id.term;
                    let mut out = resp.data.0.responses;
                    for r in &mut out {
                        if let Some(h) = r.header.as_mut() {
                            h.raft_term = term;
                        }
                    }
                    Ok(out)
                }
                // Never proposed here, or truncated before it could commit: safe to send on.
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                    if await_leader(&ctx.raft, deadline).await {
                        continue;
                    }
                    Err(ProposeError::NoLeader)
                }
                // Proposed, then raft stopped: the entry may still commit elsewhere.
                Ok(Err(e)) => Err(ProposeError::Indeterminate(e.to_string())),
            };
            return deliver(batch, result);
        }
        match (leader, addr) {
            (Some(l), Some(addr)) if l != me => {
                // What was forwarded to us already goes no further.
                let (fwd, refused): (Vec<Pending>, Vec<Pending>) = batch.into_iter().partition(|p| p.may_forward);
                deliver(refused, Err(ProposeError::NotLeader { leader: Some(l) }));
                if fwd.is_empty() {
                    return;
                }
                drop(slot);
                let result = forward(ctx, l, &addr, all_txns(&fwd), deadline).await;
                return deliver(fwd, result);
            }
            _ => {
                if !await_leader(&ctx.raft, deadline).await {
                    return deliver(batch, Err(ProposeError::NoLeader));
                }
            }
        }
    }
}

async fn forward(
    ctx: &Ctx,
    leader: u64,
    addr: &str,
    txns: Vec<pb::TxnRequest>,
    deadline: Instant,
) -> Result<Vec<pb::TxnResponse>, ProposeError> {
    let forwarded = |status| ProposeError::Forwarded { addr: addr.into(), status };
    let ch = ctx.peers.forward_channel(leader, addr).map_err(forwarded)?;
    let req = forwarded_request(pb::TxnBatch { txns }, deadline.saturating_duration_since(Instant::now()));
    let resp = pb::kv_client::KvClient::new(ch).forward_txns(req).await.map_err(forwarded)?;
    if ctx.peers.faults.is_cut(leader, ctx.peers.id) {
        // The leader ran it; only the answer was lost.
        return Err(ProposeError::Indeterminate(format!(
            "the answer from {addr} was lost (link {leader} -> {} is cut)",
            ctx.peers.id
        )));
    }
    Ok(resp.into_inner().responses)
}
