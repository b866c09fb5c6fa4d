//! Golden vectors at build time, against a reference the device does not share.
//!
//! Golden outputs come from ONNX Runtime — the reference implementation — whenever the
//! builder has its library (`--onnxruntime PATH` or `ORT_DYLIB_PATH`); otherwise from
//! tract, saying so. Then every backend the bundle targets that can run here computes
//! the same inputs and is compared with the golden outputs at the bundle's tolerances:
//! a backend that disagrees fails the build (or, with `--allow-backend-disagreement`,
//! is recorded), so a backend that silently computes a wrong output is caught before
//! any device sees the bundle. What was checked is written to `golden-check.json`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fleetml_protocol::golden::{self, Golden, Tensor};
use fleetml_protocol::manifest::{Dim, TensorSpec};
use serde::Serialize;

use crate::onnx::OnnxModel;

/// Tolerances stored with golden vectors.
pub const ABS_TOLERANCE: f32 = 1e-4;
pub const REL_TOLERANCE: f32 = 1e-3;

/// The payload recording how the golden outputs were made and checked.
pub const CHECK_ENTRY: &str = "golden-check.json";

/// Largest `.npz` read.
const MAX_NPZ: u64 = 1 << 30;

/// How golden outputs were computed and which backends were compared with them.
#[derive(Debug, Clone, Serialize)]
pub struct GoldenCheck {
    /// `onnxruntime 1.32.0 (cpu)` or `tract` (and why not ONNX Runtime).
    pub reference: String,
    pub checks: Vec<BackendCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendCheck {
    pub backend: String,
    /// `agrees`, `DISAGREES`, or why it was not run here.
    pub outcome: String,
    pub max_abs_error: Option<f32>,
    pub max_rel_error: Option<f32>,
}

impl GoldenCheck {
    /// Whether the golden outputs came from ONNX Runtime rather than from tract.
    pub fn independent(&self) -> bool {
        self.reference.starts_with("onnxruntime")
    }

    /// One line per fact, for the build's output.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!("golden outputs computed by {}", self.reference)];
        for c in &self.checks {
            let errors = match (c.max_abs_error, c.max_rel_error) {
                (Some(a), Some(r)) => format!(" (max abs error {a:e}, max rel error {r:e})"),
                _ => String::new(),
            };
            out.push(format!(
                "golden check on {}: {}{errors}",
                c.backend, c.outcome
            ));
        }
        out
    }
}

/// Reads `.npz` inputs: one array per model input, named by the input.
pub fn read_npz(path: &Path, inputs: &[TensorSpec]) -> anyhow::Result<Vec<Tensor>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let size = file.metadata()?.len();
    anyhow::ensure!(
        size <= MAX_NPZ,
        "{} is larger than {MAX_NPZ} bytes",
        path.display()
    );
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not an .npz (zip) file", path.display()))?;
    let mut arrays = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i)?;
        let name = entry.name()?.trim_end_matches(".npy").to_string();
        anyhow::ensure!(
            entry.size() <= MAX_NPZ,
            "array `{name}` is larger than {MAX_NPZ} bytes"
        );
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .by_ref()
            .take(MAX_NPZ)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading array `{name}`"))?;
        let t = fleetml_protocol::tensor::from_npy(&name, &bytes)
            .map_err(|e| anyhow::anyhow!("array `{name}` of {}: {e}", path.display()))?;
        arrays.push(t);
    }
    let names: Vec<String> = arrays.iter().map(|a| a.name.clone()).collect();
    let mut ordered = Vec::with_capacity(inputs.len());
    for spec in inputs {
        let Some(i) = arrays.iter().position(|a| a.name == spec.name) else {
            bail!(
                "{} has no array `{}` for the model's input {spec} (it has: {})",
                path.display(),
                spec.name,
                names.join(", ")
            );
        };
        let t = arrays.swap_remove(i);
        let fits = t.shape.len() == spec.shape.len()
            && t.shape
                .iter()
                .zip(&spec.shape)
                .all(|(got, want)| match want {
                    Dim::Fixed(n) => got == n,
                    Dim::Symbol(_) => true,
                });
        anyhow::ensure!(
            fits && t.dtype() == spec.dtype,
            "array `{}` is {}{:?}; the model's input is {spec}",
            t.name,
            t.dtype(),
            t.shape
        );
        ordered.push(t);
    }
    if let Some(extra) = arrays.first() {
        bail!(
            "{} has an array `{}` the model has no input for",
            path.display(),
            extra.name
        );
    }
    Ok(ordered)
}

