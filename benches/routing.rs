//! Route lookup latency: `RouteTable::lookup` with 10, 1,000 and 10,000 virtual hosts.
//!
//! Each size has a mix of exact hosts, one-label wildcards and a host-less virtual host,
//! with Prefix paths 1–5 elements deep and a few Exact paths. Requests hit an exact
//! virtual host, a wildcard one, or fall through from an exact virtual host (no path
//! matches there) to its wildcard and to the host-less routes.
//!
//! `lookup-mixed` is the same table with header-conditioned routes on every other exact
//! host (a canary `/api` route that needs `x-canary: always`, as an HTTPRoute header
//! match makes): path-only hosts in it must cost what they cost in `lookup`, and a
//! conditioned host costs one header check more (`header-hit` takes the canary route,
//! `header-miss` checks it and falls back to the plain `/api`).
//!
//! `cargo bench --bench routing -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use portcullis::model::{
    Conditions, HeaderCondition, HostPattern, ListenerKind, ObjectRef, PathRule, PathType,
    RequestFacts, Route, RouteKind, RouteSource, RouteTable, ValueMatch,
};

const SEGMENTS: [&str; 5] = ["api", "v1", "users", "items", "detail"];

/// Routes for `hosts` virtual hosts: for domain `i`, an exact host `www.d{i}.com` with
/// Prefix paths of depth 1–5 and an Exact `/healthz`; every third domain also a wildcard
/// `*.d{i}.com` with `/static` and `/assets/img`; plus one host-less virtual host. With
/// `canary`, every even domain's exact host also has an HTTPRoute `/api` Prefix route
/// that needs the header `x-canary: always`.
fn table(hosts: usize, canary: bool) -> RouteTable {
    let mut routes = Vec::new();
    let push = |host: HostPattern, path: &str, pt: PathType, routes: &mut Vec<Route>| {
        let order = routes.len() as u32;
        let mut route = Route::forward(
            host,
            PathRule::new(path, pt).expect("bench paths are valid"),
            RouteSource {
                kind: RouteKind::Ingress,
                object: ObjectRef::new("bench", format!("ing-{order}")),
                rule: 0,
                match_index: 0,
            },
            order % 64,
        );
        route.order = order;
        routes.push(route);
    };
    let push_canary = |host: HostPattern, routes: &mut Vec<Route>| {
        push(host, "/api", PathType::Prefix, routes);
        let route = routes.last_mut().expect("just pushed");
        route.source.kind = RouteKind::HttpRoute;
        route.conditions = Some(Box::new(Conditions {
            headers: vec![HeaderCondition {
                name: HeaderName::from_static("x-canary"),
                value: ValueMatch::Exact("always".into()),
            }],
            ..Conditions::default()
        }));
    };
    let mut made = 0;
    let mut i = 0;
    while made < hosts {
        let exact = HostPattern::Exact(format!("www.d{i}.com"));
        let depth = 1 + i % 5;
        for d in 1..=depth {
            let path = format!("/{}", SEGMENTS[..d].join("/"));
            push(exact.clone(), &path, PathType::Prefix, &mut routes);
        }
        if canary && i % 2 == 0 {
            push_canary(exact.clone(), &mut routes);
        }
        push(exact, "/healthz", PathType::Exact, &mut routes);
        made += 1;
        if i % 3 == 0 && made < hosts {
            let wild = HostPattern::Wildcard(format!("d{i}.com"));
            push(wild.clone(), "/static", PathType::Prefix, &mut routes);
            push(wild, "/assets/img", PathType::Prefix, &mut routes);
            made += 1;
        }
        i += 1;
    }
    push(HostPattern::Any, "/", PathType::Prefix, &mut routes);
    push(
        HostPattern::Any,
        "/.well-known/acme-challenge",
        PathType::Prefix,
        &mut routes,
    );
    let (table, failed) = RouteTable::build(routes);
    assert!(failed.is_empty());
    table
}

