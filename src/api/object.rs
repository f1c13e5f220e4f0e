//! Helpers over the typed object envelope: its kind, its metadata, and the split between
//! spec (owned by users and controllers) and status (owned by agents and controllers).

use super::kinds::{self, Kind, KindInfo};
use crate::proto::v1 as pb;
use pb::object::Kind as K;

/// Runs `$body` with `$o` bound to the inner object, whatever its kind.
macro_rules! each {
    ($obj:expr, $o:ident => $body:expr) => {
        match $obj {
            K::Namespace($o) => $body,
            K::Node($o) => $body,
            K::Pod($o) => $body,
            K::Service($o) => $body,
            K::Endpoints($o) => $body,
            K::ConfigMap($o) => $body,
            K::Secret($o) => $body,
            K::Event($o) => $body,
            K::Lease($o) => $body,
            K::ReplicaSet($o) => $body,
            K::ReplicationController($o) => $body,
            K::Deployment($o) => $body,
            K::DaemonSet($o) => $body,
            K::StatefulSet($o) => $body,
            K::ControllerRevision($o) => $body,
            K::Job($o) => $body,
            K::CronJob($o) => $body,
        }
    };
}

/// Runs `$body` for the kinds that have spec and status; `$other` for the rest.
macro_rules! with_status {
    ($obj:expr, $o:ident => $body:expr, _ => $other:expr) => {
        match $obj {
            K::Namespace($o) => $body,
            K::Node($o) => $body,
            K::Pod($o) => $body,
            K::Service($o) => $body,
            K::ReplicaSet($o) => $body,
            K::ReplicationController($o) => $body,
            K::Deployment($o) => $body,
            K::DaemonSet($o) => $body,
            K::StatefulSet($o) => $body,
            K::Job($o) => $body,
            K::CronJob($o) => $body,
            _ => $other,
        }
    };
}

/// A kind's own type (`pb::Pod`, `pb::Namespace`, ...) and its arm of the envelope.
pub trait Resource: Sized {
    const KIND: Kind;
    fn into_object(self) -> pb::Object;
    /// The inner object, when `obj` is of this kind.
    fn from_object(obj: pb::Object) -> Option<Self>;
    fn metadata(&self) -> Option<&pb::ObjectMeta>;
}

macro_rules! resources {
    ($($arm:ident => $ty:ident),* $(,)?) => {
        $(impl Resource for pb::$ty {
            const KIND: Kind = Kind::$arm;
            fn into_object(self) -> pb::Object {
                pb::Object { kind: Some(K::$arm(self)) }
            }
            fn from_object(obj: pb::Object) -> Option<Self> {
                match obj.kind {
                    Some(K::$arm(o)) => Some(o),
                    _ => None,
                }
            }
            fn metadata(&self) -> Option<&pb::ObjectMeta> {
                self.metadata.as_ref()
            }
        })*
    };
}

resources!(
    Namespace => Namespace,
    Node => Node,
    Pod => Pod,
    Service => Service,
    Endpoints => Endpoints,
    ConfigMap => ConfigMap,
    Secret => Secret,
    Event => CoreEvent,
    Lease => Lease,
    ReplicaSet => ReplicaSet,
    ReplicationController => ReplicationController,
    Deployment => Deployment,
    DaemonSet => DaemonSet,
    StatefulSet => StatefulSet,
    ControllerRevision => ControllerRevision,
    Job => Job,
    CronJob => CronJob,
);

pub fn kind(obj: &pb::Object) -> Option<Kind> {
    let k = obj.kind.as_ref()?;
    Some(match k {
        K::Namespace(_) => Kind::Namespace,
        K::Node(_) => Kind::Node,
        K::Pod(_) => Kind::Pod,
        K::Service(_) => Kind::Service,
        K::Endpoints(_) => Kind::Endpoints,
        K::ConfigMap(_) => Kind::ConfigMap,
        K::Secret(_) => Kind::Secret,
        K::Event(_) => Kind::Event,
        K::Lease(_) => Kind::Lease,
        K::ReplicaSet(_) => Kind::ReplicaSet,
        K::ReplicationController(_) => Kind::ReplicationController,
        K::Deployment(_) => Kind::Deployment,
        K::DaemonSet(_) => Kind::DaemonSet,
        K::StatefulSet(_) => Kind::StatefulSet,
        K::ControllerRevision(_) => Kind::ControllerRevision,
        K::Job(_) => Kind::Job,
        K::CronJob(_) => Kind::CronJob,
    })
}

pub fn info(obj: &pb::Object) -> Option<&'static KindInfo> {
    kind(obj).map(kinds::info)
}

