//! `fleetctl serve`: the control plane — an HTTP API for operators (axum), an MQTT
//! broker for devices (embedded rumqttd by default, or an external one), and the ingest
//! task between them.
//!
//! Data directory (created mode 0700): `admin.token` (mode 0600, created on first
//! start), `fleet.db` (sled: registry, messages, device states).
//!
//! Delivery: devices delete a message from their outbox when the broker acknowledges
//! it, so the broker must not lose what it acknowledged. The ingest holds a persistent
//! session (`clean_session = false`, fixed client id) and acknowledges each message
//! only after it is stored and flushed, so a message the broker queued for the ingest
//! survives an ingest restart. With an external broker, enable its persistence
//! (mosquitto: `persistence true`) so a broker restart keeps those queues too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleetml_protocol::telemetry::{self, Body, BrokerUrl, DeviceId};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::ingest::Ingest;
use crate::store::FleetStore;
use crate::store::Store;
use crate::store::sled::SledStore;

use crate::api::router::router;
use crate::plane::{Plane, keep_policy, now_ms, random_bytes, same};

/// Client id and user name of the ingest's MQTT session.
pub const INGEST_CLIENT: &str = "fleetml-ingest";
/// Client id of the session commands to devices are published on (it logs in with the
/// ingest's credentials).
pub const COMMANDS_CLIENT: &str = "fleetml-commands";

/// The client ids of the ingest's and the commands' MQTT sessions: `fleetml-ingest` and
/// `fleetml-commands`, then `-REPLICA` for a replica, then, on an external broker with
/// a password, `-TAG`, 16 hex digits of SHA-256 over the login. A broker hands a client
/// id to whoever connects with it last and drops the session that had it, and neither
/// mosquitto nor NATS ties a client id to a user: with fixed ids any device with valid
/// credentials could disconnect the control plane again and again. The tag is as
/// secret as the password; it stays the same across restarts, so the ingest's
/// persistent session is found again.
pub fn session_ids(login: Option<(&str, &str)>, replica: Option<&str>) -> (String, String) {
    let mut tail = replica.map(|id| format!("-{id}")).unwrap_or_default();
    if let Some((user, password)) = login.filter(|(_, p)| !p.is_empty()) {
        let digest = fleetml_protocol::crypto::sha256(
            format!("fleetml mqtt client id\0{user}\0{password}").as_bytes(),
        )
        .to_string();
        tail.push('-');
        tail.push_str(&digest[..16]);
    }
    (
        format!("{INGEST_CLIENT}{tail}"),
        format!("{COMMANDS_CLIENT}{tail}"),
    )
}

/// Which broker devices talk to.
#[derive(Debug, Clone)]
pub enum Mqtt {
    /// rumqttd inside this process, listening here.
    Embedded(SocketAddr),
    /// A broker run elsewhere (mosquitto, EMQX, VerneMQ, …).
    External(BrokerUrl),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    /// Bytes of the sled store's pages kept in memory (`--store-cache-mib`).
    pub store_cache: u64,
    /// How soon freed memory goes back to the system (`--malloc-trim-interval`,
    /// [`crate::memory::hand_back_freed`]); zero never.
    pub malloc_trim_interval: Duration,
    /// `postgres://…`: keep the state in PostgreSQL instead of DATA_DIR/fleet.db.
    pub database: Option<String>,
    /// Where bundle files are kept (default `DATA_DIR/blobs`): a folder (every
    /// replica mounts it when there are several) or `s3://BUCKET/PREFIX`.
    pub blobs: Option<String>,
    /// Messages kept per device in the message log, newest first (0: all); the leader
    /// prunes the rest every [`RETENTION_EVERY`].
    pub retain_messages: usize,
    /// How long the message log keeps each kind of message, and when window reports
    /// are thinned; applied by the leader with `retain_messages`.
    pub retain: crate::store::AgeRules,
    /// Per kind, the messages of that kind kept per device, newest first (`--retain-count`);
    /// applied by the leader before `retain_messages`.
    pub retain_count: std::collections::BTreeMap<String, usize>,
    /// This replica's name among several on one database and broker: its MQTT client
    /// ids carry it, the ingest shares the telemetry subscription with the other
    /// replicas, and leadership is elected. None: the only process.
    pub replica_id: Option<String>,
    /// Pull the devices' messages from a JetStream work queue on a NATS cluster instead
    /// of subscribing over MQTT (NATS's MQTT has no shared subscriptions).
    pub ingest_queue: Option<crate::ingest_queue::QueueOptions>,
    pub listen: SocketAddr,
    pub mqtt: Mqtt,
    /// Trust policy handed to enrolled devices.
    pub trust: Option<PathBuf>,
    /// The URL devices and operators reach the API at (default: from `listen`).
    pub public_url: Option<String>,
    /// The broker URL devices are given (default: from the broker's address).
    pub public_mqtt_url: Option<String>,
    /// How long a signed assignment stays valid after a device fetched it.
    pub assignment_ttl: Duration,
    /// How long the rollout engine waits for a device of the running wave to answer its
    /// assignment before telling it again (`--rollout-remind-after`); zero never.
    pub rollout_remind: Duration,
    /// The key candidate bundles of training jobs are signed with.
    pub signing_key: Option<PathBuf>,
    /// How often each device gets a receipt for the messages stored since the last one.
    pub receipt_interval: Duration,
    /// How often the calls refused for want of a valid token are written to the audit
    /// log, as one entry.
    pub audit_interval: Duration,
    /// The audit chain's key file (default `DATA_DIR/audit.key`).
    pub audit_key: Option<PathBuf>,
    /// The notifier's rules and receivers (`--alerts FILE`); None: the built-in rules,
    /// no receiver.
    pub alerts: Option<PathBuf>,
    /// Where trial folders are (default `DATA_DIR/jobs`).
    pub trials_dir: Option<PathBuf>,
    /// The OS user local trials run as (needs root; `trials_dir` outside DATA_DIR).
    pub trial_user: Option<String>,
    /// What one HTTP caller may take: time-outs and the connection limit.
    pub http: fleetml_net::Limits,
    /// Mutating API calls per second per token or device, and per client address (0:
    /// no limit); each may burst to ten times that.
    pub rate_limits: RateLimits,
    /// Bytes of captured data kept per device.
    pub capture_quota: u64,
    /// TLS for the API and the embedded broker, or plain (`--insecure-listen`).
    pub tls: crate::tls::Mode,
    /// The embedded broker's TLS listener (with TLS; default 127.0.0.1:8883). Its plain
    /// listener (`mqtt`) then serves loopback only: the ingest and local tools.
    pub mqtts_listen: Option<SocketAddr>,
    /// CA of an external `mqtts://` broker (default: the system's CA bundle); enrolled
    /// devices are told to trust it too.
    pub mqtt_ca: Option<PathBuf>,
}

