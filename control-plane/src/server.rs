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
use axum::Router;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use fleetml_protocol::telemetry::{self, Body, BrokerUrl, DeviceId};
use fleetml_protocol::trust::TrustPolicy;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{Principal, Role};
use crate::ingest::Ingest;
use crate::records::DeviceRecord;
use crate::store::sled::SledStore;
use crate::store::{AssignmentStore, FleetStore, RolloutStore};
use crate::views;

/// Client id and user name of the ingest's MQTT session.
pub const INGEST_CLIENT: &str = "fleetml-ingest";
/// Client id of the session commands to devices are published on (it logs in with the
/// ingest's credentials).
pub const COMMANDS_CLIENT: &str = "fleetml-commands";

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
    /// The key candidate bundles of training jobs are signed with.
    pub signing_key: Option<PathBuf>,
    /// How often each device gets a receipt for the messages stored since the last one.
    pub receipt_interval: Duration,
}

/// Shared state of the running control plane.
pub struct Plane {
    pub ingest: Ingest<SledStore>,
    pub registry: crate::registry::Registry,
    pub assignments: Arc<dyn AssignmentStore>,
    pub captures: crate::captures::Captures,
    pub datasets: crate::datasets::Datasets,
    pub jobs: crate::jobs::Jobs,
    pub policies: Arc<dyn crate::store::PolicyStore>,
    pub(crate) running: crate::retrain::Running,
    pub(crate) signing_key: Option<PathBuf>,
    pub rollouts: Arc<dyn RolloutStore>,
    pub tokens: crate::auth::Tokens,
    pub audit: crate::auth::Audit,
    pub(crate) assignment_key: fleetml_protocol::crypto::SigningKey,
    pub(crate) assignment_ttl_ms: u64,
    /// One rollout change at a time (the engine and the API both make them).
    pub(crate) rollout_lock: std::sync::Mutex<()>,
    /// The trust policy bundles are verified with and devices are given; an admin may
    /// replace it (`PUT /v1/trust`), kept in `DATA_DIR/trust.toml`.
    trust: std::sync::RwLock<Option<TrustPolicy>>,
    data_dir: PathBuf,
    public_url: String,
    public_mqtt_url: String,
    /// The session commands to devices are published on; the ingest has its own.
    pub(crate) client: AsyncClient,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Plane {
    /// The trust policy now.
    pub fn policy(&self) -> Option<TrustPolicy> {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The trust policy devices are given: the bundle keys, and this control plane's
    /// assignment key.
    pub fn device_policy(&self) -> Option<TrustPolicy> {
        let mut policy = self.policy()?;
        policy.assignment_keys = vec![fleetml_protocol::trust::TrustedKey {
            name: Some("control-plane assignments".into()),
            public: self.assignment_key.public_key(),
            id: None,
        }];
        Some(policy)
    }
}

/// Writes `policy` to `path` atomically (mode 0644: it holds public keys only).
fn keep_policy(path: &Path, policy: &TrustPolicy) -> anyhow::Result<()> {
    let text = policy.to_toml();
    crate::output::write_atomic(path, crate::output::PUBLIC_FILE, |f| {
        use std::io::Write;
        f.write_all(text.as_bytes())?;
        Ok(())
    })
}

impl std::fmt::Debug for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The admin token stays out of logs.
        f.debug_struct("Plane")
            .field("public_url", &self.public_url)
            .field("public_mqtt_url", &self.public_mqtt_url)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn random_bytes(n: usize) -> anyhow::Result<Vec<u8>> {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    Ok(b)
}

/// Equal in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

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

/// Starts rumqttd on `addr` (its own threads) and waits until it accepts connections.
fn start_broker(
    addr: SocketAddr,
    store: SledStore,
    ingest_password: String,
    refused: Arc<std::sync::atomic::AtomicU64>,
    ingest_ready: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
    // Fail early and clearly if the port is taken (rumqttd would only log it).
    drop(
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("the MQTT listen address {addr} is not available"))?,
    );
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
                        same(
                            password.as_bytes(),
                            telemetry::mqtt_password(&d.secret).as_bytes(),
                        )
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
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .try_init();
    create_private_dir(&opts.data_dir)?;
    let token = admin_token(&opts.data_dir)?;
    let assignment_key = crate::assign::assignment_key(&opts.data_dir)?;
    let store = SledStore::open(&opts.data_dir.join("fleet.db"))?;
    let tokens = crate::auth::Tokens::new(Arc::new(store.clone()));
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
    let ingest = Ingest::new(store.clone());
    let (options, public_mqtt) = match &opts.mqtt {
        Mqtt::Embedded(addr) => {
            let password = hex::encode(random_bytes(32)?);
            start_broker(
                *addr,
                store.clone(),
                password.clone(),
                ingest.counters.logins_refused.clone(),
                ingest.counters.connected.clone(),
            )?;
            let local = if addr.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], addr.port()))
            } else {
                *addr
            };
            let mut o = MqttOptions::new(INGEST_CLIENT, local.ip().to_string(), local.port());
            o.set_credentials(INGEST_CLIENT, password);
            (o, format!("mqtt://{}", host_for_clients(*addr)))
        }
        Mqtt::External(url) => {
            let mut o = MqttOptions::new(INGEST_CLIENT, url.host.clone(), url.port);
            if let Some(u) = &url.username {
                o.set_credentials(u.clone(), url.password.clone().unwrap_or_default());
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
    command_options.set_client_id(COMMANDS_CLIENT.to_string());
    command_options.set_clean_session(true);
    let (client, command_events) = AsyncClient::new(command_options, 1024);
    options.set_clean_session(false);
    options.set_manual_acks(true);
    options.set_inflight(100);
    let (ingest_client, events) = AsyncClient::new(options, 1024);
    let registry = crate::registry::Registry::new(
        Arc::new(store.clone()),
        Arc::new(crate::store::blobs::FileBlobs::open(
            &opts.data_dir.join("blobs"),
        )?),
    );
    let plane = Arc::new(Plane {
        assignments: Arc::new(store.clone()),
        captures: crate::captures::Captures::open(
            Arc::new(store.clone()),
            &opts.data_dir.join("captures"),
        )?,
        datasets: crate::datasets::Datasets::open(
            Arc::new(store.clone()),
            &opts.data_dir.join("datasets"),
        )?,
        jobs: crate::jobs::Jobs::open(Arc::new(store.clone()), &opts.data_dir.join("jobs"))?,
        policies: Arc::new(store.clone()),
        running: Default::default(),
        signing_key: opts.signing_key.clone(),
        rollouts: Arc::new(store.clone()),
        audit: crate::auth::Audit::new(Arc::new(store.clone())),
        tokens,
        assignment_key,
        assignment_ttl_ms: opts.assignment_ttl.as_millis() as u64,
        rollout_lock: std::sync::Mutex::new(()),
        ingest,
        registry,
        trust: std::sync::RwLock::new(trust),
        data_dir: opts.data_dir.clone(),
        public_url: opts
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", host_for_clients(opts.listen))),
        public_mqtt_url: opts.public_mqtt_url.clone().unwrap_or(public_mqtt),
        client,
        metrics,
    });
    spawn_ingest(plane.clone(), ingest_client, events);
    spawn_receipts(plane.clone(), opts.receipt_interval);
    spawn_commands(command_events);
    crate::fleet_api::spawn_rollouts(plane.clone());
    crate::policy::spawn(plane.clone());

    let app = router(plane.clone());
    let tcp = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;
    let address = tcp.local_addr()?;
    let mut server =
        tokio::spawn(async move { axum::serve(tcp, app).await.map_err(anyhow::Error::from) });
    announce(&format!("control plane listening on http://{address}"));
    announce(&format!("devices connect to {}", plane.public_mqtt_url));
    announce(&format!(
        "admin token in {}",
        opts.data_dir.join("admin.token").display()
    ));
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        done = &mut server => { done.context("API server task")??; }
    }
    plane.ingest.store.flush()?;
    Ok(())
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
                    let wait = Duration::from_millis((250u64 << failures.min(5)).min(5_000));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    });
}

