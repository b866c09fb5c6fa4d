//! `fleetctl serve`: the control plane.

use super::common::*;

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Where the control plane keeps its state (created mode 0700).
    #[arg(long)]
    data_dir: PathBuf,
    /// Keep the control plane's state (devices, messages, rollouts, registry, tokens,
    /// audit log, policies, datasets, jobs) in this PostgreSQL database instead of
    /// DATA_DIR/fleet.db: postgres://USER[:PASSWORD]@HOST[:PORT]/DB. The schema is
    /// created and migrated at start; a database written by a newer fleetctl is refused.
    /// Add ?sslmode=require for TLS (the server's certificate is checked against
    /// PGSSLROOTCERT, else the system's CAs). Prefer the environment variable: a
    /// password on the command line shows in `ps`. Never logged with its password.
    #[arg(long, env = "FLEETML_DATABASE_URL", hide_env_values = true)]
    database: Option<String>,
    /// Where bundle files are kept: a folder (local, or shared by every replica — NFS,
    /// a mounted volume), or S3-compatible object storage, s3://BUCKET/PREFIX, with the
    /// endpoint, region and credentials from AWS_ENDPOINT_URL, AWS_REGION,
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_ALLOW_HTTP=true for a plain
    /// endpoint); each replica caches what it serves in DATA_DIR/blob-cache. With
    /// s3:// the datasets go there too (PREFIX/datasets/, cached in DATA_DIR/datasets);
    /// otherwise they stay in DATA_DIR/datasets.
    /// [default: DATA_DIR/blobs]
    #[arg(long)]
    blobs: Option<String>,
    /// Run as one of several replicas on one --database and one --mqtt-url broker:
    /// every replica serves the whole API, the replicas share the telemetry ingest (an
    /// MQTT shared subscription), and one elected leader runs the rollout and policy
    /// engines; another takes over within seconds when it dies. Letters, digits, '-'
    /// and '_'; unique per replica.
    #[arg(long, requires_all = ["database", "mqtt_url"])]
    replica_id: Option<String>,
    /// Take the devices' messages from a JetStream work queue on a NATS cluster instead
    /// of an MQTT subscription: nats://[USER:PASSWORD@]HOST:PORT (tls:// with TLS;
    /// --mqtt-ca names its CA), comma-separated for several nodes. The stream
    /// FLEETML_INGEST and its consumer fleetml-ingest are made when missing. Devices keep
    /// speaking MQTT to the cluster's MQTT port (--mqtt-url). NATS's MQTT has no shared
    /// subscriptions: this is how replicas on NATS split the ingest. Prefer the
    /// environment variable when the URL holds a password.
    #[arg(
        long,
        env = "FLEETML_INGEST_QUEUE",
        hide_env_values = true,
        requires = "mqtt_url"
    )]
    ingest_queue: Option<String>,
    /// Copies of the FLEETML_INGEST stream the NATS cluster keeps when it is made
    /// (1 to 5). Default: as many as the cluster has nodes, at most 3.
    #[arg(long, requires = "ingest_queue", value_parser = clap::value_parser!(u8).range(1..=5))]
    ingest_queue_replicas: Option<u8>,
    /// Messages kept per device in the message log (GET /v1/devices/ID/messages): the
    /// newest N; the leader removes older ones at start and every 10 minutes. Each
    /// device's status, latest windows, lifecycle events and alerts are kept apart and
    /// stay. 0 keeps everything.
    #[arg(long, default_value_t = 50_000)]
    retain_messages: usize,
    /// How long the message log keeps a kind of message, counted from when the control
    /// plane stored it: KIND=AGE, repeatable; KIND is status, window, alert, event or
    /// ack; AGE like 30d, or 0 to keep that kind until --retain-messages removes it.
    /// Defaults: status=30d, ack=30d, window=365d, alert=365d, event=365d (naming a
    /// kind replaces its default only). Applied by the leader with --retain-messages.
    #[arg(long = "retain", value_name = "KIND=AGE", value_parser = parse_retain)]
    retain: Vec<(String, std::time::Duration)>,
    /// How many messages of a kind the message log keeps per device, newest first:
    /// KIND=N, repeatable (status=1000 keeps each device's last 1,000 statuses, whatever
    /// their age); N is 1 or more. No default: a kind not named is limited by --retain
    /// and --retain-messages only. Applied by the leader before --retain-messages.
    #[arg(long = "retain-count", value_name = "KIND=N", value_parser = parse_retain_count)]
    retain_count: Vec<(String, usize)>,
    /// Window reports older than this are thinned to the first of each device, model and
    /// hour (a chart over months keeps its shape at a 12th of the size with 5-minute
    /// windows); 0: never thinned.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    downsample_windows_after: std::time::Duration,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:7080")]
    listen: std::net::SocketAddr,
    /// Address of the embedded MQTT broker's plain listener. With TLS it serves loopback
    /// only (the ingest, local tools); devices connect to --mqtts-listen.
    #[arg(long, default_value = "127.0.0.1:1883", conflicts_with = "mqtt_url")]
    mqtt_listen: std::net::SocketAddr,
    /// Address of the embedded broker's MQTT-over-TLS listener (same certificate as the
    /// API). Default with TLS: 127.0.0.1:8883.
    #[arg(long, conflicts_with_all = ["mqtt_url", "insecure_listen"])]
    mqtts_listen: Option<std::net::SocketAddr>,
    /// Use this external broker instead of the embedded one:
    /// mqtts://[USER:PASSWORD@]HOST[:PORT] (or mqtt:// for plain). Enable its persistence.
    #[arg(long)]
    mqtt_url: Option<String>,
    /// CA of the external broker's certificate (PEM); enrolled devices are told to trust
    /// it too. Default: the system's CA bundle.
    #[arg(long, requires = "mqtt_url")]
    mqtt_ca: Option<PathBuf>,
    /// Serve HTTPS and MQTTS with a private CA kept in DATA_DIR/tls (made on first start;
    /// enrolled devices pin it; operators pass DATA_DIR/tls/ca.pem with --ca). The server
    /// certificate is issued at every start for loopback, this host's name, the listen
    /// addresses, the public URLs' hosts and --tls-name.
    #[arg(long, conflicts_with_all = ["tls_cert", "insecure_listen"])]
    self_signed: bool,
    /// More names (DNS or IP) the self-signed server certificate covers.
    #[arg(long, requires = "self_signed")]
    tls_name: Vec<String>,
    /// Serve HTTPS and MQTTS with this certificate chain (PEM; the server's first).
    #[arg(long, requires = "tls_key", conflicts_with = "insecure_listen")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA enrolled devices are told to trust (PEM). Default with --tls-cert: the
    /// device's system CA bundle.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Serve plain HTTP and MQTT: API tokens, enrolment replies (with device secrets) and
    /// MQTT passwords cross the network in clear. Only behind a TLS-terminating proxy or
    /// for a test on one machine.
    #[arg(long)]
    insecure_listen: bool,
    /// Trust policy (TOML) handed to enrolled devices.
    #[arg(long)]
    trust: Option<PathBuf>,
    /// URL devices and operators reach the API at. Default: http://LISTEN.
    #[arg(long)]
    public_url: Option<String>,
    /// Broker URL written into enrolled devices' configs; comma-separated for the nodes
    /// of a clustered broker, which devices try in turn when a connection fails.
    /// Default: the broker's address.
    #[arg(long)]
    public_mqtt_url: Option<String>,
    /// How long an assignment a device fetched stays valid (devices refuse expired ones:
    /// an attacker cannot hold a device on old assignments longer than this). Units s, m, h, d.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    assignment_ttl: std::time::Duration,
    /// How long after a wave starts the rollout engine tells its online devices that
    /// have reported nothing since their assignment about it again; then after twice as
    /// long each time, four times at most. Commands are QoS 0 nudges, and a clustered broker
    /// can lose one while the device stays connected (devices also poll, every
    /// `assignment_poll_s`, 5 minutes by default). 0 never reminds. Units ms, s, m, h.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    rollout_remind_after: std::time::Duration,
    /// Signing key (from `fleetctl keys generate`) for the candidate bundles training
    /// jobs build; the trust policy must list its public key.
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// How often each device is told which of its messages are stored (its receipt):
    /// until then the device keeps them, so nothing the broker acknowledged but the
    /// control plane did not store is lost. Units ms, s, m, h.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    receipt_interval: std::time::Duration,
    /// How often the calls refused for want of a valid token are written to the audit
    /// log, as one entry with their count (each is also counted in
    /// fleetml_control_unauthenticated_requests_total). Units ms, s, m, h.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    audit_interval: std::time::Duration,
    /// Notification rules and receivers (TOML; docs/ALERTS.md): which conditions alert —
    /// drift alerts, missing predictions, silent devices, rollouts paused, rolled back or
    /// completed, retraining jobs finished — and where they go: Alertmanager's API v2, a
    /// signed JSON webhook, a Slack-compatible incoming webhook. Without it the built-in
    /// rules run and alerts are listed (`fleetctl alerts list`) but sent nowhere. Every
    /// replica needs the same file; the leader sends.
    #[arg(long, value_name = "FILE")]
    alerts: Option<PathBuf>,
    /// The key the audit chain is MACed with (made, mode 0600, on first start). It must
    /// not live in the database: put it on another disk or in a systemd credential, and
    /// keep a copy; `fleetctl audit verify --key FILE` checks the log with it.
    /// [default: DATA_DIR/audit.key]
    #[arg(long, env = "FLEETML_AUDIT_KEY")]
    audit_key: Option<PathBuf>,
    /// Where training trials get their folders (data in, model and log out). With
    /// --trial-user it must be outside DATA_DIR. [default: DATA_DIR/jobs]
    #[arg(long)]
    trials_dir: Option<PathBuf>,
    /// Run local training trials as this OS user (one of their own, e.g. `useradd
    /// --system --no-create-home --shell /usr/sbin/nologin fleetml-trial`), so a trainer
    /// cannot read DATA_DIR's keys, tokens and device secrets. Needs the control plane to
    /// run as root and --trials-dir outside DATA_DIR. Without it trials run as the
    /// control plane's user (the packaged unit's `fleetml`).
    #[arg(long, requires = "trials_dir")]
    trial_user: Option<String>,
    /// An API request not answered this long after its head arrived gets 408; a
    /// connection on which nothing moves this long is closed. Large dataset uploads on
    /// slow links need it longer. Units s, m, h.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    request_timeout: std::time::Duration,
    /// API connections served at once; more are closed at once (and counted in
    /// fleetml_control_http_connections_refused_total). The open-files limit must leave
    /// room for them: the packaged unit sets LimitNOFILE=65536, and the soft limit is
    /// raised to the hard one at start.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Changes (POST, PUT, DELETE) one operator token or device may make per second,
    /// with bursts of ten times that; more are answered 429 with Retry-After and counted
    /// in fleetml_control_rate_limited_total{by="token"}. 0: no limit.
    #[arg(long, default_value_t = 20)]
    rate_limit_token: u32,
    /// Changes one client IP address may send per second (checked before its token, so
    /// token guessing is limited too), with bursts of ten times that. Behind a proxy
    /// every call has the proxy's address: raise it, or set 0 and limit at the proxy.
    #[arg(long, default_value_t = 50)]
    rate_limit_address: u32,
    /// Bytes of captured data kept per device (uploads only for the models a device is
    /// assigned); a new batch beyond it is refused with 413 until old captures are
    /// removed.
    #[arg(long, default_value_t = 1 << 30)]
    capture_quota: u64,
    /// MiB of DATA_DIR/fleet.db's pages kept in memory (sled's page cache; sled's own
    /// default is 1024). Pages beyond it are read back from the file (and the kernel's
    /// page cache). Unused with --database.
    #[arg(long, env = "FLEETML_STORE_CACHE_MIB", default_value_t = crate::cli::serve::STORE_CACHE_MIB)]
    store_cache_mib: u64,
    /// How soon freed memory goes back to the system: jemalloc's background threads
    /// purge pages left unused this long (fleetctl built without its `jemalloc`
    /// feature: glibc's malloc_trim this often). Otherwise the allocator keeps what a
    /// burst (a rollout to thousands of devices) freed. 0s never.
    #[arg(long, env = "FLEETML_MALLOC_TRIM_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    malloc_trim_interval: std::time::Duration,
    /// Threads for blocking work at most (store reads and writes, token checks, the
    /// fleet snapshot); more work waits for one. Each thread keeps memory it freed
    /// cached for reuse, so under a burst (a rollout to thousands of devices) memory
    /// grows with the threads (docs/BENCHMARKS.md, "jemalloc, and at most 64 blocking
    /// threads").
    #[arg(long, env = "FLEETML_BLOCKING_THREADS", default_value_t = BLOCKING_THREADS,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    blocking_threads: u16,
}

