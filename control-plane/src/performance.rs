//! The calibration map for estimating a classifier's accuracy without labels, made when
//! a bundle is built with a label column (see `fleetml_monitor::performance` for what
//! the agent does with it).
//!
//! The model's predictions on the labelled reference are cut into [`CONFIDENCE_BINS`]
//! quantile bins of confidence (the winning class's score); each bin records how often
//! the prediction was right. The raw scores' expected calibration error is recorded too
//! (the map corrects it; a large one says the scores are not probabilities). For each
//! calibrated window size, windows resampled from the reference give the distribution
//! of the estimate under no drift; its `false_alarm_rate` quantile is the limit below
//! which the agent alerts.

use std::path::Path;

use anyhow::{Context, bail};
use fleetml_protocol::features::RawValue;
use fleetml_protocol::reference::{Performance, argmax};

use crate::calibrate::{Options, SplitMix, resamples};

/// Quantile bins of confidence in the map.
pub const CONFIDENCE_BINS: usize = 10;
/// The resampling's seed (fixed: a rebuild gives the same bundle).
const SEED: u64 = 0x0cb9_e5ee_d000;

/// The label column of `path`, one class index per data row (`limit` rows at most).
pub fn read_labels(path: &Path, column: &str, limit: Option<usize>) -> anyhow::Result<Vec<usize>> {
    let (mut reader, header) = crate::csvfile::open(path)?;
    let Some(pos) = header.iter().position(|h| h.trim() == column) else {
        bail!(
            "{} has no label column `{column}` (--label-column names the column holding each row's true class)",
            path.display()
        );
    };
    let mut labels = Vec::new();
    for (i, record) in reader.records().enumerate() {
        if limit.is_some_and(|l| labels.len() >= l) {
            break;
        }
        let record = record.with_context(|| format!("{} row {}", path.display(), i + 2))?;
        let text = record.get(pos).unwrap_or("").trim();
        let class = match RawValue::parse(text) {
            RawValue::Number(x) if x >= 0.0 && x.fract() == 0.0 && x < 65_536.0 => x as usize,
            _ => bail!(
                "{} row {}: label `{text}` in column `{column}` is not a class index (0, 1, …)",
                path.display(),
                i + 2
            ),
        };
        labels.push(class);
    }
    Ok(labels)
}

/// The calibration map of the first output's `scores` (row-major, `columns` classes) on
/// rows whose true classes are `labels`, with limits for `opts`' window sizes.
pub fn fit(
    label: &str,
    columns: usize,
    scores: &[f32],
    labels: &[usize],
    opts: &Options,
    sizes: &[u32],
) -> anyhow::Result<Performance> {
    if columns < 2 {
        bail!(
            "--label-column: the model's first output has {columns} column; estimating accuracy needs class scores (two or more columns)"
        );
    }
    let rows: Vec<(f64, bool)> = scores
        .chunks_exact(columns)
        .zip(labels)
        .filter_map(|(row, &label)| {
            let confidence = fleetml_monitor::profile::confidence(row)?;
            Some((confidence, argmax(row) == Some(label)))
        })
        .collect();
    if rows.len() != labels.len() || rows.len() < CONFIDENCE_BINS * 10 {
        bail!(
            "--label-column: {} labelled rows with scores; the calibration map needs at least {}",
            rows.len(),
            CONFIDENCE_BINS * 10
        );
    }
    let mut sorted: Vec<f64> = rows.iter().map(|r| r.0).collect();
    sorted.sort_by(f64::total_cmp);
    let mut edges: Vec<f64> = (1..CONFIDENCE_BINS)
        .map(|k| sorted[k * sorted.len() / CONFIDENCE_BINS])
        .collect();
    edges.dedup();
    edges.retain(|e| *e < sorted[sorted.len() - 1]);
    let bin = |c: f64| edges.iter().position(|&e| c <= e).unwrap_or(edges.len());
    let mut counts = vec![0u64; edges.len() + 1];
    let mut right = vec![0u64; edges.len() + 1];
    let mut confidence = vec![0.0f64; edges.len() + 1];
    for &(c, ok) in &rows {
        let b = bin(c);
        counts[b] += 1;
        right[b] += u64::from(ok);
        confidence[b] += c;
    }
    let n = rows.len() as f64;
    let reference_accuracy = rows.iter().filter(|r| r.1).count() as f64 / n;
    // An empty bin (only where ties collapse quantiles) gets the overall accuracy.
    let accuracy: Vec<f64> = counts
        .iter()
        .zip(&right)
        .map(|(&k, &r)| {
            if k == 0 {
                reference_accuracy
            } else {
                r as f64 / k as f64
            }
        })
        .collect();
    let calibration_error = counts
        .iter()
        .zip(&accuracy)
        .zip(&confidence)
        .filter(|((k, _), _)| **k > 0)
        .map(|((&k, &a), &c)| (k as f64 / n) * (c / k as f64 - a).abs())
        .sum::<f64>()
        .clamp(0.0, 1.0);
    // Under no drift: the estimate of resampled windows, per size.
    let expected: Vec<f64> = rows.iter().map(|r| accuracy[bin(r.0)]).collect();
    let alpha = opts.false_alarm_rate;
    let draws = resamples(alpha) as usize;
    let mut rng = SplitMix(SEED);
    let mut lower = Vec::with_capacity(sizes.len());
    for &size in sizes {
        // Fewer rows than the window: the spread also covers the labelled sample's own
        // (see `calibrate::effective`).
        let drawn = crate::calibrate::effective(size, expected.len());
        let mut estimates: Vec<f64> = (0..draws)
            .map(|_| {
                (0..drawn)
                    .map(|_| expected[rng.below(expected.len() as u64) as usize])
                    .sum::<f64>()
                    / f64::from(drawn)
            })
            .collect();
        estimates.sort_by(f64::total_cmp);
        let at = ((alpha * draws as f64).floor() as usize).min(draws - 1);
        lower.push(estimates[at]);
    }
    Ok(Performance {
        label: label.to_string(),
        edges,
        accuracy,
        counts,
        reference_accuracy,
        calibration_error,
        sizes: sizes.to_vec(),
        lower,
    })
}
