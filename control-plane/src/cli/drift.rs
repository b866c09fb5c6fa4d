//! `fleetctl drift`: open drift alerts across the fleet, by model and device.

use super::common::*;

#[derive(Args, Debug)]
pub(crate) struct DriftArgs {
    /// Only this model.
    #[arg(long)]
    model: Option<String>,
    /// Only this device.
    #[arg(long)]
    device: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn drift_command(server: &str, a: DriftArgs) -> anyhow::Result<()> {
    let DriftArgs {
        model,
        device,
        json,
    } = a;
    let mut query = Vec::new();
    if let Some(m) = &model {
        query.push(format!("model={m}"));
    }
    if let Some(d) = &device {
        query.push(format!("device={d}"));
    }
    let path = if query.is_empty() {
        "/v1/drift".to_string()
    } else {
        format!("/v1/drift?{}", query.join("&"))
    };
    let rows = fleet_control::client::Client::new(server)?.get(&path)?;
    if json {
        print_json(&rows)?;
    } else {
        print!(
            "{}",
            fleet_control::views::drift_table(
                rows.as_array().map(Vec::as_slice).unwrap_or_default()
            )
        );
    }
    Ok(())
}
