//! The last-value table: the newest event of each topic, so a panel that connects sees
//! the state of every machine at once (`last=true`, `GET /v1/last`) instead of waiting
//! for the next event — what MQTT's retained messages give a subscriber.
//!
//! - At most `capacity` topics (`panels.last_values`). A new topic beyond that evicts
//!   the *least recently updated* topic, which is the one whose newest event has the
//!   smallest seq; evictions are counted.
//! - Entries share the journal's `Arc`s: an event still in the ring costs the table
//!   nothing but its index entry. An event the ring has overwritten lives on here alone;
//!   those bytes ("outside" the ring) are bounded by `outside_limit`
//!   (`panels.last_values_mib`), evicting the least recently updated topics first.
//! - The table is kept under the journal's lock, so a panel gets its last values and the
//!   seq they are current at (`latest`) as one consistent view.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::event::{EncodedEvent, Topic};

/// Index bytes per topic held (hash set slot with its load-factor slack, and the
/// seq-ordered map's node share), for the memory budget.
pub const INDEX_BYTES_PER_TOPIC: usize = 96;

/// A table entry keyed by its event's topic (hash and equality on the topic only).
struct ByTopic(Arc<EncodedEvent>);

impl Hash for ByTopic {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.topic.as_str().hash(h)
    }
}

impl PartialEq for ByTopic {
    fn eq(&self, other: &Self) -> bool {
        self.0.topic == other.0.topic
    }
}

impl Eq for ByTopic {}

impl Borrow<str> for ByTopic {
    fn borrow(&self) -> &str {
        self.0.topic.as_str()
    }
}

pub(super) struct LastValues {
    capacity: usize,
    outside_limit: usize,
    by_topic: HashSet<ByTopic>,
    /// The same entries ordered by seq: the first is the least recently updated topic.
    by_seq: BTreeMap<u64, Arc<EncodedEvent>>,
    /// Entries with a seq below this are no longer in the ring; their bytes are counted
    /// in `outside_bytes`.
    boundary: u64,
    outside_bytes: usize,
    evicted: u64,
    /// Events dropped from here that the ring no longer had (now held by nothing in the
    /// journal, their frames marked evicted), and their bytes, since the journal last
    /// took them ([`LastValues::take_dropped`]).
    dropped: (usize, usize),
}

impl LastValues {
    /// A table of at most `capacity` topics (0 = none kept) holding at most
    /// `outside_limit` bytes of events the ring no longer has.
    pub(super) fn new(capacity: usize, outside_limit: usize) -> Self {
        LastValues {
            capacity,
            outside_limit,
            by_topic: HashSet::with_capacity(capacity),
            by_seq: BTreeMap::new(),
            boundary: 0,
            outside_bytes: 0,
            evicted: 0,
            dropped: (0, 0),
        }
    }

    /// Is the event `seq` held here?
    pub(super) fn holds(&self, seq: u64) -> bool {
        self.by_seq.contains_key(&seq)
    }

    /// Events (and bytes) this table dropped that the ring no longer had, since the last
    /// call.
    pub(super) fn take_dropped(&mut self) -> (usize, usize) {
        std::mem::take(&mut self.dropped)
    }

    /// The ring's oldest retained seq is now `oldest`: entries below it are held here
    /// alone. Evicts the least recently updated topics while they hold too many bytes.
    pub(super) fn advance(&mut self, oldest: u64) {
        self.move_boundary(oldest);
        self.enforce();
    }

    /// [`LastValues::advance`] without evicting.
    fn move_boundary(&mut self, oldest: u64) {
        if oldest > self.boundary {
            self.outside_bytes += self
                .by_seq
                .range(self.boundary..oldest)
                .map(|(_, ev)| ev.heap_bytes())
                .sum::<usize>();
            self.boundary = oldest;
        }
    }

    /// `ev` is the newest event of its topic; `oldest` is the ring's oldest seq after
    /// it was appended (or restored).
    pub(super) fn record(&mut self, ev: &Arc<EncodedEvent>, oldest: u64) {
        if self.capacity == 0 {
            return;
        }
        // First where the ring ends now: the entry this event replaces may have just
        // left the ring, and then nothing holds it any more.
        self.move_boundary(oldest);
        if let Some(old) = self.by_topic.take(ev.topic.as_str()) {
            if old.0.seq > ev.seq {
                // A newer event of this topic is already here (restore order).
                self.by_topic.insert(old);
                self.enforce();
                return;
            }
            self.remove_seq(old.0.seq);
        }
        self.by_topic.insert(ByTopic(ev.clone()));
        self.by_seq.insert(ev.seq, ev.clone());
        if ev.seq < self.boundary {
            self.outside_bytes += ev.heap_bytes();
        }
        self.enforce();
    }

    fn remove_seq(&mut self, seq: u64) {
        if let Some(ev) = self.by_seq.remove(&seq)
            && seq < self.boundary
        {
            // The ring no longer has it either: readers that still do pay for it.
            ev.mark_evicted();
            self.outside_bytes -= ev.heap_bytes();
            self.dropped.0 += 1;
            self.dropped.1 += ev.heap_bytes();
        }
    }

