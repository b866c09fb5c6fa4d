//! `fleetctl alerts`: what the notifier knows (alerts, rules, receivers), a test
//! notification, and silences.

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum AlertsCommand {
    /// Alerts firing, pending and recently resolved (firing first), with what each
    /// receiver was told; then the rules and receivers in force.
    ///
    /// Example: fleetctl alerts list --firing
    List {
        /// Only firing alerts.
        #[arg(long)]
        firing: bool,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Send a test notification now to every receiver (or one) and say whether each
    /// delivery went through; exits 1 when one failed. Audited like every delivery.
    ///
    /// Example: fleetctl alerts test --receiver pager
    Test {
        /// Only this receiver (its name in the --alerts file).
        #[arg(long)]
        receiver: Option<String>,
    },
    /// Silence the alerts whose labels match every LABEL=VALUE for a while: nothing is
    /// sent for them (they stay listed). Alertmanager's own silences work as before.
    ///
    /// Example: fleetctl alerts silence device=pi-a --for 2h --comment "replacing its SD card"
    Silence {
        /// LABEL=VALUE matchers, e.g. alertname=device_silent board=rpi4.
        #[arg(required = true, value_name = "LABEL=VALUE")]
        matchers: Vec<String>,
        /// How long: 90s, 15m, 2h, 7d (at most 30d).
        #[arg(long = "for", value_parser = parse_duration)]
        duration: std::time::Duration,
        /// Why, for whoever reads `alerts silences` next.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// The silences that have not ended.
    Silences {
        #[arg(long)]
        json: bool,
    },
    /// End a silence now.
    Unsilence {
        /// Its id (`fleetctl alerts silences`).
        id: String,
    },
}

pub(crate) fn alerts_command(server: &str, cmd: AlertsCommand) -> anyhow::Result<()> {
    let client = fleet_control::client::Client::new(server)?;
    match cmd {
        AlertsCommand::List { firing, json } => {
            let mut v = client.get("/v1/alerts")?;
            if firing && let Some(list) = v["alerts"].as_array_mut() {
                list.retain(|a| a["state"] == "firing");
            }
            if json {
                return print_json(&v);
            }
            print_list(&v);
            Ok(())
        }
        AlertsCommand::Test { receiver } => {
            let v = client.post(
                "/v1/alerts/test",
                &serde_json::json!({ "receiver": receiver }),
            )?;
            let mut failed = 0;
            for r in v["results"].as_array().into_iter().flatten() {
                if r["delivered"] == true {
                    println!(
                        "{} ({}): delivered, HTTP {}",
                        r["receiver"].as_str().unwrap_or(""),
                        r["kind"].as_str().unwrap_or(""),
                        r["status"]
                    );
                } else {
                    failed += 1;
                    println!(
                        "{} ({}): FAILED: {}",
                        r["receiver"].as_str().unwrap_or(""),
                        r["kind"].as_str().unwrap_or(""),
                        r["error"].as_str().unwrap_or("")
                    );
                }
            }
            anyhow::ensure!(
                failed == 0,
                "{failed} receiver(s) did not take the test notification"
            );
            Ok(())
        }
        AlertsCommand::Silence {
            matchers,
            duration,
            comment,
        } => {
            let v = client.post(
                "/v1/alerts/silences",
                &serde_json::json!({
                    "matchers": pairs(&matchers)?,
                    "duration_s": duration.as_secs(),
                    "comment": comment,
                }),
            )?;
            println!(
                "silence {} until {} (fleetctl alerts unsilence {} ends it)",
                v["id"].as_str().unwrap_or(""),
                time(v["ends_ms"].as_u64()),
                v["id"].as_str().unwrap_or("")
            );
            Ok(())
        }
        AlertsCommand::Silences { json } => {
            let v = client.get("/v1/alerts/silences")?;
            if json {
                return print_json(&v);
            }
            println!(
                "{:<18} {:<24} {:<18} MATCHERS / COMMENT",
                "ID", "UNTIL", "BY"
            );
            for s in v["silences"].as_array().into_iter().flatten() {
                let matchers: Vec<String> = s["matchers"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect();
                println!(
                    "{:<18} {:<24} {:<18} {} {}",
                    s["id"].as_str().unwrap_or(""),
                    time(s["ends_ms"].as_u64()),
                    s["by"].as_str().unwrap_or(""),
                    matchers.join(" "),
                    s["comment"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        AlertsCommand::Unsilence { id } => {
            client.delete(&format!(
                "/v1/alerts/silences/{}",
                fleet_control::client::encode(&id)
            ))?;
            println!("silence {id} ended");
            Ok(())
        }
    }
}

fn time(ms: Option<u64>) -> String {
    ms.map(|ms| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string()
    })
    .unwrap_or_default()
}

fn print_list(v: &serde_json::Value) {
    let now = now_ms();
    let alerts = v["alerts"].as_array().cloned().unwrap_or_default();
    if alerts.is_empty() {
        println!("no alerts");
    } else {
        println!(
            "{:<9} {:<22} {:<9} {:<10} {:<34} SUMMARY",
            "STATE", "ALERT", "SEVERITY", "SINCE", "TOLD"
        );
    }
    for a in &alerts {
        let since = a["fired_ms"]
            .as_u64()
            .or(a["seen_ms"].as_u64())
            .unwrap_or(now);
        let age = std::time::Duration::from_secs(now.saturating_sub(since) / 1000);
        let told: Vec<String> = a["told"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(r, t)| match t["error"].as_str() {
                Some(e) if !e.is_empty() => format!("{r}: retrying ({} failed)", t["attempts"]),
                _ => format!("{r}: {}", t["state"].as_str().unwrap_or("-")),
            })
            .collect();
        let mut state = a["state"].as_str().unwrap_or("").to_string();
        if a["silenced_by"].as_array().is_some_and(|s| !s.is_empty()) {
            state.push('*');
        }
        println!(
            "{:<9} {:<22} {:<9} {:<10} {:<34} {}",
            state,
            a["labels"]["alertname"].as_str().unwrap_or(""),
            a["labels"]["severity"].as_str().unwrap_or(""),
            humantime::format_duration(age)
                .to_string()
                .split(' ')
                .take(2)
                .collect::<Vec<_>>()
                .join(" "),
            if told.is_empty() {
                "-".to_string()
            } else {
                told.join(", ")
            },
            a["annotations"]["summary"].as_str().unwrap_or("")
        );
    }
    if alerts
        .iter()
        .any(|a| a["silenced_by"].as_array().is_some_and(|s| !s.is_empty()))
    {
        println!("(* silenced: fleetctl alerts silences)");
    }
    let receivers = v["receivers"].as_array().cloned().unwrap_or_default();
    println!();
    if receivers.is_empty() {
        println!(
            "no receivers: alerts are sent nowhere (fleetctl serve --alerts FILE; docs/ALERTS.md)"
        );
    } else {
        println!("receivers:");
        for r in &receivers {
            println!(
                "  {:<16} {:<13} {}{}",
                r["name"].as_str().unwrap_or(""),
                r["kind"].as_str().unwrap_or(""),
                r["url"].as_str().unwrap_or(""),
                if r["send_resolved"] == false {
                    " (no resolved notices)"
                } else {
                    ""
                }
            );
        }
    }
    println!("rules:");
    for r in v["rules"].as_array().into_iter().flatten() {
        println!(
            "  {:<22} {:<20} for {:>4}s  {:<9} -> {}",
            r["name"].as_str().unwrap_or(""),
            r["when"].as_str().unwrap_or(""),
            r["for_s"],
            r["severity"].as_str().unwrap_or(""),
            r["receivers"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", "))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "(none)".into())
        );
    }
}
