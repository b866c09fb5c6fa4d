//! Every route of `fleetctl serve`, behind the `authorize` middleware but `/healthz` and
//! `/metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::{delete, get, post, put};

use super::{MAX_DATASET_UPLOAD, authorize};
use crate::api::devices::*;
use crate::api::models::*;
use crate::plane::Plane;

pub fn router(plane: Arc<Plane>) -> Router {
    use crate::api::data as d;
    use crate::api::fleet as f;
    use crate::api::retrain as r;
    use crate::api::rollouts as ro;
    use crate::api::tokens as t;
    let authenticated = Router::new()
        .route("/v1/devices", post(enroll).get(list_devices))
        .route("/v1/devices/{id}", get(show_device))
        .route("/v1/devices/{id}/messages", get(device_messages))
        .route("/v1/devices/{id}/commands", post(send_command))
        .route("/v1/devices/{id}/revoke", post(revoke))
        .route("/v1/devices/{id}/rotate", post(rotate))
        .route("/v1/devices/{id}/assignment", get(f::device_assignment))
        .route("/v1/bundles/{digest}", get(f::bundle))
        .route(
            "/v1/devices/{id}/captures",
            post(f::upload_capture).layer(axum::extract::DefaultBodyLimit::max(
                crate::captures::MAX_BATCH,
            )),
        )
        .route("/v1/captures", get(f::list_captures))
        .route(
            "/v1/datasets",
            post(d::import)
                .get(d::list)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_DATASET_UPLOAD)),
        )
        .route("/v1/datasets/from-captures", post(d::from_captures))
        .route("/v1/datasets/{id}", get(d::show).delete(d::delete))
        .route("/v1/datasets/{id}/data", get(d::data))
        .route("/v1/datasets/{id}/profile", get(d::profile))
        .route("/v1/retrain", post(r::start_job).get(r::list_jobs))
        .route("/v1/retrain/{id}", get(r::show_job))
        .route("/v1/retrain/{id}/logs", get(r::job_logs))
        .route("/v1/retrain/{id}/cancel", post(r::cancel_job))
        .route("/v1/models/{name}/{version}/reproduce", post(r::reproduce))
        .route(
            "/v1/models/{name}/policy",
            get(crate::api::policy::get_policy).put(crate::api::policy::put_policy),
        )
        .route("/v1/compare", post(crate::api::policy::compare_handler))
        .route("/v1/drift", get(drift))
        .route("/v1/ingest", get(ingest_counters))
        .route("/v1/trust", get(get_trust).put(put_trust))
        .route(
            "/v1/models",
            post(push_model)
                .get(list_models)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BUNDLE)),
        )
        .route("/v1/models/{name}", get(model_versions))
        .route("/v1/models/{name}/{version}", get(show_model))
        .route("/v1/models/{name}/{version}/stage", post(set_stage))
        .route("/v1/models/{name}/{version}/tags", post(set_tags))
        .route(
            "/v1/rollouts",
            post(ro::start_rollout).get(ro::list_rollouts),
        )
        .route("/v1/rollouts/{id}", get(ro::show_rollout))
        .route("/v1/rollouts/{id}/promote", post(ro::promote_rollout))
        .route("/v1/rollouts/{id}/pause", post(ro::pause_rollout))
        .route("/v1/rollouts/{id}/resume", post(ro::resume_rollout))
        .route("/v1/rollouts/{id}/abort", post(ro::abort_rollout))
        .route("/v1/rollbacks", post(ro::start_rollback))
        .route("/v1/tokens", post(t::create_token).get(t::list_tokens))
        .route("/v1/tokens/{id}", delete(t::revoke_token))
        .route("/v1/alerts", get(crate::api::alerts::list))
        .route("/v1/alerts/test", post(crate::api::alerts::test))
        .route(
            "/v1/alerts/silences",
            get(crate::api::alerts::silences).post(crate::api::alerts::silence),
        )
        .route(
            "/v1/alerts/silences/{id}",
            delete(crate::api::alerts::expire),
        )
        .route("/v1/audit", get(t::audit_log))
        .route("/v1/audit/verify", get(t::audit_verify))
        .route("/v1/broker/mosquitto", get(crate::api::broker::mosquitto))
        .route("/v1/broker/nats", get(crate::api::broker::nats))
        .route("/v1/trainers", get(crate::api::trainers::list))
        .route(
            "/v1/trainers/{name}",
            put(crate::api::trainers::put).delete(crate::api::trainers::remove),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            plane.clone(),
            authorize,
        ));
    Router::new()
        .merge(authenticated)
        .merge(crate::console::router(plane.clone()))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_text))
        .with_state(plane)
}

async fn metrics_text(State(plane): State<Arc<Plane>>) -> String {
    let mut text = plane
        .metrics
        .as_ref()
        .map(|m| m.render())
        .unwrap_or_default();
    text.push_str(&plane.fleet_metrics.text(crate::plane::now_ms()));
    text
}
