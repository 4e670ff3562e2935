//! The soak: the real binary under mixed traffic for a few minutes, reloaded (SIGHUP)
//! every few seconds. Ignored by default; run it by hand:
//!
//! ```sh
//! benches/soak.sh            # 2 minutes
//! SOAK_SECS=600 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! Traffic, all at once: small API calls, long requests (a few seconds, as extractions
//! are minutes), 8 MiB downloads and 4 MiB uploads whose every byte is checked, and
//! malformed requests that must get a 4xx. Every response is checked: a request
//! without its complete, correct answer is *lost*, one whose body differs is
//! *corrupted*; both must be zero. The proxy's RSS and open descriptors are sampled
//! every second and reported.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Response;
use tokio::net::TcpStream;
use tokio::time::Instant;

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_quadrige-proxy");
const DOWNLOAD: u64 = 8 << 20;
const UPLOAD: usize = 4 << 20;

fn config(port: u16, upstream: SocketAddr, generation: u64) -> String {
    // Each reload changes something real: the long route's response-header timer.
    format!(
        r#"
[server]
listen = ["127.0.0.1:{port}"]
header_read_timeout = "5s"
shutdown_grace = "30s"
[log]
access = "off"
level = "warn"
[upstreams.gn]
address = "{upstream}"
keepalive_timeout = "1s"
[defaults]
timeouts = {{ connect = "2s", response_header = "10s", idle = "10s" }}
max_request_body = "16MiB"
[[routes]]
name = "long"
match = {{ path_prefix = "/long/" }}
timeouts = {{ response_header = "{}s" }}
[[routes]]
name = "small-body"
match = {{ path_prefix = "/api/small-body" }}
max_request_body = "1KiB"
"#,
        30 + generation % 2
    )
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    lost: AtomicU64,
    corrupted: AtomicU64,
}

impl Tally {
    fn record(&self, outcome: Result<(), (bool, String)>) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((corrupted, why)) => {
                eprintln!("soak: {why}");
                if corrupted {
                    self.corrupted.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// One exchange, bounded: `Err((corrupted, why))` when it failed.
async fn bounded(
    what: &str,
    exchange: impl std::future::Future<Output = Result<RawResponse, String>>,
) -> Result<RawResponse, (bool, String)> {
    match tokio::time::timeout(Duration::from_secs(60), exchange).await {
        Err(_) => Err((false, format!("{what}: no answer within 60 s"))),
        Ok(Err(e)) => Err((false, format!("{what}: {e}"))),
        Ok(Ok(response)) if !response.complete => Err((
            false,
            format!("{what}: {} with a cut-off body", response.status),
        )),
        Ok(Ok(response)) => Ok(response),
    }
}

/// Sends raw bytes and reads one response, reporting failures instead of panicking.
async fn try_request(addr: SocketAddr, request: &[u8]) -> Result<RawResponse, String> {
    use tokio::io::AsyncWriteExt;
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // A refused request may be answered and closed before all of it is written.
    let written = stream.write_all(request).await;
    let (bytes, _) = read_until_close(&mut stream, Duration::from_secs(60)).await;
    if bytes.is_empty() {
        written.map_err(|e| format!("write: {e}"))?;
    }
    let (responses, _) = parse_responses(&bytes);
    let found = responses.into_iter().find(|r| r.status >= 200);
    found.ok_or_else(|| format!("no response in {} bytes", bytes.len()))
}

fn small(
    addr: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    n: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let path = format!("/api/small/{n}/{i}");
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: soak.test\r\nConnection: close\r\n\r\n");
            let outcome = bounded("small", try_request(addr, request.as_bytes()))
                .await
                .and_then(|r| match (r.status, r.text()) {
                    (200, body) if body == path => Ok(()),
                    (200, body) => Err((true, format!("small {path}: body {body:?}"))),
                    (status, body) => Err((false, format!("small {path}: {status} {body}"))),
                });
            tally.record(outcome);
        }
    })
}

fn long(addr: SocketAddr, tally: Arc<Tally>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let outcome = bounded(
                "long",
                try_request(addr, b"POST /long/extraction HTTP/1.1\r\nHost: soak.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"),
            )
            .await
            .and_then(|r| match (r.status, r.text()) {
                (200, body) if body == "extraction done" => Ok(()),
                (200, body) => Err((true, format!("long: body {body:?}"))),
                (status, body) => Err((false, format!("long: {status} {body}"))),
            });
            tally.record(outcome);
        }
    })
}

