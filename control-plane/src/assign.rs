//! What each device should run: assignment records (kept by the store's
//! [`AssignmentStore`](crate::store::AssignmentStore)), how a change moves one, and the
//! control plane's assignment key that signs them.
//!
//! A record holds the device's current generation, its models (each pinned to a bundle
//! digest) and, per model, what it had before, which is where `fleetctl rollback` returns
//! to. Every change bumps the generation. A device fetches its record signed afresh with
//! an expiry of `now + ttl`; the generation only moves when the contents do.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use fleetml_protocol::assignment::{AssignedModel, Assignment, FORMAT, SignedAssignment};
use fleetml_protocol::crypto::SigningKey;
use fleetml_protocol::telemetry::DeviceId;
use serde::{Deserialize, Serialize};

/// One device's assignment as the control plane keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentRecord {
    pub generation: u64,
    pub models: BTreeMap<String, AssignedModel>,
    /// Per model, what was assigned before the current one.
    #[serde(default)]
    pub previous: BTreeMap<String, AssignedModel>,
    pub updated_ms: u64,
}

impl AssignmentRecord {
    /// The signed assignment a device fetches at `now_ms`.
    pub fn signed(
        &self,
        device: &DeviceId,
        key: &SigningKey,
        now_ms: u64,
        ttl_ms: u64,
    ) -> SignedAssignment {
        Assignment {
            format: FORMAT,
            device: device.clone(),
            generation: self.generation,
            issued_ms: now_ms,
            expires_ms: now_ms.saturating_add(ttl_ms),
            models: self.models.clone(),
        }
        .sign(key)
    }
}

/// Points `model` of `record` at `to` as a new generation, unless it already is.
pub(crate) fn point(record: &mut AssignmentRecord, model: &str, to: &AssignedModel, now_ms: u64) {
    let same = record
        .models
        .get(model)
        .is_some_and(|m| m.digest == to.digest && m.rollout == to.rollout && m.shadow == to.shadow);
    if !same {
        if let Some(old) = record.models.insert(model.to_string(), to.clone())
            && old.digest != to.digest
        {
            record.previous.insert(model.to_string(), old);
        }
        record.generation += 1;
        record.updated_ms = now_ms;
    }
}

/// Reads `DIR/assignment.key` (PKCS#8 ed25519), creating it (mode 0600) on first start.
pub fn assignment_key(dir: &Path) -> anyhow::Result<SigningKey> {
    let path = dir.join("assignment.key");
    match std::fs::read(&path) {
        Ok(der) => {
            SigningKey::from_pkcs8(&der).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (key, der) = SigningKey::generate()
                .map_err(|e| anyhow::anyhow!("generating the assignment key: {e}"))?;
            crate::output::create_new(&path, 0o600, &der)?;
            tracing::info!(key = %key.id(), "created the assignment key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
