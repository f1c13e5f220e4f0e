//! etcd-style transaction semantics, free of IO: compares, then puts, deletes and ranges
//! against a read view with an overlay of the writes not yet committed to the engine.
//!
//! The state machine applies a batch of Raft entries through one [`Overlay`] and writes the
//! overlay to the engine in one atomic batch. This module decides what a transaction does;
//! it never touches Raft.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use prost::Message;

use super::kv::{Batch, Kv, KvError, Space};
use crate::proto::v1 as pb;
use crate::proto::v1::{
    compare, event, request_op, response_op, Compare, DeleteRangeRequest, DeleteRangeResponse, Event, KeyValue,
    PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest,
    TxnResponse,
};

/// Prefix of user keys in [`Space::State`].
pub const USER_PREFIX: u8 = b'k';

/// A malformed request, refused before it reaches the log.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TxnError {
    #[error("key must not be empty")]
    EmptyKey,
    #[error("duplicate key {0:?} written twice in one transaction")]
    DuplicateKey(String),
    #[error("invalid compare on key {key:?}: {reason}")]
    InvalidCompare { key: String, reason: &'static str },
    #[error("request op {0} has no operation")]
    EmptyOp(usize),
    #[error("range starting at {0:?} ends at or before its start")]
    EmptyRange(String),
}

/// A key range as etcd defines it: an empty end means one key, `[0]` means every key from
/// `key` on, anything else is the half-open range `[key, end)`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
    pub single: bool,
}

impl KeyRange {
    pub fn new(key: &[u8], range_end: &[u8]) -> KeyRange {
        if range_end.is_empty() {
            KeyRange { start: key.to_vec(), end: None, single: true }
        } else if range_end == [0] {
            KeyRange { start: key.to_vec(), end: None, single: false }
        } else {
            KeyRange { start: key.to_vec(), end: Some(range_end.to_vec()), single: false }
        }
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: &[u8]) -> KeyRange {
        KeyRange::new(prefix, &prefix_end(prefix))
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        if self.single {
            return key == self.start.as_slice();
        }
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|end| key < end)
    }
}

pub use crate::grpc::prefix_end;

fn user_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(USER_PREFIX);
    k.extend_from_slice(key);
    k
}

/// Decodes a stored record (a `KeyValue` without its key).
pub fn decode_record(key: &[u8], bytes: &[u8]) -> Option<KeyValue> {
    let mut kv = KeyValue::decode(bytes).ok()?;
    kv.key = key.to_vec();
    Some(kv)
}

fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let stored = KeyValue { key: Vec::new(), ..kv.clone() };
    stored.encode_to_vec()
}

/// Reads user keys from the engine, or from pending writes laid over it.
pub struct Overlay<'a> {
    base: &'a dyn Kv,
    pending: BTreeMap<Vec<u8>, Option<KeyValue>>,
    /// Keys already read from the engine. The overlay is the only writer while it lives, so
    /// they stay valid: a create compares and then puts the same key, and a batch of creates
    /// compares the same namespace, without going back to the engine each time.
    read: RefCell<HashMap<Vec<u8>, Option<KeyValue>>>,
}

