//! Routing: the topic template that names each event, and MQTT-style topic filters
//! (`+` one level, `#` the rest) used by panels, tokens and the mirror.

use crate::event::{EventMeta, Topic};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutingError {
    #[error(
        "unknown placeholder {{{0}}} (known: subject, topic, subscription, content_type, correlation_id, prop:NAME)"
    )]
    UnknownPlaceholder(String),
    #[error("unclosed '{{' at byte {0}")]
    Unclosed(usize),
    #[error("template is empty")]
    Empty,
    #[error(
        "{{prop:…}} with a key over {max} bytes can never match: application property keys \
         are kept to {max} bytes",
        max = crate::event::PROP_KEY_MAX
    )]
    PropNameTooLong,
    #[error(
        "{{prop:…}} with a control character can never match: control characters in \
         property keys are replaced by '?'"
    )]
    PropNameControl,
    #[error("filter is empty")]
    EmptyFilter,
    #[error("'#' must be the last level and alone in it")]
    MisplacedHash,
    #[error("'+' must be alone in its level")]
    MisplacedPlus,
    #[error("filter longer than {0} bytes")]
    FilterTooLong(usize),
    #[error("filter has control characters (topics never have them)")]
    FilterControlCharacter,
    #[error(
        "'{0}' cannot be part of a topic name: '+' and '#' are MQTT wildcards, and controls \
         and noncharacters are forbidden in MQTT strings"
    )]
    LiteralNotInTopics(char),
    #[error(
        "a topic must not begin with '$': MQTT reserves such topics for the broker, and \
         '#' and '+' filters (a panel's default included) never match them"
    )]
    LiteralDollar,
    #[error(
        "every topic would be over {max} bytes and cut: the text alone renders to at least \
         {min} bytes (each placeholder at least 1)"
    )]
    TemplateTooLong { min: usize, max: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Subject,
    Topic,
    Subscription,
    ContentType,
    CorrelationId,
    Prop(String),
}

/// A parsed topic template such as `{prop:line}/{subject}`.
/// Deserialized from its text (`routing.topic`), so a config holds it parsed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Template {
    parts: Vec<Part>,
}

/// Where an event came from, for `{topic}` and `{subscription}`.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub topic: &'a str,
    pub subscription: &'a str,
}

impl Template {
    pub fn parse(s: &str) -> Result<Self, RoutingError> {
        if s.is_empty() {
            return Err(RoutingError::Empty);
        }
        let mut parts = Vec::new();
        let mut rest = s;
        let mut offset = 0;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or(RoutingError::Unclosed(offset + open))?;
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "subject" => Part::Subject,
                "topic" => Part::Topic,
                "subscription" => Part::Subscription,
                "content_type" => Part::ContentType,
                "correlation_id" => Part::CorrelationId,
                n if n.starts_with("prop:") && n.len() > 5 => {
                    let key = &n[5..];
                    if key.len() > crate::event::PROP_KEY_MAX {
                        return Err(RoutingError::PropNameTooLong);
                    }
                    if key.chars().any(char::is_control) {
                        return Err(RoutingError::PropNameControl);
                    }
                    Part::Prop(key.to_string())
                }
                n => return Err(RoutingError::UnknownPlaceholder(n.to_string())),
            });
            offset += open + close + 1;
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        let literal = parts.iter().filter_map(|p| match p {
            Part::Lit(l) => Some(l.as_str()),
            _ => None,
        });
        if let Some(c) = literal
            .clone()
            .flat_map(str::chars)
            .find(|c| matches!(c, '+' | '#') || mqtt_forbidden(*c))
        {
            return Err(RoutingError::LiteralNotInTopics(c));
        }
        if matches!(parts.first(), Some(Part::Lit(l)) if l.starts_with('$')) {
            return Err(RoutingError::LiteralDollar);
        }
        let min = literal.map(str::len).sum::<usize>()
            + parts.iter().filter(|p| !matches!(p, Part::Lit(_))).count();
        if min > crate::event::TOPIC_MAX {
            return Err(RoutingError::TemplateTooLong {
                min,
                max: crate::event::TOPIC_MAX,
            });
        }
        Ok(Template { parts })
    }

    /// Render the topic for an event. Missing or empty values become `_`; characters
    /// that are illegal in MQTT topic names (`+`, `#`, [`mqtt_forbidden`]) become `_`, and
    /// so does a leading `$` (MQTT 3.1.1 §4.7.2: such topics are the broker's, and `#`
    /// never matches them). Returns the topic and whether it had to be cut to
    /// [`crate::event::TOPIC_MAX`] bytes.
    pub fn render(&self, meta: &EventMeta, origin: Origin<'_>) -> (Topic, bool) {
        let mut out = Topic::new();
        let mut cut = false;
        for part in &self.parts {
            let value: Option<&str> = match part {
                Part::Lit(l) => {
                    push_clean(&mut out, l, &mut cut);
                    continue;
                }
                Part::Subject => meta.subject.as_deref(),
                Part::Topic => Some(origin.topic),
                Part::Subscription => Some(origin.subscription),
                Part::ContentType => meta.content_type.as_deref(),
                Part::CorrelationId => meta.correlation_id.as_deref(),
                Part::Prop(name) => meta.prop(name),
            };
            match value {
                Some(v) if !v.is_empty() => push_clean(&mut out, v, &mut cut),
                _ => push_clean(&mut out, "_", &mut cut),
            }
        }
        (out, cut)
    }
}

