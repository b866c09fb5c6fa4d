//! `fleet-agent run`: load the active models from the store and serve them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use fleetml_protocol::board::BoardProfile;
use fleetml_protocol::bundle::{self, Limits};
use fleetml_protocol::trust::TrustPolicy;

use fleetml_protocol::telemetry::{self, Lifecycle};

use crate::activation;
use crate::api::{self, Api, ApiLimits, Served};
use crate::store::{ModelState, ModelStore};

#[derive(Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub policy: TrustPolicy,
    pub board: BoardProfile,
    /// The board name the status reports: the one the device was enrolled as, else the
    /// profile's.
    pub board_name: String,
    pub listen: std::net::SocketAddr,
    pub socket: Option<PathBuf>,
    pub limits: ApiLimits,
    /// Monitoring settings of the agent's configuration; each overrides the bundle's.
    pub monitoring: fleetml_protocol::manifest::MonitoringPolicy,
    /// Where window reports are kept (opened by [`run`] in `DATA_DIR/monitoring`).
    pub sink: Option<crate::monitoring::Sink>,
    /// Fleet messaging, when the agent is enrolled.
    pub telemetry: Option<crate::telemetry::Settings>,
    /// Where predictions are forwarded besides the caller.
    #[cfg(feature = "sinks")]
    pub prediction_sinks: Vec<crate::sinks::SinkConfig>,
    /// Pulling assignments from the control plane, when enrolled with one.
    pub assignments: Option<crate::assignments::Settings>,
    /// Data capture, when configured.
    #[cfg(feature = "capture")]
    pub capture: Option<crate::capture::Settings>,
    /// Dynamic batching per model.
    pub batching: Vec<crate::batcher::BatchingConfig>,
}

/// What a reload changed, as lifecycle events.
type Changes = Vec<telemetry::Event>;

/// The stored bundle of `installed` (a version of model `name`), verified again.
fn verify_stored(
    bundles: &std::path::Path,
    installed: &crate::store::Installed,
    name: &str,
    config: &Config,
) -> anyhow::Result<(PathBuf, bundle::VerifiedBundle)> {
    let path = bundles.join(format!("{}.fmb", installed.digest));
    let file = std::fs::File::open(&path)
        .with_context(|| format!("stored bundle {} is missing", path.display()))?;
    let verified = bundle::verify(
        std::io::BufReader::with_capacity(bundle::CHUNK, file),
        &config.policy,
        &Limits::default(),
    )
    .with_context(|| {
        format!(
            "stored bundle of {name} v{} no longer verifies",
            installed.version
        )
    })?;
    Ok((path, verified))
}

/// Verifies the stored bundle of `state` again and prepares it on the board's backends.
fn load(bundles: &std::path::Path, state: &ModelState, config: &Config) -> anyhow::Result<Served> {
    // Models load one at a time (reloads are serialized), so the growth of resident
    // memory across this call is this model's: weights, plans, self-test buffers.
    let before = crate::memory::resident_bytes();
    let (path, verified) = verify_stored(bundles, &state.active, &state.name, config)?;
    let selection = activation::prepare(&path, &verified, &config.board)?;
    for f in &selection.fallbacks {
        metrics::counter!(
            "fleetml_agent_backend_fallbacks_total",
            "model" => state.name.clone(),
            "requested" => f.backend.as_str(),
            "chosen" => selection.backend.kind().as_str()
        )
        .increment(1);
    }
    let fallbacks = selection.report();
    let monitor = monitor_for(
        &path,
        &verified,
        &state.name,
        state.active.version,
        config,
        config.sink.clone(),
    );
    let inline = api::runs_inline(selection.backend.as_ref(), &verified.manifest.inputs);
    let backend: Arc<dyn crate::backend::Backend> = Arc::from(selection.backend);
    let batching = crate::batcher::BatchingConfig::choose(
        &state.name,
        &config.batching,
        &verified.manifest.serving,
    );
    let batcher = batching.as_ref().and_then(|b| {
        let watched = monitor.clone();
        let on_batch = Box::new(move |rows| {
            if let Some(m) = &watched {
                m.batched(rows);
            }
        });
        match crate::batcher::Batcher::start(
            &state.name,
            &verified.manifest.inputs,
            backend.clone(),
            b,
            config.limits.queue,
            on_batch,
        ) {
            Ok(batcher) => Some(Arc::new(batcher)),
            Err(e) => {
                tracing::warn!(model = %state.name, "not batching: {e}");
                None
            }
        }
    });
    let memory_bytes = match (before, crate::memory::resident_bytes()) {
        (Some(b), Some(a)) => a.saturating_sub(b),
        _ => 0,
    };
    Ok(Served {
        memory_bytes,
        inline,
        name: state.name.clone(),
        version: state.active.version,
        schema: verified.manifest.features.clone(),
        inputs: verified.manifest.inputs.clone(),
        backend,
        fallbacks,
        monitor,
        batcher,
        shadow: None,
    })
}

