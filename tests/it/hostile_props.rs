//! Hostile input, property-tested: the config parser, the connection-string parser, the
//! panel op parser, topic templates and filters, and the AMQP message -> event decoder
//! never panic on any input, give clear errors, bound what they keep and never echo a
//! secret. Case counts are bounded so the whole file runs in a few seconds.

use asb_gateway::config::{Config, ConfigError, ConnectionString, LoadEnv};
use asb_gateway::event::{
    CONTENT_TYPE_MAX, EventMeta, ID_MAX, PROP_KEY_MAX, PROP_VALUE_MAX, PROPS_MAX, TOPIC_MAX,
};
use asb_gateway::panels::protocol::Op;
use asb_gateway::routing::{Filter, Origin, Template};
use asb_gateway::source::decode::{self, AmqpMessage, ENQUEUED_TIME, SEQUENCE_NUMBER};
use fe2o3_amqp_types::messaging::{
    AmqpSequence, AmqpValue, ApplicationProperties, Batch, Body, Data, Message, MessageAnnotations,
    MessageId, Properties,
};
use fe2o3_amqp_types::primitives::{
    Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Uuid, Value,
};
use proptest::prelude::*;

const SECRET: &str = "SUPERSECRETKEY";

fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------------------------- config

fn fixtures() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/config/valid");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    v.sort();
    assert!(v.len() >= 2, "valid fixtures present");
    v
}

/// A mutation of a valid config text.
#[derive(Debug, Clone)]
enum Mutation {
    DeleteLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    InsertBytes(usize, String),
    DeleteBytes(usize, usize),
    /// Replace the value after `=` on a line with another value: one of the pool
    /// (`pick`) or `free` text. A line holding a secret gets a malformed value that still
    /// carries the secret (a wrong type, broken quoting, a number), other lines never get
    /// the secret: echoing a bad non-secret value in an error is fine, echoing a secret
    /// is not.
    ReplaceValue(usize, usize, String),
}

/// Numeric stand-in for a secret (an unquoted numeric password).
const SECRET_NUMBER: &str = "987654321";

const SECRET_KEYS: [&str; 2] = ["connection_string", "password"];

const SECRET_VALUES: [&str; 7] = [
    "[\"SUPERSECRETKEY\"]",
    "{ a = \"SUPERSECRETKEY\" }",
    "'SUPERSECRETKEY' extra",
    "\"\"\"SUPERSECRETKEY",
    "\"SUPERSECRETKEY\\q\"",
    "987654321",
    "SUPERSECRETKEY",
];

const OTHER_VALUES: [&str; 10] = [
    "-1",
    "1e400",
    "18446744073709551616",
    "true",
    "\"\"",
    "\"{\"",
    "\"a/#/b\"",
    "[1, \"x\"]",
    "{ x = 1 }",
    "\"bogus\"",
];

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::DeleteLine),
        any::<usize>().prop_map(Mutation::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (any::<usize>(), "(\\PC|[\"'\\[\\]={}#\\n\\\\]){1,8}")
            .prop_map(|(a, s)| Mutation::InsertBytes(a, s)),
        (any::<usize>(), 1usize..16).prop_map(|(a, n)| Mutation::DeleteBytes(a, n)),
        (any::<usize>(), any::<usize>(), "[ -~]{0,24}")
            .prop_map(|(a, p, f)| Mutation::ReplaceValue(a, p, f)),
    ]
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let n = lines.len().max(1);
    match m {
        Mutation::DeleteLine(i) => {
            if !lines.is_empty() {
                lines.remove(i % n);
            }
        }
        Mutation::DuplicateLine(i) => {
            if !lines.is_empty() {
                let l = lines[i % n].clone();
                lines.insert(i % n, l);
            }
        }
        Mutation::SwapLines(a, b) => {
            if !lines.is_empty() {
                lines.swap(a % n, b % n);
            }
        }
        Mutation::ReplaceValue(i, pick, free) => {
            if !lines.is_empty() {
                let l = &mut lines[i % n];
                if let Some((k, _)) = l.split_once('=') {
                    let v = if SECRET_KEYS.contains(&k.trim()) {
                        SECRET_VALUES[pick % SECRET_VALUES.len()].to_string()
                    } else if pick % 3 == 0 && !free.contains("SUPERSECRET") {
                        free.clone()
                    } else {
                        OTHER_VALUES[pick % OTHER_VALUES.len()].to_string()
                    };
                    *l = format!("{k}= {v}");
                }
            }
        }
        Mutation::InsertBytes(at, s) => {
            let mut t = text.to_string();
            let at = floor_boundary(&t, at % (t.len() + 1));
            t.insert_str(at, s);
            return t;
        }
        Mutation::DeleteBytes(at, len) => {
            let mut t = text.to_string();
            let a = floor_boundary(&t, at % (t.len() + 1));
            let b = floor_boundary(&t, a + len);
            t.replace_range(a..b, "");
            return t;
        }
    }
    lines.join("\n")
}

