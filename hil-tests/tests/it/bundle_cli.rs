//! The operator's bundle flow through the real CLIs: keys, trust policy, build, sign,
//! verify, inspect, and the agent's verify-bundle with its golden self-test.

use std::path::Path;

use fleetml_protocol::bundle::{self, Limits};
use fleetml_protocol::crypto::sha256;
use hil_tests::{agent, build_claims, claims, fleetctl};

/// Keys `a` and `b`, a 1-of-2 policy `trust.toml` and a 2-of-2 policy `trust2.toml`.
fn setup(dir: &Path) {
    fleetctl(dir, &["keys", "generate", "--out", "keys", "--name", "a"]).success();
    fleetctl(dir, &["keys", "generate", "--out", "keys", "--name", "b"]).success();
    fleetctl(
        dir,
        &[
            "keys",
            "trust-policy",
            "--public",
            "keys/a.pub",
            "--public",
            "keys/b.pub",
            "--threshold",
            "1",
            "--out",
            "trust.toml",
        ],
    )
    .success();
    fleetctl(
        dir,
        &[
            "keys",
            "trust-policy",
            "--public",
            "keys/a.pub",
            "--public",
            "keys/b.pub",
            "--threshold",
            "2",
            "--out",
            "trust2.toml",
        ],
    )
    .success();
}

/// Keys, a trust policy and `claims.fmb` built and signed with key `a`.
fn signed_claims(dir: &Path) {
    setup(dir);
    build(dir, "claims.fmb");
    fleetctl(
        dir,
        &["bundle", "sign", "claims.fmb", "--key", "keys/a.key"],
    )
    .success();
}

fn build(dir: &Path, out: &str) {
    let (reference, lineage) = (claims("reference.csv"), claims("lineage.toml"));
    let run = build_claims(
        dir,
        1,
        out,
        &[
            "--label",
            "q4",
            "--reference",
            &reference,
            "--lineage",
            &lineage,
        ],
    );
    assert!(run.stdout.contains("built claims v1"), "{}", run.stdout);
}

#[test]
fn operator_builds_signs_and_verifies_a_bundle_and_the_agent_self_tests_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    setup(dir);
    build(dir, "claims.fmb");

    let unsigned = fleetctl(
        dir,
        &["bundle", "verify", "claims.fmb", "--trust", "trust.toml"],
    );
    assert_eq!(
        unsigned.failure(),
        "error: claims.fmb failed verification: bundle is not signed"
    );

    assert!(
        fleetctl(
            dir,
            &["bundle", "sign", "claims.fmb", "--key", "keys/a.key"]
        )
        .success()
        .contains("signed")
    );
    let once = std::fs::read(dir.join("claims.fmb")).expect("bundle");
    let again = fleetctl(
        dir,
        &["bundle", "sign", "claims.fmb", "--key", "keys/a.key"],
    );
    assert!(again.success().contains("already signed"));
    assert_eq!(
        std::fs::read(dir.join("claims.fmb")).expect("bundle"),
        once,
        "signing twice is idempotent"
    );

    let ok = fleetctl(
        dir,
        &["bundle", "verify", "claims.fmb", "--trust", "trust.toml"],
    );
    let line = ok.success();
    assert_eq!(line.lines().count(), 1);
    assert!(
        line.starts_with("verified claims v1 (q4): 3 payloads"),
        "{line}"
    );

    let below = fleetctl(
        dir,
        &["bundle", "verify", "claims.fmb", "--trust", "trust2.toml"],
    );
    assert!(
        below
            .failure()
            .ends_with("only 1 valid signature(s) by trusted keys; the trust policy requires 2"),
        "{}",
        below.stderr
    );
    fleetctl(
        dir,
        &["bundle", "sign", "claims.fmb", "--key", "keys/b.key"],
    )
    .success();
    fleetctl(
        dir,
        &["bundle", "verify", "claims.fmb", "--trust", "trust2.toml"],
    )
    .success();

    let inspect = fleetctl(dir, &["bundle", "inspect", "claims.fmb"]);
    let text = inspect.success();
    for expected in [
        "Bundle        claims v1 (q4)",
        "input: f32[N, 25]",
        "police_report",
        "seed             42",
        "dataset          models/claims/reference.csv (sha256 ",
        "framework        fleetml-claims 0.1.0",
        "hyperparameters  batch_size=32",
        "container        unknown",
    ] {
        assert!(
            text.contains(expected),
            "inspect lacks `{expected}`:\n{text}"
        );
    }
    let json: serde_json::Value = serde_json::from_str(
        fleetctl(dir, &["bundle", "inspect", "claims.fmb", "--json"]).success(),
    )
    .expect("JSON");
    assert_eq!(json["manifest"]["lineage"]["seed"], 42);
    assert_eq!(json["manifest"]["entries"][0]["name"], "model.onnx");
    assert_eq!(
        json["manifest"]["entries"][0]["sha256"]
            .as_str()
            .map(str::len),
        Some(64)
    );
    assert_eq!(json["signatures"].as_array().map(Vec::len), Some(2));

    let agent_run = agent(
        dir,
        &["verify-bundle", "claims.fmb", "--trust", "trust2.toml"],
    );
    let out = agent_run.success();
    assert!(out.contains("verified claims v1"), "{out}");
    assert!(
        out.contains("golden self-test passed: 16 rows, max abs error"),
        "{out}"
    );
}

