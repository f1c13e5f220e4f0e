//! Pod networking through the standard CNI plugins, run as the CNI spec says: a plugin is a
//! program, its network configuration goes in on stdin, its result comes out on stdout, and
//! `CNI_*` environment variables say what to do to which namespace.
//!
//! Each pod gets: `lo` up (loopback), an `eth0` on the node's bridge with an address from the
//! node's podCIDR (bridge + host-local), and its hostPorts (portmap). DEL runs the same chain
//! in reverse with the same configuration and port mappings (portmap removes nothing without
//! them), before the namespace goes (bridge cannot clean up a namespace that is gone). What
//! ADD returned is kept on disk, for DEL after an agent restart.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// The network name (host-local keeps its leases under `<ipam dir>/<name>/`).
pub const NETWORK: &str = "keel";
const CNI_VERSION: &str = "1.0.0";
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("CNI plugin {plugin} {command}: {message}")]
    Plugin { plugin: String, command: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI: {0}")]
    Invalid(String),
}

/// A hostPort of a pod, as the portmap plugin takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: i32,
    pub container_port: i32,
    pub protocol: String,
    #[serde(default, rename = "hostIP", skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// What ADD gave a pod, kept for DEL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub pod_cidr: String,
    pub ip: String,
    pub port_mappings: Vec<PortMapping>,
    pub result: Value,
}

/// The node's CNI setup.
#[derive(Debug, Clone)]
pub struct Cni {
    pub bin_dir: PathBuf,
    /// Where ADD results are kept (one file per pod).
    pub state_dir: PathBuf,
    /// host-local's lease directory.
    pub ipam_dir: PathBuf,
    pub bridge: String,
    /// Run the plugins inside this network namespace instead of the agent's own (a test's
    /// node namespace); None in production.
    pub host_netns: Option<PathBuf>,
}

