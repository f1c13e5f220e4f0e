//! Printing objects: table, wide, yaml, json and name, as kubectl does.

use std::time::SystemTime;

use crate::api::object;
use crate::proto::v1 as pb;

fn inner_json(obj: &pb::Object) -> serde_json::Value {
    crate::api::json::to_value(obj)
}

pub fn to_json(obj: &pb::Object) -> String {
    serde_json::to_string_pretty(&inner_json(obj)).unwrap_or_default()
}

pub fn to_yaml(obj: &pb::Object) -> String {
    serde_saphyr::to_string(&inner_json(obj)).unwrap_or_default()
}

/// "5m", "3h", "2d" since an RFC 3339 timestamp.
pub fn age(ts: &str) -> String {
    let Ok(t) = humantime::parse_rfc3339(ts) else { return "<unknown>".into() };
    let secs = SystemTime::now().duration_since(t).map(|d| d.as_secs()).unwrap_or(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Kind-specific columns after NAME.
fn columns(obj: &pb::Object) -> (Vec<&'static str>, Vec<String>) {
    use pb::object::Kind as K;
    match obj.kind.as_ref() {
        Some(K::Deployment(d)) => {
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let st = d.status.clone().unwrap_or_default();
            (
                vec!["READY", "UP-TO-DATE", "AVAILABLE"],
                vec![
                    format!("{}/{want}", st.ready_replicas),
                    st.updated_replicas.to_string(),
                    st.available_replicas.to_string(),
                ],
            )
        }
        Some(K::Pod(p)) => {
            let st = p.status.clone().unwrap_or_default();
            let total = p.spec.as_ref().map_or(0, |s| s.containers.len());
            let ready = st.container_statuses.iter().filter(|c| c.ready).count();
            let phase = if st.phase.is_empty() { "Pending".to_string() } else { st.phase };
            let restarts: i32 = st.container_statuses.iter().map(|c| c.restart_count).sum();
            (vec!["READY", "STATUS", "RESTARTS"], vec![format!("{ready}/{total}"), phase, restarts.to_string()])
        }
        Some(K::Service(s)) => {
            let spec = s.spec.clone().unwrap_or_default();
            let ports = spec
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.port, if p.protocol.is_empty() { "TCP" } else { p.protocol.as_str() }))
                .collect::<Vec<_>>()
                .join(",");
            let ip = if spec.cluster_ip.is_empty() { "<none>".to_string() } else { spec.cluster_ip };
            (vec!["TYPE", "CLUSTER-IP", "PORT(S)"], vec![spec.r#type, ip, ports])
        }
        Some(K::Namespace(n)) => {
            (vec!["STATUS"], vec![n.status.as_ref().map(|s| s.phase.clone()).unwrap_or_else(|| "Active".into())])
        }
        Some(K::ConfigMap(c)) => (vec!["DATA"], vec![(c.data.len() + c.binary_data.len()).to_string()]),
        Some(K::Secret(s)) => (vec!["TYPE", "DATA"], vec![s.r#type.clone(), s.data.len().to_string()]),
        _ => (vec![], vec![]),
    }
}

/// A kubectl-style table of objects of one kind.
pub fn table(objects: &[pb::Object], all_namespaces: bool) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING);
    let Some(first) = objects.first() else { return String::new() };
    let (cols, _) = columns(first);
    let mut header = Vec::new();
    if all_namespaces {
        header.push("NAMESPACE");
    }
    header.push("NAME");
    header.extend(cols);
    header.push("AGE");
    t.set_header(header);
    for o in objects {
        let m = object::meta(o).cloned().unwrap_or_default();
        let mut row = Vec::new();
        if all_namespaces {
            row.push(m.namespace.clone());
        }
        row.push(m.name.clone());
        row.extend(columns(o).1);
        row.push(age(&m.creation_timestamp));
        t.add_row(row);
    }
    t.to_string().lines().map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end()).collect::<Vec<_>>().join("\n")
}
