//! Telemetry messages: topics, authentication, refusal of forged and malformed messages.

use fleetml_protocol::telemetry::{
    self, ActiveModel, Body, Channel, DeviceId, Event, Lifecycle, MessageError, Status,
};
use proptest::prelude::*;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn device(id: &str) -> DeviceId {
    DeviceId::new(id).expect("valid id")
}

fn status() -> Body {
    Body::Status(Status {
        agent_version: "0.1.0".into(),
        board: "raspberry-pi-4".into(),
        backends: vec!["cpu".into()],
        models: vec![ActiveModel {
            name: "claims".into(),
            version: 3,
            backend: "cpu".into(),
            fallbacks: vec![],
        }],
        uptime_s: 42,
        online: true,
        outbox_depth: 0,
        dropped_windows: 0,
        will_seq: None,
    })
}

fn secret_for(id: &'static str) -> impl Fn(&DeviceId) -> Option<Vec<u8>> {
    move |d: &DeviceId| (d.as_str() == id).then(|| SECRET.to_vec())
}

#[test]
fn a_sealed_message_opens_on_its_topic() {
    let d = device("pi-07");
    let (topic, bytes) = telemetry::seal(&d, 17, 1_795_000_000_000, status(), SECRET);
    assert_eq!(topic, "fleetml/v1/pi-07/status");
    let env = telemetry::open(&topic, &bytes, secret_for("pi-07")).expect("opens");
    assert_eq!((env.device.as_str(), env.seq), ("pi-07", 17));
    assert_eq!(env.body, status());
    assert_eq!(
        telemetry::parse_topic("fleetml/v1/pi-07/events").expect("topic"),
        (d, Channel::Events)
    );
}

#[test]
fn forged_misaddressed_and_misrouted_messages_are_refused() {
    let d = device("pi-07");
    let (topic, bytes) = telemetry::seal(&d, 1, 0, status(), b"the wrong secret, 32 bytes long!");
    assert_eq!(
        telemetry::open(&topic, &bytes, secret_for("pi-07")),
        Err(MessageError::BadAuthenticator)
    );
    // A valid message of pi-07 replayed on another device's topic.
    let (_, bytes) = telemetry::seal(&d, 1, 0, status(), SECRET);
    assert_eq!(
        telemetry::open("fleetml/v1/pi-08/status", &bytes, secret_for("pi-07")),
        Err(MessageError::DeviceMismatch {
            topic: "pi-08".into(),
            message: "pi-07".into()
        })
    );
    // A status on the events topic.
    assert!(matches!(
        telemetry::open("fleetml/v1/pi-07/events", &bytes, secret_for("pi-07")),
        Err(MessageError::WrongChannel { .. })
    ));
    // An unknown device.
    assert_eq!(
        telemetry::open("fleetml/v1/pi-07/status", &bytes, |_| None),
        Err(MessageError::UnknownDevice("pi-07".into()))
    );
    // Any change to the body breaks the authenticator.
    let (topic, bytes) = telemetry::seal(
        &d,
        2,
        0,
        Body::Event(Event {
            kind: Lifecycle::Activated,
            model: "claims".into(),
            version: 3,
            detail: String::new(),
        }),
        SECRET,
    );
    let tampered: Vec<u8> = {
        let mut env: serde_cbor::Value = serde_cbor::from_slice(&bytes).expect("cbor");
        if let serde_cbor::Value::Map(m) = &mut env {
            m.insert(
                serde_cbor::Value::Text("seq".into()),
                serde_cbor::Value::Integer(3),
            );
        }
        serde_cbor::to_vec(&env).expect("cbor")
    };
    assert_eq!(
        telemetry::open(&topic, &tampered, secret_for("pi-07")),
        Err(MessageError::BadAuthenticator)
    );
}

#[test]
fn bad_topics_and_ids_are_named() {
    for t in [
        "fleetml/v2/a/status",
        "fleetml/v1/a",
        "fleetml/v1/A/status",
        "fleetml/v1/a/other",
        "",
    ] {
        assert!(
            matches!(telemetry::parse_topic(t), Err(MessageError::BadTopic(_))),
            "{t}"
        );
    }
    assert!(DeviceId::new("").is_err());
    assert!(DeviceId::new(&"x".repeat(65)).is_err());
    assert!(DeviceId::new("has space").is_err());
    assert!(DeviceId::new("pi-07.lab_1").is_ok());
}

