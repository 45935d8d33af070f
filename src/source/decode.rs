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
//! - Application properties: every value is rendered as a string people can read (see
//!   [`value_text`]): numbers in decimal, decimals exact (IEEE 754-2008 BID, and the
//!   layout the .NET SDK's AMQP library writes), timestamps RFC 3339, uuids hyphenated,
//!   binary base64, and the described types the Azure SDKs write for .NET
//!   `DateTimeOffset`, `TimeSpan` and `Uri` (`com.microsoft:datetime-offset`,
//!   `com.microsoft:timespan`, `com.microsoft:uri`) as RFC 3339, ISO 8601 duration and
//!   URI text.
//! - Annotations `x-opt-sequence-number` (long) and `x-opt-enqueued-time` (timestamp);
//!   values of another type are ignored.

use std::fmt::Write as _;

use fe2o3_amqp_types::messaging::{Body, Message, MessageId, annotations::OwnedKey};
use fe2o3_amqp_types::primitives::{SimpleValue, Value};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;

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
            if m.props.is_full() {
                // more properties than an event keeps: flagged, not rendered
                m.truncated = true;
                break;
            }
            m.push_prop(k, &simple_value_string(v));
        }
        // Trace context: the first of the properties that carries a valid traceparent.
        m.traceparent = crate::trace::PROPERTIES
            .iter()
            .find_map(|name| match ap.0.get(*name) {
                Some(SimpleValue::String(s)) => crate::trace::parse_traceparent(s),
                _ => None,
            });
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

/// The JSON representation of an AMQP value: integers, finite floats and booleans as
/// JSON numbers and booleans (non-finite floats, which JSON cannot carry, as null);
/// decimals as strings of their exact value (a JSON number would lose digits in
/// JavaScript); timestamps, uuids, chars, binary (base64), symbols and the described
/// types the Azure SDKs write as the strings [`value_text`] gives; lists and arrays as
/// arrays, maps as objects (keys rendered as strings); other described values as their
/// value.
pub fn value_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Described(d) => match described_text(d) {
            Some(text) => J::String(text),
            None => value_json(&d.value),
        },
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
        Value::List(items) => J::Array(items.iter().map(value_json).collect()),
        Value::Array(items) => J::Array(items.0.iter().map(value_json).collect()),
        Value::Map(map) => J::Object(
            map.iter()
                .map(|(k, v)| (key_string(k), value_json(v)))
                .collect(),
        ),
        other => J::String(value_text(other)),
    }
}

