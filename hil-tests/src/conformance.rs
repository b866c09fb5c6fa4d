//! Runs the ONNX project's backend test cases (written out of the pip `onnx` package by
//! `scripts/onnx_cases.py`) through the agent's CPU backend, tract.
//!
//! Each case is a `model.onnx` and one or more `test_data_set_*` directories of
//! `input_*.pb` / `output_*.pb` tensors. A case passes when every data set's outputs
//! match in shape, element type class and value: floats within `atol + rtol * |expected|`
//! (the tolerances the ONNX case declares: rtol 1e-3, atol 1e-7 unless the case says
//! otherwise; NaN matches NaN), everything else exactly.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use prost::Message;
use tract_onnx::data_resolver::MmapDataResolver;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// One case from `cases.tsv`.
#[derive(Debug, Clone)]
pub struct Case {
    /// `node`, `simple`, `pytorch-operator` or `pytorch-converted`.
    pub kind: String,
    pub name: String,
    pub rtol: f64,
    pub atol: f64,
    /// `tensor`, or the first non-tensor value kind the case uses.
    pub values: String,
    pub dir: PathBuf,
}

impl Case {
    /// `kind/name`, the key of the pass list.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// Reads `root/cases.tsv`.
pub fn cases(root: &Path) -> Result<Vec<Case>, String> {
    let index = root.join("cases.tsv");
    let text =
        std::fs::read_to_string(&index).map_err(|e| format!("reading {}: {e}", index.display()))?;
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            let [kind, name, rtol, atol, values] = cols[..] else {
                return Err(format!("{}: malformed line `{line}`", index.display()));
            };
            let num = |s: &str| {
                s.parse::<f64>()
                    .map_err(|_| format!("{}: `{s}` is not a number", index.display()))
            };
            Ok(Case {
                kind: kind.into(),
                name: name.into(),
                rtol: num(rtol)?,
                atol: num(atol)?,
                values: values.into(),
                dir: root.join(kind).join(name),
            })
        })
        .collect()
}

/// The result of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// The case uses values tract's runner does not take (sequences, maps, optionals).
    Skipped(String),
    /// tract refused to load or optimize the model.
    Unsupported(String),
    /// tract failed while running.
    RunError(String),
    /// Outputs differ from the expected ones.
    Mismatch(String),
    /// tract panicked (contained here, as the agent contains it).
    Panic(String),
    Timeout,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Skipped(_) => "skipped",
            Outcome::Unsupported(_) => "unsupported",
            Outcome::RunError(_) => "run-error",
            Outcome::Mismatch(_) => "mismatch",
            Outcome::Panic(_) => "panic",
            Outcome::Timeout => "timeout",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Outcome::Pass | Outcome::Timeout => String::new(),
            Outcome::Skipped(s)
            | Outcome::Unsupported(s)
            | Outcome::RunError(s)
            | Outcome::Mismatch(s)
            | Outcome::Panic(s) => s.clone(),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detail = self.detail();
        if detail.is_empty() {
            f.write_str(self.label())
        } else {
            write!(f, "{}: {}", self.label(), detail)
        }
    }
}

/// Runs `case` with `runner` ([`run`] or `run_gpu`) on a separate thread, giving up
/// after `timeout` (the thread is left to finish on its own: backends offer no
/// cancellation).
pub fn run_with_timeout(case: &Case, timeout: Duration, runner: fn(&Case) -> Outcome) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let owned = case.clone();
    std::thread::spawn(move || {
        let _ = tx.send(runner(&owned));
    });
    rx.recv_timeout(timeout).unwrap_or(Outcome::Timeout)
}

/// Runs every data set of `case` through tract.
pub fn run(case: &Case) -> Outcome {
    contained(case, run_inner)
}

/// Runs `inner` on a tensor-only `case`, a panic becoming [`Outcome::Panic`].
fn contained(case: &Case, inner: fn(&Case) -> Outcome) -> Outcome {
    if case.values != "tensor" {
        return Outcome::Skipped(format!("uses {} values", case.values));
    }
    match std::panic::catch_unwind(|| inner(case)) {
        Ok(outcome) => outcome,
        Err(payload) => Outcome::Panic(
            payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default(),
        ),
    }
}

/// The `test_data_set_*` directories of a case, in order.
fn data_sets(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("test_data_set_"))
                })
                .collect()
        })
        .unwrap_or_default();
    sets.sort();
    sets
}

fn one_line(e: &TractError) -> String {
    let text = format!("{e:#}");
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(160).collect()
}

