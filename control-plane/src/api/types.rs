//! Request and response bodies of the HTTP API that the server and the operator CLI
//! share: `fleetctl serve` answers with these types and `fleetctl` reads them back as
//! the same types, so a renamed or retyped field fails the build, not an operator's
//! command. Here: tokens, and the rollback request and its dry-run plan. (Endpoints not
//! listed here still answer JSON built in their handler, read by the CLI as
//! `serde_json::Value`.)

use serde::{Deserialize, Serialize};

use crate::records::{Role, TokenRecord};

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

/// `POST /v1/rollbacks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub model: String,
    /// The version to return to (default: each device's previous one).
    #[serde(default)]
    pub to: Option<u64>,
    /// A device selector (default: all).
    #[serde(default)]
    pub devices: Option<String>,
    /// Only say what would move.
    #[serde(default)]
    pub dry_run: bool,
}

/// The answer to a dry run of `POST /v1/rollbacks`: what would move, and what not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackPlan {
    pub model: String,
    pub devices: Vec<RollbackMove>,
    pub skipped: Vec<Skipped>,
}

/// One device a rollback moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackMove {
    pub device: String,
    pub from: Option<u64>,
    pub to: u64,
}

/// A selected device a rollback leaves alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub device: String,
    pub reason: String,
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
}
