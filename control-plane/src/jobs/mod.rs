//! Training jobs: a job spec (TOML) names a registered trainer ([`trainers`]: the
//! command or container image an admin allowed, and the code), the datasets,
//! hyperparameters (optionally a grid), the seed and resources;
//! an [`Executor`] runs each trial; the best trial by the spec's metric becomes a
//! candidate bundle — built and signed like `fleetctl bundle build`, its lineage
//! recorded from the job itself — registered as `candidate`.
//!
//! ```toml
//! model = "claims"
//! trainer = "claims-fit"         # registered by an admin (`fleetctl trainers add`)
//! label = "investigate"          # the target column
//! seed = 42
//! metric = "auc"                 # from the trial's metrics.json
//! goal = "max"                   # or "min"
//! timeout_s = 1800
//! concurrency = 2                # trials at once (grid)
//! datasets = ["3f2a9c1e…"]       # by content hash; more can be given per run
//! captures = { labelled_only = true, since_s = 604800 }   # plus captured rows
//! code_repository = "https://git.example.com/claims"
//! code_commit = "9c1e…"
//! [params]
//! epochs = 30
//! [grid]
//! hidden = [8, 16]
//! [resources]
//! gpus = 1
//! ```
//!
//! Placeholders in the trainer's `command`: `{data}` (the trial's input folder), `{train_csv}`,
//! `{train_parquet}`, `{holdout_csv}` (when a holdout dataset is given), `{out}`,
//! `{seed}`, `{param:NAME}`. The same values are in the environment as `FLEETML_DATA`,
//! `FLEETML_TRAIN_CSV`, `FLEETML_OUT`, `FLEETML_SEED`, `FLEETML_PARAM_<NAME>`. A trial
//! must leave `model.onnx` and `metrics.json` in `{out}` (and may leave
//! `features.toml`); `metrics.json` may name `framework {name, version}`, `device`,
//! `cuda`, `cudnn`, `dependencies_lock_sha256` for the lineage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use self::spec::*;
use crate::store::{JobStore, StoreError};

pub mod spec;
pub mod trainers;

/// Cancellation flags of running jobs.
#[derive(Debug, Default)]
pub struct Running(Mutex<BTreeMap<String, Arc<AtomicBool>>>);

impl Running {
    pub(crate) fn flag(&self, id: &str) -> Arc<AtomicBool> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    pub(crate) fn done(&self, id: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

impl JobSpec {
    /// Refuses when the spec's code commit is not in its local clone.
    pub fn check_code(&self) -> Result<(), String> {
        let (Some(dir), Some(commit)) = (&self.code_dir, &self.code_commit) else {
            return Ok(());
        };
        let found = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            Ok(())
        } else {
            Err(format!(
                "code commit {commit} is not available in {} (the clone is gone or the commit was removed)",
                dir.display()
            ))
        }
    }
}

/// What ran where (from the job's own probe and its metrics.json).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    pub framework: Option<(String, Option<String>)>,
    pub device: Option<String>,
    pub cuda: Option<String>,
    pub cudnn: Option<String>,
    pub driver: Option<String>,
    pub dependencies_lock_sha256: Option<String>,
    pub container_image: Option<String>,
    pub executor: String,
}

/// What a trial left behind.
#[derive(Debug, Clone)]
pub struct TrialOutput {
    pub out: PathBuf,
    pub metrics: Value,
    pub environment: Environment,
}

/// Everything a trial needs to run.
#[derive(Debug, Clone)]
pub struct TrialRun {
    pub spec: JobSpec,
    pub params: BTreeMap<String, toml::Value>,
    /// The trial's folder: `data/` (inputs), `out/`, `log`.
    pub dir: PathBuf,
    pub timeout: Duration,
}

