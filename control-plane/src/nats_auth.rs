//! The `authorization` block that makes a NATS cluster enforce what the embedded broker's
//! ACL relay enforces (`fleetctl broker acl --broker nats`), the NATS counterpart of
//! [`crate::mosquitto`]:
//!
//! - each enrolled device logs in over MQTT only (`allowed_connection_types`: its
//!   password opens no core NATS connection, where `$MQTT.sub.>` would show it other
//!   devices' deliveries), publishes only to its own `status`, `telemetry` and `events`
//!   subjects and subscribes only to its own `cmd`;
//! - the control plane's MQTT user (`--mqtt-url`) reads every device's messages and
//!   writes commands;
//! - the ingest queue's user (`--ingest-queue`), a core NATS client, reaches only the
//!   JetStream calls the ingest makes on the stream [`STREAM`] and its consumer (info,
//!   create, next message, acknowledgements) and its own reply inboxes
//!   ([`crate::ingest_queue::INBOX`]).
//!
//! NATS carries an MQTT topic on a subject (`/` becomes `.`), so the permissions name
//! subjects. (nats-server 2.10 and later carry a `.` in a topic as `//`; 2.9 refuses
//! such topics, so devices whose ids hold a dot need 2.10 there.) nats-server 2.9 (Debian 12's) also wants subscribe
//! permission on `$MQTT.sub.>` for an MQTT client's QoS 1 subscriptions: the server
//! delivers them through JetStream consumers on that prefix. (This release's agents
//! subscribe to commands with QoS 0; agents of earlier releases, with QoS 1, still need
//! it.) An MQTT client cannot
//! subscribe to `$MQTT/…` topics itself (refused by the server; the system test tries).
//!
//! Passwords are bcrypt hashes (`$2a$`, what `nats server passwd` writes). A device's
//! password is an HMAC of its secret (256 bits): no dictionary reaches it, so the cost
//! factor only has to keep the file from being a list of passwords, and is kept low
//! ([`DEVICE_COST`]) because nats-server checks it at every connection — a whole fleet
//! reconnecting after a node restart pays it once per device. The control plane's
//! users, whose passwords an operator chose, get bcrypt's usual cost
//! ([`OPERATOR_COST`]): they log in a few times a day.

use fleetml_protocol::telemetry::{self, Channel, DeviceId};

use crate::ingest_queue::{CONSUMER, STREAM};

/// bcrypt's cost factor for device passwords (2^6 rounds): a few milliseconds per login.
pub const DEVICE_COST: u32 = 6;
/// bcrypt's cost factor for the control plane's own users (2^11 rounds).
pub const OPERATOR_COST: u32 = 11;

/// A user name and its password, in clear (hashed when written).
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    pub user: &'a str,
    pub password: &'a str,
}

/// The NATS subject an MQTT topic travels on: `/` becomes `.`, `.` becomes `//`.
pub fn subject(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len() + 8);
    for c in topic.chars() {
        match c {
            '/' => out.push('.'),
            '.' => out.push_str("//"),
            '+' => out.push('*'),
            '#' => out.push('>'),
            c => out.push(c),
        }
    }
    out
}

