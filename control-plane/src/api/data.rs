//! API handlers for datasets: import (CSV, JSON lines, Parquet), from captured data,
//! list, show, download, delete, profile.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{Api, ApiError};
use crate::auth::Principal;
use crate::datasets::{DatasetManifest, Provenance, Table};
use crate::plane::{Plane, now_ms};

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Api<T> + Send + 'static) -> Api<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

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
    let found = match plane.datasets.get(id)? {
        Some(m) => Some(m),
        None => plane.datasets.find(id)?,
    };
    found.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no dataset `{id}` (fleetctl data list)"),
        )
    })
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromCaptures {
    model: String,
    /// Only rows captured at or after this time.
    #[serde(default)]
    since_ms: Option<u64>,
    /// Only rows that got a ground-truth label.
    #[serde(default)]
    labelled_only: bool,
    /// Name of the label column (default `label`): the training target.
    #[serde(default)]
    label_column: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

impl FromCaptures {
    pub fn new(
        model: &str,
        since_ms: Option<u64>,
        labelled_only: bool,
        label_column: Option<String>,
    ) -> FromCaptures {
        FromCaptures {
            model: model.into(),
            since_ms,
            labelled_only,
            label_column,
            name: None,
        }
    }
}

/// Rows of captured batches as flat records: the captured features, `predicted` (the
/// class index or score), the label, `device` and `ts_ms`.
pub(crate) fn captured_table(plane: &Plane, req: &FromCaptures) -> Api<(Table, Provenance)> {
    let label = req.label_column.clone().unwrap_or_else(|| "label".into());
    let mut objects = Vec::new();
    let mut devices = std::collections::BTreeSet::new();
    let (mut first, mut last) = (u64::MAX, 0u64);
    let mut batches = 0;
    for r in plane.captures.list(Some(&req.model), None)? {
        if req.labelled_only && r.kind != "labelled" {
            continue;
        }
        if req.since_ms.is_some_and(|s| r.last_ts_ms < s) {
            continue;
        }
        let text = std::fs::read_to_string(plane.captures.path(&r)).map_err(ApiError::internal)?;
        batches += 1;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).map_err(ApiError::internal)?;
            let ts = v["ts_ms"].as_u64().unwrap_or(0);
            if req.since_ms.is_some_and(|s| ts < s) {
                continue;
            }
            if req.labelled_only && v.get("label").is_none_or(Value::is_null) {
                continue;
            }
            let mut o = v["features"].as_object().cloned().unwrap_or_default();
            let prediction: Vec<f64> = v["prediction"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            let predicted = if prediction.len() > 1 {
                prediction
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i as f64)
            } else {
                prediction.first().copied()
            };
            o.insert("predicted".into(), json!(predicted));
            o.insert(
                label.clone(),
                v.get("label").cloned().unwrap_or(Value::Null),
            );
            o.insert("device".into(), json!(r.device));
            o.insert("ts_ms".into(), json!(ts));
            devices.insert(r.device.as_str().to_string());
            first = first.min(ts);
            last = last.max(ts);
            objects.push(o);
        }
    }
    if objects.is_empty() {
        return Err(ApiError::unprocessable(format!(
            "no captured rows of `{}` match (labelled only: {}, since: {:?}); enable [[capture]] on the devices",
            req.model, req.labelled_only, req.since_ms
        )));
    }
    let table = Table::from_objects(&objects).map_err(ApiError::unprocessable)?;
    let mut filters = Vec::new();
    if req.labelled_only {
        filters.push("labelled_only".into());
    }
    if let Some(s) = req.since_ms {
        filters.push(format!("since_ms({s})"));
    }
    Ok((
        table,
        Provenance {
            name: req
                .name
                .clone()
                .unwrap_or_else(|| format!("captures of {}", req.model)),
            sources: vec![format!("captures: {} ({batches} batches)", req.model)],
            devices: devices.into_iter().collect(),
            time_range: Some((first, last)),
            filters,
        },
    ))
}

/// `POST /v1/datasets/from-captures`.
pub async fn from_captures(
    State(plane): State<Arc<Plane>>,
    axum::Json(req): axum::Json<FromCaptures>,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let p = plane.clone();
    blocking(move || {
        let (table, provenance) = captured_table(&p, &req)?;
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

pub async fn show(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    let m = dataset(&plane, &id)?;
    let available = plane.datasets.path(&m.id).is_file();
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
            let bytes = std::fs::read(p.datasets.path(&m.id)).map_err(|e| {
                ApiError(
                    StatusCode::GONE,
                    format!("dataset {} is not available: {e}", m.id),
                )
            })?;
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