/// The API's limits: a request head within 10 s, an answer within `request` (default 5
/// minutes: a 512 MiB dataset upload at 2 MB/s), `max_connections` (default 4,096).
pub fn http_limits(request: Duration, max_connections: usize) -> fleetml_net::Limits {
    fleetml_net::Limits::new(
        request,
        max_connections,
        fleetml_net::Metrics {
            open: "fleetml_control_http_connections",
            refused: "fleetml_control_http_connections_refused_total",
            timed_out: "fleetml_control_http_requests_timed_out_total",
        },
    )
}

pub use crate::plane::RateLimits;

/// Reads `DIR/admin.token`, creating it (mode 0600) on first start.
pub fn admin_token(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(t.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = format!("fmt_{}", hex::encode(random_bytes(32)?));
            crate::output::create_new(&path, 0o600, format!("{token}\n").as_bytes())?;
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Makes `dir` (DATA_DIR) private, at every start: the directory 0700, the store
/// (`fleet.db`, which holds the device secrets) 0700 with its files 0600, the admin token
/// the assignment key, the trainers file and the audit key 0600. What it had to change, one line each (the caller warns);
/// an error naming the command that fixes it when this user cannot change a mode.
pub fn private_data_dir(dir: &Path) -> anyhow::Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    create_private_dir(dir)?;
    let mut fixed = Vec::new();
    let mut tighten = |path: &Path, dir_mode: u32, file_mode: u32| -> anyhow::Result<()> {
        let meta = std::fs::symlink_metadata(path)
            .with_context(|| format!("reading the mode of {}", path.display()))?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        let mode = if meta.is_dir() { dir_mode } else { file_mode };
        let now = meta.permissions().mode() & 0o777;
        if now & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).with_context(
                || {
                    format!(
                        "{} is mode {now:o}: others may read what it holds, and this user cannot change it; run: chmod -R go-rwx {}",
                        path.display(),
                        dir.display()
                    )
                },
            )?;
            fixed.push(format!("{} was mode {now:o}, now {mode:o}", path.display()));
        }
        Ok(())
    };
    tighten(dir, 0o700, 0o600)?;
    for name in [
        "admin.token",
        "assignment.key",
        "trainers.toml",
        "audit.key",
    ] {
        let path = dir.join(name);
        if path.exists() {
            tighten(&path, 0o700, 0o600)?;
        }
    }
    let mut pending = vec![dir.join("fleet.db")];
    while let Some(path) = pending.pop() {
        if !path.exists() {
            continue;
        }
        tighten(&path, 0o700, 0o600)?;
        if path.is_dir() && !path.is_symlink() {
            for entry in
                std::fs::read_dir(&path).with_context(|| format!("reading {}", path.display()))?
            {
                pending.push(entry?.path());
            }
        }
    }
    Ok(fixed)
}

/// The jobs and their trial folders (`--trials-dir`), run as `--trial-user` when given:
/// a folder outside DATA_DIR, which that user could not enter.
fn open_jobs(
    opts: &Options,
    store: Arc<dyn crate::store::JobStore>,
) -> anyhow::Result<crate::jobs::Jobs> {
    let dir = opts
        .trials_dir
        .clone()
        .unwrap_or_else(|| opts.data_dir.join("jobs"));
    let jobs = crate::jobs::Jobs::open(store, &dir)?;
    let Some(name) = &opts.trial_user else {
        return Ok(jobs);
    };
    let data = std::fs::canonicalize(&opts.data_dir)
        .with_context(|| format!("reading {}", opts.data_dir.display()))?;
    if jobs.dir.starts_with(&data) {
        anyhow::bail!(
            "--trial-user {name} cannot enter DATA_DIR (mode 0700), where the trial folders would be: give --trials-dir DIR outside it (e.g. /var/lib/fleetml-trials)"
        );
    }
    let user = crate::jobs::TrialUser::lookup(name, &jobs.dir)?;
    tracing::info!(user = %user.name, uid = user.uid, trials = %jobs.dir.display(), "local trials run as their own user");
    Ok(jobs.with_trial_user(Some(user)))
}

/// A loopback address with a port free right now (for rumqttd, which binds it itself).
fn loopback_port() -> anyhow::Result<SocketAddr> {
    let probe = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("finding a loopback port for the embedded broker")?;
    Ok(probe.local_addr()?)
}

