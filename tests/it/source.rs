//! The source against the ASB emulator over real AMQP 1.0 on loopback: end to end,
//! credit-by-demand back-pressure, dead-lettering, faults (restart, link detach),
//! graceful shutdown, several subscriptions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::source::*;
use asb_gateway::app::Context;
use asb_gateway::emulator::client::Publisher;
use asb_gateway::emulator::{EmulatorHandle, EntityStats};
use asb_gateway::journal::Handoff;
use fe2o3_amqp::types::messaging::{Body, Data, Message, Properties};
use fe2o3_amqp::types::primitives::{Binary, Value};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(15);
fn config(h: &EmulatorHandle, subs: &[&str], extra: &str) -> String {
    let mut s = format!(
        "[source]\nconnection_string = \"{}\"\n",
        h.connection_string()
    );
    for sub in subs {
        s += &format!("[[source.subscriptions]]\ntopic = \"{TOPIC}\"\nsubscription = \"{sub}\"\n");
    }
    s + extra
}

/// A required mirror (never started: acks come from the test).
const MIRROR: &str = "[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\nrequired = true\n";

async fn publisher(h: &EmulatorHandle) -> Publisher {
    tokio::time::timeout(T, Publisher::connect(&h.connection_string(), TOPIC))
        .await
        .expect("publisher connects in time")
        .expect("publisher connects")
}

async fn send_n(p: &mut Publisher, from: usize, to: usize) {
    for i in from..to {
        tokio::time::timeout(
            T,
            p.send_json(
                "temp",
                &[("line", "line1")],
                format!(r#"{{"i":{i}}}"#),
                "application/json",
            ),
        )
        .await
        .expect("send in time")
        .expect("send");
    }
}

fn stats(h: &EmulatorHandle, sub: &str) -> EntityStats {
    h.stats()
        .get(&format!("{TOPIC}/Subscriptions/{sub}"))
        .cloned()
        .unwrap_or_default()
}

async fn wait_stats(h: &EmulatorHandle, sub: &str, what: &str, ok: impl Fn(&EntityStats) -> bool) {
    wait_for(T, what, || ok(&stats(h, sub))).await;
}

fn body_i(ev: &asb_gateway::event::EncodedEvent) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&ev.body()).unwrap();
    v["i"].as_u64().unwrap()
}

fn asb_seqs(ctx: &Context) -> Vec<i64> {
    events(ctx)
        .iter()
        .map(|e| e.frame().unwrap().asb_seq.unwrap())
        .collect()
}

