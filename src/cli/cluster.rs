//! keelctl's cluster commands: join tokens, members, removal, leader transfer, certificates.

use std::time::Duration;

use crate::client::{AuthChannel, ClientAuth};
use anyhow::{bail, Context as _};
use tonic::Code;

use crate::proto::v1 as pb;
use crate::proto::v1::cluster_client::ClusterClient;

/// Cluster API clients for every listed replica; calls go to the first that answers.
pub struct ClusterApi {
    clients: Vec<(String, ClusterClient<AuthChannel>)>,
}

impl ClusterApi {
    pub fn new(servers: &[String], auth: &ClientAuth) -> anyhow::Result<ClusterApi> {
        let mut clients = Vec::new();
        for s in servers {
            let ch = crate::client::auth_channel(s, auth, Duration::from_secs(2))
                .with_context(|| format!("invalid server address {s:?}"))?;
            clients.push((s.clone(), ClusterClient::new(ch)));
        }
        Ok(ClusterApi { clients })
    }

    pub async fn call<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(ClusterClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = None;
        for (_, c) in &self.clients {
            match f(c.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if matches!(s.code(), Code::Unavailable | Code::Unknown) => last = Some(s),
                Err(s) => return Err(super::status_error(s)),
            }
        }
        Err(super::status_error(last.unwrap_or_else(|| tonic::Status::unavailable("no replica answered"))))
    }
}

/// `24h`, `30m`, `90s`, `7d`, or `0` (never expires).
pub fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    if s == "0" {
        return Ok(0);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("--ttl {s:?}: expected a number and a unit (s, m, h, d)"))?;
    let mult = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => bail!("--ttl {s:?}: unknown unit {other:?} (s, m, h, d)"),
    };
    Ok(n * mult)
}

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
pub fn recovery_plan(survivors: &[(String, Result<pb::StoreStatusResponse, String>)]) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let up: Vec<(&String, &pb::StoreStatusResponse)> =
        survivors.iter().filter_map(|(a, r)| r.as_ref().ok().map(|s| (a, s))).collect();
    writeln!(
        out,
        "{:<22} {:>3} {:<10} {:>5} {:>9} {:>9} {:>9} {:>9}  MEMBERSHIP (voters)",
        "SURVIVOR", "ID", "STATE", "TERM", "LAST-TERM", "LAST-LOG", "COMMIT", "APPLIED"
    )?;
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
                )?;
            }
            Err(e) => writeln!(out, "{addr:<22} unreachable: {e}")?,
        }
    }
    let Some((addr, best)) = up.iter().max_by_key(|(_, s)| (s.last_log_term, s.last_log_index, s.applied_index)) else {
        bail!("{out}\nno survivor answered: nothing to recover from");
    };
    let voters = best.members.iter().filter(|m| m.voter).count();
    writeln!(out)?;
    if up.len() * 2 > voters && best.leader_id != 0 {
        writeln!(out, "A quorum is still up (leader {}): no recovery is needed.", best.leader_id)?;
    }
    writeln!(
        out,
        "Most up-to-date survivor: replica {} at {addr} (last log {}, term {}).",
        best.id, best.last_log_index, best.last_log_term
    )?;
    let known_commit = up.iter().map(|(_, s)| s.committed_index).max().unwrap_or(0);
    if known_commit > best.last_log_index {
        writeln!(
            out,
            "AT RISK: entries {}..={} were committed (a survivor saw commit index {known_commit}) but no survivor holds \
             them; they will be lost.",
            best.last_log_index + 1,
            known_commit
        )?;
    } else {
        writeln!(
            out,
            "No committed entry is missing: every entry a survivor knows to be committed is on replica {}.",
            best.id
        )?;
    }
    if best.last_log_index > known_commit {
        writeln!(
            out,
            "Entries {}..={} are on replica {} but no survivor saw them committed; the recovery keeps and commits them \
             (a write whose client got an error or no answer may therefore appear).",
            known_commit + 1,
            best.last_log_index,
            best.id
        )?;
    }
    writeln!(out)?;
    writeln!(out, "To recover: stop every survivor, then on replica {} run", best.id)?;
    writeln!(out, "  keel server --force-new-cluster --data-dir <its data dir> --listen {addr} ...")?;
    writeln!(out, "and join new replicas to it with a server token. The other survivors are fenced out; wipe their data before they join again.")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(super::parse_ttl("24h").unwrap(), 86_400);
        assert_eq!(super::parse_ttl("90s").unwrap(), 90);
        assert_eq!(super::parse_ttl("0").unwrap(), 0);
        assert!(super::parse_ttl("1y").is_err());
        assert!(super::parse_ttl("h").is_err());
    }

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
