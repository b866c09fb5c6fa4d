//! `fleetml-inference` runs ONNX models on the CPU with tract. The bundle builder
//! (`fleetctl bundle build`) computes golden outputs and reference predictions with it,
//! and the agent self-tests and serves models with it: one implementation, so what a
//! device checks is what the builder computed.
//!
//! A model is parsed and typed once, keeping its symbolic dimensions (batch, height,
//! width, sequence), and optimized for each concrete input shape it is run on; inputs
//! and outputs are tensors of any element type real models use (f32, f16, f64, i8, i32,
//! i64, u8, bool).

pub mod external;
#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
pub mod prepare;

pub use external::{ExternalFiles, Onnx};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fleetml_protocol::golden::{Tensor, TensorData};
use fleetml_protocol::manifest::{DType, Dim, TensorSpec};
use tract_onnx::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Load(String),
    #[error("input `{name}` has shape {shape:?} but {len} values")]
    BadInput {
        name: String,
        shape: Vec<u64>,
        len: usize,
    },
    #[error("the model failed to run: {0}")]
    Run(String),
    #[error("the model cannot run on this backend: {0}")]
    Unsupported(String),
}

/// Runs tract's matrix products and elementwise kernels on a pool of `threads`
/// threads (process-wide). Returns false when this build cannot (feature
/// `tract-threads` off); one thread (the default) runs each request on its caller.
pub fn set_tract_threads(threads: usize) -> bool {
    #[cfg(feature = "tract-threads")]
    {
        use tract_linalg::multithread::{Executor, set_default_executor};
        set_default_executor(if threads > 1 {
            Executor::multithread_with_name(threads, "tract")
        } else {
            Executor::SingleThread
        });
        true
    }
    #[cfg(not(feature = "tract-threads"))]
    {
        threads <= 1
    }
}

/// Parses `onnx` into tract's graph, its external data (if any) copied in.
fn parse(onnx: Onnx<'_>) -> Result<InferenceModel, RuntimeError> {
    let proto = external::inline(onnx)
        .map_err(|e| RuntimeError::Load(format!("tract cannot load the model: {e}")))?;
    tract_onnx::onnx()
        .model_for_proto_model(&proto)
        .map_err(|e| RuntimeError::Load(format!("tract cannot load the model: {e:#}")))
}

/// Plans kept per model for concrete input shapes (least recently used evicted).
pub const PLANS_PER_MODEL: usize = 8;

type Plan = Arc<TypedRunnableModel>;

