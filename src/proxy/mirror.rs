//! `RequestMirror` (Gateway API): a copy of a forwarded request sent to another
//! cluster, fire and forget. The copy never delays or changes the real request:
//!
//! - It is made when the real request is about to go upstream: the same method, the
//!   target after any URL rewrite, the headers as they are sent upstream (header
//!   modifiers, `X-Forwarded-*`, `x-request-id`, `Host` as the real request has it),
//!   to an endpoint of the mirror cluster that the balancer picks as for any request.
//! - Its body is a tee of the real one ([`Tee`]): each frame the real request reads is
//!   queued for every mirror without waiting, up to [`BODY_BUFFER`] bytes per mirror.
//!   A mirror that falls further behind is abandoned (`body_overflow`); so is one whose
//!   real body stops short (`body_aborted`: the client went away, the body passed its
//!   limit, or the real request failed before reading all of it).
//! - At most `ProxyConfig::max_mirrors_in_flight` copies are in flight at once across
//!   the proxy; beyond that a copy is not sent (`in_flight_limit`).
//! - Each copy runs in a task of its own with the real request's first-attempt
//!   deadline for its response head (the route's timeouts and
//!   `--upstream-response-timeout`); its response is read and thrown away, up to
//!   [`DRAIN_LIMIT`] bytes, so a small answer leaves its connection to the pool and a
//!   larger one closes it.
//! - Passive health: the copy counts as a request in flight on its endpoint while it
//!   lasts, but its failures eject nothing and its answers clear no ejection: what a
//!   mirror cluster does with traffic nobody waits for must not steer the traffic that
//!   somebody does. The upstream histograms leave copies out for the same reason.
//! - Copies not sent or not delivered whole are counted in
//!   `portcullis_mirror_dropped_total{namespace,service,reason}` under the mirror's
//!   Service; reasons are [`DropReason`]s.
//! - Shutdown does not wait for copies: they hold no downstream connection, and when
//!   the proxy goes away the ones still running end at once.
//! - Upgrade requests (WebSocket and the like) are not mirrored.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::debug;

use super::Inner;
use super::balance::{InFlight, Target, is_h2c};
use super::body::{BodyProgress, RequestBody, RequestBodyError};
use super::errors::ProxyError;
use super::forward::{UpstreamClient, Via};
use crate::metrics::Metrics;
use crate::model::{Cluster, ObjectRef};

/// The default bound on mirror copies in flight at once, across the proxy. With
/// [`BODY_BUFFER`], it bounds what mirrors can hold in memory to 32 MiB of queued body.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// Body bytes queued for one mirror that it has not sent yet; beyond this the copy is
/// abandoned rather than the real request slowed down.
pub const BODY_BUFFER: usize = 128 * 1024;

/// Response body bytes of a copy read (and thrown away) before its connection is
/// closed instead of returned to the pool.
pub const DRAIN_LIMIT: usize = 64 * 1024;

/// Why a copy was not sent, or not delivered whole: the `reason` label of
/// `portcullis_mirror_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The bound on copies in flight was reached.
    InFlightLimit,
    /// The mirror cluster has no endpoint to send to.
    NoEndpoints,
    /// The copy fell more than [`BODY_BUFFER`] bytes behind the real request body.
    BodyOverflow,
    /// The real request body stopped short, so the copy's could not be completed.
    BodyAborted,
    /// No response head before the deadline.
    Timeout,
    /// The mirror endpoint refused, reset or answered with something that is not HTTP.
    UpstreamError,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::InFlightLimit => "in_flight_limit",
            DropReason::NoEndpoints => "no_endpoints",
            DropReason::BodyOverflow => "body_overflow",
            DropReason::BodyAborted => "body_aborted",
            DropReason::Timeout => "timeout",
            DropReason::UpstreamError => "upstream_error",
        }
    }
}

/// Counts one dropped copy for the mirror Service `service`.
fn dropped(metrics: &Metrics, service: &ObjectRef, reason: DropReason) {
    metrics
        .mirror_dropped_total
        .with_label_values(&[
            service.namespace.as_str(),
            service.name.as_str(),
            reason.as_str(),
        ])
        .inc();
    debug!(
        namespace = %service.namespace,
        service = %service.name,
        reason = reason.as_str(),
        "mirror copy dropped"
    );
}

