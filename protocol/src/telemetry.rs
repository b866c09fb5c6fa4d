//! Device ↔ control-plane messages over MQTT: the topic layout, the CBOR messages, and
//! their authenticator.
//!
//! Topics (`v1` is the layout's version):
//!
//! | topic | direction | carries |
//! |---|---|---|
//! | `fleetml/v1/{device}/status` | device → cloud, retained | [`Body::Status`] |
//! | `fleetml/v1/{device}/telemetry` | device → cloud | [`Body::Window`], [`Body::Alert`] |
//! | `fleetml/v1/{device}/events` | device → cloud | [`Body::Event`], [`Body::Ack`] |
//! | `fleetml/v1/{device}/cmd` | cloud → device | [`Body::Command`], [`Body::Receipt`] |
//!
//! Every message is one CBOR map `{v: 2, msg, auth}`: `msg` is a byte string holding the
//! CBOR of the [`Envelope`]'s fields — format, device id, a per-device sequence number
//! that survives restarts, a timestamp, the body — and `auth` the HMAC-SHA256 of exactly
//! those bytes, keyed by the 32-byte secret issued at enrollment. A receiver checks the
//! bytes it received, never a re-encoding, so any CBOR library can verify a message.
//! Format 1 (the fields and `auth` in one map, the MAC over their re-encoding) is still
//! read, from agents of earlier versions, and never written.
//! [`open`] refuses (and the caller counts) a message that is too large, not CBOR, of
//! another format, from a device other than its topic names, or whose authenticator does
//! not verify — before anything of it is stored.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Version of [`Envelope`] on the wire.
pub const FORMAT: u16 = 2;
/// The first format: still accepted by [`open`], never written.
pub const FORMAT_V1: u16 = 1;
/// First segments of every topic.
pub const TOPIC_PREFIX: &str = "fleetml/v1";
/// Largest message [`open`] decodes.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// Length of a device secret.
pub const SECRET_LEN: usize = 32;

/// Where a new outbox starts numbering its messages: the clock in ms times 2^20. A device
/// whose data directory is wiped starts again above every number it used before (unless
/// its clock went back, or it sent more than 2^20 messages per millisecond since), so its
/// messages are stored, not taken for resends. The control plane takes a jump of more
/// than [`RESTART_JUMP`] for such a restart.
pub fn sequence_base(now_ms: u64) -> u64 {
    now_ms.saturating_mul(1 << 20)
}

/// A jump in a device's sequence numbers larger than this is a restarted sequence (a new
/// outbox), not messages lost in between.
pub const RESTART_JUMP: u64 = 1 << 19;

/// A device id: 1–64 characters of lowercase letters, digits, `-`, `_`, `.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    pub fn new(id: &str) -> Result<DeviceId, MessageError> {
        let ok = !id.is_empty()
            && id.len() <= 64
            && !id.starts_with('.')
            && id.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
            });
        if ok {
            Ok(DeviceId(id.to_string()))
        } else {
            Err(MessageError::BadDeviceId(id.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceId {
    type Error = MessageError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        DeviceId::new(&s)
    }
}

impl From<DeviceId> for String {
    fn from(d: DeviceId) -> String {
        d.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The last segment of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Status,
    Telemetry,
    Events,
    Cmd,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Status => "status",
            Channel::Telemetry => "telemetry",
            Channel::Events => "events",
            Channel::Cmd => "cmd",
        }
    }

    /// The channel a body travels on.
    pub fn of(body: &Body) -> Channel {
        match body {
            Body::Status(_) => Channel::Status,
            Body::Window(_) | Body::Alert(_) => Channel::Telemetry,
            Body::Event(_) | Body::Ack(_) => Channel::Events,
            Body::Command(_) | Body::Receipt(_) => Channel::Cmd,
        }
    }
}

/// `fleetml/v1/{device}/{channel}`.
pub fn topic(device: &DeviceId, channel: Channel) -> String {
    format!("{TOPIC_PREFIX}/{device}/{}", channel.as_str())
}

/// The subscription filter of the control plane's ingest for device → cloud messages.
pub const INGEST_FILTER: &str = "fleetml/v1/+/+";

/// Splits a topic into its device and channel.
pub fn parse_topic(topic: &str) -> Result<(DeviceId, Channel), MessageError> {
    let bad = || MessageError::BadTopic(topic.chars().take(200).collect());
    let rest = topic
        .strip_prefix(TOPIC_PREFIX)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(bad)?;
    let (device, channel) = rest.split_once('/').ok_or_else(bad)?;
    let channel = match channel {
        "status" => Channel::Status,
        "telemetry" => Channel::Telemetry,
        "events" => Channel::Events,
        "cmd" => Channel::Cmd,
        _ => return Err(bad()),
    };
    Ok((DeviceId::new(device).map_err(|_| bad())?, channel))
}

/// A model a device serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveModel {
    pub name: String,
    pub version: u64,
    pub backend: String,
    /// Why earlier backends of the board's order were passed over.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<String>,
    /// The version running beside it in shadow, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ActiveShadow>,
}

