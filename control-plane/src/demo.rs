//! `fleetctl demo`: the whole loop on one machine, narrated. It starts a control plane
//! with its embedded broker in a temporary directory, enrolls agents on three board
//! profiles as real `fleet-agent` processes, builds, signs and pushes the claims model,
//! rolls it out in waves, streams reference traffic and then drifted traffic with ground
//! truth, lets the drift policy retrain the model, compares the challenger with
//! production, sends it to a canary, and rolls back — printing, at each step, the time,
//! what happens and the `fleetctl` command a user would type. Everything runs through
//! the same commands and API an operator uses; nothing leaves the loopback interface.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::api::types::{RolloutSummary, RolloutView};
use crate::rollout::State as RolloutState;

/// The example model and board profiles, compiled in so the demo (and `fleetctl sim`)
/// needs no checkout.
pub(crate) const CLAIMS: &[(&str, &[u8])] = &[
    (
        "model.onnx",
        include_bytes!("../../models/claims/model.onnx"),
    ),
    (
        "features.toml",
        include_bytes!("../../models/claims/features.toml"),
    ),
    (
        "lineage.toml",
        include_bytes!("../../models/claims/lineage.toml"),
    ),
    (
        "reference.csv",
        include_bytes!("../../models/claims/reference.csv"),
    ),
    (
        "holdout.csv",
        include_bytes!("../../models/claims/holdout.csv"),
    ),
    (
        "drifted.csv",
        include_bytes!("../../models/claims/drifted.csv"),
    ),
];
/// The private CA `fleetctl serve --self-signed` made, below the demo's folder.
const CA: &str = "plane/tls/ca.pem";

const BOARDS: &[(&str, &str)] = &[
    (
        "raspberry-pi-4",
        include_str!("../../boards/raspberry-pi-4.toml"),
    ),
    (
        "generic-x86_64",
        include_str!("../../boards/generic-x86_64.toml"),
    ),
    (
        "jetson-orin-nano",
        include_str!("../../boards/jetson-orin-nano.toml"),
    ),
];
/// (device, board, tags)
const DEVICES: &[(&str, &str, &str)] = &[
    ("pi-lab-1", "raspberry-pi-4", "site=lab,line=1"),
    ("x86-lab-2", "generic-x86_64", "site=lab,line=2"),
    ("jetson-field-3", "jetson-orin-nano", "site=field,line=3"),
];

struct Demo {
    dir: PathBuf,
    fleetctl: PathBuf,
    started: Instant,
    server: String,
    token: String,
    children: Vec<Child>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            stop_child(c);
        }
    }
}

