//! Board profiles (`boards/*.toml`): what a class of device is and how the agent should
//! run on it.
//!
//! ```toml
//! name = "raspberry-pi-4"
//! description = "Raspberry Pi 4 Model B, 4 GB"
//! target = "aarch64-unknown-linux-gnu"
//! cpu_cores = 4
//! memory_mb = 4096
//! backends = ["cpu"]
//!
//! [agent]
//! memory_budget_mb = 256
//!
//! [paths]
//! data_dir = "/var/lib/fleetml"
//! config_dir = "/etc/fleetml"
//! ```

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardProfile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Rust target triple of the agent build for this board.
    pub target: String,
    pub cpu_cores: u32,
    pub memory_mb: u64,
    /// Backends to try, most preferred first; the agent falls back along this list.
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub accelerators: Vec<Accelerator>,
    /// How the `onnxruntime` backend runs on this board: which library, which execution
    /// providers in order, and their golden tolerances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnxruntime: Option<OnnxRuntime>,
    pub agent: AgentLimits,
    pub paths: Paths,
}

/// An inference backend: `cpu` is tract (small, no dependencies, the default), `gpu` is
/// wonnx over WebGPU, `npu` a vendor delegate the agent does not carry, `onnxruntime`
/// ONNX Runtime loaded from the board's `libonnxruntime` with its execution providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cpu,
    Gpu,
    Npu,
    Onnxruntime,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Gpu => "gpu",
            Backend::Npu => "npu",
            Backend::Onnxruntime => "onnxruntime",
        }
    }
}

/// An ONNX Runtime execution provider, by the name operators know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// NVIDIA TensorRT (Jetson, GPU servers).
    Tensorrt,
    /// NVIDIA CUDA.
    Cuda,
    /// AMD ROCm.
    Rocm,
    /// AMD MIGraphX.
    Migraphx,
    /// Intel OpenVINO (CPU, iGPU, NPU, VPU).
    Openvino,
    /// Qualcomm QNN (Hexagon NPU).
    Qnn,
    /// Rockchip RKNPU (RK3588 and kin).
    Rknpu,
    /// VeriSilicon VSI NPU (NXP i.MX 8M Plus).
    Vsinpu,
    /// Android NNAPI.
    Nnapi,
    /// Apple Core ML.
    Coreml,
    /// Arm Compute Library.
    Acl,
    /// XNNPACK (optimized CPU kernels for Arm and x86).
    Xnnpack,
    /// ONNX Runtime's own CPU kernels.
    Cpu,
}

