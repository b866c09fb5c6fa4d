//! Running training jobs for the control plane: inputs from datasets and captured
//! data, trials through an [`Executor`](crate::jobs::Executor), the best trial built
//! and signed into a candidate bundle with its lineage, and reproductions of registered
//! versions. API handlers for `fleetctl retrain …` and `fleetctl models reproduce`.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetml_protocol::manifest::{CodeRef, DatasetRef, Framework, Lineage, Param};
use serde_json::{Value, json};

use crate::datasets::{Provenance, Table};
use crate::jobs::{Job, JobSpec, JobState, Trial, TrialRun};
use crate::plane::{Plane, now_ms};
use crate::refusal::Refusal;

/// Default tolerance of a reproduced metric (absolute: 2 percentage points).
pub const TOLERANCE: f64 = 0.02;

/// What runs the trials of `spec`: the local executor (as `--trial-user` when given)
/// or the Kubernetes one.
pub(crate) fn executor(
    spec: &JobSpec,
    jobs: &crate::jobs::Jobs,
) -> Result<Box<dyn crate::jobs::Executor>, String> {
    match spec.executor.as_str() {
        "local" => Ok(Box::new(crate::jobs::LocalExecutor {
            user: jobs.trial_user.clone().map(|u| (u, jobs.dir.clone())),
        })),
        "kubernetes" => Ok(Box::new(crate::k8s::KubernetesExecutor {
            jobs_dir: jobs.dir.clone(),
        })),
        other => Err(format!(
            "executor `{other}` is not available in this control plane (local is)"
        )),
    }
}

fn param(v: &toml::Value) -> Param {
    match v {
        toml::Value::Boolean(b) => Param::Bool(*b),
        toml::Value::Integer(i) => Param::Int(*i),
        toml::Value::Float(f) => Param::Float(*f),
        toml::Value::String(s) => Param::Text(s.clone()),
        other => Param::Text(other.to_string()),
    }
}

/// Creates a job record and starts it on a thread of its own.
pub fn start(
    plane: &Arc<Plane>,
    mut spec: JobSpec,
    kind: &str,
    inputs: Vec<String>,
    trigger: String,
    reproduces: Option<(String, u64)>,
    training: Option<String>,
) -> Result<Job, Refusal> {
    // What runs is the trainer's as registered now (a removed trainer runs no more); a
    // reproduction runs exactly what the job it reproduces ran.
    if reproduces.is_none() {
        plane
            .trainers
            .resolve(&mut spec)
            .map_err(Refusal::unprocessable)?;
    }
    let id = plane.jobs.next_id()?;
    let job = Job {
        id: id.clone(),
        model: spec.model.clone(),
        kind: kind.into(),
        spec,
        state: JobState::Queued,
        trigger,
        created_ms: now_ms(),
        started_ms: None,
        finished_ms: None,
        inputs,
        training_dataset: training,
        trials: Vec::new(),
        best: None,
        candidate: None,
        error: None,
        reproduces,
        report: None,
    };
    plane.jobs.put(&job)?;
    let p = plane.clone();
    let cancel = plane.running.flag(&id);
    std::thread::Builder::new()
        .name(format!("job-{id}"))
        .spawn(move || {
            let result = run(&p, &id, &cancel);
            let cancelled = cancel.load(std::sync::atomic::Ordering::Relaxed);
            let _ = p.jobs.update(&id, |j| {
                j.finished_ms = Some(now_ms());
                match &result {
                    Ok(()) => j.state = JobState::Succeeded,
                    Err(_) if cancelled => {
                        j.state = JobState::Cancelled;
                        j.error = Some("cancelled".into());
                    }
                    Err(e) => {
                        j.state = JobState::Failed;
                        j.error = Some(e.clone());
                    }
                }
            });
            match &result {
                Ok(()) => tracing::info!(job = %id, "job succeeded"),
                Err(e) => tracing::warn!(job = %id, error = %e, "job did not succeed"),
            }
            p.running.done(&id);
        })
        .map_err(Refusal::internal)?;
    Ok(job)
}

