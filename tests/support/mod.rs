//! Shared test harness: Kubernetes object fixtures, snapshots built by the real
//! translation, echo upstreams and a proxy on 127.0.0.1:0, and small raw-socket
//! helpers for what HTTP clients refuse to send.
#![allow(dead_code)]

pub mod child;
pub mod data_path;
pub mod raw;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use portcullis::k8s::{self, Inputs, Options};
use portcullis::metrics::Metrics;
use portcullis::model::Snapshot;
use portcullis::proxy::{Proxy, ProxyConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Generous bound for anything that should happen "eventually".
pub const EVENTUALLY: Duration = Duration::from_secs(20);

/// Whether this is a CI run (`CI` set and not `false`; `.ci/run` exports `CI=true`).
/// There a test that needs a missing tool fails instead of skipping.
pub fn under_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The path of the external tool `name` on `PATH`. When it is missing: under CI a panic
/// (CI must run every check; `install` says how to get it), elsewhere `None` after a
/// `SKIPPED` line, and the caller returns early.
pub fn require_tool(name: &str, install: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            !under_ci(),
            "`{name}` is not installed, and this is a CI run ({install})"
        );
        eprintln!(
            "SKIPPED: `{name}` is not installed ({install}); under CI this test fails instead"
        );
    }
    found
}

// ---------------------------------------------------------------------------------
// Kubernetes object fixtures

/// An Ingress under construction: `ingress("ns", "web").host("a.example").prefix("/", "svc", 80)`.
/// Paths added before any `host` go to a host-less rule.
#[derive(Debug, Clone)]
pub struct IngressBuilder {
    namespace: String,
    name: String,
    rules: Vec<(Option<String>, Vec<Value>)>,
    default_backend: Option<Value>,
    created: Option<String>,
    tls: Vec<Value>,
    annotations: serde_json::Map<String, Value>,
}

pub fn ingress(namespace: &str, name: &str) -> IngressBuilder {
    IngressBuilder {
        namespace: namespace.into(),
        name: name.into(),
        rules: Vec::new(),
        default_backend: None,
        created: None,
        tls: Vec::new(),
        annotations: serde_json::Map::new(),
    }
}

fn backend(service: &str, port: i32) -> Value {
    json!({"service": {"name": service, "port": {"number": port}}})
}

impl IngressBuilder {
    /// Starts a rule for `host`.
    pub fn host(mut self, host: &str) -> Self {
        self.rules.push((Some(host.into()), Vec::new()));
        self
    }

    fn path(mut self, path: &str, path_type: &str, service: &str, port: i32) -> Self {
        if self.rules.is_empty() {
            self.rules.push((None, Vec::new()));
        }
        if let Some((_, paths)) = self.rules.last_mut() {
            paths.push(
                json!({"path": path, "pathType": path_type, "backend": backend(service, port)}),
            );
        }
        self
    }

    pub fn prefix(self, path: &str, service: &str, port: i32) -> Self {
        self.path(path, "Prefix", service, port)
    }

    pub fn exact(self, path: &str, service: &str, port: i32) -> Self {
        self.path(path, "Exact", service, port)
    }

    pub fn default_backend(mut self, service: &str, port: i32) -> Self {
        self.default_backend = Some(backend(service, port));
        self
    }

