//! Decoders of signed payloads (golden vectors, reference profile) and of operator files
//! (trust policy, feature schema, board profile): round trips and hostile input.

use fleetml_protocol::board::BoardProfile;
use fleetml_protocol::features::{FeatureSchema, RawValue};
use fleetml_protocol::golden::{self, Golden, GoldenError, Tensor, TensorData};
use fleetml_protocol::manifest::DType;
use fleetml_protocol::reference::{
    Multivariate, Performance, ReferenceError, ReferenceProfile, bin_index,
};
use fleetml_protocol::trust::{TrustPolicy, TrustPolicyError};
use proptest::prelude::*;

use crate::alloc_track::peak_during;
use crate::fixture::{key, policy, schema};

fn golden() -> Golden {
    Golden {
        abs_tolerance: 1e-4,
        rel_tolerance: 1e-3,
        inputs: vec![Tensor::f32(
            "input",
            vec![2, 3],
            vec![1.0, 0.0, 1.0, 5.0, 1.0, 0.0],
        )],
        outputs: vec![Tensor::f32(
            "probabilities",
            vec![2, 2],
            vec![0.25, 0.75, 0.5, 0.5],
        )],
    }
}

#[test]
fn golden_vectors_round_trip_and_compare() {
    let g = golden();
    assert_eq!(Golden::from_cbor(&g.to_cbor()), Ok(g.clone()));
    let same = golden::compare(&g, &g.outputs).expect("comparable");
    assert!(same.passed());
    let mut off = g.outputs.clone();
    let set = |t: &mut Tensor, i: usize, x: f32| match &mut t.data {
        TensorData::F32(v) => v[i] = x,
        other => panic!("f32 expected, got {other:?}"),
    };
    set(&mut off[0], 1, 0.7501); // within abs 1e-4
    assert!(golden::compare(&g, &off).expect("comparable").passed());
    set(&mut off[0], 2, 0.6);
    let c = golden::compare(&g, &off).expect("comparable");
    assert_eq!(
        (c.failures, c.worst.clone()),
        (1, Some(("probabilities".to_string(), 2)))
    );
    let mut bad = g.clone();
    bad.inputs[0].shape = vec![4, 4];
    assert!(matches!(
        Golden::from_cbor(&bad.to_cbor()),
        Err(GoldenError::ShapeMismatch { .. })
    ));
    let mut neg = g;
    neg.abs_tolerance = -1.0;
    assert_eq!(
        Golden::from_cbor(&neg.to_cbor()),
        Err(GoldenError::BadTolerance)
    );
}

