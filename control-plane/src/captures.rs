//! Captured data from devices: batches of sampled (and labelled) predictions that agents
//! upload (`POST /v1/devices/{id}/captures`), kept as files in
//! `DATA_DIR/captures/<device>/<seq>.jsonl` and indexed in a [`CaptureStore`].
//!
//! A batch is identified by `(device, seq)`; the same batch sent again (the agent did
//! not see the answer before a cut) is acknowledged without storing anything twice, and
//! other bytes under a stored `(device, seq)` are refused. Every line is checked before
//! anything is kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetml_protocol::crypto::sha256;
use fleetml_protocol::telemetry::DeviceId;
use serde_json::{Value, json};

use crate::datasets::{Provenance, Table};
pub use crate::records::CaptureRecord;
use crate::refusal::Refusal;
use crate::store::{CaptureStore, StoreError};

/// Largest batch accepted.
pub const MAX_BATCH: usize = 16 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaptureError {
    #[error("batch {seq} of device {device} is already stored with other contents")]
    Conflict { device: String, seq: u64 },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "device {device} keeps {kept} bytes of captures, and this batch would take it past its quota of {quota} (fleetctl serve --capture-quota)"
    )]
    Quota {
        device: String,
        kept: u64,
        quota: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Stored (`true`) or already there (`false`).
pub type Stored = (bool, CaptureRecord);

/// Captured batches: their records in a [`CaptureStore`], their rows in files.
#[derive(Clone)]
pub struct Captures {
    store: Arc<dyn CaptureStore>,
    dir: PathBuf,
    /// Bytes of captures kept per device (none: no limit).
    quota: u64,
}

impl std::fmt::Debug for Captures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Captures")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Checks every line of a batch: a JSON object of `model` with a `features` object.
/// Returns rows, first and last `ts_ms`.
pub fn check_batch(model: &str, body: &[u8]) -> Result<(u64, u64, u64), String> {
    let text = std::str::from_utf8(body).map_err(|_| "the batch is not UTF-8 text".to_string())?;
    let (mut rows, mut first, mut last) = (0u64, u64::MAX, 0u64);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("line {}: not JSON: {e}", i + 1))?;
        if v["model"].as_str() != Some(model) {
            return Err(format!("line {}: `model` is not `{model}`", i + 1));
        }
        if !v["features"].is_object() {
            return Err(format!("line {}: `features` is not an object", i + 1));
        }
        let ts = v["ts_ms"].as_u64().unwrap_or(0);
        first = first.min(ts);
        last = last.max(ts);
        rows += 1;
    }
    if rows == 0 {
        return Err("the batch has no rows".into());
    }
    Ok((rows, first, last))
}

