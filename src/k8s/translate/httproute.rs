//! HTTPRoute, one source kind of translation: each match of each rule of an HTTPRoute
//! attached to a programmed listener of one of our Gateways becomes a route per
//! hostname it serves there, with Gateway API's matches, filters, weighted backends and
//! timeouts. What became of each parentRef (Gateway API's `Accepted` and
//! `ResolvedRefs` reasons) goes into the [`GatewayReport`].

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use http::header::{HeaderName, HeaderValue};

use super::backends::{PortKey, Resolver};
use super::gateway::{GATEWAY_GROUP, Gateways, gateway_host, intersect};
use super::ingress::{BackendField, Use, UseObject};
use super::{Age, Diags, FastMap, Inputs, Options, normalize_rule_path, ns_name, object_ref};
use crate::k8s::gateway_api::httproutes::{
    HttpRoute, HttpRouteRules, HttpRouteRulesFilters, HttpRouteRulesFiltersRequestRedirectScheme,
    HttpRouteRulesFiltersType, HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType,
    HttpRouteRulesMatchesMethod, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType,
};
use crate::model::gateway::{AttachReason, RefsReason, RouteInfo, RouteParentStatus};
use crate::model::{
    Action, BackendTarget, Backends, Conditions, Filters, HeaderCondition, HeaderModifier,
    HostPattern, ListenerKind, Mirror, ObjectRef, PathModifier, PathRule, PathType, Pattern,
    QueryCondition, Redirect, Route, RouteKind, RouteSource, Severity, Timeouts, Upstream,
    UrlRewrite, ValueMatch, WeightedBackend,
};

const KIND: &str = "HTTPRoute";

/// Routes of the HTTPRoutes attached to our Gateways, oldest HTTPRoute first (then rule,
/// then match), and what became of every HTTPRoute that names one of our Gateways.
pub(super) fn translate<'a>(
    inputs: &'a Inputs,
    gateways: &mut Gateways<'a>,
    resolver: &mut Resolver<'a>,
    options: &Options,
    diags: &mut Diags,
) -> (Vec<Route>, Vec<RouteInfo>) {
    let mut routes = Vec::new();
    let mut infos = Vec::new();
    if gateways.gateways.is_empty() {
        return (routes, infos);
    }
    let mut order: Vec<(u32, &HttpRoute)> = inputs
        .http_routes
        .iter()
        .enumerate()
        .map(|(i, r)| (i as u32, r.as_ref()))
        .collect();
    order.sort_by_cached_key(|(_, r)| age_key(r));
    for (index, route) in order {
        if let Some(info) = one_route(
            index,
            route,
            gateways,
            resolver,
            options,
            diags,
            &mut routes,
        ) {
            infos.push(info);
        }
    }
    infos.sort_by(|a, b| a.object.cmp(&b.object));
    (routes, infos)
}

/// Sort key for "oldest wins": creationTimestamp (absent sorts first), then
/// `namespace/name`.
pub(super) fn age_key(route: &HttpRoute) -> Age<'_> {
    Age::of(&route.metadata)
}

