//! Unpacking verified bundles into the agent's data directory.
//!
//! Check first, then persist: [`unpack`] verifies the whole bundle before it creates
//! anything, copies payloads into a hidden staging directory while re-hashing them
//! (the file may change after verification), and renames the staging directory into
//! place only when every payload matched. On any failure nothing is left behind.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use fleetml_protocol::bundle::{self, BundleError, Limits, VerifiedBundle};
use fleetml_protocol::trust::TrustPolicy;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reading {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("bundle needs agent {required} or newer; this agent is {have}")]
    AgentTooOld { required: String, have: String },
    #[error("{0} already exists")]
    Exists(PathBuf),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Verifies `bundle` against `policy`, checking the agent version too.
pub fn verify(
    bundle_path: &Path,
    policy: &TrustPolicy,
    limits: &Limits,
) -> Result<VerifiedBundle, StoreError> {
    let open = |source| StoreError::Open {
        path: bundle_path.to_path_buf(),
        source,
    };
    let f = File::open(bundle_path).map_err(open)?;
    let verified = bundle::verify(BufReader::with_capacity(bundle::CHUNK, f), policy, limits)?;
    if !verified.manifest.agent_supported(crate::AGENT_VERSION) {
        return Err(StoreError::AgentTooOld {
            required: verified.manifest.min_agent_version.clone(),
            have: crate::AGENT_VERSION.to_string(),
        });
    }
    Ok(verified)
}

/// Verifies `bundle_path`, then writes its payloads into the new directory `dest`.
pub fn unpack(
    bundle_path: &Path,
    policy: &TrustPolicy,
    limits: &Limits,
    dest: &Path,
) -> Result<VerifiedBundle, StoreError> {
    let verified = verify(bundle_path, policy, limits)?;
    if dest.exists() {
        return Err(StoreError::Exists(dest.to_path_buf()));
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Write { path, source }
    };
    fs::create_dir_all(parent).map_err(write_err(parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(parent)
        .map_err(write_err(parent))?;
    let mut bundle_file = File::open(bundle_path).map_err(|source| StoreError::Open {
        path: bundle_path.to_path_buf(),
        source,
    })?;
    for entry in &verified.manifest.entries {
        let path = staging.path().join(&entry.name);
        let file = File::create(&path).map_err(write_err(&path))?;
        let mut w = BufWriter::new(file);
        verified.copy_entry(&mut bundle_file, &entry.name, &mut w)?;
        let file = w.into_inner().map_err(|e| StoreError::Write {
            path: path.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(write_err(&path))?;
    }
    let staged = staging.keep();
    if let Err(source) = fs::rename(&staged, dest) {
        let _ = fs::remove_dir_all(&staged);
        return Err(StoreError::Write {
            path: dest.to_path_buf(),
            source,
        });
    }
    if let Ok(d) = File::open(parent) {
        let _ = d.sync_all();
    }
    let _ = std::io::stdout().flush();
    Ok(verified)
}
