//! Load benchmark of fleet messaging (docs/BENCHMARKS.md): how many messages per second
//! the control plane's ingest stores (authenticated, de-duplicated, flushed) from N
//! simulated devices, through the embedded broker or mosquitto; and what one message
//! costs the agent's outbox (sealed, written, flushed).
//!
//! Usage: ingest-load [--devices N] [--messages M] [--broker embedded|mosquitto] [--tls]
//!                    [--inflight N]
//!        ingest-load --outbox [--messages M]
//!        ingest-load --api N [--tls]
//!
//! Each device is a real MQTT client logging in as an enrolled device and publishing M
//! sealed window reports (15 features, like the claims model's) with QoS 1. The clock
//! runs from the first publish until the ingest's `stored` counter reaches N·M. With
//! `--tls` the control plane runs `--self-signed` and the devices connect to the
//! embedded broker over TLS; without, it runs `--insecure-listen` (both pass the same
//! ACL relay). `--inflight N` sets mosquitto's `max_inflight_messages` (how many
//! messages it sends the ingest unacknowledged; mosquitto's own default, 20, without).
//!
//! `--api N`: N calls of `GET /v1/ingest`, each on a new connection as fleetctl and the
//! agents make them (over TLS: a full handshake each); p50 and p95 of each call.

use std::time::{Duration, Instant};

use fleetml_protocol::telemetry::{self, Body, DeviceId, FeatureDrift, Quantiles, WindowReport};
use hil_tests::fleet::{ControlPlane, Mosquitto, free_port, wait_for};

fn window(model: &str, n: u64) -> Body {
    let feature = |i: usize| FeatureDrift {
        name: format!("feature_{i}"),
        values: 1000,
        missing_rate: 0.01,
        out_of_range_rate: 0.0,
        unseen_rate: 0.0,
        psi: 0.05,
        ks: Some(0.03),
        js: 0.02,
        chi2_p: None,
        wasserstein: Some(0.04),
        moved: Vec::new(),
        usefulness: None,
        drifting: false,
    };
    Body::Window(Box::new(WindowReport {
        shadow: None,
        model: model.into(),
        version: 3,
        window: n,
        start_ms: 1_795_000_000_000,
        end_ms: 1_795_000_060_000,
        predictions: 1000,
        throughput_per_s: 16.6,
        missed: Default::default(),
        missing_prediction_rate: 0.0,
        missing_ids: vec![],
        latency_us: Quantiles::default(),
        lag_ms: Quantiles::default(),
        batch_rows: Quantiles::default(),
        outages: vec![],
        outages_not_listed: 0,
        features: (0..15).map(feature).collect(),
        prediction: Some(feature(99)),
        events: vec![],
        alerts: vec![],
        labels: 0,
        live_accuracy: None,
        live_mae: None,
        multivariate: None,
        estimated_accuracy: None,
    }))
}

/// Sealed messages of one device: (topic, bytes).
type Messages = Vec<(String, Vec<u8>)>;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn outbox_cost(messages: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = fleet_agent::outbox::Outbox::open(dir.path(), Default::default()).expect("outbox");
    let device = DeviceId::new("bench").expect("id");
    let secret = [7u8; 32];
    let topic = telemetry::topic(&device, telemetry::Channel::Telemetry);
    let start = Instant::now();
    for n in 0..messages {
        outbox
            .push(fleet_agent::outbox::Class::Window, &topic, 0, |seq| {
                telemetry::seal(&device, seq, 0, window("claims", n), &secret).1
            })
            .expect("push");
    }
    let per = start.elapsed() / messages as u32;
    let sealed = telemetry::seal(&device, 0, 0, window("claims", 0), &secret).1;
    // The floor on this disk: append the same bytes to a plain file and fdatasync each.
    let floor = {
        use std::io::Write;
        let mut f = std::fs::File::create(dir.path().join("floor")).expect("file");
        let start = Instant::now();
        for _ in 0..messages {
            f.write_all(&sealed).expect("write");
            f.sync_data().expect("sync");
        }
        start.elapsed() / messages as u32
    };
    println!(
        "{{\"bench\": \"outbox_push\", \"messages\": {messages}, \"bytes_per_message\": {}, \"us_per_message\": {:.1}, \"file_append_fdatasync_us\": {:.1}}}",
        sealed.len(),
        per.as_secs_f64() * 1e6,
        floor.as_secs_f64() * 1e6
    );
}

