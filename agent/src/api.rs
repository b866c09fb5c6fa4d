//! The local prediction API (axum), served on loopback TCP and on a Unix socket.
//!
//! - `POST /v1/models/{name}/predict` — body `{"features": {...}}` (one row) or
//!   `{"features": [{...}, ...]}` (a batch) of named raw features, validated against the
//!   bundle's feature schema; or `{"inputs": [{"name", "shape", "data"}]}` raw tensors of
//!   the model's element types (f32, f16, f64, i8, i32, i64, u8, bool), several inputs
//!   at once (see [`crate::wire`]).
//!   Optional `"timestamp"` (seconds since the epoch) of the event, for prediction lag;
//!   `"id"` (one row) or `"ids"` (a batch) naming the items, for reconciliation;
//!   `"explain": true` for per-feature attributions (occlusion, see [`explain`]).
//!   JSON, or CBOR with `Content-Type: application/cbor` (answered in CBOR), where a
//!   tensor's elements may be one little-endian byte string (`bytes`); or one input's raw
//!   little-endian elements as `application/octet-stream` with `x-fleetml-shape` (and
//!   optionally `x-fleetml-dtype`, `x-fleetml-input`, `x-fleetml-id`,
//!   `x-fleetml-timestamp`). Raw-tensor requests in CBOR or binary are answered with
//!   whole `outputs` (`{name, shape, dtype, bytes}`) instead of `predictions` rows, or,
//!   with `Accept: application/octet-stream`, the single output's bytes with the same
//!   headers. The default body limit grows to fit one row of the model's inputs.
//! - `POST /v1/expect` — `{"model", "ids": [...], "deadline": SECONDS_SINCE_EPOCH}` or
//!   `"within_seconds"`: ids that must be predicted by then; those that are not are
//!   reported missing (`expected_not_predicted`) with the first few ids.
//! - `GET /v1/models/{name}/monitoring[?limit=N]` — current alerts and the latest window
//!   reports (drift per feature and of the predictions, missing values and predictions,
//!   latency, lag, outages).
//! - `GET /v1/models`, `GET /healthz`, `GET /metrics` (Prometheus text).
//!
//! Every bad request gets a 4xx with `{"error": …, "field": …}`. Work runs on a bounded
//! pool: at most `workers` predictions run and `queue` wait; beyond that the answer is
//! 503 at once. A panic inside a backend becomes a 500 for that request only.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fleetml_protocol::features::{FeatureSchema, FeatureType, RawValue};
use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::{Dim, TensorSpec};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use fleetml_monitor::MissReason;

use crate::backend::Backend;
use crate::explain;
use crate::monitoring::ModelMonitor;

/// A model being served.
#[derive(Debug)]
pub struct Served {
    pub name: String,
    pub version: u64,
    pub schema: FeatureSchema,
    pub inputs: Vec<TensorSpec>,
    pub backend: Arc<dyn Backend>,
    pub fallbacks: Vec<String>,
    /// Drift and health monitoring, when the bundle has a reference profile.
    pub monitor: Option<Arc<ModelMonitor>>,
    /// One row runs in well under [`INLINE_BUDGET`]: small requests run on the async
    /// worker instead of the blocking pool.
    pub inline: bool,
    /// The dynamic batcher, when the model's requests are batched.
    pub batcher: Option<Arc<crate::batcher::Batcher>>,
    /// Resident memory the agent grew by while loading and self-testing this model.
    pub memory_bytes: u64,
}

/// A model whose single-row run takes less than this runs small requests inline.
pub const INLINE_BUDGET: std::time::Duration = std::time::Duration::from_micros(200);
/// Largest request (rows) run inline.
pub const INLINE_ROWS: usize = 16;

