//! Runs the ONNX backend test cases through tract and reports every case.
//!
//! ```text
//! onnx-conformance [--backend cpu|gpu] [--cases DIR] [--report FILE.tsv] [--pass-list FILE] [--timeout-s N]
//! ```
//!
//! `--backend gpu` needs a build with `--features gpu` (and an adapter; set
//! FLEETML_GPU_ALLOW_SOFTWARE=1 to accept a software one such as llvmpipe).
//!
//! Without `--cases`, the cases are generated into a temporary directory from the pip
//! `onnx` package of `$FLEETML_PYTHON` (default /var/tmp/fleetml-venv/bin/python) with
//! scripts/onnx_cases.py. `--report` writes `case<TAB>outcome<TAB>detail` per case;
//! `--pass-list` writes the ids of the passing cases (the CI regression list,
//! hil-tests/conformance/cpu-pass.txt).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use hil_tests::conformance::{self, Outcome};

fn main() {
    if let Err(e) = run() {
        eprintln!("onnx-conformance: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let mut cases_dir = None;
    let mut report = None;
    let mut pass_list = None;
    let mut timeout = Duration::from_secs(30);
    let mut backend = "cpu".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--backend" => backend = value()?,
            "--cases" => cases_dir = Some(PathBuf::from(value()?)),
            "--report" => report = Some(PathBuf::from(value()?)),
            "--pass-list" => pass_list = Some(PathBuf::from(value()?)),
            "--timeout-s" => {
                timeout =
                    Duration::from_secs(value()?.parse().map_err(|_| "--timeout-s takes seconds")?)
            }
            "-h" | "--help" => {
                println!(
                    "usage: onnx-conformance [--backend cpu|gpu] [--cases DIR] [--report FILE.tsv] [--pass-list FILE] [--timeout-s N]"
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}` (see --help)")),
        }
    }
    let run_case: fn(&conformance::Case) -> Outcome = match backend.as_str() {
        "cpu" => conformance::run,
        #[cfg(feature = "gpu")]
        "gpu" => {
            if let Err(reason) = fleet_agent::gpu::probe() {
                return Err(format!("gpu backend: {reason}"));
            }
            conformance::run_gpu
        }
        #[cfg(not(feature = "gpu"))]
        "gpu" => {
            return Err(
                "this build has no GPU backend: cargo build -p hil-tests --features gpu".into(),
            );
        }
        other => return Err(format!("unknown backend `{other}` (cpu or gpu)")),
    };
    let _generated;
    let dir = match cases_dir {
        Some(d) => d,
        None => {
            let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            let dir = tmp.path().join("cases");
            hil_tests::generate_onnx_cases(&dir)?;
            _generated = tmp;
            dir
        }
    };
    let cases = conformance::cases(&dir)?;
    // Panics are results here, reported per case; keep the default hook quiet.
    std::panic::set_hook(Box::new(|_| {}));
    let mut rows = Vec::with_capacity(cases.len());
    let mut counts: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
    for case in &cases {
        let outcome = conformance::run_with_timeout(case, timeout, run_case);
        *counts
            .entry((case.kind.clone(), outcome.label()))
            .or_default() += 1;
        rows.push((case.id(), outcome));
    }
    if let Some(path) = report {
        let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        for (id, outcome) in &rows {
            writeln!(
                f,
                "{id}\t{}\t{}",
                outcome.label(),
                outcome.detail().replace(['\t', '\n'], " ")
            )
            .map_err(|e| e.to_string())?;
        }
    }
    if let Some(path) = pass_list {
        let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        writeln!(
            f,
            "# ONNX backend test cases tract passes; regenerate with\n# cargo run -p hil-tests --bin onnx-conformance -- --pass-list {}",
            path.display()
        )
        .map_err(|e| e.to_string())?;
        for (id, outcome) in &rows {
            if *outcome == Outcome::Pass {
                writeln!(f, "{id}").map_err(|e| e.to_string())?;
            }
        }
    }
    let total = rows.len();
    let passed = rows.iter().filter(|(_, o)| *o == Outcome::Pass).count();
    println!("{passed} of {total} cases pass");
    for ((kind, label), n) in &counts {
        println!("{kind:>18} {label:<12} {n}");
    }
    Ok(())
}
