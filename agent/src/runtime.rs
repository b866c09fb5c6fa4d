//! CPU inference with tract. The model is parsed and optimized once, keeping a symbolic
//! batch dimension, and then run on batches of f32 tensors.

use std::sync::Arc;

use fleetml_protocol::golden::Tensor;
use tract_onnx::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("tract cannot load the model: {0}")]
    Load(String),
    #[error("input `{name}` has shape {shape:?} but {len} values")]
    BadInput {
        name: String,
        shape: Vec<u64>,
        len: usize,
    },
    #[error("the model failed to run: {0}")]
    Run(String),
}

/// A loaded model, ready to run.
pub struct CpuModel {
    output_names: Vec<String>,
    plan: Arc<TypedRunnableModel>,
}

impl std::fmt::Debug for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuModel")
            .field("outputs", &self.output_names)
            .finish()
    }
}

impl CpuModel {
    pub fn load(onnx: &[u8]) -> Result<Self, RuntimeError> {
        let load = |e: TractError| RuntimeError::Load(format!("{e:#}"));
        let model = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])
            .map_err(load)?;
        let model = model.into_typed().map_err(load)?;
        let output_names = model
            .output_outlets()
            .map_err(load)?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        let plan = model
            .into_optimized()
            .map_err(load)?
            .into_runnable()
            .map_err(load)?;
        Ok(CpuModel { output_names, plan })
    }

    /// Runs the model on `inputs` (in the model's input order).
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        let mut values = TVec::new();
        for t in inputs {
            let shape: Vec<usize> = t.shape.iter().map(|d| *d as usize).collect();
            let tensor =
                tract_onnx::prelude::Tensor::from_shape(&shape, &t.data).map_err(|_| {
                    RuntimeError::BadInput {
                        name: t.name.clone(),
                        shape: t.shape.clone(),
                        len: t.data.len(),
                    }
                })?;
            values.push(tensor.into_tvalue());
        }
        let run = |e: TractError| RuntimeError::Run(format!("{e:#}"));
        let outputs = self.plan.run(values).map_err(run)?;
        outputs
            .iter()
            .zip(&self.output_names)
            .map(|(v, name)| {
                let v = v.cast_to::<f32>().map_err(run)?;
                let view = v.to_plain_array_view::<f32>().map_err(run)?;
                Ok(Tensor {
                    name: name.clone(),
                    shape: v.shape().iter().map(|d| *d as u64).collect(),
                    data: view.iter().copied().collect(),
                })
            })
            .collect()
    }
}