    /// A `spec.tls` entry: `hosts` (none: the Ingress' own rule hosts) served with the
    /// Secret `secret` of the Ingress' namespace.
    pub fn tls(mut self, hosts: &[&str], secret: &str) -> Self {
        let mut entry = json!({"secretName": secret});
        if !hosts.is_empty() {
            entry["hosts"] = json!(hosts);
        }
        self.tls.push(entry);
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), json!(value));
        self
    }

    /// `creationTimestamp`, RFC 3339.
    pub fn created(mut self, ts: &str) -> Self {
        self.created = Some(ts.into());
        self
    }

    pub fn build(&self) -> Ingress {
        let rules: Vec<Value> = self
            .rules
            .iter()
            .map(|(host, paths)| {
                let mut rule = json!({"http": {"paths": paths}});
                if let Some(h) = host {
                    rule["host"] = json!(h);
                }
                rule
            })
            .collect();
        let mut spec = json!({"rules": rules});
        if let Some(b) = &self.default_backend {
            spec["defaultBackend"] = b.clone();
        }
        if !self.tls.is_empty() {
            spec["tls"] = json!(self.tls);
        }
        let mut metadata = json!({"namespace": self.namespace, "name": self.name});
        if !self.annotations.is_empty() {
            metadata["annotations"] = Value::Object(self.annotations.clone());
        }
        if let Some(ts) = &self.created {
            metadata["creationTimestamp"] = json!(ts);
        }
        from_json(
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": metadata, "spec": spec}),
        )
    }
}

/// A ClusterIP Service with one unnamed port whose targetPort is the same number.
pub fn service(namespace: &str, name: &str, port: i32) -> Service {
    from_json(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"type": "ClusterIP", "ports": [{"port": port, "targetPort": port, "protocol": "TCP"}]}
    }))
}

/// An ExternalName Service pointing at `host`, with one port.
pub fn external_name(namespace: &str, name: &str, host: &str, port: i32) -> Service {
    from_json(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"type": "ExternalName", "externalName": host, "ports": [{"port": port}]}
    }))
}

/// EndpointSlices for `service` with the given ready endpoints. Each address gets its
/// own slice, since a slice has one port list and test upstreams listen on different
/// ports.
pub fn slice(namespace: &str, service: &str, addrs: &[SocketAddr]) -> Vec<EndpointSlice> {
    slice_with(namespace, service, addrs, true)
}

/// Like [`slice`], with every endpoint's `ready` condition set to `ready`.
pub fn slice_with(
    namespace: &str,
    service: &str,
    addrs: &[SocketAddr],
    ready: bool,
) -> Vec<EndpointSlice> {
    addrs
        .iter()
        .map(|a| {
            from_json(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {
                    "namespace": namespace,
                    "name": format!("{service}-{}", a.port()),
                    "labels": {"kubernetes.io/service-name": service}
                },
                "addressType": if a.is_ipv4() { "IPv4" } else { "IPv6" },
                "ports": [{"port": a.port(), "protocol": "TCP"}],
                "endpoints": [{"addresses": [a.ip().to_string()], "conditions": {"ready": ready, "serving": ready}}]
            }))
        })
        .collect()
}

/// A `kubernetes.io/tls` Secret with the given PEM chain and key.
pub fn tls_secret(namespace: &str, name: &str, cert_pem: &str, key_pem: &str) -> Secret {
    from_json(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"namespace": namespace, "name": name},
        "stringData": {"tls.crt": cert_pem, "tls.key": key_pem}
    }))
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("fixture is a valid Kubernetes object")
}

/// The objects of a test cluster.
#[derive(Debug, Clone, Default)]
pub struct World {
    pub ingresses: Vec<Ingress>,
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub secrets: Vec<Secret>,
}

impl World {
    pub fn new() -> World {
        World::default()
    }

    pub fn ingress(mut self, b: IngressBuilder) -> Self {
        self.ingresses.push(b.build());
        self
    }

    pub fn service(mut self, s: Service) -> Self {
        self.services.push(s);
        self
    }

    pub fn secret(mut self, s: Secret) -> Self {
        self.secrets.push(s);
        self
    }

    pub fn slices(mut self, s: Vec<EndpointSlice>) -> Self {
        self.slices.extend(s);
        self
    }

    /// A Service `ns/name` on `port` with `addrs` as its ready endpoints.
    pub fn backend(self, ns: &str, name: &str, port: i32, addrs: &[SocketAddr]) -> Self {
        self.service(service(ns, name, port))
            .slices(slice(ns, name, addrs))
    }

