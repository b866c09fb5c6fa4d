//! The agent's one HTTP client: HTTP/1.1 over TCP or TLS, one request per connection.
//! The assignment puller, bundle downloads, capture uploads and webhook sinks all go
//! through it, and [`HttpUrl`] is the one URL type they are configured with. Over
//! `https://` the server is checked against the roots the request is given (the CA
//! pinned in `agent.toml`), never the system store unless configured so.
//!
//! Nothing a server sends can hold or swamp the agent: connecting is bounded by
//! [`CONNECT_TIMEOUT`], the answer's head by [`HEAD_TIMEOUT`], a whole exchange by the
//! caller's deadline, and a reply read whole by the caller's size limit — checked against
//! `Content-Length` before reading and enforced while reading (a chunked reply that
//! never ends is cut at the limit). Streamed bodies (bundle downloads) read each chunk
//! within an idle time-out ([`next_chunk`]).

use std::time::Duration;

use http_body_util::BodyExt;

/// An `https://host[:port][/path]` (or plain `http://`) address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `https://`.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// The path as written (empty for none).
    pub path: String,
}

impl HttpUrl {
    /// Parses `url`, naming it as `what` (e.g. `control_plane`, `webhook`) in errors.
    pub fn parse(url: &str, what: &str) -> Result<HttpUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "`{what} = \"{url}\"` must start with https:// (or http://)"
            ));
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse()
                    .map_err(|_| format!("`{what} = \"{url}\"`: `{p}` is not a port"))?,
            ),
            None => (hostport, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("`{what} = \"{url}\"`: no host"));
        }
        Ok(HttpUrl {
            tls,
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    /// Whether its host is this machine (plain HTTP to it crosses no network).
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.host)
    }

    /// The request target for `path` below this URL's own path: the URL's path as
    /// written when `path` is empty (`/` for none).
    pub fn target(&self, path: &str) -> String {
        if path.is_empty() {
            return if self.path.is_empty() {
                "/".into()
            } else {
                self.path.clone()
            };
        }
        format!("{}{path}", self.path.trim_end_matches('/'))
    }
}

/// `localhost`, or an IP address of this machine's loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path)
    }
}

/// The roots an `https://` request checks its server against.
pub type Roots = Option<std::sync::Arc<fleetml_net::tls::rustls::ClientConfig>>;

impl std::str::FromStr for HttpUrl {
    type Err = String;
    fn from_str(url: &str) -> Result<Self, String> {
        HttpUrl::parse(url, "control_plane")
    }
}

/// Longest wait for a TCP connection to the server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for the head of the answer once the request is sent.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest reply the agent reads whose content it only reports (an error's text, a
/// capture upload's or webhook's answer).
pub const SMALL_REPLY: usize = 16 << 10;

/// One request: `method` to `path` below `url`, with `headers` and a body.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: hyper::Method,
    pub url: &'a HttpUrl,
    pub path: &'a str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// Required for an `https://` URL.
    pub roots: Roots,
}

