//! A device state as a rollout reads it: each model's newest window report without its
//! per-feature figures, decoded straight from the stored bytes.
//!
//! A rollout's progress and gates read what a device runs, its lifecycle events, its
//! alerts and each window's counts, rates and latencies, never the window's per-feature
//! drift (most of a stored state's bytes: 2.8 of 4.5 KB for `fleetctl sim`'s devices).
//! The engine and the status view read every target's state, 10,000 of them for a big
//! fleet, at each step; decoding them brief skips those figures without allocating.
//!
//! The types here mirror [`DeviceState`] and [`WindowReport`] field by field, less the
//! skipped ones. The conversions name every field of the full types, so a field added
//! there does not compile until it is added here (or skipped on purpose).

use std::collections::{BTreeMap, BTreeSet};

use fleetml_protocol::telemetry::{
    self, EstimatedAccuracy, Outage, Quantiles, ShadowReport, Status, WindowReport,
};
use serde::Deserialize;

use super::DeviceState;

/// A [`DeviceState`] decoded brief: equal to [`DeviceState::brief`] of the full one.
#[derive(Debug, Clone, PartialEq)]
pub struct Brief(pub DeviceState);

impl<'de> Deserialize<'de> for Brief {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BriefState::deserialize(d).map(|s| Brief(s.into()))
    }
}

impl DeviceState {
    /// This state without what [`Brief`] skips: each window report's per-feature drift
    /// (`features`, `prediction`, `multivariate`), its `missing_ids` and its `events`.
    pub fn brief(mut self) -> DeviceState {
        for (_, w) in self.windows.values_mut() {
            w.features = Vec::new();
            w.prediction = None;
            w.multivariate = None;
            w.missing_ids = Vec::new();
            w.events = Vec::new();
        }
        self
    }
}

#[derive(Deserialize)]
struct BriefState {
    online: bool,
    last_seen_ms: Option<u64>,
    offline_since_ms: Option<u64>,
    status: Option<(u64, Status)>,
    windows: BTreeMap<String, (u64, BriefWindow)>,
    alerts: BTreeMap<String, BTreeSet<String>>,
    stored: u64,
    duplicates: u64,
    gaps: u64,
    last_seq: u64,
    #[serde(default)]
    lifecycle: Vec<(u64, telemetry::Event)>,
    #[serde(default)]
    will_seq: u64,
    #[serde(default)]
    sequence_restarts: u64,
}

impl From<BriefState> for DeviceState {
    fn from(s: BriefState) -> DeviceState {
        let BriefState {
            online,
            last_seen_ms,
            offline_since_ms,
            status,
            windows,
            alerts,
            stored,
            duplicates,
            gaps,
            last_seq,
            lifecycle,
            will_seq,
            sequence_restarts,
        } = s;
        DeviceState {
            online,
            last_seen_ms,
            offline_since_ms,
            status,
            windows: windows
                .into_iter()
                .map(|(model, (seq, w))| (model, (seq, w.into())))
                .collect(),
            alerts,
            stored,
            duplicates,
            gaps,
            last_seq,
            lifecycle,
            will_seq,
            sequence_restarts,
        }
    }
}

/// [`WindowReport`] less `features`, `prediction`, `multivariate`, `missing_ids` and
/// `events` (unknown fields are skipped, not refused: the full type refuses them).
#[derive(Deserialize)]
struct BriefWindow {
    model: String,
    version: u64,
    window: u64,
    start_ms: u64,
    end_ms: u64,
    predictions: u32,
    throughput_per_s: f64,
    missed: BTreeMap<String, u32>,
    missing_prediction_rate: f64,
    latency_us: Quantiles,
    lag_ms: Quantiles,
    #[serde(default)]
    batch_rows: Quantiles,
    outages: Vec<Outage>,
    outages_not_listed: u32,
    alerts: Vec<String>,
    #[serde(default)]
    labels: u32,
    #[serde(default)]
    live_accuracy: Option<f64>,
    #[serde(default)]
    live_mae: Option<f64>,
    #[serde(default)]
    estimated_accuracy: Option<EstimatedAccuracy>,
    #[serde(default)]
    shadow: Option<ShadowReport>,
}

