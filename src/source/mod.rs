//! The source (DESIGN §2, §5): ASB topic subscriptions → the journal, over AMQP 1.0.
//!
//! The path of one event, in the order the code takes it:
//! 1. [`run`] connects (`connect`: TCP, AMQPS, SASL, session, CBS put-token) and
//!    attaches one peek-lock receiver link per subscription (`link`), retrying every
//!    step with exponential backoff and jitter;
//! 2. the serve loop grants credit by demand: the total across links never exceeds the
//!    free room of the unsettled window (`journal.unsettled` minus what is in it) nor the
//!    journal's room (`link`, [`tracker::plan_credit`]);
//! 3. a delivery is decoded ([`decode`]), checked against the recent-redelivery window
//!    (same subscription and `x-opt-sequence-number`, same message-id and enqueued time:
//!    [`tracker::Dedup`]), routed by the topic template and appended to the journal —
//!    this task is the journal's only writer;
//! 4. it is then settled (`settle`): completed right after the append or — when the
//!    mirror is required — held ([`tracker::Tracker`]), its peek-lock renewed while it
//!    waits (`locks`, [`renew`]), and completed once the mirror acknowledges its seq
//!    on `acks`; dead-lettered (`com.microsoft:dead-letter`) when too large or
//!    undecodable or when the mirror rejects it; released on graceful shutdown.
//!
//! Connection loss, link detach and token rejection are retried with backoff; deliveries
//! held on a link that died are counted and left to the broker to redeliver.
//!
//! The source's state (`Source`, below) is one struct; its methods live in the file of
//! the step they belong to. The files do not import each other in a circle: `connect`
//! imports from `link`; `link`, `locks` and `settle` import neither each other nor
//! `connect`; all of them import from `error`, `decode`, `renew`, `tracker` (leaves).
//! The task's inputs are in `settings` ([`SourceSettings`], [`SourceContext`],
//! [`Options`]).

mod cbs;
mod connect;
pub mod decode;
mod error;
mod link;
mod locks;
pub mod renew;
mod settings;
mod settle;
pub mod tls;
pub mod tracker;
mod transport;

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::delivery::{Delivery, DeliveryInfo};
use fe2o3_amqp::link::{ErrorRecovery, RecvError};
use fe2o3_amqp_types::messaging::Body;
use fe2o3_amqp_types::primitives::Value;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};

use crate::backoff::Backoff;
use crate::event::EncodedEvent;
use crate::journal::{Handoff, Journal, JournalError};
use crate::liveness::{Liveness, Part};
use crate::metrics::{DeadLetterReason, Metrics, PartState};
use crate::routing::Origin;
use crate::shutdown::Shutdown;

pub use cbs::TOKEN_TYPE;
pub use error::SourceError;
pub use settings::{Options, SourceContext, SourceSettings};
pub use settle::{DEAD_LETTER_CONDITION, dead_letter_error};

use connect::Conn;
use decode::{Decoded, Rejection};
use link::{Link, recv_any, recv_reason};
use locks::{lock_span, locked_until};
use settle::{Accepts, Rejected};
use tracker::{Dedup, DedupKey, Held, Lock, Tracker, fingerprint};

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
    let addr = transport::describe(&src.settings.connection, src.proxy());
    loop {
        if shutdown.is_shutdown() {
            break;
        }
        if attempts > 0 {
            src.metrics.source_reconnects.inc();
        }
        attempts += 1;
        let live = src.liveness.clone();
        let connected = tokio::select! {
            biased;
            _ = shutdown.recv() => break,
            r = live.beating(Part::Source, src.connect()) => r,
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
                        src.accepts.clear();
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
    dedup: Arc<tracker::SharedDedup>,
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
    rejected: Rejected,
    /// Completions waiting to be sent together.
    accepts: Accepts,
}

// Lives on the stack for one loop turn; boxing the delivery would allocate per message.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Shutdown,
    /// The heartbeat timer: an idle loop still proves it turns.
    Beat,
    Ack(Option<Handoff>),
    Refresh,
    Retry,
    Renew,
    Delivery(usize, Result<Delivery<Body<Value>>, RecvError>),
    /// Nothing else is ready: send the queued completions.
    Flush,
}

