//! Keyed rate limits: at most `per_second` on average and `burst` at once per key (a
//! token, a device, a client address), in bounded memory.
//!
//! Each key keeps one number, the time its bucket is next empty (the generic cell rate
//! algorithm: a call is admitted when that time is no more than `burst` intervals
//! ahead). Keys whose bucket has refilled are forgotten when the table is full; while
//! every key in a full table is still limited, new keys share one overflow bucket, so a
//! caller with many addresses cannot grow the table or escape the limit by rotating.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a call was not admitted: when the key may call again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
}

/// A rate limit per key. A limit of 0 per second admits everything.
#[derive(Debug)]
pub struct RateLimiter<K> {
    interval: Duration,
    burst: u32,
    max_keys: usize,
    state: Mutex<State<K>>,
}

#[derive(Debug)]
struct State<K> {
    epoch: Instant,
    /// Per key, when its bucket is next empty (time since `epoch`).
    next_empty: HashMap<K, Duration>,
    overflow: Duration,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `per_second` calls on average, `burst` at once, for up to `max_keys` keys.
    pub fn new(per_second: u32, burst: u32, max_keys: usize) -> RateLimiter<K> {
        RateLimiter {
            interval: if per_second == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs(1) / per_second
            },
            burst: burst.max(1),
            max_keys: max_keys.max(1),
            state: Mutex::new(State {
                epoch: Instant::now(),
                next_empty: HashMap::new(),
                overflow: Duration::ZERO,
            }),
        }
    }

    /// Whether this limiter admits everything.
    pub fn is_off(&self) -> bool {
        self.interval.is_zero()
    }

    /// Admits one call of `key` now, or says when it may call again.
    pub fn check(&self, key: &K) -> Result<(), Limited> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &K, now: Instant) -> Result<(), Limited> {
        if self.is_off() {
            return Ok(());
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = now.saturating_duration_since(state.epoch);
        let window = self.interval * self.burst;
        if !state.next_empty.contains_key(key) && state.next_empty.len() >= self.max_keys {
            state.next_empty.retain(|_, empty| *empty > now);
        }
        let (interval, full) = (self.interval, state.next_empty.len() >= self.max_keys);
        let slot = match state.next_empty.get_mut(key) {
            Some(slot) => slot,
            None if full => &mut state.overflow,
            None => state
                .next_empty
                .entry(key.clone())
                .or_insert(Duration::ZERO),
        };
        let start = (*slot).max(now);
        let next = start + interval;
        if next > now + window {
            return Err(Limited {
                retry_after: next - window - now,
            });
        }
        *slot = next;
        Ok(())
    }

    /// Keys remembered now.
    pub fn keys(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_empty
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_and_other_keys_are_not_affected() {
        let limiter = RateLimiter::new(10, 5, 100);
        let t0 = Instant::now();
        for _ in 0..5 {
            limiter.check_at(&"a", t0).expect("within the burst");
        }
        let limited = limiter.check_at(&"a", t0).expect_err("beyond the burst");
        assert_eq!(limited.retry_after, Duration::from_millis(100));
        limiter.check_at(&"b", t0).expect("another key");
        let later = t0 + Duration::from_millis(100);
        limiter.check_at(&"a", later).expect("one refilled");
        assert!(limiter.check_at(&"a", later).is_err());
        // Idle long enough, the whole burst again, and no more.
        let idle = t0 + Duration::from_secs(10);
        for _ in 0..5 {
            limiter.check_at(&"a", idle).expect("refilled");
        }
        assert!(limiter.check_at(&"a", idle).is_err());
    }

    #[test]
    fn the_table_stays_bounded_and_rotating_keys_share_one_bucket() {
        let limiter = RateLimiter::new(1, 2, 8);
        let t0 = Instant::now();
        let mut admitted = 0;
        for k in 0..1_000u32 {
            admitted += usize::from(limiter.check_at(&k, t0).is_ok());
        }
        assert_eq!(limiter.keys(), 8);
        // Eight keys with their own bucket, and the overflow bucket's burst.
        assert_eq!(admitted, 8 + 2);
        // Once buckets refill, their keys are forgotten to make room.
        limiter
            .check_at(&5_000, t0 + Duration::from_secs(60))
            .expect("room again");
        assert_eq!(limiter.keys(), 1);
    }

    #[test]
    fn zero_per_second_admits_everything() {
        let limiter = RateLimiter::new(0, 1, 1);
        for k in 0..100 {
            limiter.check(&k).expect("off");
        }
        assert!(limiter.is_off());
    }
}
