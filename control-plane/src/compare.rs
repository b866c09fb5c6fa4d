//! Champion/challenger: two registered bundles evaluated on the same labelled dataset
//! with the runtime the agents use (`fleetml-inference`, tract on the CPU) after the
//! same feature encoding: accuracy and ROC AUC (classifiers) or MAE (scores), per slice
//! by board and tag where the dataset says which device a row came from, and latency.

use std::collections::BTreeMap;
use std::path::Path;

use fleetml_inference::CpuModel;
use fleetml_protocol::features::RawValue;
use fleetml_protocol::manifest::MODEL_ENTRY;
use fleetml_protocol::trust::TrustPolicy;
use serde_json::{Value, json};

use crate::datasets::{Column, Table};
use crate::records::DeviceRecord;

/// Rows per inference batch.
const BATCH: usize = 256;
/// Rows timed one at a time for the latency quantiles.
const TIMED_ROWS: usize = 200;
/// Least rows a slice needs to be reported.
const SLICE_ROWS: usize = 20;

/// Predictions of one bundle on a table: per row, the first output's values.
#[derive(Debug)]
pub struct Scored {
    pub outputs: Vec<Vec<f32>>,
    pub latency_us: (f64, f64),
}

fn raw(col: &Column, row: usize) -> RawValue {
    match col {
        Column::Number(v) => v[row].map_or(RawValue::Missing, RawValue::Number),
        Column::Text(v) => v[row].clone().map_or(RawValue::Missing, RawValue::Text),
    }
}

/// Runs the bundle at `path` (verified against `policy`) on every row of `table`.
pub fn score(path: &Path, policy: &TrustPolicy, table: &Table) -> Result<Scored, String> {
    let verified = crate::bundle::verify(path, policy).map_err(|e| format!("{e:#}"))?;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let (onnx, external) = fleetml_inference::external::read_from_bundle(
        &verified,
        &mut file,
        MODEL_ENTRY,
        2 << 30,
        16 << 30,
    )?;
    let m = &verified.manifest;
    if m.features.is_empty() {
        return Err(format!(
            "{} v{} has no feature schema: it cannot be evaluated on named columns",
            m.name, m.version
        ));
    }
    let columns: Vec<Option<&Column>> = m
        .features
        .features
        .iter()
        .map(|f| table.column(&f.name))
        .collect();
    if let Some(missing) = m
        .features
        .features
        .iter()
        .zip(&columns)
        .find(|(_, c)| c.is_none())
    {
        return Err(format!(
            "the dataset has no column `{}`, a feature of {} v{}",
            missing.0.name, m.name, m.version
        ));
    }
    let onnx = fleetml_inference::Onnx {
        model: &onnx,
        external: &external,
    };
    let model = CpuModel::load_with_inputs(onnx, &m.inputs).map_err(|e| e.to_string())?;
    let rows: Vec<Vec<RawValue>> = (0..table.rows())
        .map(|r| {
            columns
                .iter()
                .map(|c| c.map_or(RawValue::Missing, |c| raw(c, r)))
                .collect()
        })
        .collect();
    let mut outputs = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(BATCH) {
        let inputs = m.features.encode_batch(&m.inputs, chunk);
        let out = model.run(&inputs).map_err(|e| e.to_string())?;
        let first = out.first().ok_or("the model has no output")?;
        let first = first.data.to_f32();
        let per_row = first.len() / chunk.len().max(1);
        outputs.extend(first.chunks(per_row.max(1)).map(<[f32]>::to_vec));
    }
    let mut times: Vec<f64> = Vec::new();
    for row in rows.iter().take(TIMED_ROWS) {
        let inputs = m
            .features
            .encode_batch(&m.inputs, std::slice::from_ref(row));
        let started = std::time::Instant::now();
        model.run(&inputs).map_err(|e| e.to_string())?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let p = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Scored {
        outputs,
        latency_us: (p(0.5), p(0.99)),
    })
}

/// Accuracy and AUC (classes) or MAE (scores) of predictions against labels.
fn metrics(outputs: &[&Vec<f32>], labels: &[f64]) -> Value {
    let classes = outputs.first().is_some_and(|o| o.len() > 1);
    if classes {
        let correct = outputs
            .iter()
            .zip(labels)
            .filter(|(o, y)| {
                o.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i as f64)
                    == Some(**y)
            })
            .count();
        let binary = outputs.first().is_some_and(|o| o.len() == 2);
        let auc = binary.then(|| {
            let scores: Vec<f64> = outputs.iter().map(|o| o[1] as f64).collect();
            let positives: Vec<bool> = labels.iter().map(|y| *y == 1.0).collect();
            auc(&scores, &positives)
        });
        json!({ "rows": labels.len(), "accuracy": correct as f64 / labels.len().max(1) as f64, "auc": auc })
    } else {
        let mae = outputs
            .iter()
            .zip(labels)
            .map(|(o, y)| (o.first().copied().unwrap_or(0.0) as f64 - y).abs())
            .sum::<f64>()
            / labels.len().max(1) as f64;
        json!({ "rows": labels.len(), "mae": mae })
    }
}

