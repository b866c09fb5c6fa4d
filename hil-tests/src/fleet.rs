//! Fleet messaging helpers: a real `fleetctl serve`, a real mosquitto, and waiting for
//! what the control plane shows.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Run, bin};

pub use fleetml_testkit::{NatsCluster, Postgres, S3Server, free_port};

/// Polls `check` every 100 ms until it returns `Some`, or panics naming `what`.
#[track_caller]
pub fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_listening(port: u16, what: &str) {
    wait_for(what, Duration::from_secs(15), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
}

/// A mosquitto from Debian (`apt-get install mosquitto`; `.ci/run` does), on a loopback
/// port, with persistence in its own folder. Stopped (SIGTERM, so it saves) on drop.
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    config: PathBuf,
}

impl Mosquitto {
    pub fn start(dir: &Path, port: u16) -> Mosquitto {
        Self::start_queueing(dir, port, 100_000)
    }

    /// [`Mosquitto::start`], holding at most `queued` QoS 1 messages for a client that
    /// is away (it acknowledges and drops the rest: a broker losing what it accepted).
    pub fn start_queueing(dir: &Path, port: u16, queued: u32) -> Mosquitto {
        Self::start_with(dir, port, queued, "")
    }

    /// [`Mosquitto::start`] over TLS only, presenting `cert` (chain, PEM) with `key`.
    pub fn start_tls(dir: &Path, port: u16, cert: &Path, key: &Path) -> Mosquitto {
        let tls = format!("certfile {}\nkeyfile {}\n", cert.display(), key.display());
        Self::start_with(dir, port, 100_000, &tls)
    }

    /// [`Mosquitto::start`] with `conf` added to its configuration (e.g. the files of
    /// `fleetctl broker acl`; anonymous logins stay allowed unless `conf` says).
    pub fn start_configured(dir: &Path, port: u16, conf: &str) -> Mosquitto {
        Self::start_with(dir, port, 100_000, conf)
    }

    /// `listener_conf`: more lines for the listener (TLS files, security settings).
    fn start_with(dir: &Path, port: u16, queued: u32, listener_conf: &str) -> Mosquitto {
        let store = dir.join("mosquitto");
        std::fs::create_dir_all(&store).expect("mosquitto dir");
        let config = store.join("mosquitto.conf");
        // Started as root, mosquitto drops to user `mosquitto`, which cannot write its
        // persistence file into the test's private folder; stay as the test's user.
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .map(|l| l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\n{listener_conf}{}persistence true\n\
                 persistence_location {}/\nautosave_interval 1\nmax_queued_messages {queued}\n{}",
                if listener_conf.contains("allow_anonymous") {
                    ""
                } else {
                    "allow_anonymous true\n"
                },
                store.display(),
                if root { "user root\n" } else { "" }
            ),
        )
        .expect("mosquitto.conf");
        let mut m = Mosquitto {
            child: None,
            port,
            config,
        };
        m.resume();
        m
    }

    /// Starts it again after [`Mosquitto::stop`], on the same port and data.
    pub fn resume(&mut self) {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("mosquitto is not installed: apt-get install mosquitto (.ci/run does)");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        wait_listening(self.port, "mosquitto to listen");
    }

    /// Stops it gracefully (SIGTERM) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGTERM, then wait (SIGKILL after 10 s).
pub fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A byte stream to a server: plain TCP or TLS over it.
pub trait Stream: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> Stream for T {}

/// TLS over a blocking TCP stream whose end without `close_notify` reads as the end.
struct Tls(rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>);

impl std::io::Read for Tls {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
            other => other,
        }
    }
}

impl std::io::Write for Tls {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Opens `url` (`https://HOST:PORT` checked against `roots`, or `http://HOST:PORT`).
pub fn open(
    url: &str,
    roots: Option<&std::sync::Arc<rustls::ClientConfig>>,
) -> std::io::Result<Box<dyn Stream>> {
    open_from(url, roots, None)
}

/// [`open`] from the local address `from` (another loopback address, say 127.0.0.2:
/// another client as far as the server can tell).
pub fn open_from(
    url: &str,
    roots: Option<&std::sync::Arc<rustls::ClientConfig>>,
    from: Option<std::net::IpAddr>,
) -> std::io::Result<Box<dyn Stream>> {
    let (tls, addr) = match url.strip_prefix("https://") {
        Some(a) => (true, a),
        None => (false, url.trim_start_matches("http://")),
    };
    let addr = addr.trim_end_matches('/');
    let tcp = match from {
        None => std::net::TcpStream::connect(addr)?,
        Some(ip) => {
            let to: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(to),
                socket2::Type::STREAM,
                None,
            )?;
            socket.bind(&std::net::SocketAddr::new(ip, 0).into())?;
            socket.connect(&to.into())?;
            socket.into()
        }
    };
    tcp.set_read_timeout(Some(Duration::from_secs(120)))?;
    tcp.set_nodelay(true)?;
    if !tls {
        return Ok(Box::new(tcp));
    }
    let roots = roots.unwrap_or_else(|| panic!("{url}: no CA to check it against"));
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).expect("server name");
    let conn = rustls::ClientConnection::new(roots.clone(), name).map_err(std::io::Error::other)?;
    Ok(Box::new(Tls(rustls::StreamOwned::new(conn, tcp))))
}

