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
}

impl RejectReason {
    pub const ALL: [RejectReason; 4] = [
        RejectReason::Unauthorized,
        RejectReason::Origin,
        RejectReason::Full,
        RejectReason::BadRequest,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::Origin => "origin",
            RejectReason::Full => "full",
            RejectReason::BadRequest => "bad_request",
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

#[derive(Debug, Default)]
pub struct Metrics {
    // source
    pub received: Counter,
    pub completed: Counter,
    pub dead_lettered_too_large: Counter,
    pub dead_lettered_undecodable: Counter,
    pub dead_lettered_mirror_rejected: Counter,
    pub lock_renewals: Counter,
    pub lock_renewal_failures: Counter,
    /// Held deliveries whose lock was lost before their event was handed on: left to
    /// the broker's redelivery (which is then settled as a duplicate).
    pub locks_lost: Counter,
    pub links: LinkStates,
    pub released: Counter,
    pub abandoned_on_link_loss: Counter,
    pub duplicates: Counter,
    pub credit: Gauge,
    pub unsettled: Gauge,
    pub source_reconnects: Counter,
    /// Receiver-link attach attempts (first attach and every re-attach).
    pub link_attaches: Counter,
    pub token_refreshes: Counter,
    pub source_state: StateCell,
    // journal
    pub journal_events: Gauge,
    pub journal_bytes: Gauge,
    pub journal_capacity_events: Gauge,
    pub journal_capacity_bytes: Gauge,
    // panels
    pub panels_connected: Gauge,
    pub panels_rejected_unauthorized: Counter,
    pub panels_rejected_origin: Counter,
    pub panels_rejected_full: Counter,
    pub panels_rejected_bad_request: Counter,
    pub frames_sent: Counter,
    pub gaps: Counter,
    pub events_skipped: Counter,
    pub panels_disconnected_slow: Counter,
    // mirror
    pub mqtt_published: Counter,
    pub mqtt_acked: Counter,
    pub mqtt_inflight: Gauge,
    pub mqtt_reconnects: Counter,
    /// Events re-sent after a reconnect (the subscriber may see them twice).
    pub mqtt_republished: Counter,
    /// Events a best-effort mirror missed because the journal overwrote them.
    pub mqtt_skipped: Counter,
    pub mqtt_rejected_packet_too_large: Counter,
    pub mqtt_rejected_refused: Counter,
    pub mqtt_rejected_disconnected: Counter,
    pub mirror_state: StateCell,
    // budget
    pub budget_bytes: Gauge,
    pub budget_limit_bytes: Gauge,
}

impl Metrics {
    pub fn dead_lettered(&self, r: DeadLetterReason) -> &Counter {
        match r {
            DeadLetterReason::PayloadTooLarge => &self.dead_lettered_too_large,
            DeadLetterReason::Undecodable => &self.dead_lettered_undecodable,
            DeadLetterReason::MirrorRejected => &self.dead_lettered_mirror_rejected,
        }
    }

    pub fn mqtt_rejected(&self, r: MirrorRejectReason) -> &Counter {
        match r {
            MirrorRejectReason::PacketTooLarge => &self.mqtt_rejected_packet_too_large,
            MirrorRejectReason::Refused => &self.mqtt_rejected_refused,
            MirrorRejectReason::Disconnected => &self.mqtt_rejected_disconnected,
        }
    }

    pub fn rejected(&self, r: RejectReason) -> &Counter {
        match r {
            RejectReason::Unauthorized => &self.panels_rejected_unauthorized,
            RejectReason::Origin => &self.panels_rejected_origin,
            RejectReason::Full => &self.panels_rejected_full,
            RejectReason::BadRequest => &self.panels_rejected_bad_request,
        }
    }

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
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP asbgw_{name} {help}");
            let _ = writeln!(out, "# TYPE asbgw_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "asbgw_{name}{labels} {v}");
            }
        };
        metric(
            "received_total",
            "counter",
            "Messages received from the source.",
            &[("", self.received.get())],
        );
        metric(
            "completed_total",
            "counter",
            "Messages completed (accepted) at the source.",
            &[("", self.completed.get())],
        );
        let dl: Vec<(String, u64)> = DeadLetterReason::ALL
            .iter()
            .map(|r| {
                (
                    format!("{{reason=\"{}\"}}", r.as_str()),
                    self.dead_lettered(*r).get(),
                )
            })
            .collect();
        let dl: Vec<(&str, u64)> = dl.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "dead_lettered_total",
            "counter",
            "Messages dead-lettered by the gateway, by reason.",
            &dl,
        );
        metric(
            "released_total",
            "counter",
            "Messages released back to the source.",
            &[("", self.released.get())],
        );
        metric(
            "abandoned_total",
            "counter",
            "Unsettled messages whose link was lost (the broker redelivers them).",
            &[("", self.abandoned_on_link_loss.get())],
        );
        metric(
            "duplicates_suppressed_total",
            "counter",
            "Redeliveries suppressed before panels.",
            &[("", self.duplicates.get())],
        );
        metric(
            "credit",
            "gauge",
            "Link credit currently granted to the source.",
            &[("", self.credit.get())],
        );
        metric(
            "unsettled",
            "gauge",
            "Messages received and not yet settled.",
            &[("", self.unsettled.get())],
        );
        metric(
            "source_reconnects_total",
            "counter",
            "Source reconnections.",
            &[("", self.source_reconnects.get())],
        );
        metric(
            "link_attaches_total",
            "counter",
            "Receiver-link attach attempts, first attaches and re-attaches.",
            &[("", self.link_attaches.get())],
        );
        metric(
            "token_refreshes_total",
            "counter",
            "CBS token renewals.",
            &[("", self.token_refreshes.get())],
        );
        metric(
            "lock_renewals_total",
            "counter",
            "Peek-lock renewals (com.microsoft:renew-lock) that extended a held message's lock.",
            &[("", self.lock_renewals.get())],
        );
        metric(
            "lock_renewal_failures_total",
            "counter",
            "Peek-lock renewals that failed (lock lost, link gone, timeout).",
            &[("", self.lock_renewal_failures.get())],
        );
        metric(
            "locks_lost_total",
            "counter",
            "Held messages whose lock was lost; the broker's redelivery is settled instead.",
            &[("", self.locks_lost.get())],
        );
        metric(
            "source_up",
            "gauge",
            "1 when the source is connected.",
            &[("", u64::from(self.source_state.get() == PartState::Up))],
        );
        metric(
            "journal_events",
            "gauge",
            "Events held in the journal.",
            &[("", self.journal_events.get())],
        );
        metric(
            "journal_bytes",
            "gauge",
            "Bytes of encoded events held in the journal.",
            &[("", self.journal_bytes.get())],
        );
        metric(
            "journal_capacity_events",
            "gauge",
            "Journal capacity in events.",
            &[("", self.journal_capacity_events.get())],
        );
        metric(
            "journal_capacity_bytes",
            "gauge",
            "Journal capacity in bytes.",
            &[("", self.journal_capacity_bytes.get())],
        );
        metric(
            "panels_connected",
            "gauge",
            "Panels connected.",
            &[("", self.panels_connected.get())],
        );
        let rj: Vec<(String, u64)> = RejectReason::ALL
            .iter()
            .map(|r| {
                (
                    format!("{{reason=\"{}\"}}", r.as_str()),
                    self.rejected(*r).get(),
                )
            })
            .collect();
        let rj: Vec<(&str, u64)> = rj.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "panels_rejected_total",
            "counter",
            "Panel upgrades refused, by reason.",
            &rj,
        );
        metric(
            "frames_sent_total",
            "counter",
            "Frames written to panels.",
            &[("", self.frames_sent.get())],
        );
        metric(
            "gaps_total",
            "counter",
            "Gap frames sent to panels.",
            &[("", self.gaps.get())],
        );
        metric(
            "events_skipped_total",
            "counter",
            "Events panels missed because they fell behind.",
            &[("", self.events_skipped.get())],
        );
        metric(
            "panels_disconnected_slow_total",
            "counter",
            "Panels closed by slow_policy = disconnect.",
            &[("", self.panels_disconnected_slow.get())],
        );
        metric(
            "mqtt_published_total",
            "counter",
            "Events published to MQTT.",
            &[("", self.mqtt_published.get())],
        );
        metric(
            "mqtt_acked_total",
            "counter",
            "MQTT publishes acknowledged by the broker.",
            &[("", self.mqtt_acked.get())],
        );
        metric(
            "mqtt_inflight",
            "gauge",
            "MQTT publishes awaiting acknowledgement.",
            &[("", self.mqtt_inflight.get())],
        );
        metric(
            "mqtt_reconnects_total",
            "counter",
            "MQTT reconnections.",
            &[("", self.mqtt_reconnects.get())],
        );
        metric(
            "mqtt_republished_total",
            "counter",
            "Unacknowledged MQTT publishes re-sent after a reconnect.",
            &[("", self.mqtt_republished.get())],
        );
        metric(
            "mqtt_skipped_total",
            "counter",
            "Events a best-effort mirror missed because the journal moved on.",
            &[("", self.mqtt_skipped.get())],
        );
        let rj: Vec<(String, u64)> = MirrorRejectReason::ALL
            .iter()
            .map(|r| {
                (
                    format!("{{reason=\"{}\"}}", r.as_str()),
                    self.mqtt_rejected(*r).get(),
                )
            })
            .collect();
        let rj: Vec<(&str, u64)> = rj.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "mqtt_rejected_total",
            "counter",
            "Events the MQTT broker can never take (dead-lettered when the mirror is required), by reason.",
            &rj,
        );
        metric(
            "mirror_up",
            "gauge",
            "1 when the MQTT mirror is connected.",
            &[("", u64::from(self.mirror_state.get() == PartState::Up))],
        );
        metric(
            "budget_bytes",
            "gauge",
            "Worst-case memory of this config.",
            &[("", self.budget_bytes.get())],
        );
        metric(
            "budget_limit_bytes",
            "gauge",
            "budget.memory_mib in bytes.",
            &[("", self.budget_limit_bytes.get())],
        );
        // Read where it is rendered: the runtime serving /metrics is the daemon's.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            metric(
                "tasks_alive",
                "gauge",
                "Tokio tasks alive in the runtime (a leak shows as steady growth).",
                &[("", rt.metrics().num_alive_tasks() as u64)],
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
        m.dead_lettered(DeadLetterReason::PayloadTooLarge).inc();
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
