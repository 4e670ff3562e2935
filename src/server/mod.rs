//! Listeners, client connections and graceful shutdown.
//!
//! Each listener accepts on its own task; each client connection is served by hyper's
//! HTTP/1.1 server on a task of its own, with the slowloris guard (`header_read_timeout`,
//! which also bounds idle keep-alive) and the write stall guard of [`io`]. On shutdown
//! the listeners close first, then every connection finishes its in-flight request and
//! closes, for at most `shutdown_grace`.

pub mod io;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::proxy::{Client, Proxy};
use io::{ClientStream, WriteStallLimit};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the access log: {0}")]
    AccessLog(std::io::Error),
}

/// Connection settings that do not change per request.
#[derive(Clone)]
struct ConnectionSettings {
    header_read_timeout: Duration,
    default_write_stall: Option<Duration>,
}

/// A bound, not yet running, proxy server.
pub struct Server {
    listeners: Vec<TcpListener>,
    proxy: Arc<Proxy>,
    settings: ConnectionSettings,
    shutdown_grace: Duration,
}

impl Server {
    /// Opens the access log and binds every listen address.
    pub async fn bind(config: &Config) -> Result<Server, ServerError> {
        let access_log = AccessLog::open(&config.log).map_err(ServerError::AccessLog)?;
        let mut listeners = Vec::with_capacity(config.server.listen.len());
        for &addr in &config.server.listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?;
            listeners.push(listener);
        }
        Ok(Server {
            listeners,
            proxy: Arc::new(Proxy::new(config, access_log)),
            settings: ConnectionSettings {
                header_read_timeout: config.server.header_read_timeout,
                default_write_stall: config.defaults.timeouts.idle.0,
            },
            shutdown_grace: config.server.shutdown_grace,
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` resolves, then drains connections for up to the grace.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop, stopped) = watch::channel(false);
        let mut accept_tasks = Vec::with_capacity(self.listeners.len());
        for listener in self.listeners {
            let addr = listener.local_addr().ok();
            tracing::info!(?addr, "listening");
            accept_tasks.push(tokio::spawn(accept_loop(
                listener,
                self.proxy.clone(),
                self.settings.clone(),
                stopped.clone(),
            )));
        }
        drop(stopped);
        shutdown.await;
        let _ = stop.send(true);
        for task in accept_tasks {
            let _ = task.await;
        }
        let open = stop.receiver_count();
        tracing::info!(open_connections = open, grace = ?self.shutdown_grace, "shutting down: draining connections");
        if tokio::time::timeout(self.shutdown_grace, stop.closed())
            .await
            .is_err()
        {
            tracing::warn!(
                still_open = stop.receiver_count(),
                "shutdown grace elapsed: closing the remaining connections"
            );
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: ConnectionSettings,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(serve_connection(
                    stream,
                    peer,
                    proxy.clone(),
                    settings.clone(),
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

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    settings: ConnectionSettings,
    mut stopped: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let write_stall = WriteStallLimit::new(settings.default_write_stall);
    let client = Arc::new(Client {
        addr: peer,
        scheme: "http",
        write_stall: write_stall.clone(),
    });
    let service = service_fn(move |request| {
        let proxy = proxy.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(proxy.handle(request, &client).await) }
    });
    let io = TokioIo::new(ClientStream::new(stream, write_stall));
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => Some(result),
        _ = stopped.wait_for(|stop| *stop) => None,
    };
    let result = match result {
        Some(result) => result,
        None => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}
