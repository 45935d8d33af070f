//! Counters and gauges shared by every part of the data flow, rendered as Prometheus
//! text on `GET /metrics` (names prefixed `asbgw_`), and the part states behind
//! `GET /healthz`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};

/// Why the gateway dead-lettered a message (DeadLetterReason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    PayloadTooLarge,
    Undecodable,
    /// The MQTT broker can never take the event (the mirror's poison event).
    MirrorRejected,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 3] = [
        DeadLetterReason::PayloadTooLarge,
        DeadLetterReason::Undecodable,
        DeadLetterReason::MirrorRejected,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::PayloadTooLarge => "PayloadTooLarge",
            DeadLetterReason::Undecodable => "Undecodable",
            DeadLetterReason::MirrorRejected => "MirrorRejected",
        }
    }
}

/// Why the mirror gave up on an event (`asbgw_mqtt_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorRejectReason {
    /// Larger than the broker's Maximum Packet Size (CONNACK) or `mqtt.max_packet_size`.
    PacketTooLarge,
    /// An MQTT 5 PUBACK/PUBREC/PUBCOMP reason code of 0x80 or more.
    Refused,
    /// The broker closed the connection twice in a row on this publish alone.
    Disconnected,
}

impl MirrorRejectReason {
    pub const ALL: [MirrorRejectReason; 3] = [
        MirrorRejectReason::PacketTooLarge,
        MirrorRejectReason::Refused,
        MirrorRejectReason::Disconnected,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            MirrorRejectReason::PacketTooLarge => "packet_too_large",
            MirrorRejectReason::Refused => "refused",
            MirrorRejectReason::Disconnected => "disconnected",
        }
    }
}

/// The state of each subscription's link, for `/healthz`: `None` = attached, else why
/// not. Written by the source on each state change only.
#[derive(Debug, Default)]
pub struct LinkStates(std::sync::Mutex<Vec<(String, Option<String>)>>);

impl LinkStates {
    /// Name the links (entity paths), all not yet attached.
    pub fn init(&self, addresses: impl IntoIterator<Item = String>) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *v = addresses
            .into_iter()
            .map(|a| (a, Some("not attached yet".to_string())))
            .collect();
    }

    /// Link `i` is attached (`None`) or down for a reason.
    pub fn set(&self, i: usize, down: Option<String>) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = v.get_mut(i) {
            slot.1 = down;
        }
    }

    /// Every link attached (true when there are none registered).
    pub fn all_attached(&self) -> bool {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.iter().all(|(_, d)| d.is_none())
    }

    /// `{"ADDRESS":"attached"|"REASON",…}`
    fn json(&self) -> String {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::from("{");
        for (k, (addr, down)) in v.iter().enumerate() {
            if k > 0 {
                out.push(',');
            }
            let state = down.as_deref().unwrap_or("attached");
            out.push_str(&serde_json::to_string(addr).unwrap_or_default());
            out.push(':');
            out.push_str(&serde_json::to_string(state).unwrap_or_default());
        }
        out.push('}');
        out
    }
}

/// Why a panel upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    Unauthorized,
    Origin,
    Full,
    BadRequest,
    /// A filter the token does not allow (`GET /v1/last`).
    Forbidden,
    /// The TLS handshake failed or timed out.
    Tls,
    /// A `Host` not in `panels.server_names` (HTTP 421).
    Host,
}

impl RejectReason {
    pub const ALL: [RejectReason; 7] = [
        RejectReason::Unauthorized,
        RejectReason::Origin,
        RejectReason::Full,
        RejectReason::BadRequest,
        RejectReason::Forbidden,
        RejectReason::Tls,
        RejectReason::Host,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::Origin => "origin",
            RejectReason::Full => "full",
            RejectReason::BadRequest => "bad_request",
            RejectReason::Forbidden => "forbidden",
            RejectReason::Tls => "tls",
            RejectReason::Host => "host",
        }
    }
}

/// State of one part (source or mirror).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PartState {
    Starting = 0,
    Up = 1,
    Down = 2,
    Disabled = 3,
}