/// Loads the shadow version of `state` (verified again, prepared and self-tested on the
/// board's backends, with a monitor of its own) to run beside `served`.
fn load_shadow(
    bundles: &std::path::Path,
    state: &ModelState,
    served: &Served,
    config: &Config,
) -> anyhow::Result<Option<Arc<crate::shadow::Shadow>>> {
    let Some(shadow) = &state.shadow else {
        return Ok(None);
    };
    let version = shadow.installed.version;
    let (path, verified) = verify_stored(bundles, &shadow.installed, &state.name, config)?;
    anyhow::ensure!(
        verified.manifest.name == state.name,
        "the shadow bundle is of model `{}`, not `{}`",
        verified.manifest.name,
        state.name
    );
    let selection = activation::prepare(&path, &verified, &config.board)?;
    let monitor = monitor_for(&path, &verified, &state.name, version, config, None);
    let comparison = Arc::new(crate::monitoring::Comparison::new(version, monitor));
    if served.monitor.is_none() {
        tracing::warn!(model = %state.name, "the served version is not monitored: its shadow is compared but reported nowhere");
    }
    Ok(Some(Arc::new(crate::shadow::Shadow::new(
        version,
        Arc::from(selection.backend),
        comparison,
        shadow.sample_permille,
        config.limits.shadow_cpu_percent,
    ))))
}

/// The monitor of a stored bundle, from its reference profile; `None` (logged) when the
/// bundle has none or it cannot be monitored.
fn monitor_for(
    path: &std::path::Path,
    verified: &bundle::VerifiedBundle,
    name: &str,
    version: u64,
    config: &Config,
    sink: Option<crate::monitoring::Sink>,
) -> Option<Arc<crate::monitoring::ModelMonitor>> {
    use fleetml_protocol::manifest::REFERENCE_ENTRY;
    use fleetml_protocol::reference::ReferenceProfile;
    verified.manifest.entry(REFERENCE_ENTRY)?;
    let built = (|| -> anyhow::Result<crate::monitoring::ModelMonitor> {
        let mut file = std::fs::File::open(path)?;
        let bytes = verified.read_entry(&mut file, REFERENCE_ENTRY, 64 << 20)?;
        let profile = ReferenceProfile::from_cbor(&bytes)?;
        let (window, thresholds) =
            crate::monitoring::settings(&config.monitoring, &verified.manifest.monitoring)
                .map_err(anyhow::Error::msg)?;
        crate::monitoring::ModelMonitor::new(
            name,
            version,
            &verified.manifest.features,
            &profile,
            window,
            thresholds,
            sink,
        )
        .map_err(anyhow::Error::msg)
    })();
    match built {
        Ok(m) => Some(Arc::new(m)),
        Err(e) => {
            tracing::warn!(model = %name, version, error = %format!("{e:#}"), "not monitored");
            None
        }
    }
}

