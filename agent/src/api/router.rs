//! The routes of the prediction API and the handler behind each, behind the API token
//! when one is configured.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::Api;
use super::feedback::{expect, feedback};
use super::predict::predict;
use super::status::{list_models, metrics, monitoring, readyz};

/// The prediction API over `api`.
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
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            require_token,
        ))
        .with_state(api)
}

/// With a token configured, refuses (401) every request without it but the probes.
async fn require_token(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let Some(want) = &api.limits.token else {
        return next.run(request).await;
    };
    if matches!(request.uri().path(), "/healthz" | "/readyz") {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Compared as digests: the time taken says nothing about how much of it matched.
    let sha = fleetml_protocol::crypto::sha256;
    if given.is_some_and(|g| sha(g.as_bytes()) == sha(want.as_bytes())) {
        return next.run(request).await;
    }
    (
        axum::http::StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({
            "error": "missing or wrong API token: send `Authorization: Bearer TOKEN` with the token in the agent's api_token_file"
        })),
    )
        .into_response()
}
