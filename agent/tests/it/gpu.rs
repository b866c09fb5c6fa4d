//! The GPU backend (wonnx), built with the `gpu` feature. These tests run on whatever
//! adapter wgpu finds (CI installs Mesa's software Vulkan device and sets
//! FLEETML_GPU_ALLOW_SOFTWARE=1); with none, each prints why and checks the fallback to
//! the CPU instead. Nothing here can panic for want of a GPU.

use std::path::PathBuf;
use std::process::Command;

use fleet_agent::backend::{self, Backend, ModelFiles};
use fleet_agent::gpu::{self, GpuModel};
use fleet_agent::runtime::CpuModel;
use fleetml_inference::prepare;
use fleetml_protocol::board::Backend as Kind;
use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::{DType, Dim, TensorSpec};
use prost::Message;
use tract_onnx::pb;

use super::{board, claims_model, golden};

const GPU_BOARD: &str = "[[accelerators]]\nkind = \"gpu\"\nname = \"any\"\napi = \"vulkan\"\n";

/// Largest difference relative to max(|expected|, 1e-3).
fn worst_relative(ours: &[Tensor], theirs: &[Tensor]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let mut worst = 0f32;
    for (a, b) in ours.iter().zip(theirs) {
        assert_eq!(a.shape, b.shape, "output {}", a.name);
        for (x, y) in a.data.to_f32().iter().zip(&b.data.to_f32()) {
            worst = worst.max((x - y).abs() / y.abs().max(1e-3));
        }
    }
    worst
}

#[test]
fn probing_reports_an_adapter_or_why_not_and_never_panics() {
    match gpu::probe() {
        Ok(adapter) => println!("GPU adapter: {adapter}"),
        Err(reason) => {
            println!("no usable GPU adapter: {reason}");
            assert!(reason.starts_with("not available: "), "{reason}");
        }
    }
}

/// The claims model's first layer multiplies one row by a 25-row matrix, which wonnx
/// 0.5.1 computes wrongly (its one-row kernel drops K mod 4); the compatibility check
/// says so before anything runs, and the model falls back to the CPU.
#[test]
fn the_claims_model_falls_back_to_the_cpu_naming_the_kernel_wonnx_gets_wrong() {
    let onnx = claims_model();
    let cpu = CpuModel::load(&onnx).expect("tract loads it");
    let g = golden(&cpu, 4).to_cbor();
    let b = board("[\"gpu\", \"cpu\"]", GPU_BOARD);
    let selection = backend::select(&b, &ModelFiles::new(&onnx, &[]), Some(&g)).expect("selects");
    assert_eq!(selection.backend.kind(), Kind::Cpu);
    assert_eq!(selection.self_test.as_ref().map(|t| t.rows), Some(4));
    let expected = match gpu::probe() {
        Ok(_) => "gpu requested, wonnx-0.5.1 cannot run operators MatMul with one row and an inner dimension not a multiple of 4 (1), fell back to cpu".to_string(),
        Err(reason) => {
            println!("no GPU adapter: {reason}");
            format!("gpu requested, {reason}, fell back to cpu")
        }
    };
    assert_eq!(selection.report(), vec![expected]);
}

/// `x: f32[1, 4] -> Erf -> y`: an operator wonnx 0.5.1 does not have.
fn erf_model() -> Vec<u8> {
    let tensor = |name: &str| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: [1, 4]
                        .iter()
                        .map(|n| pb::tensor_shape_proto::Dimension {
                            denotation: String::new(),
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(*n)),
                        })
                        .collect(),
                }),
            })),
        }),
        doc_string: String::new(),
    };
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            node: vec![pb::NodeProto {
                input: vec!["x".into()],
                output: vec!["y".into()],
                name: "erf".into(),
                op_type: "Erf".into(),
                ..Default::default()
            }],
            name: "g".into(),
            input: vec![tensor("x")],
            output: vec![tensor("y")],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn a_model_with_an_operator_wonnx_lacks_falls_back_naming_it() {
    let onnx = erf_model();
    let b = board("[\"gpu\", \"cpu\"]", GPU_BOARD);
    let selection = backend::select(&b, &ModelFiles::new(&onnx, &[]), None).expect("cpu runs it");
    assert_eq!(selection.backend.kind(), Kind::Cpu);
    let expected = match gpu::probe() {
        Ok(_) => {
            "gpu requested, wonnx-0.5.1 cannot run operators Erf (1), fell back to cpu".to_string()
        }
        Err(reason) => format!("gpu requested, {reason}, fell back to cpu"),
    };
    assert_eq!(selection.report(), vec![expected]);
}

/// PP-OCR's text-direction classifier from the rapidocr-onnxruntime wheel of the test
/// venv (`FLEETML_PYTHON`, set by scripts/test.sh).
fn cls_model() -> Option<PathBuf> {
    let python = std::env::var_os("FLEETML_PYTHON")?;
    let out = Command::new(python)
        .args(["-c", "import os, rapidocr_onnxruntime as r; print(os.path.join(os.path.dirname(r.__file__), 'models', 'ch_ppocr_mobile_v2.0_cls_infer.onnx'))"])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    path.is_file().then_some(path)
}

#[test]
fn the_prepared_cls_cnn_runs_on_the_gpu_like_tract() {
    let Some(path) = cls_model() else {
        println!(
            "skipping: FLEETML_PYTHON with rapidocr-onnxruntime is not set up (scripts/test.sh does it)"
        );
        return;
    };
    let adapter = match gpu::probe() {
        Ok(a) => a,
        Err(reason) => {
            println!("skipping the GPU run: {reason}");
            return;
        }
    };
    let onnx = std::fs::read(&path).expect("cls model");
    let declared = [TensorSpec {
        name: "x".into(),
        dtype: DType::F32,
        shape: vec![
            Dim::Symbol("N".into()),
            Dim::Fixed(3),
            Dim::Fixed(48),
            Dim::Fixed(192),
        ],
    }];
    let prepared = prepare::prepare_gpu(&onnx, &declared, 1).expect("prepares");
    assert!(
        prepared.report.is_compatible(),
        "{}",
        prepared.report.summary()
    );
    let gpu = GpuModel::load(&onnx, Some(&prepared.onnx), &declared).expect("wonnx compiles it");
    let cpu = CpuModel::load_with_inputs(&onnx, &declared).expect("tract loads it");
    let n = 2usize;
    let input = Tensor::f32(
        "x",
        vec![n as u64, 3, 48, 192],
        (0..n * 3 * 48 * 192)
            .map(|i| ((i * 7919 % 2000) as f32 / 1000.0) - 1.0)
            .collect(),
    );
    let ours = gpu.run(std::slice::from_ref(&input)).expect("wonnx runs");
    let theirs = cpu.run(&[input]).expect("tract runs");
    let worst = worst_relative(&ours, &theirs);
    println!("cls on {adapter}: max relative difference to tract {worst:e}");
    assert!(worst <= 1e-4, "{worst:e}");
}
