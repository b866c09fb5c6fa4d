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
//! - subscribes to its `cmd` topic with QoS 0, as the agent does, and pulls its
//!   assignment each time the broker grants the subscription;
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

mod capacity;
mod device;
mod host;
mod http;
mod options;
mod phases;
mod report;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::Context;

pub use self::capacity::{Capacity, CapacityOptions, ingest_capacity};
use self::host::*;
use self::http::*;
use self::options::NATS_NODES;
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
    anyhow::ensure!(
        (1..=8).contains(&opts.replicas),
        "--replicas {}: give 1 to 8",
        opts.replicas
    );
    if opts.replicas > 1 {
        anyhow::ensure!(
            opts.database.is_some(),
            "--replicas {}: replicas share one PostgreSQL database; give --database postgres://…",
            opts.replicas
        );
        anyhow::ensure!(
            opts.broker != Broker::Embedded,
            "--replicas {}: replicas share an external broker; give --broker mosquitto or nats",
            opts.replicas
        );
    }
    let broker_exe = match opts.broker {
        Broker::Mosquitto => Some(find_mosquitto(opts.mosquitto.as_deref())?),
        Broker::Nats => Some(find_nats(opts.nats.as_deref())?),
        Broker::Embedded => None,
    };
    // Each device holds a socket in this process, in the broker and (embedded) in the
    // control plane; HTTP requests take more. The children inherit the limit.
    // The embedded broker holds three descriptors per device in the control plane (the
    // device's socket, the relay's connection and rumqttd's end of it).
    let open_file_limit = crate::plane::raise_open_file_limit(3 * opts.devices as u64 + 4096)?;
    // The control plane admits no more devices through its embedded broker than its
    // descriptors hold: more would wait for a slot that never frees.
    let embedded_room = crate::server::embedded_connection_cap(open_file_limit) as u64;
    anyhow::ensure!(
        opts.broker != Broker::Embedded || opts.devices as u64 <= embedded_room,
        "the open-file limit here is {open_file_limit} (the hard limit could not be raised); the \
         embedded broker holds 3 descriptors per device, so at most {embedded_room} devices: \
         raise the hard limit (`ulimit -Hn {}` as root with CAP_SYS_RESOURCE, or LimitNOFILE), \
         use --devices {embedded_room}, or --broker mosquitto (one descriptor per device)",
        3 * opts.devices as u64 + 4096
    );
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
    let report = run_in(opts, &dir, broker_exe.as_deref(), open_file_limit);
    if !report.as_ref().is_ok_and(Report::ok)
        && let Some(t) = temporary
    {
        // What went wrong is in the logs: keep them.
        eprintln!(
            "kept the work directory {} (serve*.log{})",
            t.keep().display(),
            match opts.broker {
                Broker::Embedded => "",
                Broker::Mosquitto => ", mosquitto.log",
                Broker::Nats => ", nats-*.log",
            }
        );
    }
    report
}

