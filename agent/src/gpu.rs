//! The GPU backend: wonnx (WebGPU through wgpu: Vulkan on Linux, Metal on macOS).
//!
//! Compiled only with the cargo feature `gpu`. wonnx 0.5.1 panics when there is no
//! adapter, so [`probe`] enumerates adapters first with wgpu itself (which returns an
//! empty list instead of panicking), and every call into wonnx runs under
//! `catch_unwind` as well.
//!
//! wonnx needs static shapes, so it runs the bundle's GPU-prepared model
//! (`model.gpu.onnx`, from `fleetctl bundle build --prepare gpu`) or, failing that, a
//! copy the agent prepares itself with the same pass. A batch larger than the prepared
//! one runs in slices of the prepared size.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, OnceLock};

use fleetml_inference::prepare::{self, PreparedModel};
use fleetml_protocol::board::Backend as Kind;
use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::{Dim, TensorSpec};

use crate::runtime::{Backend, RuntimeError};

/// Lets the GPU backend use a software Vulkan implementation (Mesa's llvmpipe, say).
/// Off by default: on a device it would be slower than the CPU backend. Tests and CI
/// set it to exercise wonnx on machines without a GPU.
pub const ALLOW_SOFTWARE_ENV: &str = "FLEETML_GPU_ALLOW_SOFTWARE";

/// The adapter wonnx will run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

impl std::fmt::Display for AdapterInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {}", self.name, self.backend, self.device_type)?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
        }
        f.write_str(")")
    }
}

/// Finds a usable adapter, once per process. Never panics.
pub fn probe() -> Result<AdapterInfo, String> {
    static PROBE: OnceLock<Result<AdapterInfo, String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let allow_software = std::env::var(ALLOW_SOFTWARE_ENV).is_ok_and(|v| v == "1");
            catch_unwind(|| probe_uncached(allow_software)).unwrap_or_else(|_| {
                Err("not available: probing GPU adapters panicked inside wgpu".into())
            })
        })
        .clone()
}

fn probe_uncached(allow_software: bool) -> Result<AdapterInfo, String> {
    let backends = wgpu::util::backend_bits_from_env().unwrap_or(wgpu::Backends::PRIMARY);
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        dx12_shader_compiler: wgpu::Dx12Compiler::Fxc,
    });
    let adapters: Vec<AdapterInfo> = instance
        .enumerate_adapters(backends)
        .map(|a| {
            let info = a.get_info();
            AdapterInfo {
                name: info.name,
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                driver: [info.driver, info.driver_info]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" "),
            }
        })
        .collect();
    if adapters.is_empty() {
        return Err("not available: no GPU adapter found (Vulkan, Metal or DX12)".into());
    }
    let hardware = adapters.iter().find(|a| a.device_type != "Cpu");
    match (hardware, allow_software) {
        (Some(a), _) => Ok(a.clone()),
        (None, true) => Ok(adapters[0].clone()),
        (None, false) => Err(format!(
            "not available: only a software adapter was found ({}); set {ALLOW_SOFTWARE_ENV}=1 to use it",
            adapters[0]
        )),
    }
}

/// A model loaded into wonnx.
pub struct GpuModel {
    /// wonnx writes inputs into buffers owned by the session: one run at a time.
    session: Mutex<wonnx::Session>,
    adapter: AdapterInfo,
    model: PreparedModel,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("adapter", &self.adapter)
            .field("inputs", &self.model.inputs)
            .finish()
    }
}

