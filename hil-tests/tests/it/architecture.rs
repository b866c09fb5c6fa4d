//! The architecture invariants of ARCHITECTURE.md, checked on the manifests.

use hil_tests::root;

fn dependencies(krate: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).expect("Cargo.toml");
    let doc: toml::Table = text.parse().expect("valid TOML");
    ["dependencies", "dev-dependencies", "build-dependencies"]
        .iter()
        .filter_map(|s| doc.get(*s).and_then(|d| d.as_table()))
        .flat_map(|t| t.keys().cloned())
        .collect()
}

#[test]
fn protocol_stays_pure() {
    let deps = dependencies("protocol");
    for banned in [
        "tokio",
        "rumqttc",
        "rumqttd",
        "axum",
        "sled",
        "tract-onnx",
        "wonnx",
        "fleet-agent",
        "fleet-control",
    ] {
        assert!(
            !deps.iter().any(|d| d == banned),
            "protocol must not depend on {banned}"
        );
    }
}

#[test]
fn agent_and_control_plane_never_depend_on_each_other() {
    assert!(!dependencies("agent").iter().any(|d| d == "fleet-control"));
    assert!(
        !dependencies("control-plane")
            .iter()
            .any(|d| d == "fleet-agent")
    );
}

#[test]
fn every_crate_opens_with_a_role_paragraph() {
    for lib in [
        "protocol/src/lib.rs",
        "device/src/lib.rs",
        "agent/src/lib.rs",
        "control-plane/src/lib.rs",
        "hil-tests/src/lib.rs",
        "models/claims/src/lib.rs",
    ] {
        let text = std::fs::read_to_string(root().join(lib)).expect("lib.rs");
        assert!(
            text.starts_with("//! "),
            "{lib} must open with a //! paragraph"
        );
    }
}

/// `(path, method)` pairs of `.route("PATH", get(..).post(..))` calls in a source file.
fn routes_in_source(text: &str) -> std::collections::BTreeSet<(String, String)> {
    let mut out = std::collections::BTreeSet::new();
    for part in text.split(".route(").skip(1) {
        let Some((path, rest)) = part
            .trim_start()
            .strip_prefix('"')
            .and_then(|p| p.split_once('"'))
        else {
            continue;
        };
        // The handler chain runs to the `)` closing `.route(`.
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find_map(|(i, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                (depth == 0).then_some(i)
            })
            .unwrap_or(rest.len());
        let chain = &rest[..end];
        for method in ["get", "post", "put", "delete", "patch"] {
            if chain.contains(&format!(" {method}(")) || chain.contains(&format!(".{method}(")) {
                out.insert((path.to_string(), method.to_string()));
            }
        }
    }
    out
}

/// `(path, method)` pairs under `paths:` of an OpenAPI YAML file laid out two spaces per
/// level.
fn routes_in_openapi(text: &str) -> std::collections::BTreeSet<(String, String)> {
    let mut out = std::collections::BTreeSet::new();
    let mut in_paths = false;
    let mut path = String::new();
    for line in text.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = format!("/{}", p.trim_end_matches(':'));
        } else if let Some(m) = line.strip_prefix("    ") {
            let m = m.trim_end_matches(':');
            if ["get", "post", "put", "delete", "patch"].contains(&m) {
                out.insert((path.clone(), m.to_string()));
            }
        }
    }
    out
}

#[test]
fn openapi_lists_exactly_the_routes_of_fleetctl_serve() {
    let source = std::fs::read_to_string(hil_tests::root().join("control-plane/src/api/router.rs"))
        .expect("api/router.rs");
    let spec = std::fs::read_to_string(hil_tests::root().join("docs/openapi.yaml"))
        .expect("docs/openapi.yaml");
    let served = routes_in_source(&source);
    let documented = routes_in_openapi(&spec);
    assert!(
        served.len() >= 8,
        "the route scan found too little: {served:?}"
    );
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "docs/openapi.yaml is out of date: missing {undocumented:?}, no longer served {stale:?}"
    );
}

