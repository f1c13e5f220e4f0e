//! The node's pod network: one pinned network namespace per pod, attached through the CNI
//! plugins (`cni`), and the node routes that keep cluster addresses on the host: an
//! `unreachable` route for the whole cluster CIDR and the service CIDR (the node's own
//! podCIDR is more specific and wins), so that an address nobody has never leaves.

pub mod cni;
pub mod netns;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

pub use cni::{Cni, CniError, PortMapping};

/// Namespaces of Keel's pods are named `keel-<pod uid>`.
pub const SANDBOX_PREFIX: &str = "keel-";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Cni(#[from] CniError),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error("{0}")]
    Route(String),
}

/// The pod network of one node.
#[derive(Debug, Clone)]
pub struct NodeNetwork {
    pub cni: Cni,
    pub cluster_cidr: String,
    pub service_cidr: String,
}

/// The sandbox (namespace) name of a pod.
pub fn sandbox_name(uid: &str) -> String {
    format!("{SANDBOX_PREFIX}{uid}")
}

impl NodeNetwork {
    /// Runs `ip <args>` in the node's network namespace.
    async fn ip(&self, args: &[&str]) -> Result<(), NetworkError> {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(args);
        if let Some(ns) = &self.cni.host_netns {
            let file =
                std::fs::File::open(ns).map_err(|e| NetworkError::Route(format!("open {}: {e}", ns.display())))?;
            // SAFETY: only setns(2), async-signal-safe, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
                });
            }
        }
        let out = cmd.output().await.map_err(|e| NetworkError::Route(format!("ip {}: {e}", args.join(" "))))?;
        if !out.status.success() {
            return Err(NetworkError::Route(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Installs the `unreachable` routes of the cluster and service CIDRs.
    pub async fn install_routes(&self) -> Result<(), NetworkError> {
        for cidr in [&self.cluster_cidr, &self.service_cidr] {
            self.ip(&["route", "replace", "unreachable", cidr]).await?;
        }
        Ok(())
    }

    /// Removes what the node network added to the host: the routes and the bridge.
    pub async fn teardown(&self) -> Result<(), NetworkError> {
        for cidr in [&self.cluster_cidr, &self.service_cidr] {
            let _ = self.ip(&["route", "del", "unreachable", cidr]).await;
        }
        let _ = self.ip(&["link", "del", &self.cni.bridge]).await;
        Ok(())
    }

    /// Creates pod `uid`'s namespace and attaches it; its namespace path and address.
    pub async fn attach(
        &self,
        uid: &str,
        pod_cidr: &str,
        ports: Vec<PortMapping>,
        args: &str,
    ) -> Result<(PathBuf, String), NetworkError> {
        let name = sandbox_name(uid);
        let path = tokio::task::spawn_blocking(move || netns::create(&name))
            .await
            .map_err(|e| NetworkError::Route(format!("create the namespace: {e}")))??;
        if let Some(att) = self.cni.attachment(uid) {
            return Ok((path, att.ip));
        }
        match self.cni.add(uid, &path, pod_cidr, ports, args).await {
            Ok(att) => Ok((path, att.ip)),
            Err(e) => {
                let n = sandbox_name(uid);
                let _ = tokio::task::spawn_blocking(move || netns::delete(&n)).await;
                Err(e.into())
            }
        }
    }

    /// The address of pod `uid`, if it is attached.
    pub fn address(&self, uid: &str) -> Option<String> {
        self.cni.attachment(uid).map(|a| a.ip)
    }

    /// Detaches pod `uid` and removes its namespace. Safe to repeat.
    pub async fn detach(&self, uid: &str) -> Result<(), NetworkError> {
        let name = sandbox_name(uid);
        let path = netns::path_of(&name);
        self.cni.del(uid, Some(&path)).await?;
        tokio::task::spawn_blocking(move || netns::delete(&name))
            .await
            .map_err(|e| NetworkError::Route(format!("delete the namespace: {e}")))??;
        Ok(())
    }

    /// Pods with a namespace or an attachment on this node.
    pub fn sandboxes(&self) -> Vec<String> {
        let mut uids: Vec<String> =
            netns::list(SANDBOX_PREFIX).into_iter().map(|n| n[SANDBOX_PREFIX.len()..].to_string()).collect();
        uids.extend(self.cni.attached());
        uids.sort();
        uids.dedup();
        uids
    }

    pub fn netns_path(uid: &str) -> PathBuf {
        netns::path_of(&sandbox_name(uid))
    }

    pub fn ipam_dir(&self) -> &Path {
        &self.cni.ipam_dir
    }
}
