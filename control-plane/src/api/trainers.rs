//! Trainers: the commands training jobs may run. Listing is for viewers; registering and
//! removing one is an admin's (an operator's job spec only names one).

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::jobs::trainers::Trainer;
use crate::plane::Plane;

use super::{Api, ApiError};

/// `GET /v1/trainers` (viewers): what runs; of `env` only the names (its values are
/// settings, but an admin may not expect a viewer to read them).
pub(crate) async fn list(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    let mut all = plane.trainers.list();
    for t in all.values_mut() {
        for v in t.env.values_mut() {
            *v = "…".into();
        }
    }
    Ok(axum::Json(
        serde_json::to_value(all).map_err(ApiError::internal)?,
    ))
}

/// `PUT /v1/trainers/{name}` (body: the trainer, TOML).
pub(crate) async fn put(
    State(plane): State<Arc<Plane>>,
    UrlPath(name): UrlPath<String>,
    text: String,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let trainer = Trainer::from_toml(&text).map_err(ApiError::unprocessable)?;
    let replaced = plane.trainers.get(&name).is_some();
    plane
        .trainers
        .put(&name, trainer)
        .map_err(|e| ApiError::unprocessable(format!("{e:#}")))?;
    tracing::info!(trainer = %name, replaced, "trainer registered");
    let status = if replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        axum::Json(json!({ "trainer": name, "replaced": replaced })),
    ))
}

/// `DELETE /v1/trainers/{name}`.
pub(crate) async fn remove(
    State(plane): State<Arc<Plane>>,
    UrlPath(name): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    if !plane.trainers.remove(&name).map_err(ApiError::internal)? {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no trainer `{}`", name.chars().take(80).collect::<String>()),
        ));
    }
    tracing::info!(trainer = %name, "trainer removed");
    Ok(axum::Json(json!({ "removed": name })))
}