    /// The snapshot the real translation builds, in file mode (class assumed, loopback
    /// endpoints allowed). Generation 0.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_with(Options {
            assume_class: true,
            allow_local_endpoints: true,
            ..Default::default()
        })
    }

    /// The snapshot the real translation builds with `options`. Generation 0.
    pub fn snapshot_with(&self, options: Options) -> Snapshot {
        let inputs = Inputs {
            ingresses: self.ingresses.iter().cloned().map(Arc::new).collect(),
            services: self.services.iter().cloned().map(Arc::new).collect(),
            endpoint_slices: self.slices.iter().cloned().map(Arc::new).collect(),
            secrets: self.secrets.iter().cloned().map(Arc::new).collect(),
            ..Default::default()
        };
        k8s::build(&inputs, &options)
    }
}

// ---------------------------------------------------------------------------------
// Running things

/// Stops its task when dropped.
pub struct Stopper {
    tx: watch::Sender<bool>,
}

impl Stopper {
    pub fn new() -> (Stopper, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (Stopper { tx }, rx)
    }

    pub fn stop(&self) {
        let _ = self.tx.send(true);
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        let _ = self.tx.send(true);
    }
}

/// An echo upstream on 127.0.0.1:0.
pub struct Echo {
    pub addr: SocketAddr,
    pub name: String,
    _stop: Stopper,
}

pub async fn start_echo(name: &str) -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    let (stop, rx) = Stopper::new();
    tokio::spawn(portcullis::echo::serve(listener, name.to_string(), rx));
    Echo {
        addr,
        name: name.to_string(),
        _stop: stop,
    }
}

/// A proxy on 127.0.0.1:0 with its snapshot store and metrics.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub proxy: Proxy,
    stop: Stopper,
    task: JoinHandle<()>,
}

/// A proxy serving `snapshot` with the default settings, except that ExternalNames
/// may resolve to loopback, as in file mode (which [`World::snapshot`] translates in).
pub async fn start_proxy(snapshot: Snapshot) -> TestProxy {
    let cfg = ProxyConfig {
        endpoint_policy: portcullis::model::safety::EndpointPolicy {
            allow_local: true,
            ..Default::default()
        },
        ..ProxyConfig::default()
    };
    start_proxy_with(snapshot, cfg).await
}

pub async fn start_proxy_with(mut snapshot: Snapshot, cfg: ProxyConfig) -> TestProxy {
    // Test clients (reqwest included) build rustls configurations from the process default.
    portcullis::tls::install_default_provider();
    snapshot.generation = 1;
    let snapshots = Arc::new(ArcSwap::from_pointee(snapshot));
    let metrics = Metrics::new();
    let proxy = Proxy::new(cfg, snapshots.clone(), metrics.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy address");
    let (stop, rx) = Stopper::new();
    let task = {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.serve_http(listener, rx).await })
    };
    TestProxy {
        addr,
        snapshots,
        metrics,
        proxy,
        stop,
        task,
    }
}

impl TestProxy {
    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Publishes `snapshot` as the next generation.
    pub fn publish(&self, mut snapshot: Snapshot) {
        snapshot.generation = self.snapshots.load().generation + 1;
        self.snapshots.store(Arc::new(snapshot));
    }

    /// Asks the proxy to stop and waits until it has drained.
    pub async fn shutdown(self) {
        self.stop.stop();
        tokio::time::timeout(EVENTUALLY, self.task)
            .await
            .expect("proxy drains in time")
            .expect("proxy task did not panic");
    }
}

/// An HTTP/1.1 client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    portcullis::tls::install_default_provider();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("build reqwest client")
}

/// What the echo upstream reported.
#[derive(Debug, serde::Deserialize)]
pub struct EchoSeen {
    pub name: String,
    pub method: String,
    pub path: String,
    pub uri: String,
    pub host: String,
    pub version: String,
    pub headers: serde_json::Map<String, Value>,
    pub body_bytes: u64,
}

impl EchoSeen {
    /// A single-valued header as the upstream saw it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(Value::as_str)
    }
}

