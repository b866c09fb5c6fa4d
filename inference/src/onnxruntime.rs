//! ONNX Runtime through `ort`, loaded at run time (`load-dynamic`): nothing is linked or
//! downloaded at build time. The library comes from the board (a vendor build with its
//! execution providers) or, on a development machine, the PyPI `onnxruntime` wheel
//! (`site-packages/onnxruntime/capi/libonnxruntime.so.1.x.y`).
//!
//! One library per process: [`library`] loads it once and refuses one older than the
//! ONNX Runtime API this build was made for ([`min_version`]) with the version it found.
//! A model is loaded on one execution provider at a time ([`OrtModel::load`]); the
//! provider is registered with error-on-failure, so a provider that cannot be used
//! fails the load with ONNX Runtime's reason instead of quietly becoming the CPU.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use fleetml_protocol::board::Provider;
use fleetml_protocol::golden::{Tensor, TensorData};
use fleetml_protocol::manifest::{DType, Dim, TensorSpec};
use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{
    DynValue, PrimitiveTensorElementType, Tensor as OrtTensor, TensorElementType, TensorRef,
    ValueType,
};

use crate::RuntimeError;

/// The oldest ONNX Runtime this build works with: the C API version it was built for.
pub fn min_version() -> String {
    format!("1.{}", ort::MINOR_VERSION)
}

/// The loaded ONNX Runtime library.
#[derive(Debug)]
pub struct Library {
    pub path: PathBuf,
    /// `1.32.0`, from the library's build information (or its file name).
    pub version: String,
    environment: ort::environment::Environment,
}

static LIBRARY: OnceLock<Library> = OnceLock::new();
static LOADING: Mutex<()> = Mutex::new(());

/// The library loaded by this process, if any.
pub fn loaded() -> Option<&'static Library> {
    LIBRARY.get()
}

/// Loads `libonnxruntime` from `path` (once per process). A second call with another
/// path is refused: one process holds one ONNX Runtime.
pub fn library(path: &Path) -> Result<&'static Library, RuntimeError> {
    let _loading = LOADING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(lib) = LIBRARY.get() {
        if lib.path != path {
            return Err(RuntimeError::Load(format!(
                "ONNX Runtime is already loaded from {}; one process uses one library (asked for {})",
                lib.path.display(),
                path.display()
            )));
        }
        return Ok(lib);
    }
    // A bare file name is left to the system loader's search path.
    if path.components().count() > 1 && !path.exists() {
        return Err(RuntimeError::Load(format!(
            "no ONNX Runtime library at {} (set `onnxruntime_library` in agent.toml, the board's `onnxruntime.library` or ORT_DYLIB_PATH; the PyPI `onnxruntime` wheel ships one in onnxruntime/capi/)",
            path.display()
        )));
    }
    let environment = ort::init_from(path)
        .map_err(|e| {
            RuntimeError::Load(format!(
                "cannot use ONNX Runtime at {}: {e} (fleetml needs ONNX Runtime {} or newer)",
                path.display(),
                min_version()
            ))
        })?
        .with_name("fleetml")
        .build()
        .map_err(|e| RuntimeError::Load(format!("ONNX Runtime did not start: {e}")))?;
    let version = version_of(ort::info(), path);
    Ok(LIBRARY.get_or_init(|| Library {
        path: path.to_path_buf(),
        version,
        environment,
    }))
}

/// The version in ONNX Runtime's build information (`git-branch=rel-1.32.0, …`), or in
/// the library's file name (`libonnxruntime.so.1.32.0`).
fn version_of(info: &str, path: &Path) -> String {
    let from_info = info.split(['=', ',', ' ']).find_map(|w| {
        let v = w.strip_prefix("rel-")?;
        v.split('.')
            .all(|p| p.parse::<u32>().is_ok())
            .then(|| v.to_string())
    });
    let from_name = || {
        let name = path.file_name()?.to_str()?;
        let v = name.split(".so.").nth(1)?;
        (v.split('.').count() >= 2 && v.split('.').all(|p| p.parse::<u32>().is_ok()))
            .then(|| v.to_string())
    };
    from_info
        .or_else(from_name)
        .unwrap_or_else(|| "unknown".into())
}

