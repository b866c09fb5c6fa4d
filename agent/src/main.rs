//! `fleet-agent`: the fleetml device agent.

use std::fs::File;
use std::io::{BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleet_agent::activation::{self, MAX_GOLDEN, MAX_MODEL};
use fleet_agent::api::ApiLimits;
use fleet_agent::config::{self, AgentConfig};
use fleet_agent::store::{self, ModelStore};
use fleet_agent::{runtime::CpuModel, selftest};
use fleetml_protocol::board::BoardProfile;
use fleetml_protocol::bundle::{self, Limits};
use fleetml_protocol::manifest::{GOLDEN_ENTRY, MODEL_ENTRY};
use fleetml_protocol::trust::TrustPolicy;

// The backends compiled in, for `--version`.
#[cfg(all(feature = "gpu", feature = "onnxruntime"))]
macro_rules! features {
    () => {
        "cpu, gpu, onnxruntime"
    };
}
#[cfg(all(feature = "gpu", not(feature = "onnxruntime")))]
macro_rules! features {
    () => {
        "cpu, gpu"
    };
}
#[cfg(all(not(feature = "gpu"), feature = "onnxruntime"))]
macro_rules! features {
    () => {
        "cpu, onnxruntime"
    };
}
#[cfg(all(not(feature = "gpu"), not(feature = "onnxruntime")))]
macro_rules! features {
    () => {
        "cpu"
    };
}
/// The fleetml device agent.
/// `--version`: release, git commit, and the backends compiled in.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("FLEETML_GIT_COMMIT"),
    ", features: ",
    features!(),
    ")"
);

