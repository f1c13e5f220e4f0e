//! The typed Objects API: get, list (a page, or every page), watch, create, update,
//! update_status, apply and delete, each with the retry policy its kind of call allows.

use crate::api::kinds::{self, Kind};
use crate::api::object::{self, Resource};
use crate::proto::v1 as pb;
use crate::proto::v1::objects_client::ObjectsClient;

use super::retry::CallKind;
use super::{Client, ClientError};

/// What a List asks for.
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    /// Empty: every namespace (and always for cluster-scoped kinds).
    pub namespace: String,
    pub label_selector: String,
    pub field_selector: String,
    /// Objects per page; 0 lets the server send everything at once.
    pub limit: i64,
    /// The previous page's continue token.
    pub continue_token: String,
}

impl ListOptions {
    pub fn namespace(namespace: &str) -> ListOptions {
        ListOptions { namespace: namespace.to_string(), ..Default::default() }
    }
}

/// Every object of a list, and the revision to watch from.
#[derive(Clone, Debug, Default)]
pub struct ObjectList {
    pub items: Vec<pb::Object>,
    pub resource_version: String,
}

/// What a Watch asks for.
#[derive(Clone, Debug, Default)]
pub struct WatchOptions {
    pub namespace: String,
    pub label_selector: String,
    pub field_selector: String,
    /// Start after this revision (a List's); empty: from now on.
    pub resource_version: String,
    /// Ask for BOOKMARK events, which move the resume point while nothing changes.
    pub bookmarks: bool,
}

/// What a Delete asks for.
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    /// Background (default), Foreground or Orphan.
    pub propagation_policy: String,
    /// When set, the delete is a conflict unless the object is still at this revision.
    pub resource_version: String,
    /// A Pod's grace period (unset: its terminationGracePeriodSeconds); 0 deletes it now.
    pub grace_period_seconds: Option<i64>,
    /// When set, the delete is a conflict unless the object has this uid.
    pub uid: String,
}

/// An open watch on one replica.
pub struct WatchStream {
    /// The replica serving it.
    pub addr: String,
    inner: tonic::Streaming<pb::WatchEvent>,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl WatchStream {
    /// The next event; `Ok(None)` when the replica ended the stream.
    pub async fn next(&mut self) -> Result<Option<pb::WatchEvent>, ClientError> {
        self.inner.message().await.map_err(|status| ClientError::Status { addr: self.addr.clone(), status })
    }
}

fn reference(kind: Kind, namespace: &str, name: &str) -> pb::ObjectRef {
    let info = kinds::info(kind);
    let namespace = if info.namespaced { namespace } else { "" };
    pb::ObjectRef { kind: info.name.to_string(), namespace: namespace.to_string(), name: name.to_string() }
}

impl Client {
    fn objects(&self, ch: super::AuthChannel) -> ObjectsClient<super::AuthChannel> {
        // Objects are bounded by the server's own limits, far below this.
        ObjectsClient::new(ch)
            .max_decoding_message_size(super::MAX_MESSAGE)
            .max_encoding_message_size(super::MAX_MESSAGE)
    }

