//! Fuzzes the decoders of a bundle's signed payloads, of the operator's TOML files and of
//! the `.npy` arrays `fleetctl bundle build --golden-inputs` reads.
#![no_main]

use fleetml_protocol::board::BoardProfile;
use fleetml_protocol::features::FeatureSchema;
use fleetml_protocol::golden::Golden;
use fleetml_protocol::reference::ReferenceProfile;
use fleetml_protocol::trust::TrustPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Golden::from_cbor(data);
    let _ = ReferenceProfile::from_cbor(data);
    let _ = fleetml_protocol::tensor::from_npy("x", data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = TrustPolicy::from_toml(text);
        let _ = FeatureSchema::from_toml(text);
        let _ = BoardProfile::from_toml(text);
    }
});
