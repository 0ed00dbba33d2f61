//! What the fuzz targets check, one function per target. Each takes the raw fuzz input
//! and panics when a property fails; inputs it cannot use are ignored.
//!
//! The same file is compiled into `tests/fuzz_corpus.rs` (with `#[path]`), which replays
//! the committed corpus under `fuzz/corpus/` on every `cargo test`, so CI checks these
//! properties without cargo-fuzz or a nightly toolchain. It may only use what both
//! builds have: `portcullis`, `http` and the standard library.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use portcullis::k8s::{self, Options};
use portcullis::model::{
    Decision, HostPattern, PathRule, PathType, Route, RouteMatch, RouteTable, reference_lookup,
    request_host,
};
use portcullis::proxy::headers;

/// Reads the input from the front, byte by byte; past the end it yields zeros.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `max` bytes, the count taken from the input.
    fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = (self.byte() as usize % (max + 1)).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.byte() as usize % from.len()]
    }
}

// ---------------------------------------------------------------------------------
// manifests: YAML/JSON text → file-mode reader → translation, in both modes.

/// Any text through the manifest reader and, when it loads, through translation with
/// file-mode and Kubernetes-mode options. Nothing may panic; the snapshot must be
/// internally consistent (every route and the default backend name an existing
/// cluster); translation is deterministic; every diagnostic names an object kind and
/// a reason; and every route's host can be routed to that route or a better one.
pub fn manifests(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let loaded = match portcullis::files::load_str("fuzz.yaml", text) {
        Ok(l) => l,
        Err(e) => {
            assert!(
                e.to_string().starts_with("fuzz.yaml"),
                "error names the file: {e}"
            );
            return;
        }
    };
    for d in &loaded.diagnostics {
        assert!(!d.kind.is_empty() && !d.reason.is_empty(), "{d:?}");
    }
    let file_mode = Options {
        assume_class: true,
        allow_local_endpoints: true,
        ..Options::default()
    };
    let kube_mode = Options {
        default_backend_service: Some(k8s::translate::ServiceRef {
            service: portcullis::model::ObjectRef::new("default", "fallback"),
            port: portcullis::model::PortRef::Number(80),
        }),
        ..Options::default()
    };
    for options in [file_mode, kube_mode] {
        let snapshot = k8s::build(&loaded.inputs, &options);
        let again = k8s::build(&loaded.inputs, &options);
        let n = snapshot.clusters.len();
        let mut routes = Vec::new();
        for r in snapshot.routes.routes() {
            if let portcullis::model::Action::Forward(b) = &r.action {
                for backend in b.list.iter() {
                    if let portcullis::model::BackendTarget::Cluster(id) = backend.target {
                        assert!((id as usize) < n, "route {r:?} names cluster {id}");
                    }
                }
            }
            routes.push(r.clone());
        }
        if let Some(id) = snapshot.default_backend {
            assert!((id as usize) < n, "default backend names cluster {id}");
        }
        for d in &snapshot.diagnostics {
            assert!(!d.kind.is_empty() && !d.reason.is_empty(), "{d:?}");
        }
        assert_eq!(
            format!("{:?}", snapshot.routes.routes().collect::<Vec<_>>()),
            format!("{:?}", again.routes.routes().collect::<Vec<_>>()),
            "translation is deterministic"
        );
        assert_eq!(
            snapshot.clusters, again.clusters,
            "translation is deterministic"
        );
        assert_eq!(snapshot.diagnostics.len(), again.diagnostics.len());
        for r in &routes {
            let host = match &r.host {
                HostPattern::Any => None,
                HostPattern::Exact(h) => Some(h.clone()),
                HostPattern::Wildcard(s) | HostPattern::Suffix(s) => Some(format!("x.{s}")),
            };
            let path = r.path.path.clone();
            let facts = portcullis::model::RequestFacts::get();
            let table = snapshot.routes.lookup(host.as_deref(), &path, &facts);
            let reference = reference_lookup(&routes, host.as_deref(), &path, &facts);
            assert_eq!(identity(table), identity(reference), "{host:?} {path:?}");
            match snapshot.decide(host.as_deref(), &path) {
                Decision::Route(m) => {
                    assert!(m.route.precedence(m.host_match) >= r.precedence(r.host.kind()));
                }
                other => panic!("{host:?} {path:?}: a route exists, decided {other:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// routing: the indexed route table against the linear reference matcher.

const RULE_HOSTS: &[&str] = &[
    "", "a.x", "b.x", "x", "a.a.x", "*.x", "*.a.x", "A.X", "*.b.x", "xn--d.x",
];
const REQUEST_HOSTS: &[&str] = &[
    "a.x", "b.x", "c.x", "a.a.x", "b.a.x", "x", ".x", "y", "A.x:80", "a.x.", "[::1]:8",
];
/// Path characters: separators, router syntax that must stay plain, dots for `.`/`..`.
const PATH_CHARS: &[u8] = b"//ab{}*:.%?~-";

fn path_from(c: &mut Cursor<'_>, max: usize) -> String {
    let raw = c.bytes(max);
    let mut p = String::from("/");
    for b in raw {
        p.push(PATH_CHARS[*b as usize % PATH_CHARS.len()] as char);
    }
    p
}

/// Routes built from the input (hosts from a small alphabet so that they collide,
/// paths from separator-heavy characters) and requests with hosts from the alphabet
/// or raw input and paths from the same characters or raw input. The table answers
/// exactly as the reference does, whether its virtual hosts are scanned or hashed.
pub fn routing(data: &[u8]) {
    let mut c = Cursor { data };
    let n = c.byte() as usize % 24;
    let mut routes = Vec::with_capacity(n);
    for i in 0..n {
        let Ok(host) = HostPattern::parse(c.pick(RULE_HOSTS)) else {
            continue;
        };
        let path_type = c.pick(&[
            PathType::Exact,
            PathType::Prefix,
            PathType::ImplementationSpecific,
        ]);
        let path = path_from(&mut c, 8);
        let Ok(path) = PathRule::new(&path, path_type) else {
            continue;
        };
        let mut route = Route::forward(
            host,
            path,
            portcullis::model::RouteSource {
                kind: portcullis::model::RouteKind::Ingress,
                object: portcullis::model::ObjectRef::new("ns", format!("ing{}", i / 3)),
                rule: i % 3,
                match_index: 0,
            },
            i as u32,
        );
        route.order = i as u32;
        routes.push(route);
    }
    let scanned = RouteTable::build_with_scan_limit(routes.clone(), usize::MAX);
    let hashed = RouteTable::build_with_scan_limit(routes.clone(), 0);
    let (default, _) = RouteTable::build(routes.clone());
    let mut requests = 0;
    while !c.is_empty() && requests < 64 {
        requests += 1;
        let raw_host;
        let host_text: Option<&str> = match c.byte() % 4 {
            0 => None,
            1 => {
                raw_host = String::from_utf8_lossy(c.bytes(12)).into_owned();
                Some(&raw_host)
            }
            _ => Some(c.pick(REQUEST_HOSTS)),
        };
        let Ok(host) = request_host(None, host_text) else {
            continue;
        };
        let path = if c.byte().is_multiple_of(4) {
            let raw = String::from_utf8_lossy(c.bytes(12)).into_owned();
            format!("/{raw}")
        } else {
            path_from(&mut c, 10)
        };
        let facts = portcullis::model::RequestFacts::get();
        let want = identity(reference_lookup(&routes, host.as_deref(), &path, &facts));
        for (name, table) in [
            ("scanned", &scanned),
            ("hashed", &hashed),
            ("default", &default),
        ] {
            let got = identity(table.lookup(host.as_deref(), &path, &facts));
            assert_eq!(
                got, want,
                "{name} table, host {host:?}, path {path:?}, routes {routes:#?}"
            );
        }
    }
}

fn identity(m: Option<RouteMatch<'_>>) -> Option<(String, usize, u32, String)> {
    m.map(|m| {
        (
            m.route.source.object.to_string(),
            m.route.source.rule,
            m.route.order,
            m.host_match.to_string(),
        )
    })
}

// ---------------------------------------------------------------------------------
// headers: hop-by-hop removal, X-Forwarded-*, the request id.

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Names that often matter, so that short inputs reach the interesting rules.
const NAMES: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "transfer-encoding",
    "x-forwarded-for",
    "x-request-id",
    "x-a",
    "host",
];

/// Headers from the input (`name:value` lines, or a byte picking a well-known name),
/// through [`headers::strip_hop_by_hop`], [`headers::set_forwarded`] and
/// [`headers::request_id`]. Hop-by-hop headers and every header `Connection` named go
/// (`TE: trailers` excepted), everything else stays untouched, stripping twice changes
/// nothing, and the forwarding headers say exactly who the peer is.
pub fn headers(data: &[u8]) {
    let mut c = Cursor { data };
    let peer = match c.byte() % 3 {
        0 => IpAddr::V4(Ipv4Addr::new(c.byte(), c.byte(), c.byte(), c.byte())),
        1 => IpAddr::V6(Ipv4Addr::new(10, c.byte(), c.byte(), 1).to_ipv6_mapped()),
        _ => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(c.byte()))),
    };
    let port = u16::from_le_bytes([c.byte(), c.byte()]);
    let mut map = HeaderMap::new();
    let mut count = 0;
    while !c.is_empty() && count < 32 {
        count += 1;
        let name = if c.byte().is_multiple_of(2) {
            HeaderName::from_static(c.pick(NAMES))
        } else {
            match HeaderName::from_bytes(c.bytes(16)) {
                Ok(n) => n,
                Err(_) => continue,
            }
        };
        let Ok(value) = HeaderValue::from_bytes(c.bytes(40)) else {
            continue;
        };
        map.append(name, value);
    }
    let original = map.clone();

    let id = headers::request_id(&original);
    let incoming = original.get("x-request-id");
    let valid = |v: &HeaderValue| {
        !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| (0x21..=0x7e).contains(b))
    };
    match incoming {
        Some(v) if valid(v) => assert_eq!(&id, v),
        _ => assert!(
            id.len() == 32 && id.as_bytes().iter().all(u8::is_ascii_hexdigit),
            "{id:?}"
        ),
    }

    let named: HashSet<String> = original
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let te_trailers = {
        let values: Vec<_> = original.get_all("te").iter().collect();
        !values.is_empty()
            && values.iter().all(|v| {
                v.to_str().is_ok_and(|s| {
                    s.split(',')
                        .all(|t| t.trim().eq_ignore_ascii_case("trailers"))
                })
            })
    };
    let mut stripped = original.clone();
    headers::strip_hop_by_hop(&mut stripped);
    for name in HOP_BY_HOP {
        if *name == "te" && te_trailers {
            let te: Vec<_> = stripped.get_all("te").iter().collect();
            assert_eq!(
                te,
                [HeaderValue::from_static("trailers")],
                "TE: trailers stays"
            );
        } else {
            assert!(!stripped.contains_key(*name), "{name} left in {stripped:?}");
        }
    }
    for name in original.keys() {
        let s = name.as_str();
        if HOP_BY_HOP.contains(&s) {
            continue;
        }
        if named.contains(s) {
            assert!(!stripped.contains_key(name), "{s} was named by Connection");
        } else {
            let before: Vec<_> = original.get_all(name).iter().collect();
            let after: Vec<_> = stripped.get_all(name).iter().collect();
            assert_eq!(before, after, "end-to-end header {s} changed");
        }
    }
    let mut twice = stripped.clone();
    headers::strip_hop_by_hop(&mut twice);
    assert_eq!(twice, stripped, "stripping is idempotent");

    let host = original.get("host").cloned();
    let mut forwarded = stripped.clone();
    headers::set_forwarded(
        &mut forwarded,
        &headers::ForwardedFor {
            peer,
            proto: if port.is_multiple_of(2) {
                "http"
            } else {
                "https"
            },
            host: host.as_ref(),
            port,
        },
    );
    let peer_text = peer.to_canonical().to_string();
    let xff: Vec<_> = forwarded.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff.len(), 1, "one X-Forwarded-For: {xff:?}");
    let xff = xff[0].to_str().expect("X-Forwarded-For is visible ASCII");
    assert!(
        xff == peer_text || xff.ends_with(&format!(", {peer_text}")),
        "X-Forwarded-For {xff:?} ends with the peer {peer_text}"
    );
    assert_eq!(forwarded.get_all("x-real-ip").iter().count(), 1);
    assert_eq!(forwarded["x-real-ip"], peer_text.as_str());
    assert_eq!(forwarded["x-forwarded-port"], port.to_string().as_str());
    assert_eq!(forwarded.get_all("x-forwarded-proto").iter().count(), 1);
    match &host {
        Some(h) => assert_eq!(forwarded.get("x-forwarded-host"), Some(h)),
        None => assert!(!forwarded.contains_key("x-forwarded-host")),
    }
    for name in stripped.keys() {
        let s = name.as_str();
        if s.starts_with("x-forwarded-") || s == "x-real-ip" {
            continue;
        }
        let before: Vec<_> = stripped.get_all(name).iter().collect();
        let after: Vec<_> = forwarded.get_all(name).iter().collect();
        assert_eq!(before, after, "set_forwarded changed {s}");
    }
}

