//! What the notifier decides, with no I/O and no clock: which alerts fire, stay, resolve
//! or are forgotten ([`evaluate`]), which notifications are due to which receiver, grouped
//! ([`due`]), and what a delivery's outcome changes ([`delivered`]). The time comes in
//! as milliseconds; the alerts (`book`) are the records the store keeps, so a restarted
//! or newly elected notifier goes on where the last one stopped and tells nobody twice.

use std::collections::{BTreeMap, BTreeSet};

use super::config::{Receiver, ReceiverKind, Rule};
use crate::records::{AlertRecord, Silence, Told};

/// A condition seen true now, by the rule at index `rule`.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub rule: usize,
    /// What it is about (device, model, rollout…); `alertname` and `severity` are added.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// For an event: when it happened.
    pub event_ms: Option<u64>,
}

/// The alert's state word: `pending`, `firing` or `resolved`.
pub fn state_of(a: &AlertRecord) -> &'static str {
    match (a.fired_ms, a.resolved_ms) {
        (None, _) => "pending",
        (Some(_), None) => "firing",
        (Some(_), Some(_)) => "resolved",
    }
}

/// The alerts, by key.
pub type Book = BTreeMap<String, AlertRecord>;

/// The alert's fingerprint: hex of the first 8 bytes of SHA-256 over its labels.
pub fn fingerprint(labels: &BTreeMap<String, String>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (k, v) in labels {
        ctx.update(k.as_bytes());
        ctx.update(&[0]);
        ctx.update(v.as_bytes());
        ctx.update(&[0]);
    }
    hex::encode(&ctx.finish().as_ref()[..8])
}

/// The labels of an alert `seen` raises under `rule`.
pub fn labels_of(rule: &Rule, seen: &Seen) -> BTreeMap<String, String> {
    let mut labels = seen.labels.clone();
    labels.insert("alertname".into(), rule.name.clone());
    labels.insert("severity".into(), rule.severity.clone());
    labels
}

/// What [`evaluate`] changed: keys written, keys removed.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub changed: BTreeSet<String>,
    pub removed: Vec<String>,
}

/// Brings `book` up to date with what is `seen` at `now`: new conditions are pending
/// (or fire at once with no `for`), pending ones fire once they held for the rule's
/// `for`, firing ones whose condition is gone resolve, and a resolved one that comes
/// back starts a new episode. Pending alerts whose condition cleared are forgotten,
/// resolved ones `keep_resolved_ms` after they resolved, events once their condition
/// no longer reports them.
pub fn evaluate(
    rules: &[Rule],
    seen: &[Seen],
    book: &mut Book,
    now: u64,
    keep_resolved_ms: u64,
) -> Changes {
    let mut changes = Changes::default();
    let mut present = BTreeSet::new();
    for s in seen {
        let Some(rule) = rules.get(s.rule) else {
            continue;
        };
        let labels = labels_of(rule, s);
        let key = fingerprint(&labels);
        present.insert(key.clone());
        let for_ms = rule.for_.as_millis() as u64;
        match book.get_mut(&key) {
            Some(a) if a.event => {}
            Some(a) => {
                let mut changed = false;
                if a.resolved_ms.is_some() {
                    a.seen_ms = now;
                    a.fired_ms = None;
                    a.resolved_ms = None;
                    changed = true;
                }
                if a.annotations != s.annotations {
                    a.annotations = s.annotations.clone();
                    changed = true;
                }
                if a.fired_ms.is_none() && now >= a.seen_ms.saturating_add(for_ms) {
                    a.fired_ms = Some(now);
                    changed = true;
                }
                if changed {
                    changes.changed.insert(key);
                }
            }
            None => {
                let event = s.event_ms.is_some();
                book.insert(
                    key.clone(),
                    AlertRecord {
                        key: key.clone(),
                        labels,
                        annotations: s.annotations.clone(),
                        seen_ms: s.event_ms.unwrap_or(now),
                        fired_ms: (event || for_ms == 0).then_some(now),
                        resolved_ms: None,
                        event,
                        told: BTreeMap::new(),
                    },
                );
                changes.changed.insert(key);
            }
        }
    }
    for (key, a) in book.iter_mut() {
        if present.contains(key) {
            continue;
        }
        match (a.event, a.fired_ms, a.resolved_ms) {
            (true, _, _) | (false, None, _) => changes.removed.push(key.clone()),
            (false, Some(_), None) => {
                a.resolved_ms = Some(now);
                changes.changed.insert(key.clone());
            }
            (false, Some(_), Some(at)) if now >= at.saturating_add(keep_resolved_ms) => {
                changes.removed.push(key.clone())
            }
            _ => {}
        }
    }
    for key in &changes.removed {
        book.remove(key);
        changes.changed.remove(key);
    }
    changes
}

