//! End to end with real peers: the ASB emulator (AMQP 1.0) → the gateway's source and
//! MQTT mirror (`required = true`) → mosquitto → an MQTT subscriber. ASB messages are
//! completed only once the broker has acknowledged them.

use crate::support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use asb_gateway::app::Context;
use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::emulator::client::Publisher;
use asb_gateway::emulator::{self, EmulatorHandle, EmulatorOptions};
use asb_gateway::metrics::PartState;
use asb_gateway::{mirror, shutdown, source};
use support::Subscriber;
use support::daemon::Daemon;
use support::mosquitto::{Mosquitto, MosquittoOptions};
use tokio::sync::mpsc;

const ENTITY: &str = "operational-events/Subscriptions/edge";
const UNSETTLED: u64 = 16;
const WAIT: Duration = Duration::from_secs(20);

struct Gateway {
    ctx: Arc<Context>,
    trigger: shutdown::Trigger,
    source: tokio::task::JoinHandle<()>,
    mirror: tokio::task::JoinHandle<()>,
}

fn gateway(emu: &EmulatorHandle, broker: &Mosquitto, tag: &str) -> Gateway {
    let text = format!(
        "[source]\nconnection_string = \"{cs}\"\n[[source.subscriptions]]\n\
         topic = \"operational-events\"\nsubscription = \"edge\"\n\
         [journal]\nevents = 256\nunsettled = {UNSETTLED}\n\
         [mqtt]\nurl = \"{url}\"\nclient_id = \"e2e-{tag}-{pid}\"\nprefix = \"{tag}\"\n\
         inflight = 8\nrequired = true\nkeep_alive_secs = 5\n",
        cs = emu.connection_string(),
        url = broker.url(),
        pid = std::process::id(),
    );
    let ctx = Context::new(Config::parse(&text, &LoadEnv::default()).unwrap());
    assert!(ctx.config.mirror_required());
    let (trigger, sd) = shutdown::channel();
    let (ack_tx, ack_rx) = mpsc::channel(UNSETTLED as usize * 2);
    let source = tokio::spawn({
        let cx = ctx.source_context();
        let sd = sd.clone();
        async move { source::run(cx, ack_rx, sd).await.expect("source") }
    });
    let mirror = tokio::spawn({
        let ctx = ctx.clone();
        async move {
            let (settings, shared) = ctx.mirror_inputs().expect("[mqtt]");
            mirror::run(settings, shared, ack_tx, sd)
                .await
                .expect("mirror")
        }
    });
    Gateway {
        ctx,
        trigger,
        source,
        mirror,
    }
}

impl Gateway {
    async fn stop(self) {
        self.trigger.fire();
        tokio::time::timeout(Duration::from_secs(6), async {
            let _ = self.source.await;
            let _ = self.mirror.await;
        })
        .await
        .expect("gateway stops in time");
    }
}

use support::emulator::start_default as emulator;

async fn send(emu: &EmulatorHandle, from: u64, to: u64) {
    let mut p = tokio::time::timeout(
        WAIT,
        Publisher::connect(&emu.connection_string(), "operational-events"),
    )
    .await
    .unwrap()
    .unwrap();
    for n in from..=to {
        let line = format!("line{}", n % 3);
        p.send_json(
            &format!("{line}-temp"),
            &[("line", line.as_str())],
            format!("{{\"n\":{n}}}"),
            "application/json",
        )
        .await
        .unwrap();
    }
    let _ = p.close().await;
}

