//! The agent's local prediction API, through the real `fleet-agent run` process.

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use hil_tests::{RunningAgent, agent, build_claims, fleetctl, http, install, keys_and_policy};
use serde_json::{Value, json};

/// The test agent: `fleet-agent run` on the store in `data`, any free loopback port.
struct Agent;

impl Agent {
    fn start(dir: &Path, extra: &[&str]) -> RunningAgent {
        RunningAgent::serve_store(dir, extra)
    }
}

trait Predict {
    fn predict(&self, body: &Value) -> (u16, Value);
}

impl Predict for RunningAgent {
    fn predict(&self, body: &Value) -> (u16, Value) {
        self.request("POST", "/v1/models/claims/predict", body)
    }
}

fn claim() -> Value {
    json!({
        "claim_amount": 7875.09, "policy_tenure_months": 90, "customer_age": 54, "prior_claims": 0,
        "report_delay_days": 4, "vehicle_age_years": 0, "witness_count": 1, "deductible": 0,
        "annual_premium": 674.37, "incident_hour": 2, "injuries": 0, "claim_type": "home",
        "channel": "agent", "region": "east", "police_report": "yes"
    })
}

/// Keys, a policy, bundles v1 and v2 of the claims model, and v1 installed.
fn setup(dir: &Path) -> [String; 2] {
    keys_and_policy(dir, "k");
    let bundles = [1, 2].map(|v| {
        let out = format!("claims-v{v}.fmb");
        build_claims(dir, v, &out, &["--key", "keys/k.key"]);
        out
    });
    install(dir, &bundles[0]);
    bundles
}

#[test]
fn the_prediction_api_serves_the_active_model_over_tcp_and_a_unix_socket() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    setup(dir);
    let jetson = hil_tests::root().join("boards/jetson-orin-nano.toml");
    let agent = Agent::start(
        dir,
        &[
            "--socket",
            "agent.sock",
            "--board",
            &jetson.to_string_lossy(),
        ],
    );

    let (status, body) = agent.predict(&json!({ "features": claim(), "timestamp": 1.0 }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            body["model"].as_str(),
            body["version"].as_u64(),
            body["backend"].as_str()
        ),
        (Some("claims"), Some(1), Some("cpu"))
    );
    let p = body["predictions"][0]["probabilities"]
        .as_array()
        .expect("probabilities");
    let sum: f64 = p.iter().filter_map(Value::as_f64).sum();
    assert!((sum - 1.0).abs() < 1e-5, "{body}");
    assert_eq!(body["request_id"].as_str().map(str::len), Some(16));
    assert!(
        body["lag_seconds"].as_f64().is_some_and(|l| l > 1.0e9),
        "{body}"
    );

    let mut missing_witnesses = claim();
    missing_witnesses["witness_count"] = Value::Null; // imputed, so allowed
    let (status, body) = agent.predict(&json!({ "features": [claim(), missing_witnesses] }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["predictions"].as_array().map(Vec::len), Some(2));

    let mut inputs = vec![0f32; 25];
    inputs[0] = 1000.0;
    let (status, body) =
        agent.predict(&json!({ "inputs": [{"name": "input", "shape": [1, 25], "data": inputs}] }));
    assert_eq!(status, 200, "{body}");

    // CBOR in, CBOR out.
    let cbor = serde_cbor::to_vec(&json!({ "features": claim() })).expect("cbor");
    let (status, raw) = http(
        TcpStream::connect(&agent.addr).expect("tcp"),
        "POST",
        "/v1/models/claims/predict",
        "application/cbor",
        &cbor,
    )
    .expect("HTTP");
    assert_eq!(status, 200);
    let decoded: Value = serde_cbor::from_slice(&raw).expect("CBOR response");
    assert_eq!(decoded["version"], 1);

    // The same over the Unix socket.
    let unix =
        std::os::unix::net::UnixStream::connect(dir.join("agent.sock")).expect("unix socket");
    let (status, raw) = http(
        unix,
        "POST",
        "/v1/models/claims/predict",
        "application/json",
        json!({ "features": claim() }).to_string().as_bytes(),
    )
    .expect("HTTP");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&raw));

    let (status, body) = agent.request("GET", "/v1/models", &Value::Null);
    assert_eq!(status, 200);
    assert_eq!(body["models"][0]["name"], "claims");
    assert_eq!(agent.request("GET", "/healthz", &Value::Null).0, 200);
    let (status, metrics) = agent.request("GET", "/metrics", &Value::Null);
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap_or_default();
    assert!(text.contains("fleetml_agent_predictions_total"), "{text}");
    // The Jetson profile asks for the GPU first; this build has none, so the model fell back.
    assert!(
        text.lines()
            .any(|l| l.starts_with("fleetml_agent_backend_fallbacks_total")
                && l.contains("requested=\"gpu\"")
                && l.contains("chosen=\"cpu\"")),
        "{text}"
    );
    let (_, models) = agent.request("GET", "/v1/models", &Value::Null);
    assert!(
        models["models"][0]["fallbacks"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f
                .as_str()
                .is_some_and(|f| f.starts_with("gpu requested, not available")))),
        "{models}"
    );
}

