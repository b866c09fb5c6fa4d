//! What callers tell the agent besides features: `POST /v1/expect` (ids that must be
//! predicted by a deadline) and `POST /v1/feedback` (ground-truth labels for captured
//! predictions).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

use super::{Api, ApiError, is_cbor, read_value, reply};

pub(super) async fn expect(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
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

/// `POST /v1/feedback` in an agent built without the `capture` feature: 501, saying so.
#[cfg(not(feature = "capture"))]
pub(super) async fn feedback(headers: HeaderMap) -> Response {
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
pub(super) async fn feedback(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
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