/// Receives from the broker on one task and stores on another: a batch is stored,
/// flushed once, then acknowledged message by message.
fn spawn_ingest(plane: Arc<Plane>, client: AsyncClient, mut events: rumqttc::EventLoop) {
    // Unbounded on purpose: the receiving task must never block, or it stops polling the
    // event loop that carries the storing task's acknowledgements out — a deadlock seen
    // under load with mosquitto (system test `the_ingest_keeps_up_with_a_burst…`). What
    // queues here is what the broker sent and the ingest has not stored yet.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<rumqttc::Publish>();
    let acks = client.clone();
    let receiver = plane.clone();
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    tracing::info!("ingest connected to the broker");
                    // One filter, so that a device's messages on its three channels
                    // arrive in the order it sent them (rumqttd keeps one log per
                    // filter); it also brings back the commands the control plane
                    // publishes, which the ingest ignores.
                    if let Err(e) = client
                        .subscribe(telemetry::INGEST_FILTER, QoS::AtLeastOnce)
                        .await
                    {
                        tracing::error!(error = %e, "ingest could not subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    receiver
                        .ingest
                        .counters
                        .connected
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    receiver
                        .ingest
                        .counters
                        .connected
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::warn!(error = %e, "ingest lost the broker; reconnecting");
                    }
                    let wait = Duration::from_millis((250u64 << failures.min(5)).min(5_000));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(256);
        while rx.recv_many(&mut batch, 256).await > 0 {
            let p2 = plane.clone();
            let publishes = std::mem::take(&mut batch);
            let stored = tokio::task::spawn_blocking(move || {
                let now = now_ms();
                for p in &publishes {
                    match p2.ingest.handle(&p.topic, &p.payload, now) {
                        Ok(crate::ingest::Outcome::Refused(e)) => {
                            tracing::warn!(topic = %p.topic.chars().take(120).collect::<String>(), error = %e, "refused a message")
                        }
                        Ok(crate::ingest::Outcome::Stored { gap: Some((a, b)) }) => {
                            tracing::info!(topic = %p.topic, from = a, to = b, "sequence gap (may still arrive)")
                        }
                        Ok(_) => {}
                        Err(e) => return Err((e, publishes)),
                    }
                }
                p2.ingest.store.flush().map_err(|e| (e, Vec::new()))?;
                Ok(publishes)
            })
            .await;
            match stored {
                Ok(Ok(publishes)) => {
                    for p in &publishes {
                        let _ = acks.ack(p).await;
                    }
                }
                Ok(Err((e, _))) => {
                    // Not acknowledged: the broker delivers them again after a reconnect.
                    tracing::error!(error = %e, "storing telemetry failed");
                }
                Err(e) => tracing::error!(error = %e, "ingest task failed"),
            }
            batch.clear();
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
                let mut out = Vec::new();
                for (device, seqs) in due {
                    let Some(d) = p2.ingest.store.device(&device)? else {
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

/// An API error: status and a message naming what was wrong.
pub(crate) struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError as E;
        let status = match &e {
            E::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            E::Conflict(_) => StatusCode::CONFLICT,
            E::NotFound(_) => StatusCode::NOT_FOUND,
        };
        ApiError(status, e.to_string())
    }
}

pub(crate) type Api<T> = Result<T, ApiError>;

/// Who may call `route` with `method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Role(Role),
    /// The device the path names (its own assignment, the bundles it names), or a viewer.
    DeviceOrViewer,
    /// Only the device the path names (uploads of its captured data).
    OwnDevice,
}

/// The access rule of every authenticated route (documented per route in
/// docs/openapi.yaml as `x-fleetml-role`, and tested route by route).
pub fn access(method: &axum::http::Method, route: &str) -> Access {
    use axum::http::Method;
    let admin = route.starts_with("/v1/tokens")
        || (route == "/v1/trust" && method == Method::PUT)
        || (route == "/v1/devices" && method == Method::POST);
    if admin {
        Access::Role(Role::Admin)
    } else if route == "/v1/devices/{id}/assignment" || route == "/v1/bundles/{digest}" {
        Access::DeviceOrViewer
    } else if route == "/v1/devices/{id}/captures" && method == Method::POST {
        Access::OwnDevice
    } else if route == "/v1/audit" || !matches!(*method, Method::GET | Method::HEAD) {
        Access::Role(Role::Operator)
    } else {
        Access::Role(Role::Viewer)
    }
}

/// The principal of a bearer token: a device (its derived HTTP token) or an operator
/// token.
fn identify(plane: &Plane, token: &str) -> Option<Principal> {
    if let Some((id, _)) = fleetml_protocol::assignment::parse_http_token(token) {
        let record = plane.ingest.store.device(&id).ok()??;
        let expected = fleetml_protocol::assignment::http_token(&id, &record.secret);
        return same(token.as_bytes(), expected.as_bytes()).then_some(Principal::Device(id));
    }
    plane.tokens.find(token).ok()?.map(Principal::Operator)
}

/// Authenticates, checks the route's role, runs the handler, and writes an audit entry
/// for every mutating call (refused ones included).
async fn authorize(
    State(plane): State<Arc<Plane>>,
    matched: Option<axum::extract::MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let target = request.uri().path().to_string();
    let route = matched.map_or_else(|| target.clone(), |m| m.as_str().to_string());
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let principal = match given {
        Some(t) => {
            let (p2, t) = (plane.clone(), t.to_string());
            tokio::task::spawn_blocking(move || identify(&p2, &t))
                .await
                .ok()
                .flatten()
        }
        None => None,
    };
    let action = format!("{method} {route}");
    let rule = access(&method, &route);
    let refused = match (&principal, rule) {
        (None, _) => Some(ApiError(
            StatusCode::UNAUTHORIZED,
            if given.is_some() {
                "unknown or revoked API token: check FLEETML_TOKEN (the bootstrap admin token is in DATA_DIR/admin.token)".into()
            } else {
                "missing API token: set FLEETML_TOKEN or ~/.config/fleetml/token (the bootstrap admin token is in DATA_DIR/admin.token)".into()
            },
        )),
        (Some(Principal::Operator(t)), Access::OwnDevice) => Some(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "token `{}` is an operator token; {action} needs a device token (devices upload their own captures)",
                t.name
            ),
        )),
        (Some(Principal::Device(d)), Access::Role(_)) => Some(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "device `{d}` may only read its own assignment and the bundles it names, not {action}"
            ),
        )),
        (Some(Principal::Operator(t)), rule) if t.role < access_role(rule) => Some(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "token `{}` has role {}; {action} needs {}",
                t.name,
                t.role.as_str(),
                access_role(rule).as_str()
            ),
        )),
        _ => None,
    };
    let response = match refused {
        Some(e) => e.into_response(),
        None => {
            if let Some(p) = principal.clone() {
                request.extensions_mut().insert(p);
            }
            next.run(request).await
        }
    };
    if !matches!(method, axum::http::Method::GET | axum::http::Method::HEAD) {
        let status = response.status().as_u16();
        let (who, role) = principal
            .as_ref()
            .map_or(("anonymous".to_string(), "none".to_string()), |p| {
                (p.who(), p.role())
            });
        let p2 = plane.clone();
        let written = tokio::task::spawn_blocking(move || {
            p2.audit.append(now_ms(), who, role, action, target, status)
        })
        .await;
        if !matches!(written, Ok(Ok(_))) {
            tracing::error!("could not write the audit log entry of a {status} call");
        }
    }
    response
}

