//! The dashboard listener: the page and its assets, the `/api/v1/state` JSON API with
//! live endpoint state and live traffic per route, and the Host check. Real sockets, a
//! real proxy in front of real upstreams, real clients.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use portcullis::certs::DevCa;
use portcullis::dashboard::{DashboardState, serve_dashboard};
use portcullis::proxy::{Ejection, ProxyConfig};
use serde_json::{Value, json};
use support::data_path::{start_hyper, text_body};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Serves the dashboard of `proxy` on 127.0.0.1:0.
async fn start_dashboard(proxy: &TestProxy) -> (SocketAddr, Stopper) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind dashboard");
    let addr = listener.local_addr().expect("dashboard address");
    let (stop, rx) = Stopper::new();
    tokio::spawn(serve_dashboard(
        listener,
        DashboardState {
            snapshots: proxy.snapshots.clone(),
            metrics: proxy.metrics.clone(),
            proxy: proxy.proxy.clone(),
        },
        rx,
    ));
    (addr, stop)
}

async fn state(dashboard: SocketAddr) -> Value {
    let resp = client()
        .get(format!("http://{dashboard}/api/v1/state"))
        .send()
        .await
        .expect("GET /api/v1/state");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    serde_json::from_str(&resp.text().await.expect("body")).expect("state is JSON")
}

async fn status_of(proxy: &TestProxy, host: &str, path: &str) -> u16 {
    client()
        .get(proxy.url(path))
        .header("host", host)
        .send()
        .await
        .expect("request through the proxy")
        .status()
        .as_u16()
}

/// Polls `check` every 20 ms until it holds or `timeout` passes; whether it held.
async fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// An address nothing listens on: bound, then closed.
async fn dead_address() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("address");
    drop(l);
    addr
}

/// An EndpointSlice with one endpoint of a pod that is terminating but still serving.
fn terminating_slice(namespace: &str, service: &str, addr: SocketAddr) -> Vec<EndpointSlice> {
    vec![
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "namespace": namespace,
                "name": format!("{service}-terminating"),
                "labels": {"kubernetes.io/service-name": service}
            },
            "addressType": "IPv4",
            "ports": [{"port": addr.port(), "protocol": "TCP"}],
            "endpoints": [{"addresses": [addr.ip().to_string()],
                           "conditions": {"ready": false, "serving": true, "terminating": true}}]
        }))
        .expect("valid EndpointSlice"),
    ]
}

fn cluster_of<'a>(state: &'a Value, service: &str) -> &'a Value {
    state["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .find(|c| c["service"]["name"] == service)
        .unwrap_or_else(|| panic!("no cluster for {service}: {state:#}"))
}

fn endpoint_of(cluster: &Value, addr: SocketAddr) -> &Value {
    cluster["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .unwrap_or_else(|| panic!("no endpoint {addr}: {cluster:#}"))
}

fn traffic_of<'a>(state: &'a Value, kind: &str, namespace: &str, name: &str) -> &'a Value {
    state["traffic"]["routes"]
        .as_array()
        .expect("traffic.routes")
        .iter()
        .find(|i| i["kind"] == kind && i["namespace"] == namespace && i["name"] == name)
        .unwrap_or_else(|| panic!("no traffic for {kind} {namespace}/{name}: {state:#}"))
}

