//! Header handling in both directions: hop-by-hop removal, the forwarded headers and
//! `Host`, request ids, the request target byte for byte, `Location` rewriting, and
//! the access log lines.

mod support;

use std::time::Duration;

use http::{HeaderName, HeaderValue, Response, StatusCode};
use support::*;

const SIMPLE: &str = "[upstreams.gn]\naddress = \"{upstream}\"\n";

fn header<'a>(seen: &'a SeenRequest, name: &str) -> Option<&'a str> {
    seen.headers.get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways_and_end_to_end_headers_kept() {
    let upstream = MockUpstream::new()
        .route("/", |_, _| async move {
            let mut response = text(StatusCode::OK, "body");
            let headers = response.headers_mut();
            for (name, value) in [
                ("connection", "x-hop-response"),
                ("x-hop-response", "1"),
                ("keep-alive", "timeout=5, max=100"),
                ("te", "trailers"),
                ("trailer", "x-checksum"),
                ("upgrade", "h2c"),
                ("proxy-authenticate", "Basic realm=\"upstream\""),
                ("proxy-connection", "keep-alive"),
                ("x-end-to-end", "kept"),
                ("cache-control", "no-store"),
                ("set-cookie", "session=1; HttpOnly"),
            ] {
                headers.append(
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            response
        })
        .start()
        .await;
    let proxy = TestProxy::start(SIMPLE, upstream.addr).await;
    let response = raw_request(
        proxy.addr,
        b"GET /page HTTP/1.1\r\n\
          Host: proxy.test\r\n\
          Connection: close, X-Hop-Request\r\n\
          X-Hop-Request: secret\r\n\
          Keep-Alive: timeout=5\r\n\
          TE: trailers\r\n\
          Trailer: x-checksum\r\n\
          Upgrade: websocket\r\n\
          Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
          Proxy-Connection: keep-alive\r\n\
          Authorization: Bearer end-to-end\r\n\
          X-End-To-End: kept\r\n\
          Accept: text/html\r\n\
          Cookie: a=b\r\n\
          \r\n",
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());

    let seen = upstream.seen.last();
    for name in [
        "connection",
        "x-hop-request",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert_eq!(header(&seen, name), None, "`{name}` reached the upstream");
    }
    assert_eq!(header(&seen, "authorization"), Some("Bearer end-to-end"));
    assert_eq!(header(&seen, "x-end-to-end"), Some("kept"));
    assert_eq!(header(&seen, "accept"), Some("text/html"));
    assert_eq!(header(&seen, "cookie"), Some("a=b"));

    for name in [
        "x-hop-response",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-connection",
    ] {
        assert_eq!(response.header(name), None, "`{name}` reached the client");
    }
    // The client asked to close: the only Connection header it may see is the proxy's
    // own, never the upstream's.
    assert!(
        response
            .header("connection")
            .is_none_or(|v| v.eq_ignore_ascii_case("close")),
        "{:?}",
        response.header("connection")
    );
    assert_eq!(response.header("x-end-to-end"), Some("kept"));
    assert_eq!(response.header("cache-control"), Some("no-store"));
    assert_eq!(response.header("set-cookie"), Some("session=1; HttpOnly"));
    assert_eq!(response.text(), "body");
}

#[tokio::test]
async fn forwarded_headers_describe_the_client_and_host_becomes_the_upstream_address() {
    let upstream = MockUpstream::new().start().await;
    let proxy = TestProxy::start(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nname = \"proxy-under-test\"\n[upstreams.gn]\naddress = \"{upstream}\"\n",
        upstream.addr,
    )
    .await;
    let response = raw_request(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nHost: public.example:8443\r\nX-Forwarded-For: 203.0.113.9, 10.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    let seen = upstream.seen.last();
    assert_eq!(
        header(&seen, "x-forwarded-for"),
        Some("203.0.113.9, 10.0.0.1, 127.0.0.1"),
        "the client is appended to the existing list"
    );
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        Some("public.example:8443")
    );
    assert_eq!(header(&seen, "x-forwarded-proto"), Some("http"));
    assert_eq!(
        header(&seen, "x-forwarded-server"),
        Some("proxy-under-test")
    );
    assert_eq!(
        header(&seen, "host"),
        Some(upstream.addr.to_string().as_str())
    );

    // Without an incoming X-Forwarded-For the list starts with the client, and without
    // a configured name X-Forwarded-Server is still there (the host name).
    let upstream = MockUpstream::new().start().await;
    let proxy = TestProxy::start(SIMPLE, upstream.addr).await;
    assert_eq!(get(proxy.addr, "/y", "").await.status, 200);
    let seen = upstream.seen.last();
    assert_eq!(header(&seen, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(header(&seen, "x-forwarded-host"), Some("proxy.test"));
    assert!(header(&seen, "x-forwarded-server").is_some_and(|v| !v.is_empty()));
}

#[tokio::test]
async fn preserve_host_forwards_the_clients_host() {
    let upstream = MockUpstream::new().start().await;
    let proxy = TestProxy::start(
        "[upstreams.gn]\naddress = \"{upstream}\"\npreserve_host = true\n",
        upstream.addr,
    )
    .await;
    let response = raw_request(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nHost: public.example:8443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    let seen = upstream.seen.last();
    assert_eq!(header(&seen, "host"), Some("public.example:8443"));
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        Some("public.example:8443")
    );
}

#[tokio::test]
async fn a_client_request_id_is_kept_sent_upstream_and_returned() {
    let upstream = MockUpstream::new().start().await;
    let proxy = TestProxy::start(SIMPLE, upstream.addr).await;
    let response = get(proxy.addr, "/x", "X-Request-ID: client-id-123\r\n").await;
    assert_eq!(response.status, 200);
    assert_eq!(
        header(&upstream.seen.last(), "x-request-id"),
        Some("client-id-123")
    );
    assert_eq!(response.header("x-request-id"), Some("client-id-123"));
}

#[tokio::test]
async fn without_a_request_id_a_generated_one_is_sent_upstream_and_returned() {
    let upstream = MockUpstream::new().start().await;
    let proxy = TestProxy::start(SIMPLE, upstream.addr).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let response = get(proxy.addr, "/x", "").await;
        assert_eq!(response.status, 200);
        let sent = header(&upstream.seen.last(), "x-request-id")
            .expect("a generated id is sent upstream")
            .to_string();
        assert!(
            !sent.is_empty() && sent.bytes().all(|b| b.is_ascii_graphic()),
            "{sent:?}"
        );
        assert_eq!(response.header("x-request-id"), Some(sent.as_str()));
        ids.push(sent);
    }
    assert_ne!(ids[0], ids[1], "each request gets its own id");
}

#[tokio::test]
async fn an_unsafe_client_request_id_is_replaced_by_a_generated_one() {
    let upstream = MockUpstream::new().start().await;
    let proxy = TestProxy::start(SIMPLE, upstream.addr).await;
    let too_long = "x".repeat(201);
    for bad in ["has space", too_long.as_str()] {
        let response = get(proxy.addr, "/x", &format!("X-Request-ID: {bad}\r\n")).await;
        assert_eq!(response.status, 200);
        let sent = header(&upstream.seen.last(), "x-request-id")
            .unwrap()
            .to_string();
        assert_ne!(sent, bad);
        assert_eq!(response.header("x-request-id"), Some(sent.as_str()));
    }
}

#[tokio::test]
async fn the_upstreams_own_request_id_wins_in_the_response() {
    // GeoNature sets its own X-Request-ID: the client sees that one, and the upstream
    // still received the proxy's (here the client's).
    let upstream = MockUpstream::new()
        .route("/", |_, _| async move {
            let mut response = text(StatusCode::OK, "ok");
            response
                .headers_mut()
                .insert("x-request-id", HeaderValue::from_static("geonature-777"));
            response
        })
        .start()
        .await;
    let proxy = TestProxy::start(SIMPLE, upstream.addr).await;
    let response = get(proxy.addr, "/x", "X-Request-ID: from-client\r\n").await;
    assert_eq!(response.status, 200);
    assert_eq!(
        header(&upstream.seen.last(), "x-request-id"),
        Some("from-client")
    );
    assert_eq!(response.header("x-request-id"), Some("geonature-777"));
}

#[tokio::test]
async fn path_and_query_are_forwarded_byte_for_byte() {
    let upstream = MockUpstream::new().start().await;
    let proxy = TestProxy::start(SIMPLE, upstream.addr).await;
    for target in [
        "/geonature/api/x?a=1&b=2",
        "/a%2Fb/c%20d?q=a+b&plus=%2B",
        "/p;matrix=1;v=2/x;y?k;=v;w",
        "//double//slashes///end//",
        "/%C3%A9t%C3%A9/%E2%9C%93?nom=%C3%A9l%C3%A9phant&x=%e2%9c%93",
        "/dots/./and/../kept",
        "/q?empty=&=novalue&&flag",
        "/q?a=b?c=d/e",
        "/trailing?",
        "/sub-delims/!$&'()*+,;=:@~-._",
        "/%25percent%2525?p=%25",
        "/",
    ] {
        let response = get(proxy.addr, target, "").await;
        assert_eq!(response.status, 200, "{target}: {}", response.text());
        assert_eq!(upstream.seen.last().target, target);
    }
}

#[tokio::test]
async fn an_absolute_form_target_is_sent_upstream_in_origin_form() {
    let upstream = MockUpstream::new().start().await;
    let proxy = TestProxy::start(SIMPLE, upstream.addr).await;
    let response = raw_request(
        proxy.addr,
        b"GET http://public.example/a%20b?x=1+2 HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(upstream.seen.last().target, "/a%20b?x=1+2");
}

/// An upstream answering 302 with the `Location` (and `Content-Location`) the request
/// asks for in `X-Location`.
async fn redirecting_upstream() -> RunningUpstream {
    MockUpstream::new()
        .route("/", |req, _| async move {
            let location = req.headers()["x-location"].clone();
            Response::builder()
                .status(StatusCode::FOUND)
                .header("location", location.clone())
                .header("content-location", location)
                .body(full(""))
                .unwrap()
        })
        .start()
        .await
}

#[tokio::test]
async fn a_location_pointing_at_the_upstream_is_rewritten_to_the_clients_host() {
    let upstream = redirecting_upstream().await;
    let proxy = TestProxy::start(SIMPLE, upstream.addr).await;
    let up = upstream.addr;
    for (host, location, expected) in [
        (
            "proxy.test",
            format!("http://{up}/x?y=1"),
            "http://proxy.test/x?y=1",
        ),
        (
            "gn.example:8088",
            format!("http://{up}/geonature/#/synthese"),
            "http://gn.example:8088/geonature/#/synthese",
        ),
        ("proxy.test", format!("http://{up}"), "http://proxy.test"),
        (
            "proxy.test",
            format!("http://{up}?q"),
            "http://proxy.test?q",
        ),
    ] {
        let response = raw_request(
            proxy.addr,
            format!("GET /r HTTP/1.1\r\nHost: {host}\r\nX-Location: {location}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(response.status, 302);
        assert_eq!(response.header("location"), Some(expected), "{location}");
        assert_eq!(
            response.header("content-location"),
            Some(expected),
            "{location}"
        );
    }
}

#[tokio::test]
async fn other_locations_are_left_untouched() {
    let upstream = redirecting_upstream().await;
    let proxy = TestProxy::start(SIMPLE, upstream.addr).await;
    let up = upstream.addr;
    for location in [
        "http://other.example/x".to_string(),
        "/relative/path?x=1".to_string(),
        "relative".to_string(),
        format!("https://{up}/x"),
        // Same prefix, another port.
        format!("http://{up}0/x"),
        format!("http://{up}.evil.example/x"),
        format!("http://other.example/?next=http://{up}/x"),
    ] {
        let response = get(proxy.addr, "/r", &format!("X-Location: {location}\r\n")).await;
        assert_eq!(response.status, 302);
        assert_eq!(response.header("location"), Some(location.as_str()));
        assert_eq!(response.header("content-location"), Some(location.as_str()));
    }
}

/// Waits (bounded) for the access log to hold `lines` lines, and returns them.
async fn access_lines(path: &std::path::Path, lines: usize) -> Vec<String> {
    let mut found = Vec::new();
    eventually(Duration::from_secs(10), "the access log line", || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        found = text.lines().map(str::to_string).collect();
        found.len() >= lines && text.ends_with('\n')
    })
    .await;
    found
}

fn log_config(path: &std::path::Path, format: &str) -> String {
    format!(
        "[upstreams.gn]\naddress = \"{{upstream}}\"\n\
         [[routes]]\nname = \"api\"\nmatch = {{ path_prefix = \"/geonature/api/\" }}\n\
         [log]\naccess = \"{}\"\nformat = \"{format}\"\n",
        path.display()
    )
}

#[tokio::test]
async fn the_combined_access_log_line_has_apaches_fields() {
    let dir = temp_dir("access-combined");
    let path = dir.join("access.log");
    let upstream = MockUpstream::new().text("/", "hello").start().await;
    let proxy = TestProxy::start(&log_config(&path, "combined"), upstream.addr).await;
    let response = get(
        proxy.addr,
        "/geonature/api/x?a=1",
        "Referer: http://ref.example/page\r\nUser-Agent: test-agent/1.0\r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    let lines = access_lines(&path, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    let expected = regex::Regex::new(
        r#"^127\.0\.0\.1 - - \[\d{2}/(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)/\d{4}:\d{2}:\d{2}:\d{2} \+0000\] "GET /geonature/api/x\?a=1 HTTP/1\.1" 200 5 "http://ref\.example/page" "test-agent/1\.0"$"#,
    )
    .unwrap();
    assert!(expected.is_match(line), "{line}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_json_access_log_line_carries_route_and_request_id() {
    let dir = temp_dir("access-json");
    let path = dir.join("access.log");
    let upstream = MockUpstream::new().text("/", "hello").start().await;
    let proxy = TestProxy::start(&log_config(&path, "json"), upstream.addr).await;
    let response = get(
        proxy.addr,
        "/geonature/api/x?a=1",
        "X-Request-ID: log-test-42\r\nUser-Agent: test-agent/1.0\r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    let unmatched = get(proxy.addr, "/elsewhere", "").await;
    assert_eq!(unmatched.status, 200);
    let lines = access_lines(&path, 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let line = &lines[0];
    assert!(
        line.starts_with('{') && line.ends_with('}'),
        "one JSON object per line: {line}"
    );
    for field in [
        r#""client":"127.0.0.1""#,
        r#""request":"GET /geonature/api/x?a=1 HTTP/1.1""#,
        r#""status":200,"bytes":5"#,
        r#""route":"api""#,
        r#""upstream":"gn""#,
        r#""request_id":"log-test-42""#,
        r#""user_agent":"test-agent/1.0""#,
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    // The generated id of the second request is logged too, as sent to the client.
    let generated = unmatched.header("x-request-id").unwrap();
    assert!(
        lines[1].contains(&format!(r#""request_id":"{generated}""#)),
        "{}",
        lines[1]
    );
    assert!(lines[1].contains(r#""route":"(defaults)""#), "{}", lines[1]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Both ways a client can leave, and the completed exchanges that must not look cut.
fn leaving_upstream() -> MockUpstream {
    MockUpstream::new()
        .delayed("/geonature/api/slow", Duration::from_secs(5), "late")
        .route("/geonature/api/stream", |_, _| async move {
            Response::new(trickle_stream(&[b'x'; 1000], Duration::from_millis(20)))
        })
        .text("/geonature/api/done", "complete")
}

#[tokio::test]
async fn a_client_that_leaves_is_logged_as_nginx_does_and_says_when() {
    let dir = temp_dir("access-client-left");
    let path = dir.join("access.log");
    let upstream = leaving_upstream().start().await;
    let proxy = TestProxy::start(&log_config(&path, "json"), upstream.addr).await;

    // Before the response head: the upstream is still working when the client leaves.
    let waiting = open(
        proxy.addr,
        b"GET /geonature/api/slow HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(waiting);
    let lines = access_lines(&path, 1).await;
    assert!(
        lines[0].contains(r#""status":499,"bytes":0"#),
        "{}",
        lines[0]
    );
    // Recorded when the client left, not when the upstream answered 5 s later.
    let after_ms = regex::Regex::new(
        r#""aborted":"the connection to the client closed before the response head, after (\d+) ms""#,
    )
    .unwrap()
    .captures(&lines[0])
    .and_then(|c| c[1].parse::<u64>().ok());
    assert!(
        after_ms.is_some_and(|ms| (300..4000).contains(&ms)),
        "{}",
        lines[0]
    );

    // In the middle of the body.
    let mut reading = open(
        proxy.addr,
        b"GET /geonature/api/stream HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    let (head, _) = read_response_head(&mut reading).await;
    assert_eq!(head.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(reading);
    let lines = access_lines(&path, 2).await;
    assert!(lines[1].contains(r#""status":200"#), "{}", lines[1]);
    assert!(
        lines[1].contains(r#""aborted":"the connection to the client closed after "#),
        "{}",
        lines[1]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn complete_get_and_head_exchanges_are_not_logged_as_cut() {
    let dir = temp_dir("access-complete");
    let path = dir.join("access.log");
    let upstream = leaving_upstream().start().await;
    let proxy = TestProxy::start(&log_config(&path, "json"), upstream.addr).await;
    let full = get(proxy.addr, "/geonature/api/done", "").await;
    assert_eq!(full.text(), "complete");
    let head = raw_request(
        proxy.addr,
        b"HEAD /geonature/api/done HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(head.status, 200);
    // A response the proxy writes itself, with a JSON body HEAD never sends.
    let long_target = format!("/geonature/api/{}", "a".repeat(9000));
    let refused = raw_request(
        proxy.addr,
        format!("HEAD {long_target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(refused.status, 414);
    let lines = access_lines(&path, 3).await;
    for line in &lines {
        assert!(!line.contains("aborted"), "{line}");
        assert!(!line.contains(r#""status":499"#), "{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