/// An error must name a key (a dotted path of identifier-ish parts) or `config`, and
/// never carry the fixture's secret, in Display or Debug.
fn check_config_error(e: &ConfigError) {
    let shown = e.to_string();
    let debug = format!("{e:?}");
    for secret in [SECRET, SECRET_NUMBER] {
        assert!(!shown.contains(secret), "secret in error: {shown}");
        assert!(!debug.contains(secret), "secret in error Debug: {debug}");
    }
    match e {
        ConfigError::Syntax { key, .. } | ConfigError::Invalid { key, .. } => {
            assert!(!key.is_empty(), "error names no key: {shown}");
            assert!(shown.contains(key.as_str()), "{shown}");
        }
        ConfigError::Read { .. } => panic!("parse never reads a file: {shown}"),
    }
}

proptest! {
    #![proptest_config(cfg(400))]

    #[test]
    fn config_mutated_fixtures_never_panic_nor_leak(
        which in any::<usize>(),
        muts in proptest::collection::vec(mutation(), 1..4),
    ) {
        let all = fixtures();
        let mut text = all[which % all.len()].clone();
        for m in &muts {
            text = apply(&text, m);
        }
        match Config::parse(&text, &LoadEnv::default()) {
            Ok(c) => {
                let debug = format!("{c:?}");
                prop_assert!(!debug.contains(SECRET), "secret in Config Debug");
            }
            Err(e) => check_config_error(&e),
        }
    }

    #[test]
    fn config_arbitrary_tomlish_text_never_panics(
        text in "([a-z_.\\[\\]]{0,12}( ?= ?(\"[^\"\\n]{0,12}\"|[0-9]{1,4}|true|\\[\\]))?\\n){0,12}",
        noise in "\\PC{0,40}",
    ) {
        for t in [text.clone(), format!("{text}{noise}"), noise.clone()] {
            if let Err(e) = Config::parse(&t, &LoadEnv::default()) {
                check_config_error(&e);
            }
        }
    }
}

// ------------------------------------------------------------- connection string

