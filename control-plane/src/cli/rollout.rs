//! `fleetctl rollout …`: staged rollouts, and watching them.

use fleet_control::api::types::{GateOverrides, RolloutRequest, RolloutSummary, RolloutView};
use fleet_control::rollout::State as RolloutState;

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum RolloutCommand {
    /// Start rolling NAME@VERSION out to the devices SELECTOR picks, wave by wave.
    ///
    /// Example: fleetctl rollout start claims@3 --to board=raspberry-pi-4,site=lab --waves 10,50,100 --soak 10m
    Start {
        /// NAME@VERSION from the registry.
        model: String,
        /// Devices: `all`, or key=value terms that must all match: board=…, device=a|b,
        /// or any tag (site=lab).
        #[arg(long)]
        to: String,
        /// Cumulative wave sizes in percent of the selected devices, e.g. 1,10,50,100.
        #[arg(long, conflicts_with = "canary")]
        waves: Option<String>,
        /// A canary wave of this percent, then everyone (same as --waves N,100).
        #[arg(long)]
        canary: Option<u32>,
        /// Least time each wave runs before the next starts (s, m, h, d).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        soak: std::time::Duration,
        /// Percent of a wave's devices that must be active before the next wave;
        /// the others (offline devices) catch up when they return.
        #[arg(long, default_value_t = 100)]
        quorum: u32,
        /// A wave without its quorum this long after it started fails (s, m, h, d).
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        wave_deadline: std::time::Duration,
        /// When a health gate fails, return the reached devices to their previous
        /// version instead of pausing.
        #[arg(long)]
        auto_rollback: bool,
        /// Gate: most devices whose activation (or verification) failed.
        #[arg(long, default_value_t = 0)]
        max_activation_failures: u32,
        /// Gate: most devices whose golden self-test failed.
        #[arg(long, default_value_t = 0)]
        max_self_test_failures: u32,
        /// Gate: most devices that fell back from their requested backend (GPU → CPU).
        #[arg(long, default_value_t = 0)]
        max_fallbacks: u32,
        /// Gate: most devices with open drift alerts on the new version.
        #[arg(long, default_value_t = 0)]
        max_drift_alerts: u32,
        /// Gate: allowed rise of the missing-prediction rate over the old version's.
        #[arg(long, default_value_t = 0.05)]
        max_missing_rate_increase: f64,
        /// Gate: allowed ratio of the new p99 latency to the old version's.
        #[arg(long, default_value_t = 1.5)]
        max_p99_ratio: f64,
        /// Gate: allowed rise of the error rate (backend errors, timeouts) over the old's.
        #[arg(long, default_value_t = 0.01)]
        max_error_rate_increase: f64,
        /// Follow its progress until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Per-wave progress (pending, downloading, active, failed) and the health gates.
    Status {
        id: String,
        /// Redraw every second until the rollout ends.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// Every rollout and rollback, newest last.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop starting waves (devices already assigned keep their version).
    Pause { id: String },
    /// Continue a paused rollout; the gates count anew from now.
    Resume { id: String },
    /// End a rollout; devices keep what they were assigned (then `fleetctl rollback`).
    Abort { id: String },
}

pub(crate) fn rollout_command(server: &str, cmd: RolloutCommand) -> anyhow::Result<()> {
    let client = fleet_control::client::Client::new(server)?;
    match cmd {
        RolloutCommand::Start {
            model,
            to,
            waves,
            canary,
            soak,
            quorum,
            wave_deadline,
            auto_rollback,
            max_activation_failures,
            max_self_test_failures,
            max_fallbacks,
            max_drift_alerts,
            max_missing_rate_increase,
            max_p99_ratio,
            max_error_rate_increase,
            watch: follow,
        } => {
            let (name, version) =
                fleet_control::registry::parse_model_version(&model).map_err(anyhow::Error::msg)?;
            let r: RolloutView = client.post_as(
                "/v1/rollouts",
                &RolloutRequest {
                    model: name.clone(),
                    version,
                    to,
                    waves,
                    canary,
                    soak_s: Some(soak.as_secs()),
                    quorum_pct: Some(quorum),
                    deadline_s: Some(wave_deadline.as_secs()),
                    auto_rollback,
                    gates: Some(GateOverrides {
                        max_activation_failures: Some(max_activation_failures),
                        max_self_test_failures: Some(max_self_test_failures),
                        max_fallbacks: Some(max_fallbacks),
                        max_drift_alerts: Some(max_drift_alerts),
                        max_missing_rate_increase: Some(max_missing_rate_increase),
                        max_p99_ratio: Some(max_p99_ratio),
                        max_error_rate_increase: Some(max_error_rate_increase),
                    }),
                },
            )?;
            let id = r.id;
            println!(
                "rollout {id} started: {name}@v{version} to {} device(s) in {} wave(s)",
                r.devices_total,
                r.waves.len()
            );
            if follow {
                watch(&client, &id)?;
            } else {
                println!("follow it with: fleetctl rollout status {id} --watch");
            }
        }
        RolloutCommand::Status {
            id,
            watch: follow,
            json,
        } => {
            if follow {
                watch(&client, &id)?;
            } else {
                let v: RolloutView = client.get_as(&format!("/v1/rollouts/{id}"))?;
                if json {
                    print_json(&serde_json::to_value(&v)?)?;
                } else {
                    print!("{}", fleet_control::views::rollout_status(&v));
                }
            }
        }
        RolloutCommand::List { json } => {
            let list: Vec<RolloutSummary> = client.get_as("/v1/rollouts")?;
            if json {
                print_json(&serde_json::to_value(&list)?)?;
            } else {
                println!(
                    "{:<6} {:<9} {:<20} {:>8} {:<11} {:>9}  SELECTOR",
                    "ID", "KIND", "MODEL", "VERSION", "STATE", "ACTIVE"
                );
                for r in list {
                    println!(
                        "{:<6} {:<9} {:<20} {:>8} {:<11} {:>9}  {}",
                        r.id,
                        r.kind.as_str(),
                        r.model,
                        r.version.map_or("mixed".into(), |v| format!("v{v}")),
                        r.state.as_str(),
                        format!("{}/{}", r.devices_active, r.devices_total),
                        r.selector
                    );
                }
            }
        }
        RolloutCommand::Pause { id } => control_rollout(&client, &id, "pause")?,
        RolloutCommand::Resume { id } => control_rollout(&client, &id, "resume")?,
        RolloutCommand::Abort { id } => control_rollout(&client, &id, "abort")?,
    }
    Ok(())
}

/// `rollout pause|resume|abort ID`.
pub(crate) fn control_rollout(
    client: &fleet_control::client::Client,
    id: &str,
    action: &str,
) -> anyhow::Result<()> {
    let v: RolloutView = client.post_as(
        &format!("/v1/rollouts/{id}/{action}"),
        &serde_json::json!({}),
    )?;
    println!("rollout {id} is {}", v.state.as_str());
    Ok(())
}

/// Follows rollout `id` until it ends: a redrawn status on a terminal, a line per change
/// otherwise. Fails when it ends other than completed.
pub(crate) fn watch(client: &fleet_control::client::Client, id: &str) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let v: RolloutView = client.get_as(&format!("/v1/rollouts/{id}"))?;
        let text = fleet_control::views::rollout_status(&v);
        if tty {
            print!("\x1b[2J\x1b[H{text}");
        } else if text != last {
            println!("{}", fleet_control::views::rollout_line(&v));
        }
        last = text;
        let state = v.state.as_str();
        let reason = v.reason.as_deref().unwrap_or("");
        match v.state {
            RolloutState::Completed => return Ok(()),
            RolloutState::Aborted | RolloutState::RolledBack => {
                anyhow::bail!("{} {id} {state}: {reason}", v.kind.as_str())
            }
            RolloutState::Paused if !tty => anyhow::bail!(
                "{} {id} paused: {reason} (fleetctl rollout resume|abort {id})",
                v.kind.as_str()
            ),
            _ => {}
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
