//! Who may call the API, and the audit log of what they did.
//!
//! **Tokens.** Operators authenticate with bearer tokens that carry a role: `viewer`
//! (read), `operator` (push models, rollouts, rollbacks, commands) or `admin` (tokens,
//! trust policy, enrollment). Only the SHA-256 of a token is stored (tree `tokens`, keyed
//! by that hash); the token itself is shown once, when it is created. The bootstrap
//! admin token in `DATA_DIR/admin.token` is registered the same way on every start.
//! Devices authenticate with a token derived from their enrollment secret
//! ([`fleetml_protocol::assignment::http_token`]) and may read only their own
//! assignment and the bundles it names.
//!
//! **Audit log.** Every mutating call (and every refused one) appends an entry — who,
//! role, what, target, when, outcome — to tree `audit`, keyed by a sequence number. Each
//! entry holds the hash of the one before and its own hash over both, so an edited,
//! inserted or deleted entry breaks the chain ([`verify`], `fleetctl audit verify`).

use std::sync::Arc;

use fleetml_protocol::crypto::sha256;
use fleetml_protocol::telemetry::DeviceId;

pub use crate::records::{AuditEntry, Role, TokenRecord};
use crate::store::{AuditStore, StoreError, TokenStore};

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Operator(TokenRecord),
    Device(DeviceId),
}

impl Principal {
    pub fn who(&self) -> String {
        match self {
            Principal::Operator(t) => format!("token:{} ({})", t.id, t.name),
            Principal::Device(d) => format!("device:{d}"),
        }
    }

    pub fn role(&self) -> String {
        match self {
            Principal::Operator(t) => t.role.as_str().into(),
            Principal::Device(_) => "device".into(),
        }
    }
}

fn hash_hex(token: &str) -> String {
    sha256(token.as_bytes()).to_string()
}

/// Operator tokens, kept by a [`TokenStore`].
#[derive(Clone)]
pub struct Tokens {
    store: Arc<dyn TokenStore>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

impl Tokens {
    pub fn new(store: Arc<dyn TokenStore>) -> Tokens {
        Tokens { store }
    }

    /// Registers `token` under `id` (the bootstrap admin token); any earlier record with
    /// this id (an older bootstrap token) goes.
    pub fn register(
        &self,
        id: &str,
        name: &str,
        role: Role,
        token: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.store.put_token(&TokenRecord {
            id: id.into(),
            name: name.into(),
            role,
            hash: hash_hex(token),
            created_ms: now_ms,
            created_by: "fleetctl serve".into(),
        })
    }

    /// Creates a token; returns its record and the token, shown only now.
    pub fn create(
        &self,
        name: &str,
        role: Role,
        by: &str,
        now_ms: u64,
        random: &[u8],
    ) -> Result<(TokenRecord, String), StoreError> {
        let token = format!("fmt_{}", hex::encode(random));
        let hash = hash_hex(&token);
        let record = TokenRecord {
            id: format!("t{}", &hash[..12]),
            name: name.into(),
            role,
            hash,
            created_ms: now_ms,
            created_by: by.into(),
        };
        self.store.put_token(&record)?;
        Ok((record, token))
    }

    pub fn find(&self, token: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.store.token(&hash_hex(token))
    }

    pub fn list(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.store.tokens()
    }

    /// Removes the token with this id; `false` when there is none.
    pub fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        self.store.remove_token(id)
    }
}

/// The hash an entry should have.
pub fn entry_hash(e: &AuditEntry) -> String {
    let mut unsigned = e.clone();
    unsigned.hash = String::new();
    let bytes = serde_json::to_vec(&unsigned).unwrap_or_default();
    let mut input = e.prev.as_bytes().to_vec();
    input.extend_from_slice(&bytes);
    sha256(&input).to_string()
}

pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Checks a chain from its first entry: sequence numbers without gaps, each `prev` the
/// hash of the entry before, each hash recomputed. Returns the head hash.
pub fn verify(entries: &[AuditEntry]) -> Result<String, String> {
    let mut prev = GENESIS.to_string();
    for (i, e) in entries.iter().enumerate() {
        let expected = i as u64 + 1;
        if e.seq != expected {
            return Err(format!(
                "entry {expected} is missing (found entry {} in its place): entries were deleted",
                e.seq
            ));
        }
        if e.prev != prev {
            return Err(format!(
                "entry {} does not follow entry {}: its `prev` hash is {}, entry {} hashes to {prev}",
                e.seq,
                e.seq - 1,
                e.prev,
                e.seq - 1
            ));
        }
        let actual = entry_hash(e);
        if actual != e.hash {
            return Err(format!(
                "entry {} was changed after it was written: it hashes to {actual}, recorded {}",
                e.seq, e.hash
            ));
        }
        prev = e.hash.clone();
    }
    Ok(prev)
}

/// The audit log, kept by an [`AuditStore`]: this side builds the hash chain.
#[derive(Clone)]
pub struct Audit {
    store: Arc<dyn AuditStore>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

impl Audit {
    pub fn new(store: Arc<dyn AuditStore>) -> Audit {
        Audit { store }
    }

    /// Appends an entry, chained to the one before, and makes it durable.
    pub fn append(
        &self,
        at_ms: u64,
        who: String,
        role: String,
        action: String,
        target: String,
        outcome: u16,
    ) -> Result<AuditEntry, StoreError> {
        self.store.append_audit(&mut |last| {
            let (seq, prev) = match last {
                Some(last) => (last.seq + 1, last.hash.clone()),
                None => (1, GENESIS.to_string()),
            };
            let mut entry = AuditEntry {
                seq,
                at_ms,
                who: who.clone(),
                role: role.clone(),
                action: action.clone(),
                target: target.clone(),
                outcome,
                prev,
                hash: String::new(),
            };
            entry.hash = entry_hash(&entry);
            entry
        })
    }

    /// Up to `limit` entries from sequence number `from` on. An entry that no longer
    /// decodes is returned as written, with its hash emptied, so `verify` names it.
    pub fn entries(&self, from: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.store.audit_entries(from, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> (tempfile::TempDir, Audit) {
        let dir = tempfile::tempdir().expect("test");
        let store = crate::store::sled::SledStore::open(dir.path()).expect("test");
        let audit = Audit::new(Arc::new(store));
        for i in 0..4 {
            audit
                .append(
                    i,
                    "token:t1 (ci)".into(),
                    "operator".into(),
                    "POST /v1/models".into(),
                    "/v1/models".into(),
                    201,
                )
                .expect("test");
        }
        (dir, audit)
    }

    #[test]
    fn an_intact_chain_verifies_and_any_edit_or_deletion_is_named() {
        let (_dir, audit) = chain();
        let entries = audit.entries(1, 100).expect("test");
        assert!(verify(&entries).is_ok());
        let mut edited = entries.clone();
        edited[2].outcome = 403;
        assert!(
            verify(&edited)
                .expect_err("test")
                .contains("entry 3 was changed")
        );
        let mut deleted = entries.clone();
        deleted.remove(1);
        assert!(
            verify(&deleted)
                .expect_err("test")
                .contains("entry 2 is missing")
        );
        let mut rehashed = entries;
        rehashed[1].who = "someone else".into();
        rehashed[1].hash = entry_hash(&rehashed[1]);
        assert!(
            verify(&rehashed)
                .expect_err("test")
                .contains("entry 3 does not follow entry 2")
        );
    }
}