impl Provider {
    pub const ALL: [Provider; 13] = [
        Provider::Tensorrt,
        Provider::Cuda,
        Provider::Rocm,
        Provider::Migraphx,
        Provider::Openvino,
        Provider::Qnn,
        Provider::Rknpu,
        Provider::Vsinpu,
        Provider::Nnapi,
        Provider::Coreml,
        Provider::Acl,
        Provider::Xnnpack,
        Provider::Cpu,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Tensorrt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::Rocm => "rocm",
            Provider::Migraphx => "migraphx",
            Provider::Openvino => "openvino",
            Provider::Qnn => "qnn",
            Provider::Rknpu => "rknpu",
            Provider::Vsinpu => "vsinpu",
            Provider::Nnapi => "nnapi",
            Provider::Coreml => "coreml",
            Provider::Acl => "acl",
            Provider::Xnnpack => "xnnpack",
            Provider::Cpu => "cpu",
        }
    }

    pub fn parse(s: &str) -> Option<Provider> {
        Provider::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `[onnxruntime]` section of a board profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxRuntime {
    /// Where the board keeps `libonnxruntime` (the agent's `agent.toml` and
    /// `ORT_DYLIB_PATH` take precedence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
    /// Execution providers to try, most preferred first. Each is registered on its own
    /// and must load; one that does not is reported with its reason and the next one
    /// is tried.
    pub providers: Vec<Provider>,
    /// Golden self-test tolerances for providers that compute differently (fp16
    /// kernels); the bundle's own tolerances apply when they are wider.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerances: Vec<ProviderTolerance>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderTolerance {
    pub provider: Provider,
    pub abs: f32,
    pub rel: f32,
}

impl OnnxRuntime {
    /// The golden tolerances `(abs, rel)` the board sets for `provider`, if any.
    pub fn tolerance(&self, provider: Provider) -> Option<(f32, f32)> {
        self.tolerances
            .iter()
            .find(|t| t.provider == provider)
            .map(|t| (t.abs, t.rel))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accelerator {
    pub kind: Backend,
    /// Human name of the device (`NVIDIA Ampere, 1024 CUDA cores`).
    pub name: String,
    /// Graphics/compute API for a GPU (`vulkan`, `metal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// Delegate library an NPU backend would load (`libvx_delegate.so`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentLimits {
    /// Memory the agent may use, models included.
    pub memory_budget_mb: u64,
    /// Disk the model store may use; older versions are collected beyond it.
    #[serde(default = "default_store_mb")]
    pub store_budget_mb: u64,
    /// Inference threads; the core count when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Threads one model run may use inside the runtime: ONNX Runtime's intra-op pool
    /// (its default, one per core, when absent) and tract's matrix-product pool (one
    /// thread when absent; agents built with the `tract-threads` feature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intra_op_threads: Option<u32>,
}

fn default_store_mb() -> u64 {
    1024
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paths {
    /// Model store, outbox and state.
    pub data_dir: String,
    /// Agent configuration, trust policy, device credentials.
    pub config_dir: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_dir: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BoardError {
    #[error("board profile is not valid TOML for this format: {0}")]
    Syntax(String),
    #[error("board profile `{board}`: {problem}")]
    Invalid { board: String, problem: String },
}

impl BoardProfile {
    pub fn from_toml(text: &str) -> Result<Self, BoardError> {
        let board: BoardProfile =
            toml::from_str(text).map_err(|e| BoardError::Syntax(e.message().trim().to_string()))?;
        board.validate()?;
        Ok(board)
    }

    pub fn validate(&self) -> Result<(), BoardError> {
        let invalid = |problem: String| {
            Err(BoardError::Invalid {
                board: self.name.clone(),
                problem,
            })
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        {
            return invalid("`name` must be letters, digits, `-` or `_`".into());
        }
        let parts = self.target.split('-').count();
        if !(3..=4).contains(&parts) || self.target.contains(char::is_whitespace) {
            return invalid(format!("`target` `{}` is not a target triple", self.target));
        }
        if self.cpu_cores == 0 || self.memory_mb == 0 {
            return invalid("`cpu_cores` and `memory_mb` must be at least 1".into());
        }
        if self.backends.is_empty() {
            return invalid("`backends` must list at least one backend".into());
        }
        for (i, b) in self.backends.iter().enumerate() {
            if self.backends[..i].contains(b) {
                return invalid(format!("backend `{}` is listed twice", b.as_str()));
            }
            if matches!(b, Backend::Gpu | Backend::Npu)
                && !self.accelerators.iter().any(|a| a.kind == *b)
            {
                return invalid(format!(
                    "backend `{}` is listed but no accelerator of that kind is declared",
                    b.as_str()
                ));
            }
        }
        for a in &self.accelerators {
            match a.kind {
                Backend::Gpu if a.api.is_none() => {
                    return invalid(format!("GPU `{}` needs an `api` (e.g. vulkan)", a.name));
                }
                Backend::Npu if a.delegate.is_none() => {
                    return invalid(format!("NPU `{}` needs a `delegate`", a.name));
                }
                Backend::Cpu | Backend::Onnxruntime => {
                    return invalid(format!(
                        "accelerators cannot be of kind `{}`",
                        a.kind.as_str()
                    ));
                }
                _ => {}
            }
        }
        match (
            &self.onnxruntime,
            self.backends.contains(&Backend::Onnxruntime),
        ) {
            (None, true) => {
                return invalid(
                    "backend `onnxruntime` is listed but there is no `[onnxruntime]` section with its `providers`"
                        .into(),
                );
            }
            (Some(ort), _) => {
                if ort.providers.is_empty() {
                    return invalid(
                        "`onnxruntime.providers` must list at least one provider".into(),
                    );
                }
                for (i, p) in ort.providers.iter().enumerate() {
                    if ort.providers[..i].contains(p) {
                        return invalid(format!("provider `{p}` is listed twice"));
                    }
                }
                for t in &ort.tolerances {
                    if !(t.abs.is_finite() && t.rel.is_finite() && t.abs >= 0.0 && t.rel >= 0.0) {
                        return invalid(format!(
                            "tolerances of provider `{}` must be finite and not negative",
                            t.provider
                        ));
                    }
                }
                if ort.library.as_deref().is_some_and(|l| !l.starts_with('/')) {
                    return invalid("`onnxruntime.library` must be an absolute path".into());
                }
            }
            (None, false) => {}
        }
        if self.agent.memory_budget_mb == 0 || self.agent.memory_budget_mb > self.memory_mb {
            return invalid("`agent.memory_budget_mb` must be between 1 and `memory_mb`".into());
        }
        if self.agent.threads == Some(0) || self.agent.intra_op_threads == Some(0) {
            return invalid(
                "`agent.threads` and `agent.intra_op_threads` must be at least 1".into(),
            );
        }
        for (what, p) in [
            ("data_dir", Some(&self.paths.data_dir)),
            ("config_dir", Some(&self.paths.config_dir)),
            ("log_dir", self.paths.log_dir.as_ref()),
        ] {
            if let Some(p) = p
                && !p.starts_with('/')
            {
                return invalid(format!("`paths.{what}` must be an absolute path"));
            }
        }
        Ok(())
    }
}
