//! Defaulting as the API server does it, before validation. Only empty fields are filled,
//! so defaulting is idempotent: an object read back and written again does not change.

use crate::api::IntOrString;
use crate::proto::v1 as pb;
use pb::object::Kind as K;

fn set(s: &mut String, v: &str) {
    if s.is_empty() {
        *s = v.to_string();
    }
}

fn pod_spec(spec: &mut pb::PodSpec) {
    set(&mut spec.restart_policy, "Always");
    set(&mut spec.dns_policy, "ClusterFirst");
    set(&mut spec.scheduler_name, "default-scheduler");
    spec.termination_grace_period_seconds.get_or_insert(30);
    for c in spec.init_containers.iter_mut().chain(spec.containers.iter_mut()) {
        if c.image_pull_policy.is_empty() {
            let tag_latest = !c.image.contains('@') && {
                let last = c.image.rsplit('/').next().unwrap_or("");
                last.split_once(':').is_none_or(|(_, tag)| tag == "latest")
            };
            c.image_pull_policy = if tag_latest { "Always" } else { "IfNotPresent" }.into();
        }
        set(&mut c.termination_message_path, "/dev/termination-log");
        set(&mut c.termination_message_policy, "File");
        for p in &mut c.ports {
            set(&mut p.protocol, "TCP");
        }
    }
}

fn template(t: &mut Option<pb::PodTemplateSpec>) {
    if let Some(spec) = t.as_mut().and_then(|t| t.spec.as_mut()) {
        pod_spec(spec);
    }
}

fn rolling(max_unavailable: &mut Option<IntOrString>, max_surge: &mut Option<IntOrString>) {
    max_unavailable.get_or_insert_with(|| IntOrString::string("25%"));
    max_surge.get_or_insert_with(|| IntOrString::string("25%"));
}

