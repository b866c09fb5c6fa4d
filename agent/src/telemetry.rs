//! The agent's side of fleet messaging: seals status, window reports, alerts, lifecycle
//! events and command acknowledgements into the durable [`Outbox`], and runs the
//! [`publisher`](crate::publisher) that drains it to the broker.
//!
//! Nothing here is on the inference path: monitoring hands reports over with
//! [`Telemetry::queue`], which never blocks (a full hand-over queue counts a drop); a
//! writer task seals and stores them (sled write + flush) on the blocking pool.
//!
//! Presence: the agent's first message of each run is a status; the broker holds a
//! last will sealed with that status's sequence number and `online: false`, which it
//! publishes (retained) when the connection dies without a goodbye. Each (re)connect
//! queues a fresh status, and while connected a status goes out every
//! `status_interval` as a heartbeat.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleetml_protocol::telemetry::{self, Ack, Body, BrokerUrl, CommandKind, DeviceId, Status};
use rumqttc::{LastWill, MqttOptions, QoS};
use tokio::sync::{Notify, mpsc};

use crate::outbox::{Class, Limits, Outbox, OutboxError};
use crate::publisher::{self, Hooks};

/// Bodies waiting to be written to the outbox.
const HAND_OVER: usize = 1024;

/// Where and as whom the agent reports.
#[derive(Clone)]
pub struct Settings {
    pub device: DeviceId,
    /// The device secret issued at enrollment (HMAC key of every message).
    pub secret: Vec<u8>,
    pub broker: BrokerUrl,
    /// Other nodes of the same (clustered) broker, tried in turn after `broker` when a
    /// connection fails; the device's session and permissions are the cluster's.
    pub more_brokers: Vec<BrokerUrl>,
    /// What an `mqtts://` broker is checked against.
    pub roots: crate::http::Roots,
    pub limits: Limits,
    /// Heartbeat status while connected.
    pub status_interval: Duration,
    /// How long a message the broker acknowledged waits for the control plane's
    /// receipt before it is published again.
    pub resend_after: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is left out on purpose.
        f.debug_struct("Settings")
            .field("device", &self.device)
            .field("broker", &self.broker)
            .field("more_brokers", &self.more_brokers)
            .field("limits", &self.limits)
            .field("status_interval", &self.status_interval)
            .field("resend_after", &self.resend_after)
            .finish_non_exhaustive()
    }
}

/// Builds the device's current status (models, backends, uptime).
pub type StatusFn = Arc<dyn Fn() -> Status + Send + Sync>;

/// A command the control plane sent, verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub id: String,
    pub kind: CommandKind,
}

/// The agent's telemetry handle.
pub struct Telemetry {
    outbox: Arc<Outbox>,
    device: DeviceId,
    secret: Vec<u8>,
    wake: Arc<Notify>,
    hand_over: mpsc::Sender<Body>,
    receiver: std::sync::Mutex<Option<mpsc::Receiver<Body>>>,
    /// Bodies lost because the hand-over queue was full.
    lost: AtomicU64,
    /// The sequence number of the last will the current connection carries.
    will_seq: AtomicU64,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("device", &self.device)
            .field("outbox_depth", &self.outbox.depth())
            .finish_non_exhaustive()
    }
}

fn class_of(body: &Body) -> Class {
    match body {
        Body::Window(_) => Class::Window,
        _ => Class::Keep,
    }
}