#[test]
fn tampered_or_untrusted_bundles_are_rejected_by_fleetctl_and_the_agent_with_the_cause() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    signed_claims(dir);
    let good = std::fs::read(dir.join("claims.fmb")).expect("bundle");
    let front = bundle::read_unverified(&good[..], &Limits::default()).expect("front");
    let model_at = front.payload_offset() as usize;

    let mut flipped = good.clone();
    flipped[model_at + 100] ^= 0x01;
    std::fs::write(dir.join("flipped.fmb"), &flipped).expect("write");
    let expected = "payload `model.onnx` does not match its SHA-256 in the manifest: it was altered or replaced";
    for run in [
        fleetctl(
            dir,
            &["bundle", "verify", "flipped.fmb", "--trust", "trust.toml"],
        ),
        agent(
            dir,
            &["verify-bundle", "flipped.fmb", "--trust", "trust.toml"],
        ),
    ] {
        assert_eq!(
            run.failure(),
            format!("error: flipped.fmb failed verification: {expected}")
        );
    }

    // Another valid ONNX model of the same size (the trainer with another seed), spliced in.
    let other = fleetml_claims::run(&fleetml_claims::Run {
        seed: 7,
        ..Default::default()
    });
    let other_model = &other
        .files
        .iter()
        .find(|(n, _)| *n == "model.onnx")
        .expect("model")
        .1;
    let size = front
        .manifest
        .entry("model.onnx")
        .expect("model entry")
        .size as usize;
    assert_eq!(other_model.len(), size, "same architecture, same size");
    assert_ne!(
        sha256(other_model),
        front.manifest.entry("model.onnx").expect("entry").sha256
    );
    let mut replaced = good.clone();
    replaced[model_at..model_at + size].copy_from_slice(other_model);
    std::fs::write(dir.join("replaced.fmb"), &replaced).expect("write");
    let run = fleetctl(
        dir,
        &["bundle", "verify", "replaced.fmb", "--trust", "trust.toml"],
    );
    assert!(run.failure().ends_with(expected), "{}", run.stderr);

    let mut truncated = good.clone();
    truncated.truncate(good.len() - 10);
    std::fs::write(dir.join("truncated.fmb"), &truncated).expect("write");
    let run = agent(
        dir,
        &["verify-bundle", "truncated.fmb", "--trust", "trust.toml"],
    );
    assert!(
        run.failure()
            .ends_with("bundle is truncated: it ends inside payload `golden.cbor`"),
        "{}",
        run.stderr
    );

    // Signed only by a key the policy does not list.
    fleetctl(
        dir,
        &["keys", "generate", "--out", "keys", "--name", "outsider"],
    )
    .success();
    build(dir, "outsider.fmb");
    fleetctl(
        dir,
        &[
            "bundle",
            "sign",
            "outsider.fmb",
            "--key",
            "keys/outsider.key",
        ],
    )
    .success();
    let run = agent(
        dir,
        &["verify-bundle", "outsider.fmb", "--trust", "trust.toml"],
    );
    assert!(
        run.failure()
            .contains("no signature is by a key the trust policy trusts"),
        "{}",
        run.stderr
    );

    let run = fleetctl(
        dir,
        &["bundle", "verify", "missing.fmb", "--trust", "trust.toml"],
    );
    assert!(run.failure().contains("missing.fmb"), "{}", run.stderr);
    std::fs::write(dir.join("notes.txt"), "hello").expect("write");
    let run = fleetctl(dir, &["bundle", "inspect", "notes.txt"]);
    assert!(
        run.failure()
            .ends_with("not a fleetml bundle: the file does not start with the .fmb magic bytes"),
        "{}",
        run.stderr
    );
}

