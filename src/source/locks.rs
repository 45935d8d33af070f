//! Keeping peek-locks alive while an event waits for the mirror (ASB: a lock lasts the
//! entity's LockDuration, 5 s to 5 min): each held delivery's lock is renewed at half its
//! span with `com.microsoft:renew-lock` on the entity's `$management` node ([`super::renew`]),
//! batched per link. A lock the broker says is lost is marked so: its delivery is not
//! settled as if it counted, and the broker's redelivery takes its place.

use std::time::Duration;

use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp_types::primitives::Value;
use tokio::time::{Instant, timeout};

use super::Source;
use super::decode::AmqpMessage;
use super::renew::{LockRenewer, RenewError};

/// Shortest and longest lock span believed: ASB's LockDuration is 5 s to 5 min; a box
/// whose clock is off by more than a lock would otherwise compute 0 (renewing in a hot
/// loop) or a span past the real expiry.
const LOCK_SPAN_MIN: Duration = Duration::from_secs(1);
const LOCK_SPAN_MAX: Duration = Duration::from_secs(300);

/// Time left on a lock expiring at `until` (wall clock), clamped to what ASB allows.
pub(super) fn lock_span(until: std::time::SystemTime) -> Duration {
    until
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default()
        .clamp(LOCK_SPAN_MIN, LOCK_SPAN_MAX)
}

/// The `x-opt-locked-until` annotation (ASB: when the peek-lock expires).
pub(super) fn locked_until(msg: &AmqpMessage) -> Option<std::time::SystemTime> {
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

/// The first delay before a failed renewal is tried again is an eighth of the lock's
/// span, at least this; it doubles with each failure in a row, with jitter.
const RENEW_RETRY_MIN: Duration = Duration::from_millis(100);

/// The next retry delay after `last` (zero: the first failure) for a lock of `span`:
/// doubled, drawn from `[d/2, d]` like [`crate::backoff::Backoff`], and at least
/// [`RENEW_RETRY_MIN`].
fn renew_retry(last: Duration, span: Duration) -> Duration {
    let d = if last.is_zero() {
        (span / 8).max(RENEW_RETRY_MIN)
    } else {
        (last * 2).min(LOCK_SPAN_MAX)
    };
    (d / 2 + (d / 2).mul_f64(fastrand::f64())).max(RENEW_RETRY_MIN)
}

impl Source {
    /// Renew the locks that are due, one batched `com.microsoft:renew-lock` request per
    /// link, and schedule the next renewal. A lock the broker says is lost is marked so:
    /// the delivery is not settled as if it counted, and the broker's redelivery takes
    /// its place. Failures are logged once per change of their reason.
    pub(super) async fn renew_locks(&mut self, session: &mut SessionHandle<()>) {
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
                match LockRenewer::attach_with(session, &address, None, step).await {
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
                l.expires = now + span;
                l.retry = Duration::ZERO;
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
                if lost || now >= l.expires {
                    // Lost, or run out while renewals failed: either way the broker
                    // redelivers the message.
                    l.lost = true;
                    self.metrics.locks_lost.inc();
                } else {
                    l.retry = renew_retry(l.retry, l.span);
                    // Within what is left of the lock: one last try just before it ends.
                    let left = l.expires - now;
                    l.due = now
                        + l.retry
                            .min(left.saturating_sub(left / 8))
                            .max(RENEW_RETRY_MIN);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_renewals_back_off() {
        let span = Duration::from_secs(60);
        let mut d = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..12 {
            d = renew_retry(d, span);
            seen.push(d);
        }
        // First: within [span/16, span/8]; then never shorter while under the cap (each
        // is drawn from [d, 2d] of the one before; the first six stay under 240 s),
        // growing (the chance that 11 draws stay under 2x is below 1e-9), and never
        // past the longest lock.
        assert!(seen[0] >= span / 16 && seen[0] <= span / 8, "{seen:?}");
        assert!(seen[..6].windows(2).all(|w| w[1] >= w[0]), "{seen:?}");
        assert!(seen[11] > seen[0] * 2, "{seen:?}");
        assert!(seen.iter().all(|d| *d <= LOCK_SPAN_MAX), "{seen:?}");
        // A short lock still waits at least the floor.
        assert!(renew_retry(Duration::ZERO, LOCK_SPAN_MIN) >= RENEW_RETRY_MIN);
    }
}
