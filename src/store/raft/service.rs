//! The server side of replication: the `keel.v1.Raft` gRPC service hands peer messages to
//! the local openraft instance.

use std::sync::Arc;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use super::codec::{self, CodecError};
use super::faults::Faults;
use super::Raft;
use crate::proto::v1 as pb;

pub struct RaftService {
    raft: Raft,
    id: u64,
    faults: Arc<Faults>,
    epoch: String,
}

impl RaftService {
    pub fn new(raft: Raft, id: u64, faults: Arc<Faults>, epoch: String) -> RaftService {
        RaftService { raft, id, faults, epoch }
    }

    /// Refuses a message from a replica of another cluster epoch: one left behind by a
    /// forced recovery must not disturb the recovered cluster, nor be disturbed by it.
    fn check_epoch<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let theirs = req.metadata().get(super::network::EPOCH_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if theirs != self.epoch {
            tracing::warn!(theirs, ours = self.epoch, "refused a Raft message from another cluster epoch");
            return Err(Status::failed_precondition(format!(
                "cluster epoch mismatch: the sender is at epoch {theirs:?}, this replica at {:?}; the cluster was \
                 recovered with --force-new-cluster, so a replica from before must wipe its data and join again",
                self.epoch
            )));
        }
        Ok(())
    }

    fn check_link(&self, from: u64) -> Result<(), Status> {
        if self.faults.is_cut(from, self.id) {
            return Err(Status::unavailable(format!("link {from} -> {} is cut", self.id)));
        }
        Ok(())
    }
}

fn invalid(e: CodecError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn fatal<E: std::error::Error>(e: RaftError<u64, E>) -> Status {
    Status::unavailable(format!("raft on this replica has stopped: {e}"))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        self.check_epoch(&request)?;
        let r = request.into_inner();
        let vote = codec::vote_from_pb(&r.vote).map_err(invalid)?;
        self.check_link(vote.leader_id.node_id)?;
        let entries =
            r.entries.into_iter().map(codec::entry_from_pb).collect::<Result<Vec<_>, _>>().map_err(invalid)?;
        let req = AppendEntriesRequest {
            vote,
            prev_log_id: codec::opt_log_id_from_pb(&r.prev_log_id).map_err(invalid)?,
            entries,
            leader_commit: codec::opt_log_id_from_pb(&r.leader_commit).map_err(invalid)?,
        };
        use pb::append_entries_response::Result as R;
        let result = match self.raft.append_entries(req).await.map_err(fatal)? {
            AppendEntriesResponse::Success => R::Success(pb::Blank {}),
            AppendEntriesResponse::PartialSuccess(m) => {
                R::PartialSuccess(pb::PartialSuccess { matching: codec::opt_log_id_to_pb(&m) })
            }
            AppendEntriesResponse::Conflict => R::Conflict(pb::Blank {}),
            AppendEntriesResponse::HigherVote(v) => R::HigherVote(codec::vote_to_pb(&v)),
        };
        Ok(Response::new(pb::AppendEntriesResponse { result: Some(result) }))
    }

    async fn vote(&self, request: Request<pb::VoteRequest>) -> Result<Response<pb::VoteResponse>, Status> {
        self.check_epoch(&request)?;
        let r = request.into_inner();
        let vote = codec::vote_from_pb(&r.vote).map_err(invalid)?;
        self.check_link(vote.leader_id.node_id)?;
        let req = VoteRequest { vote, last_log_id: codec::opt_log_id_from_pb(&r.last_log_id).map_err(invalid)? };
        let resp = self.raft.vote(req).await.map_err(fatal)?;
        Ok(Response::new(pb::VoteResponse {
            vote: Some(codec::vote_to_pb(&resp.vote)),
            vote_granted: resp.vote_granted,
            last_log_id: codec::opt_log_id_to_pb(&resp.last_log_id),
        }))
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        self.check_epoch(&request)?;
        let r = request.into_inner();
        let vote = codec::vote_from_pb(&r.vote).map_err(invalid)?;
        self.check_link(vote.leader_id.node_id)?;
        let meta = codec::snapshot_meta_from_pb(
            r.meta.as_ref().ok_or_else(|| invalid(CodecError::Missing("InstallSnapshotRequest.meta")))?,
        )
        .map_err(invalid)?;
        let req = InstallSnapshotRequest { vote, meta, offset: r.offset, data: r.data, done: r.done };
        use pb::install_snapshot_response::Result as R;
        let result = match self.raft.install_snapshot(req).await {
            Ok(resp) => R::Vote(codec::vote_to_pb(&resp.vote)),
            Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => R::Mismatch(pb::SnapshotMismatch {
                expect: Some(pb::SnapshotSegmentId { id: m.expect.id, offset: m.expect.offset }),
                got: Some(pb::SnapshotSegmentId { id: m.got.id, offset: m.got.offset }),
            }),
            Err(e) => return Err(fatal(e)),
        };
        Ok(Response::new(pb::InstallSnapshotResponse { result: Some(result) }))
    }
}
