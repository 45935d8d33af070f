//! Application properties of every AMQP type, end to end over real AMQP: a publisher
//! sends one message per row through the ASB emulator, the whole gateway (source,
//! journal, panels, MQTT mirror to a real mosquitto) runs in-process, and the property
//! must read the same in a JSON panel frame, a postcard panel frame (real WebSocket
//! clients) and the mirror's `payload = "json"` MQTT message. Table-driven: one row per
//! AMQP type and per described type the Azure SDKs write.

use crate::support;

use std::collections::HashMap;
use std::time::Duration;

use asb_gateway::app::{self, Context};
use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::emulator::client::Publisher;
use asb_gateway::event::Frame;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Data, Message, Properties};
use fe2o3_amqp::types::primitives::{
    Binary, Dec32, Dec64, Dec128, OrderedMap, SimpleValue, Symbol, Timestamp, Uuid, Value,
};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use support::Subscriber;
use support::mosquitto::Mosquitto;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const T: Duration = Duration::from_secs(20);

fn described(name: &str, value: Value) -> SimpleValue {
    SimpleValue::Described(Box::new(Described {
        descriptor: Descriptor::Name(Symbol::from(name)),
        value,
    }))
}

/// A .NET `decimal` as Microsoft.Azure.Amqp (the .NET SDK's AMQP library) writes it.
fn dotnet_decimal(negative: bool, coefficient: u128, scale: u8) -> SimpleValue {
    let exponent = 6176 - u32::from(scale);
    let mut b = [0u8; 16];
    b[0] = if negative { 0x80 } else { 0 } | (exponent >> 9) as u8;
    b[1] = ((exponent & 0x7f) << 1) as u8;
    b[4..].copy_from_slice(&coefficient.to_be_bytes()[4..]);
    SimpleValue::Decimal128(Dec128::from(b))
}

/// (row, the property value as sent, the text every reader must see)
fn rows() -> Vec<(&'static str, SimpleValue, &'static str)> {
    vec![
        ("null", SimpleValue::Null, "null"),
        ("boolean", SimpleValue::Bool(false), "false"),
        ("ubyte", SimpleValue::Ubyte(200), "200"),
        ("ushort", SimpleValue::Ushort(65_000), "65000"),
        ("uint", SimpleValue::Uint(4_000_000_000), "4000000000"),
        (
            "ulong",
            SimpleValue::Ulong(u64::MAX),
            "18446744073709551615",
        ),
        ("byte", SimpleValue::Byte(-7), "-7"),
        ("short", SimpleValue::Short(-300), "-300"),
        ("int", SimpleValue::Int(-70_000), "-70000"),
        ("long", SimpleValue::Long(-5_000_000_000), "-5000000000"),
        ("float", SimpleValue::Float(0.1f32.into()), "0.1"),
        ("double", SimpleValue::Double(21.5.into()), "21.5"),
        ("double NaN", SimpleValue::Double(f64::NAN.into()), "NaN"),
        (
            "double -Infinity",
            SimpleValue::Double(f64::NEG_INFINITY.into()),
            "-Infinity",
        ),
        (
            "decimal32",
            SimpleValue::Decimal32(Dec32::from(((100u32 << 23) | 75).to_be_bytes())),
            "7.5",
        ),
        (
            "decimal64",
            SimpleValue::Decimal64(Dec64::from(
                ((1u64 << 63) | (396 << 53) | 1250).to_be_bytes(),
            )),
            "-12.50",
        ),
        (
            "decimal128 (IEEE BID)",
            SimpleValue::Decimal128(Dec128::from(((6174u128 << 113) | 1250).to_be_bytes())),
            "12.50",
        ),
        (
            "decimal128 (.NET decimal)",
            dotnet_decimal(false, 1250, 2),
            "12.50",
        ),
        ("char", SimpleValue::Char('€'), "€"),
        (
            "timestamp",
            SimpleValue::Timestamp(Timestamp::from_milliseconds(1_795_514_400_123)),
            "2026-11-24T10:00:00.123Z",
        ),
        (
            "uuid",
            SimpleValue::Uuid(Uuid::from([
                0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0, 1, 2, 3, 4, 5, 6, 7,
            ])),
            "12345678-9abc-def0-0001-020304050607",
        ),
        (
            "binary",
            SimpleValue::Binary(Binary::from(vec![0xff, 0, 0x10])),
            "/wAQ",
        ),
        ("string", SimpleValue::String("línea 1".into()), "línea 1"),
        ("symbol", SimpleValue::Symbol(Symbol::from("sym")), "sym"),
        (
            "DateTimeOffset (com.microsoft:datetime-offset)",
            described(
                "com.microsoft:datetime-offset",
                Value::Long(639_311_112_001_230_000),
            ),
            "2026-11-24T10:00:00.123Z",
        ),
        (
            "TimeSpan (com.microsoft:timespan)",
            described("com.microsoft:timespan", Value::Long(54_000_000_000)),
            "PT1H30M",
        ),
        (
            "Uri (com.microsoft:uri)",
            described(
                "com.microsoft:uri",
                Value::String("https://example.com/line/1?x=y".into()),
            ),
            "https://example.com/line/1?x=y",
        ),
        (
            "other described",
            described("vendor:celsius", Value::Double(21.5.into())),
            "21.5",
        ),
        (
            "described list",
            described("vendor:pair", Value::List(vec![Value::Int(1), Value::Null])),
            "[1,null]",
        ),
        (
            "described map",
            described("vendor:map", {
                let mut m = OrderedMap::new();
                m.insert(
                    Value::String("at".into()),
                    Value::Timestamp(Timestamp::from_milliseconds(0)),
                );
                Value::Map(m)
            }),
            r#"{"at":"1970-01-01T00:00:00.000Z"}"#,
        ),
    ]
}

