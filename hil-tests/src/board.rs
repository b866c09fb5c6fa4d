//! The hardware-in-the-loop harness: one [`Board`] — a board profile plus the driver
//! that runs the agent on it — and the lab equipment scenarios break things with:
//! network namespaces with `tc netem` ([`Netns`]), a small disk ([`Tmpfs`]), a memory
//! cgroup ([`Cgroup`]). The scenarios themselves (`tests/it/hil.rs`) only see a board and
//! a [`Device`], so the same scenario runs on every driver:
//!
//! - `sim`: the agent built for this machine, as a local process under the profile's
//!   limits: its `memory_budget_mb` as a memory cgroup (v2, else v1), its `cpu_cores` as
//!   CPU affinity (`taskset`);
//! - `qemu`: the agent cross-built for `aarch64-unknown-linux-gnu`, run by `qemu-aarch64`
//!   user emulation (Debian `qemu-user`) with Debian's arm64 libraries (`-L`), under the
//!   same limits, for the profiles whose target is aarch64;
//! - `ssh`: a real board reached over SSH: the binary, its config and the board profile
//!   are copied to it and the agent runs there (docs/HIL.md has the lab's steps). Not in
//!   CI; scenarios that need local root (namespaces, tmpfs) say so and are skipped.
//!
//! `FLEETML_HIL_BOARDS` picks boards (`sim:raspberry-pi-4,qemu:jetson-orin-nano,ssh`);
//! the default is every sim profile below and, where the emulator and the cross build
//! exist, the aarch64 ones under qemu.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{RunningAgent, bin, root, scrub_cargo_env};

/// Profiles the `sim` driver runs by default.
pub const SIM_BOARDS: [&str; 3] = ["raspberry-pi-4", "jetson-orin-nano", "generic-x86_64"];
/// Profiles the `qemu` driver runs by default (aarch64 targets).
pub const QEMU_BOARDS: [&str; 2] = ["raspberry-pi-4", "jetson-orin-nano"];
/// What qemu itself needs beyond the agent's budget (its translation cache, mostly).
const QEMU_OVERHEAD_MB: u64 = 512;

/// What a scenario needs from this machine or the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Root here, for network namespaces, veth pairs and `tc`.
    Netns,
    /// Root here and a local data dir, for a small tmpfs.
    SmallDisk,
    /// `libfaketime`, to run the control plane with a skewed clock.
    Faketime,
}

/// A board profile from `boards/NAME.toml`.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub target: String,
    pub cpu_cores: usize,
    pub memory_budget_mb: u64,
    pub path: PathBuf,
}

