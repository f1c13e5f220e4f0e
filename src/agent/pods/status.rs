//! A pod's status as the kubelet writes it, computed from what the node has: each
//! container's state (waiting with its reason, running, or terminated with its exit code),
//! its last state, its restart count, the pod's phase, conditions, addresses and QoS class.
//! Pure: the same inputs give the same status, so the worker writes only on change.

use std::time::SystemTime;

use super::{attempt_of, latest, PodConfig, PodMemory};
use crate::agent::runtime::{ContainerInfo, ContainerState, LABEL_CONTAINER};
use crate::proto::v1 as pb;

fn rfc3339(t: Option<SystemTime>) -> String {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string()).unwrap_or_default()
}

fn terminated(c: &ContainerInfo) -> Option<pb::ContainerStateTerminated> {
    match &c.state {
        ContainerState::Exited { code, started_at, finished_at, oom } => Some(pb::ContainerStateTerminated {
            exit_code: *code,
            reason: if *oom {
                "OOMKilled".into()
            } else if *code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            },
            started_at: rfc3339(*started_at),
            finished_at: rfc3339(*finished_at),
            container_id: format!("containerd://{}", c.id),
            ..Default::default()
        }),
        _ => None,
    }
}

fn container_status(c: &pb::Container, observed: &[ContainerInfo], mem: &PodMemory) -> pb::ContainerStatus {
    let newest = latest(observed, &c.name);
    let previous = newest.and_then(|n| {
        let a = attempt_of(n);
        observed
            .iter()
            .filter(|o| o.label(LABEL_CONTAINER) == c.name && attempt_of(o) < a)
            .max_by_key(|o| attempt_of(o))
    });
    let waiting = mem.waiting.get(&c.name);
    let running = newest.filter(|n| matches!(n.state, ContainerState::Running { .. }));
    let (state, last) = match (running, waiting, newest) {
        (Some(r), _, _) => {
            let started_at = match r.state {
                ContainerState::Running { started_at, .. } => rfc3339(started_at),
                _ => String::new(),
            };
            let state =
                pb::ContainerState { running: Some(pb::ContainerStateRunning { started_at }), ..Default::default() };
            (state, previous.and_then(terminated))
        }
        (None, Some(w), n) => {
            let state = pb::ContainerState {
                waiting: Some(pb::ContainerStateWaiting { reason: w.reason.clone(), message: w.message.clone() }),
                ..Default::default()
            };
            // Waiting to restart: the exit it waits after is the last state.
            let last = n.and_then(terminated).or_else(|| previous.and_then(terminated));
            (state, last)
        }
        (None, None, Some(n)) if terminated(n).is_some() => {
            (pb::ContainerState { terminated: terminated(n), ..Default::default() }, previous.and_then(terminated))
        }
        _ => (
            pb::ContainerState {
                waiting: Some(pb::ContainerStateWaiting { reason: "ContainerCreating".into(), message: String::new() }),
                ..Default::default()
            },
            previous.and_then(terminated),
        ),
    };
    let restart_count = newest
        .map(|n| attempt_of(n) as i32 - i32::from(matches!(n.state, ContainerState::Created) && attempt_of(n) > 0))
        .unwrap_or(0);
    let is_running = state.running.is_some();
    // A startup or readiness probe that has not said yes (or not run yet) holds these back.
    let started = is_running && super::has_started(c, mem);
    let ready = started && (c.readiness_probe.is_none() || mem.ready.get(&c.name) == Some(&true));
    pb::ContainerStatus {
        name: c.name.clone(),
        state: Some(state),
        last_state: Some(
            last.map(|t| pb::ContainerState { terminated: Some(t), ..Default::default() }).unwrap_or_default(),
        ),
        ready,
        restart_count,
        image: crate::agent::runtime::normalize_image(&c.image),
        image_id: mem.image_ids.get(&c.name).cloned().unwrap_or_default(),
        container_id: newest.map(|n| format!("containerd://{}", n.id)).unwrap_or_default(),
        started: Some(started),
        ..Default::default()
    }
}

