//! The feature schema: the raw features a model consumes, their types, units and valid
//! ranges, and how each maps onto the model's input tensor.
//!
//! Written by operators as TOML (`features.toml`) and carried, signed, in the manifest:
//!
//! ```toml
//! [[features]]
//! name = "claim_amount"
//! type = "float"
//! unit = "EUR"
//! min = 0.0
//! max = 500000.0
//! input = "input"
//! column = 0
//!
//! [[features]]
//! name = "claim_type"
//! type = "category"
//! values = ["auto", "home", "health", "travel"]
//! encoding = "one-hot"
//! input = "input"
//! column = 11
//! ```

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::tensor::{DType, Dim, Tensor, TensorSpec};

/// The most features a schema may declare.
pub const MAX_FEATURES: usize = 4096;
/// The most values a categorical feature may declare.
pub const MAX_CATEGORY_VALUES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSchema {
    #[serde(default)]
    pub features: Vec<Feature>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureType {
    Float,
    Int,
    Category,
}

/// How a categorical feature is written into the input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    /// One column per allowed value, 1.0 in the column of the value, 0.0 elsewhere.
    OneHot,
    /// One column holding the value's index in `values`.
    Ordinal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FeatureType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Smallest valid value (numeric features).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest valid value (numeric features).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Allowed values (categorical features), in encoding order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Encoding of a categorical feature; one-hot when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
    /// Value written for a missing numeric feature; NaN when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impute: Option<f64>,
    /// Name of the model input this feature feeds.
    pub input: String,
    /// First column (index along the input's last axis) this feature occupies.
    pub column: u32,
}

impl Feature {
    pub fn encoding(&self) -> Encoding {
        self.encoding.unwrap_or(Encoding::OneHot)
    }

    /// How many columns of the input tensor the feature occupies.
    pub fn width(&self) -> u32 {
        match (self.kind, self.encoding()) {
            (FeatureType::Category, Encoding::OneHot) => {
                u32::try_from(self.values.len()).unwrap_or(u32::MAX)
            }
            _ => 1,
        }
    }

    pub fn is_numeric(&self) -> bool {
        self.kind != FeatureType::Category
    }

