//! Idle keep-alive client connections: parked outside hyper after a short idle time
//! (their buffers freed), resumed when the client sends again, closed when the
//! keep-alive time is over. None of it may be visible to a client.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longer than the park delay (25 ms), so a connection idle this long is parked.
const PARKED: Duration = Duration::from_millis(300);

async fn proxy_with(extra_server: &str) -> (RunningUpstream, TestProxy) {
    let upstream = MockUpstream::new()
        .text("/small", "small")
        .delayed("/slow", Duration::from_millis(600), "slow")
        .start()
        .await;
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n{extra_server}\n{}",
        config_with_defaults("{ response_header = \"5s\" }")
    );
    let proxy = TestProxy::start(&config, upstream.addr).await;
    (upstream, proxy)
}

fn request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn a_connection_parked_between_requests_serves_each_next_one() {
    let (_upstream, proxy) = proxy_with("").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    for round in 0..4 {
        stream.write_all(&request("/small")).await.unwrap();
        let response = within(
            Duration::from_secs(5),
            "response",
            read_response(&mut stream),
        )
        .await;
        assert_eq!(response.status, 200, "round {round}");
        assert_eq!(response.text(), "small", "round {round}");
        assert_eq!(response.header("connection"), None, "round {round}");
        tokio::time::sleep(PARKED).await;
    }
}

#[tokio::test]
async fn a_request_head_split_across_a_park_arrives_whole() {
    let (upstream, proxy) = proxy_with("").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    // The first request and the start of the second in one write: the second's
    // beginning sits unparsed in the session when it is parked.
    let mut first = request("/small");
    first.extend_from_slice(b"GET /small?second HTTP/1.1\r\nHos");
    stream.write_all(&first).await.unwrap();
    let response = within(Duration::from_secs(5), "first", read_response(&mut stream)).await;
    assert_eq!(response.status, 200);
    tokio::time::sleep(PARKED).await;
    stream
        .write_all(b"t: test\r\nX-Late: yes\r\n\r\n")
        .await
        .unwrap();
    let response = within(Duration::from_secs(5), "second", read_response(&mut stream)).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "small");
    let seen = upstream.seen.last();
    assert_eq!(seen.target, "/small?second");
    assert_eq!(
        seen.headers.get("x-late").and_then(|v| v.to_str().ok()),
        Some("yes")
    );
}

#[tokio::test]
async fn a_slow_exchange_is_never_parked_under_way() {
    let (_upstream, proxy) = proxy_with("").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&request("/slow")).await.unwrap();
    let response = within(Duration::from_secs(5), "slow", read_response(&mut stream)).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "slow");
    // Parking mid-exchange would have closed the connection after the response.
    assert_eq!(response.header("connection"), None);
    stream.write_all(&request("/small")).await.unwrap();
    let response = within(Duration::from_secs(5), "next", read_response(&mut stream)).await;
    assert_eq!(response.text(), "small");
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_keepalive_time_not_before() {
    let (_upstream, proxy) = proxy_with("header_read_timeout = \"1s\"").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&request("/small")).await.unwrap();
    let response = within(
        Duration::from_secs(5),
        "response",
        read_response(&mut stream),
    )
    .await;
    assert_eq!(response.status, 200);
    let idle_from = Instant::now();
    let mut rest = Vec::new();
    let read = within(
        Duration::from_secs(5),
        "close",
        stream.read_to_end(&mut rest),
    )
    .await;
    let idle = idle_from.elapsed();
    assert!(
        read.is_ok() && rest.is_empty(),
        "closed cleanly, nothing sent: {rest:?}"
    );
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_millis(1800),
        "closed after {idle:?}, keep-alive time 1 s"
    );
}

#[tokio::test]
async fn a_head_trickled_past_the_park_delay_still_gets_one_header_timer() {
    let (_upstream, proxy) = proxy_with("header_read_timeout = \"1s\"").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&request("/small")).await.unwrap();
    let response = within(
        Duration::from_secs(5),
        "response",
        read_response(&mut stream),
    )
    .await;
    assert_eq!(response.status, 200);
    // Half a head, then silence: the slowloris guard must still fire, a park must not
    // give the client a new header timer.
    let started = Instant::now();
    stream
        .write_all(b"GET /small HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = within(
        Duration::from_secs(5),
        "close",
        stream.read_to_end(&mut rest),
    )
    .await;
    let closed_after = started.elapsed();
    assert!(
        closed_after < Duration::from_millis(2200),
        "closed after {closed_after:?}, header_read_timeout 1 s"
    );
}

#[tokio::test]
async fn parked_connections_close_at_shutdown_without_waiting_for_the_grace() {
    let (_upstream, mut proxy) = proxy_with("shutdown_grace = \"10s\"").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&request("/small")).await.unwrap();
    let response = within(
        Duration::from_secs(5),
        "response",
        read_response(&mut stream),
    )
    .await;
    assert_eq!(response.status, 200);
    tokio::time::sleep(PARKED).await;
    let started = Instant::now();
    proxy.shutdown();
    within(Duration::from_secs(5), "proxy stops", &mut proxy.task)
        .await
        .expect("the server task ends");
    let mut rest = Vec::new();
    let _ = within(
        Duration::from_secs(2),
        "close",
        stream.read_to_end(&mut rest),
    )
    .await;
    assert!(rest.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
