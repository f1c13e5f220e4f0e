//! The client configuration file (keelctl's and any tool's): named contexts, each a list of
//! replica addresses, credentials and a default namespace, and which one is current
//! (kubectl's kubeconfig, reduced to what Keel needs). The server writes one for the admin.
//!
//! The file is `$KEELCONFIG`, else `~/.keel/config`. It is YAML:
//!
//! ```yaml
//! current-context: prod
//! contexts:
//! - name: prod
//!   servers: [10.0.0.1:7001, 10.0.0.2:7001, 10.0.0.3:7001]
//!   namespace: web
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a keelctl configuration: {why}")]
    Parse { path: String, why: String },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io { path: path.display().to_string(), source }
}

macro_rules! bail {
    ($($t:tt)*) => { return Err(ConfigError::Invalid(format!($($t)*))) };
}

pub const DEFAULT_SERVER: &str = "127.0.0.1:7001";

/// Where `keel server` with its default data directory writes the admin's configuration.
pub const ADMIN_CONFIG: &str = "/var/lib/keel/admin.yaml";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub current_context: String,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Context {
    pub name: String,
    #[serde(default)]
    pub servers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// The cluster CA (PEM) that the replicas' certificates must chain to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub certificate_authority_data: String,
    /// This user's certificate (PEM), signed by the cluster CA.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_certificate_data: String,
    /// This user's private key (PEM).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_key_data: String,
    /// A bearer token (`keelctl token create --role user`), used when there is no
    /// certificate.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
}

impl Context {
    /// How this context authenticates: its certificate, else its bearer token.
    pub fn auth(&self) -> Result<crate::client::ClientAuth, ConfigError> {
        if self.client_certificate_data.is_empty() && !self.token.is_empty() {
            if self.certificate_authority_data.is_empty() {
                bail!(
                    "context {:?} has a token but no certificate-authority-data to check the servers with",
                    self.name
                );
            }
            return Ok(crate::client::ClientAuth::Bearer {
                ca_pem: self.certificate_authority_data.clone(),
                token: self.token.clone(),
            });
        }
        self.credentials().map(crate::client::ClientAuth::Certificate)
    }

    /// The TLS credentials of this context.
    pub fn credentials(&self) -> Result<crate::pki::Credentials, ConfigError> {
        if self.certificate_authority_data.is_empty()
            || self.client_certificate_data.is_empty()
            || self.client_key_data.is_empty()
        {
            bail!(
                "context {:?} has no credentials (certificate-authority-data, client-certificate-data, client-key-data); \
                 use the admin configuration that `keel server` wrote (it prints its path, by default {}), \
                 e.g. KEELCONFIG={}",
                self.name,
                ADMIN_CONFIG,
                ADMIN_CONFIG
            );
        }
        Ok(crate::pki::Credentials {
            ca_pem: self.certificate_authority_data.clone(),
            cert_pem: self.client_certificate_data.clone(),
            key_pem: self.client_key_data.clone(),
        })
    }
}

/// Where the configuration lives: `$KEELCONFIG`, else `~/.keel/config`.
pub fn path() -> PathBuf {
    if let Some(p) = std::env::var_os("KEELCONFIG").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".keel").join("config")
}

/// The configuration to read: [`path`], or, when that does not exist and `$KEELCONFIG` is
/// unset, the admin configuration of a local `keel server` (as k3s does with k3s.yaml).
pub fn read_path() -> PathBuf {
    let p = path();
    if !p.exists() && std::env::var_os("KEELCONFIG").is_none_or(|v| v.is_empty()) && Path::new(ADMIN_CONFIG).exists() {
        return PathBuf::from(ADMIN_CONFIG);
    }
    p
}

impl Config {
    /// Reads the file; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(io(path)(e)),
        };
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_saphyr::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.display().to_string(), why: e.to_string() })
    }

    /// Writes the file whole (through a temporary file, so a crash leaves the old one).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let text = self.to_yaml()?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    }

    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_saphyr::to_string(self).map_err(|e| ConfigError::Invalid(format!("encode configuration: {e}")))
    }

    pub fn context(&self, name: &str) -> Option<&Context> {
        self.contexts.iter().find(|c| c.name == name)
    }

    /// The context in force: the one named, else the current one, else none.
    pub fn selected(&self, name: Option<&str>) -> Result<Option<&Context>, ConfigError> {
        match name {
            Some(n) => match self.context(n) {
                Some(c) => Ok(Some(c)),
                None => bail!("context {n:?} not found; `keelctl config get-contexts` lists them"),
            },
            None if self.current_context.is_empty() => Ok(None),
            None => match self.context(&self.current_context) {
                Some(c) => Ok(Some(c)),
                None => bail!(
                    "current-context {:?} is not defined in the configuration; `keelctl config use-context` picks another",
                    self.current_context
                ),
            },
        }
    }

    /// Creates or changes a context; only the fields given change.
    pub fn set_context(&mut self, name: &str, servers: Option<Vec<String>>, namespace: Option<String>) {
        let idx = match self.contexts.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                self.contexts.push(Context { name: name.to_string(), ..Default::default() });
                self.contexts.len() - 1
            }
        };
        let c = &mut self.contexts[idx];
        if let Some(s) = servers {
            c.servers = s;
        }
        if let Some(n) = namespace {
            c.namespace = n;
        }
    }

    pub fn use_context(&mut self, name: &str) -> Result<(), ConfigError> {
        if self.context(name).is_none() {
            bail!("no context exists with the name: {name:?}");
        }
        self.current_context = name.to_string();
        Ok(())
    }

    pub fn delete_context(&mut self, name: &str) -> Result<(), ConfigError> {
        let before = self.contexts.len();
        self.contexts.retain(|c| c.name != name);
        if self.contexts.len() == before {
            bail!("cannot delete context {name:?}, not in the configuration");
        }
        if self.current_context == name {
            self.current_context.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_round_trip_and_select() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/config");
        let mut c = Config::load(&p).unwrap();
        assert_eq!(c, Config::default());
        assert!(c.selected(None).unwrap().is_none());
        c.set_context("a", Some(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()]), Some("web".into()));
        c.set_context("b", Some(vec!["127.0.0.1:3".into()]), None);
        c.use_context("a").unwrap();
        c.set_context("a", None, Some("db".into()));
        c.save(&p).unwrap();
        let back = Config::load(&p).unwrap();
        assert_eq!(back, c);
        let sel = back.selected(None).unwrap().unwrap();
        assert_eq!((sel.servers.len(), sel.namespace.as_str()), (2, "db"));
        assert_eq!(back.selected(Some("b")).unwrap().unwrap().servers, ["127.0.0.1:3"]);
        assert!(back.selected(Some("zz")).unwrap_err().to_string().contains("not found"));
        assert!(c.use_context("zz").is_err());
        c.delete_context("a").unwrap();
        assert!(c.current_context.is_empty());
        std::fs::write(&p, "current-context: x\nbogus: 1\n").unwrap();
        assert!(Config::load(&p).is_err(), "unknown fields are refused");
    }
}