/// The roots in the PEM file `ca`.
pub fn roots(ca: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    let pem = std::fs::read(ca).unwrap_or_else(|e| panic!("{}: {e}", ca.display()));
    fleetml_net::tls::client_config(&pem, &ca.display().to_string()).expect("CA")
}

/// A running `fleetctl serve`, stopped on drop: over TLS with its own private CA
/// (`--self-signed`) unless started with `--insecure-listen`.
#[derive(Debug)]
pub struct ControlPlane {
    child: Child,
    /// `https://127.0.0.1:PORT` (`http://` when plain).
    pub url: String,
    pub token: String,
    /// Port of the embedded broker's plain (loopback) listener (when it runs one).
    pub mqtt_port: Option<u16>,
    /// Port of the embedded broker's TLS listener (when it has one).
    pub mqtts_port: Option<u16>,
    /// `DATA_DIR/tls/ca.pem` (with TLS).
    pub ca: Option<PathBuf>,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub data_dir: PathBuf,
    /// Where and with what it was started (for `restart`).
    dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl ControlPlane {
    /// `fleetctl serve` in `dir` with its data in `dir/plane`: with the embedded broker
    /// (`external` = None) or connected to `mqtt://127.0.0.1:PORT`; `extra` flags added.
    pub fn start(dir: &Path, external: Option<u16>, extra: &[&str]) -> ControlPlane {
        Self::start_at(dir, "127.0.0.1", external, extra, Vec::new())
    }

    /// [`start`](Self::start) listening on `ip` (API and embedded broker), with `env`
    /// added to its environment (kept for restarts).
    pub fn start_at(
        dir: &Path,
        ip: &str,
        external: Option<u16>,
        extra: &[&str],
        env: Vec<(String, String)>,
    ) -> ControlPlane {
        let data_dir = dir.join("plane");
        let listen = format!("{ip}:{}", free_port());
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            listen,
        ];
        let plain = extra.contains(&"--insecure-listen");
        let own_tls = extra.contains(&"--tls-cert");
        let own_broker = extra.contains(&"--mqtt-url");
        if !plain && !own_tls {
            args.push("--self-signed".into());
        }
        let (mqtt_port, mqtts_port) = match external {
            None if own_broker => (None, None),
            Some(port) => {
                args.extend(["--mqtt-url".into(), format!("mqtt://127.0.0.1:{port}")]);
                (None, None)
            }
            None if plain => {
                let port = free_port();
                args.extend(["--mqtt-listen".into(), format!("{ip}:{port}")]);
                (Some(port), None)
            }
            None => {
                // The plain listener serves loopback only (the ingest); devices use TLS.
                let (port, tls_port) = (free_port(), free_port());
                args.extend(["--mqtt-listen".into(), format!("127.0.0.1:{port}")]);
                args.extend(["--mqtts-listen".into(), format!("{ip}:{tls_port}")]);
                (Some(port), Some(tls_port))
            }
        };
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, url) = Self::spawn(dir, &args, &env);
        // With --tls-cert, the CA is the one named by --tls-ca.
        let ca = if own_tls {
            extra
                .iter()
                .position(|a| *a == "--tls-ca")
                .and_then(|i| extra.get(i + 1))
                .map(|p| dir.join(p))
        } else {
            (!plain).then(|| data_dir.join("tls/ca.pem"))
        };
        let tls = ca.as_deref().map(roots);
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_string();
        let plane = ControlPlane {
            child,
            url,
            token,
            mqtt_port,
            mqtts_port,
            ca,
            tls,
            data_dir,
            dir: dir.to_path_buf(),
            args,
            env,
        };
        plane.wait_ready();
        plane
    }

    /// Starts it again on the same addresses and data after [`stop`](Self::stop).
    pub fn restart(&mut self) {
        terminate(&mut self.child);
        let (child, url) = Self::spawn(&self.dir, &self.args, &self.env);
        assert_eq!(url, self.url, "the restarted server listens where it did");
        self.child = child;
        self.wait_ready();
    }

    fn wait_ready(&self) {
        // Devices that publish before the ingest subscribed reach nobody on a broker
        // that never saw the ingest's session; tests start devices after this.
        wait_for("the ingest to subscribe", Duration::from_secs(60), || {
            (self.get("/v1/ingest")["broker_connected"] == true).then_some(())
        });
    }

    /// Restarts it with `env` instead of the environment it had (a skewed clock, say).
    pub fn restart_with(&mut self, env: Vec<(String, String)>) {
        self.env = env;
        self.restart();
    }

    fn spawn(dir: &Path, args: &[String], env: &[(String, String)]) -> (Child, String) {
        let mut child = Command::new(bin("fleetctl"))
            .current_dir(dir)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("fleetctl serve starts");
        let mut reader = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .expect("serve prints its address");
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let url = line
            .trim()
            .strip_prefix("control plane listening on ")
            .unwrap_or_else(|| panic!("unexpected first line of fleetctl serve: {line:?}"))
            .to_string();
        (child, url)
    }

    /// A connection to the API (TLS checked against the server's CA).
    pub fn connect(&self) -> Box<dyn Stream> {
        self.try_connect()
            .unwrap_or_else(|e| panic!("{}: {e}", self.url))
    }

    /// [`connect`](Self::connect), or why not.
    pub fn try_connect(&self) -> std::io::Result<Box<dyn Stream>> {
        open(&self.url, self.tls.as_ref())
    }

    /// A connection to the API from the local address `from`.
    pub fn connect_from(&self, from: std::net::IpAddr) -> Box<dyn Stream> {
        open_from(&self.url, self.tls.as_ref(), Some(from)).expect("connects to the API")
    }

    /// `host:port` of the API.
    pub fn addr(&self) -> &str {
        self.url
            .trim_start_matches("https://")
            .trim_start_matches("http://")
    }

    /// A command with `FLEETML_SERVER`, `FLEETML_CA` and the admin token set.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("FLEETML_SERVER", &self.url)
            .env("FLEETML_TOKEN", &self.token);
        if let Some(ca) = &self.ca {
            cmd.env("FLEETML_CA", ca);
        }
        cmd
    }

    /// `fleetctl ARGS --server URL` with the admin token.
    pub fn fleetctl(&self, cwd: &Path, args: &[&str]) -> Run {
        let out = self
            .command(&bin("fleetctl"))
            .current_dir(cwd)
            .args(args)
            .output()
            .expect("fleetctl runs");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `fleetctl ARGS --json` parsed.
    #[track_caller]
    pub fn json(&self, cwd: &Path, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let run = self.fleetctl(cwd, &args);
        serde_json::from_str(run.success()).expect("fleetctl --json prints JSON")
    }

    /// `METHOD path` on the API with the admin token (a JSON body unless null);
    /// expects 2xx and returns the JSON reply.
    pub fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        let stream = self.connect();
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let (status, reply) = crate::http_with(
            stream,
            method,
            path,
            &[
                ("authorization", &format!("Bearer {}", self.token)),
                ("content-type", "application/json"),
            ],
            &bytes,
        )
        .expect("HTTP");
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&reply)
        );
        serde_json::from_slice(&reply).expect("JSON")
    }

    pub fn get(&self, path: &str) -> Value {
        self.call("GET", path, &Value::Null)
    }

    pub fn post(&self, path: &str, body: &Value) -> Value {
        self.call("POST", path, body)
    }

    /// Device `id` as `GET /v1/devices` lists it (null when it is not listed).
    pub fn device(&self, id: &str) -> Value {
        self.get("/v1/devices")
            .as_array()
            .and_then(|a| a.iter().find(|d| d["id"] == id).cloned())
            .unwrap_or(Value::Null)
    }

    /// Whether device `id` is listed online.
    pub fn online(&self, id: &str) -> bool {
        self.device(id)["online"] == true
    }

    /// The device's stored messages (seq, kind, summary, body), oldest first.
    pub fn messages(&self, device: &str) -> Vec<Value> {
        self.get(&format!("/v1/devices/{device}/messages?limit=10000"))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Kills it (SIGKILL: no shutdown, as a crash or a lost host).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it gracefully.
    pub fn stop(&mut self) {
        terminate(&mut self.child);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// What the hostile server does with a request.
#[derive(Debug, Clone)]
pub enum Hostile {
    /// 200 with these bytes.
    Answer(Vec<u8>),
    /// 200, chunked, a body that never ends (up to 1.2 GB).
    Endless,
    /// 200 declaring `declared` bytes, sends `first`, then nothing, holding the
    /// connection (a relay that stops relaying).
    Stall { declared: u64, first: Vec<u8> },
    /// 404.
    Nothing,
}

/// A hostile HTTP server standing in for the control plane: `route` picks what each
/// request line gets.
pub fn hostile(route: impl Fn(&str) -> Hostile + Send + Sync + 'static) -> String {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let route = std::sync::Arc::new(route);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let route = route.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                        break;
                    }
                }
                let mut s = reader.into_inner();
                match route(&line) {
                    Hostile::Answer(body) => {
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(&body);
                    }
                    Hostile::Endless => {
                        let _ = write!(s, "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
                        let chunk = vec![b'{'; 64 << 10];
                        for _ in 0..(1_200_000_000 / chunk.len()) {
                            if write!(s, "{:x}\r\n", chunk.len()).is_err()
                                || s.write_all(&chunk).is_err()
                                || s.write_all(b"\r\n").is_err()
                            {
                                return;
                            }
                        }
                    }
                    Hostile::Stall { declared, first } => {
                        let _ = write!(s, "HTTP/1.1 200 OK\r\ncontent-length: {declared}\r\n\r\n");
                        let _ = s.write_all(&first);
                        std::thread::sleep(std::time::Duration::from_secs(120));
                    }
                    Hostile::Nothing => {
                        let _ = write!(
                            s,
                            "HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
                        );
                    }
                }
            });
        }
    });
    addr
}

