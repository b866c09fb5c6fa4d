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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    pub agent: AgentLimits,
    pub paths: Paths,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cpu,
    Gpu,
    Npu,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Gpu => "gpu",
            Backend::Npu => "npu",
        }
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
            if *b != Backend::Cpu && !self.accelerators.iter().any(|a| a.kind == *b) {
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
                Backend::Cpu => return invalid("accelerators cannot be of kind `cpu`".into()),
                _ => {}
            }
        }
        if self.agent.memory_budget_mb == 0 || self.agent.memory_budget_mb > self.memory_mb {
            return invalid("`agent.memory_budget_mb` must be between 1 and `memory_mb`".into());
        }
        if self.agent.threads == Some(0) {
            return invalid("`agent.threads` must be at least 1".into());
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
