//! The store in sled, embedded in the control plane's data directory: the default.

use std::path::Path;

use fleetml_protocol::assignment::AssignedModel;
use fleetml_protocol::telemetry::{DeviceId, Envelope, Received};

use super::{
    AlertStore, AssignmentStore, AuditStore, CaptureStore, DatasetStore, FleetStore, JobStore,
    PolicyStore, RegistryStore, RolloutStore, StoreError, TokenStore,
};
use super::{decode_assignment, stage};
use crate::assign::{AssignmentRecord, point};
use crate::jobs::spec::Job;
use crate::records::{
    AlertRecord, AuditEntry, Brief, CaptureRecord, DatasetManifest, DeviceRecord, DeviceState,
    ModelRecord, Policy, PolicyState, Silence, TokenRecord,
};
use crate::rollout::Rollout;

impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> Self {
        match e {
            ::sled::Error::Corruption { .. } => StoreError::corrupt("the sled database", e),
            e => StoreError::Unavailable(format!("sled: {e}")),
        }
    }
}

impl From<::sled::transaction::TransactionError<StoreError>> for StoreError {
    fn from(e: ::sled::transaction::TransactionError<StoreError>) -> Self {
        match e {
            ::sled::transaction::TransactionError::Abort(e) => e,
            ::sled::transaction::TransactionError::Storage(e) => e.into(),
        }
    }
}

fn json<T: serde::Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::corrupt(what, e))
}

/// The record under `key` in `tree`, decoded; `what` names it in an error.
fn get_json<T: serde::de::DeserializeOwned>(
    tree: &::sled::Tree,
    key: impl AsRef<[u8]>,
    what: &str,
) -> Result<Option<T>, StoreError> {
    tree.get(key)?.map(|v| from_json(what, &v)).transpose()
}

/// Every record of `entries` (a tree or a scan of one), decoded; `what` and the key
/// name a record in an error.
fn all_json<T: serde::de::DeserializeOwned>(
    entries: impl Iterator<Item = ::sled::Result<(::sled::IVec, ::sled::IVec)>>,
    what: &str,
) -> Result<Vec<T>, StoreError> {
    entries
        .map(|kv| {
            let (k, v) = kv?;
            from_json(
                &format!("{what} {}", String::from_utf8_lossy(&k).escape_debug()),
                &v,
            )
        })
        .collect()
}

/// Stores `value` under `key` unless the key is taken, durably; then nothing changes
/// and the record stored there comes back.
fn insert_new<T: serde::Serialize + serde::de::DeserializeOwned>(
    tree: &::sled::Tree,
    key: &[u8],
    value: &T,
    what: &str,
) -> Result<Option<T>, StoreError> {
    let won = tree
        .compare_and_swap(key, None as Option<&[u8]>, Some(json(what, value)?))?
        .is_ok();
    tree.flush()?;
    if won {
        return Ok(None);
    }
    get_json(tree, key, what)?
        .map(Some)
        .ok_or_else(|| StoreError::Conflict(format!("{what} was removed meanwhile")))
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::corrupt(what, e))
}

/// The store in sled: trees `devices`, `messages` (keyed `device \0 seq`, big-endian; the
/// envelope's CBOR, or [`SNAPPY`] and that CBOR compressed),
/// `message_meta` (same keys: stored time, kind, a window's model, for retention),
/// `high` (highest seq per device), `state`, `commands` (next command seq per device),
/// `assignments` (CBOR per device), `rollouts` (JSON per id), `tokens` (JSON by token
/// hash), `audit` (JSON by big-endian seq), `policies` (JSON `[policy, state]` by model),
/// `models` (JSON, keyed `name \0 version`, big-endian), `captures` (JSON, keyed
/// `device \0 seq`), `datasets` (JSON by id), `jobs` (JSON by id), `job_specs` (TOML by
/// model), `alerts` (JSON by key), `silences` (JSON by id).
#[derive(Debug, Clone)]
pub struct SledStore {
    db: ::sled::Db,
    devices: ::sled::Tree,
    messages: ::sled::Tree,
    /// Per message (same key): when it was stored, its kind, a window's model.
    message_meta: ::sled::Tree,
    high: ::sled::Tree,
    state: ::sled::Tree,
    commands: ::sled::Tree,
    assignments: ::sled::Tree,
    rollouts: ::sled::Tree,
    tokens: ::sled::Tree,
    audit: ::sled::Tree,
    policies: ::sled::Tree,
    models: ::sled::Tree,
    captures: ::sled::Tree,
    datasets: ::sled::Tree,
    jobs: ::sled::Tree,
    job_specs: ::sled::Tree,
    alerts: ::sled::Tree,
    silences: ::sled::Tree,
    /// Serializes audit appends (read the last entry, then write the next).
    audit_append: std::sync::Arc<std::sync::Mutex<()>>,
    /// Serializes job updates (read, change, write).
    job_update: std::sync::Arc<std::sync::Mutex<()>>,
}

/// The first byte of a message stored compressed: the envelope's CBOR in snappy's raw
/// format follows. CBOR that decodes to an envelope never starts with 0x00 (that byte is
/// the whole integer 0), so the two forms cannot be taken for each other; messages a
/// release stored before are CBOR.
/// Compressed, a window report takes less than half its bytes (3,060 to 1,367 in the
/// simulator's), and sled, which writes a leaf's values again each time it rewrites the
/// leaf, writes that much less.
const SNAPPY: u8 = 0x00;

