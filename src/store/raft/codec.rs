//! Conversions between openraft's types and their protobuf form. The same encoding serves
//! the wire (replication RPCs) and the disk (the log), so it is defined once, here.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{CommittedLeaderId, EntryPayload, LeaderId, LogId, Membership, StoredMembership, Vote};
use prost::Message;

use super::{Member, Request, TypeConfig};
use crate::proto::v1 as pb;

pub type Entry = openraft::Entry<TypeConfig>;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{0} is missing a required field")]
    Missing(&'static str),
}

fn need<T>(v: Option<T>, what: &'static str) -> Result<T, CodecError> {
    v.ok_or(CodecError::Missing(what))
}

pub fn log_id_to_pb(id: &LogId<u64>) -> pb::LogId {
    pb::LogId {
        leader_id: Some(pb::LeaderId { term: id.leader_id.term, node_id: id.leader_id.node_id }),
        index: id.index,
    }
}

pub fn log_id_from_pb(id: &pb::LogId) -> Result<LogId<u64>, CodecError> {
    let l = need(id.leader_id.as_ref(), "LogId.leader_id")?;
    Ok(LogId::new(CommittedLeaderId::new(l.term, l.node_id), id.index))
}

pub fn opt_log_id_to_pb(id: &Option<LogId<u64>>) -> Option<pb::LogId> {
    id.as_ref().map(log_id_to_pb)
}

pub fn opt_log_id_from_pb(id: &Option<pb::LogId>) -> Result<Option<LogId<u64>>, CodecError> {
    id.as_ref().map(log_id_from_pb).transpose()
}

pub fn vote_to_pb(v: &Vote<u64>) -> pb::Vote {
    pb::Vote {
        leader_id: Some(pb::LeaderId { term: v.leader_id.term, node_id: v.leader_id.node_id }),
        committed: v.committed,
    }
}

pub fn vote_from_pb(v: &Option<pb::Vote>) -> Result<Vote<u64>, CodecError> {
    let v = need(v.as_ref(), "Vote")?;
    let l = need(v.leader_id.as_ref(), "Vote.leader_id")?;
    Ok(Vote { leader_id: LeaderId::new(l.term, l.node_id), committed: v.committed })
}

pub fn member_to_pb(m: &Member) -> pb::ReplicaNode {
    pb::ReplicaNode { addr: m.addr.clone(), name: m.name.clone() }
}

pub fn member_from_pb(m: &pb::ReplicaNode) -> Member {
    Member { addr: m.addr.clone(), name: m.name.clone() }
}

pub fn membership_to_pb(m: &Membership<u64, Member>) -> pb::Membership {
    pb::Membership {
        configs: m.get_joint_config().iter().map(|c| pb::NodeIdSet { ids: c.iter().copied().collect() }).collect(),
        nodes: m.nodes().map(|(id, n)| (*id, member_to_pb(n))).collect(),
    }
}

pub fn membership_from_pb(m: &pb::Membership) -> Membership<u64, Member> {
    let configs: Vec<BTreeSet<u64>> = m.configs.iter().map(|c| c.ids.iter().copied().collect()).collect();
    let nodes: BTreeMap<u64, Member> = m.nodes.iter().map(|(id, n)| (*id, member_from_pb(n))).collect();
    Membership::new(configs, nodes)
}

pub fn stored_membership_to_pb(m: &StoredMembership<u64, Member>) -> pb::StoredMembership {
    pb::StoredMembership { log_id: opt_log_id_to_pb(m.log_id()), membership: Some(membership_to_pb(m.membership())) }
}

pub fn stored_membership_from_pb(m: &pb::StoredMembership) -> Result<StoredMembership<u64, Member>, CodecError> {
    let membership = need(m.membership.as_ref(), "StoredMembership.membership")?;
    Ok(StoredMembership::new(opt_log_id_from_pb(&m.log_id)?, membership_from_pb(membership)))
}

pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(r) => pb::entry::Payload::Normal(r.0.clone()),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_to_pb(m)),
    };
    pb::Entry { log_id: Some(log_id_to_pb(&e.log_id)), payload: Some(payload) }
}

pub fn entry_from_pb(e: pb::Entry) -> Result<Entry, CodecError> {
    let log_id = log_id_from_pb(need(e.log_id.as_ref(), "Entry.log_id")?)?;
    let payload = match need(e.payload, "Entry.payload")? {
        pb::entry::Payload::Blank(_) => EntryPayload::Blank,
        pb::entry::Payload::Normal(t) => EntryPayload::Normal(Request(t)),
        pb::entry::Payload::Membership(m) => EntryPayload::Membership(membership_from_pb(&m)),
    };
    Ok(Entry { log_id, payload })
}

pub fn decode<M: Message + Default>(bytes: &[u8], what: &'static str) -> Result<M, CodecError> {
    M::decode(bytes).map_err(|source| CodecError::Decode { what, source })
}

pub fn snapshot_meta_to_pb(m: &openraft::SnapshotMeta<u64, Member>) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: opt_log_id_to_pb(&m.last_log_id),
        last_membership: Some(stored_membership_to_pb(&m.last_membership)),
        snapshot_id: m.snapshot_id.clone(),
    }
}

pub fn snapshot_meta_from_pb(m: &pb::SnapshotMeta) -> Result<openraft::SnapshotMeta<u64, Member>, CodecError> {
    Ok(openraft::SnapshotMeta {
        last_log_id: opt_log_id_from_pb(&m.last_log_id)?,
        last_membership: stored_membership_from_pb(need(m.last_membership.as_ref(), "SnapshotMeta.last_membership")?)?,
        snapshot_id: m.snapshot_id.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_protobuf() {
        let members: BTreeMap<u64, Member> =
            [(1, Member { addr: "127.0.0.1:1".into(), name: "a".into() }), (2, Member::default())].into();
        let m = Membership::new(vec![[1u64, 2].into(), [2u64].into()], members);
        let entries = vec![
            Entry { log_id: LogId::new(CommittedLeaderId::new(3, 1), 7), payload: EntryPayload::Blank },
            Entry { log_id: LogId::new(CommittedLeaderId::new(3, 2), 8), payload: EntryPayload::Membership(m) },
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(4, 2), 9),
                payload: EntryPayload::Normal(Request(pb::TxnBatch { txns: vec![pb::TxnRequest::default()] })),
            },
        ];
        for e in entries {
            let bytes = entry_to_pb(&e).encode_to_vec();
            let back = entry_from_pb(decode(&bytes, "entry").unwrap()).unwrap();
            assert_eq!(format!("{e:?}"), format!("{back:?}"));
        }
    }
}
