//! The panel server: HTTP on one port (hyper 1) with the built-in page, `/healthz`,
//! `/metrics`, and the WebSocket stream `GET /v1/stream` (protocol v1, DESIGN §4).
//!
//! - One task per TCP connection; after a WebSocket upgrade the same task runs the panel
//!   session ([`session`]), which reads the journal through its own cursor.
//! - Fixed per-connection resources: `SO_SNDBUF` = [`budget::PANEL_SNDBUF`], a bounded
//!   queue of frames sent by reference, at most [`budget::MAX_FILTERS`] filters, inbound
//!   frames of at most [`budget::MAX_CLIENT_FRAME`]; at most `max_panels` panels plus
//!   [`HTTP_EXTRA_CONNECTIONS`] other HTTP connections at a time.
//! - Shutdown: stop accepting, close every panel with 1001, return within
//!   [`Options::shutdown_grace`].

pub mod fleet;
mod http;
mod inbound;
pub mod origin;
pub mod policy;
pub mod protocol;
mod session;
mod socket;
mod stall;
pub mod throttle;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::budget;
use crate::config::Config;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::shutdown::{self, Shutdown};
use policy::PanelPolicy;

/// HTTP connections (page, metrics, health, refused upgrades) allowed besides panels.
pub const HTTP_EXTRA_CONNECTIONS: usize = 32;

/// Timing and sizing knobs of the panel server. [`Options::default`] is what the daemon
/// uses; tests shorten the intervals.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server pings each panel this often.
    pub ping_interval: Duration,
    /// A panel that sent nothing (not even a pong) for this long is dropped.
    pub idle_timeout: Duration,
    /// Time allowed for a complete HTTP request head (slowloris guard); also the idle
    /// limit of a keep-alive connection between requests.
    pub handshake_timeout: Duration,
    /// `serve` returns at most this long after shutdown is fired.
    pub shutdown_grace: Duration,
    /// How long a closing session waits for its close frame to go out and the peer to
    /// close.
    pub close_linger: Duration,
    /// Events read from the journal per lock.
    pub batch: usize,
    /// How long a panel may hold a grant of the input pool (an op read slowly, or its
    /// replies not read) while other panels wait for one; then it is closed (1008).
    pub grant_hold: Duration,
    /// Grants in the input pool (`budget::INPUT_GRANTS`, which the budget counts; tests
    /// use fewer).
    pub input_grants: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
            close_linger: Duration::from_secs(1),
            batch: 64,
            grant_hold: Duration::from_secs(10),
            input_grants: budget::INPUT_GRANTS,
        }
    }
}

/// What the panel server takes from the config (`[panels]` and the parsed tokens).
#[derive(Debug, Clone)]
pub struct PanelSettings {
    /// Tokens, origins, the panel limit, the slow-panel policy, the metrics token: at
    /// the start.
    pub policy: PanelPolicy,
    /// Later policies (a reload): applied to new requests at once and to connected
    /// panels by [`policy::Admission::recheck`]. `None`: the policy never changes.
    pub updates: Option<watch::Receiver<Arc<PanelPolicy>>>,
    /// TLS on the port (`panels.tls_cert`/`tls_key`, loaded by the daemon; `None`: plain
    /// HTTP).
    pub tls: Option<Arc<crate::tls::server::ServerTls>>,
    /// `panels.peer_gateways`: the other boxes the built-in page fails over to
    /// ([`fleet`]); read at the start.
    pub peer_gateways: Vec<String>,
    /// One panel's queue of events ([`budget::queued_event_bytes`]): the pool of evicted
    /// frames stalled panels may hold is this times `max_panels`, at most
    /// [`budget::HELD_POOL_PANELS`] ([`budget::held_pool_for`]); a panel that cannot pay
    /// for what it holds is closed ([`crate::held`]).
    pub held_queue: usize,
}

