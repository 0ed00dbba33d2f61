//! Gateway API as the spec (v1) and its conformance tests describe it: HTTPRoutes read
//! by the real manifest loader and translated by the real `build`, checked on the
//! routing decision and on the Gateway report (`snapshot.gateway`); and, where the
//! outcome is a response, end to end through a real proxy with echo upstreams, and
//! through the real binary watching a folder of manifests.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use portcullis::files;
use portcullis::k8s::{self, Options};
use portcullis::model::gateway::{AttachReason, GatewayInfo, RefsReason, RouteInfo};
use portcullis::model::{
    Action, BackendTarget, Decision, ListenerKind, PathModifier, RequestFacts, Route, Severity,
    Snapshot,
};
use serde_json::{Value, json};
use support::data_path::{Binary, manifest_dir};
use support::*;

// ---------------------------------------------------------------------------------
// Manifests

const GW_API: &str = "gateway.networking.k8s.io/v1";

/// A Gateway of class `portcullis` (assumed in file mode) with `listeners`.
fn gateway(ns: &str, name: &str, listeners: Value) -> Value {
    json!({"apiVersion": GW_API, "kind": "Gateway",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"gatewayClassName": "portcullis", "listeners": listeners}})
}

/// An HTTP listener on port 80 admitting routes from every namespace.
fn http_listener(name: &str, hostname: Option<&str>) -> Value {
    let mut l = json!({"name": name, "port": 80, "protocol": "HTTP",
        "allowedRoutes": {"namespaces": {"from": "All"}}});
    if let Some(h) = hostname {
        l["hostname"] = json!(h);
    }
    l
}

/// Gateway `gw/gw` with one listener `http` on port 80 for every host and namespace.
fn open_gateway() -> Value {
    gateway("gw", "gw", json!([http_listener("http", None)]))
}

/// An HTTPRoute; `spec` without `parentRefs` gets one to Gateway `gw/gw`.
fn route(ns: &str, name: &str, mut spec: Value) -> Value {
    if spec.get("parentRefs").is_none() {
        spec["parentRefs"] = json!([{"name": "gw", "namespace": "gw"}]);
    }
    json!({"apiVersion": GW_API, "kind": "HTTPRoute",
        "metadata": {"namespace": ns, "name": name}, "spec": spec})
}

/// [`route`] with a `creationTimestamp`.
fn route_at(ns: &str, name: &str, created: &str, spec: Value) -> Value {
    let mut r = route(ns, name, spec);
    r["metadata"]["creationTimestamp"] = json!(created);
    r
}

/// One rule: `matches` to the Service `svc` port 80.
fn rule(matches: Value, svc: &str) -> Value {
    json!({"matches": matches, "backendRefs": [{"name": svc, "port": 80}]})
}

/// A match on the path alone.
fn path(kind: &str, value: &str) -> Value {
    json!({"path": {"type": kind, "value": value}})
}

fn service(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name},
        "spec": {"ports": [{"port": 80, "targetPort": 80}]}})
}

/// A Service `ns/name` on port 80 whose one endpoint is `addr`.
fn backend(ns: &str, name: &str, addr: SocketAddr) -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name},
            "spec": {"ports": [{"port": 80, "targetPort": addr.port()}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": format!("{name}-1"),
                "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"port": addr.port()}],
            "endpoints": [{"addresses": [addr.ip().to_string()], "conditions": {"ready": true}}]}),
    ]
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// An Ingress with one rule: `host` (empty: none), one path of `path_type` to `svc`.
fn ingress_at(name: &str, created: &str, host: &str, path_type: &str, p: &str, svc: &str) -> Value {
    let mut rule = json!({"http": {"paths": [{"path": p, "pathType": path_type,
        "backend": {"service": {"name": svc, "port": {"number": 80}}}}]}});
    if !host.is_empty() {
        rule["host"] = json!(host);
    }
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"namespace": "gw", "name": name, "creationTimestamp": created},
        "spec": {"rules": [rule]}})
}

fn reference_grant(ns: &str, name: &str, from_ns: &str, to_name: Option<&str>) -> Value {
    let mut to = json!({"group": "", "kind": "Service"});
    if let Some(n) = to_name {
        to["name"] = json!(n);
    }
    json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
            "namespace": from_ns}], "to": [to]}})
}

/// The documents as one YAML stream (JSON is YAML).
fn yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_json::to_string(d).expect("JSON"))
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// The options `portcullis run --manifests` translates with (defaults of every flag).
fn file_options() -> Options {
    Options {
        assume_class: true,
        allow_local_endpoints: true,
        ..Options::default()
    }
}

/// The documents read by the real manifest loader (which must accept every one) and
/// translated by the real `build`, in file mode.
fn build(docs: &[Value]) -> Snapshot {
    build_with(docs, &file_options())
}

fn build_with(docs: &[Value], options: &Options) -> Snapshot {
    let loaded = files::load_str("gateway.yaml", &yaml(docs)).expect("manifests parse");
    assert!(
        loaded.diagnostics.is_empty(),
        "the loader refused something: {:?}",
        loaded.diagnostics
    );
    k8s::build(&loaded.inputs, options)
}

// ---------------------------------------------------------------------------------
// Routing decisions

/// A request as routing sees it.
struct Req {
    method: Method,
    host: String,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
}

/// `GET` of `target` (path, optionally `?query`) on `host`.
fn req(host: &str, target: &str) -> Req {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    Req {
        method: Method::GET,
        host: host.into(),
        path,
        query,
        headers: HeaderMap::new(),
    }
}

impl Req {
    fn method(mut self, m: &str) -> Self {
        self.method = m.parse().expect("method");
        self
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
        self
    }
}

fn decide<'a>(snap: &'a Snapshot, r: &Req) -> Option<&'a Route> {
    let facts = RequestFacts {
        method: &r.method,
        headers: &r.headers,
        query: r.query.as_deref(),
        listener: ListenerKind::Http,
    };
    match snap.decide_request(Some(&r.host), &r.path, &facts) {
        Decision::Route(m) => Some(m.route),
        _ => None,
    }
}

/// Which route wins: `KIND ns/name rule.match`, or `404`.
fn winner(snap: &Snapshot, r: Req) -> String {
    match decide(snap, &r) {
        Some(route) => format!(
            "{} {}/{} {}.{}",
            route.source.kind,
            route.source.object.namespace,
            route.source.object.name,
            route.source.rule,
            route.source.match_index
        ),
        None => "404".into(),
    }
}

/// What answers: the Service of a forwarding route's first backend, `redirect`, the
/// status and body of an answer Portcullis gives itself, or `404`.
fn answer(snap: &Snapshot, r: Req) -> String {
    match decide(snap, &r).map(|route| &route.action) {
        Some(Action::Forward(b)) => match &b.list[0].target {
            BackendTarget::Cluster(c) => snap.cluster(*c).service.name.clone(),
            BackendTarget::Invalid { reason } => format!("invalid: {reason}"),
        },
        Some(Action::Redirect(_)) => "redirect".into(),
        Some(Action::Respond { status, body }) => format!("{status} {body}"),
        None => "404".into(),
    }
}

/// The route matched by `r`, which must exist.
fn route_of(snap: &Snapshot, r: Req) -> &Route {
    let what = format!("{} {}{}", r.method, r.host, r.path);
    decide(snap, &r).unwrap_or_else(|| panic!("no route for {what}"))
}

fn route_info<'a>(snap: &'a Snapshot, ns: &str, name: &str) -> &'a RouteInfo {
    snap.gateway
        .routes
        .iter()
        .find(|r| r.object.namespace == ns && r.object.name == name)
        .unwrap_or_else(|| panic!("no report for HTTPRoute {ns}/{name}: {:?}", snap.gateway))
}

/// The `Accepted` reason of each parentRef of a route.
fn accepted(snap: &Snapshot, ns: &str, name: &str) -> Vec<AttachReason> {
    route_info(snap, ns, name)
        .parents
        .iter()
        .map(|p| p.accepted)
        .collect()
}

fn gateway_info<'a>(snap: &'a Snapshot, ns: &str, name: &str) -> &'a GatewayInfo {
    snap.gateway
        .gateways
        .iter()
        .find(|g| g.object.namespace == ns && g.object.name == name)
        .unwrap_or_else(|| panic!("no report for Gateway {ns}/{name}"))
}

/// Per listener of a Gateway: (name, attachedRoutes).
fn attached(snap: &Snapshot, ns: &str, name: &str) -> Vec<(String, u32)> {
    gateway_info(snap, ns, name)
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.attached_routes))
        .collect()
}

/// The diagnostics about one object, as `field: reason` lines.
fn diags_of(snap: &Snapshot, kind: &str, ns: &str, name: &str) -> Vec<String> {
    snap.diagnostics
        .iter()
        .filter(|d| d.kind == kind && d.namespace == ns && d.name == name)
        .map(|d| format!("{}: {}", d.field, d.reason))
        .collect()
}

// ---------------------------------------------------------------------------------
// Matches

