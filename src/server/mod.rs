//! Listeners, configuration reloads and graceful shutdown.
//!
//! The running configuration is a [`Runtime`] snapshot behind an `ArcSwap`: each request
//! takes the snapshot current when it arrives and keeps it to the end, so a reload
//! (SIGHUP) applies to new requests at once while a 20-minute extraction finishes under
//! the rules it started with. A reload that fails — unreadable or invalid config, broken
//! certificate, a new address that cannot be bound — changes nothing and says why.
//! Listeners are diffed on reload: new addresses are opened, removed ones closed (their
//! open connections finish normally), unchanged ones keep accepting throughout.
//! On shutdown the listeners close first, then every connection finishes its in-flight
//! request and closes, for at most `shutdown_grace`.

mod connection;
pub mod io;
mod systemd;
pub mod tls;
pub mod workers;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::access_log::AccessLog;
use crate::config::{Config, ConfigError};
use crate::proxy::Proxy;
use workers::Workers;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the access log: {0}")]
    AccessLog(std::io::Error),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Everything built from one configuration.
pub struct Runtime {
    pub proxy: Proxy,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
    default_write_stall: Option<Duration>,
    shutdown_grace: Duration,
    /// Who may use the admin listener.
    admin_allow: Vec<crate::config::Cidr>,
    /// The listeners this configuration wants, by address and kind.
    listen: Vec<ListenerKey>,
}

impl Runtime {
    fn build(config: &Config) -> Result<Runtime, ServerError> {
        let tls = config.server.tls.as_ref().map(tls::acceptor).transpose()?;
        let access_log = AccessLog::open(&config.log).map_err(ServerError::AccessLog)?;
        let mut listen: Vec<ListenerKey> = config
            .server
            .listen
            .iter()
            .map(|a| (*a, ListenerKind::Plain))
            .collect();
        if let Some(t) = &config.server.tls {
            listen.extend(t.listen.iter().map(|a| (*a, ListenerKind::Tls)));
        }
        if let Some(admin) = &config.admin {
            listen.push((admin.listen, ListenerKind::Admin));
        }
        Ok(Runtime {
            proxy: Proxy::new(config, access_log),
            tls,
            header_read_timeout: config.server.header_read_timeout,
            default_write_stall: config.defaults.timeouts.idle.0,
            shutdown_grace: config.server.shutdown_grace,
            admin_allow: config
                .admin
                .as_ref()
                .map(|a| a.allow.clone())
                .unwrap_or_default(),
            listen,
        })
    }
}

/// Where the server is in its life, as connections see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// Finish the request in flight, then close.
    Drain,
    /// The grace is over: close now.
    Now,
}

/// What connections share: the current configuration.
pub struct Shared {
    runtime: ArcSwap<Runtime>,
    /// Client connections parked right now (see `connection`), across reloads.
    parked: AtomicUsize,
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenerKind {
    Plain,
    Tls,
    /// Metrics, health and the status page.
    Admin,
}

/// A listener is known by its configured address and kind: two listeners on port 0
/// (tests) are still two listeners.
type ListenerKey = (SocketAddr, ListenerKind);

struct Listener {
    /// Set until `run` starts accepting.
    bound: Option<TcpListener>,
    /// Set to `true` to close the listener; one accept loop per worker.
    running: Option<(watch::Sender<bool>, Vec<JoinHandle<()>>)>,
}

impl Listener {
    fn bound(socket: TcpListener) -> Listener {
        Listener {
            bound: Some(socket),
            running: None,
        }
    }
}

/// A request to re-read the configuration file; the outcome is sent back when asked.
pub struct ReloadRequest {
    reply: Option<oneshot::Sender<Result<(), String>>>,
}

impl ReloadRequest {
    /// A request whose outcome is only logged (SIGHUP).
    pub fn logged() -> ReloadRequest {
        ReloadRequest { reply: None }
    }

