//! keelctl's cluster commands: join tokens, members, status, removal, leader transfer,
//! certificates, secrets re-sealing, backups and the recovery plan.

use std::time::Duration;

use super::args::{ClusterCommand, SnapshotCommand, TokenCommand};
use super::{bail, Context, Result, Session};
use crate::api::kinds::Kind;
use crate::client::{Client, ListOptions};
use crate::proto::v1 as pb;
use crate::seal::Keyring;

pub fn print_tokens(tokens: &[pb::TokenInfo]) {
    println!("{:<8} {:<7} {:<22} {:<22} DESCRIPTION", "ID", "ROLE", "EXPIRES", "CREATED");
    for t in tokens {
        let expires = if t.expires.is_empty() { "never" } else { t.expires.as_str() };
        let role = if t.user.is_empty() { t.role.clone() } else { format!("user:{}", t.user) };
        println!("{:<8} {:<7} {:<22} {:<22} {}", t.id, role, expires, t.created, t.description);
    }
}

pub fn print_members(r: &pb::MembersResponse) {
    let leader_log =
        r.members.iter().find(|m| m.id == r.leader_id).and_then(|m| m.status.as_ref()).map_or(0, |s| s.last_log_index);
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING);
    t.set_header([
        "ID",
        "NAME",
        "ADDRESS",
        "ROLE",
        "STATE",
        "TERM",
        "LEADER",
        "COMMIT",
        "APPLIED",
        "LAG",
        "LAST-CONTACT",
    ]);
    for m in &r.members {
        let contact = match m.last_contact_ms {
            ms if ms < 0 => "-".to_string(),
            0 if m.id == r.leader_id => "(leader)".to_string(),
            ms => format!("{ms}ms"),
        };
        match &m.status {
            Some(s) => t.add_row([
                m.id.to_string(),
                m.name.clone(),
                m.address.clone(),
                m.role.clone(),
                s.state.clone(),
                s.term.to_string(),
                s.leader_id.to_string(),
                s.committed_index.to_string(),
                s.applied_index.to_string(),
                leader_log.saturating_sub(s.applied_index).to_string(),
                contact,
            ]),
            None => t.add_row([
                m.id.to_string(),
                m.name.clone(),
                m.address.clone(),
                m.role.clone(),
                format!("unreachable: {}", m.error),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                contact,
            ]),
        };
    }
    let text = t.to_string();
    for l in text.lines() {
        println!("{}", l.strip_prefix(' ').unwrap_or(l).trim_end());
    }
}

/// The recovery plan from the survivors' own reports (no quorum needed): the most up-to-date
/// log wins (last term, then last index, then applied index).
pub fn recovery_plan(survivors: &[(String, std::result::Result<pb::StoreStatusResponse, String>)]) -> Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let up: Vec<(&String, &pb::StoreStatusResponse)> =
        survivors.iter().filter_map(|(a, r)| r.as_ref().ok().map(|s| (a, s))).collect();
    let w = |e: std::fmt::Error| super::CliError::Message(e.to_string());
    writeln!(
        out,
        "{:<22} {:>3} {:<10} {:>5} {:>9} {:>9} {:>9} {:>9}  MEMBERSHIP (voters)",
        "SURVIVOR", "ID", "STATE", "TERM", "LAST-TERM", "LAST-LOG", "COMMIT", "APPLIED"
    )
    .map_err(w)?;
    for (addr, r) in survivors {
        match r {
            Ok(s) => {
                let voters: Vec<String> = s.members.iter().filter(|m| m.voter).map(|m| m.id.to_string()).collect();
                writeln!(
                    out,
                    "{addr:<22} {:>3} {:<10} {:>5} {:>9} {:>9} {:>9} {:>9}  {}",
                    s.id,
                    s.state,
                    s.term,
                    s.last_log_term,
                    s.last_log_index,
                    s.committed_index,
                    s.applied_index,
                    voters.join(",")
                )
                .map_err(w)?;
            }
            Err(e) => writeln!(out, "{addr:<22} unreachable: {e}").map_err(w)?,
        }
    }
    let Some((addr, best)) = up.iter().max_by_key(|(_, s)| (s.last_log_term, s.last_log_index, s.applied_index)) else {
        bail!("{out}\nno survivor answered: nothing to recover from");
    };
    let voters = best.members.iter().filter(|m| m.voter).count();
    writeln!(out).map_err(w)?;
    if up.len() * 2 > voters && best.leader_id != 0 {
        writeln!(out, "A quorum is still up (leader {}): no recovery is needed.", best.leader_id).map_err(w)?;
    }
    writeln!(
        out,
        "Most up-to-date survivor: replica {} at {addr} (last log {}, term {}).",
        best.id, best.last_log_index, best.last_log_term
    )
    .map_err(w)?;
    let known_commit = up.iter().map(|(_, s)| s.committed_index).max().unwrap_or(0);
    if known_commit > best.last_log_index {
        writeln!(
            out,
            "AT RISK: entries {}..={} were committed (a survivor saw commit index {known_commit}) but no survivor holds \
             them; they will be lost.",
            best.last_log_index + 1,
            known_commit
        ).map_err(w)?;
    } else {
        writeln!(
            out,
            "No committed entry is missing: every entry a survivor knows to be committed is on replica {}.",
            best.id
        )
        .map_err(w)?;
    }
    if best.last_log_index > known_commit {
        writeln!(
            out,
            "Entries {}..={} are on replica {} but no survivor saw them committed; the recovery keeps and commits them \
             (a write whose client got an error or no answer may therefore appear).",
            known_commit + 1,
            best.last_log_index,
            best.id
        )
        .map_err(w)?;
    }
    writeln!(out).map_err(w)?;
    writeln!(out, "To recover: stop every survivor, then on replica {} run", best.id).map_err(w)?;
    writeln!(out, "  keel server --force-new-cluster --data-dir <its data dir> --listen {addr} ...").map_err(w)?;
    writeln!(out, "and join new replicas to it with a server token. The other survivors are fenced out; wipe their data before they join again.").map_err(w)?;
    Ok(out)
}