/// A shadow version a device runs beside a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveShadow {
    pub version: u64,
    pub backend: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub agent_version: String,
    pub board: String,
    /// Backends this agent can use on this device (`cpu`, `gpu`, …).
    pub backends: Vec<String>,
    pub models: Vec<ActiveModel>,
    pub uptime_s: u64,
    /// `false` only in the last-will message the broker publishes for a vanished device.
    pub online: bool,
    /// Messages waiting in the device's outbox when this status was sealed.
    #[serde(default)]
    pub outbox_depth: u64,
    /// Monitoring windows the outbox ever dropped for room (it never drops anything else).
    #[serde(default)]
    pub dropped_windows: u64,
    /// The sequence number of the last will the device's connection carries now (the
    /// will is a copy of the status with that number, `online: false`). A will with a
    /// lower number belongs to an earlier connection, and the ingest ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub will_seq: Option<u64>,
}

/// Drift of one feature, or of the predictions, in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureDrift {
    pub name: String,
    pub values: u32,
    pub missing_rate: f64,
    pub out_of_range_rate: f64,
    pub unseen_rate: f64,
    pub psi: f64,
    /// Numeric features only.
    pub ks: Option<f64>,
    pub js: f64,
    pub chi2_p: Option<f64>,
    /// Numeric features only: the normed Wasserstein distance (in reference standard
    /// deviations).
    #[serde(default)]
    pub wasserstein: Option<f64>,
    /// While the feature alerts: the bins whose share moved most, largest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<BinShift>,
    pub usefulness: Option<f64>,
    pub drifting: bool,
}

/// p50, p95, p99 (absent when the window had no value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantiles {
    pub p50: Option<u64>,
    pub p95: Option<u64>,
    pub p99: Option<u64>,
}

impl Quantiles {
    /// Nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.p50.is_none() && self.p95.is_none() && self.p99.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    pub start_ms: u64,
    pub end_ms: Option<u64>,
    pub missed: u32,
}

/// An alert changing state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertEvent {
    /// A feature name, `prediction`, `missing_predictions` or `lag`.
    pub subject: String,
    /// `raised` or `recovered`.
    pub transition: String,
    /// For a raised feature or prediction alert: the bins whose share moved most.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<BinShift>,
}

/// A bin of a feature's distribution whose share moved: its range (`(10, 20]`, `≤ 10`,
/// `> 90`) or category (`other`: values the schema does not list), the window's share
/// and the reference's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinShift {
    pub bin: String,
    pub current: f64,
    pub reference: f64,
}

