//! The `check` and `explain` commands: what a set of manifests would serve, and which
//! rule a request would take. Both build the same snapshot `run` would serve.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::json;

use crate::files::Loaded;
use crate::k8s::Options;
use crate::model::gateway::{AttachReason, GatewayReport, RefsReason, RouteInfo};
use crate::model::route::ListenerKind;
use crate::model::{
    Action, Cluster, Decision, HostMatch, ObjectRef, RequestFacts, Route, RouteKind, RouteSource,
    Severity, Snapshot, Upstream, request_host,
};
use crate::publish::{Counts, build_snapshot};
use crate::views::{
    BackendView, ConditionsView, GatewayApiView, RouteDetail, endpoint_list, percent,
};

/// Exit status of `check`: 0 fine or warnings only, 1 at least one error diagnostic.
pub fn check_status(snapshot: &Snapshot) -> i32 {
    i32::from(snapshot.has_errors())
}

/// Builds the snapshot `run` would serve from loaded manifests.
pub fn snapshot_of(loaded: Loaded, options: &Options) -> Snapshot {
    build_snapshot(&loaded.into_update(), options, &Snapshot::default())
}

/// `check` as text.
pub fn check_text(snapshot: &Snapshot, files: usize, objects: usize) -> String {
    let c = Counts::of(snapshot);
    let mut out = String::new();
    let _ = writeln!(out, "Read {objects} objects from {files} file(s).");
    let sources = SourceCounts::of(snapshot);
    let _ = writeln!(
        out,
        "Would serve {} virtual host(s), {} route(s) from {} Ingress(es) and {} HTTPRoute(s), {} cluster(s) with {} endpoint(s), {} TLS host(s).",
        c.vhosts,
        c.routes,
        sources.ingresses,
        sources.http_routes,
        c.clusters,
        c.endpoints,
        c.tls_hosts
    );
    for vh in &snapshot.routes.vhosts {
        let _ = writeln!(out, "\n  {}", vh.host);
        for r in &vh.routes {
            route_text(&mut out, snapshot, r);
        }
    }
    match snapshot.default_backend {
        Some(id) => {
            let cluster = snapshot.cluster(id);
            let from = match &snapshot.default_backend_source {
                Some(i) => format!("Ingress {i}"),
                None => "--default-backend-service".into(),
            };
            let _ = writeln!(
                out,
                "\n  default backend -> {} {}  (from {from})",
                cluster.display_name(),
                endpoint_summary(cluster)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "\n  default backend: none (unmatched requests get 404)"
            );
        }
    }
    if !snapshot.tls.hosts.is_empty() {
        let _ = writeln!(out, "\nTLS hosts:");
        for (host, t) in &snapshot.tls.hosts {
            let state = match snapshot.tls.certs.get(&t.secret) {
                Some(cert) => format!(
                    "certificate {} (expires {})",
                    cert.subject,
                    fmt_time(cert.not_after)
                ),
                None => "no usable certificate: served with the default certificate".into(),
            };
            let _ = writeln!(out, "  {host:<32} Secret {}  {state}", t.secret);
        }
    }
    if !snapshot.gateway.gateways.is_empty() || !snapshot.gateway.routes.is_empty() {
        gateway_text(&mut out, &snapshot.gateway);
    }
    if !snapshot.ignored.is_empty() {
        let _ = writeln!(out, "\nIgnored Ingresses:");
        for i in &snapshot.ignored {
            let _ = writeln!(out, "  {}/{}: {}", i.namespace, i.name, i.reason);
        }
    }
    if snapshot.diagnostics.is_empty() {
        let _ = writeln!(out, "\nNo problems found.");
    } else {
        let _ = writeln!(out, "\n{} error(s), {} warning(s):", c.errors, c.warnings);
        let mut diags: Vec<_> = snapshot.diagnostics.iter().collect();
        diags.sort_by_key(|d| std::cmp::Reverse(d.severity));
        for d in diags {
            let _ = writeln!(out, "  {d}");
        }
    }
    out
}

