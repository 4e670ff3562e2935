//! Connections to one server and their keep-alive pool.
//!
//! Each pooled connection is an HTTP/1.1 hyper client connection whose I/O task runs on
//! its own. A connection goes back to the pool only after its response body was read to
//! the end; one dropped half-way (client gone, timer fired) is aborted so the upstream
//! sees the cancellation and no half-read response is ever reused. Idle connections
//! expire before the upstream's own keep-alive does, so we never race its close.

use std::io;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::HeaderValue;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};
use tokio::task::AbortHandle;

use super::health::Health;
use crate::body::RequestBody;
use crate::config::{UpstreamAddress, UpstreamConfig};
use crate::metrics::Counter;
use crate::server::workers;

/// Why no connection to the upstream could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused or failed: {0}")]
    Io(#[from] io::Error),
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
}

type Sender = http1::SendRequest<RequestBody>;

struct IdleConnection {
    sender: Sender,
    task: AbortHandle,
    since: Instant,
    /// The worker thread whose runtime drives the connection's I/O.
    worker: Option<usize>,
}

/// One server of an upstream: where it listens, how requests to it are addressed, its
/// idle connection pool, and how it is doing.
pub struct Endpoint {
    pub address: UpstreamAddress,
    /// The `Host` sent upstream unless the client's is preserved.
    pub host_header: HeaderValue,
    /// The origin a `Location` from the upstream starts with when it points at itself.
    pub self_origin: String,
    /// Requests to this server admitted and not yet finished.
    pub in_flight: AtomicUsize,
    /// Response heads received from this server, by status class 1xx..5xx.
    pub responses: [Counter; 5],
    pub health: Health,
    keepalive_timeout: Duration,
    max_idle: usize,
    /// Oldest first: expiry trims the front, reuse takes from the back.
    idle: Mutex<Vec<IdleConnection>>,
}

impl Endpoint {
    pub fn new(address: &UpstreamAddress, config: &UpstreamConfig) -> Arc<Endpoint> {
        let authority = match address {
            UpstreamAddress::Tcp { authority } => authority.clone(),
            // A Unix socket has no authority; Gunicorn accepts `localhost`.
            UpstreamAddress::Unix(_) => "localhost".to_string(),
        };
        let host_header = HeaderValue::from_str(&authority)
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Arc::new(Endpoint {
            address: address.clone(),
            host_header,
            self_origin: format!("http://{authority}"),
            in_flight: AtomicUsize::new(0),
            responses: Default::default(),
            health: Health::new(config),
            keepalive_timeout: config.keepalive_timeout,
            max_idle: config.max_idle_connections,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// A ready connection: a fresh idle one from the pool, or a new one.
    pub async fn checkout(
        self: &Arc<Self>,
        connect_timeout: Option<Duration>,
    ) -> Result<PooledConnection, ConnectError> {
        if let Some(conn) = self.take_idle() {
            return Ok(conn);
        }
        self.connect(connect_timeout).await
    }

    fn take_idle(self: &Arc<Self>) -> Option<PooledConnection> {
        let worker = workers::current();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        self.expire(&mut idle, Instant::now());
        // Most recently used first: it is the least likely to have been closed. One this
        // worker drives is preferred, so the exchange never wakes another thread.
        while let Some(i) =
            (idle.iter().rposition(|c| c.worker == worker)).or_else(|| idle.len().checked_sub(1))
        {
            let conn = idle.remove(i);
            if conn.sender.is_ready() {
                return Some(PooledConnection {
                    sender: Some(conn.sender),
                    task: conn.task,
                    worker: conn.worker,
                    endpoint: self.clone(),
                    reused: true,
                    reusable: true,
                });
            }
            conn.task.abort();
        }
        None
    }

    /// Drops the connections idle for `keepalive_timeout` or longer.
    fn expire(&self, idle: &mut Vec<IdleConnection>, now: Instant) {
        let stale = idle.partition_point(|c| now.duration_since(c.since) >= self.keepalive_timeout);
        for conn in idle.drain(..stale) {
            conn.task.abort();
        }
    }

    /// A new connection, bypassing the pool.
    pub async fn connect(
        self: &Arc<Self>,
        timeout: Option<Duration>,
    ) -> Result<PooledConnection, ConnectError> {
        let connecting = self.open();
        let (sender, task) = match timeout {
            Some(limit) => tokio::time::timeout(limit, connecting)
                .await
                .map_err(|_| ConnectError::Timeout(limit))??,
            None => connecting.await?,
        };
        Ok(PooledConnection {
            sender: Some(sender),
            task,
            worker: workers::current(),
            endpoint: self.clone(),
            reused: false,
            reusable: true,
        })
    }

    async fn open(&self) -> Result<(Sender, AbortHandle), ConnectError> {
        match &self.address {
            UpstreamAddress::Tcp { authority } => {
                let stream = TcpStream::connect(authority.as_str()).await?;
                stream.set_nodelay(true)?;
                handshake(stream).await
            }
            UpstreamAddress::Unix(path) => handshake(UnixStream::connect(path).await?).await,
        }
    }

    fn put_back(&self, sender: Sender, task: AbortHandle, worker: Option<usize>) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        self.expire(&mut idle, now);
        if idle.len() < self.max_idle {
            idle.push(IdleConnection {
                sender,
                task,
                since: now,
                worker,
            });
        } else {
            task.abort();
        }
    }

    /// How many idle connections the pool holds now (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }
}

async fn handshake<S>(stream: S) -> Result<(Sender, AbortHandle), ConnectError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        // Small buffers: backpressure reaches the upstream sooner, memory stays per-stream small.
        .max_buf_size(16 * 1024)
        // The buffer size alone is a soft bound on a response head (hyper let a 100 KiB
        // one through a 64 KiB buffer); a larger head is a 502.
        .max_header_size(16 * 1024)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(ConnectError::Handshake)?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok((sender, task.abort_handle()))
}

/// A connection checked out for one exchange. Dropping it aborts the connection unless
/// [`PooledConnection::release`] handed it back after a complete response.
pub struct PooledConnection {
    sender: Option<Sender>,
    task: AbortHandle,
    worker: Option<usize>,
    endpoint: Arc<Endpoint>,
    /// Whether it came from the pool (a failure to send on it may be a stale close).
    pub reused: bool,
    reusable: bool,
}

impl PooledConnection {
    pub fn sender(&mut self) -> &mut Sender {
        self.sender
            .as_mut()
            .expect("a pooled connection holds its sender until released")
    }

    /// The server this connection goes to.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The upstream asked to close (`Connection: close`): never pool it.
    pub fn forbid_reuse(&mut self) {
        self.reusable = false;
    }

    /// Returns the connection to the pool once hyper says it can take a new request.
    pub fn release(mut self) {
        let Some(mut sender) = self.sender.take() else {
            return;
        };
        if !self.reusable || sender.is_closed() {
            self.task.abort();
            return;
        }
        let endpoint = self.endpoint.clone();
        let (task, worker) = (self.task.clone(), self.worker);
        // Usually ready at once; otherwise wait briefly off the request path.
        let mut cx = Context::from_waker(Waker::noop());
        match sender.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => endpoint.put_back(sender, task, worker),
            Poll::Ready(Err(_)) => task.abort(),
            Poll::Pending => {
                let limit = endpoint.keepalive_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(limit, sender.ready()).await {
                        Ok(Ok(())) => endpoint.put_back(sender, task, worker),
                        _ => task.abort(),
                    }
                });
            }
        }
    }
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        if self.sender.is_some() {
            self.task.abort();
        }
    }
}
