//! `fleetctl sim`: twenty simulated devices against a real `fleetctl serve`, through the
//! embedded broker and through mosquitto — connected, telemetry stored without a gap,
//! a rollout and a rollback completed, memory read.

use hil_tests::fleet::{Postgres, S3Server};
use hil_tests::{Run, bin, fleetctl};
use serde_json::Value;

const DEVICES: u64 = 20;

/// Runs the simulator with `broker` and returns its JSON report (the run must succeed).
fn simulate(broker: &str) -> Value {
    simulate_with(broker, &[], Vec::new())
}

/// [`simulate`] with more arguments and environment variables.
fn simulate_with(broker: &str, more: &[&str], env: Vec<(String, String)>) -> Value {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(bin("fleetctl"))
        .current_dir(tmp.path())
        .args([
            "sim",
            "--devices",
            &DEVICES.to_string(),
            "--duration",
            "5",
            "--rate",
            "2",
            "--broker",
            broker,
            "--json",
        ])
        .args(more)
        .envs(env)
        .output()
        .expect("fleetctl runs");
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let out = run.success();
    serde_json::from_str(out).unwrap_or_else(|e| panic!("the report is not JSON ({e}):\n{out}"))
}

#[track_caller]
fn number(report: &Value, path: &[&str]) -> f64 {
    let mut v = report;
    for key in path {
        v = &v[*key];
    }
    v.as_f64()
        .unwrap_or_else(|| panic!("report lacks the number {}: {report:#}", path.join(".")))
}

fn check(report: &Value) {
    assert_eq!(report["failures"], Value::Array(vec![]), "{report:#}");
    assert_eq!(report["connected"], DEVICES, "{report:#}");
    assert!(number(report, &["connect_s"]) > 0.0);
    // Telemetry: the control plane's own counter moved during the steady phase, and at
    // the end it holds exactly what the devices sealed, device by device, without gaps.
    assert!(number(report, &["steady", "ingested"]) > 0.0, "{report:#}");
    let checks = &report["checks"];
    assert!(number(checks, &["sealed"]) > 0.0);
    assert_eq!(checks["sealed"], checks["stored"], "{report:#}");
    assert_eq!(checks["devices_mismatched"], 0, "{report:#}");
    assert!(number(checks, &["sample_devices"]) > 0.0);
    assert_eq!(checks["sample_gaps"], 0, "{report:#}");
    assert_eq!(checks["refused"], 0, "{report:#}");
    assert_eq!(checks["unacked"], 0, "{report:#}");
    // Every device downloaded v1 and v2 itself; the rollback came from what it held.
    assert_eq!(report["bundle_downloads"], 2 * DEVICES, "{report:#}");
    for phase in ["rollout_install", "rollout", "rollback"] {
        assert!(number(report, &[phase, "control_plane_s"]) > 0.0, "{phase}");
        assert!(number(report, &[phase, "devices_s"]) > 0.0, "{phase}");
        // Every device answered its command: none had to be told again.
        assert_eq!(report[phase]["reminded"], 0, "{phase}: {report:#}");
    }
    for memory in [
        "control_plane_idle_kib",
        "control_plane_connected_kib",
        "control_plane_peak_kib",
        "control_plane_per_device_kib",
        "simulator_kib",
    ] {
        assert!(number(report, &["memory", memory]) > 0.0, "{memory}");
    }
}

#[test]
fn twenty_simulated_devices_report_take_a_rollout_and_a_rollback_through_the_embedded_broker() {
    let report = simulate("embedded");
    check(&report);
    assert_eq!(report["memory"]["broker_connected_kib"], Value::Null);
}

#[test]
fn twenty_simulated_devices_report_take_a_rollout_and_a_rollback_through_mosquitto() {
    let report = simulate("mosquitto");
    check(&report);
    assert!(number(&report, &["memory", "broker_connected_kib"]) > 0.0);
}

/// The scaled layout of docs/DEPLOY.md: two replicas on one PostgreSQL database, their
/// bundles in an S3 bucket, devices spread over a three-node NATS cluster, the ingest
/// pulling from its JetStream work queue.
#[test]
fn twenty_simulated_devices_on_two_replicas_a_nats_cluster_postgresql_and_s3() {
    let pg = Postgres::start();
    let url = pg.create_database("sim");
    let s3 = S3Server::start();
    s3.create_bucket("fleet");
    let report = simulate_with(
        "nats",
        &[
            "--replicas",
            "2",
            "--database",
            &url,
            "--blobs",
            "s3://fleet/sim",
        ],
        s3.env(),
    );
    check(&report);
    assert_eq!(report["replicas"], 2, "{report:#}");
    assert_eq!(report["store"], "postgresql", "{report:#}");
    // The NATS nodes' memory, added up.
    assert!(number(&report, &["memory", "broker_connected_kib"]) > 0.0);
}

#[test]
fn sim_replicas_without_a_shared_database_say_what_they_need() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = fleetctl(
        tmp.path(),
        &["sim", "--broker", "mosquitto", "--replicas", "2"],
    );
    let line = run.failure();
    assert!(line.contains("--database postgres://"), "{line}");
    let run = fleetctl(
        tmp.path(),
        &[
            "sim",
            "--replicas",
            "2",
            "--database",
            "postgres://127.0.0.1:1/none",
        ],
    );
    let line = run.failure();
    assert!(line.contains("--broker mosquitto or nats"), "{line}");
}

#[test]
fn sim_without_mosquitto_says_how_to_get_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = fleetctl(
        tmp.path(),
        &[
            "sim",
            "--broker",
            "mosquitto",
            "--mosquitto",
            "/nonexistent/mosquitto",
        ],
    );
    let line = run.failure();
    assert!(
        line.contains("/nonexistent/mosquitto: no such file"),
        "{line}"
    );
    assert!(line.contains("--broker embedded"), "{line}");
}