impl TrialRun {
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn out(&self) -> PathBuf {
        self.dir.join("out")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// The placeholder values of the command.
    pub fn values(&self) -> BTreeMap<String, String> {
        let mut v = BTreeMap::new();
        let data = self.data();
        v.insert("data".into(), data.display().to_string());
        v.insert(
            "train_csv".into(),
            data.join("train.csv").display().to_string(),
        );
        v.insert(
            "train_parquet".into(),
            data.join("train.parquet").display().to_string(),
        );
        v.insert(
            "holdout_csv".into(),
            data.join("holdout.csv").display().to_string(),
        );
        v.insert("out".into(), self.out().display().to_string());
        v.insert("seed".into(), self.spec.seed.to_string());
        for (k, p) in &self.params {
            v.insert(format!("param:{k}"), param_text(p));
        }
        v
    }

    /// The command with its placeholders filled in; an unknown placeholder is an error.
    pub fn command(&self) -> Result<Vec<String>, String> {
        let values = self.values();
        self.spec
            .command
            .iter()
            .map(|arg| {
                let mut out = String::new();
                let mut rest = arg.as_str();
                while let Some(start) = rest.find('{') {
                    out.push_str(&rest[..start]);
                    let end = rest[start..]
                        .find('}')
                        .ok_or_else(|| format!("command argument `{arg}`: unclosed `{{`"))?;
                    let key = &rest[start + 1..start + end];
                    let value = values.get(key).ok_or_else(|| {
                        format!(
                            "command argument `{arg}`: no value for `{{{key}}}` (params: {:?})",
                            self.params.keys().collect::<Vec<_>>()
                        )
                    })?;
                    out.push_str(value);
                    rest = &rest[start + end + 1..];
                }
                out.push_str(rest);
                Ok(out)
            })
            .collect()
    }
}

/// Runs trials somewhere.
pub trait Executor: Send + Sync {
    fn name(&self) -> &'static str;
    /// Runs one trial to completion (or until `cancel`), its log in `trial.log()`.
    fn run(&self, trial: &TrialRun, cancel: &AtomicBool) -> Result<TrialOutput, String>;
}

/// The OS user local trials run as (`fleetctl serve --trial-user`), so that a trainer
/// cannot read the control plane's data directory, keys or tokens. Each trial's folder
/// is handed to it (owner the trial user, group the control plane's, `2770`/`0660`)
/// before the trial starts; the control plane, which must run as root to start
/// processes as another user, reads what the trial leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TrialUser {
    /// Looks `name` up (through NSS: `getent passwd`), and checks that this process may
    /// start processes as it and that it can enter `trials_dir`.
    pub fn lookup(name: &str, trials_dir: &Path) -> anyhow::Result<TrialUser> {
        use anyhow::Context as _;
        let out = std::process::Command::new("getent")
            .args(["passwd", name])
            .output()
            .context("--trial-user: running getent")?;
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let fields: Vec<&str> = line.split(':').collect();
        let (Some(uid), Some(gid)) = (
            fields.get(2).and_then(|f| f.parse::<u32>().ok()),
            fields.get(3).and_then(|f| f.parse::<u32>().ok()),
        ) else {
            anyhow::bail!(
                "--trial-user {name}: no such user (create one without a login: useradd --system --no-create-home --shell /usr/sbin/nologin {name})"
            );
        };
        let me = rustix::process::geteuid().as_raw();
        if uid == 0 || uid == me {
            anyhow::bail!(
                "--trial-user {name}: that is root or the control plane's own user; name a user of its own, who cannot read DATA_DIR"
            );
        }
        if me != 0 {
            anyhow::bail!(
                "--trial-user {name}: starting trials as another user needs the control plane to run as root (it runs as uid {me}); leave --trial-user out to run them as this user"
            );
        }
        let user = TrialUser {
            name: name.to_string(),
            uid,
            gid,
        };
        let entered = user
            .command("/bin/sh")
            .args(["-c", "cd \"$1\"", "sh"])
            .arg(trials_dir)
            .stderr(std::process::Stdio::null())
            .status()
            .context("--trial-user: starting a process as that user")?;
        if !entered.success() {
            anyhow::bail!(
                "--trial-user {name} cannot enter --trials-dir {}: every folder above it must be searchable by others (chmod o+x)",
                trials_dir.display()
            );
        }
        Ok(user)
    }

    /// `program` to be run as this user (supplementary groups dropped: std does that
    /// when root changes the uid).
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(program);
        cmd.uid(self.uid).gid(self.gid);
        cmd
    }

    /// Hands a trial's folder to this user: everything in it owned by the trial user and
    /// the control plane's group, folders `2770`, files `0660`; the folders above it
    /// searchable (`0711`) up to `root`.
    fn hand_over(&self, dir: &Path, root: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let group = rustix::process::getegid().as_raw();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(path) = pending.pop() {
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.file_type().is_symlink() {
                continue;
            }
            std::os::unix::fs::lchown(&path, Some(self.uid), Some(group))?;
            let mode = if meta.is_dir() { 0o2770 } else { 0o660 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            if meta.is_dir() {
                for entry in std::fs::read_dir(&path)? {
                    pending.push(entry?.path());
                }
            }
        }
        let mut above = dir.parent();
        while let Some(p) = above {
            if !p.starts_with(root) {
                break;
            }
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o711))?;
            above = p.parent();
        }
        Ok(())
    }
}

