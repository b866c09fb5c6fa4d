//! The agent side of monitoring: feeds every prediction (and every input that got none)
//! of a model into its `fleetml-monitor` core, keeps the closed windows and alerts
//! (in memory for the API, in sled for inspection on site after a restart), reconciles
//! the ids an application declared it expects (`POST /v1/expect`), and computes
//! occlusion explanations.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use fleetml_monitor::{
    FeatureReport, MissReason, Monitor, Observation, Subject, Thresholds, Transition, WindowConfig,
    WindowReport,
};
use fleetml_protocol::features::{FeatureSchema, FeatureType, RawValue};
use fleetml_protocol::manifest::MonitoringPolicy;
use fleetml_protocol::reference::{RECONSTRUCTION_ERROR, ReferenceProfile, argmax};
use fleetml_protocol::telemetry;
use serde_json::{Value, json};

/// Windows kept in memory per model for `GET /v1/models/{name}/monitoring`.
const KEPT_IN_MEMORY: usize = 64;
/// Windows kept in sled per model (older ones are deleted as new ones arrive).
pub const KEPT_ON_DISK: u64 = 2016;
/// Ids an application may have outstanding per model (`POST /v1/expect`).
pub const MAX_EXPECTED: usize = 100_000;
/// Missing ids listed in a window report.
const MISSING_IDS_LISTED: usize = 10;

/// The window and thresholds for a model: the agent's setting where it has one, else
/// the bundle's, else the default.
pub fn settings(
    agent: &MonitoringPolicy,
    bundle: &MonitoringPolicy,
) -> Result<(WindowConfig, Thresholds), String> {
    agent
        .validate()
        .map_err(|e| format!("agent configuration: {e}"))?;
    let w = WindowConfig::default();
    let t = Thresholds::default();
    macro_rules! pick {
        ($f:ident) => {
            agent.$f.or(bundle.$f)
        };
    }
    let window_predictions = pick!(window_predictions).unwrap_or(w.max_predictions);
    Ok((
        WindowConfig {
            max_predictions: window_predictions,
            max_duration_ms: pick!(window_seconds).map_or(w.max_duration_ms, |s| s * 1000),
        },
        Thresholds {
            psi: pick!(drift_psi).unwrap_or(t.psi),
            js: pick!(drift_js).unwrap_or(t.js),
            chi2_p: pick!(drift_chi2_p).unwrap_or(t.chi2_p),
            unseen_rate: pick!(unseen_rate).unwrap_or(t.unseen_rate),
            missing_rate: pick!(missing_rate).unwrap_or(t.missing_rate),
            min_estimated_accuracy: pick!(min_estimated_accuracy),
            lag_p95_ms: pick!(lag_p95_ms).unwrap_or(t.lag_p95_ms),
            // Set explicitly (agent or bundle), a threshold holds for every feature;
            // otherwise each feature's calibrated one, when its profile has some.
            fixed: fleetml_monitor::Fixed {
                psi: pick!(drift_psi).is_some(),
                js: pick!(drift_js).is_some(),
                chi2_p: pick!(drift_chi2_p).is_some(),
            },
            windows: pick!(alert_windows).unwrap_or(t.windows),
            // A window smaller than the default minimum still moves alerts.
            min_predictions: t.min_predictions.min(window_predictions),
        },
    ))
}

/// How the model's predictions are summarized for prediction drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionKind {
    /// Arg-max of the first output's last axis, against the reference class counts.
    Classes,
    /// The first output's first column, against the reference score bins.
    Score,
}

/// Where window reports go besides memory.
#[derive(Debug, Clone)]
pub struct Sink {
    db: sled::Db,
    /// Fleet messaging: closed windows and alert transitions are queued here too.
    pub telemetry: Option<std::sync::Arc<crate::telemetry::Telemetry>>,
}

