//! Registry → signed assignments → staged rollouts → rollback, end to end with real
//! processes: `fleetctl serve` (embedded broker), `fleet-agent run` pulling its
//! assignment over HTTP, real bundles and signatures. Attacks on assignments (replay,
//! expiry, unknown key, swapped bundle), resumable downloads, a command the broker loses
//! (the engine's reminders), a rollout started while the broker is down, and the RBAC
//! matrix with the audit chain.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetml_protocol::assignment::{AssignedModel, Assignment, FORMAT, http_token};
use fleetml_protocol::crypto::{Sha256, SigningKey};
use fleetml_protocol::telemetry::DeviceId;
use hil_tests::fleet::{ControlPlane, Hostile, hostile, wait_for};
use hil_tests::{RunningAgent, build_claims, claims, fleetctl, keys_and_policy, root};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Builds claims v`version` signed with `keys/k.key` into `out`.
pub(crate) fn bundle(dir: &Path, version: u32, out: &str) {
    build_claims(
        dir,
        version,
        out,
        &[
            "--reference",
            &claims("reference.csv"),
            "--key",
            "keys/k.key",
        ],
    );
}

/// Enrolls `name` on `board` with `tags`; adds `extra` lines to the config it wrote.
pub(crate) fn enroll(
    dir: &Path,
    plane: &ControlPlane,
    name: &str,
    board: &str,
    tags: &str,
    extra: &str,
) {
    let config = format!("{name}.toml");
    plane
        .fleetctl(
            dir,
            &[
                "devices", "enroll", name, "--board", board, "--tags", tags, "--out", &config,
            ],
        )
        .success();
    if !extra.is_empty() {
        let path = dir.join(&config);
        let text = std::fs::read_to_string(&path).expect("config");
        // Top-level keys go before the first table.
        let (head, tables) = text.split_at(text.find("\n[").map_or(text.len(), |i| i + 1));
        std::fs::write(&path, format!("{head}{extra}\n{tables}")).expect("config");
    }
}

/// `fleet-agent run` for an enrolled device with its board profile; no model installed.
pub(crate) fn run_agent(dir: &Path, name: &str, board: &str) -> RunningAgent {
    let agent = RunningAgent::spawn(agent_command(dir, name, board));
    agent.wait_ready();
    agent
}

/// The command of [`run_agent`], for a caller that starts it its own way.
pub(crate) fn agent_command(dir: &Path, name: &str, board: &str) -> std::process::Command {
    let board = root().join(format!("boards/{board}.toml"));
    let mut cmd = std::process::Command::new(hil_tests::bin("fleet-agent"));
    cmd.current_dir(dir).args([
        "run",
        "--config",
        &format!("{name}.toml"),
        "--data-dir",
        &format!("data-{name}"),
        "--listen",
        "127.0.0.1:0",
        "--board",
        &board.display().to_string(),
    ]);
    cmd
}

pub(crate) fn kill(agent: RunningAgent) {
    let mut agent = agent;
    let _ = agent.child.kill();
    let _ = agent.child.wait();
}

/// The version of claims the device reports running, if any.
pub(crate) fn running(plane: &ControlPlane, device: &str) -> Option<u64> {
    let d = plane.get(&format!("/v1/devices/{device}"));
    d["models"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == "claims")?["version"]
        .as_u64()
}

pub(crate) fn wait_running(plane: &ControlPlane, device: &str, version: u64) {
    wait_for(&format!("{device} to run claims v{version}"), WAIT, || {
        (running(plane, device) == Some(version)).then_some(())
    });
}

/// The lifecycle events the device reported: (kind, model, version, detail).
pub(crate) fn events(plane: &ControlPlane, device: &str) -> Vec<(String, String, u64, String)> {
    plane
        .messages(device)
        .iter()
        .filter_map(|m| {
            let e = m["body"].get("event")?;
            Some((
                e["kind"].as_str()?.to_string(),
                e["model"].as_str().unwrap_or("").to_string(),
                e["version"].as_u64()?,
                e["detail"].as_str().unwrap_or("").to_string(),
            ))
        })
        .collect()
}

pub(crate) fn wait_event(plane: &ControlPlane, device: &str, kind: &str, detail: &str) -> String {
    wait_for(
        &format!("{device} to report {kind} ({detail})"),
        WAIT,
        || {
            events(plane, device)
                .into_iter()
                .find(|(k, _, _, d)| k == kind && d.contains(detail))
                .map(|(_, _, _, d)| d)
        },
    )
}

pub(crate) fn rollout(plane: &ControlPlane, dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["rollout", "start"];
    all.extend_from_slice(args);
    let run = plane.fleetctl(dir, &all);
    let out = run.success();
    out.split_whitespace()
        .nth(1)
        .expect("rollout id")
        .trim_end_matches(':')
        .to_string()
}

pub(crate) fn status(plane: &ControlPlane, id: &str) -> Value {
    plane.get(&format!("/v1/rollouts/{id}"))
}

