//! Rollouts and rollbacks on the running control plane: checking a request against the
//! registry and the fleet, planning its devices and keeping it ([`create`], [`rollback`],
//! [`start_canary`] for the drift policy), pausing, resuming and aborting one
//! ([`control`]), and one engine step of a rollout ([`step`]:
//! [`Rollout::step`] with the fleet's states, its assignments and state written in one
//! store transaction). Blocking; the API and the engine task call these from
//! `spawn_blocking`. The HTTP handlers are in `api::rollouts`.

use std::collections::BTreeMap;

use fleetml_protocol::assignment::{AssignedModel, ShadowModel};
use fleetml_protocol::crypto::Sha256;
use fleetml_protocol::telemetry::DeviceId;
use serde::{Deserialize, Serialize};

use crate::plane::{Plane, now_ms};
use crate::records::DeviceState;
use crate::refusal::Refusal;
use crate::rollout::{
    Assign, Gates, Kind, Plan, Rollout, Selector, State as RState, Strategy, Target,
};
use crate::store::FleetStore;

/// Device states by id, for the devices of `targets`, brief
/// ([`DeviceState::brief`]): what a rollout's progress, gates and views read.
pub(crate) fn states_of<'a>(
    plane: &Plane,
    targets: impl IntoIterator<Item = &'a Target>,
) -> Result<BTreeMap<DeviceId, DeviceState>, Refusal> {
    let ids: Vec<DeviceId> = targets.into_iter().map(|t| t.device.clone()).collect();
    Ok(plane
        .ingest
        .store
        .brief_states_named(&ids)?
        .into_iter()
        .collect())
}

/// `POST /v1/rollouts`: NAME@VERSION to the devices `to` selects, wave by wave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    pub model: String,
    pub version: u64,
    pub to: String,
    #[serde(default)]
    pub waves: Option<String>,
    #[serde(default)]
    pub canary: Option<u32>,
    #[serde(default)]
    pub soak_s: Option<u64>,
    #[serde(default)]
    pub quorum_pct: Option<u32>,
    #[serde(default)]
    pub deadline_s: Option<u64>,
    #[serde(default)]
    pub auto_rollback: bool,
    #[serde(default)]
    pub gates: Option<GateOverrides>,
    /// A shadow rollout: the version runs beside what each selected device serves, on
    /// this many of every thousand requests (1..=1000), and never answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_sample_permille: Option<u16>,
}

/// Gate thresholds a rollout sets instead of the defaults ([`Gates::default`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateOverrides {
    pub max_activation_failures: Option<u32>,
    pub max_self_test_failures: Option<u32>,
    pub max_fallbacks: Option<u32>,
    pub max_drift_alerts: Option<u32>,
    pub max_missing_rate_increase: Option<f64>,
    pub max_p99_ratio: Option<f64>,
    pub max_error_rate_increase: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_shadow_agreement: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shadow_latency_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shadow_mean_abs_error: Option<f64>,
}

impl GateOverrides {
    /// Every gate of `g` but the shadow ones: what the real rollout a shadow rollout is
    /// promoted to keeps. Both sides are spelt out field by field, so that a new gate
    /// does not compile until it is placed here.
    fn serving(g: &Gates) -> GateOverrides {
        let Gates {
            max_activation_failures,
            max_self_test_failures,
            max_fallbacks,
            max_drift_alerts,
            max_missing_rate_increase,
            max_p99_ratio,
            max_error_rate_increase,
            min_shadow_agreement: _,
            max_shadow_latency_ratio: _,
            max_shadow_mean_abs_error: _,
        } = *g;
        GateOverrides {
            max_activation_failures: Some(max_activation_failures),
            max_self_test_failures: Some(max_self_test_failures),
            max_fallbacks: Some(max_fallbacks),
            max_drift_alerts: Some(max_drift_alerts),
            max_missing_rate_increase: Some(max_missing_rate_increase),
            max_p99_ratio: Some(max_p99_ratio),
            max_error_rate_increase: Some(max_error_rate_increase),
            min_shadow_agreement: None,
            max_shadow_latency_ratio: None,
            max_shadow_mean_abs_error: None,
        }
    }
}

