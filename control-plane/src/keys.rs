//! Signing keys and trust policies on disk.
//!
//! `NAME.key` holds the PKCS#8 (v2) DER encoding of an ed25519 private key, mode 0600;
//! `NAME.pub` holds one line, `ed25519:<64 hex digits>`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fleetml_protocol::crypto::{KeyId, PublicKey, SigningKey};
use fleetml_protocol::trust::{TrustPolicy, TrustedKey};

use crate::output;

/// Paths and id of a newly generated key pair.
#[derive(Debug)]
pub struct Generated {
    pub id: KeyId,
    pub private: PathBuf,
    pub public: PathBuf,
}

pub fn generate(dir: &Path, name: &str) -> anyhow::Result<Generated> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || name.starts_with('.')
    {
        bail!("key name `{name}` is invalid: use letters, digits, `-`, `_` or `.`");
    }
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    for p in [&private, &public] {
        if p.exists() {
            bail!(
                "{} already exists; refusing to overwrite a key",
                p.display()
            );
        }
    }
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    let (key, pkcs8) = SigningKey::generate()?;
    output::create_new(&private, 0o600, &pkcs8)?;
    output::create_new(&public, 0o644, format!("{}\n", key.public_key()).as_bytes())?;
    Ok(Generated {
        id: key.id(),
        private,
        public,
    })
}

/// Loads a private key, refusing one that others can read.
pub fn load_private(path: &Path) -> anyhow::Result<SigningKey> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("reading key {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "key {} is readable by others (mode {mode:o}); run `chmod 600 {}` first",
            path.display(),
            path.display()
        );
    }
    let der = output::read_bounded(path, 4096, "key")?;
    SigningKey::from_pkcs8(&der).with_context(|| format!("key {}", path.display()))
}

pub fn load_public(path: &Path) -> anyhow::Result<PublicKey> {
    let text = output::read_bounded(path, 4096, "public key")?;
    let text = String::from_utf8(text)
        .with_context(|| format!("public key {} is not text", path.display()))?;
    text.trim()
        .parse()
        .map_err(|e: String| anyhow::anyhow!("public key {}: {e}", path.display()))
}

pub fn load_policy(path: &Path) -> anyhow::Result<TrustPolicy> {
    let bytes = output::read_bounded(path, 1 << 20, "trust policy")?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("trust policy {} is not UTF-8", path.display()))?;
    TrustPolicy::from_toml(&text).with_context(|| format!("trust policy {}", path.display()))
}

/// Builds the trust policy for `publics` with `threshold`.
pub fn trust_policy(publics: &[PathBuf], threshold: u32) -> anyhow::Result<TrustPolicy> {
    let mut keys = Vec::new();
    for p in publics {
        let public = load_public(p)?;
        let name = p.file_stem().map(|s| s.to_string_lossy().into_owned());
        keys.push(TrustedKey {
            name,
            id: Some(public.id().to_string()),
            public,
        });
    }
    Ok(TrustPolicy::new(threshold, keys)?)
}