/// Requests of one kind spread over the domains, so that lookups do not all hit one
/// cache line.
fn requests(domains: usize, kind: &str) -> Vec<(String, String)> {
    (0..1024)
        .map(|k| {
            // Domains with a wildcard are the multiples of 3.
            let i = (k * 3) % domains.max(1);
            let i = i - i % 3;
            match kind {
                "exact" => (format!("www.d{i}.com"), "/api/v1/users/42".into()),
                "wildcard" => (format!("cdn.d{i}.com"), "/static/js/app.js".into()),
                // No `/static` on the exact host: falls through to the wildcard…
                "fallthrough-wildcard" => (format!("www.d{i}.com"), "/static/app.css".into()),
                // …and when the wildcard has nothing either, to the host-less routes.
                "fallthrough-any" => (
                    format!("www.d{i}.com"),
                    "/.well-known/acme-challenge/t".into(),
                ),
                "miss" => (format!("nope{k}.example.org"), "/x".into()),
                _ => unreachable!(),
            }
        })
        .collect()
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    for hosts in [10usize, 1_000, 10_000] {
        let t = table(hosts, false);
        // Domains: three per four virtual hosts (every third domain adds a wildcard).
        let domains = hosts * 3 / 4;
        for kind in [
            "exact",
            "wildcard",
            "fallthrough-wildcard",
            "fallthrough-any",
            "miss",
        ] {
            let reqs = requests(domains, kind);
            for (h, p) in &reqs {
                if kind != "miss" {
                    assert!(
                        t.lookup(Some(h), p, &RequestFacts::get()).is_some(),
                        "{h}{p} should match"
                    );
                }
            }
            let facts = RequestFacts::get();
            let mut n = 0usize;
            group.bench_function(format!("{hosts}/{kind}"), |b| {
                b.iter(|| {
                    let (h, p) = &reqs[n & 1023];
                    n = n.wrapping_add(1);
                    black_box(t.lookup(Some(black_box(h.as_str())), black_box(p.as_str()), &facts))
                        .map(|m| m.route.order)
                })
            });
        }
    }
    group.finish();
}

/// Requests to the mixed table: `plain-host` to exact hosts without conditions (odd
/// domains), `header-hit` and `header-miss` to the conditioned ones (even domains), with
/// and without the header, for a path under `/api` only. All carry a few ordinary headers, so a header check scans a
/// realistic map.
fn mixed_requests(domains: usize, kind: &str) -> Vec<(String, String)> {
    (0..1024)
        .map(|k| {
            let i = (k * 3) % domains.max(2);
            let i = match kind {
                "plain-host" => i | 1,
                _ => i & !1,
            };
            let i = if i >= domains { i - 2 } else { i };
            // A plain host gets the `exact` request of `lookup`; on a conditioned one a
            // path that only `/api` (canary or plain) matches.
            let path = if kind == "plain-host" {
                "/api/v1/users/42"
            } else {
                "/api/items/42"
            };
            (format!("www.d{i}.com"), path.into())
        })
        .collect()
}

fn request_headers(canary: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "www.example.com"),
        ("user-agent", "wrk/4.2"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip"),
    ] {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    if canary {
        headers.insert(
            HeaderName::from_static("x-canary"),
            HeaderValue::from_static("always"),
        );
    }
    headers
}

fn lookup_mixed(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup-mixed");
    let with = request_headers(true);
    let without = request_headers(false);
    for hosts in [10usize, 1_000, 10_000] {
        let t = table(hosts, true);
        let domains = hosts * 3 / 4;
        for kind in ["plain-host", "header-hit", "header-miss"] {
            let facts = RequestFacts {
                method: &Method::GET,
                headers: if kind == "header-miss" {
                    &without
                } else {
                    &with
                },
                query: None,
                listener: ListenerKind::Http,
            };
            let reqs = mixed_requests(domains, kind);
            for (h, p) in &reqs {
                let m = t.lookup(Some(h), p, &facts).expect("every request matches");
                let conditioned = m.route.conditions.is_some();
                assert_eq!(conditioned, kind == "header-hit", "{kind} {h}{p}");
            }
            let mut n = 0usize;
            group.bench_function(format!("{hosts}/{kind}"), |b| {
                b.iter(|| {
                    let (h, p) = &reqs[n & 1023];
                    n = n.wrapping_add(1);
                    black_box(t.lookup(Some(black_box(h.as_str())), black_box(p.as_str()), &facts))
                        .map(|m| m.route.order)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, lookup, lookup_mixed);
criterion_main!(benches);
