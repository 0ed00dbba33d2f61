//! Request handling: one snapshot load, the routing decision, endpoint choice,
//! header rewriting, forwarding, and the answer, with metrics and the request id.
//!
//! [`handle`] is the outer handler: it always produces a response. The inner
//! [`proxy`] uses `?` with [`ProxyError`], which knows its status and body.
//!
//! One request is retried at most once for each of three reasons:
//! - after a failed connect, on another endpoint (nothing was sent);
//! - after a pooled connection turned out closed before any response byte, on a fresh
//!   connection to the same endpoint (the keep-alive race);
//! - after a connection, fresh or pooled, was reset or closed after the request was
//!   written and before a response head: on another endpoint (the same one when it is
//!   the only one), only for an idempotent method without a body, and only within the
//!   Service's retry budget ([`super::retry`]).
//!
//! The first two only while the request body can still be sent in full (and, for the
//! second, when the method is idempotent or none of the body was read). So an endpoint
//! that dies, with idle pooled connections or mid-request, costs no GET: the fresh
//! connection is refused or the request reset, and it moves on to another endpoint.
//! Refused connects and resets are reported to passive health. A `101 Switching
//! Protocols` answer to an upgrade request hands both sockets to a tunnel.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::header::{
    CONNECTION, CONTENT_LENGTH, EXPECT, HOST, HeaderValue, STRICT_TRANSPORT_SECURITY, UPGRADE,
};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use prometheus::{IntCounter, IntGauge};
use tokio::time::Sleep;
use tracing::debug;

use super::Inner;
use super::balance::is_h2c;
use super::body::{Answer, ProxyBody, RequestBody, full};
use super::errors::ProxyError;
use super::forward::{FailureKind, Via};
use super::headers::{self, ConnForwarded, X_REQUEST_ID};
use super::mirror;
use super::observe::{Exchange, Observer, RequestHead, finish_with};
use super::upgrade;
use crate::metrics::RouteSeries;
use crate::model::path::normalize;
use crate::model::{
    Action, BackendTarget, Cluster, Decision, Filters, ListenerKind, PathType, Redirect,
    RequestFacts, Route, RouteKind, Snapshot, Timeouts, request_host,
};

/// The longest path and query accepted (414 beyond), as nginx's default
/// `large_client_header_buffers` allows. A request head longer than `max_header_size`
/// is refused by hyper with 431 before it gets here.
const MAX_REQUEST_TARGET: usize = 8 * 1024;

/// The connection series of one listener (`connections_total` and the
/// `open_connections` gauges by protocol), resolved once per listener rather than per
/// connection.
pub struct ListenerSeries {
    accepted: IntCounter,
    detecting: IntGauge,
    http1: IntGauge,
    h2: IntGauge,
}

impl ListenerSeries {
    pub fn new(metrics: &crate::metrics::Metrics, listener: &'static str) -> Arc<ListenerSeries> {
        let open = |protocol: &str| {
            metrics
                .open_connections
                .with_label_values(&[listener, protocol])
        };
        Arc::new(ListenerSeries {
            accepted: metrics.connections_total.with_label_values(&[listener]),
            detecting: open("detecting"),
            http1: open("http1"),
            h2: open("h2"),
        })
    }
}

/// Per-connection state shared by the connection task and its requests.
pub struct ConnState {
    pub peer: SocketAddr,
    /// What the TLS handshake settled; `None` on plain connections.
    pub tls: Option<super::tls::TlsConnInfo>,
    first_request: AtomicBool,
    /// The connection speaks HTTP/2.
    h2: AtomicBool,
    first_request_notify: tokio::sync::Notify,
    /// The `open_connections` series this connection is counted in.
    gauge: Mutex<Option<IntGauge>>,
    /// `X-Forwarded-*` values that are the same for every request on this connection:
    /// the peer, the listener's local port and `http` or `https`.
    forwarded: ConnForwarded,
    series: Arc<ListenerSeries>,
    /// The upstream response timer, lent to one request at a time (see [`TimerLease`]).
    response_timer: Mutex<Option<Pin<Box<Sleep>>>>,
    /// When this connection began waiting for its next request head, in nanoseconds
    /// since `opened`; [`HEAD_NOT_AWAITED`] while a request is in flight or once the
    /// connection speaks HTTP/2 (whose streams are not timed this way).
    head_awaited_since: AtomicU64,
    /// Since when writes to the client have been waiting for it to read, in
    /// nanoseconds since `opened`; [`WRITES_FLOWING`] while they are not.
    write_blocked_since: AtomicU64,
    opened: Instant,
}