impl Source {
    fn new(cx: SourceContext, opts: Options) -> Result<Self, SourceError> {
        let SourceContext {
            settings,
            journal,
            metrics,
            liveness,
            dedup,
        } = cx;
        let ttl = opts.token_ttl.unwrap_or(settings.token_ttl);
        let mut tokens = cbs::Tokens::new(&settings.connection, ttl);
        let tls = if settings.connection.tls {
            Some(tls::client_config(settings.ca_file.as_deref())?)
        } else {
            None
        };
        if let Some(credential) = &settings.identity {
            // The token endpoint is verified like the namespace (roots plus ca_file).
            let identity_tls = match (&tls, credential.uses_https()) {
                (Some(t), _) => t.clone(),
                (None, true) => tls::client_config(settings.ca_file.as_deref())?,
                (None, false) => {
                    tls::config_with_roots(tokio_rustls::rustls::RootCertStore::empty())?
                }
            };
            tokens = tokens.with_entra(crate::identity::TokenClient::new(
                credential.clone(),
                settings.proxy.clone(),
                identity_tls,
                opts.step_timeout,
            ));
        }
        let links: Vec<Link> = settings
            .subscriptions
            .iter()
            .map(|s| {
                let address = s.address();
                let audience = tokens.audience(&address);
                let backoff = Backoff::new(opts.backoff_min, opts.backoff_max, opts.healthy_after);
                Link::new(address, audience, backoff)
            })
            .collect();
        metrics.links.init(links.iter().map(|l| l.address.clone()));
        let n = links.len();
        let unsettled = settings.unsettled;
        Ok(Source {
            required: settings.mirror_required,
            tracker: Tracker::new(unsettled),
            dedup,
            scratch: Vec::with_capacity(unsettled),
            credit_now: vec![None; n],
            credit_new: vec![None; n],
            acks_open: true,
            rotate: 0,
            renew_at: None,
            renew_logged: None,
            rejected: Rejected::new(unsettled),
            accepts: Accepts::new(),
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

    fn dedup(&self) -> std::sync::MutexGuard<'_, Dedup> {
        // Every change to the window completes before anything could panic.
        self.dedup.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(
            self.opts.backoff_min,
            self.opts.backoff_max,
            self.opts.healthy_after,
        )
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
            let queued = self.accepts.len() > 0;
            self.rotate = self.rotate.wrapping_add(1);
            let rotate = self.rotate;
            let ev = tokio::select! {
                biased;
                _ = shutdown.recv() => Wake::Shutdown,
                _ = beat.tick() => Wake::Beat,
                a = acks.recv(), if acks_open => Wake::Ack(a),
                _ = sleep_until(refresh_at.unwrap_or_else(Instant::now)), if refresh_at.is_some() => Wake::Refresh,
                _ = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => Wake::Retry,
                _ = sleep_until(renew_at.unwrap_or_else(Instant::now)), if renew_at.is_some() => Wake::Renew,
                (i, r) = recv_any(&mut self.links, rotate) => Wake::Delivery(i, r),
                // Last: only when nothing above is ready.
                _ = std::future::ready(()), if queued => Wake::Flush,
            };
            match ev {
                // Queued completions go first thing in `close`, within its time limit.
                Wake::Shutdown => return Stop::Shutdown,
                Wake::Flush => self.flush_accepts().await,
                Wake::Beat => {}
                Wake::Ack(Some(h)) => self.on_handoff(h).await,
                Wake::Ack(None) => self.acks_open = false,
                // Network steps awaited in place: each bounded by its step timeout, and
                // beating meanwhile so several in a row do not look like a hang.
                Wake::Refresh => {
                    let live = self.liveness.clone();
                    if let Err(e) = live.beating(Part::Source, self.refresh(conn)).await {
                        return Stop::Lost(e);
                    }
                }
                Wake::Retry => {
                    let live = self.liveness.clone();
                    let retry = self.retry_links(&mut conn.session);
                    if let Err(e) = live.beating(Part::Source, retry).await {
                        return Stop::Lost(e);
                    }
                }
                Wake::Renew => {
                    let live = self.liveness.clone();
                    live.beating(Part::Source, self.renew_locks(&mut conn.session))
                        .await
                }
                Wake::Delivery(i, Ok(d)) => self.on_delivery(i, d).await,
                Wake::Delivery(i, Err(RecvError::MessageDecode(e))) => {
                    self.metrics.received.inc();
                    let rej =
                        Rejection::undecodable(format!("message cannot be decoded: {}", e.source));
                    self.dead_letter(i, e.info, rej).await;
                }
                Wake::Delivery(i, Err(e)) => match e.recovery() {
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

    /// One delivery: note its lock, decode it, append it or dead-letter it.
    async fn on_delivery(&mut self, i: usize, d: Delivery<Body<Value>>) {
        self.metrics.received.inc();
        let token = renew::lock_token(&d);
        let (info, msg) = d.into_parts();
        let lock = token
            .zip(locked_until(&msg))
            .map(|(token, until)| Lock::new(token, lock_span(until)));
        match decode::decode(&msg, self.settings.max_event_bytes) {
            Ok(decoded) => self.append(i, info, decoded, lock).await,
            Err(rej) => self.dead_letter(i, info, rej).await,
        }
    }

    /// Route and append a decoded message (or recognise a redelivery), then settle it or
    /// hold it for the mirror.
    async fn append(&mut self, i: usize, info: DeliveryInfo, decoded: Decoded, lock: Option<Lock>) {
        let Decoded { mut meta, body } = decoded;
        let key = meta.asb_seq.map(|asb_seq| DedupKey { link: i, asb_seq });
        let fp = fingerprint(meta.message_id.as_deref(), meta.enqueued_at_ms);
        let earlier = key.and_then(|k| self.dedup().get(k, fp));
        if let Some(seq) = earlier {
            self.metrics.duplicates.inc();
            if let Some(description) = self.rejected.take(seq) {
                // The mirror rejected this event while its first delivery could not be
                // settled: dead-letter the redelivery, never complete it.
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
                    self.dedup().insert(k, fp, seq);
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

    /// Keep the delivery of event `seq` until the mirror's word on it.
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
                        self.rejected.remember(h);
                    }
                    None => self.acks_open = false,
                },
                _ = sleep_until(until) => return false,
            }
        }
    }

    /// Graceful shutdown: release what is held, close links, session and connection.
    ///
    /// Every delivery the broker sent must be released before its link detaches: one
    /// left unsettled on a detached link stays locked until its lock expires. So the flow
    /// is stopped with a drain, not by cutting the credit to 0: fe2o3 counts credit
    /// locally and drops a transfer that exceeds it (`TransferLimitExceeded`) without
    /// showing it to us, and the transfers the broker sent before it saw a credit of 0
    /// would arrive over a credit of 0 — locked at the broker, unknown to us. A drain
    /// leaves our credit as it is, so whatever is still on its way is received and
    /// released; the link is closed once nothing more comes.
    async fn close(&mut self, mut conn: Conn) {
        let budget = Duration::from_millis(2500);
        // How long a link must stay quiet after the drain before it is closed: the
        // broker's last transfers are one round trip behind the drain.
        let quiet = Duration::from_millis(300);
        let _ = timeout(budget, async {
            self.flush_accepts().await;
            let mut held = std::mem::take(&mut self.scratch);
            self.tracker.drain_all(&mut held);
            let mut released = 0usize;
            for h in held.drain(..) {
                if self.links[h.link].generation == h.generation {
                    self.release(h.link, h.delivery).await;
                    released += 1;
                }
            }
            let mut arrived = 0usize;
            for i in 0..self.links.len() {
                if let Some(r) = self.links[i].receiver.as_mut() {
                    let drain = timeout(Duration::from_millis(200), r.drain()).await;
                    if !matches!(drain, Ok(Ok(()))) {
                        let _ = timeout(Duration::from_millis(200), r.set_credit(0)).await;
                    }
                }
                while let Some(r) = self.links[i].receiver.as_mut() {
                    match timeout(quiet, r.recv::<Body<Value>>()).await {
                        Ok(Ok(d)) => self.release(i, DeliveryInfo::from(d)).await,
                        Ok(Err(RecvError::MessageDecode(e))) => self.release(i, e.info).await,
                        Ok(Err(e)) if e.recovery() == ErrorRecovery::UseLink => {
                            log::warn!(
                                "source: {} reported {e} while closing; a delivery may stay \
                                 locked until its lock expires",
                                self.links[i].address
                            );
                            continue;
                        }
                        _ => break,
                    }
                    arrived += 1;
                }
            }
            log::debug!(
                "source: closing: released {released} held and {arrived} arriving deliveries"
            );
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