#[tokio::test]
async fn state_shows_routes_endpoints_certificates_and_diagnostics() {
    let web = start_echo("web").await;
    let spare = start_echo("spare").await;
    let draining = start_echo("draining").await;
    let dead = dead_address().await;
    // An upstream that answers only when the test lets it: one request stays in flight.
    let gate = Arc::new(Semaphore::new(0));
    let (held, _held_stop) = {
        let gate = gate.clone();
        start_hyper(move |_req| {
            let gate = gate.clone();
            async move {
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
                http::Response::new(text_body("released"))
            }
        })
        .await
    };
    let ca = DevCa::generate("Dashboard test CA").expect("test CA");
    let leaf = ca.issue(&["a.example".to_string()], 30).expect("leaf");

    let world = World::new()
        .ingress(
            ingress("ns", "web")
                .host("a.example")
                .prefix("/", "web", 80)
                .prefix("/flaky", "flaky", 80)
                .exact("/hold", "held", 80)
                .tls(&["a.example"], "web-tls"),
        )
        .ingress(
            ingress("ns", "broken")
                .host("b.example")
                .prefix("/", "gone", 80),
        )
        .secret(tls_secret("ns", "web-tls", &leaf.cert_pem, &leaf.key_pem))
        .backend("ns", "web", 80, &[web.addr])
        .backend("ns", "flaky", 80, &[dead, spare.addr])
        .backend("ns", "held", 80, &[held])
        .slices(terminating_slice("ns", "web", draining.addr));
    // Ejection long enough that the dead endpoint is still ejected when the test looks.
    let cfg = ProxyConfig {
        ejection: Ejection {
            base: Duration::from_secs(600),
            max: Duration::from_secs(600),
        },
        ..ProxyConfig::default()
    };
    let proxy = start_proxy_with(world.snapshot(), cfg).await;
    let (dashboard, _stop) = start_dashboard(&proxy).await;

    // Requests to /flaky until the dead endpoint has refused one and been ejected; the
    // proxy retries those on the live endpoint, so every answer is a 200.
    for _ in 0..50 {
        assert_eq!(status_of(&proxy, "a.example", "/flaky").await, 200);
        if proxy.proxy.is_ejected(dead) {
            break;
        }
    }
    assert!(
        proxy.proxy.is_ejected(dead),
        "the dead endpoint was never tried"
    );
    // One request held in flight on `held`.
    let in_flight = {
        let url = proxy.url("/hold");
        tokio::spawn(async move {
            client()
                .get(url)
                .header("host", "a.example")
                .send()
                .await
                .expect("held request")
                .text()
                .await
                .expect("held body")
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), || proxy.proxy.in_flight(held) == 1).await,
        "the held request never reached its upstream"
    );

    let s = state(dashboard).await;
    assert_eq!(s["generation"], 1);
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["time"].as_f64().expect("time") > 1.7e9);

    // Virtual hosts → routes → clusters.
    let hosts: Vec<&str> = s["virtual_hosts"]
        .as_array()
        .expect("virtual_hosts")
        .iter()
        .map(|v| v["host"].as_str().expect("host"))
        .collect();
    assert_eq!(hosts, ["a.example", "b.example"]);
    let routes = s["virtual_hosts"][0]["routes"].as_array().expect("routes");
    let hold = routes
        .iter()
        .find(|r| r["path"] == "/hold")
        .expect("route /hold");
    assert_eq!(hold["path_type"], "Exact");
    assert_eq!(hold["ingress"], json!({"namespace": "ns", "name": "web"}));
    let hold_cluster = &s["clusters"][hold["cluster"].as_u64().expect("cluster id") as usize];
    assert_eq!(hold_cluster["service"]["name"], "held");
    assert_eq!(hold_cluster["kind"], "endpoints");

    // Endpoint states: ready, terminating, ejected, in flight.
    let held_ep = endpoint_of(hold_cluster, held);
    assert_eq!(held_ep["in_flight"], 1);
    assert_eq!(held_ep["state"], "ready");
    let flaky = cluster_of(&s, "flaky");
    let dead_ep = endpoint_of(flaky, dead);
    assert_eq!(dead_ep["ejected"], true);
    assert_eq!(dead_ep["active"], true);
    assert_eq!(dead_ep["in_flight"], 0);
    assert_eq!(endpoint_of(flaky, spare.addr)["ejected"], false);
    let web_cluster = cluster_of(&s, "web");
    let ready = endpoint_of(web_cluster, web.addr);
    assert_eq!(
        (&ready["state"], &ready["active"], &ready["serving"]),
        (&json!("ready"), &json!(true), &json!(true))
    );
    let term = endpoint_of(web_cluster, draining.addr);
    assert_eq!(term["state"], "terminating");
    assert_eq!(term["serving"], true);
    // A ready endpoint exists, so the terminating one gets no new requests.
    assert_eq!(term["active"], false);
    let gone = cluster_of(&s, "gone");
    assert_eq!(gone["kind"], "unresolved");
    assert!(!gone["unresolved"].as_str().unwrap_or_default().is_empty());
    assert_eq!(gone["endpoints"], json!([]));

    // Certificates: hosts, issuer, days to expiry.
    let certs = s["certificates"].as_array().expect("certificates");
    assert_eq!(certs.len(), 1, "{certs:?}");
    let cert = &certs[0];
    assert_eq!(
        cert["secret"],
        json!({"namespace": "ns", "name": "web-tls"})
    );
    assert_eq!(cert["hosts"], json!(["a.example"]));
    assert!(
        cert["issuer"]
            .as_str()
            .unwrap_or_default()
            .contains("Dashboard test CA"),
        "{cert}"
    );
    let days = cert["days_to_expiry"].as_f64().expect("days_to_expiry");
    assert!((28.0..=31.0).contains(&days), "{days}");
    assert_eq!(
        s["tls_hosts"],
        json!([{"host": "a.example", "secret": {"namespace": "ns", "name": "web-tls"},
                "ingress": {"namespace": "ns", "name": "web"}, "certificate": true}])
    );

    // Diagnostics name the broken backend.
    let diags = s["diagnostics"].as_array().expect("diagnostics");
    assert!(
        diags.iter().any(
            |d| d["reason"].as_str().unwrap_or_default().contains("gone") || d["name"] == "gone"
        ),
        "{diags:?}"
    );
    assert_eq!(
        s["served_ingresses"],
        json!([{"namespace": "ns", "name": "broken"}, {"namespace": "ns", "name": "web"}])
    );

    gate.add_permits(1);
    assert_eq!(in_flight.await.expect("held request task"), "released");
    assert!(
        wait_until(Duration::from_secs(10), || proxy.proxy.in_flight(held) == 0).await,
        "the held request still counts after its response"
    );
    let s = state(dashboard).await;
    assert_eq!(endpoint_of(cluster_of(&s, "held"), held)["in_flight"], 0);
}

