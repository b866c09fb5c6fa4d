//! The store in PostgreSQL: `fleetctl serve --database postgres://…` (or
//! `FLEETML_DATABASE_URL`), for a control plane that outlives its host and for several
//! replicas on one database.
//!
//! - **Schema**: the versioned migrations in `control-plane/migrations`, embedded in the
//!   binary (refinery) and applied at every start under an advisory lock, so replicas
//!   starting together migrate once. A database whose schema is newer than the binary is
//!   refused, naming both versions: an older binary must not write a schema it does not
//!   know.
//! - **Transactions**: one per store method; a read-change-write (a device's state, an
//!   assignment, a job, the audit log's tail) locks its row (`SELECT … FOR UPDATE`, or a
//!   transaction-scoped advisory lock for the audit log), so replicas serialize on it.
//! - **Connections**: a pool (r2d2) of the synchronous rust-postgres clients. The store
//!   traits are synchronous; the client drives its own small runtime, which must not run
//!   inside a tokio worker, so a call made from async code leaves the worker for the
//!   blocking section ([`tokio::task::block_in_place`]) or, on a current-thread runtime,
//!   runs on a scoped thread.
//! - **TLS** when the URL says `sslmode=require`: rustls on ring, checking the server's
//!   certificate against `PGSSLROOTCERT` or the system's CAs (as `data import` does).
//!
//! Numbers the records carry as `u64` (sequence numbers, versions, times) are `bigint`
//! here; a value above `i64::MAX` is refused as a conflict rather than wrapped.

use ::postgres::{Client, NoTls, Transaction};
use fleetml_protocol::assignment::AssignedModel;
use fleetml_protocol::telemetry::{DeviceId, Envelope, Received};
use r2d2_postgres::PostgresConnectionManager;

use super::{
    AlertStore, AssignmentStore, AuditStore, CaptureStore, DatasetStore, FleetStore, JobStore,
    PolicyStore, RegistryStore, RolloutStore, StoreError, TokenStore, off_runtime, stage,
};
use crate::assign::AssignmentRecord;
use crate::jobs::spec::Job;
use crate::records::{
    AlertRecord, AuditEntry, Brief, CaptureRecord, DatasetManifest, DeviceRecord, DeviceState,
    ModelRecord, Policy, PolicyState, Silence, TokenRecord,
};
use crate::rollout::Rollout;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The advisory lock key migrations run under (any constant shared by every replica).
const MIGRATION_LOCK: i64 = 0x666c_6565_746d_6c01;
/// The advisory lock key audit appends serialize on (within their transaction).
const AUDIT_LOCK: i64 = 0x666c_6565_746d_6c02;
/// Connections a control plane opens to PostgreSQL at most.
const POOL_SIZE: u32 = 8;
/// The stored states of the devices named in `$1`.
const STATES_NAMED: &str = "SELECT device, state FROM device_state WHERE device = ANY($1)";

/// The newest schema version this binary knows.
pub fn schema_version() -> u32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

impl From<::postgres::Error> for StoreError {
    fn from(e: ::postgres::Error) -> Self {
        use ::postgres::error::SqlState;
        match e.code() {
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::Conflict(e.to_string()),
            _ => StoreError::Unavailable(format!("postgres: {e}")),
        }
    }
}

impl From<r2d2::Error> for StoreError {
    fn from(e: r2d2::Error) -> Self {
        StoreError::Unavailable(format!("no PostgreSQL connection: {e}"))
    }
}

/// The two kinds of pool: plain, or TLS through rustls.
#[derive(Clone)]
enum Pool {
    Plain(r2d2::Pool<PostgresConnectionManager<NoTls>>),
    Tls(r2d2::Pool<PostgresConnectionManager<tokio_postgres_rustls::MakeRustlsConnect>>),
}

type Connection = Box<dyn std::ops::DerefMut<Target = Client>>;

impl Pool {
    fn get(&self) -> Result<Connection, StoreError> {
        Ok(match self {
            Pool::Plain(p) => Box::new(p.get()?),
            Pool::Tls(p) => Box::new(p.get()?),
        })
    }
}

/// How the pool is sized and how long a caller waits for a connection. A connection is
/// not tested with a query of its own at each checkout: that round trip was 6 % of the
/// control plane's CPU during a rollout to 10,000 devices (a profile with `perf`), and
/// doubled the wait of every small read. After PostgreSQL closed the connections (a
/// restart), each pooled one fails its next call once — up to [`POOL_SIZE`] calls
/// answered 503, or ingest batches that come again — and is then replaced.
fn builder<M: r2d2::ManageConnection>() -> r2d2::Builder<M> {
    r2d2::Pool::builder()
        .max_size(POOL_SIZE)
        .min_idle(Some(1))
        .test_on_check_out(false)
        .connection_timeout(std::time::Duration::from_secs(10))
}

/// The pool, closed off the async runtime: closing a client blocks on its own runtime,
/// which must not happen on a tokio worker (the last store is often dropped on one when
/// the control plane shuts down).
struct Shared(Option<Pool>);

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(pool) = self.0.take() {
            let _ = std::thread::spawn(move || drop(pool)).join();
        }
    }
}

impl std::ops::Deref for Shared {
    type Target = Pool;
    fn deref(&self) -> &Pool {
        self.0
            .as_ref()
            .expect("the pool lives until the store is dropped")
    }
}

/// The store in PostgreSQL. Cloning shares the pool.
#[derive(Clone)]
pub struct PgStore {
    pool: std::sync::Arc<Shared>,
    /// `postgres://USER@HOST:PORT/DB`: the URL without its password, for messages.
    describe: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.describe)
            .finish_non_exhaustive()
    }
}

/// `v` as a `bigint`, or a conflict naming `what`.
fn big(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| {
        StoreError::Conflict(format!(
            "{what} {v} is beyond what PostgreSQL's bigint holds (2^63 - 1)"
        ))
    })
}

/// A stored `bigint` as the `u64` it was written from.
fn unbig(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::corrupt(what, format_args!("negative value {v}")))
}

fn json<T: serde::Serialize>(what: &str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::corrupt(what, e))
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::corrupt(what, e))
}

fn cbor<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_cbor::from_slice(bytes).map_err(|e| StoreError::corrupt(what, e))
}

/// Stores `record` (JSON) as row `id` of `table` — one of the tables of records with an
/// id and a creation time: rollouts, datasets, jobs — replacing the row there. The
/// parameter is json: rollouts keep it so (migration 5), the other tables' jsonb
/// columns take it by PostgreSQL's assignment cast.
fn put_record(
    c: &mut impl ::postgres::GenericClient,
    table: &str,
    id: &str,
    created_ms: u64,
    record: &str,
) -> Result<(), StoreError> {
    c.execute(
        format!(
            "INSERT INTO {table} (id, created_ms, record) VALUES ($1, $2, $3::text::json) \
             ON CONFLICT (id) DO UPDATE SET created_ms = EXCLUDED.created_ms, record = EXCLUDED.record"
        )
        .as_str(),
        &[&id, &big(created_ms, "a creation time")?, &record],
    )?;
    Ok(())
}

/// Row `id` of `table` (see [`put_record`]), decoded; `what` names it in an error.
fn get_record<T: serde::de::DeserializeOwned>(
    c: &mut Client,
    table: &str,
    id: &str,
    what: &str,
) -> Result<Option<T>, StoreError> {
    c.query_opt(
        format!("SELECT record::text FROM {table} WHERE id = $1").as_str(),
        &[&id],
    )?
    .map(|r| from_json(&format!("{what} {id}"), r.get(0)))
    .transpose()
}

