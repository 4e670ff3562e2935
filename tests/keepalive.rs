//! Idle keep-alive client connections: parked outside hyper after a short idle time
//! (their buffers freed), resumed when the client sends again, closed when the
//! keep-alive time is over. None of it may be visible to a client; the admin metric
//! `quadrige_client_connections_parked` shows when it happens.

mod support;

use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

async fn proxy_with(extra_server: &str) -> (RunningUpstream, TestProxy) {
    proxy_with_tls(extra_server, None).await
}

/// An HTTPS proxy too, with a certificate made for the test (trusted by its clients).
async fn tls_proxy(name: &str) -> (RunningUpstream, TestProxy, CertificateDer<'static>) {
    let dir = temp_dir(&format!("keepalive-{name}"));
    let cert = write_certificate(&dir);
    let (upstream, proxy) = proxy_with_tls("", Some(&dir)).await;
    (upstream, proxy, cert)
}

async fn proxy_with_tls(
    extra_server: &str,
    tls: Option<&std::path::Path>,
) -> (RunningUpstream, TestProxy) {
    let upstream = MockUpstream::new()
        .text("/small", "small")
        .delayed("/slow", Duration::from_millis(600), "slow")
        .start()
        .await;
    let tls = tls.map_or(String::new(), |dir| {
        format!(
            "[server.tls]\nlisten = [\"127.0.0.1:0\"]\ncertificate = \"{}\"\nkey = \"{}\"\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        )
    });
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n{extra_server}\n{tls}{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        config_with_defaults("{ response_header = \"5s\" }")
    );
    let proxy = TestProxy::start(&config, upstream.addr).await;
    (upstream, proxy)
}

fn request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
}

/// Sends `bytes` and reads one response, which must be a 200 with the connection kept.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8], body: &str) {
    stream.write_all(bytes).await.unwrap();
    let response = within(Duration::from_secs(5), "a response", read_response(stream)).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), body);
    // A session taken apart mid-exchange would have said it closes.
    assert_eq!(response.header("connection"), None);
}

/// A connection that has had one exchange.
async fn used_connection(proxy: &TestProxy) -> TcpStream {
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    exchange(&mut stream, &request("/small"), "small").await;
    stream
}

async fn parked(proxy: &TestProxy) -> usize {
    let admin = proxy.admin_addr.expect("an admin listener");
    let metrics = get(admin, "/metrics", "").await.text();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("quadrige_client_connections_parked "))
        .and_then(|v| v.parse().ok())
        .expect("the parked gauge is exported")
}