/// The copies in flight: their bound, and the signal that ends them when the proxy
/// goes away.
pub(crate) struct Mirrors {
    permits: Arc<Semaphore>,
    limit: usize,
    /// Never sent on: dropped with the proxy, which every copy's task sees at once.
    stop: watch::Sender<()>,
}

impl Mirrors {
    /// At most `limit` copies in flight at once (0: none is ever sent).
    pub fn new(limit: usize) -> Mirrors {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        Mirrors {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            stop: watch::Sender::new(()),
        }
    }

    /// Copies in flight now.
    pub fn in_flight(&self) -> usize {
        self.limit - self.permits.available_permits()
    }
}

/// The request a copy is made of, as it goes upstream.
pub(crate) struct Original<'a> {
    pub method: &'a Method,
    /// The target after any URL rewrite.
    pub path_and_query: &'a PathAndQuery,
    /// The headers as sent upstream.
    pub headers: &'a HeaderMap,
    /// The size of the request body; `None` when the request has none.
    pub body: Option<SizeHint>,
    /// When the copy's response head must have arrived.
    pub deadline: Instant,
}

/// Sends a copy of `original` to each of `clusters`, each in a task of its own, and
/// returns the tee that feeds their bodies (`None` when no copy needs one). Never
/// waits: a copy that cannot start now is counted and left out.
pub(crate) fn send(
    inner: &Inner,
    clusters: &[Arc<Cluster>],
    original: Original<'_>,
) -> Option<Tee> {
    let mut sinks = Vec::new();
    for cluster in clusters {
        let service = &cluster.service;
        let Ok(permit) = inner.mirrors.permits.clone().try_acquire_owned() else {
            dropped(&inner.metrics, service, DropReason::InFlightLimit);
            continue;
        };
        let Some(picked) = inner.balancer.pick(cluster, &[]) else {
            dropped(&inner.metrics, service, DropReason::NoEndpoints);
            continue;
        };
        let h2c = is_h2c(cluster);
        let uri = if h2c {
            let Some(authority) = picked.authority.clone() else {
                dropped(&inner.metrics, service, DropReason::UpstreamError);
                continue;
            };
            let mut target = http::uri::Parts::default();
            target.scheme = Some(Scheme::HTTP);
            target.authority = Some(authority);
            target.path_and_query = Some(original.path_and_query.clone());
            match Uri::from_parts(target) {
                Ok(uri) => uri,
                Err(_) => {
                    dropped(&inner.metrics, service, DropReason::UpstreamError);
                    continue;
                }
            }
        } else {
            Uri::from(original.path_and_query.clone())
        };
        let (body, feed) = match &original.body {
            None => (RequestBody::empty(), None),
            Some(hint) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let feed = Arc::new(Feed::default());
                sinks.push(Sink {
                    tx,
                    feed: feed.clone(),
                });
                let copy = MirrorFeed {
                    rx,
                    feed: feed.clone(),
                    hint: *hint,
                    delivered: 0,
                };
                (RequestBody::mirror(copy, &inner.request_idle), Some(feed))
            }
        };
        let progress = body.progress();
        let mut req = Request::new(body);
        *req.method_mut() = original.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = if h2c {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *req.headers_mut() = original.headers.clone();
        let copy = Copy {
            upstream: inner.upstream.clone(),
            metrics: inner.metrics.clone(),
            service: service.clone(),
            req,
            target: picked.target,
            in_flight: picked.guard,
            via: Via { h2c, fresh: false },
            progress,
            feed,
            deadline: original.deadline,
            permit,
            stop: inner.mirrors.stop.subscribe(),
        };
        tokio::spawn(copy.run());
    }
    (!sinks.is_empty()).then_some(Tee { sinks })
}

/// One copy on its way, owning everything its task needs.
struct Copy {
    upstream: Arc<UpstreamClient>,
    metrics: Arc<Metrics>,
    service: ObjectRef,
    req: Request<RequestBody>,
    target: Target,
    /// The endpoint's in-flight count; nothing is reported to its passive health.
    in_flight: Option<InFlight>,
    via: Via,
    progress: Option<Arc<BodyProgress>>,
    feed: Option<Arc<Feed>>,
    deadline: Instant,
    permit: OwnedSemaphorePermit,
    stop: watch::Receiver<()>,
}

