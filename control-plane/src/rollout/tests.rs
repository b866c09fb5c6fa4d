//! The engine's rules with simulated time: waves, quorum, soak, deadlines, gates.

use super::*;

fn target(id: &str) -> Target {
    Target {
        device: DeviceId::new(id).expect("test"),
        wave: 0,
        to: AssignedModel {
            shadow: None,
            version: 2,
            digest: fleetml_protocol::crypto::sha256(b"x"),
            size: 1,
            rollout: None,
        },
        from: None,
        assigned_ms: None,
        generation: None,
    }
}

fn running(version: u64) -> DeviceState {
    use fleetml_protocol::telemetry::{ActiveModel, Status};
    DeviceState {
        online: true,
        status: Some((
            1,
            Status {
                agent_version: "test".into(),
                board: "b".into(),
                backends: vec!["cpu".into()],
                models: vec![ActiveModel {
                    shadow: None,
                    name: "claims".into(),
                    version,
                    backend: "cpu".into(),
                    fallbacks: vec![],
                }],
                uptime_s: 1,
                online: true,
                outbox_depth: 0,
                dropped_windows: 0,
                will_seq: None,
            },
        )),
        ..DeviceState::default()
    }
}

fn rollout(ids: &[&str], waves: &[u32], quorum_pct: u32, auto_rollback: bool) -> Rollout {
    let from = AssignedModel {
        shadow: None,
        version: 1,
        digest: fleetml_protocol::crypto::sha256(b"v1"),
        size: 1,
        rollout: None,
    };
    Rollout::new(
        Plan {
            shadow: None,
            id: "r1".into(),
            kind: Kind::Rollout,
            model: "claims".into(),
            version: Some(2),
            selector: "all".into(),
            strategy: Strategy {
                waves: waves.to_vec(),
                soak_ms: 1000,
                quorum_pct,
                deadline_ms: 10_000,
                gates: Gates::default(),
                auto_rollback,
            },
            targets: ids
                .iter()
                .map(|i| Target {
                    from: Some(from.clone()),
                    ..target(i)
                })
                .collect(),
            baseline: Baseline::default(),
            by: "test".into(),
        },
        0,
    )
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).expect("test")
}

