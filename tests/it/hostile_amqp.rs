//! A hostile AMQP battery: the real source against the emulator, fed messages with every
//! AMQP body type, missing properties, huge application properties and wrong annotation
//! types. Each one ends either in the journal with sane, bounded metadata (`truncated`
//! where cut) or dead-lettered with a reason visible in the emulator; nothing stays locked
//! and a normal message after each one still gets through.

use std::time::Duration;

use crate::support::source::*;
use asb_gateway::emulator::client::Publisher;
use asb_gateway::emulator::{EmulatorHandle, EntityStats};
use asb_gateway::event::{CONTENT_TYPE_MAX, ID_MAX, PROP_KEY_MAX, PROP_VALUE_MAX, PROPS_MAX};
use fe2o3_amqp::types::messaging::{
    AmqpSequence, AmqpValue, ApplicationProperties, Batch, Body, Data, Message, MessageAnnotations,
    Properties,
};
use fe2o3_amqp::types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Value};
use serde_json::json;

const T: Duration = Duration::from_secs(20);
const ENTITY: &str = "events/Subscriptions/edge";

async fn emulator() -> EmulatorHandle {
    start_emulator(
        entities(Duration::from_secs(30), &["edge"]),
        None,
        "127.0.0.1:0",
    )
    .await
}

