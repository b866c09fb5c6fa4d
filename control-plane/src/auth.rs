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
//! **Audit log.** Every mutating call of an authenticated caller (refused ones included)
//! appends an entry — who, role, what, target (cut at [`MAX_AUDIT_FIELD`] bytes), when,
//! outcome — to tree `audit`, keyed by a sequence number. Calls without a valid token
//! are counted and written as one entry per interval ([`Audit::flush_unauthenticated`]),
//! so that nobody can fill the disk by being refused. Each
//! entry holds the hash of the one before and its own HMAC-SHA256 over both, keyed with
//! the [`AuditKey`] kept in a file outside the database (`DATA_DIR/audit.key` or
//! `--audit-key`), so an edited, inserted or deleted entry breaks the chain even for
//! someone who can write the database and recompute hashes ([`verify`],
//! `fleetctl audit verify`).

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

/// The key of the audit chain: entries are MACed with it, so rewriting the log takes
/// the key as well as the database. It lives in a file of its own (mode 0600, TOML:
/// `key`, 64 hex digits, and `keyed_from`, the first entry it covers), never in the
/// database; keep a copy where the database is not (a backup of the database alone
/// cannot be rewritten undetectably).
#[derive(Clone)]
pub struct AuditKey {
    key: ring::hmac::Key,
    /// Entries before this one were written before the log was keyed (a log from an
    /// older version): they are checked with the plain SHA-256 chain.
    keyed_from: u64,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("keyed_from", &self.keyed_from)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditKeyFile {
    key: String,
    keyed_from: u64,
}

impl AuditKey {
    pub fn new(secret: &[u8; 32], keyed_from: u64) -> AuditKey {
        AuditKey {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            keyed_from: keyed_from.max(1),
        }
    }

    /// A key for another purpose derived from this one (HMAC of `label`): replicas that
    /// share the audit key (docs/DEPLOY.md) derive the same keys, and none of them can
    /// be turned back into the audit key.
    pub fn derive(&self, label: &str) -> ring::hmac::Key {
        let tag = ring::hmac::sign(&self.key, label.as_bytes());
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, tag.as_ref())
    }

    /// The first entry the key covers.
    pub fn keyed_from(&self) -> u64 {
        self.keyed_from
    }

    /// Reads the key file; refuses one others may read, naming the `chmod` that fixes it.
    pub fn read(path: &std::path::Path) -> anyhow::Result<AuditKey> {
        use anyhow::Context as _;
        use std::os::unix::fs::PermissionsExt;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the audit key {}", path.display()))?;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "the audit key {} is mode {mode:o}: others may read it; run: chmod 600 {}",
                path.display(),
                path.display()
            );
        }
        let file: AuditKeyFile = toml::from_str(&text)
            .with_context(|| format!("{} is not an audit key file", path.display()))?;
        let secret: [u8; 32] = hex::decode(file.key.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("{}: `key` must be 64 hex digits", path.display()))?;
        Ok(AuditKey::new(&secret, file.keyed_from))
    }

    /// Reads the key at `path`, or makes one (mode 0600) on first start. A log that
    /// already has entries (written by a version without keys) is keyed from its next
    /// entry on.
    pub fn open(path: &std::path::Path, audit: &dyn AuditStore) -> anyhow::Result<AuditKey> {
        if path.exists() {
            return AuditKey::read(path);
        }
        let mut last = 0;
        loop {
            let page = audit.audit_entries(last + 1, 10_000)?;
            match page.last() {
                Some(e) => last = e.seq,
                None => break,
            }
        }
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
        let text = format!(
            "# The key of the fleetml audit chain. Keep it mode 0600, and a copy where the\n\
             # database is not: without it `fleetctl audit verify` cannot tell a rewritten log.\n{}",
            toml::to_string(&AuditKeyFile {
                key: hex::encode(secret),
                keyed_from: last + 1,
            })?
        );
        crate::output::create_new(path, 0o600, text.as_bytes())?;
        Ok(AuditKey::new(&secret, last + 1))
    }

    /// The hash an entry should have: HMAC-SHA256 under this key of `prev` followed by
    /// the entry's JSON with `hash` empty (plain SHA-256 before `keyed_from`).
    pub fn entry_hash(&self, e: &AuditEntry) -> String {
        let mut unsigned = e.clone();
        unsigned.hash = String::new();
        let bytes = serde_json::to_vec(&unsigned).unwrap_or_default();
        let mut input = e.prev.as_bytes().to_vec();
        input.extend_from_slice(&bytes);
        if e.seq < self.keyed_from {
            sha256(&input).to_string()
        } else {
            hex::encode(ring::hmac::sign(&self.key, &input).as_ref())
        }
    }
}

pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Checks a chain from its first entry: sequence numbers without gaps, each `prev` the
/// hash of the entry before, each MAC recomputed. Returns the head hash.
pub fn verify(key: &AuditKey, entries: &[AuditEntry]) -> Result<String, String> {
    let mut chain = Chain::new(key.clone());
    chain.feed(entries)?;
    Ok(chain.head().to_string())
}

/// The hash chain checked page by page ([`verify`] over entries read in pages: the log
/// may be larger than one answer), and whether an anchor hash kept elsewhere is in it.
#[derive(Debug, Clone)]
pub struct Chain {
    key: AuditKey,
    prev: String,
    /// Entries checked so far.
    pub checked: u64,
    anchors: Vec<String>,
    seen: Vec<bool>,
}

impl Chain {
    pub fn new(key: AuditKey) -> Chain {
        Chain::anchored(key, Vec::new())
    }

    /// A chain that must also contain an entry hashing to each of `anchors` (heads a
    /// former `audit verify` printed): a log rewritten or cut before them fails.
    pub fn anchored(key: AuditKey, anchors: Vec<String>) -> Chain {
        let seen = vec![false; anchors.len()];
        Chain {
            key,
            prev: GENESIS.to_string(),
            checked: 0,
            anchors,
            seen,
        }
    }

    /// Checks the next entries, which must follow those fed before.
    pub fn feed(&mut self, entries: &[AuditEntry]) -> Result<(), String> {
        for e in entries {
            let expected = self.checked + 1;
            if e.seq != expected {
                return Err(format!(
                    "entry {expected} is missing (found entry {} in its place): entries were deleted",
                    e.seq
                ));
            }
            if e.prev != self.prev {
                return Err(format!(
                    "entry {} does not follow entry {}: its `prev` hash is {}, entry {} hashes to {}",
                    e.seq,
                    e.seq - 1,
                    e.prev,
                    e.seq - 1,
                    self.prev
                ));
            }
            let actual = self.key.entry_hash(e);
            if actual != e.hash {
                return Err(format!(
                    "entry {} was changed after it was written: it hashes to {actual}, recorded {}",
                    e.seq, e.hash
                ));
            }
            for (anchor, seen) in self.anchors.iter().zip(self.seen.iter_mut()) {
                *seen |= *anchor == e.hash;
            }
            self.prev = e.hash.clone();
            self.checked = e.seq;
        }
        Ok(())
    }

    /// Checks the whole log, fetched `page` entries at a time by `fetch(from, limit)`,
    /// and that every anchor is in it: the chain, or what is wrong with the log; `Err`
    /// when a page could not be fetched.
    pub fn walk<E>(
        mut self,
        page: usize,
        mut fetch: impl FnMut(u64, usize) -> Result<Vec<AuditEntry>, E>,
    ) -> Result<Result<Chain, String>, E> {
        loop {
            let entries = fetch(self.checked + 1, page)?;
            if let Err(e) = self.feed(&entries) {
                return Ok(Err(e));
            }
            if entries.len() < page {
                break;
            }
        }
        Ok(self.finish().map(|()| self))
    }

    /// The hash of the last entry checked (the genesis value before any).
    pub fn head(&self) -> &str {
        &self.prev
    }

    /// After the last page: every anchor was found.
    pub fn finish(&self) -> Result<(), String> {
        match self
            .anchors
            .iter()
            .zip(&self.seen)
            .find(|(_, seen)| !**seen)
        {
            Some((anchor, _)) => Err(format!(
                "no entry hashes to the anchored head {anchor}: the log was rewritten or cut before it"
            )),
            None => Ok(()),
        }
    }
}

/// The audit log, kept by an [`AuditStore`]: this side builds the hash chain.
#[derive(Clone)]
pub struct Audit {
    store: Arc<dyn AuditStore>,
    key: AuditKey,
    /// Calls refused for want of a valid token since the last tally entry.
    unauthenticated: Arc<std::sync::Mutex<Tally>>,
}

/// Longest `action` or `target` an audit entry keeps; the rest is cut, and the cut said.
pub const MAX_AUDIT_FIELD: usize = 256;

