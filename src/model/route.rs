//! The one route model every source kind translates into.
//!
//! A [`Route`] is where it came from ([`RouteSource`]), what it matches (a host pattern
//! and a path rule, plus optional [`Conditions`] on method, headers and query), what it
//! does ([`Action`]: forward to weighted backends, redirect, or answer itself), and the
//! [`Filters`] and [`Timeouts`] that apply on the way. Ingress rules, HTTPRoute rules
//! and (later) GRPCRoute rules and ingress-nginx annotations all become routes; the data
//! path knows nothing else.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use serde::Serialize;

use super::matching::{HostMatch, HostPattern, PathRule, Pattern, Precedence};
use super::path::hex;
use super::{ClusterId, ObjectRef};

/// The kind of object a route came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum RouteKind {
    Ingress,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
}

impl RouteKind {
    /// The Kubernetes kind, as metrics and diagnostics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Ingress => "Ingress",
            RouteKind::HttpRoute => "HTTPRoute",
            RouteKind::GrpcRoute => "GRPCRoute",
        }
    }
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a route came from: the object, the rule in it and the match in the rule
/// (for an Ingress, `spec.rules[rule].http.paths[match_index]`; for an HTTPRoute,
/// `spec.rules[rule].matches[match_index]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RouteSource {
    pub kind: RouteKind,
    #[serde(flatten)]
    pub object: ObjectRef,
    pub rule: usize,
    #[serde(rename = "match")]
    pub match_index: usize,
}

impl fmt::Display for RouteSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.object)
    }
}

/// How a header or query parameter value must look.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ValueMatch {
    Exact(String),
    Regex(Pattern),
}

impl ValueMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::Regex(p) => p.is_match(value),
        }
    }
}

impl fmt::Display for ValueMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueMatch::Exact(v) => write!(f, "= {v}"),
            ValueMatch::Regex(p) => write!(f, "~ {}", p.as_str()),
        }
    }
}

/// A request header condition; the name is compared without regard to case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HeaderCondition {
    pub name: HeaderName,
    pub value: ValueMatch,
}

/// A query parameter condition; the name is compared exactly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueryCondition {
    pub name: String,
    pub value: ValueMatch,
}

/// Which of our listeners a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    Http,
    Https,
}

/// What a request must have besides host and path; all conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Conditions {
    pub method: Option<Method>,
    pub headers: Vec<HeaderCondition>,
    pub query: Vec<QueryCondition>,
    /// The listener the route is served on; `None` for both. A Gateway API route is
    /// served only on the listeners of the Gateway listeners it attached to. Not part
    /// of precedence: it only says where a route exists.
    pub listener: Option<ListenerKind>,
}

/// What conditions are checked against: the parts of a request beyond host and path.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    /// The query string, without `?`.
    pub query: Option<&'a str>,
    /// The listener the request came in on.
    pub listener: ListenerKind,
}

static NO_HEADERS: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);

impl RequestFacts<'static> {
    /// A plain-HTTP `GET` without headers or query: what a path-only lookup assumes.
    pub fn get() -> RequestFacts<'static> {
        RequestFacts {
            method: &Method::GET,
            headers: &NO_HEADERS,
            query: None,
            listener: ListenerKind::Http,
        }
    }
}

impl Conditions {
    /// Whether a request meets every condition. A header sent several times is
    /// compared as its values joined by `,` (RFC 9110 5.3); a query parameter sent
    /// several times by its first value, percent-decoded.
    pub fn matches(&self, req: &RequestFacts<'_>) -> bool {
        if let Some(l) = self.listener
            && l != req.listener
        {
            return false;
        }
        if let Some(m) = &self.method
            && m != req.method
        {
            return false;
        }
        for h in &self.headers {
            let mut values = req.headers.get_all(&h.name).iter();
            let Some(first) = values.next() else {
                return false;
            };
            let ok = match values.next() {
                None => first.to_str().is_ok_and(|v| h.value.matches(v)),
                Some(second) => {
                    let mut joined = String::new();
                    for v in [first, second].into_iter().chain(values) {
                        let Ok(v) = v.to_str() else { return false };
                        if !joined.is_empty() {
                            joined.push(',');
                        }
                        joined.push_str(v);
                    }
                    h.value.matches(&joined)
                }
            };
            if !ok {
                return false;
            }
        }
        if !self.query.is_empty() {
            let query = req.query.unwrap_or("");
            for q in &self.query {
                match query_value(query, &q.name) {
                    Some(v) if q.value.matches(&v) => {}
                    _ => return false,
                }
            }
        }
        true
    }

