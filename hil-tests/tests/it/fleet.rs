//! Fleet messaging end to end, with real processes and real brokers: `fleetctl serve`
//! (embedded rumqttd, or mosquitto from Debian), `fleetctl devices enroll`, and
//! `fleet-agent run --config agent.toml`. Partitions, SIGKILL, overflow, forgery and
//! malformed messages included.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use fleetml_protocol::telemetry::{self, Body, DeviceId, Event, Lifecycle};
use hil_tests::fleet::{ControlPlane, Mosquitto, free_port, wait_for};
use hil_tests::{RunningAgent, agent, bin, build_claims, claims, install, keys_and_policy};
use serde_json::Value;

use crate::monitoring::{rows, send};

const WAIT: Duration = Duration::from_secs(60);

/// Enrolls `name`, installs the claims bundle with the config enrollment wrote, and
/// starts `fleet-agent run --config NAME.toml` (windows of 50 predictions).
fn enrolled_agent(dir: &Path, plane: &ControlPlane, name: &str, extra: &[&str]) -> RunningAgent {
    enroll(dir, plane, name, "");
    start_agent(dir, name, extra)
}

/// [`enrolled_agent`] with `config` added to the configuration enrollment wrote.
fn enrolled_agent_configured(
    dir: &Path,
    plane: &ControlPlane,
    name: &str,
    config: &str,
) -> RunningAgent {
    enroll(dir, plane, name, config);
    start_agent(dir, name, &[])
}

fn enroll(dir: &Path, plane: &ControlPlane, name: &str, more_config: &str) {
    let config = format!("{name}.toml");
    plane
        .fleetctl(
            dir,
            &[
                "devices",
                "enroll",
                name,
                "--board",
                "raspberry-pi-4",
                "--tags",
                "site=plant-3,line=2",
                "--out",
                &config,
            ],
        )
        .success();
    if !more_config.is_empty() {
        // First, so that the keys stay at the top level whatever tables follow.
        let path = dir.join(&config);
        let written = std::fs::read_to_string(&path).expect("the enrolled config");
        std::fs::write(&path, format!("{more_config}{written}")).expect("rewrite the config");
    }
    if !dir.join("claims.fmb").exists() {
        signed_claims(dir, 1, "claims.fmb", "reference.csv");
    }
    let data = format!("data-{name}");
    agent(
        dir,
        &[
            "install-bundle",
            "claims.fmb",
            "--config",
            &config,
            "--data-dir",
            &data,
        ],
    )
    .success();
}

/// Builds `out`: the claims model v`version` with a reference profile from the example
/// CSV `reference`, signed with `keys/k.key`.
fn signed_claims(dir: &Path, version: u32, out: &str, reference: &str) {
    build_claims(
        dir,
        version,
        out,
        &["--reference", &claims(reference), "--key", "keys/k.key"],
    );
}

fn start_agent(dir: &Path, name: &str, extra: &[&str]) -> RunningAgent {
    let (config, data) = (format!("{name}.toml"), format!("data-{name}"));
    let mut args = vec![
        "run",
        "--config",
        &config,
        "--data-dir",
        &data,
        "--listen",
        "127.0.0.1:0",
    ];
    if !extra.contains(&"--window-predictions") {
        args.extend(["--window-predictions", "50"]);
    }
    args.extend_from_slice(extra);
    RunningAgent::start(dir, &args)
}

fn sigkill(agent: RunningAgent) {
    let mut agent = agent;
    let _ = agent.child.kill();
    let _ = agent.child.wait();
}

fn of_kind<'a>(messages: &'a [Value], kind: &str) -> Vec<&'a Value> {
    messages.iter().filter(|m| m["kind"] == kind).collect()
}

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