/// The store `--database` names (PostgreSQL), or the sled database in DATA_DIR.
fn open_store(opts: &Options) -> anyhow::Result<Arc<dyn Store>> {
    match &opts.database {
        Some(url) => {
            let store = crate::store::postgres::PgStore::open(url)?;
            tracing::info!(
                database = store.describe(),
                schema = crate::store::postgres::schema_version(),
                "the control plane's state is in PostgreSQL"
            );
            Ok(Arc::new(store))
        }
        None => Ok(Arc::new(SledStore::open_with_cache(
            &opts.data_dir.join("fleet.db"),
            opts.store_cache,
        )?)),
    }
}

/// Bundle files, then dataset files.
type Blobs = (
    Arc<dyn crate::store::BlobStore>,
    Arc<dyn crate::store::BlobStore>,
);

/// Where bundle and dataset files are kept (`--blobs`): S3-compatible object storage
/// (`s3://…`) holds both, datasets under `PREFIX/datasets/` (cached in DATA_DIR/blob-cache
/// and DATA_DIR/datasets); otherwise bundles are in the folder named (default
/// DATA_DIR/blobs) and datasets in DATA_DIR/datasets.
fn open_blobs(opts: &Options) -> anyhow::Result<Blobs> {
    use crate::store::blobs::FileBlobs;
    let datasets = opts.data_dir.join("datasets");
    let bundles = match opts.blobs.as_deref() {
        Some(url) if url.starts_with("s3://") => {
            let bundles = crate::store::s3::S3Blobs::open(url, &opts.data_dir.join("blob-cache"))?;
            let datasets = bundles.scoped("datasets", "parquet", &datasets)?;
            tracing::info!(
                blobs = url,
                "bundle and dataset files are in object storage"
            );
            // Datasets an earlier release kept only on this replica's disk.
            let pushed = datasets.push_cached()?;
            if pushed > 0 {
                tracing::info!(pushed, "datasets from DATA_DIR/datasets uploaded");
            }
            return Ok((Arc::new(bundles), Arc::new(datasets)));
        }
        Some(dir) => FileBlobs::open(Path::new(dir))?,
        None => FileBlobs::open(&opts.data_dir.join("blobs"))?,
    };
    Ok((
        Arc::new(bundles),
        Arc::new(FileBlobs::open_with_ext(&datasets, "parquet")?),
    ))
}

