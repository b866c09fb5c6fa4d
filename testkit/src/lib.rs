//! What the tests of several crates share: a free loopback port, a private PostgreSQL
//! server started from Debian's `postgresql` package (the store conformance suite in
//! `fleet-control` and the system tests in `hil-tests` both run against one), a private
//! S3-compatible server (moto) and a private NATS cluster (Debian's `nats-server`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Below Linux's ephemeral range (32768-60999): the kernel never gives these to
    // outgoing connections, so a port found free here stays free until a test binds it
    // on purpose (a port from the ephemeral range was once taken by a client connection
    // between this check and the server's bind). Each process walks the range from its
    // own offset, so concurrent test processes rarely meet, and never hands one out twice.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let offset = (std::process::id() % 1_000) * 12;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (offset + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
        assert!(n < 4 * SPAN, "no free port below the ephemeral range");
    }
}

/// A private PostgreSQL server (Debian's `postgresql` package) in a temporary
/// directory, on 127.0.0.1 and a free port, trusting local connections; stopped on drop.
/// As root it runs as the `postgres` user, since PostgreSQL refuses to run as root.
#[derive(Debug)]
pub struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    root: bool,
    /// `pg_ctl start`'s server options (for [`Postgres::start_again`]).
    options: String,
    pub port: u16,
}

