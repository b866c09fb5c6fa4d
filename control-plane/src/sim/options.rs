//! What `fleetctl sim` is asked to do (`Options`, `Broker`) and the agent defaults the
//! simulated devices use.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// Publishes in flight per device (the agent's publisher window).
pub(super) const WINDOW: usize = 32;
/// Devices in their MQTT handshake at once: a fleet powering up over a few seconds
/// rather than 10,000 SYNs in the same millisecond.
pub(super) const CONNECTING: usize = 256;
/// Enrollment calls in flight at once.
pub(super) const ENROLLING: usize = 16;
/// The agent's default `assignment_poll_s`.
pub(super) const POLL: Duration = Duration::from_secs(300);
/// The agent's default `status_interval_s`.
pub(super) const STATUS_INTERVAL: Duration = Duration::from_secs(300);
/// The agent's default `telemetry_resend_after_s`.
pub(super) const RESEND_AFTER: Duration = Duration::from_secs(600);
/// The model rolled out, and its versions.
pub(super) const MODEL: &str = "claims";
pub(super) const BOARDS: [&str; 3] = ["raspberry-pi-4", "generic-x86_64", "jetson-orin-nano"];
/// How long any single HTTP exchange may take.
pub(super) const HTTP_TIMEOUT: Duration = Duration::from_secs(300);

/// Which broker the devices and the ingest use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Broker {
    /// rumqttd inside `fleetctl serve`.
    Embedded,
    /// A private mosquitto started by the simulator (`fleetctl serve --mqtt-url`).
    Mosquitto,
    /// A private three-node NATS cluster with JetStream and MQTT started by the
    /// simulator: devices spread over the nodes, each control-plane replica's MQTT
    /// session on one of them and its ingest pulling from the JetStream work queue
    /// (`serve --ingest-queue`).
    Nats,
}

/// Nodes of the simulator's NATS cluster.
pub(super) const NATS_NODES: usize = 3;

impl std::str::FromStr for Broker {
    type Err = String;
    fn from_str(s: &str) -> Result<Broker, String> {
        match s {
            "embedded" => Ok(Broker::Embedded),
            "mosquitto" => Ok(Broker::Mosquitto),
            "nats" => Ok(Broker::Nats),
            _ => Err(format!("broker `{s}`: use embedded, mosquitto or nats")),
        }
    }
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    pub devices: usize,
    pub broker: Broker,
    /// The mosquitto executable (default: found in /usr/sbin, /usr/bin or PATH).
    pub mosquitto: Option<PathBuf>,
    /// The nats-server executable (default: found in /usr/sbin, /usr/bin or PATH).
    pub nats: Option<PathBuf>,
    /// `postgres://…`: the control plane's store (`serve --database`); None: sled.
    pub database: Option<String>,
    /// Control-plane replicas (`serve --replica-id`), all on `database` and `blobs`.
    pub replicas: usize,
    /// Where bundles are kept (`serve --blobs`: a folder, or `s3://BUCKET/PREFIX` with
    /// the endpoint and credentials from the environment); None: a folder in the work
    /// directory that every replica shares.
    pub blobs: Option<String>,
    /// Telemetry messages per device per second (window reports, or heartbeats).
    pub rate: f64,
    /// Length of the steady phase.
    pub duration: Duration,
    /// Work directory (kept); default a temporary one, removed at the end.
    pub dir: Option<PathBuf>,
    /// Device HTTP requests (assignment fetches, bundle downloads) in flight at once.
    pub http_concurrency: usize,
}
