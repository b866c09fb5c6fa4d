//! Notifications: rules over what the fleet reports (drift alerts, missing predictions,
//! silent devices, rollouts paused, rolled back or completed, retraining jobs finished)
//! and receivers that hear of them (Alertmanager's API v2, a signed JSON webhook, a
//! Slack-compatible incoming webhook). `config` reads `--alerts FILE`; `conditions` says
//! what the rules see in a [`Snapshot`]; `engine` decides, with no I/O, what fires,
//! resolves, is due to whom and in which group; `receivers` builds and sends each
//! notification. The leader runs [`spawn`]'s loop: every `interval`, evaluate, store the
//! alerts, send what is due (all receivers at once, each within its timeout), store
//! what each receiver was told, and write an audit entry per delivery (Alertmanager's
//! keep-alive re-posts are counted, not audited). The ingest never waits on any of it.
//! Alerts and silences live in the store ([`crate::store::AlertStore`]), so a restart or
//! another replica taking over sends nothing twice.

pub mod conditions;
pub mod config;
pub mod engine;
pub mod receivers;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::plane::{Plane, now_ms};
use crate::records::{AlertRecord, Silence};
use crate::refusal::Refusal;
use crate::snapshot::Snapshot;
use engine::{Book, Notification, state_of};

/// Runs the notifier on the leader, every `[settings] interval`.
pub fn spawn(plane: Arc<Plane>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(plane.alerts.settings.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if !plane.leader.leads() {
                continue;
            }
            if let Err(e) = round(&plane).await {
                tracing::error!(
                    error = format!("{e:#}"),
                    "the alert notifier's round failed"
                );
            }
        }
    });
}

/// One round: evaluate, store, deliver what is due, store what each receiver was told.
async fn round(plane: &Arc<Plane>) -> anyhow::Result<()> {
    let now = now_ms();
    let settings = plane.alerts.settings.clone();
    let p = plane.clone();
    let (mut book, silences, changes) = tokio::task::spawn_blocking(move || {
        // Judged at `now`: a snapshot read now, not one the fleet metrics still hold.
        let snap = p.snapshots.get(now, 0, || {
            Snapshot::read(&*p.ingest.store, &*p.rollouts, &p.jobs)
        })?;
        let cfg = &p.alerts;
        let seen = conditions::seen(&cfg.rules, &snap, now);
        let mut book: Book = p
            .alert_store
            .alerts()?
            .into_iter()
            .map(|a| (a.key.clone(), a))
            .collect();
        let changes = engine::evaluate(
            &cfg.rules,
            &seen,
            &mut book,
            now,
            settings.keep_resolved.as_millis() as u64,
        );
        let changed: Vec<AlertRecord> = changes
            .changed
            .iter()
            .filter_map(|k| book.get(k).cloned())
            .collect();
        p.alert_store.update_alerts(&changed, &changes.removed)?;
        let silences = p.alert_store.silences()?;
        anyhow::Ok((book, silences, changes))
    })
    .await??;
    for key in &changes.changed {
        let Some(a) = book.get(key) else { continue };
        let name = a.labels.get("alertname").map_or("", String::as_str);
        let summary = a.annotations.get("summary").map_or("", String::as_str);
        if a.resolved_ms == Some(now) {
            tracing::info!(alert = name, key = %a.key, "resolved: {summary}");
        } else if a.fired_ms == Some(now) {
            tracing::warn!(alert = name, key = %a.key, "firing: {summary}");
        }
    }
    let cfg = &plane.alerts;
    let due = engine::due(
        &cfg.rules,
        &cfg.receivers,
        &book,
        &silences,
        now,
        settings.resend.as_millis() as u64,
    );
    if due.is_empty() {
        return Ok(());
    }
    let ends = now + 4 * settings.resend.as_millis() as u64;
    let console = format!("{}/ui/", plane.public_url.trim_end_matches('/'));
    let outcomes = futures_util::future::join_all(
        due.iter()
            .map(|n| deliver(plane, &book, n, now, ends, &console)),
    )
    .await;
    let mut changed = Vec::new();
    let mut audits = Vec::new();
    for (n, outcome) in due.iter().zip(outcomes) {
        let Some(r) = cfg.receiver(&n.receiver) else {
            continue;
        };
        let result = outcome.as_ref().map(|_| ()).map_err(|(_, e)| e.clone());
        metrics::counter!(
            "fleetml_control_alert_notifications_total",
            "receiver" => n.receiver.clone(),
            "outcome" => if result.is_ok() { "sent" } else { "failed" },
        )
        .increment(1);
        match &outcome {
            Ok(_) => {
                tracing::info!(receiver = %n.receiver, alerts = n.alerts.len(), resend = n.resend, "notified")
            }
            Err((_, e)) => {
                tracing::warn!(receiver = %n.receiver, error = %e, "a notification failed; retrying with back-off")
            }
        }
        if !(n.resend && result.is_ok()) {
            let status = match &outcome {
                Ok(s) => *s,
                Err((s, _)) => *s,
            };
            audits.push((
                format!("NOTIFY {}", r.kind.as_str()),
                describe(n, &result),
                status,
            ));
        }
        changed.extend(engine::delivered(
            &mut book,
            n,
            now,
            result,
            settings.retry_max.as_millis() as u64,
        ));
    }
    changed.sort();
    changed.dedup();
    let records: Vec<AlertRecord> = changed
        .iter()
        .filter_map(|k| book.get(k).cloned())
        .collect();
    let p = plane.clone();
    tokio::task::spawn_blocking(move || {
        p.alert_store.update_alerts(&records, &[])?;
        for (action, target, status) in audits {
            audit_delivery(&p, action, target, status)?;
        }
        anyhow::Ok(())
    })
    .await??;
    Ok(())
}

