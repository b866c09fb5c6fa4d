//! Distribution distances between a window's binned counts and a reference distribution.
//!
//! All work on the same bins: the reference profile's quantile bins for a numeric
//! feature (missing values are counted apart), its category list plus an "other" bucket
//! for a categorical one, the classes for a classifier's predictions. `pᵢ` is the window's
//! share of bin `i`, `qᵢ` the reference's.
//!
//! * **PSI** `Σ (pᵢ − qᵢ) · ln(pᵢ / qᵢ)`, with every proportion below [`EPSILON`] raised
//!   to it first (an empty bin would make the term infinite).
//! * **KS** (numeric only) `maxₖ |Σᵢ≤ₖ pᵢ − Σᵢ≤ₖ qᵢ|`: the Kolmogorov–Smirnov statistic
//!   evaluated at the reference quantile edges, where the reference's distribution function
//!   is known exactly. It never exceeds the exact statistic on the raw values, and the
//!   exact one never exceeds it by more than [`ks_slack`] `= maxᵢ min(pᵢ, qᵢ)` (between two
//!   edges neither distribution function can move by more than its own bin's mass): with
//!   ten equal-mass bins, at most 0.1 above.
//! * **JS** the Jensen–Shannon *distance* `√(½ KL(p‖m) + ½ KL(q‖m))`, `m = (p + q)/2`,
//!   in bits (so in [0, 1]); `0 · log 0 = 0`, no epsilon needed.
//! * **chi-square** goodness of fit of the window's counts to the reference proportions,
//!   over the bins the reference has mass in only (values in the others — unseen
//!   categories — are the unseen rate's business): `X² = Σ (oᵢ − eᵢ)² / eᵢ`, `eᵢ = n′ qᵢ`
//!   with `n′` the window's count in those bins, `k′ − 1` degrees of freedom for `k′` such
//!   bins, p-value `Q((k′ − 1)/2, X²/2)` (the regularized upper incomplete gamma function).
//! * **Wasserstein** (numeric only) the earth mover's distance `∫ |F_p − F_q| dx`
//!   divided by the reference's standard deviation (Evidently's "normed" Wasserstein),
//!   from the bins' masses and means — the reference's stored in its profile, the
//!   window's summed as values arrive: exact wherever the two distribution functions do
//!   not cross inside a bin, otherwise below the exact value by at most what
//!   [`wasserstein`] returns beside it.

/// Floor for proportions in PSI.
pub const EPSILON: f64 = 1e-4;

/// Population stability index of observed `counts` against reference proportions `q`.
pub fn psi(counts: &[u32], q: &[f64]) -> f64 {
    let n = total(counts);
    if n == 0.0 {
        return 0.0;
    }
    counts
        .iter()
        .zip(q)
        .map(|(&c, &q)| {
            let p = (c as f64 / n).max(EPSILON);
            let q = q.max(EPSILON);
            (p - q) * libm::log(p / q)
        })
        .sum()
}

/// Largest gap between the cumulative distributions, at the bin edges.
pub fn ks(counts: &[u32], q: &[f64]) -> f64 {
    let n = total(counts);
    if n == 0.0 {
        return 0.0;
    }
    let (mut cp, mut cq, mut worst) = (0.0, 0.0, 0.0f64);
    for (&c, &q) in counts.iter().zip(q) {
        cp += c as f64 / n;
        cq += q;
        worst = worst.max(libm::fabs(cp - cq));
    }
    worst
}

/// Jensen–Shannon distance (base 2) between observed `counts` and proportions `q`.
pub fn js(counts: &[u32], q: &[f64]) -> f64 {
    let n = total(counts);
    if n == 0.0 {
        return 0.0;
    }
    let mut divergence = 0.0;
    for (&c, &q) in counts.iter().zip(q) {
        let p = c as f64 / n;
        let m = (p + q) / 2.0;
        if p > 0.0 {
            divergence += 0.5 * p * libm::log2(p / m);
        }
        if q > 0.0 {
            divergence += 0.5 * q * libm::log2(q / m);
        }
    }
    libm::sqrt(divergence.max(0.0))
}

/// How far the exact KS statistic may lie above [`ks`]: `maxᵢ min(pᵢ, qᵢ)`.
pub fn ks_slack(counts: &[u32], q: &[f64]) -> f64 {
    let n = total(counts);
    if n == 0.0 {
        return 0.0;
    }
    counts
        .iter()
        .zip(q)
        .map(|(&c, &q)| (c as f64 / n).min(q))
        .fold(0.0, f64::max)
}

