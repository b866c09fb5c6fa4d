//! Several `fleetctl serve` replicas on one PostgreSQL database, one S3-compatible
//! object store (moto's server) and one broker: any replica answers any call, one
//! elected leader runs the rollout engine and another takes over when it dies, and the
//! replicas share the telemetry ingest without losing or doubling a message when one of
//! them is killed. The broker is mosquitto (a shared MQTT subscription splits the
//! ingest) or a 3-node NATS cluster with JetStream and MQTT (a JetStream work queue
//! splits it; devices on different nodes, one node killed mid-run).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use hil_tests::fleet::{
    ControlPlane, Mosquitto, NatsCluster, Postgres, S3Server, free_port, wait_for,
};
use hil_tests::keys_and_policy;
use serde_json::Value;

use crate::rollout::{bundle, enroll, kill, rollout, run_agent, wait_running, wait_state};

const WAIT: Duration = Duration::from_secs(90);

/// A replica of the control plane in `dir` (its DATA_DIR `dir/plane`), named `id`, its
/// bundles in bucket `fleet` of `s3`.
/// `queue`: the NATS nodes the ingest pulls from (`--ingest-queue`), or none for a
/// shared MQTT subscription.
fn replica(
    dir: &Path,
    id: &str,
    broker: u16,
    s3: &S3Server,
    url: &str,
    queue: Option<&str>,
) -> ControlPlane {
    let trust = dir.parent().expect("parent").join("trust.toml");
    let mut env = s3.env();
    env.push(("FLEETML_DATABASE_URL".into(), url.into()));
    if let Some(q) = queue {
        env.push(("FLEETML_INGEST_QUEUE".into(), q.into()));
    }
    ControlPlane::start_at(
        dir,
        "127.0.0.1",
        Some(broker),
        &[
            "--insecure-listen",
            "--trust",
            &trust.display().to_string(),
            "--replica-id",
            id,
            "--blobs",
            "s3://fleet/bundles",
            "--receipt-interval",
            "500ms",
        ],
        env,
    )
}

fn leads(plane: &ControlPlane) -> bool {
    plane.get("/v1/ingest")["leader"] == true
}

/// The stored sequence numbers of `device`, checking none is stored twice.
fn stored(plane: &ControlPlane, device: &str) -> Vec<u64> {
    let seqs: Vec<u64> = plane
        .messages(device)
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(
        unique.len(),
        seqs.len(),
        "{device}: a message stored twice: {seqs:?}"
    );
    seqs
}

#[test]
fn two_replicas_share_the_api_and_ingest_and_a_new_leader_finishes_a_rollout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(tmp.path(), free_port());
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    two_replicas(tmp.path(), [broker.port; 2], &url, None, || {});
}

#[test]
fn on_a_nats_cluster_the_replicas_split_the_ingest_through_a_work_queue_and_lose_nothing_when_a_node_dies()
 {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut nats = NatsCluster::start(3);
    let nodes: Vec<(u16, u16)> = nats.nodes().iter().map(|n| (n.port, n.mqtt_port)).collect();
    // The replicas' MQTT sessions are on nodes 0 (B) and 1 (A), two devices on node 1
    // and the third on node 2, which dies mid-run: it moves to node 0, the next in its
    // list. The replicas' queue connections may be on node 2 too.
    let queue = nats.urls();
    let last = format!(
        "mqtt://127.0.0.1:{},mqtt://127.0.0.1:{}",
        nodes[2].1, nodes[0].1
    );
    let (mut replicated, mut command_consumers, mut jsz) = (None, None, String::new());
    two_replicas(
        tmp.path(),
        [nodes[0].1, nodes[1].1],
        &last,
        Some(&queue),
        || {
            jsz = nats.monitor(
                0,
                "/jsz?accounts=true&streams=true&consumers=true&config=true",
            );
            let v: Value = serde_json::from_str(&jsz).unwrap_or_default();
            let streams: Vec<&Value> = v["account_details"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["stream_detail"].as_array())
                .flatten()
                .collect();
            // The queue is kept on all three nodes: losing one loses nothing.
            replicated = streams.iter().find_map(|s| {
                (s["name"] == "FLEETML_INGEST").then(|| s["config"]["num_replicas"].as_u64())?
            });
            // The devices subscribe to their commands with QoS 0: nats-server keeps no
            // JetStream consumer for them (one per device, replicated, at QoS 1).
            command_consumers = streams.iter().find_map(|s| {
                (s["name"] == "$MQTT_msgs").then(|| {
                    s["consumer_detail"].as_array().map_or(0, |cs| {
                        cs.iter()
                            .filter(|c| {
                                c["config"]["filter_subject"]
                                    .as_str()
                                    .is_some_and(|f| f.ends_with(".cmd"))
                            })
                            .count()
                    })
                })
            });
            nats.kill(2);
        },
    );
    assert_eq!(replicated, Some(3), "the stream's replicas: {jsz}");
    assert_eq!(
        command_consumers,
        Some(0),
        "consumers for the devices' command subscriptions: {jsz}"
    );
}

