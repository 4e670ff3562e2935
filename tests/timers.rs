//! The per-route timers (connect, response_header, idle, total) and the client write
//! stall guard: each fires on the exchange it is meant for, after its own limit, with a
//! response or an aborted transfer that says so; and none fires on a slow but healthy
//! exchange.
//!
//! Elapsed times are measured from just before the request leaves the test client, so
//! they can only be longer than what the proxy measured: the lower bounds allow 20 ms of
//! rounding, the upper bounds a loaded 2-core machine.

mod support;

use std::time::Duration;

use http::{header, HeaderValue, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use support::*;

const EARLY: Duration = Duration::from_millis(20);
const LATE: Duration = Duration::from_millis(2500);

/// Asserts `elapsed` is "about `limit`": not before it, and not much after.
fn assert_about(elapsed: Duration, limit: Duration, what: &str) {
    assert!(
        elapsed + EARLY >= limit,
        "{what} after {elapsed:?}, before its {limit:?} limit"
    );
    assert!(
        elapsed <= limit + LATE,
        "{what} only after {elapsed:?}, for a {limit:?} limit"
    );
}

const MS300: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_short_route_gets_504_after_its_own_response_header_limit_while_a_long_route_with_the_same_delay_succeeds(
) {
    const CONFIG: &str = r#"
[upstreams.gn]
address = "{upstream}"
[defaults]
timeouts = { connect = "2s", response_header = "5s", idle = "5s" }
[[routes]]
name = "short"
match = { path_prefix = "/short/" }
timeouts = { response_header = "300ms" }
[[routes]]
name = "long"
match = { path_prefix = "/long/" }
timeouts = { response_header = "5s" }
"#;
    let delay = Duration::from_millis(800);
    let upstream = MockUpstream::new()
        .delayed("/", delay, "slow answer")
        .start()
        .await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    let json = "Accept: application/json\r\n";
    let ((short, short_after), (long, long_after)) = within(
        Duration::from_secs(10),
        "the short and long requests",
        async {
            tokio::join!(
                timed(get(proxy.addr, "/short/report", json)),
                timed(get(proxy.addr, "/long/report", json)),
            )
        },
    )
    .await;

    assert_eq!(short.status, 504, "{}", short.text());
    assert_about(short_after, MS300, "the short route's 504");
    let body = short.text();
    assert_eq!(short.header("content-type"), Some("application/json"));
    assert!(body.contains("\"timer\":\"response_header\""), "{body}");
    assert!(body.contains("\"route\":\"short\""), "{body}");
    assert!(body.contains("\"error\":\"upstream_timeout\""), "{body}");

    assert_eq!(long.status, 200, "{}", long.text());
    assert_eq!(long.text(), "slow answer");
    assert!(long.complete);
    assert!(
        long_after + EARLY >= delay,
        "the long route answered after {long_after:?}, sooner than the upstream's delay"
    );
}

#[tokio::test]
async fn response_header_timer_starts_only_once_the_request_body_is_fully_sent() {
    const CONFIG: &str = r#"
[upstreams.gn]
address = "{upstream}"
[defaults]
timeouts = { connect = "2s", response_header = "5s", idle = "5s" }
[[routes]]
name = "upload"
match = { path_prefix = "/upload" }
timeouts = { response_header = "300ms", idle = "1s" }
"#;
    // The upstream answers as soon as it has the whole body, as Gunicorn does.
    let upstream = MockUpstream::new()
        .route("/", |req, seen| async move {
            let (bytes, intact) = drain_counted(req.into_body(), Duration::ZERO, &seen).await;
            Response::new(full(format!("{bytes} {intact}")))
        })
        .start()
        .await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;

    const PIECES: usize = 6;
    const PIECE: usize = 1000;
    let gap = Duration::from_millis(200);
    let body: Vec<u8> = (0..(PIECES * PIECE) as u64).map(pattern).collect();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let start = Instant::now();
    let mut stream = open(proxy.addr, head.as_bytes()).await;
    // Each gap (200 ms) is well under idle (1 s); all of them together (1.2 s) are four
    // times the response-header limit.
    for piece in body.chunks(PIECE) {
        tokio::time::sleep(gap).await;
        stream.write_all(piece).await.unwrap();
    }
    let response = within(
        Duration::from_secs(5),
        "the trickled upload's answer",
        read_response(&mut stream),
    )
    .await;
    let elapsed = start.elapsed();

    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.text(), format!("{} true", body.len()));
    assert!(
        elapsed >= MS300 * 3,
        "the upload took only {elapsed:?}: it did not outlast the response-header limit"
    );
}

