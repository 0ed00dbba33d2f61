//! Body types of the data path: the streamed, size-limited request body sent upstream,
//! and the one boxed response body type for proxied and generated answers.
//!
//! Bodies are streamed frame by frame in both directions; nothing here buffers a whole
//! body.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::errors::BoxError;

/// The response body type of every answer the proxy gives.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A complete in-memory body (generated answers).
pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A proxied upstream body, streamed.
pub fn streamed(body: Incoming) -> ProxyBody {
    body.map_err(|e| Box::new(e) as BoxError).boxed()
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

/// The downstream request body on its way upstream: streamed, counted, and cut off with
/// [`RequestBodyError::TooLarge`] once it passes the limit. `exceeded` records the cut so
/// that the forwarder can answer 413 whatever error the upstream client reports.
pub struct RequestBody {
    inner: Incoming,
    limit: Option<u64>,
    seen: u64,
    exceeded: Arc<AtomicBool>,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: Option<u64>) -> RequestBody {
        RequestBody {
            inner,
            limit,
            seen: 0,
            exceeded: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A flag that becomes true when the body passes the limit.
    pub fn exceeded_flag(&self) -> Arc<AtomicBool> {
        self.exceeded.clone()
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(RequestBodyError::Downstream(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if this.limit.is_some_and(|limit| this.seen > limit) {
                        this.exceeded.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
