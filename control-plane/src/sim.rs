//! `fleetctl sim`: a fleet of lightweight simulated devices speaking the real device
//! protocol against a real control plane, to measure the control plane at fleet scale.
//!
//! It starts `fleetctl serve` (this same executable) as a child process in a work
//! directory — with its embedded broker, or on a private mosquitto it starts too — so it
//! knows the server's pid and reads its memory from `/proc`. Then, through the operator
//! API, it pushes two signed versions of the compiled-in claims model, enrolls N devices
//! (each gets its own id, secret, board and tags) and runs them all in one tokio runtime.
//!
//! Each simulated device does what `fleet-agent` does on the wire, without inference:
//! - logs in to the broker as itself (client id = user = device id, the password derived
//!   from its secret, a persistent session, a retained last will sealed with the
//!   sequence number of its first status and `online: false`);
//! - seals every message with its secret and a contiguous per-device sequence number,
//!   keeps it in an outbox (in memory here, sled on a device) until the broker's PUBACK
//!   or, once the control plane sends receipts, until a receipt names it (re-publishing
//!   what the broker acknowledged and a receipt skipped, or none named within 600 s), at
//!   most 32 in flight, and re-publishes what is left after every reconnect, in order;
//! - sends a status on every connect, after every activation and every 300 s while
//!   its outbox is drained, and at `--rate` a monitoring window report per model it
//!   serves (a status while it serves none);
//! - on `assignment_changed` (and every 300 s ± 20 %) fetches its assignment with its
//!   HTTP token, checks it with [`SignedAssignment::check`], downloads each bundle it
//!   does not hold and checks its size and SHA-256, and reports the lifecycle events and
//!   the status the agent reports (`assignment_accepted`, `downloading`, `downloaded`,
//!   `verified`, `activated` or `rolled_back`, then a status naming the version).
//!
//! What it does not do: inference, the bundle signature check and golden self-test the
//! agent runs before activating, and durable storage on the device side.
//!
//! Phases, timed: enrollment; connection (until the control plane lists every device
//! online); a first rollout (claims v1, every device downloads it); a steady phase of
//! `--duration` (telemetry ingested per second, from the control plane's own `stored`
//! counter); a rollout of v2 (one wave, no soak: start → the engine says `completed`,
//! i.e. every device reported v2); a rollback (→ every device reports v1 again, from its
//! store, no download). Then every device's outbox is drained and the control plane's
//! per-device message counts and highest sequence numbers are compared with what each
//! device sealed; a sample of devices' stored messages is checked for gaps.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fleetml_protocol::assignment::{AssignedModel, Checked, Held, SignedAssignment};
use fleetml_protocol::crypto::{Sha256, Sha256Hasher};
use fleetml_protocol::telemetry::{
    self, ActiveModel, Body, Channel, DeviceId, FeatureDrift, Lifecycle, Quantiles, Status,
    WindowReport,
};
use fleetml_protocol::trust::TrustPolicy;
use http_body_util::BodyExt;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, watch};

use crate::server::now_ms;

/// Publishes in flight per device (the agent's publisher window).
const WINDOW: usize = 32;
/// Devices in their MQTT handshake at once: a fleet powering up over a few seconds
/// rather than 10,000 SYNs in the same millisecond.
const CONNECTING: usize = 256;
/// Enrollment calls in flight at once.
const ENROLLING: usize = 16;
/// The agent's default `assignment_poll_s`.
const POLL: Duration = Duration::from_secs(300);
/// The agent's default `status_interval_s`.
const STATUS_INTERVAL: Duration = Duration::from_secs(300);
/// The agent's default `telemetry_resend_after_s`.
const RESEND_AFTER: Duration = Duration::from_secs(600);
/// The model rolled out, and its versions.
const MODEL: &str = "claims";
const BOARDS: [&str; 3] = ["raspberry-pi-4", "generic-x86_64", "jetson-orin-nano"];
/// How long any single HTTP exchange may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(300);

/// Which broker the devices and the ingest use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Broker {
    /// rumqttd inside `fleetctl serve`.
    Embedded,
    /// A private mosquitto started by the simulator (`fleetctl serve --mqtt-url`).
    Mosquitto,
}

impl std::str::FromStr for Broker {
    type Err = String;
    fn from_str(s: &str) -> Result<Broker, String> {
        match s {
            "embedded" => Ok(Broker::Embedded),
            "mosquitto" => Ok(Broker::Mosquitto),
            _ => Err(format!("broker `{s}`: use embedded or mosquitto")),
        }
    }
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    pub devices: usize,
    pub broker: Broker,
    /// The mosquitto executable (default: found in /usr/sbin, /usr/bin or PATH).
    pub mosquitto: Option<PathBuf>,
    /// Telemetry messages per device per second (window reports, or heartbeats).
    pub rate: f64,
    /// Length of the steady phase.
    pub duration: Duration,
    /// Work directory (kept); default a temporary one, removed at the end.
    pub dir: Option<PathBuf>,
    /// Device HTTP requests (assignment fetches, bundle downloads) in flight at once.
    pub http_concurrency: usize,
}

/// A timed phase.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    /// The rollout's id in the control plane.
    pub id: String,
    /// From the API call until the control plane said `completed`.
    pub control_plane_s: f64,
    /// From the API call until the last device had activated the version (its status
    /// queued; the control plane may learn of it a moment later).
    pub devices_s: Option<f64>,
}

/// Telemetry over the steady phase.
#[derive(Debug, Clone, Serialize)]
pub struct Steady {
    /// How long the ingest took, after the first install, to store everything the
    /// broker had acknowledged (the phase starts then).
    pub catch_up_s: f64,
    pub seconds: f64,
    /// Messages the control plane's ingest stored (its `stored` counter).
    pub ingested: u64,
    pub ingested_per_s: f64,
    /// Messages the devices had acknowledged by the broker.
    pub sent: u64,
    pub sent_per_s: f64,
}

/// Resident memory, KiB (`VmRSS`; `peak` is `VmHWM`).
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub control_plane_idle_kib: u64,
    pub control_plane_enrolled_kib: u64,
    pub control_plane_connected_kib: u64,
    pub control_plane_end_kib: u64,
    pub control_plane_peak_kib: u64,
    /// (connected − idle) / N: enrollment record, state, session and connection.
    pub control_plane_per_device_kib: f64,
    /// mosquitto's, when it is the broker (the embedded one is inside the control plane).
    pub broker_idle_kib: Option<u64>,
    pub broker_connected_kib: Option<u64>,
    pub broker_per_device_kib: Option<f64>,
    pub simulator_kib: u64,
}

/// CPU time used over the whole run, seconds (user + system).
#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    pub control_plane_s: f64,
    pub broker_s: Option<f64>,
    pub simulator_s: f64,
}

