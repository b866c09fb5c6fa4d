//! `fleetctl`: the fleetml operator CLI.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleet_control::server::now_ms;
use fleet_control::{bundle, keys};

/// `--version`: release, git commit, and what is compiled in.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("FLEETML_GIT_COMMIT"),
    ", features: embedded-mqtt, kubernetes, postgres, parquet)"
);

/// Operate a fleetml fleet: signing keys, model bundles, the control plane server, and
/// the devices that report to it.
#[derive(Parser, Debug)]
#[command(name = "fleetctl", version = LONG_VERSION)]
struct Cli {
    /// The control plane's API, for the operator commands (devices, drift). The token
    /// comes from FLEETML_TOKEN or ~/.config/fleetml/token.
    #[arg(long, global = true, env = "FLEETML_SERVER", default_value = fleet_control::client::DEFAULT_SERVER)]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create signing keys and trust policies.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Build, sign, verify and inspect model bundles (.fmb).
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Run the control plane: HTTP API, MQTT broker for devices (embedded unless
    /// --mqtt-url names an external one) and telemetry ingest. On first start it writes
    /// an admin API token to DATA_DIR/admin.token (mode 0600).
    Serve(ServeArgs),
    /// Enroll devices and see the fleet.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// The model registry of the control plane.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// The control plane's trust policy: which keys bundles must be signed with.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// The whole loop on this machine, narrated: a control plane and three agents as
    /// real processes, a signed model rolled out in waves, drift, retraining,
    /// champion/challenger, a canary and a rollback — with the command for each step.
    Demo {
        /// Work here instead of a fresh temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Stop everything at the end instead of leaving the fleet running.
        #[arg(long)]
        exit: bool,
    },
    /// Measure a control plane under a fleet of simulated devices (see --help).
    #[command(long_about = SIM_ABOUT)]
    Sim(SimArgs),
    /// Training jobs: run a job spec on datasets and captured data, build and register
    /// the best trial as a candidate bundle.
    #[command(subcommand)]
    Retrain(RetrainCommand),
    /// Versioned datasets (Parquet, named by content hash): import, capture, profile.
    #[command(subcommand)]
    Data(DataCommand),
    /// Staged rollouts of a model version to selected devices, with health gates.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Put the previous (or a named) version of a model back on devices, as a new
    /// assignment generation; asks for confirmation unless --yes.
    Rollback {
        /// The model to roll back.
        model: String,
        /// Return to this version instead of each device's previous one.
        #[arg(long)]
        to: Option<u64>,
        /// Only these devices (selector, as for `rollout start --to`; default: all).
        #[arg(long)]
        devices: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Start it and return without following its progress.
        #[arg(long)]
        detach: bool,
    },
    /// Operator API tokens with roles (viewer, operator, admin); admin only.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// The audit log of every mutating API call (hash-chained); `audit verify` checks it.
    Audit {
        #[command(subcommand)]
        command: Option<AuditCommand>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only the last N entries.
        #[arg(long, default_value_t = 50)]
        last: usize,
    },
    /// Latest drift scores per feature across the fleet, alerting ones first.
    Drift {
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

const SIM_ABOUT: &str = "\
Measure a control plane under a fleet of simulated devices.

Starts `fleetctl serve` (this executable) in a work directory, with its embedded broker or \
on a private mosquitto (--broker mosquitto), pushes claims v1 and v2, enrolls --devices N \
devices through the API and runs them in this process. Each speaks the real device \
protocol: its own MQTT login and last will, messages sealed with its secret and a \
contiguous sequence number, an outbox re-published until the broker acknowledges, its \
assignment fetched with its HTTP token and checked, bundles downloaded by every device \
and checked (size, SHA-256), lifecycle events and statuses as the agent sends them. No \
inference runs.

Measured: devices online in the control plane's view and how long connecting took; \
telemetry messages per second the ingest stored over a steady phase of --duration (its \
own counter; the devices' sent rate beside it); the time a rollout of claims v1 (first \
install), a rollout of v2 and a rollback to v1 take until the control plane says \
`completed` (one wave, no soak); the control plane's resident memory idle, with N \
enrolled, with N connected, at the end and at its peak, and per device; mosquitto's; \
this simulator's. At the end every outbox is drained and each device's stored messages \
are compared with what it sealed. Exits non-zero when a check fails.";

#[derive(Args, Debug)]
struct SimArgs {
    /// How many devices to simulate.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Broker: `embedded` (rumqttd inside the control plane) or `mosquitto` (started by
    /// the simulator; Debian's mosquitto package).
    #[arg(long, default_value = "embedded")]
    broker: fleet_control::sim::Broker,
    /// The mosquitto executable (default: /usr/sbin/mosquitto, /usr/bin/mosquitto, PATH).
    #[arg(long)]
    mosquitto: Option<PathBuf>,
    /// Telemetry messages per device per second: a window report per served model, or a
    /// status heartbeat while it serves none.
    #[arg(long, default_value_t = 0.2)]
    rate: f64,
    /// Length of the steady phase, in seconds (or 90s, 2m).
    #[arg(long, default_value = "30", value_parser = parse_duration)]
    duration: std::time::Duration,
    /// Device HTTP requests (assignment fetches, bundle downloads) in flight at once.
    #[arg(long, default_value_t = 64)]
    http_concurrency: usize,
    /// Work here (a new or empty folder, kept) instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Where the control plane keeps its state (created mode 0700).
    #[arg(long)]
    data_dir: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:7080")]
    listen: std::net::SocketAddr,
    /// Address of the embedded MQTT broker devices connect to.
    #[arg(long, default_value = "127.0.0.1:1883", conflicts_with = "mqtt_url")]
    mqtt_listen: std::net::SocketAddr,
    /// Use this external broker instead of the embedded one:
    /// mqtt://[USER:PASSWORD@]HOST[:PORT]. Enable its persistence.
    #[arg(long)]
    mqtt_url: Option<String>,
    /// Trust policy (TOML) handed to enrolled devices.
    #[arg(long)]
    trust: Option<PathBuf>,
    /// URL devices and operators reach the API at. Default: http://LISTEN.
    #[arg(long)]
    public_url: Option<String>,
    /// Broker URL written into enrolled devices' configs. Default: the broker's address.
    #[arg(long)]
    public_mqtt_url: Option<String>,
    /// How long an assignment a device fetched stays valid (devices refuse expired ones:
    /// an attacker cannot hold a device on old assignments longer than this). Units s, m, h, d.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    assignment_ttl: std::time::Duration,
    /// Signing key (from `fleetctl keys generate`) for the candidate bundles training
    /// jobs build; the trust policy must list its public key.
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// How often each device is told which of its messages are stored (its receipt):
    /// until then the device keeps them, so nothing the broker acknowledged but the
    /// control plane did not store is lost. Units ms, s, m, h.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    receipt_interval: std::time::Duration,
}

#[derive(Subcommand, Debug)]
enum RolloutCommand {
    /// Start rolling NAME@VERSION out to the devices SELECTOR picks, wave by wave.
    ///
    /// Example: fleetctl rollout start claims@3 --to board=raspberry-pi-4,site=lab --waves 10,50,100 --soak 10m
    Start {
        /// NAME@VERSION from the registry.
        model: String,
        /// Devices: `all`, or key=value terms that must all match: board=…, device=a|b,
        /// or any tag (site=lab).
        #[arg(long)]
        to: String,
        /// Cumulative wave sizes in percent of the selected devices, e.g. 1,10,50,100.
        #[arg(long, conflicts_with = "canary")]
        waves: Option<String>,
        /// A canary wave of this percent, then everyone (same as --waves N,100).
        #[arg(long)]
        canary: Option<u32>,
        /// Least time each wave runs before the next starts (s, m, h, d).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        soak: std::time::Duration,
        /// Percent of a wave's devices that must be active before the next wave;
        /// the others (offline devices) catch up when they return.
        #[arg(long, default_value_t = 100)]
        quorum: u32,
        /// A wave without its quorum this long after it started fails (s, m, h, d).
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        wave_deadline: std::time::Duration,
        /// When a health gate fails, return the reached devices to their previous
        /// version instead of pausing.
        #[arg(long)]
        auto_rollback: bool,
        /// Gate: most devices whose activation (or verification) failed.
        #[arg(long, default_value_t = 0)]
        max_activation_failures: u32,
        /// Gate: most devices whose golden self-test failed.
        #[arg(long, default_value_t = 0)]
        max_self_test_failures: u32,
        /// Gate: most devices that fell back from their requested backend (GPU → CPU).
        #[arg(long, default_value_t = 0)]
        max_fallbacks: u32,
        /// Gate: most devices with open drift alerts on the new version.
        #[arg(long, default_value_t = 0)]
        max_drift_alerts: u32,
        /// Gate: allowed rise of the missing-prediction rate over the old version's.
        #[arg(long, default_value_t = 0.05)]
        max_missing_rate_increase: f64,
        /// Gate: allowed ratio of the new p99 latency to the old version's.
        #[arg(long, default_value_t = 1.5)]
        max_p99_ratio: f64,
        /// Gate: allowed rise of the error rate (backend errors, timeouts) over the old's.
        #[arg(long, default_value_t = 0.01)]
        max_error_rate_increase: f64,
        /// Follow its progress until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Per-wave progress (pending, downloading, active, failed) and the health gates.
    Status {
        id: String,
        /// Redraw every second until the rollout ends.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// Every rollout and rollback, newest last.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop starting waves (devices already assigned keep their version).
    Pause { id: String },
    /// Continue a paused rollout; the gates count anew from now.
    Resume { id: String },
    /// End a rollout; devices keep what they were assigned (then `fleetctl rollback`).
    Abort { id: String },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Retrain NAME when enough of its devices hold drift alerts long enough.
    ///
    /// Example: fleetctl models policy set claims --drift-share 0.2 --for 30m --dataset 3f2a9c1e --captured-since 7d
    Set {
        model: String,
        /// Share of the devices running it that must hold a drift alert (0..1].
        #[arg(long, default_value_t = 0.2)]
        drift_share: f64,
        /// For at least this long (s, m, h, d).
        #[arg(long = "for", default_value = "30m", value_parser = parse_duration)]
        for_: std::time::Duration,
        /// Original training data added to the captured rows (repeat).
        #[arg(long = "dataset")]
        datasets: Vec<String>,
        /// Labelled rows captured within this long before the trigger.
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        captured_since: std::time::Duration,
        /// No new trigger within this long of the last one.
        #[arg(long, default_value = "6h", value_parser = parse_duration)]
        cooldown: std::time::Duration,
        /// Most of its jobs running at once.
        #[arg(long, default_value_t = 1)]
        max_jobs: usize,
        /// Start a canary rollout of a candidate that beats production on --holdout.
        #[arg(long)]
        auto_promote: bool,
        /// Dataset the challenger is compared on.
        #[arg(long)]
        holdout: Option<String>,
        /// Label column of the holdout.
        #[arg(long)]
        label: Option<String>,
        #[arg(long, default_value_t = 0.01)]
        margin: f64,
        /// Canary size in percent.
        #[arg(long, default_value_t = 5)]
        canary: u32,
        /// Keep the policy but stop triggering.
        #[arg(long)]
        disabled: bool,
        /// The job spec it retrains with (default: the one `retrain start` used last).
        #[arg(long)]
        spec: Option<PathBuf>,
    },
    /// The policy, the share alerting now, and what it did.
    Show {
        model: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum RetrainCommand {
    /// Start a training job for MODEL (its spec: --spec, or the one used last).
    Start {
        model: String,
        /// Job spec (TOML), e.g. models/claims/train.toml.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Input dataset (id or 8+ hex prefix); repeat for several.
        #[arg(long = "dataset")]
        datasets: Vec<String>,
        /// Wait for the job to end and print its result.
        #[arg(long)]
        wait: bool,
    },
    /// Every job: state, trigger, best metric, candidate.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One job with every trial.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// A trial's output (the best trial unless --trial; the first while running).
    Logs {
        id: String,
        #[arg(long)]
        trial: Option<usize>,
        /// Keep printing as the trial writes, until the job ends.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Stop a running job.
    Cancel { id: String },
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Import a CSV, JSON-lines or Parquet file, or the rows of a PostgreSQL query, as
    /// an immutable dataset.
    ///
    /// Example: fleetctl data import --postgres postgres://reader@db:5432/claims --query "SELECT * FROM claims"
    Import {
        /// The file (its extension picks the format unless --format says).
        #[arg(required_unless_present = "postgres", conflicts_with = "postgres")]
        file: Option<PathBuf>,
        /// A PostgreSQL connection string (postgres://USER[:PASSWORD]@HOST[:PORT]/DB);
        /// the password never reaches the dataset's manifest.
        #[arg(long, requires = "query")]
        postgres: Option<String>,
        /// The SQL query whose rows become the dataset (with --postgres).
        #[arg(long, requires = "postgres")]
        query: Option<String>,
        /// csv, jsonl or parquet.
        #[arg(long)]
        format: Option<String>,
        /// A human label for it.
        #[arg(long)]
        name: Option<String>,
        /// Drop rows missing a value in any of these comma-separated columns.
        #[arg(long)]
        drop_na: Option<String>,
    },
    /// A dataset from the data devices captured for MODEL.
    Capture {
        model: String,
        /// Only rows captured within this long before now (s, m, h, d), e.g. 7d.
        #[arg(long, value_parser = parse_duration)]
        since: Option<std::time::Duration>,
        /// Only rows with a ground-truth label.
        #[arg(long)]
        labelled_only: bool,
        /// Name of the label column (the training target), default `label`.
        #[arg(long)]
        label_column: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
    /// Every dataset: id, name, rows, columns, sources.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One dataset's manifest (ids may be shortened to 8+ hex digits).
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a dataset to a file (Parquet, or CSV with --format csv).
    Export {
        id: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "parquet")]
        format: String,
    },
    /// Per-column distribution, missingness, association with --target and drift
    /// against a bundle's reference profile; a table, and a self-contained HTML report
    /// with --html.
    Profile {
        id: String,
        #[arg(long)]
        target: Option<String>,
        /// NAME@VERSION whose reference profile is the drift baseline.
        #[arg(long)]
        reference: Option<String>,
        /// Also write the HTML report here.
        #[arg(long)]
        html: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a dataset (models trained on it can no longer be reproduced).
    Delete {
        id: String,
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokensCommand {
    /// Create a token; it is printed once and stored only as a hash.
    Create {
        /// viewer (read), operator (push, rollouts, rollback), admin (tokens, trust, enrollment).
        #[arg(long)]
        role: String,
        /// Who or what uses it (shown in the audit log; default: "ROLE token").
        #[arg(long)]
        name: Option<String>,
    },
    /// Tokens by id, name and role (never the tokens themselves).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Fetch the whole log and check its hash chain here; exits 1 when an entry was
    /// changed, inserted or deleted.
    Verify,
}

#[derive(Subcommand, Debug)]
enum TrustCommand {
    /// Print the policy the server verifies bundles with.
    Show,
    /// Replace it (validated first; kept in the server's DATA_DIR/trust.toml).
    Set {
        /// A trust policy from `fleetctl keys trust-policy`.
        policy: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// Champion/challenger: evaluate NAME@A and NAME@B on a labelled dataset with the
    /// agents' runtime — accuracy/AUC or MAE, per board and tag slice, latency — side
    /// by side.
    Compare {
        a: String,
        b: String,
        /// The dataset (id or 8+ hex prefix) to evaluate on.
        #[arg(long)]
        on: String,
        /// Label column (default: the model's job spec label, else `label`).
        #[arg(long)]
        label: Option<String>,
        /// How much better B must be on the deciding metric to win.
        #[arg(long, default_value_t = 0.0)]
        margin: f64,
        #[arg(long)]
        json: bool,
    },
    /// The drift-triggered retraining policy of a model.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Re-run the training job that produced NAME@VERSION from its lineage (same
    /// dataset, code, parameters, seed) and report: artifact hash identical or not,
    /// metric within --tolerance, lineage fields that differ now. Exits 1 when neither
    /// the artifact nor the metric reproduces.
    Reproduce {
        model: String,
        /// Return the job id without waiting.
        #[arg(long)]
        detach: bool,
        #[arg(long)]
        json: bool,
    },
    /// Upload a bundle. The server verifies it against its trust policy before keeping
    /// it; pushing the same bytes again changes nothing, other bytes under an existing
    /// name and version are refused.
    Push { bundle: PathBuf },
    /// Every model version in the registry.
    List {
        #[arg(long)]
        json: bool,
    },
    /// A model (NAME: its versions and where they run) or one version (NAME@VERSION:
    /// manifest, lineage, feature schema, payloads, signatures, where it runs now).
    Show {
        /// NAME or NAME@VERSION.
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Lineage, feature schema, inputs, monitoring settings and reference profile of two
    /// versions, side by side (only what differs).
    Diff {
        /// NAME@VERSION
        a: String,
        /// NAME@VERSION
        b: String,
        #[arg(long)]
        json: bool,
    },
    /// Move a version to a stage: candidate, staging, production or archived.
    Stage {
        /// NAME@VERSION
        model: String,
        #[arg(value_parser = fleet_control::registry::STAGES)]
        stage: String,
    },
    /// Set (k=v) or remove (--remove k) free tags of a version.
    Tag {
        /// NAME@VERSION
        model: String,
        /// k=v,k=v
        #[arg(value_delimiter = ',')]
        set: Vec<String>,
        /// Tag keys to remove; repeatable.
        #[arg(long)]
        remove: Vec<String>,
    },
}

/// `NAME@VERSION` (the `v` optional) as its API path `/v1/models/NAME/VERSION`.
fn version_path(model: &str) -> anyhow::Result<String> {
    let (name, version) =
        fleet_control::registry::parse_model_version(model).map_err(anyhow::Error::msg)?;
    Ok(format!("/v1/models/{name}/{version}"))
}

#[derive(Subcommand, Debug)]
enum DevicesCommand {
    /// Issue a device id and secret and write a complete agent config, so that
    /// `fleet-agent run --config agent.toml --data-dir D` joins the fleet.
    Enroll {
        /// The device id: 1-64 lowercase letters, digits, `-`, `_`, `.`.
        name: String,
        /// Board profile name the device runs on (e.g. raspberry-pi-4).
        #[arg(long)]
        board: Option<String>,
        /// Free tags: k=v,k=v.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Trust policy to write into the config when the server has none (--trust of serve).
        #[arg(long)]
        trust: Option<PathBuf>,
        /// Where to write the agent config (mode 0600: it holds the device secret).
        #[arg(long)]
        out: PathBuf,
    },
    /// Devices with board, tags, online/offline and last seen, active models, open alerts.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One device: status, latest windows, recent events.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Ask a device to send its status now (command over MQTT; the answer arrives as
    /// an acknowledgement in `devices show`).
    SendStatus { id: String },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Generate an ed25519 signing key: DIR/NAME.key (PKCS#8, mode 0600) and DIR/NAME.pub.
    ///
    /// Prints the key id (first 8 bytes of the SHA-256 of the public key, in hex).
    /// Refuses to overwrite an existing key.
    Generate {
        /// Directory for the key files (created with mode 0700 if missing).
        #[arg(long)]
        out: PathBuf,
        /// Base name of the key files.
        #[arg(long, default_value = "signing")]
        name: String,
    },
    /// Write a trust policy (TOML) that agents and verifiers load: the public keys allowed
    /// to sign bundles and how many of them must have signed.
    TrustPolicy {
        /// A public key file (NAME.pub); repeat for several keys.
        #[arg(long = "public", required = true)]
        public: Vec<PathBuf>,
        /// How many distinct listed keys must sign a bundle (k of n).
        #[arg(long, default_value_t = 1)]
        threshold: u32,
        /// Where to write the policy.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing policy file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BundleCommand {
    /// Build a bundle from an ONNX model, its feature schema, and optional reference
    /// data, golden rows and lineage.
    Build(Box<BuildArgs>),
    /// Add a signature to a bundle, in place. Signing twice with one key changes nothing.
    Sign {
        /// The bundle to sign.
        bundle: PathBuf,
        /// Private key (PKCS#8, mode 0600), from `fleetctl keys generate`.
        #[arg(long)]
        key: PathBuf,
    },
    /// Verify a bundle against a trust policy: structure, signatures, payload hashes,
    /// manifest. Exit 0 and a one-line summary, or non-zero naming what failed.
    Verify {
        bundle: PathBuf,
        /// Trust policy (TOML) from `fleetctl keys trust-policy`.
        #[arg(long)]
        trust: PathBuf,
    },
    /// Show a bundle's manifest, lineage, feature schema, payloads and signatures.
    /// Signatures are listed, not checked: use `bundle verify` for that.
    Inspect {
        bundle: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct BuildArgs {
    /// The ONNX model.
    #[arg(long)]
    model: PathBuf,
    /// Declare an input's shape, for models whose ONNX inputs leave dimensions unknown:
    /// NAME=D1,D2,… with sizes or symbols (a symbol such as N is a free batch size; H,
    /// W a free image size), NAME= for a scalar. The element type stays the model's.
    /// Repeatable.
    #[arg(long = "input-shape", value_parser = fleet_control::onnx::parse_input_shape)]
    input_shapes: Vec<fleetml_protocol::manifest::TensorSpec>,
    /// Model name (letters, digits, `_`, `-`, `.`).
    #[arg(long)]
    name: String,
    /// Model version, a monotonic integer (at least 1).
    #[arg(long)]
    version: u64,
    /// Free-form version label.
    #[arg(long, default_value = "")]
    label: String,
    /// Feature schema (TOML): the raw features and how they map onto the model input.
    /// Without it the model takes raw tensors only (e.g. an image model).
    #[arg(long)]
    features: Option<PathBuf>,
    /// CSV of training-distribution rows; stores the reference profile drift is measured against.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// CSV of rows whose model outputs are stored for the device's self-test.
    #[arg(long)]
    golden: Option<PathBuf>,
    /// How many rows of --golden to store.
    #[arg(long, default_value_t = 16)]
    golden_rows: usize,
    /// Golden input tensors for a raw-tensor model: an .npz (`numpy.savez`) with one array
    /// per model input, named by the input. Their outputs are computed by ONNX Runtime
    /// when it is available (--onnxruntime), else by tract, and every backend the bundle
    /// targets that can run here is checked against them.
    #[arg(long, value_name = "FILE.npz")]
    golden_inputs: Option<PathBuf>,
    /// libonnxruntime for golden outputs (the reference implementation), e.g. the PyPI
    /// wheel's onnxruntime/capi/libonnxruntime.so.1.x.y.
    #[arg(long, env = "ORT_DYLIB_PATH", value_name = "PATH")]
    onnxruntime: Option<PathBuf>,
    /// Build even when a target backend disagrees with the golden outputs; the
    /// disagreement is recorded in the bundle's golden-check.json.
    #[arg(long)]
    allow_backend_disagreement: bool,
    /// Lineage (TOML): dataset, code, framework, dependencies, container, CUDA, params, seed, device.
    #[arg(long)]
    lineage: Option<PathBuf>,
    /// Monitoring settings (TOML) for this model: `window_predictions`, `window_seconds`,
    /// `drift_psi`, `drift_js`, `drift_chi2_p`, `missing_rate`, `lag_p95_ms`,
    /// `alert_windows`. A device's own agent configuration overrides each it sets.
    #[arg(long)]
    monitoring: Option<PathBuf>,
    /// Serve with dynamic batching: concurrent requests coalesce into batches of up to
    /// N rows (2 or more; every input needs a symbolic leading dimension). A device's
    /// `[[batching]]` in agent.toml overrides it.
    #[arg(long, value_name = "N")]
    max_batch: Option<u32>,
    /// With --max-batch: longest the first request of a batch waits for others
    /// (microseconds; the agent's default is 1000).
    #[arg(long, value_name = "US", requires = "max_batch")]
    max_queue_delay_us: Option<u64>,
    /// Quantile bins per numeric feature in the reference profile.
    #[arg(long, default_value_t = 10)]
    bins: u32,
    /// Prepare the model for another backend as well: `gpu` stores a copy with static
    /// shapes and lowered operators for wonnx (model.gpu.onnx) and the compatibility
    /// report listing operators it cannot run (gpu-compat.json). Repeatable.
    #[arg(long = "prepare", value_parser = ["gpu"])]
    prepare: Vec<String>,
    /// Batch size the GPU-prepared model is fixed to (wonnx needs static shapes).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    gpu_batch: u64,
    /// Backend the bundle was prepared for (cpu, gpu, npu); repeatable. Default: cpu.
    #[arg(long = "backend")]
    backends: Vec<String>,
    /// Board profile name the bundle targets; repeatable. Default: any.
    #[arg(long = "board")]
    boards: Vec<String>,
    /// Oldest agent release that may run the bundle.
    #[arg(long, default_value = fleetml_protocol::VERSION)]
    min_agent_version: String,
    /// Creation time, seconds since the Unix epoch. Default: $SOURCE_DATE_EPOCH, else now.
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    created_at: Option<u64>,
    /// Extra file to carry in the bundle; repeatable.
    #[arg(long)]
    extra: Vec<PathBuf>,
    /// Sign with this private key right away; repeatable.
    #[arg(long = "key")]
    keys: Vec<PathBuf>,
    /// Where to write the bundle.
    #[arg(long)]
    out: PathBuf,
}

/// `k=v` arguments as a JSON object.
fn pairs(args: &[String]) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut map = serde_json::Map::new();
    for t in args.iter().filter(|t| !t.is_empty()) {
        let (k, v) = t
            .split_once('=')
            .with_context(|| format!("`{t}` is not k=v"))?;
        map.insert(k.trim().into(), v.trim().into());
    }
    Ok(map)
}

/// Asks QUESTION on the terminal; false unless the answer is y or yes. Without a
/// terminal it refuses rather than guess (use --yes).
fn confirm(question: &str) -> anyhow::Result<bool> {
    use std::io::Write;
    anyhow::ensure!(
        std::io::stdin().is_terminal(),
        "not a terminal: pass --yes to confirm"
    );
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim().to_lowercase().as_str(), "y" | "yes"))
}

fn print_dataset(m: &serde_json::Value) {
    println!(
        "dataset {} ({}): {} rows, {} columns",
        m["id"].as_str().unwrap_or("?"),
        m["name"].as_str().unwrap_or("?"),
        m["rows"],
        m["schema"].as_array().map_or(0, Vec::len)
    );
}

/// Polls job `id` until it ends; returns it.
fn wait_job(client: &fleet_control::client::Client, id: &str) -> anyhow::Result<serde_json::Value> {
    loop {
        let job = client.get(&format!("/v1/retrain/{id}"))?;
        if matches!(
            job["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return Ok(job);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn job_line(j: &serde_json::Value) -> String {
    let best = j["best"]
        .as_u64()
        .and_then(|b| j["trials"].get(b as usize).cloned());
    format!(
        "{:<6} {:<9} {:<10} {:<16} {:>7} {:>10} {:<14} {}",
        j["id"].as_str().unwrap_or("?"),
        j["kind"].as_str().unwrap_or("?"),
        j["state"].as_str().unwrap_or("?"),
        j["model"].as_str().unwrap_or("?"),
        j["trials"].as_array().map_or(0, Vec::len),
        best.as_ref()
            .and_then(|b| b["metric"].as_f64())
            .map_or("-".into(), |m| format!("{m:.4}")),
        j["candidate"].as_array().map_or("-".into(), |c| format!(
            "{}@v{}",
            c[0].as_str().unwrap_or("?"),
            c[1]
        )),
        j["trigger"].as_str().unwrap_or("")
    )
}

fn retrain_command(server: &str, cmd: RetrainCommand) -> anyhow::Result<()> {
    let client = fleet_control::client::Client::new(server)?;
    match cmd {
        RetrainCommand::Start {
            model,
            spec,
            datasets,
            wait,
        } => {
            let spec = match spec {
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            let job = client.post(
                "/v1/retrain",
                &serde_json::json!({ "model": model, "spec": spec, "datasets": datasets }),
            )?;
            let id = job["id"].as_str().unwrap_or("?").to_string();
            println!(
                "job {id} started ({} trial(s))",
                job["spec"]["grid"].as_object().map_or(1, |g| g
                    .values()
                    .filter_map(|v| v.as_array())
                    .map(Vec::len)
                    .filter(|n| *n > 0)
                    .product::<usize>())
            );
            if wait {
                let done = wait_job(&client, &id)?;
                println!("{}", job_line(&done));
                if done["state"] != "succeeded" {
                    anyhow::bail!(
                        "job {id} {}: {}",
                        done["state"].as_str().unwrap_or("?"),
                        done["error"].as_str().unwrap_or("")
                    );
                }
                if let Some(c) = done["candidate"].as_array() {
                    println!(
                        "candidate {}@v{} registered (compare it: fleetctl models compare {0}@PRODUCTION {0}@{1} --on DATASET)",
                        c[0].as_str().unwrap_or("?"),
                        c[1]
                    );
                }
            }
        }
        RetrainCommand::List { json } => {
            let list = client.get("/v1/retrain")?;
            if json {
                print_json(&list)?;
            } else {
                println!(
                    "{:<6} {:<9} {:<10} {:<16} {:>7} {:>10} {:<14} TRIGGER",
                    "JOB", "KIND", "STATE", "MODEL", "TRIALS", "BEST", "CANDIDATE"
                );
                for j in list.as_array().cloned().unwrap_or_default() {
                    println!("{}", job_line(&j));
                }
            }
        }
        RetrainCommand::Show { id, json } => {
            let j = client.get(&format!("/v1/retrain/{id}"))?;
            if json {
                print_json(&j)?;
            } else {
                println!("{}", job_line(&j));
                if let Some(e) = j["error"].as_str() {
                    println!("error: {e}");
                }
                println!(
                    "training dataset: {}",
                    j["training_dataset"].as_str().unwrap_or("-")
                );
                for t in j["trials"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "  trial {:<3} {:<10} {} = {:<10} {:>6.1}s  {}{}",
                        t["n"],
                        t["state"].as_str().unwrap_or("?"),
                        j["spec"]["metric"].as_str().unwrap_or("metric"),
                        t["metric"]
                            .as_f64()
                            .map_or("-".into(), |m| format!("{m:.4}")),
                        t["seconds"].as_f64().unwrap_or(0.0),
                        serde_json::to_string(&t["params"]).unwrap_or_default(),
                        t["error"]
                            .as_str()
                            .map(|e| format!("  ({e})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        RetrainCommand::Logs { id, trial, follow } => {
            use std::io::Write;
            let trial = trial.map(|n| format!("&trial={n}")).unwrap_or_default();
            let mut offset = 0u64;
            loop {
                // The job's state before the read: its log is complete once it ended.
                let ended = follow
                    && matches!(
                        client.get(&format!("/v1/retrain/{id}"))?["state"].as_str(),
                        Some("succeeded" | "failed" | "cancelled")
                    );
                let bytes =
                    client.get_bytes(&format!("/v1/retrain/{id}/logs?from={offset}{trial}"))?;
                offset += bytes.len() as u64;
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)?;
                out.flush()?;
                if !follow || ended {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        RetrainCommand::Cancel { id } => {
            client.post(&format!("/v1/retrain/{id}/cancel"), &serde_json::json!({}))?;
            println!("cancelling job {id}");
        }
    }
    Ok(())
}

fn data_command(server: &str, cmd: DataCommand) -> anyhow::Result<()> {
    let client = fleet_control::client::Client::new(server)?;
    match cmd {
        DataCommand::Import {
            file,
            postgres,
            query,
            format,
            name,
            drop_na,
        } => {
            let (format, bytes, source) = match (file, postgres, query) {
                (_, Some(url), Some(sql)) => {
                    let (body, rows) = fleet_control::pg::query_csv(&url, &sql)?;
                    let from = fleet_control::pg::describe(&url)?;
                    eprintln!("{rows} rows from {from}");
                    ("csv".to_string(), body, format!("{from}: {sql}"))
                }
                (Some(file), _, _) => {
                    let bytes = std::fs::read(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    let format = format.unwrap_or_else(|| {
                        match file.extension().and_then(|e| e.to_str()).unwrap_or("") {
                            "parquet" | "pq" => "parquet",
                            "jsonl" | "ndjson" | "json" => "jsonl",
                            _ => "csv",
                        }
                        .to_string()
                    });
                    (format, bytes, format!("file {}", file.display()))
                }
                _ => anyhow::bail!("give a FILE, or --postgres URL --query SQL"),
            };
            let mut query = vec![("format", format.clone()), ("source", source)];
            if let Some(n) = name {
                query.push(("name", n));
            }
            if let Some(d) = drop_na {
                query.push(("drop_na", d));
            }
            let qs: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{k}={}", fleet_control::client::encode(v)))
                .collect();
            let r = client.post_raw(
                &format!("/v1/datasets?{}", qs.join("&")),
                "application/octet-stream",
                bytes,
            )?;
            if r["created"] == false {
                print!("already stored: ");
            }
            print_dataset(&r["dataset"]);
        }
        DataCommand::Capture {
            model,
            since,
            labelled_only,
            label_column,
            name,
        } => {
            let since_ms = since.map(|d| now_ms().saturating_sub(d.as_millis() as u64));
            let r = client.post(
                "/v1/datasets/from-captures",
                &serde_json::json!({
                    "model": model, "since_ms": since_ms, "labelled_only": labelled_only,
                    "label_column": label_column, "name": name,
                }),
            )?;
            print_dataset(&r["dataset"]);
        }
        DataCommand::List { json } => {
            let list = client.get("/v1/datasets")?;
            if json {
                print_json(&list)?;
            } else {
                println!(
                    "{:<16} {:>9} {:>7}  {:<19}  {:<30} SOURCES",
                    "ID", "ROWS", "COLUMNS", "CREATED (UTC)", "NAME"
                );
                for m in list.as_array().cloned().unwrap_or_default() {
                    println!(
                        "{:<16} {:>9} {:>7}  {:<19}  {:<30} {}",
                        m["id"].as_str().unwrap_or("?").get(..16).unwrap_or("?"),
                        m["rows"],
                        m["schema"].as_array().map_or(0, Vec::len),
                        fleet_control::views::utc(m["created_ms"].as_u64().unwrap_or(0)),
                        m["name"].as_str().unwrap_or("?"),
                        m["sources"]
                            .as_array()
                            .map(|s| s
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join("; "))
                            .unwrap_or_default()
                    );
                }
            }
        }
        DataCommand::Show { id, json } => {
            let m = client.get(&format!("/v1/datasets/{id}"))?;
            if json {
                print_json(&m)?;
            } else {
                print_dataset(&m);
                println!(
                    "created {} UTC",
                    fleet_control::views::utc(m["created_ms"].as_u64().unwrap_or(0))
                );
                for key in ["sources", "devices", "filters"] {
                    let items: Vec<String> = m[key]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect();
                    if !items.is_empty() {
                        println!("{key}: {}", items.join(", "));
                    }
                }
                if let Some(r) = m["time_range"].as_array() {
                    println!(
                        "time range: {} .. {} UTC",
                        fleet_control::views::utc(r[0].as_u64().unwrap_or(0)),
                        fleet_control::views::utc(r[1].as_u64().unwrap_or(0))
                    );
                }
                if m["available"] == false {
                    println!("its data file is missing");
                }
                for c in m["schema"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "  {:<30} {}",
                        c["name"].as_str().unwrap_or("?"),
                        c["kind"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        DataCommand::Export { id, out, format } => {
            let bytes = client.get_bytes(&format!("/v1/datasets/{id}/data?format={format}"))?;
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} ({} bytes, {format})", out.display(), bytes.len());
        }
        DataCommand::Profile {
            id,
            target,
            reference,
            html,
            json,
        } => {
            let mut q = Vec::new();
            if let Some(t) = &target {
                q.push(format!("target={}", fleet_control::client::encode(t)));
            }
            if let Some(r) = &reference {
                q.push(format!("reference={}", fleet_control::client::encode(r)));
            }
            let p = client.get(&format!("/v1/datasets/{id}/profile?{}", q.join("&")))?;
            if json {
                print_json(&p)?;
            } else {
                print!("{}", fleet_control::profile::table(&p));
            }
            if let Some(path) = html {
                let page = fleet_control::profile::html(&p, &format!("dataset {id}"));
                std::fs::write(&path, page)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
        DataCommand::Delete { id, yes } => {
            let m = client.get(&format!("/v1/datasets/{id}"))?;
            print_dataset(&m);
            if !yes && !confirm("delete it? models trained on it can no longer be reproduced")? {
                anyhow::bail!("not deleted");
            }
            client.delete(&format!("/v1/datasets/{}", m["id"].as_str().unwrap_or(&id)))?;
            println!("deleted");
        }
    }
    Ok(())
}

fn rollout_command(server: &str, cmd: RolloutCommand) -> anyhow::Result<()> {
    let client = fleet_control::client::Client::new(server)?;
    match cmd {
        RolloutCommand::Start {
            model,
            to,
            waves,
            canary,
            soak,
            quorum,
            wave_deadline,
            auto_rollback,
            max_activation_failures,
            max_self_test_failures,
            max_fallbacks,
            max_drift_alerts,
            max_missing_rate_increase,
            max_p99_ratio,
            max_error_rate_increase,
            watch: follow,
        } => {
            let (name, version) =
                fleet_control::registry::parse_model_version(&model).map_err(anyhow::Error::msg)?;
            let r = client.post(
                "/v1/rollouts",
                &serde_json::json!({
                    "model": name, "version": version, "to": to, "waves": waves, "canary": canary,
                    "soak_s": soak.as_secs(), "quorum_pct": quorum, "deadline_s": wave_deadline.as_secs(),
                    "auto_rollback": auto_rollback,
                    "gates": {
                        "max_activation_failures": max_activation_failures,
                        "max_self_test_failures": max_self_test_failures,
                        "max_fallbacks": max_fallbacks,
                        "max_drift_alerts": max_drift_alerts,
                        "max_missing_rate_increase": max_missing_rate_increase,
                        "max_p99_ratio": max_p99_ratio,
                        "max_error_rate_increase": max_error_rate_increase,
                    },
                }),
            )?;
            let id = r["id"].as_str().unwrap_or("?").to_string();
            println!(
                "rollout {id} started: {name}@v{version} to {} device(s) in {} wave(s)",
                r["devices_total"],
                r["waves"].as_array().map_or(0, Vec::len)
            );
            if follow {
                watch(&client, &id)?;
            } else {
                println!("follow it with: fleetctl rollout status {id} --watch");
            }
        }
        RolloutCommand::Status {
            id,
            watch: follow,
            json,
        } => {
            if follow {
                watch(&client, &id)?;
            } else {
                let v = client.get(&format!("/v1/rollouts/{id}"))?;
                if json {
                    print_json(&v)?;
                } else {
                    print!("{}", fleet_control::views::rollout_status(&v));
                }
            }
        }
        RolloutCommand::List { json } => {
            let list = client.get("/v1/rollouts")?;
            if json {
                print_json(&list)?;
            } else {
                println!(
                    "{:<6} {:<9} {:<20} {:>8} {:<11} {:>9}  SELECTOR",
                    "ID", "KIND", "MODEL", "VERSION", "STATE", "ACTIVE"
                );
                for r in list.as_array().cloned().unwrap_or_default() {
                    println!(
                        "{:<6} {:<9} {:<20} {:>8} {:<11} {:>9}  {}",
                        r["id"].as_str().unwrap_or("?"),
                        r["kind"].as_str().unwrap_or("?"),
                        r["model"].as_str().unwrap_or("?"),
                        r["version"]
                            .as_u64()
                            .map_or("mixed".into(), |v| format!("v{v}")),
                        r["state"].as_str().unwrap_or("?"),
                        format!("{}/{}", r["devices_active"], r["devices_total"]),
                        r["selector"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        RolloutCommand::Pause { id } => control_rollout(&client, &id, "pause")?,
        RolloutCommand::Resume { id } => control_rollout(&client, &id, "resume")?,
        RolloutCommand::Abort { id } => control_rollout(&client, &id, "abort")?,
    }
    Ok(())
}

/// `rollout pause|resume|abort ID`.
fn control_rollout(
    client: &fleet_control::client::Client,
    id: &str,
    action: &str,
) -> anyhow::Result<()> {
    let v = client.post(
        &format!("/v1/rollouts/{id}/{action}"),
        &serde_json::json!({}),
    )?;
    println!("rollout {id} is {}", v["state"].as_str().unwrap_or("?"));
    Ok(())
}

/// Follows rollout `id` until it ends: a redrawn status on a terminal, a line per change
/// otherwise. Fails when it ends other than completed.
fn watch(client: &fleet_control::client::Client, id: &str) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let v = client.get(&format!("/v1/rollouts/{id}"))?;
        let text = fleet_control::views::rollout_status(&v);
        if tty {
            print!("\x1b[2J\x1b[H{text}");
        } else if text != last {
            println!("{}", fleet_control::views::rollout_line(&v));
        }
        last = text;
        let state = v["state"].as_str().unwrap_or("?");
        match state {
            "completed" => return Ok(()),
            "aborted" | "rolled_back" => {
                anyhow::bail!(
                    "{} {id} {state}: {}",
                    v["kind"].as_str().unwrap_or("rollout"),
                    v["reason"].as_str().unwrap_or("")
                )
            }
            "paused" if !tty => anyhow::bail!(
                "{} {id} paused: {} (fleetctl rollout resume|abort {id})",
                v["kind"].as_str().unwrap_or("rollout"),
                v["reason"].as_str().unwrap_or("")
            ),
            _ => {}
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// `90`, `90s`, `15m`, `2h`, `7d`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 90s, 15m, 2h or 7d"))?;
    let millis = match unit {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        "d" => n.saturating_mul(86_400_000),
        _ => return Err(format!("`{text}`: unit `{unit}` is not ms, s, m, h or d")),
    };
    Ok(std::time::Duration::from_millis(millis))
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn enroll(
    server: &str,
    name: String,
    board: Option<String>,
    tags: Vec<String>,
    trust: Option<PathBuf>,
    out: PathBuf,
) -> anyhow::Result<()> {
    use fleet_control::client::Client;
    anyhow::ensure!(
        !out.exists(),
        "{} already exists; refusing to overwrite a device config",
        out.display()
    );
    let tag_map = pairs(&tags).context("--tags")?;
    let local_trust = match &trust {
        Some(p) => Some(keys::load_policy(p)?.to_toml()),
        None => None,
    };
    let client = Client::new(server)?;
    let r = client.post(
        "/v1/devices",
        &serde_json::json!({ "id": name, "board": board, "tags": tag_map }),
    )?;
    let policy = r["trust_policy"]
        .as_str()
        .map(str::to_string)
        .or(local_trust);
    let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
    let mut table = toml::Table::new();
    for key in ["device_id", "device_secret", "control_plane", "mqtt_url"] {
        table.insert(key.into(), toml::Value::String(s(key)));
    }
    match &policy {
        Some(p) => {
            let policy: toml::Table = toml::from_str(p).context("the trust policy")?;
            table.insert("trust_policy".into(), toml::Value::Table(policy));
        }
        None => eprintln!(
            "warning: no trust policy (the server has none and --trust was not given): \
             add `trust = \"PATH\"` to {} before the agent installs bundles",
            out.display()
        ),
    }
    let mut text = format!(
        "# fleetml agent configuration of device {id}, written by `fleetctl devices enroll`.\n\
         # It holds the device secret: keep it mode 0600, off shared storage and version control.\n\
         # Run: fleet-agent run --config THIS_FILE --data-dir /var/lib/fleetml\n",
        id = s("device_id"),
    );
    if let Some(b) = &board {
        text.push_str(&format!(
            "# Board profile: {b} (add `board = \"/path/to/{b}.toml\"` to use its backend order).\n"
        ));
    }
    text.push_str(&toml::to_string(&table).context("writing the agent config")?);
    fleet_control::output::create_new(&out, 0o600, text.as_bytes())?;
    println!(
        "enrolled {} -> {} (mode 0600; it holds the device secret)",
        s("device_id"),
        out.display()
    );
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let server = cli.server.clone();
    match cli.command {
        Command::Serve(a) => {
            let mqtt = match &a.mqtt_url {
                Some(u) => {
                    fleet_control::server::Mqtt::External(u.parse().map_err(anyhow::Error::msg)?)
                }
                None => fleet_control::server::Mqtt::Embedded(a.mqtt_listen),
            };
            let opts = fleet_control::server::Options {
                data_dir: a.data_dir,
                listen: a.listen,
                mqtt,
                trust: a.trust,
                public_url: a.public_url,
                public_mqtt_url: a.public_mqtt_url,
                assignment_ttl: a.assignment_ttl,
                signing_key: a.signing_key,
                receipt_interval: a.receipt_interval,
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(fleet_control::server::serve(opts))?;
        }
        Command::Devices(DevicesCommand::Enroll {
            name,
            board,
            tags,
            trust,
            out,
        }) => enroll(&server, name, board, tags, trust, out)?,
        Command::Models(ModelsCommand::Push { bundle: path }) => {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let r = fleet_control::client::Client::new(&server)?.post_bytes("/v1/models", bytes)?;
            let m = &r["model"];
            if r["unchanged"] == true {
                println!(
                    "{}@v{} is already in the registry with these bytes; nothing changed",
                    m["name"].as_str().unwrap_or("?"),
                    m["version"]
                );
            } else {
                println!(
                    "pushed {}@v{} (sha256 {}, stage {})",
                    m["name"].as_str().unwrap_or("?"),
                    m["version"],
                    m["digest"].as_str().unwrap_or("?"),
                    m["stage"].as_str().unwrap_or("?")
                );
            }
        }
        Command::Models(ModelsCommand::List { json }) => {
            let list = fleet_control::client::Client::new(&server)?.get("/v1/models")?;
            if json {
                print_json(&list)?;
            } else {
                let rows = list.as_array().cloned().unwrap_or_default();
                if rows.is_empty() {
                    println!(
                        "the registry is empty; add a model with `fleetctl models push FILE.fmb`"
                    );
                } else {
                    println!(
                        "{:<20} {:>8} {:<12} {:<16} {:>10}  SHA256",
                        "MODEL", "VERSION", "STAGE", "LABEL", "SIZE"
                    );
                    for m in rows {
                        println!(
                            "{:<20} {:>8} {:<12} {:<16} {:>10}  {}",
                            m["name"].as_str().unwrap_or("?"),
                            format!("v{}", m["version"]),
                            m["stage"].as_str().unwrap_or("?"),
                            m["label"].as_str().unwrap_or(""),
                            fleet_control::output::human_size(m["size"].as_u64().unwrap_or(0)),
                            m["digest"].as_str().unwrap_or("?").get(..16).unwrap_or("?")
                        );
                    }
                }
            }
        }
        Command::Models(ModelsCommand::Show { model, json }) => {
            let client = fleet_control::client::Client::new(&server)?;
            let v = if model.contains('@') {
                client.get(&version_path(&model)?)?
            } else {
                client.get(&format!("/v1/models/{model}"))?
            };
            if json {
                print_json(&v)?;
            } else {
                if let Some(front) = v.get("bundle") {
                    println!("{}", serde_json::to_string_pretty(front)?);
                } else {
                    for m in v["versions"].as_array().cloned().unwrap_or_default() {
                        println!(
                            "v{:<6} {:<12} {}",
                            m["version"],
                            m["stage"].as_str().unwrap_or("?"),
                            m["digest"].as_str().unwrap_or("?")
                        );
                    }
                }
                let on = v["running_on"].as_array().cloned().unwrap_or_default();
                println!("running on {} device(s)", on.len());
                for d in on {
                    println!(
                        "  {} v{} on {}{}",
                        d["device"].as_str().unwrap_or("?"),
                        d["version"],
                        d["backend"].as_str().unwrap_or("?"),
                        if d["online"] == true {
                            ""
                        } else {
                            " (offline)"
                        }
                    );
                }
            }
        }
        Command::Rollout(cmd) => rollout_command(&server, cmd)?,
        Command::Data(cmd) => data_command(&server, cmd)?,
        Command::Demo { dir, exit } => fleet_control::demo::run(dir, exit)?,
        Command::Sim(a) => {
            let report = fleet_control::sim::run(&fleet_control::sim::Options {
                devices: a.devices,
                broker: a.broker,
                mosquitto: a.mosquitto,
                rate: a.rate,
                duration: a.duration,
                dir: a.dir,
                http_concurrency: a.http_concurrency,
            })?;
            if a.json {
                print_json(&serde_json::to_value(&report)?)?;
            } else {
                print!("{}", report.table());
            }
            anyhow::ensure!(
                report.ok(),
                "the simulation failed: {}",
                report.failures.join("; ")
            );
        }
        Command::Retrain(cmd) => retrain_command(&server, cmd)?,
        Command::Models(ModelsCommand::Compare {
            a,
            b,
            on,
            label,
            margin,
            json,
        }) => {
            let r = fleet_control::client::Client::new(&server)?.post(
                "/v1/compare",
                &serde_json::json!({ "a": a, "b": b, "dataset": on, "label": label, "margin": margin }),
            )?;
            if json {
                print_json(&r)?;
            } else {
                print!("{}", fleet_control::views::comparison(&r));
            }
        }
        Command::Models(ModelsCommand::Policy(PolicyCommand::Set {
            model,
            drift_share,
            for_,
            datasets,
            captured_since,
            cooldown,
            max_jobs,
            auto_promote,
            holdout,
            label,
            margin,
            canary,
            disabled,
            spec,
        })) => {
            let spec = match spec {
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            let r = fleet_control::client::Client::new(&server)?.call_json(
                "PUT",
                &format!("/v1/models/{model}/policy"),
                &serde_json::json!({
                    "drift_share": drift_share, "for_s": for_.as_secs(), "datasets": datasets,
                    "captured_since_s": captured_since.as_secs(), "cooldown_s": cooldown.as_secs(),
                    "max_jobs": max_jobs, "auto_promote": auto_promote, "holdout": holdout,
                    "label": label, "margin": margin, "canary_pct": canary, "enabled": !disabled,
                    "spec": spec,
                }),
            )?;
            println!(
                "retraining policy of {model} set: {:.0}% of its devices alerting for {} s{}",
                drift_share * 100.0,
                for_.as_secs(),
                if r["policy"]["auto_promote"] == true {
                    ", winners go to a canary"
                } else {
                    ""
                }
            );
        }
        Command::Models(ModelsCommand::Policy(PolicyCommand::Show { model, json })) => {
            let r = fleet_control::client::Client::new(&server)?
                .get(&format!("/v1/models/{model}/policy"))?;
            if json {
                print_json(&r)?;
            } else {
                println!("{}", serde_json::to_string_pretty(&r["policy"])?);
                println!(
                    "alerting now: {:.0}% of its devices",
                    r["state"]["last_share"].as_f64().unwrap_or(0.0) * 100.0
                );
                for e in r["state"]["events"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "{}  {}",
                        fleet_control::views::utc(e[0].as_u64().unwrap_or(0)),
                        e[1].as_str().unwrap_or("")
                    );
                }
            }
        }
        Command::Models(ModelsCommand::Reproduce {
            model,
            detach,
            json,
        }) => {
            let client = fleet_control::client::Client::new(&server)?;
            let job = client.post(
                &format!("{}/reproduce", version_path(&model)?),
                &serde_json::json!({}),
            )?;
            let id = job["id"].as_str().unwrap_or("?").to_string();
            if detach {
                println!("reproduction job {id} started");
                return Ok(());
            }
            eprintln!("reproduction job {id} started; waiting");
            let done = wait_job(&client, &id)?;
            let report = &done["report"];
            if json {
                print_json(report)?;
            }
            if done["state"] != "succeeded" {
                anyhow::bail!(
                    "reproduction job {id} {}: {}",
                    done["state"].as_str().unwrap_or("?"),
                    done["error"].as_str().unwrap_or("")
                );
            }
            let identical = report["artifact_sha256"]["identical"] == true;
            let within = report["metric"]["within"] == true;
            if !json {
                println!(
                    "artifact: {} (recorded {}, now {})",
                    if identical { "identical" } else { "DIFFERENT" },
                    report["artifact_sha256"]["recorded"]
                        .as_str()
                        .unwrap_or("-"),
                    report["artifact_sha256"]["now"].as_str().unwrap_or("-")
                );
                println!(
                    "{}: recorded {}, now {} ({} tolerance {})",
                    report["metric"]["name"].as_str().unwrap_or("metric"),
                    report["metric"]["recorded"],
                    report["metric"]["now"],
                    if within { "within" } else { "OUTSIDE" },
                    report["metric"]["tolerance"]
                );
                let diffs = report["lineage_differences"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if diffs.is_empty() {
                    println!("lineage: every field as recorded");
                }
                for d in diffs {
                    println!(
                        "lineage differs: {} recorded {} now {}",
                        d["field"].as_str().unwrap_or("?"),
                        d["recorded"],
                        d["now"]
                    );
                }
            }
            if !identical && !within {
                anyhow::bail!(
                    "{model} did not reproduce: the artifact differs and the metric is outside the tolerance"
                );
            }
        }
        Command::Rollback {
            model,
            to,
            devices,
            yes,
            detach,
        } => {
            let client = fleet_control::client::Client::new(&server)?;
            let body = |dry_run: bool| serde_json::json!({ "model": model, "to": to, "devices": devices, "dry_run": dry_run });
            let plan = client.post("/v1/rollbacks", &body(true))?;
            println!("roll back {model}:");
            for d in plan["devices"].as_array().cloned().unwrap_or_default() {
                println!(
                    "  {:<24} v{} -> v{}",
                    d["device"].as_str().unwrap_or("?"),
                    d["from"],
                    d["to"]
                );
            }
            for d in plan["skipped"].as_array().cloned().unwrap_or_default() {
                println!(
                    "  {:<24} skipped: {}",
                    d["device"].as_str().unwrap_or("?"),
                    d["reason"].as_str().unwrap_or("")
                );
            }
            if !yes && !confirm("continue?")? {
                anyhow::bail!("not rolled back (nothing changed)");
            }
            let r = client.post("/v1/rollbacks", &body(false))?;
            let id = r["id"].as_str().unwrap_or("?").to_string();
            println!("rollback {id} started");
            if !detach {
                watch(&client, &id)?;
            }
        }
        Command::Tokens(TokensCommand::Create { role, name }) => {
            let r = fleet_control::client::Client::new(&server)?.post(
                "/v1/tokens",
                &serde_json::json!({
                    "name": name.unwrap_or_else(|| format!("{role} token")),
                    "role": role,
                }),
            )?;
            eprintln!(
                "created token {} ({}, role {}); it is shown only now:",
                r["id"].as_str().unwrap_or("?"),
                r["name"].as_str().unwrap_or("?"),
                r["role"].as_str().unwrap_or("?")
            );
            println!("{}", r["token"].as_str().unwrap_or("?"));
        }
        Command::Tokens(TokensCommand::List { json }) => {
            let list = fleet_control::client::Client::new(&server)?.get("/v1/tokens")?;
            if json {
                print_json(&list)?;
            } else {
                println!("{:<16} {:<10} {:<40} CREATED BY", "ID", "ROLE", "NAME");
                for t in list.as_array().cloned().unwrap_or_default() {
                    println!(
                        "{:<16} {:<10} {:<40} {}",
                        t["id"].as_str().unwrap_or("?"),
                        t["role"].as_str().unwrap_or("?"),
                        t["name"].as_str().unwrap_or("?"),
                        t["created_by"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        Command::Tokens(TokensCommand::Revoke { id }) => {
            fleet_control::client::Client::new(&server)?.delete(&format!("/v1/tokens/{id}"))?;
            println!("revoked token {id}");
        }
        Command::Audit {
            command,
            json,
            last,
        } => {
            let all = fleet_control::client::Client::new(&server)?.get("/v1/audit")?;
            let entries: Vec<fleet_control::auth::AuditEntry> =
                serde_json::from_value(all).context("decoding the audit log")?;
            match command {
                Some(AuditCommand::Verify) => match fleet_control::auth::verify(&entries) {
                    Ok(head) => println!(
                        "audit log intact: {} entries, head {head} (keep this hash elsewhere to detect a truncated tail)",
                        entries.len()
                    ),
                    Err(e) => anyhow::bail!("audit log tampered with: {e}"),
                },
                None => {
                    let tail = &entries[entries.len().saturating_sub(last)..];
                    if json {
                        print_json(&serde_json::to_value(tail)?)?;
                    } else {
                        println!(
                            "{:>6}  {:<24} {:<28} {:<9} {:<36} {:>6}  TARGET",
                            "SEQ", "WHEN (UTC)", "WHO", "ROLE", "ACTION", "RESULT"
                        );
                        for e in tail {
                            println!(
                                "{:>6}  {:<24} {:<28} {:<9} {:<36} {:>6}  {}",
                                e.seq,
                                fleet_control::views::utc(e.at_ms),
                                e.who,
                                e.role,
                                e.action,
                                e.outcome,
                                e.target
                            );
                        }
                    }
                }
            }
        }
        Command::Trust(TrustCommand::Show) => {
            let r = fleet_control::client::Client::new(&server)?.get("/v1/trust")?;
            match r["policy"].as_str() {
                Some(p) => print!("{p}"),
                None => println!(
                    "the server has no trust policy; set one with `fleetctl trust set TRUST.toml`"
                ),
            }
        }
        Command::Trust(TrustCommand::Set { policy }) => {
            // Validate here too, so a typo is named before anything is sent.
            let text = keys::load_policy(&policy)?.to_toml();
            fleet_control::client::Client::new(&server)?.put_text("/v1/trust", text)?;
            println!("the server now verifies bundles with {}", policy.display());
        }
        Command::Models(ModelsCommand::Diff { a, b, json }) => {
            let client = fleet_control::client::Client::new(&server)?;
            let (va, vb) = (
                client.get(&version_path(&a)?)?,
                client.get(&version_path(&b)?)?,
            );
            let (count, text) = fleet_control::views::model_diff(&va, &vb, &a, &b);
            if json {
                print_json(
                    &serde_json::json!({ "a": a, "b": b, "differences": count, "table": text }),
                )?;
            } else {
                print!("{text}");
            }
        }
        Command::Models(ModelsCommand::Stage { model, stage }) => {
            let r = fleet_control::client::Client::new(&server)?.post(
                &format!("{}/stage", version_path(&model)?),
                &serde_json::json!({ "stage": stage }),
            )?;
            println!(
                "{model} is now in stage {}",
                r["stage"].as_str().unwrap_or("?")
            );
        }
        Command::Models(ModelsCommand::Tag { model, set, remove }) => {
            let tags = pairs(&set)?;
            let r = fleet_control::client::Client::new(&server)?.post(
                &format!("{}/tags", version_path(&model)?),
                &serde_json::json!({ "set": tags, "remove": remove }),
            )?;
            println!("{model} tags: {}", r["tags"]);
        }
        Command::Devices(DevicesCommand::List { json }) => {
            let list = fleet_control::client::Client::new(&server)?.get("/v1/devices")?;
            if json {
                print_json(&list)?;
            } else {
                print!(
                    "{}",
                    fleet_control::views::devices_table(
                        list.as_array().map(Vec::as_slice).unwrap_or_default(),
                        now_ms()
                    )
                );
            }
        }
        Command::Devices(DevicesCommand::Show { id, json }) => {
            let d =
                fleet_control::client::Client::new(&server)?.get(&format!("/v1/devices/{id}"))?;
            if json {
                print_json(&d)?;
            } else {
                print!("{}", fleet_control::views::device_text(&d, now_ms()));
            }
        }
        Command::Devices(DevicesCommand::SendStatus { id }) => {
            let r = fleet_control::client::Client::new(&server)?.post(
                &format!("/v1/devices/{id}/commands"),
                &serde_json::json!({ "kind": "send_status" }),
            )?;
            println!(
                "sent command {} to {id}; its acknowledgement shows in `fleetctl devices show {id}`",
                r["command"].as_str().unwrap_or("?")
            );
        }
        Command::Drift {
            model,
            device,
            json,
        } => {
            let mut query = Vec::new();
            if let Some(m) = &model {
                query.push(format!("model={m}"));
            }
            if let Some(d) = &device {
                query.push(format!("device={d}"));
            }
            let path = if query.is_empty() {
                "/v1/drift".to_string()
            } else {
                format!("/v1/drift?{}", query.join("&"))
            };
            let rows = fleet_control::client::Client::new(&server)?.get(&path)?;
            if json {
                print_json(&rows)?;
            } else {
                print!(
                    "{}",
                    fleet_control::views::drift_table(
                        rows.as_array().map(Vec::as_slice).unwrap_or_default()
                    )
                );
            }
        }
        Command::Keys(KeysCommand::Generate { out, name }) => {
            let g = keys::generate(&out, &name)?;
            println!("{}", g.id);
            eprintln!(
                "wrote {} (private, mode 0600) and {}",
                g.private.display(),
                g.public.display()
            );
        }
        Command::Keys(KeysCommand::TrustPolicy {
            public,
            threshold,
            out,
            force,
        }) => {
            anyhow::ensure!(
                force || !out.exists(),
                "{} already exists; pass --force to replace it",
                out.display()
            );
            let policy = keys::trust_policy(&public, threshold)?;
            let text = format!(
                "# fleetml trust policy: a bundle needs valid signatures by {} of these {} keys.\n{}",
                policy.threshold,
                policy.keys.len(),
                policy.to_toml()
            );
            fleet_control::output::write_atomic(&out, fleet_control::output::PUBLIC_FILE, |f| {
                use std::io::Write;
                f.write_all(text.as_bytes())?;
                Ok(())
            })?;
            println!(
                "wrote {} ({} of {} keys)",
                out.display(),
                policy.threshold,
                policy.keys.len()
            );
        }
        Command::Bundle(BundleCommand::Build(a)) => {
            let a = *a;
            let created_at = match a.created_at {
                Some(t) => t,
                None => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .context("the system clock is before 1970")?
                    .as_secs(),
            };
            let opts = bundle::BuildOptions {
                model: a.model,
                input_shapes: a.input_shapes,
                name: a.name,
                version: a.version,
                label: a.label,
                features: a.features,
                reference: a.reference,
                golden: a.golden,
                golden_rows: a.golden_rows,
                golden_inputs: a.golden_inputs,
                onnxruntime: a.onnxruntime,
                allow_backend_disagreement: a.allow_backend_disagreement,
                lineage: a.lineage,
                bins: a.bins,
                monitoring: match &a.monitoring {
                    Some(p) => {
                        let text = std::fs::read_to_string(p)
                            .with_context(|| format!("reading {}", p.display()))?;
                        fleetml_protocol::manifest::MonitoringPolicy::from_toml(&text).map_err(
                            |e| anyhow::anyhow!("monitoring settings {}: {e}", p.display()),
                        )?
                    }
                    None => Default::default(),
                },
                serving: fleetml_protocol::manifest::ServingPolicy {
                    max_batch: a.max_batch,
                    max_queue_delay_us: a.max_queue_delay_us,
                },
                prepare_gpu: a.prepare.iter().any(|p| p == "gpu").then_some(a.gpu_batch),
                backends: if a.backends.is_empty() {
                    let mut b = vec!["cpu".to_string()];
                    if a.prepare.iter().any(|p| p == "gpu") {
                        b.insert(0, "gpu".into());
                    }
                    b
                } else {
                    a.backends
                },
                boards: a.boards,
                min_agent_version: a.min_agent_version,
                created_at,
                extra: a.extra,
                keys: a.keys,
                out: a.out,
            };
            let built = bundle::build(&opts)?;
            for line in built.golden_check.iter().flat_map(|c| c.lines()) {
                println!("{line}");
            }
            if let Some(why) = &built.tract_error {
                println!("cpu (tract): {why}; the bundle runs on backends that can (onnxruntime)");
            }
            if let Some(report) = &built.gpu_report {
                println!("gpu: {}", report.summary());
            }
            let signed = if built.signed_by.is_empty() {
                "unsigned; sign it with `fleetctl bundle sign`".to_string()
            } else {
                format!("signed by {}", built.signed_by.join(", "))
            };
            println!(
                "built {} v{} -> {} ({}, {} payloads, {signed})",
                built.manifest.name,
                built.manifest.version,
                opts.out.display(),
                fleet_control::output::human_size(built.size),
                built.manifest.entries.len()
            );
        }
        Command::Bundle(BundleCommand::Sign { bundle: path, key }) => {
            let (changed, id) = bundle::sign(&path, &key)?;
            if changed {
                println!("signed {} with key {id}", path.display());
            } else {
                println!(
                    "{} is already signed by key {id}; nothing changed",
                    path.display()
                );
            }
        }
        Command::Bundle(BundleCommand::Verify {
            bundle: path,
            trust,
        }) => {
            let policy = keys::load_policy(&trust)?;
            let v = bundle::verify(&path, &policy)?;
            println!("{}", bundle::summary(&v, Some(policy.threshold)));
        }
        Command::Bundle(BundleCommand::Inspect { bundle: path, json }) => {
            let front = bundle::read_front(&path)?;
            let size = std::fs::metadata(&path)?.len();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&bundle::inspect_json(&front, size))?
                );
            } else {
                print!("{}", bundle::inspect_text(&front, size));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the outermost context, then each cause.
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

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
