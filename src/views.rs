//! What a route does beyond its match, as people read it: its conditions, its filters,
//! its weighted backends and its action. `check`, `explain`, the dashboard and
//! `/debug/snapshot` all show routes through these views, so the four agree. Pure
//! functions of a [`Snapshot`]; nothing here is on the request path.

use std::fmt::Write as _;

use serde::Serialize;

use crate::model::gateway::{GatewayInfo, GatewayReport, RouteInfo};
use crate::model::route::ListenerKind;
use crate::model::{
    Action, BackendTarget, Conditions, PathModifier, Route, Snapshot, Upstream, ValueMatch,
};

/// A route's method, header and query conditions, in Gateway API's words.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConditionsView {
    /// The method a request must have; null for any.
    pub method: Option<String>,
    pub headers: Vec<ValueMatchView>,
    pub query: Vec<ValueMatchView>,
}

/// One header or query parameter condition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValueMatchView {
    pub name: String,
    /// `Exact` or `RegularExpression`.
    #[serde(rename = "type")]
    pub match_type: &'static str,
    pub value: String,
}

fn value_match(name: &str, v: &ValueMatch) -> ValueMatchView {
    let (match_type, value) = match v {
        ValueMatch::Exact(s) => ("Exact", s.clone()),
        ValueMatch::Regex(p) => ("RegularExpression", p.as_str().to_string()),
    };
    ValueMatchView {
        name: name.to_string(),
        match_type,
        value,
    }
}

impl ConditionsView {
    /// The method, header and query conditions of `c`; `None` when it has none (it
    /// may still restrict the listener: see [`RouteDetail::listener`]).
    pub fn of(c: &Conditions) -> Option<ConditionsView> {
        if c.method.is_none() && c.headers.is_empty() && c.query.is_empty() {
            return None;
        }
        Some(ConditionsView {
            method: c.method.as_ref().map(ToString::to_string),
            headers: c
                .headers
                .iter()
                .map(|h| value_match(h.name.as_str(), &h.value))
                .collect(),
            query: c
                .query
                .iter()
                .map(|q| value_match(&q.name, &q.value))
                .collect(),
        })
    }

    /// One line: `method POST, header x-canary = yes, query v ~ [0-9]+` (`=` exact,
    /// `~` a regular expression that must match the whole value).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = &self.method {
            parts.push(format!("method {m}"));
        }
        for (what, list) in [("header", &self.headers), ("query", &self.query)] {
            for v in list {
                let op = if v.match_type == "Exact" { "=" } else { "~" };
                parts.push(format!("{what} {} {op} {}", v.name, v.value));
            }
        }
        parts.join(", ")
    }
}

/// One weighted backend of a route.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendView {
    /// The Service's namespace and name; null for an invalid backendRef, whose `reason`
    /// names what it refers to.
    pub namespace: Option<String>,
    pub service: Option<String>,
    /// The Service port number; null when the Service or its named port is not found.
    pub port: Option<i32>,
    pub weight: u32,
    /// The share of the route's requests it gets: weight / total weight, in percent.
    pub percent: f64,
    /// False for a backendRef that cannot be used: its share answers 500.
    pub valid: bool,
    /// What its share of the requests gets, when that needs saying: the random pick by
    /// weight, an invalid reference (500), or no endpoints (503).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Filters of this backendRef (applied after the route's own).
    pub filters: Vec<&'static str>,
    /// Index into the snapshot's clusters; null when invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<u32>,
    /// The addresses it balances over (`host:port` for an ExternalName). Left out where
    /// `cluster` leads to them (the dashboard, `/debug/snapshot`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    /// Why it cannot answer, in a few words (invalid reference, unresolved Service, no
    /// endpoints), without the share; `reason` says it with the share.
    #[serde(skip)]
    pub problem: Option<String>,
}

