//! Training: standardize, then a 25-16-2 multilayer perceptron fitted by mini-batch SGD
//! with momentum on the cross-entropy loss. f64 throughout, fixed operation order.

use fleetml_protocol::features::FeatureSchema;

use crate::COLUMNS;
use crate::data::{Claim, Generator};
use crate::detmath::exp;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub hidden: usize,
    pub epochs: usize,
    pub batch: usize,
    pub learning_rate: f64,
    pub momentum: f64,
    pub l2: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hidden: 16,
            epochs: 30,
            batch: 32,
            learning_rate: 0.05,
            momentum: 0.9,
            l2: 1e-4,
        }
    }
}

/// A trained model: standardization and weights, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    /// `[COLUMNS][hidden]`
    pub w1: Vec<f64>,
    pub b1: Vec<f64>,
    /// `[hidden][2]`
    pub w2: Vec<f64>,
    pub b2: Vec<f64>,
    pub hidden: usize,
}

/// Encodes claims into input rows with the schema (the same encoding the agent uses).
pub fn encode(schema: &FeatureSchema, claims: &[Claim]) -> Vec<[f64; COLUMNS]> {
    claims
        .iter()
        .map(|c| {
            let mut row = [0f32; COLUMNS];
            schema.encode_row(crate::INPUT, &c.values, &mut row);
            row.map(f64::from)
        })
        .collect()
}

impl Model {
    /// P(investigate) for one encoded row.
    pub fn predict(&self, row: &[f64; COLUMNS]) -> f64 {
        let mut h = vec![0.0; self.hidden];
        let x: Vec<f64> = (0..COLUMNS)
            .map(|j| (row[j] - self.mean[j]) / self.std[j])
            .collect();
        self.hidden_layer(&x, &mut h);
        let (l0, l1) = self.logits(&h);
        softmax2(l0, l1).1
    }

    fn hidden_layer(&self, x: &[f64], h: &mut [f64]) {
        for (k, hk) in h.iter_mut().enumerate() {
            let mut s = self.b1[k];
            for (j, xj) in x.iter().enumerate() {
                s += xj * self.w1[j * self.hidden + k];
            }
            *hk = if s > 0.0 { s } else { 0.0 };
        }
    }

    fn logits(&self, h: &[f64]) -> (f64, f64) {
        let mut l0 = self.b2[0];
        let mut l1 = self.b2[1];
        for (k, hk) in h.iter().enumerate() {
            l0 += hk * self.w2[k * 2];
            l1 += hk * self.w2[k * 2 + 1];
        }
        (l0, l1)
    }
}

fn softmax2(l0: f64, l1: f64) -> (f64, f64) {
    let m = if l0 > l1 { l0 } else { l1 };
    let e0 = exp(l0 - m);
    let e1 = exp(l1 - m);
    (e0 / (e0 + e1), e1 / (e0 + e1))
}

