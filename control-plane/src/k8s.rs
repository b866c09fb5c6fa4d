//! The `kubernetes` executor: each trial is a `batch/v1` Job on a cluster, created
//! through the Kubernetes API with the `kube` client — the way a fleet outgrows the
//! control plane's own machine onto a GPU cluster.
//!
//! Inputs and outputs travel through shared storage: the trial folder the control plane
//! prepares (`DATA_DIR/jobs/<job>/trial-<n>/{data,out}`) lives on a ReadWriteMany volume
//! (NFS, CephFS, EFS, …) that the control plane mounts at `DATA_DIR/jobs` and every Job
//! pod mounts at the same path (`[kubernetes] volume_claim`), so the command's
//! placeholders mean the same files on both sides. The pod runs the spec's `image` with
//! the filled-in `command`, the `FLEETML_*` environment, and `nvidia.com/gpu` limits from
//! `[resources] gpus`. The executor polls the Job until it succeeds, fails (its pod's log
//! is kept as the trial log) or times out (the Job is deleted, as on cancel), and
//! records the image digest the kubelet ran (`imageID`) in the lineage.
//!
//! ```toml
//! executor = "kubernetes"
//! image = "registry.example.com/claims-train@sha256:…"
//! [kubernetes]
//! url = "http://127.0.0.1:8001"     # `kubectl proxy`; default: in-cluster / KUBECONFIG
//! namespace = "fleetml"
//! volume_claim = "fleetml-jobs"     # RWX PVC mounted at DATA_DIR/jobs by the control plane
//! [resources]
//! gpus = 1
//! ```
//! `docs/kubernetes-job.yaml` shows the Job such a spec produces.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use serde_json::json;

pub use crate::jobs::KubernetesSpec;
use crate::jobs::{Executor, TrialOutput, TrialRun};

/// Runs trials as Kubernetes Jobs.
#[derive(Debug)]
pub struct KubernetesExecutor {
    /// Where the jobs folder is mounted in pods (the control plane's own path).
    pub jobs_dir: std::path::PathBuf,
}

/// The Job object of a trial.
pub fn job_object(trial: &TrialRun, name: &str, jobs_dir: &std::path::Path) -> Result<Job, String> {
    let k = trial.spec.kubernetes.clone().unwrap_or_default();
    let image = trial
        .spec
        .image
        .clone()
        .ok_or("the kubernetes executor needs `image`")?;
    let claim = k
        .volume_claim
        .clone()
        .ok_or("the kubernetes executor needs `[kubernetes] volume_claim` (shared storage for inputs and outputs)")?;
    let command = trial.command()?;
    let values = trial.values();
    let mut env = vec![
        json!({"name": "FLEETML_DATA", "value": values["data"]}),
        json!({"name": "FLEETML_TRAIN_CSV", "value": values["train_csv"]}),
        json!({"name": "FLEETML_OUT", "value": values["out"]}),
        json!({"name": "FLEETML_SEED", "value": values["seed"]}),
    ];
    if trial.data().join("holdout.csv").is_file() {
        env.push(json!({"name": "FLEETML_HOLDOUT_CSV", "value": values["holdout_csv"]}));
    }
    for (key, value) in &trial.params {
        let text = match value {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        env.push(json!({"name": format!("FLEETML_PARAM_{}", key.to_uppercase()), "value": text}));
    }
    let r = &trial.spec.resources;
    let mut limits = serde_json::Map::new();
    if r.gpus > 0 {
        limits.insert("nvidia.com/gpu".into(), json!(r.gpus.to_string()));
    }
    if let Some(c) = &r.cpu {
        limits.insert("cpu".into(), json!(c));
    }
    if let Some(m) = &r.memory {
        limits.insert("memory".into(), json!(m));
    }
    let mount = jobs_dir.display().to_string();
    let object = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "labels": { "app.kubernetes.io/managed-by": "fleetml", "fleetml/model": trial.spec.model },
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": trial.timeout.as_secs(),
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": { "labels": { "app.kubernetes.io/managed-by": "fleetml" } },
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": k.service_account,
                    "nodeSelector": k.node_selector,
                    "containers": [{
                        "name": "train",
                        "image": image,
                        "command": command,
                        "workingDir": trial.dir.display().to_string(),
                        "env": env,
                        "resources": { "limits": limits },
                        "volumeMounts": [{ "name": "jobs", "mountPath": mount }],
                    }],
                    "volumes": [{ "name": "jobs", "persistentVolumeClaim": { "claimName": claim } }],
                },
            },
        },
    });
    serde_json::from_value(object).map_err(|e| format!("building the Job object: {e}"))
}