/// Runs the command as a subprocess of the control plane, as the trial user when one
/// is configured.
#[derive(Debug, Default)]
pub struct LocalExecutor {
    /// Who trials run as, and the folder theirs are in.
    pub user: Option<(TrialUser, PathBuf)>,
}

impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        "local"
    }

    fn run(&self, trial: &TrialRun, cancel: &AtomicBool) -> Result<TrialOutput, String> {
        let command = trial.command()?;
        std::fs::create_dir_all(trial.out()).map_err(|e| e.to_string())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(trial.log())
            .map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let values = trial.values();
        let mut cmd = match &self.user {
            Some((user, root)) => {
                user.hand_over(&trial.dir, root).map_err(|e| {
                    format!("handing {} to {}: {e}", trial.dir.display(), user.name)
                })?;
                user.command(&command[0])
            }
            None => std::process::Command::new(&command[0]),
        };
        // A cleared environment: nothing of the control plane's own (tokens, cloud
        // credentials, FLEETML_*) reaches a trial; PATH to find the trainer, HOME its own
        // folder, and what the trainer adds.
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("HOME", &trial.dir)
            .env("LANG", "C.UTF-8")
            .envs(&trial.spec.env);
        cmd.args(&command[1..])
            .current_dir(&trial.dir)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .env("FLEETML_DATA", &values["data"])
            .env("FLEETML_TRAIN_CSV", &values["train_csv"])
            .env("FLEETML_OUT", &values["out"])
            .env("FLEETML_SEED", &values["seed"]);
        if trial.data().join("holdout.csv").is_file() {
            cmd.env("FLEETML_HOLDOUT_CSV", &values["holdout_csv"]);
        }
        for (k, p) in &trial.params {
            cmd.env(format!("FLEETML_PARAM_{}", k.to_uppercase()), param_text(p));
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting `{}`: {e}", command[0]))?;
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break status;
            }
            if cancel.load(Ordering::Relaxed) {
                let _ = child.kill();
                let _ = child.wait();
                return Err("cancelled".into());
            }
            if started.elapsed() > trial.timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "timed out after {} s (timeout_s)",
                    trial.timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !status.success() {
            return Err(format!(
                "`{}` exited with {status}; see `fleetctl retrain logs`",
                command[0]
            ));
        }
        collect(trial, "local")
    }
}

/// Reads what a finished trial left in `out/`, and probes the machine it ran on.
pub fn collect(trial: &TrialRun, executor: &str) -> Result<TrialOutput, String> {
    let out = trial.out();
    if !out.join("model.onnx").is_file() {
        return Err(format!("the trial left no model.onnx in {}", out.display()));
    }
    let metrics: Value = std::fs::read(out.join("metrics.json"))
        .map_err(|_| format!("the trial left no metrics.json in {}", out.display()))
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| format!("metrics.json is not JSON: {e}"))
        })?;
    let probe = probe_gpu();
    let text = |k: &str| metrics[k].as_str().map(str::to_string);
    let environment = Environment {
        framework: metrics["framework"]["name"].as_str().map(|n| {
            (
                n.to_string(),
                metrics["framework"]["version"].as_str().map(str::to_string),
            )
        }),
        device: text("device").or(probe.0.clone()),
        cuda: text("cuda").or(probe.2.clone()),
        cudnn: text("cudnn"),
        driver: probe.1.clone().or(text("driver")),
        dependencies_lock_sha256: text("dependencies_lock_sha256"),
        container_image: trial.spec.image.clone(),
        executor: executor.into(),
    };
    Ok(TrialOutput {
        out,
        metrics,
        environment,
    })
}

