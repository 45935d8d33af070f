//! Who may connect, and on what terms: the part of `[panels]` a reload (SIGHUP) changes
//! while panels stay connected — tokens and the filters they allow, `allowed_origins`,
//! `server_names`, `max_panels`, `slow_policy`, `metrics_token`.
//!
//! A panel keeps what it was admitted with ([`Admission`]: the SHA-256 of its token,
//! never the token, and its `Origin` and `Host` headers). After a reload each session
//! checks it again against the new [`PanelPolicy`]: a panel whose token is gone, whose
//! token no longer allows one of its filters, or whose origin is no longer allowed is
//! closed with 1008 (policy violation, RFC 6455 §7.4.1) and a reason; the others stay
//! connected and continue under the new terms.

use sha2::{Digest, Sha256};

use super::protocol::{self, Access};
use crate::config::{Config, PanelToken, SlowPolicy, TokenDigest};
use crate::routing::Filter;

/// The live part of `[panels]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PanelPolicy {
    /// At most this many panels at a time; the next upgrade gets HTTP 503. Lowering it
    /// closes nobody: new panels wait until enough have left.
    pub max_panels: usize,
    /// Origins (RFC 6454 serialisation) a browser may open the stream from; empty = any.
    pub allowed_origins: Vec<String>,
    /// The names this box answers to (lowercase, without port or trailing dot); empty =
    /// any `Host`. See [`host_refused`].
    pub server_names: Vec<String>,
    /// Access tokens; none = open.
    pub tokens: Vec<PanelToken>,
    /// What happens to a panel that falls behind the oldest retained event.
    pub slow_policy: SlowPolicy,
    /// SHA-256 of the bearer token `GET /metrics` requires (`None`: open).
    pub metrics_token: Option<TokenDigest>,
}

impl PanelPolicy {
    pub fn from_config(cfg: &Config) -> Self {
        PanelPolicy {
            max_panels: cfg.panels.max_panels,
            allowed_origins: cfg.panels.allowed_origins.clone(),
            server_names: (cfg.panels.server_names.iter())
                .filter_map(|n| super::origin::host_name(n))
                .collect(),
            tokens: cfg.panels.tokens.clone(),
            slow_policy: cfg.panels.slow_policy,
            metrics_token: cfg.panels.metrics_token,
        }
    }
}

/// Why a connected panel no longer meets the policy: the reason of its 1008 close
/// (at most 123 bytes, RFC 6455 §5.5).
pub(crate) type Withdrawn = &'static str;

/// What a panel was admitted with, kept to check it again after a reload.
#[derive(Debug, Clone, Default)]
pub(crate) struct Admission {
    /// SHA-256 of the token it presented (`None`: none presented).
    pub token: Option<TokenDigest>,
    /// Its `Origin` header lines, joined by `\n` (empty: not a browser). One allocation
    /// of their length: together with `host` at most `budget::PANEL_ADMISSION` bytes.
    pub origin: Box<str>,
    /// Its `Host` header (the built-in page's own origin is always allowed).
    pub host: Option<Box<str>>,
}

impl Admission {
    pub fn new(presented: Option<&str>, origin: &[&str], host: Option<&str>) -> Self {
        Admission {
            token: presented.map(|t| TokenDigest(Sha256::digest(t.as_bytes()).into())),
            origin: origin.join("\n").into(),
            host: host.map(Box::from),
        }
    }

    /// Bytes of `Origin` lines and `Host` a panel admitted with `origin` and `host`
    /// keeps (one separator per line).
    pub fn kept_bytes(origin: &[&str], host: Option<&str>) -> usize {
        origin.iter().map(|o| o.len() + 1).sum::<usize>() + host.map_or(0, str::len)
    }

    /// Check the panel against `policy`: the filters its token allows now (`None`:
    /// open), or why it must go. `filters` are the ones it reads.
    pub fn recheck<'f>(
        &self,
        policy: &PanelPolicy,
        filters: impl IntoIterator<Item = &'f Filter>,
    ) -> Result<Option<std::sync::Arc<[Filter]>>, Withdrawn> {
        if host_refused(&policy.server_names, self.host.as_deref()).is_some() {
            return Err("host no longer in panels.server_names");
        }
        let lines: Vec<&str> = if self.origin.is_empty() {
            Vec::new()
        } else {
            self.origin.split('\n').collect()
        };
        if origin_refused(policy, &lines, self.host.as_deref()).is_some() {
            return Err("origin no longer allowed");
        }
        let allow =
            match protocol::authorize_digest(&policy.tokens, self.token.as_ref().map(|d| &d.0)) {
                Access::Open => None,
                Access::Token(i) => Some(policy.tokens[i].allow.clone()),
                Access::Denied => return Err("token revoked"),
            };
        if filters
            .into_iter()
            .any(|f| !protocol::allowed(f, allow.as_deref()))
        {
            return Err("token no longer allows its filters");
        }
        Ok(allow)
    }
}