/// [`run`] in the work directory `dir`, with the broker executable `broker_exe` (none:
/// the embedded broker).
fn run_in(
    opts: &Options,
    dir: &Path,
    broker_exe: Option<&Path>,
    open_file_limit: u64,
) -> anyhow::Result<Report> {
    let clock = Instant::now();
    let say = |what: &str| eprintln!("[{:>7.1}s] {what}", clock.elapsed().as_secs_f64());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Stopped by SIGTERM (`timeout`, a script, a service manager), the simulation still
    // stops what it started: the brokers and replicas are not left running without it.
    // Listened for before anything starts; one that comes early is acted on once the
    // setup is done. (SIGINT from a terminal reaches the whole process group, so the
    // children stop with the simulator; SIGHUP is left to `nohup`.)
    let mut term = {
        let _entered = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listening for SIGTERM")?
    };
    say(&format!("working in {}", dir.display()));
    let fleetctl = std::env::current_exe().context("finding this fleetctl")?;
    prepare_bundles(&fleetctl, dir)?;

    let mut children = Children(Vec::new());
    // Where devices connect (spread over the list), where each replica's MQTT session
    // goes (replica i: the i-th, round the list), the NATS nodes the ingest pulls from.
    let (device_ports, replica_ports, queue, broker_pids) = match (opts.broker, broker_exe) {
        (Broker::Mosquitto, Some(bin)) => {
            let port = crate::demo::free_port()?;
            let child = start_mosquitto(bin, dir, port)?;
            let pid = child.id();
            children.0.push(child);
            (vec![port], vec![port], None, vec![pid])
        }
        (Broker::Nats, Some(bin)) => {
            let nodes = start_nats(bin, dir, NATS_NODES, &mut children)?;
            let pids = children.0.iter().map(Child::id).collect();
            let mqtt: Vec<u16> = nodes.iter().map(|n| n.mqtt_port).collect();
            let queue = nodes
                .iter()
                .map(|n| format!("nats://127.0.0.1:{}", n.port))
                .collect::<Vec<_>>()
                .join(",");
            say(&format!(
                "NATS cluster of {NATS_NODES} nodes, MQTT on {mqtt:?}"
            ));
            (mqtt.clone(), mqtt, Some(queue), pids)
        }
        _ => {
            let port = crate::demo::free_port()?;
            (vec![port], vec![port], None, Vec::new())
        }
    };
    let embedded = broker_pids.is_empty();
    let mut server_pids = Vec::new();
    let mut apis = Vec::new();
    let mut token = String::new();
    for r in 0..opts.replicas {
        // The first replica's data directory is `plane`; the others get its keys and
        // admin token (replicas sign assignments and chain the audit log with the same
        // keys), as docs/DEPLOY.md says to.
        let data_dir = if r == 0 {
            "plane".to_string()
        } else {
            format!("plane-{r}")
        };
        if r > 0 {
            let keys = dir.join(&data_dir);
            std::fs::create_dir_all(&keys)?;
            for f in ["admin.token", "assignment.key", "audit.key"] {
                std::fs::copy(dir.join("plane").join(f), keys.join(f))
                    .with_context(|| format!("copying plane/{f} to the replica {data_dir}"))?;
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700))?;
        }
        let log = if r == 0 {
            "serve.log".to_string()
        } else {
            format!("serve-{r}.log")
        };
        let http_port = crate::demo::free_port()?;
        let mut serve = Command::new(&fleetctl);
        serve
            // A measurement on one machine's loopback: plain, said so.
            .args([
                "serve",
                "--insecure-listen",
                "--data-dir",
                &data_dir,
                "--trust",
                "trust.toml",
            ])
            // One admin token enrolls and drives thousands of devices as fast as it can:
            // the capacity is measured, not the abuse limits.
            .args(["--rate-limit-token", "0", "--rate-limit-address", "0"])
            .args(["--listen", &format!("127.0.0.1:{http_port}")])
            .current_dir(dir)
            .stderr(log_file(dir, &log)?);
        if let Some(url) = &opts.database {
            serve.env("FLEETML_DATABASE_URL", url);
        }
        if opts.replicas > 1 || opts.blobs.is_some() {
            serve.args(["--blobs", opts.blobs.as_deref().unwrap_or("blobs")]);
        }
        if opts.replicas > 1 {
            serve.args(["--replica-id", &format!("r{r}")]);
        }
        if let Some(q) = &queue {
            serve.env("FLEETML_INGEST_QUEUE", q);
        }
        let port = replica_ports[r % replica_ports.len()];
        if embedded {
            serve.args(["--mqtt-listen", &format!("127.0.0.1:{port}")]);
        } else {
            serve.args(["--mqtt-url", &format!("mqtt://127.0.0.1:{port}")]);
        }
        let (child, first) =
            crate::demo::announcing(&mut serve).context("starting fleetctl serve")?;
        server_pids.push(child.id());
        children.0.push(child);
        let address = first
            .trim()
            .strip_prefix("control plane listening on http://")
            .with_context(|| {
                format!(
                    "fleetctl serve did not start (see {})",
                    dir.join(&log).display()
                )
            })?
            .to_string();
        if r == 0 {
            token = std::fs::read_to_string(dir.join("plane/admin.token"))
                .context("reading the control plane's admin token")?
                .trim()
                .to_string();
        }
        say(&format!(
            "control plane{} at http://{address} (pid {})",
            if opts.replicas > 1 {
                format!(" replica r{r}")
            } else {
                String::new()
            },
            server_pids[r]
        ));
        apis.push(Http::new(&address)?);
    }

    let setup = Setup {
        opts: opts.clone(),
        dir: dir.to_path_buf(),
        api: apis[0].clone(),
        apis,
        token,
        server_pids,
        broker_pids,
        device_ports,
        open_file_limit,
        clock,
    };
    let report = runtime.block_on(async {
        tokio::select! {
            report = orchestrate(setup) => report,
            _ = term.recv() => {
                say("SIGTERM: stopping the simulation's processes");
                Err(anyhow::anyhow!("the simulation was stopped by SIGTERM"))
            }
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(children);
    report
}
