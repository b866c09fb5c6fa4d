//! The registry's models (push, list, show, stage, tags) and the trust policy.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use fleetml_protocol::trust::TrustPolicy;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::store::FleetStore;

use crate::plane::{Plane, keep_policy, now_ms};

use super::{Api, ApiError};

impl From<crate::registry::RegistryError> for ApiError {
    fn from(e: crate::registry::RegistryError) -> Self {
        use crate::registry::RegistryError as E;
        let status = match &e {
            E::NoTrustPolicy => StatusCode::PRECONDITION_FAILED,
            E::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            E::Conflict { .. } => StatusCode::CONFLICT,
            E::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// `POST /v1/models`: the body is a bundle file. Written to disk as it arrives, verified
/// against the trust policy, then kept.
pub(crate) async fn push_model(
    State(plane): State<Arc<Plane>>,
    body: axum::body::Body,
) -> Api<(StatusCode, axum::Json<Value>)> {
    use http_body_util::BodyExt;
    use std::io::Write;
    let mut file = plane.registry.incoming()?;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("reading the upload: {e}")))?;
        if let Ok(data) = frame.into_data() {
            file.write_all(&data).map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("storing the upload: {e}"),
                )
            })?;
        }
    }
    let p2 = plane.clone();
    let pushed =
        tokio::task::spawn_blocking(move || p2.registry.push(file, p2.policy().as_ref(), now_ms()))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(match pushed {
        crate::registry::Pushed::New(r) => {
            tracing::info!(model = %r.name, version = r.version, digest = %r.digest, "model pushed");
            (
                StatusCode::CREATED,
                axum::Json(json!({ "unchanged": false, "model": r })),
            )
        }
        crate::registry::Pushed::Unchanged(r) => (
            StatusCode::OK,
            axum::Json(json!({ "unchanged": true, "model": r })),
        ),
    })
}

/// Devices whose latest status says they serve `name` (at `version`, if given).
pub(crate) fn running(plane: &Plane, name: &str, version: Option<u64>) -> Api<Vec<Value>> {
    let store = &plane.ingest.store;
    let mut out = Vec::new();
    for d in store.devices()? {
        let state = store.state(&d.id)?.unwrap_or_default();
        if let Some((_, s)) = &state.status {
            for m in &s.models {
                if m.name == name && version.is_none_or(|v| v == m.version) {
                    out.push(json!({
                        "device": d.id, "version": m.version, "backend": m.backend,
                        "online": state.online,
                    }));
                }
            }
        }
    }
    Ok(out)
}

pub(crate) async fn list_models(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    Ok(axum::Json(json!(plane.registry.list(None)?)))
}

pub(crate) async fn model_versions(
    State(plane): State<Arc<Plane>>,
    UrlPath(name): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    let versions = plane.registry.list(Some(&name))?;
    if versions.is_empty() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no model `{name}` in the registry"),
        ));
    }
    Ok(axum::Json(json!({
        "name": name,
        "versions": versions,
        "running_on": running(&plane, &name, None)?,
    })))
}

/// The reference profile of the stored bundle at `path`, read only after the bundle
/// verifies again against `policy`; `None` when it has none.
pub(crate) fn verified_reference(
    path: &Path,
    policy: &TrustPolicy,
) -> anyhow::Result<Option<fleetml_protocol::reference::ReferenceProfile>> {
    let verified = crate::bundle::verify(path, policy)?;
    if verified
        .manifest
        .entry(fleetml_protocol::manifest::REFERENCE_ENTRY)
        .is_none()
    {
        return Ok(None);
    }
    let mut f = std::fs::File::open(path)?;
    let bytes = verified.read_entry(
        &mut f,
        fleetml_protocol::manifest::REFERENCE_ENTRY,
        64 << 20,
    )?;
    Ok(Some(
        fleetml_protocol::reference::ReferenceProfile::from_cbor(&bytes)?,
    ))
}

