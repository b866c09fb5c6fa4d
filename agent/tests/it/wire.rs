//! The prediction API's request decoders on arbitrary bytes (the fuzz target
//! `api_requests` in agent/fuzz runs the same at scale): never a panic, and whatever they
//! accept fits the model's inputs.

use fleet_agent::wire;
use fleetml_protocol::tensor::{DType, Dim, TensorSpec};
use proptest::prelude::*;

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
    ]
}

/// JSON values of any shape, a few levels deep.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-z]{0,6}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("name".to_string()),
                    Just("shape".to_string()),
                    Just("data".to_string()),
                    "[a-z]{1,4}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn json_inputs_never_panic_and_accepted_ones_fit(v in json()) {
        if let Ok(tensors) = wire::from_json(&specs(), &v) {
            prop_assert!(tensors.len() <= 2);
        }
    }

    #[test]
    fn cbor_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(v) = serde_cbor::from_slice::<serde_cbor::Value>(&bytes) {
            let _ = wire::from_cbor(&specs(), &v);
        }
    }

    #[test]
    fn raw_bodies_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        shape in "[0-9,]{0,8}",
        dtype in prop::sample::select(vec!["float32", "int64", "float16", "nonsense"]),
    ) {
        if let Ok(t) = wire::from_binary(&specs(), Some("x"), Some(&shape), Some(dtype), &bytes) {
            prop_assert_eq!(t.len(), 1);
        }
    }
}
