//! The OCI runtime spec of a pod's container, built with the `oci-spec` crate from the
//! container's Kubernetes fields, the image's config and the pod's sandbox. Pure: no IO.
//!
//! - command and args follow Kubernetes: neither set runs the image's Entrypoint and Cmd;
//!   command replaces both; args alone replace the Cmd after the image's Entrypoint;
//!   `$(VAR)` in either expands from the container's environment (`$$` escapes).
//! - the environment is the image's, then the container's (later names win);
//! - every container of a pod joins the pod's network namespace by its path, and sees the
//!   pod's /etc/hosts, /etc/hostname and /etc/resolv.conf;
//! - the default is unprivileged: the default capability set, no new privileges, the
//!   standard devices only.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, MountBuilder, ProcessBuilder, RootBuilder, Spec,
    SpecBuilder, UserBuilder,
};

use crate::agent::runtime::ImageConfig;
use crate::proto::v1 as pb;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// What the pod's sandbox gives every container.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub netns: PathBuf,
    pub hostname: String,
    /// Files the pod's containers see at /etc/hosts, /etc/hostname and /etc/resolv.conf.
    pub hosts: PathBuf,
    pub hostname_file: PathBuf,
    pub resolv_conf: PathBuf,
    /// The cgroup parent of the pod's containers.
    pub cgroup_parent: String,
    /// Where each of the pod's volumes is on the host.
    pub volumes: super::volumes::VolumePaths,
}

/// The process of a container: its argv by Kubernetes' rules.
pub fn argv(container: &pb::Container, image: &ImageConfig, env: &[(String, String)]) -> Vec<String> {
    let expand = |v: &Vec<String>| v.iter().map(|s| expand(s, env)).collect::<Vec<_>>();
    match (container.command.is_empty(), container.args.is_empty()) {
        (true, true) => image.entrypoint.iter().chain(&image.cmd).cloned().collect(),
        (false, true) => expand(&container.command),
        (true, false) => image.entrypoint.iter().cloned().chain(expand(&container.args)).collect(),
        (false, false) => expand(&container.command).into_iter().chain(expand(&container.args)).collect(),
    }
}

use super::refs::expand;

/// The environment: the image's, then `envFrom` (resolved, in order), then the container's
/// `env` in order (each may refer to the ones before it with `$(VAR)`; `valueFrom` entries
/// take their resolved value).
pub fn environment(
    container: &pb::Container,
    image: &ImageConfig,
    resolved: &super::refs::ResolvedEnv,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> =
        image.env.iter().filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect();
    let set = |env: &mut Vec<(String, String)>, k: &str, v: String| {
        env.retain(|(n, _)| n != k);
        env.push((k.to_string(), v));
    };
    for (k, v) in &resolved.from {
        set(&mut env, k, v.clone());
    }
    for e in &container.env {
        let value = match &e.value_from {
            // An optional reference that is missing sets nothing.
            Some(_) => match resolved.values.get(&e.name) {
                Some(v) => v.clone(),
                None => continue,
            },
            None => expand(&e.value, &env),
        };
        set(&mut env, &e.name, value);
    }
    env
}

/// uid and gid: the container's securityContext, then the pod's, then the image's numeric
/// `User` ("uid" or "uid:gid"), then root.
fn user_of(container: &pb::Container, pod: &pb::PodSpec, image: &ImageConfig) -> Result<(u32, u32), SpecError> {
    let csc = container.security_context.as_ref();
    let psc = pod.security_context.as_ref();
    let (img_uid, img_gid) = match image.user.split_once(':') {
        Some((u, g)) => (u.parse::<u32>().ok(), g.parse::<u32>().ok()),
        None => (image.user.parse::<u32>().ok(), None),
    };
    if !image.user.is_empty()
        && img_uid.is_none()
        && csc.and_then(|s| s.run_as_user).or(psc.and_then(|s| s.run_as_user)).is_none()
    {
        return Err(SpecError(format!(
            "the image's user {:?} is not numeric; set securityContext.runAsUser",
            image.user
        )));
    }
    let uid =
        csc.and_then(|s| s.run_as_user).or(psc.and_then(|s| s.run_as_user)).map(|u| u as u32).or(img_uid).unwrap_or(0);
    let gid = csc
        .and_then(|s| s.run_as_group)
        .or(psc.and_then(|s| s.run_as_group))
        .map(|g| g as u32)
        .or(img_gid)
        .unwrap_or(0);
    let non_root = csc.and_then(|s| s.run_as_non_root).or(psc.and_then(|s| s.run_as_non_root)).unwrap_or(false);
    if non_root && uid == 0 {
        return Err(SpecError("container has runAsNonRoot and image will run as root".into()));
    }
    Ok((uid, gid))
}

