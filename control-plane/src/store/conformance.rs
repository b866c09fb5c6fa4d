//! The store conformance suite: one set of tests every implementation must pass. Each
//! test is a function of a fresh store; `conformance!` runs all of them against a
//! backend. A new backend adds one line at the bottom.

use std::collections::BTreeMap;

use fleetml_protocol::assignment::AssignedModel;
use fleetml_protocol::telemetry::{Body, DeviceId, Envelope, Receipt, Received};

use super::{AssignmentStore, FleetStore, RolloutStore, Store, StoreError};
use crate::auth::Role;
use crate::records::{
    AuditEntry, CaptureRecord, ColumnInfo, DatasetManifest, DeviceRecord, DeviceState, ModelRecord,
    Policy, PolicyState, TokenRecord,
};
use crate::rollout::{Baseline, Gates, Kind, Plan, Rollout, State, Strategy, Target};

/// When the suite's messages are stored (2027-01-15 08:00:00 UTC, an hour's start).
const NOW: u64 = 1_800_000_000_000;

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).expect("test id")
}

fn device(name: &str) -> DeviceRecord {
    DeviceRecord {
        id: id(name),
        board: Some("rpi4".into()),
        tags: BTreeMap::from([("site".to_string(), "plant-1".to_string())]),
        secret: vec![7; 32],
        enrolled_ms: 1_000,
        revoked_ms: None,
    }
}

/// A message as the ingest hands it to a store.
fn message(name: &str, seq: u64) -> Received {
    Received::new(envelope(name, seq))
}

/// A message sealed by a device that writes its fields in serde_cbor's `Value` order
/// (not this build's), opened as the ingest opens it.
fn from_the_wire(device: &DeviceId, seq: u64, body: Body) -> Received {
    use serde_cbor::Value;
    let secret = [7u8; 32];
    let (topic, sealed) = fleetml_protocol::telemetry::seal(device, seq, 10 * seq, body, &secret);
    let Ok(Value::Map(mut outer)) = serde_cbor::from_slice::<Value>(&sealed) else {
        panic!("a sealed message is a map");
    };
    let Some(Value::Bytes(msg)) = outer.get(&Value::Text("msg".into())) else {
        panic!("msg is a byte string");
    };
    let fields: Value = serde_cbor::from_slice(msg).expect("msg is CBOR");
    let msg = serde_cbor::to_vec(&fields).expect("cbor");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let auth = ring::hmac::sign(&key, &msg).as_ref().to_vec();
    outer.insert(Value::Text("msg".into()), Value::Bytes(msg));
    outer.insert(Value::Text("auth".into()), Value::Bytes(auth));
    let sealed = serde_cbor::to_vec(&Value::Map(outer)).expect("cbor");
    fleetml_protocol::telemetry::open_received(&topic, &sealed, |_| Some(secret.to_vec()))
        .expect("opens")
}

fn envelope(name: &str, seq: u64) -> Envelope {
    Envelope {
        v: 1,
        device: id(name),
        seq,
        ts_ms: 10 * seq,
        body: Body::Receipt(Receipt {
            stored: vec![[seq, seq]],
        }),
        auth: vec![seq as u8; 32],
    }
}

fn model(version: u64, rollout: Option<&str>) -> AssignedModel {
    AssignedModel {
        shadow: None,
        version,
        digest: fleetml_protocol::crypto::sha256(&version.to_be_bytes()),
        size: 100 + version,
        rollout: rollout.map(str::to_string),
    }
}

pub(super) fn rollout(id_: &str, devices: &[&str], created_ms: u64) -> Rollout {
    Rollout::new(
        Plan {
            shadow: None,
            id: id_.into(),
            kind: Kind::Rollout,
            model: "claims".into(),
            version: Some(2),
            selector: "all".into(),
            strategy: Strategy {
                waves: vec![50, 100],
                soak_ms: 1000,
                quorum_pct: 100,
                deadline_ms: 10_000,
                gates: Gates::default(),
                auto_rollback: false,
            },
            targets: devices
                .iter()
                .map(|d| Target {
                    device: id(d),
                    wave: 0,
                    to: model(2, Some(id_)),
                    from: Some(model(1, None)),
                    assigned_ms: None,
                    generation: None,
                })
                .collect(),
            baseline: Baseline::default(),
            by: "test".into(),
        },
        created_ms,
    )
}

pub(super) fn devices_enroll_once(s: &dyn Store) -> Result<(), StoreError> {
    assert_eq!(s.device(&id("d1"))?, None);
    assert!(s.enroll(&device("d1"))?);
    let mut other = device("d1");
    other.board = Some("jetson".into());
    assert!(!s.enroll(&other)?, "an id is enrolled once");
    assert_eq!(s.device(&id("d1"))?, Some(device("d1")), "the first stays");
    assert!(s.enroll(&device("d0"))?);
    let mut ids: Vec<String> = s.devices()?.into_iter().map(|d| d.id.to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["d0", "d1"]);
    // Replaced only when enrolled.
    let mut revoked = device("d1");
    revoked.revoked_ms = Some(7);
    revoked.secret = vec![9; 32];
    assert!(s.replace_device(&revoked)?);
    assert_eq!(s.device(&id("d1"))?, Some(revoked));
    assert!(!s.replace_device(&device("nobody"))?);
    assert_eq!(s.device(&id("nobody"))?, None);
    Ok(())
}