/// `write_blocked_since` while writes to the client are not waiting.
const WRITES_FLOWING: u64 = u64::MAX;

/// `head_awaited_since` while no request head is awaited.
const HEAD_NOT_AWAITED: u64 = u64::MAX;

impl ConnState {
    /// Counts the connection as open, protocol `detecting`, until it is dropped.
    pub fn new(
        peer: SocketAddr,
        local_port: u16,
        proto: &'static str,
        series: Arc<ListenerSeries>,
    ) -> ConnState {
        let gauge = series.detecting.clone();
        gauge.inc();
        series.accepted.inc();
        ConnState {
            peer,
            tls: None,
            first_request: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            first_request_notify: tokio::sync::Notify::new(),
            gauge: Mutex::new(Some(gauge)),
            forwarded: ConnForwarded::new(peer.ip(), proto, local_port),
            series,
            response_timer: Mutex::new(None),
            head_awaited_since: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(WRITES_FLOWING),
            opened: Instant::now(),
        }
    }

    /// The same connection state, for a connection that completed a TLS handshake.
    pub fn with_tls(mut self, info: super::tls::TlsConnInfo) -> ConnState {
        self.tls = Some(info);
        self
    }

    /// Whether a complete request head has arrived on this connection.
    pub fn seen_request(&self) -> bool {
        self.first_request.load(Ordering::Acquire)
    }

    /// Resolves once a complete request head has arrived on this connection.
    pub async fn first_request(&self) {
        let notified = self.first_request_notify.notified();
        if !self.seen_request() {
            notified.await;
        }
    }

    /// When a request head that is awaited now must have arrived, given the
    /// `header_read_timeout`; `None` while none is awaited. A connection awaits a head
    /// from when it opens and again from the end of each HTTP/1 response (so the limit
    /// is also the keep-alive idle limit), until the head is complete.
    pub fn head_deadline(&self, limit: Duration) -> Option<Instant> {
        match self.head_awaited_since.load(Ordering::Acquire) {
            HEAD_NOT_AWAITED => None,
            since => Some(self.opened + Duration::from_nanos(since) + limit),
        }
    }

    /// A write to the client could not go on (its socket buffer is full): from now on,
    /// until a write goes through, the connection is stalled on the client. Reads the
    /// clock only when a stall begins.
    #[inline]
    pub(crate) fn write_blocked(&self) {
        if self.write_blocked_since.load(Ordering::Relaxed) == WRITES_FLOWING {
            let since = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
            self.write_blocked_since.store(since, Ordering::Relaxed);
        }
    }

    /// A write to the client went through.
    #[inline]
    pub(crate) fn write_flowed(&self) {
        if self.write_blocked_since.load(Ordering::Relaxed) != WRITES_FLOWING {
            self.write_blocked_since
                .store(WRITES_FLOWING, Ordering::Relaxed);
        }
    }

    /// When a stall on the client that is going on now reaches `limit`; `None` while
    /// writes are flowing.
    pub fn write_stall_deadline(&self, limit: Duration) -> Option<Instant> {
        match self.write_blocked_since.load(Ordering::Relaxed) {
            WRITES_FLOWING => None,
            since => self
                .opened
                .checked_add(Duration::from_nanos(since))
                .and_then(|t| t.checked_add(limit)),
        }
    }

    /// The response to the request in flight has ended: on HTTP/1 the next request
    /// head is awaited from now.
    pub(crate) fn response_ended(&self) {
        if self.head_awaited_since.load(Ordering::Relaxed) == HEAD_NOT_AWAITED
            && self.first_request.load(Ordering::Relaxed)
            && !self.h2.load(Ordering::Relaxed)
        {
            let since = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
            self.head_awaited_since.store(since, Ordering::Release);
        }
    }