/// Whether `backend` answers one row of `inputs` (symbolic dimensions set to 1) within
/// [`INLINE_BUDGET`]: the fastest of five timed runs after a warm-up.
pub fn runs_inline(backend: &dyn Backend, inputs: &[TensorSpec]) -> bool {
    let tensors: Vec<Tensor> = inputs
        .iter()
        .map(|s| {
            let shape: Vec<u64> = s
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n,
                    Dim::Symbol(_) => 1,
                })
                .collect();
            let len = shape.iter().product::<u64>() as usize;
            Tensor {
                name: s.name.clone(),
                shape,
                data: fleetml_protocol::golden::TensorData::zeros(s.dtype, len)
                    .unwrap_or(fleetml_protocol::golden::TensorData::F32(vec![0.0; len])),
            }
        })
        .collect();
    let once = || {
        let start = Instant::now();
        std::panic::catch_unwind(AssertUnwindSafe(|| backend.run(&tensors)))
            .ok()
            .and_then(Result::ok)
            .map(|_| start.elapsed())
    };
    if once().is_none() {
        return false;
    }
    (0..5)
        .filter_map(|_| once())
        .min()
        .is_some_and(|d| d < INLINE_BUDGET)
}

/// Limits of the API.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Predictions running at once.
    pub workers: usize,
    /// Predictions waiting for a worker; beyond this, 503.
    pub queue: usize,
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Raise `max_body` per model to fit one row of its declared inputs as JSON (the
    /// default; off when the operator set the limit).
    pub fit_body_to_model: bool,
    /// Largest batch, rows.
    pub max_rows: usize,
    /// Longest a prediction may take before the request is answered 504 (the backend
    /// call finishes in the background, holding its worker).
    pub timeout: std::time::Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            workers: 2,
            queue: 64,
            max_body: 1 << 20,
            fit_body_to_model: true,
            max_rows: 1024,
            timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// Shared state of the API.
#[derive(Debug)]
pub struct Api {
    models: RwLock<BTreeMap<String, Arc<Served>>>,
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
    limits: ApiLimits,
    metrics: Option<PrometheusHandle>,
    next_id: AtomicU64,
    /// Where predictions are forwarded besides the caller (set once at start).
    #[cfg(feature = "sinks")]
    sinks: std::sync::OnceLock<crate::sinks::Sinks>,
    /// Capture and the recent predictions feedback refers to (set once at start).
    #[cfg(feature = "capture")]
    capture: std::sync::OnceLock<Arc<crate::capture::Capture>>,
    /// Models being loaded that serve nothing yet: their requests wait for them.
    loading: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Woken whenever a model finishes loading (or fails to).
    ready: tokio::sync::Notify,
    /// Predictions since memory was last handed back to the system.
    since_trim: AtomicU64,
}

impl Api {
    pub fn new(limits: ApiLimits, metrics: Option<PrometheusHandle>) -> Arc<Self> {
        Arc::new(Api {
            models: RwLock::new(BTreeMap::new()),
            admitted: Arc::new(Semaphore::new(limits.workers + limits.queue)),
            running: Arc::new(Semaphore::new(limits.workers.max(1))),
            limits,
            metrics,
            next_id: AtomicU64::new(1),
            #[cfg(feature = "sinks")]
            sinks: std::sync::OnceLock::new(),
            #[cfg(feature = "capture")]
            capture: std::sync::OnceLock::new(),
            loading: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            ready: tokio::sync::Notify::new(),
            since_trim: AtomicU64::new(0),
        })
    }

    /// `name` is being loaded: its requests wait for it (up to the prediction timeout)
    /// instead of being refused as unknown.
    pub fn loading(&self, name: &str) {
        self.loading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
    }

    /// `name` finished loading, served ([`Self::swap`] says so itself) or not.
    pub fn loaded(&self, name: &str) {
        self.loading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.ready.notify_waiters();
    }

    /// Models still loading that serve nothing yet.
    pub fn pending(&self) -> Vec<String> {
        let loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        loading
            .iter()
            .filter(|n| self.get(n).is_none())
            .cloned()
            .collect()
    }

    /// The model `name`, waiting until `deadline` while it is still loading.
    async fn model(&self, name: &str, deadline: Instant) -> Result<Arc<Served>, ApiError> {
        loop {
            let woken = self.ready.notified();
            if let Some(m) = self.get(name) {
                return Ok(m);
            }
            let loading = self
                .loading
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(name);
            if !loading {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_model",
                    format!("no model named `{name}` is active"),
                ));
            }
            if tokio::time::timeout_at(deadline.into(), woken)
                .await
                .is_err()
            {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    format!("model `{name}` is still loading; retry shortly"),
                ));
            }
        }
    }

    /// Forwards every prediction to `sinks` from now on (once).
    #[cfg(feature = "sinks")]
    pub fn set_sinks(&self, sinks: crate::sinks::Sinks) {
        let _ = self.sinks.set(sinks);
    }

    /// Captures predictions and takes feedback through `capture` from now on (once).
    #[cfg(feature = "capture")]
    pub fn set_capture(&self, capture: Arc<crate::capture::Capture>) {
        let _ = self.capture.set(capture);
    }

    /// Serves `model` from now on. Requests already running keep the model they started
    /// with; new ones get this one.
    pub fn swap(&self, model: Served) {
        metrics::gauge!("fleetml_agent_model_memory_bytes", "model" => model.name.clone())
            .set(model.memory_bytes as f64);
        let name = model.name.clone();
        let mut map = self.models.write().unwrap_or_else(|p| p.into_inner());
        map.insert(name.clone(), Arc::new(model));
        drop(map);
        // Served before it stops counting as loading: a waiter never sees neither.
        self.loaded(&name);
    }

    /// The version of `name` being served, if any.
    pub fn version_of(&self, name: &str) -> Option<u64> {
        self.get(name).map(|m| m.version)
    }

    /// Expires overdue expected ids and closes windows whose time is up (called every
    /// second by `fleet-agent run`).
    pub fn tick(&self) {
        let now = crate::clock::now_ms();
        for model in self.served() {
            if let Some(m) = &model.monitor {
                m.tick(now);
            }
        }
        // After a burst, once nothing runs, hand freed memory back to the system: glibc
        // keeps freed blocks of every thread's arena otherwise.
        let idle = self.running.available_permits() == self.limits.workers.max(1);
        if idle && self.since_trim.load(Ordering::Relaxed) > 0 {
            self.since_trim.store(0, Ordering::Relaxed);
            crate::memory::trim();
        }
        if let Some(rss) = crate::memory::resident_bytes() {
            metrics::gauge!("fleetml_agent_resident_bytes").set(rss as f64);
        }
    }

    /// Closes every model's current window (shutdown, tests).
    pub fn flush_monitoring(&self) {
        let now = crate::clock::now_ms();
        for model in self.served() {
            if let Some(m) = &model.monitor {
                m.flush(now);
            }
        }
    }

    /// The models being served.
    pub fn served(&self) -> Vec<Arc<Served>> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn get(&self, name: &str) -> Option<Arc<Served>> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/models/{name}/predict", post(predict))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}/monitoring", get(monitoring))
        .route("/v1/expect", post(expect))
        .route("/v1/feedback", post(feedback))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(api)
}