pub(super) fn messages_are_stored_once_in_order_per_device(
    s: &dyn Store,
) -> Result<(), StoreError> {
    assert_eq!(s.insert(&message("d1", 2), NOW)?, (true, None));
    assert_eq!(
        s.insert(&message("d1", 1), NOW)?,
        (true, Some(2)),
        "highest before"
    );
    assert_eq!(
        s.insert(&message("d1", 2), NOW)?,
        (false, Some(2)),
        "a duplicate"
    );
    assert_eq!(s.insert(&message("d1", 5), NOW)?, (true, Some(2)));
    // A device whose id extends another's keeps its own log.
    assert_eq!(s.insert(&message("d10", 3), NOW)?, (true, None));
    let seqs = |v: Vec<Envelope>| v.into_iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(s.messages(&id("d1"), 0, 100)?), [1, 2, 5]);
    assert_eq!(seqs(s.messages(&id("d1"), 2, 100)?), [2, 5]);
    assert_eq!(seqs(s.messages(&id("d1"), 0, 2)?), [1, 2]);
    assert_eq!(seqs(s.messages(&id("d10"), 0, 100)?), [3]);
    assert_eq!(s.messages(&id("d2"), 0, 100)?, Vec::new());
    assert_eq!(
        s.messages(&id("d1"), 2, 1)?,
        vec![envelope("d1", 2)],
        "whole"
    );
    // A message from the wire is stored as the device encoded it (here its fields in
    // another order than this build writes them), and read back as it was opened.
    let wire = from_the_wire(&id("d1"), 9, window("m"));
    assert_ne!(
        wire.cbor(),
        serde_cbor::to_vec(wire.envelope())?.as_slice(),
        "the test needs an encoding of its own"
    );
    assert_eq!(s.insert(&wire, NOW)?, (true, Some(5)));
    assert_eq!(s.messages(&id("d1"), 9, 1)?, vec![wire.into_envelope()]);
    s.flush()
}

pub(super) fn device_state_changes_in_place(s: &dyn Store) -> Result<(), StoreError> {
    assert_eq!(s.state(&id("d1"))?, None);
    s.update_state(&id("d1"), &mut |st| {
        st.online = true;
        st.stored += 1;
    })?;
    s.update_state(&id("d1"), &mut |st| st.stored += 1)?;
    assert_eq!(
        s.state(&id("d1"))?,
        Some(DeviceState {
            online: true,
            stored: 2,
            ..DeviceState::default()
        })
    );
    assert_eq!(s.state(&id("d2"))?, None);
    Ok(())
}

pub(super) fn a_message_is_stored_with_the_state_it_changes(
    s: &dyn Store,
) -> Result<(), StoreError> {
    let mut calls = Vec::new();
    let mut record = |st: &mut DeviceState, new: bool, before: Option<u64>| {
        calls.push((new, before));
        if new {
            st.stored += 1;
            st.last_seq = st.last_seq.max(before.unwrap_or(0));
        } else {
            st.duplicates += 1;
        }
    };
    assert_eq!(
        s.store_message(&message("d1", 4), NOW, &mut record)?,
        (true, None)
    );
    assert_eq!(
        s.store_message(&message("d1", 5), NOW, &mut record)?,
        (true, Some(4))
    );
    assert_eq!(
        s.store_message(&message("d1", 4), NOW, &mut record)?,
        (false, Some(5))
    );
    assert_eq!(
        calls,
        [(true, None), (true, Some(4)), (false, Some(5))],
        "once each"
    );
    let st = s.state(&id("d1"))?.expect("a state");
    assert_eq!((st.stored, st.duplicates, st.last_seq), (2, 1, 4));
    let seqs: Vec<u64> = s
        .messages(&id("d1"), 0, 10)?
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [4, 5]);
    Ok(())
}

/// A batch is stored as if message by message: a duplicate of an earlier batch and one
/// within the batch are not new, "highest before" counts what came earlier in the batch,
/// each device's state sees its messages in order, and the batch's devices are found
/// with one call.
pub(super) fn a_batch_is_stored_as_one_message_after_another(
    s: &dyn Store,
) -> Result<(), StoreError> {
    assert!(s.enroll(&device("d1"))?);
    assert!(s.enroll(&device("d2"))?);
    let mut named: Vec<String> = s
        .devices_named(&[id("d2"), id("nobody"), id("d1")])?
        .into_iter()
        .map(|d| d.id.to_string())
        .collect();
    named.sort();
    assert_eq!(named, ["d1", "d2"]);
    assert_eq!(s.insert(&message("d1", 3), NOW)?, (true, None));
    let batch = [
        message("d1", 3),
        message("d2", 7),
        message("d1", 4),
        message("d1", 2),
        message("d2", 7),
        message("d2", 9),
    ];
    let mut calls = Vec::new();
    let out = s.store_messages(&batch, NOW, &mut |i, st, new, before| {
        calls.push((i, new, before));
        if new {
            st.stored += 1;
            st.last_seq = batch[i].seq;
        } else {
            st.duplicates += 1;
        }
    })?;
    assert_eq!(
        out,
        [
            (false, Some(3)),
            (true, None),
            (true, Some(3)),
            (true, Some(4)),
            (false, Some(7)),
            (true, Some(7)),
        ]
    );
    let expected: Vec<(usize, bool, Option<u64>)> = out
        .iter()
        .enumerate()
        .map(|(i, (new, before))| (i, *new, *before))
        .collect();
    assert_eq!(calls, expected, "once each, in batch order");
    let st = s.state(&id("d1"))?.expect("d1's state");
    assert_eq!((st.stored, st.duplicates, st.last_seq), (2, 1, 2));
    let st = s.state(&id("d2"))?.expect("d2's state");
    assert_eq!((st.stored, st.duplicates, st.last_seq), (2, 1, 9));
    let seqs = |d: &str| -> Result<Vec<u64>, StoreError> {
        Ok(s.messages(&id(d), 0, 10)?.iter().map(|e| e.seq).collect())
    };
    assert_eq!(seqs("d1")?, [2, 3, 4]);
    assert_eq!(seqs("d2")?, [7, 9]);
    // The highest stays known after a batch: the next single insert sees it.
    assert_eq!(s.insert(&message("d2", 10), NOW)?, (true, Some(9)));
    // Devices with their mark and state, and one (d3) with a state but no mark yet.
    s.update_state(&id("d3"), &mut |st| st.gaps = 5)?;
    let again = [message("d2", 11), message("d3", 1), message("d1", 5)];
    let out = s.store_messages(&again, NOW, &mut |_, st, new, _| {
        if new {
            st.stored += 1;
        }
    })?;
    assert_eq!(out, [(true, Some(10)), (true, None), (true, Some(4))]);
    let stored = |d: &str| -> Result<Option<(u64, u64)>, StoreError> {
        Ok(s.state(&id(d))?.map(|st| (st.stored, st.gaps)))
    };
    assert_eq!(stored("d1")?, Some((3, 0)));
    assert_eq!(stored("d2")?, Some((3, 0)));
    assert_eq!(stored("d3")?, Some((1, 5)), "the state it had, changed");
    assert_eq!(s.insert(&message("d3", 2), NOW)?, (true, Some(1)));
    assert_eq!(
        s.store_messages(&[], NOW, &mut |_, _, _, _| {})?,
        Vec::new()
    );
    Ok(())
}

