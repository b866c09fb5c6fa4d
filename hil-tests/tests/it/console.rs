//! The operator console in a real browser: Debian's headless `chromium` driven through
//! `chromedriver` (WebDriver, with fantoccini) against `fleetctl serve` over TLS with
//! three real agents. Sign in; see the fleet; start a rollout from the CLI and watch its
//! wave bars move without reloading; pause it from the page and see the CLI agree; see
//! a drift alert reach the heatmap after drifted traffic; a viewer sees no buttons and
//! is refused when it posts anyway; a forged form post (no CSRF token, another origin)
//! is refused; sign out ends the session. Every page is screenshotted into
//! `TARGET/console-screenshots/` (docs/console/ holds copies of the key ones).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hil_tests::fleet::ControlPlane;
use serde_json::json;

use crate::rollout::{LAB_FLEET, kill, lab_fleet_on_v1, rollout};

const WAIT: Duration = Duration::from_secs(90);

/// A chromedriver child, stopped on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    /// Stops chromedriver and the browsers it started (its process group), also when
    /// the test failed before closing its session.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn program(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("`{name}` is not installed: apt-get install {package} (.ci/run installs it)");
}

fn start_driver(dir: &Path) -> Driver {
    let port = fleetml_testkit::free_port();
    use std::os::unix::process::CommandExt as _;
    let child = Command::new(program("chromedriver", "chromium-driver"))
        .arg(format!("--port={port}"))
        // Its own process group, which Drop stops as a whole.
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("chromedriver.log")).expect("log"))
        .spawn()
        .expect("chromedriver starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn browser(driver: &Driver, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    // The control plane's CA is its own (--self-signed); the browser is not given it.
    caps.insert("acceptInsecureCerts".into(), json!(true));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": program("chromium", "chromium").display().to_string(),
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session with chromium")
}

/// Waits until `css` matches at least one element (the live regions refresh on their
/// own; the test never reloads while it waits).
async fn wait_css(c: &Client, css: &str, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if !c
            .find_all(Locator::Css(css))
            .await
            .expect("find")
            .is_empty()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what} ({css}) on {}:\n{}",
            c.current_url().await.expect("url"),
            c.source().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The text of the first element matching `css`. A live region may be swapped between
/// finding an element and reading it (a stale element): then it is found again.
async fn text_of(c: &Client, css: &str) -> String {
    let mut tries = 0;
    loop {
        let found = c.find(Locator::Css(css)).await;
        let read = match found {
            Ok(e) => e.text().await,
            Err(e) => Err(e),
        };
        match read {
            Ok(text) => return text,
            Err(e) if tries < 20 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{css}: {e}"),
        }
    }
}

