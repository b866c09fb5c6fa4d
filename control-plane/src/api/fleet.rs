//! API handlers for what devices run: signed assignments, bundle downloads, rollouts,
//! rollbacks; and for operator tokens and the audit log. The rollout engine
//! ([`spawn_rollouts`]) advances running rollouts every second.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetml_protocol::assignment::AssignedModel;
use fleetml_protocol::crypto::Sha256;
use fleetml_protocol::telemetry::{CommandKind, DeviceId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::devices::enrolled;
use crate::api::types::{CreatedToken, TokenInfo, TokenRequest};
use crate::api::{Api, ApiError};
use crate::auth::{Principal, Role};
use crate::plane::{Plane, now_ms};
use crate::records::DeviceState;
use crate::rollout::{
    Assign, Gates, Kind, Plan, Progress, Rollout, Selector, State as RState, Strategy, Target,
};
use crate::store::FleetStore;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Api<T> + Send + 'static) -> Api<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

/// `GET /v1/devices/{id}/assignment`: the device's assignment, signed now (CBOR).
pub async fn device_assignment(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    UrlPath(id): UrlPath<String>,
) -> Api<Response> {
    let d = enrolled(&plane, &id)?;
    if let Principal::Device(caller) = &who
        && caller != &d.id
    {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("device `{caller}` may read only its own assignment"),
        ));
    }
    let record = plane.assignments.assignment(&d.id)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("device `{id}` has no assignment yet (start a rollout that selects it)"),
        )
    })?;
    let signed = record.signed(
        &d.id,
        &plane.assignment_key,
        now_ms(),
        plane.assignment_ttl_ms,
    );
    Ok((
        [(header::CONTENT_TYPE, "application/cbor")],
        signed.to_cbor(),
    )
        .into_response())
}

/// `GET /v1/bundles/{digest}`: a bundle's bytes, with `Range: bytes=N-` for resuming.
pub async fn bundle(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    UrlPath(digest): UrlPath<String>,
    headers: HeaderMap,
) -> Api<Response> {
    let digest: Sha256 = digest
        .parse()
        .map_err(|e: String| ApiError(StatusCode::BAD_REQUEST, e))?;
    if let Principal::Device(d) = &who {
        let named = plane
            .assignments
            .assignment(d)?
            .is_some_and(|r| r.models.values().any(|m| m.digest == digest));
        if !named {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("bundle {digest} is not in device `{d}`'s assignment"),
            ));
        }
    }
    let path = plane.registry.blob_path(&digest.to_string());
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no bundle {digest} in the registry"),
            ));
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    let len = file.metadata().await.map_err(ApiError::internal)?.len();
    let from = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(r) => Some(parse_range(r).ok_or_else(|| {
            ApiError(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("range `{r}` is not `bytes=N-`"),
            )
        })?),
    };
    if let Some(from) = from
        && from >= len
    {
        return Ok((
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, format!("bytes */{len}"))],
        )
            .into_response());
    }
    let start = from.unwrap_or(0);
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(ApiError::internal)?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file.take(len - start),
        64 * 1024,
    ));
    metrics::counter!("fleetml_control_bundle_bytes_served_total").increment(len - start);
    if start > 0 {
        metrics::counter!("fleetml_control_bundle_resumed_total").increment(1);
    }
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len - start)
        .header(header::ACCEPT_RANGES, "bytes");
    response = match from {
        Some(_) => response.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", len - 1),
        ),
        None => response.status(StatusCode::OK),
    };
    response.body(body).map_err(ApiError::internal)
}

