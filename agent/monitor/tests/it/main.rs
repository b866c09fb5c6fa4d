//! The monitoring core against independent computations (numpy and scipy, run by the
//! test) and its memory promise (no allocation, ever, on the prediction path).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;
use std::process::Command;

use fleetml_monitor::{
    Cbpe, MissReason, Monitor, Observation, Pca, Reference, Subject, Thresholds, Transition,
    WindowConfig, stats,
};

/// Counts allocations made by the current thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: defers to the system allocator; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn python() -> PathBuf {
    let path = std::env::var_os("FLEETML_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/fleetml-venv/bin/python"));
    assert!(
        path.exists(),
        "{} not found: run the tests with scripts/test.sh, which prepares the Python venv",
        path.display()
    );
    path
}

/// Runs `script` with the test venv's Python, `input` on its stdin; its JSON answer.
fn run_python(script: &str, input: &str) -> serde_json::Value {
    use std::io::Write;
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python finishes");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json reply")
}

/// Fixed fixtures: (observed counts, reference counts).
fn fixtures() -> Vec<(Vec<u32>, Vec<u64>)> {
    vec![
        (vec![10, 20, 30, 40], vec![25, 25, 25, 25]),
        (vec![100, 0, 3, 250, 7], vec![90, 12, 1, 260, 30]),
        (vec![0, 0, 50], vec![40, 30, 30]),
        (vec![5, 5], vec![5, 5]),
        (
            vec![13, 8, 21, 34, 55, 89, 144, 233, 377, 610],
            vec![100, 100, 100, 100, 100, 100, 100, 100, 100, 100],
        ),
        (vec![1, 2, 3, 4, 5, 6, 7], vec![7, 0, 5, 4, 3, 2, 1]),
    ]
}

#[test]
fn statistics_match_numpy_and_scipy_to_1e_6() {
    let cases = fixtures();
    let script = r#"
import json, sys
import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import chisquare
from scipy.special import gammaincc
EPS = 1e-4
out = []
for obs, ref in json.loads(sys.stdin.read()):
    o = np.array(obs, dtype=float); r = np.array(ref, dtype=float)
    p = o / o.sum(); q = r / r.sum()
    pe = np.maximum(p, EPS); qe = np.maximum(q, EPS)
    psi = float(np.sum((pe - qe) * np.log(pe / qe)))
    ks = float(np.max(np.abs(np.cumsum(p) - np.cumsum(q))))
    js = float(jensenshannon(p, q, base=2))
    # Over the categories with reference mass only; then the sums agree and scipy's own
    # test applies.
    mask = r > 0
    om = o[mask]
    res = chisquare(om, om.sum() * q[mask])
    x2, pval = float(res.statistic), float(res.pvalue)
    out.append([psi, ks, js, x2, pval])
grid = [[a, x, float(gammaincc(a, x))] for a in (0.5, 1.0, 1.5, 4.5, 10.0, 60.0) for x in (0.01, 0.5, 2.0, 9.0, 30.0, 80.0)]
print(json.dumps({"stats": out, "gamma": grid}))
"#;
    let input = serde_json::to_string(&cases).expect("json");
    let reply = run_python(script, &input);
    for ((obs, reference), expected) in cases.iter().zip(reply["stats"].as_array().expect("stats"))
    {
        let r = Reference::categorical(reference).expect("reference");
        let q = r.proportions();
        let (x2, p) = stats::chi_square(obs, q).expect("chi-square");
        let ours = [
            stats::psi(obs, q),
            stats::ks(obs, q),
            stats::js(obs, q),
            x2,
            p,
        ];
        for (name, (a, b)) in ["psi", "ks", "js", "chi2", "p"]
            .iter()
            .zip(ours.iter().zip(expected.as_array().expect("row")))
        {
            let b = b.as_f64().expect("number");
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{name} of {obs:?} vs {reference:?}: ours {a}, scipy {b}"
            );
        }
    }
    for row in reply["gamma"].as_array().expect("gamma") {
        let (a, x, q) = (
            row[0].as_f64().expect("a"),
            row[1].as_f64().expect("x"),
            row[2].as_f64().expect("q"),
        );
        let ours = stats::gamma_q(a, x);
        assert!(
            (ours - q).abs() <= 1e-9,
            "Q({a}, {x}): ours {ours}, scipy {q}"
        );
    }
}

