//! Brute-force protection for the panel port's tokens: failed authentications are counted
//! per source address in a fixed-size table; an address with [`FAILURES`] failures within
//! [`WINDOW`] is refused (`429`, `Retry-After`) for [`COOLING`] on every authenticated
//! path, whatever it presents.
//!
//! The table never grows past [`TABLE_ENTRIES`]: a new address evicts the least recently
//! seen one that is not blocked (the least recently seen of all when every one is), so a
//! flood from many addresses costs a fixed amount of memory. Such a flood can push an
//! address out of the table before it is blocked; each address still gets at most
//! [`FAILURES`] guesses per window while it stays in it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures within [`WINDOW`] that block an address.
pub const FAILURES: u32 = 10;
/// The window failures are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// How long a blocked address is refused.
pub const COOLING: Duration = Duration::from_secs(60);
/// Most addresses tracked at a time (the budget's line).
pub use crate::budget::AUTH_THROTTLE_ENTRIES as TABLE_ENTRIES;

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    window_start: Instant,
    blocked_until: Option<Instant>,
    last_seen: Instant,
}

#[derive(Debug)]
pub struct Throttle {
    table: Mutex<HashMap<IpAddr, Entry>>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            table: Mutex::new(HashMap::with_capacity(TABLE_ENTRIES)),
        }
    }
}

impl Throttle {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Some(time left)` while `ip` is blocked.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let until = self.table().get(&ip)?.blocked_until?;
        until.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Count a failed authentication from `ip`; true when this one blocks it.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> bool {
        let mut t = self.table();
        if !t.contains_key(&ip) && t.len() >= TABLE_ENTRIES {
            let victim = t
                .iter()
                .filter(|(_, e)| e.blocked_until.is_none_or(|u| u <= now))
                .min_by_key(|(_, e)| e.last_seen)
                .or_else(|| t.iter().min_by_key(|(_, e)| e.last_seen))
                .map(|(ip, _)| *ip);
            if let Some(v) = victim {
                t.remove(&v);
            }
        }
        let e = t.entry(ip).or_insert(Entry {
            failures: 0,
            window_start: now,
            blocked_until: None,
            last_seen: now,
        });
        e.last_seen = now;
        if now.duration_since(e.window_start) >= WINDOW || e.blocked_until.is_some_and(|u| u <= now)
        {
            e.failures = 0;
            e.window_start = now;
            e.blocked_until = None;
        }
        e.failures += 1;
        if e.failures >= FAILURES && e.blocked_until.is_none() {
            e.blocked_until = Some(now + COOLING);
            return true;
        }
        false
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | n))
    }

    #[test]
    fn ten_failures_block_for_the_cooling_period_then_reset() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for i in 1..FAILURES {
            assert!(!t.failed(ip(1), t0), "failure {i}");
            assert_eq!(t.blocked(ip(1), t0), None);
        }
        assert!(t.failed(ip(1), t0));
        assert_eq!(t.blocked(ip(1), t0), Some(COOLING));
        assert_eq!(
            t.blocked(ip(2), t0),
            None,
            "another address is not affected"
        );
        assert_eq!(t.blocked(ip(1), t0 + COOLING), None, "cooled down");
        // half the threshold per window, for three windows: never blocked
        let t = Throttle::default();
        for i in 0..3 * FAILURES {
            assert!(
                !t.failed(ip(3), t0 + WINDOW / (FAILURES / 2) * i),
                "failure {i}"
            );
        }
    }

    #[test]
    fn many_addresses_do_not_grow_the_table_and_blocked_ones_stay() {
        let t = Throttle::default();
        let t0 = Instant::now();
        for _ in 0..FAILURES {
            t.failed(ip(0), t0);
        }
        for n in 1..10_000u32 {
            t.failed(ip(n), t0 + Duration::from_micros(u64::from(n)));
            assert!(t.len() <= TABLE_ENTRIES);
        }
        assert!(t.blocked(ip(0), t0 + Duration::from_secs(1)).is_some());
    }
}
