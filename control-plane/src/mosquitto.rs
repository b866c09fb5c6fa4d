//! The files that make an external mosquitto enforce what the embedded broker's ACL
//! relay enforces (`fleetctl broker acl`): a password file with every enrolled device
//! (and the ingest's user, when the control plane knows it) and an ACL file that lets a
//! device publish only to its own `status`, `telemetry` and `events` topics and read only
//! its own `cmd`, and the ingest read every device's messages and write commands.
//!
//! Passwords are stored as mosquitto 2.0's `$7$` hashes (PBKDF2-HMAC-SHA512, 101
//! iterations, a 12-byte random salt), what `mosquitto_passwd` writes; the device
//! passwords themselves are HMACs of the device secrets and never leave the server.

use std::num::NonZeroU32;

use base64::Engine;
use fleetml_protocol::telemetry::{self, DeviceId};

/// mosquitto_passwd's iteration count for `$7$` hashes.
const ITERATIONS: u32 = 101;

/// One `user:$7$…` line for `password`, with `salt`.
pub fn password_line(user: &str, password: &str, salt: &[u8; 12]) -> String {
    let mut hash = [0u8; 64];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        NonZeroU32::new(ITERATIONS).unwrap_or(NonZeroU32::MIN),
        salt,
        password.as_bytes(),
        &mut hash,
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "{user}:$7${ITERATIONS}${}${}",
        b64.encode(salt),
        b64.encode(hash)
    )
}

/// The ACL file: devices by pattern (`%u`: the user name, which is the device id), the
/// ingest by name.
pub fn acl_file(ingest_user: &str) -> String {
    let p = telemetry::TOPIC_PREFIX;
    format!(
        "# Written by `fleetctl broker acl`: each device only its own topics (%u is the\n\
         # user name, which the broker checks against the device's password).\n\
         pattern write {p}/%u/status\n\
         pattern write {p}/%u/telemetry\n\
         pattern write {p}/%u/events\n\
         pattern read {p}/%u/cmd\n\
         \n\
         # The control plane's ingest: every device's messages in, commands out.\n\
         user {ingest_user}\n\
         topic read {p}/+/+\n\
         topic write {p}/+/cmd\n"
    )
}

/// The password file: the ingest's user (when known) and every device, each with its
/// own salt from `salt`.
pub fn password_file(
    ingest: Option<(&str, &str)>,
    devices: &[(DeviceId, Vec<u8>)],
    mut salt: impl FnMut() -> [u8; 12],
) -> String {
    let mut out = String::new();
    if let Some((user, password)) = ingest {
        out.push_str(&password_line(user, password, &salt()));
        out.push('\n');
    }
    for (id, secret) in devices {
        out.push_str(&password_line(
            id.as_str(),
            &telemetry::mqtt_password(secret),
            &salt(),
        ));
        out.push('\n');
    }
    out
}

/// The `mosquitto.conf` lines that use the two files.
pub fn conf_snippet(dir: &str) -> String {
    format!(
        "# Include in mosquitto.conf (per listener with `per_listener_settings true`):\n\
         allow_anonymous false\n\
         password_file {dir}/passwd\n\
         acl_file {dir}/acl\n\
         # a whole fleetml message and its headers, no more\n\
         message_size_limit {}\n\
         {}\
         # what waits for the ingest while it stores, or while the control plane is down\n\
         # (the default, 1000, drops the rest; devices publish it again, late)\n\
         max_queued_messages 1000000\n",
        telemetry::MAX_MESSAGE + 1024,
        in_flight_conf(),
    )
}

/// mosquitto's in-flight window for the ingest, as `fleetctl broker acl` and the
/// simulator's broker set it (lines of mosquitto.conf).
pub(crate) fn in_flight_conf() -> String {
    format!(
        "# the ingest acknowledges a batch once stored: at mosquitto's default of 20\n\
         # unacknowledged messages per client a batch is 20 messages; this lets each of\n\
         # its storing lanes fill a batch, and bounds what waits in its memory (both\n\
         # apply to every client, devices included: they receive only small commands)\n\
         max_inflight_messages {}\n\
         max_inflight_bytes {}\n",
        crate::ingest_mqtt::BROKER_IN_FLIGHT,
        crate::ingest_mqtt::BROKER_IN_FLIGHT_BYTES,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The snippet gives the ingest a window of a batch per lane, bounded in bytes.
    #[test]
    fn the_snippet_lets_every_lane_fill_a_batch() {
        let conf = conf_snippet("/etc/mosquitto/fleetml");
        for line in [
            "max_inflight_messages 8192",
            "max_inflight_bytes 67108864",
            "max_queued_messages 1000000",
            "password_file /etc/mosquitto/fleetml/passwd",
        ] {
            assert!(conf.lines().any(|l| l == line), "{line} missing:\n{conf}");
        }
    }

    /// The line verifies as mosquitto does: PBKDF2-HMAC-SHA512 of the password with the
    /// salt written in it.
    #[test]
    fn a_password_line_verifies_like_mosquitto_checks_it() {
        let line = password_line("pi-1", "s3cret", &[7; 12]);
        let (user, hash) = line.split_once(':').expect("user:hash");
        assert_eq!(user, "pi-1");
        let parts: Vec<&str> = hash.split('$').collect();
        assert_eq!(parts[..3], ["", "7", "101"]);
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = b64.decode(parts[3]).expect("salt");
        let stored = b64.decode(parts[4]).expect("hash");
        assert_eq!((salt.len(), stored.len()), (12, 64));
        let n = NonZeroU32::new(101).expect("n");
        let alg = ring::pbkdf2::PBKDF2_HMAC_SHA512;
        assert!(ring::pbkdf2::verify(alg, n, &salt, b"s3cret", &stored).is_ok());
        assert!(ring::pbkdf2::verify(alg, n, &salt, b"guess", &stored).is_err());
    }
}
