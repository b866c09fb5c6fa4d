//! `fleetctl demo --exit`: the whole loop, narrated, with real processes.

use hil_tests::{bin, fleetctl};

#[test]
fn fleetctl_demo_runs_the_whole_loop_and_narrates_each_milestone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The demo finds fleet-agent and claims-fit next to fleetctl; bin() built them.
    let _ = (bin("fleet-agent"), bin("claims-fit"));
    let run = fleetctl(
        tmp.path(),
        &[
            "demo",
            "--exit",
            "--dir",
            &tmp.path().join("demo").display().to_string(),
        ],
    );
    let out = run.success();
    for milestone in [
        "$ fleetctl keys generate",
        "$ fleetctl serve --self-signed --data-dir plane",
        "$ fleetctl bundle build",
        "$ fleetctl models push claims-v1.fmb",
        "$ fleetctl devices enroll pi-lab-1 --board raspberry-pi-4",
        "$ fleet-agent run --config jetson-field-3.toml",
        "rollout r1: completed",
        "ALERT",
        "drift policy of claims",
        "candidate claims@v2 — lineage recorded by the job",
        "claims@v2 wins on auc",
        "by policy:claims",
        "$ fleetctl rollback claims --to 1 --yes",
        "rollback r4 started",
        "promote.canary",
        "Explore: export FLEETML_SERVER=https://127.0.0.1:",
    ] {
        assert!(
            out.contains(milestone),
            "the demo did not narrate `{milestone}`:\n{out}"
        );
    }
    // Every step is stamped with the time since the start.
    assert!(
        out.lines()
            .filter(|l| l.starts_with('[') && l.contains("s] "))
            .count()
            >= 10,
        "{out}"
    );
}
