//! Kubernetes Events from control loops, aggregated the way client-go's correlator does, so
//! that a loop failing in a tight circle cannot flood the store:
//!
//! - the same event again (same object, type, reason and message) updates the stored Event:
//!   `count` rises and `lastTimestamp` moves, no new object;
//! - more than 10 different messages for the same object, type and reason within 10 minutes
//!   become one event whose message reads "(combined from similar events): ...";
//! - each object gets at most a burst of 25 events, then one every 5 minutes (a token
//!   bucket); the rest are dropped.
//!
//! The correlation state is bounded (4096 entries, oldest dropped first), as client-go's.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::client::{Client, ClientError};
use crate::proto::v1 as pb;

/// Pacing and aggregation, with client-go's defaults.
#[derive(Clone, Debug)]
pub struct EventLimits {
    /// Events an object may get at once.
    pub burst: f64,
    /// Then one every this long.
    pub refill_every: Duration,
    /// Distinct messages before similar events are combined.
    pub max_similar: usize,
    pub similar_window: Duration,
    pub cache_entries: usize,
}

impl Default for EventLimits {
    fn default() -> EventLimits {
        EventLimits {
            burst: 25.0,
            refill_every: Duration::from_secs(300),
            max_similar: 10,
            similar_window: Duration::from_secs(600),
            cache_entries: 4096,
        }
    }
}

/// A stored event this recorder wrote, for the next occurrence to update.
#[derive(Clone)]
struct Written {
    event: pb::CoreEvent,
}

struct Similar {
    messages: std::collections::HashSet<String>,
    since: Instant,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A bounded map that forgets its oldest entries first.
struct Lru<V> {
    map: HashMap<String, V>,
    order: VecDeque<String>,
    cap: usize,
}

impl<V> Lru<V> {
    fn new(cap: usize) -> Lru<V> {
        Lru { map: HashMap::new(), order: VecDeque::new(), cap: cap.max(1) }
    }

    fn get_mut(&mut self, k: &str) -> Option<&mut V> {
        self.map.get_mut(k)
    }

