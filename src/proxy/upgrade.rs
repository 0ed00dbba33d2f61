//! HTTP/1.1 upgrades (WebSocket and friends): which requests ask for one, the headers
//! that must survive hop-by-hop removal, and the tunnel that copies bytes both ways
//! once the upstream answered `101 Switching Protocols`.
//!
//! A tunnel outlives the downstream connection's HTTP state (hyper hands the socket
//! over), so open tunnels are counted in [`Tunnels`] for the shutdown grace period. A
//! tunnel that moves no byte either way for the stream idle timeout is closed.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{CONNECTION, HeaderMap, HeaderValue, UPGRADE};
use http::{Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use super::balance::InFlight;

/// The `Upgrade` value of a request that asks for a protocol switch: HTTP/1.1, with
/// `upgrade` among the `Connection` tokens and an `Upgrade` header.
pub fn requested<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    connection_has_upgrade(req.headers())
        .then(|| req.headers().get(UPGRADE).cloned())
        .flatten()
}

#[inline]
fn connection_has_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Puts `Connection: upgrade` and `Upgrade: protocol` back after hop-by-hop removal.
pub fn restore_headers(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

/// Counts open tunnels; [`Tunnels::closed`] waits for none.
#[derive(Debug)]
pub struct Tunnels {
    open: watch::Sender<usize>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels {
            open: watch::Sender::new(0),
        }
    }
}

impl Tunnels {
    /// Resolves once no tunnel is open.
    pub async fn closed(&self) {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    fn enter(&self) -> TunnelGuard {
        self.open.send_modify(|n| *n += 1);
        TunnelGuard {
            open: self.open.clone(),
        }
    }

    /// Spawns the tunnel between the downstream and upstream upgraded connections.
    /// `in_flight` keeps the endpoint's in-flight count until the tunnel closes. A tunnel
    /// that carries no byte either way for `idle` is closed on both sides and counted in
    /// `timeouts`.
    pub fn spawn(
        &self,
        downstream: OnUpgrade,
        upstream: OnUpgrade,
        in_flight: Option<InFlight>,
        idle: Duration,
        timeouts: IntCounter,
    ) {
        let guard = self.enter();
        tokio::spawn(async move {
            let _guard = guard;
            let _in_flight = in_flight;
            let (down, up) = match tokio::try_join!(downstream, upstream) {
                Ok(pair) => pair,
                Err(e) => {
                    debug!(error = %e, "upgrade failed");
                    return;
                }
            };
            let activity = Activity::new();
            let mut down = Watched {
                inner: TokioIo::new(down),
                activity: activity.clone(),
            };
            let mut up = Watched {
                inner: TokioIo::new(up),
                activity: activity.clone(),
            };
            let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
            tokio::pin!(copy);
            loop {
                // A zero limit turns the timeout off.
                let deadline = (!idle.is_zero())
                    .then(|| activity.last().checked_add(idle))
                    .flatten();
                let expiry = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    copied = &mut copy => {
                        match copied {
                            Ok((from_down, from_up)) => {
                                debug!(from_down, from_up, "upgrade tunnel closed");
                            }
                            Err(e) => debug!(error = %e, "upgrade tunnel ended with an error"),
                        }
                        return;
                    }
                    () = expiry => {
                        if activity.last().elapsed() >= idle {
                            timeouts.inc();
                            tracing::info!(
                                limit = ?idle,
                                "upgrade tunnel idle: no byte either way for the stream idle timeout; closing both sides"
                            );
                            // Dropping the copy and both sockets closes the tunnel.
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// When a tunnel last moved a byte, shared by both of its sockets.
#[derive(Clone)]
struct Activity {
    epoch: Instant,
    /// Nanoseconds after `epoch`.
    last: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

pin_project_lite::pin_project! {
    /// A socket of a tunnel that notes every byte it moves in its [`Activity`].
    struct Watched<T> {
        #[pin]
        inner: T,
        activity: Activity,
    }
}

impl<T: AsyncRead> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

struct TunnelGuard {
    open: watch::Sender<usize>,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_are_recognised() {
        let req = Request::builder()
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .expect("request");
        assert_eq!(requested(&req), Some(HeaderValue::from_static("websocket")));
        let no_token = Request::builder()
            .header("upgrade", "websocket")
            .body(())
            .expect("request");
        assert_eq!(requested(&no_token), None);
        let h2 = Request::builder()
            .version(Version::HTTP_2)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .expect("request");
        assert_eq!(requested(&h2), None);
    }
}
