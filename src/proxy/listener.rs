//! Listeners: the accept loop and per-connection serving.
//!
//! Each accepted socket gets `TCP_NODELAY`, counts against `max_connections`, and is
//! served by hyper-util's auto builder (HTTP/1.1 keep-alive or HTTP/2 prior knowledge,
//! detected per connection). Request heads are timed here, with one timer per
//! connection rather than hyper's, which costs a new timer per request and does not
//! run while the auto builder detects the protocol: a connection is closed when no
//! complete request head arrives within `header_read_timeout` of its start or, on
//! HTTP/1, of the end of the previous response (so the limit is also the keep-alive
//! idle limit). Draining (see [`super::Proxy::start_draining`]) shuts
//! connections down gracefully while accepting goes on; shutdown stops accepting and
//! waits for connections to finish. Upgrades (WebSocket) are served: hyper hands the
//! socket to the tunnel in [`super::upgrade`].
//!
//! An HTTPS listener runs the TLS handshake (see [`super::tls`]) inside the
//! connection's task, bounded by `tls_handshake_timeout` and abandoned when the
//! listener closes, then serves the TLS stream with the same per-connection loop:
//! HTTP/2 when ALPN chose `h2`, else HTTP/1.1 (upgrades included).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Inner;
use super::errors::BoxError;
use super::handler::{ConnState, ListenerSeries, handle};
use super::tls::TlsState;

/// hyper's smallest allowed HTTP/1 read buffer.
const MIN_H1_BUF: usize = 8 * 1024;

/// Pause after a failed accept (such as running out of file descriptors), so that the
/// loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Streams one downstream HTTP/2 connection may have open at once; more are refused
/// with `REFUSED_STREAM`. nginx's default `http2_max_concurrent_streams`.
const H2_MAX_CONCURRENT_STREAMS: u32 = 128;

/// Streams the client reset before they were accepted, pending at once, before the
/// connection gets GOAWAY (`ENHANCE_YOUR_CALM`): the rapid-reset (CVE-2023-44487) guard.
const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Streams this side reset because the client broke the protocol on them, before the
/// connection gets GOAWAY: a client that keeps provoking errors is cut off.
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;

/// Response bytes buffered per HTTP/2 stream for a client that reads slowly; with the
/// stream limit this bounds a connection's send buffers at 8 MiB (hyper's default is
/// 400 KiB per stream, 50 MiB a connection).
const H2_MAX_SEND_BUF_SIZE: usize = 64 * 1024;

/// A PING goes to an HTTP/2 client this often, and the connection is closed when the
/// answer takes longer than [`H2_KEEP_ALIVE_TIMEOUT`]: dead peers do not hold streams.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The connection builder for downstream connections, configured from the proxy's
/// limits. HTTP/1: the head must fit in `max_header_size` (431 beyond; its arrival is
/// timed by [`serve_one`]), at most 100 header lines (hyper's default).
/// HTTP/2: the header list must fit in `max_header_size`, and the constants above
/// bound streams, resets and buffers per connection. SETTINGS and PING floods are
/// throttled by the h2 crate itself: it keeps one unsent acknowledgement of each and
/// stops reading the connection until it is written.
fn builder(inner: &Inner) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // Heads are timed by `serve_one`; hyper's own limit (30 s unless set) would
        // cost a timer per request.
        .header_read_timeout(None)
        .max_buf_size(inner.cfg.max_header_size.max(MIN_H1_BUF))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(inner.cfg.max_header_size).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
        .max_send_buf_size(H2_MAX_SEND_BUF_SIZE)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    b
}

/// Resolves when shutdown is asked for (the value becomes true or the sender is gone).
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Counts a connection as open until dropped.
struct OpenGuard(watch::Sender<usize>);

