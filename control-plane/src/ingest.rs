//! Telemetry ingest: authenticate each MQTT message with [`telemetry::open`],
//! de-duplicate by `(device, seq)`, notice gaps, store it, and keep each device's
//! derived state (presence, last status, latest window per model) for the views.
//!
//! Storage sits behind [`FleetStore`] so a later release can back it with a database
//! server; [`SledStore`] keeps it in the control plane's data directory.
//!
//! Presence: a device's last will (a status with `online: false`, published by the
//! broker when the device's connection dies) marks it offline and is not logged; any
//! other authenticated message marks it online again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetml_protocol::telemetry::{
    self, Body, Channel, DeviceId, Envelope, MessageError, Status, WindowReport,
};
use serde::{Deserialize, Serialize};

/// What happened to one received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored. `gap` names sequence numbers skipped since the highest one seen before
    /// (they may still arrive: the device re-publishes until acknowledged).
    Stored { gap: Option<(u64, u64)> },
    /// Already stored: the device re-published it.
    Duplicate,
    /// A last will: the device went offline. Not logged.
    Offline,
    /// A control-plane → device message seen on the shared subscription: not ours.
    Ignored,
    /// Refused and not stored.
    Refused(MessageError),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("fleet store: {0}")]
pub struct StoreError(pub String);

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError(e.to_string())
    }
}

impl From<serde_cbor::Error> for StoreError {
    fn from(e: serde_cbor::Error) -> Self {
        StoreError(format!("decoding a stored record: {e}"))
    }
}

/// A device in the registry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    #[serde(default)]
    pub board: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The device secret (HMAC key of its messages).
    #[serde(with = "serde_bytes")]
    pub secret: Vec<u8>,
    pub enrolled_ms: u64,
}

impl std::fmt::Debug for DeviceRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRecord")
            .field("id", &self.id)
            .field("board", &self.board)
            .field("tags", &self.tags)
            .field("enrolled_ms", &self.enrolled_ms)
            .finish_non_exhaustive()
    }
}

/// What the control plane knows of a device from its messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub online: bool,
    /// When the control plane last received an authenticated message from it.
    pub last_seen_ms: Option<u64>,
    /// When its last will arrived.
    pub offline_since_ms: Option<u64>,
    /// The newest status and its sequence number.
    pub status: Option<(u64, Status)>,
    /// The newest window report of each model, with its sequence number.
    pub windows: BTreeMap<String, (u64, WindowReport)>,
    /// Open alerts per model (from alert messages and window reports).
    pub alerts: BTreeMap<String, BTreeSet<String>>,
    pub stored: u64,
    pub duplicates: u64,
    pub gaps: u64,
    /// Highest sequence number stored.
    pub last_seq: u64,
    /// The newest lifecycle events (up to [`LIFECYCLE_KEPT`]), with when they arrived.
    #[serde(default)]
    pub lifecycle: Vec<(u64, telemetry::Event)>,
}

/// Lifecycle events kept per device in its state (all are in the message log).
pub const LIFECYCLE_KEPT: usize = 64;

/// Where authenticated messages and the device registry live.
pub trait FleetStore: Send + Sync {
    /// Adds a device; `false` when the id is taken (nothing changes then).
    fn enroll(&self, device: &DeviceRecord) -> Result<bool, StoreError>;
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;
    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;
    /// Stores `envelope` unless `(device, seq)` is already stored; returns whether it
    /// was new, and the highest sequence number stored for the device before it.
    fn insert(&self, envelope: &Envelope) -> Result<(bool, Option<u64>), StoreError>;
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
        change: &mut dyn FnMut(&mut DeviceState),
    ) -> Result<(), StoreError>;
    /// The next sequence number of control plane → device messages.
    fn next_command_seq(&self, device: &DeviceId) -> Result<u64, StoreError>;
    /// [`FleetStore::next_command_seq`] of each device, made durable together.
    fn next_command_seqs(&self, devices: &[DeviceId]) -> Result<Vec<u64>, StoreError> {
        devices.iter().map(|d| self.next_command_seq(d)).collect()
    }
    /// Makes everything stored so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// [`FleetStore`] in sled: trees `devices`, `messages` (keyed `device \0 seq`,
/// big-endian), `high` (highest seq per device), `state`, `commands`.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    devices: sled::Tree,
    messages: sled::Tree,
    high: sled::Tree,
    state: sled::Tree,
    commands: sled::Tree,
}

fn be(v: Option<sled::IVec>) -> Option<u64> {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
}

