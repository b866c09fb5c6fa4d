//! Shadow deployments on real agents: a candidate runs beside the served version on live
//! requests, never answering; its agreement, latency and drift come back per window, its
//! gates decide whether `rollout promote` may make it the served version, and a busy
//! device sheds shadow runs before anything it serves.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hil_tests::fleet::{ControlPlane, wait_for};
use hil_tests::{RunningAgent, bin, fleetctl};
use serde_json::{Value, json};

use crate::rollout::{LAB_FLEET, lab_fleet_on_v1, rollout, status, wait_running};

/// Agents close a monitoring window every 2 s, so comparisons arrive quickly.
const WINDOWS: &str = "window_seconds = 2\nwindow_predictions = 100000";

/// A claims model trained for no epoch (its initial weights): it answers the same
/// inputs, differently. Built and signed as claims v`version` into `out`.
fn untrained_bundle(dir: &Path, version: u32, out: &str) {
    let trained = dir.join("untrained");
    let run = std::process::Command::new(bin("claims-train"))
        .args([
            "--seed",
            "7",
            "--epochs",
            "0",
            "--rows",
            "2000",
            "--holdout",
            "200",
            "--drifted",
            "10",
        ])
        .arg("--out")
        .arg(&trained)
        .output()
        .expect("claims-train runs");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let file = |f: &str| trained.join(f).display().to_string();
    fleetctl(
        dir,
        &[
            "bundle",
            "build",
            "--model",
            &file("model.onnx"),
            "--name",
            "claims",
            "--version",
            &version.to_string(),
            "--features",
            &file("features.toml"),
            "--golden",
            &file("holdout.csv"),
            "--reference",
            &file("reference.csv"),
            "--key",
            "keys/k.key",
            "--out",
            out,
        ],
    )
    .success();
}

/// Requests and what each answered, per agent.
#[derive(Default)]
struct Traffic {
    /// (row index, latency, the answer's predictions and version).
    answers: Vec<(usize, Duration, Value, u64)>,
}

/// One thread per agent (`concurrency` each) sending the holdout rows one request at a
/// time until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    traffic: Vec<Arc<Mutex<Traffic>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(agents: &[&RunningAgent], concurrency: usize) -> Load {
        let rows = Arc::new(crate::monitoring::rows("holdout.csv"));
        let stop = Arc::new(AtomicBool::new(false));
        let mut traffic = Vec::new();
        let mut threads = Vec::new();
        for a in agents {
            let t = Arc::new(Mutex::new(Traffic::default()));
            traffic.push(t.clone());
            for worker in 0..concurrency {
                let (addr, rows, stop, t) = (a.addr.clone(), rows.clone(), stop.clone(), t.clone());
                let token = a.token.clone();
                threads.push(std::thread::spawn(move || {
                    let mut i = worker * 37;
                    while !stop.load(Ordering::Relaxed) {
                        let row = i % rows.len();
                        let body = json!({ "features": rows[row] }).to_string();
                        let bearer = token.as_ref().map(|t| format!("Bearer {t}"));
                        let mut headers = vec![("content-type", "application/json")];
                        if let Some(b) = &bearer {
                            headers.push(("authorization", b));
                        }
                        let started = Instant::now();
                        let stream = std::net::TcpStream::connect(&addr).expect("connects");
                        let (status, reply) = hil_tests::http_with(
                            stream,
                            "POST",
                            "/v1/models/claims/predict",
                            &headers,
                            body.as_bytes(),
                        )
                        .expect("HTTP");
                        let took = started.elapsed();
                        if status == 200 {
                            let v: Value = serde_json::from_slice(&reply).expect("JSON");
                            t.lock().expect("lock").answers.push((
                                row,
                                took,
                                v["predictions"].clone(),
                                v["version"].as_u64().unwrap_or(0),
                            ));
                        }
                        i += 1;
                    }
                }));
            }
        }
        Load {
            stop,
            traffic,
            threads,
        }
    }

    fn finish(self) -> Vec<Traffic> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load thread");
        }
        self.traffic
            .into_iter()
            .map(|t| std::mem::take(&mut *t.lock().expect("lock")))
            .collect()
    }
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The latencies of `with` are of the same distribution as `without`'s: medians and
/// 90th percentiles within a factor (plus a little for a shared, busy test machine).
fn same_latency(without: &[Duration], with: &[Duration], what: &str) {
    for p in [0.5, 0.9] {
        let (a, b) = (
            percentile(without.to_vec(), p),
            percentile(with.to_vec(), p),
        );
        assert!(
            b <= a * 2 + Duration::from_millis(5),
            "{what}: p{} rose from {a:?} to {b:?}",
            (p * 100.0) as u32
        );
    }
}

