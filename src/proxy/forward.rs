//! Forwarding: sends a routed request to its upstream endpoint and returns the response
//! headers, with the body still streaming. Failures are classified for retries and
//! passive health ([`FailureKind`]).
//!
//! HTTP/1.1 upstreams go through [`Pool`]: per endpoint (a pod address, or an
//! ExternalName's host and port), a LIFO list of idle `hyper::client::conn::http1`
//! connections. A connection goes back to its list only when its response body was read
//! to the end and hyper then reports it idle and ready for the next request; it is taken
//! again only while it is still open and has been idle for less than `idle_timeout`, and
//! is dropped (closing it) otherwise. A periodic sweep closes idle connections past the
//! limit and ones the upstream closed. New connections are opened with `TCP_NODELAY`
//! under `connect_timeout`, ExternalName hosts resolved at connect time; the first
//! response on a new connection records `upstream_connect_duration_seconds` under the
//! Service that asked for it.
//!
//! An HTTP/1 upstream connection has no task of its own: hyper's connection future
//! (its [`H1Conn`] driver) is polled by the request that holds the connection, while it
//! waits for the response head ([`Driven`]) and then from the response body's
//! `poll_frame` until the body ends. Reading the request from downstream, writing it
//! upstream, reading the response and writing it downstream so happen in the downstream
//! connection's task, without a wake-up of another task on the way, as in an
//! event-loop proxy. An idle pooled connection is polled by nobody: a close by the
//! upstream is found by the next request sent on it (hyper then gives the request back
//! unsent, and the next connection is tried) or by the sweep, which polls each idle
//! connection once without a waker. A connection handed over to a tunnel (`101`), or one
//! whose request body was still arriving from downstream when the response head came
//! (the rest of the upload must not wait for the response to be read), gets a task of its
//! own until the exchange finishes, and is then closed.
//!
//! Clusters whose Service port has `appProtocol: kubernetes.io/h2c` get HTTP/2
//! cleartext with prior knowledge instead (gRPC, trailers included), through
//! hyper-util's client (HTTP/2 multiplexes one connection per endpoint, so its pool is
//! not on a per-request path), which has an unpooled twin for the retry after a stale
//! pooled connection. Its connector tags each new connection with how long it took to
//! open, for the same histogram.

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower_service::Service;

use super::ProxyConfig;
use super::balance::Target;
use super::body::{BodyProgress, RequestBody, UploadWatch};
use super::errors::{BoxError, ProxyError, chain_has, find_in_chain};
use crate::metrics::{Metrics, RouteSeries};
use crate::model::safety::{EndpointPolicy, Refusal};

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
    /// A fresh connection was closed by the upstream after the request was written and
    /// before a complete response head.
    Closed,
    /// Anything else: never retried.
    Other,
}

/// A failed attempt: the answer it becomes and what kind of failure it was.
#[derive(Debug)]
pub struct Failure {
    pub error: ProxyError,
    pub kind: FailureKind,
}

/// Idle HTTP/1 connections kept per endpoint. A connection returned beyond this is
/// closed instead. It is above the requests one endpoint realistically has in flight at
/// once behind one proxy (the benches drive 64 connections, and every concurrent request
/// holds its own connection), so steady keep-alive traffic never churns connections; it
/// bounds what a burst leaves behind (an idle connection costs hyper's buffers, a few
/// KiB, and a socket on both sides) until the idle sweep closes it.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;

/// Independently locked parts of the pool; an endpoint always maps to the same one, so
/// requests to different endpoints rarely wait on one another.
const POOL_SHARDS: usize = 16;

/// The idle sweep runs at least this far apart, whatever the idle timeout.
const MIN_SWEEP_PERIOD: Duration = Duration::from_millis(50);

/// Hashing of the pool's tables: keys are endpoint addresses and ExternalName hosts
/// from the snapshot, not chosen by clients.
type FoldHash = foldhash::fast::RandomState;

/// An HTTP/1 connection's request handle.
type Sender = hyper::client::conn::http1::SendRequest<RequestBody>;

/// hyper's future that runs one HTTP/1 connection (reads, writes, hands a switched
/// protocol's socket to the upgrade). Boxed once per connection: the type has no name
/// outside hyper.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send + Sync>>;

/// One HTTP/1 upstream connection: the handle requests are sent through and the future
/// that has to be polled for anything to happen on the socket.
struct H1Conn {
    sender: Sender,
    /// `None` once it completed: the connection is closed (or belongs to a tunnel).
    driver: Option<Driver>,
}

