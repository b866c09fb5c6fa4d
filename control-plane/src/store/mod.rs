//! All the control plane's state that lives in its database, behind traits split by what
//! callers do: devices and their message log ([`FleetStore`]), assignment records
//! ([`AssignmentStore`]), rollouts ([`RolloutStore`]), operator tokens
//! ([`TokenStore`]), the audit log ([`AuditStore`]), drift policies ([`PolicyStore`]),
//! the registry's model versions ([`RegistryStore`]), captured batches
//! ([`CaptureStore`]), dataset manifests ([`DatasetStore`]), training jobs ([`JobStore`]),
//! the notifier's alerts and silences ([`AlertStore`]); the bundle files themselves
//! behind [`BlobStore`] (`blobs::FileBlobs`: content-addressed files). A change that takes several
//! writes is one method, so one call is one transaction (advancing a rollout writes its
//! assignments and its own state together: [`RolloutStore::advance_rollout`]).
//!
//! Implementations: [`sled::SledStore`] (the default, embedded in the data directory)
//! and [`memory::MemoryStore`] (tests, and a control plane that keeps nothing). Both
//! pass the same conformance suite (`store/conformance.rs`), which a new backend has to
//! pass too. Only this folder names sled for these records.

use std::collections::BTreeMap;
use std::fmt::Display;

use fleetml_protocol::assignment::AssignedModel;
use fleetml_protocol::telemetry::{DeviceId, Envelope, Received};

use crate::assign::AssignmentRecord;
use crate::jobs::spec::Job;
use crate::records::{
    AlertRecord, AuditEntry, CaptureRecord, DatasetManifest, DeviceRecord, DeviceState,
    ModelRecord, Policy, PolicyState, Silence, TokenRecord,
};
use crate::rollout::Rollout;

pub mod blobs;
#[cfg(test)]
mod conformance;
pub mod memory;
pub mod postgres;
pub mod s3;
pub mod sled;

/// Why a store call failed, in terms a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or written now (I/O, a full disk, a lost server);
    /// retrying later may work.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored record does not decode: `what` names it and why.
    #[error("stored data is corrupt: {what}")]
    Corrupt { what: String },
    /// The change conflicts with what is stored (it was changed meanwhile, or exists).
    #[error("conflict: {0}")]
    Conflict(String),
    /// What the change refers to does not exist.
    #[error("not found: {0}")]
    NotFound(String),
}

impl StoreError {
    /// A record that does not decode (or encode): what it is, and the decoder's words.
    pub fn corrupt(what: impl Display, error: impl Display) -> StoreError {
        StoreError::Corrupt {
            what: format!("{what}: {error}"),
        }
    }

    /// I/O that failed: where, and why.
    pub fn unavailable(what: impl Display, error: impl Display) -> StoreError {
        StoreError::Unavailable(format!("{what}: {error}"))
    }
}

impl From<serde_cbor::Error> for StoreError {
    fn from(e: serde_cbor::Error) -> Self {
        StoreError::corrupt("a stored record", e)
    }
}

/// The kinds of message [`AgeRules`] may name ([`Body::kind`](fleetml_protocol::telemetry::Body::kind)
/// of what the ingest stores; `command` and `receipt` travel the other way).
pub const KINDS: [&str; 5] = ["status", "window", "alert", "event", "ack"];

/// How long the message log keeps each kind of message, counted from when the control
/// plane stored it (devices' clocks are not trusted for this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgeRules {
    /// Per kind (of [`KINDS`]), the age after which a message goes; a kind not named
    /// stays until the count limit removes it.
    pub max_age_ms: BTreeMap<String, u64>,
    /// Window reports older than this are thinned to the first of each model and hour
    /// (what a chart of a month needs), not dropped; `None`: never thinned.
    pub downsample_windows_after_ms: Option<u64>,
}

