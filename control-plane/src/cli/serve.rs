//! `fleetctl serve`: the control plane.

use super::common::*;

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Where the control plane keeps its state (created mode 0700).
    #[arg(long)]
    data_dir: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:7080")]
    listen: std::net::SocketAddr,
    /// Address of the embedded MQTT broker devices connect to.
    #[arg(long, default_value = "127.0.0.1:1883", conflicts_with = "mqtt_url")]
    mqtt_listen: std::net::SocketAddr,
    /// Use this external broker instead of the embedded one:
    /// mqtt://[USER:PASSWORD@]HOST[:PORT]. Enable its persistence.
    #[arg(long)]
    mqtt_url: Option<String>,
    /// Trust policy (TOML) handed to enrolled devices.
    #[arg(long)]
    trust: Option<PathBuf>,
    /// URL devices and operators reach the API at. Default: http://LISTEN.
    #[arg(long)]
    public_url: Option<String>,
    /// Broker URL written into enrolled devices' configs. Default: the broker's address.
    #[arg(long)]
    public_mqtt_url: Option<String>,
    /// How long an assignment a device fetched stays valid (devices refuse expired ones:
    /// an attacker cannot hold a device on old assignments longer than this). Units s, m, h, d.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    assignment_ttl: std::time::Duration,
    /// Signing key (from `fleetctl keys generate`) for the candidate bundles training
    /// jobs build; the trust policy must list its public key.
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// How often each device is told which of its messages are stored (its receipt):
    /// until then the device keeps them, so nothing the broker acknowledged but the
    /// control plane did not store is lost. Units ms, s, m, h.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    receipt_interval: std::time::Duration,
    /// How often the calls refused for want of a valid token are written to the audit
    /// log, as one entry with their count (each is also counted in
    /// fleetml_control_unauthenticated_requests_total). Units ms, s, m, h.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    audit_interval: std::time::Duration,
    /// An API request not answered this long after its head arrived gets 408; a
    /// connection on which nothing moves this long is closed. Large dataset uploads on
    /// slow links need it longer. Units s, m, h.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    request_timeout: std::time::Duration,
    /// API connections served at once; more are closed at once (and counted in
    /// fleetml_control_http_connections_refused_total). The open-files limit must leave
    /// room for them: the packaged unit sets LimitNOFILE=65536, and the soft limit is
    /// raised to the hard one at start.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// Bytes of captured data kept per device (uploads only for the models a device is
    /// assigned); a new batch beyond it is refused with 413 until old captures are
    /// removed.
    #[arg(long, default_value_t = 1 << 30)]
    capture_quota: u64,
}

pub(crate) fn serve_command(a: ServeArgs) -> anyhow::Result<()> {
    let mqtt = match &a.mqtt_url {
        Some(u) => fleet_control::server::Mqtt::External(u.parse().map_err(anyhow::Error::msg)?),
        None => fleet_control::server::Mqtt::Embedded(a.mqtt_listen),
    };
    let opts = fleet_control::server::Options {
        data_dir: a.data_dir,
        listen: a.listen,
        mqtt,
        trust: a.trust,
        public_url: a.public_url,
        public_mqtt_url: a.public_mqtt_url,
        assignment_ttl: a.assignment_ttl,
        signing_key: a.signing_key,
        receipt_interval: a.receipt_interval,
        audit_interval: a.audit_interval,
        http: fleet_control::server::http_limits(a.request_timeout, a.max_connections),
        capture_quota: a.capture_quota,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(fleet_control::server::serve(opts))?;
    Ok(())
}
