//! The source (DESIGN §2, §5): one AMQP 1.0 receiver link per configured subscription,
//! peek-lock only, with credit set by demand: the total credit across links never exceeds
//! the free room of the unsettled window (`journal.unsettled` minus what is in it) nor the
//! journal's room. Each message is decoded, routed and appended to the journal (this task
//! is the journal's only writer), then settled:
//! - completed (accepted) right after the append, or — when the mirror is required — once
//!   the mirror acknowledges its seq on `acks`;
//! - dead-lettered (`com.microsoft:dead-letter`) when too large or undecodable;
//! - released on graceful shutdown.
//!
//! Redeliveries (same subscription and `x-opt-sequence-number`, same message-id and
//! enqueued time) within a recent window are not appended again. Connection loss, link
//! detach and token rejection are retried with exponential backoff and jitter; deliveries
//! held on a link that died are counted and left to the broker to redeliver.

mod cbs;
pub mod decode;
pub mod renew;
pub mod tls;
pub mod tracker;

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::{Delivery, DeliveryInfo};
use fe2o3_amqp::link::{ErrorRecovery, RecvError};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Receiver, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_types::definitions::{
    self, ErrorCondition, Fields, ReceiverSettleMode, SenderSettleMode,
};
use fe2o3_amqp_types::messaging::Body;
use fe2o3_amqp_types::primitives::{Symbol, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};

use crate::backoff::Backoff;
use crate::config::{AuthMode, Config, ConnectionString, Credential, SubscriptionConfig};
use crate::event::EncodedEvent;
use crate::journal::{Handoff, Journal, JournalError};
use crate::liveness::{Liveness, Part};
use crate::metrics::{DeadLetterReason, Metrics, PartState};
use crate::routing::{Origin, Template};
use crate::shutdown::Shutdown;

pub use cbs::TOKEN_TYPE;
use decode::{Decoded, Rejection};
use renew::{LockRenewer, RenewError};
use tracker::{Dedup, DedupKey, Held, Lock, Tracker, fingerprint, plan_credit};

/// The condition ASB reads as "dead-letter this message".
pub const DEAD_LETTER_CONDITION: &str = "com.microsoft:dead-letter";

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("AMQP open with {addr} failed: {reason}")]
    Open { addr: String, reason: String },
    #[error("AMQP session failed: {0}")]
    Session(String),
    #[error("CBS token for {audience} rejected: {reason}")]
    TokenRejected { audience: String, reason: String },
    #[error("CBS: {0}")]
    Cbs(String),
    #[error("cannot attach a receiver to {address}: {reason}")]
    Attach { address: String, reason: String },
    #[error("connection lost: {0}")]
    ConnectionLost(String),
}

impl SourceError {
    /// A coarse kind, to log a failure once rather than on every retry.
    fn kind(&self) -> &'static str {
        match self {
            SourceError::Tls(_) => "tls",
            SourceError::Connect { .. } => "connect",
            SourceError::Open { .. } => "open",
            SourceError::Session(_) => "session",
            SourceError::TokenRejected { .. } => "token",
            SourceError::Cbs(_) => "cbs",
            SourceError::Attach { .. } => "attach",
            SourceError::ConnectionLost(_) => "lost",
        }
    }
}

