//! The durable outbox telemetry is published from.
//!
//! Every message is written to sled and flushed before anyone may publish it, and is
//! deleted only when it is known to be delivered: the rule of
//! [`fleetml_device::delivery`] (the broker's PUBACK until the control plane sends
//! receipts, then a receipt naming it; what receipts skip or none names in time is
//! published again), which `fleetctl sim` follows too. The embedded broker drops
//! what a lagging subscriber has not read once its in-memory log is full, and loses its
//! log when it restarts (found with `fleetctl sim --devices 10000`): hence receipts.
//! After a reconnect or a restart, everything still here is published again in
//! sequence order: the outbox, not the MQTT session, is the source of truth.
//!
//! Sequence numbers are allocated here, in the same sled transaction that stores the
//! message, so they are strictly increasing, gap-free and survive restarts. A new outbox
//! starts at the base its creator gives ([`Outbox::open_from`]; the agent's is
//! [`fleetml_protocol::telemetry::sequence_base`] of the clock), so a device whose data
//! directory is wiped continues above the numbers it used before rather than repeating
//! them.
//!
//! Bounded by count and bytes: when a new message does not fit, the oldest monitoring
//! windows not in flight (delivered ones awaiting a receipt included) are dropped first
//! and counted ([`Outbox::dropped`]); other messages
//! (lifecycle events, alerts, acknowledgements, status) are never dropped — they may
//! exceed the bound rather than be lost.

use std::path::Path;

use fleetml_device::delivery::{Acked, Delivery};
use fleetml_protocol::telemetry::Receipt;
use sled::Transactional;

/// What a message is, for the overflow policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A monitoring window report: dropped first when the outbox is full.
    Window,
    /// Anything else: never dropped.
    Keep,
}

/// Limits of the outbox.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_messages: u64,
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_messages: 100_000,
            max_bytes: 256 << 20,
        }
    }
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub class: Class,
    /// When it was queued, milliseconds since the Unix epoch.
    pub queued_ms: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox storage: {0}")]
    Storage(String),
    #[error("outbox entry {0} is corrupt")]
    Corrupt(u64),
}

impl From<sled::Error> for OutboxError {
    fn from(e: sled::Error) -> Self {
        OutboxError::Storage(e.to_string())
    }
}

impl From<sled::transaction::TransactionError<OutboxError>> for OutboxError {
    fn from(e: sled::transaction::TransactionError<OutboxError>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => e.into(),
        }
    }
}

const NEXT_SEQ: &[u8] = b"next_seq";
const DROPPED: &[u8] = b"dropped";
const BYTES: &[u8] = b"bytes";
const LAST_COMMAND: &[u8] = b"last_command";
/// Set once the control plane has sent a receipt: from then on only receipts delete.
const RECEIPTS: &[u8] = b"receipts";