/// One delivery's audit entry, by `alerts`: `NOTIFY KIND`, what went where, and the
/// receiver's HTTP status (0: no answer).
fn audit_delivery(
    plane: &Plane,
    action: String,
    target: String,
    status: u16,
) -> Result<crate::records::AuditEntry, crate::store::StoreError> {
    plane.audit.append(
        now_ms(),
        "alerts".into(),
        "system".into(),
        action,
        target,
        status,
    )
}

/// The audit entry's target: the receiver, how many alerts in which state, the group,
/// and why it failed.
fn describe(n: &Notification, result: &Result<(), String>) -> String {
    let firing = n.alerts.iter().filter(|(_, s)| *s == "firing").count();
    let group: Vec<String> = n.group.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut text = format!(
        "{}: {firing} firing, {} resolved ({})",
        n.receiver,
        n.alerts.len() - firing,
        group.join(" ")
    );
    if let Err(e) = result {
        text.push_str(&format!(": failed: {e}"));
    }
    text
}

async fn deliver(
    plane: &Plane,
    book: &Book,
    n: &Notification,
    now: u64,
    ends: u64,
    console: &str,
) -> Result<u16, (u16, String)> {
    let r = plane
        .alerts
        .receiver(&n.receiver)
        .ok_or((0, format!("no receiver `{}`", n.receiver)))?;
    let sent: Vec<receivers::Sent<'_>> = n
        .alerts
        .iter()
        .filter_map(|(k, state)| book.get(k).map(|alert| receivers::Sent { alert, state }))
        .collect();
    let (body, headers) = receivers::payload(r, &n.group, &sent, now, ends, console);
    receivers::send(r, body, &headers).await
}

/// `GET /v1/alerts`: the alerts (pending, firing, resolved; silenced or not; what each
/// receiver was told), the rules and the receivers.
pub fn list(plane: &Plane) -> Result<Value, Refusal> {
    let now = now_ms();
    let silences = plane.alert_store.silences()?;
    let mut alerts = plane.alert_store.alerts()?;
    alerts.sort_by(|a, b| {
        (state_of(a) != "firing", b.fired_ms, &a.key).cmp(&(
            state_of(b) != "firing",
            a.fired_ms,
            &b.key,
        ))
    });
    let cfg = &plane.alerts;
    Ok(json!({
        "alerts": alerts.iter().map(|a| json!({
            "key": a.key,
            "state": state_of(a),
            "labels": a.labels,
            "annotations": a.annotations,
            "seen_ms": a.seen_ms,
            "fired_ms": a.fired_ms,
            "resolved_ms": a.resolved_ms,
            "event": a.event,
            "silenced_by": silences.iter().filter(|s| s.silences(&a.labels, now)).map(|s| s.id.clone()).collect::<Vec<_>>(),
            "told": a.told,
        })).collect::<Vec<_>>(),
        "rules": cfg.rules.iter().map(|r| json!({
            "name": r.name,
            "when": r.when.as_str(),
            "for_s": r.for_.as_secs(),
            "severity": r.severity,
            "receivers": if r.receivers.is_empty() { cfg.receivers.iter().map(|x| x.name.clone()).collect() } else { r.receivers.clone() },
            "group_by": r.group_by,
        })).collect::<Vec<_>>(),
        "receivers": cfg.receivers.iter().map(|r| json!({
            "name": r.name,
            "kind": r.kind.as_str(),
            "url": r.to.shown,
            "send_resolved": r.send_resolved,
        })).collect::<Vec<_>>(),
    }))
}