/// Kubernetes' QoS class from the containers' requests and limits.
pub fn qos_class(spec: &pb::PodSpec) -> &'static str {
    let all: Vec<&pb::Container> = spec.init_containers.iter().chain(&spec.containers).collect();
    let res = |c: &pb::Container| c.resources.clone().unwrap_or_default();
    let any = all.iter().any(|c| {
        let r = res(c);
        ["cpu", "memory"].iter().any(|k| r.requests.contains_key(*k) || r.limits.contains_key(*k))
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = all.iter().all(|c| {
        let r = res(c);
        ["cpu", "memory"].iter().all(|k| {
            let limit = r.limits.get(*k);
            let request = r.requests.get(*k).or(limit);
            limit.is_some() && request == limit
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn condition(previous: Option<&pb::PodStatus>, kind: &str, ok: bool, now: SystemTime) -> pb::PodCondition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .and_then(|p| p.conditions.iter().find(|c| c.r#type == kind && c.status == status))
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| rfc3339(Some(now)));
    pb::PodCondition { r#type: kind.into(), status: status.into(), last_transition_time: since, ..Default::default() }
}

/// The pod's status now.
pub fn compute(
    pod: &pb::Pod,
    observed: &[ContainerInfo],
    mem: &PodMemory,
    config: &PodConfig,
    now: SystemTime,
) -> pb::PodStatus {
    let spec = pod.spec.clone().unwrap_or_default();
    let previous = pod.status.as_ref();
    let policy = if spec.restart_policy.is_empty() { "Always" } else { spec.restart_policy.as_str() };
    let init: Vec<pb::ContainerStatus> =
        spec.init_containers.iter().map(|c| container_status(c, observed, mem)).collect();
    let app: Vec<pb::ContainerStatus> = spec.containers.iter().map(|c| container_status(c, observed, mem)).collect();
    let exit = |s: &pb::ContainerStatus| s.state.as_ref().and_then(|st| st.terminated.as_ref()).map(|t| t.exit_code);
    // An init container is done when it exited 0, a sidecar (restartPolicy Always) once it
    // has started.
    let initialized = spec
        .init_containers
        .iter()
        .zip(&init)
        .all(|(c, s)| exit(s) == Some(0) || (super::is_sidecar(c) && s.started == Some(true)));
    let init_failed = policy == "Never" && init.iter().any(|s| exit(s).is_some_and(|c| c != 0));
    let running = app.iter().any(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()));
    let all_exited = !app.is_empty() && app.iter().all(|s| exit(s).is_some());
    let will_restart = |s: &pb::ContainerStatus| match policy {
        "Never" => false,
        "OnFailure" => exit(s).is_some_and(|c| c != 0),
        _ => true,
    };
    let phase =
        if init_failed || (all_exited && !app.iter().any(will_restart) && app.iter().any(|s| exit(s) != Some(0))) {
            "Failed"
        } else if all_exited && !app.iter().any(will_restart) {
            "Succeeded"
        } else if initialized && (running || app.iter().any(|s| s.restart_count > 0 || exit(s).is_some())) {
            "Running"
        } else {
            "Pending"
        };
    let (phase, reason, message) = if mem.deadline_exceeded {
        ("Failed", "DeadlineExceeded", "Pod was active on the node longer than the specified deadline")
    } else {
        (phase, "", "")
    };
    let ready = initialized && !app.is_empty() && app.iter().all(|s| s.ready);
    let conditions = vec![
        condition(previous, "PodScheduled", true, now),
        condition(previous, "Initialized", initialized, now),
        condition(previous, "ContainersReady", ready, now),
        condition(previous, "Ready", ready, now),
    ];
    let ip = mem.ip.clone().unwrap_or_default();
    pb::PodStatus {
        observed_generation: pod.metadata.as_ref().map_or(0, |m| m.generation),
        phase: phase.into(),
        reason: reason.into(),
        message: message.into(),
        conditions,
        host_ip: config.node_ip.clone(),
        host_ips: vec![pb::HostIp { ip: config.node_ip.clone() }],
        pod_ip: ip.clone(),
        pod_ips: if ip.is_empty() { vec![] } else { vec![pb::PodIp { ip }] },
        start_time: mem.start_time.clone().unwrap_or_default(),
        init_container_statuses: init,
        container_statuses: app,
        qos_class: qos_class(&spec).into(),
        ..previous.cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spec(limits: &[(&str, &str)], requests: &[(&str, &str)]) -> pb::PodSpec {
        let m = |v: &[(&str, &str)]| v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
        pb::PodSpec {
            containers: vec![pb::Container {
                name: "c".into(),
                resources: Some(pb::ResourceRequirements {
                    limits: m(limits),
                    requests: m(requests),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn qos_classes_follow_requests_and_limits() {
        assert_eq!(qos_class(&spec(&[], &[])), "BestEffort");
        assert_eq!(qos_class(&spec(&[("cpu", "1"), ("memory", "1Gi")], &[])), "Guaranteed");
        assert_eq!(
            qos_class(&spec(&[("cpu", "1"), ("memory", "1Gi")], &[("cpu", "1"), ("memory", "1Gi")])),
            "Guaranteed"
        );
        assert_eq!(qos_class(&spec(&[("memory", "1Gi")], &[("memory", "512Mi")])), "Burstable");
        assert_eq!(qos_class(&spec(&[], &[("cpu", "100m")])), "Burstable");
    }

    fn ctr(name: &str, attempt: u32, state: ContainerState) -> ContainerInfo {
        ContainerInfo {
            id: format!("{name}-{attempt}"),
            image: "docker.io/library/busybox:latest".into(),
            labels: [
                (LABEL_CONTAINER.to_string(), name.to_string()),
                (crate::agent::runtime::LABEL_ATTEMPT.to_string(), attempt.to_string()),
            ]
            .into(),
            state,
            log_path: None,
        }
    }

    fn pod(policy: &str) -> pb::Pod {
        pb::Pod {
            spec: Some(pb::PodSpec {
                restart_policy: policy.into(),
                containers: vec![pb::Container { name: "a".into(), image: "busybox".into(), ..Default::default() }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn exited(code: i32) -> ContainerState {
        ContainerState::Exited { code, started_at: None, finished_at: None, oom: false }
    }

    #[test]
    fn phases_follow_the_containers_and_the_restart_policy() {
        let cfg = PodConfig::new("n", "10.0.0.1", "/tmp".into());
        let now = SystemTime::now();
        let m = PodMemory::default();
        let phase = |p: &pb::Pod, o: &[ContainerInfo]| compute(p, o, &m, &cfg, now).phase;
        assert_eq!(phase(&pod("Always"), &[]), "Pending");
        assert_eq!(
            phase(&pod("Always"), &[ctr("a", 0, ContainerState::Running { pid: 1, started_at: None })]),
            "Running"
        );
        assert_eq!(phase(&pod("Never"), &[ctr("a", 0, exited(0))]), "Succeeded");
        assert_eq!(phase(&pod("Never"), &[ctr("a", 0, exited(3))]), "Failed");
        assert_eq!(phase(&pod("OnFailure"), &[ctr("a", 0, exited(0))]), "Succeeded");
        assert_eq!(phase(&pod("OnFailure"), &[ctr("a", 1, exited(3))]), "Running", "it will restart");
        assert_eq!(phase(&pod("Always"), &[ctr("a", 2, exited(0))]), "Running");
        let s = compute(
            &pod("Always"),
            &[ctr("a", 0, exited(1)), ctr("a", 1, ContainerState::Running { pid: 2, started_at: None })],
            &m,
            &cfg,
            now,
        );
        let cs = &s.container_statuses[0];
        assert_eq!(cs.restart_count, 1);
        assert_eq!(cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap().exit_code, 1);
        assert!(cs.ready);
        assert!(s.conditions.iter().any(|c| c.r#type == "Ready" && c.status == "True"));
    }

    #[test]
    fn a_waiting_reason_shows_with_the_exit_it_waits_after() {
        let cfg = PodConfig::new("n", "10.0.0.1", "/tmp".into());
        let mut m = PodMemory::default();
        m.waiting.insert(
            "a".into(),
            super::super::Waiting { reason: "CrashLoopBackOff".into(), message: "back-off".into() },
        );
        let s = compute(&pod("Always"), &[ctr("a", 3, exited(2))], &m, &cfg, SystemTime::now());
        let cs = &s.container_statuses[0];
        assert_eq!(cs.state.as_ref().unwrap().waiting.as_ref().unwrap().reason, "CrashLoopBackOff");
        assert_eq!(cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap().exit_code, 2);
        assert_eq!(cs.restart_count, 3);
        assert!(!cs.ready);
    }
}
