//! `fleetctl bundle …`: build, sign, verify and inspect `.fmb` model bundles.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fleetml_protocol::bundle::{self, Limits, SignatureRecord, Unverified, VerifiedBundle};
use fleetml_protocol::crypto::{Sha256, Sha256Hasher, SigningKey};
use fleetml_protocol::features::{FeatureSchema, RawValue};
use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::{
    Entry, GOLDEN_ENTRY, GPU_COMPAT_ENTRY, GPU_MODEL_ENTRY, Lineage, MANIFEST_FORMAT, MODEL_ENTRY,
    Manifest, REFERENCE_ENTRY, Targets, valid_entry_name,
};
use fleetml_protocol::reference::ReferenceProfile;
use fleetml_protocol::trust::TrustPolicy;

use fleetml_inference::prepare::{self, CompatReport};

use crate::onnx::OnnxModel;
use crate::output::{self, human_size};

/// Largest model, feature schema, lineage or CSV read into memory at build time.
const MAX_MODEL: u64 = 2 << 30;
const MAX_TEXT: u64 = 16 << 20;

/// Everything `bundle build` needs.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub model: PathBuf,
    /// Shapes to declare for inputs the ONNX file leaves unknown.
    pub input_shapes: Vec<fleetml_protocol::manifest::TensorSpec>,
    pub name: String,
    pub version: u64,
    pub label: String,
    /// Feature schema; without one the model takes raw tensors only.
    pub features: Option<PathBuf>,
    pub reference: Option<PathBuf>,
    pub golden: Option<PathBuf>,
    pub golden_rows: usize,
    /// Raw golden input tensors (`.npz`, one array per model input).
    pub golden_inputs: Option<PathBuf>,
    /// The ONNX Runtime library golden outputs are computed with (else `ORT_DYLIB_PATH`,
    /// else tract).
    pub onnxruntime: Option<PathBuf>,
    /// Build even when a target backend disagrees with the golden outputs (recorded).
    pub allow_backend_disagreement: bool,
    pub lineage: Option<PathBuf>,
    pub bins: u32,
    /// Window sizes and false-alarm rate the drift thresholds are calibrated for (with
    /// a reference; the bundle's own window size is added).
    pub calibration: crate::calibrate::Options,
    /// With a reference: the column holding each row's true class, for the calibration
    /// map that lets the agent estimate accuracy without labels.
    pub label_column: Option<String>,
    /// The labelled rows the calibration map is measured on (default: the reference).
    /// Rows the model was not trained on give an unbiased map.
    pub labelled: Option<PathBuf>,
    /// Monitoring window and thresholds for this model.
    pub monitoring: fleetml_protocol::manifest::MonitoringPolicy,
    /// Dynamic batching the agent applies unless configured otherwise.
    pub serving: fleetml_protocol::manifest::ServingPolicy,
    /// Also store a model prepared for the GPU backend, fixed to this batch size.
    pub prepare_gpu: Option<u64>,
    pub backends: Vec<String>,
    pub boards: Vec<String>,
    pub min_agent_version: String,
    pub created_at: u64,
    pub extra: Vec<PathBuf>,
    pub keys: Vec<PathBuf>,
    pub out: PathBuf,
}

/// Reads a CSV with a header into rows of raw values in schema order. Columns not in the
/// schema (such as a label) are ignored; a schema feature missing from the header is an
/// error naming it.
pub fn read_csv(
    path: &Path,
    schema: &FeatureSchema,
    limit: Option<usize>,
) -> anyhow::Result<Vec<Vec<RawValue>>> {
    let (mut reader, header) = crate::csvfile::open(path)?;
    let mut positions = Vec::with_capacity(schema.features.len());
    for f in &schema.features {
        let Some(pos) = header.iter().position(|h| h.trim() == f.name) else {
            bail!(
                "{} has no column `{}` (a feature of the schema)",
                path.display(),
                f.name
            );
        };
        positions.push(pos);
    }
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        if limit.is_some_and(|l| rows.len() >= l) {
            break;
        }
        let record = record.with_context(|| format!("{} row {}", path.display(), i + 2))?;
        rows.push(
            positions
                .iter()
                .map(|p| RawValue::parse(record.get(*p).unwrap_or("")))
                .collect(),
        );
    }
    anyhow::ensure!(!rows.is_empty(), "{} has no data rows", path.display());
    Ok(rows)
}

