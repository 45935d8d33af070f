//! Helpers shared by the source's integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use asb_gateway::app::Context;
use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::emulator::{
    EmulatorHandle, EmulatorOptions, Entities, EntityConfig, Store, TopicConfig,
};
use asb_gateway::journal::Event;
use asb_gateway::shutdown::{self, Trigger};
use asb_gateway::source::{self, Options, SourceError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    asb_gateway::emulator::start(
        l,
        EmulatorOptions {
            entities,
            store,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

pub fn context(toml: &str) -> Arc<Context> {
    let config = Config::parse(toml, &LoadEnv::default()).expect("test config");
    Context::new(config)
}

/// A running source.
pub struct Running {
    pub ctx: Arc<Context>,
    pub trigger: Trigger,
    pub acks: mpsc::Sender<asb_gateway::journal::Handoff>,
    pub task: JoinHandle<Result<(), SourceError>>,
}

impl Running {
    /// Fire shutdown and wait (bounded) for the source to return.
    pub async fn stop(self) -> Result<(), SourceError> {
        self.trigger.fire();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("source stops within 5 s")
            .expect("source task")
    }
}

pub fn start(ctx: Arc<Context>, opts: Options) -> Running {
    let (trigger, sd) = shutdown::channel();
    let (acks, rx) = mpsc::channel(ctx.config.journal.unsettled);
    let task = tokio::spawn(source::run_with(ctx.source_context(), rx, sd, opts));
    Running {
        ctx,
        trigger,
        acks,
        task,
    }
}

/// Fast retries for tests.
pub fn fast() -> Options {
    Options {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        step_timeout: Duration::from_secs(5),
        ..Options::default()
    }
}

/// Poll `cond` every 20 ms until it holds; panic with `what` after `limit`.
pub async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Poll an async condition.
pub async fn wait_for_async<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every event retained in the journal, oldest first.
pub fn events(ctx: &Context) -> Vec<Arc<Event>> {
    let mut cursor = ctx.journal.oldest();
    let mut out = Vec::new();
    ctx.journal.read(&mut cursor, &mut out, usize::MAX);
    out
}

pub fn bodies(ctx: &Context) -> Vec<String> {
    events(ctx)
        .iter()
        .map(|e| String::from_utf8_lossy(&e.body()).into_owned())
        .collect()
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Captures every log record of the process (installed once).
pub struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        let line = format!("{} {} {}", r.level(), r.target(), r.args());
        // Shown by the test runner only when the test fails.
        eprintln!("{line}");
        if let Ok(mut v) = self.0.lock() {
            v.push(line);
        }
    }
    fn flush(&self) {}
}

pub fn capture_logs() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        let _ = log::set_logger(c);
        log::set_max_level(log::LevelFilter::Trace);
        c
    })
}

impl Capture {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}
