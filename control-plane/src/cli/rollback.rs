//! `fleetctl rollback MODEL`: every selected device back to its previous version (or `--to V`), as one rollout wave.

use super::common::*;
use super::rollout::watch;

#[derive(Args, Debug)]
pub(crate) struct RollbackArgs {
    /// The model to roll back.
    model: String,
    /// Return to this version instead of each device's previous one.
    #[arg(long)]
    to: Option<u64>,
    /// Only these devices (selector, as for `rollout start --to`; default: all).
    #[arg(long)]
    devices: Option<String>,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// Start it and return without following its progress.
    #[arg(long)]
    detach: bool,
}

pub(crate) fn rollback_command(server: &str, a: RollbackArgs) -> anyhow::Result<()> {
    let RollbackArgs {
        model,
        to,
        devices,
        yes,
        detach,
    } = a;
    let client = fleet_control::client::Client::new(server)?;
    let body = |dry_run: bool| serde_json::json!({ "model": model, "to": to, "devices": devices, "dry_run": dry_run });
    let plan = client.post("/v1/rollbacks", &body(true))?;
    println!("roll back {model}:");
    for d in plan["devices"].as_array().cloned().unwrap_or_default() {
        println!(
            "  {:<24} v{} -> v{}",
            d["device"].as_str().unwrap_or("?"),
            d["from"],
            d["to"]
        );
    }
    for d in plan["skipped"].as_array().cloned().unwrap_or_default() {
        println!(
            "  {:<24} skipped: {}",
            d["device"].as_str().unwrap_or("?"),
            d["reason"].as_str().unwrap_or("")
        );
    }
    if !yes && !confirm("continue?")? {
        anyhow::bail!("not rolled back (nothing changed)");
    }
    let r = client.post("/v1/rollbacks", &body(false))?;
    let id = r["id"].as_str().unwrap_or("?").to_string();
    println!("rollback {id} started");
    if !detach {
        watch(&client, &id)?;
    }
    Ok(())
}
