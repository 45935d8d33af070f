//! Security checks: panels without a valid token get 401 and not one frame; a token
//! scoped to `line1/#` never sees another line's event whatever it asks for; and no secret
//! (SAS key, SAS signature, panel token, MQTT password) shows up in the daemon's logs at
//! trace level, in `/metrics`, `/healthz` or error frames.

use crate::support;
use crate::support::{http, ws_raw};

use std::time::{Duration, Instant};

use crate::support::panels::*;
use asb_gateway::emulator::EmulatorOptions;
use asb_gateway::emulator::client::Publisher;
use asb_gateway::panels::Options;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use sha2::Digest;
use support::daemon::Daemon;
use support::mosquitto::{Mosquitto, MosquittoOptions};
use tokio_tungstenite::tungstenite::Message;

fn sha_hex(s: &str) -> String {
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn unauthenticated_and_wrong_token_panels_get_401_and_no_frames() {
    let ctx = ctx(&format!(
        "[[panels.tokens]]\nname = \"line1\"\nsha256 = \"{}\"\nallow = [\"line1/#\"]\n",
        sha_hex("right-token")
    ));
    for i in 0..3 {
        append(&ctx, &format!("line{i}/temp"), "{}");
    }
    let srv = start(ctx.clone(), Options::default()).await;
    let cases: [(&str, &str); 6] = [
        ("", ""),
        ("", "?token="),
        ("", "?token=wrong-token"),
        ("", "?token=right-token%00"),
        ("Authorization: Bearer wrong-token\r\n", ""),
        ("Authorization: Basic cmlnaHQtdG9rZW4=\r\n", ""),
    ];
    for (headers, query) in cases {
        let resp = ws_raw::upgrade_response(srv.addr, headers, query).await;
        assert!(
            resp.starts_with("HTTP/1.1 401"),
            "{headers:?} {query:?}: {resp}"
        );
        // nothing but the HTTP response: no WebSocket frame, no event data
        let (_, body) = resp.split_once("\r\n\r\n").unwrap();
        assert!(!body.contains("line"), "{body}");
        assert!(!resp.contains("wrong-token"), "token echoed: {resp}");
        assert!(!resp.contains("Sec-WebSocket-Accept"), "{resp}");
    }
    assert_eq!(
        ctx.metrics
            .panels_rejected
            .of(asb_gateway::metrics::RejectReason::Unauthorized)
            .get(),
        6
    );
    assert_eq!(ctx.metrics.frames_sent.get(), 0);
    // the right token still works afterwards
    let mut ok = connect(srv.addr, "token=right-token").await;
    assert_eq!(next_json(&mut ok).await["type"], "hello");
    srv.stop().await;
}

#[tokio::test]
async fn a_line1_token_never_sees_another_line() {
    let ctx = ctx(&format!(
        "[[panels.tokens]]\nname = \"line1\"\nsha256 = \"{}\"\nallow = [\"line1/#\"]\n\
         [[panels.tokens]]\nname = \"all\"\nsha256 = \"{}\"\nallow = [\"#\"]\n",
        sha_hex("l1"),
        sha_hex("everything")
    ));
    let topics = [
        "line1/temp",
        "line2/temp",
        "line10/temp",
        "line1x/temp",
        "line",
        "line1",
        "$sys/line1/temp",
        "other/line1/temp",
    ];
    for t in topics {
        append(&ctx, t, "{}");
    }
    let srv = start(ctx.clone(), Options::default()).await;
    let queries = [
        "token=l1",
        "token=l1&filter=%23",
        "token=l1&filter=%2B/temp",
        "token=l1&filter=line2/%23",
        "token=l1&filter=%2B/%23",
        "token=l1&filter=line1/%23&since=0123456789ab:0",
        "token=l1&since=0123456789ab:1",
        "token=l1&since=other:0",
    ];
    let mut panels = Vec::new();
    for q in queries {
        match try_connect(srv.addr, q, None, &[]).await {
            Ok(mut ws) => {
                let hello = next_json(&mut ws).await;
                assert_eq!(hello["type"], "hello", "{q}");
                for f in hello["filters"].as_array().unwrap() {
                    let f = f.as_str().unwrap();
                    assert!(f == "line1" || f.starts_with("line1/"), "{q}: filter {f}");
                }
                panels.push((q, ws));
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert!(
                    [400, 401, 403].contains(&r.status().as_u16()),
                    "{q}: {}",
                    r.status()
                );
            }
            Err(e) => panic!("{q}: {e}"),
        }
    }
    assert!(panels.len() >= 6, "most of these connect (narrowed)");
    // Every trick over the socket too: subscribe wide, resume from the start.
    for (_, ws) in &mut panels {
        for filters in [
            json!(["#"]),
            json!(["+/temp"]),
            json!(["line2/#"]),
            json!(["+", "+/+", "+/#", "line1/../line2/#"]),
        ] {
            send_op(ws, json!({"op":"subscribe","filters":filters})).await;
        }
        send_op(ws, json!({"op":"resume","since":"0123456789ab:0"})).await;
        send_op(ws, json!({"op":"unsubscribe","filters":["line1/#"]})).await;
        send_op(ws, json!({"op":"subscribe","filters":["#"]})).await;
    }
    for t in topics {
        append(&ctx, t, "{}");
    }
    for (q, ws) in &mut panels {
        let frames = barrier(ws).await;
        // and a little longer, for frames already on their way
        let deadline = Instant::now() + Duration::from_millis(300);
        let mut all = frames;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            ws.next(),
        )
        .await
        {
            if let Message::Text(t) = m {
                all.push(serde_json::from_str(t.as_str()).unwrap());
            }
        }
        for f in &all {
            if f["type"] == "event" {
                let topic = f["topic"].as_str().unwrap();
                assert!(
                    topic == "line1" || topic.starts_with("line1/"),
                    "{q}: got {topic}"
                );
            }
        }
    }
    srv.stop().await;
}

