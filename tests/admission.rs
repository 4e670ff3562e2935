//! Protecting Gunicorn's workers: the upstream queue (max_connections, max_queue,
//! queue_timeout), route caps and their priority effect, slot release on every path,
//! several servers with failover, health checks, retry safety, per-client limits and
//! access rules, the metrics and status page, and the worker-kill diagnosis.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;
use tokio::io::AsyncWriteExt;

/// A mock that counts how many requests it serves at once and the peak.
#[derive(Default)]
struct Concurrency {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Concurrency {
    async fn hold(&self, delay: Duration) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn counting_upstream(delay: Duration) -> (RunningUpstream, Arc<Concurrency>) {
    let counter = Arc::new(Concurrency::default());
    let c = counter.clone();
    let upstream = MockUpstream::new()
        .route("/slow", move |_, _| {
            let c = c.clone();
            async move {
                c.hold(delay).await;
                text(StatusCode::OK, "slow done")
            }
        })
        .text("/fast", "fast done")
        .start()
        .await;
    (upstream, counter)
}

fn upstream_config(extra: &str) -> String {
    format!("[upstreams.gn]\naddress = \"{{upstream}}\"\n{extra}\n")
}

#[tokio::test]
async fn max_connections_caps_what_reaches_the_upstream_and_the_rest_waits_in_the_proxy() {
    let (upstream, counter) = counting_upstream(Duration::from_millis(300)).await;
    let proxy = TestProxy::start(&upstream_config("max_connections = 2"), upstream.addr).await;
    let addr = proxy.addr;
    let requests: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { get(addr, "/slow", "").await.status }))
        .collect();
    for r in requests {
        assert_eq!(
            within(Duration::from_secs(10), "queued request", r)
                .await
                .unwrap(),
            200
        );
    }
    assert_eq!(
        counter.peak.load(Ordering::SeqCst),
        2,
        "never more than max_connections at once"
    );
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after_at_once() {
    let (upstream, _) = counting_upstream(Duration::from_millis(1500)).await;
    let config = upstream_config("max_connections = 1\nmax_queue = 1\nqueue_timeout = \"7s\"");
    let proxy = TestProxy::start(&config, upstream.addr).await;
    let addr = proxy.addr;
    let holder = tokio::spawn(async move { get(addr, "/slow", "").await.status });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let queued = tokio::spawn(async move { get(addr, "/slow", "").await.status });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let refused = get(addr, "/slow", "Accept: application/json\r\n").await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused at once"
    );
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("7"));
    assert_eq!(
        json_str(&refused.text(), "error").as_deref(),
        Some("upstream_queue_full")
    );
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(queued.await.unwrap(), 200);
}