pub(super) fn command_sequence_numbers_count_per_device(s: &dyn Store) -> Result<(), StoreError> {
    assert_eq!(s.next_command_seq(&id("d1"))?, 0);
    assert_eq!(s.next_command_seq(&id("d1"))?, 1);
    assert_eq!(
        s.next_command_seqs(&[id("d1"), id("d2"), id("d1")])?,
        [2, 0, 3]
    );
    assert_eq!(s.next_command_seq(&id("d2"))?, 1);
    // A device named again and again in one call, and one never named before.
    assert_eq!(
        s.next_command_seqs(&[id("d2"), id("d3"), id("d2"), id("d2"), id("d1")])?,
        [2, 0, 3, 4, 4]
    );
    assert_eq!(s.next_command_seqs(&[])?, Vec::<u64>::new());
    assert_eq!(s.next_command_seq(&id("d3"))?, 1);
    Ok(())
}

/// The states and assignments of many devices come back with one call each: only the
/// devices that have one, each with its own.
pub(super) fn states_and_assignments_are_read_for_many_devices(
    s: &dyn Store,
) -> Result<(), StoreError> {
    let none = [id("d1"), id("d2")];
    assert!(s.states_named(&none)?.is_empty());
    assert!(s.assignments_named(&none)?.is_empty());
    for (d, n) in [("d1", 1), ("d2", 2), ("d3", 3)] {
        s.update_state(&id(d), &mut |st| st.stored = n)?;
    }
    s.assign(&id("d1"), "claims", &model(1, None), 1)?;
    s.assign(&id("d3"), "claims", &model(3, None), 1)?;
    let asked = [id("d3"), id("nobody"), id("d1"), id("d4")];
    let mut states: Vec<(String, u64)> = s
        .states_named(&asked)?
        .into_iter()
        .map(|(d, st)| (d.to_string(), st.stored))
        .collect();
    states.sort();
    assert_eq!(states, [("d1".into(), 1), ("d3".into(), 3)]);
    let mut assigned: Vec<(String, u64)> = s
        .assignments_named(&[id("d2"), id("d3"), id("d1")])?
        .into_iter()
        .map(|(d, r)| (d.to_string(), r.models["claims"].version))
        .collect();
    assigned.sort();
    assert_eq!(assigned, [("d1".into(), 1), ("d3".into(), 3)]);
    assert!(s.states_named(&[])?.is_empty());
    // Read brief, a state is the full one less its windows' per-feature figures.
    let Body::Window(mut w) = window("claims") else {
        unreachable!("a window")
    };
    let drift: fleetml_protocol::telemetry::FeatureDrift =
        serde_json::from_value(serde_json::json!({
            "name": "temp", "values": 9, "missing_rate": 0.0, "out_of_range_rate": 0.0,
            "unseen_rate": 0.0, "psi": 0.5, "ks": 0.4, "js": 0.3, "chi2_p": null,
            "wasserstein": null, "usefulness": null, "drifting": true
        }))
        .expect("a feature's drift");
    w.features = vec![drift.clone()];
    w.prediction = Some(drift);
    w.missing_ids = vec!["row-7".into()];
    w.predictions = 9;
    s.update_state(&id("d1"), &mut |st| {
        st.windows.insert("claims".into(), (4, (*w).clone()));
    })?;
    let mut full = s.states_named(&asked)?;
    let mut brief = s.brief_states_named(&asked)?;
    full.sort_by(|a, b| a.0.cmp(&b.0));
    brief.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(full[0].1.windows["claims"].1.features.len(), 1);
    let stripped: Vec<_> = full.into_iter().map(|(d, st)| (d, st.brief())).collect();
    assert_eq!(brief, stripped);
    let kept = &brief[0].1.windows["claims"].1;
    assert!(kept.features.is_empty() && kept.prediction.is_none());
    assert_eq!((kept.predictions, brief[0].1.stored), (9, 1));
    assert!(s.brief_states_named(&[id("nobody")])?.is_empty());
    // A store may keep what it read brief: every way a state is written shows at the
    // next read, and a device whose first state came after a read shows too.
    let stored_brief = |d: &str| -> Result<Option<u64>, StoreError> {
        Ok(s.brief_states_named(&[id(d)])?
            .pop()
            .map(|(_, st)| st.stored))
    };
    assert_eq!(stored_brief("d5")?, None);
    s.update_state(&id("d1"), &mut |st| st.stored = 40)?;
    assert_eq!(stored_brief("d1")?, Some(40));
    assert_eq!(stored_brief("d1")?, Some(40), "read again, unchanged");
    s.store_messages(
        &[message("d1", 70), message("d5", 1)],
        NOW,
        &mut |_, st, _, _| st.stored += 1,
    )?;
    assert_eq!(stored_brief("d1")?, Some(41));
    assert_eq!(stored_brief("d5")?, Some(1));
    s.store_message(&message("d1", 71), NOW, &mut |st, _, _| st.stored = 50)?;
    let mut all = s.brief_states_named(&[id("d5"), id("d1"), id("d3")])?;
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let stored: Vec<(String, u64)> = all
        .into_iter()
        .map(|(d, st)| (d.to_string(), st.stored))
        .collect();
    assert_eq!(
        stored,
        [("d1".into(), 50), ("d3".into(), 3), ("d5".into(), 1)]
    );
    Ok(())
}