fn last_axis(t: &Tensor) -> usize {
    t.shape.last().copied().unwrap_or(1).max(1) as usize
}

/// A payload and where its bytes come from.
enum Source {
    Memory(Vec<u8>),
    Shared(std::sync::Arc<[u8]>),
    File(PathBuf),
}

fn entry_for(name: &str, source: &Source) -> anyhow::Result<Entry> {
    let (size, sha256) = match source {
        Source::Memory(bytes) => (bytes.len() as u64, fleetml_protocol::crypto::sha256(bytes)),
        Source::Shared(bytes) => (bytes.len() as u64, fleetml_protocol::crypto::sha256(bytes)),
        Source::File(path) => hash_file(path)?,
    };
    Ok(Entry {
        name: name.to_string(),
        size,
        sha256,
    })
}

fn hash_file(path: &Path) -> anyhow::Result<(u64, Sha256)> {
    let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256Hasher::new();
    let mut buf = vec![0u8; bundle::CHUNK];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hasher.finish()))
}

/// Summary of a built bundle.
#[derive(Debug)]
pub struct Built {
    pub manifest: Manifest,
    pub size: u64,
    pub signed_by: Vec<String>,
    /// The GPU preparation's report, when `--prepare gpu` was asked for.
    pub gpu_report: Option<CompatReport>,
    /// Why tract (the agents' `cpu` backend) cannot run the model, when it cannot.
    pub tract_error: Option<String>,
    /// How the golden outputs were computed and checked, when the bundle has them.
    pub golden_check: Option<crate::golden::GoldenCheck>,
    /// What the monitoring references say about themselves (the multivariate model, the
    /// calibration map, a reference small for its windows), for the builder to print.
    pub notes: Vec<String>,
}

/// The reference rows, as a multiple of the largest calibrated window, below which
/// single features false-alarm noticeably above the target (docs/MONITORING.md).
pub const REFERENCE_PER_WINDOW: u32 = 10;