impl OpenGuard {
    fn new(open: &watch::Sender<usize>) -> OpenGuard {
        open.send_modify(|n| *n += 1);
        OpenGuard(open.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Resolves when a connection should shut down gracefully: the proxy is draining and
/// the connection has carried a request (so that a request arriving on a new
/// connection during the shutdown delay is still answered), or the listener closed.
async fn should_shut(
    state: &ConnState,
    draining: &mut watch::Receiver<bool>,
    closing: &mut watch::Receiver<bool>,
) {
    tokio::select! {
        _ = async {
            let _ = draining.wait_for(|d| *d).await;
            state.first_request().await;
        } => {}
        _ = shutdown_requested(closing) => {}
    }
}

/// The accept loop of every listener: accepts on `listener` until `shutdown` is asked
/// for, pausing [`ACCEPT_BACKOFF`] after a failed accept, sets `TCP_NODELAY`, and hands
/// each connection to `on_accept`, which must not block. The listener is closed when
/// this returns.
async fn accept_loop(
    listener: TcpListener,
    name: &'static str,
    shutdown: &mut watch::Receiver<bool>,
    mut on_accept: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown_requested(shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(listener = name, %peer, error = %e, "setting TCP_NODELAY failed");
        }
        on_accept(stream, peer);
    }
}

/// Connection builders: auto-detecting for plain HTTP, and one per ALPN result for TLS.
struct Builders {
    auto: auto::Builder<TokioExecutor>,
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
}

/// Serves `listener` until shutdown, then waits for open connections to finish.
/// While the proxy drains, connections are shut down gracefully (HTTP/1 keep-alive
/// ends after the response in progress, HTTP/2 gets GOAWAY) but accepting goes on.
/// With `tls`, each connection first completes a TLS handshake and is served as
/// HTTP/2 or HTTP/1.1 as ALPN chose.
pub(crate) async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    name: &'static str,
    tls: Option<Arc<TlsState>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let local_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let builders = Arc::new(Builders {
        auto: builder(&inner),
        http1: builder(&inner).http1_only(),
        http2: builder(&inner).http2_only(),
    });
    let series = ListenerSeries::new(&inner.metrics, name);
    let open = watch::Sender::new(0usize);
    let (closing_tx, closing_rx) = watch::channel(false);
    let limit = inner.connection_limit.clone();
    info!(listener = name, port = local_port, "listening");

    accept_loop(listener, name, &mut shutdown, |stream, peer| {
        let permit = match &limit {
            None => None,
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    debug!(listener = name, %peer, "connection limit reached; closing");
                    drop(stream);
                    return;
                }
            },
        };
        let guards = ConnGuards {
            _permit: permit,
            _open: OpenGuard::new(&open),
        };
        let draining = inner.draining.subscribe();
        let closing = closing_rx.clone();
        let inner = inner.clone();
        let builders = builders.clone();
        let series = series.clone();
        // Plain and TLS connections are separate tasks: a task's memory is the size of
        // its future for as long as the connection lives, and the TLS handshake state
        // would otherwise make every plain connection's task as large.
        match &tls {
            None => {
                let task = async move {
                    let _guards = guards;
                    let state = ConnState::new(peer, local_port, "http", series);
                    serve_one(
                        inner,
                        &builders.auto,
                        stream,
                        state,
                        draining,
                        closing,
                        HandlerFuture::Inline,
                    )
                    .await;
                };
                tokio::spawn(task);
            }
            Some(tls) => {
                let task = serve_tls(
                    tls.clone(),
                    stream,
                    peer,
                    local_port,
                    TlsConn {
                        inner,
                        builders,
                        series,
                        draining,
                        closing,
                        guards,
                    },
                );
                tokio::spawn(task);
            }
        }
    })
    .await;

    closing_tx.send_replace(true);
    info!(
        listener = name,
        open = *open.borrow(),
        "stopped accepting; draining connections"
    );
    let mut open = open.subscribe();
    let _ = open.wait_for(|n| *n == 0).await;
}

/// What an accepted connection holds until it closes: its `max_connections` permit
/// and its place in the listener's count of open connections.
struct ConnGuards {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    _open: OpenGuard,
}

/// The listener's share of a TLS connection: everything [`serve_one`] needs after the
/// handshake.
struct TlsConn {
    inner: Arc<Inner>,
    builders: Arc<Builders>,
    series: Arc<ListenerSeries>,
    draining: watch::Receiver<bool>,
    closing: watch::Receiver<bool>,
    guards: ConnGuards,
}

/// Completes the TLS handshake on `stream` (abandoned when the listener closes: a client
/// that never finishes one must not hold up shutdown), then serves HTTP/2 or HTTP/1.1
/// as ALPN chose.
async fn serve_tls(
    tls: Arc<TlsState>,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    local_port: u16,
    mut conn: TlsConn,
) {
    let _guards = conn.guards;
    // Boxed: the handshake's state is freed once it completes instead of staying part of
    // the connection task's size for the connection's lifetime.
    let accepted = tokio::select! {
        res = Box::pin(tls.accept(stream)) => res,
        _ = shutdown_requested(&mut conn.closing) => {
            debug!(%peer, "listener closed during the TLS handshake; closing");
            return;
        }
    };
    match accepted {
        Ok((stream, info)) => {
            let (builder, futures) = if info.h2 {
                (&conn.builders.http2, HandlerFuture::Boxed)
            } else {
                (&conn.builders.http1, HandlerFuture::Inline)
            };
            let state = ConnState::new(peer, local_port, "https", conn.series).with_tls(info);
            serve_one(
                conn.inner,
                builder,
                stream,
                state,
                conn.draining,
                conn.closing,
                futures,
            )
            .await;
        }
        Err(failure) => super::tls::log_handshake_failure(peer, &failure),
    }
}

