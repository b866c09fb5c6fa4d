//! What a training job is: its spec (TOML, checked before anything runs), its state,
//! its trials, and the job record the store keeps. Plain data and its parsing: no I/O.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A job spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub model: String,
    /// The registered trainer whose command this job runs (`fleetctl trainers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer: Option<String>,
    /// Environment the trainer adds to the trial's (otherwise cleared) environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default = "default_executor")]
    pub executor: String,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_metric")]
    pub metric: String,
    #[serde(default = "default_goal")]
    pub goal: String,
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default)]
    pub datasets: Vec<String>,
    #[serde(default)]
    pub holdout: Option<String>,
    #[serde(default)]
    pub captures: Option<CaptureSelection>,
    #[serde(default)]
    pub code_repository: Option<String>,
    #[serde(default)]
    pub code_commit: Option<String>,
    /// A local clone of `code_repository`: when set, a job (and a reproduction) runs
    /// only while `code_commit` is in it.
    #[serde(default)]
    pub code_dir: Option<PathBuf>,
    #[serde(default)]
    pub params: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<toml::Value>>,
    #[serde(default)]
    pub resources: Resources,
    /// Where and how the kubernetes executor runs trials.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSelection {
    #[serde(default = "yes")]
    pub labelled_only: bool,
    /// Only rows captured within this many seconds before the job starts.
    #[serde(default)]
    pub since_s: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub gpus: u32,
    #[serde(default)]
    pub cpu: Option<String>,
    #[serde(default)]
    pub memory: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_executor() -> String {
    "local".into()
}
fn default_seed() -> u64 {
    42
}
fn default_metric() -> String {
    "auc".into()
}
fn default_goal() -> String {
    "max".into()
}
fn default_timeout() -> u64 {
    1800
}
fn default_concurrency() -> usize {
    1
}

/// Most trials one grid may expand to.
pub const MAX_TRIALS: usize = 256;

impl JobSpec {
    pub fn from_toml(text: &str) -> Result<JobSpec, String> {
        let spec: JobSpec =
            toml::from_str(text).map_err(|e| format!("job spec: {}", e.message()))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), String> {
        match self.executor.as_str() {
            "local" if self.command.is_empty() => {
                return Err("job spec: the local executor needs `command`".into());
            }
            "kubernetes" if self.image.is_none() => {
                return Err("job spec: the kubernetes executor needs `image`".into());
            }
            "kubernetes"
                if self
                    .kubernetes
                    .as_ref()
                    .and_then(|k| k.volume_claim.as_ref())
                    .is_none() =>
            {
                return Err(
                    "job spec: the kubernetes executor needs `[kubernetes] volume_claim` (shared storage for inputs and outputs)"
                        .into(),
                );
            }
            "local" | "kubernetes" => {}
            other => {
                return Err(format!(
                    "job spec: executor `{other}` is not local or kubernetes"
                ));
            }
        }
        if !matches!(self.goal.as_str(), "max" | "min") {
            return Err(format!("job spec: goal `{}` is not max or min", self.goal));
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            return Err("job spec: concurrency must be 1..=64".into());
        }
        if self.trials().len() > MAX_TRIALS {
            return Err(format!(
                "job spec: the grid expands to more than {MAX_TRIALS} trials"
            ));
        }
        Ok(())
    }

    /// The hyperparameters of every trial: `params` merged with each point of `grid`.
    pub fn trials(&self) -> Vec<BTreeMap<String, toml::Value>> {
        let mut out = vec![self.params.clone()];
        for (name, values) in &self.grid {
            if values.is_empty() {
                continue;
            }
            let mut next = Vec::with_capacity(out.len() * values.len());
            for base in &out {
                for v in values {
                    let mut p = base.clone();
                    p.insert(name.clone(), v.clone());
                    next.push(p);
                }
                if next.len() > MAX_TRIALS {
                    break;
                }
            }
            out = next;
        }
        out
    }

    /// `better(a, b)`: whether metric value `a` beats `b` under the goal.
    pub fn better(&self, a: f64, b: f64) -> bool {
        if self.goal == "min" { a < b } else { a > b }
    }
}

pub(crate) fn param_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// One run of the training command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub n: usize,
    pub params: BTreeMap<String, String>,
    pub state: JobState,
    pub metric: Option<f64>,
    pub metrics: Value,
    /// SHA-256 of the trial's model.onnx.
    pub artifact_sha256: Option<String>,
    pub error: Option<String>,
    pub seconds: Option<f64>,
}

/// A job as the control plane keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub model: String,
    /// `train` or `reproduce`.
    pub kind: String,
    pub spec: JobSpec,
    pub state: JobState,
    /// Why it ran: `manual (token …)`, the drift policy, a reproduction of NAME@V.
    pub trigger: String,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Datasets given (ids) and the combined training dataset.
    pub inputs: Vec<String>,
    pub training_dataset: Option<String>,
    pub trials: Vec<Trial>,
    pub best: Option<usize>,
    /// The registered candidate: (name, version, bundle digest).
    pub candidate: Option<(String, u64, String)>,
    pub error: Option<String>,
    /// For `reproduce`: the version reproduced and the comparison.
    #[serde(default)]
    pub reproduces: Option<(String, u64)>,
    #[serde(default)]
    pub report: Option<Value>,
}

/// `[kubernetes]` of a job spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSpec {
    /// API server URL: `https://` (its certificate checked against `ca`, else the
    /// system's CA store; rustls on ring), or plain `http://` to the API behind `kubectl
    /// proxy`; default: the in-cluster service account or KUBECONFIG (their CA).
    #[serde(default)]
    pub url: Option<String>,
    /// The CA (PEM file) an `https://` `url`'s certificate is checked against.
    #[serde(default)]
    pub ca: Option<std::path::PathBuf>,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The ReadWriteMany claim holding the jobs folder.
    #[serde(default)]
    pub volume_claim: Option<String>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub node_selector: std::collections::BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".into()
}
