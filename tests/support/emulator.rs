//! The ASB emulator in the test (or bench) process: started on a loopback port, with
//! options, or again on the same address (with the same store) after a shutdown.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use asb_gateway::emulator::{
    EmulatorHandle, EmulatorOptions, Entities, EntityConfig, Store, TopicConfig,
};

/// The emulator with `opts` on a free loopback port.
pub async fn start(opts: EmulatorOptions) -> EmulatorHandle {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    asb_gateway::emulator::start(l, opts).await.unwrap()
}

/// The emulator with its default entities (topic `operational-events`, subscription
/// `edge`) on a free loopback port.
pub async fn start_default() -> EmulatorHandle {
    start(EmulatorOptions::default()).await
}

/// The emulator with `opts` on `addr`; the address of a stopped emulator may be held
/// for a moment, so binding is retried for up to 10 s.
pub async fn start_on(addr: SocketAddr, opts: EmulatorOptions) -> EmulatorHandle {
    let deadline = Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) if Instant::now() > deadline => panic!("bind emulator on {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    asb_gateway::emulator::start(listener, opts).await.unwrap()
}

/// The topic of the source tests' emulator.
pub const TOPIC: &str = "events";

/// Topic `TOPIC` with these subscriptions (max delivery count 10).
pub fn entities(lock: Duration, subs: &[&str]) -> Entities {
    Entities {
        namespace: "test".into(),
        queues: Vec::new(),
        topics: vec![TopicConfig {
            name: TOPIC.into(),
            subscriptions: subs
                .iter()
                .map(|s| EntityConfig {
                    name: s.to_string(),
                    lock_duration: lock,
                    max_delivery_count: 10,
                    ..Default::default()
                })
                .collect(),
        }],
    }
}

/// The emulator on `addr` ("127.0.0.1:0" for any port), with `store` to restart one.
pub async fn start_emulator(
    entities: Entities,
    store: Option<Store>,
    addr: &str,
) -> EmulatorHandle {
    start_on(
        addr.parse().expect("emulator address"),
        EmulatorOptions {
            entities,
            store,
            ..Default::default()
        },
    )
    .await
}
