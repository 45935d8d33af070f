//! The ASB emulator over real AMQP 1.0 on loopback, driven by fe2o3-amqp clients
//! (and by the official Python SDK in `python_sdk_sends_to_topic`).

use crate::support::amqp::{
    Client, connect_authorized, connect_with, delivery_count, put_token, recv, within,
};
use crate::support::{self, http};
use std::collections::BTreeMap;
use std::time::Duration;

use asb_gateway::emulator::client::Publisher;
use asb_gateway::emulator::{
    EmulatorHandle, EmulatorOptions, Entities, EntityConfig, EntityStats, TopicConfig,
};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::definitions::{Error as AmqpErr, ErrorCondition, Fields};
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
use fe2o3_amqp::{Connection, Delivery, Receiver};

const T: Duration = Duration::from_secs(10);

fn entities(lock: Duration, max_delivery: u32, subs: &[&str]) -> Entities {
    Entities {
        namespace: "test".into(),
        queues: vec![EntityConfig {
            name: "q1".into(),
            lock_duration: lock,
            max_delivery_count: max_delivery,
            ..Default::default()
        }],
        topics: vec![TopicConfig {
            name: "events".into(),
            subscriptions: subs
                .iter()
                .map(|s| EntityConfig {
                    name: s.to_string(),
                    lock_duration: lock,
                    max_delivery_count: max_delivery,
                    ..Default::default()
                })
                .collect(),
        }],
    }
}

async fn start(entities: Entities) -> EmulatorHandle {
    support::emulator::start(EmulatorOptions {
        entities,
        admin: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    })
    .await
}

async fn receiver(c: &mut Client, addr: &str, credit: CreditMode) -> Receiver {
    within(
        "attach receiver",
        Receiver::builder()
            .name(format!("rx-{}", fastrand::u32(..)))
            .source(addr)
            .credit_mode(credit)
            .attach(&mut c.session),
    )
    .await
    .unwrap()
}

async fn nothing_more(r: &mut Receiver, wait_ms: u64) {
    if let Ok(d) =
        tokio::time::timeout(Duration::from_millis(wait_ms), r.recv::<Body<Value>>()).await
    {
        panic!(
            "unexpected delivery: {:?}",
            d.map(|d| annotation(&d, "x-opt-sequence-number"))
        );
    }
}

fn annotation(d: &Delivery<Body<Value>>, key: &str) -> Option<Value> {
    d.message()
        .message_annotations
        .as_ref()
        .and_then(|a| a.0.get(&OwnedKey::from(key)).cloned())
}

fn seq(d: &Delivery<Body<Value>>) -> i64 {
    match annotation(d, "x-opt-sequence-number") {
        Some(Value::Long(n)) => n,
        other => panic!("x-opt-sequence-number missing: {other:?}"),
    }
}

fn body_json(d: &Delivery<Body<Value>>) -> serde_json::Value {
    match &d.message().body {
        Body::Data(b) => serde_json::from_slice(&b.iter().next().unwrap().0).unwrap(),
        other => panic!("not a data body: {other:?}"),
    }
}

