//! `fleetctl`: the fleetml operator CLI.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod cli;

use cli::*;

/// `--version`: release, git commit, and what is compiled in.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("FLEETML_GIT_COMMIT"),
    ", features: embedded-mqtt, kubernetes, postgres, parquet)"
);

/// Operate a fleetml fleet: signing keys, model bundles, the control plane server, and
/// the devices that report to it.
#[derive(Parser, Debug)]
#[command(name = "fleetctl", version = LONG_VERSION)]
struct Cli {
    /// The control plane's API, for the operator commands (devices, drift). The token
    /// comes from FLEETML_TOKEN or ~/.config/fleetml/token.
    #[arg(long, global = true, env = "FLEETML_SERVER", default_value = fleet_control::client::DEFAULT_SERVER)]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create signing keys and trust policies.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Build, sign, verify and inspect model bundles (.fmb).
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Run the control plane: HTTP API, MQTT broker for devices (embedded unless
    /// --mqtt-url names an external one) and telemetry ingest. On first start it writes
    /// an admin API token to DATA_DIR/admin.token (mode 0600).
    Serve(ServeArgs),
    /// Enroll devices and see the fleet.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// The model registry of the control plane.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// The control plane's trust policy: which keys bundles must be signed with.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// The whole loop on this machine, narrated: a control plane and three agents as
    /// real processes, a signed model rolled out in waves, drift, retraining,
    /// champion/challenger, a canary and a rollback — with the command for each step.
    Demo {
        /// Work here instead of a fresh temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Stop everything at the end instead of leaving the fleet running.
        #[arg(long)]
        exit: bool,
    },
    /// Measure a control plane under a fleet of simulated devices (see --help).
    #[command(long_about = SIM_ABOUT)]
    Sim(SimArgs),
    /// Training jobs: run a job spec on datasets and captured data, build and register
    /// the best trial as a candidate bundle.
    #[command(subcommand)]
    Retrain(RetrainCommand),
    /// Versioned datasets (Parquet, named by content hash): import, capture, profile.
    #[command(subcommand)]
    Data(DataCommand),
    /// Staged rollouts of a model version to selected devices, with health gates.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Put the previous (or a named) version of a model back on devices, as a new
    /// assignment generation; asks for confirmation unless --yes.
    Rollback {
        /// The model to roll back.
        model: String,
        /// Return to this version instead of each device's previous one.
        #[arg(long)]
        to: Option<u64>,
        /// Only these devices (selector, as for `rollout start --to`; default: all).
        #[arg(long)]
        devices: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Start it and return without following its progress.
        #[arg(long)]
        detach: bool,
    },
    /// Operator API tokens with roles (viewer, operator, admin); admin only.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// The audit log of every mutating API call (hash-chained); `audit verify` checks it.
    Audit {
        #[command(subcommand)]
        command: Option<AuditCommand>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only the last N entries.
        #[arg(long, default_value_t = 50)]
        last: usize,
    },
    /// Latest drift scores per feature across the fleet, alerting ones first.
    Drift {
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Fetch the whole log and check its hash chain here; exits 1 when an entry was
    /// changed, inserted or deleted.
    Verify,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let server = cli.server.clone();
    match cli.command {
        Command::Serve(a) => serve_command(a)?,
        Command::Devices(cmd) => devices_command(&server, cmd)?,
        Command::Models(cmd) => models_command(&server, cmd)?,
        Command::Rollout(cmd) => rollout_command(&server, cmd)?,
        Command::Data(cmd) => data_command(&server, cmd)?,
        Command::Demo { dir, exit } => fleet_control::demo::run(dir, exit)?,
        Command::Sim(a) => sim_command(a)?,
        Command::Retrain(cmd) => retrain_command(&server, cmd)?,
        Command::Rollback {
            model,
            to,
            devices,
            yes,
            detach,
        } => {
            let client = fleet_control::client::Client::new(&server)?;
            let body = |dry_run: bool| serde_json::json!({ "model": model, "to": to, "devices": devices, "dry_run": dry_run });
            let plan = client.post("/v1/rollbacks", &body(true))?;
            println!("roll back {model}:");
            for d in plan["devices"].as_array().cloned().unwrap_or_default() {
                println!(
                    "  {:<24} v{} -> v{}",
                    d["device"].as_str().unwrap_or("?"),
                    d["from"],
                    d["to"]
                );
            }
            for d in plan["skipped"].as_array().cloned().unwrap_or_default() {
                println!(
                    "  {:<24} skipped: {}",
                    d["device"].as_str().unwrap_or("?"),
                    d["reason"].as_str().unwrap_or("")
                );
            }
            if !yes && !confirm("continue?")? {
                anyhow::bail!("not rolled back (nothing changed)");
            }
            let r = client.post("/v1/rollbacks", &body(false))?;
            let id = r["id"].as_str().unwrap_or("?").to_string();
            println!("rollback {id} started");
            if !detach {
                watch(&client, &id)?;
            }
        }
        Command::Tokens(cmd) => tokens_command(&server, cmd)?,
        Command::Audit {
            command,
            json,
            last,
        } => {
            let all = fleet_control::client::Client::new(&server)?.get("/v1/audit")?;
            let entries: Vec<fleet_control::auth::AuditEntry> =
                serde_json::from_value(all).context("decoding the audit log")?;
            match command {
                Some(AuditCommand::Verify) => match fleet_control::auth::verify(&entries) {
                    Ok(head) => println!(
                        "audit log intact: {} entries, head {head} (keep this hash elsewhere to detect a truncated tail)",
                        entries.len()
                    ),
                    Err(e) => anyhow::bail!("audit log tampered with: {e}"),
                },
                None => {
                    let tail = &entries[entries.len().saturating_sub(last)..];
                    if json {
                        print_json(&serde_json::to_value(tail)?)?;
                    } else {
                        println!(
                            "{:>6}  {:<24} {:<28} {:<9} {:<36} {:>6}  TARGET",
                            "SEQ", "WHEN (UTC)", "WHO", "ROLE", "ACTION", "RESULT"
                        );
                        for e in tail {
                            println!(
                                "{:>6}  {:<24} {:<28} {:<9} {:<36} {:>6}  {}",
                                e.seq,
                                fleet_control::views::utc(e.at_ms),
                                e.who,
                                e.role,
                                e.action,
                                e.outcome,
                                e.target
                            );
                        }
                    }
                }
            }
        }
        Command::Trust(cmd) => trust_command(&server, cmd)?,
        Command::Drift {
            model,
            device,
            json,
        } => {
            let mut query = Vec::new();
            if let Some(m) = &model {
                query.push(format!("model={m}"));
            }
            if let Some(d) = &device {
                query.push(format!("device={d}"));
            }
            let path = if query.is_empty() {
                "/v1/drift".to_string()
            } else {
                format!("/v1/drift?{}", query.join("&"))
            };
            let rows = fleet_control::client::Client::new(&server)?.get(&path)?;
            if json {
                print_json(&rows)?;
            } else {
                print!(
                    "{}",
                    fleet_control::views::drift_table(
                        rows.as_array().map(Vec::as_slice).unwrap_or_default()
                    )
                );
            }
        }
        Command::Keys(cmd) => keys_command(cmd)?,
        Command::Bundle(cmd) => bundle_command(cmd)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the outermost context, then each cause.
            let chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
            let prefix = if std::io::stderr().is_terminal() {
                "\x1b[31merror\x1b[0m"
            } else {
                "error"
            };
            eprintln!("{prefix}: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