/// Docker's (and containerd's CRI's) default capabilities.
const DEFAULT_CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

fn capability(name: &str) -> Option<Capability> {
    let n = name.trim().to_ascii_uppercase();
    let n = if n.starts_with("CAP_") { n } else { format!("CAP_{n}") };
    serde_json::from_value(serde_json::Value::String(n)).ok()
}

fn bind(source: &Path, destination: &str, readonly: bool) -> Result<oci_spec::runtime::Mount, SpecError> {
    let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
    if readonly {
        options.push("ro".into());
    }
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(options)
        .build()
        .map_err(|e| SpecError(e.to_string()))
}

/// A volume bound into a container: (host path, container path, read-only).
pub type Bind = (PathBuf, String, bool);

/// The cgroup settings of a container's requests and limits, as the kubelet computes them:
/// cpu shares from the request (2 without one), a CFS quota from the limit over a 100 ms
/// period, memory (and memory+swap, so no swap) from the limit.
pub fn resources(container: &pb::Container) -> Result<(u64, Option<i64>, Option<i64>), SpecError> {
    let res = container.resources.clone().unwrap_or_default();
    let q = |m: &std::collections::HashMap<String, String>, k: &str| -> Result<Option<i128>, SpecError> {
        m.get(k)
            .map(|v| {
                crate::api::quantity::Quantity::parse(v)
                    .map(|q| q.milli)
                    .map_err(|e| SpecError(format!("resources {k} {v:?}: {e}")))
            })
            .transpose()
    };
    let cpu_limit = q(&res.limits, "cpu")?;
    let cpu_request = q(&res.requests, "cpu")?.or(cpu_limit);
    let shares = cpu_request.map_or(2, |m| ((m * 1024 / 1000) as u64).max(2));
    let quota = cpu_limit.map(|m| ((m * 100_000 / 1000) as i64).max(1000));
    let memory = q(&res.limits, "memory")?.map(|m| (m / 1000) as i64);
    Ok((shares, quota, memory))
}

