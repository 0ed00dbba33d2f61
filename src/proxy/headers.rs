//! Header rules applied while forwarding: hop-by-hop removal (both directions), the
//! `X-Forwarded-*` family and `X-Real-IP`, and the request id.
//!
//! Pure functions over [`HeaderMap`]s, so each rule is tested on its own.

use std::net::IpAddr;

use http::HeaderMap;
use http::header::{CONNECTION, HeaderName, HeaderValue, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};

/// `X-Request-ID`: kept when valid, generated otherwise, returned on every response.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Longest incoming request id that is kept.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Removes hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`,
/// `Proxy-Connection`, `TE` (a `TE` of exactly `trailers` stays), `Trailer`,
/// `Transfer-Encoding` and `Upgrade`. Used on requests and on responses.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let fixed: [&HeaderName; 7] = [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRAILER,
        &TRANSFER_ENCODING,
        &UPGRADE,
    ];
    // One pass over the names, without hashing, finds which of the fixed ones are
    // present; most messages carry none, or only Connection.
    let mut present = [false; 7];
    for name in headers.keys() {
        let i = match name.as_str() {
            "connection" => 0,
            "keep-alive" => 1,
            "proxy-connection" => 2,
            "te" => 3,
            "trailer" => 4,
            "transfer-encoding" => 5,
            "upgrade" => 6,
            _ => continue,
        };
        present[i] = true;
    }
    if !present.contains(&true) {
        return;
    }
    if present[0] {
        let named: Vec<HeaderName> = headers
            .get_all(&CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // `keep-alive` names Keep-Alive, which the fixed list removes anyway.
            .filter(|token| !token.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            // `Connection: te` must not remove the `te: trailers` kept below.
            if name != TE {
                headers.remove(&name);
            }
        }
    }
    let te_trailers = present[3] && {
        let mut values = headers.get_all(&TE).iter().peekable();
        values.peek().is_some()
            && values.all(|v| {
                v.to_str().is_ok_and(|s| {
                    s.split(',')
                        .all(|t| t.trim().eq_ignore_ascii_case("trailers"))
                })
            })
    };
    for (name, here) in fixed.into_iter().zip(present) {
        if here {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// The request id for a request: the incoming `X-Request-ID` when it is 1 to 128
/// visible ASCII characters (0x21–0x7e), else a new one.
#[inline]
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v) if is_valid_request_id(v.as_bytes()) => v.clone(),
        _ => generate_request_id(),
    }
}

fn is_valid_request_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A new request id: 32 lowercase hex characters.
pub fn generate_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = fastrand::u128(..);
    let mut id = [0u8; 32];
    for b in id.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// What the `X-Forwarded-*` headers describe.
#[derive(Debug, Clone)]
pub struct ForwardedFor<'a> {
    /// The downstream peer's IP.
    pub peer: IpAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The host as received (`Host`, else the request authority), port included.
    pub host: Option<&'a HeaderValue>,
    /// The local port of the listener that accepted the connection.
    pub port: u16,
}

/// Appends the peer IP to `X-Forwarded-For` (joining repeated incoming headers into one
/// list) and sets `X-Forwarded-Proto`, `-Host`, `-Port` and `X-Real-IP`, replacing any
/// incoming values.
pub fn set_forwarded(headers: &mut HeaderMap, fwd: &ForwardedFor<'_>) {
    ConnForwarded::new(fwd.peer, fwd.proto, fwd.port).apply(headers, fwd.host);
}

/// The parts of the `X-Forwarded-*` headers that are the same for every request of a
/// downstream connection, formatted once per connection: [`set_forwarded`] in two steps.
#[derive(Debug, Clone)]
pub struct ConnForwarded {
    /// The peer IP (IPv4-mapped IPv6 as IPv4); `None` if it cannot be a header value.
    peer: Option<HeaderValue>,
    proto: HeaderValue,
    port: HeaderValue,
}

impl ConnForwarded {
    pub fn new(peer: IpAddr, proto: &'static str, port: u16) -> ConnForwarded {
        ConnForwarded {
            peer: HeaderValue::from_str(&peer.to_canonical().to_string()).ok(),
            proto: HeaderValue::from_static(proto),
            port: HeaderValue::from(port),
        }
    }

    /// Does what [`set_forwarded`] does, with `host` as received.
    pub fn apply(&self, headers: &mut HeaderMap, host: Option<&HeaderValue>) {
        // Room for the five headers set here, so the map grows at most once.
        let _ = headers.try_reserve(5);
        if let Some(peer) = &self.peer {
            let mut incoming = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .peekable();
            let xff = if incoming.peek().is_none() {
                Some(peer.clone())
            } else {
                let mut xff = String::new();
                for s in incoming {
                    xff.push_str(s);
                    xff.push_str(", ");
                }
                xff.push_str(peer.to_str().unwrap_or_default());
                HeaderValue::from_str(&xff).ok()
            };
            if let Some(v) = xff {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
        headers.insert(X_FORWARDED_PROTO.clone(), self.proto.clone());
        match host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST.clone(), h.clone());
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
        headers.insert(X_FORWARDED_PORT.clone(), self.port.clone());
        if let Some(peer) = &self.peer {
            headers.insert(X_REAL_IP.clone(), peer.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("test header name"),
                HeaderValue::from_str(v).expect("test header value"),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn connection_alone_and_no_hop_by_hop_headers() {
        for pairs in [
            &[("connection", "close"), ("close", "x"), ("x-keep", "1")][..],
            &[
                ("connection", "Keep-Alive"),
                ("keep-alive", "timeout=5"),
                ("x-keep", "1"),
            ],
            &[("x-keep", "1")],
        ] {
            let mut h = map(pairs);
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{pairs:?} -> {h:?}");
            assert_eq!(h["x-keep"], "1");
        }
    }

    #[test]
    fn te_trailers_stays() {
        let mut h = map(&[("te", "trailers"), ("connection", "te")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers");
        let mut h = map(&[("te", "trailers, deflate")]);
        strip_hop_by_hop(&mut h);
        assert!(h.get("te").is_none());
    }

    #[test]
    fn request_ids() {
        let kept = map(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&kept), "abc-123");
        for bad in ["", "has space", &"x".repeat(129)] {
            let h = map(&[("x-request-id", bad)]);
            let id = request_id(&h);
            assert_eq!(id.len(), 32, "{bad:?} -> {id:?}");
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
        }
        let long_ok = "y".repeat(128);
        assert_eq!(
            request_id(&map(&[("x-request-id", &long_ok)])),
            long_ok.as_str()
        );
        assert_ne!(generate_request_id(), generate_request_id());
    }

    #[test]
    fn forwarded_headers() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "9.9.9.9"),
        ]);
        let host = HeaderValue::from_static("a.example:8080");
        set_forwarded(
            &mut h,
            &ForwardedFor {
                peer: "::ffff:10.0.0.1".parse().expect("test ip"),
                proto: "http",
                host: Some(&host),
                port: 8080,
            },
        );
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.1");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "a.example:8080");
        assert_eq!(h["x-forwarded-port"], "8080");
        assert_eq!(h["x-real-ip"], "10.0.0.1");
    }
}
