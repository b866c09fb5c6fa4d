//! Devices: enrolment, the inventory, each device's messages, commands, drift views and
//! the ingest's counters.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use fleetml_protocol::telemetry::{self, Body, DeviceId};
use rumqttc::QoS;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::records::DeviceRecord;
use crate::store::FleetStore;
use crate::views;

use crate::plane::{Plane, now_ms, random_bytes};

use super::{Api, ApiError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EnrollRequest {
    id: String,
    #[serde(default)]
    board: Option<String>,
    #[serde(default)]
    tags: std::collections::BTreeMap<String, String>,
}

pub(crate) fn parse_id(id: &str) -> Api<DeviceId> {
    DeviceId::new(id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

pub(crate) async fn enroll(
    State(plane): State<Arc<Plane>>,
    axum::Json(req): axum::Json<EnrollRequest>,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let id = parse_id(&req.id)?;
    let secret = random_bytes(telemetry::SECRET_LEN)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let record = DeviceRecord {
        id: id.clone(),
        board: req.board,
        tags: req.tags,
        secret: secret.clone(),
        enrolled_ms: now_ms(),
        revoked_ms: None,
    };
    if !plane.ingest.store.enroll(&record)? {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("device `{id}` is already enrolled"),
        ));
    }
    tracing::info!(device = %id, "enrolled");
    Ok((
        StatusCode::CREATED,
        axum::Json(credentials(&plane, &record)),
    ))
}

/// What a device's `agent.toml` is written from: its id and secret, where to reach the
/// control plane and the broker, the trust policy and the CA to check them against.
fn credentials(plane: &Plane, record: &DeviceRecord) -> Value {
    json!({
        "device_id": record.id,
        "device_secret": hex::encode(&record.secret),
        "control_plane": plane.public_url,
        "mqtt_url": plane.public_mqtt_url,
        "board": record.board,
        "tags": record.tags,
        "trust_policy": plane.device_policy().map(|t| t.to_toml()),
        "tls_ca": match &plane.device_ca {
            crate::tls::DeviceCa::Pem(pem) => Some(pem.as_str()),
            _ => None,
        },
        "tls_ca_system": plane.device_ca == crate::tls::DeviceCa::System,
    })
}

/// `POST /v1/devices/{id}/revoke` (admin): its logins, tokens and messages are refused
/// from now on; a connection it holds is cut at its next packet; it shows offline.
pub(crate) async fn revoke(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    let mut d = enrolled(&plane, &id)?;
    let at = now_ms();
    if d.revoked_ms.is_none() {
        d.revoked_ms = Some(at);
        plane.ingest.store.replace_device(&d)?;
        plane.ingest.store.update_state(&d.id, &mut |st| {
            st.online = false;
            st.offline_since_ms = Some(at);
        })?;
        tracing::warn!(device = %d.id, "device revoked");
    }
    Ok(axum::Json(
        json!({ "device_id": d.id, "revoked_ms": d.revoked_ms }),
    ))
}

/// `POST /v1/devices/{id}/rotate` (admin): a new secret (the old one is refused at
/// once, a revocation lifted); the answer is what enrolment answers, for a new
/// `agent.toml`. Messages still in the device's outbox were sealed with the old secret
/// and are refused.
pub(crate) async fn rotate(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    let mut d = enrolled(&plane, &id)?;
    d.secret = random_bytes(telemetry::SECRET_LEN)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    d.revoked_ms = None;
    plane.ingest.store.replace_device(&d)?;
    tracing::warn!(device = %d.id, "device secret rotated");
    Ok(axum::Json(credentials(&plane, &d)))
}

pub(crate) async fn list_devices(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    let store = &plane.ingest.store;
    let out = crate::store::with_brief_states(store, store.devices()?)?
        .iter()
        .map(|(d, state)| views::device_summary(d, state))
        .collect();
    Ok(axum::Json(Value::Array(out)))
}

/// The enrolled device `id`, or 400 (bad id) / 404 (not enrolled).
pub(crate) fn enrolled(plane: &Plane, id: &str) -> Api<DeviceRecord> {
    let id = parse_id(id)?;
    plane.ingest.store.device(&id)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no device `{id}` is enrolled"),
        )
    })
}

pub(crate) async fn show_device(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    let d = enrolled(&plane, &id)?;
    let (store, id) = (&plane.ingest.store, &d.id);
    let state = store.state(id)?.unwrap_or_default();
    // The most recent messages: events, alerts and acknowledgements among them.
    let recent = store.messages(id, state.last_seq.saturating_sub(99), 100)?;
    let mut detail = views::device_detail(&d, &state, &recent);
    detail["assignment"] = match plane.assignments.assignment(id)? {
        Some(a) => json!({
            "generation": a.generation,
            "updated_ms": a.updated_ms,
            "models": a.models.iter().map(|(name, m)| json!({
                "name": name, "version": m.version, "digest": m.digest.to_string(), "rollout": m.rollout,
            })).collect::<Vec<_>>(),
        }),
        None => Value::Null,
    };
    Ok(axum::Json(detail))
}

#[derive(Debug, Deserialize)]
pub(crate) struct Page {
    #[serde(default)]
    from: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

pub(crate) fn default_limit() -> usize {
    1000
}

pub(crate) async fn device_messages(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
    Query(page): Query<Page>,
) -> Api<axum::Json<Value>> {
    let id = parse_id(&id)?;
    let list = plane
        .ingest
        .store
        .messages(&id, page.from, page.limit.min(10_000))?;
    Ok(axum::Json(Value::Array(
        list.iter().map(views::message_summary).collect(),
    )))
}

pub(crate) async fn send_command(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
    axum::Json(command): axum::Json<telemetry::CommandKind>,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let d = enrolled(&plane, &id)?;
    let command_id = send(&plane, &d, command).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({ "command": command_id })),
    ))
}