pub(super) fn an_assignment_moves_its_generation_only_when_it_changes(
    s: &dyn Store,
) -> Result<(), StoreError> {
    let d = id("d1");
    assert_eq!(s.assignment(&d)?, None);
    assert_eq!(s.assign(&d, "claims", &model(1, None), 5)?, 1);
    assert_eq!(s.assign(&d, "claims", &model(1, None), 6)?, 1, "unchanged");
    assert_eq!(s.assign(&d, "claims", &model(2, Some("r1")), 7)?, 2);
    assert_eq!(s.assign(&d, "vad", &model(1, None), 8)?, 3);
    let r = s.assignment(&d)?.expect("stored");
    assert_eq!(r.generation, 3);
    assert_eq!(r.updated_ms, 8);
    assert_eq!(r.models["claims"], model(2, Some("r1")));
    assert_eq!(
        r.previous["claims"],
        model(1, None),
        "where a rollback returns"
    );
    assert!(!r.previous.contains_key("vad"));
    Ok(())
}

pub(super) fn many_assignments_apply_in_order(s: &dyn Store) -> Result<(), StoreError> {
    s.assign(&id("d1"), "claims", &model(1, None), 1)?;
    let changes = vec![
        (id("d1"), model(2, None)),
        (id("d2"), model(2, None)),
        (id("d1"), model(3, None)),
        (id("d2"), model(2, None)),
    ];
    assert_eq!(s.assign_all("claims", &changes, 2)?, [2, 1, 3, 1]);
    let all: BTreeMap<String, u64> = s
        .assignments()?
        .into_iter()
        .map(|(d, r)| (d.to_string(), r.generation))
        .collect();
    assert_eq!(all, BTreeMap::from([("d1".into(), 3), ("d2".into(), 1)]));
    assert_eq!(
        s.assignment(&id("d1"))?.expect("d1").previous["claims"],
        model(2, None)
    );
    assert_eq!(s.assign_all("claims", &[], 3)?, Vec::<u64>::new());
    Ok(())
}

pub(super) fn rollouts_keep_ids_and_order(s: &dyn Store) -> Result<(), StoreError> {
    let a = s.next_rollout_id()?;
    let b = s.next_rollout_id()?;
    assert_ne!(a, b, "ids are never handed out twice");
    assert!(a.starts_with('r') && b.starts_with('r'), "{a} {b}");
    assert_eq!(s.rollout(&a)?, None);
    s.put_rollout(&rollout(&b, &["d1"], 20))?;
    s.put_rollout(&rollout(&a, &["d1", "d2"], 10))?;
    let mut changed = rollout(&b, &["d1"], 20);
    changed.state = State::Paused;
    changed.reason = Some("operator".into());
    s.put_rollout(&changed)?;
    assert_eq!(s.rollout(&b)?, Some(changed));
    let order: Vec<String> = s.rollouts()?.into_iter().map(|r| r.id).collect();
    assert_eq!(order, [a, b], "oldest first");
    Ok(())
}

/// The unfinished rollouts (running or paused) are listed without the finished ones,
/// oldest first, and a rollout leaves the list when it finishes.
pub(super) fn the_unfinished_rollouts_are_listed_apart(s: &dyn Store) -> Result<(), StoreError> {
    let states = [
        State::Completed,
        State::Paused,
        State::Aborted,
        State::Running,
        State::RolledBack,
    ];
    for (i, state) in states.into_iter().enumerate() {
        let mut r = rollout(&format!("r{i}"), &["d1"], 100 - i as u64);
        r.state = state;
        s.put_rollout(&r)?;
    }
    let ids = |list: Vec<Rollout>| -> Vec<String> { list.into_iter().map(|r| r.id).collect() };
    assert_eq!(ids(s.unfinished_rollouts()?), ["r3", "r1"], "oldest first");
    assert_eq!(s.running_rollout_ids()?, ["r3"]);
    let mut done = s.rollout("r3")?.expect("r3");
    done.state = State::Completed;
    s.put_rollout(&done)?;
    let mut step = s.rollout("r1")?.expect("r1");
    step.state = State::Running;
    s.advance_rollout(&mut step, &[(id("d1"), model(2, Some("r1")))], 9)?;
    let unfinished = s.unfinished_rollouts()?;
    assert_eq!(unfinished, [step], "the whole record, as stored");
    assert_eq!(s.running_rollout_ids()?, ["r1"]);
    assert_eq!(s.rollouts()?.len(), 5);
    Ok(())
}

pub(super) fn advancing_a_rollout_writes_its_assignments_and_itself_together(
    s: &dyn Store,
) -> Result<(), StoreError> {
    s.assign(&id("d2"), "claims", &model(1, None), 1)?;
    let mut r = rollout("r7", &["d1", "d2", "d3"], 5);
    let changes = vec![
        (id("d1"), model(2, Some("r7"))),
        (id("d2"), model(2, Some("r7"))),
    ];
    assert_eq!(s.advance_rollout(&mut r, &changes, 9)?, [1, 2]);
    let generations: Vec<Option<u64>> = r.targets.iter().map(|t| t.generation).collect();
    assert_eq!(
        generations,
        [Some(1), Some(2), None],
        "the caller's copy learns them"
    );
    assert_eq!(s.rollout("r7")?, Some(r.clone()), "stored with them");
    assert_eq!(
        s.assignment(&id("d2"))?.expect("d2").models["claims"],
        model(2, Some("r7"))
    );
    assert_eq!(s.assignment(&id("d3"))?, None);
    Ok(())
}

