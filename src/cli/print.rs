//! Printing objects as kubectl does: table (and wide), yaml, json, name, jsonpath and
//! custom-columns. A list prints as one `List` object in yaml, json and jsonpath, so that
//! scripts can parse it; a single object as itself.

use std::time::SystemTime;

use serde_json::Value;

use super::jsonpath::{self, Column, Template};
use super::{CliError, Result};
use crate::api::object;
use crate::proto::v1 as pb;

/// An `-o` format.
#[derive(Debug)]
pub enum Output {
    Table,
    Wide,
    Yaml,
    Json,
    Name,
    JsonPath(Template),
    CustomColumns(Vec<Column>),
}

const FORMATS: &str = "custom-columns, custom-columns-file, json, jsonpath, jsonpath-file, name, wide, yaml";

impl Output {
    pub fn parse(s: &str) -> Result<Output> {
        let read = |f: &str| {
            std::fs::read_to_string(f).map_err(|e| CliError::Message(format!("error reading template {f}: {e}")))
        };
        let bad = |e: jsonpath::TemplateError| CliError::Message(e.to_string());
        Ok(match s.split_once('=') {
            None => match s {
                "" | "table" => Output::Table,
                "wide" => Output::Wide,
                "yaml" => Output::Yaml,
                "json" => Output::Json,
                "name" => Output::Name,
                "jsonpath" | "custom-columns" => {
                    return Err(CliError::Message(format!("{s} format specified but no template given")))
                }
                other => {
                    return Err(CliError::Message(format!(
                        "unable to match a printer suitable for the output format {other:?}, allowed formats are: {FORMATS}"
                    )))
                }
            },
            Some(("jsonpath", t)) => Output::JsonPath(Template::parse(t).map_err(bad)?),
            Some(("jsonpath-file", f)) => Output::JsonPath(Template::parse(read(f)?.trim_end()).map_err(bad)?),
            Some(("custom-columns", spec)) => Output::CustomColumns(jsonpath::columns(spec).map_err(bad)?),
            Some(("custom-columns-file", f)) => {
                // Two lines: the headers, then their paths, separated by blanks.
                let text = read(f)?;
                let mut lines = text.lines().filter(|l| !l.trim().is_empty());
                let (Some(h), Some(p)) = (lines.next(), lines.next()) else {
                    return Err(CliError::Message(format!("{f}: expected a line of headers and a line of paths")));
                };
                let (h, p): (Vec<&str>, Vec<&str>) = (h.split_whitespace().collect(), p.split_whitespace().collect());
                if h.len() != p.len() {
                    return Err(CliError::Message(format!("{f}: {} headers but {} paths", h.len(), p.len())));
                }
                let spec = h.iter().zip(&p).map(|(h, p)| format!("{h}:{p}")).collect::<Vec<_>>().join(",");
                Output::CustomColumns(jsonpath::columns(&spec).map_err(bad)?)
            }
            Some((other, _)) => {
                return Err(CliError::Message(format!(
                    "unable to match a printer suitable for the output format {other:?}, allowed formats are: {FORMATS}"
                )))
            }
        })
    }
}

/// How tables look.
#[derive(Debug, Clone, Copy, Default)]
pub struct TableOptions {
    pub all_namespaces: bool,
    pub show_labels: bool,
    /// Leave the header out (a watch prints it once).
    pub no_headers: bool,
    /// `-o wide`: the kind's extra columns.
    pub wide: bool,
}

/// The kubectl `List` that wraps the items of a list.
pub fn list_value(objects: &[pb::Object]) -> Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": objects.iter().map(crate::api::json::to_value).collect::<Vec<_>>(),
        "metadata": {"resourceVersion": ""},
    })
}

