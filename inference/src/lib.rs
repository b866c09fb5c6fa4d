//! `fleetml-inference` runs ONNX models on the CPU with tract. The bundle builder
//! (`fleetctl bundle build`) computes golden outputs and reference predictions with it,
//! and the agent self-tests and serves models with it: one implementation, so what a
//! device checks is what the builder computed.
//!
//! A model is parsed and optimized once, keeping a symbolic batch dimension where the
//! model allows it, and then run on batches of f32 tensors.

pub mod prepare;

use std::sync::Arc;

use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::{DType, Dim, TensorSpec};
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
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    output_names: Vec<String>,
    plan: Arc<TypedRunnableModel>,
    /// The model could not be typed with a symbolic batch and was fixed to batch 1:
    /// batches are run row by row.
    row_by_row: bool,
}

impl std::fmt::Debug for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuModel")
            .field("outputs", &self.output_names)
            .finish()
    }
}

impl CpuModel {
    /// Loads a model whose inputs declare their own shapes.
    pub fn load(onnx: &[u8]) -> Result<Self, RuntimeError> {
        Self::load_with_inputs(onnx, &[])
    }

    /// Loads a model, first fixing the f32 inputs named in `inputs` to their declared
    /// shapes (a symbolic dimension stays symbolic, e.g. the batch `N`). Models whose
    /// ONNX inputs leave dimensions unknown need this to be typed and optimized.
    ///
    /// When a model cannot be typed with a symbolic dimension (a `Reshape` computed from
    /// `Shape`, say), it is loaded again with each symbol fixed to 1 and runs batches row
    /// by row.
    pub fn load_with_inputs(onnx: &[u8], inputs: &[TensorSpec]) -> Result<Self, RuntimeError> {
        match Self::load_declared(onnx, inputs) {
            Ok(m) => Ok(m),
            Err(first)
                if inputs
                    .iter()
                    .any(|s| s.shape.iter().any(|d| matches!(d, Dim::Symbol(_)))) =>
            {
                let fixed: Vec<TensorSpec> = inputs
                    .iter()
                    .map(|s| TensorSpec {
                        shape: s
                            .shape
                            .iter()
                            .map(|d| match d {
                                Dim::Symbol(_) => Dim::Fixed(1),
                                fixed => fixed.clone(),
                            })
                            .collect(),
                        ..s.clone()
                    })
                    .collect();
                let mut m = Self::load_declared(onnx, &fixed).map_err(|_| first)?;
                m.row_by_row = true;
                // Report the declared (symbolic) shapes, not the batch-1 workaround.
                for spec in &mut m.inputs {
                    if let Some(d) = inputs.iter().find(|d| d.name == spec.name) {
                        spec.shape = d.shape.clone();
                    }
                }
                Ok(m)
            }
            Err(e) => Err(e),
        }
    }

    /// The model's inputs as typed (with declared shapes applied).
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// The model's outputs as typed.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// Whether batches run row by row (the model only types with batch 1).
    pub fn row_by_row(&self) -> bool {
        self.row_by_row
    }

