//! `fleetctl trainers …`: the commands training jobs may run (admin).

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum TrainersCommand {
    /// Register (or replace) a trainer from a TOML file: `command` (with placeholders
    /// {train_csv}, {seed}, {param:NAME}, {out}, …), `executor` (local | kubernetes),
    /// `image` and `[kubernetes]`, `code_dir`, `env`, `description`. Job specs then name it
    /// (`trainer = "NAME"`) instead of a command. Admin only.
    Add {
        name: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// The registered trainers.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a trainer: jobs and drift policies naming it are refused from then on.
    Remove { name: String },
}

pub(crate) fn trainers_command(server: &str, cmd: TrainersCommand) -> anyhow::Result<()> {
    let client = fleet_control::client::Client::new(server)?;
    match cmd {
        TrainersCommand::Add { name, file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let r = client.put_text(
                &format!("/v1/trainers/{}", fleet_control::client::encode(&name)),
                text,
            )?;
            let verb = if r["replaced"] == true {
                "replaced"
            } else {
                "registered"
            };
            println!("{verb} trainer {name}");
        }
        TrainersCommand::List { json } => {
            let r = client.get("/v1/trainers")?;
            if json {
                return print_json(&r);
            }
            let Some(all) = r.as_object().filter(|m| !m.is_empty()) else {
                println!(
                    "no trainers: an admin registers one with `fleetctl trainers add NAME --file TRAINER.toml`"
                );
                return Ok(());
            };
            println!("{:<20} {:<10} COMMAND", "TRAINER", "EXECUTOR");
            for (name, t) in all {
                let what = match t["image"].as_str() {
                    Some(image) => image.to_string(),
                    None => t["command"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str())
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default(),
                };
                println!(
                    "{name:<20} {:<10} {what}",
                    t["executor"].as_str().unwrap_or("local")
                );
            }
        }
        TrainersCommand::Remove { name } => {
            client.delete(&format!(
                "/v1/trainers/{}",
                fleet_control::client::encode(&name)
            ))?;
            println!("removed trainer {name}");
        }
    }
    Ok(())
}
