//! The operator and device HTTP API of `fleetctl serve`: one error type, who may call
//! what (`access`, the `authorize` middleware that also audits), and the handlers by
//! resource: `data` (datasets), `devices` (enrolment, inventory, messages, commands,
//! drift, ingest counters), `models` (the registry and the trust policy), `fleet`
//! (assignments, bundles, captures), `rollouts` (rollouts, rollbacks, the engine task),
//! `tokens` (tokens, audit log), `policy` (retraining policies, comparisons) and
//! `retrain` (training jobs); `types` holds the bodies the CLI reads back typed.
//! `router` puts them all behind `authorize`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::{Principal, Role};
use crate::store::FleetStore;

use crate::plane::{Plane, now_ms, same};

pub(crate) mod alerts;
pub(crate) mod broker;
pub(crate) mod data;
pub mod devices;
pub(crate) mod fleet;
pub mod models;
pub(crate) mod policy;
pub(crate) mod retrain;
pub(crate) mod rollouts;
pub mod router;
pub(crate) mod tokens;
pub(crate) mod trainers;
pub mod types;

/// An API error: status and a message naming what was wrong.
pub(crate) struct ApiError(pub StatusCode, pub String);

impl ApiError {
    /// 404: what it names does not exist.
    pub fn not_found(e: impl std::fmt::Display) -> ApiError {
        ApiError(StatusCode::NOT_FOUND, e.to_string())
    }

    /// 422: well-formed, but not something that can be done.
    pub fn unprocessable(e: impl std::fmt::Display) -> ApiError {
        ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
    }

