//! The Gateway API data path in process: header modifiers, URL rewrites, redirects,
//! weighted and invalid backends, own answers, method/header/query conditions, request
//! mirrors and route timeouts. Snapshots are built by hand from the route model (what
//! HTTPRoute translation emits), served by a real proxy on 127.0.0.1:0 to real
//! in-process upstreams and a real client.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use http_body_util::BodyExt;
use portcullis::model::{
    Action, BackendTarget, Backends, Cluster, ClusterId, Conditions, Endpoint, Filters,
    HeaderCondition, HeaderModifier, HostPattern, Mirror, ObjectRef, PathModifier, PathRule,
    PathType, PortRef, QueryCondition, Redirect, Route, RouteKind, RouteSource, RouteTable,
    Snapshot, Timeouts, Upstream, UrlRewrite, ValueMatch, WeightedBackend,
};
use portcullis::proxy::ProxyConfig;
use support::data_path::{start_hyper, text_body};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const NS: &str = "gw";

// ---------------------------------------------------------------------------------
// Snapshots from the route model

/// A cluster `NS/name` port 80 whose ready endpoints are `addrs`.
fn cluster(name: &str, addrs: &[SocketAddr]) -> Arc<Cluster> {
    Arc::new(Cluster {
        service: ObjectRef::new(NS, name),
        port: PortRef::Number(80),
        service_port: Some(80),
        app_protocol: None,
        upstream: Upstream::Endpoints {
            all: addrs
                .iter()
                .map(|&address| Endpoint {
                    address,
                    ready: true,
                    serving: true,
                    terminating: false,
                })
                .collect(),
            active: addrs.to_vec(),
        },
    })
}

/// Routes and clusters on their way into a snapshot.
#[derive(Default)]
struct Table {
    routes: Vec<Route>,
    clusters: Vec<Arc<Cluster>>,
}

impl Table {
    /// Adds the cluster `NS/name` with `addrs` as endpoints.
    fn cluster(&mut self, name: &str, addrs: &[SocketAddr]) -> ClusterId {
        self.clusters.push(cluster(name, addrs));
        (self.clusters.len() - 1) as ClusterId
    }

    /// Adds a `PathPrefix` rule of the HTTPRoute `NS/name` for `host`, forwarding to
    /// `to`; later routes are younger.
    fn route(&mut self, name: &str, host: &str, prefix: &str, to: ClusterId) -> &mut Route {
        let order = self.routes.len() as u32;
        let mut route = Route::forward(
            HostPattern::Exact(host.to_string()),
            PathRule::new(prefix, PathType::Prefix).expect("valid prefix"),
            RouteSource {
                kind: RouteKind::HttpRoute,
                object: ObjectRef::new(NS, name),
                rule: 0,
                match_index: order as usize,
            },
            to,
        );
        route.order = order;
        self.routes.push(route);
        self.routes.last_mut().expect("just added")
    }

    fn snapshot(self) -> Snapshot {
        let (table, failed) = RouteTable::build(self.routes);
        assert!(failed.is_empty(), "routes refused: {failed:?}");
        Snapshot {
            routes: Arc::new(table),
            clusters: self.clusters,
            ..Default::default()
        }
    }
}

fn name(s: &str) -> HeaderName {
    HeaderName::from_bytes(s.as_bytes()).expect("header name")
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("header value")
}

