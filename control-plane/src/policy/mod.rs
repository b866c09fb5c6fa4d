//! Drift-triggered retraining and champion/challenger promotion.
//!
//! A policy per model (`fleetctl models policy set NAME …`) says: when at least
//! `drift_share` of the devices running the model have held a drift alert (a feature or
//! the prediction, not lag or missing predictions) for `for_s` seconds, start a training
//! job with the model's job spec on `datasets` plus the labelled rows captured in the
//! last `captured_since_s`; at most `max_jobs` at once, and not again within
//! `cooldown_s`. When the job registers a candidate and `auto_promote` is on, the
//! candidate is compared with the production version on `holdout`; if it wins by
//! `margin`, a canary rollout (`canary_pct`, auto-rollback) starts. The trigger, the
//! job's outcome and the promotion are audit entries (who = `policy:NAME`) and log
//! lines.
//!
//! The decisions are [`engine::decide`]'s, with no I/O and no clock; this module keeps
//! the policies, serves their API and runs the engine every two seconds.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::plane::{Plane, now_ms};
use crate::refusal::Refusal;
use crate::store::FleetStore;

pub mod engine;

pub use crate::records::{Policy, PolicyState};

fn is_drift(subject: &str) -> bool {
    !matches!(subject, "lag" | "missing_predictions")
}

/// Devices running `model`, and how many of them hold a drift alert on it.
pub fn drift_share(plane: &Plane, model: &str) -> Result<(usize, usize), crate::store::StoreError> {
    let (mut running, mut alerting) = (0, 0);
    for d in plane.ingest.store.devices()? {
        let Some(st) = plane.ingest.store.state(&d.id)? else {
            continue;
        };
        let runs = st
            .status
            .as_ref()
            .is_some_and(|(_, s)| s.models.iter().any(|m| m.name == model));
        if !runs || !st.online {
            continue;
        }
        running += 1;
        if st
            .alerts
            .get(model)
            .is_some_and(|a| a.iter().any(|s| is_drift(s)))
        {
            alerting += 1;
        }
    }
    Ok((running, alerting))
}

fn audit(plane: &Plane, model: &str, action: &str, target: &str, outcome: u16) {
    if let Err(e) = plane.audit.append(
        now_ms(),
        format!("policy:{model}"),
        "system".into(),
        action.into(),
        target.into(),
        outcome,
    ) {
        tracing::error!(error = %e, "could not write the policy's audit entry");
    }
}

/// The production version of `model`: the newest staged `production`, else the one
/// most devices run.
pub fn production(plane: &Plane, model: &str) -> Option<u64> {
    let records = plane.registry.list(Some(model)).ok()?;
    if let Some(r) = records
        .iter()
        .filter(|r| r.stage == "production")
        .map(|r| r.version)
        .max()
    {
        return Some(r);
    }
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for d in plane.ingest.store.devices().ok()? {
        if let Some((_, s)) = plane
            .ingest
            .store
            .state(&d.id)
            .ok()?
            .and_then(|st| st.status)
        {
            for m in s.models.iter().filter(|m| m.name == model) {
                *counts.entry(m.version).or_default() += 1;
            }
        }
    }
    counts.into_iter().max_by_key(|(_, c)| *c).map(|(v, _)| v)
}

/// Compares `model@a` with `model@b` on dataset `dataset` (blocking).
pub fn compare(
    plane: &Plane,
    a: (&str, u64),
    b: (&str, u64),
    dataset: &str,
    label: Option<&str>,
    margin: f64,
) -> Result<Value, Refusal> {
    let m = plane.datasets.resolve(dataset)?;
    let table = plane.datasets.load(&m.id).map_err(Refusal::gone)?;
    let policy = plane
        .policy()
        .ok_or_else(|| Refusal::precondition("the server has no trust policy"))?;
    let label = label
        .map(str::to_string)
        .or_else(|| plane.jobs.spec(a.0).ok().flatten().and_then(|s| s.label))
        .unwrap_or_else(|| "label".into());
    let devices: BTreeMap<String, crate::records::DeviceRecord> = plane
        .ingest
        .store
        .devices()?
        .into_iter()
        .map(|d| (d.id.as_str().to_string(), d))
        .collect();
    let mut evals = Vec::new();
    for (name, version) in [a, b] {
        let record = plane
            .registry
            .get(name, version)
            .map_err(|e| Refusal::internal(e.to_string()))?
            .ok_or_else(|| Refusal::not_found(format!("no {name} v{version} in the registry")))?;
        let scored = crate::compare::score(
            &plane
                .registry
                .blob_path(&record.digest)
                .map_err(|e| Refusal::internal(e.to_string()))?,
            &policy,
            &table,
        )
        .map_err(|e| Refusal::unprocessable(format!("{name}@v{version}: {e}")))?;
        let eval = crate::compare::evaluate(&scored, &table, &label, &devices)
            .map_err(Refusal::unprocessable)?;
        evals.push(eval);
    }
    let verdict = crate::compare::verdict(&evals[0], &evals[1], margin);
    Ok(json!({
        "a": { "model": a.0, "version": a.1, "evaluation": evals[0] },
        "b": { "model": b.0, "version": b.1, "evaluation": evals[1] },
        "dataset": m.id, "label": label, "verdict": verdict,
    }))
}

