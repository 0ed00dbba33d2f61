//! Route lookup latency: `RouteTable::lookup` with 10, 1,000 and 10,000 virtual hosts.
//!
//! Each size has a mix of exact hosts, one-label wildcards and a host-less virtual host,
//! with Prefix paths 1–5 elements deep and a few Exact paths. Requests hit an exact
//! virtual host, a wildcard one, or fall through from an exact virtual host (no path
//! matches there) to its wildcard and to the host-less routes.
//!
//! `cargo bench --bench routing -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

use portcullis::model::{
    HostPattern, ObjectRef, PathRule, PathType, RequestFacts, Route, RouteKind, RouteSource,
    RouteTable,
};

const SEGMENTS: [&str; 5] = ["api", "v1", "users", "items", "detail"];

/// Routes for `hosts` virtual hosts: for domain `i`, an exact host `www.d{i}.com` with
/// Prefix paths of depth 1–5 and an Exact `/healthz`; every third domain also a wildcard
/// `*.d{i}.com` with `/static` and `/assets/img`; plus one host-less virtual host.
fn table(hosts: usize) -> RouteTable {
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
    let mut made = 0;
    let mut i = 0;
    while made < hosts {
        let exact = HostPattern::Exact(format!("www.d{i}.com"));
        let depth = 1 + i % 5;
        for d in 1..=depth {
            let path = format!("/{}", SEGMENTS[..d].join("/"));
            push(exact.clone(), &path, PathType::Prefix, &mut routes);
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
        let t = table(hosts);
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

criterion_group!(benches, lookup);
criterion_main!(benches);
