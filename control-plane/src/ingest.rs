//! Telemetry ingest: authenticate each MQTT message with [`telemetry::open`],
//! de-duplicate by `(device, seq)`, notice gaps, store it, and keep each device's
//! derived state (presence, last status, latest window per model) for the views.
//!
//! Storage sits behind [`FleetStore`] (`crate::store`): sled in the control plane's
//! data directory, or memory.
//!
//! Presence: a device's last will (a status with `online: false`, published by the
//! broker when the device's connection dies) marks it offline and is not logged, unless
//! it is older than the will the device's newest status names (`will_seq`: each
//! connection carries a will of its own); any other authenticated message marks it
//! online again.

use std::sync::atomic::{AtomicU64, Ordering};

use fleetml_protocol::telemetry::{self, Body, Channel, DeviceId, MessageError};

use crate::records::DeviceState;
use crate::records::LIFECYCLE_KEPT;
use crate::store::{FleetStore, StoreError};
use fleetml_protocol::telemetry::{Envelope, Received};

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
    /// A last will of a connection older than the one the device's newest status names
    /// (the broker published it late, or someone replayed it): ignored, counted.
    StaleWill,
    /// A control-plane → device message seen on the shared subscription: not ours.
    Ignored,
    /// Refused and not stored.
    Refused(MessageError),
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
    /// Last wills older than the device's current one, ignored.
    pub stale_wills: AtomicU64,
    /// Devices' sequence numbers that jumped to a new base (a wiped data directory).
    pub restarts: AtomicU64,
    /// MQTT logins the embedded broker refused.
    pub logins_refused: std::sync::Arc<AtomicU64>,
    /// Whether the ingest holds a subscribed session with the broker now.
    pub connected: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Messages taken, at this start, from the persistent session an older release left
    /// under the bare client id (`server::drain_old_session`).
    pub old_session_drained: AtomicU64,
    /// Whether that session was ended at this start.
    pub old_session_ended: std::sync::atomic::AtomicBool,
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
            "stale_wills": g(&self.stale_wills),
            "sequence_restarts": g(&self.restarts),
            "logins_refused": g(&self.logins_refused),
            "broker_connected": self.connected.load(Ordering::Relaxed),
            "old_session_drained": g(&self.old_session_drained),
            "old_session_ended": self.old_session_ended.load(Ordering::Relaxed),
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

    /// Handles a batch the broker delivered, `(topic, bytes)` in order, then makes what
    /// was stored durable with one flush: the caller acknowledges the batch to the broker
    /// once this returns `Ok` (on `Err`, nothing of it: the broker delivers it again and
    /// what was stored already is a duplicate then).
    pub fn store_batch<'a>(
        &self,
        batch: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let batch: Vec<(&str, &[u8])> = batch.into_iter().collect();
        let outcomes = self.handle_batch(&batch, now_ms)?;
        for ((topic, _), outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Outcome::Refused(e) => tracing::warn!(
                    topic = %topic.chars().take(120).collect::<String>(),
                    error = %e,
                    "refused a message"
                ),
                Outcome::Stored { gap: Some((a, b)) } => {
                    tracing::info!(topic, from = a, to = b, "sequence gap (may still arrive)")
                }
                _ => {}
            }
        }
        self.store.flush()
    }

    /// Handles one message received on `topic` at `now_ms`. Nothing of a refused
    /// message is stored.
    pub fn handle(&self, topic: &str, bytes: &[u8], now_ms: u64) -> Result<Outcome, StoreError> {
        let mut outcomes = self.handle_batch(&[(topic, bytes)], now_ms)?;
        Ok(outcomes.pop().unwrap_or(Outcome::Ignored))
    }

    /// Handles messages received at `now_ms`, in order, with what the store can do for
    /// many at once: one lookup of the batch's devices, and the messages between two
    /// last wills stored together ([`FleetStore::store_messages`]: one transaction on
    /// PostgreSQL). The outcome of each, in order.
    pub fn handle_batch(
        &self,
        batch: &[(&str, &[u8])],
        now_ms: u64,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut ids: Vec<DeviceId> = batch
            .iter()
            .filter_map(|(topic, _)| telemetry::parse_topic(topic).ok().map(|(d, _)| d))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let secrets: std::collections::HashMap<DeviceId, Vec<u8>> = self
            .store
            .devices_named(&ids)?
            .into_iter()
            // A revoked device's messages are refused like an unknown device's.
            .filter_map(|r| r.live_secret().map(<[u8]>::to_vec).map(|s| (r.id, s)))
            .collect();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        // Opened messages waiting to be stored together: (index in the batch, message).
        let mut pending: Vec<(usize, Received)> = Vec::new();
        for (i, (topic, bytes)) in batch.iter().enumerate() {
            if let Ok((_, Channel::Cmd)) = telemetry::parse_topic(topic) {
                outcomes[i] = Some(Outcome::Ignored);
                continue;
            }
            self.counters.received.fetch_add(1, Ordering::Relaxed);
            let envelope = match telemetry::open_received(topic, bytes, |d| secrets.get(d).cloned())
            {
                Ok(e) => e,
                Err(e) => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("fleetml_control_ingest_refused_total", "reason" => reason(&e))
                        .increment(1);
                    outcomes[i] = Some(Outcome::Refused(e));
                    continue;
                }
            };
            if let Body::Status(s) = &envelope.body
                && !s.online
            {
                // A will is judged against what came before it: store those first.
                self.store_pending(&mut pending, &mut outcomes, now_ms)?;
                outcomes[i] = Some(self.will(&envelope, now_ms)?);
                continue;
            }
            pending.push((i, envelope));
        }
        self.store_pending(&mut pending, &mut outcomes, now_ms)?;
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::Ignored))
            .collect())
    }

    /// A last will: the device goes offline, unless the will is older than the one its
    /// newest status names.
    fn will(&self, envelope: &Envelope, now_ms: u64) -> Result<Outcome, StoreError> {
        let mut stale = false;
        self.store.update_state(&envelope.device, &mut |st| {
            stale = envelope.seq < st.will_seq;
            if !stale {
                st.online = false;
                st.offline_since_ms = Some(now_ms);
            }
        })?;
        if stale {
            self.counters.stale_wills.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("fleetml_control_ingest_stale_wills_total").increment(1);
            return Ok(Outcome::StaleWill);
        }
        self.counters.offline.fetch_add(1, Ordering::Relaxed);
        Ok(Outcome::Offline)
    }

    /// Stores `pending` (the messages and the device state each changes, together) and
    /// writes each one's outcome; empties `pending`.
    fn store_pending(
        &self,
        pending: &mut Vec<(usize, Received)>,
        outcomes: &mut [Option<Outcome>],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if pending.is_empty() {
            return Ok(());
        }
        let (at, envelopes): (Vec<usize>, Vec<Received>) =
            std::mem::take(pending).into_iter().unzip();
        // Per envelope: (restarted from, gap).
        let mut seen: Vec<Seen> = vec![(None, None); envelopes.len()];
        let stored = self
            .store
            .store_messages(&envelopes, now_ms, &mut |i, st, new, before| {
                let envelope = &envelopes[i];
                // A jump to a new base is a new outbox (its data directory was wiped), not
                // lost messages; the first message of a device starts wherever its outbox
                // does.
                let restarted = before
                    .filter(|b| new && envelope.seq > b.saturating_add(telemetry::RESTART_JUMP));
                let expected = before.map_or(envelope.seq, |b| b + 1);
                let gap = (new && restarted.is_none() && envelope.seq > expected)
                    .then(|| (expected, envelope.seq - 1));
                seen[i] = (restarted, gap);
                apply(st, envelope, new, restarted, gap, now_ms);
            })?;
        let mut receipts = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        for (((i, envelope), (new, _)), (restarted, gap)) in
            at.into_iter().zip(envelopes).zip(stored).zip(seen)
        {
            if let Some(from) = restarted {
                self.counters.restarts.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("fleetml_control_ingest_sequence_restarts_total").increment(1);
                tracing::warn!(
                    device = %envelope.device,
                    from,
                    to = envelope.seq,
                    "the device's sequence numbers restarted at a new base (its data directory was wiped or replaced)"
                );
            }
            // A duplicate too: the device sent it again because it has no receipt for it.
            receipts
                .entry(envelope.device.clone())
                .or_default()
                .push(envelope.seq);
            outcomes[i] = Some(if new {
                self.counters.stored.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("fleetml_control_ingest_stored_total").increment(1);
                if gap.is_some() {
                    self.counters.gaps.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Stored { gap }
            } else {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("fleetml_control_ingest_duplicates_total").increment(1);
                Outcome::Duplicate
            });
        }
        Ok(())
    }
}

