//! The dashboard listener: a read-only web page of the live routing state, the JSON
//! API it polls, and the `/debug/snapshot` view.
//!
//! - `GET /`, `/app.js`, `/style.css`: the page, embedded in the binary (no CDN, no
//!   external fonts), so it works in an air-gapped cluster.
//! - `GET /api/v1/state`: [`StateView`] as JSON: virtual hosts → routes → clusters →
//!   endpoints with their live state (ready, terminating, ejected, in flight), TLS
//!   certificates, diagnostics, and live traffic per route (see [`traffic`]).
//! - `GET /debug/snapshot`: [`crate::admin::SnapshotView`].
//!
//! The listener belongs on loopback. Requests whose `Host` is neither an IP address nor
//! `localhost` are refused with 403, so that a web page cannot read the API through
//! DNS rebinding.

pub mod traffic;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST, HeaderName, HeaderValue,
    REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{SnapshotView, TlsHostView, text, tls_host_views, upstream_kind};
use crate::metrics::Metrics;
use crate::model::{
    Diagnostic, Endpoint, IgnoredIngress, ObjectRef, PathType, PortRef, Snapshot, Upstream,
};
use crate::proxy::Proxy;
use crate::proxy::body::{ProxyBody, full};
use crate::proxy::listener::serve_simple;
use crate::views::{GatewayApiView, RouteDetail};
use traffic::{Traffic, TrafficView};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// The page may load its own script and style and call its own API; nothing else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// What the dashboard reads: the snapshot in force, the metrics, and the proxy for the
/// live state of endpoints (in flight, ejected).
#[derive(Clone)]
pub struct DashboardState {
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub proxy: Proxy,
}

/// Serves the dashboard, its API and `/debug/snapshot` until `shutdown` becomes true.
/// Other paths answer 404, other methods than GET and HEAD 405.
pub async fn serve_dashboard(
    listener: TcpListener,
    state: DashboardState,
    shutdown: watch::Receiver<bool>,
) {
    let traffic = Arc::new(Traffic::new(state.metrics.clone()));
    let sampler = tokio::spawn(traffic.clone().run(shutdown.clone()));
    let shared = Arc::new((state, traffic));
    serve_simple(listener, "dashboard", shutdown, move |req| {
        let shared = shared.clone();
        // Off the async workers: with thousands of routes a state document takes
        // milliseconds to build, and the proxy's connections share those workers.
        async move {
            tokio::task::spawn_blocking(move || handle(&shared.0, &shared.1, &req))
                .await
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
        }
    })
    .await;
    sampler.abort();
}

