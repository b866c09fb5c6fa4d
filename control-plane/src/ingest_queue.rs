//! The ingest as a JetStream work queue on a NATS cluster (`fleetctl serve
//! --ingest-queue nats://…`).
//!
//! NATS speaks MQTT 3.1.1 to devices but has no MQTT shared subscriptions, so replicas
//! on a NATS cluster cannot split the telemetry with `$share/…` as they do on
//! mosquitto. NATS turns every MQTT publish into a message on a subject (`/` becomes
//! `.`, `.` becomes `//`); a JetStream stream with work-queue retention captures the
//! devices' three uplink channels, replicated on up to three nodes, and every replica
//! pulls from one durable consumer. A message goes to one replica at a time and leaves
//! the stream when that replica acknowledges it, which it does once the batch is stored
//! and flushed; what a replica took and never acknowledged (it died mid-batch) goes to
//! another after [`ACK_WAIT`]. The ingest's de-duplication by (device, seq) absorbs the
//! redelivered copies, and the devices' receipts still decide what leaves an outbox.
//!
//! Commands and receipts still go out over MQTT (`--mqtt-url`, the same cluster's MQTT
//! port), so devices never see NATS itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use fleetml_protocol::telemetry::{self, Channel};
use futures_util::StreamExt;

use crate::plane::Plane;

/// The stream that captures the devices' messages.
pub const STREAM: &str = "FLEETML_INGEST";
/// The durable consumer every replica pulls from.
pub const CONSUMER: &str = "fleetml-ingest";
/// The prefix of the queue connection's reply subjects (not NATS's shared `_INBOX`, so
/// that the queue's NATS user may read its own replies and nobody else's).
pub const INBOX: &str = "_INBOX_fleetml";
/// How long a replica may hold a message without acknowledging it before JetStream
/// hands it to another.
pub const ACK_WAIT: Duration = Duration::from_secs(10);
/// At most this many messages stored and acknowledged together.
const BATCH: usize = 256;

/// The subjects the stream captures: each device's `status`, `telemetry` and `events`
/// (not `cmd`, which the control plane sends).
pub fn subjects() -> Vec<String> {
    let prefix = telemetry::TOPIC_PREFIX.replace('/', ".");
    [Channel::Status, Channel::Telemetry, Channel::Events]
        .iter()
        .map(|c| format!("{prefix}.*.{}", c.as_str()))
        .collect()
}

/// The MQTT topic a NATS subject came from: NATS maps `/` to `.` and `.` to `//`.
pub fn topic_of(subject: &str) -> String {
    subject
        .split('.')
        .map(|token| token.replace("//", "."))
        .collect::<Vec<_>>()
        .join("/")
}

/// Where the queue is and how to reach it.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// `nats://[USER:PASSWORD@]HOST:PORT` (or `tls://`), one or more nodes of the
    /// cluster; the client learns the others from the first it reaches.
    pub urls: Vec<String>,
    /// CA of the cluster's certificate (PEM); default the system's roots.
    pub ca: Option<PathBuf>,
    /// Copies of the stream kept by the cluster (1 to 5; default: up to 3, as many as
    /// the cluster has nodes).
    pub replicas: Option<usize>,
}

impl QueueOptions {
    /// Parses `--ingest-queue`'s comma-separated list, refusing anything but `nats://`
    /// and `tls://` URLs.
    pub fn parse(list: &str) -> Result<Vec<String>, String> {
        let urls: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if urls.is_empty() {
            return Err("--ingest-queue: name at least one nats://HOST:PORT".into());
        }
        for u in &urls {
            let ok = ["nats://", "tls://"].iter().any(|s| u.starts_with(s))
                && u.parse::<async_nats::ServerAddr>().is_ok();
            if !ok {
                let shown = without_password(u);
                return Err(format!(
                    "--ingest-queue {shown}: expected nats://[USER:PASSWORD@]HOST:PORT or tls://…, \
                     comma-separated for several nodes"
                ));
            }
        }
        Ok(urls)
    }
}

impl QueueOptions {
    /// The user and password the queue logs in with (the first URL that names them, as
    /// [`connect`] takes them); `None` when it connects anonymously.
    pub fn login(&self) -> Option<(String, String)> {
        self.urls.iter().find_map(|u| split_credentials(u).1)
    }
}

/// `url` with its user information (a password) left out, for messages.
fn without_password(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://…{}", &url[at..]),
        _ => url.to_string(),
    }
}

