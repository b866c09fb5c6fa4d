//! Per-prediction cost of the monitoring core, and a streaming-sketch peer measured in
//! the same run: `cargo run --release -p fleetml-monitor --example bench [PREDICTIONS] [RUNS]`.
//!
//! Each run feeds PREDICTIONS predictions of 16 features (11 numeric with 10 bins, 4
//! categorical with 4 values + other, 1 more numeric) and a class prediction through a
//! `Monitor` (windows of 1000 closing as they fill), then the same numeric values into
//! one DDSketch per feature (crate `sketches-ddsketch`, the Rust port the issue cites).
//! Prints the median over RUNS of ns per feature value for both, and for the monitor as
//! the agent runs a classifier built with a multivariate reference and a calibration
//! map: the 12 numeric features' reconstruction error under 8 principal components and
//! each prediction's confidence looked up for the accuracy estimate.

use std::hint::black_box;
use std::time::Instant;

use fleetml_monitor::{Cbpe, Monitor, Observation, Pca, Reference, Thresholds, WindowConfig};

const FEATURES: usize = 16;

fn references() -> Vec<Reference> {
    (0..FEATURES)
        .map(|i| {
            if i % 4 == 3 {
                Reference::categorical(&[40, 30, 20, 10, 1]).expect("categorical")
            } else {
                Reference::numeric(
                    &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
                    &[10; 10],
                    &[],
                    (0.0, 10.0),
                    2.9,
                )
                .expect("numeric")
            }
        })
        .collect()
}

/// A cheap deterministic value stream (xorshift).
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let predictions: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let runs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let refs = references();
    let classes = Reference::categorical(&[70, 30, 0]).expect("classes");
    let numeric: Vec<usize> = (0..FEATURES).filter(|i| i % 4 != 3).collect();
    let components: Vec<Vec<f64>> = (0..8)
        .map(|j| {
            (0..numeric.len())
                .map(|i| {
                    if (i + j) % numeric.len() < 2 {
                        0.5f64.sqrt()
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    let pca = Pca::new(&numeric, &[5.0; 12], &[2.9; 12], &components).expect("pca");
    let error = Reference::numeric(
        &[0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
        &[10; 10],
        &[],
        (0.0, 9.0),
        1.0,
    )
    .expect("error");
    let edges: Vec<f64> = (1..10).map(|k| 0.5 + 0.05 * k as f64).collect();
    let accuracy: Vec<f64> = (0..10).map(|k| 0.55 + 0.04 * k as f64).collect();
    let cbpe = Cbpe::new(&edges, &accuracy, &[(100, 0.7), (1000, 0.75)]).expect("map");
    let mut ours = Vec::new();
    let mut full = Vec::new();
    let mut peer = Vec::new();
    for _ in 0..runs {
        for with in [false, true] {
            let mut monitor = Box::new(
                Monitor::new(
                    &refs,
                    Some(classes.clone()),
                    WindowConfig::default(),
                    Thresholds::default(),
                )
                .expect("monitor"),
            );
            if with {
                *monitor = monitor
                    .clone()
                    .with_multivariate(pca.clone(), error.clone())
                    .with_performance(cbpe.clone());
            }
            let mut state = 0x9E37_79B9_7F4A_7C15u64;
            let mut values = [Observation::Missing; FEATURES];
            let start = Instant::now();
            for i in 0..predictions {
                for (j, v) in values.iter_mut().enumerate() {
                    let r = next(&mut state);
                    *v = if j % 4 == 3 {
                        Observation::Category((r % 5) as usize)
                    } else {
                        Observation::Number((r % 10_000) as f64 / 1000.0)
                    };
                }
                let class = Observation::Category((i & 1) as usize);
                if with {
                    monitor.confidence(0.5 + (i % 50) as f64 / 100.0);
                }
                black_box(monitor.observe(i, &values, Some(class), 250, Some(10)));
            }
            let ns = start.elapsed().as_nanos() as f64 / (predictions as f64 * FEATURES as f64);
            if with { full.push(ns) } else { ours.push(ns) }
        }

        let mut sketches: Vec<sketches_ddsketch::DDSketch> = (0..FEATURES)
            .map(|_| sketches_ddsketch::DDSketch::new(sketches_ddsketch::Config::defaults()))
            .collect();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let start = Instant::now();
        for _ in 0..predictions {
            for s in sketches.iter_mut() {
                let r = next(&mut state);
                s.add((r % 10_000) as f64 / 1000.0);
            }
        }
        black_box(&sketches);
        peer.push(start.elapsed().as_nanos() as f64 / (predictions as f64 * FEATURES as f64));
    }
    println!(
        "monitor core: {:.1} ns per feature value (median of {runs} runs of {predictions} predictions x {FEATURES} features)",
        median(ours)
    );
    println!(
        "monitor core with the reconstruction error and the accuracy estimate: {:.1} ns per feature value (same runs)",
        median(full)
    );
    println!(
        "DDSketch (sketches-ddsketch) add: {:.1} ns per value (same values, same run)",
        median(peer)
    );
    println!(
        "memory: Monitor {} bytes in all (fixed: capacity {} features); one feature slot {} bytes",
        std::mem::size_of::<Monitor>(),
        fleetml_monitor::MAX_FEATURES,
        fleetml_monitor::FEATURE_BYTES
    );
}
