//! The routes of the prediction API and the handler behind each.

use std::sync::Arc;

use axum::Router;
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
        .with_state(api)
}
