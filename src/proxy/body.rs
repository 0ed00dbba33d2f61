//! Body types of the data path: the streamed, size-limited request body sent upstream,
//! and the one boxed response body type for proxied and generated answers.
//!
//! Bodies are streamed frame by frame in both directions; nothing here buffers a whole
//! body.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus::IntCounter;
use tokio::time::Sleep;

use super::balance::InFlight;
use super::errors::BoxError;
use super::forward::UpstreamBody;
use super::mirror::{MirrorFeed, Tee};

/// The response body type of every answer the proxy gives.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A complete in-memory body (generated answers).
pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// The body the inner handler answers with: an upstream body streamed with its
/// endpoint's in-flight guard, or a body of the proxy's own. Not boxed itself: the
/// observing layer around it is the one box a response body costs.
pub(crate) enum Answer {
    /// A proxied upstream body. `guard` (the endpoint's in-flight count) is released
    /// when the body ends, fails or is dropped, not when the headers arrive.
    Upstream {
        body: UpstreamBody,
        guard: Option<InFlight>,
        idle: IdleTimer,
    },
    /// A generated answer, or an upgrade's empty body.
    Own(ProxyBody),
}

impl Answer {
    /// A proxied upstream body, streamed; see [`Answer::Upstream`]. It fails with
    /// [`StreamIdle`] once the upstream sends nothing for `idle`.
    pub fn streamed(body: UpstreamBody, guard: Option<InFlight>, idle: Duration) -> Answer {
        Answer::Upstream {
            body,
            guard,
            idle: IdleTimer::new(idle),
        }
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Answer::Upstream { body, guard, idle } => {
                let polled = Pin::new(body).poll_frame(cx);
                match polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        // An empty DATA frame moves no byte, so it is no progress.
                        if frame.data_ref().is_none_or(|d| !d.is_empty()) {
                            idle.progressed();
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Pending => {
                        if idle.expired(cx) {
                            guard.take();
                            return Poll::Ready(Some(Err(Box::new(StreamIdle))));
                        }
                        Poll::Pending
                    }
                    Poll::Ready(None) => {
                        guard.take();
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        guard.take();
                        Poll::Ready(Some(Err(Box::new(e))))
                    }
                }
            }
            Answer::Own(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Answer::Upstream { body, .. } => body.is_end_stream(),
            Answer::Own(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Answer::Upstream { body, .. } => body.size_hint(),
            Answer::Own(body) => body.size_hint(),
        }
    }
}

/// A response body from upstream, or a request body from downstream, that moved no
/// byte for the stream idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("stream idle timeout")]
pub struct StreamIdle;

/// The stream idle deadline of one body: armed when a poll finds nothing to read, and
/// disarmed by the next frame, so it fires only after `limit` without any. The timer is
/// made the first time it is armed: a body whose frames are always ready costs none.
pub(crate) struct IdleTimer {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl IdleTimer {
    pub fn new(limit: Duration) -> IdleTimer {
        IdleTimer {
            limit,
            sleep: None,
            armed: false,
        }
    }

    /// A frame arrived.
    #[inline]
    pub fn progressed(&mut self) {
        self.armed = false;
    }

