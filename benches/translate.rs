//! Translation cost over 10,000 Ingresses, 10,000 Services and 10,000 EndpointSlices:
//! `k8s::build` (a full build, as at startup and after a Service or Secret change), and
//! `translate::rebuild` after one Ingress or one EndpointSlice changed (what the
//! publisher does for those).
//!
//! `translate-gateway` does the same over 5,000 Ingresses and 5,000 HTTPRoutes (attached
//! to four Gateways) with their 10,000 Services and EndpointSlices, and rebuilds after
//! one HTTPRoute or one EndpointSlice changed.
//!
//! `cargo bench --bench translate -- --warm-up-time 1 --measurement-time 5`

/// The binary's allocator, so that figures match what `portcullis` does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

use portcullis::k8s::translate::{Rebuild, build_reusable, rebuild};
use portcullis::k8s::{Inputs, Options, build};
use portcullis::model::RouteKind;

/// `n` Ingresses across 20 namespaces, each with one host, two Prefix paths and an Exact
/// path, a TLS-less rule, backed by its own Service (named port) with an EndpointSlice of
/// three endpoints; one IngressClass of ours, the default.
fn inputs(n: usize) -> Inputs {
    let mut inputs = Inputs::default();
    inputs.ingress_classes.push(Arc::new(
        serde_json::from_value(json!({
            "metadata": {
                "name": "portcullis",
                "annotations": { "ingressclass.kubernetes.io/is-default-class": "true" },
            },
            "spec": { "controller": "portcullis.io/ingress-controller" },
        }))
        .unwrap(),
    ));
    for i in 0..n {
        let ns = format!("ns{}", i % 20);
        let svc = format!("svc-{i}");
        let backend = json!({ "service": { "name": svc, "port": { "name": "http" } } });
        let host = if i % 4 == 0 {
            format!("*.app{i}.example.com")
        } else {
            format!("app{i}.example.com")
        };
        inputs.ingresses.push(Arc::new(
            serde_json::from_value(json!({
                "metadata": {
                    "namespace": ns, "name": format!("ing-{i}"),
                    "creationTimestamp": format!("2024-01-01T00:{:02}:{:02}Z", (i / 60) % 60, i % 60),
                    "annotations": { "kubernetes.io/ingress.class": "portcullis" },
                },
                "spec": { "rules": [{ "host": host, "http": { "paths": [
                    { "path": "/", "pathType": "Prefix", "backend": backend },
                    { "path": format!("/api/v{}", i % 3), "pathType": "Prefix", "backend": backend },
                    { "path": "/healthz", "pathType": "Exact", "backend": backend },
                ]}}]},
            }))
            .unwrap(),
        ));
        service_and_slice(&mut inputs, &ns, &svc, i);
    }
    inputs
}

/// A Service `svc` (port `http` 80 → `http`, and `metrics`) with one EndpointSlice of
/// three ready endpoints, addressed from `i`.
fn service_and_slice(inputs: &mut Inputs, ns: &str, svc: &str, i: usize) {
    inputs.services.push(Arc::new(
        serde_json::from_value(json!({
            "metadata": { "namespace": ns, "name": svc },
            "spec": {
                "type": "ClusterIP",
                "selector": { "app": svc },
                "ports": [
                    { "name": "http", "port": 80, "targetPort": "http", "protocol": "TCP" },
                    { "name": "metrics", "port": 9090, "targetPort": 9090, "protocol": "TCP" },
                ],
            },
        }))
        .unwrap(),
    ));
    let ep = |k: usize| {
        json!({
            "addresses": [format!("10.{}.{}.{}", (i >> 8) & 255, i & 255, k)],
            "conditions": { "ready": true, "serving": true, "terminating": false },
            "nodeName": "node-1",
        })
    };
    inputs.endpoint_slices.push(Arc::new(
        serde_json::from_value(json!({
            "metadata": {
                "namespace": ns, "name": format!("{svc}-x7k2p"),
                "labels": { "kubernetes.io/service-name": svc },
            },
            "addressType": "IPv4",
            "ports": [
                { "name": "http", "port": 8080, "protocol": "TCP" },
                { "name": "metrics", "port": 9090, "protocol": "TCP" },
            ],
            "endpoints": [ep(1), ep(2), ep(3)],
        }))
        .unwrap(),
    ));
}

