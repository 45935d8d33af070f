//! Decoding one AMQP message into journal material: bounded metadata ([`EventMeta`]) and
//! the body bytes. Pure functions, no I/O; never panics on any input.
//!
//! - Body: data sections are concatenated; an amqp-value string becomes its UTF-8 text, a
//!   binary its bytes, any other value its JSON representation; amqp-sequence sections
//!   become one JSON array. No body (or an amqp-value null, which is how fe2o3 sends
//!   a message without body) is undecodable. JSON produced here marks the event
//!   `application/json` when the message names no content type, so panels embed it.
//! - Properties: message-id and correlation-id of any AMQP type become strings (ulong in
//!   decimal, uuid hyphenated, binary in hex), subject, content-type.
//! - Application properties: every simple value is rendered as a string.
//! - Annotations `x-opt-sequence-number` (long) and `x-opt-enqueued-time` (timestamp);
//!   values of another type are ignored.

use std::fmt::Write as _;

use fe2o3_amqp_types::messaging::{Body, Message, MessageId, annotations::OwnedKey};
use fe2o3_amqp_types::primitives::{SimpleValue, Value};

use crate::event::{EventMeta, bounded};
use crate::metrics::DeadLetterReason;

/// Annotation carrying the broker's sequence number.
pub const SEQUENCE_NUMBER: &str = "x-opt-sequence-number";
/// Annotation carrying the broker's enqueued time.
pub const ENQUEUED_TIME: &str = "x-opt-enqueued-time";

/// The message as fe2o3 hands it over.
pub type AmqpMessage = Message<Body<Value>>;

/// A decoded message, ready for routing and encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub meta: EventMeta,
    pub body: Vec<u8>,
}

/// Why a message cannot become an event: it is dead-lettered with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: DeadLetterReason,
    pub description: String,
}

impl Rejection {
    pub fn undecodable(description: impl Into<String>) -> Self {
        Rejection {
            reason: DeadLetterReason::Undecodable,
            description: description.into(),
        }
    }

    fn too_large(size: usize, limit: usize) -> Self {
        Rejection {
            reason: DeadLetterReason::PayloadTooLarge,
            description: format!("body of {size} bytes exceeds the limit of {limit} bytes"),
        }
    }
}

/// Decode a message; the body may be at most `max_body` bytes.
pub fn decode(msg: &AmqpMessage, max_body: usize) -> Result<Decoded, Rejection> {
    let (body, produced_json) = body_bytes(&msg.body, max_body)?;
    let mut meta = metadata(msg);
    if produced_json && meta.content_type.is_none() {
        meta.content_type = Some(bounded("application/json", &mut meta.truncated));
    }
    Ok(Decoded { meta, body })
}

/// The metadata of a message (properties, application properties, annotations).
pub fn metadata(msg: &AmqpMessage) -> EventMeta {
    let mut m = EventMeta::default();
    if let Some(p) = &msg.properties {
        if let Some(id) = &p.message_id {
            m.message_id = Some(bounded(&message_id_string(id), &mut m.truncated));
        }
        if let Some(id) = &p.correlation_id {
            m.correlation_id = Some(bounded(&message_id_string(id), &mut m.truncated));
        }
        if let Some(s) = &p.subject {
            m.subject = Some(bounded(s, &mut m.truncated));
        }
        if let Some(ct) = &p.content_type {
            m.content_type = Some(bounded(ct.as_str(), &mut m.truncated));
        }
    }
    if let Some(ap) = &msg.application_properties {
        for (k, v) in ap.0.iter() {
            m.push_prop(k, &simple_value_string(v));
        }
    }
    if let Some(ma) = &msg.message_annotations {
        for (k, v) in ma.0.iter() {
            let OwnedKey::Symbol(sym) = k else { continue };
            match sym.as_str() {
                SEQUENCE_NUMBER => m.asb_seq = integer(v),
                ENQUEUED_TIME => {
                    if let Value::Timestamp(t) = v {
                        m.enqueued_at_ms = Some(t.milliseconds());
                    }
                }
                _ => {}
            }
        }
    }
    m
}