fn dispatch(provider: Provider) -> Option<ExecutionProviderDispatch> {
    Some(match provider {
        Provider::Tensorrt => ep::TensorRT::default().build(),
        Provider::Cuda => ep::CUDA::default().build(),
        Provider::Rocm => ep::ROCm::default().build(),
        Provider::Migraphx => ep::MIGraphX::default().build(),
        Provider::Openvino => ep::OpenVINO::default().build(),
        Provider::Qnn => ep::QNN::default().build(),
        Provider::Rknpu => ep::RKNPU::default().build(),
        Provider::Vsinpu => ep::VSINPU.build(),
        Provider::Nnapi => ep::NNAPI::default().build(),
        Provider::Coreml => ep::CoreML::default().build(),
        Provider::Acl => ep::ACL::default().build(),
        Provider::Xnnpack => ep::XNNPACK::default().build(),
        Provider::Cpu => return None,
    })
}

/// A model loaded into ONNX Runtime on one execution provider.
pub struct OrtModel {
    session: Mutex<Session>,
    provider: Provider,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    version: String,
}

impl std::fmt::Debug for OrtModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtModel")
            .field("provider", &self.provider)
            .field("inputs", &self.inputs)
            .finish()
    }
}

impl OrtModel {
    /// Loads `onnx` with `lib` on `provider` alone (ONNX Runtime places nodes the
    /// provider has no kernel for on its CPU kernels, as it always does). `threads`
    /// sets the intra-op pool (ONNX Runtime's default, one per core, when None).
    pub fn load<'a>(
        lib: &Library,
        onnx: impl Into<crate::Onnx<'a>>,
        provider: Provider,
        threads: Option<usize>,
    ) -> Result<OrtModel, RuntimeError> {
        let fail = |e: ort::Error| {
            RuntimeError::Load(format!(
                "ONNX Runtime {} could not load the model on provider `{provider}`: {e}",
                lib.version
            ))
        };
        let mut builder = Session::builder(&lib.environment)
            .map_err(fail)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| fail(e.into()))?;
        if let Some(n) = threads {
            builder = builder.with_intra_threads(n).map_err(|e| fail(e.into()))?;
        }
        if let Some(ep) = dispatch(provider) {
            builder = builder
                .with_execution_providers([ep.error_on_failure()])
                .map_err(|e| fail(e.into()))?;
        }
        let onnx = onnx.into();
        let session = if onnx.external.is_empty() {
            builder.commit_from_memory(onnx.model).map_err(fail)?
        } else {
            // Weights stay in the bundle's buffers; shape tensors go into the graph.
            crate::external::check(onnx)?;
            let model = crate::external::inline_small(onnx)?;
            for (name, bytes) in onnx.external {
                builder = builder
                    .with_external_initializer_file_in_memory(name, bytes.clone())
                    .map_err(|e| fail(e.into()))?;
            }
            builder.commit_from_memory(&model).map_err(fail)?
        };
        let spec = |name: &str, ty: &ValueType| -> Result<TensorSpec, RuntimeError> {
            let ValueType::Tensor {
                ty,
                shape,
                dimension_symbols,
            } = ty
            else {
                return Err(RuntimeError::Unsupported(format!(
                    "`{name}` is not a tensor ({ty:?}); fleetml serves tensors"
                )));
            };
            let dtype = dtype(*ty).ok_or_else(|| {
                RuntimeError::Unsupported(format!("`{name}` has element type {ty:?}"))
            })?;
            let shape = shape
                .iter()
                .enumerate()
                .map(|(axis, d)| {
                    if *d >= 0 {
                        Dim::Fixed(*d as u64)
                    } else {
                        match dimension_symbols.get(axis).filter(|s| !s.is_empty()) {
                            Some(s) => Dim::Symbol(s.clone()),
                            None => Dim::Symbol(format!("{name}:{axis}")),
                        }
                    }
                })
                .collect();
            Ok(TensorSpec {
                name: name.to_string(),
                dtype,
                shape,
            })
        };
        let inputs = session
            .inputs()
            .iter()
            .map(|o| spec(o.name(), o.dtype()))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = session
            .outputs()
            .iter()
            .map(|o| spec(o.name(), o.dtype()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OrtModel {
            session: Mutex::new(session),
            provider,
            inputs,
            outputs,
            version: lib.version.clone(),
        })
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// The ONNX Runtime version the model runs on.
    pub fn library_version(&self) -> &str {
        &self.version
    }

    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// Runs the model on `inputs` (in the model's input order, matched by name).
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        let run = |e: ort::Error| RuntimeError::Run(e.to_string());
        // f16 and bool are converted; every other type is passed without a copy.
        let mut feed: Vec<(String, ort::session::SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len());
        for t in inputs {
            let shape: Vec<i64> = t.shape.iter().map(|d| *d as i64).collect();
            let value = match &t.data {
                TensorData::F32(v) => view(shape, v),
                TensorData::F64(v) => view(shape, v),
                TensorData::I8(v) => view(shape, v),
                TensorData::I32(v) => view(shape, v),
                TensorData::I64(v) => view(shape, v),
                TensorData::U8(v) => view(shape, v),
                TensorData::Bool(v) => view(shape, v),
                TensorData::F16(v) => {
                    let halves: Vec<half::f16> =
                        v.iter().map(|b| half::f16::from_bits(*b)).collect();
                    OrtTensor::from_array((shape, halves)).map(Into::into)
                }
            }
            .map_err(run)?;
            feed.push((t.name.clone(), value));
        }
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run(feed).map_err(run)?;
        self.outputs
            .iter()
            .map(|spec| {
                let value = outputs.get(spec.name.as_str()).ok_or_else(|| {
                    RuntimeError::Run(format!("ONNX Runtime produced no output `{}`", spec.name))
                })?;
                from_ort(&spec.name, value).map_err(run)
            })
            .collect()
    }
}

