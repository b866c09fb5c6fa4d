//! Integration tests of fleet-agent: check-first-then-persist unpacking and the golden
//! self-test, on real bundles signed with real keys and the real example model.

mod features;
#[cfg(feature = "gpu")]
mod gpu;
mod monitoring;
mod outbox;
mod publisher;
mod wire;

use std::path::{Path, PathBuf};

use fleet_agent::runtime::CpuModel;
use fleet_agent::selftest::{self, SelfTestError};
use fleet_agent::store::{self, StoreError};
use fleetml_protocol::bundle::{self, BundleError, Limits, SignatureRecord};
use fleetml_protocol::crypto::{SigningKey, sha256};
use fleetml_protocol::features::FeatureSchema;
use fleetml_protocol::golden::{Golden, Tensor};
use fleetml_protocol::manifest::{
    DType, Dim, Entry, Lineage, MANIFEST_FORMAT, Manifest, Targets, TensorSpec,
};
use fleetml_protocol::trust::{TrustPolicy, TrustedKey};

fn claims_dir() -> PathBuf {
    manifest_dir().join("../models/claims")
}

fn claims_model() -> Vec<u8> {
    std::fs::read(claims_dir().join("model.onnx")).expect("models/claims/model.onnx")
}

fn claims_schema() -> FeatureSchema {
    FeatureSchema::from_toml(
        &std::fs::read_to_string(claims_dir().join("features.toml")).expect("features.toml"),
    )
    .expect("valid schema")
}

/// Golden vectors for the claims model: `rows` synthetic rows and tract's outputs.
fn golden(model: &CpuModel, rows: usize) -> Golden {
    let data: Vec<f32> = (0..rows * 25)
        .map(|i| ((i * 37 % 101) as f32) / 10.0)
        .collect();
    let inputs = vec![Tensor::f32("input", vec![rows as u64, 25], data)];
    let outputs = model.run(&inputs).expect("model runs");
    Golden {
        abs_tolerance: 1e-4,
        rel_tolerance: 1e-3,
        inputs,
        outputs,
    }
}

/// Adds `by` to element `i` of an f32 tensor.
fn bump(t: &mut Tensor, i: usize, by: f32) {
    match &mut t.data {
        fleetml_protocol::golden::TensorData::F32(v) => v[i] += by,
        other => panic!("an f32 output expected, got {other:?}"),
    }
}

struct Fixture {
    key: SigningKey,
    policy: TrustPolicy,
}

fn fixture() -> Fixture {
    let key = SigningKey::generate().expect("key").0;
    let policy = TrustPolicy::new(
        1,
        vec![TrustedKey {
            name: None,
            public: key.public_key(),
            id: None,
        }],
    )
    .expect("policy");
    Fixture { key, policy }
}

fn manifest(payloads: &[(&str, Vec<u8>)]) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        name: "claims".into(),
        version: 1,
        label: String::new(),
        created_at: 0,
        entries: payloads
            .iter()
            .map(|(n, b)| Entry {
                name: n.to_string(),
                size: b.len() as u64,
                sha256: sha256(b),
            })
            .collect(),
        inputs: vec![TensorSpec {
            name: "input".into(),
            dtype: DType::F32,
            shape: vec![Dim::Symbol("N".into()), Dim::Fixed(25)],
        }],
        outputs: vec![TensorSpec {
            name: "probabilities".into(),
            dtype: DType::F32,
            shape: vec![Dim::Symbol("N".into()), Dim::Fixed(2)],
        }],
        features: claims_schema(),
        targets: Targets::default(),
        min_agent_version: "0.1.0".into(),
        lineage: Lineage::default(),
        monitoring: Default::default(),
        serving: Default::default(),
    }
}

