//! Forwarding: sends a routed request to its upstream endpoint over a pooled keep-alive
//! HTTP/1.1 connection and returns the response headers, with the body still streaming.
//! Failures are classified for retries and passive health ([`FailureKind`]).
//!
//! Clusters whose Service port has `appProtocol: kubernetes.io/h2c` get HTTP/2
//! cleartext with prior knowledge instead (gRPC, trailers included). The pools
//! (hyper-util's clients, keyed by endpoint address) live as long as the proxy; each
//! has an unpooled twin for the retry after a stale pooled connection. Its connector opens TCP connections with `TCP_NODELAY` under
//! `connect_timeout`, resolving ExternalName hosts at connect time, and tags each new
//! connection with how long it took to open so the first response on it can record
//! `upstream_connect_duration_seconds` under the Service that asked for it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower_service::Service;

use super::ProxyConfig;
use super::body::RequestBody;
use super::errors::{BoxError, ProxyError, chain_has, find_in_chain};
use crate::metrics::{Metrics, RouteSeries};

/// The most an HTTP/1 upstream connection reads ahead: a response body chunk waiting
/// for a slow downstream client is at most this big (hyper's default is ~400 KiB, so
/// 128 stalled HTTP/2 streams pinned 50 MiB), and it bounds an upstream response
/// head, like nginx's `proxy_buffer_size`, though far more generously.
const UPSTREAM_H1_MAX_BUF: usize = 64 * 1024;

/// How an attempt failed, as far as retries and passive health care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No connection could be opened (refused, unreachable, timed out): nothing of the
    /// request was sent, and the endpoint is to be ejected.
    Connect,
    /// A pooled connection that had already served a response was found closed (or
    /// reset) before any response byte: the stale keep-alive race.
    StaleConnection,
    /// A fresh connection was reset before a response: the endpoint is to be ejected.
    Reset,
    /// Anything else: never retried.
    Other,
}

/// A failed attempt: the answer it becomes and what kind of failure it was.
#[derive(Debug)]
pub struct Failure {
    pub error: ProxyError,
    pub kind: FailureKind,
}

/// Which upstream client an attempt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via {
    /// HTTP/2 cleartext with prior knowledge (`appProtocol: kubernetes.io/h2c`).
    pub h2c: bool,
    /// A new connection, not one from the pool (the retry after a stale connection).
    pub fresh: bool,
}