/// Tuning that is not part of the config file (tests, benchmarks).
#[derive(Debug, Clone)]
pub struct Options {
    /// Re-put CBS tokens this often; default: 80% of the token lifetime.
    pub token_refresh: Option<Duration>,
    /// Lifetime of signed tokens; default `source.token_ttl_secs`.
    pub token_ttl: Option<Duration>,
    /// First and longest reconnect delay (jittered, doubling).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long a connection or link must stay up before its backoff starts again
    /// from `backoff_min` (see [`crate::backoff`]).
    pub healthy_after: Duration,
    /// Bound on TCP connect, TLS, AMQP open, CBS and attach, each.
    pub step_timeout: Duration,
    /// AMQP idle timeout announced to the peer (it must send something this often).
    pub idle_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            token_refresh: None,
            token_ttl: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(30),
            step_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// What the source needs from the config, taken once from [`Config`] by the daemon
/// ([`SourceSettings::from_config`]).
#[derive(Debug, Clone)]
pub struct SourceSettings {
    /// The namespace: host, port, AMQPS or plain AMQP, SAS credential (secrets redacted
    /// in Debug).
    pub connection: ConnectionString,
    /// `source.auth`: CBS put-token (ASB) or SASL PLAIN.
    pub auth: AuthMode,
    /// Lifetime of the SAS tokens the source signs (`source.token_ttl_secs`).
    pub token_ttl: Duration,
    /// One receiver link each, in this order (`[[source.subscriptions]]`).
    pub subscriptions: Vec<SubscriptionConfig>,
    /// The topic template events are routed with (`routing.topic`).
    pub template: Template,
    /// Largest encoded event, bytes (`journal.max_event_bytes`); larger bodies are
    /// dead-lettered with `PayloadTooLarge`.
    pub max_event_bytes: usize,
    /// Ceiling on messages received but not settled (`journal.unsettled`): total link
    /// credit never exceeds its free room.
    pub unsettled: usize,
    /// Messages remembered to recognise redeliveries (`journal.events`).
    pub dedup_window: usize,
    /// Complete a message only on the mirror's acknowledgement (`[mqtt]` present and
    /// `mqtt.required`).
    pub mirror_required: bool,
}

impl SourceSettings {
    pub fn from_config(cfg: &Config) -> Self {
        SourceSettings {
            connection: cfg.connection.clone(),
            auth: cfg.source.auth,
            token_ttl: Duration::from_secs(cfg.source.token_ttl_secs),
            subscriptions: cfg.source.subscriptions.clone(),
            template: cfg.template.clone(),
            max_event_bytes: cfg.journal.max_event_bytes,
            unsettled: cfg.journal.unsettled,
            dedup_window: cfg.journal.events,
            mirror_required: cfg.mqtt.as_ref().is_some_and(|m| m.required),
        }
    }
}

/// Everything the source task is given: its settings and the handles it shares with the
/// rest of the daemon. The source is the journal's only writer.
#[derive(Debug, Clone)]
pub struct SourceContext {
    pub settings: SourceSettings,
    pub journal: Arc<Journal>,
    pub metrics: Arc<Metrics>,
    /// The source beats as [`Part::Source`].
    pub liveness: Arc<Liveness>,
}

impl SourceContext {
    /// The settings taken from `config`, with the shared handles.
    pub fn new(
        config: &Config,
        journal: Arc<Journal>,
        metrics: Arc<Metrics>,
        liveness: Arc<Liveness>,
    ) -> Self {
        SourceContext {
            settings: SourceSettings::from_config(config),
            journal,
            metrics,
            liveness,
        }
    }
}

/// Run the source until `shutdown`.
///
/// `acks` carries the mirror's word on pinned events (when the mirror is required):
/// [`Handoff::Delivered`] completes the message, [`Handoff::Rejected`] dead-letters it.
///
/// Errors: only what retrying cannot fix ([`SourceError::Tls`]: no TLS roots). Every
/// other failure (connect, open, CBS, attach, connection loss) is logged, shown in the
/// metrics and retried with backoff; the function returns `Ok(())` on shutdown, after
/// releasing what it holds.
pub async fn run(
    cx: SourceContext,
    acks: mpsc::Receiver<Handoff>,
    shutdown: Shutdown,
) -> Result<(), SourceError> {
    run_with(cx, acks, shutdown, Options::default()).await
}

/// [`run`] with explicit [`Options`].
pub async fn run_with(
    cx: SourceContext,
    mut acks: mpsc::Receiver<Handoff>,
    mut shutdown: Shutdown,
    opts: Options,
) -> Result<(), SourceError> {
    let mut src = Source::new(cx, opts)?;
    src.liveness.register(Part::Source);
    let mut backoff = src.backoff();
    let mut logged: Option<&'static str> = None;
    let mut attempts: u64 = 0;
    let cs = &src.settings.connection;
    let addr = format!("{}:{}", cs.host, cs.port);
    loop {
        if shutdown.is_shutdown() {
            break;
        }
        if attempts > 0 {
            src.metrics.source_reconnects.inc();
        }
        attempts += 1;
        let connected = tokio::select! {
            biased;
            _ = shutdown.recv() => break,
            r = src.connect() => r,
        };
        let failure = match connected {
            Ok(mut conn) => {
                backoff.up();
                src.metrics.source_state.set(PartState::Up);
                log::info!(
                    "source up: connected to {addr} ({} subscription(s))",
                    src.links.len()
                );
                logged = None;
                match src.serve(&mut conn, &mut acks, &mut shutdown).await {
                    Stop::Shutdown => {
                        src.close(conn).await;
                        src.metrics.source_state.set(PartState::Down);
                        log::info!("source stopped");
                        return Ok(());
                    }
                    Stop::Lost(e) => {
                        src.lose_all_links();
                        // The peer is gone or misbehaving: do not wait long for it.
                        let _ = timeout(Duration::from_millis(200), conn.connection.close()).await;
                        e
                    }
                }
            }
            Err(e) => e,
        };
        src.metrics.source_state.set(PartState::Down);
        if logged != Some(failure.kind()) {
            log::warn!("source down: {failure}; reconnecting with backoff");
            logged = Some(failure.kind());
        } else {
            log::debug!("source still down: {failure}");
        }
        let delay = backoff.down();
        if src.wait(delay, &mut acks, &mut shutdown).await {
            break;
        }
    }
    src.metrics.source_state.set(PartState::Down);
    log::info!("source stopped");
    Ok(())
}

/// Why serving a connection ended.
enum Stop {
    Shutdown,
    Lost(SourceError),
}

/// One subscription's link.
struct Link {
    address: String,
    audience: String,
    receiver: Option<Receiver>,
    /// Bumped whenever the link is lost: deliveries of an older generation are void.
    generation: u64,
    /// When to try to attach again (link lost while the connection lives).
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// The down reason last logged: a link that flaps (attached, then detached at once)
    /// is one state, logged once, until it stays attached for `healthy_after`.
    logged: Option<String>,
    /// A down state was logged since the last "attached" line.
    warned: bool,
    attached_at: Option<Instant>,
    /// The entity's `$management` client for lock renewal, attached when first needed.
    renewer: Option<LockRenewer>,
}

/// A live connection.
struct Conn {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    cbs: Option<CbsClient>,
    refresh_at: Option<Instant>,
}

/// The state of the source that survives reconnects.
struct Source {
    settings: SourceSettings,
    journal: Arc<Journal>,
    metrics: Arc<Metrics>,
    liveness: Arc<Liveness>,
    opts: Options,
    tokens: cbs::Tokens,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    links: Vec<Link>,
    tracker: Tracker<DeliveryInfo>,
    dedup: Dedup,
    required: bool,
    acks_open: bool,
    /// Rotates which link is polled and served credit first.
    rotate: usize,
    scratch: Vec<Held<DeliveryInfo>>,
    credit_now: Vec<Option<u32>>,
    credit_new: Vec<Option<u32>>,
    /// When the next held lock is due for renewal.
    renew_at: Option<Instant>,
    /// The renewal failure last logged (None = renewals work), logged once per change.
    renew_logged: Option<String>,
    /// Events the mirror rejected whose delivery could not be dead-lettered then (lock
    /// lost, link or connection gone): the broker's redelivery is dead-lettered instead
    /// of completed. Bounded by `journal.unsettled`.
    rejected: std::collections::VecDeque<(u64, String)>,
}

// Lives on the stack for one loop turn; boxing the delivery would allocate per message.
#[allow(clippy::large_enum_variant)]
enum Event {
    Shutdown,
    /// The heartbeat timer: an idle loop still proves it turns.
    Beat,
    Ack(Option<Handoff>),
    Refresh,
    Retry,
    Renew,
    Delivery(usize, Result<Delivery<Body<Value>>, RecvError>),
}

impl Source {
    fn new(cx: SourceContext, opts: Options) -> Result<Self, SourceError> {
        let SourceContext {
            settings,
            journal,
            metrics,
            liveness,
        } = cx;
        let ttl = opts.token_ttl.unwrap_or(settings.token_ttl);
        let tokens = cbs::Tokens::new(&settings.connection, ttl);
        let tls = if settings.connection.tls {
            Some(tls::client_config()?)
        } else {
            None
        };
        let links: Vec<Link> = settings
            .subscriptions
            .iter()
            .map(|s| {
                let address = s.address();
                Link {
                    audience: tokens.audience(&address),
                    address,
                    receiver: None,
                    generation: 0,
                    retry_at: None,
                    backoff: Backoff::new(opts.backoff_min, opts.backoff_max, opts.healthy_after),
                    logged: None,
                    warned: false,
                    attached_at: None,
                    renewer: None,
                }
            })
            .collect();
        metrics
            .links
            .init(links.iter().map(|l| l.address.clone()));
        let n = links.len();
        let unsettled = settings.unsettled;
        Ok(Source {
            required: settings.mirror_required,
            tracker: Tracker::new(unsettled),
            dedup: Dedup::new(settings.dedup_window),
            scratch: Vec::with_capacity(unsettled),
            credit_now: vec![None; n],
            credit_new: vec![None; n],
            acks_open: true,
            rotate: 0,
            renew_at: None,
            renew_logged: None,
            rejected: std::collections::VecDeque::with_capacity(unsettled),
            links,
            tokens,
            tls,
            opts,
            settings,
            journal,
            metrics,
            liveness,
        })
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(
            self.opts.backoff_min,
            self.opts.backoff_max,
            self.opts.healthy_after,
        )
    }