#[test]
fn every_bad_request_gets_a_4xx_naming_the_field() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    setup(dir);
    let agent = Agent::start(dir, &[]);
    let with = |key: &str, value: Value| {
        let mut c = claim();
        if value.is_null() {
            c.as_object_mut().expect("object").remove(key);
        } else {
            c[key] = value;
        }
        json!({ "features": c })
    };
    let cases: Vec<(Value, u16, Option<&str>, &str)> = vec![
        (
            with("customer_age", Value::Null),
            422,
            Some("features.customer_age"),
            "missing feature `customer_age`",
        ),
        (
            with("customer_age", json!("old")),
            422,
            Some("features.customer_age"),
            "must be a number",
        ),
        (
            with("customer_age", json!(54.5)),
            422,
            Some("features.customer_age"),
            "must be an integer",
        ),
        (
            with("claim_amount", json!(-5)),
            422,
            Some("features.claim_amount"),
            "outside its valid range 0..1000000",
        ),
        (
            with("channel", json!("fax")),
            422,
            Some("features.channel"),
            "`channel` = `fax` is not one of agent, online, phone",
        ),
        (
            with("channel", json!(3)),
            422,
            Some("features.channel"),
            "must be a string",
        ),
        (
            with("colour", json!("red")),
            422,
            Some("features.colour"),
            "unknown feature `colour`",
        ),
        (
            json!({ "features": [claim(), 5] }),
            422,
            Some("features[1]"),
            "each row must be an object",
        ),
        (
            json!({ "features": [] }),
            422,
            Some("features"),
            "a batch holds 1 to",
        ),
        (
            json!({ "inputs": [{"name": "input", "shape": [1, 24], "data": vec![0.0; 24]}] }),
            422,
            Some("inputs.input"),
            "the model expects [N, 25]",
        ),
        (
            json!({ "inputs": [{"name": "input", "shape": [1, 25], "data": [1.0]}] }),
            422,
            Some("inputs.input"),
            "has shape [1, 25] (25 values) but `data` has 1",
        ),
        (
            json!({ "inputs": [] }),
            422,
            Some("inputs.input"),
            "missing input tensor `input`",
        ),
        (
            json!({ "features": claim(), "inputs": [] }),
            400,
            None,
            "exactly one of",
        ),
        (
            json!({ "feature": claim() }),
            422,
            Some("feature"),
            "unknown field `feature`",
        ),
        (json!([1, 2]), 400, None, "body must be an object"),
    ];
    for (body, status, field, message) in cases {
        let (got, reply) = agent.predict(&body);
        assert_eq!(got, status, "{body} -> {reply}");
        assert_eq!(reply["field"].as_str(), field, "{body} -> {reply}");
        assert!(
            reply["error"].as_str().is_some_and(|e| e.contains(message)),
            "{body} -> {reply}"
        );
    }
    let (status, reply) = agent.request(
        "POST",
        "/v1/models/fraud/predict",
        &json!({ "features": claim() }),
    );
    assert_eq!(
        (status, reply["error"].as_str()),
        (404, Some("no model named `fraud` is active"))
    );
    let stream = TcpStream::connect(&agent.addr).expect("tcp");
    let (status, raw) = http(
        stream,
        "POST",
        "/v1/models/claims/predict",
        "application/json",
        b"{\"features\": ",
    )
    .expect("HTTP");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&raw));
    let huge = vec![b' '; 2 << 20];
    let stream = TcpStream::connect(&agent.addr).expect("tcp");
    let (status, raw) = http(
        stream,
        "POST",
        "/v1/models/claims/predict",
        "application/json",
        &huge,
    )
    .expect("HTTP");
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&raw));
    // Still serving after all that.
    assert_eq!(agent.predict(&json!({ "features": claim() })).0, 200);
}

