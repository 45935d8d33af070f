//! The daemon as users run it: the `asb-gateway run` binary against the emulator, a
//! WebSocket panel, and SIGTERM. Shows the whole path (AMQP source → journal → panel),
//! graceful shutdown (exit 0 within 5 s, close 1001 to panels) and that messages still
//! unsettled at shutdown are released back to the broker at once, not left locked.

use std::time::{Duration, Instant};

use asb_gateway::emulator::{EmulatorHandle, client::Publisher};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::daemon::Daemon;
use crate::support::emulator::start_default as emulator;

const ENTITY: &str = "operational-events/Subscriptions/edge";

fn config(em: &EmulatorHandle, extra: &str) -> String {
    format!(
        "[source]\nconnection_string = {:?}\n[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n[routing]\ntopic = \"{{prop:line}}/{{subject}}\"\n[panels]\nlisten = \"127.0.0.1:0\"\n{extra}",
        em.connection_string()
    )
}

async fn publish(em: &EmulatorHandle, n: usize) {
    let mut p = Publisher::connect(&em.connection_string(), "operational-events")
        .await
        .unwrap();
    for i in 0..n {
        p.send_json(
            "temp",
            &[("line", "line1")],
            format!("{{\"i\":{i}}}"),
            "application/json",
        )
        .await
        .unwrap();
    }
    p.close().await.unwrap();
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_panels_and_stops_gracefully() {
    let em = emulator().await;
    let mut d = Daemon::start(&config(&em, ""));
    let url = format!("ws://{}/v1/stream?filter=line1/%23", d.panels());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    publish(&em, 20).await;

    let mut seen = Vec::new();
    let mut hello = None;
    while seen.len() < 20 {
        let msg = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .expect("events within 15 s")
            .unwrap()
            .unwrap();
        let Message::Text(t) = msg else { continue };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        match v["type"].as_str().unwrap() {
            "hello" => hello = Some(v),
            "event" => {
                assert_eq!(v["topic"], "line1/temp");
                seen.push(v["body"]["i"].as_u64().unwrap());
            }
            _ => {}
        }
    }
    assert!(hello.is_some(), "hello frame first");
    assert_eq!(seen, (0..20).collect::<Vec<_>>(), "in order, each once");
    wait_for("20 completed", || em.stats()[ENTITY].completed == 20).await;

    let (code, took) = d.terminate();
    assert_eq!(code, Some(0), "log: {}", d.log_text());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // the panel was told why: 1001 going away
    let mut close = None;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        if let Ok(Message::Close(frame)) = msg {
            close = frame;
            break;
        }
    }
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
    em.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_unsettled_messages() {
    // The mirror is required but its broker is unreachable: events stay unsettled (at most
    // `unsettled` of them leave the emulator), and SIGTERM must give them back at once.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let em = emulator().await;
    let extra = format!(
        "[journal]\nunsettled = 8\n[mqtt]\nurl = \"mqtt://127.0.0.1:{dead_port}\"\nrequired = true\n"
    );
    let mut d = Daemon::start(&config(&em, &extra));
    publish(&em, 30).await;
    wait_for("8 locked", || em.stats()[ENTITY].locked == 8).await;
    let s = em.stats()[ENTITY].clone();
    assert_eq!((s.active, s.completed), (22, 0), "{s:?}");
    assert!(s.max_locked <= 8, "{s:?}");

    let (code, took) = d.terminate();
    assert_eq!(code, Some(0), "log: {}", d.log_text());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // released, not waiting for the lock to expire (LockDuration is a minute)
    wait_for("all 30 active again", || {
        let s = &em.stats()[ENTITY];
        s.active == 30 && s.locked == 0
    })
    .await;
    assert_eq!(em.stats()[ENTITY].completed, 0);
    em.shutdown().await;
}
