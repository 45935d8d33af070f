//! Protocol v1 pieces that need no socket: the `/v1/stream` query, resume points, client
//! ops, subprotocol choice and token checks (DESIGN §4).

use std::borrow::Cow;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::budget::MAX_FILTERS;
use crate::config::{PanelToken, Secret};
use crate::routing::Filter;

/// JSON text frames (the default).
pub const PROTO_JSON: &str = "asbgw.v1.json";
/// Postcard binary frames; the Rust types in [`crate::event::Frame`] are the schema.
pub const PROTO_POSTCARD: &str = "asbgw.v1.postcard";

/// Longest epoch accepted in a resume point (the journal's are 12 hex digits).
pub const EPOCH_MAX: usize = 64;

/// How frames are encoded on one panel connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Postcard,
}

impl Encoding {
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => PROTO_JSON,
            Encoding::Postcard => PROTO_POSTCARD,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("query parameter {0} is not valid percent-encoded UTF-8")]
    BadEncoding(&'static str),
    #[error("at most {MAX_FILTERS} filters per panel")]
    TooManyFilters,
    #[error("filter {filter:?}: {reason}")]
    BadFilter { filter: String, reason: String },
    #[error("since must be EPOCH:SEQ (e.g. 0193ab12cd34:42)")]
    BadSince,
    #[error("last must be true or false")]
    BadLast,
    #[error("none of the offered subprotocols is supported (use {PROTO_JSON} or {PROTO_POSTCARD})")]
    Subprotocol,
}

/// A resume point: the last event a panel has seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub epoch: heapless::String<EPOCH_MAX>,
    pub seq: u64,
}

impl Since {
    pub fn parse(s: &str) -> Result<Since, ProtocolError> {
        let (epoch, seq) = s.rsplit_once(':').ok_or(ProtocolError::BadSince)?;
        if epoch.is_empty() {
            return Err(ProtocolError::BadSince);
        }
        let epoch = heapless::String::try_from(epoch).map_err(|_| ProtocolError::BadSince)?;
        // Digits only: `u64::from_str` also takes a leading `+`.
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ProtocolError::BadSince);
        }
        let seq = seq.parse::<u64>().map_err(|_| ProtocolError::BadSince)?;
        Ok(Since { epoch, seq })
    }
}

/// A panel's filter (URL `filter=` or a `subscribe`/`unsubscribe` op): an MQTT-style
/// filter ([`Filter::parse`]: at most [`crate::routing::FILTER_MAX`] bytes, no control
/// characters), which keeps what a panel's frames echo of it (hello, errors) within the
/// budget's `CONTROL_ROOM`. Errors: [`ProtocolError::BadFilter`], naming the filter cut
/// to [`shown_filter`].
pub fn parse_filter(s: &str) -> Result<Filter, ProtocolError> {
    Filter::parse(s).map_err(|e| ProtocolError::BadFilter {
        filter: shown_filter(s),
        reason: e.to_string(),
    })
}

