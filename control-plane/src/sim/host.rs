//! The processes a simulation runs (`fleetctl serve`, mosquitto) and what `/proc`
//! says about them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::options::*;

/// Child processes, stopped (SIGTERM, then SIGKILL) in reverse order on drop.
pub(super) struct Children(pub(super) Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            crate::demo::stop_child(c);
        }
    }
}

pub(super) fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(dir.join(name)).with_context(|| format!("creating {name}"))
}

/// Runs `fleetctl ARGS` in `dir`; its stdout, or an error with its stderr.
pub(super) fn fleetctl(exe: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(exe)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running fleetctl {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`fleetctl {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A signing key, the trust policy naming it, and claims v1 and v2 built and signed with
/// the same commands an operator types.
pub(super) fn prepare_bundles(exe: &Path, dir: &Path) -> anyhow::Result<()> {
    for (name, bytes) in crate::demo::CLAIMS {
        std::fs::write(dir.join(name), bytes).with_context(|| format!("writing {name}"))?;
    }
    fleetctl(
        exe,
        dir,
        &["keys", "generate", "--out", "keys", "--name", "sim"],
    )?;
    fleetctl(
        exe,
        dir,
        &[
            "keys",
            "trust-policy",
            "--public",
            "keys/sim.pub",
            "--out",
            "trust.toml",
        ],
    )?;
    for version in ["1", "2"] {
        let out = format!("{MODEL}-v{version}.fmb");
        fleetctl(
            exe,
            dir,
            &[
                "bundle",
                "build",
                "--model",
                "model.onnx",
                "--name",
                MODEL,
                "--version",
                version,
                "--label",
                "sim",
                "--features",
                "features.toml",
                "--lineage",
                "lineage.toml",
                "--reference",
                "reference.csv",
                "--golden",
                "holdout.csv",
                "--key",
                "keys/sim.key",
                "--out",
                &out,
            ],
        )?;
    }
    Ok(())
}

/// The mosquitto executable: `--mosquitto`, else the usual places and PATH.
pub(super) fn find_mosquitto(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    find_program(
        "mosquitto",
        given,
        "install Debian's mosquitto (apt-get install mosquitto), pass --mosquitto PATH, or use --broker embedded",
    )
}

/// The nats-server executable: `--nats`, else the usual places and PATH.
pub(super) fn find_nats(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    find_program(
        "nats-server",
        given,
        "install Debian's nats-server (apt-get install nats-server), pass --nats PATH, or use another --broker",
    )
}

/// `given` when it is a file, else `name` in the usual places and PATH.
fn find_program(name: &str, given: Option<&Path>, hint: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        anyhow::ensure!(p.is_file(), "{}: no such file ({hint})", p.display());
        return Ok(p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .into_iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found: {hint}"))
}

pub(super) fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A private mosquitto on `port` (loopback), persistence on, no connection cap.
pub(super) fn start_mosquitto(bin: &Path, dir: &Path, port: u16) -> anyhow::Result<Child> {
    let store = dir.join("mosquitto");
    std::fs::create_dir_all(&store)?;
    let config = store.join("mosquitto.conf");
    // As root, mosquitto would drop to user `mosquitto`, which cannot write into this
    // private folder. Devices send their derived passwords; without a password file
    // mosquitto accepts any login (the embedded broker checks them).
    std::fs::write(
        &config,
        format!(
            "listener {port} 127.0.0.1\nmax_connections -1\nallow_anonymous true\n\
             persistence true\npersistence_location {}/\n\
             # The ingest's queue: devices' messages wait here while it stores a batch.\n\
             max_queued_messages 1000000\n\
             {}\
             log_type error\nlog_type warning\nconnection_messages false\n{}",
            store.display(),
            crate::mosquitto::in_flight_conf(),
            if running_as_root() { "user root\n" } else { "" }
        ),
    )?;
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log_file(dir, "mosquitto.log")?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "mosquitto exited ({status}) before listening; see {}",
                dir.join("mosquitto.log").display()
            );
        }
        if Instant::now() > deadline {
            crate::demo::stop_child(&mut child);
            bail!("mosquitto did not listen on 127.0.0.1:{port} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// The ports of one node of the simulator's NATS cluster.
pub(super) struct NatsNode {
    pub(super) port: u16,
    pub(super) mqtt_port: u16,
}

/// A private NATS cluster of `n` nodes on loopback (JetStream and MQTT on each, its
/// files under `dir/nats`), as docs/DEPLOY.md lays one out: consumers of QoS 1
/// subscriptions (agents of earlier releases; this release's subscribe with QoS 0) in
/// memory, still replicated on every node.
pub(super) fn start_nats(
    bin: &Path,
    dir: &Path,
    n: usize,
    children: &mut Children,
) -> anyhow::Result<Vec<NatsNode>> {
    let store = dir.join("nats");
    std::fs::create_dir_all(&store)?;
    let mut nodes = Vec::new();
    let mut routes = Vec::new();
    for _ in 0..n {
        let (port, mqtt_port) = (crate::demo::free_port()?, crate::demo::free_port()?);
        routes.push(crate::demo::free_port()?);
        nodes.push(NatsNode { port, mqtt_port });
    }
    let route_urls: Vec<String> = routes
        .iter()
        .map(|p| format!("nats-route://127.0.0.1:{p}"))
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        let config = store.join(format!("n{i}.conf"));
        std::fs::write(
            &config,
            format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\nmax_connections: 1000000\n\
                 jetstream {{ store_dir: \"{}\" }}\n\
                 cluster {{ name: fleetml, listen: 127.0.0.1:{}, routes: [{}] }}\n\
                 mqtt {{ listen: 127.0.0.1:{}, consumer_memory_storage: true }}\n",
                node.port,
                store.join(format!("js{i}")).display(),
                routes[i],
                route_urls.join(", "),
                node.mqtt_port,
            ),
        )?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log_file(dir, &format!("nats-{i}.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        children.0.push(child);
    }
    for (i, node) in nodes.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", node.mqtt_port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "nats-server node {i} did not listen for MQTT on 127.0.0.1:{} within 20 s; see {}",
                node.mqtt_port,
                dir.join(format!("nats-{i}.log")).display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(nodes)
}

/// `VmRSS` and `VmHWM` of a process, KiB.
pub(super) fn memory_of(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub(super) fn rss(pid: u32) -> u64 {
    memory_of(pid).0
}

/// User + system CPU seconds of a process, all its threads (`/proc/PID/stat` fields 14
/// and 15, in the kernel's USER_HZ of 100 ticks per second).
pub(super) fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let field = |i: usize| {
        rest.split_whitespace()
            .nth(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field(11) + field(12)) as f64 / 100.0
}
