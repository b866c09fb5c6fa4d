//! The drift policy's decisions, without I/O and without a clock: what the policy sees
//! of the fleet and of its jobs at `now` goes in ([`Seen`]), what to do comes out
//! ([`Action`]), and the policy's state changes in place. `policy::tick` gathers what
//! is seen, carries the actions out, and reports how each went back ([`started`],
//! [`finished`]).

use std::collections::BTreeMap;

use super::{Policy, PolicyState};
use crate::jobs::JobState;

/// Events kept in a policy's state.
pub const EVENTS_KEPT: usize = 50;

/// What one policy sees at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    /// Online devices running the model.
    pub running: usize,
    /// How many of them hold a drift alert on it (a feature or the prediction).
    pub alerting: usize,
    /// The jobs the policy started and has not handled yet, as they are now; a job
    /// missing here is gone from the job store.
    pub jobs: BTreeMap<String, JobNow>,
}

/// A job as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum JobNow {
    Running,
    /// Ended (`state` is final), with the candidate it registered.
    Finished {
        state: JobState,
        candidate: Option<(String, u64)>,
    },
}

/// What the policy wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A job it started ended: audit `outcome` (200 or 500); `text` is the event to
    /// record, once the candidate (if `promote`) has been compared with production.
    Finished {
        job: String,
        outcome: u16,
        text: String,
        promote: Option<(String, u64)>,
    },
    /// Start a training job, because `why`.
    Start { why: String },
}

/// Decides, for `policy` in `state`, given what is `seen` at `now_ms`.
pub fn decide(policy: &Policy, state: &mut PolicyState, seen: &Seen, now_ms: u64) -> Vec<Action> {
    let mut actions = Vec::new();
    if !policy.enabled {
        return actions;
    }
    for (job, handled) in state.jobs.iter_mut().filter(|(_, h)| !*h) {
        match seen.jobs.get(job) {
            Some(JobNow::Running) => {}
            None => *handled = true,
            Some(JobNow::Finished { state, candidate }) => {
                *handled = true;
                let mut text = format!("job {job} {state:?}").to_lowercase();
                if let Some((name, version)) = candidate {
                    text.push_str(&format!(": candidate {name}@v{version}"));
                }
                actions.push(Action::Finished {
                    job: job.clone(),
                    outcome: if *state == JobState::Succeeded {
                        200
                    } else {
                        500
                    },
                    text,
                    promote: candidate.clone().filter(|_| policy.auto_promote),
                });
            }
        }
    }
    let share = if seen.running > 0 {
        seen.alerting as f64 / seen.running as f64
    } else {
        0.0
    };
    state.last_share = share;
    if seen.running == 0 || share < policy.drift_share {
        state.breach_since_ms = None;
        return actions;
    }
    let since = *state.breach_since_ms.get_or_insert(now_ms);
    let active = state
        .jobs
        .iter()
        .filter(|(job, _)| seen.jobs.get(job) == Some(&JobNow::Running))
        .count();
    let cooled = state
        .last_trigger_ms
        .is_none_or(|t| now_ms >= t.saturating_add(policy.cooldown_s * 1000));
    if now_ms >= since.saturating_add(policy.for_s * 1000) && active < policy.max_jobs && cooled {
        state.last_trigger_ms = Some(now_ms);
        actions.push(Action::Start {
            why: format!(
                "drift policy of {}: {} of {} devices ({:.0}%) alerting for {} s",
                policy.model,
                seen.alerting,
                seen.running,
                share * 100.0,
                (now_ms - since) / 1000
            ),
        });
    }
    actions
}

/// Records how an [`Action::Start`] went: the job it started, or why none could start.
pub fn started(state: &mut PolicyState, now_ms: u64, why: &str, job: Result<String, String>) {
    match job {
        Ok(job) => {
            state.jobs.push((job.clone(), false));
            note(state, now_ms, format!("{why}: started job {job}"));
        }
        Err(e) => note(state, now_ms, format!("{why}: could not start a job: {e}")),
    }
}

/// Records how an [`Action::Finished`] went: its `text`, and what promoting said.
pub fn finished(state: &mut PolicyState, now_ms: u64, text: String) {
    note(state, now_ms, text);
}

