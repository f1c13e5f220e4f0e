//! The replicated store: Keel's etcd. A revisioned key-value map whose only write command is
//! an etcd-style transaction, replicated by openraft and persisted in sled.
//!
//! `Store` is the one face of this module: transactions (forwarded to the leader when this
//! replica does not lead), linearizable or stale ranges, watches, and store-level membership.
//! It knows nothing of Kubernetes objects, and only this module names openraft or sled.

pub mod kv;
mod proposer;
pub mod raft;
pub mod txn;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ::openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError, RaftError};
use ::openraft::{ChangeMembers, ServerState};
use prost::Message;
use tokio::time::Instant;

use crate::proto::v1 as pb;
pub use kv::{Kv, KvError, MemKv, SledKv, Space};
pub use raft::codec::{member_from_pb, member_to_pb};
pub use raft::faults::Faults;
use raft::network::{Network, Peers};
use raft::state_machine::{Shared, StateMachine};
pub use raft::Member;
use raft::{codec, log_store::LogStore, Raft};
pub use txn::{delete_op, exists, mod_equals, prefix_end, prefix_request, put_op, KeyRange, TxnError};
pub use watch::{Watch, WatchBatch, WatchConfig, WatchError};

/// The on-disk layout version. Written when a data directory is created; a replica refuses
/// to open data of another version, except older versions it knows how to upgrade.
///
/// 2: atomic batches are journaled by the engine (`batch_journal` tree). Version 1 data has
/// no journal and opens as it is; a version 1 binary would ignore the journal, so it must
/// refuse version 2 data, and does.
///
/// 3: the current snapshot is one value (`state_machine::SNAPSHOT`) rather than a batch of
/// two, so saving one writes its data once instead of twice. Versions 1 and 2 are upgraded
/// in place (`upgrade_snapshot_layout`); a version 2 binary would not find the snapshot.
///
/// 4: the current snapshot's data is a file beside the engine, and the engine holds its name,
/// length, checksum and meta (`state_machine::SNAPSHOT_FILE`). In the engine it was a blob
/// that the log's next flush had to sync, so every write waited for the whole snapshot to
/// reach the disk. Versions 1-3 are upgraded in place (`move_snapshot_to_file`); a version 3
/// binary would not find the snapshot.
pub const DATA_VERSION: u32 = 4;
const DATA_VERSION_KEY: &[u8] = b"data_version";

/// Log entries per AppendEntries.
///
/// A new leader does not know where its followers' logs end: openraft 0.9 probes from the
/// middle of its own log with a full payload of entries the follower most likely has
/// already, and gives an append one heartbeat (50 ms) to answer. With 1,000 entries, each a
/// batch of writes, a probe after the benchmark's load was megabytes, outlived its timeout
/// and was sent again: leader kills then took up to 730-850 ms to commit the next write
/// (medians 462-494 ms). With 128: medians 429-434 ms, at most 498 ms, and 256-client
/// throughput unchanged. 16 was faster still after a kill (387 ms) but let followers fall
/// behind under load (256-client p99 165 ms, failed writes in one run of two).
const MAX_PAYLOAD_ENTRIES: u64 = 128;