impl<'a> Overlay<'a> {
    pub fn new(base: &'a dyn Kv) -> Overlay<'a> {
        Overlay { base, pending: BTreeMap::new(), read: RefCell::default() }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, KvError> {
        if let Some(p) = self.pending.get(key) {
            return Ok(p.clone());
        }
        if let Some(kv) = self.read.borrow().get(key) {
            return Ok(kv.clone());
        }
        let stored = self.base.get(Space::State, &user_key(key))?;
        let kv = stored.and_then(|b| decode_record(key, &b));
        self.read.borrow_mut().insert(key.to_vec(), kv.clone());
        Ok(kv)
    }

    /// Every live key in the range, in key order.
    pub fn range(&self, range: &KeyRange) -> Result<Vec<KeyValue>, KvError> {
        if range.single {
            return Ok(self.get(&range.start)?.into_iter().collect());
        }
        // An inverted range is empty (as in etcd); BTreeMap::range would panic on it.
        if range.end.as_ref().is_some_and(|end| end.as_slice() <= range.start.as_slice()) {
            return Ok(Vec::new());
        }
        let start = Bound::Included(user_key(&range.start));
        let end = match &range.end {
            Some(e) => Bound::Excluded(user_key(e)),
            None => Bound::Excluded(vec![USER_PREFIX + 1]),
        };
        let mut merged: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
        for item in self.base.scan(Space::State, (start, end), false) {
            let (k, v) = item?;
            let key = &k[1..];
            if let Some(kv) = decode_record(key, &v) {
                merged.insert(key.to_vec(), kv);
            }
        }
        let pending_end = match &range.end {
            Some(e) => Bound::Excluded(e.clone()),
            None => Bound::Unbounded,
        };
        for (k, v) in self.pending.range((Bound::Included(range.start.clone()), pending_end)) {
            match v {
                Some(kv) => merged.insert(k.clone(), kv.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_values().collect())
    }

    fn set(&mut self, key: Vec<u8>, value: Option<KeyValue>) {
        self.pending.insert(key, value);
    }

    /// Moves the pending writes into an engine batch for [`Space::State`].
    pub fn into_batch(self) -> Batch {
        let mut batch = Batch::default();
        for (k, v) in self.pending {
            match v {
                Some(kv) => batch.put(user_key(&k), encode_record(&kv)),
                None => batch.delete(user_key(&k)),
            }
        }
        batch
    }
}

/// Checks a transaction before it is proposed, so that nothing malformed enters the log.
pub fn validate(req: &TxnRequest) -> Result<(), TxnError> {
    for c in &req.compare {
        if c.key.is_empty() {
            return Err(TxnError::EmptyKey);
        }
        let key = String::from_utf8_lossy(&c.key).into_owned();
        let target = compare::Target::try_from(c.target)
            .map_err(|_| TxnError::InvalidCompare { key: key.clone(), reason: "unknown target" })?;
        compare::CompareResult::try_from(c.result)
            .map_err(|_| TxnError::InvalidCompare { key: key.clone(), reason: "unknown result" })?;
        let matches = matches!(
            (target, &c.target_union),
            (compare::Target::Version, Some(compare::TargetUnion::Version(_)) | None)
                | (compare::Target::Create, Some(compare::TargetUnion::CreateRevision(_)) | None)
                | (compare::Target::Mod, Some(compare::TargetUnion::ModRevision(_)) | None)
                | (compare::Target::Value, Some(compare::TargetUnion::Value(_)) | None)
        );
        if !matches {
            return Err(TxnError::InvalidCompare { key, reason: "target and value do not match" });
        }
    }
    for ops in [&req.success, &req.failure] {
        let mut written: Vec<&[u8]> = Vec::new();
        let mut deleted: Vec<KeyRange> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match &op.request {
                None => return Err(TxnError::EmptyOp(i)),
                Some(request_op::Request::RequestPut(p)) => {
                    if p.key.is_empty() {
                        return Err(TxnError::EmptyKey);
                    }
                    if written.contains(&p.key.as_slice()) || deleted.iter().any(|d| d.contains(&p.key)) {
                        return Err(TxnError::DuplicateKey(String::from_utf8_lossy(&p.key).into_owned()));
                    }
                    written.push(&p.key);
                }
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    if d.key.is_empty() {
                        return Err(TxnError::EmptyKey);
                    }
                    check_range(&d.key, &d.range_end)?;
                    let range = KeyRange::new(&d.key, &d.range_end);
                    // etcd refuses a put and a delete of the same key in one transaction.
                    if let Some(k) = written.iter().find(|k| range.contains(k)) {
                        return Err(TxnError::DuplicateKey(String::from_utf8_lossy(k).into_owned()));
                    }
                    deleted.push(range);
                }
                Some(request_op::Request::RequestRange(r)) => {
                    if r.key.is_empty() && r.range_end != [0] {
                        return Err(TxnError::EmptyKey);
                    }
                    check_range(&r.key, &r.range_end)?;
                }
            }
        }
    }
    Ok(())
}

/// A range end must be empty (one key), `[0]` (every key from `key`) or above `key`.
pub fn check_range(key: &[u8], range_end: &[u8]) -> Result<(), TxnError> {
    if !range_end.is_empty() && range_end != [0] && range_end <= key {
        return Err(TxnError::EmptyRange(String::from_utf8_lossy(key).into_owned()));
    }
    Ok(())
}

fn compare_holds(c: &Compare, kv: Option<&KeyValue>) -> bool {
    use compare::{CompareResult as R, Target as T, TargetUnion as U};
    let ord = match (T::try_from(c.target).unwrap_or(T::Version), &c.target_union) {
        (T::Value, Some(U::Value(want))) => match kv {
            Some(kv) => kv.value.as_slice().cmp(want.as_slice()),
            // etcd: a value compare on a missing key is false whatever the operator.
            None => return false,
        },
        (T::Value, _) => return false,
        (target, union) => {
            let want = match union {
                Some(U::Version(v)) | Some(U::CreateRevision(v)) | Some(U::ModRevision(v)) => *v,
                _ => 0,
            };
            let have = match (target, kv) {
                (_, None) => 0,
                (T::Version, Some(kv)) => kv.version,
                (T::Create, Some(kv)) => kv.create_revision,
                (_, Some(kv)) => kv.mod_revision,
            };
            have.cmp(&want)
        }
    };
    match R::try_from(c.result).unwrap_or(R::Equal) {
        R::Equal => ord.is_eq(),
        R::NotEqual => !ord.is_eq(),
        R::Greater => ord.is_gt(),
        R::Less => ord.is_lt(),
    }
}

/// Serves a range request from a view. Pagination: `next_key` is the continue token.
pub fn range(view: &Overlay<'_>, req: &RangeRequest, header: ResponseHeader) -> Result<RangeResponse, KvError> {
    let all = view.range(&KeyRange::new(&req.key, &req.range_end))?;
    let count = all.len() as i64;
    if req.count_only {
        return Ok(RangeResponse { header: Some(header), count, ..Default::default() });
    }
    let limit = if req.limit > 0 { req.limit as usize } else { usize::MAX };
    let more = all.len() > limit;
    let mut kvs: Vec<KeyValue> = all.into_iter().take(limit).collect();
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    let next_key = match (more, kvs.last()) {
        (true, Some(last)) => {
            let mut k = last.key.clone();
            k.push(0);
            k
        }
        _ => Vec::new(),
    };
    Ok(RangeResponse { header: Some(header), kvs, more, count, next_key })
}

/// The outcome of applying one transaction.
pub struct Applied {
    pub response: TxnResponse,
    /// The changes, all at `revision`. Empty when nothing changed.
    pub events: Vec<Event>,
    pub revision: i64,
}

/// Applies a transaction at `current` revision. The revision rises by one if anything changed.
pub fn apply(view: &mut Overlay<'_>, current: i64, req: &TxnRequest, member_id: u64) -> Result<Applied, KvError> {
    let mut succeeded = true;
    for c in &req.compare {
        let kv = view.get(&c.key)?;
        if !compare_holds(c, kv.as_ref()) {
            succeeded = false;
            break;
        }
    }
    let ops: &[RequestOp] = if succeeded { &req.success } else { &req.failure };
    let rev = current + 1;
    let mut events = Vec::new();
    let mut responses = Vec::with_capacity(ops.len());
    // Headers inside the response carry the final revision; fixed up below.
    for op in ops {
        let resp = match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                response_op::Response::ResponseRange(range(view, r, ResponseHeader::default())?)
            }
            Some(request_op::Request::RequestPut(p)) => {
                response_op::Response::ResponsePut(put(view, p, rev, &mut events)?)
            }
            Some(request_op::Request::RequestDeleteRange(d)) => {
                response_op::Response::ResponseDeleteRange(delete(view, d, rev, &mut events)?)
            }
            None => continue,
        };
        responses.push(ResponseOp { response: Some(resp) });
    }
    let revision = if events.is_empty() { current } else { rev };
    let header = ResponseHeader { revision, member_id, raft_term: 0 };
    for r in &mut responses {
        match &mut r.response {
            Some(response_op::Response::ResponseRange(x)) => x.header = Some(header),
            Some(response_op::Response::ResponsePut(x)) => x.header = Some(header),
            Some(response_op::Response::ResponseDeleteRange(x)) => x.header = Some(header),
            None => {}
        }
    }
    Ok(Applied { response: TxnResponse { header: Some(header), succeeded, responses }, events, revision })
}