impl<'a> Request<'a> {
    pub fn get(url: &'a HttpUrl, path: &'a str) -> Request<'a> {
        Request {
            method: hyper::Method::GET,
            url,
            path,
            headers: Vec::new(),
            body: Vec::new(),
            roots: None,
        }
    }

    pub fn post(url: &'a HttpUrl, path: &'a str, content_type: &str, body: Vec<u8>) -> Self {
        Request {
            method: hyper::Method::POST,
            url,
            path,
            headers: vec![("content-type", content_type.to_string())],
            body,
            roots: None,
        }
    }

    /// The roots the server of an `https://` URL is checked against.
    pub fn roots(mut self, roots: &Roots) -> Self {
        self.roots = roots.clone();
        self
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// Connects, sends, and returns the response as it starts (its body still to be
    /// read), for a caller that streams it.
    pub async fn send(self) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let url = self.url;
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((url.host.as_str(), url.port)),
        )
        .await
        .map_err(|_| {
            format!(
                "connecting to {}:{}: no connection within {} s",
                url.host,
                url.port,
                CONNECT_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("connecting to {}:{}: {e}", url.host, url.port))?;
        // Without it, TLS's last handshake record and the request wait on each other
        // (Nagle against delayed ACKs): 40 ms on every request.
        let _ = stream.set_nodelay(true);
        let mut sender = if url.tls {
            let roots = self.roots.as_ref().ok_or_else(|| {
                format!("{url}: no CA to check the server against (tls_ca in agent.toml)")
            })?;
            let stream = tokio::time::timeout(
                CONNECT_TIMEOUT,
                fleetml_net::tls::connect(roots, &url.host, stream),
            )
            .await
            .map_err(|_| {
                format!(
                    "{url}: no TLS handshake within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| e.to_string())?;
            handshake(stream).await?
        } else {
            handshake(stream).await?
        };
        let mut request = hyper::Request::builder()
            .method(self.method)
            .uri(url.target(self.path))
            .header("host", format!("{}:{}", url.host, url.port));
        for (name, value) in self.headers {
            request = request.header(name, value);
        }
        let request = request
            .body(http_body_util::Full::new(hyper::body::Bytes::from(
                self.body,
            )))
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(HEAD_TIMEOUT, sender.send_request(request))
            .await
            .map_err(|_| {
                format!(
                    "{}:{}: no answer within {} s",
                    url.host,
                    url.port,
                    HEAD_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| e.to_string())
    }

    /// [`Request::send`] and read the whole reply, all within `deadline`, refusing one
    /// of more than `max_body` bytes without reading past that.
    pub async fn fetch(self, deadline: Duration, max_body: usize) -> Result<Response, String> {
        let path = self.path.to_string();
        tokio::time::timeout(deadline, async {
            let r = self.send().await?;
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let body = read_limited(r.into_body(), &headers, max_body)
                .await
                .map_err(|e| format!("{path}: {e}"))?;
            Ok(Response {
                status,
                headers,
                body,
            })
        })
        .await
        .map_err(|_| format!("{path}: no answer within {} s", deadline.as_secs()))?
    }
}

/// HTTP/1.1 over `io`, its connection driven by a task of its own.
async fn handshake<IO>(
    io: IO,
) -> Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<hyper::body::Bytes>>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Reads `body` whole if it is at most `max` bytes: refused at once when its
/// `Content-Length` says more, cut when it grows past `max` while read.
pub async fn read_limited(
    body: hyper::body::Incoming,
    headers: &hyper::HeaderMap,
    max: usize,
) -> Result<hyper::body::Bytes, String> {
    let declared = headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > max as u64) {
        return Err(format!(
            "the reply is {n} bytes, more than the {max} this request reads; refused unread"
        ));
    }
    http_body_util::Limited::new(body, max)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!("the reply grew past the {max} bytes this request reads; cut there")
            } else {
                e.to_string()
            }
        })
}

/// The next data chunk of a streamed body, waiting at most `idle` for it; `None` at its
/// end. Non-data frames (trailers) are skipped.
pub async fn next_chunk(
    body: &mut hyper::body::Incoming,
    idle: Duration,
) -> Result<Option<hyper::body::Bytes>, String> {
    loop {
        let frame = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| format!("nothing arrived for {} s", idle.as_secs()))?;
        match frame {
            None => return Ok(None),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// A whole reply.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: hyper::body::Bytes,
}

/// `POST path` with `body` to the control plane as the device; status and reply.
#[cfg(feature = "capture")]
pub(crate) async fn post(
    server: &HttpUrl,
    roots: &Roots,
    token: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<(u16, hyper::body::Bytes), String> {
    let r = Request::post(server, path, content_type, body)
        .roots(roots)
        .header("authorization", format!("Bearer {token}"))
        .fetch(Duration::from_secs(60), SMALL_REPLY)
        .await?;
    Ok((r.status, r.body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_their_defaults_and_refuse_what_this_agent_cannot_speak() {
        let u = HttpUrl::parse("http://cp.local:8080/fleet/", "control_plane").expect("parses");
        assert_eq!((u.host.as_str(), u.port), ("cp.local", 8080));
        assert_eq!(u.target("/v1/x"), "/fleet/v1/x");
        assert_eq!(u.target(""), "/fleet/", "a webhook's own path, as written");
        let root = HttpUrl::parse("http://hook", "webhook").expect("parses");
        assert_eq!((root.port, root.target("")), (80, "/".to_string()));
        assert!(!root.tls && !root.is_loopback());
        let tls = HttpUrl::parse("https://cp/p", "control_plane").expect("TLS");
        assert!(tls.tls && tls.port == 443);
        assert!(
            HttpUrl::parse("http://127.0.0.1:9", "x")
                .expect("ip")
                .is_loopback()
        );
        assert!(
            HttpUrl::parse("http://[::1]:9", "x")
                .expect("v6")
                .is_loopback()
        );
        assert!(
            HttpUrl::parse("http://localhost", "x")
                .expect("name")
                .is_loopback()
        );
        assert!(HttpUrl::parse("ftp://x", "webhook").is_err());
        assert!(HttpUrl::parse("http://:80", "webhook").is_err());
        assert!(
            HttpUrl::parse("http://h:port", "webhook")
                .expect_err("bad port")
                .contains("`port`")
        );
    }
}
