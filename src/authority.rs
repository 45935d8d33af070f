//! The `host[:port]` part of an endpoint or URL (RFC 3986 §3.2.2). The connection
//! string's Endpoint, `mqtt.url`, `source.proxy` and `NO_PROXY` entries take their host
//! and port from here, so each refuses the same malformed ones.

use std::net::{Ipv4Addr, Ipv6Addr};

/// `host[:port]` → (host without brackets, port, or `default` when none is given).
/// An IPv6 address must be in brackets (`[::1]:5671`). `None` for a port that is not
/// 1–65535 in decimal digits, an IPv6 address without brackets, or brackets around
/// anything but an IPv6 address.
pub fn split_host_port(s: &str, default: u16) -> Option<(String, u16)> {
    let port = |p: &str| {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse::<u16>().ok().filter(|p| *p != 0)
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        h.parse::<Ipv6Addr>().ok()?;
        let port = match after {
            "" => default,
            p => port(p.strip_prefix(':')?)?,
        };
        return Some((h.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), port(p)?)),
        Some(_) => None,
        None => Some((s.to_string(), default)),
    }
}

/// Does `s` (as [`split_host_port`] takes it) name a port?
pub fn has_port(s: &str) -> bool {
    match s.strip_prefix('[') {
        Some(rest) => rest.split_once(']').is_some_and(|(_, a)| !a.is_empty()),
        None => s.contains(':'),
    }
}

/// Is `host` (brackets removed) something to connect to: an IPv4 or IPv6 address, or a
/// DNS name of dot-separated labels of 1–63 letters, digits, `-` or `_` (RFC 1123; `_`
/// for internal names), at most 253 bytes, with an optional final dot. Spaces, control
/// characters and other punctuation are refused.
pub fn valid_host(host: &str) -> bool {
    if host.parse::<Ipv4Addr>().is_ok() || host.parse::<Ipv6Addr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_ports() {
        assert_eq!(split_host_port("ns:5671", 1), Some(("ns".into(), 5671)));
        assert_eq!(split_host_port("ns", 1), Some(("ns".into(), 1)));
        assert_eq!(split_host_port("[::1]", 1), Some(("::1".into(), 1)));
        assert_eq!(split_host_port("[::1]:99", 1), Some(("::1".into(), 99)));
        for bad in [
            "ns:+5671", "ns:0", "ns:65536", "ns:", "ns: 1", "a:b:5671", "::1", "[::1", "[host]:1",
            "[::1]x", "[::1]:",
        ] {
            assert_eq!(split_host_port(bad, 1), None, "{bad}");
        }
        assert!(has_port("ns:1") && has_port("[::1]:1"));
        assert!(!has_port("ns") && !has_port("[::1]"));
        for good in [
            "ns.servicebus.windows.net",
            "localhost",
            "127.0.0.1",
            "::1",
            "broker_1.plant.local.",
            "10-0-0-1",
        ] {
            assert!(valid_host(good), "{good}");
        }
        for bad in [
            "",
            "n s",
            "n\0s",
            "pr%oxy",
            "a..b",
            ".a",
            "ns?x=1",
            "h＠x",
            "a/b",
            &"a".repeat(64),
            &format!("{}.x", "a.".repeat(127)),
        ] {
            assert!(!valid_host(bad), "{bad:?}");
        }
    }
}