#[test]
fn an_enrolled_agent_joins_through_the_embedded_broker_and_shows_in_the_fleet_views() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let plane = ControlPlane::start(dir, None, &["--trust", "trust.toml"]);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&plane.data_dir.join("admin.token")), 0o600);
        assert_eq!(mode(&plane.data_dir), 0o700);
    }
    let agent = enrolled_agent(dir, &plane, "pi-01", &[]);
    let config = std::fs::read_to_string(dir.join("pi-01.toml")).expect("config");
    for key in [
        "device_id",
        "device_secret",
        "mqtt_url",
        "control_plane",
        "[trust_policy]",
    ] {
        assert!(config.contains(key), "{key} missing from:\n{config}");
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir.join("pi-01.toml")).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    // Enrolling the same name twice is refused, and nothing is overwritten.
    let again = plane.fleetctl(dir, &["devices", "enroll", "pi-01", "--out", "other.toml"]);
    assert!(
        again.failure().contains("already enrolled"),
        "{}",
        again.stderr
    );

    send(&agent, &rows("reference.csv")[..150]);
    wait_for("3 windows of pi-01 in the control plane", WAIT, || {
        let messages = plane.messages("pi-01");
        (of_kind(&messages, "window").len() == 3).then_some(())
    });
    let list = plane.json(dir, &["devices", "list"]);
    let me = &list.as_array().expect("list")[0];
    assert_eq!(me["id"], "pi-01");
    assert_eq!(me["online"], true);
    assert_eq!(me["board"], "raspberry-pi-4");
    assert_eq!(me["tags"]["site"], "plant-3");
    assert_eq!(me["models"][0]["name"], "claims");
    assert_eq!(me["models"][0]["version"], 1);
    let table = plane.fleetctl(dir, &["devices", "list"]);
    let table = table.success();
    assert!(
        table.contains("pi-01") && table.contains("online"),
        "{table}"
    );
    assert!(table.contains("claims@v1/cpu"), "{table}");

    // Drift across the fleet: one row per schema feature, the predictions and the
    // reconstruction error (the numeric features together).
    let features = toml::from_str::<toml::Value>(
        &std::fs::read_to_string(claims("features.toml")).expect("schema"),
    )
    .expect("toml")["features"]
        .as_array()
        .expect("features")
        .len();
    let drift = plane.json(dir, &["drift", "--model", "claims"]);
    let drift = drift.as_array().expect("rows");
    assert_eq!(drift.len(), features + 2, "{drift:?}");
    assert!(
        drift.iter().any(|r| r["feature"] == "reconstruction_error"),
        "{drift:?}"
    );
    assert!(
        drift
            .iter()
            .all(|r| r["device"] == "pi-01" && r["psi"].is_number())
    );
    let text = plane.fleetctl(dir, &["drift", "--device", "pi-01"]);
    assert!(text.success().contains("FEATURE"), "{}", text.stdout);
    let none = plane.json(dir, &["drift", "--model", "no-such-model"]);
    assert_eq!(none, Value::Array(vec![]));

    // A command over MQTT, answered with an acknowledgement.
    plane
        .fleetctl(dir, &["devices", "send-status", "pi-01"])
        .success();
    wait_for("the acknowledgement of send-status", WAIT, || {
        let messages = plane.messages("pi-01");
        of_kind(&messages, "ack")
            .iter()
            .any(|a| a["body"]["ack"]["ok"] == true)
            .then_some(())
    });
    let show = plane.fleetctl(dir, &["devices", "show", "pi-01"]);
    assert!(show.success().contains("RECENT EVENTS"), "{}", show.stdout);

    // A login with the wrong password is refused by the embedded broker and counted.
    let port = plane.mqtt_port.expect("embedded broker");
    let mut o = rumqttc::MqttOptions::new("intruder", "127.0.0.1", port);
    o.set_credentials("pi-01", "not-the-password");
    let (_client, mut conn) = rumqttc::Client::new(o, 10);
    let first = conn.iter().next().expect("an event");
    assert!(first.is_err(), "a wrong password connected: {first:?}");
    assert!(plane.get("/v1/ingest")["logins_refused"].as_u64() >= Some(1));

    // The device vanishes: the broker publishes its last will, the fleet sees it offline.
    sigkill(agent);
    wait_for("pi-01 offline after SIGKILL", WAIT, || {
        let d = plane.json(dir, &["devices", "show", "pi-01"]);
        (d["online"] == false).then_some(())
    });
    assert_eq!(plane.get("/v1/ingest")["refused"], 0);
}

#[test]
fn a_broker_outage_with_a_sigkilled_agent_loses_nothing_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let mut broker = Mosquitto::start(dir, free_port());
    let plane = ControlPlane::start(dir, Some(broker.port), &["--trust", "trust.toml"]);
    let agent = enrolled_agent(dir, &plane, "pi-02", &[]);
    let data = rows("reference.csv");
    send(&agent, &data[..100]);
    wait_for("2 windows before the outage", WAIT, || {
        (of_kind(&plane.messages("pi-02"), "window").len() == 2).then_some(())
    });

    broker.stop();
    send(&agent, &data[100..250]);
    // Let the agent's monitoring history reach the disk too (sled syncs every 500 ms).
    std::thread::sleep(Duration::from_secs(2));
    sigkill(agent);
    let agent = start_agent(dir, "pi-02", &[]);
    send(&agent, &data[250..350]);
    std::thread::sleep(Duration::from_secs(1));
    broker.resume();

    let messages = wait_for("all 7 windows after the outage", WAIT, || {
        let m = plane.messages("pi-02");
        (of_kind(&m, "window").len() == 7).then_some(m)
    });
    // Every sequence number from 0 to the highest, each once.
    let s = seqs(&messages);
    let expected: Vec<u64> = (s[0]..=*s.last().expect("some")).collect();
    assert_eq!(s, expected, "stored sequence numbers have a hole");
    let windows: std::collections::BTreeSet<(u64, u64)> = of_kind(&messages, "window")
        .iter()
        .map(|w| {
            let b = &w["body"]["window"];
            (
                b["version"].as_u64().expect("v"),
                b["window"].as_u64().expect("n"),
            )
        })
        .collect();
    assert_eq!(windows.len(), 7, "a window reported twice: {windows:?}");
    let device = plane.json(dir, &["devices", "show", "pi-02"]);
    assert_eq!(device["gaps"], 0, "arrived out of order: {device}");
    assert_eq!(device["dropped_windows"], 0, "{device}");
    drop(agent);
}