impl PartState {
    pub fn as_str(self) -> &'static str {
        match self {
            PartState::Starting => "starting",
            PartState::Up => "up",
            PartState::Down => "down",
            PartState::Disabled => "disabled",
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            1 => PartState::Up,
            2 => PartState::Down,
            3 => PartState::Disabled,
            _ => PartState::Starting,
        }
    }
}

#[derive(Debug, Default)]
pub struct StateCell(AtomicU8);

impl StateCell {
    pub fn set(&self, s: PartState) {
        self.0.store(s as u8, Relaxed)
    }
    pub fn get(&self) -> PartState {
        PartState::from_u8(self.0.load(Relaxed))
    }
}

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    /// Copy in a count kept elsewhere (it only grows there), at render time.
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed)
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn dec(&self) {
        // saturating: a gauge never wraps below zero
        let _ = self
            .0
            .fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(1)));
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A gauge of seconds with a fractional part (stored as the bits of an `f64`).
#[derive(Debug, Default)]
pub struct Seconds(AtomicU64);

impl Seconds {
    pub fn set(&self, d: std::time::Duration) {
        self.0.store(d.as_secs_f64().to_bits(), Relaxed)
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

impl Exposed for Seconds {
    fn kind(&self) -> &'static str {
        "gauge"
    }
    fn samples(&self, sample: &mut dyn FnMut(&str, &dyn std::fmt::Display)) {
        sample("", &self.get())
    }
}

/// A reason label (`{reason="…"}`) of a metric family.
pub trait Reason: Copy + 'static {
    /// Every reason, in exposition order.
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
}

impl Reason for DeadLetterReason {
    const ALL: &'static [Self] = &DeadLetterReason::ALL;
    fn as_str(self) -> &'static str {
        DeadLetterReason::as_str(self)
    }
}

impl Reason for MirrorRejectReason {
    const ALL: &'static [Self] = &MirrorRejectReason::ALL;
    fn as_str(self) -> &'static str {
        MirrorRejectReason::as_str(self)
    }
}

impl Reason for RejectReason {
    const ALL: &'static [Self] = &RejectReason::ALL;
    fn as_str(self) -> &'static str {
        RejectReason::as_str(self)
    }
}

/// One counter per reason of `R`.
pub struct Family<R: Reason> {
    cells: Vec<Counter>,
    _reason: std::marker::PhantomData<R>,
}

impl<R: Reason + PartialEq> Family<R> {
    /// The counter of reason `r`.
    pub fn of(&self, r: R) -> &Counter {
        let i = R::ALL.iter().position(|x| *x == r).unwrap_or(0);
        &self.cells[i]
    }
}

impl<R: Reason> Default for Family<R> {
    fn default() -> Self {
        Family {
            cells: R::ALL.iter().map(|_| Counter::default()).collect(),
            _reason: std::marker::PhantomData,
        }
    }
}

impl<R: Reason> std::fmt::Debug for Family<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(R::ALL.iter().map(|r| r.as_str()).zip(self.cells.iter()))
            .finish()
    }
}

/// What a metric cell exposes: its Prometheus type and its samples (label set, value).
trait Exposed {
    fn kind(&self) -> &'static str;
    fn samples(&self, sample: &mut dyn FnMut(&str, &dyn std::fmt::Display));
}

impl Exposed for Counter {
    fn kind(&self) -> &'static str {
        "counter"
    }
    fn samples(&self, sample: &mut dyn FnMut(&str, &dyn std::fmt::Display)) {
        sample("", &self.get())
    }
}

impl Exposed for Gauge {
    fn kind(&self) -> &'static str {
        "gauge"
    }
    fn samples(&self, sample: &mut dyn FnMut(&str, &dyn std::fmt::Display)) {
        sample("", &self.get())
    }
}

/// A gauge that has no sample until it is first set (a value that does not exist on
/// every box, such as a certificate's expiry).
#[derive(Debug)]
pub struct OptGauge(AtomicU64);

impl Default for OptGauge {
    fn default() -> Self {
        OptGauge(AtomicU64::new(u64::MAX))
    }
}

