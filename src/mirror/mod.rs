//! The MQTT mirror (DESIGN §2, §4): reads the journal like a panel that must not skip and
//! publishes every event, in order, to a local broker with a bounded in-flight window.
//!
//! - Topic `{prefix}/{event topic}`; payload the raw body, the panel JSON frame or the
//!   postcard frame; MQTT 5 user properties `seq`, `message_id`, `content_type`.
//! - Retained `{prefix}/status`: `online` after every connect, `offline` as the last will
//!   and, explicitly, on a graceful shutdown (a clean DISCONNECT does not fire the will).
//! - Every broker acknowledgement (PUBACK for QoS 1, PUBCOMP for QoS 2, the publish written
//!   for QoS 0) is matched to its event: the event is handed on in the journal (unpinned)
//!   and, when `required`, its seq is sent on `acks` so the source can settle it.
//! - The connection is a clean session. When it is lost, rumqttc's unacknowledged state is
//!   dropped and the mirror re-sends every unacknowledged event of its window after the
//!   reconnect, in order (at-least-once: a subscriber may see an event twice).
//!
//! Matching acknowledgements: rumqttc reports `Outgoing::Publish(pkid)` in the order the
//! publishes leave, which is the order they were submitted, so a FIFO of submissions
//! tells which event got which packet id; a fixed table maps packet id → event.
//!
//! The event loop's `poll` is not cancel-safe (a cancelled write can lose a packet), so
//! one poll future is kept alive until it completes while the task also waits for new
//! journal events and shutdown.

mod client;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

pub use client::V5Props;
use client::{ConnFailure, Driver, Ev, Refusal, Submitter};

use crate::backoff::Backoff;
use crate::config::{Config, Endpoint, MqttConfig, MqttProtocol, Payload, Secret};
use crate::event::EncodedEvent;
use crate::journal::Journal;
use crate::journal::{GapKind, Handoff};
use crate::liveness::Liveness;
use crate::liveness::Part;
use crate::metrics::Metrics;
use crate::metrics::{MirrorRejectReason, PartState};
use crate::routing::mqtt_clean;
use crate::shutdown::Shutdown;
use crate::tls::ReloadableCert;

/// Delay before the first reconnect attempt; doubles per failure up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between reconnect attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection lost this soon after a publish was written may be the broker refusing
/// that publish; a later loss is not held against it.
pub const STRIKE_WINDOW: Duration = Duration::from_secs(2);
/// Probes acknowledged (false alarms) this close together count as a run for
/// [`strike_delay`].
pub const FALSE_ALARM_WINDOW: Duration = Duration::from_secs(10);

/// How long to wait before reconnecting after a strike: about [`BACKOFF_MIN`] (50–100 ms),
/// so finding a poison event costs little — doubled for each further false alarm in the
/// current run (probes acknowledged within [`FALSE_ALARM_WINDOW`] of each other with no
/// poison event found between them), up to [`BACKOFF_MAX`]. A poison event often costs
/// one false alarm (the loss strikes the publish written before it) and ends the run;
/// losses that keep striking good publishes and find nothing (two boxes taking one
/// client id from each other) slow down like any other failure instead of cycling ten
/// times a second.
pub fn strike_delay(
    (alarms, last): (u32, Option<tokio::time::Instant>),
    now: tokio::time::Instant,
) -> Duration {
    let run = if last.is_some_and(|t| now - t < FALSE_ALARM_WINDOW) {
        alarms.min(16)
    } else {
        0
    };
    let d = BACKOFF_MIN.saturating_mul(1 << run).min(BACKOFF_MAX);
    d.mul_f64(0.5 + 0.5 * fastrand::f64())
}
/// A publish refused this often with a transient reason code is given up on.
pub const TRANSIENT_REFUSALS: u8 = 3;
/// A connection that lasted this long resets the backoff to [`BACKOFF_MIN`]; one that
/// ends sooner (a broker dropping us right after CONNACK) keeps it growing.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Time a graceful shutdown gets to publish `offline` and disconnect.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// What the mirror takes from the config: `[mqtt]`, its password (already read from
/// `mqtt.password_file` when set) and `journal.max_event_bytes` (sizes the largest
/// PUBLISH).
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    pub mqtt: MqttConfig,
    pub password: Option<Secret>,
    pub max_event_bytes: usize,
    /// Said once at start-up (see [`packet_limit_warning`]).
    pub packet_limit_warning: Option<String>,
    /// The client certificate to present (`mqtt.client_cert`), when the caller keeps it
    /// to replace on reload; `None` with `mqtt.client_cert` set: read at start.
    pub client_cert: Option<Arc<ReloadableCert>>,
}

