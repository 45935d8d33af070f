//! Origins compared as RFC 6454 says: a (scheme, host, port) triple, scheme and host
//! case-insensitive, a missing port equal to the scheme's default (`http://a` is
//! `http://a:80`). Used for `panels.allowed_origins` and for the built-in page's own
//! origin (the request's `Host`).

/// A tuple origin (RFC 6454 §4), normalised: lowercase scheme and host, effective port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    /// The explicit port, else the scheme's default; `None` for a scheme without one.
    port: Option<u16>,
}

/// The default port of a scheme a browser page or WebSocket can have.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Split `host[:port]` (IPv6 literals in brackets); the host lowercased, the port
/// parsed. `None` when malformed.
fn host_port(s: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{h}]"), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    let valid_host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // an IP literal
        Some(ip) => {
            !ip.is_empty()
                && ip
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":.%".contains(&b))
        }
        // a registered name or IPv4 address
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b))
        }
    };
    if !valid_host {
        return None;
    }
    let port = match port {
        // RFC 3986 allows an empty port ("host:"), meaning the default.
        None | Some("") => None,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse::<u16>().ok()?),
        Some(_) => return None,
    };
    Some((host.to_ascii_lowercase(), port))
}

/// The name of a `Host` header value (`host[:port]`, RFC 9110 §7.2): lowercased,
/// without its port and one trailing dot (`Gw17.Plant.` is `gw17.plant`); IPv6 literals
/// keep their brackets. `None` when malformed.
pub fn host_name(host: &str) -> Option<String> {
    let (mut h, _) = host_port(host.trim())?;
    if h.len() > 1 && h.ends_with('.') {
        h.pop();
    }
    Some(h)
}

/// Why `entry` cannot be a `panels.server_names` entry (`None`: it can): a host name,
/// without scheme or port, in ASCII; IP addresses are accepted (they always pass).
pub fn server_name_problem(entry: &str) -> Option<&'static str> {
    const EXAMPLE: &str = "must be a host name, such as \"gw17.plant.local\"";
    if entry.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    if entry.trim() != entry || entry.is_empty() {
        return Some("must be a host name without surrounding spaces");
    }
    if entry.contains("://") || entry.contains('/') {
        return Some("must be a host name without scheme or path, such as \"gw17.plant.local\"");
    }
    if entry.contains('*') {
        return Some("wildcards are not supported: list each name the box is reached by");
    }
    if !entry.is_ascii() {
        return Some(
            "must be ASCII: write an internationalised name in its punycode form (xn--...), \
             as browsers send it",
        );
    }
    let after_literal = entry.rsplit_once(']').map_or(entry, |(_, after)| after);
    if after_literal.contains(':') {
        return Some("must be a host name without a port (any port is accepted)");
    }
    if host_name(entry).is_none() {
        return Some(EXAMPLE);
    }
    None
}

/// Is `name` (from [`host_name`]) one that only this box can be reached by from a
/// browser — an IP address, `localhost` or a `*.localhost` name (which browsers resolve
/// to loopback themselves, RFC 6761 §6.3)? A page on another site can point a name it
/// owns at this box (DNS rebinding), but not an address or these names.
pub fn is_address_or_localhost(name: &str) -> bool {
    (name.strip_prefix('[').and_then(|n| n.strip_suffix(']')))
        .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        || name.parse::<std::net::Ipv4Addr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
}

impl Origin {
    /// Parse a serialised origin, `scheme://host[:port]`, tolerating one trailing `/`
    /// (people copy origins from the address bar). `None` for anything else, including
    /// the opaque origin `null`.
    pub fn parse(s: &str) -> Option<Origin> {
        let s = s.trim();
        let s = s.strip_suffix('/').unwrap_or(s);
        let (scheme, rest) = s.split_once("://")?;
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
        if !scheme_ok || rest.contains(['/', '?', '#', '@']) {
            return None;
        }
        let scheme = scheme.to_ascii_lowercase();
        let (host, port) = host_port(rest)?;
        let port = port.or_else(|| default_port(&scheme));
        Some(Origin { scheme, host, port })
    }

    /// Is this the origin of a page served from `host` (a `Host` header value), i.e.
    /// the built-in page's own origin? The page's scheme is whatever the browser used
    /// (TLS may end at a reverse proxy), so only http and https qualify and the
    /// `Host`'s missing port is the default of this origin's scheme.
    pub fn is_served_by(&self, host: &str) -> bool {
        if self.scheme != "http" && self.scheme != "https" {
            return false;
        }
        let Some((h, port)) = host_port(host.trim()) else {
            return false;
        };
        h == self.host && port.or_else(|| default_port(&self.scheme)) == self.port
    }
}

/// Does an allowed-origins entry admit the `Origin` header value `offered`? An
/// `Origin` may be a space-separated list (RFC 6454 §7.1, redirects): every origin in
/// it must be admitted. The opaque origin `null` matches only an entry `null`.
pub fn list_allowed(offered: &str, allowed: impl Fn(&str) -> bool) -> bool {
    let mut any = false;
    for o in offered.split([' ', '\t']).filter(|o| !o.is_empty()) {
        any = true;
        if !allowed(o) {
            return false;
        }
    }
    any
}

