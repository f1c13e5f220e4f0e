//! `keelctl cordon`, `uncordon` and `drain`, with kubectl's rules and messages: drain cordons
//! the node, then deletes its pods with their own grace periods (or `--grace-period`), and
//! refuses pods it cannot move unless told (`--force` for pods no controller recreates,
//! `--ignore-daemonsets`, `--delete-emptydir-data`). Mirror pods are left alone.

use std::time::{Duration, Instant};

use super::args::{DrainArgs, NodeArgs};
use super::{bail, CliError, Result, Session};
use crate::api::kinds::Kind;
use crate::client::{DeleteOptions, ListOptions};
use crate::proto::v1 as pb;

const MIRROR: &str = "kubernetes.io/config.mirror";

fn node_name(arg: &str) -> Result<String> {
    match arg.split_once('/') {
        None => Ok(arg.to_string()),
        Some(("node" | "nodes" | "no", n)) if !n.is_empty() => Ok(n.to_string()),
        Some((kind, _)) => bail!("error: {kind} is not a node; give NODE or node/NODE"),
    }
}

/// Sets `spec.unschedulable`; says whether it changed. Retries on a conflicting write.
async fn set_unschedulable(s: &Session, name: &str, on: bool) -> Result<bool> {
    for _ in 0..5 {
        let mut obj = s.client.get(Kind::Node, "", name).await?;
        let Some(pb::object::Kind::Node(n)) = obj.kind.as_mut() else {
            bail!("error: node {name:?} is not a Node");
        };
        let spec = n.spec.get_or_insert_with(Default::default);
        if spec.unschedulable == on {
            return Ok(false);
        }
        spec.unschedulable = on;
        match s.client.update(obj).await {
            Ok(_) => return Ok(true),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("error: node {name:?} kept changing; try again")
}

pub async fn cordon(s: &Session, a: NodeArgs, on: bool) -> Result<()> {
    let name = node_name(&a.node)?;
    let changed = set_unschedulable(s, &name, on).await?;
    let word = if on { "cordoned" } else { "uncordoned" };
    println!("node/{name} {}{word}", if changed { "" } else { "already " });
    Ok(())
}

/// What drain does with one pod.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Delete,
    /// Left where it is (a mirror pod, or a DaemonSet's with --ignore-daemonsets).
    Skip(&'static str),
    /// Refused: why, as kubectl groups it.
    Refuse(&'static str),
}

fn verdict(p: &pb::Pod, a: &DrainArgs) -> Verdict {
    let meta = p.metadata.clone().unwrap_or_default();
    if meta.annotations.contains_key(MIRROR) {
        return Verdict::Skip("mirror");
    }
    let finished = matches!(p.status.as_ref().map(|s| s.phase.as_str()), Some("Succeeded" | "Failed"));
    let controller = meta.owner_references.iter().find(|o| o.controller == Some(true));
    if let Some(c) = controller.filter(|c| c.kind == "DaemonSet") {
        let _ = c;
        if finished {
            return Verdict::Delete;
        }
        return if a.ignore_daemonsets {
            Verdict::Skip("DaemonSet-managed")
        } else {
            Verdict::Refuse("cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore)")
        };
    }
    if controller.is_none() && !finished && !a.force {
        return Verdict::Refuse("cannot delete Pods that declare no controller (use --force to override)");
    }
    let local = p.spec.as_ref().is_some_and(|s| s.volumes.iter().any(|v| v.empty_dir.is_some()));
    if local && !finished && !a.delete_emptydir_data {
        return Verdict::Refuse("cannot delete Pods with local storage (use --delete-emptydir-data to override)");
    }
    Verdict::Delete
}

pub async fn drain(s: &Session, a: DrainArgs) -> Result<()> {
    let name = node_name(&a.node)?;
    let changed = set_unschedulable(s, &name, true).await?;
    println!("node/{name} {}cordoned", if changed { "" } else { "already " });
    let opts = ListOptions { field_selector: format!("spec.nodeName={name}"), ..Default::default() };
    let pods: Vec<pb::Pod> = s
        .client
        .list_all(Kind::Pod, &opts)
        .await?
        .items
        .into_iter()
        .filter_map(|o| match o.kind {
            Some(pb::object::Kind::Pod(p)) => Some(p),
            _ => None,
        })
        .collect();
    let mut refused: std::collections::BTreeMap<&'static str, Vec<String>> = Default::default();
    let mut skipped = Vec::new();
    let mut doomed = Vec::new();
    for p in &pods {
        let meta = p.metadata.clone().unwrap_or_default();
        let id = format!("{}/{}", meta.namespace, meta.name);
        match verdict(p, &a) {
            Verdict::Delete => doomed.push((meta.namespace, meta.name, meta.uid)),
            Verdict::Skip(why) => skipped.push((why, id)),
            Verdict::Refuse(why) => refused.entry(why).or_default().push(id),
        }
    }
    if !refused.is_empty() {
        let lines: Vec<String> = refused.iter().map(|(why, ids)| format!("{why}: {}", ids.join(", "))).collect();
        bail!("error: unable to drain node {name:?} due to error: {}, continuing command...\nThere are pending nodes to be drained:\n {name}\n{}", lines.join(", "), lines.join("\n"));
    }
    for (why, id) in &skipped {
        if *why == "DaemonSet-managed" {
            eprintln!("Warning: ignoring DaemonSet-managed Pods: {id}");
        }
    }
    let options = DeleteOptions { grace_period_seconds: a.grace_period.filter(|g| *g >= 0), ..Default::default() };
    for (ns, pod, _) in &doomed {
        println!("evicting pod {ns}/{pod}");
        match s.client.delete(Kind::Pod, ns, pod, &options).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Wait until each is gone (a new pod of the same name, another uid, counts as gone).
    let deadline = a.timeout.filter(|t| !t.is_zero()).map(|t| Instant::now() + t);
    let mut left = doomed;
    while !left.is_empty() {
        let mut still = Vec::new();
        for (ns, pod, uid) in left {
            let o = s.client.get_opt(Kind::Pod, &ns, &pod).await?;
            let same = o.as_ref().and_then(crate::api::object::meta).is_some_and(|m| m.uid == uid);
            if same {
                still.push((ns, pod, uid));
            } else {
                println!("pod/{pod} evicted");
            }
        }
        left = still;
        if left.is_empty() {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let names: Vec<String> = left.iter().map(|(ns, p, _)| format!("{ns}/{p}")).collect();
            return Err(CliError::Message(format!(
                "error: unable to drain node {name:?}: timed out waiting for {} to be deleted",
                names.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("node/{name} drained");
    Ok(())
}

/// `keelctl image ls`: NODE, IMAGE, ID and SIZE of every image the nodes report.
pub async fn images(s: &Session, node: Option<String>) -> Result<()> {
    let nodes = match &node {
        Some(n) => vec![s.client.get(Kind::Node, "", &node_name(n)?).await?],
        None => s.client.list_all(Kind::Node, &ListOptions::default()).await?.items,
    };
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING);
    t.set_header(["NODE", "IMAGE", "ID", "SIZE"]);
    for o in &nodes {
        let Some(pb::object::Kind::Node(n)) = &o.kind else { continue };
        let name = n.metadata.as_ref().map(|m| m.name.clone()).unwrap_or_default();
        for i in n.status.iter().flat_map(|s| &s.images) {
            let tagged = i.names.iter().find(|n| !n.contains('@')).or(i.names.first()).cloned().unwrap_or_default();
            let id = i.names.iter().find_map(|n| n.split_once('@').map(|(_, d)| d.to_string())).unwrap_or_default();
            let short = id.strip_prefix("sha256:").map_or(id.clone(), |h| h.chars().take(12).collect());
            t.add_row([name.clone(), tagged, short, human_size(i.size_bytes)]);
        }
    }
    print!("{}", super::print::tidy(&t));
    Ok(())
}

/// 2.1MB, 830kB, 12B (decimal units, as crictl prints them).
fn human_size(n: i64) -> String {
    let n = n.max(0) as f64;
    match n {
        n if n >= 1e9 => format!("{:.1}GB", n / 1e9),
        n if n >= 1e6 => format!("{:.1}MB", n / 1e6),
        n if n >= 1e3 => format!("{:.0}kB", n / 1e3),
        n => format!("{n}B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(owner: Option<&str>, empty_dir: bool) -> pb::Pod {
        let owner_references = owner
            .map(|k| {
                vec![pb::OwnerReference {
                    kind: k.into(),
                    name: "o".into(),
                    controller: Some(true),
                    ..Default::default()
                }]
            })
            .unwrap_or_default();
        let volumes = if empty_dir {
            vec![pb::Volume { name: "v".into(), empty_dir: Some(Default::default()), ..Default::default() }]
        } else {
            vec![]
        };
        pb::Pod {
            metadata: Some(pb::ObjectMeta { name: "p".into(), owner_references, ..Default::default() }),
            spec: Some(pb::PodSpec { volumes, ..Default::default() }),
            ..Default::default()
        }
    }

    fn args(force: bool, ignore_daemonsets: bool, delete_emptydir_data: bool) -> DrainArgs {
        DrainArgs {
            node: "n".into(),
            force,
            ignore_daemonsets,
            delete_emptydir_data,
            grace_period: None,
            timeout: None,
        }
    }

    #[test]
    fn drain_refuses_what_it_cannot_move_unless_told() {
        let none = args(false, false, false);
        assert_eq!(verdict(&pod(Some("ReplicaSet"), false), &none), Verdict::Delete);
        assert!(matches!(verdict(&pod(None, false), &none), Verdict::Refuse(m) if m.contains("--force")));
        assert_eq!(verdict(&pod(None, false), &args(true, false, false)), Verdict::Delete);
        assert!(
            matches!(verdict(&pod(Some("DaemonSet"), false), &none), Verdict::Refuse(m) if m.contains("--ignore-daemonsets"))
        );
        assert_eq!(
            verdict(&pod(Some("DaemonSet"), false), &args(false, true, false)),
            Verdict::Skip("DaemonSet-managed")
        );
        assert!(
            matches!(verdict(&pod(Some("ReplicaSet"), true), &none), Verdict::Refuse(m) if m.contains("--delete-emptydir-data"))
        );
        assert_eq!(verdict(&pod(Some("ReplicaSet"), true), &args(false, false, true)), Verdict::Delete);
        let mut mirror = pod(None, false);
        mirror.metadata.as_mut().unwrap().annotations.insert(MIRROR.into(), "x".into());
        assert_eq!(verdict(&mirror, &none), Verdict::Skip("mirror"));
    }
}
