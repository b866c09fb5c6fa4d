//! The publisher drains the outbox to a real broker (mosquitto from Debian): in order,
//! removing only what the broker acknowledged, and catching up once a broker that was
//! down comes up, or moving to the next of several brokers when one is down; every
//! grant of the command subscription reported, so the agent pulls what it missed.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_agent::outbox::{Class, Limits, Outbox};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn mosquitto(port: u16) -> Broker {
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("mosquitto is not installed: apt-get install mosquitto (.ci/run does)");
    let child = Command::new(bin)
        .args(["-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Broker(child)
}

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o
}

/// A client subscribed to everything device `pi` publishes.
async fn observer(port: u16) -> (AsyncClient, rumqttc::EventLoop) {
    let (sub, mut events) = AsyncClient::new(options("observer", port), 64);
    sub.subscribe("fleetml/v1/pi/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = events.poll().await {
            break;
        }
    }
    (sub, events)
}

/// An empty outbox in a folder of its own (kept while the folder is).
fn fresh_outbox() -> (tempfile::TempDir, Arc<Outbox>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox =
        Arc::new(Outbox::open(&dir.path().join("outbox"), Limits::default()).expect("opens"));
    (dir, outbox)
}

async fn drained(outbox: &Outbox, within: Duration) {
    let deadline = Instant::now() + within;
    while outbox.depth() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} messages never acknowledged",
            outbox.depth()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn the_outbox_reaches_the_broker_in_order_and_empties_on_acks() {
    let port = free_port();
    let _broker = mosquitto(port);
    let (_dir, outbox) = fresh_outbox();
    for _ in 0..20 {
        outbox
            .push(Class::Window, "fleetml/v1/pi/telemetry", 0, |seq| {
                seq.to_be_bytes().to_vec()
            })
            .expect("push");
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (_sub, mut sub_events) = observer(port).await;
        let wake = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(fleet_agent::publisher::run(
            outbox.clone(),
            options("pi", port),
            wake,
        ));
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < 20 {
            assert!(Instant::now() < deadline, "received only {seen:?}");
            if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                tokio::time::timeout(Duration::from_secs(1), sub_events.poll()).await
            {
                seen.push(u64::from_be_bytes(
                    p.payload[..8].try_into().expect("8 bytes"),
                ));
            }
        }
        assert_eq!(seen, (0..20).collect::<Vec<u64>>(), "in sequence order");
        drained(&outbox, Duration::from_secs(20)).await;
        task.abort();
    });
}

#[test]
fn messages_queued_while_the_broker_is_down_are_delivered_when_it_comes_up() {
    let port = free_port();
    let (_dir, outbox) = fresh_outbox();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let wake = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(fleet_agent::publisher::run(
            outbox.clone(),
            options("pi", port),
            wake.clone(),
        ));
        for _ in 0..5 {
            outbox
                .push(Class::Keep, "fleetml/v1/pi/events", 0, |seq| {
                    seq.to_be_bytes().to_vec()
                })
                .expect("push");
            wake.notify_one();
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            outbox.depth(),
            5,
            "nothing is lost while no broker is there"
        );
        let _broker = mosquitto(port);
        drained(&outbox, Duration::from_secs(60)).await;
        task.abort();
    });
}

