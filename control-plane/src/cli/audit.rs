//! `fleetctl audit`: the hash-chained audit log, its tail or its verification.

use super::common::*;

#[derive(Args, Debug)]
pub(crate) struct AuditArgs {
    #[command(subcommand)]
    command: Option<AuditCommand>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Only the last N entries.
    #[arg(long, default_value_t = 50)]
    last: usize,
}

#[derive(Subcommand, Debug)]
pub(crate) enum AuditCommand {
    /// Fetch the whole log and check its hash chain here; exits 1 when an entry was
    /// changed, inserted or deleted.
    Verify,
}

pub(crate) fn audit_command(server: &str, a: AuditArgs) -> anyhow::Result<()> {
    let AuditArgs {
        command,
        json,
        last,
    } = a;
    let all = fleet_control::client::Client::new(server)?.get("/v1/audit")?;
    let entries: Vec<fleet_control::auth::AuditEntry> =
        serde_json::from_value(all).context("decoding the audit log")?;
    match command {
        Some(AuditCommand::Verify) => match fleet_control::auth::verify(&entries) {
            Ok(head) => println!(
                "audit log intact: {} entries, head {head} (keep this hash elsewhere to detect a truncated tail)",
                entries.len()
            ),
            Err(e) => anyhow::bail!("audit log tampered with: {e}"),
        },
        None => {
            let tail = &entries[entries.len().saturating_sub(last)..];
            if json {
                print_json(&serde_json::to_value(tail)?)?;
            } else {
                println!(
                    "{:>6}  {:<24} {:<28} {:<9} {:<36} {:>6}  TARGET",
                    "SEQ", "WHEN (UTC)", "WHO", "ROLE", "ACTION", "RESULT"
                );
                for e in tail {
                    println!(
                        "{:>6}  {:<24} {:<28} {:<9} {:<36} {:>6}  {}",
                        e.seq,
                        fleet_control::views::utc(e.at_ms),
                        e.who,
                        e.role,
                        e.action,
                        e.outcome,
                        e.target
                    );
                }
            }
        }
    }
    Ok(())
}