impl Postgres {
    pub fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// [`Postgres::start`] with TLS only: `cert` (chain, PEM) and `key` presented, and
    /// plain TCP connections refused by `pg_hba.conf`.
    pub fn start_tls(cert: &Path, key: &Path) -> Postgres {
        Postgres::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                let mut v: Vec<PathBuf> = d.flatten().map(|e| e.path().join("bin")).collect();
                v.sort();
                v.pop()
            })
            .filter(|b| b.join("initdb").is_file())
            .expect("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)");
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let dir = tempfile::Builder::new()
            .prefix("fleetml-pg")
            .tempdir_in("/tmp")
            .expect("tempdir");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        if root {
            let ok = Command::new("chown")
                .args(["postgres:postgres", &data.display().to_string()])
                .status()
                .expect("chown");
            assert!(ok.success(), "chown postgres {}", data.display());
        }
        let pg = Postgres {
            _dir: dir,
            data,
            bin,
            root,
            options: String::new(),
            port: free_port(),
        };
        let d = pg.data.display().to_string();
        pg.run(
            "initdb",
            &["-D", &d, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        let mut options = format!("-p {} -k {d} -c listen_addresses=127.0.0.1", pg.port);
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                let to = pg.data.join(to);
                std::fs::copy(from, &to).expect("copy the certificate");
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                    .expect("chmod");
                if root {
                    let ok = Command::new("chown")
                        .args(["postgres:postgres", &to.display().to_string()])
                        .status()
                        .expect("chown");
                    assert!(ok.success());
                }
            }
            std::fs::write(
                pg.data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .expect("pg_hba.conf");
            options.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        let mut pg = pg;
        pg.options = options;
        pg.start_again();
        pg
    }

    /// Stops the server (`pg_ctl stop -m fast`): its clients' connections are closed,
    /// as in a restart or a failover.
    pub fn stop(&self) {
        let d = self.data.display().to_string();
        self.run("pg_ctl", &["-D", &d, "-m", "fast", "-w", "stop"]);
    }

    /// Starts the server again after [`Postgres::stop`]: same data, same port.
    pub fn start_again(&self) {
        let d = self.data.display().to_string();
        let log = format!("{d}/server.log");
        self.run(
            "pg_ctl",
            &["-D", &d, "-o", &self.options, "-l", &log, "-w", "start"],
        );
    }

    fn run(&self, tool: &str, args: &[&str]) {
        self.run_with(tool, args, &[]);
    }

    /// Runs PostgreSQL's `tool` (as the `postgres` user under root) with `stdin`; its
    /// standard output.
    fn run_with(&self, tool: &str, args: &[&str], stdin: &[u8]) -> Vec<u8> {
        use std::io::Write;
        use std::process::Stdio;
        let exe = self.bin.join(tool).display().to_string();
        let mut command = if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &exe]);
            c
        } else {
            Command::new(&exe)
        };
        let mut child = command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        let mut input = child.stdin.take().expect("stdin");
        let bytes = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&bytes);
        });
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        let _ = writer.join();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `pg_dump --format=custom` of database `db`: what an operator backs up.
    pub fn dump(&self, db: &str) -> Vec<u8> {
        let port = self.port.to_string();
        self.run_with(
            "pg_dump",
            &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-Fc", db],
            &[],
        )
    }

    /// `pg_restore` of `dump` (from [`Postgres::dump`]) into the empty database `db`.
    pub fn restore(&self, db: &str, dump: &[u8]) {
        let port = self.port.to_string();
        self.run_with(
            "pg_restore",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                db,
                "--exit-on-error",
            ],
            dump,
        );
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url_of(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db` and returns its URL.
    pub fn create_database(&self, db: &str) -> String {
        self.sql(&format!("CREATE DATABASE \"{db}\""));
        self.url_of(db)
    }

    /// Runs SQL with psql in database `db`.
    pub fn sql_in(&self, db: &str, sql: &str) {
        let port = self.port.to_string();
        self.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
    }

    /// Runs SQL with psql (in database `postgres`).
    pub fn sql(&self, sql: &str) {
        self.sql_in("postgres", sql);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let d = self.data.display().to_string();
        let exe = self.bin.join("pg_ctl").display().to_string();
        let args = ["-D", d.as_str(), "-m", "immediate", "stop"];
        let _ = if self.root {
            Command::new("runuser")
                .args(["-u", "postgres", "--", &exe])
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        };
    }
}

/// A private S3-compatible server: moto's server mode (`moto_server`, installed into the
/// test venv from requirements-test.txt) on 127.0.0.1 and a free port, without
/// authentication checks; stopped (by PID) on drop.
#[derive(Debug)]
pub struct S3Server {
    child: std::process::Child,
    pub port: u16,
}

impl S3Server {
    pub fn start() -> S3Server {
        let venv = std::env::var_os("FLEETML_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/fleetml-venv"));
        let exe = venv.join("bin/moto_server");
        assert!(
            exe.is_file(),
            "{} is missing: scripts/test.sh installs moto[server] from requirements-test.txt",
            exe.display()
        );
        let port = free_port();
        let child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let server = S3Server { child, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server did not listen on {port} within 60 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        server
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What a client of this server needs in its environment (endpoint, region and
    /// throwaway credentials; plain HTTP allowed).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// An HTTP request to the server (path style); the status code. Retried for a few
    /// seconds while the server, just started, drops connections.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> u16 {
        use std::io::{Read, Write};
        let once = || -> std::io::Result<u16> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
            write!(
                s,
                "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                self.port,
                body.len()
            )?;
            s.write_all(body)?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            answer
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {answer:?}")))
        };
        let mut tries = 0;
        loop {
            match once() {
                Ok(status) => return status,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => panic!("{method} {path} on moto_server: {e}"),
            }
        }
    }

    /// Creates bucket `name`.
    pub fn create_bucket(&self, name: &str) {
        let status = self.request("PUT", &format!("/{name}"), b"");
        assert_eq!(status, 200, "creating bucket {name}");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private NATS cluster (Debian's `nats-server`): `n` nodes on 127.0.0.1, each with
/// JetStream (its own store folder) and MQTT enabled, the MQTT sessions' consumers in
/// memory as docs/DEPLOY.md configures them, routed to each other (one node: a plain
/// server); every node stopped (by PID) on drop. Anonymous clients, as the tests'
/// mosquitto.
#[derive(Debug)]
pub struct NatsCluster {
    dir: tempfile::TempDir,
    nodes: Vec<NatsNode>,
}

/// One node of a [`NatsCluster`].
#[derive(Debug)]
pub struct NatsNode {
    child: Option<std::process::Child>,
    /// NATS clients' port.
    pub port: u16,
    /// MQTT 3.1.1 port.
    pub mqtt_port: u16,
    /// The monitoring endpoint's port (`/jsz`, `/varz`).
    pub http_port: u16,
    route_port: u16,
}

impl NatsCluster {
    pub fn start(n: usize) -> NatsCluster {
        NatsCluster::start_configured(n, "")
    }

    /// [`NatsCluster::start`] with `conf` added to every node's configuration (an
    /// `authorization` block, say).
    pub fn start_configured(n: usize, conf: &str) -> NatsCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes: Vec<NatsNode> = (0..n)
            .map(|_| NatsNode {
                child: None,
                port: free_port(),
                mqtt_port: free_port(),
                http_port: free_port(),
                route_port: free_port(),
            })
            .collect();
        let routes: Vec<String> = nodes
            .iter()
            .map(|n| format!("nats-route://127.0.0.1:{}", n.route_port))
            .collect();
        for (i, node) in nodes.iter().enumerate() {
            // One node is a server of its own, not a cluster of one.
            let cluster = if n > 1 {
                format!(
                    "cluster {{ name: fleetml, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                    node.route_port,
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\n\
                 jetstream {{ store_dir: \"{}\" }}\n{cluster}\
                 mqtt {{ listen: 127.0.0.1:{}, consumer_memory_storage: true }}\n\
                 http: 127.0.0.1:{}\n{conf}",
                node.port,
                dir.path().join(format!("js{i}")).display(),
                node.mqtt_port,
                node.http_port,
            );
            std::fs::write(dir.path().join(format!("n{i}.conf")), conf).expect("nats conf");
        }
        for (i, node) in nodes.iter_mut().enumerate() {
            Self::spawn(dir.path(), i, node);
        }
        let cluster = NatsCluster { dir, nodes };
        // JetStream answers once the nodes have elected a meta leader; the tests'
        // clients retry until then.
        for node in &cluster.nodes {
            wait_listening(node.mqtt_port, "nats-server's MQTT");
        }
        cluster
    }

    fn spawn(dir: &Path, i: usize, node: &mut NatsNode) {
        let log = std::fs::File::create(dir.join(format!("n{i}.log"))).expect("nats log");
        node.child = Some(
            Command::new("nats-server")
                .arg("-c")
                .arg(dir.join(format!("n{i}.conf")))
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .expect("nats-server starts (apt-get install nats-server)"),
        );
        wait_listening(node.port, "nats-server");
    }

    pub fn nodes(&self) -> &[NatsNode] {
        &self.nodes
    }

    /// `nats://127.0.0.1:P1,nats://127.0.0.1:P2,…` (the nodes still running).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Makes every running node read its configuration again (SIGHUP, what
    /// `nats-server --signal reload` sends): an included `authorization` block's new
    /// users and permissions apply, and connections they no longer allow are closed.
    pub fn reload(&self) {
        for child in self.nodes.iter().filter_map(|n| n.child.as_ref()) {
            let status = Command::new("kill")
                .arg("-HUP")
                .arg(child.id().to_string())
                .status()
                .expect("kill -HUP");
            assert!(status.success(), "kill -HUP {}", child.id());
        }
    }

    /// Kills node `i` (SIGKILL): its clients must go to another node.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The body of `GET path` on node `i`'s monitoring endpoint (JSON).
    pub fn monitor(&self, i: usize, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.nodes[i].http_port))
            .expect("nats-server monitoring endpoint");
        write!(
            s,
            // HTTP/1.0: the answer comes whole, not chunked.
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
        )
        .expect("request");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("answer");
        answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default()
    }

    /// Node `i`'s log so far, for a failing test's message.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("n{i}.log"))).unwrap_or_default()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

fn wait_listening(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not listen on {port} within 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
