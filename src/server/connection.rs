//! Serving one client connection: TLS handshake when the listener is secure, then
//! HTTP/2 when ALPN chose it, HTTP/1.1 otherwise; graceful close on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::io::{ClientStream, WriteStallLimit};
use super::{ListenerKind, Shared, Stop};
use crate::body::ResponseBody;
use crate::proxy::Client;

/// hyper buffers up to this much of a response for a client that reads slowly (its
/// default is ~400 KiB): with many slow downloads that is most of the proxy's memory,
/// and 16 KiB still moves gigabytes per second. It also bounds a request head (request
/// line and headers; over it: `431`, and more than 100 header fields also get `431`).
/// The buffer size alone is a soft bound (a head arriving in one read can exceed it),
/// so the head limit is also set exactly with `max_header_size`.
const CLIENT_BUFFER: usize = 16 * 1024;

/// Serves `stream` until the client leaves, or until shutdown lets its in-flight
/// requests finish.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    shared: Arc<Shared>,
    stopped: watch::Receiver<Stop>,
) {
    let _ = stream.set_nodelay(true);
    let runtime = shared.runtime.load_full();
    if kind == ListenerKind::Admin {
        if runtime.admin_allow.iter().any(|c| c.contains(peer.ip())) {
            serve_admin(stream, shared, stopped).await;
        } else {
            tracing::warn!(%peer, "admin connection refused: the address is not in [admin] allow");
        }
        return;
    }
    let secure = kind == ListenerKind::Tls;
    let write_stall = WriteStallLimit::new(runtime.default_write_stall);
    let stream = ClientStream::new(stream, write_stall.clone());
    let client = Client {
        addr: peer,
        scheme: if secure { "https" } else { "http" },
        write_stall,
    };
    if !secure {
        return serve_http(stream, false, client, shared, stopped).await;
    }
    let Some(acceptor) = runtime.tls.clone() else {
        return;
    };
    // The handshake is part of what a client must finish within the header timeout.
    let handshake =
        tokio::time::timeout(runtime.header_read_timeout, acceptor.accept(stream)).await;
    drop(runtime);
    match handshake {
        Ok(Ok(tls)) => {
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            serve_http(tls, h2, client, shared, stopped).await;
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

async fn serve_http<S>(
    io: S,
    h2: bool,
    client: Client,
    shared: Arc<Shared>,
    stopped: watch::Receiver<Stop>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header_read_timeout = shared.runtime.load().header_read_timeout;
    let peer = client.addr;
    let client = Arc::new(client);
    let service = service_fn(move |request: Request<Incoming>| {
        let client = client.clone();
        // Each request runs under the configuration current when it arrived; a reload
        // never changes the rules of an exchange already under way.
        let runtime = shared.runtime.load_full();
        async move {
            // Boxed: hyper keeps the service future inline in each connection's state, so
            // an unboxed one would cost every idle keep-alive connection its full size.
            let handling = Box::pin(async { runtime.proxy.handle(request, &client).await });
            Ok::<_, Infallible>(handling.await)
        }
    });
    let io = TokioIo::new(io);
    let result = if h2 {
        let connection = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, service);
        until_drained(connection, stopped).await
    } else {
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .keep_alive(true)
            .max_buf_size(CLIENT_BUFFER)
            .max_header_size(CLIENT_BUFFER)
            .serve_connection(io, service);
        until_drained(connection, stopped).await
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// The admin listener: HTTP/1.1 only, answered from the current configuration.
async fn serve_admin(stream: TcpStream, shared: Arc<Shared>, stopped: watch::Receiver<Stop>) {
    let service = service_fn(move |request: Request<Incoming>| {
        let runtime = shared.runtime.load_full();
        async move { Ok::<_, Infallible>(crate::admin::handle(&runtime.proxy, &request)) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service);
    let _ = until_drained(connection, stopped).await;
}

/// A hyper connection that can be asked to finish its in-flight work and close.
trait GracefulConnection: Future<Output = hyper::Result<()>> {
    fn start_graceful_close(self: Pin<&mut Self>);
}

impl<I, S> GracefulConnection for http1::Connection<I, S>
where
    Self: Future<Output = hyper::Result<()>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = ResponseBody>,
{
    fn start_graceful_close(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> GracefulConnection for http2::Connection<I, S, TokioExecutor>
where
    Self: Future<Output = hyper::Result<()>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = ResponseBody>,
    S::Future: Send + 'static,
{
    fn start_graceful_close(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

async fn until_drained<C: GracefulConnection>(
    connection: C,
    mut stopped: watch::Receiver<Stop>,
) -> hyper::Result<()> {
    tokio::pin!(connection);
    let finished = tokio::select! {
        result = connection.as_mut() => Some(result),
        _ = stopped.wait_for(|stop| *stop != Stop::Running) => None,
    };
    if let Some(result) = finished {
        return result;
    }
    connection.as_mut().start_graceful_close();
    tokio::select! {
        result = connection.as_mut() => result,
        // Dropping the connection closes the socket and cancels its upstream request.
        _ = stopped.wait_for(|stop| *stop == Stop::Now) => Ok(()),
    }
}