fn modifier(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderModifier {
    HeaderModifier {
        set: set.iter().map(|(n, v)| (name(n), value(v))).collect(),
        add: add.iter().map(|(n, v)| (name(n), value(v))).collect(),
        remove: remove.iter().map(|n| name(n)).collect(),
    }
}

fn filters(f: Filters) -> Option<Arc<Filters>> {
    Some(Arc::new(f))
}

/// Backends with these targets and weights, each without filters of its own.
fn weighted(list: &[(BackendTarget, u32)]) -> Action {
    Action::Forward(
        Backends::weighted(
            list.iter()
                .map(|(target, weight)| WeightedBackend {
                    target: target.clone(),
                    weight: *weight,
                    filters: None,
                })
                .collect(),
        )
        .expect("a positive weight"),
    )
}

fn invalid() -> BackendTarget {
    BackendTarget::Invalid {
        reason: "Service gw/missing not found".into(),
    }
}

// ---------------------------------------------------------------------------------
// Clients and upstreams

/// A client that neither uses a proxy nor follows redirects.
fn raw_client() -> reqwest::Client {
    portcullis::tls::install_default_provider();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("build reqwest client")
}

/// Sends `method` `path` with `Host: host` and `headers`; status, headers and body.
async fn send(
    proxy: &TestProxy,
    method: Method,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Bytes>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = raw_client()
        .request(method, proxy.url(path))
        .header("host", host);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await.expect("request reaches the proxy");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await.expect("read body");
    (status, headers, body)
}

/// What an echo upstream saw, for a request that must be answered by one.
async fn echo_of(
    proxy: &TestProxy,
    method: Method,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> EchoSeen {
    let (status, _, body) = send(proxy, method, host, path, headers, None).await;
    assert_eq!(status, 200, "body: {body}");
    serde_json::from_str(&body).expect("echo JSON")
}

/// A request as a mirror upstream received it, body read to its end.
#[derive(Debug)]
struct Received {
    method: Method,
    uri: String,
    headers: HeaderMap,
    body: Result<Bytes, String>,
}

/// An upstream that answers `200 mirror` and reports every request it read in full.
async fn start_recorder() -> (SocketAddr, mpsc::UnboundedReceiver<Received>, Stopper) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (addr, stop) = start_hyper(move |req: http::Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| e.to_string());
            let _ = tx.send(Received {
                method: parts.method,
                uri: parts.uri.to_string(),
                headers: parts.headers,
                body,
            });
            http::Response::new(text_body("mirror"))
        }
    })
    .await;
    (addr, rx, stop)
}

fn mirror_dropped(proxy: &TestProxy, service: &str, reason: &str) -> u64 {
    proxy
        .metrics
        .mirror_dropped_total
        .with_label_values(&[NS, service, reason])
        .get()
}

/// Polls `check` every 10 ms until it holds or [`EVENTUALLY`] passes; whether it held.
/// For effects that have no signal of their own, such as a counter a background task
/// increments.
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while !check() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

// ---------------------------------------------------------------------------------
// Header modifiers and rewrites

#[tokio::test]
async fn request_header_modifiers_apply_route_level_then_backend_level() {
    let echo = start_echo("web").await;
    let mut t = Table::default();
    let web = t.cluster("web", &[echo.addr]);
    let route = t.route("web", "a.example", "/", web);
    route.filters = filters(Filters {
        request_headers: Some(modifier(
            &[
                ("x-both", "route"),
                ("x-route-set", "1"),
                ("x-client", "route"),
            ],
            &[("x-add", "route")],
            &[("x-drop")],
        )),
        ..Default::default()
    });
    route.action = Action::Forward(Backends {
        list: Box::new([WeightedBackend {
            target: BackendTarget::Cluster(web),
            weight: 1,
            filters: filters(Filters {
                request_headers: Some(modifier(
                    &[("x-both", "backend")],
                    &[("x-add", "backend")],
                    &["x-route-set"],
                )),
                ..Default::default()
            }),
        }]),
        total_weight: 1,
    });
    let proxy = start_proxy(t.snapshot()).await;

    let seen = echo_of(
        &proxy,
        Method::GET,
        "a.example",
        "/",
        &[
            ("x-client", "client"),
            ("x-add", "client"),
            ("x-drop", "1"),
            ("x-keep", "1"),
        ],
    )
    .await;
    assert_eq!(
        seen.header("x-both"),
        Some("backend"),
        "the backend's set wins"
    );
    assert_eq!(
        seen.header("x-client"),
        Some("route"),
        "set replaces the client's"
    );
    assert_eq!(
        seen.headers.get("x-add"),
        Some(&serde_json::json!(["client", "route", "backend"])),
        "add appends, route first"
    );
    assert_eq!(
        seen.header("x-route-set"),
        None,
        "the backend removes what the route set"
    );
    assert_eq!(seen.header("x-drop"), None);
    assert_eq!(seen.header("x-keep"), Some("1"));
}