impl H1Conn {
    /// Polls the connection with `cx`; whether it is still open. A completed driver is
    /// dropped at once, which hands every request still queued on it back unsent.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(driver) = self.driver.as_mut() else {
            return false;
        };
        match driver.as_mut().poll(cx) {
            Poll::Pending => true,
            Poll::Ready(res) => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
                self.driver = None;
                false
            }
        }
    }

    /// Whether the connection is open and waiting for its next request. Polls it once
    /// without a waker: nobody waits on an idle connection, the poll lets hyper notice a
    /// close by the upstream and finish the previous exchange's bookkeeping, and it
    /// replaces the waker of the task that used the connection last, which would
    /// otherwise be kept alive and woken by the next request sent on it.
    fn idle_and_ready(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx) && self.sender.is_ready()
    }

    /// Lets the connection finish what it is still doing (such as writing the rest of a
    /// request body) in a task of its own, then close: its request handle is dropped, so
    /// hyper takes no further request on it. With `upload`, the connection is also closed
    /// once the upload has not moved for a whole stream idle timeout (an upstream that
    /// stops reading it), so the task cannot wait for ever.
    fn finish_detached(self, upload: Option<UploadWatch>) {
        let Some(mut driver) = self.driver else {
            return;
        };
        drop(self.sender);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let ended = |res: hyper::Result<()>| {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            };
            let Some(upload) = upload.filter(|u| !u.limit().is_zero()) else {
                ended(driver.await);
                return;
            };
            let mut seen = upload.received();
            loop {
                tokio::select! {
                    res = &mut driver => return ended(res),
                    () = tokio::time::sleep(upload.limit()) => {
                        if upload.complete() {
                            // Nothing left to upload: the rest is the response's.
                            return ended(driver.await);
                        }
                        let now = upload.received();
                        if now == seen {
                            upload.timed_out();
                            return;
                        }
                        seen = now;
                    }
                }
            }
        });
    }
}

pin_project_lite::pin_project! {
    /// The response to a request sent on `conn`, which this future drives meanwhile.
    /// The response future is completed only by the connection's driver, polled right
    /// before it in the same `poll`, so it is polled without a waker (and without a
    /// cooperative budget, whose exhaustion would wake that waker instead of this task's).
    /// Only when the driver has completed is the response polled with the task's waker.
    struct Driven<'c, F> {
        conn: &'c mut H1Conn,
        #[pin]
        response: tokio::task::coop::Unconstrained<F>,
    }
}

impl<F: Future> Future for Driven<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if this.conn.drive(cx) {
            this.response.poll(&mut Context::from_waker(Waker::noop()))
        } else {
            this.response.poll(cx)
        }
    }
}

/// Which upstream client an attempt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via {
    /// HTTP/2 cleartext with prior knowledge (`appProtocol: kubernetes.io/h2c`).
    pub h2c: bool,
    /// A new connection, not one from the pool (the retry after a stale connection).
    /// An HTTP/1 connection opened for it goes back to the pool afterwards like any.
    pub fresh: bool,
}

/// The upstream clients: the HTTP/1.1 pool, and h2c pooled and unpooled.
pub struct UpstreamClient {
    pool: Arc<Pool>,
    http1: hyper::client::conn::http1::Builder,
    connect_timeout: Duration,
    h2c: Client<Connector, RequestBody>,
    h2c_fresh: Client<Connector, RequestBody>,
    response_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Which addresses an ExternalName may resolve to.
    endpoint_policy: EndpointPolicy,
}

impl UpstreamClient {
    /// The clients for `cfg`. Called inside a tokio runtime, it also starts the idle
    /// sweep of the HTTP/1 pool, which ends when the client is dropped; without one,
    /// idle connections are only closed when a checkout finds them expired.
    pub fn new(cfg: &ProxyConfig, metrics: Arc<Metrics>) -> UpstreamClient {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(true);
        // The connector below enforces the limit, so that a timeout is recognisable.
        http.set_connect_timeout(None);
        let connector = Connector {
            http,
            timeout: cfg.connect_timeout,
            endpoint_policy: Arc::new(cfg.endpoint_policy.clone()),
        };
        let build = |pooled: bool| {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(cfg.idle_timeout)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                // The Host header is always set by the handler.
                .set_host(false)
                .http2_only(true);
            if !pooled {
                b.pool_max_idle_per_host(0);
            }
            b.build(connector.clone())
        };
        let mut http1 = hyper::client::conn::http1::Builder::new();
        http1.max_buf_size(UPSTREAM_H1_MAX_BUF);
        let pool = Arc::new(Pool::new(cfg.idle_timeout));
        Pool::spawn_sweep(&pool);
        UpstreamClient {
            pool,
            http1,
            connect_timeout: cfg.connect_timeout,
            h2c: build(true),
            h2c_fresh: build(false),
            response_timeout: cfg.response_timeout,
            metrics,
            endpoint_policy: cfg.endpoint_policy.clone(),
        }
    }

