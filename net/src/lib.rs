//! `fleetml-net` is the network edge that `fleet-agent`'s prediction API and
//! `fleetctl serve` share: [`serve`], an HTTP/1.1 accept loop for an axum router that
//! sheds abuse, and [`raise_open_files_limit`].
//!
//! What [`serve`] does that `axum::serve` does not:
//! - a **header-read time-out**: a client that has not sent its whole request head this
//!   long after connecting (or after the first byte of a later request) is cut — the
//!   slowloris attack, which otherwise holds a connection for good;
//! - a **request time-out**: a handler that has not answered this long after the head
//!   arrived is answered 408 and dropped;
//! - an **idle time-out** of twice that: a connection on which nothing is read or
//!   written that long is closed (a half-sent body, an idle keep-alive connection). It
//!   must be longer than the request time-out: while a handler runs, hyper watches the
//!   connection for the client going away, and that wait must not end the connection
//!   before the 408 is written;
//! - a **connection limit**: beyond it a new connection is closed at once, and counted,
//!   so that the process keeps file descriptors for its store, its broker and the
//!   connections it already serves.
//!
//! Each server names its metrics ([`Limits::metrics`]): open connections (a gauge) and
//! connections refused at the limit (a counter). Every request carries its peer's
//! address as `axum::extract::ConnectInfo<L::Addr>`, for per-address limits
//! ([`rate::RateLimiter`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tower::ServiceExt;

pub mod rate;
pub mod tls;

/// How much one server lets its callers take.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The whole request head must arrive within this.
    pub header_read: Duration,
    /// A request not answered this long after its head arrived gets 408; a connection on
    /// which nothing moves for twice this long is closed.
    pub request: Duration,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// The names of its metrics.
    pub metrics: Metrics,
}

impl Limits {
    /// `request` and `max_connections` with the head due within 10 s.
    pub fn new(request: Duration, max_connections: usize, metrics: Metrics) -> Limits {
        Limits {
            header_read: Duration::from_secs(10),
            request,
            max_connections,
            metrics,
        }
    }
}

/// The metric names of one server's connections.
#[derive(Debug, Clone, Copy)]
pub struct Metrics {
    /// Gauge: connections open now.
    pub open: &'static str,
    /// Counter: connections closed at once because `max_connections` were open.
    pub refused: &'static str,
    /// Counter: requests answered 408 by the request time-out.
    pub timed_out: &'static str,
}

/// TLS on a server's connections.
#[derive(Debug, Clone)]
pub struct Tls {
    pub config: Arc<rustls::ServerConfig>,
    /// Counter: connections whose TLS handshake failed or did not finish within the
    /// header-read time-out (a plain-text client, an unknown CA on the client's side).
    pub failed: &'static str,
}

/// Serves `app` on `listener` within `limits` until the listener fails for good; over
/// TLS when `tls` is given (the handshake must finish within the header-read time-out).
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    limits: Limits,
    tls: Option<Tls>,
) -> io::Result<()>
where
    L: Listener,
    L::Io: Unpin,
    L::Addr: Clone + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let limits = Arc::new(limits);
    let acceptor = tls
        .as_ref()
        .map(|t| (tokio_rustls::TlsAcceptor::from(t.config.clone()), t.failed));
    loop {
        // axum's listeners retry failed accepts themselves (after a pause when out of
        // file descriptors).
        let (io, peer) = listener.accept().await;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(limits.metrics.refused).increment(1);
            // Counted, not logged at warn: a flood would flood the log too.
            tracing::debug!(
                limit = limits.max_connections,
                "connection refused: the connection limit is reached"
            );
            drop(io);
            continue;
        };
        let (app, limits, acceptor) = (app.clone(), limits.clone(), acceptor.clone());
        tokio::spawn(async move {
            metrics::gauge!(limits.metrics.open).increment(1.0);
            let io = Idle::new(io, limits.request * 2);
            match acceptor {
                None => serve_connection(io, app, peer, &limits).await,
                Some((acceptor, failed)) => {
                    if let Some(stream) = handshake(&acceptor, failed, io, limits.header_read).await
                    {
                        serve_connection(stream, app, peer, &limits).await
                    }
                }
            }
            metrics::gauge!(limits.metrics.open).decrement(1.0);
            drop(slot);
        });
    }
}

