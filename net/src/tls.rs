//! TLS for fleetml's servers and clients: rustls on the `ring` provider only (never the
//! process-wide default provider, so nothing can switch it to another backend), TLS 1.2
//! and 1.3, certificates and keys read from PEM.
//!
//! Clients trust exactly the roots they are given (a CA pinned in `agent.toml`, the file
//! an operator passes with `--ca`), never more: there is no "accept any certificate"
//! switch in this module.

use std::io;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

pub use rustls;
pub use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream as ClientStream};

/// The one crypto provider: ring.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in `pem` (`what` names it in errors: a file name, a config key).
pub fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{what}: no certificate in it (expected -----BEGIN CERTIFICATE----- blocks)"
        ));
    }
    Ok(certs)
}

/// The private key in `pem` (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("{what}: no private key in it: {e}"))
}

/// A server configuration presenting the chain in `cert_pem` with the key in `key_pem`;
/// it offers `alpn` (e.g. `http/1.1`; none for MQTT).
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, String> {
    let chain = certs(cert_pem, "the server certificate")?;
    let key = private_key(key_pem, "the server key")?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("the server certificate and key do not go together: {e}"))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client configuration trusting exactly the CA certificates in `roots_pem`.
pub fn client_config(roots_pem: &[u8], what: &str) -> Result<Arc<ClientConfig>, String> {
    trusting(certs(roots_pem, what)?, what)
}

/// A client configuration trusting the system's CA store (what `SSL_CERT_FILE` /
/// `SSL_CERT_DIR` or the distribution's bundle hold).
pub fn system_roots() -> Result<Arc<ClientConfig>, String> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        return Err(format!(
            "no CA certificates in the system store{}; name the CA file instead",
            found
                .errors
                .first()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ));
    }
    trusting(found.certs, "the system CA store")
}

fn trusting(certs: Vec<CertificateDer<'static>>, what: &str) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("{what}: a certificate in it cannot be a root: {e}"))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Opens TLS over `io` to `host` (a DNS name or an IP address, checked against the
/// server's certificate), failing with what was wrong: an unknown issuer, an expired
/// certificate, a name that does not match.
pub async fn connect<IO>(
    config: &Arc<ClientConfig>,
    host: &str,
    io: IO,
) -> io::Result<ClientStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{host}`: not a host name"),
            )
        })?
        .to_owned();
    TlsConnector::from(config.clone())
        .connect(name, io)
        .await
        .map_err(|e| {
            let hint = if e.to_string().contains("UnknownIssuer") {
                " (the server's certificate is not from the CA this client trusts)"
            } else {
                ""
            };
            io::Error::new(e.kind(), format!("TLS with {host}: {e}{hint}"))
        })
}
