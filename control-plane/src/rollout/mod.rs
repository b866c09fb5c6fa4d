//! Staged rollouts and rollbacks: which devices get a version in which wave, how each
//! device is doing, and the health gates that stop a bad version.
//!
//! A rollout selects devices (`board=…`, `site=…` tags, `device=a|b`, or `all`), sorts
//! them by id and splits them into cumulative waves (`--waves 1,10,50,100` percent, or
//! `--canary 5` = `5,100`). The engine ([`Rollout::step`], run every second by
//! `fleetctl serve`) assigns a wave's devices, then waits until the wave's quorum is
//! active and its soak time has passed before it starts the next. Devices that stay
//! offline keep their assignment and catch up when they return; the wave moves on once
//! the quorum is active, and fails if that has not happened by the wave deadline. An
//! online device of the running wave that has reported nothing since its assignment is
//! told again ([`Rollout::remind`]: after 30 s, then 60, 120 and 240 s more by default).
//!
//! Health gates compare the new version's telemetry with the old one's (the window
//! reports captured when the rollout started): activation failures, self-test failures,
//! fallbacks away from the requested backend, drift alerts, missing-prediction rate, p99
//! latency and error rate. A failing gate pauses the rollout, or with `auto_rollback`
//! assigns every device it reached back to what it ran before (as a new generation).
//! A rollback is a rollout of each device's previous version in one wave, without gates.

use std::collections::BTreeMap;

use fleetml_protocol::assignment::AssignedModel;
use fleetml_protocol::telemetry::{DeviceId, Lifecycle, WindowReport};
use serde::{Deserialize, Serialize};

use crate::records::{DeviceRecord, DeviceState};

pub mod start;

/// A device selector: comma-separated `key=value` terms that must all match; `key` is
/// `board`, `device` (or `id`), or a tag name; `value` may list alternatives with `|`.
/// `all` selects every device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(Vec<(String, Vec<String>)>);

impl std::str::FromStr for Selector {
    type Err = String;
    fn from_str(s: &str) -> Result<Selector, String> {
        let s = s.trim();
        if s == "all" {
            return Ok(Selector(Vec::new()));
        }
        if s.is_empty() {
            return Err(
                "empty device selector: give `all` or terms like `board=raspberry-pi-4,site=lab`"
                    .into(),
            );
        }
        let mut terms = Vec::new();
        for term in s.split(',') {
            let (k, v) = term.split_once('=').ok_or_else(|| {
                format!("selector term `{term}` is not key=value (e.g. board=raspberry-pi-4, site=lab, device=pi-1|pi-2, or `all`)")
            })?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || v.is_empty() {
                return Err(format!("selector term `{term}` has an empty key or value"));
            }
            terms.push((
                k.to_string(),
                v.split('|').map(|x| x.trim().to_string()).collect(),
            ));
        }
        Ok(Selector(terms))
    }
}

impl Selector {
    pub fn matches(&self, d: &DeviceRecord) -> bool {
        self.0.iter().all(|(k, values)| {
            let actual = match k.as_str() {
                "board" => d.board.as_deref(),
                "device" | "id" => Some(d.id.as_str()),
                tag => d.tags.get(tag).map(String::as_str),
            };
            actual.is_some_and(|a| values.iter().any(|v| v == a))
        })
    }
}