/// Seals `command` for device `d` with sequence number `seq`: its id, topic and bytes.
pub(crate) fn seal_command(
    d: &DeviceRecord,
    seq: u64,
    command: telemetry::CommandKind,
) -> (String, String, Vec<u8>) {
    let command_id = format!("{}-{seq}", d.id);
    let (topic, bytes) = telemetry::seal(
        &d.id,
        seq,
        now_ms(),
        Body::Command(telemetry::Command {
            id: command_id.clone(),
            command,
        }),
        &d.secret,
    );
    (command_id, topic, bytes)
}

/// Seals `command` for device `d` and publishes it on its `cmd` topic; returns its id.
pub(crate) async fn send(
    plane: &Plane,
    d: &DeviceRecord,
    command: telemetry::CommandKind,
) -> Api<String> {
    let seq = plane.ingest.store.next_command_seq(&d.id)?;
    let (command_id, topic, bytes) = seal_command(d, seq, command);
    match publish_within(plane, topic, bytes).await {
        Ok(Ok(())) => Ok(command_id),
        Ok(Err(e)) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("broker: {e}"),
        )),
        Err(Stalled) => {
            metrics::counter!(UNSENT).increment(1);
            Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the broker took no command for {} s (it is down, or too busy to \
                     acknowledge); command {command_id} may not have been sent: check the \
                     broker and send it again",
                    COMMAND_STALL.as_secs()
                ),
            ))
        }
    }
}

/// How long one command may wait for room in the commands session's queue. Room
/// frees as the session sends, which it stops doing while it is disconnected or while
/// about 100 commands wait for the broker's acknowledgement; waiting on such a broker
/// would hold the request (and the rollout engine) until it came back.
pub(crate) const COMMAND_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// Counter: commands not sent because the broker took none for [`COMMAND_STALL`].
const UNSENT: &str = "fleetml_control_commands_unsent_total";

/// The commands session did not take a command within [`COMMAND_STALL`].
struct Stalled;

/// Hands one command to the commands session, waiting at most [`COMMAND_STALL`].
async fn publish_within(
    plane: &Plane,
    topic: String,
    bytes: Vec<u8>,
) -> Result<Result<(), rumqttc::ClientError>, Stalled> {
    tokio::time::timeout(
        COMMAND_STALL,
        plane.client.publish(topic, QoS::AtLeastOnce, false, bytes),
    )
    .await
    .map_err(|_| Stalled)
}

/// [`send`] to many devices, their sequence numbers made durable with one flush (one
/// per device took about a millisecond each: ten seconds for a rollout wave of 10,000
/// devices, found with `fleetctl sim`). A device the broker could not be given the
/// command for is logged and skipped; once the broker takes none for
/// [`COMMAND_STALL`], the rest are counted in `fleetml_control_commands_unsent_total`
/// and not sent (they pull their assignment when they reconnect, at their next poll,
/// or when the engine reminds them). Returns how many were published.
pub(crate) async fn send_all(
    plane: &Plane,
    devices: &[DeviceRecord],
    command: &telemetry::CommandKind,
) -> Api<usize> {
    let ids: Vec<DeviceId> = devices.iter().map(|d| d.id.clone()).collect();
    let seqs = plane.ingest.store.next_command_seqs(&ids)?;
    let mut sent = 0;
    for (i, (d, seq)) in devices.iter().zip(seqs).enumerate() {
        let (_, topic, bytes) = seal_command(d, seq, command.clone());
        match publish_within(plane, topic, bytes).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(e)) => tracing::warn!(device = %d.id, error = %e, "could not send a command"),
            Err(Stalled) => {
                let unsent = devices.len() - i;
                metrics::counter!(UNSENT).increment(unsent as u64);
                tracing::warn!(
                    unsent,
                    "the broker took no command for {} s; {unsent} devices were not told \
                     now and pull their assignment when they reconnect, at their next \
                     poll, or when the rollout reminds them",
                    COMMAND_STALL.as_secs()
                );
                break;
            }
        }
    }
    Ok(sent)
}

#[derive(Debug, Deserialize)]
pub(crate) struct DriftQuery {
    model: Option<String>,
    device: Option<String>,
}

pub(crate) async fn drift(
    State(plane): State<Arc<Plane>>,
    Query(q): Query<DriftQuery>,
) -> Api<axum::Json<Value>> {
    let store = &plane.ingest.store;
    let mut states = Vec::new();
    for d in store.devices()? {
        if q.device
            .as_deref()
            .is_some_and(|want| want != d.id.as_str())
        {
            continue;
        }
        if let Some(s) = store.state(&d.id)? {
            states.push((d.id.clone(), s));
        }
    }
    Ok(axum::Json(Value::Array(views::drift_rows(
        &states,
        q.model.as_deref(),
    ))))
}

pub(crate) async fn ingest_counters(State(plane): State<Arc<Plane>>) -> axum::Json<Value> {
    let mut v = plane.ingest.counters.to_json();
    v["replica"] = plane.leader.replica.clone().into();
    v["leader"] = plane.leader.leads().into();
    axum::Json(v)
}

/// Largest bundle `POST /v1/models` accepts.
pub const MAX_BUNDLE: usize = 4 << 30;
