//! Data capture and ground truth: samples of what a model saw and predicted, kept on
//! disk under a hard byte budget and uploaded to the control plane in batches, where
//! they become training data; and `POST /v1/feedback`, which attaches a label to a
//! recent prediction (captured preferentially, and counted in the window's live
//! accuracy or MAE).
//!
//! ```toml
//! capture_max_bytes = 67108864        # all batches on disk together (default 64 MiB)
//! capture_upload_interval_s = 60
//!
//! [[capture]]
//! model = "claims"                    # or "*"
//! sample_rate = 0.05                  # share of predicted rows sampled (default 0: off)
//! reservoir = 500                     # rows kept per batch: a uniform sample (Algorithm R)
//! flush_s = 60                        # a batch closes after this long (or when full of labels)
//! features = ["claim_amount", "region"]   # only these inputs are kept (allow-list)
//! ```
//!
//! Nothing here blocks a prediction: the request path takes one short lock to sample
//! into memory; files are written by a background thread and uploaded by a task that
//! retries while the control plane is unreachable. Batches are numbered by a sequence
//! kept on disk; the control plane stores each `(device, seq)` once, so a batch sent
//! again after a cut connection never duplicates rows. When the budget is reached the
//! oldest sampled batch goes first; labelled batches are dropped only when nothing
//! else is left.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetml_protocol::features::RawValue;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::monitoring::{Outcome, PredictionKind};

/// Predictions remembered for feedback (by id).
pub const RECENT: usize = 10_000;
/// Labelled rows buffered per model before they are written out.
const LABELLED_BUFFER: usize = 5_000;

/// One `[[capture]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// The model name, or `*` for every model.
    pub model: String,
    #[serde(default)]
    pub sample_rate: f64,
    #[serde(default = "default_reservoir")]
    pub reservoir: usize,
    #[serde(default = "default_flush")]
    pub flush_s: u64,
    /// Input features kept in captured rows; none unless listed.
    #[serde(default)]
    pub features: Vec<String>,
}

fn default_reservoir() -> usize {
    500
}

fn default_flush() -> u64 {
    60
}

/// Capture settings of the agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub models: Vec<CaptureConfig>,
    pub max_bytes: u64,
    pub upload_interval: Duration,
}

impl Settings {
    pub fn validate(&self) -> Result<(), String> {
        for c in &self.models {
            if !(0.0..=1.0).contains(&c.sample_rate) {
                return Err(format!(
                    "[[capture]] {}: sample_rate {} is not between 0 and 1",
                    c.model, c.sample_rate
                ));
            }
            if c.reservoir == 0 || c.reservoir > 1_000_000 {
                return Err(format!(
                    "[[capture]] {}: reservoir must be 1..=1000000 rows",
                    c.model
                ));
            }
        }
        if self.max_bytes < 4096 {
            return Err("capture_max_bytes must be at least 4096".into());
        }
        Ok(())
    }

    fn config_of(&self, model: &str) -> Option<&CaptureConfig> {
        self.models
            .iter()
            .find(|c| c.model == model)
            .or_else(|| self.models.iter().find(|c| c.model == "*"))
    }
}

/// A prediction remembered for feedback.
#[derive(Debug, Clone)]
struct Recent {
    model: String,
    version: u64,
    ts_ms: u64,
    /// Allowed features (empty when the model is not captured).
    features: serde_json::Map<String, Value>,
    prediction: Vec<f32>,
    kind: Option<PredictionKind>,
}

/// Rows of one model waiting to be written.
#[derive(Debug, Default)]
struct Buffer {
    sampled: Vec<Value>,
    /// Rows sampled since the last flush (for Algorithm R).
    seen: u64,
    labelled: Vec<Value>,
    opened_ms: u64,
}

#[derive(Debug)]
struct Inner {
    buffers: HashMap<String, Buffer>,
    recent: HashMap<String, Recent>,
    order: VecDeque<String>,
    rng: u64,
}

/// A batch file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub seq: u64,
    pub model: String,
    pub labelled: bool,
    pub bytes: u64,
    pub path: PathBuf,
}

