//! Probes and lifecycle hooks, as the kubelet runs them.
//!
//! A probe is exec (in the container, through the runtime), httpGet (a 2xx or 3xx answer,
//! TLS without verification for HTTPS), tcpSocket (a connection) or grpc (the standard
//! health service saying SERVING). Connections to the pod start in the node's network
//! namespace. `Prober` keeps each probe's counters: a probe runs when due (after its
//! initial delay, then every period, one run at a time), and its result flips after
//! `successThreshold` successes or `failureThreshold` failures in a row.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::network::NodeNetwork;
use crate::agent::runtime::Runtime;
use crate::proto::v1 as pb;

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

impl Kind {
    pub fn word(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
        }
    }
}

/// A handler's target: the pod's address and the container's ports and runtime id.
#[derive(Clone)]
pub struct Target {
    pub pod_ip: String,
    pub container_id: String,
    pub container: pb::Container,
}

/// The handler of a probe or a hook (the fields they share).
#[derive(Clone, Default)]
pub struct Handler {
    pub exec: Option<pb::ExecAction>,
    pub http_get: Option<pb::HttpGetAction>,
    pub tcp_socket: Option<pb::TcpSocketAction>,
    pub grpc: Option<pb::GrpcAction>,
    pub sleep_seconds: Option<i64>,
}

impl From<&pb::Probe> for Handler {
    fn from(p: &pb::Probe) -> Handler {
        Handler {
            exec: p.exec.clone(),
            http_get: p.http_get.clone(),
            tcp_socket: p.tcp_socket.clone(),
            grpc: p.grpc.clone(),
            sleep_seconds: None,
        }
    }
}

impl From<&pb::LifecycleHandler> for Handler {
    fn from(h: &pb::LifecycleHandler) -> Handler {
        Handler {
            exec: h.exec.clone(),
            http_get: h.http_get.clone(),
            tcp_socket: h.tcp_socket.clone(),
            grpc: None,
            sleep_seconds: h.sleep.as_ref().map(|s| s.seconds),
        }
    }
}

/// A port by number or by the name of one of the container's ports.
fn port(p: Option<&crate::api::IntOrString>, c: &pb::Container) -> Result<u16, String> {
    use crate::api::int_or_string::Value;
    match p.and_then(|p| p.value.as_ref()) {
        Some(Value::IntVal(n)) if (1..=65535).contains(n) => Ok(*n as u16),
        Some(Value::StrVal(s)) => match s.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => c
                .ports
                .iter()
                .find(|cp| cp.name == *s)
                .map(|cp| cp.container_port as u16)
                .ok_or_else(|| format!("port {s:?} is not a port of container {:?}", c.name)),
        },
        other => Err(format!("invalid port {other:?}")),
    }
}

/// Connects to `host:port` from the node's network namespace.
async fn connect(
    net: Option<&NodeNetwork>,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, String> {
    let addr: std::net::SocketAddr =
        format!("{host}:{port}").parse().map_err(|e| format!("address {host}:{port}: {e}"))?;
    let netns = net.and_then(|n| n.cni.host_netns.clone());
    let std = tokio::task::spawn_blocking(move || -> Result<std::net::TcpStream, String> {
        let dial =
            move || std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("dial tcp {addr}: {e}"));
        match netns {
            Some(ns) => crate::agent::network::netns::run_in(&ns, dial).map_err(|e| e.to_string())?,
            None => dial(),
        }
    })
    .await
    .map_err(|e| e.to_string())??;
    std.set_nonblocking(true).map_err(|e| e.to_string())?;
    tokio::net::TcpStream::from_std(std).map_err(|e| e.to_string())
}