/// Cumulative wave percentages from `--waves` or `--canary`.
pub fn parse_waves(waves: Option<&str>, canary: Option<u32>) -> Result<Vec<u32>, String> {
    let list: Vec<u32> = match (waves, canary) {
        (Some(_), Some(_)) => return Err("give --waves or --canary, not both".into()),
        (None, Some(c)) => vec![c, 100],
        (Some(w), None) => w
            .split(',')
            .map(|p| {
                p.trim()
                    .trim_end_matches('%')
                    .parse::<u32>()
                    .map_err(|_| format!("wave `{p}` is not a percentage"))
            })
            .collect::<Result<_, _>>()?,
        (None, None) => vec![100],
    };
    if list.iter().any(|p| *p == 0 || *p > 100) {
        return Err(format!("wave percentages must be 1..=100, got {list:?}"));
    }
    if list.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("wave percentages must grow, got {list:?}"));
    }
    if list.last() != Some(&100) {
        return Err(format!(
            "the last wave must be 100 (every selected device), got {list:?}"
        ));
    }
    Ok(list)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Rollout,
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Paused,
    Completed,
    Aborted,
    /// A gate failed and the devices reached were assigned their previous version.
    RolledBack,
}

impl Kind {
    /// Its name on the wire and on screen.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Rollout => "rollout",
            Kind::Rollback => "rollback",
        }
    }
}

impl State {
    /// Its name on the wire and on screen.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Completed => "completed",
            State::Aborted => "aborted",
            State::RolledBack => "rolled_back",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, State::Completed | State::Aborted | State::RolledBack)
    }
}

/// Health gate thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    pub max_activation_failures: u32,
    pub max_self_test_failures: u32,
    pub max_fallbacks: u32,
    pub max_drift_alerts: u32,
    /// Allowed rise of the missing-prediction rate over the old version's.
    pub max_missing_rate_increase: f64,
    /// Allowed ratio of the new p99 latency to the old one.
    pub max_p99_ratio: f64,
    /// Allowed rise of the error rate (backend errors, panics, timeouts per request).
    pub max_error_rate_increase: f64,
    /// Shadow rollouts: the least share of compared rows whose class agrees with the
    /// served answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_shadow_agreement: Option<f64>,
    /// Shadow rollouts: the largest ratio of the shadow's p95 latency to the served one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shadow_latency_ratio: Option<f64>,
    /// Shadow rollouts of scores: the largest mean absolute difference from the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shadow_mean_abs_error: Option<f64>,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            max_activation_failures: 0,
            max_self_test_failures: 0,
            max_fallbacks: 0,
            max_drift_alerts: 0,
            max_missing_rate_increase: 0.05,
            max_p99_ratio: 1.5,
            max_error_rate_increase: 0.01,
            min_shadow_agreement: None,
            max_shadow_latency_ratio: None,
            max_shadow_mean_abs_error: None,
        }
    }
}

/// How a rollout proceeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    /// Cumulative percentages of the selected devices.
    pub waves: Vec<u32>,
    /// Least time a wave runs before the next starts.
    pub soak_ms: u64,
    /// Share of a wave's devices that must be active before the next wave (percent).
    pub quorum_pct: u32,
    /// A wave whose quorum is not active this long after it started fails its gate.
    pub deadline_ms: u64,
    pub gates: Gates,
    /// Roll the reached devices back when a gate fails (default: pause).
    pub auto_rollback: bool,
}

/// One device of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub device: DeviceId,
    pub wave: usize,
    pub to: AssignedModel,
    /// What the device was assigned before (where a gate failure returns it).
    pub from: Option<AssignedModel>,
    pub assigned_ms: Option<u64>,
    pub generation: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    pub percent: u32,
    pub devices: usize,
    pub started_ms: Option<u64>,
    pub passed_ms: Option<u64>,
    /// Times the engine told this wave's unanswered devices again ([`Rollout::remind`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reminded: u32,
    /// When it last did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reminded_ms: Option<u64>,
}

