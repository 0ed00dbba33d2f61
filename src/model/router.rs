//! The route table: virtual hosts by host name, and one path index per virtual host.
//!
//! Lookup is tiered: the exact virtual host (a hash lookup), then the one-label wildcard
//! virtual host (a hash lookup on the host without its first label), then the host-less
//! one. The first tier whose routes match the path wins, which is the same answer as
//! taking the maximum [`Precedence`] over every matching route, since host specificity
//! is compared first.
//!
//! Within a virtual host every route's precedence is fixed (the host part is the same
//! for all of them), so the best match is the first matching route in precedence order:
//! - a virtual host with few routes keeps its match keys in one contiguous buffer, sorted
//!   best first, and scans them;
//! - a larger one keeps the best Exact and the best Prefix route per match key in a hash
//!   map, and probes the only keys that can match a request path, longest first: the
//!   whole path, then the path cut before each `/` from the right (a Prefix key never
//!   ends in `/`, and `/` itself is the empty key). Lengths strictly decrease along the
//!   probes, so the first hit is the longest match; Exact is probed before Prefix on the
//!   whole path, the only probe where both can match.
//!
//! Neither does allocation, decoding or normalisation; there is no router syntax, so
//! `{`, `}`, `*` and `:` in paths are plain characters.
//!
//! [`reference_lookup`] is the obviously-correct linear matcher that property tests
//! compare against.

use std::cmp::Reverse;

use foldhash::HashMap;

use super::matching::{HostMatch, HostPattern, PathRule, Precedence};
use super::{ClusterId, ObjectRef};

/// One path of one Ingress rule.
#[derive(Debug, Clone)]
pub struct Route {
    pub host: HostPattern,
    pub path: PathRule,
    /// The Ingress this route came from.
    pub ingress: ObjectRef,
    pub rule_index: usize,
    pub path_index: usize,
    /// Position in age order (oldest Ingress first, then rule, then path): lower wins ties.
    pub order: u32,
    pub cluster: ClusterId,
    /// The request body limit of this route's Ingress (`portcullis.io/max-body-size`);
    /// `None` leaves the proxy's global limit in force.
    pub max_body_size: Option<u64>,
}

impl Route {
    /// The precedence of this route for a request whose host matched as `host`.
    pub fn precedence(&self, host: HostMatch) -> Precedence {
        Precedence {
            host,
            length: self.path.length(),
            exact: self.path.path_type.is_exact(),
            order: Reverse(self.order),
        }
    }
}

/// Virtual hosts with at most this many routes are scanned; larger ones are hashed.
pub const SCAN_LIMIT: usize = 8;

/// No route, in the `u32` slots of [`KeyRoutes`].
const NONE: u32 = u32::MAX;

/// The best Exact and the best Prefix route (indices into the routes) for one match key.
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
    route: u32,
}

#[derive(Debug)]
enum PathIndex {
    /// Entries best first; the first that matches wins.
    Scan {
        keys: Box<str>,
        entries: Box<[ScanEntry]>,
    },
    /// Match key → best routes for it.
    Hash(HashMap<Box<str>, KeyRoutes>),
}

impl PathIndex {
    fn scan(routes: &[Route]) -> PathIndex {
        let mut keys = String::with_capacity(routes.iter().map(|r| r.path.key.len()).sum());
        let mut entries = Vec::with_capacity(routes.len());
        for (i, route) in routes.iter().enumerate() {
            let start = keys.len() as u32;
            keys.push_str(&route.path.key);
            entries.push(ScanEntry {
                start,
                len: route.path.key.len() as u32,
                exact: route.path.path_type.is_exact(),
                route: i as u32,
            });
        }
        // Precedence within one virtual host: the host part is equal for all routes.
        entries.sort_by_key(|e| Reverse(routes[e.route as usize].precedence(HostMatch::Any)));
        PathIndex::Scan {
            keys: keys.into_boxed_str(),
            entries: entries.into_boxed_slice(),
        }
    }

    fn hash(routes: &[Route]) -> PathIndex {
        let mut map: HashMap<Box<str>, KeyRoutes> = HashMap::default();
        for (i, route) in routes.iter().enumerate() {
            let slot = map
                .entry(route.path.key.as_str().into())
                .or_insert(KeyRoutes {
                    exact: NONE,
                    prefix: NONE,
                });
            let cur = if route.path.path_type.is_exact() {
                &mut slot.exact
            } else {
                &mut slot.prefix
            };
            // Same key and type: the older route wins.
            if *cur == NONE || route.order < routes[*cur as usize].order {
                *cur = i as u32;
            }
        }
        PathIndex::Hash(map)
    }