impl Profile {
    pub fn load(name: &str) -> Result<Profile, String> {
        let path = root().join(format!("boards/{name}.toml"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("board profile {}: {e}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let int = |v: Option<&toml::Value>| v.and_then(|v| v.as_integer()).unwrap_or(0);
        Ok(Profile {
            name: name.to_string(),
            target: table
                .get("target")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string(),
            cpu_cores: int(table.get("cpu_cores")).max(1) as usize,
            memory_budget_mb: int(table.get("agent").and_then(|a| a.get("memory_budget_mb")))
                as u64,
            path,
        })
    }
}

/// How the agent gets onto the board.
#[derive(Debug, Clone)]
pub enum Driver {
    Sim,
    Qemu(Qemu),
    Ssh(Ssh),
}

/// `qemu-aarch64` and the cross-built agent it runs.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub emulator: PathBuf,
    /// Debian's arm64 libraries (`libc6-arm64-cross`), for `-L`.
    pub sysroot: PathBuf,
    pub agent: PathBuf,
}

impl Qemu {
    /// The emulator, the arm64 libraries and a fresh aarch64 release build of the agent
    /// (cargo builds it, or finds it up to date); why not, when one is missing.
    pub fn find() -> Result<Qemu, String> {
        static FOUND: OnceLock<Result<Qemu, String>> = OnceLock::new();
        FOUND
            .get_or_init(|| {
                let emulator = which("qemu-aarch64")
                    .ok_or("qemu-aarch64 is not installed (Debian package qemu-user)")?;
                let sysroot = PathBuf::from("/usr/aarch64-linux-gnu");
                if !sysroot.join("lib/ld-linux-aarch64.so.1").exists() {
                    return Err(
                        "no arm64 libraries in /usr/aarch64-linux-gnu (Debian package libc6-arm64-cross)"
                            .into(),
                    );
                }
                if which("aarch64-linux-gnu-gcc").is_none() {
                    return Err("no cross linker (Debian package gcc-aarch64-linux-gnu)".into());
                }
                let agent = cross_build_agent()?;
                Ok(Qemu {
                    emulator,
                    sysroot,
                    agent,
                })
            })
            .clone()
    }
}

/// `cargo build --release --target aarch64-unknown-linux-gnu -p fleet-agent`: the path
/// of the binary it produced (a no-op when `.ci/run` built it already).
fn cross_build_agent() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    scrub_cargo_env(&mut cmd);
    let out = cmd
        .current_dir(root())
        .args([
            "build",
            "--quiet",
            "--release",
            "--locked",
            "--target",
            "aarch64-unknown-linux-gnu",
            "-p",
            "fleet-agent",
            "--bin",
            "fleet-agent",
            "--message-format=json",
        ])
        .output()
        .map_err(|e| format!("cargo: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "the aarch64 cross build failed (rustup target add aarch64-unknown-linux-gnu?): {}",
            err.lines().last().unwrap_or("")
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "fleet-agent")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo built no aarch64 fleet-agent".into())
}

/// A real board over SSH, from the environment (docs/HIL.md):
/// `FLEETML_HIL_SSH=user@host` (key-based, `BatchMode`), `FLEETML_HIL_SSH_BOARD` (its
/// profile, default raspberry-pi-4), `FLEETML_HIL_SSH_AGENT` (the binary to copy,
/// default the aarch64 release build), `FLEETML_HIL_SSH_DIR` (default
/// /tmp/fleetml-hil), `FLEETML_HIL_LISTEN_IP` (this machine's address as the board sees
/// it: the control plane listens there).
#[derive(Debug, Clone)]
pub struct Ssh {
    pub target: String,
    pub host: String,
    pub agent: PathBuf,
    pub remote_dir: String,
    pub listen_ip: String,
}

impl Ssh {
    fn from_env() -> Result<(Ssh, String), String> {
        let target = std::env::var("FLEETML_HIL_SSH").map_err(|_| "FLEETML_HIL_SSH is not set")?;
        let host = target.rsplit('@').next().unwrap_or(&target).to_string();
        let board =
            std::env::var("FLEETML_HIL_SSH_BOARD").unwrap_or_else(|_| "raspberry-pi-4".into());
        let agent = match std::env::var_os("FLEETML_HIL_SSH_AGENT") {
            Some(path) => PathBuf::from(path),
            None => cross_build_agent()?,
        };
        let listen_ip = std::env::var("FLEETML_HIL_LISTEN_IP").map_err(
            |_| "FLEETML_HIL_LISTEN_IP (this machine's address on the lab network) is not set",
        )?;
        let remote_dir =
            std::env::var("FLEETML_HIL_SSH_DIR").unwrap_or_else(|_| "/tmp/fleetml-hil".into());
        Ok((
            Ssh {
                target,
                host,
                agent,
                remote_dir,
                listen_ip,
            },
            board,
        ))
    }

    fn command(&self, remote: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            &self.target,
            remote,
        ]);
        cmd
    }