fn run_inner(case: &Case) -> Outcome {
    let onnx = tract_onnx::onnx();
    let proto = match std::fs::read(case.dir.join("model.onnx"))
        .map_err(|e| e.to_string())
        .and_then(|b| pb::ModelProto::decode(&b[..]).map_err(|e| e.to_string()))
    {
        Ok(p) => p,
        Err(e) => return Outcome::Unsupported(format!("reading model: {e}")),
    };
    let sets = data_sets(&case.dir);
    if sets.is_empty() {
        return Outcome::Skipped("no test data set".into());
    }
    for set in sets {
        let inputs = match load_tensors(&set, "input") {
            Ok(t) => t,
            Err(e) => return Outcome::Skipped(format!("input data: {e}")),
        };
        let expected = match load_tensors(&set, "output") {
            Ok(t) => t,
            Err(e) => return Outcome::Skipped(format!("output data: {e}")),
        };
        let plan = match plan(&onnx, &proto, &inputs) {
            Ok(p) => p,
            Err(e) => return Outcome::Unsupported(one_line(&e)),
        };
        let outputs = match plan.run(inputs.into_iter().map(|t| t.into_tvalue()).collect()) {
            Ok(o) => o,
            Err(e) => return Outcome::RunError(one_line(&e)),
        };
        if outputs.len() != expected.len() {
            return Outcome::Mismatch(format!(
                "{} outputs, expected {}",
                outputs.len(),
                expected.len()
            ));
        }
        for (i, (got, want)) in outputs.iter().zip(&expected).enumerate() {
            if let Err(e) = compare(got, want, case.rtol, case.atol) {
                return Outcome::Mismatch(format!("output {i}: {e}"));
            }
        }
    }
    Outcome::Pass
}

fn plan(
    onnx: &tract_onnx::Onnx,
    proto: &pb::ModelProto,
    inputs: &[Tensor],
) -> TractResult<std::sync::Arc<TypedRunnableModel>> {
    let mut model = onnx.model_for_proto_model(proto)?;
    let sources = model.input_outlets()?.len();
    for (i, t) in inputs.iter().enumerate().take(sources) {
        model.set_input_fact(i, InferenceFact::from(t.clone()).without_value())?;
    }
    model.into_optimized()?.into_runnable()
}

fn load_tensors(set: &Path, prefix: &str) -> Result<Vec<Tensor>, String> {
    let mut tensors = Vec::new();
    for i in 0.. {
        let path = set.join(format!("{prefix}_{i}.pb"));
        if !path.exists() {
            break;
        }
        let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
        let proto =
            pb::TensorProto::decode(&bytes[..]).map_err(|e| format!("{}: {e}", path.display()))?;
        let tensor = tract_onnx::tensor::load_tensor(&MmapDataResolver, &proto, None)
            .map_err(|e| format!("{}: {}", path.display(), one_line(&e)))?;
        tensors.push(tensor);
    }
    Ok(tensors)
}

fn is_float(dt: DatumType) -> bool {
    matches!(dt, DatumType::F16 | DatumType::F32 | DatumType::F64)
}

/// Compares one output against the expected tensor.
pub fn compare(got: &Tensor, want: &Tensor, rtol: f64, atol: f64) -> Result<(), String> {
    if got.shape() != want.shape() {
        return Err(format!(
            "shape {:?}, expected {:?}",
            got.shape(),
            want.shape()
        ));
    }
    let (g, w) = (got.datum_type(), want.datum_type());
    if is_float(w) {
        if !is_float(g) {
            return Err(format!("type {g:?}, expected {w:?}"));
        }
        let got = got.cast_to::<f64>().map_err(|e| one_line(&e))?;
        let want = want.cast_to::<f64>().map_err(|e| one_line(&e))?;
        let (got, want) = (
            got.to_plain_array_view::<f64>().map_err(|e| one_line(&e))?,
            want.to_plain_array_view::<f64>()
                .map_err(|e| one_line(&e))?,
        );
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            let same =
                (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= atol + rtol * b.abs();
            if !same {
                return Err(format!(
                    "element {i}: {a} vs {b} (rtol {rtol:e}, atol {atol:e})"
                ));
            }
        }
        return Ok(());
    }
    // tract computes shapes as symbolic dimensions (TDim); concrete ones are int64.
    if g == DatumType::TDim && w == DatumType::I64 {
        let got = got.cast_to::<i64>().map_err(|e| one_line(&e))?;
        return if *got == *want {
            Ok(())
        } else {
            Err("values differ".into())
        };
    }
    if g != w {
        return Err(format!("type {g:?}, expected {w:?}"));
    }
    if got != want {
        return Err("values differ".into());
    }
    Ok(())
}

