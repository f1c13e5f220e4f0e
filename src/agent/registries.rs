//! Where images come from: the registries configuration (k3s's `registries.yaml`, plus
//! `offline`) and the credentials of a pod's `imagePullSecrets`.
//!
//! ```yaml
//! offline: true                 # only the mirror endpoints below are ever contacted
//! mirrors:
//!   docker.io:                  # or "*" for every registry without an entry of its own
//!     endpoint: ["http://127.0.0.1:5000"]
//!     rewrite: {"^library/(.*)": "mirrored/$1"}
//! configs:
//!   "127.0.0.1:5000":
//!     auth: {username: u, password: p}
//!     tls: {insecure_skip_verify: true}
//! ```
//!
//! A registry with a mirror is pulled from its endpoints only, in order; unlike k3s, the
//! registry itself is not tried after them unless it is listed. Without a mirror, the image's
//! own registry is used (HTTPS), unless `offline` is set: then nothing is contacted.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use base64::Engine;
use serde::Deserialize;

use super::runtime::PullSource;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registries {
    #[serde(default)]
    pub offline: bool,
    #[serde(default)]
    pub mirrors: HashMap<String, Mirror>,
    #[serde(default)]
    pub configs: HashMap<String, RegistryConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    #[serde(default)]
    pub endpoint: Vec<String>,
    /// Repository rewrites: a regular expression and its replacement.
    #[serde(default)]
    pub rewrite: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    pub auth: Option<AuthConfig>,
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub username: Option<String>,
    pub password: Option<String>,
    /// base64 of `username:password`.
    pub auth: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca_file: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// Credentials: a user name and password.
pub type Credentials = (String, String);

impl AuthConfig {
    fn credentials(&self) -> Option<Credentials> {
        if let (Some(u), Some(p)) = (&self.username, &self.password) {
            return Some((u.clone(), p.clone()));
        }
        decode_auth(self.auth.as_deref()?)
    }
}

fn decode_auth(b64: &str) -> Option<Credentials> {
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// The registry part of a normalized image name ("docker.io/library/busybox:1" → docker.io).
pub fn registry_of(image: &str) -> &str {
    image.split('/').next().unwrap_or_default()
}

/// A registry host as pull secrets write it ("https://index.docker.io/v1/" → docker.io).
fn host_key(s: &str) -> String {
    let s = s.trim_start_matches("https://").trim_start_matches("http://");
    let host = s.split('/').next().unwrap_or_default();
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        h => h.to_string(),
    }
}

/// Credentials per registry host, from the `.dockerconfigjson` (or legacy `.dockercfg`) of
/// pull secrets.
pub fn pull_secret_credentials(data: &BTreeMap<String, Vec<u8>>) -> Result<HashMap<String, Credentials>, String> {
    let (json, nested) = match (data.get(".dockerconfigjson"), data.get(".dockercfg")) {
        (Some(j), _) => (j, true),
        (None, Some(j)) => (j, false),
        (None, None) => return Err("it has no .dockerconfigjson".into()),
    };
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!(".dockerconfigjson: {e}"))?;
    let auths = if nested { &v["auths"] } else { &v };
    let mut out = HashMap::new();
    for (host, entry) in auths.as_object().into_iter().flatten() {
        let user = entry["username"].as_str();
        let pass = entry["password"].as_str();
        let creds = match (user, pass) {
            (Some(u), Some(p)) => Some((u.to_string(), p.to_string())),
            _ => entry["auth"].as_str().and_then(decode_auth),
        };
        if let Some(c) = creds {
            out.insert(host_key(host), c);
        }
    }
    Ok(out)
}

