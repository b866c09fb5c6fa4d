//! API handlers for rollouts and rollbacks, and the rollout engine task
//! (`spawn_rollouts`), which advances running rollouts every second through
//! `rollout::start::step` and tells the devices it assigned. What a rollout is and how it
//! is planned lives in `rollout`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use fleetml_protocol::telemetry::{CommandKind, DeviceId, ShadowReport, WindowReport};
use serde_json::Value;

use crate::api::blocking;
use crate::api::types::{
    DeviceProgress, GateView, RolloutSummary, RolloutView, ShadowRow, ShadowView, WaveView,
};
use crate::api::{Api, ApiError};
use crate::auth::Principal;
use crate::plane::Plane;
use crate::records::DeviceState;
use crate::rollout::start::{self, RollbackRequest, RolloutRequest};
use crate::rollout::{Kind, Progress, Rollout, ShadowFigures, State as RState};
use crate::store::FleetStore;

/// `POST /v1/rollouts`.
pub async fn start_rollout(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    axum::Json(req): axum::Json<RolloutRequest>,
) -> Api<(StatusCode, axum::Json<RolloutView>)> {
    let p = plane.clone();
    let rollout = blocking(move || Ok(start::create(&p, req, who.who())?)).await?;
    tracing::info!(rollout = %rollout.id, model = %rollout.model, devices = rollout.targets.len(), "rollout started");
    advance(&plane, &rollout.id).await?;
    let r = status(&plane, &rollout.id).await?;
    Ok((StatusCode::CREATED, axum::Json(r)))
}

/// `POST /v1/rollbacks`: each selected device back to its previous (or the named)
/// version, as a new generation; one wave, no gates.
pub async fn start_rollback(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    axum::Json(req): axum::Json<RollbackRequest>,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let p = plane.clone();
    let planned = blocking(move || Ok(start::rollback(&p, &req, who.who())?)).await?;
    match planned {
        (None, plan) => Ok((
            StatusCode::OK,
            axum::Json(serde_json::to_value(plan).map_err(ApiError::internal)?),
        )),
        (Some(id), _) => {
            tracing::info!(rollback = %id, "rollback started");
            advance(&plane, &id).await?;
            Ok((
                StatusCode::CREATED,
                axum::Json(
                    serde_json::to_value(status(&plane, &id).await?).map_err(ApiError::internal)?,
                ),
            ))
        }
    }
}

