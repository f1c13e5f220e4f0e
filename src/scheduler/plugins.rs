//! The scheduler's filters and scores, each a pure function of the pod and one node's view
//! (the node and what its pods request), with Kubernetes' semantics and reason strings.

use std::collections::{BTreeMap, HashMap};

use crate::api::quantity::Quantity;
use crate::proto::v1 as pb;

/// What a pod asks of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Milli-units per resource name (cpu in millicores, memory and storage in milli-bytes).
    pub resources: BTreeMap<String, i128>,
    /// Host ports: (protocol, host IP, port).
    pub ports: Vec<(String, String, i32)>,
}

fn quantity(v: &str) -> i128 {
    Quantity::parse(v).map(|q| q.milli).unwrap_or(0)
}

/// Kubernetes' effective request of a pod: the larger of the app containers' sum and each
/// init container's own, plus the pod's overhead. Requests default to limits.
pub fn request_of(spec: &pb::PodSpec) -> Request {
    let of = |c: &pb::Container| -> BTreeMap<String, i128> {
        let r = c.resources.clone().unwrap_or_default();
        let mut m: BTreeMap<String, i128> = r.limits.iter().map(|(k, v)| (k.clone(), quantity(v))).collect();
        m.extend(r.requests.iter().map(|(k, v)| (k.clone(), quantity(v))));
        m
    };
    let mut total: BTreeMap<String, i128> = BTreeMap::new();
    for c in &spec.containers {
        for (k, v) in of(c) {
            *total.entry(k).or_default() += v;
        }
    }
    for c in &spec.init_containers {
        for (k, v) in of(c) {
            let t = total.entry(k).or_default();
            *t = (*t).max(v);
        }
    }
    for (k, v) in &spec.overhead {
        *total.entry(k.clone()).or_default() += quantity(v);
    }
    let ports = spec
        .containers
        .iter()
        .chain(&spec.init_containers)
        .flat_map(|c| &c.ports)
        .filter(|p| p.host_port > 0)
        .map(|p| {
            let proto = if p.protocol.is_empty() { "TCP".to_string() } else { p.protocol.clone() };
            let ip = if p.host_ip.is_empty() { "0.0.0.0".to_string() } else { p.host_ip.clone() };
            (proto, ip, p.host_port)
        })
        .collect();
    Request { resources: total, ports }
}

/// One node as the scheduler sees it: the node, and the sum of what its pods request.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub node: pb::Node,
    pub requested: BTreeMap<String, i128>,
    pub pods: usize,
    pub ports: Vec<(String, String, i32)>,
}

impl NodeInfo {
    pub fn new(node: pb::Node) -> NodeInfo {
        NodeInfo { node, ..Default::default() }
    }

    /// Counts `r` against the node.
    pub fn add(&mut self, r: &Request) {
        for (k, v) in &r.resources {
            *self.requested.entry(k.clone()).or_default() += v;
        }
        self.pods += 1;
        self.ports.extend(r.ports.iter().cloned());
    }

    pub fn name(&self) -> &str {
        self.node.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or_default()
    }

    fn allocatable(&self, resource: &str) -> Option<i128> {
        self.node.status.as_ref()?.allocatable.get(resource).map(|v| quantity(v))
    }

    fn labels(&self) -> HashMap<String, String> {
        self.node.metadata.as_ref().map(|m| m.labels.clone()).unwrap_or_default()
    }
}

/// Why a node does not fit, as kube-scheduler words it.
pub type Reason = String;

/// Every filter in kube-scheduler's order; the first that fails gives the node's reason.
pub fn filter(pod: &pb::PodSpec, request: &Request, n: &NodeInfo) -> Result<(), Reason> {
    unschedulable(pod, n)?;
    node_affinity(pod, n)?;
    ports(request, n)?;
    taints(pod, n)?;
    fit(request, n)?;
    Ok(())
}

/// A cordoned node takes only pods that tolerate `node.kubernetes.io/unschedulable`.
pub fn unschedulable(pod: &pb::PodSpec, n: &NodeInfo) -> Result<(), Reason> {
    let cordoned = n.node.spec.as_ref().is_some_and(|s| s.unschedulable);
    let taint =
        pb::Taint { key: "node.kubernetes.io/unschedulable".into(), effect: "NoSchedule".into(), ..Default::default() };
    if cordoned && !pod.tolerations.iter().any(|t| tolerates(t, &taint)) {
        return Err("node(s) were unschedulable".into());
    }
    Ok(())
}