/// gRPC metadata set on a request a follower forwards to the leader, so it is never
/// forwarded twice.
pub const FORWARDED_HEADER: &str = "keel-forwarded";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Engine(#[from] KvError),
    #[error("data in {file} is damaged: {what}")]
    Corrupt { file: PathBuf, what: String },
    #[error("data in {file} has layout version {found}, this keel reads version {want}")]
    DataVersion { file: PathBuf, found: String, want: u32 },
    #[error("cannot create data directory {dir}: {source}")]
    DataDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid transaction: {0}")]
    Invalid(#[from] TxnError),
    #[error("no leader is known after waiting {0:?}; is a quorum of replicas running and connected?")]
    NoLeader(Duration),
    #[error("replica {id} is not the leader and the request was already forwarded once")]
    NotLeader { id: u64, leader: Option<u64> },
    #[error("leader could not confirm its leadership with a quorum: {0}")]
    NoQuorum(String),
    #[error("{what} did not finish within {after:?}; the outcome is unknown")]
    Timeout { what: &'static str, after: Duration },
    #[error("the leader at {addr} answered: {status}")]
    Forwarded { addr: String, status: tonic::Status },
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("raft stopped on this replica: {0}")]
    Stopped(String),
    #[error("{0}; the write may or may not have been applied")]
    Indeterminate(String),
}

/// Configuration of one replica's store. Every timeout is a field, so tests can run fast.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub id: u64,
    pub name: String,
    /// The address peers and clients reach this replica at (host:port).
    pub advertise: String,
    pub data_dir: PathBuf,
    pub heartbeat: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log after a snapshot (for followers that are slightly behind).
    pub keep_logs: u64,
    pub snapshot_chunk_bytes: u64,
    pub write_timeout: Duration,
    /// Transactions gathered into one log entry at most (group commit).
    pub max_batch: usize,
    /// Log entries of gathered transactions proposed at once.
    pub max_in_flight: usize,
    pub cache_bytes: u64,
    pub watch: WatchConfig,
    /// TLS to peers (this replica's client certificate and the cluster CA). `Server::start`
    /// always sets it; None (plain HTTP/2) is only for a store without a server.
    pub peer_tls: Option<tonic::transport::ClientTlsConfig>,
    /// The cluster epoch: changed by a forced recovery (`force_new_cluster`), it fences
    /// replicas of the cluster as it was before, whose Raft messages are then refused.
    pub epoch: String,
    /// The local address peer connections leave from (the chaos suite tells replicas
    /// apart by it); None lets the kernel choose.
    pub peer_source: Option<std::net::IpAddr>,
    /// A leader that no quorum has answered for three election timeouts stops sending, so
    /// that the others can elect (check-quorum; see `Peers::may_append`).
    pub check_quorum: bool,
}

impl StoreConfig {
    pub fn new(id: u64, advertise: impl Into<String>, data_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            id,
            name: format!("replica-{id}"),
            advertise: advertise.into(),
            data_dir: data_dir.into(),
            heartbeat: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(100),
            election_timeout_max: Duration::from_millis(200),
            snapshot_every: 10_000,
            keep_logs: 1_000,
            snapshot_chunk_bytes: 1 << 20,
            write_timeout: Duration::from_secs(5),
            max_batch: 512,
            max_in_flight: 1,
            cache_bytes: 256 << 20,
            watch: WatchConfig::default(),
            peer_tls: None,
            epoch: String::new(),
            peer_source: None,
            check_quorum: true,
        }
    }
}

/// A forwarded write that failed (transactions and membership changes alike): the leader's
/// answer, or `Indeterminate` when the connection failed after the request may have reached
/// it, since the leader's own status is its word and a lost connection is not.
fn forwarded_write_error(addr: String, status: tonic::Status) -> StoreError {
    match crate::grpc::delivery(&status) {
        crate::grpc::Delivery::Lost => {
            StoreError::Indeterminate(format!("the connection to the leader at {addr} failed: {status}"))
        }
        _ => StoreError::Forwarded { addr, status },
    }
}

