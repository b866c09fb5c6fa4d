//! Helpers for fleetml's system tests: build and locate the real binaries, run them, and
//! capture what an operator would see.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub mod board;
pub mod conformance;
pub mod fleet;

/// The Python of the test venv (`scripts/test.sh` prepares it and sets `FLEETML_PYTHON`),
/// with onnxruntime, onnx and rapidocr-onnxruntime installed.
pub fn python() -> PathBuf {
    let path = std::env::var_os("FLEETML_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/fleetml-venv/bin/python"));
    assert!(
        path.exists(),
        "{} not found: run the tests with scripts/test.sh, which prepares the Python venv",
        path.display()
    );
    path
}

/// Python onnxruntime's outputs for `inputs` (one thread, CPU provider; the peer the
/// backends are held to): `(name, shape, values)` per output, values widened to f64.
pub fn onnxruntime_peer(
    model: &Path,
    inputs: &[fleetml_protocol::golden::Tensor],
) -> Vec<(String, Vec<u64>, Vec<f64>)> {
    let feeds: serde_json::Map<String, serde_json::Value> = inputs
        .iter()
        .map(|t| {
            let data: Vec<f64> = (0..t.data.len())
                .map(|i| t.data.get_f64(i).unwrap_or(f64::NAN))
                .collect();
            (
                t.name.clone(),
                serde_json::json!({"shape": t.shape, "dtype": t.dtype().to_string(), "data": data}),
            )
        })
        .collect();
    let request = serde_json::json!({"model": model, "inputs": feeds, "threads": 1});
    use std::io::Write;
    let mut child = Command::new(python())
        .arg(root().join("scripts/ort_run.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("request");
    let out = child.wait_with_output().expect("onnxruntime runs");
    assert!(out.status.success(), "onnxruntime failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v.as_object()
        .expect("outputs")
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                serde_json::from_value(t["shape"].clone()).expect("shape"),
                serde_json::from_value(t["data"].clone()).expect("data"),
            )
        })
        .collect()
}

/// The input PP-OCR's text-direction classifier is declared with: its ONNX file says
/// `x: f32[?, 3, ?, ?]`; PP-OCR feeds 48×192 crops, any number at a time.
pub fn cls_input() -> fleetml_protocol::manifest::TensorSpec {
    use fleetml_protocol::manifest::{DType, Dim, TensorSpec};
    TensorSpec {
        name: "x".into(),
        dtype: DType::F32,
        shape: vec![
            Dim::Symbol("N".into()),
            Dim::Fixed(3),
            Dim::Fixed(48),
            Dim::Fixed(192),
        ],
    }
}

/// Writes the ONNX backend test cases of the venv's `onnx` package into `dir`
/// (scripts/onnx_cases.py).
pub fn generate_onnx_cases(dir: &Path) -> Result<(), String> {
    let out = Command::new(python())
        .arg(root().join("scripts/onnx_cases.py"))
        .arg(dir)
        .output()
        .map_err(|e| format!("running scripts/onnx_cases.py: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/onnx_cases.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// The workspace root.
pub fn root() -> PathBuf {
    manifest_dir().join("..")
}

/// Path of a workspace binary (`fleetctl`, `fleet-agent`), built once per test run with
/// the same profile as the test itself so the binaries are never stale. The path comes
/// from cargo's own build messages rather than `target/<profile>/NAME`, which can hold a
/// binary uplifted from another build sharing the target directory.
///
/// `FLEETML_BINS=DIR` takes `DIR/NAME` instead and builds nothing: a benchmark comparing
/// two builds of `fleetctl` (`ingest-load`) runs each from its own folder.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("FLEETML_BINS") {
        return PathBuf::from(dir).join(name);
    }
    static BUILT: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/it-<hash> for a test, target/<profile>/NAME for a binary.
        let parent = exe.parent().expect("target/<profile>");
        let profile_dir = if parent.file_name().is_some_and(|n| n == "deps") {
            parent.parent().expect("target/<profile>")
        } else {
            parent
        }
        .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        scrub_cargo_env(&mut cmd);
        cmd.current_dir(root()).args([
            "build",
            "--quiet",
            "--workspace",
            "--bins",
            "--message-format=json",
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("cargo runs");
        assert!(
            out.status.success(),
            "building the fleetml binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact")
            .filter_map(|m| {
                let name = m["target"]["name"].as_str()?.to_string();
                let exe = m["executable"].as_str()?;
                Some((name, PathBuf::from(exe)))
            })
            .collect()
    });
    built
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p.clone())
        .unwrap_or_else(|| panic!("cargo built no binary named {name}"))
}