/// Keeps `text` as the newest event (at most [`EVENTS_KEPT`]).
fn note(state: &mut PolicyState, now_ms: u64, text: String) {
    state.events.push((now_ms, text));
    if state.events.len() > EVENTS_KEPT {
        let over = state.events.len() - EVENTS_KEPT;
        state.events.drain(..over);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn policy() -> Policy {
        Policy {
            shadow_first: false,
            model: "claims".into(),
            drift_share: 0.5,
            for_s: 600,
            datasets: vec![],
            captured_since_s: 86_400,
            cooldown_s: 3600,
            max_jobs: 1,
            auto_promote: false,
            holdout: None,
            label: None,
            margin: 0.01,
            canary_pct: 5,
            enabled: true,
            spec: None,
        }
    }

    fn seen(running: usize, alerting: usize, jobs: &[(&str, JobNow)]) -> Seen {
        Seen {
            running,
            alerting,
            jobs: jobs
                .iter()
                .map(|(j, s)| (j.to_string(), s.clone()))
                .collect(),
        }
    }

    fn starts(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Start { .. }))
            .count()
    }

    /// Simulated time, one row per tick: (minute, running, alerting, jobs seen, starts
    /// expected, breach_since expected in minutes).
    #[test]
    fn a_breach_must_hold_for_its_duration_then_cool_down() {
        type Row<'a> = (
            u64,
            usize,
            usize,
            &'a [(&'a str, JobNow)],
            usize,
            Option<u64>,
        );
        let running = [("j1", JobNow::Running)];
        let done = [(
            "j1",
            JobNow::Finished {
                state: JobState::Succeeded,
                candidate: None,
            },
        )];
        let table: &[Row<'_>] = &[
            (0, 10, 4, &[], 0, None),          // 40 % < 50 %: nothing
            (1, 10, 5, &[], 0, Some(1)),       // breach starts
            (5, 10, 6, &[], 0, Some(1)),       // held 4 min < 10
            (8, 10, 2, &[], 0, None),          // recovered: the clock resets
            (9, 10, 5, &[], 0, Some(9)),       // breach again
            (19, 10, 5, &[], 1, Some(9)),      // held 10 min: start
            (20, 10, 5, &running, 0, Some(9)), // a job runs: max_jobs 1
            (40, 10, 5, &done, 0, Some(9)),    // done, but cooling down (1 h)
            (79, 10, 5, &[], 1, Some(9)),      // cooled: start again
            (80, 0, 0, &[], 0, None),          // no device runs it: no breach
        ];
        let p = policy();
        let mut state = PolicyState::default();
        for (minute, r, a, jobs, want_starts, want_since) in table {
            let actions = decide(&p, &mut state, &seen(*r, *a, jobs), minute * MIN);
            assert_eq!(
                starts(&actions),
                *want_starts,
                "minute {minute}: {actions:?}"
            );
            assert_eq!(
                state.breach_since_ms,
                want_since.map(|m| m * MIN),
                "minute {minute}"
            );
            for action in actions {
                if let Action::Start { why } = action {
                    assert!(why.contains(&format!("{a} of {r} devices")), "{why}");
                    started(&mut state, minute * MIN, &why, Ok("j1".into()));
                }
            }
        }
        assert_eq!(state.last_trigger_ms, Some(79 * MIN));
        assert_eq!(state.jobs.len(), 2);
    }

    #[test]
    fn a_finished_job_is_reported_once_and_promoted_only_when_asked() {
        let finished_job = JobNow::Finished {
            state: JobState::Succeeded,
            candidate: Some(("claims".into(), 7)),
        };
        for auto_promote in [false, true] {
            let p = Policy {
                auto_promote,
                ..policy()
            };
            let mut state = PolicyState {
                jobs: vec![
                    ("j1".into(), false),
                    ("j0".into(), true),
                    ("gone".into(), false),
                ],
                ..PolicyState::default()
            };
            let s = seen(0, 0, &[("j1", finished_job.clone())]);
            let actions = decide(&p, &mut state, &s, MIN);
            assert_eq!(
                actions,
                [Action::Finished {
                    job: "j1".into(),
                    outcome: 200,
                    text: "job j1 succeeded: candidate claims@v7".into(),
                    promote: auto_promote.then(|| ("claims".to_string(), 7)),
                }]
            );
            assert!(state.jobs.iter().all(|(_, handled)| *handled), "{state:?}");
            assert_eq!(decide(&p, &mut state, &s, 2 * MIN), [], "once");
        }
    }

    #[test]
    fn a_failed_job_audits_500_and_a_failed_start_still_cools_down() {
        let p = policy();
        let mut state = PolicyState {
            jobs: vec![("j1".into(), false)],
            ..PolicyState::default()
        };
        let failed = JobNow::Finished {
            state: JobState::Failed,
            candidate: None,
        };
        let actions = decide(&p, &mut state, &seen(4, 4, &[("j1", failed)]), 0);
        assert!(
            matches!(&actions[..], [Action::Finished { outcome: 500, .. }]),
            "{actions:?}"
        );
        let actions = decide(&p, &mut state, &seen(4, 4, &[]), 10 * MIN);
        let [Action::Start { why }] = &actions[..] else {
            panic!("{actions:?}")
        };
        started(&mut state, 10 * MIN, why, Err("no job spec".into()));
        assert!(
            state.events[0]
                .1
                .ends_with("could not start a job: no job spec")
        );
        assert_eq!(decide(&p, &mut state, &seen(4, 4, &[]), 11 * MIN), []);
    }

    #[test]
    fn a_disabled_policy_does_nothing_and_events_stay_bounded() {
        let p = Policy {
            enabled: false,
            ..policy()
        };
        let mut state = PolicyState::default();
        assert_eq!(decide(&p, &mut state, &seen(10, 10, &[]), 100 * MIN), []);
        assert_eq!(state, PolicyState::default());
        for i in 0..(EVENTS_KEPT as u64 + 7) {
            finished(&mut state, i, format!("event {i}"));
        }
        assert_eq!(state.events.len(), EVENTS_KEPT);
        assert_eq!(state.events[0].1, "event 7");
    }
}