impl SledStore {
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        let db =
            sled::open(path).map_err(|e| StoreError(format!("opening {}: {e}", path.display())))?;
        Ok(SledStore {
            devices: db.open_tree("devices")?,
            messages: db.open_tree("messages")?,
            high: db.open_tree("high")?,
            state: db.open_tree("state")?,
            commands: db.open_tree("commands")?,
            db,
        })
    }

    /// The database, for other parts of the control plane (the registry).
    pub fn db(&self) -> &sled::Db {
        &self.db
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

    fn insert(&self, envelope: &Envelope) -> Result<(bool, Option<u64>), StoreError> {
        let bytes = serde_cbor::to_vec(envelope)?;
        let key = Self::key(&envelope.device, envelope.seq);
        let new = self
            .messages
            .compare_and_swap(key, None as Option<&[u8]>, Some(bytes))?
            .is_ok();
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
            .map(|kv| Ok(serde_cbor::from_slice(&kv?.1)?))
            .collect()
    }

    fn state(&self, device: &DeviceId) -> Result<Option<DeviceState>, StoreError> {
        match self.state.get(device.as_str())? {
            Some(v) => Ok(Some(serde_cbor::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn update_state(
        &self,
        device: &DeviceId,
        change: &mut dyn FnMut(&mut DeviceState),
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

/// Counters of the ingest, for metrics and `GET /v1/ingest`.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub refused: AtomicU64,
    pub gaps: AtomicU64,
    pub offline: AtomicU64,
    /// MQTT logins the embedded broker refused.
    pub logins_refused: std::sync::Arc<AtomicU64>,
    /// Whether the ingest holds a subscribed session with the broker now.
    pub connected: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Counters {
    pub fn to_json(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "received": g(&self.received),
            "stored": g(&self.stored),
            "duplicates": g(&self.duplicates),
            "refused": g(&self.refused),
            "gaps": g(&self.gaps),
            "offline": g(&self.offline),
            "logins_refused": g(&self.logins_refused),
            "broker_connected": self.connected.load(Ordering::Relaxed),
        })
    }
}

/// Why a message was refused, as a metric label.
fn reason(e: &MessageError) -> &'static str {
    match e {
        MessageError::TooLarge(_) => "too_large",
        MessageError::Malformed(_) => "malformed",
        MessageError::UnsupportedFormat(_) => "unsupported_format",
        MessageError::BadTopic(_) => "bad_topic",
        MessageError::BadDeviceId(_) => "bad_device_id",
        MessageError::DeviceMismatch { .. } => "device_mismatch",
        MessageError::WrongChannel { .. } => "wrong_channel",
        MessageError::UnknownDevice(_) => "unknown_device",
        MessageError::BadAuthenticator => "bad_authenticator",
    }
}

/// Authenticates, de-duplicates and stores messages.
#[derive(Debug)]
pub struct Ingest<S> {
    pub store: S,
    pub counters: Counters,
    /// Sequence numbers stored (or found stored) per device since the last
    /// [`Ingest::take_receipts`].
    receipts: std::sync::Mutex<std::collections::HashMap<DeviceId, Vec<u64>>>,
}

impl<S: FleetStore> Ingest<S> {
    pub fn new(store: S) -> Self {
        Ingest {
            store,
            counters: Counters::default(),
            receipts: Default::default(),
        }
    }

    /// What each device should be told is stored, since the last call: the caller
    /// flushes the store before telling it.
    pub fn take_receipts(&self) -> Vec<(DeviceId, Vec<u64>)> {
        std::mem::take(&mut *self.receipts.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect()
    }

    /// Handles one message received on `topic` at `now_ms`. Nothing of a refused
    /// message is stored.
    pub fn handle(&self, topic: &str, bytes: &[u8], now_ms: u64) -> Result<Outcome, StoreError> {
        if let Ok((_, Channel::Cmd)) = telemetry::parse_topic(topic) {
            return Ok(Outcome::Ignored);
        }
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let mut lookup_error = None;
        let opened = telemetry::open(topic, bytes, |d| match self.store.device(d) {
            Ok(r) => r.map(|r| r.secret),
            Err(e) => {
                lookup_error = Some(e);
                None
            }
        });
        if let Some(e) = lookup_error {
            return Err(e);
        }
        let envelope = match opened {
            Ok(e) => e,
            Err(e) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("fleetml_ingest_refused_total", "reason" => reason(&e))
                    .increment(1);
                return Ok(Outcome::Refused(e));
            }
        };
        let device = envelope.device.clone();
        if let Body::Status(s) = &envelope.body
            && !s.online
        {
            self.counters.offline.fetch_add(1, Ordering::Relaxed);
            self.store.update_state(&device, &mut |st| {
                st.online = false;
                st.offline_since_ms = Some(now_ms);
            })?;
            return Ok(Outcome::Offline);
        }
        let (new, before) = self.store.insert(&envelope)?;
        let expected = before.map_or(0, |b| b + 1);
        let gap = (new && envelope.seq > expected).then(|| (expected, envelope.seq - 1));
        self.store.update_state(&device, &mut |st| {
            st.online = true;
            st.offline_since_ms = None;
            st.last_seen_ms = Some(now_ms);
            if !new {
                st.duplicates += 1;
                return;
            }
            st.stored += 1;
            st.last_seq = st.last_seq.max(envelope.seq);
            if gap.is_some() {
                st.gaps += 1;
            }
            match &envelope.body {
                Body::Status(s) if st.status.as_ref().is_none_or(|(q, _)| *q < envelope.seq) => {
                    st.status = Some((envelope.seq, s.clone()));
                }
                Body::Window(w)
                    if st
                        .windows
                        .get(&w.model)
                        .is_none_or(|(q, _)| *q < envelope.seq) =>
                {
                    st.alerts
                        .insert(w.model.clone(), w.alerts.iter().cloned().collect());
                    st.windows
                        .insert(w.model.clone(), (envelope.seq, (**w).clone()));
                }
                Body::Event(e) => {
                    st.lifecycle.push((now_ms, e.clone()));
                    if st.lifecycle.len() > LIFECYCLE_KEPT {
                        st.lifecycle.remove(0);
                    }
                }
                Body::Alert(a) => {
                    let open = st.alerts.entry(a.model.clone()).or_default();
                    if a.event.transition == "raised" {
                        open.insert(a.event.subject.clone());
                    } else {
                        open.remove(&a.event.subject);
                    }
                }
                _ => {}
            }
        })?;
        // A duplicate too: the device sent it again because it has no receipt for it.
        self.receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(device)
            .or_default()
            .push(envelope.seq);
        if !new {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("fleetml_ingest_duplicates_total").increment(1);
            return Ok(Outcome::Duplicate);
        }
        self.counters.stored.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("fleetml_ingest_stored_total").increment(1);
        if gap.is_some() {
            self.counters.gaps.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Outcome::Stored { gap })
    }
}