    fn enforce(&mut self) {
        while self.by_seq.len() > self.capacity || self.outside_bytes > self.outside_limit {
            let Some((&seq, ev)) = self.by_seq.first_key_value() else {
                break;
            };
            self.by_topic.remove(ev.topic.as_str());
            self.remove_seq(seq);
            self.evicted += 1;
        }
    }

    /// The newest event of each topic that `wanted` accepts with a seq in
    /// `after+1..=upto`, in seq order, at most `max` of them, into `out`: one page of a
    /// listing that is sent in several.
    pub(super) fn page(
        &self,
        after: u64,
        upto: u64,
        mut wanted: impl FnMut(&Topic) -> bool,
        out: &mut Vec<Arc<EncodedEvent>>,
        max: usize,
    ) {
        if after >= upto {
            return;
        }
        out.extend(
            self.by_seq
                .range(after + 1..=upto)
                .map(|(_, ev)| ev)
                .filter(|ev| wanted(&ev.topic))
                .take(max)
                .cloned(),
        );
    }

    /// Entries the ring no longer holds (seq below `oldest`), in seq order.
    pub(super) fn outside(&self, oldest: u64, out: &mut Vec<Arc<EncodedEvent>>) {
        out.extend(self.by_seq.range(..oldest).map(|(_, ev)| ev.clone()));
    }

    pub(super) fn stats(&self) -> LastValueStats {
        LastValueStats {
            topics: self.by_seq.len(),
            outside_bytes: self.outside_bytes,
            evicted: self.evicted,
        }
    }
}

/// What the last-value table holds (for `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LastValueStats {
    /// Topics held.
    pub topics: usize,
    /// Bytes of events held that the ring no longer has.
    pub outside_bytes: usize,
    /// Topics evicted since start (capacity or byte limit).
    pub evicted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventMeta;

    fn ev(seq: u64, topic: &str) -> Arc<EncodedEvent> {
        Arc::new(EncodedEvent::encode(
            seq,
            &Topic::try_from(topic).unwrap(),
            &EventMeta::default(),
            b"{\"v\":1}",
        ))
    }

    fn seqs(t: &LastValues) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        t.page(0, u64::MAX, |_| true, &mut out, usize::MAX);
        out.iter().map(|e| (e.seq, e.topic.to_string())).collect()
    }

    #[test]
    fn keeps_the_newest_per_topic_in_seq_order() {
        let mut t = LastValues::new(8, 1 << 20);
        for (s, topic) in [(1, "a"), (2, "b"), (3, "a"), (4, "c"), (5, "b")] {
            t.record(&ev(s, topic), 1);
        }
        assert_eq!(
            seqs(&t),
            [(3, "a".into()), (4, "c".into()), (5, "b".into())]
        );
        // an older event of a topic (restore order) does not replace a newer one
        t.record(&ev(2, "a"), 1);
        assert_eq!(seqs(&t)[0], (3, "a".into()));
        let mut only_c = Vec::new();
        t.page(0, u64::MAX, |topic| topic.as_str() == "c", &mut only_c, 10);
        assert_eq!(only_c.len(), 1);
        let mut page = Vec::new();
        t.page(3, 5, |_| true, &mut page, 1);
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn capacity_evicts_the_least_recently_updated_topic() {
        let mut t = LastValues::new(2, 1 << 20);
        t.record(&ev(1, "a"), 1);
        t.record(&ev(2, "b"), 1);
        t.record(&ev(3, "a"), 1);
        t.record(&ev(4, "c"), 1); // evicts b (seq 2), not a (updated at 3)
        assert_eq!(seqs(&t), [(3, "a".into()), (4, "c".into())]);
        assert_eq!(t.stats().evicted, 1);
        assert_eq!(t.stats().topics, 2);
        let mut none = LastValues::new(0, 1 << 20);
        none.record(&ev(1, "a"), 1);
        assert_eq!(none.stats().topics, 0);
    }

    #[test]
    fn bytes_the_ring_no_longer_holds_are_bounded() {
        let one = ev(1, "t1").heap_bytes();
        // room outside the ring for two entries
        let mut t = LastValues::new(100, 2 * one + one / 2);
        for s in 1..=5 {
            t.record(&ev(s, &format!("t{s}")), 1);
        }
        assert_eq!(t.stats().outside_bytes, 0, "all still in the ring");
        t.advance(4); // the ring dropped seqs 1..=3
        assert_eq!(t.stats().topics, 4, "t1 evicted: three outside is too many");
        assert_eq!(t.stats().outside_bytes, 2 * one);
        assert_eq!(t.stats().evicted, 1);
        let mut out = Vec::new();
        t.outside(4, &mut out);
        assert_eq!(out.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
        // updating an outside topic moves it back into the ring's range
        t.record(&ev(6, "t2"), 4);
        assert_eq!(t.stats().outside_bytes, one);
    }
}
