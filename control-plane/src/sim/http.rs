//! The simulator's HTTP calls, through the control plane's one client core.

use anyhow::{Context, bail};
use serde_json::Value;

use super::options::*;

/// The headers of a request with `authorization` and an optional `(content type, body)`.
pub(super) fn with_body<'a>(
    authorization: &'a str,
    body: Option<(&'a str, Vec<u8>)>,
) -> (Vec<(&'static str, &'a str)>, Vec<u8>) {
    let mut headers = vec![("authorization", authorization)];
    let bytes = match body {
        Some((content_type, bytes)) => {
            headers.push(("content-type", content_type));
            bytes
        }
        None => Vec::new(),
    };
    (headers, bytes)
}

/// A tiny HTTP/1.1 client: one connection per request, as the agent's puller does.
#[derive(Debug, Clone)]
pub(super) struct Http {
    pub(super) host: String,
    pub(super) port: u16,
}

impl Http {
    pub(super) fn new(address: &str) -> anyhow::Result<Http> {
        let (host, port) = address
            .rsplit_once(':')
            .with_context(|| format!("`{address}` is not HOST:PORT"))?;
        Ok(Http {
            host: host.to_string(),
            port: port
                .parse()
                .with_context(|| format!("`{address}`: bad port"))?,
        })
    }

    pub(super) fn endpoint(&self) -> crate::http::Endpoint {
        crate::http::Endpoint {
            host: self.host.clone(),
            port: self.port,
            tls: None,
        }
    }

    pub(super) async fn send(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let authorization = format!("Bearer {token}");
        let (headers, bytes) = with_body(&authorization, body);
        crate::http::send(&self.endpoint(), method, path, &headers, bytes)
            .await
            .context("the control plane")
    }

    /// Status and whole body.
    pub(super) async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<(u16, hyper::body::Bytes)> {
        let authorization = format!("Bearer {token}");
        let (headers, bytes) = with_body(&authorization, body);
        let (status, bytes) = crate::http::call(
            &self.endpoint(),
            method,
            path,
            &headers,
            bytes,
            HTTP_TIMEOUT,
        )
        .await?;
        Ok((status.as_u16(), bytes))
    }

    /// A JSON call that must succeed.
    pub(super) async fn json(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let body = body
            .map(|b| serde_json::to_vec(b).map(|v| ("application/json", v)))
            .transpose()?;
        let (status, bytes) = self.call(method, path, token, body).await?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            bail!(
                "{method} {path}: {status}: {}",
                value["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| text(&bytes))
            );
        }
        Ok(value)
    }
}

pub(super) fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_string()
}
