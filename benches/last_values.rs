//! Last values benchmark (not a test): how long a panel that connects to a gateway that
//! has been running takes to hold the state of every machine — connect → `synced` with
//! `last=true` and 1,000 topics — against connect → `hello` alone (one round trip), a
//! `GET /v1/last` of the same table, and mosquitto's retained messages for the same
//! 1,000 topics (connect + subscribe `#` → the 1,000th retained message), in one run.
//!
//! Run: `cargo bench --bench last_values` (env LAST_BENCH_TOPICS, LAST_BENCH_RUNS).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use asb_gateway::app::Context;
use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::event::{ContentType, EncodedEvent, EventMeta, IdString, Topic};
use asb_gateway::panels::Options;
use futures_util::StreamExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use support::mosquitto::Mosquitto;
use tokio_tungstenite::tungstenite::Message;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `line{L}/station{S}/temp` style topics with a demo-sized JSON body.
fn topic(i: usize) -> String {
    format!(
        "line{}/station{}/{}",
        i % 10,
        i / 10 % 100,
        ["temp", "state"][i / 1000 % 2]
    )
}

fn body(i: usize) -> String {
    format!(
        "{{\"line\":\"line{}\",\"station\":\"station{}\",\"celsius\":{}.5,\"n\":{i}}}",
        i % 10,
        i / 10 % 100,
        20 + i % 60
    )
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

async fn stream_until(addr: std::net::SocketAddr, query: &str, until: &str) -> (Duration, usize) {
    let t0 = Instant::now();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/stream?{query}"))
        .await
        .unwrap();
    let mut frames = 0;
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => {
                frames += 1;
                if t.as_str().starts_with(until) {
                    return (t0.elapsed(), frames);
                }
            }
            _ => continue,
        }
    }
}

async fn mosquitto_retained(port: u16, topics: usize, run: usize) -> Duration {
    let t0 = Instant::now();
    let mut o = MqttOptions::new(format!("bench-sub-{run}"), "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut ev) = AsyncClient::new(o, 64);
    client.subscribe("#", QoS::AtMostOnce).await.unwrap();
    let mut got = 0;
    while got < topics {
        if let Event::Incoming(Packet::Publish(p)) = ev.poll().await.unwrap()
            && p.retain
        {
            got += 1;
        }
    }
    let d = t0.elapsed();
    let _ = client.disconnect().await;
    d
}

fn main() {
    let topics = env("LAST_BENCH_TOPICS", 1000);
    let runs = env("LAST_BENCH_RUNS", 50);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let text = format!(
        "[source]\nconnection_string = \"Endpoint=sb://127.0.0.1/;SharedAccessKeyName=k;SharedAccessKey=v\"\n\
         [[source.subscriptions]]\ntopic = \"t\"\nsubscription = \"s\"\n[panels]\nlast_values = {topics}\n"
    );
    let ctx = Context::with_epoch(
        Config::parse(&text, &LoadEnv::default()).unwrap(),
        "bench".into(),
    );
    // a gateway that has been running: each topic updated several times, newest last
    let mut seq = 1;
    for round in 0..3 {
        for i in 0..topics {
            let mut meta = EventMeta {
                subject: Some(IdString::try_from("temp").unwrap()),
                content_type: Some(ContentType::try_from("application/json").unwrap()),
                enqueued_at_ms: Some(1_795_000_000_000 + seq as i64),
                asb_seq: Some(seq as i64),
                ..Default::default()
            };
            meta.push_prop("line", "line1");
            let ev = EncodedEvent::encode(
                seq,
                &Topic::try_from(topic(i).as_str()).unwrap(),
                &meta,
                body(i + round).as_bytes(),
            );
            ctx.journal.append(ev, false).unwrap();
            seq += 1;
        }
    }
    let mosquitto = Mosquitto::start();
    let port = mosquitto.port;
    rt.block_on(async {
        let settings = ctx.panel_settings();
        let server = support::panels::start_with(ctx.clone(), settings, Options::default()).await;
        let addr = server.addr;
        // the same 1,000 topics as retained messages on mosquitto
        let (client, mut ev) =
            AsyncClient::new(MqttOptions::new("bench-pub", "127.0.0.1", port), 64);
        let publisher = tokio::spawn(async move {
            let mut acked = 0;
            while acked < topics {
                if let Event::Incoming(Packet::PubAck(_)) = ev.poll().await.unwrap() {
                    acked += 1;
                }
            }
        });
        for i in 0..topics {
            client
                .publish(topic(i), QoS::AtLeastOnce, true, body(i + 2))
                .await
                .unwrap();
        }
        publisher.await.unwrap();
        let _ = client.disconnect().await;

        let (mut hello, mut synced, mut http, mut retained) = (vec![], vec![], vec![], vec![]);
        let mut frames = 0;
        for run in 0..runs {
            hello.push(stream_until(addr, "", "{\"type\":\"hello\"").await.0);
            let (d, n) = stream_until(addr, "last=true", "{\"type\":\"synced\"").await;
            synced.push(d);
            frames = n;
            let t0 = Instant::now();
            let (status, _, body) = support::http::get(addr, "/v1/last").await;
            assert_eq!(status, 200);
            assert_eq!(body.matches("\"last\":true").count(), topics);
            http.push(t0.elapsed());
            retained.push(mosquitto_retained(port, topics, run).await);
        }
        assert_eq!(frames, topics + 2, "hello, one frame per topic, synced");
        println!("last values: {topics} topics, {runs} runs each, median / p90");
        for (name, v) in [
            ("connect -> hello (no last values)", &mut hello),
            ("connect -> synced (last=true)", &mut synced),
            ("GET /v1/last (whole array)", &mut http),
            (
                "mosquitto: connect+subscribe # -> all retained",
                &mut retained,
            ),
        ] {
            let (p50, p90) = (percentile(v, 0.5), percentile(v, 0.9));
            println!("  {name:<48} {:>10} {:>10}", ms(p50), ms(p90));
        }
        let ratio = percentile(&mut retained, 0.5).as_secs_f64()
            / percentile(&mut synced, 0.5).as_secs_f64();
        println!("  mosquitto retained / gateway last=true (median): {ratio:.2}x");
        server.stop().await;
    });
}