/// `data` as an input ONNX Runtime reads in place.
fn view<'a, T: PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
    shape: Vec<i64>,
    data: &'a [T],
) -> Result<ort::session::SessionInputValue<'a>, ort::Error> {
    TensorRef::from_array_view((shape, data)).map(Into::into)
}

fn from_ort(name: &str, value: &DynValue) -> Result<Tensor, ort::Error> {
    fn take<T: PrimitiveTensorElementType + Copy + std::fmt::Debug>(
        value: &DynValue,
    ) -> Result<(Vec<u64>, Vec<T>), ort::Error> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        Ok((shape.iter().map(|d| *d as u64).collect(), data.to_vec()))
    }
    let ty = value.dtype().tensor_type();
    let (shape, data) = match ty {
        Some(TensorElementType::Float32) => {
            let (s, d) = take::<f32>(value)?;
            (s, TensorData::F32(d))
        }
        Some(TensorElementType::Float16) => {
            let (s, d) = take::<half::f16>(value)?;
            (s, TensorData::F16(d.iter().map(|h| h.to_bits()).collect()))
        }
        Some(TensorElementType::Float64) => {
            let (s, d) = take::<f64>(value)?;
            (s, TensorData::F64(d))
        }
        Some(TensorElementType::Int8) => {
            let (s, d) = take::<i8>(value)?;
            (s, TensorData::I8(d))
        }
        Some(TensorElementType::Int32) => {
            let (s, d) = take::<i32>(value)?;
            (s, TensorData::I32(d))
        }
        Some(TensorElementType::Int64) => {
            let (s, d) = take::<i64>(value)?;
            (s, TensorData::I64(d))
        }
        Some(TensorElementType::Uint8) => {
            let (s, d) = take::<u8>(value)?;
            (s, TensorData::U8(d))
        }
        Some(TensorElementType::Bool) => {
            let (s, d) = take::<bool>(value)?;
            (s, TensorData::Bool(d))
        }
        other => {
            return Err(ort::Error::new(format!(
                "output `{name}` has element type {other:?}, which fleetml does not serve"
            )));
        }
    };
    Ok(Tensor {
        name: name.to_string(),
        shape,
        data,
    })
}

fn dtype(ty: TensorElementType) -> Option<DType> {
    Some(match ty {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float16 => DType::F16,
        TensorElementType::Float64 => DType::F64,
        TensorElementType::Int8 => DType::I8,
        TensorElementType::Int16 => DType::I16,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Uint8 => DType::U8,
        TensorElementType::Uint16 => DType::U16,
        TensorElementType::Uint32 => DType::U32,
        TensorElementType::Uint64 => DType::U64,
        TensorElementType::Bool => DType::Bool,
        TensorElementType::String => DType::String,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_from_build_info_or_file_name() {
        let info = "ORT Build Info: git-branch=rel-1.32.0, git-commit-id=abc, build type=Release";
        assert_eq!(
            version_of(info, Path::new("/x/libonnxruntime.so")),
            "1.32.0"
        );
        assert_eq!(
            version_of("", Path::new("/x/libonnxruntime.so.1.31.1")),
            "1.31.1"
        );
        assert_eq!(version_of("", Path::new("/x/libonnxruntime.so")), "unknown");
    }
}
