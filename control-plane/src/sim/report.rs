//! What a simulation measured (`Report`, its phases and checks) and its table.

use serde::Serialize;

use super::options::*;

/// A timed phase.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    /// The rollout's id in the control plane.
    pub id: String,
    /// From the API call until the control plane said `completed`.
    pub control_plane_s: f64,
    /// From the API call until the last device had activated the version (its status
    /// queued; the control plane may learn of it a moment later).
    pub devices_s: Option<f64>,
    /// Times the rollout engine told the devices that had reported nothing since their
    /// assignment again (`serve --rollout-remind-after`), over all waves.
    pub reminded: u64,
}

/// Telemetry over the steady phase.
#[derive(Debug, Clone, Serialize)]
pub struct Steady {
    /// How long the ingest took, after the first install, to store everything the
    /// broker had acknowledged (the phase starts then).
    pub catch_up_s: f64,
    pub seconds: f64,
    /// Messages the control plane's ingest stored (its `stored` counter).
    pub ingested: u64,
    pub ingested_per_s: f64,
    /// Messages the devices had acknowledged by the broker.
    pub sent: u64,
    pub sent_per_s: f64,
}

/// Resident memory, KiB (`VmRSS`; `peak` is `VmHWM`). With replicas, the control
/// plane's figures are their sum, except the peak: the largest one replica reached.
/// The broker's are mosquitto's, or the NATS nodes' added up.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub control_plane_idle_kib: u64,
    pub control_plane_enrolled_kib: u64,
    pub control_plane_connected_kib: u64,
    pub control_plane_end_kib: u64,
    pub control_plane_peak_kib: u64,
    /// (connected − idle) / N: enrollment record, state, session and connection.
    pub control_plane_per_device_kib: f64,
    /// mosquitto's, when it is the broker (the embedded one is inside the control plane).
    pub broker_idle_kib: Option<u64>,
    pub broker_connected_kib: Option<u64>,
    pub broker_per_device_kib: Option<f64>,
    pub simulator_kib: u64,
}

/// CPU time used over the whole run, seconds (user + system).
#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    pub control_plane_s: f64,
    pub broker_s: Option<f64>,
    pub simulator_s: f64,
}

