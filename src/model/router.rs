//! The route table: virtual hosts by host name, and one path router per virtual host.
//!
//! Lookup is tiered: the exact virtual host (a hash lookup), then the one-label wildcard
//! virtual host (a hash lookup on the host without its first label), then the host-less
//! one. The first tier whose routes match the path wins, which is the same answer as
//! taking the maximum [`Precedence`] over every matching route, since host specificity
//! is compared first. Within a virtual host, paths are matched by a `matchit` radix tree
//! in which each Prefix rule is entered as its path, its path + `/` and its path +
//! `/{*rest}`; the tree prefers longer static matches and backtracks to shorter
//! catch-alls, which is exactly "longest path wins". Where several routes share a tree
//! entry, the entry holds the one with the highest precedence.
//!
//! [`reference_lookup`] is the obviously-correct linear matcher that property tests
//! compare against.

use std::cmp::Reverse;
use std::collections::HashMap;

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

/// The routes for one host pattern.
#[derive(Debug)]
pub struct VirtualHost {
    pub host: HostPattern,
    /// Routes in age order.
    pub routes: Vec<Route>,
    paths: matchit::Router<u32>,
}

impl VirtualHost {
    /// Builds the path router. Fails only if the radix tree refuses an entry, which
    /// would be a bug in the escaping below; the caller reports it as a diagnostic.
    fn new(host: HostPattern, routes: Vec<Route>) -> Result<VirtualHost, String> {
        let kind = host.kind();
        let mut best: HashMap<String, u32> = HashMap::new();
        for (i, route) in routes.iter().enumerate() {
            let escaped = escape(&route.path.key);
            let keys = if route.path.path_type.is_exact() {
                vec![escaped]
            } else if escaped.is_empty() {
                vec!["/".to_string(), "/{*rest}".to_string()]
            } else {
                vec![
                    format!("{escaped}/{{*rest}}"),
                    format!("{escaped}/"),
                    escaped,
                ]
            };
            for key in keys {
                let idx = i as u32;
                best.entry(key)
                    .and_modify(|cur| {
                        if route.precedence(kind) > routes[*cur as usize].precedence(kind) {
                            *cur = idx;
                        }
                    })
                    .or_insert(idx);
            }
        }
        let mut paths = matchit::Router::new();
        for (key, idx) in best {
            paths
                .insert(key.clone(), idx)
                .map_err(|e| format!("path router refused `{key}`: {e}"))?;
        }
        Ok(VirtualHost {
            host,
            routes,
            paths,
        })
    }

    /// The best route of this virtual host for a request path.
    pub fn lookup(&self, path: &str) -> Option<&Route> {
        let m = self.paths.at(path).ok()?;
        self.routes.get(*m.value as usize)
    }
}

fn escape(path: &str) -> String {
    if path.contains(['{', '}']) {
        path.replace('{', "{{").replace('}', "}}")
    } else {
        path.to_string()
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
    /// entered, with the reason.
    pub fn build(routes: Vec<Route>) -> (RouteTable, Vec<(Route, String)>) {
        let mut by_host: HashMap<HostPattern, Vec<Route>> = HashMap::new();
        for r in routes {
            by_host.entry(r.host.clone()).or_default().push(r);
        }
        let mut hosts: Vec<_> = by_host.into_iter().collect();
        hosts.sort_by(|a, b| a.0.cmp(&b.0));
        let mut table = RouteTable::default();
        let mut failed = Vec::new();
        for (host, routes) in hosts {
            let vh = match VirtualHost::new(host.clone(), routes.clone()) {
                Ok(vh) => vh,
                Err(reason) => {
                    failed.extend(routes.into_iter().map(|r| (r, reason.clone())));
                    continue;
                }
            };
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
            table.vhosts.push(vh);
        }
        (table, failed)
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
