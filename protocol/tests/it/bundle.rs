//! Round trip, tamper matrix, size limits, streaming and property tests of bundles.

use fleetml_protocol::bundle::{self, BundleError, Limits, Region};
use fleetml_protocol::crypto::SigningKey;
use fleetml_protocol::manifest::{Manifest, ManifestDecodeError, ManifestError};
use fleetml_protocol::trust::TrustPolicy;
use proptest::prelude::*;

use crate::alloc_track::peak_during;
use crate::fixture::{self, encode, key, layout, manifest, payloads, policy};

/// Heap growth allowed while verifying hostile input: the 1 MiB manifest limit, one
/// streaming chunk, and room for the decoded manifest.
const ALLOC_BOUND: usize = 3 << 20;

fn verify(bytes: &[u8], policy: &TrustPolicy) -> Result<bundle::VerifiedBundle, BundleError> {
    bundle::verify(bytes, policy, &Limits::default())
}

/// Verifies and also checks that verification stayed within the allocation bound.
fn verify_bounded(
    bytes: &[u8],
    policy: &TrustPolicy,
) -> Result<bundle::VerifiedBundle, BundleError> {
    let (result, peak) = peak_during(|| verify(bytes, policy));
    assert!(peak < ALLOC_BOUND, "verification allocated {peak} bytes");
    result
}

struct Signed {
    k1: SigningKey,
    k2: SigningKey,
    policy: TrustPolicy,
    bytes: Vec<u8>,
}

/// A bundle signed by two keys under a 2-of-3 policy.
fn signed() -> Signed {
    let (k1, k2, k3) = (key(), key(), key());
    let policy = policy(&[&k1, &k2, &k3], 2);
    let p = payloads();
    let bytes = encode(&manifest(&p), &p, &[&k1, &k2]);
    Signed {
        k1,
        k2,
        policy,
        bytes,
    }
}

#[test]
fn round_trip_verifies_and_keeps_the_manifest() {
    let s = signed();
    let v = verify_bounded(&s.bytes, &s.policy).expect("valid bundle verifies");
    assert_eq!(v.manifest, manifest(&payloads()));
    assert_eq!(v.signed_by, vec![s.k1.id(), s.k2.id()]);
    assert_eq!(v.size, s.bytes.len() as u64);
    assert_eq!(v.digest, fleetml_protocol::crypto::sha256(&s.bytes));
    assert_eq!(v.manifest.lineage.seed, Some(7));
    let mut cursor = std::io::Cursor::new(&s.bytes);
    let model = v
        .read_entry(&mut cursor, "model.onnx", 1024)
        .expect("entry reads");
    assert_eq!(model, payloads()[0].1);
}

#[test]
fn flipping_any_header_field_fails_with_its_own_error() {
    let s = signed();
    let flip = |at: usize, mask: u8| {
        let mut b = s.bytes.clone();
        b[at] ^= mask;
        verify_bounded(&b, &s.policy).expect_err("tampered bundle must fail")
    };
    assert!(matches!(flip(0, 0x01), BundleError::BadMagic));
    assert!(matches!(flip(7, 0x80), BundleError::BadMagic));
    assert!(matches!(flip(9, 0x02), BundleError::UnsupportedVersion(3)));
    assert!(matches!(
        flip(10, 0x01),
        BundleError::TooManySignatures { count: 258 }
    ));
    // Two signatures become three: the third record is read from the payload bytes and
    // its key is unknown, the two real ones still meet the threshold, then the payloads
    // are read 72 bytes late and run out inside the first.
    assert!(
        matches!(flip(11, 0x01), BundleError::Truncated(Region::Payload(n)) if n == "model.onnx")
    );
    assert!(matches!(
        flip(12, 0x01),
        BundleError::ManifestTooLarge { .. }
    ));
    // One byte less of manifest: the signature records are read one byte early, so their
    // key ids are unknown.
    assert!(matches!(
        flip(15, 0x01),
        BundleError::UntrustedSigners { .. }
    ));
}

#[test]
fn flipping_any_manifest_byte_breaks_the_signature() {
    let s = signed();
    let l = layout(&s.bytes);
    for at in l.manifest.clone() {
        let mut b = s.bytes.clone();
        b[at] ^= 0x20;
        let err = verify_bounded(&b, &s.policy).expect_err("tampered manifest must fail");
        assert!(
            matches!(err, BundleError::BadSignature { key } if key == s.k1.id()),
            "byte {at}: {err}"
        );
    }
}