/// `--store-cache-mib`'s default.
pub(crate) const STORE_CACHE_MIB: u64 = 256;

/// `--blocking-threads`' default.
pub(crate) const BLOCKING_THREADS: u16 = 64;

#[cfg(test)]
impl ServeArgs {
    /// `--blocking-threads` as parsed.
    pub(crate) fn blocking_threads(&self) -> u16 {
        self.blocking_threads
    }
}

pub(crate) fn serve_command(a: ServeArgs) -> anyhow::Result<()> {
    let blocking_threads = usize::from(a.blocking_threads);
    if let (Some(user), Some(trials)) = (&a.trial_user, &a.trials_dir)
        && std::path::absolute(trials)?.starts_with(std::path::absolute(&a.data_dir)?)
    {
        anyhow::bail!(
            "--trial-user {user} cannot enter DATA_DIR (mode 0700), where the trial folders would be: give --trials-dir DIR outside it (e.g. /var/lib/fleetml-trials)"
        );
    }
    let tls = match (a.self_signed, a.tls_cert, a.tls_key, a.insecure_listen) {
        (true, ..) => fleet_control::tls::Mode::SelfSigned { names: a.tls_name },
        (_, Some(cert), Some(key), _) => fleet_control::tls::Mode::Files {
            cert,
            key,
            ca: a.tls_ca,
        },
        (.., true) => fleet_control::tls::Mode::Insecure,
        _ => anyhow::bail!(
            "fleetctl serve needs TLS: pass --self-signed (a private CA kept in DATA_DIR/tls; \
             the easy path), or --tls-cert FILE --tls-key FILE, or --insecure-listen to serve \
             plain HTTP and MQTT behind a TLS-terminating proxy"
        ),
    };
    let mqtt = match &a.mqtt_url {
        Some(u) => fleet_control::server::Mqtt::External(u.parse().map_err(anyhow::Error::msg)?),
        None => fleet_control::server::Mqtt::Embedded(a.mqtt_listen),
    };
    let opts = fleet_control::server::Options {
        data_dir: a.data_dir,
        database: a.database,
        blobs: a.blobs,
        replica_id: a.replica_id,
        ingest_queue: match &a.ingest_queue {
            Some(list) => Some(fleet_control::ingest_queue::QueueOptions {
                urls: fleet_control::ingest_queue::QueueOptions::parse(list)
                    .map_err(anyhow::Error::msg)?,
                ca: a.mqtt_ca.clone(),
                replicas: a.ingest_queue_replicas.map(usize::from),
            }),
            None => None,
        },
        retain_messages: a.retain_messages,
        retain_count: a.retain_count.iter().cloned().collect(),
        retain: {
            let mut rules = fleet_control::store::AgeRules::defaults();
            for (kind, age) in &a.retain {
                match age.as_millis() as u64 {
                    0 => rules.max_age_ms.remove(kind),
                    ms => rules.max_age_ms.insert(kind.clone(), ms),
                };
            }
            rules.downsample_windows_after_ms = match a.downsample_windows_after.as_millis() as u64
            {
                0 => None,
                ms => Some(ms),
            };
            rules
        },
        listen: a.listen,
        mqtt,
        trust: a.trust,
        public_url: a.public_url,
        public_mqtt_url: a.public_mqtt_url,
        assignment_ttl: a.assignment_ttl,
        rollout_remind: a.rollout_remind_after,
        signing_key: a.signing_key,
        receipt_interval: a.receipt_interval,
        audit_interval: a.audit_interval,
        alerts: a.alerts,
        audit_key: a.audit_key,
        trials_dir: a.trials_dir,
        trial_user: a.trial_user,
        http: fleet_control::server::http_limits(a.request_timeout, a.max_connections),
        rate_limits: fleet_control::server::RateLimits {
            per_token: a.rate_limit_token,
            per_address: a.rate_limit_address,
        },
        capture_quota: a.capture_quota,
        store_cache: a.store_cache_mib.saturating_mul(1 << 20),
        malloc_trim_interval: a.malloc_trim_interval,
        tls,
        mqtts_listen: a.mqtts_listen,
        mqtt_ca: a.mqtt_ca,
    };
    tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(blocking_threads)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(fleet_control::server::serve(opts))?;
    Ok(())
}