/// Reads the store and swaps in every model whose active version changed; returns
/// what happened as lifecycle events (activation failures recorded by
/// `install-bundle` included: the caller reports each once).
pub fn reload(api: &Api, config: &Config) -> anyhow::Result<Changes> {
    // One reload at a time (start-up, SIGHUP, the assignment puller): a model is never
    // loaded twice at once, and memory measured per model stays its own.
    static RELOAD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = RELOAD.lock().unwrap_or_else(|p| p.into_inner());
    let mut changes = Changes::new();
    let event = |kind, name: &str, version, detail: String| telemetry::Event {
        kind,
        model: name.to_string(),
        version,
        detail,
    };
    // The store is opened only while reading, so `install-bundle` can run beside the agent.
    let (states, bundles) = {
        let _guard = crate::store::store_lock();
        let store = ModelStore::open(&config.data_dir)
            .with_context(|| format!("opening the model store in {}", config.data_dir.display()))?;
        (store.models()?, store.bundles_dir().to_path_buf())
    };
    mark_loading(api, &states);
    for state in states {
        if let Some(f) = &state.last_failure {
            // Recorded failures come after verification: no backend loaded the model or
            // passed its golden self-test.
            let kind = if f.reason.contains("golden self-test") {
                Lifecycle::SelfTestFailed
            } else {
                Lifecycle::ActivationFailed
            };
            changes.push(event(
                kind,
                &state.name,
                f.version,
                format!("{} (at {})", f.reason, f.at),
            ));
        }
        let serving = api.version_of(&state.name);
        if serving == Some(state.active.version) {
            if let Some(current) = api.get(&state.name) {
                changes.extend(reshadow(api, &bundles, &state, &current, config));
            }
            continue;
        }
        match load(&bundles, &state, config) {
            Ok(mut served) => {
                let shadow_events = match load_shadow(&bundles, &state, &served, config) {
                    Ok(shadow) => {
                        served = served.with_shadow(shadow);
                        served
                            .shadow
                            .iter()
                            .map(|s| shadow_started(&state, s))
                            .collect()
                    }
                    Err(e) => vec![shadow_failed(&state, &e)],
                };
                changes.push(event(
                    Lifecycle::Verified,
                    &state.name,
                    state.active.version,
                    format!("sha256 {}", state.active.digest),
                ));
                for line in &served.fallbacks {
                    tracing::warn!(model = %state.name, "{line}");
                    changes.push(event(
                        Lifecycle::FellBack,
                        &state.name,
                        state.active.version,
                        line.clone(),
                    ));
                }
                let backend = crate::backend::describe(served.backend.as_ref());
                let backend = backend.as_str();
                tracing::info!(model = %state.name, version = state.active.version, backend, "serving");
                let rolled_back = serving.is_some_and(|v| v > state.active.version);
                changes.push(event(
                    if rolled_back {
                        Lifecycle::RolledBack
                    } else {
                        Lifecycle::Activated
                    },
                    &state.name,
                    state.active.version,
                    format!("on {backend}"),
                ));
                api.swap(served);
                changes.extend(shadow_events);
            }
            Err(e) => {
                api.loaded(&state.name);
                tracing::error!(model = %state.name, version = state.active.version, error = %format!("{e:#}"), "cannot serve this version; keeping what runs");
                changes.push(event(
                    Lifecycle::ActivationFailed,
                    &state.name,
                    state.active.version,
                    format!("{e:#}"),
                ));
            }
        }
    }
    Ok(changes)
}

/// The shadow of a model already served brought in line with the store (started,
/// changed, stopped), the served version untouched; the events.
fn reshadow(
    api: &Api,
    bundles: &std::path::Path,
    state: &ModelState,
    current: &Served,
    config: &Config,
) -> Changes {
    let want = state
        .shadow
        .as_ref()
        .map(|s| (s.installed.version, s.sample_permille));
    let have = current
        .shadow
        .as_ref()
        .map(|s| (s.version, s.sample_permille));
    if want == have {
        return Changes::new();
    }
    let stopped = current.shadow.as_ref().map(|s| telemetry::Event {
        kind: Lifecycle::ShadowStopped,
        model: state.name.clone(),
        version: s.version,
        detail: String::new(),
    });
    match load_shadow(bundles, state, current, config) {
        Ok(shadow) => {
            let started = shadow.as_ref().map(|s| shadow_started(state, s));
            api.swap(current.with_shadow(shadow));
            stopped
                .into_iter()
                .filter(|_| want.map(|w| w.0) != have.map(|h| h.0))
                .chain(started)
                .collect()
        }
        Err(e) => vec![shadow_failed(state, &e)],
    }
}

fn shadow_started(state: &ModelState, s: &crate::shadow::Shadow) -> telemetry::Event {
    let backend = crate::backend::describe(s.backend.as_ref());
    tracing::info!(model = %state.name, version = s.version, %backend, sample_permille = s.sample_permille, "running in shadow");
    telemetry::Event {
        kind: Lifecycle::ShadowActivated,
        model: state.name.clone(),
        version: s.version,
        detail: format!("on {backend}, {} per thousand requests", s.sample_permille),
    }
}

fn shadow_failed(state: &ModelState, e: &anyhow::Error) -> telemetry::Event {
    let version = state.shadow.as_ref().map_or(0, |s| s.installed.version);
    tracing::error!(model = %state.name, version, error = %format!("{e:#}"), "cannot run this shadow version");
    telemetry::Event {
        kind: Lifecycle::ShadowFailed,
        model: state.name.clone(),
        version,
        detail: format!("{e:#}"),
    }
}

