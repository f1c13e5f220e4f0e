//! `keel.v1.Pods`: logs and exec of pods for users, on any replica. The replica checks the
//! caller, finds the pod's node and that node's kubelet port, and calls the node's agent as
//! itself over mutual TLS, pinning the node's identity: the agent answers replicas only, and
//! the replica talks to the node the pod is on and to no other.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::auth::caller;
use super::objects::ObjectsService;
use crate::api::kinds::Kind;
use crate::pki::{Identity, LiveCredentials};
use crate::proto::v1 as pb;

pub struct PodsService {
    objects: ObjectsService,
    creds: Arc<LiveCredentials>,
}

impl PodsService {
    pub fn new(objects: ObjectsService, creds: Arc<LiveCredentials>) -> PodsService {
        PodsService { objects, creds }
    }

    /// The kubelet of the node pod `namespace/name` is on.
    async fn kubelet(
        &self,
        who: Option<&Identity>,
        namespace: &str,
        name: &str,
    ) -> Result<pb::kubelet_client::KubeletClient<tonic::transport::Channel>, Status> {
        if let Some(Identity::Node(n)) = who {
            return Err(Status::permission_denied(format!("node {n} may not read logs of, or exec in, pods")));
        }
        let ns = if namespace.is_empty() { "default" } else { namespace };
        let pod = self.objects.read_object(Kind::Pod, ns, name).await?;
        let node = crate::api::pod::node_of(&pod)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Status::invalid_argument(format!("pod {name} does not have a host assigned")))?
            .to_string();
        let node_obj = self.objects.read_object(Kind::Node, "", &node).await?;
        let Some(pb::object::Kind::Node(n)) = node_obj.kind else {
            return Err(Status::internal(format!("node {node} is not a Node")));
        };
        let status = n.status.unwrap_or_default();
        let ip = status
            .addresses
            .iter()
            .find(|a| a.r#type == "InternalIP")
            .map(|a| a.address.clone())
            .ok_or_else(|| Status::unavailable(format!("node {node} has no InternalIP address")))?;
        let port = status.daemon_endpoints.and_then(|d| d.kubelet_endpoint).map_or(0, |e| e.port);
        if port <= 0 {
            return Err(Status::unavailable(format!("node {node} reports no kubelet port")));
        }
        let config = crate::tls::pinned_client_config(&self.creds.get(), Identity::Node(node.clone()))
            .map_err(|e| Status::internal(e.to_string()))?;
        let addr = if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") };
        let channel = crate::tls::connect(&addr, config, Duration::from_secs(5))
            .await
            .map_err(|e| Status::unavailable(format!("the kubelet of node {node}: {e}")))?;
        Ok(pb::kubelet_client::KubeletClient::new(channel))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::pods_server::Pods for PodsService {
    type LogsStream = BoxStream<pb::LogChunk>;

    async fn logs(&self, request: Request<pb::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let who = caller(&request).cloned();
        let r = request.into_inner();
        let mut kubelet = self.kubelet(who.as_ref(), &r.namespace, &r.pod).await?;
        let stream = kubelet.logs(r).await?.into_inner();
        Ok(Response::new(Box::pin(stream)))
    }

    type ExecStream = BoxStream<pb::ExecOutput>;

    async fn exec(&self, request: Request<Streaming<pb::ExecInput>>) -> Result<Response<Self::ExecStream>, Status> {
        let who = caller(&request).cloned();
        let mut input = request.into_inner();
        let first =
            input.message().await?.ok_or_else(|| Status::invalid_argument("an exec starts with what to run"))?;
        let Some(pb::exec_input::Input::Start(start)) = &first.input else {
            return Err(Status::invalid_argument("an exec starts with what to run"));
        };
        let mut kubelet = self.kubelet(who.as_ref(), &start.namespace, &start.pod).await?;
        // The caller's input, after the first message, goes on to the kubelet as it comes.
        let rest = async_stream_of(input);
        let forwarded = tokio_stream::once(first).chain(rest);
        let stream = kubelet.exec(forwarded).await?.into_inner();
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The messages of `input` until it ends or fails.
fn async_stream_of(input: Streaming<pb::ExecInput>) -> impl Stream<Item = pb::ExecInput> + Send + 'static {
    futures::stream::unfold(input, |mut s| async move {
        match s.message().await {
            Ok(Some(m)) => Some((m, s)),
            _ => None,
        }
    })
}