fn push_clean(out: &mut Topic, s: &str, cut: &mut bool) {
    for c in s.chars() {
        let c = match c {
            '+' | '#' => '_',
            '$' if out.is_empty() => '_',
            c if mqtt_forbidden(c) => '_',
            c => c,
        };
        if out.push(c).is_err() {
            *cut = true;
            return;
        }
    }
}

/// A character an MQTT UTF-8 string must not carry (MQTT 5.0 §1.5.4, 3.1.1 §1.5.3,
/// as brokers enforce them: mosquitto closes the connection on any of these): U+0000,
/// the C0 and C1 controls (U+0001–U+001F, U+007F–U+009F) and the Unicode noncharacters
/// (U+FDD0–U+FDEF and the last two code points of every plane). Surrogates cannot occur
/// in a Rust `str`.
pub fn mqtt_forbidden(c: char) -> bool {
    let u = c as u32;
    u <= 0x1F
        || (0x7F..=0x9F).contains(&u)
        || (0xFDD0..=0xFDEF).contains(&u)
        || u & 0xFFFE == 0xFFFE
}

/// Longest MQTT UTF-8 string (a two-byte length prefix, MQTT 5.0 §1.5.4).
pub const MQTT_STRING_MAX: usize = 65_535;

/// `s` with every [`mqtt_forbidden`] character replaced by `repl` and cut to at most
/// `max` bytes (on a character boundary); borrowed when already clean and short enough.
pub fn mqtt_clean(s: &str, repl: char, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max && !s.chars().any(mqtt_forbidden) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let c = if mqtt_forbidden(c) { repl } else { c };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    std::borrow::Cow::Owned(out)
}

/// Longest filter accepted (bytes).
pub const FILTER_MAX: usize = 256;

/// A validated MQTT-style topic filter.
/// Deserialized from its text (`panels.tokens[].allow`), so a config holds it parsed.
/// 258 B: its length is a `u16`, not a `usize` (a panel holds up to 8).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Filter(heapless::String<FILTER_MAX, u16>);