/// Sends a GET to a stalling upstream and returns the response with how long it took.
async fn download_from_stalling_upstream(script: &'static [u8]) -> (RawResponse, Duration) {
    const CONFIG: &str = r#"
[upstreams.gn]
address = "{upstream}"
[defaults]
timeouts = { connect = "2s", response_header = "5s", idle = "300ms" }
"#;
    let upstream = raw_upstream(vec![Step::Write(script), Step::Stall]).await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    let start = Instant::now();
    let mut stream = open(
        proxy.addr,
        b"GET /export.csv HTTP/1.1\r\nHost: proxy.test\r\n\r\n",
    )
    .await;
    let response = within(
        Duration::from_secs(5),
        "the stalled download",
        read_response(&mut stream),
    )
    .await;
    let elapsed = start.elapsed();
    assert_closed(&mut stream).await;
    (response, elapsed)
}

#[tokio::test]
async fn idle_timer_aborts_a_content_length_download_whose_upstream_stalls() {
    let (response, elapsed) = download_from_stalling_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-length"), Some("100"));
    assert_eq!(response.body, b"0123456789");
    assert!(
        !response.complete,
        "a stalled transfer must not look complete"
    );
    assert_about(elapsed, MS300, "the aborted Content-Length transfer");
}

#[tokio::test]
async fn idle_timer_aborts_a_chunked_download_whose_upstream_stalls() {
    let (response, elapsed) = download_from_stalling_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(response.body, b"0123456789");
    assert!(
        !response.complete,
        "a stalled transfer must not end with the final chunk"
    );
    assert_about(elapsed, MS300, "the aborted chunked transfer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timer_and_write_stall_guard_leave_a_slow_but_steady_reader_alone() {
    const CONFIG: &str = r#"
[upstreams.gn]
address = "{upstream}"
[defaults]
timeouts = { connect = "2s", response_header = "5s", idle = "500ms" }
"#;
    // Far more than the socket buffers on the way hold (about 12 MiB on loopback).
    const TOTAL: u64 = 64 << 20;
    let upstream = MockUpstream::new()
        .route("/", |_, seen| async move {
            let mut response = Response::new(counted_stream(TOTAL, 64 * 1024, seen));
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(TOTAL));
            response
        })
        .start()
        .await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;

    let mut stream = open(
        proxy.addr,
        b"GET /big HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    // Slow phase: 10 pauses of 150 ms (each well under the 500 ms idle limit, together
    // three times it), taking at most 64 KiB after each: about 400 KB/s, where the proxy
    // could send hundreds of MB/s. (Much smaller reads make loopback TCP itself stall
    // for longer than the limit: with a 64 KiB MSS, the receiver does not reopen a
    // window for a few KiB and the sender waits for its zero-window probes.)
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let slow = Instant::now();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let n = within(Duration::from_secs(2), "a slow read", stream.read(&mut buf))
            .await
            .unwrap();
        assert!(
            n > 0,
            "the proxy closed on a slow reader after {:?}",
            slow.elapsed()
        );
        raw.extend_from_slice(&buf[..n]);
    }
    let slow_phase = slow.elapsed();
    let produced = upstream
        .seen
        .produced
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        produced < TOTAL,
        "the upstream produced everything during the slow phase: the proxy was never blocked on the client, so this proves nothing"
    );
    assert!(slow_phase >= Duration::from_millis(1500));
    // Then read the rest at full speed.
    within(
        Duration::from_secs(20),
        "the rest of the body",
        stream.read_to_end(&mut raw),
    )
    .await
    .unwrap();

    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut head = httparse::Response::new(&mut headers);
    let head_len = match head.parse(&raw).unwrap() {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => panic!("no complete head"),
    };
    assert_eq!(head.code, Some(200));
    let body = &raw[head_len..];
    assert_eq!(
        body.len() as u64,
        TOTAL,
        "the transfer was cut short: the proxy gave up on a client that kept reading"
    );
    // The pattern repeats every 251 bytes.
    let period: Vec<u8> = (0..251).map(pattern).collect();
    assert!(
        body.chunks(251).all(|c| c == &period[..c.len()]),
        "the body was corrupted"
    );
}