/// `ingresses` Ingresses as [`inputs`] makes them, and `routes` HTTPRoutes across the same
/// 20 namespaces, each with its own Service and EndpointSlice, attached to one of four
/// Gateways (namespace `gateways`, one HTTP listener each admitting routes from every
/// namespace) of a GatewayClass of ours. HTTPRoute `i` has one hostname (a second,
/// wildcard, one on every fifth) and two rules: an `/api/v{i % 3}` PathPrefix rule with 1–3
/// matches (a header match on every fourth route, a method on every seventh), a
/// RequestHeaderModifier on every third route and a URLRewrite on every tenth, and two
/// weighted backendRefs (90/10) on every other route; and a `/` rule with one backendRef.
fn gateway_inputs(ingresses: usize, routes: usize) -> Inputs {
    assert_eq!(
        routes % 20,
        0,
        "second backends stay in the route's namespace"
    );
    let mut inputs = inputs(ingresses);
    inputs.gateway_classes.push(Arc::new(
        serde_json::from_value(json!({
            "metadata": { "name": "portcullis" },
            "spec": { "controllerName": "portcullis.io/gateway-controller" },
        }))
        .unwrap(),
    ));
    for g in 0..4 {
        inputs.gateways.push(Arc::new(
            serde_json::from_value(json!({
                "metadata": {
                    "namespace": "gateways", "name": format!("gw-{g}"),
                    "creationTimestamp": "2023-12-01T00:00:00Z",
                },
                "spec": {
                    "gatewayClassName": "portcullis",
                    "listeners": [{
                        "name": "http", "protocol": "HTTP", "port": 80,
                        "allowedRoutes": { "namespaces": { "from": "All" } },
                    }],
                },
            }))
            .unwrap(),
        ));
    }
    for i in 0..routes {
        let ns = format!("ns{}", i % 20);
        let svc = format!("route-svc-{i}");
        let mut hostnames = vec![format!("r{i}.gw.example.com")];
        if i % 5 == 0 {
            hostnames.push(format!("*.r{i}.gw.example.net"));
        }
        let mut api =
            json!({ "path": { "type": "PathPrefix", "value": format!("/api/v{}", i % 3) } });
        if i % 4 == 0 {
            api["headers"] = json!([{ "name": "x-canary", "value": "always" }]);
        }
        if i % 7 == 0 {
            api["method"] = json!("POST");
        }
        let mut matches = vec![api];
        if i % 2 == 0 {
            matches.push(json!({ "path": { "type": "Exact", "value": "/healthz" } }));
        }
        if i % 3 == 0 {
            matches.push(json!({
                "path": { "type": "PathPrefix", "value": "/v2" },
                "queryParams": [{ "name": "tenant", "value": format!("t{}", i % 11) }],
            }));
        }
        let mut filters = Vec::new();
        if i % 3 == 0 {
            filters.push(json!({
                "type": "RequestHeaderModifier",
                "requestHeaderModifier": {
                    "set": [{ "name": "x-route", "value": format!("r{i}") }],
                    "remove": ["x-debug"],
                },
            }));
        }
        if i % 10 == 0 {
            filters.push(json!({
                "type": "URLRewrite",
                "urlRewrite": { "path": { "type": "ReplacePrefixMatch", "replacePrefixMatch": "/" } },
            }));
        }
        let mut backends = vec![json!({ "name": svc, "port": 80, "weight": 90 })];
        if i % 2 == 0 {
            let other = format!("route-svc-{}", (i + 20) % routes);
            backends.push(json!({ "name": other, "port": 80, "weight": 10 }));
        }
        // Matches with a URLRewrite ReplacePrefixMatch must all be PathPrefix.
        if i % 10 == 0 {
            matches.retain(|m| m["path"]["type"] == "PathPrefix");
        }
        inputs.http_routes.push(Arc::new(
            serde_json::from_value(json!({
                "metadata": {
                    "namespace": ns, "name": format!("route-{i}"),
                    "creationTimestamp": format!("2024-02-01T00:{:02}:{:02}Z", (i / 60) % 60, i % 60),
                },
                "spec": {
                    "parentRefs": [{ "name": format!("gw-{}", i % 4), "namespace": "gateways" }],
                    "hostnames": hostnames,
                    "rules": [
                        { "matches": matches, "filters": filters, "backendRefs": backends },
                        {
                            "matches": [{ "path": { "type": "PathPrefix", "value": "/" } }],
                            "backendRefs": [{ "name": svc, "port": 80 }],
                        },
                    ],
                },
            }))
            .unwrap(),
        ));
        service_and_slice(&mut inputs, &ns, &svc, 20_000 + i);
    }
    inputs
}

