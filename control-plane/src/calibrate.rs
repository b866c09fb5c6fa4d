//! Drift thresholds calibrated to the window size, at bundle build time.
//!
//! Under no drift, PSI and the JS distance of a window shrink as the window grows, so a
//! fixed threshold raises false alerts on small windows and misses drift on large ones.
//! For each window size asked for, the builder draws `resamples` windows of that many
//! rows from the reference data (with replacement, from a fixed seed: the same data
//! gives the same bundle; fewer rows than the window, so that the spread also covers the
//! reference's own sampling error, see [`effective`]), computes each feature's statistics exactly as the agent's
//! monitor does ([`fleetml_monitor::Reference::window`]), and keeps, per feature and size,
//! thresholds for PSI, JS and (categorical) the chi-square p-value at one common quantile
//! level, the lowest at which the share of resampled windows past any of them is at most
//! the target false-alarm rate. The agent interpolates between sizes (see
//! `fleetml_monitor::Reference::limits_at`).

use anyhow::bail;
use fleetml_monitor::{Observation, Reference};
use fleetml_protocol::features::{FeatureSchema, RawValue};
use fleetml_protocol::reference::{
    Calibration, RECONSTRUCTION_ERROR, ReferenceProfile, SubjectLimits, argmax,
};

/// Window sizes calibrated when none are given (plus the bundle's own window size).
pub const DEFAULT_SIZES: [u32; 3] = [100, 250, 1000];
/// Target share of undrifted windows in which a feature is past its thresholds.
pub const DEFAULT_FALSE_ALARM_RATE: f64 = 0.01;
/// Most window sizes one profile calibrates.
pub const MAX_SIZES: usize = fleetml_monitor::MAX_LIMITS;
/// The resampling's seed: fixed, so that a rebuild gives the same bundle.
const SEED: u64 = 0x05ee_d0ff_1ee7;

/// What to calibrate.
#[derive(Debug, Clone)]
pub struct Options {
    pub sizes: Vec<u32>,
    pub false_alarm_rate: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sizes: DEFAULT_SIZES.to_vec(),
            false_alarm_rate: DEFAULT_FALSE_ALARM_RATE,
        }
    }
}

/// Resampled windows per size: enough that the target quantile has about fifty windows
/// beyond it.
pub fn resamples(false_alarm_rate: f64) -> u32 {
    ((50.0 / false_alarm_rate).ceil() as u32).clamp(1_000, 20_000)
}

