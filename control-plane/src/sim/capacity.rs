//! `fleetctl sim --ingest-only`: what the ingest's storing can take, without a broker,
//! a control-plane process or simulated connections sharing the machine with it.
//!
//! The full simulation measures the ingest end to end, and on a small machine the
//! devices, the broker and the control plane share the cores: the ingest keeps up with
//! whatever the simulator manages to send, and its own ceiling stays unknown. Here N
//! devices are enrolled straight into the store (sled in the work directory, or the
//! PostgreSQL database of `--database`), their window reports are sealed beforehand,
//! and then handed to [`Ingest::store_batch`] as the MQTT ingest does under a backlog:
//! each device on its lane (`ingest_mqtt::lane_of`), [`LANES`] lanes storing at once,
//! each lane's backlog arriving round by round (every device's first report, then every
//! device's second, …), at most its share of the broker's in-flight window waiting at a
//! time (`--in-flight`; by default
//! [`BROKER_IN_FLIGHT`](crate::ingest_mqtt::BROKER_IN_FLIGHT), what `fleetctl broker
//! acl` sets), and cut into batches by the ingest's own `next_batch`: at most [`BATCH`]
//! messages from at most [`BATCH_DEVICES`] devices (with more devices than that on a
//! lane, or a small window, about one message per device). The clock runs from the
//! first batch to the last flush; every device's first message (which makes its state)
//! is stored before it starts.
//!
//! An upper bound on what the MQTT ingest stores: the window is split evenly between
//! the lanes and refilled as soon as a batch is cut, where the broker frees a slot only
//! once the message is stored and acknowledged, in arrival order, across all lanes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetml_protocol::telemetry::{self, Body, DeviceId, Status};
use serde::Serialize;

use super::device::{Rng, window};
use crate::ingest::Ingest;
use crate::ingest_mqtt::{BATCH, BATCH_DEVICES, LANES, lane_of};
use crate::store::FleetStore;

/// What to store.
#[derive(Debug, Clone)]
pub struct CapacityOptions {
    pub devices: usize,
    /// Window reports per device, after its first status.
    pub messages: usize,
    /// The broker's in-flight window (messages sent to the ingest unacknowledged),
    /// shared by the lanes.
    pub in_flight: usize,
}

impl CapacityOptions {
    /// Refuses what cannot be measured, before anything is enrolled or stored.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=100_000).contains(&self.devices),
            "--devices {}: give 1 to 100000",
            self.devices
        );
        anyhow::ensure!(
            (1..=1_000_000).contains(&self.in_flight),
            "--in-flight {}: give 1 to 1000000 messages (mosquitto reads 0 as no limit; give \
             the window it really has)",
            self.in_flight
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.messages),
            "--messages {}: give 1 to 10000",
            self.messages
        );
        // Everything is sealed before the clock starts and held in memory, ~3 KB a message.
        anyhow::ensure!(
            self.devices.saturating_mul(self.messages) <= 1_000_000,
            "--devices {} × --messages {}: at most 1,000,000 messages (about 3 GB held in memory)",
            self.devices,
            self.messages
        );
        Ok(())
    }
}

/// What the store took.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    pub store: String,
    pub devices: usize,
    pub lanes: usize,
    pub batch: usize,
    pub batch_devices: usize,
    /// Messages waiting for a lane at most (its share of the broker's in-flight window,
    /// rounded up), and the most messages one batch held.
    pub lane_in_flight: usize,
    pub largest_batch: usize,
    /// Messages handed over while the clock ran, and how many of them were stored.
    pub messages: u64,
    pub stored: u64,
    pub refused: u64,
    pub duplicates: u64,
    pub seconds: f64,
    pub stored_per_s: f64,
    /// Bytes of the sealed messages, on average.
    pub message_bytes: u64,
}

type Sealed = (String, Vec<u8>);