/// One closed monitoring window of one model (the agent's
/// `GET /v1/models/{name}/monitoring` shows the same, as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowReport {
    pub model: String,
    pub version: u64,
    pub window: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    pub predictions: u32,
    pub throughput_per_s: f64,
    /// Inputs that got no prediction, by reason.
    pub missed: BTreeMap<String, u32>,
    pub missing_prediction_rate: f64,
    /// The first few expected ids not predicted by their deadline.
    pub missing_ids: Vec<String>,
    pub latency_us: Quantiles,
    pub lag_ms: Quantiles,
    /// Rows per batch the agent's dynamic batcher ran in this window (absent when the
    /// model is not batched).
    #[serde(default, skip_serializing_if = "Quantiles::is_empty")]
    pub batch_rows: Quantiles,
    pub outages: Vec<Outage>,
    pub outages_not_listed: u32,
    pub features: Vec<FeatureDrift>,
    pub prediction: Option<FeatureDrift>,
    pub events: Vec<AlertEvent>,
    /// Subjects alerting after this window.
    pub alerts: Vec<String>,
    /// Ground-truth labels that arrived during this window (`POST /v1/feedback`).
    #[serde(default)]
    pub labels: u32,
    /// Share of labelled classifications that were right, when labels arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_accuracy: Option<f64>,
    /// Mean absolute error of labelled scores, when labels arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_mae: Option<f64>,
    /// Drift of the rows' reconstruction error (all numeric features together), when the
    /// bundle has a multivariate reference (named `reconstruction_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multivariate: Option<FeatureDrift>,
    /// Accuracy estimated from the predictions' confidence, when the bundle has a
    /// calibration map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_accuracy: Option<EstimatedAccuracy>,
    /// The shadow version's comparison with this one over the window, when one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowReport>,
}

/// One window of a shadow version beside the serving one: how often it ran, how often it
/// was shed to keep the device's serving unhindered, how its outputs compare with what
/// was answered, and its own latency and prediction drift.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowReport {
    pub version: u64,
    /// Requests run in shadow (each may hold several rows).
    pub runs: u32,
    /// Requests not run because the device was busy or the shadow's CPU budget was spent.
    pub shed: u32,
    /// Shadow runs that failed (an error or a panic in its backend).
    pub failed: u32,
    /// Rows whose outputs were compared.
    pub rows: u32,
    /// Classifications: the share of rows whose class agreed with the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    /// Scores: the mean and largest absolute difference from the answer (over every row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_abs_error: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_abs_error: Option<f64>,
    /// Scores: the median and 95th percentile of the absolute differences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abs_error_p50: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abs_error_p95: Option<f64>,
    /// The shadow's own latency per request, microseconds.
    pub latency_us: Quantiles,
    /// The shadow's prediction drift against its own reference profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<FeatureDrift>,
    /// Subjects the shadow's own monitor alerts on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
}

/// A window's accuracy estimated without labels (see `fleetml_monitor::performance`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstimatedAccuracy {
    pub accuracy: f64,
    /// The limit below which it alerts, explicit or calibrated for the window size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<f64>,
    /// Predictions with a confidence it is estimated over.
    pub predictions: u32,
    pub alerting: bool,
}

/// An alert transition, sent on its own as soon as it happens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    pub model: String,
    pub version: u64,
    pub window: u64,
    pub event: AlertEvent,
}