fn message(i: usize, value: SimpleValue) -> Message<Data> {
    let mut ap = OrderedMap::new();
    ap.insert("v".to_string(), value);
    Message::builder()
        .properties(
            Properties::builder()
                .message_id(format!("row-{i}"))
                .subject("typed")
                .content_type("application/json")
                .build(),
        )
        .application_properties(ApplicationProperties(ap))
        .data(Data(Binary::from(format!(r#"{{"row":{i}}}"#).into_bytes())))
        .build()
}

/// The next event frame of a panel as (message_id, props), JSON or postcard.
async fn next_event(ws: &mut support::panels::Client) -> (String, HashMap<String, String>) {
    loop {
        match support::panels::next_msg(ws).await {
            WsMessage::Text(t) => {
                let f: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if f["type"] != "event" {
                    continue;
                }
                return json_event(&f);
            }
            WsMessage::Binary(b) => match postcard::from_bytes::<Frame<'_>>(&b).unwrap() {
                Frame::Event(e) => {
                    let props = e
                        .props
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    return (e.message_id.unwrap().to_string(), props);
                }
                _ => continue,
            },
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

fn json_event(f: &serde_json::Value) -> (String, HashMap<String, String>) {
    let props = f["props"]
        .as_object()
        .expect("props is an object")
        .iter()
        .map(|(k, v)| {
            let v = v.as_str().expect("every property value is a JSON string");
            (k.clone(), v.to_string())
        })
        .collect();
    (f["message_id"].as_str().unwrap().to_string(), props)
}

#[tokio::test]
async fn every_amqp_type_reads_the_same_in_panels_postcard_and_mqtt() {
    let broker = Mosquitto::start();
    let mut sub = Subscriber::start(broker.port, "factory/asb/typed", false).await;
    sub.wait_subscribed(1).await;
    let em = support::source::start_emulator(
        support::source::entities(Duration::from_secs(30), &["edge"]),
        None,
        "127.0.0.1:0",
    )
    .await;
    let toml = format!(
        "[source]\nconnection_string = \"{}\"\n[[source.subscriptions]]\ntopic = \"{}\"\n\
         subscription = \"edge\"\n[mqtt]\nurl = \"{}\"\npayload = \"json\"\n",
        em.connection_string(),
        support::source::TOPIC,
        broker.url()
    );
    let ctx = Context::new(Config::parse(&toml, &LoadEnv::default()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gw = tokio::spawn(app::run(
        ctx.clone(),
        listener,
        async move {
            let _ = stopped.await;
        },
        asb_gateway::reload::Reload::never(),
    ));

    let mut json = support::panels::try_connect(addr, "", Some("asbgw.v1.json"), &[])
        .await
        .unwrap();
    let mut postcard = support::panels::try_connect(addr, "", Some("asbgw.v1.postcard"), &[])
        .await
        .unwrap();
    assert_eq!(support::panels::next_json(&mut json).await["type"], "hello");
    assert!(matches!(
        support::panels::next_msg(&mut postcard).await,
        WsMessage::Binary(_)
    ));

    let rows = rows();
    let mut publisher = tokio::time::timeout(
        T,
        Publisher::connect(&em.connection_string(), support::source::TOPIC),
    )
    .await
    .expect("publisher connects in time")
    .expect("publisher connects");
    for (i, (_, value, _)) in rows.iter().enumerate() {
        tokio::time::timeout(T, publisher.send(message(i, value.clone())))
            .await
            .expect("send in time")
            .expect("send");
    }

    let mut seen_json = HashMap::new();
    let mut seen_postcard = HashMap::new();
    let mut seen_mqtt = HashMap::new();
    for _ in 0..rows.len() {
        let (id, props) = next_event(&mut json).await;
        seen_json.insert(id, props);
        let (id, props) = next_event(&mut postcard).await;
        seen_postcard.insert(id, props);
        let m = sub.next(T).await.expect("the mirror publishes every event");
        let f: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let (id, props) = json_event(&f);
        assert_eq!(m.user("message_id"), Some(id.as_str()));
        seen_mqtt.insert(id, props);
    }
    for (i, (what, _, text)) in rows.iter().enumerate() {
        let id = format!("row-{i}");
        for (reader, seen) in [
            ("json panel", &seen_json),
            ("postcard panel", &seen_postcard),
            ("mqtt json payload", &seen_mqtt),
        ] {
            let props = seen
                .get(&id)
                .unwrap_or_else(|| panic!("{what}: {reader} saw no event"));
            assert_eq!(
                props.get("v").map(String::as_str),
                Some(*text),
                "{what} in the {reader}"
            );
        }
    }

    let _ = publisher.close().await;
    let _ = stop.send(());
    tokio::time::timeout(T, gw)
        .await
        .expect("gateway stops in time")
        .unwrap()
        .unwrap();
    em.shutdown().await;
}