pub(crate) fn wait_state(plane: &ControlPlane, id: &str, state: &str) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = status(plane, id);
        if s["state"] == state {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for rollout {id} to be {state}; it is: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads `key = "value"` from a TOML config.
pub(crate) fn config_value(dir: &Path, name: &str, key: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{name}.toml"))).expect("config");
    let table: toml::Table = toml::from_str(&text).expect("toml");
    table[key].as_str().expect(key).to_string()
}

pub(crate) fn device_token(dir: &Path, name: &str) -> String {
    let secret = hex::decode(config_value(dir, name, "device_secret")).expect("hex");
    http_token(&DeviceId::new(name).expect("id"), &secret)
}

/// `GET path` on the control plane with `token` (none when empty): status and body.
pub(crate) fn get_as(
    plane: &ControlPlane,
    token: &str,
    method: &str,
    path: &str,
) -> (u16, Vec<u8>) {
    let stream = plane.connect();
    let auth = format!("Bearer {token}");
    let mut headers = vec![("content-type", "application/json")];
    if !token.is_empty() {
        headers.push(("authorization", auth.as_str()));
    }
    let body: &[u8] = if method == "GET" || method == "DELETE" {
        b""
    } else {
        b"{}"
    };
    hil_tests::http_with(stream, method, path, &headers, body).expect("HTTP")
}

pub(crate) fn metric(plane: &ControlPlane, name: &str) -> u64 {
    let (status, text) = get_as(plane, "", "GET", "/metrics");
    assert_eq!(status, 200);
    String::from_utf8_lossy(&text)
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The three devices of [`lab_fleet_on_v1`]: name, board, tags.
pub(crate) const LAB_FLEET: [(&str, &str, &str); 3] = [
    ("pi-a", "raspberry-pi-4", "site=lab"),
    ("x86-b", "generic-x86_64", "site=lab"),
    ("jet-c", "jetson-orin-nano", "site=field"),
];

/// `fleetctl serve` (embedded broker, TLS) with claims v1 and v2 pushed, and the three
/// [`LAB_FLEET`] agents running (`extra` added to each one's config), all on v1 after a
/// first rollout.
pub(crate) fn lab_fleet_on_v1(dir: &Path, extra: &str) -> (ControlPlane, Vec<RunningAgent>) {
    keys_and_policy(dir, "k");
    let plane = ControlPlane::start(dir, None, &["--trust", "trust.toml"]);
    bundle(dir, 1, "v1.fmb");
    bundle(dir, 2, "v2.fmb");
    for f in ["v1.fmb", "v2.fmb"] {
        plane.fleetctl(dir, &["models", "push", f]).success();
    }
    let mut agents = Vec::new();
    for (name, board, tags) in LAB_FLEET {
        enroll(dir, &plane, name, board, tags, extra);
        agents.push(run_agent(dir, name, board));
    }
    // v1 everywhere, in one wave. The Jetson runs it on CPU in this build (no `gpu`
    // feature): a fallback, which the gate would stop unless allowed.
    let first = rollout(
        &plane,
        dir,
        &[
            "claims@1",
            "--to",
            "all",
            "--soak",
            "0s",
            "--max-fallbacks",
            "1",
        ],
    );
    wait_state(&plane, &first, "completed");
    for (name, _, _) in LAB_FLEET {
        wait_running(&plane, name, 1);
    }
    (plane, agents)
}

#[test]
fn a_rollout_in_waves_reaches_exactly_the_selected_devices_in_order_and_a_rollback_keeps_them_serving()
 {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (plane, agents) = lab_fleet_on_v1(dir, "");

    // v2 to the lab only, one device per wave, with a soak.
    let id = rollout(
        &plane,
        dir,
        &[
            "claims@2", "--to", "site=lab", "--waves", "50,100", "--soak", "2s",
        ],
    );
    let early = status(&plane, &id);
    assert_eq!(early["devices_total"], 2, "{early:#}");
    assert_eq!(early["devices"][0]["device"], "pi-a");
    assert_eq!(early["devices"][1]["device"], "x86-b");
    assert_eq!(early["devices"][1]["state"], "waiting", "{early:#}");
    let done = wait_state(&plane, &id, "completed");
    let waves = done["waves"].as_array().expect("waves");
    assert_eq!(waves.len(), 2);
    let passed_1 = waves[0]["passed_ms"].as_u64().expect("wave 1 passed");
    let started_2 = waves[1]["started_ms"].as_u64().expect("wave 2 started");
    assert!(
        started_2 >= passed_1,
        "wave 2 started before wave 1 passed: {done:#}"
    );
    assert!(
        passed_1 >= waves[0]["started_ms"].as_u64().expect("started") + 2000,
        "soak skipped"
    );
    wait_running(&plane, "pi-a", 2);
    wait_running(&plane, "x86-b", 2);
    // The field device was never selected: still v1, never told about v2.
    assert_eq!(running(&plane, "jet-c"), Some(1));
    assert!(
        !events(&plane, "jet-c").iter().any(|(_, _, v, _)| *v == 2),
        "{:?}",
        events(&plane, "jet-c")
    );
    let shown = plane.fleetctl(dir, &["devices", "show", "pi-a"]);
    assert!(
        shown.success().contains("ASSIGNMENT generation 2"),
        "{}",
        shown.stdout
    );
    let table = plane.fleetctl(dir, &["rollout", "status", &id]);
    let text = table.success();
    assert!(
        text.contains("activation_failures") && text.contains("pi-a"),
        "{text}"
    );

    // Roll back while the lab devices serve predictions without pause.
    let rows: Vec<Value> = crate::monitoring::rows("reference.csv")[..20].to_vec();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for agent in &agents[..2] {
        let (addr, rows, stop, ok, failed) = (
            agent.addr.clone(),
            rows.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        load.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let stream = std::net::TcpStream::connect(&addr).expect("connects");
                let body = json!({ "features": rows }).to_string();
                let (status, _) = hil_tests::http(
                    stream,
                    "POST",
                    "/v1/models/claims/predict",
                    "application/json",
                    body.as_bytes(),
                )
                .expect("HTTP");
                if status == 200 { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let run = plane.fleetctl(dir, &["rollback", "claims", "--yes"]);
    let out = run.success();
    assert!(out.contains("pi-a") && out.contains("x86-b"), "{out}");
    assert!(out.contains("jet-c") && out.contains("skipped"), "{out}");
    wait_running(&plane, "pi-a", 1);
    wait_running(&plane, "x86-b", 1);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().expect("load thread");
    }
    assert!(ok.load(Ordering::Relaxed) > 0);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the rollback"
    );
    // A rollback is a new generation that devices report as such.
    wait_event(&plane, "pi-a", "rolled_back", "");
    // Without --yes and without a terminal, nothing happens.
    let refused = plane.fleetctl(dir, &["rollback", "claims"]);
    assert!(
        !refused.ok() && refused.stderr.contains("--yes"),
        "{}",
        refused.stderr
    );
    for a in agents {
        kill(a);
    }
}

/// `fleetctl serve` with its state in PostgreSQL (`FLEETML_DATABASE_URL`, a password
/// in it): devices enroll, a rollout reaches them; then the backup drill of
/// docs/DEPLOY.md: the control plane stops, the database is dumped (`pg_dump`), wiped
/// (dropped and created empty) and restored (`pg_restore`), and the control plane starts
/// again with nothing of its state on its disk (no sled database): a rollback finds the
/// rollout, assignments, devices, tokens and message log where they were, and the audit
/// chain still verifies. Last, a database a newer release migrated is refused at start.
#[test]
fn with_postgresql_the_fleet_survives_a_backup_wipe_and_restore() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let pg = hil_tests::fleet::Postgres::start();
    let url = pg
        .create_database("fleet")
        .replace("postgres@", "postgres:s3cret-pw@");
    let mut plane = ControlPlane::start_at(
        dir,
        "127.0.0.1",
        None,
        &["--trust", "trust.toml"],
        vec![("FLEETML_DATABASE_URL".into(), url.clone())],
    );
    assert!(
        !plane.data_dir.join("fleet.db").exists(),
        "the state went to PostgreSQL, not to DATA_DIR/fleet.db"
    );
    bundle(dir, 1, "v1.fmb");
    bundle(dir, 2, "v2.fmb");
    for f in ["v1.fmb", "v2.fmb"] {
        plane.fleetctl(dir, &["models", "push", f]).success();
    }
    let devices = [
        ("pi-a", "raspberry-pi-4", "site=lab"),
        ("x86-b", "generic-x86_64", "site=lab"),
    ];
    let mut agents = Vec::new();
    for (name, board, tags) in devices {
        enroll(dir, &plane, name, board, tags, "");
        agents.push(run_agent(dir, name, board));
    }
    let first = rollout(&plane, dir, &["claims@1", "--to", "all", "--soak", "0s"]);
    wait_state(&plane, &first, "completed");
    let second = rollout(
        &plane,
        dir,
        &[
            "claims@2", "--to", "all", "--waves", "50,100", "--soak", "0s",
        ],
    );
    wait_state(&plane, &second, "completed");
    for (name, _, _) in devices {
        wait_running(&plane, name, 2);
    }
    let before: Vec<usize> = devices
        .iter()
        .map(|(name, _, _)| plane.messages(name).len())
        .collect();
    assert!(before[0] > 0, "pi-a's messages are stored");

    plane.stop();
    let backup = pg.dump("fleet");
    pg.sql("DROP DATABASE fleet");
    pg.sql("CREATE DATABASE fleet");
    pg.restore("fleet", &backup);
    plane.restart();
    assert!(!plane.data_dir.join("fleet.db").exists());
    // Commands reach connected devices; the agents reconnect with back-off and say so
    // (a status message), stored after what was stored before the restart: the
    // message log outlived the process.
    for ((name, _, _), n) in devices.iter().zip(&before) {
        wait_for(&format!("{name} to reconnect"), WAIT, || {
            (plane.messages(name).len() > *n).then_some(())
        });
    }
    assert_eq!(
        status(&plane, &second)["state"],
        "completed",
        "the rollout outlived the process"
    );
    let run = plane.fleetctl(dir, &["rollback", "claims", "--yes"]);
    assert!(run.success().contains("pi-a"), "{}", run.stdout);
    for (name, _, _) in devices {
        wait_running(&plane, name, 1);
    }
    wait_event(&plane, "x86-b", "rolled_back", "");
    let audit = plane.fleetctl(dir, &["audit", "verify"]);
    assert!(
        audit.ok(),
        "the audit chain in PostgreSQL verifies: {}{}",
        audit.stdout,
        audit.stderr
    );
    for a in agents {
        kill(a);
    }

    // A database a newer fleetctl migrated: serve refuses to start, naming the newer
    // version, and leaves it as it was.
    plane.stop();
    let future = "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
                  VALUES (9999, 'from_the_future', '2030-01-01T00:00:00Z', '0')";
    pg.sql_in("fleet", future);
    let mut serve = std::process::Command::new(hil_tests::bin("fleetctl"));
    serve
        .current_dir(dir)
        .arg("serve")
        .arg("--data-dir")
        .arg(&plane.data_dir)
        .args(["--insecure-listen", "--trust", "trust.toml"])
        .args([
            "--listen",
            &format!("127.0.0.1:{}", hil_tests::fleet::free_port()),
        ])
        .args([
            "--mqtt-listen",
            &format!("127.0.0.1:{}", hil_tests::fleet::free_port()),
        ])
        .env("FLEETML_DATABASE_URL", &url);
    let (code, refused) = crate::tls::exits_within(serve, Duration::from_secs(60));
    assert_ne!(code, Some(0), "{refused}");
    assert!(
        refused.contains("version 9999") && !refused.contains("s3cret-pw"),
        "{refused}"
    );
    // Still there: the refusal changed nothing.
    pg.sql_in(
        "fleet",
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM refinery_schema_history WHERE version = 9999) \
         THEN RAISE EXCEPTION 'the newer version was removed'; END IF; END $$",
    );
}

#[test]
fn a_bundle_failing_its_self_test_stops_at_the_first_wave_and_auto_rollback_restores_the_old_version()
 {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let plane = ControlPlane::start(dir, None, &["--trust", "trust.toml"]);
    bundle(dir, 1, "v1.fmb");
    bundle(dir, 2, "good-v2.fmb");
    hil_tests::alter_golden(&dir.join("good-v2.fmb"), &dir.join("v2.fmb"));
    fleetctl(dir, &["bundle", "sign", "v2.fmb", "--key", "keys/k.key"]).success();
    for f in ["v1.fmb", "v2.fmb"] {
        plane.fleetctl(dir, &["models", "push", f]).success();
    }
    let names = ["d1", "d2", "d3"];
    let mut agents = Vec::new();
    for name in names {
        enroll(dir, &plane, name, "raspberry-pi-4", "site=lab", "");
        agents.push(run_agent(dir, name, "raspberry-pi-4"));
    }
    let first = rollout(&plane, dir, &["claims@1", "--to", "all", "--soak", "0s"]);
    wait_state(&plane, &first, "completed");

    let id = rollout(
        &plane,
        dir,
        &[
            "claims@2",
            "--to",
            "all",
            "--canary",
            "30",
            "--soak",
            "0s",
            "--auto-rollback",
        ],
    );
    let end = wait_state(&plane, &id, "rolled_back");
    let reason = end["reason"].as_str().unwrap_or("");
    assert!(reason.contains("self_test_failures = 1"), "{end:#}");
    assert_eq!(end["devices"][0]["device"], "d1");
    assert_eq!(end["devices"][0]["state"], "failed", "{end:#}");
    for d in &end["devices"].as_array().expect("devices")[1..] {
        assert_eq!(d["state"], "waiting", "later waves never started: {end:#}");
    }
    let detail = wait_event(&plane, "d1", "self_test_failed", "golden self-test");
    assert!(detail.contains("differ beyond tolerance"), "{detail}");
    // Every device still runs v1; the others never heard of v2.
    for name in names {
        assert_eq!(running(&plane, name), Some(1), "{name}");
    }
    for name in &names[1..] {
        assert!(
            !events(&plane, name).iter().any(|(_, _, v, _)| *v == 2),
            "{name}"
        );
    }
    // d1's assignment is v1 again, as a newer generation (3: v1, v2, v1).
    let (code, bytes) = get_as(
        &plane,
        &device_token(dir, "d1"),
        "GET",
        "/v1/devices/d1/assignment",
    );
    assert_eq!(code, 200);
    let signed = fleetml_protocol::assignment::SignedAssignment::from_cbor(&bytes).expect("cbor");
    let a: Assignment = serde_cbor::from_slice(&signed.assignment).expect("assignment");
    assert_eq!(a.generation, 3);
    assert_eq!(a.models["claims"].version, 1);
    // The same version again without --auto-rollback pauses instead.
    let again = rollout(
        &plane,
        dir,
        &["claims@2", "--to", "device=d2", "--soak", "0s"],
    );
    let paused = wait_state(&plane, &again, "paused");
    assert!(
        paused["reason"]
            .as_str()
            .unwrap_or("")
            .contains("self_test_failures"),
        "{paused:#}"
    );
    let resumed = plane.fleetctl(dir, &["rollout", "abort", &again]);
    assert!(resumed.success().contains("aborted"));
    for a in agents {
        kill(a);
    }
}

/// A hostile HTTP server standing in for the control plane: answers every assignment
/// request with the bytes it holds.
struct Attacker {
    addr: String,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl Attacker {
    fn start() -> Attacker {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let served = bytes.clone();
        let addr = hostile(move |line| {
            let body = served.lock().expect("lock").clone();
            if line.contains("/assignment") && !body.is_empty() {
                Hostile::Answer(body)
            } else {
                Hostile::Nothing
            }
        });
        Attacker { addr, bytes }
    }

    fn serve(&self, bytes: Vec<u8>) {
        *self.bytes.lock().expect("lock") = bytes;
    }
}

/// Points the device's config at `url` (the real control plane or an attacker).
pub(crate) fn point_at(dir: &Path, name: &str, url: &str) {
    set_config(dir, name, "control_plane", url);
}

/// Sets the string `key` of the device's config to `value`.
pub(crate) fn set_config(dir: &Path, name: &str, key: &str, value: &str) {
    let path = dir.join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path).expect("config");
    let prefix = format!("{key} = ");
    let replaced: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                format!("{prefix}\"{value}\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&path, replaced.join("\n") + "\n").expect("config");
}

#[test]
fn replayed_expired_foreign_and_swapped_assignments_are_refused_and_the_old_model_keeps_serving() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let plane = ControlPlane::start(
        dir,
        None,
        &["--trust", "trust.toml", "--assignment-ttl", "5s"],
    );
    for v in 1..=3 {
        bundle(dir, v, &format!("v{v}.fmb"));
        plane
            .fleetctl(dir, &["models", "push", &format!("v{v}.fmb")])
            .success();
    }
    enroll(
        dir,
        &plane,
        "pi-x",
        "raspberry-pi-4",
        "site=lab",
        "assignment_poll_s = 1",
    );
    let token = device_token(dir, "pi-x");
    let fetch = || {
        let (code, bytes) = get_as(&plane, &token, "GET", "/v1/devices/pi-x/assignment");
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&bytes));
        bytes
    };
    let mut agent = run_agent(dir, "pi-x", "raspberry-pi-4");
    let r1 = rollout(&plane, dir, &["claims@1", "--to", "all", "--soak", "0s"]);
    wait_state(&plane, &r1, "completed");
    let generation_1 = fetch();
    let r2 = rollout(&plane, dir, &["claims@2", "--to", "all", "--soak", "0s"]);
    wait_state(&plane, &r2, "completed");
    wait_running(&plane, "pi-x", 2);

    let attacker = Attacker::start();
    let serves_v2 = |agent: &RunningAgent| {
        let rows: Vec<Value> = crate::monitoring::rows("reference.csv")[..5].to_vec();
        let (code, reply) = agent.request(
            "POST",
            "/v1/models/claims/predict",
            &json!({ "features": rows }),
        );
        assert_eq!(code, 200, "{reply}");
        assert_eq!(reply["version"], 2, "{reply}");
    };
    let restart = |agent: RunningAgent, url: &str| {
        kill(agent);
        point_at(dir, "pi-x", url);
        run_agent(dir, "pi-x", "raspberry-pi-4")
    };

    // 1. Replay: generation 1, validly signed, after generation 2 was accepted.
    attacker.serve(generation_1);
    agent = restart(agent, &format!("http://{}", attacker.addr));
    let why = wait_event(&plane, "pi-x", "assignment_refused", "replayed");
    assert!(
        why.contains("generation 1 is older than generation 2"),
        "{why}"
    );
    serves_v2(&agent);

    // 2. Freeze: a newer generation (a rollback to v1), held back until it expired.
    let back = plane.fleetctl(dir, &["rollback", "claims", "--yes", "--detach"]);
    let back = back
        .success()
        .lines()
        .find_map(|l| l.strip_prefix("rollback ")?.strip_suffix(" started"))
        .expect("rollback id")
        .to_string();
    let generation_3 = fetch();
    std::thread::sleep(Duration::from_secs(6));
    attacker.serve(generation_3);
    let why = wait_event(&plane, "pi-x", "assignment_refused", "expired");
    assert!(why.contains("generation 3 expired"), "{why}");
    serves_v2(&agent);

    // 3. An assignment signed by a key the device does not trust.
    let (foreign, _) = SigningKey::generate().expect("key");
    let v1 = plane.get("/v1/models/claims/1");
    let digest: Sha256 = v1["model"]["digest"]
        .as_str()
        .expect("digest")
        .parse()
        .expect("sha");
    let forged = Assignment {
        format: FORMAT,
        device: DeviceId::new("pi-x").expect("id"),
        generation: 99,
        issued_ms: now_ms(),
        expires_ms: now_ms() + 3_600_000,
        models: [(
            "claims".to_string(),
            AssignedModel {
                shadow: None,
                version: 1,
                digest,
                size: 1,
                rollout: None,
            },
        )]
        .into(),
    }
    .sign(&foreign);
    attacker.serve(forged.to_cbor());
    let why = wait_event(&plane, "pi-x", "assignment_refused", "does not list");
    assert!(why.contains(&foreign.id().to_string()), "{why}");
    serves_v2(&agent);

    // 4. Back to the real server: generation 3 (v1, still in the store) applies.
    agent = restart(agent, &plane.url);
    wait_running(&plane, "pi-x", 1);
    wait_state(&plane, &back, "completed");
    // A bundle swapped on the server's disk after it was pushed: the download does not
    // hash to what the signed assignment names.
    let v3 = plane.get("/v1/models/claims/3");
    let v3_digest = v3["model"]["digest"].as_str().expect("digest").to_string();
    let blob = plane.data_dir.join(format!("blobs/{v3_digest}.fmb"));
    std::fs::copy(dir.join("v2.fmb"), &blob).expect("swap the blob");
    let r3 = rollout(&plane, dir, &["claims@3", "--to", "all", "--soak", "0s"]);
    let why = wait_event(&plane, "pi-x", "verification_failed", &v3_digest);
    assert!(why.contains("not installed"), "{why}");
    let paused = wait_state(&plane, &r3, "paused");
    assert!(
        paused["reason"]
            .as_str()
            .unwrap_or("")
            .contains("activation_failures = 1"),
        "{paused:#}"
    );
    assert_eq!(running(&plane, "pi-x"), Some(1));
    let rows: Vec<Value> = crate::monitoring::rows("reference.csv")[..5].to_vec();
    let (code, reply) = agent.request(
        "POST",
        "/v1/models/claims/predict",
        &json!({ "features": rows }),
    );
    assert_eq!((code, reply["version"].as_u64()), (200, Some(1)), "{reply}");
    // Nothing of the swapped file stays on the device.
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("data-pi-x/downloads"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    kill(agent);
}

