//! The ingest over MQTT: one session subscribed to the devices' topics (its messages
//! acknowledged by hand, once stored), a receiving task that never blocks, and
//! [`LANES`] storing pipelines.
//!
//! - A device's messages always go to the same lane (by a hash of its id), so they are
//!   stored in the order it sent them; the lanes store their batches at the same time
//!   (PostgreSQL: that many transactions in flight; sled: one flush covers what every
//!   lane wrote).
//! - Acknowledgements leave in the order the messages arrived ([`AckOrder`]): rumqttd
//!   drops an acknowledgement that is not for its oldest unacknowledged message.
//! - A batch whose store fails is retried with back-off, not dropped: the lane waits,
//!   its messages stay unacknowledged, and the broker holds back what is beyond its
//!   in-flight window (mosquitto's `max_inflight_messages`).
//!
//! The JetStream path for replicas on a NATS cluster is `crate::ingest_queue`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use tokio::sync::{Notify, mpsc};

use crate::plane::{Plane, now_ms, reconnect_wait};

/// Storing pipelines (PostgreSQL: its transactions wait on the server and on WAL
/// flushes, so several in flight store more).
pub const LANES: usize = 4;
/// Messages stored in one batch, at most. Under load a lane's batch then holds several
/// messages of each of its devices, and each device's state is read, decoded, encoded
/// and written once per batch rather than once per message (1,000 devices at 10 msg/s
/// each through mosquitto, sled: 256 per batch stored 5,800–6,300 msg/s and let the
/// backlog grow to 3 GiB; 2,048 stores about 9,300, what the devices sent). Under light
/// load a batch is whatever has arrived: nothing waits for it to fill.
pub(crate) const BATCH: usize = 2048;
/// Devices in one batch, at most: the batch holds each device's mark and decoded state
/// too, and with one message per device a larger batch gains nothing (10,000 devices,
/// sled: batches of 2,048 devices made rollouts 2–8 s slower and the peak 70–370 MiB
/// higher than 256; a backlog of one message per device was stored no faster in
/// batches of 2,048 devices: docs/BENCHMARKS.md). Messages of further devices wait for
/// the next batch rather than end this one, or a lane with a few more devices than this
/// would store batches of one message per device again.
pub(crate) const BATCH_DEVICES: usize = 256;

/// Messages the broker should send the ingest unacknowledged (mosquitto's
/// `max_inflight_messages`, set so by `fleetctl broker acl` and the simulator): a whole
/// batch for every lane. The ingest acknowledges a message once it is stored, so this
/// bounds what waits in the control plane's memory; with mosquitto's default of 20
/// every batch is 20 messages, and with 1,000 a lane holds about 250: one message per
/// device at 1,000 devices and more.
pub const BROKER_IN_FLIGHT: usize = LANES * BATCH;
/// And the bytes of them (mosquitto's `max_inflight_bytes`): 8,192 of the simulator's
/// 3 KB window reports, 256 of the largest messages (`telemetry::MAX_MESSAGE`).
pub const BROKER_IN_FLIGHT_BYTES: usize = 64 << 20;

/// The lane, of `lanes`, of the message on `topic`: by its device id, the third level
/// (`fleetml/v1/DEVICE/CHANNEL`); a topic without one (it is refused) goes by its whole
/// text.
pub fn lane_of(topic: &str, lanes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let device = device_of(topic);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    device.hash(&mut h);
    (h.finish() % lanes.max(1) as u64) as usize
}

/// Received messages waiting for their acknowledgement, in the order they arrived. A
/// message is acknowledged once it and every message before it are stored.
#[derive(Debug, Default)]
pub struct AckOrder {
    /// The number of `waiting[0]` (messages are numbered as they arrive).
    first: u64,
    /// Each message's acknowledgement (the message without its payload), and whether
    /// it is stored.
    waiting: VecDeque<(Publish, bool)>,
}

impl AckOrder {
    /// Adds a received message; its number.
    pub fn push(&mut self, p: &Publish) -> u64 {
        let n = self.first + self.waiting.len() as u64;
        let ack = Publish {
            payload: bytes::Bytes::new(),
            ..p.clone()
        };
        self.waiting.push_back((ack, false));
        n
    }

    /// Message `n` is stored (one forgotten by [`AckOrder::reconnected`] is ignored).
    pub fn stored(&mut self, n: u64) {
        if let Some(e) = n
            .checked_sub(self.first)
            .and_then(|i| self.waiting.get_mut(usize::try_from(i).ok()?))
        {
            e.1 = true;
        }
    }