/// The ONNX Runtime library the builder uses, if it has one.
pub fn onnxruntime_library(configured: Option<&Path>) -> Option<PathBuf> {
    configured.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("ORT_DYLIB_PATH")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    })
}

/// Computes golden outputs for `inputs` and checks the bundle's target backends on
/// them.
pub fn compute(
    onnx: fleetml_inference::Onnx<'_>,
    model: &OnnxModel,
    inputs: Vec<Tensor>,
    backends: &[String],
    library: Option<&Path>,
    allow_disagreement: bool,
) -> anyhow::Result<(Golden, GoldenCheck)> {
    let ort = match library {
        Some(lib) => {
            let lib = fleetml_inference::onnxruntime::library(lib)
                .context("loading ONNX Runtime for the golden outputs")?;
            let m = fleetml_inference::onnxruntime::OrtModel::load(
                lib,
                onnx,
                fleetml_protocol::board::Provider::Cpu,
                Some(1),
            )
            .context("loading the model in ONNX Runtime")?;
            Some(m)
        }
        None => None,
    };
    let (outputs, reference) = match &ort {
        Some(m) => (
            m.run(&inputs).context("computing golden outputs with ONNX Runtime")?,
            format!("onnxruntime {} (cpu)", m.library_version()),
        ),
        None => match model.tract_error() {
            None => (
                model.run(&inputs).context("computing golden outputs with tract")?,
                "tract (no ONNX Runtime library: pass --onnxruntime PATH or set ORT_DYLIB_PATH for an independent reference)".to_string(),
            ),
            Some(why) => bail!(
                "no runtime here can compute golden outputs: tract cannot run the model ({why}); pass --onnxruntime PATH (the PyPI onnxruntime wheel ships libonnxruntime.so)"
            ),
        },
    };
    let golden = Golden {
        abs_tolerance: ABS_TOLERANCE,
        rel_tolerance: REL_TOLERANCE,
        inputs,
        outputs,
    };
    let mut checks = Vec::new();
    for backend in backends {
        let computed: Result<Vec<Tensor>, String> = match backend.as_str() {
            "cpu" => match model.tract_error() {
                Some(why) => Err(format!("not run: tract cannot run the model ({why})")),
                None => model.run(&golden.inputs).map_err(|e| format!("{e:#}")),
            },
            "onnxruntime" => match &ort {
                Some(m) => m.run(&golden.inputs).map_err(|e| e.to_string()),
                None => Err("not run: no ONNX Runtime library here".into()),
            },
            other => Err(format!(
                "not run: the builder has no `{other}` backend; the device's install self-test checks it"
            )),
        };
        let check = match computed {
            Err(why) if why.starts_with("not run") => BackendCheck {
                backend: backend.clone(),
                outcome: why,
                max_abs_error: None,
                max_rel_error: None,
            },
            Err(why) => BackendCheck {
                backend: backend.clone(),
                outcome: format!("DISAGREES: it failed on the golden inputs: {why}"),
                max_abs_error: None,
                max_rel_error: None,
            },
            Ok(outputs) => match golden::compare(&golden, &outputs) {
                Ok(c) => BackendCheck {
                    backend: backend.clone(),
                    outcome: if c.passed() {
                        "agrees".into()
                    } else {
                        let (output, index) = c.worst.clone().unwrap_or_default();
                        format!(
                            "DISAGREES: {} values beyond tolerance (abs {ABS_TOLERANCE}, rel {REL_TOLERANCE}); worst `{output}`[{index}]",
                            c.failures
                        )
                    },
                    max_abs_error: Some(c.max_abs_error),
                    max_rel_error: Some(c.max_rel_error),
                },
                Err(why) => BackendCheck {
                    backend: backend.clone(),
                    outcome: format!("DISAGREES: {why}"),
                    max_abs_error: None,
                    max_rel_error: None,
                },
            },
        };
        checks.push(check);
    }
    let check = GoldenCheck { reference, checks };
    if let Some(bad) = check
        .checks
        .iter()
        .find(|c| c.outcome.starts_with("DISAGREES"))
        && !allow_disagreement
    {
        bail!(
            "backend `{}` disagrees with the golden outputs ({}): {}; fix the model or the backend, or pass --allow-backend-disagreement to build anyway and record it in {CHECK_ENTRY}",
            bad.backend,
            check.reference,
            bad.outcome
        );
    }
    Ok((golden, check))
}
