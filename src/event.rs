//! One event: bounded metadata (heapless), the body classification, and the frames that
//! panels and the mirror receive. An event is encoded once, at append time, into a JSON
//! text frame and a postcard binary frame; readers share those bytes by reference.

use std::sync::Arc;

use bytes::Bytes;
use heapless::String as HString;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::held::Mark;

/// Longest message-id, correlation-id and subject kept (bytes).
pub const ID_MAX: usize = 128;
/// Longest content-type kept (bytes).
pub const CONTENT_TYPE_MAX: usize = 64;
/// Most application properties kept per event.
pub const PROPS_MAX: usize = 16;
/// Longest application-property key kept (bytes).
pub const PROP_KEY_MAX: usize = 64;
/// Longest application-property value kept (bytes).
pub const PROP_VALUE_MAX: usize = 256;
/// Longest routed topic (bytes).
pub const TOPIC_MAX: usize = 256;

/// Raw metadata bytes one event can carry at most (ids, content type, topic, properties).
pub const META_RAW_MAX: usize = 3 * ID_MAX
    + CONTENT_TYPE_MAX
    + TOPIC_MAX
    + PROPS_MAX * (PROP_KEY_MAX + PROP_VALUE_MAX)
    + crate::trace::TRACEPARENT_LEN;

pub type IdString = HString<ID_MAX>;
pub type ContentType = HString<CONTENT_TYPE_MAX>;
pub type PropKey = HString<PROP_KEY_MAX>;
pub type PropValue = HString<PROP_VALUE_MAX>;
pub type Topic = HString<TOPIC_MAX>;
pub type Props = heapless::Vec<(PropKey, PropValue), PROPS_MAX>;

/// Copy `s` into a fixed-capacity string. Over-long input is cut at a character
/// boundary and control characters are replaced by `?` (so the JSON frame stays within
/// its computed worst case); either sets `*altered`. Never panics.
pub fn bounded<const N: usize>(s: &str, altered: &mut bool) -> HString<N> {
    let mut out = HString::new();
    for c in s.chars() {
        let c = if c.is_control() {
            *altered = true;
            '?'
        } else {
            c
        };
        if out.push(c).is_err() {
            *altered = true;
            break;
        }
    }
    out
}

/// Metadata of one decoded message, with the limits of DESIGN §3.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventMeta {
    pub subject: Option<IdString>,
    pub message_id: Option<IdString>,
    pub correlation_id: Option<IdString>,
    pub content_type: Option<ContentType>,
    /// Enqueued time at the broker, milliseconds since the Unix epoch.
    pub enqueued_at_ms: Option<i64>,
    /// The broker's sequence number (`x-opt-sequence-number`).
    pub asb_seq: Option<i64>,
    pub props: Props,
    /// W3C trace context from the `traceparent` or `Diagnostic-Id` application property,
    /// when valid ([`crate::trace`]).
    pub traceparent: Option<crate::trace::TraceParent>,
    /// Set when any metadata was cut or altered to fit the limits.
    pub truncated: bool,
}

impl EventMeta {
    /// Add an application property, flagging truncation when the table is full.
    pub fn push_prop(&mut self, key: &str, value: &str) {
        let mut altered = false;
        let k = bounded(key, &mut altered);
        let v = bounded(value, &mut altered);
        if self.props.push((k, v)).is_err() {
            altered = true;
        }
        self.truncated |= altered;
    }