#[test]
fn altered_golden_outputs_signed_by_a_trusted_key_fail_the_agent_self_test() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    setup(dir);
    build(dir, "claims.fmb");
    hil_tests::alter_golden(&dir.join("claims.fmb"), &dir.join("altered.fmb"));

    fleetctl(
        dir,
        &["bundle", "sign", "altered.fmb", "--key", "keys/a.key"],
    )
    .success();
    // The signature is genuine: only the self-test can catch this.
    fleetctl(
        dir,
        &["bundle", "verify", "altered.fmb", "--trust", "trust.toml"],
    )
    .success();
    let run = agent(
        dir,
        &["verify-bundle", "altered.fmb", "--trust", "trust.toml"],
    );
    assert!(run.stdout.contains("verified claims v1"), "{}", run.stdout);
    let line = run.failure();
    assert!(
        line.starts_with(
            "error: claims v1: golden self-test failed: 1 output values differ beyond tolerance"
        ),
        "{line}"
    );
    assert!(line.contains("worst is `probabilities`[3]"), "{line}");
}

#[test]
fn a_feature_schema_that_does_not_fit_the_model_fails_the_build_naming_the_feature() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let text = std::fs::read_to_string(claims("features.toml")).expect("read");
    std::fs::write(
        dir.join("features.toml"),
        text.replace(
            "name = \"injuries\"",
            "name = \"injuries\"\nunit = \"people\"",
        )
        .replace("column = 10", "column = 30"),
    )
    .expect("write");
    let model = claims("model.onnx");
    let run = fleetctl(
        dir,
        &[
            "bundle",
            "build",
            "--model",
            &model,
            "--name",
            "claims",
            "--version",
            "1",
            "--features",
            "features.toml",
            "--out",
            "x.fmb",
        ],
    );
    let line = run.failure();
    assert!(
        line.contains(
            "feature `injuries` needs columns 30..31 of input `input`, which has 25 columns"
        ),
        "{line}"
    );
    assert!(!dir.join("x.fmb").exists());
}

#[test]
fn keys_are_never_overwritten_and_policies_need_a_sane_threshold() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let id = fleetctl(dir, &["keys", "generate", "--out", "k"])
        .success()
        .trim()
        .to_string();
    assert_eq!(id.len(), 16, "prints the key id: {id}");
    let run = fleetctl(dir, &["keys", "generate", "--out", "k"]);
    assert!(run.failure().contains("already exists"), "{}", run.stderr);
    let run = fleetctl(
        dir,
        &[
            "keys",
            "trust-policy",
            "--public",
            "k/signing.pub",
            "--threshold",
            "2",
            "--out",
            "t.toml",
        ],
    );
    assert!(
        run.failure()
            .contains("threshold 2 is more than its 1 distinct keys"),
        "{}",
        run.stderr
    );
    fleetctl(
        dir,
        &[
            "keys",
            "trust-policy",
            "--public",
            "k/signing.pub",
            "--out",
            "t.toml",
        ],
    )
    .success();
    let run = fleetctl(
        dir,
        &[
            "keys",
            "trust-policy",
            "--public",
            "k/signing.pub",
            "--out",
            "t.toml",
        ],
    );
    assert!(run.failure().contains("--force"), "{}", run.stderr);
}

