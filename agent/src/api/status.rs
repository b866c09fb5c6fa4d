//! What the agent serves and how it is doing: `GET /readyz`, `GET /v1/models`,
//! `GET /v1/models/{name}/monitoring`, `GET /metrics`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Api, respond};

/// 200 once every model of the store has been loaded (served, or refused and
/// recorded); 503 with the models still loading before that.
pub(super) async fn readyz(State(api): State<Arc<Api>>) -> Response {
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

pub(super) async fn list_models(State(api): State<Arc<Api>>) -> Response {
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
pub(super) struct MonitoringQuery {
    limit: Option<usize>,
}

pub(super) async fn monitoring(
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

pub(super) async fn metrics(State(api): State<Arc<Api>>) -> Response {
    match &api.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}
