//! Request and response bodies of the HTTP API that the server and the operator CLI
//! share: `fleetctl serve` answers with these types and `fleetctl` reads them back as
//! the same types, so a renamed or retyped field fails the build, not an operator's
//! command. Here: tokens, rollouts (their status view and list) and the rollback request
//! and its dry-run plan. (Endpoints not listed here still answer JSON built in their
//! handler, read by the CLI as `serde_json::Value`.) Fields are in alphabetical order:
//! the order the answers had when they were built as JSON objects.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::records::{Role, TokenRecord};
use crate::rollout::{Baseline, Kind, State as RolloutState, Strategy};

/// `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Who or what uses it (1–64 characters; shown in the audit log).
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
}

/// The answer to `POST /v1/tokens`: the only time the token itself is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub token: String,
}

/// One entry of `GET /v1/tokens` (never the token or its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_ms: u64,
    pub created_by: String,
}

impl From<&TokenRecord> for TokenInfo {
    fn from(t: &TokenRecord) -> TokenInfo {
        TokenInfo {
            id: t.id.clone(),
            name: t.name.clone(),
            role: t.role,
            created_ms: t.created_ms,
            created_by: t.created_by.clone(),
        }
    }
}

pub use crate::rollout::start::{
    GateOverrides, RollbackMove, RollbackPlan, RollbackRequest, RolloutRequest, Skipped,
};

/// `GET /v1/rollouts/{id}`, and the answer to starting, pausing, resuming or aborting
/// one: the rollout with each device's progress, per-wave counts and the gates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    pub baseline: Baseline,
    pub by: String,
    pub created_ms: u64,
    pub devices: Vec<DeviceProgress>,
    pub devices_active: usize,
    pub devices_total: usize,
    /// Each gate against its threshold (none for a rollback).
    pub gates: Vec<GateView>,
    pub id: String,
    pub kind: Kind,
    pub model: String,
    pub reason: Option<String>,
    pub selector: String,
    pub state: RolloutState,
    pub strategy: Strategy,
    pub updated_ms: u64,
    /// The version rolled out (none: a rollback to each device's previous version).
    pub version: Option<u64>,
    pub waves: Vec<WaveView>,
    /// A shadow rollout's comparison, per board and per device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowView>,
}

/// How a shadow version compares with what the devices serve, from each reached
/// device's newest window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowView {
    pub version: u64,
    pub sample_permille: u16,
    pub boards: Vec<ShadowRow>,
    pub devices: Vec<ShadowRow>,
}

/// One board's or one device's shadow comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowRow {
    /// The board, or the device.
    pub name: String,
    /// Devices with a comparison.
    pub devices: usize,
    pub runs: u64,
    pub shed: u64,
    pub failed: u64,
    pub rows: u64,
    pub agreement: Option<f64>,
    pub mean_abs_error: Option<f64>,
    pub shadow_p95_us: Option<f64>,
    pub served_p95_us: Option<f64>,
    pub latency_ratio: Option<f64>,
    /// The shadow's own monitor's alerts (devices: its subjects; boards: devices alerting).
    pub alerts: Vec<String>,
}

/// One wave of a [`RolloutView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaveView {
    /// Its devices by progress: `waiting`, `pending`, `downloading`, `active`, `failed`.
    pub counts: BTreeMap<String, usize>,
    pub devices: usize,
    pub passed_ms: Option<u64>,
    pub percent: u32,
    pub started_ms: Option<u64>,
    /// 1 for the first.
    pub wave: usize,
    /// Times the engine told its devices that had reported nothing since their
    /// assignment about it again.
    #[serde(default)]
    pub reminded: u32,
}

/// One device of a [`RolloutView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceProgress {
    /// Why it failed (empty otherwise).
    pub detail: String,
    pub device: String,
    pub from: Option<u64>,
    pub generation: Option<u64>,
    pub online: bool,
    /// `waiting`, `pending`, `downloading`, `active` or `failed`.
    pub state: String,
    pub to: u64,
    /// 1 for the first.
    pub wave: usize,
}

/// One health gate of a [`RolloutView`]: its value against its threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateView {
    pub gate: String,
    pub ok: bool,
    pub threshold: Option<f64>,
    pub value: Option<f64>,
}

/// One entry of `GET /v1/rollouts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSummary {
    pub by: String,
    pub created_ms: u64,
    pub devices_active: usize,
    pub devices_total: usize,
    pub id: String,
    pub kind: Kind,
    pub model: String,
    pub reason: Option<String>,
    pub selector: String,
    pub state: RolloutState,
    pub version: Option<u64>,
}

