//! Which conditions the rules see true in a [`Snapshot`] of the fleet at a given time:
//! pure, so each rule is tested on made-up fleets.

use std::collections::BTreeMap;

use super::config::{Rule, When};
use super::engine::Seen;
use crate::rollout::State;
use crate::snapshot::Snapshot;

/// How long after it happened an event (a rollout that completed or rolled back, a job
/// that finished) is still notified: an event older than this when the notifier first
/// sees it (it was down, or alerts were just configured) is not sent.
pub const EVENT_HORIZON_MS: u64 = 3_600_000;

/// Alert subjects a device reports that are not drift: they have rules of their own
/// (missing predictions) or are about the device's queueing (lag).
pub(crate) const NOT_DRIFT: &[&str] = &["missing_predictions", "lag"];

fn map<const N: usize>(pairs: [(&str, String); N]) -> BTreeMap<String, String> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Every condition the `rules` see true in `snap` at `now_ms`.
pub fn seen(rules: &[Rule], snap: &Snapshot, now_ms: u64) -> Vec<Seen> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let mut push = |labels, annotations, event_ms| {
            out.push(Seen {
                rule: i,
                labels,
                annotations,
                event_ms,
            })
        };
        match &rule.when {
            When::DriftAlert | When::MissingPredictions { .. } => {
                for (d, st) in &snap.devices {
                    let board = d.board.clone().unwrap_or_else(|| "unknown".into());
                    let models: std::collections::BTreeSet<&String> =
                        st.alerts.keys().chain(st.windows.keys()).collect();
                    for model in models {
                        let window = st.windows.get(model).map(|(_, w)| w);
                        let version = window.map(|w| w.version.to_string()).unwrap_or_default();
                        let (firing, detail) = match &rule.when {
                            When::DriftAlert => {
                                let subjects: Vec<&str> = st
                                    .alerts
                                    .get(model)
                                    .into_iter()
                                    .flatten()
                                    .map(String::as_str)
                                    .filter(|s| !NOT_DRIFT.contains(s))
                                    .collect();
                                (
                                    !subjects.is_empty(),
                                    format!("drifting: {}", subjects.join(", ")),
                                )
                            }
                            When::MissingPredictions { above } => {
                                let rate = window.map_or(0.0, |w| w.missing_prediction_rate);
                                let firing = match above {
                                    Some(limit) => rate > *limit,
                                    None => st
                                        .alerts
                                        .get(model)
                                        .is_some_and(|s| s.contains("missing_predictions")),
                                };
                                (
                                    firing,
                                    format!("missing-prediction rate {:.1}%", rate * 100.0),
                                )
                            }
                            _ => unreachable!("matched above"),
                        };
                        if firing {
                            push(
                                map([
                                    ("device", d.id.to_string()),
                                    ("model", model.clone()),
                                    ("board", board.clone()),
                                ]),
                                map([
                                    ("summary", format!("{} on {}: {detail}", model, d.id)),
                                    ("version", version),
                                ]),
                                None,
                            );
                        }
                    }
                }
            }
            When::DeviceSilent { after } => {
                let after = after.as_millis() as u64;
                for (d, st) in &snap.devices {
                    // A device never heard from has not gone silent: it never started.
                    let Some(last) = st.last_seen_ms else {
                        continue;
                    };
                    if now_ms >= last.saturating_add(after) {
                        let board = d.board.clone().unwrap_or_else(|| "unknown".into());
                        push(
                            map([("device", d.id.to_string()), ("board", board)]),
                            map([(
                                "summary",
                                format!(
                                    "{} silent for {}",
                                    d.id,
                                    humantime::format_duration(std::time::Duration::from_secs(
                                        (now_ms - last) / 1000
                                    ))
                                ),
                            )]),
                            None,
                        );
                    }
                }
            }
            When::RolloutPaused | When::RolloutRolledBack | When::RolloutCompleted => {
                for r in &snap.rollouts {
                    let (wanted, event) = match rule.when {
                        When::RolloutPaused => (State::Paused, false),
                        When::RolloutRolledBack => (State::RolledBack, true),
                        _ => (State::Completed, true),
                    };
                    if r.state != wanted
                        || (event && now_ms > r.updated_ms.saturating_add(EVENT_HORIZON_MS))
                    {
                        continue;
                    }
                    let version = r.version.map(|v| v.to_string()).unwrap_or_default();
                    let what = match wanted {
                        State::Paused => "paused",
                        State::RolledBack => "rolled back",
                        _ => "completed",
                    };
                    let mut summary = format!(
                        "{} {} of {}@{} {what}",
                        r.kind.as_str(),
                        r.id,
                        r.model,
                        if version.is_empty() {
                            "previous"
                        } else {
                            &version
                        }
                    );
                    if let Some(reason) = &r.reason {
                        summary.push_str(": ");
                        summary.push_str(reason);
                    }
                    push(
                        map([
                            ("rollout", r.id.clone()),
                            ("model", r.model.clone()),
                            ("kind", r.kind.as_str().to_string()),
                        ]),
                        map([("summary", summary), ("version", version)]),
                        event.then_some(r.updated_ms),
                    );
                }
            }
            When::JobFinished { policy_only } => {
                for j in &snap.jobs {
                    let Some(done) = j.finished_ms else {
                        continue;
                    };
                    let by_policy = j.trigger.starts_with("drift policy");
                    if !j.state.is_final()
                        || (*policy_only && !by_policy)
                        || now_ms > done.saturating_add(EVENT_HORIZON_MS)
                    {
                        continue;
                    }
                    let state = format!("{:?}", j.state).to_lowercase();
                    let mut summary = format!("{} job {} for {} {state}", j.kind, j.id, j.model);
                    if let Some((name, version, _)) = &j.candidate {
                        summary.push_str(&format!(": candidate {name}@{version}"));
                    }
                    if let Some(e) = &j.error {
                        summary.push_str(&format!(": {e}"));
                    }
                    push(
                        map([
                            ("job", j.id.clone()),
                            ("model", j.model.clone()),
                            ("state", state),
                        ]),
                        map([("summary", summary), ("trigger", j.trigger.clone())]),
                        Some(done),
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::config::builtin_rules;
    use super::*;
    use crate::records::{DeviceRecord, DeviceState};
    use fleetml_protocol::telemetry::DeviceId;

    fn device(id: &str, last_seen_ms: Option<u64>) -> (DeviceRecord, DeviceState) {
        (
            DeviceRecord {
                id: DeviceId::new(id).expect("id"),
                board: Some("rpi4".into()),
                tags: Default::default(),
                secret: vec![1; 32],
                enrolled_ms: 0,
                revoked_ms: None,
            },
            DeviceState {
                last_seen_ms,
                ..Default::default()
            },
        )
    }

    fn names(rules: &[Rule], seen: &[Seen]) -> Vec<(String, String)> {
        seen.iter()
            .map(|s| {
                (
                    rules[s.rule].name.clone(),
                    s.labels.get("device").cloned().unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn drift_and_silence_are_seen_per_device_and_lag_is_not_drift() {
        let rules = builtin_rules();
        let mut a = device("a", Some(0));
        a.1.alerts
            .insert("claims".into(), ["age".to_string()].into());
        let mut b = device("b", Some(900_000));
        b.1.alerts.insert(
            "claims".into(),
            ["lag".to_string(), "missing_predictions".to_string()].into(),
        );
        let never = device("c", None);
        let snap = Snapshot {
            devices: vec![a, b, never],
            ..Default::default()
        };
        let seen = seen(&rules, &snap, 1_000_000);
        assert_eq!(
            names(&rules, &seen),
            vec![
                ("drift_alert".to_string(), "a".to_string()),
                ("missing_predictions".to_string(), "b".to_string()),
                ("device_silent".to_string(), "a".to_string()),
            ]
        );
        assert_eq!(seen[0].labels["board"], "rpi4");
        assert!(seen[0].annotations["summary"].contains("drifting: age"));
    }
}