/// Something that happened to a model on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// A signed assignment with a newer generation was accepted (detail: generation).
    AssignmentAccepted,
    /// An assignment was refused (replayed, expired, unknown key, …; the reason is in
    /// `detail`); what runs is unchanged.
    AssignmentRefused,
    /// A bundle download started or resumed (detail: from which byte).
    Downloading,
    /// A download failed; it resumes from where it stopped on the next try.
    DownloadFailed,
    Downloaded,
    Verified,
    VerificationFailed,
    SelfTestFailed,
    /// Installing a version failed (the reason is in `detail`); the old one still serves.
    ActivationFailed,
    Activated,
    RolledBack,
    FellBack,
    /// A shadow version verified, self-tested and running beside the model (detail: its
    /// backend).
    ShadowActivated,
    /// A shadow version could not be installed (the reason is in `detail`); serving is
    /// unchanged.
    ShadowFailed,
    /// The shadow version was stopped (the assignment names none any more, or promoted).
    ShadowStopped,
    /// Raised by the control plane, not the device: the device's sequence numbers jumped
    /// to a new base (its data directory was wiped or replaced; detail: from, to).
    SequenceRestarted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub kind: Lifecycle,
    pub model: String,
    pub version: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// What the control plane asks of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum CommandKind {
    AssignmentChanged,
    CaptureSamples { model: String, count: u32 },
    SendStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub id: String,
    pub command: CommandKind,
}

/// The control plane's word that it stored (and flushed) a device's messages: the
/// device may now delete them from its outbox. A broker's PUBACK only says the broker
/// has a message; an embedded broker that is overloaded or restarted can still lose it
/// before the ingest stores it, so a device that has seen receipts keeps every message
/// until one names it (and re-publishes one that none names in time).
///
/// Sealed with sequence number 0 and not subject to the replay check of commands:
/// a replayed receipt names messages that were stored, so it changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// Inclusive ranges `[first, last]` of the device's sequence numbers, ascending and
    /// disjoint.
    pub stored: Vec<[u64; 2]>,
}

/// Most ranges in one [`Receipt`] (a receipt stays far below [`MAX_MESSAGE`]).
pub const MAX_RECEIPT_RANGES: usize = 1024;

impl Receipt {
    /// Receipts covering exactly `seqs` (in any order, repeats allowed), each with at
    /// most [`MAX_RECEIPT_RANGES`] ranges.
    pub fn covering(seqs: impl IntoIterator<Item = u64>) -> Vec<Receipt> {
        let mut seqs: Vec<u64> = seqs.into_iter().collect();
        seqs.sort_unstable();
        seqs.dedup();
        let mut ranges: Vec<[u64; 2]> = Vec::new();
        for seq in seqs {
            match ranges.last_mut() {
                Some(r) if r[1].checked_add(1) == Some(seq) => r[1] = seq,
                _ => ranges.push([seq, seq]),
            }
        }
        ranges
            .chunks(MAX_RECEIPT_RANGES)
            .map(|c| Receipt { stored: c.to_vec() })
            .collect()
    }

    /// Whether the receipt names `seq`.
    pub fn names(&self, seq: u64) -> bool {
        self.stored.iter().any(|[a, b]| (*a..=*b).contains(&seq))
    }
}

/// A device's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub command: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    Status(Status),
    Window(Box<WindowReport>),
    Alert(Alert),
    Event(Event),
    Ack(Ack),
    Command(Command),
    Receipt(Receipt),
}

impl Body {
    /// The kind of message in one word, as views and retention rules name it (the
    /// variant's name on the wire).
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Status(_) => "status",
            Body::Window(_) => "window",
            Body::Alert(_) => "alert",
            Body::Event(_) => "event",
            Body::Ack(_) => "ack",
            Body::Command(_) => "command",
            Body::Receipt(_) => "receipt",
        }
    }
}

/// A message on the wire (format 2): the CBOR of [`Signed`], and its MAC.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sealed<'a> {
    v: u16,
    #[serde(with = "serde_bytes", borrow)]
    msg: std::borrow::Cow<'a, [u8]>,
    #[serde(with = "serde_bytes", borrow)]
    auth: std::borrow::Cow<'a, [u8]>,
}

/// What `msg` holds, decoded.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fields {
    v: u16,
    device: DeviceId,
    seq: u64,
    ts_ms: u64,
    body: Body,
}

/// The signed part of a message.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Signed<'a> {
    v: u16,
    device: &'a DeviceId,
    seq: u64,
    ts_ms: u64,
    body: &'a Body,
}

