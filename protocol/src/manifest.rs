//! The bundle manifest: what a model version is, what it contains, what it expects, and
//! where it came from. Stored as canonical CBOR; the signatures cover exactly those bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::crypto::Sha256;
use crate::features::{FeatureError, FeatureSchema};
pub use crate::tensor::{DType, Dim, TensorSpec};

/// The manifest schema this crate writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;
/// The most payload entries a manifest may list.
pub const MAX_ENTRIES: usize = 256;
/// The most input or output tensors a manifest may list.
pub const MAX_TENSORS: usize = 256;
/// The most dimensions a tensor spec may have.
pub const MAX_RANK: usize = 16;

/// Name of the payload holding the ONNX model (required).
pub const MODEL_ENTRY: &str = "model.onnx";
/// Name of the payload holding the reference profile for drift monitoring.
pub const REFERENCE_ENTRY: &str = "reference.cbor";
/// Name of the payload holding the golden self-test vectors.
pub const GOLDEN_ENTRY: &str = "golden.cbor";
/// Name of the payload holding the model prepared for the GPU backend
/// (`fleetctl bundle build --prepare gpu`): static shapes, lowered operators.
pub const GPU_MODEL_ENTRY: &str = "model.gpu.onnx";
/// Name of the payload holding the GPU preparation's compatibility report (JSON).
pub const GPU_COMPAT_ENTRY: &str = "gpu-compat.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest schema version; [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Model name: 1-64 characters of letters, digits, `_`, `-`, `.`.
    pub name: String,
    /// Monotonic version number, at least 1.
    pub version: u64,
    /// Free-form label (e.g. `2026-11-claims-q4`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    /// Creation time, seconds since the Unix epoch (UTC), as supplied by the builder.
    pub created_at: u64,
    /// Payload entries, in the order their bytes follow in the bundle.
    pub entries: Vec<Entry>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub features: FeatureSchema,
    pub targets: Targets,
    /// The oldest agent release that can run this bundle (`MAJOR.MINOR.PATCH`).
    pub min_agent_version: String,
    pub lineage: Lineage,
    /// Monitoring window and alert thresholds chosen for this model (the agent's own
    /// configuration overrides each one it sets).
    #[serde(default, skip_serializing_if = "MonitoringPolicy::is_empty")]
    pub monitoring: MonitoringPolicy,
    /// How the agent serves this model unless its configuration says otherwise.
    #[serde(default, skip_serializing_if = "ServingPolicy::is_empty")]
    pub serving: ServingPolicy,
}

/// Serving settings a bundle may carry (`fleetctl bundle build --max-batch N
/// --max-queue-delay-us US`): dynamic batching, as agent.toml's `[[batching]]` sets it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServingPolicy {
    /// Most rows in one batch (2 or more); absent: not batched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<u32>,
    /// Longest the first request of a batch waits for others, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue_delay_us: Option<u64>,
}

impl ServingPolicy {
    pub fn is_empty(&self) -> bool {
        *self == ServingPolicy::default()
    }
}

/// Monitoring settings a bundle may carry (`fleetctl bundle build --monitoring FILE`):
/// the same keys as the agent's configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_predictions: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_psi: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_js: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_chi2_p: Option<f64>,
    /// A feature alerts when this share of its values are categories the reference
    /// never saw (default 0.05).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unseen_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_rate: Option<f64>,
    /// A classifier with a calibration map alerts when its estimated accuracy falls
    /// below this (default: the limit calibrated for the window size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_estimated_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_p95_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_windows: Option<u8>,
}

impl MonitoringPolicy {
    pub fn is_empty(&self) -> bool {
        *self == MonitoringPolicy::default()
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        let policy: MonitoringPolicy = toml::from_str(text).map_err(|e| e.message().to_string())?;
        policy.validate().map_err(|e| e.to_string())?;
        Ok(policy)
    }

    /// Every setting given is in range: thresholds finite and positive (p-value and rates
    /// below 1), windows at least 1.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |key: &'static str| Err(ManifestError::BadMonitoring(key));
        for (key, v, below_one) in [
            ("drift_psi", self.drift_psi, false),
            ("drift_js", self.drift_js, true),
            ("drift_chi2_p", self.drift_chi2_p, true),
            ("unseen_rate", self.unseen_rate, true),
            ("missing_rate", self.missing_rate, true),
            ("min_estimated_accuracy", self.min_estimated_accuracy, true),
        ] {
            if let Some(v) = v
                && (!v.is_finite() || v <= 0.0 || (below_one && v >= 1.0))
            {
                return bad(key);
            }
        }
        if self.window_predictions == Some(0) {
            return bad("window_predictions");
        }
        if self.window_seconds == Some(0) {
            return bad("window_seconds");
        }
        if self.alert_windows == Some(0) {
            return bad("alert_windows");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    pub sha256: Sha256,
}

/// Backends and boards a bundle was prepared for. Empty lists mean "any".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    #[serde(default)]
    pub backends: Vec<String>,
    #[serde(default)]
    pub boards: Vec<String>,
}

