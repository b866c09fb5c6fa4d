//! `fleetctl`: the fleetml operator CLI.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

use cli::*;

/// `--version`: release, git commit, and what is compiled in.
#[cfg(feature = "jemalloc")]
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("FLEETML_GIT_COMMIT"),
    ", features: embedded-mqtt, kubernetes, postgres, parquet, jemalloc)"
);
/// `--version`: release, git commit, and what is compiled in.
#[cfg(not(feature = "jemalloc"))]
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
    /// The CA certificate (PEM) the control plane's certificate is checked against over
    /// https:// (with `fleetctl serve --self-signed`: DATA_DIR/tls/ca.pem). Default: the
    /// system's CA store.
    #[arg(long, global = true, env = "FLEETML_CA")]
    ca: Option<PathBuf>,
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
    Serve(Box<ServeArgs>),
    /// Enroll devices and see the fleet.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// The model registry of the control plane.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// The control plane's trust policy: which keys bundles must be signed with.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// A private CA and server certificates (for an external broker, a proxy); `serve
    /// --self-signed` makes and uses its own.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// What an external broker needs to enforce the fleet's rules (mosquitto files).
    #[command(subcommand)]
    Broker(BrokerCommand),
    /// The commands training jobs may run, registered by an admin; job specs name one.
    #[command(subcommand)]
    Trainers(TrainersCommand),
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
    Rollback(RollbackArgs),
    /// Operator API tokens with roles (viewer, operator, admin); admin only.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// The audit log of every mutating API call (hash-chained); `audit verify` checks it.
    Audit(AuditArgs),
    /// Latest drift scores per feature across the fleet, alerting ones first.
    Drift(DriftArgs),
    /// Notifications: alerts firing and resolved, what each receiver was told, a test
    /// notification, silences. Rules and receivers: `fleetctl serve --alerts FILE`.
    #[command(subcommand)]
    Alerts(AlertsCommand),
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let server = cli.server.clone();
    if let Some(ca) = &cli.ca {
        fleet_control::client::set_ca(ca.clone());
    }
    match cli.command {
        Command::Serve(a) => serve_command(*a)?,
        Command::Devices(cmd) => devices_command(&server, cmd)?,
        Command::Models(cmd) => models_command(&server, cmd)?,
        Command::Rollout(cmd) => rollout_command(&server, cmd)?,
        Command::Data(cmd) => data_command(&server, cmd)?,
        Command::Demo { dir, exit } => fleet_control::demo::run(dir, exit)?,
        Command::Sim(a) => sim_command(a)?,
        Command::Retrain(cmd) => retrain_command(&server, cmd)?,
        Command::Rollback(a) => rollback_command(&server, a)?,
        Command::Tokens(cmd) => tokens_command(&server, cmd)?,
        Command::Audit(a) => audit_command(&server, a)?,
        Command::Trust(cmd) => trust_command(&server, cmd)?,
        Command::Tls(cmd) => tls_command(cmd)?,
        Command::Broker(cmd) => broker_command(&server, cmd)?,
        Command::Trainers(cmd) => trainers_command(&server, cmd)?,
        Command::Drift(a) => drift_command(&server, a)?,
        Command::Alerts(cmd) => alerts_command(&server, cmd)?,
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

    /// `fleetctl serve --data-dir d EXTRA…` parsed.
    fn serve(extra: &[&str]) -> Result<super::Cli, clap::Error> {
        use clap::Parser;
        super::Cli::try_parse_from(["fleetctl", "serve", "--data-dir", "d"].iter().chain(extra))
    }

    /// `--blocking-threads` defaults to 64 and refuses 0 (tokio would panic on it) and
    /// more than 4,096, naming the flag.
    #[test]
    fn blocking_threads_are_bounded() {
        let Ok(super::Cli {
            command: super::Command::Serve(a),
            ..
        }) = serve(&[])
        else {
            panic!("serve parses");
        };
        assert_eq!(a.blocking_threads(), 64);
        for bad in ["0", "4097", "many"] {
            let e = serve(&["--blocking-threads", bad])
                .expect_err(bad)
                .to_string();
            assert!(e.contains("--blocking-threads"), "{bad}: {e}");
        }
    }

    /// `--retain-count KIND=N` takes a kind of message and a whole number, and says
    /// which part of a bad one is wrong.
    #[test]
    fn retain_count_names_what_is_wrong() {
        assert!(
            serve(&[
                "--retain-count",
                "status=1000",
                "--retain-count",
                "window=1"
            ])
            .is_ok()
        );
        for (bad, says) in [
            ("status", "expected KIND=N"),
            ("window=0", "would remove every window message"),
            ("statuses=5", "not a kind of message"),
            ("status=-1", "not a count of messages"),
            ("status=lots", "not a count of messages"),
        ] {
            let e = serve(&["--retain-count", bad]).expect_err(bad).to_string();
            assert!(
                e.contains("--retain-count") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }
}
