//! The client side of replication: openraft's RPCs sent as gRPC calls to peer replicas.
//!
//! Connections are pooled per address in [`Peers`], which also carries the fault switches
//! that tests use to cut links between replicas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, SnapshotMismatch, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::SnapshotSegmentId;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::codec::{self, CodecError};
pub use super::faults::Faults;
use super::log_store::Durability;
use super::{Member, TypeConfig};
use crate::proto::v1 as pb;
use crate::proto::v1::raft_client::RaftClient;

/// A leader's record of which voters answer it: see [`Peers::may_append`].
#[derive(Default, Debug)]
struct Lease {
    /// (term, leader id) of the leadership being tracked.
    term: (u64, u64),
    /// Per voter: the first append sent to it since its last answer.
    waiting: HashMap<u64, tokio::time::Instant>,
    /// Per voter: the last probe sent while the quorum was lost.
    probed: HashMap<u64, tokio::time::Instant>,
    others: Vec<u64>,
    window: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
#[error("no quorum answered this leader for {window:?}; it stops sending so that the others can elect")]
pub struct QuorumLost {
    window: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("link {from} -> {to} is cut")]
pub struct LinkCut {
    pub from: u64,
    pub to: u64,
}

/// The metadata key that carries the sender's cluster epoch.
pub const EPOCH_HEADER: &str = "keel-epoch";

/// Lazily connected gRPC channels to peers, by address.
pub struct Peers {
    pub id: u64,
    pub faults: Arc<Faults>,
    channels: Mutex<HashMap<String, Channel>>,
    connect_timeout: Duration,
    tls: Mutex<Option<ClientTlsConfig>>,
    /// When each peer last answered an append-entries (meaningful on the leader).
    contacts: Mutex<HashMap<u64, tokio::time::Instant>>,
    /// The leader's check of its own quorum; see [`Peers::may_append`].
    lease: Mutex<Lease>,
    /// Sent with every Raft message; peers of another epoch refuse it.
    pub epoch: String,
    source: Mutex<Option<std::net::IpAddr>>,
}

impl Peers {
    pub fn new(
        id: u64,
        faults: Arc<Faults>,
        connect_timeout: Duration,
        tls: Option<ClientTlsConfig>,
        epoch: String,
    ) -> Arc<Peers> {
        Arc::new(Peers {
            id,
            faults,
            channels: Mutex::new(HashMap::new()),
            connect_timeout,
            tls: Mutex::new(tls),
            contacts: Mutex::new(HashMap::new()),
            lease: Mutex::new(Lease::default()),
            epoch,
            source: Mutex::new(None),
        })
    }

    /// A channel to `addr` (host:port). Connection happens on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let tls = self.tls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut endpoint = match &tls {
            Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls.clone())?,
            None => Endpoint::from_shared(format!("http://{addr}"))?,
        };
        let source = *self.source.lock().unwrap_or_else(|p| p.into_inner());
        endpoint = endpoint.connect_timeout(self.connect_timeout).local_address(source);
        let ch = endpoint
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }
}

impl Peers {
    /// New TLS for connections to peers (a renewed certificate); open channels are dropped
    /// and reconnect with it.
    pub fn set_tls(&self, tls: ClientTlsConfig) {
        *self.tls.lock().unwrap_or_else(|p| p.into_inner()) = Some(tls);
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The local address connections to peers leave from.
    pub fn set_source(&self, ip: Option<std::net::IpAddr>) {
        *self.source.lock().unwrap_or_else(|p| p.into_inner()) = ip;
    }

    /// How long ago `id` last answered this replica's replication, if it ever did.
    pub fn last_contact(&self, id: u64) -> Option<Duration> {
        self.contacts.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|t| t.elapsed())
    }