    /// Marks a request head as complete; the first one also moves the connection to
    /// its protocol's gauge.
    fn request_arrived(&self, version: Version) {
        self.head_awaited_since
            .store(HEAD_NOT_AWAITED, Ordering::Release);
        if self.first_request.swap(true, Ordering::AcqRel) {
            return;
        }
        if version == Version::HTTP_2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.first_request_notify.notify_waiters();
        let next = if version == Version::HTTP_2 {
            self.series.h2.clone()
        } else {
            self.series.http1.clone()
        };
        next.inc();
        let mut cur = self.gauge.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = cur.replace(next) {
            old.dec();
        }
    }
}

/// A connection's upstream response timer, lent to one request and set to its
/// deadline. The requests of an HTTP/1 connection come one after another, so they reuse
/// one tokio timer: moving a pending timer to a later deadline is an atomic update,
/// where a new timer costs a timer-wheel insertion and removal per request. An HTTP/2
/// stream that finds the timer lent out uses one of its own. Given back when dropped.
struct TimerLease<'a> {
    conn: &'a ConnState,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<'a> TimerLease<'a> {
    fn new(conn: &'a ConnState, deadline: tokio::time::Instant) -> TimerLease<'a> {
        let lent = conn
            .response_timer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let timer = match lent {
            Some(mut timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        TimerLease {
            conn,
            timer: Some(timer),
        }
    }

    /// The timer, firing at the deadline given to [`TimerLease::new`] or the last
    /// [`TimerLease::reset`].
    fn timer(&mut self) -> Option<Pin<&mut Sleep>> {
        self.timer.as_mut().map(Pin::as_mut)
    }

    /// Moves the deadline.
    fn reset(&mut self, deadline: tokio::time::Instant) {
        if let Some(timer) = self.timer.as_mut() {
            timer.as_mut().reset(deadline);
        }
    }
}

impl Drop for TimerLease<'_> {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            let mut slot = self
                .conn
                .response_timer
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(timer);
            }
        }
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        let cur = self.gauge.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = cur.take() {
            g.dec();
        }
    }
}

/// The outer handler: answers every request, stamps `x-request-id` and records metrics.
pub async fn handle(
    inner: &Inner,
    conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let version = req.version();
    conn.request_arrived(version);
    let request_id = headers::request_id(req.headers());
    let method = req.method().clone();
    let logging = inner.access_log.enabled();
    let head = logging.then(|| RequestHead::of(&req));
    let mut exchange = Exchange::default();
    let mut hsts = None;
    let mut close = false;
    let mut resp = match proxy(
        inner,
        &conn,
        req,
        start,
        &request_id,
        &mut exchange,
        &mut hsts,
        logging,
    )
    .await
    {
        Ok(resp) => resp,
        Err(err) => {
            debug!(
                request_id = ?request_id,
                status = err.status().as_u16(),
                origin = ?err.origin(),
                error = %err,
                cause = ?std::error::Error::source(&err).map(ToString::to_string),
                "request answered by the proxy"
            );
            close = err.closes_connection();
            err.to_response().map(Answer::Own)
        }
    };
    let elapsed = start.elapsed().as_secs_f64();
    let series = exchange
        .series
        .get_or_insert_with(|| inner.metrics.route("", "", "", ""))
        .clone();
    let labels = &series.labels;
    debug!(
        request_id = ?request_id,
        %method,
        status = resp.status().as_u16(),
        namespace = %labels.namespace,
        route_kind = labels.route_kind,
        route = %labels.route,
        service = %labels.service,
        seconds = elapsed,
        "answered"
    );
    resp.headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    if let Some(v) = hsts {
        resp.headers_mut().insert(STRICT_TRANSPORT_SECURITY, v);
    }
    // Draining: HTTP/1 clients are told to reconnect (elsewhere) after this response.
    // After a malformed request, the connection is closed after the 400.
    if (close || *inner.draining.borrow())
        && version < Version::HTTP_2
        && resp.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    series.observe_request(&inner.metrics, &method, resp.status(), elapsed);
    finish_with(
        resp,
        exchange,
        Observer {
            metrics: inner.metrics.clone(),
            log: inner.access_log.clone(),
            start,
            head,
            client: conn.peer,
            request_id,
            tls_version: conn.tls.as_ref().map(|t| t.version),
            conn,
        },
    )
}

