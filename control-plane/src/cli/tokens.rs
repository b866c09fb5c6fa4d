//! `fleetctl tokens …`: operator tokens.

use fleet_control::api::types::{CreatedToken, TokenInfo, TokenRequest};

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
            let request = TokenRequest {
                name: name.unwrap_or_else(|| format!("{role} token")),
                role,
            };
            let r: CreatedToken =
                fleet_control::client::Client::new(server)?.post_as("/v1/tokens", &request)?;
            eprintln!(
                "created token {} ({}, role {}); it is shown only now:",
                r.id,
                r.name,
                r.role.as_str()
            );
            println!("{}", r.token);
        }
        TokensCommand::List { json } => {
            let list: Vec<TokenInfo> =
                fleet_control::client::Client::new(server)?.get_as("/v1/tokens")?;
            if json {
                print_json(&serde_json::to_value(&list)?)?;
            } else {
                println!("{:<16} {:<10} {:<40} CREATED BY", "ID", "ROLE", "NAME");
                for t in &list {
                    println!(
                        "{:<16} {:<10} {:<40} {}",
                        t.id,
                        t.role.as_str(),
                        t.name,
                        t.created_by
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
