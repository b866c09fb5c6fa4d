//! `fleetctl broker …`: what an external broker needs to enforce the fleet's rules.

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum BrokerCommand {
    /// Write a mosquitto password file (`passwd`, mode 0600: every enrolled device and
    /// the ingest's user of --mqtt-url), an ACL file (`acl`: each device publishes only
    /// to its own status/telemetry/events and reads only its own cmd; the ingest reads
    /// all and writes commands) and `fleetml.conf`, the mosquitto.conf lines that use
    /// them. Run again after enrolling devices, then `kill -HUP` mosquitto. Admin only.
    Acl {
        /// The folder to write into (created; files replaced atomically).
        #[arg(long)]
        out: PathBuf,
    },
}

pub(crate) fn broker_command(server: &str, cmd: BrokerCommand) -> anyhow::Result<()> {
    match cmd {
        BrokerCommand::Acl { out } => {
            let r = fleet_control::client::Client::new(server)?.get("/v1/broker/mosquitto")?;
            let text = |k: &str| {
                r[k].as_str().map(str::to_string).with_context(|| {
                    format!("the server's answer has no `{k}` (different versions?)")
                })
            };
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let dir = std::fs::canonicalize(&out)?;
            let write = |name: &str, mode: u32, body: String| {
                fleet_control::output::write_atomic(&dir.join(name), mode, |f| {
                    use std::io::Write;
                    f.write_all(body.as_bytes())?;
                    Ok(())
                })
            };
            write("passwd", 0o600, text("passwd")?)?;
            write("acl", 0o644, text("acl")?)?;
            write(
                "fleetml.conf",
                0o644,
                fleet_control::mosquitto::conf_snippet(&dir.display().to_string()),
            )?;
            println!(
                "wrote {dir}/passwd ({} devices{}), {dir}/acl and {dir}/fleetml.conf; include fleetml.conf in mosquitto.conf, then reload mosquitto (kill -HUP)",
                r["devices"],
                if r["ingest_password_known"] == true {
                    format!(" and the ingest's user {}", r["ingest_user"])
                } else {
                    format!(
                        "; add the ingest's user {} with mosquitto_passwd: the server was not started with --mqtt-url USER:PASSWORD@…",
                        r["ingest_user"]
                    )
                },
                dir = dir.display()
            );
        }
    }
    Ok(())
}