/// An API error: status, message, and the field it concerns.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    field: Option<String>,
    reason: &'static str,
    /// Inputs (rows) the failed request carried, for missing-prediction accounting.
    rows: u32,
    /// The feature value that made the input invalid, for the monitor's out-of-range
    /// and unseen-category rates.
    rejected: Option<(String, fleetml_monitor::Observation)>,
}

impl ApiError {
    fn new(status: StatusCode, reason: &'static str, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            field: None,
            reason,
            rows: 1,
            rejected: None,
        }
    }
    fn rejected(mut self, feature: &str, value: fleetml_monitor::Observation) -> Self {
        self.rejected = Some((feature.to_string(), value));
        self
    }
    fn rows(mut self, rows: usize) -> Self {
        self.rows = rows as u32;
        self
    }
    fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
    fn invalid(field: impl Into<String>, error: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", error).field(field)
    }
}

fn is_cbor(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/cbor"))
}

fn respond(cbor: bool, status: StatusCode, body: &Value) -> Response {
    if cbor {
        match serde_cbor::to_vec(body) {
            Ok(bytes) => {
                (status, [(header::CONTENT_TYPE, "application/cbor")], bytes).into_response()
            }
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    } else {
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

fn error_response(cbor: bool, e: &ApiError, model: &str) -> Response {
    metrics::counter!("fleetml_agent_prediction_errors_total", "model" => model.to_string(), "reason" => e.reason)
        .increment(1);
    let mut body = json!({ "error": e.error });
    if let Some(f) = &e.field {
        body["field"] = Value::String(f.clone());
    }
    respond(cbor, e.status, &body)
}

async fn predict(
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
            error_response(cbor, &e, &name)
        }
    }
}

/// Reads a JSON or CBOR body of at most `max_body` bytes (the small requests besides
/// predictions).
async fn read_value(api: &Api, cbor: bool, body: Body) -> Result<Value, ApiError> {
    let bytes = axum::body::to_bytes(body, api.limits.max_body)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_input",
                format!("request body is larger than {} bytes", api.limits.max_body),
            )
        })?;
    let parsed = if cbor {
        serde_cbor::from_slice(&bytes).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            format!(
                "body is not valid {}: {e}",
                if cbor { "CBOR" } else { "JSON" }
            ),
        )
    })
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
    let first: Vec<Vec<f32>> = if model.monitor.is_some() || captured {
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

/// Rows of a raw-tensor request: the first input's leading dimension (1 for a scalar).
fn rows_of(inputs: &[Tensor]) -> usize {
    inputs
        .first()
        .and_then(|t| t.shape.first())
        .map_or(1, |n| *n as usize)
}

/// A request's model inputs, its row count, and its raw feature rows (for monitoring
/// and explanations).
type Encoded = (Vec<Tensor>, usize, Vec<Vec<RawValue>>);

/// Encodes named features (one object or an array of objects) into the model's inputs.
fn encode_features(model: &Served, features: &Value, max_rows: usize) -> Result<Encoded, ApiError> {
    let (objects, batch): (Vec<&Value>, bool) = match features {
        Value::Array(rows) => (rows.iter().collect(), true),
        Value::Object(_) => (vec![features], false),
        _ => {
            return Err(ApiError::invalid(
                "features",
                "`features` must be an object or an array of objects",
            ));
        }
    };
    if objects.is_empty() || objects.len() > max_rows {
        return Err(ApiError::invalid(
            "features",
            format!("a batch holds 1 to {max_rows} rows, not {}", objects.len()),
        ));
    }
    let schema = &model.schema;
    if schema.is_empty() {
        return Err(ApiError::invalid(
            "features",
            format!(
                "model `{}` has no feature schema; it takes raw tensors: send `inputs`",
                model.name
            ),
        ));
    }
    let mut raw_rows = Vec::with_capacity(objects.len());
    for (i, obj) in objects.iter().enumerate() {
        let at = |name: &str| {
            if batch {
                format!("features[{i}].{name}")
            } else {
                format!("features.{name}")
            }
        };
        let Value::Object(obj) = obj else {
            return Err(ApiError::invalid(
                if batch {
                    format!("features[{i}]")
                } else {
                    "features".into()
                },
                "each row must be an object",
            ));
        };
        for key in obj.keys() {
            if schema.feature(key).is_none() {
                return Err(ApiError::invalid(
                    at(key),
                    format!("unknown feature `{key}`"),
                ));
            }
        }
        let mut row = Vec::with_capacity(schema.features.len());
        for f in &schema.features {
            let v = obj.get(&f.name).unwrap_or(&Value::Null);
            let raw = match (f.kind, v) {
                (_, Value::Null) => {
                    if f.impute.is_none() {
                        return Err(ApiError::invalid(
                            at(&f.name),
                            format!("missing feature `{}`", f.name),
                        ));
                    }
                    RawValue::Missing
                }
                (FeatureType::Float | FeatureType::Int, Value::Number(n)) => {
                    let x = n.as_f64().unwrap_or(f64::NAN);
                    if f.kind == FeatureType::Int && x.fract() != 0.0 {
                        return Err(ApiError::invalid(
                            at(&f.name),
                            format!("`{}` must be an integer", f.name),
                        ));
                    }
                    if !f.in_range(x) {
                        let range = format!(
                            "{}..{}",
                            f.min.map_or("-inf".into(), |m| m.to_string()),
                            f.max.map_or("inf".into(), |m| m.to_string())
                        );
                        return Err(ApiError::invalid(
                            at(&f.name),
                            format!("`{}` = {x} is outside its valid range {range}", f.name),
                        )
                        .rejected(&f.name, fleetml_monitor::Observation::Number(x)));
                    }
                    RawValue::Number(x)
                }
                (FeatureType::Category, Value::String(s)) => {
                    if !f.values.iter().any(|v| v == s) {
                        return Err(ApiError::invalid(
                            at(&f.name),
                            format!("`{}` = `{s}` is not one of {}", f.name, f.values.join(", ")),
                        )
                        .rejected(&f.name, fleetml_monitor::Observation::Unseen));
                    }
                    RawValue::Text(s.clone())
                }
                (FeatureType::Category, _) => {
                    return Err(ApiError::invalid(
                        at(&f.name),
                        format!(
                            "`{}` must be a string, one of {}",
                            f.name,
                            f.values.join(", ")
                        ),
                    ));
                }
                (_, _) => {
                    return Err(ApiError::invalid(
                        at(&f.name),
                        format!("`{}` must be a number", f.name),
                    ));
                }
            };
            row.push(raw);
        }
        raw_rows.push(row);
    }
    let inputs = schema.encode_batch(&model.inputs, &raw_rows);
    Ok((inputs, raw_rows.len(), raw_rows))
}

/// 200 once every model of the store has been loaded (served, or refused and
/// recorded); 503 with the models still loading before that.
async fn readyz(State(api): State<Arc<Api>>) -> Response {
    let loading = api.pending();
    let status = if loading.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    respond(
        false,
        status,
        &json!({"ready": loading.is_empty(), "loading": loading}),
    )
}

async fn list_models(State(api): State<Arc<Api>>) -> Response {
    let map = api.models.read().unwrap_or_else(|p| p.into_inner()).clone();
    let list: Vec<Value> = map
        .values()
        .map(|m| {
            let mut v = json!({"name": m.name, "version": m.version, "state": "serving", "backend": m.backend.kind().as_str(), "fallbacks": m.fallbacks, "memory_bytes": m.memory_bytes});
            if let Some((provider, version)) = m.backend.provider() {
                v["provider"] = json!(provider.as_str());
                v["onnxruntime_version"] = json!(version);
            }
            v
        })
        .collect();
    let mut list = list;
    list.extend(
        api.pending()
            .into_iter()
            .map(|name| json!({"name": name, "state": "loading"})),
    );
    respond(false, StatusCode::OK, &json!({ "models": list }))
}

#[derive(Debug, serde::Deserialize)]
struct MonitoringQuery {
    limit: Option<usize>,
}

async fn monitoring(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    Query(query): Query<MonitoringQuery>,
) -> Response {
    let Some(model) = api.get(&name) else {
        return respond(
            false,
            StatusCode::NOT_FOUND,
            &json!({"error": format!("no model named `{name}` is active")}),
        );
    };
    let Some(monitor) = &model.monitor else {
        return respond(
            false,
            StatusCode::NOT_FOUND,
            &json!({"error": format!("model `{name}` v{} is not monitored: its bundle has no reference profile (fleetctl bundle build --reference)", model.version)}),
        );
    };
    let limit = query.limit.unwrap_or(10).clamp(1, 1000);
    respond(false, StatusCode::OK, &monitor.view(limit))
}

async fn expect(State(api): State<Arc<Api>>, headers: HeaderMap, body: Body) -> Response {
    let cbor = is_cbor(&headers);
    let result = async {
        let request = read_value(&api, cbor, body).await?;
        let Some(name) = request.get("model").and_then(Value::as_str) else {
            return Err(ApiError::invalid("model", "`model` (the model's name) is required"));
        };
        let ids: Vec<String> = request
            .get("ids")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_string)).collect())
            .ok_or_else(|| ApiError::invalid("ids", "`ids` must be a list of strings"))?;
        let now = crate::clock::now_ms();
        let deadline_ms = match (request.get("deadline"), request.get("within_seconds")) {
            (Some(d), None) => d
                .as_f64()
                .filter(|d| *d > 0.0)
                .map(|d| (d * 1000.0) as u64)
                .ok_or_else(|| ApiError::invalid("deadline", "`deadline` must be seconds since the Unix epoch"))?,
            (None, Some(w)) => w
                .as_f64()
                .filter(|w| *w > 0.0)
                .map(|w| now + (w * 1000.0) as u64)
                .ok_or_else(|| ApiError::invalid("within_seconds", "`within_seconds` must be a positive number"))?,
            _ => {
                return Err(ApiError::invalid(
                    "deadline",
                    "give `deadline` (seconds since the epoch) or `within_seconds`",
                ));
            }
        };
        let Some(model) = api.get(name) else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_model",
                format!("no model named `{name}` is active"),
            ));
        };
        let Some(monitor) = &model.monitor else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_monitored",
                format!("model `{name}` is not monitored: its bundle has no reference profile"),
            ));
        };
        let outstanding = monitor
            .expect(&ids, deadline_ms)
            .map_err(|e| ApiError::new(StatusCode::TOO_MANY_REQUESTS, "invalid_input", e))?;
        Ok(json!({"model": name, "expected": ids.len(), "outstanding": outstanding, "deadline_ms": deadline_ms}))
    }
    .await;
    reply(cbor, result)
}

