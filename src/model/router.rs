//! The route table: virtual hosts by host name, and one path index per virtual host.
//!
//! Lookup is tiered, most specific host first: the exact virtual host (a hash lookup),
//! then the wildcard virtual hosts from the longest suffix to the shortest (one hash
//! lookup each; an Ingress wildcard covers one label, so only the first suffix can
//! hold its routes, and the shorter ones are probed only when some Gateway API wildcard
//! exists), then the host-less one. The first tier whose routes match wins, which is
//! the same answer as taking the maximum [`Precedence`] over every matching route, since
//! host specificity is compared first.
//!
//! Within a virtual host every route's precedence is fixed (the host part is the same
//! for all of them), so the best match is the first matching route in precedence order:
//! - a virtual host with few routes keeps its match keys in one contiguous buffer, sorted
//!   best first, and scans them;
//! - a larger one keeps, per match key, the best Exact and the best Prefix route in a
//!   hash map, and probes the only keys that can match a request path, longest first:
//!   the whole path, then the path cut before each `/` from the right (a Prefix key never
//!   ends in `/`, and `/` itself is the empty key). Lengths strictly decrease along the
//!   probes, so the first hit is the longest match; Exact is probed before Prefix on the
//!   whole path, the only probe where both can match.
//!
//! A route with method, header or query conditions is a candidate like any other; when
//! its conditions fail, the next candidate in precedence order is tried (in the hash
//! index, routes of one key and type form a chain, best first, ending at the first
//! route without conditions). Path-only routes are flagged in the index itself, so a
//! table without conditions never reads a route to decide. Regular-expression paths
//! rank below every exact and prefix path and are tried last, in precedence order.
//!
//! Nothing here allocates, decodes or normalises; there is no router syntax, so `{`,
//! `}`, `*` and `:` in paths are plain characters.
//!
//! [`reference_lookup`] is the obviously-correct linear matcher that property tests
//! compare against.

use std::cmp::Reverse;

use foldhash::HashMap;

use super::matching::{HostMatch, HostPattern};
use super::route::{RequestFacts, Route};

/// Virtual hosts with at most this many routes are scanned; larger ones are hashed.
pub const SCAN_LIMIT: usize = 8;

/// No route, in the `u32` slots of [`KeyRoutes`] and chains.
const NONE: u32 = u32::MAX;

/// Set on a route index whose route has conditions to check.
const CONDITIONAL: u32 = 1 << 31;

/// The heads of the Exact and the Prefix chains for one match key.
#[derive(Debug, Clone, Copy)]
struct KeyRoutes {
    exact: u32,
    prefix: u32,
}

/// One route in a scanned virtual host: its match key as a range of the shared buffer.
#[derive(Debug, Clone, Copy)]
struct ScanEntry {
    start: u32,
    len: u32,
    exact: bool,
    /// Route index, with [`CONDITIONAL`] set when it has conditions.
    route: u32,
}

#[derive(Debug)]
enum PathIndex {
    /// Entries best first; the first that matches (path and conditions) wins.
    Scan {
        keys: Box<str>,
        entries: Box<[ScanEntry]>,
    },
    /// Match key → chain heads; `next[i]` follows route `i` in its chain.
    Hash {
        map: HashMap<Box<str>, KeyRoutes>,
        next: Box<[u32]>,
    },
}

/// A route index tagged with [`CONDITIONAL`] when the route has conditions.
fn tagged(routes: &[Route], i: usize) -> u32 {
    let i = i as u32;
    if routes[i as usize].conditions.is_some() {
        i | CONDITIONAL
    } else {
        i
    }
}

impl PathIndex {
    /// An index over `members` (indices into `routes`, none of them regex routes).
    fn scan(routes: &[Route], members: &[u32]) -> PathIndex {
        let mut keys = String::with_capacity(
            members
                .iter()
                .map(|&i| routes[i as usize].path.key.len())
                .sum(),
        );
        let mut entries = Vec::with_capacity(members.len());
        for &i in members {
            let route = &routes[i as usize];
            let start = keys.len() as u32;
            keys.push_str(&route.path.key);
            entries.push(ScanEntry {
                start,
                len: route.path.key.len() as u32,
                exact: route.path.path_type.is_exact(),
                route: tagged(routes, i as usize),
            });
        }
        // Precedence within one virtual host: the host part is equal for all routes.
        entries.sort_by_key(|e| {
            Reverse(routes[(e.route & !CONDITIONAL) as usize].precedence(HostMatch::Any))
        });
        PathIndex::Scan {
            keys: keys.into_boxed_str(),
            entries: entries.into_boxed_slice(),
        }
    }