fn gates_from(o: Option<GateOverrides>) -> Gates {
    let o = o.unwrap_or_default();
    let d = Gates::default();
    Gates {
        max_activation_failures: o
            .max_activation_failures
            .unwrap_or(d.max_activation_failures),
        max_self_test_failures: o.max_self_test_failures.unwrap_or(d.max_self_test_failures),
        max_fallbacks: o.max_fallbacks.unwrap_or(d.max_fallbacks),
        max_drift_alerts: o.max_drift_alerts.unwrap_or(d.max_drift_alerts),
        max_missing_rate_increase: o
            .max_missing_rate_increase
            .unwrap_or(d.max_missing_rate_increase),
        max_p99_ratio: o.max_p99_ratio.unwrap_or(d.max_p99_ratio),
        max_error_rate_increase: o
            .max_error_rate_increase
            .unwrap_or(d.max_error_rate_increase),
        min_shadow_agreement: o.min_shadow_agreement,
        max_shadow_latency_ratio: o.max_shadow_latency_ratio,
        max_shadow_mean_abs_error: o.max_shadow_mean_abs_error,
    }
}

/// An active (running or paused) rollout of `model`, if any.
fn active_of(plane: &Plane, model: &str) -> Result<Option<Rollout>, Refusal> {
    Ok(plane
        .rollouts
        .unfinished_rollouts()?
        .into_iter()
        .find(|r| r.model == model))
}

/// A canary rollout of `model@version` to every device (auto-rollback on), started by
/// the retraining policy; the engine advances it. Returns its id.
pub fn start_canary(plane: &Plane, model: &str, version: u64, pct: u32) -> Result<String, Refusal> {
    let req = RolloutRequest {
        model: model.into(),
        version,
        to: "all".into(),
        waves: None,
        canary: Some(pct.clamp(1, 99)),
        soak_s: None,
        quorum_pct: None,
        deadline_s: None,
        auto_rollback: true,
        gates: None,
        shadow_sample_permille: None,
    };
    create(plane, req, format!("policy:{model}")).map(|r| r.id)
}

/// A shadow rollout of `model@version` beside what every device assigned `model` serves,
/// on every request, in the waves of a `pct` canary with auto-rollback, its shadow
/// latency gated at 1.5 times the served one's; started by the retraining policy with
/// `shadow_first`, promoted by an operator (`fleetctl rollout promote`). Returns its id.
pub fn start_shadow(plane: &Plane, model: &str, version: u64, pct: u32) -> Result<String, Refusal> {
    let serving: Vec<String> = plane
        .assignments
        .assignments()?
        .into_iter()
        .filter(|(_, r)| r.models.contains_key(model))
        .map(|(d, _)| d.to_string())
        .collect();
    if serving.is_empty() {
        return Err(Refusal::unprocessable(format!(
            "no device is assigned {model}: a shadow needs a served version beside it"
        )));
    }
    let req = RolloutRequest {
        model: model.into(),
        version,
        to: format!("device={}", serving.join("|")),
        waves: None,
        canary: Some(pct.clamp(1, 99)),
        soak_s: None,
        quorum_pct: None,
        deadline_s: None,
        auto_rollback: true,
        gates: Some(GateOverrides {
            max_shadow_latency_ratio: Some(1.5),
            ..Default::default()
        }),
        shadow_sample_permille: Some(1000),
    };
    create(plane, req, format!("policy:{model}")).map(|r| r.id)
}

/// Checks a rollout request, selects and plans its devices, and keeps it (blocking).
pub fn create(plane: &Plane, req: RolloutRequest, by: String) -> Result<Rollout, Refusal> {
    let _guard = plane.rollout_lock.lock().unwrap_or_else(|p| p.into_inner());
    create_locked(plane, req, by)
}