/// An integer annotation value (ASB sends a long; other integer types are accepted when
/// they fit, anything else is ignored).
fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Long(n) => Some(*n),
        Value::Int(n) => Some(i64::from(*n)),
        Value::Short(n) => Some(i64::from(*n)),
        Value::Byte(n) => Some(i64::from(*n)),
        Value::Ulong(n) => i64::try_from(*n).ok(),
        Value::Uint(n) => Some(i64::from(*n)),
        Value::Ushort(n) => Some(i64::from(*n)),
        Value::Ubyte(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// The body bytes, and whether they are JSON this function produced.
pub fn body_bytes(body: &Body<Value>, max_body: usize) -> Result<(Vec<u8>, bool), Rejection> {
    match body {
        Body::Data(batch) => {
            let size: usize = batch.iter().map(|d| d.0.len()).sum();
            if size > max_body {
                return Err(Rejection::too_large(size, max_body));
            }
            let mut out = Vec::with_capacity(size);
            for d in batch.iter() {
                out.extend_from_slice(&d.0);
            }
            Ok((out, false))
        }
        Body::Value(v) => match &v.0 {
            Value::String(s) => check(s.as_bytes().to_vec(), max_body, false),
            Value::Binary(b) => check(b.to_vec(), max_body, false),
            // fe2o3 (and so the emulator) sends a message without body section as an
            // amqp-value null: it carries nothing to show.
            Value::Null => Err(Rejection::undecodable(
                "message has no body (amqp-value null)",
            )),
            other => check(json_bytes(&value_json(other))?, max_body, true),
        },
        Body::Sequence(batch) => {
            let items: Vec<serde_json::Value> = batch
                .iter()
                .flat_map(|s| s.0.iter())
                .map(value_json)
                .collect();
            check(
                json_bytes(&serde_json::Value::Array(items))?,
                max_body,
                true,
            )
        }
        Body::Empty => Err(Rejection::undecodable("message has no body section")),
    }
}

fn check(bytes: Vec<u8>, max: usize, json: bool) -> Result<(Vec<u8>, bool), Rejection> {
    if bytes.len() > max {
        return Err(Rejection::too_large(bytes.len(), max));
    }
    Ok((bytes, json))
}

fn json_bytes(v: &serde_json::Value) -> Result<Vec<u8>, Rejection> {
    serde_json::to_vec(v)
        .map_err(|e| Rejection::undecodable(format!("body cannot be represented as JSON: {e}")))
}

/// The JSON representation of an AMQP value: numbers and booleans as such, strings,
/// symbols and chars as strings, timestamps as milliseconds since the Unix epoch, uuids
/// hyphenated, binary as base64, lists and arrays as arrays, maps as objects (keys
/// rendered as strings), described values as their value. Non-finite floats become null.
pub fn value_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Described(d) => value_json(&d.value),
        Value::Null => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Ubyte(n) => J::from(*n),
        Value::Ushort(n) => J::from(*n),
        Value::Uint(n) => J::from(*n),
        Value::Ulong(n) => J::from(*n),
        Value::Byte(n) => J::from(*n),
        Value::Short(n) => J::from(*n),
        Value::Int(n) => J::from(*n),
        Value::Long(n) => J::from(*n),
        Value::Float(f) => {
            serde_json::Number::from_f64(f64::from(f.into_inner())).map_or(J::Null, J::Number)
        }
        Value::Double(f) => serde_json::Number::from_f64(f.into_inner()).map_or(J::Null, J::Number),
        Value::Decimal32(d) => J::String(hex(d.as_inner())),
        Value::Decimal64(d) => J::String(hex(d.as_inner())),
        Value::Decimal128(d) => J::String(hex(d.as_inner())),
        Value::Char(c) => J::String(c.to_string()),
        Value::Timestamp(t) => J::from(t.milliseconds()),
        Value::Uuid(u) => J::String(uuid_string(u.as_inner())),
        Value::Binary(b) => J::String(base64(b)),
        Value::String(s) => J::String(s.clone()),
        Value::Symbol(s) => J::String(s.as_str().to_string()),
        Value::List(items) => J::Array(items.iter().map(value_json).collect()),
        Value::Array(items) => J::Array(items.0.iter().map(value_json).collect()),
        Value::Map(map) => J::Object(
            map.iter()
                .map(|(k, v)| (key_string(k), value_json(v)))
                .collect(),
        ),
    }
}

