//! Pulling what this device should run from the control plane: signed assignments,
//! resumable bundle downloads, and activation through the runtime's pipeline.
//!
//! The puller fetches `GET /v1/devices/{id}/assignment` when the agent starts, each time
//! the broker grants the `cmd` subscription (QoS 0: nothing is kept for the device
//! before that), when the control plane says so on the `cmd` topic
//! (`assignment_changed`), and every
//! `assignment_poll_s` seconds (±20 % jitter, so a fleet does not poll in step). Every
//! assignment is checked before anything happens ([`SignedAssignment::check`]: trusted
//! key, this device, newer generation, not expired); a refusal is reported as an
//! `assignment_refused` event and changes nothing. An accepted assignment is kept in
//! `DATA_DIR/assignment.cbor` before it is acted on, so a replay of an older one is
//! refused after a restart too.
//!
//! Each assigned model whose bundle is not the active one is downloaded into
//! `DATA_DIR/downloads/<sha256>.part` with HTTP range requests: an interrupted download
//! (power cut, agent killed, server gone) resumes from the bytes already on disk. The
//! finished file must hash to the digest the assignment names; then it goes through
//! verify → prepare → self-test → swap like `install-bundle`, and the agent reloads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleetml_protocol::assignment::{AssignedModel, ShadowModel};
use fleetml_protocol::crypto::{Sha256, Sha256Hasher};
use fleetml_protocol::telemetry::{self, DeviceId, Lifecycle};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc, oneshot};

use fleetml_device::download::{self, Begin, Failure};
use fleetml_device::pull::text;
pub use fleetml_device::pull::{Answer, PullState, Step};
use fleetml_protocol::board::BoardProfile;
use fleetml_protocol::trust::TrustPolicy;

use crate::files::{create_private_dir, keep_file, open_private};
use crate::telemetry::Telemetry;

/// File of the last accepted assignment.
const HELD_FILE: &str = "assignment.cbor";
/// Folder of partial downloads.
const DOWNLOADS_DIR: &str = "downloads";

/// The control plane's HTTP address: `https://host[:port][/base]`.
pub use crate::http::HttpUrl as ServerUrl;

/// How the agent pulls assignments.
#[derive(Clone)]
pub struct Settings {
    pub server: ServerUrl,
    /// What an `https://` server is checked against.
    pub roots: crate::http::Roots,
    pub device: DeviceId,
    /// The device's HTTP bearer token ([`fleetml_protocol::assignment::http_token`]).
    pub token: String,
    pub poll: Duration,
    /// Download bandwidth cap in bytes per second (none: as fast as the link goes).
    pub max_bytes_per_s: Option<u64>,
    /// A download on which nothing arrives this long stops (and resumes at the next
    /// pull).
    pub download_idle: Duration,
    /// A pull without progress this long is stalled: the watchdog goes unfed.
    pub stall: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of logs.
        f.debug_struct("Settings")
            .field("server", &self.server)
            .field("device", &self.device)
            .field("poll", &self.poll)
            .field("max_bytes_per_s", &self.max_bytes_per_s)
            .field("download_idle", &self.download_idle)
            .field("stall", &self.stall)
            .finish_non_exhaustive()
    }
}

/// Asks the main loop to reload the store and waits until it has.
pub type ReloadRequest = oneshot::Sender<()>;

/// Wakes the puller (the `assignment_changed` command).
pub type Wake = Arc<Notify>;

/// What the puller needs of the agent's configuration: where the store is, what it
/// trusts, and the board a bundle is prepared for.
#[derive(Debug, Clone)]
pub struct Local {
    pub data_dir: PathBuf,
    pub policy: TrustPolicy,
    pub board: BoardProfile,
}

#[derive(Debug)]
pub struct Puller {
    settings: Settings,
    config: Arc<Local>,
    tel: Arc<Telemetry>,
    reload: mpsc::Sender<ReloadRequest>,
    /// What it decides with (failed bundles, the last refusal reported).
    state: PullState,
    /// Its progress, which the watchdog depends on.
    progress: Option<Arc<crate::liveness::Part>>,
}

