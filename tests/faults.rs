//! Faults on either side, each checked for leaks: the client gets a clear 502/504 or a
//! visibly aborted transfer (never a hang, never a short body that looks complete), the
//! proxy keeps serving, and the process's open file descriptors and the runtime's live
//! tasks come back to what they were before the fault.
//!
//! Descriptors are counted for the whole process, so the tests in this file run one at
//! a time. Each starts a healthy upstream (the default route) next to the faulty one
//! (`/fault/`), warms the pool with one request, takes the baseline, plays the fault,
//! sends one more request to the healthy upstream, and waits (bounded) for the counts
//! to come back.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use support::*;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONFIG: &str = r#"
[upstreams.good]
address = "{good}"
keepalive_timeout = "30s"
[upstreams.bad]
address = "{upstream}"
[defaults]
upstream = "good"
timeouts = { connect = "1s", response_header = "5s", idle = "5s" }
[[routes]]
name = "fault"
match = { path_prefix = "/fault/" }
upstream = "bad"
timeouts = { response_header = "500ms", idle = "500ms" }
"#;

/// How long counts may take to come back after a fault.
const SETTLE: Duration = Duration::from_secs(5);

/// A proxy with a healthy upstream and a faulty one, and the resources in use before
/// the fault.
struct Bench {
    proxy: TestProxy,
    good: RunningUpstream,
    baseline: Resources,
}

impl Bench {
    async fn start(bad: SocketAddr) -> Bench {
        Bench::with_good(bad, MockUpstream::new()).await
    }

    /// `good` serves everything outside `/fault/`.
    async fn with_good(bad: SocketAddr, good: MockUpstream) -> Bench {
        let good = good.text("/ok", "fine").start().await;
        let config = CONFIG.replace("{good}", &good.addr.to_string());
        let proxy = TestProxy::start(&config, bad).await;
        let bench = Bench {
            proxy,
            good,
            baseline: Resources { fds: 0, tasks: 0 },
        };
        // One pooled connection to the healthy upstream is part of the baseline.
        bench.assert_serves().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Bench {
            baseline: Resources::now(),
            ..bench
        }
    }

    async fn assert_serves(&self) {
        let response = within(
            Duration::from_secs(5),
            "a request to the healthy upstream",
            get(self.proxy.addr, "/ok", ""),
        )
        .await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.text(), "fine");
    }

    /// The proxy still serves, and descriptors and tasks come back to the baseline.
    async fn assert_recovered(&self, what: &str) {
        self.assert_serves().await;
        self.baseline.settle_back(SETTLE, what).await;
    }
}

/// A leaked `&'static [u8]` for a scripted upstream.
fn leak(bytes: Vec<u8>) -> &'static [u8] {
    Box::leak(bytes.into_boxed_slice())
}

/// GETs `path` and bounds the whole exchange.
async fn fetch(addr: SocketAddr, path: &str) -> RawResponse {
    within(Duration::from_secs(5), "the request", get(addr, path, "")).await
}

// ---------------------------------------------------------------------------------
// Upstream faults.

#[tokio::test]
async fn an_upstream_that_refuses_connections_gives_502_and_leaks_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let bench = Bench::start(refused_addr().await).await;
    for _ in 0..5 {
        let response = fetch(bench.proxy.addr, "/fault/x").await;
        assert_eq!(response.status, 502, "{}", response.text());
    }
    bench.assert_recovered("refused").await;
}

#[tokio::test]
async fn an_upstream_that_never_answers_gives_504_and_its_connection_is_closed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let upstream = scripted_upstream(vec![Step::Stall]).await;
    let bench = Bench::start(upstream.addr).await;
    for round in 1..=3 {
        let response = fetch(bench.proxy.addr, "/fault/x").await;
        assert_eq!(response.status, 504, "{}", response.text());
        eventually(
            Duration::from_secs(2),
            "the upstream seeing its connection closed",
            || upstream.wire.closed.load(Ordering::SeqCst) == round,
        )
        .await;
    }
    bench.assert_recovered("never answers").await;
}

/// GETs `/fault/x` from an upstream playing `script`; returns what the client read and
/// asserts the proxy closed the client connection.
async fn download(bench: &Bench) -> RawResponse {
    let mut stream = open(
        bench.proxy.addr,
        b"GET /fault/x HTTP/1.1\r\nHost: proxy.test\r\n\r\n",
    )
    .await;
    let response = within(
        Duration::from_secs(5),
        "the broken download",
        read_response(&mut stream),
    )
    .await;
    assert_closed(&mut stream).await;
    response
}