/// Every row of `table` (see [`put_record`]), oldest first, decoded.
fn all_records<T: serde::de::DeserializeOwned>(
    c: &mut Client,
    table: &str,
    what: &str,
) -> Result<Vec<T>, StoreError> {
    c.query(
        format!("SELECT id, record::text FROM {table} ORDER BY created_ms, id").as_str(),
        &[],
    )?
    .iter()
    .map(|r| from_json(&format!("{what} {}", r.get::<_, &str>(0)), r.get(1)))
    .collect()
}

/// The rollout states that are final ([`crate::rollout::State::is_final`]), by their
/// name in a record.
const FINAL_ROLLOUT_STATES: [crate::rollout::State; 3] = [
    crate::rollout::State::Completed,
    crate::rollout::State::Aborted,
    crate::rollout::State::RolledBack,
];

impl PgStore {
    /// Connects to `url`, applies the migrations this binary has that the database
    /// lacks, and refuses a database whose schema is newer than the binary's.
    pub fn open(url: &str) -> anyhow::Result<PgStore> {
        use anyhow::Context;
        let describe = crate::pg::describe(url)?;
        let config: ::postgres::Config = url
            .parse()
            .context("--database: not a PostgreSQL connection string")?;
        let pool = match crate::pg::tls_for(&config, None)? {
            Some(tls) => Pool::Tls(
                builder()
                    .build(PostgresConnectionManager::new(config, tls))
                    .with_context(|| format!("connecting to {describe} over TLS"))?,
            ),
            None => Pool::Plain(
                builder()
                    .build(PostgresConnectionManager::new(config, NoTls))
                    .with_context(|| format!("connecting to {describe}"))?,
            ),
        };
        let store = PgStore {
            pool: std::sync::Arc::new(Shared(Some(pool))),
            describe,
        };
        off_runtime(|| store.migrate())?;
        Ok(store)
    }

    /// `postgres://USER@HOST:PORT/DB` (no password).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Applies the embedded migrations under the migration lock; refuses a newer schema.
    fn migrate(&self) -> anyhow::Result<()> {
        let mut c = self.pool.get()?;
        c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
        let outcome = self.migrate_locked(&mut c);
        let _ = c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
        outcome
    }

    fn migrate_locked(&self, c: &mut Client) -> anyhow::Result<()> {
        let ours = i32::try_from(schema_version()).unwrap_or(i32::MAX);
        let history = c
            .query_one(
                "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
                &[],
            )?
            .get::<_, bool>(0);
        if history {
            let theirs: Option<i32> = c
                .query_one("SELECT max(version) FROM refinery_schema_history", &[])?
                .get(0);
            if let Some(v) = theirs.filter(|v| *v > ours) {
                anyhow::bail!(
                    "{}: the database's schema is version {v}, newer than this fleetctl's \
                     (version {ours}); a newer fleetctl wrote it. Run that version (or newer), \
                     or restore a backup taken before the upgrade",
                    self.describe
                );
            }
        }
        let report = embedded::migrations::runner()
            .set_grouped(false)
            .set_abort_divergent(true)
            .run(c)
            .map_err(|e| {
                anyhow::anyhow!("{}: applying the schema migrations: {e}", self.describe)
            })?;
        for m in report.applied_migrations() {
            tracing::info!(
                database = %self.describe,
                version = m.version(),
                name = m.name(),
                "applied a schema migration"
            );
        }
        Ok(())
    }

    /// Runs `f` on a pooled connection, off the async runtime's worker (see the module
    /// documentation).
    fn run<R: Send>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<R, StoreError> + Send,
    ) -> Result<R, StoreError> {
        off_runtime(|| {
            let mut c = self.pool.get()?;
            f(&mut c)
        })
    }

    /// The `(device, CBOR record)` rows `sql` selects for the devices `ids` (its `$1`),
    /// decoded; rows whose key is not a device id are left out. `what` names a record
    /// in an error ("the state of").
    fn named<T: serde::de::DeserializeOwned + Send>(
        &self,
        sql: &str,
        ids: &[DeviceId],
        what: &str,
    ) -> Result<Vec<(DeviceId, T)>, StoreError> {
        let ids: Vec<&str> = ids.iter().map(DeviceId::as_str).collect();
        self.run(|c| {
            let mut out = Vec::new();
            for r in c.query(sql, &[&ids])? {
                let device: &str = r.get(0);
                if let Ok(id) = DeviceId::new(device) {
                    out.push((id, cbor(&format!("{what} {device}"), r.get(1))?));
                }
            }
            Ok(out)
        })
    }

    /// Runs `f` in one transaction, committed when it returns `Ok`.
    fn tx<R: Send>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, StoreError> + Send,
    ) -> Result<R, StoreError> {
        self.run(|c| {
            let mut t = c.transaction()?;
            let out = f(&mut t)?;
            t.commit()?;
            Ok(out)
        })
    }

    /// [`FleetStore::insert`] in transaction `t`.
    fn insert_in(
        t: &mut Transaction<'_>,
        envelope: &Envelope,
        seq: i64,
        bytes: &[u8],
        now: i64,
    ) -> Result<(bool, Option<u64>), StoreError> {
        let device = envelope.device.as_str();
        let (kind, model) = kind_and_model(envelope);
        // The mark is locked before the message is inserted, as the ingest's batches
        // lock it; the row exists (and is locked) before it is read, so concurrent
        // inserts for one device see each other's highest.
        t.execute(
            "INSERT INTO device_high (device, high) VALUES ($1, -1) ON CONFLICT (device) DO NOTHING",
            &[&device],
        )?;
        let before: i64 = t
            .query_one(
                "SELECT high FROM device_high WHERE device = $1 FOR UPDATE",
                &[&device],
            )?
            .get(0);
        let new = t.execute(
            "INSERT INTO messages (device, seq, envelope, kind, model, stored_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (device, seq) DO NOTHING",
            &[&device, &seq, &bytes, &kind, &model, &now],
        )? == 1;
        t.execute(
            "UPDATE device_high SET high = GREATEST(high, $2) WHERE device = $1",
            &[&device, &seq],
        )?;
        Ok((new, u64::try_from(before).ok()))
    }

    /// The highest sequence number and the state of each of `devices` that has both,
    /// read and locked in one statement: in device order, each device's mark before its
    /// state (as the single-message writers lock a device's rows too).
    fn lock_high_and_state(
        t: &mut Transaction<'_>,
        devices: &[&str],
    ) -> Result<std::collections::HashMap<String, (i64, DeviceState)>, StoreError> {
        let mut rows = std::collections::HashMap::with_capacity(devices.len());
        for r in t.query(
            "SELECT h.device, h.high, s.state FROM device_high h JOIN device_state s ON s.device = h.device \
             WHERE h.device = ANY($1) AND s.device = ANY($1) ORDER BY h.device FOR UPDATE",
            &[&devices],
        )? {
            let device: String = r.get(0);
            let state: DeviceState = cbor(&format!("the state of {device}"), r.get(2))?;
            rows.insert(device, (r.get(1), state));
        }
        Ok(rows)
    }

    /// [`FleetStore::update_state`] in transaction `t` (`fresh`: a new state, encoded).
    fn change_state_in(
        t: &mut Transaction<'_>,
        device: &DeviceId,
        fresh: &[u8],
        change: &mut (dyn FnMut(&mut DeviceState) + Send),
    ) -> Result<(), StoreError> {
        t.execute(
            "INSERT INTO device_state (device, state) VALUES ($1, $2) ON CONFLICT (device) DO NOTHING",
            &[&device.as_str(), &fresh],
        )?;
        let row = t.query_one(
            "SELECT state FROM device_state WHERE device = $1 FOR UPDATE",
            &[&device.as_str()],
        )?;
        let mut state: DeviceState = cbor(&format!("the state of {device}"), row.get(0))?;
        change(&mut state);
        t.execute(
            "UPDATE device_state SET state = $2 WHERE device = $1",
            &[&device.as_str(), &serde_cbor::to_vec(&state)?],
        )?;
        Ok(())
    }

    /// Writes `changes` to the assignments of `model` in transaction `t`: reads and locks
    /// each device's record once, applies the changes in order, writes each record once.
    fn assign_in(
        t: &mut Transaction<'_>,
        model: &str,
        changes: &[(DeviceId, AssignedModel)],
        now_ms: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let mut devices: Vec<&str> = changes.iter().map(|(d, _)| d.as_str()).collect();
        devices.sort_unstable();
        devices.dedup();
        // Placeholders first, so that a device without a record is locked too (an empty
        // record decodes as a fresh one).
        t.execute(
            "INSERT INTO assignments (device, record) SELECT d, ''::bytea FROM unnest($1::text[]) AS d \
             ON CONFLICT (device) DO NOTHING",
            &[&devices],
        )?;
        let rows = t.query(
            "SELECT device, record FROM assignments WHERE device = ANY($1) ORDER BY device FOR UPDATE",
            &[&devices],
        )?;
        let mut old: std::collections::HashMap<String, Vec<u8>> = rows
            .into_iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
            .collect();
        let (staged, generations) = stage(model, changes, now_ms, |d| {
            Ok::<_, StoreError>(old.remove(d.as_str()))
        })?;
        Self::write_encoded(
            t,
            "assignments",
            "device",
            "record",
            staged.iter().map(|(d, r)| (d.as_str(), r)),
        )?;
        Ok(generations)
    }

    /// `UPDATE table SET column = …` of each `(key, value)` of `rows`, CBOR-encoded, in
    /// one statement (`table`, `key` and `column` are this file's constants).
    fn write_encoded<'a, T: serde::Serialize + 'a>(
        t: &mut Transaction<'_>,
        table: &str,
        key: &str,
        column: &str,
        rows: impl Iterator<Item = (&'a str, &'a T)>,
    ) -> Result<(), StoreError> {
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (k, v) in rows {
            keys.push(k);
            values.push(serde_cbor::to_vec(v)?);
        }
        t.execute(
            &format!(
                "UPDATE {table} SET {column} = n.v FROM unnest($1::text[], $2::bytea[]) AS n(k, v) \
                 WHERE {table}.{key} = n.k"
            ),
            &[&keys, &values],
        )?;
        Ok(())
    }
}

