//! The shared pool of evicted frames: memory of events the journal has evicted that
//! panels still hold, because their sockets have not taken them yet.
//!
//! A panel queues the journal's shared bytes by reference, so an event it has not written
//! stays in memory after the journal evicts it, until the panel's socket takes it. Only a
//! stalled panel ever holds such events, so instead of charging every panel a whole
//! queue of them in the memory budget, the panels share one pool
//! (`budget::held_pool_bytes`):
//!
//! - each stored frame (an event's JSON or postcard bytes) is made by [`tracked`], which
//!   ties its memory to a [`Mark`];
//! - the journal marks the frames of events that neither its ring nor its last-value
//!   table holds any more ([`Mark::evict`]) and announces evictions a few times per turn
//!   of its ring (`Journal::evictions`);
//! - a panel that is waiting for its socket then pays, from the pool, for every evicted
//!   frame it holds that nobody has paid for yet ([`Mark::pay`]); a frame is paid once,
//!   however many panels hold it, and its memory returns to the pool when the last
//!   reference to it is dropped;
//! - a panel that cannot pay is closed, which drops what it held.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

/// Heap bytes each tracked frame costs besides its data: the [`Mark`] in its `Arc`
/// (48 B) and the block `Bytes::from_owner` allocates for the owner (40–48 B), each in
/// glibc's 64 B size class.
pub const TRACKED_OVERHEAD: usize = 128;
// The mark and its Arc's two counters fit the half counted for them.
const _: () = assert!(std::mem::size_of::<Mark>() + 16 <= TRACKED_OVERHEAD / 2);

/// Bytes of evicted frames paid for, within a fixed limit.
#[derive(Debug)]
pub struct HeldPool {
    limit: AtomicUsize,
    used: AtomicUsize,
}

impl HeldPool {
    /// A pool of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        HeldPool {
            limit: AtomicUsize::new(limit),
            used: AtomicUsize::new(0),
        }
    }

    /// Resize the pool (a reload changed `max_panels`). Below what is paid now, nothing
    /// more is paid for until enough is given back.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Release);
    }

    /// Bytes paid for now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The pool's size in bytes.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    fn take(&self, n: usize) -> bool {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The state of one stored frame: evicted from the journal or not, and the pool that
/// paid for it once it was.
#[derive(Debug)]
pub struct Mark {
    /// The frame's bytes (its memory, with [`TRACKED_OVERHEAD`], is what it costs the
    /// pool).
    len: usize,
    evicted: AtomicBool,
    paid: OnceLock<Arc<HeldPool>>,
}

impl Mark {
    /// The journal no longer holds the frame.
    pub fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
    }

    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    /// What the frame costs the pool once evicted: its bytes and its tracking.
    pub fn cost(&self) -> usize {
        self.len + TRACKED_OVERHEAD
    }

    /// Make sure the frame is paid for from `pool` (call it while holding a reference to
    /// the frame's bytes). `true` when it is (already, or now); `false` when the pool has
    /// no room for it.
    pub fn pay(&self, pool: &Arc<HeldPool>) -> bool {
        if self.paid.get().is_some() {
            return true;
        }
        if !pool.take(self.cost()) {
            // Another panel may have paid for it meanwhile.
            return self.paid.get().is_some();
        }
        if self.paid.set(pool.clone()).is_err() {
            // Another panel paid for it meanwhile.
            pool.give(self.cost());
        }
        true
    }
}

/// The owner of a tracked frame's bytes: gives them back to the pool that paid for them
/// when the last reference is dropped.
struct Owner<T> {
    data: T,
    mark: Arc<Mark>,
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Owner<T> {
    fn as_ref(&self) -> &[u8] {
        self.data.as_ref()
    }
}

impl<T> Drop for Owner<T> {
    fn drop(&mut self) {
        if let Some(pool) = self.mark.paid.get() {
            pool.give(self.mark.cost());
        }
    }
}

/// Shared bytes of `data` (no copy) whose memory is tied to the returned [`Mark`].
pub fn tracked<T: AsRef<[u8]> + Send + 'static>(data: T) -> (Bytes, Arc<Mark>) {
    let mark = Arc::new(Mark {
        len: data.as_ref().len(),
        evicted: AtomicBool::new(false),
        paid: OnceLock::new(),
    });
    let bytes = Bytes::from_owner(Owner {
        data,
        mark: mark.clone(),
    });
    (bytes, mark)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_paid_once_and_given_back_when_its_last_reference_goes() {
        let o = TRACKED_OVERHEAD;
        let pool = Arc::new(HeldPool::new(100 + 2 * o));
        let (a, mark_a) = tracked(vec![1u8; 60]);
        let (b, mark_b) = tracked(vec![2u8; 50]);
        let a2 = a.slice(1..);
        assert!(mark_a.pay(&pool));
        assert!(mark_a.pay(&pool), "paid once for every holder");
        assert_eq!(pool.used(), 60 + o);
        assert!(!mark_b.pay(&pool), "60 + 50 > 100 (each with its overhead)");
        assert_eq!(pool.used(), 60 + o, "a frame that did not fit took nothing");
        drop(a);
        assert_eq!(pool.used(), 60 + o, "a slice still holds the frame");
        drop(a2);
        assert_eq!(pool.used(), 0);
        assert!(mark_b.pay(&pool));
        drop(b);
        assert_eq!(pool.used(), 0);
        pool.set_limit(10);
        let (c, mark_c) = tracked(vec![3u8; 5]);
        assert!(!mark_c.pay(&pool), "a smaller pool");
        drop(c);
        assert!(!mark_b.is_evicted());
        mark_b.evict();
        assert!(mark_b.is_evicted());
    }
}
