//! Fuzzes bundle parsing and verification: any input must verify or fail cleanly, never
//! panic, hang or allocate without bound.
#![no_main]

use std::sync::OnceLock;

use fleetml_protocol::bundle::{self, Limits};
use fleetml_protocol::crypto::PublicKey;
use fleetml_protocol::manifest::Manifest;
use fleetml_protocol::trust::{TrustPolicy, TrustedKey};
use libfuzzer_sys::fuzz_target;

fn policy() -> &'static TrustPolicy {
    static POLICY: OnceLock<TrustPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        // A fixed public key: the fuzzer cannot forge its signatures, but it reaches every
        // check before the signature and, through read_unverified and the manifest
        // decoder below, every decoder after it.
        let key = PublicKey([7u8; 32]);
        TrustPolicy::new(1, vec![TrustedKey { name: None, public: key, id: None }])
            .expect("valid policy")
    })
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let _ = bundle::verify(data, policy(), &limits);
    if let Ok(front) = bundle::read_unverified(data, &limits) {
        let _ = front.manifest.validate();
        let _ = front.bundle_size();
    }
    let _ = Manifest::from_canonical_cbor(data);
});