/// The scenario both brokers pass: B (its MQTT session on `brokers[0]`) leads, A (on
/// `brokers[1]`) follows; two devices are on A's broker, the third on `last_device`;
/// B dies mid-rollout and `mid_run` runs then (a broker node killed).
fn two_replicas(
    dir: &Path,
    brokers: [u16; 2],
    last_device: &str,
    queue: Option<&str>,
    mid_run: impl FnOnce(),
) {
    keys_and_policy(dir, "k");
    let pg = Postgres::start();
    let url = pg.create_database("fleet");
    let s3 = S3Server::start();
    s3.create_bucket("fleet");
    let (dir_a, dir_b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&dir_b).expect("dir b");

    // B starts first and leads; A gets B's keys (the replicas sign assignments and
    // chain the audit log with the same keys, and share the admin token).
    let mut b = replica(&dir_b, "b", brokers[0], &s3, &url, queue);
    wait_for("replica b to lead", WAIT, || leads(&b).then_some(()));
    let keys = dir_a.join("plane");
    std::fs::create_dir_all(&keys).expect("dir a");
    for f in ["admin.token", "assignment.key", "audit.key"] {
        std::fs::copy(b.data_dir.join(f), keys.join(f)).expect("copy a key");
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    let a = replica(&dir_a, "a", brokers[1], &s3, &url, queue);
    assert!(!leads(&a), "one leader: B");
    assert_eq!(a.get("/v1/ingest")["replica"], "a");

    // Bundles pushed through A (into the bucket); devices enrolled through A (their
    // API is A's, which lives) and seen through B.
    bundle(dir, 1, "v1.fmb");
    bundle(dir, 2, "v2.fmb");
    for f in ["v1.fmb", "v2.fmb"] {
        a.fleetctl(dir, &["models", "push", &dir.join(f).display().to_string()])
            .success();
    }
    let devices = [
        ("pi-a", "raspberry-pi-4"),
        ("x86-b", "generic-x86_64"),
        ("pi-c", "raspberry-pi-4"),
    ];
    let mut agents = Vec::new();
    for (i, (name, board)) in devices.into_iter().enumerate() {
        // Messages a killed replica's session holds come again from the outbox.
        enroll(
            dir,
            &a,
            name,
            board,
            "site=lab",
            // Small windows and an alert on the first drifted one, for the drift step.
            "telemetry_resend_after_s = 5\nwindow_predictions = 200\nalert_windows = 1",
        );
        if i == 2 {
            let config = dir.join(format!("{name}.toml"));
            let text = std::fs::read_to_string(&config).expect("config");
            let on_a = format!("mqtt://127.0.0.1:{}", brokers[1]);
            assert!(text.contains(&on_a), "{text}");
            std::fs::write(&config, text.replace(&on_a, last_device)).expect("config");
        }
        agents.push(run_agent(dir, name, board));
    }
    for (name, _) in devices {
        wait_for(&format!("{name} seen through replica b"), WAIT, || {
            (!b.messages(name).is_empty()).then_some(())
        });
    }
    // A dataset imported through A lands in the bucket; B (its own cache) serves it.
    let dataset = crate::retrain::import_reference(dir, &a);
    let through = |plane: &ControlPlane| {
        let (status, body) = hil_tests::http_with(
            plane.connect(),
            "GET",
            &format!("/v1/datasets/{dataset}/data?format=csv"),
            &[("authorization", &format!("Bearer {}", plane.token))],
            b"",
        )
        .expect("HTTP");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        body
    };
    let cached = |plane: &ControlPlane| {
        plane
            .data_dir
            .join("datasets")
            .join(format!("{dataset}.parquet"))
            .is_file()
    };
    assert!(!cached(&b), "B never saw the file");
    assert_eq!(
        through(&b),
        through(&a),
        "the same rows through both replicas"
    );
    assert!(cached(&b), "B fetched it from the bucket");
    // A device keeps what the broker acknowledged until a receipt names it once it has
    // had its first receipt (every 500 ms here); before that a PUBACK is enough.
    std::thread::sleep(Duration::from_secs(2));

    // A rollout started through the leader, which dies after the first wave.
    let first = rollout(&b, dir, &["claims@1", "--to", "all", "--soak", "0s"]);
    wait_state(&a, &first, "completed");
    let id = rollout(
        &b,
        dir,
        &[
            "claims@2",
            "--to",
            "all",
            "--waves",
            "34,67,100",
            "--soak",
            "3s",
        ],
    );
    wait_for("the first wave of v2", WAIT, || {
        let r: Value = a.get(&format!("/v1/rollouts/{id}"));
        (r["waves"].as_array().is_some_and(|w| !w.is_empty())).then_some(())
    });
    let before: Vec<usize> = devices.iter().map(|(n, _)| stored(&a, n).len()).collect();
    b.kill();
    mid_run();
    let killed_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    wait_for("replica a to take over", WAIT, || leads(&a).then_some(()));
    let done = wait_state(&a, &id, "completed");
    let waves = done["waves"].as_array().expect("waves");
    let reached: u64 = waves
        .iter()
        .map(|w| w["devices"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(reached, 3, "{done:#}");
    assert!(
        waves.last().and_then(|w| w["passed_ms"].as_u64()) > Some(killed_ms),
        "the new leader passed the last wave: {done:#}"
    );
    for (name, _) in devices {
        let deadline = std::time::Instant::now() + WAIT;
        while crate::rollout::running(&a, name) != Some(2) {
            if std::time::Instant::now() > deadline {
                let view = a.get(&format!("/v1/devices/{name}"));
                let messages = a.messages(name);
                let tail = &messages[messages.len().saturating_sub(8)..];
                panic!("{name} never showed v2 through A: {view:#}\nlast messages: {tail:#?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Through the kill, every device's messages are stored once each, without a gap,
    // and more arrive after it (through A alone).
    for ((name, _), n) in devices.iter().zip(&before) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let seqs = stored(&a, name);
            let first = seqs.first().copied().unwrap_or(0);
            let missing: Vec<u64> = (first..seqs.last().copied().unwrap_or(0))
                .filter(|q| seqs.binary_search(q).is_err())
                .collect();
            if missing.is_empty() && seqs.len() > *n {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: missing {missing:?} of {first}..; {} stored, {n} before the kill; {}",
                seqs.len(),
                a.get(&format!("/v1/devices/{name}"))
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let run = a.fleetctl(dir, &["rollback", "claims", "--yes"]);
    assert!(run.success().contains("pi-a"), "{}", run.stdout);
    for (name, _) in devices {
        wait_running(&a, name, 1);
    }

    // Drift after the rollback: drifted traffic on one device, reference traffic on
    // another; the surviving replica's drift view alerts on the first only.
    let (reference, drifted) = (
        crate::monitoring::rows("reference.csv"),
        crate::monitoring::rows("drifted.csv"),
    );
    crate::monitoring::send(&agents[1], &reference[..400]);
    crate::monitoring::send(&agents[0], &drifted[..600]);
    let alerting = |rows: &Value, device: &str| {
        rows.as_array().is_some_and(|r| {
            r.iter()
                .any(|r| r["device"] == device && r["alerting"] == true)
        })
    };
    let seen = |rows: &Value, device: &str| {
        rows.as_array()
            .is_some_and(|r| r.iter().any(|r| r["device"] == device))
    };
    let view = wait_for(
        "pi-a's drift alert and x86-b's windows through replica a",
        WAIT,
        || {
            let rows = a.get("/v1/drift?model=claims");
            (alerting(&rows, "pi-a") && seen(&rows, "x86-b")).then_some(rows)
        },
    );
    assert!(
        !alerting(&view, "x86-b"),
        "reference traffic alerts: {view:#}"
    );

    // Every message each agent sealed, through the kills, is stored exactly once: its
    // outbox empties (a message leaves it only when a receipt names it, and a replica
    // sends receipts only for what is stored), and what is stored is every sequence
    // number from the agent's first (nothing older waits in the outbox), once.
    for ((name, _), agent) in devices.iter().zip(&agents) {
        wait_for(
            &format!("{name}'s outbox to empty on receipts"),
            WAIT,
            || {
                let (_, text) = agent.request("GET", "/metrics", &Value::Null);
                let depth = crate::fleet::metric_sum(
                    text.as_str().unwrap_or_default(),
                    "fleetml_agent_outbox_depth",
                    "",
                );
                (depth == 0.0).then_some(())
            },
        );
        // An agent numbers its messages from a base of its own, without holes.
        let seqs = stored(&a, name);
        let all: Vec<u64> = (seqs[0]..seqs[0] + seqs.len() as u64).collect();
        assert_eq!(seqs, all, "{name}: stored is not every sealed message once");
    }
    for agent in agents {
        kill(agent);
    }
}

/// The ingest queue logs in to a NATS server that requires a password, and the password
/// appears in no log line, even at debug level (async-nats logs the addresses it
/// connects to); a wrong password is reported as refused, without the password either.
#[test]
fn the_ingest_queue_logs_in_to_nats_and_never_logs_the_password() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let nats = NatsCluster::start_configured(
        1,
        "authorization { user: fleet, password: \"s3cret-pw-1\" }\n",
    );
    let node = &nats.nodes()[0];
    let serve = |name: &str, password: &str, wanted: &str| -> String {
        serve_on_nats(
            tmp.path(),
            name,
            &format!("mqtt://fleet:{password}@127.0.0.1:{}", node.mqtt_port),
            &format!("nats://fleet:{password}@127.0.0.1:{}", node.port),
            wanted,
        )
    };
    let good = serve("good", "s3cret-pw-1", "ingest pulling from NATS");
    assert!(!good.contains("s3cret-pw-1"), "the password in the log");
    let bad = serve("bad", "wrong-pw-2", "the NATS ingest queue failed");
    assert!(!bad.contains("wrong-pw-2"), "the password in the log");
    assert!(bad.to_lowercase().contains("authoriz"), "{bad}");
}

/// `fleetctl serve` in `dir` with its MQTT session at `mqtt` and its ingest pulling from
/// the NATS queue at `queue`, logging to NAME.log, until the log says `wanted`: the log
/// then (the server is stopped, a failing wait included).
fn serve_on_nats(dir: &Path, name: &str, mqtt: &str, queue: &str, wanted: &str) -> String {
    struct Serve(std::process::Child);
    impl Drop for Serve {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let log = dir.join(format!("{name}.log"));
    let _serve = Serve(
        std::process::Command::new(hil_tests::bin("fleetctl"))
            .args(["serve", "--insecure-listen", "--data-dir"])
            .arg(dir.join(name))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--mqtt-url")
            .arg(mqtt)
            .env("FLEETML_INGEST_QUEUE", queue)
            .env("RUST_LOG", "debug,sled=info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("fleetctl serve starts"),
    );
    wait_for(&format!("{name}: {wanted}"), WAIT, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains(wanted).then_some(text)
    })
}

/// On a cluster of two nodes the ingest queue's stream is kept on both: JetStream
/// refuses three copies there ("no suitable peers"), and the control plane takes two,
/// saying so, rather than retrying three for ever.
#[test]
fn on_a_two_node_nats_cluster_the_ingest_queue_keeps_two_copies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let nats = NatsCluster::start(2);
    let node = &nats.nodes()[0];
    let log = serve_on_nats(
        tmp.path(),
        "two",
        &format!("mqtt://127.0.0.1:{}", node.mqtt_port),
        &nats.urls(),
        "ingest pulling from NATS",
    );
    assert!(log.contains("too few nodes"), "{log}");
    let jsz = nats.monitor(0, "/jsz?accounts=true&streams=true&config=true");
    let replicas = serde_json::from_str::<Value>(&jsz).ok().and_then(|v| {
        v["account_details"].as_array()?.iter().find_map(|a| {
            a["stream_detail"].as_array()?.iter().find_map(|s| {
                (s["name"] == "FLEETML_INGEST").then(|| s["config"]["num_replicas"].as_u64())?
            })
        })
    });
    assert_eq!(replicas, Some(2), "the stream's replicas: {jsz}");
}
