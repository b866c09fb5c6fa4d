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

mod device;
mod host;
mod http;
mod options;
mod phases;
mod report;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use self::host::*;
use self::http::*;
pub use self::options::{Broker, Options};
use self::phases::*;
pub use self::report::*;

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
        // A measurement on one machine's loopback: plain, said so.
        .args([
            "serve",
            "--insecure-listen",
            "--data-dir",
            "plane",
            "--trust",
            "trust.toml",
        ])
        // One admin token enrolls and drives thousands of devices as fast as it can: the
        // capacity is measured, not the abuse limits.
        .args(["--rate-limit-token", "0", "--rate-limit-address", "0"])
        .args(["--listen", &format!("127.0.0.1:{http_port}")])
        .current_dir(dir)
        .stderr(log_file(dir, "serve.log")?);
    if let Some(url) = &opts.database {
        serve.env("FLEETML_DATABASE_URL", url);
    }
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
