//! The daemon: builds the shared context, starts one task per part of the data flow
//! (source, panels, mirror), and shuts them down by broadcast.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::appliance::notify;
use crate::config::Config;
use crate::journal::{self, Journal};
use crate::liveness::{Liveness, Part};
use crate::metrics::{Metrics, PartState};
use crate::shutdown;

/// How long tasks get to drain after shutdown is fired.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(4);

/// What every part of the data flow shares.
#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub journal: Arc<Journal>,
    pub metrics: Arc<Metrics>,
    /// Heartbeats of the data path loops; gates the systemd watchdog pings.
    pub liveness: Arc<Liveness>,
}

impl Context {
    pub fn new(config: Config) -> Arc<Self> {
        Self::with_epoch(config, journal::new_epoch())
    }

    pub fn with_epoch(config: Config, epoch: String) -> Arc<Self> {
        let journal = Journal::new(config.journal_limits(), epoch);
        let metrics = Arc::new(Metrics::default());
        let budget = crate::budget::compute(&config);
        metrics.budget_bytes.set(budget.total() as u64);
        metrics.budget_limit_bytes.set(budget.limit_bytes as u64);
        metrics
            .journal_capacity_events
            .set(config.journal.events as u64);
        metrics
            .journal_capacity_bytes
            .set((config.journal.memory_mib << 20) as u64);
        metrics.mirror_state.set(if config.mqtt.is_some() {
            PartState::Starting
        } else {
            PartState::Disabled
        });
        Arc::new(Context {
            config,
            journal,
            metrics,
            liveness: Liveness::new(),
        })
    }

    /// Does settlement wait for the MQTT broker's acknowledgement?
    pub fn mirror_required(&self) -> bool {
        self.config.mqtt.as_ref().is_some_and(|m| m.required)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("memory budget exceeded: worst case {total} bytes > budget.memory_mib ({limit} bytes)")]
    OverBudget { total: usize, limit: usize },
    #[error("{part} failed: {reason}")]
    Part { part: &'static str, reason: String },
}

/// Run the gateway on `listener` (the panel port) until `shutdown_signal` resolves or a
/// part fails. One task per part of the data flow; shutdown by broadcast; tasks get
/// [`DRAIN_TIMEOUT`] to release unsettled messages and close panels.
pub async fn run(
    ctx: Arc<Context>,
    listener: TcpListener,
    shutdown_signal: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let budget = crate::budget::compute(&ctx.config);
    if !budget.fits() {
        return Err(RunError::OverBudget {
            total: budget.total(),
            limit: budget.limit_bytes,
        });
    }
    let (trigger, shutdown) = shutdown::channel();
    // Mirror -> source: "this seq is safely with the broker". At most `unsettled` events
    // can be pinned, so the channel never holds more than that.
    let (acks_tx, acks_rx) = mpsc::channel(ctx.config.journal.unsettled);
    let mut tasks: JoinSet<(&'static str, Result<(), String>)> = JoinSet::new();

    let source = crate::source::SourceContext::new(
        &ctx.config,
        ctx.journal.clone(),
        ctx.metrics.clone(),
        ctx.liveness.clone(),
    );
    let sd = shutdown.clone();
    tasks.spawn(async move {
        (
            "source",
            crate::source::run(source, acks_rx, sd)
                .await
                .map_err(|e| e.to_string()),
        )
    });
    let (c, sd) = (ctx.clone(), shutdown.clone());
    let addr = listener.local_addr().ok();
    tasks.spawn(async move {
        (
            "panels",
            crate::panels::serve(listener, c, sd)
                .await
                .map_err(|e| e.to_string()),
        )
    });
    if ctx.config.mqtt.is_some() {
        let (c, sd) = (ctx.clone(), shutdown.clone());
        tasks.spawn(async move {
            (
                "mirror",
                crate::mirror::run(c, acks_tx, sd)
                    .await
                    .map_err(|e| e.to_string()),
            )
        });
    } else {
        drop(acks_tx);
    }
    // Helpers whose end is not a failure (the watchdog returns at once when systemd
    // asked for none).
    let mut helpers = JoinSet::new();
    helpers.spawn(notify::status_reporter(
        ctx.metrics.clone(),
        shutdown.clone(),
    ));
    helpers.spawn(notify::watchdog(ctx.liveness.clone(), shutdown.clone()));
    helpers.spawn(journal_heartbeat(ctx.clone(), shutdown.clone()));
    drop(shutdown);
    // The panel port was bound before we were called and the source task is spawned.
    notify::ready();
    log::info!(
        "asb-gateway {} running: panels on {}, epoch {}",
        env!("CARGO_PKG_VERSION"),
        addr.map(|a| a.to_string()).unwrap_or_default(),
        ctx.journal.epoch()
    );

    tokio::pin!(shutdown_signal);
    let mut failure = None;
    tokio::select! {
        _ = &mut shutdown_signal => log::info!("shutting down"),
        Some(done) = tasks.join_next() => {
            failure = Some(match done {
                Ok((part, Err(reason))) => RunError::Part { part, reason },
                Ok((part, Ok(()))) => RunError::Part { part, reason: "stopped unexpectedly".into() },
                Err(e) => RunError::Part { part: "task", reason: e.to_string() },
            });
        }
    }
    notify::stopping();
    trigger.fire();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(done) = tasks.join_next().await {
            if let Ok((part, Err(reason))) = done {
                log::warn!("{part} stopped with an error: {reason}");
            }
        }
    })
    .await;
    if drained.is_err() {
        log::warn!("some tasks did not stop within {DRAIN_TIMEOUT:?}; aborting them");
        tasks.shutdown().await;
    }
    helpers.shutdown().await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The journal has no loop of its own: prove at every beat interval that its lock
/// can be taken (a wedged journal stops the watchdog pings), and keep its gauges current.
async fn journal_heartbeat(ctx: Arc<Context>, mut shutdown: shutdown::Shutdown) {
    ctx.liveness.register(Part::Journal);
    let mut tick = tokio::time::interval(ctx.liveness.beat_interval());
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tick.tick() => {}
        }
        ctx.metrics.journal_events.set(ctx.journal.len() as u64);
        ctx.metrics.journal_bytes.set(ctx.journal.bytes() as u64);
        ctx.liveness.beat(Part::Journal);
    }
}