/// The broker acknowledges what it then drops (mosquitto holding one message for the
/// ingest while the control plane is down, as rumqttd's in-memory log does for a
/// lagging ingest): the agent keeps each message until the control plane's receipt
/// names it; when a receipt names a later message, it publishes the skipped ones again
/// (once a second receipt skips them too, or 20 s after the first did; the
/// time-out, the last resort, is set to an hour so it cannot be what saves them), and
/// every window arrives, once.
#[test]
fn what_the_broker_acknowledged_and_lost_arrives_because_only_receipts_delete() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let broker = Mosquitto::start_queueing(dir, free_port(), 1);
    let mut plane = ControlPlane::start(
        dir,
        Some(broker.port),
        &["--trust", "trust.toml", "--receipt-interval", "300ms"],
    );
    let agent =
        enrolled_agent_configured(dir, &plane, "pi-09", "telemetry_resend_after_s = 3600\n");
    let data = rows("reference.csv");
    send(&agent, &data[..100]);
    wait_for("2 windows stored", WAIT, || {
        (of_kind(&plane.messages("pi-09"), "window").len() == 2).then_some(())
    });
    let metric = |name: &str| {
        let (_, text) = agent.request("GET", "/metrics", &Value::Null);
        metric_sum(text.as_str().unwrap_or_default(), name, "")
    };
    wait_for("a receipt to reach the agent", WAIT, || {
        (metric("fleetml_agent_receipts_total") > 0.0).then_some(())
    });

    plane.stop();
    send(&agent, &data[100..350]);
    // Long enough for every window to be published and acknowledged by the broker
    // (which keeps one for the absent ingest and drops the rest).
    std::thread::sleep(Duration::from_secs(3));
    plane.restart();
    // Something new, stored after what the broker dropped: its receipt skips them.
    send(&agent, &data[350..400]);

    let messages = wait_for("all 8 windows", WAIT, || {
        let m = plane.messages("pi-09");
        (of_kind(&m, "window").len() == 8).then_some(m)
    });
    let s = seqs(&messages);
    let expected: Vec<u64> = (s[0]..=*s.last().expect("some")).collect();
    assert_eq!(s, expected, "stored sequence numbers have a hole");
    assert!(
        metric("fleetml_agent_telemetry_republished_total") > 0.0,
        "nothing was published again: the broker did not drop anything, so this test tested nothing"
    );
    wait_for("the agent's outbox to empty on receipts", WAIT, || {
        let (_, text) = agent.request("GET", "/metrics", &Value::Null);
        (metric_sum(
            text.as_str().unwrap_or_default(),
            "fleetml_agent_outbox_depth",
            "",
        ) == 0.0)
            .then_some(())
    });
    drop(agent);
}

#[test]
fn a_full_outbox_drops_only_the_oldest_windows_and_counts_them_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    // The ingest's persistent session is made, then the broker goes down (a broker that
    // never saw the ingest's session cannot queue for it: messages the agent publishes
    // before the ingest first subscribes reach nobody — keep the ingest's session, e.g.
    // with mosquitto's `persistence true`).
    let mut broker = Mosquitto::start(dir, free_port());
    let plane = ControlPlane::start(dir, Some(broker.port), &["--trust", "trust.toml"]);
    broker.stop();
    let agent = enrolled_agent(
        dir,
        &plane,
        "pi-03",
        // Windows of 10 reference rows look drifted by chance; alerts (which are never
        // dropped) would crowd out every window, so none is raised here.
        &[
            "--outbox-max-messages",
            "6",
            "--window-predictions",
            "10",
            "--alert-windows",
            "100",
        ],
    );
    let data = rows("reference.csv");
    send(&agent, &data[..100]);
    // A lifecycle event while offline: version 2 activated.
    signed_claims(dir, 2, "claims-v2.fmb", "reference.csv");
    hil_tests::agent(
        dir,
        &[
            "install-bundle",
            "claims-v2.fmb",
            "--config",
            "pi-03.toml",
            "--data-dir",
            "data-pi-03",
        ],
    )
    .success();
    Command::new("kill")
        .args(["-HUP", &agent.child.id().to_string()])
        .status()
        .expect("kill");
    wait_for("v2 served", WAIT, || {
        let (_, models) = agent.request("GET", "/v1/models", &Value::Null);
        models.to_string().contains("\"version\":2").then_some(())
    });
    send(&agent, &data[100..200]);
    std::thread::sleep(Duration::from_secs(1));

    broker.resume();
    let messages = wait_for("the outbox drained", WAIT, || {
        let m = plane.messages("pi-03");
        (!of_kind(&m, "window").is_empty() && !of_kind(&m, "event").is_empty()).then_some(m)
    });
    let _ = messages;
    // The status sent after the drain carries the exact drop count.
    plane
        .fleetctl(dir, &["devices", "send-status", "pi-03"])
        .success();
    let (messages, dropped) = wait_for("a status after the drain", WAIT, || {
        let m = plane.messages("pi-03");
        let acked = !of_kind(&m, "ack").is_empty();
        let d = plane.json(dir, &["devices", "show", "pi-03"]);
        if acked && d["status"]["outbox_depth"] == 0 {
            return Some((m, d["dropped_windows"].as_u64().expect("count")));
        }
        // A status counts what still waits for its receipt when it is taken; on a loaded
        // machine receipts can trail the drain, so ask again until one finds it empty.
        if acked {
            plane
                .fleetctl(dir, &["devices", "send-status", "pi-03"])
                .success();
        }
        None
    });
    let windows = of_kind(&messages, "window").len() as u64;
    assert!(dropped > 0, "nothing was dropped with a bound of 6");
    assert_eq!(
        windows + dropped,
        20,
        "stored {windows} + dropped {dropped} != produced 20"
    );
    // Never a lifecycle event: v2's activation is there.
    let events = of_kind(&messages, "event");
    assert!(
        events.iter().any(
            |e| e["body"]["event"]["kind"] == "activated" && e["body"]["event"]["version"] == 2
        ),
        "{events:?}"
    );
    // Only the oldest windows went: what remains is the newest, without holes (window
    // numbers run on across versions of a model: v1 had 0-9, v2 10-19).
    let kept: Vec<u64> = of_kind(&messages, "window")
        .iter()
        .map(|w| w["body"]["window"]["window"].as_u64().expect("n"))
        .collect();
    let newest: Vec<u64> = (20 - kept.len() as u64..20).collect();
    assert_eq!(kept, newest, "not the newest windows were kept");
    drop(agent);
}

