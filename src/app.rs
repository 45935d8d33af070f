//! The daemon: builds the shared context, starts one task per part of the data flow
//! (source, panels, mirror), and shuts them down by broadcast.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::appliance::notify::Liveness;
use crate::config::Config;
use crate::journal::{self, Journal};
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
    #[error("{0}")]
    NotBuilt(&'static str),
    #[error("{part} failed: {reason}")]
    Part { part: &'static str, reason: String },
}

/// Run the gateway on `listener` (the panel port) until `shutdown` resolves.
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
    let (trigger, _sd) = shutdown::channel();
    let _ = (listener, shutdown_signal, trigger);
    Err(RunError::NotBuilt(
        "the source, panel server and mirror are not built yet (issues 3, 4, 5)",
    ))
}
