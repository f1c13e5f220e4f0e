//! keelctl's cluster commands: join tokens, members, removal, leader transfer, certificates.

use std::time::Duration;

use anyhow::{bail, Context as _};
use tonic::transport::Channel;
use tonic::Code;

use crate::pki::Credentials;
use crate::proto::v1 as pb;
use crate::proto::v1::cluster_client::ClusterClient;

/// Cluster API clients for every listed replica; calls go to the first that answers.
pub struct ClusterApi {
    clients: Vec<(String, ClusterClient<Channel>)>,
}

impl ClusterApi {
    pub fn new(servers: &[String], creds: &Credentials) -> anyhow::Result<ClusterApi> {
        let mut clients = Vec::new();
        for s in servers {
            let ch = crate::client::endpoint(s, creds)
                .with_context(|| format!("invalid server address {s:?}"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(130))
                .connect_lazy();
            clients.push((s.clone(), ClusterClient::new(ch)));
        }
        Ok(ClusterApi { clients })
    }

    pub async fn call<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        F: Fn(ClusterClient<Channel>) -> Fut,
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
        println!("{:<8} {:<7} {:<22} {:<22} {}", t.id, t.role, expires, t.created, t.description);
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
}