#[test]
fn an_interrupted_download_resumes_from_where_it_stopped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let plane = ControlPlane::start(dir, None, &["--trust", "trust.toml"]);
    bundle(dir, 1, "v1.fmb");
    plane.fleetctl(dir, &["models", "push", "v1.fmb"]).success();
    let size = std::fs::metadata(dir.join("v1.fmb")).expect("size").len();
    // About ten seconds for the whole bundle.
    let rate = (size / 10).max(1024);
    enroll(
        dir,
        &plane,
        "pi-r",
        "raspberry-pi-4",
        "site=lab",
        &format!("download_max_bytes_per_s = {rate}"),
    );
    let agent = run_agent(dir, "pi-r", "raspberry-pi-4");
    let id = rollout(&plane, dir, &["claims@1", "--to", "all", "--soak", "0s"]);
    assert_eq!(status(&plane, &id)["devices"][0]["device"], "pi-r");
    let downloads = dir.join("data-pi-r/downloads");
    let part = wait_for("a partial download", WAIT, || {
        let entry = std::fs::read_dir(&downloads).ok()?.flatten().next()?;
        let len = entry.metadata().ok()?.len();
        (len > size / 4).then_some(entry.path())
    });
    kill(agent);
    let have = std::fs::metadata(&part).expect("part").len();
    assert!(have > 0 && have < size, "{have} of {size}");
    let served_before = metric(&plane, "fleetml_control_bundle_bytes_served_total");
    let resumed_before = metric(&plane, "fleetml_control_bundle_resumed_total");

    let agent = run_agent(dir, "pi-r", "raspberry-pi-4");
    wait_running(&plane, "pi-r", 1);
    let detail = wait_event(&plane, "pi-r", "downloading", "resuming");
    assert_eq!(detail, format!("resuming at byte {have} of {size}"));
    let served = metric(&plane, "fleetml_control_bundle_bytes_served_total") - served_before;
    assert_eq!(
        served,
        size - have,
        "the second download fetched more than what was missing"
    );
    assert_eq!(
        metric(&plane, "fleetml_control_bundle_resumed_total"),
        resumed_before + 1
    );
    assert!(!part.exists(), "the partial file is gone once installed");
    kill(agent);
}

