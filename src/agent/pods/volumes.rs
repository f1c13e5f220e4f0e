//! A pod's volumes on the node, under `<pod dir>/volumes/<plugin>/<name>`:
//!
//! - `emptyDir`: a directory (mode 0777), or with `medium: Memory` a tmpfs of `sizeLimit`;
//! - `hostPath`: the host's path, checked or created as its `type` says;
//! - `configMap`, `secret`, `downwardAPI`, `projected`: files written as the kubelet's atomic
//!   writer does: a hidden `..<timestamp>` directory with the payload, a `..data` symlink to it
//!   swapped by rename, and one symlink per visible entry through `..data`, so a reader never
//!   sees half an update. They are written again when their sources change. Secrets (and
//!   projected volumes) live on a tmpfs, so that secret values never reach the node's disk.
//!
//! `mounts_for` turns a container's `volumeMounts` (with `subPath` and `subPathExpr`) into
//! host paths to bind.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::api::kinds::Kind;
use crate::api::quantity::Quantity;
use crate::proto::v1 as pb;

use super::refs::{self, Allocatable, Refs};

/// A volume that cannot be set up: the kubelet's FailedMount message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MountVolume.SetUp failed for volume {volume:?} : {message}")]
pub struct VolumeError {
    pub volume: String,
    pub message: String,
}

/// One file of a projected payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileData {
    pub data: Vec<u8>,
    pub mode: u32,
}

/// Where each volume of the pod is on the host.
pub type VolumePaths = HashMap<String, PathBuf>;

fn err(volume: &str, message: impl Into<String>) -> VolumeError {
    VolumeError { volume: volume.to_string(), message: message.into() }
}

/// Whether `path` is a mount point.
fn is_mounted(path: &Path) -> bool {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(p.as_str()))
}

