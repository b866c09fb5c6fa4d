//! The simulated devices: each follows `fleetml-device`'s rules (delivery and
//! receipts, the assignment pull, downloads, back-off) around in-memory state, and
//! speaks MQTT and HTTP like `fleet-agent`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use fleetml_device::backoff;
use fleetml_device::delivery::{Acked, Delivery};
use fleetml_device::download::{self, Begin, Failure};
use fleetml_device::pull::{self, Answer, PullState};
use fleetml_protocol::assignment::AssignedModel;
use fleetml_protocol::crypto::{Sha256, Sha256Hasher};
use fleetml_protocol::telemetry::{
    self, ActiveModel, Body, Channel, DeviceId, FeatureDrift, Lifecycle, Quantiles, Status,
    WindowReport,
};
use fleetml_protocol::trust::TrustPolicy;
use http_body_util::BodyExt;
use rumqttc::{
    AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode,
};
use tokio::sync::{Notify, Semaphore, watch};

use super::http::*;
use super::options::*;
use crate::plane::now_ms;

/// Counters shared by every simulated device.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) connected: AtomicI64,
    pub(super) reconnects: AtomicU64,
    pub(super) connect_failures: AtomicU64,
    /// Command subscriptions the broker refused (each subscribed again).
    pub(super) subscribe_refusals: AtomicU64,
    pub(super) sealed: AtomicU64,
    /// Messages confirmed delivered (receipt, or PUBACK before the first receipt).
    pub(super) acked: AtomicU64,
    /// Broker acknowledgements (PUBACKs) of outbox messages.
    pub(super) pubacked: AtomicU64,
    /// Messages published again because no receipt named them in time.
    pub(super) republished: AtomicU64,
    /// Messages in all outboxes.
    pub(super) depth: AtomicI64,
    pub(super) refusals: AtomicU64,
    pub(super) downloads: AtomicU64,
    pub(super) download_bytes: AtomicU64,
    pub(super) download_failures: AtomicU64,
    /// Devices serving each version of the model (index = version; 0 = none).
    pub(super) on_version: [AtomicU64; 3],
}

/// What every device shares: where the control plane is, limits, and the stop signal.
#[derive(Debug)]
pub(super) struct Fleet {
    /// The replicas' APIs: device `slot` uses `http[slot % len]`.
    pub(super) http: Vec<Http>,
    /// Loopback MQTT ports: device `slot` connects to `brokers[slot % len]`.
    pub(super) brokers: Vec<u16>,
    pub(super) stats: Stats,
    pub(super) http_slots: Semaphore,
    pub(super) connect_slots: Semaphore,
    /// Time between two telemetry messages of a device (none: `--rate 0`).
    pub(super) period: Option<Duration>,
    /// Set at the end: devices stop producing telemetry so their outboxes drain.
    pub(super) quiet: AtomicBool,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) features: Vec<String>,
}

impl Fleet {
    /// The API `dev` talks to.
    pub(super) fn http_of(&self, dev: &Device) -> &Http {
        &self.http[dev.slot % self.http.len()]
    }
}

/// One simulated device.
pub(super) struct Device {
    pub(super) id: DeviceId,
    /// Its number in the fleet: which replica and broker node it uses.
    pub(super) slot: usize,
    pub(super) secret: Vec<u8>,
    pub(super) token: String,
    pub(super) board: String,
    pub(super) policy: Arc<TrustPolicy>,
    /// When its "agent" started (status uptime).
    pub(super) started: Instant,
    /// Model name → (version, bundle digest) it serves.
    pub(super) active: Mutex<BTreeMap<String, (u64, Sha256)>>,
    pub(super) outbox: Mutex<Outbox>,
    /// Messages sealed so far (= the next sequence number).
    pub(super) sealed: AtomicU64,
    /// Wakes the publisher: something was pushed (the agent's `wake`).
    pub(super) publish: Notify,
    /// Wakes the puller: `assignment_changed`.
    pub(super) pull: Notify,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret and token stay out of logs.
        f.debug_struct("Device")
            .field("id", &self.id)
            .field("board", &self.board)
            .finish_non_exhaustive()
    }
}

