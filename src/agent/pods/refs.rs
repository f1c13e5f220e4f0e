//! What a pod refers to: ConfigMaps and Secrets (read one by one, as the node authorizer
//! allows, and cached for a few seconds so that a resync does not read them again), its own
//! fields (the downward API) and its containers' resources.
//!
//! The values of `env` (`valueFrom`), `envFrom` and the downward API are resolved here, with
//! the kubelet's messages when something is missing. When the API cannot be reached, the last
//! values read are used: running pods keep running while the control plane is away.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::api::kinds::Kind;
use crate::api::quantity::Quantity;
use crate::client::Client;
use crate::proto::v1 as pb;

/// (kind, namespace, name) → when it was read, and what was there.
type Cache = HashMap<(Kind, String, String), (Instant, Option<pb::Object>)>;

/// ConfigMaps and Secrets, read through the API and kept for `ttl`.
pub struct Refs {
    client: Client,
    ttl: Duration,
    cache: Mutex<Cache>,
}

/// Why a reference cannot be resolved, in the kubelet's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RefError(pub String);

/// The node's allocatable cpu (milli-cores) and memory (bytes): what `limits.*` give when a
/// container sets no limit.
#[derive(Debug, Clone, Copy)]
pub struct Allocatable {
    pub cpu_milli: i128,
    pub memory: i128,
}

impl Allocatable {
    /// This machine's.
    pub fn of_host() -> Allocatable {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i128;
        let mem_kib: i128 = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        Allocatable { cpu_milli: cpus * 1000, memory: mem_kib * 1024 }
    }
}

impl Refs {
    pub fn new(client: Client, ttl: Duration) -> Refs {
        Refs { client, ttl, cache: Mutex::new(HashMap::new()) }
    }

    async fn get(&self, kind: Kind, namespace: &str, name: &str) -> Result<Option<pb::Object>, RefError> {
        let key = (kind, namespace.to_string(), name.to_string());
        let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        if let Some((at, obj)) = &cached {
            if at.elapsed() < self.ttl {
                return Ok(obj.clone());
            }
        }
        match self.client.get_opt(kind, namespace, name).await {
            Ok(obj) => {
                self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (Instant::now(), obj.clone()));
                Ok(obj)
            }
            // The API is away: what was read last is still the best answer.
            Err(e) => match cached {
                Some((_, obj)) => Ok(obj),
                None => Err(RefError(format!("{} {namespace}/{name}: {e}", kind_word(kind)))),
            },
        }
    }

    /// The data of ConfigMap `namespace/name` (text and binary keys), None if it does not
    /// exist.
    pub async fn config_map(&self, namespace: &str, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>, RefError> {
        Ok(self.get(Kind::ConfigMap, namespace, name).await?.and_then(|o| match o.kind {
            Some(pb::object::Kind::ConfigMap(c)) => {
                let mut data: BTreeMap<String, Vec<u8>> =
                    c.data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
                data.extend(c.binary_data);
                Some(data)
            }
            _ => None,
        }))
    }

    /// The data of Secret `namespace/name`, None if it does not exist.
    pub async fn secret(&self, namespace: &str, name: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>, RefError> {
        Ok(self.get(Kind::Secret, namespace, name).await?.and_then(|o| match o.kind {
            Some(pb::object::Kind::Secret(s)) => Some(s.data.into_iter().collect()),
            _ => None,
        }))
    }

    /// The data of a ConfigMap or Secret that must exist unless `optional`: None when it is
    /// optional and missing.
    pub async fn source(
        &self,
        kind: Kind,
        namespace: &str,
        name: &str,
        optional: bool,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, RefError> {
        let data = match kind {
            Kind::Secret => self.secret(namespace, name).await?,
            _ => self.config_map(namespace, name).await?,
        };
        match data {
            Some(d) => Ok(Some(d)),
            None if optional => Ok(None),
            None => Err(RefError(format!("{} {name:?} not found", kind_word(kind)))),
        }
    }
}

fn kind_word(kind: Kind) -> &'static str {
    match kind {
        Kind::Secret => "secret",
        _ => "configmap",
    }
}

fn title(kind: Kind) -> &'static str {
    match kind {
        Kind::Secret => "Secret",
        _ => "ConfigMap",
    }
}

/// The environment a container gets from the API: `envFrom` in order (later sources win),
/// and the values of its `valueFrom` entries.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResolvedEnv {
    pub from: Vec<(String, String)>,
    pub values: HashMap<String, String>,
}

