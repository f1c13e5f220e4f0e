//! The kind registry: which kinds this Keel serves, under which apiVersion, their resource
//! names, short names and scope, and which old API versions were removed.

/// Every kind this version serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    Endpoints,
    ConfigMap,
    Secret,
    Event,
    Lease,
    ReplicaSet,
    ReplicationController,
    Deployment,
    DaemonSet,
    StatefulSet,
    ControllerRevision,
    Job,
    CronJob,
}

#[derive(Debug, Clone, Copy)]
pub struct KindInfo {
    pub kind: Kind,
    pub name: &'static str,
    /// The one served apiVersion (`v1`, `apps/v1`, ...).
    pub api_version: &'static str,
    /// Plural resource name, used in store keys and on the command line.
    pub resource: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
}

const fn k(
    kind: Kind,
    name: &'static str,
    api_version: &'static str,
    resource: &'static str,
    short_names: &'static [&'static str],
    namespaced: bool,
) -> KindInfo {
    KindInfo { kind, name, api_version, resource, short_names, namespaced }
}

pub const KINDS: &[KindInfo] = &[
    k(Kind::Namespace, "Namespace", "v1", "namespaces", &["ns"], false),
    k(Kind::Node, "Node", "v1", "nodes", &["no"], false),
    k(Kind::Pod, "Pod", "v1", "pods", &["po"], true),
    k(Kind::Service, "Service", "v1", "services", &["svc"], true),
    k(Kind::Endpoints, "Endpoints", "v1", "endpoints", &["ep"], true),
    k(Kind::ConfigMap, "ConfigMap", "v1", "configmaps", &["cm"], true),
    k(Kind::Secret, "Secret", "v1", "secrets", &[], true),
    k(Kind::Event, "Event", "v1", "events", &["ev"], true),
    k(Kind::Lease, "Lease", "coordination.k8s.io/v1", "leases", &[], true),
    k(Kind::ReplicaSet, "ReplicaSet", "apps/v1", "replicasets", &["rs"], true),
    k(Kind::ReplicationController, "ReplicationController", "v1", "replicationcontrollers", &["rc"], true),
    k(Kind::Deployment, "Deployment", "apps/v1", "deployments", &["deploy"], true),
    k(Kind::DaemonSet, "DaemonSet", "apps/v1", "daemonsets", &["ds"], true),
    k(Kind::StatefulSet, "StatefulSet", "apps/v1", "statefulsets", &["sts"], true),
    k(Kind::ControllerRevision, "ControllerRevision", "apps/v1", "controllerrevisions", &[], true),
    k(Kind::Job, "Job", "batch/v1", "jobs", &[], true),
    k(Kind::CronJob, "CronJob", "batch/v1", "cronjobs", &["cj"], true),
];

/// API versions Kubernetes removed, and where their kinds live now.
const REMOVED_VERSIONS: &[(&str, &str)] = &[
    (
        "extensions/v1beta1",
        "apps/v1 (Deployment, DaemonSet, ReplicaSet) or networking.k8s.io/v1 (Ingress, NetworkPolicy)",
    ),
    ("apps/v1beta1", "apps/v1"),
    ("apps/v1beta2", "apps/v1"),
    ("batch/v1beta1", "batch/v1"),
    ("batch/v2alpha1", "batch/v1"),
    ("coordination.k8s.io/v1beta1", "coordination.k8s.io/v1"),
    ("networking.k8s.io/v1beta1", "networking.k8s.io/v1"),
    ("rbac.authorization.k8s.io/v1beta1", "rbac.authorization.k8s.io/v1"),
    ("rbac.authorization.k8s.io/v1alpha1", "rbac.authorization.k8s.io/v1"),
    ("policy/v1beta1", "policy/v1"),
];

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KindError {
    #[error("kind {kind:?} ({api_version}) is not supported by this Keel")]
    Unsupported { kind: String, api_version: String },
    #[error("apiVersion {api_version:?} was removed from Kubernetes; use {instead}")]
    Removed { kind: String, api_version: String, instead: &'static str },
    #[error("kind {kind} is served as apiVersion {served:?}, not {api_version:?}")]
    WrongVersion { kind: String, api_version: String, served: &'static str },
}

/// The registry entry for `apiVersion` + `kind` as a manifest names them.
pub fn lookup(api_version: &str, kind: &str) -> Result<&'static KindInfo, KindError> {
    if let Some((_, instead)) = REMOVED_VERSIONS.iter().find(|(v, _)| *v == api_version) {
        return Err(KindError::Removed { kind: kind.into(), api_version: api_version.into(), instead });
    }
    match KINDS.iter().find(|k| k.name == kind) {
        Some(info) if info.api_version == api_version => Ok(info),
        Some(info) => Err(KindError::WrongVersion {
            kind: kind.into(),
            api_version: api_version.into(),
            served: info.api_version,
        }),
        None => Err(KindError::Unsupported { kind: kind.into(), api_version: api_version.into() }),
    }
}

/// Finds a kind by any name a user may type: kind, plural, singular or short name.
pub fn by_name(name: &str) -> Option<&'static KindInfo> {
    let n = name.to_ascii_lowercase();
    KINDS.iter().find(|k| {
        k.name.eq_ignore_ascii_case(&n)
            || k.resource == n
            || k.resource.strip_suffix('s') == Some(n.as_str())
            || k.short_names.contains(&n.as_str())
    })
}

pub fn info(kind: Kind) -> &'static KindInfo {
    &KINDS[kind as usize]
}

// KINDS lists every kind at its own index, so `info` is an index, never a search with a
// fallback; a registry out of order fails the build here.
const _: () = {
    let mut i = 0;
    while i < KINDS.len() {
        assert!(KINDS[i].kind as usize == i, "KINDS must list every Kind in declaration order");
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_registered_once_and_found_by_its_names() {
        for entry in KINDS {
            assert_eq!(info(entry.kind).name, entry.name);
            assert_eq!(by_name(entry.resource).map(|k| k.kind), Some(entry.kind));
            assert_eq!(by_name(entry.name).map(|k| k.kind), Some(entry.kind));
            for s in entry.short_names {
                assert_eq!(by_name(s).map(|k| k.kind), Some(entry.kind), "{s}");
            }
        }
        assert_eq!(by_name("deploy").map(|k| k.kind), Some(Kind::Deployment));
        assert_eq!(by_name("pod").map(|k| k.kind), Some(Kind::Pod));
        assert!(by_name("ingress").is_none());
    }

    #[test]
    fn removed_and_unknown_versions_say_what_to_use() {
        let e = lookup("batch/v1beta1", "CronJob").unwrap_err();
        assert!(e.to_string().contains("use batch/v1"), "{e}");
        let e = lookup("extensions/v1beta1", "Deployment").unwrap_err();
        assert!(e.to_string().contains("apps/v1"), "{e}");
        let e = lookup("networking.k8s.io/v1", "Ingress").unwrap_err();
        assert!(matches!(e, KindError::Unsupported { .. }) && e.to_string().contains("Ingress"));
        let e = lookup("v1", "Deployment").unwrap_err();
        assert!(e.to_string().contains("apps/v1"), "{e}");
        assert_eq!(lookup("apps/v1", "Deployment").unwrap().resource, "deployments");
    }
}
