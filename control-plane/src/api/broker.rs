//! `GET /v1/broker/mosquitto` and `GET /v1/broker/nats` (admin): what an external
//! mosquitto (password and ACL files) or NATS cluster (an `authorization` block) needs
//! to enforce the embedded broker's rules for the enrolled fleet (`fleetctl broker acl`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use fleetml_protocol::telemetry::DeviceId;

use crate::plane::{Plane, random_bytes};
use crate::store::FleetStore;

use super::{Api, ApiError, blocking};

/// Every enrolled device that may log in, with its secret. A revoked device gets no
/// password: it cannot log in to the external broker either.
fn enrolled(plane: &Plane) -> Result<Vec<(DeviceId, Vec<u8>)>, ApiError> {
    Ok(plane
        .ingest
        .store
        .devices()?
        .into_iter()
        .filter_map(|d| d.live_secret().map(|s| (d.id.clone(), s.to_vec())))
        .collect())
}

/// Random salts of `N` bytes for the password hashes; the first failure to draw one is
/// kept in `error` (the caller answers 500 then, writing nothing).
fn salts<const N: usize>(error: &mut Option<anyhow::Error>) -> impl FnMut() -> [u8; N] + '_ {
    move || {
        let mut salt = [0u8; N];
        match random_bytes(N) {
            Ok(b) => salt.copy_from_slice(&b),
            Err(e) => *error = error.take().or(Some(e)),
        }
        salt
    }
}

pub(crate) async fn mosquitto(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    blocking(move || {
        let devices = enrolled(&plane)?;
        let (ingest_user, password) = plane.broker_login.clone();
        let mut salt_error = None;
        let passwd = crate::mosquitto::password_file(
            password.as_deref().map(|p| (ingest_user.as_str(), p)),
            &devices,
            salts(&mut salt_error),
        );
        if let Some(e) = salt_error {
            return Err(ApiError::internal(e));
        }
        Ok(axum::Json(json!({
            "acl": crate::mosquitto::acl_file(&ingest_user),
            "passwd": passwd,
            "devices": devices.len(),
            "ingest_user": ingest_user,
            "ingest_password_known": password.is_some(),
        })))
    })
    .await
}

/// The `authorization` block for a NATS cluster. Refused (409, naming the flag) when the
/// control plane does not know a password it would have to write: a block without the
/// control plane's own users would lock it out of the cluster.
pub(crate) async fn nats(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    blocking(move || {
        let devices = enrolled(&plane)?;
        let (mqtt_user, mqtt_password) = plane.broker_login.clone();
        let Some(mqtt_password) = mqtt_password else {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "the control plane logs in to the broker as {mqtt_user:?} without a \
                     password, and a NATS authorization block without it would lock the \
                     control plane out: start `fleetctl serve` with --mqtt-url \
                     mqtt://USER:PASSWORD@HOST:PORT"
                ),
            ));
        };
        let queue = match &plane.queue_login {
            None => None,
            Some(login) => Some(login.clone().ok_or_else(|| {
                ApiError(
                    StatusCode::CONFLICT,
                    "the ingest queue logs in to NATS without a user, and a NATS \
                     authorization block without it would lock the ingest out: give \
                     --ingest-queue nats://USER:PASSWORD@HOST:PORT"
                        .to_string(),
                )
            })?),
        };
        let mut salt_error = None;
        let conf = crate::nats_auth::authorization(
            crate::nats_auth::Login {
                user: &mqtt_user,
                password: &mqtt_password,
            },
            queue
                .as_ref()
                .map(|(user, password)| crate::nats_auth::Login { user, password }),
            &devices,
            salts(&mut salt_error),
        )
        .map_err(|e| ApiError(StatusCode::CONFLICT, e))?;
        if let Some(e) = salt_error {
            return Err(ApiError::internal(e));
        }
        Ok(axum::Json(json!({
            "conf": conf,
            "devices": devices.len(),
            "ingest_user": mqtt_user,
            "queue_user": queue.map(|(user, _)| user),
        })))
    })
    .await
}