#[test]
fn hot_swap_under_load_loses_no_request() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let bundles = setup(dir);
    let agent = Agent::start(dir, &[]);
    let addr = agent.addr.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut errors, mut versions) =
                (0u32, Vec::new(), std::collections::BTreeSet::new());
            let body = json!({ "features": claim() }).to_string();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let stream = TcpStream::connect(&addr).expect("connects");
                match http(
                    stream,
                    "POST",
                    "/v1/models/claims/predict",
                    "application/json",
                    body.as_bytes(),
                ) {
                    Ok((200, raw)) => {
                        let v: Value = serde_json::from_slice(&raw).expect("JSON");
                        versions.insert(v["version"].as_u64().unwrap_or(0));
                        ok += 1;
                    }
                    other => errors.push(format!("{other:?}")),
                }
            }
            (ok, errors, versions)
        })
    };
    for swap in 0..20 {
        let bundle = &bundles[(swap + 1) % 2];
        install(dir, bundle);
        Command::new("kill")
            .args(["-HUP", &agent.child.id().to_string()])
            .status()
            .expect("kill -HUP");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, errors, versions) = client.join().expect("client");
    assert!(
        errors.is_empty(),
        "{} failed requests: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 20, "only {ok} requests made");
    assert_eq!(
        versions.into_iter().collect::<Vec<_>>(),
        vec![1, 2],
        "requests saw both versions and nothing else"
    );
}

/// An ONNX model that makes tract 0.23 panic: OneHot(depth 3) indexes its output with the
/// input value unchecked, so an index of 3 or more panics inside ndarray.
fn one_hot_model() -> Vec<u8> {
    use prost::Message;
    use tract_onnx::pb;
    let float_info = |name: &str, dims: &[Result<i64, &str>]| {
        use pb::tensor_shape_proto::{Dimension, dimension::Value as D};
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                denotation: String::new(),
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: 1,
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|d| Dimension {
                                denotation: String::new(),
                                value: Some(match d {
                                    Ok(n) => D::DimValue(*n),
                                    Err(s) => D::DimParam(s.to_string()),
                                }),
                            })
                            .collect(),
                    }),
                })),
            }),
            doc_string: String::new(),
        }
    };
    let graph = pb::GraphProto {
        name: "one_hot".into(),
        node: vec![pb::NodeProto {
            input: vec!["x".into(), "depth".into(), "values".into()],
            output: vec!["y".into()],
            name: "y".into(),
            op_type: "OneHot".into(),
            ..Default::default()
        }],
        initializer: vec![
            pb::TensorProto {
                name: "depth".into(),
                dims: vec![],
                data_type: 7,
                int64_data: vec![3],
                ..Default::default()
            },
            pb::TensorProto {
                name: "values".into(),
                dims: vec![2],
                data_type: 1,
                float_data: vec![0.0, 1.0],
                ..Default::default()
            },
        ],
        input: vec![float_info("x", &[Err("N"), Ok(1)])],
        output: vec![float_info("y", &[Err("N"), Ok(1), Ok(3)])],
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn a_backend_panic_fails_only_that_request() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    std::fs::write(dir.join("one_hot.onnx"), one_hot_model()).expect("model");
    std::fs::write(
        dir.join("features.toml"),
        "[[features]]\nname = \"idx\"\ntype = \"float\"\nmin = 0.0\nmax = 100.0\ninput = \"x\"\ncolumn = 0\n",
    )
    .expect("features");
    std::fs::write(dir.join("golden.csv"), "idx\n0\n1\n2\n").expect("golden");
    fleetctl(
        dir,
        &[
            "bundle",
            "build",
            "--model",
            "one_hot.onnx",
            "--name",
            "onehot",
            "--version",
            "1",
            "--features",
            "features.toml",
            "--golden",
            "golden.csv",
            "--key",
            "keys/k.key",
            "--out",
            "onehot.fmb",
        ],
    )
    .success();
    install(dir, "onehot.fmb");
    let agent = Agent::start(dir, &["--workers", "1"]);
    let predict = |idx: f64| {
        agent.request(
            "POST",
            "/v1/models/onehot/predict",
            &json!({ "features": { "idx": idx } }),
        )
    };

    let (status, body) = predict(1.0);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["predictions"][0]["y"], json!([0.0, 1.0, 0.0]));
    for _ in 0..3 {
        let (status, body) = predict(7.0);
        assert_eq!(status, 500, "{body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("panicked")),
            "{body}"
        );
    }
    let (status, body) = predict(2.0);
    assert_eq!(
        status, 200,
        "the agent keeps serving after a backend panic: {body}"
    );
    assert_eq!(body["predictions"][0]["y"], json!([0.0, 0.0, 1.0]));
    let (_, metrics) = agent.request("GET", "/metrics", &Value::Null);
    let text = metrics.as_str().unwrap_or_default();
    assert!(
        text.lines()
            .any(|l| l.starts_with("fleetml_agent_prediction_errors_total")
                && l.contains("reason=\"backend_panic\"")
                && l.ends_with(" 3")),
        "{text}"
    );
}

