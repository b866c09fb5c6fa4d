//! Fuzzes the telemetry message decoder (what the control plane's ingest runs on every
//! MQTT publish it receives, and the agent on every command and receipt).
#![no_main]

use fleetml_protocol::telemetry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = telemetry::open("fleetml/v1/fuzz/telemetry", data, |_| Some(vec![7u8; 32]));
    let _ = telemetry::open("fleetml/v1/fuzz/status", data, |_| None);
    let _ = telemetry::open("fleetml/v1/fuzz/cmd", data, |_| Some(vec![7u8; 32]));
    if let Ok(topic) = std::str::from_utf8(data) {
        let _ = telemetry::parse_topic(topic);
    }
});