/// ROC AUC, ties counted half.
pub fn auc(scores: &[f64], positives: &[bool]) -> f64 {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]));
    let (mut rank_sum, mut pos) = (0.0, 0.0);
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if positives[k] {
                rank_sum += rank;
                pos += 1.0;
            }
        }
        i = j + 1;
    }
    let neg = scores.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        0.5
    } else {
        (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
    }
}

/// The numeric labels of `label` (1/0, true/false, numbers); rows without one are
/// left out (their indexes are the returned keep list).
fn labels(table: &Table, label: &str) -> Result<(Vec<usize>, Vec<f64>), String> {
    let col = table
        .column(label)
        .ok_or_else(|| format!("the dataset has no label column `{label}` (--label)"))?;
    let mut keep = Vec::new();
    let mut ys = Vec::new();
    for r in 0..table.rows() {
        let y = match col {
            Column::Number(v) => v[r],
            Column::Text(v) => v[r].as_deref().and_then(|s| match s {
                "true" | "yes" => Some(1.0),
                "false" | "no" => Some(0.0),
                other => other.parse().ok(),
            }),
        };
        if let Some(y) = y {
            keep.push(r);
            ys.push(y);
        }
    }
    if ys.is_empty() {
        return Err(format!("no row has a label in `{label}`"));
    }
    Ok((keep, ys))
}

/// The evaluation of one bundle: overall, per slice, latency.
pub fn evaluate(
    scored: &Scored,
    table: &Table,
    label: &str,
    devices: &BTreeMap<String, DeviceRecord>,
) -> Result<Value, String> {
    let (keep, ys) = labels(table, label)?;
    let outs: Vec<&Vec<f32>> = keep.iter().map(|r| &scored.outputs[*r]).collect();
    let overall = metrics(&outs, &ys);
    let mut slices = BTreeMap::new();
    if let Some(Column::Text(device)) = table.column("device") {
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, r) in keep.iter().enumerate() {
            let Some(d) = device[*r].as_deref().and_then(|d| devices.get(d)) else {
                continue;
            };
            if let Some(b) = &d.board {
                groups.entry(format!("board={b}")).or_default().push(i);
            }
            for (k, v) in &d.tags {
                groups.entry(format!("{k}={v}")).or_default().push(i);
            }
        }
        for (slice, idx) in groups {
            if idx.len() >= SLICE_ROWS {
                let o: Vec<&Vec<f32>> = idx.iter().map(|i| outs[*i]).collect();
                let y: Vec<f64> = idx.iter().map(|i| ys[*i]).collect();
                slices.insert(slice, metrics(&o, &y));
            }
        }
    }
    Ok(json!({
        "overall": overall,
        "slices": slices,
        "latency_us": { "p50": scored.latency_us.0, "p99": scored.latency_us.1 },
    }))
}

/// The metric that decides, and whether higher is better, for an evaluation.
pub fn deciding(eval: &Value) -> (&'static str, bool) {
    if eval["overall"]["auc"].is_number() {
        ("auc", true)
    } else if eval["overall"]["accuracy"].is_number() {
        ("accuracy", true)
    } else {
        ("mae", false)
    }
}

/// `a` and `b` side by side, and which wins by at least `margin` on the deciding metric.
pub fn verdict(a: &Value, b: &Value, margin: f64) -> Value {
    let (metric, higher) = deciding(a);
    let (va, vb) = (
        a["overall"][metric].as_f64().unwrap_or(f64::NAN),
        b["overall"][metric].as_f64().unwrap_or(f64::NAN),
    );
    let gain = if higher { vb - va } else { va - vb };
    let winner = if gain > margin {
        "b"
    } else if -gain > margin {
        "a"
    } else {
        "tie"
    };
    json!({ "metric": metric, "a": va, "b": vb, "gain_of_b": gain, "margin": margin, "winner": winner })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_a_perfect_and_a_useless_ranking() {
        assert_eq!(auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), 1.0);
        assert_eq!(auc(&[0.5, 0.5, 0.5, 0.5], &[false, true, false, true]), 0.5);
        let a = json!({"overall": {"auc": 0.70, "accuracy": 0.6}});
        let b = json!({"overall": {"auc": 0.80, "accuracy": 0.6}});
        assert_eq!(verdict(&a, &b, 0.05)["winner"], "b");
        assert_eq!(verdict(&a, &b, 0.2)["winner"], "tie");
        assert_eq!(verdict(&b, &a, 0.05)["winner"], "a");
    }
}
