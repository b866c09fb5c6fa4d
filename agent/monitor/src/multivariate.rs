//! Multivariate drift: the reconstruction error of a principal-component model of the
//! numeric features, fitted on the reference when the bundle was built.
//!
//! Each row's numeric features are standardized with the reference's means and standard
//! deviations (a missing value is replaced by the mean, so it adds nothing), projected
//! onto the kept components, and the Euclidean distance between the row and its
//! reconstruction from them is the row's error. Rows whose features keep the reference's
//! correlations are reconstructed about as well as the reference rows were; a change in
//! how features move together (marginals unchanged) moves weight onto the dropped
//! components and the error grows. The error is watched as one more numeric series
//! against its reference distribution, with its own calibrated thresholds.

use heapless::Vec;

use crate::{MAX_FEATURES, Observation, ReferenceError};

/// Principal components one monitor keeps.
pub const MAX_COMPONENTS: usize = 8;

/// A fitted principal-component model: which features go in, how they are standardized,
/// and the kept components (orthonormal rows).
#[derive(Debug, Clone)]
pub struct Pca {
    /// The features fed to it, by index in the monitor's feature order.
    inputs: Vec<u8, MAX_FEATURES>,
    mean: Vec<f64, MAX_FEATURES>,
    /// 1 / standard deviation (0 for a constant feature: it is left out).
    scale: Vec<f64, MAX_FEATURES>,
    /// Component `j`'s loading of input `i` at `j * inputs + i`.
    components: Vec<f32, { MAX_COMPONENTS * MAX_FEATURES }>,
}

impl Pca {
    /// `inputs[i]` is the monitor feature index of input `i`, standardized with `mean[i]`
    /// and `std[i]`; `components` are the kept components, each with one loading per
    /// input.
    pub fn new<C: AsRef<[f64]>>(
        inputs: &[usize],
        mean: &[f64],
        std: &[f64],
        components: &[C],
    ) -> Result<Pca, ReferenceError> {
        let d = inputs.len();
        if d == 0 || d > MAX_FEATURES || mean.len() != d || std.len() != d {
            return Err(ReferenceError::Shape);
        }
        if components.is_empty() || components.len() > MAX_COMPONENTS {
            return Err(ReferenceError::Shape);
        }
        let finite = |x: &f64| x.is_finite();
        if !mean.iter().all(finite) || !std.iter().all(|s| s.is_finite() && *s >= 0.0) {
            return Err(ReferenceError::Shape);
        }
        let mut pca = Pca {
            inputs: Vec::new(),
            mean: Vec::new(),
            scale: Vec::new(),
            components: Vec::new(),
        };
        for (&i, (&m, &s)) in inputs.iter().zip(mean.iter().zip(std)) {
            let i = u8::try_from(i).map_err(|_| ReferenceError::Shape)?;
            let _ = pca.inputs.push(i);
            let _ = pca.mean.push(m);
            let _ = pca.scale.push(if s > 0.0 { 1.0 / s } else { 0.0 });
        }
        for c in components {
            let c = c.as_ref();
            if c.len() != d || !c.iter().all(finite) {
                return Err(ReferenceError::Shape);
            }
            for &x in c {
                let _ = pca.components.push(x as f32);
            }
        }
        Ok(pca)
    }

    /// Components kept.
    pub fn components(&self) -> usize {
        self.components.len() / self.inputs.len()
    }

    /// The reconstruction error of one row (`values` in the monitor's feature order):
    /// the length of what the kept components leave of the standardized row, computed
    /// as that residual (not as a difference of squared lengths, which loses the small
    /// errors to rounding). `None` when the row has none of the inputs (a raw-tensor
    /// request, or every input missing): the error is then missing, not 0.
    pub fn error(&self, values: &[Observation]) -> Option<f64> {
        let d = self.inputs.len();
        let mut z = [0.0f64; MAX_FEATURES];
        let mut present = false;
        for (k, &i) in self.inputs.iter().enumerate() {
            if let Some(Observation::Number(x)) = values.get(usize::from(i))
                && x.is_finite()
            {
                z[k] = (x - self.mean[k]) * self.scale[k];
                present = true;
            }
        }
        if !present {
            return None;
        }
        let mut projections = [0.0f64; MAX_COMPONENTS];
        for (p, c) in projections.iter_mut().zip(self.components.chunks_exact(d)) {
            *p = c.iter().zip(&z[..d]).map(|(a, b)| f64::from(*a) * b).sum();
        }
        let mut residual = 0.0;
        for (k, zk) in z[..d].iter().enumerate() {
            let back: f64 = projections
                .iter()
                .zip(self.components.chunks_exact(d))
                .map(|(p, c)| p * f64::from(c[k]))
                .sum();
            residual += (zk - back) * (zk - back);
        }
        let error = libm::sqrt(residual);
        error.is_finite().then_some(error)
    }
}