impl Copy {
    async fn run(self) {
        let Copy {
            upstream,
            metrics,
            service,
            req,
            target,
            in_flight,
            via,
            progress,
            feed,
            deadline,
            permit,
            mut stop,
        } = self;
        let _held = (permit, in_flight);
        let progress = progress.as_deref().unwrap_or(BodyProgress::of_empty());
        let mut timer = Box::pin(tokio::time::sleep_until(deadline.into()));
        let abandoned = async {
            match &feed {
                Some(feed) => feed.abandoned().await,
                None => std::future::pending().await,
            }
        };
        let sent = tokio::select! {
            _ = stop.changed() => return,
            () = abandoned => None,
            sent = upstream.send(req, &target, via, None, progress, Instant::now(), Some(timer.as_mut())) => Some(sent),
        };
        let abandoned = feed.as_ref().and_then(|f| f.abandoned_for());
        let resp = match sent {
            Some(Ok(resp)) => resp,
            Some(Err(failure)) => {
                let reason = abandoned.unwrap_or(match failure.error {
                    ProxyError::UpstreamTimeout => DropReason::Timeout,
                    _ => DropReason::UpstreamError,
                });
                return dropped(&metrics, &service, reason);
            }
            None => {
                return dropped(
                    &metrics,
                    &service,
                    abandoned.unwrap_or(DropReason::BodyAborted),
                );
            }
        };
        // The answer is thrown away; read to its end when it is small, so that its
        // connection goes back to the pool.
        let mut body = resp.into_body();
        let mut read = 0usize;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = &mut timer => return,
                frame = body.frame() => match frame {
                    Some(Ok(frame)) => {
                        read = read.saturating_add(frame.data_ref().map_or(0, Bytes::len));
                        if read > DRAIN_LIMIT {
                            return;
                        }
                    }
                    _ => return,
                },
            }
        }
    }
}

/// How a copy's body stands: still being fed, or how it ended.
const OPEN: u8 = 0;
const COMPLETE: u8 = 1;
const OVERFLOW: u8 = 2;
const ABORTED: u8 = 3;

/// What the tee and one copy's body share.
#[derive(Debug, Default)]
struct Feed {
    /// [`OPEN`], [`COMPLETE`], [`OVERFLOW`] or [`ABORTED`]; set once from `OPEN`.
    state: AtomicU8,
    /// Body bytes queued and not yet taken by the copy.
    queued: AtomicUsize,
    /// Notified when the copy is abandoned.
    abandoned: Notify,
}

impl Feed {
    /// Ends an open feed as `why` ([`OVERFLOW`] or [`ABORTED`]) and wakes the copy's
    /// task, which gives up at once.
    fn abandon(&self, why: u8) {
        if self
            .state
            .compare_exchange(OPEN, why, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.abandoned.notify_one();
        }
    }

    /// Ends an open feed: everything was queued.
    fn complete(&self) {
        let _ = self
            .state
            .compare_exchange(OPEN, COMPLETE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Why the copy was abandoned, if it was.
    fn abandoned_for(&self) -> Option<DropReason> {
        match self.state.load(Ordering::Acquire) {
            OVERFLOW => Some(DropReason::BodyOverflow),
            ABORTED => Some(DropReason::BodyAborted),
            _ => None,
        }
    }

    /// Resolves once the copy is abandoned.
    async fn abandoned(&self) {
        // `notify_one` keeps a permit for a waiter that has not arrived yet, so an
        // abandonment between this check and the wait is not missed.
        if self.abandoned_for().is_none() {
            self.abandoned.notified().await;
        }
    }
}

/// A copy's request body: the frames the tee queued for it, ending when the real body
/// ends, failing when the copy was abandoned.
pub(crate) struct MirrorFeed {
    rx: mpsc::UnboundedReceiver<Frame<Bytes>>,
    feed: Arc<Feed>,
    /// The real body's size, as it was when the copy was made.
    hint: SizeHint,
    delivered: u64,
}

impl MirrorFeed {
    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.feed.queued.fetch_sub(data.len(), Ordering::AcqRel);
                    self.delivered = self.delivered.saturating_add(data.len() as u64);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            // The tee is gone: after it completed the feed, that is the end of the body.
            Poll::Ready(None) => match self.feed.state.load(Ordering::Acquire) {
                COMPLETE => Poll::Ready(None),
                _ => Poll::Ready(Some(Err(RequestBodyError::MirrorAbandoned))),
            },
        }
    }

