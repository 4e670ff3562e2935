//! Route selection: prefix, regex, method, exact path, GraphQL operation (JSON body,
//! split body, body beyond the peek limit, GET query), and the defaults. Each route
//! gets a distinct response-header timer; the upstream's delay tells which one applied.

mod support;

use std::time::Duration;

use support::*;

/// Upstream answers after 300 ms; a route with a 100 ms response-header timer gets 504,
/// one with 5 s gets 200. So the status says which route was chosen.
const CONFIG: &str = r#"
[upstreams.gn]
address = "{upstream}"
[defaults]
timeouts = { response_header = "100ms" }
[[routes]]
name = "extraction"
match = { path_prefix = "/geonature/api/quadrige/", methods = ["POST"] }
timeouts = { response_header = "5s" }
[[routes]]
name = "downloads"
match = { path_regex = "^/geonature/api/quadrige/(programs|output_data)/[^/]+$" }
timeouts = { response_header = "5s" }
[[routes]]
name = "exact"
match = { path = "/geonature/api/healthz" }
timeouts = { response_header = "5s" }
[[routes]]
name = "graphql-long"
match = { path = "/graphql", graphql_operations = ["executeProgramExtraction", "getExtraction"] }
timeouts = { response_header = "5s" }

[server]
listen = ["127.0.0.1:0"]
graphql_peek_limit = "1KiB"
"#;

async fn setup() -> (RunningUpstream, TestProxy) {
    let upstream = MockUpstream::new()
        .delayed("/", Duration::from_millis(300), "slow answer")
        .start()
        .await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    (upstream, proxy)
}

async fn status_of_get(proxy: &TestProxy, path: &str) -> u16 {
    get(proxy.addr, path, "").await.status
}

#[tokio::test]
async fn prefix_with_method_selects_the_long_route_only_for_that_method() {
    let (_up, proxy) = setup().await;
    let post = post(
        proxy.addr,
        "/geonature/api/quadrige/data-extractions",
        "",
        b"{}",
    )
    .await;
    assert_eq!(post.status, 200, "{}", post.text());
    assert_eq!(
        status_of_get(&proxy, "/geonature/api/quadrige/data-extractions").await,
        504
    );
}

#[tokio::test]
async fn regex_route_matches_downloads_and_nothing_deeper() {
    let (_up, proxy) = setup().await;
    assert_eq!(
        status_of_get(&proxy, "/geonature/api/quadrige/programs/x.csv").await,
        200
    );
    assert_eq!(
        status_of_get(&proxy, "/geonature/api/quadrige/output_data/p1.zip").await,
        200
    );
    assert_eq!(
        status_of_get(&proxy, "/geonature/api/quadrige/programs/a/b.csv").await,
        504
    );
}

#[tokio::test]
async fn exact_path_does_not_match_a_longer_path() {
    let (_up, proxy) = setup().await;
    assert_eq!(status_of_get(&proxy, "/geonature/api/healthz").await, 200);
    assert_eq!(status_of_get(&proxy, "/geonature/api/healthz/x").await, 504);
}

#[tokio::test]
async fn unmatched_requests_get_the_defaults_and_say_so() {
    let (_up, proxy) = setup().await;
    let response = get(proxy.addr, "/geonature/api/synthese/for_web", "").await;
    assert_eq!(response.status, 504);
    assert!(
        response.text().contains("\"route\":\"(defaults)\""),
        "{}",
        response.text()
    );
}

#[tokio::test]
async fn graphql_operation_in_a_json_body_selects_the_route() {
    let (up, proxy) = setup().await;
    let body = br#"{"operationName":"executeProgramExtraction","query":"mutation { x }"}"#;
    let long = post(
        proxy.addr,
        "/graphql",
        "Content-Type: application/json\r\n",
        body,
    )
    .await;
    assert_eq!(long.status, 200, "{}", long.text());
    let other = br#"{"operationName":"listPrograms","query":"{ x }"}"#;
    let short = post(
        proxy.addr,
        "/graphql",
        "Content-Type: application/json\r\n",
        other,
    )
    .await;
    assert_eq!(short.status, 504);
    assert_eq!(
        up.seen.last().headers["content-length"],
        other.len().to_string()
    );
}

#[tokio::test]
async fn graphql_body_split_across_chunks_is_matched_and_resent_byte_for_byte() {
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    let upstream = MockUpstream::new()
        .route("/", move |req, _| {
            let sink = sink.clone();
            async move {
                use http_body_util::BodyExt;
                let bytes = req.into_body().collect().await.unwrap().to_bytes();
                sink.lock().unwrap().extend_from_slice(&bytes);
                tokio::time::sleep(Duration::from_millis(300)).await;
                text(http::StatusCode::OK, "done")
            }
        })
        .start()
        .await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    let body = br#"{"query":"query q { extraction }","variables":{"a":[1,2,{"b":"}"}]},"operationName":"getExtraction"}"#;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    stream
        .write_all(b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    for piece in body.chunks(7) {
        stream
            .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(piece).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
        stream.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let response = within(
        Duration::from_secs(10),
        "chunked graphql",
        read_response(&mut stream),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(received.lock().unwrap().as_slice(), body.as_slice());
}

#[tokio::test]
async fn graphql_name_beyond_the_peek_limit_does_not_match_but_the_body_arrives_whole() {
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = received.clone();
    let upstream = MockUpstream::new()
        .route("/", move |req, _| {
            let count = count.clone();
            async move {
                use http_body_util::BodyExt;
                let bytes = req.into_body().collect().await.unwrap().to_bytes();
                count.store(bytes.len(), std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                text(http::StatusCode::OK, "done")
            }
        })
        .start()
        .await;
    let proxy = TestProxy::start(CONFIG, upstream.addr).await;
    let padding = "x".repeat(4096);
    let body = format!(r#"{{"query":"{padding}","operationName":"executeProgramExtraction"}}"#);
    let response = post(
        proxy.addr,
        "/graphql",
        "Content-Type: application/json\r\n",
        body.as_bytes(),
    )
    .await;
    assert_eq!(
        response.status, 504,
        "the name sits past the 1 KiB peek: defaults apply"
    );
    assert_eq!(
        received.load(std::sync::atomic::Ordering::SeqCst),
        body.len()
    );
}

#[tokio::test]
async fn graphql_operation_in_a_get_query_selects_the_route() {
    let (_up, proxy) = setup().await;
    assert_eq!(
        status_of_get(&proxy, "/graphql?operationName=getExtraction&query=%7Bx%7D").await,
        200
    );
    assert_eq!(
        status_of_get(&proxy, "/graphql?operationName=other").await,
        504
    );
}

#[tokio::test]
async fn a_non_json_graphql_body_just_does_not_match() {
    let (up, proxy) = setup().await;
    let response = post(
        proxy.addr,
        "/graphql",
        "Content-Type: application/json\r\n",
        b"\x00\xffnot json",
    )
    .await;
    assert_eq!(response.status, 504);
    assert_eq!(up.seen.count(), 1, "the request still reached the upstream");
}
