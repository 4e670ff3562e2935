//! Serving one client connection: TLS handshake when the listener is secure, then
//! HTTP/2 when ALPN chose it, HTTP/1.1 otherwise; graceful close on shutdown.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::{service_fn, HttpService};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::io::{Activity, ClientStream, OnSocket, Resumable, WriteStallLimit};
use super::{ListenerKind, Shared, Stop};
use crate::admin::ServerGauges;
use crate::body::ResponseBody;
use crate::proxy::headers::PeerAddr;
use crate::proxy::Client;

/// hyper buffers up to this much of a response for a client that reads slowly (its
/// default is ~400 KiB): with many slow downloads that is most of the proxy's memory,
/// and 16 KiB still moves gigabytes per second. It also bounds a request head (request
/// line and headers; over it: `431`, and more than 100 header fields also get `431`).
/// The buffer size alone is a soft bound (a head arriving in one read can exceed it),
/// so the head limit is also set exactly with `max_header_size`.
const CLIENT_BUFFER: usize = 16 * 1024;

/// An HTTP/1 connection with no exchange under way and nothing read for this long
/// gives back its hyper session (parser state, read buffer, timers) and waits on the
/// bare socket, as nginx frees a keep-alive connection's buffers: ten thousand idle
/// browsers then cost little more than their sockets (and their TLS sessions, on
/// HTTPS). Short enough that connections opened in a burst are parked before the next
/// burst; long enough that a busy connection, whose next request follows within
/// microseconds, never pays for a new session.
const PARK_AFTER: Duration = Duration::from_millis(25);

/// hyper's HTTP/1 session on one client connection, plain or TLS.
type Session<I, S> = http1::Connection<TokioIo<I>, S>;

/// The future a request is served by: boxed, because hyper keeps it inline in each
/// connection's state (an unboxed one would cost every idle connection its full size),
/// and so `Unpin`, which lets a session be taken apart when it is parked.
type ServiceFuture =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

/// The service a client connection runs its requests through (see [`exchange_service`]).
trait ClientService:
    HttpService<Incoming, ResBody = ResponseBody, Error = Infallible, Future = ServiceFuture>
    + Send
    + Unpin
{
}

impl<S> ClientService for S where
    S: HttpService<Incoming, ResBody = ResponseBody, Error = Infallible, Future = ServiceFuture>
        + Send
        + Unpin
{
}

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
            Box::pin(serve_admin(stream, shared, stopped)).await;
        } else {
            tracing::warn!(%peer, "admin connection refused: the address is not in [admin] allow");
        }
        return;
    }
    let secure = kind == ListenerKind::Tls;
    let write_stall = WriteStallLimit::new(runtime.default_write_stall);
    let activity = Arc::new(Activity::default());
    let stream = ClientStream::new(stream, write_stall.clone(), activity.clone());
    let client = Client {
        addr: peer,
        peer: PeerAddr::new(peer.ip()),
        scheme: if secure { "https" } else { "http" },
        write_stall,
    };
    let service = exchange_service(client, shared.clone(), activity.clone());
    drop(runtime);
    if secure {
        // Boxed: inline, the TLS state would set the size of every connection's task,
        // plain ones included, for their whole life.
        Box::pin(serve_secure(
            stream, peer, service, &activity, shared, stopped,
        ))
        .await;
    } else {
        serve_http1(Resumable::new(stream), service, &activity, &shared, stopped).await;
    }
}

