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
        Output::Table | Output::Wide => table_with(objects, opts),
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
}