fn mount_tmpfs(path: &Path, size: Option<u64>, mode: u32) -> Result<(), String> {
    if is_mounted(path) {
        return Ok(());
    }
    let mut data = format!("mode={mode:o}");
    if let Some(s) = size {
        data.push_str(&format!(",size={s}"));
    }
    nix::mount::mount(
        Some("tmpfs"),
        path,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(|e| format!("mount tmpfs on {}: {e}", path.display()))
}

/// Sets up every volume of `pod` under `dir` (the pod's directory) and writes the current
/// content of the projected ones.
pub async fn set_up(pod: &pb::Pod, dir: &Path, refs: &Refs, node: Allocatable) -> Result<VolumePaths, VolumeError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let ns = pod.metadata.as_ref().map(|m| m.namespace.clone()).unwrap_or_default();
    let mut out = VolumePaths::new();
    for v in &spec.volumes {
        let name = v.name.as_str();
        let base = |plugin: &str| dir.join("volumes").join(plugin).join(name);
        let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(|e| err(name, format!("mkdir {}: {e}", p.display())));
        let path = if let Some(e) = &v.empty_dir {
            let p = base("empty-dir");
            mkdir(&p)?;
            if e.medium == "Memory" {
                let size = match e.size_limit.as_deref().filter(|s| !s.is_empty()) {
                    Some(s) => Some(
                        Quantity::parse(s).map_err(|e| err(name, format!("sizeLimit {s:?}: {e}")))?.milli as u64 / 1000,
                    ),
                    None => None,
                };
                mount_tmpfs(&p, size, 0o777).map_err(|m| err(name, m))?;
            } else if !e.medium.is_empty() {
                return Err(err(name, format!("emptyDir medium {:?}: must be \"\" or \"Memory\"", e.medium)));
            }
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| err(name, format!("chmod {}: {e}", p.display())))?;
            p
        } else if let Some(h) = &v.host_path {
            host_path(name, h)?
        } else if let Some(cm) = &v.config_map {
            let data = refs
                .source(Kind::ConfigMap, &ns, &cm.name, cm.optional.unwrap_or(false))
                .await
                .map_err(|e| err(name, e.0))?
                .unwrap_or_default();
            let files = project(name, Kind::ConfigMap, &cm.name, &data, &cm.items, cm.default_mode, cm.optional)?;
            let p = base("configmap");
            mkdir(&p)?;
            write_atomic(&p, &files).map_err(|m| err(name, m))?;
            p
        } else if let Some(s) = &v.secret {
            let data = refs
                .source(Kind::Secret, &ns, &s.secret_name, s.optional.unwrap_or(false))
                .await
                .map_err(|e| err(name, e.0))?
                .unwrap_or_default();
            let files = project(name, Kind::Secret, &s.secret_name, &data, &s.items, s.default_mode, s.optional)?;
            let p = base("secret");
            mkdir(&p)?;
            mount_tmpfs(&p, None, 0o755).map_err(|m| err(name, m))?;
            write_atomic(&p, &files).map_err(|m| err(name, m))?;
            p
        } else if let Some(d) = &v.downward_api {
            let files = downward(name, pod, &d.items, d.default_mode, node)?;
            let p = base("downward-api");
            mkdir(&p)?;
            write_atomic(&p, &files).map_err(|m| err(name, m))?;
            p
        } else if let Some(pr) = &v.projected {
            let mut files = BTreeMap::new();
            for src in &pr.sources {
                if let Some(cm) = &src.config_map {
                    let data = refs
                        .source(Kind::ConfigMap, &ns, &cm.name, cm.optional.unwrap_or(false))
                        .await
                        .map_err(|e| err(name, e.0))?
                        .unwrap_or_default();
                    files.extend(project(
                        name,
                        Kind::ConfigMap,
                        &cm.name,
                        &data,
                        &cm.items,
                        pr.default_mode,
                        cm.optional,
                    )?);
                } else if let Some(s) = &src.secret {
                    let data = refs
                        .source(Kind::Secret, &ns, &s.name, s.optional.unwrap_or(false))
                        .await
                        .map_err(|e| err(name, e.0))?
                        .unwrap_or_default();
                    files.extend(project(name, Kind::Secret, &s.name, &data, &s.items, pr.default_mode, s.optional)?);
                } else if let Some(d) = &src.downward_api {
                    files.extend(downward(name, pod, &d.items, pr.default_mode, node)?);
                } else if src.service_account_token.is_some() {
                    return Err(err(
                        name,
                        "serviceAccountToken projection: this cluster issues no service account tokens",
                    ));
                } else {
                    return Err(err(name, "a projected source of a kind this node cannot project"));
                }
            }
            let p = base("projected");
            mkdir(&p)?;
            mount_tmpfs(&p, None, 0o755).map_err(|m| err(name, m))?;
            write_atomic(&p, &files).map_err(|m| err(name, m))?;
            p
        } else {
            return Err(err(
                name,
                "a volume type this node does not mount (it mounts emptyDir, hostPath, configMap, secret, downwardAPI and projected)",
            ));
        };
        out.insert(v.name.clone(), path);
    }
    Ok(out)
}

/// Unmounts the pod's tmpfs volumes (the directory itself is removed with the pod's).
pub fn tear_down(dir: &Path) -> Result<(), String> {
    let root = dir.join("volumes");
    let prefix = format!("{}/", root.display());
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH).map_err(|e| format!("umount {m}: {e}"))?;
    }
    Ok(())
}

