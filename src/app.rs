//! The daemon: assembles the gateway from a [`Config`] ([`Context`]), starts one task per
//! part of the data flow (source, panels, mirror), hands each part only what it uses, and
//! shuts them down by broadcast. Nothing below this module imports it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::appliance::notify;
use crate::budget::Budget;
use crate::config::Config;
use crate::durable::{self, DurableSettings, Persistence};
use crate::journal::snapshot::StateDir;
use crate::journal::{self, Journal};
use crate::liveness::{Liveness, Part};
use crate::metrics::{Metrics, PartState};
use crate::mirror::MirrorSettings;
use crate::panels::PanelSettings;
use crate::panels::policy::PanelPolicy;
use crate::reload::Reload;
use crate::shutdown::{self, Shutdown};
use crate::source::SourceSettings;
use crate::source::tracker::{Dedup, SharedDedup};
use crate::tls::server::ServerTls;
use crate::tls::{CertFiles, ReloadableCert};

/// How long tasks get to drain after shutdown is fired.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(4);

/// The assembled gateway: the config, the journal, the metrics and the liveness
/// heartbeats. Only [`run`] (and tests driving one part) take parts of it; the parts
/// themselves get narrow inputs.
#[derive(Debug)]
pub struct Context {
    pub config: Config,
    /// The worst-case memory of `config`, computed once.
    pub budget: Budget,
    pub journal: Arc<Journal>,
    pub metrics: Arc<Metrics>,
    /// Heartbeats of the data path loops; gates the systemd watchdog pings.
    pub liveness: Arc<Liveness>,
    /// The source's duplicate-suppression window (restored with the journal).
    pub dedup: Arc<SharedDedup>,
    /// Keeps the journal in `journal.state_dir`; `None`: memory only.
    pub persistence: Option<Arc<Persistence>>,
}

impl Context {
    pub fn new(config: Config) -> Arc<Self> {
        Self::with_epoch(config, journal::new_epoch())
    }

    pub fn with_epoch(config: Config, epoch: String) -> Arc<Self> {
        let budget = crate::budget::compute(&config);
        Self::assemble(config, budget, epoch)
    }

