//! Drains the [`Outbox`] to an MQTT broker (groundwork of the messaging issue).
//!
//! QoS 1; a message leaves the outbox on the broker's PUBACK, or, once the control plane
//! sends receipts, when a receipt names it: one acknowledged by the broker that no receipt
//! names within [`Hooks::resend_after`] is published again. rumqttc keeps
//! unacknowledged publishes in memory and replays them on reconnect; this publisher
//! discards that replay and re-publishes from the outbox instead, in sequence order, so
//! a restart and a reconnect behave the same. Reconnects back off exponentially with
//! jitter (0.5 s to 60 s). Inference never waits on any of this.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode};
use tokio::sync::Notify;

use crate::outbox::Outbox;

/// Publishes in flight at once.
const WINDOW: usize = 32;

/// Called with the topic and payload of each message received.
pub type OnMessage = Box<dyn Fn(&str, &[u8]) + Send>;

/// What the publisher does besides draining the outbox.
#[derive(Default)]
pub struct Hooks {
    /// Subscribed after every connect, with QoS 0 ([`fleetml_device::commands::QOS`]):
    /// the device's `cmd` topic.
    pub subscribe: Option<String>,
    /// Called on every connect, before draining (the agent queues a fresh status).
    pub on_connect: Option<Box<dyn Fn() + Send>>,
    /// Called when a connection is lost: the last will the next connection carries (the
    /// agent seals a new one, so the broker's will of the lost connection, should it be
    /// published late, is recognised as stale).
    pub next_will: Option<Box<dyn Fn() -> Option<rumqttc::LastWill> + Send>>,
    /// Called with each message received on a subscribed topic.
    pub on_message: Option<OnMessage>,
    /// With [`Hooks::subscribe`], called once per connect when the broker grants the
    /// subscription (after refusing it, too): a QoS 0 subscription keeps nothing for a
    /// device that is not subscribed, so what the control plane sent before the grant
    /// (since the start's pull, while the device was away or refused) was missed, and
    /// the agent pulls its assignment. Without a subscription, called on each connect
    /// after the first.
    pub on_subscribed: Option<Box<dyn Fn() + Send>>,
    /// How long a message the broker acknowledged may wait for the control plane's
    /// receipt before it is published again ([`RESEND_AFTER`] when `None`).
    pub resend_after: Option<Duration>,
    /// Beaten on every turn of the loop (the watchdog depends on it).
    pub progress: Option<std::sync::Arc<crate::liveness::Part>>,
    /// Other nodes of a clustered broker: after a failed connection the next one is
    /// tried (round robin, starting from the options given to [`run_with`]), carrying
    /// the current last will.
    pub more_brokers: Vec<MqttOptions>,
}

/// The command subscription's QoS ([`fleetml_device::commands::QOS`]).
fn command_qos() -> QoS {
    rumqttc::qos(fleetml_device::commands::QOS).unwrap_or(QoS::AtMostOnce)
}

/// Asks the client to subscribe to the command `topic`; when its request queue is full,
/// when to try again (only the grant brings the pull, so a subscribe that was never sent
/// must be tried again).
fn subscribe_commands(client: &AsyncClient, topic: &str) -> Option<std::time::Instant> {
    client.try_subscribe(topic, command_qos()).err().map(|_| {
        tracing::warn!(topic, "could not subscribe; trying again");
        std::time::Instant::now() + backoff(1)
    })
}