/// Resolves `envFrom` and every `valueFrom` of container `c` of `pod`.
pub async fn resolve_env(
    pod: &pb::Pod,
    c: &pb::Container,
    refs: &Refs,
    node: Allocatable,
) -> Result<ResolvedEnv, RefError> {
    let ns = pod.metadata.as_ref().map(|m| m.namespace.as_str()).unwrap_or_default();
    let mut out = ResolvedEnv::default();
    for from in &c.env_from {
        let (kind, name, optional) = match (&from.config_map_ref, &from.secret_ref) {
            (Some(cm), _) => (Kind::ConfigMap, cm.name.as_str(), cm.optional.unwrap_or(false)),
            (None, Some(s)) => (Kind::Secret, s.name.as_str(), s.optional.unwrap_or(false)),
            (None, None) => continue,
        };
        let Some(data) = refs.source(kind, ns, name, optional).await? else { continue };
        for (k, v) in data {
            let key = format!("{}{k}", from.prefix);
            // Keys that are no variable names are left out, as the kubelet does.
            if !is_env_name(&key) {
                continue;
            }
            out.from.retain(|(n, _)| *n != key);
            out.from.push((key, String::from_utf8_lossy(&v).into_owned()));
        }
    }
    for e in &c.env {
        let Some(src) = &e.value_from else { continue };
        let value = if let Some(r) = &src.config_map_key_ref {
            key_ref(refs, Kind::ConfigMap, ns, &r.name, &r.key, r.optional.unwrap_or(false)).await?
        } else if let Some(r) = &src.secret_key_ref {
            key_ref(refs, Kind::Secret, ns, &r.name, &r.key, r.optional.unwrap_or(false)).await?
        } else if let Some(f) = &src.field_ref {
            Some(field_value(pod, &f.field_path)?)
        } else if let Some(r) = &src.resource_field_ref {
            Some(resource_value(pod, c, r, node)?)
        } else {
            return Err(RefError(format!("env {:?}: valueFrom names no source", e.name)));
        };
        if let Some(v) = value {
            out.values.insert(e.name.clone(), v);
        }
    }
    Ok(out)
}

async fn key_ref(
    refs: &Refs,
    kind: Kind,
    ns: &str,
    name: &str,
    key: &str,
    optional: bool,
) -> Result<Option<String>, RefError> {
    let Some(data) = refs.source(kind, ns, name, optional).await? else { return Ok(None) };
    match data.get(key) {
        Some(v) => Ok(Some(String::from_utf8_lossy(v).into_owned())),
        None if optional => Ok(None),
        None => Err(RefError(format!("couldn't find key {key} in {} {ns}/{name}", title(kind)))),
    }
}

/// A C identifier-ish environment variable name, as the API accepts them.
fn is_env_name(s: &str) -> bool {
    !s.is_empty() && !s.starts_with(|c: char| c.is_ascii_digit()) && s.chars().all(|c| c.is_ascii_graphic() && c != '=')
}

/// The value of a downward-API field path of `pod`.
pub fn field_value(pod: &pb::Pod, path: &str) -> Result<String, RefError> {
    let meta = pod.metadata.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let subscript = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['"))
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_string)
    };
    let map_lines = |m: &HashMap<String, String>| {
        let sorted: BTreeMap<_, _> = m.iter().collect();
        sorted
            .iter()
            .map(|(k, v)| format!("{k}={}", serde_json::Value::String(v.to_string())))
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(match path {
        "metadata.name" => meta.name,
        "metadata.namespace" => meta.namespace,
        "metadata.uid" => meta.uid,
        "metadata.labels" => map_lines(&meta.labels),
        "metadata.annotations" => map_lines(&meta.annotations),
        "spec.nodeName" => spec.node_name,
        "spec.serviceAccountName" => spec.service_account_name,
        "status.hostIP" => status.host_ip,
        "status.hostIPs" => status.host_ips.iter().map(|i| i.ip.clone()).collect::<Vec<_>>().join(","),
        "status.podIP" => status.pod_ip,
        "status.podIPs" => status.pod_ips.iter().map(|i| i.ip.clone()).collect::<Vec<_>>().join(","),
        _ => {
            if let Some(k) = subscript("metadata.labels") {
                meta.labels.get(&k).cloned().unwrap_or_default()
            } else if let Some(k) = subscript("metadata.annotations") {
                meta.annotations.get(&k).cloned().unwrap_or_default()
            } else {
                return Err(RefError(format!("unsupported fieldPath: {path}")));
            }
        }
    })
}

