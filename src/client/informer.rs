//! Informers: a list-then-watch cache of one kind, as client-go's and kube-rs's.
//!
//! One task per informer is the cache's only writer. It lists (in pages), then watches from
//! the list's resourceVersion with bookmarks, which move the resume point while nothing
//! changes. A stream that ends, fails or goes silent is opened again from the last revision
//! seen, on the next replica; a revision older than the replicas' watch history (OUT_OF_RANGE)
//! makes it list again, and the difference between the cache and the new list reaches the
//! handlers as adds, updates and deletes. Many readers share the cache through cheap `Arc`
//! clones, by key or through indexes (namespace, `spec.nodeName`, owner uid, or custom ones).
//!
//! Ordering: handlers see a key's changes in revision order and never a version older than
//! one they already saw (revisions only rise, so anything at or below the cached revision of
//! its key is dropped). An [`InformerFactory`] shares one informer per kind and selector
//! within a process, so every loop of a process watches a kind once.
//!
//! It must not block: handlers run on the writer task between changes, so they only record
//! what happened (a work queue's `add`); readers never wait on the network.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::api::kinds::{self, Kind};
use crate::api::object;
use crate::proto::v1 as pb;

use super::{Client, ClientError, ListOptions, WatchOptions};

/// `namespace/name`, or `name` for cluster-scoped objects: the cache's key.
pub fn key_of(obj: &pb::Object) -> String {
    let (namespace, name) = super::namespaced_name(obj);
    key(&namespace, &name)
}

pub fn key(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

/// The namespace and name of a key.
pub fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

fn revision_of(obj: &pb::Object) -> i64 {
    object::meta(obj).and_then(|m| m.resource_version.parse().ok()).unwrap_or(0)
}

/// A change as handlers see it.
#[derive(Clone, Debug)]
pub enum Event {
    Added(Arc<pb::Object>),
    Updated {
        old: Arc<pb::Object>,
        new: Arc<pb::Object>,
    },
    /// The last state the cache held.
    Deleted(Arc<pb::Object>),
}

impl Event {
    /// The object as it is now (or was last, for a delete).
    pub fn object(&self) -> &Arc<pb::Object> {
        match self {
            Event::Added(o) | Event::Deleted(o) => o,
            Event::Updated { new, .. } => new,
        }
    }
}

pub type Handler = Arc<dyn Fn(&Event) + Send + Sync>;
/// The values an object is indexed under.
pub type IndexFn = Arc<dyn Fn(&pb::Object) -> Vec<String> + Send + Sync>;

/// Index by namespace.
pub const BY_NAMESPACE: &str = "namespace";
/// Index pods by the node they are bound to.
pub const BY_NODE: &str = "spec.nodeName";
/// Index by the uid of each owner.
pub const BY_OWNER: &str = "ownerReferences.uid";

/// Which objects an informer follows, and how.
#[derive(Clone, Debug)]
pub struct InformerOptions {
    /// Empty: every namespace.
    pub namespace: String,
    pub label_selector: String,
    pub field_selector: String,
    /// Objects per List page.
    pub page_size: i64,
    /// A stream that brings nothing, not even a bookmark (sent every second), for this long
    /// is taken for a stuck replica and opened again elsewhere.
    pub idle_timeout: Duration,
    /// The longest wait between attempts after failures.
    pub max_backoff: Duration,
}

impl Default for InformerOptions {
    fn default() -> InformerOptions {
        InformerOptions {
            namespace: String::new(),
            label_selector: String::new(),
            field_selector: String::new(),
            page_size: 500,
            idle_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// What an informer did, for tests and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InformerStats {
    /// Lists, the first included.
    pub lists: u64,
    /// Lists forced by an expired resourceVersion.
    pub expired: u64,
    /// Watch streams opened again after one ended, failed or went silent.
    pub reconnects: u64,
    /// Changes applied to the cache.
    pub events: u64,
    /// Changes dropped for being no newer than the cache.
    pub stale: u64,
}

struct Index {
    func: IndexFn,
    values: HashMap<String, HashSet<String>>,
}

impl Index {
    fn insert(&mut self, key: &str, obj: &pb::Object) {
        for v in (self.func)(obj) {
            self.values.entry(v).or_default().insert(key.to_string());
        }
    }

    fn remove(&mut self, key: &str, obj: &pb::Object) {
        for v in (self.func)(obj) {
            if let Some(set) = self.values.get_mut(&v) {
                set.remove(key);
                if set.is_empty() {
                    self.values.remove(&v);
                }
            }
        }
    }
}

#[derive(Default)]
struct Cache {
    objects: HashMap<String, Arc<pb::Object>>,
    indexes: HashMap<String, Index>,
    /// The revision the cache is known complete at (a list's, an event's or a bookmark's).
    revision: i64,
}

impl Cache {
    fn put(&mut self, key: String, obj: Arc<pb::Object>) -> Option<Arc<pb::Object>> {
        let old = self.objects.insert(key.clone(), obj.clone());
        for ix in self.indexes.values_mut() {
            if let Some(o) = &old {
                ix.remove(&key, o);
            }
            ix.insert(&key, &obj);
        }
        old
    }

    fn remove(&mut self, key: &str) -> Option<Arc<pb::Object>> {
        let old = self.objects.remove(key)?;
        for ix in self.indexes.values_mut() {
            ix.remove(key, &old);
        }
        Some(old)
    }
}

struct Inner {
    client: Client,
    kind: Kind,
    opts: InformerOptions,
    cache: RwLock<Cache>,
    /// Held while a change is applied and handed to the handlers, and while a new handler
    /// catches up, so that every handler sees every change exactly once, in order.
    handlers: Mutex<Vec<Handler>>,
    synced: tokio::sync::watch::Sender<bool>,
    lists: AtomicU64,
    expired: AtomicU64,
    reconnects: AtomicU64,
    events: AtomicU64,
    stale: AtomicU64,
}

/// Aborts the writer task when the last handle goes.
struct Task(Mutex<Option<tokio::task::JoinHandle<()>>>);

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(t) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
    }
}

/// A shared, self-updating cache of one kind. Clones share the cache and the task.
#[derive(Clone)]
pub struct Informer {
    inner: Arc<Inner>,
    task: Arc<Task>,
}

impl std::fmt::Debug for Informer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Informer").field("kind", &self.inner.kind).field("synced", &self.has_synced()).finish()
    }
}