/// Fits the model to `rows` and `labels`. `seed` drives initialization and shuffling.
pub fn train(rows: &[[f64; COLUMNS]], labels: &[bool], config: &Config, seed: u64) -> Model {
    let n = rows.len();
    let hidden = config.hidden;
    let mut mean = vec![0.0; COLUMNS];
    let mut std = vec![1.0; COLUMNS];
    for j in 0..crate::schema()
        .features
        .iter()
        .filter(|f| f.is_numeric())
        .count()
    {
        let m = rows.iter().map(|r| r[j]).sum::<f64>() / n as f64;
        let v = rows.iter().map(|r| (r[j] - m) * (r[j] - m)).sum::<f64>() / n as f64;
        mean[j] = m;
        std[j] = if v > 0.0 { v.sqrt() } else { 1.0 };
    }
    let xs: Vec<Vec<f64>> = rows
        .iter()
        .map(|r| (0..COLUMNS).map(|j| (r[j] - mean[j]) / std[j]).collect())
        .collect();

    let mut rng = Generator::new(seed, 0x0074_7261_696e);
    let init = |rng: &mut Generator, fan_in: usize, fan_out: usize, len: usize| -> Vec<f64> {
        let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
        (0..len)
            .map(|_| (rng.uniform() * 2.0 - 1.0) * limit)
            .collect()
    };
    let mut model = Model {
        w1: init(&mut rng, COLUMNS, hidden, COLUMNS * hidden),
        b1: vec![0.0; hidden],
        w2: init(&mut rng, hidden, 2, hidden * 2),
        b2: vec![0.0; 2],
        mean,
        std,
        hidden,
    };
    let mut v_w1 = vec![0.0; model.w1.len()];
    let mut v_b1 = vec![0.0; hidden];
    let mut v_w2 = vec![0.0; model.w2.len()];
    let mut v_b2 = vec![0.0; 2];
    let mut order: Vec<usize> = (0..n).collect();
    let mut h = vec![0.0; hidden];
    for _ in 0..config.epochs {
        for i in (1..n).rev() {
            let j = (rng.uniform() * (i + 1) as f64) as usize;
            order.swap(i, j.min(i));
        }
        for batch in order.chunks(config.batch) {
            let mut g_w1 = vec![0.0; model.w1.len()];
            let mut g_b1 = vec![0.0; hidden];
            let mut g_w2 = vec![0.0; model.w2.len()];
            let mut g_b2 = [0.0; 2];
            for &i in batch {
                let x = &xs[i];
                model.hidden_layer(x, &mut h);
                let (l0, l1) = model.logits(&h);
                let (p0, p1) = softmax2(l0, l1);
                let y1 = if labels[i] { 1.0 } else { 0.0 };
                let d = [p0 - (1.0 - y1), p1 - y1];
                for k in 0..hidden {
                    g_w2[k * 2] += d[0] * h[k];
                    g_w2[k * 2 + 1] += d[1] * h[k];
                    if h[k] > 0.0 {
                        let dh = d[0] * model.w2[k * 2] + d[1] * model.w2[k * 2 + 1];
                        g_b1[k] += dh;
                        for (j, xj) in x.iter().enumerate() {
                            g_w1[j * hidden + k] += dh * xj;
                        }
                    }
                }
                g_b2[0] += d[0];
                g_b2[1] += d[1];
            }
            let scale = 1.0 / batch.len() as f64;
            let step = |w: &mut [f64], v: &mut [f64], g: &[f64], decay: f64| {
                for ((wi, vi), gi) in w.iter_mut().zip(v.iter_mut()).zip(g) {
                    *vi = config.momentum * *vi - config.learning_rate * (gi * scale + decay * *wi);
                    *wi += *vi;
                }
            };
            step(&mut model.w1, &mut v_w1, &g_w1, config.l2);
            step(&mut model.b1, &mut v_b1, &g_b1, 0.0);
            step(&mut model.w2, &mut v_w2, &g_w2, config.l2);
            step(&mut model.b2, &mut v_b2, &g_b2, 0.0);
        }
    }
    model
}

/// Accuracy at threshold 0.5 and ROC AUC of `scores` against `labels`.
pub fn evaluate(scores: &[f64], labels: &[bool]) -> (f64, f64) {
    let correct = scores
        .iter()
        .zip(labels)
        .filter(|(s, y)| (**s >= 0.5) == **y)
        .count();
    let accuracy = correct as f64 / scores.len().max(1) as f64;
    // AUC = P(score of a random positive > score of a random negative), ties count half.
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]));
    let (mut rank_sum, mut positives) = (0.0, 0.0);
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if labels[k] {
                rank_sum += avg_rank;
                positives += 1.0;
            }
        }
        i = j + 1;
    }
    let negatives = scores.len() as f64 - positives;
    let auc = if positives == 0.0 || negatives == 0.0 {
        0.5
    } else {
        (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
    };
    (accuracy, auc)
}