impl Cni {
    /// The conflist of the pod network for a node with `pod_cidr`.
    pub fn conflist(&self, pod_cidr: &str) -> Value {
        json!({
            "cniVersion": CNI_VERSION,
            "name": NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "forceAddress": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": pod_cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": self.ipam_dir.display().to_string(),
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
            ]
        })
    }

    fn state_file(&self, id: &str) -> PathBuf {
        self.state_dir.join(format!("{id}.json"))
    }

    /// The attachment ADD made for `id`, if it is on record.
    pub fn attachment(&self, id: &str) -> Option<Attachment> {
        serde_json::from_slice(&std::fs::read(self.state_file(id)).ok()?).ok()
    }

    /// Ids with an attachment on record.
    pub fn attached(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.state_dir) else { return Vec::new() };
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".json").map(String::from))
            .collect()
    }

    /// Runs one plugin.
    async fn exec(&self, plugin: &str, command: &str, env: &Env<'_>, config: &Value) -> Result<Value, CniError> {
        let fail = |message: String| CniError::Plugin { plugin: plugin.into(), command: command.into(), message };
        let mut cmd = tokio::process::Command::new(self.bin_dir.join(plugin));
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", env.id)
            .env("CNI_NETNS", env.netns.map(|p| p.display().to_string()).unwrap_or_default())
            .env("CNI_IFNAME", env.ifname)
            .env("CNI_ARGS", env.args)
            .env("CNI_PATH", &self.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(ns) = &self.host_netns {
            let file = std::fs::File::open(ns)
                .map_err(|source| CniError::Io { what: format!("open {}", ns.display()), source })?;
            // SAFETY: between fork and exec the child only calls setns(2), which is
            // async-signal-safe, on a descriptor opened before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
                });
            }
        }
        let mut child =
            cmd.spawn().map_err(|e| fail(format!("cannot run {}: {e}", self.bin_dir.join(plugin).display())))?;
        let input = serde_json::to_vec(config).map_err(|e| CniError::Invalid(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&input).await.map_err(|e| fail(format!("stdin: {e}")))?;
        }
        let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| fail(format!("no answer within {TIMEOUT:?}")))?
            .map_err(|e| fail(e.to_string()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let message = serde_json::from_str::<Value>(&stdout)
                .ok()
                .and_then(|v| v["msg"].as_str().map(|m| format!("{m} {}", v["details"].as_str().unwrap_or_default())))
                .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
            return Err(fail(message.trim().to_string()));
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout).map_err(|e| fail(format!("unreadable result: {e}")))
    }

    /// One plugin's stdin: its object with the list's name and version, the capabilities
    /// given, and the previous result.
    fn plugin_config(list: &Value, plugin: &Value, runtime: Option<&Value>, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["name"] = list["name"].clone();
        c["cniVersion"] = list["cniVersion"].clone();
        if let (Some(rc), Some(obj)) = (runtime, c.as_object_mut()) {
            let caps = plugin["capabilities"].as_object().cloned().unwrap_or_default();
            let given: serde_json::Map<String, Value> = rc
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| caps.get(*k).and_then(Value::as_bool) == Some(true))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !given.is_empty() {
                obj.insert("runtimeConfig".into(), Value::Object(given));
            }
        }
        if let (Some(p), Some(obj)) = (prev, c.as_object_mut()) {
            obj.insert("prevResult".into(), p.clone());
        }
        if let Some(obj) = c.as_object_mut() {
            obj.remove("capabilities");
        }
        c
    }

    /// Attaches the pod `id` in namespace `netns` to the pod network.
    pub async fn add(
        &self,
        id: &str,
        netns: &Path,
        pod_cidr: &str,
        port_mappings: Vec<PortMapping>,
        args: &str,
    ) -> Result<Attachment, CniError> {
        let env = Env { id, netns: Some(netns), ifname: "lo", args: "" };
        let lo = json!({"cniVersion": CNI_VERSION, "name": "keel-lo", "type": "loopback"});
        self.exec("loopback", "ADD", &env, &lo).await?;
        let list = self.conflist(pod_cidr);
        let runtime = json!({"portMappings": port_mappings});
        let env = Env { id, netns: Some(netns), ifname: "eth0", args };
        let mut prev: Option<Value> = None;
        for plugin in list["plugins"].as_array().into_iter().flatten() {
            let ty = plugin["type"].as_str().unwrap_or_default().to_string();
            if ty == "portmap" && port_mappings.is_empty() {
                continue;
            }
            let cfg = Self::plugin_config(&list, plugin, Some(&runtime), prev.as_ref());
            match self.exec(&ty, "ADD", &env, &cfg).await {
                Ok(r) => prev = Some(r),
                Err(e) => {
                    // A failed ADD may have left an address or rules: undo what can be undone.
                    let partial = Attachment {
                        pod_cidr: pod_cidr.into(),
                        ip: String::new(),
                        port_mappings: port_mappings.clone(),
                        result: Value::Null,
                    };
                    let _ = self.del_chain(id, Some(netns), &partial).await;
                    return Err(e);
                }
            }
        }
        let result = prev.unwrap_or(Value::Null);
        let ip = pod_ip(&result).ok_or_else(|| CniError::Invalid(format!("no pod address in the result {result}")))?;
        let att = Attachment { pod_cidr: pod_cidr.into(), ip, port_mappings, result };
        std::fs::create_dir_all(&self.state_dir)
            .map_err(|source| CniError::Io { what: format!("create {}", self.state_dir.display()), source })?;
        let bytes = serde_json::to_vec(&att).map_err(|e| CniError::Invalid(e.to_string()))?;
        std::fs::write(self.state_file(id), bytes)
            .map_err(|source| CniError::Io { what: format!("write {}", self.state_file(id).display()), source })?;
        Ok(att)
    }

    async fn del_chain(&self, id: &str, netns: Option<&Path>, att: &Attachment) -> Result<(), CniError> {
        let netns = netns.filter(|p| super::netns::is_netns(p));
        let list = self.conflist(&att.pod_cidr);
        let runtime = json!({"portMappings": att.port_mappings});
        let env = Env { id, netns, ifname: "eth0", args: "" };
        let prev = Some(&att.result).filter(|r| !r.is_null());
        let mut first_error = None;
        // Every plugin, in reverse, whatever fails: a DEL skipped leaks addresses or rules.
        for plugin in list["plugins"].as_array().into_iter().flatten().rev() {
            let ty = plugin["type"].as_str().unwrap_or_default().to_string();
            if ty == "portmap" && att.port_mappings.is_empty() {
                continue;
            }
            let cfg = Self::plugin_config(&list, plugin, Some(&runtime), prev);
            if let Err(e) = self.exec(&ty, "DEL", &env, &cfg).await {
                first_error.get_or_insert(e);
            }
        }
        if netns.is_some() {
            let env = Env { id, netns, ifname: "lo", args: "" };
            let lo = json!({"cniVersion": CNI_VERSION, "name": "keel-lo", "type": "loopback"});
            if let Err(e) = self.exec("loopback", "DEL", &env, &lo).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Detaches pod `id` (before its namespace goes). Safe to repeat; nothing to do for a pod
    /// with no attachment on record.
    pub async fn del(&self, id: &str, netns: Option<&Path>) -> Result<(), CniError> {
        let Some(att) = self.attachment(id) else { return Ok(()) };
        self.del_chain(id, netns, &att).await?;
        let _ = std::fs::remove_file(self.state_file(id));
        Ok(())
    }
}

struct Env<'a> {
    id: &'a str,
    netns: Option<&'a Path>,
    ifname: &'a str,
    args: &'a str,
}