fn key_string(k: &Value) -> String {
    value_text(k)
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

/// An application-property value as a string (see [`value_text`]).
pub fn simple_value_string(v: &SimpleValue) -> String {
    match v {
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Described(d) => described_text(d).unwrap_or_else(|| value_text(&d.value)),
        other => value_text(&Value::from(other.clone())),
    }
}

/// Descriptor of a .NET `DateTimeOffset` (Azure SDKs): a long of UTC ticks (100 ns since
/// 0001-01-01T00:00:00Z).
pub const DATETIME_OFFSET: &str = "com.microsoft:datetime-offset";
/// Descriptor of a .NET `TimeSpan` / Java `Duration` (Azure SDKs): a long of ticks.
pub const TIMESPAN: &str = "com.microsoft:timespan";
/// Descriptor of a .NET `Uri` / Java `URI` (Azure SDKs): the URI as a string.
pub const URI: &str = "com.microsoft:uri";

/// Ticks (100 ns) per second, and the ticks of 1970-01-01T00:00:00Z since
/// 0001-01-01T00:00:00Z, as .NET counts them.
const TICKS_PER_SECOND: i64 = 10_000_000;
const UNIX_EPOCH_TICKS: i64 = 621_355_968_000_000_000;

/// A value as text for people (application properties, map keys, topic placeholders):
///
/// | AMQP type | text |
/// |---|---|
/// | null | `null` |
/// | boolean | `true` / `false` |
/// | ubyte … ulong, byte … long | decimal integer |
/// | float, double | shortest round-trip decimal (`21.5`, `0.1`), exponent form below 1e-6 and from 1e21 (`1e300`), `NaN`, `Infinity`, `-Infinity` |
/// | decimal32/64/128 | the exact decimal, scale kept (`12.50`, `-0.001`); see [`decimal_text`] |
/// | char | the character |
/// | timestamp | RFC 3339 UTC with milliseconds (`2026-11-24T10:00:00.123Z`) |
/// | uuid | hyphenated lowercase |
/// | binary | base64 (RFC 4648, padded) |
/// | string, symbol | the text |
/// | `com.microsoft:datetime-offset` | RFC 3339 UTC, milliseconds or 100 ns digits |
/// | `com.microsoft:timespan` | ISO 8601 duration (`PT1H30M`, `-P1DT0.5S`) |
/// | `com.microsoft:uri` | the URI |
/// | other described | its value |
/// | list, array, map | compact JSON ([`value_json`]) |
///
/// An instant outside years 0000–9999 (RFC 3339 has four-digit years) is written as
/// its number (milliseconds since the Unix epoch for a timestamp, ticks for a
/// datetime-offset) rather than clamped to a wrong date.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Ubyte(n) => n.to_string(),
        Value::Ushort(n) => n.to_string(),
        Value::Uint(n) => n.to_string(),
        Value::Ulong(n) => n.to_string(),
        Value::Byte(n) => n.to_string(),
        Value::Short(n) => n.to_string(),
        Value::Int(n) => n.to_string(),
        Value::Long(n) => n.to_string(),
        Value::Float(f) => float_text(
            f64::from(f.into_inner()),
            || f.into_inner().to_string(),
            || format!("{:e}", f.into_inner()),
        ),
        Value::Double(f) => float_text(
            f.into_inner(),
            || f.into_inner().to_string(),
            || format!("{:e}", f.into_inner()),
        ),
        Value::Decimal32(d) => decimal_text(&Bid::decode32(*d.as_inner())),
        Value::Decimal64(d) => decimal_text(&Bid::decode64(*d.as_inner())),
        Value::Decimal128(d) => decimal_text(&Bid::decode128(*d.as_inner())),
        Value::Char(c) => c.to_string(),
        Value::Timestamp(t) => {
            let ms = t.milliseconds();
            rfc3339(
                ms.div_euclid(1000),
                ms.rem_euclid(1000) as u32 * 1_000_000,
                3,
            )
            .unwrap_or_else(|| ms.to_string())
        }
        Value::Uuid(u) => uuid_string(u.as_inner()),
        Value::Binary(b) => base64(b),
        Value::String(s) => s.clone(),
        Value::Symbol(s) => s.as_str().to_string(),
        Value::Described(d) => described_text(d).unwrap_or_else(|| value_text(&d.value)),
        Value::List(_) | Value::Array(_) | Value::Map(_) => value_json(v).to_string(),
    }
}

/// The text of a described type the Azure SDKs write; `None` for any other descriptor,
/// or a known one around a value of an unexpected type.
fn described_text(d: &Described<Value>) -> Option<String> {
    let Descriptor::Name(name) = &d.descriptor else {
        return None;
    };
    match (name.as_str(), &d.value) {
        (DATETIME_OFFSET, v) => {
            let ticks = integer(v)?;
            let unix = ticks.checked_sub(UNIX_EPOCH_TICKS)?;
            let nanos = unix.rem_euclid(TICKS_PER_SECOND) as u32 * 100;
            Some(
                rfc3339(unix.div_euclid(TICKS_PER_SECOND), nanos, 3)
                    .unwrap_or_else(|| ticks.to_string()),
            )
        }
        (TIMESPAN, v) => Some(iso8601_duration(integer(v)?)),
        (URI, Value::String(s)) => Some(s.clone()),
        _ => None,
    }
}

/// `NaN`, `Infinity`, `-Infinity` as .NET and JavaScript spell them; exponent form
/// (`lower_exp`) for magnitudes JavaScript also writes so (< 1e-6 or ≥ 1e21), where the
/// plain form would run to hundreds of digits; else the shortest round-trip form.
fn float_text(
    f: f64,
    plain: impl FnOnce() -> String,
    lower_exp: impl FnOnce() -> String,
) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if f != 0.0 && !(1e-6..1e21).contains(&f.abs()) {
        lower_exp()
    } else {
        plain()
    }
}