/// [`create`], with the rollout lock held by the caller.
fn create_locked(plane: &Plane, req: RolloutRequest, by: String) -> Result<Rollout, Refusal> {
    let record = plane
        .registry
        .get(&req.model, req.version)
        .map_err(Refusal::internal)?
        .ok_or_else(|| {
            Refusal::not_found(format!(
                "{}@v{} is not in the registry (fleetctl models push)",
                req.model, req.version
            ))
        })?;
    if record.stage == "archived" {
        return Err(Refusal::unprocessable(format!(
            "{}@v{} is archived; stage it again before rolling it out",
            req.model, req.version
        )));
    }
    let selector: Selector = req.to.parse().map_err(Refusal::unprocessable)?;
    let waves = crate::rollout::parse_waves(req.waves.as_deref(), req.canary)
        .map_err(Refusal::unprocessable)?;
    if let Some(p) = req.shadow_sample_permille
        && !(1..=1000).contains(&p)
    {
        return Err(Refusal::unprocessable(format!(
            "a shadow sample of {p} per thousand: give 1 to 1000 (--shadow-sample 0.1% to 100%)"
        )));
    }
    if let Some(r) = active_of(plane, &req.model)? {
        return Err(Refusal::conflict(format!(
            "rollout {} of {} is {}; abort it (fleetctl rollout abort {}) before starting another",
            r.id,
            r.model,
            r.state.as_str(),
            r.id
        )));
    }
    let digest: Sha256 = record.digest.parse().map_err(Refusal::internal)?;
    let id = plane.rollouts.next_rollout_id()?;
    let to = AssignedModel {
        shadow: None,
        version: req.version,
        digest,
        size: record.size,
        rollout: Some(id.clone()),
    };
    let mut devices: Vec<_> = plane
        .ingest
        .store
        .devices()?
        .into_iter()
        .filter(|d| selector.matches(d))
        .collect();
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    if devices.is_empty() {
        return Err(Refusal::unprocessable(format!(
            "selector `{}` matches no enrolled device",
            req.to
        )));
    }
    let ids: Vec<DeviceId> = devices.iter().map(|d| d.id.clone()).collect();
    let mut assigned: BTreeMap<DeviceId, _> = plane
        .assignments
        .assignments_named(&ids)?
        .into_iter()
        .collect();
    let mut targets = Vec::new();
    let mut unserved = Vec::new();
    for d in &devices {
        let from = assigned
            .remove(&d.id)
            .and_then(|mut r| r.models.remove(&req.model));
        // A shadow runs beside what the device serves: the assignment keeps its version
        // and gains the shadow.
        let to = match (req.shadow_sample_permille, &from) {
            (None, _) => to.clone(),
            (Some(sample), Some(serving)) if serving.version != req.version => AssignedModel {
                shadow: Some(ShadowModel {
                    version: req.version,
                    digest,
                    size: record.size,
                    sample_permille: sample,
                    rollout: Some(id.clone()),
                }),
                ..serving.clone()
            },
            (Some(_), _) => {
                unserved.push(d.id.to_string());
                continue;
            }
        };
        targets.push(Target {
            device: d.id.clone(),
            wave: 0,
            to,
            from,
            assigned_ms: None,
            generation: None,
        });
    }
    if !unserved.is_empty() {
        return Err(Refusal::unprocessable(format!(
            "a shadow runs beside the version a device serves, and {} serve{} no other version \
             of {}: {} (roll a version out to them first, or select other devices)",
            unserved.len(),
            if unserved.len() == 1 { "s" } else { "" },
            req.model,
            unserved.join(", ")
        )));
    }
    let states = states_of(plane, &targets)?;
    let rollout = Rollout::new(
        Plan {
            id,
            kind: Kind::Rollout,
            model: req.model.clone(),
            version: Some(req.version),
            selector: req.to.clone(),
            strategy: Strategy {
                waves,
                soak_ms: req.soak_s.unwrap_or(60) * 1000,
                quorum_pct: req.quorum_pct.unwrap_or(100).clamp(1, 100),
                deadline_ms: req.deadline_s.unwrap_or(1800) * 1000,
                gates: gates_from(req.gates),
                auto_rollback: req.auto_rollback,
            },
            baseline: crate::rollout::baseline(&req.model, &targets, &states),
            targets,
            by,
            shadow: req.shadow_sample_permille,
        },
        now_ms(),
    );
    plane.rollouts.put_rollout(&rollout)?;
    Ok(rollout)
}