/// Runs every data set of `case` through the GPU backend (wonnx): the model is prepared
/// with the data set's input shapes (`fleetml_inference::prepare`), compiled by wonnx on
/// the adapter `fleet_agent::gpu::probe` found, and run. Only f32 inputs are fed (the
/// backend's contract); other cases are skipped.
#[cfg(feature = "gpu")]
pub fn run_gpu(case: &Case) -> Outcome {
    contained(case, run_gpu_inner)
}

#[cfg(feature = "gpu")]
fn run_gpu_inner(case: &Case) -> Outcome {
    use fleet_agent::backend::Backend;
    use fleetml_protocol::golden::Tensor as F32Tensor;
    use fleetml_protocol::manifest::{DType, Dim, TensorSpec};

    let onnx = match std::fs::read(case.dir.join("model.onnx")) {
        Ok(b) => b,
        Err(e) => return Outcome::Unsupported(format!("reading model: {e}")),
    };
    let Ok(proto) = pb::ModelProto::decode(&onnx[..]) else {
        return Outcome::Unsupported("not a valid ONNX protobuf".into());
    };
    let graph = proto.graph.unwrap_or_default();
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let input_names: Vec<&str> = graph
        .input
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| !initializers.contains(n))
        .collect();
    let sets = data_sets(&case.dir);
    if sets.is_empty() {
        return Outcome::Skipped("no test data set".into());
    }
    for set in sets {
        let (inputs, expected) = match (load_tensors(&set, "input"), load_tensors(&set, "output")) {
            (Ok(i), Ok(o)) => (i, o),
            (Err(e), _) | (_, Err(e)) => return Outcome::Skipped(format!("data: {e}")),
        };
        if inputs.len() != input_names.len() {
            return Outcome::Skipped("optional inputs left out".into());
        }
        let mut specs = Vec::new();
        let mut feed = Vec::new();
        for (name, t) in input_names.iter().zip(&inputs) {
            if t.datum_type() != DatumType::F32 {
                return Outcome::Skipped(format!(
                    "input `{name}` is {:?}, not f32",
                    t.datum_type()
                ));
            }
            let shape: Vec<u64> = t.shape().iter().map(|d| *d as u64).collect();
            specs.push(TensorSpec {
                name: name.to_string(),
                dtype: DType::F32,
                shape: shape.iter().map(|d| Dim::Fixed(*d)).collect(),
            });
            let data: Vec<f32> = match t.to_plain_array_view::<f32>() {
                Ok(v) => v.iter().copied().collect(),
                Err(e) => return Outcome::Skipped(one_line(&e)),
            };
            feed.push(F32Tensor::f32(name.to_string(), shape, data));
        }
        let batch = feed
            .first()
            .and_then(|t| t.shape.first().copied())
            .unwrap_or(1);
        let prepared = match fleetml_inference::prepare::prepare_gpu(&onnx, &specs, batch) {
            Ok(p) => p,
            Err(e) => return Outcome::Unsupported(format!("preparation: {e}")),
        };
        if !prepared.report.is_compatible() {
            return Outcome::Unsupported(prepared.report.summary());
        }
        let model = match fleet_agent::gpu::GpuModel::load(&onnx, Some(&prepared.onnx), &specs) {
            Ok(m) => m,
            Err(e) => return Outcome::Unsupported(e),
        };
        let outputs = match model.run(&feed) {
            Ok(o) => o,
            Err(e) => return Outcome::RunError(e.to_string()),
        };
        if outputs.len() != expected.len() {
            return Outcome::Mismatch(format!(
                "{} outputs, expected {}",
                outputs.len(),
                expected.len()
            ));
        }
        for (i, (got, want)) in outputs.iter().zip(&expected).enumerate() {
            let shape: Vec<usize> = got.shape.iter().map(|d| *d as usize).collect();
            let got = match Tensor::from_shape(&shape, &got.data.to_f32()) {
                Ok(t) => t,
                Err(e) => return Outcome::Mismatch(format!("output {i}: {}", one_line(&e))),
            };
            if let Err(e) = compare(&got, want, case.rtol, case.atol) {
                return Outcome::Mismatch(format!("output {i}: {e}"));
            }
        }
    }
    Outcome::Pass
}
