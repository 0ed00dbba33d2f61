//! Host and path matching rules of Ingress v1 and Gateway API, and the precedence
//! between matches.
//!
//! Everything here is pure and allocation-free on the lookup side. The request side
//! ([`request_host`]) turns what a client sent into the host name that routing uses.

use std::borrow::Cow;
use std::cmp::{Ordering, Reverse};
use std::fmt;

use serde::Serialize;

/// How a rule's host matched a request host. Ordered by specificity: `Exact` is the
/// most specific, `Any` (a rule without host) the least.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostMatch {
    Any,
    Wildcard,
    Exact,
}

impl fmt::Display for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostMatch::Any => "any",
            HostMatch::Wildcard => "wildcard",
            HostMatch::Exact => "exact",
        })
    }
}

/// A rule's host: exact (`foo.example.com`), an Ingress one-label wildcard
/// (`*.example.com`, stored as the suffix `example.com`), a Gateway API wildcard (a
/// suffix of any number of labels, stored the same way), or absent (matches every host).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    Any,
    Exact(String),
    /// Ingress: `*.example.com` covers exactly one label.
    Wildcard(String),
    /// Gateway API: `*.example.com` covers one label or more (`a.example.com`,
    /// `b.a.example.com`), never `example.com` itself.
    Suffix(String),
}

impl HostPattern {
    /// Parses a rule host as the Ingress spec allows it: a lowercase DNS name, or `*.`
    /// followed by one. Upper case is folded to lower case. Returns why on failure.
    pub fn parse(host: &str) -> Result<HostPattern, String> {
        if host.is_empty() {
            return Ok(HostPattern::Any);
        }
        let lower = host.to_ascii_lowercase();
        if let Some(suffix) = lower.strip_prefix("*.") {
            validate_dns_name(suffix)?;
            if !suffix.contains('.') && suffix.is_empty() {
                return Err("a wildcard host needs a domain after `*.`".into());
            }
            Ok(HostPattern::Wildcard(suffix.to_string()))
        } else {
            if lower.contains('*') {
                return Err(
                    "`*` is only allowed as the whole first label (`*.example.com`)".into(),
                );
            }
            validate_dns_name(&lower)?;
            Ok(HostPattern::Exact(lower))
        }
    }

    /// Whether this pattern matches an already normalised request host.
    pub fn matches(&self, host: &str) -> Option<HostMatch> {
        match self {
            HostPattern::Any => Some(HostMatch::Any),
            HostPattern::Exact(h) => (h == host).then_some(HostMatch::Exact),
            HostPattern::Wildcard(suffix) => match host.split_once('.') {
                Some((label, rest)) if !label.is_empty() && rest == suffix => {
                    Some(HostMatch::Wildcard)
                }
                _ => None,
            },
            // One label or more before the suffix, none of them empty.
            HostPattern::Suffix(suffix) => match host.strip_suffix(suffix.as_str()) {
                Some(head)
                    if head.len() > 1
                        && head.ends_with('.')
                        && head[..head.len() - 1].split('.').all(|l| !l.is_empty()) =>
                {
                    Some(HostMatch::Wildcard)
                }
                _ => None,
            },
        }
    }

    pub fn kind(&self) -> HostMatch {
        match self {
            HostPattern::Any => HostMatch::Any,
            HostPattern::Exact(_) => HostMatch::Exact,
            HostPattern::Wildcard(_) | HostPattern::Suffix(_) => HostMatch::Wildcard,
        }
    }

    /// The virtual host this pattern's routes live in: Ingress and Gateway API
    /// wildcards of the same suffix share one, since they rank the same.
    pub fn vhost_key(&self) -> HostPattern {
        match self {
            HostPattern::Suffix(s) => HostPattern::Wildcard(s.clone()),
            other => other.clone(),
        }
    }

    /// How many labels a wildcard's suffix has (0 for exact and absent hosts).
    pub fn suffix_labels(&self) -> usize {
        match self {
            HostPattern::Wildcard(s) | HostPattern::Suffix(s) => s.split('.').count(),
            _ => 0,
        }
    }

    /// How specific a wildcard is: the length of its suffix (0 for exact and absent
    /// hosts, whose rank [`HostMatch`] already gives).
    pub fn suffix_len(&self) -> usize {
        match self {
            HostPattern::Wildcard(s) | HostPattern::Suffix(s) => s.len(),
            _ => 0,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) | HostPattern::Suffix(s) => write!(f, "*.{s}"),
        }
    }
}

