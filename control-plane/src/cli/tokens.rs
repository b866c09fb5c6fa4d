//! `fleetctl tokens …`: operator tokens.

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum TokensCommand {
    /// Create a token; it is printed once and stored only as a hash.
    Create {
        /// viewer (read), operator (push, rollouts, rollback), admin (tokens, trust, enrollment).
        #[arg(long)]
        role: String,
        /// Who or what uses it (shown in the audit log; default: "ROLE token").
        #[arg(long)]
        name: Option<String>,
    },
    /// Tokens by id, name and role (never the tokens themselves).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id.
    Revoke { id: String },
}

pub(crate) fn tokens_command(server: &str, cmd: TokensCommand) -> anyhow::Result<()> {
    match cmd {
        TokensCommand::Create { role, name } => {
            let r = fleet_control::client::Client::new(server)?.post(
                "/v1/tokens",
                &serde_json::json!({
                    "name": name.unwrap_or_else(|| format!("{role} token")),
                    "role": role,
                }),
            )?;
            eprintln!(
                "created token {} ({}, role {}); it is shown only now:",
                r["id"].as_str().unwrap_or("?"),
                r["name"].as_str().unwrap_or("?"),
                r["role"].as_str().unwrap_or("?")
            );
            println!("{}", r["token"].as_str().unwrap_or("?"));
        }
        TokensCommand::List { json } => {
            let list = fleet_control::client::Client::new(server)?.get("/v1/tokens")?;
            if json {
                print_json(&list)?;
            } else {
                println!("{:<16} {:<10} {:<40} CREATED BY", "ID", "ROLE", "NAME");
                for t in list.as_array().cloned().unwrap_or_default() {
                    println!(
                        "{:<16} {:<10} {:<40} {}",
                        t["id"].as_str().unwrap_or("?"),
                        t["role"].as_str().unwrap_or("?"),
                        t["name"].as_str().unwrap_or("?"),
                        t["created_by"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        TokensCommand::Revoke { id } => {
            fleet_control::client::Client::new(server)?.delete(&format!("/v1/tokens/{id}"))?;
            println!("revoked token {id}");
        }
    }
    Ok(())
}