    /// The acknowledgements that may leave now, in order.
    pub fn ready(&mut self) -> Vec<Publish> {
        let mut out = Vec::new();
        while self.waiting.front().is_some_and(|e| e.1) {
            if let Some((p, _)) = self.waiting.pop_front() {
                out.push(p);
                self.first += 1;
            }
        }
        out
    }

    /// A new session: what the old one had not acknowledged comes again from the broker
    /// (its session is persistent) or from the devices' outboxes, so its
    /// acknowledgements are forgotten (they would name the old session's packet ids).
    pub fn reconnected(&mut self) {
        self.first += self.waiting.len() as u64;
        self.waiting.clear();
    }

    /// Messages received and not acknowledged yet.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// Starts the receiving task, `lanes` storing lanes and the acknowledging task.
pub fn spawn(
    plane: Arc<Plane>,
    client: AsyncClient,
    events: rumqttc::EventLoop,
    filter: String,
    lanes: usize,
) {
    // Unbounded on purpose: the receiving task must never block, or it stops polling the
    // event loop that carries the acknowledgements out — a deadlock seen under load with
    // mosquitto (system test `the_ingest_keeps_up_with_a_burst…`). What queues here is
    // what the broker sent and the ingest has not stored yet: at most the broker's
    // in-flight window.
    let (lanes, receivers): (Vec<_>, Vec<_>) = (0..lanes.max(1))
        .map(|_| mpsc::unbounded_channel::<(u64, Publish)>())
        .unzip();
    let order = Arc::new(Mutex::new(AckOrder::default()));
    let wake = Arc::new(Notify::new());
    tokio::spawn(receive(
        plane.clone(),
        client.clone(),
        events,
        filter,
        lanes,
        order.clone(),
    ));
    for mut rx in receivers {
        let (plane, order, wake) = (plane.clone(), order.clone(), wake.clone());
        tokio::spawn(async move { store_lane(plane, &mut rx, order, wake).await });
    }
    tokio::spawn(async move {
        loop {
            wake.notified().await;
            let ready = lock(&order).ready();
            for p in &ready {
                // Fails only when the event loop is gone (the process is ending).
                let _ = client.ack(p).await;
            }
        }
    });
}

fn lock(order: &Mutex<AckOrder>) -> std::sync::MutexGuard<'_, AckOrder> {
    order.lock().unwrap_or_else(|p| p.into_inner())
}

/// Polls the session: subscribes on every connection, hands each message to its lane.
async fn receive(
    plane: Arc<Plane>,
    client: AsyncClient,
    mut events: rumqttc::EventLoop,
    filter: String,
    lanes: Vec<mpsc::UnboundedSender<(u64, Publish)>>,
    order: Arc<Mutex<AckOrder>>,
) {
    let connected = &plane.ingest.counters.connected;
    let mut failures = 0u32;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                lock(&order).reconnected();
                tracing::info!("ingest connected to the broker");
                // One filter, so that a device's messages on its three channels arrive
                // in the order it sent them (rumqttd keeps one log per filter); it also
                // brings back the commands the control plane publishes, which the
                // ingest ignores.
                if let Err(e) = client.subscribe(filter.as_str(), QoS::AtLeastOnce).await {
                    tracing::error!(error = %e, "ingest could not subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                connected.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::Publish(mut p))) => {
                // A payload of its own: as received it is a slice of the connection's
                // read buffer and keeps that whole buffer alive until stored
                // (heaptrack: 4 GiB of read buffers held at 7,000 msg/s from 1,000
                // simulated devices).
                p.payload = bytes::Bytes::copy_from_slice(&p.payload);
                let n = lock(&order).push(&p);
                metrics::gauge!("fleetml_control_ingest_pending").increment(1.0);
                if lanes[lane_of(&p.topic, lanes.len())].send((n, p)).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                connected.store(false, std::sync::atomic::Ordering::Relaxed);
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!(error = %e, "ingest lost the broker; reconnecting");
                }
                tokio::time::sleep(reconnect_wait(failures)).await;
            }
        }
    }
}

