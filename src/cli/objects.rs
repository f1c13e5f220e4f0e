//! keelctl's object commands: apply, create, get (and watch), delete, describe and
//! api-resources.

use super::args::{ApplyArgs, DeleteArgs, DescribeArgs, FileArgs, GetArgs};
use super::print::{self, Output, TableOptions};
use super::{bail, display_name, read_manifests, resolve_kind, Context, Result, Session};
use crate::api::object;
use crate::client::{ClientError, DeleteOptions, ListOptions, WatchOptions};
use crate::proto::v1 as pb;

/// Fills in the namespace of namespaced objects that have none; refuses one that names
/// another namespace than `--namespace`, as kubectl does.
fn set_namespace(obj: &mut pb::Object, namespace: &str) -> Result<()> {
    let info = object::info(obj).context("object without a kind")?;
    if let Some(m) = object::meta_mut(obj) {
        if info.namespaced {
            if m.namespace.is_empty() {
                m.namespace = namespace.to_string();
            } else if m.namespace != namespace && namespace != "default" {
                bail!(
                    "the namespace from the provided object {:?} does not match the namespace {namespace:?}; you must pass '--namespace={}' to perform this operation",
                    m.namespace,
                    m.namespace
                );
            }
        }
    }
    Ok(())
}

/// Applies manifests through the server's three-way merge, one object per transaction, or
/// (with `--atomic`) all of them in one. Prints one line per object, as kubectl does; with
/// one object per transaction, a failure does not stop the others.
pub async fn apply(s: &Session, a: ApplyArgs) -> Result<()> {
    let mut objects = read_manifests(&super::manifest_files(&a.files.files, a.files.recursive)?)?;
    for obj in &mut objects {
        set_namespace(obj, &s.namespace)?;
    }
    let dry_run = a.dry_run == "server";
    let suffix = if dry_run { " (server dry run)" } else { "" };
    let print = |r: pb::ApplyResponse| {
        for res in r.results {
            if let Some(o) = res.object {
                println!("{} {}{suffix}", display_name(&o), res.action);
            }
        }
    };
    if a.atomic {
        let n = objects.len();
        let r = s.client.apply(objects, dry_run).await.map_err(|e| {
            super::CliError::Message(format!(
                "{}\nnone of the {n} objects was applied",
                super::describe_error(&super::CliError::Client(e))
            ))
        })?;
        print(r);
        return Ok(());
    }
    let mut failed = Vec::new();
    for obj in objects {
        match s.client.apply(vec![obj], dry_run).await {
            Ok(r) => print(r),
            Err(e) => failed.push(super::describe_error(&super::CliError::Client(e))),
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }
    Ok(())
}

/// Creates objects from manifests; fails on the first that exists. A create whose outcome
/// is unknown is not sent again: keelctl says so and stops.
pub async fn create(s: &Session, a: FileArgs) -> Result<()> {
    let objects = read_manifests(&super::manifest_files(&a.files, a.recursive)?)?;
    for mut o in objects {
        set_namespace(&mut o, &s.namespace)?;
        let created = s.client.create(o).await?;
        println!("{} created", display_name(&created));
    }
    Ok(())
}

pub async fn get(s: &Session, g: GetArgs) -> Result<()> {
    let info = resolve_kind(&g.kind)?;
    let output = Output::parse(&g.output)?;
    let namespace = if g.all_namespaces || !info.namespaced { String::new() } else { s.namespace.clone() };
    let opts =
        TableOptions { all_namespaces: g.all_namespaces, show_labels: g.show_labels, no_headers: false, wide: false };
    if let Some(name) = &g.name {
        let obj = s.client.get(info.kind, &namespace, name).await?;
        print!("{}", print::render(&[obj], true, &output, opts));
        return Ok(());
    }
    let list_opts = ListOptions {
        namespace: namespace.clone(),
        label_selector: g.selector.clone(),
        field_selector: g.field_selector.clone(),
        ..Default::default()
    };
    let list = s.client.list_all(info.kind, &list_opts).await?;
    let tabular = matches!(output, Output::Table | Output::Wide);
    if list.items.is_empty() && tabular && !g.watch {
        if namespace.is_empty() {
            eprintln!("No resources found");
        } else {
            eprintln!("No resources found in {namespace} namespace.");
        }
    }
    print!("{}", print::render(&list.items, false, &output, opts));
    if !g.watch {
        return Ok(());
    }
    let wopts = WatchOptions {
        namespace,
        label_selector: g.selector,
        field_selector: g.field_selector,
        resource_version: list.resource_version,
        bookmarks: false,
    };
    let mut stream = s.client.watch(info.kind, &wopts).await?;
    let mut headers = !list.items.is_empty() || !tabular;
    while let Some(ev) = stream.next().await? {
        let Some(o) = ev.object else { continue };
        let opts = TableOptions { no_headers: headers, ..opts };
        headers = true;
        print!("{}", print::render(&[o], true, &output, opts));
    }
    Ok(())
}

pub async fn delete(s: &Session, d: DeleteArgs) -> Result<()> {
    let mut refs = Vec::new();
    if !d.files.is_empty() {
        for o in read_manifests(&super::manifest_files(&d.files, false)?)? {
            let info = object::info(&o).context("object without a kind")?;
            let m = object::meta(&o).cloned().unwrap_or_default();
            let ns = if m.namespace.is_empty() { s.namespace.clone() } else { m.namespace };
            refs.push((info, ns, m.name));
        }
    } else {
        let kind = d.kind.clone().context("give a kind and names, or -f FILE")?;
        let info = resolve_kind(&kind)?;
        if d.names.is_empty() {
            bail!("resource(s) were provided, but no name was specified");
        }
        for n in &d.names {
            refs.push((info, s.namespace.clone(), n.clone()));
        }
    }
    let opts = DeleteOptions {
        propagation_policy: d.cascade.clone(),
        grace_period_seconds: d.grace_period(),
        ..Default::default()
    };
    let mut pending = Vec::new();
    for (info, ns, name) in refs {
        let resp = match s.client.delete(info.kind, &ns, &name, &opts).await {
            Ok(r) => r,
            Err(e @ ClientError::Indeterminate { .. }) => {
                bail!("{e}: keelctl get {} {name} -n {ns}", info.resource)
            }
            Err(e) => return Err(e.into()),
        };
        let shown = resp.object.as_ref().map(display_name).unwrap_or(name.clone());
        if d.force && opts.grace_period_seconds == Some(0) {
            eprintln!("Warning: Immediate deletion does not wait for confirmation that the running resource has been terminated. The resource may continue to run on the cluster indefinitely.");
        }
        println!("{shown} deleted");
        if !resp.deleted {
            let uid = resp.object.as_ref().and_then(object::meta).map(|m| m.uid.clone()).unwrap_or_default();
            pending.push((info, ns, name, uid));
        }
    }
    if !d.wait {
        return Ok(());
    }
    let timeout = if d.timeout.is_zero() { std::time::Duration::from_secs(7 * 24 * 3600) } else { d.timeout };
    let deadline = tokio::time::Instant::now() + timeout;
    for (info, ns, name, uid) in pending {
        loop {
            match s.client.get_opt(info.kind, &ns, &name).await? {
                None => break,
                Some(o) if object::meta(&o).is_some_and(|m| m.uid != uid) => break,
                Some(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("timed out waiting for the deletion of {}/{name}", info.resource);
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

pub async fn describe(s: &Session, d: DescribeArgs) -> Result<()> {
    let info = resolve_kind(d.kind.split_once('/').map_or(d.kind.as_str(), |(k, _)| k))?;
    let ns = s.namespace_for(info);
    let objects = match (d.kind.split_once('/').map(|(_, n)| n.to_string()), d.name) {
        (Some(n), _) | (None, Some(n)) => vec![s.client.get(info.kind, &ns, &n).await?],
        (None, None) => {
            let opts = ListOptions { namespace: ns.clone(), label_selector: d.selector.clone(), ..Default::default() };
            s.client.list_all(info.kind, &opts).await?.items
        }
    };
    let mut text = Vec::new();
    for o in &objects {
        text.push(super::describe::describe(&s.client, o).await?);
    }
    super::describe::emit(&text.join("\n\n"))
}

pub fn api_resources() {
    println!("{:<24} {:<12} {:<26} {:<11} KIND", "NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED");
    for k in crate::api::kinds::KINDS {
        println!(
            "{:<24} {:<12} {:<26} {:<11} {}",
            k.resource,
            k.short_names.join(","),
            k.api_version,
            k.namespaced,
            k.name
        );
    }
}