    fn hash(routes: &[Route], members: &[u32]) -> PathIndex {
        // Per (key, exact): the routes best first, cut after the first one without
        // conditions (nothing behind it can ever be chosen).
        let mut groups: HashMap<(&str, bool), Vec<u32>> = HashMap::default();
        for &i in members {
            let route = &routes[i as usize];
            groups
                .entry((route.path.key.as_str(), route.path.path_type.is_exact()))
                .or_default()
                .push(i);
        }
        let mut map: HashMap<Box<str>, KeyRoutes> = HashMap::default();
        let mut next = vec![NONE; routes.len()].into_boxed_slice();
        for ((key, exact), mut group) in groups {
            group.sort_by_key(|&i| Reverse(routes[i as usize].precedence(HostMatch::Any)));
            if let Some(end) = group
                .iter()
                .position(|&i| routes[i as usize].conditions.is_none())
            {
                group.truncate(end + 1);
            }
            for pair in group.windows(2) {
                next[pair[0] as usize] = tagged(routes, pair[1] as usize);
            }
            let slot = map.entry(key.into()).or_insert(KeyRoutes {
                exact: NONE,
                prefix: NONE,
            });
            let head = tagged(routes, group[0] as usize);
            if exact {
                slot.exact = head;
            } else {
                slot.prefix = head;
            }
        }
        PathIndex::Hash { map, next }
    }

    fn new(routes: &[Route], members: &[u32], scan_limit: usize) -> PathIndex {
        if members.len() <= scan_limit {
            PathIndex::scan(routes, members)
        } else {
            PathIndex::hash(routes, members)
        }
    }

    /// The index of the best route matching a request.
    #[inline]
    fn lookup(&self, routes: &[Route], path: &str, req: &RequestFacts<'_>) -> Option<u32> {
        match self {
            PathIndex::Scan { keys, entries } => entries
                .iter()
                .find(|e| {
                    let key = &keys[e.start as usize..(e.start + e.len) as usize];
                    let path_ok = if e.exact {
                        path == key
                    } else {
                        prefix_matches(key, path)
                    };
                    path_ok && admits(routes, e.route, req)
                })
                .map(|e| e.route & !CONDITIONAL),
            PathIndex::Hash { map, next } => {
                if let Some(k) = map.get(path) {
                    if let Some(i) = follow(routes, next, k.exact, req) {
                        return Some(i);
                    }
                    if let Some(i) = follow(routes, next, k.prefix, req) {
                        return Some(i);
                    }
                }
                let bytes = path.as_bytes();
                let mut end = bytes.len();
                while let Some(i) = bytes[..end].iter().rposition(|&b| b == b'/') {
                    end = i;
                    // A Prefix key never ends in `/` (it is trimmed when the rule is made).
                    if i > 0 && bytes[i - 1] == b'/' {
                        continue;
                    }
                    if let Some(k) = map.get(&path[..i])
                        && let Some(r) = follow(routes, next, k.prefix, req)
                    {
                        return Some(r);
                    }
                }
                None
            }
        }
    }
}

/// Whether the route at a tagged index admits the request; untagged ones always do.
#[inline]
fn admits(routes: &[Route], tagged: u32, req: &RequestFacts<'_>) -> bool {
    tagged & CONDITIONAL == 0 || routes[(tagged & !CONDITIONAL) as usize].admits(req)
}

/// The first route along a chain that admits the request.
#[inline]
fn follow(routes: &[Route], next: &[u32], mut at: u32, req: &RequestFacts<'_>) -> Option<u32> {
    while at != NONE {
        if admits(routes, at, req) {
            return Some(at & !CONDITIONAL);
        }
        at = next[(at & !CONDITIONAL) as usize];
    }
    None
}

