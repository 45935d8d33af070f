//! Bookkeeping of the source, free of I/O so it can be tested alone:
//! - [`Tracker`]: deliveries held until the mirror acknowledges their event (fixed capacity,
//!   one per event).
//! - [`Dedup`]: a bounded window of recently appended broker sequence numbers.
//! - [`plan_credit`]: how much credit each link gets so the total never exceeds the room.

use std::collections::{HashMap, VecDeque};

/// The peek-lock of a held delivery, kept alive by renewal (`com.microsoft:renew-lock`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    /// The lock token: ASB's 16-byte delivery tag, .NET Guid byte order.
    pub token: [u8; 16],
    /// When to renew it: half way through the lock's remaining time.
    pub due: tokio::time::Instant,
    /// The lock's length as last learned (locked-until minus now); renewals are batched
    /// with those due within a quarter of it.
    pub span: std::time::Duration,
    /// The broker said the lock is lost, or it expired while renewals failed: never
    /// settle this delivery as if it counted; the broker's redelivery takes its place.
    pub lost: bool,
    /// When the lock runs out unless renewed (now + span, as last learned).
    pub expires: tokio::time::Instant,
    /// The delay before the next renewal attempt after a failure; zero while renewals
    /// work. Doubles with every failure in a row (see `Source::renew_failed`).
    pub retry: std::time::Duration,
}

impl Lock {
    /// A lock just learned to last `span` from now.
    pub fn new(token: [u8; 16], span: std::time::Duration) -> Self {
        let now = tokio::time::Instant::now();
        Lock {
            token,
            due: now + span / 2,
            span,
            lost: false,
            expires: now + span,
            retry: std::time::Duration::ZERO,
        }
    }
}

/// A delivery held until its event is handed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held<D> {
    /// Journal seq of the event.
    pub seq: u64,
    /// Index of the link (subscription) it arrived on.
    pub link: usize,
    /// Generation of that link (a re-attached link has a new one).
    pub generation: u64,
    pub delivery: D,
    /// Its lock, when the broker told us the token and the locked-until time.
    pub lock: Option<Lock>,
}

/// Held deliveries ordered by seq, at most one per seq: a redelivery of a held event
/// takes the place of the delivery it repeats (the broker redelivers only once the lock
/// of the first is lost, so the first can no longer be settled). Capacity fixed at
/// construction.
#[derive(Debug)]
pub struct Tracker<D> {
    held: VecDeque<Held<D>>,
    cap: usize,
}

impl<D> Tracker<D> {
    pub fn new(cap: usize) -> Self {
        Tracker {
            held: VecDeque::with_capacity(cap),
            cap,
        }
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Hold a delivery. `Ok(Some(old))`: it replaced the delivery held for the same seq;
    /// `Err(h)`: the tracker is full and `h` is given back.
    pub fn hold(&mut self, h: Held<D>) -> Result<Option<Held<D>>, Held<D>> {
        let at = self.held.partition_point(|x| x.seq < h.seq);
        if let Some(x) = self.held.get_mut(at)
            && x.seq == h.seq
        {
            return Ok(Some(std::mem::replace(x, h)));
        }
        if self.held.len() >= self.cap {
            return Err(h);
        }
        self.held.insert(at, h);
        Ok(None)
    }

    /// Remove the delivery held for `seq`.
    pub fn take(&mut self, seq: u64) -> Option<Held<D>> {
        let at = self.held.binary_search_by_key(&seq, |x| x.seq).ok()?;
        self.held.remove(at)
    }

    /// The delivery held for `seq`.
    pub fn get_mut(&mut self, seq: u64) -> Option<&mut Held<D>> {
        let at = self.held.binary_search_by_key(&seq, |x| x.seq).ok()?;
        self.held.get_mut(at)
    }

    /// The held deliveries, in seq order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Held<D>> {
        self.held.iter_mut()
    }

    /// Forget every delivery of a link that died (its deliveries cannot be settled on
    /// a new link). Returns how many were dropped.
    pub fn drop_link(&mut self, link: usize) -> usize {
        let before = self.held.len();
        self.held.retain(|h| h.link != link);
        before - self.held.len()
    }

    /// Remove everything into `out`.
    pub fn drain_all(&mut self, out: &mut Vec<Held<D>>) {
        out.extend(self.held.drain(..));
    }
}

/// What identifies a message across redeliveries: the subscription and the broker's
/// sequence number; the fingerprint (message-id and enqueued time) guards against a
/// broker that restarted its numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DedupKey {
    pub link: usize,
    pub asb_seq: i64,
}