/// Publishes raw payloads with a plain MQTT client, waiting for each PUBACK.
fn publish_raw(port: u16, id: &str, messages: &[(String, Vec<u8>)]) {
    let (client, mut conn) =
        rumqttc::Client::new(rumqttc::MqttOptions::new(id, "127.0.0.1", port), 64);
    for (topic, payload) in messages {
        client
            .publish(
                topic.clone(),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .expect("queued");
    }
    let mut acked = 0;
    for event in conn.iter() {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = event.as_ref() {
            acked += 1;
            if acked == messages.len() {
                break;
            }
        }
        assert!(event.is_ok(), "publishing: {event:?}");
    }
}

/// PROTOCOL.md is true to the wire, checked from outside the code: every message a real
/// agent and control plane exchange (status, windows, an acknowledged command, receipts)
/// is captured from mosquitto and handed to `scripts/wire_check.py`, which decodes it
/// with Python's `cbor2`, verifies its MAC with Python's `hmac` over the bytes sent,
/// keyed by the decoded 32-byte secret, compares every body's keys with the page's table,
/// and derives the MQTT password (checked against the mosquitto password file) and the
/// HTTP token (used here) as the page says. Before: the MAC covered the receiver's
/// re-encoding of the fields (cbor2 encodes floats differently, so no outside check
/// could work), the page did not list `labels`, and the status named `local-cpu` for a
/// device enrolled as `raspberry-pi-4`.
#[test]
fn the_wire_is_what_protocol_md_says_checked_with_cbor2_and_a_plain_hmac() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let broker = Mosquitto::start(dir, free_port());
    let plane = ControlPlane::start(
        dir,
        Some(broker.port),
        &["--trust", "trust.toml", "--receipt-interval", "300ms"],
    );
    let captured = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Vec<u8>)>::new()));
    let (client, mut conn) = rumqttc::Client::new(
        rumqttc::MqttOptions::new("wire-sniffer", "127.0.0.1", broker.port),
        64,
    );
    client
        .subscribe("fleetml/v1/#", rumqttc::QoS::AtLeastOnce)
        .expect("subscribe");
    {
        let captured = captured.clone();
        std::thread::spawn(move || {
            for event in conn.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => captured
                        .lock()
                        .expect("lock")
                        .push((p.topic.clone(), p.payload.to_vec())),
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
    }
    let agent = enrolled_agent(dir, &plane, "pi-09", &[]);
    send(&agent, &rows("reference.csv")[..100]);
    wait_for("2 windows stored", WAIT, || {
        (of_kind(&plane.messages("pi-09"), "window").len() == 2).then_some(())
    });
    plane
        .fleetctl(dir, &["devices", "send-status", "pi-09"])
        .success();
    let kinds = |m: &[(String, Vec<u8>)]| -> Vec<String> {
        m.iter()
            .map(|(t, _)| t.rsplit('/').next().unwrap_or_default().to_string())
            .collect()
    };
    wait_for("status, telemetry, events and cmd captured", WAIT, || {
        let k = kinds(&captured.lock().expect("lock"));
        [("status", 2), ("telemetry", 2), ("events", 1), ("cmd", 2)]
            .iter()
            .all(|(c, n)| k.iter().filter(|x| x == c).count() >= *n)
            .then_some(())
    });
    let config: toml::Value =
        toml::from_str(&std::fs::read_to_string(dir.join("pi-09.toml")).expect("config"))
            .expect("toml");
    let messages: Vec<Value> = captured
        .lock()
        .expect("lock")
        .iter()
        .filter(|(t, _)| t.starts_with("fleetml/v1/pi-09/"))
        .map(|(t, p)| serde_json::json!({ "topic": t, "payload": hex::encode(p) }))
        .collect();
    let capture = serde_json::json!({
        "device": "pi-09",
        "secret": config["device_secret"].as_str().expect("secret"),
        "board": "raspberry-pi-4",
        "passwd": plane.get("/v1/broker/mosquitto")["passwd"],
        "messages": messages,
    });
    let file = dir.join("capture.json");
    std::fs::write(&file, capture.to_string()).expect("capture");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(hil_tests::python())
        .arg(root.join("scripts/wire_check.py"))
        .arg(&file)
        .arg(root.join("docs/PROTOCOL.md"))
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
    for kind in ["status", "window", "ack", "receipt"] {
        assert!(summary["kinds"][kind].as_u64() >= Some(1), "{summary}");
    }
    // The HTTP token derived outside is the device's.
    let token = format!("Bearer {}", summary["http_token"].as_str().expect("token"));
    let (status, body) = hil_tests::http_with(
        plane.connect(),
        "GET",
        "/v1/devices/pi-09/assignment",
        &[("authorization", token.as_str())],
        b"",
    )
    .expect("HTTP");
    assert!(
        status != 401 && status != 403,
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        plane.json(dir, &["devices", "show", "pi-09"])["board"],
        "raspberry-pi-4"
    );
    drop(agent);
}

#[test]
fn forged_and_malformed_messages_are_counted_and_never_stored() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let broker = Mosquitto::start(dir, free_port());
    let plane = ControlPlane::start(dir, Some(broker.port), &["--trust", "trust.toml"]);
    for name in ["pi-04", "pi-05"] {
        plane
            .fleetctl(
                dir,
                &["devices", "enroll", name, "--out", &format!("{name}.toml")],
            )
            .success();
    }
    let secret_of = |name: &str| {
        let text = std::fs::read_to_string(dir.join(format!("{name}.toml"))).expect("config");
        let v: toml::Value = toml::from_str(&text).expect("toml");
        hex::decode(v["device_secret"].as_str().expect("secret")).expect("hex")
    };
    let event = |seq| {
        Body::Event(Event {
            kind: Lifecycle::Activated,
            model: "claims".into(),
            version: seq,
            detail: String::new(),
        })
    };
    let (pi4, pi5) = (
        DeviceId::new("pi-04").expect("id"),
        DeviceId::new("pi-05").expect("id"),
    );
    let mut bad: Vec<(String, Vec<u8>)> = Vec::new();
    // A wrong secret.
    bad.push(telemetry::seal(&pi4, 0, 0, event(0), &[7u8; 32]));
    // pi-05's valid message replayed on pi-04's topic, and pi-04 posing as pi-05.
    let (_, m) = telemetry::seal(&pi5, 0, 0, event(0), &secret_of("pi-05"));
    bad.push(("fleetml/v1/pi-04/events".into(), m));
    bad.push(telemetry::seal(&pi5, 1, 0, event(1), &secret_of("pi-04")));
    // An unknown device.
    bad.push(telemetry::seal(
        &DeviceId::new("ghost").expect("id"),
        0,
        0,
        event(0),
        &[1u8; 32],
    ));
    // Truncations of a valid message, and random bytes.
    let (topic, valid) = telemetry::seal(&pi4, 0, 0, event(0), &secret_of("pi-04"));
    for cut in [1, valid.len() / 3, valid.len() / 2, valid.len() - 1] {
        bad.push((topic.clone(), valid[..cut].to_vec()));
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for n in 0..40 {
        let bytes: Vec<u8> = (0..(n * 7 % 300))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        bad.push(("fleetml/v1/pi-04/telemetry".into(), bytes));
    }
    let refused = bad.len() as u64;
    publish_raw(broker.port, "forger", &bad);
    // Then the real one: the ingest is alive and stores it.
    publish_raw(broker.port, "pi-04-test", &[(topic, valid)]);
    wait_for("the valid message stored", WAIT, || {
        (plane.messages("pi-04").len() == 1).then_some(())
    });
    let counters = plane.get("/v1/ingest");
    assert_eq!(counters["refused"].as_u64(), Some(refused), "{counters}");
    assert_eq!(counters["stored"], 1, "{counters}");
    assert!(plane.messages("pi-05").is_empty());
}

/// Retention by kind, age and count in a running control plane: with `--retain
/// event=2s` the events a device sent are gone once the leader applies retention (at
/// start and every 10 minutes); `--retain status=0` keeps statuses whatever their age,
/// and `--retain-count status=2` keeps the newest two of its three; the device's state
/// still shows what it reported.
#[test]
fn the_leader_removes_messages_older_than_their_kind_allows() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let broker = Mosquitto::start(dir, free_port());
    let mut plane = ControlPlane::start(
        dir,
        Some(broker.port),
        &[
            "--retain",
            "event=2s",
            "--retain",
            "status=0",
            "--retain-count",
            "status=2",
        ],
    );
    plane
        .fleetctl(dir, &["devices", "enroll", "pi-06", "--out", "pi-06.toml"])
        .success();
    let text = std::fs::read_to_string(dir.join("pi-06.toml")).expect("config");
    let v: toml::Value = toml::from_str(&text).expect("toml");
    let secret = hex::decode(v["device_secret"].as_str().expect("secret")).expect("hex");
    let id = DeviceId::new("pi-06").expect("id");
    let mut sent: Vec<(String, Vec<u8>)> = (0..3)
        .map(|seq| {
            let event = Body::Event(Event {
                kind: Lifecycle::Activated,
                model: "claims".into(),
                version: seq + 1,
                detail: String::new(),
            });
            telemetry::seal(&id, seq, 0, event, &secret)
        })
        .collect();
    let status = Body::Status(telemetry::Status {
        agent_version: "t".into(),
        board: "raspberry-pi-4".into(),
        backends: vec![],
        models: vec![],
        uptime_s: 1,
        online: true,
        outbox_depth: 0,
        dropped_windows: 0,
        will_seq: None,
    });
    for seq in 3..6 {
        sent.push(telemetry::seal(&id, seq, 0, status.clone(), &secret));
    }
    publish_raw(broker.port, "pi-06-test", &sent);
    wait_for("six messages stored", WAIT, || {
        (plane.messages("pi-06").len() == 6).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    plane.restart();
    // One retention pass removes the events (age), then the oldest status (count).
    wait_for("the events and the oldest status to go", WAIT, || {
        (seqs(&plane.messages("pi-06")) == [4, 5]).then_some(())
    });
    let view = plane.get("/v1/devices/pi-06");
    assert!(view.to_string().contains("raspberry-pi-4"), "{view:#}");
}

#[test]
fn the_outbox_keeps_every_flushed_message_across_sigkill() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("outbox");
    let mut last_reported = None;
    for round in 0..5u64 {
        let mut child = Command::new(bin("outbox-writer"))
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("writer starts");
        let reader = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        use std::io::BufRead;
        let mut reported = Vec::new();
        // Kill at a different point each round: after 50, 90, 130, … confirmed pushes.
        let target = 50 + round * 40;
        for line in reader.lines() {
            let seq: u64 = line.expect("line").trim().parse().expect("seq");
            reported.push(seq);
            if reported.len() as u64 == target {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let outbox = fleet_agent::outbox::Outbox::open(&dir, Default::default()).expect("reopen");
        let pending: std::collections::BTreeSet<u64> = outbox
            .pending(usize::MAX)
            .expect("pending")
            .iter()
            .map(|m| m.seq)
            .collect();
        for seq in &reported {
            assert!(
                pending.contains(seq),
                "round {round}: flushed message {seq} lost"
            );
        }
        let next = outbox.next_seq().expect("next");
        assert!(
            next > *reported.last().expect("some"),
            "round {round}: seq went back"
        );
        if let Some(prev) = last_reported {
            assert!(
                reported[0] > prev,
                "round {round}: a sequence number was reused"
            );
        }
        last_reported = reported.last().copied();
    }
}

/// A tiny HTTP server that answers 200 to every POST and hands over the bodies.
fn webhook_receiver() -> (u16, std::sync::mpsc::Receiver<Value>) {
    use std::io::{BufRead, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    let mut first = true;
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if first {
                            first = false;
                            continue;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let _ = tx.send(serde_json::from_slice(&body).unwrap_or(Value::Null));
                    let _ = reader
                        .get_mut()
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
            });
        }
    });
    (port, rx)
}

