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

use serde::{Deserialize, Serialize};

use fleetml_protocol::crypto::sha256;
use fleetml_protocol::telemetry::DeviceId;

use crate::ingest::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("role `{s}` is not one of viewer, operator, admin")),
        }
    }
}

/// A stored operator token (its hash, never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the token.
    pub hash: String,
    pub created_ms: u64,
    pub created_by: String,
}

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

/// Operator tokens in sled.
#[derive(Debug, Clone)]
pub struct Tokens {
    tree: sled::Tree,
}

impl Tokens {
    pub fn open(db: &sled::Db) -> Result<Tokens, StoreError> {
        Ok(Tokens {
            tree: db.open_tree("tokens")?,
        })
    }

    /// Registers `token` under `id` (the bootstrap admin token).
    pub fn register(
        &self,
        id: &str,
        name: &str,
        role: Role,
        token: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let record = TokenRecord {
            id: id.into(),
            name: name.into(),
            role,
            hash: hash_hex(token),
            created_ms: now_ms,
            created_by: "fleetctl serve".into(),
        };
        // Any earlier record with this id (an older bootstrap token) goes.
        for r in self.list()? {
            if r.id == id && r.hash != record.hash {
                self.tree.remove(r.hash.as_bytes())?;
            }
        }
        self.put(&record)
    }

    fn put(&self, r: &TokenRecord) -> Result<(), StoreError> {
        self.tree.insert(
            r.hash.as_bytes(),
            serde_json::to_vec(r).map_err(|e| StoreError(e.to_string()))?,
        )?;
        self.tree.flush()?;
        Ok(())
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
        self.put(&record)?;
        Ok((record, token))
    }

    pub fn find(&self, token: &str) -> Result<Option<TokenRecord>, StoreError> {
        match self.tree.get(hash_hex(token).as_bytes())? {
            Some(b) => Ok(serde_json::from_slice(&b).ok()),
            None => Ok(None),
        }
    }

    pub fn list(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut out: Vec<TokenRecord> = Vec::new();
        for item in self.tree.iter() {
            let (_, v) = item?;
            if let Ok(r) = serde_json::from_slice(&v) {
                out.push(r);
            }
        }
        out.sort_by_key(|r| r.created_ms);
        Ok(out)
    }

    /// Removes the token with this id; `false` when there is none.
    pub fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        for r in self.list()? {
            if r.id == id {
                self.tree.remove(r.hash.as_bytes())?;
                self.tree.flush()?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at_ms: u64,
    pub who: String,
    pub role: String,
    /// `METHOD /route/{template}`.
    pub action: String,
    /// The path called.
    pub target: String,
    /// HTTP status of the answer.
    pub outcome: u16,
    /// Hex SHA-256 of the previous entry (zeros for the first).
    pub prev: String,
    /// Hex SHA-256 over `prev` and every field above.
    pub hash: String,
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

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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

/// The audit log in sled.
#[derive(Debug)]
pub struct Audit {
    tree: sled::Tree,
    append: std::sync::Mutex<()>,
}

impl Audit {
    pub fn open(db: &sled::Db) -> Result<Audit, StoreError> {
        Ok(Audit {
            tree: db.open_tree("audit")?,
            append: std::sync::Mutex::new(()),
        })
    }

    /// Appends an entry and makes it durable.
    pub fn append(
        &self,
        at_ms: u64,
        who: String,
        role: String,
        action: String,
        target: String,
        outcome: u16,
    ) -> Result<AuditEntry, StoreError> {
        let _guard = self.append.lock().unwrap_or_else(|p| p.into_inner());
        let (seq, prev) = match self.tree.last()? {
            Some((_, v)) => {
                let last: AuditEntry =
                    serde_json::from_slice(&v).map_err(|e| StoreError(e.to_string()))?;
                (last.seq + 1, last.hash)
            }
            None => (1, GENESIS.to_string()),
        };
        let mut entry = AuditEntry {
            seq,
            at_ms,
            who,
            role,
            action,
            target,
            outcome,
            prev,
            hash: String::new(),
        };
        entry.hash = entry_hash(&entry);
        self.tree.insert(
            seq.to_be_bytes(),
            serde_json::to_vec(&entry).map_err(|e| StoreError(e.to_string()))?,
        )?;
        self.tree.flush()?;
        Ok(entry)
    }

    /// Up to `limit` entries from sequence number `from` on. An entry that no longer
    /// decodes is returned as written, with its hash emptied, so `verify` names it.
    pub fn entries(&self, from: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree.range(from.to_be_bytes()..).take(limit) {
            let (k, v) = item?;
            let seq = k
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or_default();
            out.push(serde_json::from_slice(&v).unwrap_or(AuditEntry {
                seq,
                at_ms: 0,
                who: String::from_utf8_lossy(&v).chars().take(200).collect(),
                role: String::new(),
                action: "(unreadable entry)".into(),
                target: String::new(),
                outcome: 0,
                prev: String::new(),
                hash: String::new(),
            }));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> (tempfile::TempDir, Audit) {
        let dir = tempfile::tempdir().expect("test");
        let db = sled::open(dir.path()).expect("test");
        let audit = Audit::open(&db).expect("test");
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