/// The file's text: an `authorization` block with the control plane's users and every
/// device in `devices`, each password hashed with its own salt from `salt`.
///
/// `mqtt`: the control plane's MQTT user; `queue`: the ingest queue's NATS user, when
/// the replicas pull from one. One user may be both (the same name and password): it
/// then gets both sets of permissions and both connection types.
pub fn authorization(
    mqtt: Login<'_>,
    queue: Option<Login<'_>>,
    devices: &[(DeviceId, Vec<u8>)],
    mut salt: impl FnMut() -> [u8; 16],
) -> Result<String, String> {
    for login in std::iter::once(mqtt).chain(queue) {
        check_user(login.user)?;
        if login.password.is_empty() || login.password.len() > 72 {
            return Err(format!(
                "the NATS user {:?} needs a password of 1 to 72 bytes (bcrypt's limit)",
                login.user
            ));
        }
    }
    let p = telemetry::TOPIC_PREFIX;
    let mut entries = Vec::with_capacity(devices.len() + 2);
    let mqtt_allow = Permissions {
        publish: vec![subject(&format!("{p}/+/{}", Channel::Cmd.as_str()))],
        subscribe: vec![subject(telemetry::INGEST_FILTER), "$MQTT.sub.>".to_string()],
    };
    // What `ingest_queue` calls, no more: no delete, purge or update of either.
    let queue_allow = Permissions {
        publish: vec![
            format!("$JS.API.STREAM.INFO.{STREAM}"),
            format!("$JS.API.STREAM.CREATE.{STREAM}"),
            format!("$JS.API.CONSUMER.INFO.{STREAM}.{CONSUMER}"),
            format!("$JS.API.CONSUMER.CREATE.{STREAM}.{CONSUMER}"),
            format!("$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{CONSUMER}"),
            format!("$JS.ACK.{STREAM}.{CONSUMER}.>"),
        ],
        subscribe: vec![format!("{}.>", crate::ingest_queue::INBOX)],
    };
    match queue {
        Some(q) if q.user == mqtt.user => {
            if q.password != mqtt.password {
                return Err(format!(
                    "--mqtt-url and --ingest-queue name the NATS user {:?} with two different \
                     passwords: give it one, or use two users",
                    q.user
                ));
            }
            let both = Permissions {
                publish: [mqtt_allow.publish, queue_allow.publish].concat(),
                subscribe: [mqtt_allow.subscribe, queue_allow.subscribe].concat(),
            };
            let kinds = ["MQTT", "STANDARD"];
            entries.push(entry(mqtt, OPERATOR_COST, &kinds, &both, &mut salt)?);
        }
        Some(q) => {
            entries.push(entry(
                mqtt,
                OPERATOR_COST,
                &["MQTT"],
                &mqtt_allow,
                &mut salt,
            )?);
            entries.push(entry(
                q,
                OPERATOR_COST,
                &["STANDARD"],
                &queue_allow,
                &mut salt,
            )?);
        }
        None => entries.push(entry(
            mqtt,
            OPERATOR_COST,
            &["MQTT"],
            &mqtt_allow,
            &mut salt,
        )?),
    }
    for (id, secret) in devices {
        if [mqtt.user, queue.map_or("", |q| q.user)].contains(&id.as_str()) {
            return Err(format!(
                "the device {id} has the control plane's NATS user name: rename the user in \
                 --mqtt-url or --ingest-queue"
            ));
        }
        let own = |c: Channel| subject(&format!("{p}/{id}/{}", c.as_str()));
        let allow = Permissions {
            publish: [Channel::Status, Channel::Telemetry, Channel::Events]
                .into_iter()
                .map(own)
                .collect(),
            subscribe: vec![own(Channel::Cmd), "$MQTT.sub.>".to_string()],
        };
        let password = telemetry::mqtt_password(secret);
        let login = Login {
            user: id.as_str(),
            password: &password,
        };
        entries.push(entry(login, DEVICE_COST, &["MQTT"], &allow, &mut salt)?);
    }
    Ok(format!(
        "# Written by `fleetctl broker acl --broker nats` for {} devices: include it in every\n\
         # node's configuration and reload the nodes (nats-server --signal reload) after\n\
         # each run. Each device only its own subjects, over MQTT only; the control plane's\n\
         # users as named in --mqtt-url and --ingest-queue. Keep this file private.\n\
         authorization {{\n  users: [\n{}  ]\n}}\n",
        devices.len(),
        entries.concat()
    ))
}