/// The least operator role a rule admits.
fn access_role(a: Access) -> Role {
    match a {
        Access::Role(r) => r,
        Access::DeviceOrViewer => Role::Viewer,
        Access::OwnDevice => Role::Admin,
    }
}

/// Largest dataset file accepted by `POST /v1/datasets`.
pub const MAX_DATASET_UPLOAD: usize = 512 << 20;

pub fn router(plane: Arc<Plane>) -> Router {
    use crate::data_api as d;
    use crate::fleet_api as f;
    use crate::retrain as r;
    let authenticated = Router::new()
        .route("/v1/devices", post(enroll).get(list_devices))
        .route("/v1/devices/{id}", get(show_device))
        .route("/v1/devices/{id}/messages", get(device_messages))
        .route("/v1/devices/{id}/commands", post(send_command))
        .route("/v1/devices/{id}/assignment", get(f::device_assignment))
        .route("/v1/bundles/{digest}", get(f::bundle))
        .route(
            "/v1/devices/{id}/captures",
            post(f::upload_capture).layer(axum::extract::DefaultBodyLimit::max(
                crate::captures::MAX_BATCH,
            )),
        )
        .route("/v1/captures", get(f::list_captures))
        .route(
            "/v1/datasets",
            post(d::import)
                .get(d::list)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_DATASET_UPLOAD)),
        )
        .route("/v1/datasets/from-captures", post(d::from_captures))
        .route("/v1/datasets/{id}", get(d::show).delete(d::delete))
        .route("/v1/datasets/{id}/data", get(d::data))
        .route("/v1/datasets/{id}/profile", get(d::profile))
        .route("/v1/retrain", post(r::start_job).get(r::list_jobs))
        .route("/v1/retrain/{id}", get(r::show_job))
        .route("/v1/retrain/{id}/logs", get(r::job_logs))
        .route("/v1/retrain/{id}/cancel", post(r::cancel_job))
        .route("/v1/models/{name}/{version}/reproduce", post(r::reproduce))
        .route(
            "/v1/models/{name}/policy",
            get(crate::policy::get_policy).put(crate::policy::put_policy),
        )
        .route("/v1/compare", post(crate::policy::compare_handler))
        .route("/v1/drift", get(drift))
        .route("/v1/ingest", get(ingest_counters))
        .route("/v1/trust", get(get_trust).put(put_trust))
        .route(
            "/v1/models",
            post(push_model)
                .get(list_models)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BUNDLE)),
        )
        .route("/v1/models/{name}", get(model_versions))
        .route("/v1/models/{name}/{version}", get(show_model))
        .route("/v1/models/{name}/{version}/stage", post(set_stage))
        .route("/v1/models/{name}/{version}/tags", post(set_tags))
        .route("/v1/rollouts", post(f::start_rollout).get(f::list_rollouts))
        .route("/v1/rollouts/{id}", get(f::show_rollout))
        .route("/v1/rollouts/{id}/pause", post(f::pause_rollout))
        .route("/v1/rollouts/{id}/resume", post(f::resume_rollout))
        .route("/v1/rollouts/{id}/abort", post(f::abort_rollout))
        .route("/v1/rollbacks", post(f::start_rollback))
        .route("/v1/tokens", post(f::create_token).get(f::list_tokens))
        .route("/v1/tokens/{id}", delete(f::revoke_token))
        .route("/v1/audit", get(f::audit_log))
        .route_layer(axum::middleware::from_fn_with_state(
            plane.clone(),
            authorize,
        ));
    Router::new()
        .merge(authenticated)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_text))
        .with_state(plane)
}