/// What the message tree keeps of a message's CBOR: compressed where that is smaller,
/// and never when the CBOR is longer than a message can be ([`unpack`] refuses a claim
/// of that length; the CBOR of an envelope a device encoded unusually can be, since the
/// ingest encodes it again).
fn pack(cbor: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if cbor.len() > fleetml_protocol::telemetry::MAX_MESSAGE {
        return cbor.into();
    }
    let mut out = vec![0; 1 + snap::raw::max_compress_len(cbor.len())];
    out[0] = SNAPPY;
    match snap::raw::Encoder::new().compress(cbor, &mut out[1..]) {
        Ok(n) if 1 + n < cbor.len() => {
            out.truncate(1 + n);
            out.into()
        }
        _ => cbor.into(),
    }
}

/// The envelope a message-tree value holds ([`pack`]); the key names it in errors.
fn unpack(key: &[u8], value: &[u8]) -> Result<Envelope, StoreError> {
    let what = || match (SledStore::device_of(key), SledStore::seq_of(key)) {
        (Some(device), Some(seq)) => format!("message {device} {seq}"),
        _ => format!("message {}", String::from_utf8_lossy(key).escape_debug()),
    };
    let Some(packed) = value.strip_prefix(&[SNAPPY]) else {
        return serde_cbor::from_slice(value).map_err(|e| StoreError::corrupt(what(), e));
    };
    // The length snappy's header claims is checked before anything is allocated for it.
    let len = snap::raw::decompress_len(packed).map_err(|e| StoreError::corrupt(what(), e))?;
    if len > fleetml_protocol::telemetry::MAX_MESSAGE {
        return Err(StoreError::corrupt(
            what(),
            format_args!("{len} bytes uncompressed, more than a message can be"),
        ));
    }
    let cbor = snap::raw::Decoder::new()
        .decompress_vec(packed)
        .map_err(|e| StoreError::corrupt(what(), e))?;
    serde_cbor::from_slice(&cbor).map_err(|e| StoreError::corrupt(what(), e))
}

fn be(v: Option<::sled::IVec>) -> Option<u64> {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
}

impl SledStore {
    /// [`SledStore::open_with_cache`] with a 64 MiB page cache (tests, tools).
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        SledStore::open_with_cache(path, 64 << 20)
    }

    /// Opens (or creates) the store at `path`, keeping at most `cache` bytes of its
    /// pages in memory.
    pub fn open_with_cache(path: &Path, cache: u64) -> Result<SledStore, StoreError> {
        let db = ::sled::Config::new()
            .path(path)
            .cache_capacity(cache)
            .open()
            .map_err(|e| StoreError::unavailable(format_args!("opening {}", path.display()), e))?;
        let store = SledStore {
            devices: db.open_tree("devices")?,
            messages: db.open_tree("messages")?,
            message_meta: db.open_tree("message_meta")?,
            high: db.open_tree("high")?,
            state: db.open_tree("state")?,
            commands: db.open_tree("commands")?,
            assignments: db.open_tree("assignments")?,
            rollouts: db.open_tree("rollouts")?,
            tokens: db.open_tree("tokens")?,
            audit: db.open_tree("audit")?,
            policies: db.open_tree("policies")?,
            models: db.open_tree("models")?,
            captures: db.open_tree("captures")?,
            datasets: db.open_tree("datasets")?,
            jobs: db.open_tree("jobs")?,
            job_specs: db.open_tree("job_specs")?,
            alerts: db.open_tree("alerts")?,
            silences: db.open_tree("silences")?,
            audit_append: Default::default(),
            job_update: Default::default(),
            db,
        };
        Ok(store)
    }

    /// Marks that every message stored before kinds and times were recorded has them.
    const BACKFILLED: &'static [u8] = b"\xffbackfilled";

    /// Messages stored by a release that kept no [`SledStore::message_meta`] get it
    /// once, at the first retention pass, counted as stored at `now` (as PostgreSQL's
    /// migration counts them stored when it ran).
    fn backfill_meta(&self, now: u64) -> Result<(), StoreError> {
        if self.message_meta.contains_key(Self::BACKFILLED)? {
            return Ok(());
        }
        for kv in self.messages.iter() {
            let (k, v) = kv?;
            if !self.message_meta.contains_key(&k)? {
                let e = unpack(&k, &v)?;
                self.message_meta.insert(k, Self::meta(&e, now))?;
            }
        }
        self.message_meta.insert(Self::BACKFILLED, &[])?;
        self.message_meta.flush()?;
        Ok(())
    }

    /// A message's meta record: stored time (8 bytes, big-endian), its kind's index in
    /// [`super::KINDS`] (255: another), a window's model.
    fn meta(e: &Envelope, stored_ms: u64) -> Vec<u8> {
        let kind = e.body.kind();
        let mut v = stored_ms.to_be_bytes().to_vec();
        v.push(
            super::KINDS
                .iter()
                .position(|k| *k == kind)
                .map_or(255, |i| i as u8),
        );
        if let fleetml_protocol::telemetry::Body::Window(w) = &e.body {
            v.extend_from_slice(w.model.as_bytes());
        }
        v
    }

    /// The device of a message key (`device \0 seq`).
    fn device_of(key: &[u8]) -> Option<DeviceId> {
        let end = key.len().checked_sub(9)?;
        DeviceId::new(std::str::from_utf8(&key[..end]).ok()?).ok()
    }

    /// The sequence number of a message key ([`SledStore::key`]).
    fn seq_of(key: &[u8]) -> Option<u64> {
        let at = key.len().checked_sub(8)?;
        <[u8; 8]>::try_from(&key[at..]).ok().map(u64::from_be_bytes)
    }

    /// Allocates the device's next command sequence number (not flushed).
    fn bump_command_seq(&self, device: &DeviceId) -> Result<u64, StoreError> {
        let before = be(self.commands.fetch_and_update(device.as_str(), |old| {
            let n = old
                .and_then(|v| <[u8; 8]>::try_from(v).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            Some((n + 1).to_be_bytes().to_vec())
        })?);
        Ok(before.unwrap_or(0))
    }

    fn key(device: &DeviceId, seq: u64) -> Vec<u8> {
        let mut k = device.as_str().as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }
}