impl Wave {
    /// Starts the wave anew at `now_ms` (a resumed rollout): its deadline and its
    /// reminders count from then.
    pub fn restart(&mut self, now_ms: u64) {
        self.started_ms = Some(now_ms);
        self.reminded = 0;
        self.reminded_ms = None;
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Reminders a wave gets at most: after `after`, then 2, 4 and 8 times `after` more (at
/// the 30 s default the last comes 7.5 minutes into the wave, past the devices' own
/// five-minute poll).
pub const MAX_REMINDERS: u32 = 4;

/// The old version's telemetry on the selected devices when the rollout started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub missing_rate: Option<f64>,
    pub p99_us: Option<f64>,
    pub error_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub kind: Kind,
    pub model: String,
    /// The version rolled out (a rollback may return devices to different versions).
    pub version: Option<u64>,
    pub selector: String,
    pub strategy: Strategy,
    pub targets: Vec<Target>,
    pub waves: Vec<Wave>,
    pub state: State,
    pub reason: Option<String>,
    pub baseline: Baseline,
    /// Gates count what devices reported after this time (moved on `resume`).
    pub gates_since_ms: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub by: String,
    /// A shadow rollout: `version` runs beside what each device serves, on this many of
    /// every thousand requests, and never answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<u16>,
}

/// How one device of a rollout is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum Progress {
    /// Its wave has not started.
    Waiting,
    /// Assigned; nothing heard yet.
    Pending,
    Downloading,
    Active,
    Failed(String),
}

impl Progress {
    pub fn label(&self) -> &'static str {
        match self {
            Progress::Waiting => "waiting",
            Progress::Pending => "pending",
            Progress::Downloading => "downloading",
            Progress::Active => "active",
            Progress::Failed(_) => "failed",
        }
    }
}

/// One gate's value against its threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateValue {
    pub gate: &'static str,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub ok: bool,
}

/// An assignment the engine wants made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assign {
    pub device: DeviceId,
    pub to: AssignedModel,
}

/// Lifecycle events that mean the device could not run the version.
fn failure_kind(kind: Lifecycle) -> bool {
    matches!(
        kind,
        Lifecycle::ActivationFailed
            | Lifecycle::SelfTestFailed
            | Lifecycle::VerificationFailed
            | Lifecycle::AssignmentRefused
            | Lifecycle::ShadowFailed
    )
}

/// The version a target's device reports on: the shadow's in a shadow rollout.
fn watched(t: &Target) -> u64 {
    t.to.shadow.as_ref().map_or(t.to.version, |s| s.version)
}

/// The shadow comparison of the shadow rollout's reached devices: rows compared, the
/// row-weighted agreement and mean absolute error, and the mean shadow and served p95
/// latency (µs), from each device's newest window that carries one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowFigures {
    pub rows: u64,
    pub agreement: Option<f64>,
    pub mean_abs_error: Option<f64>,
    pub shadow_p95_us: Option<f64>,
    pub served_p95_us: Option<f64>,
}

impl ShadowFigures {
    /// Over `pairs` of (served window, its shadow report).
    pub fn of(pairs: &[(&WindowReport, &fleetml_protocol::telemetry::ShadowReport)]) -> Self {
        let mut f = ShadowFigures::default();
        let (mut agree, mut classified, mut err, mut scored) = (0.0, 0u64, 0.0, 0u64);
        let (mut sp, mut vp) = (Vec::new(), Vec::new());
        for (w, s) in pairs {
            f.rows += u64::from(s.rows);
            if let Some(a) = s.agreement {
                agree += a * f64::from(s.rows);
                classified += u64::from(s.rows);
            }
            if let Some(e) = s.mean_abs_error {
                err += e * f64::from(s.rows);
                scored += u64::from(s.rows);
            }
            if let (Some(a), Some(b)) = (s.latency_us.p95, w.latency_us.p95) {
                sp.push(a as f64);
                vp.push(b as f64);
            }
        }
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        f.agreement = (classified > 0).then(|| agree / classified as f64);
        f.mean_abs_error = (scored > 0).then(|| err / scored as f64);
        f.shadow_p95_us = mean(&sp);
        f.served_p95_us = mean(&vp);
        f
    }

    /// Shadow p95 over served p95.
    pub fn latency_ratio(&self) -> Option<f64> {
        match (self.shadow_p95_us, self.served_p95_us) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        }
    }
}