#[test]
fn every_command_has_help() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let commands: &[&[&str]] = &[
        &["--help"],
        &["keys", "--help"],
        &["keys", "generate", "--help"],
        &["keys", "trust-policy", "--help"],
        &["bundle", "--help"],
        &["bundle", "build", "--help"],
        &["bundle", "sign", "--help"],
        &["bundle", "verify", "--help"],
        &["bundle", "inspect", "--help"],
    ];
    for args in commands {
        let out = fleetctl(tmp.path(), args);
        assert!(out.success().contains("Usage: fleetctl"), "{args:?}");
    }
    assert!(
        agent(tmp.path(), &["verify-bundle", "--help"])
            .success()
            .contains("golden")
    );
    let run = fleetctl(tmp.path(), &["bundle", "frobnicate"]);
    assert_eq!(run.code, Some(2), "usage errors exit 2");
}

#[test]
fn bundles_and_policies_are_world_readable_while_keys_stay_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    signed_claims(dir);
    let mode = |p: &str| {
        std::fs::metadata(dir.join(p))
            .expect("exists")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("claims.fmb"), 0o644);
    assert_eq!(mode("trust.toml"), 0o644);
    assert_eq!(mode("keys/a.key"), 0o600);
    assert_eq!(mode("keys/a.pub"), 0o644);
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".fleetml-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
}

#[test]
fn the_agent_reports_gpu_and_npu_boards_falling_back_to_cpu() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    signed_claims(dir);
    let board = hil_tests::root().join("boards/jetson-orin-nano.toml");
    let run = agent(
        dir,
        &[
            "verify-bundle",
            "claims.fmb",
            "--trust",
            "trust.toml",
            "--board",
            &board.to_string_lossy(),
        ],
    );
    let out = run.success();
    assert!(out.contains("gpu requested, not available: this agent was built without GPU support (board asks for vulkan; build with --features gpu), fell back to cpu"), "{out}");
    // The Jetson profile tries ONNX Runtime's TensorRT, CUDA and CPU first; no library
    // here, each is passed over with the loader's reason.
    for provider in ["tensorrt", "cuda", "cpu"] {
        assert!(
            out.contains(&format!(
                "onnxruntime/{provider} requested, cannot use ONNX Runtime at libonnxruntime.so"
            )),
            "{out}"
        );
    }
    assert!(
        out.contains("running on cpu (board jetson-orin-nano)"),
        "{out}"
    );
    assert!(out.contains("golden self-test passed"), "{out}");
    let npu = hil_tests::root().join("boards/imx8m-plus.toml");
    let run = agent(
        dir,
        &[
            "verify-bundle",
            "claims.fmb",
            "--trust",
            "trust.toml",
            "--board",
            &npu.to_string_lossy(),
        ],
    );
    let out = run.success();
    // The i.MX 8M Plus NPU is ONNX Runtime's VSI NPU provider; this machine has no
    // /usr/lib/libonnxruntime.so, so both of its providers are passed over, saying why.
    assert!(
        out.contains(
            "onnxruntime/vsinpu requested, no ONNX Runtime library at /usr/lib/libonnxruntime.so"
        ) && out.contains(
            "onnxruntime/cpu requested, no ONNX Runtime library at /usr/lib/libonnxruntime.so"
        ),
        "{out}"
    );
    assert!(out.contains("running on cpu (board imx8m-plus)"), "{out}");
}

#[test]
fn version_names_the_release_the_git_commit_and_the_features() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(hil_tests::root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let agent_version = agent(tmp.path(), &["--version"]);
    let out = agent_version.success().trim().to_string();
    assert!(
        out.starts_with(&format!("fleet-agent {} (git ", fleetml_protocol::VERSION)),
        "{out}"
    );
    assert!(
        out.contains(&format!("git {head}")) && out.contains("features: cpu"),
        "{out}"
    );
    let ctl = fleetctl(tmp.path(), &["--version"]);
    let out = ctl.success().trim().to_string();
    assert!(
        out.contains(&format!("git {head}")) && out.contains("kubernetes"),
        "{out}"
    );
}