    fn refresh_interval(&self) -> Option<Duration> {
        if self.settings.auth != AuthMode::Cbs || !self.tokens.renewable() {
            return None;
        }
        Some(self.opts.token_refresh.unwrap_or_else(|| {
            let ttl = self
                .opts
                .token_ttl
                .unwrap_or(self.settings.token_ttl);
            ttl.mul_f64(0.8)
        }))
    }

    /// Connect, authenticate and attach every link.
    async fn connect(&mut self) -> Result<Conn, SourceError> {
        let cs = &self.settings.connection;
        let addr = format!("{}:{}", cs.host, cs.port);
        let step = self.opts.step_timeout;
        let tcp = timeout(step, TcpStream::connect((cs.host.as_str(), cs.port)))
            .await
            .map_err(|_| SourceError::Connect {
                addr: addr.clone(),
                reason: "timed out".into(),
            })?
            .map_err(|e| SourceError::Connect {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let sasl = match self.settings.auth {
            AuthMode::Cbs => SaslProfile::Anonymous,
            AuthMode::Plain => match &cs.credential {
                Credential::Key { name, key } => SaslProfile::Plain {
                    username: name.clone(),
                    password: key.expose().to_string(),
                },
                // Config validation refuses `plain` without a key.
                Credential::Signature(_) => SaslProfile::Anonymous,
            },
        };
        let container = format!("asb-gateway-{:08x}", fastrand::u32(..));
        let builder = Connection::builder()
            .container_id(container)
            .hostname(cs.host.as_str())
            .sasl_profile(sasl)
            .idle_time_out(self.opts.idle_timeout.as_millis() as u32);
        let open_err = |reason: String| SourceError::Open {
            addr: addr.clone(),
            reason,
        };
        let opened = match &self.tls {
            Some(cfg) => {
                let stream = timeout(step, tls::connect(cfg.clone(), &cs.host, tcp))
                    .await
                    .map_err(|_| {
                        SourceError::Tls(format!("TLS handshake with {addr} timed out"))
                    })??;
                timeout(step, builder.open_with_stream(stream)).await
            }
            None => timeout(step, builder.open_with_stream(tcp)).await,
        };
        let mut connection = opened
            .map_err(|_| open_err("timed out".into()))?
            .map_err(|e| open_err(e.to_string()))?;
        let mut session = match timeout(step, Session::begin(&mut connection)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SourceError::Session(e.to_string())),
            Err(_) => return Err(SourceError::Session("begin timed out".into())),
        };
        let mut cbs = None;
        if self.settings.auth == AuthMode::Cbs {
            let mut client = timeout(step, CbsClient::attach(&mut session))
                .await
                .map_err(|_| SourceError::Cbs("attaching to $cbs timed out".into()))?
                .map_err(|e| SourceError::Cbs(format!("cannot attach to $cbs: {e}")))?;
            for l in &self.links {
                timeout(step, self.tokens.put(&mut client, &l.audience))
                    .await
                    .map_err(|_| SourceError::Cbs("put-token timed out".into()))??;
            }
            cbs = Some(client);
        }
        let refresh_at = self.refresh_interval().map(|d| Instant::now() + d);
        let mut conn = Conn {
            connection,
            session,
            cbs,
            refresh_at,
        };
        for i in 0..self.links.len() {
            match self.attach_link(&mut conn.session, i, step).await {
                Ok(()) => {}
                Err(e) if conn.session.is_ended() => return Err(e),
                Err(e) => {
                    // The connection is fine; this entity is not (yet). Retry it alone.
                    self.schedule_retry(i, attach_reason(&e));
                }
            }
        }
        Ok(conn)
    }

    /// Serve a live connection until shutdown or its loss.
    async fn serve(
        &mut self,
        conn: &mut Conn,
        acks: &mut mpsc::Receiver<Handoff>,
        shutdown: &mut Shutdown,
    ) -> Stop {
        let mut beat = tokio::time::interval(self.liveness.beat_interval());
        loop {
            self.liveness.beat(Part::Source);
            self.grant_credit().await;
            let refresh_at = conn.refresh_at;
            let retry_at = self.links.iter().filter_map(|l| l.retry_at).min();
            let renew_at = self.renew_at;
            let acks_open = self.acks_open;
            self.rotate = self.rotate.wrapping_add(1);
            let rotate = self.rotate;
            let ev = tokio::select! {
                biased;
                _ = shutdown.recv() => Event::Shutdown,
                _ = beat.tick() => Event::Beat,
                a = acks.recv(), if acks_open => Event::Ack(a),
                _ = sleep_until(refresh_at.unwrap_or_else(Instant::now)), if refresh_at.is_some() => Event::Refresh,
                _ = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => Event::Retry,
                _ = sleep_until(renew_at.unwrap_or_else(Instant::now)), if renew_at.is_some() => Event::Renew,
                (i, r) = recv_any(&mut self.links, rotate) => Event::Delivery(i, r),
            };
            match ev {
                Event::Shutdown => return Stop::Shutdown,
                Event::Beat => {}
                Event::Ack(Some(h)) => self.on_handoff(h).await,
                Event::Ack(None) => self.acks_open = false,
                Event::Refresh => {
                    if let Err(e) = self.refresh(conn).await {
                        return Stop::Lost(e);
                    }
                }
                Event::Retry => {
                    if let Err(e) = self.retry_links(conn).await {
                        return Stop::Lost(e);
                    }
                }
                Event::Renew => self.renew_locks(conn).await,
                Event::Delivery(i, Ok(d)) => self.on_delivery(i, d).await,
                Event::Delivery(i, Err(RecvError::MessageDecode(e))) => {
                    self.metrics.received.inc();
                    let rej =
                        Rejection::undecodable(format!("message cannot be decoded: {}", e.source));
                    self.dead_letter(i, e.info, rej).await;
                }
                Event::Delivery(i, Err(e)) => match e.recovery() {
                    ErrorRecovery::UseLink => {
                        log::debug!(
                            "source: {} reported {e}; link still usable",
                            self.links[i].address
                        )
                    }
                    ErrorRecovery::ReconnectSession | ErrorRecovery::ReconnectConnection => {
                        return Stop::Lost(SourceError::ConnectionLost(e.to_string()));
                    }
                    _ => self.lose_link(i, recv_reason(&e)),
                },
            }
        }
    }

    /// Re-put every token on the live connection.
    async fn refresh(&mut self, conn: &mut Conn) -> Result<(), SourceError> {
        let step = self.opts.step_timeout;
        if let Some(client) = conn.cbs.as_mut() {
            for l in &self.links {
                timeout(step, self.tokens.put(client, &l.audience))
                    .await
                    .map_err(|_| SourceError::Cbs("put-token timed out".into()))??;
            }
            self.metrics.token_refreshes.inc();
            log::debug!("source: CBS tokens renewed");
        }
        conn.refresh_at = self.refresh_interval().map(|d| Instant::now() + d);
        Ok(())
    }

    /// Attach link `i` on `session`; on success it is live and its backoff reset.
    async fn attach_link(
        &mut self,
        session: &mut SessionHandle<()>,
        i: usize,
        step: Duration,
    ) -> Result<(), SourceError> {
        self.metrics.link_attaches.inc();
        let r = attach(session, &self.links[i].address, i, step).await?;
        let l = &mut self.links[i];
        l.receiver = Some(r);
        l.retry_at = None;
        l.backoff.up();
        l.attached_at = Some(Instant::now());
        if std::mem::take(&mut l.warned) {
            log::info!("source: link to {} attached", l.address);
        }
        self.metrics.links.set(i, None);
        Ok(())
    }

    /// Link `i` is down for `reason`: show it in health, log it once per change, and
    /// attach again after its backoff.
    fn schedule_retry(&mut self, i: usize, reason: String) {
        let l = &mut self.links[i];
        l.retry_at = Some(Instant::now() + l.backoff.down());
        let healthy = self.opts.healthy_after;
        if l.attached_at.take().is_some_and(|t| t.elapsed() >= healthy) {
            l.logged = None;
        }
        if l.logged.as_deref() != Some(reason.as_str()) {
            log::warn!(
                "source: subscription {} is down: {reason}; retrying with backoff",
                l.address
            );
            l.logged = Some(reason.clone());
            l.warned = true;
        }
        self.metrics.links.set(i, Some(reason));
    }

    /// Attach again the links whose retry time has come.
    async fn retry_links(&mut self, conn: &mut Conn) -> Result<(), SourceError> {
        let now = Instant::now();
        let step = self.opts.step_timeout;
        for i in 0..self.links.len() {
            if self.links[i].retry_at.is_none_or(|t| t > now) {
                continue;
            }
            if conn.session.is_ended() {
                return Err(SourceError::ConnectionLost("session ended".into()));
            }
            if let Err(e) = self.attach_link(&mut conn.session, i, step).await {
                log::debug!("source: {e}");
                self.schedule_retry(i, attach_reason(&e));
            }
        }
        Ok(())
    }

    /// Top up link credit so the total stays within the free room.
    async fn grant_credit(&mut self) {
        let m = self.metrics.clone();
        // The mirror unpins before the source has taken its word: count what the tracker
        // still holds too.
        let used = self.journal.pinned().max(self.tracker.len());
        let cap = self.settings.unsettled.saturating_sub(used) as u32;
        let mut attached = 0u32;
        let mut outstanding = 0u32;
        let mut lowest = u32::MAX;
        for (i, l) in self.links.iter().enumerate() {
            let c = l.receiver.as_ref().map(|r| r.credit());
            self.credit_now[i] = c;
            if let Some(c) = c {
                attached += 1;
                outstanding += c;
                lowest = lowest.min(c);
            }
        }
        m.unsettled.set(used as u64);
        m.credit.set(outstanding as u64);
        if attached == 0 || cap == 0 {
            return;
        }
        // Cheap exit: no link is low enough to be topped up (see plan_credit).
        if lowest > 0 && lowest > cap.div_ceil(attached) / 2 {
            return;
        }
        let budget = cap.min(self.journal.room().min(u32::MAX as usize) as u32);
        plan_credit(budget, &self.credit_now, self.rotate, &mut self.credit_new);
        for i in 0..self.links.len() {
            let Some(c) = self.credit_new[i] else {
                continue;
            };
            let Some(r) = self.links[i].receiver.as_mut() else {
                continue;
            };
            match r.set_credit(c).await {
                Ok(()) => outstanding += c - self.credit_now[i].unwrap_or(0),
                Err(e) => self.lose_link(i, format!("cannot set credit: {e}")),
            }
        }
        m.credit.set(outstanding as u64);
    }

    async fn on_delivery(&mut self, i: usize, d: Delivery<Body<Value>>) {
        self.metrics.received.inc();
        let token = renew::lock_token(&d);
        let (info, msg) = d.into_parts();
        let lock = token.zip(locked_until(&msg)).map(|(token, until)| {
            let span = lock_span(until);
            Lock {
                token,
                due: Instant::now() + span / 2,
                span,
                lost: false,
            }
        });
        match decode::decode(&msg, self.settings.max_event_bytes) {
            Ok(decoded) => self.append(i, info, decoded, lock).await,
            Err(rej) => self.dead_letter(i, info, rej).await,
        }
    }

    async fn append(&mut self, i: usize, info: DeliveryInfo, decoded: Decoded, lock: Option<Lock>) {
        let Decoded { mut meta, body } = decoded;
        let key = meta.asb_seq.map(|asb_seq| DedupKey { link: i, asb_seq });
        let fp = fingerprint(meta.message_id.as_deref(), meta.enqueued_at_ms);
        if let Some(seq) = key.and_then(|k| self.dedup.get(k, fp)) {
            self.metrics.duplicates.inc();
            if let Some(at) = self.rejected.iter().position(|(s, _)| *s == seq) {
                // The mirror rejected this event while its first delivery could not be
                // settled: dead-letter the redelivery, never complete it.
                let (_, description) = self.rejected.remove(at).unwrap_or_default();
                let rej = Rejection {
                    reason: DeadLetterReason::MirrorRejected,
                    description,
                };
                self.dead_letter(i, info, rej).await;
            } else if self.required && self.journal.is_pinned(seq) {
                // The broker redelivered a message we still hold: the lock of the
                // delivery we held is lost. Settle the new delivery (with the valid lock)
                // when the event's acknowledgement comes; never hold two for one event.
                self.hold(seq, i, info, lock).await;
            } else {
                self.accept(i, info).await;
            }
            return;
        }
        let sub = &self.settings.subscriptions[i];
        let (topic, cut) = self.settings.template.render(
            &meta,
            Origin {
                topic: &sub.topic,
                subscription: &sub.subscription,
            },
        );
        meta.truncated |= cut;
        let ev = EncodedEvent::encode(self.journal.next_seq(), &topic, &meta, &body);
        match self.journal.append(ev, self.required) {
            Ok(seq) => {
                if let Some(k) = key {
                    self.dedup.insert(k, fp, seq);
                }
                if self.required {
                    self.hold(seq, i, info, lock).await;
                } else {
                    self.accept(i, info).await;
                }
            }
            Err(JournalError::TooLarge { size, limit }) => {
                let rej = Rejection {
                    reason: DeadLetterReason::PayloadTooLarge,
                    description: format!("encoded event of {size} bytes exceeds {limit} bytes"),
                };
                self.dead_letter(i, info, rej).await;
            }
            Err(e) => {
                // Cannot happen while credit respects the room; give the message back.
                log::warn!("source: journal refused an event ({e}); releasing the message");
                self.release(i, info).await;
            }
        }
    }

    async fn hold(&mut self, seq: u64, i: usize, info: DeliveryInfo, lock: Option<Lock>) {
        let generation = self.links[i].generation;
        let due = lock.as_ref().map(|l| l.due);
        match self.tracker.hold(Held {
            seq,
            link: i,
            generation,
            delivery: info,
            lock,
        }) {
            Ok(None) => {}
            // A redelivery took the place of a delivery whose lock was lost: that one
            // can no longer be settled.
            Ok(Some(old)) => {
                if !old.lock.is_some_and(|l| l.lost) {
                    self.metrics.locks_lost.inc();
                }
            }
            // The window is full (cannot happen while credit respects it).
            Err(h) => return self.release(i, h.delivery).await,
        }
        if let Some(due) = due {
            self.renew_at = Some(self.renew_at.map_or(due, |r| r.min(due)));
        }
    }

    /// Renew the locks that are due, one batched `com.microsoft:renew-lock` request per
    /// link, and schedule the next renewal. A lock the broker says is lost is marked so:
    /// the delivery is not settled as if it counted, and the broker's redelivery takes
    /// its place. Failures are logged once per change of their reason.
    async fn renew_locks(&mut self, conn: &mut Conn) {
        let now = Instant::now();
        let step = self.opts.step_timeout;
        for i in 0..self.links.len() {
            let generation = self.links[i].generation;
            let due: Vec<(u64, [u8; 16])> = self
                .tracker
                .iter_mut()
                .filter(|h| h.link == i && h.generation == generation)
                .filter_map(|h| {
                    let l = h.lock.as_ref()?;
                    (!l.lost && l.due <= now + l.span / 4).then_some((h.seq, l.token))
                })
                .collect();
            if due.is_empty() || self.links[i].receiver.is_none() {
                continue;
            }
            if self.links[i].renewer.is_none() {
                let address = self.links[i].address.clone();
                match LockRenewer::attach_with(&mut conn.session, &address, None, step).await {
                    Ok(r) => self.links[i].renewer = Some(r),
                    Err(e) => {
                        self.renew_failed(i, &due, &e);
                        continue;
                    }
                }
            }
            let tokens: Vec<[u8; 16]> = due.iter().map(|(_, t)| *t).collect();
            let Some(renewer) = self.links[i].renewer.as_mut() else {
                continue;
            };
            match renewer.renew(&tokens).await {
                Ok(exps) => self.renewed(&due, &exps),
                Err(e) if e.is_lock_lost() && due.len() > 1 => {
                    // All or nothing: find which ones are lost, one at a time, within
                    // one step's time (the loop must keep turning); the rest are tried
                    // again at the next renewal.
                    let deadline = Instant::now() + step;
                    for one in &due {
                        let left = deadline.saturating_duration_since(Instant::now());
                        let Some(renewer) = self.links[i].renewer.as_mut() else {
                            break;
                        };
                        match timeout(left, renewer.renew(&[one.1])).await {
                            Ok(Ok(exps)) => self.renewed(std::slice::from_ref(one), &exps),
                            Ok(Err(e)) => self.renew_failed(i, std::slice::from_ref(one), &e),
                            Err(_) => break,
                        }
                    }
                }
                Err(e) => self.renew_failed(i, &due, &e),
            }
        }
        self.renew_at = self
            .tracker
            .iter_mut()
            .filter_map(|h| h.lock.as_ref().filter(|l| !l.lost).map(|l| l.due))
            .min();
    }

    fn renewed(&mut self, renewed: &[(u64, [u8; 16])], expirations: &[std::time::SystemTime]) {
        let now = Instant::now();
        for ((seq, _), exp) in renewed.iter().zip(expirations) {
            let span = lock_span(*exp);
            if let Some(l) = self.tracker.get_mut(*seq).and_then(|h| h.lock.as_mut()) {
                l.span = span;
                l.due = now + span / 2;
            }
        }
        self.metrics.lock_renewals.add(renewed.len() as u64);
        if self.renew_logged.take().is_some() {
            log::info!("source: lock renewal works again");
        }
    }

    fn renew_failed(&mut self, i: usize, which: &[(u64, [u8; 16])], e: &RenewError) {
        self.metrics.lock_renewal_failures.inc();
        let lost = e.is_lock_lost();
        let now = Instant::now();
        for (seq, _) in which {
            if let Some(l) = self.tracker.get_mut(*seq).and_then(|h| h.lock.as_mut()) {
                if lost {
                    l.lost = true;
                    self.metrics.locks_lost.inc();
                } else {
                    // Try again soon, within what is left of the lock.
                    l.due = now + (l.span / 8).max(Duration::from_millis(100));
                }
            }
        }
        if !lost {
            // A broken management link is attached again next time.
            self.links[i].renewer = None;
        }
        let kind = if lost {
            "lock lost".to_string()
        } else {
            e.to_string()
        };
        if self.renew_logged.as_deref() != Some(kind.as_str()) {
            log::warn!(
                "source: renewing locks on {} failed: {e}; {}",
                self.links[i].address,
                if lost {
                    "the broker redelivers those messages and the redelivery is settled instead"
                } else {
                    "retrying"
                }
            );
            self.renew_logged = Some(kind);
        }
    }

    /// The mirror's word on a pinned event: complete its message, or dead-letter it
    /// when the broker can never take it.
    async fn on_handoff(&mut self, h: Handoff) {
        let seq = h.seq();
        self.journal.handed_on(seq);
        let held = self.tracker.take(seq).filter(|held| {
            self.links[held.link].generation == held.generation
                && !held.lock.as_ref().is_some_and(|l| l.lost)
        });
        let Some(held) = held else {
            // Its lock is lost or its link gone: settling it would not count. The broker
            // redelivers the message; the redelivery is completed as a duplicate of a
            // handed-on event — or, when the mirror rejected it, dead-lettered.
            self.remember_rejected(h);
            return;
        };
        match h {
            Handoff::Delivered(_) => self.accept(held.link, held.delivery).await,
            Handoff::Rejected { description, .. } => {
                let rej = Rejection {
                    reason: DeadLetterReason::MirrorRejected,
                    description,
                };
                self.dead_letter(held.link, held.delivery, rej).await;
            }
        }
    }

    fn remember_rejected(&mut self, h: Handoff) {
        if let Handoff::Rejected { seq, description } = h {
            if self.rejected.len() == self.settings.unsettled.max(1) {
                self.rejected.pop_front();
            }
            self.rejected.push_back((seq, description));
        }
    }

    async fn accept(&mut self, i: usize, info: DeliveryInfo) {
        let Some(r) = self.links[i].receiver.as_ref() else {
            return;
        };
        match r.accept(info).await {
            Ok(()) => self.metrics.completed.inc(),
            Err(e) => log::debug!("source: accept on {} failed: {e}", self.links[i].address),
        }
    }

    async fn release(&mut self, i: usize, info: DeliveryInfo) {
        let Some(r) = self.links[i].receiver.as_ref() else {
            return;
        };
        match r.release(info).await {
            Ok(()) => self.metrics.released.inc(),
            Err(e) => log::debug!("source: release on {} failed: {e}", self.links[i].address),
        }
    }

    async fn dead_letter(&mut self, i: usize, info: DeliveryInfo, rej: Rejection) {
        let Some(r) = self.links[i].receiver.as_ref() else {
            return;
        };
        log::warn!(
            "source: dead-lettering a message from {}: {} ({})",
            self.links[i].address,
            rej.reason.as_str(),
            rej.description
        );
        match r.reject(info, dead_letter_error(&rej)).await {
            Ok(()) => self.metrics.dead_lettered(rej.reason).inc(),
            Err(e) => log::debug!("source: reject on {} failed: {e}", self.links[i].address),
        }
    }

    /// A link died while the connection may live: forget its deliveries (they cannot be
    /// settled on a new link) and attach again after a backoff.
    fn lose_link(&mut self, i: usize, why: String) {
        let abandoned = self.tracker.drop_link(i);
        self
            .metrics
            .abandoned_on_link_loss
            .add(abandoned as u64);
        let l = &mut self.links[i];
        l.receiver = None;
        l.renewer = None;
        l.generation += 1;
        if abandoned > 0 {
            log::info!(
                "source: link to {} lost; {abandoned} unsettled deliveries left to the broker",
                l.address
            );
        }
        self.schedule_retry(i, why);
    }

    /// The connection died: every link with it.
    fn lose_all_links(&mut self) {
        for i in 0..self.links.len() {
            let abandoned = self.tracker.drop_link(i);
            self
                .metrics
                .abandoned_on_link_loss
                .add(abandoned as u64);
            let l = &mut self.links[i];
            l.receiver = None;
            l.renewer = None;
            l.generation += 1;
            l.retry_at = None;
            self
                .metrics
                .links
                .set(i, Some("connection lost".to_string()));
        }
        self.metrics.credit.set(0);
    }

    /// Wait `delay` before reconnecting; acknowledgements keep being applied to the
    /// journal. Returns true on shutdown.
    async fn wait(
        &mut self,
        delay: Duration,
        acks: &mut mpsc::Receiver<Handoff>,
        shutdown: &mut Shutdown,
    ) -> bool {
        let until = Instant::now() + delay;
        let mut beat = tokio::time::interval(self.liveness.beat_interval());
        loop {
            self.liveness.beat(Part::Source);
            let acks_open = self.acks_open;
            tokio::select! {
                biased;
                _ = shutdown.recv() => return true,
                _ = beat.tick() => {}
                a = acks.recv(), if acks_open => match a {
                    // No link lives: nothing to settle, only unpin.
                    Some(h) => {
                        self.journal.handed_on(h.seq());
                        self.remember_rejected(h);
                    }
                    None => self.acks_open = false,
                },
                _ = sleep_until(until) => return false,
            }
        }
    }

    /// Graceful shutdown: release what is held, close links, session and connection.
    async fn close(&mut self, mut conn: Conn) {
        let budget = Duration::from_millis(2500);
        let _ = timeout(budget, async {
            let mut held = std::mem::take(&mut self.scratch);
            self.tracker.drain_all(&mut held);
            for h in held.drain(..) {
                if self.links[h.link].generation == h.generation {
                    self.release(h.link, h.delivery).await;
                }
            }
            // Deliveries that arrived but were not taken yet are locked too: stop the
            // flow, take what is still coming and give it back.
            for i in 0..self.links.len() {
                if let Some(r) = self.links[i].receiver.as_mut() {
                    let _ = timeout(Duration::from_millis(200), r.set_credit(0)).await;
                }
                while let Some(r) = self.links[i].receiver.as_mut() {
                    match timeout(Duration::from_millis(300), r.recv::<Body<Value>>()).await {
                        Ok(Ok(d)) => self.release(i, DeliveryInfo::from(d)).await,
                        Ok(Err(RecvError::MessageDecode(e))) => self.release(i, e.info).await,
                        _ => break,
                    }
                }
            }
            for l in &mut self.links {
                if let Some(r) = l.receiver.take() {
                    let _ = timeout(Duration::from_millis(500), r.close()).await;
                }
            }
            if let Some(c) = conn.cbs.take() {
                let _ = timeout(Duration::from_millis(500), c.close()).await;
            }
            let _ = timeout(Duration::from_millis(500), conn.session.end()).await;
            let _ = timeout(Duration::from_millis(500), conn.connection.close()).await;
        })
        .await;
        self.metrics.credit.set(0);
    }
}

/// Attach a peek-lock receiver with manual credit (0 until granted).
///
/// Peek-lock is the broker sending unsettled (`snd-settle-mode unsettled`): nothing
/// leaves the broker before our disposition. Our disposition settles at once
/// (`rcv-settle-mode first`, what Qpid JMS uses against Service Bus and the only mode
/// RabbitMQ offers). Mode `second` would add the broker's settled echo, which fe2o3
/// never shows to us, while keeping each delivery in two fe2o3 maps until that echo
/// arrives: a peer that never echoes (fe2o3's own acceptor drops it) would grow them
/// without bound, outside the memory budget.
async fn attach(
    session: &mut SessionHandle<()>,
    address: &str,
    i: usize,
    step: Duration,
) -> Result<Receiver, SourceError> {
    let name = format!("asb-gateway-{i}-{:08x}", fastrand::u32(..));
    let fut = Receiver::builder()
        .name(name)
        .source(address.to_string())
        .sender_settle_mode(SenderSettleMode::Unsettled)
        .receiver_settle_mode(ReceiverSettleMode::First)
        .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Manual)
        .attach(session);
    match timeout(step, fut).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(SourceError::Attach {
            address: address.to_string(),
            reason: match &e {
                fe2o3_amqp::link::ReceiverAttachError::RemoteClosedWithError(err) => {
                    amqp_error_text(err)
                }
                other => other.to_string(),
            },
        }),
        Err(_) => Err(SourceError::Attach {
            address: address.to_string(),
            reason: "timed out".into(),
        }),
    }
}

