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
//! - Seqs are issued only below a reserved bound ([`Journal::set_reserved_until`]; no
//!   bound unless one is set): the snapshot's lease (`snapshot`) records it on disk
//!   before it is raised, so a restart after a crash never issues a seq twice. Seqs
//!   skipped after a crash are *lost*: reading across them reports a [`Gap`] of kind
//!   [`GapKind::Lost`].

mod last;
pub mod snapshot;

pub use last::{INDEX_BYTES_PER_TOPIC as LAST_VALUE_INDEX_BYTES, LastValueStats};

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
    #[error("event seq {seq} is not reserved yet (reserved below {reserved_until})")]
    Unreserved { seq: u64, reserved_until: u64 },
}

/// Why a reader missed a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapKind {
    /// The events were overwritten before the reader got to them.
    Overwritten,
    /// The seqs were lost in a crash between checkpoints (never to be issued again).
    Lost,
}

/// The range a reader missed: `from..=to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
    pub kind: GapKind,
}

/// Most lost ranges remembered (older ones are forgotten first; they are below the
/// oldest retained event long before that matters).
pub const LOST_MAX: usize = 16;

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
    /// Most topics in the last-value table (`panels.last_values`; 0 = no table).
    pub last_values: usize,
    /// Most bytes of events the last-value table holds that the ring no longer has
    /// (`panels.last_values_mib`).
    pub last_values_bytes: usize,
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
    /// The leading run of unpinned slots (`slots[..evictable]` are unpinned, the slot
    /// after it is pinned or absent) and their bytes: what an append may overwrite,
    /// kept up to date so [`Journal::room`] does not walk the ring.
    evictable: usize,
    evictable_bytes: usize,
    /// No seq at or above this is issued (u64::MAX: no bound).
    reserved_until: u64,
    /// Ranges of seqs lost in crashes, oldest first, at most [`LOST_MAX`].
    lost: VecDeque<Gap>,
    /// Bumped by every change a snapshot would record.
    changes: u64,
    /// Events and bytes evicted since evictions were last announced.
    unannounced: usize,
    unannounced_bytes: usize,
    /// The newest event of each topic.
    last: last::LastValues,
}

impl Ring {
    fn oldest(&self) -> u64 {
        self.slots
            .front()
            .map(|s| s.ev.seq)
            .unwrap_or(self.next_seq)
    }

    /// Index of the slot holding `seq`. Retained seqs are increasing but may skip a lost
    /// range, so this searches (from the position the seq would have without holes).
    fn index(&self, seq: u64) -> Option<usize> {
        let front = self.slots.front()?.ev.seq;
        let guess = seq.checked_sub(front)? as usize;
        if self.slots.get(guess).is_some_and(|s| s.ev.seq == seq) {
            return Some(guess);
        }
        self.slots.binary_search_by_key(&seq, |s| s.ev.seq).ok()
    }

    /// Remove the oldest slot (pinned or not).
    fn evict_front(&mut self) {
        if let Some(s) = self.slots.pop_front() {
            if !self.last.holds(s.ev.seq) {
                s.ev.mark_evicted();
            }
            self.bytes -= s.ev.heap_bytes();
            self.pinned -= usize::from(s.pinned);
            if s.pinned {
                // The run before it was empty; the next one starts here.
                self.extend_evictable();
            } else {
                self.evictable -= 1;
                self.evictable_bytes -= s.ev.heap_bytes();
            }
        }
    }

    /// Add the unpinned slots right after the evictable run to it (after an unpin or
    /// an append). Each slot joins the run at most once while it is retained.
    fn extend_evictable(&mut self) {
        while let Some(s) = self.slots.get(self.evictable).filter(|s| !s.pinned) {
            self.evictable_bytes += s.ev.heap_bytes();
            self.evictable += 1;
        }
    }

    fn push(&mut self, ev: Arc<EncodedEvent>, pinned: bool) {
        self.slots.push_back(Slot { ev, pinned });
        self.extend_evictable();
    }
}

