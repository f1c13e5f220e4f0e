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
    /// Default: the current context's servers, else 127.0.0.1:7001.
    #[arg(long, short = 's', value_delimiter = ',', env = "KEEL_SERVER", global = true)]
    server: Option<Vec<String>>,
    /// The context of the configuration file to use instead of its current one.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Namespace. Default: the context's namespace, else "default".
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
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
    /// Show an object in detail, with its events.
    Describe(DescribeArgs),
    /// Set (key=value) or remove (key-) labels.
    Label(MapArgs),
    /// Set (key=value) or remove (key-) annotations.
    Annotate(MapArgs),
    /// Set the replicas of a Deployment, ReplicaSet, ReplicationController or StatefulSet.
    Scale(ScaleArgs),
    /// Edit an object in $KEEL_EDITOR, $EDITOR or vi and save it back.
    Edit(EditArgs),
    /// Contexts: named lists of replica addresses with a default namespace.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Join tokens for servers and agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Control-plane membership, status and certificates.
    #[command(subcommand)]
    Cluster(ClusterCommand),
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
    /// Background (default), Foreground or Orphan.
    #[arg(long, default_value = "Background")]
    cascade: String,
}

#[derive(clap::Args)]
struct DescribeArgs {
    kind: String,
    name: Option<String>,
    #[arg(short = 'l', long, default_value = "")]
    selector: String,
}

#[derive(clap::Args)]
struct MapArgs {
    /// KIND NAME, or KIND/NAME.
    kind: String,
    /// NAME (unless given as KIND/NAME), then key=value or key- pairs.
    #[arg(required = true)]
    args: Vec<String>,
    /// Replace a key's existing value.
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args)]
struct ScaleArgs {
    kind: String,
    name: Option<String>,
    #[arg(long)]
    replicas: i32,
    /// Scale only if the replicas are this number now.
    #[arg(long)]
    current_replicas: Option<i32>,
}