#[test]
fn flipping_any_signature_byte_fails_on_that_signature() {
    let s = signed();
    let l = layout(&s.bytes);
    for (i, range) in l.signatures.iter().enumerate() {
        let signer = [&s.k1, &s.k2][i].id();
        for at in range.clone() {
            let mut b = s.bytes.clone();
            b[at] ^= 0x01;
            let err = verify_bounded(&b, &s.policy).expect_err("tampered signature must fail");
            if at - range.start < fleetml_protocol::crypto::KEY_ID_LEN {
                // The key id no longer names a trusted key: one valid signature of two.
                assert!(
                    matches!(
                        err,
                        BundleError::BelowThreshold {
                            valid: 1,
                            required: 2
                        }
                    ),
                    "byte {at}: {err}"
                );
            } else {
                assert!(
                    matches!(err, BundleError::BadSignature { key } if key == signer),
                    "byte {at}: {err}"
                );
            }
        }
    }
}

#[test]
fn flipping_any_payload_byte_fails_on_that_payload() {
    let s = signed();
    let l = layout(&s.bytes);
    for (name, range) in &l.payloads {
        for at in range.clone() {
            let mut b = s.bytes.clone();
            b[at] ^= 0x04;
            let err = verify_bounded(&b, &s.policy).expect_err("tampered payload must fail");
            assert!(
                matches!(&err, BundleError::DigestMismatch { entry } if entry == name),
                "byte {at}: {err}"
            );
        }
    }
}

#[test]
fn truncation_anywhere_names_the_region() {
    let s = signed();
    let l = layout(&s.bytes);
    let cut = |len: usize| {
        verify_bounded(&s.bytes[..len], &s.policy).expect_err("truncated bundle must fail")
    };
    assert!(matches!(cut(0), BundleError::BadMagic));
    assert!(matches!(cut(5), BundleError::BadMagic));
    assert!(matches!(cut(12), BundleError::Truncated(Region::Header)));
    assert!(matches!(
        cut(l.manifest.start + 1),
        BundleError::Truncated(Region::Manifest)
    ));
    assert!(matches!(
        cut(l.manifest.end - 1),
        BundleError::Truncated(Region::Manifest)
    ));
    assert!(matches!(
        cut(l.signatures[0].start + 3),
        BundleError::Truncated(Region::Signatures)
    ));
    assert!(matches!(
        cut(l.signatures[1].end - 1),
        BundleError::Truncated(Region::Signatures)
    ));
    for (name, range) in &l.payloads {
        for len in [range.start, range.start + 1, range.end - 1] {
            let err = cut(len);
            assert!(
                matches!(&err, BundleError::Truncated(Region::Payload(n)) if n == name),
                "cut at {len}: {err}"
            );
        }
    }
}

#[test]
fn junk_after_the_last_payload_is_refused() {
    let s = signed();
    for junk in [&[0u8][..], b"appended", &[0xff; 4096][..]] {
        let mut b = s.bytes.clone();
        b.extend_from_slice(junk);
        assert!(matches!(
            verify_bounded(&b, &s.policy),
            Err(BundleError::TrailingData)
        ));
    }
}

#[test]
fn a_replaced_payload_of_the_same_size_fails_its_digest() {
    let s = signed();
    let l = layout(&s.bytes);
    let (name, range) = &l.payloads[0];
    let mut b = s.bytes.clone();
    let other = b"another model file, same length as the first!!!";
    b[range.clone()].copy_from_slice(&other[..range.len()]);
    let err = verify_bounded(&b, &s.policy).expect_err("replaced model must fail");
    assert!(matches!(&err, BundleError::DigestMismatch { entry } if entry == name));
}

#[test]
fn signer_sets_that_do_not_meet_the_policy_fail_specifically() {
    let (k1, k2, outsider) = (key(), key(), key());
    let p = payloads();
    let m = manifest(&p);
    let two_of_two = policy(&[&k1, &k2], 2);
    let one_of_two = policy(&[&k1, &k2], 1);

    let by_outsider = encode(&m, &p, &[&outsider]);
    match verify_bounded(&by_outsider, &one_of_two) {
        Err(BundleError::UntrustedSigners { signers }) => assert_eq!(signers, vec![outsider.id()]),
        other => panic!("expected UntrustedSigners, got {other:?}"),
    }
    let by_one = encode(&m, &p, &[&k1]);
    assert!(matches!(
        verify_bounded(&by_one, &two_of_two),
        Err(BundleError::BelowThreshold {
            valid: 1,
            required: 2
        })
    ));
    assert!(verify_bounded(&by_one, &one_of_two).is_ok_and(|v| v.signed_by == vec![k1.id()]));
    let by_one_and_outsider = encode(&m, &p, &[&k1, &outsider]);
    let v = verify_bounded(&by_one_and_outsider, &one_of_two).expect("threshold met");
    assert_eq!(v.ignored, vec![outsider.id()]);
    assert!(matches!(
        verify_bounded(&encode(&m, &p, &[]), &one_of_two),
        Err(BundleError::Unsigned)
    ));
    let twice = encode(&m, &p, &[&k1, &k1]);
    assert!(
        matches!(verify_bounded(&twice, &one_of_two), Err(BundleError::DuplicateSignature(k)) if k == k1.id())
    );
}