/// The `kind` and `model` columns of a message.
fn kind_and_model(e: &Envelope) -> (&'static str, Option<&str>) {
    let model = match &e.body {
        fleetml_protocol::telemetry::Body::Window(w) => Some(w.model.as_str()),
        _ => None,
    };
    (e.body.kind(), model)
}

impl FleetStore for PgStore {
    fn enroll(&self, device: &DeviceRecord) -> Result<bool, StoreError> {
        let bytes = serde_cbor::to_vec(device)?;
        self.run(|c| {
            Ok(c.execute(
                "INSERT INTO devices (id, record) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                &[&device.id.as_str(), &bytes],
            )? == 1)
        })
    }

    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.run(|c| {
            c.query_opt("SELECT record FROM devices WHERE id = $1", &[&id.as_str()])?
                .map(|r| cbor(&format!("device {id}"), r.get(0)))
                .transpose()
        })
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.run(|c| {
            c.query("SELECT id, record FROM devices ORDER BY id", &[])?
                .iter()
                .map(|r| cbor(&format!("device {}", r.get::<_, &str>(0)), r.get(1)))
                .collect()
        })
    }

    fn replace_device(&self, device: &DeviceRecord) -> Result<bool, StoreError> {
        let bytes = serde_cbor::to_vec(device)?;
        self.run(|c| {
            Ok(c.execute(
                "UPDATE devices SET record = $2 WHERE id = $1",
                &[&device.id.as_str(), &bytes],
            )? == 1)
        })
    }

    fn insert(&self, envelope: &Received, now_ms: u64) -> Result<(bool, Option<u64>), StoreError> {
        let bytes = envelope.cbor();
        let seq = big(envelope.seq, "sequence number")?;
        let now = big(now_ms, "the time")?;
        self.tx(|t| Self::insert_in(t, envelope, seq, bytes, now))
    }

    fn store_message(
        &self,
        envelope: &Received,
        now_ms: u64,
        change: &mut (dyn FnMut(&mut DeviceState, bool, Option<u64>) + Send),
    ) -> Result<(bool, Option<u64>), StoreError> {
        // The batch's transaction with one message: one path, and one lock order, for a
        // message and the state it changes.
        self.store_messages(
            std::slice::from_ref(envelope),
            now_ms,
            &mut |_, st, new, before| change(st, new, before),
        )?
        .pop()
        .ok_or_else(|| StoreError::corrupt("messages", "a batch of one stored nothing"))
    }

    /// One transaction for the batch, four statements over whole arrays: the rows of
    /// devices that have none made; each device's highest sequence number and state
    /// read and locked once (one join, in device order, each device's mark before its
    /// state); the messages inserted in one statement that returns which were new; the
    /// changes applied in memory in batch order; each device's highest and state written
    /// back in one statement.
    fn store_messages(
        &self,
        envelopes: &[Received],
        now_ms: u64,
        change: &mut crate::store::BatchChange<'_>,
    ) -> Result<Vec<(bool, Option<u64>)>, StoreError> {
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        let now = big(now_ms, "the time")?;
        let mut devices: Vec<&str> = envelopes.iter().map(|e| e.device.as_str()).collect();
        devices.sort_unstable();
        devices.dedup();
        let mut keys = Vec::with_capacity(envelopes.len());
        let mut seqs = Vec::with_capacity(envelopes.len());
        let mut bodies = Vec::with_capacity(envelopes.len());
        let (mut kinds, mut models) = (Vec::new(), Vec::new());
        for e in envelopes {
            keys.push(e.device.as_str());
            seqs.push(big(e.seq, "sequence number")?);
            bodies.push(e.cbor());
            let (kind, model) = kind_and_model(e);
            kinds.push(kind);
            models.push(model);
        }
        let fresh = serde_cbor::to_vec(&DeviceState::default())?;
        self.tx(|t| {
            // Rows for a device's first message, before anything is locked (a row that
            // exists is left alone, unlocked): made in a second pass after the locks,
            // they would be locked out of device order, and two replicas' batches could
            // wait for each other.
            t.execute(
                "WITH h AS (INSERT INTO device_high (device, high) \
                 SELECT d, -1 FROM unnest($1::text[]) AS d ON CONFLICT (device) DO NOTHING) \
                 INSERT INTO device_state (device, state) SELECT d, $2 FROM unnest($1::text[]) AS d \
                 ON CONFLICT (device) DO NOTHING",
                &[&devices, &fresh],
            )?;
            let mut rows = Self::lock_high_and_state(t, &devices)?;
            // A (device, seq) twice in the batch is inserted once: the first is new.
            let mut inserted: std::collections::HashSet<(String, i64)> = t
                .query(
                    "INSERT INTO messages (device, seq, envelope, kind, model, stored_ms) \
                     SELECT d, s, e, k, m, $6 \
                     FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::text[], $5::text[]) AS n(d, s, e, k, m) \
                     ON CONFLICT (device, seq) DO NOTHING RETURNING device, seq",
                    &[&keys, &seqs, &bodies, &kinds, &models, &now],
                )?
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let mut out = Vec::with_capacity(envelopes.len());
            for (i, (e, &seq)) in envelopes.iter().zip(&seqs).enumerate() {
                let device = e.device.as_str();
                let new = inserted.remove(&(device.to_string(), seq));
                let (h, st) = rows.get_mut(device).ok_or_else(|| {
                    StoreError::corrupt("device_state", format!("no row for {device}"))
                })?;
                let before = u64::try_from(*h).ok();
                *h = (*h).max(seq);
                change(i, st, new, before);
                out.push((new, before));
            }
            let (mut names, mut highs, mut states) = (Vec::new(), Vec::new(), Vec::new());
            for (d, (h, st)) in &rows {
                names.push(d.as_str());
                highs.push(*h);
                states.push(serde_cbor::to_vec(st)?);
            }
            t.execute(
                "WITH h AS (UPDATE device_high SET high = n.high \
                 FROM unnest($1::text[], $2::bigint[]) AS n(device, high) WHERE device_high.device = n.device) \
                 UPDATE device_state SET state = n.state \
                 FROM unnest($1::text[], $3::bytea[]) AS n(device, state) WHERE device_state.device = n.device",
                &[&names, &highs, &states],
            )?;
            Ok(out)
        })
    }

    fn devices_named(&self, ids: &[DeviceId]) -> Result<Vec<DeviceRecord>, StoreError> {
        let ids: Vec<&str> = ids.iter().map(DeviceId::as_str).collect();
        self.run(|c| {
            c.query("SELECT id, record FROM devices WHERE id = ANY($1)", &[&ids])?
                .iter()
                .map(|r| cbor(&format!("device {}", r.get::<_, &str>(0)), r.get(1)))
                .collect()
        })
    }

    fn states_named(&self, ids: &[DeviceId]) -> Result<Vec<(DeviceId, DeviceState)>, StoreError> {
        self.named(STATES_NAMED, ids, "the state of")
    }

    fn brief_states_named(
        &self,
        ids: &[DeviceId],
    ) -> Result<Vec<(DeviceId, DeviceState)>, StoreError> {
        let brief: Vec<(DeviceId, Brief)> = self.named(STATES_NAMED, ids, "the state of")?;
        Ok(brief.into_iter().map(|(id, Brief(s))| (id, s)).collect())
    }

    fn messages(
        &self,
        device: &DeviceId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Envelope>, StoreError> {
        let Ok(from) = i64::try_from(from) else {
            return Ok(Vec::new());
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(|c| {
            c.query(
                "SELECT seq, envelope FROM messages WHERE device = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
                &[&device.as_str(), &from, &limit],
            )?
            .iter()
            .map(|r| {
                cbor(
                    &format!("message {device} {}", r.get::<_, i64>(0)),
                    r.get(1),
                )
            })
            .collect()
        })
    }

    fn prune_messages(&self, device: &DeviceId, keep: usize) -> Result<u64, StoreError> {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        self.run(|c| {
            Ok(c.execute(
                "DELETE FROM messages WHERE device = $1 AND seq NOT IN (\
                 SELECT seq FROM messages WHERE device = $1 ORDER BY seq DESC LIMIT $2)",
                &[&device.as_str(), &keep],
            )?)
        })
    }

    fn prune_kinds(
        &self,
        device: &DeviceId,
        keep: &std::collections::BTreeMap<String, usize>,
    ) -> Result<u64, StoreError> {
        let (kinds, counts): (Vec<&str>, Vec<i64>) = keep
            .iter()
            .map(|(k, n)| (k.as_str(), i64::try_from(*n).unwrap_or(i64::MAX)))
            .unzip();
        // Each kept kind's messages of the device ranked newest first; past its count
        // they go. One statement, one transaction.
        self.run(|c| {
            Ok(c.execute(
                "DELETE FROM messages m USING (\
                   SELECT x.seq FROM (\
                     SELECT seq, kind, row_number() OVER (PARTITION BY kind ORDER BY seq DESC) AS n \
                     FROM messages WHERE device = $1 AND kind = ANY($2)) x \
                   JOIN unnest($2::text[], $3::bigint[]) AS r(kind, keep) ON x.kind = r.kind \
                   WHERE x.n > r.keep) d \
                 WHERE m.device = $1 AND m.seq = d.seq",
                &[&device.as_str(), &kinds, &counts],
            )?)
        })
    }

    /// Two statements in one transaction, ages first (so that a window report the age
    /// rule removes does not stand for its hour), then the thinning, both over the
    /// whole fleet: the same rule as [`super::Expiry`], every time the caller's.
    fn expire_messages(&self, rules: &super::AgeRules, now_ms: u64) -> Result<u64, StoreError> {
        let now = big(now_ms, "the time")?;
        let (mut kinds, mut ages) = (Vec::new(), Vec::new());
        for (k, age) in &rules.max_age_ms {
            kinds.push(k.as_str());
            ages.push(big(*age, "an age")?);
        }
        let unknown = rules
            .unknown_kind_age()
            .map(|a| big(a, "an age"))
            .transpose()?;
        let downsample = rules
            .downsample_windows_after_ms
            .map(|a| big(a, "an age"))
            .transpose()?;
        let hour = big(super::DOWNSAMPLE_MS, "an hour")?;
        self.tx(|t| {
            let mut gone = t.execute(
                "DELETE FROM messages m USING unnest($1::text[], $2::bigint[]) AS r(kind, age) \
                 WHERE m.kind = r.kind AND $3 - m.stored_ms > r.age",
                &[&kinds, &ages, &now],
            )?;
            if let Some(age) = unknown {
                gone += t.execute(
                    "DELETE FROM messages WHERE kind IS NULL AND $1 - stored_ms > $2",
                    &[&now, &age],
                )?;
            }
            if let Some(after) = downsample {
                gone += t.execute(
                    "DELETE FROM messages m WHERE m.kind = 'window' AND $1 - m.stored_ms > $2 \
                     AND EXISTS (SELECT 1 FROM messages o WHERE o.device = m.device \
                       AND o.kind = 'window' AND o.model = m.model AND o.seq < m.seq \
                       AND $1 - o.stored_ms > $2 AND o.stored_ms / $3 = m.stored_ms / $3)",
                    &[&now, &after, &hour],
                )?;
            }
            Ok(gone)
        })
    }

    fn state(&self, device: &DeviceId) -> Result<Option<DeviceState>, StoreError> {
        self.run(|c| {
            c.query_opt(
                "SELECT state FROM device_state WHERE device = $1",
                &[&device.as_str()],
            )?
            .map(|r| cbor(&format!("the state of {device}"), r.get(0)))
            .transpose()
        })
    }

    fn update_state(
        &self,
        device: &DeviceId,
        change: &mut (dyn FnMut(&mut DeviceState) + Send),
    ) -> Result<(), StoreError> {
        let fresh = serde_cbor::to_vec(&DeviceState::default())?;
        self.tx(|t| Self::change_state_in(t, device, &fresh, change))
    }

    fn next_command_seq(&self, device: &DeviceId) -> Result<u64, StoreError> {
        Ok(self.next_command_seqs(std::slice::from_ref(device))?[0])
    }

    fn next_command_seqs(&self, devices: &[DeviceId]) -> Result<Vec<u64>, StoreError> {
        // One statement for the whole list (a rollout tells 10,000 devices at once): each
        // device's counter moves by the times it is named, and its numbers are handed
        // out in the order of the list.
        let mut times: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for d in devices {
            *times.entry(d.as_str()).or_default() += 1;
        }
        let (names, counts): (Vec<&str>, Vec<i64>) = times.iter().map(|(d, n)| (*d, *n)).unzip();
        // `next` is the first number not handed out yet (a device's first is 0).
        let mut first: std::collections::HashMap<String, u64> = self.run(|c| {
            c.query(
                "INSERT INTO command_seq (device, next) SELECT d, n FROM unnest($1::text[], $2::bigint[]) AS u(d, n) \
                 ON CONFLICT (device) DO UPDATE SET next = command_seq.next + EXCLUDED.next \
                 RETURNING device, next",
                &[&names, &counts],
            )?
            .iter()
            .map(|r| {
                let device: String = r.get(0);
                let next = unbig(r.get(1), "a command sequence number")?;
                let n = times.get(device.as_str()).copied().unwrap_or(0).unsigned_abs();
                Ok((device, next.saturating_sub(n)))
            })
            .collect::<Result<_, StoreError>>()
        })?;
        devices
            .iter()
            .map(|d| {
                let next = first.get_mut(d.as_str()).ok_or_else(|| {
                    StoreError::corrupt("command_seq", format!("no number for {d}"))
                })?;
                *next += 1;
                Ok(*next - 1)
            })
            .collect()
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Every method commits its own transaction: nothing waits to be made durable.
        Ok(())
    }
}

impl AssignmentStore for PgStore {
    fn assignment(&self, device: &DeviceId) -> Result<Option<AssignmentRecord>, StoreError> {
        self.run(|c| {
            c.query_opt(
                "SELECT record FROM assignments WHERE device = $1 AND length(record) > 0",
                &[&device.as_str()],
            )?
            .map(|r| cbor(&format!("the assignment of {device}"), r.get(0)))
            .transpose()
        })
    }

    fn assign(
        &self,
        device: &DeviceId,
        model: &str,
        to: &AssignedModel,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let changes = [(device.clone(), to.clone())];
        Ok(self.tx(|t| Self::assign_in(t, model, &changes, now_ms))?[0])
    }

    fn assign_all(
        &self,
        model: &str,
        changes: &[(DeviceId, AssignedModel)],
        now_ms: u64,
    ) -> Result<Vec<u64>, StoreError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        self.tx(|t| Self::assign_in(t, model, changes, now_ms))
    }

    fn assignments_named(
        &self,
        ids: &[DeviceId],
    ) -> Result<Vec<(DeviceId, AssignmentRecord)>, StoreError> {
        self.named(
            "SELECT device, record FROM assignments WHERE device = ANY($1) AND length(record) > 0",
            ids,
            "the assignment of",
        )
    }

    fn assignments(&self) -> Result<Vec<(DeviceId, AssignmentRecord)>, StoreError> {
        self.run(|c| {
            let mut out = Vec::new();
            for r in c.query(
                "SELECT device, record FROM assignments WHERE length(record) > 0 ORDER BY device",
                &[],
            )? {
                let device: &str = r.get(0);
                if let Ok(id) = DeviceId::new(device) {
                    let record = cbor(&format!("the assignment of {device}"), r.get(1))?;
                    out.push((id, record));
                }
            }
            Ok(out)
        })
    }
}

