//! The fleet-level series of `/metrics`: what Grafana dashboards and Prometheus rules
//! need to watch the fleet without a series per device. Labels are bounded by what
//! operators name — model, version, board, the rollouts in progress, rule names — never
//! by device. [`render`] turns a [`Snapshot`] into Prometheus' text format (pure); each
//! replica's server refreshes its [`FleetMetrics`] every [`EVERY`], so a scrape never
//! reads the store and every replica answers the same numbers (dashboards aggregate with
//! `max`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::RwLock;
use std::time::Duration;

use crate::alerts::conditions::NOT_DRIFT;
use crate::records::AlertRecord;
use crate::snapshot::Snapshot;

/// How often each replica recomputes the fleet-level series.
pub const EVERY: Duration = Duration::from_secs(15);

/// Every fleet-level series: name, type, help. `render` writes each one's `# HELP` and
/// `# TYPE` even when it has no sample, so a dashboard's queries can be checked against
/// a fresh control plane (`hil-tests`' Grafana test does).
pub const SERIES: &[(&str, &str, &str)] = &[
    (
        "fleetml_fleet_devices",
        "gauge",
        "Enrolled devices (not revoked) by board and state: online, offline (its last will arrived), never_seen.",
    ),
    (
        "fleetml_fleet_model_devices",
        "gauge",
        "Devices whose newest status reports the model version running, by model, version, board and online.",
    ),
    (
        "fleetml_fleet_drift_alerts_open",
        "gauge",
        "Devices with an open drift alert (a feature, the predictions, the reconstruction error or estimated accuracy) by model, version, board.",
    ),
    (
        "fleetml_fleet_missing_prediction_rate",
        "gauge",
        "Mean over devices of the missing-prediction rate in each device's newest window, by model, version, board.",
    ),
    (
        "fleetml_fleet_latency_p95_seconds",
        "gauge",
        "Median over devices of the p95 prediction latency in each device's newest window, by model, version, board.",
    ),
    (
        "fleetml_fleet_latency_p95_max_seconds",
        "gauge",
        "Highest p95 prediction latency of any device's newest window, by model, version, board.",
    ),
    (
        "fleetml_fleet_predictions_per_second",
        "gauge",
        "Sum over devices of the prediction rate in each device's newest window, by model, version, board.",
    ),
    (
        "fleetml_fleet_shadow_agreement",
        "gauge",
        "Shadow versions: the row-weighted share of classes agreeing with the served answers in the devices' newest windows, by model, version (served), shadow_version, board.",
    ),
    (
        "fleetml_fleet_shadow_shed",
        "gauge",
        "Shadow versions: requests not run in shadow in the devices' newest windows (devices busy or over the shadow's CPU share), by model, version, shadow_version, board.",
    ),
    (
        "fleetml_fleet_rollouts",
        "gauge",
        "Rollouts and rollbacks by state.",
    ),
    (
        "fleetml_fleet_rollout_devices",
        "gauge",
        "Devices of each running or paused rollout by progress: waiting, pending, downloading, active, failed.",
    ),
    (
        "fleetml_fleet_jobs",
        "gauge",
        "Retraining jobs by state: queued, running, succeeded, failed, cancelled.",
    ),
    (
        "fleetml_fleet_alerts",
        "gauge",
        "The notifier's alerts by alertname, severity and state (pending, firing, resolved).",
    ),
    (
        "fleetml_fleet_metrics_age_seconds",
        "gauge",
        "Seconds since these fleet-level series were computed.",
    ),
];

/// The last rendering and when it was made.
#[derive(Debug, Default)]
pub struct FleetMetrics {
    text: RwLock<(String, u64)>,
}

impl FleetMetrics {
    /// The series as of the last refresh, with their age at `now_ms`.
    pub fn text(&self, now_ms: u64) -> String {
        let guard = self.text.read().unwrap_or_else(|p| p.into_inner());
        let (text, at) = &*guard;
        if text.is_empty() {
            return String::new();
        }
        let age = now_ms.saturating_sub(*at) as f64 / 1000.0;
        format!("{text}fleetml_fleet_metrics_age_seconds {age}\n")
    }