impl Informer {
    /// An informer of `kind`; it starts with [`Informer::start`].
    pub fn new(client: Client, kind: Kind, opts: InformerOptions) -> Informer {
        let (synced, _) = tokio::sync::watch::channel(false);
        let mut cache = Cache::default();
        let by_namespace: IndexFn = Arc::new(|o: &pb::Object| vec![super::namespaced_name(o).0]);
        cache.indexes.insert(BY_NAMESPACE.into(), Index { func: by_namespace, values: HashMap::new() });
        let inner = Arc::new(Inner {
            client,
            kind,
            opts,
            cache: RwLock::new(cache),
            handlers: Mutex::new(Vec::new()),
            synced,
            lists: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            events: AtomicU64::new(0),
            stale: AtomicU64::new(0),
        });
        Informer { inner, task: Arc::new(Task(Mutex::new(None))) }
    }

    pub fn kind(&self) -> Kind {
        self.inner.kind
    }

    /// Starts the writer task (once; later calls do nothing).
    pub fn start(&self) {
        let mut t = self.task.0.lock().unwrap_or_else(|p| p.into_inner());
        if t.is_none() {
            *t = Some(tokio::spawn(run(self.inner.clone())));
        }
    }

    /// Whether the first list has filled the cache.
    pub fn has_synced(&self) -> bool {
        *self.inner.synced.borrow()
    }

