//! W3C trace context through the real daemon: a producer's `traceparent` (or the Azure
//! SDKs' `Diagnostic-Id`) reaches a JSON panel, a postcard panel and an MQTT 5
//! subscriber (user property `traceparent`); a malformed value or an old hierarchical
//! `Request-Id` is dropped, never passed on.

use std::time::Duration;

use asb_gateway::emulator::client::Publisher;
use asb_gateway::event::Frame;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::daemon::Daemon;
use crate::support::mosquitto::Mosquitto;
use crate::support::mqtt::Subscriber;
use crate::support::{self, TempDir};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const T: Duration = Duration::from_secs(20);
const TP1: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
/// Subject, application properties, the traceparent expected downstream.
type Case = (
    &'static str,
    &'static [(&'static str, &'static str)],
    Option<&'static str>,
);
const TP2: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

async fn panel(d: &Daemon, subprotocol: &str) -> Ws {
    let mut req = format!("ws://{}/v1/stream", d.panels())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", subprotocol.parse().unwrap());
    let (ws, _) = tokio::time::timeout(T, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect within 20 s")
        .unwrap();
    ws
}

/// The subject and traceparent of the next `n` events of a JSON panel.
async fn json_events(ws: &mut Ws, n: usize) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(T, ws.next()).await.expect("an event");
        if let Some(Ok(Message::Text(t))) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "event" {
                out.push((
                    v["subject"].as_str().unwrap().to_string(),
                    v.get("traceparent")
                        .map(|t| t.as_str().unwrap().to_string()),
                ));
            }
        }
    }
    out
}

/// The same from a postcard panel.
async fn postcard_events(ws: &mut Ws, n: usize) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(T, ws.next()).await.expect("an event");
        if let Some(Ok(Message::Binary(b))) = m
            && let Ok(Frame::Event(e)) = postcard::from_bytes::<Frame<'_>>(&b)
        {
            out.push((
                e.subject.unwrap().to_string(),
                e.traceparent.map(String::from),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_reaches_json_and_postcard_panels_and_mqtt5_and_bad_values_do_not() {
    let em = support::emulator::start_default().await;
    let broker = Mosquitto::start();
    let dir = TempDir::new("trace");
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[source]\nconnection_string = {:?}\n[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n[panels]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nurl = {:?}\nclient_id = \"trace-{}\"\nprefix = \"tr\"\nrequired = true\n",
            em.connection_string(),
            broker.url(),
            std::process::id()
        ),
    )
    .unwrap();
    let d = Daemon::with_config_file(&cfg).start();
    let mut json = panel(&d, "asbgw.v1.json").await;
    let mut pc = panel(&d, "asbgw.v1.postcard").await;
    let mut sub = Subscriber::start(broker.port, "tr/#", false).await;
    sub.wait_subscribed(1).await;
    let cases: [Case; 6] = [
        ("a-traceparent", &[("traceparent", TP1)], Some(TP1)),
        ("b-diagnostic-id", &[("Diagnostic-Id", TP2)], Some(TP2)),
        // traceparent wins over Diagnostic-Id
        (
            "c-both",
            &[("Diagnostic-Id", TP2), ("traceparent", TP1)],
            Some(TP1),
        ),
        ("d-request-id", &[("Diagnostic-Id", "|4bf92f35.1.")], None),
        (
            "e-uppercase",
            &[(
                "traceparent",
                "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
            )],
            None,
        ),
        ("f-none", &[], None),
    ];
    let mut p = Publisher::connect(&em.connection_string(), "operational-events")
        .await
        .unwrap();
    for (subject, props, _) in &cases {
        p.send_json(subject, props, "{\"v\":1}".to_string(), "application/json")
            .await
            .unwrap();
    }
    p.close().await.unwrap();
    let want: Vec<(String, Option<String>)> = cases
        .iter()
        .map(|(s, _, tp)| (s.to_string(), tp.map(String::from)))
        .collect();
    assert_eq!(json_events(&mut json, 6).await, want, "JSON panel");
    assert_eq!(postcard_events(&mut pc, 6).await, want, "postcard panel");
    let mut mqtt = Vec::new();
    while mqtt.len() < 6 {
        let r = sub
            .next_except("tr/status", T)
            .await
            .expect("an MQTT message");
        mqtt.push((
            r.topic.trim_start_matches("tr/").to_string(),
            r.user("traceparent").map(String::from),
        ));
    }
    assert_eq!(mqtt, want, "MQTT 5 user property");
    let _ = json.close(None).await;
    let _ = pc.send(Message::Close(None)).await;
    em.shutdown().await;
}
