//! Training jobs through a real control plane and the claims model's own trainer:
//! a grid of trials, the best registered as a signed candidate with its lineage, logs,
//! and `models reproduce` — bit for bit, and refused once the dataset is gone.

use std::path::Path;

use hil_tests::fleet::ControlPlane;
use hil_tests::{bin, claims, keys_and_policy};
use serde_json::Value;

/// Registers trainer `name` (TOML `text`) as the admin.
fn register(dir: &Path, plane: &ControlPlane, name: &str, text: &str) -> hil_tests::Run {
    let file = dir.join(format!("{name}.trainer.toml"));
    std::fs::write(&file, text).expect("trainer");
    plane.fleetctl(
        dir,
        &[
            "trainers",
            "add",
            name,
            "--file",
            &file.display().to_string(),
        ],
    )
}

/// The claims trainer with its binary's absolute path, and `extra` lines.
fn claims_trainer(extra: &str) -> String {
    let text = std::fs::read_to_string(hil_tests::root().join("models/claims/trainer.toml"))
        .expect("trainer.toml");
    let text = text.replace(
        "\"claims-fit\",",
        &format!("{:?},", bin("claims-fit").display().to_string()),
    );
    format!("{extra}{text}")
}

/// The claims job spec (its trainer `claims-fit` registered) with `extra` lines.
fn spec(dir: &Path, plane: &ControlPlane, extra: &str) -> String {
    register(dir, plane, "claims-fit", &claims_trainer("")).success();
    let text = std::fs::read_to_string(hil_tests::root().join("models/claims/train.toml"))
        .expect("train.toml");
    // The system test gives its datasets explicitly.
    let text = text.replace("captures = { labelled_only = true, since_s = 604800 }", "");
    let path = dir.join("train.toml");
    std::fs::write(&path, format!("{text}\n{extra}")).expect("spec");
    path.display().to_string()
}

/// Imports the claims data `file` as a dataset named `name`.
fn import_as(dir: &Path, plane: &ControlPlane, file: &str, name: &str) -> hil_tests::Run {
    plane.fleetctl(dir, &["data", "import", &claims(file), "--name", name])
}

/// Imports the claims reference rows as dataset `reference`; its id.
pub(crate) fn import_reference(dir: &Path, plane: &ControlPlane) -> String {
    import_as(dir, plane, "reference.csv", "reference").success();
    plane.json(dir, &["data", "list"])[0]["id"]
        .as_str()
        .expect("id")
        .to_string()
}

/// Keys, trust policy, and a control plane that signs candidates with `keys/k.key`.
fn signing_plane(dir: &Path) -> ControlPlane {
    keys_and_policy(dir, "k");
    ControlPlane::start(
        dir,
        None,
        &["--trust", "trust.toml", "--signing-key", "keys/k.key"],
    )
}

fn sha256_hex(path: &Path) -> String {
    fleetml_protocol::crypto::sha256(&std::fs::read(path).expect("file")).to_string()
}

