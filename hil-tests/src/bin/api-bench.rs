//! `api-bench`: latency and throughput of a model through the agent's backend called
//! directly, and through the running agent's HTTP API (TCP or Unix socket).
//!
//! ```text
//! api-bench direct --model claims|cls [--seconds S]
//! api-bench http --model claims|cls (--addr HOST:PORT | --socket PATH) [--clients N] [--seconds S] [--features]
//! ```
//! Prints one line: `mode model clients p50_us p99_us requests_per_second`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fleetml_inference::CpuModel;
use fleetml_protocol::features::{FeatureSchema, RawValue};
use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::TensorSpec;
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
        "cls" => {
            let data: Vec<f32> = (0..3 * 48 * 192)
                .map(|i| ((i * 7919 % 2000) as f32 / 1000.0) - 1.0)
                .collect();
            let declared = vec![hil_tests::cls_input()];
            (Tensor::f32("x", vec![1, 3, 48, 192], data), declared)
        }
        other => panic!("unknown model {other} (claims or cls)"),
    }
}

fn model_path(model: &str, args: &[String]) -> PathBuf {
    match model {
        "claims" => hil_tests::root().join("models/claims/model.onnx"),
        _ => PathBuf::from(arg(args, "--onnx").expect("--onnx PATH of the cls model")),
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
        "{mode} {model} {clients} {:.1} {:.1} {:.0}",
        pct(0.50),
        pct(0.99),
        latencies.len() as f64 / elapsed.as_secs_f64()
    );
}

/// Times one backend call after a warm-up, for `seconds`, and prints the cell.
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
    while start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        std::hint::black_box(backend.run(inputs).expect("runs"));
        latencies.push(t.elapsed());
    }
    report(mode, model, 1, latencies, start.elapsed());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let model = arg(&args, "--model").unwrap_or_else(|| "claims".into());
    let seconds: f64 = arg(&args, "--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let (tensor, declared) = input(&model);
    match mode.as_str() {
        "direct" => {
            let m = CpuModel::load_with_inputs(
                &std::fs::read(model_path(&model, &args)).expect("model"),
                &declared,
            )
            .expect("loads");
            time_backend("direct", &model, &m, &[tensor], seconds);
        }
        #[cfg(feature = "gpu")]
        "gpu" => {
            // The GPU backend's call: the model prepared for wonnx (batch 1), on the
            // adapter fleet_agent::gpu::probe finds.
            let onnx = std::fs::read(model_path(&model, &args)).expect("model");
            let prepared =
                fleetml_inference::prepare::prepare_gpu(&onnx, &declared, 1).expect("prepares");
            let m = fleet_agent::gpu::GpuModel::load(&onnx, Some(&prepared.onnx), &declared)
                .expect("wonnx compiles the model");
            eprintln!("adapter: {}", m.adapter());
            time_backend("gpu", &model, &m, &[tensor], seconds);
        }
        "http" => {
            let clients: usize = arg(&args, "--clients")
                .and_then(|s| s.parse().ok())
                .unwrap_or(1);
            let name = if model == "cls" { "textdir" } else { "claims" };
            let body = if args.iter().any(|a| a == "--features") {
                json!({ "features": claims_row() }).to_string()
            } else {
                json!({ "inputs": [{"name": tensor.name, "shape": tensor.shape, "data": tensor.data.to_f32()}] }).to_string()
            };
            let path = format!("/v1/models/{name}/predict");
            let addr = arg(&args, "--addr");
            let socket = arg(&args, "--socket");
            let start = Instant::now();
            let handles: Vec<_> = (0..clients)
                .map(|_| {
                    let (body, path, addr, socket) =
                        (body.clone(), path.clone(), addr.clone(), socket.clone());
                    std::thread::spawn(move || {
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
                        while start.elapsed().as_secs_f64() < seconds {
                            let t = Instant::now();
                            let (status, _) = match &mut conn {
                                Conn::Tcp(c) => {
                                    c.request("POST", &path, "application/json", body.as_bytes())
                                }
                                Conn::Unix(c) => {
                                    c.request("POST", &path, "application/json", body.as_bytes())
                                }
                            }
                            .expect("HTTP");
                            assert_eq!(status, 200, "request failed");
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
            let mode = if args.iter().any(|a| a == "--features") {
                format!("{kind}-features")
            } else {
                kind.to_string()
            };
            report(&mode, &model, clients, latencies, start.elapsed());
        }
        _ => {
            eprintln!(
                "usage: api-bench direct|http --model claims|cls [--onnx PATH] [--addr A | --socket S] [--clients N] [--seconds S] [--features]"
            );
            std::process::exit(2);
        }
    }
}