#[test]
fn path_matches_exact_prefix_element_wise_and_regex_whole_path() {
    let snap = build(&[
        open_gateway(),
        service("gw", "exact"),
        service("gw", "prefix"),
        service("gw", "regex"),
        service("gw", "slash"),
        route(
            "gw",
            "paths",
            json!({"hostnames": ["p.example"], "rules": [
                rule(json!([path("Exact", "/exact")]), "exact"),
                rule(json!([path("PathPrefix", "/foo")]), "prefix"),
                rule(json!([path("PathPrefix", "/bar/")]), "slash"),
                rule(json!([path("RegularExpression", "/v[0-9]+/items")]), "regex"),
            ]}),
        ),
    ]);
    let cases = [
        ("/exact", "exact"),
        ("/exact/", "404"),
        ("/exact/x", "404"),
        ("/Exact", "404"),
        ("/foo", "prefix"),
        ("/foo/", "prefix"),
        ("/foo/bar", "prefix"),
        ("/foobar", "404"),
        // A trailing slash in the prefix does not count: `/bar/` is `/bar`.
        ("/bar", "slash"),
        ("/bar/x", "slash"),
        ("/barx", "404"),
        ("/v1/items", "regex"),
        ("/v12/items", "regex"),
        // The expression matches the whole path, not a part of it.
        ("/api/v1/items", "404"),
        ("/v1/items/x", "404"),
        ("/vx/items", "404"),
    ];
    for (p, want) in cases {
        assert_eq!(answer(&snap, req("p.example", p)), want, "path {p}");
    }
}

#[test]
fn header_query_and_method_matches() {
    let snap = build(&[
        open_gateway(),
        service("gw", "hdr"),
        service("gw", "hdr-re"),
        service("gw", "query"),
        service("gw", "query-re"),
        service("gw", "post"),
        service("gw", "fallback"),
        route(
            "gw",
            "conditions",
            json!({"hostnames": ["c.example"], "rules": [
                rule(json!([{"path": {"type": "PathPrefix", "value": "/h"},
                    "headers": [{"name": "X-Env", "value": "canary"}]}]), "hdr"),
                rule(json!([{"path": {"type": "PathPrefix", "value": "/h"},
                    "headers": [{"name": "x-version", "type": "RegularExpression", "value": "v[0-9]+"}]}]), "hdr-re"),
                rule(json!([{"path": {"type": "PathPrefix", "value": "/q"},
                    "queryParams": [{"name": "tier", "value": "gold"}]}]), "query"),
                rule(json!([{"path": {"type": "PathPrefix", "value": "/q"},
                    "queryParams": [{"name": "id", "type": "RegularExpression", "value": "[0-9]{3}"}]}]), "query-re"),
                rule(json!([{"path": {"type": "PathPrefix", "value": "/m"}, "method": "POST"}]), "post"),
                rule(json!([path("PathPrefix", "/")]), "fallback"),
            ]}),
        ),
    ]);
    let h = |p: &str| req("c.example", p);
    // Header names compare without regard to case; values exactly.
    assert_eq!(answer(&snap, h("/h").header("x-env", "canary")), "hdr");
    assert_eq!(answer(&snap, h("/h").header("X-ENV", "canary")), "hdr");
    assert_eq!(answer(&snap, h("/h").header("x-env", "Canary")), "fallback");
    assert_eq!(answer(&snap, h("/h")), "fallback");
    // A regular expression matches the whole value.
    assert_eq!(answer(&snap, h("/h").header("X-Version", "v12")), "hdr-re");
    assert_eq!(
        answer(&snap, h("/h").header("x-version", "v12b")),
        "fallback"
    );
    assert_eq!(answer(&snap, h("/q?tier=gold")), "query");
    assert_eq!(answer(&snap, h("/q?a=1&tier=gold")), "query");
    assert_eq!(answer(&snap, h("/q?tier=silver")), "fallback");
    // Query parameter names are case-sensitive.
    assert_eq!(answer(&snap, h("/q?Tier=gold")), "fallback");
    assert_eq!(answer(&snap, h("/q?id=123")), "query-re");
    assert_eq!(answer(&snap, h("/q?id=1234")), "fallback");
    assert_eq!(answer(&snap, h("/m").method("POST")), "post");
    assert_eq!(answer(&snap, h("/m")), "fallback");
    assert_eq!(answer(&snap, h("/m").method("PUT")), "fallback");
}

#[test]
fn a_rule_without_matches_and_a_match_without_path_are_prefix_root() {
    let snap = build(&[
        open_gateway(),
        service("gw", "all"),
        service("gw", "versioned"),
        route(
            "gw",
            "bare",
            json!({"hostnames": ["n.example"], "rules": [
                {"backendRefs": [{"name": "all", "port": 80}]},
            ]}),
        ),
        // As conformance's HTTPRouteMatching: a match of headers alone is under `/`.
        route(
            "gw",
            "headers-only",
            json!({"hostnames": ["n.example"], "rules": [
                rule(json!([{"headers": [{"name": "version", "value": "two"}]}]), "versioned"),
            ]}),
        ),
    ]);
    for p in ["/", "/anything", "/a/b/c"] {
        assert_eq!(answer(&snap, req("n.example", p)), "all", "{p}");
        assert_eq!(
            answer(&snap, req("n.example", p).header("version", "two")),
            "versioned",
            "{p}"
        );
    }
    let r = route_of(&snap, req("n.example", "/x"));
    assert_eq!(r.path.path, "/");
    assert_eq!(r.path.path_type, portcullis::model::PathType::Prefix);
}

#[test]
fn invalid_matches_are_left_out_with_a_diagnostic_naming_the_field() {
    let snap = build(&[
        open_gateway(),
        service("gw", "ok"),
        route(
            "gw",
            "bad",
            json!({"hostnames": ["bad.example"], "rules": [
                rule(json!([path("RegularExpression", "/(unclosed")]), "ok"),
                rule(json!([{"headers": [{"name": "x", "type": "RegularExpression", "value": "("}]}]), "ok"),
                rule(json!([path("Exact", "/good")]), "ok"),
            ]}),
        ),
    ]);
    assert_eq!(answer(&snap, req("bad.example", "/good")), "ok");
    assert_eq!(answer(&snap, req("bad.example", "/(unclosed")), "404");
    let d = diags_of(&snap, "HTTPRoute", "gw", "bad");
    assert!(
        d.iter()
            .any(|l| l.starts_with("spec.rules[0].matches[0].path: invalid regular expression")),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|l| l.starts_with("spec.rules[1].matches[0].headers[0].value:")),
        "{d:?}"
    );
}

// ---------------------------------------------------------------------------------
// Filters