/// Where a request goes, decided under one snapshot guard.
struct Routed {
    /// The cluster, shared with the snapshot; holding it does not hold the snapshot.
    cluster: Arc<Cluster>,
    /// The route's metric series; also the Service's `ns/name` for upstream metrics.
    series: Arc<RouteSeries>,
    /// The request body limit: the Ingress' annotation, else the global one.
    max_body_size: Option<u64>,
    /// The route's filters, then the chosen backend's, to apply in that order.
    filters: [Option<Arc<Filters>>; 2],
    /// The route's time limits.
    timeouts: Timeouts,
    /// The part of the path a Prefix route matched (its key), for `ReplacePrefixMatch`.
    matched_prefix: Option<Arc<str>>,
    /// The clusters of the route's and the chosen backend's `RequestMirror` filters.
    mirrors: Vec<Arc<Cluster>>,
}

/// Routes `path` (normalised, unless normalisation is off) with the snapshot in force:
/// one `load()`, and nothing borrowed from it survives this function. The TLS rules
/// (421, redirect, HSTS) use the same snapshot; a redirect keeps the target as received.
/// A route that redirects or answers itself, and the share of a route's traffic that
/// goes to an invalid backend, come back as the [`ProxyError`] that answers them.
#[inline]
#[allow(clippy::too_many_arguments)]
fn route(
    inner: &Inner,
    conn: &ConnState,
    host: Option<&str>,
    uri: &Uri,
    path: &str,
    facts: &RequestFacts<'_>,
    route_series: &mut Option<Arc<RouteSeries>>,
    hsts: &mut Option<HeaderValue>,
) -> Result<Routed, ProxyError> {
    let snapshot = inner.snapshots.load();
    let decision = snapshot.decide_request(host, path, facts);
    // The TLS rules (421, the HTTPS redirect, HSTS) belong to Ingress TLS hosts. A
    // Gateway API route exists on its Gateway listeners only, so redirecting it to the
    // HTTPS listener would lose it.
    let gateway_route =
        matches!(&decision, Decision::Route(m) if m.route.source.kind != RouteKind::Ingress);
    if let Some(tls) = inner.tls.get()
        && !gateway_route
    {
        let ingress = match &decision {
            Decision::Route(m) => Some(&m.route.source.object),
            _ => None,
        };
        *hsts = tls.check_request(conn, &snapshot, host, ingress, uri)?;
    }
    let (id, series, max_body_size, filters, timeouts, matched_prefix, mirrors) = match decision {
        Decision::Route(m) => {
            let r = m.route;
            let source = &r.source.object;
            let kind = r.source.kind.as_str();
            // The series of an answer the route gives itself: no Service.
            let own_answer = || {
                Some(
                    inner
                        .metrics
                        .route(&source.namespace, kind, &source.name, ""),
                )
            };
            let backends = match &r.action {
                Action::Forward(backends) => backends,
                Action::Redirect(rd) => {
                    *route_series = own_answer();
                    return Err(redirect(conn, host, uri, path, r, rd));
                }
                Action::Respond { status, body } => {
                    *route_series = own_answer();
                    return Err(ProxyError::Direct(
                        StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                        body.clone(),
                    ));
                }
            };
            let backend = if backends.list.len() == 1 {
                &backends.list[0]
            } else {
                backends.pick(fastrand::u32(0..backends.total_weight))
            };
            let id = match &backend.target {
                BackendTarget::Cluster(id) => *id,
                BackendTarget::Invalid { .. } => {
                    *route_series = own_answer();
                    return Err(ProxyError::InvalidBackend(source.clone()));
                }
            };
            let series = match snapshot.clusters.get(id as usize) {
                Some(c) => {
                    inner
                        .metrics
                        .route_to(&source.namespace, kind, &source.name, &c.service)
                }
                None => inner
                    .metrics
                    .route(&source.namespace, kind, &source.name, ""),
            };
            let matched_prefix = match r.path.path_type {
                PathType::Prefix | PathType::ImplementationSpecific
                    if r.filters.is_some() || backend.filters.is_some() =>
                {
                    Some(Arc::from(r.path.key.as_str()))
                }
                _ => None,
            };
            (
                id,
                series,
                r.max_body_size,
                [r.filters.clone(), backend.filters.clone()],
                r.timeouts,
                matched_prefix,
                mirror_clusters(&snapshot, [&r.filters, &backend.filters]),
            )
        }
        Decision::DefaultBackend(cluster) => (
            snapshot.default_backend.unwrap_or_default(),
            inner.metrics.route(
                &cluster.service.namespace,
                // An Ingress' spec.defaultBackend is that Ingress' route; the flag's is none.
                snapshot
                    .default_backend_source
                    .as_ref()
                    .map_or("", |_| "Ingress"),
                snapshot
                    .default_backend_source
                    .as_ref()
                    .map_or("", |src| src.name.as_str()),
                &cluster.service.name,
            ),
            snapshot.default_backend_max_body_size,
            [None, None],
            Timeouts::default(),
            None,
            Vec::new(),
        ),
        Decision::NotFound => {
            return Err(ProxyError::NoRoute {
                host: host.unwrap_or("-").to_string(),
                path: path.to_string(),
            });
        }
    };
    *route_series = Some(series.clone());
    let cluster =
        snapshot
            .clusters
            .get(id as usize)
            .cloned()
            .ok_or_else(|| ProxyError::NoRoute {
                host: host.unwrap_or("-").to_string(),
                path: path.to_string(),
            })?;
    Ok(Routed {
        series,
        cluster,
        max_body_size: max_body_size.or(inner.cfg.max_body_size),
        filters,
        timeouts,
        matched_prefix,
        mirrors,
    })
}

