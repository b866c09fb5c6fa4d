//! `fleetctl broker …`: what an external broker needs to enforce the fleet's rules.

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum BrokerCommand {
    /// Write what an external broker needs to let each enrolled device use only its own
    /// topics (publish its status/telemetry/events, read its cmd) and the control plane
    /// read all and write commands. Run again after enrolling, revoking or rotating
    /// devices, then reload the broker. Admin only.
    ///
    /// mosquitto (default): a password file (`passwd`, mode 0600: every enrolled device
    /// and the ingest's user of --mqtt-url), an ACL file (`acl`) and `fleetml.conf`, the
    /// mosquitto.conf lines that use them; reload with `kill -HUP`.
    ///
    /// nats: `nats-auth.conf` (mode 0600), an `authorization` block with every device
    /// (MQTT logins only), the --mqtt-url user and the --ingest-queue user, passwords as
    /// bcrypt hashes; `include` it in every node's configuration (a path relative to
    /// that file's folder) and reload each node (`nats-server --signal reload`).
    /// Refused when the server does not know one of its own passwords (the block would
    /// lock the control plane out).
    #[command(verbatim_doc_comment)]
    Acl {
        /// The folder to write into (created; files replaced atomically).
        #[arg(long)]
        out: PathBuf,
        /// The broker the files are for.
        #[arg(long, value_enum, default_value_t = Broker::Mosquitto)]
        broker: Broker,
    },
}

/// The external brokers `fleetctl broker acl` writes for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Broker {
    /// mosquitto 2.x: password file, ACL file, mosquitto.conf lines.
    Mosquitto,
    /// A NATS cluster with MQTT enabled (nats-server 2.9 or later): an authorization block.
    Nats,
}

pub(crate) fn broker_command(server: &str, cmd: BrokerCommand) -> anyhow::Result<()> {
    match cmd {
        BrokerCommand::Acl {
            out,
            broker: Broker::Nats,
        } => {
            let r = fleet_control::client::Client::new(server)?.get("/v1/broker/nats")?;
            let conf = r["conf"].as_str().context(
                "the server's answer has no `conf` (a server older than this fleetctl?)",
            )?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let path = std::fs::canonicalize(&out)?.join("nats-auth.conf");
            fleet_control::output::write_atomic(&path, 0o600, |f| {
                use std::io::Write;
                f.write_all(conf.as_bytes())?;
                Ok(())
            })?;
            let queue = match r["queue_user"].as_str() {
                Some(q) if q != r["ingest_user"] => format!(" and the ingest queue's user {q:?}"),
                _ => String::new(),
            };
            println!(
                "wrote {} ({} devices, the control plane's user {}{queue}); copy it beside every node's configuration and add `include \"nats-auth.conf\"` there (nats-server reads include paths relative to the configuration's folder), then reload each node (nats-server --signal reload=PID, or kill -HUP)",
                path.display(),
                r["devices"],
                r["ingest_user"],
            );
        }
        BrokerCommand::Acl {
            out,
            broker: Broker::Mosquitto,
        } => {
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
