//! `keelctl status` (store state of every listed replica) and `keelctl kv` (raw keys of the
//! store's internal API, for administrators).

use super::args::KvCommand;
use super::{bail, Context, Result, Session};
use crate::proto::v1 as pb;

/// The range of every key starting with `key` when `prefix`, else just `key`.
fn range_end(key: &str, prefix: bool) -> Vec<u8> {
    if prefix {
        crate::grpc::prefix_end(key.as_bytes())
    } else {
        Vec::new()
    }
}

pub async fn status(s: &Session) -> Result<()> {
    println!(
        "{:<22} {:>3} {:<10} {:>5} {:>7} {:>9} {:>9} {:>9}",
        "ADDRESS", "ID", "STATE", "TERM", "LEADER", "LAST-LOG", "APPLIED", "REVISION"
    );
    for (i, addr) in s.servers.iter().enumerate() {
        match s.client.status_of(i).await {
            Ok(st) => println!(
                "{addr:<22} {:>3} {:<10} {:>5} {:>7} {:>9} {:>9} {:>9}",
                st.id, st.state, st.term, st.leader_id, st.last_log_index, st.applied_index, st.revision
            ),
            Err(e) => println!("{addr:<22} unreachable: {e}"),
        }
    }
    Ok(())
}

pub async fn run(s: &Session, k: KvCommand) -> Result<()> {
    let client = &s.client;
    match k {
        KvCommand::Get { key, prefix, stale } => {
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
        KvCommand::Put { key, value } => {
            let r = client.kv_put(key, value).await?;
            println!("revision {}", r.header.map_or(0, |h| h.revision));
        }
        KvCommand::Del { key, prefix } => {
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
        KvCommand::Watch { prefix, from } => {
            let mut stream = client
                .kv_watch(pb::WatchRequest {
                    range_end: range_end(&prefix, true),
                    key: prefix.into_bytes(),
                    start_revision: from,
                    ..Default::default()
                })
                .await?;
            while let Some(msg) = stream.message().await.context("watch stream")? {
                if msg.canceled {
                    bail!("watch ended: {}", msg.cancel_reason);
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_prefix_ends_after_its_last_key() {
        assert_eq!(super::range_end("/a/", true), b"/a0".to_vec());
        assert_eq!(super::range_end("a\u{7f}", true), b"a\x80".to_vec());
        assert!(super::range_end("x", false).is_empty());
    }
}