    pub fn prop(&self, name: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How an event body is carried in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body<'a> {
    /// Valid JSON text, embedded as a JSON value in the JSON frame.
    Json(&'a str),
    /// UTF-8 text.
    Text(&'a str),
    /// Anything else (base64 in the JSON frame).
    Binary(#[serde(borrow)] &'a [u8]),
}

impl<'a> Body<'a> {
    /// Classify a body: JSON when the content type says so and it parses, text when
    /// UTF-8, else binary.
    pub fn classify(bytes: &'a [u8], content_type: Option<&str>) -> Body<'a> {
        match std::str::from_utf8(bytes) {
            Ok(text) => {
                if content_type.is_some_and(is_json_content_type)
                    && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
                {
                    Body::Json(text)
                } else {
                    Body::Text(text)
                }
            }
            Err(_) => Body::Binary(bytes),
        }
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        match *self {
            Body::Json(s) | Body::Text(s) => s.as_bytes(),
            Body::Binary(b) => b,
        }
    }
}

/// `application/json`, `text/json`, or any `+json` suffix, parameters ignored.
pub fn is_json_content_type(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("text/json")
        || essence.to_ascii_lowercase().ends_with("+json")
}

/// Why a panel skipped events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GapReason {
    /// The panel read too slowly and the journal moved on.
    Lagged,
    /// The resume point is older than the oldest retained event.
    Expired,
    /// The resume point belongs to another journal epoch.
    Epoch,
    /// The seqs were lost in a crash between checkpoints (never issued again).
    Lost,
}

impl GapReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Lagged => "lagged",
            GapReason::Expired => "expired",
            GapReason::Epoch => "epoch",
            GapReason::Lost => "lost",
        }
    }
}

/// The event as carried in a frame (borrowed view; the postcard schema).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventFrame<'a> {
    pub seq: u64,
    pub topic: &'a str,
    pub subject: Option<&'a str>,
    pub message_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// Milliseconds since the Unix epoch (an RFC 3339 string in JSON frames).
    pub enqueued_at_ms: Option<i64>,
    pub asb_seq: Option<i64>,
    #[serde(borrow)]
    pub props: Vec<(&'a str, &'a str)>,
    #[serde(borrow)]
    pub body: Body<'a>,
    pub truncated: bool,
    /// W3C `traceparent` of the producer's trace. The last field: a frame written before
    /// it existed (an older snapshot) reads as `None`, and an older postcard reader
    /// ignores it (postcard leaves trailing bytes unread).
    #[serde(borrow, default, deserialize_with = "trailing_opt_str")]
    pub traceparent: Option<&'a str>,
}