fn handle(
    state: &DashboardState,
    traffic: &Traffic,
    req: &Request<Incoming>,
) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    if !host_allowed(req) {
        return text(
            StatusCode::FORBIDDEN,
            "dashboard: the Host header must be an IP address or localhost",
        );
    }
    match req.uri().path() {
        "/" | "/index.html" => {
            let mut resp = asset(INDEX_HTML, "text/html; charset=utf-8");
            resp.headers_mut()
                .insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
            resp
        }
        "/app.js" => asset(APP_JS, "text/javascript; charset=utf-8"),
        "/style.css" => asset(STYLE_CSS, "text/css; charset=utf-8"),
        "/api/v1/state" => {
            let snap = state.snapshots.load();
            let view = StateView::new(&snap, state, traffic.view(), unix_now());
            // Compact: the page polls it every 2 s, and it grows with the configuration.
            json(serde_json::to_vec(&view))
        }
        "/debug/snapshot" => {
            let snap = state.snapshots.load();
            json(serde_json::to_vec_pretty(&SnapshotView::new(&snap)))
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Whether the request names the dashboard by an IP address or `localhost` (or a
/// `*.localhost` name), which a DNS-rebinding page cannot. No `Host` at all (an
/// HTTP/1.0 client) is allowed: a browser always sends one.
fn host_allowed(req: &Request<Incoming>) -> bool {
    let host = match req.uri().authority() {
        Some(a) => a.host().to_string(),
        None => match req.headers().get(HOST).map(|h| h.to_str()) {
            None => return true,
            Some(Err(_)) => return false,
            Some(Ok(h)) => match h.parse::<http::uri::Authority>() {
                Ok(a) => a.host().to_string(),
                Err(_) => return false,
            },
        },
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    host.parse::<IpAddr>().is_ok() || host == "localhost" || host.ends_with(".localhost")
}

fn asset(body: &'static str, content_type: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from_static(body.as_bytes())));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    security_headers(h);
    resp
}

fn json(encoded: serde_json::Result<Vec<u8>>) -> Response<ProxyBody> {
    match encoded {
        Ok(body) => {
            let mut resp = Response::new(full(Bytes::from(body)));
            let h = resp.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            security_headers(h);
            resp
        }
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed"),
    }
}

fn security_headers(h: &mut http::HeaderMap) {
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The `/api/v1/state` document. Field meanings are documented in README (Dashboard).
#[derive(Debug, Serialize)]
pub struct StateView<'a> {
    /// The crate version of the binary.
    pub version: &'static str,
    /// Server time of this answer, Unix seconds.
    pub time: f64,
    /// Generation of the snapshot in force (0 before the first publish).
    pub generation: u64,
    /// When it was published, Unix seconds; null before the first publish.
    pub published_at: Option<f64>,
    pub traffic: TrafficView,
    /// Every Ingress classified as ours, whether or not it has routes.
    pub served_ingresses: &'a [ObjectRef],
    pub virtual_hosts: Vec<VirtualHostState<'a>>,
    pub default_backend: Option<DefaultBackendState<'a>>,
    pub clusters: Vec<ClusterState<'a>>,
    pub tls_hosts: Vec<TlsHostView<'a>>,
    pub certificates: Vec<CertificateState<'a>>,
    pub diagnostics: &'a [Diagnostic],
    pub ignored_ingresses: &'a [IgnoredIngress],
    /// Gateway API: our GatewayClasses, their Gateways and listeners, and each route's
    /// attachment to its parents.
    pub gateway: GatewayApiView<'a>,
}

/// One virtual host and its routes, in precedence order.
#[derive(Debug, Serialize)]
pub struct VirtualHostState<'a> {
    /// `a.example`, `*.example`, or `*` for rules without a host.
    pub host: String,
    pub routes: Vec<RouteState<'a>>,
}

#[derive(Debug, Serialize)]
pub struct RouteState<'a> {
    pub path: &'a str,
    pub path_type: PathType,
    /// The Ingress, for Ingress routes.
    pub ingress: Option<&'a ObjectRef>,
    /// Where the route came from (kind, namespace, name, rule, match).
    pub source: &'a crate::model::RouteSource,
    /// Index into `clusters` of the first valid backend, when the route forwards.
    pub cluster: Option<u32>,
    /// Conditions, filters, every weighted backend (with its index into `clusters`)
    /// and the action.
    #[serde(flatten)]
    pub detail: RouteDetail,
}

#[derive(Debug, Serialize)]
pub struct DefaultBackendState<'a> {
    /// Index into `clusters`.
    pub cluster: u32,
    /// The Ingress whose `spec.defaultBackend` it is; null for the flag.
    pub ingress: Option<&'a ObjectRef>,
}

/// One Service port and its endpoints.
#[derive(Debug, Serialize)]
pub struct ClusterState<'a> {
    pub id: u32,
    pub service: &'a ObjectRef,
    /// The port as the Ingress backend names it: a number or a name.
    pub port: &'a PortRef,
    pub service_port: Option<i32>,
    pub app_protocol: Option<&'a str>,
    /// `endpoints`, `external_name` or `unresolved`.
    pub kind: &'static str,
    /// `host:port` of an ExternalName Service.
    pub external_name: Option<String>,
    /// Why the backend could not be resolved (the route answers 503).
    pub unresolved: Option<&'a str>,
    pub endpoints: Vec<EndpointState>,
}

/// One endpoint of a cluster, with its live state.
#[derive(Debug, Serialize)]
pub struct EndpointState {
    pub address: SocketAddr,
    /// From the EndpointSlice conditions: `terminating` when the pod is terminating,
    /// else `ready` or `not_ready`.
    pub state: &'static str,
    /// The EndpointSlice `serving` condition.
    pub serving: bool,
    /// Whether requests are balanced onto it: the ready endpoints, or the serving ones
    /// when none is ready.
    pub active: bool,
    /// Taken out of balancing by passive health right now.
    pub ejected: bool,
    /// Requests in flight on this address, across every cluster that uses it.
    pub in_flight: usize,
}