/// Translates one HTTPRoute; `None` when none of its parentRefs names a Gateway of ours.
fn one_route<'a>(
    index: u32,
    route: &'a HttpRoute,
    gateways: &mut Gateways<'a>,
    resolver: &mut Resolver<'a>,
    options: &Options,
    diags: &mut Diags,
    out: &mut Vec<Route>,
) -> Option<RouteInfo> {
    let id = object_ref(&route.metadata);
    let namespace = id.namespace.as_str();

    // The route's own hostnames; an invalid one is dropped with a diagnostic.
    let mut hostnames = Vec::new();
    for (hi, h) in route
        .spec
        .hostnames
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        match gateway_host(h) {
            Ok(p) => hostnames.push(p),
            Err(e) => diags.push(
                Severity::Error,
                KIND,
                &id,
                format!("spec.hostnames[{hi}]"),
                format!("`{h}`: {e}; ignored"),
            ),
        }
    }
    let had_hostnames =
        !hostnames.is_empty() || route.spec.hostnames.as_ref().is_some_and(|h| !h.is_empty());
    if had_hostnames && hostnames.is_empty() {
        // Every hostname was invalid: serving "every host" instead would widen the route.
        diags.push(
            Severity::Error,
            KIND,
            &id,
            "spec.hostnames",
            "no valid hostname; the route is not served",
        );
    }

    // Attachment: per parentRef that names one of our Gateways.
    let mut parents = Vec::new();
    let mut served_hosts: Vec<HostPattern> = Vec::new();
    // The listeners this route attached to: a route counts once in a listener's
    // `attachedRoutes`, however many of its parentRefs select that listener.
    let mut counted: Vec<(ObjectRef, usize)> = Vec::new();
    for (pi, parent) in route
        .spec
        .parent_refs
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let group = parent.group.as_deref().unwrap_or(GATEWAY_GROUP);
        let kind = parent.kind.as_deref().unwrap_or("Gateway");
        if group != GATEWAY_GROUP || kind != "Gateway" {
            continue;
        }
        let gw_ns = parent.namespace.as_deref().unwrap_or(namespace);
        let Some(gw) = gateways.gateways.get(&(gw_ns, parent.name.as_str())) else {
            continue;
        };
        let gw_object = gw.object.clone();
        let candidates: Vec<usize> = gw
            .listeners
            .iter()
            .enumerate()
            .filter(|(_, l)| {
                parent.section_name.as_deref().is_none_or(|s| s == l.name)
                    && parent.port.is_none_or(|p| p == l.port)
            })
            .map(|(i, _)| i)
            .collect();
        let mut status = RouteParentStatus {
            gateway: gw_object.clone(),
            section_name: parent.section_name.clone(),
            port: parent.port,
            accepted: AttachReason::Accepted,
            accepted_message: String::new(),
            resolved_refs: RefsReason::ResolvedRefs,
            resolved_refs_message: String::new(),
        };
        let allowed: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| {
                let l = &gw.listeners[i];
                l.admits_http_route && gateways.admits(l, gw_ns, namespace)
            })
            .collect();
        let mut attached = Vec::new();
        if candidates.is_empty() {
            status.accepted = AttachReason::NoMatchingParent;
            status.accepted_message = match (&parent.section_name, parent.port) {
                (Some(s), _) => format!("Gateway {gw_object} has no listener named {s}"),
                (None, Some(p)) => format!("Gateway {gw_object} has no listener on port {p}"),
                (None, None) => format!("Gateway {gw_object} has no listeners"),
            };
        } else if allowed.is_empty() {
            status.accepted = AttachReason::NotAllowedByListeners;
            status.accepted_message = format!(
                "no listener of Gateway {gw_object} admits HTTPRoutes from namespace {namespace}"
            );
        } else if !(had_hostnames && hostnames.is_empty()) {
            for &i in &allowed {
                let l = &gw.listeners[i];
                if let Ok(hosts) = intersect(l.hostname.as_ref(), &hostnames) {
                    attached.push(l.info);
                    if l.served_on.is_some() {
                        for h in hosts {
                            if !served_hosts.contains(&h) {
                                served_hosts.push(h);
                            }
                        }
                    }
                }
            }
            if attached.is_empty() {
                status.accepted = AttachReason::NoMatchingListenerHostname;
                status.accepted_message =
                    format!("no hostname of the route matches a listener of Gateway {gw_object}");
            }
        } else {
            status.accepted = AttachReason::NoMatchingListenerHostname;
            status.accepted_message = "the route has no valid hostname".into();
        }
        if status.accepted != AttachReason::Accepted {
            diags.push(
                Severity::Warning,
                KIND,
                &id,
                format!("spec.parentRefs[{pi}]"),
                format!(
                    "not attached to Gateway {gw_object} ({}): {}",
                    status.accepted.as_str(),
                    status.accepted_message
                ),
            );
        }
        if let Some(info) = gateways.infos.get_mut(&gw_object) {
            for li in attached {
                let key = (gw_object.clone(), li);
                if counted.contains(&key) {
                    continue;
                }
                counted.push(key);
                if let Some(l) = info.listeners.get_mut(li) {
                    l.attached_routes += 1;
                }
            }
        }
        parents.push(status);
    }
    if parents.is_empty() {
        return None;
    }

    // Rules, resolved once and then entered for every hostname served.
    let mut refs = RefsReason::ResolvedRefs;
    let mut refs_message = String::new();
    // A match the spec says makes the route not accepted (`UnsupportedValue`); the
    // rest of the route is still served.
    let mut unsupported: Option<String> = None;
    let mut made = Vec::new();
    let rules = route.spec.rules.as_deref().unwrap_or_default();
    for (ri, rule) in rules.iter().enumerate() {
        let ctx = RuleCtx {
            id: &id,
            namespace: ns_name(&route.metadata).0,
            index,
            ri,
            options,
        };
        let (action, filters, timeouts, problem) =
            rule_action(&ctx, rule, gateways, resolver, diags);
        if let Some((reason, message)) = problem
            && refs == RefsReason::ResolvedRefs
        {
            refs = reason;
            refs_message = message;
        }
        let no_match = [HttpRouteRulesMatches::default()];
        let matches: &[HttpRouteRulesMatches] = match rule.matches.as_deref() {
            Some(m) if !m.is_empty() => m,
            _ => &no_match,
        };
        for (mi, m) in matches.iter().enumerate() {
            let Some((path, conditions)) = route_match(&ctx, mi, m, diags) else {
                continue;
            };
            if let Action::Redirect(rd) = &action
                && matches!(rd.path, Some(PathModifier::ReplacePrefixMatch(_)))
                && path.path_type != PathType::Prefix
            {
                prefix_match_refused(&id, ri, mi, &mut unsupported, diags);
                continue;
            }
            let prefix_rewrite = |f: &Option<Arc<Filters>>| {
                f.as_ref()
                    .and_then(|f| f.rewrite.as_ref())
                    .is_some_and(|r| matches!(r.path, Some(PathModifier::ReplacePrefixMatch(_))))
            };
            let backend_prefix_rewrite = match &action {
                Action::Forward(b) => b.list.iter().any(|b| prefix_rewrite(&b.filters)),
                _ => false,
            };
            if (prefix_rewrite(&filters) || backend_prefix_rewrite)
                && path.path_type != PathType::Prefix
            {
                prefix_match_refused(&id, ri, mi, &mut unsupported, diags);
                continue;
            }
            made.push(Route {
                host: HostPattern::Any,
                path,
                conditions,
                source: RouteSource {
                    kind: RouteKind::HttpRoute,
                    object: id.clone(),
                    rule: ri,
                    match_index: mi,
                },
                order: 0,
                action: action.clone(),
                filters: filters.clone(),
                timeouts,
                max_body_size: None,
            });
        }
    }
    for p in &mut parents {
        p.resolved_refs = refs;
        p.resolved_refs_message = refs_message.clone();
        if let Some(message) = &unsupported
            && p.accepted == AttachReason::Accepted
        {
            p.accepted = AttachReason::UnsupportedValue;
            p.accepted_message = message.clone();
        }
    }
    // One copy of the rules' routes per hostname; the last hostname takes the originals.
    if let Some((last, others)) = served_hosts.split_last() {
        for host in others {
            for r in &made {
                let mut r = r.clone();
                r.host = host.clone();
                out.push(r);
            }
        }
        for mut r in made {
            r.host = last.clone();
            out.push(r);
        }
    }
    Some(RouteInfo {
        kind: RouteKind::HttpRoute,
        object: id,
        generation: route.metadata.generation,
        hostnames: served_hosts
            .iter()
            .map(|h| match h {
                HostPattern::Any => "*".to_string(),
                h => h.to_string(),
            })
            .collect(),
        parents,
    })
}