proptest! {
    #![proptest_config(cfg(1000))]

    #[test]
    fn connection_strings_never_panic_nor_echo_the_key(
        parts in proptest::collection::vec(
            prop_oneof![
                "\\PC{0,20}",
                "(Endpoint|SharedAccessKeyName|EntityPath|UseDevelopmentEmulator|endpoint)=\\PC{0,20}",
                "Endpoint=(sb|amqp|amqps)://[a-z0-9.:@\\[\\]]{0,20}/?",
                Just("SharedAccessKey=S3CR3Tv4lu3".to_string()),
                Just("SharedAccessSignature=SharedAccessSignature sr=a&sig=S3CR3Tv4lu3&se=1".to_string()),
                Just("SharedAccessSignature=S3CR3Tv4lu3".to_string()),
            ],
            0..7,
        ),
        sep in prop_oneof![Just(";"), Just(" ; "), Just(";;")],
    ) {
        let s = parts.join(sep);
        match ConnectionString::parse(&s) {
            Ok(c) => {
                prop_assert!(!format!("{c:?}").contains("S3CR3T"), "secret in Debug");
            }
            Err(e) => {
                prop_assert!(!e.to_string().contains("S3CR3T"), "secret in error: {e}");
                prop_assert!(!format!("{e:?}").contains("S3CR3T"), "secret in Debug: {e:?}");
                prop_assert!(e.to_string().starts_with("connection string"), "{e}");
            }
        }
        // The same through the config parser, as a user would write it.
        let toml = format!(
            "[source]\nconnection_string = {}\n[[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n",
            toml_string(&s)
        );
        if let Err(e) = Config::parse(&toml, &LoadEnv::default()) {
            prop_assert!(!e.to_string().contains("S3CR3T"), "secret in config error: {e}");
        }
    }
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

// ------------------------------------------------------------------ panel op parser

proptest! {
    #![proptest_config(cfg(1000))]

    #[test]
    fn op_parser_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Err(e) = Op::parse(&bytes) {
            prop_assert!(
                ["bad_utf8", "bad_json", "bad_op", "unknown_op"].contains(&e.code),
                "unexpected code {}", e.code
            );
            prop_assert!(!e.message.is_empty());
            prop_assert!(e.message.len() < 400, "message unbounded: {}", e.message.len());
        }
    }

    #[test]
    fn op_parser_arbitrary_json(v in json_value(3)) {
        let text = v.to_string();
        let r = Op::parse(text.as_bytes());
        match (&r, v.get("op").and_then(|o| o.as_str())) {
            (Ok(Op::Ping), Some("ping")) => {}
            (Ok(Op::Subscribe(_)), Some("subscribe")) => {}
            (Ok(Op::Unsubscribe(_)), Some("unsubscribe")) => {}
            (Ok(Op::Resume(_)), Some("resume")) => {}
            (Ok(op), _) => prop_assert!(false, "{text} parsed as {op:?}"),
            (Err(e), _) => {
                prop_assert!(["bad_json", "bad_op", "unknown_op"].contains(&e.code), "{}", e.code);
                prop_assert!(e.message.len() < 400 + text.len().min(200), "{}", e.message);
            }
        }
    }

    #[test]
    fn op_parser_op_shaped_json(
        op in prop_oneof![
            Just("subscribe".to_string()),
            Just("unsubscribe".to_string()),
            Just("resume".to_string()),
            Just("ping".to_string()),
            "\\PC{0,80}"
        ],
        filters in proptest::option::of(json_value(2)),
        since in proptest::option::of(json_value(1)),
    ) {
        let mut o = serde_json::Map::new();
        o.insert("op".into(), serde_json::Value::String(op.clone()));
        if let Some(f) = filters { o.insert("filters".into(), f); }
        if let Some(s) = since { o.insert("since".into(), s); }
        let text = serde_json::Value::Object(o).to_string();
        if let Err(e) = Op::parse(text.as_bytes()) {
            // unknown ops are quoted at most 32 characters long
            prop_assert!(e.message.chars().count() < 400, "{}", e.message);
        }
    }
}

fn json_value(depth: u32) -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value as J;
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        any::<i64>().prop_map(J::from),
        any::<f64>().prop_map(J::from),
        "\\PC{0,12}".prop_map(J::String),
        prop_oneof![
            Just("subscribe"),
            Just("ping"),
            Just("resume"),
            Just("#"),
            Just("a/+/b")
        ]
        .prop_map(|s| J::String(s.into())),
    ];
    leaf.prop_recursive(depth, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(J::Array),
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just("op".to_string()),
                        Just("filters".to_string()),
                        Just("since".to_string()),
                        "[a-z]{0,6}"
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| J::Object(kv.into_iter().collect())),
        ]
    })
}

// --------------------------------------------------------------- template + filter