#[test]
fn a_full_queue_answers_503_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    setup(dir);
    let agent = Agent::start(dir, &["--workers", "1", "--queue", "0"]);
    let batch = json!({ "features": vec![claim(); 1024] }).to_string();
    let addr = agent.addr.clone();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (addr, batch) = (addr.clone(), batch.clone());
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for _ in 0..10 {
                    let stream = TcpStream::connect(&addr).expect("connects");
                    let (status, body) = http(
                        stream,
                        "POST",
                        "/v1/models/claims/predict",
                        "application/json",
                        batch.as_bytes(),
                    )
                    .expect("HTTP");
                    if status == 503 {
                        let v: Value = serde_json::from_slice(&body).expect("JSON");
                        assert!(
                            v["error"]
                                .as_str()
                                .is_some_and(|e| e.contains("at capacity")),
                            "{v}"
                        );
                    }
                    statuses.push(status);
                }
                statuses
            })
        })
        .collect();
    let statuses: Vec<u16> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client"))
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "some requests are served");
    assert!(
        statuses.contains(&503),
        "with one worker, no queue and 8 clients, some requests are shed"
    );
}

#[test]
fn the_agent_runs_from_a_config_file_and_refuses_unknown_keys() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    setup(dir);
    let board = hil_tests::root().join("boards/generic-x86_64.toml");
    std::fs::write(
        dir.join("agent.toml"),
        format!("data_dir = \"data\"\ntrust = \"trust.toml\"\nboard = \"{}\"\nlisten = \"127.0.0.1:0\"\nqueue = 8\n", board.display()),
    )
    .expect("config");
    let running = RunningAgent::start(dir, &["run", "--config", "agent.toml"]);
    let (status, body) = running.predict(&json!({ "features": claim() }));
    assert_eq!(status, 200, "{body}");
    drop(running);

    std::fs::write(
        dir.join("bad.toml"),
        "data_dir = \"data\"\nlisten_address = \"127.0.0.1:0\"\n",
    )
    .expect("config");
    let run = agent(
        dir,
        &["run", "--config", "bad.toml", "--trust", "trust.toml"],
    );
    let line = run.failure();
    assert!(
        line.contains("bad.toml") && line.contains("unknown field `listen_address`"),
        "{line}"
    );
    let run = agent(dir, &["run", "--data-dir", "data"]);
    assert!(
        run.failure().contains(
            "no trust policy: pass --trust or set `trust` (or `[trust_policy]`) in the config file"
        ),
        "{}",
        run.stderr
    );
}

/// The `value` of the first metric line starting with `name` (labels included).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

