//! The node IPAM controller: gives every Node without one a podCIDR, a block of the
//! cluster CIDR no other Node has (kube-controller-manager's range allocator). The agent
//! builds its pod network from it; a Node keeps its block for life.
//!
//! Blocks are chosen under one lock from the informer's Nodes plus the blocks this
//! controller handed out that the informer has not seen yet, so two workers never give out
//! the same block; the update carries the Node's resourceVersion, so a Node changed meanwhile
//! is looked at again.

use std::collections::HashSet;
use std::sync::Mutex;

use ipnet::Ipv4Net;

use crate::api::kinds::Kind;
use crate::proto::v1 as pb;

use super::runtime::events::reference_to;
use super::runtime::{Action, Context, Controller, ReconcileError};

pub struct NodeIpamController {
    cluster: Ipv4Net,
    mask: u8,
    /// Blocks handed out by this controller (the informer may not show them yet).
    given: Mutex<HashSet<Ipv4Net>>,
}

impl NodeIpamController {
    /// Blocks of `/mask` out of `cluster_cidr`; both checked here, so that a bad flag stops
    /// the replica at start with a message instead of every Node waiting.
    pub fn new(cluster_cidr: &str, mask: u8) -> Result<NodeIpamController, String> {
        let cluster: Ipv4Net = cluster_cidr
            .parse()
            .map_err(|e| format!("--cluster-cidr {cluster_cidr:?}: {e} (expected an IPv4 CIDR)"))?;
        if mask < cluster.prefix_len() || mask > 30 {
            return Err(format!(
                "--node-cidr-mask-size {mask}: must be between the cluster CIDR's prefix ({}) and 30",
                cluster.prefix_len()
            ));
        }
        Ok(NodeIpamController { cluster: cluster.trunc(), mask, given: Mutex::new(HashSet::new()) })
    }

    /// The first block of the cluster CIDR that is not in `used`.
    fn next_free(&self, used: &HashSet<Ipv4Net>) -> Option<Ipv4Net> {
        let subnets = self.cluster.subnets(self.mask).ok()?;
        subnets.into_iter().find(|s| !used.iter().any(|u| u.contains(&s.network()) || s.contains(&u.network())))
    }
}

fn pod_cidr(node: &pb::Node) -> Option<&str> {
    node.spec.as_ref().map(|s| s.pod_cidr.as_str()).filter(|c| !c.is_empty())
}

impl Controller for NodeIpamController {
    fn name(&self) -> &'static str {
        "nodeipam"
    }

    fn primary(&self) -> Kind {
        Kind::Node
    }

    async fn reconcile(&self, key: &str, ctx: &Context) -> Result<Action, ReconcileError> {
        let informer = ctx.informers.informer(Kind::Node);
        let Some(obj) = informer.get(key) else { return Ok(Action::Done) };
        let Some(pb::object::Kind::Node(node)) = obj.kind.clone() else { return Ok(Action::Done) };
        if pod_cidr(&node).is_some() || node.metadata.as_ref().is_some_and(|m| !m.deletion_timestamp.is_empty()) {
            return Ok(Action::Done);
        }
        let block = {
            let mut given = self.given.lock().unwrap_or_else(|p| p.into_inner());
            let mut used: HashSet<Ipv4Net> = informer
                .list()
                .iter()
                .filter_map(|o| match &o.kind {
                    Some(pb::object::Kind::Node(n)) => pod_cidr(n).and_then(|c| c.parse().ok()),
                    _ => None,
                })
                .collect();
            // What the informer shows again is no longer only ours to remember.
            given.retain(|g| !used.contains(g));
            used.extend(given.iter().copied());
            match self.next_free(&used) {
                Some(b) => {
                    given.insert(b);
                    b
                }
                None => {
                    let message = format!("no podCIDR left: every /{} block of {} is taken", self.mask, self.cluster);
                    ctx.recorder.emit(&reference_to(&obj), "Warning", "CIDRNotAvailable", &message);
                    return Err(ReconcileError::Failed(message));
                }
            }
        };
        let mut updated = node.clone();
        let spec = updated.spec.get_or_insert_with(Default::default);
        spec.pod_cidr = block.to_string();
        spec.pod_cidrs = vec![block.to_string()];
        match ctx.client.update(pb::Object { kind: Some(pb::object::Kind::Node(updated)) }).await {
            Ok(_) => {
                let message = format!("Node {key} got podCIDR {block}");
                ctx.recorder.emit(&reference_to(&obj), "Normal", "CIDRAssignmentSucceeded", &message);
                Ok(Action::Done)
            }
            Err(e) => {
                // Not assigned (or not known to be): the block is free again unless the Node
                // shows it later.
                self.given.lock().unwrap_or_else(|p| p.into_inner()).remove(&block);
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_the_first_free_ones_and_flags_are_checked() {
        let c = NodeIpamController::new("10.42.0.0/16", 24).unwrap();
        let used: HashSet<Ipv4Net> = ["10.42.0.0/24", "10.42.2.0/24"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(c.next_free(&used).unwrap().to_string(), "10.42.1.0/24");
        let full: HashSet<Ipv4Net> = ["10.42.0.0/16"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(c.next_free(&full), None);
        let e = NodeIpamController::new("10.42.0.0/16", 8).err().unwrap();
        assert!(e.contains("--node-cidr-mask-size 8"), "{e}");
        let e = NodeIpamController::new("10.42.0.0/33", 24).err().unwrap();
        assert!(e.contains("--cluster-cidr"), "{e}");
    }
}