pub fn build(opts: &BuildOptions) -> anyhow::Result<Built> {
    let schema = match &opts.features {
        Some(path) => {
            let text = output::read_bounded(path, MAX_TEXT, "feature schema")?;
            FeatureSchema::from_toml(&String::from_utf8_lossy(&text))
                .with_context(|| format!("feature schema {}", path.display()))?
        }
        None => {
            if opts.reference.is_some() || opts.golden.is_some() {
                bail!(
                    "--reference and --golden read CSV rows of named features; they need --features (a raw-tensor model takes --golden-inputs FILE.npz)"
                );
            }
            FeatureSchema {
                features: Vec::new(),
            }
        }
    };
    let model_bytes = output::read_bounded(&opts.model, MAX_MODEL, "model")?;
    let (model_bytes, external) = pack_external_data(&opts.model, model_bytes)?;
    let onnx = fleetml_inference::Onnx {
        model: &model_bytes,
        external: &external,
    };
    let model = OnnxModel::load(onnx, &opts.input_shapes)
        .with_context(|| format!("model {}", opts.model.display()))?;
    let tract_error = model.tract_error().map(str::to_string);
    schema.check_against(&model.inputs).with_context(|| {
        format!(
            "feature schema {} does not match model {}",
            opts.features
                .as_deref()
                .unwrap_or(std::path::Path::new("-"))
                .display(),
            opts.model.display()
        )
    })?;
    let lineage = match &opts.lineage {
        Some(p) => {
            let text = output::read_bounded(p, MAX_TEXT, "lineage")?;
            Lineage::from_toml(&String::from_utf8_lossy(&text))
                .map_err(|e| anyhow::anyhow!("lineage {}: {e}", p.display()))?
        }
        None => Lineage::default(),
    };
    let keys = opts
        .keys
        .iter()
        .map(|k| crate::keys::load_private(k))
        .collect::<anyhow::Result<Vec<SigningKey>>>()?;

    let gpu = match opts.prepare_gpu {
        Some(batch) => Some(
            fleetml_inference::external::inlined_bytes(onnx)
                .map_err(anyhow::Error::from)
                .and_then(|whole| Ok(prepare::prepare_gpu(&whole, &model.inputs, batch)?))
                .with_context(|| format!("preparing {} for the GPU", opts.model.display()))?,
        ),
        None => None,
    };
    let golden_inputs = match (&opts.golden, &opts.golden_inputs) {
        (Some(_), Some(_)) => bail!(
            "give --golden (CSV rows of named features) or --golden-inputs (.npz tensors), not both"
        ),
        (Some(path), None) => {
            let rows = read_csv(path, &schema, Some(opts.golden_rows))?;
            Some(schema.encode_batch(&model.inputs, &rows))
        }
        (None, Some(npz)) => Some(crate::golden::read_npz(npz, &model.inputs)?),
        (None, None) => None,
    };
    let golden = match golden_inputs {
        Some(inputs) => {
            let library = crate::golden::onnxruntime_library(opts.onnxruntime.as_deref());
            Some(crate::golden::compute(
                onnx,
                &model,
                inputs,
                &opts.backends,
                library.as_deref(),
                opts.allow_backend_disagreement,
            )?)
        }
        None => None,
    };
    let mut payloads: Vec<(String, Source)> =
        vec![(MODEL_ENTRY.into(), Source::Memory(model_bytes.clone()))];
    for (name, bytes) in &external {
        payloads.push((name.clone(), Source::Shared(bytes.clone())));
    }
    let gpu_report = gpu.as_ref().map(|g| g.report.clone());
    if let Some(prepared) = gpu {
        let report = serde_json::to_vec_pretty(&prepared.report)?;
        payloads.push((GPU_MODEL_ENTRY.into(), Source::Memory(prepared.onnx)));
        payloads.push((GPU_COMPAT_ENTRY.into(), Source::Memory(report)));
    }
    let mut notes = Vec::new();
    if let Some(path) = &opts.reference {
        let profile = monitoring_reference(opts, &schema, &model, path, &mut notes)?;
        payloads.push((REFERENCE_ENTRY.into(), Source::Memory(profile.to_cbor())));
    }
    let mut golden_check = None;
    if let Some((golden, check)) = golden {
        payloads.push((GOLDEN_ENTRY.into(), Source::Memory(golden.to_cbor())));
        // Recorded when it says more than "tract agrees with itself".
        if check.independent() || opts.golden_inputs.is_some() {
            payloads.push((
                crate::golden::CHECK_ENTRY.into(),
                Source::Memory(serde_json::to_vec_pretty(&check)?),
            ));
        }
        golden_check = Some(check);
    }
    for path in &opts.extra {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !valid_entry_name(&name) || payloads.iter().any(|(n, _)| *n == name) {
            bail!(
                "extra file `{name}` needs a plain, unique file name (letters, digits, `_`, `-`, `.`)"
            );
        }
        payloads.push((name, Source::File(path.clone())));
    }
    let entries = payloads
        .iter()
        .map(|(n, s)| entry_for(n, s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: opts.name.clone(),
        version: opts.version,
        label: opts.label.clone(),
        created_at: opts.created_at,
        entries,
        inputs: model.inputs.clone(),
        outputs: model.outputs.clone(),
        features: schema,
        targets: Targets {
            backends: opts.backends.clone(),
            boards: opts.boards.clone(),
        },
        min_agent_version: opts.min_agent_version.clone(),
        lineage,
        monitoring: opts.monitoring,
        serving: opts.serving,
    };
    manifest.validate().context("the bundle would be invalid")?;
    let manifest_bytes = manifest.to_canonical_cbor();
    let signatures: Vec<SignatureRecord> = keys
        .iter()
        .map(|k| SignatureRecord {
            key: k.id(),
            signature: k.sign(&manifest_bytes),
        })
        .collect();
    output::write_atomic(&opts.out, output::PUBLIC_FILE, |file| {
        let mut w = BufWriter::new(file);
        bundle::write(
            &mut w,
            &manifest_bytes,
            &signatures,
            &manifest,
            |name, out| match payloads.iter().find(|(n, _)| n == name).map(|(_, s)| s) {
                Some(Source::Memory(bytes)) => out.write_all(bytes),
                Some(Source::Shared(bytes)) => out.write_all(bytes),
                Some(Source::File(path)) => std::io::copy(&mut File::open(path)?, out).map(|_| ()),
                None => Err(std::io::Error::other(format!("no payload `{name}`"))),
            },
        )?;
        w.flush()?;
        Ok(())
    })?;
    let size = std::fs::metadata(&opts.out)?.len();
    Ok(Built {
        manifest,
        size,
        signed_by: signatures.iter().map(|s| s.key.to_string()).collect(),
        gpu_report,
        tract_error,
        golden_check,
        notes,
    })
}

/// The reference profile of `path`'s rows (the `--reference` CSV): the features' and
/// predictions' distributions, the multivariate model, the calibrated thresholds and,
/// with `--label-column`, the calibration map; what it says of itself goes to `notes`.
fn monitoring_reference(
    opts: &BuildOptions,
    schema: &FeatureSchema,
    model: &OnnxModel,
    path: &Path,
    notes: &mut Vec<String>,
) -> anyhow::Result<ReferenceProfile> {
    let rows = read_csv(path, schema, None)?;
    let outputs = scores(model, schema, &rows).context("computing reference predictions")?;
    let mut profile = ReferenceProfile::compute(schema, &rows, &outputs, opts.bins)?;
    let largest = opts
        .calibration
        .sizes
        .iter()
        .chain(&opts.monitoring.window_predictions)
        .copied()
        .max()
        .unwrap_or(0);
    if (rows.len() as u64) < u64::from(largest) * u64::from(REFERENCE_PER_WINDOW) {
        notes.push(format!(
            "monitoring: the reference has {} rows, fewer than {REFERENCE_PER_WINDOW} times the largest window ({largest}); a feature whose reference share is off by chance will false-alarm above --false-alarm-rate on windows that large (a reference of {} rows or more avoids it)",
            rows.len(),
            u64::from(largest) * u64::from(REFERENCE_PER_WINDOW)
        ));
    }
    profile.multivariate = crate::multivariate::fit(schema, &rows, opts.bins);
    let mut calibration = opts.calibration.clone();
    calibration.sizes.extend(opts.monitoring.window_predictions);
    let calibrated = crate::calibrate::calibrate(&profile, schema, &rows, &outputs, &calibration)
        .context("calibrating the drift thresholds")?;
    if let Some(column) = &opts.label_column {
        let source = opts.labelled.as_deref().unwrap_or(path);
        let labels = crate::performance::read_labels(source, column, None)?;
        let labelled = match &opts.labelled {
            Some(p) => Some(
                scores(model, schema, &read_csv(p, schema, None)?)
                    .context("computing predictions on the labelled rows")?,
            ),
            None => None,
        };
        let (_, columns, scores) = labelled
            .as_ref()
            .unwrap_or(&outputs)
            .first()
            .context("--label-column: the model has no output")?;
        profile.performance = Some(
            crate::performance::fit(
                column,
                *columns,
                scores,
                &labels,
                &calibration,
                &calibrated.sizes,
            )
            .context("checking the model's calibration on the labelled reference")?,
        );
    }
    profile.calibration = Some(calibrated);
    if let Some(m) = &profile.multivariate {
        notes.push(format!(
            "monitoring: multivariate drift over {} numeric features, {} principal components ({:.1}% of their variance)",
            m.features.len(),
            m.components.len(),
            m.explained * 100.0
        ));
    }
    if let Some(p) = &profile.performance {
        notes.push(format!(
            "monitoring: accuracy on the labelled rows {:.3}, calibration error of the raw scores {:.3}; the agent estimates each window's accuracy and alerts below {}",
            p.reference_accuracy,
            p.calibration_error,
            estimate_limits(p)
        ));
    }
    Ok(profile)
}

/// The model's outputs on `rows`, each as `(name, classes or columns, row-major values)`.
fn scores(
    model: &OnnxModel,
    schema: &FeatureSchema,
    rows: &[Vec<RawValue>],
) -> anyhow::Result<Vec<(String, usize, Vec<f32>)>> {
    Ok(model
        .run(&schema.encode_batch(&model.inputs, rows))?
        .into_iter()
        .map(|t| (t.name.clone(), last_axis(&t), t.data.to_f32()))
        .collect())
}

/// Largest external data file packed into a bundle.
const MAX_EXTERNAL: u64 = 16 << 30;

/// Reads the external data files `model` names (weights torch's exporter writes beside
/// the model) and renames them to the bundle entries they become: `model.onnx.data`, or
/// `model.onnx.data.1`, `.2`, … when there are several. A location must be a relative
/// path that stays inside the model's folder (symbolic links included); anything else
/// is refused, since it would read files the model's author did not ship with it.
fn pack_external_data(
    model: &Path,
    bytes: Vec<u8>,
) -> anyhow::Result<(Vec<u8>, fleetml_inference::ExternalFiles)> {
    let locations = fleetml_inference::external::locations(&bytes)
        .with_context(|| format!("model {}", model.display()))?;
    let mut files = fleetml_inference::ExternalFiles::new();
    if locations.is_empty() {
        return Ok((bytes, files));
    }
    let dir = model
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving the folder of {}", model.display()))?;
    let mut names = std::collections::BTreeMap::new();
    for (i, location) in locations.iter().enumerate() {
        let relative = Path::new(location);
        let plain = relative
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if location.is_empty() || !plain {
            bail!(
                "model {} names external data file `{location}`: external data must be a relative path inside the model's folder, without `..`",
                model.display()
            );
        }
        let path = dir.join(relative);
        let resolved = path.canonicalize().with_context(|| {
            format!(
                "model {} keeps weights in `{location}`, which is not at {}: copy it beside the model",
                model.display(),
                path.display()
            )
        })?;
        if !resolved.starts_with(&dir) {
            bail!(
                "model {} names external data file `{location}`, which resolves to {} outside the model's folder",
                model.display(),
                resolved.display()
            );
        }
        let data = output::read_bounded(&resolved, MAX_EXTERNAL, "external data")?;
        let name = if locations.len() == 1 {
            format!("{MODEL_ENTRY}.data")
        } else {
            format!("{MODEL_ENTRY}.data.{}", i + 1)
        };
        names.insert(location.clone(), name.clone());
        files.insert(name, data.into());
    }
    let relocated = fleetml_inference::external::relocate(&bytes, &names)?;
    fleetml_inference::external::check(fleetml_inference::Onnx {
        model: &relocated,
        external: &files,
    })
    .with_context(|| format!("model {}", model.display()))?;
    Ok((relocated, files))
}

/// Adds a signature by `key` to the bundle at `path`, in place (atomically).
/// Returns `false` if that key had already signed.
pub fn sign(path: &Path, key: &Path) -> anyhow::Result<(bool, String)> {
    let key = crate::keys::load_private(key)?;
    let front = read_front(path)?;
    let record = SignatureRecord {
        key: key.id(),
        signature: key.sign(&front.manifest_bytes),
    };
    if front.signatures.contains(&record) {
        return Ok((false, key.id().to_string()));
    }
    let mut changed = false;
    output::write_atomic(path, output::PUBLIC_FILE, |file| {
        let input = BufReader::new(
            File::open(path).with_context(|| format!("reading {}", path.display()))?,
        );
        let mut w = BufWriter::new(file);
        changed = bundle::add_signature(input, &mut w, record, &Limits::default())
            .with_context(|| format!("{} is not a valid bundle", path.display()))?;
        w.flush()?;
        Ok(())
    })?;
    Ok((changed, key.id().to_string()))
}

pub fn read_front(path: &Path) -> anyhow::Result<Unverified> {
    let f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    bundle::read_unverified(BufReader::new(f), &Limits::default())
        .with_context(|| format!("{}", path.display()))
}

pub fn verify(path: &Path, policy: &TrustPolicy) -> anyhow::Result<VerifiedBundle> {
    let f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    bundle::verify(
        BufReader::with_capacity(bundle::CHUNK, f),
        policy,
        &Limits::default(),
    )
    .with_context(|| format!("{} failed verification", path.display()))
}

/// One line for a verified bundle.
pub fn summary(v: &VerifiedBundle, threshold: Option<u32>) -> String {
    let m = &v.manifest;
    let label = if m.label.is_empty() {
        String::new()
    } else {
        format!(" ({})", m.label)
    };
    let keys: Vec<String> = v.signed_by.iter().map(|k| k.to_string()).collect();
    let need = threshold
        .map(|t| format!(" (threshold {t})"))
        .unwrap_or_default();
    format!(
        "verified {} v{}{label}: {} payloads, {}, signed by {}{need}, sha256 {}",
        m.name,
        m.version,
        m.entries.len(),
        human_size(v.size),
        keys.join(", "),
        v.digest
    )
}

/// `bundle inspect` as a JSON value.
pub fn inspect_json(front: &Unverified, file_size: u64) -> serde_json::Value {
    let mut manifest = serde_json::to_value(&front.manifest).unwrap_or(serde_json::Value::Null);
    if let Some(entries) = manifest.get_mut("entries").and_then(|e| e.as_array_mut()) {
        for (json, entry) in entries.iter_mut().zip(&front.manifest.entries) {
            json["sha256"] = serde_json::Value::String(entry.sha256.to_string());
        }
    }
    serde_json::json!({
        "manifest": manifest,
        "manifest_bytes": front.manifest_bytes.len(),
        "file_size": file_size,
        "signatures": front.signatures.iter().map(|s| s.key.to_string()).collect::<Vec<_>>(),
        "verified": false,
    })
}

/// The reference profile stored in the bundle at `path` (its bytes checked against the
/// manifest's digest; the signatures are not checked, as for the rest of `inspect`), or
/// `None` when the bundle has none.
pub fn stored_reference(
    path: &Path,
    front: &Unverified,
) -> anyhow::Result<Option<ReferenceProfile>> {
    let name = fleetml_protocol::manifest::REFERENCE_ENTRY;
    if front.manifest.entry(name).is_none() {
        return Ok(None);
    }
    let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let bytes = front
        .read_entry(&mut f, name, 64 << 20)
        .with_context(|| format!("{}: the reference profile", path.display()))?;
    Ok(Some(ReferenceProfile::from_cbor(&bytes)?))
}

/// The calibrated drift thresholds of a reference profile as a table: per feature and
/// window size, PSI / JS (/ chi-square p).
pub fn calibration_text(c: &fleetml_protocol::reference::Calibration) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "\nDrift thresholds, calibrated for a false-alarm rate of {} per window and feature ({} resampled windows per size)\n  {:<24}",
        c.false_alarm_rate, c.resamples, "FEATURE"
    );
    for size in &c.sizes {
        let _ = write!(s, " {:>26}", format!("{size} rows: PSI/JS/chi2 p"));
    }
    s.push('\n');
    for l in &c.limits {
        let _ = write!(s, "  {:<24}", l.name);
        for i in 0..c.sizes.len() {
            let cell = match l.chi2_p.get(i) {
                Some(p) => format!("{:.3}/{:.3}/{:.2e}", l.psi[i], l.js[i], p),
                None => format!("{:.3}/{:.3}", l.psi[i], l.js[i]),
            };
            let _ = write!(s, " {cell:>26}");
        }
        s.push('\n');
    }
    s
}

