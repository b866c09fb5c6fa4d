//! Unpacking verified bundles into the agent's data directory.
//!
//! Check first, then persist: [`unpack`] verifies the whole bundle before it creates
//! anything, copies payloads into a hidden staging directory while re-hashing them
//! (the file may change after verification), and renames the staging directory into
//! place only when every payload matched. On any failure nothing is left behind.

use std::collections::BTreeSet;
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
    #[error("model store metadata: {0}")]
    Meta(String),
    #[error("bundle {0} is not in the store")]
    NotStaged(String),
    #[error("no model named `{0}` is installed")]
    UnknownModel(String),
    #[error("model `{0}` has no previous version to roll back to")]
    NoPrevious(String),
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
    Ok(verified)
}

/// Where a model store keeps things under the agent's data directory.
const STORE_DIR: &str = "store";
const BUNDLES_DIR: &str = "bundles";
const META_DIR: &str = "meta";
const INCOMING_PREFIX: &str = ".incoming-";

/// One installed version of a model: a verified bundle in the store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Installed {
    /// SHA-256 of the bundle file, hex: its name in the store.
    pub digest: String,
    pub version: u64,
    pub label: String,
    pub size: u64,
    /// Seconds since the Unix epoch when this version became active.
    pub activated_at: u64,
}

/// What a device runs for one model name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelState {
    pub name: String,
    pub active: Installed,
    /// The version active before, kept on disk for instant local rollback.
    pub previous: Option<Installed>,
    /// Backend the active version was self-tested on.
    pub backend: String,
    /// Backends passed over for the active version, and why.
    pub fallbacks: Vec<String>,
    /// The last activation of this model that failed, and why; cleared by a success.
    pub last_failure: Option<Failure>,
    /// A version running beside the active one in shadow (never answering).
    #[serde(default)]
    pub shadow: Option<Shadowed>,
}

/// A shadow version in the store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shadowed {
    pub installed: Installed,
    /// Requests run in shadow per thousand answered.
    pub sample_permille: u16,
    /// Backend it was self-tested on.
    pub backend: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub version: u64,
    pub digest: String,
    pub reason: String,
    pub at: u64,
}

/// The agent's model store: verified bundles kept content-addressed as files
/// (`store/bundles/<sha256>.fmb`), and which version of each model is active (and which
/// was before) in sled (`store/meta`).
///
/// Activation is one sled key write followed by a flush, made only after the bundle file
/// is complete, synced and renamed into place; a crash at any instant leaves either the
/// old or the new state. Only the active and previous bundle of each model are kept.
#[derive(Debug)]
pub struct ModelStore {
    bundles: PathBuf,
    db: sled::Db,
}

/// Opens the sled database at `path`, waiting up to 10 s while another process (the
/// agent reloading, or another install) or a just-dropped handle in this one (sled lets
/// go of its lock when its background flusher stops) still holds its lock.
pub(crate) fn open_sled(path: &Path) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        match sled::open(path) {
            // sled reports a held lock as an `Other` I/O error with this text.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
    open_sled(path).map_err(meta_err)
}

fn meta_err(e: sled::Error) -> StoreError {
    StoreError::Meta(e.to_string())
}

