//! Sealing with AES-256-GCM keys from a key file: Secrets at rest (so neither the Raft log,
//! the snapshots nor sled's files hold a Secret in the clear) and sealed backups. Knows
//! nothing of the store or the cluster: it turns bytes into sealed bytes and back.
//!
//! Keys live in a file on each replica (`<data-dir>/secrets.key`), one per line as
//! `<name>:<base64 of 32 bytes>`; the first line is the key that seals, every line can open.
//! A sealed value reads `k8s:enc:aesgcm:v1:<name>:` then a 12-byte nonce and the
//! ciphertext with its tag, the layout Kubernetes' aesgcm provider uses. Rotation: put a new
//! key first on every replica (`keel secrets-key rotate`), restart them, then re-seal every
//! Secret with `keelctl cluster reencrypt-secrets`; the old key can go after that.

use std::path::Path;

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

use crate::pki::{write_private, PkiError};

pub const PREFIX: &str = "k8s:enc:aesgcm:v1:";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{len} bytes are more than AES-GCM can seal with one nonce")]
    TooLarge { len: usize },
}

pub struct Keyring {
    keys: Vec<(String, LessSafeKey)>,
    text: String,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Keyring").field("keys", &names).finish()
    }
}

fn new_line(name: &str) -> String {
    let mut key = [0u8; 32];
    rand::fill(&mut key[..]);
    format!("{name}:{}\n", base64::engine::general_purpose::STANDARD.encode(key))
}

impl Keyring {
    pub fn parse(text: &str, origin: &str) -> Result<Keyring, PkiError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')) {
            let bad = |why: &str| {
                PkiError::Invalid(format!("{origin}:{}: {why}; expected <name>:<base64 of 32 bytes>", i + 1))
            };
            let (name, b64) = line.trim().split_once(':').ok_or_else(|| bad("no ':'"))?;
            if name.is_empty() || name.contains(':') {
                return Err(bad("empty key name"));
            }
            let raw = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| bad("not base64"))?;
            let key = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| bad("not a 32-byte key"))?;
            keys.push((name.to_string(), LessSafeKey::new(key)));
        }
        if keys.is_empty() {
            return Err(PkiError::Invalid(format!("{origin}: no key")));
        }
        Ok(Keyring { keys, text: text.to_string() })
    }

    /// Reads the key file, creating it with one new key if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Keyring, PkiError> {
        let origin = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Keyring::parse(&text, &origin),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let text = new_line("key1");
                write_private(path, &text)?;
                Keyring::parse(&text, &origin)
            }
            Err(source) => Err(PkiError::Io { path: origin, source }),
        }
    }

    /// Puts a new key first in the file (it seals from the next start on); returns its name.
    pub fn rotate(path: &Path) -> Result<String, PkiError> {
        let current = Keyring::load_or_create(path)?;
        let n = (1..).find(|n| !current.keys.iter().any(|(k, _)| *k == format!("key{n}"))).unwrap_or(1);
        let name = format!("key{n}");
        write_private(path, &format!("{}{}", new_line(&name), current.text))?;
        Ok(name)
    }

    /// The file's content (handed to replicas that join).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn active(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals `plain` with the active key. It fails only for inputs larger than GCM allows
    /// (64 GiB), and then says so rather than handing back something that is not sealed.
    pub fn seal(&self, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let (name, key) = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce[..]);
        let mut data = plain.to_vec();
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut data)
            .map_err(|_| SealError::TooLarge { len: plain.len() })?;
        let mut out = format!("{PREFIX}{name}:").into_bytes();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// Whether a stored value is sealed, and with which key.
    pub fn sealed_with(value: &[u8]) -> Option<&str> {
        let rest = value.strip_prefix(PREFIX.as_bytes())?;
        let end = rest.iter().position(|b| *b == b':')?;
        std::str::from_utf8(&rest[..end]).ok()
    }

    /// Opens a sealed value; a value that is not sealed is returned as it is, uncopied.
    pub fn open<'a>(&self, value: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, String> {
        let Some(name) = Keyring::sealed_with(value) else { return Ok(std::borrow::Cow::Borrowed(value)) };
        let body = &value[PREFIX.len() + name.len() + 1..];
        let key = self
            .keys
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, k)| k)
            .ok_or_else(|| format!("sealed with key {name:?}, which this replica's secrets.key does not have"))?;
        if body.len() < NONCE_LEN {
            return Err("sealed value too short".into());
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce".to_string())?;
        let mut data = sealed.to_vec();
        let plain =
            key.open_in_place(nonce, Aad::empty(), &mut data).map_err(|_| "authentication failed".to_string())?;
        Ok(std::borrow::Cow::Owned(plain.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let ring = Keyring::load_or_create(&path).unwrap();
        let sealed = ring.seal(b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(Keyring::sealed_with(&sealed), Some("key1"));
        assert_eq!(&*ring.open(&sealed).unwrap(), b"hunter2");
        assert_eq!(&*ring.open(b"plain").unwrap(), b"plain");
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(ring.open(&tampered).is_err());

        assert_eq!(Keyring::rotate(&path).unwrap(), "key2");
        let rotated = Keyring::load_or_create(&path).unwrap();
        assert_eq!(rotated.active(), "key2");
        assert_eq!(&*rotated.open(&sealed).unwrap(), b"hunter2", "old keys still open");
        assert!(ring.open(&rotated.seal(b"x").unwrap()).unwrap_err().contains("key2"));
        assert!(Keyring::parse("k:short\n", "f").is_err());
    }
}
