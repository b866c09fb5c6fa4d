//! Loading an ONNX model with tract, to check it and to compute its outputs at build time.

use anyhow::{Context, anyhow};
use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::{DType, Dim, TensorSpec};
use tract_onnx::prelude::*;

/// A parsed, optimized model with its declared inputs and outputs.
pub struct OnnxModel {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    plan: std::sync::Arc<TypedRunnableModel>,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

fn dtype(dt: DatumType) -> anyhow::Result<DType> {
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
        other => return Err(anyhow!("tensor type {other:?} is not supported")),
    })
}

fn spec(model: &TypedModel, outlet: OutletId) -> anyhow::Result<TensorSpec> {
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

impl OnnxModel {
    /// Parses and optimizes `bytes`. Symbolic dimensions (a batch `N`) stay symbolic.
    pub fn load(bytes: &[u8]) -> anyhow::Result<Self> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| anyhow!("{e:#}"))
            .context("parsing the ONNX model")?
            .into_typed()
            .map_err(|e| anyhow!("{e:#}"))
            .context("inferring the model's types and shapes")?;
        let inputs = model
            .input_outlets()?
            .iter()
            .map(|o| spec(&model, *o))
            .collect::<anyhow::Result<_>>()?;
        let outputs = model
            .output_outlets()?
            .iter()
            .map(|o| spec(&model, *o))
            .collect::<anyhow::Result<_>>()?;
        let plan = model
            .into_optimized()
            .map_err(|e| anyhow!("{e:#}"))
            .context("optimizing the model")?
            .into_runnable()
            .map_err(|e| anyhow!("{e:#}"))?;
        Ok(OnnxModel {
            inputs,
            outputs,
            plan,
        })
    }

    /// Runs the model on f32 inputs given in input order; returns every output as f32.
    pub fn run(&self, inputs: &[Tensor]) -> anyhow::Result<Vec<Tensor>> {
        let mut values = TVec::new();
        for t in inputs {
            let shape: Vec<usize> = t.shape.iter().map(|d| *d as usize).collect();
            let tensor = tract_onnx::prelude::Tensor::from_shape(&shape, &t.data)
                .with_context(|| format!("input `{}` does not match its shape", t.name))?;
            values.push(tensor.into_tvalue());
        }
        let outputs = self
            .plan
            .run(values)
            .map_err(|e| anyhow!("{e:#}"))
            .context("running the model")?;
        outputs
            .iter()
            .zip(&self.outputs)
            .map(|(v, spec)| {
                let v = v.cast_to::<f32>().map_err(|e| anyhow!("{e:#}"))?;
                let view = v
                    .to_plain_array_view::<f32>()
                    .map_err(|e| anyhow!("{e:#}"))?;
                Ok(Tensor {
                    name: spec.name.clone(),
                    shape: v.shape().iter().map(|d| *d as u64).collect(),
                    data: view.iter().copied().collect(),
                })
            })
            .collect()
    }
}
