//! keelctl's read-modify-write commands (label, annotate, scale, edit) and describe.
//!
//! Each change is a Get followed by an Update that carries the resourceVersion it read, so a
//! concurrent writer is never overwritten; on a conflict the command reads again and
//! re-applies its change, as kubectl does.

use std::io::Write;

use anyhow::{bail, Context as _};
use serde_json::Value;
use tonic::Code;

use super::{display_name, print, status_error, Api};
use crate::api::apply::LAST_APPLIED;
use crate::api::kinds::KindInfo;
use crate::api::{json, manifest, object};
use crate::proto::v1 as pb;
use pb::object::Kind as K;

pub async fn get_object(api: &Api, info: &KindInfo, namespace: &str, name: &str) -> anyhow::Result<pb::Object> {
    let r = pb::ObjectRef { kind: info.name.into(), namespace: namespace.into(), name: name.into() };
    api.call(|mut c| {
        let r = r.clone();
        async move { c.get(pb::GetRequest { r#ref: Some(r) }).await }
    })
    .await
    .map_err(status_error)
}

/// Reads the object, lets `change` edit it, and writes it back if it changed; retries from
/// the read on a conflict. Returns the object written, or None when nothing changed.
pub async fn modify(
    api: &Api,
    info: &KindInfo,
    namespace: &str,
    name: &str,
    change: impl Fn(&mut pb::Object) -> anyhow::Result<()>,
) -> anyhow::Result<Option<pb::Object>> {
    for _ in 0..5 {
        let current = get_object(api, info, namespace, name).await?;
        let mut next = current.clone();
        change(&mut next)?;
        if next == current {
            return Ok(None);
        }
        let r = api
            .call(|mut c| {
                let o = next.clone();
                async move { c.update(pb::UpdateRequest { object: Some(o) }).await }
            })
            .await;
        match r {
            Ok(o) => return Ok(Some(o)),
            Err(s) if s.code() == Code::Aborted => continue,
            Err(s) => return Err(status_error(s)),
        }
    }
    bail!("{} kept changing; try again", display_name(&get_object(api, info, namespace, name).await?))
}

/// A `key=value` or `key-` argument of label and annotate.
#[derive(Debug, PartialEq, Eq)]
pub enum MapEdit {
    Set(String, String),
    Remove(String),
}

pub fn parse_map_edits(args: &[String]) -> anyhow::Result<Vec<MapEdit>> {
    let mut out = Vec::new();
    for a in args {
        if let Some((k, v)) = a.split_once('=') {
            if k.is_empty() {
                bail!("invalid argument {a:?}: the key is empty");
            }
            out.push(MapEdit::Set(k.to_string(), v.to_string()));
        } else if let Some(k) = a.strip_suffix('-').filter(|k| !k.is_empty()) {
            out.push(MapEdit::Remove(k.to_string()));
        } else {
            bail!("invalid argument {a:?}: expected key=value to set or key- to remove");
        }
    }
    if out.is_empty() {
        bail!("at least one key=value or key- is required");
    }
    Ok(out)
}

/// Applies label or annotation edits; an existing different value needs `overwrite`.
pub fn edit_map(
    map: &mut std::collections::HashMap<String, String>,
    edits: &[MapEdit],
    overwrite: bool,
) -> anyhow::Result<()> {
    for e in edits {
        match e {
            MapEdit::Set(k, v) => {
                if let Some(old) = map.get(k).filter(|old| *old != v) {
                    if !overwrite {
                        bail!("'{k}' already has a value ({old}), and --overwrite is false");
                    }
                }
                map.insert(k.clone(), v.clone());
            }
            MapEdit::Remove(k) => {
                map.remove(k);
            }
        }
    }
    Ok(())
}

/// `keelctl label` and `keelctl annotate`.
#[allow(clippy::too_many_arguments)]
pub async fn label_or_annotate(
    api: &Api,
    info: &KindInfo,
    namespace: &str,
    name: &str,
    edits: &[MapEdit],
    overwrite: bool,
    annotations: bool,
) -> anyhow::Result<String> {
    let written = modify(api, info, namespace, name, |o| {
        let m = object::meta_mut(o).context("object without metadata")?;
        edit_map(if annotations { &mut m.annotations } else { &mut m.labels }, edits, overwrite)
    })
    .await?;
    let verb = if annotations { "annotated" } else { "labeled" };
    Ok(match written {
        Some(o) => format!("{} {verb}", display_name(&o)),
        None => format!("{} not {verb}", display_name(&get_object(api, info, namespace, name).await?)),
    })
}

fn replicas_mut(obj: &mut pb::Object) -> Option<&mut Option<i32>> {
    match obj.kind.as_mut()? {
        K::Deployment(d) => Some(&mut d.spec.get_or_insert_with(Default::default).replicas),
        K::ReplicaSet(r) => Some(&mut r.spec.get_or_insert_with(Default::default).replicas),
        K::ReplicationController(r) => Some(&mut r.spec.get_or_insert_with(Default::default).replicas),
        K::StatefulSet(s) => Some(&mut s.spec.get_or_insert_with(Default::default).replicas),
        _ => None,
    }
}

/// `keelctl scale`: sets spec.replicas, optionally only if it is `current` now.
pub async fn scale(
    api: &Api,
    info: &KindInfo,
    namespace: &str,
    name: &str,
    replicas: i32,
    current: Option<i32>,
) -> anyhow::Result<String> {
    if replicas < 0 {
        bail!("The --replicas=COUNT flag is required, and COUNT must be greater than or equal to 0");
    }
    let written = modify(api, info, namespace, name, |o| {
        let kind = info.name;
        let r = replicas_mut(o).with_context(|| format!("cannot scale a {kind}: it has no spec.replicas"))?;
        if let Some(want) = current {
            let now = r.unwrap_or(1);
            if now != want {
                bail!("Expected replicas to be {want}, was {now}");
            }
        }
        *r = Some(replicas);
        Ok(())
    })
    .await?;
    let o = match written {
        Some(o) => o,
        None => get_object(api, info, namespace, name).await?,
    };
    Ok(format!("{} scaled", display_name(&o)))
}

const EDIT_HEADER: &str = "# Please edit the object below. Lines beginning with a '#' will be ignored,\n\
# and an empty file will abort the edit. If an error occurs while saving this file will be\n\
# reopened with the relevant failures.\n#\n";

/// `keelctl edit`: the object as YAML in `$KEEL_EDITOR`, `$EDITOR` or vi; the result is
/// written back with the resourceVersion it was read at. An invalid result is reopened with
/// the error on top; an unchanged or empty one cancels the edit.
pub async fn edit(api: &Api, info: &KindInfo, namespace: &str, name: &str) -> anyhow::Result<String> {
    let current = get_object(api, info, namespace, name).await?;
    let original = print::to_yaml(&current);
    let mut file = tempfile::Builder::new().prefix("keelctl-edit-").suffix(".yaml").tempfile()?;
    let mut text = format!("{EDIT_HEADER}{original}");
    loop {
        file.as_file_mut().set_len(0)?;
        std::fs::write(file.path(), &text)?;
        run_editor(file.path())?;
        let edited = std::fs::read_to_string(file.path())?;
        let body: String = edited.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect();
        if body.trim().is_empty() {
            return Ok("Edit cancelled, saved file was empty.".to_string());
        }
        if body == original {
            return Ok("Edit cancelled, no changes made.".to_string());
        }
        let attempt = async {
            let docs = manifest::split(&body);
            if docs.len() != 1 {
                bail!("the edited file must hold exactly one object");
            }
            let mut obj = manifest::parse_document("edited object", &docs[0]).map_err(|e| anyhow::anyhow!("{e}"))?;
            let (want, got) = (object::meta(&current).cloned(), object::meta(&obj).cloned());
            let (want, got) = (want.unwrap_or_default(), got.unwrap_or_default());
            if object::kind(&obj) != object::kind(&current) || got.name != want.name {
                bail!("the kind and name of the object cannot be changed");
            }
            if let Some(m) = object::meta_mut(&mut obj) {
                if m.namespace.is_empty() {
                    m.namespace = want.namespace.clone();
                }
            }
            api.call(|mut c| {
                let o = obj.clone();
                async move { c.update(pb::UpdateRequest { object: Some(o) }).await }
            })
            .await
            .map_err(status_error)
        };
        match attempt.await {
            Ok(o) => return Ok(format!("{} edited", display_name(&o))),
            Err(e) => {
                let note: String = format!("{e:#}").lines().map(|l| format!("# {l}\n")).collect();
                text = format!("{EDIT_HEADER}# The edit failed:\n{note}#\n{body}");
                // Without a terminal there is nobody to fix it: stop and say why.
                if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                    bail!("{e:#}\nerror: the edit was not saved");
                }
                eprintln!("error: {e:#}; reopening the editor");
            }
        }
    }
}

fn run_editor(path: &std::path::Path) -> anyhow::Result<()> {
    let editor = ["KEEL_EDITOR", "EDITOR"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
        .unwrap_or_else(|| "vi".to_string());
    // Through the shell, so that EDITOR="code --wait" works as with kubectl.
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("keelctl-edit")
        .arg(path)
        .status()
        .with_context(|| format!("run editor {editor:?}"))?;
    if !status.success() {
        bail!("editor {editor:?} exited with {status}");
    }
    Ok(())
}

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
pub async fn events_for(api: &Api, obj: &pb::Object) -> anyhow::Result<Vec<pb::CoreEvent>> {
    let info = object::info(obj).context("object without a kind")?;
    let m = object::meta(obj).cloned().unwrap_or_default();
    let ns = if info.namespaced { m.namespace.clone() } else { "default".to_string() };
    let req = pb::ListRequest {
        kind: "Event".into(),
        namespace: ns,
        field_selector: format!("involvedObject.kind={},involvedObject.name={}", info.name, m.name),
        ..Default::default()
    };
    let list = api
        .call(|mut c| {
            let r = req.clone();
            async move { c.list(r).await }
        })
        .await
        .map_err(status_error)?;
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
pub async fn describe(api: &Api, obj: &pb::Object) -> anyhow::Result<String> {
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
    let events = events_for(api, obj).await?;
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
pub fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_edits_parse_and_need_overwrite_to_change_a_value() {
        let e = parse_map_edits(&["a=1".into(), "b-".into()]).unwrap();
        assert_eq!(e, [MapEdit::Set("a".into(), "1".into()), MapEdit::Remove("b".into())]);
        assert!(parse_map_edits(&["=1".into()]).is_err());
        assert!(parse_map_edits(&["bare".into()]).is_err());
        let mut m = std::collections::HashMap::from([("a".to_string(), "0".to_string()), ("b".into(), "x".into())]);
        let err = edit_map(&mut m.clone(), &e, false).unwrap_err();
        assert_eq!(err.to_string(), "'a' already has a value (0), and --overwrite is false");
        edit_map(&mut m, &e, true).unwrap();
        assert_eq!(m, std::collections::HashMap::from([("a".to_string(), "1".to_string())]));
    }

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