/// The value of a `resourceFieldRef`: the container's request or limit (a limit not set is
/// the node's allocatable), divided by the divisor and rounded up.
pub fn resource_value(
    pod: &pb::Pod,
    c: &pb::Container,
    r: &pb::ResourceFieldSelector,
    node: Allocatable,
) -> Result<String, RefError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let target = if r.container_name.is_empty() {
        c.clone()
    } else {
        spec.containers
            .iter()
            .chain(&spec.init_containers)
            .find(|x| x.name == r.container_name)
            .cloned()
            .ok_or_else(|| RefError(format!("resourceFieldRef: no container {:?} in the pod", r.container_name)))?
    };
    let res = target.resources.unwrap_or_default();
    let q = |m: &HashMap<String, String>, k: &str| m.get(k).and_then(|v| Quantity::parse(v).ok()).map(|q| q.milli);
    let milli = match r.resource.as_str() {
        "limits.cpu" => q(&res.limits, "cpu").unwrap_or(node.cpu_milli),
        "limits.memory" => q(&res.limits, "memory").unwrap_or(node.memory * 1000),
        "limits.ephemeral-storage" => q(&res.limits, "ephemeral-storage").unwrap_or(0),
        "requests.cpu" => q(&res.requests, "cpu").unwrap_or(0),
        "requests.memory" => q(&res.requests, "memory").unwrap_or(0),
        "requests.ephemeral-storage" => q(&res.requests, "ephemeral-storage").unwrap_or(0),
        other => return Err(RefError(format!("unsupported container resource: {other:?}"))),
    };
    let divisor = if r.divisor.is_empty() {
        1000
    } else {
        Quantity::parse(&r.divisor).map_err(|e| RefError(format!("divisor {:?}: {e}", r.divisor)))?.milli
    };
    if divisor <= 0 {
        return Err(RefError(format!("divisor {:?} must be positive", r.divisor)));
    }
    Ok(((milli + divisor - 1) / divisor).to_string())
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an undefined reference is
/// left as it is, `$$` is one `$`.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(j) => {
                    let name = &inner[..j];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[j + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> pb::Pod {
        pb::Pod {
            metadata: Some(pb::ObjectMeta {
                name: "p".into(),
                namespace: "ns".into(),
                uid: "u1".into(),
                labels: [("app".to_string(), "web".to_string()), ("tier".to_string(), "a\"b".to_string())].into(),
                ..Default::default()
            }),
            spec: Some(pb::PodSpec {
                node_name: "n1".into(),
                containers: vec![pb::Container {
                    name: "c".into(),
                    resources: Some(pb::ResourceRequirements {
                        limits: [("memory".to_string(), "64Mi".to_string())].into(),
                        requests: [("cpu".to_string(), "250m".to_string())].into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(pb::PodStatus { pod_ip: "10.42.0.5".into(), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn field_paths_give_the_pods_values() {
        let p = pod();
        assert_eq!(field_value(&p, "metadata.name").unwrap(), "p");
        assert_eq!(field_value(&p, "metadata.labels['app']").unwrap(), "web");
        assert_eq!(field_value(&p, "metadata.labels").unwrap(), "app=\"web\"\ntier=\"a\\\"b\"");
        assert_eq!(field_value(&p, "status.podIP").unwrap(), "10.42.0.5");
        assert_eq!(field_value(&p, "spec.nodeName").unwrap(), "n1");
        assert!(field_value(&p, "spec.bogus").unwrap_err().0.contains("unsupported fieldPath"));
    }

    #[test]
    fn resource_fields_divide_round_up_and_default_to_the_node() {
        let p = pod();
        let c = p.spec.as_ref().unwrap().containers[0].clone();
        let node = Allocatable { cpu_milli: 2000, memory: 1 << 30 };
        let sel = |res: &str, div: &str| pb::ResourceFieldSelector {
            resource: res.into(),
            divisor: div.into(),
            ..Default::default()
        };
        assert_eq!(resource_value(&p, &c, &sel("limits.memory", "1Mi"), node).unwrap(), "64");
        assert_eq!(resource_value(&p, &c, &sel("requests.cpu", "1m"), node).unwrap(), "250");
        assert_eq!(resource_value(&p, &c, &sel("requests.cpu", ""), node).unwrap(), "1");
        assert_eq!(resource_value(&p, &c, &sel("limits.cpu", ""), node).unwrap(), "2");
        assert!(resource_value(&p, &c, &sel("limits.gpu", ""), node).is_err());
    }
}