fn host_path(name: &str, h: &pb::HostPathVolumeSource) -> Result<PathBuf, VolumeError> {
    use std::os::unix::fs::FileTypeExt;
    let p = PathBuf::from(&h.path);
    if !p.is_absolute() {
        return Err(err(name, format!("hostPath {:?} must be absolute", h.path)));
    }
    let meta = std::fs::metadata(&p).ok();
    let ty = h.r#type.as_deref().unwrap_or_default();
    let wrong = |what: &str| err(name, format!("hostPath type check failed: {} is not a {what}", h.path));
    match ty {
        "" => {}
        "DirectoryOrCreate" => {
            if meta.is_none() {
                std::fs::create_dir_all(&p).map_err(|e| err(name, format!("mkdir {}: {e}", h.path)))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).ok();
            } else if !meta.as_ref().is_some_and(|m| m.is_dir()) {
                return Err(wrong("directory"));
            }
        }
        "Directory" => {
            if !meta.as_ref().is_some_and(|m| m.is_dir()) {
                return Err(wrong("directory"));
            }
        }
        "FileOrCreate" => {
            if meta.is_none() {
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| err(name, format!("mkdir {}: {e}", parent.display())))?;
                }
                std::fs::File::create(&p).map_err(|e| err(name, format!("create {}: {e}", h.path)))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).ok();
            } else if !meta.as_ref().is_some_and(|m| m.is_file()) {
                return Err(wrong("file"));
            }
        }
        "File" => {
            if !meta.as_ref().is_some_and(|m| m.is_file()) {
                return Err(wrong("file"));
            }
        }
        "Socket" => {
            if !meta.as_ref().is_some_and(|m| m.file_type().is_socket()) {
                return Err(wrong("socket"));
            }
        }
        "CharDevice" => {
            if !meta.as_ref().is_some_and(|m| m.file_type().is_char_device()) {
                return Err(wrong("character device"));
            }
        }
        "BlockDevice" => {
            if !meta.as_ref().is_some_and(|m| m.file_type().is_block_device()) {
                return Err(wrong("block device"));
            }
        }
        other => return Err(err(name, format!("hostPath type {other:?} is not a valid type"))),
    }
    Ok(p)
}

/// A relative path inside a volume: no absolute path, no `..` element.
fn check_relative(volume: &str, path: &str) -> Result<(), VolumeError> {
    let p = Path::new(path);
    if path.is_empty() || p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(err(volume, format!("invalid path {path:?}: must be relative and may not contain '..'")));
    }
    if path.starts_with("..") {
        return Err(err(volume, format!("invalid path {path:?}: may not start with '..'")));
    }
    Ok(())
}

/// The files of a ConfigMap or Secret volume: every key, or the listed items.
fn project(
    volume: &str,
    kind: Kind,
    source: &str,
    data: &BTreeMap<String, Vec<u8>>,
    items: &[pb::KeyToPath],
    default_mode: Option<i32>,
    optional: Option<bool>,
) -> Result<BTreeMap<String, FileData>, VolumeError> {
    let mode = default_mode.unwrap_or(0o644) as u32 & 0o777;
    let mut out = BTreeMap::new();
    if items.is_empty() {
        for (k, v) in data {
            check_relative(volume, k)?;
            out.insert(k.clone(), FileData { data: v.clone(), mode });
        }
        return Ok(out);
    }
    for item in items {
        check_relative(volume, &item.path)?;
        match data.get(&item.key) {
            Some(v) => {
                out.insert(
                    item.path.clone(),
                    FileData { data: v.clone(), mode: item.mode.map_or(mode, |m| m as u32 & 0o777) },
                );
            }
            None if optional.unwrap_or(false) => {}
            None => {
                let what = if kind == Kind::Secret { "secret" } else { "configmap" };
                return Err(err(volume, format!("{what} {source:?} has no key {:?}", item.key)));
            }
        }
    }
    Ok(out)
}

fn downward(
    volume: &str,
    pod: &pb::Pod,
    items: &[pb::DownwardApiVolumeFile],
    default_mode: Option<i32>,
    node: Allocatable,
) -> Result<BTreeMap<String, FileData>, VolumeError> {
    let mode = default_mode.unwrap_or(0o644) as u32 & 0o777;
    let spec = pod.spec.clone().unwrap_or_default();
    let mut out = BTreeMap::new();
    for item in items {
        check_relative(volume, &item.path)?;
        let value = if let Some(f) = &item.field_ref {
            refs::field_value(pod, &f.field_path).map_err(|e| err(volume, e.0))?
        } else if let Some(r) = &item.resource_field_ref {
            let c = spec
                .containers
                .iter()
                .find(|c| c.name == r.container_name)
                .ok_or_else(|| err(volume, format!("resourceFieldRef: no container {:?}", r.container_name)))?;
            refs::resource_value(pod, c, r, node).map_err(|e| err(volume, e.0))?
        } else {
            return Err(err(volume, format!("item {:?} names neither fieldRef nor resourceFieldRef", item.path)));
        };
        out.insert(
            item.path.clone(),
            FileData { data: value.into_bytes(), mode: item.mode.map_or(mode, |m| m as u32 & 0o777) },
        );
    }
    Ok(out)
}

