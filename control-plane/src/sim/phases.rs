//! The phases of a simulation, timed: enrollment, connection, the first rollout, the
//! steady phase, a rollout, a rollback, the drain, and the checks of what arrived.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fleetml_device::pull::PullState;
use fleetml_protocol::telemetry::DeviceId;
use fleetml_protocol::trust::TrustPolicy;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};

use super::device::*;
use super::host::*;
use super::http::*;
use super::options::*;
use super::report::*;

/// Everything the async part needs.
pub(super) struct Setup {
    pub(super) opts: Options,
    pub(super) dir: PathBuf,
    /// The first replica's API (operator calls go there).
    pub(super) api: Http,
    /// Every replica's API (devices spread over them).
    pub(super) apis: Vec<Http>,
    pub(super) token: String,
    /// The control plane's processes, one per replica.
    pub(super) server_pids: Vec<u32>,
    /// The broker's processes (mosquitto, or the NATS nodes); none for the embedded one.
    pub(super) broker_pids: Vec<u32>,
    /// The MQTT ports devices connect to (spread over them).
    pub(super) device_ports: Vec<u16>,
    pub(super) open_file_limit: u64,
    pub(super) clock: Instant,
}

impl Setup {
    pub(super) fn say(&self, what: &str) {
        eprintln!("[{:>7.1}s] {what}", self.clock.elapsed().as_secs_f64());
    }

    pub(super) async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.api.json("GET", path, &self.token, None).await
    }

    pub(super) async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.api.json("POST", path, &self.token, Some(body)).await
    }

    /// The ingest counters of `GET /v1/ingest` (`stored`, `duplicates`, …) added up over
    /// the replicas (each counts what it ingested), and whether every replica's ingest
    /// is connected.
    pub(super) async fn ingest(&self) -> anyhow::Result<(HashMap<String, u64>, bool)> {
        let mut sums: HashMap<String, u64> = HashMap::new();
        let mut connected = true;
        for api in &self.apis {
            let v = api.json("GET", "/v1/ingest", &self.token, None).await?;
            connected &= v["broker_connected"] == true;
            if let Some(fields) = v.as_object() {
                for (k, v) in fields {
                    if let Some(n) = v.as_u64() {
                        *sums.entry(k.clone()).or_default() += n;
                    }
                }
            }
        }
        Ok((sums, connected))
    }

    /// Resident memory of the control plane (all replicas added) now, KiB.
    pub(super) fn server_rss(&self) -> u64 {
        self.server_pids.iter().map(|p| rss(*p)).sum()
    }

    /// Resident memory of the broker's processes added up, KiB; none for the embedded
    /// broker (it is inside the control plane).
    pub(super) fn broker_rss(&self) -> Option<u64> {
        (!self.broker_pids.is_empty()).then(|| self.broker_pids.iter().map(|p| rss(*p)).sum())
    }
}

/// The trust policy devices were given, parsed once: (its TOML, the policy).
pub(super) type PolicyCache = Mutex<Option<(String, Arc<TrustPolicy>)>>;

/// Enrolls `n` devices through `POST /v1/devices`, as `fleetctl devices enroll` does.
pub(super) async fn enroll(setup: &Setup, n: usize) -> anyhow::Result<Vec<Arc<Device>>> {
    let slots = Arc::new(Semaphore::new(ENROLLING));
    let policies: Arc<PolicyCache> = Default::default();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (slots, policies) = (slots.clone(), policies.clone());
        // Enrolled through every replica in turn: any answers any request.
        let (api, token) = (
            setup.apis[i % setup.apis.len()].clone(),
            setup.token.clone(),
        );
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
            anyhow::Ok((i, Device::new(id, i, secret, board, policy)))
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
pub(super) async fn online(setup: &Setup) -> anyhow::Result<usize> {
    let list = setup.get("/v1/devices").await?;
    Ok(list
        .as_array()
        .map(|a| a.iter().filter(|d| d["online"] == true).count())
        .unwrap_or(0))
}

pub(super) async fn ingest_stored(setup: &Setup) -> anyhow::Result<u64> {
    Ok(setup.ingest().await?.0.get("stored").copied().unwrap_or(0))
}

/// A rollout or rollback to time: its name, the API path and body that start it, and
/// the version every device ends on.
pub(super) struct Step<'a> {
    pub(super) name: &'a str,
    pub(super) path: &'a str,
    pub(super) body: Value,
    pub(super) version: u64,
}

