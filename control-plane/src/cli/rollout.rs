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
        /// A shadow rollout: the version runs beside what each selected device serves, on
        /// live requests after they are answered, never answering itself; its agreement,
        /// output differences and latency are reported per window (`rollout status`), and
        /// `rollout promote ID` makes it a real rollout once its gates pass.
        #[arg(long)]
        shadow: bool,
        /// The share of requests a shadow runs on: a percentage (25%) or a fraction
        /// (0.25), 0.1% to 100%. Devices shed shadow runs first when busy.
        #[arg(long, requires = "shadow", value_parser = fleetml_protocol::assignment::ShadowModel::parse_sample, default_value = "100%")]
        shadow_sample: u16,
        /// A gate as NAME OP VALUE, repeatable: shadow_agreement>=0.98,
        /// shadow_latency_ratio<=1.5, shadow_mean_abs_error<=0.05, and the flags above by
        /// name: activation_failures<=0, self_test_failures<=0, backend_fallbacks<=0,
        /// drift_alerts<=0, missing_rate_increase<=0.05, p99_ratio<=1.5,
        /// error_rate_increase<=0.01.
        #[arg(long = "gate", value_name = "NAME<=VALUE", value_parser = parse_gate)]
        gates: Vec<(String, f64)>,
        /// Follow its progress until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Turn a shadow rollout into a real one: its version becomes what the devices it
    /// reached serve (a new assignment generation, the same waves, soak and gates).
    /// Refused while a gate fails or a shadow gate has no comparison yet.
    ///
    /// Example: fleetctl rollout promote r7
    Promote { id: String },
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
            shadow,
            shadow_sample,
            gates,
            watch: follow,
        } => {
            let (name, version) =
                fleet_control::registry::parse_model_version(&model).map_err(anyhow::Error::msg)?;
            let mut overrides = GateOverrides {
                max_activation_failures: Some(max_activation_failures),
                max_self_test_failures: Some(max_self_test_failures),
                max_fallbacks: Some(max_fallbacks),
                max_drift_alerts: Some(max_drift_alerts),
                max_missing_rate_increase: Some(max_missing_rate_increase),
                max_p99_ratio: Some(max_p99_ratio),
                max_error_rate_increase: Some(max_error_rate_increase),
                ..Default::default()
            };
            for (gate, value) in gates {
                let count = || Some(value.max(0.0) as u32);
                match gate.as_str() {
                    "shadow_agreement" => overrides.min_shadow_agreement = Some(value),
                    "shadow_latency_ratio" => overrides.max_shadow_latency_ratio = Some(value),
                    "shadow_mean_abs_error" => overrides.max_shadow_mean_abs_error = Some(value),
                    "activation_failures" => overrides.max_activation_failures = count(),
                    "self_test_failures" => overrides.max_self_test_failures = count(),
                    "backend_fallbacks" => overrides.max_fallbacks = count(),
                    "drift_alerts" => overrides.max_drift_alerts = count(),
                    "missing_rate_increase" => overrides.max_missing_rate_increase = Some(value),
                    "p99_ratio" => overrides.max_p99_ratio = Some(value),
                    "error_rate_increase" => overrides.max_error_rate_increase = Some(value),
                    _ => unreachable!("parse_gate knows the names"),
                }
            }
            anyhow::ensure!(
                shadow
                    || (overrides.min_shadow_agreement.is_none()
                        && overrides.max_shadow_latency_ratio.is_none()
                        && overrides.max_shadow_mean_abs_error.is_none()),
                "shadow_* gates apply to shadow rollouts: add --shadow"
            );
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
                    gates: Some(overrides),
                    shadow_sample_permille: shadow.then_some(shadow_sample),
                },
            )?;
            let id = r.id;
            println!(
                "rollout {id} started: {name}@v{version} {}to {} device(s) in {} wave(s){}",
                if shadow { "in shadow " } else { "" },
                r.devices_total,
                r.waves.len(),
                if shadow {
                    format!(
                        ", on {} of requests (fleetctl rollout promote {id} once its gates pass)",
                        percent(shadow_sample)
                    )
                } else {
                    String::new()
                }
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
        RolloutCommand::Promote { id } => {
            let r: RolloutView = client.post_as(
                &format!("/v1/rollouts/{id}/promote"),
                &serde_json::json!({}),
            )?;
            println!(
                "shadow rollout {id} promoted: rollout {} of {}@v{} to {} device(s) (fleetctl rollout status {} --watch)",
                r.id,
                r.model,
                r.version.unwrap_or_default(),
                r.devices_total,
                r.id
            );
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
/// `N per thousand` as a percentage.
fn percent(permille: u16) -> String {
    format!("{}%", f64::from(permille) / 10.0)
}

/// The gates `--gate` knows, with the comparison each takes.
const GATES: &[(&str, &str)] = &[
    ("shadow_agreement", ">="),
    ("shadow_latency_ratio", "<="),
    ("shadow_mean_abs_error", "<="),
    ("activation_failures", "<="),
    ("self_test_failures", "<="),
    ("backend_fallbacks", "<="),
    ("drift_alerts", "<="),
    ("missing_rate_increase", "<="),
    ("p99_ratio", "<="),
    ("error_rate_increase", "<="),
];

/// `--gate NAME>=VALUE` / `NAME<=VALUE`.
fn parse_gate(text: &str) -> Result<(String, f64), String> {
    let (name, op, value) = [">=", "<="]
        .iter()
        .find_map(|op| text.split_once(op).map(|(n, v)| (n.trim(), *op, v.trim())))
        .ok_or_else(|| {
            format!("`{text}` is not NAME>=VALUE or NAME<=VALUE (e.g. shadow_agreement>=0.98)")
        })?;
    let Some((_, wanted)) = GATES.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = GATES.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "no gate `{name}`; the gates are {}",
            names.join(", ")
        ));
    };
    if op != *wanted {
        return Err(format!(
            "{name} is a {} limit: {name}{wanted}{value}",
            if *wanted == ">=" { "lower" } else { "upper" }
        ));
    }
    let v: f64 = value
        .parse()
        .map_err(|_| format!("`{value}` in `{text}` is not a number"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("`{text}`: a gate's limit is a number of 0 or more"));
    }
    Ok((name.to_string(), v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_samples_and_gates_parse_with_clear_refusals() {
        let parse_sample = fleetml_protocol::assignment::ShadowModel::parse_sample;
        assert_eq!(parse_sample("100%"), Ok(1000));
        assert_eq!(parse_sample("25%"), Ok(250));
        assert_eq!(parse_sample("0.05"), Ok(50));
        assert!(parse_sample("0%").is_err());
        assert!(parse_sample("150%").is_err());
        assert_eq!(
            parse_gate("shadow_agreement>=0.98"),
            Ok(("shadow_agreement".to_string(), 0.98))
        );
        assert_eq!(
            parse_gate("p99_ratio<=2"),
            Ok(("p99_ratio".to_string(), 2.0))
        );
        assert!(
            parse_gate("shadow_agreement<=0.98")
                .expect_err("refused")
                .contains("lower limit")
        );
        assert!(
            parse_gate("agreement>=1")
                .expect_err("refused")
                .contains("no gate")
        );
        assert!(parse_gate("shadow_agreement=1").is_err());
    }
}
