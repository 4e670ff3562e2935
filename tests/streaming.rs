//! Streaming: 1 GiB each way through the proxy with bounded memory, upstream connection
//! reuse, stale pooled connections, and bodiless responses.
//!
//! Memory is measured from the outside: the mock upstream counts what it produced
//! (or consumed) and the client counts what it received (or sent). While one end is
//! slow, the difference is everything in flight: kernel socket buffers on both hops,
//! hyper's buffers on both sides of the proxy, and whatever the proxy itself holds. A
//! proxy that buffered bodies would show hundreds of MiB there within a second.
//!
//! Run with `--nocapture` to see the measured numbers.

mod support;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{header, Response, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// The bound on bytes in flight while one end is slow.
///
/// Measured on this project's CI machine kind (Linux 6.x loopback, tcp_wmem max 4 MiB,
/// tcp_rmem max 32 MiB, 2 cores, run with `--nocapture` to see the numbers): 5 to
/// 16 MiB for the download and 3 to 10 MiB for the uploads. Nearly all of it is kernel
/// socket buffers, which the proxy cannot shrink: on each of the two hops the sender's
/// send buffer autotunes up to tcp_wmem max (4 MiB) and the receiver's buffer grows
/// to a few MiB while the proxy first fills the next hop at full speed (`ss -tm` showed
/// the proxy's receive buffer at 3.4 MiB for the download and 9.6 MiB for an upload).
/// What the proxy holds itself is small: hyper's read buffer and write queue on each
/// side (under 1 MiB). 32 MiB is twice the worst run seen, and a proxy that reads
/// ahead breaks it by far: with hyper's write buffers merely raised to 512 MiB the same
/// tests measured 540 MiB in flight, and collecting a body would reach 1 GiB.
const IN_FLIGHT_BOUND: u64 = 32 * MIB;

/// How long the slow side stays slow.
const SLOW_PHASE: Duration = Duration::from_secs(2);

fn config() -> String {
    r#"
[upstreams.gn]
address = "{upstream}"
[defaults]
timeouts = { response_header = "30s", idle = "30s" }
max_request_body = "2GiB"
"#
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_response_streams_through_with_bounded_memory() {
    let upstream = MockUpstream::new()
        .route("/big", |_, seen| async move {
            let mut response = Response::new(counted_stream(GIB, 64 * 1024, seen));
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, GIB.into());
            response
        })
        .start()
        .await;
    let seen = upstream.seen.clone();
    let proxy = TestProxy::start(&config(), upstream.addr).await;

    let started = Instant::now();
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /big HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, first) = within(
        Duration::from_secs(10),
        "the response head",
        read_response_head(&mut stream),
    )
    .await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(GIB.to_string().as_str())
    );
    let mut check = PatternCheck::new();
    check.feed(&first);
    let mut buf = vec![0u8; 256 * 1024];
    while check.offset == 0 {
        let n = within(
            Duration::from_secs(10),
            "the first body byte",
            stream.read(&mut buf[..16 * 1024]),
        )
        .await
        .unwrap();
        assert!(n > 0, "the response ended before its body");
        check.feed(&buf[..n]);
    }
    let first_byte_produced = seen.produced.load(Ordering::SeqCst);
    let first_byte_after = started.elapsed();

    // Slow phase: 16 KiB every 10 ms (≤ 1.6 MB/s) for two seconds.
    let mut max_in_flight = 0u64;
    let slow_until = Instant::now() + SLOW_PHASE;
    within(Duration::from_secs(10), "the slow phase", async {
        while Instant::now() < slow_until {
            let n = stream.read(&mut buf[..16 * 1024]).await.unwrap();
            assert!(n > 0, "the response ended early");
            check.feed(&buf[..n]);
            let in_flight = seen.produced.load(Ordering::SeqCst) - check.offset;
            max_in_flight = max_in_flight.max(in_flight);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let received_slowly = check.offset;

    // Fast phase: the rest at full speed.
    let fast_started = Instant::now();
    within(Duration::from_secs(120), "the rest of the 1 GiB", async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            check.feed(&buf[..n]);
        }
    })
    .await;
    let fast = fast_started.elapsed();
    eprintln!(
        "download: first body byte after {first_byte_after:.2?}, when {:.2} MiB were produced; max in flight during the slow phase {:.2} MiB ({:.2} MiB received slowly); rest at full speed in {:.2?} ({:.0} MiB/s); total {:.2?}",
        first_byte_produced as f64 / MIB as f64,
        max_in_flight as f64 / MIB as f64,
        received_slowly as f64 / MIB as f64,
        fast,
        (GIB - received_slowly) as f64 / MIB as f64 / fast.as_secs_f64(),
        started.elapsed(),
    );

    assert!(
        first_byte_produced < 64 * MIB,
        "the first bytes reached the client only after {first_byte_produced} bytes were produced: the response was buffered"
    );
    assert!(
        max_in_flight < IN_FLIGHT_BOUND,
        "{max_in_flight} bytes were in flight while the client read slowly (bound {IN_FLIGHT_BOUND})"
    );
    assert_eq!(check.offset, GIB, "the client received exactly 1 GiB");
    assert!(check.intact, "every byte matches the pattern");
    // The producer counts a chunk just after handing it over: allow it that moment.
    eventually(Duration::from_secs(5), "the producer's count", || {
        seen.produced.load(Ordering::SeqCst) == GIB
    })
    .await;
}

