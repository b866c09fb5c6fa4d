//! `claims-train`: generates the claims data sets and trains the example model.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Generate the insurance-claim data sets and train the triage model, deterministically.
///
/// Writes model.onnx, features.toml, lineage.toml, reference.csv, holdout.csv and
/// drifted.csv into --out. The same arguments give bit-identical files on any platform.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Seed of the data generator and of the training.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Directory to write into (created if missing).
    #[arg(long, default_value = "models/claims")]
    out: PathBuf,
    /// Training rows (written as reference.csv).
    #[arg(long, default_value_t = 4000)]
    rows: usize,
    /// Rows of holdout.csv.
    #[arg(long, default_value_t = 1000)]
    holdout: usize,
    /// Rows of drifted.csv.
    #[arg(long, default_value_t = 1000)]
    drifted: usize,
    /// Training epochs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Dependency lockfile to record in the lineage (its SHA-256).
    #[arg(long)]
    lockfile: Option<PathBuf>,
    /// Code repository to record in the lineage.
    #[arg(long)]
    code_repository: Option<String>,
    /// Code commit to record in the lineage (needs --code-repository).
    #[arg(long, requires = "code_repository")]
    code_commit: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let lockfile_sha256 = match &args.lockfile {
        Some(p) => {
            let bytes =
                std::fs::read(p).with_context(|| format!("reading lockfile {}", p.display()))?;
            Some(hex::encode(ring::digest::digest(
                &ring::digest::SHA256,
                &bytes,
            )))
        }
        None => None,
    };
    let run = fleetml_claims::Run {
        seed: args.seed,
        rows: args.rows,
        holdout: args.holdout,
        drifted: args.drifted,
        train: fleetml_claims::train::Config {
            epochs: args.epochs,
            ..Default::default()
        },
        lockfile_sha256,
        code: args.code_repository.map(|r| (r, args.code_commit)),
    };
    let artifacts = fleetml_claims::run(&run);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for (name, bytes) in &artifacts.files {
        let path = args.out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {} ({} bytes)", path.display(), bytes.len());
    }
    println!(
        "holdout: accuracy {:.4}, AUC {:.4}; drifted: AUC {:.4}",
        artifacts.holdout_accuracy, artifacts.holdout_auc, artifacts.drifted_auc
    );
    Ok(())
}