    /// How many conditions of each kind, for precedence: (method, headers, query).
    pub fn weight(&self) -> (bool, usize, usize) {
        (self.method.is_some(), self.headers.len(), self.query.len())
    }
}

/// The first value of query parameter `name`, percent-decoded (`+` stays `+`).
fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Header changes (Gateway API `RequestHeaderModifier` / `ResponseHeaderModifier`),
/// applied in the order set, add, remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    /// Applies the changes: `set` replaces every value, `add` appends one, `remove`
    /// drops the header.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// A path change of a redirect or rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathModifier {
    /// The whole path becomes this.
    ReplaceFullPath(String),
    /// The part of the path the route's prefix matched becomes this.
    ReplacePrefixMatch(String),
}

impl PathModifier {
    /// The path after the change, for a request path that the route matched with the
    /// prefix key `matched` (a Prefix rule's key: no trailing `/`, `/` as empty).
    pub fn apply(&self, path: &str, matched: &str) -> String {
        match self {
            PathModifier::ReplaceFullPath(p) => p.clone(),
            PathModifier::ReplacePrefixMatch(replacement) => {
                let rest = path.strip_prefix(matched).unwrap_or(path);
                let replacement = replacement.trim_end_matches('/');
                match (replacement.is_empty(), rest.is_empty()) {
                    (true, true) => "/".to_string(),
                    (true, false) => rest.to_string(),
                    (false, _) => format!("{replacement}{rest}"),
                }
            }
        }
    }
}

/// A URL rewrite before forwarding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UrlRewrite {
    /// The `Host` sent upstream.
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

/// A copy of each request sent to another backend, its answer ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub cluster: ClusterId,
    /// The share of requests mirrored, as (numerator, denominator) with
    /// 0 < numerator < denominator; `None` mirrors every request.
    pub share: Option<(u32, u32)>,
}

impl Mirror {
    /// Whether this request is mirrored: always without a share, else with the
    /// share's probability.
    pub fn sampled(&self) -> bool {
        match self.share {
            None => true,
            Some((n, d)) => fastrand::u32(0..d) < n,
        }
    }
}

/// The changes a route (or one of its weighted backends) makes on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub rewrite: Option<UrlRewrite>,
    pub mirrors: Vec<Mirror>,
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        self.request_headers.is_none()
            && self.response_headers.is_none()
            && self.rewrite.is_none()
            && self.mirrors.is_empty()
    }

    /// Filter names in Gateway API's words, for `explain` and the dashboard.
    pub fn names(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.request_headers.is_some() {
            out.push("RequestHeaderModifier");
        }
        if self.response_headers.is_some() {
            out.push("ResponseHeaderModifier");
        }
        if self.rewrite.is_some() {
            out.push("URLRewrite");
        }
        if !self.mirrors.is_empty() {
            out.push("RequestMirror");
        }
        out
    }
}

/// An HTTP redirect answered by Portcullis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// `http` or `https`; the request's own when `None`.
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
    /// The port of the Gateway listener the route is attached to, used when neither
    /// `port` nor `scheme` is set.
    pub listener_port: Option<u16>,
}

impl Redirect {
    /// The `Location` for a request: unset parts keep the request's own scheme, host,
    /// path and query. The port is the redirect's, else the scheme's well-known one when
    /// the redirect sets a scheme, else the Gateway listener's, and is left out when it
    /// is 80 for http or 443 for https. `matched` is the route's prefix key (for
    /// `ReplacePrefixMatch`). Without a host to name (an HTTP/1.0 request without
    /// Host), the Location is relative: the client keeps its own scheme, host and port.
    pub fn location(
        &self,
        request_scheme: &str,
        host: Option<&str>,
        path: &str,
        matched: &str,
        query: Option<&str>,
    ) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(request_scheme);
        let hostname = self.hostname.as_deref().or(host).unwrap_or("");
        let port = match (self.port, &self.scheme) {
            (Some(p), _) => Some(p),
            (None, Some(_)) => None,
            (None, None) => self.listener_port,
        };
        let port = port.filter(|&p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
        let mut location = String::new();
        if !hostname.is_empty() {
            location = format!("{scheme}://{hostname}");
            if let Some(p) = port {
                location.push(':');
                location.push_str(&p.to_string());
            }
        }
        match &self.path {
            Some(modifier) => location.push_str(&modifier.apply(path, matched)),
            None => location.push_str(path),
        }
        if let Some(q) = query {
            location.push('?');
            location.push_str(q);
        }
        location
    }
}