/// A match left out because its rule's `ReplacePrefixMatch` needs a `PathPrefix` match:
/// the spec makes the route not accepted (`UnsupportedValue`, kept in `unsupported`).
fn prefix_match_refused(
    id: &ObjectRef,
    ri: usize,
    mi: usize,
    unsupported: &mut Option<String>,
    diags: &mut Diags,
) {
    diags.push(
        Severity::Error,
        KIND,
        id,
        format!("spec.rules[{ri}].filters"),
        format!("ReplacePrefixMatch needs a PathPrefix match; matches[{mi}] is not served"),
    );
    unsupported.get_or_insert_with(|| {
        format!("spec.rules[{ri}].matches[{mi}]: ReplacePrefixMatch needs a PathPrefix match")
    });
}

/// Where a rule is, for diagnostics.
struct RuleCtx<'r, 'a> {
    id: &'r ObjectRef,
    /// The HTTPRoute's namespace.
    namespace: &'a str,
    /// Index in [`Inputs::http_routes`].
    index: u32,
    ri: usize,
    options: &'r Options,
}

/// What a rule does: its action, route-level filters and timeouts, and the first
/// reference problem (for `ResolvedRefs`).
type RuleAction = (
    Action,
    Option<Arc<Filters>>,
    Timeouts,
    Option<(RefsReason, String)>,
);