/// Waits, bounded, until `count` connections are parked.
async fn until_parked(proxy: &TestProxy, count: usize) {
    within(Duration::from_secs(5), "parking", async {
        while parked(proxy).await != count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Reads until the proxy closes the connection; returns what came and when.
async fn until_closed(stream: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut rest = Vec::new();
    let read = within(
        Duration::from_secs(5),
        "close",
        stream.read_to_end(&mut rest),
    )
    .await;
    assert!(read.is_ok(), "closed cleanly: {read:?}");
    (rest, Instant::now())
}

/// Parks `stream`, a connection that has had one exchange, three times over, with a
/// request after each; then closes it.
async fn parks_between_requests<S: AsyncRead + AsyncWrite + Unpin>(
    proxy: &TestProxy,
    mut stream: S,
) {
    for _ in 0..3 {
        until_parked(proxy, 1).await;
        exchange(&mut stream, &request("/small"), "small").await;
    }
    drop(stream);
    until_parked(proxy, 0).await;
}

#[tokio::test]
async fn a_connection_parked_between_requests_serves_each_next_one() {
    let (_upstream, proxy) = proxy_with("").await;
    let stream = used_connection(&proxy).await;
    parks_between_requests(&proxy, stream).await;
}

/// On HTTPS the hyper session is taken off the TLS stream; the TLS session stays.
#[tokio::test]
async fn a_tls_connection_parked_between_requests_serves_each_next_one() {
    let (_upstream, proxy, cert) = tls_proxy("parks").await;
    let tls = proxy.tls_addr.expect("an HTTPS listener");
    let mut stream = tls_connect(tls, &cert, b"http/1.1").await;
    exchange(&mut stream, &request("/small"), "small").await;
    parks_between_requests(&proxy, stream).await;
}

#[tokio::test]
async fn a_request_head_split_across_a_park_arrives_whole() {
    let (upstream, proxy) = proxy_with("").await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    head_split_across_a_park(&upstream, &proxy, stream).await;
}

/// What the old session left unparsed is decrypted text: it must reach the next session
/// as such, not go through TLS again.
#[tokio::test]
async fn a_request_head_split_across_a_park_arrives_whole_over_tls() {
    let (upstream, proxy, cert) = tls_proxy("split").await;
    let tls = proxy.tls_addr.expect("an HTTPS listener");
    let stream = tls_connect(tls, &cert, b"http/1.1").await;
    head_split_across_a_park(&upstream, &proxy, stream).await;
}

async fn head_split_across_a_park<S: AsyncRead + AsyncWrite + Unpin>(
    upstream: &RunningUpstream,
    proxy: &TestProxy,
    mut stream: S,
) {
    // The first request and the start of the second in one write: the second's
    // beginning sits unparsed in the session when it is parked.
    let mut first = request("/small");
    first.extend_from_slice(b"GET /small?second HTTP/1.1\r\nHos");
    exchange(&mut stream, &first, "small").await;
    // Not counted as parked (its session restarts at once with the bytes), so there is
    // nothing to wait for: 12 park delays. Removing the carry-over fails this test.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        parked(proxy).await,
        0,
        "a pending head is served, not parked"
    );
    exchange(&mut stream, b"t: test\r\nX-Late: yes\r\n\r\n", "small").await;
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
    // 600 ms without a byte either way: 24 park delays.
    exchange(&mut stream, &request("/slow"), "slow").await;
    exchange(&mut stream, &request("/small"), "small").await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_keepalive_time_not_before() {
    let (_upstream, proxy) = proxy_with("header_read_timeout = \"1s\"").await;
    let mut stream = used_connection(&proxy).await;
    let idle_from = Instant::now();
    let (rest, closed) = until_closed(&mut stream).await;
    assert!(rest.is_empty(), "nothing sent: {rest:?}");
    let idle = closed - idle_from;
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_millis(1800),
        "closed after {idle:?}, keep-alive time 1 s"
    );
}

#[tokio::test]
async fn a_head_trickled_past_the_park_delay_still_gets_one_header_timer() {
    let (_upstream, proxy) = proxy_with("header_read_timeout = \"1s\"").await;
    let mut stream = used_connection(&proxy).await;
    // Half a head, then silence: the slowloris guard must still fire, a park must not
    // give the client a new header timer.
    let started = Instant::now();
    stream
        .write_all(b"GET /small HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let (_, closed) = until_closed(&mut stream).await;
    let after = closed - started;
    assert!(
        after < Duration::from_millis(2200),
        "closed after {after:?}, header_read_timeout 1 s"
    );
}

#[tokio::test]
async fn parked_connections_close_at_shutdown_without_waiting_for_the_grace() {
    let (_upstream, mut proxy) = proxy_with("shutdown_grace = \"10s\"").await;
    let mut stream = used_connection(&proxy).await;
    until_parked(&proxy, 1).await;
    let started = Instant::now();
    proxy.shutdown();
    within(Duration::from_secs(5), "proxy stops", &mut proxy.task)
        .await
        .expect("the server task ends");
    let (rest, closed) = until_closed(&mut stream).await;
    assert!(rest.is_empty());
    assert!(
        closed - started < Duration::from_secs(2),
        "{:?}",
        closed - started
    );
}