#[test]
fn identical_distributions_score_zero_and_a_shift_scores_high() {
    let reference = Reference::numeric(&[1.0, 2.0, 3.0], &[25, 25, 25, 25], &[], (0.0, 4.0), 1.1)
        .expect("reference");
    let q = reference.proportions();
    assert!(stats::psi(&[25, 25, 25, 25], q).abs() < 1e-12);
    assert!(stats::ks(&[25, 25, 25, 25], q).abs() < 1e-12);
    assert!(stats::js(&[25, 25, 25, 25], q).abs() < 1e-7);
    // Everything moved to the top bin.
    assert!(stats::psi(&[0, 0, 0, 100], q) > 2.0);
    assert!((stats::ks(&[0, 0, 0, 100], q) - 0.75).abs() < 1e-12);
    // Bins are (e[i-1], e[i]]: 1.0 is in bin 0, 1.5 in bin 1.
    assert_eq!(reference.bin(1.0), 0);
    assert_eq!(reference.bin(1.5), 1);
    assert_eq!(reference.bin(99.0), 3);
}

fn claims_like() -> (Vec<Reference>, Reference) {
    let numeric = Reference::numeric(
        &[1.0, 2.0, 3.0],
        &[250, 250, 250, 250],
        &[],
        (0.0, 4.0),
        1.1,
    )
    .expect("numeric");
    let categorical = Reference::categorical(&[500, 300, 200, 0]).expect("categorical");
    let classes = Reference::categorical(&[900, 100, 0]).expect("classes");
    (vec![numeric, categorical], classes)
}

#[test]
fn windows_close_by_count_or_time_and_alerts_need_k_windows() {
    let (features, classes) = claims_like();
    let mut m = Monitor::new(
        &features,
        Some(classes),
        WindowConfig {
            max_predictions: 200,
            max_duration_ms: 60_000,
        },
        Thresholds::default(),
    )
    .expect("monitor");
    // Reference-like traffic: values spread over the bins, categories 5:3:2, classes 9:1.
    let mut now = 0u64;
    let mut reports = Vec::new();
    let feed = |m: &mut Monitor, shifted: bool, now: &mut u64, reports: &mut Vec<_>| {
        for i in 0..200u64 {
            *now += 10;
            let x = if shifted { 3.5 } else { (i % 4) as f64 + 0.5 };
            let c = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2][(i % 10) as usize];
            let class = if i % 10 == 0 { 1 } else { 0 };
            if let Some(r) = m.observe(
                *now,
                &[Observation::Number(x), Observation::Category(c)],
                Some(Observation::Category(class)),
                120,
                Some(40),
            ) {
                reports.push(r);
            }
        }
    };
    for _ in 0..3 {
        feed(&mut m, false, &mut now, &mut reports);
    }
    assert_eq!(reports.len(), 3, "a window per 200 predictions");
    for r in &reports {
        assert!(r.events.is_empty(), "{:?}", r.events);
        assert!(r.features[0].psi < 1e-9 && !r.features[0].drifting);
        assert_eq!(r.predictions, 200);
    }
    reports.clear();
    for _ in 0..3 {
        feed(&mut m, true, &mut now, &mut reports);
    }
    // Drifting only after the third shifted window, and only feature 0.
    assert!(reports[0].events.is_empty() && reports[1].events.is_empty());
    assert_eq!(
        reports[2].events.as_slice(),
        &[fleetml_monitor::AlertEvent {
            subject: Subject::Feature(0),
            transition: Transition::Raised,
        }]
    );
    assert!(reports[2].features[0].drifting && !reports[2].features[1].drifting);
    assert_eq!(reports[2].features[0].out_of_range_rate, 0.0);
    reports.clear();
    for _ in 0..3 {
        feed(&mut m, false, &mut now, &mut reports);
    }
    assert_eq!(reports[2].events[0].transition, Transition::Recovered);

    // A quiet minute closes the window by time.
    m.observe(
        now + 1,
        &[Observation::Missing, Observation::Unseen],
        None,
        5,
        None,
    );
    assert!(m.tick(now + 30_000).is_none());
    let r = m.tick(now + 60_001).expect("closed by time");
    assert_eq!(r.predictions, 1);
    assert_eq!(r.features[0].missing_rate, 1.0);
    assert_eq!(r.features[1].unseen_rate, 1.0);
    assert!(r.events.is_empty(), "too few predictions to move alerts");
}