impl RolloutStore for PgStore {
    fn next_rollout_id(&self) -> Result<String, StoreError> {
        self.run(|c| {
            let n: i64 = c.query_one("SELECT nextval('rollout_ids')", &[])?.get(0);
            Ok(format!("r{n}"))
        })
    }

    fn put_rollout(&self, rollout: &Rollout) -> Result<(), StoreError> {
        let record = json("a rollout", rollout)?;
        self.run(|c| put_record(c, "rollouts", &rollout.id, rollout.created_ms, &record))
    }

    fn rollout(&self, id: &str) -> Result<Option<Rollout>, StoreError> {
        self.run(|c| get_record(c, "rollouts", id, "rollout"))
    }

    fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.run(|c| all_records(c, "rollouts", "rollout"))
    }

    fn unfinished_rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        // `state` is a column generated from the record (migration 5): the finished
        // rollouts' records are not read at all.
        let done: Vec<&str> = FINAL_ROLLOUT_STATES.iter().map(|s| s.as_str()).collect();
        self.run(|c| {
            c.query(
                "SELECT id, record::text FROM rollouts WHERE state <> ALL($1) ORDER BY created_ms, id",
                &[&done],
            )?
            .iter()
            .map(|r| from_json(&format!("rollout {}", r.get::<_, &str>(0)), r.get(1)))
            .collect()
        })
    }

    fn running_rollout_ids(&self) -> Result<Vec<String>, StoreError> {
        let running = crate::rollout::State::Running.as_str();
        self.run(|c| {
            Ok(c.query(
                "SELECT id FROM rollouts WHERE state = $1 ORDER BY created_ms, id",
                &[&running],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect())
        })
    }

    fn advance_rollout(
        &self,
        rollout: &mut Rollout,
        changes: &[(DeviceId, AssignedModel)],
        now_ms: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let current: &Rollout = rollout;
        let generations = self.tx(|t| {
            let generations = if changes.is_empty() {
                Vec::new()
            } else {
                Self::assign_in(t, &current.model, changes, now_ms)?
            };
            let mut after = current.clone();
            super::record_generations(&mut after, changes, &generations);
            put_record(
                t,
                "rollouts",
                &after.id,
                after.created_ms,
                &json("a rollout", &after)?,
            )?;
            Ok(generations)
        })?;
        super::record_generations(rollout, changes, &generations);
        Ok(generations)
    }
}