/// The clusters that `filters` (the route's, then the backend's) mirror requests to.
fn mirror_clusters(snapshot: &Snapshot, filters: [&Option<Arc<Filters>>; 2]) -> Vec<Arc<Cluster>> {
    filters
        .into_iter()
        .flatten()
        .flat_map(|f| &f.mirrors)
        .filter(|m| m.sampled())
        .filter_map(|m| snapshot.clusters.get(m.cluster as usize).cloned())
        .collect()
}

/// `limit` after `from`; a limit too large to add is about 30 years.
fn later(from: Instant, limit: Duration) -> Instant {
    from.checked_add(limit)
        .or_else(|| from.checked_add(Duration::from_secs(86_400 * 365 * 30)))
        .unwrap_or(from)
}

/// The answer of a route's `RequestRedirect` ([`Redirect::location`]).
fn redirect(
    conn: &ConnState,
    host: Option<&str>,
    uri: &Uri,
    path: &str,
    route: &Route,
    rd: &Redirect,
) -> ProxyError {
    let own_scheme = if conn.tls.is_some() { "https" } else { "http" };
    let location = rd.location(own_scheme, host, path, &route.path.key, uri.query());
    let status = StatusCode::from_u16(rd.status).unwrap_or(StatusCode::FOUND);
    match HeaderValue::from_str(&location) {
        Ok(v) => ProxyError::Redirect(status, v),
        Err(_) => ProxyError::BadRequest("redirect target cannot be formed"),
    }
}