/// Fills Kubernetes' defaults into empty fields.
pub fn apply(obj: &mut pb::Object) {
    let Some(kind) = obj.kind.as_mut() else { return };
    match kind {
        K::Pod(p) => {
            if let Some(spec) = p.spec.as_mut() {
                pod_spec(spec);
            }
        }
        K::Deployment(d) => {
            if let Some(spec) = d.spec.as_mut() {
                spec.replicas.get_or_insert(1);
                spec.revision_history_limit.get_or_insert(10);
                spec.progress_deadline_seconds.get_or_insert(600);
                let strategy = spec.strategy.get_or_insert_with(Default::default);
                set(&mut strategy.r#type, "RollingUpdate");
                if strategy.r#type == "RollingUpdate" {
                    let ru = strategy.rolling_update.get_or_insert_with(Default::default);
                    rolling(&mut ru.max_unavailable, &mut ru.max_surge);
                }
                template(&mut spec.template);
            }
        }
        K::ReplicaSet(r) => {
            if let Some(spec) = r.spec.as_mut() {
                spec.replicas.get_or_insert(1);
                template(&mut spec.template);
            }
        }
        K::ReplicationController(r) => {
            if let Some(spec) = r.spec.as_mut() {
                spec.replicas.get_or_insert(1);
                template(&mut spec.template);
            }
        }
        K::StatefulSet(s) => {
            if let Some(spec) = s.spec.as_mut() {
                spec.replicas.get_or_insert(1);
                spec.revision_history_limit.get_or_insert(10);
                set(&mut spec.pod_management_policy, "OrderedReady");
                let us = spec.update_strategy.get_or_insert_with(Default::default);
                set(&mut us.r#type, "RollingUpdate");
                template(&mut spec.template);
            }
        }
        K::DaemonSet(d) => {
            if let Some(spec) = d.spec.as_mut() {
                spec.revision_history_limit.get_or_insert(10);
                let us = spec.update_strategy.get_or_insert_with(Default::default);
                set(&mut us.r#type, "RollingUpdate");
                template(&mut spec.template);
            }
        }
        K::Job(j) => {
            if let Some(spec) = j.spec.as_mut() {
                spec.parallelism.get_or_insert(1);
                spec.backoff_limit.get_or_insert(6);
                spec.completion_mode.get_or_insert_with(|| "NonIndexed".into());
                spec.suspend.get_or_insert(false);
                if let Some(ps) = spec.template.as_mut().and_then(|t| t.spec.as_mut()) {
                    // A Job's pods must not restart forever; Kubernetes requires Never or
                    // OnFailure and has no default, so leave it for validation to report.
                    let had_policy = !ps.restart_policy.is_empty();
                    pod_spec(ps);
                    if !had_policy {
                        ps.restart_policy.clear();
                    }
                }
            }
        }
        K::CronJob(c) => {
            if let Some(spec) = c.spec.as_mut() {
                set(&mut spec.concurrency_policy, "Allow");
                spec.suspend.get_or_insert(false);
                spec.successful_jobs_history_limit.get_or_insert(3);
                spec.failed_jobs_history_limit.get_or_insert(1);
            }
        }
        K::Service(s) => {
            if let Some(spec) = s.spec.as_mut() {
                set(&mut spec.r#type, "ClusterIP");
                set(&mut spec.session_affinity, "None");
                for p in &mut spec.ports {
                    set(&mut p.protocol, "TCP");
                    if p.target_port.is_none() {
                        p.target_port = Some(IntOrString::int(p.port));
                    }
                }
            }
        }
        K::Secret(s) => {
            set(&mut s.r#type, "Opaque");
            // As in Kubernetes, stringData is write-only: folded into data (where it wins over
            // the same key) and never stored.
            for (k, v) in std::mem::take(&mut s.string_data) {
                s.data.insert(k, v.into_bytes());
            }
        }
        K::Namespace(n) => {
            let status = n.status.get_or_insert_with(Default::default);
            set(&mut status.phase, "Active");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::manifest;

    fn parse(text: &str) -> pb::Object {
        let docs = manifest::split(text);
        manifest::parse_document("t.yaml", &docs[0]).unwrap()
    }

    #[test]
    fn deployment_defaults_match_kubernetes_and_are_idempotent() {
        let mut obj = parse("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - {name: web, image: nginx, ports: [{containerPort: 80}]}\n      - {name: side, image: busybox:1.36}\n");
        apply(&mut obj);
        let once = obj.clone();
        apply(&mut obj);
        assert_eq!(obj, once, "defaulting twice changes nothing");
        let Some(K::Deployment(d)) = obj.kind else { panic!() };
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.revision_history_limit, Some(10));
        let ru = spec.strategy.as_ref().unwrap().rolling_update.as_ref().unwrap();
        assert_eq!(ru.max_surge, Some(IntOrString::string("25%")));
        let pod = spec.template.unwrap().spec.unwrap();
        assert_eq!(pod.restart_policy, "Always");
        assert_eq!(pod.containers[0].image_pull_policy, "Always", "untagged means latest");
        assert_eq!(pod.containers[1].image_pull_policy, "IfNotPresent");
        assert_eq!(pod.containers[0].ports[0].protocol, "TCP");
    }

    #[test]
    fn service_target_port_defaults_to_port() {
        let mut obj = parse("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: 80}]\n");
        apply(&mut obj);
        let Some(K::Service(s)) = obj.kind else { panic!() };
        let spec = s.spec.unwrap();
        assert_eq!(spec.r#type, "ClusterIP");
        assert_eq!(spec.ports[0].target_port, Some(IntOrString::int(80)));
    }

    #[test]
    fn secret_string_data_is_folded_into_data_and_wins() {
        let mut obj = parse(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {user: YWRtaW4=, pass: b2xk}\nstringData: {pass: new, token: t0k}\n",
        );
        apply(&mut obj);
        let Some(K::Secret(s)) = obj.kind else { panic!() };
        assert!(s.string_data.is_empty(), "stringData is never stored");
        assert_eq!(s.data.get("user").map(Vec::as_slice), Some(&b"admin"[..]));
        assert_eq!(s.data.get("pass").map(Vec::as_slice), Some(&b"new"[..]), "stringData wins");
        assert_eq!(s.data.get("token").map(Vec::as_slice), Some(&b"t0k"[..]));
        assert_eq!(s.r#type, "Opaque");
    }
}