#[test]
fn a_training_job_registers_the_best_trial_with_its_lineage_and_reproduces_it_bit_for_bit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let plane = signing_plane(dir);
    let imported = import_as(dir, &plane, "reference.csv", "reference");
    imported.success();
    let data = plane.json(dir, &["data", "list"]);
    let reference = data[0]["id"].as_str().expect("id").to_string();
    let holdout = import_as(dir, &plane, "holdout.csv", "holdout");
    holdout.success();
    let holdout = plane.json(dir, &["data", "list"])[1]["id"]
        .as_str()
        .expect("id")
        .to_string();

    // A grid of two trials, evaluated on the holdout set.
    let spec = spec(
        dir,
        &plane,
        &format!("holdout = \"{holdout}\"\n[grid]\nhidden = [4, 16]\n"),
    );
    let run = plane.fleetctl(
        dir,
        &[
            "retrain",
            "start",
            "claims",
            "--spec",
            &spec,
            "--dataset",
            &reference[..12],
            "--wait",
        ],
    );
    let out = run.success();
    assert!(out.contains("candidate claims@v1 registered"), "{out}");
    let jobs = plane.json(dir, &["retrain", "list"]);
    let job = jobs[0].clone();
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let trials = job["trials"].as_array().expect("trials");
    assert_eq!(trials.len(), 2);
    let best = job["best"].as_u64().expect("best") as usize;
    let metric = |t: &Value| t["metric"].as_f64().expect("metric");
    assert!(
        trials.iter().all(|t| metric(t) <= metric(&trials[best])),
        "{job:#}"
    );
    // hidden = 16 on the reference data with seed 42 is exactly the committed model.
    assert_eq!(trials[best]["params"]["hidden"], "16", "{job:#}");
    assert_eq!(
        trials[best]["artifact_sha256"].as_str(),
        Some(sha256_hex(&hil_tests::root().join("models/claims/model.onnx")).as_str())
    );
    let logs = plane.fleetctl(dir, &["retrain", "logs", job["id"].as_str().expect("id")]);
    assert!(
        logs.success().contains("trained on 4000 rows"),
        "{}",
        logs.stdout
    );
    let followed = plane.fleetctl(
        dir,
        &[
            "retrain",
            "logs",
            job["id"].as_str().expect("id"),
            "--follow",
            "--trial",
            "0",
        ],
    );
    assert!(
        followed.success().contains("trained on 4000 rows"),
        "{}",
        followed.stdout
    );

    // The candidate: signed, staged as candidate, its lineage recorded by the job.
    let shown = plane.get("/v1/models/claims/1");
    assert_eq!(shown["model"]["stage"], "candidate");
    assert_eq!(shown["model"]["tags"]["job"], job["id"]);
    let lineage = &shown["bundle"]["manifest"]["lineage"];
    let training = job["training_dataset"].as_str().expect("training dataset");
    assert_eq!(lineage["dataset"]["sha256"], training, "{lineage:#}");
    assert_eq!(lineage["seed"], 42);
    assert_eq!(lineage["framework"]["name"], "fleetml-claims");
    assert!(
        lineage["training_device"]
            .as_str()
            .expect("device")
            .starts_with("cpu")
    );
    assert_eq!(
        lineage["code"]["repository"],
        "https://example.invalid/fleetml"
    );
    assert_eq!(lineage["hyperparameters"]["hidden"], 16, "{lineage:#}");
    assert_eq!(lineage["hyperparameters"]["epochs"], 30);

    // Reproduce: same dataset, parameters and seed give the same bytes.
    let again = plane.fleetctl(dir, &["models", "reproduce", "claims@1"]);
    let report = again.success();
    assert!(report.contains("artifact: identical"), "{report}");
    assert!(report.contains("within tolerance"), "{report}");

    // Without its dataset there is nothing to reproduce from.
    plane
        .fleetctl(dir, &["data", "delete", &training[..16], "--yes"])
        .success();
    let refused = plane.fleetctl(dir, &["models", "reproduce", "claims@1"]);
    assert!(!refused.ok(), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("training dataset")
            && refused.stderr.contains("no longer available"),
        "{}",
        refused.stderr
    );
    // Nor without its code: a job whose commit lives in a clone that is gone. (The
    // training data of a single input is that input, same bytes, same dataset: the
    // deletion above took it, so it comes back first.)
    import_reference(dir, &plane);
    let repo = dir.join("code");
    std::fs::create_dir(&repo).expect("repo");
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(args)
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    git(&["init", "-q"]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.invalid",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "trainer",
    ]);
    let commit = git(&["rev-parse", "HEAD"]);
    let text = std::fs::read_to_string(&spec).expect("spec");
    // The clone is the trainer's (an admin's); the commit is the job's.
    register(
        dir,
        &plane,
        "claims-fit-code",
        &claims_trainer(&format!("code_dir = {:?}\n", repo.display().to_string())),
    )
    .success();
    let with_code = format!(
        "code_commit = \"{commit}\"\n{}",
        text.replace("[grid]\nhidden = [4, 16]\n", "")
            .replace("trainer = \"claims-fit\"", "trainer = \"claims-fit-code\"")
    );
    std::fs::write(dir.join("code.toml"), with_code).expect("spec");
    plane
        .fleetctl(
            dir,
            &[
                "retrain",
                "start",
                "claims",
                "--spec",
                "code.toml",
                "--dataset",
                &reference,
                "--wait",
            ],
        )
        .success();
    std::fs::remove_dir_all(&repo).expect("rm");
    let gone = plane.fleetctl(dir, &["models", "reproduce", "claims@2"]);
    assert!(
        !gone.ok()
            && gone
                .stderr
                .contains(&format!("code commit {commit} is not available")),
        "{}",
        gone.stderr
    );
    // A model pushed by hand has no job to re-run.
    let manual = plane.fleetctl(dir, &["models", "reproduce", "claims@9"]);
    assert!(
        !manual.ok() && manual.stderr.contains("no claims v9"),
        "{}",
        manual.stderr
    );
}

