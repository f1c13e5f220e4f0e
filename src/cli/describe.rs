//! `keelctl describe`: an object's metadata, spec and status in kubectl's indented layout,
//! then the Events about it.

use std::io::Write;

use serde_json::Value;

use super::{print, Context, Result};
use crate::api::apply::LAST_APPLIED;
use crate::api::kinds::Kind;
use crate::api::{json, object};
use crate::client::{Client, ListOptions};
use crate::proto::v1 as pb;
use pb::object::Kind as K;

fn title(key: &str) -> String {
    let mut c = key.chars();
    c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some("<none>".into()),
        Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
            Some(a.iter().filter_map(scalar).collect::<Vec<_>>().join(", "))
        }
        _ => None,
    }
}

/// Fields that are string maps, shown as `key=value` lines rather than as nested fields.
const MAP_FIELDS: &[&str] =
    &["labels", "annotations", "matchLabels", "nodeSelector", "selector", "data", "stringData", "binaryData"];

/// kubectl describe's indented `Key:  value` layout for a JSON tree.
fn render(out: &mut String, v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                if let Some(map) =
                    val.as_object().filter(|m| MAP_FIELDS.contains(&k.as_str()) && m.values().all(Value::is_string))
                {
                    let items: Vec<String> =
                        map.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect();
                    let sep = format!("\n{pad}{}", " ".repeat(k.len() + 3));
                    out.push_str(&format!("{pad}{}:  {}\n", title(k), items.join(&sep)));
                    continue;
                }
                match scalar(val) {
                    Some(s) => out.push_str(&format!("{pad}{}:  {s}\n", title(k))),
                    None => {
                        out.push_str(&format!("{pad}{}:\n", title(k)));
                        render(out, val, indent + 2);
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                let mut rest = item.clone();
                match item.get("name").and_then(Value::as_str) {
                    Some(n) => {
                        out.push_str(&format!("{pad}{n}:\n"));
                        if let Value::Object(m) = &mut rest {
                            m.remove("name");
                        }
                        render(out, &rest, indent + 2);
                    }
                    None => {
                        // `- First:  value` then the item's other fields under it.
                        let mut text = String::new();
                        render(&mut text, &rest, indent + 2);
                        out.push_str(&format!("{pad}- {}", text.get(indent + 2..).unwrap_or_default()));
                    }
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other).unwrap_or_default())),
    }
}

fn pairs(map: &std::collections::HashMap<String, String>, skip: &str) -> String {
    let mut items: Vec<String> =
        map.iter().filter(|(k, _)| k.as_str() != skip).map(|(k, v)| format!("{k}={v}")).collect();
    items.sort();
    if items.is_empty() {
        "<none>".to_string()
    } else {
        items.join("\n              ")
    }
}

/// The events about an object, oldest first.
pub async fn events_for(client: &Client, obj: &pb::Object) -> Result<Vec<pb::CoreEvent>> {
    let info = object::info(obj).context("object without a kind")?;
    let m = object::meta(obj).cloned().unwrap_or_default();
    let ns = if info.namespaced { m.namespace.clone() } else { "default".to_string() };
    let opts = ListOptions {
        namespace: ns,
        field_selector: format!("involvedObject.kind={},involvedObject.name={}", info.name, m.name),
        ..Default::default()
    };
    let list = client.list_all(Kind::Event, &opts).await?;
    let mut events: Vec<pb::CoreEvent> = list
        .items
        .into_iter()
        .filter_map(|o| match o.kind {
            Some(K::Event(e)) => Some(e),
            _ => None,
        })
        .filter(|e| e.involved_object.as_ref().is_none_or(|r| r.uid.is_empty() || r.uid == m.uid))
        .collect();
    let when = |e: &pb::CoreEvent| {
        [&e.last_timestamp, &e.event_time, &e.first_timestamp]
            .into_iter()
            .find(|t| !t.is_empty())
            .cloned()
            .unwrap_or_else(|| e.metadata.as_ref().map(|m| m.creation_timestamp.clone()).unwrap_or_default())
    };
    events.sort_by_key(when);
    Ok(events)
}

/// `keelctl describe` of one object: metadata, spec and status, then its events.
pub async fn describe(client: &Client, obj: &pb::Object) -> Result<String> {
    let m = object::meta(obj).cloned().unwrap_or_default();
    let mut out = String::new();
    let field = |out: &mut String, k: &str, v: &str| out.push_str(&format!("{:<14}{v}\n", format!("{k}:")));
    field(&mut out, "Name", &m.name);
    if !m.namespace.is_empty() {
        field(&mut out, "Namespace", &m.namespace);
    }
    field(&mut out, "Labels", &pairs(&m.labels, ""));
    field(&mut out, "Annotations", &pairs(&m.annotations, LAST_APPLIED));
    field(&mut out, "Created", &m.creation_timestamp);
    if !m.deletion_timestamp.is_empty() {
        field(&mut out, "Deleting", &m.deletion_timestamp);
    }
    if !m.finalizers.is_empty() {
        field(&mut out, "Finalizers", &m.finalizers.join(", "));
    }
    for owner in &m.owner_references {
        field(&mut out, "Controlled By", &format!("{}/{}", owner.kind, owner.name));
    }
    let mut v = json::to_value(obj);
    if let Value::Object(map) = &mut v {
        for k in ["apiVersion", "kind", "metadata"] {
            map.remove(k);
        }
    }
    render(&mut out, &v, 0);
    let events = events_for(client, obj).await?;
    if events.is_empty() {
        out.push_str("Events:       <none>\n");
    } else {
        let mut t = comfy_table::Table::new();
        t.load_style(comfy_table::presets::NOTHING);
        t.set_header(["Type", "Reason", "Age", "From", "Message"]);
        t.add_row(["----", "------", "----", "----", "-------"]);
        for e in &events {
            let ts = [&e.last_timestamp, &e.event_time, &e.first_timestamp]
                .into_iter()
                .find(|t| !t.is_empty())
                .cloned()
                .unwrap_or_default();
            let age = if e.count > 1 { format!("{} (x{})", print::age(&ts), e.count) } else { print::age(&ts) };
            let from = e
                .source
                .as_ref()
                .map(|s| s.component.clone())
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| e.reporting_component.clone());
            t.add_row([e.r#type.clone(), e.reason.clone(), age, from, e.message.clone()]);
        }
        out.push_str("Events:\n");
        for l in t.to_string().lines() {
            out.push_str(&format!("  {}\n", l.trim().trim_end()));
        }
    }
    Ok(out)
}

/// Writes `text` to stdout in one go (describe of many objects can be long).
pub fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_layout_titles_keys_and_names_list_items() {
        let v = serde_json::json!({"spec": {"replicas": 2, "selector": {"app": "x", "tier": "y"}, "containers": [
            {"name": "web", "image": "nginx", "args": ["a", "b"], "ports": [{"containerPort": 80, "protocol": "TCP"}]}]}});
        let mut out = String::new();
        render(&mut out, &v, 0);
        assert_eq!(
            out,
            "Spec:\n  Containers:\n    web:\n      Args:  a, b\n      Image:  nginx\n      Ports:\n        \
             - ContainerPort:  80\n          Protocol:  TCP\n  Replicas:  2\n  Selector:  app=x\n             tier=y\n"
        );
    }
}
