//! The `sd_notify` protocol (a no-op without `NOTIFY_SOCKET`): READY=1 once the gateway
//! serves, STATUS= lines with the state of the source and mirror, and WATCHDOG=1 pings at
//! half the `WATCHDOG_USEC` interval, sent only while the data path is alive.
//!
//! "Alive" is judged by [`Liveness`]: the loops of the data path (the source's receive
//! loop, the journal/panel fan-out, the mirror) call [`Liveness::beat`] on every turn,
//! including an idle timer tick, so a loop that is stuck — blocked on a lock, spinning in a
//! sync call, deadlocked — stops beating, the pings stop, and systemd restarts the service
//! (`WatchdogSec=` with `Restart=on-failure`).
//!
//! Wiring (in `app::run`; [`Liveness`] lives in `crate::liveness`):
//! ```text
//! tokio::spawn(notify::watchdog(ctx.liveness.clone(), trigger.listener()));
//! tokio::spawn(notify::status_reporter(metrics.clone(), trigger.listener()));
//! // once the panel listener is bound and the source task is spawned:
//! notify::ready();
//! // on shutdown, before draining:
//! notify::stopping();
//! ```
//! and in each data-path loop: `liveness.register(Part::Source)` before the loop, and
//! `liveness.beat(Part::Source)` on every turn, with a timer branch (say every 1 s)
//! in its `select!` so an idle but healthy loop still beats. Beat while reconnecting
//! too: an unreachable broker is not a wedge, and restarting would not help.
//!
//! Test hook: if the daemon's environment has `ASBGW_TEST_WEDGE_AFTER_MS=N`, the watchdog
//! task freezes every heartbeat N ms after it starts ([`Liveness::wedge`]), which is how
//! the tests show that a wedged data path stops the pings. Nothing else reads it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

use crate::liveness::Liveness;
use crate::metrics::{Metrics, PartState};
use crate::shutdown::Shutdown;

/// Environment variable of the wedge test hook (milliseconds after the watchdog starts).
pub const TEST_WEDGE_ENV: &str = "ASBGW_TEST_WEDGE_AFTER_MS";
/// How often the STATUS line is refreshed when nothing changes.
pub const STATUS_PERIOD: Duration = Duration::from_secs(5);
/// How often the status reporter looks for a state change.
const STATUS_POLL: Duration = Duration::from_millis(250);

fn send(state: &[NotifyState]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(state) {
        // Log the first failure only: a broken notify socket is not worth a line a second.
        if !WARNED.swap(true, Ordering::Relaxed) {
            log::warn!(target: "systemd", "cannot notify the service manager: {e}");
        }
    }
}

/// READY=1: the panel port listens and the source task runs.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// STATUS=… (a free-form line shown by `systemctl status`).
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// RELOADING=1 with MONOTONIC_USEC (systemd ≥ 253 requires both): a reload has begun;
/// [`ready`] ends it.
pub fn reloading() {
    send(&[
        NotifyState::Reloading,
        NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0)),
    ]);
}

/// STOPPING=1: shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The STATUS line for these metrics.
pub fn status_line(m: &Metrics) -> String {
    format!(
        "source {}, mirror {}; received {}, completed {}, dead-lettered {}; journal {} events; {} panels; mqtt acked {}",
        m.source_state.get().as_str(),
        m.mirror_state.get().as_str(),
        m.received.get(),
        m.completed.get(),
        m.dead_lettered
            .of(crate::metrics::DeadLetterReason::PayloadTooLarge)
            .get()
            + m.dead_lettered
                .of(crate::metrics::DeadLetterReason::Undecodable)
                .get(),
        m.journal_events.get(),
        m.panels_connected.get(),
        m.mqtt_acked.get(),
    )
}

/// Send a STATUS line at once, then whenever the source or mirror state changes, and every
/// [`STATUS_PERIOD`] otherwise; returns on shutdown.
pub async fn status_reporter(metrics: Arc<Metrics>, mut shutdown: Shutdown) {
    let m = &metrics;
    let states = || (m.source_state.get(), m.mirror_state.get());
    let mut last_states: Option<(PartState, PartState)> = None;
    let mut last_sent = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(STATUS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tick.tick() => {}
        }
        let now = states();
        if last_states != Some(now) || last_sent.elapsed() >= STATUS_PERIOD {
            status(&status_line(m));
            last_states = Some(now);
            last_sent = tokio::time::Instant::now();
        }
    }
}

/// Feed the systemd watchdog: WATCHDOG=1 every half `WATCHDOG_USEC` while every part of
/// the data path beats within the watchdog interval; withhold it otherwise so systemd
/// restarts the service. Returns at once when the watchdog is not enabled, or on
/// shutdown.
pub async fn watchdog(liveness: Arc<Liveness>, mut shutdown: Shutdown) {
    let Some(interval) = crate::liveness::watchdog_interval() else {
        return;
    };
    let wedge_at = std::env::var(TEST_WEDGE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    if wedge_at.is_some() {
        log::warn!(target: "systemd", "test hook {TEST_WEDGE_ENV} is set: the data path will be wedged");
    }
    // `interval` is never zero; half of 1 µs would be.
    let mut tick = tokio::time::interval((interval / 2).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withholding = false;
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tick.tick() => {}
        }
        if let Some(at) = wedge_at
            && tokio::time::Instant::now() >= at
            && !liveness.is_wedged()
        {
            liveness.wedge();
        }
        match liveness.stalled(interval) {
            None => {
                if withholding {
                    log::info!(target: "systemd", "data path alive again; watchdog pings resumed");
                    withholding = false;
                }
                send(&[NotifyState::Watchdog]);
            }
            Some((part, age)) => {
                if !withholding {
                    log::error!(
                        target: "systemd",
                        part = part.as_str();
                        "{} made no progress for {} ms; withholding watchdog pings",
                        part.as_str(),
                        age.as_millis()
                    );
                    withholding = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_names_states_and_counts() {
        let m = Metrics::default();
        m.source_state.set(PartState::Up);
        m.mirror_state.set(PartState::Disabled);
        m.received.add(7);
        let s = status_line(&m);
        assert!(
            s.starts_with("source up, mirror disabled; received 7"),
            "{s}"
        );
    }
}
