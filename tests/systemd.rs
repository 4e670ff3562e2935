//! The real binary under systemd's protocols: READY/RELOADING/STOPPING notifications
//! on `NOTIFY_SOCKET` around SIGHUP and SIGTERM, listening sockets passed by socket
//! activation, and a unit file that `systemd-analyze verify` accepts.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const BINARY: &str = env!("CARGO_BIN_EXE_quadrige-proxy");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qp-systemd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_config(dir: &Path, listen: &str, upstream: std::net::SocketAddr) -> PathBuf {
    let path = dir.join("proxy.toml");
    let text = format!(
        "[server]\nlisten = [\"{listen}\"]\nshutdown_grace = \"5s\"\n[log]\naccess = \"off\"\n[upstreams.gn]\naddress = \"{upstream}\"\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Reads notifications until one contains `wanted`; returns everything read.
fn expect_notification(socket: &UnixDatagram, wanted: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('|');
            if seen.contains(wanted) {
                return seen;
            }
        }
    }
    panic!("no {wanted} notification; got {seen:?}");
}

async fn free_port() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn the_binary_notifies_ready_reloading_and_stopping_and_exits_zero() {
    let dir = scratch("notify");
    let upstream = MockUpstream::new().start().await;
    let config = write_config(&dir, &free_port().await.to_string(), upstream.addr);
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = Command::new(BINARY)
        .args(["--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    expect_notification(&socket, "READY=1");
    signal(&child, "HUP");
    let reload = expect_notification(&socket, "RELOADING=1");
    if !reload
        .split("RELOADING=1")
        .nth(1)
        .is_some_and(|after| after.contains("READY=1"))
    {
        expect_notification(&socket, "READY=1");
    }
    signal(&child, "TERM");
    expect_notification(&socket, "STOPPING=1");
    let status = within(Duration::from_secs(10), "exit", async {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_listening_socket_passed_by_socket_activation_is_used() {
    let activate = Path::new("/usr/bin/systemd-socket-activate");
    if !activate.exists() {
        eprintln!("skipped: systemd-socket-activate is not installed");
        return;
    }
    let dir = scratch("activation");
    let upstream = MockUpstream::new().text("/", "activated").start().await;
    let addr = free_port().await;
    let config = write_config(&dir, &addr.to_string(), upstream.addr);
    // systemd-socket-activate binds the port, then starts the proxy on the first
    // connection with the socket as fd 3: a proxy that bound the port itself would fail.
    let mut child = Command::new(activate)
        .args([
            "--listen",
            &addr.to_string(),
            BINARY,
            "--config",
            config.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let response = within(Duration::from_secs(10), "activated request", async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        get(addr, "/x", "").await
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "activated");
}

#[test]
fn the_shipped_unit_file_passes_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = scratch("unit");
    let unit = std::fs::read_to_string("deploy/quadrige-proxy.service")
        .unwrap()
        .replace("/usr/bin/quadrige-proxy", BINARY);
    let path = dir.join("quadrige-proxy.service");
    std::fs::write(&path, unit).unwrap();
    let output = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && complaints.trim().is_empty(),
        "{complaints}"
    );
}
