//! Real models nobody here wrote, through the agent's API on every CPU backend, held to
//! Python onnxruntime: PP-OCRv4's text detector and recogniser and PP-OCR's direction
//! classifier (from the `rapidocr-onnxruntime` wheel) with symbolic height and width,
//! and Silero VAD (from the `silero-vad` wheel), stateful, with an int64 input.
//!
//! Each model is built into a signed bundle with `fleetctl bundle build`, installed by
//! `fleet-agent install-bundle` on a board whose backend is `onnxruntime` (the PyPI
//! wheel's `libonnxruntime`) or `cpu` (tract), served by `fleet-agent run`, and fed
//! through the API as CBOR byte strings; the outputs must equal Python onnxruntime's
//! within 1e-4 relative.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fleetml_protocol::golden::{Tensor, TensorData};
use hil_tests::{agent, fleetctl, keys_and_policy, python};
use serde_json::{Value, json};

/// onnxruntime in the agent against onnxruntime in Python.
const REL: f64 = 1e-4;
/// tract against onnxruntime: a different convolution kernel sums in another order;
/// measured worst on PP-OCRv4's detector 4.5e-4 (docs/CONFORMANCE.md).
const REL_TRACT: f64 = 1e-3;
const FLOOR: f64 = 1e-3;

/// A file inside an installed Python package.
fn package_file(module: &str, relative: &str) -> PathBuf {
    let out = Command::new(python())
        .args([
            "-c",
            &format!(
                "import importlib.util, os; s = importlib.util.find_spec('{module}'); print(os.path.join(s.submodule_search_locations[0], '{relative}'))"
            ),
        ])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{module} is not installed in the test venv: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// The PyPI wheel's libonnxruntime.
pub fn onnxruntime_library() -> PathBuf {
    let capi = package_file("onnxruntime", "capi");
    std::fs::read_dir(&capi)
        .expect("capi")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so."))
        })
        .unwrap_or_else(|| panic!("no libonnxruntime.so.* in {}", capi.display()))
}

fn pseudo_random(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0) - 1.0)
        .collect()
}

/// Sends `inputs` as CBOR byte strings; returns the whole output tensors.
fn predict(agent: &hil_tests::RunningAgent, model: &str, inputs: &[Tensor]) -> Vec<Tensor> {
    use serde_cbor::Value as C;
    // Inputs go in as the API gives outputs back: {name, shape, dtype, bytes}.
    let mut body = std::collections::BTreeMap::new();
    body.insert(
        C::Text("inputs".into()),
        fleet_agent::wire::cbor_outputs(inputs),
    );
    let body = serde_cbor::to_vec(&C::Map(body)).expect("cbor");
    let stream = std::net::TcpStream::connect(&agent.addr).expect("connects");
    let (status, raw) = hil_tests::http(
        stream,
        "POST",
        &format!("/v1/models/{model}/predict"),
        "application/cbor",
        &body,
    )
    .expect("HTTP");
    let reply: C = serde_cbor::from_slice(&raw).expect("CBOR reply");
    let text = format!("{reply:?}");
    assert_eq!(status, 200, "{}", &text[..text.len().min(2000)]);
    let C::Map(reply) = reply else {
        panic!("a map");
    };
    let Some(C::Array(outputs)) = reply.get(&C::Text("outputs".into())) else {
        panic!("no outputs: {}", &text[..text.len().min(2000)]);
    };
    outputs
        .iter()
        .map(|o| {
            let C::Map(o) = o else { panic!("output map") };
            let get = |k: &str| o.get(&C::Text(k.into())).cloned();
            let (
                Some(C::Text(name)),
                Some(C::Array(shape)),
                Some(C::Text(dtype)),
                Some(C::Bytes(bytes)),
            ) = (get("name"), get("shape"), get("dtype"), get("bytes"))
            else {
                panic!("output fields");
            };
            let dtype = fleet_agent::wire::parse_dtype(&dtype).expect("dtype");
            Tensor {
                name,
                shape: shape
                    .iter()
                    .map(|d| match d {
                        C::Integer(n) => *n as u64,
                        _ => panic!("size"),
                    })
                    .collect(),
                data: TensorData::from_le_bytes(dtype, &bytes).expect("elements"),
            }
        })
        .collect()
}