impl PanelSettings {
    pub fn from_config(cfg: &Config) -> Self {
        PanelSettings {
            policy: PanelPolicy::from_config(cfg),
            updates: None,
            tls: None,
            peer_gateways: cfg.panels.peer_gateways.clone(),
            held_queue: budget::queued_event_bytes(cfg.journal.max_event_bytes),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PanelsError {
    #[error("panel listener: {0}")]
    Listener(std::io::Error),
}

/// Serve panels on `listener` until `shutdown` fires: each panel reads `journal` through
/// its own cursor; `metrics` counts panels, frames and refusals and is rendered at
/// `GET /metrics`. Errors: only a listener that cannot report its address.
pub async fn serve(
    listener: TcpListener,
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
    settings: PanelSettings,
    shutdown: Shutdown,
) -> Result<(), PanelsError> {
    serve_with(
        listener,
        journal,
        metrics,
        settings,
        shutdown,
        Options::default(),
    )
    .await
}

/// [`serve`] with explicit [`Options`].
pub async fn serve_with(
    listener: TcpListener,
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
    settings: PanelSettings,
    mut shutdown: Shutdown,
    opts: Options,
) -> Result<(), PanelsError> {
    let addr = listener.local_addr().map_err(PanelsError::Listener)?;
    let mut limit = settings.policy.max_panels;
    let permits = Arc::new(Semaphore::new(limit + HTTP_EXTRA_CONNECTIONS));
    let mut updates = settings.updates.clone();
    // Permits a lowered limit could not take back yet (they were in use): taken as
    // connections end.
    let mut owed = 0usize;
    let tls = settings
        .tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(t.config()));
    let server = Arc::new(Server::new(journal, metrics, settings, opts));
    let (trigger, conn_sd) = shutdown::channel();
    let mut tasks = JoinSet::new();
    let mut refusing = false;
    let mut accept_errors = crate::backoff::AcceptErrors::new("panel server");
    // While accepts fail (out of descriptors), none is tried until then; finished
    // connections are still reaped meanwhile, which is what frees descriptors.
    let mut paused_until: Option<tokio::time::Instant> = None;
    let scheme = if tls.is_some() { "https" } else { "http" };
    log::info!("panel server listening on {scheme}://{addr}/");
    loop {
        tokio::select! {
            biased;
            _ = shutdown.recv() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                if owed > 0 {
                    owed -= permits.forget_permits(owed);
                }
            }
            r = async { updates.as_mut()?.changed().await.ok() }, if updates.is_some() => {
                let Some(()) = r else {
                    updates = None;
                    continue;
                };
                let new = updates.as_mut().map(|u| u.borrow_and_update().clone());
                if let Some(new) = new {
                    // Connections beyond a lowered limit are not closed; they are not
                    // replaced until enough have gone.
                    if new.max_panels > limit {
                        let add = new.max_panels - limit;
                        let paid = add.min(owed);
                        owed -= paid;
                        permits.add_permits(add - paid);
                    } else {
                        let cut = limit - new.max_panels;
                        owed += cut - permits.forget_permits(cut);
                    }
                    limit = new.max_panels;
                    // The budget line was checked against the new max_panels.
                    let queue = server.settings.held_queue;
                    server.held.set_limit(budget::held_pool_for(new.max_panels, queue));
                    server.policy.send_replace(new);
                }
            }
            _ = tokio::time::sleep_until(paused_until.unwrap_or_else(tokio::time::Instant::now)),
                if paused_until.is_some() => paused_until = None,
            r = listener.accept(), if paused_until.is_none() => match r {
                Ok((stream, peer)) => {
                    accept_errors.accepted();
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        if !refusing {
                            log::warn!("panel server: connection limit reached, refusing connections");
                            refusing = true;
                        }
                        drop(stream);
                        continue;
                    };
                    refusing = false;
                    configure(&stream);
                    let server = server.clone();
                    let sd = conn_sd.clone();
                    let tls = tls.clone();
                    tasks.spawn(async move {
                        http::connection(server, stream, tls, peer, sd).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    paused_until = Some(tokio::time::Instant::now() + accept_errors.failed(&e));
                }
            }
        }
    }
    drop(listener);
    trigger.fire();
    drop(conn_sd);
    let grace = server.opts.shutdown_grace;
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        log::warn!(
            "panel server: {} connection(s) did not close within {grace:?}; aborting them",
            tasks.len()
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    log::info!("panel server stopped");
    Ok(())
}

/// Per-socket limits: a fixed kernel send buffer and no Nagle delay.
fn configure(stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    if let Err(e) = sock.set_send_buffer_size(budget::PANEL_SNDBUF) {
        log::debug!("SO_SNDBUF: {e}");
    }
    if let Err(e) = stream.set_nodelay(true) {
        log::debug!("TCP_NODELAY: {e}");
    }
}

/// State shared by every connection of one server.
pub(crate) struct Server {
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
    settings: PanelSettings,
    /// The policy in force; sessions watch it (a reload replaces it).
    policy: watch::Sender<Arc<PanelPolicy>>,
    opts: Options,
    /// Panels connected (or upgrading); never above `max_panels`.
    panels: AtomicUsize,
    /// Grants to read client ops with (`inbound`).
    input: inbound::InputPool,
    /// Failed authentications per source address.
    throttle: throttle::Throttle,
    /// Evicted events stalled panels still hold.
    held: Arc<crate::held::HeldPool>,
}

impl Server {
    fn new(
        journal: Arc<Journal>,
        metrics: Arc<Metrics>,
        settings: PanelSettings,
        opts: Options,
    ) -> Self {
        let pool = budget::held_pool_for(settings.policy.max_panels, settings.held_queue);
        let held = Arc::new(crate::held::HeldPool::new(pool));
        let input = inbound::InputPool::new(opts.input_grants.min(budget::INPUT_GRANTS));
        Server {
            journal,
            metrics,
            policy: watch::Sender::new(Arc::new(settings.policy.clone())),
            settings,
            opts,
            panels: AtomicUsize::new(0),
            input,
            throttle: throttle::Throttle::default(),
            held,
        }
    }

    /// The policy in force now.
    fn policy(&self) -> Arc<PanelPolicy> {
        self.policy.borrow().clone()
    }

    /// Reserve a panel slot, or `None` when `max_panels` are connected.
    fn reserve_panel(self: &Arc<Self>) -> Option<PanelSlot> {
        let max = self.policy().max_panels;
        self.panels
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.panels_connected.inc();
        Some(PanelSlot {
            server: self.clone(),
        })
    }
}

/// A reserved panel slot; released on drop.
pub(crate) struct PanelSlot {
    server: Arc<Server>,
}

impl Drop for PanelSlot {
    fn drop(&mut self) {
        self.server.panels.fetch_sub(1, Ordering::AcqRel);
        self.server.metrics.panels_connected.dec();
    }
}