impl GpuModel {
    /// Loads `prepared` (a bundle's `model.gpu.onnx`) or, when the bundle has none,
    /// prepares `onnx` with the declared `inputs` at batch 1.
    pub fn load<'a>(
        onnx: impl Into<fleetml_inference::Onnx<'a>>,
        prepared: Option<&[u8]>,
        inputs: &[TensorSpec],
    ) -> Result<GpuModel, String> {
        let adapter = probe()?;
        let owned;
        let bytes = match prepared {
            Some(p) => p,
            None => {
                let whole = fleetml_inference::external::inlined_bytes(onnx.into())
                    .map_err(|e| format!("cannot prepare the model for wonnx: {e}"))?;
                owned = prepare::prepare_gpu(&whole, inputs, 1)
                    .map_err(|e| format!("cannot prepare the model for wonnx: {e}"))?
                    .onnx;
                &owned
            }
        };
        let model = prepare::inspect_prepared(bytes)
            .map_err(|e| format!("the GPU-prepared model is unusable: {e}"))?;
        if !model.unsupported.is_empty() {
            let ops: Vec<String> = model
                .unsupported
                .iter()
                .map(|(op, n)| format!("{op} ({n})"))
                .collect();
            return Err(format!(
                "{} cannot run operators {}",
                prepare::WONNX_TARGET,
                ops.join(", ")
            ));
        }
        let session = catch_unwind(AssertUnwindSafe(|| {
            pollster::block_on(wonnx::Session::from_bytes(bytes))
        }))
        .map_err(|p| {
            format!(
                "wonnx panicked while compiling the model: {}",
                panic_text(&p)
            )
        })?
        .map_err(|e| format!("wonnx cannot compile the model: {e}"))?;
        tracing::info!(adapter = %adapter, "model compiled for the GPU");
        Ok(GpuModel {
            session: Mutex::new(session),
            adapter,
            model,
        })
    }

    pub fn adapter(&self) -> &AdapterInfo {
        &self.adapter
    }

    fn batch(&self) -> u64 {
        match self.model.inputs.first().and_then(|s| s.shape.first()) {
            Some(Dim::Fixed(n)) => (*n).max(1),
            _ => 1,
        }
    }

    fn run_slice(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        let mut feed: HashMap<String, wonnx::utils::InputTensor<'_>> = HashMap::new();
        for (spec, t) in self.model.inputs.iter().zip(inputs) {
            let expected: u64 = spec
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n,
                    Dim::Symbol(_) => 1,
                })
                .product();
            if t.data.len() as u64 != expected {
                return Err(RuntimeError::BadInput {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    len: t.data.len(),
                });
            }
            let Some(data) = t.data.as_f32() else {
                return Err(RuntimeError::Unsupported(format!(
                    "input `{}` is {}; the GPU backend (wonnx) runs f32 inputs only",
                    t.name,
                    t.dtype()
                )));
            };
            feed.insert(spec.name.clone(), data.into());
        }
        let session = self
            .session
            .lock()
            .map_err(|_| RuntimeError::Run("the GPU session was poisoned by a panic".into()))?;
        let mut outputs = catch_unwind(AssertUnwindSafe(|| pollster::block_on(session.run(&feed))))
            .map_err(|p| RuntimeError::Run(format!("wonnx panicked: {}", panic_text(&p))))?
            .map_err(|e| RuntimeError::Run(format!("wonnx: {e}")))?;
        self.model
            .outputs
            .iter()
            .map(|spec| {
                let out = outputs.remove(&spec.name).ok_or_else(|| {
                    RuntimeError::Run(format!("wonnx returned no output `{}`", spec.name))
                })?;
                let data: Vec<f32> = out
                    .try_into()
                    .map_err(|e| RuntimeError::Run(format!("output `{}`: {e}", spec.name)))?;
                Ok(Tensor::f32(
                    spec.name.clone(),
                    spec.shape
                        .iter()
                        .map(|d| match d {
                            Dim::Fixed(n) => *n,
                            Dim::Symbol(_) => 1,
                        })
                        .collect(),
                    data,
                ))
            })
            .collect()
    }
}

impl Backend for GpuModel {
    fn kind(&self) -> Kind {
        Kind::Gpu
    }

    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        if inputs.len() != self.model.inputs.len() {
            return Err(RuntimeError::Run(format!(
                "the model takes {} inputs, got {}",
                self.model.inputs.len(),
                inputs.len()
            )));
        }
        fleetml_inference::run_in_slices(inputs, self.batch(), |slice| self.run_slice(slice))
    }
}

fn panic_text(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}
