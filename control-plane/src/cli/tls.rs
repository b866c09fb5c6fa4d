//! `fleetctl tls …`: a private CA and the certificates it issues, for what
//! `fleetctl serve --self-signed` does not cover (an external broker such as mosquitto,
//! a server named differently, a proxy in front).

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum TlsCommand {
    /// Make a private CA in DIR (ca.key mode 0600, ca.pem), or keep the one there.
    /// `fleetctl serve --self-signed` keeps its own in DATA_DIR/tls.
    Ca {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a server certificate from the CA in --ca-dir for the names given:
    /// OUT.pem (the certificate, then the CA) and OUT.key (mode 0600).
    Issue {
        /// The CA's folder (from `fleetctl tls ca` or DATA_DIR/tls).
        #[arg(long)]
        ca_dir: PathBuf,
        /// DNS names or IP addresses the certificate is valid for (repeat, or comma-separate).
        #[arg(long, required = true, value_delimiter = ',')]
        name: Vec<String>,
        /// Write OUT.pem and OUT.key.
        #[arg(long)]
        out: PathBuf,
        /// Days it is valid.
        #[arg(long, default_value_t = 397)]
        days: u64,
        /// Valid from (RFC 3339, e.g. 2026-01-01T00:00:00Z); default an hour ago.
        #[arg(long)]
        not_before: Option<String>,
    },
}

pub(crate) fn tls_command(cmd: TlsCommand) -> anyhow::Result<()> {
    use fleet_control::tls::{PrivateCa, at};
    use std::time::SystemTime;
    match cmd {
        TlsCommand::Ca { dir } => {
            let ca = PrivateCa::open(&dir, SystemTime::now())?;
            println!("CA certificate: {}", ca.cert_path().display());
        }
        TlsCommand::Issue {
            ca_dir,
            name,
            out,
            days,
            not_before,
        } => {
            anyhow::ensure!(
                ca_dir.join("ca.key").exists(),
                "{}: no CA there (make one with `fleetctl tls ca --dir {}`)",
                ca_dir.display(),
                ca_dir.display()
            );
            let ca = PrivateCa::open(&ca_dir, SystemTime::now())?;
            let from = match &not_before {
                Some(t) => humantime::parse_rfc3339(t)
                    .with_context(|| format!("--not-before {t}: not an RFC 3339 time"))?,
                None => SystemTime::now() - std::time::Duration::from_secs(3600),
            };
            let (chain, key) = ca.issue_valid(
                &name,
                at(from, 0)?,
                at(
                    from,
                    (days.saturating_mul(86_400)).min(i64::MAX as u64) as i64,
                )?,
            )?;
            let (cert_path, key_path) = (out.with_extension("pem"), out.with_extension("key"));
            fleet_control::output::create_new(&cert_path, 0o644, chain.as_bytes())?;
            fleet_control::output::create_new(&key_path, 0o600, key.as_bytes())?;
            println!(
                "wrote {} (certificate + CA) and {} (key, mode 0600) for {}",
                cert_path.display(),
                key_path.display(),
                name.join(", ")
            );
        }
    }
    Ok(())
}
