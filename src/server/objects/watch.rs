//! The watch adapter of the Objects service: the store's watch of a key range becomes a
//! stream of Kubernetes watch events (ADDED, MODIFIED, DELETED, BOOKMARK) for one kind and
//! selector. Each revision's objects are decoded and encoded once, for every watcher.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prost::Message;
use tonic::Status;

use super::codec::{decode, lookup_kind, prefix};
use super::ObjectsService;
use crate::api::object;
use crate::api::selector::ObjectFilter;
use crate::pki::Identity;
use crate::proto::v1 as pb;
use crate::seal::Keyring;
use crate::server::authz::Verb;
use crate::server::limits::WatchSlot;
use crate::store::{KeyRange, Store, WatchError};

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

impl ObjectsService {
    /// Opens a watch: events after the request's revision that pass its selectors.
    pub(super) async fn open_watch(
        &self,
        r: pb::WatchObjectsRequest,
        who: Option<&Identity>,
    ) -> Result<WatchStream, Status> {
        let info = lookup_kind(&r.kind)?;
        self.authorize_read(who, Verb::Watch, info, &r.namespace, "").await?;
        let filter = ObjectFilter::parse(&r.label_selector, &r.field_selector)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let caller = who.map_or_else(|| "anonymous".to_string(), |w| w.to_string());
        let slot = self.watches.open(&caller)?;
        let start = match r.resource_version.as_str() {
            "" | "0" => 0,
            v => v
                .parse::<i64>()
                .ok()
                .filter(|rv| *rv >= 0)
                .and_then(|rv| rv.checked_add(1))
                .ok_or_else(|| Status::invalid_argument(format!("resourceVersion: Invalid value: {v:?}")))?,
        };
        let p = prefix(info, &r.namespace);
        let watch = self.store.watch(KeyRange::prefix(p.as_bytes()), start).map_err(|e| match e {
            WatchError::Compacted { requested, oldest, .. } => Status::out_of_range(format!(
                "too old resource version: {} ({}); re-list and watch from the list's resourceVersion",
                requested - 1,
                oldest - 1
            )),
            other => crate::server::status::from_watch(&other),
        })?;
        let bookmarks = r.allow_bookmarks.then(|| {
            let period = Duration::from_secs(1);
            tokio::time::interval_at(tokio::time::Instant::now() + period, period)
        });
        let stream = ObjectWatch {
            watch,
            filter,
            _slot: Some(slot),
            keys: self.keys.clone(),
            store: self.store.clone(),
            bookmarks,
            pending: VecDeque::new(),
            done: false,
        };
        Ok(Box::pin(stream))
    }
}

/// One object of a watch event as every watcher of the revision shares it: decoded (for
/// selectors) and encoded (for the wire), with its resourceVersion set to the revision.
struct SharedObject {
    object: pb::Object,
    encoded: prost::bytes::Bytes,
}

/// A change as every watcher of the revision shares it.
struct SharedEvent {
    new: Option<SharedObject>,
    old: Option<SharedObject>,
}

/// The changes of one revision, decoded and encoded once (`Events::memo`), or why they
/// cannot be.
type SharedEvents = Result<Vec<SharedEvent>, (tonic::Code, String)>;

fn share(events: &[pb::Event], revision: i64, keys: &Keyring) -> SharedEvents {
    let rev = revision.to_string();
    let one = |kv: &Option<pb::KeyValue>| -> Result<Option<SharedObject>, (tonic::Code, String)> {
        let Some(kv) = kv.as_ref().filter(|kv| !kv.value.is_empty()) else { return Ok(None) };
        let mut object = decode(kv, keys).map_err(|s| (s.code(), s.message().to_string()))?;
        if let Some(m) = object::meta_mut(&mut object) {
            m.resource_version.clone_from(&rev);
        }
        let encoded = object.encode_to_vec().into();
        Ok(Some(SharedObject { object, encoded }))
    };
    events
        .iter()
        .map(|e| {
            let is_delete = e.r#type == pb::event::EventType::Delete as i32;
            Ok(SharedEvent { new: if is_delete { None } else { one(&e.kv)? }, old: one(&e.prev_kv)? })
        })
        .collect()
}

/// The response stream of one Watch: pulls batches from the store's watch as the client
/// takes events, so each event costs one hop from the hub to the wire (no task, no channel
/// of its own). A client that stops reading stops pulling; the hub then cuts it off as slow,
/// with a resumable error.
struct ObjectWatch {
    watch: crate::store::Watch,
    filter: ObjectFilter,
    /// This watch's place in its caller's budget, given back when the stream is dropped.
    _slot: Option<WatchSlot>,
    keys: Arc<Keyring>,
    store: Store,
    bookmarks: Option<tokio::time::Interval>,
    pending: VecDeque<Result<pb::WatchEvent, Status>>,
    done: bool,
}

impl ObjectWatch {
    /// Queues the watch events of one batch (or the error that ends the watch).
    fn expand(&mut self, batch: Result<crate::store::WatchBatch, WatchError>) {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                self.pending.push_back(Err(crate::server::status::from_watch(&e)));
                self.done = true;
                return;
            }
        };
        let revision = batch.revision;
        let keys = &self.keys;
        let shared = batch
            .events
            .memo(|events| share(events, revision, keys))
            .unwrap_or_else(|| Arc::new(share(&batch.events, revision, keys)));
        let events = match shared.as_ref() {
            Ok(events) => events,
            Err((code, message)) => {
                self.pending.push_back(Err(Status::new(*code, message.clone())));
                self.done = true;
                return;
            }
        };
        let everything = self.filter.is_everything();
        let filter = &self.filter;
        for e in events {
            let matches =
                |o: &Option<SharedObject>| o.as_ref().is_some_and(|o| everything || filter.matches(&o.object));
            let was = matches(&e.old);
            let (kind, obj) = match &e.new {
                Some(n) if everything || filter.matches(&n.object) => (if was { "MODIFIED" } else { "ADDED" }, n),
                Some(n) if was => ("DELETED", n),
                Some(_) => continue,
                None => match &e.old {
                    Some(o) if was => ("DELETED", o),
                    _ => continue,
                },
            };
            self.pending.push_back(Ok(pb::WatchEvent::encoded(kind, obj.encoded.clone(), revision.to_string())));
        }
    }
}

impl Stream for ObjectWatch {
    type Item = Result<pb::WatchEvent, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if let Some(ev) = this.pending.pop_front() {
                return Poll::Ready(Some(ev));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Poll::Ready(batch) = this.watch.poll_batch(cx) {
                this.expand(batch);
                continue;
            }
            let due = this.bookmarks.as_mut().is_some_and(|b| b.poll_tick(cx).is_ready());
            if !due {
                return Poll::Pending;
            }
            // Every event up to `rev` is queued for this watch already: queue them first, so
            // that the bookmark never runs ahead of what was delivered.
            let rev = this.store.watch_revision();
            while let Some(b) = this.watch.try_next() {
                this.expand(b);
                if this.done {
                    break;
                }
            }
            if !this.done {
                let ev = pb::WatchEvent {
                    r#type: "BOOKMARK".into(),
                    resource_version: rev.to_string(),
                    ..Default::default()
                };
                this.pending.push_back(Ok(ev));
            }
        }
    }
}
