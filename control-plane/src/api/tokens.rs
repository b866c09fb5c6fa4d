//! API handlers for operator tokens (created, listed, revoked) and the hash-chained
//! audit log.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use crate::api::types::{CreatedToken, TokenInfo, TokenRequest};
use crate::api::{Api, ApiError};
use crate::auth::{Principal, Role};
use crate::plane::{Plane, now_ms};

/// `POST /v1/tokens`: a new operator token, shown once.
pub async fn create_token(
    State(plane): State<Arc<Plane>>,
    Extension(who): Extension<Principal>,
    axum::Json(req): axum::Json<TokenRequest>,
) -> Api<(StatusCode, axum::Json<CreatedToken>)> {
    let role: Role = req.role.parse().map_err(ApiError::unprocessable)?;
    if req.name.trim().is_empty() || req.name.len() > 64 {
        return Err(ApiError::unprocessable(
            "a token needs a name of 1–64 characters (who or what uses it)",
        ));
    }
    let random = crate::plane::random_bytes(32).map_err(ApiError::internal)?;
    let (record, token) =
        plane
            .tokens
            .create(req.name.trim(), role, &who.who(), now_ms(), &random)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken {
            id: record.id,
            name: record.name,
            role: record.role,
            token,
        }),
    ))
}

pub async fn list_tokens(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Vec<TokenInfo>>> {
    let list = plane.tokens.list()?;
    Ok(axum::Json(list.iter().map(TokenInfo::from).collect()))
}

pub async fn revoke_token(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<StatusCode> {
    if id == "admin" {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "the bootstrap admin token is revoked by deleting DATA_DIR/admin.token and restarting the server".into(),
        ));
    }
    if plane.tokens.revoke(&id)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no token `{id}` (fleetctl tokens list)"),
        ))
    }
}

#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    #[serde(default = "one")]
    from: u64,
    #[serde(default = "many")]
    limit: usize,
}

fn one() -> u64 {
    1
}

fn many() -> usize {
    100_000
}

/// `GET /v1/audit`.
pub async fn audit_log(
    State(plane): State<Arc<Plane>>,
    Query(q): Query<AuditQuery>,
) -> Api<axum::Json<Value>> {
    let entries = plane.audit.entries(q.from, q.limit.min(1_000_000))?;
    Ok(axum::Json(
        serde_json::to_value(entries).map_err(ApiError::internal)?,
    ))
}

#[derive(Debug, Deserialize)]
pub struct VerifyQuery {
    /// Heads kept elsewhere, comma-separated.
    #[serde(default)]
    head: String,
}

/// `GET /v1/audit/verify`: the whole log checked here, with the key the client does not
/// have: `{intact, entries, head, keyed_from}` or `{intact: false, error, …}`.
pub async fn audit_verify(
    State(plane): State<Arc<Plane>>,
    Query(q): Query<VerifyQuery>,
) -> Api<axum::Json<Value>> {
    let anchors: Vec<String> = q
        .head
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect();
    if anchors.len() > 64 || anchors.iter().any(|h| h.len() != 64) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "head: up to 64 hashes of 64 hex digits, comma-separated (heads `fleetctl audit verify` printed)".into(),
        ));
    }
    let audit = plane.audit.clone();
    let keyed_from = audit.key().keyed_from();
    let outcome = tokio::task::spawn_blocking(move || audit.verify_all(anchors))
        .await
        .map_err(ApiError::internal)??;
    Ok(axum::Json(match outcome {
        Ok(chain) => serde_json::json!({
            "intact": true,
            "entries": chain.checked,
            "head": chain.head(),
            "keyed_from": keyed_from,
        }),
        Err(error) => serde_json::json!({
            "intact": false,
            "error": error,
            "keyed_from": keyed_from,
        }),
    }))
}
