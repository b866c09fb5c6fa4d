//! The trainer is deterministic: the committed artifacts are reproduced bit for bit.

use fleetml_claims::{Run, run};

fn committed(name: &str) -> Vec<u8> {
    std::fs::read(manifest_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn committed_artifacts_are_reproduced_bit_for_bit() {
    let artifacts = run(&Run::default());
    for (name, bytes) in &artifacts.files {
        let on_disk = committed(name);
        if *name == "lineage.toml" {
            // The lockfile digest records the workspace at training time; everything else
            // in the lineage must be reproduced exactly.
            let strip = |b: &[u8]| {
                String::from_utf8_lossy(b)
                    .lines()
                    .filter(|l| !l.starts_with("dependencies_lock_sha256"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(strip(bytes), strip(&on_disk), "lineage.toml differs");
        } else {
            assert!(
                *bytes == on_disk,
                "{name} differs from the committed file; see models/README.md"
            );
        }
    }
    assert!(
        artifacts.holdout_auc > 0.7,
        "holdout AUC {}",
        artifacts.holdout_auc
    );
}

#[test]
fn the_seed_changes_the_model_and_nothing_else_does() {
    let small = |seed| Run {
        seed,
        rows: 600,
        holdout: 100,
        drifted: 100,
        ..Run::default()
    };
    let model = |r: &Run| {
        run(r)
            .files
            .into_iter()
            .find(|(n, _)| *n == "model.onnx")
            .map(|(_, b)| b)
    };
    let a = model(&small(1));
    assert_eq!(a, model(&small(1)));
    assert_ne!(a, model(&small(2)));
}

#[test]
fn drifted_data_shows_the_documented_shift() {
    let a = run(&Run::default());
    let csv = |name: &str| -> Vec<Vec<String>> {
        let bytes = &a.files.iter().find(|(n, _)| *n == name).expect("file").1;
        let mut r = csv::Reader::from_reader(&bytes[..]);
        r.records()
            .map(|rec| rec.expect("row").iter().map(str::to_string).collect())
            .collect()
    };
    let mean = |rows: &[Vec<String>], col: usize| {
        rows.iter()
            .filter_map(|r| r[col].parse::<f64>().ok())
            .sum::<f64>()
            / rows.len() as f64
    };
    let share = |rows: &[Vec<String>], col: usize, v: &str| {
        rows.iter().filter(|r| r[col] == v).count() as f64 / rows.len() as f64
    };
    let (reference, drifted) = (csv("reference.csv"), csv("drifted.csv"));
    assert!(
        mean(&drifted, 0) > 1.5 * mean(&reference, 0),
        "claim_amount inflated"
    );
    assert!(
        mean(&drifted, 2) < mean(&reference, 2) - 8.0,
        "customer_age younger"
    );
    assert!(
        share(&drifted, 12, "online") > 0.6 && share(&reference, 12, "online") < 0.4,
        "channel online"
    );
    assert!(
        (mean(&drifted, 1) - mean(&reference, 1)).abs() < 10.0,
        "policy_tenure_months unchanged"
    );
}

/// This package's directory: the one cargo names when it runs the tests (the path
/// compiled in may be another checkout's that shares the target directory and built
/// this binary first), else the compiled-in one.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        std::path::PathBuf::from,
    )
}