/// The upstream clients: HTTP/1.1 and h2c, each pooled and unpooled.
pub struct UpstreamClient {
    http1: Client<Connector, RequestBody>,
    http1_fresh: Client<Connector, RequestBody>,
    h2c: Client<Connector, RequestBody>,
    h2c_fresh: Client<Connector, RequestBody>,
    response_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl UpstreamClient {
    pub fn new(cfg: &ProxyConfig, metrics: Arc<Metrics>) -> UpstreamClient {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(true);
        // The connector below enforces the limit, so that a timeout is recognisable.
        http.set_connect_timeout(None);
        let connector = Connector {
            http,
            timeout: cfg.connect_timeout,
        };
        let build = |h2: bool, pooled: bool| {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(cfg.idle_timeout)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                // The Host header is always set by the handler.
                .set_host(false)
                .http1_max_buf_size(UPSTREAM_H1_MAX_BUF)
                .http2_only(h2);
            if !pooled {
                b.pool_max_idle_per_host(0);
            }
            b.build(connector.clone())
        };
        UpstreamClient {
            http1: build(false, true),
            http1_fresh: build(false, false),
            h2c: build(true, true),
            h2c_fresh: build(true, false),
            response_timeout: cfg.response_timeout,
            metrics,
        }
    }

    /// The limit for one request's response headers, across all its attempts.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// Sends `req` (whose URI names the upstream endpoint) and waits for the response
    /// headers until `deadline`. The upstream metrics go to `route`'s Service series.
    /// `body_exceeded` is the request body's over-limit flag.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        via: Via,
        route: &RouteSeries,
        body_exceeded: &AtomicBool,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Incoming>, Failure> {
        let start = Instant::now();
        let client = match (via.h2c, via.fresh) {
            (false, false) => &self.http1,
            (false, true) => &self.http1_fresh,
            (true, false) => &self.h2c,
            (true, true) => &self.h2c_fresh,
        };
        let result = tokio::time::timeout_at(deadline, client.request(req)).await;
        let resp = match result {
            Err(_elapsed) => {
                return Err(Failure {
                    error: ProxyError::UpstreamTimeout,
                    kind: FailureKind::Other,
                });
            }
            Ok(Err(e)) => return Err(classify(e, body_exceeded)),
            Ok(Ok(resp)) => resp,
        };
        if let Some(timing) = resp.extensions().get::<ConnectTiming>()
            && !timing.reported.swap(true, Ordering::Relaxed)
        {
            route
                .upstream_connect(&self.metrics)
                .observe(timing.seconds);
        }
        route
            .upstream_response(&self.metrics)
            .observe(start.elapsed().as_secs_f64());
        Ok(resp)
    }
}

/// Whether the connection an error happened on had already carried a response.
fn reused(err: &hyper_util::client::legacy::Error) -> bool {
    err.connect_info().is_some_and(|c| {
        let mut ext = http::Extensions::new();
        c.get_extras(&mut ext);
        ext.get::<ConnectTiming>()
            .is_some_and(|t| t.reported.load(Ordering::Relaxed))
    })
}

/// Maps an upstream client error to the answer it becomes and its failure kind.
fn classify(err: hyper_util::client::legacy::Error, body_exceeded: &AtomicBool) -> Failure {
    if body_exceeded.load(Ordering::Acquire) {
        return Failure {
            error: ProxyError::BodyTooLarge,
            kind: FailureKind::Other,
        };
    }
    let root: &(dyn std::error::Error + 'static) = &err;
    if chain_has::<ConnectTimeout>(root) {
        return Failure {
            error: ProxyError::UpstreamTimeout,
            kind: FailureKind::Connect,
        };
    }
    if let Some(super::body::RequestBodyError::Downstream(_)) =
        find_in_chain::<super::body::RequestBodyError>(root)
    {
        return Failure {
            error: ProxyError::DownstreamBody(Box::new(err)),
            kind: FailureKind::Other,
        };
    }
    let io_kind = find_in_chain::<io::Error>(root).map(io::Error::kind);
    let was_reused = reused(&err);
    let (reason, kind) = if err.is_connect() {
        match io_kind {
            Some(io::ErrorKind::ConnectionRefused) => ("connection refused", FailureKind::Connect),
            Some(io::ErrorKind::TimedOut) => {
                return Failure {
                    error: ProxyError::UpstreamTimeout,
                    kind: FailureKind::Connect,
                };
            }
            _ => ("connect failed", FailureKind::Connect),
        }
    } else if let Some(h) = find_in_chain::<hyper::Error>(root) {
        let reset = matches!(
            io_kind,
            Some(io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
        );
        if h.is_parse() || h.is_parse_status() {
            ("invalid response", FailureKind::Other)
        } else if h.is_incomplete_message() || h.is_canceled() {
            let kind = if was_reused {
                FailureKind::StaleConnection
            } else {
                FailureKind::Other
            };
            ("connection closed before response", kind)
        } else if h.is_timeout() {
            return Failure {
                error: ProxyError::UpstreamTimeout,
                kind: FailureKind::Other,
            };
        } else if reset {
            let kind = if was_reused {
                FailureKind::StaleConnection
            } else {
                FailureKind::Reset
            };
            ("connection reset", kind)
        } else {
            ("request failed", FailureKind::Other)
        }
    } else {
        ("request failed", FailureKind::Other)
    };
    Failure {
        error: ProxyError::Upstream {
            reason,
            connecting: err.is_connect(),
            source: Some(Box::new(err) as BoxError),
        },
        kind,
    }
}

/// Opening a connection took longer than `connect_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("upstream connect timed out")]
struct ConnectTimeout;

/// How long a pooled connection took to open; the first response on it reports it.
#[derive(Debug, Clone)]
struct ConnectTiming {
    seconds: f64,
    reported: Arc<AtomicBool>,
}

/// HTTP connector with a recognisable connect timeout and connect timing.
#[derive(Clone)]
struct Connector {
    http: HttpConnector,
    timeout: Duration,
}

impl Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http
            .poll_ready(cx)
            .map_err(|e| Box::new(e) as BoxError)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        let connecting = self.http.call(uri);
        Box::pin(async move {
            let start = Instant::now();
            match tokio::time::timeout(timeout, connecting).await {
                Err(_) => Err(Box::new(ConnectTimeout) as BoxError),
                Ok(Err(e)) => Err(Box::new(e) as BoxError),
                Ok(Ok(io)) => Ok(UpstreamIo {
                    inner: io,
                    timing: ConnectTiming {
                        seconds: start.elapsed().as_secs_f64(),
                        reported: Arc::new(AtomicBool::new(false)),
                    },
                }),
            }
        })
    }
}

/// An upstream TCP connection that carries its [`ConnectTiming`].
struct UpstreamIo {
    inner: TokioIo<TcpStream>,
    timing: ConnectTiming,
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        self.inner.connected().extra(self.timing.clone())
    }
}

impl Read for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl Write for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}