/// GPU name, driver and CUDA version from `nvidia-smi`, when there is one.
pub fn probe_gpu() -> (Option<String>, Option<String>, Option<String>) {
    let query = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,driver_version", "--format=csv,noheader"])
        .output();
    let Ok(out) = query else {
        return (None, None, None);
    };
    if !out.status.success() {
        return (None, None, None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("");
    let (name, driver) = match first.split_once(',') {
        Some((n, d)) => (Some(n.trim().to_string()), Some(d.trim().to_string())),
        None => (None, None),
    };
    let cuda = std::process::Command::new("nvidia-smi")
        .output()
        .ok()
        .and_then(|o| {
            let t = String::from_utf8_lossy(&o.stdout).to_string();
            let at = t.find("CUDA Version:")?;
            Some(t[at + 13..].split_whitespace().next()?.to_string())
        });
    (name, driver, cuda)
}

/// Writes the trial's inputs: `train.csv` and `train.parquet`, and `holdout.csv`.
pub fn stage_inputs(
    trial: &TrialRun,
    train: &crate::datasets::Table,
    holdout: Option<&crate::datasets::Table>,
) -> Result<(), String> {
    let data = trial.data();
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    std::fs::write(data.join("train.csv"), train.to_csv()).map_err(|e| e.to_string())?;
    std::fs::write(data.join("train.parquet"), train.to_parquet()?).map_err(|e| e.to_string())?;
    if let Some(h) = holdout {
        std::fs::write(data.join("holdout.csv"), h.to_csv()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Jobs, kept by a [`JobStore`], and their trial folders under `dir`.
#[derive(Clone)]
pub struct Jobs {
    store: Arc<dyn JobStore>,
    pub dir: PathBuf,
    /// Who local trials run as (`serve --trial-user`); the control plane's user when
    /// none.
    pub trial_user: Option<TrialUser>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Jobs {
    /// Jobs in `store`, their trials' folders under `dir` (created if missing).
    pub fn open(store: Arc<dyn JobStore>, dir: &Path) -> Result<Jobs, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::unavailable(dir.display(), e))?;
        // Absolute: trials run with their own folder as working directory, and a
        // Kubernetes pod mounts the same path.
        let dir =
            std::fs::canonicalize(dir).map_err(|e| StoreError::unavailable(dir.display(), e))?;
        Ok(Jobs {
            store,
            dir,
            trial_user: None,
        })
    }

    /// Local trials run as `user`.
    pub fn with_trial_user(mut self, user: Option<TrialUser>) -> Jobs {
        self.trial_user = user;
        self
    }

    pub fn next_id(&self) -> Result<String, StoreError> {
        self.store.next_job_id()
    }

    pub fn put(&self, job: &Job) -> Result<(), StoreError> {
        self.store.put_job(job)
    }

    pub fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.store.job(id)
    }

    /// Every job, oldest first.
    pub fn all(&self) -> Result<Vec<Job>, StoreError> {
        self.store.jobs()
    }

    /// Changes job `id` in place (nothing when there is none).
    pub fn update(&self, id: &str, change: impl FnOnce(&mut Job) + Send) -> Result<(), StoreError> {
        let mut change = Some(change);
        self.store.update_job(id, &mut |job| {
            if let Some(change) = change.take() {
                change(job);
            }
        })?;
        Ok(())
    }

    /// Keeps `spec` as its model's last spec (`retrain start MODEL` without `--spec`).
    pub fn keep_spec(&self, spec: &JobSpec) -> Result<(), StoreError> {
        self.store.put_job_spec(&spec.model, &spec.to_toml())
    }

    /// The model's last spec; one that no longer parses counts as none.
    pub fn spec(&self, model: &str) -> Result<Option<JobSpec>, StoreError> {
        Ok(self
            .store
            .job_spec(model)?
            .and_then(|text| JobSpec::from_toml(&text).ok()))
    }

    pub fn trial_dir(&self, job: &str, n: usize) -> PathBuf {
        self.dir.join(job).join(format!("trial-{n}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_expands_over_params_and_placeholders_fill_the_command() {
        let spec = JobSpec::from_toml(
            r#"
model = "m"
command = ["fit", "--data={train_csv}", "--epochs", "{param:epochs}", "--hidden", "{param:hidden}", "--seed", "{seed}"]
seed = 7
[params]
epochs = 30
[grid]
hidden = [8, 16]
lr = [0.1, 0.01]
"#,
        )
        .expect("test");
        let trials = spec.trials();
        assert_eq!(trials.len(), 4);
        assert!(
            trials
                .iter()
                .all(|t| t["epochs"] == toml::Value::Integer(30))
        );
        let run = TrialRun {
            spec: spec.clone(),
            params: trials[0].clone(),
            dir: PathBuf::from("/j/t0"),
            timeout: Duration::from_secs(1),
        };
        let cmd = run.command().expect("test");
        assert_eq!(cmd[1], "--data=/j/t0/data/train.csv");
        assert_eq!(
            &cmd[2..],
            ["--epochs", "30", "--hidden", "8", "--seed", "7"]
        );
        let mut bad = run.clone();
        bad.spec.command = vec!["fit".into(), "{param:nope}".into()];
        assert!(bad.command().expect_err("test").contains("nope"));
        assert!(
            JobSpec::from_toml("model = \"m\"")
                .expect_err("test")
                .contains("command")
        );
        assert!(JobSpec::from_toml("model = \"m\"\ncommand=[\"x\"]\ngoal = \"up\"").is_err());
        assert!(spec.better(0.9, 0.8));
    }
}
