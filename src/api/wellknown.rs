//! Names every component agrees on: namespaces the cluster always has, finalizers and
//! annotations that one component writes and another reads.

/// The namespaces a cluster always has; they may not be deleted.
pub const DEFAULT_NAMESPACES: &[&str] = &["default", "kube-system", NODE_LEASE_NAMESPACE];

/// Where nodes keep their heartbeat Leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// Where the control plane keeps its own objects (leader Leases, its Events).
pub const SYSTEM_NAMESPACE: &str = "kube-system";

/// The spec finalizer that holds a deleted namespace until the namespace controller has
/// deleted its content.
pub const NAMESPACE_FINALIZER: &str = "kubernetes";

/// The Node annotation that says when the node's certificate ends (RFC 3339), for
/// `keelctl cluster certs`.
pub const CERT_EXPIRES_ANNOTATION: &str = "keel.dev/certificate-expires";