    fn contacted(&self, id: u64) {
        self.contacts.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tokio::time::Instant::now());
        self.lease.lock().unwrap_or_else(|p| p.into_inner()).waiting.remove(&id);
    }

    /// The voters other than this replica, and how long a leader may go without hearing from
    /// a quorum of them before it stops sending (see [`Peers::may_append`]). `None` turns the
    /// check off.
    pub fn set_quorum_check(&self, voters: Vec<u64>, window: Option<Duration>) {
        let mut l = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        l.others = voters.into_iter().filter(|v| *v != self.id).collect();
        l.window = window;
    }

    /// Check-quorum, which openraft 0.9 lacks. A leader whose appends a quorum has not
    /// answered for a whole window sends nothing more, so that its followers' election timers
    /// run out and the replicas that can still talk to each other elect a new leader.
    ///
    /// Without it a leader that can send but not receive (an asymmetric partition, a broken
    /// return path) keeps resetting every follower's election timer with heartbeats nobody
    /// can answer, and no write commits until the network heals. Only liveness depends on
    /// this: a leader that stops sending commits nothing, and a new leader's first message
    /// (or a vote request) deposes it as usual.
    ///
    /// `term` identifies the leadership the append belongs to; a new term starts a fresh
    /// lease. While the lease is lost, returns an error without sending, except for one
    /// probe per window to each voter.
    fn may_append(&self, term: (u64, u64), to: u64) -> Result<(), QuorumLost> {
        let mut l = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        if l.term != term {
            l.term = term;
            l.waiting.clear();
            l.probed.clear();
        }
        let Some(window) = l.window else { return Ok(()) };
        let answering = l.others.iter().filter(|v| l.waiting.get(v).is_none_or(|t| now - *t < window)).count();
        // This replica (a voter, as a leader is) plus the voters that answer in time.
        let voters = l.others.len() + 1;
        let majority = voters / 2 + 1;
        if 1 + answering < majority {
            // One probe per window and peer, so that a follower coming back (a restart after
            // a crash of both others) is reached and restores the quorum. A window is several
            // election timeouts, so followers that still hear the probes have time to elect
            // between two of them.
            if l.probed.get(&to).is_some_and(|t| now - *t < window) {
                return Err(QuorumLost { window });
            }
            l.probed.insert(to, now);
        }
        l.waiting.entry(to).or_insert(now);
        Ok(())
    }

    /// A channel for forwarding a request to the leader, refused (UNAVAILABLE, nothing sent)
    /// when the test fault table cuts the link.
    pub fn forward_channel(&self, leader: u64, addr: &str) -> Result<Channel, tonic::Status> {
        if self.faults.is_cut(self.id, leader) {
            return Err(tonic::Status::unavailable(format!("link {} -> {leader} is cut", self.id)));
        }
        self.channel(addr).map_err(|e| tonic::Status::unavailable(e.to_string()))
    }
}

/// Creates one [`PeerClient`] per target for openraft.
#[derive(Clone)]
pub struct Network {
    pub peers: Arc<Peers>,
    /// This replica's log on disk: a commit is announced only once it is (see `Durability`).
    pub durability: Durability,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &Member) -> PeerClient {
        PeerClient { peers: self.peers.clone(), target, addr: node.addr.clone(), durability: self.durability.clone() }
    }
}

pub struct PeerClient {
    peers: Arc<Peers>,
    target: u64,
    addr: String,
    durability: Durability,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<u64, Member, RaftError<u64, E>>;

impl PeerClient {
    fn client(&self) -> Result<RaftClient<Channel>, Unreachable> {
        let from = self.peers.id;
        if self.peers.faults.is_cut(from, self.target) {
            return Err(Unreachable::new(&LinkCut { from, to: self.target }));
        }
        let ch = self.peers.channel(&self.addr).map_err(|e| Unreachable::new(&e))?;
        Ok(RaftClient::new(ch).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20))
    }

    /// Drops the reply if the link back to us is cut (asymmetric partitions).
    fn check_reply(&self) -> Result<(), Unreachable> {
        if self.peers.faults.is_cut(self.target, self.peers.id) {
            return Err(Unreachable::new(&LinkCut { from: self.target, to: self.peers.id }));
        }
        Ok(())
    }

    fn status_err<E: std::error::Error>(&self, s: tonic::Status) -> RpcErr<E> {
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded => {
                RPCError::Unreachable(Unreachable::new(&s))
            }
            _ => RPCError::Network(NetworkError::new(&s)),
        }
    }

    fn request<T>(&self, msg: T, option: &RPCOption) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(option.hard_ttl());
        if let Ok(v) = self.peers.epoch.parse() {
            req.metadata_mut().insert(EPOCH_HEADER, v);
        }
        req
    }
}