pub(crate) fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn predictions_reach_every_sink_and_a_dead_consumer_costs_inference_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    build_claims(dir, 1, "claims.fmb", &["--key", "keys/k.key"]);
    install(dir, "claims.fmb");
    let broker = Mosquitto::start(dir, free_port());
    let (hook, bodies) = webhook_receiver();
    let dead = free_port();
    // Subscribe before any prediction.
    let (sub, mut conn) = rumqttc::Client::new(
        rumqttc::MqttOptions::new("dashboard", "127.0.0.1", broker.port),
        64,
    );
    sub.subscribe("plant/claims/predictions", rumqttc::QoS::AtLeastOnce)
        .expect("subscribe");
    let (mqtt_tx, mqtt_rx) = std::sync::mpsc::channel::<Value>();
    let (suback_tx, suback_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for event in conn.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    let _ = suback_tx.send(());
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _ = mqtt_tx.send(serde_json::from_slice(&p.payload).unwrap_or(Value::Null));
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    suback_rx.recv_timeout(WAIT).expect("subscribed");
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            r#"trust = "trust.toml"

[[prediction_sink]]
kind = "jsonl"
path = "preds/claims.jsonl"
max_bytes = 4096
keep = 2
include_inputs = true

[[prediction_sink]]
kind = "webhook"
url = "http://127.0.0.1:{hook}/predictions"
models = ["claims"]

[[prediction_sink]]
kind = "webhook"
url = "http://127.0.0.1:{dead}/nobody-listens"
queue = 2

[[prediction_sink]]
kind = "mqtt"
url = "mqtt://127.0.0.1:{port}"
topic = "plant/claims/predictions"
"#,
            port = broker.port
        ),
    )
    .expect("config");
    let running = RunningAgent::start(
        dir,
        &[
            "run",
            "--config",
            "agent.toml",
            "--data-dir",
            "data",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let data = rows("holdout.csv");
    for (i, row) in data.iter().take(40).enumerate() {
        let (status, reply) = running.request(
            "POST",
            "/v1/models/claims/predict",
            &serde_json::json!({ "id": format!("r-{i}"), "features": row }),
        );
        assert_eq!(
            status, 200,
            "inference must not suffer from a dead sink: {reply}"
        );
    }
    // Webhook and MQTT consumers get every prediction, with its request id and version.
    let got: Vec<Value> = (0..40)
        .map(|_| bodies.recv_timeout(WAIT).expect("a webhook delivery"))
        .collect();
    assert!(
        got.iter()
            .all(|b| b["model"] == "claims" && b["version"] == 1)
    );
    assert!(
        got.iter()
            .all(|b| b["request_id"].is_string() && b["predictions"].is_array())
    );
    assert!(
        got.iter().all(|b| b.get("inputs").is_none()),
        "inputs only where asked"
    );
    let ids: std::collections::BTreeSet<String> = got
        .iter()
        .map(|b| b["ids"][0].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 40);
    let published: Vec<Value> = (0..40)
        .map(|_| mqtt_rx.recv_timeout(WAIT).expect("an MQTT delivery"))
        .collect();
    assert!(published.iter().all(|b| b["model"] == "claims"));
    // The JSON-lines file rotated by size, keeps 2 old files, holds the newest lines.
    let preds = dir.join("preds");
    let read = |name: &str| std::fs::read_to_string(preds.join(name)).unwrap_or_default();
    wait_for("the newest prediction in the JSON-lines file", WAIT, || {
        read("claims.jsonl").contains("\"r-39\"").then_some(())
    });
    assert!(preds.join("claims.jsonl.1").exists() && preds.join("claims.jsonl.2").exists());
    assert!(!preds.join("claims.jsonl.3").exists(), "keep = 2");
    for name in ["claims.jsonl", "claims.jsonl.1", "claims.jsonl.2"] {
        let text = read(name);
        assert!(text.len() <= 4096, "{name} is {} bytes", text.len());
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).expect("a JSON line");
            assert!(v["inputs"].is_array(), "include_inputs = true: {v}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(preds.join(name))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    // The dead webhook: every record it could not take or deliver is counted.
    wait_for("all 40 records of the dead webhook counted", WAIT, || {
        let (_, text) = running.request("GET", "/metrics", &Value::Null);
        let text = text.as_str().unwrap_or_default().to_string();
        let n = metric_sum(
            &text,
            "fleetml_agent_sink_dropped_total",
            "sink=\"webhook#3\"",
        );
        (n == 40.0).then_some(())
    });
    drop(running);

    // A sink the agent cannot understand stops it at start, naming it.
    std::fs::write(
        dir.join("bad.toml"),
        "trust = \"trust.toml\"\n[[prediction_sink]]\nkind = \"kafka\"\n",
    )
    .expect("config");
    let bad = agent(
        dir,
        &[
            "run",
            "--config",
            "bad.toml",
            "--data-dir",
            "data",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert!(
        bad.failure().contains("unknown kind `kafka`"),
        "{}",
        bad.stderr
    );
}

#[test]
fn the_ingest_keeps_up_with_a_burst_from_many_devices_through_mosquitto() {
    // 6,000 sealed window reports from 30 devices at once: more than the ingest's old
    // hand-over queue held, which deadlocked it against its own acknowledgements.
    let run = hil_tests::run(
        "ingest-load",
        std::env::temp_dir().as_path(),
        &[
            "--devices",
            "30",
            "--messages",
            "200",
            "--broker",
            "mosquitto",
        ],
    );
    let line = run.success();
    let v: Value = serde_json::from_str(line.lines().last().expect("a result line")).expect("JSON");
    assert_eq!(v["messages"], 6000, "{line}");
}

#[test]
fn the_registry_keeps_only_verified_bundles_and_shows_where_they_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    let plane = ControlPlane::start(dir, None, &["--trust", "trust.toml"]);
    signed_claims(dir, 1, "claims.fmb", "reference.csv");
    let pushed = plane.fleetctl(dir, &["models", "push", "claims.fmb"]);
    assert!(
        pushed.success().contains("pushed claims@v1"),
        "{}",
        pushed.stdout
    );
    let again = plane.fleetctl(dir, &["models", "push", "claims.fmb"]);
    assert!(
        again.success().contains("nothing changed"),
        "{}",
        again.stdout
    );
    // Other bytes under the same name and version.
    build_claims(
        dir,
        1,
        "claims-other.fmb",
        &["--label", "other", "--key", "keys/k.key"],
    );
    let conflict = plane.fleetctl(dir, &["models", "push", "claims-other.fmb"]);
    assert!(
        conflict
            .failure()
            .contains("already in the registry with other bytes"),
        "{}",
        conflict.stderr
    );
    // Unsigned, and signed by a key the server does not trust.
    build_claims(dir, 2, "unsigned.fmb", &[]);
    let unsigned = plane.fleetctl(dir, &["models", "push", "unsigned.fmb"]);
    assert!(
        unsigned.failure().contains("failed verification"),
        "{}",
        unsigned.stderr
    );
    hil_tests::fleetctl(
        dir,
        &["keys", "generate", "--out", "keys", "--name", "stranger"],
    )
    .success();
    build_claims(dir, 3, "stranger.fmb", &["--key", "keys/stranger.key"]);
    let stranger = plane.fleetctl(dir, &["models", "push", "stranger.fmb"]);
    assert!(
        stranger.failure().contains("failed verification"),
        "{}",
        stranger.stderr
    );

    let list = plane.json(dir, &["models", "list"]);
    let list = list.as_array().expect("list");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(
        (list[0]["name"].as_str(), list[0]["version"].as_u64()),
        (Some("claims"), Some(1))
    );
    assert_eq!(list[0]["stage"], "candidate");
    let digest = list[0]["digest"].as_str().expect("digest");
    assert!(
        plane
            .data_dir
            .join("blobs")
            .join(format!("{digest}.fmb"))
            .exists()
    );
    assert!(
        std::fs::read_dir(plane.data_dir.join("blobs"))
            .expect("blobs")
            .all(|e| !e
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .starts_with(".incoming")),
        "refused uploads leave nothing behind"
    );
    let show = plane.json(dir, &["models", "show", "claims@1"]);
    assert_eq!(show["bundle"]["manifest"]["name"], "claims", "{show}");
    assert_eq!(show["running_on"], Value::Array(vec![]));

    // Once a device reports it, the registry says where it runs.
    let agent = enrolled_agent(dir, &plane, "pi-09", &[]);
    let show = wait_for("pi-09 running claims v1", WAIT, || {
        let v = plane.json(dir, &["models", "show", "claims"]);
        (v["running_on"][0]["device"] == "pi-09").then_some(v)
    });
    assert_eq!(show["versions"].as_array().map(Vec::len), Some(1));
    let text = plane.fleetctl(dir, &["models", "show", "claims@1"]);
    assert!(
        text.success().contains("pi-09 v1 on cpu"),
        "{}",
        text.stdout
    );
    drop(agent);

    // A second version profiled on other data: the diff shows the reference profile
    // changed and the schema did not.
    signed_claims(dir, 2, "claims-v2.fmb", "holdout.csv");
    plane
        .fleetctl(dir, &["models", "push", "claims-v2.fmb"])
        .success();
    let diff = plane.fleetctl(dir, &["models", "diff", "claims@1", "claims@2"]);
    let diff = diff.success();
    assert!(diff.contains("features: same"), "{diff}");
    assert!(
        diff.contains("reference: ") && diff.contains("difference(s)"),
        "{diff}"
    );
    // Stages and tags.
    plane
        .fleetctl(dir, &["models", "stage", "claims@2", "production"])
        .success();
    let bad = plane.fleetctl(dir, &["models", "stage", "claims@2", "live"]);
    // clap refuses it, listing the stages.
    assert!(
        !bad.ok() && bad.stderr.contains("production"),
        "{}",
        bad.stderr
    );
    plane
        .fleetctl(
            dir,
            &["models", "tag", "claims@2", "owner=claims-team,ticket=ML-7"],
        )
        .success();
    plane
        .fleetctl(dir, &["models", "tag", "claims@2", "--remove", "ticket"])
        .success();
    let list = plane.json(dir, &["models", "list"]);
    let v2 = &list.as_array().expect("list")[1];
    assert_eq!(v2["stage"], "production", "{v2}");
    assert_eq!(
        v2["tags"],
        serde_json::json!({ "owner": "claims-team" }),
        "{v2}"
    );
    assert_eq!(list[0]["stage"], "candidate");
}

#[test]
fn an_admin_sets_the_trust_policy_and_it_outlives_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    keys_and_policy(dir, "k");
    build_claims(dir, 1, "claims.fmb", &["--key", "keys/k.key"]);
    let mut plane = ControlPlane::start(dir, None, &[]);
    let refused = plane.fleetctl(dir, &["models", "push", "claims.fmb"]);
    assert!(
        refused.failure().contains("no trust policy"),
        "{}",
        refused.stderr
    );
    let none = plane.fleetctl(dir, &["trust", "show"]);
    assert!(
        none.success().contains("no trust policy"),
        "{}",
        none.stdout
    );
    std::fs::write(dir.join("broken.toml"), "threshold = 2\nkeys = []\n").expect("write");
    let broken = plane.fleetctl(dir, &["trust", "set", "broken.toml"]);
    assert!(
        broken.failure().contains("broken.toml"),
        "{}",
        broken.stderr
    );
    plane
        .fleetctl(dir, &["trust", "set", "trust.toml"])
        .success();
    plane
        .fleetctl(dir, &["models", "push", "claims.fmb"])
        .success();

    plane.stop();
    drop(plane);
    let plane = ControlPlane::start(dir, None, &[]);
    let shown = plane.fleetctl(dir, &["trust", "show"]);
    let expected = std::fs::read_to_string(dir.join("trust.toml")).expect("policy");
    let key_line = expected
        .lines()
        .find(|l| l.contains("public"))
        .expect("a key line");
    assert!(
        shown.success().contains(key_line.trim()),
        "{}",
        shown.stdout
    );
    // Devices enrolled now get it in their config.
    plane
        .fleetctl(dir, &["devices", "enroll", "pi-10", "--out", "pi-10.toml"])
        .success();
    let config = std::fs::read_to_string(dir.join("pi-10.toml")).expect("config");
    assert!(
        config.contains("[trust_policy]") || config.contains("[[trust_policy.keys]]"),
        "{config}"
    );
}

/// While the store cannot answer (PostgreSQL stopped), what the devices send waits in the
/// broker, not in the control plane: the ingest acknowledges a message only once it is
/// stored, so it never holds more than mosquitto's in-flight window (20 by default)
/// received and unstored. Once PostgreSQL is back every message is stored, once.
#[test]
fn a_stalled_store_leaves_the_backlog_in_the_broker_and_loses_nothing() {
    const DEVICES: usize = 10;
    const MESSAGES: u64 = 100;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let pg = hil_tests::fleet::Postgres::start();
    let url = pg.create_database("fleet");
    let broker = Mosquitto::start(dir, free_port());
    let plane = ControlPlane::start_at(
        dir,
        "127.0.0.1",
        Some(broker.port),
        &["--insecure-listen"],
        vec![("FLEETML_DATABASE_URL".into(), url)],
    );
    let devices: Vec<(DeviceId, Vec<u8>)> = (0..DEVICES)
        .map(|i| {
            let id = format!("stall-{i}");
            let r = plane.post("/v1/devices", &serde_json::json!({ "id": id }));
            let secret = hex::decode(r["device_secret"].as_str().expect("secret")).expect("hex");
            (DeviceId::new(&id).expect("id"), secret)
        })
        .collect();
    wait_for("the ingest's session", Duration::from_secs(30), || {
        (plane.get("/v1/ingest")["broker_connected"] == true).then_some(())
    });

    pg.stop();
    // Each device publishes its messages and waits for the broker's acknowledgements.
    let publishers: Vec<_> = devices
        .iter()
        .cloned()
        .map(|(id, secret)| {
            let port = broker.port;
            std::thread::spawn(move || {
                let mut o = rumqttc::MqttOptions::new(id.as_str(), "127.0.0.1", port);
                o.set_credentials(id.as_str(), telemetry::mqtt_password(&secret));
                o.set_max_packet_size(1 << 20, 1 << 20);
                let (client, mut conn) = rumqttc::Client::new(o, 16);
                std::thread::spawn(move || {
                    for seq in 1..=MESSAGES {
                        let body = Body::Event(Event {
                            kind: Lifecycle::Downloading,
                            model: "claims".into(),
                            version: 1,
                            detail: "x".repeat(2000),
                        });
                        let (topic, bytes) = telemetry::seal(&id, seq, 0, body, &secret);
                        if client
                            .publish(topic, rumqttc::QoS::AtLeastOnce, false, bytes)
                            .is_err()
                        {
                            return;
                        }
                    }
                });
                let mut acked = 0;
                for event in conn.iter() {
                    match event {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                            acked += 1;
                            if acked == MESSAGES {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => panic!("publishing: {e}"),
                    }
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().expect("a publisher");
    }
    // The broker took all of them: once the ingest holds some, give it time to take
    // whatever more it would.
    let pending = || crate::rollout::metric(&plane, "fleetml_control_ingest_pending");
    wait_for("the ingest to receive", Duration::from_secs(30), || {
        (pending() > 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let pending = pending();
    assert!(
        pending <= 20,
        "{pending} messages received and not stored: more than mosquitto's in-flight window"
    );

    pg.start_again();
    // The API answers 503 until each of its pooled connections has found PostgreSQL
    // back (one failed call each).
    let get = |path: &str| -> Option<Value> {
        let (status, body) = crate::rollout::get_as(&plane, &plane.token, "GET", path);
        (status == 200).then(|| serde_json::from_slice(&body).ok())?
    };
    let total = DEVICES as u64 * MESSAGES;
    wait_for("every message stored", Duration::from_secs(120), || {
        let stored = get("/v1/ingest")?["stored"].as_u64().unwrap_or(0);
        assert!(stored <= total, "{stored} stored of {total}");
        (stored == total).then_some(())
    });
    for (id, _) in &devices {
        let path = format!("/v1/devices/{id}/messages?limit=1000");
        let mut seqs: Vec<u64> = wait_for(&path, Duration::from_secs(30), || get(&path))
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["seq"].as_u64())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=MESSAGES).collect::<Vec<_>>(), "{id}");
    }
}
