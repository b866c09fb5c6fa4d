//! `api-bench`: latency and throughput of a model through a backend called directly, and
//! through the running agent's HTTP API (TCP or Unix socket).
//!
//! ```text
//! api-bench direct --model claims|cls|det|rec [--onnx PATH] [--backend tract|onnxruntime]
//!                  [--threads N] [--onnxruntime LIB] [--seconds S]
//! api-bench http --model claims|cls|det|rec --name SERVED (--addr HOST:PORT | --socket PATH)
//!                [--clients N] [--seconds S] [--features | --json]
//! ```
//! Prints one line: `mode model clients p50_us p99_us requests_per_second`.
//!
//! Inputs: claims one row; cls 1×3×48×192, det 1×3×640×640, rec 1×3×48×320, the same
//! pseudo-random values `scripts/ort_bench.py` feeds Python onnxruntime. Over HTTP the
//! image models send binary tensors (`application/octet-stream` both ways) unless
//! `--json`; claims sends a raw tensor as JSON, or named features with `--features`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fleetml_inference::CpuModel;
use fleetml_protocol::features::{FeatureSchema, RawValue};
use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::{DType, Dim, TensorSpec};
use serde_json::json;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn claims_row() -> serde_json::Value {
    json!({
        "claim_amount": 7875.09, "policy_tenure_months": 90, "customer_age": 54, "prior_claims": 0,
        "report_delay_days": 4, "vehicle_age_years": 0, "witness_count": 1, "deductible": 0,
        "annual_premium": 674.37, "incident_hour": 2, "injuries": 0, "claim_type": "home",
        "channel": "agent", "region": "east", "police_report": "yes"
    })
}

/// An image input `x` of 1×3×h×w and its declaration with symbolic N (and H, W when
/// `symbolic`).
fn image(h: u64, w: u64, symbolic_hw: (bool, bool)) -> (Tensor, Vec<TensorSpec>) {
    let n = (3 * h * w) as usize;
    let data: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 2000) as f32 / 1000.0) - 1.0)
        .collect();
    let dim = |sym: bool, name: &str, v: u64| {
        if sym {
            Dim::Symbol(name.into())
        } else {
            Dim::Fixed(v)
        }
    };
    let spec = TensorSpec {
        name: "x".into(),
        dtype: DType::F32,
        shape: vec![
            Dim::Symbol("N".into()),
            Dim::Fixed(3),
            dim(symbolic_hw.0, "H", h),
            dim(symbolic_hw.1, "W", w),
        ],
    };
    (Tensor::f32("x", vec![1, 3, h, w], data), vec![spec])
}

/// The input tensor of one request for `model`, and the model's declared inputs.
fn input(model: &str) -> (Tensor, Vec<TensorSpec>) {
    let root = hil_tests::root();
    match model {
        "claims" => {
            let schema = FeatureSchema::from_toml(
                &std::fs::read_to_string(root.join("models/claims/features.toml"))
                    .expect("features"),
            )
            .expect("schema");
            let row = claims_row();
            let raw: Vec<RawValue> = schema
                .features
                .iter()
                .map(|f| match &row[&f.name] {
                    serde_json::Value::Number(n) => {
                        RawValue::Number(n.as_f64().unwrap_or(f64::NAN))
                    }
                    serde_json::Value::String(s) => RawValue::Text(s.clone()),
                    _ => RawValue::Missing,
                })
                .collect();
            let mut data = vec![0f32; 25];
            schema.encode_row("input", &raw, &mut data);
            (Tensor::f32("input", vec![1, 25], data), vec![])
        }
        "cls" => image(48, 192, (false, false)),
        "det" => image(640, 640, (true, true)),
        "rec" => image(48, 320, (false, true)),
        other => panic!("unknown model {other} (claims, cls, det or rec)"),
    }
}

fn model_path(model: &str, args: &[String]) -> PathBuf {
    match model {
        "claims" => hil_tests::root().join("models/claims/model.onnx"),
        _ => PathBuf::from(arg(args, "--onnx").expect("--onnx PATH of the model")),
    }
}

fn report(
    mode: &str,
    model: &str,
    clients: usize,
    mut latencies: Vec<Duration>,
    elapsed: Duration,
) {
    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1e6
    };
    println!(
        "{mode} {model} {clients} {:.1} {:.1} {:.1}",
        pct(0.50),
        pct(0.99),
        latencies.len() as f64 / elapsed.as_secs_f64()
    );
}

/// Times one backend call after a warm-up, for `seconds` (at least 5 calls), and prints
/// the cell.
fn time_backend(
    mode: &str,
    model: &str,
    backend: &dyn fleet_agent::backend::Backend,
    inputs: &[Tensor],
    seconds: f64,
) {
    backend.run(inputs).expect("runs");
    let start = Instant::now();
    let mut latencies = Vec::new();
    while start.elapsed().as_secs_f64() < seconds || latencies.len() < 5 {
        let t = Instant::now();
        std::hint::black_box(backend.run(inputs).expect("runs"));
        latencies.push(t.elapsed());
    }
    report(mode, model, 1, latencies, start.elapsed());
}