/// A device's in-memory outbox: sealed messages, kept by the agent's delivery rule
/// ([`Delivery`]: until the broker acknowledges them, or, once the control plane has
/// sent a receipt, until a receipt names them).
#[derive(Debug, Default)]
pub(super) struct Outbox {
    pub(super) next_seq: u64,
    pub(super) messages: BTreeMap<u64, (String, Vec<u8>)>,
    pub(super) delivery: Delivery,
}

impl Outbox {
    /// Deletes what `receipt` names; returns how many messages went.
    pub(super) fn receipt(&mut self, receipt: &telemetry::Receipt) -> u64 {
        let mut removed = 0;
        for (a, b) in self.delivery.receipt(receipt).delete {
            let here: Vec<u64> = self.messages.range(a..=b).map(|(s, _)| *s).collect();
            for seq in here {
                self.messages.remove(&seq);
                removed += 1;
            }
        }
        removed
    }
}

/// The command subscription's QoS, the agent's ([`fleetml_device::commands::QOS`]).
fn command_qos() -> QoS {
    rumqttc::qos(fleetml_device::commands::QOS).unwrap_or(QoS::AtMostOnce)
}

/// Asks the client to subscribe to the device's commands; when its request queue is
/// full, when to try again (only the grant brings the pull, as in the agent).
fn subscribe_commands(client: &AsyncClient, topic: &str, rng: &mut Rng) -> Option<Instant> {
    client.try_subscribe(topic, command_qos()).err().map(|_| {
        tracing::warn!(topic, "could not subscribe; trying again");
        Instant::now() + backoff::reconnect(1, rng.next())
    })
}

