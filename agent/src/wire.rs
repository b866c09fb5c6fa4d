//! Raw tensors on the prediction API: decoding them from JSON, CBOR and binary bodies,
//! checking them against a model's inputs, and encoding outputs.
//!
//! - JSON: `{"inputs": [{"name", "shape", "data": [numbers], "dtype"?}]}`; numbers are
//!   read as the model's declared element type (integers exactly, booleans as
//!   true/false or 0/1).
//! - CBOR: the same map, where `data` may instead be `bytes`, one byte string of the
//!   elements little-endian (no per-element parsing).
//! - `application/octet-stream`: the body is one input's elements little-endian; headers
//!   `x-fleetml-shape: 1,3,640,640`, optional `x-fleetml-input` (the input's name,
//!   checked) and `x-fleetml-dtype` (default: the declared type). For models with one
//!   input; several go as CBOR.
//!
//! Every decoder checks shapes against the model before it allocates for the elements,
//! and the body is bounded by the API before it gets here.

use fleetml_protocol::golden::{Tensor, TensorData};
use fleetml_protocol::manifest::{DType, Dim, TensorSpec};
use fleetml_protocol::tensor::Number;
use serde_json::{Value, json};

pub const SHAPE_HEADER: &str = "x-fleetml-shape";
pub const DTYPE_HEADER: &str = "x-fleetml-dtype";
pub const INPUT_HEADER: &str = "x-fleetml-input";

/// A problem with a request's tensors: the field it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub field: String,
    pub error: String,
}

fn err(field: impl Into<String>, error: impl Into<String>) -> WireError {
    WireError {
        field: field.into(),
        error: error.into(),
    }
}

pub fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "f32" | "float32" | "float" => DType::F32,
        "f16" | "float16" => DType::F16,
        "f64" | "float64" | "double" => DType::F64,
        "i8" | "int8" => DType::I8,
        "i32" | "int32" => DType::I32,
        "i64" | "int64" => DType::I64,
        "u8" | "uint8" => DType::U8,
        "bool" => DType::Bool,
        _ => return None,
    })
}

fn spec_of<'a>(specs: &'a [TensorSpec], name: &str) -> Result<&'a TensorSpec, WireError> {
    specs.iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        err(
            format!("inputs.{name}"),
            format!(
                "the model has no input `{name}` (its inputs: {})",
                names.join(", ")
            ),
        )
    })
}

/// Checks `shape` against `spec` and returns the element count.
fn check_shape(spec: &TensorSpec, shape: &[u64]) -> Result<usize, WireError> {
    let fits = shape.len() == spec.shape.len()
        && shape.iter().zip(&spec.shape).all(|(got, want)| match want {
            Dim::Fixed(n) => got == n,
            Dim::Symbol(_) => *got > 0,
        });
    let elements = fleetml_protocol::tensor::elements(shape);
    match elements {
        Some(n) if fits && n <= fleetml_protocol::golden::MAX_ELEMENTS => Ok(n),
        _ => {
            let want: Vec<String> = spec.shape.iter().map(ToString::to_string).collect();
            Err(err(
                format!("inputs.{}", spec.name),
                format!(
                    "tensor `{}` has shape {shape:?}; the model expects [{}]",
                    spec.name,
                    want.join(", ")
                ),
            ))
        }
    }
}

fn check_dtype(spec: &TensorSpec, given: Option<DType>) -> Result<DType, WireError> {
    match given {
        Some(d) if d != spec.dtype => Err(err(
            format!("inputs.{}", spec.name),
            format!(
                "tensor `{}` is {d}; the model's input is {}",
                spec.name, spec.dtype
            ),
        )),
        _ => Ok(spec.dtype),
    }
}

/// Orders decoded tensors as the model's inputs, refusing missing ones.
fn in_model_order(
    specs: &[TensorSpec],
    mut tensors: Vec<Tensor>,
) -> Result<Vec<Tensor>, WireError> {
    let mut ordered = Vec::with_capacity(specs.len());
    for spec in specs {
        let Some(i) = tensors.iter().position(|t| t.name == spec.name) else {
            return Err(err(
                format!("inputs.{}", spec.name),
                format!("missing input tensor `{}`", spec.name),
            ));
        };
        ordered.push(tensors.swap_remove(i));
    }
    Ok(ordered)
}

