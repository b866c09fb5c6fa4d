//! `fleetctl models policy …` and `fleetctl models compare`: a model's retraining policy,
//! and champion/challenger comparisons. The policy engine runs in `policy`.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{Api, ApiError, blocking};
use crate::plane::Plane;
use crate::policy::{Policy, compare};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareRequest {
    a: String,
    b: String,
    dataset: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    margin: Option<f64>,
}

fn parse_spec(s: &str) -> Result<(String, u64), ApiError> {
    crate::registry::parse_model_version(s).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))
}

/// `POST /v1/compare` `{a, b, dataset, label?, margin?}`.
pub async fn compare_handler(
    State(plane): State<Arc<Plane>>,
    axum::Json(req): axum::Json<CompareRequest>,
) -> Api<axum::Json<Value>> {
    let p = plane.clone();
    blocking(move || {
        let (a, b) = (parse_spec(&req.a)?, parse_spec(&req.b)?);
        let compared = compare(
            &p,
            (&a.0, a.1),
            (&b.0, b.1),
            &req.dataset,
            req.label.as_deref(),
            req.margin.unwrap_or(0.0),
        )?;
        Ok(axum::Json(compared))
    })
    .await
}

/// `PUT /v1/models/{name}/policy`.
pub async fn put_policy(
    State(plane): State<Arc<Plane>>,
    UrlPath(name): UrlPath<String>,
    axum::Json(mut policy): axum::Json<Policy>,
) -> Api<axum::Json<Value>> {
    policy.model = name.clone();
    if let Some(text) = policy.spec.take() {
        let spec = crate::jobs::trainers::operator_spec(&text, &plane.trainers)
            .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e))?;
        if spec.model != name {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the job spec is for `{}`, not `{name}`", spec.model),
            ));
        }
        plane.jobs.keep_spec(&spec)?;
    }
    if !(0.0..=1.0).contains(&policy.drift_share) || policy.drift_share == 0.0 {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "drift_share must be in (0, 1]".into(),
        ));
    }
    if policy.auto_promote && policy.holdout.is_none() {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "auto_promote needs a holdout dataset to compare on".into(),
        ));
    }
    for d in policy.datasets.iter().chain(&policy.holdout) {
        crate::api::data::dataset(&plane, d)?;
    }
    if plane.jobs.spec(&name)?.is_none() {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "`{name}` has no job spec yet: run `fleetctl retrain start {name} --spec FILE` once, or the policy could never retrain"
            ),
        ));
    }
    let state = plane
        .policies
        .policy(&name)?
        .map(|(_, s)| s)
        .unwrap_or_default();
    plane.policies.put_policy(&policy, &state)?;
    Ok(axum::Json(json!({ "policy": policy, "state": state })))
}

/// `GET /v1/models/{name}/policy`.
pub async fn get_policy(
    State(plane): State<Arc<Plane>>,
    UrlPath(name): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    let (policy, state) = plane.policies.policy(&name)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("`{name}` has no retraining policy"),
        )
    })?;
    Ok(axum::Json(json!({ "policy": policy, "state": state })))
}