/// SIGTERM, up to 5 s to exit, then SIGKILL.
pub(crate) fn stop_child(c: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(c.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A JSON request to an agent's local API.
fn agent_request(addr: &str, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let bytes = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{bytes}",
        bytes.len()
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

impl Demo {
    fn say(&self, what: &str) {
        println!("\n[{:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// Runs `fleetctl ARGS` against the demo's control plane, showing the command.
    fn fleetctl(&self, args: &[&str]) -> anyhow::Result<String> {
        println!("  $ fleetctl {}", args.join(" "));
        let out = Command::new(&self.fleetctl)
            .args(args)
            .current_dir(&self.dir)
            .env("FLEETML_SERVER", &self.server)
            .env("FLEETML_CA", self.dir.join(CA))
            .env("FLEETML_TOKEN", &self.token)
            .output()
            .context("running fleetctl")?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            bail!(
                "`fleetctl {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }

    /// `fleetctl ARGS`, output indented under the command (a few lines at most).
    fn show(&self, args: &[&str], lines: usize) -> anyhow::Result<String> {
        let out = self.fleetctl(args)?;
        for l in out.lines().take(lines) {
            println!("    {l}");
        }
        if out.lines().count() > lines {
            println!("    …");
        }
        Ok(out)
    }

    fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = Command::new(&self.fleetctl)
            .args(&all)
            .current_dir(&self.dir)
            .env("FLEETML_SERVER", &self.server)
            .env("FLEETML_CA", self.dir.join(CA))
            .env("FLEETML_TOKEN", &self.token)
            .output()?;
        if !out.status.success() {
            bail!(
                "`fleetctl {}`: {}",
                all.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn wait<T>(
        &self,
        what: &str,
        within: Duration,
        mut check: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = check()? {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("the demo waited {} s for {what}", within.as_secs());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Starts `cmd` and returns it with the first line it prints (where it listens); the
/// rest of its stdout is drained so it never blocks (stderr is the caller's to set).
pub(crate) fn announcing(cmd: &mut Command) -> anyhow::Result<(Child, String)> {
    use std::io::BufRead;
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let mut reader = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Ok((child, line))
}

/// Finds the sibling binaries `names` next to this fleetctl, building the missing ones
/// with the cargo that built it, in one invocation and the same profile.
fn siblings<const N: usize>(names: [&str; N]) -> anyhow::Result<[PathBuf; N]> {
    let exe = std::env::current_exe()?;
    let paths = names.map(|name| exe.with_file_name(name));
    let missing: Vec<&str> = names
        .iter()
        .zip(&paths)
        .filter(|(_, p)| !p.is_file())
        .map(|(n, _)| *n)
        .collect();
    if missing.is_empty() {
        return Ok(paths);
    }
    // target/<dir>/fleetctl: `debug` is the dev profile; every other dir is its profile.
    let profile = match exe
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
    {
        Some("debug") | None => "dev".to_string(),
        Some(dir) => dir.to_string(),
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    println!(
        "building {} (the demo runs them next to fleetctl)…",
        missing.join(" and ")
    );
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "--profile", &profile, "--manifest-path"])
        .arg(&manifest);
    // What `cargo run` set for fleetctl describes fleetctl's own build; a nested build
    // that inherits it reruns build scripts, and fleetctl's next build reruns them again.
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
    for name in &missing {
        cmd.args(["--bin", name]);
    }
    let ok = cmd
        .status()
        .with_context(|| format!("building {} with cargo", missing.join(", ")))?;
    if !ok.success() {
        bail!(
            "building {} failed (above); build every binary: cargo build --release --bins",
            missing.join(", ")
        );
    }
    if let Some(path) = paths.iter().find(|p| !p.is_file()) {
        bail!(
            "{} is not next to fleetctl; build every binary: cargo build --release --bins",
            path.display()
        );
    }
    Ok(paths)
}

/// Runs the demo in `dir` (a fresh temporary directory when `None`). With `exit`, it
/// stops everything at the end; otherwise it keeps the fleet running until Ctrl-C.
pub fn run(dir: Option<PathBuf>, exit: bool) -> anyhow::Result<()> {
    let fleetctl = std::env::current_exe()?;
    let [agent, trainer] = siblings(["fleet-agent", "claims-fit"])?;
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => tempfile::Builder::new()
            .prefix("fleetml-demo-")
            .tempdir()?
            .keep(),
    };
    let dir = std::fs::canonicalize(&dir)?;
    for (name, bytes) in CLAIMS {
        std::fs::write(dir.join(name), bytes)?;
    }
    for (name, text) in BOARDS {
        std::fs::write(dir.join(format!("{name}.toml")), text)?;
    }
    let mut demo = Demo {
        dir: dir.clone(),
        fleetctl: fleetctl.clone(),
        started: Instant::now(),
        server: String::new(),
        token: String::new(),
        children: Vec::new(),
    };
    println!(
        "fleetml demo in {} (everything on 127.0.0.1)",
        dir.display()
    );

    demo.say("An operator makes a signing key and the trust policy devices will enforce.");
    if !dir.join("keys/release.key").exists() {
        demo.show(
            &["keys", "generate", "--out", "keys", "--name", "release"],
            2,
        )?;
    }
    demo.show(
        &[
            "keys",
            "trust-policy",
            "--public",
            "keys/release.pub",
            "--out",
            "trust.toml",
            "--force",
        ],
        1,
    )?;

    demo.say(
        "The control plane starts: HTTPS API, embedded MQTT broker over TLS, telemetry ingest.",
    );
    let (http, mqtt, mqtts) = (free_port()?, free_port()?, free_port()?);
    println!(
        "  $ fleetctl serve --self-signed --data-dir plane --listen 127.0.0.1:{http} --mqtt-listen 127.0.0.1:{mqtt} --mqtts-listen 127.0.0.1:{mqtts} --trust trust.toml --signing-key keys/release.key"
    );
    let mut serve = Command::new(&fleetctl);
    serve
        .args([
            "serve",
            "--self-signed",
            "--data-dir",
            "plane",
            "--listen",
            &format!("127.0.0.1:{http}"),
        ])
        .args([
            "--mqtt-listen",
            &format!("127.0.0.1:{mqtt}"),
            "--mqtts-listen",
            &format!("127.0.0.1:{mqtts}"),
            "--trust",
            "trust.toml",
        ])
        .args(["--signing-key", "keys/release.key"])
        .stderr(Stdio::null())
        .current_dir(&dir);
    let (serve, first) = announcing(&mut serve).context("starting fleetctl serve")?;
    demo.children.push(serve);
    demo.server = first
        .trim()
        .strip_prefix("control plane listening on ")
        .context("fleetctl serve did not start")?
        .to_string();
    demo.token = std::fs::read_to_string(dir.join("plane/admin.token"))?
        .trim()
        .to_string();
    // Operators trust the private CA the server made (devices get it in agent.toml).
    crate::client::set_ca(dir.join(CA));
    let client = crate::client::Client::with_token(&demo.server, &demo.token)?;
    demo.wait("the ingest to connect", Duration::from_secs(30), || {
        Ok((client.get("/v1/ingest")?["broker_connected"] == true).then_some(()))
    })?;
    println!("    control plane at {}", demo.server);

    demo.say("Build the claims model into a signed bundle and push it to the registry.");
    demo.show(
        &[
            "bundle",
            "build",
            "--model",
            "model.onnx",
            "--name",
            "claims",
            "--version",
            "1",
            "--label",
            "demo",
            "--features",
            "features.toml",
            "--lineage",
            "lineage.toml",
            "--reference",
            "reference.csv",
            "--label-column",
            "investigate",
            "--labelled",
            "holdout.csv",
            "--golden",
            "holdout.csv",
            "--key",
            "keys/release.key",
            "--out",
            "claims-v1.fmb",
        ],
        2,
    )?;
    demo.show(&["models", "push", "claims-v1.fmb"], 1)?;
    demo.show(&["models", "stage", "claims@1", "production"], 1)?;
    demo.show(
        &[
            "data",
            "import",
            "reference.csv",
            "--name",
            "original training data",
        ],
        1,
    )?;
    // The devices will see the first 800 drifted rows; the last 200 are the holdout.
    let drifted = String::from_utf8_lossy(CLAIMS[5].1).to_string();
    let mut lines: Vec<&str> = drifted.lines().collect();
    let header = lines.remove(0);
    std::fs::write(
        dir.join("drifted-holdout.csv"),
        format!("{header}\n{}\n", lines[800..].join("\n")),
    )?;
    demo.show(
        &[
            "data",
            "import",
            "drifted-holdout.csv",
            "--name",
            "drifted holdout",
        ],
        1,
    )?;

    demo.say("Enroll three devices on three board profiles and start their agents.");
    let features: Vec<String> = crate::datasets::Table::from_csv(CLAIMS[3].1)
        .map_err(anyhow::Error::msg)?
        .columns
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| n != "investigate")
        .collect();
    let mut agents = Vec::new();
    for (name, board, tags) in DEVICES {
        let config = format!("{name}.toml");
        demo.show(
            &[
                "devices", "enroll", name, "--board", board, "--tags", tags, "--out", &config,
            ],
            1,
        )?;
        let text = std::fs::read_to_string(dir.join(&config))?;
        let at = text.find("\n[").map_or(text.len(), |i| i + 1);
        let extra = format!(
            "board = \"{board}.toml\"\nwindow_predictions = 200\nalert_windows = 2\nassignment_poll_s = 5\ncapture_upload_interval_s = 1\n\
             [[capture]]\nmodel = \"claims\"\nflush_s = 1\nfeatures = [{}]\n\n",
            features
                .iter()
                .map(|f| format!("{f:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        std::fs::write(
            dir.join(&config),
            format!("{}{extra}{}", &text[..at], &text[at..]),
        )?;
        println!("  $ fleet-agent run --config {config} --data-dir data-{name}");
        let mut command = Command::new(&agent);
        command
            .args([
                "run",
                "--config",
                &config,
                "--data-dir",
                &format!("data-{name}"),
                "--listen",
                "127.0.0.1:0",
            ])
            .stderr(Stdio::null())
            .current_dir(&dir);
        let (child, line) = announcing(&mut command).context("starting fleet-agent")?;
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .context("fleet-agent did not start")?
            .to_string();
        agents.push(addr);
        demo.children.push(child);
    }

    demo.say("Roll claims v1 out in waves (one device per wave, 2 s soak, health gates on).");
    let started = demo.fleetctl(&[
        "rollout",
        "start",
        "claims@1",
        "--to",
        "all",
        "--waves",
        "34,67,100",
        "--soak",
        "2s",
        "--max-fallbacks",
        "1",
    ])?;
    let id = started
        .split_whitespace()
        .nth(1)
        .unwrap_or("r1")
        .trim_end_matches(':')
        .to_string();
    let mut last = String::new();
    demo.wait("the rollout to complete", Duration::from_secs(90), || {
        let v: RolloutView = client.get_as(&format!("/v1/rollouts/{id}"))?;
        let line = crate::views::rollout_line(&v);
        if line != last {
            println!("    {line}");
            last = line;
        }
        match v.state {
            RolloutState::Completed => Ok(Some(())),
            RolloutState::Paused | RolloutState::Aborted | RolloutState::RolledBack => bail!(
                "the rollout is {}: {}",
                v.state.as_str(),
                v.reason.as_deref().unwrap_or("no reason given")
            ),
            RolloutState::Running => Ok(None),
        }
    })?;
    println!("  (watch it live: fleetctl rollout status {id} --watch)");

    demo.say("Devices serve traffic like their training data; monitoring closes a window every 200 predictions.");
    let reference = crate::datasets::Table::from_csv(CLAIMS[3].1).map_err(anyhow::Error::msg)?;
    let drifted_table =
        crate::datasets::Table::from_csv(CLAIMS[5].1).map_err(anyhow::Error::msg)?;
    let row = |t: &crate::datasets::Table, r: usize| -> serde_json::Map<String, Value> {
        t.columns
            .iter()
            .filter(|(n, _)| n != "investigate")
            .map(|(n, c)| {
                let v = match c {
                    crate::datasets::Column::Number(v) => v[r].map_or(Value::Null, |x| json!(x)),
                    crate::datasets::Column::Text(v) => {
                        v[r].clone().map_or(Value::Null, Value::String)
                    }
                };
                (n.clone(), v)
            })
            .collect()
    };
    for (i, addr) in agents.iter().enumerate() {
        for start in (i * 400..(i + 1) * 400).step_by(50) {
            let batch: Vec<Value> = (start..start + 50)
                .map(|r| Value::Object(row(&reference, r)))
                .collect();
            let (status, reply) = agent_request(
                addr,
                "/v1/models/claims/predict",
                &json!({ "features": batch }),
            )?;
            if status != 200 {
                bail!("prediction failed on {addr}: {reply}");
            }
        }
    }
    demo.show(&["devices", "list"], 5)?;

    demo.say("The field drifts: the lab devices see drifted claims, and ground truth follows.");
    let label = match drifted_table.column("investigate") {
        Some(crate::datasets::Column::Number(v)) => v.clone(),
        _ => bail!("drifted.csv has no investigate column"),
    };
    for (i, addr) in agents.iter().take(2).enumerate() {
        for start in (i * 400..(i + 1) * 400).step_by(50) {
            let ids: Vec<String> = (start..start + 50).map(|r| format!("claim-{r}")).collect();
            let batch: Vec<Value> = (start..start + 50)
                .map(|r| Value::Object(row(&drifted_table, r)))
                .collect();
            agent_request(
                addr,
                "/v1/models/claims/predict",
                &json!({ "features": batch, "ids": ids }),
            )?;
            for (r, id) in (start..start + 50).zip(&ids) {
                agent_request(
                    addr,
                    "/v1/feedback",
                    &json!({ "id": id, "label": label[r].unwrap_or(0.0) }),
                )?;
            }
        }
    }
    demo.wait("drift alerts", Duration::from_secs(60), || {
        let alerting = DEVICES.iter().take(2).all(|(n, _, _)| {
            client
                .get(&format!("/v1/devices/{n}"))
                .map(|d| d["open_alerts"].as_array().is_some_and(|a| !a.is_empty()))
                .unwrap_or(false)
        });
        Ok(alerting.then_some(()))
    })?;
    demo.show(&["drift", "--model", "claims"], 6)?;
    demo.wait(
        "the labelled captures upstream",
        Duration::from_secs(60),
        || {
            let rows: u64 = client
                .get("/v1/captures?model=claims")?
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|b| b["kind"] == "labelled")
                        .map(|b| b["rows"].as_u64().unwrap_or(0))
                        .sum()
                })
                .unwrap_or(0);
            Ok((rows >= 800).then_some(()))
        },
    )?;

    demo.say("The drift policy retrains on the original data plus what the devices captured.");
    let datasets = demo.json(&["data", "list"])?;
    let id_of = |name: &str| -> anyhow::Result<String> {
        datasets
            .as_array()
            .and_then(|a| a.iter().find(|d| d["name"] == name))
            .and_then(|d| d["id"].as_str())
            .map(|s| s[..12].to_string())
            .with_context(|| format!("dataset `{name}`"))
    };
    let (original, holdout) = (id_of("original training data")?, id_of("drifted holdout")?);
    // An admin registers what may run; the operator's spec names it.
    let fit = format!(
        "command = [{:?}, \"--data\", \"{{train_csv}}\", \"--seed\", \"{{seed}}\", \"--epochs\", \"{{param:epochs}}\", \"--out\", \"{{out}}\"]\n",
        trainer.display().to_string()
    );
    std::fs::write(dir.join("trainer.toml"), fit)?;
    demo.show(
        &["trainers", "add", "claims-fit", "--file", "trainer.toml"],
        1,
    )?;
    let spec = "model = \"claims\"\ntrainer = \"claims-fit\"\n\
         label = \"investigate\"\nseed = 42\nmetric = \"auc\"\n[params]\nepochs = 30\n";
    std::fs::write(dir.join("train.toml"), spec)?;
    demo.show(
        &[
            "models",
            "policy",
            "set",
            "claims",
            "--drift-share",
            "0.5",
            "--for",
            "1s",
            "--dataset",
            &original,
            "--captured-since",
            "1h",
            "--auto-promote",
            "--holdout",
            &holdout,
            "--margin",
            "0.0",
            "--canary",
            "30",
            "--spec",
            "train.toml",
        ],
        1,
    )?;
    let job = demo.wait("the training job", Duration::from_secs(120), || {
        let jobs = client.get("/v1/retrain")?;
        let j = jobs.as_array().and_then(|a| a.first()).cloned();
        Ok(j.filter(|j| matches!(j["state"].as_str(), Some("succeeded" | "failed"))))
    })?;
    if job["state"] != "succeeded" {
        bail!("the training job failed: {}", job["error"]);
    }
    demo.show(&["retrain", "list"], 3)?;
    let shown = client.get("/v1/models/claims/2")?;
    let l = &shown["bundle"]["manifest"]["lineage"];
    println!("  $ fleetctl models show claims@2");
    println!(
        "    candidate claims@v2 — lineage recorded by the job: dataset {}, seed {}, {} {}, trained on {}",
        l["dataset"]["sha256"]
            .as_str()
            .unwrap_or("?")
            .get(..12)
            .unwrap_or("?"),
        l["seed"],
        l["framework"]["name"].as_str().unwrap_or("?"),
        l["framework"]["version"].as_str().unwrap_or(""),
        l["training_device"].as_str().unwrap_or("?")
    );

    demo.say("Champion/challenger on the drifted holdout, with the agents' runtime.");
    demo.show(
        &[
            "models",
            "compare",
            "claims@1",
            "claims@2",
            "--on",
            &holdout,
            "--label",
            "investigate",
        ],
        12,
    )?;

    demo.say("The challenger won: the policy started a canary rollout of claims v2.");
    let canary = demo.wait("the canary", Duration::from_secs(60), || {
        let list: Vec<RolloutSummary> = client.get_as("/v1/rollouts")?;
        Ok(list.into_iter().find(|r| r.version == Some(2)))
    })?;
    let canary_id = canary.id;
    demo.wait(
        "the canary device to run v2",
        Duration::from_secs(60),
        || {
            let v: RolloutView = client.get_as(&format!("/v1/rollouts/{canary_id}"))?;
            Ok((v.devices_active >= 1).then_some(()))
        },
    )?;
    demo.show(&["rollout", "status", &canary_id], 8)?;

    demo.say("3 a.m.: roll claims back everywhere, as a new generation; agents keep serving.");
    demo.show(&["rollout", "abort", &canary_id], 1)?;
    demo.show(&["rollback", "claims", "--to", "1", "--yes"], 6)?;
    demo.show(&["audit", "--last", "5"], 6)?;

    demo.say(&format!(
        "Done in {:.0} s. Explore: export FLEETML_SERVER={} FLEETML_CA={} FLEETML_TOKEN=$(cat {}/plane/admin.token)",
        demo.started.elapsed().as_secs_f64(),
        demo.server,
        dir.join(CA).display(),
        dir.display()
    ));
    println!(
        "  then: fleetctl devices list · fleetctl models list · fleetctl rollout list · fleetctl data list"
    );
    if !exit {
        println!("  the fleet keeps running; Ctrl-C stops it");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(())
}