    /// The limit for one request's response headers, across all its attempts.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// Sends `req` to `target` and waits for the response headers until `timer` fires
    /// (`None`: the timer already fired, so this is a timeout at once). HTTP/1 requests
    /// carry an origin-form URI; h2c requests an absolute one naming `target`. The
    /// upstream metrics go to `route`'s Service series (none without one: a mirror's
    /// copy), timed from `start` (when this attempt began). `body` tells whether the request body passed its limit (a 413,
    /// whatever hyper reports).
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        target: &Target,
        via: Via,
        route: Option<&RouteSeries>,
        body: &BodyProgress,
        start: Instant,
        timer: Option<Pin<&mut tokio::time::Sleep>>,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let timeout = || Failure {
            error: ProxyError::UpstreamTimeout,
            kind: FailureKind::Other,
        };
        let Some(mut timer) = timer else {
            return Err(timeout());
        };
        let result = if via.h2c {
            Deadline {
                exchange: self.send_h2c(req, via.fresh, route, body),
                timer: timer.as_mut(),
            }
            .await
        } else {
            Deadline {
                exchange: self.send_http1(req, target, via.fresh, route, body, start),
                timer: timer.as_mut(),
            }
            .await
        };
        let Some(result) = result else {
            return Err(timeout());
        };
        let resp = result?;
        if let Some(route) = route {
            route
                .upstream_response(&self.metrics)
                .observe(start.elapsed().as_secs_f64());
        }
        Ok(resp)
    }

    /// One HTTP/1 exchange: a pooled connection unless `fresh` (or none is idle), else a
    /// new one. A request that a pooled connection gave back unsent (the upstream had
    /// closed it, and hyper saw that before writing) goes on the next pooled connection,
    /// or a new one; each such round drops one pooled connection, so this ends.
    async fn send_http1(
        &self,
        mut req: Request<RequestBody>,
        target: &Target,
        fresh: bool,
        route: Option<&RouteSeries>,
        body: &BodyProgress,
        now: Instant,
    ) -> Result<Response<UpstreamBody>, Failure> {
        loop {
            let pooled = if fresh {
                None
            } else {
                self.pool.checkout(target, now)
            };
            let (mut conn, connect_seconds) = match pooled {
                Some(conn) => (conn, None),
                None => {
                    let started = Instant::now();
                    // Boxed: connecting is off the keep-alive path, and its future
                    // would otherwise grow every request's future.
                    let conn = Box::pin(self.connect(target))
                        .await
                        .map_err(connect_failure)?;
                    (conn, Some(started.elapsed().as_secs_f64()))
                }
            };
            let reused = connect_seconds.is_none();
            let upload = req.body().upload_watch();
            let response = tokio::task::coop::unconstrained(conn.sender.try_send_request(req));
            let sent = Driven {
                conn: &mut conn,
                response,
            }
            .await;
            match sent {
                Ok(resp) => {
                    if let (Some(seconds), Some(route)) = (connect_seconds, route) {
                        route.upstream_connect(&self.metrics).observe(seconds);
                    }
                    // After a protocol switch the connection belongs to the tunnel: its
                    // driver hands the socket over (in a task of its own) and ends.
                    // An upstream that answered before it had the whole request body
                    // gets the rest of the upload from a task of its own too: here the
                    // connection would only be driven while the response is read, and a
                    // client that reads the answer only after its upload would wait for
                    // ever. That connection closes after the exchange.
                    let back =
                        if resp.status() == StatusCode::SWITCHING_PROTOCOLS || !body.complete() {
                            conn.finish_detached(upload);
                            None
                        } else {
                            Some(PoolReturn {
                                pool: self.pool.clone(),
                                key: target.clone(),
                                conn,
                            })
                        };
                    return Ok(resp.map(|inner| UpstreamBody::new(inner, back)));
                }
                // The pooled connection was closed before the request was written:
                // the next one is tried, or a new one once the pool has none left.
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(classify_http1(e.into_error(), reused, body)),
                },
            }
        }
    }

    /// Opens a connection to `target`; the caller drives it.
    async fn connect(&self, target: &Target) -> Result<H1Conn, ConnectError> {
        let stream =
            tokio::time::timeout(self.connect_timeout, open(target, &self.endpoint_policy))
                .await
                .map_err(|_| ConnectError::Timeout)??;
        stream.set_nodelay(true).map_err(ConnectError::Io)?;
        let (sender, conn) = self
            .http1
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        Ok(H1Conn {
            sender,
            driver: Some(Box::pin(conn.with_upgrades())),
        })
    }

    /// One h2c exchange through hyper-util's client.
    async fn send_h2c(
        &self,
        req: Request<RequestBody>,
        fresh: bool,
        route: Option<&RouteSeries>,
        body: &BodyProgress,
    ) -> Result<Response<UpstreamBody>, Failure> {
        let client = if fresh { &self.h2c_fresh } else { &self.h2c };
        let resp = client
            .request(req)
            .await
            .map_err(|e| classify_legacy(e, body))?;
        if let Some(timing) = resp.extensions().get::<ConnectTiming>()
            && !timing.reported.swap(true, Ordering::Relaxed)
            && let Some(route) = route
        {
            route
                .upstream_connect(&self.metrics)
                .observe(timing.seconds);
        }
        Ok(resp.map(|inner| UpstreamBody::new(inner, None)))
    }
}

