//! The `check` and `explain` commands: what a set of manifests would serve, and which
//! rule a request would take. Both build the same snapshot `run` would serve.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::json;

use crate::files::Loaded;
use crate::k8s::Options;
use crate::model::{
    Cluster, Decision, HostMatch, ObjectRef, Route, Severity, Snapshot, Upstream, request_host,
};
use crate::publish::{Counts, build_snapshot};

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
    let _ = writeln!(
        out,
        "Would serve {} virtual host(s), {} route(s), {} cluster(s) with {} endpoint(s), {} TLS host(s).",
        c.vhosts, c.routes, c.clusters, c.endpoints, c.tls_hosts
    );
    for vh in &snapshot.routes.vhosts {
        let _ = writeln!(out, "\n  {}", vh.host);
        for r in &vh.routes {
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
    json!({
        "files": files,
        "objects": objects,
        "summary": {
            "virtual_hosts": c.vhosts, "routes": c.routes, "clusters": c.clusters,
            "endpoints": c.endpoints, "tls_hosts": c.tls_hosts,
            "errors": c.errors, "warnings": c.warnings,
        },
        "virtual_hosts": vhosts,
        "default_backend": snapshot.default_backend.map(|id| backend_json(snapshot.cluster(id))),
        "tls": tls,
        "ignored": snapshot.ignored,
        "diagnostics": snapshot.diagnostics,
    })
}

fn route_json(snapshot: &Snapshot, r: &Route) -> serde_json::Value {
    json!({
        "path": r.path.path,
        "path_type": r.path.path_type,
        "ingress": (r.source.kind == crate::model::RouteKind::Ingress).then_some(&r.source.object),
        "route": r.source,
        "backend": snapshot.route_cluster(r).map(backend_json),
    })
}

fn backend_json(c: &Cluster) -> serde_json::Value {
    json!({
        "namespace": c.service.namespace,
        "service": c.service.name,
        "port": c.service_port,
        "endpoints": endpoint_list(c),
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

fn endpoint_list(c: &Cluster) -> Vec<String> {
    match &c.upstream {
        Upstream::Endpoints { active, .. } => active.iter().map(ToString::to_string).collect(),
        Upstream::ExternalName { host, port } => vec![format!("{host}:{port}")],
        Upstream::Unresolved { .. } => Vec::new(),
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

/// The answer of `explain`, in the JSON shape of INTERFACE.md.
#[derive(Debug, Serialize)]
pub struct Explanation {
    pub url: String,
    pub host: String,
    pub path: String,
    pub status: u16,
    pub ingress: Option<ObjectRef>,
    pub rule: Option<RuleInfo>,
    pub path_match: Option<PathMatchInfo>,
    pub default_backend: bool,
    pub backend: Option<BackendInfo>,
    pub endpoints: Vec<String>,
    pub reason: String,
    /// Other routes that matched and lost, best first (text output only).
    #[serde(skip)]
    pub also_matched: Vec<String>,
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

/// Explains which rule a request to `url` would take. `url` may omit the scheme.
pub fn explain(snapshot: &Snapshot, url: &str) -> Result<Explanation, ExplainError> {
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

    let mut ex = Explanation {
        url: url.to_string(),
        host: host.clone(),
        path: path.clone(),
        status: 404,
        ingress: None,
        rule: None,
        path_match: None,
        default_backend: false,
        backend: None,
        endpoints: Vec::new(),
        reason: String::new(),
        also_matched: Vec::new(),
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
    let decision = snapshot.decide(host_opt, &path);
    let winner = match decision {
        Decision::Route(m) => Some(m.route),
        _ => None,
    };
    let mut losers: Vec<_> = snapshot
        .routes
        .routes()
        .filter(|r| Some(*r as *const Route) != winner.map(|w| w as *const Route))
        .filter_map(|r| {
            let hm = r.host.matches(&host)?;
            r.path.matches(&path).then(|| (r.precedence(hm), r))
        })
        .collect();
    losers.sort_by_key(|l| std::cmp::Reverse(l.0));
    ex.also_matched = losers
        .iter()
        .map(|(p, r)| {
            format!(
                "{} {} {} (length {}, {} host) in {}",
                r.host, r.path.path_type, r.path.path, p.length, p.host, r.source
            )
        })
        .collect();

    let cluster = match decision {
        Decision::Route(m) => {
            let r = m.route;
            if r.source.kind == crate::model::RouteKind::Ingress {
                ex.ingress = Some(r.source.object.clone());
            }
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
            ex.reason = format!(
                "Matched {host_part}, path {kind} {} (length {}) of {} rule {} {} {}{}{note}.",
                r.path.path,
                r.path.length(),
                r.source,
                r.source.rule,
                if r.source.kind == crate::model::RouteKind::Ingress {
                    "path"
                } else {
                    "match"
                },
                r.source.match_index,
                if losers.is_empty() {
                    String::new()
                } else {
                    format!("; it beats {} other matching route(s)", losers.len())
                }
            );
            match snapshot.route_cluster(r) {
                Some(cluster) => cluster,
                None => {
                    ex.status = match &r.action {
                        crate::model::Action::Redirect(rd) => rd.status,
                        crate::model::Action::Respond { status, .. } => *status,
                        crate::model::Action::Forward(_) => 500,
                    };
                    let _ = write!(ex.reason, " It answers {}.", action_summary(r));
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
    ex.endpoints = endpoint_list(cluster);
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

/// `explain` as text.
pub fn explain_text(ex: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", ex.url);
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
    if let (Some(ing), Some(rule), Some(pm)) = (&ex.ingress, &ex.rule, &ex.path_match) {
        let _ = writeln!(out, "  ingress:   {ing}");
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
    } else if ex.default_backend {
        let _ = writeln!(out, "  rule:      none; default backend");
    } else {
        let _ = writeln!(out, "  rule:      none");
    }
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
    let _ = writeln!(out, "  status:    {}", ex.status);
    let _ = writeln!(out, "  why:       {}", ex.reason);
    if !ex.also_matched.is_empty() {
        let _ = writeln!(out, "  also matched, and lost:");
        for m in &ex.also_matched {
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