impl Captures {
    /// Records in `store`, batch files under `dir` (created if missing).
    pub fn open(store: Arc<dyn CaptureStore>, dir: &Path) -> Result<Captures, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::unavailable(dir.display(), e))?;
        Ok(Captures {
            store,
            dir: dir.to_path_buf(),
            quota: u64::MAX,
        })
    }

    /// The same captures, keeping at most `quota` bytes per device.
    pub fn with_quota(self, quota: u64) -> Captures {
        Captures { quota, ..self }
    }

    pub fn path(&self, r: &CaptureRecord) -> PathBuf {
        self.dir
            .join(r.device.as_str())
            .join(format!("{:020}.jsonl", r.seq))
    }

    /// Stores a batch once; a new batch that would take the device's captures past its
    /// quota ([`Captures::with_quota`]) is refused (the same batch again is still
    /// acknowledged).
    pub fn store(
        &self,
        device: &DeviceId,
        seq: u64,
        model: &str,
        kind: &str,
        body: &[u8],
        now_ms: u64,
    ) -> Result<Stored, CaptureError> {
        let quota = self.quota;
        if !matches!(kind, "sampled" | "labelled") {
            return Err(CaptureError::Invalid(format!(
                "kind `{kind}` is not sampled or labelled"
            )));
        }
        let digest = sha256(body).to_string();
        if let Some(old) = self.store.capture(device, seq)? {
            return if old.sha256 == digest {
                Ok((false, old))
            } else {
                Err(CaptureError::Conflict {
                    device: device.as_str().into(),
                    seq,
                })
            };
        }
        let kept: u64 = self
            .store
            .device_captures(device)?
            .iter()
            .map(|r| r.bytes)
            .sum();
        if kept + body.len() as u64 > quota {
            return Err(CaptureError::Quota {
                device: device.as_str().into(),
                kept,
                quota,
            });
        }
        let (rows, first_ts_ms, last_ts_ms) =
            check_batch(model, body).map_err(CaptureError::Invalid)?;
        let record = CaptureRecord {
            device: device.clone(),
            seq,
            model: model.into(),
            kind: kind.into(),
            rows,
            bytes: body.len() as u64,
            sha256: digest,
            received_ms: now_ms,
            first_ts_ms,
            last_ts_ms,
        };
        let path = self.path(&record);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::unavailable(parent.display(), e))?;
        }
        crate::output::write_atomic(&path, 0o600, |f| {
            use std::io::Write;
            f.write_all(body)?;
            Ok(())
        })
        .map_err(|e| StoreError::unavailable(path.display(), format_args!("{e:#}")))?;
        match self.store.put_capture(&record)? {
            None => Ok((true, record)),
            // A concurrent upload of the same batch stored it first.
            Some(old) if old.sha256 == record.sha256 => Ok((false, old)),
            Some(_) => Err(CaptureError::Conflict {
                device: device.as_str().into(),
                seq,
            }),
        }
    }

    /// Batches, optionally of one model and one device, in (device, seq) order.
    pub fn list(
        &self,
        model: Option<&str>,
        device: Option<&str>,
    ) -> Result<Vec<CaptureRecord>, StoreError> {
        let records = match device.map(DeviceId::new) {
            Some(Ok(d)) => self.store.device_captures(&d)?,
            // Not a device id: no device has it.
            Some(Err(_)) => Vec::new(),
            None => self.store.captures()?,
        };
        Ok(records
            .into_iter()
            .filter(|r| model.is_none_or(|m| m == r.model))
            .collect())
    }
}

/// Which captured rows make a dataset: the body of `POST /v1/datasets/from-captures`,
/// and what a training job with `[captures]` asks for.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromCaptures {
    model: String,
    /// Only rows captured at or after this time.
    #[serde(default)]
    since_ms: Option<u64>,
    /// Only rows that got a ground-truth label.
    #[serde(default)]
    labelled_only: bool,
    /// Name of the label column (default `label`): the training target.
    #[serde(default)]
    label_column: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

impl FromCaptures {
    pub fn new(
        model: &str,
        since_ms: Option<u64>,
        labelled_only: bool,
        label_column: Option<String>,
    ) -> FromCaptures {
        FromCaptures {
            model: model.into(),
            since_ms,
            labelled_only,
            label_column,
            name: None,
        }
    }
}

