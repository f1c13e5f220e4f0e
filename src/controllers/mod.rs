//! Control loops. Each is an ordinary client of the API: it reads through shared informers
//! and writes through `client`, so it can run on any replica or in a process of its own.
//! The controller manager (`runtime::manager`) runs them on the replica that holds its Lease.

pub mod namespace;
pub mod nodeipam;
pub mod runtime;

use crate::client::Client;

/// The controller manager with every built-in controller registered.
pub fn manager(client: Client, config: runtime::ManagerConfig) -> runtime::ControllerManager {
    let ipam = nodeipam::NodeIpamController::new(&config.cluster_cidr, config.node_cidr_mask_size);
    let mut m = runtime::ControllerManager::new(client, config);
    m.register(namespace::NamespaceController::default());
    match ipam {
        Ok(c) => m.register(c),
        Err(e) => tracing::error!(error = %e, "the node IPAM controller does not run: Nodes get no podCIDR"),
    }
    m
}