// ---------------------------------------------------------------------------------
// paths: request paths → `model::path::normalize`, against a reference.

/// Pieces that paths are made of: separators, dot segments plain and encoded, escapes of
/// unreserved and reserved characters, refused escapes, broken escapes and backslashes.
const PATH_PIECES: &[&str] = &[
    "/", "/", "/", "//", ".", "..", "a", "b", "~", "-", "%2e", "%2E", "%2e%2e", "%61", "%7E",
    "%2f", "%2F", "%5c", "%5C", "%00", "%20", "%3f", "%zz", "%4", "%", "\\", ";", "%25", "..;",
    ".;x", ";p=1",
];

/// A request path from the input: pieces of [`PATH_PIECES`], or raw visible ASCII.
pub fn path_of(data: &[u8]) -> String {
    let mut c = Cursor { data };
    let mut path = String::from("/");
    while !c.is_empty() && path.len() < 256 {
        let b = c.byte();
        if b < 128 {
            path.push_str(PATH_PIECES[b as usize % PATH_PIECES.len()]);
        } else {
            let raw = (b - 128) % 94 + 33;
            path.push(raw as char);
        }
    }
    path
}

/// A plain reference for [`portcullis::model::path::normalize`], written from the
/// contract rather than for speed: decode unreserved escapes (refusing encoded `/`, `\`
/// and NUL and broken escapes, upper-casing the rest), merge slashes by repeated replacement, then RFC 3986
/// section 5.2.4's buffer algorithm, refusing a `..` that has nothing left to remove.
pub fn reference_normalize(path: &str) -> Result<String, &'static str> {
    if !path.starts_with('/') {
        return Ok(path.to_string());
    }
    if path.contains('\\') {
        return Err("backslash");
    }
    let chars: Vec<char> = path.chars().collect();
    let mut decoded = String::new();
    let mut i = 0;
    while i < chars.len() {
        let escape: String = chars[i..chars.len().min(i + 3)].iter().collect();
        let value = (chars[i] == '%' && escape.len() == 3)
            .then(|| u8::from_str_radix(&escape[1..], 16).ok())
            .flatten()
            .filter(|_| escape[1..].chars().all(|c| c.is_ascii_hexdigit()));
        match value {
            Some(b'/' | b'\\') => return Err("encoded slash"),
            Some(0) => return Err("nul"),
            Some(v) if v.is_ascii_alphanumeric() || b"-._~".contains(&v) => {
                decoded.push(v as char);
                i += 3;
            }
            Some(_) => {
                decoded.push_str(&escape.to_ascii_uppercase());
                i += 3;
            }
            None if chars[i] == '%' => return Err("bad escape"),
            None => {
                decoded.push(chars[i]);
                i += 1;
            }
        }
    }
    // A `.` or `..` segment with parameters is refused (servlet containers act on it).
    for segment in decoded.split('/') {
        if let Some((dots, _)) = segment.split_once(';')
            && (dots == "." || dots == "..")
        {
            return Err("dot segment with parameters");
        }
    }
    while decoded.contains("//") {
        decoded = decoded.replace("//", "/");
    }
    let mut input = decoded;
    let mut output = String::new();
    while !input.is_empty() {
        if input.starts_with("/./") {
            input.replace_range(..3, "/");
        } else if input == "/." {
            input = "/".into();
        } else if input.starts_with("/../") || input == "/.." {
            let cut = if input == "/.." { 3 } else { 4 };
            input.replace_range(..cut, "/");
            let Some(last) = output.rfind('/') else {
                return Err("above root");
            };
            output.truncate(last);
        } else {
            let end = input[1..].find('/').map_or(input.len(), |p| p + 1);
            output.push_str(&input[..end]);
            input.replace_range(..end, "");
        }
    }
    Ok(output)
}

