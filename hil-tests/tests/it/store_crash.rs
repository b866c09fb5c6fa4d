//! Crash safety of activation: `kill -9` at random instants of `fleet-agent
//! install-bundle` never leaves the store serving a mix, or nothing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use hil_tests::{agent, bin, build_claims, keys_and_policy};

fn build_version(dir: &Path, version: u32) -> String {
    let out = format!("claims-v{version}.fmb");
    build_claims(dir, version, &out, &["--key", "keys/k.key"]);
    out
}

/// The active version per the store, after checking the stored bundle against the policy.
fn active_version(dir: &Path) -> u64 {
    let run = agent(
        dir,
        &[
            "models",
            "--data-dir",
            "data",
            "--trust",
            "trust.toml",
            "--json",
        ],
    );
    let list: serde_json::Value = serde_json::from_str(run.success()).expect("JSON");
    let models = list.as_array().expect("a list");
    assert_eq!(models.len(), 1, "{list}");
    assert_eq!(models[0]["integrity"], "verified", "{list}");
    models[0]["active"]["version"].as_u64().expect("version")
}

#[test]
fn agent_killed_at_random_points_of_activation_restarts_on_the_old_or_the_new_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let bundles = [build_version(dir, 1), build_version(dir, 2)];
    agent(
        dir,
        &[
            "install-bundle",
            &bundles[0],
            "--data-dir",
            "data",
            "--trust",
            "trust.toml",
        ],
    )
    .success();
    assert_eq!(active_version(dir), 1);

    // xorshift, seeded from the clock and printed, so a failing schedule can be replayed.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("kill schedule seed: {seed}");
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut expected = 1;
    let mut completed = 0;
    for round in 0..40 {
        let target = if expected == 1 { 2 } else { 1 };
        let mut child = Command::new(bin("fleet-agent"))
            .current_dir(dir)
            .args([
                "install-bundle",
                &bundles[target - 1],
                "--data-dir",
                "data",
                "--trust",
                "trust.toml",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent starts");
        // An install takes a few tens of milliseconds here; kill anywhere in it, or after.
        std::thread::sleep(Duration::from_micros(next() % 40_000));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().expect("agent exits");
        let active = active_version(dir);
        assert!(
            active == 1 || active == 2,
            "round {round}: active version {active}"
        );
        if status.success() {
            completed += 1;
            assert_eq!(
                active as usize, target,
                "round {round}: a completed install must be active"
            );
        }
        expected = active as usize;
    }
    eprintln!("{completed} of 40 installs completed before the kill");
    // The store still works normally afterwards.
    let target = if expected == 1 { 2 } else { 1 };
    agent(
        dir,
        &[
            "install-bundle",
            &bundles[target - 1],
            "--data-dir",
            "data",
            "--trust",
            "trust.toml",
        ],
    )
    .success();
    assert_eq!(active_version(dir) as usize, target);
    let stored = std::fs::read_dir(dir.join("data/store/bundles"))
        .expect("store")
        .count();
    assert!(
        stored <= 2,
        "{stored} bundles kept; only active and previous should remain"
    );
}
