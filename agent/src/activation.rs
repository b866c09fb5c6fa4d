//! The activation pipeline: verify → stage into the store → choose a backend and
//! self-test the model on it → swap. A failure at any step leaves the active version
//! serving and is recorded in the store with its reason.

use std::fs::File;
use std::path::Path;

use fleetml_protocol::board::{AgentLimits, Backend as Kind, BoardProfile, Paths};
use fleetml_protocol::bundle::{Limits, VerifiedBundle};
use fleetml_protocol::manifest::{GOLDEN_ENTRY, GPU_MODEL_ENTRY, MODEL_ENTRY};
use fleetml_protocol::trust::TrustPolicy;

use crate::backend::{self, NoBackend, Selection};
use crate::selftest::SelfTest;
use crate::store::{ModelState, ModelStore, StoreError};

/// Largest model read into memory.
pub const MAX_MODEL: u64 = 2 << 30;
/// Largest external data file (a model's weights kept beside it) read into memory.
pub const MAX_EXTERNAL: u64 = 16 << 30;
/// Largest golden vector set read into memory.
pub const MAX_GOLDEN: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{model} v{version}: {source}")]
    NoBackend {
        model: String,
        version: u64,
        source: NoBackend,
    },
}

/// What an activation did.
#[derive(Debug)]
pub struct Activated {
    pub state: ModelState,
    pub self_test: Option<SelfTest>,
    /// `<backend> requested, <reason>, fell back to <backend>` lines.
    pub fallbacks: Vec<String>,
}

/// A board profile for "this machine, CPU only", used when none is given.
pub fn local_cpu_board() -> BoardProfile {
    BoardProfile {
        name: "local-cpu".into(),
        description: "this machine, CPU inference".into(),
        target: format!("{}-unknown-linux-gnu", std::env::consts::ARCH),
        cpu_cores: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_mb: 1024,
        backends: vec![Kind::Cpu],
        accelerators: vec![],
        onnxruntime: None,
        agent: AgentLimits {
            memory_budget_mb: 1024,
            store_budget_mb: 1024,
            threads: None,
            intra_op_threads: None,
        },
        paths: Paths {
            data_dir: "/var/lib/fleetml".into(),
            config_dir: "/etc/fleetml".into(),
            log_dir: None,
        },
    }
}

/// Loads the model (and golden vectors) of a stored, verified bundle and chooses its
/// backend on `board`. Payloads are re-hashed as they are read.
pub fn prepare(
    stored: &Path,
    verified: &VerifiedBundle,
    board: &BoardProfile,
) -> Result<Selection, PrepareError> {
    let mut file = File::open(stored).map_err(|e| PrepareError::Read(e.to_string()))?;
    let (onnx, external) = fleetml_inference::external::read_from_bundle(
        verified,
        &mut file,
        MODEL_ENTRY,
        MAX_MODEL,
        MAX_EXTERNAL,
    )
    .map_err(PrepareError::Read)?;
    let mut optional = |name: &str, max: u64| match verified.manifest.entry(name) {
        Some(_) => verified
            .read_entry(&mut file, name, max)
            .map(Some)
            .map_err(|e| PrepareError::Read(e.to_string())),
        None => Ok(None),
    };
    let golden = optional(GOLDEN_ENTRY, MAX_GOLDEN)?;
    // The GPU copy is only read when the board would try the GPU at all.
    let gpu_onnx = if board.backends.contains(&Kind::Gpu) {
        optional(GPU_MODEL_ENTRY, MAX_MODEL)?
    } else {
        None
    };
    let model = backend::ModelFiles {
        onnx: fleetml_inference::Onnx {
            model: &onnx,
            external: &external,
        },
        gpu_onnx: gpu_onnx.as_deref(),
        inputs: &verified.manifest.inputs,
    };
    backend::select(board, &model, golden.as_deref()).map_err(PrepareError::NoBackend)
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("reading the stored bundle: {0}")]
    Read(String),
    #[error(transparent)]
    NoBackend(NoBackend),
}

impl PrepareError {
    /// As a [`NoBackend`] on `board` (a bundle that cannot be read loads nowhere).
    fn into_no_backend(self, board: &BoardProfile) -> NoBackend {
        match self {
            PrepareError::NoBackend(n) => n,
            PrepareError::Read(reason) => NoBackend {
                board: board.name.clone(),
                reasons: vec![backend::Fallback {
                    backend: Kind::Cpu,
                    provider: None,
                    reason,
                }],
            },
        }
    }
}

/// Installs and activates the bundle at `source`.
pub fn install(
    store: &ModelStore,
    source: &Path,
    policy: &TrustPolicy,
    board: &BoardProfile,
    limits: &Limits,
    now: u64,
) -> Result<Activated, ActivationError> {
    install_as(
        (store, source, policy, board, limits),
        |verified, backend, fallbacks| store.activate(verified, backend, fallbacks, now),
        |verified, reason| store.record_failure(verified, reason, now),
    )
}

/// Verify → stage → prepare (backend selection and golden self-test) → record as the
/// shadow of its model, run on `sample_permille` of the requests. Nothing serving
/// changes; a failure is returned, not recorded as the model's failure.
pub fn install_shadow(
    store: &ModelStore,
    source: &Path,
    policy: &TrustPolicy,
    board: &BoardProfile,
    limits: &Limits,
    sample_permille: u16,
    now: u64,
) -> Result<Activated, ActivationError> {
    install_as(
        (store, source, policy, board, limits),
        |verified, backend, _| store.set_shadow(verified, backend, sample_permille, now),
        |_, _| store.gc().map(drop),
    )
}

/// Stage → prepare, then `keep` the prepared version (with its backend and fallbacks)
/// or, when no backend took it, record `failed`.
fn install_as(
    (store, source, policy, board, limits): (
        &ModelStore,
        &Path,
        &TrustPolicy,
        &BoardProfile,
        &Limits,
    ),
    keep: impl FnOnce(&VerifiedBundle, &str, Vec<String>) -> Result<ModelState, StoreError>,
    failed: impl FnOnce(&VerifiedBundle, &str) -> Result<(), StoreError>,
) -> Result<Activated, ActivationError> {
    let (verified, stored) = store.stage(source, policy, limits)?;
    let m = &verified.manifest;
    match prepare(&stored, &verified, board) {
        Ok(selection) => {
            let fallbacks = selection.report();
            let state = keep(
                &verified,
                &backend::describe(selection.backend.as_ref()),
                fallbacks.clone(),
            )
            .inspect_err(|_| {
                // Staged but kept by nothing (a shadow of a model not installed).
                let _ = store.gc();
            })?;
            Ok(Activated {
                state,
                self_test: selection.self_test,
                fallbacks,
            })
        }
        Err(e) => {
            failed(&verified, &e.to_string())?;
            Err(ActivationError::NoBackend {
                model: m.name.clone(),
                version: m.version,
                source: e.into_no_backend(board),
            })
        }
    }
}