async fn serve_secure<Svc>(
    stream: ClientStream<TcpStream>,
    peer: SocketAddr,
    service: Svc,
    activity: &Activity,
    shared: Arc<Shared>,
    stopped: watch::Receiver<Stop>,
) where
    Svc: ClientService,
{
    let runtime = shared.runtime.load_full();
    let Some(acceptor) = runtime.tls.clone() else {
        return;
    };
    // The handshake is part of what a client must finish within the header timeout.
    let handshake =
        tokio::time::timeout(runtime.header_read_timeout, acceptor.accept(stream)).await;
    drop(runtime);
    match handshake {
        Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
            serve_h2(tls, peer, service, stopped).await;
        }
        Ok(Ok(tls)) => {
            let stream = Resumable::new(tls);
            serve_http1(stream, service, activity, &shared, stopped).await;
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// The service every request of a client connection goes through.
fn exchange_service(
    client: Client,
    shared: Arc<Shared>,
    activity: Arc<Activity>,
) -> impl ClientService {
    let client = Arc::new(client);
    service_fn(move |request: Request<Incoming>| -> ServiceFuture {
        let client = client.clone();
        // Each request runs under the configuration current when it arrived; a reload
        // never changes the rules of an exchange already under way.
        let runtime = shared.runtime.load_full();
        // Marked at once, before the future first runs: the connection must not look
        // idle between hyper parsing a head and the exchange starting.
        let under_way = activity.exchange();
        Box::pin(async move { Ok(runtime.proxy.handle(request, &client, under_way).await) })
    })
}

fn http1_builder(header_read_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true)
        .max_buf_size(CLIENT_BUFFER)
        .max_header_size(CLIENT_BUFFER);
    builder
}

async fn serve_h2<S, Svc>(io: S, peer: SocketAddr, service: Svc, stopped: watch::Receiver<Stop>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: ClientService,
{
    let connection = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = until_drained(connection, stopped).await {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Counts a connection as parked for as long as it lives.
struct ParkedMark<'a>(&'a AtomicUsize);

impl<'a> ParkedMark<'a> {
    fn new(parked: &'a AtomicUsize) -> ParkedMark<'a> {
        parked.fetch_add(1, Ordering::Relaxed);
        ParkedMark(parked)
    }
}

impl Drop for ParkedMark<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a plain HTTP/1 session ended.
enum SessionEnd {
    /// The client closed, asked to close, or the connection failed.
    Closed(hyper::Result<()>),
    /// Idle: the session was taken apart, the socket is still open.
    Parked,
    /// The shutdown grace is over.
    Dropped,
}

/// Serves an HTTP/1 client, one hyper session at a time: a session that goes idle is
/// parked (see [`PARK_AFTER`]) and a new one starts when the client sends again.
async fn serve_http1<S, Svc>(
    mut stream: Resumable<S>,
    mut service: Svc,
    activity: &Activity,
    shared: &Shared,
    mut stopped: watch::Receiver<Stop>,
) where
    S: OnSocket + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: ClientService,
{
    let keepalive = shared.runtime.load().header_read_timeout;
    let builder = http1_builder(keepalive);
    let park_after = PARK_AFTER.min(keepalive / 2);
    let mut may_park = true;
    loop {
        let mut session = Box::new(builder.serve_connection(TokioIo::new(stream), service));
        // Boxed with the session: a parked connection keeps neither.
        let end = Box::pin(drive(
            &mut session,
            activity,
            park_after,
            may_park,
            &mut stopped,
        ))
        .await;
        let parts = session.into_parts();
        (stream, service) = (parts.io.into_inner(), parts.service);
        // Even empty, the unparsed bytes hold hyper's whole read buffer: never keep them.
        let leftover =
            (!parts.read_buf.is_empty()).then(|| Bytes::copy_from_slice(&parts.read_buf));
        drop(parts.read_buf);
        match (end, leftover) {
            (SessionEnd::Parked, None) => may_park = true,
            // Part of a next request had arrived: serve it at once, and not park again
            // before it completes, so a client trickling a head gets one header timer.
            (SessionEnd::Parked, Some(leftover)) => {
                stream.unread(leftover);
                may_park = false;
                continue;
            }
            (SessionEnd::Closed(result), _) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "client connection ended with an error");
                    return;
                }
                let _ = stream.shutdown().await;
                return;
            }
            (SessionEnd::Dropped, _) => return,
        }
        // Parked: only the socket is left. The client's keep-alive time is counted
        // from the end of its last exchange.
        let idle_left = keepalive.saturating_sub(park_after);
        let _counted = ParkedMark::new(&shared.parked);
        let expired = tokio::select! {
            ready = stream.socket().readable() => match ready {
                Ok(()) => continue,
                Err(_) => return,
            },
            _ = tokio::time::sleep(idle_left) => true,
            _ = stopped.wait_for(|stop| *stop != Stop::Running) => false,
        };
        if expired {
            let _ = stream.shutdown().await;
        }
        return;
    }
}

/// Runs a session until it ends, is parked, or the server stops.
async fn drive<I, Svc>(
    session: &mut Session<I, Svc>,
    activity: &Activity,
    park_after: Duration,
    may_park: bool,
    stopped: &mut watch::Receiver<Stop>,
) -> SessionEnd
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: ClientService,
{
    let stopping = match run_until_idle(session, activity, park_after, may_park, stopped).await {
        SessionEnd::Closed(result) => return SessionEnd::Closed(result),
        SessionEnd::Parked => false,
        SessionEnd::Dropped => true,
    };
    // Idle, hyper closes the session at once and keeps the unparsed bytes; otherwise it
    // finishes the exchange under way first.
    Pin::new(&mut *session).graceful_shutdown();
    let finished = poll_fn(|cx| session.poll_without_shutdown(cx));
    if !stopping {
        return match finished.await {
            Ok(()) => SessionEnd::Parked,
            Err(e) => SessionEnd::Closed(Err(e)),
        };
    }
    tokio::select! {
        result = finished => SessionEnd::Closed(result),
        _ = stopped.wait_for(|stop| *stop == Stop::Now) => SessionEnd::Dropped,
    }
}

/// Runs a session until it ends (`Closed`), has been idle for `park_after` and may be
/// parked (`Parked`), or the server stops (`Dropped`: the caller decides what of it).
async fn run_until_idle<I, Svc>(
    session: &mut Session<I, Svc>,
    activity: &Activity,
    park_after: Duration,
    mut may_park: bool,
    stopped: &mut watch::Receiver<Stop>,
) -> SessionEnd
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: ClientService,
{
    let began = activity.snapshot();
    let mut seen = began;
    let mut stop_probe = stopped.clone();
    let park_timer = tokio::time::sleep(park_after);
    tokio::pin!(park_timer);
    let stop = stopped.wait_for(|stop| *stop != Stop::Running);
    tokio::pin!(stop);
    // The park timer and the stop signal keep this task's waker once polled, so a
    // wakeup polls them again only when they have fired: polling both on every wakeup
    // of a busy connection cost about 1,200 instructions per small request (callgrind).
    let mut registered = false;
    poll_fn(|cx| {
        if let Poll::Ready(result) = session.poll_without_shutdown(cx) {
            return Poll::Ready(SessionEnd::Closed(result));
        }
        if !registered || stop_probe.has_changed().unwrap_or(true) {
            if poll_unbudgeted(stop.as_mut(), cx).is_ready() {
                return Poll::Ready(SessionEnd::Dropped);
            }
            stop_probe.borrow_and_update();
        }
        if !registered || park_timer.is_elapsed() {
            while poll_unbudgeted(park_timer.as_mut(), cx).is_ready() {
                let now = activity.snapshot();
                // A session not allowed to park at first (a head was pending) may once a
                // request of its own has arrived.
                may_park |= now.started_since(&began);
                if may_park && now == seen && !now.exchange_under_way() {
                    return Poll::Ready(SessionEnd::Parked);
                }
                seen = now;
                park_timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + park_after);
            }
        }
        registered = true;
        Poll::Pending
    })
    .await
}

