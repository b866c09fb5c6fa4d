//! Fuzzes the telemetry message decoder (what the control plane's ingest runs on every
//! MQTT publish it receives, and the agent on every command and receipt), and what the
//! ingest keeps of a message that opens: `data` is also signed as a device's `msg`, so
//! that inputs get past the MAC, and the envelope's CBOR kept must decode to the
//! envelope opened.
#![no_main]

use fleetml_protocol::telemetry;
use libfuzzer_sys::fuzz_target;
use serde_cbor::Value;

const SECRET: [u8; 32] = [7u8; 32];

fuzz_target!(|data: &[u8]| {
    let _ = telemetry::open("fleetml/v1/fuzz/telemetry", data, |_| Some(SECRET.to_vec()));
    let _ = telemetry::open("fleetml/v1/fuzz/status", data, |_| None);
    let _ = telemetry::open("fleetml/v1/fuzz/cmd", data, |_| Some(SECRET.to_vec()));
    if let Ok(topic) = std::str::from_utf8(data) {
        let _ = telemetry::parse_topic(topic);
    }

    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &SECRET);
    let sealed = Value::Map(
        [
            (Value::Text("v".into()), Value::Integer(2)),
            (Value::Text("msg".into()), Value::Bytes(data.to_vec())),
            (
                Value::Text("auth".into()),
                Value::Bytes(ring::hmac::sign(&key, data).as_ref().to_vec()),
            ),
        ]
        .into(),
    );
    let sealed = serde_cbor::to_vec(&sealed).expect("cbor");
    for channel in ["status", "telemetry", "events"] {
        let topic = format!("fleetml/v1/fuzz/{channel}");
        if let Ok(got) = telemetry::open_received(&topic, &sealed, |_| Some(SECRET.to_vec())) {
            let kept: telemetry::Envelope =
                serde_cbor::from_slice(got.cbor()).expect("what is kept decodes");
            assert_eq!(&kept, got.envelope());
        }
    }
});