/// What a command printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// What `output` says.
    pub fn of(output: std::process::Output) -> Run {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn success(&self) -> &str {
        assert!(
            self.ok(),
            "command failed ({:?}):\nstdout: {}\nstderr: {}",
            self.code,
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// Asserts failure with exactly one line on stderr, and returns that line.
    #[track_caller]
    pub fn failure(&self) -> &str {
        assert!(
            !self.ok() && self.code.is_some(),
            "command should have failed:\nstdout: {}",
            self.stdout
        );
        let line = self.stderr.trim_end();
        assert_eq!(
            line.lines().count(),
            1,
            "stderr should be one line:\n{}",
            self.stderr
        );
        assert!(line.starts_with("error: "), "{line}");
        line
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs a workspace binary with `args` in `cwd`.
pub fn run(name: &str, cwd: &Path, args: &[&str]) -> Run {
    Command::new(bin(name))
        .current_dir(cwd)
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
        .into()
}

pub fn fleetctl(cwd: &Path, args: &[&str]) -> Run {
    run("fleetctl", cwd, args)
}

pub fn agent(cwd: &Path, args: &[&str]) -> Run {
    run("fleet-agent", cwd, args)
}

/// `fleet-agent install-bundle BUNDLE --data-dir data --trust trust.toml` in `dir`, the
/// way most tests install a model; it must succeed.
pub fn install(dir: &Path, bundle: &str) {
    agent(
        dir,
        &[
            "install-bundle",
            bundle,
            "--data-dir",
            "data",
            "--trust",
            "trust.toml",
        ],
    )
    .success();
}

/// Path of an example-model file, as a string for command lines.
pub fn claims(file: &str) -> String {
    root()
        .join("models/claims")
        .join(file)
        .to_string_lossy()
        .into_owned()
}

/// The cargo target directory the binaries were built in.
pub fn target_dir() -> PathBuf {
    bin("fleetctl")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Removes the variables `cargo test` sets for the test process (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`, …) from a command that runs cargo again: build scripts such as
/// ring's re-run when those change, which would rebuild half the tree on every test run.
pub fn scrub_cargo_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let keep = matches!(
            key.as_ref(),
            "CARGO_HOME" | "CARGO_TARGET_DIR" | "CARGO_TERM_COLOR"
        );
        if (key.starts_with("CARGO_") && !keep) || key == "OUT_DIR" {
            cmd.env_remove(key.as_ref());
        }
    }
}

/// A minimal HTTP/1.1 client over any stream (TCP or Unix socket): one request per
/// connection. Returns the status code and the body.
pub fn http<S: std::io::Read + std::io::Write>(
    stream: S,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    http_with(
        stream,
        method,
        path,
        &[("content-type", content_type)],
        body,
    )
}

/// The request line, `Host` and `headers`, each line ended; the caller adds the length.
fn request_head(method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head
}

/// [`http`] with any headers.
pub fn http_with<S: std::io::Read + std::io::Write>(
    stream: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    http_answer(stream, method, path, headers, body).map(|(status, _, body)| (status, body))
}

/// [`http_with`], with the answer's head (status line and headers) too.
pub fn http_answer<S: std::io::Read + std::io::Write>(
    mut stream: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut head = request_head(method, path, headers);
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let header = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = header
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    let mut body = raw[split + 4..].to_vec();
    if header
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, header, body))
}

/// A keep-alive HTTP/1.1 client on one connection: each request is one write, each
/// response is read by its `Content-Length`. What a real application's client does, and
/// what the API benchmark measures.
#[derive(Debug)]
pub struct KeepAlive<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: std::io::Read + std::io::Write> KeepAlive<S> {
    pub fn new(stream: S) -> Self {
        KeepAlive {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        self.request_with(method, path, &[("Content-Type", content_type)], body)
    }

    /// [`Self::request`] with any headers (`Content-Length` is added).
    pub fn request_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let head = request_head(method, path, headers);
        let mut request = format!("{head}Content-Length: {}\r\n\r\n", body.len()).into_bytes();
        request.extend_from_slice(body);
        self.stream.write_all(&request)?;
        let mut chunk = [0u8; 64 * 1024];
        let (split, length) = loop {
            if let Some(split) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let header = String::from_utf8_lossy(&self.buf[..split]).to_ascii_lowercase();
                let length = header
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| std::io::Error::other("response without content-length"))?;
                break (split, length);
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::other("connection closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        while self.buf.len() < split + 4 + length {
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::other("connection closed mid-body"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let status = String::from_utf8_lossy(&self.buf[..split])
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("no status"))?;
        let body = self.buf[split + 4..split + 4 + length].to_vec();
        self.buf.drain(..split + 4 + length);
        Ok((status, body))
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..line_end]).trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

/// A running `fleet-agent`, killed on drop.
#[derive(Debug)]
pub struct RunningAgent {
    pub child: std::process::Child,
    /// `HOST:PORT` of its HTTP API.
    pub addr: String,
    /// The API token its requests carry (an agent listening beyond loopback needs one).
    pub token: Option<String>,
}

impl RunningAgent {
    /// Starts `fleet-agent ARGS` in `dir` (a `run` command) and waits for the address it
    /// prints on its first line. Its stdout stays open so the agent can keep printing.
    pub fn start(dir: &Path, args: &[&str]) -> RunningAgent {
        let mut cmd = Command::new(bin("fleet-agent"));
        cmd.current_dir(dir).args(args);
        let agent = RunningAgent::spawn(cmd);
        agent.wait_ready();
        agent
    }

    /// Waits until `/readyz` says every model of the agent's store is loaded (the agent
    /// listens first and loads its models after).
    pub fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let (status, body) = self.request("GET", "/readyz", &serde_json::Value::Null);
            if status == 200 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agent's models did not load within 300 s: {status} {body}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Spawns `cmd` (an agent's `run`, perhaps under a wrapper: an emulator, a network
    /// namespace, ssh) and waits for the address it prints on its first line.
    pub fn spawn(cmd: Command) -> RunningAgent {
        // FLEETML_TEST_LOGS=1 shows the agents' logs.
        let logs = if std::env::var_os("FLEETML_TEST_LOGS").is_some() {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        };
        RunningAgent::spawn_logged(cmd, logs)
    }

    /// [`spawn`](Self::spawn) with the agent's log (stderr) going to `logs`.
    pub fn spawn_logged(mut cmd: Command, logs: std::process::Stdio) -> RunningAgent {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(logs)
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .expect("agent prints its address");
        // Keep draining stdout so later lines never block or break the agent.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line of {cmd:?}: {line:?}"))
            .to_string();
        RunningAgent {
            child,
            addr,
            token: None,
        }
    }

    /// Sends a JSON request (no body when `body` is null); returns the status and the
    /// body as JSON (or as a JSON string when it is not JSON).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let stream = std::net::TcpStream::connect(&self.addr).expect("connects");
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let bearer = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(b) = &bearer {
            headers.push(("authorization", b.as_str()));
        }
        let (status, raw) = http_with(stream, method, path, &headers, &bytes).expect("HTTP");
        let value = serde_json::from_slice(&raw).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&raw).into_owned())
        });
        (status, value)
    }
}

impl RunningAgent {
    /// `fleet-agent run` on the store in `dir/data` with `dir/trust.toml`, on any free
    /// loopback port, plus `extra` flags.
    pub fn serve_store(dir: &Path, extra: &[&str]) -> RunningAgent {
        let mut args = vec![
            "run",
            "--data-dir",
            "data",
            "--trust",
            "trust.toml",
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        RunningAgent::start(dir, &args)
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Generates `keys/NAME.key` and `keys/NAME.pub` in `dir` and a 1-of-1 `trust.toml`.
pub fn keys_and_policy(dir: &Path, name: &str) {
    fleetctl(dir, &["keys", "generate", "--out", "keys", "--name", name]).success();
    let public = format!("keys/{name}.pub");
    fleetctl(
        dir,
        &[
            "keys",
            "trust-policy",
            "--public",
            &public,
            "--out",
            "trust.toml",
        ],
    )
    .success();
}

/// Builds `out`, a bundle of the example claims model (`--name claims`, its feature
/// schema and 16 golden rows from holdout.csv), with `extra` arguments appended
/// (`--key`, `--reference`, `--lineage`, …). Panics unless fleetctl succeeds.
pub fn build_claims(dir: &Path, version: u32, out: &str, extra: &[&str]) -> Run {
    let (model, features, holdout) = (
        claims("model.onnx"),
        claims("features.toml"),
        claims("holdout.csv"),
    );
    let version = version.to_string();
    let mut args = vec![
        "bundle",
        "build",
        "--model",
        &model,
        "--name",
        "claims",
        "--version",
        &version,
        "--features",
        &features,
        "--golden",
        &holdout,
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    let run = fleetctl(dir, &args);
    run.success();
    run
}

/// Writes `out_path`: the bundle `source` with one golden output value changed and no
/// signature (sign it next): a bundle whose signature can be genuine but whose golden
/// self-test fails on every device.
pub fn alter_golden(source: &Path, out_path: &Path) {
    let bytes = std::fs::read(source).expect("bundle");
    let front = fleetml_protocol::bundle::read_unverified(
        &bytes[..],
        &fleetml_protocol::bundle::Limits::default(),
    )
    .expect("front");

    // Re-assemble the bundle with one golden output changed, before any signature.
    let mut payloads: Vec<(String, Vec<u8>)> = Vec::new();
    let mut at = front.payload_offset() as usize;
    for e in &front.manifest.entries {
        payloads.push((e.name.clone(), bytes[at..at + e.size as usize].to_vec()));
        at += e.size as usize;
    }
    let golden_bytes = &mut payloads
        .iter_mut()
        .find(|(n, _)| n == fleetml_protocol::manifest::GOLDEN_ENTRY)
        .expect("golden")
        .1;
    let mut golden =
        fleetml_protocol::golden::Golden::from_cbor(golden_bytes).expect("golden decodes");
    match &mut golden.outputs[0].data {
        fleetml_protocol::golden::TensorData::F32(v) => v[3] = 1.0 - v[3],
        other => panic!("f32 golden output expected, got {other:?}"),
    }
    *golden_bytes = golden.to_cbor();
    let mut manifest = front.manifest.clone();
    for e in &mut manifest.entries {
        let data = &payloads
            .iter()
            .find(|(n, _)| *n == e.name)
            .expect("payload")
            .1;
        e.size = data.len() as u64;
        e.sha256 = fleetml_protocol::crypto::sha256(data);
    }
    let manifest_bytes = manifest.to_canonical_cbor();
    let mut out = Vec::new();
    fleetml_protocol::bundle::write(
        &mut out,
        &manifest_bytes,
        &[] as &[fleetml_protocol::bundle::SignatureRecord],
        &manifest,
        |name, w| w.write_all(&payloads.iter().find(|(n, _)| n == name).expect("payload").1),
    )
    .expect("writes");
    std::fs::write(out_path, out).expect("write");
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
