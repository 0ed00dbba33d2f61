//! Body types of the data path: the streamed, size-limited request body sent upstream,
//! and the one boxed response body type for proxied and generated answers.
//!
//! Bodies are streamed frame by frame in both directions; nothing here buffers a whole
//! body.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::balance::InFlight;
use super::errors::BoxError;
use super::forward::UpstreamBody;

/// The response body type of every answer the proxy gives.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A complete in-memory body (generated answers).
pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A proxied upstream body, streamed. `guard` (the endpoint's in-flight count) is
/// released when the body ends, fails or is dropped, not when the headers arrive.
pub(crate) fn streamed(body: UpstreamBody, guard: Option<InFlight>) -> ProxyBody {
    Guarded { inner: body, guard }
        .map_err(|e| Box::new(e) as BoxError)
        .boxed()
}

/// A response body that holds an endpoint's in-flight guard until it is done.
struct Guarded {
    inner: UpstreamBody,
    guard: Option<InFlight>,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.take();
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

/// Why the request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// More bytes than `max_body_size` arrived.
    #[error("request body too large")]
    TooLarge,
    /// Reading from downstream failed (the client went away, or sent bad framing).
    #[error("reading the request body failed")]
    Downstream(#[source] hyper::Error),
}

/// The downstream body, shared by every attempt to send one request upstream. It stays
/// here until an attempt first polls it, so an attempt that failed before sending any
/// of the body (a refused connect, a pooled connection found closed) leaves it for the
/// next one.
struct BodySource {
    slot: Mutex<Option<Incoming>>,
    /// The body was empty from the start: any attempt can send it again.
    empty: bool,
    exceeded: Arc<AtomicBool>,
    /// Body bytes read from downstream, across attempts (for metrics and the access log).
    received: Arc<AtomicU64>,
}

/// The downstream request body on its way upstream: streamed, counted, and cut off with
/// [`RequestBodyError::TooLarge`] once it passes the limit. `exceeded` records the cut so
/// that the forwarder can answer 413 whatever error the upstream client reports.
pub struct RequestBody {
    source: Arc<BodySource>,
    inner: Option<Incoming>,
    taken: bool,
    limit: Option<u64>,
    seen: u64,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: Option<u64>) -> RequestBody {
        let empty = inner.is_end_stream();
        RequestBody {
            source: Arc::new(BodySource {
                slot: Mutex::new(Some(inner)),
                empty,
                exceeded: Arc::new(AtomicBool::new(false)),
                received: Arc::new(AtomicU64::new(0)),
            }),
            inner: None,
            taken: false,
            limit,
            seen: 0,
        }
    }

    /// A flag that becomes true when the body passes the limit.
    pub fn exceeded_flag(&self) -> Arc<AtomicBool> {
        self.source.exceeded.clone()
    }

    /// The count of body bytes read from downstream so far, shared with every attempt.
    pub fn received_counter(&self) -> Arc<AtomicU64> {
        self.source.received.clone()
    }

    /// Whether the request has no body at all.
    pub fn is_empty(&self) -> bool {
        self.source.empty
    }

    /// Whether no attempt has read any of the body yet.
    pub fn untouched(&self) -> bool {
        self.source.empty || self.slot().is_some()
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
            taken: false,
            limit: self.limit,
            seen: 0,
        })
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Incoming>> {
        self.source.slot.lock().unwrap_or_else(|e| e.into_inner())
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
            let taken = this.slot().take();
            this.inner = taken;
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(RequestBodyError::Downstream(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    this.source
                        .received
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if this.limit.is_some_and(|limit| this.seen > limit) {
                        this.source.exceeded.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge)));
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
            (None, false) => self.slot().as_ref().is_none_or(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, self.taken) {
            (Some(inner), _) => inner.size_hint(),
            (None, true) => SizeHint::with_exact(0),
            (None, false) => self
                .slot()
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), Body::size_hint),
        }
    }
}
