//! The notifier's configuration: `fleetctl serve --alerts FILE` (TOML) — rules, which
//! conditions alert, and receivers, where notifications go — checked whole at start, so
//! a mistake stops the server with the line that is wrong instead of alerts that never
//! arrive. Without a file, the built-in rules run with no receiver: alerts are kept,
//! listed (`fleetctl alerts list`) and counted on `/metrics`, and sent nowhere.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub rules: Vec<Rule>,
    pub receivers: Vec<Receiver>,
    pub settings: Settings,
}

/// `[settings]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// How often the leader evaluates the rules and sends what is due; alerts that start
    /// within one interval of each other go out in one notification per group.
    pub interval: Duration,
    /// How often a firing alert is posted to Alertmanager again (it forgets an alert not
    /// re-posted within its end time, four of these).
    pub resend: Duration,
    /// The longest wait between two attempts at a failed delivery (back-off doubles from
    /// one second up to this).
    pub retry_max: Duration,
    /// How long a resolved alert stays listed.
    pub keep_resolved: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            interval: Duration::from_secs(10),
            resend: Duration::from_secs(60),
            retry_max: Duration::from_secs(300),
            keep_resolved: Duration::from_secs(3600),
        }
    }
}

/// One rule: a condition the control plane watches, and who hears of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The alert's name (`alertname`).
    pub name: String,
    pub when: When,
    /// How long the condition must hold before the alert fires.
    pub for_: Duration,
    pub severity: String,
    /// Receivers by name (all of them when the rule names none).
    pub receivers: Vec<String>,
    /// Labels whose values split notifications into groups (`alertname` always does).
    pub group_by: Vec<String>,
}

/// The conditions a rule can watch.
#[derive(Debug, Clone, PartialEq)]
pub enum When {
    /// A device reports a drift alert for a model (features, predictions, the
    /// multivariate reconstruction error or estimated accuracy).
    DriftAlert,
    /// A device's missing-prediction rate: above `above` in its newest window, or, with no
    /// `above`, the device's own missing-prediction alert.
    MissingPredictions { above: Option<f64> },
    /// No message from a device for `after`.
    DeviceSilent { after: Duration },
    /// A rollout is paused (resolved when it resumes or ends).
    RolloutPaused,
    /// A rollout was rolled back (an event).
    RolloutRolledBack,
    /// A rollout or rollback completed (an event).
    RolloutCompleted,
    /// A retraining job finished: succeeded, failed or cancelled (an event); with
    /// `policy_only`, only jobs a drift policy started.
    JobFinished { policy_only: bool },
}

impl When {
    pub fn as_str(&self) -> &'static str {
        match self {
            When::DriftAlert => "drift_alert",
            When::MissingPredictions { .. } => "missing_predictions",
            When::DeviceSilent { .. } => "device_silent",
            When::RolloutPaused => "rollout_paused",
            When::RolloutRolledBack => "rollout_rolled_back",
            When::RolloutCompleted => "rollout_completed",
            When::JobFinished { .. } => "job_finished",
        }
    }
}

/// Where notifications go.
#[derive(Debug, Clone)]
pub struct Receiver {
    pub name: String,
    pub kind: ReceiverKind,
    pub to: Target,
    /// Whether it is told when an alert resolves.
    pub send_resolved: bool,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverKind {
    /// Alertmanager's API v2 (`POST /api/v2/alerts`): its routing, grouping, silences
    /// and paging apply.
    Alertmanager,
    /// JSON, HMAC-SHA256-signed with the receiver's secret.
    Webhook,
    /// A Slack-compatible incoming webhook (`{"text": …}`).
    Slack,
}

impl ReceiverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiverKind::Alertmanager => "alertmanager",
            ReceiverKind::Webhook => "webhook",
            ReceiverKind::Slack => "slack",
        }
    }
}