#[tokio::test]
async fn response_header_modifiers_apply_route_level_then_backend_level() {
    let (upstream, _stop) = start_hyper(|_req| async {
        let mut resp = http::Response::new(text_body("ok"));
        resp.headers_mut().insert("x-upstream", value("1"));
        resp.headers_mut().insert("x-keep", value("1"));
        resp.headers_mut().insert("x-both", value("upstream"));
        resp
    })
    .await;
    let mut t = Table::default();
    let web = t.cluster("web", &[upstream]);
    let route = t.route("web", "a.example", "/", web);
    route.filters = filters(Filters {
        response_headers: Some(modifier(
            &[("x-both", "route"), ("x-route", "1")],
            &[("x-add", "route")],
            &["x-upstream"],
        )),
        ..Default::default()
    });
    route.action = Action::Forward(Backends {
        list: Box::new([WeightedBackend {
            target: BackendTarget::Cluster(web),
            weight: 1,
            filters: filters(Filters {
                response_headers: Some(modifier(
                    &[("x-both", "backend")],
                    &[("x-add", "backend")],
                    &["x-route"],
                )),
                ..Default::default()
            }),
        }]),
        total_weight: 1,
    });
    let proxy = start_proxy(t.snapshot()).await;

    let (status, headers, body) = send(&proxy, Method::GET, "a.example", "/", &[], None).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(
        headers.get("x-both").map(|v| v.as_bytes()),
        Some(&b"backend"[..])
    );
    let added: Vec<&[u8]> = headers
        .get_all("x-add")
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    assert_eq!(added, vec![&b"route"[..], &b"backend"[..]]);
    assert!(headers.get("x-upstream").is_none());
    assert!(
        headers.get("x-route").is_none(),
        "the backend removes what the route set"
    );
    assert_eq!(headers.get("x-keep").map(|v| v.as_bytes()), Some(&b"1"[..]));
}

#[tokio::test]
async fn url_rewrite_sets_the_host_and_replaces_the_path_keeping_the_query() {
    let echo = start_echo("web").await;
    let mut t = Table::default();
    let web = t.cluster("web", &[echo.addr]);
    let rewrite = |hostname: Option<&str>, path: Option<PathModifier>| {
        filters(Filters {
            rewrite: Some(UrlRewrite {
                hostname: hostname.map(value),
                path,
            }),
            ..Default::default()
        })
    };
    t.route("host", "host.example", "/", web).filters = rewrite(Some("internal.example"), None);
    t.route("full", "full.example", "/any", web).filters = rewrite(
        None,
        Some(PathModifier::ReplaceFullPath("/replaced".into())),
    );
    // (host, route prefix, replacement)
    let prefixes = [
        ("p1.example", "/old", "/new"),
        ("p2.example", "/old/", "/new"),
        ("p3.example", "/", "/new"),
        ("p4.example", "/old", "/"),
        ("p5.example", "/old", "/new/"),
    ];
    for (host, prefix, replacement) in prefixes {
        t.route(host, host, prefix, web).filters = rewrite(
            None,
            Some(PathModifier::ReplacePrefixMatch(replacement.into())),
        );
    }
    let proxy = start_proxy(t.snapshot()).await;

    let seen = echo_of(&proxy, Method::GET, "host.example", "/x?q=1", &[]).await;
    assert_eq!(seen.host, "internal.example");
    assert_eq!(seen.uri, "/x?q=1");
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some("host.example"),
        "X-Forwarded-Host keeps the host the client asked for"
    );

    let seen = echo_of(&proxy, Method::GET, "full.example", "/any/x?a=1&b=2", &[]).await;
    assert_eq!(seen.uri, "/replaced?a=1&b=2");
    assert_eq!(seen.host, "full.example");

    // (host, request target, what the upstream sees)
    let cases = [
        ("p1.example", "/old/x", "/new/x"),
        ("p1.example", "/old", "/new"),
        ("p1.example", "/old/", "/new/"),
        ("p1.example", "/old/x/y?q=1&r", "/new/x/y?q=1&r"),
        ("p2.example", "/old/x", "/new/x"),
        ("p3.example", "/x", "/new/x"),
        ("p3.example", "/x/y?q=1", "/new/x/y?q=1"),
        ("p4.example", "/old/x", "/x"),
        ("p4.example", "/old", "/"),
        ("p4.example", "/old?q=1", "/?q=1"),
        ("p5.example", "/old/x", "/new/x"),
        ("p5.example", "/old", "/new"),
    ];
    for (host, target, want) in cases {
        let seen = echo_of(&proxy, Method::GET, host, target, &[]).await;
        assert_eq!(seen.uri, want, "{host} {target}");
    }
}

// ---------------------------------------------------------------------------------
// Redirects

