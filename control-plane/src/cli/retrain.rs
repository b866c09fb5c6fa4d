//! `fleetctl retrain …`: training jobs.

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum RetrainCommand {
    /// Start a training job for MODEL (its spec: --spec, or the one used last).
    Start {
        model: String,
        /// Job spec (TOML), e.g. models/claims/train.toml.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Input dataset (id or 8+ hex prefix); repeat for several.
        #[arg(long = "dataset")]
        datasets: Vec<String>,
        /// Wait for the job to end and print its result.
        #[arg(long)]
        wait: bool,
    },
    /// Every job: state, trigger, best metric, candidate.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One job with every trial.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// A trial's output (the best trial unless --trial; the first while running).
    Logs {
        id: String,
        #[arg(long)]
        trial: Option<usize>,
        /// Keep printing as the trial writes, until the job ends.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Stop a running job.
    Cancel { id: String },
}

pub(crate) fn retrain_command(server: &str, cmd: RetrainCommand) -> anyhow::Result<()> {
    let client = fleet_control::client::Client::new(server)?;
    match cmd {
        RetrainCommand::Start {
            model,
            spec,
            datasets,
            wait,
        } => {
            let spec = match spec {
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            let job = client.post(
                "/v1/retrain",
                &serde_json::json!({ "model": model, "spec": spec, "datasets": datasets }),
            )?;
            let id = job["id"].as_str().unwrap_or("?").to_string();
            println!(
                "job {id} started ({} trial(s))",
                job["spec"]["grid"].as_object().map_or(1, |g| g
                    .values()
                    .filter_map(|v| v.as_array())
                    .map(Vec::len)
                    .filter(|n| *n > 0)
                    .product::<usize>())
            );
            if wait {
                let done = wait_job(&client, &id)?;
                println!("{}", job_line(&done));
                if done["state"] != "succeeded" {
                    anyhow::bail!(
                        "job {id} {}: {}",
                        done["state"].as_str().unwrap_or("?"),
                        done["error"].as_str().unwrap_or("")
                    );
                }
                if let Some(c) = done["candidate"].as_array() {
                    println!(
                        "candidate {}@v{} registered (compare it: fleetctl models compare {0}@PRODUCTION {0}@{1} --on DATASET)",
                        c[0].as_str().unwrap_or("?"),
                        c[1]
                    );
                }
            }
        }
        RetrainCommand::List { json } => {
            let list = client.get("/v1/retrain")?;
            if json {
                print_json(&list)?;
            } else {
                println!(
                    "{:<6} {:<9} {:<10} {:<16} {:>7} {:>10} {:<14} TRIGGER",
                    "JOB", "KIND", "STATE", "MODEL", "TRIALS", "BEST", "CANDIDATE"
                );
                for j in list.as_array().cloned().unwrap_or_default() {
                    println!("{}", job_line(&j));
                }
            }
        }
        RetrainCommand::Show { id, json } => {
            let j = client.get(&format!("/v1/retrain/{id}"))?;
            if json {
                print_json(&j)?;
            } else {
                println!("{}", job_line(&j));
                if let Some(e) = j["error"].as_str() {
                    println!("error: {e}");
                }
                println!(
                    "training dataset: {}",
                    j["training_dataset"].as_str().unwrap_or("-")
                );
                for t in j["trials"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "  trial {:<3} {:<10} {} = {:<10} {:>6.1}s  {}{}",
                        t["n"],
                        t["state"].as_str().unwrap_or("?"),
                        j["spec"]["metric"].as_str().unwrap_or("metric"),
                        t["metric"]
                            .as_f64()
                            .map_or("-".into(), |m| format!("{m:.4}")),
                        t["seconds"].as_f64().unwrap_or(0.0),
                        serde_json::to_string(&t["params"]).unwrap_or_default(),
                        t["error"]
                            .as_str()
                            .map(|e| format!("  ({e})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        RetrainCommand::Logs { id, trial, follow } => {
            use std::io::Write;
            let trial = trial.map(|n| format!("&trial={n}")).unwrap_or_default();
            let mut offset = 0u64;
            loop {
                // The job's state before the read: its log is complete once it ended.
                let ended = follow
                    && matches!(
                        client.get(&format!("/v1/retrain/{id}"))?["state"].as_str(),
                        Some("succeeded" | "failed" | "cancelled")
                    );
                let bytes =
                    client.get_bytes(&format!("/v1/retrain/{id}/logs?from={offset}{trial}"))?;
                offset += bytes.len() as u64;
                let mut out = std::io::stdout().lock();
                out.write_all(&bytes)?;
                out.flush()?;
                if !follow || ended {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        RetrainCommand::Cancel { id } => {
            client.post(&format!("/v1/retrain/{id}/cancel"), &serde_json::json!({}))?;
            println!("cancelling job {id}");
        }
    }
    Ok(())
}

/// Polls job `id` until it ends; returns it.
pub(crate) fn wait_job(
    client: &fleet_control::client::Client,
    id: &str,
) -> anyhow::Result<serde_json::Value> {
    loop {
        let job = client.get(&format!("/v1/retrain/{id}"))?;
        if matches!(
            job["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return Ok(job);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

pub(crate) fn job_line(j: &serde_json::Value) -> String {
    let best = j["best"]
        .as_u64()
        .and_then(|b| j["trials"].get(b as usize).cloned());
    format!(
        "{:<6} {:<9} {:<10} {:<16} {:>7} {:>10} {:<14} {}",
        j["id"].as_str().unwrap_or("?"),
        j["kind"].as_str().unwrap_or("?"),
        j["state"].as_str().unwrap_or("?"),
        j["model"].as_str().unwrap_or("?"),
        j["trials"].as_array().map_or(0, Vec::len),
        best.as_ref()
            .and_then(|b| b["metric"].as_f64())
            .map_or("-".into(), |m| format!("{m:.4}")),
        j["candidate"].as_array().map_or("-".into(), |c| format!(
            "{}@v{}",
            c[0].as_str().unwrap_or("?"),
            c[1]
        )),
        j["trigger"].as_str().unwrap_or("")
    )
}
