//! On-device monitoring through the real agent: the example model's reference data
//! raises no alert, its drifted data raises alerts on exactly the shifted features, and
//! inputs that got no prediction are counted exactly, by reason.

use std::collections::BTreeSet;
use std::path::Path;

use hil_tests::{RunningAgent, build_claims, claims, install, keys_and_policy};
use serde_json::{Value, json};

/// Rows of a claims CSV as feature objects (numbers as numbers, the rest as strings;
/// columns not in the schema, such as the label, left out).
pub(crate) fn rows(file: &str) -> Vec<Value> {
    let schema: toml::Value =
        toml::from_str(&std::fs::read_to_string(claims("features.toml")).expect("schema"))
            .expect("toml");
    let kinds: Vec<(String, bool)> = schema["features"]
        .as_array()
        .expect("features")
        .iter()
        .map(|f| {
            (
                f["name"].as_str().expect("name").to_string(),
                f["type"].as_str() == Some("category"),
            )
        })
        .collect();
    let text = std::fs::read_to_string(claims(file)).expect("csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    lines
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            let mut row = serde_json::Map::new();
            for (name, categorical) in &kinds {
                let i = header.iter().position(|h| h == name).expect("column");
                let cell = cells[i];
                let v = if cell.is_empty() {
                    Value::Null
                } else if *categorical {
                    json!(cell)
                } else {
                    json!(cell.parse::<f64>().expect("number"))
                };
                row.insert(name.clone(), v);
            }
            Value::Object(row)
        })
        .collect()
}

fn start(dir: &Path, extra: &[&str]) -> RunningAgent {
    keys_and_policy(dir, "k");
    // The bundle carries its own thresholds; the agent's flags override what they set.
    std::fs::write(
        dir.join("monitoring.toml"),
        "drift_psi = 0.25\nwindow_predictions = 700\n",
    )
    .expect("write");
    build_claims(
        dir,
        1,
        "claims.fmb",
        &[
            "--reference",
            &claims("reference.csv"),
            // The calibration map for estimated accuracy, from rows the model was not
            // trained on.
            "--label-column",
            "investigate",
            "--labelled",
            &claims("holdout.csv"),
            "--monitoring",
            "monitoring.toml",
            "--key",
            "keys/k.key",
        ],
    );
    install(dir, "claims.fmb");
    RunningAgent::serve_store(dir, extra)
}

pub(crate) fn send(agent: &RunningAgent, rows: &[Value]) {
    for batch in rows.chunks(50) {
        let (status, reply) = agent.request(
            "POST",
            "/v1/models/claims/predict",
            &json!({ "features": batch }),
        );
        assert_eq!(status, 200, "{reply}");
    }
}

fn monitoring(agent: &RunningAgent) -> Value {
    let (status, view) = agent.request(
        "GET",
        "/v1/models/claims/monitoring?limit=100",
        &Value::Null,
    );
    assert_eq!(status, 200, "{view}");
    view
}

fn names(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|s| s.as_str().expect("name").to_string())
        .collect()
}