    /// 500: the control plane failed.
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::refusal::Refusal> for ApiError {
    fn from(e: crate::refusal::Refusal) -> Self {
        use crate::refusal::Refusal as R;
        let status = match &e {
            R::NotFound(_) => StatusCode::NOT_FOUND,
            R::Gone(_) => StatusCode::GONE,
            R::Conflict(_) => StatusCode::CONFLICT,
            R::Precondition(_) => StatusCode::PRECONDITION_FAILED,
            R::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            R::Store(s) => return ApiError::from_store(s),
            R::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::from_store(&e)
    }
}

impl ApiError {
    fn from_store(e: &crate::store::StoreError) -> ApiError {
        use crate::store::StoreError as E;
        let status = match e {
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

/// Reads written to the audit log like changes.
pub const AUDITED_READS: [&str; 3] = [
    "/v1/datasets/{id}/data",
    "/v1/datasets/{id}/profile",
    "/v1/bundles/{digest}",
];

/// The access rule of every authenticated route (documented per route in
/// docs/openapi.yaml as `x-fleetml-role`, and tested route by route).
pub fn access(method: &axum::http::Method, route: &str) -> Access {
    use axum::http::Method;
    let admin = route.starts_with("/v1/tokens")
        || route == "/v1/devices/{id}/revoke"
        || route == "/v1/devices/{id}/rotate"
        || route.starts_with("/v1/broker")
        || (route.starts_with("/v1/trainers") && method != Method::GET)
        || (route == "/v1/trust" && method == Method::PUT)
        || (route == "/v1/devices" && method == Method::POST);
    if admin {
        Access::Role(Role::Admin)
    } else if route == "/v1/devices/{id}/assignment" || route == "/v1/bundles/{digest}" {
        Access::DeviceOrViewer
    } else if route == "/v1/devices/{id}/captures" && method == Method::POST {
        Access::OwnDevice
    } else if route.starts_with("/v1/audit") || !matches!(*method, Method::GET | Method::HEAD) {
        Access::Role(Role::Operator)
    } else {
        Access::Role(Role::Viewer)
    }
}

/// The principal of a bearer token: a device (its derived HTTP token) or an operator
/// token.
/// `Err` only when the store cannot answer now (the caller gets 503, not a 401 that
/// would send a device or an operator looking for a wrong token); a record that no
/// longer decodes authenticates nobody.
fn identify(plane: &Plane, token: &str) -> Result<Option<Principal>, crate::store::StoreError> {
    use crate::store::StoreError;
    fn known<T>(found: Result<Option<T>, StoreError>) -> Result<Option<T>, StoreError> {
        match found {
            Err(e @ StoreError::Unavailable(_)) => Err(e),
            Err(_) => Ok(None),
            Ok(found) => Ok(found),
        }
    }
    if let Some((id, _)) = fleetml_protocol::assignment::parse_http_token(token) {
        let Some(record) = known(plane.ingest.store.device(&id))? else {
            return Ok(None);
        };
        // A revoked device's token is refused like an unknown one.
        let Some(secret) = record.live_secret() else {
            return Ok(None);
        };
        let expected = fleetml_protocol::assignment::http_token(&id, secret);
        return Ok(same(token.as_bytes(), expected.as_bytes()).then_some(Principal::Device(id)));
    }
    Ok(known(plane.tokens.find(token))?.map(Principal::Operator))
}

/// Limits mutating calls per client address (before authentication) and per token or
/// device (after), authenticates, checks the route's role, runs the handler, and writes an audit entry
/// for every mutating call of an authenticated caller (refused ones included); calls
/// without a valid token are counted (`fleetml_control_unauthenticated_requests_total`)
/// and audited as one entry per interval.
pub(crate) async fn authorize(
    State(plane): State<Arc<Plane>>,
    matched: Option<axum::extract::MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let mutating = !matches!(method, axum::http::Method::GET | axum::http::Method::HEAD);
    if mutating {
        let peer = request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        if let Some(ip) = peer
            && let Err(limited) = plane.rate.per_address.check(&ip)
        {
            return too_many(
                "address",
                limited,
                format!(
                    "too many changes from {ip}: {} per second (bursts of ten times that) per address; retry later (fleetctl serve --rate-limit-address)",
                    plane.rate.rates.per_address
                ),
            );
        }
    }
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
            match tokio::task::spawn_blocking(move || identify(&p2, &t)).await {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => return ApiError::from(e).into_response(),
                Err(_) => None,
            }
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
    if mutating
        && refused.is_none()
        && let Some(p) = &principal
        && let Err(limited) = plane.rate.per_principal.check(&p.who())
    {
        return too_many(
            "token",
            limited,
            format!(
                "too many changes by {}: {} per second (bursts of ten times that) per token or device; retry later (fleetctl serve --rate-limit-token)",
                p.who(),
                plane.rate.rates.per_token
            ),
        );
    }
    let response = match refused {
        Some(e) => e.into_response(),
        None => {
            if let Some(p) = principal.clone() {
                request.extensions_mut().insert(p);
            }
            next.run(request).await
        }
    };
    if principal.is_none() {
        metrics::counter!("fleetml_control_unauthenticated_requests_total").increment(1);
    }
    // Besides every change: reads of the fleet's data (a dataset's rows, its profile) and
    // an operator's download of a bundle (a model's weights). A device's download of a
    // bundle its assignment names is the fleet working, not audited.
    let audited_read = !mutating
        && (AUDITED_READS.contains(&route.as_str()))
        && !(route == "/v1/bundles/{digest}" && matches!(principal, Some(Principal::Device(_))));
    match (&principal, mutating || audited_read) {
        (None, true) => plane.audit.refused_unauthenticated(now_ms(), &action),
        (Some(p), true) => {
            let status = response.status().as_u16();
            let (who, role, p2) = (p.who(), p.role(), plane.clone());
            let written = tokio::task::spawn_blocking(move || {
                p2.audit.append(now_ms(), who, role, action, target, status)
            })
            .await;
            if !matches!(written, Ok(Ok(_))) {
                tracing::error!("could not write the audit log entry of a {status} call");
            }
        }
        (_, false) => {}
    }
    response
}

/// 429 with `Retry-After` (whole seconds, at least 1), counted per limit in
/// `fleetml_control_rate_limited_total{by}`; not audited one by one (a flood would fill
/// the log).
fn too_many(by: &'static str, limited: fleetml_net::rate::Limited, why: String) -> Response {
    metrics::counter!("fleetml_control_rate_limited_total", "by" => by).increment(1);
    let seconds = limited.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = ApiError(StatusCode::TOO_MANY_REQUESTS, why).into_response();
    response.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(seconds),
    );
    response
}

/// The least operator role a rule admits.
pub(crate) fn access_role(a: Access) -> Role {
    match a {
        Access::Role(r) => r,
        Access::DeviceOrViewer => Role::Viewer,
        Access::OwnDevice => Role::Admin,
    }
}

/// Largest dataset file accepted by `POST /v1/datasets`.
pub const MAX_DATASET_UPLOAD: usize = 512 << 20;

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Api<T> + Send + 'static,
) -> Api<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refusal::Refusal;
    use crate::store::StoreError;

    /// Every kind of refusal becomes the status a client acts on, with its message.
    #[test]
    fn refusals_become_their_http_status() {
        let cases = [
            (Refusal::not_found("no dataset `x`"), StatusCode::NOT_FOUND),
            (Refusal::gone("file removed"), StatusCode::GONE),
            (
                Refusal::conflict("rollout r1 is running"),
                StatusCode::CONFLICT,
            ),
            (
                Refusal::precondition("no trust policy"),
                StatusCode::PRECONDITION_FAILED,
            ),
            (
                Refusal::unprocessable("archived"),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (Refusal::internal("disk"), StatusCode::INTERNAL_SERVER_ERROR),
            (
                Refusal::Store(StoreError::Unavailable("sled".into())),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                Refusal::Store(StoreError::Conflict("seq".into())),
                StatusCode::CONFLICT,
            ),
        ];
        for (refusal, status) in cases {
            let text = refusal.to_string();
            let e = ApiError::from(refusal);
            assert_eq!(e.0, status, "{text}");
            assert_eq!(e.1, text);
        }
    }
}
