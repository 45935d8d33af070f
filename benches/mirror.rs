//! Throughput of the MQTT mirror: journal → mirror → mosquitto (QoS 1) → a subscriber,
//! with acknowledgement-coupled settlement (`required = true`: the producer, standing in
//! for the source, keeps at most `unsettled` events unacknowledged), against the same
//! producer with the mirror off (a journal reader stands in for a panel).
//!
//! Then the whole gateway: the ASB emulator → source → journal (→ mirror → mosquitto →
//! subscriber) → complete, with the mirror on and off, in the same run.
//!
//! Run: `cargo bench --bench mirror` (needs mosquitto: scripts/setup/mirror.sh).
//! Optional: `MIRROR_BENCH_EVENTS=50000`, `MIRROR_BENCH_GATEWAY_EVENTS=10000`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use asb_gateway::app::Context;
use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::event::{ContentType, EncodedEvent, EventMeta, IdString, Topic};
use asb_gateway::{mirror, shutdown};
use tokio::sync::mpsc;

const CS: &str = "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true";
const UNSETTLED: usize = 256;

fn context(mqtt: Option<String>) -> Arc<Context> {
    let text = format!(
        "[source]\nconnection_string = \"{CS}\"\n[[source.subscriptions]]\n\
         topic = \"operational-events\"\nsubscription = \"edge\"\n\
         [journal]\nevents = 4096\nunsettled = {UNSETTLED}\n[budget]\nmemory_mib = 256\n{}",
        mqtt.map(|m| format!("[mqtt]\n{m}\n")).unwrap_or_default()
    );
    Context::new(Config::parse(&text, &LoadEnv::default()).unwrap())
}

fn event(seq: u64) -> EncodedEvent {
    let meta = EventMeta {
        message_id: Some(IdString::try_from(format!("m-{seq}").as_str()).unwrap()),
        content_type: Some(ContentType::try_from("application/json").unwrap()),
        subject: Some(IdString::try_from("temp").unwrap()),
        ..Default::default()
    };
    let topic = Topic::try_from(format!("line{}/temp", seq % 4).as_str()).unwrap();
    // about 200 bytes of JSON body
    let body = format!(
        "{{\"seq\":{seq},\"line\":\"line{}\",\"sensor\":\"temp\",\"value\":21.5,\"unit\":\"C\",\
         \"status\":\"ok\",\"note\":\"{}\"}}",
        seq % 4,
        "x".repeat(90)
    );
    EncodedEvent::encode(seq, &topic, &meta, body.as_bytes())
}

