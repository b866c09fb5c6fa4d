//! `fleetctl retrain …` and `fleetctl models reproduce`: starting, listing, showing,
//! cancelling training jobs and reading their logs. The jobs run in `retrain`.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{Api, ApiError};
use crate::auth::Principal;
use crate::jobs::Job;
use crate::plane::Plane;
use crate::retrain::{executor, start};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    model: String,
    /// The job spec (TOML); without one, the model's last spec.
    #[serde(default)]
    spec: Option<String>,
    #[serde(default)]
    datasets: Vec<String>,
}

/// `POST /v1/retrain`.
pub async fn start_job(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    axum::Json(req): axum::Json<StartRequest>,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let p = plane.clone();
    let job = tokio::task::spawn_blocking(move || {
        let spec = match &req.spec {
            Some(text) => crate::jobs::trainers::operator_spec(text, &p.trainers)
                .map_err(ApiError::unprocessable)?,
            None => p.jobs.spec(&req.model)?.ok_or_else(|| {
                ApiError::unprocessable(format!(
                    "no job spec for `{}` yet: give one (fleetctl retrain start {} --spec FILE)",
                    req.model, req.model
                ))
            })?,
        };
        if spec.model != req.model {
            return Err(ApiError::unprocessable(format!(
                "the spec is for `{}`, not `{}`",
                spec.model, req.model
            )));
        }
        executor(&spec, &p.jobs).map_err(ApiError::unprocessable)?;
        spec.check_code().map_err(ApiError::unprocessable)?;
        for d in &req.datasets {
            crate::api::data::dataset(&p, d)?;
        }
        p.jobs.keep_spec(&spec)?;
        Ok(start(
            &p,
            spec,
            "train",
            req.datasets.clone(),
            format!("manual ({})", who.who()),
            None,
            None,
        )?)
    })
    .await
    .map_err(ApiError::internal)??;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::to_value(job).map_err(ApiError::internal)?),
    ))
}

pub async fn list_jobs(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    Ok(axum::Json(
        serde_json::to_value(plane.jobs.all()?).map_err(ApiError::internal)?,
    ))
}

fn job_of(plane: &Plane, id: &str) -> Api<Job> {
    plane.jobs.get(id)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no job `{id}` (fleetctl retrain list)"),
        )
    })
}

pub async fn show_job(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    Ok(axum::Json(
        serde_json::to_value(job_of(&plane, &id)?).map_err(ApiError::internal)?,
    ))
}

#[derive(Debug, Deserialize)]
pub struct LogQuery {
    #[serde(default)]
    trial: Option<usize>,
    /// Only the bytes from this offset on (`retrain logs --follow`).
    #[serde(default)]
    from: Option<u64>,
}

/// `GET /v1/retrain/{id}/logs?trial=N`: a trial's output (the best, or the first).
pub async fn job_logs(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<LogQuery>,
) -> Api<Response> {
    let job = job_of(&plane, &id)?;
    let n = q.trial.or(job.best).unwrap_or(0);
    let path = plane.jobs.trial_dir(&id, n).join("log");
    let mut text = std::fs::read(&path).unwrap_or_default();
    if let Some(from) = q.from {
        text = text.split_off((from as usize).min(text.len()));
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

pub async fn cancel_job(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    let job = job_of(&plane, &id)?;
    if job.state.is_final() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("job {id} already ended"),
        ));
    }
    plane
        .running
        .flag(&id)
        .store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(axum::Json(json!({ "job": id, "cancelling": true })))
}

/// `POST /v1/models/{name}/{version}/reproduce`: re-runs the recorded job.
pub async fn reproduce(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    UrlPath((name, version)): UrlPath<(String, u64)>,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let p = plane.clone();
    let job = tokio::task::spawn_blocking(move || {
        let record = p.registry.get(&name, version).map_err(ApiError::internal)?.ok_or_else(|| {
            ApiError(StatusCode::NOT_FOUND, format!("no {name} v{version} in the registry"))
        })?;
        let origin = record.tags.get("job").cloned().ok_or_else(|| {
            ApiError::unprocessable(format!(
                "{name}@v{version} was not trained by a control-plane job (no `job` tag): there is no recorded job to re-run"
            ))
        })?;
        let original = job_of(&p, &origin)?;
        let training = original.training_dataset.clone().ok_or_else(|| {
            ApiError::unprocessable(format!("job {origin} recorded no training dataset"))
        })?;
        let kept = p.datasets.available(&training).map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("dataset {training} cannot be read now ({e}); try again"),
            )
        })?;
        if p.datasets.get(&training)?.is_none() || !kept {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "cannot reproduce {name}@v{version}: its training dataset {training} is no longer available (deleted)"
                ),
            ));
        }
        original.spec.check_code().map_err(|e| {
            ApiError(StatusCode::CONFLICT, format!("cannot reproduce {name}@v{version}: {e}"))
        })?;
        // A reproduction runs what the job ran, and only while an admin still allows it:
        // its trainer registered with the same command, image, executor and environment
        // (a `job` tag is an operator's to set, so it must not reach a removed trainer or
        // a command from before trainers).
        let mut now = original.spec.clone();
        p.trainers.resolve(&mut now).map_err(|e| {
            ApiError(StatusCode::CONFLICT, format!("cannot reproduce {name}@v{version}: {e}"))
        })?;
        let same = |s: &crate::jobs::JobSpec| {
            (s.command.clone(), s.image.clone(), s.executor.clone(), s.env.clone(), s.code_dir.clone())
        };
        if same(&now) != same(&original.spec) {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "cannot reproduce {name}@v{version}: trainer `{}` no longer runs what job {origin} ran (an admin changed it)",
                    original.spec.trainer.as_deref().unwrap_or("?")
                ),
            ));
        }
        let trial = record
            .tags
            .get("trial")
            .and_then(|t| t.parse::<usize>().ok())
            .unwrap_or(0);
        let mut spec = original.spec.clone();
        // The very trial that won, nothing else.
        spec.params = original.spec.trials().get(trial).cloned().unwrap_or_default();
        spec.grid.clear();
        spec.captures = None;
        spec.datasets.clear();
        let job = start(
            &p,
            spec,
            "reproduce",
            original.inputs.clone(),
            format!("reproduction of {name}@v{version} ({})", who.who()),
            Some((name.clone(), version)),
            Some(training),
        )?;
        Ok::<_, ApiError>(job)
    })
    .await
    .map_err(ApiError::internal)??;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::to_value(job).map_err(ApiError::internal)?),
    ))
}