/// RFC 3339 UTC (`YYYY-MM-DDTHH:MM:SS.fffZ`) for `secs` since the Unix epoch plus `nanos`;
/// the fraction has at least `min_digits` digits and more only when they are not zero.
/// `None` outside years 0000–9999.
fn rfc3339(secs: i64, nanos: u32, min_digits: usize) -> Option<String> {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        return None;
    }
    let mut frac = format!("{nanos:09}");
    while frac.len() > min_digits && frac.ends_with('0') {
        frac.pop();
    }
    Some(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac}Z",
        tod / 3600,
        tod / 60 % 60,
        tod % 60
    ))
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// An ISO 8601 duration of `ticks` (100 ns), in days, hours, minutes and seconds (no
/// years or months: their length varies), as .NET's `XmlConvert.ToString(TimeSpan)`
/// writes it: `PT1H30M`, `P1DT2H3M4.5S`, `-PT0.0000001S`, `PT0S`.
fn iso8601_duration(ticks: i64) -> String {
    let mut out = String::new();
    if ticks < 0 {
        out.push('-');
    }
    let t = ticks.unsigned_abs();
    let tps = TICKS_PER_SECOND as u64;
    let (days, rest) = (t / (86_400 * tps), t % (86_400 * tps));
    let (h, m, s, frac) = (
        rest / (3600 * tps),
        rest / (60 * tps) % 60,
        rest / tps % 60,
        rest % tps,
    );
    out.push('P');
    if days > 0 {
        let _ = write!(out, "{days}D");
    }
    if rest > 0 || days == 0 {
        out.push('T');
        if h > 0 {
            let _ = write!(out, "{h}H");
        }
        if m > 0 {
            let _ = write!(out, "{m}M");
        }
        if s > 0 || frac > 0 || (h == 0 && m == 0) {
            let _ = write!(out, "{s}");
            if frac > 0 {
                let f = format!("{frac:07}");
                let _ = write!(out, ".{}", f.trim_end_matches('0'));
            }
            out.push('S');
        }
    }
    out
}

/// A decoded IEEE 754-2008 decimal (binary integer decimal encoding, as AMQP specifies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bid {
    /// (-1)^negative × coefficient × 10^exponent
    Finite {
        negative: bool,
        coefficient: u128,
        exponent: i32,
    },
    Infinite {
        negative: bool,
    },
    NaN,
}

impl Bid {
    /// Decode `bits` of a `width`-bit BID decimal with `exp_bits` exponent bits, the
    /// exponent `bias` and at most `digits` coefficient digits. Non-canonical
    /// coefficients (more than `digits` digits) are zero, as IEEE 754 says.
    fn decode(bits: u128, width: u32, exp_bits: u32, bias: i32, digits: u32) -> (Bid, u32) {
        let negative = (bits >> (width - 1)) & 1 == 1;
        let top5 = (bits >> (width - 6)) & 0b11111;
        if top5 == 0b11111 {
            return (Bid::NaN, 0);
        }
        if top5 == 0b11110 {
            return (Bid::Infinite { negative }, 0);
        }
        let mask = |n: u32| (1u128 << n) - 1;
        let (raw_exp, coefficient) = if (bits >> (width - 3)) & 0b11 != 0b11 {
            let t = width - 1 - exp_bits;
            ((bits >> t) & mask(exp_bits), bits & mask(t))
        } else {
            let t = width - 3 - exp_bits;
            (
                (bits >> t) & mask(exp_bits),
                (0b100 << t) | (bits & mask(t)),
            )
        };
        let coefficient = if coefficient >= 10u128.pow(digits) {
            0
        } else {
            coefficient
        };
        let bid = Bid::Finite {
            negative,
            coefficient,
            exponent: raw_exp as i32 - bias,
        };
        (bid, raw_exp as u32)
    }

    pub fn decode32(b: [u8; 4]) -> Bid {
        Bid::decode(u128::from(u32::from_be_bytes(b)), 32, 8, 101, 7).0
    }

    pub fn decode64(b: [u8; 8]) -> Bid {
        Bid::decode(u128::from(u64::from_be_bytes(b)), 64, 10, 398, 16).0
    }

    /// A decimal128, also in the layout Microsoft.Azure.Amqp (the .NET SDK's AMQP
    /// library) writes for a .NET `decimal`: its encoder shifts the biased exponent
    /// 6176 − scale by 9 bits where BID needs 7 (fixed upstream in azure-amqp PR 316,
    /// July 2026; the .NET decoder wraps the scale back, so .NET never noticed). Read as
    /// BID that is an exponent between −4636 and −4608 with a coefficient below 2^96:
    /// no sender means 10^−4610, every .NET sender means scale 0–28, so that range is
    /// read as the .NET scale.
    pub fn decode128(b: [u8; 16]) -> Bid {
        let (bid, raw_exp) = Bid::decode(u128::from_be_bytes(b), 128, 14, 6176, 34);
        match bid {
            Bid::Finite {
                negative,
                coefficient,
                ..
            } if (1540..=1568).contains(&raw_exp) && coefficient < 1u128 << 96 => Bid::Finite {
                negative,
                coefficient,
                exponent: raw_exp as i32 - 1568,
            },
            other => other,
        }
    }
}

