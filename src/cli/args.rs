//! keelctl's command line: every command, flag and argument (clap). Parsing only; the
//! commands themselves live beside this module.

use clap::{Parser, Subcommand};

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    crate::api::duration::parse(s).map_err(|e| e.to_string())
}

#[derive(Parser)]
#[command(name = "keelctl", version, about = "Keel command-line client")]
pub struct Cli {
    /// Replica addresses (host:port), comma-separated; the client fails over between them.
    /// Default: the current context's servers, else 127.0.0.1:7001.
    #[arg(long, short = 's', value_delimiter = ',', env = "KEEL_SERVER", global = true)]
    pub server: Option<Vec<String>>,
    /// The context of the configuration file to use instead of its current one.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace. Default: the context's namespace, else "default".
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// How long to wait for one answer from a replica (e.g. 10s, 500ms).
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: std::time::Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Print the logs of a container in a pod.
    Logs(LogsArgs),
    /// Run a command in a container: keelctl exec POD [-c C] [-i] [-t] -- COMMAND [ARGS...]
    Exec(ExecArgs),
    /// Mark a node unschedulable: new pods go elsewhere, running ones stay.
    Cordon(NodeArgs),
    /// Mark a node schedulable again.
    Uncordon(NodeArgs),
    /// Cordon a node, then move its pods off it (each deleted with its grace period).
    Drain(DrainArgs),
    /// The images on the nodes.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// List each node's images (as its agent last reported them), largest first.
    Ls {
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(clap::Args)]
pub struct NodeArgs {
    /// The node (NAME or node/NAME).
    pub node: String,
}

#[derive(clap::Args)]
pub struct DrainArgs {
    /// The node (NAME or node/NAME).
    pub node: String,
    /// Also delete pods that no controller recreates.
    #[arg(long)]
    pub force: bool,
    /// Leave DaemonSet-managed pods where they are (their controller would put them back).
    #[arg(long)]
    pub ignore_daemonsets: bool,
    /// Also delete pods with emptyDir volumes (their data is lost).
    #[arg(long)]
    pub delete_emptydir_data: bool,
    /// Seconds each pod gets to stop (default: its own terminationGracePeriodSeconds).
    #[arg(long, allow_hyphen_values = true)]
    pub grace_period: Option<i64>,
    /// Give up waiting after this long (e.g. 5m); 0 or unset waits as long as it takes.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<std::time::Duration>,
}

#[derive(clap::Args)]
pub struct LogsArgs {
    /// The pod (NAME or pod/NAME).
    pub pod: String,
    /// The container; may be left out when the pod has one.
    #[arg(short = 'c', long)]
    pub container: Option<String>,
    /// Keep streaming until the container stops.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The previous instance of the container.
    #[arg(short = 'p', long)]
    pub previous: bool,
    /// The last N lines (-1: all).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub tail: i64,
    /// Only lines newer than this (e.g. 5s, 2m, 3h).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Prefix each line with its RFC 3339 time.
    #[arg(long)]
    pub timestamps: bool,
    /// Stop after this many bytes.
    #[arg(long)]
    pub limit_bytes: Option<i64>,
}

#[derive(clap::Args)]
pub struct ExecArgs {
    /// The pod (NAME or pod/NAME).
    pub pod: String,
    /// The container; may be left out when the pod has one.
    #[arg(short = 'c', long)]
    pub container: Option<String>,
    /// Pass stdin to the command.
    #[arg(short = 'i', long)]
    pub stdin: bool,
    /// A terminal: stdin in raw mode, the window size passed on.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(clap::Args)]
pub struct FileArgs {
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<std::path::PathBuf>,
    /// Descend into subdirectories of directories given with -f.
    #[arg(short = 'R', long)]
    pub recursive: bool,
}

#[derive(clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub files: FileArgs,
    /// Apply every object in one transaction: all of them or none.
    #[arg(long)]
    pub atomic: bool,
    /// "server": admit and merge on the server, report, write nothing. "none" (default).
    #[arg(long, default_value = "none", value_parser = ["none", "server"])]
    pub dry_run: String,
}

#[derive(clap::Args)]
pub struct GetArgs {
    pub kind: String,
    pub name: Option<String>,
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// table (default), wide, yaml, json, name, jsonpath=TEMPLATE, jsonpath-file=FILE,
    /// custom-columns=HEADER:.path,... or custom-columns-file=FILE, with kubectl's syntax.
    #[arg(short = 'o', long, default_value = "table")]
    pub output: String,
    /// Show every object's labels as the last column.
    #[arg(long)]
    pub show_labels: bool,
    #[arg(short = 'l', long, default_value = "")]
    pub selector: String,
    #[arg(long, default_value = "")]
    pub field_selector: String,
    /// After listing, watch for changes.
    #[arg(short = 'w', long)]
    pub watch: bool,
}

#[derive(clap::Args)]
pub struct DeleteArgs {
    pub kind: Option<String>,
    pub names: Vec<String>,
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<std::path::PathBuf>,
    /// Background (default), Foreground or Orphan.
    #[arg(long, default_value = "Background")]
    pub cascade: String,
    /// Seconds a Pod's node has to stop it; -1: the pod's own terminationGracePeriodSeconds.
    /// 0 only with --force (else it means 1).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub grace_period: i64,
    /// Delete at once, without waiting for the node to confirm the pod stopped (its
    /// containers may keep running for a while).
    #[arg(long)]
    pub force: bool,
    /// Same as --grace-period=1.
    #[arg(long)]
    pub now: bool,
    /// Wait until the objects are gone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub wait: bool,
    /// How long to wait with --wait (0: a week).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
}

impl DeleteArgs {
    /// The grace period sent, with kubectl's rules.
    pub fn grace_period(&self) -> Option<i64> {
        let g = if self.now { 1 } else { self.grace_period };
        match (g, self.force) {
            (g, true) if g <= 0 => Some(0),
            (0, false) => Some(1),
            (g, _) if g < 0 => None,
            (g, _) => Some(g),
        }
    }
}

#[derive(clap::Args)]
pub struct DescribeArgs {
    pub kind: String,
    pub name: Option<String>,
    #[arg(short = 'l', long, default_value = "")]
    pub selector: String,
}

#[derive(clap::Args)]
pub struct MapArgs {
    /// KIND NAME, or KIND/NAME.
    pub kind: String,
    /// NAME (unless given as KIND/NAME), then key=value or key- pairs.
    #[arg(required = true)]
    pub args: Vec<String>,
    /// Replace a key's existing value.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(clap::Args)]
pub struct ScaleArgs {
    pub kind: String,
    pub name: Option<String>,
    #[arg(long)]
    pub replicas: i32,
    /// Scale only if the replicas are this number now.
    #[arg(long)]
    pub current_replicas: Option<i32>,
}

#[derive(clap::Args)]
pub struct EditArgs {
    pub kind: String,
    pub name: Option<String>,
}

#[derive(Subcommand)]
pub enum TokenCommand {
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
pub enum ClusterCommand {
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
pub enum SnapshotCommand {
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

#[derive(Subcommand)]
pub enum ConfigCommand {
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

#[derive(Subcommand)]
pub enum KvCommand {
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
