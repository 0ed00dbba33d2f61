//! Endpoint safety (the CVE-2021-25740 class): which upstream addresses Portcullis
//! refuses to connect to, and which ExternalName values are DNS names at all.
//!
//! One set of rules serves both places that decide: translation, for endpoint addresses
//! and ExternalName IP literals, and the data path, for the addresses an ExternalName
//! resolves to when connecting. Addresses are compared in canonical form, so an
//! IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is judged as the IPv4 address it maps.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Which upstream addresses may be connected to. `Default` is Kubernetes mode's policy
/// with no listener addresses known: loopback, link-local and unspecified are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Allow loopback, link-local and unspecified addresses (file mode: local
    /// development needs them).
    pub allow_local: bool,
    /// Portcullis' own listener addresses: refused whatever `allow_local` says. A
    /// listener on an unspecified address also covers the loopback and unspecified
    /// addresses on its port.
    pub own_addresses: Vec<SocketAddr>,
}

/// Why an upstream address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// One of Portcullis' own listeners.
    OwnListener,
    /// Loopback, link-local or unspecified, outside file mode.
    Local,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::OwnListener => "points at one of Portcullis' own listeners",
            Refusal::Local => "loopback, link-local and unspecified addresses are not allowed",
        })
    }
}

/// `ip` in canonical form: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) becomes the
/// IPv4 address it maps (a socket connected to `::ffff:127.0.0.1` reaches 127.0.0.1),
/// and so does a deprecated IPv4-compatible one (`::a.b.c.d`, RFC 4291 2.5.5.1), which
/// a host with a `sit` tunnel answers on; `::` and `::1` stay what they are.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.is_loopback() || v6.is_unspecified() => ip,
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .or_else(|| {
                let [a, b, c, d, e, f, g, h] = v6.segments();
                ([a, b, c, d, e, f] == [0; 6]).then(|| {
                    let [g1, g0] = g.to_be_bytes();
                    let [h1, h0] = h.to_be_bytes();
                    std::net::Ipv4Addr::new(g1, g0, h1, h0)
                })
            })
            .map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` (canonical) is loopback, link-local or unspecified.
fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_unicast_link_local(),
    }
}

impl EndpointPolicy {
    /// Why `addr` must not be connected to, if it must not.
    pub fn refusal(&self, addr: SocketAddr) -> Option<Refusal> {
        let ip = canonical(addr.ip());
        let ours = self.own_addresses.iter().any(|own| {
            let own_ip = canonical(own.ip());
            // An unspecified address stands for every local one on either side: a
            // listener on 0.0.0.0 takes connects to 127.0.0.1, and a connect to 0.0.0.0
            // reaches a listener on 127.0.0.1.
            own.port() == addr.port()
                && (own_ip == ip
                    || (own_ip.is_unspecified() && (ip.is_loopback() || ip.is_unspecified()))
                    || (ip.is_unspecified() && own_ip.is_loopback()))
        });
        if ours {
            Some(Refusal::OwnListener)
        } else if is_local(ip) && !self.allow_local {
            Some(Refusal::Local)
        } else {
            None
        }
    }
}

/// Whether `name` is a DNS name an upstream can be looked up by: dot-separated labels
/// of 1 to 63 letters, digits and hyphens, no label starting or ending with a hyphen,
/// at most 253 characters without the one trailing dot allowed (Kubernetes' DNS-1123
/// subdomain, with letters of either case).
pub fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn local_addresses_are_refused_in_canonical_form() {
        let kube = EndpointPolicy::default();
        for a in [
            "127.0.0.1:80",
            "127.9.9.9:80",
            "169.254.169.254:80",
            "0.0.0.0:80",
            "[::1]:80",
            "[::]:80",
            "[fe80::1]:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:169.254.169.254]:80",
            "[::ffff:0.0.0.0]:80",
            "[::127.0.0.1]:80",
            "[::169.254.169.254]:80",
        ] {
            assert_eq!(kube.refusal(addr(a)), Some(Refusal::Local), "{a}");
        }
        for a in ["10.0.0.1:80", "[::ffff:10.0.0.1]:80", "[2001:db8::1]:80"] {
            assert_eq!(kube.refusal(addr(a)), None, "{a}");
        }
        let files = EndpointPolicy {
            allow_local: true,
            ..EndpointPolicy::default()
        };
        assert_eq!(files.refusal(addr("[::ffff:127.0.0.1]:80")), None);
    }

    #[test]
    fn own_listeners_are_refused_in_every_mode() {
        let policy = EndpointPolicy {
            allow_local: true,
            own_addresses: vec![addr("0.0.0.0:8080"), addr("10.0.0.9:8443")],
        };
        for a in [
            "127.0.0.1:8080",
            "[::ffff:127.0.0.1]:8080",
            "0.0.0.0:8080",
            "10.0.0.9:8443",
            "[::ffff:10.0.0.9]:8443",
        ] {
            assert_eq!(policy.refusal(addr(a)), Some(Refusal::OwnListener), "{a}");
        }
        assert_eq!(policy.refusal(addr("10.0.0.9:8080")), None);

        // A connect to the unspecified address reaches a loopback listener.
        let loopback = EndpointPolicy {
            allow_local: true,
            own_addresses: vec![addr("127.0.0.1:8080"), addr("[::1]:8443")],
        };
        for a in ["0.0.0.0:8080", "[::ffff:0.0.0.0]:8080", "[::]:8443"] {
            assert_eq!(loopback.refusal(addr(a)), Some(Refusal::OwnListener), "{a}");
        }
        assert_eq!(loopback.refusal(addr("0.0.0.0:9090")), None);
    }

    #[test]
    fn dns_names() {
        for ok in [
            "api.example.net",
            "api.example.net.",
            "Svc.NS.svc.cluster.local",
            "a",
            "127.1",
            "x-1.y",
        ] {
            assert!(is_dns_name(ok), "{ok}");
        }
        let long_label = "a".repeat(64);
        let long_name = ["a"; 128].join(".");
        for bad in [
            "",
            ".",
            "bad name!",
            "a..b",
            ".a",
            "a.b..",
            "-a.b",
            "a-.b",
            "a_b.c",
            "::1",
            "a:80",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(!is_dns_name(bad), "{bad:?}");
        }
    }
}
