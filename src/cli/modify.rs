//! keelctl's read-modify-write commands: label, annotate, scale and edit.
//!
//! Each change is a Get followed by an Update that carries the resourceVersion it read, so a
//! concurrent writer is never overwritten; on a conflict the command reads again and
//! re-applies its change, as kubectl does.

use super::args::{EditArgs, MapArgs, ScaleArgs};
use super::{bail, display_name, print, resolve_kind, split_ref, Context, Result, Session};
use crate::api::kinds::KindInfo;
use crate::api::{manifest, object};
use crate::client::Client;
use crate::proto::v1 as pb;
use pb::object::Kind as K;

async fn get_object(client: &Client, info: &KindInfo, namespace: &str, name: &str) -> Result<pb::Object> {
    Ok(client.get(info.kind, namespace, name).await?)
}

/// Reads the object, lets `change` edit it, and writes it back if it changed; retries from
/// the read on a conflict. Returns the object written, or None when nothing changed.
pub async fn modify(
    client: &Client,
    info: &KindInfo,
    namespace: &str,
    name: &str,
    change: impl Fn(&mut pb::Object) -> Result<()>,
) -> Result<Option<pb::Object>> {
    for _ in 0..5 {
        let current = get_object(client, info, namespace, name).await?;
        let mut next = current.clone();
        change(&mut next)?;
        if next == current {
            return Ok(None);
        }
        match client.update(next).await {
            Ok(o) => return Ok(Some(o)),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("{} kept changing; try again", display_name(&get_object(client, info, namespace, name).await?))
}

/// A `key=value` or `key-` argument of label and annotate.
#[derive(Debug, PartialEq, Eq)]
pub enum MapEdit {
    Set(String, String),
    Remove(String),
}

pub fn parse_map_edits(args: &[String]) -> Result<Vec<MapEdit>> {
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
pub fn edit_map(map: &mut std::collections::HashMap<String, String>, edits: &[MapEdit], overwrite: bool) -> Result<()> {
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

/// `keelctl label` and `keelctl annotate`: KIND NAME (or KIND/NAME), then edits.
pub async fn label_or_annotate(s: &Session, a: MapArgs, annotations: bool) -> Result<()> {
    let (kind, name, rest) = match a.kind.split_once('/') {
        Some((k, n)) => (k.to_string(), n.to_string(), &a.args[..]),
        None => (a.kind.clone(), a.args[0].clone(), &a.args[1..]),
    };
    let info = resolve_kind(&kind)?;
    let ns = s.namespace_for(info);
    let edits = parse_map_edits(rest)?;
    let written = modify(&s.client, info, &ns, &name, |o| {
        let m = object::meta_mut(o).context("object without metadata")?;
        edit_map(if annotations { &mut m.annotations } else { &mut m.labels }, &edits, a.overwrite)
    })
    .await?;
    let verb = if annotations { "annotated" } else { "labeled" };
    match written {
        Some(o) => println!("{} {verb}", display_name(&o)),
        None => println!("{} not {verb}", display_name(&get_object(&s.client, info, &ns, &name).await?)),
    }
    Ok(())
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

/// `keelctl scale`: sets spec.replicas, optionally only if it is `--current-replicas` now.
pub async fn scale(s: &Session, a: ScaleArgs) -> Result<()> {
    let (kind, name) = split_ref(&a.kind, a.name.as_deref())?;
    let info = resolve_kind(&kind)?;
    let ns = s.namespace_for(info);
    if a.replicas < 0 {
        bail!("The --replicas=COUNT flag is required, and COUNT must be greater than or equal to 0");
    }
    let written = modify(&s.client, info, &ns, &name, |o| {
        let kind = info.name;
        let r = replicas_mut(o).with_context(|| format!("cannot scale a {kind}: it has no spec.replicas"))?;
        if let Some(want) = a.current_replicas {
            let now = r.unwrap_or(1);
            if now != want {
                bail!("Expected replicas to be {want}, was {now}");
            }
        }
        *r = Some(a.replicas);
        Ok(())
    })
    .await?;
    let o = match written {
        Some(o) => o,
        None => get_object(&s.client, info, &ns, &name).await?,
    };
    println!("{} scaled", display_name(&o));
    Ok(())
}

const EDIT_HEADER: &str = "# Please edit the object below. Lines beginning with a '#' will be ignored,\n\
# and an empty file will abort the edit. If an error occurs while saving this file will be\n\
# reopened with the relevant failures.\n#\n";

/// `keelctl edit`: the object as YAML in `$KEEL_EDITOR`, `$EDITOR` or vi; the result is
/// written back with the resourceVersion it was read at. An invalid result is reopened with
/// the error on top; an unchanged or empty one cancels the edit.
pub async fn edit(s: &Session, a: EditArgs) -> Result<()> {
    let (kind, name) = split_ref(&a.kind, a.name.as_deref())?;
    let info = resolve_kind(&kind)?;
    let ns = s.namespace_for(info);
    println!("{}", edit_object(&s.client, info, &ns, &name).await?);
    Ok(())
}

async fn edit_object(client: &Client, info: &KindInfo, namespace: &str, name: &str) -> Result<String> {
    let current = get_object(client, info, namespace, name).await?;
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
            let mut obj = manifest::parse_document("edited object", &docs[0])
                .map_err(|e| super::CliError::Message(e.to_string()))?;
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
            Ok::<_, super::CliError>(client.update(obj).await?)
        };
        match attempt.await {
            Ok(o) => return Ok(format!("{} edited", display_name(&o))),
            Err(e) => {
                let shown = super::describe_error(&e);
                let note: String = shown.lines().map(|l| format!("# {l}\n")).collect();
                text = format!("{EDIT_HEADER}# The edit failed:\n{note}#\n{body}");
                // Without a terminal there is nobody to fix it: stop and say why.
                if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                    bail!("{shown}\nerror: the edit was not saved");
                }
                eprintln!("{shown}; reopening the editor");
            }
        }
    }
}

fn run_editor(path: &std::path::Path) -> Result<()> {
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
}
