//! Fuzzes the signed-assignment decoder and checks (what an agent runs on every
//! assignment its control plane, or anyone in between, hands it).
#![no_main]

use std::sync::OnceLock;

use fleetml_protocol::assignment::{AssignedModel, Held, SignedAssignment};
use fleetml_protocol::crypto::SigningKey;
use fleetml_protocol::telemetry::DeviceId;
use fleetml_protocol::trust::{TrustPolicy, TrustedKey};
use libfuzzer_sys::fuzz_target;

fn policy() -> &'static TrustPolicy {
    static POLICY: OnceLock<TrustPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let (key, _) = SigningKey::generate().expect("key");
        let trusted = TrustedKey {
            name: None,
            public: key.public_key(),
            id: None,
        };
        let mut p = TrustPolicy::new(1, vec![trusted.clone()]).expect("policy");
        p.assignment_keys = vec![trusted];
        p
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(signed) = SignedAssignment::from_cbor(data) else {
        return;
    };
    let device = DeviceId::new("fuzz").expect("id");
    let models = std::collections::BTreeMap::<String, AssignedModel>::new();
    let held = Held {
        generation: 3,
        models: &models,
    };
    let _ = signed.check(policy(), &device, Some(held), 1_800_000_000_000);
    let _ = signed.check(policy(), &device, None, 0);
});