    /// A request whose outcome (or the reason it was refused) is also sent back.
    pub fn answered() -> (ReloadRequest, oneshot::Receiver<Result<(), String>>) {
        let (reply, outcome) = oneshot::channel();
        (ReloadRequest { reply: Some(reply) }, outcome)
    }
}

/// A bound proxy server, ready to run.
pub struct Server {
    shared: Arc<Shared>,
    listeners: HashMap<ListenerKey, Listener>,
    /// Where reloads read the configuration from.
    source: PathBuf,
    stop: watch::Sender<Stop>,
    workers: Workers,
}

impl Server {
    /// Builds the runtime and binds every listen address (or takes the socket systemd
    /// passed for it).
    pub async fn bind(config: &Config) -> Result<Server, ServerError> {
        let runtime = Runtime::build(config)?;
        let mut inherited = systemd::inherited_listeners();
        let mut listeners = HashMap::new();
        for &(addr, kind) in &runtime.listen {
            let socket = match inherited.remove(&addr) {
                Some(socket) => socket,
                None => bind(addr).await?,
            };
            listeners.insert((addr, kind), Listener::bound(socket));
        }
        for (addr, socket) in inherited {
            tracing::warn!(%addr, "systemd passed a socket the config does not name: serving it as plain HTTP");
            listeners.insert((addr, ListenerKind::Plain), Listener::bound(socket));
        }
        Ok(Server {
            shared: Arc::new(Shared {
                runtime: ArcSwap::from_pointee(runtime),
                parked: AtomicUsize::new(0),
            }),
            listeners,
            source: config.source.clone(),
            stop: watch::channel(Stop::Running).0,
            workers: Workers::start(config.server.workers).map_err(ServerError::Workers)?,
        })
    }

    /// The addresses actually bound (useful with port 0): plain, then TLS, then admin.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound_addrs().into_iter().map(|(_, a)| a).collect()
    }

    /// The addresses actually bound, with what each serves.
    pub fn bound_addrs(&self) -> Vec<(ListenerKind, SocketAddr)> {
        let mut addrs: Vec<(ListenerKind, SocketAddr)> = self
            .listeners
            .iter()
            .filter_map(|(&(_, kind), l)| Some((kind, l.bound.as_ref()?.local_addr().ok()?)))
            .collect();
        addrs.sort();
        addrs
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (_keep, reloads) = mpsc::channel(1);
        self.run_with_reloads(shutdown, reloads).await;
    }

