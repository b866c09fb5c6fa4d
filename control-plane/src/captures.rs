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
use serde_json::Value;

pub use crate::records::CaptureRecord;
use crate::store::{CaptureStore, StoreError};

/// Largest batch accepted.
pub const MAX_BATCH: usize = 16 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaptureError {
    #[error("batch {seq} of device {device} is already stored with other contents")]
    Conflict { device: String, seq: u64 },
    #[error("{0}")]
    Invalid(String),
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
        })
    }

    pub fn path(&self, r: &CaptureRecord) -> PathBuf {
        self.dir
            .join(r.device.as_str())
            .join(format!("{:020}.jsonl", r.seq))
    }

    /// Stores a batch once.
    pub fn store(
        &self,
        device: &DeviceId,
        seq: u64,
        model: &str,
        kind: &str,
        body: &[u8],
        now_ms: u64,
    ) -> Result<Stored, CaptureError> {
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
        Ok(self
            .store
            .captures()?
            .into_iter()
            .filter(|r| {
                model.is_none_or(|m| m == r.model) && device.is_none_or(|d| d == r.device.as_str())
            })
            .collect())
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
}
