//! Facts about a pod that more than one component needs: which Secrets and ConfigMaps it
//! refers to (the node authorizer lets a node read exactly those; the agent mounts them),
//! and which node it is bound to.

use std::collections::BTreeSet;

use crate::proto::v1 as pb;

/// The Secrets and ConfigMaps a pod spec refers to, by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct References {
    pub secrets: BTreeSet<String>,
    pub config_maps: BTreeSet<String>,
}

fn env(refs: &mut References, env: &[pb::EnvVar], env_from: &[pb::EnvFromSource]) {
    for e in env {
        let Some(from) = &e.value_from else { continue };
        if let Some(s) = &from.secret_key_ref {
            refs.secrets.insert(s.name.clone());
        }
        if let Some(c) = &from.config_map_key_ref {
            refs.config_maps.insert(c.name.clone());
        }
    }
    for f in env_from {
        if let Some(s) = &f.secret_ref {
            refs.secrets.insert(s.name.clone());
        }
        if let Some(c) = &f.config_map_ref {
            refs.config_maps.insert(c.name.clone());
        }
    }
}

/// Walks every place a pod names a Secret or ConfigMap: volumes (secret, configMap,
/// projected sources, a CSI driver's node-publish secret), every container's env and
/// envFrom (init and ephemeral containers too), and imagePullSecrets.
pub fn references(spec: &pb::PodSpec) -> References {
    let mut refs = References::default();
    for v in &spec.volumes {
        if let Some(s) = &v.secret {
            refs.secrets.insert(s.secret_name.clone());
        }
        if let Some(c) = &v.config_map {
            refs.config_maps.insert(c.name.clone());
        }
        if let Some(p) = &v.projected {
            for src in &p.sources {
                if let Some(s) = &src.secret {
                    refs.secrets.insert(s.name.clone());
                }
                if let Some(c) = &src.config_map {
                    refs.config_maps.insert(c.name.clone());
                }
            }
        }
        if let Some(r) = v.csi.as_ref().and_then(|c| c.node_publish_secret_ref.as_ref()) {
            refs.secrets.insert(r.name.clone());
        }
    }
    for c in spec.init_containers.iter().chain(&spec.containers) {
        env(&mut refs, &c.env, &c.env_from);
    }
    for c in &spec.ephemeral_containers {
        env(&mut refs, &c.env, &c.env_from);
    }
    for s in &spec.image_pull_secrets {
        refs.secrets.insert(s.name.clone());
    }
    refs.secrets.remove("");
    refs.config_maps.remove("");
    refs
}

/// The node a pod is bound to, if it is a pod and bound.
pub fn node_of(obj: &pb::Object) -> Option<&str> {
    match obj.kind.as_ref()? {
        pb::object::Kind::Pod(p) => p.spec.as_ref().map(|s| s.node_name.as_str()).filter(|n| !n.is_empty()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::manifest;

    #[test]
    fn every_place_a_pod_names_a_secret_or_config_map_is_found_and_nothing_else() {
        let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  imagePullSecrets: [{name: pull}]
  volumes:
  - {name: a, secret: {secretName: vol-secret}}
  - {name: b, configMap: {name: vol-cm}}
  - name: c
    projected:
      sources:
      - secret: {name: proj-secret}
      - configMap: {name: proj-cm}
      - downwardAPI: {items: [{path: labels, fieldRef: {fieldPath: metadata.labels}}]}
  - {name: d, csi: {driver: x, nodePublishSecretRef: {name: csi-secret}}}
  - {name: e, emptyDir: {}}
  initContainers:
  - name: init
    image: busybox
    envFrom: [{secretRef: {name: init-secret}}]
  containers:
  - name: main
    image: busybox
    env:
    - {name: A, valueFrom: {secretKeyRef: {name: env-secret, key: k}}}
    - {name: B, valueFrom: {configMapKeyRef: {name: env-cm, key: k}}}
    - {name: C, value: "secretName: not-a-reference"}
    envFrom: [{configMapRef: {name: from-cm}}]
"#;
        let obj = manifest::parse_document("p.yaml", &manifest::split(yaml)[0]).unwrap();
        let Some(pb::object::Kind::Pod(pod)) = obj.kind else { panic!("a pod") };
        let refs = references(pod.spec.as_ref().unwrap());
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            refs.secrets,
            set(&["csi-secret", "env-secret", "init-secret", "proj-secret", "pull", "vol-secret"])
        );
        assert_eq!(refs.config_maps, set(&["env-cm", "from-cm", "proj-cm", "vol-cm"]));
    }
}