impl OptGauge {
    pub fn set(&self, v: u64) {
        self.0.store(v.min(u64::MAX - 1), Relaxed)
    }
    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Relaxed)).filter(|v| *v != u64::MAX)
    }
}

impl Exposed for OptGauge {
    fn kind(&self) -> &'static str {
        "gauge"
    }
    fn samples(&self, sample: &mut dyn FnMut(&str, &dyn std::fmt::Display)) {
        if let Some(v) = self.get() {
            sample("", &v)
        }
    }
}

/// A certificate's expiry, exposed as the seconds left until it (0 once expired), as of
/// each scrape; no sample until a certificate is known.
#[derive(Debug, Default)]
pub struct Expiry(OptGauge);

impl Expiry {
    /// The certificate in use is valid until `not_after`.
    pub fn set(&self, not_after: std::time::SystemTime) {
        let secs = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.0.set(secs)
    }
    /// Seconds left, or None before [`Expiry::set`].
    pub fn seconds_left(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.0.get().map(|at| at.saturating_sub(now))
    }
}

impl Exposed for Expiry {
    fn kind(&self) -> &'static str {
        "gauge"
    }
    fn samples(&self, sample: &mut dyn FnMut(&str, &dyn std::fmt::Display)) {
        if let Some(v) = self.seconds_left() {
            sample("", &v)
        }
    }
}

/// A part's state is exposed as a 0/1 gauge: 1 when up.
impl Exposed for StateCell {
    fn kind(&self) -> &'static str {
        "gauge"
    }
    fn samples(&self, sample: &mut dyn FnMut(&str, &dyn std::fmt::Display)) {
        sample("", &u64::from(self.get() == PartState::Up))
    }
}

impl<R: Reason> Exposed for Family<R> {
    fn kind(&self) -> &'static str {
        "counter"
    }
    fn samples(&self, sample: &mut dyn FnMut(&str, &dyn std::fmt::Display)) {
        for (r, c) in R::ALL.iter().zip(&self.cells) {
            sample(&format!("{{reason=\"{}\"}}", r.as_str()), &c.get())
        }
    }
}

/// Upper bounds of the latency histograms' buckets, in milliseconds: 1 ms … 60 s.
pub const LATENCY_BUCKETS_MS: [u64; 15] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
];
/// The buckets and the `+Inf` one.
const SLOTS: usize = LATENCY_BUCKETS_MS.len() + 1;

/// Observations gathered by one loop (a panel's batch, the mirror's acknowledgements)
/// before they are added to a [`Histogram`] at once: one atomic add per bucket touched,
/// not per event.
#[derive(Debug, Default, Clone)]
pub struct Observations {
    counts: [u64; SLOTS],
    sum_ms: u64,
}

impl Observations {
    /// One duration in milliseconds; a negative one (the two clocks disagree) counts as 0.
    pub fn observe_ms(&mut self, ms: i64) {
        let ms = ms.max(0) as u64;
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(SLOTS - 1);
        self.counts[i] += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
    }

    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|c| *c == 0)
    }
}

/// A Prometheus histogram of durations over [`LATENCY_BUCKETS_MS`]: fixed memory
/// (16 counters and a sum), whatever the traffic.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; SLOTS],
    sum_ms: AtomicU64,
}

impl Histogram {
    /// Add what a loop observed.
    pub fn record(&self, o: &Observations) {
        for (cell, n) in self.counts.iter().zip(o.counts) {
            if n > 0 {
                cell.fetch_add(n, Relaxed);
            }
        }
        if o.sum_ms > 0 {
            self.sum_ms.fetch_add(o.sum_ms, Relaxed);
        }
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }
}

/// Histograms labelled by where events go (`to="panels"`, `to="mirror"`).
#[derive(Debug, Default)]
pub struct ByDestination {
    /// Events handed to a panel's socket writes (live events; not a replay a panel asked
    /// for with `since`, nor last values).
    pub panels: Histogram,
    /// Events the MQTT broker acknowledged (QoS 1).
    pub mirror: Histogram,
}