#[test]
fn reference_data_raises_no_alert_and_drifted_data_alerts_on_exactly_the_shifted_features() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let agent = start(
        tmp.path(),
        &["--window-predictions", "500", "--alert-windows", "3"],
    );
    let reference = rows("reference.csv");
    send(&agent, &reference);
    let view = monitoring(&agent);
    let windows = view["windows"].as_array().expect("windows");
    assert_eq!(windows.len(), 8, "4000 rows in windows of 500");
    for w in windows {
        assert!(w["events"].as_array().expect("events").is_empty(), "{w}");
        for f in w["features"].as_array().expect("features") {
            assert!(f["psi"].as_f64().expect("psi") < 0.05, "{f}");
        }
        // The numeric features together, and the accuracy estimated without labels
        // (the model's accuracy on rows it was not trained on is 0.795).
        assert_eq!(w["multivariate"]["name"], "reconstruction_error", "{w}");
        assert!(w["multivariate"]["psi"].as_f64().expect("psi") < 0.1, "{w}");
        let estimate = &w["estimated_accuracy"];
        let accuracy = estimate["accuracy"].as_f64().expect("estimated");
        assert!((0.75..0.86).contains(&accuracy), "{estimate}");
        assert_eq!(estimate["predictions"], 500);
        assert!(
            accuracy > estimate["limit"].as_f64().expect("limit"),
            "{estimate}"
        );
    }
    assert!(names(&view["alerts"]).is_empty(), "{}", view["alerts"]);

    // The drifted data: claim_amount ×1.8, channel online 30% → 70%, customer_age −12 y.
    // 1000 rows, sent twice: four windows of 500.
    let drifted = rows("drifted.csv");
    send(&agent, &drifted);
    send(&agent, &drifted);
    let view = monitoring(&agent);
    let windows = view["windows"].as_array().expect("windows");
    assert_eq!(windows.len(), 12);
    // Alerts need three windows past a threshold: the 11th window (3rd drifted) raises them.
    let raised: BTreeSet<String> = windows[8..]
        .iter()
        .flat_map(|w| w["events"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["transition"] == "raised")
        .map(|e| e["subject"].as_str().expect("subject").to_string())
        .collect();
    // Beside the features: the reconstruction error (the numeric features together) and
    // the estimated accuracy, which falls as the claims shift.
    let not_features = ["prediction", "reconstruction_error", "estimated_accuracy"];
    let features: BTreeSet<String> = raised
        .iter()
        .filter(|s| !not_features.contains(&s.as_str()))
        .cloned()
        .collect();
    assert!(
        raised.contains("reconstruction_error") && raised.contains("estimated_accuracy"),
        "events: {raised:?}"
    );
    for w in &windows[8..] {
        let estimate = &w["estimated_accuracy"];
        assert!(
            estimate["accuracy"].as_f64().expect("estimated")
                < estimate["limit"].as_f64().expect("limit"),
            "{estimate}"
        );
    }
    let shifted: BTreeSet<String> = ["channel", "claim_amount", "customer_age"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(features, shifted, "events: {raised:?}");
    // Each raised alert says what moved: channel's `online` share went from 30 % to 70 %.
    let channel = windows[8..]
        .iter()
        .flat_map(|w| w["events"].as_array().cloned().unwrap_or_default())
        .find(|e| e["subject"] == "channel" && e["transition"] == "raised")
        .expect("channel raised");
    let top = &channel["moved"][0];
    assert_eq!(top["bin"], "online", "{channel}");
    assert!(
        top["current"].as_f64().expect("current") > 0.6
            && top["reference"].as_f64().expect("reference") < 0.4,
        "{channel}"
    );
    assert_eq!(
        names(&windows[10]["alerts"])
            .into_iter()
            .filter(|s| !not_features.contains(&s.as_str()))
            .collect::<BTreeSet<_>>(),
        shifted,
        "alerting after the third drifted window"
    );
    let first_raise = windows
        .iter()
        .position(|w| !w["events"].as_array().expect("events").is_empty())
        .expect("a window raised alerts");
    assert_eq!(
        first_raise, 10,
        "the third drifted window raises the alerts"
    );
    println!(
        "prediction drift alert: {}; last window: {}",
        raised.contains("prediction"),
        windows[11]
    );
}

#[test]
fn inputs_without_a_prediction_are_counted_exactly_by_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // One worker and no queue, so concurrent requests are shed.
    let agent = start(
        tmp.path(),
        &[
            "--window-seconds",
            "2",
            "--window-predictions",
            "100000",
            "--workers",
            "1",
            "--queue",
            "0",
        ],
    );
    let reference = rows("reference.csv");

    // Declared: five claims must be scored within a second; three will be.
    let (status, reply) = agent.request(
        "POST",
        "/v1/expect",
        &json!({"model": "claims", "ids": ["c1", "c2", "c3", "c4", "c5"], "within_seconds": 1}),
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["outstanding"], 5);
    let (status, reply) = agent.request(
        "POST",
        "/v1/models/claims/predict",
        &json!({"features": &reference[0..3], "ids": ["c1", "c3", "c5"]}),
    );
    assert_eq!(status, 200, "{reply}");
    // 7 valid rows more, 4 invalid requests (missing feature, wrong type, unknown
    // category, out of range).
    send(&agent, &reference[3..10]);
    let mut bad = Vec::new();
    for (field, value) in [
        ("claim_amount", Value::Null),
        ("claim_amount", json!("a lot")),
        ("channel", json!("carrier pigeon")),
        ("customer_age", json!(7)),
    ] {
        let mut row = reference[0].clone();
        row[field] = value;
        bad.push(row);
    }
    for row in &bad {
        let (status, reply) = agent.request(
            "POST",
            "/v1/models/claims/predict",
            &json!({ "features": row }),
        );
        assert_eq!(status, 422, "{reply}");
    }
    // Four clients at once, batches of 1000 rows: what the single worker cannot take is
    // shed (503), and every row of a shed batch is a missed input.
    let body = json!({ "features": reference[..1000].to_vec() }).to_string();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (addr, body) = (agent.addr.clone(), body.clone());
            std::thread::spawn(move || {
                let stream = std::net::TcpStream::connect(&addr).expect("connects");
                let mut client = hil_tests::KeepAlive::new(stream);
                let (mut ok, mut shed) = (0u64, 0u64);
                for _ in 0..12 {
                    let (status, _) = client
                        .request(
                            "POST",
                            "/v1/models/claims/predict",
                            "application/json",
                            body.as_bytes(),
                        )
                        .expect("HTTP");
                    match status {
                        200 => ok += 1000,
                        503 => shed += 1000,
                        other => panic!("unexpected status {other}"),
                    }
                }
                (ok, shed)
            })
        })
        .collect();
    let (mut ok_rows, mut shed_rows) = (0u64, 0u64);
    for c in clients {
        let (ok, shed) = c.join().expect("client");
        ok_rows += ok;
        shed_rows += shed;
    }
    assert!(
        shed_rows > 0,
        "no request was shed; the test needs concurrency"
    );

    // Wait for the deadline and the window to pass.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let (mut predictions, mut missed, mut ids) = (0u64, json!({}), Vec::new());
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let view = monitoring(&agent);
        let windows = view["windows"].as_array().expect("windows").clone();
        predictions = windows
            .iter()
            .map(|w| w["predictions"].as_u64().unwrap_or(0))
            .sum();
        let mut totals = serde_json::Map::new();
        for w in &windows {
            for (reason, n) in w["missed"].as_object().expect("missed") {
                let sum = totals.get(reason).and_then(Value::as_u64).unwrap_or(0)
                    + n.as_u64().unwrap_or(0);
                totals.insert(reason.clone(), json!(sum));
            }
        }
        missed = Value::Object(totals);
        ids = windows
            .iter()
            .flat_map(|w| w["missing_ids"].as_array().cloned().unwrap_or_default())
            .collect();
        if missed["expected_not_predicted"].as_u64() == Some(2) && predictions == 10 + ok_rows {
            break;
        }
    }
    assert_eq!(predictions, 10 + ok_rows);
    assert_eq!(missed["invalid_input"], 4, "{missed}");
    assert_eq!(missed["expected_not_predicted"], 2, "{missed}");
    assert_eq!(missed["shed"], shed_rows, "{missed}");
    assert_eq!(missed["backend_error"], 0, "{missed}");
    assert_eq!(ids, vec![json!("c2"), json!("c4")]);

    // The rejected values count too: one unknown channel, one age out of range.
    let view = monitoring(&agent);
    let rate = |name: &str, key: &str| -> f64 {
        view["windows"]
            .as_array()
            .expect("windows")
            .iter()
            .flat_map(|w| w["features"].as_array().cloned().unwrap_or_default())
            .filter(|f| f["name"] == name)
            .map(|f| f[key].as_f64().unwrap_or(0.0))
            .sum()
    };
    assert!(rate("channel", "unseen_rate") > 0.0);
    assert!(rate("customer_age", "out_of_range_rate") > 0.0);
    assert_eq!(rate("region", "unseen_rate"), 0.0);
}