fn rule_action<'a>(
    ctx: &RuleCtx<'_, 'a>,
    rule: &'a HttpRouteRules,
    gateways: &Gateways<'a>,
    resolver: &mut Resolver<'a>,
    diags: &mut Diags,
) -> RuleAction {
    let ri = ctx.ri;
    let id = ctx.id;
    let mut problem: Option<(RefsReason, String)> = None;
    let timeouts = rule_timeouts(ctx, rule, diags);
    let invalid = |why: &str| Action::Respond {
        status: 500,
        body: Arc::from(format!("invalid backend for {id}{why}")),
    };

    let built = translate_filters(
        ctx,
        &format!("spec.rules[{ri}].filters"),
        rule.filters.as_deref().unwrap_or_default(),
        gateways,
        resolver,
        diags,
        &mut problem,
    );
    let (filters, redirect) = match built {
        Ok(f) => f,
        Err(()) => {
            return (invalid(""), None, timeouts, problem);
        }
    };
    if let Some(rd) = redirect {
        return (Action::Redirect(Box::new(rd)), filters, timeouts, problem);
    }

    let refs = rule.backend_refs.as_deref().unwrap_or_default();
    if refs.is_empty() {
        diags.push(
            Severity::Error,
            KIND,
            id,
            format!("spec.rules[{ri}].backendRefs"),
            "no backendRefs and no RequestRedirect; the rule answers 500",
        );
        return (invalid(""), filters, timeouts, problem);
    }
    let mut list = Vec::with_capacity(refs.len());
    for (bi, b) in refs.iter().enumerate() {
        let field = format!("spec.rules[{ri}].backendRefs[{bi}]");
        let weight = u32::try_from(b.weight.unwrap_or(1)).unwrap_or(0);
        let target = match service_ref(
            ctx,
            &field,
            (b.group.as_deref(), b.kind.as_deref()),
            (b.namespace.as_deref(), &b.name, b.port),
            gateways,
            resolver,
            diags,
        ) {
            Ok(cluster) => {
                if matches!(
                    resolver.clusters[cluster as usize].upstream,
                    Upstream::Endpoints { .. }
                ) {
                    resolver.uses.push(Use {
                        cluster,
                        object: UseObject::HttpRoute(ctx.index),
                        field: BackendField::RouteBackend {
                            rule: ri as u32,
                            backend: bi as u32,
                        },
                    });
                }
                BackendTarget::Cluster(cluster)
            }
            Err((reason, message)) => {
                if problem.is_none() {
                    problem = Some((reason, message.clone()));
                }
                BackendTarget::Invalid {
                    reason: Arc::from(message),
                }
            }
        };
        let backend_filters = match b.filters.as_deref() {
            Some(fs) if !fs.is_empty() => {
                // The backendRef filter type has the rule filter's schema, generated
                // twice; one conversion keeps one filter translation.
                let converted: Result<Vec<HttpRouteRulesFilters>, _> = fs
                    .iter()
                    .map(|f| serde_json::to_value(f).and_then(serde_json::from_value))
                    .collect();
                match converted {
                    Ok(fs) => match translate_filters(
                        ctx,
                        &format!("{field}.filters"),
                        &fs,
                        gateways,
                        resolver,
                        diags,
                        &mut problem,
                    ) {
                        Ok((f, None)) => f,
                        Ok((_, Some(_))) => {
                            diags.push(
                                Severity::Error,
                                KIND,
                                id,
                                format!("{field}.filters"),
                                "RequestRedirect is not supported on a backendRef; its share answers 500",
                            );
                            list.push(WeightedBackend {
                                target: BackendTarget::Invalid {
                                    reason: Arc::from("redirect on a backendRef"),
                                },
                                weight,
                                filters: None,
                            });
                            continue;
                        }
                        Err(()) => {
                            list.push(WeightedBackend {
                                target: BackendTarget::Invalid {
                                    reason: Arc::from("unsupported filter"),
                                },
                                weight,
                                filters: None,
                            });
                            continue;
                        }
                    },
                    Err(e) => {
                        diags.push(
                            Severity::Error,
                            KIND,
                            id,
                            format!("{field}.filters"),
                            format!("cannot be read ({e}); its share answers 500"),
                        );
                        list.push(WeightedBackend {
                            target: BackendTarget::Invalid {
                                reason: Arc::from("unreadable filters"),
                            },
                            weight,
                            filters: None,
                        });
                        continue;
                    }
                }
            }
            _ => None,
        };
        list.push(WeightedBackend {
            target,
            weight,
            filters: backend_filters,
        });
    }
    match Backends::weighted(list) {
        Some(backends) => (Action::Forward(backends), filters, timeouts, problem),
        None => {
            diags.push(
                Severity::Warning,
                KIND,
                id,
                format!("spec.rules[{ri}].backendRefs"),
                "every backendRef has weight 0; the rule answers 500",
            );
            (invalid(""), filters, timeouts, problem)
        }
    }
}