/// Requests for a model not served yet wait for it rather than being refused, and
/// `/readyz` says 503 until it is loaded.
fn mark_loading(api: &Api, states: &[ModelState]) {
    for state in states {
        if api.version_of(&state.name).is_none() {
            api.loading(&state.name);
        }
    }
}

/// Activation failures already reported, by (model, version, reason).
type Reported = std::collections::HashSet<(String, u64, String)>;

/// `changes` less the activation failures reported before: the store keeps a failure
/// until the next success, so every reload sees it again.
fn unreported(changes: Changes, reported: &mut Reported) -> Changes {
    changes
        .into_iter()
        .filter(|e| {
            !matches!(
                e.kind,
                Lifecycle::ActivationFailed | Lifecycle::SelfTestFailed
            ) || reported.insert((e.model.clone(), e.version, e.detail.clone()))
        })
        .collect()
}

/// The device's status as telemetry reports it.
fn status_of(
    api: &Api,
    board: &BoardProfile,
    board_name: &str,
    started: std::time::Instant,
) -> telemetry::Status {
    let compiled = |b: &fleetml_protocol::board::Backend| {
        matches!(b, fleetml_protocol::board::Backend::Cpu)
            || (cfg!(feature = "gpu") && matches!(b, fleetml_protocol::board::Backend::Gpu))
    };
    let mut backends: Vec<String> = board
        .backends
        .iter()
        .filter(|b| compiled(b))
        .map(|b| b.as_str().to_string())
        .collect();
    if backends.is_empty() {
        backends.push("cpu".into());
    }
    telemetry::Status {
        agent_version: crate::AGENT_VERSION.to_string(),
        board: board_name.to_string(),
        backends,
        models: api
            .served()
            .iter()
            .map(|m| telemetry::ActiveModel {
                shadow: m.shadow.as_ref().map(|s| telemetry::ActiveShadow {
                    version: s.version,
                    backend: crate::backend::describe(s.backend.as_ref()),
                }),
                name: m.name.clone(),
                version: m.version,
                backend: crate::backend::describe(m.backend.as_ref()),
                fallbacks: m.fallbacks.clone(),
            })
            .collect(),
        uptime_s: started.elapsed().as_secs(),
        online: true,
        outbox_depth: 0,
        dropped_windows: 0,
        will_seq: None,
    }
}

/// Answers a command of the control plane.
fn command(
    cmd: crate::telemetry::Command,
    tel: &crate::telemetry::Telemetry,
    status: &crate::telemetry::StatusFn,
    wake: Option<&crate::assignments::Wake>,
) -> telemetry::Ack {
    let (ok, detail) = match cmd.kind {
        telemetry::CommandKind::SendStatus => {
            tel.queue_status(status());
            (true, String::new())
        }
        telemetry::CommandKind::AssignmentChanged => match wake {
            Some(w) => {
                w.notify_one();
                (true, "pulling the assignment".into())
            }
            None => (
                false,
                "this agent has no `control_plane` to pull assignments from".into(),
            ),
        },
        telemetry::CommandKind::CaptureSamples { .. } => {
            (false, "this agent release does not capture samples".into())
        }
    };
    telemetry::Ack {
        command: cmd.id,
        ok,
        detail,
    }
}