/// The default of [`Hooks::resend_after`].
pub const RESEND_AFTER: Duration = Duration::from_secs(600);

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
    let mut brokers = vec![options.clone()];
    brokers.extend(hooks.more_brokers.iter().cloned());
    let mut broker = 0;
    let (client, mut events) = AsyncClient::new(options, WINDOW * 2);
    // Sequence numbers handed to the client, waiting for their packet id.
    let mut handed: VecDeque<u64> = VecDeque::new();
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut next: u64 = 0;
    let mut connected = false;
    // When missed commands call for `on_subscribed`.
    let mut subscription = fleetml_device::commands::Subscription::default();
    let mut failures: u32 = 0;
    // The broker refused the command subscription (SUBACK 0x80: an ACL, an overloaded
    // node), or the subscription could not be handed to the client: subscribe again
    // then, with back-off.
    let mut resubscribe_at: Option<std::time::Instant> = None;
    // Acknowledged by the broker, never confirmed by the control plane: published again
    // before anything new.
    let resend_after = hooks.resend_after.unwrap_or(RESEND_AFTER);
    let mut resend: VecDeque<u64> = VecDeque::new();
    // Often: what two receipts skipped is due at once, one after the grace.
    let mut overdue_check = tokio::time::interval(
        (resend_after / 4).clamp(Duration::from_millis(250), Duration::from_secs(2)),
    );
    overdue_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some(p) = &hooks.progress {
            p.beat();
        }
        if connected {
            while WINDOW > handed.len() + inflight.len() {
                let Some(seq) = resend.pop_front() else { break };
                match outbox.get(seq) {
                    Ok(Some(m)) => {
                        let retain = m.topic.ends_with("/status");
                        if client
                            .try_publish(m.topic, QoS::AtLeastOnce, retain, m.payload)
                            .is_err()
                        {
                            resend.push_front(seq);
                            break;
                        }
                        outbox.mark_inflight(seq);
                        handed.push_back(seq);
                        metrics::counter!("fleetml_agent_telemetry_republished_total").increment(1);
                    }
                    // Named by a receipt (or dropped for room) meanwhile.
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "reading the outbox"),
                }
            }
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
                    resend.clear();
                    next = 0;
                    connected = true;
                    failures = 0;
                    resubscribe_at = None;
                    tracing::info!("telemetry connected");
                    if let Some(topic) = &hooks.subscribe {
                        resubscribe_at = subscribe_commands(&client, topic);
                    }
                    if let Some(f) = &hooks.on_connect {
                        f();
                    }
                    if subscription.connected(hooks.subscribe.is_some()).is_some()
                        && let Some(f) = &hooks.on_subscribed
                    {
                        f();
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                        let wait = backoff(subscription.refused());
                        tracing::warn!(
                            topic = hooks.subscribe.as_deref().unwrap_or(""),
                            retry_in_ms = wait.as_millis() as u64,
                            "the broker refused the command subscription; subscribing again (commands meanwhile come from the assignment poll)"
                        );
                        metrics::counter!("fleetml_agent_command_subscribe_refused_total").increment(1);
                        resubscribe_at = Some(std::time::Instant::now() + wait);
                    } else if let Some(missed) = subscription.granted() {
                        if missed == fleetml_device::commands::Missed::WhileRefused {
                            tracing::info!("the broker granted the command subscription");
                        }
                        if let Some(f) = &hooks.on_subscribed {
                            f();
                        }
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
                        let acked = tokio::task::spawn_blocking(move || outbox.ack(seq, std::time::Instant::now())).await;
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
                        if let Some(will) = hooks.next_will.as_ref().and_then(|f| f()) {
                            events.mqtt_options.set_last_will(will);
                        }
                    }
                    connected = false;
                    outbox.clear_inflight();
                    if brokers.len() > 1 {
                        broker = (broker + 1) % brokers.len();
                        let mut next = brokers[broker].clone();
                        if let Some(will) = events.mqtt_options.last_will() {
                            next.set_last_will(will);
                        }
                        let (host, port) = next.broker_address();
                        tracing::info!(error = %e, host, port, "trying the next broker");
                        events.mqtt_options = next;
                    }
                    failures = failures.saturating_add(1);
                    metrics::counter!("fleetml_agent_telemetry_connect_failures_total").increment(1);
                    metrics::counter!("fleetml_agent_telemetry_publish_failures_total")
                        .increment((handed.len() + inflight.len()) as u64);
                    tokio::time::sleep(backoff(failures)).await;
                }
            },
            _ = wake.notified(), if connected => {}
            _ = overdue_check.tick(), if connected => {
                if resubscribe_at.is_some_and(|at| std::time::Instant::now() >= at) {
                    resubscribe_at = hooks
                        .subscribe
                        .as_deref()
                        .and_then(|topic| subscribe_commands(&client, topic));
                }
                let due = outbox.overdue(resend_after, std::time::Instant::now());
                if !due.is_empty() {
                    tracing::warn!(
                        messages = due.len(),
                        first = due[0],
                        "messages the broker acknowledged did not reach the control plane (receipts skipped them, or none came within {} s); publishing them again",
                        resend_after.as_secs()
                    );
                    resend.extend(due);
                }
            }
        }
        metrics::gauge!("fleetml_agent_outbox_depth").set(outbox.depth() as f64);
        metrics::gauge!("fleetml_agent_outbox_oldest_age_seconds")
            .set(outbox.oldest_age_ms(crate::clock::now_ms()).unwrap_or(0) as f64 / 1000.0);
        // A count kept in the outbox across restarts: a counter, set to its total.
        metrics::counter!("fleetml_agent_outbox_dropped_windows_total")
            .absolute(outbox.dropped().unwrap_or(0));
    }
}

/// Exponential back-off with jitter: between half and all of 0.5 s · 2^(failures−1),
/// capped at 60 s.
pub fn backoff(failures: u32) -> Duration {
    // A cheap jitter source: the clock's nanoseconds.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    fleetml_device::backoff::reconnect(failures, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command subscribe the client could not take (its request queue full, the event
    /// loop busy) is given a time to be tried again, on the connect path and the timer's.
    #[test]
    fn a_subscribe_the_client_cannot_take_is_tried_again() {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let _in_runtime = rt.enter();
        let (client, _events) = AsyncClient::new(MqttOptions::new("pi", "127.0.0.1", 1), 1);
        let before = std::time::Instant::now();
        assert_eq!(
            subscribe_commands(&client, "fleetml/v1/pi/cmd"),
            None,
            "taken"
        );
        let again = subscribe_commands(&client, "fleetml/v1/pi/cmd").expect("a retry time");
        // The reconnect back-off after one failure: 0.25–0.5 s.
        assert!(
            again >= before + Duration::from_millis(250),
            "{:?}",
            again - before
        );
        assert!(again <= std::time::Instant::now() + Duration::from_millis(500));
    }
}
