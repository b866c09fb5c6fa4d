//! The records the control plane keeps about devices: who they are (enrolment) and
//! what their messages say (derived state). Plain data, shared by the ingest, the
//! store, the rollout engine and the views.

use std::collections::{BTreeMap, BTreeSet};

use fleetml_protocol::telemetry::{self, DeviceId, Status, WindowReport};
use serde::{Deserialize, Serialize};

mod brief;
pub use brief::Brief;

/// A device in the registry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    #[serde(default)]
    pub board: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The device secret (HMAC key of its messages).
    #[serde(with = "serde_bytes")]
    pub secret: Vec<u8>,
    pub enrolled_ms: u64,
    /// When an admin revoked it (`fleetctl devices revoke`): its logins, tokens and
    /// messages are refused from then on, until it is rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

impl DeviceRecord {
    /// Its secret, unless it is revoked: what every check of a device's credentials uses.
    pub fn live_secret(&self) -> Option<&[u8]> {
        self.revoked_ms.is_none().then_some(self.secret.as_slice())
    }
}

impl std::fmt::Debug for DeviceRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRecord")
            .field("id", &self.id)
            .field("board", &self.board)
            .field("tags", &self.tags)
            .field("enrolled_ms", &self.enrolled_ms)
            .finish_non_exhaustive()
    }
}

/// What the control plane knows of a device from its messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub online: bool,
    /// When the control plane last received an authenticated message from it.
    pub last_seen_ms: Option<u64>,
    /// When its last will arrived.
    pub offline_since_ms: Option<u64>,
    /// The newest status and its sequence number.
    pub status: Option<(u64, Status)>,
    /// The newest window report of each model, with its sequence number.
    pub windows: BTreeMap<String, (u64, WindowReport)>,
    /// Open alerts per model (from alert messages and window reports).
    pub alerts: BTreeMap<String, BTreeSet<String>>,
    pub stored: u64,
    pub duplicates: u64,
    pub gaps: u64,
    /// Highest sequence number stored.
    pub last_seq: u64,
    /// The newest lifecycle events (up to [`LIFECYCLE_KEPT`]), with when they arrived.
    #[serde(default)]
    pub lifecycle: Vec<(u64, telemetry::Event)>,
    /// The sequence number of the last will the device's newest status names: a will
    /// numbered lower belongs to a connection that is gone, and is ignored.
    #[serde(default)]
    pub will_seq: u64,
    /// Times its sequence numbers jumped to a new base (a new outbox: data dir wiped).
    #[serde(default)]
    pub sequence_restarts: u64,
}

/// Lifecycle events kept per device in its state (all are in the message log).
pub const LIFECYCLE_KEPT: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("role `{s}` is not one of viewer, operator, admin")),
        }
    }
}

/// A stored operator token (its hash, never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the token.
    pub hash: String,
    pub created_ms: u64,
    pub created_by: String,
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at_ms: u64,
    pub who: String,
    pub role: String,
    /// `METHOD /route/{template}`.
    pub action: String,
    /// The path called.
    pub target: String,
    /// HTTP status of the answer.
    pub outcome: u16,
    /// Hex SHA-256 of the previous entry (zeros for the first).
    pub prev: String,
    /// Hex SHA-256 over `prev` and every field above.
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub model: String,
    /// Share of the devices running the model that must be alerting (0..1).
    #[serde(default = "default_share")]
    pub drift_share: f64,
    /// For how long, in seconds.
    #[serde(default = "default_for")]
    pub for_s: u64,
    /// Original training data (dataset ids) added to the captured rows.
    #[serde(default)]
    pub datasets: Vec<String>,
    /// Labelled rows captured within this many seconds before the trigger.
    #[serde(default = "default_since")]
    pub captured_since_s: u64,
    #[serde(default = "default_cooldown")]
    pub cooldown_s: u64,
    #[serde(default = "default_max_jobs")]
    pub max_jobs: usize,
    /// Start a canary rollout of a candidate that beats production (default off).
    #[serde(default)]
    pub auto_promote: bool,
    /// Dataset the challenger is compared on (needed for auto_promote).
    #[serde(default)]
    pub holdout: Option<String>,
    /// Label column of the holdout (default: the job spec's label).
    #[serde(default)]
    pub label: Option<String>,
    /// How much better the challenger must be on the deciding metric.
    #[serde(default = "default_margin")]
    pub margin: f64,
    #[serde(default = "default_canary")]
    pub canary_pct: u32,
    /// A winning candidate runs first as a shadow beside what every device serves (a
    /// shadow rollout whose waves are the canary's, auto-rollback on); an operator's
    /// `fleetctl rollout promote` then starts the canary.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow_first: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A job spec (TOML) to keep as the model's (only in requests).
    #[serde(default, skip_serializing)]
    pub spec: Option<String>,
}

