//! Upstreams and helpers for the data-path tests (balancing, retries, upgrades, h2c,
//! streaming, shutdown): purpose-built upstreams on 127.0.0.1:0, and the real
//! `portcullis` binary run as a child process.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Service;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::raw::Step;
use super::{EVENTUALLY, Stopper};

/// A ClusterIP Service whose one port has `appProtocol: kubernetes.io/h2c`.
pub fn service_h2c(namespace: &str, name: &str, port: i32) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"type": "ClusterIP", "ports": [{
            "port": port, "targetPort": port, "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c"
        }]}
    }))
    .expect("fixture is a valid Service")
}

/// Serves `handler` with hyper (HTTP/1.1 and HTTP/2 prior knowledge) on 127.0.0.1:0
/// until the returned [`Stopper`] is dropped.
pub async fn start_hyper<F, Fut>(handler: F) -> (SocketAddr, Stopper)
where
    F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<
            Output = http::Response<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>,
        > + Send
        + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, mut rx) = Stopper::new();
    tokio::spawn(async move {
        loop {
            let (s, _) = tokio::select! {
                _ = rx.wait_for(|v| *v) => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, stop)
}

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A body streamed from a channel: each message is one frame.
pub fn channel_body(rx: mpsc::Receiver<Bytes>) -> TestBody {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|b| Ok::<_, std::io::Error>(Frame::data(b)));
    BodyExt::boxed(StreamBody::new(stream))
}

/// A body of `total` bytes sent as repeated clones of one `chunk` (no copying).
pub fn repeated_body(chunk: Bytes, total: usize) -> TestBody {
    let n = total / chunk.len();
    let stream = futures_util::stream::iter(
        (0..n).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    BodyExt::boxed(StreamBody::new(stream))
}

pub fn text_body(s: &'static str) -> TestBody {
    http_body_util::Full::new(Bytes::from_static(s.as_bytes()))
        .map_err(|never| match never {})
        .boxed()
}

/// A raw HTTP/1.1 upstream for the stale keep-alive race. On every connection it
/// answers the first request `200 first` with keep-alive, then reads the next request
/// head and closes the socket without a byte of response, as a server does whose
/// idle timeout fired just as the request was sent. Each connection accepted is
/// counted on the returned channel.
pub async fn start_stale_after_one() -> (SocketAddr, mpsc::UnboundedReceiver<()>, Stopper) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, mut rx) = Stopper::new();
    let (accepted_tx, accepted_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = tokio::select! {
                _ = rx.wait_for(|v| *v) => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let _ = accepted_tx.send(());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut answered = false;
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        if answered {
                            // The second request: close without answering.
                            return;
                        }
                        buf.drain(..end + 4);
                        answered = true;
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                            .await;
                    }
                }
            });
        }
    });
    (addr, accepted_rx, stop)
}

/// A raw HTTP/1.1 keep-alive upstream for the pool tests: it answers every request head
/// with `200` and `body`, counts the connections it accepts, and, with `close_idle`,
/// closes a connection that stays idle that long after a response (as a backend with a
/// short keep-alive timeout does), reporting each such close on `closed`.
pub struct Counted {
    pub addr: SocketAddr,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub closed: mpsc::UnboundedReceiver<()>,
    _stop: Stopper,
}

impl Counted {
    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

pub async fn start_counted(body: &'static str, close_idle: Option<Duration>) -> Counted {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, mut rx) = Stopper::new();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = tokio::select! {
                _ = rx.wait_for(|v| *v) => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut answered = false;
                loop {
                    let read = match close_idle {
                        Some(idle) if answered && buf.is_empty() => {
                            match tokio::time::timeout(idle, s.read(&mut chunk)).await {
                                Ok(r) => r,
                                Err(_) => {
                                    let _ = s.shutdown().await;
                                    drop(s);
                                    let _ = closed_tx.send(());
                                    return;
                                }
                            }
                        }
                        _ => s.read(&mut chunk).await,
                    };
                    match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        answered = true;
                        if s.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Counted {
        addr,
        accepted,
        closed,
        _stop: stop,
    }
}

/// An upstream that answers every request with headers (`x-name: slow`, a declared
/// length of 10) and then never sends the body.
pub async fn start_headers_only() -> (SocketAddr, Stopper) {
    super::raw::start_scripted(vec![
        Step::Write(b"HTTP/1.1 200 OK\r\nx-name: slow\r\nContent-Length: 10\r\n\r\n"),
        // Hold the connection open until the proxy closes it.
        Step::Hold,
    ])
    .await
}

/// A WebSocket echo upstream (tokio-tungstenite): every text or binary message comes
/// back as sent.
pub async fn start_ws_echo() -> (SocketAddr, Stopper) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, mut rx) = Stopper::new();
    tokio::spawn(async move {
        loop {
            let (s, _) = tokio::select! {
                _ = rx.wait_for(|v| *v) => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if ws.send(msg).await.is_err() {
                            return;
                        }
                    } else if msg.is_close() {
                        return;
                    }
                }
            });
        }
    });
    (addr, stop)
}

