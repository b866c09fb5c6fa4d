//! Small bundles built in memory with fresh keys.

use fleetml_protocol::bundle::{self, SignatureRecord};
use fleetml_protocol::crypto::{SigningKey, sha256};
use fleetml_protocol::features::{Encoding, Feature, FeatureSchema, FeatureType};
use fleetml_protocol::manifest::{
    DType, Dim, Entry, Lineage, MANIFEST_FORMAT, Manifest, Targets, TensorSpec,
};
use fleetml_protocol::trust::{TrustPolicy, TrustedKey};

pub fn key() -> SigningKey {
    SigningKey::generate().expect("key generation").0
}

pub fn policy(keys: &[&SigningKey], threshold: u32) -> TrustPolicy {
    let keys = keys
        .iter()
        .map(|k| TrustedKey {
            name: None,
            public: k.public_key(),
            id: None,
        })
        .collect();
    TrustPolicy::new(threshold, keys).expect("valid policy")
}

pub fn schema() -> FeatureSchema {
    FeatureSchema {
        features: vec![
            Feature {
                name: "amount".into(),
                kind: FeatureType::Float,
                unit: Some("EUR".into()),
                description: None,
                min: Some(0.0),
                max: Some(1e6),
                values: vec![],
                encoding: None,
                impute: None,
                input: "input".into(),
                column: 0,
            },
            Feature {
                name: "kind".into(),
                kind: FeatureType::Category,
                unit: None,
                description: None,
                min: None,
                max: None,
                values: vec!["a".into(), "b".into()],
                encoding: Some(Encoding::OneHot),
                impute: None,
                input: "input".into(),
                column: 1,
            },
        ],
    }
}

pub fn manifest(payloads: &[(&str, Vec<u8>)]) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        name: "claims".into(),
        version: 3,
        label: "test".into(),
        created_at: 1_790_000_000,
        entries: payloads
            .iter()
            .map(|(n, b)| Entry {
                name: n.to_string(),
                size: b.len() as u64,
                sha256: sha256(b),
            })
            .collect(),
        inputs: vec![TensorSpec {
            name: "input".into(),
            dtype: DType::F32,
            shape: vec![Dim::Symbol("N".into()), Dim::Fixed(3)],
        }],
        outputs: vec![TensorSpec {
            name: "probabilities".into(),
            dtype: DType::F32,
            shape: vec![Dim::Symbol("N".into()), Dim::Fixed(2)],
        }],
        features: schema(),
        targets: Targets {
            backends: vec!["cpu".into()],
            boards: vec![],
        },
        min_agent_version: "0.1.0".into(),
        lineage: Lineage {
            seed: Some(7),
            ..Default::default()
        },
        monitoring: Default::default(),
        serving: Default::default(),
    }
}

pub fn payloads() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "model.onnx",
            b"not really onnx, the protocol does not parse it".to_vec(),
        ),
        ("reference.cbor", vec![0xa0; 40]),
        ("golden.cbor", vec![0x80; 24]),
    ]
}

/// Encodes a bundle of `manifest` and `payloads`, signed by `signers`.
pub fn encode(
    manifest: &Manifest,
    payloads: &[(&str, Vec<u8>)],
    signers: &[&SigningKey],
) -> Vec<u8> {
    let bytes = manifest.to_canonical_cbor();
    let sigs: Vec<SignatureRecord> = signers
        .iter()
        .map(|k| SignatureRecord {
            key: k.id(),
            signature: k.sign(&bytes),
        })
        .collect();
    let mut out = Vec::new();
    bundle::write(&mut out, &bytes, &sigs, manifest, |name, w| {
        let (_, data) = payloads
            .iter()
            .find(|(n, _)| *n == name)
            .expect("payload exists");
        w.write_all(data)
    })
    .expect("bundle writes");
    out
}

/// Byte layout of an encoded bundle, for aiming tampering.
#[derive(Debug, Clone)]
pub struct Layout {
    pub manifest: std::ops::Range<usize>,
    pub signatures: Vec<std::ops::Range<usize>>,
    pub payloads: Vec<(String, std::ops::Range<usize>)>,
}

pub fn layout(bytes: &[u8]) -> Layout {
    let front = bundle::read_unverified(bytes, &Default::default()).expect("valid front");
    let m = front.manifest_bytes.len();
    let manifest = bundle::HEADER_LEN..bundle::HEADER_LEN + m;
    let signatures = (0..front.signatures.len())
        .map(|i| {
            let start = manifest.end + i * bundle::SIGNATURE_RECORD_LEN;
            start..start + bundle::SIGNATURE_RECORD_LEN
        })
        .collect();
    let mut at = front.payload_offset() as usize;
    let payloads = front
        .manifest
        .entries
        .iter()
        .map(|e| {
            let r = at..at + e.size as usize;
            at = r.end;
            (e.name.clone(), r)
        })
        .collect();
    Layout {
        manifest,
        signatures,
        payloads,
    }
}
