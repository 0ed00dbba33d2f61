//! Listeners: the accept loop and per-connection serving.
//!
//! Each accepted socket gets `TCP_NODELAY`, counts against `max_connections`, and is
//! served by hyper-util's auto builder (HTTP/1.1 keep-alive or HTTP/2 prior knowledge,
//! detected per connection). hyper has no timeout while the auto builder detects the
//! protocol, so a connection that completes no request head within
//! `header_read_timeout` is closed here; later HTTP/1 heads are timed by hyper's own
//! `header_read_timeout`. Shutdown stops accepting and lets connections finish
//! gracefully.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use super::Inner;
use super::handler::{ConnState, handle};

/// hyper's smallest allowed HTTP/1 read buffer.
const MIN_H1_BUF: usize = 8 * 1024;

/// Pause after a failed accept (such as running out of file descriptors), so that the
/// loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The connection builder for downstream connections, configured from the proxy's
/// limits.
fn builder(inner: &Inner) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(inner.cfg.header_read_timeout)
        .max_buf_size(inner.cfg.max_header_size.max(MIN_H1_BUF))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(inner.cfg.max_header_size).unwrap_or(u32::MAX));
    b
}

/// Resolves when shutdown is asked for (the value becomes true or the sender is gone).
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Serves `listener` until shutdown, then waits for open connections to finish.
pub(crate) async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    name: &'static str,
    mut shutdown: watch::Receiver<bool>,
) {
    let local_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let builder = builder(&inner);
    let graceful = GracefulShutdown::new();
    let limit = inner
        .cfg
        .max_connections
        .map(|n| Arc::new(Semaphore::new(n)));
    info!(listener = name, port = local_port, "listening");

    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown_requested(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let permit = match &limit {
            None => None,
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    debug!(listener = name, %peer, "connection limit reached; closing");
                    drop(stream);
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "setting TCP_NODELAY failed");
        }
        let state = Arc::new(ConnState::new(
            peer,
            local_port,
            name,
            "http",
            inner.metrics.clone(),
        ));
        let svc = {
            let inner = inner.clone();
            let state = state.clone();
            service_fn(move |req| {
                let inner = inner.clone();
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&inner, &state, req).await) }
            })
        };
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        let first_head_limit = inner.cfg.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let silent = async {
                tokio::time::sleep(first_head_limit).await;
                if state.seen_request() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                res = conn => {
                    if let Err(e) = res {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = silent => {
                    debug!(%peer, "no request head within header_read_timeout; closing");
                }
            }
        });
    }

    drop(listener);
    info!(
        listener = name,
        open = graceful.count(),
        "stopped accepting; draining connections"
    );
    graceful.shutdown().await;
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
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown_requested(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
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
    }
    drop(listener);
    graceful.shutdown().await;
}