pub fn meta(obj: &pb::Object) -> Option<&pb::ObjectMeta> {
    each!(obj.kind.as_ref()?, o => o.metadata.as_ref())
}

/// The object's metadata, created empty if absent.
pub fn meta_mut(obj: &mut pb::Object) -> Option<&mut pb::ObjectMeta> {
    Some(each!(obj.kind.as_mut()?, o => o.metadata.get_or_insert_with(Default::default)))
}

/// Sets apiVersion and kind to the served ones (they are implied by the envelope's arm).
pub fn set_type_meta(obj: &mut pb::Object) {
    let Some(info) = info(obj) else { return };
    if let Some(k) = obj.kind.as_mut() {
        each!(k, o => {
            o.api_version = info.api_version.to_string();
            o.kind = info.name.to_string();
        });
    }
}

/// Replaces `obj`'s status with `from`'s (both must be the same kind). Update uses it so that
/// spec writers cannot change status; UpdateStatus uses the reverse.
pub fn copy_status(from: &pb::Object, to: &mut pb::Object) {
    let (Some(f), Some(t)) = (from.kind.as_ref(), to.kind.as_mut()) else { return };
    macro_rules! arm {
        ($($v:ident),*) => {
            match (f, t) {
                $((K::$v(f), K::$v(t)) => t.status = f.status.clone(),)*
                _ => {}
            }
        };
    }
    arm!(
        Namespace,
        Node,
        Pod,
        Service,
        ReplicaSet,
        ReplicationController,
        Deployment,
        DaemonSet,
        StatefulSet,
        Job,
        CronJob
    );
}

/// Replaces `obj`'s spec (and every non-status field) with `from`'s, keeping `obj`'s status.
pub fn with_status_of(from_spec: &pb::Object, status_src: &pb::Object) -> pb::Object {
    let mut out = from_spec.clone();
    copy_status(status_src, &mut out);
    out
}

/// Whether the two objects' specs differ (which bumps metadata.generation). Kinds without a
/// spec compare their whole content outside metadata.
pub fn spec_changed(a: &pb::Object, b: &pb::Object) -> bool {
    let strip = |o: &pb::Object| {
        let mut o = o.clone();
        if let Some(k) = o.kind.as_mut() {
            each!(k, x => x.metadata = None);
            with_status!(k, x => x.status = None, _ => ());
        }
        o
    };
    strip(a) != strip(b)
}

/// Whether a deleted object may go now: its finalizers (and a namespace's spec finalizers)
/// are all gone, and no grace period runs (a Pod whose node is still stopping it).
pub fn releasable(obj: &pb::Object) -> bool {
    if meta(obj).and_then(|m| m.deletion_grace_period_seconds).is_some_and(|g| g > 0) {
        return false;
    }
    let spec_held = match obj.kind.as_ref() {
        Some(pb::object::Kind::Namespace(n)) => n.spec.as_ref().is_some_and(|s| !s.finalizers.is_empty()),
        _ => false,
    };
    meta(obj).is_some_and(|m| m.finalizers.is_empty()) && !spec_held
}

pub fn has_status(obj: &pb::Object) -> bool {
    obj.kind.as_ref().is_some_and(|k| with_status!(k, _o => true, _ => false))
}

/// The object's Pod spec fields used by field selectors.
pub fn pod_fields(obj: &pb::Object) -> Option<(&str, &str)> {
    match obj.kind.as_ref()? {
        K::Pod(p) => Some((
            p.spec.as_ref().map_or("", |s| s.node_name.as_str()),
            p.status.as_ref().map_or("", |s| s.phase.as_str()),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(image: &str, phase: &str) -> pb::Object {
        pb::Object {
            kind: Some(K::Pod(pb::Pod {
                metadata: Some(pb::ObjectMeta { name: "p".into(), ..Default::default() }),
                spec: Some(pb::PodSpec {
                    containers: vec![pb::Container { name: "c".into(), image: image.into(), ..Default::default() }],
                    ..Default::default()
                }),
                status: Some(pb::PodStatus { phase: phase.into(), ..Default::default() }),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn status_changes_are_not_spec_changes_and_copy_status_moves_only_status() {
        let a = pod("nginx", "Pending");
        let b = pod("nginx", "Running");
        assert!(!spec_changed(&a, &b));
        assert!(spec_changed(&a, &pod("redis", "Pending")));
        let mut c = pod("redis", "Pending");
        copy_status(&b, &mut c);
        assert_eq!(pod_fields(&c), Some(("", "Running")));
        assert!(spec_changed(&a, &c), "the spec stayed redis");
        let mut d = a.clone();
        set_type_meta(&mut d);
        assert!(matches!(d.kind, Some(K::Pod(ref p)) if p.api_version == "v1" && p.kind == "Pod"));
    }
}