/// Keeps the check-quorum voter set of `peers` equal to the current membership's voters.
async fn track_voters(
    mut metrics: tokio::sync::watch::Receiver<::openraft::RaftMetrics<u64, Member>>,
    peers: Arc<Peers>,
    window: Option<Duration>,
) {
    let mut last = None;
    loop {
        let voters: Vec<u64> = metrics.borrow_and_update().membership_config.membership().voter_ids().collect();
        if last.as_ref() != Some(&voters) {
            peers.set_quorum_check(voters.clone(), window);
            last = Some(voters);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

pub(crate) fn forwarded_request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    req.set_timeout(timeout);
    req
}

/// Waits until some replica other than a non-leading self is known to lead; false if none
/// is by the deadline.
pub(crate) async fn await_leader(raft: &Raft, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return false;
    }
    raft.wait(Some(left))
        .metrics(|m| m.current_leader.is_some_and(|l| l != m.id || m.state == ServerState::Leader), "a leader")
        .await
        .is_ok()
}

struct Inner {
    id: u64,
    raft: Raft,
    kv: Arc<dyn Kv>,
    shared: Arc<Shared>,
    peers: Arc<Peers>,
    proposer: proposer::Proposer,
    config: StoreConfig,
}

/// One replica's store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

fn check_data_version(kv: &dyn Kv) -> Result<(), StoreError> {
    let file = kv.location().to_path_buf();
    match kv.get(Space::RaftMeta, DATA_VERSION_KEY)? {
        Some(v) if v == DATA_VERSION.to_be_bytes() => Ok(()),
        Some(v) if [1u32, 2, 3].iter().any(|old| v == old.to_be_bytes()) => {
            raft::state_machine::upgrade_snapshot_layout(kv)?;
            raft::state_machine::move_snapshot_to_file(kv)?;
            kv.flush_blocking()?;
            let mut b = kv::Batch::default();
            b.put(DATA_VERSION_KEY.to_vec(), DATA_VERSION.to_be_bytes().to_vec());
            kv.write(Space::RaftMeta, b)?;
            let from = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
            tracing::info!(file = %file.display(), "upgraded the data layout from version {from} to {DATA_VERSION}");
            Ok(())
        }
        Some(v) => Err(StoreError::DataVersion { file, found: format!("{v:?}"), want: DATA_VERSION }),
        None => {
            let empty = Space::ALL
                .iter()
                .all(|s| kv.scan(*s, (std::ops::Bound::Unbounded, std::ops::Bound::Unbounded), false).next().is_none());
            if !empty {
                return Err(StoreError::DataVersion {
                    file,
                    found: "none (not a keel data directory?)".into(),
                    want: DATA_VERSION,
                });
            }
            let mut b = kv::Batch::default();
            b.put(DATA_VERSION_KEY.to_vec(), DATA_VERSION.to_be_bytes().to_vec());
            kv.write(Space::RaftMeta, b)?;
            Ok(())
        }
    }
}

impl Store {
    /// Opens (or creates) the replica's data and starts Raft. The replica serves nothing until
    /// its `keel.v1.Raft` service is reachable by peers; see [`Store::raft_service`].
    pub async fn open(config: StoreConfig, faults: Arc<Faults>) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|source| StoreError::DataDir { dir: config.data_dir.clone(), source })?;
        let kv: Arc<dyn Kv> = Arc::new(SledKv::open(&config.data_dir.join("db"), config.cache_bytes)?);
        Store::open_with(config, faults, kv).await
    }

    /// Quorum recovery on a stopped replica: rewrites the membership so that this replica is
    /// the only voter, keeping all its data. Run before `open`; see `force_single_voter`.
    pub fn force_new_cluster(config: &StoreConfig) -> Result<raft::log_store::Forced, StoreError> {
        let kv = SledKv::open(&config.data_dir.join("db"), config.cache_bytes)?;
        check_data_version(&kv)?;
        let member = Member { addr: config.advertise.clone(), name: config.name.clone() };
        raft::log_store::force_single_voter(&kv, config.id, member)
    }

    /// Opens the store on a given engine (the in-memory one in unit tests).
    pub async fn open_with(config: StoreConfig, faults: Arc<Faults>, kv: Arc<dyn Kv>) -> Result<Store, StoreError> {
        check_data_version(kv.as_ref())?;
        let log = LogStore::open(kv.clone(), config.id, faults.clone())?;
        let durability = log.durability();
        if raft::log_store::step_down_at_start(kv.as_ref(), config.id)? {
            tracing::info!("this replica was leader when it stopped; it starts as a candidate for a new term");
        }
        let watch_config = config.watch.clone();
        let sm = StateMachine::open(
            kv.clone(),
            |rev| watch::WatchHub::new(rev, watch_config),
            config.id,
            durability.clone(),
        )?;
        let shared = sm.shared();
        let raft_config = ::openraft::Config {
            cluster_name: "keel".into(),
            heartbeat_interval: config.heartbeat.as_millis() as u64,
            election_timeout_min: config.election_timeout_min.as_millis() as u64,
            election_timeout_max: config.election_timeout_max.as_millis() as u64,
            snapshot_policy: ::openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.keep_logs,
            snapshot_max_chunk_size: config.snapshot_chunk_bytes,
            install_snapshot_timeout: 10_000,
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StoreError::Stopped(format!("invalid raft configuration: {e}")))?;
        let peers =
            Peers::new(config.id, faults, Duration::from_millis(500), config.peer_tls.clone(), config.epoch.clone());
        peers.set_source(config.peer_source);
        let network = Network { peers: peers.clone(), durability };
        let raft = Raft::new(config.id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| StoreError::Stopped(e.to_string()))?;
        let proposer = proposer::Proposer::start(raft.clone(), peers.clone(), config.max_batch, config.max_in_flight);
        let window = config.check_quorum.then(|| config.election_timeout_max * 3);
        tokio::spawn(track_voters(raft.metrics(), peers.clone(), window));
        Ok(Store { inner: Arc::new(Inner { id: config.id, raft, kv, shared, peers, proposer, config }) })
    }

    /// Connects to peers with new TLS from now on (see `Peers::set_tls`).
    pub fn set_peer_tls(&self, tls: tonic::transport::ClientTlsConfig) {
        self.inner.peers.set_tls(tls);
    }

    pub fn epoch(&self) -> &str {
        &self.inner.peers.epoch
    }

    pub fn id(&self) -> u64 {
        self.inner.id
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// The gRPC service peers replicate through.
    pub fn raft_service(&self) -> pb::raft_server::RaftServer<raft::service::RaftService> {
        let svc = raft::service::RaftService::new(
            self.inner.raft.clone(),
            self.inner.id,
            self.inner.peers.faults.clone(),
            self.inner.peers.epoch.clone(),
        );
        pb::raft_server::RaftServer::new(svc).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20)
    }

    /// Initializes a new cluster with these voters. Does nothing if this replica already has
    /// state (it was initialized before, or joined).
    pub async fn initialize(&self, voters: BTreeMap<u64, Member>) -> Result<(), StoreError> {
        if self.inner.raft.is_initialized().await.map_err(|e| StoreError::Stopped(e.to_string()))? {
            return Ok(());
        }
        match self.inner.raft.initialize(voters).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(StoreError::Membership(e.to_string())),
        }
    }

    fn header(&self, revision: i64) -> pb::ResponseHeader {
        pb::ResponseHeader {
            revision,
            member_id: self.inner.id,
            raft_term: self.inner.raft.metrics().borrow().current_term,
        }
    }

    fn remaining(deadline: Instant) -> Duration {
        deadline.saturating_duration_since(Instant::now())
    }

    async fn wait_for_leader(&self, deadline: Instant) -> Result<(), StoreError> {
        if await_leader(&self.inner.raft, deadline).await {
            Ok(())
        } else {
            Err(StoreError::NoLeader(self.inner.config.write_timeout))
        }
    }

    fn leader_addr(f: &ForwardToLeader<u64, Member>) -> Option<(u64, String)> {
        Some((f.leader_id?, f.leader_node.as_ref()?.addr.clone()))
    }

    fn forward_channel(&self, leader: u64, addr: &str) -> Result<tonic::transport::Channel, StoreError> {
        self.inner
            .peers
            .forward_channel(leader, addr)
            .map_err(|status| StoreError::Forwarded { addr: addr.into(), status })
    }

    fn forwarded<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
        forwarded_request(msg, timeout)
    }

    /// Runs a transaction. On a follower it is forwarded to the leader, unless `may_forward`
    /// is false (the request was forwarded to us already).
    pub async fn txn(&self, req: pb::TxnRequest, may_forward: bool) -> Result<pb::TxnResponse, StoreError> {
        let mut out = self.txns(vec![req], may_forward).await?;
        out.pop().ok_or_else(|| StoreError::Stopped("no response for the transaction".into()))
    }

    /// Runs transactions in order, adjacent in the log (see [`Store::txn`]).
    pub async fn txns(&self, reqs: Vec<pb::TxnRequest>, may_forward: bool) -> Result<Vec<pb::TxnResponse>, StoreError> {
        for r in &reqs {
            txn::validate(r)?;
        }
        let timeout = self.inner.config.write_timeout;
        let deadline = Instant::now() + timeout;
        self.inner.proposer.propose(reqs, may_forward, deadline).await.map_err(|e| e.into_store(self.inner.id, timeout))
    }

    /// Confirms with a quorum that this replica leads and returns the index a read must wait
    /// for. Only the leader answers; followers call it on the leader.
    pub async fn read_index(&self) -> Result<u64, StoreError> {
        let timeout = self.inner.config.write_timeout;
        let r = tokio::time::timeout(timeout, self.inner.raft.get_read_log_id())
            .await
            .map_err(|_| StoreError::Timeout { what: "confirming leadership", after: timeout })?;
        match r {
            Ok((read, _)) => Ok(read.map_or(0, |l| l.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(StoreError::NotLeader { id: self.inner.id, leader: f.leader_id })
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                Err(StoreError::NoQuorum(q.to_string()))
            }
            Err(RaftError::Fatal(e)) => Err(StoreError::Stopped(e.to_string())),
        }
    }

    /// Waits until this replica has applied everything committed before the call
    /// (read-index through the leader).
    async fn linearize(&self) -> Result<(), StoreError> {
        let timeout = self.inner.config.write_timeout;
        let deadline = Instant::now() + timeout;
        let index = loop {
            let r = tokio::time::timeout(Self::remaining(deadline), self.inner.raft.get_read_log_id())
                .await
                .map_err(|_| StoreError::Timeout { what: "confirming leadership", after: timeout })?;
            match r {
                Ok((read, _)) => break read.map_or(0, |l| l.index),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => match Self::leader_addr(&f) {
                    Some((leader, addr)) if leader != self.inner.id => {
                        let ch = self.forward_channel(leader, &addr)?;
                        let mut client = pb::kv_client::KvClient::new(ch);
                        let resp = client
                            .read_index(Self::forwarded(pb::ReadIndexRequest {}, Self::remaining(deadline)))
                            .await
                            .map_err(|status| StoreError::Forwarded { addr, status })?;
                        break resp.into_inner().read_index;
                    }
                    _ => self.wait_for_leader(deadline).await?,
                },
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                    return Err(StoreError::NoQuorum(q.to_string()))
                }
                Err(RaftError::Fatal(e)) => return Err(StoreError::Stopped(e.to_string())),
            }
        };
        self.inner
            .raft
            .wait(Some(Self::remaining(deadline)))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map(|_| ())
            .map_err(|_| StoreError::Timeout { what: "catching up to the read index", after: timeout })
    }

    /// Reads a range. Linearizable unless `req.serializable` asks for a stale read.
    pub async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, StoreError> {
        if !req.serializable {
            self.linearize().await?;
        }
        let guard = self.inner.shared.read();
        let view = txn::Overlay::new(self.inner.kv.as_ref());
        Ok(txn::range(&view, &req, self.header(*guard))?)
    }

    /// Watches a key range from a revision (inclusive; 0 means from now on).
    pub fn watch(&self, range: KeyRange, start_revision: i64) -> Result<Watch, WatchError> {
        self.inner.shared.hub.watch(range, start_revision)
    }

    /// How many watches are open on this replica (each holds a queue in the hub).
    pub fn watcher_count(&self) -> usize {
        self.inner.shared.hub.watcher_count()
    }

    /// The newest revision whose events every watch has been handed. A watcher that drains
    /// its queue after reading this has seen everything up to it (for bookmarks).
    pub fn watch_revision(&self) -> i64 {
        self.inner.shared.hub.current_revision()
    }

    /// The revision of this replica's applied state.
    pub fn revision(&self) -> i64 {
        *self.inner.shared.read()
    }

    /// Adds a learner (a non-voting replica). With `blocking`, waits until it caught up.
    pub async fn add_learner(
        &self,
        id: u64,
        member: Member,
        blocking: bool,
    ) -> Result<pb::MembershipResponse, StoreError> {
        let r = self.inner.raft.add_learner(id, member.clone(), blocking).await;
        match r {
            Ok(resp) => Ok(membership_response(&resp.log_id, resp.membership.as_ref())),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                let (leader, addr) = Self::leader_addr(&f).ok_or(StoreError::NoLeader(Duration::ZERO))?;
                let mut client = pb::store_admin_client::StoreAdminClient::new(self.forward_channel(leader, &addr)?);
                let req = pb::AddLearnerRequest { id, node: Some(codec::member_to_pb(&member)), blocking };
                client
                    .add_learner(Self::forwarded(req, Duration::from_secs(60)))
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|status| forwarded_write_error(addr, status))
            }
            Err(RaftError::APIError(e)) => Err(StoreError::Membership(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(StoreError::Stopped(e.to_string())),
        }
    }

    /// Makes `voters` the complete set of voters (promoting learners, demoting or removing
    /// voters not listed). With `retain`, removed voters stay as learners.
    pub async fn change_membership(
        &self,
        voters: BTreeSet<u64>,
        retain: bool,
    ) -> Result<pb::MembershipResponse, StoreError> {
        let req = pb::ChangeMembershipRequest { voters: voters.into_iter().collect(), retain, ..Default::default() };
        self.change_members(req).await
    }

    /// Applies one membership change, given as its request (see `ChangeMembershipRequest`);
    /// forwarded to the leader from a follower.
    pub async fn change_members(&self, req: pb::ChangeMembershipRequest) -> Result<pb::MembershipResponse, StoreError> {
        let change: ChangeMembers<u64, Member> = if !req.voters.is_empty() {
            ChangeMembers::ReplaceAllVoters(req.voters.iter().copied().collect())
        } else if !req.add_voters.is_empty() {
            ChangeMembers::AddVoterIds(req.add_voters.iter().copied().collect())
        } else if !req.remove_voters.is_empty() {
            ChangeMembers::RemoveVoters(req.remove_voters.iter().copied().collect())
        } else if !req.set_nodes.is_empty() {
            ChangeMembers::SetNodes(req.set_nodes.iter().map(|(id, n)| (*id, codec::member_from_pb(n))).collect())
        } else if !req.remove_nodes.is_empty() {
            ChangeMembers::RemoveNodes(req.remove_nodes.iter().copied().collect())
        } else {
            return Err(StoreError::Membership("an empty membership change".into()));
        };
        let r = self.inner.raft.change_membership(change, req.retain).await;
        match r {
            Ok(resp) => Ok(membership_response(&resp.log_id, resp.membership.as_ref())),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                let (leader, addr) = Self::leader_addr(&f).ok_or(StoreError::NoLeader(Duration::ZERO))?;
                let mut client = pb::store_admin_client::StoreAdminClient::new(self.forward_channel(leader, &addr)?);
                client
                    .change_membership(Self::forwarded(req, Duration::from_secs(60)))
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|status| forwarded_write_error(addr, status))
            }
            Err(RaftError::APIError(e)) => Err(StoreError::Membership(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(StoreError::Stopped(e.to_string())),
        }
    }

    /// Builds a snapshot now and waits for it (the log is purged according to `keep_logs`).
    pub async fn trigger_snapshot(&self) -> Result<u64, StoreError> {
        let applied = self.inner.raft.metrics().borrow().last_applied.map_or(0, |l| l.index);
        self.inner.raft.trigger().snapshot().await.map_err(|e| StoreError::Stopped(e.to_string()))?;
        let m = self
            .inner
            .raft
            .wait(Some(Duration::from_secs(60)))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= applied), "snapshot")
            .await
            .map_err(|_| StoreError::Timeout { what: "building a snapshot", after: Duration::from_secs(60) })?;
        Ok(m.snapshot.map_or(0, |s| s.index))
    }

    /// This replica's view of the cluster.
    pub fn status(&self) -> pb::StoreStatusResponse {
        let m = self.inner.raft.metrics().borrow().clone();
        let committed = self
            .inner
            .kv
            .get(Space::RaftMeta, b"committed")
            .ok()
            .flatten()
            .and_then(|b| pb::LogId::decode(b.as_slice()).ok())
            .map_or(0, |l| l.index);
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| pb::MemberStatus {
                id: *id,
                node: Some(codec::member_to_pb(n)),
                voter: voters.contains(id),
                matched: m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| codec::log_id_to_pb(&l)),
                last_contact_ms: match (m.state == ServerState::Leader, *id == m.id) {
                    (true, true) => 0,
                    (true, false) => self.inner.peers.last_contact(*id).map_or(-1, |d| d.as_millis() as i64),
                    _ => -1,
                },
            })
            .collect();
        pb::StoreStatusResponse {
            id: m.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader_id: m.current_leader.unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            committed_index: committed,
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            revision: self.revision(),
            members,
            last_log_term: raft::log_store::last_log_id(self.inner.kv.as_ref()).map_or(0, |l| l.leader_id.term),
            epoch: self.inner.peers.epoch.clone(),
        }
    }

    /// Starts an election on this replica and waits up to `limit` for a leader; returns the
    /// leader's id (this replica when the election was won).
    pub async fn campaign(&self, limit: Duration) -> Result<u64, StoreError> {
        let before = self.inner.raft.metrics().borrow().current_term;
        self.inner.raft.trigger().elect().await.map_err(|e| StoreError::Stopped(e.to_string()))?;
        let m = self
            .inner
            .raft
            .wait(Some(limit))
            .metrics(|m| m.current_term > before && m.current_leader.is_some(), "a leader after the election")
            .await
            .map_err(|_| StoreError::Timeout { what: "an election", after: limit })?;
        Ok(m.current_leader.unwrap_or(0))
    }

    /// Whether this replica currently believes it leads.
    pub fn is_leader(&self) -> bool {
        self.inner.raft.metrics().borrow().state == ServerState::Leader
    }

    pub fn current_leader(&self) -> Option<u64> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// Stops Raft and flushes the engine.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        self.inner.raft.shutdown().await.map_err(|e| StoreError::Stopped(e.to_string()))?;
        self.inner.shared.hub.reset(self.revision(), "replica shutting down");
        self.inner.kv.flush().await?;
        Ok(())
    }
}

fn membership_response(
    log_id: &::openraft::LogId<u64>,
    m: Option<&::openraft::Membership<u64, Member>>,
) -> pb::MembershipResponse {
    pb::MembershipResponse { log_id: Some(codec::log_id_to_pb(log_id)), membership: m.map(codec::membership_to_pb) }
}
