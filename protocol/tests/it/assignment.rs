//! Signed assignments: what a device accepts, and every refusal (replay, freeze, unknown
//! key, forged signature, wrong device, malformed bytes).

use fleetml_protocol::assignment::{
    AssignedModel, Assignment, AssignmentError, Checked, FORMAT, Held, ShadowModel,
    SignedAssignment, http_token, parse_http_token,
};
use fleetml_protocol::crypto::{SigningKey, sha256};
use fleetml_protocol::telemetry::DeviceId;
use fleetml_protocol::trust::{TrustPolicy, TrustedKey};
use proptest::prelude::*;

use crate::fixture;

const NOW: u64 = 1_800_000_000_000;

fn device() -> DeviceId {
    DeviceId::new("pi-07").expect("id")
}

fn policy(assignment_key: &SigningKey) -> TrustPolicy {
    let mut p = fixture::policy(&[&fixture::key()], 1);
    p.assignment_keys = vec![TrustedKey {
        name: Some("control plane".into()),
        public: assignment_key.public_key(),
        id: None,
    }];
    p.validate().expect("valid");
    p
}

fn assignment(generation: u64, version: u64) -> Assignment {
    Assignment {
        format: FORMAT,
        device: device(),
        generation,
        issued_ms: NOW - 1000,
        expires_ms: NOW + 60_000,
        models: [(
            "claims".to_string(),
            AssignedModel {
                shadow: None,
                version,
                digest: sha256(format!("v{version}").as_bytes()),
                size: 1234,
                rollout: Some("r1".into()),
            },
        )]
        .into(),
    }
}

fn check(
    signed: &SignedAssignment,
    policy: &TrustPolicy,
    held: Option<&Assignment>,
) -> Result<Checked, AssignmentError> {
    signed.check(
        policy,
        &device(),
        held.map(|h| Held {
            generation: h.generation,
            models: &h.models,
        }),
        NOW,
    )
}

#[test]
fn a_newer_generation_signed_by_the_trusted_key_is_accepted_and_survives_cbor() {
    let key = fixture::key();
    let p = policy(&key);
    let signed = assignment(2, 3).sign(&key);
    let decoded = SignedAssignment::from_cbor(&signed.to_cbor()).expect("decodes");
    let held = assignment(1, 2);
    assert_eq!(
        check(&decoded, &p, Some(&held)),
        Ok(Checked::Newer(assignment(2, 3)))
    );
    assert_eq!(
        check(&decoded, &p, None),
        Ok(Checked::Newer(assignment(2, 3)))
    );
    // The same generation re-signed later (a fresh expiry) changes nothing.
    let mut later = assignment(2, 3);
    later.expires_ms += 1;
    assert!(matches!(
        check(&later.sign(&key), &p, Some(&assignment(2, 3))),
        Ok(Checked::Unchanged(_))
    ));
    // An intended rollback is a higher generation naming the older version.
    assert!(matches!(
        check(&assignment(3, 2).sign(&key), &p, Some(&assignment(2, 3))),
        Ok(Checked::Newer(_))
    ));
}

