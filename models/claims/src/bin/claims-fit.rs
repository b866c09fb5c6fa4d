//! `claims-fit`: trains the claims model on given CSV files (what a training job runs).
//!
//! Reads every `--data` CSV (columns named as in the claims feature schema, plus the
//! label column), trains with the same deterministic trainer as `claims-train`, and
//! writes `model.onnx`, `features.toml` and `metrics.json` into `--out`. The same inputs
//! and arguments give a bit-identical `model.onnx` on any platform.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use fleetml_claims::data::Claim;
use fleetml_protocol::features::RawValue;

/// Train the claims model on CSV data, deterministically.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Training CSV; repeat for several (rows are used in the order given).
    #[arg(long = "data", required = true)]
    data: Vec<PathBuf>,
    /// Evaluation CSV for metrics.json (default: the training data). A fleetml training
    /// job sets FLEETML_HOLDOUT_CSV when its spec names a holdout dataset.
    #[arg(long, env = "FLEETML_HOLDOUT_CSV")]
    holdout: Option<PathBuf>,
    /// Label column: 1/0, true/false.
    #[arg(long, default_value = fleetml_claims::LABEL)]
    label: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    #[arg(long, default_value_t = 16)]
    hidden: usize,
    #[arg(long, default_value_t = 0.05)]
    learning_rate: f64,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
}

fn read(path: &PathBuf, label: &str) -> anyhow::Result<Vec<Claim>> {
    let schema = fleetml_claims::schema();
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let header: Vec<String> = reader.headers()?.iter().map(str::to_string).collect();
    let index = |name: &str| header.iter().position(|h| h == name);
    let columns: Vec<Option<usize>> = schema.features.iter().map(|f| index(&f.name)).collect();
    let Some(label_at) = index(label) else {
        bail!("{}: no label column `{label}`", path.display());
    };
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{} row {}", path.display(), i + 2))?;
        let cell = record.get(label_at).unwrap_or("").trim();
        let investigate = match cell {
            "1" | "1.0" | "true" | "yes" => true,
            "0" | "0.0" | "false" | "no" => false,
            // Rows without ground truth cannot teach anything.
            "" => continue,
            other => bail!(
                "{} row {}: label `{other}` is not 0/1",
                path.display(),
                i + 2
            ),
        };
        let values = columns
            .iter()
            .map(|c| {
                c.map_or(RawValue::Missing, |c| {
                    RawValue::parse(record.get(c).unwrap_or(""))
                })
            })
            .collect();
        out.push(Claim {
            values,
            investigate,
        });
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut claims = Vec::new();
    for path in &args.data {
        claims.extend(read(path, &args.label)?);
    }
    if claims.len() < 10 {
        bail!("{} labelled rows are too few to train on", claims.len());
    }
    let schema = fleetml_claims::schema();
    let config = fleetml_claims::train::Config {
        hidden: args.hidden,
        epochs: args.epochs,
        learning_rate: args.learning_rate,
        ..Default::default()
    };
    let x = fleetml_claims::train::encode(&schema, &claims);
    let y: Vec<bool> = claims.iter().map(|c| c.investigate).collect();
    let model = fleetml_claims::train::train(&x, &y, &config, args.seed);
    let eval = match &args.holdout {
        Some(p) => read(p, &args.label)?,
        None => claims.clone(),
    };
    let ex = fleetml_claims::train::encode(&schema, &eval);
    let scores: Vec<f64> = ex.iter().map(|r| model.predict(r)).collect();
    let labels: Vec<bool> = eval.iter().map(|c| c.investigate).collect();
    let (accuracy, auc) = fleetml_claims::train::evaluate(&scores, &labels);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let onnx = fleetml_claims::onnx::encode(&model, env!("CARGO_PKG_VERSION"));
    std::fs::write(args.out.join("model.onnx"), onnx)?;
    std::fs::write(args.out.join("features.toml"), schema.to_toml())?;
    let metrics = format!(
        "{{\"accuracy\": {accuracy}, \"auc\": {auc}, \"rows\": {}, \"eval_rows\": {}, \
         \"framework\": {{\"name\": \"fleetml-claims\", \"version\": \"{}\"}}, \
         \"device\": \"cpu ({})\"}}\n",
        claims.len(),
        eval.len(),
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    );
    std::fs::write(args.out.join("metrics.json"), metrics)?;
    println!(
        "trained on {} rows (seed {}, {} epochs): accuracy {accuracy:.4}, AUC {auc:.4}",
        claims.len(),
        args.seed,
        args.epochs
    );
    Ok(())
}