/// A durable, bounded, ordered outbox.
#[derive(Debug)]
pub struct Outbox {
    db: sled::Db,
    queue: sled::Tree,
    meta: sled::Tree,
    limits: Limits,
    /// The delivery rule (shared with `fleetctl sim`): what is in flight, what awaits
    /// a receipt and since when, what a receipt overtook. Whether the control plane
    /// sends receipts is persisted under [`RECEIPTS`].
    delivery: std::sync::Mutex<Delivery>,
    /// The instant the rule's milliseconds count from: the first its caller passed in.
    origin: std::sync::Mutex<Option<std::time::Instant>>,
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<u64, OutboxError> {
    Ok(tree
        .get(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

fn tx_u64(
    tree: &sled::transaction::TransactionalTree,
    key: &[u8],
) -> Result<u64, sled::transaction::UnabortableTransactionError> {
    Ok(tree
        .get(key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

/// The sequence number a queue key holds (8 bytes, big-endian).
fn key_seq(key: &[u8]) -> Result<u64, OutboxError> {
    key.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| OutboxError::Corrupt(u64::MAX))
}

/// Entry layout: class (1 byte), queued at (u64 ms, big-endian), topic length (u16),
/// topic, payload.
fn encode(class: Class, queued_ms: u64, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(11 + topic.len() + payload.len());
    v.push(match class {
        Class::Window => 1,
        Class::Keep => 0,
    });
    v.extend_from_slice(&queued_ms.to_be_bytes());
    v.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    v.extend_from_slice(topic.as_bytes());
    v.extend_from_slice(payload);
    v
}

fn decode(seq: u64, v: &[u8]) -> Result<Stored, OutboxError> {
    let corrupt = || OutboxError::Corrupt(seq);
    let (&class, rest) = v.split_first().ok_or_else(corrupt)?;
    let queued_ms = u64::from_be_bytes(
        rest.get(..8)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?,
    );
    let rest = &rest[8..];
    let len = u16::from_be_bytes(
        rest.get(..2)
            .ok_or_else(corrupt)?
            .try_into()
            .map_err(|_| corrupt())?,
    ) as usize;
    let topic = rest.get(2..2 + len).ok_or_else(corrupt)?;
    Ok(Stored {
        seq,
        class: if class == 1 {
            Class::Window
        } else {
            Class::Keep
        },
        queued_ms,
        topic: String::from_utf8(topic.to_vec()).map_err(|_| corrupt())?,
        payload: rest[2 + len..].to_vec(),
    })
}

impl Outbox {
    /// Opens (or creates, numbering from 0) the outbox at `path`.
    pub fn open(path: &Path, limits: Limits) -> Result<Outbox, OutboxError> {
        Self::open_from(path, limits, 0)
    }

    /// Opens the outbox at `path`; one created now numbers its messages from
    /// `first_seq` (an existing one goes on where it was).
    pub fn open_from(path: &Path, limits: Limits, first_seq: u64) -> Result<Outbox, OutboxError> {
        let db = crate::store::open_sled(path)?;
        let queue = db.open_tree("queue")?;
        let meta = db.open_tree("meta")?;
        if meta.get(NEXT_SEQ)?.is_none() && queue.is_empty() {
            meta.insert(NEXT_SEQ, &first_seq.to_be_bytes())?;
            meta.flush()?;
        }
        let receipts = meta.contains_key(RECEIPTS)?;
        Ok(Outbox {
            db,
            queue,
            meta,
            limits,
            delivery: std::sync::Mutex::new(Delivery::new(receipts)),
            origin: Default::default(),
        })
    }

    fn delivery(&self) -> std::sync::MutexGuard<'_, Delivery> {
        self.delivery.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `at` as the delivery rule's milliseconds.
    fn ms(&self, at: std::time::Instant) -> u64 {
        let mut origin = self.origin.lock().unwrap_or_else(|p| p.into_inner());
        let origin = *origin.get_or_insert(at);
        at.saturating_duration_since(origin).as_millis() as u64
    }

    /// Stores a message built by `build(seq)` (which seals it with its sequence number)
    /// for `topic`, queued at `queued_ms` (wall clock), makes room by dropping the oldest
    /// windows if needed, and flushes to disk before returning its sequence number.
    pub fn push(
        &self,
        class: Class,
        topic: &str,
        queued_ms: u64,
        build: impl Fn(u64) -> Vec<u8>,
    ) -> Result<u64, OutboxError> {
        let seq = (&self.queue, &self.meta).transaction(|(q, m)| {
            let seq = tx_u64(m, NEXT_SEQ)?;
            let value = encode(class, queued_ms, topic, &build(seq));
            let bytes = tx_u64(m, BYTES)?;
            m.insert(NEXT_SEQ, &(seq + 1).to_be_bytes())?;
            m.insert(BYTES, &(bytes + value.len() as u64).to_be_bytes())?;
            q.insert(&seq.to_be_bytes(), value)?;
            Ok(seq)
        })?;
        self.make_room(seq)?;
        self.db.flush()?;
        Ok(seq)
    }

    /// Drops the oldest windows (never `keep`, never one in flight) until the limits
    /// hold again.
    fn make_room(&self, keep: u64) -> Result<(), OutboxError> {
        while self.depth() > self.limits.max_messages || self.bytes()? > self.limits.max_bytes {
            let inflight = self.delivery().inflight().clone();
            let victim = self.queue.iter().find_map(|kv| {
                let (k, v) = kv.ok()?;
                let seq = u64::from_be_bytes(k.as_ref().try_into().ok()?);
                (seq != keep && v.first() == Some(&1) && !inflight.contains(&seq))
                    .then_some((seq, v.len() as u64))
            });
            let Some((seq, len)) = victim else {
                break;
            };
            self.remove(seq, len, true)?;
        }
        Ok(())
    }

    fn remove(&self, seq: u64, len: u64, dropped: bool) -> Result<(), OutboxError> {
        (&self.queue, &self.meta).transaction(|(q, m)| {
            if q.remove(&seq.to_be_bytes())?.is_none() {
                return Ok(());
            }
            let bytes = tx_u64(m, BYTES)?;
            m.insert(BYTES, &bytes.saturating_sub(len).to_be_bytes())?;
            if dropped {
                let n = tx_u64(m, DROPPED)?;
                m.insert(DROPPED, &(n + 1).to_be_bytes())?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// `seq` was handed to the broker: it is not dropped for room until acknowledged or
    /// [`Outbox::clear_inflight`].
    pub fn mark_inflight(&self, seq: u64) {
        self.delivery().sent(seq);
    }

    /// The connection is gone: nothing is in flight any more (and everything still here
    /// is published again on the next connection, delivered or not).
    pub fn clear_inflight(&self) {
        self.delivery().reconnected();
    }

    /// The broker acknowledged `seq` at `at`: forget it, or, when the control plane
    /// sends receipts, keep it until one names it.
    pub fn ack(&self, seq: u64, at: std::time::Instant) -> Result<(), OutboxError> {
        let held = self.queue.get(seq.to_be_bytes())?;
        let at = self.ms(at);
        let acked = self.delivery().acked(seq, held.is_some(), at);
        if let (Acked::Forget, Some(v)) = (acked, held) {
            self.remove(seq, v.len() as u64, false)?;
            self.db.flush()?;
        }
        Ok(())
    }

    /// Whether messages wait for the control plane's receipt after their PUBACK.
    pub fn receipts_enabled(&self) -> bool {
        self.delivery().receipts_enabled()
    }

    /// The control plane stored what `receipt` names: delete those messages (and, the
    /// first time, switch to waiting for receipts). Returns how many were deleted.
    pub fn receipt(&self, receipt: &Receipt) -> Result<usize, OutboxError> {
        let receipted = self.delivery().receipt(receipt);
        if receipted.first {
            self.meta.insert(RECEIPTS, &[1u8][..])?;
        }
        let mut removed = 0;
        for (first, last) in receipted.delete {
            // Only what is here: a receipt's range can be as wide as it likes.
            let here: Vec<(u64, u64)> = self
                .queue
                .range(first.to_be_bytes()..=last.to_be_bytes())
                .map(|kv| {
                    let (k, v) = kv?;
                    Ok((key_seq(&k)?, v.len() as u64))
                })
                .collect::<Result<_, OutboxError>>()?;
            for (seq, len) in here {
                self.remove(seq, len, false)?;
                removed += 1;
            }
        }
        self.db.flush()?;
        Ok(removed)
    }

    /// Messages to publish again, oldest first: those the broker acknowledged and two
    /// receipts skipped, or one receipt [`fleetml_device::delivery::OVERTAKEN_GRACE_MS`]
    /// ago (lost on the way), and those acknowledged at least `after` ago
    /// that no receipt has named yet (a last resort: a slow ingest is not a lost
    /// message), as of `now`. Each is handed out once per acknowledgement.
    pub fn overdue(&self, after: std::time::Duration, now: std::time::Instant) -> Vec<u64> {
        let now = self.ms(now);
        self.delivery().overdue(after.as_millis() as u64, now)
    }

    /// The message with sequence number `seq`, if it is still here.
    pub fn get(&self, seq: u64) -> Result<Option<Stored>, OutboxError> {
        self.queue
            .get(seq.to_be_bytes())?
            .map(|v| decode(seq, &v))
            .transpose()
    }

    /// Up to `limit` unacknowledged messages, oldest first.
    pub fn pending(&self, limit: usize) -> Result<Vec<Stored>, OutboxError> {
        self.pending_from(0, limit)
    }

    /// Up to `limit` unacknowledged messages with sequence numbers from `from` on.
    pub fn pending_from(&self, from: u64, limit: usize) -> Result<Vec<Stored>, OutboxError> {
        self.queue
            .range(from.to_be_bytes()..)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                decode(key_seq(&k)?, &v)
            })
            .collect()
    }

    /// Messages waiting.
    pub fn depth(&self) -> u64 {
        self.queue.len() as u64
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> Result<u64, OutboxError> {
        read_u64(&self.meta, BYTES)
    }

    /// Windows dropped for room, ever.
    pub fn dropped(&self) -> Result<u64, OutboxError> {
        read_u64(&self.meta, DROPPED)
    }

    /// How long the oldest waiting message has waited at `now_ms`, in milliseconds (0
    /// when empty).
    pub fn oldest_age_ms(&self, now_ms: u64) -> Result<u64, OutboxError> {
        match self.queue.first()? {
            Some((k, v)) => {
                // Only the entry's time stamp (bytes 1..9), not a copy of its payload: this
                // runs after every acknowledgement.
                let queued = v
                    .get(1..9)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| {
                        OutboxError::Corrupt(u64::from_be_bytes(
                            k.as_ref().try_into().unwrap_or([0xff; 8]),
                        ))
                    })?;
                Ok(now_ms.saturating_sub(queued))
            }
            None => Ok(0),
        }
    }

    /// Records that a command with sequence number `seq` arrived; `false` when it is not
    /// newer than the last one recorded (a replay or a broker redelivery).
    pub fn command_is_new(&self, seq: u64) -> Result<bool, OutboxError> {
        let previous = self.meta.fetch_and_update(LAST_COMMAND, |old| {
            let old = old
                .and_then(|v| <[u8; 8]>::try_from(v).ok())
                .map(u64::from_be_bytes);
            Some(old.map_or(seq, |o| o.max(seq)).to_be_bytes().to_vec())
        })?;
        let previous = previous
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes);
        self.db.flush()?;
        Ok(previous.is_none_or(|p| seq > p))
    }

    /// The sequence number the next message gets.
    pub fn next_seq(&self) -> Result<u64, OutboxError> {
        read_u64(&self.meta, NEXT_SEQ)
    }
}
