//! Lifecycle: graceful shutdown in process and of the real binary on SIGTERM, the
//! shutdown grace, and the command line (`check`, `--help`, `--version`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_quadrige-proxy");

/// Reads until the peer closes (EOF or reset), bounded; returns what came.
async fn read_until_closed(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut rest = Vec::new();
    let _ = within(Duration::from_secs(5), what, stream.read_to_end(&mut rest)).await;
    rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    // The upstream answers 2 s after it got the request, so the in-flight request
    // outlives the start of the shutdown by well over a second.
    let upstream = MockUpstream::new()
        .delayed("/slow", Duration::from_secs(2), "finished")
        .start()
        .await;
    let mut proxy = TestProxy::start(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"20s\"\n[upstreams.gn]\naddress = \"{upstream}\"\n",
        upstream.addr,
    )
    .await;
    let addr = proxy.addr;
    // A keep-alive client with a request in flight, and one that is connected but idle.
    let mut busy = TcpStream::connect(addr).await.unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the request reaching the upstream",
        || upstream.seen.count() == 1,
    )
    .await;

    let shutdown_started = Instant::now();
    proxy.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "new connections are refused once shutdown started"
    );
    // The idle connection is closed at once, without waiting for the busy one.
    let idle_rest = read_until_closed(&mut idle, "the idle connection closing").await;
    assert!(idle_rest.is_empty());
    assert!(
        shutdown_started.elapsed() < Duration::from_millis(1500),
        "the idle connection closed only after {:?}",
        shutdown_started.elapsed()
    );

    let response = within(
        Duration::from_secs(5),
        "the in-flight response",
        read_response(&mut busy),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.text(), "finished");
    assert!(response.complete);
    // Keep-alive ends with the drain: the connection is closed after the response.
    let busy_rest = read_until_closed(&mut busy, "the drained connection closing").await;
    assert!(busy_rest.is_empty());

    within(
        Duration::from_secs(5),
        "the server task ending",
        &mut proxy.task,
    )
    .await
    .unwrap();
    let drained_in = shutdown_started.elapsed();
    assert!(
        drained_in < Duration::from_secs(5),
        "the drain took {drained_in:?}; the grace is 20 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_bounds_the_drain() {
    let upstream = raw_upstream(vec![Step::Stall]).await;
    let mut proxy = TestProxy::start(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"500ms\"\n[upstreams.gn]\naddress = \"{upstream}\"\n[defaults]\ntimeouts = { response_header = \"1h\" }\n",
        upstream.addr,
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /never HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "the request reaching the upstream",
        || upstream.seen.connections.load(Ordering::SeqCst) == 1,
    )
    .await;
    let started = Instant::now();
    proxy.shutdown();
    within(
        Duration::from_secs(5),
        "the server task ending",
        &mut proxy.task,
    )
    .await
    .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450),
        "the drain ended after {took:?}, before the 500 ms grace, with a request in flight"
    );
    assert!(
        took < Duration::from_secs(3),
        "the drain took {took:?} with a 500 ms grace"
    );
    // Past the grace the connection is closed too, not left running in the process.
    let mut rest = Vec::new();
    let read = within(
        Duration::from_secs(3),
        "the client connection closing",
        async { tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest).await },
    )
    .await;
    assert!(read.is_ok(), "{read:?}");
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes `content` to a fresh file and runs `check` on it.
fn check_text(label: &str, content: &str) -> (PathBuf, Output) {
    let dir = temp_dir(label);
    let path = dir.join("proxy.toml");
    std::fs::write(&path, content).unwrap();
    let output = run(&["check", "--config", path.to_str().unwrap()]);
    (path, output)
}