/// `POST /v1/rollouts/{id}/promote`: turns shadow rollout `id` into a real rollout of
/// its version to the devices it reached (a new assignment generation each, the shadow
/// dropped), with the same waves, soak and gates less the shadow ones. Refused unless
/// every gate passes and each shadow gate with a limit has a value: rows were compared.
pub fn promote(plane: &Plane, id: &str, by: String) -> Result<Rollout, Refusal> {
    let _guard = plane.rollout_lock.lock().unwrap_or_else(|p| p.into_inner());
    let mut shadow = plane
        .rollouts
        .rollout(id)?
        .ok_or_else(|| Refusal::not_found(format!("no rollout `{id}`")))?;
    let Some(sample) = shadow.shadow else {
        return Err(Refusal::unprocessable(format!(
            "rollout {id} is not a shadow rollout; only those are promoted"
        )));
    };
    if matches!(shadow.state, RState::Aborted | RState::RolledBack)
        || shadow
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("promoted"))
    {
        return Err(Refusal::conflict(format!(
            "shadow rollout {id} is {}{}; start a new one",
            shadow.state.as_str(),
            shadow
                .reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        )));
    }
    let states = states_of(plane, &shadow.targets)?;
    let failing: Vec<String> = shadow
        .gates(&states)
        .into_iter()
        .filter(|g| {
            !g.ok || (g.gate.starts_with("shadow_") && g.threshold.is_some() && g.value.is_none())
        })
        .map(|g| {
            format!(
                "{} = {} (limit {})",
                g.gate,
                g.value
                    .map_or("no value yet".into(), crate::rollout::fmt_num),
                g.threshold.map_or("-".into(), crate::rollout::fmt_num)
            )
        })
        .collect();
    if !failing.is_empty() {
        return Err(Refusal::conflict(format!(
            "promotion of shadow rollout {id} refused by its gates: {}",
            failing.join("; ")
        )));
    }
    let reached: Vec<String> = shadow
        .targets
        .iter()
        .filter(|t| t.assigned_ms.is_some())
        .map(|t| t.device.to_string())
        .collect();
    if reached.is_empty() {
        return Err(Refusal::conflict(format!(
            "shadow rollout {id} reached no device yet"
        )));
    }
    let version = shadow.version.unwrap_or(0);
    let g = &shadow.strategy.gates;
    let req = RolloutRequest {
        model: shadow.model.clone(),
        version,
        to: format!("device={}", reached.join("|")),
        waves: Some(
            shadow
                .strategy
                .waves
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        canary: None,
        soak_s: Some(shadow.strategy.soak_ms / 1000),
        quorum_pct: Some(shadow.strategy.quorum_pct),
        deadline_s: Some(shadow.strategy.deadline_ms / 1000),
        auto_rollback: shadow.strategy.auto_rollback,
        gates: Some(GateOverrides::serving(g)),
        shadow_sample_permille: None,
    };
    // The shadow rollout ends first: it is the model's active rollout.
    let before = (shadow.state, shadow.reason.clone());
    shadow.state = RState::Completed;
    shadow.reason = Some("promoted".into());
    shadow.updated_ms = now_ms();
    plane.rollouts.put_rollout(&shadow)?;
    match create_locked(plane, req, by) {
        Ok(r) => {
            shadow.reason = Some(format!("promoted: rollout {} of v{version}", r.id));
            plane.rollouts.put_rollout(&shadow)?;
            tracing::info!(shadow = %id, rollout = %r.id, sample, "shadow rollout promoted");
            Ok(r)
        }
        Err(e) => {
            (shadow.state, shadow.reason) = before;
            plane.rollouts.put_rollout(&shadow)?;
            Err(e)
        }
    }
}

/// `POST /v1/rollbacks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub model: String,
    /// The version to return to (default: each device's previous one).
    #[serde(default)]
    pub to: Option<u64>,
    /// A device selector (default: all).
    #[serde(default)]
    pub devices: Option<String>,
    /// Only say what would move.
    #[serde(default)]
    pub dry_run: bool,
}

/// The answer to a dry run of `POST /v1/rollbacks`: what would move, and what not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackPlan {
    pub model: String,
    pub devices: Vec<RollbackMove>,
    pub skipped: Vec<Skipped>,
}

/// One device a rollback moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackMove {
    pub device: String,
    pub from: Option<u64>,
    pub to: u64,
}

/// A selected device a rollback leaves alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub device: String,
    pub reason: String,
}