/// Commands are subscribed with QoS 0, so no broker keeps them for a device that is not
/// subscribed: the publisher tells the agent once per connect, when the broker grants
/// the command subscription (it pulls its assignment then) — the first connect too, and
/// after each restart of a broker that forgot the session.
#[test]
fn every_grant_of_the_command_subscription_is_reported_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let port = free_port();
    let (_dir, outbox) = fresh_outbox();
    let (connects, granted) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut broker = Some(mosquitto(port));
        let mut device = options("pi", port);
        device.set_clean_session(false);
        let (c, g) = (connects.clone(), granted.clone());
        let task = tokio::spawn(fleet_agent::publisher::run_with(
            outbox.clone(),
            device,
            Arc::new(tokio::sync::Notify::new()),
            fleet_agent::publisher::Hooks {
                subscribe: Some("fleetml/v1/pi/cmd".into()),
                on_connect: Some(Box::new(move || {
                    c.fetch_add(1, Ordering::SeqCst);
                })),
                on_subscribed: Some(Box::new(move || {
                    g.fetch_add(1, Ordering::SeqCst);
                })),
                ..Default::default()
            },
        ));
        let reached = |count: Arc<AtomicUsize>, n: usize, what: &'static str| async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while count.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "{what} {n} never came");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        reached(granted.clone(), 1, "the first grant's report").await;
        assert_eq!(connects.load(Ordering::SeqCst), 1, "the first connect");
        // The broker restarts and forgets the session; the device reconnects and
        // subscribes again.
        for n in 2..=3 {
            drop(broker.take());
            broker = Some(mosquitto(port));
            reached(granted.clone(), n, "a reconnect's report").await;
            assert_eq!(connects.load(Ordering::SeqCst), n, "once per connect");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(granted.load(Ordering::SeqCst), 3, "after two restarts");
        task.abort();
    });
}

#[test]
fn with_receipts_what_the_broker_acknowledged_is_published_again_until_confirmed() {
    use fleetml_protocol::telemetry::Receipt;
    let port = free_port();
    let _broker = mosquitto(port);
    let (_dir, outbox) = fresh_outbox();
    // The control plane has sent a receipt before (for nothing here).
    outbox
        .receipt(&Receipt { stored: vec![] })
        .expect("receipt");
    for _ in 0..5 {
        outbox
            .push(Class::Window, "fleetml/v1/pi/telemetry", 0, |seq| {
                seq.to_be_bytes().to_vec()
            })
            .expect("push");
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (_sub, mut sub_events) = observer(port).await;
        let wake = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(fleet_agent::publisher::run_with(
            outbox.clone(),
            options("pi", port),
            wake,
            fleet_agent::publisher::Hooks {
                resend_after: Some(Duration::from_millis(600)),
                ..Default::default()
            },
        ));
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        // Every message twice at least: once, then again as nobody confirmed it.
        while (0..5u64).any(|s| seen.iter().filter(|&&x| x == s).count() < 2) {
            assert!(Instant::now() < deadline, "received only {seen:?}");
            if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                tokio::time::timeout(Duration::from_secs(1), sub_events.poll()).await
            {
                seen.push(u64::from_be_bytes(
                    p.payload[..8].try_into().expect("8 bytes"),
                ));
            }
        }
        assert_eq!(outbox.depth(), 5, "the broker's PUBACK deleted nothing");
        outbox
            .receipt(&Receipt {
                stored: vec![[0, 4]],
            })
            .expect("receipt");
        assert_eq!(outbox.depth(), 0);
        // Confirmed: nothing comes again.
        let quiet_from = Instant::now() + Duration::from_millis(300);
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                tokio::time::timeout(Duration::from_millis(200), sub_events.poll()).await
            {
                assert!(
                    Instant::now() < quiet_from,
                    "published again after its receipt: {:?}",
                    &p.payload[..8]
                );
            }
        }
        task.abort();
    });
}

#[test]
fn with_several_brokers_a_dead_one_is_passed_over_for_the_next() {
    let (dead, live) = (free_port(), free_port());
    let (_dir, outbox) = fresh_outbox();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let wake = Arc::new(tokio::sync::Notify::new());
        // The first broker of the list never answers; the second takes everything.
        let first = mosquitto(live);
        let task = tokio::spawn(fleet_agent::publisher::run_with(
            outbox.clone(),
            options("pi", dead),
            wake.clone(),
            fleet_agent::publisher::Hooks {
                more_brokers: vec![options("pi", live)],
                ..Default::default()
            },
        ));
        let push = |n: usize| {
            for _ in 0..n {
                outbox
                    .push(Class::Keep, "fleetml/v1/pi/events", 0, |seq| {
                        seq.to_be_bytes().to_vec()
                    })
                    .expect("push");
                wake.notify_one();
            }
        };
        push(5);
        drained(&outbox, Duration::from_secs(30)).await;
        // That one dies and the first comes up: the publisher goes round to it.
        drop(first);
        let _back = mosquitto(dead);
        push(5);
        drained(&outbox, Duration::from_secs(60)).await;
        task.abort();
    });
}

