//! Inference backends and the choice between them.
//!
//! A [`Backend`] runs batches of f32 tensors through one loaded model. Which backend runs
//! a model is decided per board profile: [`select`] walks the board's backend order, and
//! a backend that is not available on this device, cannot load the model, or fails the
//! bundle's golden self-test is skipped with a recorded reason ([`Fallback`]).
//!
//! `cpu` is tract. `gpu` is wonnx over WebGPU (cargo feature `gpu`, see [`crate::gpu`]);
//! an agent built without it, or on a device without an adapter, reports why and falls
//! back. `onnxruntime` (cargo feature `onnxruntime`) is ONNX Runtime loaded from the
//! board's library; it expands into one candidate per execution provider of the board's
//! `[onnxruntime] providers`, each registered with error-on-failure, so a provider that
//! does not load is a recorded fallback like any other backend, never a silent switch to
//! the CPU. `npu` names a vendor delegate outside ONNX Runtime: requesting it reports
//! plainly that it is not available and falls back; NPUs that ONNX Runtime reaches
//! (`rknpu`, `vsinpu`, `qnn`, `openvino`, …) are providers of `onnxruntime`.

use std::fmt;

use fleetml_protocol::board::{Backend as Kind, BoardProfile, Provider};
use fleetml_protocol::manifest::TensorSpec;

pub use crate::runtime::Backend;
use crate::runtime::CpuModel;
use crate::selftest::{self, SelfTest};
use fleetml_inference::Onnx;

/// A loaded backend as status and the store name it: `cpu`, `gpu`,
/// `onnxruntime/cuda (ONNX Runtime 1.32.0)`.
pub fn describe(backend: &dyn Backend) -> String {
    match backend.provider() {
        Some((p, version)) => format!(
            "{} (ONNX Runtime {version})",
            label(backend.kind(), Some(p))
        ),
        None => backend.kind().as_str().to_string(),
    }
}

/// How a backend names itself in reports: `cpu`, `gpu`, `onnxruntime/cuda`.
pub fn label(kind: Kind, provider: Option<Provider>) -> String {
    match provider {
        Some(p) => format!("{}/{p}", kind.as_str()),
        None => kind.as_str().to_string(),
    }
}

/// Why a backend was passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    pub backend: Kind,
    /// The execution provider tried, for `onnxruntime`.
    pub provider: Option<Provider>,
    pub reason: String,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requested, {}",
            label(self.backend, self.provider),
            self.reason
        )
    }
}

impl Selection {
    /// The chosen backend as reports name it (`cpu`, `onnxruntime/cuda`).
    pub fn label(&self) -> String {
        label(self.backend.kind(), self.backend.provider().map(|(p, _)| p))
    }
}

/// The backend chosen for a model, and the ones passed over before it.
#[derive(Debug)]
pub struct Selection {
    pub backend: Box<dyn Backend>,
    pub fallbacks: Vec<Fallback>,
    /// The golden self-test on the chosen backend, when the bundle has golden vectors.
    pub self_test: Option<SelfTest>,
}

impl Selection {
    /// One line per fallback, e.g. `npu requested, not available (…), fell back to cpu`.
    pub fn report(&self) -> Vec<String> {
        let chosen = self.label();
        self.fallbacks
            .iter()
            .map(|f| format!("{f}, fell back to {chosen}"))
            .collect()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no backend of board `{board}` can run the model: {}", .reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct NoBackend {
    pub board: String,
    pub reasons: Vec<Fallback>,
}

/// The model files a backend may load: the bundle's `model.onnx` with its declared
/// inputs, and its GPU-prepared copy when it has one.
#[derive(Debug, Clone, Copy)]
pub struct ModelFiles<'a> {
    /// The model and its external data files.
    pub onnx: Onnx<'a>,
    pub gpu_onnx: Option<&'a [u8]>,
    pub inputs: &'a [TensorSpec],
}

impl<'a> ModelFiles<'a> {
    pub fn new(onnx: &'a [u8], inputs: &'a [TensorSpec]) -> Self {
        ModelFiles {
            onnx: Onnx::from(onnx),
            gpu_onnx: None,
            inputs,
        }
    }
}

/// One thing [`select`] tries: a backend, and for `onnxruntime` one provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub backend: Kind,
    pub provider: Option<Provider>,
}

/// The board's backend order with `onnxruntime` expanded into its providers.
pub fn candidates(board: &BoardProfile) -> Vec<Candidate> {
    let mut out = Vec::new();
    for &backend in &board.backends {
        match (backend, &board.onnxruntime) {
            (Kind::Onnxruntime, Some(ort)) => out.extend(ort.providers.iter().map(|p| Candidate {
                backend,
                provider: Some(*p),
            })),
            _ => out.push(Candidate {
                backend,
                provider: None,
            }),
        }
    }
    out
}

