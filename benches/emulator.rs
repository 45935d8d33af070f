//! Emulator throughput over loopback AMQP (not a timed test; prints figures):
//! - publish: the test `Publisher`, one message in flight (send, wait for accept);
//! - fan-out receive: a peek-lock receiver per subscription (credit 200), accepting
//!   each message, both subscriptions drained concurrently.
//!
//! Run: `cargo bench --bench emulator` (optional argument: message count, default 5000).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use asb_gateway::emulator::client::Publisher;
use asb_gateway::emulator::{EmulatorHandle, EmulatorOptions, Entities, EntityConfig, TopicConfig};
use fe2o3_amqp::Receiver;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;

async fn drain(h: &EmulatorHandle, sub: &str, n: usize) -> Duration {
    let support::amqp::Client {
        mut conn,
        mut session,
    } = support::amqp::connect(h, &format!("bench-{sub}")).await;
    let mut r = Receiver::builder()
        .name(format!("bench-rx-{sub}"))
        .source(format!("bench/Subscriptions/{sub}"))
        .credit_mode(CreditMode::Auto(200))
        .attach(&mut session)
        .await
        .unwrap();
    let t = Instant::now();
    for _ in 0..n {
        let d = r.recv::<Body<Value>>().await.unwrap();
        r.accept(&d).await.unwrap();
    }
    let el = t.elapsed();
    r.close().await.unwrap();
    conn.close().await.unwrap();
    el
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let sub = |name: &str| EntityConfig {
            name: name.into(),
            lock_duration: Duration::from_secs(60),
            max_delivery_count: 10,
            ..Default::default()
        };
        let entities = Entities {
            namespace: "bench".into(),
            queues: vec![],
            topics: vec![TopicConfig {
                name: "bench".into(),
                subscriptions: vec![sub("a"), sub("b")],
            }],
        };
        let h = support::emulator::start(EmulatorOptions { entities, ..Default::default() }).await;
        let body = br#"{"line":"line1","station":"press","celsius":41.5}"#.to_vec();
        let mut p = Publisher::connect(&h.connection_string(), "bench").await.unwrap();
        let t = Instant::now();
        for _ in 0..n {
            p.send_json("temp", &[("line", "line1")], body.clone(), "application/json")
                .await
                .unwrap();
        }
        let pub_el = t.elapsed();
        p.close().await.unwrap();
        println!(
            "emulator publish (1 in flight, 2 subscriptions): {n} msgs in {:.2?} = {:.0} msg/s",
            pub_el,
            n as f64 / pub_el.as_secs_f64()
        );
        let t = Instant::now();
        let (a, b) = tokio::join!(drain(&h, "a", n), drain(&h, "b", n));
        let all = t.elapsed();
        println!(
            "emulator peek-lock receive + accept, credit 200: sub a {:.0} msg/s, sub b {:.0} msg/s, both {:.0} msg/s total",
            n as f64 / a.as_secs_f64(),
            n as f64 / b.as_secs_f64(),
            2.0 * n as f64 / all.as_secs_f64()
        );
        let s = h.stats();
        for sub in ["a", "b"] {
            let st = &s[&format!("bench/Subscriptions/{sub}")];
            assert_eq!((st.completed, st.active, st.locked), (n as u64, 0, 0));
        }
        h.shutdown().await;
    });
}