fn bad_reply<E: std::error::Error>(e: CodecError) -> RpcErr<E> {
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        // A follower applies what it is told is committed; that must be on our disk first.
        let leader_commit = match rpc.leader_commit {
            Some(commit) => {
                self.durability.announceable(commit, option.hard_ttl() / 4).await.map_err(|e| Unreachable::new(&e))?
            }
            None => None,
        };
        let msg = pb::AppendEntriesRequest {
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            prev_log_id: codec::opt_log_id_to_pb(&rpc.prev_log_id),
            entries: rpc.entries.iter().map(codec::entry_to_pb).collect(),
            leader_commit: codec::opt_log_id_to_pb(&leader_commit),
        };
        let term = (rpc.vote.leader_id().term, rpc.vote.leader_id().voted_for().unwrap_or_default());
        self.peers.may_append(term, self.target).map_err(|e| Unreachable::new(&e))?;
        let resp = self.client()?.append_entries(self.request(msg, &option)).await.map_err(|s| self.status_err(s))?;
        self.check_reply()?;
        self.peers.contacted(self.target);
        use pb::append_entries_response::Result as R;
        match resp.into_inner().result {
            Some(R::Success(_)) => Ok(AppendEntriesResponse::Success),
            Some(R::PartialSuccess(p)) => {
                Ok(AppendEntriesResponse::PartialSuccess(codec::opt_log_id_from_pb(&p.matching).map_err(bad_reply)?))
            }
            Some(R::Conflict(_)) => Ok(AppendEntriesResponse::Conflict),
            Some(R::HigherVote(v)) => {
                Ok(AppendEntriesResponse::HigherVote(codec::vote_from_pb(&Some(v)).map_err(bad_reply)?))
            }
            None => Err(bad_reply(CodecError::Missing("AppendEntriesResponse.result"))),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        let msg = pb::InstallSnapshotRequest {
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            meta: Some(codec::snapshot_meta_to_pb(&rpc.meta)),
            offset: rpc.offset,
            data: rpc.data,
            done: rpc.done,
        };
        let resp = self.client()?.install_snapshot(self.request(msg, &option)).await.map_err(|s| self.status_err(s))?;
        self.check_reply()?;
        use pb::install_snapshot_response::Result as R;
        match resp.into_inner().result {
            Some(R::Vote(v)) => Ok(InstallSnapshotResponse { vote: codec::vote_from_pb(&Some(v)).map_err(bad_reply)? }),
            Some(R::Mismatch(m)) => {
                let seg = |s: Option<pb::SnapshotSegmentId>| {
                    let s = s.unwrap_or_default();
                    SnapshotSegmentId { id: s.id, offset: s.offset }
                };
                let mismatch = SnapshotMismatch { expect: seg(m.expect), got: seg(m.got) };
                Err(RPCError::RemoteError(RemoteError::new(
                    self.target,
                    RaftError::APIError(InstallSnapshotError::SnapshotMismatch(mismatch)),
                )))
            }
            None => Err(bad_reply(CodecError::Missing("InstallSnapshotResponse.result"))),
        }
    }

    /// After an unreachable peer, retry soon: a restarted replica should catch up within a
    /// heartbeat or two, not after openraft's default half second.
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> Result<VoteResponse<u64>, RpcErr> {
        let msg = pb::VoteRequest {
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            last_log_id: codec::opt_log_id_to_pb(&rpc.last_log_id),
        };
        let resp = self.client()?.vote(self.request(msg, &option)).await.map_err(|s| self.status_err(s))?;
        self.check_reply()?;
        let r = resp.into_inner();
        Ok(VoteResponse {
            vote: codec::vote_from_pb(&r.vote).map_err(bad_reply)?,
            vote_granted: r.vote_granted,
            last_log_id: codec::opt_log_id_from_pb(&r.last_log_id).map_err(bad_reply)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check-quorum runs on tokio's clock, so a paused-time test drives it without waiting.
    #[tokio::test(start_paused = true)]
    async fn a_leader_no_quorum_answers_stops_sending_but_probes_once_a_window() {
        let peers = Peers::new(1, Faults::new(), Duration::from_millis(100), None, String::new());
        let window = Duration::from_millis(300);
        peers.set_quorum_check(vec![1, 2, 3], Some(window));
        let term = (1, 1);
        assert!(peers.may_append(term, 2).is_ok());
        assert!(peers.may_append(term, 3).is_ok());
        // Nobody answers for a whole window: the quorum is lost.
        tokio::time::advance(Duration::from_millis(301)).await;
        assert!(peers.may_append(term, 2).is_ok(), "one probe per window");
        assert!(peers.may_append(term, 2).is_err(), "then nothing more");
        // Follower 2 answers: with this leader it is a majority again.
        peers.contacted(2);
        assert!(peers.may_append(term, 2).is_ok());
        assert!(peers.may_append(term, 3).is_ok());
        assert_eq!(peers.last_contact(2), Some(Duration::ZERO), "measured on the paused clock");
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(peers.last_contact(2), Some(Duration::from_millis(50)));
        // A new term starts a fresh lease.
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(peers.may_append((2, 1), 3).is_ok());
    }
}