/// What was checked at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Checks {
    /// Messages the devices sealed, all runs of all devices.
    pub sealed: u64,
    /// Messages the ingest stored (new `(device, seq)`), and duplicates it dropped.
    pub stored: u64,
    pub duplicates: u64,
    pub refused: u64,
    /// Sequence gaps the ingest noticed on arrival (later filled or not).
    pub ingest_gaps: u64,
    /// Devices whose stored message count or highest sequence number differs from what
    /// they sealed.
    pub devices_mismatched: usize,
    /// Devices whose whole stored message log was read back and checked for gaps.
    pub sample_devices: usize,
    pub sample_gaps: usize,
    /// Messages the devices saw confirmed: by a receipt, or by a PUBACK before their
    /// first receipt.
    pub confirmed: u64,
    /// Messages still in devices' outboxes at the end (not confirmed delivered).
    pub unacked: i64,
    /// Messages the devices published again after the broker had acknowledged them: a
    /// receipt named a later message but not them (lost between broker and ingest, or
    /// their receipt was), or none named them within 600 s.
    pub republished: u64,
    pub reconnects: u64,
    pub connect_failures: u64,
    /// Command subscriptions the broker refused (SUBACK 0x80), each tried again.
    pub subscribe_refusals: u64,
    pub assignment_refusals: u64,
    pub download_failures: u64,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub devices: usize,
    pub broker: Broker,
    /// `sled` or `postgresql`.
    pub store: &'static str,
    /// Control-plane replicas.
    pub replicas: usize,
    /// `--blobs` as given (none: a folder in the work directory).
    pub blobs: Option<String>,
    pub rate_per_device_per_s: f64,
    pub enroll_s: f64,
    /// Devices the control plane lists online after the connection phase.
    pub connected: usize,
    pub connect_s: Option<f64>,
    pub steady: Option<Steady>,
    pub rollout_install: Option<Phase>,
    pub rollout: Option<Phase>,
    pub rollback: Option<Phase>,
    /// How long the ingest took, once the devices stopped sending and their outboxes
    /// were empty, to store the last message (its backlog at the end).
    pub ingest_drain_s: Option<f64>,
    pub bundle_downloads: u64,
    pub bundle_bytes: u64,
    pub memory: Option<Memory>,
    pub cpu: Option<Cpu>,
    pub checks: Checks,
    pub open_file_limit: u64,
    /// Empty when the run did everything it should.
    pub failures: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    fn broker_name(&self) -> &'static str {
        match self.broker {
            Broker::Embedded => "broker",
            Broker::Mosquitto => "mosquitto",
            Broker::Nats => "NATS nodes",
        }
    }

    /// The human summary.
    pub fn table(&self) -> String {
        let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
        let secs = |s: Option<f64>| s.map_or("-".into(), |s| format!("{s:.1} s"));
        let phase = |p: &Option<Phase>| match p {
            Some(p) => format!(
                "{} (last device activated at {})",
                secs(Some(p.control_plane_s)),
                secs(p.devices_s)
            ),
            None => "-".into(),
        };
        let mut rows: Vec<(String, String)> = vec![
            (
                "devices enrolled".into(),
                format!("{} in {:.1} s", self.devices, self.enroll_s),
            ),
            (
                "online (control plane's view)".into(),
                format!(
                    "{} of {} in {}",
                    self.connected,
                    self.devices,
                    secs(self.connect_s)
                ),
            ),
        ];
        if let Some(s) = &self.steady {
            rows.push((
                "telemetry ingested".into(),
                format!(
                    "{:.1} msgs/s over {:.0} s (devices sent {:.1} msgs/s; backlog cleared in {:.1} s)",
                    s.ingested_per_s, s.seconds, s.sent_per_s, s.catch_up_s
                ),
            ));
        }
        rows.push((
            format!("rollout {MODEL}@1 (first install)"),
            phase(&self.rollout_install),
        ));
        rows.push((format!("rollout {MODEL}@1 → 2"), phase(&self.rollout)));
        rows.push((format!("rollback {MODEL}@2 → 1"), phase(&self.rollback)));
        rows.push((
            "ingest backlog at the end".into(),
            secs(self.ingest_drain_s),
        ));
        rows.push((
            "bundle downloads".into(),
            format!(
                "{} ({})",
                self.bundle_downloads,
                crate::output::human_size(self.bundle_bytes)
            ),
        ));
        if let Some(m) = &self.memory {
            rows.push((
                "control plane RSS".into(),
                format!(
                    "idle {}, enrolled {}, connected {}, end {}, peak {}",
                    mib(m.control_plane_idle_kib),
                    mib(m.control_plane_enrolled_kib),
                    mib(m.control_plane_connected_kib),
                    mib(m.control_plane_end_kib),
                    mib(m.control_plane_peak_kib)
                ),
            ));
            rows.push((
                "control plane memory per device".into(),
                format!("{:.1} KiB", m.control_plane_per_device_kib),
            ));
            if let (Some(i), Some(c), Some(p)) = (
                m.broker_idle_kib,
                m.broker_connected_kib,
                m.broker_per_device_kib,
            ) {
                rows.push((
                    format!("{} RSS", self.broker_name()),
                    format!(
                        "idle {}, connected {}, {p:.1} KiB per device",
                        mib(i),
                        mib(c)
                    ),
                ));
            }
            rows.push(("simulator RSS".into(), mib(m.simulator_kib)));
        }
        if let Some(c) = &self.cpu {
            rows.push((
                "CPU time".into(),
                format!(
                    "control plane {:.1} s, {}simulator {:.1} s",
                    c.control_plane_s,
                    c.broker_s.map_or(String::new(), |b| format!(
                        "{} {b:.1} s, ",
                        self.broker_name()
                    )),
                    c.simulator_s
                ),
            ));
        }
        let c = &self.checks;
        rows.push((
            "messages".into(),
            format!(
                "sealed {}, stored {}, duplicates {}, refused {}, gaps seen {}, unacked {}, re-published {}",
                c.sealed, c.stored, c.duplicates, c.refused, c.ingest_gaps, c.unacked, c.republished
            ),
        ));
        rows.push((
            "per-device check".into(),
            format!(
                "{} devices differ; {} sampled logs, {} with gaps",
                c.devices_mismatched, c.sample_devices, c.sample_gaps
            ),
        ));
        rows.push((
            "reconnects".into(),
            format!(
                "{} (failed connection attempts {}, command subscriptions refused {})",
                c.reconnects, c.connect_failures, c.subscribe_refusals
            ),
        ));
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        let mut out = format!(
            "fleetctl sim: {} devices, {} broker, {} store{}{}, {} msgs/device/s\n",
            self.devices,
            match self.broker {
                Broker::Embedded => "embedded",
                Broker::Mosquitto => "mosquitto",
                Broker::Nats => "3-node NATS",
            },
            self.store,
            match &self.blobs {
                Some(b) => format!(", blobs {b}"),
                None => String::new(),
            },
            if self.replicas > 1 {
                format!(", {} replicas", self.replicas)
            } else {
                String::new()
            },
            self.rate_per_device_per_s
        );
        for (k, v) in rows {
            out.push_str(&format!("  {k:<width$}  {v}\n"));
        }
        for f in &self.failures {
            out.push_str(&format!("  FAILED: {f}\n"));
        }
        out
    }
}
