//! API handlers for what devices fetch and upload: signed assignments, ranged bundle
//! downloads, captured data.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetml_protocol::crypto::Sha256;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::blocking;
use crate::api::devices::enrolled;
use crate::api::{Api, ApiError};
use crate::auth::Principal;
use crate::plane::{Plane, now_ms};

/// `GET /v1/devices/{id}/assignment`: the device's assignment, signed now (CBOR).
pub async fn device_assignment(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    UrlPath(id): UrlPath<String>,
) -> Api<Response> {
    let device = match &who {
        // `authorize` found this device enrolled and live for this very request: no
        // second lookup (a rollout to 10,000 devices is 10,000 of these at once).
        Principal::Device(caller) => {
            if caller.as_str() != id {
                return Err(ApiError(
                    StatusCode::FORBIDDEN,
                    format!("device `{caller}` may read only its own assignment"),
                ));
            }
            caller.clone()
        }
        Principal::Operator(_) => enrolled(&plane, &id)?.id,
    };
    let record = plane.assignments.assignment(&device)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("device `{id}` has no assignment yet (start a rollout that selects it)"),
        )
    })?;
    let signed = record.signed(
        &device,
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
        let named = plane.assignments.assignment(d)?.is_some_and(|r| {
            r.models.values().any(|m| {
                m.digest == digest || m.shadow.as_ref().is_some_and(|s| s.digest == digest)
            })
        });
        if !named {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("bundle {digest} is not in device `{d}`'s assignment"),
            ));
        }
    }
    let opened = match plane.registry.blob_path(&digest.to_string()) {
        Ok(path) => tokio::fs::File::open(&path).await,
        Err(e) => Err(e),
    };
    let mut file = match opened {
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
        // Training data comes only from what a device was given to run: a device cannot
        // feed rows into another model's datasets.
        let assigned = p
            .assignments
            .assignment(&d.id)?
            .is_some_and(|a| a.models.contains_key(&q.model));
        if !assigned {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "device `{}` is not assigned model `{}`: captures are taken only for the models a device is assigned (fleetctl rollout start)",
                    d.id, q.model
                ),
            ));
        }
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
                crate::captures::CaptureError::Quota { .. } => {
                    ApiError(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
                }
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
