//! The claims generator. Rows are raw feature values in schema order plus the label.

use fleetml_protocol::features::RawValue;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

use crate::detmath::{exp, sigmoid};
use crate::{CHANNELS, CLAIM_TYPES, REGIONS, YES_NO};

/// A shift applied to the generated population, to produce drifted data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shift {
    /// Multiplier on every claim amount (claims inflation).
    pub amount_factor: f64,
    /// Probability that a claim is filed online (0.30 in the reference population).
    pub online_share: f64,
    /// Years added to the policy holder's age (negative: younger customers).
    pub age_offset: f64,
}

impl Shift {
    pub const NONE: Shift = Shift {
        amount_factor: 1.0,
        online_share: 0.30,
        age_offset: 0.0,
    };
    /// The documented shift of `drifted.csv`: claims 80% larger, 70% filed online, holders
    /// 12 years younger.
    pub const DRIFTED: Shift = Shift {
        amount_factor: 1.8,
        online_share: 0.70,
        age_offset: -12.0,
    };
}

/// One generated claim: raw values in schema order, and whether it needs investigation.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub values: Vec<RawValue>,
    pub investigate: bool,
}

pub struct Generator {
    rng: ChaCha8Rng,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Generator")
    }
}

impl Generator {
    /// A generator for `seed`; `stream` separates independent data sets from one seed.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..16].copy_from_slice(&stream.to_le_bytes());
        Generator {
            rng: ChaCha8Rng::from_seed(bytes),
        }
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Approximately standard normal (Irwin-Hall sum of 12 uniforms).
    pub fn normal(&mut self) -> f64 {
        let mut s = 0.0;
        for _ in 0..12 {
            s += self.uniform();
        }
        s - 6.0
    }

    fn pick(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut u = self.uniform() * total;
        for (i, w) in weights.iter().enumerate() {
            if u < *w {
                return i;
            }
            u -= w;
        }
        weights.len() - 1
    }

    /// Number of successes before the first failure, success probability `p`.
    fn geometric(&mut self, p: f64, cap: u32) -> u32 {
        let mut k = 0;
        while k < cap && self.uniform() < p {
            k += 1;
        }
        k
    }

    pub fn claim(&mut self, shift: &Shift) -> Claim {
        let kind = self.pick(&[0.45, 0.25, 0.20, 0.10]);
        let channel = {
            let rest = 1.0 - shift.online_share;
            self.pick(&[rest * 0.6, shift.online_share, rest * 0.4])
        };
        let region = self.pick(&[0.22, 0.18, 0.20, 0.25, 0.15]);
        let scale = [1.0, 2.2, 0.7, 0.25][kind];
        let amount =
            (exp(8.0 + 0.9 * self.normal()) * scale * shift.amount_factor).min(1_000_000.0);
        let amount = (amount * 100.0).round() / 100.0;
        let tenure = (self.uniform() * self.uniform() * 300.0).floor();
        let age = (45.0 + 14.0 * self.normal() + shift.age_offset)
            .clamp(18.0, 95.0)
            .round();
        let prior = self.geometric(0.35, 12);
        let delay = self.geometric(0.85, 400);
        let vehicle_age = if kind == 0 {
            (self.uniform() * 18.0 * 10.0).round() / 10.0
        } else {
            0.0
        };
        let witnesses_known = self.uniform() >= 0.04;
        let witnesses = self.geometric(0.4, 8);
        let deductible = [0.0, 250.0, 500.0, 1000.0, 2500.0][self.pick(&[0.1, 0.3, 0.3, 0.2, 0.1])];
        let premium =
            ((exp(6.6 + 0.4 * self.normal()) * [1.3, 1.0, 1.6, 0.3][kind]) * 100.0).round() / 100.0;
        let hour = (self.uniform() * 24.0).floor().min(23.0);
        let injuries = if kind == 0 || kind == 2 {
            self.geometric(0.2, 6)
        } else {
            0
        };
        let police = if kind == 0 || kind == 1 {
            usize::from(self.uniform() >= 0.55)
        } else {
            usize::from(self.uniform() >= 0.1)
        };

        // The latent risk an experienced claims handler would see.
        let log_ratio = {
            // log(amount / 3000) via the ratio of exp-scaled normals is not available
            // without ln; a rational approximation on the ratio is plenty for a label.
            let r = amount / (3000.0 * scale);
            2.0 * (r - 1.0) / (r + 1.0)
        };
        let night = if hour < 5.0 { 1.0 } else { 0.0 };
        let z = -2.1
            + 1.1 * log_ratio
            + 0.45 * f64::from(prior)
            + if delay > 30 { 0.9 } else { 0.0 }
            + if kind == 0 && police == 1 { 0.9 } else { 0.0 }
            + if channel == 1 { 0.35 } else { 0.0 }
            - 0.004 * tenure
            + 0.8 * night
            + 0.35 * f64::from(injuries)
            - 0.25 * f64::from(witnesses)
            + if age < 25.0 { 0.5 } else { 0.0 }
            + if kind == 1 && amount > 20_000.0 {
                0.6
            } else {
                0.0
            };
        let investigate = self.uniform() < sigmoid(z);

        let values = vec![
            RawValue::Number(amount),
            RawValue::Number(tenure),
            RawValue::Number(age),
            RawValue::Number(f64::from(prior)),
            RawValue::Number(f64::from(delay)),
            RawValue::Number(vehicle_age),
            if witnesses_known {
                RawValue::Number(f64::from(witnesses))
            } else {
                RawValue::Missing
            },
            RawValue::Number(deductible),
            RawValue::Number(premium),
            RawValue::Number(hour),
            RawValue::Number(f64::from(injuries)),
            RawValue::Text(CLAIM_TYPES[kind].into()),
            RawValue::Text(CHANNELS[channel].into()),
            RawValue::Text(REGIONS[region].into()),
            RawValue::Text(YES_NO[police].into()),
        ];
        Claim {
            values,
            investigate,
        }
    }

    pub fn claims(&mut self, n: usize, shift: &Shift) -> Vec<Claim> {
        (0..n).map(|_| self.claim(shift)).collect()
    }
}

/// Formats a raw value as a CSV cell.
pub fn cell(v: &RawValue) -> String {
    match v {
        RawValue::Missing => String::new(),
        RawValue::Number(x) => format!("{x}"),
        RawValue::Text(s) => s.clone(),
    }
}