async fn metrics_text(State(plane): State<Arc<Plane>>) -> String {
    plane
        .metrics
        .as_ref()
        .map(|m| m.render())
        .unwrap_or_default()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    id: String,
    #[serde(default)]
    board: Option<String>,
    #[serde(default)]
    tags: std::collections::BTreeMap<String, String>,
}

fn parse_id(id: &str) -> Api<DeviceId> {
    DeviceId::new(id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn enroll(
    State(plane): State<Arc<Plane>>,
    axum::Json(req): axum::Json<EnrollRequest>,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let id = parse_id(&req.id)?;
    let secret = random_bytes(telemetry::SECRET_LEN)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let record = DeviceRecord {
        id: id.clone(),
        board: req.board,
        tags: req.tags,
        secret: secret.clone(),
        enrolled_ms: now_ms(),
    };
    if !plane.ingest.store.enroll(&record)? {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("device `{id}` is already enrolled"),
        ));
    }
    tracing::info!(device = %id, "enrolled");
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "device_id": id,
            "device_secret": hex::encode(&secret),
            "control_plane": plane.public_url,
            "mqtt_url": plane.public_mqtt_url,
            "board": record.board,
            "tags": record.tags,
            "trust_policy": plane.device_policy().map(|t| t.to_toml()),
        })),
    ))
}