#[test]
fn oversized_length_fields_are_refused_before_allocating() {
    let s = signed();
    let mut huge_manifest = s.bytes.clone();
    huge_manifest[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        verify_bounded(&huge_manifest, &s.policy),
        Err(BundleError::ManifestTooLarge { len: u32::MAX, .. })
    ));
    let mut many_signatures = s.bytes.clone();
    many_signatures[10..12].copy_from_slice(&u16::MAX.to_be_bytes());
    assert!(matches!(
        verify_bounded(&many_signatures, &s.policy),
        Err(BundleError::TooManySignatures { count: u16::MAX })
    ));

    // A correctly signed manifest that claims an absurd payload size.
    let p = payloads();
    let mut m = manifest(&p);
    m.entries[0].size = u64::MAX / 2;
    let lying = encode_front_only(&m, &[&s.k1, &s.k2]);
    let err = verify_bounded(&lying, &s.policy).expect_err("absurd size must fail");
    assert!(
        matches!(&err, BundleError::EntryTooLarge { entry, .. } if entry == "model.onnx"),
        "{err}"
    );

    // Within the entry limit but beyond the total.
    let limits = Limits {
        max_entry: 1 << 20,
        max_total: 60,
        ..Limits::default()
    };
    let err = bundle::verify(&s.bytes[..], &s.policy, &limits).expect_err("total limit");
    assert!(
        matches!(
            err,
            BundleError::TotalTooLarge {
                total: 111,
                max: 60
            }
        ),
        "{err}"
    );
}

/// A bundle front whose payloads are not appended (their claimed size can be anything).
fn encode_front_only(m: &Manifest, signers: &[&SigningKey]) -> Vec<u8> {
    let bytes = m.to_canonical_cbor();
    let mut out = Vec::new();
    out.extend_from_slice(&bundle::MAGIC);
    out.extend_from_slice(&bundle::CONTAINER_VERSION.to_be_bytes());
    out.extend_from_slice(&(signers.len() as u16).to_be_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&bytes);
    for k in signers {
        out.extend_from_slice(&k.id().0);
        out.extend_from_slice(&k.sign(&bytes));
    }
    out
}

#[test]
fn a_signed_but_semantically_invalid_manifest_is_refused_last() {
    let k = key();
    let pol = policy(&[&k], 1);
    let p = payloads();
    let mut m = manifest(&p);
    m.features.features[1].column = 2; // kind needs columns 2..4 of a 3-column input
    let err = verify_bounded(&encode(&m, &p, &[&k]), &pol).expect_err("bad schema must fail");
    match err {
        BundleError::Invalid(ManifestError::Features(e)) => {
            assert!(e.to_string().contains("`kind`"), "{e}")
        }
        other => panic!("expected a feature schema error, got {other:?}"),
    }
    let mut m = manifest(&p);
    m.entries.retain(|e| e.name != "model.onnx");
    let p2: Vec<_> = p
        .iter()
        .filter(|(n, _)| *n != "model.onnx")
        .cloned()
        .collect();
    let err = verify_bounded(&encode(&m, &p2, &[&k]), &pol).expect_err("no model must fail");
    assert!(matches!(
        err,
        BundleError::Invalid(ManifestError::MissingEntry("model.onnx"))
    ));
}

#[test]
fn a_non_canonical_manifest_is_refused() {
    let p = payloads();
    let m = manifest(&p);
    // Struct-order CBOR is valid CBOR but not our canonical (sorted-key) encoding.
    let struct_order = serde_cbor::to_vec(&m).expect("encodes");
    assert_ne!(struct_order, m.to_canonical_cbor());
    assert_eq!(
        Manifest::from_canonical_cbor(&struct_order),
        Err(ManifestDecodeError::NotCanonical)
    );
    assert_eq!(
        Manifest::from_canonical_cbor(&m.to_canonical_cbor()).as_ref(),
        Ok(&m)
    );
}

