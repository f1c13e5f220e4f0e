//! `keelctl`: the command-line client. For now it speaks the store's internal KV API;
//! object commands (apply, get, describe, ...) arrive with the Object API.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
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
    /// Store-level state of every listed replica.
    Status,
    /// Read, write and watch raw store keys (admin only).
    #[command(subcommand)]
    Kv(KvCommand),
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
    match cli.command {
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
