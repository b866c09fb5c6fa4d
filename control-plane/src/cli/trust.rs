//! `fleetctl trust …`: the control plane's trust policy.

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum TrustCommand {
    /// Print the policy the server verifies bundles with.
    Show,
    /// Replace it (validated first; kept in the server's DATA_DIR/trust.toml).
    Set {
        /// A trust policy from `fleetctl keys trust-policy`.
        policy: PathBuf,
    },
}

pub(crate) fn trust_command(server: &str, cmd: TrustCommand) -> anyhow::Result<()> {
    match cmd {
        TrustCommand::Show => {
            let r = fleet_control::client::Client::new(server)?.get("/v1/trust")?;
            match r["policy"].as_str() {
                Some(p) => print!("{p}"),
                None => println!(
                    "the server has no trust policy; set one with `fleetctl trust set TRUST.toml`"
                ),
            }
        }
        TrustCommand::Set { policy } => {
            // Validate here too, so a typo is named before anything is sent.
            let text = fleet_control::keys::load_policy(&policy)?.to_toml();
            fleet_control::client::Client::new(server)?.put_text("/v1/trust", text)?;
            println!("the server now verifies bundles with {}", policy.display());
        }
    }
    Ok(())
}
