//! Integration tests of fleet-control's offline operations (keys and bundle building).

mod calibration;
mod ingest;
mod monitors;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use fleet_control::{bundle, keys};

fn claims(file: &str) -> PathBuf {
    manifest_dir().join("../models/claims").join(file)
}

fn options(dir: &Path) -> bundle::BuildOptions {
    bundle::BuildOptions {
        model: claims("model.onnx"),
        input_shapes: vec![],
        name: "claims".into(),
        version: 1,
        label: "test".into(),
        features: Some(claims("features.toml")),
        reference: Some(claims("reference.csv")),
        golden: Some(claims("holdout.csv")),
        golden_inputs: None,
        onnxruntime: None,
        allow_backend_disagreement: false,
        golden_rows: 8,
        lineage: Some(claims("lineage.toml")),
        bins: 10,
        calibration: Default::default(),
        label_column: Some("investigate".into()),
        labelled: Some(claims("holdout.csv")),
        prepare_gpu: None,
        monitoring: Default::default(),
        serving: Default::default(),
        backends: vec!["cpu".into()],
        boards: vec![],
        min_agent_version: "0.1.0".into(),
        created_at: 1_790_000_000,
        extra: vec![],
        keys: vec![],
        out: dir.join("claims.fmb"),
    }
}

fn chain(err: &anyhow::Error) -> String {
    err.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

#[test]
fn keys_are_private_and_never_overwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("keys");
    let g = keys::generate(&out, "release").expect("generates");
    let mode = |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
    assert_eq!(mode(&g.private), 0o600);
    assert_eq!(mode(&out), 0o700);
    assert_eq!(keys::load_public(&g.public).expect("pub").id(), g.id);
    assert_eq!(keys::load_private(&g.private).expect("key").id(), g.id);
    let before = std::fs::read(&g.private).expect("read");
    let err = keys::generate(&out, "release").expect_err("must refuse");
    assert!(chain(&err).contains("already exists"), "{}", chain(&err));
    assert_eq!(std::fs::read(&g.private).expect("read"), before);

    std::fs::set_permissions(&g.private, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = keys::load_private(&g.private).expect_err("world-readable key");
    assert!(
        chain(&err).contains("readable by others"),
        "{}",
        chain(&err)
    );
}

#[test]
fn trust_policies_check_their_threshold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = keys::generate(dir.path(), "a").expect("a");
    let b = keys::generate(dir.path(), "b").expect("b");
    let p = keys::trust_policy(&[a.public.clone(), b.public.clone()], 2).expect("2 of 2");
    assert_eq!(p.keys.len(), 2);
    let err = keys::trust_policy(&[a.public.clone(), b.public.clone()], 3).expect_err("3 of 2");
    assert!(
        chain(&err).contains("threshold 3 is more than its 2 distinct keys"),
        "{}",
        chain(&err)
    );
    let err = keys::trust_policy(&[a.public.clone(), a.public.clone()], 1).expect_err("duplicate");
    assert!(chain(&err).contains("twice"), "{}", chain(&err));
}

#[test]
fn build_produces_a_bundle_that_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = keys::generate(dir.path(), "k").expect("key");
    let mut opts = options(dir.path());
    opts.keys = vec![k.private.clone()];
    let built = bundle::build(&opts).expect("builds");
    let names: Vec<&str> = built
        .manifest
        .entries
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, ["model.onnx", "reference.cbor", "golden.cbor"]);
    let policy = keys::trust_policy(&[k.public], 1).expect("policy");
    let v = bundle::verify(&opts.out, &policy).expect("verifies");
    assert_eq!(v.manifest.lineage.seed, Some(42));

    // The reference profile covers every feature and the prediction distribution.
    let mut f = std::fs::File::open(&opts.out).expect("open");
    let bytes = v
        .read_entry(&mut f, "reference.cbor", 1 << 20)
        .expect("reference");
    let profile =
        fleetml_protocol::reference::ReferenceProfile::from_cbor(&bytes).expect("decodes");
    assert_eq!(profile.rows, 4000);
    assert_eq!(profile.features.len(), 15);
    let amount = profile.features[0]
        .numeric
        .as_ref()
        .expect("numeric profile");
    assert_eq!(amount.counts.len(), 10);
    assert_eq!(amount.counts.iter().sum::<u64>(), 4000);
    let witnesses = &profile.features[6];
    assert!(
        witnesses.missing > 0,
        "witness_count has missing values in the data"
    );
    let channel = profile.features[12]
        .categorical
        .as_ref()
        .expect("categorical");
    assert_eq!(channel.values, ["agent", "online", "phone"]);
    assert_eq!(
        profile.predictions[0].class_counts.iter().sum::<u64>(),
        4000
    );
}