/// What was checked at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Checks {
    /// Messages the devices sealed, all runs of all devices.
    pub sealed: u64,
    /// Messages the ingest stored (new `(device, seq)`), and duplicates it dropped.
    pub stored: u64,
    pub duplicates: u64,
    pub refused: u64,
    /// Sequence gaps the ingest noticed on arrival (later filled or not).
    pub ingest_gaps: u64,
    /// Devices whose stored message count or highest sequence number differs from what
    /// they sealed.
    pub devices_mismatched: usize,
    /// Devices whose whole stored message log was read back and checked for gaps.
    pub sample_devices: usize,
    pub sample_gaps: usize,
    /// Messages the devices saw confirmed: by a receipt, or by a PUBACK before their
    /// first receipt.
    pub confirmed: u64,
    /// Messages still in devices' outboxes at the end (not confirmed delivered).
    pub unacked: i64,
    /// Messages the devices published again after the broker had acknowledged them: a
    /// receipt named a later message but not them (lost between broker and ingest, or
    /// their receipt was), or none named them within 600 s.
    pub republished: u64,
    pub reconnects: u64,
    pub connect_failures: u64,
    pub assignment_refusals: u64,
    pub download_failures: u64,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub devices: usize,
    pub broker: Broker,
    pub rate_per_device_per_s: f64,
    pub enroll_s: f64,
    /// Devices the control plane lists online after the connection phase.
    pub connected: usize,
    pub connect_s: Option<f64>,
    pub steady: Option<Steady>,
    pub rollout_install: Option<Phase>,
    pub rollout: Option<Phase>,
    pub rollback: Option<Phase>,
    /// How long the ingest took, once the devices stopped sending and their outboxes
    /// were empty, to store the last message (its backlog at the end).
    pub ingest_drain_s: Option<f64>,
    pub bundle_downloads: u64,
    pub bundle_bytes: u64,
    pub memory: Option<Memory>,
    pub cpu: Option<Cpu>,
    pub checks: Checks,
    pub open_file_limit: u64,
    /// Empty when the run did everything it should.
    pub failures: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// The human summary.
    pub fn table(&self) -> String {
        let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
        let secs = |s: Option<f64>| s.map_or("-".into(), |s| format!("{s:.1} s"));
        let phase = |p: &Option<Phase>| match p {
            Some(p) => format!(
                "{} (last device activated at {})",
                secs(Some(p.control_plane_s)),
                secs(p.devices_s)
            ),
            None => "-".into(),
        };
        let mut rows: Vec<(String, String)> = vec![
            (
                "devices enrolled".into(),
                format!("{} in {:.1} s", self.devices, self.enroll_s),
            ),
            (
                "online (control plane's view)".into(),
                format!(
                    "{} of {} in {}",
                    self.connected,
                    self.devices,
                    secs(self.connect_s)
                ),
            ),
        ];
        if let Some(s) = &self.steady {
            rows.push((
                "telemetry ingested".into(),
                format!(
                    "{:.1} msgs/s over {:.0} s (devices sent {:.1} msgs/s; backlog cleared in {:.1} s)",
                    s.ingested_per_s, s.seconds, s.sent_per_s, s.catch_up_s
                ),
            ));
        }
        rows.push((
            format!("rollout {MODEL}@1 (first install)"),
            phase(&self.rollout_install),
        ));
        rows.push((format!("rollout {MODEL}@1 → 2"), phase(&self.rollout)));
        rows.push((format!("rollback {MODEL}@2 → 1"), phase(&self.rollback)));
        rows.push((
            "ingest backlog at the end".into(),
            secs(self.ingest_drain_s),
        ));
        rows.push((
            "bundle downloads".into(),
            format!(
                "{} ({})",
                self.bundle_downloads,
                crate::output::human_size(self.bundle_bytes)
            ),
        ));
        if let Some(m) = &self.memory {
            rows.push((
                "control plane RSS".into(),
                format!(
                    "idle {}, enrolled {}, connected {}, end {}, peak {}",
                    mib(m.control_plane_idle_kib),
                    mib(m.control_plane_enrolled_kib),
                    mib(m.control_plane_connected_kib),
                    mib(m.control_plane_end_kib),
                    mib(m.control_plane_peak_kib)
                ),
            ));
            rows.push((
                "control plane memory per device".into(),
                format!("{:.1} KiB", m.control_plane_per_device_kib),
            ));
            if let (Some(i), Some(c), Some(p)) = (
                m.broker_idle_kib,
                m.broker_connected_kib,
                m.broker_per_device_kib,
            ) {
                rows.push((
                    "mosquitto RSS".into(),
                    format!(
                        "idle {}, connected {}, {p:.1} KiB per device",
                        mib(i),
                        mib(c)
                    ),
                ));
            }
            rows.push(("simulator RSS".into(), mib(m.simulator_kib)));
        }
        if let Some(c) = &self.cpu {
            rows.push((
                "CPU time".into(),
                format!(
                    "control plane {:.1} s, {}simulator {:.1} s",
                    c.control_plane_s,
                    c.broker_s
                        .map_or(String::new(), |b| format!("mosquitto {b:.1} s, ")),
                    c.simulator_s
                ),
            ));
        }
        let c = &self.checks;
        rows.push((
            "messages".into(),
            format!(
                "sealed {}, stored {}, duplicates {}, refused {}, gaps seen {}, unacked {}, re-published {}",
                c.sealed, c.stored, c.duplicates, c.refused, c.ingest_gaps, c.unacked, c.republished
            ),
        ));
        rows.push((
            "per-device check".into(),
            format!(
                "{} devices differ; {} sampled logs, {} with gaps",
                c.devices_mismatched, c.sample_devices, c.sample_gaps
            ),
        ));
        rows.push((
            "reconnects".into(),
            format!(
                "{} (failed connection attempts {})",
                c.reconnects, c.connect_failures
            ),
        ));
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        let mut out = format!(
            "fleetctl sim: {} devices, {} broker, {} msgs/device/s\n",
            self.devices,
            match self.broker {
                Broker::Embedded => "embedded",
                Broker::Mosquitto => "mosquitto",
            },
            self.rate_per_device_per_s
        );
        for (k, v) in rows {
            out.push_str(&format!("  {k:<width$}  {v}\n"));
        }
        for f in &self.failures {
            out.push_str(&format!("  FAILED: {f}\n"));
        }
        out
    }
}

/// Runs the simulation and returns its report (whose `failures` say what went wrong
/// once the fleet was up; errors before that are returned as errors).
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        (1..=100_000).contains(&opts.devices),
        "--devices {}: give 1 to 100000",
        opts.devices
    );
    anyhow::ensure!(
        opts.rate.is_finite() && (0.0..=100.0).contains(&opts.rate),
        "--rate {}: give 0 to 100 messages per device per second",
        opts.rate
    );
    anyhow::ensure!(
        opts.http_concurrency >= 1,
        "--http-concurrency must be at least 1"
    );
    let mosquitto = match opts.broker {
        Broker::Mosquitto => Some(find_mosquitto(opts.mosquitto.as_deref())?),
        Broker::Embedded => None,
    };
    // Each device holds a socket in this process, in the broker and (embedded) in the
    // control plane; HTTP requests take more. The children inherit the limit.
    let open_file_limit = raise_open_file_limit(2 * opts.devices as u64 + 4096)?;
    if open_file_limit < opts.devices as u64 + 1024 {
        eprintln!(
            "warning: the open-file limit is {open_file_limit}; {} devices need about {} (raise `ulimit -Hn`, or run as root)",
            opts.devices,
            opts.devices + 1024
        );
    }
    let (dir, temporary) = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            anyhow::ensure!(
                std::fs::read_dir(d)?.next().is_none(),
                "--dir {}: the folder is not empty; give a new one",
                d.display()
            );
            (std::fs::canonicalize(d)?, None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("fleetml-sim-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    // The simulator's own log (devices' disconnects, refused commands): warnings by
    // default, FLEETML_SIM_LOG=debug for more. Not RUST_LOG, which the control plane
    // it starts reads.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEETML_SIM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
    let report = run_in(opts, &dir, mosquitto.as_deref(), open_file_limit);
    if !report.as_ref().is_ok_and(Report::ok)
        && let Some(t) = temporary
    {
        // What went wrong is in the logs: keep them.
        eprintln!(
            "kept the work directory {} (serve.log{})",
            t.keep().display(),
            if mosquitto.is_some() {
                ", mosquitto.log"
            } else {
                ""
            }
        );
    }
    report
}

/// [`run`] in the work directory `dir`.
fn run_in(
    opts: &Options,
    dir: &Path,
    mosquitto: Option<&Path>,
    open_file_limit: u64,
) -> anyhow::Result<Report> {
    let clock = Instant::now();
    let say = |what: &str| eprintln!("[{:>7.1}s] {what}", clock.elapsed().as_secs_f64());
    say(&format!("working in {}", dir.display()));
    let fleetctl = std::env::current_exe().context("finding this fleetctl")?;
    prepare_bundles(&fleetctl, dir)?;

    let mut children = Children(Vec::new());
    let broker_port = crate::demo::free_port()?;
    let broker_pid = match mosquitto {
        Some(bin) => {
            let child = start_mosquitto(bin, dir, broker_port)?;
            let pid = child.id();
            children.0.push(child);
            Some(pid)
        }
        None => None,
    };
    let http_port = crate::demo::free_port()?;
    let mut serve = Command::new(&fleetctl);
    serve
        .args(["serve", "--data-dir", "plane", "--trust", "trust.toml"])
        .args(["--listen", &format!("127.0.0.1:{http_port}")])
        .current_dir(dir)
        .stderr(log_file(dir, "serve.log")?);
    match broker_pid {
        Some(_) => serve.args(["--mqtt-url", &format!("mqtt://127.0.0.1:{broker_port}")]),
        None => serve.args(["--mqtt-listen", &format!("127.0.0.1:{broker_port}")]),
    };
    let (child, first) = crate::demo::announcing(&mut serve).context("starting fleetctl serve")?;
    let server_pid = child.id();
    children.0.push(child);
    let address = first
        .trim()
        .strip_prefix("control plane listening on http://")
        .with_context(|| {
            format!(
                "fleetctl serve did not start (see {})",
                dir.join("serve.log").display()
            )
        })?
        .to_string();
    let token = std::fs::read_to_string(dir.join("plane/admin.token"))
        .context("reading the control plane's admin token")?
        .trim()
        .to_string();
    say(&format!(
        "control plane at http://{address} (pid {server_pid})"
    ));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let setup = Setup {
        opts: opts.clone(),
        dir: dir.to_path_buf(),
        api: Http::new(&address)?,
        token,
        server_pid,
        broker_pid,
        broker_port,
        open_file_limit,
        clock,
    };
    let report = runtime.block_on(orchestrate(setup));
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(children);
    report
}

/// Everything the async part needs.
struct Setup {
    opts: Options,
    dir: PathBuf,
    api: Http,
    token: String,
    server_pid: u32,
    /// mosquitto's pid, when it is the broker.
    broker_pid: Option<u32>,
    broker_port: u16,
    open_file_limit: u64,
    clock: Instant,
}

impl Setup {
    fn say(&self, what: &str) {
        eprintln!("[{:>7.1}s] {what}", self.clock.elapsed().as_secs_f64());
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.api.json("GET", path, &self.token, None).await
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.api.json("POST", path, &self.token, Some(body)).await
    }
}

/// Child processes, stopped (SIGTERM, then SIGKILL) in reverse order on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            crate::demo::stop_child(c);
        }
    }
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(dir.join(name)).with_context(|| format!("creating {name}"))
}

