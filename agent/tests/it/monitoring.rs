//! The monitoring wrapper on simulated time: windows close by count or by time, and
//! expected ids not predicted by their deadline become missing predictions, with the
//! clock passed in by the caller.

use fleet_agent::monitoring::ModelMonitor;
use fleetml_monitor::{Thresholds, WindowConfig};
use fleetml_protocol::features::{FeatureSchema, RawValue};
use fleetml_protocol::reference::ReferenceProfile;
use serde_json::Value;

const S: u64 = 1_000;

fn monitor() -> ModelMonitor {
    let schema = FeatureSchema::from_toml(
        r#"
[[features]]
name = "amount"
type = "float"
min = 0.0
max = 1000.0
input = "input"
column = 0
"#,
    )
    .expect("schema");
    let rows: Vec<Vec<RawValue>> = (0..200)
        .map(|i| vec![RawValue::Number(f64::from(i % 100))])
        .collect();
    let outputs = vec![(
        "score".to_string(),
        1,
        (0..200).map(|i| (i % 10) as f32 / 10.0).collect(),
    )];
    let profile = ReferenceProfile::compute(&schema, &rows, &outputs, 4).expect("profile");
    ModelMonitor::new(
        "m",
        1,
        &schema,
        &profile,
        WindowConfig {
            max_predictions: 5,
            max_duration_ms: 60 * S,
        },
        Thresholds::default(),
        None,
    )
    .expect("monitor")
}

fn predict(m: &ModelMonitor, now: u64, ids: &[&str]) {
    let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    m.predicted(
        now,
        &[vec![RawValue::Number(42.0)]],
        &[vec![0.5]],
        100,
        None,
        &ids,
    );
}

fn windows(m: &ModelMonitor) -> Vec<Value> {
    m.view(10)["windows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// (time, what happens, windows closed after it): a transcript a reader can follow.
#[test]
fn windows_close_by_count_and_time_and_late_ids_go_missing_on_simulated_time() {
    let m = monitor();
    m.expect(&["a".into(), "b".into()], 10 * S).expect("expect");
    predict(&m, 0, &["a"]);
    predict(&m, S, &[]);
    m.tick(10 * S - 1);
    assert_eq!(m.view(10)["expected_outstanding"], 1, "b is not late yet");
    assert!(windows(&m).is_empty());
    m.tick(10 * S);
    assert_eq!(m.view(10)["expected_outstanding"], 0, "b is late now");
    assert!(windows(&m).is_empty(), "the window is still open");
    // 60 s after the window opened it closes, with b as a missing prediction.
    m.tick(60 * S - 1);
    assert!(windows(&m).is_empty());
    m.tick(60 * S);
    let w = windows(&m);
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0]["predictions"], 2, "{}", w[0]);
    assert_eq!(w[0]["missing_ids"], serde_json::json!(["b"]), "{}", w[0]);
    assert_eq!(w[0]["start_ms"], 0, "{}", w[0]);
    // Five predictions close the next window at once, whatever the time.
    for i in 0..5 {
        predict(&m, 61 * S + i, &[]);
    }
    let w = windows(&m);
    assert_eq!(w.len(), 2, "{w:?}");
    assert_eq!(w[1]["predictions"], 5, "{}", w[1]);
    assert!(
        w[1]["missing_ids"].as_array().is_none_or(Vec::is_empty),
        "{}",
        w[1]
    );
    // A flush closes what is open at the time it is given.
    predict(&m, 70 * S, &[]);
    m.flush(71 * S);
    let w = windows(&m);
    assert_eq!(w.len(), 3, "{w:?}");
    assert_eq!(w[2]["end_ms"], 71 * S, "{}", w[2]);
}
