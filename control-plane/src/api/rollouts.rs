//! API handlers for rollouts and rollbacks, `start_canary` (which the drift policy uses
//! too), and the rollout engine (`spawn_rollouts`), which advances running rollouts
//! every second through `Rollout::step`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use fleetml_protocol::assignment::AssignedModel;
use fleetml_protocol::crypto::Sha256;
use fleetml_protocol::telemetry::{CommandKind, DeviceId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::blocking;
use crate::api::types::{RollbackMove, RollbackPlan, RollbackRequest, Skipped};
use crate::api::{Api, ApiError};
use crate::auth::Principal;
use crate::plane::{Plane, now_ms};
use crate::records::DeviceState;
use crate::rollout::{
    Assign, Gates, Kind, Plan, Progress, Rollout, Selector, State as RState, Strategy, Target,
};
use crate::store::FleetStore;

/// Device states by id, for the devices of `targets`.
fn states_of(plane: &Plane, targets: &[Target]) -> Api<BTreeMap<DeviceId, DeviceState>> {
    let mut out = BTreeMap::new();
    for t in targets {
        if let Some(st) = plane.ingest.store.state(&t.device)? {
            out.insert(t.device.clone(), st);
        }
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    model: String,
    version: u64,
    to: String,
    #[serde(default)]
    waves: Option<String>,
    #[serde(default)]
    canary: Option<u32>,
    #[serde(default)]
    soak_s: Option<u64>,
    #[serde(default)]
    quorum_pct: Option<u32>,
    #[serde(default)]
    deadline_s: Option<u64>,
    #[serde(default)]
    auto_rollback: bool,
    #[serde(default)]
    gates: Option<GateOverrides>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateOverrides {
    max_activation_failures: Option<u32>,
    max_self_test_failures: Option<u32>,
    max_fallbacks: Option<u32>,
    max_drift_alerts: Option<u32>,
    max_missing_rate_increase: Option<f64>,
    max_p99_ratio: Option<f64>,
    max_error_rate_increase: Option<f64>,
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
    }
}

/// An active (running or paused) rollout of `model`, if any.
fn active_of(plane: &Plane, model: &str) -> Api<Option<Rollout>> {
    Ok(plane
        .rollouts
        .rollouts()?
        .into_iter()
        .find(|r| r.model == model && !r.state.is_final()))
}

/// A canary rollout of `model@version` to every device (auto-rollback on), started by
/// the retraining policy; the engine advances it. Returns its id.
pub fn start_canary(plane: &Plane, model: &str, version: u64, pct: u32) -> Result<String, String> {
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
    };
    create_rollout(plane, req, format!("policy:{model}"))
        .map(|r| r.id)
        .map_err(|e| e.1)
}

/// `POST /v1/rollouts`.
pub async fn start_rollout(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    axum::Json(req): axum::Json<RolloutRequest>,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let p = plane.clone();
    let rollout = blocking(move || create_rollout(&p, req, who.who())).await?;
    tracing::info!(rollout = %rollout.id, model = %rollout.model, devices = rollout.targets.len(), "rollout started");
    advance(&plane, &rollout.id).await?;
    let r = status(&plane, &rollout.id).await?;
    Ok((StatusCode::CREATED, axum::Json(r)))
}

/// Checks a rollout request, selects and plans its devices, and keeps it (blocking).
fn create_rollout(plane: &Plane, req: RolloutRequest, by: String) -> Api<Rollout> {
    let record = plane
        .registry
        .get(&req.model, req.version)
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "{}@v{} is not in the registry (fleetctl models push)",
                    req.model, req.version
                ),
            )
        })?;
    if record.stage == "archived" {
        return Err(ApiError::unprocessable(format!(
            "{}@v{} is archived; stage it again before rolling it out",
            req.model, req.version
        )));
    }
    let selector: Selector = req.to.parse().map_err(ApiError::unprocessable)?;
    let waves = crate::rollout::parse_waves(req.waves.as_deref(), req.canary)
        .map_err(ApiError::unprocessable)?;
    let _guard = plane.rollout_lock.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = active_of(plane, &req.model)? {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "rollout {} of {} is {}; abort it (fleetctl rollout abort {}) before starting another",
                r.id,
                r.model,
                serde_json::to_value(r.state)
                    .map_err(ApiError::internal)?
                    .as_str()
                    .unwrap_or("?"),
                r.id
            ),
        ));
    }
    let digest: Sha256 = record.digest.parse().map_err(ApiError::internal)?;
    let id = plane.rollouts.next_rollout_id()?;
    let to = AssignedModel {
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
        return Err(ApiError::unprocessable(format!(
            "selector `{}` matches no enrolled device",
            req.to
        )));
    }
    let mut targets = Vec::new();
    for d in &devices {
        let from = plane
            .assignments
            .assignment(&d.id)?
            .and_then(|r| r.models.get(&req.model).cloned());
        targets.push(Target {
            device: d.id.clone(),
            wave: 0,
            to: to.clone(),
            from,
            assigned_ms: None,
            generation: None,
        });
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
        },
        now_ms(),
    );
    plane.rollouts.put_rollout(&rollout)?;
    Ok(rollout)
}