    /// Waits until the first list has filled the cache.
    pub async fn wait_synced(&self) {
        let mut rx = self.inner.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Adds an index (its values for each object); existing objects are indexed at once.
    pub fn add_index(&self, name: &str, func: IndexFn) {
        let mut cache = self.write();
        let mut ix = Index { func, values: HashMap::new() };
        for (k, o) in &cache.objects {
            ix.insert(k, o);
        }
        cache.indexes.insert(name.to_string(), ix);
    }

    /// Indexes pods by `spec.nodeName`.
    pub fn index_by_node(&self) {
        self.add_index(
            BY_NODE,
            Arc::new(|o: &pb::Object| object::pod_fields(o).map(|(n, _)| n.to_string()).into_iter().collect()),
        );
    }

    /// Indexes objects by the uid of each of their owners.
    pub fn index_by_owner(&self) {
        self.add_index(
            BY_OWNER,
            Arc::new(|o: &pb::Object| {
                object::meta(o).map(|m| m.owner_references.iter().map(|r| r.uid.clone()).collect()).unwrap_or_default()
            }),
        );
    }

    /// Registers a handler. It is first told of every object already cached (as added),
    /// then of every change after them.
    pub fn add_handler(&self, handler: Handler) {
        let mut handlers = self.inner.handlers.lock().unwrap_or_else(|p| p.into_inner());
        let current: Vec<Arc<pb::Object>> = self.read().objects.values().cloned().collect();
        for o in current {
            handler(&Event::Added(o));
        }
        handlers.push(handler);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.inner.cache.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        self.inner.cache.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &str) -> Option<Arc<pb::Object>> {
        self.read().objects.get(key).cloned()
    }

    pub fn get_by_name(&self, namespace: &str, name: &str) -> Option<Arc<pb::Object>> {
        let namespace = if kinds::info(self.inner.kind).namespaced { namespace } else { "" };
        self.get(&key(namespace, name))
    }

    pub fn list(&self) -> Vec<Arc<pb::Object>> {
        self.read().objects.values().cloned().collect()
    }

    pub fn keys(&self) -> Vec<String> {
        self.read().objects.keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().objects.is_empty()
    }

    /// The objects whose index `index` holds `value`.
    pub fn by_index(&self, index: &str, value: &str) -> Vec<Arc<pb::Object>> {
        let cache = self.read();
        let Some(keys) = cache.indexes.get(index).and_then(|ix| ix.values.get(value)) else { return Vec::new() };
        keys.iter().filter_map(|k| cache.objects.get(k).cloned()).collect()
    }

    /// The revision the cache is complete at.
    pub fn revision(&self) -> i64 {
        self.read().revision
    }

    /// Every cached object by key, with its revision (for comparisons).
    pub fn snapshot(&self) -> BTreeMap<String, (i64, Arc<pb::Object>)> {
        self.read().objects.iter().map(|(k, o)| (k.clone(), (revision_of(o), o.clone()))).collect()
    }

    pub fn stats(&self) -> InformerStats {
        let i = &self.inner;
        InformerStats {
            lists: i.lists.load(Ordering::Relaxed),
            expired: i.expired.load(Ordering::Relaxed),
            reconnects: i.reconnects.load(Ordering::Relaxed),
            events: i.events.load(Ordering::Relaxed),
            stale: i.stale.load(Ordering::Relaxed),
        }
    }
}

/// How a watch stream ended.
enum End {
    /// Its start revision is no longer in the replicas' history: list again.
    Expired,
    /// Anything else: watch again from the last revision, elsewhere.
    Reconnect,
}

async fn run(inner: Arc<Inner>) {
    let mut backoff = Backoff::new(inner.opts.max_backoff);
    loop {
        let rv = match list(&inner).await {
            Ok(rv) => rv,
            Err(e) => {
                tracing::debug!(kind = ?inner.kind, error = %e, "informer: list failed; retrying");
                backoff.wait().await;
                continue;
            }
        };
        backoff.reset();
        let mut rv = rv;
        loop {
            match watch(&inner, &mut rv).await {
                End::Expired => {
                    inner.expired.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                End::Reconnect => {
                    inner.reconnects.fetch_add(1, Ordering::Relaxed);
                    backoff.wait().await;
                }
            }
        }
    }
}

/// Lists every page and makes the cache equal to the result; returns its revision.
async fn list(inner: &Inner) -> Result<String, ClientError> {
    let opts = ListOptions {
        namespace: inner.opts.namespace.clone(),
        label_selector: inner.opts.label_selector.clone(),
        field_selector: inner.opts.field_selector.clone(),
        limit: inner.opts.page_size,
        continue_token: String::new(),
    };
    let listed = inner.client.list_all(inner.kind, &opts).await?;
    inner.lists.fetch_add(1, Ordering::Relaxed);
    let revision: i64 = listed.resource_version.parse().unwrap_or(0);
    let handlers = inner.handlers.lock().unwrap_or_else(|p| p.into_inner());
    let mut events = Vec::new();
    {
        let mut cache = inner.cache.write().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashSet::new();
        for obj in listed.items {
            let k = key_of(&obj);
            seen.insert(k.clone());
            let obj = Arc::new(obj);
            match cache.objects.get(&k).cloned() {
                Some(old) if revision_of(&old) >= revision_of(&obj) => {}
                Some(old) => {
                    cache.put(k, obj.clone());
                    events.push(Event::Updated { old, new: obj });
                }
                None => {
                    cache.put(k, obj.clone());
                    events.push(Event::Added(obj));
                }
            }
        }
        let gone: Vec<String> = cache
            .objects
            .iter()
            .filter(|(k, o)| !seen.contains(*k) && revision_of(o) <= revision)
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(old) = cache.remove(&k) {
                events.push(Event::Deleted(old));
            }
        }
        cache.revision = cache.revision.max(revision);
    }
    inner.events.fetch_add(events.len() as u64, Ordering::Relaxed);
    for e in &events {
        for h in handlers.iter() {
            h(e);
        }
    }
    drop(handlers);
    inner.synced.send_replace(true);
    Ok(listed.resource_version)
}

/// Follows one watch stream from `rv`, moving `rv` with every event and bookmark.
async fn watch(inner: &Inner, rv: &mut String) -> End {
    let opts = WatchOptions {
        namespace: inner.opts.namespace.clone(),
        label_selector: inner.opts.label_selector.clone(),
        field_selector: inner.opts.field_selector.clone(),
        resource_version: rv.clone(),
        bookmarks: true,
    };
    let mut stream = match inner.client.watch(inner.kind, &opts).await {
        Ok(s) => s,
        Err(e) if e.is_expired() => return End::Expired,
        Err(e) => {
            tracing::debug!(kind = ?inner.kind, error = %e, "informer: watch not opened; retrying");
            return End::Reconnect;
        }
    };
    loop {
        let next = match tokio::time::timeout(inner.opts.idle_timeout, stream.next()).await {
            Err(_) => {
                tracing::debug!(kind = ?inner.kind, replica = stream.addr, "informer: watch silent; moving on");
                inner.client.avoid(&stream.addr);
                return End::Reconnect;
            }
            Ok(n) => n,
        };
        let ev = match next {
            Ok(Some(ev)) => ev,
            Ok(None) => {
                inner.client.avoid(&stream.addr);
                return End::Reconnect;
            }
            Err(e) if e.is_expired() => return End::Expired,
            Err(e) => {
                tracing::debug!(kind = ?inner.kind, error = %e, "informer: watch ended; resuming");
                inner.client.avoid(&stream.addr);
                return End::Reconnect;
            }
        };
        let revision: i64 = ev.resource_version.parse().unwrap_or(0);
        if ev.r#type != "BOOKMARK" {
            if let Some(obj) = ev.object {
                apply(inner, &ev.r#type, obj);
            }
        }
        let mut cache = inner.cache.write().unwrap_or_else(|p| p.into_inner());
        cache.revision = cache.revision.max(revision);
        if revision > rv.parse().unwrap_or(0) {
            *rv = ev.resource_version;
        }
    }
}

/// Applies one watch event to the cache and hands it to the handlers, unless the cache
/// already holds that version of the object or a later one.
fn apply(inner: &Inner, kind: &str, obj: pb::Object) {
    let handlers = inner.handlers.lock().unwrap_or_else(|p| p.into_inner());
    let k = key_of(&obj);
    let obj = Arc::new(obj);
    let event = {
        let mut cache = inner.cache.write().unwrap_or_else(|p| p.into_inner());
        let current = cache.objects.get(&k).cloned();
        if current.as_ref().is_some_and(|c| revision_of(c) >= revision_of(&obj)) {
            inner.stale.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match (kind, current) {
            ("DELETED", Some(old)) => {
                cache.remove(&k);
                Some(Event::Deleted(old))
            }
            ("DELETED", None) => None,
            (_, Some(old)) => {
                cache.put(k, obj.clone());
                Some(Event::Updated { old, new: obj })
            }
            (_, None) => {
                cache.put(k, obj.clone());
                Some(Event::Added(obj))
            }
        }
    };
    if let Some(e) = event {
        inner.events.fetch_add(1, Ordering::Relaxed);
        for h in handlers.iter() {
            h(&e);
        }
    }
}

/// Exponential back-off between failed attempts, with jitter.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);

    fn new(max: Duration) -> Backoff {
        Backoff { next: Backoff::FIRST, max }
    }

    fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }

    async fn wait(&mut self) {
        let jitter = rand::random_range(0.8..1.2);
        tokio::time::sleep(self.next.mul_f64(jitter)).await;
        self.next = (self.next * 2).min(self.max);
    }
}

/// Kind, namespace, label selector and field selector.
type InformerId = (Kind, String, String, String);

/// Informers shared per kind (and selector) within a process: every loop that follows a kind
/// gets the same informer, so the kind is listed and watched once.
#[derive(Clone)]
pub struct InformerFactory {
    client: Client,
    defaults: InformerOptions,
    informers: Arc<Mutex<HashMap<InformerId, Informer>>>,
}

impl InformerFactory {
    pub fn new(client: Client, defaults: InformerOptions) -> InformerFactory {
        InformerFactory { client, defaults, informers: Arc::default() }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The informer of every object of `kind`.
    pub fn informer(&self, kind: Kind) -> Informer {
        self.informer_with(kind, "", "", "")
    }

    /// The informer of the objects of `kind` in `namespace` that match the selectors.
    pub fn informer_with(&self, kind: Kind, namespace: &str, labels: &str, fields: &str) -> Informer {
        let mut map = self.informers.lock().unwrap_or_else(|p| p.into_inner());
        let id = (kind, namespace.to_string(), labels.to_string(), fields.to_string());
        map.entry(id)
            .or_insert_with(|| {
                let opts = InformerOptions {
                    namespace: namespace.to_string(),
                    label_selector: labels.to_string(),
                    field_selector: fields.to_string(),
                    ..self.defaults.clone()
                };
                Informer::new(self.client.clone(), kind, opts)
            })
            .clone()
    }

    /// Starts every informer made so far.
    pub fn start(&self) {
        for i in self.informers.lock().unwrap_or_else(|p| p.into_inner()).values() {
            i.start();
        }
    }

    /// Waits until every informer made so far has synced.
    pub async fn wait_synced(&self) {
        let all: Vec<Informer> = self.informers.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for i in all {
            i.wait_synced().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ClientAuth, ClientConfig};

    /// An informer that is never started: the tests feed it watch events directly.
    fn informer() -> Informer {
        let creds = crate::pki::Credentials { ca_pem: String::new(), cert_pem: String::new(), key_pem: String::new() };
        let auth = ClientAuth::Bearer { ca_pem: creds.ca_pem, token: "t".into() };
        let client = Client::new(&["127.0.0.1:1".into()], auth, ClientConfig::default()).unwrap();
        Informer::new(client, Kind::Pod, InformerOptions::default())
    }

    fn pod(ns: &str, name: &str, node: &str, owner: &str, rv: i64) -> pb::Object {
        pb::Object {
            kind: Some(pb::object::Kind::Pod(pb::Pod {
                metadata: Some(pb::ObjectMeta {
                    name: name.into(),
                    namespace: ns.into(),
                    resource_version: rv.to_string(),
                    owner_references: vec![pb::OwnerReference { uid: owner.into(), ..Default::default() }],
                    ..Default::default()
                }),
                spec: Some(pb::PodSpec { node_name: node.into(), ..Default::default() }),
                ..Default::default()
            })),
        }
    }

    fn names(objs: Vec<Arc<pb::Object>>) -> Vec<String> {
        let mut n: Vec<String> = objs.iter().map(|o| key_of(o)).collect();
        n.sort();
        n
    }

    #[tokio::test]
    async fn indexes_follow_adds_moves_and_deletes_and_stale_events_are_dropped() {
        let inf = informer();
        inf.index_by_node();
        inf.index_by_owner();
        inf.add_index(
            "first-letter",
            Arc::new(|o: &pb::Object| vec![key_of(o).split('/').nth(1).unwrap()[..1].to_string()]),
        );
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let s = seen.clone();
        inf.add_handler(Arc::new(move |e: &Event| {
            let kind = match e {
                Event::Added(_) => "added",
                Event::Updated { .. } => "updated",
                Event::Deleted(_) => "deleted",
            };
            s.lock().unwrap().push(format!("{kind} {} {}", key_of(e.object()), revision_of(e.object())));
        }));
        apply(&inf.inner, "ADDED", pod("a", "web-1", "n1", "rs1", 10));
        apply(&inf.inner, "ADDED", pod("a", "web-2", "n2", "rs1", 11));
        apply(&inf.inner, "ADDED", pod("b", "db-1", "n1", "rs2", 12));
        assert_eq!(names(inf.by_index(BY_NODE, "n1")), ["a/web-1", "b/db-1"]);
        assert_eq!(names(inf.by_index(BY_OWNER, "rs1")), ["a/web-1", "a/web-2"]);
        assert_eq!(names(inf.by_index(BY_NAMESPACE, "a")), ["a/web-1", "a/web-2"]);
        assert_eq!(names(inf.by_index("first-letter", "d")), ["b/db-1"]);
        // A move changes the index; an older version of it afterwards is dropped.
        apply(&inf.inner, "MODIFIED", pod("a", "web-1", "n2", "rs1", 13));
        apply(&inf.inner, "MODIFIED", pod("a", "web-1", "n1", "rs1", 12));
        assert_eq!(names(inf.by_index(BY_NODE, "n1")), ["b/db-1"]);
        assert_eq!(names(inf.by_index(BY_NODE, "n2")), ["a/web-1", "a/web-2"]);
        assert_eq!(inf.stats().stale, 1);
        apply(&inf.inner, "DELETED", pod("a", "web-2", "n2", "rs1", 14));
        assert_eq!(names(inf.by_index(BY_NODE, "n2")), ["a/web-1"]);
        assert!(inf.by_index(BY_OWNER, "rs2").len() == 1 && inf.get_by_name("a", "web-2").is_none());
        // A handler added late hears of every cached object first, then of changes.
        let late: Arc<Mutex<Vec<String>>> = Arc::default();
        let l = late.clone();
        inf.add_handler(Arc::new(move |e: &Event| l.lock().unwrap().push(key_of(e.object()))));
        let mut replayed = late.lock().unwrap().clone();
        replayed.sort();
        assert_eq!(replayed, ["a/web-1", "b/db-1"]);
        apply(&inf.inner, "ADDED", pod("c", "x", "n3", "rs3", 15));
        assert_eq!(late.lock().unwrap().last().map(String::as_str), Some("c/x"));
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "added a/web-1 10",
                "added a/web-2 11",
                "added b/db-1 12",
                "updated a/web-1 13",
                "deleted a/web-2 11",
                "added c/x 15"
            ]
        );
    }
}