/// What a new rollout is.
#[derive(Debug, Clone)]
pub struct Plan {
    pub id: String,
    pub kind: Kind,
    pub model: String,
    pub version: Option<u64>,
    pub selector: String,
    pub strategy: Strategy,
    /// Sorted by device id; their waves are set here.
    pub targets: Vec<Target>,
    pub baseline: Baseline,
    pub by: String,
    /// A shadow rollout's sample (per thousand requests).
    pub shadow: Option<u16>,
}

impl Rollout {
    /// A running rollout of `plan`, its targets split into the strategy's waves.
    pub fn new(plan: Plan, now_ms: u64) -> Rollout {
        let mut targets = plan.targets;
        let waves = Rollout::plan(&mut targets, &plan.strategy.waves);
        Rollout {
            id: plan.id,
            kind: plan.kind,
            model: plan.model,
            version: plan.version,
            selector: plan.selector,
            strategy: plan.strategy,
            targets,
            waves,
            state: State::Running,
            reason: None,
            baseline: plan.baseline,
            gates_since_ms: now_ms,
            created_ms: now_ms,
            updated_ms: now_ms,
            by: plan.by,
            shadow: plan.shadow,
        }
    }

    /// Splits `targets` (sorted by device id) into waves.
    pub fn plan(targets: &mut [Target], percents: &[u32]) -> Vec<Wave> {
        let n = targets.len();
        let mut waves = Vec::new();
        let mut done = 0usize;
        for &p in percents {
            let upto = ((n * p as usize).div_ceil(100)).clamp(done.min(n), n);
            if upto > done || (n == 0 && waves.is_empty()) {
                for t in &mut targets[done..upto] {
                    t.wave = waves.len();
                }
                waves.push(Wave {
                    percent: p,
                    devices: upto - done,
                    started_ms: None,
                    passed_ms: None,
                    reminded: 0,
                    reminded_ms: None,
                });
                done = upto;
            }
        }
        waves
    }

    /// How `t` is doing, from its device's state.
    pub fn progress(&self, t: &Target, state: Option<&DeviceState>) -> Progress {
        let Some(since) = t.assigned_ms else {
            return Progress::Waiting;
        };
        let Some(st) = state else {
            return Progress::Pending;
        };
        let version = watched(t);
        let shadow = t.to.shadow.is_some();
        let running = st.status.as_ref().is_some_and(|(_, s)| {
            s.models.iter().any(|m| {
                m.name == self.model
                    && if shadow {
                        m.version == t.to.version
                            && m.shadow.as_ref().is_some_and(|sh| sh.version == version)
                    } else {
                        m.version == version
                    }
            })
        });
        let mut progress = if running {
            Progress::Active
        } else {
            Progress::Pending
        };
        for (at, e) in &st.lifecycle {
            if *at < since {
                continue;
            }
            let ours = e.model == self.model && e.version == version;
            let started = if shadow {
                matches!(e.kind, Lifecycle::ShadowActivated)
            } else {
                matches!(e.kind, Lifecycle::Activated | Lifecycle::RolledBack)
            };
            if failure_kind(e.kind) && (ours || e.kind == Lifecycle::AssignmentRefused) {
                progress = Progress::Failed(format!("{}: {}", kind_str(e.kind), e.detail));
            } else if ours && started {
                progress = Progress::Active;
            } else if ours
                && matches!(e.kind, Lifecycle::Downloading | Lifecycle::Downloaded)
                && progress == Progress::Pending
            {
                progress = Progress::Downloading;
            }
        }
        // What runs now wins over any event: the status kept is the device's newest (by
        // its sequence numbers), while events are ordered by arrival, and an event the
        // outbox published again (or a refused forgery) can arrive after the activation
        // it preceded. A rollout's gates still count the failures.
        if running {
            progress = Progress::Active;
        }
        progress
    }