#[test]
fn build_is_reproducible_for_the_same_inputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = options(dir.path());
    a.out = dir.path().join("a.fmb");
    let mut b = options(dir.path());
    b.out = dir.path().join("b.fmb");
    bundle::build(&a).expect("a");
    bundle::build(&b).expect("b");
    assert_eq!(
        std::fs::read(&a.out).expect("a"),
        std::fs::read(&b.out).expect("b")
    );
}

#[test]
fn a_schema_that_does_not_match_the_model_is_refused_naming_the_feature() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(claims("features.toml")).expect("read");
    // Shift police_report (one-hot, 2 columns) one column right: it would need column 25.
    let shifted = text.replace(
        "input = \"input\"\ncolumn = 23",
        "input = \"input\"\ncolumn = 24",
    );
    assert_ne!(shifted, text, "the fixture edit applies");
    let features = dir.path().join("features.toml");
    std::fs::write(&features, shifted).expect("write");
    let mut opts = options(dir.path());
    opts.features = Some(features);
    let err = bundle::build(&opts).expect_err("mismatch");
    let msg = chain(&err);
    assert!(
        msg.contains(
            "feature `police_report` needs columns 24..26 of input `input`, which has 25 columns"
        ),
        "{msg}"
    );
    assert!(!opts.out.exists(), "nothing is written on failure");

    let mut opts = options(dir.path());
    let extra = text
        + "\n[[features]]\nname = \"fraud_score\"\ntype = \"float\"\ninput = \"scores\"\ncolumn = 0\n";
    std::fs::write(dir.path().join("extra.toml"), extra).expect("write");
    opts.features = Some(dir.path().join("extra.toml"));
    let msg = chain(&bundle::build(&opts).expect_err("unknown input"));
    assert!(
        msg.contains("feature `fraud_score` feeds input `scores`, which the model does not have"),
        "{msg}"
    );
}

#[test]
fn a_csv_without_a_schema_column_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(claims("holdout.csv")).expect("read");
    let renamed = text.replacen("customer_age", "age", 1);
    std::fs::write(dir.path().join("golden.csv"), renamed).expect("write");
    let mut opts = options(dir.path());
    opts.golden = Some(dir.path().join("golden.csv"));
    let msg = chain(&bundle::build(&opts).expect_err("missing column"));
    assert!(msg.contains("has no column `customer_age`"), "{msg}");
}

#[test]
fn input_shapes_parse_and_are_declared_in_the_manifest() {
    use fleet_control::onnx::parse_input_shape;
    use fleetml_protocol::manifest::Dim;
    let spec = parse_input_shape("x=N,3,48,192").expect("parses");
    assert_eq!(spec.name, "x");
    assert_eq!(
        spec.shape,
        vec![
            Dim::Symbol("N".into()),
            Dim::Fixed(3),
            Dim::Fixed(48),
            Dim::Fixed(192)
        ]
    );
    for bad in ["x", "=N,3", "x=N,,3", "x=N,3.5"] {
        assert!(parse_input_shape(bad).is_err(), "{bad}");
    }
    // `NAME=` is a scalar input (Silero VAD's sample rate).
    assert_eq!(parse_input_shape("sr=").expect("a scalar").shape, vec![]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options(dir.path());
    opts.input_shapes = vec![parse_input_shape("input=batch,25").expect("parses")];
    let built = bundle::build(&opts).expect("builds");
    assert_eq!(
        built.manifest.inputs[0].shape,
        vec![Dim::Symbol("batch".into()), Dim::Fixed(25)]
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

/// The monitor the agent builds from `profile` (features and, when the profile has one,
/// the reconstruction error), windows of `n` rows, alerts after `k` windows in a row.
fn monitor(
    schema: &fleetml_protocol::features::FeatureSchema,
    profile: &fleetml_protocol::reference::ReferenceProfile,
    n: u32,
    k: u8,
) -> fleetml_monitor::Monitor {
    let names: Vec<&str> = schema.features.iter().map(|f| f.name.as_str()).collect();
    fleetml_monitor::profile::monitor(
        profile,
        &names,
        None,
        fleetml_monitor::WindowConfig {
            max_predictions: n,
            max_duration_ms: u64::MAX,
        },
        fleetml_monitor::Thresholds {
            windows: k,
            ..fleetml_monitor::Thresholds::default()
        },
    )
    .expect("monitor")
}
