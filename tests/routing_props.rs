//! Property test: the indexed route table answers exactly as the linear reference
//! matcher does, for any set of rules and any request — Ingress rules (one-label
//! wildcards, Exact/Prefix paths) and Gateway API rules (suffix wildcards, regular
//! expressions, method and header conditions) in one table.
//!
//! Hosts, paths and requests come from small alphabets so that rules collide, share
//! prefixes and differ only by a trailing slash or a brace, which is where a radix tree
//! or an index can drift from the obvious definition.

use proptest::prelude::*;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use portcullis::model::{
    Conditions, HeaderCondition, HostPattern, ListenerKind, ObjectRef, PathRule, PathType,
    RequestFacts, Route, RouteKind, RouteMatch, RouteSource, RouteTable, ValueMatch,
    reference_lookup,
};

/// Rule hosts: exact, one-label wildcard, or none. Few names, so that an exact host,
/// a wildcard covering it and a host-less rule often meet in one request.
fn rule_host() -> impl Strategy<Value = HostPattern> {
    prop_oneof![
        1 => Just(HostPattern::Any),
        2 => prop::sample::select(vec!["a.x", "b.x", "a.a.x", "x"])
            .prop_map(|h| HostPattern::Exact(h.to_string())),
        2 => prop::sample::select(vec!["x", "a.x"]).prop_map(|s| HostPattern::Wildcard(s.to_string())),
        1 => prop::sample::select(vec!["x", "a.x"]).prop_map(|s| HostPattern::Suffix(s.to_string())),
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
        Some("a..x"),
        Some("b.a..x"),
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
        PathType::RegularExpression,
    ])
}

/// Conditions: none most of the time, else a method, a header, or both.
fn conditions() -> impl Strategy<Value = Option<(Option<bool>, Option<&'static str>)>> {
    prop_oneof![
        3 => Just(None),
        2 => (
            prop::option::of(any::<bool>()),
            prop::option::of(prop::sample::select(vec!["1", "2"])),
        )
            .prop_map(Some),
    ]
}

/// A request path derived from a rule path (the rule path itself, one element more or
/// less, a suffix without a separator, a trailing slash), or an unrelated one.
fn request_path(rules: &[(HostPattern, String, PathType)]) -> BoxedStrategy<String> {
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
        .map(|(i, (host, path, pt, cond))| {
            let path = if *pt == PathType::RegularExpression {
                // The path as a pattern (regex syntax escaped, except that its dots match
                // any character); a trailing `.*` on every other rule makes it a prefix
                // of sorts.
                let escaped: String = path
                    .chars()
                    .flat_map(|c| {
                        let special = "\\+*?()|[]{}^$".contains(c);
                        special.then_some('\\').into_iter().chain([c])
                    })
                    .collect();
                let pattern = if i % 2 == 0 {
                    format!("{escaped}.*")
                } else {
                    escaped
                };
                PathRule::regex(&pattern).expect("generated patterns compile")
            } else {
                PathRule::new(path, *pt).expect("generated paths start with `/`")
            };
            let mut route = Route::forward(
                host.clone(),
                path,
                // Several rules per object, so that identity is (object, rule).
                RouteSource {
                    kind: if cond.is_some() {
                        RouteKind::HttpRoute
                    } else {
                        RouteKind::Ingress
                    },
                    object: ObjectRef::new("ns", format!("obj{}", i / 3)),
                    rule: i % 3,
                    match_index: 0,
                },
                i as u32,
            );
            route.order = i as u32;
            route.conditions = cond.map(|(post, header)| {
                Box::new(Conditions {
                    method: post.map(|p| if p { Method::POST } else { Method::GET }),
                    headers: header
                        .map(|v| HeaderCondition {
                            name: HeaderName::from_static("x-a"),
                            value: ValueMatch::Exact(v.to_string()),
                        })
                        .into_iter()
                        .collect(),
                    query: Vec::new(),
                    // Some conditioned routes exist on one listener only.
                    listener: match i % 4 {
                        1 => Some(ListenerKind::Http),
                        3 => Some(ListenerKind::Https),
                        _ => None,
                    },
                })
            });
            route
        })
        .collect()
}

fn identity(m: Option<RouteMatch<'_>>) -> Option<(ObjectRef, usize, u32, String)> {
    m.map(|m| {
        (
            m.route.source.object.clone(),
            m.route.source.rule,
            m.route.order,
            m.host_match.to_string(),
        )
    })
}

/// A rule: host, path as written, path type, and conditions (method POST or GET, and
/// header `x-a` value).
type Rule = (
    HostPattern,
    String,
    PathType,
    Option<(Option<bool>, Option<&'static str>)>,
);
/// A request: host (if any), path, POST (else GET), and its `x-a` header.
type Request = (Option<String>, String, bool, Option<&'static str>);

fn scenario() -> impl Strategy<Value = (Vec<Rule>, Vec<Request>)> {
    prop::collection::vec((rule_host(), path(), path_type(), conditions()), 0..12).prop_flat_map(
        |rules| {
            let plain: Vec<(HostPattern, String, PathType)> = rules
                .iter()
                .map(|(h, p, t, _)| (h.clone(), p.clone(), *t))
                .collect();
            let requests = prop::collection::vec(
                (
                    request_host(),
                    request_path(&plain),
                    any::<bool>(),
                    prop::option::of(prop::sample::select(vec!["1", "2"])),
                ),
                1..16,
            );
            (Just(rules), requests)
        },
    )
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
        for (host, path, post, header) in &requests {
            let mut headers = HeaderMap::new();
            if let Some(v) = header {
                headers.insert("x-a", HeaderValue::from_static(v));
            }
            let method = if *post { Method::POST } else { Method::GET };
            // Every other request arrives over TLS.
            let listener = if path.len() % 2 == 0 { ListenerKind::Https } else { ListenerKind::Http };
            let facts = RequestFacts { method: &method, headers: &headers, query: None, listener };
            let want = identity(reference_lookup(&routes, host.as_deref(), path, &facts));
            for (name, t) in [("default", &table), ("scanned", &scanned), ("hashed", &hashed)] {
                let got = identity(t.lookup(host.as_deref(), path, &facts));
                prop_assert_eq!(
                    &got, &want,
                    "{} table: host {:?} path {:?} post {} x-a {:?}",
                    name, host, path, post, header
                );
            }
        }
    }
}