async fn publish(h: &EmulatorHandle, topic: &str, n: usize) {
    let mut p = within(
        "publisher",
        Publisher::connect(&h.connection_string(), topic),
    )
    .await
    .unwrap();
    for i in 0..n {
        within(
            "send",
            p.send_json(
                "temp",
                &[("line", "line1")],
                format!(r#"{{"i":{i}}}"#),
                "application/json",
            ),
        )
        .await
        .unwrap();
    }
    p.close().await.unwrap();
}

/// Poll the stats until `ok` holds (settlement is asynchronous).
async fn wait_stats(
    h: &EmulatorHandle,
    path: &str,
    ok: impl Fn(&EntityStats) -> bool,
) -> EntityStats {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let s = h.stats().get(path).cloned().unwrap_or_default();
        if ok(&s) {
            return s;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("stats for {path} never matched: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn fan_out_in_order_with_annotations_and_completion() {
    let h = start(entities(Duration::from_secs(60), 10, &["a", "b"])).await;
    const N: usize = 20;
    publish(&h, "events", N).await;
    let (mut c, auth) = connect_authorized(&h, "SAS_KEY_VALUE").await;
    auth.unwrap();
    for sub in ["a", "b"] {
        let mut r = receiver(
            &mut c,
            &format!("events/Subscriptions/{sub}"),
            CreditMode::Auto(50),
        )
        .await;
        for i in 0..N {
            let d = recv(&mut r).await;
            assert_eq!(seq(&d), i as i64 + 1, "{sub}: in order");
            assert_eq!(body_json(&d)["i"], i);
            assert!(matches!(
                annotation(&d, "x-opt-enqueued-time"),
                Some(Value::Timestamp(_))
            ));
            assert!(matches!(
                annotation(&d, "x-opt-locked-until"),
                Some(Value::Timestamp(_))
            ));
            assert_eq!(delivery_count(&d), 0);
            let props = d.message().properties.as_ref().unwrap();
            assert_eq!(props.subject.as_deref(), Some("temp"));
            r.accept(&d).await.unwrap();
        }
        let s = wait_stats(&h, &format!("events/Subscriptions/{sub}"), |s| {
            s.completed == N as u64
        })
        .await;
        assert_eq!((s.active, s.locked, s.delivered), (0, 0, N as u64));
        r.close().await.unwrap();
    }
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn credit_is_respected_exactly() {
    let h = start(entities(Duration::from_secs(60), 10, &["a"])).await;
    let path = "events/Subscriptions/a";
    let (mut c, auth) = connect_authorized(&h, "SAS_KEY_VALUE").await;
    auth.unwrap();
    let mut r = receiver(&mut c, path, CreditMode::Manual).await;
    r.set_credit(3).await.unwrap();
    wait_stats(&h, path, |s| s.credit == 3).await;
    publish(&h, "events", 10).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(seq(&recv(&mut r).await));
    }
    nothing_more(&mut r, 300).await;
    let s = wait_stats(&h, path, |s| s.locked == 3).await;
    assert_eq!((s.active, s.locked, s.credit, s.max_locked), (7, 3, 0, 3));
    r.set_credit(2).await.unwrap();
    for _ in 0..2 {
        got.push(seq(&recv(&mut r).await));
    }
    nothing_more(&mut r, 300).await;
    let s = h.stats()[path].clone();
    assert_eq!((s.active, s.locked, s.max_locked), (5, 5, 5));
    assert_eq!(got, [1, 2, 3, 4, 5]);
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn lock_expiry_redelivers_then_dead_letters_at_max_delivery_count() {
    let h = start(entities(Duration::from_millis(300), 2, &["a"])).await;
    let path = "events/Subscriptions/a";
    publish(&h, "events", 1).await;
    let (mut c, auth) = connect_authorized(&h, "SAS_KEY_VALUE").await;
    auth.unwrap();
    let mut r = receiver(&mut c, path, CreditMode::Auto(10)).await;
    let first = recv(&mut r).await;
    assert_eq!(delivery_count(&first), 0);
    // Not settled: the lock expires and the message comes back with delivery-count 1.
    let again = recv(&mut r).await;
    assert_eq!(seq(&again), seq(&first));
    assert_eq!(delivery_count(&again), 1);
    // Settling the expired delivery is ignored.
    r.accept(&first).await.unwrap();
    // Not settled again: delivery count 2 = MaxDeliveryCount -> dead-letter queue.
    let s = wait_stats(&h, path, |s| s.dead_lettered == 1).await;
    assert_eq!((s.active, s.locked, s.completed, s.delivered), (0, 0, 0, 2));
    nothing_more(&mut r, 200).await;
    let dl = h.dead_letters(path);
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].reason.as_deref(), Some("MaxDeliveryCountExceeded"));
    let dlq_stats = h.stats()[&format!("{path}/$DeadLetterQueue")].clone();
    assert_eq!(dlq_stats.active, 1);
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn reject_dead_letters_with_reason_and_release_redelivers() {
    let h = start(entities(Duration::from_secs(60), 10, &["a"])).await;
    let path = "events/Subscriptions/a";
    publish(&h, "events", 2).await;
    let (mut c, auth) = connect_authorized(&h, "SAS_KEY_VALUE").await;
    auth.unwrap();
    let mut r = receiver(&mut c, path, CreditMode::Auto(10)).await;
    let d1 = recv(&mut r).await;
    let d2 = recv(&mut r).await;
    let mut info = Fields::new();
    info.insert(
        Symbol::from("DeadLetterReason"),
        Value::String("PayloadTooLarge".into()),
    );
    info.insert(
        Symbol::from("DeadLetterErrorDescription"),
        Value::String("body of 99999 bytes".into()),
    );
    r.reject(
        &d1,
        AmqpErr::new(
            ErrorCondition::Custom(Symbol::from("com.microsoft:dead-letter")),
            None,
            info,
        ),
    )
    .await
    .unwrap();
    r.release(&d2).await.unwrap();
    let again = recv(&mut r).await;
    assert_eq!(seq(&again), seq(&d2));
    assert_eq!(delivery_count(&again), 1);
    r.accept(&again).await.unwrap();
    let s = wait_stats(&h, path, |s| s.completed == 1 && s.dead_lettered == 1).await;
    assert_eq!((s.active, s.locked), (0, 0));
    let dl = h.dead_letters(path);
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].reason.as_deref(), Some("PayloadTooLarge"));
    assert_eq!(dl[0].description.as_deref(), Some("body of 99999 bytes"));
    // The dead-letter queue is readable like ASB's, reason in the application properties.
    let mut dlq = receiver(
        &mut c,
        &format!("{path}/$DeadLetterQueue"),
        CreditMode::Auto(10),
    )
    .await;
    let d = recv(&mut dlq).await;
    assert_eq!(seq(&d), seq(&d1));
    let props = d.message().application_properties.as_ref().unwrap();
    assert_eq!(
        props.get("DeadLetterReason"),
        Some(&SimpleValue::String("PayloadTooLarge".into()))
    );
    dlq.accept(&d).await.unwrap();
    wait_stats(&h, &format!("{path}/$DeadLetterQueue"), |s| {
        s.completed == 1
    })
    .await;
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

/// An attach refused by the emulator: fe2o3 completes the attach, then the link is
/// detached with the error; either the attach or the first receive reports it.
async fn expect_refused(c: &mut Client, addr: &str, condition: &str) {
    let r = within(
        "attach",
        Receiver::builder()
            .name(format!("rx-{}", fastrand::u32(..)))
            .source(addr)
            .attach(&mut c.session),
    )
    .await;
    let err = match r {
        Err(e) => format!("{e:?}"),
        Ok(mut r) => format!(
            "{:?}",
            within("refusal", r.recv::<Body<Value>>())
                .await
                .unwrap_err()
        ),
    };
    assert!(err.contains(condition), "{err}");
}

#[tokio::test]
async fn cbs_refuses_wrong_key_and_missing_token_and_expiry_closes() {
    let h = start(entities(Duration::from_secs(60), 10, &["a"])).await;
    let path = "events/Subscriptions/a";
    // Wrong key: put-token answered 401.
    let (mut c, auth) = connect_authorized(&h, "not-the-key").await;
    let err = auth.unwrap_err();
    assert!(err.contains("401"), "{err}");
    // ... and the entity stays closed.
    expect_refused(&mut c, path, "UnauthorizedAccess").await;
    let _ = c.conn.close().await;
    // No token at all: refused; unknown entity: not found.
    let mut c = connect_with(&h, SaslProfile::Anonymous, "test-client").await;
    expect_refused(&mut c, path, "UnauthorizedAccess").await;
    put_token(&mut c, &h, "SAS_KEY_VALUE", 3600).await.unwrap();
    expect_refused(&mut c, "events/Subscriptions/nope", "NotFound").await;
    // With the token: attached; expire-tokens closes the connection.
    let mut r = receiver(&mut c, path, CreditMode::Auto(10)).await;
    h.expire_tokens();
    let e = within("closed", r.recv::<Body<Value>>()).await.unwrap_err();
    let e = format!("{e:?}");
    assert!(!e.is_empty());
    let _ = c.conn.close().await;
    // A short-lived token: the connection is closed when it expires.
    let mut c = connect_with(&h, SaslProfile::Anonymous, "test-client").await;
    put_token(&mut c, &h, "SAS_KEY_VALUE", 2).await.unwrap();
    let mut r = receiver(&mut c, path, CreditMode::Auto(10)).await;
    let started = std::time::Instant::now();
    within("closed on expiry", r.recv::<Body<Value>>())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(4));
    let _ = c.conn.close().await;
    h.shutdown().await;
}

#[tokio::test]
async fn sasl_plain_with_the_key_needs_no_token_and_wrong_password_fails() {
    let h = start(entities(Duration::from_secs(60), 10, &["a"])).await;
    let stream = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    let bad = within(
        "open",
        Connection::builder()
            .container_id("plain-bad")
            .sasl_profile(SaslProfile::Plain {
                username: "RootManageSharedAccessKey".into(),
                password: "wrong".into(),
            })
            .open_with_stream(stream),
    )
    .await;
    assert!(bad.is_err());
    let mut c = connect_with(
        &h,
        SaslProfile::Plain {
            username: "RootManageSharedAccessKey".into(),
            password: "SAS_KEY_VALUE".into(),
        },
        "test-client",
    )
    .await;
    publish(&h, "events", 1).await;
    let mut r = receiver(&mut c, "events/Subscriptions/a", CreditMode::Auto(5)).await;
    let d = recv(&mut r).await;
    r.accept(&d).await.unwrap();
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn faults_drop_connections_and_detach_links() {
    let h = start(entities(Duration::from_millis(400), 10, &["a"])).await;
    let path = "events/Subscriptions/a";
    publish(&h, "events", 3).await;
    // drop-connections: the client sees its connection fail; the locked message stays
    // locked until its lock expires, then is redelivered.
    let (mut c, auth) = connect_authorized(&h, "SAS_KEY_VALUE").await;
    auth.unwrap();
    let mut r = receiver(&mut c, path, CreditMode::Manual).await;
    r.set_credit(1).await.unwrap();
    let d = recv(&mut r).await;
    assert_eq!(seq(&d), 1);
    h.drop_connections();
    within("dropped", r.recv::<Body<Value>>())
        .await
        .unwrap_err();
    let s = h.stats()[path].clone();
    assert_eq!((s.locked, s.active), (1, 2));
    // detach-links: the link is detached with an error, the connection stays usable.
    let (mut c, auth) = connect_authorized(&h, "SAS_KEY_VALUE").await;
    auth.unwrap();
    let mut r = receiver(&mut c, path, CreditMode::Manual).await;
    r.set_credit(1).await.unwrap();
    let d = recv(&mut r).await;
    assert_eq!(seq(&d), 2);
    h.detach_links();
    let e = within("detached", r.recv::<Body<Value>>())
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("DetachForced"), "{e:?}");
    let mut r2 = receiver(&mut c, path, CreditMode::Auto(10)).await;
    // Message 3 at once, then 1 and 2 when their locks expire (delivery-count 1).
    let mut seen = BTreeMap::new();
    for _ in 0..3 {
        let d = recv(&mut r2).await;
        seen.insert(seq(&d), delivery_count(&d));
        r2.accept(&d).await.unwrap();
    }
    assert_eq!(seen, BTreeMap::from([(1, 1), (2, 1), (3, 0)]));
    wait_stats(&h, path, |s| {
        s.completed == 3 && s.active == 0 && s.locked == 0
    })
    .await;
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn restart_on_the_same_port_keeps_the_store() {
    let h = start(entities(Duration::from_millis(500), 10, &["a"])).await;
    let path = "events/Subscriptions/a";
    let addr = h.addr();
    publish(&h, "events", 4).await;
    let (mut c, auth) = connect_authorized(&h, "SAS_KEY_VALUE").await;
    auth.unwrap();
    let mut r = receiver(&mut c, path, CreditMode::Manual).await;
    r.set_credit(1).await.unwrap();
    let _locked = recv(&mut r).await;
    let store = h.store();
    within("shutdown", h.shutdown()).await;
    within("client sees the broker go", r.recv::<Body<Value>>())
        .await
        .unwrap_err();
    let h = support::emulator::start_on(
        addr,
        EmulatorOptions {
            store: Some(store),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(h.addr(), addr);
    let (mut c, auth) = connect_authorized(&h, "SAS_KEY_VALUE").await;
    auth.unwrap();
    let mut r = receiver(&mut c, path, CreditMode::Auto(10)).await;
    let mut seqs = Vec::new();
    for _ in 0..4 {
        let d = recv(&mut r).await;
        seqs.push(seq(&d));
        r.accept(&d).await.unwrap();
    }
    seqs.sort();
    assert_eq!(seqs, [1, 2, 3, 4]);
    wait_stats(&h, path, |s| s.completed == 4 && s.active == 0).await;
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn admin_http_serves_stats_dlq_and_faults() {
    let h = start(entities(Duration::from_secs(60), 10, &["a", "b"])).await;
    let admin = h.admin_addr().unwrap();
    publish(&h, "events", 3).await;
    let (status, body) = http::call(admin, "GET", "/stats").await;
    assert_eq!(status, 200);
    let stats: BTreeMap<String, EntityStats> = serde_json::from_str(&body).unwrap();
    for sub in ["a", "b"] {
        let s = &stats[&format!("events/Subscriptions/{sub}")];
        assert_eq!(
            (s.active, s.locked, s.completed, s.dead_lettered),
            (3, 0, 0, 0)
        );
    }
    assert!(stats.contains_key("events/Subscriptions/a/$DeadLetterQueue"));
    assert!(stats.contains_key("q1"));
    let (status, body) = http::call(admin, "GET", "/dlq?entity=events%2FSubscriptions%2Fa").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!([])
    );
    // Faults over HTTP: expire-tokens closes the token-authorised connection.
    let (mut c, auth) = connect_authorized(&h, "SAS_KEY_VALUE").await;
    auth.unwrap();
    let mut r = receiver(&mut c, "events/Subscriptions/a", CreditMode::Manual).await;
    let (status, _) = http::call(admin, "POST", "/faults/expire-tokens").await;
    assert_eq!(status, 200);
    within("closed", r.recv::<Body<Value>>()).await.unwrap_err();
    for f in ["drop-connections", "detach-links"] {
        let (status, _) = http::call(admin, "POST", &format!("/faults/{f}")).await;
        assert_eq!(status, 200);
    }
    assert_eq!(http::call(admin, "GET", "/nope").await.0, 404);
    assert_eq!(
        http::call(admin, "GET", "/faults/drop-connections").await.0,
        405
    );
    let _ = c.conn.close().await;
    h.shutdown().await;
}

#[tokio::test]
async fn a_full_entity_refuses_sends_with_quota_exceeded() {
    let e = entities(Duration::from_secs(60), 10, &["a"]);
    let opts = EmulatorOptions {
        store: Some(asb_gateway::emulator::Store::with_capacity(&e, 2)),
        key: "a-secret-key".into(),
        ..Default::default()
    };
    let dbg = format!("{opts:?}");
    assert!(!dbg.contains("a-secret-key"), "{dbg}");
    let h = support::emulator::start(opts).await;
    assert!(!format!("{h:?}").contains("a-secret-key"));
    let mut p = within(
        "publisher",
        Publisher::connect(&h.connection_string(), "events"),
    )
    .await
    .unwrap();
    for _ in 0..2 {
        within("send", p.send_json("s", &[], "{}", "application/json"))
            .await
            .unwrap();
    }
    let err = within("send", p.send_json("s", &[], "{}", "application/json"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("QuotaExceeded"), "{err}");
    assert_eq!(h.stats()["events/Subscriptions/a"].active, 2);
    p.close().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn generator_publishes_factory_events() {
    let h = start(entities(Duration::from_secs(60), 10, &["a"])).await;
    let (trigger, shutdown) = asb_gateway::shutdown::channel();
    let cs = h.connection_string();
    let task =
        tokio::spawn(
            async move { asb_gateway::generator::run(&cs, "events", 100.0, shutdown).await },
        );
    wait_stats(&h, "events/Subscriptions/a", |s| s.active >= 10).await;
    trigger.fire();
    within("generator stops", task).await.unwrap().unwrap();
    let (mut c, auth) = connect_authorized(&h, "SAS_KEY_VALUE").await;
    auth.unwrap();
    let mut r = receiver(&mut c, "events/Subscriptions/a", CreditMode::Auto(20)).await;
    for _ in 0..10 {
        let d = recv(&mut r).await;
        let m = d.message();
        let p = m.properties.as_ref().unwrap();
        assert!(matches!(
            p.subject.as_deref(),
            Some("temp" | "state" | "alarm")
        ));
        assert_eq!(
            p.content_type.as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        let ap = m.application_properties.as_ref().unwrap();
        let line = match ap.get("line") {
            Some(SimpleValue::String(s)) => s.clone(),
            other => panic!("line: {other:?}"),
        };
        assert!(line.starts_with("line"));
        assert!(ap.get("station").is_some());
        assert_eq!(body_json(&d)["line"], line.as_str());
        r.accept(&d).await.unwrap();
    }
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

#[test]
fn config_json_fixture_parses_and_malformed_is_a_clear_error() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/emulator/Config.json");
    let e = Entities::load(&path).unwrap();
    assert_eq!(e.namespace, "sbemulatorns");
    assert_eq!(e.queues.len(), 1);
    assert_eq!(e.queues[0].name, "queue.1");
    assert_eq!(e.queues[0].lock_duration, Duration::from_secs(60));
    assert_eq!(e.queues[0].max_delivery_count, 3);
    let t = &e.topics[0];
    assert_eq!(t.name, "operational-events");
    assert_eq!(t.subscriptions.len(), 2);
    assert_eq!(t.subscriptions[0].name, "edge");
    assert_eq!(t.subscriptions[0].lock_duration, Duration::from_secs(30));
    assert_eq!(t.subscriptions[0].max_delivery_count, 5);
    assert_eq!(t.subscriptions[1].lock_duration, Duration::from_millis(500));
    assert_eq!(t.subscriptions[1].max_delivery_count, 10);

    let err = Entities::from_json(r#"{"UserConfig":{"Namespaces":[{"Name":"n","Topics":[{"Name":"t","Subscriptions":[{"Name":"s","Properties":{"LockDuration":"one minute"}}]}]}]}}"#).unwrap_err().to_string();
    assert!(
        err.contains("UserConfig.Namespaces[0].Topics[0].Subscriptions[0].Properties.LockDuration"),
        "{err}"
    );
    assert!(err.contains("one minute"), "{err}");
    let err = Entities::from_json(r#"{"UserConfig":{}}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Namespaces"), "{err}");
    let err = Entities::from_json("{\"UserConfig\": [")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("emulator config:"), "{err}");
    let err = Entities::load("/nonexistent/Config.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read /nonexistent/Config.json"),
        "{err}"
    );
}

#[tokio::test]
async fn python_sdk_sends_to_topic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup/emulator.sh to install the azure-servicebus SDK",
        python.display()
    );
    let h = start(entities(Duration::from_secs(60), 10, &["a"])).await;
    let script = root.join("tests/interop/send_azure_sdk.py");
    let out = within(
        "python sdk",
        tokio::process::Command::new(&python)
            .arg(&script)
            .arg(h.connection_string())
            .arg("events")
            .arg("5")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "python SDK failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let s = wait_stats(&h, "events/Subscriptions/a", |s| s.active == 5).await;
    assert_eq!(s.active, 5);
    let (mut c, auth) = connect_authorized(&h, "SAS_KEY_VALUE").await;
    auth.unwrap();
    let mut r = receiver(&mut c, "events/Subscriptions/a", CreditMode::Auto(10)).await;
    for i in 0..5 {
        let d = recv(&mut r).await;
        let text = match &d.message().body {
            Body::Data(b) => String::from_utf8(b.iter().next().unwrap().0.to_vec()).unwrap(),
            Body::Value(v) => format!("{:?}", v.0),
            other => panic!("{other:?}"),
        };
        assert!(text.contains(&format!("python-{i}")), "{text}");
        let props = d.message().application_properties.as_ref().unwrap();
        assert_eq!(
            props.get("origin"),
            Some(&SimpleValue::String("azure-sdk".into()))
        );
        r.accept(&d).await.unwrap();
    }
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

fn free_port() -> std::net::SocketAddr {
    ([127, 0, 0, 1], support::free_port()).into()
}

#[tokio::test]
async fn cli_runs_until_sigterm_and_reports_bad_input() {
    use tokio::process::Command;
    let exe = support::EXE;
    // A malformed Config.json: exit 1, naming the file and the problem.
    let dir = std::env::temp_dir().join(format!("asbgw-emu-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("Config.json");
    std::fs::write(&bad, r#"{"UserConfig":{"Namespaces":[{"Name":"n","Queues":[{"Name":"q","Properties":{"LockDuration":"PT1X"}}]}]}}"#).unwrap();
    let out = within(
        "cli bad config",
        Command::new(exe)
            .args(["emulator", "--listen", "127.0.0.1:0", "--config"])
            .arg(&bad)
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Config.json") && err.contains("LockDuration"),
        "{err}"
    );
    // The port is taken: exit 2.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = within(
        "cli port in use",
        Command::new(exe)
            .args([
                "emulator",
                "--listen",
                &taken.local_addr().unwrap().to_string(),
            ])
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    drop(taken);
    // Runs with the fixture, serves /stats, stops on SIGTERM with exit 0.
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/emulator/Config.json");
    let (listen, admin) = (free_port(), free_port());
    let mut child = Command::new(exe)
        .args([
            "emulator",
            "--listen",
            &listen.to_string(),
            "--admin",
            &admin.to_string(),
            "--config",
        ])
        .arg(&fixture)
        .kill_on_drop(true)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    let stats = loop {
        if tokio::net::TcpStream::connect(admin).await.is_ok() {
            break http::call(admin, "GET", "/stats").await.1;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the emulator never served /stats"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stats: BTreeMap<String, EntityStats> = serde_json::from_str(&stats).unwrap();
    assert!(stats.contains_key("operational-events/Subscriptions/edge"));
    assert!(stats.contains_key("queue.1"));
    let conn = format!(
        "Endpoint=sb://{listen};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true"
    );
    let mut p = within("publisher", Publisher::connect(&conn, "operational-events"))
        .await
        .unwrap();
    within("send", p.send_json("s", &[], "{}", "application/json"))
        .await
        .unwrap();
    p.close().await.unwrap();
    let pid = child.id().unwrap().to_string();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(st.success());
    let status = within("exit on SIGTERM", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_json_with_a_byte_order_mark_loads() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/emulator/Config.json");
    let text = std::fs::read_to_string(&fixture).unwrap();
    let dir = std::env::temp_dir().join(format!("asbgw-em-bom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut utf16 = vec![0xFF, 0xFE];
    utf16.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    let boms: [(&str, Vec<u8>); 2] = [
        (
            "utf8-bom.json",
            [b"\xEF\xBB\xBF".as_slice(), text.as_bytes()].concat(),
        ),
        ("utf16.json", utf16),
    ];
    for (name, bytes) in boms {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = Entities::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(e.namespace, "sbemulatorns", "{name}");
    }
    assert!(Entities::from_json(&format!("\u{feff}{text}")).is_ok());
    std::fs::remove_dir_all(dir).unwrap();
}
