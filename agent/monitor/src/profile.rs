//! The monitor's inputs from a bundle's reference profile (feature `profile`, std): a
//! feature's [`Reference`] with its calibrated [`Limit`]s, and a raw value as an
//! [`Observation`]. The agent monitors with these and the bundle builder calibrates
//! thresholds with them, so both compute the same statistics on the same bins.

use std::format;
use std::string::{String, ToString};
use std::vec::Vec;

use fleetml_protocol::features::{FeatureType, RawValue};
use fleetml_protocol::reference::{Calibration, FeatureProfile, NumericProfile};

use crate::{Limit, Observation, Reference, ReferenceError};

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