async fn shot(c: &Client, name: &str) {
    let dir = hil_tests::target_dir().join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

async fn sign_in(c: &Client, base: &str, token: &str) {
    c.goto(&format!("{base}/ui/")).await.expect("goto");
    // Not signed in: the console sends the browser to its sign-in page.
    assert!(
        c.current_url().await.expect("url").path() == "/ui/login",
        "{}",
        c.current_url().await.expect("url")
    );
    c.find(Locator::Id("token"))
        .await
        .expect("token field")
        .send_keys(token)
        .await
        .expect("type");
    c.find(Locator::Css("form.login button"))
        .await
        .expect("button")
        .click()
        .await
        .expect("submit");
    wait_css(c, "#signed-in", "the signed-in header").await;
}

/// The session cookie's value, read from the browser.
async fn session_cookie(c: &Client) -> String {
    c.get_named_cookie("__Host-fleetml-session")
        .await
        .expect("the session cookie (Secure, __Host- prefix: the API is HTTPS)")
        .value()
        .to_string()
}

/// The CSRF token of the page's session (every page's sign-out form carries it).
async fn csrf_of(c: &Client) -> String {
    c.find(Locator::Css(
        "form[action=\"/ui/logout\"] input[name=\"csrf\"]",
    ))
    .await
    .expect("csrf field")
    .attr("value")
    .await
    .expect("attr")
    .expect("value")
}

/// A raw POST to the console with `cookie`, the form `body` and extra `headers`: status.
fn post_form(
    plane: &ControlPlane,
    path: &str,
    cookie: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> u16 {
    let cookie = format!("__Host-fleetml-session={cookie}");
    let mut all = vec![
        ("cookie", cookie.as_str()),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    all.extend_from_slice(headers);
    hil_tests::http_with(plane.connect(), "POST", path, &all, body.as_bytes())
        .expect("HTTP")
        .0
}

/// Signs in to the console with `token` over plain HTTP; the answer's head (a 303 that
/// sets the session cookie).
pub(crate) fn sign_in_head(plane: &ControlPlane, token: &str) -> String {
    let body = format!("token={token}&next=%2Fui%2F");
    let (status, head, _) = hil_tests::http_answer(
        plane.connect(),
        "POST",
        "/ui/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .expect("HTTP");
    assert_eq!(status, 303, "{head}");
    head
}

fn get_with_cookie(plane: &ControlPlane, path: &str, cookie: &str) -> (u16, String) {
    let cookie = format!("__Host-fleetml-session={cookie}");
    let (status, head, _) = hil_tests::http_answer(
        plane.connect(),
        "GET",
        path,
        &[("cookie", cookie.as_str())],
        b"",
    )
    .expect("HTTP");
    (status, head)
}

#[test]
fn an_operator_signs_in_watches_a_rollout_pauses_it_sees_drift_and_a_viewer_cannot_act() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    // Small windows, and an alert on the first drifted one.
    let (plane, agents) = lab_fleet_on_v1(dir, "window_predictions = 200\nalert_windows = 1");
    let devices = LAB_FLEET;
    let token = |name: &str, role: &str| {
        plane
            .fleetctl(dir, &["tokens", "create", "--name", name, "--role", role])
            .success()
            .trim()
            .to_string()
    };
    let (operator, viewer) = (token("night-ops", "operator"), token("auditor", "viewer"));

    // The sign-in answer sets a locked-down cookie.
    let head = sign_in_head(&plane, &operator);
    let set_cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("set-cookie");
    for attribute in [
        "__Host-fleetml-session=",
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/",
    ] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let wrong = hil_tests::http_with(
        plane.connect(),
        "POST",
        "/ui/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        b"token=not-a-token",
    )
    .expect("HTTP");
    assert_eq!(wrong.0, 401);

    let driver = start_driver(dir);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let base = plane.url.clone();
    rt.block_on(async {
        let c = browser(&driver, &dir.join("chrome-profile")).await;
        c.goto(&format!("{base}/ui/login")).await.expect("goto");
        shot(&c, "login").await;
        sign_in(&c, &base, &operator).await;

        // The fleet: three agents, online, each with its board and model.
        wait_css(&c, "#devices tr[data-device]", "device rows").await;
        let rows = c
            .find_all(Locator::Css("#devices tr[data-device]"))
            .await
            .expect("rows");
        assert_eq!(rows.len(), 3);
        let table = text_of(&c, "#devices").await;
        for (name, board, _) in devices {
            assert!(table.contains(name) && table.contains(board), "{table}");
        }
        assert!(table.contains("claims v1"), "{table}");
        shot(&c, "fleet").await;
        // A phone's width: the page reflows, the table scrolls inside it.
        c.set_window_size(390, 844).await.expect("resize");
        c.refresh().await.expect("reload");
        wait_css(&c, "#devices tr[data-device]", "device rows on a phone").await;
        shot(&c, "fleet-phone").await;
        c.set_window_size(1280, 1000).await.expect("resize");
        // Filtering by tag leaves the lab.
        c.goto(&format!("{base}/ui/?tag=site%3Dlab"))
            .await
            .expect("goto");
        let lab = c
            .find_all(Locator::Css("#devices tr[data-device]"))
            .await
            .expect("rows");
        assert_eq!(lab.len(), 2);

        // A rollout started from the CLI appears on the open list page by itself.
        c.goto(&format!("{base}/ui/rollouts")).await.expect("goto");
        let id = rollout(
            &plane,
            dir,
            &[
                "claims@2",
                "--to",
                "all",
                "--waves",
                "34,67,100",
                "--soak",
                "20s",
                "--max-fallbacks",
                "1",
            ],
        );
        wait_css(
            &c,
            &format!("#rollouts tr[data-rollout=\"{id}\"]"),
            "the new rollout on the list",
        )
        .await;
        shot(&c, "rollouts").await;

        // Its page: wave 2 waits while wave 1 soaks, then its bar moves to active, seen
        // through the page's own refresh.
        c.goto(&format!("{base}/ui/rollouts/{id}"))
            .await
            .expect("goto");
        let active_in_wave = |wave: usize| {
            let c = c.clone();
            async move {
                text_of(
                    &c,
                    &format!("li.wave[data-wave=\"{wave}\"] span[data-count-of=\"active\"]"),
                )
                .await
                .trim()
                .to_string()
            }
        };
        assert_eq!(
            active_in_wave(2).await,
            "0",
            "wave 2 starts after wave 1's 20 s soak"
        );
        wait_css(
            &c,
            "li.wave[data-wave=\"1\"] rect[data-state=\"active\"]",
            "wave 1's device active",
        )
        .await;
        let deadline = Instant::now() + WAIT;
        while active_in_wave(2).await != "1" {
            assert!(
                Instant::now() < deadline,
                "wave 2 never became active on the page"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        shot(&c, "rollout").await;

        // Pause from the page (a confirmation first); the CLI agrees.
        c.find(Locator::Css(&format!(
            "form[action=\"/ui/rollouts/{id}/pause\"] button"
        )))
        .await
        .expect("pause button")
        .click()
        .await
        .expect("click");
        wait_css(
            &c,
            "input[name=\"confirm\"][value=\"yes\"]",
            "the confirmation",
        )
        .await;
        shot(&c, "confirm-pause").await;
        c.find(Locator::Css("form[action$=\"/pause\"] button"))
            .await
            .expect("confirm button")
            .click()
            .await
            .expect("click");
        wait_css(&c, ".summary .b-paused", "the paused badge").await;
        let cli = plane.fleetctl(dir, &["rollout", "status", &id]);
        assert!(cli.success().contains("paused"), "{}", cli.stdout);
        let audit = plane.json(dir, &["audit", "--last", "500"]);
        assert!(
            audit.as_array().expect("entries").iter().any(|e| {
                e["action"] == "POST /ui/rollouts/{id}/pause"
                    && e["who"].as_str().is_some_and(|w| w.contains("night-ops"))
                    && e["outcome"] == 303
            }),
            "{audit:#}"
        );

        // A forged post with the operator's own session: without the CSRF token, or
        // from another origin with it, nothing happens.
        let cookie = session_cookie(&c).await;
        let csrf = csrf_of(&c).await;
        let resume = format!("/ui/rollouts/{id}/resume");
        assert_eq!(post_form(&plane, &resume, &cookie, "confirm=yes", &[]), 403);
        assert_eq!(
            post_form(&plane, &resume, &cookie, "confirm=yes&csrf=00", &[]),
            403
        );
        assert_eq!(
            post_form(
                &plane,
                &resume,
                &cookie,
                &format!("confirm=yes&csrf={csrf}"),
                &[("origin", "https://evil.example")]
            ),
            403
        );
        assert_eq!(plane.get(&format!("/v1/rollouts/{id}"))["state"], "paused");
        // The refused posts are audited, as the API's refused changes are.
        let audit = plane.json(dir, &["audit", "--last", "500"]);
        let refused = audit
            .as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["action"] == "POST /ui/rollouts/{id}/resume" && e["outcome"] == 403)
            .count();
        assert_eq!(refused, 3, "{audit:#}");

        // Drifted traffic on one device: its alert reaches the heatmap by itself.
        c.goto(&format!("{base}/ui/drift?model=claims"))
            .await
            .expect("goto");
        let (reference, drifted) = (
            crate::monitoring::rows("reference.csv"),
            crate::monitoring::rows("drifted.csv"),
        );
        for agent in [&agents[0], &agents[2]] {
            crate::monitoring::send(agent, &reference[..400]);
        }
        crate::monitoring::send(&agents[1], &drifted[..600]);
        wait_css(
            &c,
            "#heatmap td.h-alert[data-device=\"x86-b\"]",
            "x86-b's alert on the heatmap",
        )
        .await;
        shot(&c, "drift").await;
        let feature = c
            .find(Locator::Css("#heatmap td.h-alert[data-device=\"x86-b\"]"))
            .await
            .expect("cell")
            .attr("data-feature")
            .await
            .expect("attr")
            .expect("feature");
        c.goto(&format!("{base}/ui/drift/claims/{feature}?device=x86-b"))
            .await
            .expect("goto");
        wait_css(&c, "figure.chart svg polyline", "the feature's chart").await;
        shot(&c, "drift-feature").await;
        c.goto(&format!("{base}/ui/devices/x86-b"))
            .await
            .expect("goto");
        wait_css(&c, "figure.chart", "the device's charts").await;
        assert!(text_of(&c, "main").await.contains("claims:"));
        // Its history: the drifted windows, and its statuses.
        assert!(text_of(&c, "#window-history").await.contains("claims v"));
        wait_css(
            &c,
            "#status-history tbody tr",
            "the device's status history",
        )
        .await;
        // Its assignments: the first install (r1, the fleet's first rollout) and the
        // paused one.
        let assigned = text_of(&c, "#assignment-history").await;
        assert!(
            assigned.contains("r1") && assigned.contains(&id),
            "{assigned}"
        );
        shot(&c, "device").await;
        // A dataset and its profile report (the HTML `fleetctl data profile --html` makes).
        let dataset = crate::retrain::import_reference(dir, &plane);
        c.goto(&format!("{base}/ui/data/datasets/{dataset}/profile"))
            .await
            .expect("goto");
        wait_css(&c, "h1", "the profile report").await;
        assert!(text_of(&c, "body").await.contains("rows"));
        shot(&c, "dataset-profile").await;
        for (path, name) in [
            ("/ui/models", "models"),
            ("/ui/models/claims", "model"),
            ("/ui/models/claims/diff?a=1&b=2", "model-diff"),
            ("/ui/data", "data"),
            ("/ui/audit", "audit"),
        ] {
            c.goto(&format!("{base}{path}")).await.expect("goto");
            wait_css(&c, "main h1", path).await;
            assert!(
                c.find_all(Locator::Css("p.error"))
                    .await
                    .expect("find")
                    .is_empty(),
                "{path}: {}",
                text_of(&c, "main").await
            );
            match name {
                // Health by version × board: the devices that ran v2 reported windows.
                "model" => assert!(
                    text_of(&c, "#health").await.contains("v"),
                    "{}",
                    text_of(&c, "main").await
                ),
                "audit" => assert!(text_of(&c, "#chain").await.contains("verifies")),
                _ => {}
            }
            shot(&c, name).await;
        }

        // Sign out: the old cookie no longer opens a page.
        c.find(Locator::Id("sign-out"))
            .await
            .expect("sign out")
            .click()
            .await
            .expect("click");
        wait_css(&c, "form.login", "the sign-in page").await;
        let (status, head) = get_with_cookie(&plane, "/ui/", &cookie);
        assert_eq!(status, 303, "{head}");
        assert!(head.contains("/ui/login"), "{head}");

        // A viewer reads everything and is offered no button; posting anyway is refused
        // by the server.
        sign_in(&c, &base, &viewer).await;
        c.goto(&format!("{base}/ui/rollouts/{id}"))
            .await
            .expect("goto");
        wait_css(&c, "li.wave", "the waves").await;
        assert!(
            c.find_all(Locator::Css("div.actions form"))
                .await
                .expect("find")
                .is_empty(),
            "a viewer is offered an action"
        );
        shot(&c, "rollout-viewer").await;
        let viewer_cookie = session_cookie(&c).await;
        let viewer_csrf = csrf_of(&c).await;
        assert_eq!(
            post_form(
                &plane,
                &resume,
                &viewer_cookie,
                &format!("confirm=yes&csrf={viewer_csrf}"),
                &[]
            ),
            403
        );
        assert_eq!(plane.get(&format!("/v1/rollouts/{id}"))["state"], "paused");
        c.goto(&format!("{base}/ui/audit")).await.expect("goto");
        assert!(text_of(&c, "main").await.contains("needs operator"));
        c.close().await.expect("close the browser");
    });
    for a in agents {
        kill(a);
    }
}