    /// Called when the body had nothing to read: arms the deadline (`limit` from now)
    /// unless it is armed already, and tells whether it has passed; until then `cx` is
    /// woken when it does.
    pub fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        // A zero limit turns the timeout off, as Envoy's `stream_idle_timeout: 0` does.
        if self.limit.is_zero() {
            return false;
        }
        if !self.armed {
            self.armed = true;
            let now = tokio::time::Instant::now();
            // A limit too large to add never fires (about 30 years out).
            let deadline = now
                .checked_add(self.limit)
                .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
            match self.sleep.as_mut() {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        self.sleep
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }
}

/// The stream idle limit of request bodies and where their timeouts are counted.
#[derive(Debug, Clone)]
pub struct RequestIdle {
    pub limit: Duration,
    /// `stream_idle_timeouts_total{direction="request"}`.
    pub timeouts: IntCounter,
}

/// Why the request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// More bytes than `max_body_size` arrived.
    #[error("request body too large")]
    TooLarge,
    /// The client sent no byte of its body for the stream idle timeout.
    #[error("request body idle timeout")]
    Idle(#[source] StreamIdle),
    /// Reading from downstream failed (the client went away, or sent bad framing).
    #[error("reading the request body failed")]
    Downstream(#[source] hyper::Error),
    /// A mirror's copy of the body was abandoned before its end: the mirror fell
    /// behind, or the request it copies stopped short.
    #[error("mirrored request body abandoned")]
    MirrorAbandoned,
}

/// Where a request body's bytes come from: the downstream client, or (for a mirror's
/// copy) the request body it copies.
enum Inbound {
    Client(Incoming),
    Mirror(MirrorFeed),
}

impl Inbound {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        match self {
            Inbound::Client(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(RequestBodyError::Downstream),
            Inbound::Mirror(feed) => feed.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Inbound::Client(body) => body.is_end_stream(),
            Inbound::Mirror(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Inbound::Client(body) => body.size_hint(),
            Inbound::Mirror(feed) => feed.size_hint(),
        }
    }
}

/// A body no attempt has taken yet, with the mirrors' copies of it.
struct Pending {
    body: Inbound,
    tee: Option<Tee>,
}

/// The downstream body, shared by every attempt to send one request upstream. It stays
/// here until an attempt first polls it, so an attempt that failed before sending any
/// of the body (a refused connect, a pooled connection found closed) leaves it for the
/// next one.
struct BodySource {
    slot: Mutex<Option<Pending>>,
    progress: Arc<BodyProgress>,
    idle: RequestIdle,
}

/// How far a request body got: bytes read from downstream across attempts (for metrics
/// and the access log), and whether it passed the limit. Shared apart from the body
/// itself, so that reading it after the exchange does not keep the downstream body open.
#[derive(Debug, Default)]
pub struct BodyProgress {
    exceeded: AtomicBool,
    received: AtomicU64,
    /// The body was read from downstream to its end.
    complete: AtomicBool,
    /// A stream idle timeout ended the body (counted once, by whoever set this).
    idle_timed_out: AtomicBool,
}

impl BodyProgress {
    /// Whether the whole body has been read from downstream (always, for a request
    /// without one).
    pub fn complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Whether the body passed the limit (the forwarder answers 413 then, whatever the
    /// upstream client reports).
    pub fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Acquire)
    }

    /// Body bytes read from downstream so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// The progress of a body that had no bytes from the start: complete, never over.
    pub(crate) fn of_empty() -> &'static BodyProgress {
        &EMPTY_PROGRESS
    }
}

impl BodySource {
    /// Counts and logs the stream idle timeout that ended this body, once whoever finds
    /// it first: the body itself (the client stopped sending) or the task finishing an
    /// upload (the upstream stopped reading).
    fn idle_timeout(&self, why: &'static str) {
        if !self.progress.idle_timed_out.swap(true, Ordering::AcqRel) {
            self.idle.timeouts.inc();
            tracing::info!(
                limit = ?self.idle.limit,
                why,
                "request body idle for the stream idle timeout; aborting"
            );
        }
    }
}

/// A watch on an upload that goes on after the response began: whether it still moves.
#[derive(Clone)]
pub(crate) struct UploadWatch {
    source: Arc<BodySource>,
}

impl UploadWatch {
    /// The stream idle limit; zero when it is off.
    pub fn limit(&self) -> Duration {
        self.source.idle.limit
    }

    /// Body bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.source.progress.received()
    }

    /// Whether the whole body has been read from the client.
    pub fn complete(&self) -> bool {
        self.source.progress.complete()
    }

    /// Counts and logs the timeout of an upload the upstream stopped reading.
    pub fn timed_out(&self) {
        self.source.idle_timeout("the upstream stopped reading it");
    }
}

/// The progress of a body that had no bytes from the start: never read, never over.
static EMPTY_PROGRESS: BodyProgress = BodyProgress {
    exceeded: AtomicBool::new(false),
    received: AtomicU64::new(0),
    complete: AtomicBool::new(true),
    idle_timed_out: AtomicBool::new(false),
};

/// The downstream request body on its way upstream: streamed, counted, and cut off with
/// [`RequestBodyError::TooLarge`] once it passes the limit, which its [`BodyProgress`]
/// records. A body that is empty from the start (most requests) shares nothing and
/// allocates nothing.
pub struct RequestBody {
    /// `None` when the body was empty from the start: any attempt can send it again.
    source: Option<Arc<BodySource>>,
    inner: Option<Inbound>,
    /// The mirrors' copies, fed with every frame read; taken with the body.
    tee: Option<Tee>,
    taken: bool,
    limit: Option<u64>,
    seen: u64,
    /// Made when this attempt takes the body from its source.
    idle: Option<IdleTimer>,
}

impl RequestBody {
    /// `inner` limited to `limit` bytes, failing with [`RequestBodyError::Idle`] when
    /// the client sends nothing for `idle.limit`.
    pub fn new(inner: Incoming, limit: Option<u64>, idle: &RequestIdle) -> RequestBody {
        RequestBody::teed(inner, limit, idle, None)
    }

    /// [`RequestBody::new`], also feeding every frame read to the mirrors' copies in
    /// `tee` (never waiting for them). A body empty from the start feeds nothing.
    pub(crate) fn teed(
        inner: Incoming,
        limit: Option<u64>,
        idle: &RequestIdle,
        tee: Option<Tee>,
    ) -> RequestBody {
        let empty = inner.is_end_stream();
        RequestBody::with_source(
            (!empty).then(|| Pending {
                body: Inbound::Client(inner),
                tee,
            }),
            limit,
            idle.clone(),
        )
    }

    /// A mirror's copy of a request body, ending as the body it copies ends, failing
    /// with [`RequestBodyError::MirrorAbandoned`] when that one stops short. Without a
    /// limit or idle timeout of its own: the body it copies has them.
    pub(crate) fn mirror(feed: MirrorFeed, idle: &RequestIdle) -> RequestBody {
        let idle = RequestIdle {
            limit: Duration::ZERO,
            timeouts: idle.timeouts.clone(),
        };
        RequestBody::with_source(
            Some(Pending {
                body: Inbound::Mirror(feed),
                tee: None,
            }),
            None,
            idle,
        )
    }

