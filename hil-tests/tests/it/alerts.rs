//! Notifications against real receivers: Debian's Alertmanager (`prometheus-alertmanager`,
//! started here on a private port, routing to a local hook) and a local signed-webhook
//! receiver, with real agents going silent and coming back. And the Grafana dashboard
//! and Prometheus rules in docs/ checked against the series `/metrics` exposes.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetml_testkit::free_port;
use hil_tests::fleet::{ControlPlane, wait_for};
use hil_tests::{keys_and_policy, root};
use serde_json::Value;

use crate::rollout::{enroll, kill, run_agent};

/// One request a [`Hook`] received.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A local HTTP receiver on a fixed port that answers 200 to every request and keeps
/// it; `stop` closes the port (connections refused) until `start` opens it again.
struct Hook {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    running: Option<(
        Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Hook {
    fn new() -> Hook {
        let mut h = Hook {
            port: free_port(),
            got: Default::default(),
            running: None,
        };
        h.start();
        h
    }

    fn start(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("the hook's port");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (got, stop2) = (self.got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let got = got.clone();
                std::thread::spawn(move || serve(stream, got));
            }
        });
        self.running = Some((stop, thread));
    }

    fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
            let _ = thread.join();
        }
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().expect("lock").clone()
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(stream: std::net::TcpStream, got: Arc<Mutex<Vec<Received>>>) {
    let mut reader = std::io::BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_lowercase(), v.trim().to_string());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        got.lock().expect("lock").push(Received {
            path,
            headers,
            body,
        });
        let _ = reader
            .get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
    }
}

/// Debian's Alertmanager on a private port, its data in `dir`, routing every alert to
/// `hook` (grouped by alertname, one second's wait); killed on drop.
struct Alertmanager {
    child: Child,
    port: u16,
}

