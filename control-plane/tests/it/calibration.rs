//! Drift thresholds calibrated to the window size, held to their promise: on fresh
//! undrifted windows of claims (the generator that made the reference, another stream)
//! the observed false-alarm rate is within the binomial bound of the target, and on
//! `drifted.csv` exactly the documented shifted features alert.

use fleet_control::calibrate;
use fleetml_monitor::profile::observations;
use fleetml_protocol::features::{FeatureSchema, RawValue};
use fleetml_protocol::reference::ReferenceProfile;

use crate::claims;

fn schema() -> FeatureSchema {
    FeatureSchema::from_toml(&std::fs::read_to_string(claims("features.toml")).expect("schema"))
        .expect("schema")
}

fn rows(schema: &FeatureSchema, file: &str) -> Vec<Vec<RawValue>> {
    fleet_control::bundle::read_csv(&claims(file), schema, None).expect("rows")
}

/// The claims reference profile with calibrated thresholds for windows of 100, 250 and
/// 1,000 rows at a 1 % false-alarm rate.
fn calibrated(schema: &FeatureSchema, reference: &[Vec<RawValue>]) -> ReferenceProfile {
    let mut profile = ReferenceProfile::compute(schema, reference, &[], 10).expect("profile");
    profile.multivariate = fleet_control::multivariate::fit(schema, reference, 10);
    profile.calibration = Some(
        calibrate::calibrate(
            &profile,
            schema,
            reference,
            &[],
            &calibrate::Options::default(),
        )
        .expect("calibration"),
    );
    // What the agent reads back is checked on the way in.
    ReferenceProfile::from_cbor(&profile.to_cbor()).expect("a valid profile")
}

#[test]
fn undrifted_windows_false_alarm_at_the_target_rate_and_drifted_ones_alert_on_the_shifted_features()
{
    let schema = schema();
    // A reference of 20,000 claims (20 times the largest window: see MONITORING.md for
    // what a smaller one does to single features), and fresh undrifted windows from the
    // same population, which differ from the reference by its own sampling error too
    // (the calibration resamples fewer rows than the window to cover it).
    let undrifted = fleetml_claims::data::Shift::NONE;
    let reference: Vec<Vec<RawValue>> = fleetml_claims::data::Generator::new(42, 21)
        .claims(20_000, &undrifted)
        .into_iter()
        .map(|c| c.values)
        .collect();
    let profile = calibrated(&schema, &reference);
    let features = schema.features.len();
    let mut fresh = fleetml_claims::data::Generator::new(42, 20);
    let windows = 1_000u32;
    let alpha = calibrate::DEFAULT_FALSE_ALARM_RATE;
    for size in calibrate::DEFAULT_SIZES {
        let mut m = crate::monitor(&schema, &profile, size, 1);
        let mut past = 0u32;
        let mut per = vec![0u32; features + 1];
        for _ in 0..windows {
            let mut report = None;
            for _ in 0..size {
                let row = fresh.claim(&undrifted).values;
                report = m.observe(0, &observations(&schema, &row), None, 1, None);
            }
            let report = report.expect("the window closed");
            // With alerts after one window, `drifting` is "past a threshold in this one".
            // The reconstruction error is one more subject with its own thresholds.
            past += report.features.iter().filter(|f| f.drifting).count() as u32;
            for (k, f) in report.features.iter().enumerate() {
                per[k] += u32::from(f.drifting);
            }
            let multivariate = report.multivariate.expect("reported").drifting;
            past += u32::from(multivariate);
            per[features] += u32::from(multivariate);
        }
        let trials = f64::from(windows) * (features + 1) as f64;
        let expected = alpha * trials;
        let sd = (trials * alpha * (1.0 - alpha)).sqrt();
        let observed = f64::from(past);
        println!(
            "windows of {size}: {past} of {trials} window-features past (target {expected:.0}); per subject {per:?}"
        );
        // 99.9 % two-sided binomial bound (normal approximation, 3.3 σ).
        assert!(
            (observed - expected).abs() <= 3.3 * sd,
            "windows of {size}: {past} false alarms in {trials} window-features, expected {expected:.0} ± {:.0}",
            3.3 * sd
        );
    }
    // drifted.csv against the committed reference (the bundles' own): one window of its
    // 1,000 rows; then four of 250, alerting after three.
    let profile = calibrated(&schema, &rows(&schema, "reference.csv"));
    let drifted = rows(&schema, "drifted.csv");
    let shifted = ["claim_amount", "customer_age", "channel"];
    for (size, k) in [(1_000u32, 1u8), (250, 3)] {
        let mut m = crate::monitor(&schema, &profile, size, k);
        let mut last = None;
        for row in &drifted {
            if let Some(r) = m.observe(0, &observations(&schema, row), None, 1, None) {
                last = Some(r);
            }
        }
        let last = last.expect("windows closed");
        let alerting: Vec<&str> = schema
            .features
            .iter()
            .zip(&last.features)
            .filter(|(_, f)| f.drifting)
            .map(|(s, _)| s.name.as_str())
            .collect();
        assert_eq!(alerting, shifted, "windows of {size}");
        // Shifted means move rows off the reference's principal components too (seen in
        // the window of 1,000; not three windows in a row of 250).
        if size == 1_000 {
            assert!(
                last.multivariate.expect("reported").drifting,
                "the reconstruction error alerts as well"
            );
        }
    }
}