/// Why a request's `Host` header (`host[:port]`) is refused, for the 421 (Misdirected
/// Request, RFC 9110 §15.5.20); `None`: served. With `server_names` empty every request
/// is served. With it set, the `Host` must name this box: an IP address, `localhost`, or
/// one of `server_names` (case-insensitive, the port and a trailing dot ignored). This is
/// the defence against DNS rebinding: a web page on another site that points its own
/// name at this box reaches it with that name in `Host`.
pub(crate) fn host_refused(server_names: &[String], host: Option<&str>) -> Option<String> {
    if server_names.is_empty() {
        return None;
    }
    let Some(host) = host else {
        return Some("a Host header is required".into());
    };
    match super::origin::host_name(host) {
        None => Some("malformed Host header".into()),
        Some(name) if names_this_box(server_names, &name) => None,
        Some(name) => Some(format!(
            "Host {} is not in panels.server_names",
            crate::redact::peer_text(&name)
        )),
    }
}

/// Does `name` (a [`super::origin::host_name`]) name this box for certain?
fn names_this_box(server_names: &[String], name: &str) -> bool {
    super::origin::is_address_or_localhost(name) || server_names.iter().any(|n| n == name)
}

/// Is a request with these `Origin` header `lines` acceptable? No `Origin` (a
/// non-browser client) is. With `allowed_origins` set, every origin the request names
/// (RFC 6454 §7: the header may be a space-separated list, and a request with more than
/// one line is judged by all of them) must be an allowed one, or the page's own origin,
/// compared as (scheme, host, port) with default ports (RFC 6454 §5). The own origin is
/// the request's `Host`, and only when that names this box for certain (an IP address,
/// `localhost`, or one of `server_names`): a name another site controls could point at
/// this box (DNS rebinding) and would pass as the page's own origin.
/// Returns the first origin not admitted (for the 403's message: with a list, not the
/// first origin, which may be an allowed one).
pub(crate) fn origin_refused<'a>(
    policy: &PanelPolicy,
    lines: &[&'a str],
    host: Option<&str>,
) -> Option<&'a str> {
    let allowed = &policy.allowed_origins;
    if lines.is_empty() || allowed.is_empty() {
        return None;
    }
    let own_host = host.filter(|h| {
        super::origin::host_name(h).is_some_and(|n| names_this_box(&policy.server_names, &n))
    });
    let admitted = |o: &str| {
        // The built-in page talks to the host that served it.
        let own = own_host.is_some_and(|host| {
            super::origin::Origin::parse(o).is_some_and(|origin| origin.is_served_by(host))
        });
        own || allowed.iter().any(|a| super::origin::same(a, o))
    };
    for line in lines {
        if super::origin::list_allowed(line, admitted) {
            continue;
        }
        // The line is refused: name its first origin that is not admitted (an empty
        // line has none; name the line).
        let refused = line
            .split([' ', '\t'])
            .filter(|o| !o.is_empty())
            .find(|o| !admitted(o));
        return Some(refused.unwrap_or(line));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str, secret: &str, allow: &[&str]) -> PanelToken {
        PanelToken {
            name: name.into(),
            sha256: Sha256::digest(secret.as_bytes()).into(),
            allow: allow.iter().map(|f| Filter::parse(f).unwrap()).collect(),
        }
    }

    #[test]
    fn a_refused_origin_list_names_the_origin_refused() {
        let allowed = policy(vec![], &["https://panel.example"]);
        let lines = ["https://panel.example http://evil.example"];
        assert_eq!(
            origin_refused(&allowed, &lines, None),
            Some("http://evil.example")
        );
        let lines = ["https://panel.example", "http://evil.example"];
        assert_eq!(
            origin_refused(&allowed, &lines, None),
            Some("http://evil.example")
        );
        assert_eq!(
            origin_refused(&allowed, &["https://panel.example"], None),
            None
        );
        assert_eq!(
            origin_refused(&policy(vec![], &[]), &["http://evil.example"], None),
            None
        );
    }

    #[test]
    fn the_page_own_origin_counts_only_for_a_name_of_this_box() {
        let mut p = policy(vec![], &["https://hmi.plant"]);
        // Served by address or localhost: its own origin is admitted.
        for (origin, host) in [
            ("http://127.0.0.1:8080", "127.0.0.1:8080"),
            ("http://[::1]:8080", "[::1]:8080"),
            ("http://localhost:8080", "LOCALHOST:8080"),
            ("http://gw.localhost", "gw.localhost"),
        ] {
            assert_eq!(origin_refused(&p, &[origin], Some(host)), None, "{host}");
        }
        // DNS rebinding: a name another site controls, pointed at this box, is not the
        // page's own origin unless the box is configured to answer to it.
        let rebound = ["http://evil.example:8080"];
        assert_eq!(
            origin_refused(&p, &rebound, Some("evil.example:8080")),
            Some("http://evil.example:8080")
        );
        let named = ["http://gw17.plant:8080"];
        assert_eq!(
            origin_refused(&p, &named, Some("gw17.plant:8080")),
            Some("http://gw17.plant:8080")
        );
        p.server_names = vec!["gw17.plant".into()];
        assert_eq!(origin_refused(&p, &named, Some("GW17.plant:8080")), None);
        assert_eq!(
            origin_refused(&p, &rebound, Some("evil.example:8080")),
            Some("http://evil.example:8080")
        );
    }

    #[test]
    fn hosts_are_checked_only_with_server_names() {
        assert_eq!(host_refused(&[], Some("evil.example")), None);
        assert_eq!(host_refused(&[], None), None);
        let names = ["gw17.plant".to_string()];
        for ok in [
            "gw17.plant",
            "GW17.Plant:8080",
            "gw17.plant.",
            "10.0.0.17:8080",
            "[fe80::1]:8080",
            "localhost:8080",
        ] {
            assert_eq!(host_refused(&names, Some(ok)), None, "{ok}");
        }
        assert_eq!(
            host_refused(&names, Some("evil.example:8080")).as_deref(),
            Some("Host evil.example is not in panels.server_names")
        );
        for bad in ["gw17.plant.evil.example", "gw17", "10.0.0.17.evil.example"] {
            assert!(host_refused(&names, Some(bad)).is_some(), "{bad}");
        }
        assert_eq!(
            host_refused(&names, Some("gw17.plant:x")).as_deref(),
            Some("malformed Host header")
        );
        assert_eq!(
            host_refused(&names, None).as_deref(),
            Some("a Host header is required")
        );
    }

    fn policy(tokens: Vec<PanelToken>, origins: &[&str]) -> PanelPolicy {
        PanelPolicy {
            max_panels: 10,
            allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
            server_names: Vec::new(),
            tokens,
            slow_policy: SlowPolicy::Skip,
            metrics_token: None,
        }
    }

    #[test]
    fn a_reload_keeps_revokes_or_narrows() {
        let f = |s: &str| Filter::parse(s).unwrap();
        let a = Admission::new(Some("s1"), &[], None);
        let line1 = [f("line1/#")];
        let before = policy(vec![token("t", "s1", &["line1/#"])], &[]);
        assert_eq!(
            a.recheck(&before, &line1),
            Ok(Some(vec![f("line1/#")].into())),
            "unchanged"
        );
        // The same token, renamed and widened: kept, with the new filters.
        let wider = policy(vec![token("renamed", "s1", &["#"])], &[]);
        assert_eq!(a.recheck(&wider, &line1), Ok(Some(vec![f("#")].into())));
        // Gone, or no longer allowing line1: withdrawn.
        let gone = policy(vec![token("t", "s2", &["#"])], &[]);
        assert_eq!(a.recheck(&gone, &line1), Err("token revoked"));
        let narrowed = policy(vec![token("t", "s1", &["line2/#"])], &[]);
        assert_eq!(
            a.recheck(&narrowed, &line1),
            Err("token no longer allows its filters")
        );
        // Tokens removed altogether: open.
        assert_eq!(a.recheck(&policy(vec![], &[]), &line1), Ok(None));
        // A panel that came without a token while the port was open.
        let anon = Admission::new(None, &[], None);
        assert_eq!(anon.recheck(&before, &line1), Err("token revoked"));
    }

    #[test]
    fn origins_are_checked_again() {
        let f = [Filter::parse("#").unwrap()];
        let a = Admission::new(None, &["https://hmi.plant"], Some("gw:8080"));
        assert!(a.recheck(&policy(vec![], &[]), &f).is_ok());
        assert!(
            a.recheck(&policy(vec![], &["https://hmi.plant"]), &f)
                .is_ok()
        );
        assert_eq!(
            a.recheck(&policy(vec![], &["https://other.plant"]), &f),
            Err("origin no longer allowed")
        );
        // Two Origin lines are kept as two: each must still be allowed.
        let two = Admission::new(None, &["https://hmi.plant", "https://b.plant"], None);
        let only_one = policy(vec![], &["https://hmi.plant"]);
        assert_eq!(two.recheck(&only_one, &f), Err("origin no longer allowed"));
        let both = policy(vec![], &["https://hmi.plant", "https://b.plant"]);
        assert!(two.recheck(&both, &f).is_ok());
        // A client without Origin (not a browser) is never refused for it.
        let cli = Admission::new(None, &[], None);
        assert!(cli.recheck(&policy(vec![], &["https://x"]), &f).is_ok());
        // A name the box no longer answers to.
        let mut p = policy(vec![], &[]);
        p.server_names = vec!["gw-new".into()];
        assert_eq!(
            a.recheck(&p, &f),
            Err("host no longer in panels.server_names")
        );
        p.server_names.push("gw".into());
        assert!(a.recheck(&p, &f).is_ok());
    }
}