/// The `investigate` labels of a claims CSV, in row order.
fn labels(file: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(claims(file)).expect("csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let at = header
        .iter()
        .position(|h| *h == "investigate")
        .expect("label column");
    lines
        .map(|l| {
            l.split(',')
                .nth(at)
                .expect("label")
                .trim()
                .parse()
                .expect("0/1")
        })
        .collect()
}

#[test]
fn drift_on_the_devices_retrains_the_model_and_a_better_challenger_goes_to_a_canary() {
    drift_retrains_and_promotes(false);
}

/// The same loop with `--shadow-first`: the winner first runs as a shadow beside v1 on
/// every device; an operator's `rollout promote` then starts its canary.
#[test]
fn with_shadow_first_a_better_challenger_runs_in_shadow_before_its_canary() {
    drift_retrains_and_promotes(true);
}

fn drift_retrains_and_promotes(shadow_first: bool) {
    use crate::rollout::{enroll, rollout, run_agent, wait_running, wait_state};
    use hil_tests::fleet::wait_for;
    use serde_json::json;
    use std::time::Duration;
    const WAIT: Duration = Duration::from_secs(120);

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let plane = signing_plane(dir);
    crate::rollout::bundle(dir, 1, "v1.fmb");
    plane.fleetctl(dir, &["models", "push", "v1.fmb"]).success();
    plane
        .fleetctl(dir, &["models", "stage", "claims@1", "production"])
        .success();
    // The original training set, and a drifted holdout the devices never see.
    import_as(dir, &plane, "reference.csv", "original").success();
    let drifted_csv = std::fs::read_to_string(claims("drifted.csv")).expect("drifted");
    let mut lines: Vec<&str> = drifted_csv.lines().collect();
    let header = lines.remove(0);
    std::fs::write(
        dir.join("holdout.csv"),
        format!("{header}\n{}\n", lines[800..].join("\n")),
    )
    .expect("holdout");
    plane
        .fleetctl(
            dir,
            &["data", "import", "holdout.csv", "--name", "drifted holdout"],
        )
        .success();
    let datasets = plane.json(dir, &["data", "list"]);
    let id_of = |name: &str| {
        datasets
            .as_array()
            .expect("list")
            .iter()
            .find(|d| d["name"] == name)
            .expect("dataset")["id"]
            .as_str()
            .expect("id")
            .to_string()
    };
    let (original, holdout) = (id_of("original"), id_of("drifted holdout"));

    let features: Vec<String> = crate::monitoring::rows("reference.csv")[0]
        .as_object()
        .expect("row")
        .keys()
        .map(|k| format!("{k:?}"))
        .collect();
    let capture = format!(
        "window_predictions = 50\ncapture_upload_interval_s = 1\n[[capture]]\nmodel = \"claims\"\nflush_s = 1\nfeatures = [{}]\n",
        features.join(", ")
    );
    let names = ["edge-a", "edge-b"];
    let mut agents = Vec::new();
    for name in names {
        enroll(dir, &plane, name, "raspberry-pi-4", "site=lab", &capture);
        agents.push(run_agent(dir, name, "raspberry-pi-4"));
    }
    let first = rollout(&plane, dir, &["claims@1", "--to", "all", "--soak", "0s"]);
    wait_state(&plane, &first, "completed");
    for name in names {
        wait_running(&plane, name, 1);
    }

    // The field drifts: each device predicts 400 drifted claims, and ground truth follows.
    let rows = crate::monitoring::rows("drifted.csv");
    let truth = labels("drifted.csv");
    for (i, agent) in agents.iter().enumerate() {
        for start in (i * 400..(i + 1) * 400).step_by(50) {
            let ids: Vec<String> = (start..start + 50).map(|r| format!("claim-{r}")).collect();
            let (status, reply) = agent.request(
                "POST",
                "/v1/models/claims/predict",
                &json!({ "features": &rows[start..start + 50], "ids": ids }),
            );
            assert_eq!(status, 200, "{reply}");
            for (r, id) in (start..start + 50).zip(&ids) {
                let (status, reply) = agent.request(
                    "POST",
                    "/v1/feedback",
                    &json!({ "id": id, "label": truth[r] }),
                );
                assert_eq!(status, 200, "{reply}");
            }
        }
    }
    wait_for("drift alerts from both devices", WAIT, || {
        names
            .iter()
            .all(|n| {
                plane.get(&format!("/v1/devices/{n}"))["open_alerts"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
            })
            .then_some(())
    });
    wait_for("the labelled rows upstream", WAIT, || {
        let total: u64 = plane
            .get("/v1/captures?model=claims")
            .as_array()?
            .iter()
            .filter(|b| b["kind"] == "labelled")
            .map(|b| b["rows"].as_u64().unwrap_or(0))
            .sum();
        (total >= 800).then_some(())
    });

    let spec = spec(dir, &plane, "");
    plane
        .fleetctl(
            dir,
            &[
                "models",
                "policy",
                "set",
                "claims",
                "--drift-share",
                "0.5",
                "--for",
                "1s",
                "--dataset",
                &original,
                "--captured-since",
                "1h",
                "--auto-promote",
                "--holdout",
                &holdout,
                "--margin",
                "0.0",
                "--canary",
                "50",
                "--spec",
                &spec,
            ]
            .into_iter()
            .chain(shadow_first.then_some("--shadow-first"))
            .collect::<Vec<_>>(),
        )
        .success();
    let job = wait_for("the policy's training job to finish", WAIT, || {
        let jobs = plane.get("/v1/retrain");
        let j = jobs.as_array()?.first()?.clone();
        matches!(j["state"].as_str(), Some("succeeded" | "failed")).then_some(j)
    });
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert!(
        job["trigger"]
            .as_str()
            .expect("trigger")
            .starts_with("drift policy of claims"),
        "{job:#}"
    );
    // Trained on the original set plus what the devices captured.
    let training = plane.get(&format!(
        "/v1/datasets/{}",
        job["training_dataset"].as_str().expect("id")
    ));
    assert_eq!(training["rows"], 4800, "{training:#}");
    let captured = job["inputs"]
        .as_array()
        .expect("inputs")
        .iter()
        .map(|i| plane.get(&format!("/v1/datasets/{}", i.as_str().expect("id"))))
        .find(|d| {
            d["sources"][0]
                .as_str()
                .unwrap_or("")
                .starts_with("captures")
        })
        .expect("a captured dataset among the inputs");
    assert_eq!(captured["devices"], json!(["edge-a", "edge-b"]));
    assert_eq!(captured["rows"], 800);

    // The candidate and its lineage.
    let candidate = plane.get("/v1/models/claims/2");
    assert_eq!(candidate["model"]["stage"], "candidate");
    let lineage = &candidate["bundle"]["manifest"]["lineage"];
    for field in [
        "dataset",
        "code",
        "framework",
        "seed",
        "training_device",
        "hyperparameters",
    ] {
        assert!(
            !lineage[field].is_null(),
            "lineage lacks {field}: {lineage:#}"
        );
    }
    assert_eq!(lineage["dataset"]["sha256"], job["training_dataset"]);

    // Champion/challenger on the drifted holdout.
    let compared = plane.json(
        dir,
        &[
            "models",
            "compare",
            "claims@1",
            "claims@2",
            "--on",
            &holdout[..12],
            "--label",
            "investigate",
        ],
    );
    assert_eq!(compared["verdict"]["winner"], "b", "{compared:#}");
    let table = plane.fleetctl(
        dir,
        &[
            "models",
            "compare",
            "claims@1",
            "claims@2",
            "--on",
            &holdout,
            "--label",
            "investigate",
        ],
    );
    assert!(
        table.success().contains("claims@v2 wins on auc"),
        "{}",
        table.stdout
    );

    // Auto-promote: a canary rollout of the challenger (with --shadow-first, a shadow
    // rollout first, which an operator promotes to the canary).
    let first = wait_for("the policy's rollout", WAIT, || {
        plane
            .get("/v1/rollouts")
            .as_array()?
            .iter()
            .find(|r| r["version"] == 2)
            .cloned()
    });
    assert_eq!(first["by"], "policy:claims", "{first:#}");
    let canary = if shadow_first {
        let id = first["id"].as_str().expect("id").to_string();
        let view = plane.get(&format!("/v1/rollouts/{id}"));
        assert_eq!(view["strategy"]["waves"], json!([50, 100]), "{view:#}");
        assert_eq!(view["shadow"]["version"], 2, "a shadow rollout: {view:#}");
        assert!(
            view["devices"]
                .as_array()
                .expect("devices")
                .iter()
                .all(|d| d["to"] == 1),
            "the devices keep serving v1: {view:#}"
        );
        let traffic = crate::monitoring::rows("holdout.csv");
        wait_for("the shadow compared on the devices", WAIT, || {
            let v = plane.get(&format!("/v1/rollouts/{id}"));
            let rows = v["shadow"]["devices"].as_array()?.clone();
            if !rows.is_empty() && rows.iter().all(|r| r["runs"].as_u64() > Some(0)) {
                return Some(());
            }
            // Devices run a shadow only on the traffic they serve: keep some flowing.
            for a in &agents {
                crate::monitoring::send(a, &traffic[..50]);
            }
            None
        });
        // Each window here holds one 50-row request (`window_predictions = 50`), so the
        // latency gate weighs one shadow run against one served request per device: on a
        // loaded machine a single pair can pass 1.5. Like an operator, promote again once
        // newer windows came in, while the latency gate is the only one refusing; any
        // other refusal, or the same one for two minutes, fails the test with its text.
        let deadline = std::time::Instant::now() + WAIT;
        let promoted = loop {
            let run = plane.fleetctl(dir, &["rollout", "promote", &id]);
            if run.ok() {
                break run.stdout;
            }
            let only_latency =
                run.stderr
                    .split_once("refused by its gates: ")
                    .is_some_and(|(_, gates)| {
                        gates
                            .trim()
                            .split("; ")
                            .all(|g| g.starts_with("shadow_latency_ratio "))
                    });
            assert!(
                only_latency && std::time::Instant::now() < deadline,
                "promotion failed: {}",
                run.stderr
            );
            for a in &agents {
                crate::monitoring::send(a, &traffic[..50]);
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        assert!(promoted.contains("promoted"), "{promoted}");
        plane
            .get("/v1/rollouts")
            .as_array()
            .expect("rollouts")
            .iter()
            .find(|r| r["version"] == 2 && r["id"] != id.as_str())
            .cloned()
            .expect("the canary the promotion started")
    } else {
        first
    };
    assert_eq!(canary["version"], 2, "{canary:#}");
    let audit = plane.json(dir, &["audit", "--last", "1000"]);
    let actions: Vec<&str> = audit
        .as_array()
        .expect("audit")
        .iter()
        .filter(|e| e["who"] == "policy:claims")
        .filter_map(|e| e["action"].as_str())
        .collect();
    let promoted = if shadow_first {
        "promote.shadow"
    } else {
        "promote.canary"
    };
    for a in ["retrain.start", "retrain.finished", promoted] {
        assert!(actions.contains(&a), "{actions:?}");
    }
    let shown = plane.fleetctl(dir, &["models", "policy", "show", "claims"]);
    assert!(
        shown.success().contains(if shadow_first {
            "shadow rollout"
        } else {
            "canary rollout"
        }),
        "{}",
        shown.stdout
    );
    drop(agents);
}

/// A stand-in Kubernetes API server for the executor's Jobs: it keeps every Job
/// posted, "schedules" it by running the container's command on this machine (shared
/// storage is the local file system), and answers Job status, pod list and pod logs as
/// the API server does.
struct FakeCluster {
    url: String,
    posted: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

/// A Job the fake cluster runs: finished (and whether it succeeded), and its log.
type Run = (Option<bool>, String);

/// Image digest the fake kubelet reports.
const IMAGE_ID: &str = "registry.example.com/claims-train@sha256:5d41402abc4b2a76b9719d911017c592";

impl FakeCluster {
    fn start() -> FakeCluster {
        FakeCluster::start_with(None)
    }

    /// Over TLS with `tls` (`https://`), else plain.
    fn start_with(tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> FakeCluster {
        use std::collections::BTreeMap;
        use std::io::{BufRead, Read, Write};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().expect("addr"));
        let posted: Arc<Mutex<Vec<Value>>> = Arc::default();
        // Job name → (finished: Some(success), log).
        let runs: Arc<Mutex<BTreeMap<String, Run>>> = Arc::default();
        let (p, r) = (posted.clone(), runs.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let stream: Box<dyn hil_tests::fleet::Stream> = match &tls {
                    None => Box::new(tcp),
                    Some(config) => {
                        let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                            continue;
                        };
                        Box::new(rustls::StreamOwned::new(conn, tcp))
                    }
                };
                let mut reader = std::io::BufReader::new(stream);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut length = 0usize;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; length];
                let _ = reader.read_exact(&mut body);
                let mut parts = line.split_whitespace();
                let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let path = target.split('?').next().unwrap_or("");
                let segments: Vec<&str> = path.split('/').collect();
                let (status, reply, kind) = match (method, segments.as_slice()) {
                    ("POST", ["", "apis", "batch", "v1", "namespaces", _, "jobs"]) => {
                        let job: Value = serde_json::from_slice(&body).expect("a Job");
                        let name = job["metadata"]["name"].as_str().expect("name").to_string();
                        p.lock().expect("lock").push(job.clone());
                        r.lock()
                            .expect("lock")
                            .insert(name.clone(), (None, String::new()));
                        let c = job["spec"]["template"]["spec"]["containers"][0].clone();
                        let runs = r.clone();
                        std::thread::spawn(move || {
                            let argv: Vec<String> = c["command"]
                                .as_array()
                                .expect("command")
                                .iter()
                                .map(|a| a.as_str().expect("arg").to_string())
                                .collect();
                            let mut cmd = std::process::Command::new(&argv[0]);
                            cmd.args(&argv[1..])
                                .current_dir(c["workingDir"].as_str().expect("dir"));
                            for e in c["env"].as_array().expect("env") {
                                cmd.env(
                                    e["name"].as_str().expect("name"),
                                    e["value"].as_str().expect("value"),
                                );
                            }
                            let out = cmd.output().expect("runs");
                            let log = format!(
                                "{}{}",
                                String::from_utf8_lossy(&out.stdout),
                                String::from_utf8_lossy(&out.stderr)
                            );
                            runs.lock()
                                .expect("lock")
                                .insert(name, (Some(out.status.success()), log));
                        });
                        let mut created = job;
                        created["metadata"]["uid"] = Value::from("0000");
                        (201, created.to_string(), "application/json")
                    }
                    ("GET", ["", "apis", "batch", "v1", "namespaces", ns, "jobs", name]) => {
                        let status = match r.lock().expect("lock").get(*name) {
                            Some((Some(true), _)) => serde_json::json!({"succeeded": 1}),
                            Some((Some(false), _)) => serde_json::json!({"failed": 1}),
                            _ => serde_json::json!({"active": 1}),
                        };
                        let job = serde_json::json!({
                            "apiVersion": "batch/v1", "kind": "Job",
                            "metadata": {"name": name, "namespace": ns}, "status": status,
                        });
                        (200, job.to_string(), "application/json")
                    }
                    ("GET", ["", "api", "v1", "namespaces", ns, "pods"]) => {
                        let name = target
                            .split("job-name%3D")
                            .nth(1)
                            .or_else(|| target.split("job-name=").nth(1))
                            .unwrap_or("")
                            .split('&')
                            .next()
                            .unwrap_or("")
                            .to_string();
                        let list = serde_json::json!({
                            "apiVersion": "v1", "kind": "PodList", "metadata": {},
                            "items": [{
                                "metadata": {"name": format!("{name}-x7k2p"), "namespace": ns},
                                "status": {"containerStatuses": [{
                                    "name": "train", "image": "claims-train", "imageID": IMAGE_ID,
                                    "ready": false, "restartCount": 0,
                                }]},
                            }],
                        });
                        (200, list.to_string(), "application/json")
                    }
                    ("GET", ["", "api", "v1", "namespaces", _, "pods", pod, "log"]) => {
                        let job = pod.trim_end_matches("-x7k2p");
                        let log = r
                            .lock()
                            .expect("lock")
                            .get(job)
                            .map(|x| x.1.clone())
                            .unwrap_or_default();
                        (200, log, "text/plain")
                    }
                    ("DELETE", _) => (200, "{}".to_string(), "application/json"),
                    _ => (
                        404,
                        "{\"kind\":\"Status\",\"code\":404}".to_string(),
                        "application/json",
                    ),
                };
                let mut stream = reader.into_inner();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                    reply.len()
                );
            }
        });
        FakeCluster { url, posted }
    }
}

