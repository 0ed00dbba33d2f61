//! Property test: the indexed route table answers exactly as the linear reference
//! matcher does, for any set of rules and any request.
//!
//! Hosts, paths and requests come from small alphabets so that rules collide, share
//! prefixes and differ only by a trailing slash or a brace, which is where a radix tree
//! or an index can drift from the obvious definition.

use proptest::prelude::*;

use portcullis::model::{
    HostPattern, ObjectRef, PathRule, PathType, Route, RouteMatch, RouteTable, reference_lookup,
};

/// Rule hosts: exact, one-label wildcard, or none. Few names, so that an exact host,
/// a wildcard covering it and a host-less rule often meet in one request.
fn rule_host() -> impl Strategy<Value = HostPattern> {
    prop_oneof![
        1 => Just(HostPattern::Any),
        2 => prop::sample::select(vec!["a.x", "b.x", "a.a.x", "x"])
            .prop_map(|h| HostPattern::Exact(h.to_string())),
        2 => prop::sample::select(vec!["x", "a.x"]).prop_map(|s| HostPattern::Wildcard(s.to_string())),
    ]
}

/// Request hosts: the rule hosts, names only a wildcard covers, names nothing covers
/// (two labels under a wildcard, the bare wildcard domain), and no host at all.
fn request_host() -> impl Strategy<Value = Option<String>> {
    prop::sample::select(vec![
        None,
        Some("a.x"),
        Some("b.x"),
        Some("c.x"),
        Some("a.a.x"),
        Some("b.a.x"),
        Some("c.b.x"),
        Some("x"),
        Some(".x"),
        Some("y"),
    ])
    .prop_map(|h| h.map(str::to_string))
}

/// One path element from an alphabet that includes common router syntax (`{x}`, `*`, `:x`),
/// which must stay plain characters.
fn segment() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "a", "b", "ab", "aa", "{", "}", "{a}", "{*a}", "*", ":a", "", "a.b",
    ])
}

/// A path: `/` + elements joined by `/`, maybe with a trailing slash.
fn path() -> impl Strategy<Value = String> {
    (prop::collection::vec(segment(), 0..4), any::<bool>()).prop_map(|(segs, trailing)| {
        let mut p = format!("/{}", segs.join("/"));
        if trailing && !p.ends_with('/') {
            p.push('/');
        }
        p
    })
}

fn path_type() -> impl Strategy<Value = PathType> {
    prop::sample::select(vec![
        PathType::Exact,
        PathType::Prefix,
        PathType::ImplementationSpecific,
    ])
}

/// A request path derived from a rule path (the rule path itself, one element more or
/// less, a suffix without a separator, a trailing slash), or an unrelated one.
fn request_path(rules: &[Rule]) -> BoxedStrategy<String> {
    let random = path().boxed();
    if rules.is_empty() {
        return random;
    }
    let paths: Vec<String> = rules.iter().map(|r| r.1.clone()).collect();
    let derived = (
        prop::sample::select(paths),
        prop::sample::select(vec![
            "", "/", "b", "/b", "/b/", "{", "/{", "}", "//", "/a/b",
        ]),
        any::<bool>(),
    )
        .prop_map(|(p, suffix, trim)| {
            let mut p = if trim {
                p.trim_end_matches('/').to_string()
            } else {
                p
            };
            p.push_str(suffix);
            if p.is_empty() { "/".to_string() } else { p }
        });
    prop_oneof![3 => derived, 1 => random].boxed()
}

fn routes_of(rules: &[Rule]) -> Vec<Route> {
    rules
        .iter()
        .enumerate()
        .map(|(i, (host, path, pt))| Route {
            host: host.clone(),
            path: PathRule::new(path, *pt).expect("generated paths start with `/`"),
            // Several rules per Ingress, so that identity is (ingress, rule, path).
            ingress: ObjectRef::new("ns", format!("ing{}", i / 3)),
            rule_index: i % 3,
            path_index: 0,
            order: i as u32,
            cluster: i as u32,
            max_body_size: None,
        })
        .collect()
}

fn identity(m: Option<RouteMatch<'_>>) -> Option<(ObjectRef, usize, u32, String)> {
    m.map(|m| {
        (
            m.route.ingress.clone(),
            m.route.rule_index,
            m.route.order,
            m.host_match.to_string(),
        )
    })
}

/// A rule: host, path as written, path type.
type Rule = (HostPattern, String, PathType);
/// A request: host (if any) and path.
type Request = (Option<String>, String);

fn scenario() -> impl Strategy<Value = (Vec<Rule>, Vec<Request>)> {
    prop::collection::vec((rule_host(), path(), path_type()), 0..12).prop_flat_map(|rules| {
        let requests = prop::collection::vec((request_host(), request_path(&rules)), 1..16);
        (Just(rules), requests)
    })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    // 2,000 cases by default; `PROPTEST_CASES` raises it for a longer search.
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn table_lookup_equals_reference((rules, requests) in scenario()) {
        let routes = routes_of(&rules);
        let (table, failed) = RouteTable::build(routes.clone());
        prop_assert!(failed.is_empty(), "routes refused by the table: {:?}", failed);
        // The same routes with every virtual host scanned, and with every one hashed.
        let scanned = RouteTable::build_with_scan_limit(routes.clone(), usize::MAX);
        let hashed = RouteTable::build_with_scan_limit(routes.clone(), 0);
        for (host, path) in &requests {
            let want = identity(reference_lookup(&routes, host.as_deref(), path));
            for (name, t) in [("default", &table), ("scanned", &scanned), ("hashed", &hashed)] {
                let got = identity(t.lookup(host.as_deref(), path));
                prop_assert_eq!(&got, &want, "{} table: host {:?} path {:?}", name, host, path);
            }
        }
    }
}