    /// The gates over the devices reached so far.
    pub fn gates(&self, states: &BTreeMap<DeviceId, DeviceState>) -> Vec<GateValue> {
        let g = &self.strategy.gates;
        let (mut activation, mut self_test, mut fallbacks, mut drift) = (0u32, 0u32, 0u32, 0u32);
        let mut windows: Vec<&WindowReport> = Vec::new();
        let mut shadows = Vec::new();
        for t in self.targets.iter().filter(|t| t.assigned_ms.is_some()) {
            let Some(st) = states.get(&t.device) else {
                continue;
            };
            let since = t.assigned_ms.unwrap_or(0).max(self.gates_since_ms);
            let mut failed_activation = false;
            let mut failed_self_test = false;
            let mut fell_back = false;
            for (_, e) in st.lifecycle.iter().filter(|(at, _)| *at >= since) {
                let ours = e.model == self.model && e.version == watched(t);
                match e.kind {
                    Lifecycle::SelfTestFailed if ours => failed_self_test = true,
                    Lifecycle::FellBack if ours => fell_back = true,
                    Lifecycle::AssignmentRefused => failed_activation = true,
                    k if ours && failure_kind(k) => failed_activation = true,
                    _ => {}
                }
            }
            activation += failed_activation as u32;
            self_test += failed_self_test as u32;
            fallbacks += fell_back as u32;
            if let Some((_, w)) = st.windows.get(&self.model)
                && w.version == t.to.version
                && w.end_ms >= since
            {
                windows.push(w);
                let compared = match (&w.shadow, &t.to.shadow) {
                    (Some(s), Some(want)) if s.version == want.version => Some(s),
                    _ => None,
                };
                if let Some(s) = compared {
                    shadows.push((w, s));
                }
                // A shadow rollout judges the shadow's drift, not the served version's.
                let alerting = match &t.to.shadow {
                    Some(_) => compared.is_some_and(|s| !s.alerts.is_empty()),
                    None => st.alerts.get(&self.model).is_some_and(|a| !a.is_empty()),
                };
                if alerting {
                    drift += 1;
                }
            }
        }
        let count = |gate, value: u32, max: u32| GateValue {
            gate,
            value: Some(value as f64),
            threshold: Some(max as f64),
            ok: value <= max,
        };
        let (missing, p99, errors) = window_figures(&windows);
        let b = &self.baseline;
        // A gate without a value (no windows yet) or without a limit (no baseline) passes.
        let relative = |gate, value: Option<f64>, limit: Option<f64>| {
            let ok = match (value, limit) {
                (Some(v), Some(l)) => v <= l,
                _ => true,
            };
            GateValue {
                gate,
                value,
                threshold: limit,
                ok,
            }
        };
        let mut shadow_gates = Vec::new();
        if self.shadow.is_some() {
            let f = ShadowFigures::of(&shadows);
            // Until rows were compared a shadow gate has no value and passes; `promote`
            // wants a value.
            let at_least = |gate, value: Option<f64>, min: Option<f64>| GateValue {
                gate,
                value,
                threshold: min,
                ok: match (value, min) {
                    (Some(v), Some(m)) => v >= m,
                    _ => true,
                },
            };
            shadow_gates.push(at_least(
                "shadow_agreement",
                f.agreement,
                g.min_shadow_agreement,
            ));
            shadow_gates.push(relative(
                "shadow_latency_ratio",
                f.latency_ratio(),
                g.max_shadow_latency_ratio,
            ));
            shadow_gates.push(relative(
                "shadow_mean_abs_error",
                f.mean_abs_error,
                g.max_shadow_mean_abs_error,
            ));
        }
        let mut all = vec![
            count("activation_failures", activation, g.max_activation_failures),
            count("self_test_failures", self_test, g.max_self_test_failures),
            count("backend_fallbacks", fallbacks, g.max_fallbacks),
            count("drift_alerts", drift, g.max_drift_alerts),
            relative(
                "missing_prediction_rate",
                missing,
                Some(b.missing_rate.unwrap_or(0.0) + g.max_missing_rate_increase),
            ),
            relative("p99_latency_us", p99, b.p99_us.map(|p| p * g.max_p99_ratio)),
            relative(
                "error_rate",
                errors,
                Some(b.error_rate.unwrap_or(0.0) + g.max_error_rate_increase),
            ),
        ];
        all.extend(shadow_gates);
        all
    }