#[derive(clap::Args)]
struct EditArgs {
    kind: String,
    name: Option<String>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token (server, agent) or a user's bearer token; it is printed once.
    Create {
        #[arg(long, value_parser = ["server", "agent", "user"])]
        role: String,
        /// --role user: the user's name.
        #[arg(long, required_if_eq("role", "user"), default_value = "")]
        user: String,
        /// How long it is valid: 30m, 24h, 7d; 0 never expires.
        #[arg(long, default_value = "24h")]
        ttl: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    List,
    /// Revoke a token by its id (the part before the dot of its secret).
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Every replica: role, state, term, leader, commit and applied index, lag, last contact.
    Members,
    /// The leader and the health of every replica.
    Status,
    /// Remove a replica by id, or a node's registration as node/NAME.
    Remove { id: String },
    /// Make replica ID the leader.
    TransferLeader { id: u64 },
    /// After losing quorum: ask the surviving replicas (--server) for their logs and say
    /// which one to recover from and what, if anything, is at risk.
    Recover {
        /// Only report (the recovery itself is `keel server --force-new-cluster`).
        #[arg(long, required = true)]
        plan: bool,
    },
    /// Expiry of the CA and of every replica's certificate, and of this user's.
    Certs,
    /// Re-seal every Secret with the active secrets key (after `keel secrets-key rotate`).
    ReencryptSecrets,
    /// Backups of the whole store.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Write a consistent, checksummed copy of the store to FILE.
    Save {
        file: std::path::PathBuf,
        /// Seal the copy with this recovery key (see `new-key`); it holds the CA's key.
        #[arg(long)]
        recovery_key: Option<std::path::PathBuf>,
    },
    /// Create a recovery key file.
    NewKey { file: std::path::PathBuf },
    /// Check a backup file's checksum (and, with the key, that it opens).
    Verify {
        file: std::path::PathBuf,
        #[arg(long)]
        recovery_key: Option<std::path::PathBuf>,
    },
}

fn recovery_key(path: &Option<std::path::PathBuf>) -> anyhow::Result<Option<keel::server::secrets::Keyring>> {
    let Some(p) = path else { return Ok(None) };
    let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
    Ok(Some(keel::server::secrets::Keyring::parse(&text, &p.display().to_string())?))
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the configuration (private keys and certificates redacted unless --raw).
    View {
        #[arg(long)]
        raw: bool,
    },
    /// List the contexts; the current one is starred.
    GetContexts,
    CurrentContext,
    UseContext {
        name: String,
    },
    /// Create or change a context.
    /// Create or change a context. A new context without credential flags takes the
    /// current context's credentials.
    SetContext {
        name: String,
        #[arg(long = "servers", value_delimiter = ',')]
        servers: Option<Vec<String>>,
        #[arg(long = "default-namespace")]
        default_namespace: Option<String>,
        /// PEM file of the cluster CA.
        #[arg(long)]
        certificate_authority: Option<std::path::PathBuf>,
        /// PEM file of the user's certificate.
        #[arg(long)]
        client_certificate: Option<std::path::PathBuf>,
        /// PEM file of the user's private key.
        #[arg(long)]
        client_key: Option<std::path::PathBuf>,
    },
    DeleteContext {
        name: String,
    },
}

/// `deploy/web` or `deploy web`.
fn split_ref(kind: &str, name: Option<&str>) -> anyhow::Result<(String, String)> {
    match (kind.split_once('/'), name) {
        (Some((k, n)), None) => Ok((k.to_string(), n.to_string())),
        (None, Some(n)) => Ok((kind.to_string(), n.to_string())),
        (Some(_), Some(_)) => anyhow::bail!("there is no need to specify a resource type as a separate argument when passing arguments in resource/name form"),
        (None, None) => anyhow::bail!("a name is required: KIND NAME or KIND/NAME"),
    }
}

fn config_command(c: ConfigCommand) -> anyhow::Result<()> {
    let path = cli::config::path();
    let mut cfg = cli::config::Config::load(&path)?;
    match c {
        ConfigCommand::View { raw } => {
            let mut shown = cli::config::Config::load(&cli::config::read_path())?;
            if !raw {
                for c in &mut shown.contexts {
                    for f in [&mut c.certificate_authority_data, &mut c.client_certificate_data, &mut c.client_key_data]
                    {
                        if !f.is_empty() {
                            *f = "DATA+OMITTED".into();
                        }
                    }
                }
            }
            println!("{}", serde_saphyr::to_string(&shown)?.trim_end());
        }
        ConfigCommand::GetContexts => {
            println!("{:<8} {:<20} {:<16} SERVERS", "CURRENT", "NAME", "NAMESPACE");
            for ctx in &cfg.contexts {
                let star = if ctx.name == cfg.current_context { "*" } else { "" };
                println!("{star:<8} {:<20} {:<16} {}", ctx.name, ctx.namespace, ctx.servers.join(","));
            }
        }
        ConfigCommand::CurrentContext => {
            if cfg.current_context.is_empty() {
                anyhow::bail!("current-context is not set");
            }
            println!("{}", cfg.current_context);
        }
        ConfigCommand::UseContext { name } => {
            cfg.use_context(&name)?;
            cfg.save(&path)?;
            println!("Switched to context {name:?}.");
        }
        ConfigCommand::SetContext {
            name,
            servers,
            default_namespace,
            certificate_authority,
            client_certificate,
            client_key,
        } => {
            let existed = cfg.context(&name).is_some();
            let inherited = if existed { None } else { cfg.selected(None).ok().flatten().cloned() };
            cfg.set_context(&name, servers, default_namespace);
            let read =
                |p: &std::path::Path| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()));
            let ctx = cfg.contexts.iter_mut().find(|c| c.name == name).context("context just set")?;
            if let Some(from) = inherited {
                ctx.certificate_authority_data = from.certificate_authority_data;
                ctx.client_certificate_data = from.client_certificate_data;
                ctx.client_key_data = from.client_key_data;
            }
            if let Some(p) = certificate_authority {
                ctx.certificate_authority_data = read(&p)?;
            }
            if let Some(p) = client_certificate {
                ctx.client_certificate_data = read(&p)?;
            }
            if let Some(p) = client_key {
                ctx.client_key_data = read(&p)?;
            }
            cfg.save(&path)?;
            println!("Context {name:?} {}.", if existed { "modified" } else { "created" });
        }
        ConfigCommand::DeleteContext { name } => {
            cfg.delete_context(&name)?;
            cfg.save(&path)?;
            println!("deleted context {name} from {}", path.display());
        }
    }
    Ok(())
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
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message chain only: a user error is not a crash, so no backtrace.
            let text = format!("{e:#}");
            if text.starts_with("Error from server") {
                eprintln!("{text}");
            } else {
                eprintln!("error: {text}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Config(c) = cli.command {
        return config_command(c);
    }
    let cfg_path = cli::config::read_path();
    let cfg = cli::config::Config::load(&cfg_path)?;
    let ctx = match cfg.selected(cli.context.as_deref())? {
        Some(c) => c.clone(),
        None => anyhow::bail!(
            "no context: {} has no current-context; point KEELCONFIG at the admin configuration that `keel server` wrote (by default {})",
            cfg_path.display(),
            cli::config::ADMIN_CONFIG
        ),
    };
    let creds = ctx.auth()?;
    let servers = match cli.server {
        Some(s) => s,
        None if !ctx.servers.is_empty() => ctx.servers.clone(),
        None => vec![cli::config::DEFAULT_SERVER.to_string()],
    };
    let namespace = cli
        .namespace
        .or_else(|| Some(ctx.namespace.clone()).filter(|n| !n.is_empty()))
        .unwrap_or_else(|| "default".to_string());
    let client = KvClient::with_auth(&servers, Duration::from_secs(10), &creds)?;
    let api = cli::Api::new(&servers, &creds)?;
    match cli.command {
        Command::Config(_) => unreachable!("handled above"),
        Command::Token(t) => token_command(&cli::cluster::ClusterApi::new(&servers, &creds)?, t).await?,
        Command::Cluster(c) => {
            cluster_command(&cli::cluster::ClusterApi::new(&servers, &creds)?, c, &creds, &servers).await?
        }
        Command::Apply(a) => {
            let objects = cli::read_manifests(&cli::manifest_files(&a.files.files, a.files.recursive)?)?;
            cli::apply(&api, objects, &namespace, a.atomic, a.dry_run == "server").await?;
        }
        Command::Create(a) => {
            let objects = cli::read_manifests(&cli::manifest_files(&a.files, a.recursive)?)?;
            for mut o in objects {
                if let Some(m) = keel::api::object::meta_mut(&mut o) {
                    if m.namespace.is_empty() {
                        m.namespace = namespace.clone();
                    }
                }
                let created = cli::create(&api, o).await?;
                println!("{} created", cli::display_name(&created));
            }
        }
        Command::Get(g) => get(&api, g, &namespace).await?,
        Command::Delete(d) => delete(&api, d, &namespace).await?,
        Command::Describe(d) => {
            let info = cli::resolve_kind(d.kind.split_once('/').map_or(d.kind.as_str(), |(k, _)| k))?;
            let ns = if info.namespaced { namespace.clone() } else { String::new() };
            let objects = match (d.kind.split_once('/').map(|(_, n)| n.to_string()), d.name) {
                (Some(n), _) | (None, Some(n)) => vec![cli::commands::get_object(&api, info, &ns, &n).await?],
                (None, None) => {
                    let req = pb::ListRequest {
                        kind: info.name.into(),
                        namespace: ns.clone(),
                        label_selector: d.selector.clone(),
                        ..Default::default()
                    };
                    api.call(|mut c| {
                        let r = req.clone();
                        async move { c.list(r).await }
                    })
                    .await
                    .map_err(cli::status_error)?
                    .items
                }
            };
            let mut text = Vec::new();
            for o in &objects {
                text.push(cli::commands::describe(&api, o).await?);
            }
            cli::commands::emit(&text.join("\n\n"))?;
        }
        Command::Label(m) => println!("{}", map_command(&api, m, &namespace, false).await?),
        Command::Annotate(m) => println!("{}", map_command(&api, m, &namespace, true).await?),
        Command::Scale(a) => {
            let (kind, name) = split_ref(&a.kind, a.name.as_deref())?;
            let info = cli::resolve_kind(&kind)?;
            let ns = if info.namespaced { namespace.clone() } else { String::new() };
            println!("{}", cli::commands::scale(&api, info, &ns, &name, a.replicas, a.current_replicas).await?);
        }
        Command::Edit(a) => {
            let (kind, name) = split_ref(&a.kind, a.name.as_deref())?;
            let info = cli::resolve_kind(&kind)?;
            let ns = if info.namespaced { namespace.clone() } else { String::new() };
            println!("{}", cli::commands::edit(&api, info, &ns, &name).await?);
        }
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
            for (i, addr) in servers.iter().enumerate() {
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

async fn token_command(api: &cli::cluster::ClusterApi, t: TokenCommand) -> anyhow::Result<()> {
    match t {
        TokenCommand::Create { role, user, ttl, description } => {
            let ttl_seconds = cli::cluster::parse_ttl(&ttl)?;
            let r = api
                .call(|mut c| {
                    let req = pb::CreateTokenRequest {
                        role: role.clone(),
                        ttl_seconds,
                        description: description.clone(),
                        user: user.clone(),
                    };
                    async move { c.create_token(req).await }
                })
                .await?;
            println!("{}", r.token);
        }
        TokenCommand::List => {
            let r = api.call(|mut c| async move { c.list_tokens(pb::ListTokensRequest {}).await }).await?;
            cli::cluster::print_tokens(&r.tokens);
        }
        TokenCommand::Revoke { id } => {
            api.call(|mut c| {
                let req = pb::RevokeTokenRequest { id: id.clone() };
                async move { c.revoke_token(req).await }
            })
            .await?;
            println!("token {id} revoked");
        }
    }
    Ok(())
}

async fn cluster_command(
    api: &cli::cluster::ClusterApi,
    c: ClusterCommand,
    creds: &keel::client::ClientAuth,
    servers: &[String],
) -> anyhow::Result<()> {
    match c {
        ClusterCommand::Members => {
            let r = api.call(|mut c| async move { c.members(pb::MembersRequest {}).await }).await?;
            cli::cluster::print_members(&r);
        }
        ClusterCommand::Status => {
            let r = api.call(|mut c| async move { c.members(pb::MembersRequest {}).await }).await?;
            let voters = r.members.iter().filter(|m| m.role == "voter").count();
            let up = r.members.iter().filter(|m| m.role == "voter" && m.status.is_some()).count();
            let leader = r.members.iter().find(|m| m.id == r.leader_id);
            match leader {
                Some(l) => println!("Leader: replica {} ({}, {})", l.id, l.name, l.address),
                None => println!("Leader: none"),
            }
            let health = if up == voters {
                "healthy"
            } else if up > voters / 2 {
                "degraded (quorum held)"
            } else {
                "NO QUORUM"
            };
            println!("Voters: {up}/{voters} reachable, {health}");
            cli::cluster::print_members(&r);
        }
        ClusterCommand::Remove { id } => {
            let req = match id.strip_prefix("node/") {
                Some(node) => pb::RemoveMemberRequest { id: 0, node: node.to_string() },
                None => pb::RemoveMemberRequest {
                    id: id.parse().with_context(|| format!("{id:?}: expected a replica id or node/NAME"))?,
                    node: String::new(),
                },
            };
            api.call(|mut c| {
                let req = req.clone();
                async move { c.remove_member(req).await }
            })
            .await?;
            println!("{id} removed");
        }
        ClusterCommand::Snapshot(SnapshotCommand::NewKey { file }) => {
            if file.exists() {
                anyhow::bail!("{} exists; not overwriting a key", file.display());
            }
            keel::server::secrets::Keyring::load_or_create(&file)?;
            println!("recovery key written to {}; keep it apart from the backups", file.display());
        }
        ClusterCommand::Snapshot(SnapshotCommand::Verify { file, recovery_key: key }) => {
            let key = recovery_key(&key)?;
            match keel::server::backup::read(&file, key.as_ref()) {
                Ok((h, _)) => println!(
                    "{}: OK (cluster {}, revision {}, {} keys, taken {})",
                    file.display(),
                    h.cluster_id,
                    h.revision,
                    h.keys,
                    h.created
                ),
                Err(e) => return Err(e.into()),
            }
        }
        ClusterCommand::Snapshot(SnapshotCommand::Save { file, recovery_key: key }) => {
            let key = recovery_key(&key)?;
            let mut stream = api.call(|mut c| async move { c.snapshot(pb::SnapshotRequest {}).await }).await?;
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(cli::status_error)? {
                bytes.extend_from_slice(&chunk.data);
            }
            let payload = <pb::BackupPayload as prost::Message>::decode(bytes.as_slice())
                .context("the server sent a damaged snapshot")?;
            let h = keel::server::backup::write(&file, &payload, key.as_ref())?;
            println!(
                "Snapshot saved to {}: revision {}, {} keys, sha256 {}{}",
                file.display(),
                h.revision,
                h.keys,
                h.sha256,
                if h.sealed_with.is_empty() {
                    " (NOT sealed: it holds the CA key)".to_string()
                } else {
                    ", sealed".to_string()
                }
            );
        }
        ClusterCommand::Recover { plan: _ } => {
            let client = keel::client::KvClient::with_auth(servers, Duration::from_secs(3), creds)?;
            let mut survivors = Vec::new();
            for (i, s) in servers.iter().enumerate() {
                survivors.push((s.clone(), client.status_of(i).await.map_err(|e| e.to_string())));
            }
            print!("{}", cli::cluster::recovery_plan(&survivors)?);
        }
        ClusterCommand::ReencryptSecrets => {
            let r = api.call(|mut c| async move { c.reencrypt_secrets(pb::ReencryptSecretsRequest {}).await }).await?;
            println!("{} secrets re-sealed with {}, {} already were", r.resealed, r.active_key, r.unchanged);
        }
        ClusterCommand::TransferLeader { id } => {
            let r = api.call(|mut c| async move { c.transfer_leader(pb::TransferLeaderRequest { id }).await }).await?;
            println!("replica {} leads", r.leader_id);
        }
        ClusterCommand::Certs => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
            println!("{:<24} {:<22} LEFT", "CERTIFICATE", "EXPIRES");
            let row = |subject: &str, not_after: &str, left: i64| {
                let days = left / 86_400;
                let warn = if left < 30 * 86_400 { "  <- renew soon" } else { "" };
                println!("{subject:<24} {not_after:<22} {days}d{warn}");
            };
            let mut seen = std::collections::BTreeSet::new();
            // Every member reports its own certificate; ask each at its address.
            let mut addrs: Vec<String> = servers.to_vec();
            if let Ok(m) = api.call(|mut c| async move { c.members(pb::MembersRequest {}).await }).await {
                addrs = m.members.into_iter().map(|m| m.address).collect();
            }
            for s in &addrs {
                let one = cli::cluster::ClusterApi::new(std::slice::from_ref(s), creds)?;
                match one.call(|mut c| async move { c.certificates(pb::CertificatesRequest {}).await }).await {
                    Ok(r) => {
                        for cert in r.certificates {
                            if seen.insert(cert.subject.clone()) {
                                row(&cert.subject, &cert.not_after, cert.seconds_left);
                            }
                        }
                    }
                    Err(e) => println!("{s:<24} unreachable: {e}"),
                }
            }
            // Nodes report their certificate's end on their Node object.
            let nodes = cli::Api::new(servers, creds)?
                .call(
                    |mut c| async move { c.list(pb::ListRequest { kind: "Node".into(), ..Default::default() }).await },
                )
                .await;
            if let Ok(list) = nodes {
                for n in &list.items {
                    let Some(m) = keel::api::object::meta(n) else { continue };
                    let Some(end) = m.annotations.get(keel::agent::CERT_EXPIRES) else { continue };
                    let left = humantime::parse_rfc3339(end)
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs() as i64 - now);
                    row(&format!("node {}", m.name), end, left);
                }
            }
            if let keel::client::ClientAuth::Certificate(mine) = creds {
                let end = keel::pki::not_after(&mine.cert_pem)?;
                let who = mine.identity().map_or_else(|| "this user".to_string(), |i| i.to_string());
                let ts =
                    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(end.max(0) as u64));
                row(&format!("{who} (you)"), &ts.to_string(), end - now);
            }
        }
    }
    Ok(())
}