/// One message, authenticated (as [`open`] returns it and the control plane stores it;
/// on the wire it travels sealed, see the module's documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub v: u16,
    /// The device the message is from (device → cloud) or for (cloud → device).
    pub device: DeviceId,
    /// Per device and direction, strictly increasing, surviving restarts.
    pub seq: u64,
    /// Milliseconds since the Unix epoch, from the sender's clock.
    pub ts_ms: u64,
    pub body: Body,
    /// HMAC-SHA256 of the CBOR of `{v, device, seq, ts_ms, body}` as sent.
    #[serde(with = "serde_bytes")]
    pub auth: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("message of {0} bytes is larger than {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("message is not valid CBOR for this format: {0}")]
    Malformed(String),
    #[error("message format {0} is not supported (this build reads {FORMAT_V1} and {FORMAT})")]
    UnsupportedFormat(u16),
    #[error("topic `{0}` is not a fleetml v1 topic")]
    BadTopic(String),
    #[error("device id `{0}` is invalid: use 1-64 lowercase letters, digits, `-`, `_`, `.`")]
    BadDeviceId(String),
    #[error("message says device `{message}` on the topic of device `{topic}`")]
    DeviceMismatch { topic: String, message: String },
    #[error("a {body} message does not belong on the `{channel}` topic")]
    WrongChannel {
        body: &'static str,
        channel: &'static str,
    },
    #[error("unknown device `{0}`")]
    UnknownDevice(String),
    #[error("authenticator does not verify")]
    BadAuthenticator,
}

fn hmac(secret: &[u8], bytes: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::sign(&key, bytes).as_ref().to_vec()
}

/// Builds and authenticates a message; returns its topic and bytes: the CBOR map
/// `{v: 2, msg, auth}`, `msg` the CBOR of `{v, device, seq, ts_ms, body}` and `auth`
/// HMAC-SHA256(`secret`, `msg`).
pub fn seal(
    device: &DeviceId,
    seq: u64,
    ts_ms: u64,
    body: Body,
    secret: &[u8],
) -> (String, Vec<u8>) {
    let msg = serde_cbor::to_vec(&Signed {
        v: FORMAT,
        device,
        seq,
        ts_ms,
        body: &body,
    })
    .expect("messages serialize to CBOR");
    let auth = hmac(secret, &msg);
    let sealed = Sealed {
        v: FORMAT,
        msg: msg.into(),
        auth: auth.into(),
    };
    (
        topic(device, Channel::of(&body)),
        serde_cbor::to_vec(&sealed).expect("messages serialize to CBOR"),
    )
}

/// Decodes and authenticates a message received on `topic`; `secret_of` gives the
/// secret of an enrolled device (`None`: unknown device). In format 2 the MAC is checked
/// over the received `msg` bytes before they are decoded; format 1 is read as before.
pub fn open(
    topic: &str,
    bytes: &[u8],
    secret_of: impl FnOnce(&DeviceId) -> Option<Vec<u8>>,
) -> Result<Envelope, MessageError> {
    open_sealed(topic, bytes, secret_of).map(|(envelope, _)| envelope)
}

/// An authenticated message and its envelope's CBOR, which stores keep. For a format-2
/// message [`open_received`] opened, the CBOR is the `msg` bytes the device signed with
/// `auth` added, so that storing a message does not encode it again (where `msg`'s map
/// length is not in its first byte, and for format 1, whose MAC does not cover the
/// encoding, the envelope is encoded here).
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    envelope: Envelope,
    cbor: Vec<u8>,
}

impl Received {
    /// A message made here rather than received (imports, tests): encoded once.
    pub fn new(envelope: Envelope) -> Received {
        let cbor = serde_cbor::to_vec(&envelope).expect("messages serialize to CBOR");
        Received { envelope, cbor }
    }