impl AgeRules {
    /// `fleetctl serve`'s defaults: statuses and acknowledgements 30 days; window
    /// reports (thinned after 7 days), alerts and lifecycle events a year.
    pub fn defaults() -> AgeRules {
        const DAY: u64 = 86_400_000;
        AgeRules {
            max_age_ms: [
                ("status", 30 * DAY),
                ("ack", 30 * DAY),
                ("window", 365 * DAY),
                ("alert", 365 * DAY),
                ("event", 365 * DAY),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            downsample_windows_after_ms: Some(7 * DAY),
        }
    }

    /// The age after which a message whose kind is not known (stored before kinds were
    /// recorded) goes: the longest of the rules, or never when a kind has none.
    pub fn unknown_kind_age(&self) -> Option<u64> {
        if KINDS.iter().any(|k| !self.max_age_ms.contains_key(*k)) {
            return None;
        }
        self.max_age_ms.values().copied().max()
    }

    /// Whether a message of `kind` stored at `stored_ms` has expired at `now_ms`.
    pub fn expired(&self, kind: Option<&str>, stored_ms: u64, now_ms: u64) -> bool {
        let age = match kind {
            Some(k) => self.max_age_ms.get(k).copied(),
            None => self.unknown_kind_age(),
        };
        age.is_some_and(|a| now_ms.saturating_sub(stored_ms) > a)
    }
}

/// The hour a window report stored at `stored_ms` is thinned into.
pub const DOWNSAMPLE_MS: u64 = 3_600_000;

/// One message of a log as retention sees it.
#[derive(Debug, Clone)]
pub struct LogEntry<'a> {
    pub device: &'a str,
    /// Of [`KINDS`]; `None` when not recorded.
    pub kind: Option<&'a str>,
    /// A window report's model.
    pub model: Option<&'a str>,
    pub stored_ms: u64,
}

/// Decides, message after message of a log in (device, seq) order, what [`AgeRules`]
/// remove at `now_ms`: what is older than its kind allows, and window reports past the
/// downsampling age other than the first of each (device, model, hour). The stores
/// without SQL share this rule; PostgreSQL's statements say the same. Holds one
/// device's hours at a time.
#[derive(Debug)]
pub struct Expiry<'r> {
    rules: &'r AgeRules,
    now_ms: u64,
    device: String,
    kept_hours: std::collections::HashSet<(String, u64)>,
}

impl<'r> Expiry<'r> {
    pub fn new(rules: &'r AgeRules, now_ms: u64) -> Self {
        Expiry {
            rules,
            now_ms,
            device: String::new(),
            kept_hours: Default::default(),
        }
    }

    /// Whether `e` goes.
    pub fn gone(&mut self, e: &LogEntry<'_>) -> bool {
        if e.device != self.device {
            self.device = e.device.to_string();
            self.kept_hours.clear();
        }
        if self.rules.expired(e.kind, e.stored_ms, self.now_ms) {
            return true;
        }
        let thinned = e.kind == Some("window")
            && self
                .rules
                .downsample_windows_after_ms
                .is_some_and(|after| self.now_ms.saturating_sub(e.stored_ms) > after);
        thinned
            && !self.kept_hours.insert((
                e.model.unwrap_or_default().to_string(),
                e.stored_ms / DOWNSAMPLE_MS,
            ))
    }
}

/// What [`FleetStore::store_messages`] calls for each envelope: its index in the batch,
/// its device's state, whether it was new, the highest sequence number before it.
pub type BatchChange<'a> = dyn FnMut(usize, &mut DeviceState, bool, Option<u64>) + Send + 'a;