/// Starts rumqttd on `addr` (its own threads) and waits until it accepts connections.
fn start_broker(
    addr: SocketAddr,
    store: Arc<dyn FleetStore>,
    ingest_password: String,
    refused: Arc<std::sync::atomic::AtomicU64>,
    ingest_ready: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: telemetry::MAX_MESSAGE + 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    connections.set_auth_handler(move |client_id: String, user: String, password: String| {
        let store = store.clone();
        let ingest_password = ingest_password.clone();
        let refused = refused.clone();
        let ready = ingest_ready.clone();
        async move {
            let ok = if user == INGEST_CLIENT {
                same(password.as_bytes(), ingest_password.as_bytes())
            } else if !ready.load(std::sync::atomic::Ordering::Relaxed) {
                // Until the ingest has subscribed, a device's messages would be
                // acknowledged to nobody: devices wait (they retry with back-off).
                tracing::info!(
                    client_id,
                    "device login deferred: the ingest is not subscribed yet"
                );
                return false;
            } else {
                // A device logs in as itself (client id = user = device id) with the
                // password derived from its secret.
                DeviceId::new(&user)
                    .ok()
                    .filter(|_| client_id == user)
                    .and_then(|id| store.device(&id).ok().flatten())
                    .is_some_and(|d| {
                        // A revoked device logs in no more.
                        d.live_secret().is_some_and(|secret| {
                            same(
                                password.as_bytes(),
                                telemetry::mqtt_password(secret).as_bytes(),
                            )
                        })
                    })
            };
            if !ok {
                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!("fleetml_control_broker_logins_refused_total").increment(1);
                tracing::warn!(client_id, "MQTT login refused");
            }
            ok
        }
    });
    let server = ServerSettings {
        name: "fleetml".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            // rumqttd's in-memory log per subscription filter: once full it drops its
            // oldest segment and skips a reader that lags past it (the ingest, under
            // overload; devices publish again what was skipped, see receipts). 1 GiB:
            // at 256 MiB the ingest was skipped every few seconds during a 10,000-device
            // rollout on this 2-core machine (`fleetctl sim`).
            max_segment_size: 100 << 20,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some([("fleetml".to_string(), server)].into_iter().collect()),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        })
        .context("starting the embedded MQTT broker")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the embedded MQTT broker did not start listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn host_for_clients(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        tracing::warn!(
            %addr,
            "listening on all interfaces: pass --public-url / --public-mqtt-url so enrolled devices get a reachable address"
        );
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Runs the control plane until SIGTERM / Ctrl-C.
pub async fn serve(opts: Options) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn,refinery_core=warn,postgres=warn".into()),
        )
        .try_init();
    match fleetml_net::raise_open_files_limit() {
        Ok((soft, _)) if (soft as usize) < opts.http.max_connections + 256 => tracing::warn!(
            open_files = soft,
            max_connections = opts.http.max_connections,
            "the open-files limit is below the connection limit plus the store and broker; raise LimitNOFILE"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "the open-files limit stays as it is"),
    }
    // Everything this process creates is private unless written with a mode of its own
    // (the trust policy, 0644).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    for line in private_data_dir(&opts.data_dir)? {
        tracing::warn!("made the data directory private: {line}");
    }
    let token = admin_token(&opts.data_dir)?;
    let assignment_key = crate::assign::assignment_key(&opts.data_dir)?;
    if let Some(id) = &opts.replica_id {
        anyhow::ensure!(
            opts.database.is_some() && matches!(opts.mqtt, Mqtt::External(_)),
            "--replica-id {id}: replicas share one PostgreSQL database (--database) and one \
             external broker (--mqtt-url); the embedded store and broker belong to one process"
        );
        anyhow::ensure!(
            !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "--replica-id {id:?}: use 1 to 64 letters, digits, '-' or '_' (it goes into MQTT client ids)"
        );
    }
    anyhow::ensure!(
        opts.ingest_queue.is_none() || matches!(opts.mqtt, Mqtt::External(_)),
        "--ingest-queue: the devices reach the NATS cluster over MQTT; name its MQTT port \
         with --mqtt-url (commands and receipts go out there)"
    );
    let store = open_store(&opts)?;
    let leader = match (&opts.database, &opts.replica_id) {
        (Some(url), Some(id)) => crate::leader::Leadership::elect(url, id.clone())?,
        (_, id) => crate::leader::Leadership::sole(id.clone().unwrap_or_else(|| "sole".into())),
    };
    // The replicas' ingests share one subscription: the broker hands each message to
    // one of them.
    let ingest_filter = match &opts.replica_id {
        Some(_) => format!("$share/{INGEST_CLIENT}/{}", telemetry::INGEST_FILTER),
        None => telemetry::INGEST_FILTER.to_string(),
    };
    let external_login = match &opts.mqtt {
        Mqtt::External(url) => url.username.as_deref().zip(url.password.as_deref()),
        Mqtt::Embedded(_) => None,
    };
    let (ingest_id, commands_id) = session_ids(external_login, opts.replica_id.as_deref());
    let tokens = crate::auth::Tokens::new(store.clone());
    tokens.register(
        "admin",
        "bootstrap admin (DATA_DIR/admin.token)",
        crate::auth::Role::Admin,
        &token,
        now_ms(),
    )?;
    // `--trust` wins and is kept; without it, the policy kept from before (if any).
    let kept = opts.data_dir.join("trust.toml");
    let trust = match &opts.trust {
        Some(p) => {
            let policy = crate::keys::load_policy(p)?;
            keep_policy(&kept, &policy)?;
            Some(policy)
        }
        None if kept.exists() => Some(crate::keys::load_policy(&kept)?),
        None => None,
    };
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    // Leadership was settled (or its election started) before the recorder existed.
    metrics::gauge!("fleetml_control_leader").set(if leader.leads() { 1.0 } else { 0.0 });
    let ingest = Ingest::new(store.clone() as Arc<dyn FleetStore>);
    // The API's port first: the embedded broker picks a free loopback port below.
    let tcp = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;
    let mqtts_listen = match (&opts.tls, &opts.mqtt) {
        (crate::tls::Mode::Insecure, _) | (_, Mqtt::External(_)) => None,
        (_, Mqtt::Embedded(plain)) => {
            anyhow::ensure!(
                plain.ip().is_loopback(),
                "--mqtt-listen {plain}: with TLS the broker's plain listener serves loopback only \
                 (the ingest and local tools); devices connect to --mqtts-listen. Pass \
                 --insecure-listen to serve plain MQTT beyond this host"
            );
            Some(
                opts.mqtts_listen
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8883))),
            )
        }
    };
    let mut listen_addrs = vec![opts.listen];
    listen_addrs.extend(mqtts_listen);
    let urls: Vec<&str> = [opts.public_url.as_deref(), opts.public_mqtt_url.as_deref()]
        .into_iter()
        .flatten()
        .flat_map(|u| u.split(','))
        .map(str::trim)
        .collect();
    let tls = crate::tls::load(
        &opts.tls,
        &opts.data_dir,
        &crate::tls::names_for(&listen_addrs, &urls),
    )?;
    let mut device_ca = tls
        .as_ref()
        .map_or(crate::tls::DeviceCa::None, |t| t.device_ca.clone());
    let (options, public_mqtt) = match &opts.mqtt {
        Mqtt::Embedded(addr) => {
            let password = hex::encode(random_bytes(32)?);
            // rumqttd listens on loopback only; devices reach it through the ACL relay
            // (plain on `addr`, TLS on `mqtts_listen`), the ingest directly. Every port
            // named on the command line is bound before the internal one is picked, so
            // the kernel cannot hand out one of them.
            let bind = |at: SocketAddr| async move {
                tokio::net::TcpListener::bind(at)
                    .await
                    .with_context(|| format!("the MQTT listen address {at} is not available"))
            };
            let plain = bind(*addr).await?;
            let secure = match (&tls, mqtts_listen) {
                (Some(t), Some(at)) => Some((
                    bind(at).await?,
                    fleetml_net::Tls {
                        config: t.mqtt.clone(),
                        failed: "fleetml_control_mqtt_tls_handshakes_failed_total",
                    },
                    at,
                )),
                _ => None,
            };
            let local = loopback_port()?;
            start_broker(
                local,
                store.clone(),
                password.clone(),
                ingest.counters.logins_refused.clone(),
                ingest.counters.connected.clone(),
            )?;
            let mut o = MqttOptions::new(INGEST_CLIENT, local.ip().to_string(), local.port());
            o.set_credentials(INGEST_CLIENT, password);
            let refused = ingest.counters.logins_refused.clone();
            let revoked = crate::broker::credential(store.clone());
            let cap = embedded_connection_cap(crate::plane::raise_open_file_limit(
                DESCRIPTORS_PER_DEVICE * MAX_EMBEDDED_CONNECTIONS as u64 + RESERVED_DESCRIPTORS,
            )?);
            if cap < MAX_EMBEDDED_CONNECTIONS {
                tracing::warn!(
                    "the open-file limit holds {cap} device connections through the embedded broker \
                     ({DESCRIPTORS_PER_DEVICE} descriptors each); more are closed at once \
                     (fleetml_control_mqtt_connections_full_total). Raise it (systemd: LimitNOFILE={}) \
                     for {MAX_EMBEDDED_CONNECTIONS}",
                    DESCRIPTORS_PER_DEVICE * MAX_EMBEDDED_CONNECTIONS as u64 + RESERVED_DESCRIPTORS
                );
            }
            let relay = move |listener: tokio::net::TcpListener, tls: Option<fleetml_net::Tls>| {
                let (refused, revoked) = (refused.clone(), revoked.clone());
                tokio::spawn(fleetml_net::relay(
                    listener,
                    tls,
                    local,
                    Duration::from_secs(10),
                    cap,
                    move || crate::broker::DeviceAcl::new(refused.clone(), revoked.clone()),
                    fleetml_net::RelayMetrics {
                        denied: "fleetml_control_broker_acl_denied_total",
                        full: "fleetml_control_mqtt_connections_full_total",
                    },
                ));
            };
            relay(plain, None);
            let public = match secure {
                Some((listener, tls, at)) => {
                    relay(listener, Some(tls));
                    format!("mqtts://{}", host_for_clients(at))
                }
                None => format!("mqtt://{}", host_for_clients(*addr)),
            };
            (o, public)
        }
        Mqtt::External(url) => {
            let mut o = MqttOptions::new(ingest_id.clone(), url.host.clone(), url.port);
            if let Some(u) = &url.username {
                o.set_credentials(u.clone(), url.password.clone().unwrap_or_default());
            }
            if url.tls {
                let (roots, pem) = match &opts.mqtt_ca {
                    Some(p) => {
                        let pem = std::fs::read_to_string(p)
                            .with_context(|| format!("reading --mqtt-ca {}", p.display()))?;
                        let roots = fleetml_net::tls::client_config(
                            pem.as_bytes(),
                            &p.display().to_string(),
                        )
                        .map_err(anyhow::Error::msg)?;
                        (roots, Some(pem))
                    }
                    None => (
                        fleetml_net::tls::system_roots().map_err(anyhow::Error::msg)?,
                        None,
                    ),
                };
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(roots),
                ));
                // Devices trust the broker's CA beside the control plane's.
                device_ca = match (device_ca, pem) {
                    (crate::tls::DeviceCa::Pem(mine), Some(broker)) => {
                        crate::tls::DeviceCa::Pem(format!("{}\n{broker}", mine.trim_end()))
                    }
                    (crate::tls::DeviceCa::None | crate::tls::DeviceCa::System, Some(broker)) => {
                        crate::tls::DeviceCa::Pem(broker)
                    }
                    (kept, None) => kept,
                };
            }
            let public = BrokerUrl {
                username: None,
                password: None,
                ..url.clone()
            };
            (o, public.to_string())
        }
    };
    let mut options = options;
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(telemetry::MAX_MESSAGE + 1024, telemetry::MAX_MESSAGE + 1024);
    // Commands go out on a session of their own: on the ingest's, a burst of them (a
    // rollout to a thousand devices) filled its in-flight window, and the ingest's
    // acknowledgements queued behind them until the broker gave up on the session
    // (found with `fleetctl sim --devices 1000`).
    let mut command_options = options.clone();
    command_options.set_client_id(commands_id);
    command_options.set_clean_session(true);
    let (client, command_events) = AsyncClient::new(command_options, 1024);
    // The only ingest keeps a persistent session: what the broker accepted while it
    // was away waits for it. A replica's session is clean: a broker hands a shared
    // subscription's messages to the sessions of absent members too (mosquitto
    // does), so a dead replica's persistent session would hold every other message
    // until it came back; with a clean one the broker forgets it on disconnect, the
    // other replicas get everything, and what was in flight to the dead one comes
    // again from the devices' outboxes (no receipt named it).
    options.set_clean_session(opts.replica_id.is_some());
    options.set_manual_acks(true);
    options.set_inflight(100);
    // What the ingest's session is, for the session an older release left.
    let ingest_options = options.clone();
    let (ingest_client, events) = AsyncClient::new(options, 1024);
    let (bundle_files, dataset_files) = open_blobs(&opts)?;
    let registry = crate::registry::Registry::new(store.clone(), bundle_files);
    let audit_key = crate::auth::AuditKey::open(
        &opts
            .audit_key
            .clone()
            .unwrap_or_else(|| opts.data_dir.join("audit.key")),
        &*store,
    )?;
    let jobs = open_jobs(&opts, store.clone())?;
    let alerts = match &opts.alerts {
        Some(path) => crate::alerts::config::Config::load(path)?,
        None => crate::alerts::config::Config::default(),
    };
    let plane = Arc::new(Plane {
        leader,
        assignments: store.clone(),
        captures: crate::captures::Captures::open(store.clone(), &opts.data_dir.join("captures"))?
            .with_quota(opts.capture_quota),
        datasets: crate::datasets::Datasets::open_in(store.clone(), dataset_files),
        jobs,
        trainers: crate::jobs::trainers::Trainers::open(&opts.data_dir)?,
        policies: store.clone(),
        running: Default::default(),
        signing_key: opts.signing_key.clone(),
        rollouts: store.clone(),
        audit: crate::auth::Audit::new(store.clone(), audit_key),
        tokens,
        assignment_key,
        assignment_ttl_ms: opts.assignment_ttl.as_millis() as u64,
        rollout_remind_ms: opts.rollout_remind.as_millis() as u64,
        rollout_lock: std::sync::Mutex::new(()),
        ingest,
        registry,
        trust: std::sync::RwLock::new(trust),
        data_dir: opts.data_dir.clone(),
        public_url: opts.public_url.clone().unwrap_or_else(|| {
            let scheme = if tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}", host_for_clients(opts.listen))
        }),
        device_ca,
        broker_login: match &opts.mqtt {
            Mqtt::External(url) => match &url.username {
                Some(u) => (u.clone(), url.password.clone()),
                None => (INGEST_CLIENT.to_string(), None),
            },
            Mqtt::Embedded(_) => (INGEST_CLIENT.to_string(), None),
        },
        queue_login: opts.ingest_queue.as_ref().map(|q| q.login()),
        public_mqtt_url: opts.public_mqtt_url.clone().unwrap_or(public_mqtt),
        client,
        metrics,
        rate: crate::plane::CallLimits::new(opts.rate_limits),
        alerts,
        alert_store: store.clone(),
        fleet_metrics: Default::default(),
        snapshots: Default::default(),
    });
    match &opts.ingest_queue {
        Some(queue) => crate::ingest_queue::spawn(plane.clone(), queue.clone()),
        None => crate::ingest_mqtt::spawn(
            plane.clone(),
            ingest_client,
            events,
            ingest_filter,
            crate::ingest_mqtt::LANES,
        ),
    }
    if opts.replica_id.is_none() && opts.ingest_queue.is_none() && ingest_id != INGEST_CLIENT {
        // Releases before the tag kept the single ingest's persistent session under the
        // bare id.
        tokio::spawn(drain_old_session(plane.clone(), ingest_options));
    }
    spawn_receipts(plane.clone(), opts.receipt_interval);
    spawn_audit_tally(plane.clone(), opts.audit_interval);
    spawn_retention(
        plane.clone(),
        opts.retain_messages,
        opts.retain.clone(),
        opts.retain_count.clone(),
    );
    spawn_commands(command_events);
    crate::api::rollouts::spawn_rollouts(plane.clone());
    crate::policy::spawn(plane.clone());
    crate::alerts::spawn(plane.clone());
    spawn_fleet_metrics(plane.clone());
    spawn_malloc_trim(opts.malloc_trim_interval);

    let app = router(plane.clone());
    let address = tcp.local_addr()?;
    let limits = opts.http.clone();
    let https = tls.as_ref().map(|t| fleetml_net::Tls {
        config: t.http.clone(),
        failed: "fleetml_control_http_tls_handshakes_failed_total",
    });
    let scheme = if https.is_some() { "https" } else { "http" };
    // Answers go out at once (no Nagle delay behind the TLS handshake's last record).
    use axum::serve::ListenerExt;
    let tcp = tcp.tap_io(|s| {
        let _ = s.set_nodelay(true);
    });
    let mut server = tokio::spawn(async move {
        fleetml_net::serve(tcp, app, limits, https)
            .await
            .map_err(anyhow::Error::from)
    });
    announce(&format!("control plane listening on {scheme}://{address}"));
    announce(&format!("devices connect to {}", plane.public_mqtt_url));
    announce(&format!(
        "admin token in {}",
        opts.data_dir.join("admin.token").display()
    ));
    match tls.as_ref().and_then(|t| t.ca_file.as_ref()) {
        Some(ca) => announce(&format!(
            "operators: export FLEETML_CA={} (or pass --ca)",
            std::fs::canonicalize(ca)
                .unwrap_or_else(|_| ca.clone())
                .display()
        )),
        None if tls.is_none() => tracing::warn!(
            "serving plain HTTP and MQTT (--insecure-listen): tokens and device secrets cross the network in clear"
        ),
        None => {}
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        done = &mut server => { done.context("API server task")??; }
    }
    plane.audit.flush_unauthenticated()?;
    plane.ingest.store.flush()?;
    Ok(())
}