/// The pod's address in a CNI result: the IP on an interface inside the sandbox.
pub fn pod_ip(result: &Value) -> Option<String> {
    let interfaces = result["interfaces"].as_array();
    result["ips"].as_array()?.iter().find_map(|ip| {
        let in_sandbox = match ip["interface"].as_u64() {
            Some(i) => interfaces
                .and_then(|l| l.get(i as usize))
                .is_some_and(|it| it["sandbox"].as_str().is_some_and(|s| !s.is_empty())),
            None => true,
        };
        let addr = ip["address"].as_str()?;
        in_sandbox.then(|| addr.split('/').next().unwrap_or(addr).to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cni() -> Cni {
        Cni {
            bin_dir: "/usr/lib/cni".into(),
            state_dir: "/tmp/s".into(),
            ipam_dir: "/tmp/i".into(),
            bridge: "keel0".into(),
            host_netns: None,
        }
    }

    #[test]
    fn a_plugin_gets_the_list_name_its_capabilities_and_the_previous_result() {
        let list = cni().conflist("10.42.1.0/24");
        let plugins = list["plugins"].as_array().unwrap();
        assert_eq!(plugins[0]["ipam"]["ranges"][0][0]["subnet"], "10.42.1.0/24");
        let rc = json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}], "other": 1});
        let prev = json!({"ips": []});
        let c = Cni::plugin_config(&list, &plugins[1], Some(&rc), Some(&prev));
        assert_eq!(c["name"], "keel");
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["runtimeConfig"], json!({"portMappings": rc["portMappings"]}), "only declared capabilities");
        assert_eq!(c["prevResult"], prev);
        assert!(c.get("capabilities").is_none());
        let b = Cni::plugin_config(&list, &plugins[0], Some(&rc), None);
        assert!(b.get("runtimeConfig").is_none() && b.get("prevResult").is_none());
    }

    #[test]
    fn the_pod_address_is_the_one_inside_the_sandbox() {
        let r = json!({
            "interfaces": [{"name": "keel0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/x"}],
            "ips": [{"interface": 2, "address": "10.42.1.5/24", "gateway": "10.42.1.1"}]
        });
        assert_eq!(pod_ip(&r).as_deref(), Some("10.42.1.5"));
        assert_eq!(pod_ip(&json!({"ips": []})), None);
    }
}
