//! The trust policy: which public keys may sign bundles and how many must agree (k-of-n).
//!
//! ```toml
//! threshold = 2
//!
//! [[keys]]
//! name = "release-1"
//! public = "ed25519:…64 hex digits…"
//!
//! [[assignment_keys]]        # the control plane's assignment key (devices only)
//! name = "control-plane"
//! public = "ed25519:…"
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crypto::{KeyId, PublicKey};

/// The most keys a policy may list.
pub const MAX_KEYS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustPolicy {
    /// How many distinct trusted keys must have signed.
    pub threshold: u32,
    pub keys: Vec<TrustedKey>,
    /// Keys whose signature on an assignment (what a device should run) a device
    /// accepts: the control plane's assignment key. Any one suffices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assignment_keys: Vec<TrustedKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    /// A human name for the key; only shown in messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub public: PublicKey,
    /// The key id, written for readers; when present it must match the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustPolicyError {
    #[error("trust policy is not valid TOML for this format: {0}")]
    Syntax(String),
    #[error("trust policy lists no keys")]
    NoKeys,
    #[error("trust policy lists {0} keys, more than the limit of {MAX_KEYS}")]
    TooManyKeys(usize),
    #[error("trust policy threshold must be at least 1")]
    ZeroThreshold,
    #[error("trust policy threshold {threshold} is more than its {keys} distinct keys")]
    ThresholdTooHigh { threshold: u32, keys: usize },
    #[error("trust policy lists key {0} twice")]
    DuplicateKey(KeyId),
    #[error("trust policy key `{given}` does not match its public key, whose id is {actual}")]
    IdMismatch { given: String, actual: KeyId },
}

impl TrustPolicy {
    /// Builds and validates a policy.
    pub fn new(threshold: u32, keys: Vec<TrustedKey>) -> Result<Self, TrustPolicyError> {
        let policy = TrustPolicy {
            threshold,
            keys,
            assignment_keys: Vec::new(),
        };
        policy.validate()?;
        Ok(policy)
    }

    pub fn from_toml(text: &str) -> Result<Self, TrustPolicyError> {
        let policy: TrustPolicy =
            toml::from_str(text).map_err(|e| TrustPolicyError::Syntax(e.message().to_string()))?;
        policy.validate()?;
        Ok(policy)
    }

    pub fn to_toml(&self) -> String {
        // A policy is plain strings and integers; TOML serialization cannot fail.
        toml::to_string(self).expect("trust policy serializes to TOML")
    }

    pub fn validate(&self) -> Result<(), TrustPolicyError> {
        if self.keys.is_empty() {
            return Err(TrustPolicyError::NoKeys);
        }
        if self.keys.len() > MAX_KEYS {
            return Err(TrustPolicyError::TooManyKeys(self.keys.len()));
        }
        if self.threshold == 0 {
            return Err(TrustPolicyError::ZeroThreshold);
        }
        let mut seen = BTreeMap::new();
        for key in &self.keys {
            let id = key.public.id();
            if let Some(given) = &key.id
                && given != &id.to_string()
            {
                return Err(TrustPolicyError::IdMismatch {
                    given: given.clone(),
                    actual: id,
                });
            }
            if seen.insert(id, ()).is_some() {
                return Err(TrustPolicyError::DuplicateKey(id));
            }
        }
        if self.assignment_keys.len() > MAX_KEYS {
            return Err(TrustPolicyError::TooManyKeys(self.assignment_keys.len()));
        }
        let mut seen = BTreeMap::new();
        for key in &self.assignment_keys {
            if seen.insert(key.public.id(), ()).is_some() {
                return Err(TrustPolicyError::DuplicateKey(key.public.id()));
            }
        }
        if self.threshold as usize > self.keys.len() {
            return Err(TrustPolicyError::ThresholdTooHigh {
                threshold: self.threshold,
                keys: self.keys.len(),
            });
        }
        Ok(())
    }

    /// The trusted key with this id, if any.
    pub fn key(&self, id: &KeyId) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| &k.public.id() == id)
    }
}