impl Registries {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Registries, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let r: Registries = serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for (name, m) in &r.mirrors {
            for e in &m.endpoint {
                parse_endpoint(e).map_err(|why| format!("{}: mirrors.{name}.endpoint {e:?}: {why}", path.display()))?;
            }
            for pattern in m.rewrite.keys() {
                regex::Regex::new(pattern)
                    .map_err(|why| format!("{}: mirrors.{name}.rewrite {pattern:?}: {why}", path.display()))?;
            }
        }
        for (host, c) in &r.configs {
            if let Some(ca) = c.tls.as_ref().and_then(|t| t.ca_file.as_ref()) {
                std::fs::metadata(ca)
                    .map_err(|e| format!("{}: configs.{host}.tls.ca_file {ca}: {e}", path.display()))?;
            }
        }
        Ok(r)
    }

    /// Where to pull `image` (normalized) from, in order, with the pod's pull-secret
    /// credentials. Empty when nothing may be contacted (offline, no mirror).
    pub fn sources(&self, image: &str, secrets: &HashMap<String, Credentials>) -> Result<Vec<PullSource>, String> {
        let registry = registry_of(image);
        let rest = &image[registry.len() + 1..];
        let (repository, reference) = split_reference(rest);
        let mirror = self.mirrors.get(registry).or_else(|| self.mirrors.get("*"));
        let mut out = Vec::new();
        match mirror.filter(|m| !m.endpoint.is_empty()) {
            Some(m) => {
                let mut repo = repository.to_string();
                for (pattern, replacement) in &m.rewrite {
                    let re = regex::Regex::new(pattern).map_err(|e| format!("rewrite {pattern:?}: {e}"))?;
                    if re.is_match(&repo) {
                        repo = re.replace(&repo, replacement.as_str()).into_owned();
                        break;
                    }
                }
                for e in &m.endpoint {
                    let (http, host) = parse_endpoint(e)?;
                    // The registry itself, listed as an endpoint, keeps its own name.
                    let repo = if host_key(&host) == registry { repository.to_string() } else { repo.clone() };
                    out.push(self.source(&host, http, repo, reference, secrets));
                }
            }
            None if self.offline => {}
            None => out.push(self.source(registry, false, repository.to_string(), reference, secrets)),
        }
        Ok(out)
    }

    fn source(
        &self,
        host: &str,
        http: bool,
        repository: String,
        reference: &str,
        secrets: &HashMap<String, Credentials>,
    ) -> PullSource {
        let config = self.configs.get(host);
        let auth = secrets
            .get(&host_key(host))
            .cloned()
            .or_else(|| config.and_then(|c| c.auth.as_ref()).and_then(AuthConfig::credentials));
        let tls = config.and_then(|c| c.tls.clone()).unwrap_or_default();
        // Docker Hub's API lives at registry-1.docker.io.
        let host = if host == "docker.io" { "registry-1.docker.io".to_string() } else { host.to_string() };
        PullSource {
            host,
            http,
            insecure_skip_verify: tls.insecure_skip_verify,
            ca_file: tls.ca_file.map(Into::into),
            repository,
            reference: reference.to_string(),
            auth,
        }
    }
}

/// "http://h:p" → (true, "h:p"); "https://h" or "h" → (false, "h").
fn parse_endpoint(e: &str) -> Result<(bool, String), String> {
    let (http, rest) = if let Some(r) = e.strip_prefix("http://") {
        (true, r)
    } else if let Some(r) = e.strip_prefix("https://") {
        (false, r)
    } else if e.contains("://") {
        return Err("the scheme must be http or https".into());
    } else {
        (false, e)
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err("an endpoint is a scheme and a host[:port], with no path".into());
    }
    Ok((http, host.to_string()))
}

/// "library/busybox:1" → ("library/busybox", ":1"); "x@sha256:…" → ("x", "@sha256:…").
fn split_reference(rest: &str) -> (&str, &str) {
    if let Some(i) = rest.find('@') {
        return (&rest[..i], &rest[i..]);
    }
    match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], &rest[i..]),
        _ => (rest, ":latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Registries {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn mirrors_rewrite_and_offline_decide_where_a_pull_goes() {
        let r = config(
            "offline: true\nmirrors:\n  docker.io:\n    endpoint: [\"http://127.0.0.1:5000\"]\n    rewrite: {\"^library/(.*)\": \"mirrored/$1\"}\nconfigs:\n  \"127.0.0.1:5000\":\n    auth: {username: u, password: p}\n",
        );
        let s = r.sources("docker.io/library/busybox:1", &HashMap::new()).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].host.as_str(), s[0].http), ("127.0.0.1:5000", true));
        assert_eq!((s[0].repository.as_str(), s[0].reference.as_str()), ("mirrored/busybox", ":1"));
        assert_eq!(s[0].auth, Some(("u".into(), "p".into())));
        // Offline: a registry without a mirror is never contacted.
        assert!(r.sources("quay.io/x/y@sha256:abc", &HashMap::new()).unwrap().is_empty());
        // Online, it is the registry itself, over HTTPS; Docker Hub at its API host.
        let online = config("{}");
        let s = online.sources("docker.io/library/nginx:1.14.2", &HashMap::new()).unwrap();
        assert_eq!(
            (s[0].host.as_str(), s[0].http, s[0].repository.as_str()),
            ("registry-1.docker.io", false, "library/nginx")
        );
    }

    #[test]
    fn pull_secrets_give_credentials_per_registry() {
        let json = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"127.0.0.1:5000":{"username":"a","password":"b"}}}"#;
        let data = BTreeMap::from([(".dockerconfigjson".to_string(), json.to_vec())]);
        let c = pull_secret_credentials(&data).unwrap();
        assert_eq!(c["docker.io"], ("u".to_string(), "p".to_string()));
        assert_eq!(c["127.0.0.1:5000"], ("a".to_string(), "b".to_string()));
        let s = config("{}").sources("127.0.0.1:5000/private/box:1", &c).unwrap();
        assert_eq!(s[0].auth, Some(("a".into(), "b".into())));
        assert!(pull_secret_credentials(&BTreeMap::new()).unwrap_err().contains(".dockerconfigjson"));
    }

    #[test]
    fn a_bad_endpoint_is_named() {
        assert!(parse_endpoint("ftp://x").unwrap_err().contains("http or https"));
        assert!(parse_endpoint("http://x/path").unwrap_err().contains("no path"));
    }
}