impl Telemetry {
    /// Opens the outbox in `DATA_DIR/outbox`.
    pub fn open(
        data_dir: &std::path::Path,
        settings: &Settings,
    ) -> Result<Arc<Telemetry>, OutboxError> {
        let outbox = Outbox::open_from(
            &data_dir.join("outbox"),
            settings.limits,
            telemetry::sequence_base(crate::clock::now_ms()),
        )?;
        let (tx, rx) = mpsc::channel(HAND_OVER);
        Ok(Arc::new(Telemetry {
            outbox: Arc::new(outbox),
            device: settings.device.clone(),
            secret: settings.secret.clone(),
            wake: Arc::new(Notify::new()),
            hand_over: tx,
            receiver: std::sync::Mutex::new(Some(rx)),
            lost: AtomicU64::new(0),
            will_seq: AtomicU64::new(0),
        }))
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Hands `body` to the writer task without waiting. When the hand-over queue is full
    /// (the disk stalls), a window report is counted as dropped; anything else is
    /// written right here rather than lost.
    pub fn queue(&self, body: Body) {
        match self.hand_over.try_send(body) {
            Ok(()) => {}
            Err(
                mpsc::error::TrySendError::Full(body) | mpsc::error::TrySendError::Closed(body),
            ) => {
                if class_of(&body) == Class::Window {
                    self.lost.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("fleetml_agent_telemetry_dropped_total", "reason" => "hand_over_full").increment(1);
                } else if let Err(e) = self.push(body) {
                    tracing::error!(error = %e, "could not store a telemetry message");
                }
            }
        }
    }

    /// Seals `body` with the next sequence number and stores it (flushed) in the
    /// outbox; blocks on the disk.
    pub fn push(&self, body: Body) -> Result<u64, OutboxError> {
        let class = class_of(&body);
        let topic = telemetry::topic(&self.device, telemetry::Channel::of(&body));
        let ts = crate::clock::now_ms();
        let seq = self.outbox.push(class, &topic, ts, |seq| {
            telemetry::seal(&self.device, seq, ts, body.clone(), &self.secret).1
        })?;
        self.wake.notify_one();
        Ok(seq)
    }

    /// Queues `status` with the outbox's depth, drop count and current will filled in.
    pub fn queue_status(&self, mut status: Status) {
        status.outbox_depth = self.outbox.depth();
        status.dropped_windows = self.dropped_windows();
        status.will_seq = Some(self.will_seq.load(Ordering::Relaxed));
        self.queue(Body::Status(status));
    }

    /// Windows dropped, ever: for room in the outbox plus those lost before it.
    pub fn dropped_windows(&self) -> u64 {
        self.outbox.dropped().unwrap_or(0) + self.lost.load(Ordering::Relaxed)
    }

    /// Stores a status (online) and returns the last will that matches it: the same
    /// status with `online: false`, the same sequence number and time. Both name that
    /// number as the current will (`will_seq`).
    fn will(&self, mut status: Status) -> Result<LastWill, OutboxError> {
        status.online = true;
        status.outbox_depth = self.outbox.depth();
        status.dropped_windows = self.dropped_windows();
        let topic = telemetry::topic(&self.device, telemetry::Channel::Status);
        let ts = crate::clock::now_ms();
        let sealed_will = std::cell::RefCell::new(Vec::new());
        let seq = self.outbox.push(Class::Keep, &topic, ts, |seq| {
            let mut s = status.clone();
            s.will_seq = Some(seq);
            let (_, online) =
                telemetry::seal(&self.device, seq, ts, Body::Status(s.clone()), &self.secret);
            s.online = false;
            *sealed_will.borrow_mut() =
                telemetry::seal(&self.device, seq, ts, Body::Status(s), &self.secret).1;
            online
        })?;
        self.will_seq.store(seq, Ordering::Relaxed);
        self.wake.notify_one();
        Ok(LastWill::new(
            topic,
            sealed_will.into_inner(),
            QoS::AtLeastOnce,
            true,
        ))
    }

    /// Stores the run's first status and returns the MQTT options of each broker
    /// (`broker` first, then `more_brokers`), carrying the matching last will.
    fn options(&self, settings: &Settings, status: &StatusFn) -> anyhow::Result<Vec<MqttOptions>> {
        let will = self.will(status())?;
        std::iter::once(&settings.broker)
            .chain(&settings.more_brokers)
            .map(|b| self.options_at(settings, b, will.clone()))
            .collect()
    }

    fn options_at(
        &self,
        settings: &Settings,
        b: &BrokerUrl,
        will: LastWill,
    ) -> anyhow::Result<MqttOptions> {
        let mut o = MqttOptions::new(self.device.as_str(), b.host.clone(), b.port);
        o.set_keep_alive(Duration::from_secs(30));
        // A persistent session, as in earlier releases. The command subscription is QoS 0,
        // so the broker keeps no commands for the device while it is away: the publisher
        // has the puller pull each time the subscription is granted.
        o.set_clean_session(false);
        o.set_max_packet_size(telemetry::MAX_MESSAGE + 1024, telemetry::MAX_MESSAGE + 1024);
        o.set_last_will(will);
        if b.tls {
            let roots = settings.roots.clone().ok_or_else(|| {
                anyhow::anyhow!("{b}: no CA to check the broker against (tls_ca in agent.toml)")
            })?;
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(roots),
            ));
        }
        let password = b
            .password
            .clone()
            .unwrap_or_else(|| telemetry::mqtt_password(&self.secret));
        let username = b
            .username
            .clone()
            .unwrap_or_else(|| self.device.to_string());
        o.set_credentials(username, password);
        Ok(o)
    }

    /// Starts the writer, the publisher and the heartbeat; verified commands go to
    /// `commands`, which answers with an acknowledgement.
    pub fn start(
        self: &Arc<Self>,
        settings: &Settings,
        status: StatusFn,
        commands: Arc<dyn Fn(Command) -> Ack + Send + Sync>,
        progress: Option<Arc<crate::liveness::Part>>,
    ) -> anyhow::Result<()> {
        let mut options = self.options(settings, &status)?;
        let more_brokers = options.split_off(1);
        let options = options.remove(0);
        let receiver = self
            .receiver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| anyhow::anyhow!("telemetry already started"))?;
        // Writer: hand-over queue → outbox.
        let me = self.clone();
        tokio::spawn(async move {
            let mut receiver = receiver;
            while let Some(body) = receiver.recv().await {
                let me = me.clone();
                let stored = tokio::task::spawn_blocking(move || me.push(body)).await;
                if !matches!(stored, Ok(Ok(_))) {
                    tracing::error!("could not store a telemetry message");
                }
            }
        });
        let on_connect = {
            let (me, status) = (self.clone(), status.clone());
            Box::new(move || me.queue_status(status())) as Box<dyn Fn() + Send>
        };
        // What an `assignment_changed` sent before the subscription was granted (since
        // the start's pull, while the device was away or refused: a QoS 0 subscription
        // keeps nothing meanwhile) would have done: pull now. No answer goes out (no
        // command came).
        let on_subscribed = {
            let commands = commands.clone();
            Box::new(move || {
                let _ = commands(Command {
                    id: "subscribed".into(),
                    kind: telemetry::CommandKind::AssignmentChanged,
                });
            }) as Box<dyn Fn() + Send>
        };
        let on_message = {
            let me = self.clone();
            Box::new(move |topic: &str, bytes: &[u8]| me.command(topic, bytes, &*commands))
                as publisher::OnMessage
        };
        let next_will = {
            let (me, status) = (self.clone(), status.clone());
            Box::new(move || match me.will(status()) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "could not seal a new last will; the next connection keeps the old one");
                    None
                }
            }) as Box<dyn Fn() -> Option<LastWill> + Send>
        };
        let hooks = Hooks {
            subscribe: Some(telemetry::topic(&self.device, telemetry::Channel::Cmd)),
            on_connect: Some(on_connect),
            next_will: Some(next_will),
            on_message: Some(on_message),
            on_subscribed: Some(on_subscribed),
            resend_after: Some(settings.resend_after),
            progress,
            more_brokers,
        };
        tokio::spawn(publisher::run_with(
            self.outbox.clone(),
            options,
            self.wake.clone(),
            hooks,
        ));
        // Heartbeat: only while the outbox is drained (a device that is offline does
        // not fill its outbox with statuses nobody reads).
        let me = self.clone();
        let interval = settings.status_interval;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval);
            every.tick().await;
            loop {
                every.tick().await;
                if me.outbox.depth() == 0 {
                    me.queue_status(status());
                }
            }
        });
        Ok(())
    }

    /// A message on the `cmd` topic: verified with the device secret, replays refused,
    /// handled, acknowledged.
    fn command(&self, topic: &str, bytes: &[u8], handle: &(dyn Fn(Command) -> Ack + Send + Sync)) {
        let envelope = match telemetry::open(topic, bytes, |d| {
            (d == &self.device).then(|| self.secret.clone())
        }) {
            Ok(e) => e,
            Err(e) => {
                metrics::counter!("fleetml_agent_commands_refused_total").increment(1);
                tracing::warn!(error = %e, "refused a command");
                return;
            }
        };
        let c = match envelope.body {
            Body::Command(c) => c,
            // No replay check, no answer: a receipt only names stored messages (and an
            // answer would be a message to receipt in turn).
            Body::Receipt(r) => {
                metrics::counter!("fleetml_agent_receipts_total").increment(1);
                match self.outbox.receipt(&r) {
                    Ok(n) => tracing::debug!(removed = n, "receipt"),
                    Err(e) => tracing::warn!(error = %e, "could not apply a receipt"),
                }
                return;
            }
            _ => return,
        };
        match self.outbox.command_is_new(envelope.seq) {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(id = %c.id, seq = envelope.seq, "command already seen; ignored");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not record the command's sequence number"),
        }
        tracing::info!(id = %c.id, command = ?c.command, "command received");
        let ack = handle(Command {
            id: c.id,
            kind: c.command,
        });
        self.queue(Body::Ack(ack));
    }
}