/// One storing pipeline: batches of what `rx` brings, each stored and flushed (retried
/// until that succeeds), then marked stored in `order` and the acknowledger woken.
async fn store_lane(
    plane: Arc<Plane>,
    rx: &mut mpsc::UnboundedReceiver<(u64, Publish)>,
    order: Arc<Mutex<AckOrder>>,
    wake: Arc<Notify>,
) {
    let mut held = VecDeque::new();
    while let Some(mut publishes) = next_batch(rx, &mut held).await {
        metrics::gauge!("fleetml_control_ingest_pending").decrement(publishes.len() as f64);
        let numbers: Vec<u64> = publishes.iter().map(|(n, _)| *n).collect();
        let mut failures = 0u32;
        loop {
            let p2 = plane.clone();
            let stored = tokio::task::spawn_blocking(move || {
                let r = p2.ingest.store_batch(
                    publishes
                        .iter()
                        .map(|(_, p)| (p.topic.as_str(), &p.payload[..])),
                    now_ms(),
                );
                (r, publishes)
            })
            .await;
            let (r, back) = match stored {
                Ok(done) => done,
                Err(e) => {
                    // The blocking task panicked and its batch with it. Acknowledged all
                    // the same, or every later message would wait behind it: the devices
                    // publish it again (no receipt names it).
                    tracing::error!(error = %e, "ingest task failed");
                    mark_stored(&order, &wake, &numbers);
                    break;
                }
            };
            publishes = back;
            match r {
                Ok(()) => {
                    mark_stored(&order, &wake, &numbers);
                    break;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::error!(
                            error = %e,
                            messages = publishes.len(),
                            "storing telemetry failed; retrying (unacknowledged until stored)"
                        );
                    }
                    tokio::time::sleep(reconnect_wait(failures)).await;
                }
            }
        }
    }
}

/// The next batch: the messages `held` from earlier calls, then what has arrived on
/// `rx`, up to [`BATCH`] messages from at most [`BATCH_DEVICES`] devices; waits only
/// when there is nothing at all. The messages of devices beyond that many are held, in
/// order, for the next batch (at most [`BATCH`] of them), so each device's messages
/// keep their order. `None` once `rx` is closed and nothing is held.
pub(crate) async fn next_batch(
    rx: &mut mpsc::UnboundedReceiver<(u64, Publish)>,
    held: &mut VecDeque<(u64, Publish)>,
) -> Option<Vec<(u64, Publish)>> {
    if held.is_empty() {
        held.push_back(rx.recv().await?);
    }
    let mut devices = std::collections::HashSet::new();
    let mut batch = Vec::new();
    let mut later = VecDeque::new();
    while batch.len() < BATCH && later.len() < BATCH {
        let Some(m) = held.pop_front().or_else(|| rx.try_recv().ok()) else {
            break;
        };
        let device = device_of(&m.1.topic);
        if devices.contains(device) {
            batch.push(m);
        } else if devices.len() < BATCH_DEVICES {
            devices.insert(device.to_owned());
            batch.push(m);
        } else {
            later.push_back(m);
        }
    }
    // What was put aside arrived before anything still held. (Nothing is: what is held
    // at the start is at most BATCH, and the loop takes at least that many before it
    // stops for a full batch or a full `later`. Appending keeps the order regardless.)
    later.append(held);
    *held = later;
    Some(batch)
}

/// The device a topic names (`fleetml/v1/DEVICE/CHANNEL`), or the whole topic.
fn device_of(topic: &str) -> &str {
    topic.split('/').nth(2).unwrap_or(topic)
}