/// `bytes=N-` (or `bytes=N-M`, served to the end): N.
fn parse_range(r: &str) -> Option<u64> {
    let spec = r.trim().strip_prefix("bytes=")?;
    let (from, _) = spec.split_once('-')?;
    from.trim().parse().ok()
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    model: String,
    #[serde(default)]
    to: Option<u64>,
    #[serde(default)]
    devices: Option<String>,
    #[serde(default)]
    dry_run: bool,
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
        let selector: Selector = req.devices.as_deref().unwrap_or("all").parse().map_err(ApiError::unprocessable)?;
        let named = match req.to {
            Some(v) => {
                let r = plane.registry.get(&req.model, v).map_err(ApiError::internal)?.ok_or_else(|| {
                    ApiError(StatusCode::NOT_FOUND, format!("{}@v{v} is not in the registry", req.model))
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
        let id = if req.dry_run { "(dry run)".to_string() } else { plane.rollouts.next_rollout_id()? };
        let mut targets = Vec::new();
        let mut skipped = Vec::new();
        let mut devices = plane.ingest.store.devices()?;
        devices.sort_by(|a, b| a.id.cmp(&b.id));
        for d in devices.iter().filter(|d| selector.matches(d)) {
            let Some(record) = plane.assignments.assignment(&d.id)? else { continue };
            let Some(current) = record.models.get(&req.model) else { continue };
            let to = named.clone().or_else(|| record.previous.get(&req.model).cloned());
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
                Some(_) => skipped.push(json!({"device": d.id, "reason": format!("already assigned v{}", current.version)})),
                None => skipped.push(json!({"device": d.id, "reason": "no previous version assigned"})),
            }
        }
        if targets.is_empty() {
            return Err(ApiError::unprocessable(format!(
                "nothing to roll back: no selected device has another version of {} to return to{}",
                req.model,
                if skipped.is_empty() { String::new() } else { format!(" ({})", Value::Array(skipped.clone())) }
            )));
        }
        let plan = json!({
            "model": req.model,
            "devices": targets.iter().map(|t| json!({
                "device": t.device, "from": t.from.as_ref().map(|f| f.version), "to": t.to.version,
            })).collect::<Vec<_>>(),
            "skipped": skipped,
        });
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
        let versions: std::collections::BTreeSet<u64> = targets.iter().map(|t| t.to.version).collect();
        let rollout = Rollout::new(Plan {
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
        }, now_ms());
        plane.rollouts.put_rollout(&rollout)?;
        Ok((Some(id), plan))
    })
    .await?;
    match planned {
        (None, plan) => Ok((StatusCode::OK, axum::Json(plan))),
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

/// `POST /v1/tokens`: a new operator token, shown once.
pub async fn create_token(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    axum::Json(req): axum::Json<TokenRequest>,
) -> Api<(StatusCode, axum::Json<CreatedToken>)> {
    let role: Role = req.role.parse().map_err(ApiError::unprocessable)?;
    if req.name.trim().is_empty() || req.name.len() > 64 {
        return Err(ApiError::unprocessable(
            "a token needs a name of 1–64 characters (who or what uses it)",
        ));
    }
    let random = crate::plane::random_bytes(32).map_err(ApiError::internal)?;
    let (record, token) =
        plane
            .tokens
            .create(req.name.trim(), role, &who.who(), now_ms(), &random)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken {
            id: record.id,
            name: record.name,
            role: record.role,
            token,
        }),
    ))
}

pub async fn list_tokens(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Vec<TokenInfo>>> {
    let list = plane.tokens.list()?;
    Ok(axum::Json(list.iter().map(TokenInfo::from).collect()))
}

pub async fn revoke_token(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<StatusCode> {
    if id == "admin" {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "the bootstrap admin token is revoked by deleting DATA_DIR/admin.token and restarting the server".into(),
        ));
    }
    if plane.tokens.revoke(&id)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no token `{id}` (fleetctl tokens list)"),
        ))
    }
}

#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    #[serde(default = "one")]
    from: u64,
    #[serde(default = "many")]
    limit: usize,
}

fn one() -> u64 {
    1
}

fn many() -> usize {
    100_000
}

/// `GET /v1/audit`.
pub async fn audit_log(
    State(plane): State<Arc<Plane>>,
    Query(q): Query<AuditQuery>,
) -> Api<axum::Json<Value>> {
    let entries = plane.audit.entries(q.from, q.limit.min(1_000_000))?;
    Ok(axum::Json(
        serde_json::to_value(entries).map_err(ApiError::internal)?,
    ))
}

#[derive(Debug, Deserialize)]
pub struct CaptureQuery {
    seq: u64,
    model: String,
    kind: String,
}

/// `POST /v1/devices/{id}/captures?seq=N&model=M&kind=sampled|labelled`: a batch of
/// captured rows (JSON lines), stored once per `(device, seq)`.
pub async fn upload_capture(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    UrlPath(id): UrlPath<String>,
    query: Result<Query<CaptureQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let d = enrolled(&plane, &id)?;
    if who != Principal::Device(d.id.clone()) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("only device `{}` uploads its captures", d.id),
        ));
    }
    let Query(q) = query.map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("give ?seq=N&model=NAME&kind=sampled|labelled: {e}"),
        )
    })?;
    let p = plane.clone();
    let stored = blocking(move || {
        p.captures
            .store(&d.id, q.seq, &q.model, &q.kind, &body, now_ms())
            .map_err(|e| match e {
                crate::captures::CaptureError::Conflict { .. } => {
                    ApiError(StatusCode::CONFLICT, e.to_string())
                }
                crate::captures::CaptureError::Invalid(m) => ApiError(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("capture batch {}: {m}", q.seq),
                ),
                crate::captures::CaptureError::Store(e) => ApiError::internal(e),
            })
    })
    .await?;
    let (new, record) = stored;
    if new {
        metrics::counter!("fleetml_control_capture_rows_total", "model" => record.model.clone())
            .increment(record.rows);
    }
    Ok((
        if new {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        axum::Json(json!({ "stored": new, "batch": record })),
    ))
}

#[derive(Debug, Deserialize)]
pub struct CaptureListQuery {
    model: Option<String>,
    device: Option<String>,
}

/// `GET /v1/captures?model=&device=`: the captured batches.
pub async fn list_captures(
    State(plane): State<Arc<Plane>>,
    Query(q): Query<CaptureListQuery>,
) -> Api<axum::Json<Value>> {
    let list = plane
        .captures
        .list(q.model.as_deref(), q.device.as_deref())?;
    Ok(axum::Json(
        serde_json::to_value(list).map_err(ApiError::internal)?,
    ))
}