/// `POST /v1/rollbacks`: each selected device back to its previous (or the named)
/// version, as a new generation; one wave, no gates.
pub async fn start_rollback(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    axum::Json(req): axum::Json<RollbackRequest>,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let p = plane.clone();
    let planned = blocking(move || {
        let plane = p;
        let selector: Selector = req
            .devices
            .as_deref()
            .unwrap_or("all")
            .parse()
            .map_err(ApiError::unprocessable)?;
        let named = match req.to {
            Some(v) => {
                let r = plane
                    .registry
                    .get(&req.model, v)
                    .map_err(ApiError::internal)?
                    .ok_or_else(|| {
                        ApiError(
                            StatusCode::NOT_FOUND,
                            format!("{}@v{v} is not in the registry", req.model),
                        )
                    })?;
                Some(AssignedModel {
                    version: v,
                    digest: r.digest.parse().map_err(ApiError::internal)?,
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
            return Err(ApiError::unprocessable(format!(
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
        for mut r in plane.rollouts.rollouts()? {
            if r.model == req.model && !r.state.is_final() {
                r.state = RState::Aborted;
                r.reason = Some(format!("superseded by rollback {id}"));
                plane.rollouts.put_rollout(&r)?;
            }
        }
        let versions: std::collections::BTreeSet<u64> =
            targets.iter().map(|t| t.to.version).collect();
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
                by: who.who(),
            },
            now_ms(),
        );
        plane.rollouts.put_rollout(&rollout)?;
        Ok((Some(id), plan))
    })
    .await?;
    match planned {
        (None, plan) => Ok((
            StatusCode::OK,
            axum::Json(serde_json::to_value(plan).map_err(ApiError::internal)?),
        )),
        (Some(id), _) => {
            tracing::info!(rollback = %id, "rollback started");
            advance(&plane, &id).await?;
            Ok((StatusCode::CREATED, axum::Json(status(&plane, &id).await?)))
        }
    }
}

/// Runs one engine step of rollout `id`, makes its assignments, tells the devices.
pub async fn advance(plane: &Arc<Plane>, id: &str) -> Api<()> {
    let (p, id2) = (plane.clone(), id.to_string());
    let notify = blocking(move || {
        let plane = p;
        let _guard = plane.rollout_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut r) = plane.rollouts.rollout(&id2)? else { return Ok(Vec::new()) };
        if r.state != RState::Running {
            return Ok(Vec::new());
        }
        let states = states_of(&plane, &r.targets)?;
        let now = now_ms();
        let before = (r.state, r.waves.clone());
        let changes: Vec<_> = r
            .step(&states, now)
            .into_iter()
            .map(|Assign { device, to }| (device, to))
            .collect();
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
        Ok(changes.into_iter().map(|(d, _)| d).collect::<Vec<_>>())
    })
    .await?;
    if notify.is_empty() {
        return Ok(());
    }
    let mut devices = Vec::with_capacity(notify.len());
    for id in &notify {
        if let Some(d) = plane.ingest.store.device(id)? {
            devices.push(d);
        }
    }
    // The devices also poll; a lost notification only delays one.
    let sent =
        crate::api::devices::send_all(plane, &devices, &CommandKind::AssignmentChanged).await?;
    tracing::info!(rollout = %id, devices = sent, "devices notified");
    Ok(())
}

/// Advances every running rollout once a second.
pub fn spawn_rollouts(plane: Arc<Plane>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            every.tick().await;
            let running: Vec<String> = match plane.rollouts.rollouts() {
                Ok(all) => all
                    .into_iter()
                    .filter(|r| r.state == RState::Running)
                    .map(|r| r.id)
                    .collect(),
                Err(e) => {
                    tracing::error!(error = %e, "reading rollouts");
                    continue;
                }
            };
            for id in running {
                if let Err(e) = advance(&plane, &id).await {
                    tracing::error!(rollout = %id, error = %e.1, "advancing the rollout failed");
                }
            }
        }
    });
}

/// The status view of rollout `id`.
async fn status(plane: &Arc<Plane>, id: &str) -> Api<Value> {
    let (p, id) = (plane.clone(), id.to_string());
    blocking(move || {
        let r = p.rollouts.rollout(&id)?.ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no rollout `{id}` (fleetctl rollout list)"),
            )
        })?;
        let states = states_of(&p, &r.targets)?;
        Ok(rollout_view(&r, &states))
    })
    .await
}