/// Takes what still waits in the persistent session an older release left under the
/// bare client id `fleetml-ingest`, then ends that session. It starts once the ingest
/// holds its own subscription, so that everything arriving from then on reaches the
/// ingest too; until then messages queued only in the old session. Each is stored (and
/// flushed) before it is acknowledged, as the ingest does, until none has come for two
/// seconds or thirty seconds have passed (what comes later is the ingest's as well). A
/// store that fails ends nothing: the next start tries again. `options` are the
/// ingest's.
async fn drain_old_session(plane: Arc<Plane>, mut options: MqttOptions) {
    use std::sync::atomic::Ordering;
    let counters = &plane.ingest.counters;
    let subscribed = tokio::time::timeout(Duration::from_secs(60), async {
        while !counters.connected.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if subscribed.is_err() {
        tracing::warn!(
            "the ingest did not subscribe within 60 s: the old client id's session is left for the next start"
        );
        return;
    }
    options.set_client_id(INGEST_CLIENT.to_string());
    options.set_clean_session(false);
    options.set_manual_acks(true);
    let (client, mut events) = AsyncClient::new(options.clone(), 64);
    let drained = drain(&plane, &client, &mut events).await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), events.poll()).await;
    match drained {
        Ok(n) => {
            counters.old_session_drained.store(n, Ordering::Relaxed);
            if retire_session(options).await {
                counters.old_session_ended.store(true, Ordering::Relaxed);
                tracing::info!(
                    client_id = INGEST_CLIENT,
                    messages = n,
                    "took what the old client id's session held and ended it"
                );
            }
        }
        Err(e) => tracing::warn!(
            client_id = INGEST_CLIENT,
            error = %e,
            "could not take what the old client id's session holds; it is left for the next start"
        ),
    }
}

