//! `fleetctl sim`: simulated devices against a real control plane.

use std::sync::Arc;

use super::common::*;

pub(crate) const SIM_ABOUT: &str = "\
Measure a control plane under a fleet of simulated devices.

Starts `fleetctl serve` (this executable) in a work directory, with its embedded broker, \
on a private mosquitto (--broker mosquitto) or on a private three-node NATS cluster with \
JetStream and MQTT (--broker nats: devices spread over the nodes, the ingest pulls from \
the JetStream work queue), as --replicas N replicas sharing one PostgreSQL database \
(--database) and one blob store (--blobs), then pushes claims v1 and v2, enrolls --devices N \
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
are compared with what it sealed. Exits non-zero when a check fails.

With --ingest-only, only the ingest's storing is measured, with nothing else on the \
machine's cores: --devices N devices are enrolled straight into the store (sled in the \
work directory, or --database), --messages window reports each are sealed beforehand \
and handed to the store as the MQTT ingest stores a backlog (4 lanes at once, at most \
--in-flight messages waiting, cut into batches as the ingest cuts them: at most 2,048 \
messages from at most 256 devices). Reports messages stored per second: the ceiling of \
the store on this machine.";

#[derive(Args, Debug)]
pub(crate) struct SimArgs {
    /// How many devices to simulate.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Broker: `embedded` (rumqttd inside the control plane), `mosquitto` (started by
    /// the simulator; Debian's mosquitto package) or `nats` (three nats-server nodes
    /// started by the simulator; Debian's nats-server package).
    #[arg(long, default_value = "embedded")]
    broker: fleet_control::sim::Broker,
    /// The mosquitto executable (default: /usr/sbin/mosquitto, /usr/bin/mosquitto, PATH).
    #[arg(long)]
    mosquitto: Option<PathBuf>,
    /// The nats-server executable (default: /usr/sbin/nats-server, /usr/bin, PATH).
    #[arg(long)]
    nats: Option<PathBuf>,
    /// Control-plane replicas (`serve --replica-id`); more than one needs --database and
    /// --broker mosquitto or nats. Devices and enrollments spread over them.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Where the control plane keeps bundles (`serve --blobs`): a folder, or
    /// s3://BUCKET/PREFIX with AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY in the environment. Default: the data directory, or with
    /// replicas a folder in the work directory that they share.
    #[arg(long)]
    blobs: Option<String>,
    /// Keep the control plane's state in this PostgreSQL database (`serve --database`;
    /// an empty database: the run writes into it) instead of sled.
    #[arg(long, env = "FLEETML_SIM_DATABASE_URL", hide_env_values = true)]
    database: Option<String>,
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
    /// Measure only the ingest's storing (no broker, no `fleetctl serve`, no devices
    /// connected): see above.
    #[arg(long, conflicts_with_all = ["broker", "mosquitto", "nats", "replicas", "blobs", "rate", "duration", "http_concurrency"])]
    ingest_only: bool,
    /// With --ingest-only: window reports per device.
    #[arg(long, requires = "ingest_only", default_value_t = 50)]
    messages: usize,
    /// With --ingest-only: the broker's in-flight window for the ingest (mosquitto's
    /// `max_inflight_messages`; the default is what `fleetctl broker acl` sets).
    #[arg(long, requires = "ingest_only", default_value_t = fleet_control::ingest_mqtt::BROKER_IN_FLIGHT)]
    in_flight: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `--ingest-only`: the store's ceiling.
fn ingest_only(a: &SimArgs) -> anyhow::Result<()> {
    let opts = fleet_control::sim::CapacityOptions {
        devices: a.devices,
        messages: a.messages,
        in_flight: a.in_flight,
    };
    // Before any store is made (a refused run leaves nothing in --dir).
    opts.check()?;
    // Removed at the end when it is a temporary folder (sled only).
    let mut temporary = None;
    let (store, name): (Arc<dyn fleet_control::store::FleetStore>, String) = match &a.database {
        Some(url) => {
            let store = fleet_control::store::postgres::PgStore::open(url)?;
            let name = format!("postgresql ({})", store.describe());
            (Arc::new(store), name)
        }
        None => {
            let dir = match &a.dir {
                Some(d) => {
                    std::fs::create_dir_all(d)
                        .with_context(|| format!("creating {}", d.display()))?;
                    d.clone()
                }
                None => {
                    let t = tempfile::Builder::new().prefix("fleetml-sim-").tempdir()?;
                    temporary.insert(t).path().to_path_buf()
                }
            };
            let path = dir.join("fleet.db");
            anyhow::ensure!(
                !path.exists(),
                "{}: a store is there already; give --dir a new folder",
                path.display()
            );
            let store = fleet_control::store::sled::SledStore::open_with_cache(
                &path,
                crate::cli::serve::STORE_CACHE_MIB << 20,
            )?;
            (Arc::new(store), "sled".to_string())
        }
    };
    let c = fleet_control::sim::ingest_capacity(store, &name, &opts)?;
    if a.json {
        print_json(&serde_json::to_value(&c)?)?;
    } else {
        println!(
            "{}: {} devices, {} messages of {} bytes in {:.2} s: {:.0} stored/s \
             ({} lanes, batches of {} from at most {} devices)",
            c.store,
            c.devices,
            c.stored,
            c.message_bytes,
            c.seconds,
            c.stored_per_s,
            c.lanes,
            c.batch,
            c.batch_devices
        );
    }
    anyhow::ensure!(
        c.stored == c.messages && c.refused == 0,
        "the store kept {} of {} messages ({} refused, {} duplicates)",
        c.stored,
        c.messages,
        c.refused,
        c.duplicates
    );
    Ok(())
}

pub(crate) fn sim_command(a: SimArgs) -> anyhow::Result<()> {
    if a.ingest_only {
        return ingest_only(&a);
    }
    let report = fleet_control::sim::run(&fleet_control::sim::Options {
        devices: a.devices,
        broker: a.broker,
        mosquitto: a.mosquitto,
        nats: a.nats,
        database: a.database,
        replicas: a.replicas,
        blobs: a.blobs,
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
    Ok(())
}