/// A fingerprint of the parts of a message that stay the same across redeliveries.
/// FNV-1a, so it is the same in every build: the window survives restarts and upgrades
/// in the journal snapshot.
pub fn fingerprint(message_id: Option<&str>, enqueued_at_ms: Option<i64>) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h ^= u64::from(x);
            h = h.wrapping_mul(PRIME);
        }
    };
    match message_id {
        Some(id) => {
            eat(&[1]);
            eat(&(id.len() as u64).to_le_bytes());
            eat(id.as_bytes());
        }
        None => eat(&[0]),
    }
    match enqueued_at_ms {
        Some(t) => {
            eat(&[1]);
            eat(&t.to_le_bytes());
        }
        None => eat(&[0]),
    }
    h
}

/// A bounded window of recently appended messages: key → (journal seq, fingerprint).
/// The oldest entry is forgotten when full. Capacity fixed at construction.
#[derive(Debug)]
pub struct Dedup {
    order: VecDeque<DedupKey>,
    map: HashMap<DedupKey, (u64, u64)>,
    cap: usize,
}

impl Dedup {
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Dedup {
            order: VecDeque::with_capacity(cap),
            map: HashMap::with_capacity(cap),
            cap,
        }
    }

    /// The journal seq of an earlier delivery of the same message, if within the window.
    pub fn get(&self, key: DedupKey, fp: u64) -> Option<u64> {
        self.map
            .get(&key)
            .filter(|(_, f)| *f == fp)
            .map(|(seq, _)| *seq)
    }

    pub fn insert(&mut self, key: DedupKey, fp: u64, seq: u64) {
        if self.map.insert(key, (seq, fp)).is_some() {
            // Same key, new message (the broker renumbered): the order entry stays.
            return;
        }
        if self.order.len() == self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.map.remove(&old);
        }
        self.order.push_back(key);
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The window, oldest first: (key, fingerprint, journal seq). Re-inserting these in
    /// order into a new window (export/import across a restart) gives the same window.
    pub fn entries(&self) -> impl Iterator<Item = (DedupKey, u64, u64)> + '_ {
        self.order.iter().filter_map(|k| {
            let (seq, fp) = self.map.get(k)?;
            Some((*k, *fp, *seq))
        })
    }
}

/// The window shared by the source (its only user at run time) and the journal's
/// snapshot, which exports it at checkpoints and imports it at start.
pub type SharedDedup = std::sync::Mutex<Dedup>;

