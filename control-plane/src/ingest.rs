//! Telemetry ingest (groundwork of the messaging issue): authenticate each MQTT message
//! with [`telemetry::open`], de-duplicate by `(device, seq)`, notice gaps, and store it.
//!
//! Storage sits behind [`FleetStore`] so a later release can back it with a database
//! server; [`SledStore`] keeps it in the control plane's data directory.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetml_protocol::telemetry::{self, DeviceId, Envelope, MessageError};

/// What happened to one received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored. `gap` names sequence numbers skipped since the highest one seen before
    /// (they may still arrive: the device re-publishes until acknowledged).
    Stored { gap: Option<(u64, u64)> },
    /// Already stored: the device re-published it.
    Duplicate,
    /// Refused and not stored.
    Refused(MessageError),
}

/// Where authenticated messages go.
pub trait FleetStore: Send + Sync {
    /// Stores `envelope` unless `(device, seq)` is already stored; returns whether it
    /// was new, and the highest sequence number stored for the device before it.
    fn insert(&self, envelope: &Envelope) -> Result<(bool, Option<u64>), String>;
    /// Messages of `device` in sequence order.
    fn messages(&self, device: &DeviceId) -> Result<Vec<Envelope>, String>;
}

/// [`FleetStore`] in sled: tree `messages` keyed `device \0 seq` (big-endian), tree
/// `high` with the highest seq per device.
#[derive(Debug, Clone)]
pub struct SledStore {
    messages: sled::Tree,
    high: sled::Tree,
}

impl SledStore {
    pub fn open(path: &Path) -> Result<SledStore, String> {
        let db = sled::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        Ok(SledStore {
            messages: db.open_tree("messages").map_err(|e| e.to_string())?,
            high: db.open_tree("high").map_err(|e| e.to_string())?,
        })
    }

    fn key(device: &DeviceId, seq: u64) -> Vec<u8> {
        let mut k = device.as_str().as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }
}

impl FleetStore for SledStore {
    fn insert(&self, envelope: &Envelope) -> Result<(bool, Option<u64>), String> {
        let bytes = serde_cbor::to_vec(envelope).map_err(|e| e.to_string())?;
        let key = Self::key(&envelope.device, envelope.seq);
        let new = self
            .messages
            .compare_and_swap(key, None as Option<&[u8]>, Some(bytes))
            .map_err(|e| e.to_string())?
            .is_ok();
        let device = envelope.device.as_str().as_bytes();
        let before = self
            .high
            .fetch_and_update(device, |old| {
                let old = old
                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    .map(u64::from_be_bytes);
                Some(
                    old.map_or(envelope.seq, |o| o.max(envelope.seq))
                        .to_be_bytes()
                        .to_vec(),
                )
            })
            .map_err(|e| e.to_string())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes);
        Ok((new, before))
    }

    fn messages(&self, device: &DeviceId) -> Result<Vec<Envelope>, String> {
        let mut prefix = device.as_str().as_bytes().to_vec();
        prefix.push(0);
        self.messages
            .scan_prefix(prefix)
            .map(|kv| {
                let (_, v) = kv.map_err(|e| e.to_string())?;
                serde_cbor::from_slice(&v).map_err(|e| e.to_string())
            })
            .collect()
    }
}

/// Counters of the ingest, for metrics and `fleetctl` views.
#[derive(Debug, Default)]
pub struct Counters {
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub refused: AtomicU64,
    pub gaps: AtomicU64,
}

/// Authenticates, de-duplicates and stores messages.
pub struct Ingest<S, F> {
    pub store: S,
    secret_of: F,
    pub counters: Counters,
}

impl<S: std::fmt::Debug, F> std::fmt::Debug for Ingest<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret lookup is left out on purpose: secrets never reach logs.
        f.debug_struct("Ingest")
            .field("store", &self.store)
            .field("counters", &self.counters)
            .finish()
    }
}

impl<S: FleetStore, F: Fn(&DeviceId) -> Option<Vec<u8>>> Ingest<S, F> {
    pub fn new(store: S, secret_of: F) -> Self {
        Ingest {
            store,
            secret_of,
            counters: Counters::default(),
        }
    }

    /// Handles one message received on `topic`.
    pub fn handle(&self, topic: &str, bytes: &[u8]) -> Result<Outcome, String> {
        let envelope = match telemetry::open(topic, bytes, |d| (self.secret_of)(d)) {
            Ok(e) => e,
            Err(e) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                return Ok(Outcome::Refused(e));
            }
        };
        let (new, before) = self.store.insert(&envelope)?;
        if !new {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(Outcome::Duplicate);
        }
        self.counters.stored.fetch_add(1, Ordering::Relaxed);
        let expected = before.map_or(0, |b| b + 1);
        let gap = (envelope.seq > expected).then(|| (expected, envelope.seq - 1));
        if gap.is_some() {
            self.counters.gaps.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Outcome::Stored { gap })
    }
}