/// `(path, method, role)` of every operation in docs/openapi.yaml.
fn documented_roles() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(root().join("docs/openapi.yaml")).expect("openapi");
    let (mut out, mut path, mut method) = (Vec::new(), String::new(), String::new());
    let mut in_paths = false;
    for line in text.lines() {
        if line == "paths:" {
            in_paths = true;
        } else if !in_paths {
        } else if let Some(p) = line.strip_prefix("  /") {
            path = format!("/{}", p.trim_end_matches(':'));
        } else if let Some(m) = line.strip_prefix("    ").filter(|m| !m.starts_with(' ')) {
            method = m.trim_end_matches(':').to_string();
        } else if let Some(role) = line.trim().strip_prefix("x-fleetml-role: ") {
            out.push((path.clone(), method.to_uppercase(), role.to_string()));
        }
    }
    out
}

#[test]
fn every_route_answers_401_without_a_token_403_below_its_role_and_the_audit_chain_detects_an_edit()
{
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let mut plane = ControlPlane::start(
        dir,
        None,
        &["--trust", "trust.toml", "--audit-interval", "1s"],
    );
    enroll(dir, &plane, "dev-1", "raspberry-pi-4", "site=lab", "");
    enroll(dir, &plane, "dev-2", "raspberry-pi-4", "site=lab", "");
    // Revoked and rotated by the admin's calls below (dev-1 and dev-2 keep their tokens).
    enroll(dir, &plane, "dev-3", "raspberry-pi-4", "site=lab", "");
    let mut tokens = std::collections::BTreeMap::new();
    for role in ["viewer", "operator", "admin"] {
        let run = plane.fleetctl(
            dir,
            &[
                "tokens",
                "create",
                "--role",
                role,
                "--name",
                &format!("ci-{role}"),
            ],
        );
        let token = run.success().trim().to_string();
        assert!(token.starts_with("fmt_"), "{token}");
        tokens.insert(role, token);
    }
    let unnamed = plane.fleetctl(dir, &["tokens", "create", "--role", "viewer"]);
    assert!(unnamed.success().starts_with("fmt_"));
    let wrong = plane.fleetctl(dir, &["tokens", "create", "--role", "root"]);
    assert!(
        !wrong.ok() && wrong.stderr.contains("not one of viewer, operator, admin"),
        "{}",
        wrong.stderr
    );
    // Stored hashed: the token text is nowhere in the server's data.
    let listed = plane.fleetctl(dir, &["tokens", "list"]);
    assert!(!listed.success().contains(&tokens["viewer"][4..]));

    let routes = documented_roles();
    assert!(routes.len() >= 25, "{routes:?}");
    let rank = |r: &str| ["viewer", "operator", "admin"].iter().position(|x| *x == r);
    let mut checked = 0;
    for (path, method, role) in &routes {
        let concrete = path
            .replace(
                "{id}",
                if path.ends_with("/revoke") || path.ends_with("/rotate") {
                    "dev-3"
                } else if path.starts_with("/v1/devices") {
                    "dev-1"
                } else {
                    "none-such"
                },
            )
            .replace("{name}", "claims")
            .replace("{version}", "1")
            .replace("{digest}", &"0".repeat(64));
        let (none, _) = get_as(&plane, "", method, &concrete);
        if role == "public" {
            assert!(
                none != 401 && none != 403,
                "{method} {path}: {none} without a token"
            );
            continue;
        }
        assert_eq!(none, 401, "{method} {path} without a token");
        let (bad, body) = get_as(&plane, "fmt_0000", method, &concrete);
        assert_eq!(bad, 401, "{method} {path} with an unknown token");
        assert!(
            String::from_utf8_lossy(&body).contains("unknown or revoked"),
            "{method} {path}"
        );
        if role == "device-only" {
            for token in tokens.values() {
                let (code, body) = get_as(&plane, token, method, &concrete);
                assert_eq!(code, 403, "{method} {path} with an operator token");
                assert!(String::from_utf8_lossy(&body).contains("needs a device token"));
            }
            let (own, _) = get_as(&plane, &device_token(dir, "dev-1"), method, &concrete);
            let (other, _) = get_as(&plane, &device_token(dir, "dev-2"), method, &concrete);
            assert!(
                own != 401 && own != 403,
                "{method} {path} as its device: {own}"
            );
            assert_eq!(other, 403, "{method} {path} as another device");
            continue;
        }
        let need = if role == "device" {
            Some(0)
        } else {
            rank(role)
        };
        let need = need.unwrap_or_else(|| panic!("{method} {path}: unknown role {role}"));
        for (have, token) in ["viewer", "operator", "admin"]
            .iter()
            .map(|r| (rank(r).expect("role"), &tokens[r]))
        {
            let (code, body) = get_as(&plane, token, method, &concrete);
            if have < need {
                assert_eq!(code, 403, "{method} {path} as role #{have}");
                assert!(
                    String::from_utf8_lossy(&body).contains(&format!("needs {role}")),
                    "{}",
                    String::from_utf8_lossy(&body)
                );
            } else {
                assert!(
                    code != 401 && code != 403,
                    "{method} {path} as role #{have}: {code} {}",
                    String::from_utf8_lossy(&body)
                );
            }
            checked += 1;
        }
        // Devices reach only their own assignment and bundles.
        let (own, _) = get_as(&plane, &device_token(dir, "dev-1"), method, &concrete);
        let (other, _) = get_as(&plane, &device_token(dir, "dev-2"), method, &concrete);
        if path.contains("assignment") {
            assert!(
                own != 401 && own != 403,
                "{method} {path} as its device: {own}"
            );
            assert_eq!(other, 403, "{method} {path} as another device");
        } else if role == "device" {
            // A bundle its assignment does not name (downloads of named ones are in the
            // rollout tests).
            assert_eq!(
                own, 403,
                "{method} {path} as a device, a bundle not assigned"
            );
        } else {
            assert_eq!(own, 403, "{method} {path} as a device");
        }
    }
    assert!(checked >= 75, "{checked}");

    // Refused calls are audited too (those without a valid token as one tally entry
    // per --audit-interval); the chain verifies.
    let audit = wait_for(
        "the tally of anonymous calls",
        Duration::from_secs(20),
        || {
            let audit = plane.json(dir, &["audit", "--last", "100000"]);
            audit
                .as_array()?
                .iter()
                .any(|e| e["outcome"] == 401 && e["who"] == "anonymous")
                .then_some(audit)
        },
    );
    let entries = audit.as_array().expect("entries");
    assert!(
        entries
            .iter()
            .any(|e| e["outcome"] == 403 && e["role"] == "viewer")
    );
    assert!(
        entries
            .iter()
            .any(|e| e["outcome"] == 401 && e["who"] == "anonymous")
    );
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "POST /v1/tokens" && e["outcome"] == 201)
    );
    let ok = plane.fleetctl(dir, &["audit", "verify"]);
    assert!(
        ok.success().starts_with("audit log intact"),
        "{}",
        ok.stdout
    );

    // Checked here with a copy of the key, the same.
    let key = plane.data_dir.join("audit.key");
    let here = plane.fleetctl(
        dir,
        &["audit", "verify", "--key", key.to_str().expect("utf-8")],
    );
    assert!(
        here.success().starts_with("audit log intact"),
        "{}",
        here.stdout
    );

    // Someone who can write the database, not the key: entry 3 edited while the server is
    // stopped and every hash from there on recomputed as the unkeyed chain computed them
    // (SHA-256 of `prev` and the entry's JSON). Before the chain was keyed, this rewrite
    // verified as intact (checked by running this test against the unkeyed chain).
    plane.stop();
    {
        let db = sled::open(plane.data_dir.join("fleet.db")).expect("sled");
        let tree = db.open_tree("audit").expect("tree");
        let mut prev = String::new();
        for item in tree.iter() {
            let (k, v) = item.expect("entry");
            let mut entry: Value = serde_json::from_slice(&v).expect("json");
            let seq = entry["seq"].as_u64().expect("seq");
            if seq < 3 {
                prev = entry["hash"].as_str().expect("hash").to_string();
                continue;
            }
            if seq == 3 {
                entry["outcome"] = json!(200);
            }
            entry["prev"] = json!(prev);
            entry["hash"] = json!("");
            let mut input = prev.as_bytes().to_vec();
            input.extend(serde_json::to_vec(&entry).expect("json"));
            prev = fleetml_protocol::crypto::sha256(&input).to_string();
            entry["hash"] = json!(prev);
            tree.insert(k, serde_json::to_vec(&entry).expect("json"))
                .expect("insert");
        }
        db.flush().expect("flush");
    }
    let plane = ControlPlane::start(dir, None, &["--trust", "trust.toml"]);
    let tampered = plane.fleetctl(dir, &["audit", "verify"]);
    assert!(!tampered.ok(), "{}", tampered.stdout);
    assert!(
        tampered.stderr.contains("entry 3 was changed"),
        "{}",
        tampered.stderr
    );
}