/// Strings rich in topic syntax, NULs, non-ASCII and length.
fn topicish() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::collection::vec(
            prop_oneof![
                Just("/".to_string()),
                Just("+".to_string()),
                Just("#".to_string()),
                Just("\0".to_string()),
                Just("$".to_string()),
                Just("{".to_string()),
                Just("}".to_string()),
                Just("ü".to_string()),
                "[a-c]{1,3}",
                "\\PC{1,3}",
            ],
            0..12,
        )
        .prop_map(|v| v.concat()),
        1 => ("\\PC{0,4}", 100usize..700).prop_map(|(s, n)| format!("{s}{}", "ab/".repeat(n / 3))),
    ]
}

/// The reference matcher: MQTT 3.1.1 §4.7 written the obvious way, recursively.
fn reference_matches(filter: &str, topic: &str) -> bool {
    fn go(f: &[&str], t: &[&str]) -> bool {
        match (f.first(), t.first()) {
            (Some(&"#"), _) => f.len() == 1,
            (Some(&"+"), Some(_)) => go(&f[1..], &t[1..]),
            (Some(a), Some(b)) => a == b && go(&f[1..], &t[1..]),
            (None, None) => true,
            _ => false,
        }
    }
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    go(&f, &t)
}

/// The reference validity rule for a filter.
fn reference_valid(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    !filter.is_empty()
        && filter.len() <= asb_gateway::routing::FILTER_MAX
        // no control characters: topics never hold them (MQTT 5.0 §1.5.4 forbids them)
        && !filter.chars().any(char::is_control)
        && levels.iter().enumerate().all(|(i, l)| {
            (!l.contains('#') || (*l == "#" && i + 1 == levels.len()))
                && (!l.contains('+') || *l == "+")
        })
}

fn meta_from(subject: &str, ct: &str, cid: &str, props: &[(String, String)]) -> EventMeta {
    let mut t = false;
    let mut m = EventMeta {
        subject: Some(asb_gateway::event::bounded(subject, &mut t)),
        content_type: Some(asb_gateway::event::bounded(ct, &mut t)),
        correlation_id: Some(asb_gateway::event::bounded(cid, &mut t)),
        ..Default::default()
    };
    for (k, v) in props {
        m.push_prop(k, v);
    }
    m
}

proptest! {
    #![proptest_config(cfg(1000))]

    #[test]
    fn template_render_is_a_valid_bounded_topic(
        tpl in topicish(),
        subject in topicish(),
        ct in topicish(),
        cid in topicish(),
        topic in topicish(),
        sub in topicish(),
        props in proptest::collection::vec((topicish(), topicish()), 0..4),
    ) {
        let meta = meta_from(&subject, &ct, &cid, &props);
        let origin = Origin { topic: &topic, subscription: &sub };
        let templates = [
            tpl.clone(),
            format!("{{subject}}/{tpl}"),
            "{prop:line}/{subject}/{topic}/{subscription}/{content_type}/{correlation_id}".to_string(),
            format!("{{prop:{}}}/{{subject}}", props.first().map_or("x", |p| p.0.as_str()).replace('}', "")),
        ];
        for t in &templates {
            let Ok(tp) = Template::parse(t) else { continue };
            let (out, cut) = tp.render(&meta, origin);
            prop_assert!(out.len() <= TOPIC_MAX);
            prop_assert!(!out.is_empty());
            prop_assert!(!out.contains(['+', '#', '\0']), "rendered {out:?}");
            if !cut {
                prop_assert!(out.len() < TOPIC_MAX || out.len() == TOPIC_MAX);
            }
            // Every rendered topic is matched by '#' and by itself as a filter.
            let f = Filter::parse(&out);
            prop_assert!(f.is_ok(), "rendered topic {out:?} is not a valid filter");
            let f = f.unwrap();
            prop_assert!(f.matches(&out) || out.starts_with('$'));
            prop_assert!(Filter::parse("#").unwrap().matches(&out) || out.starts_with('$'));
        }
    }

    #[test]
    fn filters_parse_and_match_like_the_reference(filter in topicish(), topic in topicish()) {
        let parsed = Filter::parse(&filter);
        prop_assert_eq!(parsed.is_ok(), reference_valid(&filter), "filter {:?}: {:?}", filter, parsed);
        if let Ok(f) = parsed {
            // topics never contain wildcards in practice; check both raw and cleaned
            let clean: String = topic.chars().map(|c| if "+#\0".contains(c) { '_' } else { c }).collect();
            for t in [&topic, &clean] {
                prop_assert_eq!(f.matches(t), reference_matches(&filter, t), "filter {:?} topic {:?}", filter, t);
            }
            // `within` is sound: if f is within g, every topic f matches, g matches.
            for g in ["#", "+/#", "a/#", "a/+", "+", "a", "$a/#"] {
                let g = Filter::parse(g).unwrap();
                if f.within(&g) && f.matches(&clean) {
                    prop_assert!(g.matches(&clean), "{f} within {g} but {clean:?} escapes");
                }
            }
        }
    }
}

