//! The emulator's entities, read from a file in the format of Microsoft's Service Bus
//! emulator (`Config.json`): `{"UserConfig":{"Namespaces":[{"Name":…,"Queues":[…],
//! "Topics":[{"Name":…,"Subscriptions":[{"Name":…,"Properties":{"LockDuration":"PT1M",
//! "MaxDeliveryCount":3}}]}]}]}}`. Unknown properties are ignored, so the file users
//! already have works unchanged.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::EmulatorError;

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

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct File {
    user_config: UserConfig,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UserConfig {
    namespaces: Vec<Namespace>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Namespace {
    name: String,
    #[serde(default)]
    queues: Vec<Entity>,
    #[serde(default)]
    topics: Vec<Topic>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Topic {
    name: String,
    #[serde(default)]
    subscriptions: Vec<Entity>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entity {
    name: String,
    #[serde(default)]
    properties: Properties,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct Properties {
    lock_duration: Option<String>,
    max_delivery_count: Option<u32>,
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
                subscriptions: vec![EntityConfig {
                    name: "edge".into(),
                    lock_duration: DEFAULT_LOCK_DURATION,
                    max_delivery_count: DEFAULT_MAX_DELIVERY_COUNT,
                }],
            }],
        }
    }

    /// Parse a Config.json text. Errors name the JSON path that is wrong.
    pub fn from_json(text: &str) -> Result<Self, EmulatorError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let file: File = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            EmulatorError::Config(format!("{path}: {}", e.inner()))
        })?;
        let mut namespaces = file.user_config.namespaces.into_iter();
        let ns = namespaces.next().ok_or_else(|| {
            EmulatorError::Config("UserConfig.Namespaces: at least one namespace is needed".into())
        })?;
        if namespaces.next().is_some() {
            return Err(EmulatorError::Config(
                "UserConfig.Namespaces: the emulator serves exactly one namespace".into(),
            ));
        }
        let entity = |e: Entity, at: String| -> Result<EntityConfig, EmulatorError> {
            if e.name.is_empty() || e.name.contains('/') {
                return Err(EmulatorError::Config(format!(
                    "{at}.Name: '{}' is not a valid entity name",
                    e.name
                )));
            }
            let lock_duration = match e.properties.lock_duration {
                None => DEFAULT_LOCK_DURATION,
                Some(s) => parse_iso8601_duration(&s).ok_or_else(|| {
                    EmulatorError::Config(format!(
                        "{at}.Properties.LockDuration: '{s}' is not an ISO 8601 duration such as PT1M"
                    ))
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
            Ok(EntityConfig {
                name: e.name,
                lock_duration,
                max_delivery_count,
            })
        };
        let mut queues = Vec::new();
        for (i, q) in ns.queues.into_iter().enumerate() {
            queues.push(entity(q, format!("UserConfig.Namespaces[0].Queues[{i}]"))?);
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
            let mut subscriptions = Vec::new();
            for (j, s) in t.subscriptions.into_iter().enumerate() {
                subscriptions.push(entity(s, format!("{at}.Subscriptions[{j}]"))?);
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
        Ok(Entities {
            namespace: ns.name,
            queues,
            topics,
        })
    }

    /// Read and parse a Config.json file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, EmulatorError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| EmulatorError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&text)
            .map_err(|e| EmulatorError::Config(format!("{}: {e}", path.display())))
    }
}

/// Parse an ISO 8601 duration as .NET writes TimeSpans (`PT1M`, `PT30S`, `PT0.5S`,
/// `P1DT2H`, `PT1H30M`). Years and months are refused (their length varies).
pub fn parse_iso8601_duration(s: &str) -> Option<Duration> {
    let rest = s.trim().strip_prefix('P')?;
    if rest.is_empty() {
        return None;
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
                let v: f64 = num.parse().ok()?;
                num.clear();
                let unit = match (c, in_time) {
                    ('W', false) => 7.0 * 86400.0,
                    ('D', false) => 86400.0,
                    ('H', true) => 3600.0,
                    ('M', true) => 60.0,
                    ('S', true) => 1.0,
                    _ => return None,
                };
                secs += v * unit;
                any = true;
            }
            _ => return None,
        }
    }
    if !num.is_empty() || !any || !secs.is_finite() {
        return None;
    }
    Some(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s| parse_iso8601_duration(s);
        assert_eq!(d("PT1M"), Some(Duration::from_secs(60)));
        assert_eq!(d("PT30S"), Some(Duration::from_secs(30)));
        assert_eq!(d("PT0.5S"), Some(Duration::from_millis(500)));
        assert_eq!(d("PT1H30M"), Some(Duration::from_secs(5400)));
        assert_eq!(d("P1DT1S"), Some(Duration::from_secs(86401)));
        for bad in ["", "P", "PT", "1M", "PT1", "P1M", "PTxS", "PT1M1"] {
            assert_eq!(d(bad), None, "{bad}");
        }
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