/// Where a model came from. Every field is optional: absent means unknown, and a builder
/// must never invent a value it did not observe.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// SHA-256 of the dependency lockfile the training code was built with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependencies_lock_sha256: Option<String>,
    /// Container image the training ran in, by digest (`registry/image@sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cudnn_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// What the training ran on (`cpu: x86_64`, `NVIDIA H100 80GB`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<CodeRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framework: Option<Framework>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hyperparameters: BTreeMap<String, Param>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRef {
    pub uri: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeRef {
    pub repository: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Framework {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A hyperparameter value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Param {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Param::Bool(b) => write!(f, "{b}"),
            Param::Int(i) => write!(f, "{i}"),
            Param::Float(x) => write!(f, "{x}"),
            Param::Text(s) => f.write_str(s),
        }
    }
}

impl Lineage {
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let lineage: Lineage = toml::from_str(text).map_err(|e| e.message().to_string())?;
        lineage.validate().map_err(|e| e.to_string())?;
        Ok(lineage)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("lineage serializes to TOML")
    }

    fn validate(&self) -> Result<(), ManifestError> {
        let digests = [
            (
                "lineage.dependencies_lock_sha256",
                self.dependencies_lock_sha256.as_deref(),
            ),
            (
                "lineage.dataset.sha256",
                self.dataset.as_ref().and_then(|d| d.sha256.as_deref()),
            ),
        ];
        for (field, value) in digests {
            if let Some(v) = value
                && v.parse::<Sha256>().is_err()
            {
                return Err(ManifestError::Field {
                    field,
                    problem: format!("`{v}` is not a SHA-256 digest (64 hex digits)"),
                });
            }
        }
        for (k, v) in &self.hyperparameters {
            if matches!(v, Param::Float(x) if !x.is_finite()) {
                return Err(ManifestError::Field {
                    field: "lineage.hyperparameters",
                    problem: format!("`{k}` must be a finite number"),
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ManifestError {
    #[error("monitoring setting `{0}` is out of range")]
    BadMonitoring(&'static str),
    #[error("manifest format {0} is not supported (this build reads format {MANIFEST_FORMAT})")]
    UnsupportedFormat(u32),
    #[error("model name `{0}` is invalid: use 1-64 letters, digits, `_`, `-` or `.`")]
    BadModelName(String),
    #[error("model version must be at least 1")]
    ZeroVersion,
    #[error(
        "payload name `{0}` is invalid: use 1-128 letters, digits, `_`, `-` or `.`, not starting with `.`"
    )]
    BadEntryName(String),
    #[error("payload `{0}` is listed twice")]
    DuplicateEntry(String),
    #[error("manifest lists {0} payloads, more than the limit of {MAX_ENTRIES}")]
    TooManyEntries(usize),
    #[error("bundle has no `{0}` payload")]
    MissingEntry(&'static str),
    #[error("manifest declares no {0} tensors")]
    NoTensors(&'static str),
    #[error("tensor spec `{0}` is invalid (empty name, too many dimensions or too many tensors)")]
    BadTensor(String),
    #[error("`min_agent_version` `{0}` is not a MAJOR.MINOR.PATCH version")]
    BadAgentVersion(String),
    #[error("{field}: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    #[error("feature schema: {0}")]
    Features(#[from] FeatureError),
}

fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Payload names are plain file names: no separators, no leading dot, no `..`.
pub fn valid_entry_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Parses `MAJOR.MINOR.PATCH` (a trailing `-pre` is ignored for comparison).
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.split(['-', '+']).next()?;
    let mut parts = core.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((major, minor, patch))
}

impl Manifest {
    /// Semantic checks that need nothing but the manifest itself.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestError::UnsupportedFormat(self.format));
        }
        if !valid_model_name(&self.name) {
            return Err(ManifestError::BadModelName(self.name.clone()));
        }
        if self.version == 0 {
            return Err(ManifestError::ZeroVersion);
        }
        if self.label.len() > 256 {
            return Err(ManifestError::Field {
                field: "label",
                problem: "longer than 256 bytes".into(),
            });
        }
        if self.entries.len() > MAX_ENTRIES {
            return Err(ManifestError::TooManyEntries(self.entries.len()));
        }
        let mut names = BTreeSet::new();
        for e in &self.entries {
            if !valid_entry_name(&e.name) {
                return Err(ManifestError::BadEntryName(e.name.clone()));
            }
            if !names.insert(e.name.as_str()) {
                return Err(ManifestError::DuplicateEntry(e.name.clone()));
            }
        }
        if !names.contains(MODEL_ENTRY) {
            return Err(ManifestError::MissingEntry(MODEL_ENTRY));
        }
        for (what, list) in [("input", &self.inputs), ("output", &self.outputs)] {
            if list.is_empty() {
                return Err(ManifestError::NoTensors(what));
            }
            if list.len() > MAX_TENSORS {
                return Err(ManifestError::BadTensor(format!("{} {what}s", list.len())));
            }
            for t in list.iter() {
                if t.name.is_empty() || t.shape.len() > MAX_RANK {
                    return Err(ManifestError::BadTensor(t.name.clone()));
                }
            }
        }
        if parse_version(&self.min_agent_version).is_none() {
            return Err(ManifestError::BadAgentVersion(
                self.min_agent_version.clone(),
            ));
        }
        self.lineage.validate()?;
        self.monitoring.validate()?;
        self.validate_serving()?;
        self.features.check_against(&self.inputs)?;
        Ok(())
    }

    fn validate_serving(&self) -> Result<(), ManifestError> {
        let bad =
            |field: &'static str, problem: String| Err(ManifestError::Field { field, problem });
        let serving = &self.serving;
        match serving.max_batch {
            None if serving.max_queue_delay_us.is_some() => {
                return bad(
                    "serving.max_queue_delay_us",
                    "is set without serving.max_batch".into(),
                );
            }
            None => {}
            Some(n) if !(2..=65_536).contains(&n) => {
                return bad(
                    "serving.max_batch",
                    format!("{n} is not between 2 and 65536"),
                );
            }
            Some(_) => {
                if let Some(fixed) = self
                    .inputs
                    .iter()
                    .find(|t| !matches!(t.shape.first(), Some(Dim::Symbol(_))))
                {
                    return bad(
                        "serving.max_batch",
                        format!(
                            "input `{}` has no symbolic leading (batch) dimension, so requests cannot be batched (declare it with --input-shape {}=N,…)",
                            fixed.name, fixed.name
                        ),
                    );
                }
            }
        }
        if serving.max_queue_delay_us.is_some_and(|us| us > 10_000_000) {
            return bad(
                "serving.max_queue_delay_us",
                "is more than 10 s (10000000)".into(),
            );
        }
        Ok(())
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Total payload bytes.
    pub fn payload_size(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| e.size)
            .fold(0, u64::saturating_add)
    }

    /// Whether an agent of version `agent` may run this bundle.
    pub fn agent_supported(&self, agent: &str) -> bool {
        match (parse_version(&self.min_agent_version), parse_version(agent)) {
            (Some(min), Some(have)) => have >= min,
            _ => false,
        }
    }

    /// Encodes the manifest canonically: CBOR with map keys in sorted order, integers
    /// and floats in their shortest form. Decoding and re-encoding gives the same bytes.
    pub fn to_canonical_cbor(&self) -> Vec<u8> {
        let value = serde_cbor::value::to_value(self).expect("manifest converts to a CBOR value");
        serde_cbor::to_vec(&value).expect("CBOR value encodes")
    }

    /// Decodes a manifest, refusing any encoding other than the canonical one.
    pub fn from_canonical_cbor(bytes: &[u8]) -> Result<Self, ManifestDecodeError> {
        let value: serde_cbor::Value = serde_cbor::from_slice(bytes)
            .map_err(|e| ManifestDecodeError::Malformed(e.to_string()))?;
        let reencoded = serde_cbor::to_vec(&value)
            .map_err(|e| ManifestDecodeError::Malformed(e.to_string()))?;
        if reencoded != bytes {
            return Err(ManifestDecodeError::NotCanonical);
        }
        serde_cbor::value::from_value(value)
            .map_err(|e| ManifestDecodeError::Malformed(e.to_string()))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestDecodeError {
    #[error("manifest is not valid CBOR for this format: {0}")]
    Malformed(String),
    #[error("manifest is valid CBOR but not in canonical encoding")]
    NotCanonical,
}