/// `nodeSelector` and required node affinity.
pub fn node_affinity(pod: &pb::PodSpec, n: &NodeInfo) -> Result<(), Reason> {
    let labels = n.labels();
    let selector_ok = pod.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v));
    let required = pod
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| na.required_during_scheduling_ignored_during_execution.as_ref());
    let affinity_ok = required.is_none_or(|sel| sel.node_selector_terms.iter().any(|t| term_matches(t, n)));
    if selector_ok && affinity_ok {
        Ok(())
    } else {
        Err("node(s) didn't match Pod's node affinity/selector".into())
    }
}

/// A node selector term: all its expressions and fields hold (an empty term matches nothing).
pub fn term_matches(t: &pb::NodeSelectorTerm, n: &NodeInfo) -> bool {
    if t.match_expressions.is_empty() && t.match_fields.is_empty() {
        return false;
    }
    let labels = n.labels();
    let fields: HashMap<String, String> = [("metadata.name".to_string(), n.name().to_string())].into();
    t.match_expressions.iter().all(|r| requirement(r, &labels))
        && t.match_fields.iter().all(|r| requirement(r, &fields))
}

fn requirement(r: &pb::NodeSelectorRequirement, labels: &HashMap<String, String>) -> bool {
    let v = labels.get(&r.key);
    let num = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => v.is_some_and(|v| r.values.contains(v)),
        "NotIn" => v.is_none_or(|v| !r.values.contains(v)),
        "Exists" => v.is_some(),
        "DoesNotExist" => v.is_none(),
        "Gt" => matches!((v.and_then(|v| num(v)), r.values.first().and_then(|x| num(x))), (Some(a), Some(b)) if a > b),
        "Lt" => matches!((v.and_then(|v| num(v)), r.values.first().and_then(|x| num(x))), (Some(a), Some(b)) if a < b),
        _ => false,
    }
}

/// Whether toleration `t` tolerates `taint`.
pub fn tolerates(t: &pb::Toleration, taint: &pb::Taint) -> bool {
    if !t.effect.is_empty() && t.effect != taint.effect {
        return false;
    }
    if t.key.is_empty() {
        // An empty key with Exists tolerates everything.
        return t.operator == "Exists";
    }
    if t.key != taint.key {
        return false;
    }
    match t.operator.as_str() {
        "Exists" => true,
        "" | "Equal" => t.value == taint.value,
        _ => false,
    }
}

/// The node's taints, with `node.kubernetes.io/not-ready` when its Ready condition is not
/// True (what the node lifecycle controller would add).
pub fn effective_taints(n: &NodeInfo) -> Vec<pb::Taint> {
    let mut taints = n.node.spec.as_ref().map(|s| s.taints.clone()).unwrap_or_default();
    let ready =
        n.node.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.r#type == "Ready" && c.status == "True"));
    if !ready && !taints.iter().any(|t| t.key == "node.kubernetes.io/not-ready") {
        taints.push(pb::Taint {
            key: "node.kubernetes.io/not-ready".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        });
    }
    taints
}

/// Taints with NoSchedule or NoExecute keep off pods that do not tolerate them.
pub fn taints(pod: &pb::PodSpec, n: &NodeInfo) -> Result<(), Reason> {
    for taint in effective_taints(n) {
        if taint.effect != "NoSchedule" && taint.effect != "NoExecute" {
            continue;
        }
        if !pod.tolerations.iter().any(|t| tolerates(t, &taint)) {
            return Err(format!("node(s) had untolerated taint {{{}: {}}}", taint.key, taint.value));
        }
    }
    Ok(())
}

/// Host ports: no two pods on a node bind the same protocol and port on overlapping
/// addresses.
pub fn ports(r: &Request, n: &NodeInfo) -> Result<(), Reason> {
    let clash = r.ports.iter().any(|(proto, ip, port)| {
        n.ports
            .iter()
            .any(|(p2, ip2, port2)| proto == p2 && port == port2 && (ip == ip2 || ip == "0.0.0.0" || ip2 == "0.0.0.0"))
    });
    if clash {
        Err("node(s) didn't have free ports for the requested pod ports".into())
    } else {
        Ok(())
    }
}

/// Requests against allocatable: the pod count, then each requested resource.
pub fn fit(r: &Request, n: &NodeInfo) -> Result<(), Reason> {
    let max_pods = n.allocatable("pods").map_or(110, |p| p / 1000) as usize;
    if n.pods + 1 > max_pods {
        return Err("Too many pods".into());
    }
    for (k, v) in &r.resources {
        if *v == 0 {
            continue;
        }
        let alloc = n.allocatable(k).unwrap_or(0);
        let used = n.requested.get(k).copied().unwrap_or(0);
        if used + v > alloc {
            return Err(format!("Insufficient {k}"));
        }
    }
    Ok(())
}

