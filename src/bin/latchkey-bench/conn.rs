//! The bench's gRPC connections: one HTTP/2 connection from hyper, handed straight to tonic's
//! generated clients.
//!
//! tonic's `Channel` puts a buffer task between the caller and the connection (every request
//! is queued to that task, which then hands it to the connection's own task): one more task
//! wake-up per request, paid on the same two cores as the latchkey process being measured.
//! Production callers usually want the `Channel` (reconnects, load balancing); a load
//! generator wants to cost as little as it can, so its numbers are about the server. The
//! requests on the wire are the same gRPC over HTTP/2 either way.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use http::{Request, Response, Uri, uri::Authority};
use hyper::{body::Incoming, client::conn::http2::SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tonic::body::Body;

/// How long a TCP connection to latchkey may take (a host that drops SYNs would otherwise hold
/// the bench for the kernel's two minutes of retries).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one request may go unanswered: longer than the longest wait any scenario asks
/// for (120 s, the memory scenario's waiters), so only a server that stopped answering hits it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(150);

/// One HTTP/2 connection to latchkey; clones share it (as several clients on one `Channel`).
#[derive(Clone)]
pub struct Conn {
    send: SendRequest<Body>,
    authority: Authority,
}

impl Conn {
    pub async fn connect(addr: &str) -> anyhow::Result<Self> {
        let authority: Authority = addr
            .parse()
            .with_context(|| format!("{addr:?} is not HOST:PORT"))?;
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(connected) => connected.with_context(|| format!("TCP connection to {addr}"))?,
            Err(_) => anyhow::bail!("TCP connection to {addr}: none within {CONNECT_TIMEOUT:?}"),
        };
        stream.set_nodelay(true)?;
        let (send, connection) = hyper::client::conn::http2::handshake::<_, _, Body>(
            TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .with_context(|| format!("HTTP/2 handshake with {addr}"))?;
        tokio::spawn(async move {
            // Ends when the last clone of `send` is dropped or the server goes away; the
            // requests still running see the error themselves.
            let _ = connection.await;
        });
        Ok(Self { send, authority })
    }
}

impl tower_service::Service<Request<Body>> for Conn {
    type Response = Response<Incoming>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        // tonic's clients send a bare path; HTTP/2 wants the scheme and authority too (what
        // `Channel` adds from its endpoint). A path always combines with them.
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        let response = self.send.send_request(request);
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, response).await {
                Ok(response) => Ok(response?),
                Err(_) => Err(format!("no response within {REQUEST_TIMEOUT:?}").into()),
            }
        })
    }
}