#[test]
fn the_kubernetes_executor_creates_gpu_jobs_through_the_api_and_records_the_image_digest() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let plane = signing_plane(dir);
    let reference = import_reference(dir, &plane);
    let cluster = FakeCluster::start();
    // The executor, image and cluster are the trainer's; the resources the job's.
    let trainer = |kubernetes: &str| {
        format!(
            "{}\n{kubernetes}",
            claims_trainer(
                "executor = \"kubernetes\"\nimage = \"registry.example.com/claims-train:1\"\n"
            )
            .replace("executor = \"local\"\n", "")
        )
    };
    register(
        dir,
        &plane,
        "claims-k8s",
        &trainer(&format!(
            "[kubernetes]\nurl = \"{}\"\nnamespace = \"ml\"\nvolume_claim = \"fleetml-jobs\"\n",
            cluster.url
        )),
    )
    .success();
    let spec_path = spec(dir, &plane, "");
    let text = std::fs::read_to_string(&spec_path)
        .expect("spec")
        .replace("trainer = \"claims-fit\"", "trainer = \"claims-k8s\"");
    std::fs::write(
        &spec_path,
        format!("{text}\n[resources]\ngpus = 1\nmemory = \"4Gi\"\n"),
    )
    .expect("spec");
    let run = plane.fleetctl(
        dir,
        &[
            "retrain",
            "start",
            "claims",
            "--spec",
            &spec_path,
            "--dataset",
            &reference,
            "--wait",
        ],
    );
    assert!(
        run.success().contains("candidate claims@v1 registered"),
        "{}",
        run.stdout
    );

    let posted = cluster.posted.lock().expect("lock").clone();
    assert_eq!(posted.len(), 1);
    let job = &posted[0];
    assert_eq!(job["kind"], "Job");
    assert_eq!(
        job["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "fleetml"
    );
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "registry.example.com/claims-train:1");
    assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
    assert_eq!(c["resources"]["limits"]["memory"], "4Gi");
    assert_eq!(
        pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "fleetml-jobs"
    );
    let jobs_dir = std::fs::canonicalize(plane.data_dir.join("jobs")).expect("jobs dir");
    assert_eq!(
        std::fs::canonicalize(c["volumeMounts"][0]["mountPath"].as_str().expect("mount"))
            .expect("mount"),
        jobs_dir
    );
    assert!(
        c["env"]
            .as_array()
            .expect("env")
            .iter()
            .any(|e| e["name"] == "FLEETML_SEED" && e["value"] == "42")
    );

    // The digest the kubelet ran is the lineage's container image; the pod log is the trial's.
    let shown = plane.get("/v1/models/claims/1");
    assert_eq!(
        shown["bundle"]["manifest"]["lineage"]["container_image"],
        IMAGE_ID
    );
    let jobs = plane.json(dir, &["retrain", "list"]);
    let logs = plane.fleetctl(
        dir,
        &["retrain", "logs", jobs[0]["id"].as_str().expect("id")],
    );
    assert!(
        logs.success().contains("trained on 4000 rows"),
        "{}",
        logs.stdout
    );

    // Over TLS: the API server's certificate is checked against the trainer's `ca`; a
    // cluster whose certificate another CA issued is refused before any Job is made.
    for (ca, out) in [
        ("kube-ca", None),
        ("other-ca", None),
        ("kube-ca", Some("kube")),
    ] {
        let args: Vec<&str> = match out {
            None => vec!["tls", "ca", "--dir", ca],
            Some(out) => vec![
                "tls",
                "issue",
                "--ca-dir",
                ca,
                "--name",
                "127.0.0.1",
                "--out",
                out,
            ],
        };
        plane.fleetctl(dir, &args).success();
    }
    let read = |f: &str| std::fs::read(dir.join(f)).expect("pem");
    let secure = FakeCluster::start_with(Some(
        fleetml_net::tls::server_config(&read("kube.pem"), &read("kube.key"), &[b"http/1.1"])
            .expect("server config"),
    ));
    let mut runs = Vec::new();
    for (name, ca) in [
        ("claims-k8s-tls", "kube-ca"),
        ("claims-k8s-other", "other-ca"),
    ] {
        register(
            dir,
            &plane,
            name,
            &trainer(&format!(
                "[kubernetes]\nurl = \"{}\"\nca = \"{}\"\nnamespace = \"ml\"\nvolume_claim = \"fleetml-jobs\"\n",
                secure.url,
                dir.join(ca).join("ca.pem").display()
            )),
        )
        .success();
        let text = std::fs::read_to_string(&spec_path)
            .expect("spec")
            .replace("trainer = \"claims-k8s\"", &format!("trainer = \"{name}\""));
        let path = dir.join(format!("{name}.train.toml"));
        std::fs::write(&path, text).expect("spec");
        runs.push(plane.fleetctl(
            dir,
            &[
                "retrain",
                "start",
                "claims",
                "--spec",
                path.to_str().expect("utf-8"),
                "--dataset",
                &reference,
                "--wait",
            ],
        ));
    }
    assert!(
        runs[0].success().contains("registered"),
        "{}",
        runs[0].stdout
    );
    assert!(
        !runs[1].ok(),
        "another CA's certificate was accepted: {}",
        runs[1].stdout
    );
    assert_eq!(secure.posted.lock().expect("lock").len(), 1);

    // A trainer without shared storage is refused before anything runs.
    let refused = register(
        dir,
        &plane,
        "bad",
        &trainer("[kubernetes]\nnamespace = \"ml\"\n"),
    );
    assert!(
        !refused.ok() && refused.stderr.contains("volume_claim"),
        "{}",
        refused.stderr
    );
}