/// A Service reference (backendRef or mirror): the cluster, or why it is invalid.
fn service_ref<'a>(
    ctx: &RuleCtx<'_, 'a>,
    field: &str,
    (group, kind): (Option<&str>, Option<&str>),
    (namespace, name, port): (Option<&str>, &str, Option<i32>),
    gateways: &Gateways<'a>,
    resolver: &mut Resolver<'a>,
    diags: &mut Diags,
) -> Result<u32, (RefsReason, String)> {
    let id = ctx.id;
    let consequence = if field.ends_with("requestMirror.backendRef") {
        "the mirror is left out"
    } else {
        "its share of the traffic answers 500"
    };
    let mut fail = |reason: RefsReason, message: String| {
        diags.push(
            Severity::Error,
            KIND,
            id,
            field.to_string(),
            format!("{message}; {consequence}"),
        );
        Err((reason, message))
    };
    let group = group.unwrap_or("");
    let kind = kind.unwrap_or("Service");
    if !(group.is_empty() || group == "core") || kind != "Service" {
        let shown = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{group}/{kind}")
        };
        return fail(
            RefsReason::InvalidKind,
            format!("{shown} is not a supported backend kind (Service)"),
        );
    }
    let route_ns = ctx.namespace;
    let ns = namespace.unwrap_or(route_ns);
    if !gateways.permits(KIND, route_ns, "Service", ns, name) {
        return fail(
            RefsReason::RefNotPermitted,
            format!(
                "Service {ns}/{name} is in another namespace and no ReferenceGrant there permits it"
            ),
        );
    }
    let Some(port) = port else {
        return fail(
            RefsReason::BackendNotFound,
            format!("Service {ns}/{name}: port is required"),
        );
    };
    let Some(key) = resolver.service_key(ns, name) else {
        return fail(
            RefsReason::BackendNotFound,
            format!("Service {ns}/{name} not found"),
        );
    };
    let cluster = resolver.cluster(key, PortKey::Number(port));
    if let Some(reason) = resolver.unresolved(cluster) {
        diags.push(
            Severity::Error,
            KIND,
            id,
            field.to_string(),
            format!("{reason}; the backend answers 503 until it is fixed"),
        );
    }
    Ok(cluster)
}