/// The answer of a handler: 200 with its value, or the error with its field.
fn reply(cbor: bool, result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(v) => respond(cbor, StatusCode::OK, &v),
        Err(e) => {
            let mut body = json!({ "error": e.error });
            if let Some(f) = &e.field {
                body["field"] = Value::String(f.clone());
            }
            respond(cbor, e.status, &body)
        }
    }
}

/// `POST /v1/feedback` in an agent built without the `capture` feature: 501, saying so.
#[cfg(not(feature = "capture"))]
async fn feedback(headers: HeaderMap) -> Response {
    reply(
        is_cbor(&headers),
        Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_built",
            "this fleet-agent was built without the `capture` feature, which keeps the recent predictions feedback is scored against; install a build with it (on by default)",
        )),
    )
}

/// `POST /v1/feedback` `{"id", "label"}`: the ground truth of a recent prediction.
#[cfg(feature = "capture")]
async fn feedback(State(api): State<Arc<Api>>, headers: HeaderMap, body: Body) -> Response {
    let cbor = is_cbor(&headers);
    let result = async {
        let request = read_value(&api, cbor, body).await?;
        let Some(id) = request.get("id").and_then(Value::as_str) else {
            return Err(ApiError::invalid(
                "id",
                "`id` (the prediction's `id`, or its `request_id`) is required",
            ));
        };
        let Some(label) = request.get("label") else {
            return Err(ApiError::invalid(
                "label",
                "`label` (the ground truth) is required",
            ));
        };
        let Some(capture) = api.capture.get() else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "feedback is not available in this mode",
            ));
        };
        let f = capture.feedback(id, label).map_err(|e| match e {
            crate::capture::FeedbackError::Unknown(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_id", e.to_string())
            }
            crate::capture::FeedbackError::BadLabel => ApiError::invalid("label", e.to_string()),
        })?;
        if let Some(m) = api.get(&f.model).filter(|m| m.version == f.version)
            && let Some(monitor) = &m.monitor
        {
            monitor.labelled(f.outcome);
        }
        metrics::counter!("fleetml_agent_feedback_total", "model" => f.model.clone()).increment(1);
        let mut reply = json!({ "model": f.model, "version": f.version, "captured": f.captured });
        match f.outcome {
            crate::monitoring::Outcome::Classified { correct } => reply["correct"] = json!(correct),
            crate::monitoring::Outcome::Scored { abs_error } => {
                reply["abs_error"] = json!(abs_error)
            }
        }
        Ok(reply)
    }
    .await;
    reply(cbor, result)
}

async fn metrics(State(api): State<Arc<Api>>) -> Response {
    match &api.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}