fn translate(c: &mut Criterion) {
    let inputs = inputs(10_000);
    let options = Options::default();
    let snap = build(&inputs, &options);
    assert!(
        snap.diagnostics.is_empty(),
        "{:?}",
        &snap.diagnostics[..3.min(snap.diagnostics.len())]
    );
    assert_eq!(snap.routes.routes().count(), 30_000);

    let mut group = c.benchmark_group("translate");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    // A build as the publisher sees it: the snapshot is dropped later, when the next one
    // replaces it and its last reader lets go, so dropping is measured apart.
    group.bench_function("build/10k-ingresses-services-slices", |b| {
        b.iter_with_large_drop(|| build(black_box(&inputs), &options))
    });
    group.bench_function("build+drop/10k-ingresses-services-slices", |b| {
        b.iter(|| black_box(build(black_box(&inputs), &options)))
    });
    // The build again, timed by this thread's CPU time rather than the wall clock, so
    // that a busy shared machine (other builds on the same cores) does not inflate it.
    if thread_cpu().is_some() {
        group.bench_function("build-cpu-time/10k-ingresses-services-slices", |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let start = thread_cpu().unwrap_or_default();
                    let snap = build(black_box(&inputs), &options);
                    spent += thread_cpu().unwrap_or_default().saturating_sub(start);
                    drop(black_box(snap));
                }
                spent
            })
        });
    }

    // One object replaced by a changed copy, the others the same `Arc`s, as a watch
    // cache gives them.
    let (previous, reuse) = build_reusable(&inputs, &Default::default(), &options);
    let mut ingress_changed = inputs.clone();
    let mut ing = (*inputs.ingresses[4321]).clone();
    if let Some(rule) = ing
        .spec
        .as_mut()
        .and_then(|s| s.rules.as_mut())
        .and_then(|r| r.first_mut())
        && let Some(http) = rule.http.as_mut()
    {
        let mut extra = http.paths[0].clone();
        extra.path = Some("/new".into());
        http.paths.push(extra);
    }
    ingress_changed.ingresses[4321] = Arc::new(ing);
    let mut slice_changed = inputs.clone();
    let mut slice = (*inputs.endpoint_slices[4321]).clone();
    if let Some(eps) = slice.endpoints.as_mut() {
        eps.pop();
    }
    slice_changed.endpoint_slices[4321] = Arc::new(slice);
    for (name, next, how) in [
        (
            "rebuild/one-ingress-changed",
            &ingress_changed,
            Rebuild::Routes,
        ),
        (
            "rebuild/one-endpointslice-changed",
            &slice_changed,
            Rebuild::Endpoints,
        ),
    ] {
        assert_eq!(rebuild(&inputs, next, &previous, &reuse, &options).2, how);
        group.bench_function(name, |b| {
            b.iter_with_large_drop(|| {
                rebuild(&inputs, black_box(next), &previous, &reuse, &options)
            })
        });
    }
    group.finish();
}

fn translate_gateway(c: &mut Criterion) {
    let inputs = gateway_inputs(5_000, 5_000);
    let options = Options::default();
    let snap = build(&inputs, &options);
    assert!(
        snap.diagnostics.is_empty(),
        "{:?}",
        &snap.diagnostics[..3.min(snap.diagnostics.len())]
    );
    let from_routes = snap
        .routes
        .routes()
        .filter(|r| r.source.kind == RouteKind::HttpRoute)
        .count();
    let conditioned = snap
        .routes
        .routes()
        .filter(|r| r.conditions.is_some())
        .count();
    // Per HTTPRoute: 1–3 matches of the first rule and the `/` rule, once per hostname.
    assert!(from_routes > 15_000, "{from_routes} HTTPRoute routes");
    assert!(conditioned > 2_000, "{conditioned} conditioned routes");
    assert_eq!(snap.routes.routes().count() - from_routes, 15_000);

    let mut group = c.benchmark_group("translate-gateway");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    group.bench_function("build/5k-ingresses-5k-httproutes", |b| {
        b.iter_with_large_drop(|| build(black_box(&inputs), &options))
    });
    if thread_cpu().is_some() {
        group.bench_function("build-cpu-time/5k-ingresses-5k-httproutes", |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let start = thread_cpu().unwrap_or_default();
                    let snap = build(black_box(&inputs), &options);
                    spent += thread_cpu().unwrap_or_default().saturating_sub(start);
                    drop(black_box(snap));
                }
                spent
            })
        });
    }

    let (previous, reuse) = build_reusable(&inputs, &Default::default(), &options);
    // HTTPRoute 2321 (a header match, no filter) gains a match.
    let mut route_changed = inputs.clone();
    let mut route = (*inputs.http_routes[2321]).clone();
    if let Some(rule) = route.spec.rules.as_mut().and_then(|r| r.first_mut())
        && let Some(matches) = rule.matches.as_mut()
    {
        let mut extra = matches[0].clone();
        if let Some(path) = extra.path.as_mut() {
            path.value = Some("/new".into());
        }
        matches.push(extra);
    }
    route_changed.http_routes[2321] = Arc::new(route);
    // The EndpointSlice of HTTPRoute 2321's Service loses an endpoint.
    let mut slice_changed = inputs.clone();
    let at = 5_000 + 2321;
    let mut slice = (*inputs.endpoint_slices[at]).clone();
    if let Some(eps) = slice.endpoints.as_mut() {
        eps.pop();
    }
    slice_changed.endpoint_slices[at] = Arc::new(slice);
    for (name, next, how) in [
        (
            "rebuild/one-httproute-changed",
            &route_changed,
            Rebuild::Routes,
        ),
        (
            "rebuild/one-endpointslice-changed",
            &slice_changed,
            Rebuild::Endpoints,
        ),
    ] {
        let (snap, _, done) = rebuild(&inputs, next, &previous, &reuse, &options);
        assert_eq!(done, how);
        assert!(snap.diagnostics.is_empty());
        group.bench_function(name, |b| {
            b.iter_with_large_drop(|| {
                rebuild(&inputs, black_box(next), &previous, &reuse, &options)
            })
        });
    }
    group.finish();
}

/// CPU time of the calling thread, from Linux' scheduler statistics (nanoseconds).
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

criterion_group!(benches, translate, translate_gateway);
criterion_main!(benches);
