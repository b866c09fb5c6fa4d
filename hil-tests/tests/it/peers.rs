//! Outputs equal the peer's: tract (the agent's CPU backend) against onnxruntime from
//! PyPI, on the example model and on PP-OCR's text-direction classifier (a real CNN
//! shipped in the `rapidocr-onnxruntime` wheel). The Python venv comes from
//! `scripts/test.sh` (`FLEETML_PYTHON`).

use std::path::PathBuf;
use std::process::Command;

use fleet_agent::runtime::CpuModel;
use fleetml_protocol::features::{FeatureSchema, RawValue};
use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::Dim;
use hil_tests::{install, python, root};
use serde_json::json;

/// Relative tolerance of the comparison; values below `FLOOR` in magnitude are compared
/// absolutely against `REL * FLOOR`.
const REL: f32 = 1e-4;
const FLOOR: f32 = 1e-3;

/// The peer's outputs as f32 tensors.
fn onnxruntime(model: &std::path::Path, inputs: &[Tensor]) -> Vec<Tensor> {
    hil_tests::onnxruntime_peer(model, inputs)
        .into_iter()
        .map(|(name, shape, data)| {
            Tensor::f32(name, shape, data.iter().map(|x| *x as f32).collect())
        })
        .collect()
}

/// Largest relative difference (with the floor), asserting shapes match.
fn compare(ours: &[Tensor], theirs: &[Tensor]) -> f32 {
    let mut worst = 0f32;
    for t in theirs {
        let o = ours
            .iter()
            .find(|o| o.name == t.name)
            .unwrap_or_else(|| panic!("tract has no output {}", t.name));
        assert_eq!(o.shape, t.shape, "output {}", t.name);
        for (a, b) in o.data.to_f32().iter().zip(&t.data.to_f32()) {
            worst = worst.max((a - b).abs() / b.abs().max(FLOOR));
        }
    }
    worst
}

#[test]
fn claims_model_outputs_equal_onnxruntime() {
    let dir = root().join("models/claims");
    let schema = FeatureSchema::from_toml(
        &std::fs::read_to_string(dir.join("features.toml")).expect("schema"),
    )
    .expect("valid");
    let csv = std::fs::read_to_string(dir.join("holdout.csv")).expect("holdout");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let rows: Vec<Vec<RawValue>> = lines
        .take(200)
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            schema
                .features
                .iter()
                .map(|f| {
                    RawValue::parse(
                        cells[header.iter().position(|h| *h == f.name).expect("column")],
                    )
                })
                .collect()
        })
        .collect();
    let mut data = vec![0f32; rows.len() * 25];
    for (row, out) in rows.iter().zip(data.chunks_mut(25)) {
        schema.encode_row("input", row, out);
    }
    let inputs = vec![Tensor::f32("input", vec![rows.len() as u64, 25], data)];
    let model =
        CpuModel::load(&std::fs::read(dir.join("model.onnx")).expect("model")).expect("loads");
    let worst = compare(
        &model.run(&inputs).expect("tract runs"),
        &onnxruntime(&dir.join("model.onnx"), &inputs),
    );
    assert!(worst <= REL, "max relative difference {worst:e} > {REL:e}");
}

/// Path of PP-OCR's text-direction classifier inside the rapidocr-onnxruntime wheel.
fn cls_model() -> PathBuf {
    let out = Command::new(python())
        .args(["-c", "import os, rapidocr_onnxruntime as r; print(os.path.join(os.path.dirname(r.__file__), 'models', 'ch_ppocr_mobile_v2.0_cls_infer.onnx'))"])
        .output()
        .expect("python runs");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(path.is_file(), "cls model not found at {}", path.display());
    path
}

/// A deterministic image batch in the model's normalized range [-1, 1].
fn cls_batch(n: usize) -> Tensor {
    let len = n * 3 * 48 * 192;
    let data: Vec<f32> = (0..len)
        .map(|i| ((i * 7919 % 2000) as f32 / 1000.0) - 1.0)
        .collect();
    Tensor::f32("x", vec![n as u64, 3, 48, 192], data)
}