/// Thresholds for `profile`'s features (and its first output's predictions) on windows of
/// `opts.sizes` rows drawn from `rows` (and the model's `outputs` on them).
pub fn calibrate(
    profile: &ReferenceProfile,
    schema: &FeatureSchema,
    rows: &[Vec<RawValue>],
    outputs: &[(String, usize, Vec<f32>)],
    opts: &Options,
) -> anyhow::Result<Calibration> {
    let alpha = opts.false_alarm_rate;
    if !(alpha > 0.0 && alpha < 0.5) {
        bail!("--false-alarm-rate must be between 0 and 0.5, not {alpha}");
    }
    let mut sizes = opts.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.is_empty() || sizes.len() > MAX_SIZES || sizes[0] < 10 {
        bail!(
            "calibrate 1 to {MAX_SIZES} window sizes of at least 10 rows, not {:?}",
            opts.sizes
        );
    }
    if rows.is_empty() {
        bail!("no reference rows to calibrate thresholds on");
    }
    // A window larger than the reference cannot be drawn from it meaningfully (and would
    // cost resamples × size work for nothing): such sizes are left out, and the agent
    // holds windows beyond the largest calibrated size to that size's thresholds (looser,
    // so no extra false alarms). The smallest size is kept whatever the reference's size.
    let smallest = sizes[0];
    sizes.retain(|s| *s == smallest || (*s as usize) <= rows.len());
    // Each subject: its reference and its observations, row by row.
    let observed: Vec<Vec<Observation>> = rows
        .iter()
        .map(|r| fleetml_monitor::profile::observations(schema, r))
        .collect();
    let names: Vec<&str> = schema.features.iter().map(|f| f.name.as_str()).collect();
    let references =
        fleetml_monitor::profile::references(profile, &names).map_err(anyhow::Error::msg)?;
    let mut subjects: Vec<(String, Reference, Vec<Observation>)> = Vec::new();
    for (i, (name, reference)) in names.iter().zip(references).enumerate() {
        let column = observed.iter().map(|o| o[i]).collect();
        subjects.push((name.to_string(), reference, column));
    }
    if let (Some(o), Some((_, columns, data))) = (profile.predictions.first(), outputs.first()) {
        let columns = (*columns).max(1);
        let rows_out = data.len() / columns;
        let prediction = if !o.class_counts.is_empty() {
            fleetml_monitor::profile::classes(&o.class_counts)
                .ok()
                .map(|r| {
                    let column = data
                        .chunks_exact(columns)
                        .map(|row| argmax(row).map_or(Observation::Missing, Observation::Category))
                        .collect::<Vec<_>>();
                    (r, column)
                })
        } else {
            o.scores.first().and_then(|n| {
                fleetml_monitor::profile::numeric(n).ok().map(|r| {
                    let column = (0..rows_out)
                        .map(|r| Observation::Number(f64::from(data[r * columns])))
                        .collect::<Vec<_>>();
                    (r, column)
                })
            })
        };
        if let Some((r, column)) = prediction
            && column.len() == rows.len()
        {
            subjects.push(("prediction".into(), r, column));
        }
    }
    // The rows' reconstruction error, computed by the monitor's own code.
    if let Some(m) = &profile.multivariate {
        let (pca, reference) =
            fleetml_monitor::profile::multivariate(m, &names, None).map_err(anyhow::Error::msg)?;
        let column = observed
            .iter()
            .map(|o| {
                pca.error(o)
                    .map_or(Observation::Missing, Observation::Number)
            })
            .collect();
        subjects.push((RECONSTRUCTION_ERROR.into(), reference, column));
    }
    let resamples = resamples(alpha);
    let mut limits: Vec<SubjectLimits> = subjects
        .iter()
        .map(|(name, _, _)| SubjectLimits {
            name: name.clone(),
            psi: Vec::new(),
            js: Vec::new(),
            chi2_p: Vec::new(),
        })
        .collect();
    let mut rng = SplitMix(SEED);
    let n_rows = rows.len() as u64;
    for &size in &sizes {
        let drawn = effective(size, rows.len());
        let draws: Vec<Vec<usize>> = (0..resamples)
            .map(|_| (0..drawn).map(|_| rng.below(n_rows) as usize).collect())
            .collect();
        for ((_, reference, column), out) in subjects.iter().zip(&mut limits) {
            let mut psi = Vec::with_capacity(draws.len());
            let mut js = Vec::with_capacity(draws.len());
            let mut p = Vec::with_capacity(draws.len());
            // Resampling leaves the chi-square statistic's distribution as it is whatever
            // the rows drawn; against a fixed reference of N rows, live windows of n show
            // it (1 + n/N) times as large: the p-value is taken of that.
            let inflate = 1.0 + f64::from(size) / rows.len() as f64;
            let df = reference
                .proportions()
                .iter()
                .filter(|q| **q > 0.0)
                .count()
                .saturating_sub(1) as f64;
            for draw in &draws {
                let report = reference.window(draw.iter().map(|&i| column[i]));
                psi.push(report.psi);
                js.push(report.js);
                p.push(report.chi2.map_or(1.0, |x2| {
                    fleetml_monitor::stats::gamma_q(df / 2.0, x2 * inflate / 2.0)
                }));
            }
            let categorical = reference.kind() == fleetml_monitor::Kind::Categorical;
            let (tpsi, tjs, tp) = joint_limits(psi, js, categorical.then_some(p), alpha);
            out.psi.push(tpsi);
            out.js.push(tjs);
            if let Some(tp) = tp {
                out.chi2_p.push(tp);
            }
        }
    }
    Ok(Calibration {
        false_alarm_rate: alpha,
        resamples,
        sizes,
        limits,
    })
}

/// Rows to resample for the thresholds of windows of `size` compared with a reference of
/// `rows` rows: `size · rows / (size + rows)`.
///
/// A window resampled from the reference differs from it by the window's sampling error
/// only; a window of fresh data also differs by the reference's own (the reference is
/// a sample too, and every window is compared with that one sample). For PSI, JS and the
/// chi-square statistic, which grow as `1/n` under no drift, the two together are what
/// one resampled window of `1 / (1/size + 1/rows)` rows shows. Without this, a
/// reference of 4,000 rows gave fresh undrifted windows of 1,000 rows six times the
/// target false-alarm rate (docs/BENCHMARKS.md).
pub fn effective(size: u32, rows: usize) -> u32 {
    let (n, r) = (f64::from(size), rows as f64);
    ((n * r / (n + r)).round() as u32).clamp(1, size)
}