#[test]
fn a_wave_starts_only_after_the_one_before_is_active_and_soaked() {
    let mut r = rollout(&["a", "b"], &[50, 100], 100, false);
    let mut states = BTreeMap::new();
    let first = r.step(&states, 0);
    assert_eq!(
        first.iter().map(|a| a.device.as_str()).collect::<Vec<_>>(),
        ["a"]
    );
    assert!(r.step(&states, 500).is_empty(), "a is not active yet");
    states.insert(id("a"), running(2));
    assert!(r.step(&states, 900).is_empty(), "soaking");
    assert!(r.step(&states, 1000).is_empty(), "wave 1 passes");
    assert_eq!(r.waves[0].passed_ms, Some(1000));
    let second = r.step(&states, 1001);
    assert_eq!(
        second.iter().map(|a| a.device.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    states.insert(id("b"), running(2));
    r.step(&states, 2001);
    assert_eq!(r.state, State::Completed);
}

#[test]
fn a_failed_self_test_pauses_the_rollout_or_rolls_the_reached_devices_back() {
    use fleetml_protocol::telemetry::Event;
    let failed = DeviceState {
        lifecycle: vec![(
            5,
            Event {
                kind: Lifecycle::SelfTestFailed,
                model: "claims".into(),
                version: 2,
                detail: "golden self-test failed".into(),
            },
        )],
        ..running(1)
    };
    let states: BTreeMap<_, _> = [(id("a"), failed)].into();
    let mut paused = rollout(&["a", "b"], &[50, 100], 100, false);
    paused.step(&BTreeMap::new(), 0);
    assert!(paused.step(&states, 10).is_empty());
    assert_eq!(paused.state, State::Paused);
    assert!(
        paused
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("self_test_failures = 1 (limit 0)"),
        "{:?}",
        paused.reason
    );
    let mut back = rollout(&["a", "b"], &[50, 100], 100, true);
    back.step(&BTreeMap::new(), 0);
    let undo = back.step(&states, 10);
    assert_eq!(back.state, State::RolledBack);
    assert_eq!(undo.len(), 1, "only the reached device goes back");
    assert_eq!((undo[0].device.as_str(), undo[0].to.version), ("a", 1));
}

#[test]
fn a_refusal_arriving_after_the_activation_does_not_hold_a_rollback_whose_device_runs_it() {
    use fleetml_protocol::telemetry::Event;
    let event = |at, kind, version, detail: &str| {
        (
            at,
            Event {
                kind,
                model: if version == 0 { "" } else { "claims" }.into(),
                version,
                detail: detail.into(),
            },
        )
    };
    let late = DeviceState {
        lifecycle: vec![
            event(5, Lifecycle::Activated, 2, "activated"),
            event(6, Lifecycle::AssignmentRefused, 0, "generation 3 expired"),
        ],
        ..running(2)
    };
    let mut back = rollout(&["a"], &[100], 100, false);
    back.kind = Kind::Rollback;
    back.strategy.soak_ms = 0;
    back.step(&BTreeMap::new(), 0);
    let states: BTreeMap<_, _> = [(id("a"), late.clone())].into();
    assert_eq!(
        back.progress(&back.targets[0], states.get(&id("a"))),
        Progress::Active
    );
    back.step(&states, 10);
    assert_eq!(back.state, State::Completed, "{:?}", back.reason);
    // Not running it: the refusal is what the device last said.
    let refused = DeviceState {
        lifecycle: late.lifecycle.clone(),
        ..running(1)
    };
    assert!(matches!(
        back.progress(&back.targets[0], Some(&refused)),
        Progress::Failed(_)
    ));
    // A rollout's gates still count the refusal.
    let mut gated = rollout(&["a"], &[100], 100, false);
    gated.step(&BTreeMap::new(), 0);
    gated.step(&states, 10);
    assert_eq!(gated.state, State::Paused, "{:?}", gated.reason);
}

#[test]
fn offline_devices_hold_a_wave_only_until_its_quorum_and_a_missed_deadline_stops_it() {
    let mut r = rollout(&["a", "b", "c", "d"], &[100], 50, false);
    let mut states = BTreeMap::new();
    assert_eq!(r.step(&states, 0).len(), 4);
    states.insert(id("a"), running(2));
    r.step(&states, 2000);
    assert_eq!(r.state, State::Running, "1 of 4 active, 2 needed");
    states.insert(id("b"), running(2));
    r.step(&states, 3000);
    assert_eq!(r.state, State::Completed, "c and d catch up later");

    let mut strict = rollout(&["a", "b"], &[100], 100, false);
    strict.step(&BTreeMap::new(), 0);
    let one: BTreeMap<_, _> = [(id("a"), running(2))].into();
    strict.step(&one, 9_999);
    assert_eq!(strict.state, State::Running);
    strict.step(&one, 10_000);
    assert_eq!(strict.state, State::Paused);
    assert!(
        strict
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("quorum not reached: 1 of 2"),
        "{:?}",
        strict.reason
    );
}

#[test]
fn waves_split_devices_cumulatively_and_skip_empty_waves() {
    let mut t: Vec<Target> = ["a", "b", "c"].iter().map(|i| target(i)).collect();
    let waves = Rollout::plan(&mut t, &[1, 10, 50, 100]);
    assert_eq!(
        waves
            .iter()
            .map(|w| (w.percent, w.devices))
            .collect::<Vec<_>>(),
        vec![(1, 1), (50, 1), (100, 1)]
    );
    assert_eq!(t.iter().map(|t| t.wave).collect::<Vec<_>>(), vec![0, 1, 2]);
}

#[test]
fn wave_lists_must_grow_to_100() {
    assert_eq!(
        parse_waves(Some("1,10,50,100"), None).expect("test"),
        vec![1, 10, 50, 100]
    );
    assert_eq!(parse_waves(None, Some(5)).expect("test"), vec![5, 100]);
    assert!(parse_waves(Some("50,10,100"), None).is_err());
    assert!(parse_waves(Some("10,50"), None).is_err());
    assert!(parse_waves(Some("0,100"), None).is_err());
    assert!(parse_waves(Some("10,100"), Some(5)).is_err());
}

#[test]
fn selectors_match_board_tags_and_ids() {
    let d = DeviceRecord {
        id: DeviceId::new("pi-1").expect("test"),
        board: Some("raspberry-pi-4".into()),
        tags: [("site".to_string(), "lab".to_string())].into(),
        secret: vec![],
        enrolled_ms: 0,
        revoked_ms: None,
    };
    let yes = |s: &str| s.parse::<Selector>().expect("test").matches(&d);
    assert!(yes("all"));
    assert!(yes("board=raspberry-pi-4,site=lab"));
    assert!(yes("device=pi-2|pi-1"));
    assert!(!yes("board=jetson-orin"));
    assert!(!yes("site=lab,zone=eu"));
    assert!("board".parse::<Selector>().is_err());
}

/// The names kinds and states are shown by are their wire names.
#[test]
fn kind_and_state_names_are_their_wire_names() {
    let wire = |v: serde_json::Value| v.as_str().map(str::to_string);
    for k in [Kind::Rollout, Kind::Rollback] {
        assert_eq!(
            wire(serde_json::to_value(k).expect("json")).as_deref(),
            Some(k.as_str())
        );
    }
    for s in [
        State::Running,
        State::Paused,
        State::Completed,
        State::Aborted,
        State::RolledBack,
    ] {
        assert_eq!(
            wire(serde_json::to_value(s).expect("json")).as_deref(),
            Some(s.as_str())
        );
    }
}

/// `Rollout::remind`: the running wave's online devices that reported nothing since
/// their assignment, after 30 s, then 60, 120 and 240 s more, then never; not those that
/// answered (with any event, a failure too), run the version, are offline or wait in a
/// later wave; not while paused; a resumed wave counts anew.
#[test]
fn silent_online_devices_of_the_running_wave_are_reminded_four_times_at_growing_intervals() {
    use fleetml_protocol::telemetry::Event;
    const AFTER: u64 = 30_000;
    let event = |at: u64, kind: Lifecycle, model: &str| {
        (
            at,
            Event {
                kind,
                model: model.into(),
                version: 2,
                detail: String::new(),
            },
        )
    };
    let silent = running(1);
    let mut states: BTreeMap<_, _> = [
        (id("silent"), silent.clone()),
        (
            // Events from before the assignment do not count as an answer.
            id("heard-before"),
            DeviceState {
                lifecycle: vec![event(0, Lifecycle::Activated, "claims")],
                ..silent.clone()
            },
        ),
        (
            id("accepted"),
            DeviceState {
                lifecycle: vec![event(10, Lifecycle::AssignmentAccepted, "")],
                ..silent.clone()
            },
        ),
        (
            id("failed"),
            DeviceState {
                lifecycle: vec![event(10, Lifecycle::DownloadFailed, "claims")],
                ..silent.clone()
            },
        ),
        (id("active"), running(2)),
        (
            id("offline"),
            DeviceState {
                online: false,
                ..silent.clone()
            },
        ),
    ]
    .into();
    let ids = [
        "accepted",
        "active",
        "failed",
        "heard-before",
        "offline",
        "silent",
        "z-later",
    ];
    let mut r = rollout(&ids, &[80, 100], 100, false);
    r.step(&states, 1);
    assert_eq!(r.waves[0].devices, 6, "z-later waits in wave 2");
    states.insert(id("z-later"), silent.clone());
    let names = |v: Vec<DeviceId>| v.iter().map(|d| d.to_string()).collect::<Vec<_>>();
    assert!(
        r.remind(&states, AFTER, AFTER).is_empty(),
        "30 s not passed"
    );
    assert!(r.remind(&states, 1 + AFTER, 0).is_empty(), "0: never");
    let mut at = 1 + AFTER;
    for (n, wait) in [0, 2 * AFTER, 4 * AFTER, 8 * AFTER].into_iter().enumerate() {
        at += wait;
        if n > 0 {
            assert!(
                r.remind(&states, at - 1, AFTER).is_empty(),
                "reminder {n} early"
            );
        }
        assert_eq!(
            names(r.remind(&states, at, AFTER)),
            ["heard-before", "silent"],
            "reminder {n}"
        );
        assert_eq!(r.waves[0].reminded, n as u32 + 1);
        assert_eq!(r.waves[0].reminded_ms, Some(at));
        assert!(r.remind(&states, at, AFTER).is_empty(), "once at {at}");
    }
    assert!(
        r.remind(&states, at + 100 * AFTER, AFTER).is_empty(),
        "four reminders at most"
    );

    // Paused, nothing; resumed (`start::control` restarts the wave), the reminders
    // count anew from then.
    let resumed = at + 100 * AFTER;
    r.waves[0].restart(resumed);
    assert_eq!((r.waves[0].reminded, r.waves[0].reminded_ms), (0, None));
    r.state = State::Paused;
    assert!(
        r.remind(&states, resumed + AFTER, AFTER).is_empty(),
        "paused"
    );
    r.state = State::Running;
    assert!(
        r.remind(&states, resumed + AFTER - 1, AFTER).is_empty(),
        "early"
    );
    assert_eq!(
        names(r.remind(&states, resumed + AFTER, AFTER)),
        ["heard-before", "silent"]
    );
    // The reminder survives the record's round trip; an older record without it reads.
    let json = serde_json::to_value(&r.waves[0]).expect("json");
    assert_eq!(json["reminded"], 1);
    let old: Wave = serde_json::from_value(serde_json::json!({
        "percent": 80, "devices": 6, "started_ms": 1, "passed_ms": null
    }))
    .expect("a wave written before reminders");
    assert_eq!((old.reminded, old.reminded_ms), (0, None));
}

/// The engine reads only the reached devices' states (`start::step`): a waiting
/// device's state — even one full of failures, or running the new version already —
/// changes nothing a step decides, reminds or gates on.
#[test]
fn a_step_depends_on_the_reached_devices_states_only() {
    use fleetml_protocol::telemetry::Event;
    let failing = DeviceState {
        lifecycle: vec![(
            40_000,
            Event {
                kind: Lifecycle::SelfTestFailed,
                model: "claims".into(),
                version: 2,
                detail: "golden self-test failed".into(),
            },
        )],
        ..running(2)
    };
    let mut all: BTreeMap<_, _> = [
        (id("a"), running(1)),
        (id("b"), failing.clone()),
        (id("c"), failing),
    ]
    .into();
    let (mut with_all, mut reached_only) = (
        rollout(&["a", "b", "c"], &[33, 100], 100, false),
        rollout(&["a", "b", "c"], &[33, 100], 100, false),
    );
    for now in [0, 10, 1_000, 31_000, 61_000] {
        if now == 1_000 {
            all.insert(id("a"), running(2));
        }
        let reached = |r: &Rollout| -> BTreeMap<DeviceId, DeviceState> {
            r.targets
                .iter()
                .filter(|t| t.assigned_ms.is_some())
                .filter_map(|t| Some((t.device.clone(), all.get(&t.device)?.clone())))
                .collect()
        };
        // As the engine does: the states read before the step, for the step and the
        // reminders.
        let before = reached(&reached_only);
        assert_eq!(
            with_all.step(&all, now),
            reached_only.step(&before, now),
            "step at {now}"
        );
        assert_eq!(
            with_all.remind(&all, now, 30_000),
            reached_only.remind(&before, now, 30_000),
            "remind at {now}"
        );
        let after = reached(&reached_only);
        assert_eq!(
            with_all.gates(&all),
            reached_only.gates(&after),
            "gates at {now}"
        );
        assert_eq!(with_all, reached_only, "at {now}");
    }
    assert_eq!(with_all.waves[0].passed_ms, Some(1_000), "a's wave passed");
    assert_eq!(
        with_all.state,
        State::Paused,
        "then b's and c's failures count"
    );
}
