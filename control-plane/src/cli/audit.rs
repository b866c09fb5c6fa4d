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
    /// Check the whole log's chain (every entry MACed with the audit key, each naming the
    /// one before); exits 1 when an entry was changed, inserted or deleted. The server
    /// checks it with its key; with --key, this command fetches the log page by page and
    /// checks it here, trusting nothing the server says.
    ///
    /// Example: fleetctl audit verify --head 3f2a…  (a head an earlier verify printed)
    Verify {
        /// A head hash an earlier `audit verify` printed and you kept elsewhere: the log
        /// must still contain it, so a log rewritten or cut before it fails. Repeatable.
        #[arg(long)]
        head: Vec<String>,
        /// A copy of the audit key (DATA_DIR/audit.key or `serve --audit-key`): check
        /// here instead of asking the server.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

/// Entries fetched per request by `audit verify --key`.
const PAGE: usize = 10_000;

pub(crate) fn audit_command(server: &str, a: AuditArgs) -> anyhow::Result<()> {
    let AuditArgs {
        command,
        json,
        last,
    } = a;
    let client = fleet_control::client::Client::new(server)?;
    match command {
        Some(AuditCommand::Verify { head, key: None }) => verify_remote(&client, head),
        Some(AuditCommand::Verify {
            head,
            key: Some(key),
        }) => verify_here(&client, head, &key),
        None => tail(&client, json, last),
    }
}

fn intact(entries: u64, head: &str) {
    println!(
        "audit log intact: {entries} entries, head {head} (keep this hash elsewhere and pass it as --head to detect a rewritten or truncated log)"
    );
}

/// `audit verify`: the server walks the chain with its key.
fn verify_remote(client: &fleet_control::client::Client, head: Vec<String>) -> anyhow::Result<()> {
    let answer = client.get(&format!("/v1/audit/verify?head={}", head.join(",")))?;
    if answer["intact"] == true {
        intact(
            answer["entries"].as_u64().unwrap_or_default(),
            answer["head"].as_str().unwrap_or_default(),
        );
        Ok(())
    } else {
        anyhow::bail!(
            "audit log tampered with: {}",
            answer["error"].as_str().unwrap_or("(no reason given)")
        )
    }
}

/// `audit verify --key`: the whole chain fetched page by page and checked here.
fn verify_here(
    client: &fleet_control::client::Client,
    head: Vec<String>,
    key: &std::path::Path,
) -> anyhow::Result<()> {
    let key = fleet_control::auth::AuditKey::read(key)?;
    let walked = fleet_control::auth::Chain::anchored(key, head).walk(PAGE, |from, limit| {
        let page = client.get(&format!("/v1/audit?from={from}&limit={limit}"))?;
        serde_json::from_value::<Vec<fleet_control::auth::AuditEntry>>(page)
            .context("decoding the audit log")
    })?;
    match walked {
        Ok(chain) => {
            intact(chain.checked, chain.head());
            Ok(())
        }
        Err(e) => anyhow::bail!("audit log tampered with: {e}"),
    }
}

/// `audit`: the last `last` entries.
fn tail(client: &fleet_control::client::Client, json: bool, last: usize) -> anyhow::Result<()> {
    let all = client.get("/v1/audit")?;
    let entries: Vec<fleet_control::auth::AuditEntry> =
        serde_json::from_value(all).context("decoding the audit log")?;
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
    Ok(())
}
