//! Failures and how they are told: a broken upstream becomes a 502 that explains itself
//! (with the route and the request id), a real upstream error page passes through
//! untouched, a body cut short upstream is an aborted transfer (never a short body that
//! looks complete), and request bodies over the limit get 413.

mod support;

use std::time::Duration;

use http::Response;
use tokio::io::AsyncWriteExt;

use support::*;

const CONFIG: &str = r#"
[upstreams.gn]
address = "{upstream}"
[defaults]
timeouts = { connect = "2s", response_header = "5s", idle = "5s" }
[[routes]]
name = "gn-api"
match = { path_prefix = "/geonature/api/" }
max_request_body = "1KiB"
"#;

/// One GET through the proxy to `upstream`, bounded in time.
async fn get_via(upstream: std::net::SocketAddr, path: &str, headers: &str) -> RawResponse {
    let proxy = TestProxy::start(CONFIG, upstream).await;
    within(
        Duration::from_secs(5),
        "the request",
        get(proxy.addr, path, headers),
    )
    .await
}

/// Asserts a generated JSON error: status, code, route, and a request id equal to the
/// `X-Request-ID` header. Returns the body.
fn assert_json_error(response: &RawResponse, status: u16, code: &str) -> String {
    let body = response.text();
    assert_eq!(response.status, status, "{body}");
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(json_str(&body, "error").as_deref(), Some(code), "{body}");
    assert_eq!(
        json_str(&body, "route").as_deref(),
        Some("gn-api"),
        "{body}"
    );
    let id = json_str(&body, "request_id").expect("the body names the request id");
    assert!(!id.is_empty());
    assert_eq!(response.header("x-request-id"), Some(id.as_str()));
    body
}

