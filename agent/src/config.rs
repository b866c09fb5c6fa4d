//! The agent's configuration file (`agent.toml`). Every key can also be given as a flag
//! of the same name (`data_dir` ↔ `--data-dir`); a flag wins over the file.
//!
//! ```toml
//! data_dir = "/var/lib/fleetml"
//! board = "/etc/fleetml/board.toml"
//! trust = "/etc/fleetml/trust.toml"
//! listen = "127.0.0.1:7070"
//! socket = "/run/fleetml/agent.sock"
//! workers = 2
//! queue = 64
//! max_body_bytes = 1048576
//! control_plane = "https://fleet.example.com:7080"  # where assignments and bundles come from
//! predict_timeout_ms = 30000                     # 504 beyond this
//! api_max_connections = 1024                     # more are closed at once
//! # a listen address other than loopback needs both of these (the API has no other guard):
//! allow_remote_api = true
//! api_token_file = "/etc/fleetml/api.token"      # 32+ characters, mode 0600
//! # monitoring: a window closes after this many predictions or seconds, whichever first
//! window_predictions = 1000
//! window_seconds = 300
//! # alert thresholds (a subject alerts after `alert_windows` windows past one, recovers
//! # after as many within all)
//! drift_psi = 0.2
//! drift_js = 0.1
//! drift_chi2_p = 0.01
//! unseen_rate = 0.05                              # categories the reference never saw
//! missing_rate = 0.05
//! min_estimated_accuracy = 0.7                  # default: calibrated per window size
//! lag_p95_ms = 300000
//! alert_windows = 3
//! # fleet messaging (written by `fleetctl devices enroll`; the file must then be mode 0600)
//! device_id = "pi-07"
//! device_secret = "…64 hex digits…"
//! mqtt_url = "mqtts://fleet.example.com:8883"
//! enrolled_board = "raspberry-pi-4"             # the board the status reports
//! # the CA control_plane and mqtt_url are checked against (pinned; written by enroll):
//! tls_ca = """-----BEGIN CERTIFICATE-----…"""
//! # or a CA file (e.g. the system bundle /etc/ssl/certs/ca-certificates.crt):
//! # tls_ca_file = "/etc/fleetml/ca.pem"
//! # or the system's CA store: tls_ca_system = true
//! # plain http:// and mqtt:// beyond this machine (tokens and passwords in clear):
//! # allow_insecure_transport = true
//! outbox_max_messages = 100000
//! outbox_max_bytes = 268435456
//! status_interval_s = 300
//! shadow_cpu_percent = 50          # a shadow version's share of one core; beyond it, shed
//! telemetry_resend_after_s = 600   # last resort: re-publish what no receipt confirmed
//! assignment_poll_s = 300          # plus a pull whenever the control plane says so
//! download_max_bytes_per_s = 1000000
//! download_idle_timeout_s = 30     # a download stalled this long stops; resumes later
//! assignment_stall_s = 600         # a pull without progress this long: watchdog unfed
//! onnxruntime_library = "/usr/lib/libonnxruntime.so.1.32.0"  # for the onnxruntime backend
//! # concurrent requests for a model run as one batch (like Triton's dynamic batcher)
//! [[batching]]
//! model = "cls"
//! max_batch = 8
//! max_queue_delay_us = 2000
//! # the trust policy may be given inline instead of as a file (`trust`)
//! [trust_policy]
//! threshold = 1
//! keys = [{ public = "…" }]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the agent keeps its store when nothing says otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/fleetml";
/// Where the API listens when nothing says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Queue length when nothing says otherwise.
pub const DEFAULT_QUEUE: usize = 64;

/// One `[[prediction_sink]]`; a build without the `sinks` feature only counts them, and
/// [`AgentConfig::check_features`] refuses any.
#[cfg(feature = "sinks")]
pub type SinkEntry = crate::sinks::SinkConfig;
#[cfg(not(feature = "sinks"))]
pub type SinkEntry = serde::de::IgnoredAny;