impl Filter {
    pub fn parse(s: &str) -> Result<Self, RoutingError> {
        if s.is_empty() {
            return Err(RoutingError::EmptyFilter);
        }
        // Topics never hold control characters (metadata rendered into them has them
        // replaced, `event::bounded`; MQTT forbids them too), so such a filter could
        // match nothing; refusing it also keeps what frames echo of a filter plain text.
        if s.chars().any(char::is_control) {
            return Err(RoutingError::FilterControlCharacter);
        }
        let levels: Vec<&str> = s.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
                return Err(RoutingError::MisplacedHash);
            }
            if level.contains('+') && *level != "+" {
                return Err(RoutingError::MisplacedPlus);
            }
        }
        heapless::String::try_from(s)
            .map(Filter)
            .map_err(|_| RoutingError::FilterTooLong(FILTER_MAX))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Does this filter match the topic? (MQTT rules: `+` one level, `#` this level and
    /// all below, including the parent; wildcards at the first level do not match
    /// topics starting with `$`.)
    pub fn matches(&self, topic: &str) -> bool {
        filter_matches(&self.0, topic)
    }

    /// Is every topic this filter matches also matched by `outer`? Used to check a
    /// subscription against the filters a token is allowed.
    pub fn within(&self, outer: &Filter) -> bool {
        // `$` topics are matched by no filter starting with a wildcard (see `matches`),
        // so a filter reaching them is not within such a filter.
        if self.0.starts_with('$') && (outer.0.starts_with('+') || outer.0.starts_with('#')) {
            return false;
        }
        let mut inner = self.0.split('/');
        let mut out = outer.0.split('/');
        loop {
            match (out.next(), inner.next()) {
                (Some("#"), _) => return true,
                (None, None) => return true,
                (Some("+"), Some(i)) if i != "#" => {}
                (Some(o), Some(i)) if o == i && o != "+" && o != "#" => {}
                _ => return false,
            }
        }
    }
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// MQTT topic-filter matching on strings (the filter is assumed valid).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl TryFrom<String> for Template {
    type Error = RoutingError;
    fn try_from(s: String) -> Result<Self, RoutingError> {
        Template::parse(&s)
    }
}

impl TryFrom<String> for Filter {
    type Error = RoutingError;
    fn try_from(s: String) -> Result<Self, RoutingError> {
        Filter::parse(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ContentType, IdString};

    fn meta() -> EventMeta {
        let mut m = EventMeta {
            subject: Some(IdString::try_from("temp").unwrap()),
            content_type: Some(ContentType::try_from("application/json").unwrap()),
            ..Default::default()
        };
        m.push_prop("line", "line1");
        m.push_prop("odd", "a+b#c");
        m
    }

    const O: Origin<'static> = Origin {
        topic: "operational-events",
        subscription: "edge",
    };

    #[test]
    fn templates_render() {
        let cases = [
            ("{subject}", "temp"),
            ("{prop:line}/{subject}", "line1/temp"),
            ("{topic}/{subscription}", "operational-events/edge"),
            ("x/{correlation_id}/{prop:nope}", "x/_/_"),
            ("{content_type}", "application/json"),
            ("{prop:odd}", "a_b_c"),
            ("plain", "plain"),
            ("ünï/{subject}", "ünï/temp"),
        ];
        for (tpl, want) in cases {
            let (t, cut) = Template::parse(tpl).unwrap().render(&meta(), O);
            assert_eq!(t.as_str(), want, "template {tpl}");
            assert!(!cut);
        }
        let mut m = meta();
        m.subject = Some(IdString::try_from("").unwrap());
        assert_eq!(
            Template::parse("{subject}")
                .unwrap()
                .render(&m, O)
                .0
                .as_str(),
            "_"
        );
    }

    #[test]
    fn long_topics_are_cut_and_flagged() {
        let mut m = meta();
        m.push_prop("long", &"é".repeat(120));
        let (t, cut) = Template::parse("{prop:long}/{prop:long}/{prop:long}")
            .unwrap()
            .render(&m, O);
        assert!(cut);
        assert!(t.len() <= crate::event::TOPIC_MAX);
    }

    #[test]
    fn bad_templates() {
        assert_eq!(
            Template::parse("{nope}"),
            Err(RoutingError::UnknownPlaceholder("nope".into()))
        );
        assert_eq!(
            Template::parse("a/{subject"),
            Err(RoutingError::Unclosed(2))
        );
        assert_eq!(Template::parse(""), Err(RoutingError::Empty));
        assert!(Template::parse("{prop:}").is_err());
        // Text the renderer would have rewritten or cut is refused at load.
        for (tpl, c) in [
            ("line+1/{subject}", '+'),
            ("{subject}/#", '#'),
            ("a\u{7}b/{subject}", '\u{7}'),
            ("x/{subject}\u{FFFF}", '\u{FFFF}'),
            ("{prop:line}/\u{85}", '\u{85}'),
        ] {
            assert_eq!(
                Template::parse(tpl),
                Err(RoutingError::LiteralNotInTopics(c)),
                "{tpl:?}"
            );
        }
        assert_eq!(
            Template::parse("$SYS/{subject}"),
            Err(RoutingError::LiteralDollar)
        );
        assert!(Template::parse("a/$x/{subject}").is_ok());
        let long = format!("{}/{{subject}}", "l".repeat(255));
        assert_eq!(
            Template::parse(&long),
            Err(RoutingError::TemplateTooLong { min: 257, max: 256 })
        );
        assert!(Template::parse(&format!("{}/{{subject}}", "l".repeat(254))).is_ok());
        let key = "k".repeat(crate::event::PROP_KEY_MAX + 1);
        assert_eq!(
            Template::parse(&format!("{{prop:{key}}}")),
            Err(RoutingError::PropNameTooLong)
        );
        assert_eq!(
            Template::parse("{prop:li\u{0}ne}"),
            Err(RoutingError::PropNameControl)
        );
        let key = "k".repeat(crate::event::PROP_KEY_MAX);
        assert!(Template::parse(&format!("{{prop:{key}}}")).is_ok());
    }