/// A broker that refuses the command subscription — nats-server answers SUBACK 0x80
/// when the user may not subscribe, as it does when it cannot create the session's
/// JetStream consumer in time — is asked again, with back-off, and the commands come
/// once it allows the subscription. (mosquitto's ACL file never refuses a
/// subscription: it filters what is delivered.)
#[test]
fn a_refused_command_subscription_is_tried_again_until_the_broker_allows_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (port, nats_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("nats.conf");
    let write_conf = |allowed: bool| {
        let pi = if allowed {
            "{ user: pi, password: any }".to_string()
        } else {
            "{ user: pi, password: any, permissions: { subscribe: { deny: [\"fleetml.v1.pi.cmd\"] } } }"
                .to_string()
        };
        std::fs::write(
            &conf,
            format!(
                "server_name: t\nlisten: 127.0.0.1:{nats_port}\njetstream {{ store_dir: \"{}\" }}\n\
                 mqtt {{ listen: 127.0.0.1:{port} }}\n\
                 authorization {{ users: [ {pi}, {{ user: operator, password: any }} ] }}\n",
                dir.path().join("js").display()
            ),
        )
        .expect("nats.conf");
    };
    write_conf(false);
    let broker = Broker(
        Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is not installed: apt-get install nats-server (.ci/run does)"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nats-server did not listen for MQTT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let outbox =
        Arc::new(Outbox::open(&dir.path().join("outbox"), Limits::default()).expect("opens"));
    let received = Arc::new(AtomicUsize::new(0));
    let late = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut device = options("pi", port);
        device.set_credentials("pi", "any");
        let (counted, granted) = (received.clone(), late.clone());
        let task = tokio::spawn(fleet_agent::publisher::run_with(
            outbox.clone(),
            device,
            Arc::new(tokio::sync::Notify::new()),
            fleet_agent::publisher::Hooks {
                subscribe: Some("fleetml/v1/pi/cmd".into()),
                on_message: Some(Box::new(move |_, _| {
                    counted.fetch_add(1, Ordering::Relaxed);
                })),
                on_subscribed: Some(Box::new(move || {
                    granted.fetch_add(1, Ordering::Relaxed);
                })),
                ..Default::default()
            },
        ));
        let mut operator = options("operator", port);
        operator.set_credentials("operator", "any");
        let (commands, mut events) = AsyncClient::new(operator, 16);
        tokio::spawn(async move {
            loop {
                if events.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let send = || async {
            commands
                .publish("fleetml/v1/pi/cmd", QoS::AtLeastOnce, false, b"x".to_vec())
                .await
                .expect("publish");
        };
        // Refused: commands sent now do not reach the device.
        for _ in 0..6 {
            send().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(
            received.load(Ordering::Relaxed),
            0,
            "the broker refused the subscription"
        );
        assert_eq!(late.load(Ordering::Relaxed), 0);
        // Allowed now (nats-server reads its configuration again on SIGHUP): the next
        // try subscribes.
        write_conf(true);
        let hup = Command::new("kill")
            .args(["-HUP", &broker.0.id().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(hup.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        while received.load(Ordering::Relaxed) == 0 {
            assert!(
                Instant::now() < deadline,
                "no command 60 s after the broker allowed the subscription: it was not tried again"
            );
            send().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Told, so the agent pulls what it missed.
        assert_eq!(late.load(Ordering::Relaxed), 1);
        task.abort();
    });
}
