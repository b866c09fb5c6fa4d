//! The monitor's inputs from a bundle's reference profile (feature `profile`, std): a
//! feature's [`Reference`] with its calibrated [`Limit`]s, and a raw value as an
//! [`Observation`]. The agent monitors with these and the bundle builder calibrates
//! thresholds with them, so both compute the same statistics on the same bins.

use std::format;
use std::string::{String, ToString};
use std::vec::Vec;

use fleetml_protocol::features::{FeatureSchema, FeatureType, RawValue};
use fleetml_protocol::reference::{
    Calibration, FeatureProfile, Multivariate, NumericProfile, Performance, RECONSTRUCTION_ERROR,
    ReferenceProfile,
};

use crate::{
    Cbpe, Limit, Monitor, Observation, Pca, Reference, ReferenceError, Thresholds, WindowConfig,
};

/// The references of the features `names` (the monitor's order) of `profile`, each with
/// its calibrated thresholds.
pub fn references(profile: &ReferenceProfile, names: &[&str]) -> Result<Vec<Reference>, String> {
    names
        .iter()
        .map(|name| {
            let p = profile
                .features
                .iter()
                .find(|p| p.name == *name)
                .ok_or_else(|| format!("the reference profile has no feature `{name}`"))?;
            feature(p)?
                .with_limits(&limits(profile.calibration.as_ref(), name))
                .map_err(|e| format!("feature `{name}`: {e}"))
        })
        .collect()
}

/// The monitor of the features `names` of `profile` (and of the predictions against
/// `prediction`), with the reconstruction error when the profile has a multivariate
/// reference: what the agent runs, and what the builder's tests and benchmarks run.
pub fn monitor(
    profile: &ReferenceProfile,
    names: &[&str],
    prediction: Option<Reference>,
    config: WindowConfig,
    thresholds: Thresholds,
) -> Result<Monitor, String> {
    let mut monitor = Monitor::new(&references(profile, names)?, prediction, config, thresholds)
        .map_err(|e| e.to_string())?;
    if let Some(m) = &profile.multivariate {
        let (pca, error) = multivariate(m, names, profile.calibration.as_ref())?;
        monitor = monitor.with_multivariate(pca, error);
    }
    Ok(monitor)
}

/// A numeric profile's reference (a feature's, or a regressor's score's).
pub fn numeric(n: &NumericProfile) -> Result<Reference, ReferenceError> {
    Reference::numeric(&n.edges, &n.counts, &n.means, (n.min, n.max), n.std)
}

/// A classifier's predicted classes: `class_counts` from the profile, and "other" (a
/// class index the reference never saw).
pub fn classes(class_counts: &[u64]) -> Result<Reference, ReferenceError> {
    let mut counts = class_counts.to_vec();
    counts.push(0);
    Reference::categorical(&counts)
}

/// A profiled feature's reference: its quantile bins, or its categories and "other".
pub fn feature(p: &FeatureProfile) -> Result<Reference, String> {
    let r = match (&p.numeric, &p.categorical) {
        (Some(n), _) => numeric(n),
        (None, Some(c)) => {
            let mut counts = c.counts.clone();
            counts.push(c.other);
            Reference::categorical(&counts)
        }
        (None, None) => {
            return Err(format!(
                "the reference profile of `{}` has no distribution",
                p.name
            ));
        }
    };
    r.map_err(|e| format!("feature `{}`: {e}", p.name))
}

/// The thresholds `calibration` holds for subject `name` (a feature, or `prediction`),
/// one per window size; none without.
pub fn limits(calibration: Option<&Calibration>, name: &str) -> Vec<Limit> {
    let Some(c) = calibration else {
        return Vec::new();
    };
    c.limits
        .iter()
        .find(|l| l.name == name)
        .map(|l| {
            c.sizes
                .iter()
                .enumerate()
                .map(|(i, size)| Limit {
                    size: *size,
                    psi: l.psi[i],
                    js: l.js[i],
                    chi2_p: l.chi2_p.get(i).copied().unwrap_or(0.0),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A row's raw values (schema order) as the monitor observes them; absent ones are
/// missing.
pub fn observations(schema: &FeatureSchema, row: &[RawValue]) -> Vec<Observation> {
    schema
        .features
        .iter()
        .enumerate()
        .map(|(i, f)| observe(f.kind, &f.values, row.get(i).unwrap_or(&RawValue::Missing)))
        .collect()
}

/// A raw value of a feature of `kind` (with `values`, its categories) as the monitor
/// observes it. A number given for a category is looked up by its text, as the reference
/// profile counted it (a JSON `2` for the category "2").
pub fn observe(kind: FeatureType, values: &[String], v: &RawValue) -> Observation {
    let category = |key: &str| {
        values
            .iter()
            .position(|x| x == key)
            .map_or(Observation::Unseen, Observation::Category)
    };
    match (kind, v) {
        (_, RawValue::Missing) => Observation::Missing,
        (FeatureType::Category, RawValue::Text(s)) => category(s),
        (FeatureType::Category, RawValue::Number(x)) => category(&x.to_string()),
        (_, RawValue::Number(x)) => Observation::Number(*x),
        (_, RawValue::Text(_)) => Observation::Missing,
    }
}

/// The multivariate monitor of a profile: its principal-component model over the
/// features named in `features` (the monitor's feature order) and the reference of the
/// reconstruction error, with its calibrated thresholds.
pub fn multivariate(
    m: &Multivariate,
    features: &[&str],
    calibration: Option<&Calibration>,
) -> Result<(Pca, Reference), String> {
    let inputs = m
        .features
        .iter()
        .map(|name| {
            features.iter().position(|f| f == name).ok_or_else(|| {
                format!("the multivariate reference names `{name}`, not in the schema")
            })
        })
        .collect::<Result<Vec<usize>, String>>()?;
    let pca = Pca::new(&inputs, &m.means, &m.stds, &m.components)
        .map_err(|e| format!("the multivariate reference: {e}"))?;
    let reference = numeric(&m.error)
        .and_then(|r| r.with_limits(&limits(calibration, RECONSTRUCTION_ERROR)))
        .map_err(|e| format!("the reconstruction error's reference: {e}"))?;
    Ok((pca, reference))
}

/// A classifier's calibration map and limits, as the monitor holds them.
pub fn performance(p: &Performance) -> Result<Cbpe, String> {
    let limits: Vec<(u32, f64)> = p
        .sizes
        .iter()
        .copied()
        .zip(p.lower.iter().copied())
        .collect();
    Cbpe::new(&p.edges, &p.accuracy, &limits).map_err(|e| format!("the calibration map: {e}"))
}

/// The confidence of one classification: its winning class's score (`None` for fewer
/// than two classes or no finite score).
pub fn confidence(scores: &[f32]) -> Option<f64> {
    if scores.len() < 2 {
        return None;
    }
    scores
        .iter()
        .filter(|s| s.is_finite())
        .map(|s| f64::from(*s))
        .max_by(f64::total_cmp)
}
