//! Fuzzes the broker ACL (what `fleetctl serve` runs on every byte a device sends to the
//! embedded broker): framing, then judging each packet, before and after a login.
#![no_main]

use fleetml_protocol::broker_acl::{Acl, MAX_PACKET, frame_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut fresh = Acl::new();
    let mut rest = data;
    while let Ok(Some(n)) = frame_len(rest, MAX_PACKET) {
        let _ = fresh.check(&rest[..n]);
        rest = &rest[n..];
    }
});