#[test]
fn missed_predictions_are_counted_by_reason_with_outages() {
    let (features, classes) = claims_like();
    let mut m = Monitor::new(
        &features,
        Some(classes),
        WindowConfig::default(),
        Thresholds::default(),
    )
    .expect("monitor");
    let ok = |m: &mut Monitor, t| {
        m.observe(
            t,
            &[Observation::Number(1.0), Observation::Category(0)],
            None,
            10,
            None,
        )
    };
    ok(&mut m, 1000);
    m.missed(1100, MissReason::InvalidInput, 2);
    m.missed(1200, MissReason::Shed, 1);
    ok(&mut m, 1300);
    m.missed(1400, MissReason::BackendPanic, 1);
    m.missed(1500, MissReason::ExpectedNotPredicted, 3);
    let r = m.close(2000);
    assert_eq!(r.predictions, 2);
    assert_eq!(r.missed, [2, 0, 0, 1, 0, 1, 3]);
    assert_eq!(r.missed_total(), 7);
    assert!((r.missing_prediction_rate() - 7.0 / 9.0).abs() < 1e-12);
    assert_eq!(r.outages.len(), 2);
    assert_eq!(
        (
            r.outages[0].start_ms,
            r.outages[0].end_ms,
            r.outages[0].missed
        ),
        (1100, Some(1300), 3)
    );
    assert_eq!(
        (
            r.outages[1].start_ms,
            r.outages[1].end_ms,
            r.outages[1].missed
        ),
        (1400, None, 4),
        "still going on at the close"
    );
}

#[test]
fn ten_million_predictions_allocate_nothing() {
    let features: Vec<Reference> = (0..12)
        .map(|i| {
            if i % 3 == 2 {
                Reference::categorical(&[10, 20, 30, 1]).expect("categorical")
            } else {
                Reference::numeric(
                    &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
                    &[1; 10],
                    &[],
                    (0.0, 10.0),
                    2.9,
                )
                .expect("numeric")
            }
        })
        .collect();
    let classes = Reference::categorical(&[5, 5, 0]).expect("classes");
    // The multivariate monitor over the eight numeric features, and the accuracy
    // estimate: both on the prediction path too.
    let numeric: Vec<usize> = (0..12).filter(|i| i % 3 != 2).collect();
    let components: Vec<Vec<f64>> = (0..3)
        .map(|j| {
            (0..numeric.len())
                .map(|i| if i == j { 1.0 } else { 0.0 })
                .collect()
        })
        .collect();
    let pca = Pca::new(&numeric, &[5.0; 8], &[2.9; 8], &components).expect("pca");
    let error = Reference::numeric(&[1.0, 2.0, 3.0], &[1; 4], &[], (0.0, 9.0), 1.0).expect("error");
    let cbpe = Cbpe::new(&[0.6, 0.8], &[0.55, 0.7, 0.9], &[(100, 0.6), (1000, 0.65)]).expect("map");
    let mut m = Box::new(
        Monitor::new(
            &features,
            Some(classes),
            WindowConfig::default(),
            Thresholds::default(),
        )
        .expect("monitor")
        .with_multivariate(pca, error)
        .with_performance(cbpe),
    );
    let mut values = [Observation::Missing; 12];
    let before = allocations();
    let mut windows = 0u64;
    for i in 0..10_000_000u64 {
        for (j, v) in values.iter_mut().enumerate() {
            *v = if j % 3 == 2 {
                Observation::Category((i as usize + j) % 3)
            } else {
                Observation::Number(((i * 7 + j as u64) % 100) as f64 / 10.0)
            };
        }
        if i % 1000 == 999 {
            m.missed(i, MissReason::Timeout, 1);
        }
        m.confidence(0.5 + (i % 50) as f64 / 100.0);
        if m.observe(
            i,
            &values,
            Some(Observation::Category((i % 2) as usize)),
            i % 5000,
            Some(i % 300),
        )
        .is_some()
        {
            windows += 1;
        }
    }
    let after = allocations();
    assert_eq!(windows, 10_000);
    assert_eq!(after - before, 0, "the prediction path allocated");
    println!(
        "Monitor: {} bytes; one feature slot {} bytes",
        std::mem::size_of::<Monitor>(),
        fleetml_monitor::FEATURE_BYTES
    );
}

