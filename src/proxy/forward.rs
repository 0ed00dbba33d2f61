//! Forwarding: sends a routed request to its upstream endpoint over a pooled keep-alive
//! HTTP/1.1 connection and returns the response headers, with the body still streaming.
//!
//! The pool (hyper-util's client, keyed by endpoint address) lives as long as the
//! proxy. Its connector opens TCP connections with `TCP_NODELAY` under
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
use crate::metrics::Metrics;

/// The pooled upstream client.
pub struct UpstreamClient {
    client: Client<Connector, RequestBody>,
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
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        UpstreamClient {
            client,
            response_timeout: cfg.response_timeout,
            metrics,
        }
    }

    /// Sends `req` (whose URI names the upstream endpoint) and waits for the response
    /// headers under `response_timeout`. `service` (`ns/name`) labels the upstream
    /// metrics. `body_exceeded` is the request body's over-limit flag.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        service: &str,
        body_exceeded: &AtomicBool,
    ) -> Result<Response<Incoming>, ProxyError> {
        let start = Instant::now();
        let result = tokio::time::timeout(self.response_timeout, self.client.request(req)).await;
        let resp = match result {
            Err(_elapsed) => return Err(ProxyError::UpstreamTimeout),
            Ok(Err(e)) => return Err(classify(e, body_exceeded)),
            Ok(Ok(resp)) => resp,
        };
        if let Some(timing) = resp.extensions().get::<ConnectTiming>()
            && !timing.reported.swap(true, Ordering::Relaxed)
        {
            self.metrics
                .upstream_connect_duration_seconds
                .with_label_values(&[service])
                .observe(timing.seconds);
        }
        self.metrics
            .upstream_response_duration_seconds
            .with_label_values(&[service])
            .observe(start.elapsed().as_secs_f64());
        Ok(resp)
    }
}

/// Maps an upstream client error to the answer it becomes.
fn classify(err: hyper_util::client::legacy::Error, body_exceeded: &AtomicBool) -> ProxyError {
    if body_exceeded.load(Ordering::Acquire) {
        return ProxyError::BodyTooLarge;
    }
    let root: &(dyn std::error::Error + 'static) = &err;
    if chain_has::<ConnectTimeout>(root) {
        return ProxyError::UpstreamTimeout;
    }
    if let Some(super::body::RequestBodyError::Downstream(_)) =
        find_in_chain::<super::body::RequestBodyError>(root)
    {
        return ProxyError::DownstreamBody(Box::new(err));
    }
    let reason = if err.is_connect() {
        match find_in_chain::<io::Error>(root).map(io::Error::kind) {
            Some(io::ErrorKind::ConnectionRefused) => "connection refused",
            Some(io::ErrorKind::TimedOut) => return ProxyError::UpstreamTimeout,
            _ => "connect failed",
        }
    } else if let Some(h) = find_in_chain::<hyper::Error>(root) {
        if h.is_parse() || h.is_parse_status() {
            "invalid response"
        } else if h.is_incomplete_message() {
            "connection closed before response"
        } else if h.is_timeout() {
            return ProxyError::UpstreamTimeout;
        } else if find_in_chain::<io::Error>(root)
            .is_some_and(|e| e.kind() == io::ErrorKind::ConnectionReset)
        {
            "connection reset"
        } else {
            "request failed"
        }
    } else {
        "request failed"
    };
    ProxyError::Upstream {
        reason,
        connecting: err.is_connect(),
        source: Some(Box::new(err) as BoxError),
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