async fn list_devices(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    let store = &plane.ingest.store;
    let mut out = Vec::new();
    for d in store.devices()? {
        let state = store.state(&d.id)?.unwrap_or_default();
        out.push(views::device_summary(&d, &state));
    }
    Ok(axum::Json(Value::Array(out)))
}

/// The enrolled device `id`, or 400 (bad id) / 404 (not enrolled).
pub(crate) fn enrolled(plane: &Plane, id: &str) -> Api<DeviceRecord> {
    let id = parse_id(id)?;
    plane.ingest.store.device(&id)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no device `{id}` is enrolled"),
        )
    })
}

async fn show_device(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    let d = enrolled(&plane, &id)?;
    let (store, id) = (&plane.ingest.store, &d.id);
    let state = store.state(id)?.unwrap_or_default();
    // The most recent messages: events, alerts and acknowledgements among them.
    let recent = store.messages(id, state.last_seq.saturating_sub(99), 100)?;
    let mut detail = views::device_detail(&d, &state, &recent);
    detail["assignment"] = match plane.assignments.assignment(id)? {
        Some(a) => json!({
            "generation": a.generation,
            "updated_ms": a.updated_ms,
            "models": a.models.iter().map(|(name, m)| json!({
                "name": name, "version": m.version, "digest": m.digest.to_string(), "rollout": m.rollout,
            })).collect::<Vec<_>>(),
        }),
        None => Value::Null,
    };
    Ok(axum::Json(detail))
}