/// Thresholds at one quantile level `γ` of each statistic's undrifted values (PSI and JS
/// at `γ`, the p-value at `1 − γ`): the lowest `γ` at which at most a share `alpha` of
/// the windows is past any of them.
fn joint_limits(
    mut psi: Vec<f64>,
    mut js: Vec<f64>,
    p: Option<Vec<f64>>,
    alpha: f64,
) -> (f64, f64, Option<f64>) {
    let windows: Vec<(f64, f64, f64)> = psi
        .iter()
        .zip(&js)
        .enumerate()
        .map(|(i, (a, b))| (*a, *b, p.as_ref().map_or(1.0, |p| p[i])))
        .collect();
    psi.sort_by(f64::total_cmp);
    js.sort_by(f64::total_cmp);
    let mut p_sorted = p.clone().unwrap_or_default();
    p_sorted.sort_by(f64::total_cmp);
    let n = windows.len();
    let upper =
        |sorted: &[f64], level: f64| sorted[((level * n as f64).ceil() as usize).clamp(1, n) - 1];
    let lower = |sorted: &[f64], level: f64| {
        sorted[(((1.0 - level) * n as f64).floor() as usize).min(n - 1)]
    };
    let at = |level: f64| {
        let (tpsi, tjs) = (upper(&psi, level), upper(&js, level));
        let tp = (!p_sorted.is_empty()).then(|| lower(&p_sorted, level));
        let past = windows
            .iter()
            .filter(|(a, b, c)| *a > tpsi || *b > tjs || tp.is_some_and(|tp| *c < tp))
            .count();
        ((tpsi, tjs, tp), past as f64 / n as f64)
    };
    // The share past falls as the level rises; find the lowest level that keeps it at
    // most alpha (the level 1 keeps every window within).
    let (mut low, mut high) = (1.0 - alpha, 1.0);
    let level = if at(low).1 <= alpha {
        low
    } else {
        for _ in 0..40 {
            let mid = (low + high) / 2.0;
            if at(mid).1 <= alpha {
                high = mid;
            } else {
                low = mid;
            }
        }
        high
    };
    // A statistic that never moves (a constant feature, one category) has the threshold
    // 0 (PSI, JS) or 1 (p): kept just inside the valid range, where it still never fires.
    let (tpsi, tjs, tp) = at(level).0;
    (
        tpsi.max(MIN_THRESHOLD),
        tjs.max(MIN_THRESHOLD),
        tp.map(|p| p.min(1.0 - MIN_THRESHOLD)),
    )
}

/// The smallest PSI or JS threshold kept (a statistic that is always 0 is never above
/// it), and how far below 1 a p-value threshold stays.
const MIN_THRESHOLD: f64 = 1e-9;

/// SplitMix64: a small, fixed, well-mixed generator (the resampling must be the same
/// on every machine and in every build).
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2⁻³² for the row
    /// counts a reference has).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A feature that never varies (one numeric value, one category) still calibrates to
    /// thresholds the profile accepts, and they never fire on it.
    #[test]
    fn features_that_never_vary_calibrate_to_valid_thresholds() {
        let schema = FeatureSchema::from_toml(
            r#"
[[features]]
name = "constant"
type = "float"
input = "x"
column = 0

[[features]]
name = "one_kind"
type = "category"
values = ["only", "never"]
encoding = "one-hot"
input = "x"
column = 1
"#,
        )
        .expect("schema");
        let rows: Vec<Vec<RawValue>> = (0..500)
            .map(|_| vec![RawValue::Number(3.0), RawValue::Text("only".into())])
            .collect();
        let mut profile = ReferenceProfile::compute(&schema, &rows, &[], 10).expect("profile");
        let calibration = calibrate(
            &profile,
            &schema,
            &rows,
            &[],
            &Options {
                sizes: vec![100],
                false_alarm_rate: 0.01,
            },
        )
        .expect("calibrated");
        assert_eq!(calibration.sizes, vec![100]);
        for l in &calibration.limits {
            assert!(l.psi[0] > 0.0 && l.js[0] > 0.0, "{l:?}");
            assert!(l.chi2_p.iter().all(|p| *p < 1.0), "{l:?}");
        }
        profile.calibration = Some(calibration);
        ReferenceProfile::from_cbor(&profile.to_cbor()).expect("the profile stays valid");
        // 500 rows: windows of 1,000 are not calibrated, 100 and 250 are.
        let sized = calibrate(&profile, &schema, &rows, &[], &Options::default()).expect("ok");
        assert_eq!(sized.sizes, vec![100, 250]);
    }
}