/// Chi-square goodness-of-fit statistic and its p-value over the bins with reference
/// mass (`None` without observations there, or with fewer than two such bins).
pub fn chi_square(counts: &[u32], q: &[f64]) -> Option<(f64, f64)> {
    let (mut n, mut bins) = (0.0, 0usize);
    for (&c, &q) in counts.iter().zip(q) {
        if q > 0.0 {
            n += c as f64;
            bins += 1;
        }
    }
    if n == 0.0 || bins < 2 {
        return None;
    }
    let x2: f64 = counts
        .iter()
        .zip(q)
        .filter(|(_, q)| **q > 0.0)
        .map(|(&c, &q)| {
            let e = n * q;
            let d = c as f64 - e;
            d * d / e
        })
        .sum();
    let df = (bins - 1) as f64;
    Some((x2, gamma_q(df / 2.0, x2 / 2.0)))
}

/// A numeric feature's bins, for [`wasserstein`]: the interior `edges`, the mean of the
/// reference's values in each bin, the reference's `[min, max]` and standard deviation,
/// and the window's lowest and highest value.
#[derive(Debug, Clone, Copy)]
pub struct Support<'a> {
    pub edges: &'a [f64],
    pub means: &'a [f64],
    pub reference: (f64, f64),
    pub window: (f64, f64),
    pub std: f64,
}

/// The normed Wasserstein distance of the window (`counts` per bin, `sums` of its values
/// per bin) from the reference (`q`, and its bin means in `s`), and how far below the
/// exact value on the raw data it may be (both in reference standard deviations); `None`
/// without values or without spread in the reference.
///
/// In each bin the integral of `F_p − F_q` is exact from the masses and the bin means
/// (`∫ₐᵇ (F(x) − F(a)) dx = m (b − μ)` for mass `m` with mean `μ` in `[a, b]`), so the
/// sum of their absolute values is the distance wherever `F_p − F_q` keeps its sign
/// inside each bin, and below it otherwise: in a bin of width `wᵢ` where the difference
/// can change sign (it stays within `[max(D(a) − qᵢ, D(b) − pᵢ), min(D(a) + pᵢ, D(b) + qᵢ)]`)
/// by at most `2 wᵢ` times the smaller side of that range (the outer bins reach to the
/// lowest and highest value seen).
pub fn wasserstein(counts: &[u32], sums: &[f64], q: &[f64], s: Support<'_>) -> Option<(f64, f64)> {
    let n = total(counts);
    let bins = counts.len();
    if n == 0.0
        || s.std.is_nan()
        || s.std <= 0.0
        || bins != s.edges.len() + 1
        || sums.len() != bins
        || s.means.len() != bins
        || q.len() != bins
    {
        return None;
    }
    let lo = s.reference.0.min(s.window.0);
    let hi = s.reference.1.max(s.window.1);
    let (mut before, mut distance, mut slack) = (0.0, 0.0, 0.0);
    for i in 0..bins {
        let a = if i == 0 { lo } else { s.edges[i - 1] };
        let b = if i == bins - 1 { hi } else { s.edges[i] };
        let p = counts[i] as f64 / n;
        let mean_p = if counts[i] == 0 {
            b
        } else {
            sums[i] / counts[i] as f64
        };
        let mean_q = if q[i] == 0.0 { b } else { s.means[i] };
        // ∫ₐᵇ (F_p − F_q) = D(a) (b − a) + p (b − μ_p) − q (b − μ_q).
        let signed = before * (b - a) + p * (b - mean_p) - q[i] * (b - mean_q);
        distance += libm::fabs(signed);
        let after = before + p - q[i];
        // The difference stays within these inside the bin; a sign change is possible
        // only when they straddle zero.
        let lowest = (before - q[i]).max(after - p);
        let highest = (before + p).min(after + q[i]);
        if lowest < 0.0 && highest > 0.0 && b > a {
            slack += 2.0 * (b - a) * highest.min(-lowest);
        }
        before = after;
    }
    Some((distance / s.std, slack / s.std))
}

fn total(counts: &[u32]) -> f64 {
    counts.iter().map(|&c| c as f64).sum()
}

/// The regularized upper incomplete gamma function `Q(a, x) = Γ(a, x) / Γ(a)`: by its
/// power series for `x < a + 1`, by its continued fraction (modified Lentz) otherwise.
pub fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    if a <= 0.0 {
        return 0.0;
    }
    let log_prefix = a * libm::log(x) - x - libm::lgamma(a);
    if x < a + 1.0 {
        // P(a, x) = e^(−x) x^a / Γ(a) · Σ xⁿ / (a (a+1) … (a+n))
        let (mut term, mut sum, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..500 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if libm::fabs(term) < libm::fabs(sum) * 1e-16 {
                break;
            }
        }
        (1.0 - sum * libm::exp(log_prefix)).clamp(0.0, 1.0)
    } else {
        const TINY: f64 = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..500 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if libm::fabs(d) < TINY {
                d = TINY;
            }
            c = b + an / c;
            if libm::fabs(c) < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if libm::fabs(delta - 1.0) < 1e-16 {
                break;
            }
        }
        (libm::exp(log_prefix) * h).clamp(0.0, 1.0)
    }
}
