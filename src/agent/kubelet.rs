//! The agent's own port (`--kubelet-port`, 10250): logs and exec of the node's pods, for
//! replicas only. It serves mutual TLS with the node's certificate (renewed in place) and
//! refuses every caller whose certificate does not name a replica: users reach it through a
//! replica's `Pods` service, which checks who they are.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::logs;
use super::pods::PodWorkers;
use super::runtime::{
    ContainerInfo, ContainerState, ExecRequest, Runtime, LABEL_ATTEMPT, LABEL_CONTAINER, LABEL_POD_UID,
};
use crate::pki::LiveCredentials;
use crate::proto::v1 as pb;

pub struct KubeletService {
    workers: Arc<PodWorkers>,
    runtime: Arc<dyn Runtime>,
    log_max_files: u32,
}

/// The pod `namespace/name` on this node and its container `name` (the only one when empty).
fn resolve(workers: &PodWorkers, namespace: &str, pod: &str, container: &str) -> Result<(pb::Pod, String), Status> {
    let ns = if namespace.is_empty() { "default" } else { namespace };
    let p = workers.pod_by_name(ns, pod).ok_or_else(|| Status::not_found(format!("pods {pod:?} not found")))?;
    let spec = p.spec.clone().unwrap_or_default();
    let names: Vec<&str> = spec.containers.iter().chain(&spec.init_containers).map(|c| c.name.as_str()).collect();
    let name = if container.is_empty() {
        match spec.containers.as_slice() {
            [one] => one.name.clone(),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "a container name must be specified for pod {pod}, choose one of: [{}]",
                    names.join(" ")
                )))
            }
        }
    } else if names.contains(&container) {
        container.to_string()
    } else {
        return Err(Status::invalid_argument(format!(
            "container {container} is not valid for pod {pod}, choose one of: [{}]",
            names.join(" ")
        )));
    };
    Ok((p, name))
}

fn attempt(c: &ContainerInfo) -> u32 {
    c.label(LABEL_ATTEMPT).parse().unwrap_or(0)
}

