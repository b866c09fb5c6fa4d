//! The reference profile (`reference.cbor`): the distribution of each feature and of the
//! model's predictions on the data the model was trained on. Drift monitoring on the
//! device compares live windows against it.
//!
//! Numeric features are cut into quantile bins: `edges` holds the interior cut points
//! (at most `bins - 1`, ties collapsed), and `counts[i]` the values in
//! `(edges[i-1], edges[i]]`, with the first bin open below and the last open above.

use serde::{Deserialize, Serialize};

use crate::features::{FeatureSchema, FeatureType, RawValue};

/// The most bins a numeric profile may have.
pub const MAX_BINS: u32 = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceProfile {
    /// Rows the profile was computed from.
    pub rows: u64,
    /// Requested bins per numeric feature.
    pub bins: u32,
    pub features: Vec<FeatureProfile>,
    pub predictions: Vec<OutputProfile>,
    /// Drift thresholds calibrated per window size on resamples of the reference (absent
    /// in profiles built without, and before, calibration: the agent then uses fixed
    /// thresholds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    /// The principal-component model of the numeric features and the reference rows'
    /// reconstruction error (absent with fewer than two numeric features).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multivariate: Option<Multivariate>,
    /// The classifier's calibration map for estimating accuracy without labels (present
    /// when the bundle was built with a label column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub performance: Option<Performance>,
}

/// The subject name of the reconstruction error in [`Calibration::limits`] and in
/// window reports.
pub const RECONSTRUCTION_ERROR: &str = "reconstruction_error";

/// Principal components most a multivariate reference keeps.
pub const MAX_COMPONENTS: usize = 8;

/// A principal-component model of the standardized numeric features, fitted on the
/// reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Multivariate {
    /// The numeric features it takes, by name.
    pub features: Vec<String>,
    /// Their reference means and standard deviations (missing values left out).
    pub means: Vec<f64>,
    pub stds: Vec<f64>,
    /// The kept components (unit vectors, one loading per feature), largest variance
    /// first.
    pub components: Vec<Vec<f64>>,
    /// Share of the standardized variance the kept components explain.
    pub explained: f64,
    /// The reference rows' reconstruction error.
    pub error: NumericProfile,
}

/// A classifier's calibration map: how often its prediction was right on the labelled
/// reference, by confidence (the winning class's score).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Performance {
    /// The label column it was measured against.
    pub label: String,
    /// Confidence bin edges (`accuracy[i]` for `(edges[i-1], edges[i]]`).
    pub edges: Vec<f64>,
    pub accuracy: Vec<f64>,
    pub counts: Vec<u64>,
    /// Accuracy on the reference rows.
    pub reference_accuracy: f64,
    /// Expected calibration error of the raw confidences (mean |confidence − accuracy|
    /// over the bins, weighted by their rows): how far the scores are from being
    /// probabilities. The map corrects for it.
    pub calibration_error: f64,
    /// Window sizes and, per size, the estimate below which a share `false_alarm_rate`
    /// of undrifted windows fell.
    pub sizes: Vec<u32>,
    pub lower: Vec<f64>,
}

/// Drift thresholds calibrated per window size when the bundle was built: for each
/// feature (and `prediction`), the PSI, JS and (categorical) chi-square p-value
/// thresholds at which a share `false_alarm_rate` of undrifted windows of each size was
/// past any of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Target share of undrifted windows in which a feature is past its thresholds.
    pub false_alarm_rate: f64,
    /// Windows resampled per size.
    pub resamples: u32,
    /// Window sizes (rows), ascending.
    pub sizes: Vec<u32>,
    pub limits: Vec<SubjectLimits>,
}

/// One feature's (or the predictions') calibrated thresholds, one per window size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectLimits {
    pub name: String,
    pub psi: Vec<f64>,
    pub js: Vec<f64>,
    /// Categorical subjects only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chi2_p: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureProfile {
    pub name: String,
    /// Rows where the feature was missing (empty or NaN).
    pub missing: u64,
    /// Rows whose value was outside the schema's range or category list.
    pub invalid: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numeric: Option<NumericProfile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub categorical: Option<CategoricalProfile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumericProfile {
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub std: f64,
    /// The mean of the values in each bin (bundles built before this field have none:
    /// the agent then takes bin midpoints). With the window's own bin means it makes the
    /// agent's Wasserstein distance exact wherever the two distributions do not cross
    /// inside a bin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub means: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoricalProfile {
    /// The schema's allowed values, in order.
    pub values: Vec<String>,
    pub counts: Vec<u64>,
    /// Values not in the schema's list.
    pub other: u64,
}

/// Distribution of one model output on the reference data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputProfile {
    pub output: String,
    /// For a classifier (last axis > 1): how often each class was the arg-max.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_counts: Vec<u64>,
    /// Score (or regression value) distribution of each column of the last axis.
    pub scores: Vec<NumericProfile>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("reference profile is not valid CBOR for this format: {0}")]
    Malformed(String),
    #[error("reference profile is inconsistent: {0}")]
    Inconsistent(String),
}