fn put(view: &mut Overlay<'_>, p: &PutRequest, rev: i64, events: &mut Vec<Event>) -> Result<PutResponse, KvError> {
    let prev = view.get(&p.key)?;
    let kv = KeyValue {
        key: p.key.clone(),
        value: p.value.clone(),
        create_revision: prev.as_ref().map_or(rev, |k| k.create_revision),
        mod_revision: rev,
        version: prev.as_ref().map_or(1, |k| k.version + 1),
    };
    view.set(p.key.clone(), Some(kv.clone()));
    events.push(Event { r#type: event::EventType::Put as i32, kv: Some(kv), prev_kv: prev.clone() });
    Ok(PutResponse { header: None, prev_kv: if p.prev_kv { prev } else { None } })
}

fn delete(
    view: &mut Overlay<'_>,
    d: &DeleteRangeRequest,
    rev: i64,
    events: &mut Vec<Event>,
) -> Result<DeleteRangeResponse, KvError> {
    let victims = view.range(&KeyRange::new(&d.key, &d.range_end))?;
    for kv in &victims {
        view.set(kv.key.clone(), None);
        let tomb = KeyValue { key: kv.key.clone(), mod_revision: rev, ..Default::default() };
        events.push(Event { r#type: event::EventType::Delete as i32, kv: Some(tomb), prev_kv: Some(kv.clone()) });
    }
    Ok(DeleteRangeResponse {
        header: None,
        deleted: victims.len() as i64,
        prev_kvs: if d.prev_kv { victims } else { Vec::new() },
    })
}

/// A put of `value` at `key`, as one operation of a transaction.
pub fn put_op(key: &str, value: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest { key: key.into(), value, prev_kv: false })),
    }
}

/// A delete of the single key `key`, as one operation of a transaction.
pub fn delete_op(key: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
            key: key.into(),
            range_end: Vec::new(),
            prev_kv: false,
        })),
    }
}