impl BackendView {
    /// `namespace/service:port`, or `(invalid)`.
    pub fn display_name(&self) -> String {
        match (&self.namespace, &self.service) {
            (Some(ns), Some(svc)) => format!(
                "{ns}/{svc}:{}",
                self.port.map_or_else(|| "?".to_string(), |p| p.to_string())
            ),
            _ => "(invalid backendRef)".to_string(),
        }
    }
}

/// What a matched route does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ActionView {
    /// Proxied to one of `backends`, picked at random by weight for each request.
    Forward,
    /// Answered with a redirect (Gateway API `RequestRedirect`); unset parts keep the
    /// request's own.
    Redirect {
        status: u16,
        scheme: Option<String>,
        hostname: Option<String>,
        port: Option<u16>,
        path: Option<PathModifier>,
    },
    /// Answered by Portcullis with this status and body.
    Respond { status: u16, body: String },
}

/// A route's conditions, filters, backends and action.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteDetail {
    /// The method, header and query conditions; null for a route without any (every
    /// Ingress route).
    pub conditions: Option<ConditionsView>,
    /// The only listener (`http` or `https`) the route exists on; null for both. A
    /// Gateway API route exists only on the listeners its Gateway listeners are served
    /// on.
    pub listener: Option<ListenerKind>,
    /// The route's filters in Gateway API's names (`RequestHeaderModifier`,
    /// `ResponseHeaderModifier`, `URLRewrite`, `RequestMirror`, `RequestRedirect`).
    pub filters: Vec<&'static str>,
    /// Every weighted backend, in the route's order; empty unless it forwards.
    pub backends: Vec<BackendView>,
    pub action: ActionView,
}

impl RouteDetail {
    /// The detail of `route`, each backend with its endpoints.
    pub fn of(snapshot: &Snapshot, route: &Route) -> RouteDetail {
        RouteDetail::build(snapshot, route, true)
    }

    /// The detail of `route` without the backends' endpoints, for documents that list
    /// clusters and their endpoints once (the dashboard, `/debug/snapshot`).
    pub fn compact(snapshot: &Snapshot, route: &Route) -> RouteDetail {
        RouteDetail::build(snapshot, route, false)
    }

    fn build(snapshot: &Snapshot, route: &Route, with_endpoints: bool) -> RouteDetail {
        let mut filters = route
            .filters
            .as_ref()
            .map(|f| f.names())
            .unwrap_or_default();
        let (action, backends) = match &route.action {
            Action::Forward(b) => (
                ActionView::Forward,
                backend_views(snapshot, b, with_endpoints),
            ),
            Action::Redirect(rd) => {
                filters.push("RequestRedirect");
                (
                    ActionView::Redirect {
                        status: rd.status,
                        scheme: rd.scheme.clone(),
                        hostname: rd.hostname.clone(),
                        port: rd.port,
                        path: rd.path.clone(),
                    },
                    Vec::new(),
                )
            }
            Action::Respond { status, body } => (
                ActionView::Respond {
                    status: *status,
                    body: body.to_string(),
                },
                Vec::new(),
            ),
        };
        RouteDetail {
            conditions: route.conditions.as_deref().and_then(ConditionsView::of),
            listener: route.conditions.as_deref().and_then(|c| c.listener),
            filters,
            backends,
            action,
        }
    }

    /// A short summary of the backends and their weights, such as
    /// `default/stable:80 90%, default/canary:80 10%`.
    pub fn weights(&self) -> String {
        let mut out = String::new();
        for (i, b) in self.backends.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{} {}", b.display_name(), percent(b.percent));
        }
        out
    }
}

/// A percentage as people write it: `90%`, `33.3%`.
pub fn percent(p: f64) -> String {
    if (p - p.round()).abs() < 0.05 {
        format!("{}%", p.round())
    } else {
        format!("{p:.1}%")
    }
}