    /// Whether a numeric value lies in the declared range (and is a number).
    pub fn in_range(&self, value: f64) -> bool {
        !value.is_nan()
            && self.min.is_none_or(|min| value >= min)
            && self.max.is_none_or(|max| value <= max)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FeatureError {
    #[error("feature schema is not valid TOML for this format: {0}")]
    Syntax(String),
    #[error("feature schema declares no features")]
    Empty,
    #[error("feature schema declares {0} features, more than the limit of {MAX_FEATURES}")]
    TooMany(usize),
    #[error("feature `{0}`: names must be 1-128 characters of letters, digits, `_`, `-` or `.`")]
    BadName(String),
    #[error("feature `{0}` is declared twice")]
    Duplicate(String),
    #[error("feature `{feature}`: {problem}")]
    Invalid { feature: String, problem: String },
    #[error(
        "feature `{feature}` feeds input `{input}`, which the model does not have (inputs: {known})"
    )]
    UnknownInput {
        feature: String,
        input: String,
        known: String,
    },
    #[error(
        "feature `{feature}` feeds input `{input}` of type {dtype}; features can only feed float inputs"
    )]
    InputNotFloat {
        feature: String,
        input: String,
        dtype: DType,
    },
    #[error(
        "feature `{feature}` needs columns {start}..{end} of input `{input}`, which has {columns} columns"
    )]
    ColumnOutOfRange {
        feature: String,
        input: String,
        start: u64,
        end: u64,
        columns: u64,
    },
    #[error("features `{first}` and `{second}` both write column {column} of input `{input}`")]
    Overlap {
        first: String,
        second: String,
        input: String,
        column: u64,
    },
    #[error("column {column} of input `{input}` is fed by no feature")]
    Uncovered { input: String, column: u64 },
    #[error(
        "input `{input}` has a symbolic or missing last dimension; its column count must be fixed to map features onto it"
    )]
    UnsizedInput { input: String },
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl FeatureSchema {
    pub fn from_toml(text: &str) -> Result<Self, FeatureError> {
        let schema: FeatureSchema =
            toml::from_str(text).map_err(|e| FeatureError::Syntax(e.message().to_string()))?;
        if schema.is_empty() {
            return Err(FeatureError::Empty);
        }
        schema.validate()?;
        Ok(schema)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("feature schema serializes to TOML")
    }

    pub fn feature(&self, name: &str) -> Option<&Feature> {
        self.features.iter().find(|f| f.name == name)
    }

    /// Whether the schema declares no features: the model takes raw tensors only
    /// (an image model, say).
    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    /// Checks the schema on its own: names, types, ranges, category values. An empty
    /// schema is valid (a raw-tensor model); a schema *file* must declare features.
    pub fn validate(&self) -> Result<(), FeatureError> {
        if self.features.len() > MAX_FEATURES {
            return Err(FeatureError::TooMany(self.features.len()));
        }
        let mut names = BTreeSet::new();
        for f in &self.features {
            if !valid_name(&f.name) {
                return Err(FeatureError::BadName(f.name.clone()));
            }
            if !names.insert(f.name.as_str()) {
                return Err(FeatureError::Duplicate(f.name.clone()));
            }
            let invalid = |problem: &str| FeatureError::Invalid {
                feature: f.name.clone(),
                problem: problem.to_string(),
            };
            match f.kind {
                FeatureType::Float | FeatureType::Int => {
                    if !f.values.is_empty() {
                        return Err(invalid("`values` is only for category features"));
                    }
                    if f.encoding.is_some() {
                        return Err(invalid("`encoding` is only for category features"));
                    }
                    for (what, v) in [("min", f.min), ("max", f.max), ("impute", f.impute)] {
                        if v.is_some_and(|v| !v.is_finite()) {
                            return Err(invalid(&format!("`{what}` must be a finite number")));
                        }
                    }
                    if let (Some(min), Some(max)) = (f.min, f.max)
                        && min > max
                    {
                        return Err(invalid("`min` is greater than `max`"));
                    }
                }
                FeatureType::Category => {
                    if f.values.is_empty() {
                        return Err(invalid("a category feature needs `values`"));
                    }
                    if f.values.len() > MAX_CATEGORY_VALUES {
                        return Err(invalid("too many category values"));
                    }
                    let mut seen = BTreeSet::new();
                    for v in &f.values {
                        if !seen.insert(v) {
                            return Err(invalid(&format!("value `{v}` is listed twice")));
                        }
                    }
                    if f.min.is_some() || f.max.is_some() || f.impute.is_some() {
                        return Err(invalid(
                            "`min`, `max` and `impute` are only for numeric features",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks that the schema fits the model's inputs: every feature names a float input,
    /// its columns exist, no two features write the same column, and every column of
    /// every fed input is written by some feature.
    pub fn check_against(&self, inputs: &[TensorSpec]) -> Result<(), FeatureError> {
        self.validate()?;
        let known = || {
            inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        // (input name, column count, owner of each column)
        let mut layouts: Vec<(&str, u64, Vec<Option<&str>>)> = Vec::new();
        for f in &self.features {
            let Some(spec) = inputs.iter().find(|i| i.name == f.input) else {
                return Err(FeatureError::UnknownInput {
                    feature: f.name.clone(),
                    input: f.input.clone(),
                    known: known(),
                });
            };
            if !spec.dtype.is_float() {
                return Err(FeatureError::InputNotFloat {
                    feature: f.name.clone(),
                    input: f.input.clone(),
                    dtype: spec.dtype,
                });
            }
            let columns = match spec.shape.last() {
                Some(Dim::Fixed(n)) => *n,
                _ => {
                    return Err(FeatureError::UnsizedInput {
                        input: spec.name.clone(),
                    });
                }
            };
            let idx = match layouts.iter().position(|(name, _, _)| *name == f.input) {
                Some(idx) => idx,
                None => {
                    // Bounded: a column count this large cannot be a tabular input.
                    if columns > 1 << 20 {
                        return Err(FeatureError::UnsizedInput {
                            input: spec.name.clone(),
                        });
                    }
                    layouts.push((spec.name.as_str(), columns, vec![None; columns as usize]));
                    layouts.len() - 1
                }
            };
            let (_, columns, owners) = &mut layouts[idx];
            let start = u64::from(f.column);
            let end = start + u64::from(f.width());
            if end > *columns {
                return Err(FeatureError::ColumnOutOfRange {
                    feature: f.name.clone(),
                    input: f.input.clone(),
                    start,
                    end,
                    columns: *columns,
                });
            }
            for column in start..end {
                let slot = &mut owners[column as usize];
                if let Some(first) = slot {
                    return Err(FeatureError::Overlap {
                        first: first.to_string(),
                        second: f.name.clone(),
                        input: f.input.clone(),
                        column,
                    });
                }
                *slot = Some(f.name.as_str());
            }
        }
        for (input, _, owners) in &layouts {
            if let Some(column) = owners.iter().position(Option::is_none) {
                return Err(FeatureError::Uncovered {
                    input: input.to_string(),
                    column: column as u64,
                });
            }
        }
        Ok(())
    }

    /// Number of columns the schema writes into `input` (the highest column used + 1).
    pub fn columns_of(&self, input: &str) -> usize {
        self.features
            .iter()
            .filter(|f| f.input == input)
            .map(|f| (f.column + f.width()) as usize)
            .max()
            .unwrap_or(0)
    }

    /// Encodes a batch of raw rows (values in schema order) into one `f32[rows, columns]`
    /// tensor per model input, in `inputs` order. Row problems are not reported here;
    /// see [`Self::encode_row`].
    pub fn encode_batch(&self, inputs: &[TensorSpec], rows: &[Vec<RawValue>]) -> Vec<Tensor> {
        inputs
            .iter()
            .map(|spec| {
                let columns = self.columns_of(&spec.name);
                let mut data = vec![0f32; rows.len() * columns];
                for (row, out) in rows.iter().zip(data.chunks_mut(columns.max(1))) {
                    self.encode_row(&spec.name, row, out);
                }
                Tensor::f32(
                    spec.name.clone(),
                    vec![rows.len() as u64, columns as u64],
                    data,
                )
            })
            .collect()
    }

    /// Encodes one row of raw values (in schema order) into `out`, the row of the input
    /// tensor `input` (length [`Self::columns_of`]). Returns what was wrong with the row,
    /// per feature, without failing: a missing numeric value becomes its `impute` value
    /// (or NaN), an unknown category all zeros (one-hot) or -1 (ordinal).
    pub fn encode_row(&self, input: &str, row: &[RawValue], out: &mut [f32]) -> RowQuality {
        let mut quality = RowQuality::default();
        for (i, f) in self.features.iter().enumerate() {
            if f.input != input {
                continue;
            }
            let value = row.get(i).unwrap_or(&RawValue::Missing);
            let col = f.column as usize;
            match f.kind {
                FeatureType::Float | FeatureType::Int => {
                    let v = match value {
                        RawValue::Number(v) if !v.is_nan() => {
                            if !f.in_range(*v) {
                                quality.out_of_range += 1;
                            }
                            *v
                        }
                        RawValue::Number(_) | RawValue::Missing => {
                            quality.missing += 1;
                            f.impute.unwrap_or(f64::NAN)
                        }
                        RawValue::Text(_) => {
                            quality.invalid += 1;
                            f.impute.unwrap_or(f64::NAN)
                        }
                    };
                    if let Some(slot) = out.get_mut(col) {
                        *slot = v as f32;
                    }
                }
                FeatureType::Category => {
                    let index = match value {
                        RawValue::Text(s) => f.values.iter().position(|v| v == s),
                        RawValue::Number(n) => f
                            .values
                            .iter()
                            .position(|v| v.parse::<f64>().ok() == Some(*n)),
                        RawValue::Missing => None,
                    };
                    match value {
                        RawValue::Missing => quality.missing += 1,
                        _ if index.is_none() => quality.unseen_category += 1,
                        _ => {}
                    }
                    match f.encoding() {
                        Encoding::OneHot => {
                            for k in 0..f.values.len() {
                                if let Some(slot) = out.get_mut(col + k) {
                                    *slot = if Some(k) == index { 1.0 } else { 0.0 };
                                }
                            }
                        }
                        Encoding::Ordinal => {
                            if let Some(slot) = out.get_mut(col) {
                                *slot = index.map_or(-1.0, |k| k as f32);
                            }
                        }
                    }
                }
            }
        }
        quality
    }
}

/// A raw feature value as an application or a CSV file supplies it.
#[derive(Debug, Clone, PartialEq)]
pub enum RawValue {
    Missing,
    Number(f64),
    Text(String),
}

impl RawValue {
    /// Parses a CSV cell: empty (or `NA`/`NaN`/`null`) is missing, a number is a number,
    /// anything else is text.
    pub fn parse(cell: &str) -> Self {
        let cell = cell.trim();
        if cell.is_empty() || matches!(cell, "NA" | "NaN" | "nan" | "null") {
            return RawValue::Missing;
        }
        match cell.parse::<f64>() {
            Ok(v) => RawValue::Number(v),
            Err(_) => RawValue::Text(cell.to_string()),
        }
    }
}

/// Problems found while encoding one row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowQuality {
    pub missing: u32,
    pub out_of_range: u32,
    pub unseen_category: u32,
    pub invalid: u32,
}

impl RowQuality {
    pub fn is_clean(&self) -> bool {
        *self == RowQuality::default()
    }
}
