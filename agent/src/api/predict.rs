//! `POST /v1/models/{name}/predict`: reading the body (JSON, CBOR or raw tensor bytes)
//! within its limit, admission to the bounded worker pool, running the backend, watching
//! the prediction, and answering in the caller's encoding.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetml_monitor::MissReason;
use fleetml_protocol::golden::Tensor;
use serde_json::{Value, json};

use super::encode::{encode_features, rows_of};
use super::{Api, ApiError, INLINE_ROWS, Served, error_response, respond};
use crate::explain;

pub(super) async fn predict(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let format = format_of(&headers);
    let cbor = format != Format::Json;
    match predict_inner(&api, &name, format, &headers, body).await {
        Ok(Reply::Value(v)) => respond(cbor, StatusCode::OK, &v),
        Ok(Reply::Raw(r)) => r,
        Err(e) => {
            // Every input that got no prediction is counted, by reason.
            let reason = match e.reason {
                "invalid_input" => Some(MissReason::InvalidInput),
                "shed_overload" => Some(MissReason::Shed),
                "backend_error" => Some(MissReason::BackendError),
                "backend_panic" => Some(MissReason::BackendPanic),
                "timeout" => Some(MissReason::Timeout),
                _ => None,
            };
            if let (Some(reason), Some(monitor)) =
                (reason, api.get(&name).and_then(|m| m.monitor.clone()))
            {
                monitor.missed(crate::clock::now_ms(), reason, e.rows.max(1));
                if let Some((feature, value)) = &e.rejected {
                    monitor.rejected(feature, *value);
                }
            }
            error_response(cbor, &e, api.metric_label(&name))
        }
    }
}

/// How a request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Cbor,
    Binary,
}

fn format_of(headers: &HeaderMap) -> Format {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.starts_with("application/cbor") {
        Format::Cbor
    } else if ct.starts_with("application/octet-stream") {
        Format::Binary
    } else {
        Format::Json
    }
}

/// Whether the caller asked for the single output as raw bytes.
fn wants_binary(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.starts_with("application/octet-stream"))
}

/// A decoded request: its fields, and the raw tensors when they were decoded already
/// (CBOR, binary).
struct Request {
    fields: serde_json::Map<String, Value>,
    tensors: Option<Vec<Tensor>>,
}

/// The most a body for `model` may take: the configured limit, raised to fit one row
/// of the model's declared inputs as JSON unless the operator set the limit.
fn body_limit(api: &Api, model: &Served) -> usize {
    if api.limits.fit_body_to_model {
        api.limits
            .max_body
            .max(crate::wire::json_bytes_for(&model.inputs))
    } else {
        api.limits.max_body
    }
}

/// Reads a JSON, CBOR or binary body of at most the model's body limit.
async fn read_body(
    api: &Api,
    model: &Served,
    format: Format,
    headers: &HeaderMap,
    body: Body,
) -> Result<Request, ApiError> {
    let limit = body_limit(api, model);
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_input",
            format!(
                "request body is larger than {limit} bytes (raise `max_body_bytes`, or send tensors as CBOR bytes or application/octet-stream)"
            ),
        )
    })?;
    let bad = |what: &str, e: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            format!("body is not valid {what}: {e}"),
        )
    };
    let wire = |e: crate::wire::WireError| ApiError::invalid(e.field, e.error);
    match format {
        Format::Json => match serde_json::from_slice(&bytes) {
            Ok(Value::Object(fields)) => Ok(Request {
                fields,
                tensors: None,
            }),
            Ok(_) => Err(bad("a request", "the body must be an object".into())),
            Err(e) => Err(bad("JSON", e.to_string())),
        },
        Format::Cbor => {
            let value: serde_cbor::Value =
                serde_cbor::from_slice(&bytes).map_err(|e| bad("CBOR", e.to_string()))?;
            let serde_cbor::Value::Map(mut map) = value else {
                return Err(bad("a request", "the body must be a map".into()));
            };
            let tensors = map
                .remove(&serde_cbor::Value::Text("inputs".into()))
                .map(|inputs| crate::wire::from_cbor(&model.inputs, &inputs))
                .transpose()
                .map_err(wire)?;
            let fields = match serde_json::to_value(serde_cbor::Value::Map(map)) {
                Ok(Value::Object(fields)) => fields,
                _ => {
                    return Err(bad(
                        "a request",
                        "fields other than `inputs` must be text, numbers or lists".into(),
                    ));
                }
            };
            Ok(Request { fields, tensors })
        }
        Format::Binary => {
            let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
            let tensors = crate::wire::from_binary(
                &model.inputs,
                header(crate::wire::INPUT_HEADER),
                header(crate::wire::SHAPE_HEADER),
                header(crate::wire::DTYPE_HEADER),
                &bytes,
            )
            .map_err(wire)?;
            let mut fields = serde_json::Map::new();
            if let Some(id) = header("x-fleetml-id") {
                fields.insert("id".into(), Value::String(id.to_string()));
            }
            if let Some(ts) = header("x-fleetml-timestamp") {
                let ts: f64 = ts.trim().parse().map_err(|_| {
                    ApiError::invalid("x-fleetml-timestamp", "must be seconds since the epoch")
                })?;
                fields.insert("timestamp".into(), json!(ts));
            }
            Ok(Request {
                fields,
                tensors: Some(tensors),
            })
        }
    }
}