#[derive(Parser, Debug)]
#[command(name = "fleet-agent", version = LONG_VERSION)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Verify a bundle as the device would before activating it: structure, signatures
    /// against the trust policy, payload hashes, manifest, agent version; then load the
    /// model with tract and run its golden vectors, reporting the max abs/rel error.
    VerifyBundle {
        bundle: PathBuf,
        /// Trust policy (TOML) naming the keys allowed to sign bundles.
        #[arg(long)]
        trust: PathBuf,
        /// Board profile (TOML): try its backends in order and report any fallback.
        /// Without it the model runs on the CPU.
        #[arg(long)]
        board: Option<PathBuf>,
    },
    /// Install a bundle from a local file and make it the active version of its model:
    /// verify, store, choose a backend and self-test on it, then swap atomically. On any
    /// failure the active version keeps serving and the reason is recorded.
    ///
    /// With --shadow the bundle runs instead *beside* the active version of its model, on
    /// a share of the requests after they are answered, never answering itself; its
    /// comparison is in each monitoring window (`shadow`). An agent enrolled with a
    /// control plane keeps only the shadow its assignment names.
    InstallBundle {
        bundle: PathBuf,
        /// Install it as the shadow of its model's active version.
        #[arg(long)]
        shadow: bool,
        /// With --shadow: the share of requests it runs on, 0.1% to 100% (25% or 0.25).
        #[arg(long, requires = "shadow", default_value = "100%", value_parser = fleetml_protocol::assignment::ShadowModel::parse_sample)]
        shadow_sample: u16,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List installed models: active and previous versions, backend, fallbacks, last failure.
    Models {
        /// With a trust policy (flag or config), each active bundle is verified again.
        #[command(flatten)]
        config: ConfigArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve the active models from the store on the local prediction API (loopback TCP
    /// and optionally a Unix socket). Works with no network at all. SIGHUP reloads the
    /// store (after `install-bundle` or `rollback`) and swaps models without dropping a
    /// request; SIGTERM or Ctrl-C stops.
    Run(Box<RunArgs>),
    /// Make the previous version of a model active again (and the active one previous).
    Rollback {
        /// Model name.
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Loopback address for the HTTP API. Default: 127.0.0.1:7070.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Also serve the API on this Unix socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Allow a --listen address other than loopback. The API then requires the token of
    /// --api-token-file on every request but /healthz and /readyz.
    #[arg(long)]
    allow_remote_api: bool,
    /// A file (mode 0600) holding the bearer token API requests must carry: at least 32
    /// characters, e.g. from `head -c 32 /dev/urandom | xxd -p -c 64`.
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Predictions run at once. Default: the board's `agent.threads`, else its core count.
    #[arg(long)]
    workers: Option<usize>,
    /// Predictions that may wait for a worker before the agent answers 503. Default: 64.
    #[arg(long)]
    queue: Option<usize>,
    /// Largest request body the API accepts, in bytes. Default: 1048576 (1 MiB), raised
    /// per model to fit one row of its declared inputs as JSON; setting it turns that off.
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Control-plane URL (used from the control-plane release on).
    #[arg(long)]
    control_plane: Option<String>,
    /// Broker for fleet telemetry, `mqtt://HOST[:PORT]` (with `device_id` and
    /// `device_secret` from the config file `fleetctl devices enroll` wrote).
    #[arg(long)]
    mqtt_url: Option<String>,
    /// Most messages the telemetry outbox keeps while offline. Default: 100000.
    #[arg(long)]
    outbox_max_messages: Option<u64>,
    /// Most bytes the telemetry outbox keeps while offline. Default: 268435456.
    #[arg(long)]
    outbox_max_bytes: Option<u64>,
    /// Answer 504 when a prediction takes longer than this (milliseconds). Default: 30000.
    #[arg(long)]
    predict_timeout_ms: Option<u64>,
    /// Monitoring: close a window after this many predictions. Default: 1000.
    #[arg(long)]
    window_predictions: Option<u32>,
    /// Monitoring: close a window after this many seconds. Default: 300.
    #[arg(long)]
    window_seconds: Option<u64>,
    /// Alert when a feature's PSI exceeds this. Default: 0.2.
    #[arg(long)]
    drift_psi: Option<f64>,
    /// Alert when a feature's Jensen–Shannon distance exceeds this. Default: 0.1.
    #[arg(long)]
    drift_js: Option<f64>,
    /// Alert when a categorical feature's chi-square p-value is below this. Default: 0.01.
    #[arg(long)]
    drift_chi2_p: Option<f64>,
    /// Alert when this share of a feature's values are categories the reference never
    /// saw (not numbers, for a numeric feature). Default: 0.05.
    #[arg(long)]
    unseen_rate: Option<f64>,
    /// Alert when missed / (predicted + missed) exceeds this. Default: 0.05.
    #[arg(long)]
    missing_rate: Option<f64>,
    /// Alert when a classifier's accuracy estimated from its confidence (bundles built
    /// with --label-column) falls below this. Default: the limit the bundle calibrated
    /// for the window size.
    #[arg(long)]
    min_estimated_accuracy: Option<f64>,
    /// Alert when the 95th percentile of prediction lag exceeds this. Default: 300000.
    #[arg(long)]
    lag_p95_ms: Option<u64>,
    /// Windows past (or back within) a threshold before an alert is raised (or
    /// recovered). Default: 3.
    #[arg(long)]
    alert_windows: Option<u8>,
}

/// Settings shared by the commands that use the store. Each can come from the config
/// file instead; a flag wins.
#[derive(Args, Debug)]
struct ConfigArgs {
    /// Agent configuration file (TOML). Unknown keys are an error.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Agent data directory (model store and state). Default: /var/lib/fleetml.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Trust policy (TOML) naming the keys allowed to sign bundles.
    #[arg(long)]
    trust: Option<PathBuf>,
    /// Board profile (TOML) whose backend order to try. Default: this machine's CPU.
    #[arg(long)]
    board: Option<PathBuf>,
}

impl ConfigArgs {
    fn resolve(&self, more: AgentConfig) -> anyhow::Result<AgentConfig> {
        let file = match &self.config {
            Some(p) => AgentConfig::load(p)?,
            None => AgentConfig::default(),
        };
        let flags = AgentConfig {
            data_dir: self.data_dir.clone(),
            trust: self.trust.clone(),
            board: self.board.clone(),
            ..more
        };
        Ok(file.overridden_by(flags))
    }
}

fn data_dir(c: &AgentConfig) -> PathBuf {
    c.data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_DATA_DIR))
}

fn trust_of(c: &AgentConfig) -> anyhow::Result<TrustPolicy> {
    match (&c.trust, &c.trust_policy) {
        (Some(p), _) => load_policy(p),
        (None, Some(policy)) => Ok(policy.clone()),
        (None, None) => anyhow::bail!(
            "no trust policy: pass --trust or set `trust` (or `[trust_policy]`) in the config file"
        ),
    }
}

/// The board profile, with `onnxruntime_library` of the config folded in.
fn board_of(c: &AgentConfig) -> anyhow::Result<BoardProfile> {
    let mut board = match &c.board {
        Some(p) => load_board(p)?,
        None => activation::local_cpu_board(),
    };
    if let (Some(lib), Some(ort)) = (&c.onnxruntime_library, board.onnxruntime.as_mut()) {
        ort.library = Some(lib.display().to_string());
    }
    Ok(board)
}

fn load_policy(path: &Path) -> anyhow::Result<TrustPolicy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading trust policy {}", path.display()))?;
    TrustPolicy::from_toml(&text).with_context(|| format!("trust policy {}", path.display()))
}