    /// CBOR that decodes to [`Received::envelope`] (`serde_cbor::from_slice`).
    pub fn cbor(&self) -> &[u8] {
        &self.cbor
    }

    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    pub fn into_envelope(self) -> Envelope {
        self.envelope
    }
}

impl std::ops::Deref for Received {
    type Target = Envelope;

    fn deref(&self) -> &Envelope {
        &self.envelope
    }
}

/// [`open`], keeping the envelope's CBOR as received ([`Received::cbor`]).
pub fn open_received(
    topic: &str,
    bytes: &[u8],
    secret_of: impl FnOnce(&DeviceId) -> Option<Vec<u8>>,
) -> Result<Received, MessageError> {
    let (envelope, msg) = open_sealed(topic, bytes, secret_of)?;
    let cbor = msg
        .and_then(|msg| envelope_cbor(&msg, &envelope.auth))
        .unwrap_or_else(|| serde_cbor::to_vec(&envelope).expect("messages serialize to CBOR"));
    Ok(Received { envelope, cbor })
}

/// An authenticated message's envelope and, for format 2, the `msg` bytes it was
/// decoded from.
type Opened<'a> = (Envelope, Option<std::borrow::Cow<'a, [u8]>>);

/// Decodes and authenticates a message ([`open`]).
fn open_sealed<'a>(
    topic: &str,
    bytes: &'a [u8],
    secret_of: impl FnOnce(&DeviceId) -> Option<Vec<u8>>,
) -> Result<Opened<'a>, MessageError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(MessageError::TooLarge(bytes.len()));
    }
    let (topic_device, channel) = parse_topic(topic)?;
    let sealed = match serde_cbor::from_slice::<Sealed<'_>>(bytes) {
        Ok(sealed) => sealed,
        Err(e) => {
            return match serde_cbor::from_slice::<Envelope>(bytes) {
                Ok(v1) if v1.v == FORMAT_V1 => {
                    open_v1(v1, topic_device, channel, secret_of).map(|envelope| (envelope, None))
                }
                Ok(other) => Err(MessageError::UnsupportedFormat(other.v)),
                Err(_) => Err(MessageError::Malformed(e.to_string())),
            };
        }
    };
    if sealed.v != FORMAT {
        return Err(MessageError::UnsupportedFormat(sealed.v));
    }
    let secret = secret_of(&topic_device)
        .ok_or_else(|| MessageError::UnknownDevice(topic_device.to_string()))?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    ring::hmac::verify(&key, &sealed.msg, &sealed.auth)
        .map_err(|_| MessageError::BadAuthenticator)?;
    let fields: Fields =
        serde_cbor::from_slice(&sealed.msg).map_err(|e| MessageError::Malformed(e.to_string()))?;
    if fields.v != FORMAT {
        return Err(MessageError::UnsupportedFormat(fields.v));
    }
    let envelope = Envelope {
        v: fields.v,
        device: fields.device,
        seq: fields.seq,
        ts_ms: fields.ts_ms,
        body: fields.body,
        auth: sealed.auth.into_owned(),
    };
    check_route(&envelope, &topic_device, channel)?;
    Ok((envelope, Some(sealed.msg)))
}

/// The envelope's CBOR made from a format-2 `msg` that decoded as [`Fields`]: a map of
/// exactly the five signed fields (`Fields` takes no other, no field twice, nothing
/// after the map), so the same map with `auth` added is the envelope. `None` when the
/// map's length is not in its first byte (an encoding serde_cbor does not write): the
/// caller encodes the envelope instead.
fn envelope_cbor(msg: &[u8], auth: &[u8]) -> Option<Vec<u8>> {
    /// A map (major type 5) of five entries, its length in the first byte.
    const MAP_OF_FIVE: u8 = 0xa5;
    #[derive(Serialize)]
    struct Auth<'a> {
        #[serde(with = "serde_bytes")]
        auth: &'a [u8],
    }
    let fields = msg.strip_prefix(&[MAP_OF_FIVE])?;
    let mut out = Vec::with_capacity(msg.len() + auth.len() + 8);
    out.push(MAP_OF_FIVE + 1);
    out.extend_from_slice(fields);
    // `auth` as a map of one entry, whose first byte (the map's head) is then removed.
    let head = out.len();
    serde_cbor::to_writer(&mut out, &Auth { auth }).ok()?;
    out.remove(head);
    Some(out)
}