#[test]
fn latency_quantiles_follow_the_documented_buckets() {
    // Values 1..=100. Bucket of v ≥ 1: floor(4·log2 v) + 1; reported value: the bucket's
    // upper bound ⌈2^(bucket/4)⌉, capped at the largest value seen.
    //   p50: rank 50 → v = 50, bucket floor(4 · 5.6439) + 1 = 23, ⌈2^5.75⌉ = ⌈53.82⌉ = 54
    //   p95: rank 95 → v = 95, bucket floor(4 · 6.5699) + 1 = 27, ⌈2^6.75⌉ = 108 → cap 100
    //   p10: rank 10 → v = 10, bucket floor(4 · 3.3219) + 1 = 14, ⌈2^3.5⌉ = ⌈11.31⌉ = 12
    let mut h = fleetml_monitor::Histogram::default();
    for v in 1..=100u64 {
        h.record(v);
    }
    assert_eq!(h.count(), 100);
    assert_eq!(h.quantile(0.50), Some(54));
    assert_eq!(h.quantile(0.95), Some(100));
    assert_eq!(h.quantile(0.10), Some(12));
    let empty = fleetml_monitor::Histogram::default();
    assert_eq!(empty.quantile(0.5), None);
    // Zero goes to bucket 0 (reported as 1, capped at the max seen: 0).
    let mut zeros = fleetml_monitor::Histogram::default();
    zeros.record(0);
    assert_eq!(zeros.quantile(0.99), Some(0));
}

/// A seeded stream of standard normal values (xorshift and Box–Muller).
fn normals(seed: u64, n: usize) -> Vec<f64> {
    let mut state = seed.max(1);
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        })
        .collect()
}