fn token(id: &str, hash: &str, created_ms: u64) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        name: format!("{id} token"),
        role: Role::Operator,
        hash: hash.into(),
        created_ms,
        created_by: "test".into(),
    }
}

pub(super) fn a_token_is_found_by_hash_and_replaced_by_id(s: &dyn Store) -> Result<(), StoreError> {
    assert_eq!(s.token("h1")?, None);
    s.put_token(&token("admin", "h1", 2))?;
    s.put_token(&token("t2", "h2", 1))?;
    assert_eq!(s.token("h1")?, Some(token("admin", "h1", 2)));
    // A new bootstrap token under the same id: the old hash authenticates no more.
    s.put_token(&token("admin", "h3", 3))?;
    assert_eq!(s.token("h1")?, None);
    let ids: Vec<(String, String)> = s.tokens()?.into_iter().map(|t| (t.id, t.hash)).collect();
    assert_eq!(
        ids,
        [("t2".into(), "h2".into()), ("admin".into(), "h3".into())],
        "oldest first"
    );
    assert!(s.remove_token("t2")?);
    assert!(!s.remove_token("t2")?, "gone already");
    assert_eq!(s.token("h2")?, None);
    Ok(())
}

pub(super) fn audit_appends_see_the_entry_before(s: &dyn Store) -> Result<(), StoreError> {
    let append = |s: &dyn Store, what: &str| {
        s.append_audit(&mut |last| AuditEntry {
            seq: last.map_or(1, |l| l.seq + 1),
            at_ms: 5,
            who: "token:t1".into(),
            role: "operator".into(),
            action: what.into(),
            target: "/v1/models".into(),
            outcome: 201,
            prev: last.map_or_else(String::new, |l| l.hash.clone()),
            hash: format!("hash of {what}"),
        })
    };
    assert_eq!(s.audit_entries(1, 10)?, Vec::new());
    assert_eq!(append(s, "a")?.seq, 1);
    let b = append(s, "b")?;
    assert_eq!((b.seq, b.prev.as_str()), (2, "hash of a"));
    append(s, "c")?;
    let seqs = |v: Vec<AuditEntry>| v.into_iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(s.audit_entries(1, 10)?), [1, 2, 3]);
    assert_eq!(seqs(s.audit_entries(2, 1)?), [2]);
    assert_eq!(s.audit_entries(2, 1)?, vec![b]);
    Ok(())
}

pub(super) fn a_policy_is_kept_with_its_state(s: &dyn Store) -> Result<(), StoreError> {
    let policy: Policy = serde_json::from_value(serde_json::json!({"model": "claims"}))
        .expect("a policy with defaults");
    assert_eq!(s.policy("claims")?, None);
    let state = PolicyState {
        last_share: 0.5,
        events: vec![(1, "started".into())],
        ..PolicyState::default()
    };
    s.put_policy(&policy, &state)?;
    let mut other = policy.clone();
    other.model = "vad".into();
    s.put_policy(&other, &PolicyState::default())?;
    assert_eq!(s.policy("claims")?, Some((policy.clone(), state)));
    s.put_policy(&policy, &PolicyState::default())?;
    assert_eq!(
        s.policy("claims")?.map(|(_, st)| st),
        Some(PolicyState::default())
    );
    let mut models: Vec<String> = s.policies()?.into_iter().map(|(p, _)| p.model).collect();
    models.sort();
    assert_eq!(models, ["claims", "vad"]);
    Ok(())
}

fn version(name: &str, version: u64, digest: &str) -> ModelRecord {
    ModelRecord {
        name: name.into(),
        version,
        label: "test".into(),
        digest: digest.into(),
        size: 10,
        signed_by: vec!["k1".into()],
        pushed_ms: version,
        stage: "candidate".into(),
        tags: BTreeMap::new(),
    }
}

pub(super) fn a_model_version_is_written_once_and_changed_in_place(
    s: &dyn Store,
) -> Result<(), StoreError> {
    assert_eq!(s.model_version("claims", 1)?, None);
    assert_eq!(s.insert_model_version(&version("claims", 2, "d2"))?, None);
    assert_eq!(s.insert_model_version(&version("claims", 1, "d1"))?, None);
    assert_eq!(
        s.insert_model_version(&version("claims-v2", 1, "e1"))?,
        None
    );
    assert_eq!(s.insert_model_version(&version("a", 9, "a9"))?, None);
    // The same name and version again: nothing changes, the first comes back.
    assert_eq!(
        s.insert_model_version(&version("claims", 1, "other"))?,
        Some(version("claims", 1, "d1"))
    );
    let changed = s.update_model_version("claims", 1, &|r| r.stage = "production".into())?;
    assert_eq!(changed.map(|r| r.stage), Some("production".to_string()));
    assert_eq!(
        s.model_version("claims", 1)?.map(|r| r.stage),
        Some("production".into())
    );
    assert_eq!(
        s.update_model_version("claims", 7, &|r| r.stage = "x".into())?,
        None
    );
    let listed = |name| -> Result<Vec<(String, u64)>, StoreError> {
        Ok(s.model_versions(name)?
            .into_iter()
            .map(|r| (r.name, r.version))
            .collect())
    };
    assert_eq!(
        listed(Some("claims"))?,
        [("claims".into(), 1), ("claims".into(), 2)]
    );
    assert_eq!(
        listed(None)?,
        [
            ("a".into(), 9),
            ("claims".into(), 1),
            ("claims".into(), 2),
            ("claims-v2".into(), 1)
        ]
    );
    assert_eq!(listed(Some("clai"))?, Vec::new(), "a name, not a prefix");
    Ok(())
}