impl FleetStore for SledStore {
    fn enroll(&self, device: &DeviceRecord) -> Result<bool, StoreError> {
        let bytes = serde_cbor::to_vec(device)?;
        let new = self
            .devices
            .compare_and_swap(device.id.as_str(), None as Option<&[u8]>, Some(bytes))?
            .is_ok();
        self.db.flush()?;
        Ok(new)
    }

    fn replace_device(&self, device: &DeviceRecord) -> Result<bool, StoreError> {
        let bytes = serde_cbor::to_vec(device)?;
        let found = self
            .devices
            .fetch_and_update(device.id.as_str(), |old| old.map(|_| bytes.clone()))?
            .is_some();
        self.db.flush()?;
        Ok(found)
    }

    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        match self.devices.get(id.as_str())? {
            Some(v) => Ok(Some(serde_cbor::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.devices
            .iter()
            .map(|kv| Ok(serde_cbor::from_slice(&kv?.1)?))
            .collect()
    }

    fn insert(&self, envelope: &Received, now_ms: u64) -> Result<(bool, Option<u64>), StoreError> {
        let bytes = pack(envelope.cbor());
        let key = Self::key(&envelope.device, envelope.seq);
        // The mark moves before the message is written: after a crash between the two
        // no stored message is above the mark, which `store_messages` relies on.
        let device = envelope.device.as_str().as_bytes();
        let before = be(self.high.fetch_and_update(device, |old| {
            let old = old
                .and_then(|v| <[u8; 8]>::try_from(v).ok())
                .map(u64::from_be_bytes);
            Some(
                old.map_or(envelope.seq, |o| o.max(envelope.seq))
                    .to_be_bytes()
                    .to_vec(),
            )
        })?);
        let new = self
            .messages
            .compare_and_swap(&key, None as Option<&[u8]>, Some(&*bytes))?
            .is_ok();
        if new {
            self.message_meta
                .insert(key, Self::meta(envelope, now_ms))?;
        }
        Ok((new, before))
    }

    fn messages(
        &self,
        device: &DeviceId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Envelope>, StoreError> {
        let mut end = device.as_str().as_bytes().to_vec();
        end.push(1);
        self.messages
            .range(Self::key(device, from)..end)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                unpack(&k, &v)
            })
            .collect()
    }

    fn prune_messages(&self, device: &DeviceId, keep: usize) -> Result<u64, StoreError> {
        let mut end = device.as_str().as_bytes().to_vec();
        end.push(1);
        let range = Self::key(device, 0)..end;
        let stored = self.messages.range(range.clone()).keys().count();
        let drop = stored.saturating_sub(keep);
        let mut batch = ::sled::Batch::default();
        for k in self.messages.range(range).keys().take(drop) {
            batch.remove(k?);
        }
        self.message_meta.apply_batch(batch.clone())?;
        self.messages.apply_batch(batch)?;
        self.messages.flush()?;
        Ok(drop as u64)
    }

    fn prune_kinds(
        &self,
        device: &DeviceId,
        keep: &std::collections::BTreeMap<String, usize>,
    ) -> Result<u64, StoreError> {
        let mut end = device.as_str().as_bytes().to_vec();
        end.push(1);
        // The meta tree has the message tree's keys, oldest first, and each one's kind.
        let mut messages = Vec::new();
        for kv in self.message_meta.range(Self::key(device, 0)..end) {
            let (key, v) = kv?;
            if let Some(kind) = v.get(8).and_then(|i| super::KINDS.get(*i as usize)) {
                messages.push((*kind, key));
            }
        }
        let gone = super::beyond_kept(messages, keep);
        let mut batch = ::sled::Batch::default();
        for key in &gone {
            batch.remove(key.clone());
        }
        self.message_meta.apply_batch(batch.clone())?;
        self.messages.apply_batch(batch)?;
        self.messages.flush()?;
        Ok(gone.len() as u64)
    }

    fn expire_messages(&self, rules: &super::AgeRules, now_ms: u64) -> Result<u64, StoreError> {
        self.backfill_meta(now_ms)?;
        let mut expiry = super::Expiry::new(rules, now_ms);
        let (mut gone, mut batch, mut pending) = (0u64, ::sled::Batch::default(), 0usize);
        for kv in self.message_meta.iter() {
            let (key, v) = kv?;
            let (Some(device), Some(stored)) = (
                Self::device_of(&key),
                v.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()),
            ) else {
                continue;
            };
            let kind = v
                .get(8)
                .and_then(|i| super::KINDS.get(*i as usize))
                .copied();
            let model = (kind == Some("window")).then(|| String::from_utf8_lossy(&v[9..]));
            let entry = super::LogEntry {
                device: device.as_str(),
                kind,
                model: model.as_deref(),
                stored_ms: u64::from_be_bytes(stored),
            };
            if expiry.gone(&entry) {
                batch.remove(key);
                pending += 1;
                gone += 1;
            }
            // Removed in slices: a first pass over a big log holds no list of it all.
            if pending == 10_000 {
                self.messages.apply_batch(batch.clone())?;
                self.message_meta.apply_batch(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
        self.messages.apply_batch(batch.clone())?;
        self.message_meta.apply_batch(batch)?;
        self.messages.flush()?;
        Ok(gone)
    }

    fn state(&self, device: &DeviceId) -> Result<Option<DeviceState>, StoreError> {
        match self.state.get(device.as_str())? {
            Some(v) => Ok(Some(serde_cbor::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn brief_states_named(
        &self,
        ids: &[DeviceId],
    ) -> Result<Vec<(DeviceId, DeviceState)>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = self.state.get(id.as_str())? {
                let Brief(state) = serde_cbor::from_slice(&v)?;
                out.push((id.clone(), state));
            }
        }
        Ok(out)
    }

    /// One multi-tree transaction for the whole batch (messages, their meta records,
    /// the high-water marks and the device states they change): a crash cannot keep a
    /// message and lose its change of state, and an error stores nothing of the batch.
    /// `change` runs once per envelope: sled 0.34 runs a transaction under its
    /// process-wide write lock, which keeps out the concurrent writes that would make it
    /// retry (a retry would run `change` again on the state read then, which the
    /// ingest's change, a function of its inputs, allows). The lock also makes the
    /// ingest's lanes store one batch at a time on sled (the cost is in BENCHMARKS.md).
    fn store_messages(
        &self,
        envelopes: &[Received],
        now_ms: u64,
        change: &mut super::BatchChange<'_>,
    ) -> Result<Vec<(bool, Option<u64>)>, StoreError> {
        use ::sled::Transactional;
        use ::sled::transaction::ConflictableTransactionError as Abort;
        use std::collections::hash_map::{Entry, HashMap};
        let rows: Vec<_> = envelopes
            .iter()
            .map(|e| {
                (
                    Self::key(&e.device, e.seq),
                    pack(e.cbor()),
                    Self::meta(e, now_ms),
                )
            })
            .collect();
        let change = std::cell::RefCell::new(change);
        let stored = (&self.messages, &self.message_meta, &self.high, &self.state).transaction(
            |(messages, meta, high, state)| {
                let mut change = change.borrow_mut();
                let mut highs: HashMap<&str, Option<u64>> = HashMap::new();
                let mut states: HashMap<&str, DeviceState> = HashMap::new();
                let mut out = Vec::with_capacity(envelopes.len());
                for (i, (e, (key, bytes, m))) in envelopes.iter().zip(&rows).enumerate() {
                    let device = e.device.as_str();
                    let before = match highs.get(device) {
                        Some(h) => *h,
                        None => be(high.get(device)?),
                    };
                    highs.insert(device, Some(before.map_or(e.seq, |b| b.max(e.seq))));
                    // No stored message of the device is above its mark (`insert` moves
                    // the mark first too), so a message above it is new without a read,
                    // as most are. Below it, reads see this transaction's own writes: a
                    // duplicate within the batch is a duplicate.
                    let new = before.is_none_or(|b| e.seq > b) || messages.get(key)?.is_none();
                    if new {
                        messages.insert(key.as_slice(), &**bytes)?;
                        meta.insert(key.as_slice(), m.as_slice())?;
                    }
                    let st = match states.entry(device) {
                        Entry::Occupied(o) => o.into_mut(),
                        Entry::Vacant(v) => v.insert(match state.get(device)? {
                            Some(b) => serde_cbor::from_slice(&b)
                                .map_err(|e| Abort::Abort(StoreError::from(e)))?,
                            None => DeviceState::default(),
                        }),
                    };
                    (*change)(i, st, new, before);
                    out.push((new, before));
                }
                for (device, h) in highs {
                    if let Some(h) = h {
                        high.insert(device, h.to_be_bytes().to_vec())?;
                    }
                }
                for (device, st) in &states {
                    let bytes =
                        serde_cbor::to_vec(st).map_err(|e| Abort::Abort(StoreError::from(e)))?;
                    state.insert(*device, bytes)?;
                }
                Ok(out)
            },
        )?;
        Ok(stored)
    }

    fn store_message(
        &self,
        envelope: &Received,
        now_ms: u64,
        change: &mut (dyn FnMut(&mut DeviceState, bool, Option<u64>) + Send),
    ) -> Result<(bool, Option<u64>), StoreError> {
        self.store_messages(
            std::slice::from_ref(envelope),
            now_ms,
            &mut |_, st, new, b| change(st, new, b),
        )?
        .pop()
        .ok_or_else(|| StoreError::Unavailable("sled stored no outcome".into()))
    }

    fn update_state(
        &self,
        device: &DeviceId,
        change: &mut (dyn FnMut(&mut DeviceState) + Send),
    ) -> Result<(), StoreError> {
        // One ingest task writes states; views only read.
        let mut state = self.state(device)?.unwrap_or_default();
        change(&mut state);
        self.state
            .insert(device.as_str(), serde_cbor::to_vec(&state)?)?;
        Ok(())
    }

    fn next_command_seq(&self, device: &DeviceId) -> Result<u64, StoreError> {
        let seq = self.bump_command_seq(device)?;
        self.db.flush()?;
        Ok(seq)
    }

    fn next_command_seqs(&self, devices: &[DeviceId]) -> Result<Vec<u64>, StoreError> {
        let seqs = devices
            .iter()
            .map(|d| self.bump_command_seq(d))
            .collect::<Result<Vec<_>, _>>()?;
        self.db.flush()?;
        Ok(seqs)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

impl AssignmentStore for SledStore {
    fn assignment(&self, device: &DeviceId) -> Result<Option<AssignmentRecord>, StoreError> {
        match self.assignments.get(device.as_str())? {
            Some(bytes) => Ok(Some(serde_cbor::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    fn assign(
        &self,
        device: &DeviceId,
        model: &str,
        to: &AssignedModel,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut generation = 0;
        self.assignments.update_and_fetch(device.as_str(), |old| {
            let mut record = decode_assignment(old);
            point(&mut record, model, to, now_ms);
            generation = record.generation;
            serde_cbor::to_vec(&record).ok()
        })?;
        self.assignments.flush()?;
        Ok(generation)
    }

    fn assign_all(
        &self,
        model: &str,
        changes: &[(DeviceId, AssignedModel)],
        now_ms: u64,
    ) -> Result<Vec<u64>, StoreError> {
        // One batch and one flush (a flush per device took about a millisecond each:
        // ten seconds for a wave of 10,000 devices, found with `fleetctl sim`). The
        // caller is the only writer meanwhile (the rollout engine, under its lock).
        let (staged, generations) = stage(model, changes, now_ms, |d| {
            self.assignments.get(d.as_str()).map_err(StoreError::from)
        })?;
        let mut batch = ::sled::Batch::default();
        for (device, record) in &staged {
            batch.insert(device.as_str(), serde_cbor::to_vec(record)?);
        }
        self.assignments.apply_batch(batch)?;
        self.assignments.flush()?;
        Ok(generations)
    }

    fn assignments(&self) -> Result<Vec<(DeviceId, AssignmentRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.assignments.iter() {
            let (k, v) = item?;
            if let Ok(id) = DeviceId::new(&String::from_utf8_lossy(&k)) {
                out.push((id, serde_cbor::from_slice(&v)?));
            }
        }
        Ok(out)
    }
}

/// What a rollout record says first about itself, decoded alone: a rollout to 10,000
/// devices is megabytes of targets that listing them does not need.
#[derive(serde::Deserialize)]
struct RolloutHead {
    id: String,
    state: crate::rollout::State,
    created_ms: u64,
}

impl SledStore {
    /// Every rollout's head with its record, oldest first.
    fn rollout_heads(&self) -> Result<Vec<(RolloutHead, ::sled::IVec)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.rollouts.iter() {
            let (k, v) = kv?;
            let what = format!("rollout {}", String::from_utf8_lossy(&k).escape_debug());
            out.push((from_json::<RolloutHead>(&what, &v)?, v));
        }
        out.sort_by_key(|(head, _)| head.created_ms);
        Ok(out)
    }
}

impl RolloutStore for SledStore {
    fn next_rollout_id(&self) -> Result<String, StoreError> {
        Ok(format!("r{}", self.db.generate_id()? + 1))
    }

    fn put_rollout(&self, rollout: &Rollout) -> Result<(), StoreError> {
        self.rollouts
            .insert(rollout.id.as_bytes(), json("a rollout", rollout)?)?;
        self.rollouts.flush()?;
        Ok(())
    }

    fn rollout(&self, id: &str) -> Result<Option<Rollout>, StoreError> {
        get_json(&self.rollouts, id, &format!("rollout {id}"))
    }

    fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let mut out: Vec<Rollout> = all_json(self.rollouts.iter(), "rollout")?;
        out.sort_by_key(|r| r.created_ms);
        Ok(out)
    }

    fn unfinished_rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.rollout_heads()?
            .into_iter()
            .filter(|(head, _)| !head.state.is_final())
            .map(|(head, v)| from_json(&format!("rollout {}", head.id.escape_debug()), &v))
            .collect()
    }

    fn running_rollout_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .rollout_heads()?
            .into_iter()
            .filter(|(head, _)| head.state == crate::rollout::State::Running)
            .map(|(head, _)| head.id)
            .collect())
    }

    fn advance_rollout(
        &self,
        rollout: &mut Rollout,
        changes: &[(DeviceId, AssignedModel)],
        now_ms: u64,
    ) -> Result<Vec<u64>, StoreError> {
        use ::sled::Transactional;
        use ::sled::transaction::ConflictableTransactionError as Abort;
        let model = rollout.model.clone();
        let current: &Rollout = rollout;
        let generations =
            (&self.assignments, &self.rollouts).transaction(|(assignments, rollouts)| {
                let (staged, generations) =
                    stage(&model, changes, now_ms, |d| assignments.get(d.as_str()))?;
                for (device, record) in &staged {
                    let bytes = serde_cbor::to_vec(record)
                        .map_err(|e| Abort::Abort(StoreError::corrupt("an assignment", e)))?;
                    assignments.insert(device.as_str(), bytes)?;
                }
                let mut after = current.clone();
                super::record_generations(&mut after, changes, &generations);
                rollouts.insert(
                    after.id.as_bytes(),
                    json("a rollout", &after).map_err(Abort::Abort)?,
                )?;
                Ok(generations)
            })?;
        super::record_generations(rollout, changes, &generations);
        self.db.flush()?;
        Ok(generations)
    }
}

impl TokenStore for SledStore {
    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        // A record that no longer decodes authenticates nobody.
        Ok(self
            .tokens
            .get(hash.as_bytes())?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut out: Vec<TokenRecord> = Vec::new();
        for item in self.tokens.iter() {
            let (_, v) = item?;
            if let Ok(r) = serde_json::from_slice(&v) {
                out.push(r);
            }
        }
        out.sort_by_key(|r| r.created_ms);
        Ok(out)
    }

    fn put_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let stale: Vec<String> = self
            .tokens()?
            .into_iter()
            .filter(|r| r.id == record.id && r.hash != record.hash)
            .map(|r| r.hash)
            .collect();
        let mut batch = ::sled::Batch::default();
        for hash in stale {
            batch.remove(hash.as_bytes());
        }
        batch.insert(record.hash.as_bytes(), json("a token record", record)?);
        self.tokens.apply_batch(batch)?;
        self.tokens.flush()?;
        Ok(())
    }

    fn remove_token(&self, id: &str) -> Result<bool, StoreError> {
        let Some(r) = self.tokens()?.into_iter().find(|r| r.id == id) else {
            return Ok(false);
        };
        self.tokens.remove(r.hash.as_bytes())?;
        self.tokens.flush()?;
        Ok(true)
    }
}

impl AuditStore for SledStore {
    fn append_audit(
        &self,
        next: &mut (dyn FnMut(Option<&AuditEntry>) -> AuditEntry + Send),
    ) -> Result<AuditEntry, StoreError> {
        let _guard = self.audit_append.lock().unwrap_or_else(|p| p.into_inner());
        let last: Option<AuditEntry> = match self.audit.last()? {
            Some((k, v)) => Some(from_json(
                &format!(
                    "audit entry {}",
                    <[u8; 8]>::try_from(k.as_ref()).map_or(0, u64::from_be_bytes)
                ),
                &v,
            )?),
            None => None,
        };
        let entry = next(last.as_ref());
        self.audit
            .insert(entry.seq.to_be_bytes(), json("an audit entry", &entry)?)?;
        self.audit.flush()?;
        Ok(entry)
    }

    fn audit_entries(&self, from: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.audit.range(from.to_be_bytes()..).take(limit) {
            let (k, v) = item?;
            let seq = <[u8; 8]>::try_from(k.as_ref()).map_or(0, u64::from_be_bytes);
            out.push(
                serde_json::from_slice(&v)
                    .unwrap_or_else(|_| super::unreadable_audit_entry(seq, &v)),
            );
        }
        Ok(out)
    }
}

impl AlertStore for SledStore {
    fn alerts(&self) -> Result<Vec<AlertRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.alerts.iter() {
            let (_, v) = item?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::corrupt("an alert", e))?);
        }
        Ok(out)
    }

    fn update_alerts(&self, changed: &[AlertRecord], removed: &[String]) -> Result<(), StoreError> {
        let mut batch = ::sled::Batch::default();
        for a in changed {
            batch.insert(a.key.as_bytes(), json("an alert", a)?);
        }
        for k in removed {
            batch.remove(k.as_bytes());
        }
        self.alerts.apply_batch(batch)?;
        self.alerts.flush()?;
        Ok(())
    }

    fn silences(&self) -> Result<Vec<Silence>, StoreError> {
        let mut out = Vec::new();
        for item in self.silences.iter() {
            let (_, v) = item?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::corrupt("a silence", e))?);
        }
        Ok(out)
    }