/// A rule's (or backendRef's) filters: the filters to apply and a redirect, or `Err`
/// when one cannot be served (the rule or share answers 500).
#[allow(clippy::too_many_arguments)]
fn translate_filters<'a>(
    ctx: &RuleCtx<'_, 'a>,
    field: &str,
    list: &[HttpRouteRulesFilters],
    gateways: &Gateways<'a>,
    resolver: &mut Resolver<'a>,
    diags: &mut Diags,
    problem: &mut Option<(RefsReason, String)>,
) -> Result<(Option<Arc<Filters>>, Option<Redirect>), ()> {
    let id = ctx.id;
    let mut out = Filters::default();
    let mut redirect = None;
    let error = |diags: &mut Diags, fi: usize, reason: String| {
        diags.push(
            Severity::Error,
            KIND,
            id,
            format!("{field}[{fi}]"),
            format!("{reason}; the rule answers 500"),
        );
    };
    for (fi, f) in list.iter().enumerate() {
        match f.r#type {
            HttpRouteRulesFiltersType::RequestHeaderModifier
            | HttpRouteRulesFiltersType::ResponseHeaderModifier => {
                let request = f.r#type == HttpRouteRulesFiltersType::RequestHeaderModifier;
                let changes = if request {
                    f.request_header_modifier
                        .as_ref()
                        .map(|m| header_changes!(m))
                } else {
                    f.response_header_modifier
                        .as_ref()
                        .map(|m| header_changes!(m))
                };
                match changes {
                    Some(Ok(hm)) if request => out.request_headers = Some(hm),
                    Some(Ok(hm)) => out.response_headers = Some(hm),
                    Some(Err(e)) => {
                        error(diags, fi, e);
                        return Err(());
                    }
                    None => {
                        error(diags, fi, format!("{:?} without its settings", f.r#type));
                        return Err(());
                    }
                }
            }
            HttpRouteRulesFiltersType::RequestRedirect => {
                let Some(r) = &f.request_redirect else {
                    error(diags, fi, "RequestRedirect without requestRedirect".into());
                    return Err(());
                };
                let status = r.status_code.unwrap_or(302);
                if ![301, 302, 303, 307, 308].contains(&status) {
                    error(
                        diags,
                        fi,
                        format!("statusCode {status} is not one of 301, 302, 303, 307, 308"),
                    );
                    return Err(());
                }
                let path = match &r.path {
                    None => None,
                    Some(p) => match path_modifier(
                        p.replace_full_path.as_deref(),
                        p.replace_prefix_match.as_deref(),
                    ) {
                        Ok(m) => Some(m),
                        Err(e) => {
                            error(diags, fi, e);
                            return Err(());
                        }
                    },
                };
                let port = match r.port.map(u16::try_from) {
                    None => None,
                    Some(Ok(p)) if p > 0 => Some(p),
                    Some(_) => {
                        error(diags, fi, "port is out of range".into());
                        return Err(());
                    }
                };
                if let Some(h) = r.hostname.as_deref()
                    && let Err(e) = exact_hostname(h)
                {
                    error(diags, fi, format!("hostname: {e}"));
                    return Err(());
                }
                redirect = Some(Redirect {
                    scheme: r.scheme.as_ref().map(|s| {
                        match s {
                            HttpRouteRulesFiltersRequestRedirectScheme::Http => "http",
                            HttpRouteRulesFiltersRequestRedirectScheme::Https => "https",
                        }
                        .to_string()
                    }),
                    hostname: r.hostname.clone(),
                    port,
                    path,
                    status: status as u16,
                    listener_port: Some(ctx.options.gateway_http_port),
                });
            }
            HttpRouteRulesFiltersType::UrlRewrite => {
                let Some(r) = &f.url_rewrite else {
                    error(diags, fi, "URLRewrite without urlRewrite".into());
                    return Err(());
                };
                let hostname = match r.hostname.as_deref().map(exact_hostname) {
                    None => None,
                    Some(Ok(v)) => Some(v),
                    Some(Err(e)) => {
                        error(diags, fi, format!("hostname: {e}"));
                        return Err(());
                    }
                };
                let path = match &r.path {
                    None => None,
                    Some(p) => match path_modifier(
                        p.replace_full_path.as_deref(),
                        p.replace_prefix_match.as_deref(),
                    ) {
                        Ok(m) => Some(m),
                        Err(e) => {
                            error(diags, fi, e);
                            return Err(());
                        }
                    },
                };
                out.rewrite = Some(UrlRewrite { hostname, path });
            }
            HttpRouteRulesFiltersType::RequestMirror => {
                let Some(m) = &f.request_mirror else {
                    error(diags, fi, "RequestMirror without requestMirror".into());
                    return Err(());
                };
                // `percent` and `fraction` (extended support): the share of requests
                // mirrored, sampled per request; 0% leaves the filter out.
                let none =
                    m.percent == Some(0) || m.fraction.as_ref().is_some_and(|f| f.numerator <= 0);
                let all = m.percent.is_none_or(|p| p >= 100)
                    && m.fraction
                        .as_ref()
                        .is_none_or(|f| f.numerator >= f.denominator.unwrap_or(100));
                if none {
                    diags.push(
                        Severity::Warning,
                        KIND,
                        id,
                        format!("{field}[{fi}].requestMirror"),
                        "mirrors 0% of the requests; the filter has no effect",
                    );
                    continue;
                }
                let share = if all {
                    None
                } else {
                    match (m.percent, &m.fraction) {
                        (_, Some(f)) => Some((
                            u32::try_from(f.numerator).unwrap_or(0),
                            u32::try_from(f.denominator.unwrap_or(100))
                                .unwrap_or(100)
                                .max(1),
                        )),
                        (Some(p), None) => Some((u32::try_from(p).unwrap_or(0), 100)),
                        (None, None) => None,
                    }
                };
                let b = &m.backend_ref;
                match service_ref(
                    ctx,
                    &format!("{field}[{fi}].requestMirror.backendRef"),
                    (b.group.as_deref(), b.kind.as_deref()),
                    (b.namespace.as_deref(), &b.name, b.port),
                    gateways,
                    resolver,
                    diags,
                ) {
                    Ok(cluster) => out.mirrors.push(Mirror { cluster, share }),
                    Err((reason, message)) => {
                        // A mirror that cannot be resolved is left out; the real request
                        // is unaffected.
                        if problem.is_none() {
                            *problem = Some((reason, message));
                        }
                    }
                }
            }
            HttpRouteRulesFiltersType::ExtensionRef => {
                let name = f
                    .extension_ref
                    .as_ref()
                    .map(|e| format!("{}/{} {}", e.group, e.kind, e.name))
                    .unwrap_or_default();
                error(diags, fi, format!("ExtensionRef {name} is not supported"));
                return Err(());
            }
            HttpRouteRulesFiltersType::Cors => {
                error(diags, fi, "the CORS filter is not supported yet".into());
                return Err(());
            }
        }
    }
    if redirect.is_some() && out.rewrite.is_some() {
        error(
            diags,
            0,
            "RequestRedirect and URLRewrite cannot be used together".into(),
        );
        return Err(());
    }
    let filters = (!out.is_empty()).then(|| Arc::new(out));
    Ok((filters, redirect))
}

/// A `path` of a redirect or rewrite. An empty `replacePrefixMatch` removes the matched
/// prefix, as `/` does (the spec's table: `/foo/bar` with prefix `/foo` becomes `/bar`).
/// A redirect's or rewrite's hostname: an exact DNS name, as a `Host` value.
fn exact_hostname(h: &str) -> Result<HeaderValue, String> {
    match HostPattern::parse(h)? {
        HostPattern::Exact(name) => {
            HeaderValue::from_str(&name).map_err(|_| format!("`{h}` is not a valid host"))
        }
        _ => Err(format!("`{h}` must be one exact host name")),
    }
}

/// A redirect's or rewrite's path change. A replacement is a path: it starts with `/`
/// and holds no query, fragment, space or control character.
fn path_modifier(full: Option<&str>, prefix: Option<&str>) -> Result<PathModifier, String> {
    for p in [full, prefix].into_iter().flatten() {
        if !p.is_empty() {
            PathRule::new(p, PathType::Exact)?;
        }
    }
    match (full, prefix) {
        (Some(p), None) if p.starts_with('/') => Ok(PathModifier::ReplaceFullPath(p.into())),
        (None, Some("")) => Ok(PathModifier::ReplacePrefixMatch("/".into())),
        (None, Some(p)) if p.starts_with('/') => Ok(PathModifier::ReplacePrefixMatch(p.into())),
        (Some(_), None) | (None, Some(_)) => Err("a replacement path must start with `/`".into()),
        _ => Err("path needs exactly one of replaceFullPath and replacePrefixMatch".into()),
    }
}

/// The [`HeaderModifier`] of a generated request or response header modifier (two
/// generated types of one schema).
macro_rules! header_changes {
    ($m:expr) => {
        header_modifier(
            &$m.set
                .iter()
                .flatten()
                .map(|p| (p.name.clone(), p.value.clone()))
                .collect::<Vec<_>>(),
            &$m.add
                .iter()
                .flatten()
                .map(|p| (p.name.clone(), p.value.clone()))
                .collect::<Vec<_>>(),
            $m.remove.as_deref().unwrap_or_default(),
        )
    };
}
use header_changes;

/// Headers a modifier may not change: they frame the message or the connection (the
/// proxy sets them), or name the host (`URLRewrite` changes that).
const PROTECTED_HEADERS: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
];

