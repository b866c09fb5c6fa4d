//! Estimated accuracy without labels (confidence-based performance estimation, the idea
//! of NannyML's CBPE) for classifiers.
//!
//! At build time the bundle's builder runs the model on the labelled reference, cuts the
//! predictions' confidence (the winning class's score) into quantile bins and records
//! how often the prediction was right in each bin: a calibration map. On the device, each
//! prediction's confidence is looked up in that map; the window's estimated accuracy is
//! the mean of the looked-up values. It holds while the relation between confidence and
//! correctness holds (a covariate shift, which moves inputs and so confidences, keeps
//! it; a change of the labels' meaning does not). An estimate below the limit calibrated
//! for the window size (the false-alarm-rate quantile of undrifted windows), or below an
//! explicit minimum, raises an alert.

use heapless::Vec;

use crate::{MAX_BINS, MAX_LIMITS, ReferenceError};

/// The calibration map and the per-window-size limits of one classifier.
#[derive(Debug, Clone)]
pub struct Cbpe {
    /// Upper edges of the confidence bins but the last (which is open above).
    edges: Vec<f32, MAX_BINS>,
    /// Share of right predictions in each bin on the reference.
    accuracy: Vec<f32, MAX_BINS>,
    /// Lowest estimate of an undrifted window, per window size (ascending sizes).
    limits: Vec<(u32, f64), MAX_LIMITS>,
}

impl Cbpe {
    /// `accuracy[i]` for confidences in `(edges[i-1], edges[i]]` (one more accuracy than
    /// edges); `limits` as `(window size, lowest undrifted estimate)`.
    pub fn new(
        edges: &[f64],
        accuracy: &[f64],
        limits: &[(u32, f64)],
    ) -> Result<Cbpe, ReferenceError> {
        if accuracy.len() != edges.len() + 1 || accuracy.len() > MAX_BINS {
            return Err(ReferenceError::Shape);
        }
        if edges.windows(2).any(|w| w[0] >= w[1])
            || !edges.iter().all(|e| e.is_finite())
            || !accuracy.iter().all(|a| (0.0..=1.0).contains(a))
        {
            return Err(ReferenceError::Shape);
        }
        if limits.len() > MAX_LIMITS
            || limits.windows(2).any(|w| w[0].0 >= w[1].0)
            || !limits
                .iter()
                .all(|(n, l)| *n > 0 && (0.0..=1.0).contains(l))
        {
            return Err(ReferenceError::Limits);
        }
        let mut cbpe = Cbpe {
            edges: Vec::new(),
            accuracy: Vec::new(),
            limits: Vec::new(),
        };
        for &e in edges {
            let _ = cbpe.edges.push(e as f32);
        }
        for &a in accuracy {
            let _ = cbpe.accuracy.push(a as f32);
        }
        let _ = cbpe.limits.extend_from_slice(limits);
        Ok(cbpe)
    }

    /// The chance that a prediction made with `confidence` is right.
    pub fn expected(&self, confidence: f64) -> f64 {
        let bin = self
            .edges
            .iter()
            .position(|&e| confidence <= f64::from(e))
            .unwrap_or(self.edges.len());
        f64::from(self.accuracy[bin])
    }

    /// The limit for a window of `n` predictions: between two calibrated sizes,
    /// interpolated linearly in `log n`; beyond them, the nearest size's. `None` without
    /// calibrated limits.
    pub fn limit_at(&self, n: u32) -> Option<f64> {
        let first = *self.limits.first()?;
        let last = *self.limits.last()?;
        if n <= first.0 {
            return Some(first.1);
        }
        if n >= last.0 {
            return Some(last.1);
        }
        let i = self.limits.partition_point(|l| l.0 < n);
        let (a, b) = (self.limits[i - 1], self.limits[i]);
        let t = (libm::log(f64::from(n)) - libm::log(f64::from(a.0)))
            / (libm::log(f64::from(b.0)) - libm::log(f64::from(a.0)));
        Some(a.1 + t * (b.1 - a.1))
    }
}