/// How a connection's request handler futures are kept.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HandlerFuture {
    /// In place. hyper's HTTP/1 dispatcher keeps one slot of the future's size per
    /// connection and reuses it for every request.
    Inline,
    /// Boxed, for connections known to speak HTTP/2 (ALPN `h2`): hyper runs each
    /// stream as a task of its own, and a boxed future is a pointer to move into it
    /// instead of the whole handler state (~3.5 KB) for every request.
    Boxed,
}

/// Serves one downstream connection until it ends: closes it when no request head
/// arrives within `header_read_timeout`, or when its writes have waited for the client
/// to read for the stream idle timeout, and shuts it down gracefully when
/// [`should_shut`] says so.
async fn serve_one<I>(
    inner: Arc<Inner>,
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    state: ConnState,
    draining: watch::Receiver<bool>,
    closing: watch::Receiver<bool>,
    futures: HandlerFuture,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(state);
    let head_limit = inner.cfg.header_read_timeout;
    let stall = StallWatch {
        limit: inner.cfg.stream_idle_timeout,
        timeouts: inner.metrics.stream_idle_timeouts_total.clone(),
    };
    let io = WriteWatched {
        inner: io,
        state: state.clone(),
    };
    let handler = {
        let state = state.clone();
        move |req| {
            let inner = inner.clone();
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(&inner, state, req).await) }
        }
    };
    let io = TokioIo::new(io);
    match futures {
        HandlerFuture::Inline => {
            let conn = builder.serve_connection_with_upgrades(io, service_fn(handler));
            tokio::pin!(conn);
            drive_connection(conn, &state, head_limit, &stall, draining, closing).await;
        }
        HandlerFuture::Boxed => {
            let svc = service_fn(move |req| Box::pin(handler(req)));
            let conn = builder.serve_connection_with_upgrades(io, svc);
            tokio::pin!(conn);
            drive_connection(conn, &state, head_limit, &stall, draining, closing).await;
        }
    }
}

/// The stream idle limit as it applies to a client that stops reading: a connection
/// whose writes have waited for the client that long is closed.
struct StallWatch {
    limit: Duration,
    timeouts: prometheus::IntCounterVec,
}

pin_project_lite::pin_project! {
    /// A downstream connection's socket that tells its [`ConnState`] when writes to the
    /// client wait (the client does not read) and when they go through again.
    struct WriteWatched<I> {
        #[pin]
        inner: I,
        state: Arc<ConnState>,
    }
}

impl<I: AsyncRead> AsyncRead for WriteWatched<I> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<I: AsyncWrite> WriteWatched<I> {
    #[inline]
    fn note<T>(state: &ConnState, polled: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match &polled {
            Poll::Pending => state.write_blocked(),
            Poll::Ready(_) => state.write_flowed(),
        }
        polled
    }
}

impl<I: AsyncWrite> AsyncWrite for WriteWatched<I> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        Self::note(this.state, this.inner.poll_write(cx, buf))
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        Self::note(this.state, this.inner.poll_write_vectored(cx, bufs))
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        Self::note(this.state, this.inner.poll_flush(cx))
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Why [`drive_connection`]'s own timer closed a connection.
enum Overdue {
    /// No complete request head within `header_read_timeout`.
    Head,
    /// Writes waited for the client to read for the stream idle timeout.
    Stalled,
}