/// Prefix matching on a trimmed key: the whole path, or the key followed by `/`.
#[inline]
fn prefix_matches(key: &str, path: &str) -> bool {
    match path.strip_prefix(key) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// One set of routes indexed for lookup: literal paths in a [`PathIndex`], regular
/// expressions in precedence order.
#[derive(Debug)]
struct RouteSet {
    paths: PathIndex,
    regex: Box<[u32]>,
}

impl RouteSet {
    fn new(routes: &[Route], members: impl Iterator<Item = u32>, scan_limit: usize) -> RouteSet {
        let (mut regex, literal): (Vec<u32>, Vec<u32>) =
            members.partition(|&i| routes[i as usize].path.is_regex());
        regex.sort_by_key(|&i| Reverse(routes[i as usize].precedence(HostMatch::Any)));
        RouteSet {
            paths: PathIndex::new(routes, &literal, scan_limit),
            regex: regex.into_boxed_slice(),
        }
    }

    #[inline]
    fn lookup(&self, routes: &[Route], path: &str, req: &RequestFacts<'_>) -> Option<u32> {
        if let Some(i) = self.paths.lookup(routes, path, req) {
            return Some(i);
        }
        self.regex.iter().copied().find(|&i| {
            let r = &routes[i as usize];
            r.path.matches(path) && r.admits(req)
        })
    }
}

/// The routes for one host pattern. A wildcard virtual host holds the Ingress
/// (one-label) and the Gateway API (any depth) routes of its suffix together, since
/// they rank the same.
#[derive(Debug)]
pub struct VirtualHost {
    pub host: HostPattern,
    /// Routes in age order.
    pub routes: Vec<Route>,
    /// Every route, for a host one label longer than the suffix (or the exact or
    /// absent host).
    all: RouteSet,
    /// The Gateway API wildcard routes alone, for hosts two or more labels longer than
    /// the suffix; `None` when there are none.
    deep: Option<RouteSet>,
}

impl VirtualHost {
    fn new(host: HostPattern, routes: Vec<Route>, scan_limit: usize) -> VirtualHost {
        let all = RouteSet::new(&routes, 0..routes.len() as u32, scan_limit);
        let suffix_routes = routes
            .iter()
            .filter(|r| matches!(r.host, HostPattern::Suffix(_)))
            .count();
        let deep = (suffix_routes > 0).then(|| {
            RouteSet::new(
                &routes,
                (0..routes.len() as u32)
                    .filter(|&i| matches!(routes[i as usize].host, HostPattern::Suffix(_))),
                scan_limit,
            )
        });
        VirtualHost {
            host,
            routes,
            all,
            deep,
        }
    }

    /// The best route of this virtual host for a request path and request.
    pub fn lookup(&self, path: &str, req: &RequestFacts<'_>) -> Option<&Route> {
        let i = self.all.lookup(&self.routes, path, req)?;
        self.routes.get(i as usize)
    }

    /// The best Gateway API wildcard route, for a host more than one label longer than
    /// this virtual host's suffix.
    fn lookup_deep(&self, path: &str, req: &RequestFacts<'_>) -> Option<&Route> {
        let i = self.deep.as_ref()?.lookup(&self.routes, path, req)?;
        self.routes.get(i as usize)
    }
}

/// A matched route and how its host matched.
#[derive(Debug, Clone, Copy)]
pub struct RouteMatch<'a> {
    pub route: &'a Route,
    pub host_match: HostMatch,
}

/// All virtual hosts, indexed for lookup.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub vhosts: Vec<VirtualHost>,
    exact: HashMap<Box<str>, u32>,
    /// Wildcard virtual hosts by suffix.
    wildcard: HashMap<Box<str>, u32>,
    /// Whether any wildcard virtual host has Gateway API (any depth) routes.
    deep: bool,
    /// The most labels of a wildcard suffix with Gateway API routes: shorter host
    /// suffixes are the only ones worth probing.
    deep_labels: usize,
    any: Option<u32>,
}

impl RouteTable {
    /// Builds the table from routes. Returns the routes that could not be entered,
    /// with the reason (none today: every valid [`super::PathRule`] can be indexed).
    pub fn build(routes: Vec<Route>) -> (RouteTable, Vec<(Route, String)>) {
        (
            RouteTable::build_with_scan_limit(routes, SCAN_LIMIT),
            Vec::new(),
        )
    }