/// One notification: alerts of one group, to one receiver.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub receiver: String,
    /// `alertname` and the rule's `group_by` labels, as the alerts carry them.
    pub group: BTreeMap<String, String>,
    /// Each alert's key and the state it is sent in (`firing` or `resolved`).
    pub alerts: Vec<(String, &'static str)>,
    /// Only re-posts of what the receiver was already told (Alertmanager's keep-alive).
    pub resend: bool,
}

/// The notifications due at `now`: per receiver of each alert's rule, what it was not yet
/// told (fired, or resolved after it was told it fired — unless it takes no resolved
/// notices), unless a silence matches the alert or the last failure's back-off has not
/// run out; and, to Alertmanager, firing alerts again every `resend_ms`. Grouped by
/// receiver, `alertname` and the rule's `group_by` labels.
pub fn due(
    rules: &[Rule],
    receivers: &[Receiver],
    book: &Book,
    silences: &[Silence],
    now: u64,
    resend_ms: u64,
) -> Vec<Notification> {
    let mut groups: BTreeMap<(String, Vec<(String, String)>), Notification> = BTreeMap::new();
    for a in book.values() {
        let Some(rule) = a
            .labels
            .get("alertname")
            .and_then(|n| rules.iter().find(|r| &r.name == n))
        else {
            continue;
        };
        if a.fired_ms.is_none() || silences.iter().any(|s| s.silences(&a.labels, now)) {
            continue;
        }
        let resolved = a.resolved_ms.is_some();
        for r in receivers
            .iter()
            .filter(|r| rule.receivers.is_empty() || rule.receivers.contains(&r.name))
        {
            let told = a.told.get(&r.name);
            if told.is_some_and(|t| t.retry_ms > now) {
                continue;
            }
            let last = told.and_then(|t| t.state.as_deref());
            let (state, resend) = match (resolved, last) {
                (false, Some("firing")) => {
                    let again = r.kind == ReceiverKind::Alertmanager
                        && !a.event
                        && told.is_some_and(|t| now >= t.at_ms.saturating_add(resend_ms));
                    if !again {
                        continue;
                    }
                    ("firing", true)
                }
                (false, _) => ("firing", false),
                (true, Some("firing")) if r.send_resolved && !a.event => ("resolved", false),
                (true, _) => continue,
            };
            let mut group = vec![("alertname".to_string(), rule.name.clone())];
            for g in &rule.group_by {
                if let Some(v) = a.labels.get(g) {
                    group.push((g.clone(), v.clone()));
                }
            }
            let n = groups
                .entry((r.name.clone(), group.clone()))
                .or_insert_with(|| Notification {
                    receiver: r.name.clone(),
                    group: group.into_iter().collect(),
                    alerts: Vec::new(),
                    resend: true,
                });
            n.alerts.push((a.key.clone(), state));
            n.resend &= resend;
        }
    }
    let mut out: Vec<Notification> = groups.into_values().collect();
    // Within a group, in the order of their labels (device a before device b).
    for n in &mut out {
        n.alerts.sort_by(|(a, _), (b, _)| {
            book.get(a)
                .map(|x| &x.labels)
                .cmp(&book.get(b).map(|x| &x.labels))
        });
    }
    out
}

/// The wait before attempt `attempts + 1` after `attempts` failures: one second,
/// doubling, at most `max_ms`.
pub fn backoff_ms(attempts: u32, max_ms: u64) -> u64 {
    1000u64
        .saturating_mul(1 << attempts.saturating_sub(1).min(30))
        .min(max_ms)
}