impl TokenStore for PgStore {
    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        // A record that no longer decodes authenticates nobody.
        self.run(|c| {
            Ok(
                c.query_opt("SELECT record::text FROM tokens WHERE hash = $1", &[&hash])?
                    .and_then(|r| serde_json::from_str(r.get(0)).ok()),
            )
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.run(|c| {
            Ok(c.query(
                "SELECT record::text FROM tokens ORDER BY created_ms, hash",
                &[],
            )?
            .iter()
            .filter_map(|r| serde_json::from_str(r.get(0)).ok())
            .collect())
        })
    }

    fn put_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let text = json("a token record", record)?;
        let created = big(record.created_ms, "a creation time")?;
        self.tx(|t| {
            t.execute(
                "DELETE FROM tokens WHERE id = $1 AND hash <> $2",
                &[&record.id, &record.hash],
            )?;
            t.execute(
                "INSERT INTO tokens (hash, id, created_ms, record) VALUES ($1, $2, $3, $4::text::jsonb) \
                 ON CONFLICT (hash) DO UPDATE SET id = EXCLUDED.id, created_ms = EXCLUDED.created_ms, \
                 record = EXCLUDED.record",
                &[&record.hash, &record.id, &created, &text],
            )?;
            Ok(())
        })
    }

    fn remove_token(&self, id: &str) -> Result<bool, StoreError> {
        self.run(|c| Ok(c.execute("DELETE FROM tokens WHERE id = $1", &[&id])? > 0))
    }
}