/// `--ingest-only`: devices enrolled straight into the store and their sealed reports
/// stored as the ingest's lanes store a backlog, on sled and on PostgreSQL; the rest of
/// the simulation's flags are refused with it.
#[test]
fn sim_ingest_only_measures_the_store_on_sled_and_postgresql() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pg = Postgres::start();
    let url = pg.create_database("capacity");
    // 20 devices × 5 reports, the JSON report.
    let measure = |more: &[&str]| -> Value {
        let mut args = vec!["sim", "--ingest-only", "--devices", "20", "--messages", "5"];
        args.extend(more);
        args.push("--json");
        serde_json::from_str(fleetctl(tmp.path(), &args).success()).expect("JSON")
    };
    for (store, more) in [("sled", vec![]), ("postgresql", vec!["--database", &url])] {
        let report = measure(&more);
        assert!(
            report["store"]
                .as_str()
                .is_some_and(|s| s.starts_with(store)),
            "{report:#}"
        );
        assert_eq!(report["messages"], 100, "{report:#}");
        assert_eq!(report["stored"], 100, "{report:#}");
        assert_eq!(report["refused"], 0, "{report:#}");
        assert!(number(&report, &["stored_per_s"]) > 0.0, "{report:#}");
        // Each lane's share of the window `fleetctl broker acl` gives mosquitto.
        assert_eq!(report["lane_in_flight"], 2048, "{report:#}");
    }
    // mosquitto's own default window (20): every message stored all the same.
    let report = measure(&["--in-flight", "20", "--dir", "small"]);
    assert_eq!(
        (&report["lane_in_flight"], &report["stored"]),
        (&Value::from(5), &Value::from(100)),
        "{report:#}"
    );
    assert!(number(&report, &["largest_batch"]) <= 5.0, "{report:#}");
    let none = fleetctl(tmp.path(), &["sim", "--ingest-only", "--in-flight", "0"]);
    assert!(
        none.failure().contains("--in-flight 0: give 1 to"),
        "{}",
        none.stderr
    );
    // Again on the same database: its devices are there already, and every message
    // would be a duplicate.
    let again = fleetctl(
        tmp.path(),
        &[
            "sim",
            "--ingest-only",
            "--devices",
            "20",
            "--database",
            &url,
        ],
    );
    assert!(
        again.failure().contains("already holds device cap-00000"),
        "{}",
        again.stderr
    );
    let run = fleetctl(tmp.path(), &["sim", "--ingest-only", "--broker", "nats"]);
    assert!(
        !run.ok() && run.stderr.contains("cannot be used with"),
        "{}",
        run.stderr
    );
}

/// `fleetctl sim` stopped by SIGTERM (as `timeout` or a script stops it) stops the
/// processes it started — the broker and the control plane — instead of leaving them
/// running, and says what stopped it: during the run, and when the signal comes before
/// it has started them (it finishes starting them, then stops them).
#[test]
fn sim_stopped_by_sigterm_stops_the_broker_and_the_control_plane_it_started() {
    stop_sim_at("steady telemetry");
    stop_sim_at("working in");
}

/// The pid in a line such as `control plane at http://… (pid 123)`.
fn announced_pid(line: &str) -> Option<i32> {
    line.split("(pid ")
        .nth(1)?
        .trim_end_matches(')')
        .parse()
        .ok()
}

/// The mosquitto that `parent` started, if one runs.
fn mosquitto_of(parent: u32) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // `pid (comm) state ppid …`; comm may hold spaces, so read after the last `)`.
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            ppid == Some(parent) && stat.contains("(mosquitto)")
        })
}

/// Runs a simulation through mosquitto, sends it SIGTERM once it has said `marker`, and
/// checks that it fails, says why, and leaves none of its processes running.
fn stop_sim_at(marker: &str) {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};
    /// The simulator, killed if the test fails before it stops.
    struct Sim(std::process::Child);
    impl Drop for Sim {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut sim = Sim(std::process::Command::new(bin("fleetctl"))
        .current_dir(tmp.path())
        .args(["sim", "--devices", "5", "--duration", "120", "--rate", "1"])
        .args(["--broker", "mosquitto", "--json"])
        // A stopped run keeps its work directory: this one goes with the test's.
        .arg("--dir")
        .arg(tmp.path().join("work"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fleetctl runs"));
    let sim_pid = sim.0.id();
    let stderr = BufReader::new(sim.0.stderr.take().expect("stderr"));
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut said = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|e| panic!("no `{marker}` within 120 s ({e}): {said:#?}"));
        let seen = line.contains(marker);
        said.push(line);
        if seen {
            break;
        }
    }
    let broker_before = mosquitto_of(sim_pid);
    let term = std::process::Command::new("kill")
        .args(["-TERM", &sim_pid.to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let status = sim.0.wait().expect("the simulator exits");
    assert!(!status.success(), "a stopped simulation is not a result");
    // What it said to the end (its stderr closes as it exits; 10 s at most).
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
        said.push(line);
    }
    let serve_pid = said
        .iter()
        .find_map(|l| announced_pid(l))
        .unwrap_or_else(|| panic!("no control plane was started: {said:#?}"));
    let alive = |pid: i32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(serve_pid) || broker_before.is_some_and(alive) {
        assert!(
            Instant::now() < deadline,
            "the simulator exited and left its processes running (control plane {}, mosquitto {:?})",
            alive(serve_pid),
            broker_before.map(alive)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if marker == "steady telemetry" {
        assert!(broker_before.is_some(), "mosquitto ran: {said:#?}");
    }
    assert!(
        said.iter().any(|l| l.contains("SIGTERM")),
        "it says what stopped it: {said:#?}"
    );
}