/// Runs `conn` to its end, closing it when a request head is overdue and shutting it
/// down gracefully when [`should_shut`] says so.
async fn drive_connection(
    mut conn: Pin<&mut ServedConnection<'_>>,
    state: &ConnState,
    head_limit: Duration,
    stall: &StallWatch,
    mut draining: watch::Receiver<bool>,
    mut closing: watch::Receiver<bool>,
) {
    let peer = state.peer;
    // One timer per connection, not per request: it wakes at the deadline of the head
    // awaited when it was set, or of a stall on the client going on then (or a
    // `header_read_timeout` or stream idle timeout later, whichever is shorter, while
    // there is neither), and ends only when a head is still awaited, or the client still
    // stalls writes, past its deadline. A stall that begins while it sleeps is found at
    // the next wake, so one is cut between one and two stream idle timeouts after it
    // began.
    let silent = async {
        loop {
            let now = Instant::now();
            let head = state.head_deadline(head_limit);
            let stalled = (!stall.limit.is_zero())
                .then(|| state.write_stall_deadline(stall.limit))
                .flatten();
            if head.is_some_and(|d| d <= now) {
                return Overdue::Head;
            }
            if stalled.is_some_and(|d| d <= now) {
                return Overdue::Stalled;
            }
            // Without a deadline due sooner, the next look is a header read timeout or a
            // stream idle timeout away, whichever is shorter.
            let mut next = now + head_limit;
            if !stall.limit.is_zero() {
                next = next.min(now + stall.limit);
            }
            for due in [head, stalled].into_iter().flatten() {
                next = next.min(due);
            }
            tokio::time::sleep_until(next.into()).await;
        }
    };
    // The connection task wakes several times per request; the deadline and the
    // shutdown signals are only polled again when they themselves woke it.
    let mut silent = Gated::new(silent);
    let mut shut_signal = Gated::new(should_shut(state, &mut draining, &mut closing));
    let mut shut = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                break;
            }
            overdue = &mut silent => {
                match overdue {
                    Overdue::Head => debug!(%peer, "no complete request head within header_read_timeout; closing"),
                    Overdue::Stalled => {
                        stall.timeouts.with_label_values(&["response"]).inc();
                        tracing::info!(
                            %peer,
                            limit = ?stall.limit,
                            "client not reading: no byte written for the stream idle timeout; closing the connection"
                        );
                    }
                }
                break;
            }
            _ = &mut shut_signal, if !shut => {
                conn.as_mut().graceful_shutdown();
                shut = true;
            }
        }
    }
}

/// A downstream connection as [`drive_connection`] runs it, whichever service type it
/// was built with.
type ServedConnection<'a> =
    dyn GracefulConnection<Error = BoxError, Output = Result<(), BoxError>> + Send + 'a;

/// A future that is polled only when it woke its task itself (or on its first poll),
/// not each time a future it is selected with wakes the task. Its own waker records the
/// wake-up and passes it on to the task's.
struct Gated<F> {
    inner: Pin<Box<F>>,
    gate: Arc<Gate>,
    /// The waker the inner future registers with: always the same one.
    waker: Waker,
    polled: bool,
}

#[derive(Default)]
struct Gate {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Gated<F> {
    fn new(inner: F) -> Gated<F> {
        let gate = Arc::new(Gate::default());
        Gated {
            inner: Box::pin(inner),
            waker: Waker::from(gate.clone()),
            gate,
            polled: false,
        }
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // Registered before the flag is read, so a wake-up in between is not lost.
        this.gate.task.register(cx.waker());
        if this.polled && !this.gate.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.polled = true;
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

/// Serves a small local HTTP service (admin, dashboard, echo) on `listener` until
/// shutdown: HTTP/1.1 and HTTP/2 prior knowledge, graceful drain at the end.
pub(crate) async fn serve_simple<F, Fut>(
    listener: TcpListener,
    name: &'static str,
    mut shutdown: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<super::body::ProxyBody>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    info!(listener = name, port, "listening");
    accept_loop(listener, name, &mut shutdown, |stream, peer| {
        let handler = handler.clone();
        let svc = service_fn(move |req| {
            let fut = handler(req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned(),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(listener = name, %peer, error = %e, "connection ended with an error");
            }
        });
    })
    .await;
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn the_accept_loop_hands_over_each_connection_and_closes_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, mut shutdown) = watch::channel(false);
        let (tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            accept_loop(listener, "test", &mut shutdown, |stream, peer| {
                let nodelay = stream.nodelay().unwrap_or(false);
                let _ = tx.send((peer, nodelay, stream));
            })
            .await;
        });
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (peer, nodelay, _stream) = accepted.recv().await.expect("handed over");
        assert_eq!(peer, client.local_addr().expect("client address"));
        assert!(nodelay, "TCP_NODELAY is set");
        stop.send_replace(true);
        task.await.expect("the loop ends");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the listener is closed"
        );
    }

    #[test]
    fn gated_future_is_polled_again_only_after_its_own_wake() {
        let polls = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<u8>();
        let counted = polls.clone();
        let mut gated = Gated::new(std::future::poll_fn(move |cx| {
            counted.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut rx).poll(cx)
        }));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        // Woken for something else: the inner future is not polled.
        assert!(Pin::new(&mut gated).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        tx.send(7).expect("receiver alive");
        assert!(matches!(
            Pin::new(&mut gated).poll(&mut cx),
            Poll::Ready(Ok(7))
        ));
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