const DATA: &str = "..data";

/// What `dir` shows now, through `..data`.
fn current(dir: &Path) -> Option<BTreeMap<String, FileData>> {
    let target = std::fs::read_link(dir.join(DATA)).ok()?;
    let base = dir.join(target);
    let mut out = BTreeMap::new();
    fn walk(root: &Path, at: &Path, out: &mut BTreeMap<String, FileData>) -> Option<()> {
        for e in std::fs::read_dir(at).ok()?.flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).ok()?;
            if meta.is_dir() {
                walk(root, &p, out)?;
            } else {
                let rel = p.strip_prefix(root).ok()?.to_string_lossy().to_string();
                out.insert(rel, FileData { data: std::fs::read(&p).ok()?, mode: meta.permissions().mode() & 0o777 });
            }
        }
        Some(())
    }
    walk(&base, &base, &mut out)?;
    Some(out)
}

/// Writes `files` into `dir` as the kubelet's atomic writer does; nothing when they are what
/// `dir` already shows. True when it wrote.
pub fn write_atomic(dir: &Path, files: &BTreeMap<String, FileData>) -> Result<bool, String> {
    if current(dir).as_ref() == Some(files) {
        return Ok(false);
    }
    let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
    let stamp = format!(
        "..{}.{}",
        humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string().replace([':', '-'], "_"),
        std::process::id()
    );
    let fresh = dir.join(&stamp);
    std::fs::create_dir(&fresh).map_err(|e| io(&fresh, e))?;
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).map_err(|e| io(&fresh, e))?;
    for (rel, f) in files {
        let p = fresh.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::write(&p, &f.data).map_err(|e| io(&p, e))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode)).map_err(|e| io(&p, e))?;
    }
    let old = std::fs::read_link(dir.join(DATA)).ok();
    // The swap: a new link beside the old one, renamed over it.
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&stamp, &tmp).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, dir.join(DATA)).map_err(|e| io(&dir.join(DATA), e))?;
    // The visible entries: one link per top-level name, through ..data.
    let visible: std::collections::BTreeSet<String> =
        files.keys().filter_map(|k| k.split('/').next().map(str::to_string)).collect();
    for name in &visible {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("{DATA}/{name}"), &link).map_err(|e| io(&link, e))?;
        }
    }
    for e in std::fs::read_dir(dir).map_err(|e| io(dir, e))?.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if !n.starts_with("..") && !visible.contains(&n) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if let Some(old) = old.filter(|o| *o != Path::new(&stamp)) {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(true)
}