/// KS, the normed Wasserstein distance and chi-square on raw values, against scipy's
/// exact computations on the same values (scipy bins nothing: `ks_2samp`,
/// `wasserstein_distance`, and `chisquare` over categories it counts itself). Ours must
/// lie within the bounds `stats` documents: KS and Wasserstein at most the exact value,
/// and below it by at most `ks_slack` and the bound `wasserstein` returns. On these
/// smooth streams the Wasserstein estimate is also within 0.01 of the exact one (0.008
/// undrifted, 0.003 for the shifts, exact for the shift past the maximum).
#[test]
fn statistics_on_raw_values_agree_with_scipy_within_their_documented_bounds() {
    // The reference: 5,000 values, ten nearest-rank quantile bins as the builder cuts them.
    let mut reference = normals(7, 5_000);
    reference.sort_by(f64::total_cmp);
    let n = reference.len();
    let edges: Vec<f64> = (1..10)
        .map(|k| reference[(k * n).div_ceil(10) - 1])
        .collect();
    let (mut ref_counts, mut ref_sums) = (vec![0u64; 10], vec![0f64; 10]);
    for v in &reference {
        let bin = edges.partition_point(|e| e < v);
        ref_counts[bin] += 1;
        ref_sums[bin] += v;
    }
    let ref_means: Vec<f64> = ref_sums
        .iter()
        .zip(&ref_counts)
        .map(|(s, c)| s / *c as f64)
        .collect();
    let mean = reference.iter().sum::<f64>() / n as f64;
    let std = (reference.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
    let r = Reference::numeric(
        &edges,
        &ref_counts,
        &ref_means,
        (reference[0], reference[n - 1]),
        std,
    )
    .expect("numeric");
    // Windows: undrifted, shifted by 0.3 σ, widened 1.5×, and a shift past the maximum.
    let windows: Vec<Vec<f64>> = vec![
        normals(11, 400),
        normals(12, 400).iter().map(|v| v + 0.3).collect(),
        normals(13, 1_000).iter().map(|v| v * 1.5).collect(),
        normals(14, 250).iter().map(|v| v + 2.5).collect(),
    ];
    // Categorical: four categories with reference mass, and an "other" the reference
    // never saw (index 4), which the window has.
    let cat_ref: Vec<u64> = vec![400, 300, 200, 100, 0];
    let cat_window: Vec<usize> = (0..600)
        .map(|i| match i % 20 {
            0..=6 => 0,
            7..=11 => 1,
            12..=15 => 2,
            16..=17 => 3,
            _ => 4,
        })
        .collect();
    let script = r#"
import json, sys
import numpy as np
from scipy.stats import ks_2samp, wasserstein_distance, chisquare
d = json.loads(sys.stdin.read())
ref = np.array(d["reference"])
out = []
for w in d["windows"]:
    w = np.array(w)
    out.append([float(ks_2samp(ref, w).statistic), float(wasserstein_distance(ref, w) / np.std(ref))])
# The categories the reference has, counted from the raw values.
values, counts = np.unique(np.array(d["cat_window"]), return_counts=True)
observed = dict(zip(values.tolist(), counts.tolist()))
ref_counts = np.array(d["cat_ref"], dtype=float)
seen = [i for i in range(len(ref_counts)) if ref_counts[i] > 0]
o = np.array([observed.get(i, 0) for i in seen], dtype=float)
q = ref_counts[seen] / ref_counts[seen].sum()
res = chisquare(o, o.sum() * q)
print(json.dumps({"numeric": out, "chi2": [float(res.statistic), float(res.pvalue)]}))
"#;
    let input = serde_json::json!({
        "reference": reference, "windows": windows, "cat_ref": cat_ref, "cat_window": cat_window,
    })
    .to_string();
    let reply = run_python(script, &input);
    let q = r.proportions();
    for (window, exact) in windows
        .iter()
        .zip(reply["numeric"].as_array().expect("numeric"))
    {
        let (mut counts, mut sums) = ([0u32; 10], [0f64; 10]);
        for v in window {
            counts[r.bin(*v)] += 1;
            sums[r.bin(*v)] += v;
        }
        let (ks_exact, w_exact) = (
            exact[0].as_f64().expect("ks"),
            exact[1].as_f64().expect("w"),
        );
        let (ks, slack) = (stats::ks(&counts, q), stats::ks_slack(&counts, q));
        assert!(
            ks <= ks_exact + 1e-12 && ks_exact <= ks + slack + 1e-12,
            "KS {ks} (+{slack}) vs exact {ks_exact}"
        );
        let low = window.iter().copied().fold(f64::INFINITY, f64::min);
        let high = window.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (w, bound) = stats::wasserstein(
            &counts,
            &sums,
            q,
            stats::Support {
                edges: &edges,
                means: &ref_means,
                reference: (reference[0], reference[n - 1]),
                window: (low, high),
                std,
            },
        )
        .expect("a distance");
        assert!(
            w <= w_exact + 1e-9 && w_exact - w <= bound && w_exact - w <= 0.01,
            "Wasserstein {w} (at most {bound} below) vs exact {w_exact}"
        );
    }
    // Chi-square over the categories the reference has; the unseen one left out.
    let mut counts = [0u32; 5];
    for c in &cat_window {
        counts[*c] += 1;
    }
    let cat = Reference::categorical(&cat_ref).expect("categorical");
    let (x2, p) = stats::chi_square(&counts, cat.proportions()).expect("chi-square");
    let (sx2, sp) = (
        reply["chi2"][0].as_f64().expect("x2"),
        reply["chi2"][1].as_f64().expect("p"),
    );
    assert!(
        (x2 - sx2).abs() <= 1e-9 * sx2.max(1.0) && (p - sp).abs() <= 1e-9,
        "chi-square ({x2}, {p}) vs scipy ({sx2}, {sp})"
    );
}

/// Unseen categories are the unseen rate's business, not chi-square's: a window that
/// keeps the reference's shares among the known categories but adds 10 % unseen values
/// passes the chi-square test (before, the "other" bucket with reference share 0 counted
/// as a category with expected count n·10⁻⁴, and its p-value collapsed) and alerts by its
/// unseen rate (0.10 > 0.05). KS is reported only for numeric features; the normed
/// Wasserstein distance too.
#[test]
fn unseen_categories_alert_by_their_rate_and_leave_chi_square_to_the_known_ones() {
    let categorical = Reference::categorical(&[500, 300, 200, 0]).expect("categorical");
    let numeric = Reference::numeric(&[1.0, 2.0, 3.0], &[25, 25, 25, 25], &[], (0.0, 4.0), 1.1)
        .expect("numeric");
    let mut m = Monitor::new(
        &[categorical, numeric],
        None,
        WindowConfig {
            max_predictions: 100,
            max_duration_ms: 60_000,
        },
        Thresholds {
            windows: 1,
            ..Thresholds::default()
        },
    )
    .expect("monitor");
    let mut report = None;
    for i in 0..100u32 {
        // 45, 27 and 18 of the 90 known values: exactly the reference's shares.
        let category = match i {
            0..45 => Observation::Category(0),
            45..72 => Observation::Category(1),
            72..90 => Observation::Category(2),
            _ => Observation::Unseen,
        };
        let value = Observation::Number(0.5 + f64::from(i % 4));
        report = m.observe(i.into(), &[category, value], None, 10, None);
    }
    let report = report.expect("the window closed");
    let c = report.features[0];
    assert!((c.unseen_rate - 0.1).abs() < 1e-12, "{c:?}");
    assert!(c.chi2_p.expect("categorical") > 0.99, "{c:?}");
    assert!(c.drifting, "the unseen rate raises the alert: {c:?}");
    assert_eq!((c.ks, c.wasserstein), (None, None));
    let n = report.features[1];
    assert!(
        n.ks.expect("numeric") < 1e-12 && n.chi2_p.is_none(),
        "{n:?}"
    );
    assert!(n.wasserstein.expect("numeric") < 0.1, "{n:?}");
    assert!(!n.drifting);
}

/// Calibrated thresholds: exact at the calibrated sizes, interpolated as a power of the
/// window size between them, the nearest beyond; an explicit (fixed) threshold wins; bad
/// tables are refused.
#[test]
fn calibrated_thresholds_interpolate_by_window_size_and_yield_to_fixed_ones() {
    use fleetml_monitor::{Fixed, Limit};
    let limit = |size, psi, js| Limit {
        size,
        psi,
        js,
        chi2_p: 0.0,
    };
    let r = Reference::numeric(&[1.0, 2.0, 3.0], &[25, 25, 25, 25], &[], (0.0, 4.0), 1.1)
        .expect("reference")
        .with_limits(&[limit(100, 0.4, 0.2), limit(1_000, 0.04, 0.05)])
        .expect("limits");
    let at = |n| r.limits_at(n).expect("calibrated");
    assert_eq!((at(100).psi, at(100).js), (0.4, 0.2));
    assert_eq!((at(50).psi, at(5_000).psi), (0.4, 0.04));
    // √(100 · 1000) ≈ 316: halfway in log n, the geometric mean of the thresholds.
    assert!(
        (at(316).psi - (0.4f64 * 0.04).sqrt()).abs() < 1e-3,
        "{:?}",
        at(316)
    );
    assert!((at(316).js - 0.1).abs() < 1e-3, "{:?}", at(316));

    let t = Thresholds::default().for_window(&r, 1_000);
    assert_eq!((t.psi, t.js, t.chi2_p), (0.04, 0.05, 0.01));
    let fixed = Thresholds {
        psi: 0.3,
        fixed: Fixed {
            psi: true,
            ..Fixed::default()
        },
        ..Thresholds::default()
    }
    .for_window(&r, 1_000);
    assert_eq!((fixed.psi, fixed.js), (0.3, 0.05));
    let plain = Reference::numeric(&[1.0], &[1, 1], &[], (0.0, 2.0), 0.5).expect("reference");
    assert_eq!(Thresholds::default().for_window(&plain, 10).psi, 0.2);
    assert!(
        plain
            .clone()
            .with_limits(&[limit(1_000, 0.1, 0.1), limit(100, 0.2, 0.2)])
            .is_err()
    );
    assert!(plain.with_limits(&[limit(100, -0.1, 0.1)]).is_err());
}

/// A window names the bins whose share moved most, largest move first.
#[test]
fn a_window_names_the_bins_that_moved_most() {
    let r = Reference::categorical(&[50, 30, 20, 0]).expect("categorical");
    let report = r.window((0..100).map(|i| match i {
        0..20 => Observation::Category(0),
        20..90 => Observation::Category(1),
        _ => Observation::Category(2),
    }));
    let moved: Vec<(u8, f64, f64)> = report
        .moved
        .iter()
        .flatten()
        .map(|s| (s.bin, s.current, s.reference))
        .collect();
    assert_eq!(moved, vec![(1, 0.7, 0.3), (0, 0.2, 0.5), (2, 0.1, 0.2)]);
    // The reference's own shares: nothing moved.
    let unmoved = r.window((0..100).map(|i| {
        Observation::Category(match i {
            0..50 => 0,
            50..80 => 1,
            _ => 2,
        })
    }));
    assert!(unmoved.moved.iter().all(Option::is_none), "{unmoved:?}");
}

#[test]
fn the_reconstruction_error_is_the_distance_to_the_kept_components() {
    // Features 0 and 2 go in (1 is categorical and left out), one component along
    // (1, 1)/√2: a row standardized to (z0, z2) has error |z0 − z2| / √2.
    let h = std::f64::consts::FRAC_1_SQRT_2;
    let pca = Pca::new(&[0, 2], &[10.0, -1.0], &[2.0, 0.5], &[[h, h]]).expect("pca");
    assert_eq!(pca.components(), 1);
    let row = |a: f64, c: f64| {
        [
            Observation::Number(a),
            Observation::Category(1),
            Observation::Number(c),
        ]
    };
    // z = (1, 1): on the component, no error.
    let error = |r: &[Observation]| pca.error(r).expect("an input present");
    assert!(error(&row(12.0, -0.5)) < 1e-6);
    // z = (1, −1): all of it off the component, |z| = √2.
    assert!((error(&row(12.0, -1.5)) - 2f64.sqrt()).abs() < 1e-6);
    // z = (3, 1): error |3 − 1| / √2.
    assert!((error(&row(16.0, -0.5)) - 2.0 * h).abs() < 1e-6);
    // A missing value stands at its mean (z = 0).
    let missing = [
        Observation::Number(12.0),
        Observation::Missing,
        Observation::Missing,
    ];
    assert!((error(&missing) - h).abs() < 1e-6);
    // No input at all (a raw-tensor request): the error is missing, not 0.
    assert_eq!(pca.error(&[]), None);
    assert_eq!(pca.error(&[Observation::Missing; 3]), None);
    // Shapes that do not fit are refused.
    assert!(Pca::new(&[0, 2], &[0.0], &[1.0, 1.0], &[[h, h]]).is_err());
    assert!(Pca::new(&[0, 2], &[0.0, 0.0], &[1.0, 1.0], &[[h, h, h]]).is_err());
}

#[test]
fn the_estimated_accuracy_averages_the_map_and_alerts_below_the_limit() {
    let cbpe = Cbpe::new(&[0.6, 0.8], &[0.5, 0.7, 0.95], &[(100, 0.7), (1000, 0.8)]).expect("map");
    assert_eq!(cbpe.expected(0.55), 0.5);
    assert_eq!(cbpe.expected(0.6), 0.5, "edges close their bin");
    assert!((cbpe.expected(0.7) - 0.7).abs() < 1e-6);
    assert!((cbpe.expected(0.99) - 0.95).abs() < 1e-6);
    assert_eq!(cbpe.limit_at(50), Some(0.7));
    assert_eq!(cbpe.limit_at(5000), Some(0.8));
    let mid = cbpe.limit_at(316).expect("interpolated");
    assert!((mid - 0.75).abs() < 1e-3, "half way in log n: {mid}");
    let monitor = |min: Option<f64>| {
        Monitor::new(
            &[],
            None,
            WindowConfig {
                max_predictions: 100,
                max_duration_ms: u64::MAX,
            },
            Thresholds {
                windows: 1,
                min_predictions: 1,
                min_estimated_accuracy: min,
                ..Thresholds::default()
            },
        )
        .expect("monitor")
        .with_performance(cbpe.clone())
    };
    // Half the predictions confident (0.95), half not (0.5): 0.725, above 0.7.
    let run = |m: &mut Monitor| {
        let mut last = None;
        for i in 0..100 {
            m.confidence(if i % 2 == 0 { 0.9 } else { 0.55 });
            last = m.observe(0, &[], None, 1, None).or(last);
        }
        last.expect("closed").estimated_accuracy.expect("estimated")
    };
    let e = run(&mut monitor(None));
    assert!((e.accuracy - 0.725).abs() < 1e-6, "{e:?}");
    assert_eq!(
        (e.limit, e.predictions, e.alerting),
        (Some(0.7), 100, false)
    );
    // An explicit minimum wins over the calibrated limit.
    let mut strict = monitor(Some(0.74));
    let e = run(&mut strict);
    assert!(e.alerting, "{e:?}");
    // No confidences in a window: no estimate, and the alert stays as it was.
    let r = strict.close(1);
    assert!(r.estimated_accuracy.is_none());
    assert!(r.accuracy_alert, "still alerting");
    // Maps that do not fit are refused.
    assert!(Cbpe::new(&[0.6], &[0.5], &[]).is_err());
    assert!(Cbpe::new(&[0.8, 0.6], &[0.5, 0.7, 0.9], &[]).is_err());
    assert!(Cbpe::new(&[0.6], &[0.5, 1.5], &[]).is_err());
}