#[derive(Debug, Deserialize)]
struct Page {
    #[serde(default)]
    from: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    1000
}

async fn device_messages(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
    Query(page): Query<Page>,
) -> Api<axum::Json<Value>> {
    let id = parse_id(&id)?;
    let list = plane
        .ingest
        .store
        .messages(&id, page.from, page.limit.min(10_000))?;
    Ok(axum::Json(Value::Array(
        list.iter().map(views::message_summary).collect(),
    )))
}

async fn send_command(
    State(plane): State<Arc<Plane>>,
    UrlPath(id): UrlPath<String>,
    axum::Json(command): axum::Json<telemetry::CommandKind>,
) -> Api<(StatusCode, axum::Json<Value>)> {
    let d = enrolled(&plane, &id)?;
    let command_id = send(&plane, &d, command).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({ "command": command_id })),
    ))
}

/// Seals `command` for device `d` with sequence number `seq`: its id, topic and bytes.
fn seal_command(
    d: &DeviceRecord,
    seq: u64,
    command: telemetry::CommandKind,
) -> (String, String, Vec<u8>) {
    let command_id = format!("{}-{seq}", d.id);
    let (topic, bytes) = telemetry::seal(
        &d.id,
        seq,
        now_ms(),
        Body::Command(telemetry::Command {
            id: command_id.clone(),
            command,
        }),
        &d.secret,
    );
    (command_id, topic, bytes)
}

/// Seals `command` for device `d` and publishes it on its `cmd` topic; returns its id.
pub(crate) async fn send(
    plane: &Plane,
    d: &DeviceRecord,
    command: telemetry::CommandKind,
) -> Api<String> {
    let seq = plane.ingest.store.next_command_seq(&d.id)?;
    let (command_id, topic, bytes) = seal_command(d, seq, command);
    plane
        .client
        .publish(topic, QoS::AtLeastOnce, false, bytes)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("broker: {e}")))?;
    Ok(command_id)
}

/// [`send`] to many devices, their sequence numbers made durable with one flush (one
/// per device took about a millisecond each: ten seconds for a rollout wave of 10,000
/// devices, found with `fleetctl sim`). A device the broker could not be given the
/// command for is logged and skipped; returns how many were published.
pub(crate) async fn send_all(
    plane: &Plane,
    devices: &[DeviceRecord],
    command: &telemetry::CommandKind,
) -> Api<usize> {
    let ids: Vec<DeviceId> = devices.iter().map(|d| d.id.clone()).collect();
    let seqs = plane.ingest.store.next_command_seqs(&ids)?;
    let mut sent = 0;
    for (d, seq) in devices.iter().zip(seqs) {
        let (_, topic, bytes) = seal_command(d, seq, command.clone());
        match plane
            .client
            .publish(topic, QoS::AtLeastOnce, false, bytes)
            .await
        {
            Ok(()) => sent += 1,
            Err(e) => tracing::warn!(device = %d.id, error = %e, "could not send a command"),
        }
    }
    Ok(sent)
}

#[derive(Debug, Deserialize)]
struct DriftQuery {
    model: Option<String>,
    device: Option<String>,
}

async fn drift(
    State(plane): State<Arc<Plane>>,
    Query(q): Query<DriftQuery>,
) -> Api<axum::Json<Value>> {
    let store = &plane.ingest.store;
    let mut states = Vec::new();
    for d in store.devices()? {
        if q.device
            .as_deref()
            .is_some_and(|want| want != d.id.as_str())
        {
            continue;
        }
        if let Some(s) = store.state(&d.id)? {
            states.push((d.id.clone(), s));
        }
    }
    Ok(axum::Json(Value::Array(views::drift_rows(
        &states,
        q.model.as_deref(),
    ))))
}

