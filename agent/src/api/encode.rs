//! Named raw features (one row or a batch) checked against the bundle's feature schema
//! and encoded into the model's input tensors.

use fleetml_protocol::features::{FeatureType, RawValue};
use fleetml_protocol::golden::Tensor;
use serde_json::Value;

use super::{ApiError, Served};

/// Rows of a raw-tensor request: the first input's leading dimension (1 for a scalar).
pub(super) fn rows_of(inputs: &[Tensor]) -> usize {
    inputs
        .first()
        .and_then(|t| t.shape.first())
        .map_or(1, |n| *n as usize)
}

/// A request's model inputs, its row count, and its raw feature rows (for monitoring
/// and explanations).
pub(super) type Encoded = (Vec<Tensor>, usize, Vec<Vec<RawValue>>);

/// Encodes named features (one object or an array of objects) into the model's inputs.
pub(super) fn encode_features(
    model: &Served,
    features: &Value,
    max_rows: usize,
) -> Result<Encoded, ApiError> {
    let (objects, batch): (Vec<&Value>, bool) = match features {
        Value::Array(rows) => (rows.iter().collect(), true),
        Value::Object(_) => (vec![features], false),
        _ => {
            return Err(ApiError::invalid(
                "features",
                "`features` must be an object or an array of objects",
            ));
        }
    };
    if objects.is_empty() || objects.len() > max_rows {
        return Err(ApiError::invalid(
            "features",
            format!("a batch holds 1 to {max_rows} rows, not {}", objects.len()),
        ));
    }
    let schema = &model.schema;
    if schema.is_empty() {
        return Err(ApiError::invalid(
            "features",
            format!(
                "model `{}` has no feature schema; it takes raw tensors: send `inputs`",
                model.name
            ),
        ));
    }
    let mut raw_rows = Vec::with_capacity(objects.len());
    for (i, obj) in objects.iter().enumerate() {
        let at = |name: &str| {
            if batch {
                format!("features[{i}].{name}")
            } else {
                format!("features.{name}")
            }
        };
        let Value::Object(obj) = obj else {
            return Err(ApiError::invalid(
                if batch {
                    format!("features[{i}]")
                } else {
                    "features".into()
                },
                "each row must be an object",
            ));
        };
        for key in obj.keys() {
            if schema.feature(key).is_none() {
                return Err(ApiError::invalid(
                    at(key),
                    format!("unknown feature `{key}`"),
                ));
            }
        }
        let mut row = Vec::with_capacity(schema.features.len());
        for f in &schema.features {
            let v = obj.get(&f.name).unwrap_or(&Value::Null);
            let raw = match (f.kind, v) {
                (_, Value::Null) => {
                    if f.impute.is_none() {
                        return Err(ApiError::invalid(
                            at(&f.name),
                            format!("missing feature `{}`", f.name),
                        ));
                    }
                    RawValue::Missing
                }
                (FeatureType::Float | FeatureType::Int, Value::Number(n)) => {
                    let x = n.as_f64().unwrap_or(f64::NAN);
                    if f.kind == FeatureType::Int && x.fract() != 0.0 {
                        return Err(ApiError::invalid(
                            at(&f.name),
                            format!("`{}` must be an integer", f.name),
                        ));
                    }
                    if !f.in_range(x) {
                        let range = format!(
                            "{}..{}",
                            f.min.map_or("-inf".into(), |m| m.to_string()),
                            f.max.map_or("inf".into(), |m| m.to_string())
                        );
                        return Err(ApiError::invalid(
                            at(&f.name),
                            format!("`{}` = {x} is outside its valid range {range}", f.name),
                        )
                        .rejected(&f.name, fleetml_monitor::Observation::Number(x)));
                    }
                    RawValue::Number(x)
                }
                (FeatureType::Category, Value::String(s)) => {
                    if !f.values.iter().any(|v| v == s) {
                        return Err(ApiError::invalid(
                            at(&f.name),
                            format!("`{}` = `{s}` is not one of {}", f.name, f.values.join(", ")),
                        )
                        .rejected(&f.name, fleetml_monitor::Observation::Unseen));
                    }
                    RawValue::Text(s.clone())
                }
                (FeatureType::Category, _) => {
                    return Err(ApiError::invalid(
                        at(&f.name),
                        format!(
                            "`{}` must be a string, one of {}",
                            f.name,
                            f.values.join(", ")
                        ),
                    ));
                }
                (_, _) => {
                    return Err(ApiError::invalid(
                        at(&f.name),
                        format!("`{}` must be a number", f.name),
                    ));
                }
            };
            row.push(raw);
        }
        raw_rows.push(row);
    }
    let inputs = schema.encode_batch(&model.inputs, &raw_rows);
    Ok((inputs, raw_rows.len(), raw_rows))
}