/// Plans a rollback of `req.model` (each selected device back to its previous or the
/// named version, as a new generation; one wave, no gates) and, unless it is a dry run,
/// keeps it: its id (none for a dry run) and the plan.
pub fn rollback(
    plane: &Plane,
    req: &RollbackRequest,
    by: String,
) -> Result<(Option<String>, RollbackPlan), Refusal> {
    let selector: Selector = req
        .devices
        .as_deref()
        .unwrap_or("all")
        .parse()
        .map_err(Refusal::unprocessable)?;
    let named = match req.to {
        Some(v) => {
            let r = plane
                .registry
                .get(&req.model, v)
                .map_err(Refusal::internal)?
                .ok_or_else(|| {
                    Refusal::not_found(format!("{}@v{v} is not in the registry", req.model))
                })?;
            Some(AssignedModel {
                shadow: None,
                version: v,
                digest: r.digest.parse().map_err(Refusal::internal)?,
                size: r.size,
                rollout: None,
            })
        }
        None => None,
    };
    let _guard = plane.rollout_lock.lock().unwrap_or_else(|p| p.into_inner());
    let id = if req.dry_run {
        "(dry run)".to_string()
    } else {
        plane.rollouts.next_rollout_id()?
    };
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    let mut devices = plane.ingest.store.devices()?;
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    for d in devices.iter().filter(|d| selector.matches(d)) {
        let Some(record) = plane.assignments.assignment(&d.id)? else {
            continue;
        };
        let Some(current) = record.models.get(&req.model) else {
            continue;
        };
        let to = named
            .clone()
            .or_else(|| record.previous.get(&req.model).cloned());
        match to {
            Some(mut to) if to.digest != current.digest => {
                to.rollout = Some(id.clone());
                targets.push(Target {
                    device: d.id.clone(),
                    wave: 0,
                    to,
                    from: Some(current.clone()),
                    assigned_ms: None,
                    generation: None,
                });
            }
            Some(_) => skipped.push(Skipped {
                device: d.id.to_string(),
                reason: format!("already assigned v{}", current.version),
            }),
            None => skipped.push(Skipped {
                device: d.id.to_string(),
                reason: "no previous version assigned".into(),
            }),
        }
    }
    if targets.is_empty() {
        return Err(Refusal::unprocessable(format!(
            "nothing to roll back: no selected device has another version of {} to return to{}",
            req.model,
            if skipped.is_empty() {
                String::new()
            } else {
                format!(" ({})", serde_json::to_string(&skipped).unwrap_or_default())
            }
        )));
    }
    let plan = RollbackPlan {
        model: req.model.clone(),
        devices: targets
            .iter()
            .map(|t| RollbackMove {
                device: t.device.to_string(),
                from: t.from.as_ref().map(|f| f.version),
                to: t.to.version,
            })
            .collect(),
        skipped,
    };
    if req.dry_run {
        return Ok((None, plan));
    }
    // A rollback supersedes a rollout of the same model still going.
    for mut r in plane.rollouts.unfinished_rollouts()? {
        if r.model == req.model {
            r.state = RState::Aborted;
            r.reason = Some(format!("superseded by rollback {id}"));
            plane.rollouts.put_rollout(&r)?;
        }
    }
    let versions: std::collections::BTreeSet<u64> = targets.iter().map(|t| t.to.version).collect();
    let rollout = Rollout::new(
        Plan {
            id: id.clone(),
            kind: Kind::Rollback,
            model: req.model.clone(),
            version: (versions.len() == 1).then(|| versions.into_iter().next().unwrap_or(0)),
            selector: req.devices.clone().unwrap_or_else(|| "all".into()),
            strategy: Strategy {
                waves: vec![100],
                soak_ms: 0,
                quorum_pct: 100,
                deadline_ms: 30 * 60 * 1000,
                gates: Gates::default(),
                auto_rollback: false,
            },
            baseline: Default::default(),
            targets,
            by,
            shadow: None,
        },
        now_ms(),
    );
    plane.rollouts.put_rollout(&rollout)?;
    Ok((Some(id), plan))
}