    /// Replaces the series with `text`, computed at `at_ms`.
    pub fn set(&self, text: String, at_ms: u64) {
        *self.text.write().unwrap_or_else(|p| p.into_inner()) = (text, at_ms);
    }
}

/// `"`, `\` and newlines escaped, as the text format wants label values.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Model, served version, shadow version, board.
type ShadowKey = (String, String, String, String);

#[derive(Default)]
struct PerModel {
    drifting: u64,
    missing: Vec<f64>,
    p95_s: Vec<f64>,
    per_second: f64,
}

/// The fleet-level series for `snap` and the notifier's `alerts`, in the text format
/// (without the age series, which [`FleetMetrics::text`] adds).
pub fn render(snap: &Snapshot, alerts: &[AlertRecord]) -> String {
    let mut devices: BTreeMap<(String, &str), u64> = BTreeMap::new();
    let mut running: BTreeMap<(String, String, String, &str), u64> = BTreeMap::new();
    let mut models: BTreeMap<(String, String, String), PerModel> = BTreeMap::new();
    for (d, st) in &snap.devices {
        let board = d.board.clone().unwrap_or_else(|| "unknown".into());
        let state = match (st.last_seen_ms, st.online) {
            (None, _) => "never_seen",
            (Some(_), true) => "online",
            (Some(_), false) => "offline",
        };
        *devices.entry((board.clone(), state)).or_default() += 1;
        if let Some((_, status)) = &st.status {
            for m in &status.models {
                let online = if st.online { "true" } else { "false" };
                *running
                    .entry((m.name.clone(), m.version.to_string(), board.clone(), online))
                    .or_default() += 1;
            }
        }
        for (model, (_, w)) in &st.windows {
            let e = models
                .entry((model.clone(), w.version.to_string(), board.clone()))
                .or_default();
            e.missing.push(w.missing_prediction_rate);
            if let Some(p95) = w.latency_us.p95 {
                e.p95_s.push(p95 as f64 / 1e6);
            }
            e.per_second += w.throughput_per_s;
        }
        for (model, subjects) in &st.alerts {
            if subjects.iter().any(|s| !NOT_DRIFT.contains(&s.as_str())) {
                let version = st
                    .windows
                    .get(model)
                    .map_or_else(|| "unknown".to_string(), |(_, w)| w.version.to_string());
                models
                    .entry((model.clone(), version, board.clone()))
                    .or_default()
                    .drifting += 1;
            }
        }
    }
    // (agreeing rows, classified rows, shed) per model, served version, shadow version, board.
    let mut shadows: BTreeMap<ShadowKey, (f64, u64, u64)> = BTreeMap::new();
    for (d, st) in &snap.devices {
        let board = d.board.clone().unwrap_or_else(|| "unknown".into());
        for (model, (_, w)) in &st.windows {
            if let Some(sh) = &w.shadow {
                let e = shadows
                    .entry((
                        model.clone(),
                        w.version.to_string(),
                        sh.version.to_string(),
                        board.clone(),
                    ))
                    .or_default();
                if let Some(a) = sh.agreement {
                    e.0 += a * f64::from(sh.rows);
                    e.1 += u64::from(sh.rows);
                }
                e.2 += u64::from(sh.shed);
            }
        }
    }
    let mut rollouts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut progress: BTreeMap<(String, String, String, &str), u64> = BTreeMap::new();
    let states: BTreeMap<_, _> = snap.devices.iter().map(|(d, s)| (&d.id, s)).collect();
    for r in &snap.rollouts {
        *rollouts.entry(r.state.as_str()).or_default() += 1;
        if r.state.is_final() {
            continue;
        }
        let version = r
            .version
            .map_or_else(|| "previous".to_string(), |v| v.to_string());
        for label in ["waiting", "pending", "downloading", "active", "failed"] {
            progress.insert((r.id.clone(), r.model.clone(), version.clone(), label), 0);
        }
        for t in &r.targets {
            let p = r.progress(t, states.get(&t.device).copied());
            *progress
                .entry((r.id.clone(), r.model.clone(), version.clone(), p.label()))
                .or_default() += 1;
        }
    }
    let mut jobs: BTreeMap<String, u64> = BTreeMap::new();
    for j in &snap.jobs {
        *jobs
            .entry(format!("{:?}", j.state).to_lowercase())
            .or_default() += 1;
    }
    let mut alert_counts: BTreeMap<(String, String, &str), u64> = BTreeMap::new();
    for a in alerts {
        let get = |k: &str| a.labels.get(k).cloned().unwrap_or_default();
        *alert_counts
            .entry((
                get("alertname"),
                get("severity"),
                crate::alerts::engine::state_of(a),
            ))
            .or_default() += 1;
    }

    let mut out = String::new();
    let head = |out: &mut String, name: &str| {
        if let Some((_, kind, help)) = SERIES.iter().find(|(n, _, _)| *n == name) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
    };
    head(&mut out, "fleetml_fleet_devices");
    for ((board, state), n) in &devices {
        let _ = writeln!(
            out,
            "fleetml_fleet_devices{} {n}",
            labels(&[("board", board), ("state", state)])
        );
    }
    head(&mut out, "fleetml_fleet_model_devices");
    for ((model, version, board, online), n) in &running {
        let l = labels(&[
            ("model", model),
            ("version", version),
            ("board", board),
            ("online", online),
        ]);
        let _ = writeln!(out, "fleetml_fleet_model_devices{l} {n}");
    }
    let per_model = |out: &mut String, name: &str, value: &dyn Fn(&PerModel) -> Option<f64>| {
        for ((model, version, board), m) in &models {
            if let Some(v) = value(m) {
                let l = labels(&[("model", model), ("version", version), ("board", board)]);
                let _ = writeln!(out, "{name}{l} {v}");
            }
        }
    };
    head(&mut out, "fleetml_fleet_drift_alerts_open");
    per_model(&mut out, "fleetml_fleet_drift_alerts_open", &|m| {
        Some(m.drifting as f64)
    });
    head(&mut out, "fleetml_fleet_missing_prediction_rate");
    per_model(&mut out, "fleetml_fleet_missing_prediction_rate", &|m| {
        (!m.missing.is_empty()).then(|| m.missing.iter().sum::<f64>() / m.missing.len() as f64)
    });
    head(&mut out, "fleetml_fleet_latency_p95_seconds");
    per_model(&mut out, "fleetml_fleet_latency_p95_seconds", &|m| {
        median(&m.p95_s)
    });
    head(&mut out, "fleetml_fleet_latency_p95_max_seconds");
    per_model(&mut out, "fleetml_fleet_latency_p95_max_seconds", &|m| {
        m.p95_s.iter().copied().reduce(f64::max)
    });
    head(&mut out, "fleetml_fleet_predictions_per_second");
    per_model(&mut out, "fleetml_fleet_predictions_per_second", &|m| {
        (!m.missing.is_empty()).then_some(m.per_second)
    });
    let shadow_labels = |(model, version, shadow, board): &ShadowKey| {
        labels(&[
            ("model", model),
            ("version", version),
            ("shadow_version", shadow),
            ("board", board),
        ])
    };
    head(&mut out, "fleetml_fleet_shadow_agreement");
    for (k, (agreed, rows, _)) in &shadows {
        if *rows > 0 {
            let _ = writeln!(
                out,
                "fleetml_fleet_shadow_agreement{} {}",
                shadow_labels(k),
                agreed / *rows as f64
            );
        }
    }
    head(&mut out, "fleetml_fleet_shadow_shed");
    for (k, (_, _, shed)) in &shadows {
        let _ = writeln!(out, "fleetml_fleet_shadow_shed{} {shed}", shadow_labels(k));
    }
    head(&mut out, "fleetml_fleet_rollouts");
    for (state, n) in &rollouts {
        let _ = writeln!(
            out,
            "fleetml_fleet_rollouts{} {n}",
            labels(&[("state", state)])
        );
    }
    head(&mut out, "fleetml_fleet_rollout_devices");
    for ((id, model, version, state), n) in &progress {
        let l = labels(&[
            ("rollout", id),
            ("model", model),
            ("version", version),
            ("state", state),
        ]);
        let _ = writeln!(out, "fleetml_fleet_rollout_devices{l} {n}");
    }
    head(&mut out, "fleetml_fleet_jobs");
    for (state, n) in &jobs {
        let _ = writeln!(out, "fleetml_fleet_jobs{} {n}", labels(&[("state", state)]));
    }
    head(&mut out, "fleetml_fleet_alerts");
    for ((name, severity, state), n) in &alert_counts {
        let l = labels(&[
            ("alertname", name),
            ("severity", severity),
            ("state", state),
        ]);
        let _ = writeln!(out, "fleetml_fleet_alerts{l} {n}");
    }
    head(&mut out, "fleetml_fleet_metrics_age_seconds");
    out
}

fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{DeviceRecord, DeviceState};
    use fleetml_protocol::telemetry::DeviceId;

    fn device(id: &str, board: &str, online: bool, p95_us: u64) -> (DeviceRecord, DeviceState) {
        let window: fleetml_protocol::telemetry::WindowReport = serde_json::from_value(serde_json::json!({
            "model": "claims", "version": 2, "window": 1, "start_ms": 0, "end_ms": 1000,
            "predictions": 10, "throughput_per_s": 10.0, "missed": {}, "missing_prediction_rate": 0.1,
            "missing_ids": [], "latency_us": {"p50": 1, "p95": p95_us, "p99": null},
            "lag_ms": {"p50": null, "p95": null, "p99": null}, "outages": [], "outages_not_listed": 0,
            "features": [], "prediction": null, "events": [], "alerts": ["age"],
        }))
        .expect("a window report");
        let mut st = DeviceState {
            online,
            last_seen_ms: Some(1),
            ..Default::default()
        };
        st.windows.insert("claims".into(), (5, window));
        st.alerts
            .insert("claims".into(), ["age".to_string()].into());
        (
            DeviceRecord {
                id: DeviceId::new(id).expect("id"),
                board: Some(board.into()),
                tags: Default::default(),
                secret: vec![1; 32],
                enrolled_ms: 0,
                revoked_ms: None,
            },
            st,
        )
    }

    #[test]
    fn series_are_per_model_version_and_board_never_per_device() {
        let snap = Snapshot {
            devices: (0..50)
                .map(|i| device(&format!("d{i}"), "rpi4", i % 2 == 0, 1_000 * (i + 1)))
                .collect(),
            ..Default::default()
        };
        let text = render(&snap, &[]);
        assert!(!text.contains("d1"), "no device label");
        assert!(
            text.contains("fleetml_fleet_devices{board=\"rpi4\",state=\"online\"} 25\n"),
            "{text}"
        );
        assert!(text.contains(
            "fleetml_fleet_drift_alerts_open{model=\"claims\",version=\"2\",board=\"rpi4\"} 50\n"
        ));
        assert!(text.contains(
            "fleetml_fleet_latency_p95_max_seconds{model=\"claims\",version=\"2\",board=\"rpi4\"} 0.05\n"
        ));
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{series} in\n{text}"))
        };
        let group = "{model=\"claims\",version=\"2\",board=\"rpi4\"}";
        let p95 = value(&format!("fleetml_fleet_latency_p95_seconds{group}"));
        assert!((p95 - 0.0255).abs() < 1e-9, "median of 1..50 ms: {p95}");
        let missing = value(&format!("fleetml_fleet_missing_prediction_rate{group}"));
        assert!((missing - 0.1).abs() < 1e-9, "{missing}");
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert!(samples < 10, "{samples} samples for 50 devices:\n{text}");
        for (name, _, _) in SERIES {
            assert!(text.contains(&format!("# TYPE {name} gauge")), "{name}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("board", "a\"b\\c\nd")]),
            "{board=\"a\\\"b\\\\c\\nd\"}"
        );
    }
}