fn answers_by_row(t: &Traffic) -> std::collections::BTreeMap<usize, Value> {
    t.answers
        .iter()
        .map(|(r, _, p, _)| (*r, p.clone()))
        .collect()
}

/// A console page, signed in with the admin token.
fn console_page(plane: &ControlPlane, path: &str) -> String {
    let head = crate::console::sign_in_head(plane, &plane.token);
    let cookie = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("set-cookie")
                .then(|| v.trim().split(';').next().unwrap_or("").to_string())
        })
        .expect("a session cookie");
    let (status, page) = hil_tests::http_with(
        plane.connect(),
        "GET",
        path,
        &[("cookie", cookie.as_str())],
        b"",
    )
    .expect("HTTP");
    assert_eq!(status, 200);
    String::from_utf8(page).expect("HTML")
}

/// The shadow comparison of `id` once every device reports one.
fn wait_shadow(plane: &ControlPlane, id: &str, devices: usize) -> Value {
    wait_for(
        "every device's shadow comparison",
        Duration::from_secs(90),
        || {
            let s = status(plane, id);
            let rows = s["shadow"]["devices"].as_array()?;
            (rows.len() == devices && rows.iter().all(|r| r["rows"].as_u64() > Some(0)))
                .then_some(s)
        },
    )
}