    fn put_silence(&self, silence: &Silence) -> Result<(), StoreError> {
        self.silences
            .insert(silence.id.as_bytes(), json("a silence", silence)?)?;
        self.silences.flush()?;
        Ok(())
    }

    fn remove_silence(&self, id: &str) -> Result<bool, StoreError> {
        let gone = self.silences.remove(id.as_bytes())?.is_some();
        self.silences.flush()?;
        Ok(gone)
    }
}

impl PolicyStore for SledStore {
    fn policy(&self, model: &str) -> Result<Option<(Policy, PolicyState)>, StoreError> {
        Ok(self
            .policies
            .get(model.as_bytes())?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    fn put_policy(&self, policy: &Policy, state: &PolicyState) -> Result<(), StoreError> {
        self.policies
            .insert(policy.model.as_bytes(), json("a policy", &(policy, state))?)?;
        self.policies.flush()?;
        Ok(())
    }

    fn policies(&self) -> Result<Vec<(Policy, PolicyState)>, StoreError> {
        let mut out = Vec::new();
        for item in self.policies.iter() {
            let (_, v) = item?;
            if let Ok(x) = serde_json::from_slice(&v) {
                out.push(x);
            }
        }
        Ok(out)
    }
}

fn model_key(name: &str, version: u64) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

impl RegistryStore for SledStore {
    fn model_version(&self, name: &str, version: u64) -> Result<Option<ModelRecord>, StoreError> {
        get_json(
            &self.models,
            model_key(name, version),
            &format!("model record {name} v{version}"),
        )
    }

    fn insert_model_version(
        &self,
        record: &ModelRecord,
    ) -> Result<Option<ModelRecord>, StoreError> {
        insert_new(
            &self.models,
            &model_key(&record.name, record.version),
            record,
            &format!("model record {} v{}", record.name, record.version),
        )
    }

    fn update_model_version(
        &self,
        name: &str,
        version: u64,
        change: &(dyn Fn(&mut ModelRecord) + Sync),
    ) -> Result<Option<ModelRecord>, StoreError> {
        let mut out = None;
        let mut failure = None;
        self.models
            .update_and_fetch(model_key(name, version), |old| {
                let old = old?;
                match serde_json::from_slice::<ModelRecord>(old) {
                    Ok(mut r) => {
                        change(&mut r);
                        let bytes = serde_json::to_vec(&r).ok();
                        out = Some(r);
                        bytes.or_else(|| Some(old.to_vec()))
                    }
                    Err(e) => {
                        failure = Some(StoreError::corrupt(
                            format_args!("model record {name} v{version}"),
                            e,
                        ));
                        Some(old.to_vec())
                    }
                }
            })?;
        if let Some(e) = failure {
            return Err(e);
        }
        self.models.flush()?;
        Ok(out)
    }

    fn model_versions(&self, name: Option<&str>) -> Result<Vec<ModelRecord>, StoreError> {
        let prefix = name.map(|n| {
            let mut p = n.as_bytes().to_vec();
            p.push(0);
            p
        });
        all_json(
            self.models.scan_prefix(prefix.unwrap_or_default()),
            "model record",
        )
    }
}

impl CaptureStore for SledStore {
    fn capture(&self, device: &DeviceId, seq: u64) -> Result<Option<CaptureRecord>, StoreError> {
        get_json(
            &self.captures,
            Self::key(device, seq),
            &format!("capture record {device} {seq}"),
        )
    }

    fn put_capture(&self, record: &CaptureRecord) -> Result<Option<CaptureRecord>, StoreError> {
        insert_new(
            &self.captures,
            &Self::key(&record.device, record.seq),
            record,
            &format!("capture record {} {}", record.device, record.seq),
        )
    }

    fn captures(&self) -> Result<Vec<CaptureRecord>, StoreError> {
        all_json(self.captures.iter(), "capture record")
    }

    fn device_captures(&self, device: &DeviceId) -> Result<Vec<CaptureRecord>, StoreError> {
        let mut prefix = device.as_str().as_bytes().to_vec();
        prefix.push(0);
        all_json(self.captures.scan_prefix(prefix), "capture record")
    }
}

impl DatasetStore for SledStore {
    fn dataset(&self, id: &str) -> Result<Option<DatasetManifest>, StoreError> {
        get_json(&self.datasets, id, &format!("dataset manifest {id}"))
    }

    fn put_dataset(&self, manifest: &DatasetManifest) -> Result<(), StoreError> {
        self.datasets.insert(
            manifest.id.as_bytes(),
            json("a dataset manifest", manifest)?,
        )?;
        self.datasets.flush()?;
        Ok(())
    }

    fn datasets(&self) -> Result<Vec<DatasetManifest>, StoreError> {
        let mut out: Vec<DatasetManifest> = all_json(self.datasets.iter(), "dataset manifest")?;
        out.sort_by_key(|m| m.created_ms);
        Ok(out)
    }

    fn remove_dataset(&self, id: &str) -> Result<bool, StoreError> {
        let existed = self.datasets.remove(id.as_bytes())?.is_some();
        self.datasets.flush()?;
        Ok(existed)
    }
}

impl JobStore for SledStore {
    fn next_job_id(&self) -> Result<String, StoreError> {
        Ok(format!("j{}", self.db.generate_id()? + 1))
    }

    fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        self.jobs.insert(job.id.as_bytes(), json("a job", job)?)?;
        self.jobs.flush()?;
        Ok(())
    }

    fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        get_json(&self.jobs, id, &format!("job {id}"))
    }

    fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        let mut out: Vec<Job> = all_json(self.jobs.iter(), "job")?;
        out.sort_by_key(|j| j.created_ms);
        Ok(out)
    }

    fn update_job(
        &self,
        id: &str,
        change: &mut (dyn FnMut(&mut Job) + Send),
    ) -> Result<bool, StoreError> {
        let _guard = self.job_update.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut job) = self.job(id)? else {
            return Ok(false);
        };
        change(&mut job);
        self.put_job(&job)?;
        Ok(true)
    }

    fn put_job_spec(&self, model: &str, toml: &str) -> Result<(), StoreError> {
        self.job_specs.insert(model.as_bytes(), toml.as_bytes())?;
        self.job_specs.flush()?;
        Ok(())
    }

    fn job_spec(&self, model: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .job_specs
            .get(model.as_bytes())?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AgeRules, FleetStore};
    use proptest::prelude::*;

    /// A message whose CBOR is long and repetitive, as window reports are.
    fn long(device: &DeviceId, seq: u64) -> Received {
        Received::new(Envelope {
            body: fleetml_protocol::telemetry::Body::Receipt(
                fleetml_protocol::telemetry::Receipt {
                    stored: vec![[1_000_000, 1_000_000]; 300],
                },
            ),
            ..receipt(device, seq).into_envelope()
        })
    }

    /// A long message is kept compressed and a short one as CBOR; a message stored as
    /// CBOR by an earlier release reads as before; every form reads back as stored.
    #[test]
    fn long_messages_are_kept_compressed_and_every_form_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(&dir.path().join("fleet.db")).expect("open");
        let d = DeviceId::new("d").expect("id");
        let small = Received::new(Envelope {
            auth: (0..32).collect(),
            ..receipt(&d, 2).into_envelope()
        });
        let (big, old) = (long(&d, 1), long(&d, 3));
        s.store_messages(&[big.clone(), small.clone()], 5, &mut |_, _, _, _| {})
            .expect("stored");
        s.messages
            .insert(SledStore::key(&d, 3), old.cbor())
            .expect("as an earlier release stored it");
        let kept = |seq| {
            s.messages
                .get(SledStore::key(&d, seq))
                .expect("read")
                .expect("kept")
        };
        assert_eq!(kept(1)[0], SNAPPY);
        assert!(
            kept(1).len() * 3 < big.cbor().len(),
            "{} of {} bytes",
            kept(1).len(),
            big.cbor().len()
        );
        assert_eq!(&*kept(2), small.cbor(), "not worth compressing");
        assert_eq!(
            s.messages(&d, 0, 10).expect("read"),
            [big, small, old].map(Received::into_envelope)
        );
    }

    /// A compressed message spoiled on disk is an error naming it, and a length field
    /// claiming more than a message can be is refused before it is allocated.
    #[test]
    fn a_spoiled_compressed_message_is_named() {
        let d = DeviceId::new("d").expect("id");
        let key = SledStore::key(&d, 7);
        let mut packed = pack(long(&d, 7).cbor()).into_owned();
        packed.truncate(packed.len() / 2);
        let e = unpack(&key, &packed).expect_err("cut in half").to_string();
        assert!(e.contains("message d 7"), "{e}");
        // Snappy's header: the uncompressed length as a varint (here 2^32 - 1).
        let huge = [SNAPPY, 0xff, 0xff, 0xff, 0xff, 0x0f, 0];
        let e = unpack(&key, &huge).expect_err("too long").to_string();
        assert!(e.contains("more than a message can be"), "{e}");
    }

    /// An envelope whose CBOR is longer than a message can be (a device's unusual
    /// encoding, encoded again by the ingest) is kept as CBOR, and reads back.
    #[test]
    fn cbor_longer_than_a_message_is_kept_as_it_is() {
        let d = DeviceId::new("d").expect("id");
        let max = fleetml_protocol::telemetry::MAX_MESSAGE as u64;
        let over = Received::new(Envelope {
            body: fleetml_protocol::telemetry::Body::Receipt(
                fleetml_protocol::telemetry::Receipt {
                    stored: vec![[u64::MAX, u64::MAX]; (max / 16) as usize],
                },
            ),
            ..long(&d, 1).into_envelope()
        });
        assert!(over.cbor().len() > max as usize);
        let kept = pack(over.cbor());
        assert_eq!(&*kept, over.cbor());
        assert_eq!(
            unpack(&SledStore::key(&d, 1), &kept).expect("reads"),
            over.into_envelope()
        );
    }

    proptest! {
        /// Whatever bytes the message tree holds, reading them errs or decodes, never
        /// panics; and what `pack` makes of CBOR reads back as that CBOR's envelope.
        #[test]
        fn unpack_never_panics_and_reads_back_what_pack_made(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            ranges in 0u64..400,
        ) {
            let key = b"d\0\0\0\0\0\0\0\0\x01";
            let _ = unpack(key, &bytes);
            let mut spoiled = bytes.clone();
            spoiled.insert(0, SNAPPY);
            let _ = unpack(key, &spoiled);
            let d = DeviceId::new("d").expect("id");
            let mut m = long(&d, 1).into_envelope();
            m.body = fleetml_protocol::telemetry::Body::Receipt(
                fleetml_protocol::telemetry::Receipt {
                    stored: (0..ranges).map(|i| [3 * i, 3 * i + 1]).collect(),
                },
            );
            let r = Received::new(m);
            prop_assert_eq!(unpack(key, &pack(r.cbor()))?, r.into_envelope());
        }
    }

    /// A message of `device` numbered `seq` (its body does not matter to the store).
    fn receipt(device: &DeviceId, seq: u64) -> Received {
        Received::new(Envelope {
            v: 1,
            device: device.clone(),
            seq,
            ts_ms: 0,
            body: fleetml_protocol::telemetry::Body::Receipt(
                fleetml_protocol::telemetry::Receipt {
                    stored: vec![[seq, seq]],
                },
            ),
            auth: vec![0; 32],
        })
    }

    /// A batch is one transaction: a device state that no longer decodes fails the
    /// batch, and nothing of it is stored — not even the messages before that device's
    /// (stored one by one, they were kept while the states they change were lost).
    #[test]
    fn a_batch_is_stored_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(&dir.path().join("fleet.db")).expect("open");
        let (a, b) = (
            DeviceId::new("a").expect("id"),
            DeviceId::new("b").expect("id"),
        );
        let message = receipt;
        let count = |st: &mut DeviceState| st.stored += 1;
        let batch = [
            message(&a, 1),
            message(&a, 2),
            message(&a, 2),
            message(&b, 7),
        ];
        let out = s
            .store_messages(&batch, 5, &mut |_, st, _, _| count(st))
            .expect("stored");
        assert_eq!(
            out,
            [
                (true, None),
                (true, Some(1)),
                (false, Some(2)),
                (true, None)
            ]
        );
        let state = |d: &DeviceId| s.state(d).expect("state").expect("some");
        assert_eq!((state(&a).stored, state(&b).stored), (3, 1));

        s.state.insert("b", b"not cbor".to_vec()).expect("spoil b");
        let spoiled = [message(&a, 3), message(&b, 8)];
        s.store_messages(&spoiled, 6, &mut |_, st, _, _| count(st))
            .expect_err("b's state does not decode");
        assert_eq!(
            s.messages(&a, 0, 10).expect("messages").len(),
            2,
            "a's 3 kept"
        );
        assert_eq!(state(&a).stored, 3);
        assert_eq!(be(s.high.get("a").expect("high")), Some(2));
    }

    /// A log written by a release that kept no stored times or kinds gets them at the
    /// first retention pass, counted as stored then: retention by age starts from the
    /// upgrade, not from nothing (which would remove everything at once).
    #[test]
    fn messages_of_an_older_release_count_as_stored_at_the_upgrade() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fleet.db");
        let device = DeviceId::new("d1").expect("id");
        let message = |seq| receipt(&device, seq);
        {
            let s = SledStore::open(&path).expect("open");
            s.insert(&message(1), 1).expect("insert");
            s.insert(&message(2), 2).expect("insert");
            // What an older release left: the log without its meta records.
            s.message_meta.clear().expect("clear");
            s.db.flush().expect("flush");
        }
        // The first retention pass after the upgrade, at time `upgrade`.
        let upgrade = 1_800_000_000_000;
        let s = SledStore::open(&path).expect("reopen");
        // Of unknown kind ("receipt" is none of the five): kept as long as the longest
        // rule, and only when every kind has one.
        let rules = AgeRules {
            max_age_ms: crate::store::KINDS
                .iter()
                .map(|k| (k.to_string(), 1_000))
                .collect(),
            downsample_windows_after_ms: None,
        };
        assert_eq!(s.expire_messages(&rules, upgrade).expect("expire"), 0);
        let stored: Vec<u64> = s
            .message_meta
            .range(..SledStore::BACKFILLED)
            .values()
            .map(|v| {
                let v = v.expect("meta");
                u64::from_be_bytes(v[..8].try_into().expect("8 bytes"))
            })
            .collect();
        assert_eq!(stored, [upgrade, upgrade], "each message got its meta");
        assert_eq!(
            s.expire_messages(&rules, upgrade + 60_000).expect("expire"),
            2
        );
        assert_eq!(s.messages(&device, 0, 10).expect("read"), Vec::new());
    }
}
