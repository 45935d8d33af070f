//! The emulator behaves like ASB where issues 12 and 22 found it did not: subscription
//! rules (Correlation and SQL filters), RequiresSession, missing entities, and lock
//! renewal on `$management` (driven by the gateway's own `source::renew::LockRenewer`).
//! Real AMQP 1.0 on loopback, fe2o3 clients, no mocks.

use crate::support::amqp::{Client, connect, delivery_count, recv, within};
use crate::support::{self, http};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use asb_gateway::emulator::client::Publisher;
use asb_gateway::emulator::{EmulatorHandle, EmulatorOptions, Entities, EntityStats};
use asb_gateway::source::renew::{LockRenewer, RenewError, lock_token};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageId, Properties, Source,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use fe2o3_amqp::{Delivery, Receiver};

const T: Duration = Duration::from_secs(10);

fn config(topic_subscriptions: &str, queues: &str) -> String {
    format!(
        r#"{{"UserConfig":{{"Namespaces":[{{"Name":"sbemulatorns","Queues":[{queues}],
        "Topics":[{{"Name":"events","Subscriptions":[{topic_subscriptions}]}}]}}],
        "Logging":{{"Type":"File"}}}}}}"#
    )
}

fn correlation(sub: &str, filter: &str) -> String {
    format!(
        r#"{{"Name":"{sub}","Rules":[{{"Name":"r-{sub}","Properties":{{"FilterType":"Correlation","CorrelationFilter":{filter}}}}}]}}"#
    )
}

fn sql(sub: &str, expr: &str) -> String {
    format!(
        r#"{{"Name":"{sub}","Rules":[{{"Name":"r-{sub}","Properties":{{"FilterType":"Sql","SqlFilter":{{"SqlExpression":"{expr}"}}}}}}]}}"#
    )
}

async fn start(json: &str) -> EmulatorHandle {
    let entities = Entities::from_json(json).unwrap_or_else(|e| panic!("{e}\n{json}"));
    support::emulator::start(EmulatorOptions {
        entities,
        admin: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    })
    .await
}

async fn receiver(c: &mut Client, addr: &str) -> Receiver {
    within(
        "attach receiver",
        Receiver::builder()
            .name(format!("rx-{}", fastrand::u32(..)))
            .source(addr)
            .credit_mode(CreditMode::Auto(20))
            .attach(&mut c.session),
    )
    .await
    .unwrap()
}

fn message_id(d: &Delivery<Body<Value>>) -> String {
    match d
        .message()
        .properties
        .as_ref()
        .and_then(|p| p.message_id.as_ref())
    {
        Some(MessageId::String(s)) => s.clone(),
        other => panic!("message-id {other:?}"),
    }
}

/// A message with these properties; `app` values are strings or ints.
fn msg(id: &str, props: Properties, app: &[(&str, SimpleValue)]) -> Message<Data> {
    let mut ap = ApplicationProperties::builder();
    for (k, v) in app {
        ap = ap.insert(k.to_string(), v.clone());
    }
    Message::builder()
        .properties(Properties {
            message_id: Some(MessageId::String(id.into())),
            ..props
        })
        .application_properties(ap.build())
        .data(Data(Binary::from(b"{}".to_vec())))
        .build()
}

fn s(v: &str) -> SimpleValue {
    SimpleValue::String(v.into())
}

/// The five messages every filter test sends to `events`.
fn messages() -> Vec<Message<Data>> {
    vec![
        msg(
            "m1",
            Properties {
                subject: Some("temp".into()),
                content_type: Some("application/json".into()),
                ..Default::default()
            },
            &[("line", s("line1")), ("n", SimpleValue::Int(5))],
        ),
        msg(
            "m2",
            Properties {
                subject: Some("hum".into()),
                correlation_id: Some(MessageId::String("c1".into())),
                ..Default::default()
            },
            &[("line", s("line2"))],
        ),
        msg(
            "m3",
            Properties {
                subject: Some("temp".into()),
                reply_to: Some("rq".into()),
                to: Some("dest".into()),
                ..Default::default()
            },
            &[("line", s("line2"))],
        ),
        msg(
            "m4",
            Properties {
                subject: Some("a".into()),
                reply_to_group_id: Some("rs".into()),
                group_id: Some("s1".into()),
                ..Default::default()
            },
            &[("n", SimpleValue::Long(5))],
        ),
        msg(
            "m5",
            Properties {
                subject: Some("b".into()),
                content_type: Some("text/plain".into()),
                ..Default::default()
            },
            &[("n", SimpleValue::Int(6))],
        ),
    ]
}