impl MirrorSettings {
    /// `None` when the config has no `[mqtt]` section (no mirror).
    pub fn from_config(cfg: &Config) -> Option<Self> {
        Some(MirrorSettings {
            mqtt: cfg.mqtt.clone()?,
            password: cfg.mqtt_password.clone(),
            max_event_bytes: cfg.journal.max_event_bytes,
            packet_limit_warning: packet_limit_warning(cfg),
            client_cert: None,
        })
    }
}

/// The handles the mirror shares with the rest of the gateway.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Read like a panel that must not skip; pinned events are handed on here.
    pub journal: Arc<Journal>,
    pub metrics: Arc<Metrics>,
    /// The mirror loop beats as [`Part::Mirror`].
    pub liveness: Arc<Liveness>,
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("MQTT broker {broker}: TLS setup failed: {reason}")]
    Tls { broker: String, reason: String },
    #[error("MQTT broker {broker}: {reason}")]
    Broker { broker: String, reason: String },
}

/// The retained status topic for a prefix.
pub fn status_topic(prefix: &str) -> String {
    if prefix.is_empty() {
        "status".into()
    } else {
        format!("{prefix}/status")
    }
}

/// The topic an event is published on.
pub fn event_topic(prefix: &str, topic: &str) -> String {
    if prefix.is_empty() {
        topic.to_string()
    } else {
        format!("{prefix}/{topic}")
    }
}

