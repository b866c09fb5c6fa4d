//! The control plane side's one HTTP client core: HTTP/1.1 over TCP or TLS, one request
//! per connection. The operator CLI's [`crate::client::Client`] (blocking) and the
//! simulator's devices (async) both send through [`send`] and [`call`].

use std::time::Duration;

use anyhow::Context;
use http_body_util::BodyExt;

/// Where to send: `host:port`, over TLS trusting `tls`'s roots when given.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: Option<std::sync::Arc<fleetml_net::tls::rustls::ClientConfig>>,
}

/// Sends `method path` with `headers` and `body` to `to`; the response as it starts
/// (its body still to be read).
pub async fn send(
    to: &Endpoint,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let stream = tokio::net::TcpStream::connect((to.host.as_str(), to.port))
        .await
        .with_context(|| format!("connecting to {}:{}", to.host, to.port))?;
    // Without it, TLS's last handshake record and the request wait on each other (Nagle
    // against delayed ACKs): 40 ms on every call (measured, docs/BENCHMARKS.md).
    let _ = stream.set_nodelay(true);
    let mut sender = match &to.tls {
        Some(roots) => handshake(fleetml_net::tls::connect(roots, &to.host, stream).await?).await?,
        None => handshake(stream).await?,
    };
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("{}:{}", to.host, to.port));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(http_body_util::Full::new(hyper::body::Bytes::from(body)))?;
    Ok(sender.send_request(request).await?)
}

/// HTTP/1.1 over `io`, its connection driven by a task of its own.
async fn handshake<IO>(
    io: IO,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<hyper::body::Bytes>>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// [`send`], then the whole reply: status and body, all within `deadline`.
pub async fn call(
    to: &Endpoint,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    deadline: Duration,
) -> anyhow::Result<(hyper::StatusCode, hyper::body::Bytes)> {
    tokio::time::timeout(deadline, async {
        let response = send(to, method, path, headers, body).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, bytes))
    })
    .await
    .with_context(|| format!("{method} {path}: no answer within {deadline:?}"))?
}