// --------------------------------------------------------------- secrets in output

const SAS_KEY: &str = "EmuSasKey0123456789Secret";
const PANEL_TOKEN: &str = "PanelTok3nSecretValue";
const MQTT_PASSWORD: &str = "MqttPassw0rdSecretValue";

/// Fragments that must never be printed: the secrets themselves and the signature part
/// of a SAS token made from the key.
fn leaks(text: &str) -> Vec<&'static str> {
    let mut found = Vec::new();
    for s in [SAS_KEY, PANEL_TOKEN, MQTT_PASSWORD, "sig="] {
        if text.contains(s) {
            found.push(s);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_trace_logs_metrics_health_or_error_frames() {
    let mosq = Mosquitto::start_with(MosquittoOptions {
        credentials: Some(("gw".into(), MQTT_PASSWORD.into())),
        ..Default::default()
    });
    let em = support::emulator::start(EmulatorOptions {
        key: SAS_KEY.into(),
        ..Default::default()
    })
    .await;
    let conn = em.connection_string();
    assert!(conn.contains(SAS_KEY));
    let cfg = format!(
        "[source]\nconnection_string = {conn:?}\n[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n\
             [routing]\ntopic = \"{{prop:line}}/{{subject}}\"\n\
             [panels]\nlisten = \"127.0.0.1:0\"\n[[panels.tokens]]\nname = \"p\"\nsha256 = \"{}\"\nallow = [\"line1/#\"]\n\
             [mqtt]\nurl = \"{}\"\nusername = \"gw\"\npassword = \"{MQTT_PASSWORD}\"\nrequired = true\n",
        sha_hex(PANEL_TOKEN),
        mosq.url()
    );
    let mut daemon = Daemon::with_config(&cfg).rust_log("trace").start();
    let addr = daemon.panels();

    // Traffic: events through the whole path, a panel with the token, bad panels.
    let mut ws = connect(addr, &format!("token={PANEL_TOKEN}")).await;
    let mut p = Publisher::connect(&conn, "operational-events")
        .await
        .unwrap();
    for i in 0..5 {
        p.send_json(
            "temp",
            &[("line", "line1")],
            format!("{{\"i\":{i}}}"),
            "application/json",
        )
        .await
        .unwrap();
    }
    let mut frames = Vec::new();
    let mut events = 0;
    while events < 5 {
        let m = next_msg(&mut ws).await;
        let t = m.to_text().unwrap().to_string();
        if t.contains("\"event\"") {
            events += 1;
        }
        frames.push(t);
    }
    // error frames: garbage, a forbidden filter, a bad resume
    for op in [
        r#"{"op":"dance"}"#.to_string(),
        r##"{"op":"subscribe","filters":["line2/#","#","a/#/b"]}"##.to_string(),
        r#"{"op":"resume","since":"nope"}"#.to_string(),
        "not json".to_string(),
    ] {
        ws.send(Message::text(op)).await.unwrap();
    }
    for f in barrier(&mut ws).await {
        frames.push(f.to_string());
    }
    let _ = try_connect(addr, "token=nope", None, &[]).await;
    let _ = try_connect(addr, "", None, &[("Authorization", "Bearer nope")]).await;
    let (s1, _, metrics) = http::get(addr, "/metrics").await;
    let (_, _, health) = http::get(addr, "/healthz").await;
    assert_eq!(s1, 200);
    // wait until the mirror has published (the password was used) and let the
    // SAS token be put at least once (the source connected)
    let t0 = Instant::now();
    loop {
        let (_, _, m) = http::get(addr, "/metrics").await;
        let published = m
            .lines()
            .find(|l| l.starts_with("asbgw_mqtt_published_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if published >= 5.0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "mirror published nothing: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(ws);
    p.close().await.unwrap();
    // SIGTERM and collect the rest of the log
    let (_, took) = daemon.terminate();
    assert!(took < Duration::from_secs(10), "daemon did not stop");
    let log = daemon.log();
    assert!(
        log.iter()
            .any(|l| l.contains("TRACE") || l.contains("trace")),
        "the daemon logged at trace level ({} lines)",
        log.len()
    );
    eprintln!("scanned {} log lines, {} frames", log.len(), frames.len());
    for target in ["fe2o3_amqp", "rumqttc"] {
        // the protocol libraries' own trace records were captured and scanned too
        let n = log.iter().filter(|l| l.contains(target)).count();
        assert!(n > 0, "no {target} records at trace level");
    }
    // The secrets were really used: the source authenticated (events arrived), the mirror
    // logged in (events published), the panel's token was accepted.
    assert!(log.len() > 50, "{} log lines", log.len());
    let mut problems = Vec::new();
    for (i, l) in log.iter().enumerate() {
        let found = leaks(l);
        if !found.is_empty() {
            problems.push(format!(
                "log line {i} leaks {found:?}: {}",
                &l[..l.len().min(300)]
            ));
        }
    }
    for (what, text) in [("metrics", &metrics), ("healthz", &health)] {
        let found = leaks(text);
        if !found.is_empty() {
            problems.push(format!("{what} leaks {found:?}"));
        }
    }
    for f in &frames {
        let found = leaks(f);
        if !found.is_empty() {
            problems.push(format!("frame leaks {found:?}: {f}"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    em.shutdown().await;
}

#[tokio::test]
async fn a_wildcard_scoped_token_cannot_reach_dollar_topics() {
    let ctx = ctx(&format!(
        "[[panels.tokens]]\nname = \"temps\"\nsha256 = \"{}\"\nallow = [\"+/temp\"]\n",
        sha_hex("temps")
    ));
    let srv = start(ctx.clone(), Options::default()).await;
    let mut ws = connect(srv.addr, "token=temps").await;
    assert_eq!(next_json(&mut ws).await["filters"], json!(["+/temp"]));
    send_op(&mut ws, json!({"op":"subscribe","filters":["$sys/temp"]})).await;
    let before = barrier(&mut ws).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["code"], "forbidden_filter");
    append(&ctx, "$sys/temp", "{}");
    let seq = append(&ctx, "line1/temp", "{}");
    let f = next_json(&mut ws).await;
    assert_eq!(
        (f["type"].as_str(), f["seq"].as_u64()),
        (Some("event"), Some(seq)),
        "{f}"
    );
    srv.stop().await;
}
