//! `fleetctl bundle …`: build, sign, verify and inspect model bundles.

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum BundleCommand {
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
pub(crate) struct BuildArgs {
    /// The ONNX model.
    #[arg(long)]
    model: PathBuf,
    /// Declare an input's shape, for models whose ONNX inputs leave dimensions unknown:
    /// NAME=D1,D2,… with sizes or symbols (a symbol such as N is a free batch size; H,
    /// W a free image size), NAME= for a scalar. The element type stays the model's.
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
    /// Golden input tensors for a raw-tensor model: an .npz (`numpy.savez`) with one array
    /// per model input, named by the input. Their outputs are computed by ONNX Runtime
    /// when it is available (--onnxruntime), else by tract, and every backend the bundle
    /// targets that can run here is checked against them.
    #[arg(long, value_name = "FILE.npz")]
    golden_inputs: Option<PathBuf>,
    /// libonnxruntime for golden outputs (the reference implementation), e.g. the PyPI
    /// wheel's onnxruntime/capi/libonnxruntime.so.1.x.y.
    #[arg(long, env = "ORT_DYLIB_PATH", value_name = "PATH")]
    onnxruntime: Option<PathBuf>,
    /// Build even when a target backend disagrees with the golden outputs; the
    /// disagreement is recorded in the bundle's golden-check.json.
    #[arg(long)]
    allow_backend_disagreement: bool,
    /// Lineage (TOML): dataset, code, framework, dependencies, container, CUDA, params, seed, device.
    #[arg(long)]
    lineage: Option<PathBuf>,
    /// Monitoring settings (TOML) for this model: `window_predictions`, `window_seconds`,
    /// `drift_psi`, `drift_js`, `drift_chi2_p`, `missing_rate`, `lag_p95_ms`,
    /// `alert_windows`. A device's own agent configuration overrides each it sets.
    #[arg(long)]
    monitoring: Option<PathBuf>,
    /// Serve with dynamic batching: concurrent requests coalesce into batches of up to
    /// N rows (2 or more; every input needs a symbolic leading dimension). A device's
    /// `[[batching]]` in agent.toml overrides it.
    #[arg(long, value_name = "N")]
    max_batch: Option<u32>,
    /// With --max-batch: longest the first request of a batch waits for others
    /// (microseconds; the agent's default is 1000).
    #[arg(long, value_name = "US", requires = "max_batch")]
    max_queue_delay_us: Option<u64>,
    /// Quantile bins per numeric feature in the reference profile.
    #[arg(long, default_value_t = 10)]
    bins: u32,
    /// With --reference: calibrate the drift thresholds so that at most this share of
    /// undrifted windows puts a feature past any of them (per window, per feature: with F
    /// features, at most F times that per window for the model, and far less for an
    /// alert, which needs `alert_windows` such windows in a row).
    #[arg(long, default_value_t = fleet_control::calibrate::DEFAULT_FALSE_ALARM_RATE)]
    false_alarm_rate: f64,
    /// With --reference: the window sizes (predictions) to calibrate thresholds for; the
    /// agent interpolates between them. The [monitoring] window size is added.
    #[arg(long, value_delimiter = ',', default_values_t = fleet_control::calibrate::DEFAULT_SIZES)]
    calibrate_windows: Vec<u32>,
    /// With --reference, for a classifier: the column of --reference holding each row's
    /// true class (0, 1, …). The builder checks how well the model's confidence predicts
    /// being right, stores a calibration map, and the agent then estimates each window's
    /// accuracy without labels and alerts when it falls below the calibrated limit.
    #[arg(long, value_name = "COLUMN", requires = "reference")]
    label_column: Option<String>,
    /// With --label-column: measure the calibration map on this labelled CSV instead of
    /// --reference. Rows the model was not trained on (a holdout) give an unbiased map;
    /// the training rows make the estimate optimistic by the model's overfit.
    #[arg(long, value_name = "FILE", requires = "label_column")]
    labelled: Option<PathBuf>,
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

pub(crate) fn bundle_command(cmd: BundleCommand) -> anyhow::Result<()> {
    match cmd {
        BundleCommand::Build(a) => {
            let a = *a;
            let created_at = match a.created_at {
                Some(t) => t,
                None => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .context("the system clock is before 1970")?
                    .as_secs(),
            };
            let opts = fleet_control::bundle::BuildOptions {
                model: a.model,
                input_shapes: a.input_shapes,
                name: a.name,
                version: a.version,
                label: a.label,
                features: a.features,
                reference: a.reference,
                golden: a.golden,
                golden_rows: a.golden_rows,
                golden_inputs: a.golden_inputs,
                onnxruntime: a.onnxruntime,
                allow_backend_disagreement: a.allow_backend_disagreement,
                lineage: a.lineage,
                bins: a.bins,
                calibration: fleet_control::calibrate::Options {
                    sizes: a.calibrate_windows,
                    false_alarm_rate: a.false_alarm_rate,
                },
                label_column: a.label_column,
                labelled: a.labelled,
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
                serving: fleetml_protocol::manifest::ServingPolicy {
                    max_batch: a.max_batch,
                    max_queue_delay_us: a.max_queue_delay_us,
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
            let built = fleet_control::bundle::build(&opts)?;
            for line in built.golden_check.iter().flat_map(|c| c.lines()) {
                println!("{line}");
            }
            if let Some(why) = &built.tract_error {
                println!("cpu (tract): {why}; the bundle runs on backends that can (onnxruntime)");
            }
            if let Some(report) = &built.gpu_report {
                println!("gpu: {}", report.summary());
            }
            for note in &built.notes {
                println!("{note}");
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
        BundleCommand::Sign { bundle: path, key } => {
            let (changed, id) = fleet_control::bundle::sign(&path, &key)?;
            if changed {
                println!("signed {} with key {id}", path.display());
            } else {
                println!(
                    "{} is already signed by key {id}; nothing changed",
                    path.display()
                );
            }
        }
        BundleCommand::Verify {
            bundle: path,
            trust,
        } => {
            let policy = fleet_control::keys::load_policy(&trust)?;
            let v = fleet_control::bundle::verify(&path, &policy)?;
            println!(
                "{}",
                fleet_control::bundle::summary(&v, Some(policy.threshold))
            );
        }
        BundleCommand::Inspect { bundle: path, json } => {
            let front = fleet_control::bundle::read_front(&path)?;
            let size = std::fs::metadata(&path)?.len();
            let reference = fleet_control::bundle::stored_reference(&path, &front)?;
            let calibration = reference.as_ref().and_then(|r| r.calibration.clone());
            if json {
                let mut report = fleet_control::bundle::inspect_json(&front, size);
                report["calibration"] = serde_json::to_value(&calibration)?;
                if let Some(r) = &reference {
                    report["multivariate"] = serde_json::to_value(&r.multivariate)?;
                    report["performance"] = serde_json::to_value(&r.performance)?;
                }
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", fleet_control::bundle::inspect_text(&front, size));
                if let Some(c) = &calibration {
                    print!("{}", fleet_control::bundle::calibration_text(c));
                }
                if let Some(r) = &reference {
                    print!("{}", fleet_control::bundle::monitors_text(r));
                }
            }
        }
    }
    Ok(())
}