/// Receive from whichever attached link has a delivery, starting at a rotating link so
/// none starves. `recv` is cancel-safe, so a future polled once and dropped loses nothing.
fn recv_any(
    links: &mut [Link],
    start: usize,
) -> impl Future<Output = (usize, Result<Delivery<Body<Value>>, RecvError>)> + '_ {
    poll_fn(move |cx| {
        let n = links.len();
        for k in 0..n {
            let i = (start + k) % n;
            if let Some(r) = links[i].receiver.as_mut() {
                let fut = pin!(r.recv::<Body<Value>>());
                if let Poll::Ready(res) = fut.poll(cx) {
                    return Poll::Ready((i, res));
                }
            }
        }
        Poll::Pending
    })
}

/// Shortest and longest lock span believed: ASB's LockDuration is 5 s to 5 min; a box
/// whose clock is off by more than a lock would otherwise compute 0 (renewing in a hot
/// loop) or a span past the real expiry.
const LOCK_SPAN_MIN: Duration = Duration::from_secs(1);
const LOCK_SPAN_MAX: Duration = Duration::from_secs(300);

/// Time left on a lock expiring at `until` (wall clock), clamped to what ASB allows.
fn lock_span(until: std::time::SystemTime) -> Duration {
    until
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
        .clamp(LOCK_SPAN_MIN, LOCK_SPAN_MAX)
}