/// Checks that `len` values were given for a tensor whose shape holds `n`.
fn count_fits(
    field: &str,
    name: &str,
    shape: &[u64],
    n: usize,
    len: usize,
) -> Result<(), WireError> {
    if len != n {
        return Err(err(
            field,
            format!("tensor `{name}` has shape {shape:?} ({n} values) but `data` has {len}"),
        ));
    }
    Ok(())
}

/// Decodes `"inputs"` of a JSON request.
pub fn from_json(specs: &[TensorSpec], inputs: &Value) -> Result<Vec<Tensor>, WireError> {
    let Value::Array(list) = inputs else {
        return Err(err(
            "inputs",
            "`inputs` must be a list of {name, shape, data}",
        ));
    };
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        let name = item["name"]
            .as_str()
            .ok_or_else(|| err("inputs", "each input needs a `name`"))?;
        let spec = spec_of(specs, name)?;
        if out.iter().any(|t: &Tensor| t.name == name) {
            return Err(err(format!("inputs.{name}"), "input given twice"));
        }
        let field = format!("inputs.{name}");
        let shape: Vec<u64> = item["shape"]
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .ok_or_else(|| err(&field, "`shape` must be a list of sizes"))?;
        let dtype = match &item["dtype"] {
            Value::Null => None,
            Value::String(s) => {
                Some(parse_dtype(s).ok_or_else(|| err(&field, format!("unknown dtype `{s}`")))?)
            }
            _ => return Err(err(&field, "`dtype` must be a string such as \"f32\"")),
        };
        let dtype = check_dtype(spec, dtype)?;
        let n = check_shape(spec, &shape)?;
        let data = item["data"]
            .as_array()
            .ok_or_else(|| err(&field, "`data` must be a flat list of numbers"))?;
        count_fits(&field, name, &shape, n, data.len())?;
        let mut numbers = Vec::with_capacity(n);
        for (i, v) in data.iter().enumerate() {
            numbers.push(match v {
                Value::Number(x) => match x.as_i64() {
                    Some(i) => Number::Int(i),
                    None => Number::Float(x.as_f64().unwrap_or(f64::NAN)),
                },
                Value::Bool(b) => Number::Bool(*b),
                _ => {
                    return Err(err(&field, format!("`data[{i}]` is not a number")));
                }
            });
        }
        let data = TensorData::from_numbers(dtype, numbers.into_iter())
            .map_err(|e| err(&field, e.to_string()))?;
        out.push(Tensor {
            name: name.to_string(),
            shape,
            data,
        });
    }
    in_model_order(specs, out)
}