fn capture(device: &str, seq: u64, sha256: &str) -> CaptureRecord {
    CaptureRecord {
        device: id(device),
        seq,
        model: "claims".into(),
        kind: "labelled".into(),
        rows: 3,
        bytes: 99,
        sha256: sha256.into(),
        received_ms: 5,
        first_ts_ms: 1,
        last_ts_ms: 2,
    }
}

pub(super) fn a_captured_batch_is_recorded_once(s: &dyn Store) -> Result<(), StoreError> {
    assert_eq!(s.capture(&id("d1"), 1)?, None);
    assert_eq!(s.put_capture(&capture("d10", 1, "a"))?, None);
    assert_eq!(s.put_capture(&capture("d1", 2, "b"))?, None);
    assert_eq!(s.put_capture(&capture("d1", 1, "c"))?, None);
    assert_eq!(
        s.put_capture(&capture("d1", 1, "other"))?,
        Some(capture("d1", 1, "c")),
        "the first stays"
    );
    assert_eq!(s.capture(&id("d1"), 1)?, Some(capture("d1", 1, "c")));
    let order: Vec<(String, u64)> = s
        .captures()?
        .into_iter()
        .map(|r| (r.device.to_string(), r.seq))
        .collect();
    assert_eq!(
        order,
        [("d1".into(), 1), ("d1".into(), 2), ("d10".into(), 1)],
        "by device, then seq"
    );
    // One device's records only: `d1` is a prefix of `d10`, which must not come along.
    let of_d1: Vec<u64> = s
        .device_captures(&id("d1"))?
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(of_d1, [1, 2]);
    assert!(s.device_captures(&id("d2"))?.is_empty());
    Ok(())
}

fn manifest(id_: &str, created_ms: u64) -> DatasetManifest {
    DatasetManifest {
        id: id_.into(),
        name: format!("set {id_}"),
        created_ms,
        sources: vec!["claims.csv".into()],
        devices: vec![],
        time_range: Some((1, 2)),
        rows: 10,
        bytes: 100,
        schema: vec![ColumnInfo {
            name: "age".into(),
            kind: "number".into(),
        }],
        filters: vec![],
    }
}

pub(super) fn dataset_manifests_are_kept_and_removed(s: &dyn Store) -> Result<(), StoreError> {
    assert_eq!(s.dataset("aa")?, None);
    s.put_dataset(&manifest("bb", 20))?;
    s.put_dataset(&manifest("aa", 10))?;
    assert_eq!(s.dataset("aa")?, Some(manifest("aa", 10)));
    let ids: Vec<String> = s.datasets()?.into_iter().map(|m| m.id).collect();
    assert_eq!(ids, ["aa", "bb"], "oldest first");
    assert!(s.remove_dataset("aa")?);
    assert!(!s.remove_dataset("aa")?);
    assert_eq!(s.dataset("aa")?, None);
    Ok(())
}

fn job(id_: &str, created_ms: u64) -> crate::jobs::Job {
    let spec = crate::jobs::JobSpec::from_toml(
        "model = \"claims\"\ncommand = [\"claims-fit\", \"--out\", \"{out}\"]\n",
    )
    .expect("a minimal job spec");
    crate::jobs::Job {
        id: id_.into(),
        model: "claims".into(),
        kind: "train".into(),
        spec,
        state: crate::jobs::JobState::Queued,
        trigger: "test".into(),
        created_ms,
        started_ms: None,
        finished_ms: None,
        inputs: vec![],
        training_dataset: None,
        trials: vec![],
        best: None,
        candidate: None,
        error: None,
        reproduces: None,
        report: None,
    }
}

pub(super) fn jobs_and_their_specs_are_kept(s: &dyn Store) -> Result<(), StoreError> {
    let (a, b) = (s.next_job_id()?, s.next_job_id()?);
    assert_ne!(a, b, "ids are never handed out twice");
    assert_eq!(s.job(&a)?, None);
    s.put_job(&job(&b, 20))?;
    s.put_job(&job(&a, 10))?;
    assert!(s.update_job(&b, &mut |j| j.state = crate::jobs::JobState::Running)?);
    assert!(!s.update_job("j999999", &mut |j| j.error = Some("x".into()))?);
    assert_eq!(
        s.job(&b)?.map(|j| j.state),
        Some(crate::jobs::JobState::Running)
    );
    let ids: Vec<String> = s.jobs()?.into_iter().map(|j| j.id).collect();
    assert_eq!(ids, [a, b], "oldest first");
    assert_eq!(s.job_spec("claims")?, None);
    s.put_job_spec("claims", "model = \"claims\"")?;
    s.put_job_spec("claims", "model = \"claims\"\nseed = 7")?;
    assert_eq!(
        s.job_spec("claims")?.as_deref(),
        Some("model = \"claims\"\nseed = 7")
    );
    Ok(())
}

pub(super) fn the_message_log_keeps_the_newest_of_each_device(
    s: &dyn Store,
) -> Result<(), StoreError> {
    for seq in [3, 1, 4, 5, 9, 2, 6] {
        s.insert(&message("d1", seq), NOW)?;
    }
    s.insert(&message("d10", 1), NOW)?;
    let seqs = |d: &str| -> Result<Vec<u64>, StoreError> {
        Ok(s.messages(&id(d), 0, 100)?
            .into_iter()
            .map(|e| e.seq)
            .collect())
    };
    assert_eq!(s.prune_messages(&id("d1"), 10)?, 0, "fewer than kept");
    assert_eq!(s.prune_messages(&id("d1"), 3)?, 4);
    assert_eq!(seqs("d1")?, [5, 6, 9], "the newest three");
    assert_eq!(seqs("d10")?, [1], "another device's log is its own");
    assert_eq!(
        s.insert(&message("d1", 10), NOW)?,
        (true, Some(9)),
        "the highest stored is still known"
    );
    assert_eq!(s.prune_messages(&id("d1"), 0)?, 4);
    assert_eq!(seqs("d1")?, Vec::<u64>::new());
    assert_eq!(s.prune_messages(&id("nobody"), 1)?, 0);
    s.flush()
}

