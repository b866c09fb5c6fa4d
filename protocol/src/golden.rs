//! Golden vectors (`golden.cbor`): input rows with the outputs the builder computed for
//! them, so a device can self-test a model before it activates it.

use serde::{Deserialize, Serialize};

/// The most elements a golden tensor may hold.
pub const MAX_ELEMENTS: usize = 1 << 24;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    /// Largest absolute difference accepted between stored and computed outputs.
    pub abs_tolerance: f32,
    /// Largest relative difference accepted (relative to the stored value).
    pub rel_tolerance: f32,
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<Tensor>,
}

pub use crate::tensor::{Tensor, TensorData};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GoldenError {
    #[error("golden vectors are not valid CBOR for this format: {0}")]
    Malformed(String),
    #[error("golden tensor `{name}` has shape {shape:?} but {len} values")]
    ShapeMismatch {
        name: String,
        shape: Vec<u64>,
        len: usize,
    },
    #[error("golden vectors have no inputs or no outputs")]
    Empty,
    #[error("golden tolerances must be finite and not negative")]
    BadTolerance,
}

impl Golden {
    pub fn to_cbor(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("golden vectors encode to CBOR")
    }

    /// Decodes and checks golden vectors. The input is a payload whose size the manifest
    /// bounds, and serde_cbor caps preallocation, so decoding is bounded by the input.
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, GoldenError> {
        let golden: Golden =
            serde_cbor::from_slice(bytes).map_err(|e| GoldenError::Malformed(e.to_string()))?;
        if golden.inputs.is_empty() || golden.outputs.is_empty() {
            return Err(GoldenError::Empty);
        }
        for t in [golden.abs_tolerance, golden.rel_tolerance] {
            if !t.is_finite() || t < 0.0 {
                return Err(GoldenError::BadTolerance);
            }
        }
        for t in golden.inputs.iter().chain(&golden.outputs) {
            if t.check().is_err() || t.data.len() > MAX_ELEMENTS {
                return Err(GoldenError::ShapeMismatch {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    len: t.data.len(),
                });
            }
        }
        Ok(golden)
    }
}

/// How far computed outputs are from the golden ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub max_abs_error: f32,
    pub max_rel_error: f32,
    /// The worst element: output name and flat index.
    pub worst: Option<(String, usize)>,
    /// Elements outside both tolerances.
    pub failures: usize,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.failures == 0
    }
}

/// Compares `computed` outputs against the golden ones, element by element. An element
/// passes when it is within `abs_tolerance` or within `rel_tolerance` of the stored value;
/// NaN passes only against NaN. Shapes must match exactly.
pub fn compare(golden: &Golden, computed: &[Tensor]) -> Result<Comparison, String> {
    let mut cmp = Comparison {
        max_abs_error: 0.0,
        max_rel_error: 0.0,
        worst: None,
        failures: 0,
    };
    let mut worst_abs = -1.0f32;
    for expected in &golden.outputs {
        let Some(actual) = computed.iter().find(|t| t.name == expected.name) else {
            return Err(format!("the model produced no output `{}`", expected.name));
        };
        if actual.shape != expected.shape {
            return Err(format!(
                "output `{}` has shape {:?}, golden has {:?}",
                expected.name, actual.shape, expected.shape
            ));
        }
        if actual.dtype() != expected.dtype() {
            return Err(format!(
                "output `{}` is {}, golden has {}",
                expected.name,
                actual.dtype(),
                expected.dtype()
            ));
        }
        for (i, (e, a)) in expected
            .data
            .to_f32()
            .into_iter()
            .zip(actual.data.to_f32())
            .enumerate()
        {
            let (e, a) = (&e, &a);
            let (abs, rel) = if e.is_nan() && a.is_nan() {
                (0.0, 0.0)
            } else if e.is_nan() || a.is_nan() {
                (f32::INFINITY, f32::INFINITY)
            } else {
                let abs = (e - a).abs();
                let rel = if *e == 0.0 {
                    if abs == 0.0 { 0.0 } else { f32::INFINITY }
                } else {
                    abs / e.abs()
                };
                (abs, rel)
            };
            if abs > golden.abs_tolerance && rel > golden.rel_tolerance {
                cmp.failures += 1;
            }
            cmp.max_abs_error = cmp.max_abs_error.max(abs);
            if rel.is_finite() || abs > golden.abs_tolerance {
                cmp.max_rel_error = cmp.max_rel_error.max(rel);
            }
            if abs > worst_abs {
                worst_abs = abs;
                cmp.worst = Some((expected.name.clone(), i));
            }
        }
    }
    Ok(cmp)
}
