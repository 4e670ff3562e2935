//! Upstreams: one or more servers of the same application, the admission queue in front
//! of them, and the choice of server.
//!
//! Gunicorn's sync workers take one request each; a request beyond `max_connections`
//! would wait unseen in the kernel backlog. Here it waits in a FIFO queue in the proxy
//! instead, bounded in length (`max_queue`) and in time (`queue_timeout`), and is handed
//! a [`Slot`] on a healthy server as soon as one frees. A slot is held until the response
//! body is done and released on every path (end, error, timeout, client gone), since it
//! is released when dropped.

pub mod codec;
mod conn;
mod health;
mod pool;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::config::{Balance, UpstreamConfig};
use crate::metrics::UpstreamMetrics;
pub use codec::{ExtraFields, Framing, Malformed};
pub use conn::{Pace, SendError, WireError};
pub use pool::{ConnectError, Endpoint, PooledConnection};

/// Why a request could not be given a server.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum AdmitError {
    #[error("the upstream's queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("no server of the upstream became free within {0:?} (queue_timeout)")]
    QueueTimeout(Duration),
    #[error("no server of the upstream is healthy")]
    NoHealthyServer,
}

/// A group of servers behind one name.
pub struct Upstream {
    pub name: Arc<str>,
    pub preserve_host: bool,
    /// Gunicorn's `--timeout`, to recognise killed workers.
    pub worker_timeout: Option<Duration>,
    pub queue_timeout: Duration,
    pub metrics: UpstreamMetrics,
    servers: Vec<Arc<Endpoint>>,
    balance: Balance,
    max_connections: Option<usize>,
    max_queue: usize,
    next: AtomicUsize,
    /// Requests waiting for a slot, oldest first.
    queue: Mutex<VecDeque<oneshot::Sender<Slot>>>,
}

impl Upstream {
    /// Builds the upstream and starts its active health checks, if any.
    pub fn new(config: &UpstreamConfig) -> Arc<Upstream> {
        let upstream = Arc::new(Upstream {
            name: Arc::from(config.name.as_str()),
            preserve_host: config.preserve_host,
            worker_timeout: config.worker_timeout,
            queue_timeout: config.queue_timeout,
            metrics: UpstreamMetrics::default(),
            servers: config
                .servers
                .iter()
                .map(|address| Endpoint::new(address, config))
                .collect(),
            balance: config.balance,
            max_connections: config.max_connections,
            max_queue: config.max_queue,
            next: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
        });
        if let Some(check) = &config.health_check {
            for server in &upstream.servers {
                health::spawn_checker(
                    Arc::downgrade(&upstream),
                    Arc::downgrade(server),
                    check.clone(),
                );
            }
        }
        upstream
    }

    pub fn servers(&self) -> &[Arc<Endpoint>] {
        &self.servers
    }

    /// How many requests wait for a slot.
    pub fn queued(&self) -> usize {
        self.lock_queue().len()
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<oneshot::Sender<Slot>>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot on a healthy server: at once when one is free and nobody waits, otherwise
    /// after the requests queued before this one.
    pub async fn admit(self: &Arc<Self>) -> Result<Slot, AdmitError> {
        let waiting = {
            let mut queue = self.lock_queue();
            queue.retain(|waiter| !waiter.is_closed());
            if queue.is_empty() {
                if let Some(slot) = self.try_take() {
                    return Ok(slot);
                }
            }
            if !self.servers.iter().any(|s| s.health.is_up()) {
                return Err(AdmitError::NoHealthyServer);
            }
            if queue.len() >= self.max_queue {
                self.metrics.queue_full.inc();
                return Err(AdmitError::QueueFull(queue.len()));
            }
            let (sender, receiver) = oneshot::channel();
            queue.push_back(sender);
            receiver
        };
        match tokio::time::timeout(self.queue_timeout, waiting).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => {
                self.metrics.queue_timeout.inc();
                Err(AdmitError::QueueTimeout(self.queue_timeout))
            }
        }
    }

    /// Takes a slot on the best healthy server with room, if there is one.
    fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let has_room = |s: &&Arc<Endpoint>| {
            s.health.is_up()
                && self
                    .max_connections
                    .is_none_or(|max| s.in_flight.load(Ordering::Relaxed) < max)
        };
        let chosen = match self.balance {
            Balance::LeastOutstanding => self
                .servers
                .iter()
                .filter(has_room)
                .min_by_key(|s| s.in_flight.load(Ordering::Relaxed)),
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let n = self.servers.len();
                (0..n)
                    .map(|i| &self.servers[(start + i) % n])
                    .find(has_room)
            }
        }?;
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            server: chosen.clone(),
            upstream: self.clone(),
            hand_over_on_drop: true,
        })
    }

    /// Hands freed capacity to the oldest waiters.
    fn dispatch(self: &Arc<Self>) {
        let mut queue = self.lock_queue();
        while !queue.is_empty() {
            let Some(mut slot) = self.try_take() else {
                return;
            };
            loop {
                let Some(waiter) = queue.pop_front() else {
                    // Everyone who waited gave up: the slot goes back quietly (we hold
                    // the queue lock, so a drop that dispatches would deadlock).
                    slot.hand_over_on_drop = false;
                    return;
                };
                match waiter.send(slot) {
                    Ok(()) => break,
                    Err(returned) => slot = returned,
                }
            }
        }
    }
}

/// The right to send one request to one server; freed capacity goes to the next waiter.
pub struct Slot {
    pub server: Arc<Endpoint>,
    upstream: Arc<Upstream>,
    hand_over_on_drop: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.server.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.hand_over_on_drop {
            self.upstream.dispatch();
        }
    }
}

impl Slot {
    /// Reports a failure of this server (passive health); logs when it goes out. Like
    /// nginx, a lone server is never taken out by failures: its own error (refused,
    /// reset) says more than "no healthy server".
    pub fn server_failed(&self) {
        if self.upstream.servers.len() > 1 && self.server.health.record_failure() {
            tracing::warn!(
                upstream = %self.upstream.name,
                server = %self.server.address,
                "server taken out after repeated failures (max_fails within fail_timeout)"
            );
            self.upstream.metrics.health_changes.inc();
        }
    }
}