    /// The index of the best route matching a request path.
    fn lookup(&self, path: &str) -> Option<u32> {
        match self {
            PathIndex::Scan { keys, entries } => entries
                .iter()
                .find(|e| {
                    let key = &keys[e.start as usize..(e.start + e.len) as usize];
                    if e.exact {
                        path == key
                    } else {
                        prefix_matches(key, path)
                    }
                })
                .map(|e| e.route),
            PathIndex::Hash(map) => {
                if let Some(k) = map.get(path) {
                    if k.exact != NONE {
                        return Some(k.exact);
                    }
                    if k.prefix != NONE {
                        return Some(k.prefix);
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
                        && k.prefix != NONE
                    {
                        return Some(k.prefix);
                    }
                }
                None
            }
        }
    }
}

/// Prefix matching on a trimmed key: the whole path, or the key followed by `/`.
#[inline]
fn prefix_matches(key: &str, path: &str) -> bool {
    match path.strip_prefix(key) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The routes for one host pattern.
#[derive(Debug)]
pub struct VirtualHost {
    pub host: HostPattern,
    /// Routes in age order.
    pub routes: Vec<Route>,
    paths: PathIndex,
}

impl VirtualHost {
    fn new(host: HostPattern, routes: Vec<Route>, scan_limit: usize) -> VirtualHost {
        let paths = if routes.len() <= scan_limit {
            PathIndex::scan(&routes)
        } else {
            PathIndex::hash(&routes)
        };
        VirtualHost {
            host,
            routes,
            paths,
        }
    }

    /// The best route of this virtual host for a request path.
    pub fn lookup(&self, path: &str) -> Option<&Route> {
        let i = self.paths.lookup(path)?;
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
    wildcard: HashMap<Box<str>, u32>,
    any: Option<u32>,
}

impl RouteTable {
    /// Builds the table from routes in age order. Returns the routes that could not be
    /// entered, with the reason (none today: every valid [`PathRule`] can be indexed).
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
        // Group by host (routes keep their age order inside a group), then order the
        // groups by host so that the table's layout does not depend on hashing.
        let mut group_of: HashMap<&HostPattern, u32> = HashMap::default();
        let slots: Vec<u32> = routes
            .iter()
            .map(|r| {
                let next = group_of.len() as u32;
                *group_of.entry(&r.host).or_insert(next)
            })
            .collect();
        let mut counts = vec![0usize; group_of.len()];
        for &g in &slots {
            counts[g as usize] += 1;
        }
        drop(group_of);
        let mut groups: Vec<Vec<Route>> = counts.into_iter().map(Vec::with_capacity).collect();
        for (route, g) in routes.into_iter().zip(slots) {
            groups[g as usize].push(route);
        }
        for g in &mut groups {
            g.sort_by_key(|r| r.order);
        }
        groups.sort_unstable_by(|a, b| a[0].host.cmp(&b[0].host));
        let hosts = groups.into_iter().map(|g| (g[0].host.clone(), g));
        let mut table = RouteTable {
            vhosts: Vec::with_capacity(hosts.len()),
            exact: HashMap::with_capacity_and_hasher(hosts.len(), Default::default()),
            ..RouteTable::default()
        };
        for (host, routes) in hosts {
            let idx = table.vhosts.len() as u32;
            match &host {
                HostPattern::Any => table.any = Some(idx),
                HostPattern::Exact(h) => {
                    table.exact.insert(h.as_str().into(), idx);
                }
                HostPattern::Wildcard(s) => {
                    table.wildcard.insert(s.as_str().into(), idx);
                }
            }
            table
                .vhosts
                .push(VirtualHost::new(host, routes, scan_limit));
        }
        table
    }

    /// The winning route for a normalised request host (or none) and a request path.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<RouteMatch<'_>> {
        if let Some(host) = host {
            if let Some(&i) = self.exact.get(host)
                && let Some(route) = self.vhosts[i as usize].lookup(path)
            {
                return Some(RouteMatch {
                    route,
                    host_match: HostMatch::Exact,
                });
            }
            if let Some((label, suffix)) = host.split_once('.')
                && !label.is_empty()
                && let Some(&i) = self.wildcard.get(suffix)
                && let Some(route) = self.vhosts[i as usize].lookup(path)
            {
                return Some(RouteMatch {
                    route,
                    host_match: HostMatch::Wildcard,
                });
            }
        }
        let i = self.any?;
        let route = self.vhosts[i as usize].lookup(path)?;
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

/// The reference matcher: the maximum precedence over every route whose host and path
/// match. Linear and obviously correct; used by tests to check [`RouteTable::lookup`].
pub fn reference_lookup<'a>(
    routes: &'a [Route],
    host: Option<&str>,
    path: &str,
) -> Option<RouteMatch<'a>> {
    routes
        .iter()
        .filter_map(|r| {
            let hm = match host {
                Some(h) => r.host.matches(h)?,
                None if r.host == HostPattern::Any => HostMatch::Any,
                None => return None,
            };
            r.path.matches(path).then_some((r.precedence(hm), hm, r))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, host_match, route)| RouteMatch { route, host_match })
}
