//! The operator and device HTTP API of `fleetctl serve`: one error type, who may call
//! what (`access`, the `authorize` middleware that also audits), and the router. The
//! handlers live by resource: `data` (datasets), `devices` (enrolment, inventory,
//! messages, commands, drift, ingest counters), `models` (the registry and the trust
//! policy), and, outside this folder still, `fleet_api`, `policy` and `retrain`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::json;

use crate::auth::{Principal, Role};
use crate::store::FleetStore;

use crate::server::{Plane, now_ms, same};

pub(crate) mod data;
pub mod devices;
pub mod models;

pub(crate) use self::devices::*;
pub(crate) use self::models::*;

/// An API error: status and a message naming what was wrong.
pub(crate) struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError as E;
        let status = match &e {
            E::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            E::Conflict(_) => StatusCode::CONFLICT,
            E::NotFound(_) => StatusCode::NOT_FOUND,
        };
        ApiError(status, e.to_string())
    }
}

pub(crate) type Api<T> = Result<T, ApiError>;

/// Who may call `route` with `method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Role(Role),
    /// The device the path names (its own assignment, the bundles it names), or a viewer.
    DeviceOrViewer,
    /// Only the device the path names (uploads of its captured data).
    OwnDevice,
}

/// The access rule of every authenticated route (documented per route in
/// docs/openapi.yaml as `x-fleetml-role`, and tested route by route).
pub fn access(method: &axum::http::Method, route: &str) -> Access {
    use axum::http::Method;
    let admin = route.starts_with("/v1/tokens")
        || (route == "/v1/trust" && method == Method::PUT)
        || (route == "/v1/devices" && method == Method::POST);
    if admin {
        Access::Role(Role::Admin)
    } else if route == "/v1/devices/{id}/assignment" || route == "/v1/bundles/{digest}" {
        Access::DeviceOrViewer
    } else if route == "/v1/devices/{id}/captures" && method == Method::POST {
        Access::OwnDevice
    } else if route == "/v1/audit" || !matches!(*method, Method::GET | Method::HEAD) {
        Access::Role(Role::Operator)
    } else {
        Access::Role(Role::Viewer)
    }
}

/// The principal of a bearer token: a device (its derived HTTP token) or an operator
/// token.
fn identify(plane: &Plane, token: &str) -> Option<Principal> {
    if let Some((id, _)) = fleetml_protocol::assignment::parse_http_token(token) {
        let record = plane.ingest.store.device(&id).ok()??;
        let expected = fleetml_protocol::assignment::http_token(&id, &record.secret);
        return same(token.as_bytes(), expected.as_bytes()).then_some(Principal::Device(id));
    }
    plane.tokens.find(token).ok()?.map(Principal::Operator)
}

/// Authenticates, checks the route's role, runs the handler, and writes an audit entry
/// for every mutating call (refused ones included).
async fn authorize(
    State(plane): State<Arc<Plane>>,
    matched: Option<axum::extract::MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let target = request.uri().path().to_string();
    let route = matched.map_or_else(|| target.clone(), |m| m.as_str().to_string());
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let principal = match given {
        Some(t) => {
            let (p2, t) = (plane.clone(), t.to_string());
            tokio::task::spawn_blocking(move || identify(&p2, &t))
                .await
                .ok()
                .flatten()
        }
        None => None,
    };
    let action = format!("{method} {route}");
    let rule = access(&method, &route);
    let refused = match (&principal, rule) {
        (None, _) => Some(ApiError(
            StatusCode::UNAUTHORIZED,
            if given.is_some() {
                "unknown or revoked API token: check FLEETML_TOKEN (the bootstrap admin token is in DATA_DIR/admin.token)".into()
            } else {
                "missing API token: set FLEETML_TOKEN or ~/.config/fleetml/token (the bootstrap admin token is in DATA_DIR/admin.token)".into()
            },
        )),
        (Some(Principal::Operator(t)), Access::OwnDevice) => Some(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "token `{}` is an operator token; {action} needs a device token (devices upload their own captures)",
                t.name
            ),
        )),
        (Some(Principal::Device(d)), Access::Role(_)) => Some(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "device `{d}` may only read its own assignment and the bundles it names, not {action}"
            ),
        )),
        (Some(Principal::Operator(t)), rule) if t.role < access_role(rule) => Some(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "token `{}` has role {}; {action} needs {}",
                t.name,
                t.role.as_str(),
                access_role(rule).as_str()
            ),
        )),
        _ => None,
    };
    let response = match refused {
        Some(e) => e.into_response(),
        None => {
            if let Some(p) = principal.clone() {
                request.extensions_mut().insert(p);
            }
            next.run(request).await
        }
    };
    if !matches!(method, axum::http::Method::GET | axum::http::Method::HEAD) {
        let status = response.status().as_u16();
        let (who, role) = principal
            .as_ref()
            .map_or(("anonymous".to_string(), "none".to_string()), |p| {
                (p.who(), p.role())
            });
        let p2 = plane.clone();
        let written = tokio::task::spawn_blocking(move || {
            p2.audit.append(now_ms(), who, role, action, target, status)
        })
        .await;
        if !matches!(written, Ok(Ok(_))) {
            tracing::error!("could not write the audit log entry of a {status} call");
        }
    }
    response
}

/// The least operator role a rule admits.
fn access_role(a: Access) -> Role {
    match a {
        Access::Role(r) => r,
        Access::DeviceOrViewer => Role::Viewer,
        Access::OwnDevice => Role::Admin,
    }
}

/// Largest dataset file accepted by `POST /v1/datasets`.
pub const MAX_DATASET_UPLOAD: usize = 512 << 20;

pub fn router(plane: Arc<Plane>) -> Router {
    use crate::api::data as d;
    use crate::fleet_api as f;
    use crate::retrain as r;
    let authenticated = Router::new()
        .route("/v1/devices", post(enroll).get(list_devices))
        .route("/v1/devices/{id}", get(show_device))
        .route("/v1/devices/{id}/messages", get(device_messages))
        .route("/v1/devices/{id}/commands", post(send_command))
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
            get(crate::policy::get_policy).put(crate::policy::put_policy),
        )
        .route("/v1/compare", post(crate::policy::compare_handler))
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
        .route("/v1/rollouts", post(f::start_rollout).get(f::list_rollouts))
        .route("/v1/rollouts/{id}", get(f::show_rollout))
        .route("/v1/rollouts/{id}/pause", post(f::pause_rollout))
        .route("/v1/rollouts/{id}/resume", post(f::resume_rollout))
        .route("/v1/rollouts/{id}/abort", post(f::abort_rollout))
        .route("/v1/rollbacks", post(f::start_rollback))
        .route("/v1/tokens", post(f::create_token).get(f::list_tokens))
        .route("/v1/tokens/{id}", delete(f::revoke_token))
        .route("/v1/audit", get(f::audit_log))
        .route_layer(axum::middleware::from_fn_with_state(
            plane.clone(),
            authorize,
        ));
    Router::new()
        .merge(authenticated)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_text))
        .with_state(plane)
}

async fn metrics_text(State(plane): State<Arc<Plane>>) -> String {
    plane
        .metrics
        .as_ref()
        .map(|m| m.render())
        .unwrap_or_default()
}