/// A filter as error frames show it: its first 64 characters.
pub fn shown_filter(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The query of `GET /v1/stream`.
#[derive(Debug, Default, PartialEq)]
pub struct StreamQuery {
    /// Filters asked for, in order (empty = the default).
    pub filters: Vec<Filter>,
    pub since: Option<Since>,
    /// Never shown by Debug.
    pub token: Option<Secret>,
    /// `last=true`: the newest event of each matching topic first, then `synced`.
    pub last: bool,
}

fn decode<'a>(v: &'a str, name: &'static str) -> Result<Cow<'a, str>, ProtocolError> {
    // Every `%` must start an escape of two hex digits (RFC 3986 §2.1): the decoder
    // would keep `a%` or `%zz` as they are, a different filter than the client meant.
    let b = v.as_bytes();
    let escapes_ok = b.iter().enumerate().all(|(i, c)| {
        *c != b'%'
            || b.get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return Err(ProtocolError::BadEncoding(name));
    }
    // `+` is an MQTT wildcard here, not a space: only percent-escapes are decoded.
    percent_encoding::percent_decode_str(v)
        .decode_utf8()
        .map_err(|_| ProtocolError::BadEncoding(name))
}

impl StreamQuery {
    /// Parse `filter=…&since=…&token=…&last=true|false` (also `1`/`0`); other
    /// parameters are ignored.
    pub fn parse(query: Option<&str>) -> Result<StreamQuery, ProtocolError> {
        let mut q = StreamQuery::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "filter" => {
                    let f = parse_filter(&decode(v, "filter")?)?;
                    if !q.filters.contains(&f) {
                        // Distinct filters count; a repeated one is the same filter.
                        if q.filters.len() == MAX_FILTERS {
                            return Err(ProtocolError::TooManyFilters);
                        }
                        q.filters.push(f);
                    }
                }
                "since" => q.since = Some(Since::parse(&decode(v, "since")?)?),
                // An empty `token=` is no token: it must not hide an `Authorization`
                // header, nor count as a failed attempt.
                "token" if v.is_empty() => {}
                "token" => q.token = Some(Secret::new(decode(v, "token")?.into_owned())),
                "last" => {
                    q.last = match &*decode(v, "last")? {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(ProtocolError::BadLast),
                    }
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// Pick the subprotocol from the elements of the `Sec-WebSocket-Protocol` list (all
/// its header lines, split at commas): the first one offered that the server speaks,
/// matched without regard to case, returned with the client's own spelling (to echo).
/// No header means the default, JSON (`Ok(None)`); a header whose list is empty too.
pub fn choose_subprotocol<'a>(
    offered: Option<&[&'a str]>,
) -> Result<Option<(Encoding, &'a str)>, ProtocolError> {
    let Some(offered) = offered.filter(|o| !o.is_empty()) else {
        return Ok(None);
    };
    for p in offered.iter().map(|p| p.trim()) {
        if p.eq_ignore_ascii_case(PROTO_JSON) {
            return Ok(Some((Encoding::Json, p)));
        }
        if p.eq_ignore_ascii_case(PROTO_POSTCARD) {
            return Ok(Some((Encoding::Postcard, p)));
        }
    }
    Err(ProtocolError::Subprotocol)
}

/// Outcome of checking a presented token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No tokens are configured: everything is allowed.
    Open,
    /// The token with this index in `panels.tokens` matched.
    Token(usize),
    Denied,
}

/// Subprotocol entries that carry a token instead of naming a protocol: the token,
/// base64url without padding, after this prefix (`asbgw.token.<base64url>`). Browsers can
/// send these (`new WebSocket(url, ["asbgw.v1.json", "asbgw.token.…"])`) where they
/// cannot set `Authorization`; the server never echoes them.
pub const TOKEN_SUBPROTOCOL: &str = "asbgw.token.";

/// Is this `Sec-WebSocket-Protocol` element a token entry?
pub fn is_token_entry(entry: &str) -> bool {
    entry
        .get(..TOKEN_SUBPROTOCOL.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(TOKEN_SUBPROTOCOL))
}

/// The token a token entry carries (`None` for any other entry). A payload that is not
/// base64url of UTF-8 yields a value no configured token matches, so it counts as a
/// wrong token, not a missing one.
pub fn token_from_entry(entry: &str) -> Option<String> {
    use base64::Engine;
    if !is_token_entry(entry) {
        return None;
    }
    let payload = &entry[TOKEN_SUBPROTOCOL.len()..];
    Some(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_else(|| "\u{0}malformed".into()),
    )
}

/// Does the SHA-256 of `presented` equal `expected`? Compared in full (constant time).
pub fn token_matches(expected: &[u8; 32], presented: &str) -> bool {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let diff = expected
        .iter()
        .zip(digest.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

/// Compare the SHA-256 of the presented token against every configured hash, in
/// constant time (every hash is compared in full, whether or not one matched).
pub fn authorize(tokens: &[PanelToken], presented: Option<&str>) -> Access {
    let digest: Option<[u8; 32]> = presented.map(|p| Sha256::digest(p.as_bytes()).into());
    authorize_digest(tokens, digest.as_ref())
}

/// [`authorize`] for a token known by its SHA-256 (`None`: none presented).
pub fn authorize_digest(tokens: &[PanelToken], digest: Option<&[u8; 32]>) -> Access {
    if tokens.is_empty() {
        return Access::Open;
    }
    let Some(digest) = digest else {
        return Access::Denied;
    };
    let mut found = usize::MAX;
    for (i, t) in tokens.iter().enumerate() {
        let diff = t
            .sha256
            .iter()
            .zip(digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        // Branch-free select of the matching index.
        let is_match = std::hint::black_box(diff) == 0;
        found = if is_match && found == usize::MAX {
            i
        } else {
            found
        };
    }
    if found == usize::MAX {
        Access::Denied
    } else {
        Access::Token(found)
    }
}

/// Is `filter` allowed by the token's `allow` list? (`None` = no token, all allowed.)
pub fn allowed(filter: &Filter, allow: Option<&[Filter]>) -> bool {
    allow.is_none_or(|allow| allow.iter().any(|a| filter.within(a)))
}

/// A client op (text or binary frame holding JSON).
#[derive(Debug, PartialEq, Eq)]
pub enum Op {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    Resume(String),
    /// The last values of the current filters, then `synced`, then live from there.
    Last,
    Ping,
}

/// Why a client op was refused: the `code` and `message` of the `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: &'static str,
    pub message: String,
}

/// Longest `error` frame message, in bytes. Messages may quote the client's input (a
/// serde error repeats the offending string): cut here, with control characters
/// replaced by `?`, so JSON escaping at most doubles it and an error frame stays under
/// the 400 B that `budget::CONTROL_ROOM` allows per reply.
pub const OP_ERROR_MESSAGE_MAX: usize = 160;

impl OpError {
    /// An error for the client; `message` is kept to [`OP_ERROR_MESSAGE_MAX`] bytes.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        let message: String = message.into();
        // What MQTT forbids in strings (controls, noncharacters) is what a one-line
        // message should not carry either.
        let message = match crate::routing::mqtt_clean(&message, '?', OP_ERROR_MESSAGE_MAX) {
            std::borrow::Cow::Borrowed(_) => message,
            std::borrow::Cow::Owned(cut) => cut,
        };
        OpError { code, message }
    }
}

#[derive(Deserialize)]
struct RawOp {
    op: String,
    filters: Option<Vec<String>>,
    since: Option<String>,
}

impl Op {
    pub fn parse(bytes: &[u8]) -> Result<Op, OpError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| OpError::new("bad_utf8", "frame is not valid UTF-8"))?;
        // serde would also read a struct from a JSON array (`["ping"]`): only the object
        // form is protocol v1.
        if !text.trim_start().starts_with('{') {
            return Err(OpError::new("bad_json", "expected {\"op\":…} JSON object"));
        }
        let raw: RawOp = serde_json::from_str(text).map_err(|e| {
            OpError::new(
                "bad_json",
                format!("expected {{\"op\":…}} JSON object: {e}"),
            )
        })?;
        let filters = |f: Option<Vec<String>>| {
            f.ok_or_else(|| OpError::new("bad_op", "\"filters\" (an array of strings) is missing"))
        };
        match raw.op.as_str() {
            "subscribe" => Ok(Op::Subscribe(filters(raw.filters)?)),
            "unsubscribe" => Ok(Op::Unsubscribe(filters(raw.filters)?)),
            "resume" => raw
                .since
                .map(Op::Resume)
                .ok_or_else(|| OpError::new("bad_op", "\"since\" (\"EPOCH:SEQ\") is missing")),
            "ping" => Ok(Op::Ping),
            "last" => Ok(Op::Last),
            other => Err(OpError::new(
                "unknown_op",
                format!(
                    "unknown op {:?} (known: subscribe, unsubscribe, resume, last, ping)",
                    other.chars().take(32).collect::<String>()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_quoting_the_client_are_cut() {
        // serde repeats a wrongly typed string whole: 3,000 quotes became ~6 KB of frame.
        let frame = format!(
            r#"{{"op":"subscribe","filters":"{}"}}"#,
            "\\\"".repeat(1000)
        );
        let e = Op::parse(frame.as_bytes()).unwrap_err();
        assert_eq!(e.code, "bad_json");
        assert!(
            e.message.len() <= OP_ERROR_MESSAGE_MAX,
            "{}",
            e.message.len()
        );
        assert!(
            e.message
                .starts_with("expected {\"op\":…} JSON object: invalid type"),
            "{}",
            e.message
        );
        let e = OpError::new("x", "a\u{0}b\nc");
        assert_eq!(e.message, "a?b?c");
        let long = "é".repeat(200);
        let e = OpError::new("x", long);
        assert!(e.message.len() <= OP_ERROR_MESSAGE_MAX && e.message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn array_form_ops_are_refused() {
        for text in [r#"["ping"]"#, r#"["subscribe",[],""]"#, " [\"ping\",null]"] {
            let e = Op::parse(text.as_bytes()).unwrap_err();
            assert_eq!(e.code, "bad_json", "{text}");
        }
        assert_eq!(Op::parse(br#" {"op":"ping"}"#).unwrap(), Op::Ping);
    }

    #[test]
    fn query_parses_filters_since_token() {
        let q = StreamQuery::parse(Some(
            "filter=line1/%23&filter=line2/+/temp&since=abc:42&token=s%20ecret&x=1&last=true",
        ))
        .unwrap();
        let f: Vec<&str> = q.filters.iter().map(|f| f.as_str()).collect();
        assert_eq!(f, ["line1/#", "line2/+/temp"]);
        assert_eq!(q.since.as_ref().unwrap().epoch.as_str(), "abc");
        assert_eq!(q.since.as_ref().unwrap().seq, 42);
        assert_eq!(q.token.as_ref().map(Secret::expose), Some("s ecret"));
        assert!(!format!("{q:?}").contains("ecret"), "{q:?}");
        assert!(q.last);
        assert_eq!(StreamQuery::parse(None).unwrap(), StreamQuery::default());
    }

    #[test]
    fn query_rejects_bad_input() {
        let nine = (0..9).map(|i| format!("filter=a{i}")).collect::<Vec<_>>();
        assert_eq!(
            StreamQuery::parse(Some(&nine.join("&"))),
            Err(ProtocolError::TooManyFilters)
        );
        assert!(matches!(
            StreamQuery::parse(Some("filter=a/%23/b")),
            Err(ProtocolError::BadFilter { .. })
        ));
        assert_eq!(
            StreamQuery::parse(Some("since=42")),
            Err(ProtocolError::BadSince)
        );
        assert_eq!(
            StreamQuery::parse(Some("since=e:-1")),
            Err(ProtocolError::BadSince)
        );
        assert_eq!(
            StreamQuery::parse(Some("last=yes")),
            Err(ProtocolError::BadLast)
        );
        assert!(!StreamQuery::parse(Some("last=0")).unwrap().last);
        assert_eq!(
            StreamQuery::parse(Some("token=%ff")),
            Err(ProtocolError::BadEncoding("token"))
        );
        for (q, e) in [
            ("since=e:+5", ProtocolError::BadSince),
            ("since=e:", ProtocolError::BadSince),
            ("since=e: 5", ProtocolError::BadSince),
            ("filter=a%", ProtocolError::BadEncoding("filter")),
            ("filter=a%2", ProtocolError::BadEncoding("filter")),
            ("filter=%zz", ProtocolError::BadEncoding("filter")),
            ("token=ab%g0", ProtocolError::BadEncoding("token")),
        ] {
            assert_eq!(StreamQuery::parse(Some(q)), Err(e), "{q}");
        }
        // Eight distinct filters and a repeat are eight filters.
        let mut eight = (0..8).map(|i| format!("filter=a{i}")).collect::<Vec<_>>();
        eight.push("filter=a0".into());
        assert_eq!(
            StreamQuery::parse(Some(&eight.join("&")))
                .unwrap()
                .filters
                .len(),
            8
        );
        // An empty token= is no token.
        assert!(
            StreamQuery::parse(Some("token=&filter=%23"))
                .unwrap()
                .token
                .is_none()
        );
    }

    /// What a filter can make the server echo is bounded: its length, its characters,
    /// and how much of it an error frame shows.
    #[test]
    fn filters_are_bounded_in_length_and_characters() {
        use crate::routing::FILTER_MAX;
        let long = format!("a/{}", "b".repeat(FILTER_MAX));
        let at_limit = "c".repeat(FILTER_MAX);
        assert!(parse_filter(&at_limit).is_ok());
        for (bad, why) in [
            (long.as_str(), "longer than 256 bytes"),
            ("line1/\u{7}bell", "control characters"),
            ("line1/\n", "control characters"),
        ] {
            match parse_filter(bad) {
                Err(ProtocolError::BadFilter { filter, reason }) => {
                    assert!(reason.contains(why), "{bad:?}: {reason}");
                    assert!(filter.chars().count() <= 64, "{filter:?}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!(shown_filter(&long).chars().count(), 64);
    }

    #[test]
    fn subprotocols() {
        assert_eq!(choose_subprotocol(None), Ok(None));
        assert_eq!(choose_subprotocol(Some(&[])), Ok(None));
        assert_eq!(
            choose_subprotocol(Some(&["x", "asbgw.v1.postcard", "asbgw.v1.json"])),
            Ok(Some((Encoding::Postcard, "asbgw.v1.postcard")))
        );
        assert_eq!(
            choose_subprotocol(Some(&["asbgw.v1.json"])),
            Ok(Some((Encoding::Json, "asbgw.v1.json")))
        );
        assert_eq!(
            choose_subprotocol(Some(&["ASBGW.v1.JSON"])),
            Ok(Some((Encoding::Json, "ASBGW.v1.JSON")))
        );
        assert_eq!(
            choose_subprotocol(Some(&["mqtt"])),
            Err(ProtocolError::Subprotocol)
        );
    }

    fn token(name: &str, secret: &str, allow: &[&str]) -> PanelToken {
        PanelToken {
            name: name.into(),
            sha256: Sha256::digest(secret.as_bytes()).into(),
            allow: allow.iter().map(|a| Filter::parse(a).unwrap()).collect(),
        }
    }

    #[test]
    fn token_subprotocol_entries() {
        assert!(is_token_entry("asbgw.token.YWJj"));
        assert!(is_token_entry("ASBGW.Token.YWJj"));
        assert!(!is_token_entry("asbgw.v1.json"));
        assert!(!is_token_entry("asbgw.tok"));
        assert_eq!(token_from_entry("asbgw.token.YWJj").as_deref(), Some("abc"));
        assert_eq!(token_from_entry("asbgw.v1.json"), None);
        // not base64url, or not UTF-8: a token that matches nothing
        let bad = token_from_entry("asbgw.token.***").unwrap();
        let h: [u8; 32] = Sha256::digest(b"").into();
        assert!(!token_matches(&h, &bad));
        assert!(token_matches(&h, ""));
    }

    #[test]
    fn tokens_are_checked_by_hash() {
        assert_eq!(authorize(&[], None), Access::Open);
        let t = [
            token("a", "alpha", &["#"]),
            token("b", "beta", &["line1/#"]),
        ];
        assert_eq!(authorize(&t, Some("beta")), Access::Token(1));
        assert_eq!(authorize(&t, Some("alpha")), Access::Token(0));
        assert_eq!(authorize(&t, Some("gamma")), Access::Denied);
        assert_eq!(authorize(&t, None), Access::Denied);
        let allow = &t[1].allow;
        assert!(allowed(&Filter::parse("line1/temp").unwrap(), Some(allow)));
        assert!(!allowed(&Filter::parse("#").unwrap(), Some(allow)));
        assert!(allowed(&Filter::parse("#").unwrap(), None));
    }

    #[test]
    fn ops_parse_or_explain() {
        assert_eq!(Op::parse(br#"{"op":"ping"}"#), Ok(Op::Ping));
        assert_eq!(Op::parse(br#"{"op":"last"}"#), Ok(Op::Last));
        assert_eq!(
            Op::parse(br#"{"op":"subscribe","filters":["a/#"]}"#),
            Ok(Op::Subscribe(vec!["a/#".into()]))
        );
        assert_eq!(
            Op::parse(br#"{"op":"resume","since":"e:1"}"#),
            Ok(Op::Resume("e:1".into()))
        );
        assert_eq!(Op::parse(b"\xff\xfe").unwrap_err().code, "bad_utf8");
        assert_eq!(Op::parse(b"{nope").unwrap_err().code, "bad_json");
        assert_eq!(
            Op::parse(br#"{"op":"dance"}"#).unwrap_err().code,
            "unknown_op"
        );
        assert_eq!(
            Op::parse(br#"{"op":"subscribe"}"#).unwrap_err().code,
            "bad_op"
        );
        assert_eq!(Op::parse(br#"{"op":"resume"}"#).unwrap_err().code, "bad_op");
    }
}
