//! systemd integration: readiness notifications for `Type=notify` units (READY,
//! RELOADING, STOPPING; all no-ops outside systemd) and listening sockets handed over
//! by socket activation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::FromRawFd;

use sd_notify::NotifyState;
use tokio::net::TcpListener;

pub fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

pub fn reloading() {
    notify(&[
        NotifyState::Reloading,
        NotifyState::Status("reloading the configuration"),
    ]);
}

pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining connections"),
    ]);
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The TCP listening sockets systemd passed (`LISTEN_FDS`), by local address.
pub fn inherited_listeners() -> HashMap<SocketAddr, TcpListener> {
    let fds = match sd_notify::listen_fds() {
        Ok(fds) => fds,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring invalid socket activation variables");
            return HashMap::new();
        }
    };
    let mut listeners = HashMap::new();
    for fd in fds {
        // SAFETY: systemd hands these descriptors to this process alone, open, starting
        // at SD_LISTEN_FDS_START; `listen_fds` checked LISTEN_PID is ours, and each fd
        // is wrapped exactly once here.
        let socket = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        let adopted = socket
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(socket))
            .and_then(|l| Ok((l.local_addr()?, l)));
        match adopted {
            Ok((addr, listener)) => {
                tracing::info!(%addr, "using the socket passed by systemd");
                listeners.insert(addr, listener);
            }
            Err(e) => {
                tracing::warn!(fd, error = %e, "ignoring a passed descriptor that is not a TCP listener")
            }
        }
    }
    listeners
}
