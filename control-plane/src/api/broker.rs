//! `GET /v1/broker/mosquitto` (admin): the password and ACL files an external mosquitto
//! needs to enforce the embedded broker's rules for the enrolled fleet
//! (`fleetctl broker acl`).

use std::sync::Arc;

use axum::extract::State;
use serde_json::{Value, json};

use crate::plane::{Plane, random_bytes};
use crate::store::FleetStore;

use super::{Api, ApiError, blocking};

pub(crate) async fn mosquitto(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    blocking(move || {
        let devices: Vec<_> = plane
            .ingest
            .store
            .devices()?
            .into_iter()
            // A revoked device gets no password: it cannot log in to mosquitto either.
            .filter_map(|d| d.live_secret().map(|s| (d.id.clone(), s.to_vec())))
            .collect();
        let (ingest_user, password) = plane.broker_login.clone();
        let mut salt_error = None;
        let passwd = crate::mosquitto::password_file(
            password.as_deref().map(|p| (ingest_user.as_str(), p)),
            &devices,
            || {
                let mut salt = [0u8; 12];
                match random_bytes(12) {
                    Ok(b) => salt.copy_from_slice(&b),
                    Err(e) => salt_error = Some(e),
                }
                salt
            },
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