/// Runs one engine step of rollout `id`, makes its assignments, tells the devices.
pub async fn advance(plane: &Arc<Plane>, id: &str) -> Api<()> {
    let (p, id2) = (plane.clone(), id.to_string());
    let notify = blocking(move || Ok(start::step(&p, &id2)?)).await?;
    if notify.is_empty() {
        return Ok(());
    }
    let mut devices = plane.ingest.store.devices_named(&notify)?;
    devices.sort_by(|a, b| a.id.cmp(&b.id));
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
            // One engine across replicas: the leader's.
            if !plane.leader.leads() {
                continue;
            }
            let running = match plane.rollouts.running_rollout_ids() {
                Ok(ids) => ids,
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
async fn status(plane: &Arc<Plane>, id: &str) -> Api<RolloutView> {
    let (p, id) = (plane.clone(), id.to_string());
    blocking(move || {
        let r = p.rollouts.rollout(&id)?.ok_or_else(|| {
            ApiError::not_found(format!("no rollout `{id}` (fleetctl rollout list)"))
        })?;
        let states = start::states_of(&p, &r.targets)?;
        Ok(rollout_view(&r, &states))
    })
    .await
}

/// A rollout with each device's progress, per-wave counts and the gates.
/// A served window and the shadow's report in it.
type Compared<'a> = (&'a WindowReport, &'a ShadowReport);

/// A shadow rollout's comparison per device and per board (`None` for other rollouts).
fn shadow_view(r: &Rollout, states: &BTreeMap<DeviceId, DeviceState>) -> Option<ShadowView> {
    let sample_permille = r.shadow?;
    let version = r.version?;
    let row = |name: String, pairs: &[Compared<'_>], alerts: Vec<String>| -> ShadowRow {
        let f = ShadowFigures::of(pairs);
        let sum =
            |g: &dyn Fn(&ShadowReport) -> u32| pairs.iter().map(|(_, s)| u64::from(g(s))).sum();
        ShadowRow {
            name,
            devices: pairs.len(),
            runs: sum(&|s| s.runs),
            shed: sum(&|s| s.shed),
            failed: sum(&|s| s.failed),
            rows: f.rows,
            agreement: f.agreement,
            mean_abs_error: f.mean_abs_error,
            shadow_p95_us: f.shadow_p95_us,
            served_p95_us: f.served_p95_us,
            latency_ratio: f.latency_ratio(),
            alerts,
        }
    };
    let mut devices = Vec::new();
    let mut boards: BTreeMap<String, (Vec<Compared<'_>>, usize)> = BTreeMap::new();
    for t in r.targets.iter().filter(|t| t.assigned_ms.is_some()) {
        let Some(st) = states.get(&t.device) else {
            continue;
        };
        let Some((_, w)) = st.windows.get(&r.model) else {
            continue;
        };
        let Some(s) = w.shadow.as_ref().filter(|s| s.version == version) else {
            continue;
        };
        let board = st
            .status
            .as_ref()
            .map_or_else(|| "unknown".to_string(), |(_, s)| s.board.clone());
        devices.push(row(t.device.to_string(), &[(w, s)], s.alerts.clone()));
        let b = boards.entry(board).or_default();
        b.0.push((w, s));
        b.1 += usize::from(!s.alerts.is_empty());
    }
    Some(ShadowView {
        version,
        sample_permille,
        boards: boards
            .into_iter()
            .map(|(name, (pairs, alerting))| {
                let alerts = if alerting > 0 {
                    vec![format!("{alerting} device(s) alerting")]
                } else {
                    Vec::new()
                };
                row(name, &pairs, alerts)
            })
            .collect(),
        devices,
    })
}

pub fn rollout_view(r: &Rollout, states: &BTreeMap<DeviceId, DeviceState>) -> RolloutView {
    let progress: Vec<Progress> = r
        .targets
        .iter()
        .map(|t| r.progress(t, states.get(&t.device)))
        .collect();
    let waves = r
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let mut counts: BTreeMap<String, usize> =
                ["waiting", "pending", "downloading", "active", "failed"]
                    .into_iter()
                    .map(|k| (k.to_string(), 0))
                    .collect();
            for (t, p) in r.targets.iter().zip(&progress) {
                if t.wave == i {
                    *counts.entry(p.label().to_string()).or_default() += 1;
                }
            }
            WaveView {
                counts,
                devices: w.devices,
                passed_ms: w.passed_ms,
                percent: w.percent,
                started_ms: w.started_ms,
                wave: i + 1,
                reminded: w.reminded,
            }
        })
        .collect();
    let devices = r
        .targets
        .iter()
        .zip(&progress)
        .map(|(t, p)| DeviceProgress {
            detail: match p {
                Progress::Failed(d) => d.clone(),
                _ => String::new(),
            },
            device: t.device.to_string(),
            from: t.from.as_ref().map(|f| f.version),
            generation: t.generation,
            online: states.get(&t.device).is_some_and(|s| s.online),
            state: p.label().to_string(),
            to: t.to.version,
            wave: t.wave + 1,
        })
        .collect();
    let gates = if r.kind == Kind::Rollout {
        r.gates(states)
            .into_iter()
            .map(|g| GateView {
                gate: g.gate.to_string(),
                ok: g.ok,
                threshold: g.threshold,
                value: g.value,
            })
            .collect()
    } else {
        Vec::new()
    };
    RolloutView {
        shadow: shadow_view(r, states),
        baseline: r.baseline.clone(),
        by: r.by.clone(),
        created_ms: r.created_ms,
        devices,
        devices_active: progress.iter().filter(|p| **p == Progress::Active).count(),
        devices_total: r.targets.len(),
        gates,
        id: r.id.clone(),
        kind: r.kind,
        model: r.model.clone(),
        reason: r.reason.clone(),
        selector: r.selector.clone(),
        state: r.state,
        strategy: r.strategy.clone(),
        updated_ms: r.updated_ms,
        version: r.version,
        waves,
    }
}

/// `GET /v1/rollouts`.
pub async fn list_rollouts(
    State(plane): State<Arc<Plane>>,
) -> Api<axum::Json<Vec<RolloutSummary>>> {
    let p = plane.clone();
    let list = blocking(move || {
        let mut out = Vec::new();
        for r in p.rollouts.rollouts()? {
            let states = start::states_of(&p, &r.targets)?;
            out.push(RolloutSummary::from(&rollout_view(&r, &states)));
        }
        Ok(out)
    })
    .await?;
    Ok(axum::Json(list))
}

/// `GET /v1/rollouts/{id}`.
pub async fn show_rollout(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<RolloutView>> {
    Ok(axum::Json(status(&plane, &id).await?))
}

/// Pause, resume or abort.
async fn control(plane: Arc<Plane>, id: String, to: RState) -> Api<axum::Json<RolloutView>> {
    let (p, id2) = (plane.clone(), id.clone());
    blocking(move || Ok(start::control(&p, &id2, to)?)).await?;
    Ok(axum::Json(status(&plane, &id).await?))
}

/// `POST /v1/rollouts/{id}/promote`: a shadow rollout made a real one (409 naming the
/// failing gates when they do not pass).
pub async fn promote_rollout(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    UrlPath(id): UrlPath<String>,
) -> Api<(StatusCode, axum::Json<RolloutView>)> {
    let p = plane.clone();
    let rollout = blocking(move || Ok(start::promote(&p, &id, who.who())?)).await?;
    advance(&plane, &rollout.id).await?;
    let r = status(&plane, &rollout.id).await?;
    Ok((StatusCode::CREATED, axum::Json(r)))
}

pub async fn pause_rollout(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<RolloutView>> {
    control(plane, id, RState::Paused).await
}

pub async fn resume_rollout(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<RolloutView>> {
    control(plane, id, RState::Running).await
}

pub async fn abort_rollout(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<RolloutView>> {
    control(plane, id, RState::Aborted).await
}
