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

#[cfg(test)]
mod tests {
    use super::*;

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