    fn load_declared(onnx: &[u8], inputs: &[TensorSpec]) -> Result<Self, RuntimeError> {
        let load = |e: TractError| RuntimeError::Load(format!("{e:#}"));
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])
            .map_err(load)?;
        let outlets = model.input_outlets().map_err(load)?.to_vec();
        for (i, outlet) in outlets.iter().enumerate() {
            let name = model.node(outlet.node).name.clone();
            let Some(spec) = inputs
                .iter()
                .find(|s| s.name == name && s.dtype == DType::F32)
            else {
                continue;
            };
            let dims: TVec<TDim> = spec
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => TDim::from(*n as i64),
                    Dim::Symbol(s) => model.sym(s).into(),
                })
                .collect();
            model = model
                .with_input_fact(i, f32::fact(dims).into())
                .map_err(load)?;
        }
        let model = model.into_typed().map_err(load)?;
        let spec_of = |o: &OutletId| spec(&model, *o).map_err(load);
        let inputs = model
            .input_outlets()
            .map_err(load)?
            .iter()
            .map(spec_of)
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = model
            .output_outlets()
            .map_err(load)?
            .iter()
            .map(spec_of)
            .collect::<Result<Vec<_>, _>>()?;
        let output_names = outputs.iter().map(|o| o.name.clone()).collect();
        let plan = model
            .into_optimized()
            .map_err(load)?
            .into_runnable()
            .map_err(load)?;
        Ok(CpuModel {
            inputs,
            outputs,
            output_names,
            plan,
            row_by_row: false,
        })
    }

    /// Runs the model on `inputs` (in the model's input order).
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        if !self.row_by_row {
            return self.run_batch(inputs);
        }
        run_in_slices(inputs, 1, |slice| self.run_batch(slice))
    }

    fn run_batch(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
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

/// Runs a batch of `inputs` (rows along axis 0) through `run` in slices of `slice` rows,
/// concatenating the outputs along axis 0. For backends whose model is fixed to a batch
/// size (tract's batch-1 fallback, wonnx's static shapes).
pub fn run_in_slices(
    inputs: &[Tensor],
    slice: u64,
    mut run: impl FnMut(&[Tensor]) -> Result<Vec<Tensor>, RuntimeError>,
) -> Result<Vec<Tensor>, RuntimeError> {
    let rows = inputs
        .first()
        .and_then(|t| t.shape.first().copied())
        .unwrap_or(1);
    let slice = slice.max(1);
    if rows <= slice {
        return run(inputs);
    }
    if !rows.is_multiple_of(slice) {
        return Err(RuntimeError::Run(format!(
            "the model is fixed to batches of {slice}; {rows} rows do not divide into them"
        )));
    }
    let mut merged: Vec<Tensor> = Vec::new();
    for start in (0..rows).step_by(slice as usize) {
        let part: Vec<Tensor> = inputs
            .iter()
            .map(|t| {
                let per_row = t.data.len() / rows as usize;
                let (a, b) = (start as usize * per_row, (start + slice) as usize * per_row);
                let mut shape = t.shape.clone();
                shape[0] = slice;
                Tensor {
                    name: t.name.clone(),
                    shape,
                    data: t.data[a..b].to_vec(),
                }
            })
            .collect();
        let out = run(&part)?;
        if merged.is_empty() {
            merged = out;
        } else {
            for (acc, o) in merged.iter_mut().zip(out) {
                acc.data.extend_from_slice(&o.data);
                if let Some(first) = acc.shape.first_mut() {
                    *first += o.shape.first().copied().unwrap_or(1);
                }
            }
        }
    }
    Ok(merged)
}

fn dtype(dt: DatumType) -> TractResult<DType> {
    Ok(match dt {
        DatumType::F16 => DType::F16,
        DatumType::F32 => DType::F32,
        DatumType::F64 => DType::F64,
        DatumType::I8 => DType::I8,
        DatumType::I16 => DType::I16,
        DatumType::I32 => DType::I32,
        DatumType::I64 => DType::I64,
        DatumType::U8 => DType::U8,
        DatumType::U16 => DType::U16,
        DatumType::U32 => DType::U32,
        DatumType::U64 => DType::U64,
        DatumType::Bool => DType::Bool,
        DatumType::String => DType::String,
        other => {
            return Err(TractError::msg(format!(
                "tensor type {other:?} is not supported"
            )));
        }
    })
}

/// The spec of a typed model's outlet: its ONNX name, type and shape.
fn spec(model: &TypedModel, outlet: OutletId) -> TractResult<TensorSpec> {
    let fact = model.outlet_fact(outlet)?;
    let name = model
        .outlet_label(outlet)
        .map(str::to_string)
        .unwrap_or_else(|| model.node(outlet.node).name.clone());
    let shape = fact
        .shape
        .iter()
        .map(|d| match d.to_i64() {
            Ok(n) if n >= 0 => Dim::Fixed(n as u64),
            _ => Dim::Symbol(d.to_string()),
        })
        .collect();
    Ok(TensorSpec {
        name,
        dtype: dtype(fact.datum_type)?,
        shape,
    })
}
