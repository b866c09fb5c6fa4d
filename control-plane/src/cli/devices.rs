//! `fleetctl devices …`: enrolment and the fleet inventory.

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum DevicesCommand {
    /// Issue a device id and secret and write a complete agent config, so that
    /// `fleet-agent run --config agent.toml --data-dir D` joins the fleet.
    Enroll {
        /// The device id: 1-64 lowercase letters, digits, `-`, `_`, `.`.
        name: String,
        /// Board profile name the device runs on (e.g. raspberry-pi-4).
        #[arg(long)]
        board: Option<String>,
        /// Free tags: k=v,k=v.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        /// Trust policy to write into the config when the server has none (--trust of serve).
        #[arg(long)]
        trust: Option<PathBuf>,
        /// Where to write the agent config (mode 0600: it holds the device secret).
        #[arg(long)]
        out: PathBuf,
    },
    /// Devices with board, tags, online/offline and last seen, active models, open alerts.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One device: status, latest windows, recent events.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Ask a device to send its status now (command over MQTT; the answer arrives as
    /// an acknowledgement in `devices show`).
    SendStatus { id: String },
    /// Lock a device out at once: its MQTT logins, HTTP token and messages are refused,
    /// a connection it holds is cut at its next packet (within its 30 s keep-alive).
    /// Audited. `rotate` gives it a new secret (and lifts this). Admin only.
    Revoke {
        id: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Give a device a new secret and write its new agent config (mode 0600); the old
    /// secret is refused at once. Messages still in the device's outbox were sealed with
    /// the old secret and are refused: rotate a device that is connected and caught up,
    /// or accept their loss. Admin only.
    Rotate {
        id: String,
        /// Where to write the new agent config.
        #[arg(long)]
        out: PathBuf,
        /// Trust policy to write into the config when the server has none.
        #[arg(long)]
        trust: Option<PathBuf>,
    },
}

pub(crate) fn enroll(
    server: &str,
    name: String,
    board: Option<String>,
    tags: Vec<String>,
    trust: Option<PathBuf>,
    out: PathBuf,
) -> anyhow::Result<()> {
    use fleet_control::client::Client;
    anyhow::ensure!(
        !out.exists(),
        "{} already exists; refusing to overwrite a device config",
        out.display()
    );
    let tag_map = pairs(&tags).context("--tags")?;
    let local_trust = match &trust {
        Some(p) => Some(fleet_control::keys::load_policy(p)?.to_toml()),
        None => None,
    };
    let client = Client::new(server)?;
    let r = client.post(
        "/v1/devices",
        &serde_json::json!({ "id": name, "board": board, "tags": tag_map }),
    )?;
    write_config(&r, &board, local_trust, &out, "enrolled")
}

/// Writes `out` (mode 0600), the agent config of the device `r` (an enrolment or
/// rotation answer) describes.
fn write_config(
    r: &serde_json::Value,
    board: &Option<String>,
    local_trust: Option<String>,
    out: &std::path::Path,
    verb: &str,
) -> anyhow::Result<()> {
    let policy = r["trust_policy"]
        .as_str()
        .map(str::to_string)
        .or(local_trust);
    let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
    let mut table = toml::Table::new();
    for key in ["device_id", "device_secret", "control_plane", "mqtt_url"] {
        table.insert(key.into(), toml::Value::String(s(key)));
    }
    // The board the control plane lists the device as: its status reports the same.
    if let Some(b) = r["board"].as_str().or(board.as_deref()) {
        table.insert("enrolled_board".into(), toml::Value::String(b.to_string()));
    }
    // The CA the device checks the control plane and the broker against: pinned here,
    // or the device's system store when the server's certificate is a public one.
    if let Some(ca) = r["tls_ca"].as_str() {
        table.insert("tls_ca".into(), toml::Value::String(ca.to_string()));
    } else if r["tls_ca_system"] == true {
        table.insert("tls_ca_system".into(), toml::Value::Boolean(true));
    }
    match &policy {
        Some(p) => {
            let policy: toml::Table = toml::from_str(p).context("the trust policy")?;
            table.insert("trust_policy".into(), toml::Value::Table(policy));
        }
        None => eprintln!(
            "warning: no trust policy (the server has none and --trust was not given): \
             add `trust = \"PATH\"` to {} before the agent installs bundles",
            out.display()
        ),
    }
    let mut text = format!(
        "# fleetml agent configuration of device {id}, written by `fleetctl devices enroll`.\n\
         # It holds the device secret: keep it mode 0600, off shared storage and version control.\n\
         # Run: fleet-agent run --config THIS_FILE --data-dir /var/lib/fleetml\n",
        id = s("device_id"),
    );
    if let Some(b) = board {
        text.push_str(&format!(
            "# Board profile: {b} (add `board = \"/path/to/{b}.toml\"` to use its backend order).\n"
        ));
    }
    text.push_str(&toml::to_string(&table).context("writing the agent config")?);
    fleet_control::output::create_new(out, 0o600, text.as_bytes())?;
    println!(
        "{verb} {} -> {} (mode 0600; it holds the device secret)",
        s("device_id"),
        out.display()
    );
    Ok(())
}

pub(crate) fn devices_command(server: &str, cmd: DevicesCommand) -> anyhow::Result<()> {
    match cmd {
        DevicesCommand::Enroll {
            name,
            board,
            tags,
            trust,
            out,
        } => enroll(server, name, board, tags, trust, out)?,
        DevicesCommand::List { json } => {
            let list = fleet_control::client::Client::new(server)?.get("/v1/devices")?;
            if json {
                print_json(&list)?;
            } else {
                print!(
                    "{}",
                    fleet_control::views::devices_table(
                        list.as_array().map(Vec::as_slice).unwrap_or_default(),
                        now_ms()
                    )
                );
            }
        }
        DevicesCommand::Show { id, json } => {
            let d =
                fleet_control::client::Client::new(server)?.get(&format!("/v1/devices/{id}"))?;
            if json {
                print_json(&d)?;
            } else {
                print!("{}", fleet_control::views::device_text(&d, now_ms()));
            }
        }
        DevicesCommand::Revoke { id, yes } => {
            if !yes
                && !confirm(&format!(
                    "revoke {id}? Its logins, token and messages are refused at once"
                ))?
            {
                anyhow::bail!("not revoked");
            }
            let client = fleet_control::client::Client::new(server)?;
            client.post(
                &format!("/v1/devices/{}/revoke", fleet_control::client::encode(&id)),
                &serde_json::json!({}),
            )?;
            println!(
                "revoked {id}: its logins, token and messages are refused; `fleetctl devices rotate {id} --out FILE` gives it a new secret"
            );
        }
        DevicesCommand::Rotate { id, out, trust } => {
            anyhow::ensure!(
                !out.exists(),
                "{} already exists; refusing to overwrite a device config",
                out.display()
            );
            let local_trust = match &trust {
                Some(p) => Some(fleet_control::keys::load_policy(p)?.to_toml()),
                None => None,
            };
            let client = fleet_control::client::Client::new(server)?;
            let r = client.post(
                &format!("/v1/devices/{}/rotate", fleet_control::client::encode(&id)),
                &serde_json::json!({}),
            )?;
            let board = r["board"].as_str().map(str::to_string);
            write_config(&r, &board, local_trust, &out, "rotated")?;
            println!(
                "the old secret of {id} is refused from now on; install the new config on the device and restart its agent"
            );
        }
        DevicesCommand::SendStatus { id } => {
            let r = fleet_control::client::Client::new(server)?.post(
                &format!("/v1/devices/{id}/commands"),
                &serde_json::json!({ "kind": "send_status" }),
            )?;
            println!(
                "sent command {} to {id}; its acknowledgement shows in `fleetctl devices show {id}` \
                 if the device is online (one that is away sends its status when it connects \
                 and never sees this command)",
                r["command"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}