/// Header changes from `set`, `add` and `remove` lists; names and values validated.
fn header_modifier(
    set: &[(String, String)],
    add: &[(String, String)],
    remove: &[String],
) -> Result<HeaderModifier, String> {
    let name = |n: &str| -> Result<HeaderName, String> {
        let name = HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| format!("`{n}` is not a header name"))?;
        if PROTECTED_HEADERS.contains(&name.as_str()) {
            return Err(format!(
                "header {name} frames the message or names the host and cannot be modified"
            ));
        }
        Ok(name)
    };
    let pair = |(n, v): &(String, String)| -> Result<(HeaderName, HeaderValue), String> {
        let value =
            HeaderValue::from_str(v).map_err(|_| format!("header {n}: value is not valid"))?;
        Ok((name(n)?, value))
    };
    Ok(HeaderModifier {
        set: set.iter().map(pair).collect::<Result<_, _>>()?,
        add: add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
    })
}

/// The rule's `timeouts`: Gateway API durations (`10s`, `1h30m`, `500ms`); `0s` means
/// no limit.
fn rule_timeouts(ctx: &RuleCtx<'_, '_>, rule: &HttpRouteRules, diags: &mut Diags) -> Timeouts {
    let Some(t) = &rule.timeouts else {
        return Timeouts::default();
    };
    let parse = |name: &str, v: &Option<String>, diags: &mut Diags| -> Option<Duration> {
        let v = v.as_deref()?;
        match humantime::parse_duration(v) {
            Ok(d) if d.is_zero() => None,
            Ok(d) => Some(d),
            Err(e) => {
                diags.push(
                    Severity::Error,
                    KIND,
                    ctx.id,
                    format!("spec.rules[{}].timeouts.{name}", ctx.ri),
                    format!("`{v}` is not a duration ({e}); ignored"),
                );
                None
            }
        }
    };
    Timeouts {
        request: parse("request", &t.request, diags),
        backend_request: parse("backendRequest", &t.backend_request, diags),
    }
}