/// A receiver's address, and the secret it is signed with.
#[derive(Clone)]
pub struct Target {
    pub endpoint: crate::http::Endpoint,
    /// Path and query.
    pub path: String,
    /// What logs and listings show: the URL, or only its host when the URL is a secret
    /// (Slack's).
    pub shown: String,
    /// The webhook's HMAC key.
    pub secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("shown", &self.shown)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    settings: SettingsFile,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleFile>,
    #[serde(default, rename = "receiver")]
    receivers: Vec<ReceiverFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsFile {
    interval: Option<String>,
    resend: Option<String>,
    retry_max: Option<String>,
    keep_resolved: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    when: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    severity: Option<String>,
    above: Option<f64>,
    after: Option<String>,
    policy_only: Option<bool>,
    #[serde(default)]
    receivers: Vec<String>,
    group_by: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiverFile {
    name: String,
    kind: String,
    url: Option<String>,
    url_file: Option<PathBuf>,
    secret_file: Option<PathBuf>,
    ca: Option<PathBuf>,
    #[serde(default)]
    insecure: bool,
    #[serde(default = "yes")]
    send_resolved: bool,
    timeout: Option<String>,
}

fn yes() -> bool {
    true
}

/// The rules that run without a file, or with a file that names receivers only.
pub fn builtin_rules() -> Vec<Rule> {
    let rule = |name: &str, when: When, severity: &str, group_by: &[&str]| Rule {
        name: name.into(),
        when,
        for_: Duration::ZERO,
        severity: severity.into(),
        receivers: Vec::new(),
        group_by: group_by.iter().map(|s| s.to_string()).collect(),
    };
    vec![
        rule("drift_alert", When::DriftAlert, "warning", &["model"]),
        rule(
            "missing_predictions",
            When::MissingPredictions { above: None },
            "warning",
            &["model"],
        ),
        rule(
            "device_silent",
            When::DeviceSilent {
                after: Duration::from_secs(600),
            },
            "warning",
            &["board"],
        ),
        rule(
            "rollout_paused",
            When::RolloutPaused,
            "warning",
            &["rollout"],
        ),
        rule(
            "rollout_rolled_back",
            When::RolloutRolledBack,
            "critical",
            &["rollout"],
        ),
        rule(
            "rollout_completed",
            When::RolloutCompleted,
            "info",
            &["rollout"],
        ),
        rule(
            "job_finished",
            When::JobFinished { policy_only: false },
            "info",
            &["job"],
        ),
    ]
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rules: builtin_rules(),
            receivers: Vec::new(),
            settings: Settings::default(),
        }
    }
}

/// The largest alerts file read.
const MAX_FILE: u64 = 256 * 1024;

impl Config {
    /// Reads and checks `path`; every error names the file and what to change.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let bytes = crate::output::read_bounded(path, MAX_FILE, "alerts file")?;
        let text = String::from_utf8(bytes)
            .with_context(|| format!("alerts file {} is not UTF-8", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).with_context(|| format!("alerts file {}", path.display()))
    }

    /// Parses the TOML `text`; relative file names are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Config> {
        let file: File = toml::from_str(text)?;
        let d = Settings::default();
        let settings = Settings {
            interval: duration(file.settings.interval.as_deref(), d.interval, "interval")?,
            resend: duration(file.settings.resend.as_deref(), d.resend, "resend")?,
            retry_max: duration(file.settings.retry_max.as_deref(), d.retry_max, "retry_max")?,
            keep_resolved: duration(
                file.settings.keep_resolved.as_deref(),
                d.keep_resolved,
                "keep_resolved",
            )?,
        };
        ensure!(
            settings.interval >= Duration::from_millis(100),
            "[settings] interval must be at least 100ms"
        );
        let mut receivers = Vec::new();
        for r in file.receivers {
            let name = r.name.clone();
            receivers.push(receiver(r, base).with_context(|| format!("[[receiver]] `{name}`"))?);
        }
        let names: BTreeSet<&str> = receivers.iter().map(|r| r.name.as_str()).collect();
        ensure!(
            names.len() == receivers.len(),
            "two [[receiver]] sections have the same name"
        );
        let rules = if file.rules.is_empty() {
            builtin_rules()
        } else {
            let mut rules = Vec::new();
            for r in file.rules {
                let name = r.name.clone();
                rules.push(rule(r, &names).with_context(|| format!("[[rule]] `{name}`"))?);
            }
            rules
        };
        let rule_names: BTreeSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        ensure!(
            rule_names.len() == rules.len(),
            "two [[rule]] sections have the same name"
        );
        Ok(Config {
            rules,
            receivers,
            settings,
        })
    }

    pub fn receiver(&self, name: &str) -> Option<&Receiver> {
        self.receivers.iter().find(|r| r.name == name)
    }

    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }
}