async fn ingest_counters(State(plane): State<Arc<Plane>>) -> axum::Json<Value> {
    axum::Json(plane.ingest.counters.to_json())
}

/// Largest bundle `POST /v1/models` accepts.
pub const MAX_BUNDLE: usize = 4 << 30;

impl From<crate::registry::RegistryError> for ApiError {
    fn from(e: crate::registry::RegistryError) -> Self {
        use crate::registry::RegistryError as E;
        let status = match &e {
            E::NoTrustPolicy => StatusCode::PRECONDITION_FAILED,
            E::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            E::Conflict { .. } => StatusCode::CONFLICT,
            E::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// `POST /v1/models`: the body is a bundle file. Written to disk as it arrives, verified
/// against the trust policy, then kept.
async fn push_model(
    State(plane): State<Arc<Plane>>,
    body: axum::body::Body,
) -> Api<(StatusCode, axum::Json<Value>)> {
    use http_body_util::BodyExt;
    use std::io::Write;
    let mut file = plane.registry.incoming()?;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("reading the upload: {e}")))?;
        if let Ok(data) = frame.into_data() {
            file.write_all(&data).map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("storing the upload: {e}"),
                )
            })?;
        }
    }
    let p2 = plane.clone();
    let pushed =
        tokio::task::spawn_blocking(move || p2.registry.push(file, p2.policy().as_ref(), now_ms()))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(match pushed {
        crate::registry::Pushed::New(r) => {
            tracing::info!(model = %r.name, version = r.version, digest = %r.digest, "model pushed");
            (
                StatusCode::CREATED,
                axum::Json(json!({ "unchanged": false, "model": r })),
            )
        }
        crate::registry::Pushed::Unchanged(r) => (
            StatusCode::OK,
            axum::Json(json!({ "unchanged": true, "model": r })),
        ),
    })
}

/// Devices whose latest status says they serve `name` (at `version`, if given).
fn running(plane: &Plane, name: &str, version: Option<u64>) -> Api<Vec<Value>> {
    let store = &plane.ingest.store;
    let mut out = Vec::new();
    for d in store.devices()? {
        let state = store.state(&d.id)?.unwrap_or_default();
        if let Some((_, s)) = &state.status {
            for m in &s.models {
                if m.name == name && version.is_none_or(|v| v == m.version) {
                    out.push(json!({
                        "device": d.id, "version": m.version, "backend": m.backend,
                        "online": state.online,
                    }));
                }
            }
        }
    }
    Ok(out)
}

async fn list_models(State(plane): State<Arc<Plane>>) -> Api<axum::Json<Value>> {
    Ok(axum::Json(json!(plane.registry.list(None)?)))
}

async fn model_versions(
    State(plane): State<Arc<Plane>>,
    UrlPath(name): UrlPath<String>,
) -> Api<axum::Json<Value>> {
    let versions = plane.registry.list(Some(&name))?;
    if versions.is_empty() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no model `{name}` in the registry"),
        ));
    }
    Ok(axum::Json(json!({
        "name": name,
        "versions": versions,
        "running_on": running(&plane, &name, None)?,
    })))
}

/// The reference profile of the stored bundle at `path`, read only after the bundle
/// verifies again against `policy`; `None` when it has none.
fn verified_reference(
    path: &Path,
    policy: &TrustPolicy,
) -> anyhow::Result<Option<fleetml_protocol::reference::ReferenceProfile>> {
    let verified = crate::bundle::verify(path, policy)?;
    if verified
        .manifest
        .entry(fleetml_protocol::manifest::REFERENCE_ENTRY)
        .is_none()
    {
        return Ok(None);
    }
    let mut f = std::fs::File::open(path)?;
    let bytes = verified.read_entry(
        &mut f,
        fleetml_protocol::manifest::REFERENCE_ENTRY,
        64 << 20,
    )?;
    Ok(Some(
        fleetml_protocol::reference::ReferenceProfile::from_cbor(&bytes)?,
    ))
}

