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
    /// tract's model, or why tract cannot run it (the bundle then serves on backends
    /// that can, such as onnxruntime).
    model: Result<CpuModel, String>,
}

impl OnnxModel {
    /// Parses and optimizes `bytes`, applying `declared` input shapes first (needed when
    /// the ONNX file leaves input dimensions unknown). A model tract cannot load is
    /// described from its ONNX graph instead (declared shapes applied), and says so in
    /// [`Self::tract_error`].
    pub fn load(
        onnx: fleetml_inference::Onnx<'_>,
        declared: &[TensorSpec],
    ) -> anyhow::Result<Self> {
        let bytes = onnx.model;
        // `--input-shape` gives shapes; element types stay the model's own.
        let from_graph = fleetml_inference::prepare::declared_io(bytes).ok();
        if let Some((inputs, _)) = &from_graph
            && let Some(unknown) = declared
                .iter()
                .find(|d| !inputs.iter().any(|i| i.name == d.name))
        {
            let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
            anyhow::bail!(
                "--input-shape names `{}`, which is not an input of the model (its inputs: {})",
                unknown.name,
                names.join(", ")
            );
        }
        let declared: Vec<TensorSpec> = declared
            .iter()
            .map(|d| {
                let dtype = from_graph
                    .as_ref()
                    .and_then(|(inputs, _)| inputs.iter().find(|i| i.name == d.name))
                    .map_or(d.dtype, |i| i.dtype);
                TensorSpec { dtype, ..d.clone() }
            })
            .collect();
        let declared = declared.as_slice();
        match CpuModel::load_with_inputs(onnx, declared) {
            Ok(model) => Ok(OnnxModel {
                inputs: model.inputs().to_vec(),
                outputs: model.outputs().to_vec(),
                model: Ok(model),
            }),
            Err(e) if !e.to_string().contains("without a determined fact") => {
                let (mut inputs, outputs) = fleetml_inference::prepare::declared_io(bytes)
                    .context("reading the model's inputs and outputs")?;
                for spec in &mut inputs {
                    if let Some(d) = declared.iter().find(|d| d.name == spec.name) {
                        spec.shape = d.shape.clone();
                    }
                }
                Ok(OnnxModel {
                    inputs,
                    outputs,
                    model: Err(e.to_string()),
                })
            }
            Err(_) => {
                let unshaped: Vec<String> = from_graph
                    .map(|(inputs, _)| {
                        inputs
                            .into_iter()
                            .filter(|i| !declared.iter().any(|d| d.name == i.name))
                            .map(|i| i.to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                anyhow::bail!(
                    "the model does not say the shape of every input ({}); pass --input-shape NAME=D1,D2,… for each (a symbol such as N for a dimension that varies; NAME= for a scalar)",
                    unshaped.join("; ")
                )
            }
        }
    }

    /// Why tract cannot run the model, when it cannot.
    pub fn tract_error(&self) -> Option<&str> {
        self.model.as_ref().err().map(String::as_str)
    }

    /// Runs the model on inputs given in input order.
    pub fn run(&self, inputs: &[Tensor]) -> anyhow::Result<Vec<Tensor>> {
        match &self.model {
            Ok(m) => m.run(inputs).context("running the model"),
            Err(e) => Err(anyhow::anyhow!("{e}")),
        }
    }
}

/// Parses `NAME=D1,D2,…` (each D a size or a symbol such as `N`; `NAME=` for a scalar)
/// into an input spec. Its element type is f32 here; the builder replaces it with the
/// type the model declares for that input.
pub fn parse_input_shape(arg: &str) -> Result<TensorSpec, String> {
    let (name, dims) = arg
        .split_once('=')
        .ok_or_else(|| format!("`{arg}`: expected NAME=D1,D2,… (e.g. x=N,3,48,192)"))?;
    if name.is_empty() {
        return Err(format!(
            "`{arg}`: expected NAME=D1,D2,… (e.g. x=N,3,48,192)"
        ));
    }
    if dims.trim().is_empty() {
        // A scalar input (`sr=`).
        return Ok(TensorSpec {
            name: name.to_string(),
            dtype: DType::F32,
            shape: Vec::new(),
        });
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
