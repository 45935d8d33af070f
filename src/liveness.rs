//! Heartbeats of the data path: each loop of the source, the journal fan-out and the
//! mirror calls [`Liveness::beat`] on every turn (including an idle timer tick), and the
//! systemd watchdog (`appliance::notify::watchdog`) feeds systemd only while every
//! registered part beat within the watchdog interval.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often an idle data-path loop beats at most; shorter when `WATCHDOG_USEC` asks
/// for a shorter watchdog (see [`Liveness::beat_interval`]).
pub const BEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A part of the data path that must keep beating for the watchdog to be fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Part {
    /// The source's receive loop.
    Source = 0,
    /// The journal fan-out to panels.
    Journal = 1,
    /// The MQTT mirror.
    Mirror = 2,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::Source, Part::Journal, Part::Mirror];
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Source => "source",
            Part::Journal => "journal",
            Part::Mirror => "mirror",
        }
    }
}

const NEVER: u64 = u64::MAX;

/// The systemd watchdog interval (`WATCHDOG_USEC`, for this process), or None when the
/// watchdog is off. `WATCHDOG_USEC=0` means off, as `WatchdogSec=0` does: a zero period
/// would panic the timers built on it.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Heartbeats of the data path: the last beat of each part, in milliseconds since this
/// `Liveness` was made. A part is checked once it has beaten (or been registered).
#[derive(Debug)]
pub struct Liveness {
    start: Instant,
    last: [AtomicU64; Part::ALL.len()],
    wedged: AtomicBool,
    beat_every: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            start: Instant::now(),
            last: [
                AtomicU64::new(NEVER),
                AtomicU64::new(NEVER),
                AtomicU64::new(NEVER),
            ],
            wedged: AtomicBool::new(false),
            // A quarter of the watchdog interval, so an idle loop beats several times
            // between two checks.
            beat_every: watchdog_interval()
                .map(|w| (w / 4).clamp(Duration::from_millis(10), BEAT_INTERVAL))
                .unwrap_or(BEAT_INTERVAL),
        }
    }
}

impl Liveness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// How often an idle data-path loop should beat.
    pub fn beat_interval(&self) -> Duration {
        self.beat_every
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Declare that `part` runs and must keep beating (same as a first beat).
    pub fn register(&self, part: Part) {
        self.beat(part)
    }

    /// Record that `part` made progress now. Cheap: one atomic store.
    pub fn beat(&self, part: Part) {
        if !self.wedged.load(Ordering::Relaxed) {
            self.last[part as usize].store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Await `step`, beating as `part` meanwhile. For the network steps a loop awaits in
    /// place — connecting, attaching links, renewing locks and tokens — each bounded by
    /// its own timeout but together longer than a watchdog interval (five links whose
    /// attach hangs for the 10 s step limit are 50 s): waiting on a peer is not being
    /// wedged. The step itself must be bounded; this does not make it so.
    pub async fn beating<F: std::future::Future>(&self, part: Part, step: F) -> F::Output {
        let mut beat = tokio::time::interval(self.beat_every);
        let mut step = std::pin::pin!(step);
        loop {
            tokio::select! {
                biased;
                out = &mut step => return out,
                _ = beat.tick() => self.beat(part),
            }
        }
    }

    /// Test hook: ignore every beat from now on, as if the whole data path hung.
    pub fn wedge(&self) {
        self.wedged.store(true, Ordering::Relaxed);
    }

    pub fn is_wedged(&self) -> bool {
        self.wedged.load(Ordering::Relaxed)
    }

    /// The first registered part whose last beat is older than `within`, with its age.
    pub fn stalled(&self, within: Duration) -> Option<(Part, Duration)> {
        let now = self.now_ms();
        let limit = within.as_millis() as u64;
        Part::ALL.into_iter().find_map(|p| {
            let last = self.last[p as usize].load(Ordering::Relaxed);
            let age = now.saturating_sub(last);
            (last != NEVER && age > limit).then(|| (p, Duration::from_millis(age)))
        })
    }

    /// Has every registered part beaten within `within`?
    pub fn alive(&self, within: Duration) -> bool {
        self.stalled(within).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time: beats are stamped with `std::time::Instant`.
    #[tokio::test]
    async fn a_long_step_keeps_beating() {
        let l = Liveness {
            beat_every: Duration::from_millis(20),
            ..Liveness::default()
        };
        l.register(Part::Source);
        // A step of 45 beat intervals (900 ms): the part never looks stalled for 500 ms
        // (margin for a loaded machine); without the beats it would after ~17 turns.
        let step = async {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_millis(30)).await;
                assert!(
                    l.alive(Duration::from_millis(500)),
                    "{:?}",
                    l.stalled(Duration::ZERO)
                );
            }
            7
        };
        assert_eq!(l.beating(Part::Source, step).await, 7);
        // Without it, a wait of the same length is a stall.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(!l.alive(Duration::from_millis(500)));
    }

    #[test]
    fn liveness_tracks_registered_parts_only() {
        let l = Liveness::default();
        // Nothing registered: alive.
        assert!(l.alive(Duration::from_millis(1)));
        l.beat(Part::Source);
        assert!(l.alive(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            l.stalled(Duration::from_millis(10)).unwrap().0,
            Part::Source
        );
        l.beat(Part::Source);
        assert!(l.alive(Duration::from_millis(10)));
        l.wedge();
        std::thread::sleep(Duration::from_millis(30));
        l.beat(Part::Source);
        assert!(
            !l.alive(Duration::from_millis(10)),
            "a wedged liveness ignores beats"
        );
    }
}