/// The training table of a job: given datasets, captured rows, combined and kept.
fn inputs(plane: &Plane, job: &Job) -> Result<(Table, String, Vec<String>), String> {
    if job.kind == "reproduce" {
        let id = job
            .training_dataset
            .clone()
            .ok_or("nothing to reproduce from")?;
        let table = plane.datasets.load(&id).map_err(|e| {
            format!("cannot reproduce: the training dataset {id} is no longer available: {e}")
        })?;
        return Ok((table, id, job.inputs.clone()));
    }
    let mut ids: Vec<String> = job.spec.datasets.clone();
    ids.extend(job.inputs.iter().cloned());
    let mut tables = Vec::new();
    for id in &ids {
        let m = plane.datasets.resolve(id).map_err(|e| e.to_string())?;
        tables.push(plane.datasets.load(&m.id)?);
    }
    let mut used = ids.clone();
    if let Some(c) = &job.spec.captures {
        let req = crate::captures::FromCaptures::new(
            &job.model,
            c.since_s.map(|s| now_ms().saturating_sub(s * 1000)),
            c.labelled_only,
            job.spec.label.clone(),
        );
        match plane.captures.table(&req) {
            Ok((table, provenance)) => {
                let (_, m) = plane.datasets.put(&table, provenance, now_ms())?;
                used.push(m.id.clone());
                tables.push(table);
            }
            Err(e) => tracing::warn!(job = %job.id, error = %e, "no captured rows for this job"),
        }
    }
    let Some(first) = tables.first() else {
        return Err(
            "the job has no input data: give datasets (spec or --dataset) or captures".into(),
        );
    };
    let mut combined = first.clone();
    for t in &tables[1..] {
        combined = combined.concat(t);
    }
    let (_, m) = plane.datasets.put(
        &combined,
        Provenance {
            name: format!("training data of job {}", job.id),
            sources: used.iter().map(|u| format!("dataset {u}")).collect(),
            ..Default::default()
        },
        now_ms(),
    )?;
    Ok((combined, m.id, used))
}

/// A trial that ended: its number, output or error, and seconds.
type Finished = (usize, Result<crate::jobs::TrialOutput, String>, f64);