async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Body `n` of every event message seen, with how often it was seen.
async fn collect(sub: &mut Subscriber, want: u64, seen: &mut BTreeMap<u64, u32>) -> Vec<u64> {
    let mut order = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while (1..=want).any(|n| !seen.contains_key(&n)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(r) = sub.next(left).await else {
            panic!("lost events: have {:?}", seen.keys().collect::<Vec<_>>());
        };
        if r.topic.ends_with("/status") {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        let n = v["n"].as_u64().unwrap();
        assert_eq!(
            r.topic.split('/').nth(1),
            Some(format!("line{}-temp", n % 3).as_str())
        );
        assert_eq!(r.user("content_type"), Some("application/json"));
        assert!(r.user("message_id").is_some());
        *seen.entry(n).or_default() += 1;
        order.push(n);
    }
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_from_the_emulator_to_an_mqtt_subscriber_and_are_completed() {
    let broker = Mosquitto::start();
    let emu = emulator().await;
    let mut sub = Subscriber::start(broker.port, "e2e/#", false).await;
    let gw = gateway(&emu, &broker, "e2e");
    let n = 60;
    send(&emu, 1, n).await;
    let mut seen = BTreeMap::new();
    let order = collect(&mut sub, n, &mut seen).await;
    assert_eq!(order, (1..=n).collect::<Vec<_>>(), "in order, once each");
    wait_until("all completed", || emu.stats()[ENTITY].completed == n).await;
    let s = &emu.stats()[ENTITY];
    assert_eq!((s.active, s.locked, s.dead_lettered), (0, 0, 0));
    assert_eq!(gw.ctx.metrics.mqtt_acked.get(), n);
    assert_eq!(gw.ctx.metrics.mirror_state.get(), PartState::Up);
    gw.stop().await;
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_broker_is_down_messages_wait_in_asb() {
    let mut broker = Mosquitto::start_with(MosquittoOptions {
        persistent: true,
        ..Default::default()
    });
    let emu = emulator().await;
    let mut sub = Subscriber::start(broker.port, "down/#", true).await;
    let gw = gateway(&emu, &broker, "down");
    send(&emu, 1, 10).await;
    let mut seen = BTreeMap::new();
    collect(&mut sub, 10, &mut seen).await;
    wait_until("first 10 completed", || emu.stats()[ENTITY].completed == 10).await;

    broker.stop();
    wait_until("mirror down", || {
        gw.ctx.metrics.mirror_state.get() == PartState::Down
    })
    .await;
    let m = 50;
    send(&emu, 11, 10 + m).await;
    // Give the source time to take what it may.
    wait_until("window full", || emu.stats()[ENTITY].locked == UNSETTLED).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = emu.stats()[ENTITY].clone();
    assert_eq!(
        s.completed, 10,
        "nothing completed while the broker is down"
    );
    assert!(s.locked <= UNSETTLED, "at most `unsettled` left: {s:?}");
    assert_eq!(s.active + s.locked, m, "the rest wait in ASB: {s:?}");
    assert_eq!(
        gw.ctx.metrics.credit.get(),
        0,
        "no credit while the window is full"
    );

    broker.start_again();
    wait_until("all completed", || emu.stats()[ENTITY].completed == 10 + m).await;
    collect(&mut sub, 10 + m, &mut seen).await;
    while let Some(r) = sub.next(Duration::from_millis(300)).await {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.payload) {
            *seen.entry(v["n"].as_u64().unwrap()).or_default() += 1;
        }
    }
    let duplicates: u32 = seen.values().map(|c| c - 1).sum();
    eprintln!(
        "e2e broker down: {} messages, 0 lost, {duplicates} duplicate(s) at the subscriber, \
         {} re-sent by the mirror",
        10 + m,
        gw.ctx.metrics.mqtt_republished.get()
    );
    assert_eq!(seen.len() as u64, 10 + m, "zero lost");
    let s = &emu.stats()[ENTITY];
    assert_eq!((s.active, s.locked, s.dead_lettered), (0, 0, 0));
    gw.stop().await;
    emu.shutdown().await;
}

/// The real daemon in its own process: `online` while it runs and mirrors, and the
/// broker publishes the last will `offline` when the process is killed with SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_daemon_leaves_offline_by_last_will() {
    let broker = Mosquitto::start();
    let emu = emulator().await;
    let dir = support::TempDir::new("e2e-kill");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nconnection_string = \"{cs}\"\n[[source.subscriptions]]\n\
             topic = \"operational-events\"\nsubscription = \"edge\"\n\
             [panels]\nlisten = \"127.0.0.1:0\"\n\
             [mqtt]\nurl = \"{url}\"\nclient_id = \"e2e-kill-{pid}\"\nprefix = \"kill\"\n",
            cs = emu.connection_string(),
            url = broker.url(),
            pid = std::process::id(),
        ),
    )
    .unwrap();
    let mut watcher = Subscriber::start(broker.port, "kill/#", false).await;
    let mut daemon = Daemon::with_config_file(&config).start();
    let online = watcher.next(WAIT).await.expect("status from the daemon");
    assert_eq!(
        (online.topic.as_str(), &online.payload[..]),
        ("kill/status", &b"online"[..]),
        "{}",
        daemon.log_text()
    );
    send(&emu, 1, 5).await;
    let mut seen = BTreeMap::new();
    collect(&mut watcher, 5, &mut seen).await;
    wait_until("completed", || emu.stats()[ENTITY].completed == 5).await;

    daemon.kill();
    let will = loop {
        let r = watcher.next(WAIT).await.expect("last will after SIGKILL");
        if r.topic == "kill/status" {
            break r;
        }
    };
    assert_eq!(&will.payload[..], b"offline");
    let mut late = Subscriber::start(broker.port, "kill/status", false).await;
    let retained = late.next(Duration::from_secs(5)).await.expect("retained");
    assert_eq!(
        (&retained.payload[..], retained.retain),
        (&b"offline"[..], true)
    );
    emu.shutdown().await;
}