/// The GPU preparation pass on a real CNN needs no GPU: shapes become static and are
/// written into `value_info`, `HardSigmoid` is lowered, and the rewritten model computes
/// what the original does (checked with tract).
#[test]
fn gpu_preparation_of_the_cls_model_fills_shapes_and_lowers_hard_sigmoid() {
    use fleetml_inference::prepare;
    use prost::Message;
    use tract_onnx::pb;

    let path = cls_model();
    let onnx = std::fs::read(&path).expect("model");
    let declared = [hil_tests::cls_input()];
    let original = pb::ModelProto::decode(&onnx[..]).expect("decodes");
    let hard_sigmoids = original
        .graph
        .as_ref()
        .expect("graph")
        .node
        .iter()
        .filter(|n| n.op_type == "HardSigmoid")
        .count();
    assert!(hard_sigmoids > 0, "the cls model uses HardSigmoid");

    let prepared = prepare::prepare_gpu(&onnx, &declared, 2).expect("prepares");
    let report = &prepared.report;
    assert_eq!(report.lowered.get("HardSigmoid"), Some(&hard_sigmoids));
    assert!(report.is_compatible(), "{}", report.summary());
    assert_eq!(
        report.inputs[0].shape,
        vec![
            Dim::Fixed(2),
            Dim::Fixed(3),
            Dim::Fixed(48),
            Dim::Fixed(192)
        ]
    );

    let graph = pb::ModelProto::decode(&prepared.onnx[..])
        .expect("re-encoded model decodes")
        .graph
        .expect("graph");
    assert!(graph.node.iter().all(|n| n.op_type != "HardSigmoid"));
    let typed: std::collections::HashSet<&str> = graph
        .value_info
        .iter()
        .chain(&graph.output)
        .filter(|v| {
            matches!(
                v.r#type.as_ref().and_then(|t| t.value.as_ref()),
                Some(pb::type_proto::Value::TensorType(t)) if t.shape.as_ref().is_some_and(|s| {
                    s.dim.iter().all(|d| matches!(d.value, Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if n > 0))
                })
            )
        })
        .map(|v| v.name.as_str())
        .collect();
    for node in &graph.node {
        for out in node.output.iter().filter(|o| !o.is_empty()) {
            assert!(
                typed.contains(out.as_str()),
                "{out} ({}) has no static shape",
                node.op_type
            );
        }
    }
    assert_eq!(report.shapes_filled, typed.len());

    let before = CpuModel::load_with_inputs(&onnx, &declared).expect("tract loads the original");
    let after = CpuModel::load(&prepared.onnx).expect("tract loads the prepared model");
    let batch = cls_batch(2);
    let worst = compare(
        &after
            .run(std::slice::from_ref(&batch))
            .expect("prepared runs"),
        &before.run(&[batch]).expect("original runs"),
    );
    assert!(worst <= REL, "max relative difference {worst:e}");
}

#[test]
fn ppocr_text_direction_classifier_outputs_equal_onnxruntime() {
    let path = cls_model();
    let declared = [hil_tests::cls_input()];
    let model = CpuModel::load_with_inputs(&std::fs::read(&path).expect("model"), &declared)
        .expect("tract loads the cls model");
    // A deterministic image batch in the model's normalized range [-1, 1].
    let n = 3 * 3 * 48 * 192;
    let data: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 2000) as f32 / 1000.0) - 1.0)
        .collect();
    let inputs = vec![Tensor::f32("x", vec![3, 3, 48, 192], data)];
    let worst = compare(
        &model.run(&inputs).expect("tract runs"),
        &onnxruntime(&path, &inputs),
    );
    assert!(worst <= REL, "max relative difference {worst:e} > {REL:e}");
}

#[test]
fn an_image_model_bundled_without_features_is_served_on_raw_tensors() {
    use hil_tests::{agent, fleetctl, keys_and_policy};
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let model = cls_model();
    keys_and_policy(dir, "k");
    let run = fleetctl(
        dir,
        &[
            "bundle",
            "build",
            "--model",
            &model.to_string_lossy(),
            "--name",
            "textdir",
            "--version",
            "1",
            "--out",
            "bad.fmb",
        ],
    );
    assert!(
        run.failure()
            .contains("does not say the shape of every input (x: f32[x:0, 3, ?, ?]); pass --input-shape NAME=D1,D2,…"),
        "{}",
        run.stderr
    );
    let built = fleetctl(
        dir,
        &[
            "bundle",
            "build",
            "--model",
            &model.to_string_lossy(),
            "--name",
            "textdir",
            "--version",
            "1",
            "--input-shape",
            "x=N,3,48,192",
            "--prepare",
            "gpu",
            "--key",
            "keys/k.key",
            "--out",
            "textdir.fmb",
        ],
    );
    assert!(
        built
            .success()
            .contains("gpu: wonnx-0.5.1 can run every operator of the model"),
        "{}",
        built.stdout
    );
    let inspect = fleetctl(dir, &["bundle", "inspect", "textdir.fmb"]);
    let listing = inspect.success();
    assert!(listing.contains("x: f32[N, 3, 48, 192]"), "{listing}");
    assert!(
        listing.contains("model.gpu.onnx") && listing.contains("gpu-compat.json"),
        "{listing}"
    );
    // Without --board, verify-bundle loads it on the CPU with the declared shapes too.
    assert!(
        agent(
            dir,
            &["verify-bundle", "textdir.fmb", "--trust", "trust.toml"]
        )
        .success()
        .contains("no golden.cbor")
    );
    install(dir, "textdir.fmb");

    let running = hil_tests::RunningAgent::start(
        dir,
        &[
            "run",
            "--data-dir",
            "data",
            "--trust",
            "trust.toml",
            "--listen",
            "127.0.0.1:0",
            "--max-body-bytes",
            "8388608",
        ],
    );
    let batch = cls_batch(2);
    let body =
        json!({ "inputs": [{"name": "x", "shape": batch.shape, "data": batch.data.to_f32()}] });
    let (status, reply) = running.request("POST", "/v1/models/textdir/predict", &body);
    let (rejected, why) = running.request(
        "POST",
        "/v1/models/textdir/predict",
        &json!({ "features": {"x": 1.0} }),
    );
    drop(running);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(rejected, 422, "{why}");

    let name = reply["predictions"][0]
        .as_object()
        .and_then(|o| o.keys().next().cloned())
        .expect("an output");
    let served: Vec<f32> = reply["predictions"]
        .as_array()
        .expect("rows")
        .iter()
        .flat_map(|row| row[&name].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_f64().map(|x| x as f32))
        .collect();
    let ours = vec![Tensor::f32(name.clone(), vec![2, 2], served)];
    let worst = compare(&ours, &onnxruntime(&model, &[batch]));
    assert!(
        worst <= REL,
        "served outputs differ from onnxruntime by {worst:e}"
    );
}