fn recovery_key(path: &Option<std::path::PathBuf>) -> Result<Option<Keyring>> {
    let Some(p) = path else { return Ok(None) };
    let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
    Ok(Some(Keyring::parse(&text, &p.display().to_string())?))
}

/// `keelctl token`.
pub async fn token(s: &Session, t: TokenCommand) -> Result<()> {
    let api = &s.client;
    match t {
        TokenCommand::Create { role, user, ttl, description } => {
            let ttl_seconds =
                crate::api::duration::parse_secs(&ttl).map_err(|e| super::CliError::Message(format!("--ttl: {e}")))?;
            let r = api.create_token(pb::CreateTokenRequest { role, ttl_seconds, description, user }).await?;
            println!("{}", r.token);
        }
        TokenCommand::List => {
            let r = api.list_tokens(pb::ListTokensRequest {}).await?;
            print_tokens(&r.tokens);
        }
        TokenCommand::Revoke { id } => {
            api.revoke_token(pb::RevokeTokenRequest { id: id.clone() }).await?;
            println!("token {id} revoked");
        }
    }
    Ok(())
}

/// `keelctl cluster`.
pub async fn run(s: &Session, c: ClusterCommand) -> Result<()> {
    let api = &s.client;
    let servers = &s.servers;
    match c {
        ClusterCommand::Members => {
            let r = api.members(pb::MembersRequest {}).await?;
            print_members(&r);
        }
        ClusterCommand::Status => {
            let r = api.members(pb::MembersRequest {}).await?;
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
            print_members(&r);
        }
        ClusterCommand::Remove { id } => {
            let req = match id.strip_prefix("node/") {
                Some(node) => pb::RemoveMemberRequest { id: 0, node: node.to_string() },
                None => pb::RemoveMemberRequest {
                    id: id.parse().with_context(|| format!("{id:?}: expected a replica id or node/NAME"))?,
                    node: String::new(),
                },
            };
            api.remove_member(req).await?;
            println!("{id} removed");
        }
        ClusterCommand::Snapshot(SnapshotCommand::NewKey { file }) => {
            if file.exists() {
                bail!("{} exists; not overwriting a key", file.display());
            }
            Keyring::load_or_create(&file)?;
            println!("recovery key written to {}; keep it apart from the backups", file.display());
        }
        ClusterCommand::Snapshot(SnapshotCommand::Verify { file, recovery_key: key }) => {
            let key = recovery_key(&key)?;
            match crate::backup::read(&file, key.as_ref()) {
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
            let bytes = api.snapshot().await?;
            let payload = <pb::BackupPayload as prost::Message>::decode(bytes.as_slice())
                .context("the server sent a damaged snapshot")?;
            let h = crate::backup::write(&file, &payload, key.as_ref())?;
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
            let client = Client::new(
                servers,
                s.auth.clone(),
                crate::client::ClientConfig::with_timeout(Duration::from_secs(3)),
            )?;
            let mut survivors = Vec::new();
            for (i, addr) in servers.iter().enumerate() {
                survivors.push((addr.clone(), client.status_of(i).await.map_err(|e| e.to_string())));
            }
            print!("{}", recovery_plan(&survivors)?);
        }
        ClusterCommand::ReencryptSecrets => {
            let r = api.reencrypt_secrets(pb::ReencryptSecretsRequest {}).await?;
            println!("{} secrets re-sealed with {}, {} already were", r.resealed, r.active_key, r.unchanged);
        }
        ClusterCommand::TransferLeader { id } => {
            let r = api.transfer_leader(pb::TransferLeaderRequest { id }).await?;
            println!("replica {} leads", r.leader_id);
        }
        ClusterCommand::Certs => {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            println!("{:<24} {:<22} LEFT", "CERTIFICATE", "EXPIRES");
            let row = |subject: &str, not_after: &str, left: i64| {
                let days = left / 86_400;
                let warn = if left < 30 * 86_400 { "  <- renew soon" } else { "" };
                println!("{subject:<24} {not_after:<22} {days}d{warn}");
            };
            let mut seen = std::collections::BTreeSet::new();
            // Every member reports its own certificate; ask each at its address.
            let mut addrs: Vec<String> = servers.to_vec();
            if let Ok(m) = api.members(pb::MembersRequest {}).await {
                addrs = m.members.into_iter().map(|m| m.address).collect();
            }
            let self_auth = s.auth.clone();
            for s in &addrs {
                let one = Client::new(
                    std::slice::from_ref(s),
                    crate::client::ClientAuth::clone(&self_auth),
                    Default::default(),
                )?;
                match one.certificates(pb::CertificatesRequest {}).await {
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
            let nodes = api.list_all(Kind::Node, &ListOptions::default()).await;
            if let Ok(list) = nodes {
                for n in &list.items {
                    let Some(m) = crate::api::object::meta(n) else { continue };
                    let Some(end) = m.annotations.get(crate::api::wellknown::CERT_EXPIRES_ANNOTATION) else { continue };
                    let left = humantime::parse_rfc3339(end)
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs() as i64 - now);
                    row(&format!("node {}", m.name), end, left);
                }
            }
            if let crate::client::ClientAuth::Certificate(mine) = &s.auth {
                let end = crate::pki::not_after(&mine.cert_pem)?;
                let who = mine.identity().map_or_else(|| "this user".to_string(), |i| i.to_string());
                let ts =
                    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(end.max(0) as u64));
                row(&format!("{who} (you)"), &ts.to_string(), end - now);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_plan_picks_the_most_up_to_date_log_and_names_lost_entries() {
        use crate::proto::v1 as pb;
        let s = |id, last_term, last, commit| pb::StoreStatusResponse {
            id,
            state: "Candidate".into(),
            last_log_term: last_term,
            last_log_index: last,
            committed_index: commit,
            members: vec![
                pb::MemberStatus { id: 1, voter: true, ..Default::default() },
                pb::MemberStatus { id: 2, voter: true, ..Default::default() },
                pb::MemberStatus { id: 3, voter: true, ..Default::default() },
            ],
            ..Default::default()
        };
        let plan = super::recovery_plan(&[
            ("a:1".into(), Ok(s(1, 3, 40, 38))),
            ("b:1".into(), Ok(s(2, 4, 39, 39))),
            ("c:1".into(), Err("refused".into())),
        ])
        .unwrap();
        assert!(plan.contains("Most up-to-date survivor: replica 2"), "a later term wins over a longer log:\n{plan}");
        assert!(plan.contains("No committed entry is missing"), "{plan}");
        let lost = super::recovery_plan(&[("a:1".into(), Ok(s(1, 3, 40, 45)))]).unwrap();
        assert!(lost.contains("AT RISK: entries 41..=45"), "{lost}");
        assert!(super::recovery_plan(&[("a:1".into(), Err("x".into()))]).is_err());
    }
}