impl KubeletService {
    async fn containers_of(&self, uid: &str, name: &str) -> Result<Vec<ContainerInfo>, Status> {
        let all = self.runtime.containers().await.map_err(|e| Status::unavailable(e.to_string()))?;
        let mut out: Vec<ContainerInfo> =
            all.into_iter().filter(|c| c.label(LABEL_POD_UID) == uid && c.label(LABEL_CONTAINER) == name).collect();
        out.sort_by_key(attempt);
        Ok(out)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::kubelet_server::Kubelet for KubeletService {
    type LogsStream = BoxStream<pb::LogChunk>;

    async fn logs(&self, request: Request<pb::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let r = request.into_inner();
        let (pod, name) = resolve(&self.workers, &r.namespace, &r.pod, &r.container)?;
        let uid = pod.metadata.clone().unwrap_or_default().uid;
        let attempts = self.containers_of(&uid, &name).await?;
        let newest = attempts.last().map(attempt);
        let wanted = match (newest, r.previous) {
            (Some(a), false) => a,
            (Some(a), true) if a > 0 => a - 1,
            (_, true) => {
                return Err(Status::invalid_argument(format!(
                    "previous terminated container {name:?} in pod {:?} not found",
                    r.pod
                )))
            }
            (None, false) => {
                return Err(Status::invalid_argument(format!(
                    "container {name:?} in pod {:?} is waiting to start",
                    r.pod
                )))
            }
        };
        let path = self.workers.log_path(&uid, &name, wanted);
        let opts = logs::ReadOptions {
            tail_lines: r.tail_lines.map(|n| n.max(0) as usize),
            since: r.since_seconds.map(|s| SystemTime::now() - Duration::from_secs(s.max(0) as u64)),
            timestamps: r.timestamps,
            limit_bytes: r.limit_bytes.map(|n| n.max(0) as usize),
        };
        let (data, offset) = {
            let (p, m, o) = (path.clone(), self.log_max_files, opts.clone());
            tokio::task::spawn_blocking(move || logs::read(&p, m, &o))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
        if !data.is_empty() {
            let _ = tx.send(data).await;
        }
        let running_id = attempts
            .iter()
            .find(|c| attempt(c) == wanted && matches!(c.state, ContainerState::Running { .. }))
            .map(|c| c.id.clone());
        if let (true, Some(id)) = (r.follow && !r.previous && r.limit_bytes.is_none(), running_id) {
            let rt = self.runtime.clone();
            tokio::spawn(logs::follow(path, offset, r.timestamps, tx, move || {
                let (rt, id) = (rt.clone(), id.clone());
                Box::pin(async move {
                    rt.containers().await.is_ok_and(|cs| {
                        !cs.iter().any(|c| c.id == id && matches!(c.state, ContainerState::Running { .. }))
                    })
                })
            }));
        }
        let out = ReceiverStream::new(rx).map(|data| Ok(pb::LogChunk { data }));
        Ok(Response::new(Box::pin(out)))
    }

    type ExecStream = BoxStream<pb::ExecOutput>;

    async fn exec(&self, request: Request<Streaming<pb::ExecInput>>) -> Result<Response<Self::ExecStream>, Status> {
        use pb::exec_input::Input;
        use pb::exec_output::Output;
        let mut input = request.into_inner();
        let Some(pb::ExecInput { input: Some(Input::Start(start)) }) = input.message().await? else {
            return Err(Status::invalid_argument("an exec starts with what to run"));
        };
        if start.command.is_empty() {
            return Err(Status::invalid_argument("you must specify at least one command for the container"));
        }
        let (pod, name) = resolve(&self.workers, &start.namespace, &start.pod, &start.container)?;
        let uid = pod.metadata.clone().unwrap_or_default().uid;
        let running = self
            .containers_of(&uid, &name)
            .await?
            .into_iter()
            .rev()
            .find(|c| matches!(c.state, ContainerState::Running { .. }))
            .ok_or_else(|| {
                Status::failed_precondition(format!("container {name} is not running in pod {}", start.pod))
            })?;
        let size = start.size.filter(|s| s.width > 0 && s.height > 0).map(|s| (s.width, s.height));
        let req = ExecRequest { cmd: start.command.clone(), tty: start.tty, stdin: start.stdin, size };
        let exec = self.runtime.exec(&running.id, req).await.map_err(|e| Status::failed_precondition(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ExecOutput, Status>>(32);
        let pump = |mut r: super::runtime::Reader,
                    tx: tokio::sync::mpsc::Sender<Result<pb::ExecOutput, Status>>,
                    err: bool| async move {
            let mut buf = vec![0u8; 32 << 10];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let data = buf[..n].to_vec();
                        let output = if err { Output::Stderr(data) } else { Output::Stdout(data) };
                        if tx.send(Ok(pb::ExecOutput { output: Some(output) })).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        let out_task = tokio::spawn(pump(exec.stdout, tx.clone(), false));
        let err_task = exec.stderr.map(|e| tokio::spawn(pump(e, tx.clone(), true)));
        let (rt, cid, eid) = (self.runtime.clone(), running.id.clone(), exec.id.clone());
        let mut stdin = exec.stdin;
        let input_task = tokio::spawn(async move {
            while let Ok(Some(msg)) = input.message().await {
                match msg.input {
                    Some(Input::Stdin(data)) => {
                        if let Some(w) = stdin.as_mut() {
                            if w.write_all(&data).await.is_err() {
                                stdin = None;
                            }
                        }
                    }
                    Some(Input::Resize(size)) => {
                        let _ = rt.resize(&cid, &eid, size.width, size.height).await;
                    }
                    Some(Input::CloseStdin(_)) => {
                        if let Some(mut w) = stdin.take() {
                            let _ = w.flush().await;
                            drop(w);
                            let _ = rt.close_stdin(&cid, &eid).await;
                        }
                    }
                    _ => {}
                }
            }
            // The caller went away: the command's input ends with it.
            if stdin.take().is_some() {
                let _ = rt.close_stdin(&cid, &eid).await;
            }
        });
        let exit = exec.exit;
        tokio::spawn(async move {
            let code = exit.await;
            // The output ends when the process's last writer closes; the code comes last.
            let _ = out_task.await;
            if let Some(t) = err_task {
                let _ = t.await;
            }
            input_task.abort();
            let msg = match code {
                Ok(c) => Ok(pb::ExecOutput { output: Some(Output::ExitCode(c)) }),
                Err(e) => Err(Status::internal(e.to_string())),
            };
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

use tokio_stream::StreamExt;

/// Only replicas call a kubelet.
#[allow(clippy::result_large_err)]
fn replicas_only(req: Request<()>) -> Result<Request<()>, Status> {
    let id = req.extensions().get::<crate::tls::PeerInfo>().and_then(|i| i.identity.clone());
    match id {
        Some(crate::pki::Identity::Replica(_)) => Ok(req),
        Some(other) => Err(Status::permission_denied(format!("{other} may not call the kubelet: only replicas may"))),
        None => Err(Status::unauthenticated("a client certificate is required")),
    }
}

/// Serves the kubelet port on `addr` until the returned task is aborted; the listener's
/// certificate follows the node's renewals.
pub async fn serve(
    addr: SocketAddr,
    creds: Arc<LiveCredentials>,
    workers: Arc<PodWorkers>,
    runtime: Arc<dyn Runtime>,
    log_max_files: u32,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), String> {
    let current = creds.get();
    let resolver = crate::tls::Resolver::new(&current).map_err(|e| e.to_string())?;
    let config = crate::tls::server_config(&current.ca_pem, resolver.clone()).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("listen on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let (incoming, acceptor) = crate::tls::incoming(listener, config);
    let service = KubeletService { workers, runtime, log_max_files };
    let task = tokio::spawn(async move {
        let renew = tokio::spawn(async move {
            let mut seen = creds.generation();
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if creds.generation() != seen {
                    seen = creds.generation();
                    if let Err(e) = resolver.replace(&creds.get()) {
                        tracing::warn!(error = %e, "the kubelet port keeps its old certificate");
                    }
                }
            }
        });
        let served = tonic::transport::Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                pb::kubelet_server::KubeletServer::new(service),
                replicas_only,
            ))
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the kubelet port stopped");
        }
        renew.abort();
        acceptor.abort();
    });
    Ok((bound, task))
}