fn msg(id: Option<&str>, body: Body<Value>) -> Message<Body<Value>> {
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: id.map(|id| Properties {
            message_id: Some(id.to_string().into()),
            subject: Some("hostile".into()),
            ..Default::default()
        }),
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

fn value(v: Value) -> Body<Value> {
    Body::Value(AmqpValue(v))
}

/// What must become of a case.
#[derive(Debug)]
enum Expect {
    /// In the journal; the JSON event frame must contain these fields with these values.
    Journal(serde_json::Value),
    /// Dead-lettered with this reason.
    DeadLetter(&'static str),
}

fn marker(i: usize) -> Message<Body<Value>> {
    msg(
        Some(&format!("marker-{i}")),
        data(&[format!("marker {i}").as_bytes()]),
    )
}

fn stats(h: &EmulatorHandle) -> EntityStats {
    h.stats().get(ENTITY).cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_type_odd_properties_and_wrong_annotations() {
    let h = emulator().await;
    let mut cases: Vec<(Message<Body<Value>>, Expect)> = Vec::new();
    let mut map = OrderedMap::new();
    map.insert(Value::String("t".into()), Value::Double(21.5.into()));
    map.insert(
        Value::Long(7),
        Value::List(vec![Value::Null, Value::Bool(true)]),
    );
    cases.push((
        msg(Some("data-1"), data(&[b"{\"a\":1}"])),
        Expect::Journal(json!({"message_id":"data-1","body":"{\"a\":1}"})),
    ));
    cases.push((
        msg(Some("data-3"), data(&[b"hel", b"", b"lo"])),
        Expect::Journal(json!({"message_id":"data-3","body":"hello"})),
    ));
    cases.push((
        msg(Some("data-bin"), data(&[&[0xff, 0x00, 0xfe]])),
        Expect::Journal(json!({"message_id":"data-bin","body":"/wD+","body_encoding":"base64"})),
    ));
    cases.push((
        msg(Some("v-string"), value(Value::String("tëxt".into()))),
        Expect::Journal(json!({"message_id":"v-string","body":"tëxt","content_type":null})),
    ));
    cases.push((
        msg(
            Some("v-binary"),
            value(Value::Binary(Binary::from(vec![0x80u8, 1]))),
        ),
        Expect::Journal(json!({"message_id":"v-binary","body":"gAE=","body_encoding":"base64"})),
    ));
    cases.push((
        msg(Some("v-int"), value(Value::Int(-42))),
        Expect::Journal(json!({"message_id":"v-int","body":-42,"content_type":"application/json"})),
    ));
    cases.push((
        msg(Some("v-map"), value(Value::Map(map))),
        Expect::Journal(json!({"message_id":"v-map","body":{"t":21.5,"7":[null,true]}})),
    ));
    cases.push((
        msg(
            Some("v-list"),
            value(Value::List(vec![
                Value::Symbol(Symbol::from("s")),
                Value::Ulong(u64::MAX),
            ])),
        ),
        Expect::Journal(json!({"message_id":"v-list","body":["s", u64::MAX]})),
    ));
    cases.push((
        msg(Some("v-null"), value(Value::Null)),
        Expect::DeadLetter("Undecodable"),
    ));
    cases.push((
        msg(Some("empty"), Body::Empty),
        Expect::DeadLetter("Undecodable"),
    ));
    cases.push((
        msg(
            Some("seq"),
            Body::Sequence(Batch::new(vec![
                AmqpSequence(vec![Value::Int(1), Value::String("a".into())]),
                AmqpSequence(vec![Value::Bool(false)]),
            ])),
        ),
        Expect::Journal(json!({"message_id":"seq","body":[1,"a",false]})),
    ));
    cases.push((
        msg(Some("too-big"), data(&[&vec![b'x'; 5000]])),
        Expect::DeadLetter("PayloadTooLarge"),
    ));
    // missing properties: none at all, no message-id, no subject, no content-type
    let mut m = msg(None, data(&[b"no properties"]));
    m.application_properties = Some(ApplicationProperties({
        let mut p = OrderedMap::new();
        p.insert("case".to_string(), SimpleValue::String("no-props".into()));
        p
    }));
    cases.push((
        m,
        Expect::Journal(json!({"message_id":null,"subject":null,"content_type":null,"props":{"case":"no-props"},"body":"no properties"})),
    ));
    let mut m = msg(None, data(&[b"no id"]));
    m.properties = Some(Properties {
        subject: Some("only-subject".into()),
        content_type: Some(Symbol::from("application/json")),
        ..Default::default()
    });
    cases.push((
        m,
        Expect::Journal(json!({"message_id":null,"subject":"only-subject","body":"no id"})),
    ));
    let mut m = msg(Some("no-subject"), data(&[b"{}"]));
    m.properties.as_mut().unwrap().subject = None;
    cases.push((
        m,
        Expect::Journal(
            json!({"message_id":"no-subject","subject":null,"content_type":null,"body":"{}"}),
        ),
    ));
    // 100 application properties of every simple type
    let mut m = msg(Some("props-100"), data(&[b"p"]));
    let mut ap = OrderedMap::new();
    for i in 0..100 {
        let v = match i % 5 {
            0 => SimpleValue::Long(i),
            1 => SimpleValue::Bool(true),
            2 => SimpleValue::Binary(Binary::from(vec![1u8, 2, 3])),
            3 => SimpleValue::Double(1.5.into()),
            _ => SimpleValue::String(format!("v{i}")),
        };
        ap.insert(format!("k{i:03}"), v);
    }
    m.application_properties = Some(ApplicationProperties(ap));
    cases.push((
        m,
        Expect::Journal(json!({"message_id":"props-100","truncated":true})),
    ));
    // huge property keys and values, huge ids, subject and content type
    let mut m = msg(Some(&"I".repeat(20_000)), data(&[b"huge"]));
    {
        let p = m.properties.as_mut().unwrap();
        p.subject = Some("S".repeat(20_000));
        p.correlation_id = Some("C\n".repeat(5_000).into());
        p.content_type = Some(Symbol::from(format!("text/{}", "c".repeat(1000))));
    }
    let mut ap = OrderedMap::new();
    ap.insert("K".repeat(1000), SimpleValue::String("V".repeat(60_000)));
    ap.insert(
        "bin".into(),
        SimpleValue::Binary(Binary::from(vec![7u8; 40_000])),
    );
    m.application_properties = Some(ApplicationProperties(ap));
    cases.push((m, Expect::Journal(json!({"truncated":true,"body":"huge"}))));

    // Send: each case followed by a marker that must get through.
    let mut p = tokio::time::timeout(T, Publisher::connect(&h.connection_string(), TOPIC))
        .await
        .unwrap()
        .unwrap();
    let mut expected_markers = 0;
    for (m, _) in &cases {
        tokio::time::timeout(T, p.send(m.clone()))
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(T, p.send(marker(expected_markers)))
            .await
            .unwrap()
            .unwrap();
        expected_markers += 1;
    }
    // Wrong annotation types, as a misbehaving broker would send them (the emulator's
    // own stamps replaced after it set them).
    let store = h.store();
    let wrong: [(&str, Value); 4] = [
        ("x-opt-sequence-number", Value::String("17".into())),
        ("x-opt-enqueued-time", Value::Long(1_700_000_000_000)),
        ("x-opt-sequence-number", Value::List(vec![Value::Null])),
        ("x-opt-enqueued-time", Value::String("yesterday".into())),
    ];
    for (i, (k, v)) in wrong.iter().enumerate() {
        let id = format!("ann-{i}");
        let m = msg(Some(&id), data(&[id.as_bytes()]));
        // the frame field that must be null because the annotation had the wrong type
        let key = if *k == "x-opt-sequence-number" {
            "asb_seq"
        } else {
            "enqueued_at"
        };
        let (k, v) = (k.to_string(), v.clone());
        store
            .publish_tampered(TOPIC, m, move |m| {
                let ann = m
                    .message_annotations
                    .get_or_insert_with(|| MessageAnnotations::builder().build());
                ann.0.insert(k.as_str().into(), v);
                ann.0
                    .insert("x-opt-partition-key".into(), Value::Map(OrderedMap::new()));
            })
            .unwrap();
        cases.push((
            m_placeholder(),
            Expect::Journal(json!({"message_id": id, key: null})),
        ));
        tokio::time::timeout(T, p.send(marker(expected_markers)))
            .await
            .unwrap()
            .unwrap();
        expected_markers += 1;
    }
    p.close().await.unwrap();

    let run = start(
        context(&format!(
            "[source]\nconnection_string = \"{}\"\n[[source.subscriptions]]\ntopic = \"{TOPIC}\"\nsubscription = \"edge\"\n\
             [journal]\nmax_event_bytes = 4096\n",
            h.connection_string()
        )),
        fast(),
    );
    let ctx = run.ctx.clone();
    let total = (cases.len() + expected_markers) as u64;
    let dead = cases
        .iter()
        .filter(|c| matches!(c.1, Expect::DeadLetter(_)))
        .count() as u64;
    wait_for(T, "every message settled", || {
        let s = stats(&h);
        s.completed + s.dead_lettered == total
    })
    .await;
    let s = stats(&h);
    assert_eq!((s.active, s.locked), (0, 0), "nothing stuck: {s:?}");
    assert_eq!(s.dead_lettered, dead, "{s:?} {:?}", h.dead_letters(ENTITY));

    let frames: Vec<serde_json::Value> = events(&ctx)
        .iter()
        .map(|e| serde_json::from_str(e.json.as_str()).unwrap())
        .collect();
    // markers all there, in order, each once
    let markers: Vec<&str> = frames
        .iter()
        .filter_map(|f| f["message_id"].as_str())
        .filter(|id| id.starts_with("marker-"))
        .collect();
    let want: Vec<String> = (0..expected_markers)
        .map(|i| format!("marker-{i}"))
        .collect();
    assert_eq!(markers, want.iter().map(String::as_str).collect::<Vec<_>>());
    // every event is within the limits
    for f in &frames {
        for k in ["message_id", "correlation_id", "subject"] {
            assert!(
                f[k].as_str().is_none_or(|s| s.len() <= ID_MAX),
                "{k} too long"
            );
        }
        assert!(
            f["content_type"]
                .as_str()
                .is_none_or(|s| s.len() <= CONTENT_TYPE_MAX)
        );
        let props = f["props"].as_object().unwrap();
        assert!(props.len() <= PROPS_MAX);
        for (k, v) in props {
            assert!(k.len() <= PROP_KEY_MAX && v.as_str().unwrap().len() <= PROP_VALUE_MAX);
        }
    }
    let dls = h.dead_letters(ENTITY);
    for (i, (_, expect)) in cases.iter().enumerate() {
        match expect {
            Expect::Journal(fields) => {
                let fields = fields.as_object().unwrap();
                // find the event by message id, or by body for id-less ones
                let found = frames.iter().find(|f| {
                    fields
                        .iter()
                        .filter(|(k, _)| ["message_id", "body", "subject"].contains(&k.as_str()))
                        .all(|(k, v)| &f[k] == v)
                        && (fields.contains_key("message_id") || fields.contains_key("body"))
                });
                let Some(f) = found else {
                    panic!("case {i} ({fields:?}) not in the journal; dead letters: {dls:?}");
                };
                for (k, v) in fields {
                    let got = f.get(k).cloned().unwrap_or(serde_json::Value::Null);
                    assert_eq!(&got, v, "case {i}: field {k} of {f}");
                }
            }
            Expect::DeadLetter(reason) => {
                assert!(
                    dls.iter().any(|d| d.reason.as_deref() == Some(reason)
                        && d.description.as_deref().is_some_and(|d| !d.is_empty())),
                    "case {i}: no dead letter with reason {reason}: {dls:?}"
                );
            }
        }
    }
    // the huge one is cut to the limits exactly
    let huge = frames.iter().find(|f| f["body"] == "huge").unwrap();
    assert_eq!(huge["message_id"].as_str().unwrap().len(), ID_MAX);
    assert_eq!(huge["subject"].as_str().unwrap().len(), ID_MAX);
    assert!(!huge["correlation_id"].as_str().unwrap().contains('\n'));
    assert!(huge["content_type"].as_str().unwrap().len() <= CONTENT_TYPE_MAX);
    let hundred = frames
        .iter()
        .find(|f| f["message_id"] == "props-100")
        .unwrap();
    assert_eq!(hundred["props"].as_object().unwrap().len(), PROPS_MAX);
    let m = &ctx.metrics;
    assert_eq!(
        m.dead_lettered
            .of(asb_gateway::metrics::DeadLetterReason::Undecodable)
            .get()
            + m.dead_lettered
                .of(asb_gateway::metrics::DeadLetterReason::PayloadTooLarge)
                .get(),
        dead
    );
    run.stop().await.unwrap();
    h.shutdown().await;
}

/// The annotation cases were stored directly (not sent): their entry in `cases` only
/// carries the expectation.
fn m_placeholder() -> Message<Body<Value>> {
    msg(None, Body::Empty)
}