    /// [`RouteTable::build`] with another threshold between scanned and hashed virtual
    /// hosts, so that tests can exercise both indexes on the same routes.
    #[doc(hidden)]
    pub fn build_with_scan_limit(routes: Vec<Route>, scan_limit: usize) -> RouteTable {
        // Group by virtual host (routes keep their order inside a group), then order the
        // groups by host so that the table's layout does not depend on hashing.
        let keys: Vec<HostPattern> = routes.iter().map(|r| r.host.vhost_key()).collect();
        let mut group_of: HashMap<&HostPattern, u32> = HashMap::default();
        let slots: Vec<u32> = keys
            .iter()
            .map(|k| {
                let next = group_of.len() as u32;
                *group_of.entry(k).or_insert(next)
            })
            .collect();
        let mut group_keys: Vec<Option<HostPattern>> = vec![None; group_of.len()];
        for (k, &g) in &group_of {
            group_keys[g as usize] = Some((*k).clone());
        }
        let mut counts = vec![0usize; group_of.len()];
        for &g in &slots {
            counts[g as usize] += 1;
        }
        drop(group_of);
        let mut groups: Vec<(HostPattern, Vec<Route>)> = counts
            .into_iter()
            .zip(group_keys)
            .map(|(n, k)| (k.unwrap_or(HostPattern::Any), Vec::with_capacity(n)))
            .collect();
        for (route, g) in routes.into_iter().zip(slots) {
            groups[g as usize].1.push(route);
        }
        for (_, g) in &mut groups {
            g.sort_by_key(|r| r.order);
        }
        groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut table = RouteTable {
            vhosts: Vec::with_capacity(groups.len()),
            exact: HashMap::with_capacity_and_hasher(groups.len(), Default::default()),
            ..RouteTable::default()
        };
        for (host, routes) in groups {
            let idx = table.vhosts.len() as u32;
            match &host {
                HostPattern::Any => table.any = Some(idx),
                HostPattern::Exact(h) => {
                    table.exact.insert(h.as_str().into(), idx);
                }
                HostPattern::Wildcard(s) | HostPattern::Suffix(s) => {
                    table.wildcard.insert(s.as_str().into(), idx);
                }
            }
            let vhost = VirtualHost::new(host, routes, scan_limit);
            if vhost.deep.is_some() {
                table.deep = true;
                let labels = vhost.host.suffix_labels();
                table.deep_labels = table.deep_labels.max(labels);
            }
            table.vhosts.push(vhost);
        }
        table
    }

    /// The winning route for a normalised request host (or none), a request path and
    /// the rest of the request.
    pub fn lookup(
        &self,
        host: Option<&str>,
        path: &str,
        req: &RequestFacts<'_>,
    ) -> Option<RouteMatch<'_>> {
        if let Some(host) = host {
            if let Some(&i) = self.exact.get(host)
                && let Some(route) = self.vhosts[i as usize].lookup(path, req)
            {
                return Some(RouteMatch {
                    route,
                    host_match: HostMatch::Exact,
                });
            }
            if let Some((label, suffix)) = host.split_once('.')
                && !label.is_empty()
            {
                if let Some(&i) = self.wildcard.get(suffix)
                    && let Some(route) = self.vhosts[i as usize].lookup(path, req)
                {
                    return Some(RouteMatch {
                        route,
                        host_match: HostMatch::Wildcard,
                    });
                }
                if self.deep {
                    let mut rest = suffix;
                    let mut labels = suffix.bytes().filter(|&b| b == b'.').count() + 1;
                    while let Some((label, suffix)) = rest.split_once('.') {
                        if label.is_empty() {
                            break;
                        }
                        labels -= 1;
                        if labels <= self.deep_labels
                            && let Some(&i) = self.wildcard.get(suffix)
                            && let Some(route) = self.vhosts[i as usize].lookup_deep(path, req)
                        {
                            return Some(RouteMatch {
                                route,
                                host_match: HostMatch::Wildcard,
                            });
                        }
                        rest = suffix;
                    }
                }
            }
        }
        let i = self.any?;
        let route = self.vhosts[i as usize].lookup(path, req)?;
        Some(RouteMatch {
            route,
            host_match: HostMatch::Any,
        })
    }

    /// Every route of every virtual host.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.vhosts.iter().flat_map(|v| v.routes.iter())
    }
}

/// The reference matcher: the maximum precedence over every route whose host, path and
/// conditions match. Linear and obviously correct; used by tests to check
/// [`RouteTable::lookup`].
pub fn reference_lookup<'a>(
    routes: &'a [Route],
    host: Option<&str>,
    path: &str,
    req: &RequestFacts<'_>,
) -> Option<RouteMatch<'a>> {
    routes
        .iter()
        .filter_map(|r| {
            let hm = match host {
                Some(h) => r.host.matches(h)?,
                None if r.host == HostPattern::Any => HostMatch::Any,
                None => return None,
            };
            (r.path.matches(path) && r.admits(req)).then_some((r.precedence(hm), hm, r))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, host_match, route)| RouteMatch { route, host_match })
}