/// The message names the topic's device and belongs on the topic's channel.
fn check_route(
    envelope: &Envelope,
    topic_device: &DeviceId,
    channel: Channel,
) -> Result<(), MessageError> {
    if envelope.device != *topic_device {
        return Err(MessageError::DeviceMismatch {
            topic: topic_device.to_string(),
            message: envelope.device.to_string(),
        });
    }
    let expected = Channel::of(&envelope.body);
    if expected != channel {
        return Err(MessageError::WrongChannel {
            body: expected.as_str(),
            channel: channel.as_str(),
        });
    }
    Ok(())
}

/// Format 1: the fields and `auth` in one map, the MAC over the fields' re-encoding.
fn open_v1(
    envelope: Envelope,
    topic_device: DeviceId,
    channel: Channel,
    secret_of: impl FnOnce(&DeviceId) -> Option<Vec<u8>>,
) -> Result<Envelope, MessageError> {
    check_route(&envelope, &topic_device, channel)?;
    let secret = secret_of(&envelope.device)
        .ok_or_else(|| MessageError::UnknownDevice(envelope.device.to_string()))?;
    let bytes = serde_cbor::to_vec(&Signed {
        v: envelope.v,
        device: &envelope.device,
        seq: envelope.seq,
        ts_ms: envelope.ts_ms,
        body: &envelope.body,
    })
    .map_err(|e| MessageError::Malformed(e.to_string()))?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    ring::hmac::verify(&key, &bytes, &envelope.auth).map_err(|_| MessageError::BadAuthenticator)?;
    Ok(envelope)
}

/// The MQTT password of a device: HMAC-SHA256(secret, "fleetml/v1 mqtt password"), hex.
/// A broker that checks logins (the control plane's embedded one does) learns this, never
/// the secret that authenticates messages.
pub fn mqtt_password(secret: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    hex_lower(ring::hmac::sign(&key, b"fleetml/v1 mqtt password").as_ref())
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A broker address: `mqtt://[user[:password]@]host[:port]` (port 1883 by default).
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `mqtts://`: MQTT over TLS.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password never reaches a log.
        write!(f, "BrokerUrl({self})")
    }
}

impl fmt::Display for BrokerUrl {
    /// The URL without its password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.tls { "mqtts://" } else { "mqtt://" })?;
        if let Some(u) = &self.username {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = String;
    fn from_str(url: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("broker URL `{url}`: {why}");
        let (tls, rest) =
            if let Some(r) = url.strip_prefix("mqtt://").or(url.strip_prefix("tcp://")) {
                (false, r)
            } else if let Some(r) = url.strip_prefix("mqtts://").or(url.strip_prefix("ssl://")) {
                (true, r)
            } else {
                return Err(bad(
                    "expected mqtts://HOST[:PORT] (or mqtt:// for plain MQTT)",
                ));
            };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('?') {
            return Err(bad("a broker URL has no path or query"));
        }
        let (login, hostport) = match rest.rsplit_once('@') {
            Some((l, h)) => (Some(l), h),
            None => (None, rest),
        };
        let (username, password) = match login {
            Some(l) => match l.split_once(':') {
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (Some(l.to_string()), None),
            },
            None => (None, None),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => p
                .parse()
                .map_err(|_| bad("the port is not a number 0-65535"))?,
            None if tls => 8883,
            None => 1883,
        };
        Ok(BrokerUrl {
            tls,
            host,
            port,
            username,
            password,
        })
    }
}