/// Records the outcome of delivering `n` at `now` in the alerts it carried; the keys
/// changed.
pub fn delivered(
    book: &mut Book,
    n: &Notification,
    now: u64,
    outcome: Result<(), String>,
    retry_max_ms: u64,
) -> Vec<String> {
    let mut changed = Vec::new();
    for (key, state) in &n.alerts {
        let Some(a) = book.get_mut(key) else {
            continue;
        };
        let told = a.told.entry(n.receiver.clone()).or_default();
        match &outcome {
            Ok(()) => {
                *told = Told {
                    state: Some(state.to_string()),
                    at_ms: now,
                    ..Told::default()
                }
            }
            Err(e) => {
                told.attempts = told.attempts.saturating_add(1);
                told.retry_ms = now.saturating_add(backoff_ms(told.attempts, retry_max_ms));
                told.error = Some(e.clone());
            }
        }
        changed.push(key.clone());
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::super::config::{Config, When, builtin_rules};
    use super::*;

    fn seen(rule: usize, device: &str) -> Seen {
        Seen {
            rule,
            labels: [("device".to_string(), device.to_string())].into(),
            annotations: BTreeMap::new(),
            event_ms: None,
        }
    }

    fn silent_rule(for_s: u64) -> Vec<Rule> {
        vec![Rule {
            name: "device_silent".into(),
            when: When::DeviceSilent {
                after: std::time::Duration::from_secs(2),
            },
            for_: std::time::Duration::from_secs(for_s),
            severity: "warning".into(),
            receivers: Vec::new(),
            group_by: vec!["board".into()],
        }]
    }

    fn receivers() -> Vec<Receiver> {
        Config::parse(
            "[[receiver]]\nname = \"am\"\nkind = \"alertmanager\"\nurl = \"http://127.0.0.1:9093\"\n\
             [[receiver]]\nname = \"quiet\"\nkind = \"alertmanager\"\nurl = \"http://127.0.0.1:9094\"\nsend_resolved = false\n",
            std::path::Path::new("."),
        )
        .expect("config")
        .receivers
    }

    fn ok(book: &mut Book, ns: &[Notification], now: u64) {
        for n in ns {
            delivered(book, n, now, Ok(()), 60_000);
        }
    }

    #[test]
    fn an_alert_waits_for_its_for_then_fires_once_and_resolves_once() {
        let rules = silent_rule(5);
        let rs = receivers();
        let mut book = Book::new();
        let c = evaluate(&rules, &[seen(0, "a")], &mut book, 1_000, 3_600_000);
        assert_eq!(c.changed.len(), 1);
        assert!(
            due(&rules, &rs, &book, &[], 1_000, 60_000).is_empty(),
            "pending"
        );
        evaluate(&rules, &[seen(0, "a")], &mut book, 6_000, 3_600_000);
        let n = due(&rules, &rs, &book, &[], 6_000, 60_000);
        assert_eq!(n.len(), 2, "one per receiver: {n:?}");
        assert_eq!(n[0].alerts[0].1, "firing");
        ok(&mut book, &n, 6_000);
        // Seen again: nothing new is due (de-duplicated) until Alertmanager's resend.
        evaluate(&rules, &[seen(0, "a")], &mut book, 7_000, 3_600_000);
        assert!(due(&rules, &rs, &book, &[], 7_000, 60_000).is_empty());
        let again = due(&rules, &rs, &book, &[], 66_000, 60_000);
        assert!(again.iter().all(|n| n.resend), "{again:?}");
        // Cleared: resolved to the receiver that takes resolved notices only.
        let c = evaluate(&rules, &[], &mut book, 8_000, 3_600_000);
        assert_eq!(c.changed.len(), 1);
        let n = due(&rules, &rs, &book, &[], 8_000, 60_000);
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(
            (n[0].receiver.as_str(), n[0].alerts[0].1),
            ("am", "resolved")
        );
        ok(&mut book, &n, 8_000);
        assert!(due(&rules, &rs, &book, &[], 9_000, 60_000).is_empty());
        // Forgotten after keep_resolved.
        let c = evaluate(&rules, &[], &mut book, 8_000 + 3_600_000, 3_600_000);
        assert_eq!(c.removed.len(), 1);
        assert!(book.is_empty());
    }

    #[test]
    fn a_pending_alert_that_clears_is_never_sent() {
        let rules = silent_rule(60);
        let mut book = Book::new();
        evaluate(&rules, &[seen(0, "a")], &mut book, 0, 1);
        let c = evaluate(&rules, &[], &mut book, 1_000, 1);
        assert_eq!(c.removed.len(), 1);
        assert!(due(&rules, &receivers(), &book, &[], 1_000, 60_000).is_empty());
    }

    #[test]
    fn alerts_group_by_rule_and_labels_and_silences_hold_them_back() {
        let rules = silent_rule(0);
        let rs = &receivers()[..1];
        let mut book = Book::new();
        let on = |d: &str, board: &str| {
            let mut s = seen(0, d);
            s.labels.insert("board".into(), board.into());
            s
        };
        let all = [on("a", "pi"), on("b", "pi"), on("c", "jetson")];
        evaluate(&rules, &all, &mut book, 0, 1);
        let n = due(&rules, rs, &book, &[], 0, 60_000);
        assert_eq!(n.len(), 2, "two boards, two groups: {n:?}");
        let sizes: Vec<usize> = n.iter().map(|n| n.alerts.len()).collect();
        assert_eq!(sizes, vec![1, 2]);
        assert_eq!(n[1].group["board"], "pi");

        let silence = Silence {
            id: "s".into(),
            matchers: [("board".to_string(), "pi".to_string())].into(),
            starts_ms: 0,
            ends_ms: 10_000,
            by: "t".into(),
            comment: String::new(),
        };
        let n = due(
            &rules,
            rs,
            &book,
            std::slice::from_ref(&silence),
            5_000,
            60_000,
        );
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].group["board"], "jetson");
        // The silence over, what it held back goes out.
        let n = due(&rules, rs, &book, &[silence], 10_000, 60_000);
        assert_eq!(n.len(), 2);
    }

    #[test]
    fn a_failed_delivery_is_retried_with_back_off_and_then_sent_once() {
        let rules = silent_rule(0);
        let rs = &receivers()[..1];
        let mut book = Book::new();
        evaluate(&rules, &[seen(0, "a")], &mut book, 0, 1);
        let n = due(&rules, rs, &book, &[], 0, 60_000);
        delivered(&mut book, &n[0], 0, Err("refused".into()), 4_000);
        assert!(
            due(&rules, rs, &book, &[], 999, 60_000).is_empty(),
            "backing off"
        );
        let n = due(&rules, rs, &book, &[], 1_000, 60_000);
        delivered(&mut book, &n[0], 1_000, Err("refused".into()), 4_000);
        assert!(due(&rules, rs, &book, &[], 2_999, 60_000).is_empty());
        let n = due(&rules, rs, &book, &[], 3_000, 60_000);
        assert!(!n[0].resend);
        delivered(&mut book, &n[0], 3_000, Ok(()), 4_000);
        let t = &book.values().next().expect("alert").told["am"];
        assert_eq!(
            (t.state.as_deref(), t.attempts, t.error.as_ref()),
            (Some("firing"), 0, None)
        );
        assert!(due(&rules, rs, &book, &[], 4_000, 60_000).is_empty());
        assert_eq!(backoff_ms(1, 300_000), 1_000);
        assert_eq!(backoff_ms(5, 300_000), 16_000);
        assert_eq!(backoff_ms(40, 300_000), 300_000);
    }

    #[test]
    fn an_event_fires_once_and_never_resolves() {
        let rules = builtin_rules();
        let done = rules
            .iter()
            .position(|r| r.name == "rollout_completed")
            .expect("rule");
        let rs = &receivers()[..1];
        let mut book = Book::new();
        let mut s = seen(done, "x");
        s.event_ms = Some(500);
        evaluate(&rules, std::slice::from_ref(&s), &mut book, 1_000, 1);
        let n = due(&rules, rs, &book, &[], 1_000, 60_000);
        assert_eq!(n[0].alerts[0].1, "firing");
        ok(&mut book, &n, 1_000);
        evaluate(&rules, &[s], &mut book, 200_000, 1);
        assert!(
            due(&rules, rs, &book, &[], 200_000, 60_000).is_empty(),
            "no resend"
        );
        let c = evaluate(&rules, &[], &mut book, 300_000, 1);
        assert_eq!(
            c.removed.len(),
            1,
            "gone once its condition stops reporting it"
        );
    }

    #[test]
    fn a_resolved_alert_that_returns_fires_again() {
        let rules = silent_rule(0);
        let rs = &receivers()[..1];
        let mut book = Book::new();
        evaluate(&rules, &[seen(0, "a")], &mut book, 0, 10_000);
        let n = due(&rules, rs, &book, &[], 0, 60_000);
        ok(&mut book, &n, 0);
        evaluate(&rules, &[], &mut book, 1_000, 10_000);
        let n = due(&rules, rs, &book, &[], 1_000, 60_000);
        ok(&mut book, &n, 1_000);
        evaluate(&rules, &[seen(0, "a")], &mut book, 2_000, 10_000);
        let n = due(&rules, rs, &book, &[], 2_000, 60_000);
        assert_eq!(n[0].alerts[0].1, "firing");
        assert_eq!(book.values().next().expect("a").seen_ms, 2_000);
    }

    #[test]
    fn fingerprints_depend_on_every_label() {
        let a: BTreeMap<String, String> = [("a".to_string(), "b".to_string())].into();
        let b: BTreeMap<String, String> = [("ab".to_string(), String::new())].into();
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 16);
    }
}