impl From<BriefWindow> for WindowReport {
    fn from(w: BriefWindow) -> WindowReport {
        let BriefWindow {
            model,
            version,
            window,
            start_ms,
            end_ms,
            predictions,
            throughput_per_s,
            missed,
            missing_prediction_rate,
            latency_us,
            lag_ms,
            batch_rows,
            outages,
            outages_not_listed,
            alerts,
            labels,
            live_accuracy,
            live_mae,
            estimated_accuracy,
            shadow,
        } = w;
        WindowReport {
            model,
            version,
            window,
            start_ms,
            end_ms,
            predictions,
            throughput_per_s,
            missed,
            missing_prediction_rate,
            missing_ids: Vec::new(),
            latency_us,
            lag_ms,
            batch_rows,
            outages,
            outages_not_listed,
            features: Vec::new(),
            prediction: None,
            events: Vec::new(),
            alerts,
            labels,
            live_accuracy,
            live_mae,
            multivariate: None,
            estimated_accuracy,
            shadow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A window report with every field set, the skipped ones included.
    fn full_window(model: &str) -> WindowReport {
        let drift = |name: &str| {
            json!({
                "name": name, "values": 90, "missing_rate": 0.1, "out_of_range_rate": 0.0,
                "unseen_rate": 0.0, "psi": 0.3, "ks": 0.2, "js": 0.1, "chi2_p": null,
                "wasserstein": 0.4, "usefulness": null, "drifting": true,
                "moved": [{ "bin": "(10, 20]", "current": 0.5, "reference": 0.1 }]
            })
        };
        serde_json::from_value(json!({
            "model": model, "version": 3, "window": 7, "start_ms": 1000, "end_ms": 2000,
            "predictions": 90, "throughput_per_s": 1.5,
            "missed": { "backend": 2, "timeout": 1 }, "missing_prediction_rate": 0.03,
            "missing_ids": ["a", "b"],
            "latency_us": { "p50": 1, "p95": 2, "p99": 3 },
            "lag_ms": { "p50": 4, "p95": 5, "p99": 6 },
            "batch_rows": { "p50": 1, "p95": 8, "p99": 8 },
            "outages": [{ "start_ms": 1100, "end_ms": 1200, "missed": 3 }],
            "outages_not_listed": 1,
            "features": [drift("temp"), drift("rpm")], "prediction": drift("prediction"),
            "events": [{ "subject": "temp", "transition": "raised" }],
            "alerts": ["temp"], "labels": 5, "live_accuracy": 0.9, "live_mae": 0.2,
            "multivariate": drift("reconstruction_error"),
            "estimated_accuracy": { "accuracy": 0.8, "limit": 0.7, "predictions": 80, "alerting": false },
            "shadow": {
                "version": 4, "runs": 9, "shed": 1, "failed": 0, "rows": 9, "agreement": 0.9,
                "latency_us": { "p50": 1, "p95": 2, "p99": 3 },
                "prediction": drift("prediction"), "alerts": ["prediction"]
            }
        }))
        .expect("a full window report")
    }

    fn full_state() -> DeviceState {
        let status = serde_json::from_value(json!({
            "agent_version": "1", "board": "pi", "backends": ["cpu"], "uptime_s": 5,
            "online": true, "outbox_depth": 2, "dropped_windows": 1, "will_seq": 9,
            "models": [{ "name": "claims", "version": 3, "backend": "cpu", "fallbacks": ["gpu: none"] }]
        }))
        .expect("a status");
        let event = serde_json::from_value(
            json!({ "kind": "activated", "model": "claims", "version": 3, "detail": "ok" }),
        )
        .expect("an event");
        DeviceState {
            online: true,
            last_seen_ms: Some(5),
            offline_since_ms: Some(4),
            status: Some((8, status)),
            windows: [("claims", 9), ("scores", 10)]
                .into_iter()
                .map(|(m, seq)| (m.to_string(), (seq, full_window(m))))
                .collect(),
            alerts: [("claims".to_string(), ["temp".to_string()].into())].into(),
            stored: 11,
            duplicates: 1,
            gaps: 2,
            last_seq: 10,
            lifecycle: vec![(3, event)],
            will_seq: 9,
            sequence_restarts: 1,
        }
    }

    #[test]
    fn a_brief_decode_is_the_full_state_less_the_per_feature_figures() {
        let full = full_state();
        let bytes = serde_cbor::to_vec(&full).expect("encoded");
        let Brief(brief) = serde_cbor::from_slice(&bytes).expect("decoded brief");
        assert_eq!(brief, full.clone().brief());
        // It skipped what it should, and kept the rest.
        let w = &brief.windows["claims"].1;
        assert!(w.features.is_empty() && w.prediction.is_none() && w.multivariate.is_none());
        assert!(w.missing_ids.is_empty() && w.events.is_empty());
        assert_eq!(w.shadow, full.windows["claims"].1.shadow);
        assert_ne!(brief, full);
        // Brief of brief changes nothing; a state without windows is its own brief.
        assert_eq!(brief.clone().brief(), brief);
        let bare = DeviceState {
            windows: BTreeMap::new(),
            ..full.clone()
        };
        let bytes = serde_cbor::to_vec(&bare).expect("encoded");
        let Brief(b) = serde_cbor::from_slice(&bytes).expect("decoded brief");
        assert_eq!(b, bare);
    }

    #[test]
    fn a_state_stored_before_the_newer_fields_decodes_brief_too() {
        // Fields with serde defaults may be absent in older records.
        let mut v = serde_cbor::value::to_value(full_state()).expect("a value");
        let serde_cbor::Value::Map(m) = &mut v else {
            panic!("a state is a map");
        };
        for k in ["lifecycle", "will_seq", "sequence_restarts"] {
            m.remove(&serde_cbor::Value::Text(k.into()));
        }
        let bytes = serde_cbor::to_vec(&v).expect("encoded");
        let full: DeviceState = serde_cbor::from_slice(&bytes).expect("decoded");
        let Brief(brief) = serde_cbor::from_slice(&bytes).expect("decoded brief");
        assert_eq!(brief, full.brief());
    }
}
