//! The broker ACL on raw MQTT 3.1.1 packets: what a device may and may not send.

use fleetml_protocol::broker_acl::{Acl, Denied, MAX_PACKET, frame_len};
use proptest::prelude::*;

/// A packet: `first` byte, then the remaining length and `body`.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// CONNECT as `client` with user `user` (none: anonymous) and a will on `will`.
fn connect(client: &str, user: Option<&str>, will: Option<&str>) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(4);
    let mut flags = 0x02;
    if will.is_some() {
        flags |= 0x04 | 0x08 | 0x20;
    }
    if user.is_some() {
        flags |= 0x80 | 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&30u16.to_be_bytes());
    string(&mut body, client.as_bytes());
    if let Some(w) = will {
        string(&mut body, w.as_bytes());
        string(&mut body, b"offline");
    }
    if let Some(u) = user {
        string(&mut body, u.as_bytes());
        string(&mut body, b"password");
    }
    packet(0x10, &body)
}

fn publish(topic: &str, retain: bool, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic.as_bytes());
    body.extend_from_slice(&1u16.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x32 | u8::from(retain), &body)
}

fn subscribe(filters: &[&str]) -> Vec<u8> {
    let mut body = 7u16.to_be_bytes().to_vec();
    for f in filters {
        string(&mut body, f.as_bytes());
        body.push(1);
    }
    packet(0x82, &body)
}

fn logged_in(device: &str) -> Acl {
    let mut acl = Acl::new();
    acl.check(&connect(
        device,
        Some(device),
        Some(&format!("fleetml/v1/{device}/status")),
    ))
    .expect("a device logs in as itself with its will on its status");
    acl
}

#[test]
fn a_device_does_what_the_agent_does_and_nothing_else() {
    let mut acl = logged_in("pi-1");
    for ok in [
        publish("fleetml/v1/pi-1/status", true, b"x"),
        publish("fleetml/v1/pi-1/telemetry", false, b"x"),
        publish("fleetml/v1/pi-1/events", false, b"x"),
        subscribe(&["fleetml/v1/pi-1/cmd"]),
        vec![0x40, 2, 0, 1], // PUBACK
        vec![0xc0, 0],       // PINGREQ
        vec![0xe0, 0],       // DISCONNECT
    ] {
        acl.check(&ok).expect("allowed");
    }
    let denied = |p: Vec<u8>| logged_in("pi-1").check(&p).expect_err("denied");
    assert!(matches!(
        denied(publish("fleetml/v1/pi-2/status", true, b"x")),
        Denied::Publish(_)
    ));
    assert!(matches!(
        denied(publish("fleetml/v1/pi-1/cmd", false, b"x")),
        Denied::Publish(_)
    ));
    assert!(matches!(
        denied(publish("elsewhere", false, b"x")),
        Denied::Publish(_)
    ));
    assert!(matches!(
        denied(publish("fleetml/v1/pi-1/telemetry", true, b"x")),
        Denied::Retain(_)
    ));
    assert!(matches!(denied(subscribe(&["#"])), Denied::Subscribe(_)));
    assert!(matches!(
        denied(subscribe(&["fleetml/v1/pi-1/cmd", "fleetml/v1/+/status"])),
        Denied::Subscribe(_)
    ));
    assert!(matches!(
        denied(subscribe(&["fleetml/v1/pi-2/cmd"])),
        Denied::Subscribe(_)
    ));
    assert!(matches!(
        denied(connect("pi-1", Some("pi-1"), None)),
        Denied::ConnectAgain
    ));
    assert!(matches!(
        denied(vec![0x20, 2, 0, 0]),
        Denied::ServerPacket(2)
    ));
}

#[test]
fn logins_name_the_device_itself() {
    let e = Acl::new()
        .check(&connect("pi-1", None, None))
        .expect_err("anonymous");
    assert_eq!(e, Denied::Anonymous);
    let e = Acl::new()
        .check(&connect("pi-1", Some("pi-2"), None))
        .expect_err("as another");
    assert!(matches!(e, Denied::NotItself { .. }), "{e}");
    let e = Acl::new()
        .check(&connect(
            "pi-1",
            Some("pi-1"),
            Some("fleetml/v1/pi-2/status"),
        ))
        .expect_err("another's will");
    assert!(matches!(e, Denied::Will(_)), "{e}");
    let e = Acl::new()
        .check(&publish("fleetml/v1/pi-1/status", false, b""))
        .expect_err("before CONNECT");
    assert_eq!(e, Denied::NotConnected(3));
    let mut acl = Acl::new();
    acl.check(&connect("pi-1", Some("pi-1"), None))
        .expect("no will is fine");
    assert_eq!(acl.device().map(|d| d.as_str()), Some("pi-1"));
}

#[test]
fn frames_are_found_and_oversize_ones_refused_from_their_head() {
    let p = publish("fleetml/v1/pi-1/telemetry", false, &[9; 300]);
    assert_eq!(frame_len(&p[..1], MAX_PACKET), Ok(None));
    assert_eq!(frame_len(&p[..p.len() - 1], MAX_PACKET), Ok(None));
    let mut two = p.clone();
    two.extend_from_slice(&p);
    assert_eq!(frame_len(&two, MAX_PACKET), Ok(Some(p.len())));
    // A 300 KB publish is refused from its first five bytes, before it is read.
    let head = [0x30, 0x80, 0xbc, 0x12];
    assert!(matches!(
        frame_len(&head, MAX_PACKET),
        Err(Denied::TooLarge { .. })
    ));
    assert!(matches!(
        frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
        Err(Denied::Malformed(_))
    ));
}

proptest! {
    /// Arbitrary bytes never panic either function, and a frame never claims more bytes
    /// than the buffer holds.
    #[test]
    fn arbitrary_bytes_are_judged_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(Some(n)) = frame_len(&bytes, MAX_PACKET) {
            prop_assert!(n <= bytes.len());
            let mut acl = Acl::new();
            let _ = acl.check(&bytes[..n]);
            let _ = logged_in("pi-1").check(&bytes[..n]);
        }
    }

    /// A device may publish only below its own id, whatever the ids.
    #[test]
    fn publishes_are_allowed_exactly_on_the_devices_own_topics(
        me in "[a-z0-9][a-z0-9_.-]{0,20}",
        other in "[a-z0-9][a-z0-9_.-]{0,20}",
        channel in prop::sample::select(vec!["status", "telemetry", "events", "cmd"]),
    ) {
        let mut acl = logged_in(&me);
        let own = acl.check(&publish(&format!("fleetml/v1/{me}/{channel}"), false, b"x"));
        prop_assert_eq!(own.is_ok(), channel != "cmd");
        let theirs = logged_in(&me).check(&publish(&format!("fleetml/v1/{other}/{channel}"), false, b"x"));
        prop_assert_eq!(theirs.is_ok(), me == other && channel != "cmd");
    }
}