/// The reference profile of registry version `NAME@VERSION` (blocking).
pub(crate) fn reference_profile(
    plane: &Plane,
    spec: &str,
) -> Api<fleetml_protocol::reference::ReferenceProfile> {
    let (name, version) = crate::registry::parse_model_version(spec)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let name = name.as_str();
    let record = plane.registry.get(name, version)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no {name} v{version} in the registry"),
        )
    })?;
    let policy = plane.policy().ok_or_else(|| {
        ApiError(
            StatusCode::PRECONDITION_FAILED,
            "the server has no trust policy".into(),
        )
    })?;
    let path = plane
        .registry
        .blob_path(&record.digest)
        .map_err(ApiError::internal)?;
    verified_reference(&path, &policy)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{spec} has no reference profile"),
            )
        })
}

pub(crate) async fn show_model(
    State(plane): State<Arc<Plane>>,
    UrlPath((name, version)): UrlPath<(String, u64)>,
) -> Api<axum::Json<Value>> {
    let record = plane.registry.get(&name, version)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no {name} v{version} in the registry"),
        )
    })?;
    let path = plane
        .registry
        .blob_path(&record.digest)
        .map_err(ApiError::internal)?;
    let policy = plane.policy();
    let bundle = tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
        let front = crate::bundle::read_front(&path)?;
        let size = std::fs::metadata(&path)?.len();
        let mut v = crate::bundle::inspect_json(&front, size);
        // The reference profile, read only from a bundle that verifies again.
        if let Some(policy) = &policy
            && let Some(profile) = verified_reference(&path, policy)?
        {
            v["reference"] = serde_json::to_value(&profile)?;
        }
        Ok(v)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the stored bundle: {e:#}"),
        )
    })?;
    Ok(axum::Json(json!({
        "model": record,
        "bundle": bundle,
        "running_on": running(&plane, &name, Some(version))?,
    })))
}

/// Applies `change` to a registry record and answers it, or 404.
pub(crate) fn updated(
    plane: &Plane,
    name: &str,
    version: u64,
    change: impl Fn(&mut crate::registry::ModelRecord) + Sync,
) -> Api<axum::Json<Value>> {
    let r = plane
        .registry
        .update(name, version, change)?
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no {name} v{version} in the registry"),
            )
        })?;
    Ok(axum::Json(json!(r)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StageRequest {
    stage: String,
}

pub(crate) async fn set_stage(
    State(plane): State<Arc<Plane>>,
    UrlPath((name, version)): UrlPath<(String, u64)>,
    axum::Json(req): axum::Json<StageRequest>,
) -> Api<axum::Json<Value>> {
    if !crate::registry::STAGES.contains(&req.stage.as_str()) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown stage `{}`: use one of {}",
                req.stage,
                crate::registry::STAGES.join(", ")
            ),
        ));
    }
    updated(&plane, &name, version, |r| r.stage = req.stage.clone())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TagsRequest {
    #[serde(default)]
    set: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

pub(crate) async fn set_tags(
    State(plane): State<Arc<Plane>>,
    UrlPath((name, version)): UrlPath<(String, u64)>,
    axum::Json(req): axum::Json<TagsRequest>,
) -> Api<axum::Json<Value>> {
    if let Some(k) = req.set.keys().find(|k| k.is_empty() || k.len() > 64) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("tag key `{k}` must be 1-64 characters"),
        ));
    }
    updated(&plane, &name, version, |r| {
        for k in &req.remove {
            r.tags.remove(k);
        }
        r.tags.extend(req.set.clone());
    })
}

pub(crate) async fn get_trust(State(plane): State<Arc<Plane>>) -> axum::Json<Value> {
    axum::Json(json!({ "policy": plane.policy().map(|p| p.to_toml()) }))
}

/// `PUT /v1/trust`: the body is a trust policy (TOML, as `fleetctl keys trust-policy`
/// writes it). Validated, kept in DATA_DIR/trust.toml, used from the next request on.
pub(crate) async fn put_trust(
    State(plane): State<Arc<Plane>>,
    body: String,
) -> Api<axum::Json<Value>> {
    let policy = TrustPolicy::from_toml(&body).map_err(|e| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("trust policy: {e}"),
        )
    })?;
    keep_policy(&plane.data_dir.join("trust.toml"), &policy)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    *plane.trust.write().unwrap_or_else(|p| p.into_inner()) = Some(policy.clone());
    tracing::info!(
        keys = policy.keys.len(),
        threshold = policy.threshold,
        "trust policy replaced"
    );
    Ok(axum::Json(json!({ "policy": policy.to_toml() })))
}