    /// The gateway for `config`, whose worst-case memory `budget` the caller computed
    /// (and checked, before anything is allocated).
    /// With `journal.state_dir`, the journal is restored from its snapshot (or starts a
    /// new `epoch` when there is none or it is damaged).
    pub fn assemble(config: Config, budget: Budget, epoch: String) -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let limits = config.journal_limits();
        let window = SourceSettings::from_config(&config).dedup_window;
        let (journal, dedup, persistence) = match &config.journal.state_dir {
            Some(dir) => {
                let settings = DurableSettings {
                    state: StateDir::new(dir),
                    checkpoint: Duration::from_secs(config.journal.checkpoint_secs),
                    subscriptions: config
                        .source
                        .subscriptions
                        .iter()
                        .map(|s| s.address())
                        .collect(),
                    mirror_required: config.mirror_required(),
                };
                let r = durable::restore(settings, limits, window, epoch, metrics.clone());
                (r.journal, r.dedup, r.persistence)
            }
            None => (
                Journal::new(limits, epoch),
                Arc::new(SharedDedup::new(Dedup::new(window))),
                None,
            ),
        };
        match &persistence {
            Some(p) => log::info!(
                "journal: kept in {} (checkpoint every {}s{})",
                p.settings().state.dir().display(),
                config.journal.checkpoint_secs,
                if config.journal.checkpoint_secs == 0 {
                    ": at graceful stop only"
                } else {
                    ""
                }
            ),
            None if config.journal.state_dir.is_none() => log::info!(
                "journal: memory only (no journal.state_dir and no $STATE_DIRECTORY): \
                 history does not survive a restart"
            ),
            None => {}
        }
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
            budget,
            journal,
            metrics,
            liveness: Liveness::new(),
            dedup,
            persistence,
        })
    }

    /// The mirror's inputs, `None` when the config has no `[mqtt]` section.
    pub fn mirror_inputs(&self) -> Option<(MirrorSettings, crate::mirror::Shared)> {
        let settings = MirrorSettings::from_config(&self.config)?;
        let shared = crate::mirror::Shared {
            journal: self.journal.clone(),
            metrics: self.metrics.clone(),
            liveness: self.liveness.clone(),
        };
        Some((settings, shared))
    }

    /// The panel server's settings.
    pub fn panel_settings(&self) -> PanelSettings {
        PanelSettings::from_config(&self.config)
    }

    /// The source's inputs: its settings and the handles it shares.
    pub fn source_context(&self) -> crate::source::SourceContext {
        crate::source::SourceContext::new(
            &self.config,
            self.journal.clone(),
            self.metrics.clone(),
            self.liveness.clone(),
            self.dedup.clone(),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("memory budget exceeded: worst case {total} bytes > budget.memory_mib ({limit} bytes)")]
    OverBudget { total: usize, limit: usize },
    #[error("{part} failed: {reason}")]
    Part { part: &'static str, reason: String },
}

/// The certificates a reload re-reads.
#[derive(Default)]
struct Reloadable {
    /// The panel port's server certificate.
    panels: Option<Arc<ServerTls>>,
    /// The mirror's client certificate (used from its next connection on).
    mqtt: Option<(CertFiles, Arc<ReloadableCert>)>,
}

/// What the reloader needs besides the certificates: the config as it runs (live
/// settings replaced by each reload) and the channel the panel server takes its policy
/// from.
struct Running {
    config: Config,
    panels: watch::Sender<Arc<PanelPolicy>>,
}

/// Apply each reload (SIGHUP) until shutdown, between `RELOADING=1` and `READY=1`:
/// - the config file is read again and checked as at start (and against the memory
///   budget); a config that fails is refused with the error in the log and the running
///   one stays. Otherwise its live settings are applied (see [`crate::config::reload`]:
///   tokens, origins, the panel limit, the slow-panel policy, the metrics token, the
///   log level) and one line says what was applied and what needs a restart;
/// - the panel port's and the mirror's certificates are read again (a file that fails
///   the checks keeps the certificate in use).
async fn reloader(
    certs: Reloadable,
    mut running: Running,
    metrics: Arc<Metrics>,
    mut reload: Reload,
    mut shutdown: Shutdown,
) {
    fn said(
        key: &str,
        files: &CertFiles,
        r: Result<crate::tls::LoadedCert, crate::tls::CertError>,
    ) {
        match r {
            Ok(cert) => {
                log::info!(
                    "reload: {key} {} re-read, valid until {}",
                    crate::redact::escaped_path(&files.cert),
                    humantime::format_rfc3339_seconds(cert.not_after)
                );
                if let Some(w) = crate::tls::certs::expiry_warning(key, files, cert.not_after) {
                    log::warn!("{w}");
                }
            }
            Err(e) => log::error!("reload: {key} kept: {e}"),
        }
    }
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = reload.recv() => {}
        }
        notify::reloading();
        if let Some(path) = reload.config_file() {
            reload_config(path, &mut running);
        }
        if let Some(tls) = &certs.panels {
            said("panels.tls_cert", &tls.files, tls.reload());
            metrics.panels_cert_expiry.set(tls.not_after());
        }
        if let Some((files, cert)) = &certs.mqtt {
            let r = crate::tls::certs::load(files).inspect(|c| {
                cert.set(c);
                metrics.mqtt_cert_expiry.set(c.not_after);
            });
            said("mqtt.client_cert", files, r);
        }
        notify::ready();
    }
}

/// Read the config at `path` again and apply its live settings to `running` (and to
/// the panel server), or refuse it and keep the running config.
fn reload_config(path: &std::path::Path, running: &mut Running) {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            log::error!(
                "reload: {}: {e}; refused, the running config stays",
                crate::redact::escaped_path(path)
            );
            return;
        }
    };
    let budget = crate::budget::compute(&new);
    if !budget.fits() {
        log::error!(
            "reload: {}: budget.memory_mib: the worst case ({} bytes) exceeds the budget \
             ({} bytes); refused, the running config stays",
            crate::redact::escaped_path(path),
            budget.total(),
            budget.limit_bytes
        );
        return;
    }
    // No `new.warnings()` here: the certificates' expiry is said once below, as each is
    // re-read, and the clear-text warning concerns panels.listen, which needs a restart.
    let changes = crate::config::reload::apply_live(&mut running.config, &new);
    if changes.applied.iter().any(|k| k.starts_with("panels.")) {
        running
            .panels
            .send_replace(Arc::new(PanelPolicy::from_config(&running.config)));
    }
    if changes.applied.contains(&"log.level") {
        let rust_log = std::env::var("RUST_LOG").ok();
        let level =
            crate::appliance::logging::choose_level(rust_log.as_deref(), &running.config.log.level);
        log::set_max_level(level);
    }
    log::info!(
        "reload: {}: {}",
        crate::redact::escaped_path(path),
        changes.summary()
    );
}