/// A command the broker loses while the device stays connected (QoS 0; a cluster route
/// dropped) does not hold a rollout until the device's next poll: the engine tells a
/// silent device of the running wave again (`--rollout-remind-after`). The agent polls
/// once an hour here and its first `assignment_changed` is dropped by a relay between it
/// and the broker; without the reminder it would not pull before the test gives up.
#[test]
fn a_command_the_broker_loses_is_sent_again_and_the_rollout_completes_without_a_poll() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let plane = ControlPlane::start(
        dir,
        None,
        &[
            "--trust",
            "trust.toml",
            "--insecure-listen",
            "--rollout-remind-after",
            "2s",
        ],
    );
    bundle(dir, 1, "v1.fmb");
    plane.fleetctl(dir, &["models", "push", "v1.fmb"]).success();
    enroll(
        dir,
        &plane,
        "pi-a",
        "raspberry-pi-4",
        "site=lab",
        "assignment_poll_s = 3600",
    );
    let secret = hex::decode(config_value(dir, "pi-a", "device_secret")).expect("hex");
    let lost = Arc::new(AtomicBool::new(false));
    let relay = {
        use fleetml_protocol::telemetry::{Body, CommandKind, open};
        let lost = lost.clone();
        let broker = plane.mqtt_port.expect("plain broker");
        hil_tests::fleet::MqttRelay::start(broker, move |topic, payload| {
            let changed = |e: fleetml_protocol::telemetry::Envelope| match e.body {
                Body::Command(c) => c.command == CommandKind::AssignmentChanged,
                _ => false,
            };
            let command = open(topic, payload, |_| Some(secret.clone())).is_ok_and(changed);
            command && !lost.swap(true, Ordering::SeqCst)
        })
    };
    set_config(
        dir,
        "pi-a",
        "mqtt_url",
        &format!("mqtt://127.0.0.1:{}", relay.port),
    );
    let _agent = run_agent(dir, "pi-a", "raspberry-pi-4");
    // Its pulls at start and on the subscription's grant (each a 404 on loopback, a few
    // milliseconds) must be over before the rollout: one that came after would find the
    // rollout itself, and the check on `reminded` below would fail, not pass.
    wait_for("the agent's command subscription granted", WAIT, || {
        (relay.subacks.load(Ordering::SeqCst) > 0).then_some(())
    });
    wait_for("pi-a online", WAIT, || {
        (plane.get("/v1/devices/pi-a")["online"] == true).then_some(())
    });
    std::thread::sleep(Duration::from_secs(5));

    let id = rollout(&plane, dir, &["claims@1", "--to", "all", "--soak", "0s"]);
    let done = wait_state(&plane, &id, "completed");
    assert_eq!(
        relay.dropped.load(Ordering::SeqCst),
        1,
        "the relay lost the first command"
    );
    assert!(
        done["waves"][0]["reminded"].as_u64().unwrap_or(0) >= 1,
        "completed without a reminder: {done:#}"
    );
    wait_running(&plane, "pi-a", 1);
    let status = plane.fleetctl(dir, &["rollout", "status", &id]);
    let shown = status.success();
    assert!(
        shown.contains("wave 1: devices silent since their assignment were told again"),
        "{shown}"
    );
}