// ---------------------------------------------------------------------------------
// The real binary

/// `portcullis run` as a child process, killed when dropped.
pub struct Binary {
    pub child: Child,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// Every line the process wrote to standard error so far.
    logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    /// Starts `portcullis run --manifests dir` with every listener on 127.0.0.1:0 and
    /// `extra` flags; returns once the listeners are bound (read from the JSON log).
    pub fn start(dir: &Path, extra: &[&str]) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("run")
            .arg("--manifests")
            .arg(dir)
            .args(super::child::LOOPBACK_LISTENERS)
            .args(["--log-format", "json"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start portcullis");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                kept.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line.clone());
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["message"] == "listening"
                    && let (Some(name), Some(port)) = (v["listener"].as_str(), v["port"].as_u64())
                {
                    let _ = tx.send((name.to_string(), port as u16));
                }
            }
        });
        let mut http = None;
        let mut admin = None;
        while http.is_none() || admin.is_none() {
            let (name, port) = rx
                .recv_timeout(EVENTUALLY)
                .expect("portcullis logs its listeners in time");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match name.as_str() {
                "http" => http = Some(addr),
                "admin" => admin = Some(addr),
                _ => {}
            }
        }
        Binary {
            child,
            http: http.expect("http listener"),
            admin: admin.expect("admin listener"),
            logs,
        }
    }

    /// The standard error lines (JSON log records) written so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Sends SIGTERM with `kill`.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// The status of `GET /readyz` on the admin listener.
    pub async fn readyz(&self) -> u16 {
        super::client()
            .get(format!("http://{}/readyz", self.admin))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Waits until `/readyz` answers `status`.
    pub async fn wait_ready(&self, status: u16) {
        let deadline = tokio::time::Instant::now() + EVENTUALLY;
        while self.readyz().await != status {
            assert!(
                tokio::time::Instant::now() < deadline,
                "readyz never {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Peak resident memory (`VmHWM`) of the process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self) -> i32 {
        let deadline = tokio::time::Instant::now() + EVENTUALLY;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for portcullis") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "portcullis still running"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Writes `yaml` documents into a new temporary manifest directory.
pub fn manifest_dir(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("objects.yaml"), yaml).expect("write manifests");
    dir
}

/// An Ingress for `host` → Service `name` on `port`, the Service and one EndpointSlice
/// per address, in namespace `default`, as YAML.
pub fn manifests_for(host: &str, name: &str, port: i32, addrs: &[SocketAddr]) -> String {
    let mut out = format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}}}\nspec:\n  rules:\n    - host: {host}\n      http:\n        paths:\n          - {{path: /, pathType: Prefix, backend: {{service: {{name: {name}, port: {{number: {port}}}}}}}}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: {port}, targetPort: {port}}}]\n"
    );
    for a in addrs {
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{p}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{port: {p}}}]\nendpoints:\n  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n",
            p = a.port(),
            ip = a.ip()
        ));
    }
    out
}

/// How a request body read to its end came out: its length, or why it broke off.
pub async fn body_outcome(req: http::Request<Incoming>) -> Result<usize, String> {
    req.into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .map_err(|e| e.to_string())
}

/// An upstream that answers every request at once with `answer()` and reads the
/// request body afterwards, reporting how many bytes it got (or why it failed).
pub async fn start_early_answer(
    answer: fn() -> TestBody,
) -> (
    SocketAddr,
    Stopper,
    mpsc::UnboundedReceiver<Result<usize, String>>,
) {
    let (got_tx, got_rx) = mpsc::unbounded_channel();
    let (up, stop) = start_hyper(move |req: http::Request<Incoming>| {
        let got_tx = got_tx.clone();
        async move {
            tokio::spawn(async move {
                let _ = got_tx.send(body_outcome(req).await);
            });
            http::Response::new(answer())
        }
    })
    .await;
    (up, stop, got_rx)
}