/// The exact text of a decimal, its scale kept (`12.50` stays `12.50`): plain notation
/// for exponents 0 to −28 (every .NET `decimal`) and wherever the General Decimal
/// Arithmetic "to-scientific-string" rule (Python's `str(Decimal)`, Java's
/// `BigDecimal.toString()`) writes plain; otherwise that rule's exponent form
/// (`1.5E+7`, `1E-40`). `NaN`, `Infinity`, `-Infinity` for the specials.
pub fn decimal_text(d: &Bid) -> String {
    let (negative, coefficient, exponent) = match *d {
        Bid::NaN => return "NaN".into(),
        Bid::Infinite { negative } => {
            return if negative { "-Infinity" } else { "Infinity" }.into();
        }
        Bid::Finite {
            negative,
            coefficient,
            exponent,
        } => (negative, coefficient, exponent),
    };
    let digits = coefficient.to_string();
    let n = digits.len() as i64;
    let q = i64::from(exponent);
    let adjusted = q + n - 1;
    let mut out = String::with_capacity(digits.len() + 8);
    if negative {
        out.push('-');
    }
    if (-28..=0).contains(&q) || (q <= 0 && adjusted >= -6) {
        let point = n + q; // digits before the decimal point
        if q == 0 {
            out.push_str(&digits);
        } else if point > 0 {
            let (int, frac) = digits.split_at(point as usize);
            let _ = write!(out, "{int}.{frac}");
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-point) as usize));
            out.push_str(&digits);
        }
    } else {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        if !rest.is_empty() {
            let _ = write!(out, ".{rest}");
        }
        let _ = write!(out, "E{}{adjusted}", if adjusted >= 0 { "+" } else { "" });
    }
    out
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
    use serde_amqp::described::Described;
    use serde_amqp::descriptor::Descriptor;

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
            r#"["1970-01-01T00:00:01.000Z","11111111-1111-1111-1111-111111111111"]"#
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

    fn described(name: &str, value: Value) -> Described<Value> {
        Described {
            descriptor: Descriptor::Name(Symbol::from(name)),
            value,
        }
    }

    fn dec128(bits: u128) -> Value {
        Value::Decimal128(bits.to_be_bytes().into())
    }

    /// The layout Microsoft.Azure.Amqp writes for a .NET `decimal` (exponent shifted by 9).
    fn dotnet_decimal(negative: bool, coefficient: u128, scale: u8) -> Value {
        let exponent = 6176 - u32::from(scale);
        let mut b = [0u8; 16];
        b[0] = if negative { 0x80 } else { 0 } | (exponent >> 9) as u8;
        b[1] = ((exponent & 0x7f) << 1) as u8;
        b[4..].copy_from_slice(&coefficient.to_be_bytes()[4..]);
        Value::Decimal128(b.into())
    }

    /// One row per AMQP type (and per described type the Azure SDKs write): the value
    /// and the text a panel must see.
    fn value_rows() -> Vec<(&'static str, Value, &'static str)> {
        use serde_amqp::primitives::{Array, Dec32, Dec64};
        let d32 = |bits: u32| Value::Decimal32(Dec32::from(bits.to_be_bytes()));
        let d64 = |bits: u64| Value::Decimal64(Dec64::from(bits.to_be_bytes()));
        let ts = |ms: i64| Value::Timestamp(Timestamp::from_milliseconds(ms));
        let dto =
            |ticks: i64| Value::Described(Box::new(described(DATETIME_OFFSET, Value::Long(ticks))));
        let span = |ticks: i64| Value::Described(Box::new(described(TIMESPAN, Value::Long(ticks))));
        vec![
            ("null", Value::Null, "null"),
            ("bool", Value::Bool(true), "true"),
            ("ubyte", Value::Ubyte(255), "255"),
            ("ushort", Value::Ushort(65535), "65535"),
            ("uint", Value::Uint(u32::MAX), "4294967295"),
            ("ulong", Value::Ulong(u64::MAX), "18446744073709551615"),
            ("byte", Value::Byte(-128), "-128"),
            ("short", Value::Short(-32768), "-32768"),
            ("int", Value::Int(-5), "-5"),
            ("long", Value::Long(i64::MIN), "-9223372036854775808"),
            ("float", Value::Float(0.1f32.into()), "0.1"),
            ("float large", Value::Float(3.0e38f32.into()), "3e38"),
            ("double", Value::Double(21.5.into()), "21.5"),
            ("double huge", Value::Double(1e300.into()), "1e300"),
            ("double tiny", Value::Double(1.5e-7.into()), "1.5e-7"),
            (
                "double 1e20",
                Value::Double(1e20.into()),
                "100000000000000000000",
            ),
            ("double -0", Value::Double((-0.0).into()), "-0"),
            ("double NaN", Value::Double(f64::NAN.into()), "NaN"),
            (
                "double +inf",
                Value::Double(f64::INFINITY.into()),
                "Infinity",
            ),
            (
                "float -inf",
                Value::Float(f32::NEG_INFINITY.into()),
                "-Infinity",
            ),
            ("decimal32", d32((100 << 23) | 75), "7.5"),
            (
                "decimal32 large coefficient",
                d32((0b11 << 29) | (101 << 21) | (9_999_999 - (1 << 23))),
                "9999999",
            ),
            (
                "decimal32 negative",
                d32(0x8000_0000 | (99 << 23) | 1),
                "-0.01",
            ),
            (
                "decimal32 non-canonical",
                d32((0b11 << 29) | (101 << 21) | 0x1f_ffff),
                "0",
            ),
            ("decimal32 infinity", d32(0x7800_0000), "Infinity"),
            ("decimal32 -infinity", d32(0xf800_0000), "-Infinity"),
            ("decimal32 NaN", d32(0x7c00_0000), "NaN"),
            ("decimal64", d64((395 << 53) | 1), "0.001"),
            (
                "decimal64 positive exponent",
                d64((404 << 53) | 15),
                "1.5E+7",
            ),
            (
                "decimal64 negative",
                d64((1 << 63) | (396 << 53) | 1250),
                "-12.50",
            ),
            ("decimal128 (BID)", dec128((6174 << 113) | 1250), "12.50"),
            ("decimal128 zero with scale", dec128(6174 << 113), "0.00"),
            ("decimal128 tiny", dec128((6136 << 113) | 1), "1E-40"),
            (
                "decimal128 big exponent",
                dec128((8000 << 113) | 12),
                "1.2E+1825",
            ),
            (
                "decimal128 34 digits",
                dec128((6176 << 113) | (10u128.pow(34) - 1)),
                "9999999999999999999999999999999999",
            ),
            ("decimal128 NaN", dec128(0x7c << 120), "NaN"),
            (
                ".NET decimal 12.50",
                dotnet_decimal(false, 1250, 2),
                "12.50",
            ),
            (
                ".NET decimal.MaxValue",
                dotnet_decimal(false, (1 << 96) - 1, 0),
                "79228162514264337593543950335",
            ),
            (
                ".NET decimal -1e-28",
                dotnet_decimal(true, 1, 28),
                "-0.0000000000000000000000000001",
            ),
            (".NET decimal 0", dotnet_decimal(false, 0, 0), "0"),
            ("char", Value::Char('é'), "é"),
            (
                "timestamp",
                ts(1_795_514_400_123),
                "2026-11-24T10:00:00.123Z",
            ),
            ("timestamp before 1970", ts(-1), "1969-12-31T23:59:59.999Z"),
            (
                "timestamp year 0",
                ts(-62_167_219_200_000),
                "0000-01-01T00:00:00.000Z",
            ),
            ("timestamp past 9999", ts(i64::MAX), "9223372036854775807"),
            (
                "uuid",
                Value::Uuid(Uuid::from([
                    0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0, 1, 2, 3, 4, 5, 6, 7,
                ])),
                "12345678-9abc-def0-0001-020304050607",
            ),
            (
                "binary",
                Value::Binary(Binary::from(vec![0xff, 0, 0x10])),
                "/wAQ",
            ),
            ("string", Value::String("línea 1".into()), "línea 1"),
            ("symbol", Value::Symbol(Symbol::from("sym")), "sym"),
            (
                ".NET DateTimeOffset",
                dto(639_311_112_001_230_000),
                "2026-11-24T10:00:00.123Z",
            ),
            (
                ".NET DateTimeOffset, 100 ns",
                dto(639_311_112_001_234_567),
                "2026-11-24T10:00:00.1234567Z",
            ),
            (
                ".NET DateTimeOffset.MinValue",
                dto(0),
                "0001-01-01T00:00:00.000Z",
            ),
            (
                ".NET DateTimeOffset.MaxValue",
                dto(3_155_378_975_999_999_999),
                "9999-12-31T23:59:59.9999999Z",
            ),
            (
                "datetime-offset out of range",
                dto(i64::MAX),
                "9223372036854775807",
            ),
            (
                "datetime-offset as int",
                Value::Described(Box::new(described(DATETIME_OFFSET, Value::Int(0)))),
                "0001-01-01T00:00:00.000Z",
            ),
            (".NET TimeSpan", span(54_000_000_000), "PT1H30M"),
            ("TimeSpan with days", span(937_845_000_000), "P1DT2H3M4.5S"),
            ("TimeSpan one day", span(864_000_000_000), "P1D"),
            ("TimeSpan zero", span(0), "PT0S"),
            ("TimeSpan one tick back", span(-1), "-PT0.0000001S"),
            (
                "TimeSpan.MinValue",
                span(i64::MIN),
                "-P10675199DT2H48M5.4775808S",
            ),
            (
                ".NET Uri",
                Value::Described(Box::new(described(
                    URI,
                    Value::String("https://example.com/a?b=c".into()),
                ))),
                "https://example.com/a?b=c",
            ),
            (
                "unknown descriptor",
                Value::Described(Box::new(described("vendor:thing", Value::Int(5)))),
                "5",
            ),
            (
                "code descriptor",
                Value::Described(Box::new(Described {
                    descriptor: Descriptor::Code(0x1234),
                    value: Value::String("s".into()),
                })),
                "s",
            ),
            (
                "known descriptor, other type",
                Value::Described(Box::new(described(
                    DATETIME_OFFSET,
                    Value::String("abc".into()),
                ))),
                "abc",
            ),
            (
                "list",
                Value::List(vec![
                    Value::Int(1),
                    Value::String("a".into()),
                    ts(0),
                    Value::Null,
                ]),
                r#"[1,"a","1970-01-01T00:00:00.000Z",null]"#,
            ),
            (
                "array",
                Value::Array(Array::from(vec![dec128((6174 << 113) | 1250)])),
                r#"["12.50"]"#,
            ),
            (
                "map",
                Value::Map({
                    let mut m = OrderedMap::new();
                    m.insert(Value::Symbol(Symbol::from("k")), Value::Double(1.5.into()));
                    m.insert(Value::Long(7), Value::Bool(false));
                    m
                }),
                r#"{"7":false,"k":1.5}"#,
            ),
        ]
    }

    #[test]
    fn every_amqp_type_renders_as_people_read_it() {
        for (what, value, text) in value_rows() {
            assert_eq!(value_text(&value), text, "{what}");
            // the same text through an application property of a decoded message
            let mut m = msg(data(&[b"x"]));
            let mut ap = OrderedMap::new();
            let simple = SimpleValue::try_from(value.clone());
            let Ok(simple) = simple else {
                // lists, maps and arrays are not simple values: a sender can only put
                // them in a property inside a described type
                assert!(matches!(
                    value,
                    Value::List(_) | Value::Map(_) | Value::Array(_)
                ));
                continue;
            };
            ap.insert("p".to_string(), simple);
            m.application_properties = Some(ApplicationProperties(ap));
            let d = decode(&m, 100).unwrap();
            assert_eq!(d.meta.prop("p"), Some(text), "{what}");
            assert!(!d.meta.truncated, "{what}");
        }
    }

    #[test]
    fn json_bodies_use_the_same_text_for_non_json_types() {
        let mut map = OrderedMap::new();
        map.insert(
            Value::String("price".into()),
            dotnet_decimal(false, 1250, 2),
        );
        map.insert(
            Value::String("at".into()),
            Value::Described(Box::new(described(
                DATETIME_OFFSET,
                Value::Long(639_311_112_001_230_000),
            ))),
        );
        map.insert(Value::String("n".into()), Value::Long(3));
        map.insert(
            Value::String("x".into()),
            Value::Double(f64::INFINITY.into()),
        );
        let d = decode(&msg(Body::Value(AmqpValue(Value::Map(map)))), 200).unwrap();
        let j: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"price":"12.50","at":"2026-11-24T10:00:00.123Z","n":3,"x":null})
        );
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
