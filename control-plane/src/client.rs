//! The operator side of the API: `fleetctl` commands that talk to `fleetctl serve`
//! (`--server URL`; the token from `FLEETML_TOKEN` or `~/.config/fleetml/token`; over
//! `https://` the server's CA from `--ca` / `FLEETML_CA`, else the system's CA store).

use anyhow::{Context, bail};
use serde_json::Value;

/// Where the API is when `--server` and `FLEETML_SERVER` say nothing.
pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7080";

static CA: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The CA file (`--ca`) clients made from now on trust; `FLEETML_CA` when not set.
pub fn set_ca(path: std::path::PathBuf) {
    let _ = CA.set(path);
}

/// The CA file clients trust: `--ca`, else `FLEETML_CA`.
pub fn ca_file() -> Option<std::path::PathBuf> {
    CA.get().cloned().or_else(|| {
        std::env::var_os("FLEETML_CA")
            .filter(|v| !v.is_empty())
            .map(Into::into)
    })
}

/// The roots a client of `https://` trusts: the CA file, else the system store.
pub fn roots() -> anyhow::Result<std::sync::Arc<fleetml_net::tls::rustls::ClientConfig>> {
    match ca_file() {
        Some(path) => {
            let pem = std::fs::read(&path)
                .with_context(|| format!("reading the CA file {} (--ca / FLEETML_CA)", path.display()))?;
            fleetml_net::tls::client_config(&pem, &path.display().to_string())
                .map_err(anyhow::Error::msg)
        }
        None => fleetml_net::tls::system_roots().map_err(|e| {
            anyhow::anyhow!("{e}; pass --ca FILE (or set FLEETML_CA): with `fleetctl serve --self-signed` it is DATA_DIR/tls/ca.pem")
        }),
    }
}

/// An API client.
pub struct Client {
    to: crate::http::Endpoint,
    base: String,
    token: Option<String>,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

/// The API token: `FLEETML_TOKEN`, else `~/.config/fleetml/token`.
pub fn token() -> Option<String> {
    if let Ok(t) = std::env::var("FLEETML_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_string());
    }
    let home = std::env::var_os("HOME")?;
    let path = std::path::Path::new(&home).join(".config/fleetml/token");
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

impl Client {
    pub fn new(server: &str) -> anyhow::Result<Client> {
        let (tls, rest) = if let Some(r) = server.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = server.strip_prefix("http://") {
            (false, r)
        } else {
            bail!(
                "--server {server}: expected https://HOST:PORT (or http:// for a server run with --insecure-listen)"
            );
        };
        let hostport = rest.trim_end_matches('/');
        anyhow::ensure!(
            !hostport.contains('/'),
            "--server {server}: give the server's root URL, without a path"
        );
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse()
                    .with_context(|| format!("--server {server}: bad port"))?,
            ),
            _ => (hostport.to_string(), if tls { 443 } else { 80 }),
        };
        let roots = if tls { Some(roots()?) } else { None };
        let scheme = if tls { "https" } else { "http" };
        Ok(Client {
            to: crate::http::Endpoint {
                host,
                port,
                tls: roots,
            },
            base: format!("{scheme}://{hostport}"),
            token: token(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        })
    }

    /// A client with this token (instead of FLEETML_TOKEN / the token file).
    pub fn with_token(server: &str, token: &str) -> anyhow::Result<Client> {
        let mut c = Client::new(server)?;
        c.token = Some(token.to_string());
        Ok(c)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call("GET", path, "application/json", Vec::new())
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call("POST", path, "application/json", serde_json::to_vec(body)?)
    }

    /// `GET path`, its answer read as `T` (one of [`crate::api::types`]).
    pub fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let v = self.get(path)?;
        serde_json::from_value(v)
            .with_context(|| format!("GET {path}: the server's answer is not what this fleetctl reads (different versions?)"))
    }

    /// `POST path` with `body`, its answer read as `T` (both of [`crate::api::types`]).
    pub fn post_as<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let v = self.call("POST", path, "application/json", serde_json::to_vec(body)?)?;
        serde_json::from_value(v)
            .with_context(|| format!("POST {path}: the server's answer is not what this fleetctl reads (different versions?)"))
    }

    /// `METHOD path` with a JSON body.
    pub fn call_json(&self, method: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call(method, path, "application/json", serde_json::to_vec(body)?)
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.call("DELETE", path, "application/json", Vec::new())
    }

    /// `PUT` of a text body (a trust policy).
    pub fn put_text(&self, path: &str, text: String) -> anyhow::Result<Value> {
        self.call("PUT", path, "text/plain", text.into_bytes())
    }

    /// `POST` of raw bytes (a bundle).
    pub fn post_bytes(&self, path: &str, bytes: Vec<u8>) -> anyhow::Result<Value> {
        self.call("POST", path, "application/octet-stream", bytes)
    }

    /// `GET` of raw bytes (a dataset file).
    pub fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let (status, bytes) = self.send("GET", path, "application/json", Vec::new())?;
        if !status.is_success() {
            let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            bail!(
                "GET {}{path}: {status}: {}",
                self.base,
                value["error"].as_str().unwrap_or("")
            );
        }
        Ok(bytes.to_vec())
    }

    /// `POST` of raw bytes with a content type.
    pub fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> anyhow::Result<Value> {
        self.call("POST", path, content_type, bytes)
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let (status, bytes) = self.send(method, path, content_type, body)?;
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).trim().to_string()));
        if !status.is_success() {
            let message = value["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{method} {url}: {status}: {message}");
        }
        Ok(value)
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        mut body: Vec<u8>,
    ) -> anyhow::Result<(hyper::StatusCode, hyper::body::Bytes)> {
        let Some(token) = &self.token else {
            bail!(
                "no API token: set FLEETML_TOKEN (the admin token is in the server's DATA_DIR/admin.token)"
            );
        };
        let url = format!("{}{path}", self.base);
        let to = &self.to;
        let authorization = format!("Bearer {token}");
        let headers = [
            ("authorization", authorization.as_str()),
            ("content-type", content_type),
        ];
        // A 429 (the server's rate limit) is retried after 1, 2 and 4 s, as kubectl and
        // the cloud CLIs do; a body over 1 MiB is not copied for that.
        let mut pause = std::time::Duration::from_secs(1);
        let mut retries = if body.len() <= 1 << 20 { 3 } else { 0 };
        let (status, bytes) = loop {
            let attempt = if retries > 0 { body.clone() } else { std::mem::take(&mut body) };
            let answer = self.runtime.block_on(crate::http::call(
                to,
                method,
                path,
                &headers,
                attempt,
                std::time::Duration::from_secs(600),
            ));
            match answer {
                Ok((hyper::StatusCode::TOO_MANY_REQUESTS, _)) if retries > 0 => {
                    retries -= 1;
                    std::thread::sleep(pause);
                    pause *= 2;
                }
                other => break other,
            }
        }
        .with_context(|| {
                if to.tls.is_some() {
                    format!(
                        "{method} {url}: cannot reach the control plane over TLS (is `fleetctl serve` running there? pass --server; the CA is --ca / FLEETML_CA, DATA_DIR/tls/ca.pem with --self-signed)"
                    )
                } else {
                    format!(
                        "{method} {url}: cannot reach the control plane (is `fleetctl serve` running there? pass --server)"
                    )
                }
            })?;
        Ok((status, bytes))
    }
}

/// Percent-encodes a query-string value.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