fn download(
    addr: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let outcome = bounded(
                "download",
                try_request(addr, b"GET /download/data.zip HTTP/1.1\r\nHost: soak.test\r\nConnection: close\r\n\r\n"),
            )
            .await
            .and_then(|r| {
                let mut check = PatternCheck::new();
                check.feed(&r.body);
                match r.status {
                    200 if check.offset == DOWNLOAD && check.intact => Ok(()),
                    200 => Err((true, format!("download: {} bytes, intact {}", check.offset, check.intact))),
                    status => Err((false, format!("download: {status}"))),
                }
            });
            tally.record(outcome);
        }
    })
}

fn upload(
    addr: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut request = format!(
            "POST /upload HTTP/1.1\r\nHost: soak.test\r\nContent-Length: {UPLOAD}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        request.extend_from_slice(&pattern_bytes(UPLOAD));
        while !stop.load(Ordering::Relaxed) {
            let outcome = bounded("upload", try_request(addr, &request))
                .await
                .and_then(|r| match (r.status, r.text()) {
                    (200, body) if body == format!("{UPLOAD} true") => Ok(()),
                    (200, body) => Err((true, format!("upload: upstream got {body:?}"))),
                    (status, body) => Err((false, format!("upload: {status} {body}"))),
                });
            tally.record(outcome);
        }
    })
}