/// The systemd units in packaging/ pass `systemd-analyze verify` against the real
/// binaries, keep their hardening, and start the commands with flags the binaries have.
#[test]
fn the_systemd_units_verify_and_start_real_commands() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (unit, binary) in [
        ("fleet-agent.service", "fleet-agent"),
        ("fleetctl.service", "fleetctl"),
    ] {
        let text = std::fs::read_to_string(hil_tests::root().join("packaging").join(unit))
            .expect("unit file");
        for key in [
            "User=fleetml",
            "ProtectSystem=strict",
            "NoNewPrivileges=true",
            "Restart=on-failure",
            "ReadWritePaths=/var/lib/",
        ] {
            assert!(text.contains(key), "{unit} lacks {key}");
        }
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart");
        let args: Vec<&str> = exec.split_whitespace().collect();
        assert_eq!(args[0], format!("/usr/bin/{binary}"));
        // Every flag of ExecStart is one the subcommand accepts.
        let help = std::process::Command::new(hil_tests::bin(binary))
            .args([args[1], "--help"])
            .output()
            .expect("help");
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            assert!(
                help.contains(flag),
                "{unit}: `{binary} {}` has no {flag}",
                args[1]
            );
        }
        let local = tmp.path().join(unit);
        std::fs::write(
            &local,
            text.replace(
                &format!("/usr/bin/{binary}"),
                &hil_tests::bin(binary).display().to_string(),
            ),
        )
        .expect("unit copy");
        let verify = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&local)
            .output()
            .expect("systemd-analyze runs (.ci/run installs systemd)");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
        let relevant: Vec<&str> = said.lines().filter(|l| l.contains(unit)).collect();
        assert!(
            verify.status.success() && relevant.is_empty(),
            "{unit}: {said}"
        );
    }
}