#[tokio::test]
async fn a_request_waiting_longer_than_queue_timeout_gets_503() {
    let (upstream, _) = counting_upstream(Duration::from_secs(2)).await;
    let config = upstream_config("max_connections = 1\nqueue_timeout = \"300ms\"");
    let proxy = TestProxy::start(&config, upstream.addr).await;
    let addr = proxy.addr;
    let _holder = tokio::spawn(async move { get(addr, "/slow", "").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let late = get(addr, "/fast", "Accept: application/json\r\n").await;
    let waited = started.elapsed();
    assert_eq!(late.status, 503);
    assert_eq!(
        json_str(&late.text(), "error").as_deref(),
        Some("upstream_queue_timeout")
    );
    assert!(
        waited >= Duration::from_millis(280) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert_eq!(late.header("retry-after"), Some("1"));
}

const PRIORITY: &str = r#"
[upstreams.gn]
address = "{upstream}"
max_connections = 4
[[routes]]
name = "extraction"
match = { path_prefix = "/slow" }
max_concurrent = 2
"#;

#[tokio::test]
async fn short_requests_go_through_at_once_while_long_ones_hold_their_share_and_queue() {
    let (upstream, counter) = counting_upstream(Duration::from_secs(2)).await;
    let proxy = TestProxy::start(PRIORITY, upstream.addr).await;
    let addr = proxy.addr;
    let long: Vec<_> = (0..5)
        .map(|_| tokio::spawn(async move { get(addr, "/slow", "").await.status }))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        counter.now.load(Ordering::SeqCst),
        2,
        "the route's cap holds"
    );
    for _ in 0..5 {
        let started = Instant::now();
        let short = get(addr, "/fast", "").await;
        assert_eq!(short.status, 200);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "short request waited {:?}",
            started.elapsed()
        );
    }
    for l in long {
        assert_eq!(
            within(Duration::from_secs(15), "long request", l)
                .await
                .unwrap(),
            200
        );
    }
}

#[tokio::test]
async fn a_route_cap_that_rejects_answers_503_with_retry_after() {
    let (upstream, _) = counting_upstream(Duration::from_millis(800)).await;
    let config = "[upstreams.gn]\naddress = \"{upstream}\"\nqueue_timeout = \"20s\"\n[[routes]]\nname = \"extraction\"\nmatch = { path_prefix = \"/slow\" }\nmax_concurrent = 1\non_limit = \"reject\"\n";
    let proxy = TestProxy::start(config, upstream.addr).await;
    let addr = proxy.addr;
    let first = tokio::spawn(async move { get(addr, "/slow", "").await.status });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = get(addr, "/slow", "Accept: application/json\r\n").await;
    assert_eq!(second.status, 503);
    assert_eq!(
        json_str(&second.text(), "error").as_deref(),
        Some("route_busy")
    );
    assert_eq!(second.header("retry-after"), Some("20"));
    assert_eq!(first.await.unwrap(), 200);
}

#[tokio::test]
async fn a_slot_is_released_when_the_client_disconnects_or_a_timer_fires() {
    let (upstream, _) = counting_upstream(Duration::from_secs(3)).await;
    let config = "[upstreams.gn]\naddress = \"{upstream}\"\nmax_connections = 1\nqueue_timeout = \"10s\"\n[[routes]]\nname = \"short\"\nmatch = { path_prefix = \"/slow/short\" }\ntimeouts = { response_header = \"200ms\" }\n";
    let proxy = TestProxy::start(config, upstream.addr).await;
    // A client that leaves while its request runs upstream frees the slot.
    let mut leaver = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    leaver
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(leaver);
    let started = Instant::now();
    assert_eq!(get(proxy.addr, "/fast", "").await.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "slot held {:?} after the client left",
        started.elapsed()
    );
    // A request whose timer fires frees the slot too.
    assert_eq!(get(proxy.addr, "/slow/short", "").await.status, 504);
    let started = Instant::now();
    assert_eq!(get(proxy.addr, "/fast", "").await.status, 200);
    assert!(started.elapsed() < Duration::from_millis(1000));
}

#[tokio::test]
async fn a_slot_is_held_until_the_response_body_is_done() {
    let upstream = MockUpstream::new()
        .route("/stream", |_, _| async {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                for _ in 0..8 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if tx.send(bytes::Bytes::from_static(b"chunk")).await.is_err() {
                        return;
                    }
                }
            });
            use http_body_util::BodyExt;
            http::Response::new(ChannelBody(rx).boxed())
        })
        .text("/fast", "fast")
        .start()
        .await;
    let proxy = TestProxy::start(&upstream_config("max_connections = 1"), upstream.addr).await;
    let addr = proxy.addr;
    let streaming = tokio::spawn(async move {
        let response = get(addr, "/stream", "").await;
        (response.status, response.body.len(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    let fast = get(addr, "/fast", "").await;
    let fast_done = Instant::now();
    let (status, len, stream_done) = streaming.await.unwrap();
    assert_eq!((status, len, fast.status), (200, 40, 200));
    assert!(
        fast_done >= stream_done,
        "the second request got the slot before the first body ended"
    );
}

#[tokio::test]
async fn with_one_server_down_every_request_reaches_the_other() {
    let good = MockUpstream::new().text("/", "good").start().await;
    let dead = refused_addr().await;
    let config = format!(
        "[upstreams.gn]\nservers = [\"{dead}\", \"{}\"]\nbalance = \"round_robin\"\n",
        good.addr
    );
    let proxy = TestProxy::start(&config, good.addr).await;
    for _ in 0..6 {
        let response = get(proxy.addr, "/x", "").await;
        assert_eq!((response.status, response.text().as_str()), (200, "good"));
    }
    assert_eq!(good.seen.count(), 6);
}

#[tokio::test]
async fn a_failing_health_check_takes_a_server_out_and_a_passing_one_brings_it_back() {
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = healthy.clone();
    let checked = MockUpstream::new()
        .route("/health", move |_, _| {
            let ok = flag.load(Ordering::SeqCst);
            async move {
                let status = if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                text(status, "health")
            }
        })
        .text("/", "checked")
        .start()
        .await;
    let other = MockUpstream::new().text("/", "other").start().await;
    let config = format!(
        "[upstreams.gn]\nservers = [\"{}\", \"{}\"]\nbalance = \"round_robin\"\nhealth_check = {{ path = \"/health\", interval = \"100ms\", timeout = \"1s\" }}\n",
        checked.addr, other.addr
    );
    let proxy = TestProxy::start(&config, other.addr).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..4 {
        assert_eq!(
            get(proxy.addr, "/x", "").await.text(),
            "other",
            "the failing server gets nothing"
        );
    }
    healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let answers: Vec<String> = answers_in_turn(proxy.addr, 4).await;
    assert!(answers.iter().any(|a| a == "checked"), "{answers:?}");
}

async fn answers_in_turn(addr: std::net::SocketAddr, n: usize) -> Vec<String> {
    let mut answers = Vec::new();
    for _ in 0..n {
        answers.push(get(addr, "/x", "").await.text());
    }
    answers
}

#[tokio::test]
async fn a_get_whose_server_dropped_it_is_retried_elsewhere_but_a_post_never_is() {
    let dropper = raw_upstream(vec![]).await;
    let good = MockUpstream::new().text("/", "good").start().await;
    let config = format!(
        "[upstreams.gn]\nservers = [\"{}\", \"{}\"]\nbalance = \"round_robin\"\nmax_fails = 100\n",
        dropper.addr, good.addr
    );
    let proxy = TestProxy::start(&config, good.addr).await;
    for _ in 0..4 {
        let response = get(proxy.addr, "/x", "").await;
        assert_eq!(response.status, 200, "{}", response.text());
    }
    let before = good.seen.count();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(post(proxy.addr, "/form", "", b"a=1").await.status);
    }
    let posts_at_good = good.seen.count() - before;
    let posts_dropped = statuses.iter().filter(|s| **s == 502).count();
    assert_eq!(
        posts_at_good + posts_dropped,
        4,
        "each POST went to exactly one server: {statuses:?}"
    );
    assert!(
        posts_dropped >= 1,
        "round robin sent some POSTs to the dropping server: {statuses:?}"
    );
}

#[tokio::test]
async fn one_client_is_limited_in_concurrency_and_rate_with_429_and_retry_after() {
    let (upstream, _) = counting_upstream(Duration::from_millis(600)).await;
    let config = "[upstreams.gn]\naddress = \"{upstream}\"\n\
        [[routes]]\nname = \"one-at-a-time\"\nmatch = { path_prefix = \"/slow\" }\nclient_max_concurrent = 1\n\
        [[routes]]\nname = \"two-a-minute\"\nmatch = { path_prefix = \"/fast\" }\nclient_rate = \"2/m\"\n";
    let proxy = TestProxy::start(config, upstream.addr).await;
    let addr = proxy.addr;
    let first = tokio::spawn(async move { get(addr, "/slow", "").await.status });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = get(addr, "/slow", "").await;
    assert_eq!(second.status, 429);
    assert!(second.header("retry-after").is_some());
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(
        get(addr, "/slow", "").await.status,
        200,
        "released after the first ended"
    );
    assert_eq!(get(addr, "/fast", "").await.status, 200);
    assert_eq!(get(addr, "/fast", "").await.status, 200);
    let third = get(addr, "/fast", "").await;
    assert_eq!(third.status, 429);
    let retry: u64 = third.header("retry-after").unwrap().parse().unwrap();
    assert!((25..=31).contains(&retry), "{retry}");
}

#[tokio::test]
async fn allow_and_deny_rules_answer_403() {
    let upstream = MockUpstream::new().text("/", "ok").start().await;
    let config = "[upstreams.gn]\naddress = \"{upstream}\"\n\
        [[routes]]\nname = \"lan-only\"\nmatch = { path_prefix = \"/lan\" }\nallow = [\"10.0.0.0/8\"]\n\
        [[routes]]\nname = \"not-local\"\nmatch = { path_prefix = \"/nolocal\" }\ndeny = [\"127.0.0.0/8\", \"::1\"]\n\
        [[routes]]\nname = \"local\"\nmatch = { path_prefix = \"/local\" }\nallow = [\"127.0.0.1\"]\n";
    let proxy = TestProxy::start(config, upstream.addr).await;
    assert_eq!(get(proxy.addr, "/lan/x", "").await.status, 403);
    assert_eq!(get(proxy.addr, "/nolocal/x", "").await.status, 403);
    assert_eq!(get(proxy.addr, "/local/x", "").await.status, 200);
    assert_eq!(upstream.seen.count(), 1);
}

#[tokio::test]
async fn a_trusted_proxy_in_front_is_believed_for_the_client_address() {
    let upstream = MockUpstream::new().text("/", "ok").start().await;
    let config = "[server]\nlisten = [\"127.0.0.1:0\"]\ntrusted_proxies = [\"127.0.0.1\"]\n\
        [upstreams.gn]\naddress = \"{upstream}\"\n\
        [[routes]]\nname = \"lan-only\"\nmatch = { path_prefix = \"/lan\" }\nallow = [\"10.0.0.0/8\"]\n";
    let proxy = TestProxy::start(config, upstream.addr).await;
    let from_lan = get(proxy.addr, "/lan/x", "X-Forwarded-For: 10.1.2.3\r\n").await;
    assert_eq!(from_lan.status, 200);
    assert_eq!(
        upstream.seen.last().headers["x-forwarded-for"],
        "10.1.2.3, 127.0.0.1"
    );
    let from_outside = get(proxy.addr, "/lan/x", "X-Forwarded-For: 198.51.100.7\r\n").await;
    assert_eq!(from_outside.status, 403);
}

const OBSERVED: &str = r#"
[admin]
listen = "127.0.0.1:0"
[upstreams.gn]
address = "{upstream}"
worker_timeout = "1s"
[[routes]]
name = "api"
match = { path_prefix = "/api" }
[[routes]]
name = "impatient"
match = { path_prefix = "/slow" }
timeouts = { response_header = "100ms" }
"#;

#[tokio::test]
async fn metrics_count_requests_timeouts_and_latency_by_route() {
    let (upstream, _) = counting_upstream(Duration::from_millis(400)).await;
    let proxy = TestProxy::start(OBSERVED, upstream.addr).await;
    for _ in 0..3 {
        assert_eq!(get(proxy.addr, "/api/x", "").await.status, 200);
    }
    assert_eq!(get(proxy.addr, "/slow", "").await.status, 504);
    let admin = proxy.admin_addr.expect("admin listener");
    let metrics = get(admin, "/metrics", "").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    for line in [
        "quadrige_requests_total{route=\"api\",class=\"2xx\"} 3",
        "quadrige_requests_total{route=\"impatient\",class=\"5xx\"} 1",
        "quadrige_timeouts_total{route=\"impatient\",timer=\"response_header\"} 1",
        "quadrige_request_duration_seconds_count{route=\"api\"} 3",
        "quadrige_response_header_seconds_count{route=\"api\"} 3",
        "quadrige_response_bytes_total{route=\"api\"} 6",
        "quadrige_in_flight{route=\"api\"} 0",
        "quadrige_server_up{upstream=\"gn\",server=",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    assert_eq!(
        text.matches("# TYPE quadrige_requests_total counter")
            .count(),
        1
    );
    assert_eq!(get(admin, "/healthz", "").await.text(), "ok\n");
}

#[tokio::test]
async fn the_status_page_and_json_show_requests_in_flight_with_their_state() {
    let upstream = MockUpstream::new()
        .delayed("/api/slow", Duration::from_millis(1500), "exported")
        .start()
        .await;
    let proxy = TestProxy::start(OBSERVED, upstream.addr).await;
    let addr = proxy.addr;
    let slow = tokio::spawn(async move { get(addr, "/api/slow-export", "").await.status });
    let admin = proxy.admin_addr.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let json = get(admin, "/status.json", "").await.text();
    assert!(
        json.contains("\"request\":\"GET /api/slow-export\""),
        "{json}"
    );
    assert!(
        json.contains("\"stage\":\"waiting for the upstream\""),
        "{json}"
    );
    assert!(json.contains("\"route\":\"api\""), "{json}");
    let page = get(admin, "/", "").await;
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = page.text();
    assert!(html.contains("http-equiv=\"refresh\""), "refreshes itself");
    assert!(html.contains("GET /api/slow-export"));
    assert!(
        !html.contains("<script src") && !html.contains("<link"),
        "no external asset"
    );
    assert_eq!(slow.await.unwrap(), 200);
}

#[tokio::test]
async fn a_connection_dropped_at_the_worker_timeout_is_diagnosed_as_a_gunicorn_kill() {
    let killed = raw_upstream(vec![Step::Sleep(Duration::from_millis(1000))]).await;
    let proxy = TestProxy::start(OBSERVED, killed.addr).await;
    let response = get(proxy.addr, "/api/extraction", "").await;
    assert_eq!(response.status, 502);
    let metrics = get(proxy.admin_addr.unwrap(), "/metrics", "").await.text();
    assert!(
        metrics.contains("quadrige_gunicorn_worker_kills_total{upstream=\"gn\"} 1"),
        "{metrics}"
    );
}

/// An application's 500 under a server that adds no `Server` field: JSON, not Gunicorn's page.
const JSON_500_WITHOUT_SERVER: &[u8] = b"HTTP/1.1 500 INTERNAL SERVER ERROR\r\n\
Connection: close\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";

/// The application's own 500 under Gunicorn's sync workers, which close every connection.
const APPLICATION_500: &[u8] = b"HTTP/1.1 500 INTERNAL SERVER ERROR\r\nServer: gunicorn\r\n\
Connection: close\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";

#[tokio::test]
async fn gunicorns_own_error_page_becomes_an_explained_502_and_a_worker_kill_whatever_worker_timeout_says(
) {
    // The shipped config's worker_timeout, in front of a stock Gunicorn that kills at 30 s.
    let config = "[admin]\nlisten = \"127.0.0.1:0\"\n\
                  [upstreams.gn]\naddress = \"{upstream}\"\nworker_timeout = \"60m\"\n\
                  [[routes]]\nname = \"extraction\"\nmatch = { path_prefix = \"/geonature/api/quadrige\" }\n";
    let cases = [
        (APPLICATION_500, 500, None, 0),
        (JSON_500_WITHOUT_SERVER, 500, None, 0),
        (GUNICORN_OWN_500, 502, Some("upstream_worker_failed"), 1),
    ];
    for (answer, status, error, kills) in cases {
        let upstream = raw_upstream(vec![Step::Write(answer)]).await;
        let proxy = TestProxy::start(config, upstream.addr).await;
        let response = get(proxy.addr, "/geonature/api/quadrige/program-extraction", "").await;
        let text = response.text();
        assert_eq!(response.status, status, "{text}");
        assert_eq!(json_str(&text, "error").as_deref(), error, "{text}");
        if error.is_some() {
            assert_eq!(json_str(&text, "route").as_deref(), Some("extraction"));
            assert!(text.contains("GUNICORN_TIMEOUT"), "{text}");
        } else {
            assert_eq!(text, "{}", "the application's own 500 passes unchanged");
        }
        let metrics = get(proxy.admin_addr.unwrap(), "/metrics", "").await.text();
        let expected = format!("quadrige_gunicorn_worker_kills_total{{upstream=\"gn\"}} {kills}\n");
        assert!(metrics.contains(&expected), "{expected}: {metrics}");
    }
}

#[tokio::test]
async fn the_admin_listener_refuses_addresses_outside_its_allow_list() {
    let upstream = MockUpstream::new().start().await;
    let config = "[admin]\nlisten = \"127.0.0.1:0\"\nallow = [\"10.0.0.0/8\"]\n[upstreams.gn]\naddress = \"{upstream}\"\n";
    let proxy = TestProxy::start(config, upstream.addr).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.admin_addr.unwrap())
        .await
        .unwrap();
    let _ = stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    use tokio::io::AsyncReadExt;
    let n = within(
        Duration::from_secs(5),
        "admin refusal",
        stream.read(&mut buf),
    )
    .await
    .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
}

#[tokio::test]
async fn a_unix_socket_server_serves_like_a_tcp_one() {
    let path = std::env::temp_dir().join(format!("qp-gunicorn-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: http::Request<hyper::body::Incoming>| async move {
                        let host = request.headers().get("host").cloned();
                        let mut response = text(StatusCode::OK, "over unix");
                        if let Some(host) = host {
                            response.headers_mut().insert("x-seen-host", host);
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let unused = MockUpstream::new().start().await;
    let config = format!("[upstreams.gn]\nservers = [\"unix:{}\"]\n", path.display());
    let proxy = TestProxy::start(&config, unused.addr).await;
    let response = get(proxy.addr, "/geonature/api/x", "").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "over unix");
    assert_eq!(response.header("x-seen-host"), Some("localhost"));
    let _ = std::fs::remove_file(&path);
}

/// A Gunicorn with one sync worker: `/slow` holds it until `release` is notified, and
/// its health check waits while it is held (counted in `checks_while_busy`) or for good
/// once `hung` is set.
struct SingleWorker {
    upstream: RunningUpstream,
    release: Arc<tokio::sync::Notify>,
    checks_while_busy: Arc<AtomicUsize>,
    hung: Arc<std::sync::atomic::AtomicBool>,
}

async fn single_worker_upstream() -> SingleWorker {
    let busy = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let checks_while_busy = Arc::new(AtomicUsize::new(0));
    let hung = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (worker, released) = (busy.clone(), release.clone());
    let (counted, hangs) = (checks_while_busy.clone(), hung.clone());
    let upstream = MockUpstream::new()
        .route("/slow", move |_, _| {
            let (worker, released) = (worker.clone(), released.clone());
            async move {
                worker.fetch_add(1, Ordering::SeqCst);
                released.notified().await;
                worker.fetch_sub(1, Ordering::SeqCst);
                text(StatusCode::OK, "exported")
            }
        })
        .route("/health", move |_, _| {
            let held = busy.load(Ordering::SeqCst) > 0;
            if held {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            let waits = held || hangs.load(Ordering::SeqCst);
            async move {
                if waits {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                text(StatusCode::OK, "ok")
            }
        })
        .text("/fast", "fast")
        .start()
        .await;
    SingleWorker {
        upstream,
        release,
        checks_while_busy,
        hung,
    }
}

#[tokio::test]
async fn a_health_check_that_times_out_behind_our_own_requests_does_not_take_the_server_out() {
    let worker = single_worker_upstream().await;
    let config = "[upstreams.gn]\naddress = \"{upstream}\"\n\
                  health_check = { path = \"/health\", interval = \"100ms\", timeout = \"200ms\" }\n";
    let proxy = TestProxy::start(config, worker.upstream.addr).await;
    let addr = proxy.addr;
    let export = tokio::spawn(async move { get(addr, "/slow", "").await.status });
    // Checks run one after the other: a second one while the worker is held means the
    // first timed out behind the export.
    let checks = worker.checks_while_busy.clone();
    eventually(
        Duration::from_secs(10),
        "two checks behind the export",
        || checks.load(Ordering::SeqCst) >= 2,
    )
    .await;
    let during = get(proxy.addr, "/fast", "").await;
    assert_eq!(during.status, 200, "{}", during.text());
    worker.release.notify_one();
    assert_eq!(export.await.unwrap(), 200);

    // With nothing of ours in flight, a check that times out does take it out.
    worker.hung.store(true, Ordering::SeqCst);
    let refused = within(Duration::from_secs(10), "the server taken out", async {
        loop {
            let response = get(proxy.addr, "/fast", "Accept: application/json\r\n").await;
            if response.status == 503 {
                return response;
            }
            assert_eq!(response.status, 200, "{}", response.text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(
        json_str(&refused.text(), "error").as_deref(),
        Some("no_healthy_server")
    );
}

#[tokio::test]
async fn no_healthy_server_answers_503_at_once() {
    let sick = MockUpstream::new()
        .route("/health", |_, _| async {
            text(StatusCode::SERVICE_UNAVAILABLE, "sick")
        })
        .start()
        .await;
    let config = "[upstreams.gn]\naddress = \"{upstream}\"\nhealth_check = { path = \"/health\", interval = \"100ms\", timeout = \"1s\" }\n";
    let proxy = TestProxy::start(config, sick.addr).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = sick.seen.count();
    let response = get(
        proxy.addr,
        "/geonature/api/x",
        "Accept: application/json\r\n",
    )
    .await;
    assert_eq!(response.status, 503);
    assert_eq!(
        json_str(&response.text(), "error").as_deref(),
        Some("no_healthy_server")
    );
    assert!(response.header("retry-after").is_some());
    let forwarded = sick
        .seen
        .requests
        .lock()
        .unwrap()
        .iter()
        .skip(before)
        .filter(|r| r.target != "/health")
        .count();
    assert_eq!(
        forwarded, 0,
        "nothing but health checks reached the sick server"
    );
}

#[test]
fn check_warns_about_timers_longer_than_gunicorns_and_caps_that_take_every_worker() {
    let dir = std::env::temp_dir().join(format!("qp-check-warn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        "[upstreams.gn]\naddress = \"127.0.0.1:8000\"\nmax_connections = 4\nworker_timeout = \"30s\"\n\
         [[routes]]\nname = \"extraction\"\nmatch = { path_prefix = \"/x\" }\ntimeouts = { response_header = \"20m\", total = \"10m\" }\nmax_concurrent = 4\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_quadrige-proxy"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("warning: route `extraction`: its timers (20m response_header"),
        "{text}"
    );
    assert!(text.contains("worker_timeout 30s"), "{text}");
    assert!(text.contains("exceed total (10m)"), "{text}");
    assert!(
        text.contains("max_concurrent 4 can take every worker"),
        "{text}"
    );
}
