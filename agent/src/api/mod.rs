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
//!
//! Here: the API's state ([`Api`]: the models served, the pool, limits), its error and
//! the JSON/CBOR answer helpers. The handlers: `predict` (with `encode` for named
//! features), `status` (models, monitoring, readiness, metrics), `feedback` (expected ids
//! and labels); `router` puts them on their paths.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleetml_protocol::features::FeatureSchema;
use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::{Dim, TensorSpec};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::backend::Backend;
use crate::monitoring::ModelMonitor;

mod encode;
mod feedback;
mod predict;
pub mod router;
mod status;

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
    /// A candidate version run beside this one in shadow, when assigned.
    pub shadow: Option<Arc<crate::shadow::Shadow>>,
}

impl Served {
    /// The same served version with `shadow` beside it instead (its monitor and batcher
    /// carry on: only the shadow changes).
    pub fn with_shadow(&self, shadow: Option<Arc<crate::shadow::Shadow>>) -> Served {
        if let Some(m) = &self.monitor {
            m.compare_with(shadow.as_ref().map(|s| s.comparison.clone()));
        }
        Served {
            name: self.name.clone(),
            version: self.version,
            schema: self.schema.clone(),
            inputs: self.inputs.clone(),
            backend: self.backend.clone(),
            fallbacks: self.fallbacks.clone(),
            monitor: self.monitor.clone(),
            inline: self.inline,
            batcher: self.batcher.clone(),
            memory_bytes: self.memory_bytes,
            shadow,
        }
    }
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
#[derive(Debug, Clone)]
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
    /// The share of one core shadow runs may use, percent (`shadow_cpu_percent`).
    pub shadow_cpu_percent: u8,
    /// Longest a prediction may take before the request is answered 504 (the backend
    /// call finishes in the background, holding its worker).
    pub timeout: std::time::Duration,
    /// Connections served at once on each listener; more are closed at once.
    pub max_connections: usize,
    /// The bearer token every request but `/healthz` and `/readyz` must carry
    /// (`api_token_file`; none: no token asked, for loopback and the Unix socket).
    pub token: Option<String>,
}

impl ApiLimits {
    /// What one HTTP caller may take: its whole request head within 10 s, an answer
    /// within the prediction time-out plus a minute to send the body (the handler
    /// answers 504 itself before that), and `max_connections`.
    pub fn http(&self) -> fleetml_net::Limits {
        fleetml_net::Limits::new(
            self.timeout + std::time::Duration::from_secs(60),
            self.max_connections,
            fleetml_net::Metrics {
                open: "fleetml_agent_http_connections",
                refused: "fleetml_agent_http_connections_refused_total",
                timed_out: "fleetml_agent_http_requests_timed_out_total",
            },
        )
    }
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            workers: 2,
            queue: 64,
            max_body: 1 << 20,
            fit_body_to_model: true,
            max_rows: 1024,
            shadow_cpu_percent: 50,
            timeout: std::time::Duration::from_secs(30),
            max_connections: 1024,
            token: None,
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

    /// `name` as a metric label: itself for a model served or loading, `unknown` for
    /// any other, so that requests for made-up names cannot grow the metrics without end.
    fn metric_label<'a>(&self, name: &'a str) -> &'a str {
        let loading = self
            .loading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name);
        if loading || self.get(name).is_some() {
            name
        } else {
            "unknown"
        }
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

    pub fn get(&self, name: &str) -> Option<Arc<Served>> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
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