    /// Advances a running rollout at `now_ms`: returns the assignments to make. Changes
    /// `state`, `reason`, and the waves' times.
    pub fn step(&mut self, states: &BTreeMap<DeviceId, DeviceState>, now_ms: u64) -> Vec<Assign> {
        if self.state != State::Running {
            return Vec::new();
        }
        self.updated_ms = now_ms;
        if self.kind == Kind::Rollout {
            let failing: Vec<String> = self
                .gates(states)
                .into_iter()
                .filter(|g| !g.ok)
                .map(|g| {
                    format!(
                        "{} = {} (limit {})",
                        g.gate,
                        g.value.map_or("-".into(), fmt_num),
                        g.threshold.map_or("-".into(), fmt_num)
                    )
                })
                .collect();
            if !failing.is_empty() {
                return self.fail(format!("health gate failed: {}", failing.join("; ")));
            }
        }
        let Some(current) = self.waves.iter().position(|w| w.passed_ms.is_none()) else {
            self.state = State::Completed;
            self.reason = None;
            return Vec::new();
        };
        let mut out = Vec::new();
        let wave = &self.waves[current];
        let Some(started) = wave.started_ms else {
            self.waves[current].started_ms = Some(now_ms);
            for t in self.targets.iter_mut().filter(|t| t.wave == current) {
                t.assigned_ms = Some(now_ms);
                out.push(Assign {
                    device: t.device.clone(),
                    to: t.to.clone(),
                });
            }
            return out;
        };
        let members: Vec<&Target> = self.targets.iter().filter(|t| t.wave == current).collect();
        let active = members
            .iter()
            .filter(|t| self.progress(t, states.get(&t.device)) == Progress::Active)
            .count();
        let needed = (members.len() * self.strategy.quorum_pct as usize)
            .div_ceil(100)
            .max(1);
        let needed = needed.min(members.len());
        let soaked = now_ms >= started + self.strategy.soak_ms;
        if active >= needed && soaked {
            self.waves[current].passed_ms = Some(now_ms);
            if current + 1 == self.waves.len() {
                self.state = State::Completed;
                self.reason = None;
            }
            return out;
        }
        if active < needed && now_ms >= started + self.strategy.deadline_ms {
            return self.fail(format!(
                "wave {} quorum not reached: {active} of {} devices active, {needed} needed, by the deadline",
                current + 1,
                members.len()
            ));
        }
        out
    }