impl Alertmanager {
    fn start(dir: &Path, hook: u16) -> Alertmanager {
        let port = free_port();
        let config = dir.join("alertmanager.yml");
        std::fs::write(
            &config,
            format!(
                "route:\n  receiver: hook\n  group_by: ['alertname']\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
                 receivers:\n  - name: hook\n    webhook_configs:\n      - url: http://127.0.0.1:{hook}/from-alertmanager\n        send_resolved: true\n"
            ),
        )
        .expect("alertmanager.yml");
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("am-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("alertmanager.log")).expect("log"))
            .spawn()
            .expect("prometheus-alertmanager starts (apt-get install prometheus-alertmanager)");
        let am = Alertmanager { child, port };
        wait_for("Alertmanager to be ready", Duration::from_secs(30), || {
            am.get("/-/ready").ok().filter(|(s, _)| *s == 200)
        });
        am
    }

    fn get(&self, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let stream = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        hil_tests::http_with(stream, "GET", path, &[], &[])
    }

    /// The alerts it holds as active, each as its `device` label.
    fn active_devices(&self) -> Vec<String> {
        let (status, body) = self.get("/api/v2/alerts?active=true").expect("alerts");
        assert_eq!(status, 200);
        let alerts: Value = serde_json::from_slice(&body).expect("JSON");
        let mut devices: Vec<String> = alerts
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["labels"]["alertname"] == "device_silent")
            .filter(|a| a["status"]["state"] == "active")
            .filter_map(|a| a["labels"]["device"].as_str().map(String::from))
            .collect();
        devices.sort();
        devices
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hmac_hex(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

/// Our webhook's notifications: (status of each alert, device) per delivery, checking
/// every signature on the way.
fn webhook_deliveries(hook: &Hook, secret: &[u8]) -> Vec<Vec<(String, String)>> {
    hook.received()
        .iter()
        .filter(|r| r.path == "/fleetml")
        .map(|r| {
            let ts = r.headers.get("x-fleetml-timestamp").expect("timestamp");
            assert_eq!(
                r.headers.get("x-fleetml-signature"),
                Some(&hmac_hex(secret, ts, &r.body)),
                "the webhook is signed with the receiver's secret"
            );
            r.json()["alerts"]
                .as_array()
                .expect("alerts")
                .iter()
                .map(|a| {
                    (
                        a["status"].as_str().unwrap_or("").to_string(),
                        a["labels"]["device"]
                            .as_str()
                            .or(a["labels"]["alertname"].as_str())
                            .unwrap_or("")
                            .to_string(),
                    )
                })
                .collect()
        })
        .collect()
}

fn metrics_text(plane: &ControlPlane) -> String {
    let (status, body) =
        hil_tests::http_with(plane.connect(), "GET", "/metrics", &[], &[]).expect("/metrics");
    assert_eq!(status, 200);
    String::from_utf8(body).expect("text")
}

/// Two real agents go silent together (while a silence holds them back), then
/// notifications reach Alertmanager (which routes them on to its own hook) and a
/// signed webhook as one group; a control-plane restart sends nothing twice; an agent
/// that comes back resolves its alert in both; with the webhook down a new alert is
/// retried until it is up, then delivered once; `alerts test` reaches both; every
/// delivery is in the audit log; the fleet series count the alerts.
#[test]
fn notifications_reach_alertmanager_and_a_signed_webhook_grouped_resolved_retried_and_never_twice()
{
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut hook = Hook::new();
    let am = Alertmanager::start(dir, hook.port);
    let secret = b"5f0c2a7e9d41b3c8a6e0f1d2c3b4a59687f6e5d4c3b2a1f0";
    let secret_path = dir.join("hook.secret");
    std::fs::write(&secret_path, secret).expect("secret");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(
        dir.join("alerts.toml"),
        format!(
            "[settings]\ninterval = \"1s\"\nretry_max = \"2s\"\n\n\
             [[receiver]]\nname = \"am\"\nkind = \"alertmanager\"\nurl = \"http://127.0.0.1:{}\"\n\n\
             [[receiver]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{}/fleetml\"\nsecret_file = \"hook.secret\"\n\n\
             [[rule]]\nname = \"device_silent\"\nwhen = \"device_silent\"\nafter = \"3s\"\ngroup_by = [\"board\"]\n",
            am.port, hook.port
        ),
    )
    .expect("alerts.toml");
    keys_and_policy(dir, "k");
    let mut plane = ControlPlane::start(
        dir,
        None,
        &["--trust", "trust.toml", "--alerts", "alerts.toml"],
    );
    let listed = plane.get("/v1/alerts");
    assert_eq!(
        listed["receivers"].as_array().map(Vec::len),
        Some(2),
        "{listed:#}"
    );

    // Two devices on one board, heartbeats every second.
    let mut agents = BTreeMap::new();
    for name in ["pi-a", "pi-b"] {
        enroll(
            dir,
            &plane,
            name,
            "raspberry-pi-4",
            "site=lab",
            "status_interval_s = 1",
        );
        agents.insert(name, run_agent(dir, name, "raspberry-pi-4"));
    }
    wait_for("both agents online", Duration::from_secs(60), || {
        (plane.online("pi-a") && plane.online("pi-b")).then_some(())
    });
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        plane.get("/v1/alerts")["alerts"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "agents that beat are not silent"
    );

    // Both go silent under a silence: nothing is sent, then both go out as one group.
    let silence = plane.fleetctl(
        dir,
        &[
            "alerts",
            "silence",
            "board=raspberry-pi-4",
            "--for",
            "1h",
            "--comment",
            "test",
        ],
    );
    let id = silence
        .success()
        .split_whitespace()
        .nth(1)
        .expect("silence id")
        .to_string();
    for name in ["pi-a", "pi-b"] {
        kill(agents.remove(name).expect("agent"));
    }
    wait_for("both silent alerts firing", Duration::from_secs(60), || {
        let v = plane.get("/v1/alerts");
        let firing = v["alerts"]
            .as_array()?
            .iter()
            .filter(|a| {
                a["state"] == "firing" && a["silenced_by"].as_array().is_some_and(|s| !s.is_empty())
            })
            .count();
        (firing == 2).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(webhook_deliveries(&hook, secret).is_empty(), "silenced");
    assert!(am.active_devices().is_empty(), "silenced");
    let listed = plane.fleetctl(dir, &["alerts", "list"]);
    assert!(listed.success().contains("firing*"), "{}", listed.stdout);
    plane.fleetctl(dir, &["alerts", "unsilence", &id]).success();
    let first = wait_for("the grouped notification", Duration::from_secs(30), || {
        let d = webhook_deliveries(&hook, secret);
        (!d.is_empty()).then_some(d)
    });
    assert_eq!(
        first,
        vec![vec![
            ("firing".to_string(), "pi-a".to_string()),
            ("firing".to_string(), "pi-b".to_string())
        ]],
        "one notification, both alerts"
    );
    wait_for(
        "both alerts in Alertmanager",
        Duration::from_secs(30),
        || (am.active_devices() == ["pi-a", "pi-b"]).then_some(()),
    );
    // Alertmanager's routing works on them: its own webhook gets the group.
    wait_for(
        "Alertmanager's notification",
        Duration::from_secs(30),
        || {
            hook.received().iter().find_map(|r| {
                (r.path == "/from-alertmanager" && r.json()["alerts"].as_array()?.len() == 2)
                    .then_some(())
            })
        },
    );

    // A restart tells nobody twice.
    plane.restart();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        webhook_deliveries(&hook, secret).len(),
        1,
        "no duplicate after a restart"
    );

    // pi-a comes back: resolved in the webhook and in Alertmanager.
    let a = run_agent(dir, "pi-a", "raspberry-pi-4");
    wait_for("pi-a's alert resolved", Duration::from_secs(60), || {
        let d = webhook_deliveries(&hook, secret);
        (d.len() == 2).then_some(())
    });
    assert_eq!(
        webhook_deliveries(&hook, secret)[1],
        vec![("resolved".to_string(), "pi-a".to_string())]
    );
    wait_for(
        "Alertmanager resolves pi-a",
        Duration::from_secs(30),
        || (am.active_devices() == ["pi-b"]).then_some(()),
    );

    // The webhook is down when pi-a goes silent again: retried until it is back, then
    // delivered once.
    hook.stop();
    kill(a);
    wait_for("a failed delivery", Duration::from_secs(60), || {
        plane.get("/v1/alerts")["alerts"]
            .as_array()?
            .iter()
            .find_map(|a| {
                (a["labels"]["device"] == "pi-a" && a["told"]["hook"]["attempts"].as_u64()? >= 2)
                    .then_some(())
            })
    });
    let audit = plane.fleetctl(dir, &["audit", "--json", "--last", "200"]);
    let entries: Value = serde_json::from_str(audit.success()).expect("audit JSON");
    assert!(
        entries
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["who"] == "alerts"
                && e["action"] == "NOTIFY webhook"
                && e["target"].as_str().is_some_and(|t| t.contains("failed"))),
        "failed deliveries are audited: {entries:#}"
    );
    hook.start();
    wait_for("the retried notification", Duration::from_secs(30), || {
        (webhook_deliveries(&hook, secret).len() == 3).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let all = webhook_deliveries(&hook, secret);
    assert_eq!(all.len(), 3, "delivered once after the retries: {all:?}");
    assert_eq!(all[2], vec![("firing".to_string(), "pi-a".to_string())]);
    wait_for(
        "pi-a in Alertmanager again",
        Duration::from_secs(30),
        || (am.active_devices() == ["pi-a", "pi-b"]).then_some(()),
    );

    // A test notification reaches both receivers.
    let tested = plane.fleetctl(dir, &["alerts", "test"]);
    let out = tested.success();
    assert!(
        out.contains("hook (webhook): delivered") && out.contains("am (alertmanager): delivered"),
        "{out}"
    );
    let last = webhook_deliveries(&hook, secret);
    assert_eq!(last.len(), 4);
    assert_eq!(
        last[3],
        vec![("firing".to_string(), "fleetml_test".to_string())]
    );
    hook.stop();
    let down = plane.fleetctl(dir, &["alerts", "test", "--receiver", "hook"]);
    assert!(!down.ok(), "a failed test exits non-zero");
    assert!(
        down.stdout.contains("hook (webhook): FAILED"),
        "{}",
        down.stdout
    );

    let audit = plane.fleetctl(dir, &["audit", "--json", "--last", "200"]);
    let entries: Value = serde_json::from_str(audit.success()).expect("audit JSON");
    let sent = entries
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["who"] == "alerts" && e["outcome"] == 200)
        .count();
    assert!(sent >= 6, "every delivery is audited ({sent}): {entries:#}");

    // The fleet series count them; the dashboard and the rules name only series that exist.
    let metrics = metrics_text(&plane);
    assert!(
        metrics.contains("fleetml_fleet_alerts{alertname=\"device_silent\",severity=\"warning\",state=\"firing\"} 2")
            || wait_metrics_firing(&plane),
        "{metrics}"
    );
    check_grafana_and_rules(&metrics_text(&plane));
}

/// The fleet series are recomputed every 15 s: waits for the two firing alerts.
fn wait_metrics_firing(plane: &ControlPlane) -> bool {
    wait_for(
        "the fleet series to count the alerts",
        Duration::from_secs(40),
        || {
            metrics_text(plane)
            .contains("fleetml_fleet_alerts{alertname=\"device_silent\",severity=\"warning\",state=\"firing\"} 2")
            .then_some(true)
        },
    )
}

/// Every metric name the Grafana dashboard's queries and the Prometheus rules use is a
/// series `/metrics` exposes (a sample or its `# TYPE` line).
fn check_grafana_and_rules(metrics: &str) {
    let exposed: std::collections::BTreeSet<String> = metrics
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next().map(String::from),
            None if !l.starts_with('#') => l.split(['{', ' ']).next().map(String::from),
            None => None,
        })
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("docs/grafana/fleetml.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 8,
        "the dashboard has its panels' queries: {exprs:?}"
    );
    let rules =
        std::fs::read_to_string(root().join("docs/grafana/fleetml-rules.yml")).expect("rules");
    let rule_exprs: Vec<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().trim_matches('\'').to_string())
        .collect();
    assert!(rule_exprs.len() >= 5, "the rules: {rule_exprs:?}");
    let mut used = std::collections::BTreeSet::new();
    for e in exprs.iter().chain(&rule_exprs) {
        for name in metric_names(e) {
            used.insert(name);
        }
    }
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| {
            let base = n
                .strip_suffix("_bucket")
                .or(n.strip_suffix("_count"))
                .or(n.strip_suffix("_sum"))
                .unwrap_or(n);
            !exposed.contains(n.as_str()) && !exposed.contains(base)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard or the rules use series /metrics does not expose: {missing:?}"
    );
    assert!(used.len() >= 8, "{used:?}");
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// Names in a PromQL expression that are fleetml series.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("fleetml_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}