#[tokio::test]
async fn idle_timer_answers_408_to_a_client_that_stops_sending_its_body() {
    const CONFIG: &str = r#"
[upstreams.gn]
address = "{upstream}"
[defaults]
timeouts = { connect = "2s", response_header = "5s", idle = "300ms" }
"#;
    let upstream = MockUpstream::new()
        .route("/", |req, seen| async move {
            let (bytes, _) = drain_counted(req.into_body(), Duration::ZERO, &seen).await;
            Response::new(full(format!("{bytes}")))
        })
        .start()
        .await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    let mut request = b"POST /geonature/api/imports/upload HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 1000\r\n\r\n".to_vec();
    request.extend((0..100).map(pattern));
    let start = Instant::now();
    // The client sends a tenth of its body and then nothing, keeping the connection open.
    let mut stream = open(proxy.addr, &request).await;
    let response = within(
        Duration::from_secs(5),
        "the stalled upload's answer",
        read_response(&mut stream),
    )
    .await;
    let elapsed = start.elapsed();

    assert_eq!(response.status, 408, "{}", response.text());
    assert_about(elapsed, MS300, "the 408");
    let body = response.text();
    assert!(body.contains("\"error\":\"client_body_timeout\""), "{body}");
    assert!(body.contains("\"timer\":\"idle\""), "{body}");
    assert_eq!(response.header("connection"), Some("close"));
    assert_closed(&mut stream).await;
}

const TOTAL_CONFIG: &str = r#"
[upstreams.gn]
address = "{upstream}"
[defaults]
timeouts = { connect = "2s", response_header = "5s", idle = "5s" }
[[routes]]
name = "bounded"
match = { path_prefix = "/geonature/api/" }
timeouts = { total = "500ms" }
"#;

#[tokio::test]
async fn total_timer_answers_504_when_it_fires_before_the_response_head() {
    let upstream = MockUpstream::new()
        .delayed("/", Duration::from_secs(2), "too late")
        .start()
        .await;
    let proxy = TestProxy::start(TOTAL_CONFIG, upstream.addr).await;
    let (response, elapsed) = within(
        Duration::from_secs(5),
        "the bounded request",
        timed(get(proxy.addr, "/geonature/api/slow", "")),
    )
    .await;
    assert_eq!(response.status, 504, "{}", response.text());
    assert_about(elapsed, Duration::from_millis(500), "the total timer's 504");
    let body = response.text();
    assert!(body.contains("\"timer\":\"total\""), "{body}");
    assert!(body.contains("\"route\":\"bounded\""), "{body}");
}

#[tokio::test]
async fn total_timer_aborts_a_transfer_already_streaming_when_it_fires_after_the_head() {
    // A piece every 100 ms: the upstream is never idle, it just never ends.
    let upstream = MockUpstream::new()
        .route("/", |_, _| async move {
            Response::new(trickle_stream(b"0123456789", Duration::from_millis(100)))
        })
        .start()
        .await;
    let proxy = TestProxy::start(TOTAL_CONFIG, upstream.addr).await;
    let (response, elapsed) = within(
        Duration::from_secs(5),
        "the endless download",
        timed(get(proxy.addr, "/geonature/api/stream", "")),
    )
    .await;
    assert_eq!(response.status, 200);
    assert!(
        !response.complete,
        "an aborted transfer must not look complete"
    );
    assert!(
        response.body.len() >= 20,
        "the body streamed before the abort: {:?}",
        response.text()
    );
    assert_about(
        elapsed,
        Duration::from_millis(500),
        "the total timer's abort",
    );
}