/// Methods whose repetition has the same effect as one request (RFC 9110, 9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The inner handler; `arrived` is when the request head was complete.
#[allow(clippy::too_many_arguments)]
async fn proxy(
    inner: &Inner,
    conn: &ConnState,
    mut req: Request<Incoming>,
    arrived: Instant,
    request_id: &HeaderValue,
    obs: &mut Exchange,
    hsts: &mut Option<HeaderValue>,
    logging: bool,
) -> Result<Response<Answer>, ProxyError> {
    let upgrade_protocol = upgrade::requested(&req);
    let downstream_upgrade = upgrade_protocol
        .as_ref()
        .map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if parts.method == Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT is not supported"));
    }

    // RFC 9112 3.2: more than one Host is a 400; proxies disagreeing on which one
    // counts is a known way to smuggle requests past host-based rules.
    let mut hosts = parts.headers.get_all(HOST).iter();
    let host_value = hosts.next();
    if host_value.is_some() && hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len()) > MAX_REQUEST_TARGET {
        return Err(ProxyError::UriTooLong);
    }
    let host_header = match host_value {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ProxyError::BadRequest("Host is not visible ASCII"))?,
        ),
        None => None,
    };
    let authority = parts.uri.authority().map(|a| a.as_str());
    // RFC 9112 3.2: an HTTP/1.1 request without Host is a 400 (HTTP/1.0 may omit it);
    // HTTP/2 names its host in `:authority` or, failing that, Host (RFC 9113 8.3.1).
    let host_required = match parts.version {
        Version::HTTP_11 => host_value.is_none(),
        Version::HTTP_2 => host_value.is_none() && authority.is_none(),
        _ => false,
    };
    if host_required {
        return Err(ProxyError::BadRequest("missing Host"));
    }
    let host = request_host(authority, host_header).map_err(ProxyError::Host)?;
    let path = if inner.cfg.path_normalization {
        normalize(parts.uri.path()).map_err(|e| {
            inner.metrics.path_normalization_rejected_total.inc();
            ProxyError::Path(e)
        })?
    } else {
        Cow::Borrowed(parts.uri.path())
    };
    let path = &*path;
    // The asterisk form names no resource: only OPTIONS may use it (RFC 9112 3.2.4).
    if path == "*" && parts.method != Method::OPTIONS {
        return Err(ProxyError::BadRequest(
            "request target `*` is for OPTIONS only",
        ));
    }

    let facts = RequestFacts {
        method: &parts.method,
        headers: &parts.headers,
        query: parts.uri.query(),
        listener: if conn.tls.is_some() {
            ListenerKind::Https
        } else {
            ListenerKind::Http
        },
    };
    let routed = route(
        inner,
        conn,
        host.as_deref(),
        &parts.uri,
        path,
        &facts,
        &mut obs.series,
        hsts,
    )?;
    let cluster = routed.cluster.clone();
    let mut picked = inner
        .balancer
        .pick(&cluster, &[])
        .ok_or_else(|| ProxyError::NoEndpoints(cluster.service.clone()))?;

    if let Some(limit) = routed.max_body_size {
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ProxyError::BodyTooLarge);
        }
    }

    // Upgrades need HTTP/1.1 on both sides.
    let h2c = is_h2c(&cluster) && upgrade_protocol.is_none();
    debug!(
        request_id = ?request_id,
        method = %parts.method,
        host = host.as_deref().unwrap_or("-"),
        path,
        service = %routed.series.service_key,
        upstream = %picked.target.authority(),
        h2c,
        upgrade = upgrade_protocol.is_some(),
        "forwarding"
    );

    // The host as received, for X-Forwarded-Host and for a synthesised Host.
    let received_host: Option<HeaderValue> = match host_value {
        Some(v) => Some(v.clone()),
        None => authority.and_then(|a| HeaderValue::from_str(a).ok()),
    };

    // Forwarded as received only when it is already normal and in origin form (an
    // HTTP/2 `:path` such as `?x` names the path `/` and is rebuilt as `/?x`).
    let as_received = path == parts.uri.path()
        && parts
            .uri
            .path_and_query()
            .is_some_and(|pq| pq.as_str().starts_with('/') || pq.as_str() == "*");
    // A URLRewrite path (the backend's filter wins over the route's) replaces the path;
    // the query stays as received.
    let rewritten_path = routed
        .filters
        .iter()
        .rev()
        .flatten()
        .find_map(|f| f.rewrite.as_ref()?.path.as_ref())
        .map(|m| m.apply(path, routed.matched_prefix.as_deref().unwrap_or("")));
    let path_and_query = if let Some(new_path) = rewritten_path {
        let target = match parts.uri.query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        PathAndQuery::try_from(target)
            .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))?
    } else if as_received {
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"))
    } else {
        // The normalised path with the query as received.
        let target = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        PathAndQuery::try_from(target)
            .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))?
    };
    drop(host);

    headers::strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = &upgrade_protocol {
        upgrade::restore_headers(&mut parts.headers, protocol.clone());
    }
    // hyper already answered `Expect: 100-continue` downstream when the body was
    // first read; the upstream client does not wait for a 100.
    parts.headers.remove(EXPECT);
    if !parts.headers.contains_key(HOST)
        && let Some(h) = &received_host
    {
        parts.headers.insert(HOST, h.clone());
    }
    conn.forwarded
        .apply(&mut parts.headers, received_host.as_ref());
    parts
        .headers
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    // Route filters, then the backend's: header changes, and a URLRewrite hostname.
    for filters in routed.filters.iter().flatten() {
        if let Some(modifier) = &filters.request_headers {
            modifier.apply(&mut parts.headers);
        }
        if let Some(hostname) = filters.rewrite.as_ref().and_then(|r| r.hostname.as_ref()) {
            parts.headers.insert(HOST, hostname.clone());
        }
    }

    let upstream_start = Instant::now();
    // Until the response head, each attempt has the earliest of: the global limit,
    // counted from the first attempt; the route's `timeouts.request`, counted from the
    // request's arrival; its `timeouts.backendRequest`, counted from the attempt's start.
    let exchange_deadline = {
        let global = later(upstream_start, inner.upstream.response_timeout());
        match routed.timeouts.request {
            Some(limit) => global.min(later(arrived, limit)),
            None => global,
        }
    };
    let backend_request = routed.timeouts.backend_request;
    let attempt_deadline = |attempt_start: Instant| match backend_request {
        Some(limit) => exchange_deadline.min(later(attempt_start, limit)),
        None => exchange_deadline,
    };
    let first_deadline = attempt_deadline(upstream_start);
    let tee = if routed.mirrors.is_empty() || upgrade_protocol.is_some() {
        None
    } else {
        mirror::send(
            inner,
            &routed.mirrors,
            mirror::Original {
                method: &parts.method,
                path_and_query: &path_and_query,
                headers: &parts.headers,
                body: (!body.is_end_stream()).then(|| body.size_hint()),
                deadline: first_deadline,
            },
        )
    };
    let body = RequestBody::teed(body, routed.max_body_size, &inner.request_idle, tee);
    obs.request_bytes = body.progress();
    let mut lease = TimerLease::new(conn, tokio::time::Instant::from_std(first_deadline));
    let mut attempt_start = upstream_start;
    let mut via = Via { h2c, fresh: false };
    let mut tried: Vec<SocketAddr> = Vec::new();
    // Each retry reason is used at most once, so a request makes at most four attempts.
    let mut moved_on = false;
    let mut refreshed = false;
    let mut reset_retried = false;
    // Held while a retry of a request that may have reached an upstream is in flight.
    let mut _permit = None;
    let resp = loop {
        // HTTP/1 sends the origin form; HTTP/2 needs the scheme and authority.
        let Some(authority) = &picked.authority else {
            return Err(ProxyError::BadRequest("request target cannot be forwarded"));
        };
        let uri = if h2c {
            let mut target = http::uri::Parts::default();
            target.scheme = Some(Scheme::HTTP);
            target.authority = Some(authority.clone());
            target.path_and_query = Some(path_and_query.clone());
            Uri::from_parts(target)
                .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))?
        } else {
            Uri::from(path_and_query.clone())
        };
        let Some(attempt_body) = body.replay() else {
            return Err(ProxyError::Upstream {
                reason: "request body already sent",
                connecting: false,
                source: None,
            });
        };
        let mut upstream_req = Request::new(attempt_body);
        *upstream_req.method_mut() = parts.method.clone();
        *upstream_req.uri_mut() = uri;
        *upstream_req.version_mut() = if h2c {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        // The headers stay while another attempt is possible; once every retry reason
        // is used up, this attempt is the last and takes them.
        *upstream_req.headers_mut() = if moved_on && refreshed && reset_retried {
            std::mem::take(&mut parts.headers)
        } else {
            parts.headers.clone()
        };
        obs.attempt(&picked.target, logging);
        let failure = match inner
            .upstream
            .send(
                upstream_req,
                &picked.target,
                via,
                Some(&routed.series),
                body.progress_ref(),
                attempt_start,
                lease.timer(),
            )
            .await
        {
            Ok(resp) => break resp,
            Err(f) => f,
        };
        let addr = picked.target.addr();
        if let Some(addr) = addr
            && matches!(
                failure.kind,
                FailureKind::Connect | FailureKind::Reset | FailureKind::Closed
            )
        {
            inner
                .balancer
                .report_failure(addr, &cluster.service, &inner.metrics);
        }
        let reason = match failure.kind {
            // Nothing was sent: another endpoint (an ExternalName has no other).
            FailureKind::Connect if !moved_on && body.untouched() && addr.is_some() => {
                moved_on = true;
                tried.extend(addr);
                match inner.balancer.pick(&cluster, &tried) {
                    Some(next) => {
                        picked = next;
                        via.fresh = false;
                        "connect"
                    }
                    None => return Err(failure.error),
                }
            }
            // The keep-alive race: the same endpoint, on a new connection.
            FailureKind::StaleConnection
                if !refreshed
                    && body.untouched()
                    && (idempotent(&parts.method) || !body.is_empty()) =>
            {
                refreshed = true;
                via.fresh = true;
                "stale_connection"
            }
            // The request may have reached the endpoint, which then reset or closed the
            // connection before answering (it died mid-request): an idempotent request
            // without a body goes to another endpoint, within the retry budget.
            FailureKind::StaleConnection | FailureKind::Reset | FailureKind::Closed
                if !reset_retried && idempotent(&parts.method) && body.is_empty() =>
            {
                reset_retried = true;
                let active = inner.balancer.cluster_in_flight(&cluster);
                let Some(permit) = inner.retry_budget.try_acquire(&cluster.service, active) else {
                    inner
                        .metrics
                        .retry_budget_exhausted_total
                        .with_label_values(&[
                            cluster.service.namespace.as_str(),
                            cluster.service.name.as_str(),
                        ])
                        .inc();
                    debug!(
                        request_id = ?request_id,
                        service = %cluster.service,
                        error = %failure.error,
                        "retry budget exhausted"
                    );
                    return Err(failure.error);
                };
                _permit = Some(permit);
                tried.extend(addr);
                // Another endpoint; the same one when it is the only one left.
                match inner
                    .balancer
                    .pick(&cluster, &tried)
                    .or_else(|| inner.balancer.pick(&cluster, &[]))
                {
                    Some(next) => {
                        picked = next;
                        via.fresh = false;
                        "reset_before_response"
                    }
                    None => return Err(failure.error),
                }
            }
            _ => return Err(failure.error),
        };
        attempt_start = Instant::now();
        if backend_request.is_some() {
            lease.reset(tokio::time::Instant::from_std(attempt_deadline(
                attempt_start,
            )));
        }
        debug!(
            request_id = ?request_id,
            reason,
            error = %failure.error,
            upstream = %picked.target.authority(),
            "retrying"
        );
        inner
            .metrics
            .upstream_retries_total
            .with_label_values(&[
                cluster.service.namespace.as_str(),
                cluster.service.name.as_str(),
                reason,
            ])
            .inc();
    };
    obs.upstream_duration = Some(upstream_start.elapsed());
    if let Some(guard) = &picked.guard {
        guard.succeeded();
    }

    let mut resp = resp;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(downstream) = downstream_upgrade
    {
        let upstream = hyper::upgrade::on(&mut resp);
        let protocol = resp.headers().get(UPGRADE).cloned();
        let (mut parts, _empty) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = protocol {
            upgrade::restore_headers(&mut parts.headers, protocol);
        }
        inner.tunnels.spawn(
            downstream,
            upstream,
            picked.guard.take(),
            inner.cfg.stream_idle_timeout,
            inner.tunnel_idle_timeouts.clone(),
        );
        return Ok(Response::from_parts(parts, Answer::Own(empty())));
    }

    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    for filters in routed.filters.iter().flatten() {
        if let Some(modifier) = &filters.response_headers {
            modifier.apply(&mut parts.headers);
        }
    }
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(
        parts,
        Answer::streamed(body, picked.guard.take(), inner.cfg.stream_idle_timeout),
    ))
}

fn empty() -> ProxyBody {
    full(bytes::Bytes::new())
}