pin_project_lite::pin_project! {
    /// `exchange`, unless `timer` fires first (`None` then). The exchange is polled
    /// first, and the timer only while the exchange is pending. Unlike
    /// `tokio::time::timeout`, the timer is borrowed, so one timer serves every request
    /// of a connection (see the handler's `TimerLease`).
    struct Deadline<'t, F> {
        #[pin]
        exchange: F,
        timer: Pin<&'t mut tokio::time::Sleep>,
    }
}

impl<F: Future> Future for Deadline<'_, F> {
    type Output = Option<F::Output>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.exchange.poll(cx) {
            return Poll::Ready(Some(out));
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A TCP connection to `target`. An ExternalName is resolved now ([`resolve`]) and its
/// allowed addresses are tried in order; pod endpoints were checked at translation.
async fn open(target: &Target, policy: &EndpointPolicy) -> Result<TcpStream, ConnectError> {
    match target {
        Target::Addr(addr) => TcpStream::connect(*addr).await.map_err(ConnectError::Io),
        Target::Name { host, port } => {
            let mut last = None;
            for addr in resolve(host, *port, policy).await? {
                match TcpStream::connect(addr).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = Some(e),
                }
            }
            Err(ConnectError::Io(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "no address to connect to")
            })))
        }
    }
}

/// The addresses of the ExternalName `host` on `port` that `policy` allows, in the
/// resolver's order (the endpoint rules translation applies, now to DNS answers). A
/// name with answers but none allowed is [`ConnectError::Refused`]; one with no answer
/// at all is an I/O error.
async fn resolve(
    host: &str,
    port: u16,
    policy: &EndpointPolicy,
) -> Result<Vec<std::net::SocketAddr>, ConnectError> {
    let answers = tokio::net::lookup_host((host, port))
        .await
        .map_err(ConnectError::Io)?;
    allowed(host, answers, policy)
}

/// The addresses among `answers` (the DNS answers for `host`) that `policy` allows, in
/// their order; see [`resolve`].
fn allowed(
    host: &str,
    answers: impl Iterator<Item = std::net::SocketAddr>,
    policy: &EndpointPolicy,
) -> Result<Vec<std::net::SocketAddr>, ConnectError> {
    let mut refused = None;
    let allowed: Vec<_> = answers
        .filter(|addr| match policy.refusal(*addr) {
            Some(why) => {
                tracing::debug!(%host, %addr, reason = %why, "ExternalName address refused");
                refused = Some((*addr, why));
                false
            }
            None => true,
        })
        .collect();
    match (allowed.is_empty(), refused) {
        (true, Some((addr, why))) => Err(ConnectError::Refused {
            host: host.to_string(),
            addr,
            why,
        }),
        (true, None) => Err(ConnectError::Io(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} resolved to no address"),
        ))),
        (false, _) => Ok(allowed),
    }
}

