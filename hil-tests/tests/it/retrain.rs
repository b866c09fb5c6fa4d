//! Training jobs through a real control plane and the claims model's own trainer:
//! a grid of trials, the best registered as a signed candidate with its lineage, logs,
//! and `models reproduce` — bit for bit, and refused once the dataset is gone.

use std::path::Path;

use hil_tests::fleet::ControlPlane;
use hil_tests::{bin, claims, keys_and_policy};
use serde_json::Value;

/// The claims job spec with the trainer's absolute path and `extra` lines.
fn spec(dir: &Path, extra: &str) -> String {
    let text = std::fs::read_to_string(hil_tests::root().join("models/claims/train.toml"))
        .expect("train.toml");
    let text = text.replace(
        "\"claims-fit\",",
        &format!("{:?},", bin("claims-fit").display().to_string()),
    );
    // The system test gives its datasets explicitly.
    let text = text.replace("captures = { labelled_only = true, since_s = 604800 }", "");
    let path = dir.join("train.toml");
    std::fs::write(&path, format!("{text}\n{extra}")).expect("spec");
    path.display().to_string()
}

fn sha256_hex(path: &Path) -> String {
    fleetml_protocol::crypto::sha256(&std::fs::read(path).expect("file")).to_string()
}

#[test]
fn a_training_job_registers_the_best_trial_with_its_lineage_and_reproduces_it_bit_for_bit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let plane = ControlPlane::start(
        dir,
        None,
        &["--trust", "trust.toml", "--signing-key", "keys/k.key"],
    );
    let imported = plane.fleetctl(
        dir,
        &[
            "data",
            "import",
            &claims("reference.csv"),
            "--name",
            "reference",
        ],
    );
    imported.success();
    let data = plane.json(dir, &["data", "list"]);
    let reference = data[0]["id"].as_str().expect("id").to_string();
    let holdout = plane.fleetctl(
        dir,
        &[
            "data",
            "import",
            &claims("holdout.csv"),
            "--name",
            "holdout",
        ],
    );
    holdout.success();
    let holdout = plane.json(dir, &["data", "list"])[1]["id"]
        .as_str()
        .expect("id")
        .to_string();

    // A grid of two trials, evaluated on the holdout set.
    let spec = spec(
        dir,
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
    // A model pushed by hand has no job to re-run.
    let manual = plane.fleetctl(dir, &["models", "reproduce", "claims@9"]);
    assert!(
        !manual.ok() && manual.stderr.contains("no claims v9"),
        "{}",
        manual.stderr
    );
}