/// How many objects of each route kind contribute routes to the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SourceCounts {
    pub ingresses: usize,
    pub http_routes: usize,
}

impl SourceCounts {
    pub fn of(snapshot: &Snapshot) -> SourceCounts {
        let mut seen = std::collections::HashSet::new();
        let mut counts = SourceCounts::default();
        for r in snapshot.routes.routes() {
            if seen.insert((r.source.kind, &r.source.object)) {
                match r.source.kind {
                    RouteKind::Ingress => counts.ingresses += 1,
                    RouteKind::HttpRoute => counts.http_routes += 1,
                    RouteKind::GrpcRoute => {}
                }
            }
        }
        counts
    }
}

/// The column where `check`'s lines under a route start.
const UNDER_ROUTE: &str = "            ";

/// One route of `check`'s table. An Ingress route is one line; a Gateway API route
/// also names its rule and match, and adds lines for its conditions, its filters and,
/// when it splits traffic or has an invalid backendRef, each weighted backend.
fn route_text(out: &mut String, snapshot: &Snapshot, r: &Route) {
    if r.source.kind == RouteKind::Ingress {
        let (target, endpoints) = match snapshot.route_cluster(r) {
            Some(cluster) => (cluster.display_name(), endpoint_summary(cluster)),
            None => (action_summary(r), String::new()),
        };
        let _ = writeln!(
            out,
            "    {:<7} {:<24} -> {:<32} {}  ({})",
            short_type(r),
            r.path.path,
            target,
            endpoints,
            r.source
        );
        return;
    }
    let detail = RouteDetail::of(snapshot, r);
    let list_backends = detail.backends.len() > 1 || detail.backends.iter().any(|b| !b.valid);
    let (target, endpoints) = match (&r.action, snapshot.route_cluster(r)) {
        (Action::Forward(_), Some(cluster)) if !list_backends => {
            (cluster.display_name(), endpoint_summary(cluster))
        }
        (Action::Forward(_), Some(_)) => (
            format!("{} weighted backends", detail.backends.len()),
            String::new(),
        ),
        _ => (action_summary(r), String::new()),
    };
    let _ = writeln!(
        out,
        "    {:<7} {:<24} -> {:<32} {}  ({} rule {} match {})",
        short_type(r),
        r.path.path,
        target,
        endpoints,
        r.source,
        r.source.rule,
        r.source.match_index
    );
    if let Some(c) = &detail.conditions {
        let _ = writeln!(out, "{UNDER_ROUTE}when {}", c.describe());
    }
    if !detail.filters.is_empty() {
        let _ = writeln!(out, "{UNDER_ROUTE}filters {}", detail.filters.join(", "));
    }
    if list_backends {
        for b in &detail.backends {
            let state = match (&b.problem, b.cluster.map(|id| snapshot.cluster(id))) {
                (None, Some(cluster)) => endpoint_summary(cluster),
                (Some(p), _) if !b.valid => format!("[{p}: 500]"),
                (Some(p), _) => format!("[{p}: 503]"),
                (None, None) => String::new(),
            };
            let filters = if b.filters.is_empty() {
                String::new()
            } else {
                format!("  filters {}", b.filters.join(", "))
            };
            let _ = writeln!(
                out,
                "{UNDER_ROUTE}{:>6}  {:<32} {state}{filters}",
                percent(b.percent),
                b.display_name()
            );
        }
    }
}