/// A loaded model, ready to run.
///
/// Models with symbolic dimensions (a batch `N`, an image's height and width, a
/// sequence length) are typed once with the symbols, and each concrete input shape a
/// request brings gets its own optimized plan, built on first use and kept in a small
/// cache ([`PLANS_PER_MODEL`]). tract optimizes a concrete shape far better than a
/// symbolic one, and some graphs (PP-OCR's) only run once their shapes are concrete.
pub struct CpuModel {
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    output_names: Vec<String>,
    /// The typed, decluttered model with its symbols, when it has any.
    typed: Option<TypedModel>,
    /// For each input, the symbol at each axis (None where the axis is fixed or an
    /// expression).
    symbols: Vec<Vec<Option<Symbol>>>,
    /// The plan of a model without symbols.
    fixed: Option<Plan>,
    /// A model tract only types at concrete shapes: the parsed graph and the declared
    /// inputs, typed and optimized anew for each shape.
    per_shape: Option<(InferenceModel, Vec<TensorSpec>)>,
    plans: Mutex<Vec<(Vec<Vec<u64>>, Plan)>>,
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
    pub fn load<'a>(onnx: impl Into<Onnx<'a>>) -> Result<Self, RuntimeError> {
        Self::load_with_inputs(onnx, &[])
    }

    /// Loads a model, first fixing the inputs named in `inputs` to their declared
    /// types and shapes (a symbolic dimension stays symbolic, e.g. the batch `N`).
    /// Models whose ONNX inputs leave dimensions unknown need this to be typed.
    ///
    /// When a model cannot be typed with a symbolic dimension (a `Reshape` computed from
    /// `Shape`, say), it is loaded again with each symbol fixed to 1 and runs batches row
    /// by row.
    pub fn load_with_inputs<'a>(
        onnx: impl Into<Onnx<'a>>,
        inputs: &[TensorSpec],
    ) -> Result<Self, RuntimeError> {
        let onnx = onnx.into();
        match Self::load_declared(onnx, inputs) {
            Ok(m) => Ok(m),
            Err(first)
                if inputs
                    .iter()
                    .any(|s| s.shape.iter().any(|d| matches!(d, Dim::Symbol(_)))) =>
            {
                // tract cannot type the graph with these symbols (PP-OCR's detector with
                // a symbolic height and width): check that it types at all with every
                // symbol at 1, then type it anew for each concrete shape it is run on.
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
                let source = parse(onnx)?;
                m.per_shape = Some((source, inputs.to_vec()));
                m.fixed = None;
                // Report the declared (symbolic) shapes, not the shape it was checked at.
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

    /// Whether the model is typed anew for each concrete shape (tract cannot type it
    /// with its symbols).
    pub fn typed_per_shape(&self) -> bool {
        self.per_shape.is_some()
    }

    fn load_declared(onnx: Onnx<'_>, inputs: &[TensorSpec]) -> Result<Self, RuntimeError> {
        let load =
            |e: TractError| RuntimeError::Load(format!("tract cannot load the model: {e:#}"));
        let mut model = parse(onnx)?;
        if let Some(node) = model
            .nodes()
            .iter()
            .find(|n| n.op.name().starts_with("Unimplemented("))
        {
            let op = node.op.name();
            let op = op
                .trim_start_matches("Unimplemented(")
                .trim_end_matches(')');
            return Err(RuntimeError::Unsupported(format!(
                "tract has no implementation of operator `{op}` (node `{}`)",
                node.name
            )));
        }
        let outlets = model.input_outlets().map_err(load)?.to_vec();
        for (i, outlet) in outlets.iter().enumerate() {
            let name = model.node(outlet.node).name.clone();
            let Some(spec) = inputs.iter().find(|s| s.name == name) else {
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
            let fact = InferenceFact::dt_shape(datum_type(spec.dtype).map_err(load)?, dims);
            model = model.with_input_fact(i, fact).map_err(load)?;
        }
        let model = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(load)?;
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
        let mut symbols = Vec::new();
        for outlet in model.input_outlets().map_err(load)? {
            let fact = model.outlet_fact(*outlet).map_err(load)?;
            symbols.push(
                fact.shape
                    .iter()
                    .map(|d| match d {
                        TDim::Sym(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            );
        }
        let symbolic = symbols.iter().flatten().any(Option::is_some);
        let (typed, fixed) = if symbolic {
            (Some(model), None)
        } else {
            let plan = model
                .into_optimized()
                .and_then(|m| m.into_runnable())
                .map_err(load)?;
            (None, Some(plan))
        };
        Ok(CpuModel {
            inputs,
            outputs,
            output_names,
            typed,
            symbols,
            fixed,
            per_shape: None,
            plans: Mutex::new(Vec::new()),
        })
    }

    /// The plan for inputs of these shapes: the model's own when it has no symbols,
    /// else the cached plan for these shapes, optimized on first use.
    fn plan(&self, shapes: Vec<Vec<u64>>) -> Result<Plan, RuntimeError> {
        if let Some(plan) = &self.fixed {
            return Ok(plan.clone());
        }
        {
            let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = plans.iter().position(|(s, _)| *s == shapes) {
                let hit = plans.remove(i);
                let plan = hit.1.clone();
                plans.push(hit);
                return Ok(plan);
            }
        }
        let run = |e: TractError| RuntimeError::Run(format!("{e:#}"));
        let plan = match (&self.typed, &self.per_shape) {
            (_, Some((source, declared))) => {
                let mut model = source.clone();
                let outlets = model.input_outlets().map_err(run)?.to_vec();
                for (i, outlet) in outlets.iter().enumerate() {
                    let name = model.node(outlet.node).name.clone();
                    let (Some(spec), Some(shape)) = (
                        declared.iter().find(|s| s.name == name),
                        self.inputs
                            .iter()
                            .position(|s| s.name == name)
                            .and_then(|k| shapes.get(k)),
                    ) else {
                        continue;
                    };
                    let dims: TVec<TDim> = shape.iter().map(|n| TDim::from(*n as i64)).collect();
                    let fact = InferenceFact::dt_shape(datum_type(spec.dtype).map_err(run)?, dims);
                    model = model.with_input_fact(i, fact).map_err(run)?;
                }
                model
                    .into_optimized()
                    .and_then(|m| m.into_runnable())
                    .map_err(run)?
            }
            (Some(typed), None) => self.concretized(typed, &shapes)?,
            (None, None) => return Err(RuntimeError::Run("the model has no plan".into())),
        };
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if plans.len() >= PLANS_PER_MODEL {
            plans.remove(0);
        }
        plans.push((shapes, plan.clone()));
        Ok(plan)
    }

    /// `typed` with its symbols set from the inputs' concrete `shapes`, optimized.
    fn concretized(&self, typed: &TypedModel, shapes: &[Vec<u64>]) -> Result<Plan, RuntimeError> {
        let mut values: HashMap<Symbol, TDim> = HashMap::new();
        for (axes, shape) in self.symbols.iter().zip(shapes) {
            for (sym, n) in axes.iter().zip(shape) {
                if let Some(sym) = sym {
                    let n = TDim::from(*n as i64);
                    match values.get(sym) {
                        Some(v) if *v != n => {
                            return Err(RuntimeError::Run(format!(
                                "dimension `{sym}` is {v} in one input and {n} in another"
                            )));
                        }
                        _ => {
                            values.insert(sym.clone(), n);
                        }
                    }
                }
            }
        }
        let run = |e: TractError| RuntimeError::Run(format!("{e:#}"));
        typed
            .set_symbols(&values)
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(run)
    }

    /// Makes ready what running inputs of these shapes needs, once: the plan for them,
    /// optimized on first use and cached. A caller that times runs calls this first, so
    /// that its figure is the run and not the one-off optimization.
    pub fn prepare(&self, inputs: &[Tensor]) -> Result<(), RuntimeError> {
        self.plan(inputs.iter().map(|t| t.shape.clone()).collect())
            .map(|_| ())
    }

    /// Runs the model on `inputs` (in the model's input order).
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        let mut values = TVec::new();
        for t in inputs {
            values.push(to_tract(t)?.into_tvalue());
        }
        let plan = self.plan(inputs.iter().map(|t| t.shape.clone()).collect())?;
        let run = |e: TractError| RuntimeError::Run(format!("{e:#}"));
        let outputs = plan.run(values).map_err(run)?;
        outputs
            .iter()
            .zip(&self.output_names)
            .map(|(v, name)| from_tract(name, v).map_err(run))
            .collect()
    }
}

/// A request tensor as tract's.
fn to_tract(t: &Tensor) -> Result<tract_onnx::prelude::Tensor, RuntimeError> {
    let shape: Vec<usize> = t.shape.iter().map(|d| *d as usize).collect();
    let bad = |_| RuntimeError::BadInput {
        name: t.name.clone(),
        shape: t.shape.clone(),
        len: t.data.len(),
    };
    use tract_onnx::prelude::Tensor as T;
    match &t.data {
        TensorData::F32(v) => T::from_shape(&shape, v),
        TensorData::F16(v) => {
            let v: Vec<f16> = v.iter().map(|b| f16::from_bits(*b)).collect();
            T::from_shape(&shape, &v)
        }
        TensorData::F64(v) => T::from_shape(&shape, v),
        TensorData::I8(v) => T::from_shape(&shape, v),
        TensorData::I32(v) => T::from_shape(&shape, v),
        TensorData::I64(v) => T::from_shape(&shape, v),
        TensorData::U8(v) => T::from_shape(&shape, v),
        TensorData::Bool(v) => T::from_shape(&shape, v),
    }
    .map_err(bad)
}

/// A tract output as a tensor of the same element type (types fleetml does not carry
/// are widened: u16/u32/i16 to i64 or i32, u64 to i64 where it fits).
fn from_tract(name: &str, v: &TValue) -> TractResult<Tensor> {
    fn plain<T: Datum + Copy>(v: &TValue) -> TractResult<Vec<T>> {
        Ok(v.to_plain_array_view::<T>()?.iter().copied().collect())
    }
    let data = match v.datum_type() {
        DatumType::F32 => TensorData::F32(plain(v)?),
        DatumType::F16 => TensorData::F16(plain::<f16>(v)?.iter().map(|h| h.to_bits()).collect()),
        DatumType::F64 => TensorData::F64(plain(v)?),
        DatumType::I8 => TensorData::I8(plain(v)?),
        DatumType::I32 => TensorData::I32(plain(v)?),
        DatumType::I64 => TensorData::I64(plain(v)?),
        DatumType::U8 => TensorData::U8(plain(v)?),
        DatumType::Bool => TensorData::Bool(plain(v)?),
        DatumType::I16 | DatumType::U16 => {
            TensorData::I32(plain(&v.cast_to::<i32>()?.into_owned().into_tvalue())?)
        }
        DatumType::U32 | DatumType::U64 => {
            TensorData::I64(plain(&v.cast_to::<i64>()?.into_owned().into_tvalue())?)
        }
        _ => TensorData::F32(plain(&v.cast_to::<f32>()?.into_owned().into_tvalue())?),
    };
    Ok(Tensor {
        name: name.to_string(),
        shape: v.shape().iter().map(|d| *d as u64).collect(),
        data,
    })
}

fn datum_type(dt: DType) -> TractResult<DatumType> {
    Ok(match dt {
        DType::F16 => DatumType::F16,
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        DType::I8 => DatumType::I8,
        DType::I16 => DatumType::I16,
        DType::I32 => DatumType::I32,
        DType::I64 => DatumType::I64,
        DType::U8 => DatumType::U8,
        DType::U16 => DatumType::U16,
        DType::U32 => DatumType::U32,
        DType::U64 => DatumType::U64,
        DType::Bool => DatumType::Bool,
        DType::String => DatumType::String,
    })
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
            .map(|t| t.rows(start, start + slice))
            .collect();
        let out = run(&part)?;
        if merged.is_empty() {
            merged = out;
        } else {
            for (acc, o) in merged.iter_mut().zip(out) {
                if !acc.data.extend(&o.data) {
                    return Err(RuntimeError::Run(format!(
                        "output `{}` changed type between slices",
                        o.name
                    )));
                }
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

#[cfg(all(test, feature = "tract-threads"))]
mod tract_threads {
    use super::*;

    /// tract splits matrix products by rows of panels: two threads compute exactly
    /// what one computes.
    #[test]
    fn tract_threads_compute_what_one_thread_computes() {
        // The directory cargo names at run time (the compiled-in one may be another
        // checkout's sharing the target directory).
        let dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
            || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
            std::path::PathBuf::from,
        );
        let path = dir.join("../models/claims/model.onnx");
        let model = CpuModel::load(&std::fs::read(path).expect("claims model")).expect("loads");
        let rows = 512u64;
        let data: Vec<f32> = (0..rows * 25)
            .map(|i| ((i * 7919 % 2000) as f32 / 100.0) - 10.0)
            .collect();
        let input = [Tensor::f32("input", vec![rows, 25], data)];
        let one = model.run(&input).expect("runs");
        // Thread even the claims model's small products.
        tract_linalg::multithread::set_threading_panel_threshold(0);
        tract_linalg::multithread::set_threading_element_threshold(0);
        assert!(set_tract_threads(2));
        let two = model.run(&input).expect("runs");
        assert!(set_tract_threads(1));
        assert_eq!(one, two, "the split changes no result");
    }
}