/// A container's mounts: (host path, container path, read-only), with `subPath` (or
/// `subPathExpr`, expanded from the container's environment) resolved inside the volume.
pub fn mounts_for(
    c: &pb::Container,
    volumes: &VolumePaths,
    env: &[(String, String)],
) -> Result<Vec<(PathBuf, String, bool)>, String> {
    let mut out = Vec::new();
    for m in &c.volume_mounts {
        let base =
            volumes.get(&m.name).ok_or_else(|| format!("volumeMount {:?}: the pod has no such volume", m.name))?;
        let sub =
            if !m.sub_path_expr.is_empty() { super::refs::expand(&m.sub_path_expr, env) } else { m.sub_path.clone() };
        let source = if sub.is_empty() {
            base.clone()
        } else {
            let p = Path::new(&sub);
            if p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err(format!("subPath {sub:?}: must be a relative path without '..'"));
            }
            let full = base.join(p);
            // The kubelet creates a missing subPath as a directory.
            if std::fs::symlink_metadata(&full).is_err() {
                std::fs::create_dir_all(&full).map_err(|e| format!("subPath {}: {e}", full.display()))?;
            }
            // It must stay inside the volume once links are followed.
            let real = std::fs::canonicalize(&full).map_err(|e| format!("subPath {}: {e}", full.display()))?;
            let root = std::fs::canonicalize(base).map_err(|e| format!("volume {}: {e}", base.display()))?;
            if !real.starts_with(&root) {
                return Err(format!("subPath {sub:?} leads outside volume {:?}", m.name));
            }
            real
        };
        out.push((source, m.mount_path.clone(), m.read_only));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, FileData> {
        pairs.iter().map(|(k, v)| (k.to_string(), FileData { data: v.as_bytes().to_vec(), mode: 0o644 })).collect()
    }

    #[test]
    fn the_atomic_writer_swaps_a_link_and_shows_only_the_payload() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        assert!(write_atomic(dir, &files(&[("a", "1"), ("sub/b", "2")])).unwrap());
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(dir.join("sub/b")).unwrap(), "2");
        assert_eq!(std::fs::read_link(dir.join("a")).unwrap(), Path::new("..data/a"));
        let first = std::fs::read_link(dir.join(DATA)).unwrap();
        // The same payload again writes nothing.
        assert!(!write_atomic(dir, &files(&[("a", "1"), ("sub/b", "2")])).unwrap());
        // A change: new content behind a new ..data; a key gone is gone; the old dir removed.
        assert!(write_atomic(dir, &files(&[("a", "one")])).unwrap());
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "one");
        assert!(std::fs::symlink_metadata(dir.join("sub")).is_err());
        assert!(!dir.join(&first).exists());
        let hidden: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with(".."))
            .collect();
        assert_eq!(hidden.len(), 2, "..data and one timestamped directory: {hidden:?}");
    }

    #[test]
    fn items_select_keys_and_paths_may_not_escape() {
        let data: BTreeMap<String, Vec<u8>> = [("k".to_string(), b"v".to_vec())].into();
        let item = |key: &str, path: &str| pb::KeyToPath { key: key.into(), path: path.into(), mode: Some(0o600) };
        let f = project("v", Kind::ConfigMap, "cm", &data, &[item("k", "dir/file")], None, None).unwrap();
        assert_eq!(f["dir/file"], FileData { data: b"v".to_vec(), mode: 0o600 });
        let e = project("v", Kind::ConfigMap, "cm", &data, &[item("missing", "x")], None, None).unwrap_err();
        assert!(e.to_string().contains("configmap \"cm\" has no key \"missing\""), "{e}");
        assert!(project("v", Kind::ConfigMap, "cm", &data, &[item("missing", "x")], None, Some(true))
            .unwrap()
            .is_empty());
        assert!(project("v", Kind::ConfigMap, "cm", &data, &[item("k", "../x")], None, None).is_err());
        assert!(project("v", Kind::ConfigMap, "cm", &data, &[item("k", "/etc/x")], None, None).is_err());
    }

    #[test]
    fn sub_paths_stay_inside_their_volume() {
        let d = tempfile::tempdir().unwrap();
        let vol = d.path().join("vol");
        std::fs::create_dir_all(&vol).unwrap();
        symlink("/etc", vol.join("escape")).unwrap();
        let volumes: VolumePaths = [("v".to_string(), vol.clone())].into();
        let c = |sub: &str| pb::Container {
            volume_mounts: vec![pb::VolumeMount {
                name: "v".into(),
                mount_path: "/m".into(),
                sub_path: sub.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let m = mounts_for(&c("data/x"), &volumes, &[]).unwrap();
        assert_eq!(m[0].0, std::fs::canonicalize(vol.join("data/x")).unwrap());
        assert!(vol.join("data/x").is_dir(), "a missing subPath is created");
        assert!(mounts_for(&c("../x"), &volumes, &[]).is_err());
        assert!(mounts_for(&c("escape"), &volumes, &[]).unwrap_err().contains("outside"));
        let expr = pb::Container {
            volume_mounts: vec![pb::VolumeMount {
                name: "v".into(),
                mount_path: "/m".into(),
                sub_path_expr: "$(POD)".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let m = mounts_for(&expr, &volumes, &[("POD".into(), "web-1".into())]).unwrap();
        assert!(m[0].0.ends_with("web-1"));
    }
}
