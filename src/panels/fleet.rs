//! The built-in page in a fleet of boxes (`panels.peer_gateways`, docs/fleet.md): the
//! page learns the other boxes' base URLs from a `<meta name="asbgw-peers">` tag and
//! fails over to them; its Content-Security-Policy allows WebSocket connections to
//! exactly those boxes (`connect-src 'self' ws://box-b:8080 …`) and to nothing else, so
//! neither a crafted link nor injected script can make the page send its token to
//! another host.
//!
//! A peer is `http[s]://host[:port][/path/]`, the address a browser opens the other
//! box's page at (a path prefix for a reverse proxy); its stream is `ws[s]://host[:port]
//! /path/v1/stream`. Validation keeps every character that could end a CSP source
//! expression or an HTML attribute out of it.

use bytes::Bytes;
use hyper::header::HeaderValue;

/// The meta tag of `page.html` that carries the peers (empty there).
const PEERS_META: &str = "<meta name=\"asbgw-peers\" content=\"\">";

/// Is `url` a valid `panels.peer_gateways` entry: `http://` or `https://`, a host (name,
/// IPv4 or bracketed IPv6) with an optional port, and an optional path of unreserved
/// characters (`A-Z a-z 0-9 - . _ ~ / %`), without query, fragment or user info?
pub fn valid_peer(url: &str) -> bool {
    split_peer(url).is_some()
}

/// `(websocket scheme, authority)` of a valid peer URL.
fn split_peer(url: &str) -> Option<(&'static str, &str)> {
    let (ws, rest) = if let Some(r) = url.strip_prefix("http://") {
        ("ws", r)
    } else if let Some(r) = url.strip_prefix("https://") {
        ("wss", r)
    } else {
        return None;
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let path_ok = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~/%".contains(&b));
    // The authority must be a whole origin on its own: host and port, nothing else.
    let origin_ok = super::origin::Origin::parse(&format!("http://{authority}")).is_some()
        && !authority.contains(['\'', '"', ';', ',', ' ', '*']);
    (path_ok && origin_ok).then_some((ws, authority))
}

/// The page's CSP: `base` with each peer's WebSocket origin added after
/// `connect-src 'self'` (`base` itself when there are no peers).
pub(super) fn page_csp(base: &'static str, peers: &[String]) -> HeaderValue {
    let sources: Vec<String> = peers
        .iter()
        .filter_map(|p| split_peer(p))
        .map(|(scheme, authority)| format!("{scheme}://{authority}"))
        .collect();
    if sources.is_empty() {
        return HeaderValue::from_static(base);
    }
    let csp = base.replacen(
        "connect-src 'self'",
        &format!("connect-src 'self' {}", sources.join(" ")),
        1,
    );
    HeaderValue::from_str(&csp).unwrap_or_else(|_| HeaderValue::from_static(base))
}

/// The page with the peers (space-separated) in its `asbgw-peers` meta tag.
pub(super) fn page_html(html: &'static str, peers: &[String]) -> Bytes {
    let valid: Vec<&str> = peers
        .iter()
        .map(String::as_str)
        .filter(|p| valid_peer(p))
        .collect();
    if valid.is_empty() {
        return Bytes::from_static(html.as_bytes());
    }
    let meta = format!(
        "<meta name=\"asbgw-peers\" content=\"{}\">",
        valid.join(" ")
    );
    Bytes::from(html.replacen(PEERS_META, &meta, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "default-src 'none'; connect-src 'self'; img-src 'self'";

    #[test]
    fn peers_are_urls_of_pages_and_nothing_else() {
        for ok in [
            "http://box-b.local:8080",
            "http://box-b.local:8080/",
            "https://10.0.0.7/gw/",
            "http://[fd00::7]:8080/",
        ] {
            assert!(valid_peer(ok), "{ok}");
        }
        for bad in [
            "",
            "box-b:8080",
            "ws://box-b:8080",
            "ftp://box-b/",
            "http://",
            "http://a b/",
            "http://box-b/?x=1",
            "http://box-b/#x",
            "http://user@box-b/",
            "http://box-b; script-src *",
            "http://box-b/;script-src",
            "http://box-b/\"><script>",
            "http://box-b/ 'unsafe-inline'",
            "http://*.local/",
            "http://box-b:99999/",
        ] {
            assert!(!valid_peer(bad), "{bad}");
        }
    }

    #[test]
    fn the_config_key_is_checked_and_names_the_entry() {
        use crate::config::{Config, LoadEnv};
        let cfg = |peers: &str| {
            Config::parse(
                &format!(
                    "[source]\nconnection_string = \"Endpoint=sb://h/;SharedAccessKeyName=k;SharedAccessKey=v\"\n\
                     [[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n\
                     [panels]\npeer_gateways = {peers}\n"
                ),
                &LoadEnv::default(),
            )
        };
        let ok = cfg("[\"http://box-b:8080/\"]").expect("a valid peer");
        assert_eq!(ok.panels.peer_gateways, ["http://box-b:8080/"]);
        let err = cfg("[\"http://box-b:8080/\", \"http://x; script-src *\"]")
            .expect_err("a CSP injection is refused")
            .to_string();
        assert!(err.contains("panels.peer_gateways[1]"), "{err}");
    }

    #[test]
    fn the_csp_allows_the_peers_websockets_only() {
        assert_eq!(page_csp(BASE, &[]), BASE);
        let peers = ["http://box-b:8080/".to_string(), "https://box-c/gw/".into()];
        assert_eq!(
            page_csp(BASE, &peers),
            "default-src 'none'; connect-src 'self' ws://box-b:8080 wss://box-c; img-src 'self'"
        );
    }

    #[test]
    fn the_page_names_its_peers() {
        let html = "<head><meta name=\"asbgw-peers\" content=\"\"></head>";
        assert_eq!(page_html(html, &[]), html.as_bytes());
        let peers = ["http://box-b:8080/".to_string(), "https://box-c/gw/".into()];
        assert_eq!(
            page_html(html, &peers),
            "<head><meta name=\"asbgw-peers\" content=\"http://box-b:8080/ https://box-c/gw/\"></head>"
                .as_bytes()
        );
    }
}