/// The `x-opt-locked-until` annotation (ASB: when the peek-lock expires).
fn locked_until(msg: &decode::AmqpMessage) -> Option<std::time::SystemTime> {
    use fe2o3_amqp_types::messaging::annotations::OwnedKey;
    let ma = msg.message_annotations.as_ref()?;
    match ma.0.get(&OwnedKey::from("x-opt-locked-until"))? {
        Value::Timestamp(t) => {
            let ms = u64::try_from(t.milliseconds()).ok()?;
            Some(std::time::UNIX_EPOCH + Duration::from_millis(ms))
        }
        _ => None,
    }
}

/// An AMQP error condition as its symbol without the `amqp:` prefix
/// (`not-found`, `unauthorized-access`, `com.microsoft:…`).
fn condition_name(c: &ErrorCondition) -> String {
    fn kebab(debug: &str) -> String {
        let mut out = String::with_capacity(debug.len() + 4);
        for (k, ch) in debug.chars().enumerate() {
            if ch.is_ascii_uppercase() {
                if k > 0 {
                    out.push('-');
                }
                out.push(ch.to_ascii_lowercase());
            } else {
                out.push(ch);
            }
        }
        out
    }
    match c {
        ErrorCondition::AmqpError(e) => kebab(&format!("{e:?}")),
        ErrorCondition::ConnectionError(e) => kebab(&format!("{e:?}")),
        ErrorCondition::SessionError(e) => kebab(&format!("{e:?}")),
        ErrorCondition::LinkError(e) => kebab(&format!("{e:?}")),
        ErrorCondition::Custom(s) => s.as_str().to_string(),
        #[allow(unreachable_patterns)]
        other => format!("{other:?}"),
    }
}