/// The server side of a TLS handshake on `io` within `within`; a failure or a time-out
/// is counted in `failed` and ends the connection.
async fn handshake<IO>(
    acceptor: &tokio_rustls::TlsAcceptor,
    failed: &'static str,
    io: IO,
    within: Duration,
) -> Option<tokio_rustls::server::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(within, acceptor.accept(io)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            metrics::counter!(failed).increment(1);
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            metrics::counter!(failed).increment(1);
            tracing::debug!("TLS handshake not finished in time");
            None
        }
    }
}

/// Serves HTTP/1.1 requests on one connection until it ends.
async fn serve_connection<I, A>(io: I, app: Router, peer: A, limits: &Limits)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: Clone + Send + Sync + 'static,
{
    let request_limit = limits.request;
    let timed_out = limits.metrics.timed_out;
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let (app, peer) = (app.clone(), peer.clone());
        async move {
            let mut request = request.map(axum::body::Body::new);
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            match tokio::time::timeout(request_limit, app.oneshot(request)).await {
                Ok(answer) => answer,
                Err(_) => {
                    metrics::counter!(timed_out).increment(1);
                    Ok(request_timed_out(request_limit))
                }
            }
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    if let Err(e) = http.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(error = %e, "connection ended");
    }
}

/// Judges what a relayed client sends, unit by unit (MQTT packets, say).
pub trait Inspect: Send + 'static {
    /// The length of the first whole unit at the start of `buf`; `None` while more bytes
    /// are needed; an error (why the connection is closed) for a unit not to be read.
    fn frame(&mut self, buf: &[u8]) -> Result<Option<usize>, String>;
    /// Whether one whole unit may pass; an error closes the connection.
    fn check(&mut self, unit: &[u8]) -> Result<(), String>;
}

/// What [`relay`] closes a connection for.
#[derive(Debug, Clone, Copy)]
pub struct RelayMetrics {
    /// Counter: connections closed because the client sent what [`Inspect`] refused.
    pub denied: &'static str,
    /// Counter: connections closed at once because `max_connections` were open.
    pub full: &'static str,
}

/// Accepts connections on `listener` (over TLS when given; the handshake within
/// `within`) and relays each to a plain TCP server at `upstream` (the embedded MQTT
/// broker's loopback listener), at most `max_connections` at once. What a client sends
/// passes only unit by unit as `inspector()` allows; the first refusal closes the
/// connection. What the server sends passes as it is.
pub async fn relay<I, F>(
    listener: tokio::net::TcpListener,
    tls: Option<Tls>,
    upstream: std::net::SocketAddr,
    within: Duration,
    max_connections: usize,
    inspector: F,
    metrics: RelayMetrics,
) -> io::Result<()>
where
    I: Inspect,
    F: Fn() -> I + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let acceptor = tls
        .as_ref()
        .map(|t| (tokio_rustls::TlsAcceptor::from(t.config.clone()), t.failed));
    let inspector = Arc::new(inspector);
    loop {
        let (io, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: wait instead of spinning.
                tracing::warn!(error = %e, "accepting a relayed connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(metrics.full).increment(1);
            drop(io);
            continue;
        };
        let (acceptor, inspector) = (acceptor.clone(), inspector.clone());
        tokio::spawn(async move {
            let _ = io.set_nodelay(true);
            let judge = inspector();
            match acceptor {
                None => relay_one(io, upstream, judge, peer, metrics).await,
                Some((acceptor, failed)) => {
                    if let Some(stream) = handshake(&acceptor, failed, io, within).await {
                        relay_one(stream, upstream, judge, peer, metrics).await
                    }
                }
            }
            drop(slot);
        });
    }
}

