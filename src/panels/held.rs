//! The shared pool of evicted frames: bytes of events that panels still have queued for
//! their sockets after the journal evicted them.
//!
//! A panel queues the journal's shared bytes by reference (`socket::Outbound`), so an
//! event it has not written yet stays in memory after the journal evicts it, until the
//! panel's socket takes it. Counting that per panel would cost every panel a whole queue
//! of events in the memory budget ([`crate::budget::queued_event_bytes`]), though only a
//! panel whose socket stalls for a whole turn of the journal ever holds any. Instead the
//! panels share one pool ([`crate::budget::held_pool_bytes`]): when the journal
//! announces evictions ([`crate::journal::Journal::evictions`]), each panel that is
//! writing claims what it holds of the evicted events, and a panel whose claim does not
//! fit is closed at once, which frees what it held.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes panels hold of evicted events, within a fixed limit.
#[derive(Debug)]
pub(crate) struct HeldPool {
    limit: usize,
    used: AtomicUsize,
}

impl HeldPool {
    pub fn new(limit: usize) -> Self {
        HeldPool {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// Bytes claimed now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The pool's size in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// An empty claim on this pool.
    pub fn claim(&self) -> Claim<'_> {
        Claim {
            pool: self,
            bytes: 0,
        }
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One panel's share of the pool; given back when dropped.
#[derive(Debug)]
pub(crate) struct Claim<'a> {
    pool: &'a HeldPool,
    bytes: usize,
}

impl Claim<'_> {
    /// Hold `bytes` in all, more or fewer than now. `false` (and the claim unchanged)
    /// when the pool has no room for the increase.
    pub fn resize(&mut self, bytes: usize) -> bool {
        // Every flush of every panel ends with `resize(0)`: leave the shared counter alone
        // when nothing changes.
        if bytes == self.bytes {
            return true;
        }
        if bytes > self.bytes {
            if !self.pool.take(bytes - self.bytes) {
                return false;
            }
        } else {
            self.pool.give(self.bytes - bytes);
        }
        self.bytes = bytes;
        true
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.pool.give(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_stay_within_the_pool_and_are_given_back() {
        let pool = HeldPool::new(100);
        let mut a = pool.claim();
        let mut b = pool.claim();
        assert!(a.resize(60));
        assert!(!b.resize(50), "60 + 50 > 100");
        assert_eq!(pool.used(), 60, "a claim that did not fit took nothing");
        assert!(b.resize(40));
        assert!(a.resize(10), "shrinking always fits");
        assert_eq!(pool.used(), 50);
        drop(a);
        assert_eq!(pool.used(), 40);
        drop(b);
        assert_eq!(pool.used(), 0);
    }
}