/// Decodes `"inputs"` of a CBOR request (`data` numbers or `bytes`).
pub fn from_cbor(
    specs: &[TensorSpec],
    inputs: &serde_cbor::Value,
) -> Result<Vec<Tensor>, WireError> {
    use serde_cbor::Value as C;
    let C::Array(list) = inputs else {
        return Err(err(
            "inputs",
            "`inputs` must be a list of {name, shape, data or bytes}",
        ));
    };
    let get = |m: &std::collections::BTreeMap<C, C>, k: &str| m.get(&C::Text(k.into())).cloned();
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        let C::Map(m) = item else {
            return Err(err("inputs", "each input must be a map"));
        };
        let Some(C::Text(name)) = get(m, "name") else {
            return Err(err("inputs", "each input needs a `name`"));
        };
        let spec = spec_of(specs, &name)?;
        let field = format!("inputs.{name}");
        if out.iter().any(|t: &Tensor| t.name == name) {
            return Err(err(&field, "input given twice"));
        }
        let shape: Vec<u64> = match get(m, "shape") {
            Some(C::Array(a)) => a
                .iter()
                .map(|d| match d {
                    C::Integer(n) => u64::try_from(*n).ok(),
                    _ => None,
                })
                .collect::<Option<_>>()
                .ok_or_else(|| err(&field, "`shape` must be a list of sizes"))?,
            _ => return Err(err(&field, "`shape` must be a list of sizes")),
        };
        let dtype = match get(m, "dtype") {
            None | Some(C::Null) => None,
            Some(C::Text(s)) => {
                Some(parse_dtype(&s).ok_or_else(|| err(&field, format!("unknown dtype `{s}`")))?)
            }
            Some(_) => return Err(err(&field, "`dtype` must be a string such as \"f32\"")),
        };
        let dtype = check_dtype(spec, dtype)?;
        let n = check_shape(spec, &shape)?;
        let data = match (get(m, "bytes"), get(m, "data")) {
            (Some(C::Bytes(b)), None) => {
                TensorData::from_le_bytes(dtype, &b).map_err(|e| err(&field, e.to_string()))?
            }
            (None, Some(C::Array(values))) => {
                let mut numbers = Vec::with_capacity(values.len());
                for (i, v) in values.iter().enumerate() {
                    numbers.push(match v {
                        C::Integer(x) => Number::Int(
                            i64::try_from(*x)
                                .map_err(|_| err(&field, format!("`data[{i}]` is out of range")))?,
                        ),
                        C::Float(x) => Number::Float(*x),
                        C::Bool(b) => Number::Bool(*b),
                        _ => return Err(err(&field, format!("`data[{i}]` is not a number"))),
                    });
                }
                TensorData::from_numbers(dtype, numbers.into_iter())
                    .map_err(|e| err(&field, e.to_string()))?
            }
            _ => {
                return Err(err(
                    &field,
                    "give `data` (a list of numbers) or `bytes` (little-endian elements), one of them",
                ));
            }
        };
        count_fits(&field, &name, &shape, n, data.len())?;
        out.push(Tensor { name, shape, data });
    }
    in_model_order(specs, out)
}

/// Decodes an `application/octet-stream` body: one input, described by headers.
pub fn from_binary(
    specs: &[TensorSpec],
    input: Option<&str>,
    shape: Option<&str>,
    dtype: Option<&str>,
    body: &[u8],
) -> Result<Vec<Tensor>, WireError> {
    let spec = match input {
        Some(name) => spec_of(specs, name)?,
        None if specs.len() == 1 => &specs[0],
        None => {
            return Err(err(
                INPUT_HEADER,
                format!(
                    "the model has {} inputs; name the one this body is with `{INPUT_HEADER}`, or send CBOR with all of them",
                    specs.len()
                ),
            ));
        }
    };
    if specs.len() > 1 {
        return Err(err(
            INPUT_HEADER,
            format!(
                "the model has {} inputs and a binary body carries one; send CBOR `inputs` with `bytes` instead",
                specs.len()
            ),
        ));
    }
    let shape: Vec<u64> = shape
        .ok_or_else(|| {
            err(
                SHAPE_HEADER,
                format!("a binary body needs `{SHAPE_HEADER}: D0,D1,…`"),
            )
        })?
        .split(',')
        .map(|d| d.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            err(
                SHAPE_HEADER,
                format!("`{SHAPE_HEADER}` must be sizes separated by commas"),
            )
        })?;
    let dtype = match dtype {
        None => None,
        Some(s) => Some(
            parse_dtype(s.trim())
                .ok_or_else(|| err(DTYPE_HEADER, format!("unknown dtype `{s}`")))?,
        ),
    };
    let dtype = check_dtype(spec, dtype)?;
    let n = check_shape(spec, &shape)?;
    let data = TensorData::from_le_bytes(dtype, body)
        .map_err(|e| err(format!("inputs.{}", spec.name), e.to_string()))?;
    if data.len() != n {
        return Err(err(
            format!("inputs.{}", spec.name),
            format!(
                "shape {shape:?} holds {n} {dtype} values; the body has {} bytes ({} values)",
                body.len(),
                data.len()
            ),
        ));
    }
    Ok(vec![Tensor {
        name: spec.name.clone(),
        shape,
        data,
    }])
}