#[tokio::test]
async fn live_traffic_per_route_comes_from_the_proxy_counters() {
    let web = start_echo("web").await;
    // Every answer takes at least 30 ms: the percentiles have a floor the test knows.
    let (slow, _slow_stop) = start_hyper(|_req| async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        http::Response::new(text_body("slow"))
    })
    .await;
    let world = World::new()
        .ingress(
            ingress("ns", "web")
                .host("a.example")
                .prefix("/", "web", 80),
        )
        .ingress(
            ingress("ns", "slow")
                .host("s.example")
                .prefix("/", "slow", 80),
        )
        .ingress(
            ingress("ns", "broken")
                .host("b.example")
                .prefix("/", "gone", 80),
        )
        .ingress(
            ingress("ns", "idle")
                .host("i.example")
                .prefix("/", "web", 80),
        )
        .backend("ns", "web", 80, &[web.addr])
        .backend("ns", "slow", 80, &[slow]);
    let proxy = start_proxy(world.snapshot()).await;
    let (dashboard, _stop) = start_dashboard(&proxy).await;

    // Before any traffic: the served Ingresses, no traffic rows.
    let s = state(dashboard).await;
    assert_eq!(s["traffic"]["routes"], json!([]));
    assert_eq!(s["traffic"]["total"]["requests_total"], 0);

    for _ in 0..6 {
        assert_eq!(status_of(&proxy, "a.example", "/").await, 200);
    }
    for _ in 0..4 {
        assert_eq!(status_of(&proxy, "s.example", "/").await, 200);
    }
    assert_eq!(status_of(&proxy, "nowhere.example", "/").await, 404);
    for _ in 0..3 {
        assert_eq!(status_of(&proxy, "b.example", "/").await, 503);
    }

    let s = state(dashboard).await;
    let t = &s["traffic"];
    let window = t["window_seconds"]
        .as_f64()
        .expect("a window after two reads");
    assert!(window > 0.0);

    let web_live = traffic_of(&s, "Ingress", "ns", "web");
    assert_eq!(web_live["requests_total"], 6);
    assert_eq!(web_live["errors_total"], 0);
    let requests = web_live["requests"].as_u64().expect("requests");
    assert!((1..=6).contains(&requests), "{web_live}");
    let rps = web_live["requests_per_second"].as_f64().expect("rps");
    assert!(
        (rps - requests as f64 / window).abs() < 1e-6,
        "{web_live} window {window}"
    );
    assert_eq!(web_live["error_rate"], 0.0);

    let slow_live = traffic_of(&s, "Ingress", "ns", "slow");
    assert_eq!(slow_live["requests_total"], 4);
    let p50 = slow_live["p50_seconds"].as_f64().expect("p50");
    let p99 = slow_live["p99_seconds"].as_f64().expect("p99");
    assert!(p50 >= 0.025, "p50 {p50}: every request took at least 30 ms");
    assert!(p99 >= p50 && p99 <= 10.0, "p50 {p50}, p99 {p99}");

    let broken = traffic_of(&s, "Ingress", "ns", "broken");
    assert_eq!(broken["requests_total"], 3);
    assert_eq!(broken["errors_total"], 3);
    assert_eq!(broken["error_rate"], 1.0);

    // The request no route matched: its own entry with empty names and kind, a 404 is
    // no error.
    let unrouted = traffic_of(&s, "", "", "");
    assert_eq!(unrouted["requests_total"], 1);
    assert_eq!(unrouted["errors_total"], 0);

    // An Ingress without traffic has no row; the page lists it from served_ingresses.
    assert!(
        !t["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .any(|i| i["name"] == "idle")
    );
    assert!(
        s["served_ingresses"]
            .as_array()
            .expect("served")
            .contains(&json!({"namespace": "ns", "name": "idle"}))
    );

    assert_eq!(t["total"]["requests_total"], 14);
    assert_eq!(t["total"]["errors_total"], 3);
}