/// One engine step of rollout `id` (blocking): its assignments and its state kept in one
/// transaction. The devices to be told: those that got a new assignment, and those of
/// the running wave reminded of theirs ([`Rollout::remind`]).
pub fn step(plane: &Plane, id: &str) -> Result<Vec<DeviceId>, Refusal> {
    let _guard = plane.rollout_lock.lock().unwrap_or_else(|p| p.into_inner());
    let Some(mut r) = plane.rollouts.rollout(id)? else {
        return Ok(Vec::new());
    };
    if r.state != RState::Running {
        return Ok(Vec::new());
    }
    // What a step judges (progress, gates, reminders) is the reached devices' states: a
    // staged rollout's canary wave reads its few devices, not the whole selection.
    let states = states_of(plane, r.targets.iter().filter(|t| t.assigned_ms.is_some()))?;
    let now = now_ms();
    let before = (r.state, r.waves.clone());
    let changes: Vec<_> = r
        .step(&states, now)
        .into_iter()
        .map(|Assign { device, to }| (device, to))
        .collect();
    let reminded = r.remind(&states, now, plane.rollout_remind_ms);
    if !reminded.is_empty() {
        tracing::info!(
            rollout = %r.id,
            devices = reminded.len(),
            "telling again the devices that have not answered their assignment"
        );
    }
    if r.state != before.0 {
        tracing::info!(rollout = %r.id, state = ?r.state, reason = ?r.reason, "rollout changed state");
    }
    if !changes.is_empty() {
        // The assignments and the rollout that made them, in one transaction.
        plane.rollouts.advance_rollout(&mut r, &changes, now)?;
    } else if r.state != before.0 || r.waves != before.1 {
        plane.rollouts.put_rollout(&r)?;
    }
    if !changes.is_empty() {
        tracing::info!(rollout = %r.id, devices = changes.len(), "assigned");
    }
    Ok(changes
        .into_iter()
        .map(|(d, _)| d)
        .chain(reminded)
        .collect())
}

/// Pauses, resumes or aborts rollout `id` (`to`: paused, running or aborted). Resuming
/// acknowledges what the gates saw so far (they count anew) and gives a wave whose
/// deadline passed a new one from now.
pub fn control(plane: &Plane, id: &str, to: RState) -> Result<(), Refusal> {
    let _guard = plane.rollout_lock.lock().unwrap_or_else(|p| p.into_inner());
    let mut r = plane
        .rollouts
        .rollout(id)?
        .ok_or_else(|| Refusal::not_found(format!("no rollout `{id}`")))?;
    let allowed = match to {
        RState::Paused => r.state == RState::Running,
        RState::Running => r.state == RState::Paused,
        RState::Aborted => !r.state.is_final(),
        _ => false,
    };
    if !allowed {
        return Err(Refusal::conflict(format!(
            "rollout {} is {}; it cannot become {}",
            r.id,
            r.state.as_str(),
            to.as_str()
        )));
    }
    let now = now_ms();
    if to == RState::Running {
        r.gates_since_ms = now;
        if let Some(w) = r
            .waves
            .iter_mut()
            .find(|w| w.passed_ms.is_none() && w.started_ms.is_some())
        {
            w.restart(now);
        }
        r.reason = None;
    } else if to == RState::Aborted {
        r.reason = Some("aborted by an operator; devices keep what they were assigned (use fleetctl rollback to return them)".into());
    } else {
        r.reason = Some("paused by an operator".into());
    }
    r.state = to;
    r.updated_ms = now;
    plane.rollouts.put_rollout(&r)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A promoted shadow rollout keeps every serving gate of the shadow rollout, as set,
    /// and none of its shadow gates.
    #[test]
    fn a_promotion_keeps_the_serving_gates_and_drops_the_shadow_ones() {
        let shadow = Gates {
            max_activation_failures: 1,
            max_self_test_failures: 2,
            max_fallbacks: 3,
            max_drift_alerts: 4,
            max_missing_rate_increase: 0.5,
            max_p99_ratio: 2.5,
            max_error_rate_increase: 0.25,
            min_shadow_agreement: Some(0.9),
            max_shadow_latency_ratio: Some(1.5),
            max_shadow_mean_abs_error: Some(0.1),
        };
        let promoted = gates_from(Some(GateOverrides::serving(&shadow)));
        assert_eq!(
            promoted,
            Gates {
                min_shadow_agreement: None,
                max_shadow_latency_ratio: None,
                max_shadow_mean_abs_error: None,
                ..shadow
            }
        );
    }
}