/// Starts `step` and waits (at most `within`) until the control plane says it completed.
pub(super) async fn timed_rollout(
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
    let view = loop {
        if devices_s.is_none() && on(version) as usize >= n {
            devices_s = Some(started.elapsed().as_secs_f64());
        }
        let v = setup.get(&format!("/v1/rollouts/{id}")).await?;
        match v["state"].as_str() {
            Some("completed") => break v,
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
    };
    let phase = Phase {
        name: name.to_string(),
        id,
        control_plane_s: started.elapsed().as_secs_f64(),
        devices_s: devices_s
            .or_else(|| (on(version) as usize >= n).then(|| started.elapsed().as_secs_f64())),
        reminded: view["waves"]
            .as_array()
            .map_or(0, |w| w.iter().filter_map(|w| w["reminded"].as_u64()).sum()),
    };
    setup.say(&format!(
        "{name}: completed in {:.1} s{}",
        phase.control_plane_s,
        match phase.reminded {
            0 => String::new(),
            n => format!(" (silent devices told again {n} time(s))"),
        }
    ));
    Ok(phase)
}

/// The compiled-in claims model's features (its training table's columns but the label).
pub(super) fn claims_features() -> anyhow::Result<Vec<String>> {
    Ok(crate::datasets::Table::from_csv(crate::demo::CLAIMS[3].1)
        .map_err(anyhow::Error::msg)?
        .columns
        .iter()
        .map(|(name, _)| name.clone())
        .filter(|name| name != "investigate")
        .collect())
}

/// Waits until `check` says yes, polling every `every`, for at most `within`.
pub(super) async fn wait_until<F, Fut>(
    within: Duration,
    every: Duration,
    mut check: F,
) -> anyhow::Result<bool>
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

pub(super) async fn orchestrate(setup: Setup) -> anyhow::Result<Report> {
    let n = setup.opts.devices;
    let mut report = Report {
        devices: n,
        broker: setup.opts.broker,
        store: if setup.opts.database.is_some() {
            "postgresql"
        } else {
            "sled"
        },
        replicas: setup.opts.replicas,
        blobs: setup.opts.blobs.clone(),
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
        || async { Ok(setup.ingest().await?.1) },
    )
    .await?;
    anyhow::ensure!(
        ready,
        "the control plane's ingest did not connect to the broker within 30 s (see {})",
        setup.dir.join("serve*.log").display()
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
    let idle = setup.server_rss();
    let broker_idle = setup.broker_rss();

    let started = Instant::now();
    let devices = enroll(&setup, n).await?;
    report.enroll_s = started.elapsed().as_secs_f64();
    setup.say(&format!("enrolled {n} devices in {:.1} s", report.enroll_s));
    let enrolled = setup.server_rss();

    let features = claims_features()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let fleet = Arc::new(Fleet {
        http: setup.apis.clone(),
        brokers: setup.device_ports.clone(),
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
            state: PullState::default(),
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
    let connected_rss = setup.server_rss();
    let broker_connected = setup.broker_rss();

    let rollout_within = Duration::from_secs(120) + Duration::from_millis(30 * n as u64);
    if all_online {
        let phases = run_phases(&setup, &fleet, &mut report, rollout_within).await;
        if let Err(e) = phases {
            setup.say(&format!("failed: {e:#}"));
            report.failures.push(format!("{e:#}"));
        }
    }

    // Added up over the replicas; the peak is the largest one replica reached.
    let (end, peak) = setup
        .server_pids
        .iter()
        .map(|p| memory_of(*p))
        .fold((0, 0), |(e, p), (e1, p1)| (e + e1, p.max(p1)));
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
        control_plane_s: setup.server_pids.iter().map(|p| cpu_of(*p)).sum(),
        broker_s: (!setup.broker_pids.is_empty())
            .then(|| setup.broker_pids.iter().map(|p| cpu_of(*p)).sum()),
        simulator_s: cpu_of(std::process::id()),
    });

    // Drain: no new telemetry, every outbox empty, then compare with what was stored.
    fleet.quiet.store(true, Ordering::Relaxed);
    // Long enough for a device to re-publish what the broker acknowledged and no receipt
    // named (lost by the broker, or its receipt was).
    let drain_within = RESEND_AFTER + Duration::from_secs(60) + Duration::from_millis(5 * n as u64);
    let depth = fleet.stats.depth.load(Ordering::Relaxed);
    if depth > 0 {
        setup.say(&format!(
            "devices quiet; waiting up to {} s for {depth} messages in their outboxes to be acknowledged",
            drain_within.as_secs()
        ));
    }
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
    let (counters, _) = setup.ingest().await?;
    let counter = |name: &str| counters.get(name).copied().unwrap_or(0);
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
        stored: counter("stored"),
        duplicates: counter("duplicates"),
        refused: counter("refused"),
        ingest_gaps: counter("gaps"),
        devices_mismatched: mismatched,
        sample_devices: sample.len(),
        sample_gaps,
        confirmed: stats.acked.load(Ordering::Relaxed),
        unacked: stats.depth.load(Ordering::Relaxed),
        republished: stats.republished.load(Ordering::Relaxed),
        reconnects: stats.reconnects.load(Ordering::Relaxed),
        connect_failures: stats.connect_failures.load(Ordering::Relaxed),
        subscribe_refusals: stats.subscribe_refusals.load(Ordering::Relaxed),
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
pub(super) async fn run_phases(
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
pub(super) async fn log_is_whole(setup: &Setup, dev: &Device) -> anyhow::Result<bool> {
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