fn validate_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("host is empty".into());
    }
    if name.len() > 253 {
        return Err("host is longer than 253 characters".into());
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err("host must be a DNS name, not an IP address".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("label `{label}` must be 1 to 63 characters"));
        }
        let ok = label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok || label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "label `{label}` must be lowercase letters, digits and inner `-`"
            ));
        }
    }
    Ok(())
}

/// A path type. Ingress: `Exact`, `Prefix`, and `ImplementationSpecific`, which matches
/// exactly as `Prefix` does. Gateway API's `Exact` and `PathPrefix` are `Exact` and
/// `Prefix`; its `RegularExpression` matches the whole path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PathType {
    Exact,
    Prefix,
    ImplementationSpecific,
    RegularExpression,
}

impl PathType {
    pub fn parse(s: &str) -> Option<PathType> {
        match s {
            "Exact" => Some(PathType::Exact),
            "Prefix" => Some(PathType::Prefix),
            "ImplementationSpecific" => Some(PathType::ImplementationSpecific),
            "RegularExpression" => Some(PathType::RegularExpression),
            _ => None,
        }
    }

    /// Whether the rule matches like `Exact` (otherwise like `Prefix`).
    pub fn is_exact(self) -> bool {
        self == PathType::Exact
    }
}

impl fmt::Display for PathType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathType::Exact => "Exact",
            PathType::Prefix => "Prefix",
            PathType::ImplementationSpecific => "ImplementationSpecific",
            PathType::RegularExpression => "RegularExpression",
        })
    }
}

/// A regular expression from a user's object, matched against a whole value. Compiled
/// with the `regex` crate (linear time) under a size limit; compared by its source.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: regex::Regex,
}

/// The compiled size a user's regular expression may take (the `regex` crate's own
/// default is 10 MiB): enough for any routing pattern, small enough that ten thousand
/// of them stay cheap.
const PATTERN_SIZE_LIMIT: usize = 256 * 1024;