#[test]
fn filters_become_the_route_model() {
    let snap = build(&[
        open_gateway(),
        service("gw", "app"),
        service("gw", "shadow"),
        route(
            "gw",
            "filters",
            json!({"hostnames": ["f.example"], "rules": [
                {"matches": [path("PathPrefix", "/headers")],
                 "filters": [
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                        "set": [{"name": "X-Set", "value": "s"}],
                        "add": [{"name": "X-Add", "value": "a"}],
                        "remove": ["X-Remove"]}},
                    {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                        "add": [{"name": "X-Resp", "value": "r"}], "remove": ["Server"]}}],
                 "backendRefs": [{"name": "app", "port": 80}],
                 "timeouts": {"request": "10s", "backendRequest": "2s"}},
                {"matches": [path("PathPrefix", "/old")],
                 "filters": [{"type": "RequestRedirect", "requestRedirect": {
                    "scheme": "https", "hostname": "new.example", "port": 8443,
                    "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"},
                    "statusCode": 301}}]},
                {"matches": [path("PathPrefix", "/moved")],
                 "filters": [{"type": "RequestRedirect", "requestRedirect": {
                    "path": {"type": "ReplaceFullPath", "replaceFullPath": "/landing"}}}]},
                {"matches": [path("PathPrefix", "/rw")],
                 "filters": [{"type": "URLRewrite", "urlRewrite": {
                    "hostname": "internal.example",
                    "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
                {"matches": [path("PathPrefix", "/full")],
                 "filters": [{"type": "URLRewrite", "urlRewrite": {
                    "path": {"type": "ReplaceFullPath", "replaceFullPath": "/one"}}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
                {"matches": [path("PathPrefix", "/mirror")],
                 "filters": [{"type": "RequestMirror", "requestMirror": {
                    "backendRef": {"name": "shadow", "port": 80}}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
            ]}),
        ),
    ]);
    let r = route_of(&snap, req("f.example", "/headers"));
    let f = r.filters.as_ref().expect("filters");
    let reqh = f.request_headers.as_ref().expect("request header modifier");
    assert_eq!(
        format!("{:?} {:?} {:?}", reqh.set, reqh.add, reqh.remove),
        r#"[("x-set", "s")] [("x-add", "a")] ["x-remove"]"#
    );
    let resph = f
        .response_headers
        .as_ref()
        .expect("response header modifier");
    assert_eq!(
        format!("{:?} {:?}", resph.add, resph.remove),
        r#"[("x-resp", "r")] ["server"]"#
    );
    assert_eq!(r.timeouts.request, Some(Duration::from_secs(10)));
    assert_eq!(r.timeouts.backend_request, Some(Duration::from_secs(2)));
    assert_eq!(
        f.names(),
        ["RequestHeaderModifier", "ResponseHeaderModifier"]
    );

    let Action::Redirect(rd) = &route_of(&snap, req("f.example", "/old/x")).action else {
        panic!("a redirect");
    };
    assert_eq!(rd.scheme.as_deref(), Some("https"));
    assert_eq!(rd.hostname.as_deref(), Some("new.example"));
    assert_eq!(rd.port, Some(8443));
    assert_eq!(rd.status, 301);
    assert_eq!(
        rd.path,
        Some(PathModifier::ReplacePrefixMatch("/new".into()))
    );
    let Action::Redirect(rd) = &route_of(&snap, req("f.example", "/moved")).action else {
        panic!("a redirect");
    };
    assert_eq!(
        (rd.status, rd.scheme.clone(), rd.port, rd.listener_port),
        (302, None, None, Some(80)),
        "302 by default; the port of the Gateway listener"
    );
    assert_eq!(
        rd.path,
        Some(PathModifier::ReplaceFullPath("/landing".into()))
    );

    let rw = route_of(&snap, req("f.example", "/rw/a"));
    let rewrite = rw
        .filters
        .as_ref()
        .and_then(|f| f.rewrite.as_ref())
        .expect("rewrite");
    assert_eq!(
        rewrite.hostname.as_ref().map(|h| h.to_str().unwrap()),
        Some("internal.example")
    );
    assert_eq!(
        rewrite.path,
        Some(PathModifier::ReplacePrefixMatch("/v2".into()))
    );
    let full = route_of(&snap, req("f.example", "/full/x"));
    assert_eq!(
        full.filters
            .as_ref()
            .and_then(|f| f.rewrite.as_ref())
            .and_then(|r| r.path.clone()),
        Some(PathModifier::ReplaceFullPath("/one".into()))
    );

    let m = route_of(&snap, req("f.example", "/mirror"));
    let mirrors = &m.filters.as_ref().expect("filters").mirrors;
    assert_eq!(mirrors.len(), 1);
    assert_eq!(snap.cluster(mirrors[0].cluster).service.name, "shadow");
    assert_eq!(answer(&snap, req("f.example", "/mirror")), "app");
}

#[test]
fn extension_ref_and_cors_answer_500_with_a_diagnostic_naming_the_field() {
    let snap = build(&[
        open_gateway(),
        service("gw", "app"),
        route(
            "gw",
            "ext",
            json!({"hostnames": ["x.example"], "rules": [
                {"matches": [path("PathPrefix", "/ext")],
                 "filters": [{"type": "ExtensionRef", "extensionRef": {
                    "group": "example.com", "kind": "Magic", "name": "m"}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
                {"matches": [path("PathPrefix", "/cors")],
                 "filters": [{"type": "CORS", "cors": {"allowOrigins": ["https://a.example"]}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
                rule(json!([path("PathPrefix", "/fine")]), "app"),
            ]}),
        ),
    ]);
    assert_eq!(
        answer(&snap, req("x.example", "/ext")),
        "500 invalid backend for gw/ext"
    );
    assert_eq!(
        answer(&snap, req("x.example", "/cors")),
        "500 invalid backend for gw/ext"
    );
    assert_eq!(answer(&snap, req("x.example", "/fine")), "app");
    let d = diags_of(&snap, "HTTPRoute", "gw", "ext");
    assert!(
        d.iter()
            .any(|l| l.starts_with("spec.rules[0].filters[0]: ExtensionRef")
                && l.contains("example.com/Magic m")
                && l.ends_with("the rule answers 500")),
        "{d:?}"
    );
    assert!(
        d.iter().any(
            |l| l.starts_with("spec.rules[1].filters[0]: the CORS filter")
                && l.ends_with("the rule answers 500")
        ),
        "{d:?}"
    );
}

#[test]
fn replace_prefix_match_on_a_non_prefix_match_is_unsupported_and_an_empty_one_strips() {
    let snap = build(&[
        open_gateway(),
        service("gw", "app"),
        route(
            "gw",
            "mixed",
            json!({"hostnames": ["r.example"], "rules": [
                {"matches": [path("Exact", "/exact"), path("PathPrefix", "/prefix")],
                 "filters": [{"type": "URLRewrite", "urlRewrite": {
                    "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
                {"matches": [path("PathPrefix", "/strip")],
                 "filters": [{"type": "URLRewrite", "urlRewrite": {
                    "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": ""}}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
            ]}),
        ),
    ]);
    // The Exact match is not served; the PathPrefix one of the same rule is.
    assert_eq!(answer(&snap, req("r.example", "/exact")), "404");
    assert_eq!(answer(&snap, req("r.example", "/prefix/a")), "app");
    // The spec: such a route is not Accepted (UnsupportedValue).
    assert_eq!(
        accepted(&snap, "gw", "mixed"),
        [AttachReason::UnsupportedValue]
    );
    let d = diags_of(&snap, "HTTPRoute", "gw", "mixed");
    assert!(
        d.iter().any(|l| l.starts_with(
            "spec.rules[0].filters: ReplacePrefixMatch needs a PathPrefix match; matches[0]"
        )),
        "{d:?}"
    );
    // An empty replacePrefixMatch is valid and removes the prefix (the spec's table).
    let strip = route_of(&snap, req("r.example", "/strip/x"));
    let rw = strip
        .filters
        .as_ref()
        .and_then(|f| f.rewrite.as_ref())
        .expect("rewrite");
    let modifier = rw.path.as_ref().expect("path modifier");
    assert_eq!(modifier.apply("/strip/bar", &strip.path.key), "/bar");
    assert_eq!(modifier.apply("/strip/", &strip.path.key), "/");
    assert_eq!(modifier.apply("/strip", &strip.path.key), "/");
}

#[test]
fn mirror_shares_zero_all_and_between() {
    let snap = build(&[
        open_gateway(),
        service("gw", "app"),
        service("gw", "shadow"),
        route(
            "gw",
            "mirrors",
            json!({"hostnames": ["m.example"], "rules": [
                {"matches": [path("PathPrefix", "/none")],
                 "filters": [{"type": "RequestMirror", "requestMirror": {
                    "backendRef": {"name": "shadow", "port": 80}, "percent": 0}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
                {"matches": [path("PathPrefix", "/all")],
                 "filters": [{"type": "RequestMirror", "requestMirror": {
                    "backendRef": {"name": "shadow", "port": 80}, "percent": 100}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
                {"matches": [path("PathPrefix", "/half")],
                 "filters": [{"type": "RequestMirror", "requestMirror": {
                    "backendRef": {"name": "shadow", "port": 80}, "percent": 50}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
                {"matches": [path("PathPrefix", "/third")],
                 "filters": [{"type": "RequestMirror", "requestMirror": {
                    "backendRef": {"name": "shadow", "port": 80},
                    "fraction": {"numerator": 1, "denominator": 3}}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
            ]}),
        ),
    ]);
    let share = |p: &str| {
        route_of(&snap, req("m.example", p))
            .filters
            .as_ref()
            .and_then(|f| f.mirrors.first())
            .map(|m| m.share)
    };
    assert_eq!(share("/all"), Some(None));
    assert_eq!(share("/half"), Some(Some((50, 100))));
    assert_eq!(share("/third"), Some(Some((1, 3))));
    let mirrors = |p: &str| {
        route_of(&snap, req("m.example", p))
            .filters
            .as_ref()
            .map_or(0, |f| f.mirrors.len())
    };
    assert_eq!(mirrors("/none"), 0);
    assert_eq!(mirrors("/all"), 1);
}

// ---------------------------------------------------------------------------------
// Precedence

#[test]
fn precedence_ties_follow_the_spec() {
    let t = |s: u32| format!("2024-01-01T00:00:{s:02}Z");
    let snap = build(&[
        open_gateway(),
        service("gw", "s"),
        // Oldest: exact vs prefix, longest prefix, conditions, rule order.
        route_at(
            "gw",
            "old",
            &t(1),
            json!({"hostnames": ["p.example"], "rules": [
                rule(json!([path("PathPrefix", "/a")]), "s"),
                rule(json!([path("PathPrefix", "/a/b")]), "s"),
                rule(json!([path("Exact", "/a/b")]), "s"),
                rule(json!([path("PathPrefix", "/m")]), "s"),
                rule(json!([{"path": {"type": "PathPrefix", "value": "/m"}, "method": "GET"}]), "s"),
                rule(json!([{"path": {"type": "PathPrefix", "value": "/h"},
                    "headers": [{"name": "a", "value": "1"}]}]), "s"),
                rule(json!([{"path": {"type": "PathPrefix", "value": "/h"},
                    "headers": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}]), "s"),
                rule(json!([{"path": {"type": "PathPrefix", "value": "/q"},
                    "queryParams": [{"name": "a", "value": "1"}]}]), "s"),
                rule(json!([{"path": {"type": "PathPrefix", "value": "/q"},
                    "queryParams": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}]), "s"),
                // Method beats headers, headers beat query parameters.
                rule(json!([{"path": {"type": "PathPrefix", "value": "/mix"},
                    "headers": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}],
                    "queryParams": [{"name": "q", "value": "1"}]}]), "s"),
                rule(json!([{"path": {"type": "PathPrefix", "value": "/mix"}, "method": "GET"}]), "s"),
                // Two identical rules: the first wins.
                rule(json!([path("PathPrefix", "/dup")]), "s"),
                rule(json!([path("PathPrefix", "/dup")]), "s"),
                // Two matches of one rule: the first wins.
                rule(json!([path("PathPrefix", "/two"), path("PathPrefix", "/two")]), "s"),
            ]}),
        ),
        // Younger routes with the same matches: they lose every tie.
        route_at(
            "gw",
            "young",
            &t(5),
            json!({"hostnames": ["p.example"], "rules": [
                rule(json!([path("PathPrefix", "/dup")]), "s"),
                rule(json!([path("PathPrefix", "/age")]), "s"),
            ]}),
        ),
        route_at(
            "gw",
            "elder",
            &t(0),
            json!({"hostnames": ["p.example"], "rules": [
                rule(json!([path("PathPrefix", "/age")]), "s"),
            ]}),
        ),
        // Same creationTimestamp: "{namespace}/{name}" in alphabetical order, as one
        // string: `gw-b/z` before `gw/a` ('-' < '/').
        route_at(
            "gw",
            "a",
            &t(9),
            json!({"hostnames": ["p.example"], "rules": [rule(json!([path("PathPrefix", "/tie")]), "s")]}),
        ),
        route_at(
            "gw-b",
            "z",
            &t(9),
            json!({"hostnames": ["p.example"], "rules": [rule(json!([path("PathPrefix", "/tie")]), "s")]}),
        ),
        route_at(
            "gw",
            "b",
            &t(9),
            json!({"hostnames": ["p.example"], "rules": [rule(json!([path("PathPrefix", "/tie2")]), "s")]}),
        ),
        route_at(
            "gw",
            "c",
            &t(9),
            json!({"hostnames": ["p.example"], "rules": [rule(json!([path("PathPrefix", "/tie2")]), "s")]}),
        ),
    ]);
    let w = |r: Req| winner(&snap, r);
    let p = |target: &str| req("p.example", target);
    assert_eq!(w(p("/a/b")), "HTTPRoute gw/old 2.0", "exact over prefix");
    assert_eq!(w(p("/a/b/c")), "HTTPRoute gw/old 1.0", "longest prefix");
    assert_eq!(w(p("/a/x")), "HTTPRoute gw/old 0.0");
    assert_eq!(w(p("/m")), "HTTPRoute gw/old 4.0", "method over none");
    assert_eq!(w(p("/m").method("POST")), "HTTPRoute gw/old 3.0");
    assert_eq!(
        w(p("/h").header("a", "1").header("b", "2")),
        "HTTPRoute gw/old 6.0",
        "more headers over fewer"
    );
    assert_eq!(w(p("/h").header("a", "1")), "HTTPRoute gw/old 5.0");
    assert_eq!(w(p("/h")), "404");
    assert_eq!(
        w(p("/q?a=1&b=2")),
        "HTTPRoute gw/old 8.0",
        "more query over fewer"
    );
    assert_eq!(w(p("/q?a=1")), "HTTPRoute gw/old 7.0");
    assert_eq!(
        w(p("/mix?q=1").header("a", "1").header("b", "2")),
        "HTTPRoute gw/old 10.0",
        "a method over any number of headers and query parameters"
    );
    assert_eq!(
        w(p("/mix?q=1")
            .method("PUT")
            .header("a", "1")
            .header("b", "2")),
        "HTTPRoute gw/old 9.0"
    );
    assert_eq!(
        w(p("/dup")),
        "HTTPRoute gw/old 11.0",
        "older route, then rule order"
    );
    assert_eq!(w(p("/two")), "HTTPRoute gw/old 13.0", "match order");
    assert_eq!(
        w(p("/age")),
        "HTTPRoute gw/elder 0.0",
        "oldest creationTimestamp"
    );
    assert_eq!(
        w(p("/tie")),
        "HTTPRoute gw-b/z 0.0",
        "alphabetical by {{namespace}}/{{name}}"
    );
    assert_eq!(w(p("/tie2")), "HTTPRoute gw/b 0.0");
}

#[test]
fn hostname_precedence_and_wildcards() {
    let snap = build(&[
        open_gateway(),
        service("gw", "s"),
        route(
            "gw",
            "exact",
            json!({"hostnames": ["x.a.example.com"], "rules": [rule(json!([path("PathPrefix", "/only-exact")]), "s")]}),
        ),
        route(
            "gw",
            "wide",
            json!({"hostnames": ["*.example.com"], "rules": [rule(json!([path("Exact", "/deep/exact/path")]), "s"), rule(json!([path("PathPrefix", "/")]), "s")]}),
        ),
        route(
            "gw",
            "narrow",
            json!({"hostnames": ["*.a.example.com"], "rules": [rule(json!([path("PathPrefix", "/")]), "s")]}),
        ),
        route(
            "gw",
            "anyhost",
            json!({"rules": [rule(json!([path("PathPrefix", "/")]), "s")]}),
        ),
        // An Ingress wildcard covers one label only.
        ingress_at(
            "ing-wild",
            "2024-01-01T00:00:00Z",
            "*.ingress.test",
            "Prefix",
            "/",
            "s",
        ),
    ]);
    let w = |host: &str, p: &str| winner(&snap, req(host, p));
    // Exact over wildcard, when the exact host has a matching path.
    assert_eq!(
        w("x.a.example.com", "/only-exact"),
        "HTTPRoute gw/exact 0.0"
    );
    // Otherwise the most specific wildcard: a longer suffix beats a shorter one, even
    // against an exact path match of the shorter.
    assert_eq!(w("x.a.example.com", "/y"), "HTTPRoute gw/narrow 0.0");
    assert_eq!(
        w("x.a.example.com", "/deep/exact/path"),
        "HTTPRoute gw/narrow 0.0"
    );
    // A Gateway API wildcard covers any number of labels, never the bare domain.
    assert_eq!(w("b.example.com", "/"), "HTTPRoute gw/wide 1.0");
    assert_eq!(w("c.b.example.com", "/"), "HTTPRoute gw/wide 1.0");
    assert_eq!(w("a.example.com", "/"), "HTTPRoute gw/wide 1.0");
    assert_eq!(w("example.com", "/"), "HTTPRoute gw/anyhost 0.0");
    // An Ingress `*.ingress.test` covers exactly one label.
    assert_eq!(w("a.ingress.test", "/"), "Ingress gw/ing-wild 0.0");
    assert_eq!(w("b.a.ingress.test", "/"), "HTTPRoute gw/anyhost 0.0");
    assert_eq!(w("ingress.test", "/"), "HTTPRoute gw/anyhost 0.0");
}

#[test]
fn gateway_listener_wildcards_cover_labels_but_never_the_bare_domain() {
    let snap = build(&[
        gateway(
            "gw",
            "gw",
            json!([http_listener("wild", Some("*.example.com"))]),
        ),
        service("gw", "s"),
        route(
            "gw",
            "r",
            json!({"rules": [rule(json!([path("PathPrefix", "/")]), "s")]}),
        ),
    ]);
    assert_eq!(answer(&snap, req("b.a.example.com", "/")), "s");
    assert_eq!(answer(&snap, req("a.example.com", "/")), "s");
    assert_eq!(answer(&snap, req("example.com", "/")), "404");
    assert_eq!(answer(&snap, req("other.com", "/")), "404");
    assert_eq!(route_info(&snap, "gw", "r").hostnames, ["*.example.com"]);
}

#[test]
fn ingress_and_httproute_routes_share_one_table_in_age_order() {
    let older = "2024-01-01T00:00:00Z";
    let younger = "2024-06-01T00:00:00Z";
    let snap = build(&[
        open_gateway(),
        service("gw", "from-route"),
        service("gw", "from-ingress"),
        route_at(
            "gw",
            "old-route",
            older,
            json!({"hostnames": ["one.example"], "rules": [rule(json!([path("PathPrefix", "/app")]), "from-route")]}),
        ),
        ingress_at(
            "young-ingress",
            younger,
            "one.example",
            "Prefix",
            "/app",
            "from-ingress",
        ),
        ingress_at(
            "old-ingress",
            older,
            "two.example",
            "Prefix",
            "/app",
            "from-ingress",
        ),
        route_at(
            "gw",
            "young-route",
            younger,
            json!({"hostnames": ["two.example"], "rules": [rule(json!([path("PathPrefix", "/app")]), "from-route")]}),
        ),
        // An Ingress Exact is an exact path match: it beats an older HTTPRoute prefix
        // of the same length.
        ingress_at(
            "exact-ingress",
            younger,
            "three.example",
            "Exact",
            "/app",
            "from-ingress",
        ),
        route_at(
            "gw",
            "prefix-route",
            older,
            json!({"hostnames": ["three.example"], "rules": [rule(json!([path("PathPrefix", "/app")]), "from-route")]}),
        ),
    ]);
    assert_eq!(
        winner(&snap, req("one.example", "/app")),
        "HTTPRoute gw/old-route 0.0"
    );
    assert_eq!(
        winner(&snap, req("two.example", "/app")),
        "Ingress gw/old-ingress 0.0"
    );
    assert_eq!(
        winner(&snap, req("three.example", "/app")),
        "Ingress gw/exact-ingress 0.0"
    );
    assert_eq!(
        winner(&snap, req("three.example", "/app/x")),
        "HTTPRoute gw/prefix-route 0.0"
    );
}

// ---------------------------------------------------------------------------------
// Backends

#[test]
fn weights_drop_zero_and_all_zero_or_no_backends_answer_500() {
    let snap = build(&[
        open_gateway(),
        service("gw", "a"),
        service("gw", "b"),
        route(
            "gw",
            "w",
            json!({"hostnames": ["w.example"], "rules": [
                {"matches": [path("PathPrefix", "/split")], "backendRefs": [
                    {"name": "a", "port": 80, "weight": 90},
                    {"name": "b", "port": 80, "weight": 10},
                    {"name": "a", "port": 80, "weight": 0}]},
                {"matches": [path("PathPrefix", "/zero")], "backendRefs": [
                    {"name": "a", "port": 80, "weight": 0},
                    {"name": "b", "port": 80, "weight": 0}]},
                {"matches": [path("PathPrefix", "/none")]},
                {"matches": [path("PathPrefix", "/half")], "backendRefs": [
                    {"name": "a", "port": 80},
                    {"name": "missing", "port": 80}]},
            ]}),
        ),
    ]);
    let Action::Forward(b) = &route_of(&snap, req("w.example", "/split")).action else {
        panic!("forwards");
    };
    let weights: Vec<(String, u32)> = b
        .list
        .iter()
        .map(|wb| match wb.target {
            BackendTarget::Cluster(c) => (snap.cluster(c).service.name.clone(), wb.weight),
            BackendTarget::Invalid { .. } => ("invalid".into(), wb.weight),
        })
        .collect();
    assert_eq!(weights, [("a".to_string(), 90), ("b".to_string(), 10)]);
    assert_eq!(b.total_weight, 100);
    assert_eq!(
        answer(&snap, req("w.example", "/zero")),
        "500 invalid backend for gw/w"
    );
    assert_eq!(
        answer(&snap, req("w.example", "/none")),
        "500 invalid backend for gw/w"
    );
    // One valid and one invalid ref: half the traffic answers 500.
    let Action::Forward(b) = &route_of(&snap, req("w.example", "/half")).action else {
        panic!("forwards");
    };
    assert_eq!(b.list.len(), 2);
    assert!(matches!(b.list[1].target, BackendTarget::Invalid { .. }));
    let d = diags_of(&snap, "HTTPRoute", "gw", "w");
    assert!(
        d.iter()
            .any(|l| l.starts_with("spec.rules[1].backendRefs: every backendRef has weight 0")),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|l| l.starts_with("spec.rules[2].backendRefs: no backendRefs")),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|l| l.starts_with("spec.rules[3].backendRefs[1]: Service gw/missing not found")),
        "{d:?}"
    );
}

#[test]
fn resolved_refs_reasons() {
    let snap = build(&[
        open_gateway(),
        service("gw", "here"),
        service("other", "there"),
        route(
            "gw",
            "ok",
            json!({"hostnames": ["ok.example"], "rules": [rule(json!([path("PathPrefix", "/")]), "here")]}),
        ),
        route(
            "gw",
            "not-found",
            json!({"hostnames": ["nf.example"], "rules": [rule(json!([path("PathPrefix", "/")]), "gone")]}),
        ),
        route(
            "gw",
            "not-permitted",
            json!({"hostnames": ["np.example"], "rules": [{"backendRefs": [
                {"name": "there", "namespace": "other", "port": 80}]}]}),
        ),
        route(
            "gw",
            "bad-kind",
            json!({"hostnames": ["bk.example"], "rules": [{"backendRefs": [
                {"group": "example.com", "kind": "Bucket", "name": "b", "port": 80}]}]}),
        ),
        // A grant for another Service name does not permit this one.
        reference_grant("other", "only-else", "gw", Some("else")),
    ]);
    let refs = |name: &str| route_info(&snap, "gw", name).parents[0].resolved_refs;
    assert_eq!(refs("ok"), RefsReason::ResolvedRefs);
    assert_eq!(refs("not-found"), RefsReason::BackendNotFound);
    assert_eq!(refs("not-permitted"), RefsReason::RefNotPermitted);
    assert_eq!(refs("bad-kind"), RefsReason::InvalidKind);
    assert_eq!(answer(&snap, req("ok.example", "/")), "here");
    // The share of an invalid backendRef (here all of it) answers 500 on the data path.
    for (host, name, why) in [
        ("nf.example", "not-found", "Service gw/gone not found"),
        (
            "np.example",
            "not-permitted",
            "Service other/there is in another namespace and no ReferenceGrant there permits it",
        ),
        (
            "bk.example",
            "bad-kind",
            "example.com/Bucket is not a supported backend kind (Service)",
        ),
    ] {
        assert_eq!(answer(&snap, req(host, "/")), format!("invalid: {why}"));
        // Still attached: a bad reference does not stop a route from being accepted.
        assert_eq!(accepted(&snap, "gw", name), [AttachReason::Accepted]);
    }
    let message = &route_info(&snap, "gw", "not-permitted").parents[0].resolved_refs_message;
    assert!(message.contains("other/there"), "{message}");

    // With a grant for that name, or for every Service there, it resolves.
    for grant in [
        reference_grant("other", "g", "gw", Some("there")),
        reference_grant("other", "g", "gw", None),
    ] {
        let snap = build(&[
            open_gateway(),
            service("other", "there"),
            route(
                "gw",
                "not-permitted",
                json!({"hostnames": ["np.example"], "rules": [{"backendRefs": [
                    {"name": "there", "namespace": "other", "port": 80}]}]}),
            ),
            grant,
        ]);
        assert_eq!(answer(&snap, req("np.example", "/")), "there");
        assert_eq!(
            route_info(&snap, "gw", "not-permitted").parents[0].resolved_refs,
            RefsReason::ResolvedRefs
        );
    }
}

// ---------------------------------------------------------------------------------
// Attachment

#[test]
fn allowed_routes_namespaces_same_all_and_selector() {
    let same_only =
        json!({"name": "same", "port": 80, "protocol": "HTTP", "hostname": "same.example"});
    let selector = json!({"name": "sel", "port": 80, "protocol": "HTTP", "hostname": "sel.example",
        "allowedRoutes": {"namespaces": {"from": "Selector",
            "selector": {"matchLabels": {"team": "blue"}}}}});
    let by_name = json!({"name": "byname", "port": 80, "protocol": "HTTP", "hostname": "byname.example",
        "allowedRoutes": {"namespaces": {"from": "Selector",
            "selector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name",
                "operator": "In", "values": ["apps"]}]}}}});
    let to = |section: &str| json!([{"name": "gw", "namespace": "gw", "sectionName": section}]);
    let snap = build(&[
        gateway("gw", "gw", json!([same_only, selector, by_name])),
        namespace("blue-ns", json!({"team": "blue"})),
        namespace("red-ns", json!({"team": "red"})),
        service("gw", "s"),
        service("apps", "s"),
        service("blue-ns", "s"),
        service("red-ns", "s"),
        route(
            "gw",
            "same",
            json!({"parentRefs": to("same"), "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        route(
            "apps",
            "same",
            json!({"parentRefs": to("same"), "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        route(
            "blue-ns",
            "sel",
            json!({"parentRefs": to("sel"), "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        route(
            "red-ns",
            "sel",
            json!({"parentRefs": to("sel"), "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        // A namespace without a Namespace object still has its name label.
        route(
            "apps",
            "byname",
            json!({"parentRefs": to("byname"), "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        route(
            "red-ns",
            "byname",
            json!({"parentRefs": to("byname"), "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
    ]);
    assert_eq!(accepted(&snap, "gw", "same"), [AttachReason::Accepted]);
    assert_eq!(
        accepted(&snap, "apps", "same"),
        [AttachReason::NotAllowedByListeners]
    );
    assert_eq!(accepted(&snap, "blue-ns", "sel"), [AttachReason::Accepted]);
    assert_eq!(
        accepted(&snap, "red-ns", "sel"),
        [AttachReason::NotAllowedByListeners]
    );
    assert_eq!(accepted(&snap, "apps", "byname"), [AttachReason::Accepted]);
    assert_eq!(
        accepted(&snap, "red-ns", "byname"),
        [AttachReason::NotAllowedByListeners]
    );
    assert_eq!(
        winner(&snap, req("same.example", "/")),
        "HTTPRoute gw/same 0.0"
    );
    assert_eq!(
        winner(&snap, req("sel.example", "/")),
        "HTTPRoute blue-ns/sel 0.0"
    );
    assert_eq!(
        winner(&snap, req("byname.example", "/")),
        "HTTPRoute apps/byname 0.0"
    );
    assert_eq!(
        attached(&snap, "gw", "gw"),
        [
            ("same".to_string(), 1),
            ("sel".to_string(), 1),
            ("byname".to_string(), 1)
        ]
    );
    let d = diags_of(&snap, "HTTPRoute", "red-ns", "sel");
    assert!(
        d.iter().any(|l| l.starts_with(
            "spec.parentRefs[0]: not attached to Gateway gw/gw (NotAllowedByListeners)"
        )),
        "{d:?}"
    );
}

#[test]
fn no_matching_listener_hostname_and_no_matching_parent() {
    let snap = build(&[
        gateway(
            "gw",
            "gw",
            json!([
                http_listener("foo", Some("foo.example.com")),
                http_listener("wild", Some("*.bar.com"))
            ]),
        ),
        service("gw", "s"),
        route(
            "gw",
            "wrong-host",
            json!({"hostnames": ["not.example.org"], "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        route(
            "gw",
            "bare-domain",
            json!({"hostnames": ["bar.com"], "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        route(
            "gw",
            "no-section",
            json!({"parentRefs": [{"name": "gw", "sectionName": "nope"}],
                "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        route(
            "gw",
            "no-port",
            json!({"parentRefs": [{"name": "gw", "port": 81}],
                "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        route(
            "gw",
            "section-port-mismatch",
            json!({"parentRefs": [{"name": "gw", "sectionName": "foo", "port": 81}],
                "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        route(
            "gw",
            "by-port",
            json!({"hostnames": ["foo.example.com"], "parentRefs": [{"name": "gw", "port": 80}],
                "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
    ]);
    assert_eq!(
        accepted(&snap, "gw", "wrong-host"),
        [AttachReason::NoMatchingListenerHostname]
    );
    assert_eq!(
        accepted(&snap, "gw", "bare-domain"),
        [AttachReason::NoMatchingListenerHostname]
    );
    for name in ["no-section", "no-port", "section-port-mismatch"] {
        assert_eq!(
            accepted(&snap, "gw", name),
            [AttachReason::NoMatchingParent],
            "{name}"
        );
        assert!(route_info(&snap, "gw", name).hostnames.is_empty());
    }
    assert_eq!(accepted(&snap, "gw", "by-port"), [AttachReason::Accepted]);
    // Not attached serves nothing.
    assert_eq!(answer(&snap, req("not.example.org", "/")), "404");
    assert_eq!(answer(&snap, req("bar.com", "/")), "404");
    assert_eq!(
        winner(&snap, req("foo.example.com", "/")),
        "HTTPRoute gw/by-port 0.0"
    );
    // Counted where accepted only.
    assert_eq!(
        attached(&snap, "gw", "gw"),
        [("foo".to_string(), 1), ("wild".to_string(), 0)]
    );
}

#[test]
fn listener_kinds_and_protocols_decide_which_routes_attach() {
    let grpc_only = json!({"name": "grpc-only", "port": 80, "protocol": "HTTP", "hostname": "grpc.example",
        "allowedRoutes": {"kinds": [{"kind": "GRPCRoute"}], "namespaces": {"from": "All"}}});
    // An empty `kinds` is the protocol's default, as if unspecified.
    let empty_kinds = json!({"name": "empty-kinds", "port": 80, "protocol": "HTTP", "hostname": "empty.example",
        "allowedRoutes": {"kinds": [], "namespaces": {"from": "All"}}});
    let tcp = json!({"name": "tcp", "port": 9000, "protocol": "TCP"});
    let to = |section: &str| json!([{"name": "gw", "namespace": "gw", "sectionName": section}]);
    let snap = build(&[
        gateway("gw", "gw", json!([grpc_only, empty_kinds, tcp])),
        service("gw", "s"),
        route(
            "gw",
            "to-grpc-only",
            json!({"parentRefs": to("grpc-only"), "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        route(
            "gw",
            "to-empty-kinds",
            json!({"parentRefs": to("empty-kinds"), "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        route(
            "gw",
            "to-tcp",
            json!({"parentRefs": to("tcp"), "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
    ]);
    assert_eq!(
        accepted(&snap, "gw", "to-grpc-only"),
        [AttachReason::NotAllowedByListeners]
    );
    assert_eq!(
        accepted(&snap, "gw", "to-empty-kinds"),
        [AttachReason::Accepted]
    );
    assert_eq!(
        accepted(&snap, "gw", "to-tcp"),
        [AttachReason::NotAllowedByListeners]
    );
    assert_eq!(answer(&snap, req("grpc.example", "/")), "404");
    assert_eq!(answer(&snap, req("empty.example", "/")), "s");
    let g = gateway_info(&snap, "gw", "gw");
    // GRPCRoute is not served yet: ResolvedRefs false, InvalidRouteKinds.
    assert!(!g.listeners[0].resolved_refs);
    assert_eq!(g.listeners[0].reason, "InvalidRouteKinds");
    assert!(g.listeners[1].resolved_refs);
    assert_eq!(
        (g.listeners[2].accepted, g.listeners[2].reason.as_str()),
        (false, "UnsupportedProtocol")
    );
    assert_eq!(
        attached(&snap, "gw", "gw"),
        [
            ("grpc-only".to_string(), 0),
            ("empty-kinds".to_string(), 1),
            ("tcp".to_string(), 0)
        ]
    );
}

#[test]
fn listeners_not_programmed_serve_nothing_but_count_attached_routes() {
    let https = json!({"name": "https", "port": 443, "protocol": "HTTPS", "hostname": "tls.example",
        "allowedRoutes": {"namespaces": {"from": "All"}},
        "tls": {"mode": "Terminate", "certificateRefs": [{"name": "cert"}]}});
    let snap = build(&[
        gateway(
            "gw",
            "gw",
            json!([
                http_listener("http", Some("ok.example")),
                {"name": "other-port", "port": 8080, "protocol": "HTTP", "hostname": "port.example",
                 "allowedRoutes": {"namespaces": {"from": "All"}}},
                https,
            ]),
        ),
        service("gw", "s"),
        route(
            "gw",
            "all-listeners",
            json!({"rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
    ]);
    let g = gateway_info(&snap, "gw", "gw");
    let state: Vec<(bool, bool, &str, u32)> = g
        .listeners
        .iter()
        .map(|l| {
            (
                l.accepted,
                l.programmed,
                l.reason.as_str(),
                l.attached_routes,
            )
        })
        .collect();
    assert_eq!(
        state,
        [
            (true, true, "Accepted", 1),
            (false, false, "PortUnavailable", 1),
            (false, false, "UnsupportedProtocol", 1),
        ]
    );
    assert!(
        g.programmed,
        "a Gateway with one programmed listener is programmed"
    );
    assert_eq!(answer(&snap, req("ok.example", "/")), "s");
    assert_eq!(answer(&snap, req("port.example", "/")), "404");
    assert_eq!(answer(&snap, req("tls.example", "/")), "404");
    assert_eq!(
        route_info(&snap, "gw", "all-listeners").hostnames,
        ["ok.example"]
    );
    assert!(
        diags_of(&snap, "Gateway", "gw", "gw").iter().any(|l| l
            .starts_with("spec.listeners[1]: listener other-port is not programmed: port 8080")),
        "{:?}",
        snap.diagnostics
    );

    // Another --gateway-http-port serves the 8080 listener instead.
    let snap = build_with(
        &[
            gateway(
                "gw",
                "gw",
                json!([http_listener("http", Some("ok.example")),
                    {"name": "other-port", "port": 8080, "protocol": "HTTP", "hostname": "port.example",
                     "allowedRoutes": {"namespaces": {"from": "All"}}}]),
            ),
            service("gw", "s"),
            route(
                "gw",
                "r",
                json!({"rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
            ),
        ],
        &Options {
            gateway_http_port: 8080,
            ..file_options()
        },
    );
    assert_eq!(answer(&snap, req("ok.example", "/")), "404");
    assert_eq!(answer(&snap, req("port.example", "/")), "s");
}

#[test]
fn conflicted_listeners_are_all_left_unprogrammed() {
    let snap = build(&[
        gateway(
            "gw",
            "gw",
            json!([
                http_listener("first", Some("dup.example")),
                http_listener("second", Some("dup.example")),
                http_listener("distinct", Some("fine.example")),
                {"name": "tls-on-80", "port": 80, "protocol": "HTTPS", "hostname": "tls.example",
                 "tls": {"certificateRefs": [{"name": "c"}]}},
            ]),
        ),
        service("gw", "s"),
        route(
            "gw",
            "r",
            json!({"rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
    ]);
    let g = gateway_info(&snap, "gw", "gw");
    let state: Vec<(&str, bool, bool, &str)> = g
        .listeners
        .iter()
        .map(|l| {
            (
                l.name.as_str(),
                l.conflicted,
                l.programmed,
                l.reason.as_str(),
            )
        })
        .collect();
    // No conflicting listener wins; HTTP and HTTPS on one port conflict by protocol,
    // so even the HTTP listener with a hostname of its own is not programmed.
    assert_eq!(
        state,
        [
            ("first", true, false, "HostnameConflict"),
            ("second", true, false, "HostnameConflict"),
            ("distinct", true, false, "ProtocolConflict"),
            ("tls-on-80", true, false, "UnsupportedProtocol"),
        ]
    );
    assert_eq!(answer(&snap, req("fine.example", "/")), "404");

    let snap = build(&[
        gateway(
            "gw",
            "gw",
            json!([
                http_listener("first", Some("dup.example")),
                http_listener("second", Some("dup.example")),
                http_listener("distinct", Some("fine.example")),
            ]),
        ),
        service("gw", "s"),
        route(
            "gw",
            "r",
            json!({"rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
    ]);
    let g = gateway_info(&snap, "gw", "gw");
    let state: Vec<(&str, bool, bool, &str)> = g
        .listeners
        .iter()
        .map(|l| {
            (
                l.name.as_str(),
                l.conflicted,
                l.programmed,
                l.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        state,
        [
            ("first", true, false, "HostnameConflict"),
            ("second", true, false, "HostnameConflict"),
            ("distinct", false, true, "Accepted"),
        ]
    );
    assert_eq!(answer(&snap, req("dup.example", "/")), "404");
    assert_eq!(answer(&snap, req("fine.example", "/")), "s");
}

#[test]
fn a_route_counts_once_per_listener_however_many_parent_refs_select_it() {
    let snap = build(&[
        open_gateway(),
        service("gw", "s"),
        route(
            "gw",
            "twice",
            json!({"parentRefs": [
                {"name": "gw", "namespace": "gw"},
                {"name": "gw", "namespace": "gw", "sectionName": "http"},
                {"name": "gw", "namespace": "gw", "port": 80}],
                "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
        route(
            "gw",
            "once",
            json!({"rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
    ]);
    assert_eq!(accepted(&snap, "gw", "twice"), [AttachReason::Accepted; 3]);
    assert_eq!(attached(&snap, "gw", "gw"), [("http".to_string(), 2)]);
}

#[test]
fn gateway_classes_of_other_controllers_and_the_assumed_class() {
    let class = |name: &str, controller: &str| {
        json!({"apiVersion": GW_API, "kind": "GatewayClass", "metadata": {"name": name},
            "spec": {"controllerName": controller}})
    };
    let other_gw = |class: &str| {
        json!({"apiVersion": GW_API, "kind": "Gateway", "metadata": {"namespace": "gw", "name": "theirs"},
            "spec": {"gatewayClassName": class, "listeners": [http_listener("http", None)]}})
    };
    let their_route = route(
        "gw",
        "their-route",
        json!({"hostnames": ["theirs.example"], "parentRefs": [{"name": "theirs"}],
            "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
    );
    let our_route = route(
        "gw",
        "our-route",
        json!({"hostnames": ["ours.example"], "rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
    );

    // No GatewayClass of ours in the files: `portcullis` is assumed; another
    // controller's class and everything on it are ignored.
    let snap = build(&[
        class("envoy", "gateway.envoyproxy.io/gatewayclass-controller"),
        other_gw("envoy"),
        open_gateway(),
        service("gw", "s"),
        their_route.clone(),
        our_route.clone(),
    ]);
    assert_eq!(snap.gateway.classes, [("portcullis".to_string(), true)]);
    let gws: Vec<&str> = snap
        .gateway
        .gateways
        .iter()
        .map(|g| g.object.name.as_str())
        .collect();
    assert_eq!(gws, ["gw"]);
    assert_eq!(answer(&snap, req("ours.example", "/")), "s");
    assert_eq!(answer(&snap, req("theirs.example", "/")), "404");
    assert!(
        snap.gateway
            .routes
            .iter()
            .all(|r| r.object.name != "their-route"),
        "a route on another controller's Gateway gets no status from us"
    );

    // A class named `portcullis` of another controller: nothing is assumed or served.
    let snap = build(&[
        class("portcullis", "example.com/other"),
        open_gateway(),
        service("gw", "s"),
        our_route.clone(),
    ]);
    assert!(snap.gateway.gateways.is_empty(), "{:?}", snap.gateway);
    assert_eq!(answer(&snap, req("ours.example", "/")), "404");

    // Our own class under another name: its Gateways are ours, `portcullis` is not.
    let snap = build(&[
        class("mine", "portcullis.io/gateway-controller"),
        other_gw("mine"),
        open_gateway(),
        service("gw", "s"),
        their_route,
        our_route,
    ]);
    assert_eq!(snap.gateway.classes, [("mine".to_string(), true)]);
    assert_eq!(answer(&snap, req("theirs.example", "/")), "s");
    assert_eq!(answer(&snap, req("ours.example", "/")), "404");

    // In Kubernetes mode nothing is assumed.
    let snap = build_with(
        &[open_gateway(), service("gw", "s")],
        &Options {
            assume_class: false,
            ..file_options()
        },
    );
    assert!(snap.gateway.classes.is_empty());
    assert!(snap.gateway.gateways.is_empty());
}

#[test]
fn diagnostics_of_a_valid_setup_are_empty_but_for_endpoints() {
    // Services without EndpointSlices are warnings; nothing else is said about a
    // valid Gateway and route.
    let snap = build(&[
        open_gateway(),
        service("gw", "s"),
        route(
            "gw",
            "r",
            json!({"rules": [{"backendRefs": [{"name": "s", "port": 80}]}]}),
        ),
    ]);
    let unexpected: Vec<_> = snap
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error || !d.reason.contains("endpoints"))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
}

// ---------------------------------------------------------------------------------
// End to end: a real proxy and echo upstreams

/// Echo upstreams by name, and the manifests of their Services.
async fn echoes(ns: &str, names: &[&str]) -> (Vec<Echo>, Vec<Value>) {
    let mut all = Vec::new();
    let mut docs = Vec::new();
    for n in names {
        let e = start_echo(n).await;
        docs.extend(backend(ns, n, e.addr));
        all.push(e);
    }
    (all, docs)
}

/// Sends a request; its status, headers and body.
async fn send(r: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, String) {
    let resp = r.send().await.expect("request reaches the proxy");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await.expect("body");
    (status, headers, body)
}

fn echo_of(body: &str) -> EchoSeen {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("echo JSON ({e}): {body}"))
}

#[tokio::test]
async fn matches_end_to_end() {
    let (_echoes, mut docs) = echoes(
        "gw",
        &["exact", "prefix", "regex", "header", "query", "post"],
    )
    .await;
    docs.push(open_gateway());
    docs.push(route(
        "gw",
        "m",
        json!({"hostnames": ["m.example"], "rules": [
            rule(json!([path("Exact", "/e")]), "exact"),
            rule(json!([path("PathPrefix", "/p")]), "prefix"),
            rule(json!([path("RegularExpression", "/r/[a-z]+")]), "regex"),
            rule(json!([{"path": {"type": "PathPrefix", "value": "/p"},
                "headers": [{"name": "X-Pick", "value": "me"}]}]), "header"),
            rule(json!([{"path": {"type": "PathPrefix", "value": "/p"},
                "queryParams": [{"name": "pick", "value": "me"}]}]), "query"),
            rule(json!([{"path": {"type": "PathPrefix", "value": "/p"}, "method": "POST"}]), "post"),
        ]}),
    ));
    let proxy = start_proxy(build(&docs)).await;
    let c = client();
    let get = |p: &str| c.get(proxy.url(p)).header("host", "m.example");
    let cases: Vec<(reqwest::RequestBuilder, &str)> = vec![
        (get("/e"), "exact"),
        (get("/e/"), "404"),
        (get("/p/x"), "prefix"),
        (get("/px"), "404"),
        (get("/r/abc"), "regex"),
        (get("/r/abc/d"), "404"),
        (get("/p").header("x-pick", "me"), "header"),
        (get("/p?pick=me"), "query"),
        (c.post(proxy.url("/p")).header("host", "m.example"), "post"),
    ];
    for (i, (r, want)) in cases.into_iter().enumerate() {
        let (status, _, body) = send(r).await;
        let got = if status == 200 {
            echo_of(&body).name
        } else {
            status.to_string()
        };
        assert_eq!(got, want, "case {i}: {body}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn header_modifiers_and_url_rewrite_end_to_end() {
    let (_echoes, mut docs) = echoes("gw", &["app"]).await;
    docs.push(open_gateway());
    docs.push(route(
        "gw",
        "mod",
        json!({"hostnames": ["h.example"], "rules": [
            {"matches": [path("PathPrefix", "/headers")],
             "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "X-Set", "value": "set-value"}],
                    "add": [{"name": "X-Add", "value": "added"}],
                    "remove": ["X-Remove"]}},
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                    "set": [{"name": "X-Resp-Set", "value": "r"}]}}],
             "backendRefs": [{"name": "app", "port": 80}]},
            {"matches": [path("PathPrefix", "/prefix/one")],
             "filters": [{"type": "URLRewrite", "urlRewrite": {
                "hostname": "rewritten.example",
                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/one"}}}],
             "backendRefs": [{"name": "app", "port": 80}]},
        ]}),
    ));
    let proxy = start_proxy(build(&docs)).await;
    let (status, headers, body) = send(
        client()
            .get(proxy.url("/headers"))
            .header("host", "h.example")
            .header("x-set", "original")
            .header("x-add", "first")
            .header("x-remove", "gone"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen = echo_of(&body);
    assert_eq!(seen.header("x-set"), Some("set-value"));
    assert_eq!(
        seen.headers.get("x-add"),
        Some(&json!(["first", "added"])),
        "add appends: {:?}",
        seen.headers
    );
    assert!(seen.headers.get("x-remove").is_none(), "{:?}", seen.headers);
    assert_eq!(
        headers.get("x-resp-set").and_then(|v| v.to_str().ok()),
        Some("r")
    );

    let seen = echo_of(
        &send(
            client()
                .get(proxy.url("/prefix/one/two?q=1"))
                .header("host", "h.example"),
        )
        .await
        .2,
    );
    assert_eq!(seen.path, "/one/two");
    assert_eq!(seen.uri, "/one/two?q=1");
    assert_eq!(seen.host, "rewritten.example");
    proxy.shutdown().await;
}

#[tokio::test]
async fn redirect_location_end_to_end() {
    let mut docs = vec![open_gateway()];
    docs.push(route(
        "gw",
        "rd",
        json!({"hostnames": ["r.example"], "rules": [
            {"matches": [path("PathPrefix", "/original-prefix")],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {
                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/replacement-prefix"}}}]},
            {"matches": [path("PathPrefix", "/scheme")],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {
                "scheme": "https", "hostname": "secure.example", "statusCode": 301}}]},
            {"matches": [path("PathPrefix", "/port")],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {
                "port": 8080, "path": {"type": "ReplaceFullPath", "replaceFullPath": "/full"}}}]},
        ]}),
    ));
    let proxy = start_proxy(build(&docs)).await;
    let c = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let cases = [
        (
            "/original-prefix/lemon?x=1",
            302,
            "http://r.example/replacement-prefix/lemon?x=1",
        ),
        ("/scheme/a", 301, "https://secure.example/scheme/a"),
        ("/port/a", 302, "http://r.example:8080/full"),
    ];
    for (p, status, location) in cases {
        let (got, headers, _) = send(c.get(proxy.url(p)).header("host", "r.example")).await;
        assert_eq!(got, status, "{p}");
        assert_eq!(
            headers.get("location").and_then(|v| v.to_str().ok()),
            Some(location),
            "{p}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn weighted_backends_split_traffic_by_weight() {
    const N: usize = 2_000;
    let (_echoes, mut docs) = echoes("gw", &["ninety", "ten", "never"]).await;
    docs.push(open_gateway());
    docs.push(route(
        "gw",
        "split",
        json!({"hostnames": ["split.example"], "rules": [
            {"matches": [path("PathPrefix", "/")], "backendRefs": [
                {"name": "ninety", "port": 80, "weight": 90},
                {"name": "ten", "port": 80, "weight": 10},
                {"name": "never", "port": 80, "weight": 0}]},
            {"matches": [path("PathPrefix", "/zero")], "backendRefs": [
                {"name": "ninety", "port": 80, "weight": 0},
                {"name": "never", "port": 80, "weight": 0}]},
        ]}),
    ));
    let proxy = start_proxy(build(&docs)).await;
    let c = client();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..N {
        let (status, _, body) = send(c.get(proxy.url("/")).header("host", "split.example")).await;
        assert_eq!(status, 200, "{body}");
        *counts.entry(echo_of(&body).name).or_default() += 1;
    }
    // Binomial(2000, 0.1): mean 200, standard deviation 13.4. Six deviations either
    // side fail a correct split about once in 10^9 runs; a 50/50 or 100/0 split
    // always.
    let ten = counts.get("ten").copied().unwrap_or(0);
    assert!((120..=280).contains(&ten), "{counts:?}");
    assert_eq!(
        counts.get("ninety").copied().unwrap_or(0) + ten,
        N,
        "{counts:?}"
    );
    assert!(
        !counts.contains_key("never"),
        "weight 0 was chosen: {counts:?}"
    );

    let (status, _, body) = send(c.get(proxy.url("/zero")).header("host", "split.example")).await;
    assert_eq!((status, body.trim()), (500, "invalid backend for gw/split"));
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------
// The real binary on a folder of manifests

/// Polls `GET path` on `host` until `done` holds for (status, body), for at most
/// [`EVENTUALLY`]; the last answer.
async fn poll(
    bin: &Binary,
    host: &str,
    path: &str,
    done: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    let c = client();
    loop {
        let (status, body) = match c
            .get(format!("http://{}{}", bin.http, path))
            .header("host", host)
            .send()
            .await
        {
            Ok(r) => {
                let s = r.status().as_u16();
                (s, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, e.to_string()),
        };
        if done(status, &body) || tokio::time::Instant::now() >= deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_grant_added_and_removed_at_run_time() {
    let echo = start_echo("cross").await;
    let mut docs = vec![open_gateway()];
    docs.extend(backend("backend", "cross", echo.addr));
    docs.push(route(
        "apps",
        "web",
        json!({"hostnames": ["grant.example"], "rules": [{"backendRefs": [
            {"name": "cross", "namespace": "backend", "port": 80}]}]}),
    ));
    let dir = manifest_dir(&yaml(&docs));
    let bin = Binary::start(dir.path(), &[]);
    bin.wait_ready(200).await;

    let denied = |s: u16, b: &str| s == 500 && b.trim() == "invalid backend for apps/web";
    let (status, body) = poll(&bin, "grant.example", "/", denied).await;
    assert!(denied(status, &body), "without a grant: {status} {body}");

    // The grant, in its own file: the watched folder picks it up.
    let grant = dir.path().join("grant.yaml");
    std::fs::write(
        &grant,
        yaml(&[reference_grant("backend", "allow-apps", "apps", None)]),
    )
    .expect("write grant");
    let served = |s: u16, b: &str| {
        s == 200 && serde_json::from_str::<EchoSeen>(b).is_ok_and(|e| e.name == "cross")
    };
    let (status, body) = poll(&bin, "grant.example", "/", served).await;
    assert!(served(status, &body), "with a grant: {status} {body}");

    std::fs::remove_file(&grant).expect("remove grant");
    let (status, body) = poll(&bin, "grant.example", "/", denied).await;
    assert!(denied(status, &body), "grant removed: {status} {body}");
}

// ---------------------------------------------------------------------------------
// Values a filter may not carry

#[test]
fn filters_that_would_reframe_messages_or_escape_their_fields_answer_500() {
    let snap = build(&[
        open_gateway(),
        service("gw", "app"),
        route(
            "gw",
            "bad",
            json!({"hostnames": ["b.example"], "rules": [
                {"matches": [path("PathPrefix", "/framing")],
                 "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                    "set": [{"name": "Content-Length", "value": "0"}]}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
                {"matches": [path("PathPrefix", "/host")],
                 "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "remove": ["Host"]}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
                {"matches": [path("PathPrefix", "/query")],
                 "filters": [{"type": "URLRewrite", "urlRewrite": {
                    "path": {"type": "ReplaceFullPath", "replaceFullPath": "/a?admin=1"}}}],
                 "backendRefs": [{"name": "app", "port": 80}]},
                {"matches": [path("PathPrefix", "/elsewhere")],
                 "filters": [{"type": "RequestRedirect", "requestRedirect": {
                    "hostname": "evil.example/x"}}]},
                {"matches": [path("Exact", "/exact")],
                 "backendRefs": [{"name": "app", "port": 80, "filters": [
                    {"type": "URLRewrite", "urlRewrite": {
                        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/bar"}}}]}]},
                rule(json!([path("PathPrefix", "/fine")]), "app"),
            ]}),
        ),
    ]);
    for p in ["/framing", "/host", "/query", "/elsewhere"] {
        assert_eq!(
            answer(&snap, req("b.example", p)),
            "500 invalid backend for gw/bad",
            "{p}"
        );
    }
    // A backendRef's ReplacePrefixMatch beside an Exact match is not served, like the
    // rule's own.
    assert!(decide(&snap, &req("b.example", "/exact")).is_none());
    assert_eq!(
        accepted(&snap, "gw", "bad"),
        vec![AttachReason::UnsupportedValue]
    );
    assert_eq!(answer(&snap, req("b.example", "/fine")), "app");
    let d = diags_of(&snap, "HTTPRoute", "gw", "bad");
    for (field, says) in [
        (
            "spec.rules[0].filters[0]",
            "content-length frames the message",
        ),
        ("spec.rules[1].filters[0]", "host frames the message"),
        ("spec.rules[2].filters[0]", "must not contain `?`"),
        ("spec.rules[3].filters[0]", "hostname"),
    ] {
        assert!(
            d.iter().any(|l| l.starts_with(field) && l.contains(says)),
            "{field} {says}: {d:?}"
        );
    }
}
