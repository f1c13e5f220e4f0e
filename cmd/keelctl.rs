//! `keelctl`: the command-line client, kubectl's counterpart. Object commands speak the
//! Objects API; `kv` and `status` speak the store's internal API (admin only).

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keel::cli;
use keel::client::KvClient;
use keel::proto::v1 as pb;
use keel::store::prefix_end;

#[derive(Parser)]
#[command(name = "keelctl", version, about = "Keel command-line client")]
struct Cli {
    /// Replica addresses (host:port), comma-separated; the client fails over between them.
    #[arg(long, short = 's', value_delimiter = ',', default_value = "127.0.0.1:7001", env = "KEEL_SERVER")]
    server: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update objects from manifests (files, directories, or - for stdin).
    Apply(ApplyArgs),
    /// Create objects from manifests; fails if one exists.
    Create(FileArgs),
    /// List objects of a kind, or show one.
    Get(GetArgs),
    /// Delete objects by kind and name, or those in manifests.
    Delete(DeleteArgs),
    /// The kinds this server serves.
    ApiResources,
    /// Client version.
    Version,
    /// Store-level state of every listed replica.
    Status,
    /// Read, write and watch raw store keys (admin only).
    #[command(subcommand)]
    Kv(KvCommand),
}

#[derive(clap::Args)]
struct FileArgs {
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<std::path::PathBuf>,
    /// Descend into subdirectories of directories given with -f.
    #[arg(short = 'R', long)]
    recursive: bool,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
}

#[derive(clap::Args)]
struct ApplyArgs {
    #[command(flatten)]
    files: FileArgs,
    /// Apply every object in one transaction: all of them or none.
    #[arg(long)]
    atomic: bool,
    /// "server": admit and merge on the server, report, write nothing. "none" (default).
    #[arg(long, default_value = "none", value_parser = ["none", "server"])]
    dry_run: String,
}

#[derive(clap::Args)]
struct GetArgs {
    kind: String,
    name: Option<String>,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// table (default), wide, yaml, json or name.
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
    #[arg(short = 'l', long, default_value = "")]
    selector: String,
    #[arg(long, default_value = "")]
    field_selector: String,
    /// After listing, watch for changes.
    #[arg(short = 'w', long)]
    watch: bool,
}

#[derive(clap::Args)]
struct DeleteArgs {
    kind: Option<String>,
    names: Vec<String>,
    #[arg(short = 'f', long = "filename")]
    files: Vec<std::path::PathBuf>,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Background (default), Foreground or Orphan.
    #[arg(long, default_value = "Background")]
    cascade: String,
}

#[derive(Subcommand)]
enum KvCommand {
    /// Print a key, or every key under a prefix.
    Get {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// Serve from any replica's local state without a quorum check.
        #[arg(long)]
        stale: bool,
    },
    Put {
        key: String,
        value: String,
    },
    Del {
        key: String,
        #[arg(long)]
        prefix: bool,
    },
    /// Stream changes under a prefix, from a revision (inclusive).
    Watch {
        prefix: String,
        #[arg(long, default_value_t = 0)]
        from: i64,
    },
}