fn direct(args: &[String], model: &str, seconds: f64) {
    let (tensor, declared) = input(model);
    let onnx = std::fs::read(model_path(model, args)).expect("model");
    let threads: usize = arg(args, "--threads")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let backend = arg(args, "--backend").unwrap_or_else(|| "tract".into());
    match backend.as_str() {
        "tract" => {
            assert!(
                fleetml_inference::set_tract_threads(threads),
                "this build runs tract on one thread: build with --features hil-tests/tract-threads"
            );
            let m = CpuModel::load_with_inputs(&onnx, &declared).expect("loads");
            time_backend(
                &format!("direct-tract-{threads}t"),
                model,
                &m,
                &[tensor],
                seconds,
            );
        }
        "onnxruntime" => {
            let lib = arg(args, "--onnxruntime").expect("--onnxruntime LIB");
            let lib = fleetml_inference::onnxruntime::library(std::path::Path::new(&lib))
                .expect("ONNX Runtime loads");
            let m = fleetml_inference::onnxruntime::OrtModel::load(
                lib,
                &onnx,
                fleetml_protocol::board::Provider::Cpu,
                Some(threads),
            )
            .expect("loads");
            time_backend(
                &format!("direct-ort-{threads}t"),
                model,
                &m,
                &[tensor],
                seconds,
            );
        }
        other => panic!("--backend {other}: tract or onnxruntime"),
    }
}

/// The request body and its headers.
fn request(args: &[String], model: &str, tensor: &Tensor) -> (Vec<u8>, Vec<(String, String)>) {
    let json_ct = vec![("Content-Type".to_string(), "application/json".to_string())];
    if args.iter().any(|a| a == "--features") {
        let body = json!({ "features": claims_row() }).to_string();
        return (body.into_bytes(), json_ct);
    }
    if model == "claims" || args.iter().any(|a| a == "--json") {
        let body = json!({ "inputs": [{"name": tensor.name, "shape": tensor.shape, "data": tensor.data.to_f32()}] }).to_string();
        return (body.into_bytes(), json_ct);
    }
    let shape: Vec<String> = tensor.shape.iter().map(u64::to_string).collect();
    let body: Vec<u8> = tensor
        .data
        .to_f32()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let headers = [
        ("Content-Type", "application/octet-stream"),
        ("Accept", "application/octet-stream"),
        ("x-fleetml-shape", &shape.join(",")),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    (body, headers)
}

fn http(args: &[String], model: &str, seconds: f64) {
    let (tensor, _) = input(model);
    let clients: usize = arg(args, "--clients")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let name = arg(args, "--name").unwrap_or_else(|| model.to_string());
    let (body, headers) = request(args, model, &tensor);
    let path = format!("/v1/models/{name}/predict");
    let addr = arg(args, "--addr");
    let socket = arg(args, "--socket");
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (body, headers, path, addr, socket) = (
                body.clone(),
                headers.clone(),
                path.clone(),
                addr.clone(),
                socket.clone(),
            );
            std::thread::spawn(move || {
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let mut latencies = Vec::new();
                // One keep-alive connection per client, like a real application.
                enum Conn {
                    Tcp(hil_tests::KeepAlive<std::net::TcpStream>),
                    Unix(hil_tests::KeepAlive<std::os::unix::net::UnixStream>),
                }
                let mut conn = match (&addr, &socket) {
                    (Some(a), _) => {
                        let s = std::net::TcpStream::connect(a).expect("tcp");
                        s.set_nodelay(true).expect("nodelay");
                        Conn::Tcp(hil_tests::KeepAlive::new(s))
                    }
                    (None, Some(s)) => Conn::Unix(hil_tests::KeepAlive::new(
                        std::os::unix::net::UnixStream::connect(s).expect("unix"),
                    )),
                    _ => panic!("--addr or --socket"),
                };
                while start.elapsed().as_secs_f64() < seconds || latencies.len() < 5 {
                    let t = Instant::now();
                    let (status, reply) = match &mut conn {
                        Conn::Tcp(c) => c.request_with("POST", &path, &headers, &body),
                        Conn::Unix(c) => c.request_with("POST", &path, &headers, &body),
                    }
                    .expect("HTTP");
                    assert_eq!(
                        status,
                        200,
                        "request failed: {}",
                        String::from_utf8_lossy(&reply)
                    );
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let latencies: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("client"))
        .collect();
    let kind = if addr.is_some() { "tcp" } else { "unix" };
    let mode = match arg(args, "--label") {
        Some(label) => format!("{kind}-{label}"),
        None if args.iter().any(|a| a == "--features") => format!("{kind}-features"),
        None => kind.to_string(),
    };
    report(&mode, model, clients, latencies, start.elapsed());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let model = arg(&args, "--model").unwrap_or_else(|| "claims".into());
    let seconds: f64 = arg(&args, "--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    match mode.as_str() {
        "direct" => direct(&args, &model, seconds),
        #[cfg(feature = "gpu")]
        "gpu" => {
            // The GPU backend's call: the model prepared for wonnx (batch 1), on the
            // adapter fleet_agent::gpu::probe finds.
            let (tensor, declared) = input(&model);
            let onnx = std::fs::read(model_path(&model, &args)).expect("model");
            let prepared =
                fleetml_inference::prepare::prepare_gpu(&onnx, &declared, 1).expect("prepares");
            let m = fleet_agent::gpu::GpuModel::load(&onnx, Some(&prepared.onnx), &declared)
                .expect("wonnx compiles the model");
            eprintln!("adapter: {}", m.adapter());
            time_backend("gpu", &model, &m, &[tensor], seconds);
        }
        "http" => http(&args, &model, seconds),
        _ => {
            eprintln!(
                "usage: api-bench direct|http --model claims|cls|det|rec [--onnx PATH] [--backend tract|onnxruntime] [--threads N] [--onnxruntime LIB] [--name SERVED] [--addr A | --socket S] [--clients N] [--seconds S] [--features | --json] [--label L]"
            );
            std::process::exit(2);
        }
    }
}