impl ModelStore {
    /// Opens (creating) the store under `data_dir`, removes what an interrupted install
    /// left behind, and collects bundles no model refers to.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let root = data_dir.join(STORE_DIR);
        let bundles = root.join(BUNDLES_DIR);
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Write { path, source }
        };
        fs::create_dir_all(&bundles).map_err(write_err(&bundles))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for dir in [data_dir, root.as_path()] {
                let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
            }
        }
        let db = open_db(&root.join(META_DIR))?;
        let store = ModelStore { bundles, db };
        for entry in fs::read_dir(&store.bundles)
            .map_err(write_err(&store.bundles))?
            .flatten()
        {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(INCOMING_PREFIX)
            {
                let _ = fs::remove_file(entry.path());
            }
        }
        store.gc()?;
        Ok(store)
    }

    /// Directory of the stored bundles.
    pub fn bundles_dir(&self) -> &Path {
        &self.bundles
    }

    /// Path of the stored bundle with this digest.
    pub fn bundle_path(&self, digest: &str) -> PathBuf {
        self.bundles.join(format!("{digest}.fmb"))
    }

    /// Verifies `source` against `policy` and copies it into the store (once per
    /// content). The copy is hashed as it is written and must match the verified digest.
    pub fn stage(
        &self,
        source: &Path,
        policy: &TrustPolicy,
        limits: &Limits,
    ) -> Result<(VerifiedBundle, PathBuf), StoreError> {
        let verified = verify(source, policy, limits)?;
        let digest = verified.digest.to_string();
        let dest = self.bundle_path(&digest);
        if dest.exists() {
            return Ok((verified, dest));
        }
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Write { path, source }
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(INCOMING_PREFIX)
            .tempfile_in(&self.bundles)
            .map_err(write_err(&self.bundles))?;
        let mut input = File::open(source).map_err(|source_err| StoreError::Open {
            path: source.to_path_buf(),
            source: source_err,
        })?;
        let mut hasher = fleetml_protocol::crypto::Sha256Hasher::new();
        let mut buf = vec![0u8; bundle::CHUNK];
        loop {
            let n = std::io::Read::read(&mut input, &mut buf).map_err(|e| StoreError::Open {
                path: source.to_path_buf(),
                source: e,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).map_err(write_err(&dest))?;
        }
        if hasher.finish() != verified.digest {
            return Err(StoreError::Bundle(BundleError::DigestMismatch {
                entry: "the bundle file (changed while copying)".into(),
            }));
        }
        tmp.as_file().sync_all().map_err(write_err(&dest))?;
        tmp.persist(&dest).map_err(|e| StoreError::Write {
            path: dest.clone(),
            source: e.error,
        })?;
        if let Ok(d) = File::open(&self.bundles) {
            let _ = d.sync_all();
        }
        Ok((verified, dest))
    }

    fn key(name: &str) -> Vec<u8> {
        format!("model/{name}").into_bytes()
    }

    fn put(&self, state: &ModelState) -> Result<(), StoreError> {
        let bytes = serde_cbor::to_vec(state).map_err(|e| StoreError::Meta(e.to_string()))?;
        self.db
            .insert(Self::key(&state.name), bytes)
            .map_err(meta_err)?;
        self.db.flush().map_err(meta_err)?;
        Ok(())
    }

    /// Makes the staged bundle `verified` the active version of its model; the version it
    /// replaces becomes `previous`. One atomic, flushed write.
    pub fn activate(
        &self,
        verified: &VerifiedBundle,
        backend: &str,
        fallbacks: Vec<String>,
        now: u64,
    ) -> Result<ModelState, StoreError> {
        let m = &verified.manifest;
        let installed = Installed {
            digest: verified.digest.to_string(),
            version: m.version,
            label: m.label.clone(),
            size: verified.size,
            activated_at: now,
        };
        if !self.bundle_path(&installed.digest).is_file() {
            return Err(StoreError::NotStaged(installed.digest));
        }
        let old = self.model(&m.name)?;
        let previous = match old {
            Some(old) if old.active.digest != installed.digest => Some(old.active),
            Some(old) => old.previous,
            None => None,
        };
        // A shadow that becomes the active version (a promotion) stops being a shadow.
        let shadow = self
            .model(&m.name)?
            .and_then(|o| o.shadow)
            .filter(|sh| sh.installed.digest != installed.digest);
        let state = ModelState {
            name: m.name.clone(),
            active: installed,
            previous,
            backend: backend.to_string(),
            fallbacks,
            last_failure: None,
            shadow,
        };
        self.put(&state)?;
        self.gc()?;
        Ok(state)
    }

    /// Records `verified` (staged, prepared and self-tested by the caller) as the shadow
    /// of its model, run on `sample_permille` of the requests. The model needs an active
    /// version to run beside.
    pub fn set_shadow(
        &self,
        verified: &VerifiedBundle,
        backend: &str,
        sample_permille: u16,
        now: u64,
    ) -> Result<ModelState, StoreError> {
        let m = &verified.manifest;
        let digest = verified.digest.to_string();
        if !self.bundle_path(&digest).is_file() {
            return Err(StoreError::NotStaged(digest));
        }
        let mut state = self
            .model(&m.name)?
            .ok_or_else(|| StoreError::UnknownModel(m.name.clone()))?;
        state.shadow = Some(Shadowed {
            installed: Installed {
                digest,
                version: m.version,
                label: m.label.clone(),
                size: verified.size,
                activated_at: now,
            },
            sample_permille,
            backend: backend.to_string(),
        });
        self.put(&state)?;
        self.gc()?;
        Ok(state)
    }

    /// Changes the shadow's sample; false when `name` has no shadow.
    pub fn set_shadow_sample(&self, name: &str, sample_permille: u16) -> Result<bool, StoreError> {
        let Some(mut state) = self.model(name)? else {
            return Ok(false);
        };
        let Some(shadow) = state.shadow.as_mut() else {
            return Ok(false);
        };
        shadow.sample_permille = sample_permille;
        self.put(&state)?;
        Ok(true)
    }

    /// Stops the shadow of `name` (its bundle is removed unless active or previous);
    /// the version it was, if any.
    pub fn clear_shadow(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let Some(mut state) = self.model(name)? else {
            return Ok(None);
        };
        let Some(old) = state.shadow.take() else {
            return Ok(None);
        };
        self.put(&state)?;
        self.gc()?;
        Ok(Some(old.installed.version))
    }

    /// Records that activating `verified` failed; the active version stays as it is.
    pub fn record_failure(
        &self,
        verified: &VerifiedBundle,
        reason: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        let failure = Failure {
            version: verified.manifest.version,
            digest: verified.digest.to_string(),
            reason: reason.to_string(),
            at: now,
        };
        if let Some(mut state) = self.model(&verified.manifest.name)? {
            state.last_failure = Some(failure);
            self.put(&state)?;
        }
        self.gc()?;
        Ok(())
    }

    /// Swaps the active and previous versions of `name`.
    pub fn rollback(&self, name: &str, now: u64) -> Result<ModelState, StoreError> {
        let mut state = self
            .model(name)?
            .ok_or_else(|| StoreError::UnknownModel(name.to_string()))?;
        let Some(mut previous) = state.previous.take() else {
            return Err(StoreError::NoPrevious(name.to_string()));
        };
        previous.activated_at = now;
        state.previous = Some(std::mem::replace(&mut state.active, previous));
        state.fallbacks.clear();
        state.last_failure = None;
        self.put(&state)?;
        Ok(state)
    }

    pub fn model(&self, name: &str) -> Result<Option<ModelState>, StoreError> {
        match self.db.get(Self::key(name)).map_err(meta_err)? {
            Some(bytes) => serde_cbor::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Meta(e.to_string())),
            None => Ok(None),
        }
    }

    pub fn models(&self) -> Result<Vec<ModelState>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(b"model/") {
            let (_, bytes) = item.map_err(meta_err)?;
            out.push(serde_cbor::from_slice(&bytes).map_err(|e| StoreError::Meta(e.to_string()))?);
        }
        Ok(out)
    }

    /// Deletes stored bundles that are neither active, previous nor shadow for any model.
    /// Returns the digests removed.
    pub fn gc(&self) -> Result<Vec<String>, StoreError> {
        let mut keep = BTreeSet::new();
        for m in self.models()? {
            keep.insert(m.active.digest);
            if let Some(p) = m.previous {
                keep.insert(p.digest);
            }
            if let Some(sh) = m.shadow {
                keep.insert(sh.installed.digest);
            }
        }
        let mut removed = Vec::new();
        let entries = fs::read_dir(&self.bundles).map_err(|e| StoreError::Write {
            path: self.bundles.clone(),
            source: e,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(digest) = name.strip_suffix(".fmb")
                && !keep.contains(digest)
                && fs::remove_file(entry.path()).is_ok()
            {
                removed.push(digest.to_string());
            }
        }
        Ok(removed)
    }

    /// Bytes used by stored bundles.
    pub fn disk_usage(&self) -> u64 {
        fs::read_dir(&self.bundles)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// Held while the model store is open: the store's database takes one opener at a time,
/// and the SIGHUP reload and the assignment puller both open it.
pub fn store_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}