/// Elements `range` as JSON values of their type (floats as numbers, NaN as null).
pub fn json_values(data: &TensorData, range: std::ops::Range<usize>) -> Value {
    match data {
        TensorData::I8(v) => json!(v[range]),
        TensorData::I32(v) => json!(v[range]),
        TensorData::I64(v) => json!(v[range]),
        TensorData::U8(v) => json!(v[range]),
        TensorData::Bool(v) => json!(v[range]),
        TensorData::F32(v) => json!(v[range]),
        TensorData::F64(v) => json!(v[range]),
        TensorData::F16(_) => json!(data.slice(range).to_f32()),
    }
}

/// Whole tensors as CBOR `{name, shape, dtype, bytes}` maps, elements little-endian in
/// one byte string each: the outputs of a binary-capable response (and the form a
/// request's `inputs` may take).
pub fn cbor_outputs(outputs: &[Tensor]) -> serde_cbor::Value {
    use serde_cbor::Value as C;
    C::Array(
        outputs
            .iter()
            .map(|t| {
                let mut m = std::collections::BTreeMap::new();
                m.insert(C::Text("name".into()), C::Text(t.name.clone()));
                m.insert(
                    C::Text("shape".into()),
                    C::Array(t.shape.iter().map(|d| C::Integer(i128::from(*d))).collect()),
                );
                m.insert(C::Text("dtype".into()), C::Text(t.dtype().to_string()));
                m.insert(C::Text("bytes".into()), C::Bytes(t.data.to_le_bytes()));
                C::Map(m)
            })
            .collect(),
    )
}

/// The bytes a request for one row of `specs` takes as JSON at most (symbolic
/// dimensions count as 1): room for the default body limit to fit the model.
pub fn json_bytes_for(specs: &[TensorSpec]) -> usize {
    specs
        .iter()
        .map(|s| {
            s.shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n as usize,
                    Dim::Symbol(_) => 1,
                })
                .fold(1usize, usize::saturating_mul)
        })
        .fold(0usize, |acc, n| acc.saturating_add(n.saturating_mul(24)))
        .saturating_add(64 << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: DType, shape: &[Dim]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn json_integers_stay_exact_and_types_follow_the_model() {
        let specs = [
            spec("sr", DType::I64, &[]),
            spec("x", DType::F32, &[Dim::Symbol("N".into()), Dim::Fixed(2)]),
        ];
        let body = json!([
            {"name": "x", "shape": [1, 2], "data": [0.5, 1]},
            {"name": "sr", "shape": [], "data": [9007199254740993i64]},
        ]);
        let t = from_json(&specs, &body).expect("decodes");
        assert_eq!(t[0].data, TensorData::I64(vec![9_007_199_254_740_993]));
        assert_eq!(t[1].data, TensorData::F32(vec![0.5, 1.0]));
        let wrong = json!([{"name": "sr", "shape": [], "data": [1.5]}, {"name": "x", "shape": [1, 2], "data": [0, 0]}]);
        let e = from_json(&specs, &wrong).expect_err("a fraction is no i64");
        assert_eq!(e.field, "inputs.sr");
        let missing = json!([{"name": "x", "shape": [1, 2], "data": [0, 0]}]);
        assert!(
            from_json(&specs, &missing)
                .expect_err("sr missing")
                .error
                .contains("missing")
        );
    }

    #[test]
    fn binary_bodies_check_their_length_against_the_shape() {
        let specs = [spec(
            "x",
            DType::F32,
            &[Dim::Symbol("N".into()), Dim::Fixed(3)],
        )];
        let body: Vec<u8> = [1f32, 2.0, 3.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let t = from_binary(&specs, None, Some("1,3"), None, &body).expect("decodes");
        assert_eq!(t[0].data, TensorData::F32(vec![1.0, 2.0, 3.0]));
        assert!(from_binary(&specs, None, Some("2,3"), None, &body).is_err());
        assert!(from_binary(&specs, None, Some("1,3"), Some("i64"), &body).is_err());
        assert!(from_binary(&specs, None, None, None, &body).is_err());
        assert!(from_binary(&specs, None, Some("1,3"), None, &body[..11]).is_err());
    }
}