/// A rollout with each device's progress, per-wave counts and the gates.
pub fn rollout_view(r: &Rollout, states: &BTreeMap<DeviceId, DeviceState>) -> Value {
    let progress: Vec<Progress> = r
        .targets
        .iter()
        .map(|t| r.progress(t, states.get(&t.device)))
        .collect();
    let waves: Vec<Value> = r
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let mut counts: BTreeMap<&str, usize> =
                ["waiting", "pending", "downloading", "active", "failed"]
                    .into_iter()
                    .map(|k| (k, 0))
                    .collect();
            for (t, p) in r.targets.iter().zip(&progress) {
                if t.wave == i {
                    *counts.entry(p.label()).or_default() += 1;
                }
            }
            json!({
                "wave": i + 1, "percent": w.percent, "devices": w.devices,
                "started_ms": w.started_ms, "passed_ms": w.passed_ms, "counts": counts,
            })
        })
        .collect();
    let devices: Vec<Value> = r
        .targets
        .iter()
        .zip(&progress)
        .map(|(t, p)| {
            let online = states.get(&t.device).is_some_and(|s| s.online);
            json!({
                "device": t.device, "wave": t.wave + 1, "to": t.to.version,
                "from": t.from.as_ref().map(|f| f.version), "generation": t.generation,
                "state": p.label(), "online": online,
                "detail": match p { Progress::Failed(d) => d.clone(), _ => String::new() },
            })
        })
        .collect();
    let gates = if r.kind == Kind::Rollout {
        serde_json::to_value(r.gates(states)).unwrap_or_default()
    } else {
        json!([])
    };
    let active = progress.iter().filter(|p| **p == Progress::Active).count();
    json!({
        "id": r.id, "kind": r.kind, "model": r.model, "version": r.version,
        "selector": r.selector, "state": r.state, "reason": r.reason,
        "strategy": r.strategy, "baseline": r.baseline,
        "created_ms": r.created_ms, "updated_ms": r.updated_ms, "by": r.by,
        "devices_total": r.targets.len(), "devices_active": active,
        "waves": waves, "devices": devices, "gates": gates,
    })
}

/// `GET /v1/rollouts`.
pub async fn list_rollouts(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    let p = plane.clone();
    let list = blocking(move || {
        let mut out = Vec::new();
        for r in p.rollouts.rollouts()? {
            let states = states_of(&p, &r.targets)?;
            let v = rollout_view(&r, &states);
            out.push(json!({
                "id": v["id"], "kind": v["kind"], "model": v["model"], "version": v["version"],
                "state": v["state"], "reason": v["reason"], "selector": v["selector"],
                "devices_total": v["devices_total"], "devices_active": v["devices_active"],
                "created_ms": v["created_ms"], "by": v["by"],
            }));
        }
        Ok(out)
    })
    .await?;
    Ok(axum::Json(Value::Array(list)))
}

/// `GET /v1/rollouts/{id}`.
pub async fn show_rollout(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    Ok(axum::Json(status(&plane, &id).await?))
}

/// Pause, resume or abort.
async fn control(plane: Arc<Plane>, id: String, to: RState) -> Api<axum::Json<Value>> {
    let p = plane.clone();
    let id2 = id.clone();
    blocking(move || {
        let _guard = p.rollout_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut r = p.rollouts.rollout(&id2)?.ok_or_else(|| {
            ApiError(StatusCode::NOT_FOUND, format!("no rollout `{id2}`"))
        })?;
        let state = |s: RState| serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let allowed = match to {
            RState::Paused => r.state == RState::Running,
            RState::Running => r.state == RState::Paused,
            RState::Aborted => !r.state.is_final(),
            _ => false,
        };
        if !allowed {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("rollout {} is {}; it cannot become {}", r.id, state(r.state), state(to)),
            ));
        }
        let now = now_ms();
        if to == RState::Running {
            // Resuming acknowledges what the gates saw so far; they count anew.
            r.gates_since_ms = now;
            // A wave whose deadline passed gets a new one from now.
            if let Some(w) = r.waves.iter_mut().find(|w| w.passed_ms.is_none() && w.started_ms.is_some()) {
                w.started_ms = Some(now);
            }
            r.reason = None;
        } else if to == RState::Aborted {
            r.reason = Some("aborted by an operator; devices keep what they were assigned (use fleetctl rollback to return them)".into());
        } else {
            r.reason = Some("paused by an operator".into());
        }
        r.state = to;
        r.updated_ms = now;
        p.rollouts.put_rollout(&r)?;
        Ok(())
    })
    .await?;
    Ok(axum::Json(status(&plane, &id).await?))
}

pub async fn pause_rollout(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    control(plane, id, RState::Paused).await
}

pub async fn resume_rollout(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    control(plane, id, RState::Running).await
}

pub async fn abort_rollout(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    control(plane, id, RState::Aborted).await
}