/// Relays one client connection until either side ends it or the client is refused. The
/// server is connected only once the client's first unit (its login) passed, which must
/// arrive within `FIRST_UNIT`: a stranger holds neither a server connection nor more
/// than one login's bytes.
async fn relay_one<S, I>(
    client: S,
    upstream: std::net::SocketAddr,
    mut judge: I,
    peer: std::net::SocketAddr,
    metrics: RelayMetrics,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    I: Inspect,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let mut buf: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut chunk = vec![0u8; 16 << 10];
    // Judges what `buf` holds: the length of the whole units that passed (to forward),
    // or why the connection ends.
    let mut judged = |buf: &[u8]| -> Result<usize, String> {
        let mut start = 0;
        while let Some(len) = judge.frame(&buf[start..])? {
            judge.check(&buf[start..start + len])?;
            start += len;
        }
        Ok(start)
    };
    let deny = |why: String| {
        metrics::counter!(metrics.denied).increment(1);
        tracing::warn!(%peer, "closed a relayed connection: {why}");
    };
    // The login, within its deadline.
    let first = tokio::time::timeout(FIRST_UNIT, async {
        loop {
            let n = match from_client.read(&mut chunk).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let passed = judged(&buf)?;
            if passed > 0 {
                return Ok(Some(passed));
            }
        }
    })
    .await;
    let passed = match first {
        Ok(Ok(Some(passed))) => passed,
        Ok(Ok(None)) => return,
        Ok(Err(why)) => return deny(why),
        Err(_) => {
            return deny(format!("no login within {} s", FIRST_UNIT.as_secs()));
        }
    };
    let server = match tokio::net::TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%upstream, error = %e, "the relay cannot reach its server");
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let (mut from_server, mut to_server) = server.into_split();
    if to_server.write_all(&buf[..passed]).await.is_err() {
        return;
    }
    buf.drain(..passed);
    let down = async {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        let _ = to_client.shutdown().await;
    };
    let up = async {
        loop {
            let passed = match judged(&buf) {
                Ok(passed) => passed,
                Err(why) => return deny(why),
            };
            if passed > 0 {
                if to_server.write_all(&buf[..passed]).await.is_err() {
                    return;
                }
                buf.drain(..passed);
            }
            let n = match from_client.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    // Whichever direction ends first ends the connection.
    tokio::select! {
        () = down => {}
        () = up => {}
    }
}

/// How long a relayed client has for its first unit (its login).
const FIRST_UNIT: Duration = Duration::from_secs(10);

/// The answer to a request its handler did not answer in time.
fn request_timed_out(limit: Duration) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = serde_json::json!({
        "error": format!(
            "the request was not answered within {} s; send it again (a large upload may need a faster link)",
            limit.as_secs()
        )
    });
    (
        axum::http::StatusCode::REQUEST_TIMEOUT,
        [(axum::http::header::CONNECTION, "close")],
        axum::Json(body),
    )
        .into_response()
}

/// An I/O stream closed when nothing has been read or written on it for `timeout`.
struct Idle<S> {
    io: S,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S> Idle<S> {
    fn new(io: S, timeout: Duration) -> Idle<S> {
        Idle {
            io,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// Something moved: the idle clock starts again.
    fn moved(&mut self) {
        let next = tokio::time::Instant::now() + self.timeout;
        self.deadline.as_mut().reset(next);
    }

    /// Called while I/O is pending: the error to end with once the deadline passed.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.deadline.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("nothing moved for {} s", self.timeout.as_secs()),
            )
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.moved();
                Poll::Ready(r)
            }
            Poll::Pending => this
                .expired(cx)
                .map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.moved();
                Poll::Ready(r)
            }
            Poll::Pending => this
                .expired(cx)
                .map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Raises this process's soft limit of open files to its hard limit (a server holds a
/// descriptor per connection, plus its store and broker). The limits after, or why not.
pub fn raise_open_files_limit() -> Result<(u64, u64), String> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)
            .map_err(|e| format!("raising the open-files limit: {e}"))?;
    }
    let now = getrlimit(Resource::Nofile);
    Ok((
        now.current.unwrap_or(u64::MAX),
        now.maximum.unwrap_or(u64::MAX),
    ))
}