fn load_board(path: &Path) -> anyhow::Result<BoardProfile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading board profile {}", path.display()))?;
    BoardProfile::from_toml(&text).with_context(|| format!("board profile {}", path.display()))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn print_self_test(result: Option<&selftest::SelfTest>) {
    match result {
        Some(r) => println!(
            "golden self-test passed: {} rows, max abs error {:e}, max rel error {:e}",
            r.rows, r.comparison.max_abs_error, r.comparison.max_rel_error
        ),
        None => println!("no {GOLDEN_ENTRY} in the bundle: golden self-test skipped"),
    }
}

fn verify_bundle(bundle: PathBuf, trust: PathBuf, board: Option<PathBuf>) -> anyhow::Result<()> {
    let board = board.as_deref().map(load_board).transpose()?;
    let policy = load_policy(&trust)?;
    let verified = store::verify(&bundle, &policy, &Limits::default())
        .with_context(|| format!("{} failed verification", bundle.display()))?;
    let m = &verified.manifest;
    let signers: Vec<String> = verified.signed_by.iter().map(|k| k.to_string()).collect();
    println!(
        "verified {} v{}: signed by {} ({} of {} required), sha256 {}",
        m.name,
        m.version,
        signers.join(", "),
        verified.signed_by.len(),
        policy.threshold,
        verified.digest
    );
    let what = || format!("{} v{}", m.name, m.version);
    let result = match &board {
        Some(board) => {
            let selection = activation::prepare(&bundle, &verified, board).with_context(what)?;
            for line in selection.report() {
                println!("{line}");
            }
            println!(
                "running on {} (board {})",
                fleet_agent::backend::describe(selection.backend.as_ref()),
                board.name
            );
            selection.self_test
        }
        None => {
            let mut file =
                File::open(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            let (onnx, external) = fleetml_inference::external::read_from_bundle(
                &verified,
                &mut file,
                MODEL_ENTRY,
                MAX_MODEL,
                activation::MAX_EXTERNAL,
            )
            .map_err(anyhow::Error::msg)?;
            let onnx = fleetml_inference::Onnx {
                model: &onnx,
                external: &external,
            };
            let model = CpuModel::load_with_inputs(onnx, &m.inputs).with_context(what)?;
            println!("loaded {MODEL_ENTRY} with tract (cpu)");
            match m.entry(GOLDEN_ENTRY) {
                Some(_) => {
                    let golden = verified.read_entry(&mut file, GOLDEN_ENTRY, MAX_GOLDEN)?;
                    Some(selftest::run(&model, &golden).with_context(what)?)
                }
                None => None,
            }
        }
    };
    print_self_test(result.as_ref());
    Ok(())
}

fn open_store(c: &AgentConfig) -> anyhow::Result<ModelStore> {
    let dir = data_dir(c);
    ModelStore::open(&dir).with_context(|| format!("opening the model store in {}", dir.display()))
}
fn install_bundle(bundle: PathBuf, shadow: Option<u16>, config: ConfigArgs) -> anyhow::Result<()> {
    let c = config.resolve(AgentConfig::default())?;
    let policy = trust_of(&c)?;
    let board = board_of(&c)?;
    let models = open_store(&c)?;
    if let Some(sample) = shadow {
        let installed = activation::install_shadow(
            &models,
            &bundle,
            &policy,
            &board,
            &Limits::default(),
            sample,
            now(),
        )
        .with_context(|| format!("installing {} as a shadow", bundle.display()))?;
        print_self_test(installed.self_test.as_ref());
        let s = &installed.state;
        if let Some(sh) = &s.shadow {
            println!(
                "shadow {} v{} beside v{} on {}, {} per thousand requests (send SIGHUP to a running agent)",
                s.name, sh.installed.version, s.active.version, sh.backend, sh.sample_permille
            );
        }
        return Ok(());
    }
    let activated =
        activation::install(&models, &bundle, &policy, &board, &Limits::default(), now())
            .with_context(|| format!("installing {}", bundle.display()))?;
    for line in &activated.fallbacks {
        println!("{line}");
    }
    print_self_test(activated.self_test.as_ref());
    let s = &activated.state;
    let previous = s
        .previous
        .as_ref()
        .map(|p| format!(" (previous: v{})", p.version))
        .unwrap_or_default();
    println!(
        "activated {} v{} on {}{previous}",
        s.name, s.active.version, s.backend
    );
    Ok(())
}

fn models(config: ConfigArgs, json: bool) -> anyhow::Result<()> {
    let c = config.resolve(AgentConfig::default())?;
    let models = open_store(&c)?;
    let policy = match (&c.trust, &c.trust_policy) {
        (None, None) => None,
        _ => Some(trust_of(&c)?),
    };
    let states = models.models()?;
    let mut rows = Vec::new();
    for s in &states {
        let integrity = match &policy {
            Some(p) => {
                let path = models.bundle_path(&s.active.digest);
                let f = File::open(&path)
                    .with_context(|| format!("stored bundle of {} is missing", s.name))?;
                match bundle::verify(
                    BufReader::with_capacity(bundle::CHUNK, f),
                    p,
                    &Limits::default(),
                ) {
                    Ok(v) if v.digest.to_string() == s.active.digest => "verified".to_string(),
                    Ok(_) => "digest differs from the store record".to_string(),
                    Err(e) => format!("FAILED: {e}"),
                }
            }
            None => "not checked".to_string(),
        };
        rows.push((s, integrity));
    }
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(s, integrity)| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["integrity"] = serde_json::Value::String(integrity.clone());
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no models installed in {}", data_dir(&c).display());
        return Ok(());
    }
    println!(
        "{:<20} {:>8} {:>9} {:<8} {:<12} NOTES",
        "MODEL", "ACTIVE", "PREVIOUS", "BACKEND", "INTEGRITY"
    );
    for (s, integrity) in rows {
        let previous = s
            .previous
            .as_ref()
            .map(|p| format!("v{}", p.version))
            .unwrap_or_else(|| "-".into());
        let mut notes: Vec<String> = s.fallbacks.clone();
        if let Some(sh) = &s.shadow {
            notes.push(format!(
                "shadow v{} on {}, {} per thousand requests",
                sh.installed.version, sh.backend, sh.sample_permille
            ));
        }
        if let Some(f) = &s.last_failure {
            notes.push(format!("v{} failed to activate: {}", f.version, f.reason));
        }
        println!(
            "{:<20} {:>8} {:>9} {:<8} {:<12} {}",
            s.name,
            format!("v{}", s.active.version),
            previous,
            s.backend,
            integrity,
            notes.join("; ")
        );
    }
    Ok(())
}

