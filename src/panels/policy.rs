//! Who may connect, and on what terms: the part of `[panels]` a reload (SIGHUP) changes
//! while panels stay connected — tokens and the filters they allow, `allowed_origins`,
//! `max_panels`, `slow_policy`, `metrics_token`.
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
    /// Its `Origin` header lines (empty: not a browser).
    pub origin: Vec<String>,
    /// Its `Host` header (the built-in page's own origin is always allowed).
    pub host: Option<String>,
}

impl Admission {
    pub fn new(presented: Option<&str>, origin: Vec<String>, host: Option<String>) -> Self {
        Admission {
            token: presented.map(|t| TokenDigest(Sha256::digest(t.as_bytes()).into())),
            origin,
            host,
        }
    }

    /// Check the panel against `policy`: the filters its token allows now (`None`:
    /// open), or why it must go. `filters` are the ones it reads.
    pub fn recheck<'f>(
        &self,
        policy: &PanelPolicy,
        filters: impl IntoIterator<Item = &'f Filter>,
    ) -> Result<Option<Vec<Filter>>, Withdrawn> {
        let lines: Vec<&str> = self.origin.iter().map(String::as_str).collect();
        if !origin_allowed(&policy.allowed_origins, &lines, self.host.as_deref()) {
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

/// Is a request with these `Origin` header `lines` acceptable? No `Origin` (a
/// non-browser client) is. With `allowed` set, every origin the request names (RFC 6454
/// §7: the header may be a space-separated list, and a request with more than one line
/// is judged by all of them) must be the page's own origin (the `host` it was served
/// from) or an allowed one, compared as (scheme, host, port) with default ports (RFC
/// 6454 §5).
pub(crate) fn origin_allowed(allowed: &[String], lines: &[&str], host: Option<&str>) -> bool {
    origin_refused(allowed, lines, host).is_none()
}

/// The first origin of the `Origin` lines that [`origin_allowed`] would not admit (for the
/// 403's message: with a list, not the first origin, which may be an allowed one).
pub(crate) fn origin_refused<'a>(
    allowed: &[String],
    lines: &[&'a str],
    host: Option<&str>,
) -> Option<&'a str> {
    if lines.is_empty() || allowed.is_empty() {
        return None;
    }
    let admitted = |o: &str| {
        // The built-in page talks to the host that served it.
        let own = host.is_some_and(|host| {
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
        let allowed = vec!["https://panel.example".to_string()];
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
        assert_eq!(origin_refused(&[], &["http://evil.example"], None), None);
    }

    fn policy(tokens: Vec<PanelToken>, origins: &[&str]) -> PanelPolicy {
        PanelPolicy {
            max_panels: 10,
            allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
            tokens,
            slow_policy: SlowPolicy::Skip,
            metrics_token: None,
        }
    }

    #[test]
    fn a_reload_keeps_revokes_or_narrows() {
        let f = |s: &str| Filter::parse(s).unwrap();
        let a = Admission::new(Some("s1"), vec![], None);
        let line1 = [f("line1/#")];
        let before = policy(vec![token("t", "s1", &["line1/#"])], &[]);
        assert_eq!(
            a.recheck(&before, &line1),
            Ok(Some(vec![f("line1/#")])),
            "unchanged"
        );
        // The same token, renamed and widened: kept, with the new filters.
        let wider = policy(vec![token("renamed", "s1", &["#"])], &[]);
        assert_eq!(a.recheck(&wider, &line1), Ok(Some(vec![f("#")])));
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
        let anon = Admission::new(None, vec![], None);
        assert_eq!(anon.recheck(&before, &line1), Err("token revoked"));
    }

    #[test]
    fn origins_are_checked_again() {
        let f = [Filter::parse("#").unwrap()];
        let a = Admission::new(
            None,
            vec!["https://hmi.plant".into()],
            Some("gw:8080".into()),
        );
        assert!(a.recheck(&policy(vec![], &[]), &f).is_ok());
        assert!(
            a.recheck(&policy(vec![], &["https://hmi.plant"]), &f)
                .is_ok()
        );
        assert_eq!(
            a.recheck(&policy(vec![], &["https://other.plant"]), &f),
            Err("origin no longer allowed")
        );
        // A client without Origin (not a browser) is never refused for it.
        let cli = Admission::new(None, vec![], None);
        assert!(cli.recheck(&policy(vec![], &["https://x"]), &f).is_ok());
    }
}