/// Build the rustls client config ([`crate::tls`], the one every TLS client uses): the
/// platform's roots (`SSL_CERT_FILE` and `SSL_CERT_DIR` honoured) plus `mqtt.ca_file`,
/// or that file alone with `mqtt.ca_only`; the client certificate when one is set.
fn tls_config(
    cfg: &MqttConfig,
    client_cert: Option<Arc<ReloadableCert>>,
) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, MirrorError> {
    let fail = |reason: String| MirrorError::Tls {
        broker: cfg.url.as_str().to_string(),
        reason,
    };
    let mut roots = if cfg.ca_only {
        tokio_rustls::rustls::RootCertStore::empty()
    } else {
        match crate::tls::native_roots() {
            Ok(r) => r,
            // A plant CA alone is enough.
            Err(_) if cfg.ca_file.is_some() => tokio_rustls::rustls::RootCertStore::empty(),
            Err(crate::tls::TlsError::NoRoots { errors }) => {
                return Err(fail(format!(
                    "no trusted root certificates ({})",
                    errors
                        .first()
                        .map_or("no certificates found", String::as_str)
                )));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    };
    if let Some(ca) = &cfg.ca_file {
        crate::tls::certs::add_ca_bundle(&mut roots, ca).map_err(|e| fail(e.to_string()))?;
    }
    let client_cert = match (client_cert, &cfg.client_tls) {
        (Some(c), _) => Some(c),
        (None, Some(t)) => Some(ReloadableCert::new(
            &crate::tls::certs::load(&t.files).map_err(|e| fail(e.to_string()))?,
        )),
        (None, None) => None,
    };
    crate::tls::client_config_with(roots, client_cert).map_err(|e| fail(e.to_string()))
}

/// Run the mirror until `shutdown`. Returns an error only for a config that cannot work
/// (no TLS roots); broker failures are retried with backoff.
///
/// Every pinned event ends as one [`Handoff`] on `acks` (when `required`): `Delivered`
/// on the broker's acknowledgement of its own publish, `Rejected` when the broker can
/// never take it (see [`MirrorRejectReason`]).
pub async fn run(
    settings: MirrorSettings,
    shared: Shared,
    acks: mpsc::Sender<Handoff>,
    shutdown: Shutdown,
) -> Result<(), MirrorError> {
    let MirrorSettings {
        mqtt: cfg,
        password,
        max_event_bytes,
        packet_limit_warning,
        client_cert,
    } = settings;
    let broker = cfg.url.clone();
    let tls = if broker.tls {
        Some(tls_config(&cfg, client_cert)?)
    } else {
        None
    };
    if let Some(w) = packet_limit_warning {
        log::warn!("{w}");
    }
    let window = cfg.inflight.clamp(1, u16::MAX as usize - 2);
    let status = status_topic(&cfg.prefix);
    // The largest event entry plus the topic and v5 properties.
    let max_packet = crate::event::max_entry_bytes(max_event_bytes) + cfg.prefix.len() + 2048;
    // rumqttc in-flight = the event window + the status publishes, so `offline` and the
    // DISCONNECT are never held behind a full window.
    let rumqttc_inflight = (window + 2) as u16;
    let opts = client::Options {
        config: &cfg,
        password: password.as_ref(),
        broker: &broker,
        tls,
        max_packet,
        inflight: rumqttc_inflight,
        channel: window + 4,
        status_topic: status.clone(),
    };
    let (submitter, driver) = client::new(&opts);
    let mut m = Mirror {
        required: cfg.required,
        qos: cfg.qos,
        window_cap: window,
        window: VecDeque::with_capacity(window),
        fifo: VecDeque::with_capacity(window + 4),
        pkids: vec![None; rumqttc_inflight as usize + 1],
        // Events restored from a snapshot that were not handed on come first; the rest
        // were published before the restart.
        cursor: shared.journal.first_unhanded(),
        read_buf: Vec::with_capacity(window),
        connected: false,
        broker_max: None,
        probe: None,
        false_alarms: (0, None),
        resume: false,
        status,
        cfg,
        max_event_bytes,
        ctx: shared,
        acks,
        submitter,
        refusals_logged: false,
    };
    m.run(driver, shutdown).await;
    Ok(())
}

/// A warning when events the journal accepts can exceed the broker's configured
/// Maximum Packet Size (they would be dead-lettered as `MirrorRejected`).
pub fn packet_limit_warning(config: &crate::config::Config) -> Option<String> {
    let m = config.mqtt.as_ref()?;
    let limit = m.max_packet_size?;
    let body = config.journal.max_event_bytes;
    (body + m.prefix.len() + 64 > limit).then(|| {
        format!(
            "warning: journal.max_event_bytes ({body}) plus topic and headers can exceed \
             mqtt.max_packet_size ({limit}): such events are dead-lettered (MirrorRejected) \
             instead of mirrored"
        )
    })
}

/// Size in bytes of an MQTT PUBLISH packet (fixed header included): MQTT 3.1.1 §3.3,
/// MQTT 5 §3.3 (properties: user properties `0x26`, content type `0x03`).
pub fn publish_packet_size(
    v5: bool,
    topic: usize,
    qos: u8,
    payload: usize,
    props: Option<&V5Props>,
) -> usize {
    fn varint_len(n: usize) -> usize {
        match n {
            0..=127 => 1,
            128..=16_383 => 2,
            16_384..=2_097_151 => 3,
            _ => 4,
        }
    }
    let mut len = 2 + topic + payload + if qos > 0 { 2 } else { 0 };
    if v5 {
        let p = props.map_or(0, |p| {
            p.user
                .iter()
                .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
                .sum::<usize>()
                + p.content_type.as_ref().map_or(0, |c| 1 + 2 + c.len())
        });
        len += varint_len(p) + p;
    }
    1 + varint_len(len) + len
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// In the window, held back while a suspect event is probed alone.
    Queued,
    /// Queued to rumqttc, not yet written.
    Submitted,
    /// Written, awaiting the broker's acknowledgement.
    Sent,
    /// Acknowledged or given up on (kept only until the slots before it are done too).
    Done,
}

struct Slot {
    ev: Arc<EncodedEvent>,
    state: SlotState,
    /// Connections lost while this was the oldest unacknowledged publish on the wire,
    /// or transient refusals of it.
    strikes: u8,
    /// When its publish was last written.
    sent_at: Option<tokio::time::Instant>,
}

/// What a submitted publish carries, in submission order.
#[derive(Debug, Clone, Copy)]
enum Sub {
    Event(u64),
    Status,
}

struct Mirror {
    ctx: Shared,
    cfg: MqttConfig,
    max_event_bytes: usize,
    acks: mpsc::Sender<Handoff>,
    submitter: Submitter,
    required: bool,
    qos: u8,
    /// Events taken from the journal and not yet acknowledged, in seq order.
    window: VecDeque<Slot>,
    window_cap: usize,
    /// Publishes submitted whose `Outgoing::Publish` has not been seen yet.
    fifo: VecDeque<Sub>,
    /// Packet id → what it carries, until acknowledged.
    pkids: Vec<Option<Sub>>,
    /// Next journal seq to take.
    cursor: u64,
    read_buf: Vec<Arc<EncodedEvent>>,
    connected: bool,
    /// The Maximum Packet Size the broker announced in its last CONNACK (MQTT 5).
    broker_max: Option<usize>,
    /// The suspect event sent alone after a connection was lost with it unacknowledged
    /// on the wire: acknowledged, it clears; lost on again, it is a poison event.
    probe: Option<u64>,
    /// Probes acknowledged in a row, each within [`FALSE_ALARM_WINDOW`] of the one
    /// before and with no poison event found since, less one (0 for an isolated one),
    /// and when the last was: losses that struck a publish and were not its
    /// fault (a cut connection, another client taking the session over, as mosquitto
    /// does silently with MQTT 3.1.1). See [`strike_delay`].
    false_alarms: (u32, Option<tokio::time::Instant>),
    /// A probe ended while connected: submit the queued slots.
    resume: bool,
    status: String,
    refusals_logged: bool,
}

impl Mirror {
    fn broker(&self) -> &str {
        self.cfg.url.as_str()
    }

    async fn run(&mut self, mut driver: Driver, mut shutdown: Shutdown) {
        self.ctx.liveness.register(Part::Mirror);
        let metrics = self.ctx.metrics.clone();
        let mut journal_rx = self.ctx.journal.subscribe();
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX, HEALTHY_AFTER);
        // Failed attempts since the last successful connect, and the last failure logged.
        let mut failures: u64 = 0;
        // Kept across a connection that did not last (a broker dropping us right after
        // CONNACK): a flapping connection is one state, logged once, not once a cycle.
        let mut last_logged: Option<ConnFailure> = None;
        let mut announce_reconnect = false;
        let mut up_since: Option<tokio::time::Instant> = None;
        let mut ever_connected = false;

        let mut beat = tokio::time::interval(self.ctx.liveness.beat_interval());
        let socket = match &self.cfg.url.endpoint {
            Endpoint::Unix(path) => Some(path.clone()),
            Endpoint::Tcp { .. } => None,
        };
        loop {
            // One poll, kept alive until it completes; meanwhile feed the window.
            let polled = {
                let fut = driver.poll(socket.as_deref());
                tokio::pin!(fut);
                loop {
                    self.ctx.liveness.beat(Part::Mirror);
                    if self.connected && self.probe.is_none() {
                        self.fill().await;
                    }
                    let room = self.connected
                        && self.probe.is_none()
                        && self.window.len() < self.window_cap;
                    tokio::select! {
                        biased;
                        _ = shutdown.recv() => break None,
                        _ = beat.tick() => {}
                        r = &mut fut => break Some(r),
                        changed = journal_rx.changed(), if room => {
                            if changed.is_err() {
                                // The journal is gone: nothing more will come.
                                break None;
                            }
                        }
                    }
                }
            };
            let Some(polled) = polled else {
                self.graceful_stop(&mut driver).await;
                return;
            };
            match polled {
                Ok(Ev::Connected { max_packet }) => {
                    self.connected = true;
                    let announced = max_packet.map(|m| m as usize);
                    if announced != self.broker_max
                        && let Some(limit) = announced
                    {
                        let body = self.max_event_bytes;
                        if body + self.cfg.prefix.len() + 64 > limit {
                            log::warn!(
                                "MQTT broker {} announces a Maximum Packet Size of {limit} \
                                 bytes; events up to journal.max_event_bytes ({body}) can \
                                 exceed it and are then dead-lettered (MirrorRejected)",
                                self.broker()
                            );
                        }
                    }
                    self.broker_max = announced;
                    metrics.mirror_state.set(PartState::Up);
                    backoff.up();
                    let resend = self.window.iter().filter(|s| s.state != SlotState::Done);
                    let resend = resend.count();
                    if !ever_connected {
                        log::info!(
                            "MQTT mirror connected to {} (MQTT {}, client id {:?})",
                            self.broker(),
                            proto(self.cfg.protocol),
                            self.cfg.client_id
                        );
                    } else if std::mem::take(&mut announce_reconnect) {
                        log::info!(
                            "MQTT mirror reconnected to {} after {failures} failed attempt(s); \
                             re-sending {resend} unacknowledged event(s)",
                            self.broker()
                        );
                    }
                    ever_connected = true;
                    failures = 0;
                    up_since = Some(tokio::time::Instant::now());
                    self.refusals_logged = false;
                    self.on_connected().await;
                }
                Ok(Ev::Published(pkid)) => self.on_published(pkid).await,
                Ok(Ev::Acked { pkid, refused }) => self.on_acked(pkid, refused).await,
                Ok(Ev::Disconnected) | Ok(Ev::Other) => {}
                Err(failure) => {
                    let was_connected = self.connected;
                    let blames = failure.blames_publish();
                    let struck = self.on_lost(was_connected, blames).await;
                    driver.reset_after_failure();
                    metrics.mirror_state.set(PartState::Down);
                    metrics.mqtt_reconnects.inc();
                    failures += 1;
                    let err = MirrorError::Broker {
                        broker: self.cfg.url.to_string(),
                        reason: failure.to_string(),
                    };
                    if up_since
                        .take()
                        .is_some_and(|t| t.elapsed() >= HEALTHY_AFTER)
                    {
                        last_logged = None;
                    }
                    if last_logged.as_ref() != Some(&failure) {
                        log::warn!("{err}; retrying with backoff");
                        last_logged = Some(failure);
                        announce_reconnect = true;
                    } else {
                        log::debug!("{err} (attempt {failures})");
                    }
                    // A loss pinned on one publish (a strike) is part of finding a poison
                    // event, at most two per event: reconnect soon rather than let a
                    // handful of poison events push the backoff to its maximum.
                    let delay = if struck {
                        strike_delay(self.false_alarms, tokio::time::Instant::now())
                    } else {
                        backoff.down()
                    };
                    tokio::select! {
                        _ = shutdown.recv() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Take events from the journal into the window and submit them (after what waited
    /// behind a probe).
    async fn fill(&mut self) {
        if std::mem::take(&mut self.resume) {
            self.submit_queued().await;
        }
        while self.window.len() < self.window_cap {
            let room = self.window_cap - self.window.len();
            let mut buf = std::mem::take(&mut self.read_buf);
            buf.clear();
            if let Some(gap) = self.ctx.journal.read(&mut self.cursor, &mut buf, room)
                && gap.kind == GapKind::Overwritten
            {
                // Only a best-effort mirror can fall behind: required events are pinned.
                self.ctx.metrics.mqtt_skipped.add(gap.missed());
                log::warn!(
                    "MQTT mirror fell behind: events {}..={} were overwritten before they \
                     were published ({} skipped)",
                    gap.from,
                    gap.to,
                    gap.missed()
                );
            }
            let got = buf.len();
            for ev in buf.drain(..) {
                self.window.push_back(Slot {
                    ev: ev.clone(),
                    state: SlotState::Submitted,
                    strikes: 0,
                    sent_at: None,
                });
                self.submit_event(&ev).await;
            }
            self.read_buf = buf;
            self.ctx.metrics.mqtt_inflight.set(self.window.len() as u64);
            if got == 0 {
                break;
            }
        }
    }

    /// Submit the publish of a window event, or give up on it at once when it is larger
    /// than the broker takes.
    async fn submit_event(&mut self, ev: &EncodedEvent) {
        let frame = ev.frame();
        let payload = match self.cfg.payload {
            Payload::Body => ev.body(),
            Payload::Json => Bytes::from(ev.json.clone()),
            Payload::Postcard => ev.postcard.clone(),
        };
        let v5 = self.cfg.protocol == MqttProtocol::V5;
        let props = v5.then(|| {
            // Values cut to the limits of DESIGN §3 and cleaned of what MQTT forbids.
            let text = |s: &str| mqtt_clean(s, '?', crate::routing::MQTT_STRING_MAX).into_owned();
            let mut user = Vec::with_capacity(4);
            user.push(("seq".to_string(), ev.seq.to_string()));
            let mut ct = None;
            if let Some(f) = &frame {
                // Valid by construction (crate::trace): hex digits and dashes.
                if let Some(tp) = f.traceparent {
                    user.push(("traceparent".to_string(), tp.to_string()));
                }
                if let Some(id) = f.message_id {
                    user.push(("message_id".to_string(), text(id)));
                }
                if let Some(c) = f.content_type {
                    let c = text(c);
                    user.push(("content_type".to_string(), c.clone()));
                    ct = Some(c);
                }
            }
            V5Props {
                user,
                content_type: match self.cfg.payload {
                    Payload::Body => ct,
                    Payload::Json => Some("application/json".into()),
                    Payload::Postcard => None,
                },
            }
        });
        let topic = event_topic(&self.cfg.prefix, ev.topic.as_str());
        let size = publish_packet_size(v5, topic.len(), self.qos, payload.len(), props.as_ref());
        let limit = [self.broker_max, self.cfg.max_packet_size]
            .into_iter()
            .flatten()
            .min();
        if let Some(limit) = limit.filter(|l| size > *l) {
            let whose = if self.broker_max == Some(limit) {
                "the broker's Maximum Packet Size (CONNACK)"
            } else {
                "mqtt.max_packet_size"
            };
            let why = format!("MQTT publish of {size} bytes exceeds {whose} of {limit} bytes");
            self.reject(ev.seq, MirrorRejectReason::PacketTooLarge, why)
                .await;
            return;
        }
        self.submit(
            Sub::Event(ev.seq),
            topic,
            self.qos,
            self.cfg.retain,
            payload,
            props,
        )
        .await;
    }

    async fn submit(
        &mut self,
        sub: Sub,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Bytes,
        props: Option<V5Props>,
    ) {
        match self
            .submitter
            .publish(topic, qos, retain, payload, props)
            .await
        {
            Ok(()) => self.fifo.push_back(sub),
            // Only possible when the event loop is gone, which it is not while we run.
            Err(e) => log::error!("MQTT mirror: cannot queue a publish: {e}"),
        }
    }

    /// A new session: publish `online`, then re-send what the lost session did not get
    /// acknowledged, in order — only the suspect while one is being probed.
    async fn on_connected(&mut self) {
        self.fifo.clear();
        self.pkids.iter_mut().for_each(|p| *p = None);
        let online = Bytes::from_static(b"online");
        let topic = self.status.clone();
        self.submit(Sub::Status, topic, 1, true, online, None).await;
        let probe = self.probe;
        let mut resend = Vec::with_capacity(self.window.len());
        for slot in self.window.iter_mut() {
            if slot.state == SlotState::Done {
                continue;
            }
            if probe.is_some_and(|p| p != slot.ev.seq) {
                slot.state = SlotState::Queued;
            } else {
                slot.state = SlotState::Submitted;
                resend.push(slot.ev.clone());
            }
        }
        if !resend.is_empty() {
            self.ctx.metrics.mqtt_republished.add(resend.len() as u64);
        }
        for ev in resend {
            self.submit_event(&ev).await;
        }
    }

    /// The connection is gone. The oldest publish that was on the wire unacknowledged
    /// is the suspect (brokers handle publishes in order, so those before it were
    /// taken): a first loss gets it probed alone on the next connection; a loss while
    /// it was alone on the wire makes it a poison event.
    /// Only a loss a publish can cause counts (`blames`: not a takeover, a broker
    /// shutting down or a timeout), and only against a publish written within
    /// [`STRIKE_WINDOW`] — or, with none on the wire, the one being written when the
    /// connection died. Returns true when the loss was pinned on a publish (a strike).
    async fn on_lost(&mut self, was_connected: bool, blames: bool) -> bool {
        self.connected = false;
        let writing = self.fifo.iter().find_map(|s| match s {
            Sub::Event(seq) => Some(*seq),
            Sub::Status => None,
        });
        self.fifo.clear();
        self.pkids.iter_mut().for_each(|p| *p = None);
        if !was_connected || !blames {
            return false;
        }
        let sent = self.window.iter().position(|s| s.state == SlotState::Sent);
        let idx = match sent {
            Some(i) => {
                let recent = self.window[i]
                    .sent_at
                    .is_some_and(|t| t.elapsed() < STRIKE_WINDOW);
                if !recent {
                    return false;
                }
                i
            }
            None => match writing
                .and_then(|seq| self.window.binary_search_by_key(&seq, |s| s.ev.seq).ok())
            {
                Some(i) => i,
                None => return false,
            },
        };
        let slot = &mut self.window[idx];
        slot.strikes = slot.strikes.saturating_add(1);
        let seq = slot.ev.seq;
        if slot.strikes >= 2 && self.probe == Some(seq) {
            self.probe = None;
            // A poison event found: the innocent probes before it were part of finding
            // it (the loss struck the publish before it), not a takeover cycle.
            self.false_alarms = (0, None);
            let why = "the MQTT broker closed the connection twice on this publish alone \
                       (too large or malformed for it)"
                .to_string();
            self.reject(seq, MirrorRejectReason::Disconnected, why)
                .await;
        } else {
            self.probe = Some(seq);
        }
        true
    }

    /// Submit what waited behind a probe that has ended.
    async fn submit_queued(&mut self) {
        let mut queued = Vec::new();
        for slot in self.window.iter_mut() {
            if slot.state == SlotState::Queued {
                slot.state = SlotState::Submitted;
                queued.push(slot.ev.clone());
            }
        }
        for ev in queued {
            self.submit_event(&ev).await;
        }
    }

    async fn on_published(&mut self, pkid: u16) {
        let Some(sub) = self.fifo.pop_front() else {
            log::error!(
                "MQTT mirror: publish {pkid} left that was not submitted in this session; \
                 its acknowledgement will be ignored"
            );
            return;
        };
        let Sub::Event(seq) = sub else {
            if pkid != 0 {
                self.set_pkid(pkid, sub);
            }
            return;
        };
        self.ctx.metrics.mqtt_published.inc();
        if pkid == 0 {
            // QoS 0: written is as acknowledged as it gets.
            self.delivered(seq).await;
        } else {
            if let Some(slot) = self.slot_mut(seq) {
                slot.state = SlotState::Sent;
                slot.sent_at = Some(tokio::time::Instant::now());
            }
            self.set_pkid(pkid, sub);
        }
    }

    fn set_pkid(&mut self, pkid: u16, sub: Sub) {
        match self.pkids.get_mut(pkid as usize) {
            Some(p) => *p = Some(sub),
            None => log::error!("MQTT mirror: packet id {pkid} outside the in-flight window"),
        }
    }

    async fn on_acked(&mut self, pkid: u16, refused: Option<Refusal>) {
        let Some(sub) = self.pkids.get_mut(pkid as usize).and_then(Option::take) else {
            return;
        };
        let Sub::Event(seq) = sub else {
            return;
        };
        match refused {
            None => self.delivered(seq).await,
            Some(r) => {
                let strikes = self.slot_mut(seq).map_or(0, |s| {
                    s.strikes = s.strikes.saturating_add(1);
                    s.strikes
                });
                if r.permanent || strikes >= TRANSIENT_REFUSALS {
                    let why = format!("the MQTT broker refused the publish: {}", r.text);
                    self.reject(seq, MirrorRejectReason::Refused, why).await;
                } else if let Some(ev) = self.slot_mut(seq).map(|s| {
                    s.state = SlotState::Submitted;
                    s.ev.clone()
                }) {
                    // May pass when sent again (quota, transient broker error).
                    if !std::mem::replace(&mut self.refusals_logged, true) {
                        log::warn!(
                            "MQTT broker {} refused a publish: {}; sending it again",
                            self.cfg.url,
                            r.text
                        );
                    }
                    self.submit_event(&ev).await;
                }
            }
        }
    }

    fn slot_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        let idx = self.window.binary_search_by_key(&seq, |s| s.ev.seq).ok()?;
        self.window.get_mut(idx)
    }

    /// The broker has event `seq`: hand it on and tell the source.
    async fn delivered(&mut self, seq: u64) {
        if let Some(t) = self.slot_mut(seq).map(|s| s.ev.times) {
            let now = crate::event::now_ms();
            let m = &self.ctx.metrics;
            let mut o = crate::metrics::Observations::default();
            if let Some(at) = t.enqueued_at_ms {
                o.observe_ms(now.saturating_sub(at));
                m.event_age.mirror.record(&o);
            }
            if let Some(at) = t.received_at_ms {
                o = crate::metrics::Observations::default();
                o.observe_ms(now.saturating_sub(at));
                m.gateway_latency.mirror.record(&o);
            }
        }
        if self.probe == Some(seq) {
            let now = tokio::time::Instant::now();
            let (n, last) = self.false_alarms;
            let recent = last.is_some_and(|t| now - t < FALSE_ALARM_WINDOW);
            // The first in a run costs nothing extra; each further one doubles the wait.
            self.false_alarms = (if recent { n.saturating_add(1) } else { 0 }, Some(now));
        }
        if self.finish(seq) {
            self.ctx.metrics.mqtt_acked.inc();
            if self.required {
                // The source may be gone during shutdown; nothing to settle then.
                let _ = self.acks.send(Handoff::Delivered(seq)).await;
            }
        }
    }

    /// The broker can never take event `seq`: a poison event for the mirror. Logged once,
    /// counted, handed on and — when required — dead-lettered at the source.
    async fn reject(&mut self, seq: u64, reason: MirrorRejectReason, why: String) {
        if !self.finish(seq) {
            return;
        }
        self.ctx.metrics.mqtt_rejected.of(reason).inc();
        log::error!(
            "MQTT mirror: event {seq} is not mirrored: {why}; {}",
            if self.required {
                "its message is dead-lettered (MirrorRejected)"
            } else {
                "skipped (mirror not required)"
            }
        );
        if self.required {
            let _ = self
                .acks
                .send(Handoff::Rejected {
                    seq,
                    description: why,
                })
                .await;
        }
    }

    /// Mark `seq` done in the window; false when it already was. (The source unpins the
    /// event in the journal when it gets the handoff: pinning is the source's.)
    fn finish(&mut self, seq: u64) -> bool {
        let Some(slot) = self.slot_mut(seq) else {
            return false;
        };
        if slot.state == SlotState::Done {
            return false;
        }
        slot.state = SlotState::Done;
        if self.probe == Some(seq) {
            // The probe ended: what waited behind it goes out with the next fill.
            self.probe = None;
            self.resume = true;
        }
        while self
            .window
            .front()
            .is_some_and(|s| s.state == SlotState::Done)
        {
            self.window.pop_front();
        }
        self.ctx.metrics.mqtt_inflight.set(self.window.len() as u64);
        true
    }

    /// Publish `offline` (retained) and disconnect, within [`SHUTDOWN_GRACE`].
    async fn graceful_stop(&mut self, driver: &mut Driver) {
        if !self.connected {
            return;
        }
        let offline = Bytes::from_static(b"offline");
        let topic = self.status.clone();
        self.submit(Sub::Status, topic, 1, true, offline, None)
            .await;
        self.submitter.disconnect().await;
        let drain = async {
            loop {
                // Errors end the drain: no need to name their cause.
                match driver.poll(None).await {
                    Ok(Ev::Disconnected) | Err(_) => break,
                    Ok(Ev::Published(pkid)) => self.on_published(pkid).await,
                    Ok(Ev::Acked { pkid, refused }) => self.on_acked(pkid, refused).await,
                    Ok(_) => {}
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            log::warn!(
                "MQTT mirror: {} did not take the disconnect in time",
                self.cfg.url
            );
        } else {
            log::info!("MQTT mirror disconnected from {}", self.cfg.url);
        }
        self.connected = false;
        self.ctx.metrics.mirror_state.set(PartState::Down);
    }
}

fn proto(p: MqttProtocol) -> &'static str {
    match p {
        MqttProtocol::V311 => "3.1.1",
        MqttProtocol::V5 => "5",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strikes_reconnect_soon_unless_probes_keep_turning_out_innocent() {
        let now = tokio::time::Instant::now();
        let ms = |d: Duration| d.as_millis();
        // No false alarm, or only old ones: 50–100 ms.
        for alarms in [(0, None), (5, Some(now - FALSE_ALARM_WINDOW))] {
            let d = strike_delay(alarms, now);
            assert!((50..=100).contains(&ms(d)), "{alarms:?}: {d:?}");
        }
        // A run of false alarms doubles it, up to the backoff's maximum.
        let d = strike_delay((3, Some(now)), now);
        assert!((400..=800).contains(&ms(d)), "{d:?}");
        let d = strike_delay((40, Some(now)), now);
        assert!(d <= BACKOFF_MAX && d >= BACKOFF_MAX / 2, "{d:?}");
    }

    #[test]
    fn topics() {
        assert_eq!(status_topic("factory/asb"), "factory/asb/status");
        assert_eq!(
            event_topic("factory/asb", "line1/temp"),
            "factory/asb/line1/temp"
        );
        assert_eq!(event_topic("", "t"), "t");
    }

    #[test]
    fn publish_size_matches_rumqttc() {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
        for (topic, payload, qos) in [
            ("a", 0, 1u8),
            ("factory/asb/x", 100, 1),
            ("t", 20_000, 1),
            ("t", 130, 0),
        ] {
            for with_props in [false, true] {
                let props = with_props.then(|| V5Props {
                    user: vec![
                        ("seq".into(), "12345".into()),
                        ("message_id".into(), "m".repeat(128)),
                    ],
                    content_type: Some("application/json".into()),
                });
                let q = if qos == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                let mut p = Publish::new(
                    topic,
                    q,
                    vec![0u8; payload],
                    props.as_ref().map(|p| PublishProperties {
                        user_properties: p.user.clone(),
                        content_type: p.content_type.clone(),
                        ..Default::default()
                    }),
                );
                p.pkid = if qos == 0 { 0 } else { 1 };
                assert_eq!(
                    publish_packet_size(true, topic.len(), qos, payload, props.as_ref()),
                    p.size(),
                    "{topic} {payload} {with_props}"
                );
            }
            let mut p4 = rumqttc::Publish::new(
                topic,
                if qos == 0 {
                    rumqttc::QoS::AtMostOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                },
                vec![0u8; payload],
            );
            p4.pkid = if qos == 0 { 0 } else { 1 };
            assert_eq!(
                publish_packet_size(false, topic.len(), qos, payload, None),
                p4.size()
            );
        }
    }

    #[test]
    fn tls_config_uses_ring() {
        // The platform may have no roots in a minimal container; both outcomes name
        // the broker and never panic.
        let cfg = MqttConfig {
            url: crate::config::BrokerUrl::parse("mqtts://b:8883").unwrap(),
            ..MqttConfig::default()
        };
        match tls_config(&cfg, None) {
            Ok(cfg) => assert!(!cfg.crypto_provider().cipher_suites.is_empty()),
            Err(e) => assert!(e.to_string().contains("mqtts://b:8883")),
        }
    }
}