pub struct Journal {
    ring: Mutex<Ring>,
    latest: watch::Sender<u64>,
    /// The oldest retained seq, sent each time an eighth of the ring (by events or by
    /// bytes) was evicted since the last time: a few times per turn of the ring, for
    /// readers that hold events and must learn when those are evicted without waking on
    /// every append.
    evicted: watch::Sender<u64>,
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
        let (evicted, _) = watch::channel(1);
        Arc::new(Journal {
            ring: Mutex::new(Ring {
                slots: VecDeque::with_capacity(limits.events),
                bytes: 0,
                next_seq: 1,
                pinned: 0,
                evictable: 0,
                evictable_bytes: 0,
                reserved_until: u64::MAX,
                lost: VecDeque::with_capacity(LOST_MAX),
                changes: 0,
                unannounced: 0,
                unannounced_bytes: 0,
                last: last::LastValues::new(limits.last_values, limits.last_values_bytes),
            }),
            latest,
            evicted,
            epoch,
            limits,
        })
    }

    /// Watch the oldest retained seq, announced each time an eighth of the ring's events
    /// (at least one) or of its byte limit was evicted since the last announcement (not
    /// on every eviction). The frames of evicted events are marked first
    /// ([`crate::held::Mark::evict`]).
    pub fn evictions(&self) -> watch::Receiver<u64> {
        self.evicted.subscribe()
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
        self.lock().oldest()
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
        let reserved = r.reserved_until.saturating_sub(r.next_seq);
        let reserved = usize::try_from(reserved).unwrap_or(usize::MAX);
        let free_slots = self.limits.events - r.slots.len() + r.evictable;
        let free_bytes = self.limits.bytes.saturating_sub(r.bytes) + r.evictable_bytes;
        free_slots
            .min(free_bytes / self.limits.max_entry_bytes.max(1))
            .min(reserved)
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
        let (seq, evicted) = {
            let mut r = self.lock();
            if ev.seq != r.next_seq {
                return Err(JournalError::OutOfOrder {
                    expected: r.next_seq,
                    got: ev.seq,
                });
            }
            if ev.seq >= r.reserved_until {
                return Err(JournalError::Unreserved {
                    seq: ev.seq,
                    reserved_until: r.reserved_until,
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
            let Ring { slots, last, .. } = &mut *r;
            for s in slots.drain(..evict) {
                // An event the last-value table keeps is not evicted yet (its bytes are
                // that table's): it is marked when the table drops it.
                if !last.holds(s.ev.seq) {
                    s.ev.mark_evicted();
                }
            }
            // Only evictable slots were evicted.
            r.evictable -= evict;
            let evicted_bytes = r.bytes - bytes;
            r.evictable_bytes -= evicted_bytes;
            r.bytes = bytes + size;
            r.pinned += usize::from(pinned);
            r.next_seq += 1;
            r.changes += 1;
            let ev = Arc::new(ev);
            r.push(ev.clone(), pinned);
            let oldest = r.oldest();
            r.last.record(&ev, oldest);
            // Announced when an eighth of the ring (by events or by bytes) was evicted
            // since the last announcement (from the ring or from the last values).
            let (dropped, dropped_bytes) = r.last.take_dropped();
            r.unannounced += evict + dropped;
            r.unannounced_bytes += evicted_bytes + dropped_bytes;
            let evicted = (r.unannounced > 0
                && (r.unannounced >= (r.slots.len() / 8).max(1)
                    || r.unannounced_bytes >= self.limits.bytes / 8))
                .then(|| {
                    r.unannounced = 0;
                    r.unannounced_bytes = 0;
                    oldest
                });
            (r.next_seq - 1, evicted)
        };
        self.latest.send_replace(seq);
        if let Some(oldest) = evicted {
            self.evicted.send_replace(oldest);
        }
        Ok(seq)
    }

    /// Mark an event as handed on (the mirror has it): it may now be overwritten.
    /// Returns false when the event is unknown or was not pinned. Called by the source
    /// only — it pins at [`Journal::append`] and unpins on the mirror's [`Handoff`].
    pub fn handed_on(&self, seq: u64) -> bool {
        let mut r = self.lock();
        let Some(idx) = r.index(seq) else {
            return false;
        };
        match r.slots.get_mut(idx) {
            Some(s) if s.pinned => {
                s.pinned = false;
                r.pinned -= 1;
                r.changes += 1;
                if idx == r.evictable {
                    r.extend_evictable();
                }
                true
            }
            _ => false,
        }
    }

    /// Is this event still pinned (not yet handed on)?
    pub fn is_pinned(&self, seq: u64) -> bool {
        let r = self.lock();
        r.index(seq)
            .and_then(|i| r.slots.get(i))
            .is_some_and(|s| s.pinned)
    }

    /// Read up to `max` events from `*cursor` (the next seq wanted) into `out`, advancing
    /// the cursor. When the cursor is older than the oldest retained event, or in a
    /// range lost in a crash, it is moved past that range and the missed range is
    /// returned; the events from there are read in the same call, up to the next lost
    /// range. A cursor past the newest event waits for it.
    pub fn read(
        &self,
        cursor: &mut u64,
        out: &mut Vec<Arc<EncodedEvent>>,
        max: usize,
    ) -> Option<Gap> {
        let r = self.lock();
        let oldest = r.oldest();
        let start = r.slots.partition_point(|s| s.ev.seq < *cursor);
        // The next seq that exists at or after the cursor.
        let next = r.slots.get(start).map(|s| s.ev.seq).unwrap_or(r.next_seq);
        let gap = if *cursor < next {
            let to = next - 1;
            let kind = if *cursor >= oldest || lost_covers(&r.lost, *cursor, to) {
                GapKind::Lost
            } else {
                GapKind::Overwritten
            };
            let gap = Gap {
                from: *cursor,
                to,
                kind,
            };
            *cursor = next;
            Some(gap)
        } else {
            None
        };
        for s in r.slots.range(start..).take(max) {
            if s.ev.seq != *cursor {
                break;
            }
            out.push(s.ev.clone());
            *cursor += 1;
        }
        gap
    }

    /// Were the seqs `from..=to` (all of them) lost in a crash?
    pub fn is_lost(&self, from: u64, to: u64) -> bool {
        lost_covers(&self.lock().lost, from, to)
    }

    /// The event with this seq, if retained.
    pub fn get(&self, seq: u64) -> Option<Arc<EncodedEvent>> {
        let r = self.lock();
        r.index(seq).map(|i| r.slots[i].ev.clone())
    }

    /// The bound below which seqs may be issued (`u64::MAX`: none).
    pub fn reserved_until(&self) -> u64 {
        self.lock().reserved_until
    }

    /// Allow seqs below `bound` to be issued. The caller records the bound durably first.
    pub fn set_reserved_until(&self, bound: u64) {
        self.lock().reserved_until = bound;
    }

    /// A number that changes whenever an append or a hand-on changed what a snapshot
    /// would record.
    pub fn changes(&self) -> u64 {
        self.lock().changes
    }

    /// The seq of the oldest pinned event, if any.
    pub fn first_pinned(&self) -> Option<u64> {
        let r = self.lock();
        if r.pinned == 0 {
            return None;
        }
        r.slots.iter().find(|s| s.pinned).map(|s| s.ev.seq)
    }

    /// Where a reader that must not skip (the mirror) starts: the oldest event not yet
    /// handed on, else the next event.
    pub fn first_unhanded(&self) -> u64 {
        self.first_pinned().unwrap_or_else(|| self.next_seq())
    }

    /// Restore one event from a snapshot, oldest first: seqs must increase (they may
    /// skip a lost range). Unlike [`Journal::append`] it evicts the oldest events,
    /// pinned or not, to make room: a snapshot larger than the journal keeps its newest
    /// events. An event larger than an entry may be is not restored (`TooLarge`).
    pub fn restore(&self, ev: EncodedEvent, pinned: bool) -> Result<(), JournalError> {
        let size = ev.heap_bytes();
        if size > self.limits.max_entry_bytes || size > self.limits.bytes {
            return Err(JournalError::TooLarge {
                size,
                limit: self.limits.max_entry_bytes.min(self.limits.bytes),
            });
        }
        let mut r = self.lock();
        if ev.seq < r.next_seq {
            return Err(JournalError::OutOfOrder {
                expected: r.next_seq,
                got: ev.seq,
            });
        }
        while r.slots.len() >= self.limits.events || r.bytes + size > self.limits.bytes {
            r.evict_front();
        }
        r.next_seq = ev.seq + 1;
        r.bytes += size;
        r.pinned += usize::from(pinned);
        let ev = Arc::new(ev);
        r.push(ev.clone(), pinned);
        let oldest = r.oldest();
        r.last.record(&ev, oldest);
        Ok(())
    }

    /// Restore one entry of the last-value table that the ring no longer held when the
    /// snapshot was written (before the events are restored).
    pub fn restore_last_value(&self, ev: EncodedEvent) {
        let mut r = self.lock();
        let oldest = r.oldest();
        r.last.record(&Arc::new(ev), oldest);
    }

    /// One page of the last-value table: the newest event of each topic that `wanted`
    /// accepts, with a seq in `after+1..=upto`, in seq order, at most `max` into `out`.
    /// A reader pages through the table as it was at `upto` (the `latest` it started
    /// at) without holding the events in between: a topic updated meanwhile has moved
    /// past `upto` and comes with the live stream instead.
    pub fn last_values_page(
        &self,
        after: u64,
        upto: u64,
        wanted: impl FnMut(&crate::event::Topic) -> bool,
        out: &mut Vec<Arc<EncodedEvent>>,
        max: usize,
    ) {
        self.lock().last.page(after, upto, wanted, out, max);
    }

    /// What the last-value table holds.
    pub fn last_value_stats(&self) -> LastValueStats {
        self.lock().last.stats()
    }

    /// After a restore: continue at `next_seq` (not below the current next seq), and
    /// remember `lost` ranges (those already known plus, e.g., the range a crash lost).
    pub fn resume_at(&self, next_seq: u64, lost: impl IntoIterator<Item = (u64, u64)>) {
        let latest = {
            let mut r = self.lock();
            r.next_seq = r.next_seq.max(next_seq);
            for (from, to) in lost {
                if from > to {
                    continue;
                }
                if r.lost.len() == LOST_MAX {
                    r.lost.pop_front();
                }
                r.lost.push_back(Gap {
                    from,
                    to,
                    kind: GapKind::Lost,
                });
            }
            let oldest = r.oldest();
            r.last.advance(oldest);
            r.changes += 1;
            r.next_seq - 1
        };
        self.latest.send_replace(latest);
    }

    /// What a snapshot records, taken under the lock without copying events: the
    /// last-value entries the ring no longer holds into `last`, the retained events
    /// (shared `Arc`s, with their pinned flag) into `out`, the lost ranges into `lost`;
    /// returns the next seq.
    pub fn snapshot_view(
        &self,
        last: &mut Vec<Arc<EncodedEvent>>,
        out: &mut Vec<(Arc<EncodedEvent>, bool)>,
        lost: &mut Vec<(u64, u64)>,
    ) -> u64 {
        let r = self.lock();
        let oldest = r.oldest();
        r.last.outside(oldest, last);
        out.extend(r.slots.iter().map(|s| (s.ev.clone(), s.pinned)));
        lost.extend(
            r.lost
                .iter()
                .filter(|g| g.to + 1 >= oldest)
                .map(|g| (g.from, g.to)),
        );
        r.next_seq
    }
}

/// Do the lost ranges cover all of `from..=to`? (They are disjoint and increasing.)
fn lost_covers(lost: &VecDeque<Gap>, from: u64, to: u64) -> bool {
    let mut at = from;
    for g in lost {
        if g.from <= at && g.to >= at {
            if g.to >= to {
                return true;
            }
            at = g.to + 1;
        }
    }
    false
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
                last_values: 16,
                last_values_bytes: 1 << 20,
            },
            "e".into(),
        )
    }

    #[test]
    fn evictions_are_announced_each_eighth_of_the_ring() {
        let announced = |j: &Journal, appends: usize, body: &[u8]| {
            let mut rx = j.evictions();
            let mut seen = Vec::new();
            for _ in 0..appends {
                j.append(ev(j.next_seq(), body), false).unwrap();
                if rx.has_changed().unwrap() {
                    seen.push((j.latest(), *rx.borrow_and_update()));
                }
            }
            seen
        };
        // Limited by events: nothing while 16 fill, then every 16 / 8 = 2 evictions.
        let j = journal(16);
        j.append(ev(1, b"{}"), false).unwrap();
        let first = j.get(1).unwrap();
        assert_eq!(
            announced(&j, 23, b"{}"),
            vec![(18, 3), (20, 5), (22, 7), (24, 9)],
            "(latest, oldest announced)"
        );
        assert!(first.json_mark.is_evicted() && first.postcard_mark.is_evicted());
        assert!(!j.get(9).unwrap().json_mark.is_evicted());
        // Limited by bytes (the ring holds far fewer than `events`): every eighth of the
        // byte limit, not every eighth of `events`.
        let j = Journal::new(
            Limits {
                events: 4096,
                bytes: 8 * 1024,
                max_entry_bytes: max_entry_bytes(1024),
                last_values: 0,
                last_values_bytes: 0,
            },
            "e".into(),
        );
        let seen = announced(&j, 200, &[b'x'; 900]);
        assert!(j.len() < 8, "{} events held", j.len());
        // Each eviction frees more than 1 KiB, an eighth of the bytes: each is announced.
        assert_eq!(seen.len(), 200 - j.len());
    }

    #[test]
    fn an_event_the_last_values_keep_is_marked_evicted_only_when_they_drop_it() {
        let on = |seq: u64, topic: &str| {
            EncodedEvent::encode(
                seq,
                &Topic::try_from(topic).unwrap(),
                &EventMeta::default(),
                b"{}",
            )
        };
        let j = journal(4);
        j.append(on(1, "quiet"), false).unwrap();
        j.append(on(2, "busy"), false).unwrap();
        let quiet = j.get(1).unwrap();
        let busy = j.get(2).unwrap();
        for seq in 3..=8 {
            j.append(on(seq, "busy"), false).unwrap();
        }
        assert!(
            j.get(1).is_none() && j.get(2).is_none(),
            "both left the ring"
        );
        assert!(
            !quiet.json_mark.is_evicted(),
            "the last-value table still holds the quiet topic's event"
        );
        assert!(
            busy.json_mark.is_evicted() && busy.postcard_mark.is_evicted(),
            "a newer busy event replaced it in the table"
        );
        j.append(on(9, "quiet"), false).unwrap();
        assert!(
            quiet.json_mark.is_evicted(),
            "replaced in the table, out of the ring"
        );
        // Ring and table let go of an event in the same append: it is marked too.
        let j = journal(1);
        j.append(on(1, "a"), false).unwrap();
        let first = j.get(1).unwrap();
        j.append(on(2, "a"), false).unwrap();
        assert!(first.json_mark.is_evicted());
    }

    /// `room()` computed the slow way: walk the unpinned run at the front.
    fn room_by_walking(j: &Journal) -> usize {
        let r = j.lock();
        let reserved =
            usize::try_from(r.reserved_until.saturating_sub(r.next_seq)).unwrap_or(usize::MAX);
        let mut free_slots = j.limits.events - r.slots.len();
        let mut free_bytes = j.limits.bytes.saturating_sub(r.bytes);
        for s in r.slots.iter().take_while(|s| !s.pinned) {
            free_slots += 1;
            free_bytes += s.ev.heap_bytes();
        }
        free_slots
            .min(free_bytes / j.limits.max_entry_bytes.max(1))
            .min(reserved)
    }

    proptest::proptest! {
        /// The evictable run kept up to date gives the room a walk of the ring gives,
        /// whatever the order of appends (pinned or not), unpins, full-journal refusals
        /// and restores.
        #[test]
        fn room_is_kept_like_a_walk_of_the_ring(
            ops in proptest::collection::vec((0u8..4, 0usize..40, 1usize..50), 1..200),
            events in 1usize..12,
        ) {
            let j = Journal::new(
                Limits {
                    events,
                    bytes: 4096,
                    max_entry_bytes: max_entry_bytes(64),
                    last_values: 0,
                    last_values_bytes: 0,
                },
                "e".into(),
            );
            for (op, back, len) in ops {
                let body = vec![b'x'; len];
                match op {
                    0 | 1 => {
                        let _ = j.append(ev(j.next_seq(), &body), op == 1);
                    }
                    2 => {
                        let seq = j.latest().saturating_sub(back as u64);
                        j.handed_on(seq);
                    }
                    _ => {
                        let _ = j.restore(ev(j.next_seq() + (back % 3) as u64, &body), back % 2 == 0);
                    }
                }
                proptest::prop_assert_eq!(j.room(), room_by_walking(&j));
            }
        }
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
        assert_eq!(
            gap,
            Some(Gap {
                from: 3,
                to: 6,
                kind: GapKind::Overwritten
            })
        );
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
    fn no_seq_is_issued_at_or_above_the_reserved_bound() {
        let j = journal(8);
        j.set_reserved_until(3);
        assert_eq!(j.room(), 2);
        j.append(ev(1, b"a"), false).unwrap();
        j.append(ev(2, b"b"), false).unwrap();
        assert_eq!(j.room(), 0, "the source gets no credit at the bound");
        assert_eq!(
            j.append(ev(3, b"c"), false),
            Err(JournalError::Unreserved {
                seq: 3,
                reserved_until: 3
            })
        );
        j.set_reserved_until(10);
        assert_eq!(j.append(ev(3, b"c"), false), Ok(3));
    }

    #[test]
    fn lost_ranges_are_reported_as_lost_gaps() {
        let j = journal(8);
        j.append(ev(1, b"a"), false).unwrap();
        j.append(ev(2, b"b"), false).unwrap();
        // a crash lost 3..=9; the journal continues at 10
        j.resume_at(10, [(3, 9)]);
        j.append(ev(10, b"c"), false).unwrap();
        let (mut cur, mut out) = (2, Vec::new());
        assert_eq!(j.read(&mut cur, &mut out, 10), None, "up to the hole");
        assert_eq!(seqs(&out), vec![2]);
        out.clear();
        let gap = j.read(&mut cur, &mut out, 10).unwrap();
        assert_eq!((gap.from, gap.to, gap.kind), (3, 9, GapKind::Lost));
        assert_eq!(seqs(&out), vec![10]);
        assert!(j.is_lost(3, 9) && !j.is_lost(2, 9));
        assert_eq!(j.get(10).unwrap().seq, 10);
        assert!(j.get(5).is_none());
    }

    #[test]
    fn byte_cap_evicts_by_size() {
        let one = ev(1, &[7u8; 64]).heap_bytes();
        let j = Journal::new(
            Limits {
                events: 100,
                bytes: one * 3,
                max_entry_bytes: max_entry_bytes(64),
                last_values: 16,
                last_values_bytes: 1 << 20,
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
