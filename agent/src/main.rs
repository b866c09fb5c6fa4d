//! `fleet-agent`: the fleetml device agent.

use std::fs::File;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_agent::{backend, runtime::CpuModel, selftest, store};
use fleetml_protocol::board::BoardProfile;
use fleetml_protocol::bundle::Limits;
use fleetml_protocol::manifest::{GOLDEN_ENTRY, MODEL_ENTRY};
use fleetml_protocol::trust::TrustPolicy;

/// Largest model loaded into memory.
const MAX_MODEL: u64 = 2 << 30;
/// Largest golden vector set loaded into memory.
const MAX_GOLDEN: u64 = 256 << 20;

/// The fleetml device agent.
#[derive(Parser, Debug)]
#[command(name = "fleet-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Verify a bundle as the device would before activating it: structure, signatures
    /// against the trust policy, payload hashes, manifest, agent version; then load the
    /// model with tract and run its golden vectors, reporting the max abs/rel error.
    VerifyBundle {
        bundle: PathBuf,
        /// Trust policy (TOML) naming the keys allowed to sign bundles.
        #[arg(long)]
        trust: PathBuf,
        /// Board profile (TOML): try its backends in order and report any fallback.
        /// Without it the model runs on the CPU.
        #[arg(long)]
        board: Option<PathBuf>,
    },
}

fn load_policy(path: &PathBuf) -> anyhow::Result<TrustPolicy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading trust policy {}", path.display()))?;
    TrustPolicy::from_toml(&text).with_context(|| format!("trust policy {}", path.display()))
}

fn load_board(path: &PathBuf) -> anyhow::Result<BoardProfile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading board profile {}", path.display()))?;
    BoardProfile::from_toml(&text).with_context(|| format!("board profile {}", path.display()))
}

fn verify_bundle(bundle: PathBuf, trust: PathBuf, board: Option<PathBuf>) -> anyhow::Result<()> {
    let board = board.as_ref().map(load_board).transpose()?;
    let policy = load_policy(&trust)?;
    let limits = Limits::default();
    let verified = store::verify(&bundle, &policy, &limits)
        .with_context(|| format!("{} failed verification", bundle.display()))?;
    let m = &verified.manifest;
    let signers: Vec<String> = verified.signed_by.iter().map(|k| k.to_string()).collect();
    println!(
        "verified {} v{}: signed by {} ({} of {} required), sha256 {}",
        m.name,
        m.version,
        signers.join(", "),
        verified.signed_by.len(),
        policy.threshold,
        verified.digest
    );
    let mut file = File::open(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
    let onnx = verified.read_entry(&mut file, MODEL_ENTRY, MAX_MODEL)?;
    let golden = match m.entry(GOLDEN_ENTRY) {
        Some(_) => Some(verified.read_entry(&mut file, GOLDEN_ENTRY, MAX_GOLDEN)?),
        None => None,
    };
    let what = || format!("{} v{}", m.name, m.version);
    let result = match &board {
        Some(board) => {
            let selection = backend::select(board, &onnx, golden.as_deref()).with_context(what)?;
            for line in selection.report() {
                println!("{line}");
            }
            println!(
                "running on {} (board {})",
                selection.backend.kind().as_str(),
                board.name
            );
            selection.self_test
        }
        None => {
            let model = CpuModel::load(&onnx).with_context(what)?;
            println!("loaded {MODEL_ENTRY} with tract (cpu)");
            match &golden {
                Some(g) => Some(selftest::run(&model, g).with_context(what)?),
                None => None,
            }
        }
    };
    let Some(result) = result else {
        println!("no {GOLDEN_ENTRY} in the bundle: golden self-test skipped");
        return Ok(());
    };
    println!(
        "golden self-test passed: {} rows, max abs error {:e}, max rel error {:e}",
        result.rows, result.comparison.max_abs_error, result.comparison.max_rel_error
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::VerifyBundle {
            bundle,
            trust,
            board,
        } => verify_bundle(bundle, trust, board),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
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
