//! Request-path errors: what can go wrong between receiving a request and sending
//! the upstream response headers, and the answer each one becomes.
//!
//! The handler's inner function returns `Result<_, ProxyError>`; the outer one turns an
//! error into its response with [`ProxyError::to_response`], so every failure is a
//! short text/plain answer and nothing on the request path panics.

use std::error::Error as StdError;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, LOCATION};
use http::{Response, StatusCode};

use super::body::{ProxyBody, full};
use crate::model::ObjectRef;
use crate::model::matching::HostError;

/// Boxed error sources.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Which side of the proxy a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The downstream client sent something unusable.
    Downstream,
    /// The upstream could not be reached or misbehaved.
    Upstream,
    /// Portcullis' own configuration or state decided the answer.
    Internal,
}

/// Everything that turns a request into an answer Portcullis generates itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// `Host` and the request authority disagree, or the host is malformed.
    #[error("bad request: {0}")]
    Host(#[source] HostError),
    /// The request cannot be forwarded as sent (such as a non-ASCII `Host`).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The path cannot be normalised (`--path-normalization on`).
    #[error("bad request: {0}")]
    Path(#[source] crate::model::path::PathError),
    /// The request target (path and query) is longer than the proxy accepts.
    #[error("request target too long")]
    UriTooLong,
    /// No route and no default backend.
    #[error("no route for {host} {path}")]
    NoRoute { host: String, path: String },
    /// The route's cluster has no endpoint to send to.
    #[error("no endpoints for {0}")]
    NoEndpoints(ObjectRef),
    /// The request's host is a TLS virtual host whose certificate (by Secret) is not the
    /// one this TLS connection chose at handshake.
    #[error("misdirected request")]
    Misdirected,
    /// The opt-in plain-HTTP → HTTPS redirect: 308 to this `Location`.
    #[error("redirect to https")]
    HttpsRedirect(HeaderValue),
    /// A route's redirect (Gateway API `RequestRedirect`): this status and `Location`.
    #[error("redirect")]
    Redirect(StatusCode, HeaderValue),
    /// A route's own answer: this status and body.
    #[error("{1}")]
    Direct(StatusCode, std::sync::Arc<str>),
    /// The share of a route's traffic that goes to a backendRef that cannot be used
    /// (Gateway API: 500); names the route's object.
    #[error("invalid backend for {0}")]
    InvalidBackend(ObjectRef),
    /// The request body is larger than `max_body_size`.
    #[error("request body too large")]
    BodyTooLarge,
    /// Reading the request body from downstream failed.
    #[error("request body error")]
    DownstreamBody(#[source] BoxError),
    /// The client sent no byte of its request body for the stream idle timeout, before
    /// the upstream answered.
    #[error("request body idle timeout")]
    RequestBodyIdle,
    /// Connecting or waiting for the response headers took too long.
    #[error("upstream timeout")]
    UpstreamTimeout,
    /// The upstream refused, reset, or answered with something that is not HTTP.
    #[error("upstream error: {reason}")]
    Upstream {
        reason: &'static str,
        /// The failure happened while connecting: nothing of the request was sent.
        connecting: bool,
        #[source]
        source: Option<BoxError>,
    },
}

impl ProxyError {
    /// The status code of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Host(_)
            | ProxyError::BadRequest(_)
            | ProxyError::Path(_)
            | ProxyError::DownstreamBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::RequestBodyIdle => StatusCode::REQUEST_TIMEOUT,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::HttpsRedirect(_) => StatusCode::PERMANENT_REDIRECT,
            ProxyError::Redirect(status, _) | ProxyError::Direct(status, _) => *status,
            ProxyError::InvalidBackend(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::NoEndpoints(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether an HTTP/1 connection is closed after this answer: the request itself was
    /// malformed (its head, or its body's framing), so nothing later on the same
    /// connection can be trusted to be framed as the client meant it.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::Host(_)
                | ProxyError::BadRequest(_)
                | ProxyError::Path(_)
                | ProxyError::UriTooLong
                | ProxyError::DownstreamBody(_)
                | ProxyError::RequestBodyIdle
        )
    }

    /// Where the failure came from.
    pub fn origin(&self) -> Origin {
        match self {
            ProxyError::Host(_)
            | ProxyError::BadRequest(_)
            | ProxyError::Path(_)
            | ProxyError::UriTooLong
            | ProxyError::BodyTooLarge
            | ProxyError::Misdirected
            | ProxyError::DownstreamBody(_)
            | ProxyError::RequestBodyIdle => Origin::Downstream,
            ProxyError::NoRoute { .. }
            | ProxyError::NoEndpoints(_)
            | ProxyError::HttpsRedirect(_)
            | ProxyError::Redirect(..)
            | ProxyError::Direct(..)
            | ProxyError::InvalidBackend(_) => Origin::Internal,
            ProxyError::UpstreamTimeout | ProxyError::Upstream { .. } => Origin::Upstream,
        }
    }

    /// Whether sending the same request again (to another endpoint) is safe: only when
    /// the request never reached an upstream. Bodies are streamed, so this is only
    /// useful for requests whose body was not consumed.
    pub fn retry_safe(&self) -> bool {
        matches!(
            self,
            ProxyError::Upstream {
                connecting: true,
                ..
            }
        )
    }

    /// The generated answer: the status and the error's message as text/plain.
    pub fn to_response(&self) -> Response<ProxyBody> {
        if let ProxyError::HttpsRedirect(location) | ProxyError::Redirect(_, location) = self {
            let mut resp = Response::new(full(Bytes::new()));
            *resp.status_mut() = self.status();
            resp.headers_mut().insert(LOCATION, location.clone());
            return resp;
        }
        let mut resp = Response::new(full(Bytes::from(self.to_string())));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

/// Whether an error of type `T` is anywhere in `err`'s source chain.
pub(crate) fn chain_has<T: StdError + 'static>(err: &(dyn StdError + 'static)) -> bool {
    find_in_chain::<T>(err).is_some()
}

/// The first error of type `T` in `err`'s source chain, `err` included.
pub(crate) fn find_in_chain<'a, T: StdError + 'static>(
    err: &'a (dyn StdError + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_and_statuses_follow_the_contract() {
        let cases = [
            (
                ProxyError::NoRoute {
                    host: "a.example".into(),
                    path: "/x".into(),
                },
                404,
                "no route for a.example /x",
            ),
            (
                ProxyError::NoEndpoints(ObjectRef::new("ns", "svc")),
                503,
                "no endpoints for ns/svc",
            ),
            (ProxyError::BodyTooLarge, 413, "request body too large"),
            (ProxyError::UriTooLong, 414, "request target too long"),
            (ProxyError::Misdirected, 421, "misdirected request"),
            (ProxyError::UpstreamTimeout, 504, "upstream timeout"),
            (
                ProxyError::InvalidBackend(ObjectRef::new("ns", "web")),
                500,
                "invalid backend for ns/web",
            ),
            (
                ProxyError::Upstream {
                    reason: "connection refused",
                    connecting: true,
                    source: None,
                },
                502,
                "upstream error: connection refused",
            ),
        ];
        for (err, status, body) in cases {
            assert_eq!(err.status().as_u16(), status);
            assert_eq!(err.to_string(), body);
        }
    }
}