/// A raw HTTP/1.1 GET with the given Host header; the status code and the body.
async fn raw_get(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn page_and_assets_are_embedded_and_only_served_to_local_names() {
    let proxy = start_proxy(World::new().snapshot()).await;
    let (dashboard, _stop) = start_dashboard(&proxy).await;

    let resp = client()
        .get(format!("http://{dashboard}/"))
        .send()
        .await
        .expect("GET /");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    let html = resp.text().await.expect("html");
    assert!(html.contains(r#"<script src="app.js" defer></script>"#));
    assert!(html.contains(r#"href="style.css""#));
    // Nothing is loaded from elsewhere: the page works air-gapped.
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "{html}"
    );

    for (path, content_type, needle) in [
        ("/app.js", "text/javascript; charset=utf-8", "api/v1/state"),
        ("/style.css", "text/css; charset=utf-8", "@media (max-width"),
    ] {
        let resp = client()
            .get(format!("http://{dashboard}{path}"))
            .send()
            .await
            .expect("GET asset");
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["content-type"], content_type, "{path}");
        let body = resp.text().await.expect("asset");
        assert!(body.contains(needle), "{path}");
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path}"
        );
    }

    let resp = client()
        .post(format!("http://{dashboard}/api/v1/state"))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 405);
    assert_eq!(raw_get(dashboard, "127.0.0.1", "/nope").await.0, 404);

    // An empty snapshot is a valid document too.
    let s = state(dashboard).await;
    assert_eq!(s["virtual_hosts"], json!([]));
    assert_eq!(s["default_backend"], Value::Null);
    assert_eq!(s["published_at"], Value::Null);

    // DNS rebinding: a page on another name that resolves to 127.0.0.1 gets nothing.
    for host in ["evil.example", "evil.example:10255", "127.0.0.1.nip.io"] {
        let (status, body) = raw_get(dashboard, host, "/api/v1/state").await;
        assert_eq!(status, 403, "Host {host}");
        assert!(body.contains("Host header"), "{body}");
    }
    for host in [
        "127.0.0.1",
        &dashboard.to_string(),
        "localhost",
        "localhost:10255",
        "dash.localhost",
        "[::1]:10255",
    ] {
        assert_eq!(
            raw_get(dashboard, host, "/api/v1/state").await.0,
            200,
            "Host {host}"
        );
    }
}

/// Gateway API objects with a served route (a header rule with a filter, a 90/10 split)
/// and problems (a listener on a port that is not served, a route that cannot attach).
/// The endpoint addresses are data only: nothing connects to them.
const GATEWAY_MANIFESTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: default}
spec:
  gatewayClassName: portcullis
  listeners:
    - {name: http, protocol: HTTP, port: 80}
    - {name: alt, protocol: HTTP, port: 8081, hostname: alt.example}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: internal, namespace: infra}
spec:
  gatewayClassName: portcullis
  listeners:
    - {name: http, protocol: HTTP, port: 80}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: default}
spec:
  parentRefs: [{name: web}]
  hostnames: [shop.example]
  rules:
    - matches: [{headers: [{name: x-canary, value: "yes"}]}]
      filters:
        - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-canary, value: "1"}]}}
      backendRefs: [{name: canary, port: 80}]
    - backendRefs:
        - {name: stable, port: 80, weight: 90}
        - {name: canary, port: 80, weight: 10}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: lonely, namespace: default}
