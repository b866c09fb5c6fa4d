//! The multivariate monitor and the accuracy estimate, held to their promises: a change
//! in correlation alone is caught by the reconstruction error and by no single feature;
//! the accuracy estimated from confidence alone tracks the realised accuracy on shifted
//! claims streams whose labels are known.

use fleet_control::{calibrate, multivariate, performance};
use fleetml_claims::data::{Generator, Shift};
use fleetml_monitor::profile::observations;
use fleetml_monitor::{Monitor, Subject, Thresholds, Transition, WindowConfig};
use fleetml_protocol::features::{FeatureSchema, RawValue};
use fleetml_protocol::reference::{ReferenceProfile, argmax};

use crate::claims;

/// Four numeric features: `a` and `b` correlated (ρ = `rho`), `c` and `d` independent;
/// every marginal standard normal whatever `rho`.
fn correlated(n: usize, rho: f64, seed: u64) -> Vec<Vec<RawValue>> {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut normal = move || {
        let (u, v) = (uniform().max(1e-300), uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    };
    (0..n)
        .map(|_| {
            let a = normal();
            let b = rho * a + (1.0 - rho * rho).sqrt() * normal();
            [a, b, normal(), normal()]
                .into_iter()
                .map(RawValue::Number)
                .collect()
        })
        .collect()
}

fn four_features() -> FeatureSchema {
    let mut toml = String::new();
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        toml.push_str(&format!(
            "[[features]]\nname = \"{name}\"\ntype = \"float\"\ninput = \"x\"\ncolumn = {i}\n\n"
        ));
    }
    FeatureSchema::from_toml(&toml).expect("schema")
}

/// The profile the builder makes: features, the multivariate reference, calibration.
fn built(schema: &FeatureSchema, rows: &[Vec<RawValue>]) -> ReferenceProfile {
    let mut profile = ReferenceProfile::compute(schema, rows, &[], 10).expect("profile");
    profile.multivariate = multivariate::fit(schema, rows, 10);
    profile.calibration = Some(
        calibrate::calibrate(
            profile_ref(&profile),
            schema,
            rows,
            &[],
            &Default::default(),
        )
        .expect("calibration"),
    );
    ReferenceProfile::from_cbor(&profile.to_cbor()).expect("a valid profile")
}

fn profile_ref(p: &ReferenceProfile) -> &ReferenceProfile {
    p
}

#[test]
fn a_flipped_correlation_is_caught_by_the_reconstruction_error_and_by_no_single_feature() {
    let schema = four_features();
    let reference = correlated(4_000, 0.8, 1);
    let profile = built(&schema, &reference);
    let m = profile.multivariate.as_ref().expect("fitted");
    // a+b and one independent direction explain 70 %; a−b is among the dropped ones.
    assert_eq!(m.components.len(), 2, "{m:?}");
    let windows = 20;
    let size = 500u32;
    for (rho, seed) in [(0.8, 2), (-0.8, 3)] {
        let stream = correlated(windows * size as usize, rho, seed);
        // The default alert policy: three windows in a row past a threshold.
        let mut monitor = crate::monitor(&schema, &profile, size, 3);
        let mut raised: Vec<Subject> = Vec::new();
        for row in &stream {
            if let Some(r) = monitor.observe(0, &observations(&schema, row), None, 1, None) {
                raised.extend(
                    r.events
                        .iter()
                        .filter(|e| e.transition == Transition::Raised)
                        .map(|e| e.subject),
                );
            }
        }
        println!("ρ = {rho}: alerts raised over {windows} windows of {size}: {raised:?}");
        if rho < 0.0 {
            assert_eq!(
                raised,
                vec![Subject::Multivariate],
                "ρ flipped: the reconstruction error alerts, no feature does (their marginals did not move)"
            );
        } else {
            assert!(raised.is_empty(), "ρ kept: no alert, not {raised:?}");
        }
    }
}

/// Labels (investigate = class 1) and the claims model's class scores.
fn scored(claims_rows: &[fleetml_claims::data::Claim]) -> (Vec<usize>, Vec<f32>) {
    let rows: Vec<Vec<RawValue>> = claims_rows.iter().map(|c| c.values.clone()).collect();
    let labels = claims_rows
        .iter()
        .map(|c| usize::from(c.investigate))
        .collect();
    (labels, run_model(&rows))
}

