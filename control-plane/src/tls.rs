//! TLS of `fleetctl serve`: which certificate it presents, and which CA enrolled devices
//! are told to trust.
//!
//! - [`Mode::Files`]: a certificate chain and key the operator made (an internal CA, an
//!   ACME certificate). Devices are given `--tls-ca` when named, else told to use the
//!   system's CA bundle.
//! - [`Mode::SelfSigned`]: a private CA kept in `DATA_DIR/tls` (`ca.key` 0600, `ca.pem`),
//!   made on first start and kept: devices pin it, so it must not change. The server
//!   certificate is issued from it at **every start**, for the names the server is reached
//!   by now (loopback, the host name, the listen addresses, the public URLs' hosts and
//!   `--tls-name`), valid for 397 days; it is held in memory only.
//! - [`Mode::Insecure`]: plain HTTP and MQTT (`--insecure-listen`), for a TLS-terminating
//!   proxy in front or a test on one machine.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use fleetml_net::tls::rustls::ServerConfig;

/// How the server secures its listeners.
#[derive(Debug, Clone)]
pub enum Mode {
    Files {
        cert: PathBuf,
        key: PathBuf,
        /// The CA devices are told to trust.
        ca: Option<PathBuf>,
    },
    SelfSigned {
        /// Names the server certificate covers besides the ones found.
        names: Vec<String>,
    },
    Insecure,
}

/// The CA an enrolled device trusts for the control plane and the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceCa {
    /// These PEM certificates (written into `agent.toml` as `tls_ca`).
    Pem(String),
    /// The device's system CA bundle.
    System,
    /// No TLS: plain URLs.
    None,
}

/// What a server with TLS presents.
#[derive(Debug, Clone)]
pub struct Server {
    /// HTTPS (ALPN http/1.1).
    pub http: Arc<ServerConfig>,
    /// MQTT over TLS (no ALPN).
    pub mqtt: Arc<ServerConfig>,
    pub device_ca: DeviceCa,
    /// Where the CA an operator passes with `--ca` is (self-signed mode).
    pub ca_file: Option<PathBuf>,
}

/// The CA and server certificate validity.
const CA_DAYS: u64 = 3650;
const SERVER_DAYS: u64 = 397;

/// Loads or makes what `mode` needs; `None` for [`Mode::Insecure`]. `names` are the
/// host names and addresses the server is reached by.
pub fn load(mode: &Mode, data_dir: &Path, names: &[String]) -> anyhow::Result<Option<Server>> {
    let (chain, key, device_ca, ca_file) = match mode {
        Mode::Insecure => return Ok(None),
        Mode::Files { cert, key, ca } => {
            let read = |p: &Path, what: &str| {
                std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()))
            };
            let device_ca = match ca {
                Some(p) => {
                    let pem = String::from_utf8(read(p, "--tls-ca")?)
                        .with_context(|| format!("{} is not PEM text", p.display()))?;
                    fleetml_net::tls::certs(pem.as_bytes(), &p.display().to_string())
                        .map_err(anyhow::Error::msg)?;
                    DeviceCa::Pem(pem)
                }
                None => DeviceCa::System,
            };
            (
                read(cert, "--tls-cert")?,
                read(key, "--tls-key")?,
                device_ca,
                ca.clone(),
            )
        }
        Mode::SelfSigned { names: extra } => {
            let mut all = names.to_vec();
            all.extend(extra.iter().cloned());
            let ca = PrivateCa::open(&data_dir.join("tls"), SystemTime::now())?;
            let (chain, key) = ca.issue(&all, SystemTime::now())?;
            (
                chain.into_bytes(),
                key.into_bytes(),
                DeviceCa::Pem(ca.cert_pem.clone()),
                Some(ca.cert_path()),
            )
        }
    };
    let http = fleetml_net::tls::server_config(&chain, &key, &[b"http/1.1"])
        .map_err(anyhow::Error::msg)?;
    let mqtt = fleetml_net::tls::server_config(&chain, &key, &[]).map_err(anyhow::Error::msg)?;
    Ok(Some(Server {
        http,
        mqtt,
        device_ca,
        ca_file,
    }))
}

/// A private CA: its key and certificate in a directory.
#[derive(Debug)]
pub struct PrivateCa {
    dir: PathBuf,
    key: rcgen::KeyPair,
    /// Its certificate, PEM.
    pub cert_pem: String,
}