/// Rows of captured batches as flat records: the captured features, `predicted` (the
/// class index or score), the label, `device` and `ts_ms`.
impl Captures {
    pub fn table(&self, req: &FromCaptures) -> Result<(Table, Provenance), Refusal> {
        let label = req.label_column.clone().unwrap_or_else(|| "label".into());
        let mut objects = Vec::new();
        let mut devices = std::collections::BTreeSet::new();
        let (mut first, mut last) = (u64::MAX, 0u64);
        let mut batches = 0;
        for r in self.list(Some(&req.model), None)? {
            if req.labelled_only && r.kind != "labelled" {
                continue;
            }
            if req.since_ms.is_some_and(|s| r.last_ts_ms < s) {
                continue;
            }
            let text = std::fs::read_to_string(self.path(&r)).map_err(Refusal::internal)?;
            batches += 1;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line).map_err(Refusal::internal)?;
                let ts = v["ts_ms"].as_u64().unwrap_or(0);
                if req.since_ms.is_some_and(|s| ts < s) {
                    continue;
                }
                if req.labelled_only && v.get("label").is_none_or(Value::is_null) {
                    continue;
                }
                let mut o = v["features"].as_object().cloned().unwrap_or_default();
                let prediction: Vec<f64> = v["prediction"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default();
                let predicted = if prediction.len() > 1 {
                    prediction
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(i, _)| i as f64)
                } else {
                    prediction.first().copied()
                };
                o.insert("predicted".into(), json!(predicted));
                o.insert(
                    label.clone(),
                    v.get("label").cloned().unwrap_or(Value::Null),
                );
                o.insert("device".into(), json!(r.device));
                o.insert("ts_ms".into(), json!(ts));
                devices.insert(r.device.as_str().to_string());
                first = first.min(ts);
                last = last.max(ts);
                objects.push(o);
            }
        }
        if objects.is_empty() {
            return Err(Refusal::unprocessable(format!(
                "no captured rows of `{}` match (labelled only: {}, since: {:?}); enable [[capture]] on the devices",
                req.model, req.labelled_only, req.since_ms
            )));
        }
        let table = Table::from_objects(&objects).map_err(Refusal::unprocessable)?;
        let mut filters = Vec::new();
        if req.labelled_only {
            filters.push("labelled_only".into());
        }
        if let Some(s) = req.since_ms {
            filters.push(format!("since_ms({s})"));
        }
        Ok((
            table,
            Provenance {
                name: req
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("captures of {}", req.model)),
                sources: vec![format!("captures: {} ({batches} batches)", req.model)],
                devices: devices.into_iter().collect(),
                time_range: Some((first, last)),
                filters,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_stored_once_and_other_bytes_under_its_number_are_refused() {
        let dir = tempfile::tempdir().expect("test");
        let store = crate::store::memory::MemoryStore::new();
        let c = Captures::open(Arc::new(store), &dir.path().join("captures")).expect("test");
        let d = DeviceId::new("pi-1").expect("test");
        let body = b"{\"model\":\"m\",\"ts_ms\":5,\"features\":{\"a\":1}}\n{\"model\":\"m\",\"ts_ms\":9,\"features\":{}}\n";
        let (new, r) = c.store(&d, 1, "m", "sampled", body, 100).expect("test");
        assert!(new);
        assert_eq!((r.rows, r.first_ts_ms, r.last_ts_ms), (2, 5, 9));
        let (again, _) = c.store(&d, 1, "m", "sampled", body, 200).expect("test");
        assert!(!again);
        assert!(matches!(
            c.store(
                &d,
                1,
                "m",
                "sampled",
                b"{\"model\":\"m\",\"features\":{}}\n",
                300
            ),
            Err(CaptureError::Conflict { .. })
        ));
        assert!(matches!(
            c.store(&d, 2, "other", "sampled", body, 300),
            Err(CaptureError::Invalid(_))
        ));
        assert!(matches!(
            c.store(&d, 3, "m", "sampled", b"not json\n", 300),
            Err(CaptureError::Invalid(_))
        ));
        assert_eq!(c.list(Some("m"), None).expect("test").len(), 1);
        assert_eq!(std::fs::read(c.path(&r)).expect("test"), body);
    }

    /// A device's captures stop at its quota; the same batch again is still answered.
    #[test]
    fn a_device_past_its_quota_is_refused_new_batches_but_not_a_resend() {
        let dir = tempfile::tempdir().expect("test");
        let store = crate::store::memory::MemoryStore::new();
        let d = DeviceId::new("pi-1").expect("test");
        let body = b"{\"model\":\"m\",\"ts_ms\":5,\"features\":{\"a\":1}}\n";
        let quota = body.len() as u64 + 10;
        let c = Captures::open(Arc::new(store), &dir.path().join("captures"))
            .expect("test")
            .with_quota(quota);
        assert!(c.store(&d, 1, "m", "sampled", body, 1).expect("test").0);
        assert!(!c.store(&d, 1, "m", "sampled", body, 2).expect("test").0);
        let e = c
            .store(&d, 2, "m", "sampled", body, 3)
            .expect_err("past the quota");
        assert!(matches!(e, CaptureError::Quota { .. }), "{e}");
        assert!(e.to_string().contains("--capture-quota"), "{e}");
        let other = DeviceId::new("pi-2").expect("test");
        assert!(c.store(&other, 1, "m", "sampled", body, 4).expect("test").0);
    }
}