/// The message ids a subscription holds, received (and completed) in order.
async fn ids(h: &EmulatorHandle, c: &mut Client, sub: &str) -> Vec<String> {
    let path = format!("events/Subscriptions/{sub}");
    let n = h.stats()[&path].active;
    let mut r = receiver(c, &path).await;
    let mut out = Vec::new();
    for _ in 0..n {
        let d = recv(&mut r).await;
        out.push(message_id(&d));
        r.accept(&d).await.unwrap();
    }
    r.close().await.unwrap();
    out
}

#[tokio::test]
async fn rules_deliver_only_the_matching_messages() {
    let subs = [
        r#"{"Name":"all"}"#.to_string(),
        r#"{"Name":"empty-rules","Rules":[]}"#.to_string(),
        correlation("ct", r#"{"ContentType":"application/json"}"#),
        correlation("cid", r#"{"CorrelationId":"c1"}"#),
        correlation("label", r#"{"Label":"temp"}"#),
        correlation("mid", r#"{"MessageId":"m3"}"#),
        correlation("replyto", r#"{"ReplyTo":"rq"}"#),
        correlation("rtsid", r#"{"ReplyToSessionId":"rs"}"#),
        correlation("sid", r#"{"SessionId":"s1"}"#),
        correlation("to", r#"{"To":"dest"}"#),
        correlation("props", r#"{"Properties":{"line":"line1","n":5}}"#),
        correlation("numeric", r#"{"Properties":{"n":5}}"#),
        correlation("multi", r#"{"Label":"temp","Properties":{"line":"line2"}}"#),
        correlation("case", r#"{"Label":"TEMP"}"#),
        r#"{"Name":"two-rules","Rules":[
            {"Name":"ra","Properties":{"FilterType":"Correlation","CorrelationFilter":{"Label":"a"}}},
            {"Name":"rb","Properties":{"FilterType":"Sql","SqlFilter":{"SqlExpression":"sys.Label = 'b'"}}}]}"#
            .to_string(),
        sql("s-true", "1=1"),
        sql("s-false", "1=0"),
        sql("s-label", "sys.Label = 'temp' AND n >= 5"),
        sql("s-like-in", "sys.Label LIKE 't%' OR line IN ('line2')"),
        sql("s-null", "line IS NULL"),
        sql("s-not", "NOT (n = 5)"),
        sql("s-exists", "EXISTS(n) AND sys.ContentType = 'text/plain'"),
        sql("s-sys", "sys.To = 'dest' AND sys.ReplyTo = 'rq' AND sys.MessageId <> 'x'"),
    ];
    let h = start(&config(&subs.join(","), "")).await;
    let mut p = within(
        "publisher",
        Publisher::connect(&h.connection_string(), "events"),
    )
    .await
    .unwrap();
    for m in messages() {
        within("send", p.send(m)).await.unwrap();
    }
    p.close().await.unwrap();

    let want: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("all", &["m1", "m2", "m3", "m4", "m5"][..]),
        ("empty-rules", &["m1", "m2", "m3", "m4", "m5"]),
        ("ct", &["m1"]),
        ("cid", &["m2"]),
        ("label", &["m1", "m3"]),
        ("mid", &["m3"]),
        ("replyto", &["m3"]),
        ("rtsid", &["m4"]),
        ("sid", &["m4"]),
        ("to", &["m3"]),
        ("props", &["m1"]),
        // 5 matches an int 5 and a long 5, not an int 6.
        ("numeric", &["m1", "m4"]),
        ("multi", &["m3"]),
        ("case", &[]),
        ("two-rules", &["m4", "m5"]),
        ("s-true", &["m1", "m2", "m3", "m4", "m5"]),
        ("s-false", &[]),
        ("s-label", &["m1"]),
        ("s-like-in", &["m1", "m2", "m3"]),
        ("s-null", &["m4", "m5"]),
        // m2 and m3 have no n: unknown, and NOT unknown is unknown (no match).
        ("s-not", &["m5"]),
        ("s-exists", &["m5"]),
        ("s-sys", &["m3"]),
    ]);
    let mut c = connect(&h, "dialect-test").await;
    for (sub, expected) in want {
        assert_eq!(ids(&h, &mut c, sub).await, expected, "subscription {sub}");
    }
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

#[test]
fn unsupported_rules_are_refused_at_start_up_naming_the_part() {
    for (sub, want) in [
        (
            sql("arith", "n + 1 = 6"),
            "subscription 'events/Subscriptions/arith', rule 'r-arith': SqlFilter.SqlExpression `n + 1 = 6`: arithmetic ('+') is not supported by the emulator",
        ),
        (sql("fn", "newid() = 'x'"), "functions (newid(...))"),
        (sql("sysprop", "sys.DeliveryCount > 2"), "sys.DeliveryCount is not a system property"),
        (
            r#"{"Name":"act","Rules":[{"Name":"with-action","Properties":{"FilterType":"Sql","SqlFilter":{"SqlExpression":"1=1"},"Action":{"SqlExpression":"SET x = 1"}}}]}"#.into(),
            "rule 'with-action': rule actions are not supported by the emulator (Action.SqlExpression `SET x = 1`)",
        ),
        (
            r#"{"Name":"ft","Rules":[{"Name":"r","Properties":{"FilterType":"Boolean"}}]}"#.into(),
            "FilterType 'Boolean' is not Correlation or Sql",
        ),
        (correlation("typo", r#"{"Lable":"temp"}"#), "unknown field `Lable`"),
        (correlation("none", "{}"), "a CorrelationFilter needs at least one property"),
        (
            correlation("obj", r#"{"Properties":{"x":{"y":1}}}"#),
            "CorrelationFilter.Properties.x",
        ),
    ] {
        let err = Entities::from_json(&config(&sub, ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}\n  should contain: {want}");
        assert!(err.contains("Subscriptions[0]"), "{err}");
    }
    // An empty action is no action (Microsoft's sample files carry them).
    Entities::from_json(&config(
        r#"{"Name":"ok","Rules":[{"Name":"r","Properties":{"FilterType":"Sql","SqlFilter":{"SqlExpression":"1=1"},"Action":{"SqlExpression":""}}}]}"#,
        "",
    ))
    .unwrap();
}

#[test]
fn cli_refuses_an_unsupported_rule_with_exit_1() {
    let dir = std::env::temp_dir().join(format!("asbgw-rules-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("Config.json");
    std::fs::write(&file, config(&sql("bad", "n * 2 = 4"), "")).unwrap();
    let out = std::process::Command::new(support::EXE)
        .args(["emulator", "--listen", "127.0.0.1:0", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("rule 'r-bad'") && stderr.contains("arithmetic ('*')"),
        "{stderr}"
    );
}

#[test]
fn every_ignored_config_property_is_reported() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/emulator/Config.json");
    let (e, ignored) =
        Entities::from_json_with_ignored(&std::fs::read_to_string(path).unwrap()).unwrap();
    let has = |p: &str| ignored.iter().any(|i| i.starts_with(&format!("{p} = ")));
    assert!(has("UserConfig.Logging"), "{ignored:#?}");
    assert!(has(
        "UserConfig.Namespaces[0].Queues[0].Properties.DefaultMessageTimeToLive"
    ));
    assert!(has(
        "UserConfig.Namespaces[0].Queues[0].Properties.RequiresDuplicateDetection"
    ));
    assert!(has(
        "UserConfig.Namespaces[0].Topics[0].Properties.DuplicateDetectionHistoryTimeWindow"
    ));
    assert!(has(
        "UserConfig.Namespaces[0].Topics[0].Subscriptions[0].Properties.ForwardTo"
    ));
    // Applied properties are not reported.
    for applied in [
        "LockDuration",
        "MaxDeliveryCount",
        "RequiresSession",
        "Rules",
        ".Name",
    ] {
        assert!(
            !ignored
                .iter()
                .any(|i| i.split(" = ").next().unwrap().ends_with(applied)),
            "{applied} reported: {ignored:#?}"
        );
    }
    // The fixture's correlation rule is applied.
    assert_eq!(e.topics[0].subscriptions[0].rules.len(), 1);
    assert!(e.topics[0].subscriptions[1].rules.is_empty());
}

/// A receiver attach refused by the emulator: fe2o3 completes the attach, then the link
/// is detached with the error; either the attach or the first receive reports it.
async fn refusal(c: &mut Client, source: Source) -> String {
    let r = within(
        "attach",
        Receiver::builder()
            .name(format!("rx-{}", fastrand::u32(..)))
            .source(source)
            .attach(&mut c.session),
    )
    .await;
    match r {
        Err(e) => format!("{e:?}"),
        Ok(mut r) => format!(
            "{:?}",
            within("refusal", r.recv::<Body<Value>>())
                .await
                .unwrap_err()
        ),
    }
}

fn session_source(addr: &str) -> Source {
    Source::builder()
        .address(addr)
        // A session id (fe2o3's client refuses its own attach when the echoed filter
        // value is null, before any broker answer could be seen).
        .add_to_filter_using_legacy_format("com.microsoft:session-filter", Value::from("s1"))
        .build()
}

#[tokio::test]
async fn requires_session_refuses_plain_receivers_as_asb_does() {
    let h = start(&config(
        r#"{"Name":"sessions","Properties":{"RequiresSession":true}},{"Name":"plain"}"#,
        r#"{"Name":"sq","Properties":{"RequiresSession":true}}"#,
    ))
    .await;
    let mut c = connect(&h, "dialect-test").await;
    for addr in ["events/Subscriptions/sessions", "sq"] {
        let err = refusal(&mut c, Source::builder().address(addr).build()).await;
        assert!(err.contains("NotAllowed"), "{addr}: {err}");
        assert!(
            err.contains("It is not possible for an entity that requires sessions to create a non-sessionful message receiver."),
            "{addr}: {err}"
        );
        // Sessions themselves are not emulated: refused loudly, not served as plain.
        let err = refusal(&mut c, session_source(addr)).await;
        assert!(
            err.contains("NotImplemented") && err.contains("does not implement sessions"),
            "{addr}: {err}"
        );
    }
    let err = refusal(&mut c, session_source("events/Subscriptions/plain")).await;
    assert!(
        err.contains("NotAllowed")
            && err.contains("A sessionful message receiver cannot be created on an entity that does not require sessions"),
        "{err}"
    );
    // The dead-letter queue of a session entity takes plain receivers (as on ASB).
    let mut dlq = receiver(&mut c, "events/Subscriptions/sessions/$DeadLetterQueue").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), dlq.recv::<Body<Value>>())
            .await
            .is_err(),
        "the dead-letter receiver must stay attached and idle"
    );
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn a_missing_subscription_is_attached_then_detached_with_not_found() {
    let h = start(&config(r#"{"Name":"edge"}"#, "")).await;
    let mut c = connect(&h, "dialect-test").await;
    let err = refusal(
        &mut c,
        Source::builder()
            .address("events/Subscriptions/edgee")
            .build(),
    )
    .await;
    assert!(err.contains("NotFound"), "{err}");
    let want = format!(
        "The messaging entity 'sb://{}/events/Subscriptions/edgee' could not be found.",
        h.addr()
    );
    assert!(err.contains(&want), "{err}\n  should contain: {want}");
    // The management node of a missing entity is refused the same way: the attach
    // completes, the detach follows, and the first request reports it.
    let e = match LockRenewer::attach(&mut c.session, "events/Subscriptions/edgee").await {
        Err(e) => e,
        Ok(mut renewer) => within("renew", renewer.renew(&[[1; 16]]))
            .await
            .unwrap_err(),
    };
    assert!(
        matches!(e, RenewError::Attach { .. } | RenewError::Link(_)),
        "{e:?}"
    );
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

async fn publish_n(h: &EmulatorHandle, n: usize) {
    let mut p = within(
        "publisher",
        Publisher::connect(&h.connection_string(), "events"),
    )
    .await
    .unwrap();
    for i in 0..n {
        within(
            "send",
            p.send(msg(&format!("m{i}"), Properties::default(), &[])),
        )
        .await
        .unwrap();
    }
    p.close().await.unwrap();
}

fn stats(h: &EmulatorHandle) -> EntityStats {
    h.stats()["events/Subscriptions/edge"].clone()
}

#[tokio::test]
async fn renew_lock_keeps_a_message_past_its_lock_duration_without_redelivery() {
    let h = start(&config(
        r#"{"Name":"edge","Properties":{"LockDuration":"PT2S","MaxDeliveryCount":5}}"#,
        "",
    ))
    .await;
    publish_n(&h, 2).await;
    let mut c = connect(&h, "dialect-test").await;
    let mut r = receiver(&mut c, "events/Subscriptions/edge").await;
    let d0 = recv(&mut r).await;
    let d1 = recv(&mut r).await;
    assert_eq!((delivery_count(&d0), delivery_count(&d1)), (0, 0));
    let token = lock_token(&d0).expect("a lock token");
    assert_ne!(lock_token(&d1), Some(token));
    let mut renewer = LockRenewer::attach_with(
        &mut c.session,
        "events/Subscriptions/edge",
        Some(r.name().to_string()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    // Hold m0 for 2.25 lock durations, renewing every 0.4 s; m1 is left to expire, comes
    // back with delivery count 1 and is completed at once. m0 never comes back.
    let started = std::time::Instant::now();
    let mut renewals = 0;
    let mut redelivered = Vec::new();
    while started.elapsed() < Duration::from_millis(4500) {
        let before = SystemTime::now();
        let exp = within("renew", renewer.renew(&[token])).await.unwrap();
        let after = SystemTime::now();
        renewals += 1;
        assert_eq!(exp.len(), 1);
        // LockDuration from the moment the emulator renewed (same clock, ms precision).
        let lock = Duration::from_secs(2);
        assert!(
            exp[0] + Duration::from_millis(1) >= before + lock && exp[0] <= after + lock,
            "locked-until {:?} not LockDuration after the request",
            exp[0]
        );
        if let Ok(d) =
            tokio::time::timeout(Duration::from_millis(400), r.recv::<Body<Value>>()).await
        {
            let d = d.unwrap();
            redelivered.push((message_id(&d), delivery_count(&d)));
            r.accept(&d).await.unwrap();
        }
    }
    assert_eq!(redelivered, [("m1".to_string(), 1)]);
    let s = stats(&h);
    assert_eq!(s.renewed, renewals);
    assert_eq!((s.delivered, s.locked), (3, 1), "{s:?}");
    // The renewed lock is still good: completing m0 completes it.
    r.accept(&d0).await.unwrap();
    let deadline = std::time::Instant::now() + T;
    while stats(&h).completed < 2 {
        assert!(std::time::Instant::now() < deadline, "{:?}", stats(&h));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats(&h).dead_lettered, 0);
    // /stats over HTTP shows the renewals next to the other counts.
    let (status, body) = http::call(h.admin_addr().unwrap(), "GET", "/stats").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["events/Subscriptions/edge"]["renewed"], renewals);
    assert_eq!(v["events/Subscriptions/edge"]["completed"], 2);
    renewer.close().await;
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn renew_lock_of_an_unknown_settled_or_expired_lock_is_lock_lost() {
    let h = start(&config(
        r#"{"Name":"edge","Properties":{"LockDuration":"PT1S"}}"#,
        "",
    ))
    .await;
    publish_n(&h, 3).await;
    let mut c = connect(&h, "dialect-test").await;
    let mut r = receiver(&mut c, "events/Subscriptions/edge").await;
    let d0 = recv(&mut r).await;
    let d1 = recv(&mut r).await;
    let d2 = recv(&mut r).await;
    let mut renewer = LockRenewer::attach(&mut c.session, "events/Subscriptions/edge")
        .await
        .unwrap();
    // Unknown token.
    let e = renewer.renew(&[[7u8; 16]]).await.unwrap_err();
    assert!(e.is_lock_lost(), "{e:?}");
    assert!(
        e.to_string().contains("The lock supplied is invalid"),
        "{e}"
    );
    // All or nothing: one bad token in a batch renews none.
    let e = renewer
        .renew(&[lock_token(&d1).unwrap(), [7u8; 16]])
        .await
        .unwrap_err();
    assert!(e.is_lock_lost(), "{e:?}");
    assert_eq!(stats(&h).renewed, 0);
    // Settled: the lock is gone with the message.
    r.accept(&d0).await.unwrap();
    let deadline = std::time::Instant::now() + T;
    while stats(&h).completed < 1 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = renewer
        .renew(&[lock_token(&d0).unwrap()])
        .await
        .unwrap_err();
    assert!(e.is_lock_lost(), "{e:?}");
    // Two good tokens in one request: two renewals, two expirations.
    let exp = renewer
        .renew(&[lock_token(&d1).unwrap(), lock_token(&d2).unwrap()])
        .await
        .unwrap();
    assert_eq!(exp.len(), 2);
    assert_eq!(stats(&h).renewed, 2);
    // Expired: wait past the lock duration without renewing.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let e = renewer
        .renew(&[lock_token(&d1).unwrap()])
        .await
        .unwrap_err();
    assert!(e.is_lock_lost(), "{e:?}");
    assert_eq!(renewer.renew(&[]).await.unwrap(), Vec::<SystemTime>::new());
    renewer.close().await;
    c.conn.close().await.unwrap();
    h.shutdown().await;
}

#[tokio::test]
async fn fault_injection_makes_renewals_fail_with_lock_lost() {
    let h = start(&config(r#"{"Name":"edge"}"#, r#"{"Name":"q"}"#)).await;
    let admin = h.admin_addr().unwrap();
    publish_n(&h, 1).await;
    let mut c = connect(&h, "dialect-test").await;
    let mut r = receiver(&mut c, "events/Subscriptions/edge").await;
    let d = recv(&mut r).await;
    let token = lock_token(&d).unwrap();
    let mut renewer = LockRenewer::attach(&mut c.session, "events/Subscriptions/edge")
        .await
        .unwrap();
    renewer.renew(&[token]).await.unwrap();

    // fail=2: the next two renewals are refused, the third goes through.
    let (status, body) = http::call(
        admin,
        "POST",
        "/faults/renew-lock?entity=events%2FSubscriptions%2Fedge&fail=2",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..2 {
        let e = renewer.renew(&[token]).await.unwrap_err();
        assert!(e.is_lock_lost(), "{e:?}");
    }
    renewer.renew(&[token]).await.unwrap();

    // fail=all until fail=0; the path is case-insensitive as on ASB.
    let (status, _) = http::call(
        admin,
        "POST",
        "/faults/renew-lock?entity=EVENTS/subscriptions/EDGE&fail=all",
    )
    .await;
    assert_eq!(status, 200);
    for _ in 0..3 {
        assert!(renewer.renew(&[token]).await.unwrap_err().is_lock_lost());
    }
    let (status, _) = http::call(
        admin,
        "POST",
        "/faults/renew-lock?entity=events/Subscriptions/edge&fail=0",
    )
    .await;
    assert_eq!(status, 200);
    renewer.renew(&[token]).await.unwrap();
    assert_eq!(stats(&h).renewed, 3);

    // The same through the handle; bad requests are refused.
    assert!(h.fail_renewals("events/Subscriptions/edge", Some(1)));
    assert!(renewer.renew(&[token]).await.unwrap_err().is_lock_lost());
    assert!(!h.fail_renewals("events/Subscriptions/nope", Some(1)));
    assert_eq!(
        http::call(admin, "POST", "/faults/renew-lock?entity=nope&fail=1")
            .await
            .0,
        404
    );
    assert_eq!(
        http::call(admin, "POST", "/faults/renew-lock?fail=1")
            .await
            .0,
        400
    );
    assert_eq!(
        http::call(admin, "POST", "/faults/renew-lock?entity=q&fail=x")
            .await
            .0,
        400
    );
    assert_eq!(http::call(admin, "GET", "/faults/renew-lock").await.0, 405);
    // fail defaults to 1; queues have the node too.
    assert_eq!(
        http::call(admin, "POST", "/faults/renew-lock?entity=q")
            .await
            .0,
        200
    );
    renewer.close().await;
    c.conn.close().await.unwrap();
    h.shutdown().await;
}