impl Exposed for ByDestination {
    fn kind(&self) -> &'static str {
        "histogram"
    }
    /// Each sample's "labels" start with its suffix (`_bucket`, `_sum`, `_count`).
    fn samples(&self, sample: &mut dyn FnMut(&str, &dyn std::fmt::Display)) {
        for (to, h) in [("panels", &self.panels), ("mirror", &self.mirror)] {
            let mut cumulative = 0u64;
            for (i, cell) in h.counts.iter().enumerate() {
                cumulative += cell.load(Relaxed);
                let le = match LATENCY_BUCKETS_MS.get(i) {
                    Some(ms) => (*ms as f64 / 1000.0).to_string(),
                    None => "+Inf".to_string(),
                };
                sample(&format!("_bucket{{to=\"{to}\",le=\"{le}\"}}"), &cumulative);
            }
            let sum = h.sum_ms.load(Relaxed) as f64 / 1000.0;
            sample(&format!("_sum{{to=\"{to}\"}}"), &sum);
            sample(&format!("_count{{to=\"{to}\"}}"), &cumulative);
        }
    }
}

/// Declares [`Metrics`] and its exposition table together: each field is one metric,
/// with its name (after `asbgw_`) and help text, so a metric cannot be added and never
/// rendered.
macro_rules! metrics {
    ($( $(#[$doc:meta])* $field:ident: $ty:ty => $name:literal, $help:literal; )*) => {
        /// Every counter and gauge of the gateway, shared by the parts of the data flow.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[$doc])* pub $field: $ty, )*
            /// Each subscription's link state, for `/healthz` (not a Prometheus metric).
            pub links: LinkStates,
        }

        impl Metrics {
            /// The exposition table: (name without `asbgw_`, help, cell), in order.
            fn table(&self) -> Vec<(&'static str, &'static str, &dyn Exposed)> {
                vec![$( ($name, $help, &self.$field as &dyn Exposed), )*]
            }
        }
    };
}

metrics! {
    // source
    received: Counter => "received_total", "Messages received from the source.";
    completed: Counter => "completed_total", "Messages completed (accepted) at the source.";
    dead_lettered: Family<DeadLetterReason> =>
        "dead_lettered_total", "Messages dead-lettered by the gateway, by reason.";
    released: Counter => "released_total", "Messages released back to the source.";
    abandoned_on_link_loss: Counter =>
        "abandoned_total", "Unsettled messages whose link was lost (the broker redelivers them).";
    duplicates: Counter => "duplicates_suppressed_total", "Redeliveries suppressed before panels.";
    credit: Gauge => "credit", "Link credit currently granted to the source.";
    unsettled: Gauge => "unsettled", "Messages received and not yet settled.";
    source_reconnects: Counter => "source_reconnects_total", "Source reconnections.";
    /// Receiver-link attach attempts (first attach and every re-attach).
    link_attaches: Counter =>
        "link_attaches_total", "Receiver-link attach attempts, first attaches and re-attaches.";
    token_refreshes: Counter => "token_refreshes_total", "CBS token renewals.";
    lock_renewals: Counter => "lock_renewals_total",
        "Peek-lock renewals (com.microsoft:renew-lock) that extended a held message's lock.";
    lock_renewal_failures: Counter => "lock_renewal_failures_total",
        "Peek-lock renewals that failed (lock lost, link gone, timeout).";
    /// Held deliveries whose lock was lost before their event was handed on: left to
    /// the broker's redelivery (which is then settled as a duplicate).
    locks_lost: Counter => "locks_lost_total",
        "Held messages whose lock was lost; the broker's redelivery is settled instead.";
    source_state: StateCell => "source_up", "1 when the source is connected.";
    // journal
    journal_events: Gauge => "journal_events", "Events held in the journal.";
    journal_bytes: Gauge => "journal_bytes", "Bytes of encoded events held in the journal.";
    journal_capacity_events: Gauge => "journal_capacity_events", "Journal capacity in events.";
    journal_capacity_bytes: Gauge => "journal_capacity_bytes", "Journal capacity in bytes.";
    journal_snapshot_seconds: Seconds =>
        "journal_snapshot_seconds", "Duration of the last journal snapshot write.";
    journal_snapshot_bytes: Gauge =>
        "journal_snapshot_bytes", "Size of the last journal snapshot written.";
    journal_snapshot_errors: Counter =>
        "journal_snapshot_errors_total", "Journal snapshot or lease writes that failed.";
    journal_restored_events: Gauge =>
        "journal_restored_events", "Events restored from the snapshot at start.";
    last_values: Gauge => "last_values", "Topics in the last-value table.";
    last_values_bytes: Gauge => "last_values_bytes",
        "Bytes of last values the journal no longer holds (bounded by panels.last_values_mib).";
    last_values_evicted: Counter => "last_values_evicted_total",
        "Topics evicted from the last-value table (panels.last_values or last_values_mib reached).";
    // panels
    panels_connected: Gauge => "panels_connected", "Panels connected.";
    panels_auth_failures: Counter => "panels_auth_failures_total",
        "Wrong tokens presented on the panel port (stream, /v1/last, /metrics).";
    panels_throttled: Counter => "panels_throttled_total",
        "Requests refused with 429 from addresses blocked after too many wrong tokens.";
    panels_cert_expiry: Expiry => "panels_cert_expiry_seconds",
        "Seconds until the panel port's TLS certificate expires (no sample without TLS).";
    panels_rejected: Family<RejectReason> =>
        "panels_rejected_total", "Panel upgrades refused, by reason.";
    frames_sent: Counter => "frames_sent_total", "Frames written to panels.";
    gaps: Counter => "gaps_total", "Gap frames sent to panels.";
    events_skipped: Counter =>
        "events_skipped_total", "Events panels missed because they fell behind.";
    panels_disconnected_slow: Counter =>
        "panels_disconnected_slow_total", "Panels closed by slow_policy = disconnect.";
    panels_held_bytes: Gauge => "panels_held_bytes",
        "Bytes of events panels have not written yet that the journal has evicted (the shared pool in use).";
    panels_disconnected_held: Counter => "panels_disconnected_held_total",
        "Panels closed because the events their sockets had not taken were evicted and the shared pool was full.";
    panels_input_grants: Gauge => "panels_input_grants",
        "Grants of the panels' input pool held now (an op being read or its replies unwritten).";
    panels_disconnected_input: Counter => "panels_disconnected_input_total",
        "Panels closed for holding a grant of the input pool 10 s (a frame sent too slowly, or replies not read) while none was free.";
    // mirror
    mqtt_published: Counter => "mqtt_published_total", "Events published to MQTT.";
    mqtt_acked: Counter => "mqtt_acked_total", "MQTT publishes acknowledged by the broker.";
    mqtt_inflight: Gauge => "mqtt_inflight", "MQTT publishes awaiting acknowledgement.";
    mqtt_reconnects: Counter => "mqtt_reconnects_total", "MQTT reconnections.";
    mqtt_cert_expiry: Expiry => "mqtt_cert_expiry_seconds",
        "Seconds until the mirror's TLS client certificate expires (no sample without one).";
    /// Events re-sent after a reconnect (the subscriber may see them twice).
    mqtt_republished: Counter =>
        "mqtt_republished_total", "Unacknowledged MQTT publishes re-sent after a reconnect.";
    /// Events a best-effort mirror missed because the journal overwrote them.
    mqtt_skipped: Counter =>
        "mqtt_skipped_total", "Events a best-effort mirror missed because the journal moved on.";
    mqtt_rejected: Family<MirrorRejectReason> => "mqtt_rejected_total",
        "Events the MQTT broker can never take (dead-lettered when the mirror is required), by reason.";
    mirror_state: StateCell => "mirror_up", "1 when the MQTT mirror is connected.";
    // latency
    /// Measured from `x-opt-enqueued-time`: Service Bus backlog and gateway delay.
    event_age: ByDestination => "event_age_seconds",
        "Age of each event since Service Bus enqueued it, when handed to a panel's socket writes (to=panels, live events) and when the MQTT broker acknowledged it (to=mirror).";
    /// Measured from the gateway's receipt: its own delay only.
    gateway_latency: ByDestination => "gateway_latency_seconds",
        "Time from the gateway's receipt of each event to a panel's socket writes (to=panels) and to the MQTT broker's acknowledgement (to=mirror).";
    // budget
    budget_bytes: Gauge => "budget_bytes", "Worst-case memory of this config.";
    budget_limit_bytes: Gauge => "budget_limit_bytes", "budget.memory_mib in bytes.";
}

impl Metrics {
    /// Healthy when the source is up with every subscription's link attached, and the
    /// mirror, if any, is up.
    pub fn healthy(&self) -> bool {
        self.source_state.get() == PartState::Up
            && self.links.all_attached()
            && matches!(self.mirror_state.get(), PartState::Up | PartState::Disabled)
    }

    /// The `/healthz` body.
    pub fn health_json(&self) -> String {
        format!(
            "{{\"status\":\"{}\",\"source\":\"{}\",\"subscriptions\":{},\"mirror\":\"{}\",\"panels\":{}}}",
            if self.healthy() { "ok" } else { "degraded" },
            self.source_state.get().as_str(),
            self.links.json(),
            self.mirror_state.get().as_str(),
            self.panels_connected.get()
        )
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, help: &str, cell: &dyn Exposed| {
            let _ = writeln!(out, "# HELP asbgw_{name} {help}");
            let _ = writeln!(out, "# TYPE asbgw_{name} {}", cell.kind());
            cell.samples(&mut |labels, v| {
                let _ = writeln!(out, "asbgw_{name}{labels} {v}");
            });
        };
        for (name, help, cell) in self.table() {
            metric(name, help, cell);
        }
        // Read where it is rendered: the runtime serving /metrics is the daemon's.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let alive = Gauge::default();
            alive.set(rt.metrics().num_alive_tasks() as u64);
            metric(
                "tasks_alive",
                "Tokio tasks alive in the runtime (a leak shows as steady growth).",
                &alive,
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text() {
        let m = Metrics::default();
        m.received.add(3);
        m.dead_lettered.of(DeadLetterReason::PayloadTooLarge).inc();
        let text = m.render();
        assert!(text.contains("asbgw_received_total 3\n"));
        assert!(text.contains("asbgw_dead_lettered_total{reason=\"PayloadTooLarge\"} 1\n"));
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("asbgw_"), "{line}");
            value.parse::<f64>().unwrap();
        }
    }

    #[test]
    fn histograms_are_cumulative_prometheus_histograms() {
        let m = Metrics::default();
        let mut o = Observations::default();
        for ms in [0, 1, 3, 70, 70, 120_000, -5] {
            o.observe_ms(ms);
        }
        m.event_age.panels.record(&o);
        let text = m.render();
        assert!(text.contains("# TYPE asbgw_event_age_seconds histogram\n"));
        for (le, n) in [
            ("0.001", 3),
            ("0.005", 4),
            ("0.1", 6),
            ("60", 6),
            ("+Inf", 7),
        ] {
            let line = format!("asbgw_event_age_seconds_bucket{{to=\"panels\",le=\"{le}\"}} {n}\n");
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        assert!(text.contains("asbgw_event_age_seconds_count{to=\"panels\"} 7\n"));
        assert!(text.contains("asbgw_event_age_seconds_sum{to=\"panels\"} 120.144\n"));
        assert!(text.contains("asbgw_event_age_seconds_count{to=\"mirror\"} 0\n"));
        assert_eq!(m.event_age.panels.count(), 7);
    }

    #[test]
    fn health_needs_source_and_mirror() {
        let m = Metrics::default();
        assert!(!m.healthy());
        m.source_state.set(PartState::Up);
        m.mirror_state.set(PartState::Disabled);
        assert!(m.healthy());
        m.mirror_state.set(PartState::Down);
        assert!(!m.healthy());
        assert!(m.health_json().contains("\"mirror\":\"down\""));
    }
}