impl ReferenceProfile {
    pub fn to_cbor(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("reference profile encodes to CBOR")
    }

    pub fn from_cbor(bytes: &[u8]) -> Result<Self, ReferenceError> {
        let p: ReferenceProfile =
            serde_cbor::from_slice(bytes).map_err(|e| ReferenceError::Malformed(e.to_string()))?;
        p.check()?;
        Ok(p)
    }

    fn check(&self) -> Result<(), ReferenceError> {
        let bad = |m: String| Err(ReferenceError::Inconsistent(m));
        if self.bins == 0 || self.bins > MAX_BINS {
            return bad(format!("bins must be 1..={MAX_BINS}, not {}", self.bins));
        }
        let numerics = self
            .features
            .iter()
            .filter_map(|f| f.numeric.as_ref().map(|n| (f.name.as_str(), n)))
            .chain(
                self.predictions
                    .iter()
                    .flat_map(|o| o.scores.iter().map(|s| (o.output.as_str(), s))),
            )
            .chain(
                self.multivariate
                    .iter()
                    .map(|m| (RECONSTRUCTION_ERROR, &m.error)),
            );
        for (name, n) in numerics {
            if n.counts.len() != n.edges.len() + 1 || n.edges.len() >= MAX_BINS as usize {
                return bad(format!(
                    "`{name}` has {} edges and {} counts",
                    n.edges.len(),
                    n.counts.len()
                ));
            }
            if !n.means.is_empty() && n.means.len() != n.counts.len() {
                return bad(format!(
                    "`{name}` has {} bin means and {} counts",
                    n.means.len(),
                    n.counts.len()
                ));
            }
            if n.edges
                .windows(2)
                .any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
            {
                return bad(format!("`{name}` bin edges are not strictly increasing"));
            }
        }
        if let Some(c) = &self.calibration {
            let positive = |v: &[f64]| v.iter().all(|x| x.is_finite() && *x > 0.0);
            if c.sizes.is_empty()
                || c.sizes.len() > 8
                || c.sizes.windows(2).any(|w| w[0] >= w[1])
                || !(c.false_alarm_rate > 0.0 && c.false_alarm_rate < 1.0)
            {
                return bad(
                    "calibration: 1 to 8 ascending window sizes and a false-alarm rate in (0, 1)"
                        .into(),
                );
            }
            for l in &c.limits {
                if l.psi.len() != c.sizes.len()
                    || l.js.len() != c.sizes.len()
                    || !(l.chi2_p.is_empty() || l.chi2_p.len() == c.sizes.len())
                    || !positive(&l.psi)
                    || !positive(&l.js)
                    || l.chi2_p
                        .iter()
                        .any(|p| !(p.is_finite() && *p >= 0.0 && *p < 1.0))
                {
                    return bad(format!(
                        "calibration of `{}`: one positive threshold per window size",
                        l.name
                    ));
                }
            }
        }
        if let Some(m) = &self.multivariate {
            let d = m.features.len();
            if d == 0
                || m.means.len() != d
                || m.stds.len() != d
                || m.stds.iter().any(|s| !s.is_finite() || *s <= 0.0)
                || m.components.is_empty()
                || m.components.len() > MAX_COMPONENTS
                || m.components.len() >= d
                || m.components.iter().any(|c| c.len() != d)
                || !m
                    .means
                    .iter()
                    .chain(&m.stds)
                    .chain(m.components.iter().flatten())
                    .all(|x| x.is_finite())
                || m.error.counts.len() != m.error.edges.len() + 1
            {
                return bad(
                    "multivariate: one mean, positive deviation and loading per feature, 1 to 8 components and fewer than the features"
                        .into(),
                );
            }
        }
        if let Some(p) = &self.performance {
            let share = |x: &f64| (0.0..=1.0).contains(x);
            if p.accuracy.len() != p.edges.len() + 1
                || p.counts.len() != p.accuracy.len()
                || p.edges.windows(2).any(|w| w[0] >= w[1])
                || !p.edges.iter().all(|e| e.is_finite())
                || !p.accuracy.iter().all(share)
                || !share(&p.reference_accuracy)
                || !share(&p.calibration_error)
                || p.sizes.len() != p.lower.len()
                || p.sizes.len() > 8
                || p.sizes.windows(2).any(|w| w[0] >= w[1])
                || p.sizes.first() == Some(&0)
                || !p.lower.iter().all(share)
            {
                return bad(
                    "performance: one accuracy in [0, 1] per confidence bin, one limit per window size"
                        .into(),
                );
            }
        }
        for f in &self.features {
            if let Some(c) = &f.categorical
                && c.values.len() != c.counts.len()
            {
                return bad(format!(
                    "`{}` has {} values and {} counts",
                    f.name,
                    c.values.len(),
                    c.counts.len()
                ));
            }
        }
        Ok(())
    }

