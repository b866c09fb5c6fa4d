//! TLS on every link (security review finding 9: bearer tokens, the enrolment reply with
//! the device secret, device tokens and MQTT passwords crossed the network in clear).
//! Before this change `fleetctl serve` spoke plain HTTP and MQTT only — every server in
//! these tests would have answered the plain requests below, and neither fleetctl nor the
//! agent checked any certificate. The rest of the system tests run over TLS too: the
//! harness starts `fleetctl serve --self-signed` unless a test asks for
//! `--insecure-listen`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hil_tests::fleet::{ControlPlane, Mosquitto, free_port, wait_for};
use hil_tests::{Run, bin, fleetctl};

use crate::rollout::enroll;

/// Runs `cmd` and expects it to exit within `within`: its exit code and stderr.
pub(crate) fn exits_within(mut cmd: Command, within: Duration) -> (Option<i32>, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut err)
                .expect("stderr");
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} still runs after {within:?}: it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `fleetctl ARGS` against `plane` with FLEETML_CA = `ca` (none: unset).
fn fleetctl_with_ca(plane: &ControlPlane, dir: &Path, ca: Option<&Path>, args: &[&str]) -> Run {
    let mut cmd = plane.command(&bin("fleetctl"));
    cmd.current_dir(dir).args(args).env_remove("FLEETML_CA");
    if let Some(ca) = ca {
        cmd.env("FLEETML_CA", ca);
    }
    let out = cmd.output().expect("fleetctl runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The value of `name` on the control plane's /metrics (0 when absent).
fn metric(plane: &ControlPlane, name: &str) -> f64 {
    let (_, body) =
        hil_tests::http_with(plane.connect(), "GET", "/metrics", &[], b"").expect("metrics");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Plain text is refused wherever TLS is required: `fleetctl serve` does not start
/// plain without `--insecure-listen`, nor with a plain broker listener beyond loopback;
/// plain HTTP and plain MQTT to its TLS ports get no answer (and are counted); an agent
/// refuses a plain control plane or broker on another machine unless
/// `allow_insecure_transport` says so.
#[test]
fn plain_text_is_refused_where_tls_is_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut serve = Command::new(bin("fleetctl"));
    serve
        .current_dir(dir.path())
        .args(["serve", "--data-dir", "p0", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()));
    let (code, err) = exits_within(serve, Duration::from_secs(20));
    assert_ne!(code, Some(0));
    assert!(
        err.contains("--self-signed") && err.contains("--insecure-listen"),
        "{err}"
    );
    let mut serve = Command::new(bin("fleetctl"));
    serve
        .current_dir(dir.path())
        .args(["serve", "--self-signed", "--data-dir", "p1", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--mqtt-listen")
        .arg(format!("0.0.0.0:{}", free_port()));
    let (code, err) = exits_within(serve, Duration::from_secs(20));
    assert_ne!(code, Some(0));
    assert!(err.contains("--mqtts-listen"), "{err}");

    let plane = ControlPlane::start(dir.path(), None, &[]);
    assert!(plane.url.starts_with("https://"), "{}", plane.url);
    let before = metric(&plane, "fleetml_control_http_tls_handshakes_failed_total");
    let plain = std::net::TcpStream::connect(plane.addr()).expect("connects");
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let answer = hil_tests::http_with(plain, "GET", "/healthz", &[], b"");
    assert!(
        answer.is_err(),
        "plain HTTP got an HTTP answer from the TLS port: {answer:?}"
    );
    wait_for(
        "the refused handshake to be counted",
        Duration::from_secs(15),
        || {
            (metric(&plane, "fleetml_control_http_tls_handshakes_failed_total") > before)
                .then_some(())
        },
    );

    // A plain MQTT CONNECT to the TLS listener gets no CONNACK.
    let port = plane.mqtts_port.expect("an MQTTS listener");
    let mut mqtt = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connects");
    mqtt.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    use std::io::{Read, Write};
    let connect = [
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 1, b'x',
    ];
    mqtt.write_all(&connect).expect("writes");
    let mut first = [0u8; 1];
    let n = mqtt.read(&mut first).unwrap_or(0);
    assert!(
        n == 0 || first[0] != 0x20,
        "a plain MQTT client got a CONNACK from the TLS listener"
    );
    wait_for(
        "the MQTT handshake failure to be counted",
        Duration::from_secs(15),
        || (metric(&plane, "fleetml_control_mqtt_tls_handshakes_failed_total") > 0.0).then_some(()),
    );

    // An agent refuses plain links to another machine (192.0.2.1: TEST-NET-1, never
    // reached — the refusal comes first).
    let config = dir.path().join("plain.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"pi-plain\"\ndevice_secret = \"{}\"\ncontrol_plane = \"http://192.0.2.1:7080\"\nmqtt_url = \"mqtt://192.0.2.1:1883\"\n",
            "ab".repeat(32)
        ),
    )
    .expect("config");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    hil_tests::keys_and_policy(dir.path(), "k");
    let mut agent = Command::new(bin("fleet-agent"));
    agent.current_dir(dir.path()).args([
        "run",
        "--config",
        "plain.toml",
        "--trust",
        "trust.toml",
        "--data-dir",
        "data-plain",
        "--listen",
        "127.0.0.1:0",
    ]);
    let (code, err) = exits_within(agent, Duration::from_secs(30));
    assert_ne!(code, Some(0));
    assert!(err.contains("allow_insecure_transport"), "{err}");
}

/// A client never trusts a server it cannot verify: fleetctl with another CA (or none:
/// the system store, which does not hold the private CA) is refused naming the issuer;
/// an agent pinned to another CA never reaches the control plane or the broker, and
/// reaches both once it has the right one.
#[test]
fn a_server_signed_by_another_ca_is_refused_by_fleetctl_and_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let plane = ControlPlane::start(d, None, &[]);
    fleetctl(d, &["tls", "ca", "--dir", "other"]).success();
    let other = d.join("other/ca.pem");

    let wrong = fleetctl_with_ca(&plane, d, Some(&other), &["devices", "list"]);
    assert_ne!(wrong.code, Some(0));
    assert!(wrong.stderr.contains("UnknownIssuer"), "{}", wrong.stderr);
    let none = fleetctl_with_ca(&plane, d, None, &["devices", "list"]);
    assert_ne!(none.code, Some(0));
    assert!(none.stderr.contains("--ca"), "{}", none.stderr);
    let right = fleetctl_with_ca(&plane, d, plane.ca.as_deref(), &["devices", "list"]);
    assert_eq!(right.code, Some(0), "{}", right.stderr);

    hil_tests::keys_and_policy(d, "k");
    enroll(
        d,
        &plane,
        "pi-w",
        "raspberry-pi-4",
        "site=lab",
        "trust = \"trust.toml\"",
    );
    let config = d.join("pi-w.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let pinned = text
        .split("tls_ca = \"\"\"")
        .nth(1)
        .and_then(|t| t.split("\"\"\"").next())
        .expect("enroll pinned a CA")
        .to_string();
    let foreign = std::fs::read_to_string(&other).expect("other CA");
    std::fs::write(&config, text.replace(&pinned, &format!("\n{foreign}"))).expect("config");

    let log = d.join("pi-w.log");
    let cmd = crate::rollout::agent_command(d, "pi-w", "raspberry-pi-4");
    let agent = hil_tests::RunningAgent::spawn_logged(
        cmd,
        Stdio::from(std::fs::File::create(&log).expect("log")),
    );
    wait_for(
        "the agent to report the unknown issuer",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains("UnknownIssuer").then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !plane.online("pi-w"),
        "the agent reached a broker it could not verify"
    );
    drop(agent);

    std::fs::write(&config, text).expect("the pinned CA back");
    let cmd = crate::rollout::agent_command(d, "pi-w", "raspberry-pi-4");
    let _agent = hil_tests::RunningAgent::spawn(cmd);
    wait_online(&plane, "pi-w", "the device online over MQTTS");
}

/// An expired certificate, or one for another name, is refused even when it chains to
/// the trusted CA; a valid one from the same CA (`fleetctl serve --tls-cert`) serves.
#[test]
fn expired_and_misnamed_certificates_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    fleetctl(d, &["tls", "ca", "--dir", "ca"]).success();
    let issue = |out: &str, names: &str, extra: &[&str]| {
        let mut args = vec![
            "tls", "issue", "--ca-dir", "ca", "--name", names, "--out", out,
        ];
        args.extend_from_slice(extra);
        fleetctl(d, &args).success();
    };
    issue(
        "expired",
        "127.0.0.1,localhost",
        &["--not-before", "2020-01-01T00:00:00Z", "--days", "30"],
    );
    issue("misnamed", "elsewhere.example", &[]);
    issue("good", "127.0.0.1,localhost", &[]);
    let ca = d.join("ca/ca.pem");

    for (name, expected) in [
        ("expired", "certificate expired"),
        ("misnamed", "not valid for name"),
    ] {
        let port = free_port();
        let mut serve = Command::new(bin("fleetctl"));
        serve
            .current_dir(d)
            .args(["serve", "--data-dir", &format!("plane-{name}")])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--mqtts-listen", &format!("127.0.0.1:{}", free_port())])
            .args([
                "--tls-cert",
                &format!("{name}.pem"),
                "--tls-key",
                &format!("{name}.key"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = serve.spawn().expect("serve starts");
        let mut first = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut first)
            .expect("serve announces");
        assert!(first.contains("https://"), "{first}");
        let out = Command::new(bin("fleetctl"))
            .current_dir(d)
            .args(["devices", "list"])
            .env("FLEETML_SERVER", format!("https://127.0.0.1:{port}"))
            .env("FLEETML_CA", &ca)
            .env("FLEETML_TOKEN", "irrelevant")
            .output()
            .expect("fleetctl runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(expected), "{name}: {err}");
        hil_tests::fleet::terminate(&mut child);
    }

    let plane = ControlPlane::start(
        d,
        None,
        &[
            "--tls-cert",
            "good.pem",
            "--tls-key",
            "good.key",
            "--tls-ca",
            "ca/ca.pem",
        ],
    );
    plane.fleetctl(d, &["devices", "list"]).success();
}

/// An external broker over TLS (mosquitto with a certificate from `fleetctl tls`): the
/// ingest connects with `--mqtt-ca`, and enrolled devices are given both CAs — the
/// control plane's and the broker's — and report over `mqtts://`.
#[test]
fn an_external_broker_over_tls_carries_the_fleet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    fleetctl(d, &["tls", "ca", "--dir", "broker-ca"]).success();
    fleetctl(
        d,
        &[
            "tls",
            "issue",
            "--ca-dir",
            "broker-ca",
            "--name",
            "127.0.0.1",
            "--out",
            "broker",
        ],
    )
    .success();
    let port = free_port();
    let _mosquitto = Mosquitto::start_tls(d, port, &d.join("broker.pem"), &d.join("broker.key"));
    let url = format!("mqtts://127.0.0.1:{port}");
    let plane = ControlPlane::start(
        d,
        None,
        &["--mqtt-url", &url, "--mqtt-ca", "broker-ca/ca.pem"],
    );
    hil_tests::keys_and_policy(d, "k");
    enroll(
        d,
        &plane,
        "pi-x",
        "raspberry-pi-4",
        "site=lab",
        "trust = \"trust.toml\"",
    );
    let text = std::fs::read_to_string(d.join("pi-x.toml")).expect("config");
    assert!(text.contains(&format!("mqtt_url = \"{url}\"")), "{text}");
    assert_eq!(
        text.matches("BEGIN CERTIFICATE").count(),
        2,
        "the control plane's CA and the broker's: {text}"
    );
    let _agent =
        hil_tests::RunningAgent::spawn(crate::rollout::agent_command(d, "pi-x", "raspberry-pi-4"));
    wait_online(
        &plane,
        "pi-x",
        "the device online through mosquitto over TLS",
    );
}

/// Waits until `plane` lists device `id` online (`what` names the wait).
fn wait_online(plane: &ControlPlane, id: &str, what: &str) {
    wait_for(what, Duration::from_secs(60), || {
        plane.online(id).then_some(())
    });
}

/// Two CAs in `dir` (`pg-ca`, `other-ca`), a server certificate for 127.0.0.1 from
/// `pg-ca` (`pg.pem`, `pg.key`), and a PostgreSQL that presents it and takes only TLS.
fn postgres_with_tls(dir: &Path) -> hil_tests::fleet::Postgres {
    for args in [
        &["tls", "ca", "--dir", "pg-ca"][..],
        &["tls", "ca", "--dir", "other-ca"],
        &[
            "tls",
            "issue",
            "--ca-dir",
            "pg-ca",
            "--name",
            "127.0.0.1",
            "--out",
            "pg",
        ],
    ] {
        fleetctl(dir, args).success();
    }
    hil_tests::fleet::Postgres::start_tls(&dir.join("pg.pem"), &dir.join("pg.key"))
}

/// `fleetctl data import --postgres` speaks TLS when the URL asks (`sslmode=require`),
/// checking the server's certificate against `--postgres-ca`. Before: the client was
/// built without TLS, so a server that takes only TLS could not be imported from at all
/// (the first import below failed with the server's "no pg_hba.conf entry … no
/// encryption", as the plain one at the end still does).
#[test]
fn postgresql_import_uses_tls_when_the_url_asks_and_checks_the_server() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let plane = ControlPlane::start(dir, None, &[]);
    let pg = postgres_with_tls(dir);
    pg.sql("CREATE TABLE t (x float8, y text); INSERT INTO t VALUES (1.5, 'a'), (2.5, 'b');");
    let import = |url: &str, ca: &str| {
        plane.fleetctl(
            dir,
            &[
                "data",
                "import",
                "--postgres",
                url,
                "--postgres-ca",
                &dir.join(ca).join("ca.pem").display().to_string(),
                "--query",
                "SELECT x, y FROM t ORDER BY x",
            ],
        )
    };
    let tls_url = format!("{}?sslmode=require", pg.url());
    let ok = import(&tls_url, "pg-ca");
    assert!(
        ok.success().contains("2 rows"),
        "{}{}",
        ok.stdout,
        ok.stderr
    );
    let other = import(&tls_url, "other-ca");
    assert!(
        other.failure().contains("over TLS"),
        "another CA's server was accepted: {}",
        other.stdout
    );
    let plain = import(&pg.url(), "pg-ca");
    assert!(
        !plain.ok(),
        "the server took a plain connection: {}",
        plain.stdout
    );
}

/// `fleetctl serve --database` over TLS: with `sslmode=require` the control plane keeps
/// its records in a PostgreSQL that takes only TLS connections, checking the server's
/// certificate against PGSSLROOTCERT; a server certified by another CA is refused at
/// start. The URL's password appears in no log line, even at debug level, and not in
/// the refusal.
#[test]
fn serve_keeps_its_records_in_postgresql_over_tls_and_never_logs_the_password() {
    const PASSWORD: &str = "pg-s3cret-7f3a";
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let pg = postgres_with_tls(dir);
    let url = format!(
        "{}?sslmode=require",
        pg.create_database("fleet")
            .replace("postgres@", &format!("postgres:{PASSWORD}@"))
    );
    let serve = |ca: &str, log: &Path| {
        let mut cmd = Command::new(bin("fleetctl"));
        cmd.current_dir(dir)
            .args(["serve", "--data-dir", "plane", "--insecure-listen"])
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port())])
            .env("FLEETML_DATABASE_URL", &url)
            .env("PGSSLROOTCERT", dir.join(ca).join("ca.pem"))
            .env("RUST_LOG", "debug")
            .stderr(std::fs::File::create(log).expect("log file"));
        cmd
    };

    // Another CA's server: refused at start, the password in neither output.
    // (exits_within reads its stderr.)
    let (code, refused) = exits_within(
        serve("other-ca", &dir.join("refused.log")),
        Duration::from_secs(60),
    );
    assert_ne!(code, Some(0), "{refused}");
    assert!(refused.contains("TLS"), "{refused}");
    assert!(
        !refused.contains(PASSWORD),
        "the password leaked: {refused}"
    );

    // The right CA: it serves, and what it stores is in PostgreSQL.
    let mut child = serve("pg-ca", &dir.join("serve.log"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("serve prints its address");
    let addr = line
        .trim()
        .strip_prefix("control plane listening on http://")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    let token = std::fs::read_to_string(dir.join("plane/admin.token")).expect("token");
    let call = |method: &str, path: &str, body: &[u8]| {
        let stream = std::net::TcpStream::connect(&addr).expect("connects");
        hil_tests::http_with(
            stream,
            method,
            path,
            &[
                ("authorization", &format!("Bearer {}", token.trim())),
                ("content-type", "application/json"),
            ],
            body,
        )
        .expect("HTTP")
    };
    let (status, body) = call("POST", "/v1/devices", br#"{"id": "pi-tls"}"#);
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let listed = |list: &[u8]| String::from_utf8_lossy(list).contains("\"pi-tls\"");
    let (status, list) = call("GET", "/v1/devices", b"");
    assert!(status == 200 && listed(&list), "{status}");
    // Written through to the database: psql (over TLS, as pg_hba.conf allows no other
    // way) removes the row, and the device is gone from the API. (The test server
    // trusts local logins, so the URL's password is carried, not checked.)
    pg.sql_in("fleet", "DELETE FROM devices WHERE id = 'pi-tls'");
    let (status, list) = call("GET", "/v1/devices", b"");
    assert_eq!(status, 200);
    assert!(
        !listed(&list),
        "the device was not in PostgreSQL: {}",
        String::from_utf8_lossy(&list)
    );
    hil_tests::fleet::terminate(&mut child);
    let log = std::fs::read_to_string(dir.join("serve.log")).expect("log");
    assert!(
        log.contains("the control plane's state is in PostgreSQL"),
        "{log}"
    );
    assert!(!log.contains(PASSWORD), "the password leaked into the log");
}