// ------------------------------------------------------------------- AMQP decoder

fn amqp_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,20}",
        1 => "[\\x00-\\x1f]{0,5}",
        1 => (1usize..2000).prop_map(|n| "é".repeat(n)),
        1 => (100usize..5000).prop_map(|n| "x".repeat(n)),
    ]
}

fn amqp_value(depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u8>().prop_map(Value::Ubyte),
        any::<u16>().prop_map(Value::Ushort),
        any::<u32>().prop_map(Value::Uint),
        any::<u64>().prop_map(Value::Ulong),
        any::<i8>().prop_map(Value::Byte),
        any::<i16>().prop_map(Value::Short),
        any::<i32>().prop_map(Value::Int),
        any::<i64>().prop_map(Value::Long),
        any::<f32>().prop_map(|f| Value::Float(f.into())),
        any::<f64>().prop_map(|f| Value::Double(f.into())),
        any::<char>().prop_map(Value::Char),
        any::<i64>().prop_map(|t| Value::Timestamp(Timestamp::from_milliseconds(t))),
        any::<[u8; 16]>().prop_map(|u| Value::Uuid(Uuid::from(u))),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| Value::Binary(Binary::from(b))),
        amqp_string().prop_map(Value::String),
        "\\PC{0,10}".prop_map(|s| Value::Symbol(Symbol::from(s))),
        decimal(),
        described(),
    ];
    leaf.prop_recursive(depth, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
            proptest::collection::vec((inner.clone(), inner), 0..5).prop_map(|kv| {
                let mut m = OrderedMap::new();
                for (k, v) in kv {
                    m.insert(k, v);
                }
                Value::Map(m)
            }),
        ]
    })
}

fn simple_value() -> impl Strategy<Value = SimpleValue> {
    prop_oneof![
        Just(SimpleValue::Null),
        any::<bool>().prop_map(SimpleValue::Bool),
        any::<u64>().prop_map(SimpleValue::Ulong),
        any::<i64>().prop_map(SimpleValue::Long),
        any::<i32>().prop_map(SimpleValue::Int),
        any::<f64>().prop_map(|f| SimpleValue::Double(f.into())),
        any::<f32>().prop_map(|f| SimpleValue::Float(f.into())),
        any::<char>().prop_map(SimpleValue::Char),
        any::<i64>().prop_map(|t| SimpleValue::Timestamp(Timestamp::from_milliseconds(t))),
        prop_oneof![Just(i64::MAX), Just(i64::MIN), Just(253_402_300_800_000i64)]
            .prop_map(|t| SimpleValue::Timestamp(Timestamp::from_milliseconds(t))),
        any::<[u8; 16]>().prop_map(|u| SimpleValue::Uuid(Uuid::from(u))),
        proptest::collection::vec(any::<u8>(), 0..400)
            .prop_map(|b| SimpleValue::Binary(Binary::from(b))),
        amqp_string().prop_map(SimpleValue::String),
        "\\PC{0,10}".prop_map(|s| SimpleValue::Symbol(Symbol::from(s))),
        decimal().prop_map(|v| SimpleValue::try_from(v).unwrap()),
        described().prop_map(|v| SimpleValue::try_from(v).unwrap()),
    ]
}