/// Milliseconds since the simulator started, for the delivery rule.
pub(super) fn since_start_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Device {
    pub(super) fn new(
        id: DeviceId,
        slot: usize,
        secret: Vec<u8>,
        board: &str,
        policy: Arc<TrustPolicy>,
    ) -> Device {
        Device {
            slot,
            token: fleetml_protocol::assignment::http_token(&id, &secret),
            id,
            secret,
            board: board.to_string(),
            policy,
            started: Instant::now(),
            active: Mutex::new(BTreeMap::new()),
            outbox: Mutex::new(Outbox::default()),
            sealed: AtomicU64::new(0),
            publish: Notify::new(),
            pull: Notify::new(),
        }
    }

    pub(super) fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn active(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (u64, Sha256)>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seals `body` with the next sequence number into the outbox and wakes the
    /// publisher; a status gets the outbox's depth. Returns the sequence number.
    pub(super) fn push(&self, stats: &Stats, body: Body) -> u64 {
        let seq = {
            let mut outbox = self.outbox();
            let body = match body {
                Body::Status(mut s) => {
                    s.outbox_depth = outbox.messages.len() as u64;
                    Body::Status(s)
                }
                b => b,
            };
            let seq = outbox.next_seq;
            outbox.next_seq += 1;
            let (topic, bytes) = telemetry::seal(&self.id, seq, now_ms(), body, &self.secret);
            outbox.messages.insert(seq, (topic, bytes));
            self.sealed.store(outbox.next_seq, Ordering::Relaxed);
            seq
        };
        stats.sealed.fetch_add(1, Ordering::Relaxed);
        stats.depth.fetch_add(1, Ordering::Relaxed);
        self.publish.notify_one();
        seq
    }

    /// What the agent reports as its status.
    pub(super) fn status(&self) -> Status {
        let models = self
            .active()
            .iter()
            .map(|(name, (version, _))| ActiveModel {
                shadow: None,
                name: name.clone(),
                version: *version,
                backend: "cpu".into(),
                fallbacks: Vec::new(),
            })
            .collect();
        Status {
            agent_version: format!("{}-sim", fleetml_protocol::VERSION),
            board: self.board.clone(),
            backends: vec!["cpu".into()],
            models,
            uptime_s: self.started.elapsed().as_secs(),
            online: true,
            outbox_depth: 0,
            dropped_windows: 0,
            will_seq: None,
        }
    }

    pub(super) fn push_status(&self, stats: &Stats) {
        self.push(stats, Body::Status(self.status()));
    }
}

/// A cheap deterministic random source per device (splitmix64), for phases and jitter.
#[derive(Debug, Clone)]
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(super) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A healthy monitoring window of `model@version`, the size of the claims model's.
/// `period`: the device's reporting period (default a minute); `features`: the model's.
pub(super) fn window(
    period: Option<Duration>,
    features: &[String],
    model: &str,
    version: u64,
    n: u64,
    rng: &mut Rng,
) -> Body {
    let end_ms = now_ms();
    let span = period.unwrap_or(Duration::from_secs(60));
    let predictions = 100 + (rng.next() % 50) as u32;
    let feature = |name: &str, rng: &mut Rng| FeatureDrift {
        name: name.to_string(),
        values: predictions,
        missing_rate: 0.0,
        out_of_range_rate: 0.0,
        unseen_rate: 0.0,
        psi: 0.01 + rng.unit() * 0.02,
        ks: Some(0.02 + rng.unit() * 0.02),
        js: 0.01 + rng.unit() * 0.01,
        chi2_p: None,
        wasserstein: Some(0.01 + rng.unit() * 0.02),
        moved: Vec::new(),
        usefulness: None,
        drifting: false,
    };
    Body::Window(Box::new(WindowReport {
        shadow: None,
        model: model.to_string(),
        version,
        window: n,
        start_ms: end_ms.saturating_sub(span.as_millis() as u64),
        end_ms,
        predictions,
        throughput_per_s: predictions as f64 / span.as_secs_f64().max(0.001),
        missed: BTreeMap::new(),
        missing_prediction_rate: 0.0,
        missing_ids: Vec::new(),
        latency_us: Quantiles {
            p50: Some(400),
            p95: Some(700),
            p99: Some(900),
        },
        lag_ms: Quantiles {
            p50: Some(1),
            p95: Some(2),
            p99: Some(3),
        },
        batch_rows: Quantiles::default(),
        outages: Vec::new(),
        outages_not_listed: 0,
        features: features.iter().map(|f| feature(f, rng)).collect(),
        prediction: Some(feature("prediction", rng)),
        events: Vec::new(),
        alerts: Vec::new(),
        labels: 0,
        live_accuracy: None,
        live_mae: None,
        multivariate: None,
        estimated_accuracy: None,
    }))
}

/// The device's monitoring: every `period` a window report per model it serves, or a
/// status while it serves none; and, as the agent, a status heartbeat every
/// [`STATUS_INTERVAL`] while its outbox is drained.
pub(super) async fn run_telemetry(dev: Arc<Device>, fleet: Arc<Fleet>, mut rng: Rng) {
    let start = |every: Duration, rng: &mut Rng| {
        let phase = every.mul_f64(rng.unit());
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    };
    let mut windows = fleet.period.map(|p| start(p, &mut rng));
    let mut heartbeat = start(STATUS_INTERVAL, &mut rng);
    let mut stop = fleet.stop.clone();
    let mut n = 0u64;
    loop {
        let window_due = tokio::select! {
            _ = async {
                match windows.as_mut() {
                    Some(t) => t.tick().await,
                    None => std::future::pending().await,
                }
            } => true,
            _ = heartbeat.tick() => false,
            _ = stop.changed() => return,
        };
        if fleet.quiet.load(Ordering::Relaxed) {
            continue;
        }
        if !window_due {
            if dev.outbox().messages.is_empty() {
                dev.push_status(&fleet.stats);
            }
            continue;
        }
        let serving: Vec<(String, u64)> = dev
            .active()
            .iter()
            .map(|(n, (v, _))| (n.clone(), *v))
            .collect();
        if serving.is_empty() {
            dev.push_status(&fleet.stats);
        }
        for (name, version) in serving {
            n += 1;
            let body = window(fleet.period, &fleet.features, &name, version, n, &mut rng);
            dev.push(&fleet.stats, body);
        }
    }
}

/// A device's publisher, shaped like the agent's: QoS 1 from the outbox, at most
/// [`WINDOW`] in flight, a message leaves the outbox on its PUBACK, everything left is
/// re-published in order after a reconnect; commands answered.
pub(super) async fn run_publisher(dev: Arc<Device>, fleet: Arc<Fleet>, mut rng: Rng) {
    let stats = &fleet.stats;
    // The run's first status, and the last will sealed with its sequence number.
    let first = dev.status();
    let s0 = dev.push(stats, Body::Status(first.clone()));
    let mut gone = first;
    gone.online = false;
    let (will_topic, will) =
        telemetry::seal(&dev.id, s0, now_ms(), Body::Status(gone), &dev.secret);
    let port = fleet.brokers[dev.slot % fleet.brokers.len()];
    let mut options = MqttOptions::new(dev.id.as_str(), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(false);
    options.set_max_packet_size(telemetry::MAX_MESSAGE + 1024, telemetry::MAX_MESSAGE + 1024);
    options.set_last_will(LastWill::new(will_topic, will, QoS::AtLeastOnce, true));
    options.set_credentials(dev.id.as_str(), telemetry::mqtt_password(&dev.secret));
    let (client, mut events) = AsyncClient::new(options, WINDOW * 2);
    let cmd_topic = telemetry::topic(&dev.id, Channel::Cmd);

    let mut handed: VecDeque<u64> = VecDeque::new();
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut next: u64 = 0;
    let mut connected = false;
    let mut ever_connected = false;
    let mut subscription = fleetml_device::commands::Subscription::default();
    let mut failures: u32 = 0;
    let mut resubscribe_at: Option<Instant> = None;
    let mut last_command: Option<u64> = None;
    let mut resend: VecDeque<u64> = VecDeque::new();
    let mut overdue_check = tokio::time::interval(Duration::from_secs(2));
    overdue_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = fleet.stop.clone();
    let mut connecting: Option<tokio::sync::SemaphorePermit<'_>> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        if !connected && connecting.is_none() {
            tokio::select! {
                permit = fleet.connect_slots.acquire() => match permit {
                    Ok(p) => connecting = Some(p),
                    Err(_) => break,
                },
                _ = stop.changed() => break,
            }
        }
        if connected {
            let mut guard = dev.outbox();
            let outbox = &mut *guard;
            // What no receipt named in time goes first.
            while WINDOW > handed.len() + inflight.len() {
                let Some(seq) = resend.pop_front() else { break };
                let Some((topic, payload)) = outbox.messages.get(&seq) else {
                    continue;
                };
                if client
                    .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                    .is_err()
                {
                    resend.push_front(seq);
                    break;
                }
                stats.republished.fetch_add(1, Ordering::Relaxed);
                outbox.delivery.sent(seq);
                handed.push_back(seq);
            }
            // Top the window up from the outbox, in sequence order.
            let room = WINDOW.saturating_sub(handed.len() + inflight.len());
            for (&seq, (topic, payload)) in outbox.messages.range(next..).take(room) {
                let retain = topic.ends_with("/status");
                if client
                    .try_publish(topic.clone(), QoS::AtLeastOnce, retain, payload.clone())
                    .is_err()
                {
                    break;
                }
                outbox.delivery.sent(seq);
                handed.push_back(seq);
                next = seq + 1;
            }
        }
        // Only `poll` runs while connecting: dropping its future mid-handshake would
        // drop the connection (the agent's publisher waits the same way).
        tokio::select! {
            biased;
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // The outbox, not rumqttc's replay, is the source of truth.
                    events.pending.clear();
                    handed.clear();
                    inflight.clear();
                    resend.clear();
                    dev.outbox().delivery.reconnected();
                    next = 0;
                    connected = true;
                    failures = 0;
                    connecting = None;
                    stats.connected.fetch_add(1, Ordering::Relaxed);
                    if ever_connected {
                        stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    ever_connected = true;
                    // Nothing was kept for the device before the subscription (QoS 0, as
                    // the agent's): pulled once it is granted (the device always
                    // subscribes).
                    subscription.connected(true);
                    resubscribe_at = subscribe_commands(&client, &cmd_topic, &mut rng);
                    dev.push_status(stats);
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    // Refused (a busy NATS node answers 0x80): again, with back-off, as
                    // the agent does.
                    if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                        let refusals = subscription.refused();
                        stats.subscribe_refusals.fetch_add(1, Ordering::Relaxed);
                        resubscribe_at =
                            Some(Instant::now() + backoff::reconnect(refusals, rng.next()));
                    } else if subscription.granted().is_some() {
                        // Commands sent before the grant (since the start, while refused,
                        // while away) were missed: pull now, as the agent does.
                        dev.pull.notify_one();
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some((ack, send_status)) =
                        command(&dev, stats, &p.topic, &p.payload, &mut last_command)
                    {
                        if send_status {
                            dev.push_status(stats);
                        }
                        dev.push(stats, Body::Ack(ack));
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(seq) = handed.pop_front() {
                        inflight.insert(pkid, seq);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(seq) = inflight.remove(&ack.pkid) {
                        stats.pubacked.fetch_add(1, Ordering::Relaxed);
                        let mut outbox = dev.outbox();
                        let held = outbox.messages.contains_key(&seq);
                        if outbox.delivery.acked(seq, held, since_start_ms()) == Acked::Forget {
                            outbox.messages.remove(&seq);
                            stats.acked.fetch_add(1, Ordering::Relaxed);
                            stats.depth.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        stats.connected.fetch_sub(1, Ordering::Relaxed);
                        tracing::debug!(device = %dev.id, error = %e, "disconnected");
                    } else {
                        stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(device = %dev.id, error = %e, "could not connect");
                    }
                    connected = false;
                    connecting = None;
                    failures = failures.saturating_add(1);
                    let wait = backoff::reconnect(failures, rng.next());
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => break,
                    }
                }
            },
            _ = dev.publish.notified(), if connected => {}
            _ = overdue_check.tick(), if connected => {
                if resubscribe_at.is_some_and(|at| Instant::now() >= at) {
                    resubscribe_at = subscribe_commands(&client, &cmd_topic, &mut rng);
                }
                let due = dev
                    .outbox()
                    .delivery
                    .overdue(RESEND_AFTER.as_millis() as u64, since_start_ms());
                resend.extend(due);
            }
            _ = stop.changed() => break,
        }
    }
    if connected {
        // A clean goodbye: no last will.
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        stats.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A message on the device's `cmd` topic: verified with its secret, replays ignored,
/// handled as the agent does. Returns the acknowledgement to send, and whether a status
/// goes first; `None` for a message not answered.
pub(super) fn command(
    dev: &Device,
    stats: &Stats,
    topic: &str,
    bytes: &[u8],
    last: &mut Option<u64>,
) -> Option<(telemetry::Ack, bool)> {
    let envelope =
        match telemetry::open(topic, bytes, |d| (d == &dev.id).then(|| dev.secret.clone())) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(device = %dev.id, error = %e, "refused a command");
                return None;
            }
        };
    let c = match envelope.body {
        Body::Command(c) => c,
        Body::Receipt(r) => {
            let removed = dev.outbox().receipt(&r);
            stats.acked.fetch_add(removed, Ordering::Relaxed);
            stats.depth.fetch_sub(removed as i64, Ordering::Relaxed);
            return None;
        }
        _ => return None,
    };
    if last.is_some_and(|l| envelope.seq <= l) {
        return None;
    }
    *last = Some(envelope.seq);
    let (ok, detail, send_status) = match c.command {
        telemetry::CommandKind::AssignmentChanged => {
            dev.pull.notify_one();
            (true, "pulling the assignment".to_string(), false)
        }
        telemetry::CommandKind::SendStatus => (true, String::new(), true),
        telemetry::CommandKind::CaptureSamples { .. } => (
            false,
            "a simulated device captures nothing".to_string(),
            false,
        ),
    };
    Some((
        telemetry::Ack {
            command: c.id,
            ok,
            detail,
        },
        send_status,
    ))
}

/// The assignment side of a device: the agent's pull rules ([`PullState`]) around an
/// in-memory store.
pub(super) struct Puller {
    pub(super) dev: Arc<Device>,
    pub(super) fleet: Arc<Fleet>,
    /// The last accepted assignment, as the agent keeps it on disk.
    pub(super) held: Option<Vec<u8>>,
    /// Bundles this device holds (the agent keeps the previous version in its store).
    pub(super) stored: HashSet<Sha256>,
    pub(super) state: PullState,
}

impl Puller {
    pub(super) async fn run(mut self, mut rng: Rng) {
        let mut stop = self.fleet.stop.clone();
        // The agent pulls at start and again when its command subscription is granted
        // (it must work without a broker). A simulated device always has one, so even
        // its first pull waits for a nudge — that grant — or a poll's time, should it
        // never come: one pull per device at start, not two.
        loop {
            let poll = backoff::jittered(POLL, rng.unit());
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = self.dev.pull.notified() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            if let Err(e) = self.once().await {
                tracing::debug!(device = %self.dev.id, error = %format!("{e:#}"), "assignment pull failed");
            }
        }
    }

    pub(super) fn event(&self, kind: Lifecycle, model: &str, version: u64, detail: String) {
        self.dev.push(
            &self.fleet.stats,
            Body::Event(telemetry::Event {
                kind,
                model: model.to_string(),
                version,
                detail,
            }),
        );
    }

    pub(super) async fn once(&mut self) -> anyhow::Result<()> {
        let path = format!("/v1/devices/{}/assignment", self.dev.id);
        let (status, body) = {
            let _slot = self.fleet.http_slots.acquire().await?;
            self.fleet
                .http_of(&self.dev)
                .call("GET", &path, &self.dev.token, None)
                .await?
        };
        let answer = self.state.answer(
            status,
            &body,
            None,
            self.held.as_deref(),
            &self.dev.policy,
            &self.dev.id,
            now_ms(),
        );
        let assignment = match answer {
            Answer::NoAssignment => return Ok(()),
            Answer::Failed(e) => bail!(e),
            Answer::Newer(a) => {
                self.event(
                    Lifecycle::AssignmentAccepted,
                    "",
                    a.generation,
                    format!("generation {}", a.generation),
                );
                self.held = Some(body.to_vec());
                a
            }
            Answer::Unchanged(a) => a,
            Answer::Refused { reason, report } => {
                self.fleet.stats.refusals.fetch_add(1, Ordering::Relaxed);
                if report {
                    self.event(Lifecycle::AssignmentRefused, "", 0, reason);
                }
                return Ok(());
            }
        };
        for (name, model) in &assignment.models {
            if let Err(e) = self.bring(name, model).await {
                tracing::debug!(device = %self.dev.id, model = %name, error = %e, "not activated");
            }
        }
        Ok(())
    }

    /// Makes `model` the version of `name` this device serves unless it already is.
    pub(super) async fn bring(&mut self, name: &str, model: &AssignedModel) -> Result<(), String> {
        let active = self.dev.active().get(name).map(|(_, d)| d.to_string());
        let step = self.state.step(
            model,
            active.as_deref(),
            false,
            self.stored.contains(&model.digest),
        );
        if matches!(step, pull::Step::Active | pull::Step::Failed) {
            return Ok(());
        }
        if step == pull::Step::Download {
            self.event(
                Lifecycle::Downloading,
                name,
                model.version,
                format!("{} bytes", model.size),
            );
            match self.download(model).await {
                Ok(()) => {
                    self.stored.insert(model.digest);
                    self.event(
                        Lifecycle::Downloaded,
                        name,
                        model.version,
                        format!("sha256 {}", model.digest),
                    );
                }
                Err(Failure::Mismatch(reason)) => {
                    self.state.failed(model.digest);
                    self.fleet
                        .stats
                        .download_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.event(
                        Lifecycle::VerificationFailed,
                        name,
                        model.version,
                        reason.clone(),
                    );
                    return Err(reason);
                }
                Err(Failure::Transfer(reason) | Failure::DiskFull(reason)) => {
                    self.fleet
                        .stats
                        .download_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.event(
                        Lifecycle::DownloadFailed,
                        name,
                        model.version,
                        reason.clone(),
                    );
                    return Err(reason);
                }
            }
        }
        // What the agent reports after verify → prepare → self-test → swap and a reload.
        self.event(
            Lifecycle::Verified,
            name,
            model.version,
            format!("sha256 {}", model.digest),
        );
        let before = self
            .dev
            .active()
            .insert(name.to_string(), (model.version, model.digest));
        let rolled_back = before.is_some_and(|(v, _)| v > model.version);
        self.event(
            if rolled_back {
                Lifecycle::RolledBack
            } else {
                Lifecycle::Activated
            },
            name,
            model.version,
            "on cpu".into(),
        );
        let on = &self.fleet.stats.on_version;
        let slot = |v: u64| on.get(v as usize).or(on.first());
        if let Some(c) = slot(before.map_or(0, |(v, _)| v)) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(c) = slot(model.version) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.dev.push_status(&self.fleet.stats);
        Ok(())
    }

    /// Downloads the bundle, checking its length and SHA-256 as it streams; nothing is
    /// kept but the digest.
    pub(super) async fn download(&self, model: &AssignedModel) -> Result<(), Failure> {
        use Failure::Transfer;
        let _slot = self
            .fleet
            .http_slots
            .acquire()
            .await
            .map_err(|e| Transfer(e.to_string()))?;
        let path = format!("/v1/bundles/{}", model.digest);
        let fetched = tokio::time::timeout(HTTP_TIMEOUT, async {
            let response = self
                .fleet
                .http_of(&self.dev)
                .send("GET", &path, &self.dev.token, None)
                .await
                .map_err(|e| Transfer(format!("{e:#}")))?;
            let mut transfer = download::Transfer::new(model, 0);
            if let Begin::Refused(status) = transfer.begin(response.status().as_u16(), None)? {
                return Err(Transfer(format!(
                    "bundle {}: the control plane answered {status}",
                    model.digest
                )));
            }
            let mut hasher = Sha256Hasher::new();
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    Transfer(format!(
                        "download interrupted at byte {}: {e}",
                        transfer.at()
                    ))
                })?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                transfer.chunk(data.len())?;
                hasher.update(&data);
            }
            transfer.finish()?;
            download::check_digest(model, &hasher.finish())?;
            Ok(transfer.received())
        })
        .await
        .map_err(|_| Transfer(format!("{path}: not done within {HTTP_TIMEOUT:?}")))??;
        self.fleet.stats.downloads.fetch_add(1, Ordering::Relaxed);
        self.fleet
            .stats
            .download_bytes
            .fetch_add(fetched, Ordering::Relaxed);
        Ok(())
    }
}
