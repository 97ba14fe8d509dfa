//! The accept loop: hyper's HTTP/1 connection per socket, with the limits a slow or hostile
//! client meets (`server.header_read_timeout`, `idle_timeout`, `max_connections`,
//! `max_request_body_bytes`) and a graceful drain bounded by the shutdown grace.
//!
//! axum's own `serve` sets no header-read timer and no connection cap, so a client sending
//! one header byte a second, or a few hundred idle sockets, could hold the server.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::limit::RequestBodyLimitLayer;

use super::web_config::{WebConfig, WebConfigHandle};
use crate::config::HttpLimits;
use crate::shutdown::Deadline;

/// At most this many refused connections are being answered at once; beyond it, excess
/// connections are closed without an answer.
const MAX_REFUSING: usize = 64;

/// How long a refused connection may take to receive its 503.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The answer to a connection over `max_connections`.
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 29\r\nretry-after: 1\r\n\r\nToo many connections; retry.\n";

/// Serves `router` on `listener` with `limits` until `shutdown` fires, then drains the open
/// connections until `deadline` (shared with the other stages of the shutdown).
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
    deadline: Deadline,
    limits: HttpLimits,
    web: Option<Arc<WebConfigHandle>>,
) -> std::io::Result<()> {
    let router = router.layer(RequestBodyLimitLayer::new(limits.max_request_body_bytes));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let connections = TaskTracker::new();
    let drain = CancellationToken::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors (EMFILE) or a connection reset before accept: wait a
                // little instead of spinning, the condition usually clears.
                tracing::debug!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => {
                let router = router.clone();
                let drain = drain.clone();
                let web = web.clone();
                connections.spawn(async move {
                    accept_connection(stream, router, limits, drain, web).await;
                    drop(slot);
                });
            }
            Err(_) => {
                if let Ok(permit) = Arc::clone(&refusing).try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream).await;
                        drop(permit);
                    });
                }
                // Else the stream is dropped here: closed without an answer.
            }
        }
    }
    drop(listener);
    drain.cancel();
    connections.close();
    if deadline.bound(connections.wait()).await.is_none() {
        tracing::warn!("HTTP connections did not close within the grace period.");
    }
    Ok(())
}

/// The web config of the moment decides TLS (the handshake bounded by the header timeout) or
/// plain for this connection; basic auth and headers are decided per request.
async fn accept_connection(
    stream: TcpStream,
    router: Router,
    limits: HttpLimits,
    drain: CancellationToken,
    web: Option<Arc<WebConfigHandle>>,
) {
    let web = match web {
        Some(handle) => {
            let config = handle.current().await;
            Some((handle, config))
        }
        None => None,
    };
    let tls = web.as_ref().and_then(|(_, config)| config.tls.clone());
    match tls {
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(stream, router, limits, drain, web).await,
                Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
        None => serve_connection(stream, router, limits, drain, web).await,
    }
}

/// Answers 503 and closes, without reading the request.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(REFUSE_WRITE_TIMEOUT, async {
        stream.write_all(BUSY_RESPONSE).await?;
        stream.shutdown().await
    })
    .await;
}

/// One connection: hyper's HTTP/1 with the header-read timer, the idle timer (paused while a
/// request without a body is being handled) and a graceful close when `drain` fires.
pub(super) async fn serve_connection<I>(
    io: I,
    router: Router,
    limits: HttpLimits,
    drain: CancellationToken,
    web: Option<(Arc<WebConfigHandle>, Arc<WebConfig>)>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: io,
        activity: Arc::clone(&activity),
    });
    let tower = TowerToHyperService::new(router);
    let in_flight = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
        // A request without a body is being handled, not stalled: the idle timer waits for
        // its answer. One with a body stays under the timer, which a stalled upload trips.
        let guard = hyper::body::Body::is_end_stream(request.body())
            .then(|| InFlight::enter(Arc::clone(&in_flight)));
        in_flight.touch();
        let tower = tower.clone();
        let web = web.clone();
        async move {
            // Users and headers as of this request (re-checked at most once a second), so
            // that a changed file also applies to kept-alive connections.
            let config = match &web {
                Some((handle, _)) => Some(handle.current().await),
                None => None,
            };
            let denied = match (&web, &config) {
                (Some((handle, _)), Some(config)) => {
                    handle
                        .authorize(config, request.uri().path(), request.headers())
                        .await
                }
                _ => None,
            };
            let mut response = match denied {
                Some(denied) => denied,
                None => hyper::service::Service::call(&tower, request).await?,
            };
            if let Some(config) = &config {
                config.add_headers(&mut response);
            }
            drop(guard);
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        let idle_deadline = activity.idle_deadline(limits.idle_timeout);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::trace!(%error, "HTTP connection ended with an error");
                }
                return;
            }
            () = drain.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(idle_deadline) => {
                if activity.is_idle_past(limits.idle_timeout) {
                    tracing::debug!("closing an HTTP connection idle for {:?}", limits.idle_timeout);
                    return;
                }
            }
        }
    }
}

/// When a connection last moved a byte, and how many of its requests are being handled.
struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last read or write.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// When the idle timer fires next (a request being handled postpones it).
    fn idle_deadline(&self, idle: Duration) -> Instant {
        let from = if self.in_flight.load(Ordering::Relaxed) > 0 {
            Instant::now()
        } else {
            self.last()
        };
        from + idle
    }

    fn is_idle_past(&self, idle: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && self.last().elapsed() >= idle
    }
}

/// Counts one request as being handled while it lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        activity.touch();
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An IO stream that records its activity.
struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use tokio::io::AsyncReadExt;

    async fn start(
        router: Router,
        limits: HttpLimits,
    ) -> (std::net::SocketAddr, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            router,
            stop.clone(),
            Deadline::new(Duration::from_secs(1)),
            limits,
            None,
        ));
        (addr, stop)
    }

    async fn read_all(stream: &mut TcpStream) -> Vec<u8> {
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes).await;
        bytes
    }

    fn echo_router() -> Router {
        Router::new()
            .route("/echo", post(|body: String| async move { body }))
            .route(
                "/slow",
                post(|| async {
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    "done"
                }),
            )
    }

    #[tokio::test]
    async fn a_stalled_body_is_closed_after_the_idle_timeout_but_a_slow_handler_is_not() {
        let limits = HttpLimits {
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        };
        let (addr, stop) = start(echo_router(), limits).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
            .await
            .unwrap();
        let started = Instant::now();
        let bytes = tokio::time::timeout(Duration::from_secs(4), read_all(&mut stream))
            .await
            .expect("a stalled body kept its connection");
        let held = started.elapsed();
        assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes));
        assert!(
            held >= Duration::from_millis(250) && held < Duration::from_secs(3),
            "{held:?}"
        );

        // A handler busy for longer than the idle timeout is not cut off.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let bytes = tokio::time::timeout(Duration::from_secs(4), read_all(&mut stream))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("done"),
            "{text}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_lets_a_request_finish() {
        let (addr, stop) = start(echo_router(), HttpLimits::default()).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut busy = TcpStream::connect(addr).await.unwrap();
        busy.write_all(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.cancel();
        let bytes = tokio::time::timeout(Duration::from_secs(2), read_all(&mut idle))
            .await
            .expect("an idle connection survived the shutdown");
        assert!(bytes.is_empty());
        let bytes = tokio::time::timeout(Duration::from_secs(2), read_all(&mut busy))
            .await
            .expect("the busy connection was not closed after its answer");
        assert!(String::from_utf8_lossy(&bytes).ends_with("done"));
    }
}