/// Does `entry` (from `panels.allowed_origins`) name the same origin as `offered`?
pub fn same(entry: &str, offered: &str) -> bool {
    if offered.eq_ignore_ascii_case("null") || entry.eq_ignore_ascii_case("null") {
        return offered.eq_ignore_ascii_case(entry.trim());
    }
    match (Origin::parse(entry), Origin::parse(offered)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Is `entry` acceptable in `panels.allowed_origins`?
pub fn valid_entry(entry: &str) -> bool {
    entry.trim().eq_ignore_ascii_case("null") || Origin::parse(entry).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_compare_as_tuples() {
        let same_pairs = [
            ("http://panel.local:8080", "http://panel.local:8080"),
            ("http://panel.local:8080/", "http://panel.local:8080"),
            ("HTTP://Panel.LOCAL:8080", "http://panel.local:8080"),
            ("http://panel.local", "http://panel.local:80"),
            ("https://panel.local:443", "https://panel.local"),
            ("http://[::1]:8080", "http://[::1]:8080"),
            ("http://[::1]", "http://[::1]:80"),
            ("http://panel.local:", "http://panel.local"),
            ("null", "null"),
        ];
        for (a, b) in same_pairs {
            assert!(same(a, b), "{a} = {b}");
            assert!(same(b, a), "{b} = {a}");
        }
        let different = [
            ("http://panel.local", "https://panel.local"),
            ("http://panel.local:8080", "http://panel.local"),
            ("http://panel.local:443", "https://panel.local:80"),
            ("http://panel.local", "http://panel.local.evil.example"),
            ("http://panel.local", "http://evil.example/panel.local"),
            ("http://panel.local", "null"),
            ("http://panel.local", "panel.local"),
            ("http://panel.local", "http://user@panel.local"),
            ("http://panel.local:8080", "http://panel.local:08080x"),
            ("http://panel.local", ""),
        ];
        for (a, b) in different {
            assert!(!same(a, b), "{a} != {b}");
        }
        assert!(valid_entry("https://panel.local"));
        assert!(valid_entry("null"));
        assert!(!valid_entry("panel.local:8080"));
        assert!(!valid_entry("http://"));
        assert!(!valid_entry("http://a/b"));
        assert!(!valid_entry("http://a:99999"));
    }

    #[test]
    fn page_origin_against_host() {
        let o = |s| Origin::parse(s).unwrap();
        assert!(o("http://gw.local:8080").is_served_by("gw.local:8080"));
        assert!(o("http://GW.local:8080").is_served_by("gw.LOCAL:8080"));
        assert!(o("http://gw.local").is_served_by("gw.local:80"));
        assert!(o("http://gw.local:80").is_served_by("gw.local"));
        assert!(o("https://gw.local").is_served_by("gw.local"));
        assert!(o("https://gw.local").is_served_by("gw.local:443"));
        assert!(o("http://[::1]:8080").is_served_by("[::1]:8080"));
        assert!(!o("http://gw.local").is_served_by("gw.local:8080"));
        assert!(!o("https://gw.local").is_served_by("gw.local:80"));
        assert!(!o("http://evil.example").is_served_by("gw.local"));
        assert!(!o("ftp://gw.local").is_served_by("gw.local"));
    }

    #[test]
    fn server_name_entries_say_what_is_wrong() {
        for ok in [
            "gw17.plant.local",
            "GW17",
            "10.0.0.17",
            "fe80::1",
            "[fe80::1]",
            "xn--bcher-kva.plant",
        ] {
            assert_eq!(server_name_problem(ok), None, "{ok}");
        }
        for (bad, says) in [
            ("gw17.plant.local:8080", "port"),
            ("http://gw17.plant.local", "scheme"),
            ("*.plant.local", "wildcards"),
            ("bücher.plant", "punycode"),
            (" gw17", "spaces"),
            ("", "spaces"),
            ("gw 17", "host name"),
        ] {
            let why = server_name_problem(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(why.contains(says), "{bad:?}: {why}");
        }
    }

    #[test]
    fn host_names_and_the_names_only_this_box_has() {
        assert_eq!(host_name("GW17.Plant.:8080").as_deref(), Some("gw17.plant"));
        assert_eq!(host_name("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(host_name("10.0.0.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(host_name("a b"), None);
        assert_eq!(host_name("gw:port"), None);
        for own in ["10.0.0.1", "[fe80::1]", "localhost", "panel.localhost"] {
            assert!(is_address_or_localhost(own), "{own}");
        }
        for other in [
            "gw17.plant",
            "10.0.0.1.evil.example",
            "localhost.evil.example",
            "127.1",
            "[evil.example]",
        ] {
            assert!(!is_address_or_localhost(other), "{other}");
        }
    }

    #[test]
    fn origin_lists_need_every_member() {
        let ok = |o: &str| same("http://a", o);
        assert!(list_allowed("http://a", ok));
        assert!(list_allowed("http://a  http://A:80", ok));
        assert!(!list_allowed("http://a http://b", ok));
        assert!(!list_allowed("", ok));
    }
}
