//! The emulator's entities, read from a file in the format of Microsoft's Service Bus
//! emulator (`Config.json`): `{"UserConfig":{"Namespaces":[{"Name":…,"Queues":[…],
//! "Topics":[{"Name":…,"Subscriptions":[{"Name":…,"Properties":{"LockDuration":"PT1M",
//! "MaxDeliveryCount":3,"RequiresSession":false},"Rules":[{"Name":…,"Properties":{
//! "FilterType":"Correlation","CorrelationFilter":{…}}}]}]}]}]}}`.
//!
//! Applied: `LockDuration`, `MaxDeliveryCount`, `RequiresSession` (queues and
//! subscriptions) and subscription `Rules` (Correlation and SQL filters, see
//! [`super::filter`]). A rule the emulator cannot apply as ASB would (an SQL construct
//! outside the supported subset, a rule action, an unknown filter field) is refused
//! when the file is read. Every other property is ignored and reported (see
//! [`Entities::from_json_with_ignored`]), so the file users already have works unchanged
//! and nothing differs silently.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::EmulatorError;
use super::filter::{CorrelationFilter, Filter, Lit, Rule, parse_sql};

/// ASB defaults for an entity without properties.
pub const DEFAULT_LOCK_DURATION: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_DELIVERY_COUNT: u32 = 10;

/// One queue or subscription: where messages wait under peek-lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityConfig {
    /// Queue name or subscription name.
    pub name: String,
    pub lock_duration: Duration,
    pub max_delivery_count: u32,
    /// `RequiresSession`: receivers must ask for a session (the emulator refuses plain
    /// receivers with `amqp:not-allowed`, as ASB does, and does not implement sessions).
    pub requires_session: bool,
    /// Subscription rules; a message is copied when any matches. Empty: `$Default`
    /// (every message), as a subscription created without rules has on ASB.
    pub rules: Vec<Rule>,
}

impl EntityConfig {
    /// An entity with ASB's defaults: no sessions, the `$Default` rule.
    pub fn new(name: impl Into<String>, lock_duration: Duration, max_delivery_count: u32) -> Self {
        EntityConfig {
            name: name.into(),
            lock_duration,
            max_delivery_count,
            requires_session: false,
            rules: Vec::new(),
        }
    }
}

impl Default for EntityConfig {
    /// Unnamed, LockDuration PT1M, MaxDeliveryCount 10, no sessions, `$Default`.
    fn default() -> Self {
        EntityConfig::new("", DEFAULT_LOCK_DURATION, DEFAULT_MAX_DELIVERY_COUNT)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    pub name: String,
    pub subscriptions: Vec<EntityConfig>,
}

/// The entities of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entities {
    pub namespace: String,
    pub queues: Vec<EntityConfig>,
    pub topics: Vec<TopicConfig>,
}

impl Default for Entities {
    fn default() -> Self {
        Self::default_entities()
    }
}