/// Decimals of every width with arbitrary bits (specials, non-canonical coefficients,
/// the .NET layout and extreme exponents among them).
fn decimal() -> impl Strategy<Value = Value> {
    use fe2o3_amqp_types::primitives::{Dec32, Dec64, Dec128};
    prop_oneof![
        any::<[u8; 4]>().prop_map(|b| Value::Decimal32(Dec32::from(b))),
        any::<[u8; 8]>().prop_map(|b| Value::Decimal64(Dec64::from(b))),
        any::<[u8; 16]>().prop_map(|b| Value::Decimal128(Dec128::from(b))),
    ]
}

/// Described values: the Azure SDKs' descriptors around values of any simple type, and
/// other descriptors.
fn described() -> impl Strategy<Value = Value> {
    use serde_amqp::described::Described;
    use serde_amqp::descriptor::Descriptor;
    let descriptor = prop_oneof![
        Just(Descriptor::Name(Symbol::from(
            "com.microsoft:datetime-offset"
        ))),
        Just(Descriptor::Name(Symbol::from("com.microsoft:timespan"))),
        Just(Descriptor::Name(Symbol::from("com.microsoft:uri"))),
        "\\PC{0,12}".prop_map(|s| Descriptor::Name(Symbol::from(s))),
        any::<u64>().prop_map(Descriptor::Code),
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(Value::Long),
        prop_oneof![
            Just(i64::MIN),
            Just(i64::MAX),
            Just(0),
            Just(-1),
            Just(3_155_378_975_999_999_999)
        ]
        .prop_map(Value::Long),
        any::<i32>().prop_map(Value::Int),
        any::<u64>().prop_map(Value::Ulong),
        amqp_string().prop_map(Value::String),
        Just(Value::Null),
        proptest::collection::vec(any::<i64>().prop_map(Value::Long), 0..200).prop_map(Value::List),
    ];
    (descriptor, value)
        .prop_map(|(descriptor, value)| Value::Described(Box::new(Described { descriptor, value })))
}

fn message_id() -> impl Strategy<Value = MessageId> {
    prop_oneof![
        amqp_string().prop_map(MessageId::String),
        any::<u64>().prop_map(MessageId::Ulong),
        any::<[u8; 16]>().prop_map(|u| MessageId::Uuid(Uuid::from(u))),
        proptest::collection::vec(any::<u8>(), 0..200)
            .prop_map(|b| MessageId::Binary(Binary::from(b))),
    ]
}

fn body() -> impl Strategy<Value = Body<Value>> {
    prop_oneof![
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..4).prop_map(
            |parts| Body::Data(Batch::new(
                parts
                    .into_iter()
                    .map(|p| Data(Binary::from(p)))
                    .collect::<Vec<_>>()
            ))
        ),
        amqp_value(3).prop_map(|v| Body::Value(AmqpValue(v))),
        proptest::collection::vec(proptest::collection::vec(amqp_value(2), 0..5), 1..3).prop_map(
            |seqs| Body::Sequence(Batch::new(
                seqs.into_iter().map(AmqpSequence).collect::<Vec<_>>()
            ))
        ),
        Just(Body::Empty),
    ]
}

#[derive(Debug, Clone)]
struct Input {
    body: Body<Value>,
    message_id: Option<MessageId>,
    correlation_id: Option<MessageId>,
    subject: Option<String>,
    content_type: Option<String>,
    props: Vec<(String, SimpleValue)>,
    annotations: Vec<(String, Value)>,
    max_body: usize,
}

