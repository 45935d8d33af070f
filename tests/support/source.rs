//! The source running in the test process, and its journal as the tests read it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use asb_gateway::app::Context;
use asb_gateway::config::{Config, LoadEnv};
use asb_gateway::event::EncodedEvent;

pub use super::emulator::{TOPIC, entities, start_emulator};
pub use super::{capture_all_logs, free_port};
use asb_gateway::shutdown::{self, Trigger};
use asb_gateway::source::{self, Options, SourceError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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
pub fn events(ctx: &Context) -> Vec<Arc<EncodedEvent>> {
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