/// Certificates are not checked, as the kubelet does not check them for probes.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An HTTP GET: Ok with the status line when the code is 200..400.
async fn http_get(
    net: Option<&NodeNetwork>,
    t: &Target,
    h: &pb::HttpGetAction,
    timeout: Duration,
) -> Result<String, String> {
    let host = if h.host.is_empty() { t.pod_ip.clone() } else { h.host.clone() };
    let port = port(h.port.as_ref(), &t.container)?;
    let path = if h.path.is_empty() { "/".to_string() } else { h.path.clone() };
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n");
    for hd in &h.http_headers {
        request.push_str(&format!("{}: {}\r\n", hd.name, hd.value));
    }
    request.push_str("\r\n");
    let run = async {
        let tcp = connect(net, &host, port, timeout).await?;
        let mut head = Vec::new();
        if h.scheme.eq_ignore_ascii_case("https") {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
            let _ = (&mut tls).take(4096).read_to_end(&mut head).await;
        } else {
            let mut tcp = tcp;
            tcp.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
            let _ = (&mut tcp).take(4096).read_to_end(&mut head).await;
        }
        let text = String::from_utf8_lossy(&head);
        let line = text.lines().next().unwrap_or_default().to_string();
        let code: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no HTTP answer from {host}:{port}"))?;
        if (200..400).contains(&code) {
            Ok(line)
        } else {
            Err(format!("HTTP probe failed with statuscode: {code}"))
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("Get \"http://{host}:{port}{path}\": context deadline exceeded"))?
}

async fn grpc_check(
    net: Option<&NodeNetwork>,
    t: &Target,
    g: &pb::GrpcAction,
    timeout: Duration,
) -> Result<String, String> {
    let port = u16::try_from(g.port).map_err(|_| format!("invalid port {}", g.port))?;
    let tcp = connect(net, &t.pod_ip, port, timeout).await?;
    let slot = Arc::new(Mutex::new(Some(tcp)));
    let connector = tower::service_fn(move |_: http::Uri| {
        let s = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        async move {
            s.map(hyper_util::rt::TokioIo::new).ok_or_else(|| std::io::Error::other("the probe's connection was used"))
        }
    });
    let run = async {
        let channel = tonic::transport::Endpoint::from_static("http://probe")
            .connect_with_connector(connector)
            .await
            .map_err(|e| e.to_string())?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let req = tonic_health::pb::HealthCheckRequest { service: g.service.clone().unwrap_or_default() };
        let status =
            client.check(req).await.map_err(|s| format!("rpc error: code = {:?} desc = {}", s.code(), s.message()))?;
        let serving =
            status.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        if serving {
            Ok("SERVING".to_string())
        } else {
            Err("service unhealthy (responded with \"NOT_SERVING\")".to_string())
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("timeout: health rpc did not complete within {timeout:?}"))?
}

/// Runs `h` against `t` once: Ok, or why it failed (the kubelet's wording where it has one).
pub async fn run(
    rt: &dyn Runtime,
    net: Option<&NodeNetwork>,
    t: &Target,
    h: &Handler,
    timeout: Duration,
) -> Result<(), String> {
    if let Some(e) = &h.exec {
        let (code, out, err) = crate::agent::runtime::exec_sync(rt, &t.container_id, e.command.clone(), timeout)
            .await
            .map_err(|e| e.to_string())?;
        return if code == 0 {
            Ok(())
        } else {
            let output = String::from_utf8_lossy(&[out, err].concat()).trim().to_string();
            Err(format!("command {:?} exited with {code}: {output}", e.command.join(" ")))
        };
    }
    // A hollow node has no network to reach the pod on: its probes pass.
    if net.is_none() && h.sleep_seconds.is_none() {
        return Ok(());
    }
    if let Some(g) = &h.http_get {
        return http_get(net, t, g, timeout).await.map(|_| ());
    }
    if let Some(s) = &h.tcp_socket {
        let host = if s.host.is_empty() { t.pod_ip.clone() } else { s.host.clone() };
        let p = port(s.port.as_ref(), &t.container)?;
        return connect(net, &host, p, timeout).await.map(|_| ());
    }
    if let Some(g) = &h.grpc {
        return grpc_check(net, t, g, timeout).await.map(|_| ());
    }
    if let Some(s) = h.sleep_seconds {
        tokio::time::sleep(Duration::from_secs(s.max(0) as u64).min(timeout)).await;
        return Ok(());
    }
    Err("the handler names no action".into())
}

/// One probe's counters.
#[derive(Debug, Clone)]
struct State {
    next: Instant,
    running: bool,
    successes: u32,
    failures: u32,
    /// None until the first result flips it.
    result: Option<bool>,
    message: String,
}

/// The probes of every container on the node, by (runtime container id, kind).
#[derive(Default)]
pub struct Prober {
    states: Mutex<HashMap<(String, Kind), State>>,
}

fn or(v: i32, default: i32) -> i32 {
    if v > 0 {
        v
    } else {
        default
    }
}

/// What a probe says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// None: not decided yet (no run finished since the container started).
    pub ok: Option<bool>,
    /// The last failure's message.
    pub message: String,
}

impl Prober {
    /// Runs probe `kind` of the container if it is due (in the background), and says what
    /// it says so far. `started` is when the container started.
    pub fn check(
        self: &Arc<Self>,
        kind: Kind,
        probe: &pb::Probe,
        target: Target,
        started: std::time::SystemTime,
        rt: Arc<dyn Runtime>,
        net: Option<NodeNetwork>,
    ) -> Verdict {
        let key = (target.container_id.clone(), kind);
        let now = Instant::now();
        let since_start = std::time::SystemTime::now().duration_since(started).unwrap_or_default();
        let initial = Duration::from_secs(probe.initial_delay_seconds.max(0) as u64);
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let state = states.entry(key.clone()).or_insert_with(|| State {
            next: now + initial.saturating_sub(since_start),
            running: false,
            successes: 0,
            failures: 0,
            result: None,
            message: String::new(),
        });
        let verdict = Verdict { ok: state.result, message: state.message.clone() };
        // A startup probe that succeeded is done for the container's life.
        let done = kind == Kind::Startup && state.result == Some(true);
        if done || state.running || now < state.next {
            return verdict;
        }
        state.running = true;
        let period = Duration::from_secs(or(probe.period_seconds, 10) as u64);
        let timeout = Duration::from_secs(or(probe.timeout_seconds, 1) as u64);
        let (success_threshold, failure_threshold) =
            (or(probe.success_threshold, 1) as u32, or(probe.failure_threshold, 3) as u32);
        let handler = Handler::from(probe);
        let me = self.clone();
        tokio::spawn(async move {
            let result = run(rt.as_ref(), net.as_ref(), &target, &handler, timeout).await;
            let mut states = me.states.lock().unwrap_or_else(|p| p.into_inner());
            let Some(s) = states.get_mut(&key) else { return };
            s.running = false;
            s.next = Instant::now() + period;
            match result {
                Ok(()) => {
                    s.failures = 0;
                    s.successes += 1;
                    if s.successes >= success_threshold {
                        s.result = Some(true);
                    }
                }
                Err(m) => {
                    s.successes = 0;
                    s.failures += 1;
                    s.message = format!("{} probe failed: {m}", kind.word());
                    if s.failures >= failure_threshold {
                        s.result = Some(false);
                    }
                }
            }
        });
        verdict
    }

    /// Forgets the probes of containers not in `alive`.
    pub fn retain(&self, alive: &std::collections::HashSet<String>) {
        self.states.lock().unwrap_or_else(|p| p.into_inner()).retain(|(id, _), _| alive.contains(id));
    }

    /// Forgets one container's probe (after acting on its failure).
    pub fn reset(&self, container_id: &str, kind: Kind) {
        self.states.lock().unwrap_or_else(|p| p.into_inner()).remove(&(container_id.to_string(), kind));
    }
}
