//! The architecture invariants of ARCHITECTURE.md, checked on the manifests.

use hil_tests::root;

fn dependencies(krate: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).expect("Cargo.toml");
    let doc: toml::Table = text.parse().expect("valid TOML");
    ["dependencies", "dev-dependencies", "build-dependencies"]
        .iter()
        .filter_map(|s| doc.get(*s).and_then(|d| d.as_table()))
        .flat_map(|t| t.keys().cloned())
        .collect()
}

#[test]
fn protocol_stays_pure() {
    let deps = dependencies("protocol");
    for banned in [
        "tokio",
        "rumqttc",
        "rumqttd",
        "axum",
        "sled",
        "tract-onnx",
        "wonnx",
        "fleet-agent",
        "fleet-control",
    ] {
        assert!(
            !deps.iter().any(|d| d == banned),
            "protocol must not depend on {banned}"
        );
    }
}

#[test]
fn agent_and_control_plane_never_depend_on_each_other() {
    assert!(!dependencies("agent").iter().any(|d| d == "fleet-control"));
    assert!(
        !dependencies("control-plane")
            .iter()
            .any(|d| d == "fleet-agent")
    );
}

#[test]
fn every_crate_opens_with_a_role_paragraph() {
    for lib in [
        "protocol/src/lib.rs",
        "agent/src/lib.rs",
        "control-plane/src/lib.rs",
        "hil-tests/src/lib.rs",
        "models/claims/src/lib.rs",
    ] {
        let text = std::fs::read_to_string(root().join(lib)).expect("lib.rs");
        assert!(
            text.starts_with("//! "),
            "{lib} must open with a //! paragraph"
        );
    }
}