/// A usable certificate of the snapshot.
#[derive(Debug, Serialize)]
pub struct CertificateState<'a> {
    pub secret: &'a ObjectRef,
    /// The TLS hosts it serves.
    pub hosts: Vec<String>,
    /// DNS names of its subjectAltName extension.
    pub dns_names: &'a [String],
    pub subject: &'a str,
    pub issuer: &'a str,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// `(not_after - time) / 86400`; negative once expired.
    pub days_to_expiry: f64,
    pub sha256: &'a str,
}

impl<'a> StateView<'a> {
    /// The document for `snap`, reading live endpoint state from `state.proxy`.
    pub fn new(
        snap: &'a Snapshot,
        state: &DashboardState,
        traffic: TrafficView,
        time: f64,
    ) -> StateView<'a> {
        let virtual_hosts = snap
            .routes
            .vhosts
            .iter()
            .map(|vh| VirtualHostState {
                host: vh.host.to_string(),
                routes: vh
                    .routes
                    .iter()
                    .map(|r| RouteState {
                        path: &r.path.path,
                        path_type: r.path.path_type,
                        ingress: (r.source.kind == crate::model::RouteKind::Ingress)
                            .then_some(&r.source.object),
                        source: &r.source,
                        cluster: r.first_cluster(),
                        detail: RouteDetail::compact(snap, r),
                    })
                    .collect(),
            })
            .collect();
        let clusters = snap
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (kind, external_name, unresolved) = upstream_kind(&c.upstream);
                let endpoints = match &c.upstream {
                    Upstream::Endpoints { all, active } => all
                        .iter()
                        .map(|e| endpoint_state(e, active.contains(&e.address), &state.proxy))
                        .collect(),
                    _ => Vec::new(),
                };
                ClusterState {
                    id: u32::try_from(i).unwrap_or(u32::MAX),
                    service: &c.service,
                    port: &c.port,
                    service_port: c.service_port,
                    app_protocol: c.app_protocol.as_deref(),
                    kind,
                    external_name,
                    unresolved,
                    endpoints,
                }
            })
            .collect();
        let tls_hosts = tls_host_views(snap);
        let mut certificates: Vec<CertificateState<'a>> = snap
            .tls
            .certs
            .values()
            .map(|c| CertificateState {
                secret: &c.secret,
                hosts: snap
                    .tls
                    .hosts
                    .iter()
                    .filter(|(_, t)| t.secret == c.secret)
                    .map(|(h, _)| h.to_string())
                    .collect(),
                dns_names: &c.dns_names,
                subject: &c.subject,
                issuer: &c.issuer,
                not_before: c.not_before,
                not_after: c.not_after,
                days_to_expiry: (c.not_after as f64 - time) / 86_400.0,
                sha256: &c.sha256,
            })
            .collect();
        certificates.sort_by(|a, b| a.secret.cmp(b.secret));
        let published = state.metrics.snapshot_publish_timestamp_seconds.get();
        StateView {
            version: env!("CARGO_PKG_VERSION"),
            time,
            generation: snap.generation,
            published_at: (published > 0.0).then_some(published),
            traffic,
            served_ingresses: &snap.served_ingresses,
            virtual_hosts,
            default_backend: snap.default_backend.map(|cluster| DefaultBackendState {
                cluster,
                ingress: snap.default_backend_source.as_ref(),
            }),
            clusters,
            tls_hosts,
            certificates,
            diagnostics: &snap.diagnostics,
            ignored_ingresses: &snap.ignored,
            gateway: GatewayApiView::of(&snap.gateway),
        }
    }
}

fn endpoint_state(e: &Endpoint, active: bool, proxy: &Proxy) -> EndpointState {
    let state = if e.terminating {
        "terminating"
    } else if e.ready {
        "ready"
    } else {
        "not_ready"
    };
    EndpointState {
        address: e.address,
        state,
        serving: e.serving,
        active,
        ejected: proxy.is_ejected(e.address),
        in_flight: proxy.in_flight(e.address),
    }
}