fn range_end(key: &str, prefix: bool) -> Vec<u8> {
    if prefix {
        prefix_end(key.as_bytes())
    } else {
        Vec::new()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = KvClient::new(&cli.server, Duration::from_secs(10))?;
    let api = cli::Api::new(&cli.server)?;
    match cli.command {
        Command::Apply(a) => {
            let objects = cli::read_manifests(&cli::manifest_files(&a.files.files, a.files.recursive)?)?;
            cli::apply(&api, objects, &a.files.namespace, a.atomic, a.dry_run == "server").await?;
        }
        Command::Create(a) => {
            let objects = cli::read_manifests(&cli::manifest_files(&a.files, a.recursive)?)?;
            for mut o in objects {
                if let Some(m) = keel::api::object::meta_mut(&mut o) {
                    if m.namespace.is_empty() {
                        m.namespace = a.namespace.clone();
                    }
                }
                let created = cli::create(&api, o).await?;
                println!("{} created", cli::display_name(&created));
            }
        }
        Command::Get(g) => get(&api, g).await?,
        Command::Delete(d) => delete(&api, d).await?,
        Command::ApiResources => {
            println!("{:<24} {:<12} {:<26} {:<11} KIND", "NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED");
            for k in keel::api::kinds::KINDS {
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
        Command::Version => println!("keelctl {}", env!("CARGO_PKG_VERSION")),
        Command::Status => {
            println!(
                "{:<22} {:>3} {:<10} {:>5} {:>7} {:>9} {:>9} {:>9}",
                "ADDRESS", "ID", "STATE", "TERM", "LEADER", "LAST-LOG", "APPLIED", "REVISION"
            );
            for (i, addr) in cli.server.iter().enumerate() {
                match client.status_of(i).await {
                    Ok(s) => println!(
                        "{addr:<22} {:>3} {:<10} {:>5} {:>7} {:>9} {:>9} {:>9}",
                        s.id, s.state, s.term, s.leader_id, s.last_log_index, s.applied_index, s.revision
                    ),
                    Err(e) => println!("{addr:<22} unreachable: {e}"),
                }
            }
        }
        Command::Kv(KvCommand::Get { key, prefix, stale }) => {
            let r = client
                .range(pb::RangeRequest {
                    range_end: range_end(&key, prefix),
                    key: key.into_bytes(),
                    serializable: stale,
                    ..Default::default()
                })
                .await?;
            for kv in r.kvs {
                println!(
                    "{}\t{}\t(rev {})",
                    String::from_utf8_lossy(&kv.key),
                    String::from_utf8_lossy(&kv.value),
                    kv.mod_revision
                );
            }
        }
        Command::Kv(KvCommand::Put { key, value }) => {
            let r = client.put(key, value).await?;
            println!("revision {}", r.header.map_or(0, |h| h.revision));
        }
        Command::Kv(KvCommand::Del { key, prefix }) => {
            let end = range_end(&key, prefix);
            let req = pb::TxnRequest {
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                        key: key.into_bytes(),
                        range_end: end,
                        prev_kv: false,
                    })),
                }],
                ..Default::default()
            };
            let r = client.txn(req).await?;
            let deleted = match r.responses.first().and_then(|r| r.response.as_ref()) {
                Some(pb::response_op::Response::ResponseDeleteRange(d)) => d.deleted,
                _ => 0,
            };
            println!("deleted {deleted}");
        }
        Command::Kv(KvCommand::Watch { prefix, from }) => {
            let mut stream = client
                .watch(pb::WatchRequest {
                    range_end: prefix_end(prefix.as_bytes()),
                    key: prefix.into_bytes(),
                    start_revision: from,
                    ..Default::default()
                })
                .await?;
            while let Some(msg) = stream.message().await.context("watch stream")? {
                if msg.canceled {
                    anyhow::bail!("watch ended: {}", msg.cancel_reason);
                }
                for e in msg.events {
                    let kv = e.kv.unwrap_or_default();
                    let kind = if e.r#type == pb::event::EventType::Delete as i32 { "DELETE" } else { "PUT" };
                    println!(
                        "{}\t{kind}\t{}\t{}",
                        kv.mod_revision,
                        String::from_utf8_lossy(&kv.key),
                        String::from_utf8_lossy(&kv.value)
                    );
                }
            }
        }
    }
    Ok(())
}

fn print_objects(objects: &[pb::Object], output: &str, all_namespaces: bool) -> anyhow::Result<()> {
    match output {
        "table" | "wide" => {
            let t = cli::print::table(objects, all_namespaces);
            if !t.is_empty() {
                println!("{t}");
            }
        }
        "yaml" => {
            for (i, o) in objects.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", cli::print::to_yaml(o));
            }
        }
        "json" => {
            for o in objects {
                println!("{}", cli::print::to_json(o));
            }
        }
        "name" => {
            for o in objects {
                println!("{}", cli::display_name(o));
            }
        }
        other => anyhow::bail!("unable to match a printer suitable for the output format {other:?}; allowed formats are: json, name, table, wide, yaml"),
    }
    Ok(())
}