#[tokio::test]
async fn an_upstream_that_stalls_after_the_head_gives_an_aborted_transfer() {
    let _one = ONE_AT_A_TIME.lock().await;
    let upstream = scripted_upstream(vec![
        Step::Write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"),
        Step::Stall,
    ])
    .await;
    let bench = Bench::start(upstream.addr).await;
    let response = download(&bench).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"0123456789");
    assert!(!response.complete);
    eventually(
        Duration::from_secs(2),
        "the stalled upstream connection closing",
        || upstream.wire.closed.load(Ordering::SeqCst) == 1,
    )
    .await;
    bench.assert_recovered("stall after the head").await;
}

#[tokio::test]
async fn an_upstream_that_closes_mid_body_gives_an_aborted_transfer() {
    let _one = ONE_AT_A_TIME.lock().await;
    for (case, script) in [
        (
            "Content-Length longer than the body",
            &b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"[..],
        ),
        (
            "chunked without the final chunk",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
        ),
        (
            "garbage chunk size",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\nzz\r\nmore\r\n0\r\n\r\n",
        ),
        (
            "chunk longer than its size",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n0123456789\r\n0\r\n\r\n",
        ),
    ] {
        let upstream = scripted_upstream(vec![Step::Write(script), Step::Stall]).await;
        let bench = Bench::start(upstream.addr).await;
        let response = download(&bench).await;
        assert_eq!(response.status, 200, "{case}");
        assert!(!response.complete, "{case}: the short body looked complete");
        assert!(
            b"0123456789".starts_with(&response.body),
            "{case}: {:?}",
            response.body
        );
        bench.assert_recovered(case).await;
    }
}

#[tokio::test]
async fn invalid_or_oversized_response_heads_and_resets_give_502() {
    let _one = ONE_AT_A_TIME.lock().await;
    let huge_header = leak(
        format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\nok",
            "b".repeat(100 * 1024)
        )
        .into_bytes(),
    );
    let many_headers = leak(
        format!(
            "HTTP/1.1 200 OK\r\n{}Content-Length: 2\r\n\r\nok",
            (0..200)
                .map(|i| format!("X-H{i}: v\r\n"))
                .collect::<String>()
        )
        .into_bytes(),
    );
    for (case, script) in [
        (
            "invalid status line",
            vec![Step::Write(b"HTTP/1.1 OK\r\n\r\n"), Step::Stall],
        ),
        (
            "status 1000",
            vec![
                Step::Write(b"HTTP/1.1 1000 OK\r\nContent-Length: 0\r\n\r\n"),
                Step::Stall,
            ],
        ),
        (
            "not HTTP",
            vec![Step::Write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), Step::Stall],
        ),
        (
            "oversized header",
            vec![Step::Write(huge_header), Step::Stall],
        ),
        (
            "200 header fields",
            vec![Step::Write(many_headers), Step::Stall],
        ),
        (
            "two Content-Lengths",
            vec![
                Step::Write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
                ),
                Step::Stall,
            ],
        ),
        ("reset before answering", vec![Step::Reset]),
        ("closed before answering", vec![]),
    ] {
        let upstream = scripted_upstream(script).await;
        let bench = Bench::start(upstream.addr).await;
        let response = fetch(bench.proxy.addr, "/fault/x").await;
        assert_eq!(response.status, 502, "{case}: {}", response.text());
        assert!(response.complete);
        bench.assert_recovered(case).await;
    }
}

#[tokio::test]
async fn a_reset_mid_body_gives_an_aborted_transfer() {
    let _one = ONE_AT_A_TIME.lock().await;
    let upstream = scripted_upstream(vec![
        Step::Write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"),
        Step::Sleep(Duration::from_millis(100)),
        Step::Reset,
    ])
    .await;
    let bench = Bench::start(upstream.addr).await;
    let response = download(&bench).await;
    assert_eq!(response.status, 200);
    assert!(!response.complete);
    bench.assert_recovered("reset mid-body").await;
}