/// Largest relative difference (floored) between ours and the peer's outputs.
fn worst(ours: &[Tensor], theirs: &[(String, Vec<u64>, Vec<f64>)]) -> f64 {
    let mut worst = 0f64;
    for (name, shape, data) in theirs {
        let o = ours
            .iter()
            .find(|o| &o.name == name)
            .unwrap_or_else(|| panic!("the agent returned no output {name}"));
        assert_eq!(&o.shape, shape, "output {name}");
        assert_eq!(o.data.len(), data.len(), "output {name}");
        for (i, b) in data.iter().enumerate() {
            let a = o.data.get_f64(i).expect("element");
            worst = worst.max((a - b).abs() / b.abs().max(FLOOR));
        }
    }
    worst
}

struct Case {
    name: &'static str,
    model: PathBuf,
    /// `--input-shape` arguments for the build.
    shapes: Vec<&'static str>,
    /// Requests, each fed in turn (a stateful model carries its state over).
    requests: Vec<Vec<Tensor>>,
}

fn ocr(name: &'static str, file: &str, shape: &'static str, dims: &[(u64, u64)]) -> Case {
    Case {
        name,
        model: package_file("rapidocr_onnxruntime", &format!("models/{file}")),
        shapes: vec![shape],
        requests: dims
            .iter()
            .enumerate()
            .map(|(i, (h, w))| {
                let n = (3 * h * w) as usize;
                vec![Tensor::f32("x", vec![1, 3, *h, *w], pseudo_random(n, i))]
            })
            .collect(),
    }
}

fn cases() -> Vec<Case> {
    vec![
        // Symbolic height and width: two image sizes through one bundle.
        ocr(
            "det",
            "ch_PP-OCRv4_det_infer.onnx",
            "x=N,3,H,W",
            &[(640, 640), (320, 480)],
        ),
        ocr(
            "rec",
            "ch_PP-OCRv4_rec_infer.onnx",
            "x=N,3,48,W",
            &[(48, 320), (48, 160)],
        ),
        ocr(
            "cls",
            "ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "x=N,3,48,192",
            &[(48, 192)],
        ),
    ]
}

fn silero() -> Case {
    let state = |t: &[f32]| Tensor::f32("state", vec![2, 1, 128], t.to_vec());
    let sr = Tensor {
        name: "sr".into(),
        shape: vec![],
        data: TensorData::I64(vec![16000]),
    };
    let audio = |seed| {
        Tensor::f32(
            "input",
            vec![1, 512],
            pseudo_random(512, seed).iter().map(|x| x * 0.3).collect(),
        )
    };
    Case {
        name: "vad",
        model: package_file("silero_vad", "data/silero_vad.onnx"),
        shapes: vec!["input=N,S", "state=2,N,128", "sr="],
        requests: vec![
            vec![audio(1), state(&[0.0; 256]), sr.clone()],
            vec![audio(2), state(&pseudo_random(256, 3)), sr],
        ],
    }
}

fn board(dir: &Path, backend: &str) -> PathBuf {
    if backend == "onnxruntime" {
        board_with(
            dir,
            "onnxruntime",
            &["onnxruntime"],
            &["cpu"],
            &onnxruntime_library(),
        )
    } else {
        board_with(dir, backend, &[backend], &[], Path::new(""))
    }
}