/// `url` without its user information, and that information as (user, password).
fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.rsplit_once('@')
    {
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        return (
            format!("{scheme}://{host}"),
            Some((user.to_string(), password.to_string())),
        );
    }
    (url.to_string(), None)
}

async fn connect(opts: &QueueOptions) -> anyhow::Result<async_nats::Client> {
    let mut connect = async_nats::ConnectOptions::new()
        .name("fleetml-control-ingest")
        .custom_inbox_prefix(INBOX)
        .connection_timeout(Duration::from_secs(10))
        // async-nats reports every failed reconnect at INFO; once is enough here.
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("the NATS ingest queue's connection was lost; reconnecting")
                }
                async_nats::Event::Connected => {
                    tracing::info!("connected to the NATS ingest queue")
                }
                other => tracing::debug!(event = %other, "NATS"),
            }
        });
    if let Some(ca) = &opts.ca {
        connect = connect.add_root_certificates(ca.clone());
    }
    if opts.urls.iter().any(|u| u.starts_with("tls://")) {
        connect = connect.require_tls(true);
    }
    // The credentials go to the client apart from the addresses, which it logs.
    let mut addrs: Vec<async_nats::ServerAddr> = Vec::with_capacity(opts.urls.len());
    let mut login = None;
    for u in &opts.urls {
        let (bare, credentials) = split_credentials(u);
        login = login.or(credentials);
        addrs.push(
            bare.parse()
                .with_context(|| format!("--ingest-queue {bare}: not a NATS URL"))?,
        );
    }
    if let Some((user, password)) = login {
        connect = connect.user_and_password(user, password);
    }
    connect
        .connect(addrs)
        .await
        .context("connecting to the NATS ingest queue")
}

/// The stream (made when missing, as it is when present: an operator may have made it
/// with other limits) and its durable pull consumer.
async fn consumer(
    client: &async_nats::Client,
    replicas: Option<usize>,
) -> anyhow::Result<consumer::PullConsumer> {
    let js = jetstream::new(client.clone());
    // As many copies as the cluster has nodes, up to 3: JetStream refuses more
    // replicas than it has nodes, so the first count it accepts is the one. Only that
    // refusal steps down: any other failure (a cluster still electing its leader, a
    // timed-out request) is returned, and the caller tries again from 3, so that a
    // slow start never leaves a three-node cluster with fewer copies.
    let counts = match replicas {
        Some(n) => vec![n],
        None => vec![3, 2, 1],
    };
    let (mut made, mut refused) = (None, None);
    for n in counts {
        let created = js
            .get_or_create_stream(stream::Config {
                name: STREAM.into(),
                subjects: subjects(),
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: n,
                // What waits here is also in the devices' outboxes until a receipt
                // names it: the queue need not hold it forever.
                max_age: Duration::from_secs(24 * 3600),
                max_bytes: 1 << 30,
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            })
            .await;
        let failed =
            |e: jetstream::context::CreateStreamError| anyhow::anyhow!("{e} ({n} replicas)");
        match created {
            Ok(s) => {
                made = Some(s);
                break;
            }
            Err(e) if too_few_nodes(&e) => {
                tracing::warn!(
                    stream = STREAM,
                    replicas = n,
                    error = %e,
                    "the cluster has too few nodes for this many copies of the stream"
                );
                refused = Some(failed(e));
            }
            Err(e) => {
                return Err(failed(e).context(format!("creating the JetStream stream {STREAM}")));
            }
        }
    }
    let Some(mut stream) = made else {
        let e = refused
            .unwrap_or_else(|| anyhow::anyhow!("--ingest-queue-replicas: no replica count to try"));
        return Err(e.context(format!("creating the JetStream stream {STREAM}")));
    };
    let info = stream
        .info()
        .await
        .context("reading the stream's configuration")?;
    tracing::info!(
        stream = STREAM,
        replicas = info.config.num_replicas,
        "the ingest queue's stream"
    );
    stream
        .get_or_create_consumer(
            CONSUMER,
            consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("creating the JetStream consumer {CONSUMER}"))
}