/// kube-scheduler's NodeResourcesFit (LeastAllocated) and BalancedAllocation, with its
/// defaults for pods that request nothing (0.1 cpu, 200 MiB), 0..=200.
pub fn score(r: &Request, n: &NodeInfo) -> i64 {
    let get =
        |m: &BTreeMap<String, i128>, k: &str, default: i128| m.get(k).copied().filter(|v| *v > 0).unwrap_or(default);
    let cpu_req = get(&r.resources, "cpu", 100);
    let mem_req = get(&r.resources, "memory", (200i128 << 20) * 1000);
    let mut fractions = Vec::new();
    let mut least = 0i64;
    for (k, req) in [("cpu", cpu_req), ("memory", mem_req)] {
        let alloc = n.allocatable(k).unwrap_or(0);
        if alloc <= 0 {
            continue;
        }
        let used = n.requested.get(k).copied().unwrap_or(0) + req;
        least += (((alloc - used).max(0) * 100) / alloc) as i64;
        fractions.push((used as f64 / alloc as f64).min(1.0));
    }
    let least = least / 2;
    let balanced = match fractions.as_slice() {
        [a, b] => ((1.0 - (a - b).abs()) * 100.0) as i64,
        _ => 0,
    };
    least + balanced
}

/// kube-scheduler's summary of why no node fits: `0/5 nodes are available: 2 Insufficient
/// memory, 3 node(s) had untolerated taint {dedicated: gpu}.` (reasons sorted).
pub fn summary(nodes: usize, reasons: &BTreeMap<Reason, usize>) -> String {
    let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    if parts.is_empty() {
        format!("0/{nodes} nodes are available.")
    } else {
        format!("0/{nodes} nodes are available: {}.", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpu: &str, mem: &str, labels: &[(&str, &str)]) -> NodeInfo {
        NodeInfo::new(pb::Node {
            metadata: Some(pb::ObjectMeta {
                name: name.into(),
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                ..Default::default()
            }),
            status: Some(pb::NodeStatus {
                allocatable: [
                    ("cpu".to_string(), cpu.to_string()),
                    ("memory".to_string(), mem.to_string()),
                    ("pods".to_string(), "3".to_string()),
                ]
                .into(),
                conditions: vec![pb::NodeCondition {
                    r#type: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn pod(cpu: &str, mem: &str) -> pb::PodSpec {
        let mut requests = HashMap::new();
        if !cpu.is_empty() {
            requests.insert("cpu".to_string(), cpu.to_string());
        }
        if !mem.is_empty() {
            requests.insert("memory".to_string(), mem.to_string());
        }
        pb::PodSpec {
            containers: vec![pb::Container {
                name: "c".into(),
                resources: Some(pb::ResourceRequirements { requests, ..Default::default() }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn requests_count_init_containers_overhead_and_limits_as_kubernetes_does() {
        let mut spec = pod("200m", "");
        spec.containers.push(pb::Container {
            name: "d".into(),
            resources: Some(pb::ResourceRequirements {
                limits: [("cpu".to_string(), "300m".to_string())].into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        spec.init_containers.push(pb::Container {
            name: "i".into(),
            resources: Some(pb::ResourceRequirements {
                requests: [("cpu".to_string(), "1".to_string())].into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        spec.overhead.insert("cpu".into(), "50m".into());
        assert_eq!(request_of(&spec).resources["cpu"], 1050, "max(200+300, 1000) + 50");
    }

    #[test]
    fn filters_give_kubernetes_reasons() {
        let table: Vec<(&str, pb::PodSpec, NodeInfo, Result<(), &str>)> = vec![
            ("fits", pod("500m", "1Gi"), node("a", "1", "2Gi", &[]), Ok(())),
            ("cpu", pod("2", ""), node("a", "1", "2Gi", &[]), Err("Insufficient cpu")),
            ("memory", pod("", "3Gi"), node("a", "1", "2Gi", &[]), Err("Insufficient memory")),
            (
                "selector",
                pb::PodSpec { node_selector: [("disk".to_string(), "ssd".to_string())].into(), ..pod("", "") },
                node("a", "1", "1Gi", &[("disk", "hdd")]),
                Err("node(s) didn't match Pod's node affinity/selector"),
            ),
            (
                "selector matches",
                pb::PodSpec { node_selector: [("disk".to_string(), "ssd".to_string())].into(), ..pod("", "") },
                node("a", "1", "1Gi", &[("disk", "ssd")]),
                Ok(()),
            ),
        ];
        for (what, spec, n, want) in table {
            let got = filter(&spec, &request_of(&spec), &n);
            assert_eq!(got.as_ref().map_err(|e| e.as_str()), want.as_ref().map_err(|e| *e), "{what}");
        }
    }

    #[test]
    fn taints_tolerations_cordons_and_readiness() {
        let mut n = node("a", "1", "1Gi", &[]);
        n.node.spec = Some(pb::NodeSpec {
            taints: vec![pb::Taint {
                key: "dedicated".into(),
                value: "gpu".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let plain = pod("", "");
        assert_eq!(taints(&plain, &n).unwrap_err(), "node(s) had untolerated taint {dedicated: gpu}");
        let tol = |key: &str, op: &str, value: &str| pb::Toleration {
            key: key.into(),
            operator: op.into(),
            value: value.into(),
            ..Default::default()
        };
        for (t, ok) in [
            (tol("dedicated", "Equal", "gpu"), true),
            (tol("dedicated", "Equal", "cpu"), false),
            (tol("dedicated", "Exists", ""), true),
            (tol("", "Exists", ""), true),
            (tol("other", "Exists", ""), false),
        ] {
            let p = pb::PodSpec { tolerations: vec![t.clone()], ..pod("", "") };
            assert_eq!(taints(&p, &n).is_ok(), ok, "{t:?}");
        }
        let mut cordoned = node("b", "1", "1Gi", &[]);
        cordoned.node.spec = Some(pb::NodeSpec { unschedulable: true, ..Default::default() });
        assert_eq!(unschedulable(&plain, &cordoned).unwrap_err(), "node(s) were unschedulable");
        let mut not_ready = node("c", "1", "1Gi", &[]);
        not_ready.node.status.as_mut().unwrap().conditions.clear();
        assert_eq!(
            taints(&plain, &not_ready).unwrap_err(),
            "node(s) had untolerated taint {node.kubernetes.io/not-ready: }"
        );
    }

    #[test]
    fn affinity_expressions_ports_and_pod_counts() {
        let n = node("a", "1", "1Gi", &[("zone", "z1"), ("gen", "5")]);
        let term = |key: &str, op: &str, values: &[&str]| pb::NodeSelectorTerm {
            match_expressions: vec![pb::NodeSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: values.iter().map(|s| s.to_string()).collect(),
            }],
            ..Default::default()
        };
        for (t, ok) in [
            (term("zone", "In", &["z1", "z2"]), true),
            (term("zone", "NotIn", &["z1"]), false),
            (term("gpu", "DoesNotExist", &[]), true),
            (term("gen", "Gt", &["4"]), true),
            (term("gen", "Lt", &["4"]), false),
            (pb::NodeSelectorTerm::default(), false),
        ] {
            assert_eq!(term_matches(&t, &n), ok, "{t:?}");
        }
        let mut busy = node("a", "1", "1Gi", &[]);
        let with_port = pb::PodSpec {
            containers: vec![pb::Container {
                name: "c".into(),
                ports: vec![pb::ContainerPort { host_port: 8080, container_port: 80, ..Default::default() }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let r = request_of(&with_port);
        busy.add(&r);
        assert_eq!(ports(&r, &busy).unwrap_err(), "node(s) didn't have free ports for the requested pod ports");
        busy.add(&Request::default());
        busy.add(&Request::default());
        assert_eq!(fit(&Request::default(), &busy).unwrap_err(), "Too many pods");
    }

    #[test]
    fn emptier_nodes_score_higher_and_the_summary_reads_like_kubernetes() {
        let empty = node("a", "4", "8Gi", &[]);
        let mut full = node("b", "4", "8Gi", &[]);
        full.add(&request_of(&pod("3", "6Gi")));
        let r = request_of(&pod("500m", "512Mi"));
        assert!(score(&r, &empty) > score(&r, &full));
        let reasons: BTreeMap<String, usize> =
            [("Insufficient memory".to_string(), 2), ("node(s) had untolerated taint {dedicated: gpu}".to_string(), 1)]
                .into();
        assert_eq!(
            summary(3, &reasons),
            "0/3 nodes are available: 2 Insufficient memory, 1 node(s) had untolerated taint {dedicated: gpu}."
        );
    }
}
