//! Per-prediction explanations by occlusion.
//!
//! For a prediction on row `x` with score `s(x)` — the predicted class's output for a
//! classifier (arg-max of the first output), the first output value otherwise — the
//! attribution of feature `i` is `s(x) − s(x with feature i set to its baseline)`, the
//! baseline being the reference profile's median (numeric) or most frequent category.
//! Model-agnostic: it needs only the backend. Cost: one extra inference of a batch of
//! F rows (F = number of features) per explained row.

use fleetml_protocol::features::{FeatureSchema, RawValue};
use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::TensorSpec;
use fleetml_protocol::reference::argmax;

use crate::backend::Backend;
use crate::runtime::RuntimeError;

/// How explanations are computed, as reported in responses.
pub const METHOD: &str = "occlusion: score minus the score with the feature set to its reference baseline (median, or most frequent category); one extra batch of F rows per explained row";

/// Attributions of every feature (schema order) for each of `rows`, whose model
/// `outputs` are known.
pub fn occlusion(
    backend: &dyn Backend,
    schema: &FeatureSchema,
    inputs: &[TensorSpec],
    rows: &[Vec<RawValue>],
    outputs: &[Tensor],
    baselines: &[RawValue],
) -> Result<Vec<Vec<f64>>, RuntimeError> {
    let Some(first) = outputs.first() else {
        return Ok(Vec::new());
    };
    let first = first.data.to_f32();
    let per_row = first.len() / rows.len().max(1);
    let features = schema.features.len();
    let mut all = Vec::with_capacity(rows.len());
    for (r, row) in rows.iter().enumerate() {
        let scores = &first[r * per_row..(r + 1) * per_row];
        let class = if per_row > 1 {
            argmax(scores).unwrap_or(0)
        } else {
            0
        };
        let score = scores.get(class).copied().unwrap_or(f32::NAN) as f64;
        let occluded: Vec<Vec<RawValue>> = (0..features)
            .map(|i| {
                let mut x = row.clone();
                if let Some(b) = baselines.get(i) {
                    x[i] = b.clone();
                }
                x
            })
            .collect();
        let batch = schema.encode_batch(inputs, &occluded);
        let out = backend.run(&batch)?;
        let Some(o) = out.first() else {
            return Err(RuntimeError::Run("the model returned no output".into()));
        };
        let o = o.data.to_f32();
        let width = o.len() / features.max(1);
        all.push(
            (0..features)
                .map(|i| {
                    let s = o.get(i * width + class).copied().unwrap_or(f32::NAN) as f64;
                    score - s
                })
                .collect(),
        );
    }
    Ok(all)
}