impl From<&RolloutView> for RolloutSummary {
    fn from(v: &RolloutView) -> RolloutSummary {
        RolloutSummary {
            by: v.by.clone(),
            created_ms: v.created_ms,
            devices_active: v.devices_active,
            devices_total: v.devices_total,
            id: v.id.clone(),
            kind: v.kind,
            model: v.model.clone(),
            reason: v.reason.clone(),
            selector: v.selector.clone(),
            state: v.state,
            version: v.version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire form is what the OpenAPI document and older clients read.
    #[test]
    fn token_bodies_keep_their_wire_form() {
        let created = CreatedToken {
            id: "t1".into(),
            name: "ci".into(),
            role: Role::Operator,
            token: "fmt_x".into(),
        };
        assert_eq!(
            serde_json::to_value(&created).expect("json"),
            serde_json::json!({"id": "t1", "name": "ci", "role": "operator", "token": "fmt_x"})
        );
        let info: TokenInfo = serde_json::from_value(serde_json::json!({
            "id": "t1", "name": "ci", "role": "admin", "created_ms": 5, "created_by": "admin"
        }))
        .expect("decodes");
        assert_eq!(info.role, Role::Admin);
        assert!(
            serde_json::from_value::<TokenRequest>(
                serde_json::json!({"name": "a", "role": "viewer", "x": 1})
            )
            .is_err(),
            "unknown fields are refused"
        );
    }

    /// The rollout status view as `fleetctl rollout status` and the demo read it.
    #[test]
    fn rollout_view_keeps_its_wire_form() {
        let wire = serde_json::json!({
            "baseline": { "error_rate": null, "missing_rate": 0.01, "p99_us": 120.0 },
            "by": "admin", "created_ms": 1,
            "devices": [{
                "detail": "", "device": "d1", "from": 1, "generation": 3, "online": true,
                "state": "active", "to": 2, "wave": 1
            }],
            "devices_active": 1, "devices_total": 1,
            "gates": [{ "gate": "activation_failures", "ok": true, "threshold": 0.0, "value": 0.0 }],
            "id": "r1", "kind": "rollout", "model": "claims", "reason": null, "selector": "all",
            "state": "rolled_back",
            "strategy": {
                "auto_rollback": true, "deadline_ms": 1000, "quorum_pct": 100, "soak_ms": 0,
                "waves": [5, 100],
                "gates": {
                    "max_activation_failures": 0, "max_self_test_failures": 0, "max_fallbacks": 0,
                    "max_drift_alerts": 0, "max_missing_rate_increase": 0.05,
                    "max_p99_ratio": 1.5, "max_error_rate_increase": 0.01
                }
            },
            "updated_ms": 2, "version": 2,
            "waves": [{
                "counts": { "active": 1, "downloading": 0, "failed": 0, "pending": 0, "waiting": 0 },
                "devices": 1, "passed_ms": 2, "percent": 100, "reminded": 0, "started_ms": 1,
                "wave": 1
            }]
        });
        let view: RolloutView = serde_json::from_value(wire.clone()).expect("a rollout view");
        assert_eq!(view.state, RolloutState::RolledBack);
        assert_eq!(view.state.as_str(), "rolled_back");
        assert_eq!(serde_json::to_value(&view).expect("json"), wire);
        // A server from before reminders sends its waves without `reminded`.
        let mut older = wire.clone();
        older["waves"][0]
            .as_object_mut()
            .expect("a wave")
            .remove("reminded");
        let older: RolloutView = serde_json::from_value(older).expect("an older view");
        assert_eq!(older.waves[0].reminded, 0);
        let summary = serde_json::to_value(RolloutSummary::from(&view)).expect("json");
        assert_eq!(summary["devices_active"], 1);
        assert_eq!(summary["kind"], "rollout");
        assert!(summary.get("devices").is_none());
    }

    /// `fleetctl rollout start` sends what the server reads; unknown fields are refused.
    #[test]
    fn rollout_request_round_trips_and_refuses_unknown_fields() {
        let wire = serde_json::json!({
            "model": "claims", "version": 3, "to": "board=pi", "waves": null, "canary": 5,
            "soak_s": 60, "quorum_pct": 100, "deadline_s": 1800, "auto_rollback": true,
            "gates": { "max_fallbacks": 1, "max_activation_failures": null,
                "max_self_test_failures": null, "max_drift_alerts": null,
                "max_missing_rate_increase": null, "max_p99_ratio": null,
                "max_error_rate_increase": null }
        });
        let req: RolloutRequest = serde_json::from_value(wire.clone()).expect("a request");
        assert_eq!(req.canary, Some(5));
        assert_eq!(serde_json::to_value(&req).expect("json"), wire);
        let mut bad = wire;
        bad["wave"] = serde_json::json!("10,100");
        let e = serde_json::from_value::<RolloutRequest>(bad).expect_err("unknown field");
        assert!(e.to_string().contains("wave"), "{e}");
    }
}