#[test]
fn concurrent_requests_are_batched_and_each_gets_its_own_prediction() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    setup(dir);
    std::fs::write(
        dir.join("agent.toml"),
        "data_dir = \"data\"\ntrust = \"trust.toml\"\nlisten = \"127.0.0.1:0\"\n\
         [[batching]]\nmodel = \"claims\"\nmax_batch = 16\nmax_queue_delay_us = 50000\n",
    )
    .expect("config");
    let running = std::sync::Arc::new(RunningAgent::start(dir, &["run", "--config", "agent.toml"]));
    let claims: Vec<Value> = (0..12)
        .map(|i| {
            let mut c = claim();
            c["claim_amount"] = json!(1000.0 + 900.0 * i as f64);
            c["witness_count"] = json!(i % 3);
            c
        })
        .collect();
    // One at a time: each is a batch of one.
    let alone: Vec<Value> = claims
        .iter()
        .map(|c| {
            let (status, body) = running.predict(&json!({ "features": c }));
            assert_eq!(status, 200, "{body}");
            body["predictions"][0].clone()
        })
        .collect();
    let (_, text) = running.request("GET", "/metrics", &Value::Null);
    let text = text.as_str().expect("metrics text").to_string();
    let serial_batches = metric(&text, "fleetml_agent_batches_total{model=\"claims\"}");
    assert_eq!(serial_batches, 12.0, "{text}");

    // All at once: they share batches, and each gets its own row back.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(claims.len()));
    let threads: Vec<_> = claims
        .iter()
        .cloned()
        .map(|c| {
            let (running, barrier) = (running.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                running.predict(&json!({ "features": c }))
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let (status, body) = t.join().expect("thread");
        assert_eq!(status, 200, "{body}");
        let got = body["predictions"][0]["probabilities"]
            .as_array()
            .expect("probabilities");
        let want = alone[i]["probabilities"].as_array().expect("probabilities");
        for (g, w) in got.iter().zip(want) {
            let (g, w) = (g.as_f64().expect("number"), w.as_f64().expect("number"));
            assert!((g - w).abs() <= 1e-6, "request {i}: batched {g}, alone {w}");
        }
    }
    let (_, text) = running.request("GET", "/metrics", &Value::Null);
    let text = text.as_str().expect("metrics text").to_string();
    let batches = metric(&text, "fleetml_agent_batches_total{model=\"claims\"}") - serial_batches;
    assert!(
        batches < claims.len() as f64,
        "{} concurrent requests ran in {batches} batches:\n{text}",
        claims.len()
    );
    assert_eq!(
        metric(&text, "fleetml_agent_batch_rows_sum{model=\"claims\"}"),
        24.0,
        "{text}"
    );
}

#[test]
fn a_bundles_serving_section_batches_without_agent_configuration_and_windows_report_batch_sizes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    // The claims model's input has a symbolic batch `N`.
    let built = build_claims(
        dir,
        1,
        "claims.fmb",
        &[
            "--key",
            "keys/k.key",
            "--max-batch",
            "16",
            "--max-queue-delay-us",
            "50000",
            "--reference",
            &hil_tests::claims("reference.csv"),
        ],
    );
    built.success();
    let inspect = fleetctl(dir, &["bundle", "inspect", "claims.fmb", "--json"]);
    let manifest: Value = serde_json::from_str(inspect.success()).expect("json");
    assert_eq!(
        manifest["manifest"]["serving"],
        json!({"max_batch": 16, "max_queue_delay_us": 50000}),
        "{manifest}"
    );
    install(dir, "claims.fmb");
    std::fs::write(
        dir.join("agent.toml"),
        "data_dir = \"data\"\ntrust = \"trust.toml\"\nlisten = \"127.0.0.1:0\"\nwindow_predictions = 8\n",
    )
    .expect("config");
    let running = std::sync::Arc::new(RunningAgent::start(dir, &["run", "--config", "agent.toml"]));
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (running, barrier) = (running.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                running.predict(&json!({ "features": claim() }))
            })
        })
        .collect();
    for t in threads {
        let (status, body) = t.join().expect("thread");
        assert_eq!(status, 200, "{body}");
    }
    let (_, text) = running.request("GET", "/metrics", &Value::Null);
    let text = text.as_str().expect("metrics text").to_string();
    let batches = metric(&text, "fleetml_agent_batches_total{model=\"claims\"}");
    assert!(
        batches < 8.0,
        "8 concurrent requests ran in {batches} batches"
    );
    let (status, view) = running.request("GET", "/v1/models/claims/monitoring", &Value::Null);
    assert_eq!(status, 200, "{view}");
    let window = &view["windows"][0];
    assert_eq!(window["predictions"], 8, "{view}");
    let p99 = window["batch_rows"]["p99"]
        .as_u64()
        .expect("batch sizes in the window");
    assert!((2..=8).contains(&p99), "{view}");

    // A model whose input has a fixed batch cannot carry a serving section.
    let refused = fleetctl(
        dir,
        &[
            "bundle",
            "build",
            "--model",
            &hil_tests::claims("model.onnx"),
            "--name",
            "c",
            "--version",
            "1",
            "--input-shape",
            "input=1,25",
            "--max-batch",
            "4",
            "--out",
            "c.fmb",
        ],
    );
    let err = refused.failure();
    assert!(
        err.contains("input `input` has no symbolic leading (batch) dimension"),
        "{err}"
    );
    // A shape for an input the model does not have is refused, naming the inputs.
    let refused = fleetctl(
        dir,
        &[
            "bundle",
            "build",
            "--model",
            &hil_tests::claims("model.onnx"),
            "--name",
            "c",
            "--version",
            "1",
            "--input-shape",
            "claim=N,25",
            "--out",
            "c.fmb",
        ],
    );
    let err = refused.failure();
    assert!(
        err.contains("`claim`, which is not an input of the model (its inputs: input)"),
        "{err}"
    );
}