/// Where authenticated messages and the device registry live.
pub trait FleetStore: Send + Sync {
    /// Adds a device; `false` when the id is taken (nothing changes then).
    fn enroll(&self, device: &DeviceRecord) -> Result<bool, StoreError>;
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;
    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;
    /// Replaces an enrolled device's record (revoked, a new secret); `false` when it is
    /// not enrolled (nothing changes then).
    fn replace_device(&self, device: &DeviceRecord) -> Result<bool, StoreError>;
    /// Stores `envelope` unless `(device, seq)` is already stored, as stored at
    /// `now_ms` (for retention by age); returns whether it was new, and the highest
    /// sequence number stored for the device before it.
    fn insert(&self, envelope: &Received, now_ms: u64) -> Result<(bool, Option<u64>), StoreError>;
    /// Up to `limit` messages of `device` from sequence number `from` on, in order.
    fn messages(
        &self,
        device: &DeviceId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Envelope>, StoreError>;
    fn state(&self, device: &DeviceId) -> Result<Option<DeviceState>, StoreError>;
    fn update_state(
        &self,
        device: &DeviceId,
        change: &mut (dyn FnMut(&mut DeviceState) + Send),
    ) -> Result<(), StoreError>;
    /// [`FleetStore::insert`] and then [`FleetStore::update_state`] of the envelope's
    /// device with `change(state, new, highest before)`, as one transaction where the
    /// store has them (so a crash between the two cannot keep the message and lose
    /// what it changes: the copy a device sends again is a duplicate and changes
    /// nothing). `change` runs once.
    fn store_message(
        &self,
        envelope: &Received,
        now_ms: u64,
        change: &mut (dyn FnMut(&mut DeviceState, bool, Option<u64>) + Send),
    ) -> Result<(bool, Option<u64>), StoreError> {
        let (new, before) = self.insert(envelope, now_ms)?;
        self.update_state(&envelope.device, &mut |st| change(st, new, before))?;
        Ok((new, before))
    }
    /// [`FleetStore::store_message`] for each of `envelopes` in order (`change` gets the
    /// envelope's index), as one transaction where the store has them: the same
    /// outcome as one call per envelope, a duplicate within the batch included, with
    /// one commit. On `Err` nothing of the batch is stored where the store has
    /// transactions.
    fn store_messages(
        &self,
        envelopes: &[Received],
        now_ms: u64,
        change: &mut BatchChange<'_>,
    ) -> Result<Vec<(bool, Option<u64>)>, StoreError> {
        envelopes
            .iter()
            .enumerate()
            .map(|(i, e)| {
                self.store_message(e, now_ms, &mut |st, new, before| change(i, st, new, before))
            })
            .collect()
    }
    /// The enrolled devices among `ids` (in no particular order; unknown ids are left
    /// out), with one query where the store has them.
    fn devices_named(&self, ids: &[DeviceId]) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(self.device(id)?);
        }
        Ok(out)
    }
    /// The stored states of the devices among `ids` that have one (in no particular
    /// order), with one query where the store has them.
    fn states_named(&self, ids: &[DeviceId]) -> Result<Vec<(DeviceId, DeviceState)>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(state) = self.state(id)? {
                out.push((id.clone(), state));
            }
        }
        Ok(out)
    }
    /// [`FleetStore::states_named`] as a rollout reads them: each state
    /// [`DeviceState::brief`], decoded without the skipped figures where the store keeps
    /// encoded states (the engine and the status view read every target's state at each
    /// step).
    fn brief_states_named(
        &self,
        ids: &[DeviceId],
    ) -> Result<Vec<(DeviceId, DeviceState)>, StoreError> {
        Ok(self
            .states_named(ids)?
            .into_iter()
            .map(|(id, s)| (id, s.brief()))
            .collect())
    }
    /// Removes all but the newest `keep` messages of `device` (by sequence number);
    /// returns how many it removed. The highest sequence number stored stays known, so
    /// gaps and restarts are still told apart afterwards.
    fn prune_messages(&self, device: &DeviceId, keep: usize) -> Result<u64, StoreError>;
    /// Removes all but the newest `keep[KIND]` messages of each kind named in `keep`
    /// from `device`'s log (by sequence number; a message whose kind was not recorded
    /// is not counted); returns how many it removed. As
    /// [`FleetStore::prune_messages`], the highest sequence number stays known.
    fn prune_kinds(
        &self,
        device: &DeviceId,
        keep: &BTreeMap<String, usize>,
    ) -> Result<u64, StoreError>;
    /// Applies `rules` to every device's message log at `now_ms`: removes what is older
    /// than its kind allows and thins window reports past the downsampling age to the
    /// first of each (device, model, hour). Returns how many messages it removed. As
    /// [`FleetStore::prune_messages`], the highest sequence numbers stay known.
    fn expire_messages(&self, rules: &AgeRules, now_ms: u64) -> Result<u64, StoreError>;
    /// The next sequence number of control plane → device messages.
    fn next_command_seq(&self, device: &DeviceId) -> Result<u64, StoreError>;
    /// [`FleetStore::next_command_seq`] of each device, made durable together.
    fn next_command_seqs(&self, devices: &[DeviceId]) -> Result<Vec<u64>, StoreError> {
        devices.iter().map(|d| self.next_command_seq(d)).collect()
    }
    /// Makes everything stored so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// A shared store is a store: the control plane holds its fleet store as