#[test]
fn reference_profile_bins_by_quantiles_and_round_trips() {
    let s = schema();
    let rows: Vec<Vec<RawValue>> = (0..100)
        .map(|i| {
            let amount = if i % 10 == 0 {
                RawValue::Missing
            } else {
                RawValue::Number(f64::from(i))
            };
            let kind = RawValue::Text(["a", "b", "c"][i as usize % 3].into());
            vec![amount, kind]
        })
        .collect();
    let outputs = vec![(
        "probabilities".to_string(),
        2,
        (0..200)
            .map(|i| {
                if (i / 2 % 2 == 0) == (i % 2 == 0) {
                    0.9
                } else {
                    0.1
                }
            })
            .collect(),
    )];
    let p = ReferenceProfile::compute(&s, &rows, &outputs, 4).expect("computes");
    assert_eq!(p.rows, 100);
    let amount = &p.features[0];
    assert_eq!(amount.missing, 10);
    let n = amount.numeric.as_ref().expect("numeric");
    assert_eq!(n.edges.len(), 3);
    assert_eq!(n.counts.iter().sum::<u64>(), 90);
    assert!(
        n.counts.iter().all(|c| (20..=25).contains(c)),
        "{:?}",
        n.counts
    );
    assert_eq!((n.min, n.max), (1.0, 99.0));
    let kind = p.features[1].categorical.as_ref().expect("categorical");
    assert_eq!((kind.counts.clone(), kind.other), (vec![34, 33], 33));
    assert_eq!(p.features[1].invalid, 33);
    assert_eq!(p.predictions[0].class_counts, vec![50, 50]);
    assert_eq!(ReferenceProfile::from_cbor(&p.to_cbor()), Ok(p.clone()));
    assert_eq!(
        bin_index(&n.edges, n.edges[0]),
        0,
        "edges close their bin on the right"
    );
    assert_eq!(bin_index(&n.edges, f64::INFINITY), n.edges.len());

    // The multivariate model and the calibration map round-trip, and ones whose
    // shapes or values do not fit are refused before anything uses them.
    let error = p.features[0].numeric.clone().expect("numeric");
    let mut monitored = p.clone();
    monitored.multivariate = Some(Multivariate {
        features: vec!["x".into(), "y".into()],
        means: vec![50.0, 1.0],
        stds: vec![29.0, 2.0],
        components: vec![vec![0.6, 0.8]],
        explained: 0.7,
        error,
    });
    monitored.performance = Some(Performance {
        label: "y".into(),
        edges: vec![0.6, 0.8],
        accuracy: vec![0.5, 0.7, 0.9],
        counts: vec![10, 10, 10],
        reference_accuracy: 0.7,
        calibration_error: 0.02,
        sizes: vec![100, 1000],
        lower: vec![0.6, 0.65],
    });
    assert_eq!(
        ReferenceProfile::from_cbor(&monitored.to_cbor()),
        Ok(monitored.clone())
    );
    let refused = |edit: &dyn Fn(&mut ReferenceProfile)| {
        let mut bad = monitored.clone();
        edit(&mut bad);
        assert!(
            matches!(
                ReferenceProfile::from_cbor(&bad.to_cbor()),
                Err(ReferenceError::Inconsistent(_))
            ),
            "accepted {:?} / {:?}",
            bad.multivariate,
            bad.performance
        );
    };
    refused(&|p| p.multivariate.as_mut().expect("set").components[0].push(0.1));
    refused(&|p| {
        p.multivariate.as_mut().expect("set").means.pop();
    });
    refused(&|p| p.multivariate.as_mut().expect("set").stds[1] = f64::NAN);
    refused(&|p| p.multivariate.as_mut().expect("set").stds[0] = -1.0);
    refused(&|p| {
        let m = p.multivariate.as_mut().expect("set");
        m.components.push(vec![0.8, -0.6]);
    });
    refused(&|p| {
        let e = &mut p.multivariate.as_mut().expect("set").error;
        e.edges.reverse();
    });
    refused(&|p| p.multivariate.as_mut().expect("set").components = vec![vec![1.0, 0.0]; 9]);
    refused(&|p| p.performance.as_mut().expect("set").accuracy[2] = 1.5);
    refused(&|p| p.performance.as_mut().expect("set").edges = vec![0.8, 0.6]);
    refused(&|p| p.performance.as_mut().expect("set").sizes = vec![0, 1000]);
    refused(&|p| {
        p.performance.as_mut().expect("set").lower.pop();
    });

    let mut broken = p;
    broken.features[0]
        .numeric
        .as_mut()
        .expect("numeric")
        .counts
        .pop();
    assert!(matches!(
        ReferenceProfile::from_cbor(&broken.to_cbor()),
        Err(ReferenceError::Inconsistent(_))
    ));
}