/// Emulator with LockDuration 2 s and MaxDeliveryCount 3 on the subscription.
async fn short_lock_emulator() -> EmulatorHandle {
    let mut entities = emulator::Entities::default_entities();
    entities.topics[0].subscriptions = vec![emulator::EntityConfig::new(
        "edge",
        Duration::from_secs(2),
        3,
    )];
    support::emulator::start(EmulatorOptions {
        entities,
        ..Default::default()
    })
    .await
}

/// A broker outage longer than MaxDeliveryCount × LockDuration, with events arriving
/// during it: the held locks are renewed, so nothing is redelivered or dead-lettered;
/// every message is mirrored and completed once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_locks_are_renewed_through_a_broker_outage_longer_than_the_lock() {
    let emu = short_lock_emulator().await;
    let mut broker = Mosquitto::start_with(MosquittoOptions {
        persistent: true,
        ..Default::default()
    });
    let mut sub = Subscriber::start(broker.port, "renew/#", true).await;
    let gw = gateway(&emu, &broker, "renew");
    wait_until("mirror up", || {
        gw.ctx.metrics.mirror_state.get() == PartState::Up
    })
    .await;
    send(&emu, 1, 10).await;
    let mut seen = BTreeMap::new();
    collect(&mut sub, 10, &mut seen).await;
    wait_until("10 completed", || emu.stats()[ENTITY].completed == 10).await;

    broker.stop();
    wait_until("mirror down", || {
        gw.ctx.metrics.mirror_state.get() == PartState::Down
    })
    .await;
    send(&emu, 11, 30).await;
    // 4.5 lock durations, longer than MaxDeliveryCount (3) × LockDuration (2 s).
    tokio::time::sleep(Duration::from_secs(9)).await;
    let s = emu.stats()[ENTITY].clone();
    assert_eq!(
        s.dead_lettered, 0,
        "nothing dead-lettered during the outage: {s:?}"
    );
    assert_eq!(
        s.delivered,
        10 + UNSETTLED,
        "no redelivery while held: {s:?}"
    );
    assert!(s.renewed > 0, "{s:?}");
    assert!(gw.ctx.metrics.lock_renewals.get() > 0);

    broker.start_again();
    sub.wait_subscribed(2).await;
    collect(&mut sub, 30, &mut seen).await;
    wait_until("30 completed", || emu.stats()[ENTITY].completed == 30).await;
    let s = emu.stats()[ENTITY].clone();
    assert_eq!(s.dead_lettered, 0, "{s:?}");
    assert_eq!(
        s.delivered, 30,
        "each message delivered once (delivery count 1): {s:?}"
    );
    assert_eq!(gw.ctx.metrics.locks_lost.get(), 0);
    gw.stop().await;
}

/// Renewal refused (lock lost): the broker's redelivery takes the place of the held
/// delivery, and the message is completed once with the valid lock, nothing
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lock_is_replaced_by_the_redelivery_and_completed_once() {
    let emu = short_lock_emulator().await;
    let mut broker = Mosquitto::start_with(MosquittoOptions {
        persistent: true,
        ..Default::default()
    });
    let mut sub = Subscriber::start(broker.port, "lost/#", true).await;
    let gw = gateway(&emu, &broker, "lost");
    wait_until("mirror up", || {
        gw.ctx.metrics.mirror_state.get() == PartState::Up
    })
    .await;
    broker.stop();
    wait_until("mirror down", || {
        gw.ctx.metrics.mirror_state.get() == PartState::Down
    })
    .await;
    assert!(emu.fail_renewals(ENTITY, None));
    send(&emu, 1, 5).await;
    wait_until("the 5 locks lost", || gw.ctx.metrics.locks_lost.get() >= 5).await;
    // Renewals work again as soon as the 5 locks are known lost (a lost lock is never
    // renewed again), before the redeliveries come: waiting for the redeliveries first
    // raced their own renewal, due half a lock (1 s) later, on a loaded machine.
    assert!(emu.fail_renewals(ENTITY, Some(0)));
    wait_until("the redeliveries adopted", || {
        emu.stats()[ENTITY].delivered >= 10
    })
    .await;
    broker.start_again();
    sub.wait_subscribed(2).await;
    let mut seen = BTreeMap::new();
    collect(&mut sub, 5, &mut seen).await;
    wait_until("5 completed", || emu.stats()[ENTITY].completed == 5).await;
    let s = emu.stats()[ENTITY].clone();
    assert_eq!(s.dead_lettered, 0, "{s:?}");
    assert!(gw.ctx.metrics.lock_renewal_failures.get() >= 1);
    // Completed once each: nothing still locked or active.
    assert_eq!((s.active, s.locked), (0, 0), "{s:?}");
    gw.stop().await;
}