/// GET `path` on the proxy with `Host: host`; returns status, headers and body.
pub async fn get(
    proxy: &TestProxy,
    host: &str,
    path: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let resp = client()
        .get(proxy.url(path))
        .header("host", host)
        .send()
        .await
        .expect("request reaches the proxy");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await.expect("read body");
    (status, headers, body)
}

/// GET through the proxy expecting an echo answer.
pub async fn get_echo(proxy: &TestProxy, host: &str, path: &str) -> EchoSeen {
    let (status, _, body) = get(proxy, host, path).await;
    assert_eq!(status, 200, "body: {body}");
    serde_json::from_str(&body).expect("echo JSON")
}

// ---------------------------------------------------------------------------------
// Raw sockets

/// Sends `request` bytes on a new connection and reads until the peer closes the
/// connection, which must happen within [`EVENTUALLY`]. Returns everything read,
/// lossily as text. A reset counts as closing.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write request");
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let read_all = async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(EVENTUALLY, read_all)
        .await
        .expect("the peer closes the connection in time");
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1 response.
pub fn raw_status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

/// The body of a raw HTTP/1 response with Content-Length framing.
pub fn raw_body(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
}

/// Reads a request head (up to the blank line); `None` if the peer closed or failed first.
pub async fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(buf)
}

/// An upstream that answers every connection with `response` (after reading the
/// request head) and closes. For answers no well-behaved server gives.
pub async fn start_canned(response: &'static [u8]) -> (SocketAddr, Stopper) {
    raw::start_scripted(vec![raw::Step::Write(response), raw::Step::Close]).await
}

/// An upstream that accepts connections and never answers.
pub async fn start_silent() -> (SocketAddr, Stopper) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind silent");
    let addr = listener.local_addr().expect("silent address");
    let (stop, mut rx) = Stopper::new();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            tokio::select! {
                _ = rx.wait_for(|v| *v) => return,
                a = listener.accept() => if let Ok((s, _)) = a { held.push(s) },
            }
        }
    });
    (addr, stop)
}

/// A loopback port that refuses every connection while this guard lives: a socket bound
/// to it that never listens, so a connect gets a reset (`ECONNREFUSED` on Linux) and no
/// other socket, in this process or another, can take the port meanwhile.
pub struct RefusingPort {
    pub addr: SocketAddr,
    socket: socket2::Socket,
}

impl RefusingPort {
    /// The same port, now listening: the endpoint "comes back" on its address, with no
    /// moment in which anyone else could have taken it.
    pub fn into_listener(self) -> TcpListener {
        self.socket
            .listen(128)
            .expect("listen on the reserved port");
        self.socket
            .set_nonblocking(true)
            .expect("non-blocking listener");
        TcpListener::from_std(self.socket.into()).expect("tokio listener")
    }
}

/// A [`RefusingPort`] on 127.0.0.1; keep it alive for as long as the port must refuse.
pub fn refusing_port() -> RefusingPort {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("TCP socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind 127.0.0.1:0");
    let addr = socket
        .local_addr()
        .expect("bound address")
        .as_socket()
        .expect("an IP socket address");
    RefusingPort { addr, socket }
}

/// An HTTP/1.1 keep-alive upstream answering every request head with `200 ok`, that
/// reports each connection the proxy closes on the returned channel (by its peer
/// address).
pub async fn start_keepalive_watch() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<SocketAddr>,
    Stopper,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, mut rx) = Stopper::new();
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut s, peer) = tokio::select! {
                _ = rx.wait_for(|v| *v) => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => {
                            let _ = closed_tx.send(peer);
                            return;
                        }
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    (addr, closed_rx, stop)
}

/// An upstream that, for its first request, reports the request head's arrival on
/// `arrived` and answers `200 ok` only once `release` fires.
pub async fn start_gated() -> (
    SocketAddr,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (arrived_tx, arrived_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        if read_head(&mut s).await.is_none() {
            return;
        }
        let _ = arrived_tx.send(());
        let _ = release_rx.await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    (addr, arrived_rx, release_tx)
}