#[test]
fn check_reports_an_unknown_key_with_file_line_and_column() {
    let (path, output) = check_text(
        "check-unknown-key",
        "[server]\nlisten = [\"127.0.0.1:8088\"]\nlisten_backlog = 3\n",
    );
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    let location = format!("{}:3:1:", path.display());
    assert!(stderr.contains(&location), "{location} missing: {stderr}");
    assert!(stderr.contains("listen_backlog"), "{stderr}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn check_reports_an_invalid_duration_with_file_line_and_column() {
    let (path, output) = check_text(
        "check-bad-duration",
        "[[routes]]\nname = \"a\"\nmatch = { path = \"/a\" }\ntimeouts = { idle = \"5 parsecs\" }\n",
    );
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    let location = format!("{}:4:21:", path.display());
    assert!(stderr.contains(&location), "{location} missing: {stderr}");
    assert!(stderr.contains("invalid duration"), "{stderr}");
    assert!(stderr.contains("5 parsecs"), "{stderr}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// The route names of a config file, in file order.
fn route_names(path: &Path) -> Vec<String> {
    let name = regex::Regex::new(r#"^\s*name\s*=\s*"([^"]+)""#).unwrap();
    let mut in_route = false;
    let mut names = Vec::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_route = trimmed == "[[routes]]";
        } else if in_route {
            if let Some(found) = name.captures(line) {
                names.push(found[1].to_string());
                in_route = false;
            }
        }
    }
    names
}

#[test]
fn check_accepts_the_shipped_config_and_prints_every_route_in_order() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/proxy.toml");
    let output = run(&["check", "--config", path.to_str().unwrap()]);
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(stdout.contains(": OK"), "{stdout}");
    let names = route_names(&path);
    assert!(!names.is_empty(), "the shipped config defines routes");
    // Each route's row, found by its name as a whole word, comes after the previous one.
    let lines: Vec<&str> = stdout.lines().collect();
    let mut after = 0;
    for name in names.iter().chain([&"(defaults)".to_string()]) {
        let row = lines[after..]
            .iter()
            .position(|line| line.split_whitespace().any(|word| word == name))
            .unwrap_or_else(|| panic!("route `{name}` missing or out of order:\n{stdout}"));
        after += row + 1;
    }
}

#[test]
fn help_and_version_work() {
    let help = run(&["--help"]);
    assert!(help.status.success());
    let help_text = text(&help.stdout);
    assert!(help_text.contains("Usage:"), "{help_text}");
    assert!(help_text.contains("check"), "{help_text}");
    assert!(help_text.contains("--config"), "{help_text}");

    let version = run(&["--version"]);
    assert!(version.status.success());
    assert_eq!(
        text(&version.stdout).trim(),
        format!("quadrige-proxy {}", env!("CARGO_PKG_VERSION"))
    );
}

/// The real binary, running on a temporary config, killed when dropped.
struct RunningBinary {
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
    dir: PathBuf,
}

impl RunningBinary {
    async fn start(label: &str, upstream: std::net::SocketAddr, grace: &str) -> RunningBinary {
        let dir = temp_dir(label);
        let port = free_port();
        let config = dir.join("proxy.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = [\"127.0.0.1:{port}\"]\nshutdown_grace = \"{grace}\"\n\
                 [log]\naccess = \"off\"\nlevel = \"info\"\n\
                 [upstreams.gn]\naddress = \"{upstream}\"\n\
                 [defaults]\ntimeouts = {{ response_header = \"1h\" }}\n"
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        within(Duration::from_secs(10), "the binary listening", async {
            while TcpStream::connect(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        RunningBinary { child, addr, dir }
    }

    fn sigterm(&self) {
        let pid = self.child.id().expect("the binary is running");
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    async fn exit_status(&mut self, limit: Duration) -> std::process::ExitStatus {
        within(limit, "the binary exiting", self.child.wait())
            .await
            .unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for RunningBinary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_finishes_in_flight_requests_on_sigterm_and_exits_0() {
    let upstream = MockUpstream::new()
        .delayed("/slow", Duration::from_secs(1), "finished")
        .start()
        .await;
    let mut binary = RunningBinary::start("sigterm", upstream.addr, "20s").await;
    let addr = binary.addr;
    let request = tokio::spawn(async move { get(addr, "/slow", "").await });
    eventually(
        Duration::from_secs(5),
        "the request reaching the upstream",
        || upstream.seen.count() == 1,
    )
    .await;
    let signalled = Instant::now();
    binary.sigterm();
    let response = within(Duration::from_secs(5), "the in-flight response", request)
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.text(), "finished");
    let status = binary.exit_status(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}\n{}", binary.stderr());
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "the binary took {took:?} to exit; the grace is 20 s"
    );
    assert!(
        binary.stderr().contains("SIGTERM received"),
        "{}",
        binary.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sigterm_the_binary_exits_after_shutdown_grace_even_with_a_stuck_request() {
    let upstream = raw_upstream(vec![Step::Stall]).await;
    let mut binary = RunningBinary::start("sigterm-grace", upstream.addr, "500ms").await;
    let mut stream = TcpStream::connect(binary.addr).await.unwrap();
    stream
        .write_all(b"GET /never HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "the request reaching the upstream",
        || upstream.seen.connections.load(Ordering::SeqCst) == 1,
    )
    .await;
    let signalled = Instant::now();
    binary.sigterm();
    let status = binary.exit_status(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}\n{}", binary.stderr());
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "exited {took:?} after SIGTERM with a 500 ms grace"
    );
    // The stuck client is not left hanging: its connection is closed with the process.
    let rest = read_until_closed(&mut stream, "the stuck connection closing").await;
    assert!(
        rest.is_empty(),
        "unexpected bytes: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gunicorn_worker_is_explained_on_stderr_with_its_route_and_request_id() {
    let upstream = raw_upstream(vec![Step::Write(GUNICORN_OWN_500)]).await;
    let binary = RunningBinary::start("worker-kill", upstream.addr, "1s").await;
    let response = get(
        binary.addr,
        "/geonature/api/exports",
        "X-Request-ID: kill-42\r\n",
    )
    .await;
    assert_eq!(response.status, 502, "{}", response.text());
    let explained = |stderr: &str| {
        stderr.lines().any(|line| {
            line.contains("Gunicorn's own error page")
                && line.contains("GUNICORN_TIMEOUT")
                && line.contains("route=(defaults)")
                && line.contains("request_id=\"kill-42\"")
        })
    };
    eventually(Duration::from_secs(5), "the warning on stderr", || {
        explained(&binary.stderr())
    })
    .await;
}
