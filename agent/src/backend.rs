//! Inference backends and the choice between them.
//!
//! A [`Backend`] runs batches of f32 tensors through one loaded model. Which backend runs
//! a model is decided per board profile: [`select`] walks the board's backend order, and
//! a backend that is not available on this device, cannot load the model, or fails the
//! bundle's golden self-test is skipped with a recorded reason ([`Fallback`]).
//!
//! `cpu` is tract. `gpu` is wonnx over WebGPU (cargo feature `gpu`, see [`crate::gpu`]);
//! an agent built without it, or on a device without an adapter, reports why and falls
//! back. `npu` (a vendor delegate) is a seam: requesting it reports plainly that it is
//! not available and falls back; nothing pretends to be an accelerator.

use std::fmt;

use fleetml_protocol::board::{Backend as Kind, BoardProfile};
use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::TensorSpec;

use crate::runtime::{CpuModel, RuntimeError};
use crate::selftest::{self, SelfTest};

/// A loaded model on one backend.
pub trait Backend: Send + Sync + fmt::Debug {
    fn kind(&self) -> Kind;
    /// Runs the model on `inputs`, in the model's input order.
    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError>;
}

impl Backend for CpuModel {
    fn kind(&self) -> Kind {
        Kind::Cpu
    }

    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        CpuModel::run(self, inputs)
    }
}

/// Why a backend was passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    pub backend: Kind,
    pub reason: String,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} requested, {}", self.backend.as_str(), self.reason)
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
        let chosen = self.backend.kind().as_str();
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
    pub onnx: &'a [u8],
    pub gpu_onnx: Option<&'a [u8]>,
    pub inputs: &'a [TensorSpec],
}

impl<'a> ModelFiles<'a> {
    pub fn new(onnx: &'a [u8], inputs: &'a [TensorSpec]) -> Self {
        ModelFiles {
            onnx,
            gpu_onnx: None,
            inputs,
        }
    }
}

/// Loads the model on backend `kind`, or says why it cannot.
pub fn load(
    kind: Kind,
    model: &ModelFiles<'_>,
    board: &BoardProfile,
) -> Result<Box<dyn Backend>, String> {
    match kind {
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
    for &kind in &board.backends {
        let backend = match load(kind, model, board) {
            Ok(b) => b,
            Err(reason) => {
                fallbacks.push(Fallback {
                    backend: kind,
                    reason,
                });
                continue;
            }
        };
        let self_test = match golden {
            Some(g) => match selftest::run(backend.as_ref(), g) {
                Ok(t) => Some(t),
                Err(e) => {
                    fallbacks.push(Fallback {
                        backend: kind,
                        reason: e.to_string(),
                    });
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
