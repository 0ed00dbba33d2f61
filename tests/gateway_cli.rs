//! `check` and `explain` on Gateway API manifests, run as a user runs them: the real
//! binary on manifest files, asserting on exit status and output.

#[path = "support/child.rs"]
mod child;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

/// A Gateway with one served listener and two that are not programmed (a port other
/// than --gateway-http-port, and HTTPS); a Gateway that admits routes from its own
/// namespace only; an HTTPRoute with a header match, a method match, a query match, a
/// redirect, an invalid backendRef, a split with an invalid share and a 90/10 split;
/// and an HTTPRoute that cannot attach.
const MANIFESTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: default}
spec:
  gatewayClassName: portcullis
  listeners:
    - {name: http, protocol: HTTP, port: 80, allowedRoutes: {namespaces: {from: All}}}
    - {name: alt, protocol: HTTP, port: 8081}
    - {name: secure, protocol: HTTPS, port: 443, hostname: secure.example.com}
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
  parentRefs: [{name: web, sectionName: http}]
  hostnames: [shop.example.com]
  rules:
    - matches:
        - headers: [{name: x-canary, value: "yes"}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {add: [{name: x-via, value: canary}]}
      backendRefs: [{name: canary, port: 80}]
    - matches:
        - method: POST
          path: {type: PathPrefix, value: /orders}
      backendRefs: [{name: stable, port: 80}]
    - matches:
        - path: {type: PathPrefix, value: /search}
          queryParams: [{name: v, value: "2"}]
      backendRefs: [{name: canary, port: 80}]
    - matches:
        - path: {type: PathPrefix, value: /old}
      filters:
        - type: RequestRedirect
          requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
    - matches:
        - path: {type: PathPrefix, value: /broken}
      backendRefs: [{name: missing, port: 80}]
    - matches:
        - path: {type: PathPrefix, value: /mixed}
      backendRefs:
        - {name: stable, port: 80, weight: 3}
        - {name: missing, port: 80, weight: 1}
    - backendRefs:
        - {name: stable, port: 80, weight: 90}
        - {name: canary, port: 80, weight: 10}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: lonely, namespace: default}
spec:
  parentRefs: [{name: internal, namespace: infra}]
  hostnames: [lonely.example.com]
  rules:
    - backendRefs: [{name: stable, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: stable, namespace: default}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: canary, namespace: default}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: stable-1, namespace: default, labels: {kubernetes.io/service-name: stable}}
addressType: IPv4
ports: [{name: http, port: 9001}]
endpoints: [{addresses: ["127.0.0.1"], conditions: {ready: true}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: canary-1, namespace: default, labels: {kubernetes.io/service-name: canary}}
addressType: IPv4
ports: [{name: http, port: 9002}]
endpoints: [{addresses: ["127.0.0.1"], conditions: {ready: true}}]
"#;

fn manifests() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("gateway.yaml"), MANIFESTS).expect("write manifests");
    dir
}