impl AuditStore for PgStore {
    fn append_audit(
        &self,
        next: &mut (dyn FnMut(Option<&AuditEntry>) -> AuditEntry + Send),
    ) -> Result<AuditEntry, StoreError> {
        self.tx(|t| {
            t.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])?;
            let last: Option<AuditEntry> = t
                .query_opt(
                    "SELECT seq, entry::text FROM audit ORDER BY seq DESC LIMIT 1",
                    &[],
                )?
                .map(|r| from_json(&format!("audit entry {}", r.get::<_, i64>(0)), r.get(1)))
                .transpose()?;
            let entry = next(last.as_ref());
            t.execute(
                "INSERT INTO audit (seq, entry) VALUES ($1, $2::text::jsonb)",
                &[
                    &big(entry.seq, "an audit sequence number")?,
                    &json("an audit entry", &entry)?,
                ],
            )?;
            Ok(entry)
        })
    }

    fn audit_entries(&self, from: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let Ok(from) = i64::try_from(from) else {
            return Ok(Vec::new());
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(|c| {
            Ok(c.query(
                "SELECT seq, entry::text FROM audit WHERE seq >= $1 ORDER BY seq LIMIT $2",
                &[&from, &limit],
            )?
            .iter()
            .map(|r| {
                let text: &str = r.get(1);
                serde_json::from_str(text).unwrap_or_else(|_| {
                    super::unreadable_audit_entry(r.get::<_, i64>(0) as u64, text.as_bytes())
                })
            })
            .collect())
        })
    }
}

impl AlertStore for PgStore {
    fn alerts(&self) -> Result<Vec<AlertRecord>, StoreError> {
        self.run(|c| {
            c.query("SELECT record::text FROM alerts ORDER BY key", &[])?
                .iter()
                .map(|r| {
                    serde_json::from_str(r.get(0)).map_err(|e| StoreError::corrupt("an alert", e))
                })
                .collect()
        })
    }

    fn update_alerts(&self, changed: &[AlertRecord], removed: &[String]) -> Result<(), StoreError> {
        let rows = changed
            .iter()
            .map(|a| Ok((a.key.clone(), json("an alert", a)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.tx(|t| {
            for (key, record) in &rows {
                t.execute(
                    "INSERT INTO alerts (key, record) VALUES ($1, $2::text::jsonb) \
                     ON CONFLICT (key) DO UPDATE SET record = EXCLUDED.record",
                    &[key, record],
                )?;
            }
            if !removed.is_empty() {
                t.execute("DELETE FROM alerts WHERE key = ANY($1)", &[&removed])?;
            }
            Ok(())
        })
    }

    fn silences(&self) -> Result<Vec<Silence>, StoreError> {
        self.run(|c| {
            c.query("SELECT record::text FROM silences ORDER BY id", &[])?
                .iter()
                .map(|r| {
                    serde_json::from_str(r.get(0)).map_err(|e| StoreError::corrupt("a silence", e))
                })
                .collect()
        })
    }

    fn put_silence(&self, silence: &Silence) -> Result<(), StoreError> {
        let record = json("a silence", silence)?;
        self.run(|c| {
            c.execute(
                "INSERT INTO silences (id, record) VALUES ($1, $2::text::jsonb) \
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                &[&silence.id, &record],
            )?;
            Ok(())
        })
    }

    fn remove_silence(&self, id: &str) -> Result<bool, StoreError> {
        self.run(|c| Ok(c.execute("DELETE FROM silences WHERE id = $1", &[&id])? > 0))
    }
}

impl PolicyStore for PgStore {
    fn policy(&self, model: &str) -> Result<Option<(Policy, PolicyState)>, StoreError> {
        self.run(|c| {
            Ok(c.query_opt(
                "SELECT policy::text, state::text FROM policies WHERE model = $1",
                &[&model],
            )?
            .and_then(|r| {
                Some((
                    serde_json::from_str(r.get(0)).ok()?,
                    serde_json::from_str(r.get(1)).ok()?,
                ))
            }))
        })
    }

    fn put_policy(&self, policy: &Policy, state: &PolicyState) -> Result<(), StoreError> {
        let (p, s) = (json("a policy", policy)?, json("a policy's state", state)?);
        self.run(|c| {
            c.execute(
                "INSERT INTO policies (model, policy, state) VALUES ($1, $2::text::jsonb, $3::text::jsonb) \
                 ON CONFLICT (model) DO UPDATE SET policy = EXCLUDED.policy, state = EXCLUDED.state",
                &[&policy.model, &p, &s],
            )?;
            Ok(())
        })
    }

    fn policies(&self) -> Result<Vec<(Policy, PolicyState)>, StoreError> {
        self.run(|c| {
            Ok(c.query(
                "SELECT policy::text, state::text FROM policies ORDER BY model",
                &[],
            )?
            .iter()
            .filter_map(|r| {
                Some((
                    serde_json::from_str(r.get(0)).ok()?,
                    serde_json::from_str(r.get(1)).ok()?,
                ))
            })
            .collect())
        })
    }
}

impl RegistryStore for PgStore {
    fn model_version(&self, name: &str, version: u64) -> Result<Option<ModelRecord>, StoreError> {
        let Ok(v) = i64::try_from(version) else {
            return Ok(None);
        };
        self.run(|c| {
            c.query_opt(
                "SELECT record::text FROM models WHERE name = $1 AND version = $2",
                &[&name, &v],
            )?
            .map(|r| from_json(&format!("model record {name} v{version}"), r.get(0)))
            .transpose()
        })
    }

    fn insert_model_version(
        &self,
        record: &ModelRecord,
    ) -> Result<Option<ModelRecord>, StoreError> {
        let what = format!("model record {} v{}", record.name, record.version);
        let text = json(&what, record)?;
        let v = big(record.version, "a model version")?;
        self.tx(|t| {
            if t.execute(
                "INSERT INTO models (name, version, record) VALUES ($1, $2, $3::text::jsonb) \
                 ON CONFLICT (name, version) DO NOTHING",
                &[&record.name, &v, &text],
            )? == 1
            {
                return Ok(None);
            }
            let r = t.query_one(
                "SELECT record::text FROM models WHERE name = $1 AND version = $2",
                &[&record.name, &v],
            )?;
            Ok(Some(from_json(&what, r.get(0))?))
        })
    }

    fn update_model_version(
        &self,
        name: &str,
        version: u64,
        change: &(dyn Fn(&mut ModelRecord) + Sync),
    ) -> Result<Option<ModelRecord>, StoreError> {
        let Ok(v) = i64::try_from(version) else {
            return Ok(None);
        };
        let what = format!("model record {name} v{version}");
        self.tx(|t| {
            let Some(row) = t.query_opt(
                "SELECT record::text FROM models WHERE name = $1 AND version = $2 FOR UPDATE",
                &[&name, &v],
            )?
            else {
                return Ok(None);
            };
            let mut record: ModelRecord = from_json(&what, row.get(0))?;
            change(&mut record);
            t.execute(
                "UPDATE models SET record = $3::text::jsonb WHERE name = $1 AND version = $2",
                &[&name, &v, &json(&what, &record)?],
            )?;
            Ok(Some(record))
        })
    }

    fn model_versions(&self, name: Option<&str>) -> Result<Vec<ModelRecord>, StoreError> {
        self.run(|c| {
            c.query(
                "SELECT name, version, record::text FROM models WHERE $1::text IS NULL OR name = $1 \
                 ORDER BY name, version",
                &[&name],
            )?
            .iter()
            .map(|r| {
                from_json(
                    &format!(
                        "model record {} v{}",
                        r.get::<_, &str>(0),
                        r.get::<_, i64>(1)
                    ),
                    r.get(2),
                )
            })
            .collect()
        })
    }
}

impl CaptureStore for PgStore {
    fn capture(&self, device: &DeviceId, seq: u64) -> Result<Option<CaptureRecord>, StoreError> {
        let Ok(s) = i64::try_from(seq) else {
            return Ok(None);
        };
        self.run(|c| {
            c.query_opt(
                "SELECT record::text FROM captures WHERE device = $1 AND seq = $2",
                &[&device.as_str(), &s],
            )?
            .map(|r| from_json(&format!("capture record {device} {seq}"), r.get(0)))
            .transpose()
        })
    }

    fn put_capture(&self, record: &CaptureRecord) -> Result<Option<CaptureRecord>, StoreError> {
        let what = format!("capture record {} {}", record.device, record.seq);
        let text = json(&what, record)?;
        let s = big(record.seq, "a capture's sequence number")?;
        self.tx(|t| {
            if t.execute(
                "INSERT INTO captures (device, seq, record) VALUES ($1, $2, $3::text::jsonb) \
                 ON CONFLICT (device, seq) DO NOTHING",
                &[&record.device.as_str(), &s, &text],
            )? == 1
            {
                return Ok(None);
            }
            let r = t.query_one(
                "SELECT record::text FROM captures WHERE device = $1 AND seq = $2",
                &[&record.device.as_str(), &s],
            )?;
            Ok(Some(from_json(&what, r.get(0))?))
        })
    }

    fn captures(&self) -> Result<Vec<CaptureRecord>, StoreError> {
        self.run(|c| {
            c.query(
                "SELECT device, seq, record::text FROM captures ORDER BY device, seq",
                &[],
            )?
            .iter()
            .map(|r| {
                from_json(
                    &format!(
                        "capture record {} {}",
                        r.get::<_, &str>(0),
                        r.get::<_, i64>(1)
                    ),
                    r.get(2),
                )
            })
            .collect()
        })
    }

    fn device_captures(&self, device: &DeviceId) -> Result<Vec<CaptureRecord>, StoreError> {
        self.run(|c| {
            c.query(
                "SELECT seq, record::text FROM captures WHERE device = $1 ORDER BY seq",
                &[&device.as_str()],
            )?
            .iter()
            .map(|r| {
                from_json(
                    &format!("capture record {device} {}", r.get::<_, i64>(0)),
                    r.get(1),
                )
            })
            .collect()
        })
    }
}

impl DatasetStore for PgStore {
    fn dataset(&self, id: &str) -> Result<Option<DatasetManifest>, StoreError> {
        self.run(|c| get_record(c, "datasets", id, "dataset manifest"))
    }

    fn put_dataset(&self, manifest: &DatasetManifest) -> Result<(), StoreError> {
        let text = json("a dataset manifest", manifest)?;
        self.run(|c| put_record(c, "datasets", &manifest.id, manifest.created_ms, &text))
    }

    fn datasets(&self) -> Result<Vec<DatasetManifest>, StoreError> {
        self.run(|c| all_records(c, "datasets", "dataset manifest"))
    }

    fn remove_dataset(&self, id: &str) -> Result<bool, StoreError> {
        self.run(|c| Ok(c.execute("DELETE FROM datasets WHERE id = $1", &[&id])? == 1))
    }
}

impl JobStore for PgStore {
    fn next_job_id(&self) -> Result<String, StoreError> {
        self.run(|c| {
            let n: i64 = c.query_one("SELECT nextval('job_ids')", &[])?.get(0);
            Ok(format!("j{n}"))
        })
    }

    fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        let text = json("a job", job)?;
        self.run(|c| put_record(c, "jobs", &job.id, job.created_ms, &text))
    }

    fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.run(|c| get_record(c, "jobs", id, "job"))
    }

    fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        self.run(|c| all_records(c, "jobs", "job"))
    }