/// A board profile named `name` with these backends and (when `providers` is not empty)
/// an `[onnxruntime]` section with `library`.
fn board_with(
    dir: &Path,
    name: &str,
    backends: &[&str],
    providers: &[&str],
    library: &Path,
) -> PathBuf {
    let path = dir.join(format!("board-{name}.toml"));
    let quoted = |v: &[&str]| {
        v.iter()
            .map(|b| format!("\"{b}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ort = if providers.is_empty() {
        String::new()
    } else {
        format!(
            "[onnxruntime]\nlibrary = \"{}\"\nproviders = [{}]\n",
            library.display(),
            quoted(providers)
        )
    };
    std::fs::write(
        &path,
        format!(
            "name = \"test-{name}\"\ntarget = \"x86_64-unknown-linux-gnu\"\ncpu_cores = 2\nmemory_mb = 4096\nbackends = [{}]\n{ort}[agent]\nmemory_budget_mb = 2048\n[paths]\ndata_dir = \"/var/lib/fleetml\"\nconfig_dir = \"/etc/fleetml\"\n",
            quoted(backends)
        ),
    )
    .expect("board");
    path
}

fn install(dir: &Path, bundle: &str, data: &str, board: &Path) -> hil_tests::Run {
    agent(
        dir,
        &[
            "install-bundle",
            bundle,
            "--data-dir",
            data,
            "--trust",
            "trust.toml",
            "--board",
            &board.to_string_lossy(),
        ],
    )
}

fn build(dir: &Path, case: &Case) -> String {
    let out = format!("{}.fmb", case.name);
    let model = case.model.to_string_lossy().into_owned();
    let mut args = vec![
        "bundle",
        "build",
        "--model",
        &model,
        "--name",
        case.name,
        "--version",
        "1",
        "--key",
        "keys/k.key",
        "--out",
        &out,
    ];
    for s in &case.shapes {
        args.extend(["--input-shape", s]);
    }
    fleetctl(dir, &args).success();
    out
}

/// Installs every case's bundle on `backend`, serves them, and compares each request's
/// outputs with onnxruntime's.
fn serve_and_compare(dir: &Path, backend: &str, cases: &[Case]) {
    let board = board(dir, backend);
    let data = format!("data-{backend}");
    for case in cases {
        let bundle = build(dir, case);
        let installed = install(dir, &bundle, &data, &board);
        let out = installed.success();
        assert!(out.contains(&format!("on {backend}")), "{out}");
    }
    let running = hil_tests::RunningAgent::start(
        dir,
        &[
            "run",
            "--data-dir",
            &data,
            "--trust",
            "trust.toml",
            "--board",
            &board.to_string_lossy(),
            "--listen",
            "127.0.0.1:0",
            // Symbolic image sizes: the default limit cannot know how large they get.
            "--max-body-bytes",
            "67108864",
        ],
    );
    let (status, models) = running.request("GET", "/v1/models", &Value::Null);
    assert_eq!(status, 200);
    if backend == "onnxruntime" {
        let m = &models["models"][0];
        assert_eq!(m["provider"], "cpu", "{models}");
        assert!(
            m["onnxruntime_version"]
                .as_str()
                .is_some_and(|v| v.starts_with("1.")),
            "{models}"
        );
    }
    for case in cases {
        for (i, request) in case.requests.iter().enumerate() {
            let ours = predict(&running, case.name, request);
            let theirs = hil_tests::onnxruntime_peer(&case.model, request);
            let w = worst(&ours, &theirs);
            println!(
                "{} on {backend}, request {i}: max relative difference {w:e}",
                case.name
            );
            let rel = if backend == "cpu" { REL_TRACT } else { REL };
            assert!(w <= rel, "{} on {backend}, request {i}: {w:e}", case.name);
        }
    }
}

fn setup() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tmp");
    keys_and_policy(tmp.path(), "k");
    tmp
}

#[test]
fn real_models_on_onnxruntime_equal_python_onnxruntime() {
    let tmp = setup();
    let mut all = cases();
    all.push(silero());
    serve_and_compare(tmp.path(), "onnxruntime", &all);
}

#[test]
fn real_models_on_tract_equal_python_onnxruntime() {
    let tmp = setup();
    serve_and_compare(tmp.path(), "cpu", &cases());
}

#[test]
fn a_model_tract_cannot_run_is_refused_at_install_naming_the_operator() {
    let tmp = setup();
    let dir = tmp.path();
    let case = silero();
    let bundle = build(dir, &case);
    let board = board(dir, "cpu");
    let refused = install(dir, &bundle, "data", &board);
    let err = refused.failure();
    assert!(
        err.contains("no backend") && err.contains("\"If_0\" If"),
        "the refusal names the node and operator: {err}"
    );
}

#[test]
fn a_provider_that_does_not_load_is_reported_and_the_next_one_is_tried() {
    let tmp = setup();
    let dir = tmp.path();
    let cls = cases().pop().expect("cls");
    let bundle = build(dir, &cls);
    // The PyPI wheel is built without CUDA: registering it fails, with ONNX Runtime's
    // reason, and the board's next provider runs the model; never a silent switch.
    let board = board_with(
        dir,
        "cuda-first",
        &["onnxruntime", "cpu"],
        &["cuda", "cpu"],
        &onnxruntime_library(),
    );
    let run = install(dir, &bundle, "data", &board);
    let out = run.success();
    let cuda = out
        .lines()
        .find(|l| l.starts_with("onnxruntime/cuda requested, "))
        .unwrap_or_else(|| panic!("the CUDA failure is reported: {out}"));
    assert!(
        cuda.contains("CUDA") && cuda.ends_with("fell back to onnxruntime/cpu"),
        "{cuda}"
    );
    assert!(
        out.contains("activated cls v1 on onnxruntime/cpu (ONNX Runtime 1."),
        "{out}"
    );
    let models = agent(dir, &["models", "--data-dir", "data"]);
    assert!(
        models.success().contains("onnxruntime/cpu"),
        "{}",
        models.stdout
    );
}

#[test]
fn an_onnxruntime_older_than_the_agents_api_is_refused_with_its_version() {
    let tmp = setup();
    let dir = tmp.path();
    let cls = cases().pop().expect("cls");
    let bundle = build(dir, &cls);
    // scripts/test.sh keeps the library of the onnxruntime 1.19.2 wheel beside the venv.
    let old_dir = python()
        .parent()
        .and_then(Path::parent)
        .expect("venv")
        .join("old-onnxruntime");
    let old = std::fs::read_dir(&old_dir)
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/test.sh prepares it)", old_dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("libonnxruntime.so.1.19"))
        .expect("libonnxruntime.so.1.19.* from the old wheel");
    let board = board_with(dir, "old", &["onnxruntime", "cpu"], &["cpu"], &old);
    let out = install(dir, &bundle, "data", &board);
    let out = out.success();
    let refused = out
        .lines()
        .find(|l| l.starts_with("onnxruntime/cpu requested, "))
        .unwrap_or_else(|| panic!("the refusal is reported: {out}"));
    assert!(
        refused.contains("1.19.2") && refused.contains("needs ONNX Runtime 1.20 or newer"),
        "{refused}"
    );
    assert!(out.contains("activated cls v1 on cpu"), "{out}");
}