fn run(plane: &Arc<Plane>, id: &str, cancel: &AtomicBool) -> Result<(), String> {
    plane
        .jobs
        .update(id, |j| {
            j.state = JobState::Running;
            j.started_ms = Some(now_ms());
        })
        .map_err(|e| e.to_string())?;
    let job = plane
        .jobs
        .get(id)
        .map_err(|e| e.to_string())?
        .ok_or("job vanished")?;
    let (train, training_id, used) = inputs(plane, &job)?;
    plane
        .jobs
        .update(id, |j| {
            j.training_dataset = Some(training_id.clone());
            j.inputs = used.clone();
        })
        .map_err(|e| e.to_string())?;
    let holdout = match &job.spec.holdout {
        Some(h) => {
            let m = plane.datasets.resolve(h).map_err(|e| e.to_string())?;
            Some(plane.datasets.load(&m.id)?)
        }
        None => None,
    };
    let exec = executor(&job.spec, &plane.jobs)?;
    let trials = job.spec.trials();
    let results: Mutex<Vec<Finished>> = Mutex::new(Vec::new());
    for chunk in (0..trials.len())
        .collect::<Vec<_>>()
        .chunks(job.spec.concurrency)
    {
        std::thread::scope(|s| {
            for &n in chunk {
                let (trials, exec, results, train, holdout) =
                    (&trials, &exec, &results, &train, &holdout);
                let spec = job.spec.clone();
                let dir = plane.jobs.trial_dir(id, n);
                s.spawn(move || {
                    let run = TrialRun {
                        spec,
                        params: trials[n].clone(),
                        dir,
                        timeout: Duration::from_secs(job.spec.timeout_s),
                    };
                    let started = std::time::Instant::now();
                    let out = crate::jobs::stage_inputs(&run, train, holdout.as_ref())
                        .and_then(|()| exec.run(&run, cancel));
                    results.lock().unwrap_or_else(|p| p.into_inner()).push((
                        n,
                        out,
                        started.elapsed().as_secs_f64(),
                    ));
                });
            }
        });
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("cancelled".into());
        }
    }
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|r| r.0);
    let mut records = Vec::new();
    let mut best: Option<(usize, f64)> = None;
    for (n, result, seconds) in &results {
        let params = trials[*n]
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        let mut trial = Trial {
            n: *n,
            params,
            state: JobState::Failed,
            metric: None,
            metrics: Value::Null,
            artifact_sha256: None,
            error: None,
            seconds: Some(*seconds),
        };
        match result {
            Ok(out) => {
                let metric = out.metrics[&job.spec.metric].as_f64();
                trial.metrics = out.metrics.clone();
                trial.metric = metric;
                trial.artifact_sha256 = std::fs::read(out.out.join("model.onnx"))
                    .ok()
                    .map(|b| fleetml_protocol::crypto::sha256(&b).to_string());
                match metric {
                    Some(m) => {
                        trial.state = JobState::Succeeded;
                        if best.is_none_or(|(_, b)| job.spec.better(m, b)) {
                            best = Some((*n, m));
                        }
                    }
                    None => {
                        trial.error =
                            Some(format!("metrics.json has no number `{}`", job.spec.metric))
                    }
                }
            }
            Err(e) => trial.error = Some(e.clone()),
        }
        records.push(trial);
    }
    plane
        .jobs
        .update(id, |j| {
            j.trials = records.clone();
            j.best = best.map(|b| b.0);
        })
        .map_err(|e| e.to_string())?;
    let Some((n, _)) = best else {
        let why: Vec<String> = records
            .iter()
            .map(|t| format!("trial {}: {}", t.n, t.error.clone().unwrap_or_default()))
            .collect();
        return Err(format!("no trial succeeded ({})", why.join("; ")));
    };
    let output = results
        .into_iter()
        .find(|r| r.0 == n)
        .and_then(|r| r.1.ok())
        .ok_or("the best trial's output is gone")?;
    let trial = records[n].clone();
    let lineage = lineage(&job, &trials[n], &output, &training_id);
    if job.kind == "reproduce" {
        let report = reproduce_report(plane, &job, &trial, &lineage)?;
        plane
            .jobs
            .update(id, |j| j.report = Some(report))
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    let candidate = build_candidate(plane, &job, &trial, &output, &lineage, &trials[n])?;
    plane
        .jobs
        .update(id, |j| j.candidate = Some(candidate.clone()))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The lineage of the best trial: what the job recorded itself.
fn lineage(
    job: &Job,
    params: &BTreeMap<String, toml::Value>,
    out: &crate::jobs::TrialOutput,
    training_id: &str,
) -> Lineage {
    let env = &out.environment;
    let mut hyperparameters: BTreeMap<String, Param> =
        params.iter().map(|(k, v)| (k.clone(), param(v))).collect();
    hyperparameters.insert(
        "training_rows".into(),
        Param::Int(out.metrics["rows"].as_i64().unwrap_or(0)),
    );
    Lineage {
        dependencies_lock_sha256: env.dependencies_lock_sha256.clone(),
        container_image: env.container_image.clone(),
        cuda_version: env.cuda.clone(),
        cudnn_version: env.cudnn.clone(),
        driver_version: env.driver.clone(),
        seed: Some(job.spec.seed),
        training_device: env
            .device
            .clone()
            .or_else(|| Some(format!("cpu ({})", std::env::consts::ARCH))),
        dataset: Some(DatasetRef {
            uri: format!("fleetml:dataset/{training_id}"),
            sha256: Some(training_id.to_string()),
        }),
        code: job.spec.code_repository.clone().map(|repository| CodeRef {
            repository,
            commit: job.spec.code_commit.clone(),
        }),
        framework: env
            .framework
            .clone()
            .map(|(name, version)| Framework { name, version }),
        hyperparameters,
    }
}

fn build_candidate(
    plane: &Plane,
    job: &Job,
    trial: &Trial,
    out: &crate::jobs::TrialOutput,
    lineage: &Lineage,
    params: &BTreeMap<String, toml::Value>,
) -> Result<(String, u64, String), String> {
    let key = plane.signing_key.clone().ok_or(
        "the control plane has no signing key for candidates: start `fleetctl serve --signing-key KEY` (a key its trust policy lists)",
    )?;
    let dir = plane.jobs.dir.join(&job.id);
    let lineage_path = dir.join("lineage.toml");
    std::fs::write(&lineage_path, lineage.to_toml()).map_err(|e| e.to_string())?;
    let version = plane
        .registry
        .list(Some(&job.model))
        .map_err(|e| e.to_string())?
        .iter()
        .map(|r| r.version)
        .max()
        .unwrap_or(0)
        + 1;
    let trial_dir = plane.jobs.trial_dir(&job.id, trial.n);
    let data = trial_dir.join("data");
    let features = out.out.join("features.toml");
    let golden = if data.join("holdout.csv").is_file() {
        data.join("holdout.csv")
    } else {
        data.join("train.csv")
    };
    let bundle_path = dir.join("candidate.fmb");
    let opts = crate::bundle::BuildOptions {
        model: out.out.join("model.onnx"),
        input_shapes: Vec::new(),
        name: job.model.clone(),
        version,
        label: format!("retrained by job {}", job.id),
        features: features.is_file().then_some(features),
        reference: Some(data.join("train.csv")),
        golden: Some(golden),
        golden_rows: 16,
        golden_inputs: None,
        onnxruntime: None,
        allow_backend_disagreement: false,
        lineage: Some(lineage_path),
        bins: 10,
        calibration: Default::default(),
        label_column: None,
        labelled: None,
        monitoring: Default::default(),
        serving: Default::default(),
        prepare_gpu: None,
        backends: vec!["cpu".into()],
        boards: Vec::new(),
        min_agent_version: fleetml_protocol::VERSION.into(),
        created_at: now_ms() / 1000,
        extra: Vec::new(),
        keys: vec![key],
        out: bundle_path.clone(),
    };
    crate::bundle::build(&opts).map_err(|e| format!("building the candidate bundle: {e:#}"))?;
    let mut incoming = plane.registry.incoming().map_err(|e| e.to_string())?;
    {
        use std::io::Write;
        let bytes = std::fs::read(&bundle_path).map_err(|e| e.to_string())?;
        incoming
            .as_file_mut()
            .write_all(&bytes)
            .map_err(|e| e.to_string())?;
    }
    let pushed = plane
        .registry
        .push(incoming, plane.policy().as_ref(), now_ms())
        .map_err(|e| format!("registering the candidate: {e}"))?;
    let record = match pushed {
        crate::registry::Pushed::New(r) | crate::registry::Pushed::Unchanged(r) => r,
    };
    let params_text = params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    plane
        .registry
        .update(&record.name, record.version, |r| {
            r.tags.insert("job".into(), job.id.clone());
            r.tags.insert("trial".into(), trial.n.to_string());
            if let Some(a) = &trial.artifact_sha256 {
                r.tags.insert("artifact_sha256".into(), a.clone());
            }
            if let Some(m) = trial.metric {
                r.tags.insert(job.spec.metric.clone(), format!("{m:.6}"));
            }
            if !params_text.is_empty() {
                r.tags.insert("params".into(), params_text.clone());
            }
        })
        .map_err(|e| e.to_string())?;
    tracing::info!(job = %job.id, model = %record.name, version = record.version, "candidate registered");
    Ok((record.name, record.version, record.digest))
}

/// Compares a reproduction with the version it reproduces.
fn reproduce_report(
    plane: &Plane,
    job: &Job,
    trial: &Trial,
    now: &Lineage,
) -> Result<Value, String> {
    let (name, version) = job.reproduces.clone().ok_or("nothing reproduced")?;
    let record = plane
        .registry
        .get(&name, version)
        .map_err(|e| e.to_string())?
        .ok_or("the reproduced version is gone")?;
    let original_artifact = record.tags.get("artifact_sha256").cloned();
    let original_metric = record
        .tags
        .get(&job.spec.metric)
        .and_then(|m| m.parse::<f64>().ok());
    let recorded = recorded_lineage(plane, &record)?;
    let mut differs = Vec::new();
    let a = serde_json::to_value(&recorded).unwrap_or_default();
    let b = serde_json::to_value(now).unwrap_or_default();
    let keys: std::collections::BTreeSet<String> = a
        .as_object()
        .into_iter()
        .chain(b.as_object())
        .flat_map(|o| o.keys().cloned())
        .collect();
    for k in keys {
        if a.get(&k) != b.get(&k) {
            differs.push(json!({ "field": k, "recorded": a.get(&k), "now": b.get(&k) }));
        }
    }
    let identical = original_artifact.is_some() && original_artifact == trial.artifact_sha256;
    let within = match (original_metric, trial.metric) {
        (Some(o), Some(n)) => Some((o - n).abs() <= TOLERANCE),
        _ => None,
    };
    Ok(json!({
        "model": name, "version": version,
        "artifact_sha256": { "recorded": original_artifact, "now": trial.artifact_sha256, "identical": identical },
        "metric": { "name": job.spec.metric, "recorded": original_metric, "now": trial.metric, "tolerance": TOLERANCE, "within": within },
        "lineage_differences": differs,
    }))
}

/// The lineage in the registered bundle's manifest.
fn recorded_lineage(
    plane: &Plane,
    record: &crate::registry::ModelRecord,
) -> Result<Lineage, String> {
    let path = plane
        .registry
        .blob_path(&record.digest)
        .map_err(|e| e.to_string())?;
    let front = crate::bundle::read_front(&path).map_err(|e| format!("{e:#}"))?;
    Ok(front.manifest.lineage.clone())
}