    #[test]
    fn a_leading_dollar_from_the_data_is_replaced() {
        let mut m = meta();
        m.subject = Some(IdString::try_from("$SYS/broker/load").unwrap());
        let (t, cut) = Template::parse("{subject}").unwrap().render(&m, O);
        assert_eq!(t.as_str(), "_SYS/broker/load");
        assert!(!cut);
        // Only at the start: further on, '$' is an ordinary character.
        let (t, _) = Template::parse("a/{subject}").unwrap().render(&m, O);
        assert_eq!(t.as_str(), "a/$SYS/broker/load");
    }

    #[test]
    fn filters_match() {
        let cases = [
            ("#", "a/b", true),
            ("#", "a", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "b/a", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("+/+", "a/b", true),
            ("+", "a", true),
            ("+", "", true),
            ("a//b", "a//b", true),
            ("a/+/b", "a//b", true),
            ("a/b", "a/b/", false),
            ("line1/#", "line2/temp", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("ünï/+", "ünï/temp", true),
        ];
        for (f, t, want) in cases {
            assert_eq!(Filter::parse(f).unwrap().matches(t), want, "{f} vs {t}");
        }
    }

    #[test]
    fn invalid_filters() {
        for f in ["", "a/#/b", "a#", "#/a", "a+/b", "a/b+", "++"] {
            assert!(Filter::parse(f).is_err(), "{f} should be invalid");
        }
        assert!(Filter::parse(&"a".repeat(FILTER_MAX + 1)).is_err());
    }

    #[test]
    fn filter_within_allowed() {
        let allow = Filter::parse("line1/#").unwrap();
        for (f, want) in [
            ("line1/#", true),
            ("line1/temp", true),
            ("line1/+/x", true),
            ("#", false),
            ("+/temp", false),
            ("line2/temp", false),
        ] {
            assert_eq!(Filter::parse(f).unwrap().within(&allow), want, "{f}");
        }
        let plus = Filter::parse("+/temp").unwrap();
        assert!(Filter::parse("line1/temp").unwrap().within(&plus));
        assert!(!Filter::parse("line1/#").unwrap().within(&plus));
        assert!(!Filter::parse("line1/+").unwrap().within(&plus));
        assert!(Filter::parse("+/temp").unwrap().within(&plus));
    }

    #[test]
    fn mqtt_strings_lose_what_brokers_refuse() {
        for c in [
            '\0',
            '\u{1}',
            '\u{1f}',
            '\u{7f}',
            '\u{9f}',
            '\u{fdd0}',
            '\u{fdef}',
            '\u{fffe}',
            '\u{ffff}',
            '\u{1fffe}',
            '\u{10ffff}',
        ] {
            assert!(mqtt_forbidden(c), "{:x}", c as u32);
        }
        for c in [
            'a',
            ' ',
            '\u{a0}',
            '\u{fdcf}',
            '\u{fdf0}',
            '\u{fffd}',
            '\u{1fffd}',
            'ß',
            '😀',
        ] {
            assert!(!mqtt_forbidden(c), "{:x}", c as u32);
        }
        assert!(matches!(
            mqtt_clean("line1/temp", '_', 100),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(mqtt_clean("a\u{ffff}b\u{fdd0}", '?', 100), "a?b?");
        assert_eq!(mqtt_clean("ééé", '?', 5), "éé");
    }
}