async fn map_command(api: &cli::Api, m: MapArgs, namespace: &str, annotations: bool) -> anyhow::Result<String> {
    let (kind, name, rest) = match m.kind.split_once('/') {
        Some((k, n)) => (k.to_string(), n.to_string(), &m.args[..]),
        None => (m.kind.clone(), m.args[0].clone(), &m.args[1..]),
    };
    let info = cli::resolve_kind(&kind)?;
    let ns = if info.namespaced { namespace } else { "" };
    let edits = cli::commands::parse_map_edits(rest)?;
    cli::commands::label_or_annotate(api, info, ns, &name, &edits, m.overwrite, annotations).await
}

async fn get(api: &cli::Api, g: GetArgs, namespace: &str) -> anyhow::Result<()> {
    let info = cli::resolve_kind(&g.kind)?;
    let namespace = if g.all_namespaces || !info.namespaced { String::new() } else { namespace.to_string() };
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

async fn delete(api: &cli::Api, d: DeleteArgs, namespace: &str) -> anyhow::Result<()> {
    let mut refs = Vec::new();
    if !d.files.is_empty() {
        for o in cli::read_manifests(&cli::manifest_files(&d.files, false)?)? {
            let info = keel::api::object::info(&o).context("object without a kind")?;
            let m = keel::api::object::meta(&o).cloned().unwrap_or_default();
            let ns = if m.namespace.is_empty() { namespace.to_string() } else { m.namespace };
            refs.push(pb::ObjectRef { kind: info.name.into(), namespace: ns, name: m.name });
        }
    } else {
        let kind = d.kind.clone().context("give a kind and names, or -f FILE")?;
        let info = cli::resolve_kind(&kind)?;
        if d.names.is_empty() {
            anyhow::bail!("resource(s) were provided, but no name was specified");
        }
        for n in &d.names {
            refs.push(pb::ObjectRef { kind: info.name.into(), namespace: namespace.to_string(), name: n.clone() });
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
