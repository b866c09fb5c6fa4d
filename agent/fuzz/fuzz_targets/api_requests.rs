//! Fuzzes the decoders of the agent's prediction API requests (what any local caller can
//! send): JSON and CBOR bodies (`inputs` as numbers, nested lists or raw bytes) and raw
//! tensor bodies with their headers, against a model with float, integer, boolean and
//! dynamic-shape inputs. The first byte picks the form; the rest is the body.
#![no_main]

use fleet_agent::wire;
use fleetml_protocol::tensor::{DType, Dim, TensorSpec};
use libfuzzer_sys::fuzz_target;

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![Dim::Symbol("batch".into()), Dim::Fixed(4)],
        },
        TensorSpec {
            name: "ids".into(),
            dtype: DType::I64,
            shape: vec![Dim::Fixed(3)],
        },
        TensorSpec {
            name: "mask".into(),
            dtype: DType::Bool,
            shape: vec![Dim::Symbol("n".into())],
        },
    ]
}

fuzz_target!(|data: &[u8]| {
    let Some((&form, body)) = data.split_first() else {
        return;
    };
    let specs = specs();
    match form % 3 {
        0 => {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
                let _ = wire::from_json(&specs, &v["inputs"]);
                let _ = wire::from_json(&specs, &v);
            }
        }
        1 => {
            if let Ok(v) = serde_cbor::from_slice::<serde_cbor::Value>(body) {
                let _ = wire::from_cbor(&specs, &v);
            }
        }
        _ => {
            let shape = body.first().map(|b| format!("{},4", b % 8));
            let _ = wire::from_binary(&specs, Some("x"), shape.as_deref(), Some("float32"), body);
            let _ = wire::from_binary(&specs, Some("mask"), Some("7"), None, body);
        }
    }
});