/// Prints objects in `output`: `single` for a get by name (the object itself, not a List).
pub fn render(objects: &[pb::Object], single: bool, output: &Output, opts: TableOptions) -> String {
    let data = || match (single, objects.first()) {
        (true, Some(o)) => crate::api::json::to_value(o),
        _ => list_value(objects),
    };
    match output {
        Output::Table => table_with(objects, opts),
        Output::Wide => table_with(objects, TableOptions { wide: true, ..opts }),
        Output::Yaml => serde_saphyr::to_string(&data()).unwrap_or_default(),
        Output::Json => format!("{}\n", serde_json::to_string_pretty(&data()).unwrap_or_default()),
        Output::Name => objects.iter().map(|o| format!("{}\n", super::display_name(o))).collect(),
        Output::JsonPath(t) => t.render(&data()),
        Output::CustomColumns(cols) => custom_columns(objects, cols, opts.no_headers),
    }
}

fn custom_columns(objects: &[pb::Object], cols: &[Column], no_headers: bool) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING);
    if !no_headers {
        t.set_header(cols.iter().map(|c| c.header.clone()).collect::<Vec<_>>());
    }
    for o in objects {
        let v = crate::api::json::to_value(o);
        t.add_row(cols.iter().map(|c| jsonpath::cell(c, &v)).collect::<Vec<_>>());
    }
    tidy(&t)
}

pub(crate) fn tidy(t: &comfy_table::Table) -> String {
    let text: Vec<String> =
        t.to_string().lines().map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end().to_string()).collect();
    if text.is_empty() {
        String::new()
    } else {
        format!("{}\n", text.join("\n"))
    }
}