/// [`drain_old_session`]'s loop: the messages it stored and acknowledged.
async fn drain(
    plane: &Arc<Plane>,
    client: &AsyncClient,
    events: &mut rumqttc::EventLoop,
) -> Result<u64, String> {
    use rumqttc::{Event, Packet};
    let started = std::time::Instant::now();
    let (mut stored, mut present) = (0u64, false);
    while started.elapsed() < Duration::from_secs(30) {
        let wait = Duration::from_secs(if present { 2 } else { 10 });
        match tokio::time::timeout(wait, events.poll()).await {
            Err(_) if present => return Ok(stored),
            Err(_) => return Err("the broker did not answer the login within 10 s".into()),
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => {
                if !a.session_present {
                    return Ok(0);
                }
                present = true;
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let (plane2, topic, payload) = (plane.clone(), p.topic.clone(), p.payload.clone());
                tokio::task::spawn_blocking(move || {
                    plane2
                        .ingest
                        .store_batch([(topic.as_str(), payload.as_ref())], now_ms())?;
                    plane2.ingest.store.flush()
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                client.ack(&p).await.map_err(|e| e.to_string())?;
                stored += 1;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
        }
    }
    Ok(stored)
}

/// Connects once with `options`' client id and a clean session, which ends a
/// persistent session a broker keeps under that id, and disconnects; gives up after
/// five seconds (logged: the broker then keeps the session). Whether it ended it.
async fn retire_session(mut options: MqttOptions) -> bool {
    use rumqttc::{Event, Packet};
    options.set_clean_session(true);
    let id = options.client_id();
    let (client, mut events) = AsyncClient::new(options, 10);
    let connected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    match connected {
        Ok(Ok(())) => {
            let _ = client.disconnect().await;
            // Sends the DISCONNECT.
            let _ = tokio::time::timeout(Duration::from_secs(2), events.poll()).await;
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(client_id = %id, error = %e, "could not end the old client id's broker session");
            false
        }
        Err(_) => {
            tracing::warn!(client_id = %id, "could not end the old client id's broker session within 5 s");
            false
        }
    }
}

fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Drives the commands session: publishes what [`send`] queued, reconnecting with
/// back-off (rumqttc re-sends unacknowledged publishes after a reconnect).
fn spawn_commands(mut events: rumqttc::EventLoop) {
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => failures = 0,
                Ok(_) => {}
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::warn!(error = %e, "the commands session lost the broker; reconnecting");
                    }
                    let wait = crate::plane::reconnect_wait(failures);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    });
}