fn portcullis(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .expect("run portcullis");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `explain --output json` with extra arguments (such as `-H`, `-X`) before the URL.
fn explain_json(dir: &tempfile::TempDir, extra: &[&str], url: &str) -> Value {
    let path = dir.path().to_str().expect("utf-8 path");
    let mut args = vec!["explain", "--manifests", path, "--output", "json"];
    args.extend_from_slice(extra);
    args.push(url);
    let (code, out, err) = portcullis(&args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn route(rule: usize) -> Value {
    json!({"kind": "HTTPRoute", "namespace": "default", "name": "shop", "rule": rule, "match": 0})
}

#[test]
fn explain_json_follows_header_method_and_query_matches() {
    let dir = manifests();

    // Without the header, the 90/10 split; every weighted backend is listed.
    let v = explain_json(&dir, &[], "http://shop.example.com/");
    assert_eq!(v["route"], route(6), "{v:#}");
    assert_eq!(v["ingress"], Value::Null);
    assert_eq!(v["status"], 200);
    assert_eq!(v["filters"], json!([]));
    assert!(v.get("conditions").is_none(), "{v:#}");
    let backends = v["backends"].as_array().expect("backends");
    let weights: Vec<(&str, u64, bool)> = backends
        .iter()
        .map(|b| {
            (
                b["service"].as_str().unwrap_or_default(),
                b["weight"].as_u64().unwrap_or_default(),
                b["valid"].as_bool().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(weights, [("stable", 90, true), ("canary", 10, true)]);
    assert_eq!(backends[0]["namespace"], "default");
    assert_eq!(backends[0]["port"], 80);
    assert!(
        backends[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("random")),
        "{v:#}"
    );
    assert!(v["reason"].as_str().is_some_and(|r| r.contains("random")));
    // `backend` is the first valid one, as the contract's field has one.
    assert_eq!(
        v["backend"],
        json!({"namespace": "default", "service": "stable", "port": 80})
    );

    // With the header, the header-matched rule, its filter and its condition.
    let v = explain_json(&dir, &["-H", "X-Canary: yes"], "http://shop.example.com/");
    assert_eq!(v["route"], route(0), "{v:#}");
    assert_eq!(v["filters"], json!(["RequestHeaderModifier"]));
    assert_eq!(
        v["conditions"],
        json!({"method": null, "headers": [{"name": "x-canary", "type": "Exact", "value": "yes"}], "query": []})
    );
    assert_eq!(v["backends"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["backend"]["service"], "canary");
    // Another value is not a match.
    let v = explain_json(&dir, &["-H", "x-canary: no"], "http://shop.example.com/");
    assert_eq!(v["route"], route(6), "{v:#}");

    // The method match: POST only.
    let v = explain_json(&dir, &["-X", "POST"], "http://shop.example.com/orders/1");
    assert_eq!(v["route"], route(1), "{v:#}");
    assert_eq!(v["conditions"]["method"], "POST");
    let v = explain_json(&dir, &[], "http://shop.example.com/orders/1");
    assert_eq!(v["route"], route(6), "{v:#}");
    let v = explain_json(
        &dir,
        &["--request", "PUT"],
        "http://shop.example.com/orders/1",
    );
    assert_eq!(v["route"], route(6), "{v:#}");

    // The query match takes the URL's query.
    let v = explain_json(&dir, &[], "http://shop.example.com/search?q=x&v=2");
    assert_eq!(v["route"], route(2), "{v:#}");
    assert_eq!(
        v["conditions"]["query"],
        json!([{"name": "v", "type": "Exact", "value": "2"}])
    );
    let v = explain_json(&dir, &[], "http://shop.example.com/search?v=3");
    assert_eq!(v["route"], route(6), "{v:#}");
    assert_eq!(v["listener"], "http");

    // Routes of Gateway HTTP listeners do not exist on the HTTPS listener.
    let v = explain_json(&dir, &[], "https://shop.example.com/");
    assert_eq!(v["status"], 404, "{v:#}");
    assert_eq!(v["route"], Value::Null);
}

#[test]
fn explain_json_reports_redirects_and_invalid_backends() {
    let dir = manifests();

    let v = explain_json(&dir, &[], "http://shop.example.com/old/x?a=1");
    assert_eq!(v["route"], route(3), "{v:#}");
    assert_eq!(v["status"], 301);
    assert_eq!(v["location"], "http://shop.example.com/new/x?a=1");
    assert_eq!(v["filters"], json!(["RequestRedirect"]));
    assert_eq!(v["backend"], Value::Null);

    // Every backendRef invalid: 500, and the backend says why.
    let v = explain_json(&dir, &[], "http://shop.example.com/broken");
    assert_eq!(v["route"], route(4), "{v:#}");
    assert_eq!(v["status"], 500);
    let b = &v["backends"][0];
    assert_eq!(b["valid"], false, "{v:#}");
    assert_eq!(b["service"], Value::Null);
    assert!(
        b["reason"]
            .as_str()
            .is_some_and(|r| r.contains("default/missing") && r.contains("500")),
        "{v:#}"
    );
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("invalid backend for default/shop")),
        "{v:#}"
    );

    // An invalid share: served by the valid backend, and the share is named.
    let v = explain_json(&dir, &[], "http://shop.example.com/mixed");
    assert_eq!(v["route"], route(5), "{v:#}");
    assert_eq!(v["status"], 200);
    assert_eq!(v["backend"]["service"], "stable");
    let valid: Vec<bool> = v["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["valid"] == true)
        .collect();
    assert_eq!(valid, [true, false]);
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("25% of requests go to an invalid backendRef")),
        "{v:#}"
    );
}

#[test]
fn explain_text_shows_route_conditions_filters_and_weights() {
    let dir = manifests();
    let path = dir.path().to_str().expect("utf-8 path");

    let (code, out, _) = portcullis(&[
        "explain",
        "--manifests",
        path,
        "-H",
        "x-canary: yes",
        "http://shop.example.com/",
    ]);
    assert_eq!(code, 0);
    for want in [
        "request:   GET -H 'x-canary: yes'",
        "route:     HTTPRoute default/shop rule 0 match 0",
        "when:      header x-canary = yes",
        "filters:   RequestHeaderModifier",
        "100% weight 1    default/canary:80  endpoints 127.0.0.1:9002",
        "also matched, and lost:",
        "HTTPRoute default/shop rule 6 match 0",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
    assert!(!out.contains("ingress:"), "{out}");

    let (code, out, _) = portcullis(&["explain", "--manifests", path, "http://shop.example.com/"]);
    assert_eq!(code, 0);
    for want in [
        "route:     HTTPRoute default/shop rule 6 match 0",
        "90% weight 90   default/stable:80",
        "10% weight 10   default/canary:80",
        "host and path matched, but not the method, headers, query or listener:",
        "rule 0 match 0, when header x-canary = yes",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
    // The header route did not match, so it did not "lose".
    assert!(!out.contains("also matched, and lost:"), "{out}");

    let (code, out, _) = portcullis(&["explain", "--manifests", path, "https://shop.example.com/"]);
    assert_eq!(code, 0);
    assert!(out.contains("status:    404"), "{out}");
    assert!(
        out.contains("rule 6 match 0, only on the http listener"),
        "{out}"
    );
}

#[test]
fn explain_refuses_bad_methods_and_headers() {
    let dir = manifests();
    let path = dir.path().to_str().expect("utf-8 path");
    for (flag, value, named) in [
        ("-H", "no colon here", "--header"),
        ("-H", "bad name: x", "--header"),
        ("-X", "GE T", "--request"),
    ] {
        let args = [
            "explain",
            "--manifests",
            path,
            flag,
            value,
            "http://shop.example.com/",
        ];
        let (code, out, err) = portcullis(&args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(named), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
}

#[test]
fn check_text_lists_gateways_listeners_and_attachment() {
    let dir = manifests();
    let (code, out, _) = portcullis(&["check", "--manifests", dir.path().to_str().unwrap()]);
    // The missing Service is an error diagnostic.
    assert_eq!(code, 1, "{out}");
    let line = |needle: &str| -> &str {
        out.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with `{needle}` in:\n{out}"))
    };
    assert!(
        out.contains("route(s) from 0 Ingress(es) and 1 HTTPRoute(s)"),
        "{out}"
    );
    assert!(
        out.contains("\nGateways (GatewayClass portcullis):\n"),
        "{out}"
    );
    assert!(line("  default/web (class portcullis)").contains("programmed"));
    assert!(line("listener http ").contains("served on http, 1 route(s) attached"));
    assert!(line("listener alt ").contains("not programmed: PortUnavailable"));
    assert!(line("listener secure ").contains("not programmed: UnsupportedProtocol"));
    assert!(line("listener secure ").contains("secure.example.com"));
    assert!(out.contains("\nHTTPRoutes:\n"), "{out}");
    assert!(line("  default/shop: ").contains("serves shop.example.com"));
    assert!(line("  default/lonely: ").contains("not attached"));
    assert!(
        line("parent Gateway infra/internal").contains("NotAllowedByListeners"),
        "{out}"
    );
    let shop_parent = line("parent Gateway default/web listener http");
    assert!(shop_parent.contains("Accepted; BackendNotFound"), "{out}");
    // The route table shows the split, the condition and the filter.
    assert!(out.contains("-> 2 weighted backends"), "{out}");
    assert!(line("   90%  default/stable:80").contains("[1 endpoint(s)]"));
    assert!(out.contains("when header x-canary = yes"), "{out}");
    assert!(out.contains("filters RequestHeaderModifier"), "{out}");
    assert!(line("/old ").contains("redirect 301"));
}

#[test]
fn check_json_has_gateways_routes_and_weighted_backends() {
    let dir = manifests();
    let (code, out, _) = portcullis(&[
        "check",
        "--manifests",
        dir.path().to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["summary"]["http_routes"], 1);
    assert_eq!(v["summary"]["ingresses"], 0);
    assert_eq!(v["summary"]["gateways"], 2);
    assert_eq!(
        v["gateway_classes"],
        json!([{"name": "portcullis", "accepted": true}])
    );

    let web = v["gateways"]
        .as_array()
        .expect("gateways")
        .iter()
        .find(|g| g["name"] == "web")
        .expect("Gateway web");
    let listeners: Vec<(&str, &str, bool)> = web["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap_or_default(),
                l["reason"].as_str().unwrap_or_default(),
                l["programmed"] == true,
            )
        })
        .collect();
    assert_eq!(
        listeners,
        [
            ("http", "Accepted", true),
            ("alt", "PortUnavailable", false),
            ("secure", "UnsupportedProtocol", false)
        ]
    );
    assert_eq!(web["listeners"][0]["served_on"], "http");

    let routes = v["http_routes"].as_array().expect("http_routes");
    let lonely = routes
        .iter()
        .find(|r| r["name"] == "lonely")
        .expect("lonely");
    assert_eq!(lonely["hostnames"], json!([]));
    assert_eq!(lonely["parents"][0]["accepted"], "NotAllowedByListeners");
    assert_eq!(
        lonely["parents"][0]["gateway"],
        json!({"namespace": "infra", "name": "internal"})
    );
    let shop = routes.iter().find(|r| r["name"] == "shop").expect("shop");
    assert_eq!(shop["hostnames"], json!(["shop.example.com"]));
    assert_eq!(shop["parents"][0]["accepted"], "Accepted");
    assert_eq!(shop["parents"][0]["resolved_refs"], "BackendNotFound");

    let table = v["virtual_hosts"][0]["routes"].as_array().expect("routes");
    let split = table
        .iter()
        .find(|r| r["route"] == route(6))
        .expect("the split");
    let weights: Vec<u64> = split["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["weight"].as_u64().unwrap_or_default())
        .collect();
    assert_eq!(weights, [90, 10]);
    assert_eq!(split["ingress"], Value::Null);
    assert_eq!(split["action"], json!({"type": "forward"}));
    let header = table
        .iter()
        .find(|r| r["route"] == route(0))
        .expect("the header rule");
    assert_eq!(header["filters"], json!(["RequestHeaderModifier"]));
    assert_eq!(header["conditions"]["headers"][0]["name"], "x-canary");
    let redirect = table
        .iter()
        .find(|r| r["route"] == route(3))
        .expect("the redirect");
    assert_eq!(redirect["action"]["type"], "redirect");
    assert_eq!(redirect["action"]["status"], 301);
}

/// The `Location` explain predicts is the one the proxy answers with, for the same
/// manifests and request (real binary, real curl).
#[tokio::test]
async fn explain_predicts_the_redirect_the_proxy_answers() {
    let dir = manifests();
    let v = explain_json(&dir, &[], "http://shop.example.com/old/x?a=1");
    let predicted = v["location"].as_str().expect("location").to_string();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(["run", "--manifests", dir.path().to_str().unwrap()])
        .args(child::LOOPBACK_LISTENERS);
    let proxy = child::LoggedChild::spawn("portcullis", cmd);
    let published = proxy
        .until(Duration::from_secs(30), |c| {
            c.logs().contains("snapshot published")
        })
        .await;
    assert!(published, "no snapshot published:\n{}", proxy.logs());
    let logs = proxy.logs();
    let http = logs
        .split("http=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the http address in the logs")
        .to_string();
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
            "Host: shop.example.com",
            &format!("http://{http}/old/x?a=1"),
        ])
        .output()
        .expect("run curl");
    let got = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(got, format!("301 {predicted}"));
}