fn mark_stored(order: &Mutex<AckOrder>, wake: &Notify, numbers: &[u64]) {
    let mut order = lock(order);
    for n in numbers {
        order.stored(*n);
    }
    drop(order);
    wake.notify_one();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(pkid: u16) -> Publish {
        let mut p = Publish::new("fleetml/v1/d/telemetry", QoS::AtLeastOnce, vec![1u8; 10]);
        p.pkid = pkid;
        p
    }

    #[test]
    fn acknowledgements_leave_in_the_order_the_messages_arrived() {
        let mut order = AckOrder::default();
        let n: Vec<u64> = (1..=4).map(|k| order.push(&publish(k))).collect();
        assert_eq!(n, [0, 1, 2, 3]);
        // Stored out of order (two lanes): nothing leaves before the first is stored.
        order.stored(n[2]);
        order.stored(n[1]);
        assert!(order.ready().is_empty());
        order.stored(n[0]);
        let ready: Vec<u16> = order.ready().iter().map(|p| p.pkid).collect();
        assert_eq!(ready, [1, 2, 3]);
        assert!(order.ready()[..].is_empty());
        order.stored(n[3]);
        let ready = order.ready();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].pkid, 4);
        assert!(
            ready[0].payload.is_empty(),
            "acknowledgements keep no payload"
        );
        assert!(order.is_empty());
    }

    #[test]
    fn a_new_session_forgets_the_old_sessions_acknowledgements() {
        let mut order = AckOrder::default();
        let old = order.push(&publish(7));
        order.reconnected();
        let new = order.push(&publish(7));
        assert!(new > old);
        // The old one stored late: not acknowledged on the new session.
        order.stored(old);
        assert!(order.ready().is_empty());
        order.stored(new);
        assert_eq!(order.ready().len(), 1);
        assert_eq!(order.len(), 0);
    }

    /// A batch takes what has arrived, up to BATCH messages from at most BATCH_DEVICES
    /// devices; the messages of devices beyond that wait for the next batch while those
    /// of devices in it go on; nothing is lost or doubled, and each device's messages
    /// keep their order.
    #[tokio::test]
    async fn batches_are_bounded_by_messages_and_by_devices() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut n = 0u64;
        let mut send = |device: usize| {
            let topic = format!("fleetml/v1/d-{device}/telemetry");
            tx.send((n, Publish::new(topic, QoS::AtLeastOnce, vec![0u8])))
                .expect("open");
            n += 1;
        };
        // Many messages of few devices: bounded by messages.
        for i in 0..BATCH + 10 {
            send(i % 3);
        }
        // Then three rounds over more devices than a batch holds.
        let many = BATCH_DEVICES + 44;
        for _ in 0..3 {
            for d in 0..many {
                send(100 + d);
            }
        }
        drop(tx);
        let mut held = VecDeque::new();
        let mut batches = Vec::new();
        while let Some(b) = next_batch(&mut rx, &mut held).await {
            batches.push(b);
        }
        let devices = |b: &[(u64, Publish)]| {
            b.iter()
                .map(|(_, p)| device_of(&p.topic).to_owned())
                .collect::<std::collections::HashSet<_>>()
                .len()
        };
        let sizes: Vec<(usize, usize)> = batches.iter().map(|b| (b.len(), devices(b))).collect();
        let rest = many - (BATCH_DEVICES - 3);
        assert_eq!(
            sizes,
            [
                (BATCH, 3),
                (10 + 3 * (BATCH_DEVICES - 3), BATCH_DEVICES),
                (3 * rest, rest)
            ]
        );
        let mut all: Vec<u64> = batches.iter().flatten().map(|(n, _)| *n).collect();
        let mut per_device: std::collections::HashMap<String, Vec<u64>> = Default::default();
        for (n, p) in batches.iter().flatten() {
            per_device
                .entry(device_of(&p.topic).to_owned())
                .or_default()
                .push(*n);
        }
        assert!(per_device.values().all(|ns| ns.is_sorted()), "in order");
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "each once");
    }

    /// At most BATCH messages are put aside, the rest stay in the channel; a call with
    /// messages held does not wait on the channel (its sender still open).
    #[tokio::test]
    async fn what_is_put_aside_is_bounded_and_comes_first() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let total = BATCH_DEVICES + BATCH + 5;
        for n in 0..total as u64 {
            let topic = format!("fleetml/v1/d-{n}/telemetry");
            tx.send((n, Publish::new(topic, QoS::AtLeastOnce, vec![0u8])))
                .expect("open");
        }
        let mut held = VecDeque::new();
        async fn next(
            rx: &mut mpsc::UnboundedReceiver<(u64, Publish)>,
            held: &mut VecDeque<(u64, Publish)>,
        ) -> Vec<u64> {
            let wait = std::time::Duration::from_secs(5);
            tokio::time::timeout(wait, next_batch(rx, held))
                .await
                .expect("no wait while messages are held")
                .expect("a batch")
                .into_iter()
                .map(|(n, _)| n)
                .collect()
        }
        let first = next(&mut rx, &mut held).await;
        assert_eq!(first, (0..BATCH_DEVICES as u64).collect::<Vec<_>>());
        assert_eq!(
            held.len(),
            BATCH,
            "put aside: BATCH, the rest left in the channel"
        );
        let second = next(&mut rx, &mut held).await;
        let third = next(&mut rx, &mut held).await;
        assert_eq!(
            [first.len(), second.len(), third.len()],
            [BATCH_DEVICES; 3],
            "one message of each of 256 devices"
        );
        assert!(held.len() <= BATCH);
        let mut all = [first, second, third].concat();
        while all.len() < total {
            all.extend(next(&mut rx, &mut held).await);
            assert!(held.len() <= BATCH);
        }
        assert_eq!(
            all,
            (0..total as u64).collect::<Vec<_>>(),
            "in arrival order"
        );
        drop(tx);
    }

    #[test]
    fn a_devices_messages_share_a_lane() {
        let lane = lane_of("fleetml/v1/pi-7/telemetry", LANES);
        assert_eq!(lane_of("fleetml/v1/pi-7/status", LANES), lane);
        assert_eq!(lane_of("fleetml/v1/pi-7/events", LANES), lane);
        let used: std::collections::BTreeSet<usize> = (0..64)
            .map(|i| lane_of(&format!("fleetml/v1/dev-{i}/telemetry"), LANES))
            .collect();
        assert_eq!(used.len(), LANES, "64 devices spread over every lane");
        assert_eq!(lane_of("fleetml/v1/pi-7/status", 1), 0);
    }
}