/// One match: the path rule and the conditions; `None` (with a diagnostic) when it
/// cannot be served.
fn route_match(
    ctx: &RuleCtx<'_, '_>,
    mi: usize,
    m: &HttpRouteRulesMatches,
    diags: &mut Diags,
) -> Option<(PathRule, Option<Box<Conditions>>)> {
    let field = format!("spec.rules[{}].matches[{mi}]", ctx.ri);
    let id = ctx.id;
    let fail = |diags: &mut Diags, at: String, reason: String| {
        diags.push(
            Severity::Error,
            KIND,
            id,
            at,
            format!("{reason}; this match is not served"),
        );
    };
    let (path_type, value) = match &m.path {
        None => (HttpRouteRulesMatchesPathType::PathPrefix, "/"),
        Some(p) => (
            p.r#type
                .clone()
                .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix),
            p.value.as_deref().unwrap_or("/"),
        ),
    };
    let path = match path_type {
        HttpRouteRulesMatchesPathType::RegularExpression => PathRule::regex(value),
        literal => {
            let pt = if literal == HttpRouteRulesMatchesPathType::Exact {
                PathType::Exact
            } else {
                PathType::Prefix
            };
            match normalize_rule_path(value, ctx.options.normalize_paths) {
                Ok((normal, warning)) => {
                    if let Some(w) = warning {
                        diags.push(Severity::Warning, KIND, id, format!("{field}.path"), w);
                    }
                    PathRule::new(&normal, pt)
                }
                Err(e) => Err(e),
            }
        }
    };
    let path = match path {
        Ok(p) => p,
        Err(e) => {
            fail(diags, format!("{field}.path"), e);
            return None;
        }
    };

    let mut conditions = Conditions {
        method: m.method.as_ref().map(method),
        // Gateway listeners are served on the HTTP listener only (HTTPS ones are not
        // programmed yet): the route does not exist on the HTTPS listener.
        listener: Some(ListenerKind::Http),
        ..Conditions::default()
    };
    let mut seen: FastMap<HeaderName, ()> = FastMap::default();
    for (hi, h) in m.headers.as_deref().unwrap_or_default().iter().enumerate() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            fail(
                diags,
                format!("{field}.headers[{hi}].name"),
                format!("`{}` is not a header name", h.name),
            );
            return None;
        };
        // Only the first match of a name counts (the spec's rule).
        if seen.insert(name.clone(), ()).is_some() {
            continue;
        }
        let regex = h.r#type == Some(HttpRouteRulesMatchesHeadersType::RegularExpression);
        let value = match value_match(regex, &h.value) {
            Ok(v) => v,
            Err(e) => {
                fail(diags, format!("{field}.headers[{hi}].value"), e);
                return None;
            }
        };
        conditions.headers.push(HeaderCondition { name, value });
    }
    for (qi, q) in m
        .query_params
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if conditions.query.iter().any(|c| c.name == q.name) {
            continue;
        }
        let regex = q.r#type == Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression);
        let value = match value_match(regex, &q.value) {
            Ok(v) => v,
            Err(e) => {
                fail(diags, format!("{field}.queryParams[{qi}].value"), e);
                return None;
            }
        };
        conditions.query.push(QueryCondition {
            name: q.name.clone(),
            value,
        });
    }
    Some((path, Some(Box::new(conditions))))
}

/// A header or query value match: exact, or a regular expression of the whole value.
fn value_match(regex: bool, value: &str) -> Result<ValueMatch, String> {
    if regex {
        Pattern::new(value).map(ValueMatch::Regex)
    } else {
        Ok(ValueMatch::Exact(value.to_string()))
    }
}

fn method(m: &HttpRouteRulesMatchesMethod) -> Method {
    match m {
        HttpRouteRulesMatchesMethod::Get => Method::GET,
        HttpRouteRulesMatchesMethod::Head => Method::HEAD,
        HttpRouteRulesMatchesMethod::Post => Method::POST,
        HttpRouteRulesMatchesMethod::Put => Method::PUT,
        HttpRouteRulesMatchesMethod::Delete => Method::DELETE,
        HttpRouteRulesMatchesMethod::Connect => Method::CONNECT,
        HttpRouteRulesMatchesMethod::Options => Method::OPTIONS,
        HttpRouteRulesMatchesMethod::Trace => Method::TRACE,
        HttpRouteRulesMatchesMethod::Patch => Method::PATCH,
    }
}