    /// An empty body, for a mirror's copy of a request without one.
    pub(crate) fn empty() -> RequestBody {
        RequestBody {
            source: None,
            inner: None,
            tee: None,
            taken: false,
            limit: None,
            seen: 0,
            idle: None,
        }
    }

    fn with_source(pending: Option<Pending>, limit: Option<u64>, idle: RequestIdle) -> RequestBody {
        let source = pending.map(|pending| {
            Arc::new(BodySource {
                slot: Mutex::new(Some(pending)),
                progress: Arc::default(),
                idle,
            })
        });
        RequestBody {
            source,
            inner: None,
            tee: None,
            taken: false,
            limit,
            seen: 0,
            idle: None,
        }
    }

    /// How far the body got, shared with every attempt; `None` for a body that was empty
    /// from the start.
    pub fn progress(&self) -> Option<Arc<BodyProgress>> {
        self.source.as_ref().map(|s| s.progress.clone())
    }

    /// [`RequestBody::progress`] without sharing it.
    pub fn progress_ref(&self) -> &BodyProgress {
        self.source
            .as_ref()
            .map_or(&EMPTY_PROGRESS, |s| &s.progress)
    }

    /// A watch on this body's upload, for one that may outlive the response head;
    /// `None` for a body that was empty from the start.
    pub(crate) fn upload_watch(&self) -> Option<UploadWatch> {
        self.source.as_ref().map(|source| UploadWatch {
            source: source.clone(),
        })
    }

    /// Whether the request has no body at all.
    pub fn is_empty(&self) -> bool {
        self.source.is_none()
    }

    /// Whether no attempt has read any of the body yet.
    pub fn untouched(&self) -> bool {
        self.slot().is_none_or(|slot| slot.is_some())
    }

    /// The same body for another attempt, when it can be sent again in full: it was
    /// empty, or no attempt has read from it.
    pub fn replay(&self) -> Option<RequestBody> {
        if !self.untouched() {
            return None;
        }
        Some(RequestBody {
            source: self.source.clone(),
            inner: None,
            tee: None,
            taken: false,
            limit: self.limit,
            seen: 0,
            idle: None,
        })
    }

    /// The shared slot; `None` for a body that was empty from the start.
    fn slot(&self) -> Option<std::sync::MutexGuard<'_, Option<Pending>>> {
        self.source
            .as_ref()
            .map(|s| s.slot.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = &mut *self;
        if !this.taken {
            this.taken = true;
            let taken = this.slot().and_then(|mut slot| slot.take());
            if let Some(pending) = taken {
                this.inner = Some(pending.body);
                this.tee = pending.tee;
            }
            this.idle = this.source.as_ref().map(|s| IdleTimer::new(s.idle.limit));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = inner.poll_frame(cx);
        if let Some(idle) = this.idle.as_mut() {
            if polled.is_pending() {
                if idle.expired(cx) {
                    // The error ends this body, and no other attempt can take it (it
                    // was read from).
                    if let Some(source) = &this.source {
                        source.idle_timeout("no byte from the client");
                    }
                    this.inner = None;
                    // Dropping the tee abandons the mirrors' copies.
                    this.tee = None;
                    return Poll::Ready(Some(Err(RequestBodyError::Idle(StreamIdle))));
                }
            } else if matches!(&polled, Poll::Ready(Some(Ok(f))) if f.data_ref().is_none_or(|d| !d.is_empty()))
            {
                // An empty DATA frame moves no byte, so it is no progress.
                idle.progressed();
            }
        }
        // hyper stops polling once `is_end_stream` says so, so the end is recorded with
        // the last frame too, not only at `None`.
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
            _ => false,
        };
        if ended {
            this.progress_ref().complete.store(true, Ordering::Release);
        }
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                if let Some(tee) = this.tee.take() {
                    tee.finish();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.tee = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    // A frame with data came from a body that was not empty, so there is
                    // a source whose progress to record.
                    let progress = this.progress_ref();
                    progress
                        .received
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if this.limit.is_some_and(|limit| this.seen > limit) {
                        progress.exceeded.store(true, Ordering::Release);
                        this.tee = None;
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge)));
                    }
                }
                if let Some(tee) = this.tee.as_mut() {
                    tee.offer(&frame);
                    if ended && let Some(tee) = this.tee.take() {
                        tee.finish();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match (&self.inner, self.taken) {
            (Some(inner), _) => inner.is_end_stream(),
            (None, true) => true,
            (None, false) => self
                .slot()
                .is_none_or(|slot| slot.as_ref().is_none_or(|p| p.body.is_end_stream())),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, self.taken) {
            (Some(inner), _) => inner.size_hint(),
            (None, true) => SizeHint::with_exact(0),
            (None, false) => self.slot().map_or_else(
                || SizeHint::with_exact(0),
                |slot| {
                    slot.as_ref()
                        .map_or_else(|| SizeHint::with_exact(0), |p| p.body.size_hint())
                },
            ),
        }
    }
}