#[test]
fn a_shadow_rollout_compares_on_live_traffic_without_touching_answers_and_its_gate_decides_promotion()
 {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (plane, agents) = lab_fleet_on_v1(dir, WINDOWS);
    untrained_bundle(dir, 3, "v3.fmb");
    plane.fleetctl(dir, &["models", "push", "v3.fmb"]).success();
    let all: Vec<&RunningAgent> = agents.iter().collect();

    // Serving alone first.
    let load = Load::start(&all, 1);
    std::thread::sleep(Duration::from_secs(4));
    let before = load.finish();

    // A deliberately different model in shadow, under the same load.
    let load = Load::start(&all, 1);
    let id = rollout(
        &plane,
        dir,
        &[
            "claims@3",
            "--shadow",
            "--to",
            "all",
            "--soak",
            "0s",
            "--max-fallbacks",
            "1",
            "--gate",
            "shadow_agreement>=0.98",
        ],
    );
    let compared = wait_shadow(&plane, &id, LAB_FLEET.len());
    std::thread::sleep(Duration::from_secs(3));
    let during = load.finish();

    // Serving answered as before: same version, same predictions per row, latency
    // from the same distribution.
    for (b, d) in before.iter().zip(&during) {
        assert!(d.answers.len() > 20, "traffic kept flowing");
        assert!(d.answers.iter().all(|a| a.3 == 1), "answers came from v1");
        let (old, new) = (answers_by_row(b), answers_by_row(d));
        let mut same = 0;
        for (row, answer) in &new {
            if let Some(prev) = old.get(row) {
                assert_eq!(prev, answer, "row {row}: the shadow changed an answer");
                same += 1;
            }
        }
        assert!(same > 0, "rows answered in both phases");
        let lat = |t: &Traffic| t.answers.iter().map(|a| a.1).collect::<Vec<_>>();
        same_latency(&lat(b), &lat(d), "serving beside a shadow");
    }

    // The comparison is reported, per device and per board, below the gate.
    let agreement = compared["shadow"]["boards"][0]["agreement"].as_f64();
    let view = status(&plane, &id);
    let gate = view["gates"]
        .as_array()
        .expect("gates")
        .iter()
        .find(|g| g["gate"] == "shadow_agreement")
        .cloned()
        .expect("the shadow gate");
    assert!(
        gate["value"].as_f64().is_some_and(|v| v < 0.98) && gate["ok"] == false,
        "{view:#}"
    );
    assert!(agreement.is_some_and(|a| a < 0.98), "{compared:#}");
    assert_eq!(
        view["shadow"]["boards"].as_array().map(Vec::len),
        Some(LAB_FLEET.len())
    );
    let text = plane.fleetctl(dir, &["rollout", "status", &id]);
    assert!(text.success().contains("shadow v3"), "{}", text.stdout);
    let refused = plane.fleetctl(dir, &["rollout", "promote", &id]);
    assert!(
        refused.failure().contains("refused by its gates")
            && refused.stderr.contains("shadow_agreement"),
        "{}",
        refused.stderr
    );
    for (name, _, _) in LAB_FLEET {
        wait_running(&plane, name, 1);
    }
    // The console's rollout page shows the comparison, and offers to promote.
    let page = console_page(&plane, &format!("/ui/rollouts/{id}"));
    assert!(
        page.contains("Shadow v3")
            && page.contains("id=\"shadow\"")
            && page.contains("board jetson-orin-nano"),
        "{page}"
    );
    assert!(
        page.contains("/ui/rollouts/") && page.contains("Promote"),
        "{page}"
    );

    // A near-identical model (v2: the same weights, another version) agrees, and is
    // promoted: the devices then serve it, with no shadow.
    // (The shadow rollout completed before the comparisons came in, or its gate paused it.)
    if matches!(
        status(&plane, &id)["state"].as_str(),
        Some("running" | "paused")
    ) {
        plane.fleetctl(dir, &["rollout", "abort", &id]).success();
    }
    let load = Load::start(&all, 1);
    let id2 = rollout(
        &plane,
        dir,
        &[
            "claims@2",
            "--shadow",
            "--shadow-sample",
            "50%",
            "--to",
            "all",
            "--soak",
            "0s",
            "--max-fallbacks",
            "1",
            "--gate",
            "shadow_agreement>=0.98",
        ],
    );
    let agreed = wait_shadow(&plane, &id2, LAB_FLEET.len());
    let _ = load.finish();
    for d in agreed["shadow"]["devices"].as_array().expect("devices") {
        assert_eq!(d["agreement"].as_f64(), Some(1.0), "{agreed:#}");
    }
    let promoted = plane.fleetctl(dir, &["rollout", "promote", &id2]);
    let out = promoted.success();
    assert!(out.contains("promoted"), "{out}");
    for (name, _, _) in LAB_FLEET {
        wait_running(&plane, name, 2);
    }
    let shown = plane.device("pi-a");
    assert!(
        shown.to_string().contains("\"version\":2") && !shown.to_string().contains("\"shadow\""),
        "serves v2 with no shadow: {shown:#}"
    );
    let listed = plane.fleetctl(dir, &["rollout", "list"]);
    assert!(listed.success().contains("completed"), "{}", listed.stdout);
    drop(agents);
}

