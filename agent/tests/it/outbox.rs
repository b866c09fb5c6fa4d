//! The durable outbox: order, persistence across reopen, acknowledgement, overflow.

use fleet_agent::outbox::{Class, Limits, Outbox};

fn msg(seq: u64) -> Vec<u8> {
    format!("message {seq}").into_bytes()
}

#[test]
fn messages_survive_reopening_in_order_until_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox");
    {
        let o = Outbox::open(&path, Limits::default()).expect("opens");
        for class in [Class::Keep, Class::Window, Class::Keep] {
            o.push(class, "fleetml/v1/pi/events", msg).expect("push");
        }
        o.ack(1).expect("ack");
    }
    let o = Outbox::open(&path, Limits::default()).expect("reopens");
    let pending = o.pending(10).expect("pending");
    assert_eq!(
        pending.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![0, 2]
    );
    assert_eq!(pending[1].payload, b"message 2");
    assert_eq!(pending[1].topic, "fleetml/v1/pi/events");
    assert_eq!(
        o.next_seq().expect("seq"),
        3,
        "sequence numbers survive, no reuse"
    );
    assert_eq!(o.push(Class::Keep, "t", msg).expect("push"), 3);
    o.ack(0).expect("ack");
    o.ack(0).expect("acking twice is harmless");
    assert_eq!(o.depth(), 2);
}

#[test]
fn overflow_drops_the_oldest_windows_only_and_counts_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = Outbox::open(
        &dir.path().join("outbox"),
        Limits {
            max_messages: 4,
            max_bytes: 1 << 20,
        },
    )
    .expect("opens");
    // event, window, window, event, window, window, event
    let classes = [
        Class::Keep,
        Class::Window,
        Class::Window,
        Class::Keep,
        Class::Window,
        Class::Window,
        Class::Keep,
    ];
    for c in classes {
        o.push(c, "t", msg).expect("push");
    }
    let kept: Vec<u64> = o
        .pending(100)
        .expect("pending")
        .iter()
        .map(|m| m.seq)
        .collect();
    // 7 messages into 4 places: the 3 oldest windows (1, 2, 4) went; no event did.
    assert_eq!(kept, vec![0, 3, 5, 6]);
    assert_eq!(o.dropped().expect("dropped"), 3);
    // Only events left to drop: they stay, beyond the bound.
    for _ in 0..3 {
        o.push(Class::Keep, "t", msg).expect("push");
    }
    assert_eq!(o.depth(), 6, "window 5 dropped, events kept past the bound");
    assert_eq!(o.dropped().expect("dropped"), 4);
    assert!(
        o.pending(100)
            .expect("pending")
            .iter()
            .all(|m| m.class == Class::Keep)
    );
}
