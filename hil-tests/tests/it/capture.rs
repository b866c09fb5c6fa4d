//! Data capture and ground truth with real agents: the byte budget and allow-list under
//! a flood, feedback and live accuracy, and uploads that survive a cut connection to a
//! real control plane without duplicating rows.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use hil_tests::fleet::{ControlPlane, wait_for};
use hil_tests::{RunningAgent, agent, build_claims, claims, install, keys_and_policy};
use serde_json::{Value, json};

use crate::monitoring::rows;

const WAIT: Duration = Duration::from_secs(60);

fn bundle(dir: &Path) {
    build_claims(
        dir,
        1,
        "claims.fmb",
        &[
            "--reference",
            &claims("reference.csv"),
            "--key",
            "keys/k.key",
        ],
    );
}

/// Bytes of capture batches on disk.
fn captured_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn batch_lines(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        if e.file_name().to_string_lossy().ends_with(".jsonl") {
            for line in std::fs::read_to_string(e.path()).expect("batch").lines() {
                out.push(serde_json::from_str(line).expect("JSON line"));
            }
        }
    }
    out
}

fn predict(agent: &RunningAgent, rows: &[Value], ids: &[String]) {
    let (status, reply) = agent.request(
        "POST",
        "/v1/models/claims/predict",
        &json!({ "features": rows, "ids": ids }),
    );
    assert_eq!(status, 200, "{reply}");
}

#[test]
fn capture_keeps_its_byte_budget_and_allow_list_under_a_flood_and_feedback_scores_predictions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    bundle(dir);
    std::fs::write(
        dir.join("capture.toml"),
        "capture_max_bytes = 20000\n\
         [[capture]]\nmodel = \"claims\"\nsample_rate = 1.0\nreservoir = 40\nflush_s = 1\n\
         features = [\"claim_amount\", \"region\"]\n",
    )
    .expect("config");
    install(dir, "claims.fmb");
    let running = RunningAgent::start(
        dir,
        &[
            "run",
            "--config",
            "capture.toml",
            "--data-dir",
            "data",
            "--trust",
            "trust.toml",
            "--listen",
            "127.0.0.1:0",
            "--window-predictions",
            "50",
        ],
    );
    let capture_dir = dir.join("data/capture");
    let data = rows("reference.csv");
    let mut most = 0;
    for (round, chunk) in data[..3000].chunks(50).enumerate() {
        let ids: Vec<String> = (0..chunk.len()).map(|i| format!("f{round}-{i}")).collect();
        predict(&running, chunk, &ids);
        // Long enough for a batch a second: more than the budget holds.
        std::thread::sleep(Duration::from_millis(150));
        let bytes = captured_bytes(&capture_dir);
        most = most.max(bytes);
        assert!(bytes <= 20_000, "capture holds {bytes} bytes, budget 20000");
    }
    wait_for("batches on disk", WAIT, || {
        (captured_bytes(&capture_dir) > 0).then_some(())
    });
    assert!(
        most > 10_000,
        "the budget was never approached ({most} bytes)"
    );
    let lines = batch_lines(&capture_dir);
    let allowed: BTreeSet<&str> = ["claim_amount", "region"].into();
    for l in &lines {
        let keys: BTreeSet<&str> = l["features"]
            .as_object()
            .expect("features")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, allowed, "{l}");
        assert!(l["prediction"].is_array() && l["id"].is_string(), "{l}");
    }
    let (_, metrics) = running.request("GET", "/metrics", &Value::Null);
    let text = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        text.lines()
            .any(|l| l.starts_with("fleetml_agent_capture_dropped_rows_total{reason=\"budget\"}")),
        "{text}"
    );

    // Ground truth for one prediction: scored, captured (labelled), counted in the window.
    let one = &data[3000..3001];
    predict(&running, one, &["case-1".to_string()]);
    let (status, reply) = running.request(
        "POST",
        "/v1/feedback",
        &json!({ "id": "case-1", "label": 1 }),
    );
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["correct"].is_boolean() && reply["captured"] == true,
        "{reply}"
    );
    let (status, reply) = running.request(
        "POST",
        "/v1/feedback",
        &json!({ "id": "case-1", "label": 1 }),
    );
    assert_eq!(status, 404, "one label per prediction: {reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or("")
            .contains("no recent prediction"),
        "{reply}"
    );
    let (status, reply) = running.request(
        "POST",
        "/v1/feedback",
        &json!({ "id": "f0-1", "label": "maybe" }),
    );
    assert_eq!(status, 422, "{reply}");
    predict(
        &running,
        &data[3001..3050],
        &(0..49).map(|i| format!("w{i}")).collect::<Vec<_>>(),
    );
    let window = wait_for("a window with a label", WAIT, || {
        let (_, view) = running.request(
            "GET",
            "/v1/models/claims/monitoring?limit=100",
            &Value::Null,
        );
        view["windows"]
            .as_array()?
            .iter()
            .find(|w| w["labels"].as_u64() == Some(1))
            .cloned()
    });
    assert!(window["live_accuracy"].is_number(), "{window}");
    wait_for("the labelled batch", WAIT, || {
        batch_lines(&capture_dir)
            .iter()
            .any(|l| l["id"] == "case-1" && l["label"] == 1)
            .then_some(())
    });
}

