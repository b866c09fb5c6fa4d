//! Drains the [`Outbox`] to an MQTT broker (groundwork of the messaging issue).
//!
//! QoS 1; a message leaves the outbox only on the broker's PUBACK. rumqttc keeps
//! unacknowledged publishes in memory and replays them on reconnect; this publisher
//! discards that replay and re-publishes from the outbox instead, in sequence order, so
//! a restart and a reconnect behave the same. Reconnects back off exponentially with
//! jitter (0.5 s to 60 s). Inference never waits on any of this.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::Notify;

use crate::outbox::Outbox;

/// Publishes in flight at once.
const WINDOW: usize = 32;

/// Called with the topic and payload of each message received.
pub type OnMessage = Box<dyn Fn(&str, &[u8]) + Send>;

/// What the publisher does besides draining the outbox.
#[derive(Default)]
pub struct Hooks {
    /// Subscribed (QoS 1) after every connect: the device's `cmd` topic.
    pub subscribe: Option<String>,
    /// Called on every connect, before draining (the agent queues a fresh status).
    pub on_connect: Option<Box<dyn Fn() + Send>>,
    /// Called with each message received on a subscribed topic.
    pub on_message: Option<OnMessage>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("subscribe", &self.subscribe)
            .finish_non_exhaustive()
    }
}

/// Publishes the outbox's messages until the task is dropped. `wake` is notified by
/// whoever pushes a message.
pub async fn run(outbox: Arc<Outbox>, options: MqttOptions, wake: Arc<Notify>) {
    run_with(outbox, options, wake, Hooks::default()).await
}

/// [`run`], with [`Hooks`]. Messages on `…/status` topics are published retained.
pub async fn run_with(outbox: Arc<Outbox>, options: MqttOptions, wake: Arc<Notify>, hooks: Hooks) {
    let (client, mut events) = AsyncClient::new(options, WINDOW * 2);
    // Sequence numbers handed to the client, waiting for their packet id.
    let mut handed: VecDeque<u64> = VecDeque::new();
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut next: u64 = 0;
    let mut connected = false;
    let mut failures: u32 = 0;
    loop {
        if connected {
            // Top the window up from the outbox.
            let room = WINDOW.saturating_sub(handed.len() + inflight.len());
            if room > 0 {
                match outbox.pending_from(next, room) {
                    Ok(batch) => {
                        for m in batch {
                            let retain = m.topic.ends_with("/status");
                            if client
                                .try_publish(m.topic, QoS::AtLeastOnce, retain, m.payload)
                                .is_err()
                            {
                                break;
                            }
                            outbox.mark_inflight(m.seq);
                            handed.push_back(m.seq);
                            next = m.seq + 1;
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "reading the outbox"),
                }
            }
        }
        tokio::select! {
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // Drop rumqttc's own replay: the outbox is the source of truth.
                    events.pending.clear();
                    outbox.clear_inflight();
                    handed.clear();
                    inflight.clear();
                    next = 0;
                    connected = true;
                    failures = 0;
                    tracing::info!("telemetry connected");
                    if let Some(topic) = &hooks.subscribe
                        && client.try_subscribe(topic.clone(), QoS::AtLeastOnce).is_err()
                    {
                        tracing::warn!(topic, "could not subscribe");
                    }
                    if let Some(f) = &hooks.on_connect {
                        f();
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(f) = &hooks.on_message {
                        f(&p.topic, &p.payload);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(seq) = handed.pop_front() {
                        inflight.insert(pkid, seq);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(seq) = inflight.remove(&ack.pkid) {
                        let outbox = outbox.clone();
                        let acked = tokio::task::spawn_blocking(move || outbox.ack(seq)).await;
                        if !matches!(acked, Ok(Ok(()))) {
                            tracing::error!(seq, "could not remove an acknowledged message");
                        }
                        metrics::counter!("fleetml_agent_telemetry_published_total").increment(1);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        tracing::warn!(error = %e, "telemetry disconnected");
                    }
                    connected = false;
                    outbox.clear_inflight();
                    failures = failures.saturating_add(1);
                    metrics::counter!("fleetml_agent_telemetry_connect_failures_total").increment(1);
                    metrics::counter!("fleetml_agent_telemetry_publish_failures_total")
                        .increment((handed.len() + inflight.len()) as u64);
                    tokio::time::sleep(backoff(failures)).await;
                }
            },
            _ = wake.notified(), if connected => {}
        }
        metrics::gauge!("fleetml_agent_outbox_depth").set(outbox.depth() as f64);
        metrics::gauge!("fleetml_agent_outbox_oldest_age_seconds")
            .set(outbox.oldest_age_ms().unwrap_or(0) as f64 / 1000.0);
        metrics::gauge!("fleetml_agent_outbox_dropped_windows")
            .set(outbox.dropped().unwrap_or(0) as f64);
    }
}

/// Exponential back-off with jitter: between half and all of 0.5 s · 2^(failures−1),
/// capped at 60 s.
pub fn backoff(failures: u32) -> Duration {
    let cap_ms = (500u64 << failures.saturating_sub(1).min(7)).min(60_000);
    // A cheap jitter source: the clock's nanoseconds.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    Duration::from_millis(cap_ms / 2 + nanos % (cap_ms / 2 + 1))
}
