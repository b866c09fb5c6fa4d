//! Telemetry ingest: de-duplication by (device, seq), gaps, forged messages stored never.

use fleet_control::ingest::{Ingest, Outcome};
use fleet_control::records::DeviceRecord;
use fleet_control::store::FleetStore;
use fleet_control::store::sled::SledStore;
use fleetml_protocol::telemetry::{self, Body, DeviceId, Event, Lifecycle, MessageError};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn event(seq: u64) -> (String, Vec<u8>) {
    telemetry::seal(
        &DeviceId::new("pi-07").expect("id"),
        seq,
        1_795_000_000_000 + seq,
        Body::Event(Event {
            kind: Lifecycle::Activated,
            model: "claims".into(),
            version: seq,
            detail: String::new(),
        }),
        SECRET,
    )
}

/// A store in `dir` with device pi-07 enrolled (secret [`SECRET`]).
fn store_with_pi07(dir: &std::path::Path) -> SledStore {
    let store = SledStore::open(&dir.join("fleet")).expect("store");
    assert!(
        store
            .enroll(&DeviceRecord {
                id: DeviceId::new("pi-07").expect("id"),
                board: None,
                tags: Default::default(),
                secret: SECRET.to_vec(),
                enrolled_ms: 0,
                revoked_ms: None,
            })
            .expect("enroll"),
        "enrolled once"
    );
    store
}

#[test]
fn messages_are_stored_once_in_order_with_gaps_noticed_and_forgeries_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ingest = Ingest::new(store_with_pi07(dir.path()));

    let (t, m0) = event(0);
    assert_eq!(ingest.handle(&t, &m0, 0), Ok(Outcome::Stored { gap: None }));
    assert_eq!(
        ingest.handle(&t, &m0, 0),
        Ok(Outcome::Duplicate),
        "re-published after a reconnect"
    );
    let (_, m3) = event(3);
    assert_eq!(
        ingest.handle(&t, &m3, 0),
        Ok(Outcome::Stored { gap: Some((1, 2)) })
    );
    for seq in [1, 2] {
        let (_, m) = event(seq);
        assert_eq!(
            ingest.handle(&t, &m, 0),
            Ok(Outcome::Stored { gap: None }),
            "the gap fills"
        );
    }
    // Forged (other secret), and a message of pi-07 on pi-08's topic.
    let (t4, forged) = telemetry::seal(
        &DeviceId::new("pi-07").expect("id"),
        4,
        0,
        Body::Event(Event {
            kind: Lifecycle::RolledBack,
            model: "claims".into(),
            version: 1,
            detail: String::new(),
        }),
        b"not the secret of this device!!!",
    );
    assert_eq!(
        ingest.handle(&t4, &forged, 0),
        Ok(Outcome::Refused(MessageError::BadAuthenticator))
    );
    // Checked with the topic's device's secret (pi-08 is not enrolled here).
    let (_, m5) = event(5);
    assert!(matches!(
        ingest.handle("fleetml/v1/pi-08/events", &m5, 0),
        Ok(Outcome::Refused(
            MessageError::UnknownDevice(_) | MessageError::BadAuthenticator
        ))
    ));
    assert!(matches!(
        ingest.handle(&t, b"\xa1\x61garbage", 0),
        Ok(Outcome::Refused(MessageError::Malformed(_)))
    ));

    let stored = ingest
        .store
        .messages(&DeviceId::new("pi-07").expect("id"), 0, 100)
        .expect("messages");
    assert_eq!(
        stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    let c = &ingest.counters;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        (
            c.stored.load(Relaxed),
            c.duplicates.load(Relaxed),
            c.refused.load(Relaxed),
            c.gaps.load(Relaxed)
        ),
        (4, 1, 3, 1)
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Arbitrary bytes, and any truncation or bit flip of a valid message, on any
    /// telemetry topic: the ingest never panics, never errors, and stores nothing.
    #[test]
    fn random_and_damaged_messages_are_refused_and_never_stored(
        noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
        cut in 0usize..10_000,
        flip in 0usize..10_000,
        channel in 0usize..3,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let ingest = Ingest::new(store_with_pi07(dir.path()));
        let topic = format!("fleetml/v1/pi-07/{}", ["status", "telemetry", "events"][channel]);
        let (_, valid) = event(9);
        let truncated = &valid[..cut % valid.len()];
        let mut flipped = valid.clone();
        let i = flip % (flipped.len() * 8);
        flipped[i / 8] ^= 1 << (i % 8);
        for bytes in [noise.as_slice(), truncated] {
            let outcome = ingest.handle(&topic, bytes, 0).expect("no store error");
            proptest::prop_assert!(matches!(outcome, Outcome::Refused(_)), "{outcome:?}");
        }
        // The authenticator covers the decoded content (re-encoded canonically), so a
        // flip that leaves the content as it was (a non-canonical encoding of the same
        // integer, say) is the same message; anything else is refused.
        let outcome = ingest.handle(&topic, &flipped, 0).expect("no store error");
        let stored = ingest
            .store
            .messages(&DeviceId::new("pi-07").expect("id"), 0, 10)
            .expect("messages");
        let original = telemetry::open(&topic, &valid, |_| Some(SECRET.to_vec()));
        match outcome {
            Outcome::Refused(_) => proptest::prop_assert!(stored.is_empty()),
            _ => proptest::prop_assert_eq!(stored, vec![original.expect("valid")]),
        }
    }
}