/// Where a share of a route's traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendTarget {
    Cluster(ClusterId),
    /// A backendRef that cannot be used (missing Service, not permitted, unsupported
    /// kind): its share of the requests is answered 500.
    Invalid {
        reason: Arc<str>,
    },
}

/// One backend of a route, with its weight and its own filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedBackend {
    pub target: BackendTarget,
    pub weight: u32,
    pub filters: Option<Arc<Filters>>,
}

/// The backends of a forwarding route; the weights are positive (a weight of 0 never
/// gets a request, so such backends are left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backends {
    pub list: Box<[WeightedBackend]>,
    pub total_weight: u32,
}

impl Backends {
    /// One backend that takes every request.
    pub fn single(cluster: ClusterId) -> Backends {
        Backends {
            list: Box::new([WeightedBackend {
                target: BackendTarget::Cluster(cluster),
                weight: 1,
                filters: None,
            }]),
            total_weight: 1,
        }
    }

    /// Backends with weights; the ones with weight 0 are dropped. `None` when no weight
    /// is positive.
    pub fn weighted(list: Vec<WeightedBackend>) -> Option<Backends> {
        let list: Vec<WeightedBackend> = list.into_iter().filter(|b| b.weight > 0).collect();
        let total_weight = list
            .iter()
            .fold(0u32, |sum, b| sum.saturating_add(b.weight));
        (total_weight > 0).then(|| Backends {
            list: list.into_boxed_slice(),
            total_weight,
        })
    }

    /// The backend a request goes to, for a number `roll` drawn uniformly from
    /// `0..total_weight`.
    pub fn pick(&self, roll: u32) -> &WeightedBackend {
        if self.list.len() == 1 {
            return &self.list[0];
        }
        let mut left = roll;
        for b in self.list.iter() {
            if left < b.weight {
                return b;
            }
            left -= b.weight;
        }
        &self.list[self.list.len() - 1]
    }

    /// The first backend that is a cluster.
    pub fn first_cluster(&self) -> Option<ClusterId> {
        self.list.iter().find_map(|b| match b.target {
            BackendTarget::Cluster(c) => Some(c),
            BackendTarget::Invalid { .. } => None,
        })
    }
}

/// What a matched route does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Proxy to one of the backends, chosen by weight.
    Forward(Backends),
    /// Answer with a redirect (boxed: rare, and the route table stays compact).
    Redirect(Box<Redirect>),
    /// Answer with this status and a short text body (Gateway API's 500 for a rule
    /// whose backends are all invalid).
    Respond { status: u16, body: Arc<str> },
}

/// Time limits of a route (Gateway API `timeouts`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole request, from its arrival to the end of the response head: 504 after.
    pub request: Option<Duration>,
    /// Each upstream attempt, until its response head: 504 after.
    pub backend_request: Option<Duration>,
}

/// One route: matches, then an action, with filters and timeouts on the way.
#[derive(Debug, Clone)]
pub struct Route {
    pub host: HostPattern,
    pub path: PathRule,
    /// Method, header and query conditions; `None` for path-only routes (every
    /// Ingress route), which cost nothing extra to look up.
    pub conditions: Option<Box<Conditions>>,
    pub source: RouteSource,
    /// Position in age order across every kind (oldest object first, then rule, then
    /// match): lower wins ties.
    pub order: u32,
    pub action: Action,
    /// Route-level filters; `None` when there are none.
    pub filters: Option<Arc<Filters>>,
    pub timeouts: Timeouts,
    /// The request body limit of this route's Ingress (`portcullis.io/max-body-size`);
    /// `None` leaves the proxy's global limit in force.
    pub max_body_size: Option<u64>,
}

impl Route {
    /// A path-only route to one cluster, as an Ingress rule path makes.
    pub fn forward(
        host: HostPattern,
        path: PathRule,
        source: RouteSource,
        cluster: ClusterId,
    ) -> Route {
        Route {
            host,
            path,
            conditions: None,
            source,
            order: 0,
            action: Action::Forward(Backends::single(cluster)),
            filters: None,
            timeouts: Timeouts::default(),
            max_body_size: None,
        }
    }