/// A prediction's answer: a JSON value (sent as JSON or CBOR), or a response already
/// encoded (CBOR with byte strings, raw bytes).
enum Reply {
    Value(Value),
    Raw(Response),
}

async fn predict_inner(
    api: &Api,
    name: &str,
    format: Format,
    headers: &HeaderMap,
    body: Body,
) -> Result<Reply, ApiError> {
    let started = Instant::now();
    api.since_trim.fetch_add(1, Ordering::Relaxed);
    let model = api.model(name, started + api.limits.timeout).await?;
    let Request {
        fields: request,
        tensors,
    } = read_body(api, &model, format, headers, body).await?;
    let raw_tensors = tensors.is_some() || request.contains_key("inputs");
    for key in request.keys() {
        if !matches!(
            key.as_str(),
            "features" | "inputs" | "timestamp" | "id" | "ids" | "explain"
        ) {
            return Err(ApiError::invalid(
                key.clone(),
                format!(
                    "unknown field `{key}` (expected `features` or `inputs`, and optionally `timestamp`, `id`/`ids`, `explain`)"
                ),
            ));
        }
    }
    let ids: Vec<String> = match (request.get("id"), request.get("ids")) {
        (None, None) => Vec::new(),
        (Some(Value::String(id)), None) => vec![id.clone()],
        (None, Some(Value::Array(ids))) => ids
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("ids", "`ids` must be a list of strings"))?,
        (Some(_), None) => return Err(ApiError::invalid("id", "`id` must be a string")),
        (None, Some(_)) => return Err(ApiError::invalid("ids", "`ids` must be a list of strings")),
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "ids",
                "give `id` (one row) or `ids` (a batch), not both",
            ));
        }
    };
    let explain = match request.get("explain") {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "explain",
                "`explain` must be true or false",
            ));
        }
    };
    let timestamp = match request.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_f64(),
        Some(_) => {
            return Err(ApiError::invalid(
                "timestamp",
                "`timestamp` must be seconds since the Unix epoch",
            ));
        }
    };
    let (inputs, rows, raw_rows) = match (request.get("features"), request.get("inputs"), tensors) {
        (Some(f), None, None) => {
            let rows = f.as_array().map_or(1, Vec::len);
            encode_features(&model, f, api.limits.max_rows).map_err(|e| e.rows(rows))?
        }
        (None, Some(i), None) => {
            let inputs = crate::wire::from_json(&model.inputs, i)
                .map_err(|e| ApiError::invalid(e.field, e.error))?;
            let rows = rows_of(&inputs);
            (inputs, rows, Vec::new())
        }
        (None, None, Some(inputs)) => {
            let rows = rows_of(&inputs);
            (inputs, rows, Vec::new())
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "give exactly one of `features` or `inputs`",
            ));
        }
    };

    if !ids.is_empty() && ids.len() != rows {
        return Err(
            ApiError::invalid("ids", format!("{} ids for {rows} rows", ids.len())).rows(rows),
        );
    }
    if explain && raw_rows.is_empty() {
        return Err(ApiError::invalid(
            "explain",
            "explanations attribute named features; send `features`",
        )
        .rows(rows));
    }
    let Ok(_admitted) = api.admitted.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shed_overload",
            "the agent is at capacity; retry shortly",
        )
        .rows(rows));
    };
    // A batched request waits in its model's batch queue, not for a worker.
    let batcher = model.batcher.clone().filter(|_| !explain);
    let _running = match batcher {
        Some(_) => None,
        None => Some(api.running.clone().acquire_owned().await.map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shed_overload",
                "the agent is shutting down",
            )
            .rows(rows)
        })?),
    };
    // Whether this request also runs in shadow is decided now, while its inputs can
    // still be copied; the shadow runs after the answer is made, off this request's path.
    let shadow_job = model.shadow.as_ref().and_then(|shadow| {
        let busy = api.running.available_permits() == 0;
        shadow
            .admit(busy)
            .map(|admitted| (shadow.clone(), admitted, inputs.clone()))
    });
    let (inputs, inputs_for_batch) = if batcher.is_some() {
        (Vec::new(), inputs)
    } else {
        (inputs, Vec::new())
    };
    let backend = model.backend.clone();
    let explainer = explain.then(|| {
        (
            model.schema.clone(),
            model.inputs.clone(),
            raw_rows.clone(),
            model.monitor.clone(),
        )
    });
    let job = move || {
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            let outputs = backend.run(&inputs)?;
            let attributions = match explainer {
                Some((schema, specs, rows, Some(monitor))) => Some(explain::occlusion(
                    backend.as_ref(),
                    &schema,
                    &specs,
                    &rows,
                    &outputs,
                    monitor.baselines(),
                )?),
                _ => None,
            };
            Ok::<_, crate::runtime::RuntimeError>((outputs, attributions))
        }))
    };
    // A model that answers in microseconds runs right here: handing it to the blocking
    // pool and back costs two thread wake-ups, which the profile showed to be most of
    // the API's overhead on a small device. Anything slower (or explained) goes to the
    // pool, under the timeout.
    let timeout = || {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "the prediction took longer than {} ms",
                api.limits.timeout.as_millis()
            ),
        )
        .rows(rows)
    };
    let outputs = if let Some(batcher) = batcher {
        drop(job);
        match tokio::time::timeout(api.limits.timeout, batcher.submit(inputs_for_batch, rows)).await
        {
            Err(_) => return Err(timeout()),
            Ok(Err(crate::batcher::Full)) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shed_overload",
                    "the model's batch queue is full; retry shortly",
                )
                .rows(rows));
            }
            Ok(Ok(Ok(out))) => Ok(Ok((out, None))),
            Ok(Ok(Err(e))) => Ok(Err(crate::runtime::RuntimeError::Run(e))),
        }
    } else if model.inline && !explain && rows <= INLINE_ROWS {
        job()
    } else {
        let work = tokio::task::spawn_blocking(job);
        tokio::time::timeout(api.limits.timeout, work)
            .await
            .map_err(|_| timeout())?
            .map_err(|_| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "backend_panic",
                    "the backend worker failed",
                )
                .rows(rows)
            })?
    };
    let (outputs, attributions) = match outputs {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "backend_error",
                e.to_string(),
            )
            .rows(rows));
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "backend_panic",
                "the backend panicked on this input; the prediction was not made",
            )
            .rows(rows));
        }
    };
    // Whole tensors go back as bytes to binary callers; everyone else gets rows.
    let binary_reply = raw_tensors && format != Format::Json;
    let predictions: Vec<Value> = (0..if binary_reply { 0 } else { rows })
        .map(|r| {
            let mut row = serde_json::Map::new();
            for t in &outputs {
                let per_row = t.data.len() / rows.max(1);
                row.insert(
                    t.name.clone(),
                    crate::wire::json_values(&t.data, r * per_row..(r + 1) * per_row),
                );
            }
            if let Some(a) = attributions.as_ref().and_then(|a| a.get(r)) {
                let explanation: serde_json::Map<String, Value> = model
                    .schema
                    .features
                    .iter()
                    .zip(a)
                    .map(|(f, v)| (f.name.clone(), json!(v)))
                    .collect();
                row.insert("explanation".into(), Value::Object(explanation));
            }
            Value::Object(row)
        })
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    let lag_seconds = timestamp.map(|ts| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        now - ts
    });
    #[cfg(feature = "capture")]
    let captured = api.capture.get().is_some();
    #[cfg(not(feature = "capture"))]
    let captured = false;
    let first: Vec<Vec<f32>> = if model.monitor.is_some() || captured || shadow_job.is_some() {
        outputs
            .first()
            .map(|t| {
                let per_row = t.data.len() / rows.max(1);
                t.data
                    .to_f32()
                    .chunks(per_row.max(1))
                    .map(<[f32]>::to_vec)
                    .collect()
            })
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    if let Some(monitor) = &model.monitor {
        monitor.predicted(
            crate::clock::now_ms(),
            &raw_rows,
            &first,
            (elapsed * 1e6) as u64,
            lag_seconds.map(|s| (s.max(0.0) * 1000.0) as u64),
            &ids,
        );
        if let Some(a) = &attributions {
            for row in a {
                monitor.explained(row);
            }
        }
    }
    if let Some((shadow, admitted, inputs)) = shadow_job {
        shadow.run(admitted, inputs, first.clone(), raw_rows.clone());
    }
    let labels = [
        ("model", model.name.clone()),
        ("backend", model.backend.kind().as_str().to_string()),
    ];
    metrics::counter!("fleetml_agent_predictions_total", &labels).increment(rows as u64);
    metrics::histogram!("fleetml_agent_predict_seconds", &labels).record(elapsed);
    let request_id = api.next_id.fetch_add(1, Ordering::Relaxed);
    let mut response = json!({
        "request_id": format!("{request_id:016x}"),
        "model": model.name,
        "version": model.version,
        "backend": model.backend.kind().as_str(),
        "predictions": predictions,
    });
    if let Some(lag) = lag_seconds {
        response["lag_seconds"] = json!(lag);
    }
    if explain {
        response["explanation_method"] = json!(explain::METHOD);
    }
    #[cfg(feature = "capture")]
    if let Some(capture) = api.capture.get() {
        let names: Vec<String> = model
            .schema
            .features
            .iter()
            .map(|f| f.name.clone())
            .collect();
        // A one-row request without an id is labelled by its request id.
        let ids = if ids.is_empty() && rows == 1 {
            vec![format!("{request_id:016x}")]
        } else {
            ids.clone()
        };
        capture.offer(
            &model.name,
            model.version,
            model.monitor.as_ref().and_then(|m| m.prediction_kind()),
            &names,
            &raw_rows,
            &first,
            &ids,
        );
    }
    #[cfg(feature = "sinks")]
    if let Some(sinks) = api.sinks.get().filter(|s| !s.is_empty()) {
        sinks.offer(&crate::sinks::Record {
            request_id: &format!("{request_id:016x}"),
            model: &model.name,
            version: model.version,
            ids: &ids,
            predictions: &response["predictions"],
            inputs: &raw_rows,
        });
    }
    if binary_reply {
        if wants_binary(headers) {
            let [only] = outputs.as_slice() else {
                return Err(ApiError::invalid(
                    "accept",
                    format!(
                        "the model has {} outputs; a raw body carries one (accept application/cbor instead)",
                        outputs.len()
                    ),
                ));
            };
            let shape: Vec<String> = only.shape.iter().map(ToString::to_string).collect();
            return Ok(Reply::Raw(
                (
                    StatusCode::OK,
                    [
                        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                        (
                            header::HeaderName::from_static(crate::wire::SHAPE_HEADER),
                            shape.join(","),
                        ),
                        (
                            header::HeaderName::from_static(crate::wire::DTYPE_HEADER),
                            only.dtype().to_string(),
                        ),
                        (
                            header::HeaderName::from_static(crate::wire::INPUT_HEADER),
                            only.name.clone(),
                        ),
                    ],
                    only.data.to_le_bytes(),
                )
                    .into_response(),
            ));
        }
        let mut map = match serde_cbor::value::to_value(&response) {
            Ok(serde_cbor::Value::Map(m)) => m,
            _ => std::collections::BTreeMap::new(),
        };
        map.remove(&serde_cbor::Value::Text("predictions".into()));
        map.insert(
            serde_cbor::Value::Text("outputs".into()),
            crate::wire::cbor_outputs(&outputs),
        );
        let body = serde_cbor::to_vec(&serde_cbor::Value::Map(map)).unwrap_or_default();
        return Ok(Reply::Raw(
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/cbor")],
                body,
            )
                .into_response(),
        ));
    }
    Ok(Reply::Value(response))
}