/// Under systemd (`Type=notify`, `WatchdogSec=`) the agent says READY=1 once it listens,
/// then WATCHDOG=1 at half the interval, then STOPPING=1: the real binary, a real
/// notification socket, as systemd sets it up.
#[test]
fn the_agent_notifies_systemd_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    hil_tests::keys_and_policy(dir, "k");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let mut cmd = std::process::Command::new(hil_tests::bin("fleet-agent"));
    cmd.current_dir(dir)
        .args([
            "run",
            "--data-dir",
            "data",
            "--trust",
            "trust.toml",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("NOTIFY_SOCKET", &socket_path)
        // 400 ms: a ping every 200 ms.
        .env("WATCHDOG_USEC", "400000");
    let mut agent = hil_tests::RunningAgent::spawn(cmd);
    let mut buf = [0u8; 256];
    let mut said = Vec::new();
    let started = std::time::Instant::now();
    while said.iter().filter(|s: &&String| *s == "WATCHDOG=1").count() < 3 {
        let n = socket.recv(&mut buf).expect("a notification within 30 s");
        said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        said[0].starts_with("READY=1\nSTATUS=loading models, listening on 127.0.0.1:"),
        "{said:?}"
    );
    // Three pings at 200 ms take at least 400 ms (the first is immediate).
    assert!(started.elapsed() >= std::time::Duration::from_millis(350));
    let pid = agent.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let stopping = (0..20).find_map(|_| {
        let n = socket.recv(&mut buf).ok()?;
        let s = String::from_utf8_lossy(&buf[..n]).into_owned();
        (s == "STOPPING=1").then_some(s)
    });
    assert_eq!(stopping.as_deref(), Some("STOPPING=1"));
    let _ = agent.child.wait();

    // Without NOTIFY_SOCKET nothing is sent and nothing breaks (every other test).
    let text = std::fs::read_to_string(hil_tests::root().join("packaging/fleet-agent.service"))
        .expect("unit");
    assert!(text.contains("Type=notify") && text.contains("WatchdogSec="));
}

/// Every `.rs` file under `dir`, relative to the repository root.
fn sources(dir: &str) -> Vec<String> {
    fn walk(path: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(path).expect("readable source dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(dir), &mut out);
    let mut names: Vec<String> = out
        .iter()
        .map(|p| {
            p.strip_prefix(root())
                .expect("under the root")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// The lines of `file` outside its `#[cfg(test)] mod tests` (which may use anything).
fn code_lines(file: &str) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(root().join(file)).expect("source file");
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect()
}

/// The sans-io cores decide with time passed in: none reads a clock, sleeps, or
/// touches files, sockets or the async runtime. Their shells do that.
#[test]
fn the_pure_cores_read_no_clock_and_do_no_io() {
    let mut cores = vec![
        "control-plane/src/rollout/mod.rs".to_string(),
        "control-plane/src/policy/engine.rs".to_string(),
        "control-plane/src/alerts/engine.rs".to_string(),
        "control-plane/src/alerts/conditions.rs".to_string(),
        "control-plane/src/fleet_metrics.rs".to_string(),
    ];
    // The device rules the agent and the simulator share, and the wire formats.
    cores.extend(sources("device/src"));
    cores.extend(sources("protocol/src"));
    let banned = [
        "SystemTime::now",
        "Instant::now",
        "now_ms()",
        "std::fs",
        "std::net",
        "tokio",
        "thread::sleep",
        "sled",
    ];
    let mut found = Vec::new();
    for core in &cores {
        for (n, line) in code_lines(core) {
            for b in banned.iter().filter(|b| line.contains(**b)) {
                found.push(format!("{core}:{n}: `{b}` in `{}`", line.trim()));
            }
        }
    }
    // These keep state on disk, but take the time from their caller.
    let mut clock_free = vec![
        "agent/src/outbox.rs".to_string(),
        "agent/src/monitoring.rs".to_string(),
    ];
    clock_free.extend(sources("control-plane/src/store"));
    for file in &clock_free {
        for (n, line) in code_lines(file) {
            for b in ["SystemTime::now", "Instant::now", "now_ms()", ".elapsed()"] {
                if line.contains(b) {
                    found.push(format!("{file}:{n}: `{b}` in `{}`", line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "a pure core does I/O or reads the clock:\n{}",
        found.join("\n")
    );
}

/// Only `control-plane/src/store/` names sled: everything else keeps its records
/// through the store's traits.
#[test]
fn only_the_store_names_sled_in_the_control_plane() {
    let mut wrong = Vec::new();
    for file in sources("control-plane/src") {
        if file.starts_with("control-plane/src/store/") {
            continue;
        }
        // `store::sled::SledStore` is the wiring choosing the backend, not sled itself.
        for (n, line) in code_lines(&file) {
            if line.replace("store::sled::", "").contains("sled::") || line.contains("sled =") {
                wrong.push(format!("{file}:{n} names sled: go through crate::store"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Metric names say whose they are and what they are: `fleetml_agent_*` in the agent,
/// `fleetml_control_*` in the control plane; counters end in `_total`, gauges and
/// histograms do not.
#[test]
fn metric_names_are_consistent() {
    let mut wrong = Vec::new();
    let mut seen = 0;
    for (dir, prefix) in [
        ("agent/src", "fleetml_agent_"),
        ("control-plane/src", "fleetml_control_"),
    ] {
        for file in sources(dir) {
            let text = std::fs::read_to_string(root().join(&file)).expect("source");
            for kind in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in text.match_indices(kind) {
                    let rest = text[at + kind.len()..].trim_start();
                    let Some(name) = rest
                        .strip_prefix('"')
                        .and_then(|r| r.split_once('"'))
                        .map(|(n, _)| n)
                    else {
                        continue; // a name held in a constant or variable
                    };
                    seen += 1;
                    let counter = kind == "counter!(";
                    if !name.starts_with(prefix) {
                        wrong.push(format!("{file}: `{name}` does not start with {prefix}"));
                    }
                    if counter != name.ends_with("_total") {
                        wrong.push(format!(
                            "{file}: `{name}` is a {} and {} end in _total",
                            kind.trim_end_matches("!("),
                            if counter { "must" } else { "must not" }
                        ));
                    }
                }
            }
        }
    }
    assert!(
        seen > 20,
        "found only {seen} metric names: is the scan still right?"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Lines naming `word` in the sources under `dirs`, outside the files `allowed` admits.
fn named_outside(word: &str, dirs: &[&str], allowed: impl Fn(&str) -> bool) -> Vec<String> {
    let mut wrong = Vec::new();
    for dir in dirs {
        for file in sources(dir).into_iter().filter(|f| !allowed(f)) {
            for (n, line) in code_lines(&file) {
                if line.contains(word) {
                    wrong.push(format!("{file}:{n} names {word}"));
                }
            }
        }
    }
    wrong
}

/// The embedded broker is the server's: no other file of the workspace's crates runs
/// rumqttd.
#[test]
fn only_the_server_names_rumqttd() {
    let wrong = named_outside(
        "rumqttd",
        &[
            "control-plane/src",
            "agent/src",
            "protocol/src",
            "inference/src",
            "device/src",
        ],
        |f| f == "control-plane/src/server.rs",
    );
    assert!(
        wrong.is_empty(),
        "only server.rs runs the broker:\n{}",
        wrong.join("\n")
    );
}

/// `fleetml-inference` is shared by the builder and the agent: of the workspace's
/// crates it may depend on `fleetml-protocol` alone.
#[test]
fn inference_depends_on_protocol_alone() {
    let ours: Vec<String> = dependencies("inference")
        .into_iter()
        .filter(|d| d.starts_with("fleet") || d == "hil-tests")
        .collect();
    assert_eq!(
        ours,
        ["fleetml-protocol"],
        "inference's workspace dependencies"
    );
}

/// The device rules exist once: `fleetml-device` depends on the protocol alone, and both
/// devices there are (the agent, and `fleetctl sim`'s simulated ones) use it.
#[test]
fn the_device_rules_are_one_crate_both_devices_use() {
    let ours: Vec<String> = dependencies("device")
        .into_iter()
        .filter(|d| d.starts_with("fleet") || d == "hil-tests")
        .collect();
    assert_eq!(
        ours,
        ["fleetml-protocol"],
        "device's workspace dependencies"
    );
    for (krate, user) in [
        ("agent", "agent/src/outbox.rs"),
        ("agent", "agent/src/assignments/mod.rs"),
        ("control-plane", "control-plane/src/sim/device.rs"),
    ] {
        assert!(
            dependencies(krate).iter().any(|d| d == "fleetml-device"),
            "{krate} must depend on fleetml-device"
        );
        let text = std::fs::read_to_string(root().join(user)).expect("source");
        assert!(
            text.contains("fleetml_device::"),
            "{user} must take its rules from fleetml_device"
        );
    }
}

/// In the control plane only the HTTP API (`api/`), the console on top of it
/// (`console/`) and their wiring (`server.rs`) name axum: the domain rooms know no HTTP
/// framework.
#[test]
fn only_the_api_and_the_server_name_axum() {
    let wrong = named_outside("axum", &["control-plane/src"], |f| {
        f.starts_with("control-plane/src/api/")
            || f.starts_with("control-plane/src/console/")
            || f == "control-plane/src/server.rs"
    });
    assert!(
        wrong.is_empty(),
        "HTTP belongs in api/:\n{}",
        wrong.join("\n")
    );
}

/// The rooms below the API never call into it: what both a handler and a background
/// task do lives in its room and reports a `Refusal`, which the API turns into a status.
/// Besides `api/`, the console (`console/`, the API's pages: it reads and acts through
/// the API's handlers and access rule) and `server`, only the operator-side callers of
/// the API (`cli/`, `client`, `demo`, `views`) name it, and only its shared bodies,
/// `api::types`.
#[test]
fn the_domain_never_calls_the_api() {
    let callers = |f: &str| {
        f.starts_with("control-plane/src/cli/")
            || [
                "control-plane/src/client.rs",
                "control-plane/src/demo.rs",
                "control-plane/src/views.rs",
            ]
            .contains(&f)
    };
    let mut wrong = named_outside("crate::api", &["control-plane/src"], |f| {
        f.starts_with("control-plane/src/api/")
            || f.starts_with("control-plane/src/console/")
            || f == "control-plane/src/server.rs"
            || callers(f)
    });
    for file in sources("control-plane/src")
        .into_iter()
        .filter(|f| callers(f))
    {
        for (n, line) in code_lines(&file) {
            let bare = line.replace("api::types", "");
            if bare.contains("crate::api") || bare.contains("fleet_control::api") {
                wrong.push(format!("{file}:{n} names the API beyond api::types"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the domain calls into the HTTP API:\n{}",
        wrong.join("\n")
    );
}

/// A module path (`["api", "data"]`) per source file under `src` (a crate's `src`).
fn modules(src: &str) -> std::collections::BTreeMap<Vec<String>, String> {
    sources(src)
        .into_iter()
        .filter(|f| !f[src.len()..].starts_with("/bin/"))
        .map(|f| {
            let rel = f[src.len() + 1..].trim_end_matches(".rs").to_string();
            let mut path: Vec<String> = rel.split('/').map(str::to_string).collect();
            if matches!(
                path.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                path.pop();
            }
            (path, f)
        })
        .collect()
}

/// The modules a file names through `crate::`, `super::` and `self::` paths (groups
/// `{a, b::c}` expanded one level), outside comments and its test module: each path
/// resolved to the longest module it starts with.
fn module_edges(
    src: &str,
) -> std::collections::BTreeMap<Vec<String>, std::collections::BTreeSet<Vec<String>>> {
    let files = modules(src);
    let mut graph = std::collections::BTreeMap::new();
    for (module, file) in &files {
        let text: String = code_lines(file)
            .into_iter()
            .map(|(_, l)| l + "\n")
            .collect();
        let mut deps = std::collections::BTreeSet::new();
        for (at, _) in text
            .match_indices("crate::")
            .chain(text.match_indices("super::"))
            .chain(text.match_indices("self::"))
        {
            // Whole words only (not `fleet_control::crate::`, not `myself::`).
            if text[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
            {
                continue;
            }
            let rest = &text[at..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let mut segs: Vec<&str> = rest[..end].split("::").filter(|s| !s.is_empty()).collect();
            let mut base: Vec<String> = match segs.first().copied() {
                Some("crate") => Vec::new(),
                Some("self") => module.clone(),
                _ => module.clone(),
            };
            segs.remove(0);
            if rest.starts_with("super::") {
                base.pop();
                while segs.first() == Some(&"super") {
                    segs.remove(0);
                    base.pop();
                }
            }
            let mut paths = vec![segs.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
            if rest[end..].starts_with('{')
                && let Some(close) = rest[end..].find('}')
            {
                for item in rest[end + 1..end + close].split(',') {
                    let item = item.split(" as ").next().unwrap_or("").trim();
                    if !item.is_empty() {
                        let mut p = paths[0].clone();
                        p.extend(item.split("::").map(str::to_string));
                        paths.push(p);
                    }
                }
            }
            for p in paths {
                let mut full = base.clone();
                full.extend(p);
                if let Some(target) = (1..=full.len())
                    .rev()
                    .map(|k| full[..k].to_vec())
                    .find(|k| files.contains_key(k))
                    && &target != module
                {
                    deps.insert(target);
                }
            }
        }
        graph.insert(module.clone(), deps);
    }
    graph
}

/// The strongly connected components of more than one node (Tarjan), each sorted.
fn cycles<N: Ord + Clone>(
    graph: &std::collections::BTreeMap<N, std::collections::BTreeSet<N>>,
) -> Vec<Vec<N>> {
    struct Walk<'g, N> {
        graph: &'g std::collections::BTreeMap<N, std::collections::BTreeSet<N>>,
        index: std::collections::BTreeMap<N, (usize, usize)>,
        stack: Vec<N>,
        next: usize,
        found: Vec<Vec<N>>,
    }
    impl<N: Ord + Clone> Walk<'_, N> {
        fn visit(&mut self, v: &N) {
            self.index.insert(v.clone(), (self.next, self.next));
            self.next += 1;
            self.stack.push(v.clone());
            let graph = self.graph;
            for w in graph.get(v).into_iter().flatten() {
                if !graph.contains_key(w) {
                    continue;
                }
                match self.index.get(w).copied() {
                    None => {
                        self.visit(w);
                        let low = self.index[w].1.min(self.index[v].1);
                        self.index.get_mut(v).expect("visited").1 = low;
                    }
                    Some((i, _)) if self.stack.contains(w) => {
                        let low = i.min(self.index[v].1);
                        self.index.get_mut(v).expect("visited").1 = low;
                    }
                    Some(_) => {}
                }
            }
            if self.index[v].0 == self.index[v].1 {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    let done = &w == v;
                    component.push(w);
                    if done {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: Default::default(),
        stack: Vec::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.found
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: std::collections::BTreeMap<&str, std::collections::BTreeSet<&str>> = [
        ("a", ["b"].into()),
        ("b", ["c"].into()),
        ("c", ["a", "d"].into()),
        ("d", [].into()),
        ("e", ["d"].into()),
    ]
    .into();
    assert_eq!(cycles(&graph), vec![vec!["a", "b", "c"]]);
    let mut acyclic = graph.clone();
    acyclic.insert("c", ["d"].into());
    assert!(cycles(&acyclic).is_empty());
}

/// No module imports another that imports it back, directly or around a circle, in any
/// crate of the workspace: each room can be read, tested and changed from its
/// dependencies up. (A module is a file; `crate::`, `super::` and `self::` paths count,
/// doc comments and test modules do not.)
#[test]
fn no_module_imports_itself_around_a_circle() {
    let mut found = Vec::new();
    for src in [
        "protocol/src",
        "device/src",
        "inference/src",
        "agent/monitor/src",
        "agent/src",
        "control-plane/src",
        "hil-tests/src",
    ] {
        for cycle in cycles(&module_edges(src)) {
            let names: Vec<String> = cycle.iter().map(|m| m.join("::")).collect();
            found.push(format!("{src}: {}", names.join(" <-> ")));
        }
    }
    assert!(found.is_empty(), "module circles:\n{}", found.join("\n"));
}