/// The estimated accuracy's limit per window size: `0.779 (1000 rows), …`.
fn estimate_limits(p: &fleetml_protocol::reference::Performance) -> String {
    p.sizes
        .iter()
        .zip(&p.lower)
        .map(|(n, l)| format!("{l:.3} ({n} rows)"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The multivariate and accuracy-estimation references of a profile, for `bundle
/// inspect` (empty when it has neither).
pub fn monitors_text(r: &ReferenceProfile) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if let Some(m) = &r.multivariate {
        let _ = writeln!(
            s,
            "\nMultivariate drift: {} principal components of {} numeric features explain {:.1}% of their variance; reconstruction error on the reference: mean {:.3}, largest {:.3} ({})",
            m.components.len(),
            m.features.len(),
            m.explained * 100.0,
            m.error.mean,
            m.error.max,
            m.features.join(", ")
        );
    }
    if let Some(p) = &r.performance {
        let _ = writeln!(
            s,
            "\nEstimated accuracy (labels from `{}`): accuracy on the labelled rows {:.3}, calibration error of the raw scores {:.3}; alerts below {}",
            p.label,
            p.reference_accuracy,
            p.calibration_error,
            estimate_limits(p)
        );
        let _ = writeln!(s, "  {:<16} {:>8} {:>6}", "CONFIDENCE", "ACCURACY", "ROWS");
        for (i, (a, n)) in p.accuracy.iter().zip(&p.counts).enumerate() {
            let range = match (
                i.checked_sub(1).and_then(|j| p.edges.get(j)),
                p.edges.get(i),
            ) {
                (None, Some(hi)) => format!("<= {hi:.3}"),
                (Some(lo), Some(hi)) => format!("({lo:.3}, {hi:.3}]"),
                (Some(lo), None) => format!("> {lo:.3}"),
                (None, None) => "all".into(),
            };
            let _ = writeln!(s, "  {range:<16} {a:>8.3} {n:>6}");
        }
    }
    s
}

/// `bundle inspect` as a human-readable report.
pub fn inspect_text(front: &Unverified, file_size: u64) -> String {
    use std::fmt::Write as _;
    let m = &front.manifest;
    let mut s = String::new();
    let created = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.created_at),
    );
    let any = |v: &[String]| {
        if v.is_empty() {
            "any".to_string()
        } else {
            v.join(", ")
        }
    };
    let _ = writeln!(
        s,
        "Bundle        {} v{}{}",
        m.name,
        m.version,
        if m.label.is_empty() {
            String::new()
        } else {
            format!(" ({})", m.label)
        }
    );
    let _ = writeln!(s, "Created       {created}");
    let _ = writeln!(
        s,
        "Size          {} (manifest {} B)",
        human_size(file_size),
        front.manifest_bytes.len()
    );
    let _ = writeln!(s, "Min agent     {}", m.min_agent_version);
    let _ = writeln!(s, "Backends      {}", any(&m.targets.backends));
    let _ = writeln!(s, "Boards        {}", any(&m.targets.boards));
    let _ = writeln!(s, "\nInputs");
    for t in &m.inputs {
        let _ = writeln!(s, "  {t}");
    }
    let _ = writeln!(s, "Outputs");
    for t in &m.outputs {
        let _ = writeln!(s, "  {t}");
    }
    let _ = writeln!(s, "\nPayloads");
    let _ = writeln!(s, "  {:<20} {:>12}  SHA-256", "NAME", "SIZE");
    for e in &m.entries {
        let _ = writeln!(
            s,
            "  {:<20} {:>12}  {}",
            e.name,
            human_size(e.size),
            e.sha256
        );
    }
    let _ = writeln!(s, "\nFeatures");
    let _ = writeln!(
        s,
        "  {:<24} {:<9} {:<8} {:<26} COLUMNS",
        "NAME", "TYPE", "UNIT", "VALID"
    );
    for f in &m.features.features {
        let kind = format!("{:?}", f.kind).to_lowercase();
        let valid = if f.values.is_empty() {
            let b = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
            format!("{}..{}", b(f.min), b(f.max))
        } else {
            let v = f.values.join("|");
            if v.len() > 26 {
                format!(
                    "{}…",
                    &v[..v.char_indices().nth(24).map_or(v.len(), |(i, _)| i)]
                )
            } else {
                v
            }
        };
        let cols = if f.width() == 1 {
            format!("{}[{}]", f.input, f.column)
        } else {
            format!("{}[{}..{}]", f.input, f.column, f.column + f.width())
        };
        let _ = writeln!(
            s,
            "  {:<24} {:<9} {:<8} {:<26} {}",
            f.name,
            kind,
            f.unit.as_deref().unwrap_or("-"),
            valid,
            cols
        );
    }
    let l = &m.lineage;
    let unknown = "unknown";
    let _ = writeln!(s, "\nLineage");
    let _ = writeln!(
        s,
        "  dataset          {}",
        l.dataset.as_ref().map_or(unknown.to_string(), |d| format!(
            "{} (sha256 {})",
            d.uri,
            d.sha256.as_deref().unwrap_or(unknown)
        ))
    );
    let _ = writeln!(
        s,
        "  code             {}",
        l.code.as_ref().map_or(unknown.to_string(), |c| format!(
            "{} @ {}",
            c.repository,
            c.commit.as_deref().unwrap_or(unknown)
        ))
    );
    let _ = writeln!(
        s,
        "  framework        {}",
        l.framework
            .as_ref()
            .map_or(unknown.to_string(), |f| format!(
                "{} {}",
                f.name,
                f.version.as_deref().unwrap_or("")
            ))
            .trim_end()
    );
    let _ = writeln!(
        s,
        "  dependencies     {}",
        l.dependencies_lock_sha256
            .as_deref()
            .map_or(unknown.to_string(), |d| format!("lockfile sha256 {d}"))
    );
    let _ = writeln!(
        s,
        "  container        {}",
        l.container_image.as_deref().unwrap_or(unknown)
    );
    let _ = writeln!(
        s,
        "  cuda/cudnn/drv   {} / {} / {}",
        l.cuda_version.as_deref().unwrap_or(unknown),
        l.cudnn_version.as_deref().unwrap_or(unknown),
        l.driver_version.as_deref().unwrap_or(unknown)
    );
    let _ = writeln!(
        s,
        "  seed             {}",
        l.seed.map_or(unknown.to_string(), |v| v.to_string())
    );
    let _ = writeln!(
        s,
        "  training device  {}",
        l.training_device.as_deref().unwrap_or(unknown)
    );
    if l.hyperparameters.is_empty() {
        let _ = writeln!(s, "  hyperparameters  {unknown}");
    } else {
        let params: Vec<String> = l
            .hyperparameters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(s, "  hyperparameters  {}", params.join(" "));
    }
    let _ = writeln!(
        s,
        "\nSignatures (not checked here; run `fleetctl bundle verify --trust`)"
    );
    if front.signatures.is_empty() {
        let _ = writeln!(s, "  none");
    }
    for sig in &front.signatures {
        let _ = writeln!(s, "  ed25519 key {}", sig.key);
    }
    s
}