/// `Arc<dyn FleetStore>`, whatever the implementation.
impl<T: FleetStore + ?Sized> FleetStore for std::sync::Arc<T> {
    fn enroll(&self, device: &DeviceRecord) -> Result<bool, StoreError> {
        (**self).enroll(device)
    }
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        (**self).device(id)
    }
    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        (**self).devices()
    }
    fn replace_device(&self, device: &DeviceRecord) -> Result<bool, StoreError> {
        (**self).replace_device(device)
    }
    fn insert(&self, envelope: &Received, now_ms: u64) -> Result<(bool, Option<u64>), StoreError> {
        (**self).insert(envelope, now_ms)
    }
    fn messages(
        &self,
        device: &DeviceId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Envelope>, StoreError> {
        (**self).messages(device, from, limit)
    }
    fn state(&self, device: &DeviceId) -> Result<Option<DeviceState>, StoreError> {
        (**self).state(device)
    }
    fn update_state(
        &self,
        device: &DeviceId,
        change: &mut (dyn FnMut(&mut DeviceState) + Send),
    ) -> Result<(), StoreError> {
        (**self).update_state(device, change)
    }
    fn prune_messages(&self, device: &DeviceId, keep: usize) -> Result<u64, StoreError> {
        (**self).prune_messages(device, keep)
    }
    fn prune_kinds(
        &self,
        device: &DeviceId,
        keep: &BTreeMap<String, usize>,
    ) -> Result<u64, StoreError> {
        (**self).prune_kinds(device, keep)
    }
    fn store_messages(
        &self,
        envelopes: &[Received],
        now_ms: u64,
        change: &mut BatchChange<'_>,
    ) -> Result<Vec<(bool, Option<u64>)>, StoreError> {
        (**self).store_messages(envelopes, now_ms, change)
    }
    fn expire_messages(&self, rules: &AgeRules, now_ms: u64) -> Result<u64, StoreError> {
        (**self).expire_messages(rules, now_ms)
    }
    fn devices_named(&self, ids: &[DeviceId]) -> Result<Vec<DeviceRecord>, StoreError> {
        (**self).devices_named(ids)
    }
    fn states_named(&self, ids: &[DeviceId]) -> Result<Vec<(DeviceId, DeviceState)>, StoreError> {
        (**self).states_named(ids)
    }
    fn brief_states_named(
        &self,
        ids: &[DeviceId],
    ) -> Result<Vec<(DeviceId, DeviceState)>, StoreError> {
        (**self).brief_states_named(ids)
    }
    fn store_message(
        &self,
        envelope: &Received,
        now_ms: u64,
        change: &mut (dyn FnMut(&mut DeviceState, bool, Option<u64>) + Send),
    ) -> Result<(bool, Option<u64>), StoreError> {
        (**self).store_message(envelope, now_ms, change)
    }
    fn next_command_seq(&self, device: &DeviceId) -> Result<u64, StoreError> {
        (**self).next_command_seq(device)
    }
    fn next_command_seqs(&self, devices: &[DeviceId]) -> Result<Vec<u64>, StoreError> {
        (**self).next_command_seqs(devices)
    }
    fn flush(&self) -> Result<(), StoreError> {
        (**self).flush()
    }
}