    /// The precedence of this route for a request whose host matched as `host`.
    pub fn precedence(&self, host: HostMatch) -> Precedence {
        // Regular-expression routes rank below every other path and then follow rule
        // order alone (the contract), so their conditions do not count.
        let (method, headers, query) = match &self.conditions {
            Some(c) if !self.path.is_regex() => c.weight(),
            _ => (false, 0, 0),
        };
        Precedence {
            host,
            host_len: if host == HostMatch::Wildcard {
                self.host.suffix_len()
            } else {
                0
            },
            literal: !self.path.is_regex(),
            length: self.path.length(),
            exact: self.path.path_type.is_exact(),
            method,
            headers,
            query,
            order: std::cmp::Reverse(self.order),
        }
    }

    /// Whether the route's conditions (if any) hold for a request.
    #[inline]
    pub fn admits(&self, req: &RequestFacts<'_>) -> bool {
        match &self.conditions {
            None => true,
            Some(c) => c.matches(req),
        }
    }

    /// The cluster of the first usable backend, if the route forwards.
    pub fn first_cluster(&self) -> Option<ClusterId> {
        match &self.action {
            Action::Forward(b) => b.first_cluster(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_prefix_match_keeps_element_boundaries() {
        let m = PathModifier::ReplacePrefixMatch("/new".into());
        assert_eq!(m.apply("/old/x", "/old"), "/new/x");
        assert_eq!(m.apply("/old", "/old"), "/new");
        let root = PathModifier::ReplacePrefixMatch("/".into());
        assert_eq!(root.apply("/old/x", "/old"), "/x");
        assert_eq!(root.apply("/old", "/old"), "/");
        let from_root = PathModifier::ReplacePrefixMatch("/api".into());
        assert_eq!(from_root.apply("/x", ""), "/api/x");
    }

    #[test]
    fn conditions_check_method_headers_and_query() {
        let c = Conditions {
            method: Some(Method::POST),
            headers: vec![HeaderCondition {
                name: HeaderName::from_static("x-env"),
                value: ValueMatch::Exact("canary".into()),
            }],
            query: vec![QueryCondition {
                name: "v".into(),
                value: ValueMatch::Regex(Pattern::new("[0-9]+").unwrap()),
            }],
            listener: None,
        };
        let mut h = HeaderMap::new();
        h.insert("X-Env", HeaderValue::from_static("canary"));
        let facts = |m, q| RequestFacts {
            method: m,
            headers: &h,
            query: q,
            listener: ListenerKind::Http,
        };
        assert!(c.matches(&facts(&Method::POST, Some("a=1&v=2"))));
        assert!(c.matches(&facts(&Method::POST, Some("v=%32%33"))));
        assert!(!c.matches(&facts(&Method::GET, Some("v=2"))));
        assert!(!c.matches(&facts(&Method::POST, Some("v=x"))));
        assert!(!c.matches(&facts(&Method::POST, None)));
        assert!(!c.matches(&RequestFacts::get()));
    }

    #[test]
    fn mirror_shares_are_sampled_per_request() {
        let quarter = Mirror {
            cluster: 0,
            share: Some((1, 4)),
        };
        let n = 20_000;
        let hits = (0..n).filter(|_| quarter.sampled()).count();
        // Binomial(20000, 0.25): mean 5000, sd ~61; 6 sd either way.
        assert!((4634..=5366).contains(&hits), "{hits} of {n}");
        let all = Mirror {
            cluster: 0,
            share: None,
        };
        assert!((0..100).all(|_| all.sampled()));
    }

    #[test]
    fn weighted_pick_follows_the_weights() {
        let b = |w| WeightedBackend {
            target: BackendTarget::Cluster(w),
            weight: w,
            filters: None,
        };
        let backends = Backends::weighted(vec![b(9), b(0), b(1)]).unwrap();
        assert_eq!(backends.total_weight, 10);
        assert_eq!(backends.list.len(), 2);
        let counts = (0..10).fold([0, 0], |mut acc, roll| {
            match backends.pick(roll).target {
                BackendTarget::Cluster(9) => acc[0] += 1,
                _ => acc[1] += 1,
            }
            acc
        });
        assert_eq!(counts, [9, 1]);
        assert!(Backends::weighted(vec![b(0)]).is_none());
    }
}