/// With `--trial-user`, local trials run as a user of their own in folders outside
/// DATA_DIR, and a trainer cannot read the control plane's secrets. Before: trials ran
/// as the control plane's user (root here), so this trainer copied the admin token
/// (checked: without `--trial-user` its `stolen` file holds the token). The real claims
/// trainer still trains as that user, and a trials folder inside DATA_DIR is refused.
#[test]
fn trials_run_as_their_own_user_who_cannot_read_the_data_dir() {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        eprintln!("skipped: --trial-user needs the control plane to run as root (CI runs as root)");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let inside = hil_tests::Run::of(
        std::process::Command::new(bin("fleetctl"))
            .current_dir(dir)
            .args([
                "serve",
                "--insecure-listen",
                "--listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--data-dir",
                "inside",
                "--trials-dir",
                "inside/trials",
                "--trial-user",
                "nobody",
            ])
            .output()
            .expect("fleetctl runs"),
    );
    assert!(
        inside.failure().contains("--trials-dir DIR outside it"),
        "{}",
        inside.stderr
    );

    let trials = tempfile::Builder::new()
        .prefix("fleetml-trials")
        .tempdir_in("/tmp")
        .expect("trials dir");
    std::fs::set_permissions(trials.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let trials_dir = trials.path().display().to_string();
    let plane = ControlPlane::start(
        dir,
        None,
        &[
            "--trust",
            "trust.toml",
            "--signing-key",
            "keys/k.key",
            "--trials-dir",
            &trials_dir,
            "--trial-user",
            "nobody",
        ],
    );
    let reference = import_reference(dir, &plane);
    let spec_path = spec(dir, &plane, "");
    let start = |spec: &str| {
        plane.fleetctl(
            dir,
            &[
                "retrain",
                "start",
                "claims",
                "--spec",
                spec,
                "--dataset",
                &reference,
                "--wait",
            ],
        )
    };
    let trained = start(&spec_path);
    assert!(
        trained.success().contains("candidate claims@v1 registered"),
        "{}",
        trained.stdout
    );

    let token = plane.data_dir.join("admin.token");
    register(
        dir,
        &plane,
        "thief",
        &format!(
            "command = [\"/bin/sh\", \"-c\", \"id -u > {{out}}/uid; cat {} > {{out}}/stolen 2> {{out}}/denied; exit 1\"]\nexecutor = \"local\"\n",
            token.display()
        ),
    )
    .success();
    let thief_spec = dir.join("thief.toml");
    std::fs::write(
        &thief_spec,
        std::fs::read_to_string(&spec_path)
            .expect("spec")
            .replace("trainer = \"claims-fit\"", "trainer = \"thief\""),
    )
    .expect("spec");
    assert!(!start(thief_spec.to_str().expect("utf-8")).ok());
    let jobs = plane.json(dir, &["retrain", "list"]);
    let thief = jobs
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["spec"]["trainer"] == "thief")
        .expect("the thief's job");
    let out = trials
        .path()
        .join(thief["id"].as_str().expect("id"))
        .join("trial-0/out");
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_default();
    assert_eq!(read("uid").trim(), "65534", "the trial ran as another user");
    let secret = std::fs::read_to_string(&token).expect("token");
    assert!(
        !read("stolen").contains(secret.trim()) && read("stolen").is_empty(),
        "the trial read the admin token"
    );
    assert!(
        read("denied").contains("Permission denied"),
        "{}",
        read("denied")
    );
    assert!(!out.starts_with(&plane.data_dir));
}