/// Properties the emulator does not apply, by JSON key.
type Extra = BTreeMap<String, serde_json::Value>;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct File {
    user_config: UserConfig,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UserConfig {
    namespaces: Vec<Namespace>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Namespace {
    name: String,
    #[serde(default)]
    queues: Vec<Entity>,
    #[serde(default)]
    topics: Vec<Topic>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Topic {
    name: String,
    #[serde(default)]
    subscriptions: Vec<Entity>,
    /// Topic properties (DefaultMessageTimeToLive, duplicate detection): none applied.
    #[serde(default)]
    properties: Extra,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entity {
    name: String,
    #[serde(default)]
    properties: Properties,
    /// Subscriptions only; `None` and `[]` both mean `$Default`.
    #[serde(default)]
    rules: Option<Vec<RuleJson>>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Properties {
    lock_duration: Option<String>,
    max_delivery_count: Option<u32>,
    requires_session: Option<bool>,
    #[serde(flatten)]
    extra: Extra,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RuleJson {
    name: String,
    properties: RuleProperties,
    /// Also accepted here (Microsoft's schema has it under `Properties`).
    action: Option<ActionJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct RuleProperties {
    filter_type: String,
    correlation_filter: Option<CorrelationJson>,
    sql_filter: Option<SqlJson>,
    action: Option<ActionJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct CorrelationJson {
    content_type: Option<String>,
    correlation_id: Option<String>,
    label: Option<String>,
    message_id: Option<String>,
    reply_to: Option<String>,
    reply_to_session_id: Option<String>,
    session_id: Option<String>,
    to: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct SqlJson {
    sql_expression: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct ActionJson {
    sql_expression: Option<String>,
}

fn note_extra(ignored: &mut Vec<String>, at: &str, extra: &Extra) {
    for (k, v) in extra {
        let dot = if at.is_empty() { "" } else { "." };
        ignored.push(format!("{at}{dot}{k} = {v}"));
    }
}

/// Turn one Config.json rule into a [`Rule`], or refuse it naming the subscription, the
/// rule and the part that the emulator cannot apply as ASB would.
fn rule(r: RuleJson, at: &str, subscription: &str) -> Result<Rule, EmulatorError> {
    let refuse = |what: String| {
        EmulatorError::Config(format!(
            "{at}: subscription '{subscription}', rule '{}': {what}",
            r.name
        ))
    };
    let p = &r.properties;
    for a in [&p.action, &r.action].into_iter().flatten() {
        if let Some(expr) = a.sql_expression.as_deref()
            && !expr.trim().is_empty()
        {
            return Err(refuse(format!(
                "rule actions are not supported by the emulator (Action.SqlExpression `{expr}`); \
                 remove the action or test it against Azure Service Bus"
            )));
        }
    }
    let filter = if p.filter_type.eq_ignore_ascii_case("Correlation") {
        if p.sql_filter.is_some() {
            return Err(refuse(
                "FilterType is Correlation but a SqlFilter is given".into(),
            ));
        }
        let Some(c) = &p.correlation_filter else {
            return Err(refuse(
                "FilterType Correlation needs a CorrelationFilter".into(),
            ));
        };
        let mut properties = Vec::new();
        for (k, v) in &c.properties {
            let lit = match v {
                serde_json::Value::String(s) => Lit::Str(s.clone()),
                serde_json::Value::Bool(b) => Lit::Bool(*b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => Lit::Int(i),
                    None => Lit::Float(n.as_f64().unwrap_or(f64::NAN)),
                },
                other => {
                    return Err(refuse(format!(
                        "CorrelationFilter.Properties.{k}: {other} is not a string, number or boolean"
                    )));
                }
            };
            properties.push((k.clone(), lit));
        }
        let f = CorrelationFilter {
            content_type: c.content_type.clone(),
            correlation_id: c.correlation_id.clone(),
            subject: c.label.clone(),
            message_id: c.message_id.clone(),
            reply_to: c.reply_to.clone(),
            reply_to_session_id: c.reply_to_session_id.clone(),
            session_id: c.session_id.clone(),
            to: c.to.clone(),
            properties,
        };
        if f.is_empty() {
            return Err(refuse(
                "a CorrelationFilter needs at least one property".into(),
            ));
        }
        Filter::Correlation(f)
    } else if p.filter_type.eq_ignore_ascii_case("Sql") {
        if p.correlation_filter.is_some() {
            return Err(refuse(
                "FilterType is Sql but a CorrelationFilter is given".into(),
            ));
        }
        let Some(s) = &p.sql_filter else {
            return Err(refuse("FilterType Sql needs a SqlFilter".into()));
        };
        let parsed = parse_sql(&s.sql_expression).map_err(|e| {
            refuse(format!(
                "SqlFilter.SqlExpression `{}`: {e}",
                s.sql_expression
            ))
        })?;
        Filter::Sql(parsed)
    } else {
        return Err(refuse(format!(
            "FilterType '{}' is not Correlation or Sql",
            p.filter_type
        )));
    };
    Ok(Rule {
        name: r.name,
        filter,
    })
}

impl Entities {
    /// Topic `operational-events` with subscription `edge` (LockDuration PT1M,
    /// MaxDeliveryCount 10).
    pub fn default_entities() -> Self {
        Entities {
            namespace: "sbemulatorns".into(),
            queues: Vec::new(),
            topics: vec![TopicConfig {
                name: "operational-events".into(),
                subscriptions: vec![EntityConfig::new(
                    "edge",
                    DEFAULT_LOCK_DURATION,
                    DEFAULT_MAX_DELIVERY_COUNT,
                )],
            }],
        }
    }

    /// Parse a Config.json text, logging (warn) each property the emulator ignores.
    /// Errors name the JSON path that is wrong.
    pub fn from_json(text: &str) -> Result<Self, EmulatorError> {
        let (entities, ignored) = Self::from_json_with_ignored(text)?;
        for i in &ignored {
            log::warn!("emulator: Config.json: {i}: not emulated, ignored");
        }
        Ok(entities)
    }

    /// Parse a Config.json text; also returns every property the emulator ignores, as
    /// `JSON.PATH = value` (e.g. `UserConfig.Logging = {"Type":"File"}`).
    pub fn from_json_with_ignored(text: &str) -> Result<(Self, Vec<String>), EmulatorError> {
        let de = &mut serde_json::Deserializer::from_str(crate::config::strip_bom(text));
        let file: File = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            EmulatorError::Config(format!("{path}: {}", e.inner()))
        })?;
        let mut ignored = Vec::new();
        note_extra(&mut ignored, "", &file.extra);
        note_extra(&mut ignored, "UserConfig", &file.user_config.extra);
        let mut namespaces = file.user_config.namespaces.into_iter();
        let ns = namespaces.next().ok_or_else(|| {
            EmulatorError::Config("UserConfig.Namespaces: at least one namespace is needed".into())
        })?;
        if namespaces.next().is_some() {
            return Err(EmulatorError::Config(
                "UserConfig.Namespaces: the emulator serves exactly one namespace".into(),
            ));
        }
        note_extra(&mut ignored, "UserConfig.Namespaces[0]", &ns.extra);
        let entity = |e: Entity,
                      at: String,
                      topic: Option<&str>,
                      ignored: &mut Vec<String>|
         -> Result<EntityConfig, EmulatorError> {
            if e.name.is_empty() || e.name.contains('/') {
                return Err(EmulatorError::Config(format!(
                    "{at}.Name: '{}' is not a valid entity name",
                    e.name
                )));
            }
            note_extra(ignored, &at, &e.extra);
            note_extra(ignored, &format!("{at}.Properties"), &e.properties.extra);
            let lock_duration = match e.properties.lock_duration {
                None => DEFAULT_LOCK_DURATION,
                Some(s) => parse_iso8601_duration(&s).map_err(|e| {
                    EmulatorError::Config(format!("{at}.Properties.LockDuration: {e}"))
                })?,
            };
            if lock_duration.is_zero() {
                return Err(EmulatorError::Config(format!(
                    "{at}.Properties.LockDuration: must be positive"
                )));
            }
            let max_delivery_count = e
                .properties
                .max_delivery_count
                .unwrap_or(DEFAULT_MAX_DELIVERY_COUNT);
            if max_delivery_count == 0 {
                return Err(EmulatorError::Config(format!(
                    "{at}.Properties.MaxDeliveryCount: must be at least 1"
                )));
            }
            let mut rules = Vec::new();
            match (topic, e.rules) {
                (Some(topic), Some(rs)) => {
                    let path = format!("{topic}/Subscriptions/{}", e.name);
                    for (k, r) in rs.into_iter().enumerate() {
                        rules.push(rule(r, &format!("{at}.Rules[{k}]"), &path)?);
                    }
                }
                (None, Some(_)) => ignored.push(format!("{at}.Rules (a queue has no rules)")),
                (_, None) => {}
            }
            Ok(EntityConfig {
                name: e.name,
                lock_duration,
                max_delivery_count,
                requires_session: e.properties.requires_session.unwrap_or(false),
                rules,
            })
        };
        let mut queues = Vec::new();
        for (i, q) in ns.queues.into_iter().enumerate() {
            queues.push(entity(
                q,
                format!("UserConfig.Namespaces[0].Queues[{i}]"),
                None,
                &mut ignored,
            )?);
        }
        let mut topics = Vec::new();
        for (i, t) in ns.topics.into_iter().enumerate() {
            let at = format!("UserConfig.Namespaces[0].Topics[{i}]");
            if t.name.is_empty() || t.name.contains('/') {
                return Err(EmulatorError::Config(format!(
                    "{at}.Name: '{}' is not a valid topic name",
                    t.name
                )));
            }
            note_extra(&mut ignored, &at, &t.extra);
            note_extra(&mut ignored, &format!("{at}.Properties"), &t.properties);
            let mut subscriptions = Vec::new();
            for (j, s) in t.subscriptions.into_iter().enumerate() {
                subscriptions.push(entity(
                    s,
                    format!("{at}.Subscriptions[{j}]"),
                    Some(&t.name),
                    &mut ignored,
                )?);
            }
            topics.push(TopicConfig {
                name: t.name,
                subscriptions,
            });
        }
        let mut names: Vec<String> = queues
            .iter()
            .map(|q| q.name.to_ascii_lowercase())
            .chain(topics.iter().map(|t| t.name.to_ascii_lowercase()))
            .collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(EmulatorError::Config(format!(
                "UserConfig.Namespaces[0]: entity name '{}' is used twice",
                w[0]
            )));
        }
        Ok((
            Entities {
                namespace: ns.name,
                queues,
                topics,
            },
            ignored,
        ))
    }

    /// Read and parse a Config.json file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, EmulatorError> {
        let path = path.as_ref();
        let text = crate::config::read_text_file(path).map_err(EmulatorError::Config)?;
        Self::from_json(&text).map_err(|e| {
            EmulatorError::Config(format!("{}: {e}", crate::redact::escaped_path(path)))
        })
    }
}

/// Why a text is not a duration the emulator can use; both name the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("'{0}' is not an ISO 8601 duration such as PT1M")]
    Syntax(String),
    #[error(
        "'{0}' is longer than the longest duration the emulator can hold (about 584 billion years)"
    )]
    TooLong(String),
}

/// Parse an ISO 8601 duration as .NET writes TimeSpans (`PT1M`, `PT30S`, `PT0.5S`,
/// `P1DT2H`, `PT1H30M`) into a [`Duration`]. Years and months are refused (their length
/// varies), and so is anything else that is not that shape ([`DurationError::Syntax`]);
/// a value too long for a `Duration` (more than `u64::MAX` seconds, e.g.
/// `PT99999999999999999999S`) is [`DurationError::TooLong`], never a panic.
pub fn parse_iso8601_duration(s: &str) -> Result<Duration, DurationError> {
    let syntax = || DurationError::Syntax(s.to_string());
    let rest = s.trim().strip_prefix('P').ok_or_else(syntax)?;
    if rest.is_empty() {
        return Err(syntax());
    }
    let mut secs = 0f64;
    let mut in_time = false;
    let mut num = String::new();
    let mut any = false;
    for c in rest.chars() {
        match c {
            'T' if !in_time && num.is_empty() => in_time = true,
            '0'..='9' | '.' => num.push(c),
            'W' | 'D' | 'H' | 'M' | 'S' => {
                let v: f64 = num.parse().map_err(|_| syntax())?;
                num.clear();
                let unit = match (c, in_time) {
                    ('W', false) => 7.0 * 86400.0,
                    ('D', false) => 86400.0,
                    ('H', true) => 3600.0,
                    ('M', true) => 60.0,
                    ('S', true) => 1.0,
                    _ => return Err(syntax()),
                };
                secs += v * unit;
                any = true;
            }
            _ => return Err(syntax()),
        }
    }
    if !num.is_empty() || !any {
        return Err(syntax());
    }
    // Digits only, so `secs` is finite or +inf and never negative or NaN: the one way
    // to fail here is a value too long for a Duration.
    Duration::try_from_secs_f64(secs).map_err(|_| DurationError::TooLong(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s| parse_iso8601_duration(s).ok();
        assert_eq!(d("PT1M"), Some(Duration::from_secs(60)));
        assert_eq!(d("PT30S"), Some(Duration::from_secs(30)));
        assert_eq!(d("PT0.5S"), Some(Duration::from_millis(500)));
        assert_eq!(d("PT1H30M"), Some(Duration::from_secs(5400)));
        assert_eq!(d("P1DT1S"), Some(Duration::from_secs(86401)));
        for bad in ["", "P", "PT", "1M", "PT1", "P1M", "PTxS", "PT1M1"] {
            assert_eq!(
                parse_iso8601_duration(bad),
                Err(DurationError::Syntax(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_duration_too_long_is_refused_naming_it() {
        for long in [
            "PT99999999999999999999S",
            "P99999999999999999999D",
            &format!("PT{}S", "9".repeat(400)), // parses to +inf
        ] {
            let e = parse_iso8601_duration(long).unwrap_err();
            assert_eq!(e, DurationError::TooLong(long.to_string()));
            assert!(e.to_string().contains(long), "{e}");
        }
        // The longest that fits is still a duration.
        assert!(parse_iso8601_duration("PT18446744073709549568S").is_ok());
        let e = Entities::from_json(r#"{"UserConfig":{"Namespaces":[{"Name":"n","Queues":[{"Name":"q","Properties":{"LockDuration":"PT99999999999999999999S"}}]}]}}"#).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("Queues[0].Properties.LockDuration")
                && e.contains("PT99999999999999999999S"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_path() {
        let e = Entities::from_json(r#"{"UserConfig":{"Namespaces":[{"Name":"n","Topics":[{"Name":"t","Subscriptions":[{"Name":"s","Properties":{"LockDuration":"soon"}}]}]}]}}"#).unwrap_err();
        assert!(
            e.to_string()
                .contains("Topics[0].Subscriptions[0].Properties.LockDuration"),
            "{e}"
        );
        let e = Entities::from_json(r#"{"UserConfig":{"Namespaces":[{"Name":"n","Queues":[{"Name":"q","Properties":{"MaxDeliveryCount":"x"}}]}]}}"#).unwrap_err();
        assert!(e.to_string().contains("MaxDeliveryCount"), "{e}");
        assert!(Entities::from_json("{").is_err());
    }
}
