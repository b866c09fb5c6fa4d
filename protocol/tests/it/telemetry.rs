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
            shadow: None,
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
    // A valid message of pi-07 replayed on another device's topic: checked with that
    // device's secret.
    let (_, bytes) = telemetry::seal(&d, 1, 0, status(), SECRET);
    let two = |id: &DeviceId| match id.as_str() {
        "pi-07" => Some(SECRET.to_vec()),
        "pi-08" => Some(vec![8; 32]),
        _ => None,
    };
    assert_eq!(
        telemetry::open("fleetml/v1/pi-08/status", &bytes, two),
        Err(MessageError::BadAuthenticator)
    );
    // pi-07 speaking for pi-08 on its own topic, with its own secret.
    let (_, impostor) = telemetry::seal(&device("pi-08"), 1, 0, status(), SECRET);
    assert_eq!(
        telemetry::open("fleetml/v1/pi-07/status", &impostor, secret_for("pi-07")),
        Err(MessageError::DeviceMismatch {
            topic: "pi-07".into(),
            message: "pi-08".into()
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
        use serde_cbor::Value;
        let mut env: Value = serde_cbor::from_slice(&bytes).expect("cbor");
        if let Value::Map(m) = &mut env
            && let Some(Value::Bytes(msg)) = m.get_mut(&Value::Text("msg".into()))
        {
            let mut fields: Value = serde_cbor::from_slice(msg).expect("cbor");
            if let Value::Map(f) = &mut fields {
                f.insert(Value::Text("seq".into()), Value::Integer(3));
            }
            *msg = serde_cbor::to_vec(&fields).expect("cbor");
        }
        serde_cbor::to_vec(&env).expect("cbor")
    };
    assert_eq!(
        telemetry::open(&topic, &tampered, secret_for("pi-07")),
        Err(MessageError::BadAuthenticator)
    );
}

/// On the wire: `{v: 2, msg, auth}`, `auth` the HMAC-SHA256 of the `msg` bytes exactly
/// as sent, under the 32-byte secret (checked here with ring's HMAC over the raw bytes,
/// not through `open`); a format-1 message (fields and `auth` in one map, the MAC over
/// their encoding) from an agent of an earlier version still opens.
#[test]
fn the_mac_covers_the_msg_bytes_as_sent_and_format_1_still_opens() {
    use serde_cbor::Value;
    let d = device("pi-07");
    let (topic, bytes) = telemetry::seal(&d, 5, 9, status(), SECRET);
    let Value::Map(outer) = serde_cbor::from_slice::<Value>(&bytes).expect("cbor") else {
        panic!("a map");
    };
    let get = |k: &str| outer.get(&Value::Text(k.into())).cloned();
    assert_eq!(get("v"), Some(Value::Integer(2)));
    let (Some(Value::Bytes(msg)), Some(Value::Bytes(auth))) = (get("msg"), get("auth")) else {
        panic!("msg and auth are byte strings");
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    ring::hmac::verify(&key, &msg, &auth).expect("the MAC of the msg bytes");
    assert_eq!(outer.len(), 3);

    #[derive(serde::Serialize)]
    struct V1Sealed<'a> {
        v: u16,
        device: &'a DeviceId,
        seq: u64,
        ts_ms: u64,
        body: &'a Body,
        #[serde(with = "serde_bytes")]
        auth: Vec<u8>,
    }
    let body = status();
    let v1 = serde_cbor::to_vec(&V1Sealed {
        v: 1,
        device: &d,
        seq: 6,
        ts_ms: 9,
        body: &body,
        auth: v1_auth(&d, 6, 9, &body),
    })
    .expect("cbor");
    let opened = telemetry::open(&topic, &v1, secret_for("pi-07")).expect("format 1 opens");
    assert_eq!((opened.v, opened.seq), (1, 6));
    let mut other = serde_cbor::from_slice::<Value>(&bytes).expect("cbor");
    if let Value::Map(m) = &mut other {
        m.insert(Value::Text("v".into()), Value::Integer(3));
    }
    assert_eq!(
        telemetry::open(
            &topic,
            &serde_cbor::to_vec(&other).expect("cbor"),
            secret_for("pi-07")
        ),
        Err(MessageError::UnsupportedFormat(3))
    );
}

/// The MAC of a format-1 message (what agents of earlier releases send): over the CBOR
/// of its five fields, `v` 1, as serde_cbor writes them.
fn v1_auth(device: &DeviceId, seq: u64, ts_ms: u64, body: &Body) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct V1<'a> {
        v: u16,
        device: &'a DeviceId,
        seq: u64,
        ts_ms: u64,
        body: &'a Body,
    }
    let fields = serde_cbor::to_vec(&V1 {
        v: 1,
        device,
        seq,
        ts_ms,
        body,
    })
    .expect("cbor");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    ring::hmac::sign(&key, &fields).as_ref().to_vec()
}

/// Seals `msg` (any bytes) as format 2 under [`SECRET`], as a device would.
fn seal_msg(msg: &[u8]) -> Vec<u8> {
    use serde_cbor::Value;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    let auth = ring::hmac::sign(&key, msg).as_ref().to_vec();
    let sealed = Value::Map(
        [
            (Value::Text("v".into()), Value::Integer(2)),
            (Value::Text("msg".into()), Value::Bytes(msg.to_vec())),
            (Value::Text("auth".into()), Value::Bytes(auth)),
        ]
        .into(),
    );
    serde_cbor::to_vec(&sealed).expect("cbor")
}

