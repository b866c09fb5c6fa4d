//! What a receiver is sent — Alertmanager's API v2 alerts, a signed JSON webhook, a
//! Slack-compatible message — built without I/O ([`payload`]), and the one call that
//! sends it ([`send`]): a deadline per delivery, the answer read only up to 64 KiB.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Value, json};

use super::config::{Receiver, ReceiverKind};
use crate::records::AlertRecord;

/// How much of a receiver's answer is read (it is only logged on failure).
const MAX_ANSWER: usize = 64 * 1024;

/// The header carrying a webhook's signature: `sha256=` and the hex HMAC-SHA256, under
/// the receiver's secret, of the timestamp header's value, `.`, and the body.
pub const SIGNATURE_HEADER: &str = "x-fleetml-signature";
/// Seconds since the epoch when the webhook was signed (receivers refuse old ones, so a
/// recorded delivery cannot be replayed later).
pub const TIMESTAMP_HEADER: &str = "x-fleetml-timestamp";

/// Milliseconds since the epoch as RFC 3339.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One alert of a notification, in the state it is sent in.
#[derive(Debug)]
pub struct Sent<'a> {
    pub alert: &'a AlertRecord,
    pub state: &'a str,
}

/// The body and the extra headers of one notification to `r` at `now_ms`. `ends_ms` is
/// when Alertmanager should consider a firing alert over unless re-posted.
pub fn payload(
    r: &Receiver,
    group: &BTreeMap<String, String>,
    alerts: &[Sent<'_>],
    now_ms: u64,
    firing_ends_ms: u64,
    console: &str,
) -> (Vec<u8>, Vec<(String, String)>) {
    let ends = |s: &Sent<'_>| match (s.state, s.alert.resolved_ms) {
        ("resolved", Some(at)) => at,
        _ => firing_ends_ms,
    };
    let body = match r.kind {
        ReceiverKind::Alertmanager => Value::Array(
            alerts
                .iter()
                .map(|s| {
                    json!({
                        "labels": s.alert.labels,
                        "annotations": s.alert.annotations,
                        "startsAt": rfc3339(s.alert.fired_ms.unwrap_or(s.alert.seen_ms)),
                        "endsAt": rfc3339(ends(s)),
                        "generatorURL": console,
                    })
                })
                .collect(),
        ),
        ReceiverKind::Webhook => {
            let status = if alerts.iter().any(|s| s.state == "firing") {
                "firing"
            } else {
                "resolved"
            };
            json!({
                "version": "1",
                "receiver": r.name,
                "status": status,
                "groupLabels": group,
                "commonLabels": common_labels(alerts),
                "externalURL": console,
                "alerts": alerts.iter().map(|s| json!({
                    "status": s.state,
                    "fingerprint": s.alert.key,
                    "labels": s.alert.labels,
                    "annotations": s.alert.annotations,
                    "startsAt": rfc3339(s.alert.fired_ms.unwrap_or(s.alert.seen_ms)),
                    "endsAt": (s.state == "resolved").then(|| rfc3339(ends(s))),
                })).collect::<Vec<_>>(),
            })
        }
        ReceiverKind::Slack => json!({ "text": slack_text(group, alerts, console) }),
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
    if let Some(secret) = &r.to.secret {
        let ts = (now_ms / 1000).to_string();
        headers.push((TIMESTAMP_HEADER.into(), ts.clone()));
        headers.push((SIGNATURE_HEADER.into(), sign(secret, &ts, &body)));
    }
    (body, headers)
}

/// `sha256=` and the hex HMAC-SHA256 of `timestamp.body` under `secret`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

fn common_labels(alerts: &[Sent<'_>]) -> BTreeMap<String, String> {
    let mut common = alerts
        .first()
        .map(|s| s.alert.labels.clone())
        .unwrap_or_default();
    for s in alerts.iter().skip(1) {
        common.retain(|k, v| s.alert.labels.get(k) == Some(v));
    }
    common
}

fn slack_text(group: &BTreeMap<String, String>, alerts: &[Sent<'_>], console: &str) -> String {
    let firing = alerts.iter().filter(|s| s.state == "firing").count();
    let resolved = alerts.len() - firing;
    let name = group.get("alertname").map_or("alert", String::as_str);
    let mut head = match (firing, resolved) {
        (f, 0) => format!("[FIRING:{f}] {name}"),
        (0, r) => format!("[RESOLVED:{r}] {name}"),
        (f, r) => format!("[FIRING:{f}, RESOLVED:{r}] {name}"),
    };
    for (k, v) in group.iter().filter(|(k, _)| *k != "alertname") {
        head.push_str(&format!(" {k}={v}"));
    }
    let mut text = format!("*{}*", slack_escape(&head));
    for s in alerts {
        let summary = s
            .alert
            .annotations
            .get("summary")
            .cloned()
            .unwrap_or_else(|| s.alert.key.clone());
        text.push_str(&format!("\n• {}: {}", s.state, slack_escape(&summary)));
    }
    text.push_str(&format!("\n{}", slack_escape(console)));
    text
}

/// Slack's three control characters in message text.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Posts `body` to `r`: the HTTP status on a 2xx answer, else why not (the status and
/// the start of the answer, or the connection's error), all within `r.timeout`.
pub async fn send(
    r: &Receiver,
    body: Vec<u8>,
    headers: &[(String, String)],
) -> Result<u16, (u16, String)> {
    use http_body_util::BodyExt;
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let answer = tokio::time::timeout(r.timeout, async {
        let response = crate::http::send(&r.to.endpoint, "POST", &r.to.path, &headers, body)
            .await
            .map_err(|e| (0, format!("{e:#}")))?;
        let status = response.status();
        let text = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok::<_, (u16, String)>((status, text))
    })
    .await
    .map_err(|_| (0, format!("no answer within {:?}", r.timeout)))??;
    let (status, text) = answer;
    if status.is_success() {
        Ok(status.as_u16())
    } else {
        let text = String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned();
        Err((status.as_u16(), format!("{status}: {}", text.trim())))
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::Config;
    use super::*;

    fn alert(state_resolved: bool) -> AlertRecord {
        AlertRecord {
            key: "0011223344556677".into(),
            labels: [
                ("alertname", "device_silent"),
                ("device", "pi-a"),
                ("severity", "warning"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            annotations: [("summary".to_string(), "pi-a <silent> & gone".to_string())].into(),
            seen_ms: 1_000,
            fired_ms: Some(2_000),
            resolved_ms: state_resolved.then_some(9_000),
            event: false,
            told: Default::default(),
        }
    }

    fn receiver(kind: &str) -> Receiver {
        let dir = tempfile::tempdir().expect("dir");
        let secret = dir.path().join("s");
        std::fs::write(&secret, "k".repeat(32)).expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let extra = match kind {
            "webhook" => "url = \"http://127.0.0.1:9/hook\"\nsecret_file = \"s\"\n",
            "slack" => {
                std::fs::write(dir.path().join("u"), "http://127.0.0.1:9/services/x").expect("w");
                std::fs::set_permissions(
                    dir.path().join("u"),
                    std::fs::Permissions::from_mode(0o600),
                )
                .expect("chmod");
                "url_file = \"u\"\n"
            }
            _ => "url = \"http://127.0.0.1:9093\"\n",
        };
        let text = format!("[[receiver]]\nname = \"r\"\nkind = \"{kind}\"\n{extra}");
        Config::parse(&text, dir.path())
            .expect("config")
            .receivers
            .remove(0)
    }

    #[test]
    fn alertmanager_gets_start_and_end_times_in_rfc3339() {
        let (a, r) = (alert(true), alert(false));
        let sent = [
            Sent {
                alert: &a,
                state: "resolved",
            },
            Sent {
                alert: &r,
                state: "firing",
            },
        ];
        let (body, headers) = payload(
            &receiver("alertmanager"),
            &BTreeMap::new(),
            &sent,
            5_000,
            245_000,
            "https://cp/ui/",
        );
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v[0]["startsAt"], "1970-01-01T00:00:02.000Z");
        assert_eq!(v[0]["endsAt"], "1970-01-01T00:00:09.000Z");
        assert_eq!(v[1]["endsAt"], "1970-01-01T00:04:05.000Z");
        assert_eq!(v[0]["labels"]["alertname"], "device_silent");
        assert!(!headers.iter().any(|(k, _)| k == SIGNATURE_HEADER));
    }

    #[test]
    fn a_webhook_is_signed_over_its_timestamp_and_body() {
        let a = alert(false);
        let sent = [Sent {
            alert: &a,
            state: "firing",
        }];
        let (body, headers) = payload(
            &receiver("webhook"),
            &[("alertname".to_string(), "device_silent".to_string())].into(),
            &sent,
            5_000,
            0,
            "https://cp/ui/",
        );
        let h: BTreeMap<_, _> = headers.into_iter().collect();
        assert_eq!(h[TIMESTAMP_HEADER], "5");
        let key = "k".repeat(32);
        assert_eq!(h[SIGNATURE_HEADER], sign(key.as_bytes(), "5", &body));
        assert_ne!(
            h[SIGNATURE_HEADER],
            sign(key.as_bytes(), "6", &body),
            "replay at another time"
        );
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["status"], "firing");
        assert_eq!(v["commonLabels"]["device"], "pi-a");
        assert_eq!(v["alerts"][0]["fingerprint"], "0011223344556677");
    }

    #[test]
    fn slack_text_is_escaped() {
        let a = alert(false);
        let sent = [Sent {
            alert: &a,
            state: "firing",
        }];
        let (body, _) = payload(
            &receiver("slack"),
            &[("alertname".to_string(), "device_silent".to_string())].into(),
            &sent,
            5_000,
            0,
            "https://cp/ui/",
        );
        let v: Value = serde_json::from_slice(&body).expect("json");
        let text = v["text"].as_str().expect("text");
        assert!(text.starts_with("*[FIRING:1] device_silent*"), "{text}");
        assert!(text.contains("pi-a &lt;silent&gt; &amp; gone"), "{text}");
    }
}