fn duration(text: Option<&str>, default: Duration, what: &str) -> anyhow::Result<Duration> {
    match text {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t)
            .with_context(|| format!("{what} = {t:?}: expected a duration like 30s, 10m or 1h")),
    }
}

fn label_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn rule(r: RuleFile, receivers: &BTreeSet<&str>) -> anyhow::Result<Rule> {
    ensure!(
        label_name_ok(&r.name),
        "name: use lower-case letters, digits and `_`, starting with a letter"
    );
    let only = |field: &str, set: bool, kinds: &str| {
        ensure!(
            !set,
            "`{field}` applies to `when = \"{kinds}\"` only, not `{}`",
            r.when
        );
        Ok(())
    };
    let when = match r.when.as_str() {
        "drift_alert" => When::DriftAlert,
        "missing_predictions" => {
            if let Some(a) = r.above {
                ensure!(
                    (0.0..=1.0).contains(&a),
                    "above = {a}: a missing-prediction rate is between 0 and 1"
                );
            }
            When::MissingPredictions { above: r.above }
        }
        "device_silent" => When::DeviceSilent {
            after: duration(r.after.as_deref(), Duration::from_secs(600), "after")?,
        },
        "rollout_paused" => When::RolloutPaused,
        "rollout_rolled_back" => When::RolloutRolledBack,
        "rollout_completed" => When::RolloutCompleted,
        "job_finished" => When::JobFinished {
            policy_only: r.policy_only.unwrap_or(false),
        },
        other => bail!(
            "when = {other:?} is not one of drift_alert, missing_predictions, device_silent, \
             rollout_paused, rollout_rolled_back, rollout_completed, job_finished"
        ),
    };
    if !matches!(when, When::MissingPredictions { .. }) {
        only("above", r.above.is_some(), "missing_predictions")?;
    }
    if !matches!(when, When::DeviceSilent { .. }) {
        only("after", r.after.is_some(), "device_silent")?;
    }
    if !matches!(when, When::JobFinished { .. }) {
        only("policy_only", r.policy_only.is_some(), "job_finished")?;
    }
    for name in &r.receivers {
        ensure!(
            receivers.contains(name.as_str()),
            "receivers: no [[receiver]] is named `{name}`"
        );
    }
    let builtin = builtin_rules()
        .into_iter()
        .find(|b| b.when.as_str() == when.as_str());
    let severity = r.severity.unwrap_or_else(|| {
        builtin
            .as_ref()
            .map_or("warning".into(), |b| b.severity.clone())
    });
    ensure!(
        label_name_ok(&severity),
        "severity = {severity:?}: use lower-case letters, digits and `_`"
    );
    let group_by = r
        .group_by
        .unwrap_or_else(|| builtin.map(|b| b.group_by).unwrap_or_default());
    for g in &group_by {
        ensure!(label_name_ok(g), "group_by: {g:?} is not a label name");
    }
    Ok(Rule {
        name: r.name,
        for_: duration(r.for_.as_deref(), Duration::ZERO, "for")?,
        when,
        severity,
        receivers: r.receivers,
        group_by,
    })
}