/// Wait until the subscriber has `n` messages; a bench must not hang.
async fn wait_count(count: &AtomicU64, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while count.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "subscriber got {} of {n}",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Mirror on: the producer appends pinned events, keeping at most UNSETTLED not yet
/// acknowledged, as the source does. Returns events/s until the subscriber has all.
async fn mirror_on(port: u16, n: u64, inflight: usize, protocol: &str) -> (f64, f64) {
    let prefix = format!("bench/{inflight}/{}", protocol.replace('.', ""));
    let ctx = context(Some(format!(
        "url = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"bench-gw-{inflight}-{protocol}\"\n\
         prefix = \"{prefix}\"\ninflight = {inflight}\nprotocol = \"{protocol}\"\nqos = 1\n"
    )));
    let (count, sub) = support::mqtt::counter(port, &format!("{prefix}/#")).await;
    let (trigger, sd) = shutdown::channel();
    let (ack_tx, mut ack_rx) = mpsc::channel(UNSETTLED);
    let task = tokio::spawn({
        let (settings, shared) = ctx.mirror_inputs().expect("[mqtt]");
        mirror::run(settings, shared, ack_tx, sd)
    });
    while ctx.metrics.mirror_state.get() != asb_gateway::metrics::PartState::Up {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start = Instant::now();
    let mut next = 1u64;
    let mut acked = 0u64;
    while acked < n {
        while next <= n && (next - 1 - acked) < UNSETTLED as u64 {
            ctx.journal.append(event(next), true).unwrap();
            next += 1;
        }
        // Unpin on each handoff, as the source does.
        if let Some(h) = ack_rx.recv().await {
            ctx.journal.handed_on(h.seq());
            acked += 1;
        }
        while let Ok(h) = ack_rx.try_recv() {
            ctx.journal.handed_on(h.seq());
            acked += 1;
        }
    }
    let acked_at = start.elapsed();
    wait_count(&count, n).await;
    let all = start.elapsed();
    trigger.fire();
    let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    sub.abort();
    (
        n as f64 / acked_at.as_secs_f64(),
        n as f64 / all.as_secs_f64(),
    )
}

/// Mirror off: the same producer, unpinned appends, one journal reader.
async fn mirror_off(n: u64) -> f64 {
    let ctx = context(None);
    let reader_ctx = ctx.clone();
    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut rx = reader_ctx.journal.subscribe();
        let mut cursor = 1u64;
        let mut got = 0u64;
        let mut buf = Vec::with_capacity(256);
        while got < n {
            buf.clear();
            reader_ctx.journal.read(&mut cursor, &mut buf, 256);
            got += buf.len() as u64;
            if buf.is_empty() {
                let _ = rx.changed().await;
            }
        }
    });
    for seq in 1..=n {
        ctx.journal.append(event(seq), false).unwrap();
        if seq % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
    reader.await.unwrap();
    n as f64 / start.elapsed().as_secs_f64()
}

/// emulator → source → journal (→ mirror → mosquitto QoS 1 → subscriber) → complete.
/// N messages are loaded into the emulator first; the time runs from starting the
/// gateway until the emulator has N completed (and, with the mirror, the subscriber has
/// all N). Returns events/s.
async fn gateway_path(port: u16, n: u64, with_mirror: bool) -> f64 {
    use asb_gateway::emulator::client::Publisher;
    let emu = support::emulator::start_default().await;
    let mut p = Publisher::connect(&emu.connection_string(), "operational-events")
        .await
        .unwrap();
    let body = format!(
        "{{\"value\":21.5,\"unit\":\"C\",\"note\":\"{}\"}}",
        "x".repeat(150)
    );
    for i in 0..n {
        let line = format!("line{}", i % 4);
        p.send_json(
            "temp",
            &[("line", line.as_str())],
            body.clone(),
            "application/json",
        )
        .await
        .unwrap();
    }
    let _ = p.close().await;
    let prefix = format!("gw/{with_mirror}");
    let mqtt = with_mirror.then(|| {
        format!(
            "url = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"bench-gwpath\"\n\
             prefix = \"{prefix}\"\ninflight = 32\nqos = 1\nrequired = true\n"
        )
    });
    let text = format!(
        "[source]\nconnection_string = \"{}\"\n[[source.subscriptions]]\n\
         topic = \"operational-events\"\nsubscription = \"edge\"\n\
         [journal]\nevents = 4096\nunsettled = {UNSETTLED}\n[budget]\nmemory_mib = 256\n{}",
        emu.connection_string(),
        mqtt.map(|m| format!("[mqtt]\n{m}\n")).unwrap_or_default()
    );
    let ctx = Context::new(Config::parse(&text, &LoadEnv::default()).unwrap());
    let sub = if with_mirror {
        Some(support::mqtt::counter(port, &format!("{prefix}/#")).await)
    } else {
        None
    };
    let (trigger, sd) = shutdown::channel();
    let (ack_tx, ack_rx) = mpsc::channel(UNSETTLED * 2);
    let start = Instant::now();
    let cx = ctx.source_context();
    let src = tokio::spawn(asb_gateway::source::run(cx, ack_rx, sd.clone()));
    let mir = if with_mirror {
        Some(tokio::spawn({
            let (settings, shared) = ctx.mirror_inputs().expect("[mqtt]");
            mirror::run(settings, shared, ack_tx, sd)
        }))
    } else {
        drop(ack_tx);
        None
    };
    let entity = "operational-events/Subscriptions/edge";
    while emu.stats()[entity].completed < n {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if let Some((count, _)) = &sub {
        wait_count(count, n).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    trigger.fire();
    let _ = tokio::time::timeout(Duration::from_secs(5), src).await;
    if let Some(m) = mir {
        let _ = tokio::time::timeout(Duration::from_secs(3), m).await;
    }
    if let Some((_, task)) = sub {
        task.abort();
    }
    emu.shutdown().await;
    rate
}

fn main() {
    let n: u64 = std::env::var("MIRROR_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let gw_n: u64 = std::env::var("MIRROR_BENCH_GATEWAY_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // A subscriber slower than the mirror must not have messages dropped by the broker's
    // per-client queue limit (default 1000).
    let broker = support::mosquitto::Mosquitto::start_with(support::mosquitto::MosquittoOptions {
        extra: "max_queued_messages 0\nmax_queued_bytes 0".into(),
        ..Default::default()
    });
    rt.block_on(async {
        println!("mirror bench: {n} events of ~200 B body, mosquitto on loopback, QoS 1,");
        println!("required = true (acks coupled), unsettled = {UNSETTLED}\n");
        let off = mirror_off(n).await;
        println!(
            "{:<44} {:>12.0} events/s",
            "mirror off (journal + 1 reader)", off
        );
        for (inflight, proto) in [(32, "5"), (8, "5"), (128, "5"), (32, "3.1.1")] {
            let (acked, delivered) = mirror_on(broker.port, n, inflight, proto).await;
            println!(
                "{:<44} {:>12.0} events/s acked, {:>8.0} events/s at the subscriber",
                format!("mirror on, MQTT {proto}, inflight {inflight}"),
                acked,
                delivered
            );
        }
        println!("\ngateway: {gw_n} messages preloaded in the emulator, unsettled = {UNSETTLED}");
        let off = gateway_path(broker.port, gw_n, false).await;
        println!(
            "{:<44} {:>12.0} events/s completed",
            "emulator -> gateway, mirror off", off
        );
        let on = gateway_path(broker.port, gw_n, true).await;
        println!(
            "{:<44} {:>12.0} events/s completed and at the subscriber",
            "emulator -> gateway -> mosquitto QoS 1", on
        );
    });
}
