//! Waiting between attempts, with the randomness passed in (so a fleet does not retry
//! or poll in step, and a test can replay it).

use std::time::Duration;

/// The reconnect back-off after `failures` failures in a row: between half and all of
/// 0.5 s · 2^(failures−1), capped at 60 s; `random` picks where in that range.
pub fn reconnect(failures: u32, random: u64) -> Duration {
    let cap_ms = (500u64 << failures.saturating_sub(1).min(7)).min(60_000);
    Duration::from_millis(cap_ms / 2 + random % (cap_ms / 2 + 1))
}

/// A poll interval of `poll` ± 20 %: `unit` in [0, 1] picks where.
pub fn jittered(poll: Duration, unit: f64) -> Duration {
    let unit = if unit.is_nan() {
        0.5
    } else {
        unit.clamp(0.0, 1.0)
    };
    poll.mul_f64(0.8 + 0.4 * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_half_a_second_to_a_minute_with_jitter_below_the_cap() {
        // (failures, lowest, highest) in milliseconds.
        for (failures, lo, hi) in [
            (0, 250, 500),
            (1, 250, 500),
            (2, 500, 1_000),
            (3, 1_000, 2_000),
            (8, 30_000, 60_000),
            (40, 30_000, 60_000),
        ] {
            assert_eq!(reconnect(failures, 0), Duration::from_millis(lo));
            assert_eq!(reconnect(failures, hi / 2), Duration::from_millis(hi));
            for r in [1, 7, 12_345, u64::MAX] {
                let d = reconnect(failures, r).as_millis() as u64;
                assert!((lo..=hi).contains(&d), "{failures} failures, {r}: {d} ms");
            }
        }
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let poll = Duration::from_secs(300);
        assert_eq!(jittered(poll, 0.0), Duration::from_secs(240));
        assert_eq!(jittered(poll, 1.0), Duration::from_secs(360));
        assert_eq!(jittered(poll, 0.5), poll);
        assert_eq!(jittered(poll, 7.0), Duration::from_secs(360));
        assert_eq!(jittered(poll, -1.0), Duration::from_secs(240));
        assert_eq!(jittered(poll, f64::NAN), poll);
    }
}