#[test]
fn captured_batches_reach_the_control_plane_once_even_across_a_cut_connection() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    bundle(dir);
    let mut plane = ControlPlane::start(dir, None, &["--trust", "trust.toml"]);
    plane
        .fleetctl(dir, &["devices", "enroll", "cap-1", "--out", "cap-1.toml"])
        .success();
    let config = dir.join("cap-1.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let at = text.find("\n[").map_or(text.len(), |i| i + 1);
    std::fs::write(
        &config,
        format!(
            "{}capture_upload_interval_s = 1\n[[capture]]\nmodel = \"claims\"\nsample_rate = 1.0\nreservoir = 1000\nflush_s = 1\nfeatures = [\"claim_amount\"]\n\n{}",
            &text[..at],
            &text[at..]
        ),
    )
    .expect("config");
    agent(
        dir,
        &[
            "install-bundle",
            "claims.fmb",
            "--config",
            "cap-1.toml",
            "--data-dir",
            "data",
        ],
    )
    .success();
    // Captures are taken only for a model the device is assigned: the bundle it has
    // installed, assigned to it.
    plane
        .fleetctl(dir, &["models", "push", "claims.fmb"])
        .success();
    plane
        .fleetctl(
            dir,
            &[
                "rollout", "start", "claims@1", "--to", "all", "--soak", "0s",
            ],
        )
        .success();
    let running = RunningAgent::start(
        dir,
        &[
            "run",
            "--config",
            "cap-1.toml",
            "--data-dir",
            "data",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let data = rows("reference.csv");
    let send = |from: usize, to: usize| {
        for start in (from..to).step_by(50) {
            let ids: Vec<String> = (start..(start + 50).min(to))
                .map(|i| format!("row-{i}"))
                .collect();
            predict(&running, &data[start..start + ids.len()], &ids);
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let stored = |plane: &ControlPlane| -> u64 {
        plane
            .get("/v1/captures?model=claims")
            .as_array()
            .map(|a| a.iter().map(|b| b["rows"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0)
    };
    send(0, 300);
    wait_for("the first rows upstream", WAIT, || {
        (stored(&plane) > 0).then_some(())
    });
    // Cut: the control plane goes away while the agent keeps capturing.
    plane.stop();
    send(300, 600);
    wait_for("batches waiting on the device", WAIT, || {
        (captured_bytes(&dir.join("data/capture")) > 0).then_some(())
    });
    plane.restart();
    wait_for("every row upstream", WAIT, || {
        (stored(&plane) >= 600).then_some(())
    });
    wait_for("the device's capture to drain", WAIT, || {
        (captured_bytes(&dir.join("data/capture")) == 0).then_some(())
    });
    assert_eq!(stored(&plane), 600, "rows stored twice");
    let mut ids = BTreeSet::new();
    let batches = plane.data_dir.join("captures/cap-1");
    for line in batch_lines(&batches) {
        assert!(
            ids.insert(line["id"].as_str().expect("id").to_string()),
            "duplicate {line}"
        );
    }
    assert_eq!(ids.len(), 600);
    drop(running);

    // The captured rows become a dataset (Parquet, named by its hash), and files too.
    let made = plane.fleetctl(dir, &["data", "capture", "claims", "--name", "field data"]);
    assert!(made.success().contains("600 rows"), "{}", made.stdout);
    let list = plane.json(dir, &["data", "list"]);
    let captured = list[0].clone();
    assert_eq!(captured["devices"], json!(["cap-1"]));
    assert!(
        captured["schema"]
            .as_array()
            .expect("schema")
            .iter()
            .any(|c| c["name"] == "claim_amount")
    );
    let id = captured["id"].as_str().expect("id").to_string();
    let file = dir.join("export.parquet");
    plane
        .fleetctl(
            dir,
            &["data", "export", &id[..12], "--out", "export.parquet"],
        )
        .success();
    let bytes = std::fs::read(&file).expect("export");
    assert_eq!(&bytes[..4], b"PAR1");
    assert_eq!(
        hex::encode(ring_sha256(&bytes)),
        id,
        "named by the hash of its Parquet bytes"
    );
    // Re-importing the exported file is the same dataset; a CSV with a filter is another.
    let again = plane.fleetctl(dir, &["data", "import", "export.parquet"]);
    assert!(
        again.success().starts_with("already stored"),
        "{}",
        again.stdout
    );
    let imported = plane.fleetctl(
        dir,
        &[
            "data",
            "import",
            &claims("drifted.csv"),
            "--name",
            "drifted",
            "--drop-na",
            "claim_amount,region",
        ],
    );
    assert!(
        imported.success().contains("drifted"),
        "{}",
        imported.stdout
    );
    let drifted = plane.json(dir, &["data", "list"])[1].clone();
    assert_eq!(drifted["filters"], json!(["drop_na(claim_amount,region)"]));
    let did = drifted["id"].as_str().expect("id").to_string();
    plane
        .fleetctl(dir, &["models", "push", "claims.fmb"])
        .success();
    let profile = plane.fleetctl(
        dir,
        &[
            "data",
            "profile",
            &did,
            "--target",
            "investigate",
            "--reference",
            "claims@1",
            "--html",
            "report.html",
        ],
    );
    let table = profile.success();
    assert!(
        table.contains("claim_amount") && table.contains("PSI"),
        "{table}"
    );
    let html = std::fs::read_to_string(dir.join("report.html")).expect("html");
    assert!(
        html.contains("<svg") && html.contains("investigate"),
        "report"
    );
    let json = plane.json(
        dir,
        &[
            "data",
            "profile",
            &did,
            "--target",
            "investigate",
            "--reference",
            "claims@1",
        ],
    );
    let amount = json["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .find(|c| c["name"] == "claim_amount")
        .expect("claim_amount")
        .clone();
    assert!(
        amount["psi"].as_f64().expect("psi") > 0.1,
        "drifted data drifts: {amount}"
    );
    assert!(
        amount["target_association"]["value"].is_number(),
        "{amount}"
    );
    let missing = plane.fleetctl(dir, &["data", "profile", &did, "--target", "nope"]);
    assert!(
        !missing.ok() && missing.stderr.contains("no column `nope`"),
        "{}",
        missing.stderr
    );
}

fn ring_sha256(bytes: &[u8]) -> [u8; 32] {
    fleetml_protocol::crypto::sha256(bytes).0
}

#[test]
fn rows_of_a_postgresql_query_become_a_dataset_without_the_password() {
    use hil_tests::fleet::Postgres;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let plane = ControlPlane::start(dir, None, &["--trust", "trust.toml"]);
    let pg = Postgres::start();
    pg.sql(
        "CREATE TABLE claims (claim_amount float8, region text, investigate int4, score numeric); \
         INSERT INTO claims VALUES (100.5, 'east', 1, 1.5), (NULL, 'west', 0, 2), (300, 'east', NULL, 3);",
    );
    let url = pg.url().replace("postgres@", "postgres:s3cret@");
    let run = plane.fleetctl(
        dir,
        &[
            "data",
            "import",
            "--postgres",
            &url,
            "--query",
            "SELECT claim_amount, region, investigate FROM claims ORDER BY region, claim_amount",
            "--drop-na",
            "investigate",
            "--name",
            "from postgres",
        ],
    );
    assert!(
        run.success().contains("2 rows, 3 columns"),
        "{}",
        run.stdout
    );
    let m = plane.json(dir, &["data", "list"])[0].clone();
    let source = m["sources"][0].as_str().expect("source");
    assert!(
        source.starts_with("postgres://postgres@127.0.0.1:"),
        "{source}"
    );
    assert!(
        !m.to_string().contains("s3cret"),
        "the password leaked: {m}"
    );
    assert_eq!(m["filters"], json!(["drop_na(investigate)"]));
    let csv = dir.join("out.csv");
    plane
        .fleetctl(
            dir,
            &[
                "data",
                "export",
                m["id"].as_str().expect("id"),
                "--out",
                "out.csv",
                "--format",
                "csv",
            ],
        )
        .success();
    assert_eq!(
        std::fs::read_to_string(csv).expect("csv"),
        "claim_amount,region,investigate\n100.5,east,1\n,west,0\n"
    );
    // A column type datasets do not hold is named, with the fix.
    let numeric = plane.fleetctl(
        dir,
        &[
            "data",
            "import",
            "--postgres",
            &pg.url(),
            "--query",
            "SELECT score FROM claims",
        ],
    );
    assert!(
        !numeric.ok() && numeric.stderr.contains("score::float8"),
        "{}",
        numeric.stderr
    );
    let refused = plane.fleetctl(
        dir,
        &[
            "data",
            "import",
            "--postgres",
            "postgres://nobody@127.0.0.1:1/x",
            "--query",
            "SELECT 1",
        ],
    );
    assert!(
        !refused.ok()
            && refused
                .stderr
                .contains("connecting to postgres://nobody@127.0.0.1:1/x"),
        "{}",
        refused.stderr
    );
}
