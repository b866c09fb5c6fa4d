//! The durable outbox: order, persistence across reopen, acknowledgement, overflow.

use fleet_agent::outbox::{Class, Limits, Outbox};
use std::time::Instant;

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
            o.push(class, "fleetml/v1/pi/events", 0, msg).expect("push");
        }
        o.ack(1, Instant::now()).expect("ack");
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
    assert_eq!(o.push(Class::Keep, "t", 0, msg).expect("push"), 3);
    o.ack(0, Instant::now()).expect("ack");
    o.ack(0, Instant::now()).expect("acking twice is harmless");
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
        o.push(c, "t", 0, msg).expect("push");
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
        o.push(Class::Keep, "t", 0, msg).expect("push");
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

#[test]
fn after_the_first_receipt_only_receipts_delete_and_unconfirmed_messages_come_due() {
    use fleetml_protocol::telemetry::Receipt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox");
    {
        let o = Outbox::open(&path, Limits::default()).expect("opens");
        assert!(!o.receipts_enabled());
        for _ in 0..6 {
            o.push(Class::Window, "fleetml/v1/pi/telemetry", 0, msg)
                .expect("push");
        }
        o.ack(0, Instant::now()).expect("ack");
        assert_eq!(o.depth(), 5, "before any receipt, a PUBACK deletes");

        // The first receipt switches the mode, and deletes what it names.
        assert_eq!(
            o.receipt(&Receipt {
                stored: vec![[1, 1]]
            })
            .expect("receipt"),
            1
        );
        assert!(o.receipts_enabled());
        for seq in 2..6 {
            o.mark_inflight(seq);
            o.ack(seq, Instant::now()).expect("ack");
        }
        assert_eq!(o.depth(), 4, "a PUBACK no longer deletes");
        assert_eq!(
            o.overdue(std::time::Duration::from_secs(3600), Instant::now()),
            Vec::<u64>::new()
        );
        assert_eq!(
            o.overdue(std::time::Duration::ZERO, Instant::now()),
            vec![2, 3, 4, 5],
            "acknowledged, never confirmed: due again"
        );
        assert_eq!(
            o.overdue(std::time::Duration::ZERO, Instant::now()),
            Vec::<u64>::new(),
            "handed out once per acknowledgement"
        );
        // A receipt wider than what is here, one backwards, and one twice.
        let r = Receipt {
            stored: vec![[3, 4], [9, 2], [0, u64::MAX]],
        };
        assert_eq!(o.receipt(&r).expect("receipt"), 4);
        assert_eq!(o.receipt(&r).expect("receipt again"), 0);
        assert_eq!(o.depth(), 0);
        assert_eq!(o.bytes().expect("bytes"), 0, "byte count follows deletions");
        o.push(Class::Keep, "fleetml/v1/pi/events", 0, msg)
            .expect("push");
        o.ack(6, Instant::now()).expect("ack");
    }
    let o = Outbox::open(&path, Limits::default()).expect("reopens");
    assert!(o.receipts_enabled(), "the mode survives a restart");
    assert_eq!(
        o.pending(10)
            .expect("pending")
            .iter()
            .map(|m| m.seq)
            .collect::<Vec<_>>(),
        vec![6],
        "acknowledged by the broker only: still here after a restart"
    );
    assert_eq!(o.get(6).expect("get").expect("there").payload, msg(6));
    assert!(o.get(5).expect("get").is_none());
}

#[test]
fn a_message_two_receipts_in_a_row_skip_is_due_then() {
    use fleetml_protocol::telemetry::Receipt;
    let dir = tempfile::tempdir().expect("tempdir");
    let o = Outbox::open(&dir.path().join("outbox"), Limits::default()).expect("opens");
    o.receipt(&Receipt { stored: vec![] }).expect("receipt");
    for _ in 0..6 {
        o.push(Class::Window, "fleetml/v1/pi/telemetry", 0, msg)
            .expect("push");
    }
    for seq in 0..5 {
        o.mark_inflight(seq);
        o.ack(seq, Instant::now()).expect("ack");
    }
    let long = std::time::Duration::from_secs(3600);
    // 0 and 3 stored; 1 and 2 not: lost between broker and ingest, or another replica
    // is still storing them; 4 may still be on its way (nothing later is named); 5 was
    // never acknowledged.
    o.receipt(&Receipt {
        stored: vec![[0, 0], [3, 3]],
    })
    .expect("receipt");
    assert_eq!(
        o.overdue(long, Instant::now()),
        Vec::<u64>::new(),
        "one receipt skipped them: not yet"
    );
    assert_eq!(o.depth(), 4, "nothing deleted that was not named");
    // The next receipt names 4 and still not 1 or 2: lost.
    o.receipt(&Receipt {
        stored: vec![[4, 4]],
    })
    .expect("receipt");
    assert_eq!(o.overdue(long, Instant::now()), vec![1, 2]);
    assert_eq!(
        o.overdue(long, Instant::now()),
        Vec::<u64>::new(),
        "once per acknowledgement"
    );
    // Published again and acknowledged: waiting for a receipt again.
    for seq in [1, 2] {
        o.mark_inflight(seq);
        o.ack(seq, Instant::now()).expect("ack");
    }
    o.receipt(&Receipt {
        stored: vec![[1, 2]],
    })
    .expect("receipt");
    assert_eq!(o.overdue(long, Instant::now()), Vec::<u64>::new());
    assert_eq!(
        o.pending(10)
            .expect("pending")
            .iter()
            .map(|m| m.seq)
            .collect::<Vec<_>>(),
        vec![5]
    );
}

/// Time is passed in: acknowledged messages come due exactly `after` later, once, and
/// the oldest message's age counts from when it was queued — simulated, no sleeping.
#[test]
fn acknowledged_messages_come_due_on_simulated_time() {
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("temp dir");
    let o = Outbox::open(dir.path(), Limits::default()).expect("open");
    // Receipts switched on: acknowledged messages wait for one.
    o.receipt(&fleetml_protocol::telemetry::Receipt { stored: vec![] })
        .expect("receipts on");
    let msg = |seq: u64| format!("m{seq}").into_bytes();
    for queued_ms in [1_000, 2_000, 3_000] {
        o.push(Class::Keep, "t", queued_ms, msg).expect("push");
    }
    assert_eq!(o.oldest_age_ms(1_000).expect("age"), 0);
    assert_eq!(o.oldest_age_ms(4_500).expect("age"), 3_500);
    let t0 = Instant::now();
    o.ack(0, t0).expect("ack");
    o.ack(1, t0 + Duration::from_secs(5)).expect("ack");
    let after = Duration::from_secs(10);
    assert_eq!(
        o.overdue(after, t0 + Duration::from_secs(9)),
        Vec::<u64>::new()
    );
    assert_eq!(o.overdue(after, t0 + Duration::from_secs(10)), vec![0]);
    assert_eq!(
        o.overdue(after, t0 + Duration::from_secs(14)),
        Vec::<u64>::new(),
        "once"
    );
    assert_eq!(o.overdue(after, t0 + Duration::from_secs(15)), vec![1]);
    // A clock that went backwards makes nothing due early.
    o.ack(2, t0 + Duration::from_secs(60)).expect("ack");
    assert_eq!(o.overdue(after, t0), Vec::<u64>::new());
}