fn key_string(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        Value::Symbol(s) => s.as_str().to_string(),
        other => match value_json(other) {
            serde_json::Value::String(s) => s,
            j => j.to_string(),
        },
    }
}

/// A message-id or correlation-id of any AMQP type, as a string.
pub fn message_id_string(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid_string(u.as_inner()),
        MessageId::Binary(b) => hex(b),
    }
}

/// An application-property value as a string.
pub fn simple_value_string(v: &SimpleValue) -> String {
    match v {
        SimpleValue::Null => "null".into(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(f) => f.into_inner().to_string(),
        SimpleValue::Double(f) => f.into_inner().to_string(),
        SimpleValue::Decimal32(d) => hex(d.as_inner()),
        SimpleValue::Decimal64(d) => hex(d.as_inner()),
        SimpleValue::Decimal128(d) => hex(d.as_inner()),
        SimpleValue::Char(c) => c.to_string(),
        SimpleValue::Timestamp(t) => crate::event::format_rfc3339_millis(t.milliseconds()),
        SimpleValue::Uuid(u) => uuid_string(u.as_inner()),
        SimpleValue::Binary(b) => base64(b),
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.as_str().to_string(),
        SimpleValue::Described(d) => match value_json(&d.value) {
            serde_json::Value::String(s) => s,
            j => j.to_string(),
        },
    }
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn base64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn uuid_string(b: &[u8; 16]) -> String {
    let h = hex(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{
        AmqpSequence, AmqpValue, ApplicationProperties, Batch, Data, MessageAnnotations, Properties,
    };
    use fe2o3_amqp_types::primitives::{Binary, OrderedMap, Symbol, Timestamp, Uuid};

    fn msg(body: Body<Value>) -> AmqpMessage {
        Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: None,
            application_properties: None,
            body,
            footer: None,
        }
    }

    fn data(parts: &[&[u8]]) -> Body<Value> {
        Body::Data(Batch::new(
            parts
                .iter()
                .map(|p| Data(Binary::from(p.to_vec())))
                .collect::<Vec<_>>(),
        ))
    }

    #[test]
    fn data_sections_are_concatenated() {
        let d = decode(&msg(data(&[b"hel", b"lo"])), 100).unwrap();
        assert_eq!(d.body, b"hello");
        assert_eq!(d.meta, EventMeta::default());
    }

    #[test]
    fn value_bodies() {
        let d = decode(
            &msg(Body::Value(AmqpValue(Value::String("tëxt".into())))),
            100,
        )
        .unwrap();
        assert_eq!(d.body, "tëxt".as_bytes());
        assert!(d.meta.content_type.is_none());
        let bin = Value::Binary(Binary::from(vec![0xff, 0, 1]));
        let d = decode(&msg(Body::Value(AmqpValue(bin))), 100).unwrap();
        assert_eq!(d.body, vec![0xff, 0, 1]);
        // any other value: its JSON representation, marked as JSON
        let mut map = OrderedMap::new();
        map.insert(Value::String("t".into()), Value::Double(21.5.into()));
        map.insert(Value::Symbol(Symbol::from("ok")), Value::Bool(true));
        map.insert(
            Value::Long(7),
            Value::List(vec![Value::Null, Value::Int(-1)]),
        );
        let d = decode(&msg(Body::Value(AmqpValue(Value::Map(map)))), 100).unwrap();
        let j: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"t": 21.5, "ok": true, "7": [null, -1]})
        );
        assert_eq!(d.meta.content_type.as_deref(), Some("application/json"));
        let d = decode(&msg(Body::Value(AmqpValue(Value::Long(42)))), 100).unwrap();
        assert_eq!(d.body, b"42");
        let ts = Value::Timestamp(Timestamp::from_milliseconds(1_000));
        let u = Value::Uuid(Uuid::from([0x11u8; 16]));
        let d = decode(&msg(Body::Value(AmqpValue(Value::List(vec![ts, u])))), 100).unwrap();
        assert_eq!(
            std::str::from_utf8(&d.body).unwrap(),
            r#"[1000,"11111111-1111-1111-1111-111111111111"]"#
        );
        // NaN has no JSON form
        let d = decode(
            &msg(Body::Value(AmqpValue(Value::Double(f64::NAN.into())))),
            100,
        )
        .unwrap();
        assert_eq!(d.body, b"null");
    }

    #[test]
    fn sequence_sections_become_one_array() {
        let body = Body::Sequence(Batch::new(vec![
            AmqpSequence(vec![Value::Int(1), Value::String("a".into())]),
            AmqpSequence(vec![Value::Bool(false)]),
        ]));
        let mut m = msg(body);
        m.properties = Some(Properties {
            content_type: Some(Symbol::from("application/vnd.x+json")),
            ..Default::default()
        });
        let d = decode(&m, 100).unwrap();
        assert_eq!(d.body, br#"[1,"a",false]"#);
        // the message's own content type is kept
        assert_eq!(
            d.meta.content_type.as_deref(),
            Some("application/vnd.x+json")
        );
    }

    #[test]
    fn oversize_and_empty_are_rejected() {
        let r = decode(&msg(data(&[&[1u8; 60], &[2u8; 50]])), 100).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::PayloadTooLarge);
        assert!(r.description.contains("110"), "{}", r.description);
        assert!(decode(&msg(data(&[&[1u8; 100]])), 100).is_ok());
        let long = Value::String("x".repeat(101));
        let r = decode(&msg(Body::Value(AmqpValue(long))), 100).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::PayloadTooLarge);
        let list = Value::List(vec![Value::Long(1_000_000); 30]);
        let r = decode(&msg(Body::Value(AmqpValue(list))), 100).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::PayloadTooLarge);
        let r = decode(&msg(Body::Empty), 100).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::Undecodable);
        let r = decode(&msg(Body::Value(AmqpValue(Value::Null))), 100).unwrap_err();
        assert_eq!(r.reason, DeadLetterReason::Undecodable);
    }

    #[test]
    fn properties_of_any_id_type() {
        let mut m = msg(data(&[b"x"]));
        m.properties = Some(Properties {
            message_id: Some(MessageId::Uuid(Uuid::from([
                0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0, 1, 2, 3, 4, 5, 6, 7,
            ]))),
            correlation_id: Some(MessageId::Ulong(99)),
            subject: Some("temp".into()),
            content_type: Some(Symbol::from("text/plain")),
            ..Default::default()
        });
        let d = decode(&m, 100).unwrap();
        assert_eq!(
            d.meta.message_id.as_deref(),
            Some("12345678-9abc-def0-0001-020304050607")
        );
        assert_eq!(d.meta.correlation_id.as_deref(), Some("99"));
        assert_eq!(d.meta.subject.as_deref(), Some("temp"));
        assert_eq!(d.meta.content_type.as_deref(), Some("text/plain"));
        assert!(!d.meta.truncated);
        m.properties = Some(Properties {
            message_id: Some(MessageId::Binary(Binary::from(vec![0xde, 0xad]))),
            correlation_id: Some(MessageId::String("c-1".into())),
            ..Default::default()
        });
        let d = decode(&m, 100).unwrap();
        assert_eq!(d.meta.message_id.as_deref(), Some("dead"));
        assert_eq!(d.meta.correlation_id.as_deref(), Some("c-1"));
    }

    #[test]
    fn application_properties_rendered_and_bounded() {
        let mut m = msg(data(&[b"x"]));
        let mut ap = OrderedMap::new();
        ap.insert("line".to_string(), SimpleValue::String("line1".into()));
        ap.insert("n".to_string(), SimpleValue::Int(-5));
        ap.insert("ok".to_string(), SimpleValue::Bool(true));
        ap.insert("t".to_string(), SimpleValue::Double(1.5.into()));
        ap.insert(
            "at".to_string(),
            SimpleValue::Timestamp(Timestamp::from_milliseconds(1_795_000_000_123)),
        );
        ap.insert("sym".to_string(), SimpleValue::Symbol(Symbol::from("s")));
        ap.insert("none".to_string(), SimpleValue::Null);
        m.application_properties = Some(ApplicationProperties(ap));
        let d = decode(&m, 100).unwrap();
        assert_eq!(d.meta.prop("line"), Some("line1"));
        assert_eq!(d.meta.prop("n"), Some("-5"));
        assert_eq!(d.meta.prop("ok"), Some("true"));
        assert_eq!(d.meta.prop("t"), Some("1.5"));
        assert!(d.meta.prop("at").unwrap().starts_with("2026-"));
        assert_eq!(d.meta.prop("sym"), Some("s"));
        assert_eq!(d.meta.prop("none"), Some("null"));
        assert!(!d.meta.truncated);
        // more than 16 properties, and over-long values: kept bounded and flagged
        let mut ap = OrderedMap::new();
        for i in 0..20 {
            ap.insert(format!("k{i}"), SimpleValue::String("v".repeat(300)));
        }
        m.application_properties = Some(ApplicationProperties(ap));
        m.properties = Some(Properties {
            subject: Some("s".repeat(500)),
            ..Default::default()
        });
        let d = decode(&m, 100).unwrap();
        assert!(d.meta.truncated);
        assert_eq!(d.meta.props.len(), crate::event::PROPS_MAX);
        assert_eq!(
            d.meta.prop("k0").unwrap().len(),
            crate::event::PROP_VALUE_MAX
        );
        assert_eq!(d.meta.subject.unwrap().len(), crate::event::ID_MAX);
    }

    #[test]
    fn annotations_and_wrong_types_tolerated() {
        let mut m = msg(data(&[b"x"]));
        m.message_annotations = Some(
            MessageAnnotations::builder()
                .insert(SEQUENCE_NUMBER, Value::Long(1234))
                .insert(
                    ENQUEUED_TIME,
                    Value::Timestamp(Timestamp::from_milliseconds(1_795_000_000_123)),
                )
                .insert("x-opt-locked-until", Value::Long(5))
                .build(),
        );
        let d = decode(&m, 100).unwrap();
        assert_eq!(d.meta.asb_seq, Some(1234));
        assert_eq!(d.meta.enqueued_at_ms, Some(1_795_000_000_123));
        m.message_annotations = Some(
            MessageAnnotations::builder()
                .insert(SEQUENCE_NUMBER, Value::String("12".into()))
                .insert(ENQUEUED_TIME, Value::Bool(true))
                .build(),
        );
        let d = decode(&m, 100).unwrap();
        assert_eq!(d.meta.asb_seq, None);
        assert_eq!(d.meta.enqueued_at_ms, None);
        assert!(!d.meta.truncated);
        m.message_annotations = Some(
            MessageAnnotations::builder()
                .insert(SEQUENCE_NUMBER, Value::Ulong(u64::MAX))
                .build(),
        );
        assert_eq!(decode(&m, 100).unwrap().meta.asb_seq, None);
    }
}