/// Acknowledges every event appended to the journal, as the mirror would, unless paused.
fn acker(ctx: Arc<Context>, acks: mpsc::Sender<Handoff>, paused: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let mut next = 1u64;
        let mut latest = ctx.journal.subscribe();
        loop {
            while !paused.load(Ordering::SeqCst) && next <= ctx.journal.latest() {
                if acks.send(Handoff::Delivered(next)).await.is_err() {
                    return;
                }
                next += 1;
            }
            tokio::select! {
                r = latest.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
}

#[tokio::test]
async fn end_to_end_in_order_each_completed_once() {
    let h = start_emulator(
        entities(Duration::from_secs(30), &["edge"]),
        None,
        "127.0.0.1:0",
    )
    .await;
    let mut p = publisher(&h).await;
    send_n(&mut p, 0, 50).await;
    let run = start(context(&config(&h, &["edge"], "")), fast());
    let ctx = run.ctx.clone();
    wait_for(T, "50 events", || ctx.journal.latest() == 50).await;
    let evs = events(&ctx);
    assert_eq!(
        evs.iter().map(|e| body_i(e)).collect::<Vec<_>>(),
        (0..50).collect::<Vec<_>>()
    );
    assert_eq!(asb_seqs(&ctx), (1..=50).collect::<Vec<_>>());
    let f = evs[0].frame().unwrap();
    assert_eq!(f.topic, "temp");
    assert_eq!(f.subject, Some("temp"));
    assert_eq!(f.content_type, Some("application/json"));
    assert_eq!(f.props, vec![("line", "line1")]);
    assert!(f.enqueued_at_ms.is_some() && f.message_id.is_some());
    let json: serde_json::Value = serde_json::from_str(&evs[3].json).unwrap();
    assert_eq!(json["body"]["i"], 3);
    wait_stats(&h, "edge", "all completed", |s| {
        s.completed == 50 && s.active == 0 && s.locked == 0
    })
    .await;
    // more while running
    send_n(&mut p, 50, 60).await;
    wait_stats(&h, "edge", "60 completed", |s| s.completed == 60).await;
    let s = stats(&h, "edge");
    assert_eq!((s.active, s.locked, s.delivered), (0, 0, 60), "{s:?}");
    let m = &ctx.metrics;
    assert_eq!(
        (m.received.get(), m.completed.get(), m.duplicates.get()),
        (60, 60, 0)
    );
    assert_eq!(ctx.journal.latest(), 60);
    assert_eq!(m.source_state.get().as_str(), "up");
    run.stop().await.unwrap();
    assert_eq!(ctx.metrics.source_state.get().as_str(), "down");
    h.shutdown().await;
}

#[tokio::test]
async fn back_pressure_credit_never_exceeds_the_window() {
    let h = start_emulator(
        entities(Duration::from_secs(30), &["edge"]),
        None,
        "127.0.0.1:0",
    )
    .await;
    let mut p = publisher(&h).await;
    send_n(&mut p, 0, 30).await;
    let extra = format!("[journal]\nunsettled = 4\n{MIRROR}");
    let run = start(context(&config(&h, &["edge"], &extra)), fast());
    let ctx = run.ctx.clone();
    wait_for(T, "4 events", || ctx.journal.latest() == 4).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The mirror never acknowledged: nothing more was pulled, nothing settled.
    assert_eq!(ctx.journal.latest(), 4);
    assert_eq!(ctx.journal.pinned(), 4);
    let s = stats(&h, "edge");
    assert_eq!((s.locked, s.active, s.completed), (4, 26, 0), "{s:?}");
    assert!(s.max_locked <= 4, "{s:?}");
    assert_eq!(s.credit, 0, "{s:?}");
    assert_eq!(ctx.metrics.credit.get(), 0);
    assert_eq!(ctx.metrics.unsettled.get(), 4);
    // Acknowledge as the mirror would: everything flows, never more than 4 locked.
    acker(
        ctx.clone(),
        run.acks.clone(),
        Arc::new(AtomicBool::new(false)),
    );
    wait_stats(&h, "edge", "30 completed", |s| s.completed == 30).await;
    let s = stats(&h, "edge");
    assert_eq!((s.active, s.locked), (0, 0), "{s:?}");
    // (While acks flow, the emulator's `max_locked` is not exact: it applies our
    // dispositions in spawned tasks, after it may already have acted on the flow that
    // followed them on the wire. The gateway's own bound is checked below.)
    assert!(ctx.metrics.unsettled.get() <= 4);
    assert_eq!(ctx.journal.latest(), 30);
    wait_for(T, "all handed on", || ctx.journal.pinned() == 0).await;
    assert_eq!(ctx.metrics.completed.get(), 30);
    run.stop().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn oversize_and_undecodable_are_dead_lettered_and_the_stream_continues() {
    capture_all_logs();
    let h = start_emulator(
        entities(Duration::from_secs(30), &["edge"]),
        None,
        "127.0.0.1:0",
    )
    .await;
    let mut p = publisher(&h).await;
    send_n(&mut p, 0, 1).await;
    // body over journal.max_event_bytes (64)
    let big = Message::builder()
        .properties(Properties::builder().message_id("big".to_string()).build())
        .data(Data(Binary::from(vec![b'x'; 200])))
        .build();
    p.send(big).await.unwrap();
    // no body section at all
    let empty: Message<Body<Value>> = Message::builder()
        .properties(
            Properties::builder()
                .message_id("empty".to_string())
                .build(),
        )
        .body(Body::Empty)
        .build();
    p.send(empty).await.unwrap();
    send_n(&mut p, 1, 2).await;
    let extra = "[journal]\nmax_event_bytes = 64\n";
    let run = start(context(&config(&h, &["edge"], extra)), fast());
    let ctx = run.ctx.clone();
    wait_stats(&h, "edge", "2 completed, 2 dead-lettered", |s| {
        s.completed == 2 && s.dead_lettered == 2
    })
    .await;
    assert_eq!(
        events(&ctx).iter().map(|e| body_i(e)).collect::<Vec<_>>(),
        vec![0, 1]
    );
    let mut dl = h.dead_letters(&format!("{TOPIC}/Subscriptions/edge"));
    dl.sort_by_key(|d| d.sequence_number);
    assert_eq!(dl.len(), 2, "{dl:?}");
    assert_eq!(dl[0].message_id.as_deref(), Some("big"));
    assert_eq!(dl[0].reason.as_deref(), Some("PayloadTooLarge"));
    assert!(
        dl[0].description.as_deref().unwrap().contains("200"),
        "{dl:?}"
    );
    assert_eq!(dl[1].message_id.as_deref(), Some("empty"));
    assert_eq!(dl[1].reason.as_deref(), Some("Undecodable"));
    let m = &ctx.metrics;
    assert_eq!(
        (
            m.dead_lettered
                .of(asb_gateway::metrics::DeadLetterReason::PayloadTooLarge)
                .get(),
            m.dead_lettered
                .of(asb_gateway::metrics::DeadLetterReason::Undecodable)
                .get()
        ),
        (1, 1)
    );
    assert!(
        m.render()
            .contains("asbgw_dead_lettered_total{reason=\"PayloadTooLarge\"} 1")
    );
    run.stop().await.unwrap();
    h.shutdown().await;
}

/// Completions are sent together: 100 acknowledgements that arrive at once settle the
/// 100 messages with a few `disposition` frames carrying ranges (AMQP 1.0 §2.7.6), not
/// one frame per message.
#[tokio::test]
async fn acknowledgements_arriving_together_are_settled_as_ranges() {
    let h = start_emulator(
        entities(Duration::from_secs(60), &["edge"]),
        None,
        "127.0.0.1:0",
    )
    .await;
    let mut p = publisher(&h).await;
    send_n(&mut p, 0, 100).await;
    let extra = format!("[journal]\nunsettled = 100\n{MIRROR}");
    let run = start(context(&config(&h, &["edge"], &extra)), fast());
    let ctx = run.ctx.clone();
    wait_for(T, "100 held by the source", || ctx.journal.pinned() == 100).await;
    let before = h.dispositions_received();
    // One runtime thread: all 100 are queued before the source runs again.
    for seq in 1..=100 {
        run.acks.send(Handoff::Delivered(seq)).await.unwrap();
    }
    wait_stats(&h, "edge", "100 completed", |s| s.completed == 100).await;
    let frames = h.dispositions_received() - before;
    assert!(
        (1..=4).contains(&frames),
        "100 completions took {frames} disposition frames"
    );
    assert_eq!(ctx.metrics.completed.get(), 100);
    let s = stats(&h, "edge");
    assert_eq!((s.active, s.locked), (0, 0), "{s:?}");
    run.stop().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_releases_held_deliveries() {
    let h = start_emulator(
        entities(Duration::from_secs(60), &["edge"]),
        None,
        "127.0.0.1:0",
    )
    .await;
    let mut p = publisher(&h).await;
    send_n(&mut p, 0, 10).await;
    let extra = format!("[journal]\nunsettled = 5\n{MIRROR}");
    let run = start(context(&config(&h, &["edge"], &extra)), fast());
    let ctx = run.ctx.clone();
    wait_stats(&h, "edge", "5 locked", |s| s.locked == 5).await;
    // Locked at the emulator is not yet held by the source: wait until the source has
    // taken all 5 (pinned in the journal) before stopping it.
    wait_for(T, "5 held by the source", || ctx.journal.pinned() == 5).await;
    let t0 = Instant::now();
    run.stop().await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(ctx.metrics.released.get(), 5);
    // Released, not left to the 60 s lock: back in the subscription at once.
    wait_stats(&h, "edge", "all active again", |s| {
        s.active == 10 && s.locked == 0
    })
    .await;
    assert_eq!(stats(&h, "edge").completed, 0);
    h.shutdown().await;
}

#[tokio::test]
async fn two_subscriptions_two_links_each_event_once_per_subscription() {
    let h = start_emulator(
        entities(Duration::from_secs(30), &["a", "b"]),
        None,
        "127.0.0.1:0",
    )
    .await;
    let mut p = publisher(&h).await;
    send_n(&mut p, 0, 20).await;
    let extra = "[journal]\nunsettled = 6\n[routing]\ntopic = \"{subscription}/{subject}\"\n";
    let run = start(context(&config(&h, &["a", "b"], extra)), fast());
    let ctx = run.ctx.clone();
    wait_for(T, "40 events", || ctx.journal.latest() == 40).await;
    for sub in ["a", "b"] {
        let topic = format!("{sub}/temp");
        let got: Vec<u64> = events(&ctx)
            .iter()
            .filter(|e| e.topic.as_str() == topic)
            .map(|e| body_i(e))
            .collect();
        assert_eq!(got, (0..20).collect::<Vec<_>>(), "{sub}");
        wait_stats(&h, sub, "20 completed", |s| {
            s.completed == 20 && s.active == 0
        })
        .await;
        assert!(stats(&h, sub).max_locked <= 6);
    }
    run.stop().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn forced_link_detach_is_reattached_without_loss() {
    let h = start_emulator(
        entities(Duration::from_millis(800), &["edge"]),
        None,
        "127.0.0.1:0",
    )
    .await;
    let mut p = publisher(&h).await;
    send_n(&mut p, 0, 20).await;
    let extra = format!("[journal]\nunsettled = 5\n{MIRROR}");
    let run = start(context(&config(&h, &["edge"], &extra)), fast());
    let ctx = run.ctx.clone();
    // The mirror holds back: 5 deliveries are held unsettled when the link is detached.
    let paused = Arc::new(AtomicBool::new(true));
    acker(ctx.clone(), run.acks.clone(), paused.clone());
    wait_for(T, "5 held", || ctx.journal.latest() == 5).await;
    h.detach_links();
    wait_for(T, "link loss seen", || {
        ctx.metrics.abandoned_on_link_loss.get() == 5
    })
    .await;
    // The mirror catches up; the broker redelivers the 5 after their lock expires.
    paused.store(false, Ordering::SeqCst);
    send_n(&mut p, 20, 30).await;
    wait_stats(&h, "edge", "30 completed", |s| {
        s.completed == 30 && s.active == 0 && s.locked == 0
    })
    .await;
    wait_for(T, "30 events", || ctx.journal.latest() == 30).await;
    // Redeliveries of abandoned messages were not appended twice.
    let mut seqs = asb_seqs(&ctx);
    seqs.sort();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    let m = &ctx.metrics;
    assert!(m.duplicates.get() >= 5, "{} duplicates", m.duplicates.get());
    assert_eq!(m.source_state.get().as_str(), "up");
    assert_eq!(
        m.source_reconnects.get(),
        0,
        "link re-attached on the same connection"
    );
    run.stop().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn emulator_killed_and_restarted_reconnects_without_loss_or_duplicates() {
    let h = start_emulator(
        entities(Duration::from_millis(800), &["edge"]),
        None,
        "127.0.0.1:0",
    )
    .await;
    let addr = h.addr().to_string();
    let mut p = publisher(&h).await;
    send_n(&mut p, 0, 30).await;
    drop(p);
    let extra = format!("[journal]\nunsettled = 6\n{MIRROR}");
    let run = start(context(&config(&h, &["edge"], &extra)), fast());
    let ctx = run.ctx.clone();
    let paused = Arc::new(AtomicBool::new(true));
    acker(ctx.clone(), run.acks.clone(), paused.clone());
    wait_for(T, "6 held", || ctx.journal.latest() == 6).await;
    // Kill the broker mid-stream, keep its messages, restart it on the same port.
    let store = h.store();
    h.shutdown().await;
    wait_for(T, "source down", || {
        ctx.metrics.source_state.get().as_str() == "down"
    })
    .await;
    assert_eq!(ctx.metrics.abandoned_on_link_loss.get(), 6);
    // The mirror acknowledges while the broker is away (events are unpinned).
    paused.store(false, Ordering::SeqCst);
    wait_for(T, "handed on", || ctx.journal.pinned() == 0).await;
    let h = start_emulator(
        entities(Duration::from_millis(800), &["edge"]),
        Some(store),
        &addr,
    )
    .await;
    wait_stats(&h, "edge", "30 completed", |s| {
        s.completed == 30 && s.active == 0 && s.locked == 0
    })
    .await;
    wait_for(T, "30 events", || ctx.journal.latest() == 30).await;
    let mut seqs = asb_seqs(&ctx);
    seqs.sort();
    assert_eq!(
        seqs,
        (1..=30).collect::<Vec<_>>(),
        "each message once in the journal"
    );
    let m = &ctx.metrics;
    assert!(m.source_reconnects.get() >= 1);
    assert_eq!(m.source_state.get().as_str(), "up");
    assert!(m.duplicates.get() >= 6, "{} duplicates", m.duplicates.get());
    run.stop().await.unwrap();
    h.shutdown().await;
}

/// A subscription that does not exist: the broker refuses its link (`amqp:not-found`)
/// every time. Health says so per subscription, the other subscription flows, and the
/// re-attach loop backs off instead of spinning (it did 10–15 attaches a second).
#[tokio::test]
async fn a_missing_subscription_is_unhealthy_named_and_retried_with_backoff() {
    let logs = capture_all_logs();
    let h = start_emulator(
        entities(Duration::from_secs(30), &["edge"]),
        None,
        "127.0.0.1:0",
    )
    .await;
    let opts = asb_gateway::source::Options {
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(30),
        ..fast()
    };
    let run = start(context(&config(&h, &["edge", "edgee"], "")), opts);
    let ctx = run.ctx.clone();
    wait_for(T, "source up", || {
        ctx.metrics.source_state.get() == asb_gateway::metrics::PartState::Up
    })
    .await;
    let mut p = publisher(&h).await;
    send_n(&mut p, 0, 3).await;
    wait_stats(&h, "edge", "3 completed on the good subscription", |s| {
        s.completed == 3
    })
    .await;
    // A fixed observation time, counting attach attempts.
    let before = ctx.metrics.link_attaches.get();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let attaches = ctx.metrics.link_attaches.get() - before;
    // 100 ms doubling with jitter: at most ~7 in 6 s; a reset-on-attach loop made 60+.
    assert!(attaches <= 8, "{attaches} attach attempts in 6 s");
    assert!(
        !ctx.metrics.healthy(),
        "a missing subscription is unhealthy"
    );
    let health: serde_json::Value = serde_json::from_str(&ctx.metrics.health_json()).unwrap();
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["source"], "up", "{health}");
    let subs = &health["subscriptions"];
    assert_eq!(
        subs[format!("{TOPIC}/Subscriptions/edge")],
        "attached",
        "{health}"
    );
    let bad = subs[format!("{TOPIC}/Subscriptions/edgee")]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(bad.starts_with("not-found: "), "{health}");
    assert!(bad.contains("could not be found"), "{health}");
    let warned = logs
        .lines()
        .iter()
        .filter(|l| l.contains("edgee") && l.starts_with("WARN"))
        .count();
    assert_eq!(warned, 1, "one log line for the state, not one per attempt");
    drop(run.stop().await);
}

/// A session-enabled subscription (RequiresSession): the broker refuses the gateway's
/// sessionless receiver with `amqp:not-allowed`; health says so and what to change.
#[tokio::test]
async fn a_session_enabled_subscription_is_named_in_health() {
    let mut ents = entities(Duration::from_secs(30), &["edge", "sessions"]);
    ents.topics[0].subscriptions[1].requires_session = true;
    let h = start_emulator(ents, None, "127.0.0.1:0").await;
    let run = start(context(&config(&h, &["edge", "sessions"], "")), fast());
    let ctx = run.ctx.clone();
    let key = format!("{TOPIC}/Subscriptions/sessions");
    wait_for(T, "the refusal in health", || {
        let v: serde_json::Value = serde_json::from_str(&ctx.metrics.health_json()).unwrap();
        v["subscriptions"][&key]
            .as_str()
            .is_some_and(|s| s.starts_with("not-allowed"))
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&ctx.metrics.health_json()).unwrap();
    let reason = v["subscriptions"][&key].as_str().unwrap();
    assert!(reason.contains("RequiresSession"), "{reason}");
    assert_eq!(
        v["subscriptions"][format!("{TOPIC}/Subscriptions/edge")],
        "attached"
    );
    assert!(!ctx.metrics.healthy());
    drop(run.stop().await);
}