/// `condition: description`, with a hint where ASB's answer needs one.
fn amqp_error_text(e: &definitions::Error) -> String {
    let cond = condition_name(&e.condition);
    let mut text = match &e.description {
        Some(d) if !d.is_empty() => format!("{cond}: {d}"),
        _ => cond.clone(),
    };
    if cond == "not-allowed" && text.to_ascii_lowercase().contains("session") {
        text.push_str(
            " (the subscription requires sessions, which the gateway does not use: \
             disable RequiresSession on it)",
        );
    }
    text
}

/// Why a link ended, for health and the log.
fn recv_reason(e: &RecvError) -> String {
    use fe2o3_amqp::link::LinkStateError as L;
    match e {
        RecvError::LinkStateError(L::RemoteDetachedWithError(err))
        | RecvError::LinkStateError(L::RemoteClosedWithError(err)) => amqp_error_text(err),
        RecvError::LinkStateError(L::RemoteDetached) => "detached by the broker".into(),
        RecvError::LinkStateError(L::RemoteClosed) => "closed by the broker".into(),
        other => other.to_string(),
    }
}

/// Why an attach failed, for health and the log.
fn attach_reason(e: &SourceError) -> String {
    match e {
        SourceError::Attach { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// The rejection ASB reads as dead-letter, with reason and description.
pub fn dead_letter_error(rej: &Rejection) -> definitions::Error {
    let mut info = Fields::new();
    info.insert(
        Symbol::from("DeadLetterReason"),
        Value::String(rej.reason.as_str().to_string()),
    );
    info.insert(
        Symbol::from("DeadLetterErrorDescription"),
        Value::String(rej.description.clone()),
    );
    definitions::Error {
        condition: ErrorCondition::Custom(Symbol::from(DEAD_LETTER_CONDITION)),
        description: Some(rej.description.clone()),
        info: Some(Box::new(info)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_error_carries_reason() {
        let e = dead_letter_error(&Rejection {
            reason: DeadLetterReason::PayloadTooLarge,
            description: "too big".into(),
        });
        assert_eq!(
            e.condition,
            ErrorCondition::Custom(Symbol::from("com.microsoft:dead-letter"))
        );
        let info = e.info.unwrap();
        assert_eq!(
            info.get(&Symbol::from("DeadLetterReason")),
            Some(&Value::String("PayloadTooLarge".into()))
        );
        assert_eq!(
            info.get(&Symbol::from("DeadLetterErrorDescription")),
            Some(&Value::String("too big".into()))
        );
    }
}