    fn insert(&mut self, k: String, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

struct State {
    written: Lru<Written>,
    similar: Lru<Similar>,
    buckets: Lru<Bucket>,
}

/// Writes Events as `component` (on `host`). Clones share the correlation state.
#[derive(Clone)]
pub struct EventRecorder {
    client: Client,
    component: String,
    host: String,
    limits: EventLimits,
    state: Arc<Mutex<State>>,
}

/// What the correlator decided for one event.
enum Plan {
    Drop,
    /// A new Event, remembered under the key.
    Create(pb::CoreEvent, String),
    /// The next occurrence of a remembered Event.
    Update(pb::CoreEvent, String),
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl EventRecorder {
    pub fn new(client: Client, component: &str, host: &str, limits: EventLimits) -> EventRecorder {
        let cap = limits.cache_entries;
        EventRecorder {
            client,
            component: component.to_string(),
            host: host.to_string(),
            limits,
            state: Arc::new(Mutex::new(State {
                written: Lru::new(cap),
                similar: Lru::new(cap),
                buckets: Lru::new(cap),
            })),
        }
    }

    /// Records an event in the background; failures are logged, never returned.
    pub fn emit(&self, object: &pb::ObjectReference, kind: &str, reason: &str, message: &str) {
        let (r, o) = (self.clone(), object.clone());
        let (k, re, m) = (kind.to_string(), reason.to_string(), message.to_string());
        tokio::spawn(async move {
            if let Err(e) = r.record(&o, &k, &re, &m).await {
                tracing::debug!(reason = re, error = %e, "event not recorded");
            }
        });
    }

    /// Records an event (`kind` Normal or Warning) about `object` and waits for the write.
    /// Returns whether an event was written (false: dropped by the spam filter).
    pub async fn record(
        &self,
        object: &pb::ObjectReference,
        kind: &str,
        reason: &str,
        message: &str,
    ) -> Result<bool, ClientError> {
        let plan = self.plan(object, kind, reason, message);
        let (event, key, created) = match plan {
            Plan::Drop => return Ok(false),
            Plan::Create(e, key) => (e, key, true),
            Plan::Update(e, key) => (e, key, false),
        };
        let written = if created {
            self.client.create(pb::Object { kind: Some(pb::object::Kind::Event(event.clone())) }).await
        } else {
            match self.client.update(pb::Object { kind: Some(pb::object::Kind::Event(event.clone())) }).await {
                // Deleted meanwhile (a namespace went, an admin cleaned up): start afresh.
                Err(e) if e.is_not_found() => {
                    let mut fresh = event.clone();
                    fresh.count = 1;
                    fresh.first_timestamp = fresh.last_timestamp.clone();
                    if let Some(m) = fresh.metadata.as_mut() {
                        m.resource_version.clear();
                    }
                    self.client.create(pb::Object { kind: Some(pb::object::Kind::Event(fresh)) }).await
                }
                other => other,
            }
        }?;
        if let Some(pb::object::Kind::Event(e)) = written.kind {
            self.lock().written.insert(key, Written { event: e });
        }
        Ok(true)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The correlator: spam filter, aggregation of similar events, then deduplication.
    fn plan(&self, object: &pb::ObjectReference, kind: &str, reason: &str, message: &str) -> Plan {
        let now = Instant::now();
        let mut st = self.lock();
        let object_key = format!(
            "{}\x00{}\x00{}\x00{}\x00{}\x00{}",
            self.component, self.host, object.kind, object.namespace, object.name, object.uid
        );
        // Spam filter: a token bucket per object.
        let rate = 1.0 / self.limits.refill_every.as_secs_f64().max(1e-9);
        let burst = self.limits.burst;
        let allowed = match st.buckets.get_mut(&object_key) {
            Some(b) => {
                b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
                b.at = now;
                if b.tokens >= 1.0 {
                    b.tokens -= 1.0;
                    true
                } else {
                    false
                }
            }
            None => {
                st.buckets.insert(object_key.clone(), Bucket { tokens: burst - 1.0, at: now });
                true
            }
        };
        if !allowed {
            return Plan::Drop;
        }
        // Aggregation: too many different messages for one object, type and reason.
        let similar_key = format!("{object_key}\x00{kind}\x00{reason}");
        let window = self.limits.similar_window;
        let max = self.limits.max_similar;
        let message = match st.similar.get_mut(&similar_key) {
            Some(s) if now.duration_since(s.since) <= window => {
                s.messages.insert(message.to_string());
                if s.messages.len() > max {
                    format!("(combined from similar events): {message}")
                } else {
                    message.to_string()
                }
            }
            _ => {
                let messages = [message.to_string()].into_iter().collect();
                st.similar.insert(similar_key.clone(), Similar { messages, since: now });
                message.to_string()
            }
        };
        // Every combined message counts on one Event per object, type and reason.
        let key = if message.starts_with("(combined from similar events): ") {
            format!("{similar_key}\x00(combined)")
        } else {
            format!("{similar_key}\x00{message}")
        };
        let stamp = now_rfc3339();
        if let Some(w) = st.written.get_mut(&key) {
            let mut next = w.event.clone();
            next.count += 1;
            next.last_timestamp = stamp;
            next.message = message;
            w.event = next.clone();
            return Plan::Update(next, key);
        }
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let event = pb::CoreEvent {
            metadata: Some(pb::ObjectMeta {
                name: format!("{}.{nanos:x}", object.name),
                namespace: if object.namespace.is_empty() { "default".into() } else { object.namespace.clone() },
                ..Default::default()
            }),
            involved_object: Some(object.clone()),
            reason: reason.to_string(),
            message,
            source: Some(pb::EventSource { component: self.component.clone(), host: self.host.clone() }),
            first_timestamp: stamp.clone(),
            last_timestamp: stamp,
            count: 1,
            r#type: kind.to_string(),
            reporting_component: self.component.clone(),
            reporting_instance: self.host.clone(),
            ..Default::default()
        };
        // Remembered before the write, so that an occurrence while it is written updates it
        // rather than creating another.
        st.written.insert(key.clone(), Written { event: event.clone() });
        Plan::Create(event, key)
    }

    /// Correlation entries held (bounded by the limits).
    pub fn cached(&self) -> usize {
        let st = self.lock();
        st.written.len().max(st.similar.len()).max(st.buckets.len())
    }
}

/// A reference to `obj` for an Event's involvedObject.
pub fn reference_to(obj: &pb::Object) -> pb::ObjectReference {
    let info = crate::api::object::info(obj);
    let m = crate::api::object::meta(obj).cloned().unwrap_or_default();
    pb::ObjectReference {
        kind: info.map(|i| i.name.to_string()).unwrap_or_default(),
        namespace: m.namespace,
        name: m.name,
        uid: m.uid,
        api_version: info.map(|i| i.api_version.to_string()).unwrap_or_default(),
        resource_version: m.resource_version,
        field_path: String::new(),
    }
}
