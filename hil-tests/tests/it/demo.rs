//! The README's main command runs end to end.

use std::process::Command;

use hil_tests::{Run, root, scrub_cargo_env, target_dir};

#[test]
fn readme_demo_builds_signs_verifies_and_self_tests_the_example_bundle() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new("bash");
    scrub_cargo_env(&mut cmd);
    let run: Run = cmd
        .arg(root().join("scripts/demo.sh"))
        .arg(tmp.path().join("demo"))
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .expect("demo runs")
        .into();
    let out = run.success();
    for expected in [
        "built claims v1",
        "signed claims-v1.fmb",
        "verified claims v1 (demo)",
        "seed             42",
        "golden self-test passed",
    ] {
        assert!(
            out.contains(expected),
            "demo output lacks `{expected}`:\n{out}"
        );
    }
    assert!(tmp.path().join("demo/claims-v1.fmb").is_file());
}