/// Enrolls `opts.devices` devices into `store` (described as `store_name`), stores each
/// one's first status, then times the rest as the lanes would store a backlog.
pub fn ingest_capacity(
    store: Arc<dyn FleetStore>,
    store_name: &str,
    opts: &CapacityOptions,
) -> anyhow::Result<Capacity> {
    opts.check()?;
    let features = super::phases::claims_features()?;
    let mut rng = Rng(0x5eed);
    // Per lane, its devices' messages: the first (a status) apart, the rest in rounds.
    let mut firsts: Vec<Sealed> = Vec::with_capacity(opts.devices);
    let mut lanes: Vec<Vec<Vec<Sealed>>> = vec![Vec::new(); LANES];
    for i in 0..opts.devices {
        let id = DeviceId::new(&format!("cap-{i:05}")).map_err(anyhow::Error::msg)?;
        let mut secret = vec![0u8; telemetry::SECRET_LEN];
        secret[..8].copy_from_slice(&rng.next().to_le_bytes());
        let new = store
            .enroll(&crate::records::DeviceRecord {
                id: id.clone(),
                board: None,
                tags: Default::default(),
                secret: secret.clone(),
                enrolled_ms: crate::plane::now_ms(),
                revoked_ms: None,
            })
            .with_context(|| format!("enrolling {id}"))?;
        anyhow::ensure!(
            new,
            "the store already holds device {id} (from an earlier run): give an empty \
             database, or --dir a new folder"
        );
        let status = Body::Status(Status {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            board: "generic-x86_64".into(),
            backends: vec!["cpu".into()],
            models: Vec::new(),
            uptime_s: 0,
            online: true,
            outbox_depth: 0,
            dropped_windows: 0,
            will_seq: Some(1),
        });
        let first = telemetry::seal(&id, 1, crate::plane::now_ms(), status, &secret);
        let lane = lane_of(&first.0, LANES);
        firsts.push(first);
        let reports = (0..opts.messages as u64)
            .map(|n| {
                let body = window(None, &features, "claims", 1, n + 1, &mut rng);
                telemetry::seal(&id, n + 2, crate::plane::now_ms(), body, &secret)
            })
            .collect();
        lanes[lane].push(reports);
    }
    let ingest = Ingest::new(store);
    ingest
        .store_batch(
            firsts.iter().map(|(t, b)| (t.as_str(), &b[..])),
            crate::plane::now_ms(),
        )
        .context("storing the devices' first statuses")?;
    // Each lane's share of the window, rounded up (a window smaller than LANES gives
    // each lane one message).
    let lane_in_flight = opts.in_flight.div_ceil(LANES);
    let batches: Vec<Vec<Vec<Sealed>>> = lanes
        .into_iter()
        .map(|lane| backlog_batches(lane, lane_in_flight))
        .collect::<anyhow::Result<_>>()?;
    let messages: u64 = batches.iter().flatten().map(|b| b.len() as u64).sum();
    let largest_batch = batches.iter().flatten().map(Vec::len).max().unwrap_or(0);
    let bytes: u64 = batches
        .iter()
        .flatten()
        .flatten()
        .map(|(_, b)| b.len() as u64)
        .sum();
    let before = counts(&ingest);
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = batches
            .iter()
            .map(|lane| {
                let ingest = &ingest;
                scope.spawn(move || -> anyhow::Result<()> {
                    for batch in lane {
                        ingest.store_batch(
                            batch.iter().map(|(t, b)| (t.as_str(), &b[..])),
                            crate::plane::now_ms(),
                        )?;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a storing lane panicked"))??;
        }
        Ok(())
    })?;
    let seconds = started
        .elapsed()
        .max(Duration::from_micros(1))
        .as_secs_f64();
    let after = counts(&ingest);
    let stored = after.0 - before.0;
    Ok(Capacity {
        store: store_name.to_string(),
        devices: opts.devices,
        lanes: LANES,
        batch: BATCH,
        batch_devices: BATCH_DEVICES,
        lane_in_flight,
        largest_batch,
        messages,
        stored,
        refused: after.1 - before.1,
        duplicates: after.2 - before.2,
        seconds,
        stored_per_s: stored as f64 / seconds,
        message_bytes: bytes / messages.max(1),
    })
}

/// (stored, refused, duplicates) so far.
fn counts<S: FleetStore>(ingest: &Ingest<S>) -> (u64, u64, u64) {
    let c = &ingest.counters;
    (
        c.stored.load(Ordering::Relaxed),
        c.refused.load(Ordering::Relaxed),
        c.duplicates.load(Ordering::Relaxed),
    )
}

/// A lane's backlog as the MQTT ingest batches it: its devices' messages arriving round
/// by round, at most `in_flight` of them waiting at a time (the lane's share of the
/// broker's in-flight window: the broker sends more as batches are stored and
/// acknowledged), cut by `ingest_mqtt::next_batch` itself.
fn backlog_batches(
    devices: Vec<Vec<Sealed>>,
    in_flight: usize,
) -> anyhow::Result<Vec<Vec<Sealed>>> {
    use rumqttc::{Publish, QoS};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Publish)>();
    let rounds = devices.iter().map(Vec::len).max().unwrap_or(0);
    let mut queues: Vec<std::vec::IntoIter<Sealed>> =
        devices.into_iter().map(Vec::into_iter).collect();
    let mut order = Vec::new();
    for _ in 0..rounds {
        order.extend(queues.iter_mut().filter_map(Iterator::next));
    }
    let mut arrivals = order.into_iter().zip(0u64..);
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let mut held = std::collections::VecDeque::new();
    let mut batches = Vec::new();
    loop {
        while held.len() + rx.len() < in_flight.max(1) {
            let Some(((topic, bytes), n)) = arrivals.next() else {
                break;
            };
            tx.send((n, Publish::new(topic, QoS::AtLeastOnce, bytes)))
                .map_err(|_| anyhow::anyhow!("the backlog's channel closed"))?;
        }
        if held.is_empty() && rx.is_empty() {
            return Ok(batches);
        }
        let batch = runtime
            .block_on(crate::ingest_mqtt::next_batch(&mut rx, &mut held))
            .context("the backlog's channel closed")?;
        batches.push(
            batch
                .into_iter()
                .map(|(_, p)| (p.topic, p.payload.to_vec()))
                .collect(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest_mqtt::BROKER_IN_FLIGHT;

    /// Every message once, each device's in order, batches of at most BATCH messages
    /// from at most BATCH_DEVICES devices: several messages per device when a lane has
    /// fewer devices than that and a window of a batch, about one each when it has more
    /// or the window is small.
    #[test]
    fn a_backlog_is_cut_as_the_lanes_cut_it() {
        let backlog = |devices: usize, messages: usize| -> Vec<Vec<Sealed>> {
            (0..devices)
                .map(|d| {
                    (0..messages)
                        .map(|m| (format!("fleetml/v1/d{d}/telemetry"), vec![m as u8]))
                        .collect()
                })
                .collect()
        };
        let lane = BROKER_IN_FLIGHT / LANES;
        assert_eq!(lane, BATCH, "the window lets every lane fill a batch");
        // (devices, messages each, waiting at most, the largest batch, devices in it)
        for (devices, messages, in_flight, largest, most_devices) in [
            (200, 20, lane, BATCH..=BATCH, 200),
            // Three devices' messages wait while the others fill the batch.
            (
                BATCH_DEVICES + 3,
                20,
                lane,
                BATCH - 30..=BATCH,
                BATCH_DEVICES,
            ),
            (2500, 3, lane, BATCH_DEVICES..=BATCH_DEVICES, BATCH_DEVICES),
            (
                300,
                3,
                900,
                3 * BATCH_DEVICES..=3 * BATCH_DEVICES,
                BATCH_DEVICES,
            ),
            // The window of 1,000 that mosquitto was given before: a lane's share holds
            // one message of each of its 250 devices (its whole backlog: 2,048).
            (250, 20, 250, 250..=250, 250),
            // mosquitto's own default window, 20, shared by four lanes.
            (200, 20, 5, 5..=5, 5),
        ] {
            let case = format!("{devices} devices, {in_flight} in flight");
            let batches = backlog_batches(backlog(devices, messages), in_flight).expect("cut");
            let mut seen: std::collections::HashMap<String, Vec<u8>> = Default::default();
            let mut most = 0;
            for b in &batches {
                let in_it: std::collections::HashSet<&String> = b.iter().map(|(t, _)| t).collect();
                most = most.max(in_it.len());
                for (t, m) in b {
                    seen.entry(t.clone()).or_default().push(m[0]);
                }
            }
            assert_eq!(seen.len(), devices, "{case}");
            for got in seen.values() {
                assert_eq!(*got, (0..messages as u8).collect::<Vec<u8>>(), "{case}");
            }
            let biggest = batches.iter().map(Vec::len).max().unwrap_or(0);
            assert!(
                largest.contains(&biggest),
                "{case}: {biggest} in the largest batch"
            );
            assert_eq!(most, most_devices, "{case}");
        }
    }

    /// The measurement itself, on sled: everything stored, nothing refused.
    #[test]
    fn sled_stores_every_message_it_is_handed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            crate::store::sled::SledStore::open(&dir.path().join("fleet.db")).expect("sled");
        let c = ingest_capacity(
            Arc::new(store),
            "sled",
            &CapacityOptions {
                devices: 10,
                messages: 5,
                in_flight: BROKER_IN_FLIGHT,
            },
        )
        .expect("measured");
        assert_eq!(
            (c.messages, c.stored, c.refused, c.duplicates),
            (50, 50, 0, 0)
        );
        assert!(c.stored_per_s > 0.0 && c.message_bytes > 1000, "{c:?}");
    }
}