/// Plan the credit of each link. `budget` is the total credit allowed (free room in the
/// window); `current` holds each link's outstanding credit (`None` = link not attached).
/// Credit is never lowered (messages may already be on the wire); a link is topped up
/// towards its fair share of the budget when it has used at least half of it, taking only
/// what the other links leave: the sum of outstanding credit never exceeds `budget`.
/// `start` rotates which link is served first. Writes the new credit into `out` for the
/// links that should get a flow.
pub fn plan_credit(budget: u32, current: &[Option<u32>], start: usize, out: &mut [Option<u32>]) {
    let n = current.iter().filter(|c| c.is_some()).count() as u32;
    for o in out.iter_mut() {
        *o = None;
    }
    if n == 0 || budget == 0 {
        return;
    }
    let outstanding: u32 = current.iter().flatten().sum();
    let mut available = budget.saturating_sub(outstanding);
    let fair = budget.div_ceil(n);
    let len = current.len();
    for k in 0..len {
        let i = (start + k) % len;
        let Some(credit) = current[i] else { continue };
        if available == 0 {
            break;
        }
        let target = fair.min(credit + available);
        if target > credit && (credit == 0 || target - credit >= (fair / 2).max(1)) {
            available -= target - credit;
            out[i] = Some(target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(seq: u64, link: usize, d: u32) -> Held<u32> {
        Held {
            seq,
            link,
            generation: 0,
            delivery: d,
            lock: None,
        }
    }

    #[test]
    fn tracker_holds_one_delivery_per_seq_in_order() {
        let mut t = Tracker::new(3);
        assert_eq!(t.hold(h(1, 0, 10)), Ok(None));
        assert_eq!(t.hold(h(3, 1, 30)), Ok(None));
        assert_eq!(t.hold(h(2, 0, 20)), Ok(None));
        // full: a new seq is given back
        assert_eq!(t.hold(h(4, 0, 40)).unwrap_err().delivery, 40);
        // a redelivery of seq 2 replaces the held one, even when full
        assert_eq!(t.hold(h(2, 0, 21)).unwrap().unwrap().delivery, 20);
        assert_eq!(t.len(), 3);
        assert_eq!(t.get_mut(3).map(|x| x.delivery), Some(30));
        assert!(t.get_mut(4).is_none());
        assert_eq!(t.take(2).unwrap().delivery, 21);
        assert_eq!(t.take(2), None);
        assert_eq!(t.take(7), None);
        assert_eq!(t.iter_mut().map(|x| x.seq).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(t.drop_link(1), 1);
        let mut out = Vec::new();
        t.drain_all(&mut out);
        assert_eq!(out.len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn dedup_window_is_bounded_and_checks_fingerprint() {
        let mut d = Dedup::new(3);
        let k = |s| DedupKey {
            link: 0,
            asb_seq: s,
        };
        let fp = fingerprint(Some("m"), Some(5));
        for s in 1..=5 {
            d.insert(k(s), fp, 100 + s as u64);
        }
        assert_eq!(d.len(), 3);
        assert_eq!(d.get(k(1), fp), None);
        assert_eq!(d.get(k(5), fp), Some(105));
        assert_eq!(d.get(k(5), fingerprint(Some("other"), Some(5))), None);
        assert_eq!(
            d.get(
                DedupKey {
                    link: 1,
                    asb_seq: 5
                },
                fp
            ),
            None,
            "per subscription"
        );
        // a renumbered broker reusing a key replaces the entry
        let fp2 = fingerprint(Some("n"), Some(9));
        d.insert(k(5), fp2, 200);
        assert_eq!(d.get(k(5), fp2), Some(200));
        assert_eq!(d.len(), 3);
        assert_eq!(d.map.len(), 3);
        // export and import give the same window
        let mut e = Dedup::new(3);
        for (k, fp, seq) in d.entries() {
            e.insert(k, fp, seq);
        }
        assert_eq!(
            e.entries().collect::<Vec<_>>(),
            d.entries().collect::<Vec<_>>()
        );
        // the fingerprint is the same in every build
        assert_eq!(fingerprint(Some("m"), Some(5)), 0x0f3b22145b3fe716);
    }

    fn plan(budget: u32, current: &[Option<u32>], start: usize) -> Vec<Option<u32>> {
        let mut out = vec![None; current.len()];
        plan_credit(budget, current, start, &mut out);
        out
    }

    #[test]
    fn credit_one_link_tops_up_by_halves() {
        assert_eq!(plan(256, &[Some(0)], 0), vec![Some(256)]);
        assert_eq!(plan(256, &[Some(200)], 0), vec![None]);
        assert_eq!(plan(256, &[Some(128)], 0), vec![Some(256)]);
        // budget shrank below outstanding credit: nothing more, nothing lowered
        assert_eq!(plan(10, &[Some(50)], 0), vec![None]);
        assert_eq!(plan(0, &[Some(0)], 0), vec![None]);
        assert_eq!(plan(1, &[Some(0)], 0), vec![Some(1)]);
        assert_eq!(plan(5, &[None], 0), vec![None]);
    }

    #[test]
    fn credit_total_never_exceeds_budget() {
        // exhaustive over small cases
        for budget in 0..12u32 {
            for a in 0..8u32 {
                for b in 0..8u32 {
                    for start in 0..3 {
                        let cur = [Some(a), None, Some(b)];
                        let out = plan(budget, &cur, start);
                        assert_eq!(out[1], None);
                        let total: u32 = cur
                            .iter()
                            .zip(&out)
                            .map(|(c, o)| o.or(*c).unwrap_or(0))
                            .sum();
                        assert!(total <= budget.max(a + b), "{budget} {a} {b} {out:?}");
                        for (c, o) in cur.iter().zip(&out) {
                            if let (Some(c), Some(o)) = (c, o) {
                                assert!(o > c, "never lowered");
                            }
                        }
                        if a + b <= budget {
                            assert!(total <= budget);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn credit_is_shared_and_rotates() {
        assert_eq!(plan(10, &[Some(0), Some(0)], 0), vec![Some(5), Some(5)]);
        // budget 1 over two links: the rotation decides who gets it
        assert_eq!(plan(1, &[Some(0), Some(0)], 0), vec![Some(1), None]);
        assert_eq!(plan(1, &[Some(0), Some(0)], 1), vec![None, Some(1)]);
        // a busy link takes what an idle link leaves, up to its fair share
        assert_eq!(plan(10, &[Some(5), Some(0)], 0), vec![None, Some(5)]);
    }
}
