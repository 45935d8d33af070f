//! One backoff for every retry loop: source connect, link attach, mirror connect.
//!
//! Delays grow exponentially with full-half jitter: each delay is drawn from `[d/2, d]`,
//! `d` doubling from `min` to `max`. The step is reset only after the connection or link
//! has stayed up for `healthy_after`: a peer that accepts and drops us at once (an
//! attach answered by a detach, a broker that takes our session over) backs off like one
//! that refuses us, instead of turning the loop hot.

use std::time::Duration;

use tokio::time::Instant;

/// Exponential backoff with jitter, reset by sustained health (see the module docs).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    healthy_after: Duration,
    cur: Duration,
    /// When the guarded thing last came up, while it is up.
    up_since: Option<Instant>,
}

impl Backoff {
    /// `min`: first delay; `max`: longest; `healthy_after`: how long an up state must
    /// last before the next failure starts again from `min`.
    pub fn new(min: Duration, max: Duration, healthy_after: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            healthy_after,
            cur: min,
            up_since: None,
        }
    }

    /// The connection or link is up (attached, CONNACK received).
    pub fn up(&mut self) {
        self.up_since = Some(Instant::now());
    }

    /// It went down (or failed to come up): the delay to wait before the next attempt.
    /// When it had been up for at least `healthy_after`, the step starts again from
    /// `min`.
    pub fn down(&mut self) -> Duration {
        if let Some(since) = self.up_since.take()
            && since.elapsed() >= self.healthy_after
        {
            self.cur = self.min;
        }
        let d = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Pacing for an accept loop whose `accept` fails (out of file descriptors, `EMFILE`,
/// and the like, which recur until connections close): delays from 10 ms doubling to
/// 1 s with jitter, started again once an accept works; logged at WARN once per kind
/// of error until then, at DEBUG after.
pub struct AcceptErrors {
    what: &'static str,
    backoff: Backoff,
    logged: Option<std::io::ErrorKind>,
}

impl AcceptErrors {
    /// For the listener named `what` in the log ("panel server").
    pub fn new(what: &'static str) -> Self {
        AcceptErrors {
            what,
            backoff: Backoff::new(
                Duration::from_millis(10),
                Duration::from_secs(1),
                Duration::ZERO,
            ),
            logged: None,
        }
    }

    /// An accept worked.
    pub fn accepted(&mut self) {
        if self.logged.take().is_some() {
            log::info!("{}: accepting connections again", self.what);
        }
        self.backoff.up();
    }

    /// An accept failed with `e`: wait out the delay, or until `stop`. True when
    /// stopped (for loops that have nothing else to do meanwhile).
    /// (Only the emulator's loops are that simple; the panel server reaps meanwhile.)
    #[cfg(feature = "emulator")]
    pub async fn pause(
        &mut self,
        e: &std::io::Error,
        stop: &mut crate::shutdown::Shutdown,
    ) -> bool {
        let delay = self.failed(e);
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = stop.recv() => true,
        }
    }

    /// An accept failed with `e`: how long to stop accepting.
    pub fn failed(&mut self, e: &std::io::Error) -> Duration {
        let delay = self.backoff.down();
        if self.logged != Some(e.kind()) {
            log::warn!(
                "{}: accept failed: {e}; pausing accepts, backing off",
                self.what
            );
            self.logged = Some(e.kind());
        } else {
            log::debug!("{}: accept failed again: {e}", self.what);
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_back_off_and_start_again_after_an_accept() {
        let emfile = std::io::Error::from_raw_os_error(24);
        let mut a = AcceptErrors::new("test");
        let delays: Vec<Duration> = (0..10).map(|_| a.failed(&emfile)).collect();
        assert!(delays[0] >= Duration::from_millis(5) && delays[0] <= Duration::from_millis(10));
        assert!(delays[9] >= Duration::from_millis(500) && delays[9] <= Duration::from_secs(1));
        a.accepted();
        assert!(a.failed(&emfile) <= Duration::from_millis(10));
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_with_jitter_up_to_max() {
        let mut b = Backoff::new(100 * MS, 1000 * MS, 30 * 1000 * MS);
        let d: Vec<Duration> = (0..6).map(|_| b.down()).collect();
        assert!(d[0] >= 50 * MS && d[0] <= 100 * MS);
        assert!(d[1] >= 100 * MS && d[1] <= 200 * MS);
        assert!(d[5] >= 500 * MS && d[5] <= 1000 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_up_does_not_reset_the_step() {
        let mut b = Backoff::new(100 * MS, 10_000 * MS, 1000 * MS);
        b.down();
        b.down();
        // up and down again at once: still growing (200..400 ms step now 400)
        b.up();
        tokio::time::advance(10 * MS).await;
        let d = b.down();
        assert!(d >= 200 * MS, "{d:?}");
        // up for longer than healthy_after: back to the first step
        b.up();
        tokio::time::advance(1500 * MS).await;
        let d = b.down();
        assert!(d <= 100 * MS, "{d:?}");
    }
}
