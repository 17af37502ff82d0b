//! The accept loop of `pyherd serve`: HTTP/1.1 connections up to a limit (more are answered
//! 503 at once), a bound on the request head's size (431) and on the time it may take to
//! arrive (the connection is closed), the body and token guards around every route, and a
//! graceful end: no new connections, the requests in flight answered.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::middleware::from_fn_with_state;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use pyherd::Pool;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::BODY_SLACK;
use super::auth::{Token, require_token};
use super::limits::{BodyLimits, read_body};

/// How long a connection over the limit is given to read its 503.
const REFUSAL_TIME: Duration = Duration::from_secs(1);
/// How long the loop pauses after an accept error such as running out of file descriptors.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The server's limits; see the README's Security section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Largest request head (request line and headers), bytes; larger is a 431.
    pub(crate) max_header_bytes: usize,
    /// Most connections open at once; more are answered 503 and closed.
    pub(crate) max_connections: usize,
    /// Longest time a request's head may take to arrive (and an idle connection may stay).
    pub(crate) header_timeout: Duration,
    /// Longest time a request's body may take to arrive after its head; slower is a 408.
    pub(crate) body_timeout: Duration,
    /// Longest time an answer may wait for the client to take more of it; a connection
    /// stalled longer is closed.
    pub(crate) send_timeout: Duration,
    /// Most Server-Sent Event streams open at once; more get 503 `too_many_streams`.
    pub(crate) max_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(30),
            max_streams: super::DEFAULT_MAX_STREAMS,
        }
    }
}

/// Serves the API of `pool` on `listener` until `shutdown` completes, then waits for the
/// connections to finish their requests.
pub(crate) async fn serve(
    listener: TcpListener,
    pool: Pool,
    token: Option<Token>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let body = BodyLimits {
        max_bytes: pool.config().max_frame_bytes + BODY_SLACK,
        timeout: limits.body_timeout,
    };
    let app = guard(super::router(pool, limits.max_streams), token, body);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(limits.max_connections));
    let refusal: Arc<[u8]> = too_many_connections(limits.max_connections).into();
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the limit: answered at once by a bounded number of tasks, else just closed.
            if let Ok(permit) = refusals.clone().try_acquire_owned() {
                let refusal = refusal.clone();
                tokio::spawn(async move {
                    refuse(stream, &refusal).await;
                    drop(permit);
                });
            }
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let stream = SendTimeout::new(stream, limits.send_timeout);
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection whose answer is given up once the client has taken none of it for
/// `limit`: a client that stops reading (a stream it asked for, a large result) must not
/// hold its connection, and a `max_connections` place, for good. The write fails, and
/// the connection ends (a stream's call with it, counted as cancelled).
struct SendTimeout<S> {
    io: S,
    limit: Duration,
    /// Runs while a write or flush waits for the client.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> SendTimeout<S> {
    fn new(io: S, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled: None,
        }
    }

    /// A write that made no progress: pending, until the client has stalled too long.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client took none of the answer for {} ms (send_timeout_ms)",
                    limit.as_millis()
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => self.waiting(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progress(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progress(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.progress(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Every route behind the body limits, and all but the open paths behind the token.
fn guard(router: Router, token: Option<Token>, body: BodyLimits) -> Router {
    let router = router.layer(from_fn_with_state(body, read_body));
    match token {
        Some(token) => router.layer(from_fn_with_state(token, require_token)),
        None => router,
    }
}

/// The whole answer to a connection over the limit.
fn too_many_connections(limit: usize) -> Vec<u8> {
    let body = json!({
        "ok": false,
        "error": {
            "category": "resource",
            "kind": "too_many_connections",
            "message": format!("the server has {limit} connections open, its limit (max_connections)"),
            "retryable": true,
            "context": {},
        }
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Most bytes of a refused request's head read before the 503 is written anyway.
const REFUSAL_HEAD_BYTES: usize = 16 * 1024;

/// Waits (within `REFUSAL_TIME`) for the request's head, so that the 503 answers a
/// request as HTTP clients expect rather than arriving before it; writes the 503; then
/// reads what the client still sends until it closes, so that closing does not reset
/// the connection before the client has read the answer.
async fn refuse(mut stream: TcpStream, answer: &[u8]) {
    let exchange = async {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        let waited = tokio::time::timeout(REFUSAL_TIME / 2, async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REFUSAL_HEAD_BYTES {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            Ok::<_, io::Error>(())
        });
        if let Ok(read) = waited.await {
            read?;
        }
        stream.write_all(answer).await?;
        stream.shutdown().await?;
        while stream.read(&mut buf).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    if let Ok(Err(e)) = tokio::time::timeout(REFUSAL_TIME, exchange).await {
        tracing::debug!(error = %e, "refused connection ended with an error");
    }
}

/// A failed accept: a connection that went away before it was accepted is nothing; other
/// errors (out of file descriptors) are logged and the loop pauses before trying again.
async fn accept_failed(e: &io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "cannot accept a connection");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_http_answer_with_the_error_object() {
        let answer = String::from_utf8(too_many_connections(3)).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["kind"], "too_many_connections");
        assert!(body["error"]["message"].as_str().unwrap().contains('3'));
    }
}