/// Why a new HTTP/1 connection could not be opened. Nothing of the request was sent.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("upstream connect timed out")]
    Timeout,
    #[error("upstream connect failed")]
    Io(#[source] io::Error),
    #[error("upstream connection setup failed")]
    Handshake(#[source] hyper::Error),
    /// Every address the ExternalName `host` resolved to is refused (`addr` is one).
    #[error("ExternalName {host} resolved only to refused addresses ({addr}: {why})")]
    Refused {
        host: String,
        addr: std::net::SocketAddr,
        why: Refusal,
    },
}

/// A connect failure: another endpoint may be tried.
fn connect_failure(err: ConnectError) -> Failure {
    let reason = match &err {
        ConnectError::Timeout => None,
        ConnectError::Io(e) => match e.kind() {
            io::ErrorKind::ConnectionRefused => Some("connection refused"),
            io::ErrorKind::TimedOut => None,
            _ => Some("connect failed"),
        },
        ConnectError::Handshake(_) => Some("connect failed"),
        ConnectError::Refused { .. } => Some("refused address"),
    };
    let error = match reason {
        None => ProxyError::UpstreamTimeout,
        Some(reason) => ProxyError::Upstream {
            reason,
            connecting: true,
            source: Some(Box::new(err)),
        },
    };
    Failure {
        error,
        kind: FailureKind::Connect,
    }
}

/// Maps an error of an HTTP/1 exchange to its answer and failure kind; `reused`: the
/// connection came from the pool.
fn classify_http1(err: hyper::Error, reused: bool, body: &BodyProgress) -> Failure {
    if body.exceeded() {
        return Failure {
            error: ProxyError::BodyTooLarge,
            kind: FailureKind::Other,
        };
    }
    let err = match downstream_failure(err) {
        Ok(failure) => return failure,
        Err(err) => err,
    };
    let root: &(dyn std::error::Error + 'static) = &err;
    let io_kind = find_in_chain::<io::Error>(root).map(io::Error::kind);
    match exchange_failure(&err, io_kind, reused) {
        Exchange::Timeout => Failure {
            error: ProxyError::UpstreamTimeout,
            kind: FailureKind::Other,
        },
        Exchange::Failed(reason, kind) => Failure {
            error: ProxyError::Upstream {
                reason,
                connecting: false,
                source: Some(Box::new(err)),
            },
            kind,
        },
    }
}

/// The failure of an exchange that failed because of the request body from downstream
/// (never retried): its framing broke or the client went away (400, with `err` as the
/// cause), or it went idle (408). Any other error is given back.
fn downstream_failure<E>(err: E) -> Result<Failure, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let root: &(dyn std::error::Error + 'static) = &err;
    let error = match find_in_chain::<super::body::RequestBodyError>(root) {
        Some(super::body::RequestBodyError::Downstream(_)) => {
            ProxyError::DownstreamBody(Box::new(err))
        }
        Some(super::body::RequestBodyError::Idle(_)) => ProxyError::RequestBodyIdle,
        _ => return Err(err),
    };
    Ok(Failure {
        error,
        kind: FailureKind::Other,
    })
}

/// How an exchange on an open connection failed.
enum Exchange {
    Timeout,
    Failed(&'static str, FailureKind),
}

/// Classifies hyper's error of an exchange on an open connection: closed or reset
/// before the response is a stale connection when the connection was `reused`.
fn exchange_failure(h: &hyper::Error, io_kind: Option<io::ErrorKind>, reused: bool) -> Exchange {
    let reset = matches!(
        io_kind,
        Some(io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
    );
    if h.is_parse() || h.is_parse_status() {
        Exchange::Failed("invalid response", FailureKind::Other)
    } else if h.is_incomplete_message() || h.is_canceled() {
        let kind = if reused {
            FailureKind::StaleConnection
        } else {
            FailureKind::Closed
        };
        Exchange::Failed("connection closed before response", kind)
    } else if h.is_timeout() {
        Exchange::Timeout
    } else if reset {
        let kind = if reused {
            FailureKind::StaleConnection
        } else {
            FailureKind::Reset
        };
        Exchange::Failed("connection reset", kind)
    } else {
        Exchange::Failed("request failed", FailureKind::Other)
    }
}

/// Whether the h2c connection an error happened on had already carried a response.
fn reused(err: &hyper_util::client::legacy::Error) -> bool {
    err.connect_info().is_some_and(|c| {
        let mut ext = http::Extensions::new();
        c.get_extras(&mut ext);
        ext.get::<ConnectTiming>()
            .is_some_and(|t| t.reported.load(Ordering::Relaxed))
    })
}

/// What an h2c upstream's refusal of a stream means for a retry. `REFUSED_STREAM`
/// (RFC 9113 8.7): the stream was not processed, as if never sent ([`FailureKind::Connect`]).
/// A GOAWAY from the upstream (it is shutting down): the stream may or may not have been
/// processed, so only a request that may be sent twice is retried
/// ([`FailureKind::Closed`]).
fn h2_refusal(e: &h2::Error) -> Option<FailureKind> {
    if !e.is_remote() {
        return None;
    }
    if e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        Some(FailureKind::Connect)
    } else if e.is_go_away() {
        Some(FailureKind::Closed)
    } else {
        None
    }
}

/// Maps an h2c client error to the answer it becomes and its failure kind.
fn classify_legacy(err: hyper_util::client::legacy::Error, body: &BodyProgress) -> Failure {
    if body.exceeded() {
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
    let err = match downstream_failure(err) {
        Ok(failure) => return failure,
        Err(err) => err,
    };
    let root: &(dyn std::error::Error + 'static) = &err;
    if let Some(kind) = find_in_chain::<h2::Error>(root).and_then(h2_refusal) {
        let (reason, connecting) = match kind {
            FailureKind::Connect => ("stream refused", true),
            _ => ("connection going away", false),
        };
        return Failure {
            error: ProxyError::Upstream {
                reason,
                connecting,
                source: Some(Box::new(err) as BoxError),
            },
            kind,
        };
    }
    let io_kind = find_in_chain::<io::Error>(root).map(io::Error::kind);
    let (reason, kind) = if err.is_connect() {
        match io_kind {
            _ if matches!(
                find_in_chain::<ConnectError>(root),
                Some(ConnectError::Refused { .. })
            ) =>
            {
                ("refused address", FailureKind::Connect)
            }
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
        match exchange_failure(h, io_kind, reused(&err)) {
            Exchange::Timeout => {
                return Failure {
                    error: ProxyError::UpstreamTimeout,
                    kind: FailureKind::Other,
                };
            }
            Exchange::Failed(reason, kind) => (reason, kind),
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

/// A proxied response body. Over HTTP/1 it drives its connection while it is polled
/// (see the module docs); the connection goes back to the pool when this is dropped
/// after the body was read to its end and hyper reports the connection ready for the
/// next request; otherwise it is dropped, which closes it (hyper cannot reuse a
/// connection with unread response bytes).
pub struct UpstreamBody {
    inner: Incoming,
    back: Option<PoolReturn>,
    /// The body's last frame has been read.
    finished: bool,
    /// Data was handed out since this body last answered `Pending`.
    unflushed: bool,
    /// An error held back for one poll (see `poll_frame`).
    deferred: Option<hyper::Error>,
}

impl UpstreamBody {
    fn new(inner: Incoming, back: Option<PoolReturn>) -> UpstreamBody {
        UpstreamBody {
            inner,
            back,
            finished: false,
            unflushed: false,
            deferred: None,
        }
    }
}

/// The connection a body arrives on, and where it goes back to.
struct PoolReturn {
    pool: Arc<Pool>,
    key: Target,
    conn: H1Conn,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(e) = self.deferred.take() {
            return Poll::Ready(Some(Err(e)));
        }
        // What the connection has read already is in the body's channel; only when that
        // is empty is the connection driven (registering this task for its socket), and
        // the channel read again. A connection that ended has delivered the body's end
        // or error to the channel.
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_pending()
            && let Some(back) = self.back.as_mut()
        {
            back.conn.drive(cx);
            polled = Pin::new(&mut self.inner).poll_frame(cx);
        }
        match polled {
            Poll::Ready(None) => self.finished = true,
            Poll::Ready(Some(Ok(ref frame))) => {
                self.unflushed = true;
                // Trailers are the last frame; hyper polls no further after them.
                if frame.is_trailers() {
                    self.finished = true;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                self.back = None;
                // The data handed out just before may still be in the downstream
                // connection's write buffer, which hyper drops on a body error: answer
                // `Pending` once (and wake at once) so that it gets a chance to be
                // written first (HTTP/1 flushes it then; HTTP/2 sends what its flow
                // control allows before the reset). Best effort, not a guarantee.
                if std::mem::take(&mut self.unflushed) {
                    self.deferred = Some(e);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                return Poll::Ready(Some(Err(e)));
            }
            Poll::Pending => self.unflushed = false,
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    #[inline]
    fn drop(&mut self) {
        let Some(mut back) = self.back.take() else {
            return;
        };
        if !(self.finished || self.inner.is_end_stream()) {
            return;
        }
        if back.conn.idle_and_ready() {
            back.pool.put(back.key, back.conn, Instant::now());
        } else {
            back.conn.finish_detached(None);
        }
    }
}

/// One lock's share of the pool: idle lists by endpoint.
type Shard = HashMap<Target, Vec<Idle>, FoldHash>;

/// An idle HTTP/1 connection and since when it is idle.
struct Idle {
    conn: H1Conn,
    since: Instant,
}

/// Idle HTTP/1 connections by endpoint; see the module docs for when one is reused.
/// Each endpoint's list is a stack: the most recently used connection is taken first,
/// so the oldest ones at the bottom run into the idle timeout when traffic falls.
struct Pool {
    shards: Box<[Mutex<Shard>]>,
    hasher: FoldHash,
    idle_timeout: Duration,
}

impl Pool {
    fn new(idle_timeout: Duration) -> Pool {
        Pool {
            shards: (0..POOL_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: FoldHash::default(),
            idle_timeout,
        }
    }

    fn shard(&self, key: &Target) -> MutexGuard<'_, Shard> {
        let i = self.hasher.hash_one(key) as usize % self.shards.len();
        // A panic while holding the lock leaves at worst a list missing or holding
        // connections that the checks at checkout skip.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently returned connection to `key`, unless it has been idle for the
    /// idle timeout or longer; expired ones are dropped (closed outside the lock). It was
    /// ready when it was returned and nothing has polled it since, so the only thing
    /// that can have changed is a close by the upstream: when the socket already reads
    /// as ended, hyper sees that before writing and gives the request back (see
    /// [`UpstreamClient::send_http1`]); a close that crosses the request on the wire is
    /// the stale-connection case the handler retries.
    #[inline]
    fn checkout(&self, key: &Target, now: Instant) -> Option<H1Conn> {
        let mut shard = self.shard(key);
        let list = shard.get_mut(key)?;
        let idle = list.pop()?;
        if now.saturating_duration_since(idle.since) < self.idle_timeout {
            return Some(idle.conn);
        }
        // Everything below is older still.
        let expired = std::mem::take(list);
        drop(shard);
        drop(expired);
        drop(idle);
        None
    }

    /// Returns a connection that is ready for its next request to `key`'s idle list;
    /// beyond [`MAX_IDLE_PER_ENDPOINT`] it is dropped instead.
    fn put(&self, key: Target, conn: H1Conn, now: Instant) {
        let mut shard = self.shard(&key);
        let list = shard.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(Idle { conn, since: now });
        }
    }

    /// Drops idle connections that expired or were closed, and endpoints left without
    /// any. Each idle connection is polled once, so a close by the upstream is noticed
    /// here even when no request comes for the endpoint.
    fn sweep(&self, now: Instant) {
        let mut closed = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, list| {
                closed.extend(list.extract_if(.., |idle| {
                    now.saturating_duration_since(idle.since) >= self.idle_timeout
                        || !idle.conn.idle_and_ready()
                }));
                !list.is_empty()
            });
            drop(shard);
            // Closed outside the lock.
            closed.clear();
        }
    }

    /// Sweeps `pool` every half idle timeout while it exists, when a tokio runtime is
    /// running, so an idle connection is closed about 1.5 idle timeouts after its last
    /// use.
    fn spawn_sweep(pool: &Arc<Pool>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let period = (pool.idle_timeout / 2).max(MIN_SWEEP_PERIOD);
        let pool = Arc::downgrade(pool);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                // Without a cooperative budget: each idle socket polled counts against
                // it, and past it every further poll would answer `Pending` and keep
                // closed connections in the pool until the next sweep.
                tokio::task::coop::unconstrained(async { pool.sweep(Instant::now()) }).await;
            }
        });
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

/// HTTP connector with a recognisable connect timeout and connect timing. An
/// ExternalName host is opened by [`open`], under the same endpoint rules as HTTP/1.
#[derive(Clone)]
struct Connector {
    http: HttpConnector,
    timeout: Duration,
    endpoint_policy: Arc<EndpointPolicy>,
}

/// The ExternalName target `uri` names, or `None` when its host is an IP literal (a pod
/// endpoint, or an ExternalName written as an address; the connector checks it by port)
/// or missing.
fn named_target(uri: &Uri) -> Option<Target> {
    let host = uri.host()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    Some(Target::Name {
        host: host.to_string(),
        port: uri.port_u16().unwrap_or(80),
    })
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
        let connecting: Pin<Box<dyn Future<Output = Result<_, BoxError>> + Send>> =
            match named_target(&uri) {
                Some(target) => {
                    let policy = self.endpoint_policy.clone();
                    Box::pin(async move {
                        let stream = open(&target, &policy).await?;
                        stream.set_nodelay(true)?;
                        Ok(TokioIo::new(stream))
                    })
                }
                None => {
                    // An IP literal: a pod endpoint (checked at translation) or an
                    // ExternalName written as an address; checked again here, by port.
                    let literal = uri.host().and_then(|h| {
                        let bare = h.trim_start_matches('[').trim_end_matches(']');
                        let ip = bare.parse::<std::net::IpAddr>().ok()?;
                        Some(std::net::SocketAddr::new(ip, uri.port_u16().unwrap_or(80)))
                    });
                    let refused = literal.and_then(|addr| {
                        self.endpoint_policy
                            .refusal(addr)
                            .map(|why| ConnectError::Refused {
                                host: addr.ip().to_string(),
                                addr,
                                why,
                            })
                    });
                    match refused {
                        Some(e) => Box::pin(std::future::ready(Err(Box::new(e) as BoxError))),
                        None => {
                            let connecting = self.http.call(uri);
                            Box::pin(async move { Ok(connecting.await?) })
                        }
                    }
                }
            };
        Box::pin(async move {
            let start = Instant::now();
            match tokio::time::timeout(timeout, connecting).await {
                Err(_) => Err(Box::new(ConnectTimeout) as BoxError),
                Ok(Err(e)) => Err(e),
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    /// A connection over an in-memory pipe, polled once so hyper reports it ready; the
    /// other end of the pipe is returned to keep it open.
    async fn connection() -> (H1Conn, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .expect("an HTTP/1 handshake does no I/O");
        let mut conn = H1Conn {
            sender,
            driver: Some(Box::pin(conn.with_upgrades())),
        };
        assert!(
            conn.idle_and_ready(),
            "a new connection waits for a request"
        );
        (conn, theirs)
    }

    #[test]
    fn only_allowed_dns_answers_are_connected_to() {
        let kube = EndpointPolicy {
            allow_local: false,
            own_addresses: vec![SocketAddr::from(([10, 0, 0, 9], 8080))],
        };
        let answers: Vec<SocketAddr> = [
            "127.0.0.1:8080",
            "10.0.0.1:8080",
            "[::ffff:169.254.169.254]:8080",
            "10.0.0.9:8080",
            "[2001:db8::1]:8080",
        ]
        .iter()
        .map(|a| a.parse().expect("address"))
        .collect();
        let got = allowed("mixed.example", answers.into_iter(), &kube).expect("some allowed");
        assert_eq!(
            got,
            vec![
                "10.0.0.1:8080".parse::<SocketAddr>().expect("address"),
                "[2001:db8::1]:8080".parse().expect("address"),
            ]
        );
        let only_refused = ["127.0.0.1:8080", "10.0.0.9:8080"]
            .iter()
            .map(|a| a.parse().expect("address"));
        assert!(matches!(
            allowed("bad.example", only_refused, &kube),
            Err(ConnectError::Refused { .. })
        ));
        assert!(matches!(
            allowed("none.example", std::iter::empty(), &kube),
            Err(ConnectError::Io(_))
        ));
    }

    fn key() -> Target {
        Target::Addr(SocketAddr::from(([10, 0, 0, 1], 8080)))
    }

    fn idle(pool: &Pool, key: &Target) -> usize {
        pool.shard(key).get(key).map_or(0, Vec::len)
    }

    #[tokio::test]
    async fn checkout_takes_the_newest_and_never_an_expired_one() {
        let pool = Pool::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let (old, _old_peer) = connection().await;
        let (new, _new_peer) = connection().await;
        pool.put(key(), old, t0);
        pool.put(key(), new, t0 + Duration::from_secs(2));
        assert_eq!(idle(&pool, &key()), 2);

        // 0.5 s after the newer one's return: it is taken, the older one (2.5 s idle)
        // is dropped on the way and nothing is left.
        let now = t0 + Duration::from_millis(2500);
        assert!(pool.checkout(&key(), now).is_some());
        assert_eq!(
            idle(&pool, &key()),
            1,
            "the older one stays until it is reached"
        );
        assert!(
            pool.checkout(&key(), now).is_none(),
            "the expired one is not taken"
        );
        assert_eq!(idle(&pool, &key()), 0);
    }

    #[tokio::test]
    async fn an_endpoint_keeps_at_most_the_cap_of_idle_connections() {
        let pool = Pool::new(Duration::from_secs(60));
        let now = Instant::now();
        let mut peers = Vec::new();
        for _ in 0..MAX_IDLE_PER_ENDPOINT + 1 {
            let (sender, peer) = connection().await;
            peers.push(peer);
            pool.put(key(), sender, now);
        }
        assert_eq!(idle(&pool, &key()), MAX_IDLE_PER_ENDPOINT);
        let other = Target::Name {
            host: "db.example".into(),
            port: 5432,
        };
        assert_eq!(idle(&pool, &other), 0, "endpoints do not share lists");
    }

    #[tokio::test]
    async fn the_sweep_drops_connections_closed_by_their_peer_and_expired_ones() {
        let pool = Pool::new(Duration::from_secs(60));
        let now = Instant::now();
        let (closing, peer) = connection().await;
        let (open, _open_peer) = connection().await;
        pool.put(key(), open, now);
        pool.put(key(), closing, now);
        drop(peer);
        // Nothing polls an idle connection; the sweep's poll sees the pipe's end.
        pool.sweep(now);
        assert_eq!(
            idle(&pool, &key()),
            1,
            "the sweep drops the closed one only"
        );
        let mut taken = pool.checkout(&key(), now).expect("the open one");
        assert!(taken.idle_and_ready());

        pool.put(key(), taken, now);
        pool.sweep(now + Duration::from_secs(61));
        assert!(
            pool.shard(&key()).get(&key()).is_none(),
            "expired and swept"
        );
    }
}