/// `KIND=AGE` of `--retain`.
fn parse_retain(text: &str) -> Result<(String, std::time::Duration), String> {
    let (kind, age) = kind_and(text, "KIND=AGE, like window=90d")?;
    Ok((kind, parse_duration(age)?))
}

/// `KIND=N` of `--retain-count`.
fn parse_retain_count(text: &str) -> Result<(String, usize), String> {
    let (kind, n) = kind_and(text, "KIND=N, like status=1000")?;
    let n: usize = n.trim().parse().map_err(|_| {
        format!("`{text}`: `{n}` is not a count of messages (a whole number, 1 or more)")
    })?;
    if n == 0 {
        // Elsewhere 0 means "no limit"; here it would delete every message of the kind.
        return Err(format!(
            "`{text}`: a count of 0 would remove every {kind} message; give 1 or more, or \
             leave {kind} out to keep it without a count limit"
        ));
    }
    Ok((kind, n))
}

/// The kind of message before `=` in `text`, and what follows.
fn kind_and<'t>(text: &'t str, expected: &str) -> Result<(String, &'t str), String> {
    let (kind, rest) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected {expected}"))?;
    let kind = kind.trim();
    if !fleet_control::store::KINDS.contains(&kind) {
        return Err(format!(
            "`{text}`: `{kind}` is not a kind of message; use one of {}",
            fleet_control::store::KINDS.join(", ")
        ));
    }
    Ok((kind.to_string(), rest))
}