/// One agent with a tight shadow budget under concurrent load: shadow runs are shed
/// (counted in its windows), its answers keep their latency distribution.
#[test]
fn a_busy_device_sheds_shadow_runs_first() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (plane, agents) = lab_fleet_on_v1(
        dir,
        &format!("{WINDOWS}\nshadow_cpu_percent = 1\nworkers = 1"),
    );
    let pi = &agents[0];

    let load = Load::start(&[pi], 3);
    std::thread::sleep(Duration::from_secs(4));
    let before = load.finish();

    let load = Load::start(&[pi], 3);
    let id = rollout(
        &plane,
        dir,
        &[
            "claims@2",
            "--shadow",
            "--to",
            "device=pi-a",
            "--soak",
            "0s",
        ],
    );
    let shed = wait_for("shadow runs shed", Duration::from_secs(90), || {
        let s = status(&plane, &id);
        let d = s["shadow"]["devices"].as_array()?.first()?.clone();
        (d["shed"].as_u64()? > 0).then_some(d)
    });
    std::thread::sleep(Duration::from_secs(2));
    let during = load.finish();
    assert!(shed["shed"].as_u64() > Some(0), "{shed:#}");
    let lat = |t: &Traffic| t.answers.iter().map(|a| a.1).collect::<Vec<_>>();
    same_latency(&lat(&before[0]), &lat(&during[0]), "serving while shedding");
}

/// Offline, without a control plane: `fleet-agent install-bundle --shadow` puts a version
/// beside the active one (refused, naming why, when there is none), `models` lists it, and
/// the running agent's windows carry its comparison while answers come from the active one.
#[test]
fn install_bundle_shadow_runs_beside_the_active_version_offline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    hil_tests::keys_and_policy(dir, "k");
    let reference = hil_tests::claims("reference.csv");
    for v in [1, 2] {
        hil_tests::build_claims(
            dir,
            v,
            &format!("v{v}.fmb"),
            &["--reference", &reference, "--key", "keys/k.key"],
        );
    }
    let shadow = [
        "install-bundle",
        "v2.fmb",
        "--data-dir",
        "data",
        "--trust",
        "trust.toml",
        "--shadow",
        "--shadow-sample",
        "50%",
    ];
    let refused = hil_tests::agent(dir, &shadow);
    assert!(
        refused
            .failure()
            .contains("no model named `claims` is installed"),
        "{}",
        refused.stderr
    );
    hil_tests::install(dir, "v1.fmb");
    let installed = hil_tests::agent(dir, &shadow);
    assert!(
        installed.success().contains("shadow claims v2 beside v1"),
        "{}",
        installed.stdout
    );
    let listed: Value = serde_json::from_str(
        hil_tests::agent(dir, &["models", "--data-dir", "data", "--json"]).success(),
    )
    .expect("JSON");
    assert_eq!(listed[0]["shadow"]["installed"]["version"], 2, "{listed:#}");
    assert_eq!(listed[0]["shadow"]["sample_permille"], 500, "{listed:#}");

    let agent = RunningAgent::serve_store(dir, &["--window-predictions", "100"]);
    let rows = crate::monitoring::rows("holdout.csv");
    for chunk in rows[..400].chunks(1) {
        let (status, reply) = agent.request(
            "POST",
            "/v1/models/claims/predict",
            &json!({ "features": chunk[0] }),
        );
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["version"], 1, "answered by the active version");
    }
    let (_, view) = agent.request("GET", "/v1/models/claims/monitoring?limit=10", &Value::Null);
    let shadows: Vec<&Value> = view["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .filter_map(|w| w.get("shadow"))
        .collect();
    assert!(!shadows.is_empty(), "{view:#}");
    let runs: u64 = shadows
        .iter()
        .map(|s| s["runs"].as_u64().unwrap_or(0))
        .sum();
    let shed: u64 = shadows
        .iter()
        .map(|s| s["shed"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        runs > 0 && runs + shed >= 150,
        "about half of 400 sampled: {shadows:?}"
    );
    assert!(
        shadows
            .iter()
            .all(|s| s["version"] == 2 && (s["agreement"] == 1.0 || s["rows"] == 0)),
        "{shadows:?}"
    );
}