#[test]
fn streaming_verification_of_a_large_payload_stays_in_bounded_memory() {
    let k = key();
    let pol = policy(&[&k], 1);
    let big = vec![0x5au8; 64 << 20];
    let mut p = payloads();
    p.push(("weights.bin", big));
    let bytes = encode(&manifest(&p), &p, &[&k]);
    drop(p);
    // A reader that hands out the bundle in small pieces, like a file.
    let reader = std::io::BufReader::with_capacity(8192, &bytes[..]);
    let (result, peak) = peak_during(|| bundle::verify(reader, &pol, &Limits::default()));
    let v = result.expect("large bundle verifies");
    assert_eq!(
        v.manifest.entry("weights.bin").map(|e| e.size),
        Some(64 << 20)
    );
    assert!(
        peak < ALLOC_BOUND,
        "verifying a 64 MiB bundle allocated {peak} bytes"
    );
}

#[test]
fn add_signature_is_idempotent_and_keeps_payloads() {
    let (k1, k2) = (key(), key());
    let p = payloads();
    let unsigned = encode(&manifest(&p), &p, &[]);
    let sign = |bytes: &[u8], k: &SigningKey| {
        let bytes_m = bundle::read_unverified(bytes, &Limits::default())
            .expect("front")
            .manifest_bytes;
        let rec = bundle::SignatureRecord {
            key: k.id(),
            signature: k.sign(&bytes_m),
        };
        let mut out = Vec::new();
        let changed =
            bundle::add_signature(bytes, &mut out, rec, &Limits::default()).expect("signs");
        (changed, out)
    };
    let (changed, once) = sign(&unsigned, &k1);
    assert!(changed);
    let (changed, twice) = sign(&once, &k1);
    assert!(!changed);
    assert_eq!(once, twice);
    let (_, both) = sign(&once, &k2);
    let v = verify_bounded(&both, &policy(&[&k1, &k2], 2)).expect("2-of-2 verifies");
    assert_eq!(v.signed_by.len(), 2);
    // Signing a tampered bundle is refused: the payloads are re-hashed on the way.
    let mut bad = once.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let rec = bundle::SignatureRecord {
        key: k2.id(),
        signature: [0; 64],
    };
    let err = bundle::add_signature(&bad[..], &mut Vec::new(), rec, &Limits::default())
        .expect_err("tampered");
    assert!(matches!(err, BundleError::DigestMismatch { .. }));
}

fn arb_signed() -> &'static (Vec<u8>, TrustPolicy) {
    static CELL: std::sync::OnceLock<(Vec<u8>, TrustPolicy)> = std::sync::OnceLock::new();
    CELL.get_or_init(|| {
        let k = key();
        let p = payloads();
        (encode(&manifest(&p), &p, &[&k]), policy(&[&k], 1))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any byte string either verifies or fails cleanly, within the allocation bound.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let (_, pol) = arb_signed();
        let (result, peak) = peak_during(|| verify(&bytes, pol));
        prop_assert!(result.is_err(), "random bytes cannot carry a trusted signature");
        prop_assert!(peak < ALLOC_BOUND);
    }

    /// Random bytes behind a valid header exercise the deeper decoders.
    #[test]
    fn arbitrary_bodies_behind_a_valid_header_never_panic(
        count in 0u16..4,
        len in 0u32..2048,
        body in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        let (_, pol) = arb_signed();
        let mut bytes = bundle::MAGIC.to_vec();
        bytes.extend_from_slice(&bundle::CONTAINER_VERSION.to_be_bytes());
        bytes.extend_from_slice(&count.to_be_bytes());
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&body);
        let (result, peak) = peak_during(|| verify(&bytes, pol));
        prop_assert!(result.is_err());
        prop_assert!(peak < ALLOC_BOUND);
        let _ = bundle::read_unverified(&bytes[..], &Limits::default());
    }

    /// Any single-byte change to a valid bundle is detected.
    #[test]
    fn any_single_byte_change_is_detected(at in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let (bytes, pol) = arb_signed();
        let mut b = bytes.clone();
        let i = at.index(b.len());
        b[i] ^= mask;
        prop_assert!(verify(&b, pol).is_err());
    }

    /// Manifests round-trip through the canonical encoding and a signed bundle.
    #[test]
    fn manifests_round_trip(version in 1u64.., label in "[a-z0-9 ._-]{0,40}", seed in any::<Option<u64>>()) {
        let k = fixture::key();
        let p = payloads();
        let mut m = manifest(&p);
        m.version = version;
        m.label = label;
        m.lineage.seed = seed;
        let v = verify(&encode(&m, &p, &[&k]), &policy(&[&k], 1)).expect("round trip");
        prop_assert_eq!(v.manifest, m);
    }
}