#[test]
fn oversize_messages_are_refused_before_decoding() {
    let big = vec![0u8; telemetry::MAX_MESSAGE + 1];
    assert_eq!(
        telemetry::open("fleetml/v1/a/status", &big, |_| None),
        Err(MessageError::TooLarge(telemetry::MAX_MESSAGE + 1))
    );
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = telemetry::open("fleetml/v1/pi-07/telemetry", &bytes, secret_for("pi-07"));
    }

    #[test]
    fn every_truncation_of_a_message_is_refused(cut in 0usize..10_000, seq in any::<u64>(), uptime in any::<u64>()) {
        let d = device("pi-07");
        let mut body = status();
        if let Body::Status(s) = &mut body { s.uptime_s = uptime; }
        let (topic, bytes) = telemetry::seal(&d, seq, 5, body, SECRET);
        let cut = cut % bytes.len();
        prop_assert!(telemetry::open(&topic, &bytes[..cut], secret_for("pi-07")).is_err());
        prop_assert!(telemetry::open(&topic, &bytes, secret_for("pi-07")).is_ok());
    }
}

#[test]
fn broker_urls_parse_and_hide_their_password() {
    use telemetry::BrokerUrl;
    let u: BrokerUrl = "mqtt://ingest:s3cret@broker.example:8883"
        .parse()
        .expect("url");
    assert_eq!((u.host.as_str(), u.port), ("broker.example", 8883));
    assert_eq!(u.password.as_deref(), Some("s3cret"));
    assert_eq!(u.to_string(), "mqtt://ingest@broker.example:8883");
    assert!(!format!("{u:?}").contains("s3cret"));
    let u: BrokerUrl = "mqtt://[::1]".parse().expect("v6");
    assert_eq!((u.host.as_str(), u.port), ("::1", 1883));
    for bad in ["http://x", "mqtt://", "mqtt://h:99999", "mqtt://h/topic"] {
        assert!(bad.parse::<BrokerUrl>().is_err(), "{bad}");
    }
    let u: BrokerUrl = "mqtts://broker.example".parse().expect("tls");
    assert!(u.tls && !"mqtt://h".parse::<BrokerUrl>().expect("plain").tls);
    assert_eq!(u.port, 8883, "the MQTT-over-TLS port by default");
    assert_eq!(u.to_string(), "mqtts://broker.example:8883");
    let e = "https://h".parse::<BrokerUrl>().expect_err("not MQTT");
    assert!(e.contains("mqtts://"), "{e}");
}

#[test]
fn the_mqtt_password_is_derived_not_the_secret() {
    let p = telemetry::mqtt_password(SECRET);
    assert_eq!(p.len(), 64);
    assert_ne!(p.as_bytes(), SECRET);
    assert_eq!(p, telemetry::mqtt_password(SECRET));
    assert_ne!(p, telemetry::mqtt_password(b"another secret"));
}

#[test]
fn a_receipt_travels_on_the_cmd_topic_and_verifies() {
    let body = Body::Receipt(telemetry::Receipt {
        stored: vec![[0, 4], [7, 7]],
    });
    let (topic, bytes) = telemetry::seal(&device("pi-07"), 0, 1, body.clone(), SECRET);
    assert_eq!(topic, "fleetml/v1/pi-07/cmd");
    let opened = telemetry::open(&topic, &bytes, secret_for("pi-07")).expect("opens");
    assert_eq!(opened.body, body);
    // On a device → cloud topic it is refused.
    let err = telemetry::open("fleetml/v1/pi-07/events", &bytes, secret_for("pi-07"))
        .expect_err("wrong channel");
    assert!(matches!(err, MessageError::WrongChannel { .. }), "{err}");
}

proptest! {
    /// Receipts built from any set of sequence numbers name exactly that set, in
    /// ascending, disjoint, non-adjacent ranges, and no receipt is over the range limit.
    #[test]
    fn receipts_cover_exactly_what_was_stored(
        seqs in proptest::collection::vec(prop_oneof![0u64..3000, Just(u64::MAX), Just(u64::MAX - 1)], 0..3000)
    ) {
        let receipts = telemetry::Receipt::covering(seqs.iter().copied());
        let want: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
        let mut got = std::collections::BTreeSet::new();
        let mut previous: Option<u64> = None;
        for r in &receipts {
            prop_assert!(!r.stored.is_empty());
            prop_assert!(r.stored.len() <= telemetry::MAX_RECEIPT_RANGES);
            for &[a, b] in &r.stored {
                prop_assert!(a <= b);
                if let Some(p) = previous {
                    prop_assert!(a > p.saturating_add(1), "ranges touch or overlap: {p} then {a}");
                }
                previous = Some(b);
                for s in a..=b {
                    prop_assert!(r.names(s));
                    got.insert(s);
                }
            }
        }
        prop_assert_eq!(got, want);
    }
}