fn fleet_agent_run(args: RunArgs) -> anyhow::Result<()> {
    let c = args.config.resolve(AgentConfig {
        listen: args.listen,
        socket: args.socket,
        workers: args.workers,
        queue: args.queue,
        max_body_bytes: args.max_body_bytes,
        control_plane: args.control_plane,
        mqtt_url: args.mqtt_url,
        outbox_max_messages: args.outbox_max_messages,
        outbox_max_bytes: args.outbox_max_bytes,
        predict_timeout_ms: args.predict_timeout_ms,
        allow_remote_api: args.allow_remote_api.then_some(true),
        api_token_file: args.api_token_file,
        window_predictions: args.window_predictions,
        window_seconds: args.window_seconds,
        drift_psi: args.drift_psi,
        drift_js: args.drift_js,
        drift_chi2_p: args.drift_chi2_p,
        unseen_rate: args.unseen_rate,
        missing_rate: args.missing_rate,
        min_estimated_accuracy: args.min_estimated_accuracy,
        lag_p95_ms: args.lag_p95_ms,
        alert_windows: args.alert_windows,
        ..AgentConfig::default()
    })?;
    c.check_features().map_err(anyhow::Error::msg)?;
    let policy = trust_of(&c)?;
    let board = board_of(&c)?;
    let workers = c
        .workers
        .or(board.agent.threads.map(|t| t as usize))
        .unwrap_or(board.cpu_cores as usize)
        .max(1);
    let listen = match c.listen {
        Some(l) => l,
        None => config::DEFAULT_LISTEN
            .parse()
            .context("default listen address")?,
    };
    let token = match &c.api_token_file {
        Some(path) => Some(api_token(path)?),
        None => None,
    };
    if !listen.ip().is_loopback() {
        if !c.allow_remote_api.unwrap_or(false) {
            anyhow::bail!(
                "listen = {listen} is not a loopback address, and the prediction API (predictions, and feedback labels that become training data) has no guard of its own there: listen on 127.0.0.1 or a socket, or set allow_remote_api = true with api_token_file = FILE (--allow-remote-api --api-token-file FILE)"
            );
        }
        if token.is_none() {
            anyhow::bail!(
                "allow_remote_api needs api_token_file = FILE: a token of at least 32 characters, mode 0600, that every request must carry"
            );
        }
    }
    // Once: the assignment puller shares the enrolment and the TLS roots.
    let telemetry = c.telemetry().map_err(anyhow::Error::msg)?;
    let board_name = match &c.enrolled_board {
        Some(enrolled) => {
            if c.board.is_some() && *enrolled != board.name {
                tracing::warn!(
                    enrolled = %enrolled,
                    profile = %board.name,
                    "the board profile names another board than this device was enrolled as; the status reports `{enrolled}` (use boards/{enrolled}.toml, or enroll the device again with --board {})",
                    board.name
                );
            }
            enrolled.clone()
        }
        None => board.name.clone(),
    };
    let config = fleet_agent::serve::Config {
        data_dir: data_dir(&c),
        policy,
        board,
        board_name,
        listen,
        socket: c.socket.clone(),
        limits: fleet_agent::api::ApiLimits {
            workers,
            queue: c.queue.unwrap_or(config::DEFAULT_QUEUE),
            max_body: c.max_body_bytes.unwrap_or(ApiLimits::default().max_body),
            fit_body_to_model: c.max_body_bytes.is_none(),
            timeout: c
                .predict_timeout_ms
                .map_or(ApiLimits::default().timeout, |ms| {
                    std::time::Duration::from_millis(ms.max(1))
                }),
            max_connections: c
                .api_max_connections
                .unwrap_or(ApiLimits::default().max_connections)
                .max(1),
            token,
            shadow_cpu_percent: c.shadow_cpu_percent.unwrap_or(50).clamp(1, 100),
            ..Default::default()
        },
        monitoring: c.monitoring(),
        sink: None,
        assignments: c
            .assignments(telemetry.as_ref())
            .map_err(anyhow::Error::msg)?,
        telemetry,
        #[cfg(feature = "sinks")]
        prediction_sinks: c.prediction_sinks.clone(),
        #[cfg(feature = "capture")]
        capture: c.capture().map_err(anyhow::Error::msg)?,
        batching: c.batching.clone(),
    };
    // Sized by the board: predictions run on the blocking pool (`workers` at once), so
    // the async side (HTTP, decoding, telemetry) needs few threads.
    let async_threads = (config.board.cpu_cores as usize).clamp(1, 2);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(async_threads)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(fleet_agent::serve::run(config))
}

