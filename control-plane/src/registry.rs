//! The model registry of `fleetctl serve`: bundles verified against the server's trust
//! policy before they are kept, content-addressed in `DATA_DIR/blobs/<sha256>.fmb`, with
//! one record per name and version in sled (tree `models`).
//!
//! A re-push of identical bytes changes nothing; the same name and version with other
//! bytes is refused — a version, once pushed, means one thing forever.

use std::io::Write;
use std::path::{Path, PathBuf};

use fleetml_protocol::bundle::{self, Limits, VerifiedBundle};
use fleetml_protocol::trust::TrustPolicy;
use serde::{Deserialize, Serialize};

/// Stages a model version moves through.
pub const STAGES: [&str; 4] = ["candidate", "staging", "production", "archived"];

/// One pushed model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub name: String,
    pub version: u64,
    pub label: String,
    /// SHA-256 of the bundle file, hex: its name in the blob directory.
    pub digest: String,
    pub size: u64,
    pub signed_by: Vec<String>,
    pub pushed_ms: u64,
    pub stage: String,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
}

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

impl From<sled::Error> for RegistryError {
    fn from(e: sled::Error) -> Self {
        RegistryError::Storage(e.to_string())
    }
}

impl From<std::io::Error> for RegistryError {
    fn from(e: std::io::Error) -> Self {
        RegistryError::Storage(e.to_string())
    }
}

/// The registry.
#[derive(Debug, Clone)]
pub struct Registry {
    blobs: PathBuf,
    models: sled::Tree,
}

fn key(name: &str, version: u64) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

impl Registry {
    /// Opens the registry: blobs in `blobs`, records in `db`'s tree `models`.
    pub fn open(db: &sled::Db, blobs: &Path) -> Result<Registry, RegistryError> {
        std::fs::create_dir_all(blobs)?;
        Ok(Registry {
            blobs: blobs.to_path_buf(),
            models: db.open_tree("models")?,
        })
    }

    /// Where a new upload is written before it is verified.
    pub fn incoming(&self) -> Result<tempfile::NamedTempFile, RegistryError> {
        Ok(tempfile::Builder::new()
            .prefix(".incoming-")
            .tempfile_in(&self.blobs)?)
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.blobs.join(format!("{digest}.fmb"))
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
        file.persist(self.blob_path(&digest))
            .map_err(|e| RegistryError::Storage(e.to_string()))?;
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
        let bytes =
            serde_json::to_vec(&record).map_err(|e| RegistryError::Storage(e.to_string()))?;
        let won = self
            .models
            .compare_and_swap(key(&m.name, m.version), None as Option<&[u8]>, Some(bytes))?
            .is_ok();
        self.models.flush()?;
        if !won {
            // A concurrent push of the same version got there first.
            return match self.get(&m.name, m.version)? {
                Some(existing) if existing.digest == record.digest => {
                    Ok(Pushed::Unchanged(existing))
                }
                Some(existing) => Err(RegistryError::Conflict {
                    name: record.name,
                    version: record.version,
                    existing: existing.digest,
                }),
                None => Err(RegistryError::Storage("the record vanished".into())),
            };
        }
        Ok(Pushed::New(record))
    }

    /// Changes the record of `name` v`version` with `change`; `None` when there is none.
    pub fn update(
        &self,
        name: &str,
        version: u64,
        change: impl Fn(&mut ModelRecord),
    ) -> Result<Option<ModelRecord>, RegistryError> {
        let mut out = None;
        let mut failure = None;
        self.models.update_and_fetch(key(name, version), |old| {
            let old = old?;
            match serde_json::from_slice::<ModelRecord>(old) {
                Ok(mut r) => {
                    change(&mut r);
                    let bytes = serde_json::to_vec(&r).ok();
                    out = Some(r);
                    bytes.or_else(|| Some(old.to_vec()))
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    Some(old.to_vec())
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(RegistryError::Storage(e));
        }
        self.models.flush()?;
        Ok(out)
    }

    pub fn get(&self, name: &str, version: u64) -> Result<Option<ModelRecord>, RegistryError> {
        match self.models.get(key(name, version))? {
            Some(v) => Ok(Some(
                serde_json::from_slice(&v).map_err(|e| RegistryError::Storage(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    /// Every version of `name` (or of every model), oldest first.
    pub fn list(&self, name: Option<&str>) -> Result<Vec<ModelRecord>, RegistryError> {
        let prefix = name.map(|n| {
            let mut p = n.as_bytes().to_vec();
            p.push(0);
            p
        });
        self.models
            .scan_prefix(prefix.unwrap_or_default())
            .map(|kv| {
                let (_, v) = kv?;
                serde_json::from_slice(&v).map_err(|e| RegistryError::Storage(e.to_string()))
            })
            .collect()
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
