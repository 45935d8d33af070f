//! The journal: a fixed-capacity ring of encoded events, each with a gateway sequence
//! number `seq` (strictly increasing from 1) within an `epoch`.
//!
//! - Capacity is fixed at construction: at most `events` entries and `memory_mib` of
//!   encoded frames. The slot array is allocated once and never grows.
//! - Events not yet handed on (the MQTT mirror has not acknowledged them) are *pinned*:
//!   they cannot be overwritten. An append that would have to evict a pinned event fails
//!   with [`JournalError::Full`]; the source avoids that by asking [`Journal::room`].
//! - Readers (panels, the mirror) keep their own cursor (the next `seq` they want) and
//!   read batches of shared `Arc`s: the cost of an event does not grow with readers.
//! - A reader whose cursor fell behind the oldest retained event learns exactly which
//!   range it missed ([`Gap`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::event::EncodedEvent;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    #[error("journal full: the oldest event is not yet handed on")]
    Full,
    #[error("event seq {got} out of order (expected {expected})")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("event of {size} bytes exceeds the journal's limit of {limit} bytes per entry")]
    TooLarge { size: usize, limit: usize },
}

/// The range a reader missed: `from..=to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
}

impl Gap {
    pub fn missed(&self) -> u64 {
        self.to - self.from + 1
    }
}

/// Fixed limits of a journal.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most events retained.
    pub events: usize,
    /// Most bytes of encoded frames retained.
    pub bytes: usize,
    /// Largest single entry ([`crate::event::max_entry_bytes`]).
    pub max_entry_bytes: usize,
}

struct Slot {
    ev: Arc<EncodedEvent>,
    pinned: bool,
}

struct Ring {
    slots: VecDeque<Slot>,
    bytes: usize,
    next_seq: u64,
    pinned: usize,
}

pub struct Journal {
    ring: Mutex<Ring>,
    latest: watch::Sender<u64>,
    epoch: String,
    limits: Limits,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("epoch", &self.epoch)
            .field("limits", &self.limits)
            .field("oldest", &self.oldest())
            .field("latest", &self.latest())
            .finish()
    }
}

/// A fresh epoch identifier: 12 hex digits, different on every start.
pub fn new_epoch() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("{:012x}", (now ^ fastrand::u64(..)) & 0xffff_ffff_ffff)
}