/// The `msg` bytes inside a sealed message.
fn msg_of(sealed: &[u8]) -> Vec<u8> {
    use serde_cbor::Value;
    let Ok(Value::Map(m)) = serde_cbor::from_slice::<Value>(sealed) else {
        panic!("a map");
    };
    match m.get(&Value::Text("msg".into())) {
        Some(Value::Bytes(b)) => b.clone(),
        other => panic!("msg is a byte string, not {other:?}"),
    }
}

/// What a store keeps of a received message is the envelope the device signed, made
/// from its bytes without encoding it again: the same bytes as encoding the envelope
/// when the device encodes as serde_cbor does (the agent), the device's own order of the
/// fields where it has another, and for a map of indefinite length (and format 1, whose
/// MAC does not cover the encoding) the envelope encoded here; all decode to the
/// envelope opened.
#[test]
fn a_received_message_keeps_the_envelope_the_device_signed() {
    let d = device("pi-07");
    let (topic, bytes) = telemetry::seal(&d, 5, 9, status(), SECRET);
    let received = telemetry::open_received(&topic, &bytes, secret_for("pi-07")).expect("opens");
    let envelope = telemetry::open(&topic, &bytes, secret_for("pi-07")).expect("opens");
    assert_eq!(received.envelope(), &envelope);
    assert_eq!(
        received.cbor(),
        serde_cbor::to_vec(&envelope).expect("cbor").as_slice()
    );
    assert_eq!(telemetry::Received::new(envelope.clone()), received);

    // The same fields in another order (a map in serde_cbor's Value order).
    let msg = msg_of(&bytes);
    let value: serde_cbor::Value = serde_cbor::from_slice(&msg).expect("cbor");
    let reordered = serde_cbor::to_vec(&value).expect("cbor");
    assert_ne!(reordered, msg, "the test needs another order");
    // A map of indefinite length: its entries between 0xbf and 0xff.
    let mut indefinite = vec![0xbf];
    indefinite.extend_from_slice(&msg[1..]);
    indefinite.push(0xff);
    for (what, msg) in [("reordered", reordered), ("indefinite", indefinite)] {
        let sealed = seal_msg(&msg);
        let got = telemetry::open_received(&topic, &sealed, secret_for("pi-07"))
            .unwrap_or_else(|e| panic!("{what} opens: {e}"));
        let mut want = envelope.clone();
        want.auth = got.auth.clone();
        assert_eq!(got.envelope(), &want, "{what}");
        let stored: telemetry::Envelope = serde_cbor::from_slice(got.cbor()).expect(what);
        assert_eq!(stored, want, "{what}");
        let encoded_here = serde_cbor::to_vec(&want).expect("cbor");
        assert_eq!(got.cbor() == encoded_here, what == "indefinite", "{what}");
    }

    // Format 1 (its fields here in another order than serde_cbor writes them) is
    // encoded here: its MAC covers the fields, not the bytes that came.
    let (_, v2) = telemetry::seal(&d, 6, 9, status(), SECRET);
    let opened = telemetry::open(&topic, &v2, secret_for("pi-07")).expect("opens");
    let mut v1 = opened.clone();
    v1.v = 1;
    v1.auth = v1_auth(&v1.device, v1.seq, v1.ts_ms, &v1.body);
    let v1_value: serde_cbor::Value =
        serde_cbor::from_slice(&serde_cbor::to_vec(&v1).expect("cbor")).expect("cbor");
    let v1_bytes = serde_cbor::to_vec(&v1_value).expect("cbor");
    assert_ne!(v1_bytes, serde_cbor::to_vec(&v1).expect("cbor"));
    let got = telemetry::open_received(&topic, &v1_bytes, secret_for("pi-07")).expect("opens");
    assert_eq!(
        got.cbor(),
        serde_cbor::to_vec(&v1).expect("cbor").as_slice()
    );
    assert_eq!(got.envelope(), &v1);
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

    /// Whatever `msg` a device signs, a message that opens keeps CBOR that decodes to
    /// the envelope opened (`msg`: a sealed message's own, cut, with a byte changed, or
    /// with bytes added).
    #[test]
    fn what_a_received_message_keeps_decodes_to_what_was_opened(
        seq in any::<u64>(),
        uptime in any::<u64>(),
        edit in 0usize..4,
        at in any::<usize>(),
        byte in any::<u8>(),
    ) {
        let d = device("pi-07");
        let mut body = status();
        if let Body::Status(s) = &mut body { s.uptime_s = uptime; }
        let (topic, bytes) = telemetry::seal(&d, seq, 5, body, SECRET);
        let mut msg = msg_of(&bytes);
        let at = at % msg.len();
        match edit {
            0 => {}
            1 => msg.truncate(at),
            2 => msg[at] = byte,
            _ => msg.insert(at, byte),
        }
        if let Ok(got) = telemetry::open_received(&topic, &seal_msg(&msg), secret_for("pi-07")) {
            let stored: telemetry::Envelope = serde_cbor::from_slice(got.cbor())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&stored, got.envelope());
        } else {
            prop_assert!(edit != 0, "the message as sealed opens");
        }
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