/// The runtime spec of `container` of `pod`.
#[allow(clippy::too_many_arguments)]
pub fn build(
    pod: &pb::PodSpec,
    container: &pb::Container,
    image: &ImageConfig,
    sandbox: &Sandbox,
    env: &[(String, String)],
    binds: &[Bind],
    container_id: &str,
) -> Result<Spec, SpecError> {
    let e = |e: oci_spec::OciSpecError| SpecError(e.to_string());
    let args = argv(container, image, env);
    if args.is_empty() {
        return Err(SpecError("no command: the container sets none and the image has no Entrypoint or Cmd".into()));
    }
    let cwd = if !container.working_dir.is_empty() {
        container.working_dir.clone()
    } else if !image.working_dir.is_empty() {
        image.working_dir.clone()
    } else {
        "/".into()
    };
    let (uid, gid) = user_of(container, pod, image)?;
    let sc = container.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged.unwrap_or(false);
    let mut caps: Vec<Capability> = if privileged {
        serde_json::from_value::<Vec<Capability>>(serde_json::json!([
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_DAC_READ_SEARCH",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETPCAP",
            "CAP_LINUX_IMMUTABLE",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST",
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_IPC_LOCK",
            "CAP_IPC_OWNER",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_CHROOT",
            "CAP_SYS_PTRACE",
            "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN",
            "CAP_SYS_BOOT",
            "CAP_SYS_NICE",
            "CAP_SYS_RESOURCE",
            "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG",
            "CAP_MKNOD",
            "CAP_LEASE",
            "CAP_AUDIT_WRITE",
            "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP",
            "CAP_MAC_OVERRIDE",
            "CAP_MAC_ADMIN",
            "CAP_SYSLOG",
            "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND",
            "CAP_AUDIT_READ"
        ]))
        .map_err(|e| SpecError(e.to_string()))?
    } else {
        DEFAULT_CAPS.to_vec()
    };
    if let Some(c) = &sc.capabilities {
        let drops: Vec<String> = c.drop.iter().map(|d| d.to_ascii_uppercase()).collect();
        if drops.iter().any(|d| d == "ALL" || d == "CAP_ALL") {
            caps.clear();
        }
        for d in &c.drop {
            let Some(cap) = capability(d) else { continue };
            caps.retain(|x| *x != cap);
        }
        for a in &c.add {
            let cap = capability(a).ok_or_else(|| SpecError(format!("unknown capability {a:?}")))?;
            if !caps.contains(&cap) {
                caps.push(cap);
            }
        }
    }
    let capset: std::collections::HashSet<Capability> = caps.into_iter().collect();
    // The bounding, permitted and effective sets; as root the process has them, as another
    // user only through file capabilities (Kubernetes' behaviour).
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(capset.clone())
        .permitted(capset.clone())
        .effective(capset.clone())
        .build()
        .map_err(e)?;
    let process = ProcessBuilder::default()
        .terminal(container.tty)
        .args(args)
        .env(env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>())
        .cwd(cwd)
        .user(UserBuilder::default().uid(uid).gid(gid).build().map_err(e)?)
        .capabilities(capabilities)
        .no_new_privileges(!privileged && sc.allow_privilege_escalation != Some(true))
        .build()
        .map_err(e)?;
    let readonly = sc.read_only_root_filesystem.unwrap_or(false);
    let mut mounts = oci_spec::runtime::get_default_mounts();
    mounts.push(bind(&sandbox.hosts, "/etc/hosts", false)?);
    mounts.push(bind(&sandbox.hostname_file, "/etc/hostname", readonly)?);
    mounts.push(bind(&sandbox.resolv_conf, "/etc/resolv.conf", readonly)?);
    for (source, destination, ro) in binds {
        if !destination.starts_with('/') {
            return Err(SpecError(format!("mountPath {destination:?} must be absolute")));
        }
        mounts.push(bind(source, destination, *ro)?);
    }
    let mut namespaces = Vec::new();
    for ty in [LinuxNamespaceType::Pid, LinuxNamespaceType::Ipc, LinuxNamespaceType::Uts, LinuxNamespaceType::Mount] {
        namespaces.push(LinuxNamespaceBuilder::default().typ(ty).build().map_err(e)?);
    }
    namespaces.push(
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Network)
            .path(sandbox.netns.clone())
            .build()
            .map_err(e)?,
    );
    // Deny every device but the standard ones (what runc and containerd allow by default).
    let mut devices = vec![LinuxDeviceCgroupBuilder::default().allow(false).access("rwm").build().map_err(e)?];
    for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (136, -1)] {
        devices.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(LinuxDeviceType::C)
                .major(major)
                .minor(minor)
                .access("rwm")
                .build()
                .map_err(e)?,
        );
    }
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(format!("{}/{container_id}", sandbox.cgroup_parent)))
        .resources({
            let (shares, quota, memory) = resources(container)?;
            let mut cpu = oci_spec::runtime::LinuxCpuBuilder::default().shares(shares);
            if let Some(q) = quota {
                cpu = cpu.quota(q).period(100_000u64);
            }
            let mut r = LinuxResourcesBuilder::default().devices(devices).cpu(cpu.build().map_err(e)?);
            if let Some(m) = memory {
                let mut mem = oci_spec::runtime::LinuxMemoryBuilder::default().limit(m);
                // Memory plus swap at the same limit: no swap, as the kubelet sets it (where
                // cgroup v1 accounts swap at all).
                if !Path::new("/sys/fs/cgroup/memory").exists()
                    || Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
                {
                    mem = mem.swap(m);
                }
                r = r.memory(mem.build().map_err(e)?);
            }
            r.build().map_err(e)?
        });
    if !privileged {
        linux = linux
            .masked_paths(oci_spec::runtime::get_default_maskedpaths())
            .readonly_paths(oci_spec::runtime::get_default_readonly_paths());
    }
    SpecBuilder::default()
        .version("1.0.2")
        .root(RootBuilder::default().path("rootfs").readonly(readonly).build().map_err(e)?)
        .hostname(sandbox.hostname.clone())
        .process(process)
        .mounts(mounts)
        .linux(linux.build().map_err(e)?)
        .build()
        .map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["echo".into(), "entrypoint".into()],
            cmd: vec!["from-cmd".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            ..Default::default()
        }
    }

    fn container(command: &[&str], args: &[&str]) -> pb::Container {
        pb::Container {
            name: "c".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn command_and_args_follow_kubernetes_against_entrypoint_and_cmd() {
        let i = image();
        let env = vec![("NAME".to_string(), "keel".to_string())];
        let table: &[(&[&str], &[&str], &[&str])] = &[
            (&[], &[], &["echo", "entrypoint", "from-cmd"]),
            (&["sh", "-c"], &[], &["sh", "-c"]),
            (&[], &["a", "b"], &["echo", "entrypoint", "a", "b"]),
            (&["printf"], &["%s", "x"], &["printf", "%s", "x"]),
            (&["echo", "$(NAME)"], &["$(MISSING)", "$$(NAME)"], &["echo", "keel", "$(MISSING)", "$(NAME)"]),
        ];
        for (cmd, args, want) in table {
            assert_eq!(argv(&container(cmd, args), &i, &env), *want, "command {cmd:?} args {args:?}");
        }
    }

    #[test]
    fn the_environment_layers_the_container_over_the_image() {
        let mut c = container(&[], &[]);
        let from_ref = |name: &str| pb::EnvVar {
            name: name.into(),
            value_from: Some(pb::EnvVarSource {
                field_ref: Some(pb::ObjectFieldSelector { field_path: "metadata.name".into(), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        c.env = vec![
            pb::EnvVar { name: "A".into(), value: "container".into(), ..Default::default() },
            pb::EnvVar { name: "B".into(), value: "$(A)-$(PATH)-$(FROM)".into(), ..Default::default() },
            from_ref("POD"),
            from_ref("OPTIONAL_MISSING"),
            pb::EnvVar { name: "C".into(), value: "$(POD)".into(), ..Default::default() },
        ];
        let resolved = crate::agent::pods::refs::ResolvedEnv {
            from: vec![("FROM".into(), "cm".into()), ("A".into(), "from-cm".into())],
            values: [("POD".to_string(), "web".to_string())].into(),
        };
        let env = environment(&c, &image(), &resolved);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("A"), Some("container"), "env wins over envFrom");
        assert_eq!(get("B"), Some("container-/bin-cm"));
        assert_eq!(get("PATH"), Some("/bin"));
        assert_eq!(get("C"), Some("web"));
        assert_eq!(get("OPTIONAL_MISSING"), None);
    }

    fn sandbox() -> Sandbox {
        Sandbox {
            netns: "/run/netns/keel-u".into(),
            hostname: "web".into(),
            hosts: "/p/hosts".into(),
            hostname_file: "/p/hostname".into(),
            resolv_conf: "/p/resolv.conf".into(),
            cgroup_parent: "/keel/u".into(),
            volumes: Default::default(),
        }
    }

    #[test]
    fn a_spec_joins_the_pod_network_and_is_unprivileged_by_default() {
        let pod = pb::PodSpec::default();
        let spec = build(&pod, &container(&["sleep", "1"], &[]), &image(), &sandbox(), &[], &[], "ctr1").unwrap();
        let v = serde_json::to_value(&spec).unwrap();
        let net = v["linux"]["namespaces"].as_array().unwrap().iter().find(|n| n["type"] == "network").unwrap().clone();
        assert_eq!(net["path"], "/run/netns/keel-u");
        assert_eq!(v["linux"]["cgroupsPath"], "/keel/u/ctr1");
        assert_eq!(v["process"]["args"], serde_json::json!(["sleep", "1"]));
        assert_eq!(v["process"]["noNewPrivileges"], true);
        let caps = v["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(caps.iter().any(|c| c == "CAP_CHOWN") && !caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
        assert!(v["mounts"].as_array().unwrap().iter().any(|m| m["destination"] == "/etc/resolv.conf"));
        assert_eq!(v["hostname"], "web");
    }

    #[test]
    fn security_context_sets_user_capabilities_and_a_read_only_root() {
        let pod = pb::PodSpec {
            security_context: Some(pb::PodSecurityContext { run_as_user: Some(1000), ..Default::default() }),
            ..Default::default()
        };
        let mut c = container(&["id"], &[]);
        c.security_context = Some(pb::SecurityContext {
            run_as_group: Some(2000),
            read_only_root_filesystem: Some(true),
            capabilities: Some(pb::Capabilities { add: vec!["NET_ADMIN".into()], drop: vec!["ALL".into()] }),
            ..Default::default()
        });
        let v = serde_json::to_value(build(&pod, &c, &image(), &sandbox(), &[], &[], "x").unwrap()).unwrap();
        assert_eq!(
            (v["process"]["user"]["uid"].as_u64(), v["process"]["user"]["gid"].as_u64()),
            (Some(1000), Some(2000))
        );
        assert_eq!(v["process"]["capabilities"]["bounding"], serde_json::json!(["CAP_NET_ADMIN"]));
        assert_eq!(v["root"]["readonly"], true);
        let mut root = container(&["id"], &[]);
        root.security_context = Some(pb::SecurityContext { run_as_non_root: Some(true), ..Default::default() });
        let e = build(&pb::PodSpec::default(), &root, &image(), &sandbox(), &[], &[], "x").unwrap_err();
        assert!(e.0.contains("runAsNonRoot"), "{e}");
    }
}