/// The 3 a.m. case: the broker is down and an operator starts a rollout (or a rollback)
/// to more devices than the commands session can queue. The call answers at once with
/// the rollout recorded; the devices it could not tell are counted, and they pull their
/// assignment when they reconnect. Before, every publish waited for room in the
/// session's queue (1,024), which a broker that is away never frees: the call hung until
/// the request limit, and with it the engine that steps every rollout.
#[test]
fn a_rollout_started_while_the_broker_is_down_answers_and_counts_the_devices_not_told() {
    // More than the session's queue (1,024) and the ~100 it may have in flight when it
    // notices the broker is gone.
    const DEVICES: usize = 1_500;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let mut broker = hil_tests::fleet::Mosquitto::start(dir, hil_tests::fleet::free_port());
    let plane = ControlPlane::start(
        dir,
        Some(broker.port),
        &[
            "--trust",
            "trust.toml",
            "--insecure-listen",
            // The enrolment below is one burst of changes.
            "--rate-limit-token",
            "0",
            "--rate-limit-address",
            "0",
        ],
    );
    bundle(dir, 1, "v1.fmb");
    plane.fleetctl(dir, &["models", "push", "v1.fmb"]).success();
    for i in 0..DEVICES {
        plane.post(
            "/v1/devices",
            &json!({ "id": format!("pi-{i:04}"), "board": "raspberry-pi-4", "tags": { "site": "lab" } }),
        );
    }
    broker.stop();
    wait_for(
        "the control plane to notice the broker is gone",
        WAIT,
        || (plane.get("/v1/ingest")["broker_connected"] == false).then_some(()),
    );

    let asked = std::time::Instant::now();
    let id = rollout(&plane, dir, &["claims@1", "--to", "all", "--soak", "0s"]);
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "starting the rollout took {took:?} with the broker down"
    );
    let shown = status(&plane, &id);
    assert_eq!(shown["state"], "running", "{shown:#}");
    // The session queued what it could hold; the rest were counted, not waited for.
    let unsent = metric(&plane, "fleetml_control_commands_unsent_total");
    assert!(
        (1..DEVICES as u64).contains(&unsent),
        "{unsent} of {DEVICES} devices counted as not told"
    );
    // The engine still steps: a pause answers, and the rollout shows it.
    plane.post(&format!("/v1/rollouts/{id}/pause"), &Value::Null);
    wait_state(&plane, &id, "paused");
}