    /// What is left of the real body's size.
    pub(super) fn size_hint(&self) -> SizeHint {
        match self.hint.exact() {
            Some(n) => SizeHint::with_exact(n.saturating_sub(self.delivered)),
            None => self.hint,
        }
    }
}

/// Feeds each frame of a real request body to the copies of its mirrors, never waiting
/// for them. Dropped before [`Tee::finish`] (the body failed, passed its limit, or was
/// never read to its end), it abandons the copies still open.
pub(crate) struct Tee {
    sinks: Vec<Sink>,
}

/// One copy's end of the tee.
struct Sink {
    tx: mpsc::UnboundedSender<Frame<Bytes>>,
    feed: Arc<Feed>,
}

impl Sink {
    /// Queues a copy of `frame`; `false` once this sink is done with (the copy was
    /// abandoned, or has already finished without the rest of the body).
    fn offer(&self, frame: &Frame<Bytes>) -> bool {
        let copy = if let Some(data) = frame.data_ref() {
            if data.is_empty() {
                return true;
            }
            let queued = self.feed.queued.fetch_add(data.len(), Ordering::AcqRel) + data.len();
            if queued > BODY_BUFFER {
                self.feed.abandon(OVERFLOW);
                return false;
            }
            Frame::data(data.clone())
        } else if let Some(trailers) = frame.trailers_ref() {
            Frame::trailers(trailers.clone())
        } else {
            return true;
        };
        self.tx.send(copy).is_ok()
    }
}

impl Tee {
    /// Hands a frame of the real body to every copy still open.
    pub fn offer(&mut self, frame: &Frame<Bytes>) {
        self.sinks.retain(|sink| sink.offer(frame));
    }

    /// The real body ended: each copy's body ends after what was queued for it.
    pub fn finish(mut self) {
        for sink in self.sinks.drain(..) {
            sink.feed.complete();
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        for sink in &self.sinks {
            sink.feed.abandon(ABORTED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Tee, MirrorFeed) {
        let (tx, rx) = mpsc::unbounded_channel();
        let feed = Arc::new(Feed::default());
        let tee = Tee {
            sinks: vec![Sink {
                tx,
                feed: feed.clone(),
            }],
        };
        let copy = MirrorFeed {
            rx,
            feed,
            hint: SizeHint::default(),
            delivered: 0,
        };
        (tee, copy)
    }

    fn next(copy: &mut MirrorFeed) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        copy.poll_frame(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[test]
    fn a_finished_tee_ends_the_copy_after_its_frames() {
        let (mut tee, mut copy) = pair();
        tee.offer(&Frame::data(Bytes::from_static(b"abc")));
        tee.finish();
        assert!(
            matches!(next(&mut copy), Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(|d| d == "abc"))
        );
        assert!(matches!(next(&mut copy), Poll::Ready(None)));
    }

    #[test]
    fn a_dropped_tee_fails_the_copy() {
        let (mut tee, mut copy) = pair();
        tee.offer(&Frame::data(Bytes::from_static(b"abc")));
        drop(tee);
        assert!(matches!(next(&mut copy), Poll::Ready(Some(Ok(_)))));
        assert!(matches!(
            next(&mut copy),
            Poll::Ready(Some(Err(RequestBodyError::MirrorAbandoned)))
        ));
        assert_eq!(copy.feed.abandoned_for(), Some(DropReason::BodyAborted));
    }

    #[test]
    fn a_copy_that_falls_behind_is_abandoned_and_the_tee_goes_on() {
        let (mut tee, mut copy) = pair();
        let chunk = Bytes::from(vec![0u8; BODY_BUFFER / 2]);
        tee.offer(&Frame::data(chunk.clone()));
        tee.offer(&Frame::data(chunk.clone()));
        assert_eq!(tee.sinks.len(), 1, "exactly the buffer is still fine");
        tee.offer(&Frame::data(Bytes::from_static(b"x")));
        assert!(tee.sinks.is_empty(), "one byte more abandons the copy");
        assert_eq!(copy.feed.abandoned_for(), Some(DropReason::BodyOverflow));
        tee.finish();
        assert!(matches!(next(&mut copy), Poll::Ready(Some(Ok(_)))));
        assert!(matches!(next(&mut copy), Poll::Ready(Some(Ok(_)))));
        assert!(matches!(
            next(&mut copy),
            Poll::Ready(Some(Err(RequestBodyError::MirrorAbandoned)))
        ));
    }
}