/// Every `interval`, one audit entry for the unauthenticated calls refused since the
/// last (none when there were none).
fn spawn_audit_tally(plane: Arc<Plane>, interval: Duration) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(interval.max(Duration::from_millis(100)));
        every.tick().await;
        loop {
            every.tick().await;
            let p = plane.clone();
            match tokio::task::spawn_blocking(move || p.audit.flush_unauthenticated()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "writing the tally of refused calls"),
                Err(e) => tracing::error!(error = %e, "the audit tally task failed"),
            }
        }
    });
}

/// Makes freed memory go back to the system within `every` (never when zero): jemalloc
/// does it itself ([`crate::memory`]); with glibc's malloc a task trims every `every`.
/// Measured at 10,000 devices: the rollouts' bursts leave gigabytes freed but kept by
/// the allocator otherwise (docs/BENCHMARKS.md, "At 10,000 devices").
fn spawn_malloc_trim(every: Duration) {
    let every = match crate::memory::hand_back_freed(every) {
        Ok(crate::memory::Handback::Trim(every)) => every,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not set how freed memory goes back to the system; the allocator's defaults stay"
            );
            return;
        }
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = tokio::task::spawn_blocking(crate::memory::trim).await;
        }
    });
}

/// Refreshes the fleet-level series of `/metrics` at start and every
/// [`crate::fleet_metrics::EVERY`], on every replica.
fn spawn_fleet_metrics(plane: Arc<Plane>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(crate::fleet_metrics::EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let p = plane.clone();
            let done = tokio::task::spawn_blocking(move || {
                let snap = p.snapshots.get(now_ms(), crate::snapshot::SHARED_MS, || {
                    crate::snapshot::Snapshot::read(&*p.ingest.store, &*p.rollouts, &p.jobs)
                })?;
                let alerts = p.alert_store.alerts()?;
                p.fleet_metrics
                    .set(crate::fleet_metrics::render(&snap, &alerts), now_ms());
                Ok::<_, crate::store::StoreError>(())
            })
            .await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not compute the fleet metrics"),
                Err(e) => tracing::error!(error = %e, "the fleet metrics task failed"),
            }
        }
    });
}

/// How often the leader applies the message log's retention.
pub const RETENTION_EVERY: Duration = Duration::from_secs(600);

/// On the leader, every [`RETENTION_EVERY`] (and at start): the message log's messages
/// older than their kind allows removed and old window reports thinned (`rules`), then
/// each device's messages of a kind in `per_kind` cut to the newest that many, then
/// each device's log cut to its newest `keep` messages (0: no cut). Devices' derived
/// state (status, latest windows, lifecycle, alerts) is kept apart from the log and is
/// not touched.
fn spawn_retention(
    plane: Arc<Plane>,
    keep: usize,
    rules: crate::store::AgeRules,
    per_kind: std::collections::BTreeMap<String, usize>,
) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(RETENTION_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if !plane.leader.leads() {
                continue;
            }
            let (p, rules, per_kind) = (plane.clone(), rules.clone(), per_kind.clone());
            let pruned = tokio::task::spawn_blocking(move || {
                let mut pruned = p.ingest.store.expire_messages(&rules, now_ms())?;
                if keep > 0 || !per_kind.is_empty() {
                    for d in p.ingest.store.devices()? {
                        if !per_kind.is_empty() {
                            pruned += p.ingest.store.prune_kinds(&d.id, &per_kind)?;
                        }
                        if keep > 0 {
                            pruned += p.ingest.store.prune_messages(&d.id, keep)?;
                        }
                    }
                }
                Ok::<_, crate::store::StoreError>(pruned)
            })
            .await;
            match pruned {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => {
                    metrics::counter!("fleetml_control_messages_pruned_total").increment(n);
                    tracing::info!(pruned = n, keep, "message log retention applied");
                }
                Ok(Err(e)) => tracing::error!(error = %e, "message log retention failed"),
                Err(e) => tracing::error!(error = %e, "message log retention task failed"),
            }
        }
    });
}