/// Uploads `GIB` bytes of the pattern to `/upload`, content-length or chunked, and
/// checks the bytes in flight while the upstream is slow.
async fn upload_1_gib(chunked: bool) {
    let result: Arc<Mutex<Option<(u64, bool)>>> = Arc::default();
    let sink = result.clone();
    let upstream = MockUpstream::new()
        .route("/upload", move |req, seen| {
            let sink = sink.clone();
            async move {
                let outcome =
                    drain_slow_then_fast(req.into_body(), SLOW_PHASE, 2_000_000, &seen).await;
                *sink.lock().unwrap() = Some(outcome);
                text(StatusCode::OK, "stored")
            }
        })
        .start()
        .await;
    let seen = upstream.seen.clone();
    let proxy = TestProxy::start(&config(), upstream.addr).await;

    let started = Instant::now();
    // The client's own send buffer is capped so that what is measured is mostly on the
    // proxy's side (autotuning would otherwise let it grow to 4 MiB).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(256 * 1024).unwrap();
    let mut stream = socket.connect(proxy.addr).await.unwrap();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {GIB}")
    };
    stream
        .write_all(
            format!("POST /upload HTTP/1.1\r\nHost: proxy.test\r\n{framing}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    // A multiple of 251 bytes: every piece starts where the pattern starts over.
    let piece = pattern_bytes(251 * 256);
    let mut sent = 0u64;
    let mut max_in_flight_slow = 0u64;
    let mut sent_when_fast = None;
    within(Duration::from_secs(120), "uploading 1 GiB", async {
        while sent < GIB {
            let len = (piece.len() as u64).min(GIB - sent) as usize;
            if chunked {
                stream
                    .write_all(format!("{len:x}\r\n").as_bytes())
                    .await
                    .unwrap();
                stream.write_all(&piece[..len]).await.unwrap();
                stream.write_all(b"\r\n").await.unwrap();
            } else {
                stream.write_all(&piece[..len]).await.unwrap();
            }
            sent += len as u64;
            let in_flight = sent - seen.consumed.load(Ordering::SeqCst);
            if started.elapsed() < SLOW_PHASE {
                max_in_flight_slow = max_in_flight_slow.max(in_flight);
            } else if sent_when_fast.is_none() {
                sent_when_fast = Some(sent);
            }
        }
        if chunked {
            stream.write_all(b"0\r\n\r\n").await.unwrap();
        }
    })
    .await;
    let upload_time = started.elapsed();
    let response = within(
        Duration::from_secs(30),
        "the upload's response",
        read_response(&mut stream),
    )
    .await;
    let sent_slowly = sent_when_fast.unwrap_or(sent);
    eprintln!(
        "upload ({}): max in flight while the upstream was slow {:.2} MiB ({:.2} MiB sent in that time); 1 GiB uploaded in {:.2?}",
        if chunked { "chunked" } else { "content-length" },
        max_in_flight_slow as f64 / MIB as f64,
        sent_slowly as f64 / MIB as f64,
        upload_time,
    );

    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.text(), "stored");
    assert!(
        max_in_flight_slow < IN_FLIGHT_BOUND,
        "{max_in_flight_slow} bytes were in flight while the upstream read slowly (bound {IN_FLIGHT_BOUND})"
    );
    assert_eq!(
        *result.lock().unwrap(),
        Some((GIB, true)),
        "the upstream got every byte intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_request_body_streams_through_with_bounded_memory() {
    upload_1_gib(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_chunked_request_body_streams_through_with_bounded_memory() {
    upload_1_gib(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_keep_alive_requests_reuse_one_upstream_connection() {
    let upstream = MockUpstream::new()
        // Content-Length and chunked responses end differently: both must release the
        // connection to the pool.
        .text("/fixed", "fixed length")
        .route("/chunked", |_, seen| async move {
            Response::new(counted_stream(100_000, 10_000, seen))
        })
        .start()
        .await;
    let proxy = TestProxy::start(&config(), upstream.addr).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    for i in 0..50 {
        let path = if i % 2 == 0 { "/fixed" } else { "/chunked" };
        stream
            .write_all(format!("GET {path}/{i} HTTP/1.1\r\nHost: proxy.test\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let response = within(
            Duration::from_secs(10),
            "a keep-alive response",
            read_response(&mut stream),
        )
        .await;
        assert_eq!(response.status, 200, "request {i}: {}", response.text());
        assert!(response.complete, "request {i}");
        if i % 2 == 0 {
            assert_eq!(response.text(), "fixed length");
        } else {
            assert_eq!(response.body.len(), 100_000);
            assert!(response.header("transfer-encoding").is_some());
        }
    }
    assert_eq!(upstream.seen.count(), 50);
    assert_eq!(
        upstream.seen.connections.load(Ordering::SeqCst),
        1,
        "50 sequential requests should share one upstream connection"
    );
}

async fn keep_alive_get(stream: &mut TcpStream, path: &str) -> RawResponse {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: proxy.test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    within(Duration::from_secs(10), "a response", read_response(stream)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_while_idle_never_becomes_a_502() {
    // The upstream closes keep-alive connections after 50 ms idle; the proxy keeps them
    // for 1 s, so its pool holds connections the upstream has closed.
    let upstream = closing_keepalive_upstream(Duration::from_millis(50)).await;
    let proxy = TestProxy::start(
        "[upstreams.gn]\naddress = \"{upstream}\"\nkeepalive_timeout = \"1s\"\n",
        upstream.addr,
    )
    .await;
    let seen = upstream.seen.clone();
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    // Back to back: the connection is pooled and reused.
    for i in 0..3 {
        let response = keep_alive_get(&mut stream, &format!("/r{i}")).await;
        assert_eq!(response.status, 200, "{}", response.text());
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    // Then each request after the upstream closed the pooled connection.
    for i in 3..13 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let response = keep_alive_get(&mut stream, &format!("/r{i}")).await;
        assert_eq!(
            response.status,
            200,
            "request {i} after an idle close: {}",
            response.text()
        );
    }
    assert_eq!(seen.count(), 13);
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        11,
        "each request after an idle close needed a new connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_drops_idle_connections_after_keepalive_timeout() {
    let upstream = MockUpstream::new().start().await;
    let proxy = TestProxy::start(
        "[upstreams.gn]\naddress = \"{upstream}\"\nkeepalive_timeout = \"300ms\"\n",
        upstream.addr,
    )
    .await;
    let connections = || upstream.seen.connections.load(Ordering::SeqCst);
    assert_eq!(get(proxy.addr, "/a", "").await.status, 200);
    assert_eq!(get(proxy.addr, "/b", "").await.status, 200);
    assert_eq!(connections(), 1, "reused within keepalive_timeout");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(proxy.addr, "/c", "").await.status, 200);
    assert_eq!(connections(), 2, "not reused after keepalive_timeout");
    assert_eq!(get(proxy.addr, "/d", "").await.status, 200);
    assert_eq!(connections(), 2, "the new connection is pooled in turn");
}

/// Sends `request` on a keep-alive connection, reads the head, and proves no body
/// follows: nothing arrives after the head, and the next response on the same
/// connection starts right where the head ended.
async fn bodiless_exchange(stream: &mut TcpStream, request: &str) -> RawResponse {
    stream.write_all(request.as_bytes()).await.unwrap();
    let (head, after) = within(
        Duration::from_secs(10),
        "a bodiless response head",
        read_response_head(stream),
    )
    .await;
    assert!(
        after.is_empty(),
        "bytes after a bodiless head: {:?}",
        String::from_utf8_lossy(&after)
    );
    // Anything sent after the head shows up as the start of the next response.
    stream
        .write_all(b"GET /next HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        .await
        .unwrap();
    let next = within(
        Duration::from_secs(10),
        "the next response",
        read_response(stream),
    )
    .await;
    assert_eq!(next.status, 200);
    assert_eq!(next.text(), "next");
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_requests_and_204_and_304_responses_pass_through_without_a_body() {
    let upstream = MockUpstream::new()
        .text("/next", "next")
        .route("/file", |req, _| async move {
            // Like Gunicorn: a HEAD answer carries the GET's Content-Length.
            assert_eq!(req.method(), http::Method::HEAD);
            let mut response = Response::new(full(""));
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, 1234.into());
            response
        })
        .route("/empty", |_, _| async move {
            let mut response = Response::new(full(""));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        })
        .route("/cached", |_, _| async move {
            let mut response = Response::new(full(""));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
                .headers_mut()
                .insert(header::ETAG, "\"v1\"".parse().unwrap());
            response
        })
        .start()
        .await;
    let proxy = TestProxy::start(&config(), upstream.addr).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();

    let head = bodiless_exchange(
        &mut stream,
        "HEAD /file HTTP/1.1\r\nHost: proxy.test\r\n\r\n",
    )
    .await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some("1234"),
        "HEAD keeps the upstream's Content-Length"
    );
    assert_eq!(upstream.seen.requests.lock().unwrap()[0].method, "HEAD");

    let empty = bodiless_exchange(
        &mut stream,
        "DELETE /empty HTTP/1.1\r\nHost: proxy.test\r\n\r\n",
    )
    .await;
    assert_eq!(empty.status, 204);
    assert_eq!(empty.header("content-length"), None);
    assert_eq!(empty.header("transfer-encoding"), None);

    let cached = bodiless_exchange(
        &mut stream,
        "GET /cached HTTP/1.1\r\nHost: proxy.test\r\nIf-None-Match: \"v1\"\r\n\r\n",
    )
    .await;
    assert_eq!(cached.status, 304);
    assert_eq!(cached.header("etag"), Some("\"v1\""));
    assert_eq!(cached.header("transfer-encoding"), None);
}