/// The capture of one agent.
#[derive(Debug)]
pub struct Capture {
    settings: Settings,
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Batches on disk, oldest first, and the next sequence number.
    files: Mutex<(Vec<Batch>, u64)>,
}

/// What `POST /v1/feedback` did.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub model: String,
    pub version: u64,
    pub outcome: Outcome,
    pub captured: bool,
}

fn now_ms() -> u64 {
    crate::clock::now_ms()
}

fn raw_json(v: &RawValue) -> Value {
    match v {
        RawValue::Missing => Value::Null,
        RawValue::Number(n) => json!(n),
        RawValue::Text(t) => json!(t),
    }
}

impl Capture {
    /// Opens `DATA_DIR/capture` (mode 0700), indexing the batches left from before.
    pub fn open(data_dir: &Path, settings: Settings) -> Result<Arc<Capture>, String> {
        settings.validate()?;
        let dir = data_dir.join("capture");
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let mut batches = Vec::new();
        for entry in std::fs::read_dir(&dir)
            .map_err(|e| e.to_string())?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            if let Some(b) = parse_name(&name, entry.path()) {
                batches.push(Batch {
                    bytes: entry.metadata().map(|m| m.len()).unwrap_or(0),
                    ..b
                });
            }
        }
        batches.sort_by_key(|b| b.seq);
        let kept = std::fs::read_to_string(dir.join("next_seq"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(1);
        let next = kept.max(batches.last().map_or(1, |b| b.seq + 1));
        let seed = {
            use ring::rand::SecureRandom;
            let mut b = [0u8; 8];
            let _ = ring::rand::SystemRandom::new().fill(&mut b);
            u64::from_le_bytes(b) | 1
        };
        Ok(Arc::new(Capture {
            settings,
            dir,
            inner: Mutex::new(Inner {
                buffers: HashMap::new(),
                recent: HashMap::new(),
                order: VecDeque::new(),
                rng: seed,
            }),
            files: Mutex::new((batches, next)),
        }))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers predicted rows: remembers those with ids for feedback and samples them
    /// into the model's reservoir. `features` names the schema's columns.
    #[allow(clippy::too_many_arguments)]
    pub fn offer(
        &self,
        model: &str,
        version: u64,
        kind: Option<PredictionKind>,
        features: &[String],
        rows: &[Vec<RawValue>],
        outputs: &[Vec<f32>],
        ids: &[String],
    ) {
        let config = self.settings.config_of(model);
        let now = now_ms();
        let allowed = |row: &[RawValue]| -> serde_json::Map<String, Value> {
            match config {
                Some(c) => features
                    .iter()
                    .zip(row)
                    .filter(|(name, _)| c.features.iter().any(|f| f == *name))
                    .map(|(name, v)| (name.clone(), raw_json(v)))
                    .collect(),
                None => serde_json::Map::new(),
            }
        };
        let mut inner = self.lock();
        for (r, output) in outputs.iter().enumerate() {
            let row = rows.get(r).map(Vec::as_slice).unwrap_or(&[]);
            let id = ids.get(r).cloned();
            if let Some(id) = &id {
                let recent = Recent {
                    model: model.to_string(),
                    version,
                    ts_ms: now,
                    features: allowed(row),
                    prediction: output.clone(),
                    kind,
                };
                if inner.recent.insert(id.clone(), recent).is_none() {
                    inner.order.push_back(id.clone());
                }
                while inner.order.len() > RECENT {
                    if let Some(old) = inner.order.pop_front() {
                        inner.recent.remove(&old);
                    }
                }
            }
            let Some(c) = config.filter(|c| c.sample_rate > 0.0) else {
                continue;
            };
            if next_f64(&mut inner.rng) >= c.sample_rate {
                continue;
            }
            let record = json!({
                "ts_ms": now, "model": model, "version": version, "id": id,
                "features": Value::Object(allowed(row)), "prediction": output,
            });
            let slot = next_u64(&mut inner.rng);
            let buffer = inner.buffers.entry(model.to_string()).or_default();
            if buffer.opened_ms == 0 {
                buffer.opened_ms = now;
            }
            buffer.seen += 1;
            if buffer.sampled.len() < c.reservoir {
                buffer.sampled.push(record);
            } else {
                // Algorithm R: keep each of the `seen` rows with probability k/seen.
                let j = slot % buffer.seen;
                if (j as usize) < c.reservoir {
                    buffer.sampled[j as usize] = record;
                }
            }
        }
    }

    /// Attaches `label` to the prediction with this id.
    pub fn feedback(&self, id: &str, label: &Value) -> Result<Feedback, FeedbackError> {
        let mut inner = self.lock();
        let recent = inner
            .recent
            .get(id)
            .cloned()
            .ok_or_else(|| FeedbackError::Unknown(id.to_string()))?;
        let classes = match recent.kind {
            Some(PredictionKind::Classes) => true,
            Some(PredictionKind::Score) => false,
            None => recent.prediction.len() > 1,
        };
        let number = match label {
            Value::Number(n) => n.as_f64(),
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .ok_or(FeedbackError::BadLabel)?;
        let outcome = if classes {
            let predicted = recent
                .prediction
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as f64);
            Outcome::Classified {
                correct: predicted == Some(number),
            }
        } else {
            Outcome::Scored {
                abs_error: (recent.prediction.first().copied().unwrap_or(0.0) as f64 - number)
                    .abs(),
            }
        };
        let captured = self.settings.config_of(&recent.model).is_some();
        if captured {
            let now = now_ms();
            let buffer = inner.buffers.entry(recent.model.clone()).or_default();
            if buffer.opened_ms == 0 {
                buffer.opened_ms = now;
            }
            if buffer.labelled.len() < LABELLED_BUFFER {
                buffer.labelled.push(json!({
                    "ts_ms": recent.ts_ms, "model": recent.model, "version": recent.version,
                    "id": id, "features": Value::Object(recent.features.clone()),
                    "prediction": recent.prediction, "label": label, "labelled_ms": now,
                }));
            } else {
                metrics::counter!("fleetml_agent_capture_dropped_rows_total", "reason" => "labelled_buffer_full").increment(1);
            }
        }
        // One label per prediction.
        inner.recent.remove(id);
        Ok(Feedback {
            model: recent.model,
            version: recent.version,
            outcome,
            captured,
        })
    }

    /// Writes the batches that are due (or all, when `all`); enforces the byte budget.
    pub fn flush(&self, all: bool) {
        let now = now_ms();
        let due: Vec<(String, Vec<Value>, bool)> = {
            let mut inner = self.lock();
            let mut out = Vec::new();
            for (model, b) in inner.buffers.iter_mut() {
                let flush_ms = self
                    .settings
                    .config_of(model)
                    .map_or(60_000, |c| c.flush_s.saturating_mul(1000));
                let old = b.opened_ms > 0 && now.saturating_sub(b.opened_ms) >= flush_ms;
                if all || old || b.labelled.len() >= LABELLED_BUFFER / 2 {
                    if !b.labelled.is_empty() {
                        out.push((model.clone(), std::mem::take(&mut b.labelled), true));
                    }
                    if !b.sampled.is_empty() {
                        out.push((model.clone(), std::mem::take(&mut b.sampled), false));
                    }
                    b.seen = 0;
                    b.opened_ms = 0;
                }
            }
            out
        };
        for (model, rows, labelled) in due {
            if let Err(e) = self.write(&model, &rows, labelled) {
                tracing::warn!(model = %model, error = %e, "could not write a capture batch; its rows are lost");
                metrics::counter!("fleetml_agent_capture_dropped_rows_total", "reason" => "write_failed").increment(rows.len() as u64);
            }
        }
    }

    fn write(&self, model: &str, rows: &[Value], labelled: bool) -> std::io::Result<()> {
        let mut text = Vec::new();
        for r in rows {
            serde_json::to_writer(&mut text, r)?;
            text.push(b'\n');
        }
        let size = text.len() as u64;
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if size > self.settings.max_bytes {
            metrics::counter!("fleetml_agent_capture_dropped_rows_total", "reason" => "budget")
                .increment(rows.len() as u64);
            return Ok(());
        }
        // Make room: the oldest sampled batches first, labelled ones last.
        let mut total: u64 = files.0.iter().map(|b| b.bytes).sum();
        while total + size > self.settings.max_bytes {
            let victim = files
                .0
                .iter()
                .position(|b| !b.labelled)
                .or_else(|| (!files.0.is_empty()).then_some(0));
            let Some(i) = victim else { break };
            let b = files.0.remove(i);
            let _ = std::fs::remove_file(&b.path);
            total -= b.bytes;
            let lost = count_lines(&b.path).unwrap_or(0);
            metrics::counter!("fleetml_agent_capture_dropped_rows_total", "reason" => "budget")
                .increment(lost);
            tracing::info!(
                batch = b.seq,
                "capture budget reached: dropped the oldest batch"
            );
        }
        if total + size > self.settings.max_bytes {
            metrics::counter!("fleetml_agent_capture_dropped_rows_total", "reason" => "budget")
                .increment(rows.len() as u64);
            return Ok(());
        }
        let seq = files.1;
        files.1 += 1;
        crate::files::keep_file(&self.dir.join("next_seq"), files.1.to_string().as_bytes())?;
        let name = format!(
            "{seq:020}-{}-{model}.jsonl",
            if labelled { "labelled" } else { "sampled" }
        );
        let path = self.dir.join(name);
        crate::files::keep_file(&path, &text)?;
        files.0.push(Batch {
            seq,
            model: model.to_string(),
            labelled,
            bytes: size,
            path,
        });
        metrics::counter!("fleetml_agent_capture_rows_total", "model" => model.to_string(), "kind" => if labelled { "labelled" } else { "sampled" }).increment(rows.len() as u64);
        metrics::gauge!("fleetml_agent_capture_bytes").set((total + size) as f64);
        Ok(())
    }

    /// Batches on disk, oldest first.
    pub fn batches(&self) -> Vec<Batch> {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Forgets an uploaded batch and deletes its file.
    pub fn uploaded(&self, seq: u64) {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = files.0.iter().position(|b| b.seq == seq) {
            let b = files.0.remove(i);
            let _ = std::fs::remove_file(&b.path);
        }
        let total: u64 = files.0.iter().map(|b| b.bytes).sum();
        metrics::gauge!("fleetml_agent_capture_bytes").set(total as f64);
    }

    /// Writes due batches every second on a thread of its own.
    pub fn start_flusher(self: &Arc<Self>) {
        let me = self.clone();
        std::thread::Builder::new()
            .name("capture-flush".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    me.flush(false);
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!(error = %e, "capture flusher did not start"));
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FeedbackError {
    #[error(
        "no recent prediction has id `{0}` (the agent remembers the last {RECENT} predictions that carried an `id`, or the `request_id` of one-row requests)"
    )]
    Unknown(String),
    #[error(
        "`label` must be a number (class index or target value), a boolean, or a numeric string"
    )]
    BadLabel,
}

fn parse_name(name: &str, path: PathBuf) -> Option<Batch> {
    let stem = name.strip_suffix(".jsonl")?;
    let (seq, rest) = stem.split_once('-')?;
    let (kind, model) = rest.split_once('-')?;
    Some(Batch {
        seq: seq.parse().ok()?,
        model: model.to_string(),
        labelled: kind == "labelled",
        bytes: 0,
        path,
    })
}

fn count_lines(path: &Path) -> std::io::Result<u64> {
    Ok(std::fs::read(path)?.iter().filter(|b| **b == b'\n').count() as u64)
}

fn next_u64(state: &mut u64) -> u64 {
    // xorshift64*: sampling needs speed, not secrecy (seeded from the system RNG).
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn next_f64(state: &mut u64) -> f64 {
    (next_u64(state) >> 11) as f64 / (1u64 << 53) as f64
}

/// Uploads batches to the control plane, oldest first; retries with back-off while it
/// cannot be reached. A batch is deleted only once the control plane has stored it.
pub async fn upload_loop(
    capture: Arc<Capture>,
    server: crate::http::HttpUrl,
    roots: crate::http::Roots,
    device: fleetml_protocol::telemetry::DeviceId,
    token: String,
) {
    let mut failures = 0u32;
    loop {
        let wait = if failures == 0 {
            capture.settings.upload_interval
        } else {
            Duration::from_millis((500u64 << failures.min(6)).min(60_000))
        };
        tokio::time::sleep(wait).await;
        for batch in capture.batches() {
            let body = match tokio::fs::read(&batch.path).await {
                Ok(b) => b,
                Err(_) => {
                    capture.uploaded(batch.seq);
                    continue;
                }
            };
            let path = format!(
                "/v1/devices/{}/captures?seq={}&model={}&kind={}",
                device.as_str(),
                batch.seq,
                batch.model,
                if batch.labelled {
                    "labelled"
                } else {
                    "sampled"
                }
            );
            match crate::http::post(&server, &roots, &token, &path, "application/x-ndjson", body)
                .await
            {
                Ok((status, _)) if (200..300).contains(&status) => {
                    failures = 0;
                    capture.uploaded(batch.seq);
                    metrics::counter!("fleetml_agent_capture_uploaded_batches_total").increment(1);
                }
                Ok((status, body))
                    if (400..500).contains(&status) && status != 401 && status != 429 =>
                {
                    // Refused for good (malformed, conflicting): keeping it would block
                    // every later batch.
                    tracing::error!(batch = batch.seq, status, reason = %String::from_utf8_lossy(&body), "the control plane refused a capture batch; dropped");
                    capture.uploaded(batch.seq);
                }
                Ok((status, _)) => {
                    failures = failures.saturating_add(1);
                    tracing::debug!(status, "capture upload failed; retrying");
                    break;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::debug!(error = %e, "capture upload failed; retrying");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(rate: f64, max_bytes: u64) -> Settings {
        Settings {
            models: vec![CaptureConfig {
                model: "m".into(),
                sample_rate: rate,
                reservoir: 10,
                flush_s: 3600,
                features: vec!["a".into()],
            }],
            max_bytes,
            upload_interval: Duration::from_secs(60),
        }
    }

    fn offer(c: &Capture, n: usize, first_id: usize) {
        let names = vec!["a".to_string(), "secret".to_string()];
        for i in 0..n {
            c.offer(
                "m",
                1,
                Some(PredictionKind::Classes),
                &names,
                &[vec![
                    RawValue::Number(i as f64),
                    RawValue::Text("pii".into()),
                ]],
                &[vec![0.2, 0.8]],
                &[format!("id-{}", first_id + i)],
            );
        }
    }

    #[test]
    fn the_reservoir_holds_a_bounded_sample_of_allowed_features_only() {
        let dir = tempfile::tempdir().expect("test");
        let c = Capture::open(dir.path(), settings(1.0, 1 << 20)).expect("test");
        offer(&c, 1000, 0);
        c.flush(true);
        let batches = c.batches();
        assert_eq!(batches.len(), 1);
        let text = std::fs::read_to_string(&batches[0].path).expect("test");
        assert_eq!(text.lines().count(), 10);
        assert!(!text.contains("secret") && !text.contains("pii"), "{text}");
        assert!(text.contains("\"a\":"));
    }

    #[test]
    fn feedback_scores_the_prediction_and_is_captured_first_when_the_budget_is_tight() {
        let dir = tempfile::tempdir().expect("test");
        let c = Capture::open(dir.path(), settings(1.0, 4096)).expect("test");
        offer(&c, 5, 0);
        let f = c.feedback("id-1", &json!(1)).expect("test");
        assert_eq!(f.outcome, Outcome::Classified { correct: true });
        assert_eq!(
            c.feedback("id-1", &json!(0)),
            Err(FeedbackError::Unknown("id-1".into()))
        );
        assert_eq!(
            c.feedback("id-2", &json!(0)).expect("test").outcome,
            Outcome::Classified { correct: false }
        );
        assert_eq!(c.feedback("id-3", &json!({})), Err(FeedbackError::BadLabel));
        c.flush(true);
        for round in 0..50 {
            offer(&c, 20, 100 + round * 20);
            c.flush(true);
            let total: u64 = c.batches().iter().map(|b| b.bytes).sum();
            assert!(total <= 4096, "{total}");
        }
        assert!(c.batches().iter().any(|b| b.labelled), "labelled rows kept");
    }
}