/// Run the gateway on `listener` (the panel port) until `shutdown_signal` resolves or a
/// part fails. One task per part of the data flow; shutdown by broadcast; tasks get
/// [`DRAIN_TIMEOUT`] to release unsettled messages and close panels.
pub async fn run(
    ctx: Arc<Context>,
    listener: TcpListener,
    shutdown_signal: impl Future<Output = ()>,
    reload: Reload,
) -> Result<(), RunError> {
    if !ctx.budget.fits() {
        return Err(RunError::OverBudget {
            total: ctx.budget.total(),
            limit: ctx.budget.limit_bytes,
        });
    }
    // Certificates are read (and may fail) before any part starts.
    let mut panel_settings = ctx.panel_settings();
    if let Some(tls) = &ctx.config.panels.tls {
        let tls = ServerTls::load(tls.files.clone()).map_err(|e| RunError::Part {
            part: "panels",
            reason: e.to_string(),
        })?;
        ctx.metrics.panels_cert_expiry.set(tls.not_after());
        panel_settings.tls = Some(tls);
    }
    let (policy_tx, policy_rx) = watch::channel(Arc::new(panel_settings.policy.clone()));
    panel_settings.updates = Some(policy_rx);
    let mut reloadable = Reloadable {
        panels: panel_settings.tls.clone(),
        ..Reloadable::default()
    };
    let mirror = ctx.mirror_inputs();
    if let Some(t) = mirror
        .as_ref()
        .and_then(|(m, _)| m.mqtt.client_tls.as_ref())
    {
        let loaded = crate::tls::certs::load(&t.files).map_err(|e| RunError::Part {
            part: "mirror",
            reason: e.to_string(),
        })?;
        ctx.metrics.mqtt_cert_expiry.set(loaded.not_after);
        reloadable.mqtt = Some((t.files.clone(), ReloadableCert::new(&loaded)));
    }
    let (trigger, shutdown) = shutdown::channel();
    // Mirror -> source: "this seq is safely with the broker". At most `unsettled` events
    // can be pinned, so the channel never holds more than that.
    let (acks_tx, acks_rx) = mpsc::channel(ctx.config.journal.unsettled);
    let mut tasks: JoinSet<(&'static str, Result<(), String>)> = JoinSet::new();

    let source = ctx.source_context();
    let sd = shutdown.clone();
    tasks.spawn(async move {
        (
            "source",
            crate::source::run(source, acks_rx, sd)
                .await
                .map_err(|e| e.to_string()),
        )
    });
    let addr = listener.local_addr().ok();
    let panels = crate::panels::serve(
        listener,
        ctx.journal.clone(),
        ctx.metrics.clone(),
        panel_settings,
        shutdown.clone(),
    );
    tasks.spawn(async move { ("panels", panels.await.map_err(|e| e.to_string())) });
    if let Some((mut settings, shared)) = mirror {
        settings.client_cert = reloadable.mqtt.as_ref().map(|(_, c)| c.clone());
        let mirror = crate::mirror::run(settings, shared, acks_tx, shutdown.clone());
        tasks.spawn(async move { ("mirror", mirror.await.map_err(|e| e.to_string())) });
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
    helpers.spawn(journal_heartbeat(
        ctx.journal.clone(),
        ctx.metrics.clone(),
        ctx.liveness.clone(),
        shutdown.clone(),
    ));
    if let Some(p) = &ctx.persistence {
        helpers.spawn(durable::checkpoints(p.clone(), shutdown.clone()));
    }
    helpers.spawn(reloader(
        reloadable,
        Running {
            config: ctx.config.clone(),
            panels: policy_tx,
        },
        ctx.metrics.clone(),
        reload,
        shutdown.clone(),
    ));
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
    // The source has released what it held and nothing appends any more: save the
    // journal (with the pinned events, which come back as redeliveries).
    if let Some(p) = ctx.persistence.clone() {
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || p.checkpoint(true)).await {
            Ok(Ok(_)) => log::info!(
                "journal: snapshot of {} event(s) written in {:?}",
                ctx.journal.len(),
                started.elapsed()
            ),
            // Logged and counted by the writer.
            Ok(Err(_)) => {}
            Err(e) => log::error!("journal: snapshot task failed: {e}"),
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The journal has no loop of its own: prove at every beat interval that its lock
/// can be taken (a wedged journal stops the watchdog pings), and keep its gauges current.
async fn journal_heartbeat(
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
    liveness: Arc<Liveness>,
    mut shutdown: shutdown::Shutdown,
) {
    liveness.register(Part::Journal);
    let mut tick = tokio::time::interval(liveness.beat_interval());
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tick.tick() => {}
        }
        metrics.journal_events.set(journal.len() as u64);
        metrics.journal_bytes.set(journal.bytes() as u64);
        liveness.beat(Part::Journal);
    }
}
