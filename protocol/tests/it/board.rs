//! Board profiles: every shipped profile parses; bad ones are refused with a reason.

use fleetml_protocol::board::{Backend, BoardError, BoardProfile, Provider};

fn boards_dir() -> std::path::PathBuf {
    manifest_dir().join("../boards")
}

#[test]
fn shipped_board_profiles_parse_and_validate() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(boards_dir()).expect("boards/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("readable");
            let board = BoardProfile::from_toml(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(
                Some(board.name.as_str()),
                path.file_stem().and_then(|s| s.to_str()),
                "file name matches `name`"
            );
            names.push(board.name);
        }
    }
    names.sort();
    for required in [
        "generic-x86_64",
        "jetson-orin-nano",
        "raspberry-pi-4",
        "x86_64-vulkan-gpu",
    ] {
        assert!(
            names.iter().any(|n| n == required),
            "boards/{required}.toml is missing"
        );
    }
    let jetson = BoardProfile::from_toml(
        &std::fs::read_to_string(boards_dir().join("jetson-orin-nano.toml")).expect("read"),
    )
    .expect("valid");
    assert_eq!(
        jetson.backends,
        vec![Backend::Onnxruntime, Backend::Gpu, Backend::Cpu]
    );
    assert!(jetson.target.starts_with("aarch64-"));
    let ort = jetson.onnxruntime.as_ref().expect("[onnxruntime]");
    assert_eq!(
        ort.providers,
        vec![Provider::Tensorrt, Provider::Cuda, Provider::Cpu]
    );
    assert_eq!(ort.tolerance(Provider::Tensorrt), Some((1e-2, 1e-2)));
    assert_eq!(ort.tolerance(Provider::Cuda), None);
    for (board, npu) in [
        ("imx8m-plus", Provider::Vsinpu),
        ("rk3588", Provider::Rknpu),
    ] {
        let b = BoardProfile::from_toml(
            &std::fs::read_to_string(boards_dir().join(format!("{board}.toml"))).expect("read"),
        )
        .expect("valid");
        let ort = b.onnxruntime.expect("[onnxruntime]");
        assert_eq!(ort.providers, vec![npu, Provider::Cpu], "{board}");
        assert_eq!(
            b.backends,
            vec![Backend::Onnxruntime, Backend::Cpu],
            "{board}"
        );
    }
}

const GOOD: &str = r#"
name = "test-board"
target = "aarch64-unknown-linux-gnu"
cpu_cores = 4
memory_mb = 4096
backends = ["cpu"]
[agent]
memory_budget_mb = 256
[paths]
data_dir = "/var/lib/fleetml"
config_dir = "/etc/fleetml"
"#;

#[test]
fn bad_board_profiles_are_refused_with_the_reason() {
    assert!(BoardProfile::from_toml(GOOD).is_ok_and(|b| b.agent.store_budget_mb == 1024));
    let cases = [
        (
            GOOD.replace("cpu_cores = 4", "cpu_cores = 4\ncolour = \"red\""),
            "unknown field `colour`",
        ),
        (
            GOOD.replace("backends = [\"cpu\"]", "backends = [\"gpu\", \"cpu\"]"),
            "backend `gpu` is listed but no accelerator",
        ),
        (
            GOOD.replace("backends = [\"cpu\"]", "backends = []"),
            "at least one backend",
        ),
        (
            GOOD.replace("backends = [\"cpu\"]", "backends = [\"tpu\"]"),
            "unknown variant `tpu`",
        ),
        (
            GOOD.replace("memory_budget_mb = 256", "memory_budget_mb = 8192"),
            "memory_budget_mb",
        ),
        (
            GOOD.replace("\"/var/lib/fleetml\"", "\"var/lib\""),
            "`paths.data_dir` must be an absolute path",
        ),
        (
            GOOD.replace("aarch64-unknown-linux-gnu", "arm"),
            "is not a target triple",
        ),
        (
            GOOD.replace("[agent]\nmemory_budget_mb = 256\n", ""),
            "missing field `agent`",
        ),
        (
            GOOD.replace("backends = [\"cpu\"]", "backends = [\"onnxruntime\", \"cpu\"]"),
            "no `[onnxruntime]` section",
        ),
        (
            GOOD.replace("[agent]", "[onnxruntime]\nproviders = []\n[agent]"),
            "at least one provider",
        ),
        (
            GOOD.replace("[agent]", "[onnxruntime]\nproviders = [\"cuda\", \"cuda\"]\n[agent]"),
            "provider `cuda` is listed twice",
        ),
        (
            GOOD.replace("[agent]", "[onnxruntime]\nproviders = [\"warp\"]\n[agent]"),
            "unknown variant `warp`",
        ),
        (
            GOOD.replace("[agent]", "[onnxruntime]\nlibrary = \"lib.so\"\nproviders = [\"cpu\"]\n[agent]"),
            "must be an absolute path",
        ),
        (
            GOOD.replace(
                "[agent]",
                "[onnxruntime]\nproviders = [\"cpu\"]\n[[onnxruntime.tolerances]]\nprovider = \"cpu\"\nabs = -1.0\nrel = 0.0\n[agent]",
            ),
            "finite and not negative",
        ),
        (
            GOOD.replace("memory_budget_mb = 256", "memory_budget_mb = 256\nintra_op_threads = 0"),
            "`agent.intra_op_threads` must be at least 1",
        ),
    ];
    for (text, expected) in cases {
        let err: BoardError = BoardProfile::from_toml(&text).expect_err(expected);
        assert!(
            err.to_string().contains(expected),
            "got `{err}`, expected `{expected}`"
        );
    }
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