spec:
  parentRefs: [{name: internal, namespace: infra}]
  rules:
    - backendRefs: [{name: stable, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: stable, namespace: default}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: canary, namespace: default}
spec: {ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: stable, namespace: default, labels: {kubernetes.io/service-name: stable}}
addressType: IPv4
ports: [{port: 9001}]
endpoints: [{addresses: ["127.0.0.1"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: canary, namespace: default, labels: {kubernetes.io/service-name: canary}}
addressType: IPv4
ports: [{port: 9002}]
endpoints: [{addresses: ["127.0.0.1"]}]
"#;

#[tokio::test]
async fn state_and_debug_snapshot_show_httproutes_and_gateway_attachment() {
    let loaded = portcullis::files::load_str("gateway.yaml", GATEWAY_MANIFESTS).expect("load");
    let options = portcullis::k8s::Options {
        assume_class: true,
        allow_local_endpoints: true,
        ..Default::default()
    };
    let proxy = start_proxy(portcullis::commands::snapshot_of(loaded, &options)).await;
    let (dashboard, _stop) = start_dashboard(&proxy).await;
    let s = state(dashboard).await;

    let routes = s["virtual_hosts"]
        .as_array()
        .expect("virtual hosts")
        .iter()
        .find(|vh| vh["host"] == "shop.example")
        .expect("shop.example")["routes"]
        .as_array()
        .expect("routes")
        .clone();
    assert_eq!(routes.len(), 2, "{routes:#?}");
    // Precedence: the header rule first.
    let header = &routes[0];
    assert_eq!(
        header["source"],
        json!({"kind": "HTTPRoute", "namespace": "default", "name": "shop", "rule": 0, "match": 0})
    );
    assert_eq!(header["ingress"], Value::Null);
    assert_eq!(header["filters"], json!(["ResponseHeaderModifier"]));
    assert_eq!(
        header["conditions"]["headers"],
        json!([{"name": "x-canary", "type": "Exact", "value": "yes"}])
    );
    let split = &routes[1];
    assert_eq!(split["source"]["rule"], 1);
    assert_eq!(split["conditions"], Value::Null);
    assert_eq!(split["action"], json!({"type": "forward"}));
    let backends = split["backends"].as_array().expect("backends");
    let shares: Vec<(u64, f64, &str)> = backends
        .iter()
        .map(|b| {
            let cluster = &s["clusters"][b["cluster"].as_u64().expect("cluster") as usize];
            (
                b["weight"].as_u64().expect("weight"),
                b["percent"].as_f64().expect("percent"),
                cluster["service"]["name"].as_str().expect("service"),
            )
        })
        .collect();
    assert_eq!(shares, [(90, 90.0, "stable"), (10, 10.0, "canary")]);

    let gw = &s["gateway"];
    assert_eq!(
        gw["classes"],
        json!([{"name": "portcullis", "accepted": true}])
    );
    let web = gw["gateways"]
        .as_array()
        .expect("gateways")
        .iter()
        .find(|g| g["name"] == "web")
        .expect("Gateway web");
    let alt = &web["listeners"][1];
    assert_eq!(alt["name"], "alt");
    assert_eq!(alt["programmed"], false);
    assert_eq!(alt["reason"], "PortUnavailable");
    assert_eq!(web["listeners"][0]["attached_routes"], 1);
    let lonely = gw["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .find(|r| r["name"] == "lonely")
        .expect("lonely");
    assert_eq!(lonely["kind"], "HTTPRoute");
    assert_eq!(lonely["hostnames"], json!([]));
    assert_eq!(lonely["parents"][0]["accepted"], "NotAllowedByListeners");

    // /debug/snapshot shows the same routes and the same report.
    let resp = client()
        .get(format!("http://{dashboard}/debug/snapshot"))
        .send()
        .await
        .expect("GET /debug/snapshot");
    assert_eq!(resp.status(), 200);
    let d: Value = serde_json::from_str(&resp.text().await.expect("body")).expect("json");
    assert_eq!(d["gateway"], s["gateway"]);
    let debug_split = d["virtual_hosts"]
        .as_array()
        .expect("virtual hosts")
        .iter()
        .find(|vh| vh["host"] == "shop.example")
        .expect("shop.example")["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .find(|r| r["source"]["rule"] == 1)
        .expect("the split")
        .clone();
    assert_eq!(debug_split["backends"], split["backends"]);
}