    /// Computes the profile of `rows` (raw values in schema order) and of the model's
    /// `outputs` on them (each `(name, columns, row-major values)`).
    pub fn compute(
        schema: &FeatureSchema,
        rows: &[Vec<RawValue>],
        outputs: &[(String, usize, Vec<f32>)],
        bins: u32,
    ) -> Result<Self, ReferenceError> {
        if bins == 0 || bins > MAX_BINS {
            return Err(ReferenceError::Inconsistent(format!(
                "bins must be 1..={MAX_BINS}"
            )));
        }
        let mut features = Vec::with_capacity(schema.features.len());
        for (i, f) in schema.features.iter().enumerate() {
            let mut missing = 0;
            let mut invalid = 0;
            let column = rows.iter().map(|r| r.get(i).unwrap_or(&RawValue::Missing));
            let profile = match f.kind {
                FeatureType::Float | FeatureType::Int => {
                    let mut values = Vec::with_capacity(rows.len());
                    for v in column {
                        match v {
                            RawValue::Number(x) if !x.is_nan() => {
                                if !f.in_range(*x) {
                                    invalid += 1;
                                }
                                values.push(*x);
                            }
                            RawValue::Text(_) => invalid += 1,
                            _ => missing += 1,
                        }
                    }
                    FeatureProfile {
                        name: f.name.clone(),
                        missing,
                        invalid,
                        numeric: numeric_profile(values, bins),
                        categorical: None,
                    }
                }
                FeatureType::Category => {
                    let mut counts = vec![0u64; f.values.len()];
                    let mut other = 0;
                    for v in column {
                        let key = match v {
                            RawValue::Missing => {
                                missing += 1;
                                continue;
                            }
                            RawValue::Number(x) if x.is_nan() => {
                                missing += 1;
                                continue;
                            }
                            RawValue::Number(x) => x.to_string(),
                            RawValue::Text(s) => s.clone(),
                        };
                        match f.values.iter().position(|v| *v == key) {
                            Some(k) => counts[k] += 1,
                            None => {
                                other += 1;
                                invalid += 1;
                            }
                        }
                    }
                    FeatureProfile {
                        name: f.name.clone(),
                        missing,
                        invalid,
                        numeric: None,
                        categorical: Some(CategoricalProfile {
                            values: f.values.clone(),
                            counts,
                            other,
                        }),
                    }
                }
            };
            features.push(profile);
        }
        let mut predictions = Vec::with_capacity(outputs.len());
        for (name, columns, data) in outputs {
            let columns = (*columns).max(1);
            let n = data.len() / columns;
            let mut class_counts = if columns > 1 {
                vec![0u64; columns]
            } else {
                Vec::new()
            };
            if columns > 1 {
                for row in data.chunks_exact(columns) {
                    if let Some(best) = argmax(row) {
                        class_counts[best] += 1;
                    }
                }
            }
            let scores = (0..columns)
                .map(|c| {
                    let col: Vec<f64> = (0..n)
                        .map(|r| f64::from(data[r * columns + c]))
                        .filter(|v| !v.is_nan())
                        .collect();
                    numeric_profile(col, bins).unwrap_or_else(empty_numeric)
                })
                .collect();
            predictions.push(OutputProfile {
                output: name.clone(),
                class_counts,
                scores,
            });
        }
        Ok(ReferenceProfile {
            rows: rows.len() as u64,
            bins,
            features,
            predictions,
            calibration: None,
            multivariate: None,
            performance: None,
        })
    }
}

fn empty_numeric() -> NumericProfile {
    NumericProfile {
        edges: Vec::new(),
        counts: vec![0],
        min: 0.0,
        max: 0.0,
        mean: 0.0,
        std: 0.0,
        means: Vec::new(),
    }
}

/// Index of the largest value, ignoring NaN; the first wins ties.
pub fn argmax(row: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, v) in row.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| *v > b) {
            best = Some((i, *v));
        }
    }
    best.map(|(i, _)| i)
}

/// Quantile-binned profile of `values` (no NaN). `None` when there are no values.
pub fn numeric_profile(mut values: Vec<f64>, bins: u32) -> Option<NumericProfile> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let mut edges: Vec<f64> = Vec::with_capacity(bins as usize);
    for k in 1..bins as usize {
        // Nearest-rank quantile k/bins.
        let rank = (k * n).div_ceil(bins as usize).clamp(1, n) - 1;
        let edge = values[rank];
        if edges.last().is_none_or(|last| edge > *last) {
            edges.push(edge);
        }
    }
    // An edge equal to the maximum leaves an empty top bin; drop it.
    if edges.last().is_some_and(|e| *e >= values[n - 1]) {
        edges.pop();
    }
    let mut counts = vec![0u64; edges.len() + 1];
    let mut sums = vec![0f64; edges.len() + 1];
    for v in &values {
        let bin = bin_index(&edges, *v);
        counts[bin] += 1;
        sums[bin] += v;
    }
    let means = sums
        .iter()
        .zip(&counts)
        .map(|(s, c)| if *c == 0 { 0.0 } else { s / *c as f64 })
        .collect();
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
    Some(NumericProfile {
        edges,
        counts,
        min: values[0],
        max: values[n - 1],
        mean,
        std: var.sqrt(),
        means,
    })
}

/// The bin a value falls in: the number of edges strictly below it.
pub fn bin_index(edges: &[f64], value: f64) -> usize {
    edges.partition_point(|e| *e < value)
}
