//! The Apache drop-in behaviours around the proxy: TLS with HTTP/1.1 and HTTP/2 (ALPN),
//! the HTTPS redirect with its ACME exception, HSTS, the maintenance switch, and SIGHUP
//! reloads (new rules for new requests, in-flight requests untouched, invalid configs and
//! broken certificates refused, listeners opened and closed).

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use quadrige_proxy::server::ReloadRequest;
use quadrige_proxy::{Config, Server};
use rustls_pki_types::CertificateDer;
use support::*;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// A unique scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qp-dropin-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TLS config on two fresh loopback ports: a reload must name the same addresses to
/// keep the listeners (port 0 would mean "a new one").
async fn tls_config(dir: &Path, extra: &str) -> String {
    let (plain, tls) = (free_port().await, free_port().await);
    format!(
        r#"[server]
listen = ["{plain}"]
[server.tls]
listen = ["{tls}"]
certificate = "{cert}"
key = "{key}"
hsts = "max-age=31536000"
{extra}
[upstreams.gn]
address = "{{upstream}}"
[log]
access = "off"
"#,
        cert = dir.join("cert.pem").display(),
        key = dir.join("key.pem").display(),
    )
}

struct Answer {
    status: StatusCode,
    version: Version,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn https_get(
    addr: SocketAddr,
    trusted: &CertificateDer<'static>,
    h2: bool,
    path: &str,
) -> Answer {
    let tls = tls_connect(addr, trusted, if h2 { b"h2" } else { b"http/1.1" }).await;
    let io = TokioIo::new(tls);
    let request = Request::get(format!("https://localhost:{}{path}", addr.port()))
        .header("host", format!("localhost:{}", addr.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(connection);
        let mut request = request;
        request.headers_mut().remove("host");
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        let (mut parts, body) = request.into_parts();
        parts.uri = path.parse().unwrap();
        sender
            .send_request(Request::from_parts(parts, body))
            .await
            .unwrap()
    };
    let (head, body) = response.into_parts();
    Answer {
        status: head.status,
        version: head.version,
        headers: head.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// The plain and TLS addresses of a proxy started with `tls_config`.
fn addresses(proxy: &TestProxy) -> (SocketAddr, SocketAddr) {
    (proxy.addr, proxy.tls_addr.expect("a TLS listener"))
}

#[tokio::test]
async fn https_serves_http1_with_hsts_and_tells_the_upstream_the_scheme() {
    let dir = scratch("h1");
    let cert = write_certificate(&dir);
    let upstream = MockUpstream::new().text("/", "over tls").start().await;
    let proxy = TestProxy::start(&tls_config(&dir, "").await, upstream.addr).await;
    let (_, tls) = addresses(&proxy);
    let answer = within(
        Duration::from_secs(10),
        "https GET",
        https_get(tls, &cert, false, "/geonature/api/x"),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.version, Version::HTTP_11);
    assert_eq!(answer.body, "over tls");
    assert_eq!(
        answer.headers["strict-transport-security"],
        "max-age=31536000"
    );
    let seen = upstream.seen.last();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.target, "/geonature/api/x");
}

#[tokio::test]
async fn https_speaks_http2_when_the_client_offers_h2_and_the_upstream_stays_http1() {
    let dir = scratch("h2");
    let cert = write_certificate(&dir);
    let upstream = MockUpstream::new().text("/", "over h2").start().await;
    let proxy = TestProxy::start(&tls_config(&dir, "").await, upstream.addr).await;
    let (_, tls) = addresses(&proxy);
    let answer = within(
        Duration::from_secs(10),
        "h2 GET",
        https_get(tls, &cert, true, "/geonature/api/y?a=1"),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.version, Version::HTTP_2);
    assert_eq!(answer.body, "over h2");
    let seen = upstream.seen.last();
    assert_eq!(seen.target, "/geonature/api/y?a=1");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        format!("localhost:{}", tls.port())
    );
    assert_eq!(seen.headers["host"], upstream.addr.to_string());
}

/// An HTTP/2 download of `total` bytes under a route whose idle time is [`STALL_IDLE`],
/// with the client's stream window set to `window`; the upstream reports on `ended`
/// how its stream ended.
struct H2Download {
    response: http::Response<hyper::body::Incoming>,
    ended: mpsc::UnboundedReceiver<StreamEnd>,
    _proxy: TestProxy,
    _upstream: RunningUpstream,
}

const STALL_IDLE: Duration = Duration::from_millis(400);

async fn h2_download(name: &str, total: u64, window: u32) -> H2Download {
    let dir = scratch(name);
    let cert = write_certificate(&dir);
    let (ended_tx, ended) = mpsc::unbounded_channel();
    let upstream = MockUpstream::new()
        .route("/", move |_, seen| {
            let ended_tx = ended_tx.clone();
            async move { http::Response::new(watched_stream(total, 16 * 1024, seen, ended_tx)) }
        })
        .start()
        .await;
    let routes = r#"
[defaults]
timeouts = { idle = "5s" }
[[routes]]
name = "export"
match = { path_prefix = "/export" }
timeouts = { idle = "400ms" }
"#;
    let proxy = TestProxy::start(&(tls_config(&dir, "").await + routes), upstream.addr).await;
    let (_, tls) = addresses(&proxy);
    let io = TokioIo::new(tls_connect(tls, &cert, b"h2").await);
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(window)
        .handshake(io)
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get(format!("https://localhost:{}/export/all.csv", tls.port()))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within(
        Duration::from_secs(5),
        "the head",
        sender.send_request(request),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    H2Download {
        response,
        ended,
        _proxy: proxy,
        _upstream: upstream,
    }
}

/// A browser on HTTP/2 that stops reading one download (it never reopens the stream's
/// flow-control window) must not hold the upstream connection, and the Gunicorn worker
/// behind it, for ever: the route's idle time bounds a stalled stream as it bounds a
/// stalled HTTP/1 connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_whose_client_stops_reading_is_cut_after_the_routes_idle_time() {
    let mut download = h2_download("h2-stall", 1 << 30, 64 * 1024).await;
    // The body is held and never read: the stream's window stays shut once full.
    let stopped_reading = Instant::now();
    let end = within(
        Duration::from_secs(5),
        "the upstream noticing the cut",
        download.ended.recv(),
    )
    .await
    .expect("the upstream reports how its stream ended");
    assert!(end.cut, "the upstream's body was not dropped: {end:?}");
    let after = end.at.into_std() - stopped_reading;
    assert!(
        after + Duration::from_millis(20) >= STALL_IDLE
            && after <= STALL_IDLE + Duration::from_millis(2500),
        "the upstream was cut {after:?} after the client stopped reading, for a {STALL_IDLE:?} idle time"
    );
    // The client is told the transfer failed; it never sees a clean end.
    let read = within(
        Duration::from_secs(5),
        "the rest of the body",
        download.response.into_body().collect(),
    )
    .await;
    assert!(read.is_err(), "a cut stream must not end cleanly");
}

/// The guard counts time in which the client takes nothing, not the transfer's length:
/// a client reading steadily for four times the idle time gets its whole download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_read_slowly_but_steadily_is_left_alone() {
    const TOTAL: u64 = 512 * 1024;
    let download = h2_download("h2-steady", TOTAL, 64 * 1024).await;
    let mut body = download.response.into_body();
    let mut received = 0u64;
    let began = Instant::now();
    while let Some(frame) = within(Duration::from_secs(5), "a frame", body.frame()).await {
        let frame = frame.expect("the stream is not cut");
        if let Ok(data) = frame.into_data() {
            received += data.len() as u64;
            // About 320 KiB/s: the whole body takes four times the idle time.
            tokio::time::sleep(Duration::from_millis(50) * data.len() as u32 / (16 * 1024)).await;
        }
    }
    assert_eq!(received, TOTAL);
    assert!(began.elapsed() > STALL_IDLE * 3, "{:?}", began.elapsed());
}

#[tokio::test]
async fn plain_http_redirects_to_https_except_acme_challenges() {
    let dir = scratch("redirect");
    write_certificate(&dir);
    let webroot = dir.join("webroot");
    std::fs::create_dir_all(webroot.join(".well-known/acme-challenge")).unwrap();
    std::fs::write(webroot.join(".well-known/acme-challenge/token123"), "proof").unwrap();
    let config = tls_config(&dir, "redirect_http = true").await.replace(
        "[server]\n",
        &format!(
            "[server]\nacme_challenge_root = \"{}\"\n",
            webroot.display()
        ),
    );
    let upstream = MockUpstream::new().start().await;
    let proxy = TestProxy::start(&config, upstream.addr).await;
    let (plain, tls) = addresses(&proxy);
    let redirected = get(plain, "/geonature/?x=1", "").await;
    assert_eq!(redirected.status, 301);
    assert_eq!(
        redirected.header("location"),
        Some(format!("https://proxy.test:{}/geonature/?x=1", tls.port()).as_str())
    );
    let posted = post(plain, "/geonature/api/x", "", b"{}").await;
    assert_eq!(
        posted.status, 308,
        "a POST is redirected without turning into a GET"
    );
    let challenge = get(plain, "/.well-known/acme-challenge/token123", "").await;
    assert_eq!(challenge.status, 200, "{}", challenge.text());
    assert_eq!(challenge.text(), "proof");
    assert_eq!(upstream.seen.count(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn maintenance_flag_file_answers_503_under_the_prefix_only() {
    let dir = scratch("maintenance");
    let flag = dir.join("maintenance.flag");
    let page = dir.join("page.html");
    std::fs::write(&page, "<h1>back soon</h1>").unwrap();
    let config = format!(
        "[upstreams.gn]\naddress = \"{{upstream}}\"\n[maintenance]\nflag_file = \"{}\"\npage = \"{}\"\nretry_after = \"2m\"\n",
        flag.display(),
        page.display()
    );
    let upstream = MockUpstream::new().text("/", "live").start().await;
    let proxy = TestProxy::start(&config, upstream.addr).await;
    assert_eq!(get(proxy.addr, "/geonature/api/x", "").await.text(), "live");
    std::fs::write(&flag, "").unwrap();
    let during = wait_for_status(proxy.addr, "/geonature/api/x", 503).await;
    assert_eq!(during.text(), "<h1>back soon</h1>");
    assert_eq!(
        during.header("cache-control"),
        Some("no-cache, no-store, must-revalidate")
    );
    assert_eq!(during.header("retry-after"), Some("120"));
    assert_eq!(
        get(proxy.addr, "/usershub/", "").await.status,
        200,
        "outside the prefix"
    );
    std::fs::remove_file(&flag).unwrap();
    wait_for_status(proxy.addr, "/geonature/api/x", 200).await;
}

/// Polls until `path` answers `status` (the flag file is looked at once a second).
async fn wait_for_status(addr: SocketAddr, path: &str, status: u16) -> RawResponse {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = get(addr, path, "").await;
        if response.status == status || Instant::now() > deadline {
            assert_eq!(response.status, status, "{path} never answered {status}");
            return response;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A proxy run from a config file, with a handle to request reloads.
struct Reloadable {
    path: PathBuf,
    addrs: Vec<SocketAddr>,
    reload: mpsc::Sender<ReloadRequest>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Reloadable {
    async fn start(dir: &Path, text: &str) -> Reloadable {
        let path = dir.join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        let server = Server::bind(&Config::load(&path).unwrap()).await.unwrap();
        let addrs = server.local_addrs();
        let (reload, reloads) = mpsc::channel(1);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run_with_reloads(
            async {
                let _ = stopped.await;
            },
            reloads,
        ));
        Reloadable {
            path,
            addrs,
            reload,
            stop: Some(stop),
            task,
        }
    }

    /// Writes the new config, asks for a reload and returns its outcome.
    async fn reload_with(&self, text: &str) -> Result<(), String> {
        std::fs::write(&self.path, text).unwrap();
        let (request, outcome) = ReloadRequest::answered();
        self.reload.send(request).await.unwrap();
        within(Duration::from_secs(10), "reload", outcome)
            .await
            .unwrap()
    }
}

impl Drop for Reloadable {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

fn reload_config(listen: &str, upstream: SocketAddr, response_header: &str) -> String {
    format!(
        "[server]\nlisten = [{listen}]\n[log]\naccess = \"off\"\n[upstreams.gn]\naddress = \"{upstream}\"\n\
         [defaults]\ntimeouts = {{ response_header = \"{response_header}\" }}\n\
         [[routes]]\nname = \"long\"\nmatch = {{ path_prefix = \"/long\" }}\ntimeouts = {{ response_header = \"30s\" }}\n"
    )
}

#[tokio::test]
async fn a_reload_applies_to_new_requests_while_an_in_flight_one_finishes_under_the_old_rules() {
    let dir = scratch("reload-inflight");
    let upstream = MockUpstream::new()
        .delayed("/slow", Duration::from_millis(1500), "slow done")
        .delayed("/medium", Duration::from_millis(400), "medium done")
        .start()
        .await;
    let listen = format!("\"{}\"", free_port().await);
    let server = Reloadable::start(&dir, &reload_config(&listen, upstream.addr, "10s")).await;
    let addr = server.addrs[0];
    let in_flight = tokio::spawn(async move { get(addr, "/slow", "").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server
        .reload_with(&reload_config(&listen, upstream.addr, "100ms"))
        .await
        .unwrap();
    let after = get(addr, "/medium", "").await;
    assert_eq!(after.status, 504, "the new 100 ms timer applies at once");
    let finished = within(Duration::from_secs(10), "in-flight request", in_flight)
        .await
        .unwrap();
    assert_eq!(
        finished.status, 200,
        "the in-flight request kept its 10 s timer"
    );
    assert_eq!(finished.text(), "slow done");
}

#[tokio::test]
async fn a_burst_of_requests_across_reloads_loses_nothing() {
    let dir = scratch("reload-burst");
    let upstream = MockUpstream::new().text("/", "ok").start().await;
    let listen = format!("\"{}\"", free_port().await);
    let server = Reloadable::start(&dir, &reload_config(&listen, upstream.addr, "10s")).await;
    let addr = server.addrs[0];
    let clients: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..40 {
                    statuses.push(get(addr, "/geonature/api/x", "").await.status);
                }
                statuses
            })
        })
        .collect();
    for round in 0..10 {
        let timer = if round % 2 == 0 { "9s" } else { "10s" };
        server
            .reload_with(&reload_config(&listen, upstream.addr, timer))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut total = 0;
    for client in clients {
        let statuses = within(Duration::from_secs(30), "burst client", client)
            .await
            .unwrap();
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        total += statuses.len();
    }
    assert_eq!(total, 320);
    assert_eq!(upstream.seen.count(), 320);
}

#[tokio::test]
async fn an_invalid_config_on_reload_is_refused_and_the_old_one_stays() {
    let dir = scratch("reload-invalid");
    let upstream = MockUpstream::new()
        .delayed("/", Duration::from_millis(300), "ok")
        .start()
        .await;
    let listen = format!("\"{}\"", free_port().await);
    let server = Reloadable::start(&dir, &reload_config(&listen, upstream.addr, "10s")).await;
    let addr = server.addrs[0];
    let broken = reload_config(&listen, upstream.addr, "100ms")
        .replace("[defaults]", "[defaults]\ntypo = 1");
    let refused = server.reload_with(&broken).await.unwrap_err();
    assert!(
        refused.contains("proxy.toml:") && refused.contains("typo"),
        "{refused}"
    );
    assert_eq!(
        get(addr, "/x", "").await.status,
        200,
        "still the 10 s timer"
    );
}

#[tokio::test]
async fn a_reload_opens_new_listeners_closes_removed_ones_and_keeps_unchanged_ones() {
    let dir = scratch("reload-listeners");
    let upstream = MockUpstream::new().text("/", "ok").start().await;
    let kept = free_port().await;
    let removed = free_port().await;
    let added = free_port().await;
    let server = Reloadable::start(
        &dir,
        &reload_config(&format!("\"{kept}\", \"{removed}\""), upstream.addr, "10s"),
    )
    .await;
    // A keep-alive connection on the kept listener, opened before the reload.
    let mut early = TcpStream::connect(kept).await.unwrap();
    server
        .reload_with(&reload_config(
            &format!("\"{kept}\", \"{added}\""),
            upstream.addr,
            "10s",
        ))
        .await
        .unwrap();
    assert_eq!(
        get(added, "/x", "").await.status,
        200,
        "new listener accepts"
    );
    assert!(
        TcpStream::connect(removed).await.is_err(),
        "removed listener is closed"
    );
    use tokio::io::AsyncWriteExt;
    early
        .write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_response(&mut early).await.status,
        200,
        "connection on the kept listener survives"
    );
}

#[tokio::test]
async fn certificates_are_reread_on_reload_and_a_broken_one_keeps_the_old() {
    let dir = scratch("reload-cert");
    let first = write_certificate(&dir);
    let upstream = MockUpstream::new().text("/", "ok").start().await;
    let text = tls_config(&dir, "")
        .await
        .replace("{upstream}", &upstream.addr.to_string());
    let server = Reloadable::start(&dir, &text).await;
    let tls = server.addrs[1];
    let second = write_certificate(&dir);
    server.reload_with(&text).await.unwrap();
    assert_eq!(
        https_get(tls, &second, false, "/").await.status,
        200,
        "new certificate in use"
    );
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    let refused = server.reload_with(&text).await.unwrap_err();
    assert!(refused.contains("certificate"), "{refused}");
    assert_eq!(
        https_get(tls, &second, false, "/").await.status,
        200,
        "broken file refused, second kept"
    );
    let _ = first;
}

async fn free_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}