/// `k=v,k2=v2` sorted, or `<none>`.
fn labels(m: &pb::ObjectMeta) -> String {
    let mut l: Vec<String> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    l.sort();
    if l.is_empty() {
        "<none>".into()
    } else {
        l.join(",")
    }
}

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
            let restarts: i32 = st.container_statuses.iter().map(|c| c.restart_count).sum();
            (vec!["READY", "STATUS", "RESTARTS"], vec![format!("{ready}/{total}"), pod_status(p), restarts.to_string()])
        }
        Some(K::Node(n)) => {
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"))
                .map_or("Unknown", |c| if c.status == "True" { "Ready" } else { "NotReady" });
            let cordoned = n.spec.as_ref().is_some_and(|s| s.unschedulable);
            let status = if cordoned { format!("{ready},SchedulingDisabled") } else { ready.to_string() };
            let meta = n.metadata.clone().unwrap_or_default();
            let mut roles: Vec<&str> = meta
                .labels
                .keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                .filter(|r| !r.is_empty())
                .collect();
            roles.sort();
            let roles = if roles.is_empty() { "<none>".to_string() } else { roles.join(",") };
            (vec!["STATUS", "ROLES"], vec![status, roles])
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

/// A pod's STATUS as kubectl prints it: the phase, or what a container waits for or ended
/// with, `Init:` while init containers run, `Terminating` once deleted.
pub fn pod_status(p: &pb::Pod) -> String {
    let st = p.status.clone().unwrap_or_default();
    let mut reason = if !st.reason.is_empty() {
        st.reason.clone()
    } else if st.phase.is_empty() {
        "Pending".to_string()
    } else {
        st.phase.clone()
    };
    let spec = p.spec.clone().unwrap_or_default();
    let mut initializing = false;
    for (i, c) in st.init_container_statuses.iter().enumerate() {
        let state = c.state.clone().unwrap_or_default();
        let sidecar = spec.init_containers.get(i).is_some_and(|s| s.restart_policy.as_deref() == Some("Always"));
        match (&state.terminated, &state.waiting) {
            (Some(t), _) if t.exit_code == 0 => continue,
            _ if sidecar && c.started == Some(true) => continue,
            (Some(t), _) => {
                reason = if t.reason.is_empty() {
                    format!("Init:ExitCode:{}", t.exit_code)
                } else {
                    format!("Init:{}", t.reason)
                };
            }
            (None, Some(w)) if !w.reason.is_empty() && w.reason != "PodInitializing" => {
                reason = format!("Init:{}", w.reason)
            }
            _ => reason = format!("Init:{i}/{}", spec.init_containers.len()),
        }
        initializing = true;
        break;
    }
    if !initializing {
        let mut running = false;
        for c in st.container_statuses.iter().rev() {
            let state = c.state.clone().unwrap_or_default();
            if let Some(w) = state.waiting.as_ref().filter(|w| !w.reason.is_empty()) {
                reason.clone_from(&w.reason);
            } else if let Some(t) = &state.terminated {
                reason = if !t.reason.is_empty() {
                    t.reason.clone()
                } else if t.signal != 0 {
                    format!("Signal:{}", t.signal)
                } else {
                    format!("ExitCode:{}", t.exit_code)
                };
            } else if state.running.is_some() && c.ready {
                running = true;
            }
        }
        if reason == "Completed" && running {
            reason = "Running".to_string();
        }
    }
    if p.metadata.as_ref().is_some_and(|m| !m.deletion_timestamp.is_empty()) {
        reason = "Terminating".to_string();
    }
    reason
}

/// Columns after AGE: a Node's VERSION, and `-o wide`'s extras.
fn after_age(obj: &pb::Object, wide: bool) -> (Vec<&'static str>, Vec<String>) {
    use pb::object::Kind as K;
    let or_none = |s: &str| if s.is_empty() { "<none>".to_string() } else { s.to_string() };
    match obj.kind.as_ref() {
        Some(K::Pod(p)) if wide => {
            let ip = p.status.as_ref().map(|s| s.pod_ip.clone()).unwrap_or_default();
            let node = p.spec.as_ref().map(|s| s.node_name.clone()).unwrap_or_default();
            let nominated = p.status.as_ref().map(|s| s.nominated_node_name.clone()).unwrap_or_default();
            (
                vec!["IP", "NODE", "NOMINATED NODE", "READINESS GATES"],
                vec![or_none(&ip), or_none(&node), or_none(&nominated), "<none>".into()],
            )
        }
        Some(K::Node(n)) => {
            let st = n.status.clone().unwrap_or_default();
            let info = st.node_info.clone().unwrap_or_default();
            let mut cols = vec!["VERSION"];
            let mut vals = vec![info.kubelet_version.clone()];
            if wide {
                let addr = |t: &str| {
                    st.addresses.iter().find(|a| a.r#type == t).map(|a| a.address.clone()).unwrap_or_default()
                };
                cols.extend(["INTERNAL-IP", "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION", "CONTAINER-RUNTIME"]);
                vals.extend([
                    or_none(&addr("InternalIP")),
                    or_none(&addr("ExternalIP")),
                    info.os_image.clone(),
                    info.kernel_version.clone(),
                    info.container_runtime_version.clone(),
                ]);
            }
            (cols, vals)
        }
        _ => (vec![], vec![]),
    }
}

/// A kubectl-style table of objects of one kind (empty for no objects).
pub fn table_with(objects: &[pb::Object], opts: TableOptions) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING);
    let Some(first) = objects.first() else { return String::new() };
    let (cols, _) = columns(first);
    let mut header = Vec::new();
    if opts.all_namespaces {
        header.push("NAMESPACE");
    }
    header.push("NAME");
    header.extend(cols);
    header.push("AGE");
    header.extend(after_age(first, opts.wide).0);
    if opts.show_labels {
        header.push("LABELS");
    }
    if !opts.no_headers {
        t.set_header(header);
    }
    for o in objects {
        let m = object::meta(o).cloned().unwrap_or_default();
        let mut row = Vec::new();
        if opts.all_namespaces {
            row.push(m.namespace.clone());
        }
        row.push(m.name.clone());
        row.extend(columns(o).1);
        row.push(age(&m.creation_timestamp));
        row.extend(after_age(o, opts.wide).1);
        if opts.show_labels {
            row.push(labels(&m));
        }
        t.add_row(row);
    }
    tidy(&t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(name: &str, labels: &[(&str, &str)]) -> pb::Object {
        pb::Object {
            kind: Some(pb::object::Kind::ConfigMap(pb::ConfigMap {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                metadata: Some(pb::ObjectMeta {
                    name: name.into(),
                    namespace: "default".into(),
                    labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                    ..Default::default()
                }),
                data: [("k".to_string(), "v".to_string())].into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_list_prints_as_one_list_object_that_json_and_yaml_parsers_take() {
        let objs = [cm("a", &[]), cm("b", &[])];
        let json = render(&objs, false, &Output::parse("json").unwrap(), TableOptions::default());
        let v: Value = serde_json::from_str(&json).expect("one JSON document");
        assert_eq!(v["kind"], "List");
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["items"].as_array().unwrap().len(), 2);
        assert_eq!(v["items"][1]["metadata"]["name"], "b");
        let yaml = render(&objs, false, &Output::parse("yaml").unwrap(), TableOptions::default());
        let y: Value = serde_saphyr::from_str(&yaml).expect("one YAML document");
        assert_eq!(y["items"][0]["metadata"]["name"], "a");
        let empty = render(&[], false, &Output::parse("json").unwrap(), TableOptions::default());
        assert_eq!(serde_json::from_str::<Value>(&empty).unwrap()["items"], serde_json::json!([]));
        let one = render(&objs[..1], true, &Output::parse("json").unwrap(), TableOptions::default());
        assert_eq!(serde_json::from_str::<Value>(&one).unwrap()["kind"], "ConfigMap", "a get by name is the object");
    }

    #[test]
    fn jsonpath_custom_columns_and_labels() {
        let objs = [cm("a", &[("app", "web"), ("tier", "fe")]), cm("b", &[])];
        let names = render(
            &objs,
            false,
            &Output::parse("jsonpath={.items[*].metadata.name}").unwrap(),
            TableOptions::default(),
        );
        assert_eq!(names, "a b");
        let cols = render(
            &objs,
            false,
            &Output::parse("custom-columns=NAME:.metadata.name,APP:.metadata.labels.app").unwrap(),
            TableOptions::default(),
        );
        assert_eq!(cols, "NAME  APP\na     web\nb     <none>\n");
        let t = render(&objs, false, &Output::Table, TableOptions { show_labels: true, ..Default::default() });
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("LABELS"), "{t}");
        assert!(lines[1].ends_with("app=web,tier=fe"), "{t}");
        assert!(lines[2].ends_with("<none>"), "{t}");
        let e = Output::parse("xml").unwrap_err().to_string();
        assert!(e.contains("allowed formats are"), "{e}");
        assert!(Output::parse("jsonpath={.items[").is_err());
    }

    #[test]
    fn pod_status_reads_like_kubectl() {
        let pod = |waiting: Option<&str>, deleting: bool| pb::Pod {
            metadata: Some(pb::ObjectMeta {
                name: "p".into(),
                deletion_timestamp: if deleting { "2026-01-01T00:00:00Z".into() } else { String::new() },
                ..Default::default()
            }),
            spec: Some(pb::PodSpec {
                containers: vec![Default::default()],
                node_name: "n1".into(),
                ..Default::default()
            }),
            status: Some(pb::PodStatus {
                phase: "Pending".into(),
                pod_ip: "10.42.0.5".into(),
                container_statuses: vec![pb::ContainerStatus {
                    state: Some(pb::ContainerState {
                        waiting: waiting
                            .map(|r| pb::ContainerStateWaiting { reason: r.into(), message: String::new() }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(pod_status(&pod(Some("ImagePullBackOff"), false)), "ImagePullBackOff");
        assert_eq!(pod_status(&pod(None, false)), "Pending");
        assert_eq!(pod_status(&pod(Some("CrashLoopBackOff"), true)), "Terminating");
        let obj = pb::Object { kind: Some(pb::object::Kind::Pod(pod(Some("ContainerCreating"), false))) };
        let wide = render(&[obj], false, &Output::Wide, TableOptions::default());
        let mut lines = wide.lines().map(|l| l.split_whitespace().collect::<Vec<_>>());
        let header = lines.next().unwrap();
        assert_eq!(header[header.len() - 6..], ["IP", "NODE", "NOMINATED", "NODE", "READINESS", "GATES"], "{wide}");
        let row = lines.next().unwrap();
        assert_eq!(row[2], "ContainerCreating", "{wide}");
        assert_eq!(row[row.len() - 4..], ["10.42.0.5", "n1", "<none>", "<none>"], "{wide}");
    }
}
