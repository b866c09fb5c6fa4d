//! Whether the agent's background loops make progress. The main loop feeds systemd's
//! watchdog only while every registered part does: the assignment puller (busy from the
//! start of a pull until it waits for the next, beating on every step and every
//! downloaded chunk) and the telemetry publisher (beating on every turn of its loop).
//! A part that is busy and has not beaten for its limit is stalled; the watchdog then
//! goes unfed and systemd restarts the agent, as it does for a wedged main loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// No beat recorded while idle.
const IDLE: u64 = u64::MAX;

/// One loop's progress.
#[derive(Debug)]
pub struct Part {
    name: &'static str,
    limit: Duration,
    origin: Instant,
    /// Milliseconds since `origin` of the last beat, or [`IDLE`].
    last: AtomicU64,
}

impl Part {
    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_millis() as u64
    }

    /// The loop works on something now (and moved just now).
    pub fn beat(&self) {
        self.last.store(self.ms(Instant::now()), Ordering::Relaxed);
    }

    /// The loop waits for its next turn: nothing to stall.
    pub fn idle(&self) {
        self.last.store(IDLE, Ordering::Relaxed);
    }

    /// How long it has been busy without a beat at `now`, when that is beyond its limit.
    pub fn stalled_at(&self, now: Instant) -> Option<Duration> {
        stalled(self.last.load(Ordering::Relaxed), self.ms(now), self.limit)
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// The rule: busy (`last` is not [`IDLE`]) and `now - last` beyond `limit`.
fn stalled(last: u64, now: u64, limit: Duration) -> Option<Duration> {
    if last == IDLE {
        return None;
    }
    let quiet = Duration::from_millis(now.saturating_sub(last));
    (quiet > limit).then_some(quiet)
}

/// The parts whose progress the watchdog depends on.
#[derive(Debug, Default)]
pub struct Liveness {
    parts: Mutex<Vec<Arc<Part>>>,
}

impl Liveness {
    /// Registers a part, idle, stalled once busy without a beat for `limit`.
    pub fn part(&self, name: &'static str, limit: Duration) -> Arc<Part> {
        let part = Arc::new(Part {
            name,
            limit,
            origin: Instant::now(),
            last: AtomicU64::new(IDLE),
        });
        self.parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(part.clone());
        part
    }

    /// The first stalled part at `now` and for how long it has not moved.
    pub fn stalled_at(&self, now: Instant) -> Option<(&'static str, Duration)> {
        self.parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find_map(|p| p.stalled_at(now).map(|d| (p.name, d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_part_without_beats_stalls_and_an_idle_one_never_does() {
        let limit = Duration::from_secs(60);
        assert_eq!(
            stalled(IDLE, 10_000_000, limit),
            None,
            "idle: waiting is not stalling"
        );
        assert_eq!(stalled(1_000, 61_000, limit), None, "at the limit");
        assert_eq!(
            stalled(1_000, 61_001, limit),
            Some(Duration::from_millis(60_001))
        );
        let live = Liveness::default();
        let puller = live.part("assignment puller", limit);
        let now = Instant::now();
        assert_eq!(live.stalled_at(now + Duration::from_secs(3600)), None);
        puller.beat();
        assert_eq!(live.stalled_at(now + Duration::from_secs(30)), None);
        let (name, quiet) = live
            .stalled_at(now + Duration::from_secs(120))
            .expect("stalled");
        assert_eq!(name, "assignment puller");
        assert!(quiet > limit);
        puller.idle();
        assert_eq!(live.stalled_at(now + Duration::from_secs(120)), None);
    }
}