fn connect_config(connect: &str) -> String {
    config_with_defaults(&format!(
        "{{ connect = \"{connect}\", response_header = \"5s\", idle = \"5s\" }}"
    ))
}

#[tokio::test]
async fn a_refused_connection_is_a_fast_502_not_a_connect_timeout() {
    let proxy = TestProxy::start(&connect_config("3s"), refused_addr().await).await;
    let (response, elapsed) = within(
        Duration::from_secs(5),
        "the refused request",
        timed(get(proxy.addr, "/geonature/api/x", "")),
    )
    .await;
    assert_eq!(response.status, 502, "{}", response.text());
    let body = response.text();
    assert!(
        body.contains("\"error\":\"upstream_connect_failed\""),
        "{body}"
    );
    assert!(!body.contains("\"timer\""), "{body}");
    assert!(
        elapsed < Duration::from_millis(1500),
        "a refusal took {elapsed:?}: it waited for the 3 s connect timer"
    );
}

#[tokio::test]
async fn an_upstream_that_never_accepts_gets_504_after_the_connect_limit() {
    let (addr, _listener, _queued) = unanswering_addr().await;
    let proxy = TestProxy::start(&connect_config("300ms"), addr).await;
    let (response, elapsed) = within(
        Duration::from_secs(5),
        "the unanswered connect",
        timed(get(proxy.addr, "/geonature/api/x", "")),
    )
    .await;
    assert_eq!(response.status, 504, "{}", response.text());
    assert_about(elapsed, MS300, "the connect timer's 504");
    let body = response.text();
    assert!(
        body.contains("\"error\":\"upstream_connect_timeout\""),
        "{body}"
    );
    assert!(body.contains("\"timer\":\"connect\""), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_idle_and_so_is_the_upstream() {
    const CONFIG: &str = r#"
[upstreams.gn]
address = "{upstream}"
[defaults]
timeouts = { connect = "2s", response_header = "5s", idle = "5s" }
[[routes]]
name = "export"
match = { path_prefix = "/export" }
timeouts = { idle = "400ms" }
"#;
    const TOTAL: u64 = 1 << 30;
    let (ended_tx, mut ended) = mpsc::unbounded_channel();
    let upstream = MockUpstream::new()
        .route("/", move |_, seen| {
            let ended_tx = ended_tx.clone();
            async move { Response::new(watched_stream(TOTAL, 16 * 1024, seen, ended_tx)) }
        })
        .start()
        .await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    let mut stream = connect_with_small_receive_buffer(proxy.addr, 16 * 1024).await;
    stream
        .write_all(b"GET /export/all.csv HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        .await
        .unwrap();
    within(Duration::from_secs(5), "the head", wait_for_head(&stream)).await;
    // From here on the client reads nothing.
    let stopped_reading = Instant::now();
    let end: StreamEnd = within(
        Duration::from_secs(5),
        "the upstream noticing the cut",
        ended.recv(),
    )
    .await
    .expect("the upstream reports how its stream ended");
    assert!(end.cut, "the upstream's body was not dropped: {end:?}");
    assert!(end.produced < TOTAL);
    assert_about(
        end.at - stopped_reading,
        Duration::from_millis(400),
        "the upstream connection's close",
    );
    // The client now finds what was in flight, then the end: a transfer cut short.
    let response = within(
        Duration::from_secs(5),
        "draining the cut connection",
        read_response(&mut stream),
    )
    .await;
    assert_eq!(response.status, 200);
    assert!(
        !response.complete,
        "the cut transfer must not look complete"
    );
    assert!((response.body.len() as u64) < TOTAL);
}