/// Of a stored message: the base its device's sequence numbers restarted from, and the
/// sequence numbers skipped before it.
type Seen = (Option<u64>, Option<(u64, u64)>);

/// What a message stored (`new`) or seen again changes in its device's state.
fn apply(
    st: &mut DeviceState,
    envelope: &Envelope,
    new: bool,
    restarted: Option<u64>,
    gap: Option<(u64, u64)>,
    now_ms: u64,
) {
    st.online = true;
    st.offline_since_ms = None;
    st.last_seen_ms = Some(now_ms);
    if let Some(from) = restarted {
        st.sequence_restarts += 1;
        st.lifecycle.push((
            now_ms,
            telemetry::Event {
                kind: telemetry::Lifecycle::SequenceRestarted,
                model: String::new(),
                version: 0,
                detail: format!(
                    "from {from} to {}: the device's data directory was wiped or replaced",
                    envelope.seq
                ),
            },
        ));
        if st.lifecycle.len() > LIFECYCLE_KEPT {
            st.lifecycle.remove(0);
        }
    }
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
            st.will_seq = st.will_seq.max(s.will_seq.unwrap_or(0));
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn status(online: bool, will_seq: Option<u64>) -> Body {
        Body::Status(telemetry::Status {
            agent_version: "t".into(),
            board: "b".into(),
            backends: vec![],
            models: vec![],
            uptime_s: 1,
            online,
            outbox_depth: 0,
            dropped_windows: 0,
            will_seq,
        })
    }

    /// Enrolls `id` with `secret` in `store`.
    fn enroll(store: &dyn FleetStore, id: &DeviceId, secret: &[u8]) {
        store
            .enroll(&crate::records::DeviceRecord {
                id: id.clone(),
                board: None,
                tags: Default::default(),
                secret: secret.to_vec(),
                enrolled_ms: 0,
                revoked_ms: None,
            })
            .expect("enrolled");
    }

    /// An ingest on a memory store with device `pi-1` enrolled, and its secret.
    fn one_device() -> OneDevice {
        let store = Arc::new(crate::store::memory::MemoryStore::new());
        let id = DeviceId::new("pi-1").expect("id");
        let secret = vec![7u8; telemetry::SECRET_LEN];
        enroll(&*store, &id, &secret);
        let ingest = Ingest::new(store.clone() as Arc<dyn FleetStore>);
        (store, ingest, id, secret)
    }

    type OneDevice = (
        Arc<crate::store::memory::MemoryStore>,
        Ingest<Arc<dyn FleetStore>>,
        DeviceId,
        Vec<u8>,
    );

    /// A will of a connection older than the one the newest status names does not mark
    /// the device offline (the broker published it late, or it was replayed); the
    /// current connection's will does.
    #[test]
    fn a_stale_last_will_is_ignored_and_the_current_one_counts() {
        let (store, ingest, id, secret) = one_device();
        let send = |seq: u64, body: Body| {
            let (topic, bytes) = telemetry::seal(&id, seq, 0, body, &secret);
            ingest.handle(&topic, &bytes, 1).expect("handled")
        };
        let online = || store.state(&id).expect("state").expect("some").online;
        // The first connection's will is seq 0; a reconnect carries seq 5.
        assert!(matches!(
            send(0, status(true, Some(0))),
            Outcome::Stored { .. }
        ));
        assert!(matches!(
            send(5, status(true, Some(5))),
            Outcome::Stored { .. }
        ));
        assert_eq!(send(0, status(false, Some(0))), Outcome::StaleWill);
        assert!(online(), "a stale will marked the device offline");
        assert_eq!(send(5, status(false, Some(5))), Outcome::Offline);
        assert!(!online());
        assert_eq!(ingest.counters.stale_wills.load(Ordering::Relaxed), 1);
        // An agent that names no will (older releases): every will counts, as before.
        assert!(matches!(
            send(6, status(true, None)),
            Outcome::Stored { .. }
        ));
        assert_eq!(send(5, status(false, None)), Outcome::Offline);
    }

    /// A batch with many messages of each device (the ingest takes up to thousands at a
    /// time, several per device under load) leaves the same states and outcomes as the
    /// same messages handled one at a time: duplicates within the batch, a gap, a last
    /// will between a device's messages and an unknown device included. On memory and
    /// on sled (whose batch reads and writes each device's state once).
    #[test]
    fn a_batch_with_many_messages_per_device_equals_them_one_at_a_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        // (name, the store the batch goes to, the store the messages go to one by one)
        type Pair = (&'static str, Arc<dyn FleetStore>, Arc<dyn FleetStore>);
        let stores: Vec<Pair> = vec![
            (
                "memory",
                Arc::new(crate::store::memory::MemoryStore::new()),
                Arc::new(crate::store::memory::MemoryStore::new()),
            ),
            (
                "sled",
                Arc::new(crate::store::sled::SledStore::open(&dir.path().join("a")).expect("a")),
                Arc::new(crate::store::sled::SledStore::open(&dir.path().join("b")).expect("b")),
            ),
        ];
        let devices: Vec<(DeviceId, Vec<u8>)> = (0..3u8)
            .map(|i| {
                let id = DeviceId::new(&format!("pi-{i}")).expect("id");
                (id, vec![i + 1; telemetry::SECRET_LEN])
            })
            .collect();
        let event = |kind| {
            Body::Event(telemetry::Event {
                kind,
                model: "m".into(),
                version: 1,
                detail: String::new(),
            })
        };
        let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
        for round in 0..6u64 {
            for (d, (id, secret)) in devices.iter().enumerate() {
                // Device 1 skips seq 2 (a gap); device 2's will comes after its seq 3.
                if d == 1 && round == 2 {
                    continue;
                }
                let body = match round % 3 {
                    0 => status(true, Some(0)),
                    1 => event(telemetry::Lifecycle::Downloading),
                    _ => event(telemetry::Lifecycle::Downloaded),
                };
                messages.push(telemetry::seal(id, 100 + round, 0, body, secret));
                if d == 2 && round == 3 {
                    messages.push(telemetry::seal(id, 90, 0, status(false, Some(0)), secret));
                }
            }
            // A device re-publishes what it has no receipt for.
            if round == 4 {
                let (id, secret) = &devices[0];
                messages.push(telemetry::seal(
                    id,
                    101,
                    0,
                    event(telemetry::Lifecycle::Downloading),
                    secret,
                ));
            }
        }
        let stranger = DeviceId::new("stranger").expect("id");
        messages.push(telemetry::seal(
            &stranger,
            1,
            0,
            status(true, None),
            &[9; telemetry::SECRET_LEN],
        ));

        for (name, batched, single) in stores {
            for store in [&batched, &single] {
                for (id, secret) in &devices {
                    enroll(&**store, id, secret);
                }
            }
            let batch: Vec<(&str, &[u8])> = messages
                .iter()
                .map(|(t, b)| (t.as_str(), b.as_slice()))
                .collect();
            let together = Ingest::new(batched.clone())
                .handle_batch(&batch, 7)
                .expect("batch");
            let one_by_one = Ingest::new(single.clone());
            let alone: Vec<Outcome> = batch
                .iter()
                .map(|(t, b)| one_by_one.handle(t, b, 7).expect("one"))
                .collect();
            assert_eq!(together, alone, "{name}: outcomes");
            assert!(together.contains(&Outcome::Duplicate), "{name}");
            assert!(together.contains(&Outcome::Offline), "{name}");
            assert!(
                together.contains(&Outcome::Stored {
                    gap: Some((102, 102))
                }),
                "{name}"
            );
            assert!(
                together.iter().any(|o| matches!(o, Outcome::Refused(_))),
                "{name}"
            );
            for (id, _) in &devices {
                let state = |s: &Arc<dyn FleetStore>| s.state(id).expect("state").expect("some");
                assert_eq!(state(&batched), state(&single), "{name}: {id}");
            }
            assert_eq!(
                batched
                    .state(&devices[1].0)
                    .expect("state")
                    .expect("some")
                    .gaps,
                1,
                "{name}"
            );
        }
    }

    /// A device whose data directory was wiped starts a new outbox at a higher base: its
    /// messages are stored, not taken for resends, no gap is counted, and the restart
    /// is an event of the device.
    #[test]
    fn a_restarted_sequence_is_stored_and_raised_not_counted_as_a_gap() {
        let (store, ingest, id, secret) = one_device();
        let send = |seq: u64| {
            let (topic, bytes) = telemetry::seal(&id, seq, 0, status(true, None), &secret);
            ingest.handle(&topic, &bytes, 1).expect("handled")
        };
        let first = telemetry::sequence_base(1_795_000_000_000);
        assert_eq!(
            send(first),
            Outcome::Stored { gap: None },
            "a device starts anywhere"
        );
        assert_eq!(send(first + 1), Outcome::Stored { gap: None });
        assert_eq!(
            send(first + 3),
            Outcome::Stored {
                gap: Some((first + 2, first + 2))
            }
        );
        let wiped = telemetry::sequence_base(1_795_000_600_000);
        assert_eq!(send(wiped), Outcome::Stored { gap: None });
        let st = store.state(&id).expect("state").expect("some");
        assert_eq!((st.sequence_restarts, st.gaps), (1, 1));
        assert!(
            st.lifecycle
                .iter()
                .any(|(_, e)| e.kind == telemetry::Lifecycle::SequenceRestarted)
        );
        assert_eq!(ingest.counters.restarts.load(Ordering::Relaxed), 1);
    }
}