/// Polls `future` outside the task's cooperative budget: a poll the budget turned
/// away would register no waker, and [`drive`] only polls again once woken.
fn poll_unbudgeted<F: Future + ?Sized>(
    mut future: Pin<&mut F>,
    cx: &mut Context<'_>,
) -> Poll<F::Output> {
    let mut unbudgeted = tokio::task::unconstrained(poll_fn(|cx| future.as_mut().poll(cx)));
    Pin::new(&mut unbudgeted).poll(cx)
}

/// The admin listener: HTTP/1.1 only, answered from the current configuration.
async fn serve_admin(stream: TcpStream, shared: Arc<Shared>, stopped: watch::Receiver<Stop>) {
    let service = service_fn(move |request: Request<Incoming>| {
        let runtime = shared.runtime.load_full();
        let server = ServerGauges {
            parked_connections: shared.parked.load(Ordering::Relaxed),
        };
        async move { Ok::<_, Infallible>(crate::admin::handle(&runtime.proxy, server, &request)) }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open connection keeps its task's future allocated for its whole life, the
    /// parked ones too (10,000 idle clients: 10,000 of them). It was 9.9 KB when the TLS
    /// and HTTP/2 states were inline; 1.2 KB with them and the hyper session boxed.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let text =
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[upstreams.a]\naddress = \"127.0.0.1:1\"\n";
        let config = crate::config::Config::parse(text, std::path::Path::new("t.toml")).unwrap();
        let runtime = super::super::Runtime::build(&config).unwrap();
        let shared = Arc::new(Shared {
            runtime: arc_swap::ArcSwap::from_pointee(runtime),
            parked: Default::default(),
        });
        let (_stop, stopped) = watch::channel(Stop::Running);
        let task = serve(stream, addr, ListenerKind::Plain, shared, stopped);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1536, "a connection's task takes {size} bytes");
    }
}