struct Permissions {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

/// One user's line: its name, bcrypt hash, connection types and permissions.
fn entry(
    login: Login<'_>,
    cost: u32,
    kinds: &[&str],
    allow: &Permissions,
    salt: &mut impl FnMut() -> [u8; 16],
) -> Result<String, String> {
    let hash = bcrypt::hash_with_salt(login.password, cost, salt())
        .map_err(|e| format!("hashing the password of {:?}: {e}", login.user))?
        .format_for_version(bcrypt::Version::TwoA);
    let list = |items: &[String]| {
        items
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kinds: Vec<String> = kinds.iter().map(|k| k.to_string()).collect();
    Ok(format!(
        "    {{user: \"{}\", password: \"{hash}\", allowed_connection_types: [{}],\n     \
         permissions: {{publish: {{allow: [{}]}}, subscribe: {{allow: [{}]}}}}}}\n",
        login.user,
        list(&kinds),
        list(&allow.publish),
        list(&allow.subscribe),
    ))
}

/// User names go into the file between double quotes: only characters that need no
/// escaping there.
fn check_user(user: &str) -> Result<(), String> {
    let ok = !user.is_empty()
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | '+'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the NATS user name {user:?} (from --mqtt-url or --ingest-queue): use letters, \
             digits and - _ . @ + only"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str) -> (DeviceId, Vec<u8>) {
        (DeviceId::new(id).expect("id"), id.as_bytes().to_vec())
    }

    fn user<'a>(text: &'a str, name: &str) -> &'a str {
        let at = text
            .find(&format!("{{user: \"{name}\""))
            .unwrap_or_else(|| panic!("{name} in {text}"));
        let rest = &text[at..];
        &rest[..rest.find("}}}").expect("end of entry")]
    }

    #[test]
    fn topics_become_subjects_as_nats_maps_them() {
        assert_eq!(subject("fleetml/v1/pi-1/cmd"), "fleetml.v1.pi-1.cmd");
        assert_eq!(
            subject("fleetml/v1/cam.2/status"),
            "fleetml.v1.cam//2.status"
        );
        assert_eq!(subject("fleetml/v1/+/+"), "fleetml.v1.*.*");
    }

    /// Each device gets its own subjects only, MQTT only, and a hash of its own
    /// password that bcrypt verifies; the two control-plane users get theirs.
    #[test]
    fn each_user_gets_its_own_subjects_and_a_verifiable_hash() {
        let mut n = 0u8;
        let text = authorization(
            Login {
                user: "fleetml-ingest",
                password: "mqtt-pw",
            },
            Some(Login {
                user: "fleetml-queue",
                password: "queue-pw",
            }),
            &[device("pi-1"), device("cam.2")],
            || {
                n += 1;
                [n; 16]
            },
        )
        .expect("text");
        let pi = user(&text, "pi-1");
        assert!(pi.contains("allowed_connection_types: [\"MQTT\"]"), "{pi}");
        assert!(pi.contains("publish: {allow: [\"fleetml.v1.pi-1.status\", \"fleetml.v1.pi-1.telemetry\", \"fleetml.v1.pi-1.events\"]}"), "{pi}");
        assert!(
            pi.contains("subscribe: {allow: [\"fleetml.v1.pi-1.cmd\", \"$MQTT.sub.>\"]"),
            "{pi}"
        );
        assert!(user(&text, "cam.2").contains("\"fleetml.v1.cam//2.cmd\""));
        let hash = pi
            .split("password: \"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("hash");
        assert!(hash.starts_with("$2a$06$"), "{hash}");
        let password = telemetry::mqtt_password(b"pi-1");
        assert!(bcrypt::verify(&password, hash).expect("bcrypt"));
        assert!(!bcrypt::verify("guess", hash).expect("bcrypt"));
        assert!(!text.contains(&password), "a password in clear");

        let ingest = user(&text, "fleetml-ingest");
        assert!(ingest.contains("[\"MQTT\"]") && ingest.contains("\"fleetml.v1.*.cmd\""));
        let queue = user(&text, "fleetml-queue");
        assert!(queue.contains("[\"STANDARD\"]") && queue.contains("\"_INBOX_fleetml.>\""));
        assert!(
            !queue.contains("DELETE") && !queue.contains("$JS.API.STREAM.*"),
            "{queue}"
        );
        assert!(queue.contains("\"$2a$11$"), "the operator's cost: {queue}");
        assert!(
            !queue.contains("fleetml.v1"),
            "the queue user reads no device subject"
        );
        assert_eq!(text.matches("{user: ").count(), 4);
    }

    #[test]
    fn one_user_for_both_gets_both_and_conflicts_are_refused() {
        let salt = || [1; 16];
        let mqtt = Login {
            user: "fleetml",
            password: "pw",
        };
        let text = authorization(mqtt, Some(mqtt), &[], salt).expect("text");
        assert_eq!(text.matches("{user: ").count(), 1);
        assert!(text.contains("[\"MQTT\", \"STANDARD\"]"), "{text}");
        let other = Login {
            user: "fleetml",
            password: "other",
        };
        let e = authorization(mqtt, Some(other), &[], salt).expect_err("two passwords");
        assert!(e.contains("two different passwords"), "{e}");
        let e = authorization(
            Login {
                user: "pi-1",
                password: "pw",
            },
            None,
            &[device("pi-1")],
            salt,
        )
        .expect_err("clash");
        assert!(e.contains("pi-1"), "{e}");
        let quoted = Login {
            user: "a\"b",
            password: "pw",
        };
        assert!(authorization(quoted, None, &[], salt).is_err());
        let empty = Login {
            user: "x",
            password: "",
        };
        assert!(authorization(empty, None, &[], salt).is_err());
    }
}