impl Puller {
    pub fn new(
        settings: Settings,
        config: Arc<Local>,
        tel: Arc<Telemetry>,
        reload: mpsc::Sender<ReloadRequest>,
    ) -> Puller {
        Puller {
            settings,
            config,
            tel,
            reload,
            state: PullState::default(),
            progress: None,
        }
    }

    /// Reports its progress to `part` (busy from the start of a pull until it waits for
    /// the next, a beat on every downloaded chunk).
    pub fn with_progress(mut self, part: Arc<crate::liveness::Part>) -> Puller {
        self.progress = Some(part);
        self
    }

    fn beat(&self) {
        if let Some(p) = &self.progress {
            p.beat();
        }
    }

    /// Runs forever: once now, then on every wake-up and poll.
    pub async fn run(mut self, wake: Wake) {
        loop {
            self.beat();
            if let Err(e) = self.once().await {
                tracing::warn!(error = %e, "assignment pull failed; retrying at the next poll");
            }
            if let Some(p) = &self.progress {
                p.idle();
            }
            let poll = jittered(self.settings.poll);
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = wake.notified() => {}
            }
        }
    }

    fn event(&self, kind: Lifecycle, model: &str, version: u64, detail: String) {
        self.tel.queue(telemetry::Body::Event(telemetry::Event {
            kind,
            model: model.to_string(),
            version,
            detail,
        }));
    }

    /// One pull: fetch, check, keep, then bring every assigned model to its bundle.
    pub async fn once(&mut self) -> Result<(), String> {
        let path = format!("/v1/devices/{}/assignment", self.settings.device.as_str());
        let (status, headers, body) = self.get(&path, None).await?;
        let data_dir = self.config.data_dir.clone();
        let held = std::fs::read(data_dir.join(HELD_FILE)).ok();
        let date = headers
            .get(hyper::header::DATE)
            .and_then(|v| v.to_str().ok());
        let answer = self.state.answer(
            status,
            &body,
            date,
            held.as_deref(),
            &self.config.policy,
            &self.settings.device,
            crate::clock::now_ms(),
        );
        let assignment = match answer {
            Answer::NoAssignment => {
                tracing::debug!("no assignment for this device yet");
                return Ok(());
            }
            Answer::Failed(e) => return Err(e),
            Answer::Newer(a) => {
                keep_file(&data_dir.join(HELD_FILE), &body)
                    .map_err(|e| format!("keeping the assignment: {e}"))?;
                tracing::info!(generation = a.generation, "accepted a new assignment");
                self.event(
                    Lifecycle::AssignmentAccepted,
                    "",
                    a.generation,
                    format!("generation {}", a.generation),
                );
                a
            }
            Answer::Unchanged(a) => a,
            Answer::Refused { reason, report } => {
                tracing::warn!(error = %reason, "refused an assignment; what runs is unchanged");
                if report {
                    self.event(Lifecycle::AssignmentRefused, "", 0, reason);
                }
                return Ok(());
            }
        };
        for (name, model) in &assignment.models {
            if let Err(e) = self.bring(name, model).await {
                tracing::warn!(model = %name, version = model.version, error = %e, "not activated");
            }
            if let Err(e) = self.bring_shadow(name, model.shadow.as_ref()).await {
                tracing::warn!(model = %name, error = %e, "shadow not running");
            }
        }
        Ok(())
    }

    /// Brings the shadow of `name` in line with the assignment once its active version
    /// runs: installs the shadow version it names (from the store or downloaded;
    /// verified and self-tested, never activated), changes its sample, or stops it.
    async fn bring_shadow(&mut self, name: &str, want: Option<&ShadowModel>) -> Result<(), String> {
        let config = self.config.clone();
        let state = {
            let (config, name) = (config.clone(), name.to_string());
            tokio::task::spawn_blocking(move || {
                let _guard = crate::store::store_lock();
                let store =
                    crate::store::ModelStore::open(&config.data_dir).map_err(|e| e.to_string())?;
                store.model(&name).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())??
        };
        let Some(state) = state else {
            return Ok(());
        };
        let have = state.shadow.as_ref();
        enum Change {
            Stop,
            Sample(u16),
            Install(ShadowModel),
        }
        let change = match (want, have) {
            (None, None) => return Ok(()),
            (None, Some(_)) => Change::Stop,
            (Some(w), Some(h)) if h.installed.digest == w.digest.to_string() => {
                if h.sample_permille == w.sample_permille {
                    return Ok(());
                }
                Change::Sample(w.sample_permille)
            }
            // The active version itself has nothing to be compared with.
            (Some(w), _) if state.active.digest == w.digest.to_string() => return Ok(()),
            (Some(w), _) if self.state.has_failed(&w.digest) => return Ok(()),
            (Some(w), _) => Change::Install(w.clone()),
        };
        let outcome = match change {
            Change::Install(w) => self.install_shadow(name, &w).await,
            other => {
                let (config, name) = (config.clone(), name.to_string());
                tokio::task::spawn_blocking(move || {
                    let _guard = crate::store::store_lock();
                    let store = crate::store::ModelStore::open(&config.data_dir)
                        .map_err(|e| e.to_string())?;
                    match other {
                        Change::Sample(p) => store.set_shadow_sample(&name, p).map(|_| ()),
                        _ => store.clear_shadow(&name).map(|_| ()),
                    }
                    .map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())?
            }
        };
        let (tx, rx) = oneshot::channel();
        if self.reload.send(tx).await.is_ok() {
            let _ = rx.await;
        }
        outcome
    }

    /// Downloads (unless stored) and installs `shadow` as the shadow of `name`; a failure
    /// is reported once (`shadow_failed`, or the download's own events) and not tried
    /// again for this generation.
    async fn install_shadow(&mut self, name: &str, shadow: &ShadowModel) -> Result<(), String> {
        let config = self.config.clone();
        let as_model = AssignedModel {
            version: shadow.version,
            digest: shadow.digest,
            size: shadow.size,
            rollout: shadow.rollout.clone(),
            shadow: None,
        };
        let stored = {
            let (config, digest) = (config.clone(), shadow.digest.to_string());
            tokio::task::spawn_blocking(move || {
                let store =
                    crate::store::ModelStore::open(&config.data_dir).map_err(|e| e.to_string())?;
                let path = store.bundle_path(&digest);
                Ok::<_, String>(path.is_file().then_some(path))
            })
            .await
            .map_err(|e| e.to_string())??
        };
        let (source, downloaded) = match stored {
            Some(path) => (path, false),
            None => (
                self.fetch_bundle(name, &as_model, Lifecycle::ShadowFailed)
                    .await?,
                true,
            ),
        };
        let sample = shadow.sample_permille;
        let installed = {
            let (config, source) = (config.clone(), source.clone());
            tokio::task::spawn_blocking(move || {
                let _guard = crate::store::store_lock();
                let store = crate::store::ModelStore::open(&config.data_dir)
                    .map_err(crate::activation::ActivationError::Store)?;
                crate::activation::install_shadow(
                    &store,
                    &source,
                    &config.policy,
                    &config.board,
                    &fleetml_protocol::bundle::Limits::default(),
                    sample,
                    crate::clock::now_ms() / 1000,
                )
            })
            .await
            .map_err(|e| e.to_string())?
        };
        if downloaded {
            let _ = std::fs::remove_file(&source);
        }
        match installed {
            Ok(_) => Ok(()),
            Err(e) => {
                self.state.failed(shadow.digest);
                let reason = e.to_string();
                self.event(
                    Lifecycle::ShadowFailed,
                    name,
                    shadow.version,
                    reason.clone(),
                );
                Err(reason)
            }
        }
    }

    /// Makes `model` the active version of `name` unless it already is.
    async fn bring(&mut self, name: &str, model: &AssignedModel) -> Result<(), String> {
        let config = self.config.clone();
        let digest = model.digest.to_string();
        let (active, failed_before, stored) = {
            let (config, name, digest) = (config.clone(), name.to_string(), digest.clone());
            tokio::task::spawn_blocking(move || {
                let _guard = crate::store::store_lock();
                let store =
                    crate::store::ModelStore::open(&config.data_dir).map_err(|e| e.to_string())?;
                let state = store.model(&name).map_err(|e| e.to_string())?;
                let active = state.as_ref().map(|s| s.active.digest.clone());
                let failed = state
                    .as_ref()
                    .and_then(|s| s.last_failure.as_ref())
                    .is_some_and(|f| f.digest == digest);
                let stored = store.bundle_path(&digest);
                Ok::<_, String>((active, failed, stored.is_file().then_some(stored)))
            })
            .await
            .map_err(|e| e.to_string())??
        };
        let step = self
            .state
            .step(model, active.as_deref(), failed_before, stored.is_some());
        let (source, downloaded) = match (step, stored) {
            // Reported when it failed; a new generation tries again.
            (Step::Active | Step::Failed, _) => return Ok(()),
            // A version still in the store (the previous one: a rollback) needs no download.
            (Step::InstallStored, Some(path)) => (path, false),
            (Step::InstallStored | Step::Download, _) => (
                self.fetch_bundle(name, model, Lifecycle::VerificationFailed)
                    .await?,
                true,
            ),
        };
        let installed = {
            let (config, source) = (config.clone(), source.clone());
            tokio::task::spawn_blocking(move || {
                let _guard = crate::store::store_lock();
                let store = crate::store::ModelStore::open(&config.data_dir)
                    .map_err(crate::activation::ActivationError::Store)?;
                crate::activation::install(
                    &store,
                    &source,
                    &config.policy,
                    &config.board,
                    &fleetml_protocol::bundle::Limits::default(),
                    crate::clock::now_ms() / 1000,
                )
            })
            .await
            .map_err(|e| e.to_string())?
        };
        if downloaded {
            let _ = std::fs::remove_file(&source);
        }
        let result = match installed {
            Ok(_) => Ok(()),
            Err(crate::activation::ActivationError::Store(e)) => {
                // Not recorded in the store (it never got that far): report it here.
                self.state.failed(model.digest);
                let reason = format!("{e}");
                self.event(
                    Lifecycle::VerificationFailed,
                    name,
                    model.version,
                    reason.clone(),
                );
                Err(reason)
            }
            Err(e) => {
                // Recorded in the store; the reload reports it.
                self.state.failed(model.digest);
                Err(e.to_string())
            }
        };
        let (tx, rx) = oneshot::channel();
        if self.reload.send(tx).await.is_ok() {
            let _ = rx.await;
        }
        result
    }

    /// [`Self::download`], each failure reported: a bundle that does not match the
    /// assignment as `mismatch` (and not tried again this generation), a transfer that
    /// stopped as `download_failed` (resumed on the next pull).
    async fn fetch_bundle(
        &mut self,
        name: &str,
        model: &AssignedModel,
        mismatch: Lifecycle,
    ) -> Result<PathBuf, String> {
        match self.download(name, model).await {
            Ok(path) => Ok(path),
            Err(Failure::Mismatch(reason)) => {
                self.state.failed(model.digest);
                self.event(mismatch, name, model.version, reason.clone());
                Err(reason)
            }
            Err(Failure::Transfer(reason) | Failure::DiskFull(reason)) => {
                self.event(
                    Lifecycle::DownloadFailed,
                    name,
                    model.version,
                    reason.clone(),
                );
                Err(reason)
            }
        }
    }

    /// Downloads the bundle of `model`, resuming a partial download; returns the file,
    /// whose SHA-256 matches the assignment.
    async fn download(&self, name: &str, model: &AssignedModel) -> Result<PathBuf, Failure> {
        let dir = self.config.data_dir.join(DOWNLOADS_DIR);
        create_private_dir(&dir)
            .map_err(|e| Failure::Transfer(format!("{}: {e}", dir.display())))?;
        let part = dir.join(format!("{}.part", model.digest));
        let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        // The download and the store's copy of it must both fit, with room to spare for
        // the outbox: refuse up front rather than fill the disk.
        let plan = download::plan(model, have, available_bytes(&dir), DISK_HEADROOM).map_err(
            |download::NoRoom { need, free }| {
                Failure::DiskFull(format!(
                    "disk full: bundle {} ({} bytes) needs {need} bytes free under {} (download, store copy and headroom), {free} are available; the running model is unchanged",
                    model.digest,
                    model.size,
                    dir.display()
                ))
            },
        )?;
        if plan.discard {
            let _ = std::fs::remove_file(&part);
        }
        if !plan.complete {
            let have = plan.from;
            self.event(
                Lifecycle::Downloading,
                name,
                model.version,
                if have == 0 {
                    format!("{} bytes", model.size)
                } else {
                    format!("resuming at byte {have} of {}", model.size)
                },
            );
            tracing::info!(model = %name, version = model.version, from = have, size = model.size, "downloading");
            if let Err(e) = self.fetch(model, &part, have).await {
                // A partial file that does not match, or that filled the disk, goes: the
                // first cannot be resumed, the second would keep the disk full.
                if matches!(e, Failure::Mismatch(_) | Failure::DiskFull(_)) {
                    let _ = std::fs::remove_file(&part);
                }
                return Err(e);
            }
        }
        let got =
            hash_file(&part).map_err(|e| Failure::Transfer(format!("{}: {e}", part.display())))?;
        if let Err(e) = download::check_digest(model, &got) {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        self.event(
            Lifecycle::Downloaded,
            name,
            model.version,
            format!("sha256 {got}"),
        );
        Ok(part)
    }

    async fn fetch(&self, model: &AssignedModel, part: &Path, have: u64) -> Result<(), Failure> {
        use Failure::Transfer;
        let path = format!("/v1/bundles/{}", model.digest);
        let response = self.request(&path, Some(have)).await.map_err(Transfer)?;
        let mut transfer = download::Transfer::new(model, have);
        let begin = transfer.begin(
            response.status().as_u16(),
            response
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok()),
        )?;
        let mut file = match begin {
            Begin::Append => tokio::fs::OpenOptions::new().append(true).open(part).await,
            Begin::Restart => open_private(part).await,
            Begin::Refused(status) => {
                let headers = response.headers().clone();
                let body = crate::http::read_limited(
                    response.into_body(),
                    &headers,
                    crate::http::SMALL_REPLY,
                )
                .await
                .unwrap_or_default();
                return Err(Transfer(format!(
                    "bundle {}: the control plane answered {status}: {}",
                    model.digest,
                    text(&body)
                )));
            }
        }
        .map_err(|e| Transfer(format!("{}: {e}", part.display())))?;
        let started = tokio::time::Instant::now();
        let mut unsynced = 0u64;
        let mut body = response.into_body();
        let idle = self.settings.download_idle;
        while let Some(data) = crate::http::next_chunk(&mut body, idle)
            .await
            .inspect(|_| self.beat())
            .map_err(|e| {
                Transfer(format!(
                    "download interrupted at byte {} of {}: {e}; it resumes from there at the next pull",
                    transfer.at(),
                    model.size
                ))
            })?
        {
            let at = transfer.at();
            transfer.chunk(data.len())?;
            // Stop before the disk is full, not when it is: the outbox, the monitoring
            // windows and the store write to the same disk, and an event that cannot be
            // stored is an event lost (a download that filled the disk to the last byte
            // made the agent's own "disk full" report unwritable).
            if at / CHECK_FREE_EVERY != transfer.at() / CHECK_FREE_EVERY
                && let Some(free) = part
                    .parent()
                    .and_then(available_bytes)
                    .filter(|free| *free < DISK_HEADROOM / 2 + data.len() as u64)
            {
                return Err(Failure::DiskFull(format!(
                    "disk full while downloading bundle {} at byte {at} of {}: {free} bytes left, less than the {} kept for everything else the agent writes; the partial file was removed; the running model is unchanged",
                    model.digest,
                    model.size,
                    DISK_HEADROOM / 2
                )));
            }
            file.write_all(&data)
                .await
                .map_err(|e| write_failure(e, at, model))?;
            unsynced += data.len() as u64;
            if unsynced >= 1 << 20 {
                file.sync_data()
                    .await
                    .map_err(|e| write_failure(e, transfer.at(), model))?;
                unsynced = 0;
            }
            if let Some(rate) = self.settings.max_bytes_per_s.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(transfer.received() as f64 / rate as f64);
                tokio::time::sleep_until(started + due).await;
            }
        }
        file.sync_data()
            .await
            .map_err(|e| write_failure(e, transfer.at(), model))?;
        // The body ended as the server declared: short of the size, its file is not the
        // assigned one.
        transfer.finish()
    }

    /// `GET path` from the control plane as the device, from byte `from` on when
    /// resuming; the response as it starts (its body streamed by the caller).
    async fn request(
        &self,
        path: &str,
        from: Option<u64>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        self.get_request(path, from).send().await
    }

    async fn get(
        &self,
        path: &str,
        from: Option<u64>,
    ) -> Result<(u16, hyper::HeaderMap, hyper::body::Bytes), String> {
        let r = self
            .get_request(path, from)
            .fetch(Duration::from_secs(30), MAX_ASSIGNMENT_REPLY)
            .await?;
        Ok((r.status, r.headers, r.body))
    }

    /// `GET path` as this device, from byte `from` on (a range) when resuming.
    fn get_request<'a>(&'a self, path: &'a str, from: Option<u64>) -> crate::http::Request<'a> {
        let request = crate::http::Request::get(&self.settings.server, path)
            .roots(&self.settings.roots)
            .header("authorization", format!("Bearer {}", self.settings.token));
        match from.filter(|f| *f > 0) {
            Some(from) => request.header("range", format!("bytes={from}-")),
            None => request,
        }
    }
}

