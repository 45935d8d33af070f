//! Source throughput, side by side in one run, against the in-process ASB emulator over
//! real AMQP 1.0 on loopback:
//! - `source`: the gateway's source (credit by demand, decode, route, encode, journal
//!   append, complete), messages/s from the emulator into the journal with settlement;
//! - `bare fe2o3`: the same fe2o3 receive + accept loop doing nothing else (same settle
//!   modes, a fixed credit window of the same size, topped up like the source does).
//!
//! Each round pre-loads N messages into the emulator's store, then times until all N
//! are completed at the broker. Run: `cargo bench --bench source` (N via
//! `SOURCE_BENCH_N`, default 20000; rounds via `SOURCE_BENCH_ROUNDS`, default 3).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use asb_gateway::app::Context;
use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::emulator::EmulatorHandle;
use asb_gateway::shutdown;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::definitions::{ReceiverSettleMode, SenderSettleMode};
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Data, Message, Properties};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Timestamp, Value};
use fe2o3_amqp::{Connection, Receiver, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;

const ENTITY: &str = "operational-events/Subscriptions/edge";
const WINDOW: u32 = 256;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn message(i: usize) -> Message<Body<Value>> {
    let body = format!(
        r#"{{"line":"line1","station":"st-{}","state":"running","temp":{}.5,"i":{i}}}"#,
        i % 8,
        20 + i % 10
    );
    Message::builder()
        .properties(
            Properties::builder()
                .message_id(format!("m-{i}"))
                .subject("temperature".to_string())
                .content_type("application/json")
                .build(),
        )
        .application_properties(
            ApplicationProperties::builder()
                .insert("line", SimpleValue::String("line1".into()))
                .insert("station", SimpleValue::String(format!("st-{}", i % 8)))
                .build(),
        )
        .body(Body::Data(fe2o3_amqp::types::messaging::Batch::new(vec![
            Data(Binary::from(body.into_bytes())),
        ])))
        .build()
}

async fn preload(h: &EmulatorHandle, n: usize) {
    let store = h.store();
    for i in 0..n {
        let _ = store.publish("operational-events", message(i));
    }
}

async fn wait_completed(h: &EmulatorHandle, n: u64) {
    loop {
        if h.stats().get(ENTITY).is_some_and(|s| s.completed >= n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The gateway's source: returns messages/s.
async fn run_source(h: &EmulatorHandle, n: usize) -> f64 {
    preload(h, n).await;
    let before = h.stats().get(ENTITY).map_or(0, |s| s.completed);
    let toml = format!(
        "[source]\nconnection_string = \"{}\"\n[[source.subscriptions]]\ntopic = \"operational-events\"\nsubscription = \"edge\"\n[journal]\nunsettled = {WINDOW}\n[routing]\ntopic = \"{{prop:line}}/{{subject}}\"\n",
        h.connection_string()
    );
    let ctx: Arc<Context> = Context::new(Config::parse(&toml, &LoadEnv::default()).unwrap());
    let (trigger, sd) = shutdown::channel();
    let (_acks_tx, acks) = tokio::sync::mpsc::channel(WINDOW as usize);
    let t0 = Instant::now();
    let cx = ctx.source_context();
    let task = tokio::spawn(asb_gateway::source::run(cx, acks, sd));
    wait_completed(h, before + n as u64).await;
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(ctx.journal.latest(), n as u64);
    trigger.fire();
    let _ = task.await;
    n as f64 / secs
}

/// A bare fe2o3 receive + accept loop: returns messages/s.
async fn run_bare(h: &EmulatorHandle, n: usize) -> f64 {
    preload(h, n).await;
    let before = h.stats().get(ENTITY).map_or(0, |s| s.completed);
    let t0 = Instant::now();
    let addr = h.addr();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut conn = Connection::builder()
        .container_id("bare")
        .hostname("127.0.0.1")
        .sasl_profile(SaslProfile::Anonymous)
        .open_with_stream(stream)
        .await
        .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut cbs = CbsClient::attach(&mut session).await.unwrap();
    let audience = format!("sb://{}/{ENTITY}", addr.ip());
    let expiry = asb_gateway::sas::now_unix() + 3600;
    let token = asb_gateway::sas::sas_token(
        &audience,
        asb_gateway::emulator::DEFAULT_KEY_NAME,
        asb_gateway::emulator::DEFAULT_KEY,
        expiry,
    );
    cbs.put_token(
        audience.as_str(),
        CbsToken::new(
            token,
            "servicebus.windows.net:sastoken",
            Timestamp::from_milliseconds(expiry as i64 * 1000),
        ),
    )
    .await
    .unwrap();
    let mut rx = Receiver::builder()
        .name("bare-rx")
        .source(ENTITY)
        .sender_settle_mode(SenderSettleMode::Unsettled)
        .receiver_settle_mode(ReceiverSettleMode::First)
        .credit_mode(CreditMode::Manual)
        .attach(&mut session)
        .await
        .unwrap();
    rx.set_credit(WINDOW).await.unwrap();
    let mut since_flow = 0;
    for _ in 0..n {
        let d = rx.recv::<Body<Value>>().await.unwrap();
        rx.accept(&d).await.unwrap();
        since_flow += 1;
        if since_flow >= WINDOW / 2 {
            rx.set_credit(WINDOW).await.unwrap();
            since_flow = 0;
        }
    }
    wait_completed(h, before + n as u64).await;
    let secs = t0.elapsed().as_secs_f64();
    let _ = rx.close().await;
    let _ = cbs.close().await;
    let _ = session.end().await;
    let _ = conn.close().await;
    n as f64 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let n = env("SOURCE_BENCH_N", 20_000);
    let rounds = env("SOURCE_BENCH_ROUNDS", 3).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let h = support::emulator::start_default().await;
        // warm-up
        run_source(&h, 1000).await;
        run_bare(&h, 1000).await;
        let (mut src, mut bare) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            src.push(run_source(&h, n).await);
            bare.push(run_bare(&h, n).await);
        }
        println!("source benchmark: {n} messages per round, {rounds} rounds, window {WINDOW}, emulator in-process on loopback");
        println!(
            "  source (decode+route+journal+complete): median {:>9.0} msg/s  (rounds: {})",
            median(src.clone()),
            src.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ")
        );
        println!(
            "  bare fe2o3 recv+accept loop:            median {:>9.0} msg/s  (rounds: {})",
            median(bare.clone()),
            bare.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ")
        );
        println!(
            "  source / bare: {:.2}",
            median(src) / median(bare)
        );
        h.shutdown().await;
    });
}
