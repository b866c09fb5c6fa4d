//! API handlers for datasets: import (CSV, JSON lines, Parquet), from captured data,
//! list, show, download, delete, profile.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{Api, ApiError, blocking};
use crate::auth::Principal;
use crate::datasets::{DatasetManifest, Provenance, Table};
use crate::plane::{Plane, now_ms};

fn created(new: bool, m: DatasetManifest) -> (StatusCode, axum::Json<Value>) {
    (
        if new {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        axum::Json(json!({ "created": new, "dataset": m })),
    )
}

/// The dataset `id` (or a unique prefix of at least 8 hex digits), or 404.
pub(crate) fn dataset(plane: &Plane, id: &str) -> Api<DatasetManifest> {
    Ok(plane.datasets.resolve(id)?)
}

#[derive(Debug, Deserialize)]
pub struct ImportQuery {
    format: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    source: Option<String>,
    /// Comma-separated columns: rows missing any of them are dropped.
    #[serde(default)]
    drop_na: Option<String>,
}

/// `POST /v1/datasets?format=csv|jsonl|parquet&name=&source=&drop_na=a,b`.
pub async fn import(
    State(plane): State<Arc<Plane>>,
    Query(q): Query<ImportQuery>,
    body: axum::body::Bytes,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let p = plane.clone();
    blocking(move || {
        let table = match q.format.as_str() {
            "csv" => Table::from_csv(&body),
            "jsonl" | "ndjson" => Table::from_jsonl(&body),
            "parquet" => Table::from_parquet(body.to_vec()),
            other => {
                return Err(ApiError::unprocessable(format!(
                    "format `{other}` is not csv, jsonl or parquet"
                )));
            }
        }
        .map_err(|e| ApiError::unprocessable(format!("{} input: {e}", q.format)))?;
        let drop: Vec<String> = q
            .drop_na
            .as_deref()
            .map(|d| {
                d.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let mut filters = Vec::new();
        let table = if drop.is_empty() {
            table
        } else {
            filters.push(format!("drop_na({})", drop.join(",")));
            table.drop_na(&drop).map_err(ApiError::unprocessable)?
        };
        let source = q.source.unwrap_or_else(|| format!("upload ({})", q.format));
        let (new, m) = p
            .datasets
            .put(
                &table,
                Provenance {
                    name: q.name.unwrap_or_else(|| source.clone()),
                    sources: vec![source],
                    filters,
                    ..Default::default()
                },
                now_ms(),
            )
            .map_err(ApiError::unprocessable)?;
        Ok(created(new, m))
    })
    .await
}

/// `POST /v1/datasets/from-captures`.
pub async fn from_captures(
    State(plane): State<Arc<Plane>>,
    axum::Json(req): axum::Json<crate::captures::FromCaptures>,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let p = plane.clone();
    blocking(move || {
        let (table, provenance) = p.captures.table(&req)?;
        let (new, m) = p
            .datasets
            .put(&table, provenance, now_ms())
            .map_err(ApiError::unprocessable)?;
        Ok(created(new, m))
    })
    .await
}

pub async fn list(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    Ok(axum::Json(
        serde_json::to_value(plane.datasets.list()?).map_err(ApiError::internal)?,
    ))
}

/// A dataset file that could not be read: 410 when it is gone, 503 when the store
/// keeping it (object storage) does not answer.
fn file_error(id: &str, e: std::io::Error) -> ApiError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ApiError(
            StatusCode::GONE,
            format!("dataset {id} is not available: {e}"),
        )
    } else {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("dataset {id} cannot be read now ({e}); try again"),
        )
    }
}

pub async fn show(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    let m = dataset(&plane, &id)?;
    let (p, id) = (plane.clone(), m.id.clone());
    // Object storage answers over the network.
    let available =
        blocking(move || p.datasets.available(&id).map_err(|e| file_error(&id, e))).await?;
    let mut v = serde_json::to_value(m).map_err(ApiError::internal)?;
    v["available"] = json!(available);
    Ok(axum::Json(v))
}

#[derive(Debug, Deserialize)]
pub struct DataQuery {
    #[serde(default)]
    format: Option<String>,
}

/// `GET /v1/datasets/{id}/data?format=parquet|csv`.
pub async fn data(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<DataQuery>,
) -> Api<Response> {
    let m = dataset(&plane, &id)?;
    let p = plane.clone();
    blocking(move || match q.format.as_deref().unwrap_or("parquet") {
        "parquet" => {
            let bytes = p
                .datasets
                .local(&m.id)
                .and_then(std::fs::read)
                .map_err(|e| file_error(&m.id, e))?;
            Ok((
                [(header::CONTENT_TYPE, "application/vnd.apache.parquet")],
                bytes,
            )
                .into_response())
        }
        "csv" => {
            let table = p
                .datasets
                .load(&m.id)
                .map_err(|e| ApiError(StatusCode::GONE, e))?;
            Ok(([(header::CONTENT_TYPE, "text/csv")], table.to_csv()).into_response())
        }
        other => Err(ApiError::unprocessable(format!(
            "format `{other}` is not parquet or csv"
        ))),
    })
    .await
}

pub async fn delete(
    State(plane): State<Arc<Plane>>,
    Extension(_who): Extension<Principal>,
    UrlPath(id): UrlPath<String>,
) -> Api<StatusCode> {
    let m = dataset(&plane, &id)?;
    plane.datasets.delete(&m.id)?;
    tracing::warn!(dataset = %m.id, "dataset deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub struct ProfileQuery {
    #[serde(default)]
    target: Option<String>,
    /// NAME@VERSION of a bundle in the registry whose reference profile is the baseline.
    #[serde(default)]
    reference: Option<String>,
}

/// `GET /v1/datasets/{id}/profile?target=COL&reference=NAME@VERSION`.
pub async fn profile(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<ProfileQuery>,
) -> Api<axum::Json<Value>> {
    let m = dataset(&plane, &id)?;
    let p = plane.clone();
    blocking(move || {
        let table = p
            .datasets
            .load(&m.id)
            .map_err(|e| ApiError(StatusCode::GONE, e))?;
        let reference = match &q.reference {
            Some(r) => Some(crate::api::models::reference_profile(&p, r)?),
            None => None,
        };
        let mut v = crate::profile::profile(&table, q.target.as_deref(), reference.as_ref())
            .map_err(ApiError::unprocessable)?;
        v["dataset"] = json!(m.id);
        v["reference"] = json!(q.reference);
        Ok(axum::Json(v))
    })
    .await
}