fn input() -> impl Strategy<Value = Input> {
    (
        body(),
        proptest::option::of(message_id()),
        proptest::option::of(message_id()),
        proptest::option::of(amqp_string()),
        proptest::option::of(prop_oneof![
            Just("application/json".to_string()),
            Just("text/plain".to_string()),
            amqp_string()
        ]),
        proptest::collection::vec((amqp_string(), simple_value()), 0..40),
        proptest::collection::vec(
            (
                prop_oneof![
                    Just(SEQUENCE_NUMBER.to_string()),
                    Just(ENQUEUED_TIME.to_string()),
                    Just("x-opt-locked-until".to_string()),
                    Just(ENQUEUED_TIME.to_string()),
                    "\\PC{0,10}"
                ],
                amqp_value(1),
            ),
            0..5,
        ),
        prop_oneof![Just(0usize), 1usize..64, Just(16384)],
    )
        .prop_map(
            |(
                body,
                message_id,
                correlation_id,
                subject,
                content_type,
                props,
                annotations,
                max_body,
            )| Input {
                body,
                message_id,
                correlation_id,
                subject,
                content_type,
                props,
                annotations,
                max_body,
            },
        )
}

fn build(i: &Input) -> AmqpMessage {
    let mut ap = OrderedMap::new();
    for (k, v) in &i.props {
        ap.insert(k.clone(), v.clone());
    }
    let mut ma = OrderedMap::new();
    for (k, v) in &i.annotations {
        ma.insert(k.as_str().into(), v.clone());
    }
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: Some(MessageAnnotations(ma)),
        properties: Some(Properties {
            message_id: i.message_id.clone(),
            correlation_id: i.correlation_id.clone(),
            subject: i.subject.clone(),
            content_type: i.content_type.as_deref().map(Symbol::from),
            ..Default::default()
        }),
        application_properties: Some(ApplicationProperties(ap)),
        body: i.body.clone(),
        footer: None,
    }
}

fn fits(s: &str, max: usize) -> bool {
    s.len() <= max && !s.chars().any(char::is_control)
}

fn id_fits(id: &MessageId) -> bool {
    fits(&decode::message_id_string(id), ID_MAX)
}

proptest! {
    #![proptest_config(cfg(600))]

    #[test]
    fn decoder_never_panics_and_bounds_metadata(i in input()) {
        let msg = build(&i);
        match decode::decode(&msg, i.max_body) {
            Ok(d) => {
                prop_assert!(d.body.len() <= i.max_body, "body {} > {}", d.body.len(), i.max_body);
                let m = &d.meta;
                prop_assert!(m.props.len() <= PROPS_MAX);
                for (k, v) in &m.props {
                    prop_assert!(k.len() <= PROP_KEY_MAX && v.len() <= PROP_VALUE_MAX);
                    prop_assert!(!k.chars().chain(v.chars()).any(char::is_control));
                }
                for s in [&m.subject, &m.message_id, &m.correlation_id].into_iter().flatten() {
                    prop_assert!(s.len() <= ID_MAX);
                }
                if let Some(ct) = &m.content_type { prop_assert!(ct.len() <= CONTENT_TYPE_MAX) }
                // truncated exactly when something had to be cut or cleaned
                let cut = i.subject.as_deref().is_some_and(|s| !fits(s, ID_MAX))
                    || i.content_type.as_deref().is_some_and(|s| !fits(s, CONTENT_TYPE_MAX))
                    || i.message_id.as_ref().is_some_and(|id| !id_fits(id))
                    || i.correlation_id.as_ref().is_some_and(|id| !id_fits(id))
                    || msg.application_properties.as_ref().unwrap().0.len() > PROPS_MAX
                    || msg.application_properties.as_ref().unwrap().0.iter().take(PROPS_MAX).any(|(k, v)| {
                        !fits(k, PROP_KEY_MAX) || !fits(&decode::simple_value_string(v), PROP_VALUE_MAX)
                    });
                prop_assert_eq!(m.truncated, cut, "meta {:?}", m);
                // wrong annotation types are ignored, right ones are taken
                let last = |name: &str| i.annotations.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone());
                match last(SEQUENCE_NUMBER) {
                    Some(Value::Long(n)) => prop_assert_eq!(m.asb_seq, Some(n)),
                    Some(Value::String(_)) | Some(Value::Timestamp(_)) | Some(Value::List(_)) | None =>
                        prop_assert_eq!(m.asb_seq, None),
                    _ => {}
                }
                match last(ENQUEUED_TIME) {
                    Some(Value::Timestamp(t)) => prop_assert_eq!(m.enqueued_at_ms, Some(t.milliseconds())),
                    _ => prop_assert_eq!(m.enqueued_at_ms, None),
                }
                // the event encodes (JSON frame parses) without panicking
                let topic = asb_gateway::event::Topic::try_from("t").unwrap();
                let ev = asb_gateway::event::EncodedEvent::encode(1, &topic, m, &d.body);
                let j: serde_json::Value = serde_json::from_str(ev.json.as_str()).expect("frame JSON");
                prop_assert_eq!(j["truncated"].as_bool().unwrap_or(false), m.truncated);
            }
            Err(r) => {
                prop_assert!(!r.description.is_empty());
                prop_assert!(r.description.len() < 300, "{}", r.description);
                let too_large = matches!(r.reason, asb_gateway::metrics::DeadLetterReason::PayloadTooLarge);
                let empty = matches!(i.body, Body::Empty | Body::Value(AmqpValue(Value::Null)));
                prop_assert!(too_large || empty, "unexpected rejection {:?}", r);
            }
        }
    }
}

