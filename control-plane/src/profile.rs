//! `fleetctl data profile`: the exploration a data scientist asks for first — each
//! column's distribution and missingness, its association with the target, and its
//! drift against a bundle's reference profile — as JSON (the API), a table and a
//! self-contained HTML report with inline SVG charts (the CLI renders both).
//!
//! Association with the target: Pearson correlation for two numeric columns; the
//! correlation ratio η (how much of the numeric side's variance the categories explain,
//! 0..1) between text and numbers; Cramér's V between two text columns. Drift: the
//! population stability index of the column over the reference's bins (numbers) or
//! categories (text), with the same 1e-4 floor for empty bins as the agent's monitor.

use std::collections::BTreeMap;

use fleetml_protocol::reference::{FeatureProfile, ReferenceProfile};
use serde_json::{Value, json};

use crate::datasets::{Column, Table};

const HISTOGRAM_BINS: usize = 10;
const TOP_VALUES: usize = 10;
const EPSILON: f64 = 1e-4;

fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64))
}

fn pearson(pairs: &[(f64, f64)]) -> Option<f64> {
    let n = pairs.len() as f64;
    if pairs.len() < 3 {
        return None;
    }
    let (mx, my) = (
        pairs.iter().map(|p| p.0).sum::<f64>() / n,
        pairs.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in pairs {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// η: sqrt(between-group variance / total variance) of `values` grouped by `groups`.
fn correlation_ratio(pairs: &[(&str, f64)]) -> Option<f64> {
    if pairs.len() < 3 {
        return None;
    }
    let n = pairs.len() as f64;
    let mean = pairs.iter().map(|p| p.1).sum::<f64>() / n;
    let mut groups: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (g, v) in pairs {
        let e = groups.entry(g).or_default();
        e.0 += v;
        e.1 += 1.0;
    }
    let between: f64 = groups
        .values()
        .map(|(sum, count)| count * (sum / count - mean).powi(2))
        .sum();
    let total: f64 = pairs.iter().map(|p| (p.1 - mean).powi(2)).sum();
    (total > 0.0).then(|| (between / total).sqrt())
}

fn cramers_v(pairs: &[(&str, &str)]) -> Option<f64> {
    if pairs.len() < 3 {
        return None;
    }
    let n = pairs.len() as f64;
    let mut joint: BTreeMap<(&str, &str), f64> = BTreeMap::new();
    let mut rows: BTreeMap<&str, f64> = BTreeMap::new();
    let mut cols: BTreeMap<&str, f64> = BTreeMap::new();
    for (a, b) in pairs {
        *joint.entry((a, b)).or_default() += 1.0;
        *rows.entry(a).or_default() += 1.0;
        *cols.entry(b).or_default() += 1.0;
    }
    let mut chi2 = 0.0;
    for (a, ra) in &rows {
        for (b, cb) in &cols {
            let expected = ra * cb / n;
            let observed = joint.get(&(*a, *b)).copied().unwrap_or(0.0);
            chi2 += (observed - expected).powi(2) / expected;
        }
    }
    let k = (rows.len().min(cols.len()) as f64) - 1.0;
    (k > 0.0).then(|| (chi2 / (n * k)).sqrt())
}

fn psi(actual: &[f64], expected: &[f64]) -> f64 {
    let (sa, se) = (actual.iter().sum::<f64>(), expected.iter().sum::<f64>());
    if sa == 0.0 || se == 0.0 {
        return 0.0;
    }
    actual
        .iter()
        .zip(expected)
        .map(|(a, e)| {
            let (a, e) = ((a / sa).max(EPSILON), (e / se).max(EPSILON));
            (a - e) * (a / e).ln()
        })
        .sum()
}

fn drift(column: &Column, reference: &FeatureProfile) -> Option<f64> {
    match (column, &reference.numeric, &reference.categorical) {
        (Column::Number(v), Some(num), _) => {
            let mut counts = vec![0.0; num.counts.len()];
            for x in v.iter().flatten() {
                let bin = num
                    .edges
                    .partition_point(|e| e <= x)
                    .min(counts.len().saturating_sub(1));
                if let Some(c) = counts.get_mut(bin) {
                    *c += 1.0;
                }
            }
            let expected: Vec<f64> = num.counts.iter().map(|c| *c as f64).collect();
            Some(psi(&counts, &expected))
        }
        (Column::Text(v), _, Some(cat)) => {
            let mut counts = vec![0.0; cat.values.len() + 1];
            for s in v.iter().flatten() {
                let i = cat
                    .values
                    .iter()
                    .position(|c| c == s)
                    .unwrap_or(cat.values.len());
                counts[i] += 1.0;
            }
            let mut expected: Vec<f64> = cat.counts.iter().map(|c| *c as f64).collect();
            expected.push(cat.other as f64);
            Some(psi(&counts, &expected))
        }
        _ => None,
    }
}

/// The profile of `table`: one entry per column (the target's association left out).
pub fn profile(
    table: &Table,
    target: Option<&str>,
    reference: Option<&ReferenceProfile>,
) -> Result<Value, String> {
    let target_col = match target {
        Some(t) => Some(
            table
                .column(t)
                .ok_or_else(|| format!("--target: no column `{t}`"))?,
        ),
        None => None,
    };
    let rows = table.rows();
    let mut columns = Vec::new();
    for (name, col) in &table.columns {
        let missing = (0..rows).filter(|r| col.is_missing(*r)).count();
        let mut entry = json!({
            "name": name,
            "missing": missing,
            "missing_rate": if rows > 0 { missing as f64 / rows as f64 } else { 0.0 },
        });
        match col {
            Column::Number(v) => {
                let mut xs: Vec<f64> = v.iter().flatten().copied().collect();
                xs.sort_by(f64::total_cmp);
                let n = xs.len() as f64;
                let mean = (n > 0.0).then(|| xs.iter().sum::<f64>() / n);
                let std =
                    mean.map(|m| (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt());
                let (lo, hi) = (xs.first().copied(), xs.last().copied());
                let mut histogram = vec![0u64; HISTOGRAM_BINS];
                let mut edges = Vec::new();
                if let (Some(lo), Some(hi)) = (lo, hi) {
                    let width = ((hi - lo) / HISTOGRAM_BINS as f64).max(f64::MIN_POSITIVE);
                    edges = (0..=HISTOGRAM_BINS)
                        .map(|i| lo + width * i as f64)
                        .collect();
                    for x in &xs {
                        let b = (((x - lo) / width) as usize).min(HISTOGRAM_BINS - 1);
                        histogram[b] += 1;
                    }
                }
                entry["kind"] = json!("number");
                entry["min"] = json!(lo);
                entry["max"] = json!(hi);
                entry["mean"] = json!(mean);
                entry["std"] = json!(std);
                entry["p05"] = json!(quantile(&xs, 0.05));
                entry["p50"] = json!(quantile(&xs, 0.5));
                entry["p95"] = json!(quantile(&xs, 0.95));
                entry["histogram"] = json!({ "edges": edges, "counts": histogram });
            }
            Column::Text(v) => {
                let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
                for s in v.iter().flatten() {
                    *counts.entry(s.as_str()).or_default() += 1;
                }
                let mut top: Vec<(&str, u64)> = counts.iter().map(|(k, c)| (*k, *c)).collect();
                top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
                entry["kind"] = json!("text");
                entry["distinct"] = json!(counts.len());
                entry["top"] = json!(
                    top.iter()
                        .take(TOP_VALUES)
                        .map(|(v, c)| json!({"value": v, "count": c}))
                        .collect::<Vec<_>>()
                );
            }
        }
        if let (Some(t), Some(tname)) = (target_col, target)
            && tname != name
        {
            let (method, value) = association(col, t, rows);
            entry["target_association"] = json!({ "method": method, "value": value });
        }
        if let Some(r) = reference
            && let Some(f) = r.features.iter().find(|f| &f.name == name)
        {
            entry["psi"] = json!(drift(col, f));
        }
        columns.push(entry);
    }
    Ok(json!({ "rows": rows, "target": target, "columns": columns }))
}

fn association(col: &Column, target: &Column, rows: usize) -> (&'static str, Option<f64>) {
    match (col, target) {
        (Column::Number(a), Column::Number(b)) => {
            let pairs: Vec<(f64, f64)> = (0..rows).filter_map(|r| Some((a[r]?, b[r]?))).collect();
            ("pearson", pearson(&pairs))
        }
        (Column::Text(a), Column::Number(b)) => {
            let pairs: Vec<(&str, f64)> = (0..rows)
                .filter_map(|r| Some((a[r].as_deref()?, b[r]?)))
                .collect();
            ("correlation_ratio", correlation_ratio(&pairs))
        }
        (Column::Number(a), Column::Text(b)) => {
            let pairs: Vec<(&str, f64)> = (0..rows)
                .filter_map(|r| Some((b[r].as_deref()?, a[r]?)))
                .collect();
            ("correlation_ratio", correlation_ratio(&pairs))
        }
        (Column::Text(a), Column::Text(b)) => {
            let pairs: Vec<(&str, &str)> = (0..rows)
                .filter_map(|r| Some((a[r].as_deref()?, b[r].as_deref()?)))
                .collect();
            ("cramers_v", cramers_v(&pairs))
        }
    }
}

fn num(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |f| {
        if f.abs() >= 1000.0 || f.fract() == 0.0 {
            format!("{f:.0}")
        } else {
            format!("{f:.3}")
        }
    })
}

/// The profile as a table, columns most associated with the target first.
pub fn table(p: &Value) -> String {
    let mut cols = p["columns"].as_array().cloned().unwrap_or_default();
    cols.sort_by(|a, b| {
        let k = |v: &Value| {
            -v["target_association"]["value"]
                .as_f64()
                .map_or(-1.0, f64::abs)
        };
        k(a).total_cmp(&k(b))
    });
    let mut out = format!(
        "{} rows{}\n\n{:<28} {:<6} {:>8} {:>10} {:>10} {:>10} {:>10} {:>9} {:>7}\n",
        p["rows"],
        p["target"]
            .as_str()
            .map(|t| format!(", target `{t}`"))
            .unwrap_or_default(),
        "COLUMN",
        "KIND",
        "MISSING",
        "MIN",
        "MEAN",
        "MAX",
        "DISTINCT",
        "TARGET",
        "PSI"
    );
    for c in cols {
        out.push_str(&format!(
            "{:<28} {:<6} {:>7.1}% {:>10} {:>10} {:>10} {:>10} {:>9} {:>7}\n",
            c["name"].as_str().unwrap_or("?"),
            c["kind"].as_str().unwrap_or("?"),
            c["missing_rate"].as_f64().unwrap_or(0.0) * 100.0,
            num(&c["min"]),
            num(&c["mean"]),
            num(&c["max"]),
            c["distinct"].as_u64().map_or("-".into(), |d| d.to_string()),
            c["target_association"]["value"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:+.3}")),
            c["psi"].as_f64().map_or("-".into(), |v| format!("{v:.3}")),
        ));
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Bars as an inline SVG.
fn bars(labels: &[String], counts: &[f64]) -> String {
    let max = counts.iter().copied().fold(0.0, f64::max).max(1.0);
    let (w, h, bw) = (320.0, 120.0, 320.0 / counts.len().max(1) as f64);
    let mut svg = format!("<svg width=\"{w}\" height=\"{}\" role=\"img\">", h + 30.0);
    for (i, c) in counts.iter().enumerate() {
        let bh = c / max * h;
        svg.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4a7ab8\"><title>{}: {}</title></rect>",
            i as f64 * bw + 1.0,
            h - bh,
            (bw - 2.0).max(1.0),
            bh,
            escape(labels.get(i).map(String::as_str).unwrap_or("")),
            c
        ));
    }
    if let (Some(first), Some(last)) = (labels.first(), labels.last()) {
        svg.push_str(&format!(
            "<text x=\"0\" y=\"{}\" font-size=\"10\">{}</text><text x=\"{w}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{}</text>",
            h + 14.0,
            escape(first),
            h + 14.0,
            escape(last)
        ));
    }
    svg.push_str("</svg>");
    svg
}

/// A self-contained HTML report (no scripts, no external files).
pub fn html(p: &Value, title: &str) -> String {
    let mut out = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#eee}}td:first-child{{text-align:left}}.col{{display:inline-block;margin:1em;vertical-align:top}}</style></head><body><h1>{t}</h1><p>{rows} rows{target}</p><pre>{table}</pre>",
        t = escape(title),
        rows = p["rows"],
        target = p["target"]
            .as_str()
            .map(|t| format!(", target <b>{}</b>", escape(t)))
            .unwrap_or_default(),
        table = escape(&table(p)),
    );
    for c in p["columns"].as_array().cloned().unwrap_or_default() {
        let name = c["name"].as_str().unwrap_or("?");
        let (labels, counts): (Vec<String>, Vec<f64>) = if c["kind"] == "number" {
            let edges = c["histogram"]["edges"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let counts = c["histogram"]["counts"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            (
                edges.iter().take(counts.len()).map(num).collect(),
                counts.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
            )
        } else {
            let top = c["top"].as_array().cloned().unwrap_or_default();
            (
                top.iter()
                    .map(|t| t["value"].as_str().unwrap_or("").to_string())
                    .collect(),
                top.iter()
                    .map(|t| t["count"].as_f64().unwrap_or(0.0))
                    .collect(),
            )
        };
        out.push_str(&format!(
            "<div class=\"col\"><h3>{}</h3>{}<p>missing {:.1}%{}{}</p></div>",
            escape(name),
            bars(&labels, &counts),
            c["missing_rate"].as_f64().unwrap_or(0.0) * 100.0,
            c["target_association"]["value"]
                .as_f64()
                .map(|v| format!(
                    ", target {} {v:+.3}",
                    c["target_association"]["method"].as_str().unwrap_or("")
                ))
                .unwrap_or_default(),
            c["psi"]
                .as_f64()
                .map(|v| format!(", PSI {v:.3}"))
                .unwrap_or_default(),
        ));
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn associations_follow_the_column_kinds_and_catch_a_perfect_predictor() {
        let csv = b"x,noise,group,y\n1,5,a,0\n2,3,a,0\n3,9,b,1\n4,1,b,1\n5,4,b,1\n";
        let t = Table::from_csv(csv).expect("test");
        let p = profile(&t, Some("y"), None).expect("test");
        let cols = p["columns"].as_array().expect("test");
        let by = |n: &str| cols.iter().find(|c| c["name"] == n).expect("test").clone();
        assert_eq!(by("x")["target_association"]["method"], "pearson");
        assert!(
            by("x")["target_association"]["value"]
                .as_f64()
                .expect("test")
                > 0.8
        );
        assert_eq!(
            by("group")["target_association"]["method"],
            "correlation_ratio"
        );
        assert!(
            (by("group")["target_association"]["value"]
                .as_f64()
                .expect("test")
                - 1.0)
                .abs()
                < 1e-9
        );
        assert!(by("y").get("target_association").is_none());
        assert!(profile(&t, Some("nope"), None).is_err());
        let page = html(&p, "test");
        assert!(page.contains("<svg") && page.contains("group") && !page.contains("<script"));
    }
}