/// Prints a line for whoever started the agent. A closed stdout (the parent went away)
/// must not stop a device agent, so write errors are ignored.
fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub async fn run(mut config: Config) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .try_init();
    if let Err(e) = fleetml_net::raise_open_files_limit() {
        tracing::warn!(error = %e, "the open-files limit stays as it is");
    }
    // tract's own threads per request (the board's `intra_op_threads`, default one:
    // concurrent requests already use every core). After the log is up, so the warning
    // is seen.
    let tract_threads = config.board.agent.intra_op_threads.unwrap_or(1) as usize;
    if !fleetml_inference::set_tract_threads(tract_threads) {
        tracing::warn!(
            tract_threads,
            "this agent was built without tract-threads: tract runs each request on one thread"
        );
    }
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    let api = Api::new(config.limits.clone(), metrics);
    if config.sink.is_none() {
        let path = config.data_dir.join("monitoring");
        match crate::monitoring::Sink::open(&path) {
            Ok(sink) => config.sink = Some(sink),
            Err(e) => tracing::warn!(error = %e, "monitoring windows are kept in memory only"),
        }
    }
    #[cfg(feature = "sinks")]
    if !config.prediction_sinks.is_empty() {
        api.set_sinks(
            crate::sinks::Sinks::start(&config.prediction_sinks).map_err(anyhow::Error::msg)?,
        );
    }
    // Without `[[capture]]` nothing is captured, but feedback still scores predictions.
    #[cfg(feature = "capture")]
    let capture = {
        let settings = config.capture.clone().unwrap_or(crate::capture::Settings {
            models: Vec::new(),
            max_bytes: 64 << 20,
            upload_interval: std::time::Duration::from_secs(60),
        });
        let capture = crate::capture::Capture::open(&config.data_dir, settings)
            .map_err(anyhow::Error::msg)
            .context("opening the capture directory")?;
        capture.start_flusher();
        api.set_capture(capture.clone());
        config.capture.is_some().then_some(capture)
    };
    let started = std::time::Instant::now();
    let tel = match &config.telemetry {
        Some(settings) => {
            let tel = crate::telemetry::Telemetry::open(&config.data_dir, settings)
                .context("opening the telemetry outbox")?;
            if let Some(sink) = &mut config.sink {
                sink.telemetry = Some(tel.clone());
            }
            Some((tel, settings.clone()))
        }
        None => {
            tracing::info!("not enrolled (no device_id / mqtt_url): no fleet telemetry");
            None
        }
    };
    // Failures already recorded are in the status; only new ones become events.
    let mut reported = Reported::default();
    let wake: crate::assignments::Wake = Arc::new(tokio::sync::Notify::new());
    // The watchdog is fed only while these make progress (and the main loop turns).
    let liveness = crate::liveness::Liveness::default();
    let (reload_tx, mut reload_rx) =
        tokio::sync::mpsc::channel::<crate::assignments::ReloadRequest>(4);
    if let Some((tel, settings)) = &tel {
        let status: crate::telemetry::StatusFn = {
            let (api, board) = (api.clone(), config.board.clone());
            let name = config.board_name.clone();
            Arc::new(move || status_of(&api, &board, &name, started))
        };
        let handler = {
            let (tel, status, wake) = (tel.clone(), status.clone(), wake.clone());
            let wake = config.assignments.is_some().then_some(wake);
            Arc::new(move |c| command(c, &tel, &status, wake.as_ref()))
        };
        // The publisher turns at least every few seconds (its receipt check) and backs off
        // at most a minute between connection attempts.
        let progress = liveness.part("telemetry publisher", std::time::Duration::from_secs(300));
        tel.start(settings, status, handler, Some(progress))?;
        tracing::info!(device = %settings.device, broker = %settings.broker, "fleet telemetry on");
    }
    {
        // Windows close by time and expected ids expire even when no request comes.
        let api = api.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                every.tick().await;
                let api = api.clone();
                let _ = tokio::task::spawn_blocking(move || api.tick()).await;
            }
        });
    }
    let config = Arc::new(config);
    match (&config.assignments, &tel) {
        (Some(settings), Some((tel, _))) => {
            let puller = crate::assignments::Puller::new(
                settings.clone(),
                Arc::new(crate::assignments::Local {
                    data_dir: config.data_dir.clone(),
                    policy: config.policy.clone(),
                    board: config.board.clone(),
                }),
                tel.clone(),
                reload_tx.clone(),
            )
            // Every step of a pull is bounded (connect 10 s, answer 30 s, a download
            // chunk within download_idle_timeout_s): `assignment_stall_s` (ten minutes)
            // without one is a hang.
            .with_progress(liveness.part("assignment puller", settings.stall));
            tokio::spawn(puller.run(wake.clone()));
            tracing::info!(server = %settings.server, "pulling assignments");
        }
        (Some(_), None) => tracing::warn!(
            "`control_plane` is set but the agent is not enrolled (device_id, device_secret, mqtt_url): no assignments"
        ),
        _ => {}
    }
    drop(reload_tx);
    #[cfg(feature = "capture")]
    match (&capture, &config.assignments) {
        (Some(capture), Some(settings)) => {
            tokio::spawn(crate::capture::upload_loop(
                capture.clone(),
                settings.server.clone(),
                settings.roots.clone(),
                settings.device.clone(),
                settings.token.clone(),
            ));
        }
        (Some(_), None) => tracing::warn!(
            "capture is on but there is no control plane to upload to (enroll the device): batches stay on disk within capture_max_bytes"
        ),
        _ => {}
    }
    {
        // Before listening: /readyz must not say ready before loading has begun.
        let _guard = crate::store::store_lock();
        let store = ModelStore::open(&config.data_dir)
            .with_context(|| format!("opening the model store in {}", config.data_dir.display()))?;
        mark_loading(&api, &store.models()?);
    }
    let app = api::router::router(api.clone());
    // Bind every listener before saying anything: the first line printed means the
    // agent is ready on all of them.
    let tcp = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let unix = match &config.socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            Some(
                tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("listening on {}", path.display()))?,
            )
        }
        None => None,
    };
    let mut servers = tokio::task::JoinSet::new();
    let address = tcp.local_addr()?;
    let limits = config.limits.http();
    let l = limits.clone();
    servers.spawn(async move {
        fleetml_net::serve(tcp, app, l, None)
            .await
            .map_err(anyhow::Error::from)
    });
    if let Some(unix) = unix {
        let app = api::router::router(api.clone());
        servers.spawn(async move {
            fleetml_net::serve(unix, app, limits, None)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    tracing::info!(address = %address, "prediction API listening");
    announce(&format!("listening on http://{address}"));
    if let Some(path) = &config.socket {
        announce(&format!("listening on unix:{}", path.display()));
    }
    crate::sdnotify::notify(&format!(
        "READY=1\nSTATUS=loading models, listening on {address}"
    ));
    // Models load after the listeners are up, one by one, each served as soon as it is
    // ready; requests for one still loading wait for it.
    let mut initial = {
        let (a, c) = (api.clone(), config.clone());
        tokio::task::spawn_blocking(move || reload(&a, &c))
    };
    let mut initial_done = false;
    // Pinged from this loop, so a wedged loop (not just a live process) trips the watchdog.
    let mut watchdog = crate::sdnotify::watchdog_interval().map(tokio::time::interval);
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    loop {
        let mut done: Option<crate::assignments::ReloadRequest> = None;
        tokio::select! {
            loaded = &mut initial, if !initial_done => {
                initial_done = true;
                match loaded {
                    Ok(Ok(changes)) => {
                        unreported(changes, &mut reported);
                        if let Some((tel, _)) = &tel {
                            tel.queue_status(status_of(&api, &config.board, &config.board_name, started));
                        }
                        let served = api.served().len();
                        tracing::info!(models = served, "models loaded");
                        crate::sdnotify::notify(&format!("STATUS=serving {served} model(s) on {address}"));
                    }
                    Ok(Err(e)) => return Err(e.context("loading the models")),
                    Err(e) => anyhow::bail!("loading the models: {e}"),
                }
                continue;
            }
            Some(request) = reload_rx.recv() => done = Some(request),
            _ = hup.recv() => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            Some(finished) = servers.join_next() => {
                finished.context("API server task")??;
                break;
            }
            _ = async { watchdog.as_mut()?.tick().await; Some(()) }, if watchdog.is_some() => {
                match liveness.stalled_at(std::time::Instant::now()) {
                    Some((part, quiet)) => tracing::error!(
                        part,
                        quiet_s = quiet.as_secs(),
                        "no progress: not feeding the watchdog (systemd restarts the agent)"
                    ),
                    None => {
                        crate::sdnotify::notify("WATCHDOG=1");
                    }
                }
                continue;
            }
        }
        {
            {
                let (a, c) = (api.clone(), config.clone());
                let result = tokio::task::spawn_blocking(move || reload(&a, &c)).await;
                match result {
                    Ok(Ok(changes)) => {
                        tracing::info!("store reloaded");
                        let changes = unreported(changes, &mut reported);
                        if let Some((tel, _)) = &tel {
                            for e in changes {
                                tel.queue(telemetry::Body::Event(e));
                            }
                            tel.queue_status(status_of(
                                &api,
                                &config.board,
                                &config.board_name,
                                started,
                            ));
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %format!("{e:#}"), "reload failed; keeping what runs")
                    }
                    Err(e) => tracing::error!(error = %e, "reload failed"),
                }
            }
        }
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
    crate::sdnotify::notify("STOPPING=1");
    if let Some(path) = &config.socket {
        let _ = std::fs::remove_file(path);
    }
    // Keep what the current windows saw, and what was captured.
    api.flush_monitoring();
    #[cfg(feature = "capture")]
    if let Some(capture) = &capture {
        capture.flush(true);
    }
    Ok(())
}