/// `POST /v1/alerts/test`: a test alert sent now to `receiver` (or every receiver), each
/// delivery audited; the outcome per receiver.
pub async fn test(plane: &Arc<Plane>, receiver: Option<&str>, by: &str) -> Result<Value, Refusal> {
    let cfg = &plane.alerts;
    let chosen: Vec<&config::Receiver> = match receiver {
        Some(name) => vec![cfg.receiver(name).ok_or_else(|| {
            Refusal::NotFound(format!(
                "no receiver `{name}` (fleetctl alerts list shows them; they are configured in the --alerts file)"
            ))
        })?],
        None => cfg.receivers.iter().collect(),
    };
    if chosen.is_empty() {
        return Err(Refusal::Precondition(
            "no receivers are configured: start fleetctl serve with --alerts FILE naming [[receiver]]s".into(),
        ));
    }
    let now = now_ms();
    let labels: BTreeMap<String, String> = [
        ("alertname", "fleetml_test".to_string()),
        ("severity", "none".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let alert = AlertRecord {
        key: engine::fingerprint(&labels),
        labels: labels.clone(),
        annotations: [(
            "summary".to_string(),
            format!("test notification from fleetctl alerts test, by {by}"),
        )]
        .into(),
        seen_ms: now,
        fired_ms: Some(now),
        resolved_ms: None,
        event: true,
        told: BTreeMap::new(),
    };
    let console = format!("{}/ui/", plane.public_url.trim_end_matches('/'));
    let group: BTreeMap<String, String> =
        [("alertname".to_string(), "fleetml_test".to_string())].into();
    let sends = chosen.iter().map(|r| {
        let sent = [receivers::Sent {
            alert: &alert,
            state: "firing",
        }];
        let (body, headers) = receivers::payload(r, &group, &sent, now, now + 300_000, &console);
        async move { receivers::send(r, body, &headers).await }
    });
    let outcomes = futures_util::future::join_all(sends).await;
    let mut out = Vec::new();
    for (r, outcome) in chosen.iter().zip(outcomes) {
        let (status, error) = match &outcome {
            Ok(s) => (*s, None),
            Err((s, e)) => (*s, Some(e.clone())),
        };
        let mut target = format!("{}: test notification", r.name);
        if let Some(e) = &error {
            target.push_str(&format!(": failed: {e}"));
        }
        let (p, action) = (plane.clone(), format!("NOTIFY {}", r.kind.as_str()));
        tokio::task::spawn_blocking(move || audit_delivery(&p, action, target, status))
            .await
            .map_err(|e| Refusal::Internal(e.to_string()))??;
        out.push(json!({
            "receiver": r.name,
            "kind": r.kind.as_str(),
            "delivered": error.is_none(),
            "status": status,
            "error": error,
        }));
    }
    Ok(json!({ "results": out }))
}

/// The longest silence accepted.
pub const MAX_SILENCE_MS: u64 = 30 * 24 * 3_600_000;

/// `POST /v1/alerts/silences`: a silence of the alerts matching every matcher, from now
/// for `duration_ms`.
pub fn silence(
    plane: &Plane,
    matchers: BTreeMap<String, String>,
    duration_ms: u64,
    comment: String,
    by: String,
) -> Result<Silence, Refusal> {
    if matchers.is_empty() {
        return Err(Refusal::Unprocessable(
            "a silence needs at least one matcher (LABEL=VALUE, e.g. device=pi-a or alertname=device_silent)"
                .into(),
        ));
    }
    if let Some(bad) = matchers
        .keys()
        .find(|k| k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(Refusal::Unprocessable(format!(
            "`{bad}` is not a label name (letters, digits and `_`)"
        )));
    }
    if duration_ms == 0 || duration_ms > MAX_SILENCE_MS {
        return Err(Refusal::Unprocessable(
            "a silence lasts more than nothing and at most 30 days".into(),
        ));
    }
    let now = now_ms();
    let id =
        hex::encode(crate::plane::random_bytes(8).map_err(|e| Refusal::Internal(e.to_string()))?);
    let s = Silence {
        id,
        matchers,
        starts_ms: now,
        ends_ms: now + duration_ms,
        by,
        comment,
    };
    plane.alert_store.put_silence(&s)?;
    Ok(s)
}

/// The silences that have not ended.
pub fn silences(plane: &Plane) -> Result<Vec<Silence>, Refusal> {
    let now = now_ms();
    Ok(plane
        .alert_store
        .silences()?
        .into_iter()
        .filter(|s| s.ends_ms > now)
        .collect())
}

/// `DELETE /v1/alerts/silences/{id}`: ends it.
pub fn expire(plane: &Plane, id: &str) -> Result<(), Refusal> {
    if plane.alert_store.remove_silence(id)? {
        Ok(())
    } else {
        Err(Refusal::NotFound(format!(
            "no silence `{id}` (fleetctl alerts silences lists them)"
        )))
    }
}