/// The reference profile of registry version `NAME@VERSION` (blocking).
pub(crate) fn reference_profile(
    plane: &Plane,
    spec: &str,
) -> Api<fleetml_protocol::reference::ReferenceProfile> {
    let (name, version) = crate::registry::parse_model_version(spec)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let name = name.as_str();
    let record = plane.registry.get(name, version)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no {name} v{version} in the registry"),
        )
    })?;
    let policy = plane.policy().ok_or_else(|| {
        ApiError(
            StatusCode::PRECONDITION_FAILED,
            "the server has no trust policy".into(),
        )
    })?;
    verified_reference(&plane.registry.blob_path(&record.digest), &policy)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{spec} has no reference profile"),
            )
        })
}

async fn show_model(
    State(plane): State<Arc<Plane>>,
    UrlPath((name, version)): UrlPath<(String, u64)>,
) -> Api<axum::Json<Value>> {
    let record = plane.registry.get(&name, version)?.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no {name} v{version} in the registry"),
        )
    })?;
    let path = plane.registry.blob_path(&record.digest);
    let policy = plane.policy();
    let bundle = tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
        let front = crate::bundle::read_front(&path)?;
        let size = std::fs::metadata(&path)?.len();
        let mut v = crate::bundle::inspect_json(&front, size);
        // The reference profile, read only from a bundle that verifies again.
        if let Some(policy) = &policy
            && let Some(profile) = verified_reference(&path, policy)?
        {
            v["reference"] = serde_json::to_value(&profile)?;
        }
        Ok(v)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the stored bundle: {e:#}"),
        )
    })?;
    Ok(axum::Json(json!({
        "model": record,
        "bundle": bundle,
        "running_on": running(&plane, &name, Some(version))?,
    })))
}

/// Applies `change` to a registry record and answers it, or 404.
fn updated(
    plane: &Plane,
    name: &str,
    version: u64,
    change: impl Fn(&mut crate::registry::ModelRecord),
) -> Api<axum::Json<Value>> {
    let r = plane
        .registry
        .update(name, version, change)?
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no {name} v{version} in the registry"),
            )
        })?;
    Ok(axum::Json(json!(r)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageRequest {
    stage: String,
}

async fn set_stage(
    State(plane): State<Arc<Plane>>,
    UrlPath((name, version)): UrlPath<(String, u64)>,
    axum::Json(req): axum::Json<StageRequest>,
) -> Api<axum::Json<Value>> {
    if !crate::registry::STAGES.contains(&req.stage.as_str()) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown stage `{}`: use one of {}",
                req.stage,
                crate::registry::STAGES.join(", ")
            ),
        ));
    }
    updated(&plane, &name, version, |r| r.stage = req.stage.clone())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TagsRequest {
    #[serde(default)]
    set: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

async fn set_tags(
    State(plane): State<Arc<Plane>>,
    UrlPath((name, version)): UrlPath<(String, u64)>,
    axum::Json(req): axum::Json<TagsRequest>,
) -> Api<axum::Json<Value>> {
    if let Some(k) = req.set.keys().find(|k| k.is_empty() || k.len() > 64) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("tag key `{k}` must be 1-64 characters"),
        ));
    }
    updated(&plane, &name, version, |r| {
        for k in &req.remove {
            r.tags.remove(k);
        }
        r.tags.extend(req.set.clone());
    })
}

async fn get_trust(State(plane): State<Arc<Plane>>) -> axum::Json<Value> {
    axum::Json(json!({ "policy": plane.policy().map(|p| p.to_toml()) }))
}

/// `PUT /v1/trust`: the body is a trust policy (TOML, as `fleetctl keys trust-policy`
/// writes it). Validated, kept in DATA_DIR/trust.toml, used from the next request on.
async fn put_trust(State(plane): State<Arc<Plane>>, body: String) -> Api<axum::Json<Value>> {
    let policy = TrustPolicy::from_toml(&body).map_err(|e| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("trust policy: {e}"),
        )
    })?;
    keep_policy(&plane.data_dir.join("trust.toml"), &policy)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    *plane.trust.write().unwrap_or_else(|p| p.into_inner()) = Some(policy.clone());
    tracing::info!(
        keys = policy.keys.len(),
        threshold = policy.threshold,
        "trust policy replaced"
    );
    Ok(axum::Json(json!({ "policy": policy.to_toml() })))
}