/// What each device should run: one [`AssignmentRecord`] per device.
pub trait AssignmentStore: Send + Sync {
    fn assignment(&self, device: &DeviceId) -> Result<Option<AssignmentRecord>, StoreError>;
    /// Points `model` of `device` at `to` as a new generation, unless it already is;
    /// returns the generation that names it. Atomic and durable.
    fn assign(
        &self,
        device: &DeviceId,
        model: &str,
        to: &AssignedModel,
        now_ms: u64,
    ) -> Result<u64, StoreError>;
    /// [`AssignmentStore::assign`] for many devices (a device may appear more than once:
    /// each change applies in order), all or nothing, made durable once. Returns the
    /// generations, in order.
    fn assign_all(
        &self,
        model: &str,
        changes: &[(DeviceId, AssignedModel)],
        now_ms: u64,
    ) -> Result<Vec<u64>, StoreError>;
    /// Every device's record.
    fn assignments(&self) -> Result<Vec<(DeviceId, AssignmentRecord)>, StoreError>;
    /// The records of the devices among `ids` that have one (in no particular order),
    /// with one query where the store has them.
    fn assignments_named(
        &self,
        ids: &[DeviceId],
    ) -> Result<Vec<(DeviceId, AssignmentRecord)>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(record) = self.assignment(id)? {
                out.push((id.clone(), record));
            }
        }
        Ok(out)
    }
}

/// Rollouts and rollbacks, keyed by their id.
pub trait RolloutStore: Send + Sync {
    /// A fresh id `r<n>`, never handed out before by this store.
    fn next_rollout_id(&self) -> Result<String, StoreError>;
    /// Stores `rollout` (replacing the one with its id), durably.
    fn put_rollout(&self, rollout: &Rollout) -> Result<(), StoreError>;
    fn rollout(&self, id: &str) -> Result<Option<Rollout>, StoreError>;
    /// Every rollout, oldest first.
    fn rollouts(&self) -> Result<Vec<Rollout>, StoreError>;
    /// The rollouts not final yet (running or paused), oldest first: what the engine
    /// advances every second, without reading the finished ones (a rollout to 10,000
    /// devices is megabytes).
    fn unfinished_rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        Ok(self
            .rollouts()?
            .into_iter()
            .filter(|r| !r.state.is_final())
            .collect())
    }
    /// The ids of the running rollouts, oldest first: what the engine advances each
    /// second (each step reads its rollout again, under the engine's lock).
    fn running_rollout_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .unfinished_rollouts()?
            .into_iter()
            .filter(|r| r.state == crate::rollout::State::Running)
            .map(|r| r.id)
            .collect())
    }
    /// One engine step, written together or not at all: `changes` as
    /// [`AssignmentStore::assign_all`] for `rollout.model`, each target the changes
    /// reach learns the generation that names its assignment, and `rollout` is stored.
    /// Returns the generations, in the order of `changes`.
    fn advance_rollout(
        &self,
        rollout: &mut Rollout,
        changes: &[(DeviceId, AssignedModel)],
        now_ms: u64,
    ) -> Result<Vec<u64>, StoreError>;
}

/// Operator tokens (their hashes), keyed by hash; each has an id too.
pub trait TokenStore: Send + Sync {
    /// The record of the token whose SHA-256 (hex) is `hash`.
    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Every record, oldest first.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Stores `record`, and removes any other record with its id, in one transaction.
    fn put_token(&self, record: &TokenRecord) -> Result<(), StoreError>;
    /// Removes the record with id `id`; `false` when there is none.
    fn remove_token(&self, id: &str) -> Result<bool, StoreError>;
}

