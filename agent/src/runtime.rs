//! Running a loaded model: the [`Backend`] trait every inference engine implements, for
//! CPU inference with tract (through `fleetml-inference`, the same code the bundle
//! builder used to compute the golden outputs this agent checks) and ONNX Runtime; the
//! GPU's wonnx implements it in `gpu`. Choosing between them is `backend`'s.

use std::fmt;

use fleetml_protocol::board::{Backend as Kind, Provider};
use fleetml_protocol::golden::Tensor;

pub use fleetml_inference::{CpuModel, RuntimeError};

/// A loaded model on one backend.
pub trait Backend: Send + Sync + fmt::Debug {
    fn kind(&self) -> Kind;
    /// The execution provider and runtime version, for backends that have them
    /// (`onnxruntime`: `(cuda, "1.32.0")`).
    fn provider(&self) -> Option<(Provider, String)> {
        None
    }
    /// Does, untimed, the one-off work running inputs of these shapes needs (tract
    /// optimizes a plan per input shape on its first run); nothing for backends without
    /// such work. A timed run that follows measures the run alone.
    fn prepare(&self, _inputs: &[Tensor]) -> Result<(), RuntimeError> {
        Ok(())
    }
    /// Runs the model on `inputs`, in the model's input order.
    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError>;
}

impl Backend for CpuModel {
    fn kind(&self) -> Kind {
        Kind::Cpu
    }

    fn prepare(&self, inputs: &[Tensor]) -> Result<(), RuntimeError> {
        CpuModel::prepare(self, inputs)
    }

    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        CpuModel::run(self, inputs)
    }
}

#[cfg(feature = "onnxruntime")]
impl Backend for fleetml_inference::onnxruntime::OrtModel {
    fn kind(&self) -> Kind {
        Kind::Onnxruntime
    }

    fn provider(&self) -> Option<(Provider, String)> {
        Some((
            fleetml_inference::onnxruntime::OrtModel::provider(self),
            self.library_version().to_string(),
        ))
    }

    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        fleetml_inference::onnxruntime::OrtModel::run(self, inputs)
    }
}