fn rollback(name: String, config: ConfigArgs) -> anyhow::Result<()> {
    let c = config.resolve(AgentConfig::default())?;
    let models = open_store(&c)?;
    let s = models.rollback(&name, now())?;
    let previous = s.previous.as_ref().map(|p| p.version).unwrap_or_default();
    println!(
        "rolled back {name}: v{} is active again (v{previous} kept as previous)",
        s.active.version
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::VerifyBundle {
            bundle,
            trust,
            board,
        } => verify_bundle(bundle, trust, board),
        Command::InstallBundle {
            bundle,
            shadow,
            shadow_sample,
            config,
        } => install_bundle(bundle, shadow.then_some(shadow_sample), config),
        Command::Models { config, json } => models(config, json),
        Command::Rollback { name, config } => rollback(name, config),
        Command::Run(args) => fleet_agent_run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
            let prefix = if std::io::stderr().is_terminal() {
                "\x1b[31merror\x1b[0m"
            } else {
                "error"
            };
            eprintln!("{prefix}: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

/// The API token in `path`: private to its owner, at least 32 characters.
fn api_token(path: &std::path::Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("api_token_file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "api_token_file {} is mode {mode:o}: others can read the token; run: chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading api_token_file {}", path.display()))?
        .trim()
        .to_string();
    if token.len() < 32 {
        anyhow::bail!(
            "api_token_file {} holds {} characters; use at least 32 (head -c 32 /dev/urandom | xxd -p -c 64 > FILE)",
            path.display(),
            token.len()
        );
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