    fn run(&self, remote: &str) -> Result<(), String> {
        let out = self
            .command(remote)
            .output()
            .map_err(|e| format!("ssh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ssh {} {remote}: {}",
                self.target,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn copy(&self, files: &[&Path], to: &str) -> Result<(), String> {
        let out = Command::new("scp")
            .args(["-q", "-o", "BatchMode=yes"])
            .args(files)
            .arg(format!("{}:{to}", self.target))
            .output()
            .map_err(|e| format!("scp: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "scp to {}: {}",
                self.target,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

/// A board profile and the driver that runs the agent on it.
#[derive(Debug, Clone)]
pub struct Board {
    pub profile: Profile,
    pub driver: Driver,
}

/// A board that was asked for but cannot run here, and why.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub label: String,
    pub why: String,
}

impl Board {
    /// `driver:profile`.
    pub fn label(&self) -> String {
        let driver = match self.driver {
            Driver::Sim => "sim",
            Driver::Qemu(_) => "qemu",
            Driver::Ssh(_) => "ssh",
        };
        format!("{driver}:{}", self.profile.name)
    }

    /// The boards `FLEETML_HIL_BOARDS` names, else the default set.
    pub fn selection() -> Vec<Result<Board, Unavailable>> {
        let wanted: Vec<String> = match std::env::var("FLEETML_HIL_BOARDS") {
            Ok(list) => list.split(',').map(|s| s.trim().to_string()).collect(),
            Err(_) => SIM_BOARDS
                .iter()
                .map(|b| format!("sim:{b}"))
                .chain(QEMU_BOARDS.iter().map(|b| format!("qemu:{b}")))
                .collect(),
        };
        wanted
            .iter()
            .filter(|w| !w.is_empty())
            .map(|w| Board::named(w))
            .collect()
    }

    /// `sim:PROFILE`, `qemu:PROFILE` or `ssh` (profile from `FLEETML_HIL_SSH_BOARD`).
    pub fn named(spec: &str) -> Result<Board, Unavailable> {
        let unavailable = |why: String| Unavailable {
            label: spec.to_string(),
            why,
        };
        let (driver, profile) = spec.split_once(':').unwrap_or((spec, ""));
        let (driver, profile) = match driver {
            "sim" => (Driver::Sim, profile.to_string()),
            "qemu" => (
                Driver::Qemu(Qemu::find().map_err(unavailable)?),
                profile.to_string(),
            ),
            "ssh" => {
                let (ssh, board) = Ssh::from_env().map_err(unavailable)?;
                (Driver::Ssh(ssh), board)
            }
            other => {
                return Err(unavailable(format!(
                    "unknown driver `{other}` (sim, qemu, ssh)"
                )));
            }
        };
        let profile = Profile::load(&profile).map_err(unavailable)?;
        if matches!(driver, Driver::Qemu(_)) && profile.target != "aarch64-unknown-linux-gnu" {
            return Err(unavailable(format!(
                "qemu runs aarch64 boards; {} is {}",
                profile.name, profile.target
            )));
        }
        Ok(Board { profile, driver })
    }

    /// Whether this board can take part in a scenario that needs `needs`.
    pub fn supports(&self, needs: &[Needs]) -> Result<(), String> {
        for need in needs {
            match need {
                Needs::Netns | Needs::SmallDisk if matches!(self.driver, Driver::Ssh(_)) => {
                    return Err("needs the board in a local network namespace or on a local tmpfs; a lab does this with its own switch and disk".into());
                }
                Needs::Netns | Needs::SmallDisk if !is_root() => {
                    return Err("needs root (network namespaces, tc, mount)".into());
                }
                Needs::Netns if which("tc").is_none() || which("nft").is_none() => {
                    return Err(
                        "tc and nft (Debian packages iproute2, nftables) are not both installed"
                            .into(),
                    );
                }
                Needs::Faketime if faketime_library().is_none() => {
                    return Err("libfaketime is not installed (Debian package faketime)".into());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The address the control plane listens on so that this board reaches it.
    pub fn plane_ip(&self) -> String {
        match &self.driver {
            Driver::Ssh(ssh) => ssh.listen_ip.clone(),
            _ => "127.0.0.1".into(),
        }
    }

    /// How the profile's limits are applied, for the summary.
    pub fn limits(&self) -> String {
        match &self.driver {
            Driver::Ssh(_) => "the board's own".into(),
            _ => {
                let memory = match Cgroup::kind() {
                    Some(kind) => format!("{} MiB ({kind})", self.memory_limit_mb()),
                    None => "not limited (no writable memory cgroup)".into(),
                };
                format!("memory {memory}, cpus {}", self.cpu_list())
            }
        }
    }

    fn memory_limit_mb(&self) -> u64 {
        let budget = self.profile.memory_budget_mb.max(64);
        match self.driver {
            Driver::Qemu(_) => budget + QEMU_OVERHEAD_MB,
            _ => budget,
        }
    }

    fn cpu_list(&self) -> String {
        let here = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = self.profile.cpu_cores.min(here).max(1);
        if n == 1 {
            "0".into()
        } else {
            format!("0-{}", n - 1)
        }
    }

    /// Whether labs on this board must take turns: a real board is one machine.
    pub fn exclusive(&self) -> bool {
        matches!(self.driver, Driver::Ssh(_))
    }

    /// Clears what an earlier lab left for device `name` on the board (its data dir on
    /// an SSH board; local labs are fresh temporary directories).
    pub fn prepare(&self, name: &str) -> Result<(), String> {
        match &self.driver {
            Driver::Ssh(ssh) => ssh.run(&format!("rm -rf {}/data-{name}", ssh.remote_dir)),
            _ => Ok(()),
        }
    }

    /// Starts `fleet-agent run` for the enrolled device `name` (its config
    /// `dir/NAME.toml`, its data in `dir/data-NAME`) inside `netns` when given, its API
    /// on `listen_ip` (port chosen by the agent).
    pub fn start(&self, dir: &Path, name: &str, netns: Option<&Netns>) -> Device {
        let listen_ip = netns.map_or("127.0.0.1".to_string(), |n| n.dev_mgmt_ip.clone());
        let config = format!("{name}.toml");
        let data = format!("data-{name}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))
            .expect("agent log");
        if let Driver::Ssh(ssh) = &self.driver {
            let remote = &ssh.remote_dir;
            ssh.run(&format!("mkdir -p {remote}")).expect("ssh");
            let board = dir.join(format!("{name}.board.toml"));
            std::fs::copy(&self.profile.path, &board).expect("board profile");
            ssh.copy(&[&ssh.agent, &dir.join(&config), &board], remote)
                .expect("copy to the board");
            let token = api_token(dir);
            ssh.copy(&[&dir.join(API_TOKEN_FILE)], remote)
                .expect("copy to the board");
            let cmd = ssh.command(&format!(
                "cd {remote} && chmod 0600 {config} {API_TOKEN_FILE} && exec ./fleet-agent run --config {config} --data-dir {data} --listen 0.0.0.0:0 --allow-remote-api --api-token-file {API_TOKEN_FILE} --board {name}.board.toml"
            ));
            let mut agent = RunningAgent::spawn_logged(cmd, log.into());
            agent.token = Some(token);
            if let Some(port) = agent.addr.strip_prefix("0.0.0.0:") {
                agent.addr = format!("{}:{port}", ssh.host);
            }
            agent.wait_ready();
            return Device {
                agent: Some(agent),
                cgroup: None,
                remote: Some((ssh.clone(), format!("fleet-agent run --config {config}"))),
            };
        }
        let cgroup = Cgroup::create(
            &format!("{name}-{}", std::process::id()),
            self.memory_limit_mb() << 20,
        );
        let mut cmd = Command::new("sh");
        // Join the cgroup, then become the agent: nothing runs outside the limit.
        cmd.current_dir(dir).args([
            "-c",
            r#"if [ -n "$FLEETML_CGROUP" ]; then echo $$ > "$FLEETML_CGROUP/cgroup.procs" || exit 97; fi; exec "$@""#,
            "sh",
        ]);
        if let Some(cg) = &cgroup {
            cmd.env("FLEETML_CGROUP", &cg.path);
        }
        if let Some(ns) = netns {
            cmd.args(["ip", "netns", "exec", &ns.name]);
        }
        cmd.args(["taskset", "--cpu-list", &self.cpu_list()]);
        match &self.driver {
            Driver::Qemu(q) => {
                cmd.arg(&q.emulator).arg("-L").arg(&q.sysroot).arg(&q.agent);
            }
            _ => {
                cmd.arg(bin("fleet-agent"));
            }
        }
        cmd.args(["run", "--config", &config, "--data-dir", &data, "--listen"])
            .arg(format!("{listen_ip}:0"))
            .arg("--board")
            .arg(&self.profile.path);
        // Inside a network namespace the API listens on the namespace's address, not
        // loopback: the agent then asks for a token on every request.
        let token = netns.map(|_| {
            cmd.args(["--allow-remote-api", "--api-token-file", API_TOKEN_FILE]);
            api_token(dir)
        });
        let mut agent = RunningAgent::spawn_logged(cmd, log.into());
        agent.token = token;
        agent.wait_ready();
        Device {
            agent: Some(agent),
            cgroup,
            remote: None,
        }
    }
}

/// The agent running on a board.
#[derive(Debug)]
pub struct Device {
    agent: Option<RunningAgent>,
    cgroup: Option<Cgroup>,
    /// The board and a `pkill -f` pattern, for an agent running over SSH.
    remote: Option<(Ssh, String)>,
}

impl Device {
    /// `HOST:PORT` of its API.
    pub fn addr(&self) -> String {
        self.agent.as_ref().expect("running").addr.clone()
    }

    /// The API token its requests must carry, if it asks for one.
    pub fn token(&self) -> Option<String> {
        self.agent.as_ref().expect("running").token.clone()
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        self.agent
            .as_ref()
            .expect("running")
            .request(method, path, body)
    }

    /// Cuts the power: SIGKILL, no chance to flush anything.
    pub fn power_cut(mut self) {
        self.kill();
    }

    /// Peak memory the board's cgroup saw, in bytes (where a cgroup limits it). It
    /// counts page cache too: the agent's own binary (over 200 MiB in a debug build),
    /// its store's files.
    pub fn peak_memory(&self) -> Option<u64> {
        self.cgroup.as_ref()?.peak()
    }

    /// The agent process's peak resident set and its anonymous memory now, in bytes
    /// (`VmHWM`, `RssAnon`; under qemu, the emulator's), for a local board.
    pub fn resident(&self) -> Option<(u64, u64)> {
        if self.remote.is_some() {
            return None;
        }
        let pid = self.agent.as_ref()?.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line.split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
                .map(|k| k * 1024)
        };
        Some((kib("VmHWM:")?, kib("RssAnon:")?))
    }

    fn kill(&mut self) {
        if let Some((ssh, pattern)) = &self.remote {
            let _ = ssh.run(&format!("pkill -KILL -f '{pattern}'"));
        }
        if let Some(mut agent) = self.agent.take() {
            // The process group would be nicer; the agent is the exec'd child itself.
            let _ = agent.child.kill();
            let _ = agent.child.wait();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A memory cgroup the agent runs in, removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    v2: bool,
}

impl Cgroup {
    /// `cgroup v2` or `cgroup v1`, whichever memory controller this machine lets us use.
    pub fn kind() -> Option<&'static str> {
        Self::base().map(|(_, v2)| if v2 { "cgroup v2" } else { "cgroup v1" })
    }

    fn base() -> Option<(PathBuf, bool)> {
        let v2 = Path::new("/sys/fs/cgroup");
        let controllers =
            std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "memory") && writable(v2) {
            return Some((v2.to_path_buf(), true));
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        (v1.join("memory.limit_in_bytes").exists() && writable(v1))
            .then(|| (v1.to_path_buf(), false))
    }

    fn create(name: &str, bytes: u64) -> Option<Cgroup> {
        let (base, v2) = Self::base()?;
        let path = base.join(format!("fleetml-hil-{name}"));
        std::fs::create_dir_all(&path).ok()?;
        let limit = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(path.join(limit), bytes.to_string()).ok()?;
        if v2 {
            // No swap to hide in: the limit is the board's RAM.
            let _ = std::fs::write(path.join("memory.swap.max"), "0");
        }
        Some(Cgroup { path, v2 })
    }

    fn peak(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.path.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Empty once its processes are gone; retry briefly while the kernel reaps them.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn writable(path: &Path) -> bool {
    let probe = path.join(format!("fleetml-probe-{}", std::process::id()));
    let ok = std::fs::create_dir(&probe).is_ok();
    let _ = std::fs::remove_dir(&probe);
    ok
}

/// Two network namespaces' worth of lab: the device lives in its own namespace with two
/// veth pairs to this one — an *uplink* to the control plane, which faults are applied
/// to, and a *management* link the test drives the device's API over, which stays clean
/// (a lab's serial console, in effect). Removed on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    /// The control plane's side of the uplink (listen here).
    pub host_ip: String,
    pub dev_ip: String,
    /// The device's side of the management link (its API listens here).
    pub dev_mgmt_ip: String,
    host_if: String,
    dev_if: String,
    mgmt_if: String,
    netem: OnceLock<bool>,
}

impl Netns {
    pub fn create() -> Result<Netns, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 1000) * 16 + n % 16;
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let (a, b) = (id / 64 % 256, (id % 64) * 4);
        let ns = Netns {
            name: format!("fleetml-{tag}"),
            host_ip: format!("10.77.{a}.{}", b + 1),
            dev_ip: format!("10.77.{a}.{}", b + 2),
            dev_mgmt_ip: format!("10.78.{a}.{}", b + 2),
            host_if: format!("fu{tag}h"),
            dev_if: format!("fu{tag}d"),
            mgmt_if: format!("fm{tag}h"),
            netem: OnceLock::new(),
        };
        let mgmt_dev = format!("fm{tag}d");
        let host_mgmt_ip = format!("10.78.{a}.{}", b + 1);
        let inside = |args: &str| format!("netns exec {} ip {args}", ns.name);
        for step in [
            format!("netns add {}", ns.name),
            format!(
                "link add {} type veth peer name {} netns {}",
                ns.host_if, ns.dev_if, ns.name
            ),
            format!(
                "link add {} type veth peer name {mgmt_dev} netns {}",
                ns.mgmt_if, ns.name
            ),
            format!("addr add {}/30 dev {}", ns.host_ip, ns.host_if),
            format!("addr add {host_mgmt_ip}/30 dev {}", ns.mgmt_if),
            format!("link set {} up", ns.host_if),
            format!("link set {} up", ns.mgmt_if),
            inside("link set lo up"),
            inside(&format!("addr add {}/30 dev {}", ns.dev_ip, ns.dev_if)),
            inside(&format!("addr add {}/30 dev {mgmt_dev}", ns.dev_mgmt_ip)),
            inside(&format!("link set {} up", ns.dev_if)),
            inside(&format!("link set {mgmt_dev} up")),
        ] {
            sh("ip", &step)?;
        }
        Ok(ns)
    }

    /// Whether this kernel has `sch_netem` (probed on the uplink).
    pub fn has_netem(&self) -> bool {
        *self.netem.get_or_init(|| {
            let ok = sh(
                "tc",
                &format!("qdisc add dev {} root netem delay 0ms", self.host_if),
            )
            .is_ok();
            let _ = sh("tc", &format!("qdisc del dev {} root", self.host_if));
            ok
        })
    }

    /// Drops `loss_pct` % of the uplink's packets both ways and, with netem, delays them
    /// `delay_ms` ± `jitter_ms`. Kernels built without netem (this CI machine's) get the
    /// loss from nftables (`numgen random`) and no delay; the returned text says which.
    pub fn degrade(&self, loss_pct: u32, delay_ms: u32, jitter_ms: u32) -> Result<String, String> {
        self.heal()?;
        if self.has_netem() {
            let spec = format!("delay {delay_ms}ms {jitter_ms}ms loss {loss_pct}%");
            self.tc(&spec)?;
            Ok(format!("tc netem {spec}"))
        } else {
            self.nft(&format!("numgen random mod 100 < {loss_pct}"))?;
            Ok(format!(
                "{loss_pct}% loss by nftables; no delay (this kernel has no sch_netem)"
            ))
        }
    }

    /// Drops everything on the uplink (`true`) or nothing (`false`).
    pub fn partition(&self, cut: bool) -> Result<(), String> {
        self.heal()?;
        match (cut, self.has_netem()) {
            (false, _) => Ok(()),
            (true, true) => self.tc("loss 100%"),
            (true, false) => self.nft(""),
        }
    }

    /// Removes every impairment.
    pub fn heal(&self) -> Result<(), String> {
        if self.has_netem() {
            for (inside, dev) in [(false, &self.host_if), (true, &self.dev_if)] {
                let _ = self.tc_at(inside, &format!("qdisc del dev {dev} root"));
            }
        } else {
            let _ = sh(
                "ip",
                &format!("netns exec {} nft delete table inet fleetml", self.name),
            );
        }
        Ok(())
    }

    /// `tc qdisc add … netem SPEC` on both ends of the uplink.
    fn tc(&self, spec: &str) -> Result<(), String> {
        for (inside, dev) in [(false, &self.host_if), (true, &self.dev_if)] {
            self.tc_at(inside, &format!("qdisc add dev {dev} root netem {spec}"))?;
        }
        Ok(())
    }

    fn tc_at(&self, inside: bool, args: &str) -> Result<(), String> {
        if inside {
            sh("ip", &format!("netns exec {} tc {args}", self.name))
        } else {
            sh("tc", args)
        }
    }

    /// Drops the uplink's packets both ways inside the device's namespace where `matching`
    /// (an nftables expression; empty: all) holds.
    fn nft(&self, matching: &str) -> Result<(), String> {
        use std::io::Write;
        let dev = &self.dev_if;
        let rules = format!(
            "table inet fleetml {{\n chain in {{ type filter hook input priority 0; iifname \"{dev}\" {matching} drop; }}\n chain out {{ type filter hook output priority 0; oifname \"{dev}\" {matching} drop; }}\n}}\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft (Debian package nftables): {e}"))?;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the ends inside it and with them their peers.
        let _ = sh("ip", &format!("netns del {}", self.name));
        let _ = sh("ip", &format!("link del {}", self.host_if));
        let _ = sh("ip", &format!("link del {}", self.mgmt_if));
    }
}

/// A small tmpfs mounted at a path (a board's small, fillable disk), unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, mib: u64) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount tmpfs: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    /// Bytes free on it.
    pub fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.path)
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the free bytes")
    }

    /// Grows (or shrinks) `filler` until about `leave` bytes are free.
    pub fn fill(&self, filler: &Path, leave: u64) {
        let have = std::fs::metadata(filler).map_or(0, |m| m.len());
        let target = (have + self.free()).saturating_sub(leave);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(filler)
            .expect("filler");
        if target < have {
            file.set_len(target).expect("shrink filler");
        } else {
            // Written, not sparse: tmpfs counts only pages that hold data.
            use std::io::{Seek, Write};
            let mut file = file;
            file.seek(std::io::SeekFrom::Start(have)).expect("seek");
            let chunk = vec![0xA5u8; 1 << 16];
            let mut left = target - have;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                if file.write_all(&chunk[..n]).is_err() {
                    break;
                }
                left -= n as u64;
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// `LD_PRELOAD` library of libfaketime, where installed.
pub fn faketime_library() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Environment that runs a process `offset` (libfaketime syntax: `-2h`, `+10m`) off the
/// real clock; monotonic clocks stay real so timers keep working.
pub fn skewed_clock(offset: &str) -> Vec<(String, String)> {
    let lib = faketime_library().expect("libfaketime");
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME".into(), offset.to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_DONT_RESET".into(), "1".into()),
    ]
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Runs `program` with whitespace-separated `args`; its stderr on failure.
fn sh(program: &str, args: &str) -> Result<(), String> {
    let out = Command::new(program)
        .args(args.split_whitespace())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// What one board × scenario came to.
#[derive(Debug, Clone)]
pub enum Outcome {
    Pass { seconds: f64, note: String },
    Fail { seconds: f64, why: String },
    Skip(String),
}

/// The board × scenario table the harness prints.
#[derive(Debug, Default)]
pub struct Summary {
    pub rows: Vec<(String, String, Outcome)>,
}

impl Summary {
    pub fn failures(&self) -> Vec<&(String, String, Outcome)> {
        self.rows
            .iter()
            .filter(|(_, _, o)| matches!(o, Outcome::Fail { .. }))
            .collect()
    }

    /// The table: one row per board, one column per scenario, then the notes, skips and
    /// failures spelled out.
    pub fn render(
        &self,
        boards: &[String],
        scenarios: &[&str],
        limits: &[(String, String)],
    ) -> String {
        let mut out = String::new();
        let width = scenarios.iter().map(|s| s.len()).max().unwrap_or(0).max(9);
        let first = boards.iter().map(|b| b.len()).max().unwrap_or(5).max(5);
        out.push_str(&format!("{:first$}", "board"));
        for s in scenarios {
            out.push_str(&format!("  {s:width$}"));
        }
        out.push('\n');
        for board in boards {
            out.push_str(&format!("{board:first$}"));
            for s in scenarios {
                let cell = match self.rows.iter().find(|(b, sc, _)| b == board && sc == s) {
                    Some((_, _, Outcome::Pass { seconds, .. })) => format!("pass {seconds:.0}s"),
                    Some((_, _, Outcome::Fail { .. })) => "FAIL".into(),
                    Some((_, _, Outcome::Skip(_))) => "skip".into(),
                    None => "-".into(),
                };
                out.push_str(&format!("  {cell:width$}"));
            }
            out.push('\n');
        }
        for (board, limit) in limits {
            out.push_str(&format!("{board}: {limit}\n"));
        }
        for (board, scenario, outcome) in &self.rows {
            match outcome {
                Outcome::Pass { note, .. } if !note.is_empty() => {
                    out.push_str(&format!("{board} {scenario}: {note}\n"))
                }
                Outcome::Skip(why) => {
                    out.push_str(&format!("{board} {scenario}: skipped: {why}\n"))
                }
                Outcome::Fail { seconds, why } => out.push_str(&format!(
                    "{board} {scenario}: FAILED after {seconds:.0}s: {why}\n"
                )),
                _ => {}
            }
        }
        out
    }
}

/// The file, in the lab's directory, holding the API token of agents that listen beyond
/// loopback.
const API_TOKEN_FILE: &str = "api.token";

/// Writes the lab's API token to `dir/api.token` (mode 0600) and returns it.
fn api_token(dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let token = "hil-lab-api-token-0123456789abcdef0123456789".to_string();
    let path = dir.join(API_TOKEN_FILE);
    std::fs::write(&path, &token).expect("api token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    token
}