/// A last optional field that older frames do not have: the end of the input reads as
/// `None` (postcard reports it as an error; any other error in this field does too).
fn trailing_opt_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de str>, D::Error> {
    Ok(<Option<&'de str> as Deserialize>::deserialize(d).unwrap_or(None))
}

/// Server → panel frames of protocol v1. In `asbgw.v1.postcard` these Rust types are the
/// schema; in `asbgw.v1.json` they are written as the JSON objects of DESIGN §4.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame<'a> {
    Hello {
        epoch: &'a str,
        oldest: u64,
        latest: u64,
        #[serde(borrow)]
        filters: Vec<&'a str>,
    },
    Event(#[serde(borrow)] EventFrame<'a>),
    Gap {
        from: u64,
        to: u64,
        reason: GapReason,
    },
    Pong,
    Error {
        code: &'a str,
        message: &'a str,
    },
    /// The last values of a `last=true` request (or `last` op) have all been sent; the
    /// live stream continues after `latest`. JSON: `{"type":"synced","latest":N}`.
    Synced {
        latest: u64,
    },
    /// A last value: the newest event of its topic, sent on request before the live
    /// stream. JSON: an `event` object with `"last":true` as its final field.
    Last(#[serde(borrow)] EventFrame<'a>),
}

/// The postcard variant index of [`Frame::Event`] and of [`Frame::Last`]: a last value
/// is its stored event frame with the first byte (this varint) replaced.
const EVENT_TAG: u8 = 1;
const LAST_TAG: u8 = 6;

impl Frame<'_> {
    /// The postcard encoding.
    pub fn to_postcard(&self) -> Vec<u8> {
        // Serialising to a Vec cannot fail for these types.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// The JSON text encoding of DESIGN §4.
    pub fn to_json(&self) -> String {
        let mut w = JsonWriter::default();
        match self {
            Frame::Hello {
                epoch,
                oldest,
                latest,
                filters,
            } => {
                w.open("hello");
                w.str_field("epoch", epoch);
                w.num_field("oldest", *oldest);
                w.num_field("latest", *latest);
                w.key("filters");
                w.out.push('[');
                for (i, f) in filters.iter().enumerate() {
                    if i > 0 {
                        w.out.push(',');
                    }
                    w.string(f);
                }
                w.out.push(']');
            }
            Frame::Event(e) | Frame::Last(e) => {
                w.open("event");
                w.num_field("seq", e.seq);
                w.str_field("topic", e.topic);
                w.opt_str_field("subject", e.subject);
                w.opt_str_field("message_id", e.message_id);
                w.opt_str_field("correlation_id", e.correlation_id);
                w.opt_str_field("content_type", e.content_type);
                let at = e.enqueued_at_ms.map(format_rfc3339_millis);
                w.opt_str_field("enqueued_at", at.as_deref());
                w.key("asb_seq");
                match e.asb_seq {
                    Some(n) => w.out.push_str(&n.to_string()),
                    None => w.out.push_str("null"),
                }
                w.key("props");
                w.out.push('{');
                for (i, (k, v)) in e.props.iter().enumerate() {
                    if i > 0 {
                        w.out.push(',');
                    }
                    w.string(k);
                    w.out.push(':');
                    w.string(v);
                }
                w.out.push('}');
                w.key("body");
                match e.body {
                    Body::Json(raw) => w.out.push_str(raw.trim()),
                    Body::Text(t) if json_string_len(t) <= base64_len(t.len()) + 2 => w.string(t),
                    // Text that would more than double when escaped goes as base64,
                    // which keeps every frame within its computed worst case.
                    Body::Text(t) => w.base64_body(t.as_bytes()),
                    Body::Binary(b) => w.base64_body(b),
                }
                if e.truncated {
                    w.key("truncated");
                    w.out.push_str("true");
                }
                if let Some(tp) = e.traceparent {
                    w.str_field("traceparent", tp);
                }
                if matches!(self, Frame::Last(_)) {
                    w.out.push_str(LAST_FIELD);
                }
            }
            Frame::Synced { latest } => {
                w.open("synced");
                w.num_field("latest", *latest);
            }
            Frame::Gap { from, to, reason } => {
                w.open("gap");
                w.num_field("from", *from);
                w.num_field("to", *to);
                w.str_field("reason", reason.as_str());
            }
            Frame::Pong => w.open("pong"),
            Frame::Error { code, message } => {
                w.open("error");
                w.str_field("code", code);
                w.str_field("message", message);
            }
        }
        w.out.push('}');
        w.out
    }
}

fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Length of `s` as a JSON string literal, quotes excluded.
fn json_string_len(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

#[derive(Default)]
struct JsonWriter {
    out: String,
}

impl JsonWriter {
    fn open(&mut self, ty: &str) {
        self.out.push_str("{\"type\":\"");
        self.out.push_str(ty);
        self.out.push('"');
    }
    fn key(&mut self, k: &str) {
        self.out.push_str(",\"");
        self.out.push_str(k);
        self.out.push_str("\":");
    }
    fn string(&mut self, s: &str) {
        // serde_json's escaping of a &str cannot fail.
        self.out
            .push_str(&serde_json::to_string(s).unwrap_or_default());
    }
    fn str_field(&mut self, k: &str, v: &str) {
        self.key(k);
        self.string(v);
    }
    fn opt_str_field(&mut self, k: &str, v: Option<&str>) {
        self.key(k);
        match v {
            Some(v) => self.string(v),
            None => self.out.push_str("null"),
        }
    }
    fn num_field(&mut self, k: &str, v: u64) {
        self.key(k);
        self.out.push_str(&v.to_string());
    }
    fn base64_body(&mut self, b: &[u8]) {
        use base64::Engine;
        self.out.push('"');
        base64::engine::general_purpose::STANDARD.encode_string(b, &mut self.out);
        self.out.push('"');
        self.key("body_encoding");
        self.out.push_str("\"base64\"");
    }
}

/// Appended to an event object to make it a last value.
const LAST_FIELD: &str = ",\"last\":true";
/// What ends a last value's JSON frame: [`LAST_FIELD`] and the closing brace.
pub const LAST_TAIL: &str = ",\"last\":true}";

/// The last instant RFC 3339 (four-digit years) can express: 9999-12-31T23:59:59.999Z.
pub const RFC3339_MAX_MS: i64 = 253_402_300_799_999;

/// `2026-11-24T10:00:00.123Z` for milliseconds since the Unix epoch. Times before the
/// epoch or after year 9999 (a broker or sender can put any value in a timestamp) are
/// clamped to that range instead of failing.
pub fn format_rfc3339_millis(ms: i64) -> String {
    let ms = ms.clamp(0, RFC3339_MAX_MS) as u64;
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Worst-case size of one journal entry (both frames) for a given body limit: the
/// postcard frame carries the raw body and metadata, the JSON frame at most base64 of
/// the body (or the raw JSON body) and metadata escaped at most twice (control
/// characters are replaced before encoding).
pub fn max_entry_bytes(max_event_bytes: usize) -> usize {
    max_postcard_frame(max_event_bytes)
        + max_json_frame(max_event_bytes)
        + std::mem::size_of::<EncodedEvent>()
        + 2 * crate::held::TRACKED_OVERHEAD
}

fn max_postcard_frame(max_event_bytes: usize) -> usize {
    max_event_bytes + META_RAW_MAX + 256
}

fn max_json_frame(max_event_bytes: usize) -> usize {
    base64_len(max_event_bytes) + 2 * META_RAW_MAX + 512
}

/// Worst-case size of one event frame on the wire, in either encoding.
pub fn max_frame_bytes(max_event_bytes: usize) -> usize {
    max_postcard_frame(max_event_bytes).max(max_json_frame(max_event_bytes))
}

/// A JSON frame as tracked shared bytes ([`crate::held::tracked`]), its buffer cut to
/// its length (the journal counts the length; the buffer grew by doubling).
fn tracked_json(mut json: String) -> (Utf8Bytes, Arc<Mark>) {
    json.shrink_to_fit();
    let (bytes, mark) = crate::held::tracked(json);
    let json = Utf8Bytes::try_from(bytes).expect("a String is UTF-8");
    (json, mark)
}

/// One event after encoding, as stored in the journal and shared by every reader.
#[derive(Debug)]
pub struct EncodedEvent {
    pub seq: u64,
    pub topic: Topic,
    /// The complete `asbgw.v1.json` frame, already known to be UTF-8 so that panels
    /// send it as a text frame without validating it again per panel.
    pub json: Utf8Bytes,
    /// The complete `asbgw.v1.postcard` frame.
    pub postcard: Bytes,
    /// The memory of `json` and of `postcard` ([`crate::held`]): marked when the journal
    /// evicts the event, paid for by the panels that still hold it.
    pub json_mark: Arc<Mark>,
    pub postcard_mark: Arc<Mark>,
    /// When the event was enqueued at Service Bus and received by the gateway, for the
    /// latency histograms.
    pub times: EventTimes,
}

/// Wall-clock times of one event, in milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventTimes {
    /// `x-opt-enqueued-time` (Service Bus' clock).
    pub enqueued_at_ms: Option<i64>,
    /// When the gateway received it (`None`: restored from a snapshot).
    pub received_at_ms: Option<i64>,
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl EncodedEvent {
    /// The journal no longer holds the event: readers that still do pay for its frames
    /// ([`crate::held`]).
    pub fn mark_evicted(&self) {
        self.json_mark.evict();
        self.postcard_mark.evict();
    }

    /// Encode an event once, for every reader.
    pub fn encode(seq: u64, topic: &Topic, meta: &EventMeta, body: &[u8]) -> Self {
        let props: Vec<(&str, &str)> = meta
            .props
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let frame = Frame::Event(EventFrame {
            seq,
            topic: topic.as_str(),
            subject: meta.subject.as_deref(),
            message_id: meta.message_id.as_deref(),
            correlation_id: meta.correlation_id.as_deref(),
            content_type: meta.content_type.as_deref(),
            enqueued_at_ms: meta.enqueued_at_ms,
            asb_seq: meta.asb_seq,
            props,
            body: Body::classify(body, meta.content_type.as_deref()),
            truncated: meta.truncated,
            traceparent: meta.traceparent.as_deref(),
        });
        let (json, json_mark) = tracked_json(frame.to_json());
        let mut postcard = frame.to_postcard();
        // The journal counts a frame's length; its buffer grew by doubling.
        postcard.shrink_to_fit();
        let (postcard, postcard_mark) = crate::held::tracked(postcard);
        EncodedEvent {
            seq,
            topic: topic.clone(),
            json,
            postcard,
            json_mark,
            postcard_mark,
            times: EventTimes {
                enqueued_at_ms: meta.enqueued_at_ms,
                received_at_ms: Some(now_ms()),
            },
        }
    }

    /// Re-create an event from its postcard frame (as a snapshot stores it): the seq,
    /// topic and JSON frame are derived from it, and the frame bytes are kept as they
    /// are. `None` when the bytes are not an event frame or its topic is too long.
    pub fn from_postcard(postcard: Bytes) -> Option<Self> {
        let (seq, topic, json, enqueued_at_ms) = match postcard::from_bytes::<Frame<'_>>(&postcard)
        {
            Ok(f @ Frame::Event(_)) => {
                let Frame::Event(e) = &f else { return None };
                (
                    e.seq,
                    Topic::try_from(e.topic).ok()?,
                    f.to_json(),
                    e.enqueued_at_ms,
                )
            }
            _ => return None,
        };
        let (json, json_mark) = tracked_json(json);
        let (postcard, postcard_mark) = crate::held::tracked(postcard);
        Some(EncodedEvent {
            seq,
            topic,
            json,
            postcard,
            json_mark,
            postcard_mark,
            times: EventTimes {
                enqueued_at_ms,
                received_at_ms: None,
            },
        })
    }

    /// The event as a last value ([`Frame::Last`]) in JSON: the stored frame with
    /// `"last":true` added, no re-encoding.
    pub fn last_json(&self) -> String {
        let (body, tail) = self.last_json_parts();
        let mut s = String::with_capacity(body.len() + tail.len());
        s.push_str(std::str::from_utf8(&body).expect("a prefix of a JSON frame cut at '}'"));
        s.push_str(tail);
        s
    }

    /// [`EncodedEvent::last_json`] without a copy: the stored frame's bytes up to its
    /// closing `}` (shared), then the static text that ends it. Both are UTF-8.
    pub fn last_json_parts(&self) -> (Bytes, &'static str) {
        let json = Bytes::from(self.json.clone());
        match self.json.as_str().strip_suffix('}') {
            Some(body) => (json.slice(..body.len()), LAST_TAIL),
            None => (json, ""),
        }
    }

    /// The event as a last value ([`Frame::Last`]) in postcard: the stored frame with
    /// its variant tag replaced.
    pub fn last_postcard(&self) -> Bytes {
        let (tag, rest) = self.last_postcard_parts();
        let mut b = Vec::with_capacity(tag.len() + rest.len());
        b.extend_from_slice(tag);
        b.extend_from_slice(&rest);
        Bytes::from(b)
    }

    /// [`EncodedEvent::last_postcard`] without a copy: the variant tag (one static byte),
    /// then the stored frame's bytes after its own tag (shared).
    pub fn last_postcard_parts(&self) -> (&'static [u8], Bytes) {
        if self.postcard.first() == Some(&EVENT_TAG) {
            (&[LAST_TAG], self.postcard.slice(1..))
        } else {
            (&[], self.postcard.clone())
        }
    }

    /// A borrowed view of the event (decoded from the postcard frame without copying).
    pub fn frame(&self) -> Option<EventFrame<'_>> {
        match postcard::from_bytes::<Frame<'_>>(&self.postcard) {
            Ok(Frame::Event(e)) => Some(e),
            _ => None,
        }
    }

    /// The body bytes, shared with the stored frame (no copy).
    pub fn body(&self) -> Bytes {
        match self.frame() {
            Some(e) => self.postcard.slice_ref(e.body.as_bytes()),
            None => Bytes::new(),
        }
    }

    /// Bytes this entry holds on the heap, for the journal's byte accounting: its two
    /// frames, itself, and the tracking of each frame ([`crate::held::TRACKED_OVERHEAD`]).
    pub fn heap_bytes(&self) -> usize {
        self.json.len()
            + self.postcard.len()
            + std::mem::size_of::<Self>()
            + 2 * crate::held::TRACKED_OVERHEAD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_values_are_the_stored_frames_flagged_without_re_encoding() {
        let mut meta = EventMeta {
            subject: Some(bounded("temp", &mut false)),
            ..EventMeta::default()
        };
        meta.push_prop("line", "line1");
        let ev = EncodedEvent::encode(7, &Topic::try_from("a/b").unwrap(), &meta, b"{\"v\":1}");
        let frame = ev.frame().unwrap();
        assert_eq!(ev.last_json(), Frame::Last(frame.clone()).to_json());
        assert!(
            ev.last_json().ends_with(",\"last\":true}"),
            "{}",
            ev.last_json()
        );
        let v: serde_json::Value = serde_json::from_str(&ev.last_json()).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["last"].as_bool()),
            (Some("event"), Some(true))
        );
        let pc = ev.last_postcard();
        assert_eq!(&pc[..], &Frame::Last(frame.clone()).to_postcard()[..]);
        assert_eq!(
            postcard::from_bytes::<Frame<'_>>(&pc).unwrap(),
            Frame::Last(frame)
        );
        assert_eq!(
            Frame::Synced { latest: 42 }.to_json(),
            r#"{"type":"synced","latest":42}"#
        );
    }

    #[test]
    fn timestamps_out_of_rfc3339_range_are_clamped_not_a_panic() {
        assert_eq!(format_rfc3339_millis(i64::MIN), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339_millis(-1), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_millis(RFC3339_MAX_MS),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(
            format_rfc3339_millis(RFC3339_MAX_MS + 1),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(format_rfc3339_millis(i64::MAX), "9999-12-31T23:59:59.999Z");
    }

    fn meta() -> EventMeta {
        let mut m = EventMeta {
            subject: Some(IdString::try_from("temp").unwrap()),
            message_id: Some(IdString::try_from("m-1").unwrap()),
            content_type: Some(ContentType::try_from("application/json").unwrap()),
            enqueued_at_ms: Some(1_795_000_000_123),
            asb_seq: Some(1234),
            ..Default::default()
        };
        m.push_prop("line", "line1");
        m
    }

    #[test]
    fn json_frame_embeds_json_body() {
        let topic = Topic::try_from("line1/temp").unwrap();
        let ev = EncodedEvent::encode(43, &topic, &meta(), br#"{"t": 21.5}"#);
        let v: serde_json::Value = serde_json::from_str(&ev.json).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["seq"], 43);
        assert_eq!(v["topic"], "line1/temp");
        assert_eq!(v["subject"], "temp");
        assert_eq!(v["correlation_id"], serde_json::Value::Null);
        assert_eq!(v["asb_seq"], 1234);
        assert_eq!(v["props"]["line"], "line1");
        assert_eq!(v["body"]["t"], 21.5);
        assert!(v["enqueued_at"].as_str().unwrap().ends_with('Z'));
        assert!(v.get("truncated").is_none());
        assert!(v.get("body_encoding").is_none());
    }

    #[test]
    fn from_postcard_recreates_the_same_event() {
        let topic = Topic::try_from("line1/temp").unwrap();
        for body in [&br#"{"t": 21.5}"#[..], b"text", &[0xff, 0, 1]] {
            let ev = EncodedEvent::encode(43, &topic, &meta(), body);
            let back = EncodedEvent::from_postcard(ev.postcard.clone()).unwrap();
            assert_eq!(back.seq, 43);
            assert_eq!(back.topic, topic);
            assert_eq!(back.json, ev.json);
            assert_eq!(back.heap_bytes(), ev.heap_bytes());
        }
        let gap = Frame::Gap {
            from: 1,
            to: 2,
            reason: GapReason::Lost,
        };
        assert!(EncodedEvent::from_postcard(Bytes::from(gap.to_postcard())).is_none());
        assert!(EncodedEvent::from_postcard(Bytes::from_static(b"\xff\xff")).is_none());
    }

    #[test]
    fn text_and_binary_bodies() {
        let topic = Topic::try_from("t").unwrap();
        let mut m = meta();
        m.content_type = Some(ContentType::try_from("text/plain").unwrap());
        let ev = EncodedEvent::encode(1, &topic, &m, b"hello \"x\"");
        let v: serde_json::Value = serde_json::from_str(&ev.json).unwrap();
        assert_eq!(v["body"], "hello \"x\"");
        let ev = EncodedEvent::encode(2, &topic, &m, &[0xff, 0x00, 0x10]);
        let v: serde_json::Value = serde_json::from_str(&ev.json).unwrap();
        assert_eq!(v["body"], "/wAQ");
        assert_eq!(v["body_encoding"], "base64");
        assert_eq!(&ev.body()[..], &[0xff, 0x00, 0x10]);
        // JSON content type that does not parse is carried as text
        let ev = EncodedEvent::encode(3, &topic, &meta(), b"{not json");
        let v: serde_json::Value = serde_json::from_str(&ev.json).unwrap();
        assert_eq!(v["body"], "{not json");
    }

    #[test]
    fn control_heavy_text_goes_base64_within_worst_case() {
        let topic = Topic::try_from("t").unwrap();
        let body = vec![1u8; 4096];
        let ev = EncodedEvent::encode(1, &topic, &EventMeta::default(), &body);
        let v: serde_json::Value = serde_json::from_str(&ev.json).unwrap();
        assert_eq!(v["body_encoding"], "base64");
        assert!(ev.heap_bytes() <= max_entry_bytes(4096));
    }

    #[test]
    fn traceparent_is_a_trailing_field_older_frames_and_readers_agree_with() {
        let topic = Topic::try_from("line1/press/temp").unwrap();
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut m = meta();
        m.traceparent = crate::trace::parse_traceparent(tp);
        let ev = EncodedEvent::encode(5, &topic, &m, b"{}");
        let v: serde_json::Value = serde_json::from_str(&ev.json).unwrap();
        assert_eq!(v["traceparent"], tp);
        assert_eq!(ev.frame().unwrap().traceparent, Some(tp));
        let back = EncodedEvent::from_postcard(ev.postcard.clone()).unwrap();
        assert_eq!(back.json, ev.json);
        // A frame from before the field (an older snapshot): the same bytes without the
        // trailing `None` (one 0 byte) still decode, with no traceparent.
        let plain = EncodedEvent::encode(6, &topic, &meta(), b"{}");
        assert_eq!(plain.postcard.last(), Some(&0));
        let old = plain.postcard.slice(..plain.postcard.len() - 1);
        let restored = EncodedEvent::from_postcard(old).unwrap();
        assert_eq!(restored.seq, 6);
        assert_eq!(restored.frame().unwrap().traceparent, None);
        assert!(!restored.json.contains("traceparent"));
        // An older reader (the type without the field) reads a new frame: postcard
        // leaves the trailing field unread.
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Before<'a> {
            seq: u64,
            topic: &'a str,
            subject: Option<&'a str>,
            message_id: Option<&'a str>,
            correlation_id: Option<&'a str>,
            content_type: Option<&'a str>,
            enqueued_at_ms: Option<i64>,
            asb_seq: Option<i64>,
            #[serde(borrow)]
            props: Vec<(&'a str, &'a str)>,
            #[serde(borrow)]
            body: Body<'a>,
            truncated: bool,
        }
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        enum BeforeFrame<'a> {
            Hello,
            #[serde(borrow)]
            Event(Before<'a>),
        }
        match postcard::from_bytes::<BeforeFrame<'_>>(&ev.postcard).unwrap() {
            BeforeFrame::Event(e) => assert_eq!((e.seq, e.topic), (5, "line1/press/temp")),
            BeforeFrame::Hello => panic!("an event"),
        }
    }

    #[test]
    fn worst_case_entry_is_an_upper_bound() {
        let mut m = EventMeta::default();
        let long = "\"\\".repeat(400);
        m.subject = Some(bounded(&long, &mut m.truncated));
        m.message_id = Some(bounded(&long, &mut m.truncated));
        m.correlation_id = Some(bounded(&long, &mut m.truncated));
        m.content_type = Some(bounded(&long, &mut m.truncated));
        for i in 0..20 {
            m.push_prop(&format!("{i}{long}"), &long);
        }
        let topic: Topic = bounded(&long, &mut m.truncated);
        let body = vec![0xffu8; 1000];
        let ev = EncodedEvent::encode(u64::MAX, &topic, &m, &body);
        assert!(m.truncated);
        assert!(ev.heap_bytes() <= max_entry_bytes(1000));
        let v: serde_json::Value = serde_json::from_str(&ev.json).unwrap();
        assert_eq!(v["truncated"], true);
    }

    #[test]
    fn bounded_cuts_at_char_boundary_and_flags() {
        let mut t = false;
        let s: HString<4> = bounded("aé€", &mut t);
        assert_eq!(s.as_str(), "aé");
        assert!(t);
        let mut t = false;
        let s: HString<8> = bounded("a\u{0}b", &mut t);
        assert_eq!(s.as_str(), "a?b");
        assert!(t);
        let mut t = false;
        let s: HString<8> = bounded("ok", &mut t);
        assert_eq!(s.as_str(), "ok");
        assert!(!t);
    }

    #[test]
    fn postcard_roundtrip_and_other_frames() {
        let f = Frame::Gap {
            from: 100,
            to: 180,
            reason: GapReason::Lagged,
        };
        assert_eq!(
            f.to_json(),
            r#"{"type":"gap","from":100,"to":180,"reason":"lagged"}"#
        );
        let bytes = f.to_postcard();
        assert_eq!(postcard::from_bytes::<Frame>(&bytes).unwrap(), f);
        let h = Frame::Hello {
            epoch: "e1",
            oldest: 1,
            latest: 42,
            filters: vec!["#"],
        };
        assert_eq!(
            h.to_json(),
            r##"{"type":"hello","epoch":"e1","oldest":1,"latest":42,"filters":["#"]}"##
        );
        assert_eq!(Frame::Pong.to_json(), r#"{"type":"pong"}"#);
        let e = Frame::Error {
            code: "bad_op",
            message: "unknown \"op\"",
        };
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["message"], "unknown \"op\"");
    }
}