#[tokio::test]
async fn an_upstream_that_closes_without_answering_gets_a_502_that_points_at_gunicorns_timeout() {
    // Reads the request, then closes: a Gunicorn worker killed by its --timeout.
    let upstream = raw_upstream(vec![]).await;
    let response = get_via(upstream.addr, "/geonature/api/exports/run", "").await;
    let body = assert_json_error(&response, 502, "upstream_closed");
    let message = json_str(&body, "message").unwrap();
    assert!(
        message.contains("Gunicorn") && message.contains("--timeout"),
        "{message}"
    );
    assert_eq!(
        upstream
            .seen
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn an_upstream_that_resets_the_connection_gets_a_502() {
    let upstream = raw_upstream(vec![Step::Reset]).await;
    let response = get_via(upstream.addr, "/geonature/api/exports/run", "").await;
    let body = assert_json_error(&response, 502, "upstream_io_error");
    let message = json_str(&body, "message").unwrap();
    assert!(message.to_lowercase().contains("reset"), "{message}");
}

#[tokio::test]
async fn an_upstream_that_answers_garbage_or_an_invalid_status_line_gets_a_502() {
    let scripts: [&'static [u8]; 3] = [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent Length: 2\r\n\r\nok",
    ];
    for script in scripts {
        // Stall after the bytes: the failure must come from them, not from a close.
        let upstream = raw_upstream(vec![Step::Write(script), Step::Stall]).await;
        let response = get_via(upstream.addr, "/geonature/api/x", "").await;
        let body = assert_json_error(&response, 502, "upstream_invalid_response");
        assert!(
            json_str(&body, "message")
                .unwrap()
                .contains("invalid response"),
            "{body}"
        );
    }
}

#[tokio::test]
async fn gunicorns_own_500_page_becomes_an_explained_502_and_the_next_request_uses_a_new_connection(
) {
    let upstream = raw_upstream(vec![Step::Write(GUNICORN_OWN_500)]).await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    // Both requests on one client connection: the upstream's close is not the client's.
    let request = b"GET /geonature/api/synthese HTTP/1.1\r\nHost: proxy.test\r\n\r\n";
    let mut stream = open(proxy.addr, request).await;
    for attempt in 1..=2 {
        if attempt == 2 {
            stream.write_all(request).await.unwrap();
        }
        let response = within(
            Duration::from_secs(5),
            "the explained 502",
            read_response(&mut stream),
        )
        .await;
        let body = assert_json_error(&response, 502, "upstream_worker_failed");
        assert!(body.contains("GUNICORN_TIMEOUT"), "{body}");
        assert!(!body.contains("<html>"), "Gunicorn's page leaked: {body}");
        assert_ne!(
            response.header("connection"),
            Some("close"),
            "the upstream's close is not the client's"
        );
        assert_eq!(
            upstream
                .seen
                .connections
                .load(std::sync::atomic::Ordering::SeqCst),
            attempt,
            "each request needs a new upstream connection"
        );
    }
}

/// GETs through the proxy from an upstream that sends `script` and closes.
async fn cut_short_download(script: &'static [u8]) -> RawResponse {
    let upstream = raw_upstream(vec![Step::Write(script)]).await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    let mut stream = open(
        proxy.addr,
        b"GET /geonature/api/exports/data.csv HTTP/1.1\r\nHost: proxy.test\r\n\r\n",
    )
    .await;
    // Well within the 5 s idle timer: the close itself ends the transfer.
    let response = within(
        Duration::from_secs(3),
        "the cut-short download",
        read_response(&mut stream),
    )
    .await;
    assert_closed(&mut stream).await;
    response
}

#[tokio::test]
async fn an_upstream_dying_mid_body_with_content_length_leaves_the_client_a_visibly_short_transfer()
{
    let response = cut_short_download(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nContent-Length: 100\r\n\r\nid;name\n1;a\n",
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-length"), Some("100"));
    assert_eq!(response.body, b"id;name\n1;a\n");
    assert!(!response.complete, "a short body must not look complete");
}

#[tokio::test]
async fn an_upstream_dying_mid_body_when_chunked_leaves_the_client_without_the_final_chunk() {
    let response = cut_short_download(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/csv\r\nTransfer-Encoding: chunked\r\n\r\nc\r\nid;name\n1;a\n\r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(response.body, b"id;name\n1;a\n");
    assert!(
        !response.complete,
        "the proxy must not invent the final chunk"
    );
}

fn echo_upstream() -> MockUpstream {
    MockUpstream::new().route("/", |req, seen| async move {
        let (bytes, _) = drain_counted(req.into_body(), Duration::ZERO, &seen).await;
        Response::new(full(format!("{bytes}")))
    })
}

#[tokio::test]
async fn a_declared_body_over_the_limit_gets_413_before_anything_reaches_the_upstream() {
    let upstream = echo_upstream().start().await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    // Only the head: the proxy must answer without reading (or waiting for) the body.
    let mut stream = open(
        proxy.addr,
        b"POST /geonature/api/imports HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 2048\r\n\r\n",
    )
    .await;
    let response = within(
        Duration::from_secs(5),
        "the 413",
        read_response(&mut stream),
    )
    .await;
    let body = assert_json_error(&response, 413, "request_body_too_large");
    assert!(body.contains("1 KiB") || body.contains("1KiB"), "{body}");
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(upstream.seen.count(), 0, "the upstream saw the request");
    assert_eq!(
        upstream
            .seen
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    // Under the limit, the same route works.
    let small = within(
        Duration::from_secs(5),
        "a small upload",
        post(proxy.addr, "/geonature/api/imports", "", &[b'x'; 1024]),
    )
    .await;
    assert_eq!(small.status, 200, "{}", small.text());
    assert_eq!(small.text(), "1024");
}

#[tokio::test]
async fn a_chunked_body_growing_past_the_limit_gets_413_mid_stream() {
    let upstream = echo_upstream().start().await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    let mut stream = open(
        proxy.addr,
        b"POST /geonature/api/imports HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await;
    // 1.5 KiB in three chunks, and no final chunk: the answer cannot wait for the end.
    let piece = [b'x'; 512];
    for _ in 0..3 {
        stream.write_all(b"200\r\n").await.unwrap();
        stream.write_all(&piece).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = within(
        Duration::from_secs(5),
        "the mid-stream 413",
        read_response(&mut stream),
    )
    .await;
    assert_json_error(&response, 413, "request_body_too_large");
    assert_eq!(response.header("connection"), Some("close"));
    assert!(
        upstream
            .seen
            .consumed
            .load(std::sync::atomic::Ordering::SeqCst)
            <= 1024,
        "more than the limit reached the upstream"
    );
}

#[tokio::test]
async fn errors_are_json_for_api_paths_and_json_clients_and_html_for_browsers() {
    let upstream = raw_upstream(vec![]).await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    let fetch = |path: &'static str, headers: &'static str| async move {
        within(
            Duration::from_secs(5),
            "the request",
            get(proxy.addr, path, headers),
        )
        .await
    };

    // An API path without Accept, and any path with Accept: application/json.
    for response in [
        fetch("/geonature/api/synthese", "").await,
        fetch(
            "/geonature/api/synthese",
            "Accept: application/json, text/plain, */*\r\n",
        )
        .await,
    ] {
        assert_json_error(&response, 502, "upstream_closed");
    }
    let other = fetch("/geonature/", "Accept: application/json\r\n").await;
    let body = other.text();
    assert_eq!(other.header("content-type"), Some("application/json"));
    assert_eq!(json_str(&body, "route").as_deref(), Some("(defaults)"));
    assert_eq!(
        json_str(&body, "request_id").as_deref(),
        other.header("x-request-id")
    );

    // A browser, even on an API path.
    for (path, route) in [
        ("/geonature/api/synthese", "gn-api"),
        ("/geonature/", "(defaults)"),
    ] {
        let page = fetch(
            path,
            "Accept: text/html,application/xhtml+xml,*/*;q=0.8\r\n",
        )
        .await;
        let html = page.text();
        assert_eq!(page.status, 502, "{html}");
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
        assert!(html.contains("<title>502 Bad Gateway</title>"), "{html}");
        assert!(html.contains(&format!("route: {route}")), "{html}");
        let id = page.header("x-request-id").expect("a request id header");
        assert!(html.contains(&format!("request id: {id}")), "{html}");
    }
}

#[tokio::test]
async fn a_client_supplied_request_id_is_echoed_in_the_error_response() {
    let upstream = raw_upstream(vec![]).await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    let id = "geonature-frontend-7f3a9c";
    let headers = format!("X-Request-ID: {id}\r\n");
    let json = within(
        Duration::from_secs(5),
        "the JSON error",
        get(proxy.addr, "/geonature/api/x", &headers),
    )
    .await;
    assert_json_error(&json, 502, "upstream_closed");
    assert_eq!(json.header("x-request-id"), Some(id));
    assert_eq!(json_str(&json.text(), "request_id").as_deref(), Some(id));

    let html = within(
        Duration::from_secs(5),
        "the HTML error",
        get(
            proxy.addr,
            "/geonature/",
            &format!("{headers}Accept: text/html\r\n"),
        ),
    )
    .await;
    assert_eq!(html.header("x-request-id"), Some(id));
    assert!(html.text().contains(&format!("request id: {id}")));
}