/// `text` cut to [`MAX_AUDIT_FIELD`] bytes (on a character boundary), saying how long it
/// was.
fn capped(text: String) -> String {
    if text.len() <= MAX_AUDIT_FIELD {
        return text;
    }
    let mut end = MAX_AUDIT_FIELD;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// Unauthenticated calls refused between two tally entries.
#[derive(Debug, Default)]
struct Tally {
    count: u64,
    first_ms: u64,
    last_ms: u64,
    /// The first one's action (capped).
    example: String,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

impl Audit {
    pub fn new(store: Arc<dyn AuditStore>, key: AuditKey) -> Audit {
        Audit {
            store,
            key,
            unauthenticated: Arc::new(std::sync::Mutex::new(Tally::default())),
        }
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
        let (action, target) = (capped(action), capped(target));
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
            entry.hash = self.key.entry_hash(&entry);
            entry
        })
    }

    /// Counts a call refused for want of a valid token, instead of an entry of its own:
    /// anyone can send those, and one entry each would let them fill the disk.
    /// [`Audit::flush_unauthenticated`] writes them as one entry.
    pub fn refused_unauthenticated(&self, at_ms: u64, action: &str) {
        let mut t = self
            .unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if t.count == 0 {
            t.first_ms = at_ms;
            t.example = capped(action.to_string());
        }
        t.count += 1;
        t.last_ms = at_ms;
    }

    /// One entry for the unauthenticated calls refused since the last one (none if there
    /// were none): `anonymous`, `refused unauthenticated calls`, how many, when, and the
    /// first one's action; outcome 401. `fleetctl serve` writes it every
    /// `--audit-interval` and when it stops.
    pub fn flush_unauthenticated(&self) -> Result<Option<AuditEntry>, StoreError> {
        let t = std::mem::take(
            &mut *self
                .unauthenticated
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if t.count == 0 {
            return Ok(None);
        }
        let target = format!(
            "{} call(s) from {} to {} (ms since the epoch), the first: {}",
            t.count, t.first_ms, t.last_ms, t.example
        );
        self.append(
            t.last_ms,
            "anonymous".into(),
            "none".into(),
            "refused unauthenticated calls".into(),
            target,
            401,
        )
        .map(Some)
    }

    /// Up to `limit` entries from sequence number `from` on. An entry that no longer
    /// decodes is returned as written, with its hash emptied, so `verify` names it.
    pub fn entries(&self, from: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.store.audit_entries(from, limit)
    }

    /// Walks the whole log page by page with the key: the number of entries and the head
    /// hash, or what is wrong. `anchors` are heads kept elsewhere that must be in it.
    pub fn verify_all(&self, anchors: Vec<String>) -> Result<Result<Chain, String>, StoreError> {
        Chain::anchored(self.key.clone(), anchors)
            .walk(10_000, |from, limit| self.store.audit_entries(from, limit))
    }

    pub fn key(&self) -> &AuditKey {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AuditKey {
        AuditKey::new(&[7; 32], 1)
    }

    fn chain() -> (tempfile::TempDir, Audit) {
        let dir = tempfile::tempdir().expect("test");
        let store = crate::store::sled::SledStore::open(dir.path()).expect("test");
        let audit = Audit::new(Arc::new(store), key());
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
        assert!(verify(&key(), &entries).is_ok());
        let mut edited = entries.clone();
        edited[2].outcome = 403;
        assert!(
            verify(&key(), &edited)
                .expect_err("test")
                .contains("entry 3 was changed")
        );
        let mut deleted = entries.clone();
        deleted.remove(1);
        assert!(
            verify(&key(), &deleted)
                .expect_err("test")
                .contains("entry 2 is missing")
        );
        let mut rehashed = entries;
        rehashed[1].who = "someone else".into();
        rehashed[1].hash = key().entry_hash(&rehashed[1]);
        assert!(
            verify(&key(), &rehashed)
                .expect_err("test")
                .contains("entry 3 does not follow entry 2")
        );
    }

    /// Someone who can write the database but has not the key: an entry edited and the
    /// chain recomputed with plain SHA-256 (which the unkeyed chain accepted), or with
    /// another key, is named; a log from before keys checks as SHA-256 up to
    /// `keyed_from`, and the key file is made 0600 and read back.
    #[test]
    fn a_rewrite_without_the_key_is_detected_and_old_logs_are_keyed_from_their_next_entry() {
        let (dir, audit) = chain();
        let entries = audit.entries(1, 100).expect("test");
        let mut forged = entries.clone();
        forged[1].outcome = 200;
        let mut prev = forged[0].hash.clone();
        for e in &mut forged[1..] {
            e.prev = prev;
            e.hash = AuditKey::new(&[7; 32], u64::MAX).entry_hash(e);
            prev = e.hash.clone();
        }
        assert!(
            verify(&key(), &forged)
                .expect_err("forged")
                .contains("entry 2 was changed")
        );
        let other = AuditKey::new(&[8; 32], 1);
        assert!(verify(&other, &entries).is_err());

        let store = crate::store::sled::SledStore::open(&dir.path().join("old")).expect("test");
        let legacy = Audit::new(Arc::new(store.clone()), AuditKey::new(&[0; 32], u64::MAX));
        for i in 0..3 {
            legacy
                .append(i, "w".into(), "admin".into(), "a".into(), "t".into(), 200)
                .expect("test");
        }
        let path = dir.path().join("audit.key");
        let opened = AuditKey::open(&path, &store).expect("made");
        assert_eq!(opened.keyed_from(), 4);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("test").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let upgraded = Audit::new(Arc::new(store), AuditKey::read(&path).expect("read"));
        upgraded
            .append(9, "w".into(), "admin".into(), "a".into(), "t".into(), 200)
            .expect("test");
        let chain = upgraded
            .verify_all(Vec::new())
            .expect("test")
            .expect("intact");
        assert_eq!(chain.checked, 4);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("test");
        assert!(
            AuditKey::read(&path)
                .expect_err("readable by others")
                .to_string()
                .contains("chmod 600")
        );
    }

    /// A 60 KB path costs the log 256 bytes and says how long it was; a character cut in
    /// the middle is not split.
    #[test]
    fn long_actions_and_targets_are_cut_and_say_so() {
        let (_dir, audit) = chain();
        let long = format!("/v1/{}", "é".repeat(30_000));
        let e = audit
            .append(
                9,
                "token:t1 (ci)".into(),
                "operator".into(),
                format!("POST {long}"),
                long.clone(),
                404,
            )
            .expect("test");
        assert!(e.target.len() < MAX_AUDIT_FIELD + 32, "{}", e.target.len());
        assert!(e.target.ends_with(&format!("… ({} bytes)", long.len())));
        assert!(e.action.len() < MAX_AUDIT_FIELD + 32);
        assert!(verify(&key(), &audit.entries(1, 100).expect("test")).is_ok());
    }

    /// Refused unauthenticated calls become one entry per flush, with their count, and
    /// nothing when there were none.
    #[test]
    fn unauthenticated_refusals_are_one_entry_per_interval() {
        let (_dir, audit) = chain();
        for i in 0..500 {
            audit.refused_unauthenticated(1_000 + i, &format!("POST /v1/{}", "x".repeat(60_000)));
        }
        let e = audit
            .flush_unauthenticated()
            .expect("test")
            .expect("an entry");
        assert_eq!((e.who.as_str(), e.outcome), ("anonymous", 401));
        assert!(
            e.target.starts_with("500 call(s) from 1000 to 1499"),
            "{}",
            e.target
        );
        assert!(e.target.len() < MAX_AUDIT_FIELD + 32);
        assert!(audit.flush_unauthenticated().expect("test").is_none());
        let entries = audit.entries(1, 100).expect("test");
        assert_eq!(entries.len(), 5);
        assert!(verify(&key(), &entries).is_ok());
    }

    /// Page by page or all at once, the chain checks the same; an anchor must be in it.
    #[test]
    fn the_chain_checks_across_pages_and_finds_its_anchors() {
        let (_dir, audit) = chain();
        let entries = audit.entries(1, 100).expect("test");
        let whole = verify(&key(), &entries).expect("intact");
        let mut paged = Chain::anchored(key(), vec![entries[1].hash.clone()]);
        for page in entries.chunks(3) {
            paged.feed(page).expect("intact");
        }
        assert_eq!((paged.head(), paged.checked), (whole.as_str(), 4));
        assert!(paged.finish().is_ok());
        let mut missing = Chain::anchored(key(), vec!["0".repeat(64)]);
        missing.feed(&entries).expect("intact");
        assert!(
            missing
                .finish()
                .expect_err("no such head")
                .contains("rewritten or cut")
        );
        // An entry deleted at a page boundary is still found.
        let mut cut = Chain::new(key());
        cut.feed(&entries[..2]).expect("intact");
        assert!(
            cut.feed(&entries[3..])
                .expect_err("deleted")
                .contains("entry 3 is missing")
        );
    }
}
