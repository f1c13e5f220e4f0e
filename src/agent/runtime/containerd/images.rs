//! Images on the client side, as containerd 1.6 needs (it has no transfer service):
//!
//! - import: every blob of an OCI image layout or docker-archive tarball goes into the content
//!   store (`Content.Write`), manifests are labelled with the garbage-collection references of
//!   their config and layers, and each named manifest becomes an image record;
//! - unpack: each layer is applied on top of its parent snapshot (`Snapshots.Prepare`,
//!   `Diff.Apply`, `Snapshots.Commit` under the layer's chain ID), and the config is labelled
//!   with the top snapshot so that garbage collection keeps it;
//! - everything is written under a lease, so nothing is collected half way.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use containerd_client::services::v1 as c;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::tonic::{Code, Request};
use containerd_client::types::Descriptor;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{rpc, Containerd, Unpacked};
use crate::agent::runtime::{normalize_image, ImageConfig, ImageInfo, PullSource, RuntimeError};

const MANIFEST_OCI: &str = "application/vnd.oci.image.manifest.v1+json";
const MANIFEST_DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json";
const INDEX_OCI: &str = "application/vnd.oci.image.index.v1+json";
const INDEX_DOCKER: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const CHUNK: usize = 1 << 20;

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn invalid(archive: &Path, why: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Invalid(format!("{}: {why}", archive.display()))
}

/// The chain IDs of layers with these diff IDs (the OCI image spec's definition).
pub(super) fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => sha256(format!("{parent} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Every regular file of a tarball, by path.
fn read_archive(path: &Path) -> Result<HashMap<String, Vec<u8>>, RuntimeError> {
    let io = |source| RuntimeError::Io { what: format!("read {}", path.display()), source };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut archive = tar::Archive::new(f);
    let mut files = HashMap::new();
    let mut links = Vec::new();
    for entry in archive.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        let name = entry.path().map_err(io)?.to_string_lossy().trim_start_matches("./").to_string();
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut data = Vec::with_capacity(entry.size() as usize);
                entry.read_to_end(&mut data).map_err(io)?;
                files.insert(name, data);
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                if let Some(target) = entry.link_name().map_err(io)? {
                    links.push((name, target.to_string_lossy().to_string()));
                }
            }
            _ => {}
        }
    }
    // docker save links repeated layers to the first copy.
    for (name, target) in links {
        let base = Path::new(&name).parent().map(|p| p.join(&target)).unwrap_or_else(|| target.clone().into());
        let resolved = base.to_string_lossy().replace("/../", "/").trim_start_matches("../").to_string();
        let found = files.get(&target).or_else(|| files.get(&resolved)).cloned();
        if let Some(data) = found {
            files.insert(name, data);
        }
    }
    Ok(files)
}

/// One image to create: its name and its manifest.
struct Named {
    name: String,
    manifest: Descriptor,
}

impl Containerd {
    /// Writes a blob into the content store (nothing if it is there already), then sets
    /// `labels` on it.
    pub(super) async fn write_blob(
        &self,
        lease: &str,
        digest: &str,
        data: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let chunks: Vec<Result<bytes::Bytes, String>> =
            data.chunks(CHUNK).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
        self.write_blob_stream(lease, digest, data.len() as i64, futures::stream::iter(chunks), labels).await
    }

