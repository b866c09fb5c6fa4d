//! `fleetctl`: the fleetml operator CLI.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleet_control::{bundle, keys};

/// Operate a fleetml fleet: signing keys, model bundles, and (later) the control plane.
#[derive(Parser, Debug)]
#[command(name = "fleetctl", version)]
struct Cli {
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
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Generate an ed25519 signing key: DIR/NAME.key (PKCS#8, mode 0600) and DIR/NAME.pub.
    ///
    /// Prints the key id (first 8 bytes of the SHA-256 of the public key, in hex).
    /// Refuses to overwrite an existing key.
    Generate {
        /// Directory for the key files (created with mode 0700 if missing).
        #[arg(long)]
        out: PathBuf,
        /// Base name of the key files.
        #[arg(long, default_value = "signing")]
        name: String,
    },
    /// Write a trust policy (TOML) that agents and verifiers load: the public keys allowed
    /// to sign bundles and how many of them must have signed.
    TrustPolicy {
        /// A public key file (NAME.pub); repeat for several keys.
        #[arg(long = "public", required = true)]
        public: Vec<PathBuf>,
        /// How many distinct listed keys must sign a bundle (k of n).
        #[arg(long, default_value_t = 1)]
        threshold: u32,
        /// Where to write the policy.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing policy file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BundleCommand {
    /// Build a bundle from an ONNX model, its feature schema, and optional reference
    /// data, golden rows and lineage.
    Build(Box<BuildArgs>),
    /// Add a signature to a bundle, in place. Signing twice with one key changes nothing.
    Sign {
        /// The bundle to sign.
        bundle: PathBuf,
        /// Private key (PKCS#8, mode 0600), from `fleetctl keys generate`.
        #[arg(long)]
        key: PathBuf,
    },
    /// Verify a bundle against a trust policy: structure, signatures, payload hashes,
    /// manifest. Exit 0 and a one-line summary, or non-zero naming what failed.
    Verify {
        bundle: PathBuf,
        /// Trust policy (TOML) from `fleetctl keys trust-policy`.
        #[arg(long)]
        trust: PathBuf,
    },
    /// Show a bundle's manifest, lineage, feature schema, payloads and signatures.
    /// Signatures are listed, not checked: use `bundle verify` for that.
    Inspect {
        bundle: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct BuildArgs {
    /// The ONNX model.
    #[arg(long)]
    model: PathBuf,
    /// Declare an input's shape, for models whose ONNX inputs leave dimensions unknown:
    /// NAME=D1,D2,… with sizes or symbols (a symbol such as N is a free batch size).
    /// Repeatable.
    #[arg(long = "input-shape", value_parser = fleet_control::onnx::parse_input_shape)]
    input_shapes: Vec<fleetml_protocol::manifest::TensorSpec>,
    /// Model name (letters, digits, `_`, `-`, `.`).
    #[arg(long)]
    name: String,
    /// Model version, a monotonic integer (at least 1).
    #[arg(long)]
    version: u64,
    /// Free-form version label.
    #[arg(long, default_value = "")]
    label: String,
    /// Feature schema (TOML): the raw features and how they map onto the model input.
    /// Without it the model takes raw tensors only (e.g. an image model).
    #[arg(long)]
    features: Option<PathBuf>,
    /// CSV of training-distribution rows; stores the reference profile drift is measured against.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// CSV of rows whose model outputs are stored for the device's self-test.
    #[arg(long)]
    golden: Option<PathBuf>,
    /// How many rows of --golden to store.
    #[arg(long, default_value_t = 16)]
    golden_rows: usize,
    /// Lineage (TOML): dataset, code, framework, dependencies, container, CUDA, params, seed, device.
    #[arg(long)]
    lineage: Option<PathBuf>,
    /// Monitoring settings (TOML) for this model: `window_predictions`, `window_seconds`,
    /// `drift_psi`, `drift_js`, `drift_chi2_p`, `missing_rate`, `lag_p95_ms`,
    /// `alert_windows`. A device's own agent configuration overrides each it sets.
    #[arg(long)]
    monitoring: Option<PathBuf>,
    /// Quantile bins per numeric feature in the reference profile.
    #[arg(long, default_value_t = 10)]
    bins: u32,
    /// Prepare the model for another backend as well: `gpu` stores a copy with static
    /// shapes and lowered operators for wonnx (model.gpu.onnx) and the compatibility
    /// report listing operators it cannot run (gpu-compat.json). Repeatable.
    #[arg(long = "prepare", value_parser = ["gpu"])]
    prepare: Vec<String>,
    /// Batch size the GPU-prepared model is fixed to (wonnx needs static shapes).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    gpu_batch: u64,
    /// Backend the bundle was prepared for (cpu, gpu, npu); repeatable. Default: cpu.
    #[arg(long = "backend")]
    backends: Vec<String>,
    /// Board profile name the bundle targets; repeatable. Default: any.
    #[arg(long = "board")]
    boards: Vec<String>,
    /// Oldest agent release that may run the bundle.
    #[arg(long, default_value = fleetml_protocol::VERSION)]
    min_agent_version: String,
    /// Creation time, seconds since the Unix epoch. Default: $SOURCE_DATE_EPOCH, else now.
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    created_at: Option<u64>,
    /// Extra file to carry in the bundle; repeatable.
    #[arg(long)]
    extra: Vec<PathBuf>,
    /// Sign with this private key right away; repeatable.
    #[arg(long = "key")]
    keys: Vec<PathBuf>,
    /// Where to write the bundle.
    #[arg(long)]
    out: PathBuf,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keys(KeysCommand::Generate { out, name }) => {
            let g = keys::generate(&out, &name)?;
            println!("{}", g.id);
            eprintln!(
                "wrote {} (private, mode 0600) and {}",
                g.private.display(),
                g.public.display()
            );
        }
        Command::Keys(KeysCommand::TrustPolicy {
            public,
            threshold,
            out,
            force,
        }) => {
            anyhow::ensure!(
                force || !out.exists(),
                "{} already exists; pass --force to replace it",
                out.display()
            );
            let policy = keys::trust_policy(&public, threshold)?;
            let text = format!(
                "# fleetml trust policy: a bundle needs valid signatures by {} of these {} keys.\n{}",
                policy.threshold,
                policy.keys.len(),
                policy.to_toml()
            );
            fleet_control::output::write_atomic(&out, fleet_control::output::PUBLIC_FILE, |f| {
                use std::io::Write;
                f.write_all(text.as_bytes())?;
                Ok(())
            })?;
            println!(
                "wrote {} ({} of {} keys)",
                out.display(),
                policy.threshold,
                policy.keys.len()
            );
        }
        Command::Bundle(BundleCommand::Build(a)) => {
            let a = *a;
            let created_at = match a.created_at {
                Some(t) => t,
                None => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .context("the system clock is before 1970")?
                    .as_secs(),
            };
            let opts = bundle::BuildOptions {
                model: a.model,
                input_shapes: a.input_shapes,
                name: a.name,
                version: a.version,
                label: a.label,
                features: a.features,
                reference: a.reference,
                golden: a.golden,
                golden_rows: a.golden_rows,
                lineage: a.lineage,
                bins: a.bins,
                monitoring: match &a.monitoring {
                    Some(p) => {
                        let text = std::fs::read_to_string(p)
                            .with_context(|| format!("reading {}", p.display()))?;
                        fleetml_protocol::manifest::MonitoringPolicy::from_toml(&text).map_err(
                            |e| anyhow::anyhow!("monitoring settings {}: {e}", p.display()),
                        )?
                    }
                    None => Default::default(),
                },
                prepare_gpu: a.prepare.iter().any(|p| p == "gpu").then_some(a.gpu_batch),
                backends: if a.backends.is_empty() {
                    let mut b = vec!["cpu".to_string()];
                    if a.prepare.iter().any(|p| p == "gpu") {
                        b.insert(0, "gpu".into());
                    }
                    b
                } else {
                    a.backends
                },
                boards: a.boards,
                min_agent_version: a.min_agent_version,
                created_at,
                extra: a.extra,
                keys: a.keys,
                out: a.out,
            };
            let built = bundle::build(&opts)?;
            if let Some(report) = &built.gpu_report {
                println!("gpu: {}", report.summary());
            }
            let signed = if built.signed_by.is_empty() {
                "unsigned; sign it with `fleetctl bundle sign`".to_string()
            } else {
                format!("signed by {}", built.signed_by.join(", "))
            };
            println!(
                "built {} v{} -> {} ({}, {} payloads, {signed})",
                built.manifest.name,
                built.manifest.version,
                opts.out.display(),
                fleet_control::output::human_size(built.size),
                built.manifest.entries.len()
            );
        }
        Command::Bundle(BundleCommand::Sign { bundle: path, key }) => {
            let (changed, id) = bundle::sign(&path, &key)?;
            if changed {
                println!("signed {} with key {id}", path.display());
            } else {
                println!(
                    "{} is already signed by key {id}; nothing changed",
                    path.display()
                );
            }
        }
        Command::Bundle(BundleCommand::Verify {
            bundle: path,
            trust,
        }) => {
            let policy = keys::load_policy(&trust)?;
            let v = bundle::verify(&path, &policy)?;
            println!("{}", bundle::summary(&v, Some(policy.threshold)));
        }
        Command::Bundle(BundleCommand::Inspect { bundle: path, json }) => {
            let front = bundle::read_front(&path)?;
            let size = std::fs::metadata(&path)?.len();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&bundle::inspect_json(&front, size))?
                );
            } else {
                print!("{}", bundle::inspect_text(&front, size));
            }
        }
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