/// The audit log: entries by sequence number, appended one at a time.
pub trait AuditStore: Send + Sync {
    /// Appends the entry `next` makes of the last one (`None` when the log is empty),
    /// durably. Appends are serialized: no two see the same last entry.
    fn append_audit(
        &self,
        next: &mut (dyn FnMut(Option<&AuditEntry>) -> AuditEntry + Send),
    ) -> Result<AuditEntry, StoreError>;
    /// Up to `limit` entries from sequence number `from` on, in order. An entry that no
    /// longer decodes comes back as written (its text in `who`), with no hash.
    fn audit_entries(&self, from: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError>;
}

/// Drift policies and their engine's state, per model.
pub trait PolicyStore: Send + Sync {
    fn policy(&self, model: &str) -> Result<Option<(Policy, PolicyState)>, StoreError>;
    /// Stores the policy of `policy.model` and its state together.
    fn put_policy(&self, policy: &Policy, state: &PolicyState) -> Result<(), StoreError>;
    fn policies(&self) -> Result<Vec<(Policy, PolicyState)>, StoreError>;
}

/// The registry's model versions, one record per name and version.
pub trait RegistryStore: Send + Sync {
    fn model_version(&self, name: &str, version: u64) -> Result<Option<ModelRecord>, StoreError>;
    /// Stores `record` unless its name and version are taken; then nothing changes and
    /// the record stored under them comes back.
    fn insert_model_version(&self, record: &ModelRecord)
    -> Result<Option<ModelRecord>, StoreError>;
    /// Changes the record of `name` v`version` with `change`, atomically; `None` when
    /// there is none.
    fn update_model_version(
        &self,
        name: &str,
        version: u64,
        change: &(dyn Fn(&mut ModelRecord) + Sync),
    ) -> Result<Option<ModelRecord>, StoreError>;
    /// Every version of `name` (or of every model), by name, then version.
    fn model_versions(&self, name: Option<&str>) -> Result<Vec<ModelRecord>, StoreError>;
}

/// The records of captured batches devices uploaded, one per `(device, seq)`.
pub trait CaptureStore: Send + Sync {
    fn capture(&self, device: &DeviceId, seq: u64) -> Result<Option<CaptureRecord>, StoreError>;
    /// Stores `record` unless its `(device, seq)` is taken; then nothing changes and the
    /// record stored under it comes back.
    fn put_capture(&self, record: &CaptureRecord) -> Result<Option<CaptureRecord>, StoreError>;
    /// Every record, in `(device, seq)` order.
    fn captures(&self) -> Result<Vec<CaptureRecord>, StoreError>;
    /// The records of `device`, in `seq` order (checked on every upload against the
    /// device's quota: an implementation reads only that device's records).
    fn device_captures(&self, device: &DeviceId) -> Result<Vec<CaptureRecord>, StoreError>;
}

/// Dataset manifests, by id (the SHA-256 of the dataset's file).
pub trait DatasetStore: Send + Sync {
    fn dataset(&self, id: &str) -> Result<Option<DatasetManifest>, StoreError>;
    /// Stores `manifest` (replacing the one with its id), durably.
    fn put_dataset(&self, manifest: &DatasetManifest) -> Result<(), StoreError>;
    /// Every manifest, oldest first.
    fn datasets(&self) -> Result<Vec<DatasetManifest>, StoreError>;
    /// Removes the manifest `id`; `false` when there is none.
    fn remove_dataset(&self, id: &str) -> Result<bool, StoreError>;
}

/// Training jobs by id, and the last job spec of each model (its TOML text).
pub trait JobStore: Send + Sync {
    /// A fresh id `j<n>`, never handed out before by this store.
    fn next_job_id(&self) -> Result<String, StoreError>;
    /// Stores `job` (replacing the one with its id), durably.
    fn put_job(&self, job: &Job) -> Result<(), StoreError>;
    fn job(&self, id: &str) -> Result<Option<Job>, StoreError>;
    /// Every job, oldest first.
    fn jobs(&self) -> Result<Vec<Job>, StoreError>;
    /// Changes job `id` with `change` in one step; `false` when there is none.
    fn update_job(
        &self,
        id: &str,
        change: &mut (dyn FnMut(&mut Job) + Send),
    ) -> Result<bool, StoreError>;
    fn put_job_spec(&self, model: &str, toml: &str) -> Result<(), StoreError>;
    fn job_spec(&self, model: &str) -> Result<Option<String>, StoreError>;
}

/// Bundle and dataset files, content-addressed by their SHA-256 (hex).
pub trait BlobStore: Send + Sync {
    /// A new, empty file to upload into; keeping it is then a rename.
    fn incoming(&self) -> std::io::Result<tempfile::NamedTempFile>;
    /// Keeps `file` (written and synced by the caller) as blob `digest`.
    fn keep(&self, file: tempfile::NamedTempFile, digest: &str) -> std::io::Result<()>;
    /// A local file to read blob `digest` from: in a folder store, where it is (it may
    /// not exist); in object storage, the replica's cached copy, fetched (and checked
    /// against the digest) on first use.
    fn local(&self, digest: &str) -> std::io::Result<std::path::PathBuf>;
    /// Whether blob `digest` is kept (without fetching it).
    fn exists(&self, digest: &str) -> std::io::Result<bool>;
    /// Removes blob `digest` (and a cached copy); nothing when there is none.
    fn remove(&self, digest: &str) -> std::io::Result<()>;
}

/// The notifier's alerts (what each receiver was told, so a restart or a new leader
/// sends nothing twice) and the operators' silences.
pub trait AlertStore: Send + Sync {
    fn alerts(&self) -> Result<Vec<AlertRecord>, StoreError>;
    /// Writes `changed` (by key) and removes `removed`, together.
    fn update_alerts(&self, changed: &[AlertRecord], removed: &[String]) -> Result<(), StoreError>;
    fn silences(&self) -> Result<Vec<Silence>, StoreError>;
    fn put_silence(&self, silence: &Silence) -> Result<(), StoreError>;
    /// Whether there was one with that id.
    fn remove_silence(&self, id: &str) -> Result<bool, StoreError>;
}

/// Every part of the store, as the control plane holds it.
pub trait Store:
    FleetStore
    + AssignmentStore
    + RolloutStore
    + TokenStore
    + AuditStore
    + PolicyStore
    + RegistryStore
    + CaptureStore
    + DatasetStore
    + JobStore
    + AlertStore
{
}

impl<T> Store for T where
    T: FleetStore
        + AssignmentStore
        + RolloutStore
        + TokenStore
        + AuditStore
        + PolicyStore
        + RegistryStore
        + CaptureStore
        + DatasetStore
        + JobStore
        + AlertStore
{
}

/// Of one device's messages, oldest first as `(kind, id)`, the ids of those beyond the
/// newest `keep[kind]` of their kind ([`FleetStore::prune_kinds`]); kinds `keep` does
/// not name stay.
pub(crate) fn beyond_kept<'k, I>(
    messages: impl IntoIterator<Item = (&'k str, I)>,
    keep: &BTreeMap<String, usize>,
) -> Vec<I> {
    let mut of_kind: BTreeMap<&str, Vec<I>> = BTreeMap::new();
    for (kind, id) in messages {
        if keep.contains_key(kind) {
            of_kind.entry(kind).or_default().push(id);
        }
    }
    of_kind
        .into_iter()
        .flat_map(|(kind, mut ids)| {
            let newest = ids.len().saturating_sub(keep[kind]);
            ids.truncate(newest);
            ids
        })
        .collect()
}

/// `devices`, in their order, each with its brief state ([`DeviceState::brief`];
/// [`DeviceState::default`] when it has none yet), read with
/// [`FleetStore::brief_states_named`]: what the device list, the fleet metrics and the
/// alert rules read, none of which looks at a window's per-feature drift.
pub fn with_brief_states(
    fleet: &dyn FleetStore,
    devices: Vec<DeviceRecord>,
) -> Result<Vec<(DeviceRecord, DeviceState)>, StoreError> {
    let ids: Vec<DeviceId> = devices.iter().map(|d| d.id.clone()).collect();
    let mut states: BTreeMap<DeviceId, DeviceState> =
        fleet.brief_states_named(&ids)?.into_iter().collect();
    Ok(devices
        .into_iter()
        .map(|d| {
            let state = states.remove(&d.id).unwrap_or_default();
            (d, state)
        })
        .collect())
}

/// An audit entry that no longer decodes, as [`AuditStore::audit_entries`] returns it.
pub fn unreadable_audit_entry(seq: u64, bytes: &[u8]) -> AuditEntry {
    AuditEntry {
        seq,
        at_ms: 0,
        who: String::from_utf8_lossy(bytes).chars().take(200).collect(),
        role: String::new(),
        action: "(unreadable entry)".into(),
        target: String::new(),
        outcome: 0,
        prev: String::new(),
        hash: String::new(),
    }
}

/// Sets each target of `rollout` that `changes` reach to the generation of its change.
fn record_generations(
    rollout: &mut Rollout,
    changes: &[(DeviceId, AssignedModel)],
    generations: &[u64],
) {
    // By device, not a search of the targets per change (quadratic in a wave).
    let by_device: std::collections::HashMap<&DeviceId, u64> = changes
        .iter()
        .map(|(d, _)| d)
        .zip(generations.iter().copied())
        .collect();
    for t in &mut rollout.targets {
        if let Some(g) = by_device.get(&t.device) {
            t.generation = Some(*g);
        }
    }
}

/// An assignment record as stored; a record that does not decode is started afresh
/// (the next generation supersedes it on the device).
pub(super) fn decode_assignment(bytes: Option<&[u8]>) -> AssignmentRecord {
    bytes
        .and_then(|b| serde_cbor::from_slice(b).ok())
        .unwrap_or_default()
}

/// The records `changes` leave, by device, and each change's generation: read through
/// `read` once per device, then changed in memory in order.
#[allow(clippy::type_complexity)]
pub(super) fn stage<'a, B: AsRef<[u8]>, E>(
    model: &str,
    changes: &'a [(DeviceId, AssignedModel)],
    now_ms: u64,
    mut read: impl FnMut(&DeviceId) -> Result<Option<B>, E>,
) -> Result<
    (
        std::collections::HashMap<&'a DeviceId, AssignmentRecord>,
        Vec<u64>,
    ),
    E,
> {
    let mut staged: std::collections::HashMap<&DeviceId, AssignmentRecord> =
        std::collections::HashMap::new();
    let mut generations = Vec::with_capacity(changes.len());
    for (device, to) in changes {
        let mut record = match staged.remove(device) {
            Some(r) => r,
            None => decode_assignment(read(device)?.as_ref().map(AsRef::as_ref)),
        };
        crate::assign::point(&mut record, model, to, now_ms);
        generations.push(record.generation);
        staged.insert(device, record);
    }
    Ok((staged, generations))
}

/// Runs `call`, which blocks (a synchronous PostgreSQL client, a wait on another
/// runtime), where it may: in place outside a runtime; on a
/// multi-thread runtime's worker after handing its other tasks to other workers
/// ([`tokio::task::block_in_place`]); on a current-thread runtime, on a scoped thread.
pub(crate) fn off_runtime<R: Send>(call: impl FnOnce() -> R + Send) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(call),
        Ok(_) => std::thread::scope(|s| {
            s.spawn(call)
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        }),
        Err(_) => call(),
    }
}
