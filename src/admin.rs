//! The admin listener: probes and metrics; and [`SnapshotView`], the `/debug/snapshot`
//! document the dashboard listener ([`crate::dashboard`]) serves.
//!
//! `serve_admin` answers `/healthz` (always 200 while the process serves), `/readyz`
//! (200 once `ready` is set, else 503) and `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::model::{
    Diagnostic, Endpoint, IgnoredIngress, ObjectRef, PathType, PortRef, Snapshot, Upstream,
};
use crate::proxy::body::{ProxyBody, full};
use crate::proxy::listener::serve_simple;
use crate::views::{GatewayApiView, RouteDetail};

/// What the admin listener reads.
#[derive(Clone)]
pub struct AdminState {
    pub snapshots: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    /// Set once the first snapshot is published; cleared when shutdown begins.
    pub ready: Arc<AtomicBool>,
}

/// Serves `/healthz`, `/readyz` and `/metrics` until `shutdown` becomes true. Other
/// paths answer 404.
pub async fn serve_admin(
    listener: TcpListener,
    state: AdminState,
    shutdown: watch::Receiver<bool>,
) {
    let state = Arc::new(state);
    serve_simple(listener, "admin", shutdown, move |req| {
        let state = state.clone();
        async move { admin(&state, &req) }
    })
    .await;
}

fn admin(state: &AdminState, req: &Request<Incoming>) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok"),
        "/readyz" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready")
            }
        }
        "/metrics" => {
            let mut resp = Response::new(full(Bytes::from(state.metrics.render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// A plain-text answer; shared with the dashboard listener.
pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The `/debug/snapshot` document.
#[derive(Debug, Serialize)]
pub struct SnapshotView<'a> {
    pub generation: u64,
    pub virtual_hosts: Vec<VirtualHostView<'a>>,
    pub clusters: Vec<ClusterView<'a>>,
    /// Index into `clusters`.
    pub default_backend: Option<u32>,
    pub default_backend_source: Option<&'a ObjectRef>,
    pub tls_hosts: Vec<TlsHostView<'a>>,
    pub ignored_ingresses: &'a [IgnoredIngress],
    pub diagnostics: &'a [Diagnostic],
    /// Gateway API: our GatewayClasses, their Gateways and listeners, and each route's
    /// attachment to its parents.
    pub gateway: GatewayApiView<'a>,
}

/// One virtual host and its routes, in age order.
#[derive(Debug, Serialize)]
pub struct VirtualHostView<'a> {
    /// The host pattern: `a.example`, `*.example` or `*` for host-less rules.
    pub host: String,
    pub routes: Vec<RouteView<'a>>,
}

#[derive(Debug, Serialize)]
pub struct RouteView<'a> {
    pub host: String,
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
pub struct ClusterView<'a> {
    pub id: u32,
    pub service: &'a ObjectRef,
    pub port: &'a PortRef,
    pub service_port: Option<i32>,
    pub app_protocol: Option<&'a str>,
    /// `endpoints`, `external_name` or `unresolved`.
    pub kind: &'static str,
    pub endpoints: &'a [Endpoint],
    pub active: Vec<String>,
    pub external_name: Option<String>,
    pub unresolved: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct TlsHostView<'a> {
    pub host: String,
    pub secret: &'a ObjectRef,
    pub ingress: &'a ObjectRef,
    /// Whether a usable certificate is loaded for the Secret.
    pub certificate: bool,
}

impl<'a> SnapshotView<'a> {
    pub fn new(snap: &'a Snapshot) -> SnapshotView<'a> {
        let virtual_hosts = snap
            .routes
            .vhosts
            .iter()
            .map(|vh| VirtualHostView {
                host: vh.host.to_string(),
                routes: vh
                    .routes
                    .iter()
                    .map(|r| RouteView {
                        host: r.host.to_string(),
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
                let (endpoints, active): (&[Endpoint], _) = match &c.upstream {
                    Upstream::Endpoints { all, active } => {
                        (all, active.iter().map(ToString::to_string).collect())
                    }
                    _ => (&[], Vec::new()),
                };
                ClusterView {
                    id: u32::try_from(i).unwrap_or(u32::MAX),
                    service: &c.service,
                    port: &c.port,
                    service_port: c.service_port,
                    app_protocol: c.app_protocol.as_deref(),
                    kind,
                    endpoints,
                    active,
                    external_name,
                    unresolved,
                }
            })
            .collect();
        let tls_hosts = tls_host_views(snap);
        SnapshotView {
            generation: snap.generation,
            virtual_hosts,
            clusters,
            default_backend: snap.default_backend,
            default_backend_source: snap.default_backend_source.as_ref(),
            tls_hosts,
            ignored_ingresses: &snap.ignored,
            diagnostics: &snap.diagnostics,
            gateway: GatewayApiView::of(&snap.gateway),
        }
    }
}

/// A cluster's kind (`endpoints`, `external_name` or `unresolved`), an ExternalName's
/// `host:port`, and why an unresolved backend could not be resolved.
pub(crate) fn upstream_kind(u: &Upstream) -> (&'static str, Option<String>, Option<&str>) {
    match u {
        Upstream::Endpoints { .. } => ("endpoints", None, None),
        Upstream::ExternalName { host, port } => {
            ("external_name", Some(format!("{host}:{port}")), None)
        }
        Upstream::Unresolved { reason } => ("unresolved", None, Some(reason.as_str())),
    }
}

/// The snapshot's TLS hosts, each with its Secret and whether that Secret holds a usable
/// certificate (false: the default certificate is served for the host).
pub(crate) fn tls_host_views(snap: &Snapshot) -> Vec<TlsHostView<'_>> {
    snap.tls
        .hosts
        .iter()
        .map(|(host, t)| TlsHostView {
            host: host.to_string(),
            secret: &t.secret,
            ingress: &t.ingress,
            certificate: snap.tls.certs.contains_key(&t.secret),
        })
        .collect()
}