async fn get(api: &cli::Api, g: GetArgs) -> anyhow::Result<()> {
    let info = cli::resolve_kind(&g.kind)?;
    let namespace = if g.all_namespaces || !info.namespaced { String::new() } else { g.namespace.clone() };
    if let Some(name) = &g.name {
        let r = pb::ObjectRef { kind: info.name.into(), namespace: namespace.clone(), name: name.clone() };
        let obj = api
            .call(|mut c| {
                let r = r.clone();
                async move { c.get(pb::GetRequest { r#ref: Some(r) }).await }
            })
            .await
            .map_err(cli::status_error)?;
        return print_objects(&[obj], &g.output, false);
    }
    let req = pb::ListRequest {
        kind: info.name.into(),
        namespace: namespace.clone(),
        label_selector: g.selector.clone(),
        field_selector: g.field_selector.clone(),
        ..Default::default()
    };
    let list = api
        .call(|mut c| {
            let r = req.clone();
            async move { c.list(r).await }
        })
        .await
        .map_err(cli::status_error)?;
    if list.items.is_empty() && !g.watch {
        if namespace.is_empty() {
            eprintln!("No resources found");
        } else {
            eprintln!("No resources found in {namespace} namespace.");
        }
    }
    print_objects(&list.items, &g.output, g.all_namespaces)?;
    if g.watch {
        let wreq = pb::WatchObjectsRequest {
            kind: info.name.into(),
            namespace,
            label_selector: g.selector,
            field_selector: g.field_selector,
            resource_version: list.resource_version,
            allow_bookmarks: false,
        };
        let mut stream = api
            .call(|mut c| {
                let r = wreq.clone();
                async move { c.watch(r).await }
            })
            .await
            .map_err(cli::status_error)?;
        while let Some(ev) = stream.message().await.map_err(cli::status_error)? {
            if let Some(o) = ev.object {
                if g.output == "table" || g.output == "wide" {
                    let t = cli::print::table(&[o], g.all_namespaces);
                    println!("{}", t.lines().last().unwrap_or_default());
                } else {
                    print_objects(&[o], &g.output, g.all_namespaces)?;
                }
            }
        }
    }
    Ok(())
}

async fn delete(api: &cli::Api, d: DeleteArgs) -> anyhow::Result<()> {
    let mut refs = Vec::new();
    if !d.files.is_empty() {
        for o in cli::read_manifests(&cli::manifest_files(&d.files, false)?)? {
            let info = keel::api::object::info(&o).context("object without a kind")?;
            let m = keel::api::object::meta(&o).cloned().unwrap_or_default();
            let ns = if m.namespace.is_empty() { d.namespace.clone() } else { m.namespace };
            refs.push(pb::ObjectRef { kind: info.name.into(), namespace: ns, name: m.name });
        }
    } else {
        let kind = d.kind.clone().context("give a kind and names, or -f FILE")?;
        let info = cli::resolve_kind(&kind)?;
        if d.names.is_empty() {
            anyhow::bail!("resource(s) were provided, but no name was specified");
        }
        for n in &d.names {
            refs.push(pb::ObjectRef { kind: info.name.into(), namespace: d.namespace.clone(), name: n.clone() });
        }
    }
    for r in refs {
        let req = pb::DeleteRequest {
            r#ref: Some(r.clone()),
            propagation_policy: d.cascade.clone(),
            resource_version: String::new(),
        };
        let resp = api
            .call(|mut c| {
                let q = req.clone();
                async move { c.delete(q).await }
            })
            .await
            .map_err(cli::status_error)?;
        let name = resp.object.as_ref().map(cli::display_name).unwrap_or(r.name);
        println!("{name} deleted");
    }
    Ok(())
}