#[test]
fn oversized_fields_are_cut_and_flagged() {
    let mut ap = OrderedMap::new();
    for i in 0..100 {
        ap.insert(
            format!("k{i:03}{}", "K".repeat(100)),
            SimpleValue::String("v".repeat(10_000)),
        );
    }
    let msg: AmqpMessage = Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            message_id: Some(MessageId::String("m".repeat(100_000))),
            subject: Some("s".repeat(100_000)),
            content_type: Some(Symbol::from("c".repeat(1000))),
            ..Default::default()
        }),
        application_properties: Some(ApplicationProperties(ap)),
        body: Body::Value(AmqpValue(Value::String("ok".into()))),
        footer: None,
    };
    let d = decode::decode(&msg, 100).unwrap();
    assert!(d.meta.truncated);
    assert_eq!(d.meta.props.len(), PROPS_MAX);
    assert_eq!(d.meta.message_id.as_ref().map(|s| s.len()), Some(ID_MAX));
    assert_eq!(d.meta.subject.as_ref().map(|s| s.len()), Some(ID_MAX));
    assert_eq!(
        d.meta.content_type.as_ref().map(|s| s.len()),
        Some(CONTENT_TYPE_MAX)
    );
    assert!(
        d.meta
            .props
            .iter()
            .all(|(k, v)| k.len() == PROP_KEY_MAX && v.len() == PROP_VALUE_MAX)
    );
}

#[test]
fn within_respects_dollar_topics() {
    // A filter allowed because it is "within" a wildcard filter must not reach topics
    // the wildcard cannot: MQTT keeps `$` topics away from filters starting with a
    // wildcard.
    for (inner, outer) in [("$sys/temp", "+/temp"), ("$a/#", "#"), ("$x", "+")] {
        let i = Filter::parse(inner).unwrap();
        let o = Filter::parse(outer).unwrap();
        let topic = inner.replace('#', "t");
        assert!(i.matches(&topic));
        assert!(!o.matches(&topic));
        assert!(!i.within(&o), "{inner} is not within {outer}");
    }
    assert!(
        Filter::parse("$sys/#")
            .unwrap()
            .within(&Filter::parse("$sys/#").unwrap())
    );
    assert!(
        Filter::parse("$sys/a")
            .unwrap()
            .within(&Filter::parse("$sys/+").unwrap())
    );
}