/// One pass of the engine over every policy (blocking): gathers what each policy sees,
/// lets [`engine::decide`] decide, carries the actions out and records how they went.
pub fn tick(plane: &Arc<Plane>) {
    let Ok(all) = plane.policies.policies() else {
        return;
    };
    for (policy, mut state) in all {
        if !policy.enabled {
            continue;
        }
        let model = policy.model.clone();
        let Ok((running, alerting)) = drift_share(plane, &model) else {
            continue;
        };
        let jobs = state
            .jobs
            .iter()
            .filter(|(_, handled)| !handled)
            .filter_map(|(id, _)| {
                let job = plane.jobs.get(id).ok().flatten()?;
                let now = if job.state.is_final() {
                    engine::JobNow::Finished {
                        state: job.state,
                        candidate: job.candidate.map(|(name, version, _)| (name, version)),
                    }
                } else {
                    engine::JobNow::Running
                };
                Some((id.clone(), now))
            })
            .collect();
        let seen = engine::Seen {
            running,
            alerting,
            jobs,
        };
        let before = state.clone();
        let now = now_ms();
        for action in engine::decide(&policy, &mut state, &seen, now) {
            match action {
                engine::Action::Finished {
                    job,
                    outcome,
                    mut text,
                    promote: candidate,
                } => {
                    audit(plane, &model, "retrain.finished", &job, outcome);
                    if let Some((name, version)) = candidate {
                        text.push_str(&promote(plane, &policy, &name, version));
                    }
                    tracing::info!(model = %model, "{text}");
                    engine::finished(&mut state, now, text);
                }
                engine::Action::Start { why } => {
                    let job = trigger(plane, &policy, &why);
                    match &job {
                        Ok(job) => audit(plane, &model, "retrain.start", job, 201),
                        Err(_) => audit(plane, &model, "retrain.start", &model, 500),
                    }
                    tracing::info!(model = %model, job = ?job, "{why}");
                    engine::started(&mut state, now, &why, job);
                }
            }
        }
        if state != before {
            let _ = plane.policies.put_policy(&policy, &state);
        }
    }
}

fn trigger(plane: &Arc<Plane>, policy: &Policy, why: &str) -> Result<String, String> {
    let mut spec = plane
        .jobs
        .spec(&policy.model)
        .map_err(|e| e.to_string())?
        .ok_or("no job spec")?;
    spec.captures = Some(crate::jobs::CaptureSelection {
        labelled_only: true,
        since_s: Some(policy.captured_since_s),
    });
    let job = crate::retrain::start(
        plane,
        spec,
        "train",
        policy.datasets.clone(),
        why.to_string(),
        None,
        None,
    )
    .map_err(|e| e.to_string())?;
    Ok(job.id)
}

/// Compares the candidate with production and starts a canary when it wins.
fn promote(plane: &Arc<Plane>, policy: &Policy, name: &str, version: u64) -> String {
    let Some(holdout) = &policy.holdout else {
        return "; no holdout to compare on".into();
    };
    let Some(champion) = production(plane, name) else {
        return "; no production version to compare with".into();
    };
    let result = compare(
        plane,
        (name, champion),
        (name, version),
        holdout,
        policy.label.as_deref(),
        policy.margin,
    );
    let verdict = match result {
        Ok(v) => v["verdict"].clone(),
        Err(e) => return format!("; comparison failed: {e}"),
    };
    let summary = format!(
        "; {} v{champion} {:.4} vs v{version} {:.4}",
        verdict["metric"].as_str().unwrap_or("metric"),
        verdict["a"].as_f64().unwrap_or(f64::NAN),
        verdict["b"].as_f64().unwrap_or(f64::NAN)
    );
    if verdict["winner"] != "b" {
        audit(
            plane,
            name,
            "promote.skipped",
            &format!("{name}@v{version}"),
            200,
        );
        return format!(
            "{summary}: the challenger does not win by {}; it stays a candidate",
            policy.margin
        );
    }
    if policy.shadow_first {
        return match crate::rollout::start::start_shadow(plane, name, version, policy.canary_pct) {
            Ok(id) => {
                audit(
                    plane,
                    name,
                    "promote.shadow",
                    &format!("{name}@v{version} {id}"),
                    201,
                );
                format!(
                    "{summary}: the challenger wins; shadow rollout {id} started (fleetctl rollout promote {id} starts its canary)"
                )
            }
            Err(e) => {
                audit(
                    plane,
                    name,
                    "promote.shadow",
                    &format!("{name}@v{version}"),
                    500,
                );
                format!("{summary}: the challenger wins, but its shadow rollout was refused: {e}")
            }
        };
    }
    match crate::rollout::start::start_canary(plane, name, version, policy.canary_pct) {
        Ok(id) => {
            audit(
                plane,
                name,
                "promote.canary",
                &format!("{name}@v{version} {id}"),
                201,
            );
            format!("{summary}: the challenger wins; canary rollout {id} started")
        }
        Err(e) => {
            audit(
                plane,
                name,
                "promote.canary",
                &format!("{name}@v{version}"),
                500,
            );
            format!("{summary}: the challenger wins, but the canary could not start: {e}")
        }
    }
}

/// Runs the engine every few seconds.
pub fn spawn(plane: Arc<Plane>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            every.tick().await;
            // One engine across replicas: the leader's.
            if !plane.leader.leads() {
                continue;
            }
            let p = plane.clone();
            let _ = tokio::task::spawn_blocking(move || tick(&p)).await;
        }
    });
}
