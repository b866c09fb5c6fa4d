//! `fleetctl data …`: datasets, imports, captures, profiles.

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum DataCommand {
    /// Import a CSV, JSON-lines or Parquet file, or the rows of a PostgreSQL query, as
    /// an immutable dataset.
    ///
    /// Example: fleetctl data import --postgres postgres://reader@db:5432/claims --query "SELECT * FROM claims"
    Import {
        /// The file (its extension picks the format unless --format says).
        #[arg(required_unless_present = "postgres", conflicts_with = "postgres")]
        file: Option<PathBuf>,
        /// A PostgreSQL connection string (postgres://USER[:PASSWORD]@HOST[:PORT]/DB);
        /// the password never reaches the dataset's manifest.
        #[arg(long, requires = "query")]
        postgres: Option<String>,
        /// The SQL query whose rows become the dataset (with --postgres).
        #[arg(long, requires = "postgres")]
        query: Option<String>,
        /// With `sslmode=require` in the URL: the CA (PEM) the server's certificate is
        /// checked against; default PGSSLROOTCERT, else the system's CA store.
        #[arg(long, requires = "postgres")]
        postgres_ca: Option<PathBuf>,
        /// csv, jsonl or parquet.
        #[arg(long)]
        format: Option<String>,
        /// A human label for it.
        #[arg(long)]
        name: Option<String>,
        /// Drop rows missing a value in any of these comma-separated columns.
        #[arg(long)]
        drop_na: Option<String>,
    },
    /// A dataset from the data devices captured for MODEL.
    Capture {
        model: String,
        /// Only rows captured within this long before now (s, m, h, d), e.g. 7d.
        #[arg(long, value_parser = parse_duration)]
        since: Option<std::time::Duration>,
        /// Only rows with a ground-truth label.
        #[arg(long)]
        labelled_only: bool,
        /// Name of the label column (the training target), default `label`.
        #[arg(long)]
        label_column: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
    /// Every dataset: id, name, rows, columns, sources.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One dataset's manifest (ids may be shortened to 8+ hex digits).
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a dataset to a file (Parquet, or CSV with --format csv).
    Export {
        id: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "parquet")]
        format: String,
    },
    /// Per-column distribution, missingness, association with --target and drift
    /// against a bundle's reference profile; a table, and a self-contained HTML report
    /// with --html.
    Profile {
        id: String,
        #[arg(long)]
        target: Option<String>,
        /// NAME@VERSION whose reference profile is the drift baseline.
        #[arg(long)]
        reference: Option<String>,
        /// Also write the HTML report here.
        #[arg(long)]
        html: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a dataset (models trained on it can no longer be reproduced).
    Delete {
        id: String,
        #[arg(long)]
        yes: bool,
    },
}