fn default_share() -> f64 {
    0.2
}
fn default_for() -> u64 {
    1800
}
fn default_since() -> u64 {
    7 * 86_400
}
fn default_cooldown() -> u64 {
    6 * 3600
}
fn default_max_jobs() -> usize {
    1
}
fn default_margin() -> f64 {
    0.01
}
fn default_canary() -> u32 {
    5
}
fn yes() -> bool {
    true
}

/// What the engine remembers per model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    /// Since when the share has been at or above the threshold.
    pub breach_since_ms: Option<u64>,
    pub last_trigger_ms: Option<u64>,
    /// Jobs this policy started, and whether their outcome was handled.
    pub jobs: Vec<(String, bool)>,
    pub last_share: f64,
    pub events: Vec<(u64, String)>,
}

/// One pushed model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub name: String,
    pub version: u64,
    pub label: String,
    /// SHA-256 of the bundle file, hex: its name in the blob directory.
    pub digest: String,
    pub size: u64,
    pub signed_by: Vec<String>,
    pub pushed_ms: u64,
    pub stage: String,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureRecord {
    pub device: DeviceId,
    pub seq: u64,
    pub model: String,
    /// `sampled` or `labelled`.
    pub kind: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
    pub received_ms: u64,
    pub first_ts_ms: u64,
    pub last_ts_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnInfo {
    pub name: String,
    /// `number` or `text`.
    pub kind: String,
}

/// What a dataset is, kept next to its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetManifest {
    /// SHA-256 of the Parquet file: the dataset's name.
    pub id: String,
    /// A human label (not unique).
    pub name: String,
    pub created_ms: u64,
    /// Where the rows came from (files, queries, captures, other datasets).
    pub sources: Vec<String>,
    /// Devices whose captured data is in it.
    #[serde(default)]
    pub devices: Vec<String>,
    /// First and last capture time, when known.
    #[serde(default)]
    pub time_range: Option<(u64, u64)>,
    pub rows: u64,
    pub bytes: u64,
    pub schema: Vec<ColumnInfo>,
    /// Row filters applied (`drop_na(a,b)`).
    #[serde(default)]
    pub filters: Vec<String>,
}

/// One alert the notifier keeps: a condition a rule watches, from when it was first seen
/// until it was resolved and every receiver was told, and what each receiver was told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// Its fingerprint: hex of the first 8 bytes of SHA-256 over its labels.
    pub key: String,
    /// `alertname` (the rule), `severity`, and what the condition is about (device,
    /// model, board, rollout, job…).
    pub labels: BTreeMap<String, String>,
    /// What a person reads: `summary`, and details that may change while it fires.
    pub annotations: BTreeMap<String, String>,
    /// When the condition was first seen in this episode.
    pub seen_ms: u64,
    /// When it fired (after the rule's `for`); `None` while pending.
    pub fired_ms: Option<u64>,
    /// When its condition cleared.
    pub resolved_ms: Option<u64>,
    /// A one-off happening (a rollout completed, a job finished): fires once, never
    /// resolves.
    pub event: bool,
    /// What each receiver (by name) was told.
    pub told: BTreeMap<String, Told>,
}

/// What one receiver was told of one alert.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Told {
    /// The state it last received: `firing` or `resolved`.
    pub state: Option<String>,
    /// When it last received it.
    pub at_ms: u64,
    /// Failed deliveries since the last that went through.
    pub attempts: u32,
    /// No new attempt before this time (back-off after failures).
    pub retry_ms: u64,
    /// Why the last attempt failed.
    pub error: Option<String>,
}

/// A silence: alerts whose labels match every matcher are not sent while it lasts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    /// Label name → value, all of which must match.
    pub matchers: BTreeMap<String, String>,
    pub starts_ms: u64,
    pub ends_ms: u64,
    pub by: String,
    pub comment: String,
}

impl Silence {
    /// Whether it silences an alert with `labels` at `now_ms`.
    pub fn silences(&self, labels: &BTreeMap<String, String>, now_ms: u64) -> bool {
        self.starts_ms <= now_ms
            && now_ms < self.ends_ms
            && self
                .matchers
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }
}