/// Loads the model on `candidate`, or says why it cannot.
pub fn load(
    candidate: Candidate,
    model: &ModelFiles<'_>,
    board: &BoardProfile,
) -> Result<Box<dyn Backend>, String> {
    let kind = candidate.backend;
    match kind {
        Kind::Onnxruntime => {
            load_onnxruntime(candidate.provider.unwrap_or(Provider::Cpu), model, board)
        }
        Kind::Cpu => CpuModel::load_with_inputs(model.onnx, model.inputs)
            .map(|m| Box::new(m) as Box<dyn Backend>)
            .map_err(|e| e.to_string()),
        Kind::Gpu => load_gpu(model, board),
        Kind::Npu => {
            let delegate = accelerator(board, kind)
                .and_then(|a| a.delegate.clone())
                .unwrap_or_else(|| "unknown".into());
            Err(format!(
                "not available: this agent has no NPU delegate support (board names delegate `{delegate}`)"
            ))
        }
    }
}

/// Where this agent looks for `libonnxruntime`: `ORT_DYLIB_PATH`, else the board's
/// `onnxruntime.library` (which `onnxruntime_library` in agent.toml sets), else the
/// system loader's `libonnxruntime.so`.
pub fn onnxruntime_library(board: &BoardProfile) -> std::path::PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            board
                .onnxruntime
                .as_ref()
                .and_then(|o| o.library.as_ref())
                .map(std::path::PathBuf::from)
        })
        .unwrap_or_else(|| "libonnxruntime.so".into())
}

#[cfg(feature = "onnxruntime")]
fn load_onnxruntime(
    provider: Provider,
    model: &ModelFiles<'_>,
    board: &BoardProfile,
) -> Result<Box<dyn Backend>, String> {
    use fleetml_inference::onnxruntime;
    let lib = onnxruntime::library(&onnxruntime_library(board)).map_err(|e| e.to_string())?;
    let threads = board.agent.intra_op_threads.map(|t| t as usize);
    onnxruntime::OrtModel::load(lib, model.onnx, provider, threads)
        .map(|m| Box::new(m) as Box<dyn Backend>)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "onnxruntime"))]
fn load_onnxruntime(
    _provider: Provider,
    _model: &ModelFiles<'_>,
    _board: &BoardProfile,
) -> Result<Box<dyn Backend>, String> {
    Err("not available: this agent was built without ONNX Runtime support (build with --features onnxruntime)".into())
}

#[cfg(feature = "gpu")]
fn load_gpu(model: &ModelFiles<'_>, _board: &BoardProfile) -> Result<Box<dyn Backend>, String> {
    crate::gpu::GpuModel::load(model.onnx, model.gpu_onnx, model.inputs)
        .map(|m| Box::new(m) as Box<dyn Backend>)
}

#[cfg(not(feature = "gpu"))]
fn load_gpu(_model: &ModelFiles<'_>, board: &BoardProfile) -> Result<Box<dyn Backend>, String> {
    let api = accelerator(board, Kind::Gpu)
        .and_then(|a| a.api.clone())
        .unwrap_or_else(|| "unknown".into());
    Err(format!(
        "not available: this agent was built without GPU support (board asks for {api}; build with --features gpu)"
    ))
}

fn accelerator(board: &BoardProfile, kind: Kind) -> Option<&fleetml_protocol::board::Accelerator> {
    board.accelerators.iter().find(|a| a.kind == kind)
}

/// Chooses the first backend of `board`'s order that loads `model` and passes the
/// golden self-test (`golden`, the bundle's `golden.cbor`).
pub fn select(
    board: &BoardProfile,
    model: &ModelFiles<'_>,
    golden: Option<&[u8]>,
) -> Result<Selection, NoBackend> {
    let mut fallbacks = Vec::new();
    for candidate in candidates(board) {
        let fallback = |reason: String| Fallback {
            backend: candidate.backend,
            provider: candidate.provider,
            reason,
        };
        let backend = match load(candidate, model, board) {
            Ok(b) => b,
            Err(reason) => {
                fallbacks.push(fallback(reason));
                continue;
            }
        };
        let widen = candidate
            .provider
            .and_then(|p| board.onnxruntime.as_ref()?.tolerance(p));
        let self_test = match golden {
            Some(g) => match selftest::run_within(backend.as_ref(), g, widen) {
                Ok(t) => Some(t),
                Err(e) => {
                    fallbacks.push(fallback(e.to_string()));
                    continue;
                }
            },
            None => None,
        };
        return Ok(Selection {
            backend,
            fallbacks,
            self_test,
        });
    }
    Err(NoBackend {
        board: board.name.clone(),
        reasons: fallbacks,
    })
}