/// Every `interval`, tells each device which of its messages were stored since the last
/// receipt (made durable first), so it can delete them from its outbox. QoS 0: a lost
/// receipt costs a re-publish and a duplicate, nothing more.
fn spawn_receipts(plane: Arc<Plane>, interval: Duration) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(interval.max(Duration::from_millis(100)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let p2 = plane.clone();
            let sealed = tokio::task::spawn_blocking(move || {
                let due = p2.ingest.take_receipts();
                if due.is_empty() {
                    return Ok(Vec::new());
                }
                // What was recorded was inserted first: after this flush it is durable.
                p2.ingest.store.flush()?;
                let now = now_ms();
                let ids: Vec<DeviceId> = due.iter().map(|(d, _)| d.clone()).collect();
                let mut records: std::collections::BTreeMap<DeviceId, _> = p2
                    .ingest
                    .store
                    .devices_named(&ids)?
                    .into_iter()
                    .map(|d| (d.id.clone(), d))
                    .collect();
                let mut out = Vec::new();
                for (device, seqs) in due {
                    let Some(d) = records.remove(&device) else {
                        continue;
                    };
                    for r in telemetry::Receipt::covering(seqs) {
                        out.push(telemetry::seal(&d.id, 0, now, Body::Receipt(r), &d.secret));
                    }
                }
                Ok::<_, crate::store::StoreError>(out)
            })
            .await;
            let sealed = match sealed {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "could not prepare receipts");
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "receipt task failed");
                    continue;
                }
            };
            let n = sealed.len();
            for (topic, bytes) in sealed {
                if let Err(e) = plane
                    .client
                    .publish(topic, QoS::AtMostOnce, false, bytes)
                    .await
                {
                    tracing::warn!(error = %e, "could not send a receipt");
                }
            }
            metrics::counter!("fleetml_control_receipts_sent_total").increment(n as u64);
        }
    });
}

/// Device connections the embedded broker's relay holds at most.
const MAX_EMBEDDED_CONNECTIONS: usize = 10_000;
/// Descriptors one device connection through the embedded broker holds in this process:
/// the device's socket, the relay's connection to rumqttd and rumqttd's end of it.
const DESCRIPTORS_PER_DEVICE: u64 = 3;
/// Descriptors kept for everything else (HTTP clients, the stores, the ingest).
const RESERVED_DESCRIPTORS: u64 = 4096;

/// The relay's connection limit under an open-file limit of `nofile`: beyond it the
/// process would run out of descriptors, and rumqttd, whose accept loop retries at once
/// and logs each failure, would spin (measured: a 17 GiB log in six minutes at 10,000
/// simulated devices with 24,096 descriptors).
pub(crate) fn embedded_connection_cap(nofile: u64) -> usize {
    let usable =
        nofile.saturating_sub(RESERVED_DESCRIPTORS.min(nofile / 2)) / DESCRIPTORS_PER_DEVICE;
    (usable as usize).clamp(1, MAX_EMBEDDED_CONNECTIONS)
}

#[cfg(test)]
mod connection_cap_tests {
    use super::*;

    #[test]
    fn the_embedded_relay_never_admits_more_connections_than_descriptors_allow() {
        assert_eq!(embedded_connection_cap(34_096), 10_000);
        assert_eq!(embedded_connection_cap(24_096), 6_666);
        assert_eq!(embedded_connection_cap(1_024), 170);
        assert_eq!(embedded_connection_cap(1_000_000), 10_000);
        for nofile in [0, 3, 100, 5_000, 20_000] {
            let cap = embedded_connection_cap(nofile) as u64;
            assert!(
                cap * DESCRIPTORS_PER_DEVICE <= nofile.max(3),
                "{nofile}: {cap}"
            );
        }
    }
}

#[cfg(test)]
mod session_id_tests {
    use super::*;

    /// The control plane's client ids cannot be named by whoever lacks its broker
    /// password, and stay the same across restarts (the ingest's session is found
    /// again); without a password, or on the embedded broker, they are the bare ones.
    #[test]
    fn the_session_ids_are_derived_from_the_broker_login() {
        let (ingest, commands) = session_ids(Some(("fleetml-ingest", "pw-1")), None);
        assert!(
            ingest.starts_with("fleetml-ingest-") && ingest.len() == 15 + 16,
            "{ingest}"
        );
        let tag = &ingest[14..];
        assert_eq!(commands, format!("fleetml-commands{tag}"));
        assert_eq!(
            session_ids(Some(("fleetml-ingest", "pw-1")), None),
            (ingest.clone(), commands),
            "the same at every start"
        );
        assert_ne!(
            session_ids(Some(("fleetml-ingest", "pw-2")), None).0,
            ingest
        );
        assert_ne!(session_ids(Some(("other", "pw-1")), None).0, ingest);
        let (replica, _) = session_ids(Some(("fleetml-ingest", "pw-1")), Some("cp-2"));
        assert_eq!(replica, format!("fleetml-ingest-cp-2{tag}"));
        for login in [None, Some(("fleetml-ingest", ""))] {
            assert_eq!(
                session_ids(login, None),
                ("fleetml-ingest".into(), "fleetml-commands".into())
            );
            assert_eq!(session_ids(login, Some("cp-2")).0, "fleetml-ingest-cp-2");
        }
    }
}
