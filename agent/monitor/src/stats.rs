//! Distribution distances between a window's binned counts and a reference distribution.
//!
//! All four work on the same bins: the reference profile's quantile bins for a numeric
//! feature (plus nothing else: missing values are counted apart), its category list plus
//! an "other" bucket for a categorical one, the classes for a classifier's predictions.
//!
//! * **PSI** `Σ (pᵢ − qᵢ) · ln(pᵢ / qᵢ)`, with every proportion below [`EPSILON`] raised
//!   to it first (an empty bin would make the term infinite).
//! * **KS** `maxₖ |Σᵢ≤ₖ pᵢ − Σᵢ≤ₖ qᵢ|`: the Kolmogorov–Smirnov statistic evaluated only at
//!   the bin edges. It never exceeds the exact two-sample statistic on the raw values (the
//!   exact one is a maximum over more points) and equals it when every distinct value is
//!   an edge; with 10 quantile bins it can miss a shift that stays inside one bin.
//! * **JS** the Jensen–Shannon *distance* `√(½ KL(p‖m) + ½ KL(q‖m))`, `m = (p + q)/2`,
//!   in bits (so in [0, 1]); `0 · log 0 = 0`, no epsilon needed.
//! * **chi-square** goodness of fit of the window's counts to the reference proportions:
//!   `X² = Σ (oᵢ − eᵢ)² / eᵢ`, `eᵢ = n · max(qᵢ, EPSILON)`, `k − 1` degrees of freedom,
//!   p-value `Q((k − 1)/2, X²/2)` (the regularized upper incomplete gamma function).

/// Floor for proportions in PSI and for expected proportions in the chi-square test.
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

/// Chi-square goodness-of-fit statistic and its p-value (`None` without observations
/// or with fewer than two bins).
pub fn chi_square(counts: &[u32], q: &[f64]) -> Option<(f64, f64)> {
    let n = total(counts);
    if n == 0.0 || counts.len() < 2 {
        return None;
    }
    let x2: f64 = counts
        .iter()
        .zip(q)
        .map(|(&c, &q)| {
            let e = n * q.max(EPSILON);
            let d = c as f64 - e;
            d * d / e
        })
        .sum();
    let df = (counts.len() - 1) as f64;
    Some((x2, gamma_q(df / 2.0, x2 / 2.0)))
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