impl Sink {
    /// Opens (or creates) the monitoring database at `path`.
    pub fn open(path: &Path) -> Result<Sink, String> {
        let db = crate::store::open_sled(path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        Ok(Sink {
            db,
            telemetry: None,
        })
    }

    fn store(&self, model: &str, seq: u64, report: &Value) {
        let tree = match self.db.open_tree(format!("windows/{model}")) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(model, "cannot store a monitoring window: {e}");
                return;
            }
        };
        let key = seq.to_be_bytes();
        let bytes = serde_json::to_vec(report).unwrap_or_default();
        if let Err(e) = tree.insert(key, bytes) {
            tracing::warn!(model, "cannot store a monitoring window: {e}");
        }
        while tree.len() as u64 > KEPT_ON_DISK {
            match tree.pop_min() {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        // No flush here: this runs on the request path once per window, and sled
        // flushes on its own every 500 ms (a power cut loses at most that much history).
    }

    /// The last `limit` stored windows of `model`, oldest first.
    pub fn windows(&self, model: &str, limit: usize) -> Vec<Value> {
        let Ok(tree) = self.db.open_tree(format!("windows/{model}")) else {
            return Vec::new();
        };
        let mut out: Vec<Value> = tree
            .iter()
            .rev()
            .take(limit)
            .filter_map(|kv| kv.ok())
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect();
        out.reverse();
        out
    }

    /// The next window sequence number for `model` (windows survive restarts).
    fn next_seq(&self, model: &str) -> u64 {
        self.db
            .open_tree(format!("windows/{model}"))
            .ok()
            .and_then(|t| t.last().ok().flatten())
            .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_ref()).ok())
            .map(|k| u64::from_be_bytes(k) + 1)
            .unwrap_or(0)
    }
}

#[derive(Debug, Default)]
struct Expected {
    /// id → deadline (ms since epoch).
    deadlines: HashMap<String, u64>,
    /// Ids past their deadline since the last window closed, for the report.
    overdue_sample: Vec<String>,
    overdue: u64,
}

#[derive(Debug)]
struct State {
    core: Box<Monitor>,
    history: VecDeque<Value>,
    expected: Expected,
    /// Offset added to the core's window numbers (windows stored before a restart).
    seq_base: u64,
    /// Ground truth received in the current window.
    labels: Labels,
}

/// Ground-truth outcomes of one window.
#[derive(Debug, Default, Clone, Copy)]
struct Labels {
    count: u32,
    classified: u32,
    correct: u32,
    scored: u32,
    abs_error: f64,
}

/// How a prediction compared with the ground truth that arrived for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// A classification, right or wrong.
    Classified { correct: bool },
    /// A score, off by this much.
    Scored { abs_error: f64 },
}

/// Latencies and absolute differences of shadow runs kept per window for their
/// quantiles (the first ones; the counts, sums and maxima go on).
const SHADOW_LATENCIES_KEPT: usize = 4096;

/// A shadow version beside the served one: what its runs showed in the current window,
/// reported with the served model's window ([`telemetry::ShadowReport`]). The shadow's
/// own monitor (its prediction drift against its own reference) closes its window when
/// the served one does.
#[derive(Debug)]
pub struct Comparison {
    pub version: u64,
    monitor: Option<Arc<ModelMonitor>>,
    counts: Mutex<ShadowCounts>,
}

#[derive(Debug, Default)]
struct ShadowCounts {
    runs: u32,
    shed: u32,
    failed: u32,
    rows: u32,
    classified: u32,
    agreed: u32,
    scored: u32,
    abs_error_sum: f64,
    abs_error_max: f64,
    latencies_us: Vec<u64>,
    abs_errors: Vec<f64>,
}