fn malformed(
    addr: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let long_target = format!(
        "GET /{} HTTP/1.1\r\nHost: soak.test\r\n\r\n",
        "a".repeat(10_000)
    );
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"POST /a HTTP/1.1\r\nHost: soak.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(), 400),
        (b"POST /a HTTP/1.1\r\nHost: soak.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(), 400),
        (b"POST /a HTTP/1.1\r\nHost: soak.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec(), 501),
        (b"GET /a HTTP/1.1\r\nHost: soak.test\r\nX-A: one\r\n two\r\n\r\n".to_vec(), 400),
        (b"GET /a HTTP/1.1\r\nHost: soak.test\r\nHost: evil.test\r\n\r\n".to_vec(), 400),
        (b"CONNECT soak.test:443 HTTP/1.1\r\nHost: soak.test:443\r\n\r\n".to_vec(), 405),
        (long_target.into_bytes(), 414),
        (format!("GET /a HTTP/1.1\r\nHost: soak.test\r\nX-Big: {}\r\n\r\n", "b".repeat(100_000)).into_bytes(), 431),
        (b"POST /api/small-body HTTP/1.1\r\nHost: soak.test\r\nContent-Length: 5000\r\n\r\n".to_vec(), 413),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n".to_vec(), 400),
    ];
    tokio::spawn(async move {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let (request, status) = &cases[i % cases.len()];
            i += 1;
            let outcome = bounded("malformed", try_request(addr, request))
                .await
                .and_then(|r| {
                    if r.status == *status {
                        Ok(())
                    } else {
                        Err((
                            true,
                            format!(
                                "malformed case {}: {} instead of {status}",
                                (i - 1) % cases.len(),
                                r.status
                            ),
                        ))
                    }
                });
            tally.record(outcome);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// The proxy's resident memory (KiB) and open descriptors.
fn sample(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak of several minutes; run it by hand (benches/soak.sh)"]
async fn soak() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let upstream = MockUpstream::new()
        .route("/api/", |req, _| async move {
            Response::new(full(req.uri().path().to_string()))
        })
        .route("/long/", |_, _| async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            text(http::StatusCode::OK, "extraction done")
        })
        .route("/download/", |_, seen| async move {
            Response::new(counted_stream(DOWNLOAD, 64 * 1024, seen))
        })
        .route("/upload", |req, seen| async move {
            let (bytes, intact) = drain_counted(req.into_body(), Duration::ZERO, &seen).await;
            Response::new(full(format!("{bytes} {intact}")))
        })
        .start()
        .await;

    let dir = temp_dir("soak");
    let path = dir.join("proxy.toml");
    let port = free_port();
    std::fs::write(&path, config(port, upstream.addr, 0)).unwrap();
    let log_path = dir.join("proxy.stderr");
    let mut child = tokio::process::Command::new(BIN)
        .args(["--config", path.to_str().unwrap()])
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("the proxy starts");
    let pid = child.id().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually(Duration::from_secs(10), "the proxy listening", || {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .await;

    let kinds: [(&str, Arc<Tally>); 5] = std::array::from_fn(|i| {
        let name = ["small API", "long", "download", "upload", "malformed"][i];
        (name, Arc::new(Tally::default()))
    });
    let [small_t, long_t, download_t, upload_t, bad] = kinds.each_ref().map(|(_, t)| t.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for n in 0..6 {
        workers.push(small(addr, small_t.clone(), stop.clone(), n));
    }
    for _ in 0..3 {
        workers.push(long(addr, long_t.clone(), stop.clone()));
    }
    for _ in 0..2 {
        workers.push(download(addr, download_t.clone(), stop.clone()));
        workers.push(upload(addr, upload_t.clone(), stop.clone()));
    }
    workers.push(malformed(addr, bad.clone(), stop.clone()));

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut reloads = 0u64;
    let mut next_reload = started + Duration::from_secs(3);
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push((started.elapsed().as_secs(), sample(pid)));
        if Instant::now() >= next_reload {
            reloads += 1;
            std::fs::write(&path, config(port, upstream.addr, reloads)).unwrap();
            signal(pid, "HUP");
            next_reload += Duration::from_secs(3);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        within(Duration::from_secs(90), "a soak worker finishing", worker)
            .await
            .unwrap();
    }
    // Idle again: what is left open once every client has gone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_rss, idle_fds) = sample(pid);
    signal(pid, "TERM");
    let status = within(Duration::from_secs(40), "the proxy exiting", child.wait())
        .await
        .unwrap();

    let report = |name: &str, t: &Tally| {
        println!(
            "{name:<10} sent {:>6}  ok {:>6}  lost {:>2}  corrupted {:>2}",
            t.sent.load(Ordering::Relaxed),
            t.ok.load(Ordering::Relaxed),
            t.lost.load(Ordering::Relaxed),
            t.corrupted.load(Ordering::Relaxed)
        )
    };
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let count = |level: &str| log.lines().filter(|l| l.contains(level)).count();
    println!("\nsoak: {secs} s, {reloads} reloads (SIGHUP every 3 s), proxy pid {pid}");
    println!(
        "proxy log: {} WARN lines (the requests it refused or failed, with why), {} ERROR lines",
        count(" WARN "),
        count(" ERROR ")
    );
    for line in log.lines().filter(|l| l.contains(" ERROR ")).take(10) {
        println!("  {line}");
    }
    for (name, tally) in &kinds {
        report(name, tally);
    }
    println!("time(s)  rss(MiB)  fds");
    let step = (samples.len() / 12).max(1);
    for (t, (rss, fds)) in samples.iter().step_by(step) {
        println!("{t:>7}  {:>8.1}  {fds:>3}", *rss as f64 / 1024.0);
    }
    let rss: Vec<u64> = samples.iter().map(|(_, (r, _))| *r).collect();
    let fds: Vec<usize> = samples.iter().map(|(_, (_, f))| *f).collect();
    let half = rss.len() / 2;
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
    println!(
        "rss: first half max {:.1} MiB, second half max {:.1} MiB; fds min {} max {}; idle after: rss {:.1} MiB, fds {idle_fds}; exit {status}",
        max(&rss[..half]) as f64 / 1024.0,
        max(&rss[half..]) as f64 / 1024.0,
        fds.iter().min().unwrap_or(&0),
        fds.iter().max().unwrap_or(&0),
        idle_rss as f64 / 1024.0,
    );

    for (name, tally) in &kinds {
        assert_eq!(
            tally.lost.load(Ordering::Relaxed),
            0,
            "{name}: lost responses"
        );
        assert_eq!(
            tally.corrupted.load(Ordering::Relaxed),
            0,
            "{name}: corrupted (or, for malformed requests, wrongly answered) responses"
        );
        assert!(
            tally.ok.load(Ordering::Relaxed) > 0,
            "{name}: nothing completed"
        );
    }
    assert!(status.success(), "the proxy exited with {status}");
    // Flat memory: the second half peaks no higher than the first plus a margin.
    assert!(
        max(&rss[half..]) <= max(&rss[..half]) * 5 / 4 + 16 * 1024,
        "memory grew: {rss:?}"
    );
    // Every client gone: the descriptors are back to a handful (listener, epoll,
    // std streams, an idle pooled connection or two).
    assert!(
        idle_fds <= fds[0] + 4,
        "descriptors left open: {idle_fds} (first sample {})",
        fds[0]
    );
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
