//! Runs fleetml's drift monitor over CSV streams, for `scripts/drift_compare.py`, which
//! runs Evidently and NannyML over the same windows.
//!
//! ```text
//! cargo run --release -p fleet-control --example drift-compare -- \
//!     REFERENCE.csv FEATURES.toml SIZES WINDOWS STREAM.csv...
//! ```
//!
//! The reference profile is built as `fleetctl bundle build` builds it (10 quantile bins,
//! the multivariate reference, thresholds calibrated for SIZES at the default 1 %
//! false-alarm rate). Each stream is cut into consecutive windows of each size (at most
//! WINDOWS of them) and fed to the agent's monitor with alerts after one window, so a
//! window's verdict is its own. One JSON line per window: `{"stream", "size", "window",
//! "flagged": [subjects past a threshold]}`.

use std::path::PathBuf;

use anyhow::Context;
use fleet_control::{calibrate, multivariate};
use fleetml_monitor::{Monitor, Thresholds, WindowConfig};
use fleetml_protocol::features::FeatureSchema;
use fleetml_protocol::reference::ReferenceProfile;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 5,
        "usage: drift-compare REFERENCE.csv FEATURES.toml SIZES WINDOWS STREAM.csv..."
    );
    let schema = FeatureSchema::from_toml(&std::fs::read_to_string(&args[1])?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args[1]))?;
    let reference = fleet_control::bundle::read_csv(&PathBuf::from(&args[0]), &schema, None)?;
    let sizes: Vec<u32> = args[2]
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("SIZES: window sizes, comma-separated")?;
    let most: usize = args[3].parse().context("WINDOWS: a number")?;
    let mut profile = ReferenceProfile::compute(&schema, &reference, &[], 10)?;
    profile.multivariate = multivariate::fit(&schema, &reference, 10);
    profile.calibration = Some(calibrate::calibrate(
        &profile,
        &schema,
        &reference,
        &[],
        &calibrate::Options {
            sizes: sizes.clone(),
            ..Default::default()
        },
    )?);
    let names: Vec<&str> = schema.features.iter().map(|f| f.name.as_str()).collect();
    for stream in &args[4..] {
        let rows = fleet_control::bundle::read_csv(&PathBuf::from(stream), &schema, None)?;
        for &size in &sizes {
            let mut monitor = monitor(&profile, &names, size)?;
            let mut window = 0;
            for row in &rows {
                if window == most {
                    break;
                }
                let observed = fleetml_monitor::profile::observations(&schema, row);
                if let Some(r) = monitor.observe(0, &observed, None, 1, None) {
                    let mut flagged: Vec<&str> = r
                        .features
                        .iter()
                        .zip(&names)
                        .filter(|(f, _)| f.drifting)
                        .map(|(_, n)| *n)
                        .collect();
                    if r.multivariate.is_some_and(|m| m.drifting) {
                        flagged.push(fleetml_protocol::reference::RECONSTRUCTION_ERROR);
                    }
                    println!(
                        "{}",
                        serde_json::json!({"stream": stream, "size": size, "window": window, "flagged": flagged})
                    );
                    window += 1;
                }
            }
        }
    }
    Ok(())
}

/// The agent's monitor of `profile`, windows of `size`, a verdict per window.
fn monitor(profile: &ReferenceProfile, names: &[&str], size: u32) -> anyhow::Result<Monitor> {
    fleetml_monitor::profile::monitor(
        profile,
        names,
        None,
        WindowConfig {
            max_predictions: size,
            max_duration_ms: u64::MAX,
        },
        Thresholds {
            windows: 1,
            min_predictions: size,
            ..Thresholds::default()
        },
    )
    .map_err(anyhow::Error::msg)
}