impl Pattern {
    /// Compiles `source` to match whole values (as if written `^(?:source)$`).
    pub fn new(source: &str) -> Result<Pattern, String> {
        let regex = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(PATTERN_SIZE_LIMIT)
            .build()
            .map_err(|e| format!("invalid regular expression `{source}`: {e}"))?;
        Ok(Pattern {
            source: source.to_string(),
            regex,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

impl std::hash::Hash for Pattern {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.source.hash(state);
    }
}

/// A rule path ready for matching.
///
/// For prefix matching the path is kept without its trailing slash (`/foo/` → `/foo`;
/// `/` → empty), so that matching is element-wise: `/foo` matches `/foo`, `/foo/` and
/// `/foo/bar`, never `/foobar`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathRule {
    /// The path as written in the object.
    pub path: String,
    pub path_type: PathType,
    /// `path` for Exact; `path` without trailing `/` for Prefix; the pattern's source
    /// for RegularExpression.
    pub key: String,
    /// The compiled pattern of a RegularExpression rule (boxed: rare, and the route
    /// table stays compact).
    pub regex: Option<Box<Pattern>>,
}

impl PathRule {
    /// Builds a rule from an Ingress path. The path must start with `/`.
    pub fn new(path: &str, path_type: PathType) -> Result<PathRule, String> {
        if !path.starts_with('/') {
            return Err(format!("path `{path}` must start with `/`"));
        }
        if path.contains(['?', '#']) {
            return Err(format!("path `{path}` must not contain `?` or `#`"));
        }
        if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(format!(
                "path `{}` must not contain spaces or control characters",
                path.escape_debug()
            ));
        }
        let key = if path_type.is_exact() {
            path.to_string()
        } else {
            path.trim_end_matches('/').to_string()
        };
        Ok(PathRule {
            path: path.to_string(),
            path_type,
            key,
            regex: None,
        })
    }

    /// A Gateway API `RegularExpression` path: the pattern matches the whole request
    /// path.
    pub fn regex(pattern: &str) -> Result<PathRule, String> {
        let regex = Pattern::new(pattern)?;
        Ok(PathRule {
            path: pattern.to_string(),
            path_type: PathType::RegularExpression,
            key: pattern.to_string(),
            regex: Some(Box::new(regex)),
        })
    }

    /// Whether this rule is a regular expression (ranked below every exact and prefix
    /// rule, whatever their length).
    pub fn is_regex(&self) -> bool {
        self.path_type == PathType::RegularExpression
    }

    /// The length that decides "longest path wins": the matched part of the request.
    /// A Prefix rule's trailing slash does not count (`/foo/` is as long as `/foo`), and
    /// Prefix `/` has length 1, equal to Exact `/`.
    pub fn length(&self) -> usize {
        if self.is_regex() {
            return 0;
        }
        self.key.len().max(1)
    }

    /// Whether the rule matches a request path (as routing sees it, query removed).
    pub fn matches(&self, request_path: &str) -> bool {
        if let Some(re) = &self.regex {
            return re.is_match(request_path);
        }
        if self.path_type.is_exact() {
            return request_path == self.key;
        }
        match request_path.strip_prefix(self.key.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

/// Everything that decides which of several matching routes wins, ordered so that the
/// greater value wins: host specificity (exact, then the longest wildcard suffix, then
/// none), then any exact or prefix path over a regular expression, then path length,
/// then Exact over Prefix, then a method condition, then more header conditions, then
/// more query conditions, then the older route (smaller `order`).
///
/// For Ingress routes, which have no conditions and no regular expressions, this is
/// host, longest path, Exact over Prefix, oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precedence {
    pub host: HostMatch,
    /// The wildcard suffix length; 0 for exact and absent hosts.
    pub host_len: usize,
    /// Not a regular expression path.
    pub literal: bool,
    pub length: usize,
    pub exact: bool,
    pub method: bool,
    pub headers: usize,
    pub query: usize,
    pub order: Reverse<u32>,
}

type PrecedenceKey = (
    HostMatch,
    usize,
    bool,
    usize,
    bool,
    bool,
    usize,
    usize,
    Reverse<u32>,
);

impl Precedence {
    fn key(&self) -> PrecedenceKey {
        (
            self.host,
            self.host_len,
            self.literal,
            self.length,
            self.exact,
            self.method,
            self.headers,
            self.query,
            self.order,
        )
    }
}

impl PartialOrd for Precedence {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Precedence {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// The longest request host accepted: a DNS name's limit (RFC 1035), and more than an
/// IPv6 literal needs.
pub const MAX_HOST_LEN: usize = 253;

/// Why a request's host could not be determined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("Host header `{host}` and request authority `{authority}` differ")]
    Mismatch { host: String, authority: String },
    #[error("Host `{0}` is not a valid host")]
    Invalid(String),
}

/// The host a request names, as routing uses it: the request-target authority if there
/// is one (HTTP/2 `:authority`, HTTP/1 absolute-form), else the `Host` header; lowercased,
/// port and a trailing dot removed. `Ok(None)` when the request names no host at all.
///
/// When both are present and name different hosts (compared after normalisation, port
/// included), the request is refused.
pub fn request_host<'a>(
    authority: Option<&'a str>,
    host_header: Option<&'a str>,
) -> Result<Option<Cow<'a, str>>, HostError> {
    let chosen = match (authority, host_header) {
        (Some(a), Some(h)) => {
            let (an, ap) = split_host_port(a)?;
            let (hn, hp) = split_host_port(h)?;
            if !an.eq_ignore_ascii_case(hn) || ap != hp {
                return Err(HostError::Mismatch {
                    host: h.to_string(),
                    authority: a.to_string(),
                });
            }
            an
        }
        (Some(a), None) => split_host_port(a)?.0,
        (None, Some(h)) => split_host_port(h)?.0,
        (None, None) => return Ok(None),
    };
    if chosen.is_empty() {
        return Ok(None);
    }
    // No DNS name is longer; a longer one would only make wildcard lookups work harder.
    if chosen.len() > MAX_HOST_LEN {
        return Err(HostError::Invalid(format!("{}…", &chosen[..32])));
    }
    if chosen.bytes().any(|b| b.is_ascii_uppercase()) {
        Ok(Some(Cow::Owned(chosen.to_ascii_lowercase())))
    } else {
        Ok(Some(Cow::Borrowed(chosen)))
    }
}

/// Splits `host[:port]` (or `[v6]:port`) and removes one trailing dot from the name.
fn split_host_port(s: &str) -> Result<(&str, Option<&str>), HostError> {
    let s = s.trim();
    let (name, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest
            .find(']')
            .ok_or_else(|| HostError::Invalid(s.to_string()))?;
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(HostError::Invalid(s.to_string())),
        };
        (&s[..end + 2], port)
    } else {
        match s.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (s, None),
        }
    };
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(HostError::Invalid(s.to_string()));
    }
    if name.contains(['/', ' ', '@', '\\']) {
        return Err(HostError::Invalid(s.to_string()));
    }
    Ok((name.strip_suffix('.').unwrap_or(name), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_covers_exactly_one_label() {
        let p = HostPattern::parse("*.example.com").unwrap();
        assert_eq!(p.matches("a.example.com"), Some(HostMatch::Wildcard));
        assert_eq!(p.matches("b.a.example.com"), None);
        assert_eq!(p.matches("example.com"), None);
        assert_eq!(p.matches(".example.com"), None);
    }

    #[test]
    fn host_pattern_rejects_bad_hosts() {
        for bad in [
            "foo.*.com",
            "*",
            "*.",
            "a..b",
            "-a.com",
            "1.2.3.4",
            "a_b.com",
            "a.com:80",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(
            HostPattern::parse("Foo.Example.com").unwrap(),
            HostPattern::Exact("foo.example.com".into())
        );
    }

    #[test]
    fn request_host_normalises() {
        let h = |a: Option<&str>, h: Option<&str>| {
            request_host(a, h).map(|o| o.map(|c| c.into_owned()))
        };
        assert_eq!(h(None, Some("Foo.COM:8080")), Ok(Some("foo.com".into())));
        assert_eq!(h(None, Some("foo.com.")), Ok(Some("foo.com".into())));
        assert_eq!(h(Some("foo.com"), None), Ok(Some("foo.com".into())));
        assert_eq!(h(None, Some("[::1]:80")), Ok(Some("[::1]".into())));
        assert_eq!(h(None, None), Ok(None));
        assert_eq!(
            h(Some("foo.com"), Some("FOO.com")),
            Ok(Some("foo.com".into()))
        );
        assert!(matches!(
            h(Some("a.com"), Some("b.com")),
            Err(HostError::Mismatch { .. })
        ));
        assert!(h(None, Some("a.com:x")).is_err());
        let long = format!("{}.example", "a.".repeat(130));
        assert!(matches!(h(None, Some(&long)), Err(HostError::Invalid(_))));
    }

    #[test]
    fn suffix_wildcard_covers_one_label_or_more() {
        let p = HostPattern::Suffix("example.com".into());
        assert_eq!(p.matches("a.example.com"), Some(HostMatch::Wildcard));
        assert_eq!(p.matches("b.a.example.com"), Some(HostMatch::Wildcard));
        assert_eq!(p.matches("example.com"), None);
        assert_eq!(p.matches(".example.com"), None);
        assert_eq!(p.matches("aexample.com"), None);
        assert_eq!(p.vhost_key(), HostPattern::Wildcard("example.com".into()));
    }

    #[test]
    fn regex_paths_match_the_whole_path() {
        let r = PathRule::regex("/v[0-9]+/.*").unwrap();
        assert!(r.matches("/v1/users"));
        assert!(!r.matches("/api/v1/users"));
        assert!(!r.matches("/v1"));
        assert_eq!(r.length(), 0);
        assert!(PathRule::regex("/(").is_err());
        // Alternation is anchored as a whole, not per branch.
        let alt = PathRule::regex("/a|/b").unwrap();
        assert!(alt.matches("/a") && alt.matches("/b") && !alt.matches("/a/x"));
    }

    #[test]
    fn precedence_orders_host_then_length_then_exact_then_age() {
        let p = |host, length, exact, order| Precedence {
            host,
            host_len: 0,
            literal: true,
            length,
            exact,
            method: false,
            headers: 0,
            query: 0,
            order: Reverse(order),
        };
        assert!(p(HostMatch::Exact, 1, false, 9) > p(HostMatch::Wildcard, 50, true, 0));
        assert!(p(HostMatch::Any, 5, false, 9) > p(HostMatch::Any, 4, true, 0));
        assert!(p(HostMatch::Any, 4, true, 9) > p(HostMatch::Any, 4, false, 0));
        assert!(p(HostMatch::Any, 4, false, 1) > p(HostMatch::Any, 4, false, 2));
    }
}
