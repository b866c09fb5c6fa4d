//! `fleetctl keys …`: signing keys and trust policies.

use super::common::*;

#[derive(Subcommand, Debug)]
pub(crate) enum KeysCommand {
    /// Generate an ed25519 signing key: DIR/NAME.key (PKCS#8, mode 0600) and DIR/NAME.pub.
    ///
    /// Prints the key id (first 8 bytes of the SHA-256 of the public key, in hex).
    /// Refuses to overwrite an existing key.
    Generate {
        /// Directory for the key files (created with mode 0700 if missing).
        #[arg(long)]
        out: PathBuf,
        /// Base name of the key files.
        #[arg(long, default_value = "signing")]
        name: String,
    },
    /// Write a trust policy (TOML) that agents and verifiers load: the public keys allowed
    /// to sign bundles and how many of them must have signed.
    TrustPolicy {
        /// A public key file (NAME.pub); repeat for several keys.
        #[arg(long = "public", required = true)]
        public: Vec<PathBuf>,
        /// How many distinct listed keys must sign a bundle (k of n).
        #[arg(long, default_value_t = 1)]
        threshold: u32,
        /// Where to write the policy.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing policy file.
        #[arg(long)]
        force: bool,
    },
}

pub(crate) fn keys_command(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Generate { out, name } => {
            let g = fleet_control::keys::generate(&out, &name)?;
            println!("{}", g.id);
            eprintln!(
                "wrote {} (private, mode 0600) and {}",
                g.private.display(),
                g.public.display()
            );
        }
        KeysCommand::TrustPolicy {
            public,
            threshold,
            out,
            force,
        } => {
            anyhow::ensure!(
                force || !out.exists(),
                "{} already exists; pass --force to replace it",
                out.display()
            );
            let policy = fleet_control::keys::trust_policy(&public, threshold)?;
            let text = format!(
                "# fleetml trust policy: a bundle needs valid signatures by {} of these {} keys.\n{}",
                policy.threshold,
                policy.keys.len(),
                policy.to_toml()
            );
            fleet_control::output::write_atomic(&out, fleet_control::output::PUBLIC_FILE, |f| {
                use std::io::Write;
                f.write_all(text.as_bytes())?;
                Ok(())
            })?;
            println!(
                "wrote {} ({} of {} keys)",
                out.display(),
                policy.threshold,
                policy.keys.len()
            );
        }
    }
    Ok(())
}
