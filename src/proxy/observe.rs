//! Observing one exchange to its end: the body size histograms and the access log
//! line are recorded when the response body ends (or is dropped: a client that went
//! away, a HEAD response), not when its headers are sent.
//!
//! [`Exchange`] collects what the inner handler learns (route, upstream, timings);
//! [`finish_with`] wraps the response body in a counting body that records everything
//! once, at its end.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{HOST, HeaderValue, USER_AGENT};
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::balance::Target;
use super::body::{Answer, BodyProgress, ProxyBody, StreamIdle};
use super::errors::BoxError;
use super::handler::ConnState;
use crate::accesslog::{AccessLog, Entry, UpstreamAddr};
use crate::metrics::{Metrics, RouteSeries};

/// What the inner handler learns about a request on its way.
#[derive(Debug, Default)]
pub(crate) struct Exchange {
    /// The route's metric series, once routing chose one.
    pub series: Option<Arc<RouteSeries>>,
    /// Request body bytes read so far, once the body is being forwarded.
    pub request_bytes: Option<Arc<BodyProgress>>,
    /// The last upstream an attempt went to.
    pub upstream: Option<UpstreamAddr>,
    /// Set when upstream response headers arrived.
    pub upstream_duration: Option<Duration>,
}

impl Exchange {
    /// Notes the upstream an attempt goes to; only kept when it will be logged.
    pub fn attempt(&mut self, target: &Target, logging: bool) {
        if !logging {
            return;
        }
        self.upstream = Some(match target {
            Target::Addr(a) => UpstreamAddr::Addr(*a),
            Target::Name { host, port } => UpstreamAddr::Name {
                host: host.clone(),
                port: *port,
            },
        });
    }
}

/// The parts of the request the access log needs, taken before the request is
/// consumed. Clones of shared buffers, not copies.
pub(crate) struct RequestHead {
    time: SystemTime,
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
}

impl RequestHead {
    pub fn of<B>(req: &Request<B>) -> RequestHead {
        let uri = req.uri().clone();
        let host = req.headers().get(HOST).cloned().or_else(|| {
            uri.authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        RequestHead {
            time: SystemTime::now(),
            method: req.method().clone(),
            uri,
            host,
            user_agent: req.headers().get(USER_AGENT).cloned(),
        }
    }
}

/// Everything needed to record the exchange once its response body ends.
struct Finish {
    metrics: Arc<Metrics>,
    log: AccessLog,
    start: Instant,
    status: u16,
    exchange: Exchange,
    head: Option<RequestHead>,
    client: SocketAddr,
    request_id: HeaderValue,
    tls_version: Option<&'static str>,
    conn: Arc<ConnState>,
}

impl Finish {
    fn done(self, bytes_out: u64) {
        self.conn.response_ended();
        let bytes_in = self
            .exchange
            .request_bytes
            .as_ref()
            .map_or(0, |p| p.received());
        let route = match &self.exchange.series {
            Some(series) => series.clone(),
            None => self.metrics.route("", "", "", ""),
        };
        route.observe_sizes(&self.metrics, bytes_in, bytes_out);
        let Some(head) = self.head else { return };
        self.log.log(Entry {
            time: head.time,
            client: self.client,
            method: head.method,
            host: head.host,
            uri: head.uri,
            status: self.status,
            bytes_in,
            bytes_out,
            duration: self.start.elapsed(),
            upstream: self.exchange.upstream,
            upstream_duration: self.exchange.upstream_duration,
            route: route.labels.clone(),
            request_id: self.request_id,
            user_agent: head.user_agent,
            tls_version: self.tls_version,
        });
    }
}

/// What [`finish_with`] records besides the exchange.
pub(crate) struct Observer {
    pub metrics: Arc<Metrics>,
    pub log: AccessLog,
    pub start: Instant,
    pub head: Option<RequestHead>,
    pub client: SocketAddr,
    pub request_id: HeaderValue,
    pub tls_version: Option<&'static str>,
    /// The downstream connection, told when the response has ended.
    pub conn: Arc<ConnState>,
}

/// Wraps `resp`'s body so that the exchange is recorded when the body ends, fails or
/// is dropped. Upgrades (101) are recorded at once: their bytes flow in the tunnel.
#[inline]
pub(crate) fn finish_with(
    resp: Response<Answer>,
    exchange: Exchange,
    ctx: Observer,
) -> Response<ProxyBody> {
    let finish = Finish {
        metrics: ctx.metrics,
        log: ctx.log,
        start: ctx.start,
        status: resp.status().as_u16(),
        exchange,
        head: ctx.head,
        client: ctx.client,
        request_id: ctx.request_id,
        tls_version: ctx.tls_version,
        conn: ctx.conn,
    };
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        finish.done(0);
        return resp.map(BodyExt::boxed);
    }
    resp.map(|body| {
        Counted {
            inner: body,
            sent: 0,
            finish: Some(finish),
        }
        .boxed()
    })
}

/// A response body that counts its data bytes and records the exchange at its end.
struct Counted {
    inner: Answer,
    sent: u64,
    finish: Option<Finish>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent = this.sent.saturating_add(data.len() as u64);
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.finish.take() {
                    f.done(this.sent);
                }
            }
            // Generated answers never fail: an error is the upstream body breaking off,
            // or going idle for the stream idle timeout.
            Poll::Ready(Some(Err(e))) => {
                if let Some(f) = this.finish.take() {
                    let idle = e.is::<StreamIdle>();
                    if idle {
                        f.metrics
                            .stream_idle_timeouts_total
                            .with_label_values(&["response"])
                            .inc();
                    }
                    if let Some(series) = &f.exchange.series {
                        let l = &series.labels;
                        if idle {
                            tracing::info!(
                                namespace = %l.namespace,
                                route_kind = l.route_kind,
                                route = %l.route,
                                service = %l.service,
                                request_id = ?f.request_id,
                                "response body idle: no byte from the upstream for the stream idle timeout; aborting"
                            );
                        } else {
                            f.metrics
                                .upstream_body_errors_total
                                .with_label_values(&[
                                    &l.namespace,
                                    l.route_kind,
                                    &l.route,
                                    &l.service,
                                ])
                                .inc();
                        }
                    }
                    f.done(this.sent);
                }
            }
            Poll::Pending => {}
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

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            f.done(self.sent);
        }
    }
}
