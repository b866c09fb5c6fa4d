//! The model registry of `fleetctl serve`: bundles verified against the server's trust
//! policy before they are kept, content-addressed by a [`BlobStore`]
//! (`DATA_DIR/blobs/<sha256>.fmb`), with one record per name and version in a
//! [`RegistryStore`].
//!
//! A re-push of identical bytes changes nothing; the same name and version with other
//! bytes is refused — a version, once pushed, means one thing forever.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use fleetml_protocol::bundle::{self, Limits, VerifiedBundle};
use fleetml_protocol::trust::TrustPolicy;

pub use crate::records::ModelRecord;
use crate::store::{BlobStore, RegistryStore, StoreError};

/// Stages a model version moves through.
pub const STAGES: [&str; 4] = ["candidate", "staging", "production", "archived"];

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    New(ModelRecord),
    /// The same bytes were pushed before.
    Unchanged(ModelRecord),
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "the server has no trust policy to verify bundles with: start `fleetctl serve --trust TRUST.toml`"
    )]
    NoTrustPolicy,
    #[error("the bundle failed verification: {0}")]
    Invalid(String),
    #[error(
        "{name} v{version} is already in the registry with other bytes (sha256 {existing}); push a new version instead"
    )]
    Conflict {
        name: String,
        version: u64,
        existing: String,
    },
    #[error("registry storage: {0}")]
    Storage(String),
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        RegistryError::Storage(e.to_string())
    }
}

impl From<std::io::Error> for RegistryError {
    fn from(e: std::io::Error) -> Self {
        RegistryError::Storage(e.to_string())
    }
}

/// The registry.
#[derive(Clone)]
pub struct Registry {
    blobs: Arc<dyn BlobStore>,
    models: Arc<dyn RegistryStore>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// The registry: records in `models`, bundle files in `blobs`.
    pub fn new(models: Arc<dyn RegistryStore>, blobs: Arc<dyn BlobStore>) -> Registry {
        Registry { blobs, models }
    }

    /// Where a new upload is written before it is verified.
    pub fn incoming(&self) -> Result<tempfile::NamedTempFile, RegistryError> {
        Ok(self.blobs.incoming()?)
    }

    /// A local file holding bundle `digest` (from object storage, fetched into the
    /// replica's cache first).
    pub fn blob_path(&self, digest: &str) -> std::io::Result<PathBuf> {
        self.blobs.local(digest)
    }

    /// Verifies the uploaded bundle in `file` and keeps it (blocking: hashes the file).
    pub fn push(
        &self,
        mut file: tempfile::NamedTempFile,
        policy: Option<&TrustPolicy>,
        now_ms: u64,
    ) -> Result<Pushed, RegistryError> {
        let policy = policy.ok_or(RegistryError::NoTrustPolicy)?;
        file.as_file_mut().flush()?;
        let verified: VerifiedBundle = bundle::verify(
            std::io::BufReader::with_capacity(bundle::CHUNK, file.reopen()?),
            policy,
            &Limits::default(),
        )
        .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let m = &verified.manifest;
        let digest = verified.digest.to_string();
        if let Some(existing) = self.get(&m.name, m.version)? {
            return if existing.digest == digest {
                Ok(Pushed::Unchanged(existing))
            } else {
                Err(RegistryError::Conflict {
                    name: m.name.clone(),
                    version: m.version,
                    existing: existing.digest,
                })
            };
        }
        file.as_file().sync_all()?;
        self.blobs.keep(file, &digest)?;
        let record = ModelRecord {
            name: m.name.clone(),
            version: m.version,
            label: m.label.clone(),
            digest,
            size: verified.size,
            signed_by: verified.signed_by.iter().map(|k| k.to_string()).collect(),
            pushed_ms: now_ms,
            stage: STAGES[0].to_string(),
            tags: Default::default(),
        };
        match self.models.insert_model_version(&record)? {
            None => Ok(Pushed::New(record)),
            // A concurrent push of the same version got there first.
            Some(existing) if existing.digest == record.digest => Ok(Pushed::Unchanged(existing)),
            Some(existing) => Err(RegistryError::Conflict {
                name: record.name,
                version: record.version,
                existing: existing.digest,
            }),
        }
    }

    /// Changes the record of `name` v`version` with `change`; `None` when there is none.
    pub fn update(
        &self,
        name: &str,
        version: u64,
        change: impl Fn(&mut ModelRecord) + Sync,
    ) -> Result<Option<ModelRecord>, RegistryError> {
        Ok(self.models.update_model_version(name, version, &change)?)
    }

    pub fn get(&self, name: &str, version: u64) -> Result<Option<ModelRecord>, RegistryError> {
        Ok(self.models.model_version(name, version)?)
    }

    /// Every version of `name` (or of every model), by name, then version.
    pub fn list(&self, name: Option<&str>) -> Result<Vec<ModelRecord>, RegistryError> {
        Ok(self.models.model_versions(name)?)
    }
}

/// `NAME@VERSION` (the version may be written `v3`) as its parts.
pub fn parse_model_version(spec: &str) -> Result<(String, u64), String> {
    let (name, version) = spec
        .split_once('@')
        .ok_or_else(|| format!("`{spec}`: expected NAME@VERSION (e.g. claims@3)"))?;
    let version = version
        .trim_start_matches('v')
        .parse()
        .map_err(|_| format!("`{spec}`: the version is not a number"))?;
    Ok((name.to_string(), version))
}