impl PrivateCa {
    /// Opens the CA in `dir`, making it (key 0600) when there is none.
    pub fn open(dir: &Path, now: SystemTime) -> anyhow::Result<PrivateCa> {
        use std::os::unix::fs::DirBuilderExt;
        let (key_path, cert_path) = (dir.join("ca.key"), dir.join("ca.pem"));
        if key_path.exists() {
            let key_pem = std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?;
            let key = rcgen::KeyPair::from_pem(&key_pem)
                .with_context(|| format!("{} is not a private key", key_path.display()))?;
            let cert_pem = std::fs::read_to_string(&cert_path).with_context(|| {
                format!(
                    "reading {} (the CA certificate beside {}; restore it from a backup, or remove both to make a new CA — every device must then be enrolled again)",
                    cert_path.display(),
                    key_path.display()
                )
            })?;
            return Ok(PrivateCa {
                dir: dir.to_path_buf(),
                key,
                cert_pem,
            });
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let key = rcgen::KeyPair::generate().context("making the CA key")?;
        let mut params = ca_params(&key);
        params.not_before = at(now, -86_400)?;
        params.not_after = at(now, (CA_DAYS * 86_400) as i64)?;
        let cert = params
            .self_signed(&key)
            .context("making the CA certificate")?;
        crate::output::create_new(&key_path, 0o600, key.serialize_pem().as_bytes())?;
        crate::output::create_new(&cert_path, 0o644, cert.pem().as_bytes())?;
        tracing::info!(ca = %cert_path.display(), "made a private CA for TLS");
        Ok(PrivateCa {
            dir: dir.to_path_buf(),
            key,
            cert_pem: cert.pem(),
        })
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid from an hour
    /// ago for [`SERVER_DAYS`]: its chain (the certificate, then the CA) and its key, PEM.
    pub fn issue(&self, names: &[String], now: SystemTime) -> anyhow::Result<(String, String)> {
        self.issue_valid(
            names,
            at(now, -3600)?,
            at(now, (SERVER_DAYS * 86_400) as i64)?,
        )
    }

    /// [`issue`](Self::issue) with the validity given (tests make expired ones).
    pub fn issue_valid(
        &self,
        names: &[String],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> anyhow::Result<(String, String)> {
        let mut unique: Vec<String> = Vec::new();
        for n in names {
            let n = n.trim().trim_start_matches('[').trim_end_matches(']');
            if !n.is_empty() && !unique.iter().any(|u| u == n) {
                unique.push(n.to_string());
            }
        }
        let mut params = rcgen::CertificateParams::new(unique.clone())
            .with_context(|| format!("a server certificate for {unique:?}"))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fleetml control plane");
        params.not_before = not_before;
        params.not_after = not_after;
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate().context("making the server key")?;
        let issuer = rcgen::Issuer::new(ca_params(&self.key), &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .context("signing the server certificate")?;
        Ok((
            format!("{}{}", cert.pem(), self.cert_pem),
            key.serialize_pem(),
        ))
    }
}

/// The CA's parameters, the same at every start (its name is derived from its key), so a
/// certificate issued now names the CA exactly as `ca.pem` does.
fn ca_params(key: &rcgen::KeyPair) -> rcgen::CertificateParams {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.public_key_raw());
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("fleetml private CA {}", hex::encode(&digest.as_ref()[..8])),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "fleetml");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// `now` moved by `seconds`, as the certificate time type.
pub fn at(now: SystemTime, seconds: i64) -> anyhow::Result<time::OffsetDateTime> {
    let unix = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    time::OffsetDateTime::from_unix_timestamp(unix + seconds)
        .context("a certificate time out of range")
}

/// The host names and addresses a server listening on `addrs` with these public URLs is
/// reached by: loopback, this host's name, the addresses that are not wildcards, and
/// the URLs' hosts.
pub fn names_for(addrs: &[std::net::SocketAddr], urls: &[&str]) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_string());
        }
    }
    for a in addrs {
        if !a.ip().is_unspecified() {
            names.push(a.ip().to_string());
        }
    }
    for url in urls {
        if let Some(host) = url_host(url) {
            names.push(host);
        }
    }
    names
}

/// The host of `scheme://[user@]host[:port][/…]`.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split_once(']')?.0
    } else {
        hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
    };
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts() {
        assert_eq!(
            url_host("https://cp.example:7443/x").as_deref(),
            Some("cp.example")
        );
        assert_eq!(url_host("mqtts://u:p@[::1]:8883").as_deref(), Some("::1"));
        assert_eq!(url_host("http://10.0.0.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(url_host("nonsense"), None);
    }

    #[test]
    fn the_private_ca_is_kept_and_what_it_issues_verifies_against_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let ca = PrivateCa::open(dir.path(), now).expect("made");
        let again = PrivateCa::open(dir.path(), now).expect("opened");
        assert_eq!(ca.cert_pem, again.cert_pem, "the CA is kept across starts");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (chain, key) = again
            .issue(&["localhost".into(), "127.0.0.1".into()], now)
            .expect("issued");
        fleetml_net::tls::server_config(chain.as_bytes(), key.as_bytes(), &[])
            .expect("the chain and key go together");
        // A handshake succeeds against the pinned CA (the server certificate names the
        // CA exactly as ca.pem does, though issued by a re-opened CA), and fails for a
        // name it was not issued for and against another CA.
        let server =
            fleetml_net::tls::server_config(chain.as_bytes(), key.as_bytes(), &[]).expect("server");
        let roots = fleetml_net::tls::client_config(ca.cert_pem.as_bytes(), "ca").expect("roots");
        let other = PrivateCa::open(&dir.path().join("other"), now).expect("another CA");
        let other_roots =
            fleetml_net::tls::client_config(other.cert_pem.as_bytes(), "other").expect("roots");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let handshake = |roots: &Arc<fleetml_net::tls::rustls::ClientConfig>, name: &str| {
            rt.block_on(async {
                let (a, b) = tokio::io::duplex(64 << 10);
                let acceptor = fleetml_net::tls::TlsAcceptor::from(server.clone());
                let serving = tokio::spawn(async move { acceptor.accept(b).await.map(|_| ()) });
                let client = fleetml_net::tls::connect(roots, name, a).await.map(|_| ());
                let _ = serving.await;
                client
            })
        };
        handshake(&roots, "127.0.0.1").expect("verifies against the pinned CA");
        handshake(&roots, "localhost").expect("and for every name issued");
        let e = handshake(&roots, "elsewhere.example").expect_err("a name not issued");
        assert!(e.to_string().contains("elsewhere.example"), "{e}");
        let e = handshake(&other_roots, "127.0.0.1").expect_err("another CA");
        assert!(e.to_string().to_lowercase().contains("unknown"), "{e}");
    }
}