/// Builds the direction classifier at `model` into `out` with golden vectors for
/// `cls.npz` computed by ONNX Runtime and checked on tract and ONNX Runtime.
fn build_cls_checked(dir: &Path, model: &Path, out: &str) -> hil_tests::Run {
    let lib = onnxruntime_library();
    let (model, lib) = (model.to_string_lossy(), lib.to_string_lossy());
    fleetctl(
        dir,
        &[
            "bundle",
            "build",
            "--model",
            &model,
            "--name",
            "cls",
            "--version",
            "1",
            "--input-shape",
            "x=N,3,48,192",
            "--golden-inputs",
            "cls.npz",
            "--onnxruntime",
            &lib,
            "--backend",
            "onnxruntime",
            "--backend",
            "cpu",
            "--key",
            "keys/k.key",
            "--out",
            out,
        ],
    )
}

/// Writes `arrays` (name, numpy dtype, shape, values) to `path` with `numpy.savez`.
fn savez(path: &Path, arrays: &[(&str, &str, Vec<u64>, Vec<f64>)]) {
    let spec: Vec<Value> = arrays
        .iter()
        .map(|(n, d, s, v)| json!({"name": n, "dtype": d, "shape": s, "data": v}))
        .collect();
    let script = "import json, sys, numpy as np\n\
        spec = json.load(sys.stdin)\n\
        np.savez(sys.argv[1], **{a['name']: np.asarray(a['data'], dtype=a['dtype']).reshape(a['shape']) for a in spec})\n";
    let mut child = Command::new(python())
        .args(["-c", script, &path.to_string_lossy()])
        .stdin(Stdio::piped())
        .spawn()
        .expect("python starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(Value::Array(spec).to_string().as_bytes())
        .expect("arrays");
    assert!(child.wait().expect("numpy").success(), "numpy.savez failed");
}

#[test]
fn raw_tensor_bundles_carry_golden_vectors_computed_by_onnxruntime_and_checked_on_every_backend() {
    let tmp = setup();
    let dir = tmp.path();
    let lib = onnxruntime_library();
    let lib = lib.to_string_lossy();

    // The direction classifier: two images; tract and ONNX Runtime both checked.
    let cls = cases().pop().expect("cls");
    let x: Vec<f64> = pseudo_random(2 * 3 * 48 * 192, 9)
        .iter()
        .map(|v| f64::from(*v))
        .collect();
    savez(
        &dir.join("cls.npz"),
        &[("x", "float32", vec![2, 3, 48, 192], x)],
    );
    let built = build_cls_checked(dir, &cls.model, "cls.fmb");
    let out = built.success();
    assert!(
        out.contains("golden outputs computed by onnxruntime 1."),
        "{out}"
    );
    assert!(out.contains("golden check on cpu: agrees"), "{out}");
    assert!(out.contains("golden check on onnxruntime: agrees"), "{out}");
    let listing = fleetctl(dir, &["bundle", "inspect", "cls.fmb"]);
    assert!(
        listing.success().contains("golden.cbor") && listing.stdout.contains("golden-check.json"),
        "{}",
        listing.stdout
    );
    for backend in ["cpu", "onnxruntime"] {
        let board = board(dir, backend);
        let installed = install(dir, "cls.fmb", &format!("data-{backend}"), &board);
        assert!(
            installed
                .success()
                .contains("golden self-test passed: 2 rows"),
            "{backend}: {}",
            installed.stdout
        );
    }

    // Silero VAD: an int64 scalar among the golden inputs; tract cannot run it, which the
    // check says rather than hides.
    let vad = silero();
    let model = vad.model.to_string_lossy().into_owned();
    let audio: Vec<f64> = pseudo_random(512, 4)
        .iter()
        .map(|v| f64::from(*v) * 0.3)
        .collect();
    savez(
        &dir.join("vad.npz"),
        &[
            ("input", "float32", vec![1, 512], audio),
            ("state", "float32", vec![2, 1, 128], vec![0.0; 256]),
            ("sr", "int64", vec![], vec![16000.0]),
        ],
    );
    let built = fleetctl(
        dir,
        &[
            "bundle",
            "build",
            "--model",
            &model,
            "--name",
            "vad",
            "--version",
            "1",
            "--input-shape",
            "input=N,S",
            "--input-shape",
            "state=2,N,128",
            "--input-shape",
            "sr=",
            "--golden-inputs",
            "vad.npz",
            "--onnxruntime",
            &lib,
            "--backend",
            "onnxruntime",
            "--backend",
            "cpu",
            "--key",
            "keys/k.key",
            "--out",
            "vad.fmb",
        ],
    );
    let out = built.success();
    assert!(out.contains("golden check on onnxruntime: agrees"), "{out}");
    assert!(
        out.contains("golden check on cpu: not run: tract cannot run the model"),
        "{out}"
    );
    let board = board(dir, "onnxruntime");
    let installed = install(dir, "vad.fmb", "data-vad", &board);
    assert!(
        installed
            .success()
            .contains("golden self-test passed: 1 rows"),
        "{}",
        installed.stdout
    );

    // A .npz that does not fit the model is refused, naming the input.
    savez(
        &dir.join("bad.npz"),
        &[("x", "float32", vec![1, 3, 48, 100], vec![0.0; 14400])],
    );
    let model = cls.model.to_string_lossy().into_owned();
    let refused = fleetctl(
        dir,
        &[
            "bundle",
            "build",
            "--model",
            &model,
            "--name",
            "cls",
            "--version",
            "2",
            "--input-shape",
            "x=N,3,48,192",
            "--golden-inputs",
            "bad.npz",
            "--out",
            "bad.fmb",
        ],
    );
    let err = refused.failure();
    assert!(
        err.contains("array `x` is f32[1, 3, 48, 100]; the model's input is x: f32[N, 3, 48, 192]"),
        "{err}"
    );
}

/// Saves `model` again the way torch's exporter does for large models: every weight in
/// the external data file `location` (relative to `out`'s folder).
fn save_with_external_data(model: &Path, out: &Path, location: &str) {
    // PP-OCR keeps its weights in Constant nodes; an exporter writes initializers.
    let script = "import sys, onnx\n\
        from onnx import numpy_helper as nh\n\
        m = onnx.load(sys.argv[1])\n\
        g = m.graph\n\
        consts = [n for n in g.node if n.op_type == 'Constant' and n.attribute[0].name == 'value']\n\
        for n in consts:\n\
        \x20   g.initializer.append(nh.from_array(nh.to_array(n.attribute[0].t), n.output[0]))\n\
        \x20   g.node.remove(n)\n\
        onnx.save_model(m, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True, location=sys.argv[3], size_threshold=0)\n";
    let status = Command::new(python())
        .args([
            "-c",
            script,
            &model.to_string_lossy(),
            &out.to_string_lossy(),
            location,
        ])
        .status()
        .expect("python runs");
    assert!(status.success(), "onnx.save_model failed");
}

#[test]
fn models_with_external_data_are_packed_into_the_bundle_and_served_from_it() {
    let tmp = setup();
    let dir = tmp.path();
    let original = cases().pop().expect("cls");
    std::fs::create_dir(dir.join("export")).expect("dir");
    let model = dir.join("export/cls.onnx");
    save_with_external_data(&original.model, &model, "cls.onnx.data");
    assert!(
        std::fs::metadata(&model).expect("model").len() < 100_000,
        "the weights left the model file"
    );
    let x: Vec<f64> = pseudo_random(3 * 48 * 192, 5)
        .iter()
        .map(|v| f64::from(*v))
        .collect();
    savez(
        &dir.join("cls.npz"),
        &[("x", "float32", vec![1, 3, 48, 192], x)],
    );
    let built = build_cls_checked(dir, &model, "cls.fmb");
    let out = built.success();
    // Both backends ran the model with its weights from the packed file.
    assert!(out.contains("golden check on cpu: agrees"), "{out}");
    assert!(out.contains("golden check on onnxruntime: agrees"), "{out}");
    let listing = fleetctl(dir, &["bundle", "inspect", "cls.fmb"]);
    assert!(
        listing.success().contains("model.onnx.data"),
        "{}",
        listing.stdout
    );
    // The device never sees the exporter's folder: only the bundle.
    std::fs::remove_dir_all(dir.join("export")).expect("rm");
    for backend in ["cpu", "onnxruntime"] {
        let board = board(dir, backend);
        let installed = install(dir, "cls.fmb", &format!("data-{backend}"), &board);
        assert!(
            installed
                .success()
                .contains("golden self-test passed: 1 rows"),
            "{backend}: {}",
            installed.stdout
        );
    }
    let running = hil_tests::RunningAgent::start(
        dir,
        &[
            "run",
            "--data-dir",
            "data-onnxruntime",
            "--trust",
            "trust.toml",
            "--board",
            &board(dir, "onnxruntime").to_string_lossy(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let request = &original.requests[0];
    let ours = predict(&running, "cls", request);
    let theirs = hil_tests::onnxruntime_peer(&original.model, request);
    let w = worst(&ours, &theirs);
    assert!(w <= REL, "external-data cls against onnxruntime: {w:e}");

    // Attacks: a location outside the model's folder, directly or through a symbolic
    // link, is refused at build; nothing outside is read into the bundle.
    std::fs::create_dir(dir.join("evil")).expect("dir");
    let escaping = dir.join("evil/cls.onnx");
    save_with_external_data(&original.model, &escaping, "weights.data");
    std::fs::rename(dir.join("evil/weights.data"), dir.join("stolen.data")).expect("mv");
    let clean = std::fs::read(&escaping).expect("model");
    for location in ["../stolen.data", "/etc/passwd"] {
        let names = std::collections::BTreeMap::from([("weights.data".into(), location.into())]);
        let crafted = fleetml_inference::external::relocate(&clean, &names).expect("relocates");
        std::fs::write(&escaping, crafted).expect("crafted model");
        let refused = build_cls_checked(dir, &escaping, "evil.fmb");
        let err = refused.failure();
        assert!(
            err.contains(&format!("`{location}`"))
                && err.contains("relative path inside the model's folder"),
            "{err}"
        );
    }
    std::fs::create_dir(dir.join("linked")).expect("dir");
    let linked = dir.join("linked/cls.onnx");
    save_with_external_data(&original.model, &linked, "weights.data");
    std::fs::rename(dir.join("linked/weights.data"), dir.join("outside.data")).expect("mv");
    std::os::unix::fs::symlink(dir.join("outside.data"), dir.join("linked/weights.data"))
        .expect("symlink");
    let refused = build_cls_checked(dir, &linked, "linked.fmb");
    let err = refused.failure();
    assert!(err.contains("outside the model's folder"), "{err}");
    assert!(!dir.join("evil.fmb").exists() && !dir.join("linked.fmb").exists());
}

#[test]
fn the_agent_listens_at_once_and_serves_each_model_as_soon_as_it_is_ready() {
    let tmp = setup();
    let dir = tmp.path();
    let lib = onnxruntime_library();
    let lib = lib.to_string_lossy();
    // PP-OCRv4's detector with golden inputs at 640×640: its load and self-test on
    // tract take a while; the classifier loads quickly.
    let x: Vec<f64> = pseudo_random(3 * 640 * 640, 2)
        .iter()
        .map(|v| f64::from(*v))
        .collect();
    savez(
        &dir.join("det.npz"),
        &[("x", "float32", vec![1, 3, 640, 640], x)],
    );
    let det = cases().remove(0);
    let model = det.model.to_string_lossy().into_owned();
    fleetctl(
        dir,
        &[
            "bundle",
            "build",
            "--model",
            &model,
            "--name",
            "a-det",
            "--version",
            "1",
            "--input-shape",
            "x=N,3,H,W",
            "--golden-inputs",
            "det.npz",
            "--onnxruntime",
            &lib,
            "--key",
            "keys/k.key",
            "--out",
            "det.fmb",
        ],
    )
    .success();
    let cls = cases().pop().expect("cls");
    let bundle = build(dir, &cls);
    let board = board(dir, "cpu");
    for b in ["det.fmb", bundle.as_str()] {
        install(dir, b, "data", &board).success();
    }
    let mut cmd = Command::new(hil_tests::bin("fleet-agent"));
    cmd.current_dir(dir).args([
        "run",
        "--data-dir",
        "data",
        "--trust",
        "trust.toml",
        "--board",
        &board.to_string_lossy(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let running = hil_tests::RunningAgent::spawn(cmd);
    // Listening before any model is loaded: health answers, readiness says what loads.
    let (status, body) = running.request("GET", "/healthz", &Value::Null);
    assert_eq!(status, 200, "{body}");
    let (status, ready) = running.request("GET", "/readyz", &Value::Null);
    assert_eq!(status, 503, "the detector is still loading: {ready}");
    assert!(
        ready["loading"]
            .as_array()
            .is_some_and(|l| l.contains(&json!("a-det"))),
        "{ready}"
    );
    let (_, models) = running.request("GET", "/v1/models", &Value::Null);
    assert!(
        models["models"]
            .as_array()
            .expect("models")
            .iter()
            .any(|m| m["name"] == "a-det" && m["state"] == "loading"),
        "{models}"
    );
    // A request for a model still loading waits for it instead of failing.
    let ours = predict(&running, "cls", &cls.requests[0]);
    assert_eq!(ours[0].shape, vec![1, 2]);
    running.wait_ready();
    let (_, models) = running.request("GET", "/v1/models", &Value::Null);
    for m in models["models"].as_array().expect("models") {
        assert_eq!(m["state"], "serving", "{models}");
        assert!(m["memory_bytes"].as_u64().is_some(), "{models}");
    }
    let det_memory = models["models"]
        .as_array()
        .expect("models")
        .iter()
        .find(|m| m["name"] == "a-det")
        .and_then(|m| m["memory_bytes"].as_u64())
        .expect("det");
    // Its weights alone are 4.7 MB.
    assert!(det_memory > 4 << 20, "{models}");
    let (_, metrics) = running.request("GET", "/metrics", &Value::Null);
    let metrics = metrics.as_str().expect("text");
    assert!(
        metrics.contains("fleetml_agent_model_memory_bytes{model=\"a-det\"}"),
        "{metrics}"
    );
    // A model nobody installed is still refused at once.
    let (status, body) = running.request("POST", "/v1/models/nope/predict", &json!({}));
    assert_eq!(status, 404, "{body}");
}