/// Runs `fleetctl ARGS` in `dir`; its stdout, or an error with its stderr.
fn fleetctl(exe: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(exe)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running fleetctl {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`fleetctl {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A signing key, the trust policy naming it, and claims v1 and v2 built and signed with
/// the same commands an operator types.
fn prepare_bundles(exe: &Path, dir: &Path) -> anyhow::Result<()> {
    for (name, bytes) in crate::demo::CLAIMS {
        std::fs::write(dir.join(name), bytes).with_context(|| format!("writing {name}"))?;
    }
    fleetctl(
        exe,
        dir,
        &["keys", "generate", "--out", "keys", "--name", "sim"],
    )?;
    fleetctl(
        exe,
        dir,
        &[
            "keys",
            "trust-policy",
            "--public",
            "keys/sim.pub",
            "--out",
            "trust.toml",
        ],
    )?;
    for version in ["1", "2"] {
        let out = format!("{MODEL}-v{version}.fmb");
        fleetctl(
            exe,
            dir,
            &[
                "bundle",
                "build",
                "--model",
                "model.onnx",
                "--name",
                MODEL,
                "--version",
                version,
                "--label",
                "sim",
                "--features",
                "features.toml",
                "--lineage",
                "lineage.toml",
                "--reference",
                "reference.csv",
                "--golden",
                "holdout.csv",
                "--key",
                "keys/sim.key",
                "--out",
                &out,
            ],
        )?;
    }
    Ok(())
}

/// The mosquitto executable: `--mosquitto`, else the usual places and PATH.
fn find_mosquitto(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        anyhow::ensure!(
            p.is_file(),
            "--mosquitto {}: no such file (install Debian's mosquitto, or use --broker embedded)",
            p.display()
        );
        return Ok(p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .into_iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
        .context(
            "mosquitto not found: install Debian's mosquitto (apt-get install mosquitto), pass --mosquitto PATH, or use --broker embedded",
        )
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A private mosquitto on `port` (loopback), persistence on, no connection cap.
fn start_mosquitto(bin: &Path, dir: &Path, port: u16) -> anyhow::Result<Child> {
    let store = dir.join("mosquitto");
    std::fs::create_dir_all(&store)?;
    let config = store.join("mosquitto.conf");
    // As root, mosquitto would drop to user `mosquitto`, which cannot write into this
    // private folder. Devices send their derived passwords; without a password file
    // mosquitto accepts any login (the embedded broker checks them).
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\nmax_connections -1\nallow_anonymous true\n\
             persistence true\npersistence_location {}/\n\
             # The ingest's queue: devices' messages wait here while it stores a batch.\n\
             max_queued_messages 1000000\n\
             log_type error\nlog_type warning\nconnection_messages false\n{}",
            store.display(),
            if running_as_root() { "user root\n" } else { "" }
        ),
    )?;
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log_file(dir, "mosquitto.log")?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "mosquitto exited ({status}) before listening; see {}",
                dir.join("mosquitto.log").display()
            );
        }
        if Instant::now() > deadline {
            crate::demo::stop_child(&mut child);
            bail!("mosquitto did not listen on 127.0.0.1:{port} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// Raises this process's open-file limit towards `want` (children inherit it): the soft
/// limit up to the hard one, and the hard one too where the process may (root). Returns
/// the soft limit now in force.
///
/// `libc` is a direct dependency for this call alone (std has no setrlimit); the unsafe
/// blocks only pass a struct owned here to the two system calls.
#[allow(unsafe_code)]
fn raise_open_file_limit(want: u64) -> anyhow::Result<u64> {
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into `now`, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) } != 0 {
        bail!(
            "reading the open-file limit: {}",
            std::io::Error::last_os_error()
        );
    }
    if now.rlim_cur >= want {
        return Ok(now.rlim_cur);
    }
    for wanted in [
        libc::rlimit {
            rlim_cur: want,
            rlim_max: now.rlim_max.max(want),
        },
        libc::rlimit {
            rlim_cur: now.rlim_max.min(want),
            rlim_max: now.rlim_max,
        },
    ] {
        // SAFETY: setrlimit reads one `rlimit` from `wanted`, which lives across the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
            return Ok(wanted.rlim_cur);
        }
    }
    Ok(now.rlim_cur)
}

/// `VmRSS` and `VmHWM` of a process, KiB.
fn memory_of(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn rss(pid: u32) -> u64 {
    memory_of(pid).0
}

/// User + system CPU seconds of a process, all its threads (`/proc/PID/stat` fields 14
/// and 15, in the kernel's USER_HZ of 100 ticks per second).
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let field = |i: usize| {
        rest.split_whitespace()
            .nth(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field(11) + field(12)) as f64 / 100.0
}

/// The headers of a request with `authorization` and an optional `(content type, body)`.
fn with_body<'a>(
    authorization: &'a str,
    body: Option<(&'a str, Vec<u8>)>,
) -> (Vec<(&'static str, &'a str)>, Vec<u8>) {
    let mut headers = vec![("authorization", authorization)];
    let bytes = match body {
        Some((content_type, bytes)) => {
            headers.push(("content-type", content_type));
            bytes
        }
        None => Vec::new(),
    };
    (headers, bytes)
}

/// A tiny HTTP/1.1 client: one connection per request, as the agent's puller does.
#[derive(Debug, Clone)]
struct Http {
    host: String,
    port: u16,
}

impl Http {
    fn new(address: &str) -> anyhow::Result<Http> {
        let (host, port) = address
            .rsplit_once(':')
            .with_context(|| format!("`{address}` is not HOST:PORT"))?;
        Ok(Http {
            host: host.to_string(),
            port: port
                .parse()
                .with_context(|| format!("`{address}`: bad port"))?,
        })
    }

    fn endpoint(&self) -> crate::http::Endpoint {
        crate::http::Endpoint {
            host: self.host.clone(),
            port: self.port,
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let authorization = format!("Bearer {token}");
        let (headers, bytes) = with_body(&authorization, body);
        crate::http::send(&self.endpoint(), method, path, &headers, bytes)
            .await
            .context("the control plane")
    }

    /// Status and whole body.
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<(u16, hyper::body::Bytes)> {
        let authorization = format!("Bearer {token}");
        let (headers, bytes) = with_body(&authorization, body);
        let (status, bytes) = crate::http::call(
            &self.endpoint(),
            method,
            path,
            &headers,
            bytes,
            HTTP_TIMEOUT,
        )
        .await?;
        Ok((status.as_u16(), bytes))
    }

    /// A JSON call that must succeed.
    async fn json(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let body = body
            .map(|b| serde_json::to_vec(b).map(|v| ("application/json", v)))
            .transpose()?;
        let (status, bytes) = self.call(method, path, token, body).await?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            bail!(
                "{method} {path}: {status}: {}",
                value["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| text(&bytes))
            );
        }
        Ok(value)
    }
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_string()
}

/// Counters shared by every simulated device.
#[derive(Debug, Default)]
struct Stats {
    connected: AtomicI64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    sealed: AtomicU64,
    /// Messages confirmed delivered (receipt, or PUBACK before the first receipt).
    acked: AtomicU64,
    /// Broker acknowledgements (PUBACKs) of outbox messages.
    pubacked: AtomicU64,
    /// Messages published again because no receipt named them in time.
    republished: AtomicU64,
    /// Messages in all outboxes.
    depth: AtomicI64,
    refusals: AtomicU64,
    downloads: AtomicU64,
    download_bytes: AtomicU64,
    download_failures: AtomicU64,
    /// Devices serving each version of the model (index = version; 0 = none).
    on_version: [AtomicU64; 3],
}

/// What every device shares: where the control plane is, limits, and the stop signal.
#[derive(Debug)]
struct Fleet {
    http: Http,
    broker: (String, u16),
    stats: Stats,
    http_slots: Semaphore,
    connect_slots: Semaphore,
    /// Time between two telemetry messages of a device (none: `--rate 0`).
    period: Option<Duration>,
    /// Set at the end: devices stop producing telemetry so their outboxes drain.
    quiet: AtomicBool,
    stop: watch::Receiver<bool>,
    features: Vec<String>,
}

/// One simulated device.
struct Device {
    id: DeviceId,
    secret: Vec<u8>,
    token: String,
    board: String,
    policy: Arc<TrustPolicy>,
    /// When its "agent" started (status uptime).
    started: Instant,
    /// Model name → (version, bundle digest) it serves.
    active: Mutex<BTreeMap<String, (u64, Sha256)>>,
    outbox: Mutex<Outbox>,
    /// Messages sealed so far (= the next sequence number).
    sealed: AtomicU64,
    /// Wakes the publisher: something was pushed (the agent's `wake`).
    publish: Notify,
    /// Wakes the puller: `assignment_changed`.
    pull: Notify,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret and token stay out of logs.
        f.debug_struct("Device")
            .field("id", &self.id)
            .field("board", &self.board)
            .finish_non_exhaustive()
    }
}

/// A device's in-memory outbox: sealed messages until the broker acknowledges them, or,
/// once the control plane has sent a receipt, until a receipt names them.
#[derive(Debug, Default)]
struct Outbox {
    next_seq: u64,
    messages: BTreeMap<u64, (String, Vec<u8>)>,
    /// Acknowledged by the broker, awaiting a receipt: since when.
    delivered: BTreeMap<u64, Instant>,
    /// Acknowledged, and a receipt named a later message but not these: lost.
    overtaken: Vec<u64>,
    receipts: bool,
}

impl Outbox {
    /// Deletes what `receipt` names; returns how many messages went.
    fn receipt(&mut self, receipt: &telemetry::Receipt) -> u64 {
        self.receipts = true;
        let mut removed = 0;
        for &[a, b] in &receipt.stored {
            if a > b {
                continue;
            }
            let here: Vec<u64> = self.messages.range(a..=b).map(|(s, _)| *s).collect();
            for seq in here {
                self.messages.remove(&seq);
                self.delivered.remove(&seq);
                removed += 1;
            }
        }
        // As the agent does: the ingest stores a device's messages in order.
        if let Some(newest) = receipt.stored.iter().map(|r| r[1]).max() {
            let lost: Vec<u64> = self.delivered.range(..newest).map(|(s, _)| *s).collect();
            for seq in lost {
                self.delivered.remove(&seq);
                self.overtaken.push(seq);
            }
        }
        removed
    }
}

impl Device {
    fn new(id: DeviceId, secret: Vec<u8>, board: &str, policy: Arc<TrustPolicy>) -> Device {
        Device {
            token: fleetml_protocol::assignment::http_token(&id, &secret),
            id,
            secret,
            board: board.to_string(),
            policy,
            started: Instant::now(),
            active: Mutex::new(BTreeMap::new()),
            outbox: Mutex::new(Outbox::default()),
            sealed: AtomicU64::new(0),
            publish: Notify::new(),
            pull: Notify::new(),
        }
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn active(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (u64, Sha256)>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seals `body` with the next sequence number into the outbox and wakes the
    /// publisher; a status gets the outbox's depth. Returns the sequence number.
    fn push(&self, stats: &Stats, body: Body) -> u64 {
        let seq = {
            let mut outbox = self.outbox();
            let body = match body {
                Body::Status(mut s) => {
                    s.outbox_depth = outbox.messages.len() as u64;
                    Body::Status(s)
                }
                b => b,
            };
            let seq = outbox.next_seq;
            outbox.next_seq += 1;
            let (topic, bytes) = telemetry::seal(&self.id, seq, now_ms(), body, &self.secret);
            outbox.messages.insert(seq, (topic, bytes));
            self.sealed.store(outbox.next_seq, Ordering::Relaxed);
            seq
        };
        stats.sealed.fetch_add(1, Ordering::Relaxed);
        stats.depth.fetch_add(1, Ordering::Relaxed);
        self.publish.notify_one();
        seq
    }

    /// What the agent reports as its status.
    fn status(&self) -> Status {
        let models = self
            .active()
            .iter()
            .map(|(name, (version, _))| ActiveModel {
                name: name.clone(),
                version: *version,
                backend: "cpu".into(),
                fallbacks: Vec::new(),
            })
            .collect();
        Status {
            agent_version: format!("{}-sim", fleetml_protocol::VERSION),
            board: self.board.clone(),
            backends: vec!["cpu".into()],
            models,
            uptime_s: self.started.elapsed().as_secs(),
            online: true,
            outbox_depth: 0,
            dropped_windows: 0,
        }
    }

    fn push_status(&self, stats: &Stats) {
        self.push(stats, Body::Status(self.status()));
    }
}

/// A cheap deterministic random source per device (splitmix64), for phases and jitter.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The agent's reconnect back-off: between half and all of 0.5 s · 2^(failures−1),
/// capped at 60 s.
fn backoff(failures: u32, rng: &mut Rng) -> Duration {
    let cap_ms = (500u64 << failures.saturating_sub(1).min(7)).min(60_000);
    Duration::from_millis(cap_ms / 2 + rng.next() % (cap_ms / 2 + 1))
}

/// A healthy monitoring window of `model@version`, the size of the claims model's.
fn window(fleet: &Fleet, model: &str, version: u64, n: u64, rng: &mut Rng) -> Body {
    let end_ms = now_ms();
    let span = fleet.period.unwrap_or(Duration::from_secs(60));
    let predictions = 100 + (rng.next() % 50) as u32;
    let feature = |name: &str, rng: &mut Rng| FeatureDrift {
        name: name.to_string(),
        values: predictions,
        missing_rate: 0.0,
        out_of_range_rate: 0.0,
        unseen_rate: 0.0,
        psi: 0.01 + rng.unit() * 0.02,
        ks: 0.02 + rng.unit() * 0.02,
        js: 0.01 + rng.unit() * 0.01,
        chi2_p: None,
        usefulness: None,
        drifting: false,
    };
    Body::Window(Box::new(WindowReport {
        model: model.to_string(),
        version,
        window: n,
        start_ms: end_ms.saturating_sub(span.as_millis() as u64),
        end_ms,
        predictions,
        throughput_per_s: predictions as f64 / span.as_secs_f64().max(0.001),
        missed: BTreeMap::new(),
        missing_prediction_rate: 0.0,
        missing_ids: Vec::new(),
        latency_us: Quantiles {
            p50: Some(400),
            p95: Some(700),
            p99: Some(900),
        },
        lag_ms: Quantiles {
            p50: Some(1),
            p95: Some(2),
            p99: Some(3),
        },
        batch_rows: Quantiles::default(),
        outages: Vec::new(),
        outages_not_listed: 0,
        features: fleet.features.iter().map(|f| feature(f, rng)).collect(),
        prediction: Some(feature("prediction", rng)),
        events: Vec::new(),
        alerts: Vec::new(),
        labels: 0,
        live_accuracy: None,
        live_mae: None,
    }))
}

/// The device's monitoring: every `period` a window report per model it serves, or a
/// status while it serves none; and, as the agent, a status heartbeat every
/// [`STATUS_INTERVAL`] while its outbox is drained.
async fn run_telemetry(dev: Arc<Device>, fleet: Arc<Fleet>, mut rng: Rng) {
    let start = |every: Duration, rng: &mut Rng| {
        let phase = every.mul_f64(rng.unit());
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    };
    let mut windows = fleet.period.map(|p| start(p, &mut rng));
    let mut heartbeat = start(STATUS_INTERVAL, &mut rng);
    let mut stop = fleet.stop.clone();
    let mut n = 0u64;
    loop {
        let window_due = tokio::select! {
            _ = async {
                match windows.as_mut() {
                    Some(t) => t.tick().await,
                    None => std::future::pending().await,
                }
            } => true,
            _ = heartbeat.tick() => false,
            _ = stop.changed() => return,
        };
        if fleet.quiet.load(Ordering::Relaxed) {
            continue;
        }
        if !window_due {
            if dev.outbox().messages.is_empty() {
                dev.push_status(&fleet.stats);
            }
            continue;
        }
        let serving: Vec<(String, u64)> = dev
            .active()
            .iter()
            .map(|(n, (v, _))| (n.clone(), *v))
            .collect();
        if serving.is_empty() {
            dev.push_status(&fleet.stats);
        }
        for (name, version) in serving {
            n += 1;
            let body = window(&fleet, &name, version, n, &mut rng);
            dev.push(&fleet.stats, body);
        }
    }
}

/// A device's publisher, shaped like the agent's: QoS 1 from the outbox, at most
/// [`WINDOW`] in flight, a message leaves the outbox on its PUBACK, everything left is
/// re-published in order after a reconnect; commands answered.
async fn run_publisher(dev: Arc<Device>, fleet: Arc<Fleet>, mut rng: Rng) {
    let stats = &fleet.stats;
    // The run's first status, and the last will sealed with its sequence number.
    let first = dev.status();
    let s0 = dev.push(stats, Body::Status(first.clone()));
    let mut gone = first;
    gone.online = false;
    let (will_topic, will) =
        telemetry::seal(&dev.id, s0, now_ms(), Body::Status(gone), &dev.secret);
    let mut options = MqttOptions::new(dev.id.as_str(), fleet.broker.0.clone(), fleet.broker.1);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(false);
    options.set_max_packet_size(telemetry::MAX_MESSAGE + 1024, telemetry::MAX_MESSAGE + 1024);
    options.set_last_will(LastWill::new(will_topic, will, QoS::AtLeastOnce, true));
    options.set_credentials(dev.id.as_str(), telemetry::mqtt_password(&dev.secret));
    let (client, mut events) = AsyncClient::new(options, WINDOW * 2);
    let cmd_topic = telemetry::topic(&dev.id, Channel::Cmd);

    let mut handed: VecDeque<u64> = VecDeque::new();
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    let mut next: u64 = 0;
    let mut connected = false;
    let mut ever_connected = false;
    let mut failures: u32 = 0;
    let mut last_command: Option<u64> = None;
    let mut resend: VecDeque<u64> = VecDeque::new();
    let mut overdue_check = tokio::time::interval(Duration::from_secs(2));
    overdue_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = fleet.stop.clone();
    let mut connecting: Option<tokio::sync::SemaphorePermit<'_>> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        if !connected && connecting.is_none() {
            tokio::select! {
                permit = fleet.connect_slots.acquire() => match permit {
                    Ok(p) => connecting = Some(p),
                    Err(_) => break,
                },
                _ = stop.changed() => break,
            }
        }
        if connected {
            let outbox = dev.outbox();
            // What no receipt named in time goes first.
            while WINDOW > handed.len() + inflight.len() {
                let Some(seq) = resend.pop_front() else { break };
                let Some((topic, payload)) = outbox.messages.get(&seq) else {
                    continue;
                };
                if client
                    .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                    .is_err()
                {
                    resend.push_front(seq);
                    break;
                }
                stats.republished.fetch_add(1, Ordering::Relaxed);
                handed.push_back(seq);
            }
            // Top the window up from the outbox, in sequence order.
            let room = WINDOW.saturating_sub(handed.len() + inflight.len());
            for (&seq, (topic, payload)) in outbox.messages.range(next..).take(room) {
                let retain = topic.ends_with("/status");
                if client
                    .try_publish(topic.clone(), QoS::AtLeastOnce, retain, payload.clone())
                    .is_err()
                {
                    break;
                }
                handed.push_back(seq);
                next = seq + 1;
            }
        }
        // Only `poll` runs while connecting: dropping its future mid-handshake would
        // drop the connection (the agent's publisher waits the same way).
        tokio::select! {
            biased;
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // The outbox, not rumqttc's replay, is the source of truth.
                    events.pending.clear();
                    handed.clear();
                    inflight.clear();
                    resend.clear();
                    let mut outbox = dev.outbox();
                    outbox.delivered.clear();
                    outbox.overtaken.clear();
                    drop(outbox);
                    next = 0;
                    connected = true;
                    failures = 0;
                    connecting = None;
                    stats.connected.fetch_add(1, Ordering::Relaxed);
                    if ever_connected {
                        stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    ever_connected = true;
                    if client.try_subscribe(cmd_topic.clone(), QoS::AtLeastOnce).is_err() {
                        tracing::warn!(device = %dev.id, "could not subscribe");
                    }
                    dev.push_status(stats);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some((ack, send_status)) =
                        command(&dev, stats, &p.topic, &p.payload, &mut last_command)
                    {
                        if send_status {
                            dev.push_status(stats);
                        }
                        dev.push(stats, Body::Ack(ack));
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(seq) = handed.pop_front() {
                        inflight.insert(pkid, seq);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(seq) = inflight.remove(&ack.pkid) {
                        stats.pubacked.fetch_add(1, Ordering::Relaxed);
                        let mut outbox = dev.outbox();
                        if outbox.receipts {
                            if outbox.messages.contains_key(&seq) {
                                outbox.delivered.insert(seq, Instant::now());
                            }
                        } else if outbox.messages.remove(&seq).is_some() {
                            stats.acked.fetch_add(1, Ordering::Relaxed);
                            stats.depth.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        stats.connected.fetch_sub(1, Ordering::Relaxed);
                        tracing::debug!(device = %dev.id, error = %e, "disconnected");
                    } else {
                        stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(device = %dev.id, error = %e, "could not connect");
                    }
                    connected = false;
                    connecting = None;
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures, &mut rng);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => break,
                    }
                }
            },
            _ = dev.publish.notified(), if connected => {}
            _ = overdue_check.tick(), if connected => {
                let mut outbox = dev.outbox();
                let mut due = std::mem::take(&mut outbox.overtaken);
                due.extend(
                    outbox
                        .delivered
                        .iter()
                        .filter(|(_, at)| at.elapsed() >= RESEND_AFTER)
                        .map(|(seq, _)| *seq),
                );
                due.sort_unstable();
                for seq in &due {
                    outbox.delivered.remove(seq);
                }
                resend.extend(due);
            }
            _ = stop.changed() => break,
        }
    }
    if connected {
        // A clean goodbye: no last will.
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        stats.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A message on the device's `cmd` topic: verified with its secret, replays ignored,
/// handled as the agent does. Returns the acknowledgement to send, and whether a status
/// goes first; `None` for a message not answered.
fn command(
    dev: &Device,
    stats: &Stats,
    topic: &str,
    bytes: &[u8],
    last: &mut Option<u64>,
) -> Option<(telemetry::Ack, bool)> {
    let envelope =
        match telemetry::open(topic, bytes, |d| (d == &dev.id).then(|| dev.secret.clone())) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(device = %dev.id, error = %e, "refused a command");
                return None;
            }
        };
    let c = match envelope.body {
        Body::Command(c) => c,
        Body::Receipt(r) => {
            let removed = dev.outbox().receipt(&r);
            stats.acked.fetch_add(removed, Ordering::Relaxed);
            stats.depth.fetch_sub(removed as i64, Ordering::Relaxed);
            return None;
        }
        _ => return None,
    };
    if last.is_some_and(|l| envelope.seq <= l) {
        return None;
    }
    *last = Some(envelope.seq);
    let (ok, detail, send_status) = match c.command {
        telemetry::CommandKind::AssignmentChanged => {
            dev.pull.notify_one();
            (true, "pulling the assignment".to_string(), false)
        }
        telemetry::CommandKind::SendStatus => (true, String::new(), true),
        telemetry::CommandKind::CaptureSamples { .. } => (
            false,
            "a simulated device captures nothing".to_string(),
            false,
        ),
    };
    Some((
        telemetry::Ack {
            command: c.id,
            ok,
            detail,
        },
        send_status,
    ))
}

/// Why a bundle was not brought in.
enum Failure {
    /// The bytes are not the bundle the assignment names.
    Mismatch(String),
    /// The transfer failed; the next pull tries again.
    Transfer(String),
}

/// The assignment side of a device, shaped like the agent's puller.
struct Puller {
    dev: Arc<Device>,
    fleet: Arc<Fleet>,
    held: Option<(u64, BTreeMap<String, AssignedModel>)>,
    /// Bundles this device holds (the agent keeps the previous version in its store).
    stored: HashSet<Sha256>,
    failed: HashSet<Sha256>,
    last_refusal: Option<String>,
}

impl Puller {
    async fn run(mut self, mut rng: Rng) {
        let mut stop = self.fleet.stop.clone();
        loop {
            if *stop.borrow() {
                return;
            }
            if let Err(e) = self.once().await {
                tracing::debug!(device = %self.dev.id, error = %format!("{e:#}"), "assignment pull failed");
            }
            let poll = POLL.mul_f64(0.8 + 0.4 * rng.unit());
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = self.dev.pull.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    fn event(&self, kind: Lifecycle, model: &str, version: u64, detail: String) {
        self.dev.push(
            &self.fleet.stats,
            Body::Event(telemetry::Event {
                kind,
                model: model.to_string(),
                version,
                detail,
            }),
        );
    }

    async fn once(&mut self) -> anyhow::Result<()> {
        let path = format!("/v1/devices/{}/assignment", self.dev.id);
        let (status, body) = {
            let _slot = self.fleet.http_slots.acquire().await?;
            self.fleet
                .http
                .call("GET", &path, &self.dev.token, None)
                .await?
        };
        if status == 404 {
            return Ok(());
        }
        anyhow::ensure!(
            status == 200,
            "assignment: the control plane answered {status}: {}",
            text(&body)
        );
        let held = self.held.as_ref().map(|(generation, models)| Held {
            generation: *generation,
            models,
        });
        let checked = SignedAssignment::from_cbor(&body)
            .and_then(|s| s.check(&self.dev.policy, &self.dev.id, held, now_ms()));
        let assignment = match checked {
            Ok(Checked::Newer(a)) => {
                self.event(
                    Lifecycle::AssignmentAccepted,
                    "",
                    a.generation,
                    format!("generation {}", a.generation),
                );
                self.held = Some((a.generation, a.models.clone()));
                self.failed.clear();
                self.last_refusal = None;
                a
            }
            Ok(Checked::Unchanged(a)) => a,
            Err(e) => {
                let reason = e.to_string();
                self.fleet.stats.refusals.fetch_add(1, Ordering::Relaxed);
                if self.last_refusal.as_ref() != Some(&reason) {
                    self.event(Lifecycle::AssignmentRefused, "", 0, reason.clone());
                    self.last_refusal = Some(reason);
                }
                return Ok(());
            }
        };
        for (name, model) in &assignment.models {
            if let Err(e) = self.bring(name, model).await {
                tracing::debug!(device = %self.dev.id, model = %name, error = %e, "not activated");
            }
        }
        Ok(())
    }

    /// Makes `model` the version of `name` this device serves unless it already is.
    async fn bring(&mut self, name: &str, model: &AssignedModel) -> Result<(), String> {
        let active = self.dev.active().get(name).copied();
        if active.is_some_and(|(_, digest)| digest == model.digest)
            || self.failed.contains(&model.digest)
        {
            return Ok(());
        }
        if !self.stored.contains(&model.digest) {
            self.event(
                Lifecycle::Downloading,
                name,
                model.version,
                format!("{} bytes", model.size),
            );
            match self.download(model).await {
                Ok(()) => {
                    self.stored.insert(model.digest);
                    self.event(
                        Lifecycle::Downloaded,
                        name,
                        model.version,
                        format!("sha256 {}", model.digest),
                    );
                }
                Err(Failure::Mismatch(reason)) => {
                    self.failed.insert(model.digest);
                    self.fleet
                        .stats
                        .download_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.event(
                        Lifecycle::VerificationFailed,
                        name,
                        model.version,
                        reason.clone(),
                    );
                    return Err(reason);
                }
                Err(Failure::Transfer(reason)) => {
                    self.fleet
                        .stats
                        .download_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.event(
                        Lifecycle::DownloadFailed,
                        name,
                        model.version,
                        reason.clone(),
                    );
                    return Err(reason);
                }
            }
        }
        // What the agent reports after verify → prepare → self-test → swap and a reload.
        self.event(
            Lifecycle::Verified,
            name,
            model.version,
            format!("sha256 {}", model.digest),
        );
        let before = self
            .dev
            .active()
            .insert(name.to_string(), (model.version, model.digest));
        let rolled_back = before.is_some_and(|(v, _)| v > model.version);
        self.event(
            if rolled_back {
                Lifecycle::RolledBack
            } else {
                Lifecycle::Activated
            },
            name,
            model.version,
            "on cpu".into(),
        );
        let on = &self.fleet.stats.on_version;
        let slot = |v: u64| on.get(v as usize).or(on.first());
        if let Some(c) = slot(before.map_or(0, |(v, _)| v)) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(c) = slot(model.version) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.dev.push_status(&self.fleet.stats);
        Ok(())
    }

    /// Downloads the bundle, checking its length and SHA-256 as it streams; nothing is
    /// kept but the digest.
    async fn download(&self, model: &AssignedModel) -> Result<(), Failure> {
        use Failure::{Mismatch, Transfer};
        let _slot = self
            .fleet
            .http_slots
            .acquire()
            .await
            .map_err(|e| Transfer(e.to_string()))?;
        let path = format!("/v1/bundles/{}", model.digest);
        let fetched = tokio::time::timeout(HTTP_TIMEOUT, async {
            let response = self
                .fleet
                .http
                .send("GET", &path, &self.dev.token, None)
                .await
                .map_err(|e| Transfer(format!("{e:#}")))?;
            let status = response.status().as_u16();
            if status != 200 {
                return Err(Transfer(format!(
                    "bundle {}: the control plane answered {status}",
                    model.digest
                )));
            }
            let mut hasher = Sha256Hasher::new();
            let mut received = 0u64;
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    Transfer(format!("download interrupted at byte {received}: {e}"))
                })?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                received += data.len() as u64;
                if received > model.size {
                    return Err(Mismatch(format!(
                        "the server sent more than the {} bytes of bundle {}",
                        model.size, model.digest
                    )));
                }
                hasher.update(&data);
            }
            if received != model.size {
                return Err(Mismatch(format!(
                    "bundle {} ends at byte {received}, the assignment names {}",
                    model.digest, model.size
                )));
            }
            let got = hasher.finish();
            if got != model.digest {
                return Err(Mismatch(format!(
                    "downloaded bundle has sha256 {got}, the assignment names {}",
                    model.digest
                )));
            }
            Ok(received)
        })
        .await
        .map_err(|_| Transfer(format!("{path}: not done within {HTTP_TIMEOUT:?}")))??;
        self.fleet.stats.downloads.fetch_add(1, Ordering::Relaxed);
        self.fleet
            .stats
            .download_bytes
            .fetch_add(fetched, Ordering::Relaxed);
        Ok(())
    }
}

/// The trust policy devices were given, parsed once: (its TOML, the policy).
type PolicyCache = Mutex<Option<(String, Arc<TrustPolicy>)>>;

/// Enrolls `n` devices through `POST /v1/devices`, as `fleetctl devices enroll` does.
async fn enroll(setup: &Setup, n: usize) -> anyhow::Result<Vec<Arc<Device>>> {
    let slots = Arc::new(Semaphore::new(ENROLLING));
    let policies: Arc<PolicyCache> = Default::default();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (slots, policies) = (slots.clone(), policies.clone());
        let (api, token) = (setup.api.clone(), setup.token.clone());
        tasks.spawn(async move {
            let _slot = slots.acquire().await?;
            let board = BOARDS[i % BOARDS.len()];
            let id = format!("sim-{i:05}");
            let r = api
                .json(
                    "POST",
                    "/v1/devices",
                    &token,
                    Some(&json!({
                        "id": id,
                        "board": board,
                        "tags": { "site": format!("sim-{}", i % 10), "fleet": "sim" },
                    })),
                )
                .await
                .with_context(|| format!("enrolling device {id}"))?;
            let secret = hex::decode(r["device_secret"].as_str().unwrap_or_default())
                .with_context(|| format!("device {id}: the secret is not hex"))?;
            let text = r["trust_policy"].as_str().with_context(|| {
                format!("device {id}: the control plane gave no trust policy (serve --trust)")
            })?;
            let policy = {
                let mut cache = policies.lock().unwrap_or_else(|p| p.into_inner());
                match cache.as_ref() {
                    Some((t, p)) if t == text => p.clone(),
                    _ => {
                        let p = Arc::new(
                            TrustPolicy::from_toml(text)
                                .map_err(|e| anyhow::anyhow!("device {id}: trust policy: {e}"))?,
                        );
                        *cache = Some((text.to_string(), p.clone()));
                        p
                    }
                }
            };
            let id = DeviceId::new(&id).map_err(anyhow::Error::msg)?;
            anyhow::Ok((i, Device::new(id, secret, board, policy)))
        });
    }
    let mut devices: Vec<Option<Arc<Device>>> = (0..n).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        let (i, d) = done??;
        devices[i] = Some(Arc::new(d));
    }
    Ok(devices.into_iter().flatten().collect())
}

/// Online devices in `GET /v1/devices`.
async fn online(setup: &Setup) -> anyhow::Result<usize> {
    let list = setup.get("/v1/devices").await?;
    Ok(list
        .as_array()
        .map(|a| a.iter().filter(|d| d["online"] == true).count())
        .unwrap_or(0))
}

async fn ingest_stored(setup: &Setup) -> anyhow::Result<u64> {
    Ok(setup.get("/v1/ingest").await?["stored"]
        .as_u64()
        .unwrap_or(0))
}

/// A rollout or rollback to time: its name, the API path and body that start it, and
/// the version every device ends on.
struct Step<'a> {
    name: &'a str,
    path: &'a str,
    body: Value,
    version: u64,
}

/// Starts `step` and waits (at most `within`) until the control plane says it completed.
async fn timed_rollout(
    setup: &Setup,
    fleet: &Fleet,
    step: Step<'_>,
    within: Duration,
) -> anyhow::Result<Phase> {
    let Step {
        name,
        path,
        body,
        version,
    } = step;
    let n = setup.opts.devices;
    let on = |v: u64| {
        fleet
            .stats
            .on_version
            .get(v as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    };
    let started = Instant::now();
    let r = setup.post(path, &body).await?;
    let id = r["id"]
        .as_str()
        .with_context(|| format!("{path} answered without an id: {r}"))?
        .to_string();
    setup.say(&format!("{name}: {id} started"));
    let mut devices_s = None;
    loop {
        if devices_s.is_none() && on(version) as usize >= n {
            devices_s = Some(started.elapsed().as_secs_f64());
        }
        let v = setup.get(&format!("/v1/rollouts/{id}")).await?;
        match v["state"].as_str() {
            Some("completed") => break,
            Some(s @ ("paused" | "aborted" | "rolled_back")) => {
                bail!("{name} {id} is {s}: {}", v["reason"].as_str().unwrap_or(""))
            }
            _ => {}
        }
        if started.elapsed() > within {
            bail!(
                "{name} {id} did not complete within {} s: {} of {n} devices active in the control plane's view, {} running v{version} here",
                within.as_secs(),
                v["devices_active"],
                on(version)
            );
        }
        // The status view of a big rollout is itself work for the control plane: poll
        // it gently until the devices are done, then closely.
        let pause = if devices_s.is_some() || n <= 1000 {
            250
        } else {
            2000
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let phase = Phase {
        name: name.to_string(),
        id,
        control_plane_s: started.elapsed().as_secs_f64(),
        devices_s: devices_s
            .or_else(|| (on(version) as usize >= n).then(|| started.elapsed().as_secs_f64())),
    };
    setup.say(&format!(
        "{name}: completed in {:.1} s",
        phase.control_plane_s
    ));
    Ok(phase)
}

/// Waits until `check` says yes, polling every `every`, for at most `within`.
async fn wait_until<F, Fut>(within: Duration, every: Duration, mut check: F) -> anyhow::Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(every).await;
    }
}

async fn orchestrate(setup: Setup) -> anyhow::Result<Report> {
    let n = setup.opts.devices;
    let mut report = Report {
        devices: n,
        broker: setup.opts.broker,
        rate_per_device_per_s: setup.opts.rate,
        enroll_s: 0.0,
        connected: 0,
        connect_s: None,
        steady: None,
        rollout_install: None,
        rollout: None,
        rollback: None,
        ingest_drain_s: None,
        bundle_downloads: 0,
        bundle_bytes: 0,
        memory: None,
        cpu: None,
        checks: Checks::default(),
        open_file_limit: setup.open_file_limit,
        failures: Vec::new(),
    };
    let ready = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async { Ok(setup.get("/v1/ingest").await?["broker_connected"] == true) },
    )
    .await?;
    anyhow::ensure!(
        ready,
        "the control plane's ingest did not connect to the broker within 30 s (see {})",
        setup.dir.join("serve.log").display()
    );
    for version in [1, 2] {
        let path = setup.dir.join(format!("{MODEL}-v{version}.fmb"));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        setup
            .api
            .call(
                "POST",
                "/v1/models",
                &setup.token,
                Some(("application/octet-stream", bytes)),
            )
            .await
            .and_then(|(status, body)| {
                anyhow::ensure!(
                    (200..300).contains(&status),
                    "pushing {}: {status}: {}",
                    path.display(),
                    text(&body)
                );
                Ok(())
            })?;
    }
    setup.say(&format!("pushed {MODEL}@1 and {MODEL}@2"));
    let idle = rss(setup.server_pid);
    let broker_idle = setup.broker_pid.map(rss);

    let started = Instant::now();
    let devices = enroll(&setup, n).await?;
    report.enroll_s = started.elapsed().as_secs_f64();
    setup.say(&format!("enrolled {n} devices in {:.1} s", report.enroll_s));
    let enrolled = rss(setup.server_pid);

    let features: Vec<String> = crate::datasets::Table::from_csv(crate::demo::CLAIMS[3].1)
        .map_err(anyhow::Error::msg)?
        .columns
        .iter()
        .map(|(name, _)| name.clone())
        .filter(|name| name != "investigate")
        .collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let fleet = Arc::new(Fleet {
        http: setup.api.clone(),
        broker: ("127.0.0.1".to_string(), setup.broker_port),
        stats: Stats::default(),
        http_slots: Semaphore::new(setup.opts.http_concurrency),
        connect_slots: Semaphore::new(CONNECTING),
        period: (setup.opts.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / setup.opts.rate)),
        quiet: AtomicBool::new(false),
        stop: stop_rx,
        features,
    });
    fleet.stats.on_version[0].store(n as u64, Ordering::Relaxed);
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for (i, dev) in devices.iter().enumerate() {
        let seed = 0x5EED_0000 + i as u64;
        let puller = Puller {
            dev: dev.clone(),
            fleet: fleet.clone(),
            held: None,
            stored: HashSet::new(),
            failed: HashSet::new(),
            last_refusal: None,
        };
        tasks.spawn(puller.run(Rng(seed)));
        tasks.spawn(run_publisher(
            dev.clone(),
            fleet.clone(),
            Rng(seed ^ 0xA5A5),
        ));
        tasks.spawn(run_telemetry(
            dev.clone(),
            fleet.clone(),
            Rng(seed ^ 0x5A5A),
        ));
    }
    let within = Duration::from_secs(60) + Duration::from_millis(20 * n as u64);
    let every = Duration::from_millis(if n > 1000 { 2000 } else { 250 });
    let deadline = started + within;
    let mut last = 0;
    let all_online = loop {
        let count = online(&setup).await?;
        if count != last {
            setup.say(&format!("{count} of {n} devices online"));
            last = count;
        }
        if count >= n {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(every).await;
    };
    report.connected = last;
    if all_online {
        report.connect_s = Some(started.elapsed().as_secs_f64());
    } else {
        report.failures.push(format!(
            "only {} of {n} devices online within {} s ({} connected from the devices' side, {} failed connection attempts)",
            report.connected,
            within.as_secs(),
            fleet.stats.connected.load(Ordering::Relaxed),
            fleet.stats.connect_failures.load(Ordering::Relaxed)
        ));
    }
    // Let the connection storm's messages settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connected_rss = rss(setup.server_pid);
    let broker_connected = setup.broker_pid.map(rss);

    let rollout_within = Duration::from_secs(120) + Duration::from_millis(30 * n as u64);
    if all_online {
        let phases = run_phases(&setup, &fleet, &mut report, rollout_within).await;
        if let Err(e) = phases {
            report.failures.push(format!("{e:#}"));
        }
    }

    let (end, peak) = memory_of(setup.server_pid);
    report.memory = Some(Memory {
        control_plane_idle_kib: idle,
        control_plane_enrolled_kib: enrolled,
        control_plane_connected_kib: connected_rss,
        control_plane_end_kib: end,
        control_plane_peak_kib: peak,
        control_plane_per_device_kib: connected_rss.saturating_sub(idle) as f64 / n as f64,
        broker_idle_kib: broker_idle,
        broker_connected_kib: broker_connected,
        broker_per_device_kib: broker_idle
            .zip(broker_connected)
            .map(|(i, c)| c.saturating_sub(i) as f64 / n as f64),
        simulator_kib: memory_of(std::process::id()).0,
    });
    report.cpu = Some(Cpu {
        control_plane_s: cpu_of(setup.server_pid),
        broker_s: setup.broker_pid.map(cpu_of),
        simulator_s: cpu_of(std::process::id()),
    });

    // Drain: no new telemetry, every outbox empty, then compare with what was stored.
    fleet.quiet.store(true, Ordering::Relaxed);
    // Long enough for a device to re-publish what the broker acknowledged and no receipt
    // named (lost by the broker, or its receipt was).
    let drain_within = RESEND_AFTER + Duration::from_secs(60) + Duration::from_millis(5 * n as u64);
    let drained = wait_until(drain_within, Duration::from_millis(250), || async {
        Ok(fleet.stats.depth.load(Ordering::Relaxed) <= 0)
    })
    .await?;
    if !drained {
        report.failures.push(format!(
            "{} messages still unacknowledged in the devices' outboxes after {} s",
            fleet.stats.depth.load(Ordering::Relaxed),
            drain_within.as_secs()
        ));
    }
    // The ingest may still be storing what the broker acknowledged: wait while its count
    // moves (a backlog is slow, not lost); give up after 30 s without progress.
    let sealed = fleet.stats.sealed.load(Ordering::Relaxed);
    let waited = Instant::now();
    let (mut last, mut moved) = (0, Instant::now());
    loop {
        let stored = ingest_stored(&setup).await?;
        if stored >= sealed || moved.elapsed() > Duration::from_secs(30) {
            break;
        }
        if stored > last {
            (last, moved) = (stored, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report.ingest_drain_s = Some(waited.elapsed().as_secs_f64());
    setup.say(&format!(
        "the ingest stored the last messages {:.1} s after the devices went quiet",
        waited.elapsed().as_secs_f64()
    ));
    let sealed_of = |d: &Device| d.sealed.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mismatched = loop {
        let list = setup.get("/v1/devices").await?;
        let by_id: HashMap<&str, &Value> = list
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| Some((d["id"].as_str()?, d)))
                    .collect()
            })
            .unwrap_or_default();
        let mismatched = devices
            .iter()
            .filter(|d| {
                let sealed = sealed_of(d);
                !by_id.get(d.id.as_str()).is_some_and(|v| {
                    v["messages"].as_u64() == Some(sealed)
                        && v["last_seq"].as_u64() == Some(sealed.saturating_sub(1))
                })
            })
            .count();
        if mismatched == 0 || Instant::now() > deadline {
            break mismatched;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let counters = setup.get("/v1/ingest").await?;
    let stats = &fleet.stats;
    let mut sample_gaps = 0;
    let sample: Vec<&Arc<Device>> = devices.iter().step_by((n / 5).max(1)).take(5).collect();
    for d in &sample {
        if !log_is_whole(&setup, d).await? {
            sample_gaps += 1;
        }
    }
    report.checks = Checks {
        sealed: stats.sealed.load(Ordering::Relaxed),
        stored: counters["stored"].as_u64().unwrap_or(0),
        duplicates: counters["duplicates"].as_u64().unwrap_or(0),
        refused: counters["refused"].as_u64().unwrap_or(0),
        ingest_gaps: counters["gaps"].as_u64().unwrap_or(0),
        devices_mismatched: mismatched,
        sample_devices: sample.len(),
        sample_gaps,
        confirmed: stats.acked.load(Ordering::Relaxed),
        unacked: stats.depth.load(Ordering::Relaxed),
        republished: stats.republished.load(Ordering::Relaxed),
        reconnects: stats.reconnects.load(Ordering::Relaxed),
        connect_failures: stats.connect_failures.load(Ordering::Relaxed),
        assignment_refusals: stats.refusals.load(Ordering::Relaxed),
        download_failures: stats.download_failures.load(Ordering::Relaxed),
    };
    report.bundle_downloads = stats.downloads.load(Ordering::Relaxed);
    report.bundle_bytes = stats.download_bytes.load(Ordering::Relaxed);
    let c = &report.checks;
    if c.sealed != c.stored {
        report.failures.push(format!(
            "devices sealed {} messages, the control plane stored {} (its count stopped moving for 30 s)",
            c.sealed, c.stored
        ));
    }
    if c.devices_mismatched > 0 {
        report.failures.push(format!(
            "{} devices' stored messages differ from what they sealed",
            c.devices_mismatched
        ));
    }
    if c.sample_gaps > 0 {
        report.failures.push(format!(
            "{} of {} sampled devices have gaps in their stored messages",
            c.sample_gaps, c.sample_devices
        ));
    }
    if c.refused > 0 {
        report
            .failures
            .push(format!("the ingest refused {} messages", c.refused));
    }
    if c.assignment_refusals > 0 || c.download_failures > 0 {
        report.failures.push(format!(
            "devices refused {} assignments and failed {} downloads",
            c.assignment_refusals, c.download_failures
        ));
    }
    setup.say("stopping the devices");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    Ok(report)
}

/// The phases after every device is online: first install, steady telemetry, rollout,
/// rollback.
async fn run_phases(
    setup: &Setup,
    fleet: &Fleet,
    report: &mut Report,
    within: Duration,
) -> anyhow::Result<()> {
    let rollout =
        |version: u64| json!({ "model": MODEL, "version": version, "to": "all", "soak_s": 0 });
    report.rollout_install = Some(
        timed_rollout(
            setup,
            fleet,
            Step {
                name: "rollout claims@1 (first install)",
                path: "/v1/rollouts",
                body: rollout(1),
                version: 1,
            },
            within,
        )
        .await?,
    );
    // The first install's burst of events may still wait in the broker for the ingest:
    // the steady phase starts once the ingest is less than a second of telemetry
    // behind what the broker acknowledged.
    let slack = (setup.opts.devices as f64 * setup.opts.rate) as u64 + 100;
    let waited = Instant::now();
    let caught_up = wait_until(within, Duration::from_millis(250), || async {
        let stored = ingest_stored(setup).await?;
        Ok(fleet.stats.pubacked.load(Ordering::Relaxed) <= stored + slack)
    })
    .await?;
    anyhow::ensure!(
        caught_up,
        "the ingest was still more than {slack} messages behind the broker {} s after the first install",
        within.as_secs()
    );
    let catch_up_s = waited.elapsed().as_secs_f64();
    setup.say(&format!(
        "steady telemetry for {} s (the ingest caught up in {catch_up_s:.1} s)",
        setup.opts.duration.as_secs()
    ));
    let (stored0, sent0, t0) = (
        ingest_stored(setup).await?,
        fleet.stats.pubacked.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(setup.opts.duration).await;
    let (stored1, sent1) = (
        ingest_stored(setup).await?,
        fleet.stats.pubacked.load(Ordering::Relaxed),
    );
    let seconds = t0.elapsed().as_secs_f64();
    let steady = Steady {
        catch_up_s,
        seconds,
        ingested: stored1.saturating_sub(stored0),
        ingested_per_s: stored1.saturating_sub(stored0) as f64 / seconds,
        sent: sent1.saturating_sub(sent0),
        sent_per_s: sent1.saturating_sub(sent0) as f64 / seconds,
    };
    setup.say(&format!(
        "ingested {:.1} msgs/s (devices sent {:.1} msgs/s)",
        steady.ingested_per_s, steady.sent_per_s
    ));
    report.steady = Some(steady);
    report.rollout = Some(
        timed_rollout(
            setup,
            fleet,
            Step {
                name: "rollout claims@2",
                path: "/v1/rollouts",
                body: rollout(2),
                version: 2,
            },
            within,
        )
        .await?,
    );
    report.rollback = Some(
        timed_rollout(
            setup,
            fleet,
            Step {
                name: "rollback to claims@1",
                path: "/v1/rollbacks",
                body: json!({ "model": MODEL }),
                version: 1,
            },
            within,
        )
        .await?,
    );
    Ok(())
}

/// Whether the control plane holds every message `dev` sealed, sequence numbers 0..n
/// without a gap.
async fn log_is_whole(setup: &Setup, dev: &Device) -> anyhow::Result<bool> {
    let sealed = dev.sealed.load(Ordering::Relaxed);
    let mut expected = 0u64;
    while expected < sealed {
        let page = setup
            .get(&format!(
                "/v1/devices/{}/messages?from={expected}&limit=10000",
                dev.id
            ))
            .await?;
        let Some(list) = page.as_array().filter(|l| !l.is_empty()) else {
            return Ok(false);
        };
        for m in list {
            if m["seq"].as_u64() != Some(expected) {
                return Ok(false);
            }
            expected += 1;
        }
    }
    Ok(expected == sealed)
}