/// Any path through `normalize`: it never panics; it agrees with
/// [`reference_normalize`] on the result and on whether it refuses; and a normalised
/// path is a fixed point (normalising it again changes nothing) that starts with `/` and
/// holds no empty, `.` or `..` segment.
pub fn paths(data: &[u8]) {
    let path = path_of(data);
    // Only what a request target can carry reaches the proxy.
    let Ok(target) = http::uri::PathAndQuery::try_from(path.as_str()) else {
        return;
    };
    check_path(target.path());
}

/// The checks of [`paths`] on one path.
pub fn check_path(path: &str) {
    let got = portcullis::model::path::normalize(path);
    let want = reference_normalize(path);
    match (&got, &want) {
        (Ok(g), Ok(w)) => assert_eq!(g, w, "normalising {path:?}"),
        (Err(_), Err(_)) => {}
        _ => panic!("normalising {path:?}: got {got:?}, the reference says {want:?}"),
    }
    let Ok(normal) = got else { return };
    if !path.starts_with('/') {
        return;
    }
    assert!(normal.starts_with('/'), "{path:?} → {normal:?}");
    let again = portcullis::model::path::normalize(&normal);
    assert_eq!(
        again.as_deref(),
        Ok(&*normal),
        "not a fixed point: {path:?}"
    );
    let inner = normal.strip_suffix('/').unwrap_or(&normal);
    for segment in inner.split('/').skip(1) {
        assert!(
            !matches!(segment, "" | "." | ".."),
            "{path:?} → {normal:?} keeps the segment {segment:?}"
        );
    }
}