pub(super) fn each_kind_keeps_its_newest_messages_per_device(
    s: &dyn Store,
) -> Result<(), StoreError> {
    // d1: statuses 1, 3, 5, 7; windows 2, 4, 6; an event 8. d2: statuses 1, 2.
    for seq in 1..=8 {
        let body = match seq {
            8 => event(),
            _ if seq % 2 == 1 => status(),
            _ => window("m"),
        };
        s.insert(&with_body("d1", seq, body), NOW)?;
    }
    for seq in 1..=2 {
        s.insert(&with_body("d2", seq, status()), NOW)?;
    }
    let seqs = |d: &str| -> Result<Vec<u64>, StoreError> {
        Ok(s.messages(&id(d), 0, 100)?
            .into_iter()
            .map(|e| e.seq)
            .collect())
    };
    assert_eq!(s.prune_kinds(&id("d1"), &BTreeMap::new())?, 0, "no rule");
    let keep = BTreeMap::from([("status".to_string(), 1), ("window".to_string(), 2)]);
    assert_eq!(s.prune_kinds(&id("d1"), &keep)?, 4);
    assert_eq!(
        seqs("d1")?,
        [4, 6, 7, 8],
        "the newest status, the two newest windows, the event (no rule)"
    );
    assert_eq!(s.prune_kinds(&id("d1"), &keep)?, 0, "already within");
    assert_eq!(seqs("d2")?, [1, 2], "another device's log is its own");
    assert_eq!(
        s.insert(&with_body("d1", 9, status()), NOW)?,
        (true, Some(8)),
        "the highest stored is still known"
    );
    let none = BTreeMap::from([("window".to_string(), 0)]);
    assert_eq!(s.prune_kinds(&id("d1"), &none)?, 2);
    assert_eq!(seqs("d1")?, [7, 8, 9]);
    assert_eq!(s.prune_kinds(&id("nobody"), &keep)?, 0);
    s.flush()
}

fn with_body(name: &str, seq: u64, body: Body) -> Received {
    Received::new(Envelope {
        body,
        ..envelope(name, seq)
    })
}

fn window(model: &str) -> Body {
    use fleetml_protocol::telemetry::{Quantiles, WindowReport};
    Body::Window(Box::new(WindowReport {
        shadow: None,
        model: model.into(),
        version: 1,
        window: 0,
        start_ms: 0,
        end_ms: 0,
        predictions: 0,
        throughput_per_s: 0.0,
        missed: BTreeMap::new(),
        missing_prediction_rate: 0.0,
        missing_ids: Vec::new(),
        latency_us: Quantiles::default(),
        lag_ms: Quantiles::default(),
        batch_rows: Quantiles::default(),
        outages: Vec::new(),
        outages_not_listed: 0,
        features: Vec::new(),
        prediction: None,
        events: Vec::new(),
        alerts: Vec::new(),
        labels: 0,
        live_accuracy: None,
        live_mae: None,
        multivariate: None,
        estimated_accuracy: None,
    }))
}

fn event() -> Body {
    Body::Event(fleetml_protocol::telemetry::Event {
        kind: fleetml_protocol::telemetry::Lifecycle::AssignmentAccepted,
        model: "a".into(),
        version: 1,
        detail: String::new(),
    })
}

fn status() -> Body {
    Body::Status(fleetml_protocol::telemetry::Status {
        agent_version: "t".into(),
        board: "b".into(),
        backends: vec![],
        models: vec![],
        uptime_s: 1,
        online: true,
        outbox_depth: 0,
        dropped_windows: 0,
        will_seq: None,
    })
}

/// Retention by kind and age, counted from when each message was stored: statuses go
/// after their limit, window reports past the downsampling age are thinned to the first
/// of each device, model and hour and go after theirs, a kind without a limit stays;
/// each device's log is its own and its highest sequence number stays known.
pub(super) fn retention_removes_by_kind_and_age_and_thins_old_windows(
    s: &dyn Store,
) -> Result<(), StoreError> {
    use super::AgeRules;
    const DAY: u64 = 86_400_000;
    // On an hour's first millisecond: every message falls into that hour.
    let now = NOW;
    let event = event();
    let d1 = [
        (1, window("a")),
        (2, window("a")),
        (3, window("b")),
        (4, status()),
        (5, event),
        (6, window("a")),
    ];
    for (seq, body) in d1 {
        assert!(s.insert(&with_body("d1", seq, body), NOW)?.0);
    }
    assert!(s.insert(&with_body("d2", 1, window("a")), NOW)?.0);
    let rules = AgeRules {
        max_age_ms: BTreeMap::from([
            ("status".to_string(), DAY),
            ("window".to_string(), 30 * DAY),
        ]),
        downsample_windows_after_ms: Some(7 * DAY),
    };
    let seqs = |d: &str| -> Result<Vec<u64>, StoreError> {
        Ok(s.messages(&id(d), 0, 100)?.iter().map(|e| e.seq).collect())
    };
    assert_eq!(s.expire_messages(&rules, now)?, 0, "nothing is old yet");
    assert_eq!(seqs("d1")?, [1, 2, 3, 4, 5, 6]);
    // Eight days on: the status is gone, the windows thinned to one per model and hour.
    assert_eq!(s.expire_messages(&rules, now + 8 * DAY)?, 3);
    assert_eq!(seqs("d1")?, [1, 3, 5]);
    assert_eq!(seqs("d2")?, [1], "another device's hour is its own");
    // A month on: the windows are gone; the event's kind has no limit.
    assert_eq!(s.expire_messages(&rules, now + 31 * DAY)?, 3);
    assert_eq!(seqs("d1")?, [5]);
    assert_eq!(seqs("d2")?, Vec::<u64>::new());
    assert_eq!(
        s.insert(&message("d1", 7), NOW)?,
        (true, Some(6)),
        "the highest stored is still known"
    );
    s.flush()
}