/// Largest assignment reply read: a signed assignment of a few models is well under 1 KiB.
pub const MAX_ASSIGNMENT_REPLY: usize = 64 << 10;

/// Free space a download leaves for everything else the agent writes.
const DISK_HEADROOM: u64 = 1 << 20;

/// How often a download checks the free space while it writes, in bytes.
const CHECK_FREE_EVERY: u64 = 64 << 10;

/// Bytes available to this (unprivileged) process on the file system holding `dir`.
fn available_bytes(dir: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// A write into the partial download failed at byte `at`.
fn write_failure(e: std::io::Error, at: u64, model: &AssignedModel) -> Failure {
    if e.kind() == std::io::ErrorKind::StorageFull {
        Failure::DiskFull(format!(
            "disk full while downloading bundle {} at byte {at} of {}: the partial file was removed; the running model is unchanged",
            model.digest, model.size
        ))
    } else {
        Failure::Transfer(format!("writing the download at byte {at}: {e}"))
    }
}

/// The poll interval ± 20 %, from the system's random source.
fn jittered(poll: Duration) -> Duration {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    let r = match ring::rand::SystemRandom::new().fill(&mut b) {
        Ok(()) => u32::from_le_bytes(b) as f64 / u32::MAX as f64,
        Err(_) => 0.5,
    };
    fleetml_device::backoff::jittered(poll, r)
}

fn hash_file(path: &Path) -> std::io::Result<Sha256> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}