/// `check`'s Gateway API sections: each Gateway with its listeners, then each route
/// with what became of each parentRef, in the words of the status conditions.
fn gateway_text(out: &mut String, report: &GatewayReport) {
    let classes: Vec<&str> = report.classes.iter().map(|(n, _)| n.as_str()).collect();
    let _ = writeln!(
        out,
        "\nGateways (GatewayClass {}):",
        if classes.is_empty() {
            "none of ours".to_string()
        } else {
            classes.join(", ")
        }
    );
    if report.gateways.is_empty() {
        let _ = writeln!(out, "  none of our classes");
    }
    for g in &report.gateways {
        let state = match (g.accepted, g.programmed) {
            (false, _) => "not accepted",
            (true, true) => "programmed",
            (true, false) => "not programmed: no listener is served",
        };
        let _ = writeln!(out, "  {} (class {}): {state}", g.object, g.class);
        for l in &g.listeners {
            let host = l.hostname.as_deref().unwrap_or("any host");
            let state = match l.served_on {
                Some(on) if l.programmed => {
                    let mut s = format!("served on {on}, {} route(s) attached", l.attached_routes);
                    if l.reason != "Accepted" {
                        let _ = write!(s, "; {} ({})", l.reason, l.message);
                    }
                    s
                }
                _ => format!("not programmed: {} ({})", l.reason, l.message),
            };
            let _ = writeln!(
                out,
                "    listener {:<12} {:<5} port {:<5} {:<24} {state}",
                l.name, l.protocol, l.port, host
            );
        }
    }
    let mut kind = None;
    for r in &report.routes {
        if kind != Some(r.kind) {
            kind = Some(r.kind);
            let _ = writeln!(out, "\n{}s:", r.kind);
        }
        route_info_text(out, r);
    }
}

fn route_info_text(out: &mut String, r: &RouteInfo) {
    let serves = if r.hostnames.is_empty() {
        "not attached: serves nothing".to_string()
    } else {
        format!("serves {}", r.hostnames.join(", "))
    };
    let _ = writeln!(out, "  {}: {serves}", r.object);
    for p in &r.parents {
        let mut parent = format!("Gateway {}", p.gateway);
        if let Some(section) = &p.section_name {
            let _ = write!(parent, " listener {section}");
        }
        if let Some(port) = p.port {
            let _ = write!(parent, " port {port}");
        }
        let accepted = match p.accepted {
            AttachReason::Accepted => "Accepted".to_string(),
            reason => format!("{} ({})", reason.as_str(), p.accepted_message),
        };
        let refs = match p.resolved_refs {
            RefsReason::ResolvedRefs => "ResolvedRefs".to_string(),
            reason => format!("{} ({})", reason.as_str(), p.resolved_refs_message),
        };
        let _ = writeln!(out, "    parent {parent}: {accepted}; {refs}");
    }
}