fn backend_views(
    snapshot: &Snapshot,
    backends: &crate::model::Backends,
    with_endpoints: bool,
) -> Vec<BackendView> {
    let total = backends.total_weight.max(1);
    let split = backends.list.len() > 1;
    backends
        .list
        .iter()
        .map(|b| {
            let pct = f64::from(b.weight) * 100.0 / f64::from(total);
            let share = format!(
                "weight {} of {}: {} of requests, picked at random per request",
                b.weight,
                backends.total_weight,
                percent(pct)
            );
            let filters = b.filters.as_ref().map(|f| f.names()).unwrap_or_default();
            match &b.target {
                BackendTarget::Cluster(id) => {
                    let cluster = snapshot.clusters.get(*id as usize);
                    let endpoints = with_endpoints.then(|| {
                        cluster
                            .map(|c| endpoint_list(&c.upstream))
                            .unwrap_or_default()
                    });
                    let unusable = match cluster.map(|c| &c.upstream) {
                        Some(Upstream::Unresolved { reason }) => Some(reason.clone()),
                        Some(Upstream::Endpoints { active, .. }) if active.is_empty() => {
                            Some("no ready or serving endpoints".to_string())
                        }
                        None => Some("unknown cluster".to_string()),
                        _ => None,
                    };
                    let reason = match (&unusable, split) {
                        (Some(why), true) => Some(format!("{share}; {why}: answers 503")),
                        (Some(why), false) => Some(format!("{why}: answers 503")),
                        (None, true) => Some(share),
                        (None, false) => None,
                    };
                    BackendView {
                        namespace: cluster.map(|c| c.service.namespace.clone()),
                        service: cluster.map(|c| c.service.name.clone()),
                        port: cluster.and_then(|c| c.service_port),
                        weight: b.weight,
                        percent: pct,
                        valid: true,
                        reason,
                        filters,
                        cluster: Some(*id),
                        endpoints,
                        problem: unusable,
                    }
                }
                BackendTarget::Invalid { reason } => BackendView {
                    namespace: None,
                    service: None,
                    port: None,
                    weight: b.weight,
                    percent: pct,
                    valid: false,
                    reason: Some(if split {
                        format!("{reason}; {share}: answers 500")
                    } else {
                        format!("{reason}: answers 500")
                    }),
                    filters,
                    cluster: None,
                    endpoints: with_endpoints.then(Vec::new),
                    problem: Some(reason.to_string()),
                },
            }
        })
        .collect()
}

/// One GatewayClass of ours.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GatewayClassView<'a> {
    pub name: &'a str,
    pub accepted: bool,
}

/// Gateway API's part of a snapshot as the dashboard and `/debug/snapshot` show it: our
/// GatewayClasses, their Gateways with each listener's state, and every route with a
/// parentRef to one of them, with what became of each parentRef (the reasons the status
/// conditions carry).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GatewayApiView<'a> {
    pub classes: Vec<GatewayClassView<'a>>,
    pub gateways: &'a [GatewayInfo],
    pub routes: &'a [RouteInfo],
}

impl<'a> GatewayApiView<'a> {
    pub fn of(report: &'a GatewayReport) -> GatewayApiView<'a> {
        GatewayApiView {
            classes: report
                .classes
                .iter()
                .map(|(name, accepted)| GatewayClassView {
                    name,
                    accepted: *accepted,
                })
                .collect(),
            gateways: &report.gateways,
            routes: &report.routes,
        }
    }
}

/// The addresses a cluster balances over: its active endpoints, or an ExternalName's
/// `host:port`; empty when unresolved.
pub fn endpoint_list(u: &Upstream) -> Vec<String> {
    match u {
        Upstream::Endpoints { active, .. } => active.iter().map(ToString::to_string).collect(),
        Upstream::ExternalName { host, port } => vec![format!("{host}:{port}")],
        Upstream::Unresolved { .. } => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_read_naturally() {
        assert_eq!(percent(90.0), "90%");
        assert_eq!(percent(100.0 / 3.0), "33.3%");
        assert_eq!(percent(12.5), "12.5%");
    }
}