#[tokio::test]
async fn redirects_combine_scheme_host_port_path_and_status_as_the_spec_says() {
    struct Case {
        scheme: Option<&'static str>,
        hostname: Option<&'static str>,
        port: Option<u16>,
        path: Option<PathModifier>,
        status: u16,
        listener_port: Option<u16>,
        /// The `Host` the client sends and its request target.
        host: &'static str,
        target: &'static str,
        location: &'static str,
    }
    let case = |scheme, hostname, port, status, listener_port, location| Case {
        scheme,
        hostname,
        port,
        path: None,
        status,
        listener_port,
        host: "a.example",
        target: "/app/x?q=1",
        location,
    };
    let cases = vec![
        // A scheme without a port: its well-known port, left out.
        case(
            Some("https"),
            None,
            None,
            301,
            Some(8080),
            "https://a.example/app/x?q=1",
        ),
        case(
            Some("http"),
            None,
            None,
            302,
            Some(8443),
            "http://a.example/app/x?q=1",
        ),
        // Neither scheme nor port: the listener's port, left out only when well known
        // for the request's own scheme (http here).
        case(
            None,
            None,
            None,
            302,
            Some(8080),
            "http://a.example:8080/app/x?q=1",
        ),
        case(
            None,
            None,
            None,
            302,
            Some(80),
            "http://a.example/app/x?q=1",
        ),
        case(
            None,
            None,
            None,
            302,
            Some(443),
            "http://a.example:443/app/x?q=1",
        ),
        case(None, None, None, 302, None, "http://a.example/app/x?q=1"),
        // A port is kept unless it is the scheme's own.
        case(
            Some("https"),
            None,
            Some(443),
            301,
            Some(80),
            "https://a.example/app/x?q=1",
        ),
        case(
            Some("https"),
            None,
            Some(80),
            301,
            Some(80),
            "https://a.example:80/app/x?q=1",
        ),
        case(
            Some("https"),
            Some("b.example"),
            Some(8443),
            307,
            Some(80),
            "https://b.example:8443/app/x?q=1",
        ),
        case(
            None,
            None,
            Some(80),
            308,
            Some(8080),
            "http://a.example/app/x?q=1",
        ),
        case(
            None,
            Some("b.example"),
            Some(9090),
            303,
            Some(80),
            "http://b.example:9090/app/x?q=1",
        ),
        case(
            Some("http"),
            Some("b.example"),
            None,
            301,
            Some(8080),
            "http://b.example/app/x?q=1",
        ),
        Case {
            path: Some(PathModifier::ReplaceFullPath("/new".into())),
            ..case(None, None, None, 303, Some(80), "http://a.example/new?q=1")
        },
        Case {
            path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
            ..case(
                Some("https"),
                None,
                None,
                307,
                Some(80),
                "https://a.example/v2/x?q=1",
            )
        },
        Case {
            path: Some(PathModifier::ReplacePrefixMatch("/".into())),
            ..case(None, None, None, 308, Some(80), "http://a.example/x?q=1")
        },
        // The port the client named is not the listener's: it is dropped.
        Case {
            host: "A.Example:8080",
            ..case(
                None,
                None,
                None,
                302,
                Some(80),
                "http://a.example/app/x?q=1",
            )
        },
        Case {
            target: "/app",
            path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
            ..case(None, None, None, 302, Some(80), "http://a.example/v2")
        },
    ];
    let echo = start_echo("web").await;
    let mut t = Table::default();
    let web = t.cluster("web", &[echo.addr]);
    // One route per case, told apart by a header condition.
    for (i, c) in cases.iter().enumerate() {
        let route = t.route("redirect", "a.example", "/app", web);
        route.conditions = Some(Box::new(Conditions {
            headers: vec![HeaderCondition {
                name: name("x-case"),
                value: ValueMatch::Exact(i.to_string()),
            }],
            ..Default::default()
        }));
        route.action = Action::Redirect(Box::new(Redirect {
            scheme: c.scheme.map(str::to_string),
            hostname: c.hostname.map(str::to_string),
            port: c.port,
            path: c.path.clone(),
            status: c.status,
            listener_port: c.listener_port,
        }));
    }
    let proxy = start_proxy(t.snapshot()).await;

    for (i, c) in cases.iter().enumerate() {
        let (status, headers, body) = send(
            &proxy,
            Method::GET,
            c.host,
            c.target,
            &[("x-case", &i.to_string())],
            None,
        )
        .await;
        let location = headers.get("location").and_then(|v| v.to_str().ok());
        assert_eq!(
            (status, location),
            (c.status, Some(c.location)),
            "case {i}: {body}"
        );
    }
}