    /// Writes a blob of `total` bytes that arrives as `chunks` (a registry's answer, say),
    /// resuming where an earlier write of it stopped; containerd checks the digest.
    pub(super) async fn write_blob_stream(
        &self,
        lease: &str,
        digest: &str,
        total: i64,
        chunks: impl futures::Stream<Item = Result<bytes::Bytes, String>>,
        labels: HashMap<String, String>,
    ) -> Result<(), RuntimeError> {
        use c::WriteAction as A;
        use futures::StreamExt;
        let reference = format!("keel-{digest}");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let first = c::WriteContentRequest {
            action: A::Stat as i32,
            r#ref: reference.clone(),
            total,
            expected: digest.to_string(),
            ..Default::default()
        };
        // containerd answers (and sends its headers) only after the first message: queue it
        // before the call, or the call never returns.
        tx.send(first).await.map_err(|_| RuntimeError::Failed("content write stream closed".into()))?;
        let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("containerd-lease", lease.parse().map_err(|_| RuntimeError::Invalid("lease".into()))?);
        let what = format!("blob {digest}");
        let written = async {
            let mut stream = match c::content_client::ContentClient::new(self.ch()).write(req).await {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
                Err(s) => return Err(rpc(&what)(s)),
            };
            let next = |r: Result<Option<c::WriteContentResponse>, tonic::Status>| match r {
                Ok(Some(m)) => Ok(Some(m)),
                Ok(None) => Err(RuntimeError::Failed(format!("{what}: the content store ended the write"))),
                Err(s) if s.code() == Code::AlreadyExists => Ok(None),
                Err(s) => Err(rpc(&what)(s)),
            };
            let Some(status) = next(stream.message().await)? else { return Ok(()) };
            // What an interrupted write left is kept: skip that much of the input.
            let resume = status.offset.clamp(0, total);
            let (mut offset, mut seen) = (resume, 0i64);
            let mut chunks = std::pin::pin!(chunks);
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|e| RuntimeError::Failed(format!("{what}: {e}")))?;
                let start = (resume - seen).clamp(0, chunk.len() as i64) as usize;
                seen += chunk.len() as i64;
                if start == chunk.len() {
                    continue;
                }
                let data = chunk.slice(start..).to_vec();
                let len = data.len() as i64;
                let w = c::WriteContentRequest { action: A::Write as i32, offset, data, ..Default::default() };
                tx.send(w).await.map_err(|_| RuntimeError::Failed(format!("{what}: write stream closed")))?;
                if next(stream.message().await)?.is_none() {
                    return Ok(());
                }
                offset += len;
            }
            if offset != total {
                return Err(RuntimeError::Failed(format!("{what}: {offset} of {total} bytes arrived")));
            }
            let commit = c::WriteContentRequest {
                action: A::Commit as i32,
                total,
                offset,
                expected: digest.to_string(),
                labels: labels.clone(),
                ..Default::default()
            };
            tx.send(commit).await.map_err(|_| RuntimeError::Failed(format!("{what}: write stream closed")))?;
            next(stream.message().await)?;
            drop(tx);
            while let Ok(Some(_)) = stream.message().await {}
            Ok(())
        }
        .await;
        written?;
        self.label_blob(digest, labels).await
    }

    /// Whether the content store has blob `digest`.
    async fn has_blob(&self, digest: &str) -> Result<bool, RuntimeError> {
        let req = c::InfoRequest { digest: digest.to_string() };
        match c::content_client::ContentClient::new(self.ch()).info(req).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(rpc(format!("blob {digest}"))(s)),
        }
    }

    /// Sets labels on a blob (only those keys).
    async fn label_blob(&self, digest: &str, labels: HashMap<String, String>) -> Result<(), RuntimeError> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let info = c::Info { digest: digest.to_string(), labels, ..Default::default() };
        let req = c::UpdateRequest { info: Some(info), update_mask: Some(prost_types::FieldMask { paths }) };
        c::content_client::ContentClient::new(self.ch()).update(req).await.map_err(rpc(format!("blob {digest}")))?;
        Ok(())
    }

    pub(super) async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, RuntimeError> {
        let req = c::ReadContentRequest { digest: digest.to_string(), offset: 0, size: 0 };
        let mut stream = c::content_client::ContentClient::new(self.ch())
            .read(req)
            .await
            .map_err(rpc(format!("blob {digest}")))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(rpc(format!("blob {digest}")))? {
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }

    /// Imports an OCI image layout or docker-archive tarball.
    pub(super) async fn import_archive(&self, archive: &Path) -> Result<Vec<ImageInfo>, RuntimeError> {
        let path = archive.to_path_buf();
        let files = tokio::task::spawn_blocking(move || read_archive(&path))
            .await
            .map_err(|e| RuntimeError::Failed(format!("read {}: {e}", archive.display())))??;
        let lease = self.lease().await?;
        let result = self.import_files(archive, &files, &lease).await;
        self.drop_lease(&lease).await;
        let named = result?;
        let mut out = Vec::new();
        for n in named {
            let u =
                self.resolve(&n.name).await?.ok_or_else(|| invalid(archive, format!("{} did not import", n.name)))?;
            out.push(u.info);
        }
        Ok(out)
    }

    async fn import_files(
        &self,
        archive: &Path,
        files: &HashMap<String, Vec<u8>>,
        lease: &str,
    ) -> Result<Vec<Named>, RuntimeError> {
        let named = if files.contains_key("index.json") {
            self.import_oci(archive, files, lease).await?
        } else if let Some(m) = files.get("manifest.json") {
            self.import_docker(archive, files, m, lease).await?
        } else {
            return Err(invalid(
                archive,
                "neither an OCI image layout (index.json) nor a docker archive (manifest.json)",
            ));
        };
        if named.is_empty() {
            return Err(invalid(archive, "it names no image (no io.containerd.image.name or RepoTags)"));
        }
        for n in &named {
            let manifest = self.read_blob(&n.manifest.digest).await?;
            self.unpack(archive, &manifest, lease).await?;
            self.record_image(&n.name, n.manifest.clone()).await?;
        }
        Ok(named)
    }

    /// Creates (or points again) the image record `name` at `manifest`.
    async fn record_image(&self, name: &str, manifest: Descriptor) -> Result<(), RuntimeError> {
        let images = c::images_client::ImagesClient::new(self.ch());
        let image = c::Image { name: name.to_string(), target: Some(manifest), ..Default::default() };
        let create = c::CreateImageRequest { image: Some(image.clone()), source_date_epoch: None };
        match images.clone().create(create).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
                let mask = prost_types::FieldMask { paths: vec!["target".into()] };
                let update =
                    c::UpdateImageRequest { image: Some(image), update_mask: Some(mask), source_date_epoch: None };
                images.clone().update(update).await.map_err(rpc(format!("image {name}")))?;
            }
            Err(s) => return Err(rpc(format!("image {name}"))(s)),
        }
        self.images.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        Ok(())
    }

    /// Pulls image `name` from the first source that has it: the manifest (the platform's,
    /// from an index), then each blob the content store lacks, streamed into it, then the
    /// layers unpacked, all under one lease.
    pub(super) async fn pull_image(&self, name: &str, sources: &[PullSource]) -> Result<ImageInfo, RuntimeError> {
        let mut errors = Vec::new();
        for s in sources {
            match self.pull_from(name, s).await {
                Ok(()) => {
                    return self
                        .resolve(name)
                        .await?
                        .map(|u| u.info)
                        .ok_or_else(|| RuntimeError::Failed(format!("{name} did not record")));
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            return Err(RuntimeError::Failed(format!("{name}: nowhere to pull it from")));
        }
        Err(RuntimeError::Failed(errors.join("; ")))
    }

    async fn pull_from(&self, name: &str, s: &PullSource) -> Result<(), String> {
        use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
        use oci_client::secrets::RegistryAuth;
        use oci_client::Reference;
        // reqwest's rustls needs a process-wide provider; ring is the one in the build.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut extra_root_certificates = Vec::new();
        if let Some(ca) = &s.ca_file {
            let data = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            extra_root_certificates.push(Certificate { encoding: CertificateEncoding::Pem, data });
        }
        let config = ClientConfig {
            protocol: if s.http { ClientProtocol::Http } else { ClientProtocol::Https },
            accept_invalid_certificates: s.insecure_skip_verify,
            extra_root_certificates,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        };
        let client = oci_client::Client::new(config);
        let at = |r: &str| match r.strip_prefix('@') {
            Some(d) => Reference::with_digest(s.host.clone(), s.repository.clone(), d.to_string()),
            None => Reference::with_tag(s.host.clone(), s.repository.clone(), r.trim_start_matches(':').to_string()),
        };
        let reference = at(&s.reference);
        let where_ = format!("{}/{}{}", s.host, s.repository, s.reference);
        let auth = match &s.auth {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        let accepted = [MANIFEST_OCI, MANIFEST_DOCKER, INDEX_OCI, INDEX_DOCKER];
        let (mut bytes, _) =
            client.pull_manifest_raw(&reference, &auth, &accepted).await.map_err(|e| format!("{where_}: {e}"))?;
        let mut reference = reference;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{where_}: manifest: {e}"))?;
        let media = v["mediaType"].as_str().unwrap_or(MANIFEST_OCI).to_string();
        let media = if media == INDEX_OCI || media == INDEX_DOCKER || v["manifests"].is_array() {
            let arch = std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64");
            let chosen = v["manifests"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| {
                    m["platform"]["os"].as_str().unwrap_or("linux") == "linux"
                        && m["platform"]["architecture"].as_str() == Some(arch.as_str())
                })
                .ok_or_else(|| format!("{where_}: no manifest for linux/{arch}"))?;
            let d = chosen["digest"].as_str().unwrap_or_default().to_string();
            reference = at(&format!("@{d}"));
            bytes = client
                .pull_manifest_raw(&reference, &auth, &accepted)
                .await
                .map_err(|e| format!("{where_}@{d}: {e}"))?
                .0;
            chosen["mediaType"].as_str().unwrap_or(MANIFEST_OCI).to_string()
        } else {
            media
        };
        let digest = sha256(&bytes);
        if let Some(d) = s.reference.strip_prefix('@') {
            if reference.digest() == Some(d) && d != digest {
                return Err(format!("{where_}: the manifest does not match its digest"));
            }
        }
        let m: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{where_}: manifest: {e}"))?;
        let lease = self.lease().await.map_err(|e| e.to_string())?;
        let result = async {
            let blobs = std::iter::once(&m["config"]).chain(m["layers"].as_array().into_iter().flatten());
            for b in blobs {
                let d = b["digest"].as_str().unwrap_or_default();
                let size = b["size"].as_i64().unwrap_or_default();
                if self.has_blob(d).await.map_err(|e| e.to_string())? {
                    continue;
                }
                let got =
                    client.pull_blob_stream(&reference, d).await.map_err(|e| format!("{where_}: blob {d}: {e}"))?;
                let chunks = futures::StreamExt::map(got.stream, |r| r.map_err(|e| e.to_string()));
                self.write_blob_stream(&lease, d, size, chunks, HashMap::new())
                    .await
                    .map_err(|e| format!("{where_}: {e}"))?;
            }
            self.write_manifest(&bytes, &digest, &lease).await.map_err(|e| e.to_string())?;
            self.unpack(Path::new(&where_), &bytes, &lease).await.map_err(|e| e.to_string())?;
            let desc = Descriptor {
                media_type: media,
                digest: digest.clone(),
                size: bytes.len() as i64,
                ..Default::default()
            };
            self.record_image(name, desc).await.map_err(|e| e.to_string())
        }
        .await;
        self.drop_lease(&lease).await;
        result
    }

    /// Writes the blobs of a manifest's config and layers, then the manifest with the labels
    /// that keep them.
    async fn write_manifest(&self, manifest: &[u8], digest: &str, lease: &str) -> Result<(), RuntimeError> {
        let m: Value =
            serde_json::from_slice(manifest).map_err(|e| RuntimeError::Invalid(format!("manifest {digest}: {e}")))?;
        let mut labels = HashMap::new();
        if let Some(cfg) = m["config"]["digest"].as_str() {
            labels.insert("containerd.io/gc.ref.content.config".to_string(), cfg.to_string());
        }
        for (i, l) in m["layers"].as_array().into_iter().flatten().enumerate() {
            if let Some(d) = l["digest"].as_str() {
                labels.insert(format!("containerd.io/gc.ref.content.l.{i}"), d.to_string());
            }
        }
        self.write_blob(lease, digest, manifest, labels).await
    }

    async fn import_oci(
        &self,
        archive: &Path,
        files: &HashMap<String, Vec<u8>>,
        lease: &str,
    ) -> Result<Vec<Named>, RuntimeError> {
        let blob = |d: &str| files.get(&format!("blobs/{}", d.replacen(':', "/", 1)));
        // Every blob but manifests first (manifests reference them).
        let index: Value =
            serde_json::from_slice(&files["index.json"]).map_err(|e| invalid(archive, format!("index.json: {e}")))?;
        let mut manifests = Vec::new();
        let mut queue: Vec<Value> = index["manifests"].as_array().cloned().unwrap_or_default();
        while let Some(d) = queue.pop() {
            let media = d["mediaType"].as_str().unwrap_or_default();
            let digest = d["digest"].as_str().unwrap_or_default().to_string();
            if media == INDEX_OCI || media == INDEX_DOCKER {
                let nested = blob(&digest).ok_or_else(|| invalid(archive, format!("index {digest} is missing")))?;
                let v: Value =
                    serde_json::from_slice(nested).map_err(|e| invalid(archive, format!("{digest}: {e}")))?;
                for mut m in v["manifests"].as_array().cloned().unwrap_or_default() {
                    let arch = m["platform"]["architecture"].as_str().unwrap_or("amd64");
                    if arch != std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64") {
                        continue;
                    }
                    // The outer entry's name goes with the platform's manifest.
                    m["annotations"] = d["annotations"].clone();
                    queue.push(m);
                }
                continue;
            }
            manifests.push(d);
        }
        let mut named = Vec::new();
        for d in manifests {
            let digest = d["digest"].as_str().unwrap_or_default().to_string();
            let data = blob(&digest).ok_or_else(|| invalid(archive, format!("manifest {digest} is missing")))?;
            if sha256(data) != digest {
                return Err(invalid(archive, format!("manifest {digest} does not match its digest")));
            }
            let m: Value = serde_json::from_slice(data).map_err(|e| invalid(archive, format!("{digest}: {e}")))?;
            let refs = std::iter::once(&m["config"]).chain(m["layers"].as_array().into_iter().flatten());
            for r in refs {
                let rd = r["digest"].as_str().unwrap_or_default();
                let bytes = blob(rd).ok_or_else(|| invalid(archive, format!("blob {rd} is missing")))?;
                if sha256(bytes) != rd {
                    return Err(invalid(archive, format!("blob {rd} does not match its digest")));
                }
                self.write_blob(lease, rd, bytes, HashMap::new()).await?;
            }
            self.write_manifest(data, &digest, lease).await?;
            let annotations = &d["annotations"];
            let name = annotations["io.containerd.image.name"].as_str().or_else(|| {
                annotations["org.opencontainers.image.ref.name"].as_str().filter(|n| n.contains(['/', ':']))
            });
            if let Some(name) = name {
                let media = d["mediaType"].as_str().unwrap_or(MANIFEST_OCI).to_string();
                let manifest = Descriptor { media_type: media, digest, size: data.len() as i64, ..Default::default() };
                named.push(Named { name: normalize_image(name), manifest });
            }
        }
        Ok(named)
    }

    async fn import_docker(
        &self,
        archive: &Path,
        files: &HashMap<String, Vec<u8>>,
        manifest_json: &[u8],
        lease: &str,
    ) -> Result<Vec<Named>, RuntimeError> {
        let entries: Value =
            serde_json::from_slice(manifest_json).map_err(|e| invalid(archive, format!("manifest.json: {e}")))?;
        let mut named = Vec::new();
        for e in entries.as_array().cloned().unwrap_or_default() {
            let file = |p: &str| files.get(p).ok_or_else(|| invalid(archive, format!("{p} is missing")));
            let config_path = e["Config"].as_str().unwrap_or_default();
            let config = file(config_path)?;
            let config_digest = sha256(config);
            self.write_blob(lease, &config_digest, config, HashMap::new()).await?;
            let mut layers = Vec::new();
            for l in e["Layers"].as_array().cloned().unwrap_or_default() {
                let data = file(l.as_str().unwrap_or_default())?;
                let digest = sha256(data);
                let media = if data.starts_with(&[0x1f, 0x8b]) {
                    "application/vnd.docker.image.rootfs.diff.tar.gzip"
                } else {
                    "application/vnd.docker.image.rootfs.diff.tar"
                };
                self.write_blob(lease, &digest, data, HashMap::new()).await?;
                layers.push(serde_json::json!({"mediaType": media, "digest": digest, "size": data.len()}));
            }
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST_DOCKER,
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest, "size": config.len()},
                "layers": layers,
            });
            let bytes = serde_json::to_vec(&manifest).map_err(|e| RuntimeError::Failed(e.to_string()))?;
            let digest = sha256(&bytes);
            self.write_manifest(&bytes, &digest, lease).await?;
            for tag in e["RepoTags"].as_array().cloned().unwrap_or_default() {
                let Some(tag) = tag.as_str() else { continue };
                let desc = Descriptor {
                    media_type: MANIFEST_DOCKER.into(),
                    digest: digest.clone(),
                    size: bytes.len() as i64,
                    ..Default::default()
                };
                named.push(Named { name: normalize_image(tag), manifest: desc });
            }
        }
        Ok(named)
    }

    /// Applies each layer of `manifest` onto its parent snapshot, unless already done, and
    /// labels the config with the top snapshot. Returns the top chain ID.
    async fn unpack(&self, archive: &Path, manifest: &[u8], lease: &str) -> Result<String, RuntimeError> {
        let m: Value = serde_json::from_slice(manifest).map_err(|e| invalid(archive, format!("manifest: {e}")))?;
        let config_digest = m["config"]["digest"].as_str().unwrap_or_default().to_string();
        let config: Value = serde_json::from_slice(&self.read_blob(&config_digest).await?)
            .map_err(|e| invalid(archive, format!("config {config_digest}: {e}")))?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_str().map(String::from))
            .collect();
        let layers = m["layers"].as_array().cloned().unwrap_or_default();
        if layers.len() != diff_ids.len() {
            return Err(invalid(archive, format!("{} layers but {} diff IDs", layers.len(), diff_ids.len())));
        }
        let chains = chain_ids(&diff_ids);
        let snapshots = self.snapshots_api();
        for (i, layer) in layers.iter().enumerate() {
            let chain = &chains[i];
            let stat = StatSnapshotRequest { snapshotter: self.snapshotter.clone(), key: chain.clone() };
            if snapshots.clone().stat(stat).await.is_ok() {
                continue;
            }
            let key = format!("extract-{} {chain}", uuid::Uuid::new_v4().simple());
            let parent = if i == 0 { String::new() } else { chains[i - 1].clone() };
            let prep = PrepareSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.clone(),
                parent,
                labels: HashMap::new(),
            };
            let mounts =
                snapshots.clone().prepare(with_lease(prep, lease)?).await.map_err(rpc(format!("layer {chain}")))?;
            let diff = Descriptor {
                media_type: layer["mediaType"].as_str().unwrap_or_default().to_string(),
                digest: layer["digest"].as_str().unwrap_or_default().to_string(),
                size: layer["size"].as_i64().unwrap_or_default(),
                ..Default::default()
            };
            let apply = c::ApplyRequest {
                diff: Some(diff),
                mounts: mounts.into_inner().mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            };
            let applied = c::diff_client::DiffClient::new(self.ch()).apply(with_lease(apply, lease)?).await;
            let remove = || RemoveSnapshotRequest { snapshotter: self.snapshotter.clone(), key: key.clone() };
            let applied = match applied {
                Ok(a) => a.into_inner().applied.map(|d| d.digest).unwrap_or_default(),
                Err(s) => {
                    let _ = snapshots.clone().remove(remove()).await;
                    return Err(rpc(format!("layer {i} of {}", archive.display()))(s));
                }
            };
            if applied != diff_ids[i] {
                let _ = snapshots.clone().remove(remove()).await;
                return Err(invalid(
                    archive,
                    format!("layer {i} unpacks to {applied}, but the config says {}", diff_ids[i]),
                ));
            }
            let commit = CommitSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                name: chain.clone(),
                key: key.clone(),
                labels: HashMap::new(),
            };
            match snapshots.clone().commit(with_lease(commit, lease)?).await {
                Ok(_) => {}
                Err(s) if s.code() == Code::AlreadyExists => {
                    let _ = snapshots.clone().remove(remove()).await;
                }
                Err(s) => return Err(rpc(format!("layer {chain}"))(s)),
            }
        }
        let top = chains.last().cloned().unwrap_or_default();
        // Always, also when every snapshot existed: the snapshots live as long as this label.
        let label = format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter);
        self.label_blob(&config_digest, [(label, top.clone())].into()).await?;
        Ok(top)
    }

    /// The image `name` (normalized), with its config and top snapshot, if present.
    pub(super) async fn resolve(&self, name: &str) -> Result<Option<Unpacked>, RuntimeError> {
        let name = normalize_image(name);
        if let Some(u) = self.images.lock().unwrap_or_else(|p| p.into_inner()).get(&name) {
            return Ok(Some(u.clone()));
        }
        let image =
            match c::images_client::ImagesClient::new(self.ch()).get(c::GetImageRequest { name: name.clone() }).await {
                Ok(r) => r.into_inner().image,
                Err(s) if s.code() == Code::NotFound => return Ok(None),
                Err(s) => return Err(rpc(format!("image {name}"))(s)),
            };
        let Some(target) = image.and_then(|i| i.target) else { return Ok(None) };
        let manifest: Value = serde_json::from_slice(&self.read_blob(&target.digest).await?)
            .map_err(|e| RuntimeError::Invalid(format!("image {name}: manifest: {e}")))?;
        let config_digest = manifest["config"]["digest"].as_str().unwrap_or_default();
        let config: Value = serde_json::from_slice(&self.read_blob(config_digest).await?)
            .map_err(|e| RuntimeError::Invalid(format!("image {name}: config: {e}")))?;
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(String::from)).collect()
        };
        let cfg = &config["config"];
        let diff_ids = strings(&config["rootfs"]["diff_ids"]);
        let size = manifest["layers"].as_array().into_iter().flatten().filter_map(|l| l["size"].as_u64()).sum();
        let info = ImageInfo {
            name: name.clone(),
            id: target.digest.clone(),
            size,
            config: ImageConfig {
                entrypoint: strings(&cfg["Entrypoint"]),
                cmd: strings(&cfg["Cmd"]),
                env: strings(&cfg["Env"]),
                working_dir: cfg["WorkingDir"].as_str().unwrap_or_default().to_string(),
                user: cfg["User"].as_str().unwrap_or_default().to_string(),
            },
        };
        let top = chain_ids(&diff_ids).pop().unwrap_or_default();
        let u = Unpacked { info, top };
        self.images.lock().unwrap_or_else(|p| p.into_inner()).insert(name, u.clone());
        Ok(Some(u))
    }
}

/// `req` as part of lease `lease`: what it creates is not collected while the lease lives.
fn with_lease<T>(req: T, lease: &str) -> Result<Request<T>, RuntimeError> {
    let mut r = Request::new(req);
    let v = lease.parse().map_err(|_| RuntimeError::Invalid(format!("lease name {lease:?}")))?;
    r.metadata_mut().insert("containerd-lease", v);
    Ok(r)
}

#[cfg(test)]
mod tests {
    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let ids = super::chain_ids(&[d('a'), d('b')]);
        assert_eq!(ids[0], d('a'));
        assert_eq!(ids[1], super::sha256(format!("{} {}", d('a'), d('b')).as_bytes()));
        assert!(super::chain_ids(&[]).is_empty());
    }
}