/// Compares `key`'s mod_revision with `rev` (0: the key does not exist).
pub fn mod_equals(key: &str, rev: i64) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal as i32,
        target: pb::compare::Target::Mod as i32,
        key: key.into(),
        target_union: Some(pb::compare::TargetUnion::ModRevision(rev)),
    }
}

/// Holds when `key` exists.
pub fn exists(key: &str) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Greater as i32,
        target: pb::compare::Target::Mod as i32,
        key: key.into(),
        target_union: Some(pb::compare::TargetUnion::ModRevision(0)),
    }
}

/// A (linearizable) read of every key under `prefix`.
pub fn prefix_request(prefix: &str) -> pb::RangeRequest {
    pb::RangeRequest { key: prefix.into(), range_end: prefix_end(prefix.as_bytes()), ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::kv::MemKv;

    fn put_op(k: &str, v: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.into(),
                value: v.into(),
                prev_kv: true,
            })),
        }
    }

    fn del_op(k: &str, end: &[u8]) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.to_vec(),
                prev_kv: true,
            })),
        }
    }

    fn cmp(k: &str, target: compare::Target, result: compare::CompareResult, v: i64) -> Compare {
        let union = match target {
            compare::Target::Version => compare::TargetUnion::Version(v),
            compare::Target::Create => compare::TargetUnion::CreateRevision(v),
            _ => compare::TargetUnion::ModRevision(v),
        };
        Compare { result: result as i32, target: target as i32, key: k.into(), target_union: Some(union) }
    }

    /// Applies and commits one txn; returns the applied result and the new revision.
    fn run(kv: &MemKv, rev: &mut i64, req: TxnRequest) -> Applied {
        validate(&req).unwrap();
        let mut view = Overlay::new(kv);
        let applied = apply(&mut view, *rev, &req, 1).unwrap();
        kv.write(Space::State, view.into_batch()).unwrap();
        *rev = applied.revision;
        applied
    }

    #[test]
    fn revision_rises_once_per_changing_txn_and_keys_track_versions() {
        let kv = MemKv::new();
        let mut rev = 0;
        let a =
            run(&kv, &mut rev, TxnRequest { success: vec![put_op("a", "1"), put_op("b", "1")], ..Default::default() });
        assert_eq!(a.revision, 1);
        assert_eq!(a.events.len(), 2);
        let b = run(&kv, &mut rev, TxnRequest { success: vec![put_op("a", "2")], ..Default::default() });
        assert_eq!(b.revision, 2);
        let view = Overlay::new(&kv);
        let got = view.get(b"a").unwrap().unwrap();
        assert_eq!((got.create_revision, got.mod_revision, got.version), (1, 2, 2));
        assert_eq!(got.value, b"2");
        // A txn that changes nothing keeps the revision.
        let c = run(&kv, &mut rev, TxnRequest { success: vec![del_op("zzz", b"")], ..Default::default() });
        assert_eq!(c.revision, 2);
        assert!(c.events.is_empty());
    }

    #[test]
    fn delete_then_recreate_resets_version_and_create_revision() {
        let kv = MemKv::new();
        let mut rev = 0;
        run(&kv, &mut rev, TxnRequest { success: vec![put_op("a", "1")], ..Default::default() });
        let d = run(&kv, &mut rev, TxnRequest { success: vec![del_op("a", b"")], ..Default::default() });
        assert_eq!(d.events[0].kv.as_ref().unwrap().mod_revision, 2);
        assert_eq!(d.events[0].prev_kv.as_ref().unwrap().value, b"1");
        run(&kv, &mut rev, TxnRequest { success: vec![put_op("a", "x")], ..Default::default() });
        let got = Overlay::new(&kv).get(b"a").unwrap().unwrap();
        assert_eq!((got.create_revision, got.mod_revision, got.version), (3, 3, 1));
    }

    #[test]
    fn compares_choose_between_success_and_failure() {
        let kv = MemKv::new();
        let mut rev = 0;
        use compare::{CompareResult as R, Target as T};
        // Create-if-absent succeeds once.
        let create = |rev: &mut i64| {
            run(
                &kv,
                rev,
                TxnRequest {
                    compare: vec![cmp("a", T::Version, R::Equal, 0)],
                    success: vec![put_op("a", "new")],
                    failure: vec![RequestOp {
                        request: Some(request_op::Request::RequestRange(RangeRequest {
                            key: "a".into(),
                            ..Default::default()
                        })),
                    }],
                },
            )
        };
        assert!(create(&mut rev).response.succeeded);
        let again = create(&mut rev);
        assert!(!again.response.succeeded);
        match &again.response.responses[0].response {
            Some(response_op::Response::ResponseRange(r)) => assert_eq!(r.kvs[0].value, b"new"),
            other => panic!("expected a range response, got {other:?}"),
        }
        // CAS on mod revision: stale fails, current succeeds.
        let stale = run(
            &kv,
            &mut rev,
            TxnRequest {
                compare: vec![cmp("a", T::Mod, R::Equal, 99)],
                success: vec![put_op("a", "cas")],
                ..Default::default()
            },
        );
        assert!(!stale.response.succeeded);
        assert_eq!(stale.revision, 1);
        let ok = run(
            &kv,
            &mut rev,
            TxnRequest {
                compare: vec![
                    cmp("a", T::Mod, R::Equal, 1),
                    cmp("a", T::Version, R::Greater, 0),
                    cmp("a", T::Create, R::Less, 2),
                ],
                success: vec![put_op("a", "cas")],
                ..Default::default()
            },
        );
        assert!(ok.response.succeeded);
        assert_eq!(ok.revision, 2);
        let ne = run(
            &kv,
            &mut rev,
            TxnRequest {
                compare: vec![cmp("a", T::Version, R::NotEqual, 2)],
                success: vec![put_op("a", "no")],
                ..Default::default()
            },
        );
        assert!(!ne.response.succeeded);
    }

    #[test]
    fn ranges_inside_a_txn_see_its_earlier_writes() {
        let kv = MemKv::new();
        let mut rev = 0;
        run(&kv, &mut rev, TxnRequest { success: vec![put_op("p/1", "a"), put_op("p/3", "c")], ..Default::default() });
        let t = run(
            &kv,
            &mut rev,
            TxnRequest {
                success: vec![
                    put_op("p/2", "b"),
                    del_op("p/3", b""),
                    RequestOp {
                        request: Some(request_op::Request::RequestRange(RangeRequest {
                            key: "p/".into(),
                            range_end: prefix_end(b"p/"),
                            ..Default::default()
                        })),
                    },
                ],
                ..Default::default()
            },
        );
        match &t.response.responses[2].response {
            Some(response_op::Response::ResponseRange(r)) => {
                let keys: Vec<_> = r.kvs.iter().map(|k| k.key.clone()).collect();
                assert_eq!(keys, vec![b"p/1".to_vec(), b"p/2".to_vec()]);
                assert_eq!(r.header.as_ref().unwrap().revision, 2);
            }
            other => panic!("expected a range response, got {other:?}"),
        }
    }

    #[test]
    fn prefix_range_pages_with_limit_and_continue_token_and_counts() {
        let kv = MemKv::new();
        let mut rev = 0;
        let ops = (0..7).map(|i| put_op(&format!("r/{i}"), "v")).collect();
        run(&kv, &mut rev, TxnRequest { success: ops, ..Default::default() });
        run(&kv, &mut rev, TxnRequest { success: vec![put_op("s/0", "other")], ..Default::default() });
        let view = Overlay::new(&kv);
        let mut req =
            RangeRequest { key: b"r/".to_vec(), range_end: prefix_end(b"r/"), limit: 3, ..Default::default() };
        let mut seen = Vec::new();
        loop {
            let page = range(&view, &req, ResponseHeader::default()).unwrap();
            seen.extend(page.kvs.iter().map(|k| String::from_utf8(k.key.clone()).unwrap()));
            if !page.more {
                assert!(page.next_key.is_empty());
                break;
            }
            assert!(page.kvs.len() == 3);
            req.key = page.next_key;
        }
        assert_eq!(seen, (0..7).map(|i| format!("r/{i}")).collect::<Vec<_>>());
        let count = range(
            &view,
            &RangeRequest { key: b"r/".to_vec(), range_end: prefix_end(b"r/"), count_only: true, ..Default::default() },
            ResponseHeader::default(),
        )
        .unwrap();
        assert_eq!(count.count, 7);
        assert!(count.kvs.is_empty());
        let all = range(
            &view,
            &RangeRequest { key: vec![], range_end: vec![0], ..Default::default() },
            ResponseHeader::default(),
        )
        .unwrap();
        assert_eq!(all.count, 8);
    }

    #[test]
    fn malformed_transactions_are_refused_before_the_log() {
        assert_eq!(
            validate(&TxnRequest { success: vec![put_op("a", "1"), put_op("a", "2")], ..Default::default() }),
            Err(TxnError::DuplicateKey("a".into()))
        );
        assert_eq!(
            validate(&TxnRequest { success: vec![put_op("", "1")], ..Default::default() }),
            Err(TxnError::EmptyKey)
        );
        assert_eq!(
            validate(&TxnRequest { success: vec![RequestOp { request: None }], ..Default::default() }),
            Err(TxnError::EmptyOp(0))
        );
        let bad = Compare {
            result: 0,
            target: compare::Target::Mod as i32,
            key: "a".into(),
            target_union: Some(compare::TargetUnion::Version(1)),
        };
        assert!(matches!(
            validate(&TxnRequest { compare: vec![bad], ..Default::default() }),
            Err(TxnError::InvalidCompare { .. })
        ));
    }

    #[test]
    fn an_inverted_range_is_empty_and_never_panics_with_pending_writes() {
        let kv = MemKv::new();
        let mut view = Overlay::new(&kv);
        let mut events = Vec::new();
        put(&mut view, &PutRequest { key: "a".into(), value: "1".into(), prev_kv: false }, 1, &mut events).unwrap();
        assert!(view.range(&KeyRange::new(b"c", b"b")).unwrap().is_empty());
    }

    #[test]
    fn prefix_end_handles_trailing_ff() {
        assert_eq!(prefix_end(b"a"), b"b");
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b");
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }
}