#[test]
fn trust_policies_round_trip_and_refuse_bad_ones() {
    let (a, b) = (key(), key());
    let p = policy(&[&a, &b], 2);
    assert_eq!(TrustPolicy::from_toml(&p.to_toml()), Ok(p.clone()));
    let mut wrong_id = p.clone();
    wrong_id.keys[0].id = Some("0000000000000000".into());
    assert!(matches!(
        TrustPolicy::from_toml(&wrong_id.to_toml()),
        Err(TrustPolicyError::IdMismatch { .. })
    ));
    let mut zero = p.clone();
    zero.threshold = 0;
    assert_eq!(
        TrustPolicy::from_toml(&zero.to_toml()),
        Err(TrustPolicyError::ZeroThreshold)
    );
    let mut dup = p;
    dup.keys[1] = dup.keys[0].clone();
    assert!(matches!(
        TrustPolicy::from_toml(&dup.to_toml()),
        Err(TrustPolicyError::DuplicateKey(_))
    ));
    assert!(matches!(
        TrustPolicy::from_toml("threshold = 1\nkeys = []\n"),
        Err(TrustPolicyError::NoKeys)
    ));
    assert!(matches!(
        TrustPolicy::from_toml("threshold = 1\n[[keys]]\npublic = \"ed25519:zz\"\n"),
        Err(TrustPolicyError::Syntax(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes never panic the payload decoders, and stay within a bound. A CBOR
    /// array header can declare any length; serde preallocates at most 1 MiB per sequence
    /// from it ("cautious" size hints), so the bound is 1 MiB per nesting level (our
    /// payload types nest sequences at most three deep).
    #[test]
    fn payload_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let (_, peak) = peak_during(|| {
            let _ = Golden::from_cbor(&bytes);
            let _ = ReferenceProfile::from_cbor(&bytes);
        });
        prop_assert!(peak < 4 << 20, "decoding {} bytes allocated {peak}", bytes.len());
    }

    /// Arbitrary text never panics the TOML decoders.
    #[test]
    fn toml_decoders_never_panic(text in "\\PC{0,512}") {
        let _ = TrustPolicy::from_toml(&text);
        let _ = FeatureSchema::from_toml(&text);
        let _ = BoardProfile::from_toml(&text);
    }

    /// Golden vectors round-trip whatever their values.
    #[test]
    fn golden_round_trips(data in proptest::collection::vec(-1e6f32..1e6, 1..64)) {
        let g = Golden {
            abs_tolerance: 0.0,
            rel_tolerance: 0.0,
            inputs: vec![Tensor::f32("x", vec![data.len() as u64], data.clone())],
            outputs: vec![Tensor::f32("y", vec![1, data.len() as u64], data)],
        };
        prop_assert_eq!(Golden::from_cbor(&g.to_cbor()), Ok(g));
    }

    #[test]
    fn typed_tensors_round_trip(data in typed_data()) {
        let t = Tensor { name: "t".into(), shape: vec![data.len() as u64], data };
        let g = Golden { abs_tolerance: 0.0, rel_tolerance: 0.0, inputs: vec![t.clone()], outputs: vec![t.clone()] };
        let back = Golden::from_cbor(&g.to_cbor()).expect("decodes");
        // NaN payloads aside, the values come back bit for bit.
        prop_assert_eq!(back.inputs[0].data.to_le_bytes(), t.data.to_le_bytes());
        prop_assert_eq!(back.inputs[0].dtype(), t.dtype());
        let again = TensorData::from_le_bytes(t.dtype(), &t.data.to_le_bytes()).expect("decodes");
        prop_assert_eq!(again.to_le_bytes(), t.data.to_le_bytes());
    }

    #[test]
    fn npy_arrays_round_trip(data in typed_data(), rows in 1u64..4) {
        let cols = data.len() as u64;
        let mut all = data.clone();
        for _ in 1..rows {
            all.extend(&data);
        }
        let t = Tensor { name: "x".into(), shape: vec![rows, cols], data: all };
        let back = fleetml_protocol::tensor::from_npy("x", &fleetml_protocol::tensor::to_npy(&t)).expect("decodes");
        prop_assert_eq!(back.shape, t.shape);
        prop_assert_eq!(back.data.to_le_bytes(), t.data.to_le_bytes());
    }

    #[test]
    fn npy_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut with_magic = b"\x93NUMPY\x01\x00".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = fleetml_protocol::tensor::from_npy("x", &bytes);
        let _ = fleetml_protocol::tensor::from_npy("x", &with_magic);
    }

    #[test]
    fn tensor_bytes_never_panic(dtype in proptest::sample::select(vec![
        DType::F32, DType::F16, DType::F64, DType::I8, DType::I32, DType::I64, DType::U8, DType::Bool, DType::String,
    ]), bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(d) = TensorData::from_le_bytes(dtype, &bytes) {
            prop_assert_eq!(d.to_le_bytes(), bytes);
        }
    }
}

fn typed_data() -> impl Strategy<Value = TensorData> {
    use proptest::collection::vec;
    prop_oneof![
        vec(any::<f32>(), 0..16).prop_map(TensorData::F32),
        vec(any::<u16>(), 0..16).prop_map(TensorData::F16),
        vec(any::<f64>(), 0..16).prop_map(TensorData::F64),
        vec(any::<i8>(), 0..16).prop_map(TensorData::I8),
        vec(any::<i32>(), 0..16).prop_map(TensorData::I32),
        vec(any::<i64>(), 0..16).prop_map(TensorData::I64),
        vec(any::<u8>(), 0..16).prop_map(TensorData::U8),
        vec(any::<bool>(), 0..16).prop_map(TensorData::Bool),
    ]
}

/// Golden vectors written before tensors were typed (`{name, shape, data}`) decode as
/// f32 tensors, and f32 tensors are still written that way.
#[test]
fn f32_tensors_keep_the_original_encoding() {
    #[derive(serde::Serialize)]
    struct Old {
        name: String,
        shape: Vec<u64>,
        data: Vec<f32>,
    }
    let old = serde_cbor::to_vec(&Old {
        name: "x".into(),
        shape: vec![2],
        data: vec![1.5, -2.0],
    })
    .expect("encodes");
    let t = Tensor::f32("x", vec![2], vec![1.5, -2.0]);
    assert_eq!(serde_cbor::to_vec(&t).expect("encodes"), old);
    assert_eq!(serde_cbor::from_slice::<Tensor>(&old).expect("decodes"), t);
    // A typed tensor whose bytes do not divide into elements is refused.
    let ragged = Tensor {
        name: "y".into(),
        shape: vec![1],
        data: TensorData::I64(vec![7]),
    };
    let mut bytes = serde_cbor::to_vec(&ragged).expect("encodes");
    let at = bytes.len() - 8;
    bytes[at - 1] -= 1; // byte string of 7
    bytes.pop();
    assert!(serde_cbor::from_slice::<Tensor>(&bytes).is_err());
}

/// An array exactly as numpy 2 writes it (`np.save` of `np.arange(6, dtype='<i8')
/// .reshape(2, 3)`), and the refusals that name what is wrong.
#[test]
fn npy_arrays_as_numpy_writes_them() {
    let mut file = b"\x93NUMPY\x01\x00v\x00".to_vec();
    let header = "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 3), }";
    let mut header = header.to_string();
    header.push_str(&" ".repeat(118 - header.len() - 1));
    header.push('\n');
    file.extend_from_slice(header.as_bytes());
    for i in 0..6i64 {
        file.extend_from_slice(&i.to_le_bytes());
    }
    let t = fleetml_protocol::tensor::from_npy("ids", &file).expect("decodes");
    assert_eq!(t.shape, vec![2, 3]);
    assert_eq!(t.data, TensorData::I64(vec![0, 1, 2, 3, 4, 5]));
    let short = &file[..file.len() - 1];
    assert!(
        fleetml_protocol::tensor::from_npy("ids", short)
            .expect_err("short")
            .contains("needs 48 bytes")
    );
    let mut big_endian = file.clone();
    let at = big_endian
        .windows(3)
        .position(|w| w == b"<i8")
        .expect("descr");
    big_endian[at] = b'>';
    assert!(
        fleetml_protocol::tensor::from_npy("ids", &big_endian)
            .expect_err("big-endian")
            .contains("not supported")
    );
}
