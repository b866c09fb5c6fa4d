//! Signed assignments: what one device should run, with TUF-style freshness.
//!
//! An [`Assignment`] names a device, the models it should run (each pinned to a bundle
//! digest), a **generation** that grows with every change for that device, and an
//! expiry. The control plane signs its canonical CBOR with its assignment key; devices
//! trust that key through the `assignment_keys` of their trust policy.
//!
//! [`SignedAssignment::check`] is what a device runs on every assignment it receives,
//! before acting on it. It refuses one
//! - not signed by a trusted assignment key (or whose signature does not verify),
//! - for another device,
//! - whose generation is lower than the one the device holds (a replayed old
//!   assignment: the rollback attack), or equal to it with different contents,
//! - that has expired (the freeze attack: an attacker withholding newer assignments).
//!
//! An intended rollback is a *new* assignment with a higher generation that points at
//! the older bundle, so it is never confused with an attack. The control plane re-signs
//! the current generation with a fresh expiry on every fetch; the same generation with
//! the same models is therefore "unchanged", not a replay.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crypto::{KEY_ID_LEN, KeyId, SIGNATURE_LEN, Sha256, SigningKey};
use crate::telemetry::DeviceId;
use crate::trust::TrustPolicy;

/// Version of the assignment format.
pub const FORMAT: u16 = 1;
/// Largest signed assignment [`SignedAssignment::from_cbor`] decodes.
pub const MAX_ASSIGNMENT: usize = 64 * 1024;
/// Most models one assignment may name.
pub const MAX_MODELS: usize = 64;

/// What one device should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    pub format: u16,
    pub device: DeviceId,
    /// Grows by one with every change of this device's assignment; never reused.
    pub generation: u64,
    pub issued_ms: u64,
    /// The device refuses the assignment from this time on.
    pub expires_ms: u64,
    /// Model name → the bundle it should run.
    pub models: BTreeMap<String, AssignedModel>,
}

/// One model of an assignment, pinned to the bytes of its bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignedModel {
    pub version: u64,
    /// SHA-256 of the whole `.fmb` file.
    pub digest: Sha256,
    /// Its length in bytes.
    pub size: u64,
    /// The rollout (or rollback) that set it, for reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
    /// A candidate version to run beside it on live requests, never answering
    /// (a shadow deployment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowModel>,
}

/// A shadow version: verified, self-tested and run like any version, on a sampled share
/// of the requests its model answers, after the answer; its outputs are only compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowModel {
    pub version: u64,
    /// SHA-256 of the whole `.fmb` file.
    pub digest: Sha256,
    pub size: u64,
    /// Requests run in shadow per thousand answered (1..=1000).
    pub sample_permille: u16,
    /// The shadow rollout that set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<String>,
}

impl ShadowModel {
    /// A shadow sample as operators write it — a percentage (`25%`) or a fraction
    /// (`0.25`), 0.1 % to 100 % — in requests per thousand.
    pub fn parse_sample(text: &str) -> Result<u16, String> {
        let t = text.trim();
        let share = match t.strip_suffix('%') {
            Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
            None => t.parse::<f64>(),
        }
        .map_err(|_| format!("`{text}` is not a share like 25% or 0.25"))?;
        let permille = (share * 1000.0).round();
        if !(1.0..=1000.0).contains(&permille) {
            return Err(format!("`{text}`: a shadow sample is 0.1% to 100%"));
        }
        Ok(permille as u16)
    }
}

/// An assignment as it travels: its canonical CBOR and one signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedAssignment {
    #[serde(with = "serde_bytes")]
    pub assignment: Vec<u8>,
    /// The [`KeyId`] of the signing key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AssignmentError {
    #[error("assignment is {0} bytes, more than the limit of {MAX_ASSIGNMENT}")]
    TooLarge(usize),
    #[error("assignment is not valid CBOR for this format: {0}")]
    Malformed(String),
    #[error("assignment format {0} is not supported (this release reads {FORMAT})")]
    Format(u16),
    #[error("assignment names {0} models, more than the limit of {MAX_MODELS}")]
    TooManyModels(usize),
    #[error(
        "assignment is signed by key {0}, which the trust policy does not list under assignment_keys"
    )]
    UnknownKey(KeyId),
    #[error("assignment signature by key {0} does not verify")]
    BadSignature(KeyId),
    #[error("assignment is for device {given}, not {expected}")]
    WrongDevice { given: String, expected: String },
    #[error(
        "assignment generation {given} is older than generation {held} already accepted (replayed assignment)"
    )]
    Replayed { given: u64, held: u64 },
    #[error(
        "assignment generation {0} is the one already accepted but names other models (conflicting assignment)"
    )]
    Conflicting(u64),
    #[error("assignment generation {generation} expired at {expires_ms} ms, now is {now_ms} ms")]
    Expired {
        generation: u64,
        expires_ms: u64,
        now_ms: u64,
    },
}