/// Whether JetStream refused a stream because the cluster has fewer nodes than the
/// replicas asked for: "no suitable peers for placement" (nats-server 2.9 and later),
/// "insufficient resources" (before), or a single server's refusal of any replicas
/// beyond one.
fn too_few_nodes(e: &jetstream::context::CreateStreamError) -> bool {
    use jetstream::ErrorCode;
    match e.kind() {
        jetstream::context::CreateStreamErrorKind::JetStream(j) => matches!(
            j.error_code(),
            ErrorCode::CLUSTER_NO_PEERS
                | ErrorCode::INSUFFICIENT_RESOURCES
                | ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED
        ),
        _ => false,
    }
}

/// Pulls, stores and acknowledges until the connection or the stream fails.
async fn pull(plane: &Arc<Plane>, consumer: consumer::PullConsumer) -> anyhow::Result<()> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(BATCH * 2)
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await
        .context("pulling from the JetStream consumer")?
        .ready_chunks(BATCH);
    plane
        .ingest
        .counters
        .connected
        .store(true, Ordering::Relaxed);
    tracing::info!(
        stream = STREAM,
        consumer = CONSUMER,
        "ingest pulling from NATS"
    );
    while let Some(chunk) = messages.next().await {
        let mut batch = Vec::with_capacity(chunk.len());
        for m in chunk {
            batch.push(m.map_err(|e| anyhow::anyhow!("receiving from JetStream: {e}"))?);
        }
        let p = plane.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let topics: Vec<String> = batch.iter().map(|m| topic_of(&m.subject)).collect();
            let stored = p.ingest.store_batch(
                topics
                    .iter()
                    .zip(&batch)
                    .map(|(t, m)| (t.as_str(), &m.payload[..])),
                crate::plane::now_ms(),
            );
            match stored {
                Ok(()) => Ok(batch),
                Err(e) => Err((e, batch)),
            }
        })
        .await
        .context("the ingest task failed")?;
        match stored {
            Ok(batch) => {
                for m in &batch {
                    m.ack()
                        .await
                        .map_err(|e| anyhow::anyhow!("acknowledging to JetStream: {e}"))?;
                }
            }
            Err((e, batch)) => {
                // Handed to a replica again at once rather than after ACK_WAIT.
                tracing::error!(error = %e, "storing telemetry failed");
                for m in &batch {
                    let _ = m.ack_with(jetstream::AckKind::Nak(None)).await;
                }
            }
        }
    }
    anyhow::bail!("the JetStream consumer's message stream ended")
}

/// Runs the ingest against the queue for as long as the process lives, reconnecting
/// with back-off.
pub fn spawn(plane: Arc<Plane>, opts: QueueOptions) {
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let run = async {
                let client = connect(&opts).await?;
                let consumer = consumer(&client, opts.replicas).await?;
                failures = 0;
                pull(&plane, consumer).await
            };
            if let Err(e) = run.await {
                plane
                    .ingest
                    .counters
                    .connected
                    .store(false, Ordering::Relaxed);
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "the NATS ingest queue failed; reconnecting"
                    );
                }
                tokio::time::sleep(crate::plane::reconnect_wait(failures)).await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_map_back_to_topics() {
        assert_eq!(
            topic_of("fleetml.v1.cam-01.telemetry"),
            "fleetml/v1/cam-01/telemetry"
        );
        // A device id with dots: NATS writes each `.` of the topic as `//`.
        assert_eq!(
            topic_of("fleetml.v1.site//a//cam.status"),
            "fleetml/v1/site.a.cam/status"
        );
        assert_eq!(
            subjects(),
            [
                "fleetml.v1.*.status",
                "fleetml.v1.*.telemetry",
                "fleetml.v1.*.events"
            ]
        );
    }

    #[test]
    fn credentials_leave_the_address() {
        assert_eq!(
            split_credentials("nats://fleet:s3cret@n1:4222"),
            (
                "nats://n1:4222".to_string(),
                Some(("fleet".to_string(), "s3cret".to_string()))
            )
        );
        assert_eq!(
            split_credentials("tls://n1:4222"),
            ("tls://n1:4222".to_string(), None)
        );
    }

    #[test]
    fn only_nats_urls_are_taken_and_passwords_stay_out_of_errors() {
        assert_eq!(
            QueueOptions::parse("nats://a:4222, nats://b:4222").expect("two"),
            ["nats://a:4222", "nats://b:4222"]
        );
        let e = QueueOptions::parse("mqtt://u:hunter2@a:1883").expect_err("mqtt");
        assert!(e.contains("nats://"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        assert!(QueueOptions::parse(" , ").is_err());
    }
}