/// One `[[capture]]`; a build without the `capture` feature only counts them, and
/// [`AgentConfig::check_features`] refuses any.
#[cfg(feature = "capture")]
pub type CaptureEntry = crate::capture::CaptureConfig;
#[cfg(not(feature = "capture"))]
pub type CaptureEntry = serde::de::IgnoredAny;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub data_dir: Option<PathBuf>,
    pub board: Option<PathBuf>,
    /// The board this device was enrolled as (written by `fleetctl devices enroll`): the
    /// name its status reports, as the control plane lists it.
    pub enrolled_board: Option<String>,
    pub trust: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub socket: Option<PathBuf>,
    pub workers: Option<usize>,
    pub queue: Option<usize>,
    /// Largest request body the API accepts, in bytes (default 1 MiB).
    pub max_body_bytes: Option<usize>,
    pub control_plane: Option<String>,
    /// Longest a prediction may take before the API answers 504 (default 30000).
    pub predict_timeout_ms: Option<u64>,
    /// API connections served at once, TCP and Unix socket each (default 1024); more
    /// are closed at once.
    pub api_max_connections: Option<usize>,
    /// Serve the API on an address other than loopback (needs `api_token_file`).
    pub allow_remote_api: Option<bool>,
    /// A file holding the bearer token every API request must carry (but the probes).
    pub api_token_file: Option<PathBuf>,
    pub window_predictions: Option<u32>,
    pub window_seconds: Option<u64>,
    pub drift_psi: Option<f64>,
    pub drift_js: Option<f64>,
    pub drift_chi2_p: Option<f64>,
    pub unseen_rate: Option<f64>,
    pub missing_rate: Option<f64>,
    pub min_estimated_accuracy: Option<f64>,
    pub lag_p95_ms: Option<u64>,
    pub alert_windows: Option<u8>,
    /// The device id issued at enrollment.
    pub device_id: Option<String>,
    /// The device secret issued at enrollment, hex.
    pub device_secret: Option<String>,
    /// The broker telemetry goes to: `mqtts://HOST[:PORT]` (or plain `mqtt://`);
    /// comma-separated for the nodes of a clustered broker, tried in turn when a
    /// connection fails.
    pub mqtt_url: Option<String>,
    /// The CA certificates (PEM) `control_plane` and `mqtt_url` are checked against;
    /// written by `fleetctl devices enroll`.
    pub tls_ca: Option<String>,
    /// A file of CA certificates (PEM) instead of `tls_ca`.
    pub tls_ca_file: Option<PathBuf>,
    /// Trust the system's CA store instead (a control plane with a public certificate).
    pub tls_ca_system: Option<bool>,
    /// Allow plain `http://` and `mqtt://` to another machine: the device's token and
    /// MQTT password then cross the network in clear. Loopback is always allowed.
    pub allow_insecure_transport: Option<bool>,
    pub outbox_max_messages: Option<u64>,
    pub outbox_max_bytes: Option<u64>,
    /// Seconds between heartbeat statuses while connected (default 300).
    pub status_interval_s: Option<u64>,
    /// The share of one core a shadow version (a candidate run beside the served one on
    /// live requests) may use, percent (1-100, default 50); beyond it shadow runs are
    /// shed, never the requests being served.
    pub shadow_cpu_percent: Option<u8>,
    /// Seconds a message the broker acknowledged waits for the control plane's receipt
    /// before it is published again (default 600; only once the control plane sends
    /// receipts).
    pub telemetry_resend_after_s: Option<u64>,
    /// Seconds between assignment pulls, ±20 % jitter (default 300); the control plane
    /// also says when to pull at once.
    pub assignment_poll_s: Option<u64>,
    /// Download bandwidth cap for bundles, bytes per second (default: none).
    pub download_max_bytes_per_s: Option<u64>,
    /// Seconds a bundle download may go without receiving anything before it stops and
    /// resumes at the next pull (default 30).
    pub download_idle_timeout_s: Option<u64>,
    /// Seconds an assignment pull may go without progress (a step, a downloaded chunk)
    /// before the agent stops feeding systemd's watchdog, which then restarts it
    /// (default 600, and at least four download idle time-outs).
    pub assignment_stall_s: Option<u64>,
    /// The trust policy, inline (`trust` names a file instead; the file wins).
    pub trust_policy: Option<fleetml_protocol::trust::TrustPolicy>,
    /// Where each model's predictions are forwarded besides the caller.
    #[serde(default, rename = "prediction_sink")]
    pub prediction_sinks: Vec<SinkEntry>,
    /// Data capture per model (`[[capture]]`, see `agent/src/capture.rs`).
    #[serde(default)]
    pub capture: Vec<CaptureEntry>,
    /// All capture batches on disk together, bytes (default 64 MiB).
    pub capture_max_bytes: Option<u64>,
    /// Seconds between capture uploads (default 60).
    pub capture_upload_interval_s: Option<u64>,
    /// Dynamic batching per model (`[[batching]]`: `model`, `max_batch`,
    /// `max_queue_delay_us`).
    #[serde(default)]
    pub batching: Vec<crate::batcher::BatchingConfig>,
    /// `libonnxruntime` for the `onnxruntime` backend; wins over the board profile's
    /// `onnxruntime.library` (and `ORT_DYLIB_PATH` wins over both).
    pub onnxruntime_library: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl AgentConfig {
    /// Loads a config file. Relative paths in it are taken relative to the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: AgentConfig = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.message().trim().to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.data_dir,
            &mut config.board,
            &mut config.trust,
            &mut config.socket,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if config.device_secret.is_some() {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map(|m| m.permissions().mode())
                .unwrap_or(0);
            if mode & 0o077 != 0 {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "holds the device secret but is readable by others (mode {:o}); \
                         run `chmod 600 {}`",
                        mode & 0o777,
                        path.display()
                    ),
                });
            }
        }
        if let Some(p) = &config.trust_policy
            && let Err(e) = p.validate()
        {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: format!("trust_policy: {e}"),
            });
        }
        if config.workers == Some(0) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "`workers` must be at least 1".into(),
            });
        }
        Ok(config)
    }

    /// `self` with every key that `flags` sets replaced by the flag's value.
    pub fn overridden_by(mut self, flags: AgentConfig) -> Self {
        macro_rules! take {
            ($($f:ident),*) => { $( if flags.$f.is_some() { self.$f = flags.$f; } )* };
        }
        take!(
            data_dir,
            board,
            trust,
            listen,
            socket,
            workers,
            queue,
            max_body_bytes,
            control_plane,
            predict_timeout_ms,
            api_max_connections,
            allow_remote_api,
            api_token_file,
            window_predictions,
            window_seconds,
            drift_psi,
            drift_js,
            drift_chi2_p,
            unseen_rate,
            missing_rate,
            min_estimated_accuracy,
            lag_p95_ms,
            alert_windows,
            device_id,
            device_secret,
            mqtt_url,
            tls_ca,
            tls_ca_file,
            tls_ca_system,
            allow_insecure_transport,
            outbox_max_messages,
            outbox_max_bytes,
            status_interval_s,
            shadow_cpu_percent,
            telemetry_resend_after_s,
            assignment_poll_s,
            download_max_bytes_per_s,
            download_idle_timeout_s,
            assignment_stall_s,
            capture_max_bytes,
            capture_upload_interval_s,
            onnxruntime_library,
            trust_policy
        );
        if !flags.prediction_sinks.is_empty() {
            self.prediction_sinks = flags.prediction_sinks;
        }
        if !flags.capture.is_empty() {
            self.capture = flags.capture;
        }
        if !flags.batching.is_empty() {
            self.batching = flags.batching;
        }
        self
    }

    /// The telemetry settings, when the agent is enrolled (`device_id`, `device_secret`
    /// and `mqtt_url` all set); `Ok(None)` when none of them is.
    pub fn telemetry(&self) -> Result<Option<crate::telemetry::Settings>, String> {
        let (id, secret, url) = match (&self.device_id, &self.device_secret, &self.mqtt_url) {
            (None, None, None) => return Ok(None),
            (Some(i), Some(s), Some(u)) => (i, s, u),
            _ => {
                return Err(
                    "fleet messaging needs all of `device_id`, `device_secret` and `mqtt_url` \
                     (as written by `fleetctl devices enroll`)"
                        .into(),
                );
            }
        };
        let device = fleetml_protocol::telemetry::DeviceId::new(id).map_err(|e| e.to_string())?;
        let secret = hex::decode(secret.trim())
            .ok()
            .filter(|s| s.len() == fleetml_protocol::telemetry::SECRET_LEN)
            .ok_or_else(|| {
                format!(
                    "`device_secret` must be {} hex digits",
                    fleetml_protocol::telemetry::SECRET_LEN * 2
                )
            })?;
        // Several brokers (a cluster's nodes), comma-separated: tried in turn.
        let mut brokers = Vec::new();
        for one in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let broker: fleetml_protocol::telemetry::BrokerUrl = one.parse()?;
            self.transport(
                "mqtt_url",
                one,
                broker.tls,
                crate::http::is_loopback_host(&broker.host),
            )?;
            brokers.push(broker);
        }
        if brokers.is_empty() {
            return Err("`mqtt_url` is empty: name the broker, mqtts://HOST[:PORT]".into());
        }
        let tls = brokers.iter().any(|b| b.tls);
        let broker = brokers.remove(0);
        let defaults = crate::outbox::Limits::default();
        Ok(Some(crate::telemetry::Settings {
            device,
            secret,
            roots: if tls { self.tls_roots()? } else { None },
            broker,
            more_brokers: brokers,
            limits: crate::outbox::Limits {
                max_messages: self.outbox_max_messages.unwrap_or(defaults.max_messages),
                max_bytes: self.outbox_max_bytes.unwrap_or(defaults.max_bytes),
            },
            status_interval: std::time::Duration::from_secs(
                self.status_interval_s.unwrap_or(300).max(1),
            ),
            resend_after: self
                .telemetry_resend_after_s
                .map_or(crate::publisher::RESEND_AFTER, |s| {
                    std::time::Duration::from_secs(s.max(1))
                }),
        }))
    }

    /// How assignments are pulled: when enrolled (`tel`, from [`Self::telemetry`]) and
    /// `control_plane` is set.
    pub fn assignments(
        &self,
        tel: Option<&crate::telemetry::Settings>,
    ) -> Result<Option<crate::assignments::Settings>, String> {
        let (Some(url), Some(tel)) = (&self.control_plane, tel) else {
            return Ok(None);
        };
        let server: crate::http::HttpUrl = url.parse()?;
        self.transport("control_plane", url, server.tls, server.is_loopback())?;
        let roots = match (&tel.roots, server.tls) {
            (_, false) => None,
            (Some(same), true) => Some(same.clone()),
            (None, true) => self.tls_roots()?,
        };
        Ok(Some(crate::assignments::Settings {
            roots,
            server,
            token: fleetml_protocol::assignment::http_token(&tel.device, &tel.secret),
            device: tel.device.clone(),
            poll: std::time::Duration::from_secs(self.assignment_poll_s.unwrap_or(300).max(1)),
            max_bytes_per_s: self.download_max_bytes_per_s,
            download_idle: std::time::Duration::from_secs(
                self.download_idle_timeout_s.unwrap_or(30).max(1),
            ),
            stall: std::time::Duration::from_secs(match self.assignment_stall_s {
                Some(s) => s.max(1),
                None => 600.max(self.download_idle_timeout_s.unwrap_or(30).max(1) * 4),
            }),
        }))
    }

    /// Refuses a plain URL to another machine unless `allow_insecure_transport`; refuses
    /// a TLS URL without a CA to check the server against.
    fn transport(&self, key: &str, url: &str, tls: bool, loopback: bool) -> Result<(), String> {
        let has_ca =
            self.tls_ca.is_some() || self.tls_ca_file.is_some() || self.tls_ca_system == Some(true);
        if tls && !has_ca {
            return Err(format!(
                "`{key} = \"{url}\"` needs a CA to check the server against: `tls_ca` (written by `fleetctl devices enroll`), `tls_ca_file`, or `tls_ca_system = true`"
            ));
        }
        if !tls && !loopback && self.allow_insecure_transport != Some(true) {
            return Err(format!(
                "`{key} = \"{url}\"` is plain text to another machine: the device's token and password would cross the network in clear. Use the TLS URL (https:// / mqtts://, `fleetctl serve --self-signed`), or set `allow_insecure_transport = true`"
            ));
        }
        Ok(())
    }

    /// The roots TLS connections check the control plane and broker against:
    /// `tls_ca`, `tls_ca_file` or the system store (`tls_ca_system`), in that order.
    pub fn tls_roots(&self) -> Result<crate::http::Roots, String> {
        if let Some(pem) = &self.tls_ca {
            return fleetml_net::tls::client_config(pem.as_bytes(), "`tls_ca`").map(Some);
        }
        if let Some(path) = &self.tls_ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("`tls_ca_file = {}`: {e}", path.display()))?;
            return fleetml_net::tls::client_config(
                &pem,
                &format!("`tls_ca_file = {}`", path.display()),
            )
            .map(Some);
        }
        if self.tls_ca_system == Some(true) {
            return fleetml_net::tls::system_roots().map(Some);
        }
        Ok(None)
    }

    /// Refuses sections this build of the agent cannot honour, naming the cargo feature
    /// it was built without: a configured sink or capture is never silently ignored.
    pub fn check_features(&self) -> Result<(), String> {
        #[cfg(not(feature = "sinks"))]
        if !self.prediction_sinks.is_empty() {
            return Err(format!(
                "agent.toml has {} [[prediction_sink]] section(s), but this fleet-agent was built without the `sinks` feature: remove them, or install a build with `--features sinks` (on by default)",
                self.prediction_sinks.len()
            ));
        }
        #[cfg(not(feature = "capture"))]
        if !self.capture.is_empty() {
            return Err(format!(
                "agent.toml has {} [[capture]] section(s), but this fleet-agent was built without the `capture` feature: remove them, or install a build with `--features capture` (on by default)",
                self.capture.len()
            ));
        }
        Ok(())
    }

    /// Data capture, when any `[[capture]]` entry exists.
    #[cfg(feature = "capture")]
    pub fn capture(&self) -> Result<Option<crate::capture::Settings>, String> {
        if self.capture.is_empty() {
            return Ok(None);
        }
        let settings = crate::capture::Settings {
            models: self.capture.clone(),
            max_bytes: self.capture_max_bytes.unwrap_or(64 << 20),
            upload_interval: std::time::Duration::from_secs(
                self.capture_upload_interval_s.unwrap_or(60).max(1),
            ),
        };
        settings.validate()?;
        Ok(Some(settings))
    }

    /// The monitoring settings this configuration sets (each overrides the bundle's).
    pub fn monitoring(&self) -> fleetml_protocol::manifest::MonitoringPolicy {
        fleetml_protocol::manifest::MonitoringPolicy {
            window_predictions: self.window_predictions,
            window_seconds: self.window_seconds,
            drift_psi: self.drift_psi,
            drift_js: self.drift_js,
            drift_chi2_p: self.drift_chi2_p,
            unseen_rate: self.unseen_rate,
            missing_rate: self.missing_rate,
            min_estimated_accuracy: self.min_estimated_accuracy,
            lag_p95_ms: self.lag_p95_ms,
            alert_windows: self.alert_windows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrolled(mqtt_url: &str) -> AgentConfig {
        AgentConfig {
            device_id: Some("pi-1".into()),
            device_secret: Some("ab".repeat(fleetml_protocol::telemetry::SECRET_LEN)),
            mqtt_url: Some(mqtt_url.into()),
            ..Default::default()
        }
    }

    #[test]
    fn mqtt_url_may_list_the_nodes_of_a_cluster_each_held_to_the_transport_rules() {
        let s = enrolled("mqtt://127.0.0.1:1883, mqtt://localhost:1884")
            .telemetry()
            .expect("two loopback brokers")
            .expect("enrolled");
        assert_eq!((s.broker.host.as_str(), s.broker.port), ("127.0.0.1", 1883));
        let more: Vec<_> = s.more_brokers.iter().map(|b| b.port).collect();
        assert_eq!(more, [1884]);
        // The second node is plain text to another machine: refused by name.
        let e = enrolled("mqtt://127.0.0.1:1883,mqtt://192.0.2.1:1883")
            .telemetry()
            .expect_err("plain to another machine");
        assert!(
            e.contains("mqtt://192.0.2.1:1883") && e.contains("allow_insecure_transport"),
            "{e}"
        );
        // A TLS node needs a CA, whichever place it has in the list.
        let e = enrolled("mqtt://127.0.0.1:1883,mqtts://broker.example:8883")
            .telemetry()
            .expect_err("no CA");
        assert!(e.contains("tls_ca"), "{e}");
        assert!(enrolled(" , ").telemetry().is_err());
    }
}