fn write_bundle(path: &Path, m: &Manifest, payloads: &[(&str, Vec<u8>)], key: &SigningKey) {
    let bytes = m.to_canonical_cbor();
    let sig = SignatureRecord {
        key: key.id(),
        signature: key.sign(&bytes),
    };
    let mut out = Vec::new();
    bundle::write(&mut out, &bytes, &[sig], m, |name, w| {
        w.write_all(
            &payloads
                .iter()
                .find(|(n, _)| *n == name)
                .expect("payload")
                .1,
        )
    })
    .expect("bundle writes");
    std::fs::write(path, out).expect("bundle file");
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn golden_self_test_passes_on_the_example_model() {
    let model = CpuModel::load(&claims_model()).expect("claims model loads");
    let g = golden(&model, 8);
    let result = selftest::run(&model, &g.to_cbor()).expect("self-test passes");
    assert_eq!(result.rows, 8);
    assert_eq!(result.comparison.max_abs_error, 0.0);
}

#[test]
fn golden_self_test_fails_clearly_when_outputs_were_altered() {
    let model = CpuModel::load(&claims_model()).expect("claims model loads");
    let mut g = golden(&model, 8);
    bump(&mut g.outputs[0], 5, 0.25);
    match selftest::run(&model, &g.to_cbor()) {
        Err(SelfTestError::Failed {
            failures: 1,
            output,
            index: 5,
            max_abs,
            ..
        }) => {
            assert_eq!(output, "probabilities");
            assert!((max_abs - 0.25).abs() < 1e-6, "{max_abs}");
        }
        other => panic!("expected a failed self-test, got {other:?}"),
    }
    let mut wrong_shape = golden(&model, 8);
    wrong_shape.outputs[0].shape = vec![4, 4];
    assert!(matches!(
        selftest::run(&model, &wrong_shape.to_cbor()),
        Err(SelfTestError::Mismatch(_))
    ));
    assert!(matches!(
        selftest::run(&model, b"\xff\x00junk"),
        Err(SelfTestError::Golden(_))
    ));
}

#[test]
fn unpack_verifies_the_whole_bundle_before_writing_anything() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let model = CpuModel::load(&claims_model()).expect("loads");
    let payloads = vec![
        ("model.onnx", claims_model()),
        ("golden.cbor", golden(&model, 4).to_cbor()),
        ("notes.txt", b"the last payload".to_vec()),
    ];
    let m = manifest(&payloads);
    let good = dir.path().join("good.fmb");
    write_bundle(&good, &m, &payloads, &f.key);

    // Tamper with the *last* payload: a client that wrote entries as it verified them
    // would already have written model.onnx and golden.cbor.
    let mut bytes = std::fs::read(&good).expect("read");
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    let bad = dir.path().join("bad.fmb");
    std::fs::write(&bad, &bytes).expect("write");
    let store = dir.path().join("store");
    std::fs::create_dir(&store).expect("store dir");
    let dest = store.join("claims-1");
    match store::unpack(&bad, &f.policy, &Limits::default(), &dest) {
        Err(StoreError::Bundle(BundleError::DigestMismatch { entry })) => {
            assert_eq!(entry, "notes.txt")
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(
        listing(&store).is_empty(),
        "nothing may be written: {:?}",
        listing(&store)
    );

    // An untrusted signer is refused just as early.
    let other = fixture();
    assert!(matches!(
        store::unpack(&good, &other.policy, &Limits::default(), &dest),
        Err(StoreError::Bundle(BundleError::UntrustedSigners { .. }))
    ));
    assert!(listing(&store).is_empty());

    let v =
        store::unpack(&good, &f.policy, &Limits::default(), &dest).expect("good bundle unpacks");
    assert_eq!(v.manifest.name, "claims");
    assert_eq!(listing(&store), vec!["claims-1"]);
    assert_eq!(
        listing(&dest),
        vec!["golden.cbor", "model.onnx", "notes.txt"]
    );
    assert_eq!(
        std::fs::read(dest.join("model.onnx")).expect("read"),
        claims_model()
    );
    assert!(matches!(
        store::unpack(&good, &f.policy, &Limits::default(), &dest),
        Err(StoreError::Exists(_))
    ));
}

#[test]
fn a_bundle_for_a_newer_agent_is_refused() {
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let payloads = vec![("model.onnx", claims_model())];
    let mut m = manifest(&payloads);
    m.min_agent_version = "99.0.0".into();
    let path = dir.path().join("future.fmb");
    write_bundle(&path, &m, &payloads, &f.key);
    match store::verify(&path, &f.policy, &Limits::default()) {
        Err(StoreError::AgentTooOld { required, .. }) => assert_eq!(required, "99.0.0"),
        other => panic!("expected AgentTooOld, got {other:?}"),
    }
}

fn board(backends: &str, accelerators: &str) -> fleetml_protocol::board::BoardProfile {
    let text = format!(
        "name = \"test\"\ntarget = \"aarch64-unknown-linux-gnu\"\ncpu_cores = 4\nmemory_mb = 4096\nbackends = {backends}\n{accelerators}\n[agent]\nmemory_budget_mb = 256\n[paths]\ndata_dir = \"/var/lib/fleetml\"\nconfig_dir = \"/etc/fleetml\"\n"
    );
    fleetml_protocol::board::BoardProfile::from_toml(&text).expect("valid board")
}

const NPU_AND_GPU: &str = "[[accelerators]]\nkind = \"npu\"\nname = \"VeriSilicon VIP\"\ndelegate = \"libvx_delegate.so\"\n[[accelerators]]\nkind = \"gpu\"\nname = \"Mali\"\napi = \"vulkan\"\n";

#[test]
fn backends_fall_back_along_the_board_order_with_reasons() {
    use fleet_agent::backend;
    use fleetml_protocol::board::Backend as Kind;
    let model = CpuModel::load(&claims_model()).expect("loads");
    let g = golden(&model, 4).to_cbor();
    let b = board("[\"npu\", \"gpu\", \"cpu\"]", NPU_AND_GPU);
    let onnx = claims_model();
    let files = backend::ModelFiles::new(&onnx, &[]);
    let selection = backend::select(&b, &files, Some(&g)).expect("cpu runs it");
    assert_eq!(selection.self_test.as_ref().map(|t| t.rows), Some(4));
    let report = selection.report();
    let chosen = selection.backend.kind();
    assert_eq!(
        report[0],
        format!(
            "npu requested, not available: this agent has no NPU delegate support (board names delegate `libvx_delegate.so`), fell back to {}",
            chosen.as_str()
        )
    );
    if cfg!(feature = "gpu") && chosen == Kind::Gpu {
        // An agent built with wonnx on a machine with an adapter runs it on the GPU.
        assert_eq!(report.len(), 1);
    } else {
        assert_eq!(chosen, Kind::Cpu);
        assert_eq!(report.len(), 2);
        let expected = if cfg!(feature = "gpu") {
            "gpu requested, "
        } else {
            "gpu requested, not available: this agent was built without GPU support"
        };
        assert!(report[1].starts_with(expected), "{}", report[1]);
    }

    // Without golden vectors the first backend that loads the model is chosen.
    let selection = backend::select(&board("[\"cpu\"]", ""), &files, None).expect("cpu");
    assert!(selection.fallbacks.is_empty() && selection.self_test.is_none());
}

#[test]
fn a_failed_self_test_or_unloadable_model_rules_a_backend_out() {
    use fleet_agent::backend;
    use fleetml_protocol::board::Backend as Kind;
    let model = CpuModel::load(&claims_model()).expect("loads");
    let mut g = golden(&model, 4);
    bump(&mut g.outputs[0], 0, 0.5);
    let onnx = claims_model();
    let err = backend::select(
        &board("[\"cpu\"]", ""),
        &backend::ModelFiles::new(&onnx, &[]),
        Some(&g.to_cbor()),
    )
    .expect_err("fails");
    assert_eq!(err.reasons.len(), 1);
    assert_eq!(err.reasons[0].backend, Kind::Cpu);
    assert!(
        err.reasons[0].reason.starts_with("golden self-test failed"),
        "{}",
        err.reasons[0].reason
    );
    assert!(
        err.to_string().starts_with(
            "no backend of board `test` can run the model: cpu requested, golden self-test failed"
        ),
        "{err}"
    );

    let err = backend::select(
        &board("[\"cpu\"]", ""),
        &backend::ModelFiles::new(b"not onnx", &[]),
        None,
    )
    .expect_err("unloadable");
    assert!(
        err.reasons[0]
            .reason
            .starts_with("tract cannot load the model"),
        "{}",
        err.reasons[0].reason
    );
}

/// A signed claims bundle of `version` (with golden vectors; `tamper` alters one output).
fn versioned(dir: &Path, f: &Fixture, version: u64, tamper: bool) -> PathBuf {
    let model = CpuModel::load(&claims_model()).expect("loads");
    let mut g = golden(&model, 4);
    if tamper {
        bump(&mut g.outputs[0], 1, 0.5);
    }
    let payloads = vec![("model.onnx", claims_model()), ("golden.cbor", g.to_cbor())];
    let mut m = manifest(&payloads);
    m.version = version;
    let path = dir.join(format!(
        "claims-v{version}{}.fmb",
        if tamper { "-bad" } else { "" }
    ));
    write_bundle(&path, &m, &payloads, &f.key);
    path
}

#[test]
fn the_store_activates_keeps_one_previous_version_and_rolls_back() {
    use fleet_agent::activation::{self, ActivationError};
    use fleet_agent::store::ModelStore;
    let f = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let board = activation::local_cpu_board();
    let limits = Limits::default();
    let store = ModelStore::open(&data).expect("opens");
    let install = |v: u64, tamper: bool| {
        let path = versioned(dir.path(), &f, v, tamper);
        activation::install(&store, &path, &f.policy, &board, &limits, 1000 + v)
    };

    let a1 = install(1, false).expect("v1 installs");
    assert_eq!(
        (a1.state.active.version, a1.state.previous.as_ref()),
        (1, None)
    );
    assert_eq!(a1.state.backend, "cpu");
    assert_eq!(a1.self_test.as_ref().map(|t| t.rows), Some(4));
    let a2 = install(2, false).expect("v2 installs");
    assert_eq!(a2.state.previous.as_ref().map(|p| p.version), Some(1));
    // Installing the active version again changes nothing.
    let again = install(2, false).expect("v2 again");
    assert_eq!(again.state.previous.as_ref().map(|p| p.version), Some(1));
    let a3 = install(3, false).expect("v3 installs");
    assert_eq!(a3.state.previous.as_ref().map(|p| p.version), Some(2));
    // Disk stays bounded: v1 is neither active nor previous, so its bundle is gone.
    let stored: Vec<String> = listing(&data.join("store/bundles"));
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(stored.contains(&format!("{}.fmb", a3.state.active.digest)));

    // A bundle whose self-test fails is not activated; v3 keeps serving; the reason is kept.
    match install(4, true) {
        Err(ActivationError::NoBackend {
            model,
            version: 4,
            source,
        }) => {
            assert_eq!(model, "claims");
            assert!(
                source.reasons[0]
                    .reason
                    .starts_with("golden self-test failed"),
                "{source}"
            );
        }
        other => panic!("expected a failed activation, got {other:?}"),
    }
    let state = store.model("claims").expect("reads").expect("installed");
    assert_eq!(state.active.version, 3);
    let failure = state.last_failure.expect("failure recorded");
    assert_eq!(failure.version, 4);
    assert!(
        failure.reason.contains("golden self-test failed"),
        "{}",
        failure.reason
    );
    assert_eq!(
        listing(&data.join("store/bundles")).len(),
        2,
        "the failed bundle is not kept"
    );

    let rolled = store.rollback("claims", 2000).expect("rolls back");
    assert_eq!(
        (
            rolled.active.version,
            rolled.previous.as_ref().map(|p| p.version)
        ),
        (2, Some(3))
    );
    assert!(matches!(
        store.rollback("fraud", 1),
        Err(fleet_agent::store::StoreError::UnknownModel(_))
    ));
    drop(store);

    // Reopened, the store serves what was committed last.
    let store = ModelStore::open(&data).expect("reopens");
    assert_eq!(
        store
            .model("claims")
            .expect("reads")
            .map(|s| s.active.version),
        Some(2)
    );
}

#[test]
fn opening_the_store_removes_what_an_interrupted_install_left() {
    use fleet_agent::store::ModelStore;
    let dir = tempfile::tempdir().expect("tempdir");
    let bundles = dir.path().join("store/bundles");
    drop(ModelStore::open(dir.path()).expect("opens"));
    std::fs::write(bundles.join(".incoming-abc"), b"half a bundle").expect("write");
    std::fs::write(
        bundles.join(format!("{}.fmb", "0".repeat(64))),
        b"unreferenced",
    )
    .expect("write");
    drop(ModelStore::open(dir.path()).expect("reopens"));
    assert!(listing(&bundles).is_empty(), "{:?}", listing(&bundles));
}

#[test]
fn config_files_resolve_relative_paths_refuse_unknown_keys_and_yield_to_flags() {
    use fleet_agent::config::{AgentConfig, ConfigError};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "data_dir = \"data\"\ntrust = \"/etc/fleetml/trust.toml\"\nlisten = \"127.0.0.1:9000\"\nworkers = 3\n")
        .expect("write");
    let c = AgentConfig::load(&path).expect("loads");
    assert_eq!(c.data_dir, Some(dir.path().join("data")));
    assert_eq!(
        c.trust.as_deref(),
        Some(Path::new("/etc/fleetml/trust.toml"))
    );
    assert_eq!(
        (c.workers, c.listen.map(|l| l.port())),
        (Some(3), Some(9000))
    );
    let flags = AgentConfig {
        workers: Some(1),
        ..Default::default()
    };
    let merged = c.overridden_by(flags);
    assert_eq!((merged.workers, merged.queue), (Some(1), None));
    assert!(merged.data_dir.is_some(), "keys the flags do not set stay");

    std::fs::write(&path, "data_dir = \"data\"\ncolour = \"red\"\n").expect("write");
    match AgentConfig::load(&path) {
        Err(ConfigError::Invalid { message, .. }) => {
            assert!(message.contains("unknown field `colour`"), "{message}")
        }
        other => panic!("expected an invalid config, got {other:?}"),
    }
    std::fs::write(&path, "listen = \"not an address\"\n").expect("write");
    assert!(matches!(
        AgentConfig::load(&path),
        Err(ConfigError::Invalid { .. })
    ));
    assert!(matches!(
        AgentConfig::load(&dir.path().join("missing.toml")),
        Err(ConfigError::Read { .. })
    ));
}

#[test]
fn monitoring_settings_take_the_agent_then_the_bundle_then_the_default() {
    use fleet_agent::monitoring::settings;
    use fleetml_protocol::manifest::MonitoringPolicy;
    let agent = MonitoringPolicy {
        drift_psi: Some(0.3),
        window_seconds: Some(60),
        ..Default::default()
    };
    let bundle = MonitoringPolicy {
        drift_psi: Some(0.25),
        drift_js: Some(0.2),
        window_predictions: Some(50),
        ..Default::default()
    };
    let (window, t) = settings(&agent, &bundle).expect("valid");
    assert_eq!(t.psi, 0.3, "the agent wins");
    assert_eq!(t.js, 0.2, "then the bundle");
    assert_eq!(t.chi2_p, 0.01, "then the default");
    assert_eq!(window.max_predictions, 50);
    assert_eq!(window.max_duration_ms, 60_000);
    assert_eq!(t.min_predictions, 50, "a small window still moves alerts");
    let bad = MonitoringPolicy {
        drift_chi2_p: Some(1.5),
        ..Default::default()
    };
    assert_eq!(
        settings(&bad, &bundle).expect_err("out of range"),
        "agent configuration: monitoring setting `drift_chi2_p` is out of range"
    );
    assert!(MonitoringPolicy::from_toml("drift_psi = 0.3\nbogus = 1\n").is_err());
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
