//! The multivariate reference, fitted when a bundle is built: a principal-component model
//! of the standardized numeric features and the distribution of the reference rows'
//! reconstruction error under it (see `fleetml_monitor::multivariate` for what the agent
//! does with it).
//!
//! Components are kept, largest variance first, until they explain [`VARIANCE_KEPT`] of
//! the standardized variance (NannyML's default for the same method), at most
//! [`MAX_COMPONENTS`] and always at least one fewer than the features: the dropped
//! directions are where a change in how features move together shows. The
//! eigen-decomposition is the cyclic Jacobi method on the correlation matrix (at most 48
//! × 48 here; exact to rounding, no dependency).

use fleetml_protocol::features::{FeatureSchema, FeatureType, RawValue};
use fleetml_protocol::reference::{MAX_COMPONENTS, Multivariate, numeric_profile};

/// Share of the standardized variance the kept components explain.
pub const VARIANCE_KEPT: f64 = 0.65;

// Matrix arithmetic reads as the textbook writes it: with indices.
/// The multivariate reference of `rows` (raw values in schema order), binned like the
/// features (`bins`); `None` with fewer than two numeric features that vary.
#[allow(clippy::needless_range_loop)]
pub fn fit(schema: &FeatureSchema, rows: &[Vec<RawValue>], bins: u32) -> Option<Multivariate> {
    let mut columns = Vec::new();
    for (i, f) in schema.features.iter().enumerate() {
        if !matches!(f.kind, FeatureType::Float | FeatureType::Int) {
            continue;
        }
        let values: Vec<f64> = rows
            .iter()
            .filter_map(|r| match r.get(i) {
                Some(RawValue::Number(x)) if x.is_finite() => Some(*x),
                _ => None,
            })
            .collect();
        if values.len() < 2 {
            continue;
        }
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / values.len() as f64;
        if var > 0.0 && var.is_finite() {
            columns.push((i, f.name.clone(), mean, var.sqrt()));
        }
    }
    let d = columns.len();
    if d < 2 || rows.len() < 2 {
        return None;
    }
    // Standardized rows (a missing value at the mean: 0), and their correlation matrix.
    let z: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|(i, _, mean, std)| match r.get(*i) {
                    Some(RawValue::Number(x)) if x.is_finite() => (x - mean) / std,
                    _ => 0.0,
                })
                .collect()
        })
        .collect();
    let mut c = vec![vec![0.0; d]; d];
    for row in &z {
        for a in 0..d {
            for b in a..d {
                c[a][b] += row[a] * row[b];
            }
        }
    }
    let n = rows.len() as f64;
    for a in 0..d {
        for b in a..d {
            c[a][b] /= n;
            c[b][a] = c[a][b];
        }
    }
    let (values, vectors) = jacobi(c);
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|a, b| values[*b].total_cmp(&values[*a]));
    let total: f64 = values.iter().map(|v| v.max(0.0)).sum();
    let most = MAX_COMPONENTS.min(d - 1);
    let mut kept = Vec::new();
    let mut explained = 0.0;
    for &j in &order {
        if kept.len() == most || (total > 0.0 && explained / total >= VARIANCE_KEPT) {
            break;
        }
        explained += values[j].max(0.0);
        kept.push((0..d).map(|i| vectors[i][j]).collect::<Vec<f64>>());
    }
    let mut m = Multivariate {
        features: columns.iter().map(|c| c.1.clone()).collect(),
        means: columns.iter().map(|c| c.2).collect(),
        stds: columns.iter().map(|c| c.3).collect(),
        components: kept,
        explained: if total > 0.0 { explained / total } else { 0.0 },
        error: numeric_profile(vec![0.0], 1)?,
    };
    // The error of each reference row, computed by the monitor's own code.
    let names: Vec<&str> = schema.features.iter().map(|f| f.name.as_str()).collect();
    let (pca, _) = fleetml_monitor::profile::multivariate(&m, &names, None).ok()?;
    let errors: Vec<f64> = rows
        .iter()
        .filter_map(|r| pca.error(&fleetml_monitor::profile::observations(schema, r)))
        .collect();
    m.error = numeric_profile(errors, bins)?;
    Some(m)
}

/// Eigenvalues and eigenvectors (as columns) of the symmetric matrix `a`, by cyclic
/// Jacobi rotations until the off-diagonal mass is negligible.
#[allow(clippy::needless_range_loop)]
fn jacobi(mut a: Vec<Vec<f64>>) -> (Vec<f64>, Vec<Vec<f64>>) {
    let d = a.len();
    let mut v = vec![vec![0.0; d]; d];
    for (i, row) in v.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    let scale: f64 = a
        .iter()
        .flatten()
        .map(|x| x * x)
        .sum::<f64>()
        .max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|p| (0..d).filter(move |q| *q != p).map(move |q| (p, q)))
            .map(|(p, q)| a[p][q] * a[p][q])
            .sum();
        if off <= 1e-24 * scale {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                if a[p][q].abs() < f64::MIN_POSITIVE {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
                for row in v.iter_mut() {
                    let (vkp, vkq) = (row[p], row[q]);
                    row[p] = c * vkp - s * vkq;
                    row[q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i][i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_diagonalizes_a_symmetric_matrix() {
        let a = vec![
            vec![4.0, 1.0, 0.5],
            vec![1.0, 3.0, 0.2],
            vec![0.5, 0.2, 1.0],
        ];
        let (values, vectors) = jacobi(a.clone());
        for j in 0..3 {
            // A v = λ v, |v| = 1.
            let norm: f64 = (0..3).map(|i| vectors[i][j] * vectors[i][j]).sum();
            assert!((norm - 1.0).abs() < 1e-12);
            for i in 0..3 {
                let av: f64 = (0..3).map(|k| a[i][k] * vectors[k][j]).sum();
                assert!((av - values[j] * vectors[i][j]).abs() < 1e-10, "{values:?}");
            }
        }
        let trace: f64 = values.iter().sum();
        assert!((trace - 8.0).abs() < 1e-12);
    }
}