impl Journal {
    pub fn new(limits: Limits, epoch: String) -> Arc<Self> {
        let (latest, _) = watch::channel(0);
        Arc::new(Journal {
            ring: Mutex::new(Ring {
                slots: VecDeque::with_capacity(limits.events),
                bytes: 0,
                next_seq: 1,
                pinned: 0,
            }),
            latest,
            epoch,
            limits,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding the lock cannot leave the ring inconsistent (every
        // mutation is completed before anything that could panic), so recover the guard.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The `seq` the next append must carry.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Seq of the oldest retained event (`latest + 1` when empty).
    pub fn oldest(&self) -> u64 {
        let r = self.lock();
        r.slots.front().map(|s| s.ev.seq).unwrap_or(r.next_seq)
    }

    /// Seq of the newest event (0 before the first).
    pub fn latest(&self) -> u64 {
        self.lock().next_seq - 1
    }

    /// Number of events retained.
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of encoded frames retained.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Events not yet handed on.
    pub fn pinned(&self) -> usize {
        self.lock().pinned
    }

    /// How many appends of worst-case size are certain to succeed now.
    pub fn room(&self) -> usize {
        let r = self.lock();
        let mut free_slots = self.limits.events - r.slots.len();
        let mut free_bytes = self.limits.bytes.saturating_sub(r.bytes);
        for s in r.slots.iter().take_while(|s| !s.pinned) {
            free_slots += 1;
            free_bytes += s.ev.heap_bytes();
        }
        free_slots.min(free_bytes / self.limits.max_entry_bytes.max(1))
    }

    /// Watch the newest seq; readers await `changed()` instead of polling.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// Append an event. `pinned` events cannot be evicted until [`Journal::handed_on`].
    pub fn append(&self, ev: EncodedEvent, pinned: bool) -> Result<u64, JournalError> {
        let size = ev.heap_bytes();
        if size > self.limits.max_entry_bytes || size > self.limits.bytes {
            return Err(JournalError::TooLarge {
                size,
                limit: self.limits.max_entry_bytes.min(self.limits.bytes),
            });
        }
        let seq = {
            let mut r = self.lock();
            if ev.seq != r.next_seq {
                return Err(JournalError::OutOfOrder {
                    expected: r.next_seq,
                    got: ev.seq,
                });
            }
            // Check first, evict after: a failed append leaves the ring untouched.
            let mut evict = 0;
            let mut bytes = r.bytes;
            let mut len = r.slots.len();
            while len >= self.limits.events || bytes + size > self.limits.bytes {
                match r.slots.get(evict) {
                    Some(s) if !s.pinned => {
                        bytes -= s.ev.heap_bytes();
                        len -= 1;
                        evict += 1;
                    }
                    _ => return Err(JournalError::Full),
                }
            }
            r.slots.drain(..evict);
            r.bytes = bytes + size;
            r.pinned += usize::from(pinned);
            r.next_seq += 1;
            r.slots.push_back(Slot {
                ev: Arc::new(ev),
                pinned,
            });
            r.next_seq - 1
        };
        self.latest.send_replace(seq);
        Ok(seq)
    }

    /// Mark an event as handed on (the mirror has it): it may now be overwritten.
    /// Returns false when the event is unknown or was not pinned. Called by the source
    /// only — it pins at [`Journal::append`] and unpins on the mirror's [`Handoff`].
    pub fn handed_on(&self, seq: u64) -> bool {
        let mut r = self.lock();
        let Some(front) = r.slots.front().map(|s| s.ev.seq) else {
            return false;
        };
        let Some(idx) = seq.checked_sub(front) else {
            return false;
        };
        match r.slots.get_mut(idx as usize) {
            Some(s) if s.pinned => {
                s.pinned = false;
                r.pinned -= 1;
                true
            }
            _ => false,
        }
    }

    /// Is this event still pinned (not yet handed on)?
    pub fn is_pinned(&self, seq: u64) -> bool {
        let r = self.lock();
        let Some(front) = r.slots.front().map(|s| s.ev.seq) else {
            return false;
        };
        seq.checked_sub(front)
            .and_then(|i| r.slots.get(i as usize))
            .is_some_and(|s| s.pinned)
    }

    /// Read up to `max` events from `*cursor` (the next seq wanted) into `out`, advancing
    /// the cursor. When the cursor is older than the oldest retained event, it is moved
    /// to the oldest and the missed range is returned; the events from there are read in
    /// the same call. A cursor past the newest event waits for it.
    pub fn read(
        &self,
        cursor: &mut u64,
        out: &mut Vec<Arc<EncodedEvent>>,
        max: usize,
    ) -> Option<Gap> {
        let r = self.lock();
        let oldest = r.slots.front().map(|s| s.ev.seq).unwrap_or(r.next_seq);
        let gap = if *cursor < oldest {
            let gap = Gap {
                from: *cursor,
                to: oldest - 1,
            };
            *cursor = oldest;
            Some(gap)
        } else {
            None
        };
        if *cursor < r.next_seq {
            let start = (*cursor - oldest) as usize;
            for s in r.slots.range(start..).take(max) {
                out.push(s.ev.clone());
                *cursor += 1;
            }
        }
        gap
    }

    /// The event with this seq, if retained.
    pub fn get(&self, seq: u64) -> Option<Arc<EncodedEvent>> {
        let r = self.lock();
        let front = r.slots.front()?.ev.seq;
        r.slots
            .get(seq.checked_sub(front)? as usize)
            .map(|s| s.ev.clone())
    }
}

/// What became of a pinned event downstream: the mirror's word to the source, which
/// settles the ASB message accordingly (DESIGN §2 "Settlement").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handoff {
    /// The broker acknowledged event `seq` (PUBACK/PUBCOMP, or written for QoS 0):
    /// complete the message.
    Delivered(u64),
    /// The broker can never take event `seq` (a poison event for the mirror):
    /// dead-letter the message with reason `MirrorRejected` and this description.
    Rejected { seq: u64, description: String },
}

impl Handoff {
    /// The journal seq the word is about.
    pub fn seq(&self) -> u64 {
        match self {
            Handoff::Delivered(seq) | Handoff::Rejected { seq, .. } => *seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventMeta, Topic, max_entry_bytes};

    fn ev(seq: u64, body: &[u8]) -> EncodedEvent {
        EncodedEvent::encode(
            seq,
            &Topic::try_from("t").unwrap(),
            &EventMeta::default(),
            body,
        )
    }

    fn journal(events: usize) -> Arc<Journal> {
        Journal::new(
            Limits {
                events,
                bytes: 1 << 20,
                max_entry_bytes: max_entry_bytes(64),
            },
            "e".into(),
        )
    }

    fn seqs(v: &[Arc<EncodedEvent>]) -> Vec<u64> {
        v.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn append_read_wraps_and_reports_gaps() {
        let j = journal(4);
        assert_eq!((j.oldest(), j.latest()), (1, 0));
        for s in 1..=10 {
            assert_eq!(j.append(ev(s, b"x"), false), Ok(s));
        }
        assert_eq!((j.oldest(), j.latest(), j.len()), (7, 10, 4));
        let mut out = Vec::new();
        let mut cur = 3;
        let gap = j.read(&mut cur, &mut out, 2);
        assert_eq!(gap, Some(Gap { from: 3, to: 6 }));
        assert_eq!(gap.unwrap().missed(), 4);
        assert_eq!(seqs(&out), vec![7, 8]);
        assert_eq!(cur, 9);
        out.clear();
        assert_eq!(j.read(&mut cur, &mut out, 10), None);
        assert_eq!(seqs(&out), vec![9, 10]);
        out.clear();
        assert_eq!(j.read(&mut cur, &mut out, 10), None);
        assert!(out.is_empty());
        assert_eq!(cur, 11);
    }

    #[test]
    fn pinned_events_block_overwrite() {
        let j = journal(3);
        j.append(ev(1, b"a"), true).unwrap();
        j.append(ev(2, b"b"), false).unwrap();
        j.append(ev(3, b"c"), true).unwrap();
        assert_eq!(j.pinned(), 2);
        assert_eq!(j.room(), 0);
        assert_eq!(j.append(ev(4, b"d"), false), Err(JournalError::Full));
        // failed append changed nothing
        assert_eq!((j.oldest(), j.latest(), j.len()), (1, 3, 3));
        assert!(j.handed_on(1));
        assert!(!j.handed_on(1));
        assert_eq!(j.room(), 2);
        j.append(ev(4, b"d"), false).unwrap();
        j.append(ev(5, b"e"), false).unwrap();
        assert_eq!(j.append(ev(6, b"f"), false), Err(JournalError::Full));
        assert!(j.is_pinned(3));
        assert!(j.handed_on(3));
        j.append(ev(6, b"f"), false).unwrap();
        assert_eq!((j.oldest(), j.latest(), j.pinned()), (4, 6, 0));
    }

    #[test]
    fn byte_cap_evicts_by_size() {
        let one = ev(1, &[7u8; 64]).heap_bytes();
        let j = Journal::new(
            Limits {
                events: 100,
                bytes: one * 3,
                max_entry_bytes: max_entry_bytes(64),
            },
            "e".into(),
        );
        for s in 1..=5 {
            j.append(ev(s, &[7u8; 64]), false).unwrap();
        }
        assert_eq!(j.len(), 3);
        assert!(j.bytes() <= one * 3);
    }

    #[test]
    fn rejects_out_of_order_and_oversize() {
        let j = journal(4);
        assert_eq!(
            j.append(ev(2, b"x"), false),
            Err(JournalError::OutOfOrder {
                expected: 1,
                got: 2
            })
        );
        assert!(matches!(
            j.append(ev(1, &[0u8; 20_000]), false),
            Err(JournalError::TooLarge { .. })
        ));
    }

    #[test]
    fn readers_at_different_speeds_share_events() {
        let j = journal(8);
        let (mut fast, mut slow) = (1u64, 1u64);
        let mut got_fast = Vec::new();
        let mut got_slow = Vec::new();
        let mut gaps = 0;
        for s in 1..=40 {
            j.append(ev(s, b"x"), false).unwrap();
            let mut out = Vec::new();
            j.read(&mut fast, &mut out, 100);
            got_fast.extend(seqs(&out));
            if s % 10 == 0 {
                let mut out = Vec::new();
                if let Some(g) = j.read(&mut slow, &mut out, 3) {
                    gaps += g.missed();
                }
                got_slow.extend(seqs(&out));
            }
        }
        assert_eq!(got_fast, (1..=40).collect::<Vec<_>>());
        assert_eq!(got_slow.len() as u64 + gaps, slow - 1);
        assert!(got_slow.windows(2).all(|w| w[0] < w[1]));
        // the same allocation is shared with every reader
        let (mut a, mut b) = (40, 40);
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        j.read(&mut a, &mut oa, 1);
        j.read(&mut b, &mut ob, 1);
        assert!(Arc::ptr_eq(&oa[0], &ob[0]));
    }

    #[test]
    fn capacity_is_fixed_after_construction() {
        let j = journal(16);
        let cap = j.lock().slots.capacity();
        for s in 1..=1000 {
            j.append(ev(s, b"x"), false).unwrap();
        }
        assert_eq!(j.lock().slots.capacity(), cap);
        assert_eq!(j.len(), 16);
    }

    #[tokio::test]
    async fn subscribers_are_woken_on_append() {
        let j = journal(4);
        let mut rx = j.subscribe();
        let j2 = j.clone();
        tokio::spawn(async move { j2.append(ev(1, b"x"), false).unwrap() });
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), 1);
    }
}