pub(crate) fn data_command(server: &str, cmd: DataCommand) -> anyhow::Result<()> {
    let client = fleet_control::client::Client::new(server)?;
    match cmd {
        DataCommand::Import {
            file,
            postgres,
            query,
            postgres_ca,
            format,
            name,
            drop_na,
        } => {
            let (format, bytes, source) = match (file, postgres, query) {
                (_, Some(url), Some(sql)) => {
                    let (body, rows) =
                        fleet_control::pg::query_csv(&url, &sql, postgres_ca.as_deref())?;
                    let from = fleet_control::pg::describe(&url)?;
                    eprintln!("{rows} rows from {from}");
                    ("csv".to_string(), body, format!("{from}: {sql}"))
                }
                (Some(file), _, _) => {
                    let bytes = std::fs::read(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    let format = format.unwrap_or_else(|| {
                        match file.extension().and_then(|e| e.to_str()).unwrap_or("") {
                            "parquet" | "pq" => "parquet",
                            "jsonl" | "ndjson" | "json" => "jsonl",
                            _ => "csv",
                        }
                        .to_string()
                    });
                    (format, bytes, format!("file {}", file.display()))
                }
                _ => anyhow::bail!("give a FILE, or --postgres URL --query SQL"),
            };
            let mut query = vec![("format", format.clone()), ("source", source)];
            if let Some(n) = name {
                query.push(("name", n));
            }
            if let Some(d) = drop_na {
                query.push(("drop_na", d));
            }
            let qs: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{k}={}", fleet_control::client::encode(v)))
                .collect();
            let r = client.post_raw(
                &format!("/v1/datasets?{}", qs.join("&")),
                "application/octet-stream",
                bytes,
            )?;
            if r["created"] == false {
                print!("already stored: ");
            }
            print_dataset(&r["dataset"]);
        }
        DataCommand::Capture {
            model,
            since,
            labelled_only,
            label_column,
            name,
        } => {
            let since_ms = since.map(|d| now_ms().saturating_sub(d.as_millis() as u64));
            let r = client.post(
                "/v1/datasets/from-captures",
                &serde_json::json!({
                    "model": model, "since_ms": since_ms, "labelled_only": labelled_only,
                    "label_column": label_column, "name": name,
                }),
            )?;
            print_dataset(&r["dataset"]);
        }
        DataCommand::List { json } => {
            let list = client.get("/v1/datasets")?;
            if json {
                print_json(&list)?;
            } else {
                println!(
                    "{:<16} {:>9} {:>7}  {:<19}  {:<30} SOURCES",
                    "ID", "ROWS", "COLUMNS", "CREATED (UTC)", "NAME"
                );
                for m in list.as_array().cloned().unwrap_or_default() {
                    println!(
                        "{:<16} {:>9} {:>7}  {:<19}  {:<30} {}",
                        m["id"].as_str().unwrap_or("?").get(..16).unwrap_or("?"),
                        m["rows"],
                        m["schema"].as_array().map_or(0, Vec::len),
                        fleet_control::views::utc(m["created_ms"].as_u64().unwrap_or(0)),
                        m["name"].as_str().unwrap_or("?"),
                        m["sources"]
                            .as_array()
                            .map(|s| s
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join("; "))
                            .unwrap_or_default()
                    );
                }
            }
        }
        DataCommand::Show { id, json } => {
            let m = client.get(&format!("/v1/datasets/{id}"))?;
            if json {
                print_json(&m)?;
            } else {
                print_dataset(&m);
                println!(
                    "created {} UTC",
                    fleet_control::views::utc(m["created_ms"].as_u64().unwrap_or(0))
                );
                for key in ["sources", "devices", "filters"] {
                    let items: Vec<String> = m[key]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect();
                    if !items.is_empty() {
                        println!("{key}: {}", items.join(", "));
                    }
                }
                if let Some(r) = m["time_range"].as_array() {
                    println!(
                        "time range: {} .. {} UTC",
                        fleet_control::views::utc(r[0].as_u64().unwrap_or(0)),
                        fleet_control::views::utc(r[1].as_u64().unwrap_or(0))
                    );
                }
                if m["available"] == false {
                    println!("its data file is missing");
                }
                for c in m["schema"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "  {:<30} {}",
                        c["name"].as_str().unwrap_or("?"),
                        c["kind"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        DataCommand::Export { id, out, format } => {
            let bytes = client.get_bytes(&format!("/v1/datasets/{id}/data?format={format}"))?;
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} ({} bytes, {format})", out.display(), bytes.len());
        }
        DataCommand::Profile {
            id,
            target,
            reference,
            html,
            json,
        } => {
            let mut q = Vec::new();
            if let Some(t) = &target {
                q.push(format!("target={}", fleet_control::client::encode(t)));
            }
            if let Some(r) = &reference {
                q.push(format!("reference={}", fleet_control::client::encode(r)));
            }
            let p = client.get(&format!("/v1/datasets/{id}/profile?{}", q.join("&")))?;
            if json {
                print_json(&p)?;
            } else {
                print!("{}", fleet_control::profile::table(&p));
            }
            if let Some(path) = html {
                let page = fleet_control::profile::html(&p, &format!("dataset {id}"));
                std::fs::write(&path, page)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
        DataCommand::Delete { id, yes } => {
            let m = client.get(&format!("/v1/datasets/{id}"))?;
            print_dataset(&m);
            if !yes && !confirm("delete it? models trained on it can no longer be reproduced")? {
                anyhow::bail!("not deleted");
            }
            client.delete(&format!("/v1/datasets/{}", m["id"].as_str().unwrap_or(&id)))?;
            println!("deleted");
        }
    }
    Ok(())
}

pub(crate) fn print_dataset(m: &serde_json::Value) {
    println!(
        "dataset {} ({}): {} rows, {} columns",
        m["id"].as_str().unwrap_or("?"),
        m["name"].as_str().unwrap_or("?"),
        m["rows"],
        m["schema"].as_array().map_or(0, Vec::len)
    );
}