    /// The devices of the running wave to tell about their assignment again at `now_ms`:
    /// those online that have reported nothing since they were assigned, once `after_ms`
    /// passed since the wave started, then after twice as long each time, at most
    /// [`MAX_REMINDERS`] times. A command is a QoS 0 nudge: a broker can lose it while
    /// the device stays connected (a cluster route dropped), and the device would wait
    /// for its next poll. Offline devices pull when they reconnect; a device that
    /// answered (even with a failure) is not nudged. Zero `after_ms` never reminds.
    pub fn remind(
        &mut self,
        states: &BTreeMap<DeviceId, DeviceState>,
        now_ms: u64,
        after_ms: u64,
    ) -> Vec<DeviceId> {
        if self.state != State::Running || after_ms == 0 {
            return Vec::new();
        }
        let Some(current) = self.waves.iter().position(|w| w.passed_ms.is_none()) else {
            return Vec::new();
        };
        let wave = &self.waves[current];
        let Some(started) = wave.started_ms else {
            return Vec::new();
        };
        if wave.reminded >= MAX_REMINDERS {
            return Vec::new();
        }
        let due = wave
            .reminded_ms
            .unwrap_or(started)
            .saturating_add(after_ms.saturating_mul(1 << wave.reminded));
        if now_ms < due {
            return Vec::new();
        }
        let unanswered: Vec<DeviceId> = self
            .targets
            .iter()
            .filter(|t| t.wave == current)
            .filter(|t| {
                let (Some(since), Some(st)) = (t.assigned_ms, states.get(&t.device)) else {
                    return false;
                };
                st.online
                    && st.lifecycle.iter().all(|(at, _)| *at < since)
                    && self.progress(t, Some(st)) == Progress::Pending
            })
            .map(|t| t.device.clone())
            .collect();
        if !unanswered.is_empty() {
            let wave = &mut self.waves[current];
            wave.reminded += 1;
            wave.reminded_ms = Some(now_ms);
        }
        unanswered
    }

    /// A gate failed: pause, or assign every reached device its previous version.
    fn fail(&mut self, reason: String) -> Vec<Assign> {
        if !self.strategy.auto_rollback {
            self.state = State::Paused;
            self.reason = Some(reason);
            return Vec::new();
        }
        self.state = State::RolledBack;
        self.reason = Some(format!("{reason}; rolled back"));
        self.targets
            .iter()
            .filter(|t| t.assigned_ms.is_some())
            .filter_map(|t| {
                t.from.as_ref().map(|from| Assign {
                    device: t.device.clone(),
                    to: from.clone(),
                })
            })
            .collect()
    }
}

/// Mean missing-prediction rate, mean p99 latency (µs) and mean error rate of windows.
pub fn window_figures(windows: &[&WindowReport]) -> (Option<f64>, Option<f64>, Option<f64>) {
    if windows.is_empty() {
        return (None, None, None);
    }
    let n = windows.len() as f64;
    let missing = windows
        .iter()
        .map(|w| w.missing_prediction_rate)
        .sum::<f64>()
        / n;
    let p99s: Vec<f64> = windows
        .iter()
        .filter_map(|w| w.latency_us.p99.map(|p| p as f64))
        .collect();
    let p99 = (!p99s.is_empty()).then(|| p99s.iter().sum::<f64>() / p99s.len() as f64);
    let errors = windows
        .iter()
        .map(|w| {
            let failed: u32 = w
                .missed
                .iter()
                .filter(|(k, _)| k.starts_with("backend") || k.as_str() == "timeout")
                .map(|(_, v)| *v)
                .sum();
            let total = w.predictions as f64 + w.missed.values().map(|v| *v as f64).sum::<f64>();
            if total > 0.0 {
                failed as f64 / total
            } else {
                0.0
            }
        })
        .sum::<f64>()
        / n;
    (Some(missing), p99, Some(errors))
}

/// The baseline: the old version's latest windows on the selected devices.
pub fn baseline(
    model: &str,
    targets: &[Target],
    states: &BTreeMap<DeviceId, DeviceState>,
) -> Baseline {
    // The versions rolled out, once (not a scan of every target per window: quadratic
    // in the fleet's size).
    let new: std::collections::BTreeSet<u64> = targets.iter().map(|t| t.to.version).collect();
    let windows: Vec<&WindowReport> = targets
        .iter()
        .filter_map(|t| states.get(&t.device)?.windows.get(model))
        .map(|(_, w)| w)
        .filter(|w| !new.contains(&w.version))
        .collect();
    let (missing_rate, p99_us, error_rate) = window_figures(&windows);
    Baseline {
        missing_rate,
        p99_us,
        error_rate,
    }
}

pub fn kind_str(kind: Lifecycle) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e12 {
        format!("{}", v as i64)
    } else {
        format!("{v:.4}")
    }
}

#[cfg(test)]
mod tests;
