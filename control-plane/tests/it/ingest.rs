//! Telemetry ingest: de-duplication by (device, seq), gaps, forged messages stored never.

use fleet_control::ingest::{DeviceRecord, FleetStore, Ingest, Outcome, SledStore};
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

#[test]
fn messages_are_stored_once_in_order_with_gaps_noticed_and_forgeries_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(&dir.path().join("fleet")).expect("store");
    assert!(
        store
            .enroll(&DeviceRecord {
                id: DeviceId::new("pi-07").expect("id"),
                board: None,
                tags: Default::default(),
                secret: SECRET.to_vec(),
                enrolled_ms: 0,
            })
            .expect("enroll")
    );
    let ingest = Ingest::new(store);

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
    let (_, m5) = event(5);
    assert!(matches!(
        ingest.handle("fleetml/v1/pi-08/events", &m5, 0),
        Ok(Outcome::Refused(MessageError::DeviceMismatch { .. }))
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