/// A relay between MQTT 3.1.1 clients and a plain broker on `127.0.0.1:broker` that drops
/// the QoS 0 PUBLISH packets `drop` picks by topic and payload on their way to the
/// client, which stays connected: what a broker losing a message does (a cluster route
/// dropped). Everything else passes byte for byte. Counts what it dropped and the
/// SUBACKs it passed.
#[derive(Debug)]
pub struct MqttRelay {
    pub port: u16,
    pub dropped: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub subacks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Tells the accept loop to end (on drop); connections already made run on until
    /// either side closes.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for MqttRelay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl MqttRelay {
    pub fn start(broker: u16, drop: impl Fn(&str, &[u8]) -> bool + Send + Sync + 'static) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (dropped, subacks) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let relay = MqttRelay {
            port,
            dropped: dropped.clone(),
            subacks: subacks.clone(),
            stop: stop.clone(),
        };
        let drop = Arc::new(drop);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(upstream) = std::net::TcpStream::connect(("127.0.0.1", broker)) else {
                    continue;
                };
                let (Ok(mut up_w), Ok(mut client_r)) = (upstream.try_clone(), client.try_clone())
                else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut client_r, &mut up_w);
                    let _ = up_w.shutdown(std::net::Shutdown::Both);
                });
                let (drop, dropped, subacks) = (drop.clone(), dropped.clone(), subacks.clone());
                std::thread::spawn(move || {
                    let (mut up_r, mut client_w) = (upstream, client);
                    while let Some((packet, body)) = read_mqtt_packet(&mut up_r) {
                        let kind = packet[0] >> 4;
                        if kind == 9 {
                            subacks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        if kind == 3
                            && (packet[0] >> 1) & 3 == 0
                            && publish_parts(&packet[body..]).is_some_and(|(t, p)| drop(t, p))
                        {
                            dropped.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            continue;
                        }
                        if std::io::Write::write_all(&mut client_w, &packet).is_err() {
                            break;
                        }
                    }
                    let _ = client_w.shutdown(std::net::Shutdown::Both);
                    let _ = up_r.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        relay
    }
}

/// One whole MQTT packet (fixed header included) from `r`, and where its variable
/// header starts; `None` at its end.
fn read_mqtt_packet(r: &mut impl std::io::Read) -> Option<(Vec<u8>, usize)> {
    let mut packet = vec![0u8; 1];
    r.read_exact(&mut packet).ok()?;
    let (mut length, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        r.read_exact(&mut b).ok()?;
        packet.push(b[0]);
        length |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 || shift > 21 {
            break;
        }
    }
    let start = packet.len();
    packet.resize(start + length, 0);
    r.read_exact(&mut packet[start..]).ok()?;
    Some((packet, start))
}

/// The topic and payload of a QoS 0 PUBLISH packet's `body` (after the fixed header).
fn publish_parts(body: &[u8]) -> Option<(&str, &[u8])> {
    let n = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let topic = std::str::from_utf8(body.get(2..2 + n)?).ok()?;
    Some((topic, &body[2 + n..]))
}