fn receiver(r: ReceiverFile, base: &Path) -> anyhow::Result<Receiver> {
    ensure!(
        label_name_ok(&r.name),
        "name: use lower-case letters, digits and `_`, starting with a letter"
    );
    let kind = match r.kind.as_str() {
        "alertmanager" => ReceiverKind::Alertmanager,
        "webhook" => ReceiverKind::Webhook,
        "slack" => ReceiverKind::Slack,
        other => bail!("kind = {other:?} is not one of alertmanager, webhook, slack"),
    };
    let at = |p: &Path| base.join(p);
    // Slack's URL is its credential: kept in a private file, never shown.
    let (url, secret_url) = match (kind, &r.url, &r.url_file) {
        (ReceiverKind::Slack, Some(_), _) => bail!(
            "a Slack webhook URL is a secret: put it in a file only you can read \
             (chmod 600) and name it with url_file"
        ),
        (_, Some(_), Some(_)) => bail!("give url or url_file, not both"),
        (_, Some(u), None) => (u.trim().to_string(), false),
        (_, None, Some(f)) => (
            String::from_utf8(secret_file(&at(f), "url_file")?)
                .context("url_file is not UTF-8")?
                .trim()
                .to_string(),
            true,
        ),
        (_, None, None) => bail!("url is missing"),
    };
    let secret = match (kind, &r.secret_file) {
        (ReceiverKind::Webhook, Some(f)) => {
            let s = secret_file(&at(f), "secret_file")?;
            ensure!(
                s.len() >= 16,
                "secret_file holds {} bytes; use at least 16 random bytes (e.g. `openssl rand -hex 32`)",
                s.len()
            );
            Some(s)
        }
        (ReceiverKind::Webhook, None) => bail!(
            "secret_file is missing: webhooks are signed (HMAC-SHA256) so the receiver can tell \
             them from forgeries; write a random key to a file (chmod 600) and name it"
        ),
        (_, Some(_)) => bail!("secret_file applies to kind = \"webhook\" only"),
        (_, None) => None,
    };
    let parsed = url::Url::parse(&url).map_err(|e| {
        if secret_url {
            anyhow::anyhow!("url_file does not hold a URL ({e})")
        } else {
            anyhow::anyhow!("url = {url:?}: {e}")
        }
    })?;
    let host = parsed
        .host_str()
        .context("the URL names no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tls = match parsed.scheme() {
        "https" => {
            let roots = match &r.ca {
                Some(ca) => {
                    let pem = std::fs::read(at(ca))
                        .with_context(|| format!("reading ca {}", at(ca).display()))?;
                    fleetml_net::tls::client_config(&pem, &at(ca).display().to_string())
                        .map_err(anyhow::Error::msg)?
                }
                None => fleetml_net::tls::system_roots().map_err(anyhow::Error::msg)?,
            };
            Some(roots)
        }
        "http" => {
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            ensure!(
                loopback || r.insecure,
                "plain http:// to {host} would send alerts in clear; use https://, \
                 or set insecure = true on a network you trust"
            );
            ensure!(r.ca.is_none(), "ca applies to https:// URLs only");
            None
        }
        other => bail!("the URL's scheme is {other}; expected https:// (or http:// to loopback)"),
    };
    let port = parsed
        .port_or_known_default()
        .context("the URL names no port")?;
    let mut path = parsed.path().to_string();
    if let Some(q) = parsed.query() {
        path.push('?');
        path.push_str(q);
    }
    if kind == ReceiverKind::Alertmanager {
        // The base URL of Alertmanager; its API is below it.
        path = format!("{}/api/v2/alerts", path.trim_end_matches('/'));
    }
    let shown = if secret_url {
        format!("{}://{host} (URL in url_file)", parsed.scheme())
    } else {
        url.clone()
    };
    Ok(Receiver {
        name: r.name,
        kind,
        to: Target {
            endpoint: crate::http::Endpoint { host, port, tls },
            path,
            shown,
            secret,
        },
        send_resolved: r.send_resolved,
        timeout: duration(r.timeout.as_deref(), Duration::from_secs(10), "timeout")?,
    })
}

