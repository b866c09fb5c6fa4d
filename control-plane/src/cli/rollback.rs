//! `fleetctl rollback MODEL`: every selected device back to its previous version (or `--to V`), as one rollout wave.

use fleet_control::api::types::{RollbackPlan, RollbackRequest};

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
    let request = |dry_run: bool| RollbackRequest {
        model: model.clone(),
        to,
        devices: devices.clone(),
        dry_run,
    };
    let plan: RollbackPlan = client.post_as("/v1/rollbacks", &request(true))?;
    println!("roll back {model}:");
    for d in &plan.devices {
        let from = d.from.map_or("none".to_string(), |v| format!("v{v}"));
        println!("  {:<24} {from} -> v{}", d.device, d.to);
    }
    for d in &plan.skipped {
        println!("  {:<24} skipped: {}", d.device, d.reason);
    }
    if !yes && !confirm("continue?")? {
        anyhow::bail!("not rolled back (nothing changed)");
    }
    let r = client.post("/v1/rollbacks", &serde_json::to_value(request(false))?)?;
    let id = r["id"]
        .as_str()
        .context("the server's answer to the rollback names no rollback id")?
        .to_string();
    println!("rollback {id} started");
    if !detach {
        watch(&client, &id)?;
    }
    Ok(())
}