    /// Serves until `shutdown` resolves, reloading the configuration file for each
    /// request that arrives on `reloads`.
    pub async fn run_with_reloads(
        mut self,
        shutdown: impl Future<Output = ()>,
        mut reloads: mpsc::Receiver<ReloadRequest>,
    ) {
        let keys: Vec<ListenerKey> = self.listeners.keys().copied().collect();
        for key in keys {
            self.start_accepting(key);
        }
        systemd::ready();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(request) = reloads.recv() => self.reload(request).await,
            }
        }
        systemd::stopping();
        self.drain().await;
    }

    fn start_accepting(&mut self, key: ListenerKey) {
        let Some(listener) = self.listeners.get_mut(&key) else {
            return;
        };
        let Some(socket) = listener.bound.take() else {
            return;
        };
        let (addr, kind) = (socket.local_addr().ok(), key.1);
        let socket = match socket.into_std() {
            Ok(socket) => socket,
            Err(e) => {
                tracing::error!(?addr, error = %e, "cannot hand the listener to the workers");
                return;
            }
        };
        tracing::info!(?addr, ?kind, "listening");
        let (close, closed) = watch::channel(false);
        let mut tasks = Vec::new();
        for worker in self.workers.handles() {
            let socket = match socket.try_clone() {
                Ok(socket) => socket,
                Err(e) => {
                    tracing::error!(?addr, error = %e, "cannot share the listener with a worker");
                    continue;
                }
            };
            let (shared, stop, closed) =
                (self.shared.clone(), self.stop.subscribe(), closed.clone());
            tasks.push(worker.spawn(async move {
                // Registered with this worker's own reactor.
                match TcpListener::from_std(socket) {
                    Ok(socket) => accept_loop(socket, kind, shared, stop, closed).await,
                    Err(e) => tracing::error!(?addr, error = %e, "a worker cannot listen"),
                }
            }));
        }
        listener.running = Some((close, tasks));
    }

    /// Re-reads the configuration; on any failure the running one stays untouched.
    async fn reload(&mut self, request: ReloadRequest) {
        systemd::reloading();
        let outcome = self.try_reload().await.map_err(|e| e.to_string());
        match &outcome {
            Ok(()) => tracing::info!(config = %self.source.display(), "configuration reloaded"),
            Err(e) => tracing::error!(
                config = %self.source.display(),
                "reload refused, the running configuration stays: {e}"
            ),
        }
        systemd::ready();
        if let Some(reply) = request.reply {
            let _ = reply.send(outcome);
        }
    }

    async fn try_reload(&mut self) -> Result<(), ServerError> {
        let config = Config::load(&self.source)?;
        let runtime = Runtime::build(&config)?;
        if config.server.workers != self.workers.count() {
            tracing::warn!(
                running = self.workers.count(),
                configured = config.server.workers,
                "`workers` changes at the next restart, not on reload"
            );
        }
        let wanted = runtime.listen.clone();
        let removed: Vec<ListenerKey> = self
            .listeners
            .keys()
            .filter(|key| !wanted.contains(key))
            .copied()
            .collect();
        // Bind new addresses first, so a failure leaves everything as it was; an address
        // that only switches between plain and TLS is rebound once its old listener closed.
        let mut opened = Vec::new();
        let mut after_close = Vec::new();
        for key in wanted.iter().filter(|k| !self.listeners.contains_key(k)) {
            if removed.iter().any(|(addr, _)| *addr == key.0) {
                after_close.push(*key);
            } else {
                opened.push((*key, bind(key.0).await?));
            }
        }
        for key in removed {
            self.close_listener(key).await;
        }
        for key in after_close {
            opened.push((key, bind(key.0).await?));
        }
        self.shared.runtime.store(Arc::new(runtime));
        for (key, socket) in opened {
            self.listeners.insert(key, Listener::bound(socket));
            self.start_accepting(key);
        }
        Ok(())
    }

    async fn close_listener(&mut self, key: ListenerKey) {
        if let Some(Listener {
            running: Some((close, tasks)),
            ..
        }) = self.listeners.remove(&key)
        {
            let _ = close.send(true);
            for task in tasks {
                let _ = task.await;
            }
            tracing::info!(addr = %key.0, kind = ?key.1, "stopped listening");
        }
    }

    async fn drain(mut self) {
        let _ = self.stop.send(Stop::Drain);
        for (_, listener) in self.listeners.drain() {
            for task in listener.running.into_iter().flat_map(|(_, tasks)| tasks) {
                let _ = task.await;
            }
        }
        let grace = self.shared.runtime.load().shutdown_grace;
        tracing::info!(
            open_connections = self.stop.receiver_count(),
            ?grace,
            "draining connections"
        );
        if tokio::time::timeout(grace, self.stop.closed())
            .await
            .is_err()
        {
            tracing::warn!(
                still_open = self.stop.receiver_count(),
                "shutdown grace elapsed: closing the remaining connections"
            );
            let _ = self.stop.send(Stop::Now);
            // Each connection drops at its next poll; give them a moment to go.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.stop.closed()).await;
        }
        // Whatever is left closes with its worker.
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || workers.stop()).await;
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

async fn accept_loop(
    listener: TcpListener,
    kind: ListenerKind,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<Stop>,
    mut closed: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|stop| *stop != Stop::Running) => return,
            _ = closed.wait_for(|closed| *closed) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(connection::serve(
                    stream,
                    peer,
                    kind,
                    shared.clone(),
                    stopped.clone(),
                ));
            }
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
