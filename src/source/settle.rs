//! Settlement (DESIGN §2): a message is completed (`accepted`, AMQP 1.0 §3.4.2) once it
//! is safely handed on, dead-lettered (`rejected` with ASB's
//! `com.microsoft:dead-letter` condition, §3.4.3) when it can never be, and `released`
//! (§3.4.4) on graceful shutdown so the broker redelivers it at once. The mirror's word
//! on a pinned event arrives here ([`Source::on_handoff`]); a rejection that could not be
//! applied (lock or link lost) is remembered in a bounded ring so the broker's
//! redelivery is dead-lettered instead of completed.
//!
//! Completions are batched ([`Accepts`]): a message to accept is queued and the queue is
//! flushed when the source has nothing else ready (or the queue is full), as one
//! `accept_all`, which fe2o3 sends as one disposition per run of consecutive delivery
//! ids (`first..last`, §2.7.6). Dead-letters and releases go out at once.

use std::collections::VecDeque;

use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp_types::definitions::{self, ErrorCondition, Fields};
use fe2o3_amqp_types::primitives::{Symbol, Value};

use super::Source;
use super::decode::Rejection;
use crate::journal::Handoff;
use crate::metrics::DeadLetterReason;

/// The condition ASB reads as "dead-letter this message".
pub const DEAD_LETTER_CONDITION: &str = "com.microsoft:dead-letter";

/// Events the mirror rejected whose delivery could not be dead-lettered then (lock lost,
/// link or connection gone), by journal seq, with the rejection's description. Bounded:
/// the oldest is forgotten when full.
pub(super) struct Rejected {
    ring: VecDeque<(u64, String)>,
    cap: usize,
}

impl Rejected {
    /// Room for `cap` rejections (at least one).
    pub(super) fn new(cap: usize) -> Self {
        Rejected {
            ring: VecDeque::with_capacity(cap),
            cap: cap.max(1),
        }
    }

    /// Remember `h` if it is a rejection; a delivery needs nothing more.
    pub(super) fn remember(&mut self, h: Handoff) {
        if let Handoff::Rejected { seq, description } = h {
            if self.ring.len() == self.cap {
                self.ring.pop_front();
            }
            self.ring.push_back((seq, description));
        }
    }

    /// The description of event `seq`'s rejection, forgotten as it is taken.
    pub(super) fn take(&mut self, seq: u64) -> Option<String> {
        let at = self.ring.iter().position(|(s, _)| *s == seq)?;
        Some(self.ring.remove(at).unwrap_or_default().1)
    }
}

/// Most completions queued before they are flushed even while deliveries keep coming.
pub(super) const ACCEPT_BATCH: usize = 64;

/// Deliveries to complete, in arrival order, with their link and its generation then.
/// Preallocated to [`ACCEPT_BATCH`]: queueing never allocates.
pub(super) struct Accepts {
    queued: Vec<(usize, u64, DeliveryInfo)>,
    /// One link's share of a flush (reused).
    scratch: Vec<DeliveryInfo>,
}

impl Accepts {
    pub(super) fn new() -> Self {
        Accepts {
            queued: Vec::with_capacity(ACCEPT_BATCH),
            scratch: Vec::with_capacity(ACCEPT_BATCH),
        }
    }

    /// Deliveries queued and not yet settled (they still count as unsettled).
    pub(super) fn len(&self) -> usize {
        self.queued.len()
    }

    pub(super) fn is_full(&self) -> bool {
        self.queued.len() >= ACCEPT_BATCH
    }

    /// Forget what is queued (the connection is gone: the broker redelivers).
    pub(super) fn clear(&mut self) {
        self.queued.clear();
    }
}

impl Source {
    /// The mirror's word on a pinned event: complete its message, or dead-letter it
    /// when the broker can never take it.
    pub(super) async fn on_handoff(&mut self, h: Handoff) {
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
            self.rejected.remember(h);
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

    /// Complete the delivery (`accepted`) on link `i`: queued, sent with the next
    /// [`Source::flush_accepts`] (at once when the queue is full).
    pub(super) async fn accept(&mut self, i: usize, info: DeliveryInfo) {
        let generation = self.links[i].generation;
        self.accepts.queued.push((i, generation, info));
        if self.accepts.is_full() {
            self.flush_accepts().await;
        }
    }

    /// Send the queued completions, one `accept_all` per link (deliveries of a link that
    /// was lost since are void and dropped). Failures are logged at debug: the broker
    /// redelivers.
    pub(super) async fn flush_accepts(&mut self) {
        let mut queued = std::mem::take(&mut self.accepts.queued);
        let mut batch = std::mem::take(&mut self.accepts.scratch);
        for i in 0..self.links.len() {
            batch.clear();
            let generation = self.links[i].generation;
            batch.extend(
                queued
                    .iter()
                    .filter(|(l, g, _)| *l == i && *g == generation)
                    .map(|(_, _, d)| d.clone()),
            );
            if batch.is_empty() {
                continue;
            }
            let Some(r) = self.links[i].receiver.as_ref() else {
                continue;
            };
            let n = batch.len() as u64;
            match r.accept_all(batch.drain(..)).await {
                Ok(()) => self.metrics.completed.add(n),
                Err(e) => log::debug!("source: accept on {} failed: {e}", self.links[i].address),
            }
        }
        queued.clear();
        self.accepts.queued = queued;
        self.accepts.scratch = batch;
    }

    /// Give the delivery back (`released`): the broker redelivers it at once.
    pub(super) async fn release(&mut self, i: usize, info: DeliveryInfo) {
        let Some(r) = self.links[i].receiver.as_ref() else {
            return;
        };
        match r.release(info).await {
            Ok(()) => self.metrics.released.inc(),
            Err(e) => log::debug!("source: release on {} failed: {e}", self.links[i].address),
        }
    }

    /// Dead-letter the delivery (`rejected` with [`dead_letter_error`]), logged as a warning.
    pub(super) async fn dead_letter(&mut self, i: usize, info: DeliveryInfo, rej: Rejection) {
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
            Ok(()) => self.metrics.dead_lettered.of(rej.reason).inc(),
            Err(e) => log::debug!("source: reject on {} failed: {e}", self.links[i].address),
        }
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