#[test]
fn predictions_explain_themselves_by_occlusion() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let agent = start(tmp.path(), &["--drift-js", "0.15"]);
    let view = monitoring(&agent);
    assert_eq!(view["thresholds"]["psi"], 0.25, "from the bundle: {view}");
    assert_eq!(view["thresholds"]["js"], 0.15, "from the agent's flag");
    // Set explicitly, PSI and JS hold for every feature; chi-square p gives way to the
    // thresholds the builder calibrated, which the view shows per feature and size.
    assert_eq!(
        view["fixed"],
        serde_json::json!({"psi": true, "js": true, "chi2_p": false}),
        "{view}"
    );
    let sizes = view["calibration"]["sizes"]
        .as_array()
        .expect("calibrated sizes");
    assert!(sizes.contains(&serde_json::json!(100)), "{sizes:?}");
    assert_eq!(view["calibration"]["false_alarm_rate"], 0.01);
    assert_eq!(
        view["window_config"]["max_predictions"], 700,
        "from the bundle"
    );
    let reference = rows("reference.csv");
    let (status, reply) = agent.request(
        "POST",
        "/v1/models/claims/predict",
        &json!({"features": reference[0], "explain": true}),
    );
    assert_eq!(status, 200, "{reply}");
    let explanation = reply["predictions"][0]["explanation"]
        .as_object()
        .expect("an explanation");
    assert_eq!(explanation.len(), 15, "one attribution per feature");
    assert!(
        reply["explanation_method"]
            .as_str()
            .expect("method")
            .starts_with("occlusion")
    );
    // Attributions are differences of the predicted class's probability.
    assert!(
        explanation
            .values()
            .all(|v| v.as_f64().is_some_and(|a| a.abs() <= 1.0))
    );
    assert!(
        explanation
            .values()
            .any(|v| v.as_f64().is_some_and(|a| a.abs() > 1e-6))
    );
    let (status, reply) = agent.request(
        "POST",
        "/v1/models/claims/predict",
        &json!({"inputs": [{"name": "input", "shape": [1, 25], "data": vec![0.0; 25]}], "explain": true}),
    );
    assert_eq!(status, 422, "{reply}");
    assert_eq!(reply["field"], "explain");
}