// ---------------------------------------------------------------------------------
// Backends and own answers

/// Whether `count` of `n` draws is within five standard deviations of a binomial
/// distribution with success probability `p`.
fn within_five_sigma(count: usize, n: usize, p: f64) -> bool {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    (count as f64 - mean).abs() <= 5.0 * sigma
}

#[tokio::test]
async fn weighted_backends_share_requests_by_weight_and_weight_zero_gets_none() {
    let heavy = start_echo("heavy").await;
    let light = start_echo("light").await;
    let never = start_echo("never").await;
    let mut t = Table::default();
    let h = t.cluster("heavy", &[heavy.addr]);
    let l = t.cluster("light", &[light.addr]);
    let n = t.cluster("never", &[never.addr]);
    t.route("split", "a.example", "/", h).action = weighted(&[
        (BackendTarget::Cluster(h), 90),
        (BackendTarget::Cluster(n), 0),
        (BackendTarget::Cluster(l), 10),
    ]);
    let proxy = start_proxy(t.snapshot()).await;

    const N: usize = 2000;
    let client = raw_client();
    let names: Vec<String> = futures_util::stream::iter(0..N)
        .map(|_| {
            let req = client
                .get(proxy.url("/"))
                .header("host", "a.example")
                .send();
            async move {
                let resp = req.await.expect("request reaches the proxy");
                assert_eq!(resp.status(), 200);
                let body = resp.text().await.expect("read body");
                let seen: EchoSeen = serde_json::from_str(&body).expect("echo JSON");
                seen.name
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let count = |name: &str| names.iter().filter(|n| *n == name).count();
    let (h, l, z) = (count("heavy"), count("light"), count("never"));
    assert_eq!(h + l + z, N);
    assert_eq!(z, 0, "a weight-0 backend never gets a request");
    assert!(within_five_sigma(h, N, 0.9), "heavy got {h} of {N}");
    assert!(within_five_sigma(l, N, 0.1), "light got {l} of {N}");
}

#[tokio::test]
async fn the_share_of_an_invalid_backend_is_answered_500() {
    let echo = start_echo("web").await;
    let mut t = Table::default();
    let web = t.cluster("web", &[echo.addr]);
    t.route("half", "half.example", "/", web).action =
        weighted(&[(BackendTarget::Cluster(web), 1), (invalid(), 1)]);
    t.route("none", "none.example", "/", web).action = weighted(&[(invalid(), 1), (invalid(), 3)]);
    let proxy = start_proxy(t.snapshot()).await;

    const N: usize = 400;
    let mut invalid_answers = 0;
    for _ in 0..N {
        let (status, _, body) = send(&proxy, Method::GET, "half.example", "/", &[], None).await;
        match status {
            200 => {
                let seen: EchoSeen = serde_json::from_str(&body).expect("echo JSON");
                assert_eq!(seen.name, "web");
            }
            500 => {
                assert_eq!(body, "invalid backend for gw/half");
                invalid_answers += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        within_five_sigma(invalid_answers, N, 0.5),
        "{invalid_answers} of {N} answered 500"
    );

    for _ in 0..20 {
        let (status, _, body) = send(&proxy, Method::GET, "none.example", "/x", &[], None).await;
        assert_eq!(
            (status, body.as_str()),
            (500, "invalid backend for gw/none")
        );
    }
}

#[tokio::test]
async fn a_route_can_answer_itself() {
    let echo = start_echo("web").await;
    let mut t = Table::default();
    let web = t.cluster("web", &[echo.addr]);
    t.route("own", "a.example", "/gone", web).action = Action::Respond {
        status: 500,
        body: "invalid backend for gw/own".into(),
    };
    t.route("web", "a.example", "/", web);
    let proxy = start_proxy(t.snapshot()).await;

    let (status, headers, body) =
        send(&proxy, Method::GET, "a.example", "/gone/x", &[], None).await;
    assert_eq!((status, body.as_str()), (500, "invalid backend for gw/own"));
    assert!(headers.contains_key("x-request-id"));
    assert_eq!(get_echo(&proxy, "a.example", "/other").await.name, "web");
}

#[tokio::test]
async fn method_header_and_query_conditions_choose_among_routes_on_one_path() {
    let plain = start_echo("plain").await;
    let canary = start_echo("canary").await;
    let deleting = start_echo("delete").await;
    let query = start_echo("query").await;
    let mut t = Table::default();
    let p = t.cluster("plain", &[plain.addr]);
    let c = t.cluster("canary", &[canary.addr]);
    let d = t.cluster("delete", &[deleting.addr]);
    let q = t.cluster("query", &[query.addr]);
    // The path-only route is the oldest, so only the conditions can make the others win.
    t.route("plain", "a.example", "/api", p);
    t.route("canary", "a.example", "/api", c).conditions = Some(Box::new(Conditions {
        headers: vec![HeaderCondition {
            name: name("x-canary"),
            value: ValueMatch::Exact("yes".into()),
        }],
        ..Default::default()
    }));
    t.route("delete", "a.example", "/api", d).conditions = Some(Box::new(Conditions {
        method: Some(Method::DELETE),
        ..Default::default()
    }));
    t.route("query", "a.example", "/api", q).conditions = Some(Box::new(Conditions {
        query: vec![QueryCondition {
            name: "v".into(),
            value: ValueMatch::Exact("2".into()),
        }],
        ..Default::default()
    }));
    let proxy = start_proxy(t.snapshot()).await;

    let who =
        |method: Method, target: &'static str, headers: &'static [(&'static str, &'static str)]| {
            let proxy = &proxy;
            async move {
                echo_of(proxy, method, "a.example", target, headers)
                    .await
                    .name
            }
        };
    assert_eq!(
        who(Method::GET, "/api/x", &[("x-canary", "yes")]).await,
        "canary"
    );
    assert_eq!(
        who(Method::GET, "/api/x", &[("x-canary", "no")]).await,
        "plain"
    );
    assert_eq!(who(Method::GET, "/api/x", &[]).await, "plain");
    assert_eq!(who(Method::DELETE, "/api/x", &[]).await, "delete");
    // A method outranks a header match.
    assert_eq!(
        who(Method::DELETE, "/api", &[("x-canary", "yes")]).await,
        "delete"
    );
    assert_eq!(who(Method::GET, "/api?v=2", &[]).await, "query");
    assert_eq!(who(Method::GET, "/api?a=1&v=2", &[]).await, "query");
    assert_eq!(who(Method::GET, "/api?v=1", &[]).await, "plain");
}

// ---------------------------------------------------------------------------------
// Request mirrors

/// A route on `a.example` to `real` that mirrors to `mirror`, rewriting `/in` to `/out`
/// and setting `x-added: 1` on the way.
fn mirrored(real: SocketAddr, mirror: SocketAddr) -> Snapshot {
    let mut t = Table::default();
    let web = t.cluster("web", &[real]);
    let shadow = t.cluster("shadow", &[mirror]);
    t.route("web", "a.example", "/in", web).filters = filters(Filters {
        request_headers: Some(modifier(&[("x-added", "1")], &[], &[])),
        rewrite: Some(UrlRewrite {
            hostname: None,
            path: Some(PathModifier::ReplacePrefixMatch("/out".into())),
        }),
        mirrors: vec![Mirror {
            cluster: shadow,
            share: None,
        }],
        ..Default::default()
    });
    t.snapshot()
}

#[tokio::test]
async fn a_mirror_receives_a_copy_of_the_request_with_its_body() {
    let echo = start_echo("web").await;
    let (mirror, mut received, _stop) = start_recorder().await;
    let proxy = start_proxy(mirrored(echo.addr, mirror)).await;

    let body: Bytes = (0..100_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let (status, headers, answer) = send(
        &proxy,
        Method::POST,
        "a.example",
        "/in/x?q=1",
        &[("x-client", "c")],
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let seen: EchoSeen = serde_json::from_str(&answer).expect("echo JSON");
    assert_eq!(seen.body_bytes, body.len() as u64);
    assert_eq!(seen.uri, "/out/x?q=1");

    let copy = tokio::time::timeout(EVENTUALLY, received.recv())
        .await
        .expect("the mirror gets its copy in time")
        .expect("the recorder is running");
    assert_eq!(copy.method, Method::POST);
    assert_eq!(copy.uri, "/out/x?q=1");
    let header = |n: &str| copy.headers.get(n).and_then(|v| v.to_str().ok());
    assert_eq!(header("host"), Some("a.example"));
    assert_eq!(header("x-added"), Some("1"));
    assert_eq!(header("x-client"), Some("c"));
    assert_eq!(header("x-forwarded-host"), Some("a.example"));
    assert!(header("x-forwarded-for").is_some());
    assert_eq!(
        header("x-request-id"),
        headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        "the copy carries the request's id"
    );
    assert_eq!(copy.body.as_ref().map(Bytes::len), Ok(body.len()));
    assert!(copy.body == Ok(body), "the copy's body is the same bytes");

    let (status, _, _) = send(&proxy, Method::GET, "a.example", "/in", &[], None).await;
    assert_eq!(status, 200);
    let copy = tokio::time::timeout(EVENTUALLY, received.recv())
        .await
        .expect("the mirror gets its copy in time")
        .expect("the recorder is running");
    assert_eq!((copy.method, copy.uri.as_str()), (Method::GET, "/out"));
    assert_eq!(copy.body.map(|b| b.len()), Ok(0));
}

#[tokio::test]
async fn the_real_request_completes_while_its_mirror_never_answers() {
    let echo = start_echo("web").await;
    let (silent, _stop) = start_silent().await;
    let proxy = start_proxy(mirrored(echo.addr, silent)).await;

    let seen = echo_of(&proxy, Method::GET, "a.example", "/in/a", &[]).await;
    assert_eq!(seen.uri, "/out/a");
    let (status, _, answer) = send(
        &proxy,
        Method::POST,
        "a.example",
        "/in/b",
        &[],
        Some(Bytes::from_static(b"payload")),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        proxy.proxy.mirrors_in_flight(),
        2,
        "both copies still wait for the mirror"
    );
    assert_eq!(mirror_dropped(&proxy, "shadow", "upstream_error"), 0);
}

#[tokio::test]
async fn a_refusing_mirror_changes_nothing_for_the_real_request_nor_passive_health() {
    let echo = start_echo("web").await;
    let refusing = refusing_port();
    let proxy = start_proxy(mirrored(echo.addr, refusing.addr)).await;

    for _ in 0..3 {
        let seen = echo_of(&proxy, Method::GET, "a.example", "/in", &[]).await;
        assert_eq!(seen.name, "web");
    }
    assert!(
        eventually(|| mirror_dropped(&proxy, "shadow", "upstream_error") == 3).await,
        "each refused copy is counted: {}",
        mirror_dropped(&proxy, "shadow", "upstream_error")
    );
    assert!(
        !proxy.proxy.is_ejected(refusing.addr),
        "a mirror's failures eject nothing"
    );
    assert_eq!(
        proxy
            .metrics
            .endpoint_ejections_total
            .with_label_values(&[NS, "shadow"])
            .get(),
        0
    );
    assert_eq!(proxy.proxy.mirrors_in_flight(), 0);
}

#[tokio::test]
async fn copies_beyond_the_in_flight_bound_are_dropped_and_counted() {
    let echo = start_echo("web").await;
    let (silent, _stop) = start_silent().await;
    let cfg = ProxyConfig {
        max_mirrors_in_flight: 4,
        endpoint_policy: portcullis::model::safety::EndpointPolicy {
            allow_local: true,
            ..Default::default()
        },
        ..ProxyConfig::default()
    };
    let proxy = start_proxy_with(mirrored(echo.addr, silent), cfg).await;

    for _ in 0..20 {
        let seen = echo_of(&proxy, Method::GET, "a.example", "/in", &[]).await;
        assert_eq!(seen.name, "web");
    }
    assert_eq!(proxy.proxy.mirrors_in_flight(), 4);
    assert_eq!(mirror_dropped(&proxy, "shadow", "in_flight_limit"), 16);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&proxy.metrics.registry.gather())
        .expect("metrics encode");
    assert!(
        text.contains(
            r#"portcullis_mirror_dropped_total{namespace="gw",reason="in_flight_limit",service="shadow"} 16"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_mirror_that_falls_behind_the_body_is_abandoned_not_waited_for() {
    let echo = start_echo("web").await;
    // Accepts and never reads: the copy's body can go no further than socket buffers.
    let (silent, _stop) = start_silent().await;
    let proxy = start_proxy(mirrored(echo.addr, silent)).await;

    let body = Bytes::from(vec![7u8; 32 * 1024 * 1024]);
    let (status, _, answer) = send(
        &proxy,
        Method::PUT,
        "a.example",
        "/in/upload",
        &[],
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let seen: EchoSeen = serde_json::from_str(&answer).expect("echo JSON");
    assert_eq!(seen.body_bytes, body.len() as u64);
    assert!(
        eventually(|| mirror_dropped(&proxy, "shadow", "body_overflow") == 1).await,
        "the copy is abandoned and counted"
    );
    assert!(
        eventually(|| proxy.proxy.mirrors_in_flight() == 0).await,
        "an abandoned copy ends at once"
    );
}

// ---------------------------------------------------------------------------------
// Timeouts

fn timed(upstream: SocketAddr, timeouts: Timeouts) -> Snapshot {
    let mut t = Table::default();
    let web = t.cluster("web", &[upstream]);
    t.route("web", "a.example", "/", web).timeouts = timeouts;
    t.snapshot()
}

#[tokio::test]
async fn backend_request_timeout_answers_504() {
    let (silent, _stop) = start_silent().await;
    let proxy = start_proxy(timed(
        silent,
        Timeouts {
            request: None,
            backend_request: Some(Duration::from_millis(200)),
        },
    ))
    .await;
    let (status, _, body) = send(&proxy, Method::GET, "a.example", "/", &[], None).await;
    assert_eq!((status, body.as_str()), (504, "upstream timeout"));
}

#[tokio::test]
async fn request_timeout_answers_504() {
    let (silent, _stop) = start_silent().await;
    let proxy = start_proxy(timed(
        silent,
        Timeouts {
            request: Some(Duration::from_millis(200)),
            backend_request: None,
        },
    ))
    .await;
    let (status, _, body) = send(
        &proxy,
        Method::POST,
        "a.example",
        "/",
        &[],
        Some(Bytes::from_static(b"x")),
    )
    .await;
    assert_eq!((status, body.as_str()), (504, "upstream timeout"));
}

/// An upstream whose first connection reads a request head, waits `delay` and resets;
/// every later connection reads a request head, waits `delay` and answers `200 second`.
async fn start_reset_then_slow(delay: Duration) -> (SocketAddr, Stopper) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, mut rx) = Stopper::new();
    let accepted = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (mut s, _) = tokio::select! {
                _ = rx.wait_for(|v| *v) => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let first = accepted.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                tokio::time::sleep(delay).await;
                if first {
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
                    .await;
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            });
        }
    });
    (addr, stop)
}

/// The first attempt fails after `DELAY`, the retry answers `DELAY` later: together
/// past `LIMIT`, each alone well within it.
const DELAY: Duration = Duration::from_millis(1200);
const LIMIT: Duration = Duration::from_millis(2000);

#[tokio::test]
async fn backend_request_timeout_gives_each_attempt_its_own_deadline() {
    let (upstream, _stop) = start_reset_then_slow(DELAY).await;
    let proxy = start_proxy(timed(
        upstream,
        Timeouts {
            request: None,
            backend_request: Some(LIMIT),
        },
    ))
    .await;
    let (status, _, body) = send(&proxy, Method::GET, "a.example", "/", &[], None).await;
    assert_eq!((status, body.as_str()), (200, "second"));
    assert_eq!(
        proxy
            .metrics
            .upstream_retries_total
            .with_label_values(&[NS, "web", "reset_before_response"])
            .get(),
        1
    );
}

#[tokio::test]
async fn request_timeout_bounds_all_attempts_together() {
    let (upstream, _stop) = start_reset_then_slow(DELAY).await;
    let proxy = start_proxy(timed(
        upstream,
        Timeouts {
            request: Some(LIMIT),
            backend_request: Some(LIMIT),
        },
    ))
    .await;
    let (status, _, body) = send(&proxy, Method::GET, "a.example", "/", &[], None).await;
    assert_eq!((status, body.as_str()), (504, "upstream timeout"));
    assert_eq!(
        proxy
            .metrics
            .upstream_retries_total
            .with_label_values(&[NS, "web", "reset_before_response"])
            .get(),
        1,
        "the retry happened and was cut short"
    );
}