fn main() {
    let messages: u64 = arg("--messages")
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    if std::env::args().any(|a| a == "--outbox") {
        outbox_cost(messages);
        return;
    }
    let tls = std::env::args().any(|a| a == "--tls");
    if let Some(n) = arg("--api").and_then(|v| v.parse().ok()) {
        api_latency(n, tls);
        return;
    }
    let devices: usize = arg("--devices").and_then(|v| v.parse().ok()).unwrap_or(20);
    let broker_kind = arg("--broker").unwrap_or_else(|| "embedded".into());
    let dir = tempfile::tempdir().expect("tempdir");
    let inflight: Option<u32> =
        arg("--inflight").map(|v| v.parse().expect("--inflight: give a number of messages"));
    assert!(
        inflight.is_none() || broker_kind == "mosquitto",
        "--inflight sets mosquitto's window: give --broker mosquitto (the embedded broker's is 100)"
    );
    let conf = inflight.map_or(String::new(), |n| format!("max_inflight_messages {n}\n"));
    let mosquitto = (broker_kind == "mosquitto")
        .then(|| Mosquitto::start_configured(dir.path(), free_port(), &conf));
    eprintln!("starting the control plane");
    // One admin token enrolls every device as fast as it can: the ingest is measured,
    // not the abuse limits.
    let mut args = vec!["--rate-limit-token", "0", "--rate-limit-address", "0"];
    if !tls {
        args.push("--insecure-listen");
    }
    let plane = ControlPlane::start(dir.path(), mosquitto.as_ref().map(|m| m.port), &args);
    eprintln!("enrolling {devices} devices");
    let port = if tls && mosquitto.is_none() {
        plane.mqtts_port
    } else {
        plane.mqtt_port.or(mosquitto.as_ref().map(|m| m.port))
    }
    .expect("a broker");
    let roots = (tls && mosquitto.is_none())
        .then(|| hil_tests::fleet::roots(plane.ca.as_deref().expect("the private CA")));
    let mut creds = Vec::new();
    for i in 0..devices {
        let id = format!("load-{i:04}");
        let r = plane.post("/v1/devices", &serde_json::json!({ "id": id }));
        let secret = hex::decode(r["device_secret"].as_str().expect("secret")).expect("hex");
        creds.push((DeviceId::new(&id).expect("id"), secret));
    }
    // Seal everything first: the clock measures the messaging, not the sealing.
    let sealed: Vec<(DeviceId, Vec<u8>, Messages)> = creds
        .into_iter()
        .map(|(id, secret)| {
            let msgs = (0..messages)
                .map(|n| telemetry::seal(&id, n, 0, window("claims", n), &secret))
                .collect();
            (id, secret, msgs)
        })
        .collect();
    let bytes = sealed[0].2[0].1.len();
    eprintln!("publishing");
    let start = Instant::now();
    let broker_acks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let threads: Vec<_> = sealed
        .into_iter()
        .map(|(id, secret, msgs)| {
            let broker_acks = broker_acks.clone();
            let roots = roots.clone();
            std::thread::spawn(move || {
                let mut o = rumqttc::MqttOptions::new(id.as_str(), "127.0.0.1", port);
                o.set_credentials(id.as_str(), telemetry::mqtt_password(&secret));
                if let Some(roots) = roots {
                    o.set_transport(rumqttc::Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(roots),
                    ));
                }
                o.set_max_packet_size(1 << 20, 1 << 20);
                o.set_keep_alive(Duration::from_secs(30));
                let (client, mut conn) = rumqttc::Client::new(o, 64);
                let total = msgs.len();
                std::thread::spawn(move || {
                    for (topic, payload) in msgs {
                        if client
                            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
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
                            broker_acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if acked == total {
                                break;
                            }
                        }
                        Ok(_) => {}
                        // Refused until the ingest subscribed, or a hiccup: retry.
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
        })
        .collect();
    let total = devices as u64 * messages;
    let mut last = (Instant::now(), 0);
    wait_for("every message stored", Duration::from_secs(600), || {
        let counters = plane.get("/v1/ingest");
        let stored = counters["stored"].as_u64().unwrap_or(0);
        if stored != last.1 {
            last = (Instant::now(), stored);
        } else if last.0.elapsed() > Duration::from_secs(30) {
            panic!(
                "no progress for 30 s at {stored} of {total} stored ({} acknowledged to the devices by the broker): {counters}",
                broker_acks.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        (stored == total).then_some(())
    });
    let elapsed = start.elapsed();
    for t in threads {
        let _ = t.join();
    }
    println!(
        "{{\"bench\": \"ingest\", \"broker\": \"{broker_kind}\", \"tls\": {}, \"inflight\": {}, \"devices\": {devices}, \"messages\": {total}, \"bytes_per_message\": {bytes}, \"seconds\": {:.2}, \"stored_per_s\": {:.0}}}",
        roots.is_some(),
        inflight.map_or("null".to_string(), |n| n.to_string()),
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
}

/// `n` sequential `GET /v1/ingest` calls, a new connection each; prints p50 and p95.
fn api_latency(n: usize, tls: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain: &[&str] = if tls { &[] } else { &["--insecure-listen"] };
    let plane = ControlPlane::start(dir.path(), None, plain);
    let auth = format!("Bearer {}", plane.token);
    let call = || {
        let (status, _) = hil_tests::http_with(
            plane.connect(),
            "GET",
            "/v1/ingest",
            &[("authorization", &auth)],
            b"",
        )
        .expect("HTTP");
        assert_eq!(status, 200);
    };
    for _ in 0..20 {
        call();
    }
    let mut micros: Vec<u128> = (0..n)
        .map(|_| {
            let start = Instant::now();
            call();
            start.elapsed().as_micros()
        })
        .collect();
    micros.sort_unstable();
    let at = |q: f64| micros[((micros.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{{\"bench\": \"api\", \"tls\": {tls}, \"calls\": {n}, \"p50_us\": {}, \"p95_us\": {}}}",
        at(0.5),
        at(0.95)
    );
}