impl Comparison {
    /// The comparison with shadow `version`, whose own monitor is `monitor`.
    pub fn new(version: u64, monitor: Option<Arc<ModelMonitor>>) -> Comparison {
        Comparison {
            version,
            monitor,
            counts: Mutex::new(ShadowCounts::default()),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, ShadowCounts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shadow's own monitor.
    pub fn monitor(&self) -> Option<&Arc<ModelMonitor>> {
        self.monitor.as_ref()
    }

    /// A request not run in shadow to keep serving unhindered.
    pub fn shed(&self) {
        self.counts().shed += 1;
    }

    /// A shadow run that failed.
    pub fn failed(&self) {
        let mut c = self.counts();
        c.runs += 1;
        c.failed += 1;
    }

    /// A shadow run of `latency_us`: the first output's rows as answered and as the
    /// shadow computed them. Rows of several values compare by class (arg-max), rows
    /// of one by absolute difference.
    pub fn ran(&self, answered: &[Vec<f32>], shadow: &[Vec<f32>], latency_us: u64) {
        let mut c = self.counts();
        c.runs += 1;
        if c.latencies_us.len() < SHADOW_LATENCIES_KEPT {
            c.latencies_us.push(latency_us);
        }
        for (a, b) in answered.iter().zip(shadow) {
            c.rows += 1;
            if a.len() > 1 && b.len() > 1 {
                c.classified += 1;
                c.agreed += u32::from(argmax(a) == argmax(b));
            } else if let (Some(x), Some(y)) = (a.first(), b.first()) {
                let d = (f64::from(*x) - f64::from(*y)).abs();
                c.scored += 1;
                c.abs_error_sum += d;
                c.abs_error_max = c.abs_error_max.max(d);
                if c.abs_errors.len() < SHADOW_LATENCIES_KEPT {
                    c.abs_errors.push(d);
                }
            }
        }
    }

    /// The window's report, closing the shadow monitor's window at `now`; the counts
    /// start again.
    pub(crate) fn take(&self, now: u64) -> telemetry::ShadowReport {
        let mut c = std::mem::take(&mut *self.counts());
        c.latencies_us.sort_unstable();
        let q = |p: f64| -> Option<u64> {
            let n = c.latencies_us.len();
            (n > 0).then(|| c.latencies_us[((n - 1) as f64 * p).round() as usize])
        };
        c.abs_errors.sort_by(f64::total_cmp);
        let e = |p: f64| -> Option<f64> {
            let n = c.abs_errors.len();
            (n > 0).then(|| c.abs_errors[((n - 1) as f64 * p).round() as usize])
        };
        let own = self.monitor.as_ref().and_then(|m| m.close_window(now));
        telemetry::ShadowReport {
            version: self.version,
            runs: c.runs,
            shed: c.shed,
            failed: c.failed,
            rows: c.rows,
            agreement: (c.classified > 0).then(|| f64::from(c.agreed) / f64::from(c.classified)),
            mean_abs_error: (c.scored > 0).then(|| c.abs_error_sum / f64::from(c.scored)),
            max_abs_error: (c.scored > 0).then_some(c.abs_error_max),
            abs_error_p50: e(0.5),
            abs_error_p95: e(0.95),
            latency_us: telemetry::Quantiles {
                p50: q(0.5),
                p95: q(0.95),
                p99: q(0.99),
            },
            prediction: own.as_ref().and_then(|w| w.prediction.clone()),
            alerts: own.map(|w| w.alerts).unwrap_or_default(),
        }
    }
}

/// The monitor of one served model version.
#[derive(Debug)]
pub struct ModelMonitor {
    pub model: String,
    pub version: u64,
    features: Vec<(String, FeatureType, Vec<String>)>,
    /// What each bin of each feature is (`(10, 20]`, `auto`, `other`), and of the
    /// predictions: how a report names the bins that moved.
    bin_labels: Vec<Vec<String>>,
    prediction_labels: Vec<String>,
    /// The reconstruction error's bins, when the profile has a multivariate reference.
    error_labels: Vec<String>,
    /// Whether each prediction's confidence feeds an accuracy estimate.
    estimates: bool,
    /// The thresholds the bundle's builder calibrated, shown by [`Self::view`].
    calibration: Option<fleetml_protocol::reference::Calibration>,
    baselines: Vec<RawValue>,
    prediction: Option<PredictionKind>,
    config: WindowConfig,
    state: Mutex<State>,
    sink: Option<Sink>,
    /// The shadow version running beside this one, when there is one.
    comparison: Mutex<Option<Arc<Comparison>>>,
}

impl ModelMonitor {
    /// Builds the monitor of `model` v`version` from its schema and reference profile.
    pub fn new(
        model: &str,
        version: u64,
        schema: &FeatureSchema,
        profile: &ReferenceProfile,
        config: WindowConfig,
        thresholds: Thresholds,
        sink: Option<Sink>,
    ) -> Result<ModelMonitor, String> {
        // The thresholds the bundle's builder calibrated for a subject, per window size.
        let limits_of =
            |name: &str| fleetml_monitor::profile::limits(profile.calibration.as_ref(), name);
        let mut baselines = Vec::with_capacity(schema.features.len());
        let mut bin_labels = Vec::with_capacity(schema.features.len());
        for f in &schema.features {
            let p = profile
                .features
                .iter()
                .find(|p| p.name == f.name)
                .ok_or_else(|| format!("the reference profile has no feature `{}`", f.name))?;
            let baseline = match (&p.numeric, &p.categorical) {
                (Some(n), _) => RawValue::Number(median(&n.edges, &n.counts, n.min)),
                (None, Some(c)) => RawValue::Text(
                    c.counts
                        .iter()
                        .enumerate()
                        .max_by_key(|(_, n)| **n)
                        .map(|(i, _)| c.values[i].clone())
                        .unwrap_or_default(),
                ),
                (None, None) => RawValue::Missing,
            };
            baselines.push(baseline);
            bin_labels.push(match (&p.numeric, &p.categorical) {
                (Some(n), _) => range_labels(&n.edges),
                (None, Some(c)) => category_labels(&c.values),
                (None, None) => Vec::new(),
            });
        }
        let (prediction, prediction_reference) = match profile.predictions.first() {
            Some(o) if !o.class_counts.is_empty() => (
                Some(PredictionKind::Classes),
                Some(
                    fleetml_monitor::profile::classes(&o.class_counts)
                        .and_then(|r| r.with_limits(&limits_of("prediction")))
                        .map_err(|e| format!("predictions: {e}"))?,
                ),
            ),
            Some(o) => match o.scores.first() {
                Some(n) => (
                    Some(PredictionKind::Score),
                    Some(
                        fleetml_monitor::profile::numeric(n)
                            .and_then(|r| r.with_limits(&limits_of("prediction")))
                            .map_err(|e| format!("predictions: {e}"))?,
                    ),
                ),
                None => (None, None),
            },
            None => (None, None),
        };
        let prediction_labels = match profile.predictions.first() {
            Some(o) if !o.class_counts.is_empty() => category_labels(
                &(0..o.class_counts.len())
                    .map(|k| format!("class {k}"))
                    .collect::<Vec<_>>(),
            ),
            Some(o) => o
                .scores
                .first()
                .map(|n| range_labels(&n.edges))
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let names: Vec<&str> = schema.features.iter().map(|f| f.name.as_str()).collect();
        let mut core = Monitor::new(
            &fleetml_monitor::profile::references(profile, &names)?,
            prediction_reference,
            config,
            thresholds,
        )
        .map_err(|e| e.to_string())?;
        // A multivariate model or calibration map the monitoring core cannot hold costs
        // that monitor only, not the features'.
        let mut error_labels = Vec::new();
        if let Some(m) = &profile.multivariate {
            match fleetml_monitor::profile::multivariate(m, &names, profile.calibration.as_ref()) {
                Ok((pca, error)) => {
                    core = core.with_multivariate(pca, error);
                    error_labels = range_labels(&m.error.edges);
                }
                Err(e) => {
                    tracing::warn!(model, version, error = %e, "not watching the reconstruction error")
                }
            }
        }
        let estimates = match (&profile.performance, prediction) {
            (Some(p), Some(PredictionKind::Classes)) => {
                match fleetml_monitor::profile::performance(p) {
                    Ok(cbpe) => {
                        core = core.with_performance(cbpe);
                        true
                    }
                    Err(e) => {
                        tracing::warn!(model, version, error = %e, "not estimating accuracy");
                        false
                    }
                }
            }
            _ => false,
        };
        let seq_base = sink.as_ref().map(|s| s.next_seq(model)).unwrap_or(0);
        Ok(ModelMonitor {
            model: model.to_string(),
            version,
            features: schema
                .features
                .iter()
                .map(|f| (f.name.clone(), f.kind, f.values.clone()))
                .collect(),
            bin_labels,
            prediction_labels,
            error_labels,
            estimates,
            calibration: profile.calibration.clone(),
            baselines,
            prediction,
            config,
            state: Mutex::new(State {
                core: Box::new(core),
                history: VecDeque::new(),
                expected: Expected::default(),
                seq_base,
                labels: Labels::default(),
            }),
            sink,
            comparison: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reference baseline of each feature (median or most frequent category): what
    /// an occlusion explanation replaces a feature with.
    pub fn baselines(&self) -> &[RawValue] {
        &self.baselines
    }

    /// Records the predictions of a batch made at `now` (milliseconds since the epoch):
    /// raw feature rows (schema order; empty for raw tensor requests), the first output's
    /// values per row, latency, lag, and the ids the rows carried.
    #[allow(clippy::too_many_arguments)]
    pub fn predicted(
        &self,
        now: u64,
        rows: &[Vec<RawValue>],
        outputs: &[Vec<f32>],
        latency_us: u64,
        lag_ms: Option<u64>,
        ids: &[String],
    ) {
        let mut observations: Vec<Observation> = Vec::with_capacity(self.features.len());
        let mut state = self.lock();
        for id in ids {
            state.expected.deadlines.remove(id);
        }
        let count = rows.len().max(outputs.len());
        for r in 0..count {
            observations.clear();
            if let Some(row) = rows.get(r) {
                for ((_, kind, values), v) in self.features.iter().zip(row) {
                    observations.push(fleetml_monitor::profile::observe(*kind, values, v));
                }
            }
            if self.estimates
                && let Some(c) = outputs
                    .get(r)
                    .and_then(|o| fleetml_monitor::profile::confidence(o))
            {
                state.core.confidence(c);
            }
            let prediction = outputs.get(r).and_then(|o| match self.prediction? {
                PredictionKind::Classes => argmax(o).map(Observation::Category),
                PredictionKind::Score => o.first().map(|v| Observation::Number(*v as f64)),
            });
            if let Some(report) =
                state
                    .core
                    .observe(now, &observations, prediction, latency_us, lag_ms)
            {
                self.keep(&mut state, report);
            }
        }
    }

    /// Records a batch of `rows` rows run by the dynamic batcher.
    pub fn batched(&self, rows: usize) {
        self.lock().core.batched(rows.min(u32::MAX as usize) as u32);
    }

    /// Records `count` inputs that got no prediction at `now`.
    pub fn missed(&self, now: u64, reason: MissReason, count: u32) {
        self.lock().core.missed(now, reason, count);
    }

    /// Records the offending value of an input rejected as invalid: `feature` is its
    /// name, `value` the number out of the schema's range or the unknown category.
    pub fn rejected(&self, feature: &str, value: Observation) {
        if let Some(i) = self.features.iter().position(|f| f.0 == feature) {
            self.lock().core.rejected(i, value);
        }
    }

    /// Records an explained prediction's attributions (schema order).
    pub fn explained(&self, attributions: &[f64]) {
        self.lock().core.attributions(attributions);
    }

    /// Declares ids that must be predicted by `deadline_ms`. Returns how many are now
    /// outstanding, or an error when the bound would be exceeded.
    pub fn expect(&self, ids: &[String], deadline_ms: u64) -> Result<usize, String> {
        let mut state = self.lock();
        let new = ids
            .iter()
            .filter(|id| !state.expected.deadlines.contains_key(*id))
            .count();
        if state.expected.deadlines.len() + new > MAX_EXPECTED {
            return Err(format!(
                "at most {MAX_EXPECTED} expected ids may be outstanding per model"
            ));
        }
        for id in ids {
            state.expected.deadlines.insert(id.clone(), deadline_ms);
        }
        Ok(state.expected.deadlines.len())
    }

    /// Expires the expected ids overdue at `now` and closes the window if its time is up.
    pub fn tick(&self, now: u64) {
        let mut state = self.lock();
        let overdue: Vec<String> = state
            .expected
            .deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| id.clone())
            .collect();
        if !overdue.is_empty() {
            let mut sorted = overdue.clone();
            sorted.sort();
            for id in &overdue {
                state.expected.deadlines.remove(id);
            }
            state
                .core
                .missed(now, MissReason::ExpectedNotPredicted, overdue.len() as u32);
            state.expected.overdue += overdue.len() as u64;
            let room = MISSING_IDS_LISTED.saturating_sub(state.expected.overdue_sample.len());
            state
                .expected
                .overdue_sample
                .extend(sorted.into_iter().take(room));
        }
        if let Some(report) = state.core.tick(now) {
            self.keep(&mut state, report);
        }
    }

    /// Counts a ground-truth outcome in the current window (live accuracy / MAE).
    pub fn labelled(&self, outcome: Outcome) {
        let mut state = self.lock();
        state.labels.count += 1;
        match outcome {
            Outcome::Classified { correct } => {
                state.labels.classified += 1;
                state.labels.correct += u32::from(correct);
            }
            Outcome::Scored { abs_error } => {
                state.labels.scored += 1;
                state.labels.abs_error += abs_error;
            }
        }
    }

    /// What kind of prediction this model makes, when monitored.
    pub fn prediction_kind(&self) -> Option<PredictionKind> {
        self.prediction
    }

    /// Runs a shadow version beside this one from now on (`None`: stops it).
    pub fn compare_with(&self, comparison: Option<Arc<Comparison>>) {
        *self.comparison.lock().unwrap_or_else(|p| p.into_inner()) = comparison;
    }

    /// The shadow comparison in force, if any.
    pub fn comparison(&self) -> Option<Arc<Comparison>> {
        self.comparison
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Closes the current window at `now` when it saw predictions, and returns it as
    /// reported; else the last window closed before. For a shadow's monitor, whose
    /// windows close with the served model's.
    pub fn close_window(&self, now: u64) -> Option<telemetry::WindowReport> {
        let mut state = self.lock();
        let report = state.core.close(now);
        if report.predictions > 0 {
            let seq = state.seq_base + report.seq;
            let shipped = self.report(seq, &report, &[]);
            state
                .history
                .push_back(serde_json::to_value(&shipped).unwrap_or(Value::Null));
            while state.history.len() > KEPT_IN_MEMORY {
                state.history.pop_front();
            }
            return Some(shipped);
        }
        state
            .history
            .back()
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// Closes the current window at `now` (shutdown, tests).
    pub fn flush(&self, now: u64) {
        let mut state = self.lock();
        let report = state.core.close(now);
        if report.predictions > 0 || report.missed_total() > 0 {
            self.keep(&mut state, report);
        }
    }

    fn keep(&self, state: &mut State, report: WindowReport) {
        let seq = state.seq_base + report.seq;
        let missing_ids = std::mem::take(&mut state.expected.overdue_sample);
        state.expected.overdue = 0;
        let mut shipped = self.report(seq, &report, &missing_ids);
        shipped.shadow = self
            .comparison
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map(|c| c.take(report.end_ms));
        let labels = std::mem::take(&mut state.labels);
        shipped.labels = labels.count;
        shipped.live_accuracy =
            (labels.classified > 0).then(|| labels.correct as f64 / labels.classified as f64);
        shipped.live_mae = (labels.scored > 0).then(|| labels.abs_error / labels.scored as f64);
        let value = serde_json::to_value(&shipped).unwrap_or(Value::Null);
        for event in &report.events {
            let subject = self.subject(event.subject);
            match event.transition {
                Transition::Raised => {
                    tracing::warn!(model = %self.model, %subject, "drift alert raised")
                }
                Transition::Recovered => {
                    tracing::info!(model = %self.model, %subject, "alert recovered")
                }
            }
            metrics::counter!("fleetml_agent_alerts_total", "model" => self.model.clone(), "subject" => subject, "transition" => match event.transition { Transition::Raised => "raised", Transition::Recovered => "recovered" }).increment(1);
        }
        if let Some(sink) = &self.sink {
            sink.store(&self.model, seq, &value);
            if let Some(t) = &sink.telemetry {
                for event in &shipped.events {
                    t.queue(telemetry::Body::Alert(telemetry::Alert {
                        model: self.model.clone(),
                        version: self.version,
                        window: seq,
                        event: event.clone(),
                    }));
                }
                t.queue(telemetry::Body::Window(Box::new(shipped)));
            }
        }
        state.history.push_back(value);
        while state.history.len() > KEPT_IN_MEMORY {
            state.history.pop_front();
        }
    }

    fn subject(&self, s: Subject) -> String {
        match s {
            Subject::Feature(i) => self
                .features
                .get(i)
                .map(|f| f.0.clone())
                .unwrap_or_else(|| format!("feature {i}")),
            Subject::Prediction => "prediction".into(),
            Subject::MissingPredictions => "missing_predictions".into(),
            Subject::Lag => "lag".into(),
            Subject::Multivariate => RECONSTRUCTION_ERROR.into(),
            Subject::EstimatedAccuracy => "estimated_accuracy".into(),
        }
    }

    /// A closed window as the protocol's [`telemetry::WindowReport`]: what the API shows
    /// (as JSON) and what telemetry ships (as CBOR).
    pub fn report(
        &self,
        seq: u64,
        r: &WindowReport,
        missing_ids: &[String],
    ) -> telemetry::WindowReport {
        let moved = |labels: &[String], f: &FeatureReport| -> Vec<telemetry::BinShift> {
            f.moved
                .iter()
                .flatten()
                .map(|s| telemetry::BinShift {
                    bin: labels
                        .get(usize::from(s.bin))
                        .cloned()
                        .unwrap_or_else(|| format!("bin {}", s.bin)),
                    current: s.current,
                    reference: s.reference,
                })
                .collect()
        };
        let labels_of = |subject: Subject| -> &[String] {
            match subject {
                Subject::Feature(i) => self.bin_labels.get(i).map_or(&[], Vec::as_slice),
                Subject::Prediction => &self.prediction_labels,
                Subject::Multivariate => &self.error_labels,
                _ => &[],
            }
        };
        let report_of = |subject: Subject| -> Option<&FeatureReport> {
            match subject {
                Subject::Feature(i) => r.features.get(i),
                Subject::Prediction => r.prediction.as_ref(),
                Subject::Multivariate => r.multivariate.as_ref(),
                _ => None,
            }
        };
        let feature = |name: &str, labels: &[String], f: &FeatureReport| telemetry::FeatureDrift {
            name: name.to_string(),
            values: f.values,
            missing_rate: f.missing_rate,
            out_of_range_rate: f.out_of_range_rate,
            unseen_rate: f.unseen_rate,
            psi: f.psi,
            ks: f.ks,
            js: f.js,
            chi2_p: f.chi2_p,
            wasserstein: f.wasserstein,
            usefulness: f.usefulness,
            moved: if f.drifting {
                moved(labels, f)
            } else {
                Vec::new()
            },
            drifting: f.drifting,
        };
        let quantiles = |q: &fleetml_monitor::Quantiles| telemetry::Quantiles {
            p50: q.p50,
            p95: q.p95,
            p99: q.p99,
        };
        let mut alerts: Vec<String> = r
            .features
            .iter()
            .zip(&self.features)
            .filter(|(f, _)| f.drifting)
            .map(|(_, (name, _, _))| name.clone())
            .collect();
        if r.prediction.is_some_and(|p| p.drifting) {
            alerts.push("prediction".into());
        }
        if r.multivariate.is_some_and(|m| m.drifting) {
            alerts.push(RECONSTRUCTION_ERROR.into());
        }
        if r.accuracy_alert {
            alerts.push("estimated_accuracy".into());
        }
        if r.missing_alert {
            alerts.push("missing_predictions".into());
        }
        if r.lag_alert {
            alerts.push("lag".into());
        }
        let seconds = (r.end_ms.saturating_sub(r.start_ms)) as f64 / 1000.0;
        telemetry::WindowReport {
            shadow: None,
            model: self.model.clone(),
            version: self.version,
            window: seq,
            start_ms: r.start_ms,
            end_ms: r.end_ms,
            predictions: r.predictions,
            throughput_per_s: if seconds > 0.0 {
                r.predictions as f64 / seconds
            } else {
                0.0
            },
            missed: MissReason::ALL
                .iter()
                .map(|m| (m.as_str().to_string(), r.missed[*m as usize]))
                .collect(),
            missing_prediction_rate: r.missing_prediction_rate(),
            missing_ids: missing_ids.to_vec(),
            latency_us: quantiles(&r.latency_us),
            lag_ms: quantiles(&r.lag_ms),
            batch_rows: quantiles(&r.batch_rows),
            outages: r
                .outages
                .iter()
                .map(|o| telemetry::Outage {
                    start_ms: o.start_ms,
                    end_ms: o.end_ms,
                    missed: o.missed,
                })
                .collect(),
            outages_not_listed: r.outages_dropped,
            features: r
                .features
                .iter()
                .zip(&self.features)
                .enumerate()
                .map(|(i, (f, (name, _, _)))| feature(name, labels_of(Subject::Feature(i)), f))
                .collect(),
            prediction: r
                .prediction
                .as_ref()
                .map(|p| feature("prediction", &self.prediction_labels, p)),
            events: r
                .events
                .iter()
                .map(|e| telemetry::AlertEvent {
                    moved: match (e.transition, report_of(e.subject)) {
                        (Transition::Raised, Some(f)) => moved(labels_of(e.subject), f),
                        _ => Vec::new(),
                    },
                    subject: self.subject(e.subject),
                    transition: match e.transition {
                        Transition::Raised => "raised",
                        Transition::Recovered => "recovered",
                    }
                    .into(),
                })
                .collect(),
            alerts,
            labels: 0,
            live_accuracy: None,
            live_mae: None,
            multivariate: r
                .multivariate
                .as_ref()
                .map(|m| feature(RECONSTRUCTION_ERROR, &self.error_labels, m)),
            estimated_accuracy: r.estimated_accuracy.map(|e| telemetry::EstimatedAccuracy {
                accuracy: e.accuracy,
                limit: e.limit,
                predictions: e.predictions,
                alerting: e.alerting,
            }),
        }
    }

    /// The monitoring view of `GET /v1/models/{name}/monitoring`: current alerts and the
    /// latest `limit` windows (from memory, or from sled after a restart).
    pub fn view(&self, limit: usize) -> Value {
        let state = self.lock();
        let mut windows: Vec<Value> = state.history.iter().rev().take(limit).cloned().collect();
        windows.reverse();
        if windows.is_empty()
            && let Some(sink) = &self.sink
        {
            windows = sink.windows(&self.model, limit);
        }
        let alerts = windows
            .last()
            .and_then(|w| w.get("alerts").cloned())
            .unwrap_or_else(|| json!([]));
        let t = state.core.thresholds();
        json!({
            "model": self.model,
            "version": self.version,
            "window_config": {"max_predictions": self.config.max_predictions, "max_duration_ms": self.config.max_duration_ms},
            "thresholds": {"psi": t.psi, "js": t.js, "chi2_p": t.chi2_p, "unseen_rate": t.unseen_rate, "missing_rate": t.missing_rate, "min_estimated_accuracy": t.min_estimated_accuracy, "lag_p95_ms": t.lag_p95_ms, "windows": t.windows, "min_predictions": t.min_predictions},
            // Which of psi, js and chi2_p were set explicitly (they hold for every feature);
            // the others give way to the calibrated thresholds below, per feature and size.
            "fixed": {"psi": t.fixed.psi, "js": t.fixed.js, "chi2_p": t.fixed.chi2_p},
            "calibration": self.calibration,
            "expected_outstanding": state.expected.deadlines.len(),
            "alerts": alerts,
            "windows": windows,
        })
    }
}

/// The median of a binned profile: the upper edge of the bin where the cumulative
/// count reaches half (the minimum when the first bin does; the last edge for the top bin).
fn median(edges: &[f64], counts: &[u64], min: f64) -> f64 {
    let total: u64 = counts.iter().sum();
    let mut seen = 0u64;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen * 2 >= total {
            return edges
                .get(i)
                .copied()
                .unwrap_or_else(|| edges.last().copied().unwrap_or(min));
        }
    }
    min
}

/// The bins of quantile `edges`: `≤ e₀`, `(eᵢ₋₁, eᵢ]`, `> eₖ` (one bin: `all`).
fn range_labels(edges: &[f64]) -> Vec<String> {
    let num = |x: f64| {
        let text = format!("{x:.4}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        if text == "-0" {
            "0".to_string()
        } else {
            text.to_string()
        }
    };
    if edges.is_empty() {
        return vec!["all".into()];
    }
    let mut labels = vec![format!("≤ {}", num(edges[0]))];
    for w in edges.windows(2) {
        labels.push(format!("({}, {}]", num(w[0]), num(w[1])));
    }
    labels.push(format!("> {}", num(edges[edges.len() - 1])));
    labels
}

/// The bins of a categorical feature: its categories, then `other`.
fn category_labels(values: &[String]) -> Vec<String> {
    values
        .iter()
        .cloned()
        .chain(std::iter::once("other".to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comparison_counts_class_agreement_and_score_differences_then_starts_again() {
        let c = Comparison::new(2, None);
        // Two classified rows, one agreeing; one scored row off by 0.5.
        c.ran(
            &[vec![0.9, 0.1], vec![0.2, 0.8]],
            &[vec![0.6, 0.4], vec![0.7, 0.3]],
            100,
        );
        c.ran(&[vec![1.0]], &[vec![1.5]], 300);
        c.shed();
        c.failed();
        let r = c.take(0);
        assert_eq!(
            (r.version, r.runs, r.shed, r.failed, r.rows),
            (2, 3, 1, 1, 3)
        );
        assert_eq!(r.agreement, Some(0.5));
        assert_eq!(r.mean_abs_error, Some(0.5));
        assert_eq!(r.max_abs_error, Some(0.5));
        assert_eq!(r.abs_error_p95, Some(0.5));
        assert_eq!(r.latency_us.p50, Some(300));
        let next = c.take(1);
        assert_eq!((next.runs, next.rows, next.agreement), (0, 0, None));
    }
}