    fn update_job(
        &self,
        id: &str,
        change: &mut (dyn FnMut(&mut Job) + Send),
    ) -> Result<bool, StoreError> {
        self.tx(|t| {
            let Some(row) = t.query_opt(
                "SELECT record::text FROM jobs WHERE id = $1 FOR UPDATE",
                &[&id],
            )?
            else {
                return Ok(false);
            };
            let mut job: Job = from_json(&format!("job {id}"), row.get(0))?;
            change(&mut job);
            t.execute(
                "UPDATE jobs SET created_ms = $2, record = $3::text::jsonb WHERE id = $1",
                &[
                    &id,
                    &big(job.created_ms, "a creation time")?,
                    &json("a job", &job)?,
                ],
            )?;
            Ok(true)
        })
    }

    fn put_job_spec(&self, model: &str, toml: &str) -> Result<(), StoreError> {
        self.run(|c| {
            c.execute(
                "INSERT INTO job_specs (model, spec) VALUES ($1, $2) \
                 ON CONFLICT (model) DO UPDATE SET spec = EXCLUDED.spec",
                &[&model, &toml],
            )?;
            Ok(())
        })
    }

    fn job_spec(&self, model: &str) -> Result<Option<String>, StoreError> {
        self.run(|c| {
            Ok(
                c.query_opt("SELECT spec FROM job_specs WHERE model = $1", &[&model])?
                    .map(|r| r.get(0)),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetml_protocol::telemetry::{Body, Receipt};

    fn message(seq: u64) -> Received {
        Received::new(Envelope {
            v: 1,
            device: DeviceId::new("d1").expect("id"),
            seq,
            ts_ms: seq,
            body: Body::Receipt(Receipt {
                stored: vec![[seq, seq]],
            }),
            auth: vec![1; 32],
        })
    }

    fn applied(url: &str) -> Vec<i32> {
        let mut c = Client::connect(url, NoTls).expect("connect");
        c.query(
            "SELECT version FROM refinery_schema_history ORDER BY version",
            &[],
        )
        .expect("history")
        .iter()
        .map(|r| r.get(0))
        .collect()
    }

    /// Two replicas on one database: brief reads on one see what the other wrote, by
    /// either way of writing a state (a replica that kept what it read would fail this).
    #[test]
    fn brief_reads_see_another_replicas_writes() {
        let pg = fleetml_testkit::Postgres::start();
        let url = pg.create_database("replicas");
        let (a, b) = (
            PgStore::open(&url).expect("a"),
            PgStore::open(&url).expect("b"),
        );
        let d1 = DeviceId::new("d1").expect("id");
        let stored = |s: &PgStore| {
            s.brief_states_named(std::slice::from_ref(&d1))
                .expect("brief")
                .pop()
                .map(|(_, st)| st.stored)
        };
        b.update_state(&d1, &mut |st| st.stored = 1)
            .expect("b writes");
        assert_eq!(stored(&a), Some(1));
        b.update_state(&d1, &mut |st| st.stored = 2)
            .expect("b writes");
        assert_eq!(stored(&a), Some(2), "a reads what b changed");
        b.store_messages(&[message(5)], 1, &mut |_, st, _, _| st.stored = 3)
            .expect("b stores");
        assert_eq!((stored(&a), stored(&b)), (Some(3), Some(3)));
        a.update_state(&d1, &mut |st| st.stored = 4)
            .expect("a writes");
        assert_eq!((stored(&a), stored(&b)), (Some(4), Some(4)));
    }

    /// An empty database gets every migration; a database one version behind (data
    /// written in the old schema) is brought forward with its data; a database whose
    /// schema is newer than the binary is refused by name, and left as it was; replicas
    /// starting together migrate once.
    #[test]
    fn migrations_apply_forward_and_refuse_a_newer_schema() {
        let pg = fleetml_testkit::Postgres::start();
        let ours = schema_version() as i32;
        assert!(ours >= 2, "the test needs a previous version to start from");

        let url = pg.create_database("empty");
        let store = PgStore::open(&url).expect("an empty database is migrated");
        assert_eq!(applied(&url), (1..=ours).collect::<Vec<_>>());
        // Migration 6: what the ingest rewrites is compressed with lz4 where the server
        // has it (Debian's, which the tests start, has), a state written now included;
        // pglz stays elsewhere.
        let mut c = Client::connect(&url, NoTls).expect("connect");
        let version: i32 = c
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .expect("the server's version")
            .get(0);
        // Before PostgreSQL 14 a column cannot choose its compression (pglz only).
        if version >= 140_000 {
            let has_lz4 = c
                .batch_execute("SET default_toast_compression = lz4")
                .is_ok();
            let (attribute, method_name) = if has_lz4 { ("l", "lz4") } else { ("", "pglz") };
            let methods: Vec<(String, String)> = c
                .query(
                    "SELECT attrelid::regclass::text || '.' || attname, attcompression::text \
                     FROM pg_attribute WHERE (attrelid::regclass::text, attname) IN \
                     (('device_state', 'state'), ('messages', 'envelope'), ('rollouts', 'record')) \
                     ORDER BY 1",
                    &[],
                )
                .expect("the columns' compression")
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let set = |col: &str| (col.to_string(), attribute.to_string());
            assert_eq!(
                methods,
                [
                    set("device_state.state"),
                    set("messages.envelope"),
                    set("rollouts.record")
                ]
            );
            let d1 = DeviceId::new("d1").expect("id");
            store
                .update_state(&d1, &mut |st| {
                    st.alerts
                        .insert("m".into(), (0..400).map(|i| format!("f{i}")).collect());
                })
                .expect("a state big enough to compress");
            let method: Option<String> = c
                .query_one(
                    "SELECT pg_column_compression(state) FROM device_state WHERE device = 'd1'",
                    &[],
                )
                .expect("its compression")
                .get(0);
            assert_eq!(method.as_deref(), Some(method_name));
        }
        drop(store);
        PgStore::open(&url).expect("reopening applies nothing more");
        assert_eq!(applied(&url), (1..=ours).collect::<Vec<_>>());

        let url = pg.create_database("previous");
        {
            let mut c = Client::connect(&url, NoTls).expect("connect");
            embedded::migrations::runner()
                .set_target(refinery::Target::Version(ours as u32 - 1))
                .run(&mut c)
                .expect("the previous schema");
            c.execute(
                "INSERT INTO messages (device, seq, envelope) VALUES ('d1', 7, $1)",
                &[&message(7).cbor()],
            )
            .expect("a message in the previous schema");
            c.execute(
                "INSERT INTO device_high (device, high) VALUES ('d1', 7)",
                &[],
            )
            .expect("its high-water mark");
            let running = super::super::conformance::rollout("r1", &["d1"], 5);
            let text = serde_json::to_string(&running).expect("json");
            c.execute(
                "INSERT INTO rollouts (id, created_ms, record) VALUES ('r1', 5, $1::text::jsonb)",
                &[&text],
            )
            .expect("a running rollout in the previous schema");
        }
        assert_eq!(applied(&url), (1..ours).collect::<Vec<_>>());
        let store = PgStore::open(&url).expect("the previous schema is migrated");
        assert_eq!(applied(&url), (1..=ours).collect::<Vec<_>>());
        let id = DeviceId::new("d1").expect("id");
        assert_eq!(
            store.messages(&id, 0, 10).expect("read"),
            vec![message(7).into_envelope()],
            "data written before the migration is still there"
        );
        assert_eq!(
            store.insert(&message(8), 8).expect("insert"),
            (true, Some(7))
        );
        assert_eq!(
            store
                .unfinished_rollouts()
                .expect("read")
                .iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>(),
            ["r1"],
            "a rollout written before the migration is still found as running"
        );

        let url = pg.create_database("newer");
        PgStore::open(&url).expect("migrated");
        let future = ours + 1;
        pg.sql_in(
            "newer",
            &format!(
                "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
                 VALUES ({future}, 'from_the_future', '2030-01-01T00:00:00Z', '0')"
            ),
        );
        let e = PgStore::open(&url).expect_err("a newer schema is refused");
        let text = format!("{e:#}");
        assert!(
            text.contains(&format!("version {future}"))
                && text.contains(&format!("(version {ours})")),
            "{text}"
        );
        assert!(!text.contains("password"), "{text}");
        assert_eq!(applied(&url).last(), Some(&future), "nothing was changed");

        let e = PgStore::open("postgres://postgres:s3cret-pw@127.0.0.1:1/nowhere")
            .expect_err("nothing listens on port 1");
        let text = format!("{e:#}");
        assert!(
            text.contains("postgres://postgres@127.0.0.1:1/nowhere") && !text.contains("s3cret"),
            "{text}"
        );

        let url = pg.create_database("together");
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || PgStore::open(&url).map(|_| ()))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        assert!(opened.iter().all(Result::is_ok), "{opened:?}");
        assert_eq!(applied(&url), (1..=ours).collect::<Vec<_>>());
    }

    /// Sequence numbers beyond `bigint` are refused by name, not wrapped.
    #[test]
    fn numbers_beyond_bigint_are_refused_not_wrapped() {
        assert!(
            matches!(big(u64::MAX, "sequence number"), Err(StoreError::Conflict(m)) if m.contains("sequence number"))
        );
        assert_eq!(big(i64::MAX as u64, "x"), Ok(i64::MAX));
    }

    /// Called from async code on either kind of runtime, the store answers (the
    /// synchronous client must not run on a runtime's worker).
    #[test]
    fn the_store_answers_from_async_code_on_both_runtimes() {
        let pg = fleetml_testkit::Postgres::start();
        let store = PgStore::open(&pg.create_database("rt")).expect("opens");
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        let s = store.clone();
        multi.block_on(async move {
            tokio::spawn(async move { s.insert(&message(1), 1).expect("insert") })
                .await
                .expect("task")
        });
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let s = store.clone();
        let got = current.block_on(async move { s.insert(&message(2), 2).expect("insert") });
        assert_eq!(got, (true, Some(1)));
    }
}
