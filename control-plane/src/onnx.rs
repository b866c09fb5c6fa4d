//! Loading an ONNX model at build time, with the same inference code the agent runs.

use anyhow::Context;
use fleetml_inference::CpuModel;
use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::{DType, Dim, TensorSpec};

/// A parsed, optimized model with its declared inputs and outputs.
#[derive(Debug)]
pub struct OnnxModel {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    model: CpuModel,
}

impl OnnxModel {
    /// Parses and optimizes `bytes`, applying `declared` input shapes first (needed when
    /// the ONNX file leaves input dimensions unknown).
    pub fn load(bytes: &[u8], declared: &[TensorSpec]) -> anyhow::Result<Self> {
        let model =
            CpuModel::load_with_inputs(bytes, declared).context("loading the model with tract")?;
        Ok(OnnxModel {
            inputs: model.inputs().to_vec(),
            outputs: model.outputs().to_vec(),
            model,
        })
    }

    /// Runs the model on f32 inputs given in input order; returns every output as f32.
    pub fn run(&self, inputs: &[Tensor]) -> anyhow::Result<Vec<Tensor>> {
        self.model.run(inputs).context("running the model")
    }
}

/// Parses `NAME=D1,D2,…` (each D a size or a symbol such as `N`) into an f32 input spec.
pub fn parse_input_shape(arg: &str) -> Result<TensorSpec, String> {
    let (name, dims) = arg
        .split_once('=')
        .ok_or_else(|| format!("`{arg}`: expected NAME=D1,D2,… (e.g. x=N,3,48,192)"))?;
    if name.is_empty() || dims.is_empty() {
        return Err(format!(
            "`{arg}`: expected NAME=D1,D2,… (e.g. x=N,3,48,192)"
        ));
    }
    let shape = dims
        .split(',')
        .map(|d| {
            let d = d.trim();
            match d.parse::<u64>() {
                Ok(n) => Ok(Dim::Fixed(n)),
                Err(_)
                    if !d.is_empty()
                        && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                {
                    Ok(Dim::Symbol(d.to_string()))
                }
                Err(_) => Err(format!("`{arg}`: `{d}` is neither a size nor a symbol")),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TensorSpec {
        name: name.to_string(),
        dtype: DType::F32,
        shape,
    })
}