#[test]
fn replayed_conflicting_and_expired_assignments_are_refused() {
    let key = fixture::key();
    let p = policy(&key);
    let held = assignment(5, 3);
    assert_eq!(
        check(&assignment(4, 3).sign(&key), &p, Some(&held)),
        Err(AssignmentError::Replayed { given: 4, held: 5 })
    );
    assert_eq!(
        check(&assignment(5, 9).sign(&key), &p, Some(&held)),
        Err(AssignmentError::Conflicting(5))
    );
    let mut expired = assignment(6, 3);
    expired.expires_ms = NOW;
    let e = check(&expired.sign(&key), &p, Some(&held)).expect_err("expired");
    assert!(
        matches!(e, AssignmentError::Expired { generation: 6, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("generation 6 expired"), "{e}");
}

#[test]
fn foreign_keys_forged_signatures_and_other_devices_are_refused() {
    let key = fixture::key();
    let p = policy(&key);
    let other = fixture::key();
    let e = check(&assignment(1, 1).sign(&other), &p, None).expect_err("foreign");
    assert_eq!(e, AssignmentError::UnknownKey(other.id()));
    assert!(e.to_string().contains("assignment_keys"), "{e}");
    // A bundle signing key is not an assignment key.
    let bundle_only = fixture::policy(&[&key], 1);
    assert!(matches!(
        check(&assignment(1, 1).sign(&key), &bundle_only, None),
        Err(AssignmentError::UnknownKey(_))
    ));
    let mut forged = assignment(1, 1).sign(&key);
    let last = forged.assignment.len() - 1;
    forged.assignment[last] ^= 1;
    assert_eq!(
        check(&forged, &p, None),
        Err(AssignmentError::BadSignature(key.id()))
    );
    let mut elsewhere = assignment(1, 1);
    elsewhere.device = DeviceId::new("pi-08").expect("id");
    assert!(matches!(
        check(&elsewhere.sign(&key), &p, None),
        Err(AssignmentError::WrongDevice { .. })
    ));
    assert!(matches!(
        SignedAssignment::from_cbor(&vec![0u8; 70_000]),
        Err(AssignmentError::TooLarge(70_000))
    ));
}

#[test]
fn device_http_tokens_name_their_device_and_depend_on_the_secret() {
    let t = http_token(&device(), b"0123456789abcdef0123456789abcdef");
    let (id, key) = parse_http_token(&t).expect("parses");
    assert_eq!(id, device());
    assert_eq!(key.len(), 64);
    assert!(
        !t.contains("0123456789abcdef0123"),
        "the secret is not in the token"
    );
    assert_ne!(
        t,
        http_token(&device(), b"another secret, 32 bytes long...")
    );
    assert!(parse_http_token("fmt_abc").is_none());
    assert!(parse_http_token("device:Bad Id:00").is_none());
}

proptest! {
    #[test]
    fn random_bytes_are_never_an_accepted_assignment(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let key = fixture::key();
        let p = policy(&key);
        if let Ok(signed) = SignedAssignment::from_cbor(&bytes) {
            prop_assert!(check(&signed, &p, None).is_err());
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused_or_changes_nothing(at in 0usize..10_000, bit in 0u8..8) {
        let key = fixture::key();
        let p = policy(&key);
        let original = assignment(2, 3);
        let mut bytes = original.sign(&key).to_cbor();
        let at = at % bytes.len();
        bytes[at] ^= 1 << bit;
        if let Ok(signed) = SignedAssignment::from_cbor(&bytes) {
            match check(&signed, &p, None) {
                Ok(Checked::Newer(a)) | Ok(Checked::Unchanged(a)) => prop_assert_eq!(a, original),
                Err(_) => {}
            }
        }
    }
}

fn with_shadow(sample_permille: u16) -> Assignment {
    let mut a = assignment(2, 3);
    if let Some(m) = a.models.get_mut("claims") {
        m.shadow = Some(ShadowModel {
            version: 4,
            digest: sha256(b"v4"),
            size: 99,
            sample_permille,
            rollout: Some("r2".into()),
        });
    }
    a
}

proptest! {
    /// A shadow version travels signed with its model; a sample outside 1..=1000 per
    /// thousand is refused even when the signature is good.
    #[test]
    fn a_shadow_is_accepted_only_with_a_sample_between_one_and_a_thousand(sample in any::<u16>()) {
        let key = fixture::key();
        let p = policy(&key);
        let a = with_shadow(sample);
        let checked = check(&a.sign(&key), &p, None);
        if (1..=1000).contains(&sample) {
            prop_assert_eq!(checked, Ok(Checked::Newer(a)));
        } else {
            let refused = matches!(checked, Err(AssignmentError::Malformed(ref e)) if e.contains("shadow sample"));
            prop_assert!(refused, "{:?}", checked);
        }
    }
}

/// An assignment without a shadow encodes as before shadows existed (agents that know
/// nothing of them keep accepting it), and the shadow changes the signed bytes.
#[test]
fn a_shadow_is_part_of_the_signed_assignment_and_absent_ones_leave_no_trace() {
    let plain = assignment(2, 3).to_cbor();
    assert!(!plain.windows(6).any(|w| w == b"shadow"));
    assert_ne!(with_shadow(1000).to_cbor(), plain);
}