fn claims_schema() -> FeatureSchema {
    FeatureSchema::from_toml(&std::fs::read_to_string(claims("features.toml")).expect("schema"))
        .expect("schema")
}

fn run_model(rows: &[Vec<RawValue>]) -> Vec<f32> {
    let schema = claims_schema();
    let bytes = std::fs::read(claims("model.onnx")).expect("model");
    let files = Default::default();
    let model = fleet_control::onnx::OnnxModel::load(
        fleetml_inference::Onnx {
            model: &bytes,
            external: &files,
        },
        &[],
    )
    .expect("load");
    let out = model
        .run(&schema.encode_batch(&model.inputs, rows))
        .expect("run");
    out[0].data.to_f32()
}

#[test]
fn estimated_accuracy_tracks_the_realised_accuracy_on_shifted_streams() {
    // The map, from labelled rows the model was not trained on: a fresh undrifted
    // stream of 10,000 (1,000 per confidence bin).
    let (labels, scores) = scored(&Generator::new(42, 4).claims(10_000, &Shift::NONE));
    let map = performance::fit(
        "investigate",
        2,
        &scores,
        &labels,
        &Default::default(),
        &[100, 250, 1000],
    )
    .expect("map");
    println!("map: {map:?}");
    let cbpe = fleetml_monitor::profile::performance(&map).expect("cbpe");
    // Fresh streams from the claims generator (streams 1–3 made the committed files),
    // each with the tolerance the estimate is held to and whether its windows of 1,000
    // alert. The method assumes the relation between confidence and correctness holds.
    // It does undrifted and for younger holders; where claim amounts inflate, the label
    // (amounts large for their claim type) turns more often than the model's confidence
    // says, and the estimate catches about half of the drop (docs/MONITORING.md).
    let shifts = [
        ("none", Shift::NONE, 0.02, Some(false)),
        (
            "70 % online",
            Shift {
                online_share: 0.7,
                ..Shift::NONE
            },
            0.03,
            None,
        ),
        (
            "holders 12 years younger",
            Shift {
                age_offset: -12.0,
                ..Shift::NONE
            },
            0.02,
            Some(true),
        ),
        (
            "claims inflation ×1.8",
            Shift {
                amount_factor: 1.8,
                ..Shift::NONE
            },
            0.05,
            Some(true),
        ),
        ("drifted.csv's shift", Shift::DRIFTED, 0.06, Some(true)),
        (
            "inflation ×3, 90 % online, 20 years younger",
            Shift {
                amount_factor: 3.0,
                online_share: 0.9,
                age_offset: -20.0,
            },
            0.1,
            Some(true),
        ),
    ];
    let n = 5_000;
    for (k, (what, shift, tolerance, alerts)) in shifts.iter().enumerate() {
        let (labels, scores) = scored(&Generator::new(42, 10 + k as u64).claims(n, shift));
        // Windows of 1,000, alerting after one window below the calibrated limit.
        let mut monitor = Monitor::new(
            &[],
            None,
            WindowConfig {
                max_predictions: 1_000,
                max_duration_ms: u64::MAX,
            },
            Thresholds {
                windows: 1,
                ..Thresholds::default()
            },
        )
        .expect("monitor")
        .with_performance(cbpe.clone());
        let (mut estimated, mut below) = (0.0, 0);
        let mut right = 0usize;
        for (r, row) in scores.chunks_exact(2).enumerate() {
            right += usize::from(argmax(row) == Some(labels[r]));
            monitor.confidence(fleetml_monitor::profile::confidence(row).expect("scores"));
            if let Some(report) = monitor.observe(0, &[], None, 1, None) {
                let e = report.estimated_accuracy.expect("estimated");
                estimated += e.accuracy / 5.0;
                below += u32::from(e.alerting);
            }
        }
        let realised = right as f64 / n as f64;
        println!(
            "{what}: estimated {estimated:.3}, realised {realised:.3}, {below} of 5 windows alerting"
        );
        assert!(
            (estimated - realised).abs() <= *tolerance,
            "{what}: estimated {estimated:.3}, realised {realised:.3} (tolerance {tolerance})"
        );
        match alerts {
            Some(true) => assert_eq!(
                below, 5,
                "{what}: realised accuracy {realised:.3} is down; every window alerts"
            ),
            Some(false) => assert_eq!(
                below, 0,
                "{what}: realised accuracy {realised:.3}; no alert"
            ),
            None => {}
        }
    }
}