/// A secret file's bytes (trimmed), refused when others can read it.
fn secret_file(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{what} {}: cannot read it", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    ensure!(
        mode & 0o077 == 0,
        "{what} {} is readable by others (mode {mode:o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    );
    let bytes = crate::output::read_bounded(path, 4096, what)?;
    Ok(String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<Config> {
        Config::parse(text, Path::new("/nonexistent"))
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse(text).expect_err("refused"))
    }

    #[test]
    fn without_rules_the_builtin_ones_run() {
        let c = parse("").expect("empty");
        assert_eq!(c.rules, builtin_rules());
        assert!(c.receivers.is_empty());
        assert_eq!(c.settings, Settings::default());
    }

    #[test]
    fn a_rule_file_is_checked_field_by_field() {
        let c = parse(
            "[settings]\ninterval = \"1s\"\n\
             [[receiver]]\nname = \"am\"\nkind = \"alertmanager\"\nurl = \"http://127.0.0.1:9093/\"\n\
             [[rule]]\nname = \"quiet\"\nwhen = \"device_silent\"\nafter = \"2s\"\nreceivers = [\"am\"]\n",
        )
        .expect("parses");
        assert_eq!(c.settings.interval, Duration::from_secs(1));
        assert_eq!(
            c.rules[0].when,
            When::DeviceSilent {
                after: Duration::from_secs(2)
            }
        );
        assert_eq!(c.rules[0].group_by, vec!["board".to_string()]);
        assert_eq!(c.receivers[0].to.path, "/api/v2/alerts");
        assert_eq!(c.receivers[0].to.endpoint.port, 9093);

        assert!(err("[[rule]]\nname = \"x\"\nwhen = \"sometimes\"\n").contains("is not one of"));
        assert!(
            err("[[rule]]\nname = \"x\"\nwhen = \"drift_alert\"\nabove = 0.1\n")
                .contains("`above` applies to `when = \"missing_predictions\"` only")
        );
        assert!(
            err("[[rule]]\nname = \"x\"\nwhen = \"drift_alert\"\nreceivers = [\"nobody\"]\n")
                .contains("no [[receiver]] is named `nobody`")
        );
        assert!(err("[[rule]]\nname = \"Bad Name\"\nwhen = \"drift_alert\"\n").contains("name:"));
        assert!(
            err("[[rule]]\nname = \"x\"\nwhen = \"device_silent\"\nafter = \"soon\"\n")
                .contains("expected a duration")
        );
        assert!(
            err("[[rule]]\nname = \"x\"\nwhen = \"drift_alert\"\ncolour = 1\n").contains("colour")
        );
    }

    #[test]
    fn receivers_refuse_unsigned_webhooks_inline_slack_urls_and_plain_http_elsewhere() {
        assert!(
            err(
                "[[receiver]]\nname = \"h\"\nkind = \"webhook\"\nurl = \"https://example.org/x\"\n"
            )
            .contains("secret_file is missing")
        );
        assert!(
            err("[[receiver]]\nname = \"s\"\nkind = \"slack\"\nurl = \"https://hooks.slack.com/services/T/B/X\"\n")
                .contains("is a secret")
        );
        assert!(
            err("[[receiver]]\nname = \"am\"\nkind = \"alertmanager\"\nurl = \"http://10.0.0.5:9093\"\n")
                .contains("in clear")
        );
        parse(
            "[[receiver]]\nname = \"am\"\nkind = \"alertmanager\"\nurl = \"http://10.0.0.5:9093\"\ninsecure = true\n",
        )
        .expect("allowed when asked for");
        assert!(
            err("[[receiver]]\nname = \"a\"\nkind = \"pager\"\nurl = \"https://x\"\n")
                .contains("kind = \"pager\"")
        );
    }

    #[test]
    fn secret_files_others_can_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let secret = dir.path().join("hook.secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").expect("write");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let text = "[[receiver]]\nname = \"h\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\nsecret_file = \"hook.secret\"\n";
        let e = format!(
            "{:#}",
            Config::parse(text, dir.path()).expect_err("refused")
        );
        assert!(
            e.contains("readable by others") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let c = Config::parse(text, dir.path()).expect("accepted at 0600");
        assert_eq!(
            c.receivers[0].to.secret.as_deref(),
            Some(&b"0123456789abcdef0123456789abcdef"[..])
        );
        assert!(!format!("{:?}", c.receivers[0]).contains("0123456789abcdef"));
    }
}