    pub async fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<pb::Object, ClientError> {
        let r = reference(kind, namespace, name);
        let (obj, _) = self
            .call(CallKind::Read, |ch| {
                let req = self.request(pb::GetRequest { r#ref: Some(r.clone()) });
                async move { self.objects(ch).get(req).await }
            })
            .await?;
        Ok(obj)
    }

    /// The object, or None when it does not exist.
    pub async fn get_opt(&self, kind: Kind, namespace: &str, name: &str) -> Result<Option<pb::Object>, ClientError> {
        match self.get(kind, namespace, name).await {
            Ok(o) => Ok(Some(o)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The object as its own type (`client.get_as::<pb::Namespace>("", "default")`).
    pub async fn get_as<R: Resource>(&self, namespace: &str, name: &str) -> Result<R, ClientError> {
        let obj = self.get(R::KIND, namespace, name).await?;
        R::from_object(obj).ok_or_else(|| ClientError::Status {
            addr: String::new(),
            status: tonic::Status::internal(format!("the server answered a get of a {:?} with another kind", R::KIND)),
        })
    }

    /// One page.
    pub async fn list(&self, kind: Kind, opts: &ListOptions) -> Result<pb::ListResponse, ClientError> {
        let req = pb::ListRequest {
            kind: kinds::info(kind).name.to_string(),
            namespace: opts.namespace.clone(),
            label_selector: opts.label_selector.clone(),
            field_selector: opts.field_selector.clone(),
            limit: opts.limit,
            r#continue: opts.continue_token.clone(),
        };
        let (list, _) = self
            .call(CallKind::Read, |ch| {
                let req = self.request(req.clone());
                async move { self.objects(ch).list(req).await }
            })
            .await?;
        Ok(list)
    }

    /// Every page, `opts.limit` objects at a time (500 when unset, as client-go pages). The
    /// resourceVersion is the first page's: every page is read as of it, and a watch from it
    /// misses nothing.
    pub async fn list_all(&self, kind: Kind, opts: &ListOptions) -> Result<ObjectList, ClientError> {
        let mut page = ListOptions { limit: if opts.limit > 0 { opts.limit } else { 500 }, ..opts.clone() };
        let mut out = ObjectList::default();
        loop {
            let r = self.list(kind, &page).await?;
            if out.resource_version.is_empty() {
                out.resource_version = r.resource_version;
            }
            out.items.extend(r.items);
            if r.r#continue.is_empty() {
                return Ok(out);
            }
            page.continue_token = r.r#continue;
        }
    }

    /// Opens a watch on the first replica that accepts it.
    pub async fn watch(&self, kind: Kind, opts: &WatchOptions) -> Result<WatchStream, ClientError> {
        let req = pb::WatchObjectsRequest {
            kind: kinds::info(kind).name.to_string(),
            namespace: opts.namespace.clone(),
            label_selector: opts.label_selector.clone(),
            field_selector: opts.field_selector.clone(),
            resource_version: opts.resource_version.clone(),
            allow_bookmarks: opts.bookmarks,
        };
        // No deadline: a watch lives until either side ends it.
        let (inner, addr) = self
            .call(CallKind::Read, |ch| {
                let req = tonic::Request::new(req.clone());
                async move { self.objects(ch).watch(req).await }
            })
            .await?;
        Ok(WatchStream { addr, inner })
    }

    /// Creates an object. Not repeated when its outcome is unknown: a create that did
    /// happen would come back as AlreadyExists for this very client's object.
    pub async fn create(&self, obj: pb::Object) -> Result<pb::Object, ClientError> {
        check_size(&obj)?;
        let (obj, _) = self
            .call(CallKind::Write, |ch| {
                let req = self.request(pb::CreateRequest { object: Some(obj.clone()) });
                async move { self.objects(ch).create(req).await }
            })
            .await?;
        Ok(obj)
    }

    /// Replaces an object's spec and metadata (compared on resourceVersion when it is set).
    pub async fn update(&self, obj: pb::Object) -> Result<pb::Object, ClientError> {
        check_size(&obj)?;
        let (obj, _) = self
            .call(CallKind::Write, |ch| {
                let req = self.request(pb::UpdateRequest { object: Some(obj.clone()) });
                async move { self.objects(ch).update(req).await }
            })
            .await?;
        Ok(obj)
    }

    /// Replaces an object's status (compared on resourceVersion when it is set).
    pub async fn update_status(&self, obj: pb::Object) -> Result<pb::Object, ClientError> {
        check_size(&obj)?;
        let (obj, _) = self
            .call(CallKind::Write, |ch| {
                let req = self.request(pb::UpdateRequest { object: Some(obj.clone()) });
                async move { self.objects(ch).update_status(req).await }
            })
            .await?;
        Ok(obj)
    }

    /// Creates or merges manifests, all in one transaction. Applying the same manifests
    /// again ends in the same state, so an apply whose outcome is unknown is sent again.
    pub async fn apply(&self, objects: Vec<pb::Object>, dry_run: bool) -> Result<pb::ApplyResponse, ClientError> {
        for o in &objects {
            check_size(o)?;
        }
        let (r, _) = self
            .call(CallKind::Idempotent, |ch| {
                let req = self.request(pb::ApplyRequest { objects: objects.clone(), dry_run });
                async move { self.objects(ch).apply(req).await }
            })
            .await?;
        Ok(r)
    }

    pub async fn delete(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<pb::DeleteResponse, ClientError> {
        let req = pb::DeleteRequest {
            r#ref: Some(reference(kind, namespace, name)),
            propagation_policy: opts.propagation_policy.clone(),
            resource_version: opts.resource_version.clone(),
            grace_period_seconds: opts.grace_period_seconds,
            uid: opts.uid.clone(),
        };
        let (r, _) = self
            .call(CallKind::Write, |ch| {
                let req = self.request(req.clone());
                async move { self.objects(ch).delete(req).await }
            })
            .await?;
        Ok(r)
    }
}

/// Refuses, before sending, an object so large that no replica would even read the request
/// (well past every object limit, which the server reports with the object's own error), so
/// that a user never sees a transport error instead.
fn check_size(obj: &pb::Object) -> Result<(), ClientError> {
    use prost::Message;
    let len = obj.encoded_len();
    if len <= super::MAX_MESSAGE / 2 {
        return Ok(());
    }
    let info = object::info(obj).map_or("object", |i| i.name);
    let (_, name) = namespaced_name(obj);
    let message = format!(
        "Request entity too large: the {info} {name:?} is {len} bytes encoded; an object may have at most {} bytes",
        crate::api::validation::MAX_OBJECT_BYTES
    );
    Err(ClientError::Status { addr: String::new(), status: tonic::Status::invalid_argument(message) })
}

/// The namespace and name of an object, for messages and keys.
pub fn namespaced_name(obj: &pb::Object) -> (String, String) {
    object::meta(obj).map(|m| (m.namespace.clone(), m.name.clone())).unwrap_or_default()
}