#[tokio::test]
async fn bytes_after_a_short_content_length_are_never_served_as_the_next_response() {
    let _one = ONE_AT_A_TIME.lock().await;
    // The upstream says 5 bytes, sends 10 plus a whole forged response, and keeps the
    // connection: a proxy that pooled it would serve "POISON" to the next client.
    let upstream = scripted_upstream(vec![
        Step::Write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloWORLDHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON",
        ),
        Step::Stall,
    ])
    .await;
    let bench = Bench::start(upstream.addr).await;
    for round in 0..5 {
        let response = fetch(bench.proxy.addr, "/fault/x").await;
        assert_eq!(response.status, 200, "round {round}: {}", response.text());
        assert_eq!(response.text(), "hello", "round {round}");
        assert!(response.complete);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every request went on a connection of its own.
    let (requests, _) = upstream.wire.split();
    assert_eq!(requests.len(), 5);
    assert_eq!(upstream.wire.connection_count(), 5);
    bench.assert_recovered("short Content-Length").await;
}

#[tokio::test]
async fn an_upstream_restarting_during_a_burst_loses_nothing_silently() {
    let _one = ONE_AT_A_TIME.lock().await;
    const BODY: usize = 64 * 1024;
    let serve = || {
        MockUpstream::new().route("/fault/", |_, _| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Response::new(full(Bytes::from(pattern_bytes(BODY))))
        })
    };
    let first = serve().start_killable("127.0.0.1:0".parse().unwrap()).await;
    let addr = first.addr;
    let bench = Bench::start(addr).await;

    #[derive(Default, Debug)]
    struct Outcomes {
        intact: usize,
        errors: usize,
        aborted: usize,
        corrupt: usize,
    }
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let outcomes = outcomes.clone();
        let proxy = bench.proxy.addr;
        clients.push(tokio::spawn(async move {
            for _ in 0..15 {
                let response = within(
                    Duration::from_secs(10),
                    "a request during the restart",
                    get(proxy, "/fault/data", ""),
                )
                .await;
                let mut o = outcomes.lock().unwrap();
                match (response.status, response.complete) {
                    (200, true) if response.body == pattern_bytes(BODY) => o.intact += 1,
                    (200, true) => o.corrupt += 1,
                    (200, false) => o.aborted += 1,
                    (502..=504, true) => o.errors += 1,
                    (status, complete) => panic!("unexpected {status} complete={complete}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    first.kill();
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = serve().start_killable(addr).await;
    for client in clients {
        within(Duration::from_secs(60), "the burst", client)
            .await
            .unwrap();
    }
    let outcomes = Arc::try_unwrap(outcomes).unwrap().into_inner().unwrap();
    println!("restart during a burst: {outcomes:?}");
    assert_eq!(outcomes.corrupt, 0, "{outcomes:?}");
    assert_eq!(
        outcomes.intact + outcomes.errors + outcomes.aborted,
        16 * 15
    );
    assert!(
        outcomes.errors + outcomes.aborted > 0,
        "the restart went unnoticed: {outcomes:?}"
    );
    // Back up: every request succeeds again.
    for _ in 0..10 {
        let response = fetch(bench.proxy.addr, "/fault/data").await;
        assert_eq!(response.status, 200);
        assert_eq!(response.body, pattern_bytes(BODY));
    }
    second.kill();
    drop(second);
    bench.assert_recovered("restart during a burst").await;
}

// ---------------------------------------------------------------------------------
// Client faults.

#[tokio::test]
async fn a_client_leaving_mid_upload_cancels_the_upstream_request() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (done_tx, mut done) = mpsc::unbounded_channel::<(u64, bool)>();
    let good = MockUpstream::new().route("/upload", move |req, seen| {
        let done = done_tx.clone();
        async move {
            let (bytes, intact) = drain_counted(req.into_body(), Duration::ZERO, &seen).await;
            let _ = done.send((bytes, intact));
            Response::new(full(format!("{bytes}")))
        }
    });
    let bench = Bench::with_good(refused_addr().await, good).await;
    let total = 4 << 20;
    let mut stream = open(
        bench.proxy.addr,
        format!("POST /upload HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: {total}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    stream.write_all(&pattern_bytes(251 * 1024)).await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the upload reaching the upstream",
        || bench.good.seen.consumed.load(Ordering::SeqCst) > 0,
    )
    .await;
    drop(stream);
    let (bytes, _) = within(
        Duration::from_secs(3),
        "the upstream learning the upload was cut",
        done.recv(),
    )
    .await
    .unwrap();
    assert!(bytes < total, "the upstream read a whole body: {bytes}");
    bench.assert_recovered("client gone mid-upload").await;
}

#[tokio::test]
async fn a_client_leaving_mid_download_stops_the_upstream_and_its_connection_is_not_reused() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<StreamEnd>();
    let good = MockUpstream::new().route("/download", move |_, seen| {
        let ended = ended_tx.clone();
        async move { Response::new(watched_stream(1 << 30, 64 * 1024, seen, ended)) }
    });
    let bench = Bench::with_good(refused_addr().await, good).await;
    let connections_before = bench.good.seen.connections.load(Ordering::SeqCst);
    let mut stream = open(
        bench.proxy.addr,
        b"GET /download HTTP/1.1\r\nHost: proxy.test\r\n\r\n",
    )
    .await;
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0;
    while read < 1 << 20 {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0);
        read += n;
    }
    drop(stream);
    let end = within(
        Duration::from_secs(3),
        "the upstream's producer stopping",
        ended.recv(),
    )
    .await
    .unwrap();
    assert!(end.cut, "the download ran to its end: {end:?}");
    assert!(end.produced < 1 << 30);
    // The next request needs a new upstream connection: the cut one was not pooled.
    let response = fetch(bench.proxy.addr, "/ok").await;
    assert_eq!(response.text(), "fine");
    assert!(
        bench.good.seen.connections.load(Ordering::SeqCst) > connections_before,
        "the cut connection was reused"
    );
    bench.assert_recovered("client gone mid-download").await;
}

#[tokio::test]
async fn a_client_leaving_while_waiting_cancels_the_upstream_request() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (cancel_tx, cancelled) = oneshot::channel::<()>();
    let signal = Arc::new(Mutex::new(Some(cancel_tx)));
    let good = MockUpstream::new().route("/slow", move |_, _| {
        let guard = DropSignal(signal.lock().unwrap().take());
        async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(4)).await;
            text(http::StatusCode::OK, "slow")
        }
    });
    let bench = Bench::with_good(refused_addr().await, good).await;
    let connections_before = bench.good.seen.connections.load(Ordering::SeqCst);
    let stream = open(
        bench.proxy.addr,
        b"GET /slow HTTP/1.1\r\nHost: proxy.test\r\n\r\n",
    )
    .await;
    eventually(
        Duration::from_secs(3),
        "the request reaching the upstream",
        || bench.good.seen.count() == 2,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    // Far sooner than the upstream's 4 s and the route's 5 s response-header timer.
    within(
        Duration::from_secs(2),
        "the upstream handler being cancelled",
        cancelled,
    )
    .await
    .unwrap();
    let response = fetch(bench.proxy.addr, "/ok").await;
    assert_eq!(response.text(), "fine");
    assert!(
        bench.good.seen.connections.load(Ordering::SeqCst) > connections_before,
        "the cancelled connection was reused"
    );
    bench.assert_recovered("client gone while waiting").await;
}

#[tokio::test]
async fn many_clients_leaving_in_every_phase_leak_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let good = MockUpstream::new()
        .route("/upload", |req, seen| async move {
            let (bytes, _) = drain_counted(req.into_body(), Duration::ZERO, &seen).await;
            Response::new(full(format!("{bytes}")))
        })
        .route("/download", |_, seen| async move {
            Response::new(counted_stream(1 << 30, 64 * 1024, seen))
        })
        .delayed("/slow", Duration::from_secs(3), "slow");
    let bench = Bench::with_good(refused_addr().await, good).await;
    let addr = bench.proxy.addr;
    let mut clients = Vec::new();
    for i in 0..60 {
        clients.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            match i % 4 {
                0 => {
                    let _ = stream
                        .write_all(b"POST /upload HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 10000000\r\n\r\n")
                        .await;
                    let _ = stream.write_all(&pattern_bytes(100 * 251)).await;
                }
                1 => {
                    let _ = stream
                        .write_all(b"GET /download HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
                        .await;
                    let mut buf = vec![0u8; 256 * 1024];
                    let _ = stream.read(&mut buf).await;
                }
                2 => {
                    let _ = stream
                        .write_all(b"GET /slow HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
                        .await;
                }
                _ => {
                    // Half a head.
                    let _ = stream.write_all(b"GET /ok HTTP/1.1\r\nHo").await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(stream);
        }));
    }
    for client in clients {
        within(Duration::from_secs(10), "a leaving client", client)
            .await
            .unwrap();
    }
    bench.assert_recovered("sixty clients leaving").await;
}

const KEEP_ALIVE_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
const ONE_UPSTREAM: &str =
    "[upstreams.gn]\naddress = \"{upstream}\"\nkeepalive_timeout = \"30s\"\n";

/// An upstream that answers the first request of each connection, reads the second,
/// waits `after` and closes without answering it.
async fn closing_on_second_request(after: Duration) -> RunningUpstream {
    raw_upstream(vec![
        Step::Write(KEEP_ALIVE_OK),
        Step::ReadHead,
        Step::Sleep(after),
    ])
    .await
}

#[tokio::test]
async fn a_pooled_connection_closed_at_once_under_a_get_is_retried_on_a_new_one() {
    let upstream = closing_on_second_request(Duration::ZERO).await;
    let proxy = TestProxy::start(ONE_UPSTREAM, upstream.addr).await;
    assert_eq!(fetch(proxy.addr, "/geonature/api/a").await.status, 200);
    let second = fetch(proxy.addr, "/geonature/api/b").await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(upstream.seen.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_pooled_connection_closed_under_a_post_is_never_retried() {
    let upstream = closing_on_second_request(Duration::ZERO).await;
    let proxy = TestProxy::start(ONE_UPSTREAM, upstream.addr).await;
    assert_eq!(fetch(proxy.addr, "/geonature/api/a").await.status, 200);
    let response = within(
        Duration::from_secs(5),
        "the POST",
        post(proxy.addr, "/geonature/api/b", "", b""),
    )
    .await;
    assert_eq!(response.status, 502, "{}", response.text());
    assert_eq!(upstream.seen.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_get_the_upstream_worked_on_before_closing_is_never_sent_twice() {
    // As when Gunicorn kills a worker at its --timeout: the request ran, so running it
    // again would double the work and the wait.
    let upstream = closing_on_second_request(Duration::from_millis(1300)).await;
    let proxy = TestProxy::start(ONE_UPSTREAM, upstream.addr).await;
    assert_eq!(fetch(proxy.addr, "/geonature/api/a").await.status, 200);
    let response = fetch(proxy.addr, "/geonature/api/b").await;
    assert_eq!(response.status, 502, "{}", response.text());
    assert_eq!(upstream.seen.connections.load(Ordering::SeqCst), 1);
}

/// Flask's `MAX_CONTENT_LENGTH` answers 413 from the head alone, without reading the
/// body, and Gunicorn then closes: the client must get that answer, not a 502 for the
/// upload that could not go on.
#[tokio::test]
async fn an_answer_sent_before_the_upload_ended_reaches_the_client() {
    let upstream = raw_upstream(vec![Step::Write(
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!",
    )])
    .await;
    let proxy = TestProxy::start(ONE_UPSTREAM, upstream.addr).await;
    let total = 64 << 20;
    let mut stream = open(
        proxy.addr,
        format!("POST /geonature/api/import HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: {total}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let (mut reader, mut writer) = stream.split();
    let upload = async {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..total / chunk.len() {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await
    };
    let answer = async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"too big!") && reader.read(&mut byte).await.unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    };
    let answer = within(Duration::from_secs(5), "the early answer", async {
        tokio::select! {
            answer = answer => answer,
            _ = upload => unreachable!(),
        }
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.ends_with("too big!"), "{answer}");
}

/// An HTTP/1.0-style answer, neither length nor chunks: its body ends where the upstream
/// closes. It reaches an HTTP/1.1 client whole and properly ended (re-framed), and the
/// connection it came on is never reused.
#[tokio::test]
async fn a_body_delimited_by_the_close_arrives_whole_and_its_connection_is_not_reused() {
    let upstream = raw_upstream(vec![Step::Write(
        b"HTTP/1.0 200 OK\r\nContent-Type: text/csv\r\n\r\nid;name\n1;a\n2;b\n",
    )])
    .await;
    let proxy = TestProxy::start(ONE_UPSTREAM, upstream.addr).await;
    for (i, path) in ["/geonature/api/a.csv", "/geonature/api/b.csv"]
        .into_iter()
        .enumerate()
    {
        let response = fetch(proxy.addr, path).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.body, b"id;name\n1;a\n2;b\n");
        assert!(
            response.complete,
            "the body must end properly for the client"
        );
        assert_eq!(upstream.seen.connections.load(Ordering::SeqCst), i + 1);
    }
}
