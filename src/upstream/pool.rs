//! Connections to one server and their keep-alive pool.
//!
//! A connection is driven by the exchange that holds it (see [`super::conn`]). It goes
//! back to the pool only after its response body was read to the end with nothing left
//! over; one dropped half-way (client gone, timer fired) is closed, so the upstream sees
//! the cancellation and no half-read response is ever reused. Idle connections expire
//! before the upstream's own keep-alive does, so we rarely race its close, and one the
//! upstream closed anyway is noticed when taken from the pool.

use std::io;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response};

use super::codec::{ExtraFields, Framing};
use super::conn::{Conn, SendError};
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
}

struct IdleConnection {
    conn: Conn,
    since: Instant,
    /// The worker thread whose reactor the socket is registered with.
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
            let idle = idle.remove(i);
            if idle.conn.is_alive() {
                return Some(PooledConnection {
                    conn: idle.conn,
                    worker: idle.worker,
                    endpoint: self.clone(),
                    reused: true,
                });
            }
        }
        None
    }

    /// Drops the connections idle for `keepalive_timeout` or longer.
    fn expire(&self, idle: &mut Vec<IdleConnection>, now: Instant) {
        // One subtraction, not one per connection looked at: comparing instants is
        // cheap, measuring the time between two is not.
        let Some(cutoff) = now.checked_sub(self.keepalive_timeout) else {
            return;
        };
        let stale = idle.partition_point(|c| c.since <= cutoff);
        idle.drain(..stale);
    }

    /// A new connection, bypassing the pool.
    pub async fn connect(
        self: &Arc<Self>,
        timeout: Option<Duration>,
    ) -> Result<PooledConnection, ConnectError> {
        let connecting = Conn::open(&self.address);
        let conn = match timeout {
            Some(limit) => tokio::time::timeout(limit, connecting)
                .await
                .map_err(|_| ConnectError::Timeout(limit))??,
            None => connecting.await?,
        };
        Ok(PooledConnection {
            conn,
            worker: workers::current(),
            endpoint: self.clone(),
            reused: false,
        })
    }

    fn put_back(&self, mut conn: Conn, worker: Option<usize>) {
        conn.settle();
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        self.expire(&mut idle, now);
        if idle.len() < self.max_idle {
            idle.push(IdleConnection {
                conn,
                since: now,
                worker,
            });
        }
    }

    /// How many idle connections the pool holds now (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }
}

/// A connection checked out for one exchange. Dropping it closes the connection unless
/// [`PooledConnection::release`] handed it back after a complete response.
pub struct PooledConnection {
    conn: Conn,
    worker: Option<usize>,
    endpoint: Arc<Endpoint>,
    /// Whether it came from the pool (a failure to send on it may be a stale close).
    pub reused: bool,
}

impl PooledConnection {
    /// Sends `request` and reads the response head; see [`Conn::send`].
    pub async fn send(
        &mut self,
        request: &mut Request<RequestBody>,
        extra: &ExtraFields,
        sent_at: tokio::time::Instant,
    ) -> Result<Response<Framing>, SendError> {
        self.conn.send(request, extra, self.reused, sent_at).await
    }

    /// The connection the response body is read from.
    pub fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    /// The server this connection goes to.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Returns the connection to the pool if its exchange ended cleanly; closes it
    /// otherwise.
    pub fn release(self) {
        if self.conn.is_reusable() {
            self.endpoint.put_back(self.conn, self.worker);
        }
    }
}