/// What a device holds: the last accepted assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held<'a> {
    pub generation: u64,
    pub models: &'a BTreeMap<String, AssignedModel>,
}

/// What [`SignedAssignment::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// A newer generation: act on it.
    Newer(Assignment),
    /// The generation already held, re-signed: nothing to change.
    Unchanged(Assignment),
}

impl Assignment {
    /// The canonical CBOR that is signed.
    pub fn to_cbor(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("an assignment serializes to CBOR")
    }

    pub fn sign(&self, key: &SigningKey) -> SignedAssignment {
        let assignment = self.to_cbor();
        let signature = key.sign(&assignment).to_vec();
        SignedAssignment {
            assignment,
            key: key.id().0.to_vec(),
            signature,
        }
    }
}

impl SignedAssignment {
    pub fn to_cbor(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("a signed assignment serializes to CBOR")
    }

    /// Decodes the envelope; nothing in it is trusted yet.
    pub fn from_cbor(bytes: &[u8]) -> Result<SignedAssignment, AssignmentError> {
        if bytes.len() > MAX_ASSIGNMENT {
            return Err(AssignmentError::TooLarge(bytes.len()));
        }
        serde_cbor::from_slice(bytes).map_err(|e| AssignmentError::Malformed(e.to_string()))
    }

    /// The id of the key that signed.
    pub fn key_id(&self) -> Result<KeyId, AssignmentError> {
        let bytes: [u8; KEY_ID_LEN] = self.key.as_slice().try_into().map_err(|_| {
            AssignmentError::Malformed(format!("key id of {} bytes", self.key.len()))
        })?;
        Ok(KeyId(bytes))
    }

    /// Verifies the signature against the policy's assignment keys and decodes the
    /// assignment; does not look at device, generation or expiry.
    pub fn verify(&self, policy: &TrustPolicy) -> Result<Assignment, AssignmentError> {
        let id = self.key_id()?;
        let key = policy
            .assignment_keys
            .iter()
            .find(|k| k.public.id() == id)
            .ok_or(AssignmentError::UnknownKey(id))?;
        if self.signature.len() != SIGNATURE_LEN
            || !key.public.verify(&self.assignment, &self.signature)
        {
            return Err(AssignmentError::BadSignature(id));
        }
        let assignment: Assignment = serde_cbor::from_slice(&self.assignment)
            .map_err(|e| AssignmentError::Malformed(e.to_string()))?;
        if assignment.format != FORMAT {
            return Err(AssignmentError::Format(assignment.format));
        }
        if assignment.models.len() > MAX_MODELS {
            return Err(AssignmentError::TooManyModels(assignment.models.len()));
        }
        if let Some((name, s)) = assignment.models.iter().find_map(|(n, m)| {
            m.shadow
                .as_ref()
                .filter(|s| !(1..=1000).contains(&s.sample_permille))
                .map(|s| (n, s))
        }) {
            return Err(AssignmentError::Malformed(format!(
                "model `{name}`: a shadow sample of {} per thousand (1 to 1000)",
                s.sample_permille
            )));
        }
        Ok(assignment)
    }

    /// Everything a device checks before acting on an assignment, in order: signature,
    /// device, generation against `held`, expiry against `now_ms`.
    pub fn check(
        &self,
        policy: &TrustPolicy,
        device: &DeviceId,
        held: Option<Held<'_>>,
        now_ms: u64,
    ) -> Result<Checked, AssignmentError> {
        let a = self.verify(policy)?;
        if &a.device != device {
            return Err(AssignmentError::WrongDevice {
                given: a.device.as_str().to_string(),
                expected: device.as_str().to_string(),
            });
        }
        let unchanged = match held {
            Some(h) if a.generation < h.generation => {
                return Err(AssignmentError::Replayed {
                    given: a.generation,
                    held: h.generation,
                });
            }
            Some(h) if a.generation == h.generation => {
                if &a.models != h.models {
                    return Err(AssignmentError::Conflicting(a.generation));
                }
                true
            }
            _ => false,
        };
        if now_ms >= a.expires_ms {
            return Err(AssignmentError::Expired {
                generation: a.generation,
                expires_ms: a.expires_ms,
                now_ms,
            });
        }
        Ok(if unchanged {
            Checked::Unchanged(a)
        } else {
            Checked::Newer(a)
        })
    }
}

/// The HTTP credential of a device: `device:<id>:<HMAC-SHA256(secret, "fleetml/v1 http")>`,
/// sent as a bearer token. Like the MQTT password it is derived, so the API never sees
/// the secret that authenticates messages.
pub fn http_token(device: &DeviceId, secret: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, b"fleetml/v1 http");
    format!("device:{}:{}", device.as_str(), hex::encode(tag.as_ref()))
}

/// Splits a device bearer token into its device id and key, if it is one.
pub fn parse_http_token(token: &str) -> Option<(DeviceId, &str)> {
    let rest = token.strip_prefix("device:")?;
    let (id, key) = rest.rsplit_once(':')?;
    Some((DeviceId::new(id).ok()?, key))
}
