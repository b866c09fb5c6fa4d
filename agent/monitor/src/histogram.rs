//! A fixed, log-scale histogram for latencies and lags.

/// Buckets per doubling: a reported quantile is within 2^(1/4) − 1 ≈ 19 % above the
/// true value.
const PER_OCTAVE: f64 = 4.0;
/// Buckets: bucket 0 holds values below 1; bucket `i ≥ 1` holds `[2^((i−1)/4), 2^(i/4))`;
/// the last one everything above 2^(126/4) ≈ 3·10⁹.
pub const BUCKETS: usize = 128;

/// Counts of values (microseconds, milliseconds: the unit is the caller's).
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: [u32; BUCKETS],
    n: u32,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: [0; BUCKETS],
            n: 0,
            max: 0,
        }
    }
}

impl Histogram {
    pub fn record(&mut self, value: u64) {
        let i = if value < 1 {
            0
        } else {
            let b = libm::floor(libm::log2(value as f64) * PER_OCTAVE) as usize + 1;
            b.min(BUCKETS - 1)
        };
        self.counts[i] = self.counts[i].saturating_add(1);
        self.n = self.n.saturating_add(1);
        self.max = self.max.max(value);
    }

    pub fn count(&self) -> u32 {
        self.n
    }

    /// The `q` quantile (0 < q ≤ 1) as the upper bound of its bucket, capped at the
    /// largest value seen; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.n == 0 {
            return None;
        }
        let rank = libm::ceil(q * self.n as f64).max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c as u64;
            if seen >= rank {
                let upper = if i == 0 {
                    1.0
                } else {
                    libm::pow(2.0, i as f64 / PER_OCTAVE)
                };
                return Some((libm::ceil(upper) as u64).min(self.max));
            }
        }
        Some(self.max)
    }

    pub fn clear(&mut self) {
        *self = Histogram::default();
    }
}