fn alert(key: &str, device: &str) -> crate::records::AlertRecord {
    crate::records::AlertRecord {
        key: key.into(),
        labels: [("alertname", "device_silent"), ("device", device)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        annotations: Default::default(),
        seen_ms: 10,
        fired_ms: Some(20),
        resolved_ms: None,
        event: false,
        told: Default::default(),
    }
}

pub(super) fn alerts_and_silences_are_kept_changed_and_removed(
    s: &dyn Store,
) -> Result<(), StoreError> {
    assert!(s.alerts()?.is_empty());
    s.update_alerts(&[alert("a1", "d1"), alert("a2", "d2")], &[])?;
    let mut told = alert("a1", "d1");
    told.told.insert(
        "hook".into(),
        crate::records::Told {
            state: Some("firing".into()),
            at_ms: 30,
            ..Default::default()
        },
    );
    // A change and a removal in one call.
    s.update_alerts(std::slice::from_ref(&told), &["a2".to_string()])?;
    assert_eq!(s.alerts()?, vec![told]);
    s.update_alerts(&[], &["a1".to_string(), "unknown".to_string()])?;
    assert!(s.alerts()?.is_empty());

    let silence = crate::records::Silence {
        id: "s1".into(),
        matchers: [("device".to_string(), "d1".to_string())].into(),
        starts_ms: 5,
        ends_ms: 50,
        by: "token:t1".into(),
        comment: "maintenance".into(),
    };
    s.put_silence(&silence)?;
    assert_eq!(s.silences()?, vec![silence]);
    assert!(s.remove_silence("s1")?);
    assert!(!s.remove_silence("s1")?);
    assert!(s.silences()?.is_empty());
    Ok(())
}

/// Calls macro `$m` with `$args` followed by the name of every test of the suite.
macro_rules! each_case {
    ($m:ident!($($args:tt)*)) => {
        $m! { $($args)*
            devices_enroll_once,
            messages_are_stored_once_in_order_per_device,
            the_message_log_keeps_the_newest_of_each_device,
            each_kind_keeps_its_newest_messages_per_device,
            retention_removes_by_kind_and_age_and_thins_old_windows,
            device_state_changes_in_place,
            a_message_is_stored_with_the_state_it_changes,
            a_batch_is_stored_as_one_message_after_another,
            command_sequence_numbers_count_per_device,
            states_and_assignments_are_read_for_many_devices,
            an_assignment_moves_its_generation_only_when_it_changes,
            many_assignments_apply_in_order,
            rollouts_keep_ids_and_order,
            the_unfinished_rollouts_are_listed_apart,
            advancing_a_rollout_writes_its_assignments_and_itself_together,
            a_token_is_found_by_hash_and_replaced_by_id,
            audit_appends_see_the_entry_before,
            a_policy_is_kept_with_its_state,
            a_model_version_is_written_once_and_changed_in_place,
            a_captured_batch_is_recorded_once,
            dataset_manifests_are_kept_and_removed,
            jobs_and_their_specs_are_kept,
            alerts_and_silences_are_kept_changed_and_removed,
        }
    };
}

/// Runs every test of the suite against the store `$make` builds, in module `$name`:
/// one `#[test]` per case.
macro_rules! conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            each_case!(conformance!(@each $make;));
        }
    };
    (@each $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                let (store, _keep) = $make;
                super::$test(&store).expect("the store answers");
            }
        )*
    };
}

/// The suite as a list of named cases.
macro_rules! case_list {
    ($($test:ident),* $(,)?) => {
        [$((stringify!($test), $test as fn(&dyn Store) -> Result<(), StoreError>)),*]
    };
}

conformance!(memory, (super::super::memory::MemoryStore::new(), ()));
conformance!(sled, {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = super::super::sled::SledStore::open(dir.path()).expect("sled opens");
    (store, dir)
});

/// What sled stores survives reopening it: assignments, and rollouts advanced in one
/// transaction.
#[test]
fn sled_keeps_what_it_stored_across_a_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut r = rollout("r1", &["d1"], 5);
    {
        let s = super::sled::SledStore::open(dir.path()).expect("sled opens");
        s.enroll(&device("d1")).expect("enroll");
        s.advance_rollout(&mut r, &[(id("d1"), model(2, Some("r1")))], 9)
            .expect("advance");
    }
    // sled's flusher thread lets go of the file lock a moment after the last handle is
    // dropped; under load the first reopen can find it still held.
    let mut attempt = 0;
    let s = loop {
        match super::sled::SledStore::open(dir.path()) {
            Ok(s) => break s,
            Err(_) if attempt < 50 => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("sled reopens: {e}"),
        }
    };
    assert_eq!(s.device(&id("d1")).expect("read"), Some(device("d1")));
    assert_eq!(s.rollout("r1").expect("read"), Some(r));
    assert_eq!(
        s.assignment(&id("d1")).expect("read").map(|a| a.generation),
        Some(1)
    );
}

/// The suite against a real PostgreSQL server (Debian's `postgresql`, started here):
/// each case on a fresh database, migrated by the store as `fleetctl serve --database`
/// does. One server for all the cases (starting one takes seconds); every failing case
/// is named.
#[test]
fn postgres_passes_the_suite() {
    let pg = fleetml_testkit::Postgres::start();
    let mut failed = Vec::new();
    for (i, (name, case)) in each_case!(case_list!()).into_iter().enumerate() {
        let url = pg.create_database(&format!("conformance{i}"));
        let store = super::postgres::PgStore::open(&url).expect("the store opens");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            case(&store).expect("the store answers")
        }));
        if outcome.is_err() {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "cases failed on PostgreSQL: {failed:?}");
}
