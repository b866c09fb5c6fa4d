//! `fleetctl alerts …`: the notifier's alerts, rules and receivers, a test notification,
//! and silences. The notifier itself runs in `alerts`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{Api, blocking};
use crate::auth::Principal;
use crate::plane::Plane;

/// `GET /v1/alerts`.
pub async fn list(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    blocking(move || Ok(axum::Json(crate::alerts::list(&plane)?))).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    #[serde(default)]
    receiver: Option<String>,
}

/// `POST /v1/alerts/test` `{receiver?}`.
pub async fn test(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    axum::Json(req): axum::Json<TestRequest>,
) -> Api<axum::Json<Value>> {
    Ok(axum::Json(
        crate::alerts::test(&plane, req.receiver.as_deref(), &who.who()).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilenceRequest {
    matchers: BTreeMap<String, String>,
    duration_s: u64,
    #[serde(default)]
    comment: String,
}

/// `POST /v1/alerts/silences` `{matchers, duration_s, comment?}`.
pub async fn silence(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    axum::Json(req): axum::Json<SilenceRequest>,
) -> Api<(StatusCode, axum::Json<Value>)> {
    blocking(move || {
        let s = crate::alerts::silence(
            &plane,
            req.matchers,
            req.duration_s.saturating_mul(1000),
            req.comment.chars().take(500).collect(),
            who.who(),
        )?;
        Ok((StatusCode::CREATED, axum::Json(json!(s))))
    })
    .await
}

/// `GET /v1/alerts/silences`: those that have not ended.
pub async fn silences(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    blocking(move || {
        Ok(axum::Json(
            json!({ "silences": crate::alerts::silences(&plane)? }),
        ))
    })
    .await
}

/// `DELETE /v1/alerts/silences/{id}`.
pub async fn expire(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    blocking(move || {
        crate::alerts::expire(&plane, &id)?;
        Ok(axum::Json(json!({ "expired": id })))
    })
    .await
}