/// `check --output json`.
pub fn check_json(snapshot: &Snapshot, files: usize, objects: usize) -> serde_json::Value {
    let c = Counts::of(snapshot);
    let vhosts: Vec<_> = snapshot
        .routes
        .vhosts
        .iter()
        .map(|vh| {
            json!({
                "host": vh.host.to_string(),
                "host_match": vh.host.kind(),
                "routes": vh.routes.iter().map(|r| route_json(snapshot, r)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let tls: Vec<_> = snapshot
        .tls
        .hosts
        .iter()
        .map(|(host, t)| {
            let cert = snapshot.tls.certs.get(&t.secret);
            json!({
                "host": host.to_string(),
                "secret": t.secret,
                "ingress": t.ingress,
                "certificate": cert.map(|c| json!({
                    "subject": c.subject, "issuer": c.issuer, "dns_names": c.dns_names,
                    "not_after": c.not_after, "sha256": c.sha256,
                })),
            })
        })
        .collect();
    let sources = SourceCounts::of(snapshot);
    let report = &snapshot.gateway;
    let http_routes: Vec<&RouteInfo> = report
        .routes
        .iter()
        .filter(|r| r.kind == RouteKind::HttpRoute)
        .collect();
    json!({
        "files": files,
        "objects": objects,
        "summary": {
            "virtual_hosts": c.vhosts, "routes": c.routes, "clusters": c.clusters,
            "endpoints": c.endpoints, "tls_hosts": c.tls_hosts,
            "errors": c.errors, "warnings": c.warnings,
            "ingresses": sources.ingresses, "http_routes": sources.http_routes,
            "gateways": report.gateways.len(),
        },
        "virtual_hosts": vhosts,
        "default_backend": snapshot.default_backend.map(|id| backend_json(snapshot.cluster(id))),
        "tls": tls,
        "gateway_classes": GatewayApiView::of(report).classes,
        "gateways": report.gateways,
        "http_routes": http_routes,
        "ignored": snapshot.ignored,
        "diagnostics": snapshot.diagnostics,
    })
}

/// One route of `check --output json`: its match, its source, and (as the dashboard
/// shows them) its conditions, filters, weighted backends and action. `backend` is the
/// first valid backend, as before weights existed.
fn route_json(snapshot: &Snapshot, r: &Route) -> serde_json::Value {
    let detail = RouteDetail::of(snapshot, r);
    json!({
        "path": r.path.path,
        "path_type": r.path.path_type,
        "ingress": (r.source.kind == RouteKind::Ingress).then_some(&r.source.object),
        "route": r.source,
        "backend": snapshot.route_cluster(r).map(backend_json),
        "conditions": detail.conditions,
        "filters": detail.filters,
        "backends": detail.backends,
        "action": detail.action,
    })
}

fn backend_json(c: &Cluster) -> serde_json::Value {
    json!({
        "namespace": c.service.namespace,
        "service": c.service.name,
        "port": c.service_port,
        "endpoints": endpoint_list(&c.upstream),
    })
}

fn short_type(r: &Route) -> &'static str {
    match r.path.path_type {
        crate::model::PathType::Exact => "Exact",
        crate::model::PathType::Prefix => "Prefix",
        crate::model::PathType::ImplementationSpecific => "ImplSp",
        crate::model::PathType::RegularExpression => "Regex",
    }
}

/// What a route that does not forward to a cluster does, in a few words.
fn action_summary(r: &Route) -> String {
    match &r.action {
        crate::model::Action::Forward(_) => "500 (no valid backend)".into(),
        crate::model::Action::Redirect(rd) => format!("redirect {}", rd.status),
        crate::model::Action::Respond { status, .. } => format!("answer {status}"),
    }
}

fn endpoint_summary(c: &Cluster) -> String {
    match &c.upstream {
        Upstream::Endpoints { active, .. } if active.is_empty() => "[no endpoints: 503]".into(),
        Upstream::Endpoints { active, .. } => format!("[{} endpoint(s)]", active.len()),
        Upstream::ExternalName { host, port } => format!("[ExternalName {host}:{port}]"),
        Upstream::Unresolved { reason } => format!("[unresolved: {reason}: 503]"),
    }
}

fn fmt_time(unix: i64) -> String {
    match k8s_openapi::jiff::Timestamp::from_second(unix) {
        Ok(t) => t.to_string(),
        Err(_) => unix.to_string(),
    }
}

/// The answer of `explain`, in the JSON shape of INTERFACE.md. `ingress` is set for
/// Ingress routes, `route` for every route; `conditions`, `filters`, `backends` and
/// `location` appear only for Gateway API routes (and `conditions` only when the route
/// has some), so an Ingress explanation keeps its shape.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub url: String,
    pub host: String,
    pub path: String,
    pub status: u16,
    pub ingress: Option<ObjectRef>,
    /// The route's source: kind, namespace, name, rule and match index.
    pub route: Option<RouteSource>,
    pub rule: Option<RuleInfo>,
    pub path_match: Option<PathMatchInfo>,
    pub default_backend: bool,
    /// The backend; for a Gateway API route that splits traffic, the first valid one
    /// (`backends` lists them all).
    pub backend: Option<BackendInfo>,
    pub endpoints: Vec<String>,
    pub reason: String,
    /// The method, header and query conditions the route required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditions: Option<ConditionsView>,
    /// The only listener the route exists on (`http`, `https`); absent for both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<ListenerKind>,
    /// The route's filters, in Gateway API's names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filters: Option<Vec<&'static str>>,
    /// Every weighted backend of the route; one is picked at random per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backends: Option<Vec<BackendView>>,
    /// The `Location` of a redirect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The request, when it is not a plain `GET` (text output only).
    #[serde(skip)]
    pub request: Option<String>,
    /// Other routes that matched and lost, best first (text output only).
    #[serde(skip)]
    pub also_matched: Vec<String>,
    /// Routes whose host and path matched but whose conditions did not hold, best
    /// first (text output only).
    #[serde(skip)]
    pub conditions_not_met: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RuleInfo {
    pub host: String,
    pub host_match: HostMatch,
}

#[derive(Debug, Serialize)]
pub struct PathMatchInfo {
    pub path: String,
    pub path_type: crate::model::PathType,
    pub length: usize,
}

#[derive(Debug, Serialize)]
pub struct BackendInfo {
    pub namespace: String,
    pub service: String,
    /// The Service port number; null when the Service or its named port is not found.
    pub port: Option<i32>,
}

/// Why `explain` could not take the URL.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("`{0}` is not a URL: {1}")]
    BadUrl(String, String),
}

/// Explains which rule a `GET` of `url` without headers would take. `url` may omit the
/// scheme.
pub fn explain(snapshot: &Snapshot, url: &str) -> Result<Explanation, ExplainError> {
    explain_request(snapshot, url, &http::Method::GET, &http::HeaderMap::new())
}

/// Explains which rule a request would take: `url` (the scheme may be omitted; its
/// query takes part in query matches) with `method` and `headers`, which Gateway API
/// routes may match on.
pub fn explain_request(
    snapshot: &Snapshot,
    url: &str,
    method: &http::Method,
    headers: &http::HeaderMap,
) -> Result<Explanation, ExplainError> {
    let full = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let uri: http::Uri = full
        .parse()
        .map_err(|e: http::uri::InvalidUri| ExplainError::BadUrl(url.into(), e.to_string()))?;
    let authority = uri
        .authority()
        .ok_or_else(|| ExplainError::BadUrl(url.into(), "no host".into()))?;
    let host = request_host(Some(authority.as_str()), None)
        .map_err(|e| ExplainError::BadUrl(url.into(), e.to_string()))?
        .map(|h| h.into_owned())
        .unwrap_or_default();
    let received = uri.path();
    let normalised = crate::model::path::normalize(received);
    let path = match &normalised {
        Ok(p) => p.to_string(),
        Err(_) => received.to_string(),
    };
    let host_opt = (!host.is_empty()).then_some(host.as_str());
    // The listener the request would arrive on: an https URL names the HTTPS one.
    let listener = if uri.scheme_str() == Some("https") {
        ListenerKind::Https
    } else {
        ListenerKind::Http
    };
    let facts = RequestFacts {
        method,
        headers,
        query: uri.query(),
        listener,
    };

    let mut ex = Explanation {
        url: url.to_string(),
        host: host.clone(),
        path: path.clone(),
        status: 404,
        ingress: None,
        route: None,
        rule: None,
        path_match: None,
        default_backend: false,
        backend: None,
        endpoints: Vec::new(),
        reason: String::new(),
        conditions: None,
        listener: None,
        filters: None,
        backends: None,
        location: None,
        request: request_line(method, headers),
        also_matched: Vec::new(),
        conditions_not_met: Vec::new(),
    };
    // As the proxy does with `--path-normalization on` (the default): a path it refuses
    // is a 400 before any rule is looked at; any other is routed normalised.
    if let Err(e) = normalised {
        ex.status = 400;
        ex.reason = format!(
            "The path {received} is refused before routing: 400 `bad request: {e}` (--path-normalization on)."
        );
        return Ok(ex);
    }
    let note = if path == received {
        String::new()
    } else {
        format!(" (the path {received}, normalised)")
    };
    let decision = snapshot.decide_request(host_opt, &path, &facts);
    let winner = match decision {
        Decision::Route(m) => Some(m.route),
        _ => None,
    };
    // Every other route whose host and path match: those whose conditions also hold
    // matched and lost; the others never matched.
    let mut candidates: Vec<_> = snapshot
        .routes
        .routes()
        .filter(|r| Some(*r as *const Route) != winner.map(|w| w as *const Route))
        .filter_map(|r| {
            let hm = r.host.matches(&host)?;
            r.path.matches(&path).then(|| (r.precedence(hm), r))
        })
        .collect();
    candidates.sort_by_key(|l| std::cmp::Reverse(l.0));
    let (losers, not_met): (Vec<_>, Vec<_>) =
        candidates.into_iter().partition(|(_, r)| r.admits(&facts));
    let describe = |(p, r): &(crate::model::Precedence, &Route)| {
        let mut line = format!(
            "{} {} {} (length {}, {} host) in {}",
            r.host, r.path.path_type, r.path.path, p.length, p.host, r.source
        );
        if r.source.kind != RouteKind::Ingress {
            let _ = write!(
                line,
                " rule {} match {}",
                r.source.rule, r.source.match_index
            );
        }
        if let Some(c) = r.conditions.as_deref() {
            if let Some(v) = ConditionsView::of(c) {
                let _ = write!(line, ", when {}", v.describe());
            }
            if let Some(l) = c.listener
                && l != listener
            {
                let _ = write!(line, ", only on the {} listener", listener_name(l));
            }
        }
        line
    };
    ex.also_matched = losers.iter().map(describe).collect();
    ex.conditions_not_met = not_met.iter().map(describe).collect();

    let cluster = match decision {
        Decision::Route(m) => {
            let r = m.route;
            let gateway_api = r.source.kind != RouteKind::Ingress;
            if !gateway_api {
                ex.ingress = Some(r.source.object.clone());
            }
            ex.route = Some(r.source.clone());
            ex.rule = Some(RuleInfo {
                host: match &r.host {
                    crate::model::HostPattern::Any => String::new(),
                    h => h.to_string(),
                },
                host_match: m.host_match,
            });
            ex.path_match = Some(PathMatchInfo {
                path: r.path.path.clone(),
                path_type: r.path.path_type,
                length: r.path.length(),
            });
            let host_part = match m.host_match {
                HostMatch::Exact => format!("the exact host {}", r.host),
                HostMatch::Wildcard => format!(
                    "the wildcard host {} (no exact host rule matched this path)",
                    r.host
                ),
                HostMatch::Any => {
                    "a rule without host (no host-specific rule matched this path)".into()
                }
            };
            let kind = match r.path.path_type {
                crate::model::PathType::ImplementationSpecific => {
                    "ImplementationSpecific (matched as Prefix)".to_string()
                }
                t => t.to_string(),
            };
            let conditions = r.conditions.as_deref().and_then(ConditionsView::of);
            let when = conditions
                .as_ref()
                .map(|c| format!(" and {}", c.describe()))
                .unwrap_or_default();
            ex.reason = format!(
                "Matched {host_part}, path {kind} {} (length {}){when} of {} rule {} {} {}{}{}{note}.",
                r.path.path,
                r.path.length(),
                r.source,
                r.source.rule,
                if gateway_api { "match" } else { "path" },
                r.source.match_index,
                if losers.is_empty() {
                    String::new()
                } else {
                    format!("; it beats {} other matching route(s)", losers.len())
                },
                match not_met
                    .iter()
                    .filter(|(p, _)| *p > r.precedence(m.host_match))
                    .count()
                {
                    0 => String::new(),
                    n => format!(
                        "; {n} route(s) that rank higher did not match the method, headers, query or listener"
                    ),
                }
            );
            let detail = gateway_api.then(|| RouteDetail::of(snapshot, r));
            if let Some(d) = &detail {
                ex.conditions = conditions;
                ex.listener = d.listener;
                ex.filters = Some(d.filters.clone());
                // Cluster indices mean nothing outside the snapshot.
                ex.backends = Some(
                    d.backends
                        .iter()
                        .cloned()
                        .map(|b| BackendView { cluster: None, ..b })
                        .collect(),
                );
            }
            if let Action::Redirect(rd) = &r.action {
                let scheme = uri.scheme_str().unwrap_or("http");
                let location = rd.location(
                    scheme,
                    Some(host.as_str()).filter(|h| !h.is_empty()),
                    &path,
                    &r.path.key,
                    uri.query(),
                );
                let _ = write!(
                    ex.reason,
                    " It answers {} with Location {location} (RequestRedirect).",
                    rd.status
                );
                ex.status = rd.status;
                ex.location = Some(location);
                return Ok(ex);
            }
            match snapshot.route_cluster(r) {
                Some(cluster) => {
                    if let Some(d) = &detail {
                        split_note(&mut ex.reason, d, r);
                    }
                    cluster
                }
                None => {
                    ex.status = match &r.action {
                        Action::Redirect(rd) => rd.status,
                        Action::Respond { status, .. } => *status,
                        Action::Forward(_) => 500,
                    };
                    match (&r.action, &detail) {
                        (Action::Forward(_), Some(d)) => {
                            let why: Vec<&str> = d
                                .backends
                                .iter()
                                .filter_map(|b| b.problem.as_deref())
                                .collect();
                            let _ = write!(
                                ex.reason,
                                " No backendRef of the rule is valid ({}): it answers 500 `invalid backend for {}`.",
                                why.join("; "),
                                r.source.object
                            );
                        }
                        (Action::Respond { status, body }, Some(_)) => {
                            let _ = write!(ex.reason, " It answers {status} `{body}`.");
                        }
                        _ => {
                            let _ = write!(ex.reason, " It answers {}.", action_summary(r));
                        }
                    }
                    return Ok(ex);
                }
            }
        }
        Decision::DefaultBackend(cluster) => {
            ex.default_backend = true;
            ex.reason = format!(
                "No rule matches host {} path {}; the default backend answers (from {}).",
                if host.is_empty() { "(none)" } else { &host },
                path,
                snapshot
                    .default_backend_source
                    .as_ref()
                    .map(|i| format!("Ingress {i}"))
                    .unwrap_or_else(|| "--default-backend-service".into())
            );
            cluster
        }
        Decision::NotFound => {
            ex.reason = format!(
                "No rule matches host {} path {} and there is no default backend: 404 `no route for {} {}`.",
                if host.is_empty() { "(none)" } else { &host },
                path,
                host,
                path
            );
            return Ok(ex);
        }
    };
    ex.backend = Some(BackendInfo {
        namespace: cluster.service.namespace.clone(),
        service: cluster.service.name.clone(),
        port: cluster.service_port,
    });
    ex.endpoints = endpoint_list(&cluster.upstream);
    ex.status = if ex.endpoints.is_empty() { 503 } else { 200 };
    if ex.status == 503 {
        let why = match &cluster.upstream {
            Upstream::Unresolved { reason } => reason.clone(),
            _ => format!(
                "Service {} has no ready or serving endpoints",
                cluster.service
            ),
        };
        let _ = write!(
            ex.reason,
            " It answers 503 `no endpoints for {}`: {why}.",
            cluster.service
        );
    }
    Ok(ex)
}

/// `http` or `https`, as `served_on` and the JSON name listeners.
fn listener_name(l: ListenerKind) -> &'static str {
    match l {
        ListenerKind::Http => "http",
        ListenerKind::Https => "https",
    }
}

/// `-X METHOD -H 'Name: value'…` as given, or `None` for a plain `GET`.
fn request_line(method: &http::Method, headers: &http::HeaderMap) -> Option<String> {
    if method == http::Method::GET && headers.is_empty() {
        return None;
    }
    let mut line = method.to_string();
    for (name, value) in headers {
        let _ = write!(
            line,
            " -H '{name}: {}'",
            String::from_utf8_lossy(value.as_bytes())
        );
    }
    Some(line)
}

/// Adds to `reason` how a Gateway API route that splits its traffic picks a backend,
/// and what the share of an invalid backendRef gets.
fn split_note(reason: &mut String, d: &RouteDetail, r: &Route) {
    if d.backends.len() > 1 {
        let _ = write!(
            reason,
            " Each request goes to one backend picked at random by weight ({}); `backend` is the first valid one.",
            d.weights()
        );
    }
    let invalid: f64 = d
        .backends
        .iter()
        .filter(|b| !b.valid)
        .map(|b| b.percent)
        .sum();
    if invalid > 0.0 {
        let _ = write!(
            reason,
            " {} of requests go to an invalid backendRef and answer 500 `invalid backend for {}`.",
            percent(invalid),
            r.source.object
        );
    }
}

/// `explain` as text.
pub fn explain_text(ex: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", ex.url);
    if let Some(req) = &ex.request {
        let _ = writeln!(out, "  request:   {req}");
    }
    let _ = writeln!(
        out,
        "  host:      {}",
        if ex.host.is_empty() {
            "(none)"
        } else {
            &ex.host
        }
    );
    let _ = writeln!(out, "  path:      {}", ex.path);
    if let (Some(route), Some(rule), Some(pm)) = (&ex.route, &ex.rule, &ex.path_match) {
        match &ex.ingress {
            Some(ing) => {
                let _ = writeln!(out, "  ingress:   {ing}");
            }
            None => {
                let _ = writeln!(
                    out,
                    "  route:     {route} rule {} match {}",
                    route.rule, route.match_index
                );
            }
        }
        let _ = writeln!(
            out,
            "  rule:      host {} ({} match)",
            if rule.host.is_empty() {
                "(any)"
            } else {
                &rule.host
            },
            rule.host_match
        );
        let _ = writeln!(
            out,
            "  path rule: {} {} (length {})",
            pm.path_type, pm.path, pm.length
        );
        if let Some(c) = &ex.conditions {
            let _ = writeln!(out, "  when:      {}", c.describe());
        }
        if let Some(f) = &ex.filters {
            let _ = writeln!(
                out,
                "  filters:   {}",
                if f.is_empty() {
                    "(none)".to_string()
                } else {
                    f.join(", ")
                }
            );
        }
    } else if ex.default_backend {
        let _ = writeln!(out, "  rule:      none; default backend");
    } else {
        let _ = writeln!(out, "  rule:      none");
    }
    if let Some(location) = &ex.location {
        let _ = writeln!(out, "  redirect:  {} to {location}", ex.status);
    }
    match &ex.backends {
        Some(backends) => {
            for (i, b) in backends.iter().enumerate() {
                let state = match (&b.problem, b.valid) {
                    (Some(p), false) => format!("invalid: {p}: 500"),
                    (Some(p), true) => format!("{p}: 503"),
                    (None, _) => format!(
                        "endpoints {}",
                        b.endpoints.as_deref().unwrap_or_default().join(", ")
                    ),
                };
                let filters = if b.filters.is_empty() {
                    String::new()
                } else {
                    format!("  filters {}", b.filters.join(", "))
                };
                let _ = writeln!(
                    out,
                    "  {:<11}{:>6} weight {:<4} {}  {state}{filters}",
                    if i == 0 { "backends:" } else { "" },
                    percent(b.percent),
                    b.weight,
                    b.display_name()
                );
            }
        }
        None => {
            if let Some(b) = &ex.backend {
                let port = b.port.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
                let _ = writeln!(out, "  backend:   {}/{}:{}", b.namespace, b.service, port);
                let eps = if ex.endpoints.is_empty() {
                    "(none)".to_string()
                } else {
                    ex.endpoints.join(", ")
                };
                let _ = writeln!(out, "  endpoints: {eps}");
            }
        }
    }
    let _ = writeln!(out, "  status:    {}", ex.status);
    let _ = writeln!(out, "  why:       {}", ex.reason);
    if !ex.also_matched.is_empty() {
        let _ = writeln!(out, "  also matched, and lost:");
        for m in &ex.also_matched {
            let _ = writeln!(out, "    {m}");
        }
    }
    if !ex.conditions_not_met.is_empty() {
        let _ = writeln!(
            out,
            "  host and path matched, but not the method, headers, query or listener:"
        );
        for m in &ex.conditions_not_met {
            let _ = writeln!(out, "    {m}");
        }
    }
    out
}

/// Whether any diagnostic of the snapshot is an error (for `check`'s exit status).
pub fn errors(snapshot: &Snapshot) -> usize {
    snapshot
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count()
}
