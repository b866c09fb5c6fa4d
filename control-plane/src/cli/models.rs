//! `fleetctl models …`: the registry, comparisons, drift policies, reproductions.

use super::common::*;
use super::retrain::wait_job;

#[derive(Subcommand, Debug)]
pub(crate) enum ModelsCommand {
    /// Champion/challenger: evaluate NAME@A and NAME@B on a labelled dataset with the
    /// agents' runtime — accuracy/AUC or MAE, per board and tag slice, latency — side
    /// by side.
    Compare {
        a: String,
        b: String,
        /// The dataset (id or 8+ hex prefix) to evaluate on.
        #[arg(long)]
        on: String,
        /// Label column (default: the model's job spec label, else `label`).
        #[arg(long)]
        label: Option<String>,
        /// How much better B must be on the deciding metric to win.
        #[arg(long, default_value_t = 0.0)]
        margin: f64,
        #[arg(long)]
        json: bool,
    },
    /// The drift-triggered retraining policy of a model.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Re-run the training job that produced NAME@VERSION from its lineage (same
    /// dataset, code, parameters, seed) and report: artifact hash identical or not,
    /// metric within --tolerance, lineage fields that differ now. Exits 1 when neither
    /// the artifact nor the metric reproduces.
    Reproduce {
        model: String,
        /// Return the job id without waiting.
        #[arg(long)]
        detach: bool,
        #[arg(long)]
        json: bool,
    },
    /// Upload a bundle. The server verifies it against its trust policy before keeping
    /// it; pushing the same bytes again changes nothing, other bytes under an existing
    /// name and version are refused.
    Push { bundle: PathBuf },
    /// Every model version in the registry.
    List {
        #[arg(long)]
        json: bool,
    },
    /// A model (NAME: its versions and where they run) or one version (NAME@VERSION:
    /// manifest, lineage, feature schema, payloads, signatures, where it runs now).
    Show {
        /// NAME or NAME@VERSION.
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Lineage, feature schema, inputs, monitoring settings and reference profile of two
    /// versions, side by side (only what differs).
    Diff {
        /// NAME@VERSION
        a: String,
        /// NAME@VERSION
        b: String,
        #[arg(long)]
        json: bool,
    },
    /// Move a version to a stage: candidate, staging, production or archived.
    Stage {
        /// NAME@VERSION
        model: String,
        #[arg(value_parser = fleet_control::registry::STAGES)]
        stage: String,
    },
    /// Set (k=v) or remove (--remove k) free tags of a version.
    Tag {
        /// NAME@VERSION
        model: String,
        /// k=v,k=v
        #[arg(value_delimiter = ',')]
        set: Vec<String>,
        /// Tag keys to remove; repeatable.
        #[arg(long)]
        remove: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum PolicyCommand {
    /// Retrain NAME when enough of its devices hold drift alerts long enough.
    ///
    /// Example: fleetctl models policy set claims --drift-share 0.2 --for 30m --dataset 3f2a9c1e --captured-since 7d
    Set {
        model: String,
        /// Share of the devices running it that must hold a drift alert (0..1].
        #[arg(long, default_value_t = 0.2)]
        drift_share: f64,
        /// For at least this long (s, m, h, d).
        #[arg(long = "for", default_value = "30m", value_parser = parse_duration)]
        for_: std::time::Duration,
        /// Original training data added to the captured rows (repeat).
        #[arg(long = "dataset")]
        datasets: Vec<String>,
        /// Labelled rows captured within this long before the trigger.
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        captured_since: std::time::Duration,
        /// No new trigger within this long of the last one.
        #[arg(long, default_value = "6h", value_parser = parse_duration)]
        cooldown: std::time::Duration,
        /// Most of its jobs running at once.
        #[arg(long, default_value_t = 1)]
        max_jobs: usize,
        /// Start a canary rollout of a candidate that beats production on --holdout.
        #[arg(long)]
        auto_promote: bool,
        /// Dataset the challenger is compared on.
        #[arg(long)]
        holdout: Option<String>,
        /// Label column of the holdout.
        #[arg(long)]
        label: Option<String>,
        #[arg(long, default_value_t = 0.01)]
        margin: f64,
        /// Canary size in percent.
        #[arg(long, default_value_t = 5)]
        canary: u32,
        /// With --auto-promote: run a winning candidate first as a shadow beside what
        /// every device serves (its waves the canary's); `fleetctl rollout promote ID`
        /// then starts the canary.
        #[arg(long, requires = "auto_promote")]
        shadow_first: bool,
        /// Keep the policy but stop triggering.
        #[arg(long)]
        disabled: bool,
        /// The job spec it retrains with (default: the one `retrain start` used last).
        #[arg(long)]
        spec: Option<PathBuf>,
    },
    /// The policy, the share alerting now, and what it did.
    Show {
        model: String,
        #[arg(long)]
        json: bool,
    },
}

/// `NAME@VERSION` (the `v` optional) as its API path `/v1/models/NAME/VERSION`.
pub(crate) fn version_path(model: &str) -> anyhow::Result<String> {
    let (name, version) =
        fleet_control::registry::parse_model_version(model).map_err(anyhow::Error::msg)?;
    Ok(format!("/v1/models/{name}/{version}"))
}

pub(crate) fn models_command(server: &str, cmd: ModelsCommand) -> anyhow::Result<()> {
    match cmd {
        ModelsCommand::Push { bundle: path } => {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let r = fleet_control::client::Client::new(server)?.post_bytes("/v1/models", bytes)?;
            let m = &r["model"];
            if r["unchanged"] == true {
                println!(
                    "{}@v{} is already in the registry with these bytes; nothing changed",
                    m["name"].as_str().unwrap_or("?"),
                    m["version"]
                );
            } else {
                println!(
                    "pushed {}@v{} (sha256 {}, stage {})",
                    m["name"].as_str().unwrap_or("?"),
                    m["version"],
                    m["digest"].as_str().unwrap_or("?"),
                    m["stage"].as_str().unwrap_or("?")
                );
            }
        }
        ModelsCommand::List { json } => {
            let list = fleet_control::client::Client::new(server)?.get("/v1/models")?;
            if json {
                print_json(&list)?;
            } else {
                let rows = list.as_array().cloned().unwrap_or_default();
                if rows.is_empty() {
                    println!(
                        "the registry is empty; add a model with `fleetctl models push FILE.fmb`"
                    );
                } else {
                    println!(
                        "{:<20} {:>8} {:<12} {:<16} {:>10}  SHA256",
                        "MODEL", "VERSION", "STAGE", "LABEL", "SIZE"
                    );
                    for m in rows {
                        println!(
                            "{:<20} {:>8} {:<12} {:<16} {:>10}  {}",
                            m["name"].as_str().unwrap_or("?"),
                            format!("v{}", m["version"]),
                            m["stage"].as_str().unwrap_or("?"),
                            m["label"].as_str().unwrap_or(""),
                            fleet_control::output::human_size(m["size"].as_u64().unwrap_or(0)),
                            m["digest"].as_str().unwrap_or("?").get(..16).unwrap_or("?")
                        );
                    }
                }
            }
        }
        ModelsCommand::Show { model, json } => {
            let client = fleet_control::client::Client::new(server)?;
            let v = if model.contains('@') {
                client.get(&version_path(&model)?)?
            } else {
                client.get(&format!("/v1/models/{model}"))?
            };
            if json {
                print_json(&v)?;
            } else {
                if let Some(front) = v.get("bundle") {
                    println!("{}", serde_json::to_string_pretty(front)?);
                } else {
                    for m in v["versions"].as_array().cloned().unwrap_or_default() {
                        println!(
                            "v{:<6} {:<12} {}",
                            m["version"],
                            m["stage"].as_str().unwrap_or("?"),
                            m["digest"].as_str().unwrap_or("?")
                        );
                    }
                }
                let on = v["running_on"].as_array().cloned().unwrap_or_default();
                println!("running on {} device(s)", on.len());
                for d in on {
                    println!(
                        "  {} v{} on {}{}",
                        d["device"].as_str().unwrap_or("?"),
                        d["version"],
                        d["backend"].as_str().unwrap_or("?"),
                        if d["online"] == true {
                            ""
                        } else {
                            " (offline)"
                        }
                    );
                }
            }
        }
        ModelsCommand::Compare {
            a,
            b,
            on,
            label,
            margin,
            json,
        } => {
            let r = fleet_control::client::Client::new(server)?.post(
            "/v1/compare",
            &serde_json::json!({ "a": a, "b": b, "dataset": on, "label": label, "margin": margin }),
        )?;
            if json {
                print_json(&r)?;
            } else {
                print!("{}", fleet_control::views::comparison(&r));
            }
        }
        ModelsCommand::Policy(PolicyCommand::Set {
            model,
            drift_share,
            for_,
            datasets,
            captured_since,
            cooldown,
            max_jobs,
            auto_promote,
            holdout,
            label,
            margin,
            canary,
            shadow_first,
            disabled,
            spec,
        }) => {
            let spec = match spec {
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            let r = fleet_control::client::Client::new(server)?.call_json(
                "PUT",
                &format!("/v1/models/{model}/policy"),
                &serde_json::json!({
                    "drift_share": drift_share, "for_s": for_.as_secs(), "datasets": datasets,
                    "captured_since_s": captured_since.as_secs(), "cooldown_s": cooldown.as_secs(),
                    "max_jobs": max_jobs, "auto_promote": auto_promote, "holdout": holdout,
                    "label": label, "margin": margin, "canary_pct": canary, "enabled": !disabled,
                    "shadow_first": shadow_first,
                    "spec": spec,
                }),
            )?;
            println!(
                "retraining policy of {model} set: {:.0}% of its devices alerting for {} s{}",
                drift_share * 100.0,
                for_.as_secs(),
                if r["policy"]["shadow_first"] == true {
                    ", winners run in shadow first, then to a canary once promoted"
                } else if r["policy"]["auto_promote"] == true {
                    ", winners go to a canary"
                } else {
                    ""
                }
            );
        }
        ModelsCommand::Policy(PolicyCommand::Show { model, json }) => {
            let r = fleet_control::client::Client::new(server)?
                .get(&format!("/v1/models/{model}/policy"))?;
            if json {
                print_json(&r)?;
            } else {
                println!("{}", serde_json::to_string_pretty(&r["policy"])?);
                println!(
                    "alerting now: {:.0}% of its devices",
                    r["state"]["last_share"].as_f64().unwrap_or(0.0) * 100.0
                );
                for e in r["state"]["events"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "{}  {}",
                        fleet_control::views::utc(e[0].as_u64().unwrap_or(0)),
                        e[1].as_str().unwrap_or("")
                    );
                }
            }
        }
        ModelsCommand::Reproduce {
            model,
            detach,
            json,
        } => {
            let client = fleet_control::client::Client::new(server)?;
            let job = client.post(
                &format!("{}/reproduce", version_path(&model)?),
                &serde_json::json!({}),
            )?;
            let id = job["id"].as_str().unwrap_or("?").to_string();
            if detach {
                println!("reproduction job {id} started");
                return Ok(());
            }
            eprintln!("reproduction job {id} started; waiting");
            let done = wait_job(&client, &id)?;
            let report = &done["report"];
            if json {
                print_json(report)?;
            }
            if done["state"] != "succeeded" {
                anyhow::bail!(
                    "reproduction job {id} {}: {}",
                    done["state"].as_str().unwrap_or("?"),
                    done["error"].as_str().unwrap_or("")
                );
            }
            let identical = report["artifact_sha256"]["identical"] == true;
            let within = report["metric"]["within"] == true;
            if !json {
                println!(
                    "artifact: {} (recorded {}, now {})",
                    if identical { "identical" } else { "DIFFERENT" },
                    report["artifact_sha256"]["recorded"]
                        .as_str()
                        .unwrap_or("-"),
                    report["artifact_sha256"]["now"].as_str().unwrap_or("-")
                );
                println!(
                    "{}: recorded {}, now {} ({} tolerance {})",
                    report["metric"]["name"].as_str().unwrap_or("metric"),
                    report["metric"]["recorded"],
                    report["metric"]["now"],
                    if within { "within" } else { "OUTSIDE" },
                    report["metric"]["tolerance"]
                );
                let diffs = report["lineage_differences"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if diffs.is_empty() {
                    println!("lineage: every field as recorded");
                }
                for d in diffs {
                    println!(
                        "lineage differs: {} recorded {} now {}",
                        d["field"].as_str().unwrap_or("?"),
                        d["recorded"],
                        d["now"]
                    );
                }
            }
            if !identical && !within {
                anyhow::bail!(
                    "{model} did not reproduce: the artifact differs and the metric is outside the tolerance"
                );
            }
        }
        ModelsCommand::Diff { a, b, json } => {
            let client = fleet_control::client::Client::new(server)?;
            let (va, vb) = (
                client.get(&version_path(&a)?)?,
                client.get(&version_path(&b)?)?,
            );
            let (count, text) = fleet_control::views::model_diff(&va, &vb, &a, &b);
            if json {
                print_json(
                    &serde_json::json!({ "a": a, "b": b, "differences": count, "table": text }),
                )?;
            } else {
                print!("{text}");
            }
        }
        ModelsCommand::Stage { model, stage } => {
            let r = fleet_control::client::Client::new(server)?.post(
                &format!("{}/stage", version_path(&model)?),
                &serde_json::json!({ "stage": stage }),
            )?;
            println!(
                "{model} is now in stage {}",
                r["stage"].as_str().unwrap_or("?")
            );
        }
        ModelsCommand::Tag { model, set, remove } => {
            let tags = pairs(&set)?;
            let r = fleet_control::client::Client::new(server)?.post(
                &format!("{}/tags", version_path(&model)?),
                &serde_json::json!({ "set": tags, "remove": remove }),
            )?;
            println!("{model} tags: {}", r["tags"]);
        }
    }
    Ok(())
}