async fn client(k: &KubernetesSpec) -> Result<kube::Client, String> {
    let mut config = match &k.url {
        Some(url) => kube::Config::new(
            url.parse()
                .map_err(|e| format!("[kubernetes] url `{url}`: {e}"))?,
        ),
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes configuration (in-cluster or KUBECONFIG): {e}"))?,
    };
    if let Some(ca) = &k.ca {
        let what = format!("[kubernetes] ca {}", ca.display());
        let pem = std::fs::read(ca).map_err(|e| format!("{what}: {e}"))?;
        let certs = fleetml_net::tls::certs(&pem, &what)?;
        config.root_cert = Some(certs.into_iter().map(|c| c.to_vec()).collect());
    }
    kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

impl Executor for KubernetesExecutor {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn run(&self, trial: &TrialRun, cancel: &AtomicBool) -> Result<TrialOutput, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(self.run_async(trial, cancel))
    }
}

impl KubernetesExecutor {
    async fn run_async(
        &self,
        trial: &TrialRun,
        cancel: &AtomicBool,
    ) -> Result<TrialOutput, String> {
        let k = trial.spec.kubernetes.clone().unwrap_or_default();
        std::fs::create_dir_all(trial.out()).map_err(|e| e.to_string())?;
        let folder = |p: &std::path::Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        };
        let job_folder = trial.dir.parent().map(folder).unwrap_or_default();
        let name = format!("fleetml-{}-{}", job_folder, folder(&trial.dir))
            .to_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-");
        let object = job_object(trial, &name, &self.jobs_dir)?;
        let client = client(&k).await?;
        let jobs: Api<Job> = Api::namespaced(client.clone(), &k.namespace);
        let pods: Api<Pod> = Api::namespaced(client, &k.namespace);
        jobs.create(&PostParams::default(), &object)
            .await
            .map_err(|e| format!("creating Job {name} in namespace {}: {e}", k.namespace))?;
        tracing::info!(job = %name, namespace = %k.namespace, "kubernetes Job created");
        let started = std::time::Instant::now();
        let outcome = loop {
            if cancel.load(Ordering::Relaxed) {
                break Err("cancelled".to_string());
            }
            if started.elapsed() > trial.timeout + Duration::from_secs(30) {
                break Err(format!(
                    "timed out after {} s (timeout_s)",
                    trial.timeout.as_secs()
                ));
            }
            let status = jobs
                .get(&name)
                .await
                .map_err(|e| format!("reading Job {name}: {e}"))?
                .status
                .unwrap_or_default();
            if status.succeeded.unwrap_or(0) > 0 {
                break Ok(());
            }
            if status.failed.unwrap_or(0) > 0 {
                break Err(format!("Job {name} failed; see `fleetctl retrain logs`"));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        };
        // The pod's log becomes the trial's, and its image digest goes to the lineage.
        let mut image_id = None;
        if let Ok(list) = pods
            .list(&ListParams::default().labels(&format!("job-name={name}")))
            .await
        {
            for pod in list.items {
                let pod_name = pod.metadata.name.clone().unwrap_or_default();
                image_id = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|c| c.first())
                    .map(|c| c.image_id.clone())
                    .filter(|i| !i.is_empty())
                    .or(image_id);
                if let Ok(text) = pods.logs(&pod_name, &LogParams::default()).await {
                    let _ = std::fs::write(trial.log(), text);
                }
            }
        }
        if outcome.is_err() {
            let _ = jobs.delete(&name, &DeleteParams::background()).await;
        }
        outcome?;
        let mut out = crate::jobs::collect(trial, "kubernetes")?;
        if let Some(id) = image_id {
            out.environment.container_image = Some(id);
        }
        Ok(out)
    }
}
