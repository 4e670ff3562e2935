//! Test support: an in-process mock upstream built like a router, a deliberately broken
//! raw upstream, the proxy under test, and a raw HTTP/1.1 client that reports exactly
//! what came over the wire (including transfers that were cut short).
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use quadrige_proxy::server::ListenerKind;
use quadrige_proxy::{Config, Server};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

pub type MockBody = BoxBody<Bytes, std::io::Error>;
type Handler = Arc<
    dyn Fn(
            Request<Incoming>,
            Arc<Recorded>,
        ) -> Pin<Box<dyn Future<Output = Response<MockBody>> + Send>>
        + Send
        + Sync,
>;

/// What the mock upstream saw.
#[derive(Default)]
pub struct Recorded {
    pub requests: Mutex<Vec<SeenRequest>>,
    pub connections: AtomicUsize,
    /// Bytes the upstream has produced for streamed responses.
    pub produced: AtomicU64,
    /// Bytes the upstream has consumed from request bodies.
    pub consumed: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: http::Method,
    /// The request target exactly as received.
    pub target: String,
    pub headers: HeaderMap,
}

impl Recorded {
    pub fn last(&self) -> SeenRequest {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream saw no request")
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

/// A builder-style mock upstream: `MockUpstream::new().route("/x", reply).start()`.
/// Routes match by path prefix, longest first; unmatched paths get 200 "ok".
pub struct MockUpstream {
    routes: Vec<(String, Handler)>,
}

pub struct RunningUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Recorded>,
    task: JoinHandle<()>,
}

impl Drop for RunningUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockUpstream {
    pub fn new() -> MockUpstream {
        MockUpstream { routes: Vec::new() }
    }

    pub fn route<F, Fut>(mut self, prefix: &str, handler: F) -> MockUpstream
    where
        F: Fn(Request<Incoming>, Arc<Recorded>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<MockBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req, seen| Box::pin(handler(req, seen)));
        self.routes.push((prefix.to_string(), handler));
        self.routes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        self
    }

    /// A fixed text answer.
    pub fn text(self, prefix: &str, body: &'static str) -> MockUpstream {
        self.route(
            prefix,
            move |_, _| async move { text(StatusCode::OK, body) },
        )
    }

    /// A text answer after `delay`.
    pub fn delayed(self, prefix: &str, delay: Duration, body: &'static str) -> MockUpstream {
        self.route(prefix, move |_, _| async move {
            tokio::time::sleep(delay).await;
            text(StatusCode::OK, body)
        })
    }

    pub async fn start(self) -> RunningUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Recorded::default());
        let routes = Arc::new(self.routes);
        let recorded = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                recorded.connections.fetch_add(1, Ordering::SeqCst);
                let routes = routes.clone();
                let recorded = recorded.clone();
                tokio::spawn(serve_mock(stream, routes, recorded));
            }
        });
        RunningUpstream { addr, seen, task }
    }
}

/// Serves one mock connection: records each request, then answers from the first route
/// whose prefix matches (200 "ok" when none does).
async fn serve_mock(
    stream: TcpStream,
    routes: Arc<Vec<(String, Handler)>>,
    recorded: Arc<Recorded>,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let routes = routes.clone();
        let recorded = recorded.clone();
        async move {
            recorded.requests.lock().unwrap().push(SeenRequest {
                method: req.method().clone(),
                target: req.uri().to_string(),
                headers: req.headers().clone(),
            });
            let path = req.uri().path().to_string();
            let handler = routes.iter().find(|(p, _)| path.starts_with(p.as_str()));
            let response = match handler {
                Some((_, h)) => h(req, recorded).await,
                None => text(StatusCode::OK, "ok"),
            };
            Ok::<_, Infallible>(response)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

pub fn text(status: StatusCode, body: &'static str) -> Response<MockBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
}

pub fn full(body: impl Into<Bytes>) -> MockBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A body of `total` bytes produced lazily in `chunk`-sized frames, counting what was
/// produced into `seen.produced`; byte `i` of the stream is `pattern(i)`.
pub fn counted_stream(total: u64, chunk: usize, seen: Arc<Recorded>) -> MockBody {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        let mut offset = 0u64;
        while offset < total {
            let len = chunk.min((total - offset) as usize);
            let data: Vec<u8> = (offset..offset + len as u64).map(pattern).collect();
            if tx.send(Bytes::from(data)).await.is_err() {
                return;
            }
            seen.produced.fetch_add(len as u64, Ordering::SeqCst);
            offset += len as u64;
        }
    });
    ChannelBody(rx).boxed()
}

/// A response body fed by a channel: the producer waits whenever the channel is full.
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|data| data.map(|d| Ok(Frame::data(d))))
    }
}

/// The byte at offset `i` of every generated stream: position-dependent, so a lost,
/// repeated or reordered chunk shows.
pub fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// Reads a request body to the end, counting bytes into `seen.consumed`, pausing
/// `pause` after each frame (a slow upstream), and checking every byte against
/// [`pattern`]. Returns (bytes, intact).
pub async fn drain_counted(body: Incoming, pause: Duration, seen: &Recorded) -> (u64, bool) {
    let mut body = body;
    let mut offset = 0u64;
    let mut intact = true;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return (offset, false);
        };
        if let Ok(data) = frame.into_data() {
            intact &= data
                .iter()
                .enumerate()
                .all(|(i, b)| *b == pattern(offset + i as u64));
            offset += data.len() as u64;
            seen.consumed.fetch_add(data.len() as u64, Ordering::SeqCst);
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }
    (offset, intact)
}

/// Gunicorn's own error page, as its `util.write_error` writes it when a worker fails
/// or is killed mid-request: no `Server` field, unlike every application response.
pub const GUNICORN_OWN_500: &[u8] = b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\
Content-Type: text/html\r\nContent-Length: 141\r\n\r\n<html>\n  <head>\n    \
<title>Internal Server Error</title>\n  </head>\n  <body>\n    \
<h1><p>Internal Server Error</p></h1>\n    \n  </body>\n</html>\n";

/// A deliberately broken upstream: for each connection it reads the request head, then
/// plays `script` (raw bytes to write, pauses, or a close).
#[derive(Clone)]
pub enum Step {
    Write(&'static [u8]),
    Sleep(Duration),
    /// Hold the connection open without answering.
    Stall,
    /// Close with an RST instead of a FIN.
    Reset,
    /// Read the next request head on the same connection.
    ReadHead,
}

pub async fn raw_upstream(script: Vec<Step>) -> RunningUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Recorded::default());
    let recorded = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            recorded.connections.fetch_add(1, Ordering::SeqCst);
            let script = script.clone();
            tokio::spawn(async move {
                let _ = read_head(&mut stream).await;
                for step in script {
                    match step {
                        Step::Write(bytes) => {
                            if stream.write_all(bytes).await.is_err() {
                                return;
                            }
                        }
                        Step::Sleep(d) => tokio::time::sleep(d).await,
                        Step::Stall => std::future::pending::<()>().await,
                        Step::ReadHead => {
                            if read_head(&mut stream).await.is_err() {
                                return;
                            }
                        }
                        Step::Reset => {
                            // SO_LINGER 0 makes close send RST; it does not block then.
                            #[allow(deprecated)]
                            let _ = stream.set_linger(Some(Duration::ZERO));
                            return;
                        }
                    }
                }
            });
        }
    });
    RunningUpstream { addr, seen, task }
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    Ok(head)
}

/// The proxy under test, listening on an ephemeral loopback port.
pub struct TestProxy {
    pub addr: SocketAddr,
    /// The HTTPS listener, when the config has one.
    pub tls_addr: Option<SocketAddr>,
    /// The admin listener, when the config has one.
    pub admin_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<()>,
}

impl TestProxy {
    /// Starts the proxy on `toml`, where `{upstream}` stands for `upstream`'s address.
    /// `[server]` is added when the text has none, listening on port 0.
    pub async fn start(toml: &str, upstream: SocketAddr) -> TestProxy {
        let mut text = toml.replace("{upstream}", &upstream.to_string());
        if !text.contains("[server]") {
            text = format!("[server]\nlisten = [\"127.0.0.1:0\"]\n{text}");
        }
        if !text.contains("[log]") {
            text.push_str("\n[log]\naccess = \"off\"\n");
        }
        let config = Config::parse(&text, Path::new("test.toml")).expect("test config is valid");
        let server = Server::bind(&config).await.expect("proxy binds");
        let bound = server.bound_addrs();
        let of = |kind| bound.iter().find(|(k, _)| *k == kind).map(|(_, a)| *a);
        let addr = of(ListenerKind::Plain).expect("a plain listener");
        let tls_addr = of(ListenerKind::Tls);
        let admin_addr = of(ListenerKind::Admin);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestProxy {
            addr,
            tls_addr,
            admin_addr,
            stop: Some(stop),
            task,
        }
    }

    /// Starts the graceful shutdown; await `task` to see it finish.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The simplest config: everything to `{upstream}` with the given default timeouts.
pub fn config_with_defaults(timeouts: &str) -> String {
    format!("[upstreams.gn]\naddress = \"{{upstream}}\"\n[defaults]\ntimeouts = {timeouts}\n")
}

/// A response as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// Whether the body ended properly (Content-Length reached or final chunk seen).
    pub complete: bool,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends raw bytes and reads one response (for HEAD requests pass `head = true`).
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_response(&mut stream).await
}

/// `GET path` with extra header lines (each ending in `\r\n`).
pub async fn get(addr: SocketAddr, path: &str, headers: &str) -> RawResponse {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: proxy.test\r\n{headers}Connection: close\r\n\r\n");
    raw_request(addr, request.as_bytes()).await
}

/// `POST path` with a body and extra header lines.
pub async fn post(addr: SocketAddr, path: &str, headers: &str, body: &[u8]) -> RawResponse {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: proxy.test\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    raw_request(addr, &request).await
}

/// Reads one response; the body ends at Content-Length, the final chunk, or EOF.
pub async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> RawResponse {
    let mut buf = Vec::new();
    let head_len = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = parsed.parse(&buf) {
            break n;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            panic!(
                "connection closed before a response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    parsed.parse(&buf).unwrap();
    let status = parsed.code.unwrap();
    let headers = header_map(parsed.headers);
    let mut rest = buf[head_len..].to_vec();
    let (body, complete) = if status == 204 || status == 304 || (100..200).contains(&status) {
        (Vec::new(), true)
    } else if let Some(len) = headers.get("content-length") {
        let len: usize = len.parse().unwrap();
        read_exact_or_eof(stream, &mut rest, len).await;
        let complete = rest.len() >= len;
        rest.truncate(len);
        (rest, complete)
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        read_chunked(stream, rest).await
    } else {
        let _ = stream.read_to_end(&mut rest).await;
        (rest, true)
    };
    RawResponse {
        status,
        headers,
        body,
        complete,
    }
}

async fn read_exact_or_eof<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>, len: usize) {
    let mut chunk = vec![0u8; 64 * 1024];
    while buf.len() < len {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn read_chunked<S: AsyncRead + Unpin>(stream: &mut S, mut raw: Vec<u8>) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Parse as many complete chunks as the buffer holds.
        while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&raw[..line_end]).to_string();
            let size =
                usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                return (body, true);
            }
            if raw.len() < line_end + 2 + size + 2 {
                break;
            }
            body.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
            raw.drain(..line_end + 2 + size + 2);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return (body, false),
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Bounds a test step in time so a regression fails instead of hanging CI.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

// ---------------------------------------------------------------------------------------
// Helpers for the streaming, header and lifecycle tests.
// ---------------------------------------------------------------------------------------

/// Reads a response head only, for responses that carry no body (HEAD, 204, 304) or
/// whose body the caller reads itself. Returns the head (with an empty body) and the
/// bytes that arrived after it.
pub async fn read_response_head(stream: &mut TcpStream) -> (RawResponse, Vec<u8>) {
    let mut buf = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = parsed.parse(&buf) {
            let head = RawResponse {
                status: parsed.code.unwrap(),
                headers: parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
                body: Vec::new(),
                complete: true,
            };
            return (head, buf[n..].to_vec());
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            panic!(
                "connection closed before a response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Checks a stream of bytes against [`pattern`] with slice comparisons (fast enough for
/// a GiB): feed it every piece in order.
pub struct PatternCheck {
    /// How many bytes were checked.
    pub offset: u64,
    /// Whether every byte so far matched.
    pub intact: bool,
    table: Vec<u8>,
}

impl PatternCheck {
    pub fn new() -> PatternCheck {
        PatternCheck {
            offset: 0,
            intact: true,
            table: pattern_bytes(1 << 20),
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let start = (self.offset % 251) as usize;
            let len = data.len().min(self.table.len() - 251);
            if data[..len] != self.table[start..start + len] {
                self.intact = false;
            }
            self.offset += len as u64;
            data = &data[len..];
        }
    }
}

impl Default for PatternCheck {
    fn default() -> Self {
        PatternCheck::new()
    }
}

/// The first `len` bytes of the [`pattern`] stream. Since the pattern repeats every 251
/// bytes, a buffer whose length is a multiple of 251 can be sent again and again.
pub fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len as u64).map(pattern).collect()
}

/// Like [`drain_counted`], but the upstream is slow only for `slow_for`, reading at
/// about `slow_rate` bytes per second (it sleeps after each frame for as long as the
/// frame takes at that rate), then reads at full speed.
pub async fn drain_slow_then_fast(
    body: Incoming,
    slow_for: Duration,
    slow_rate: u64,
    seen: &Recorded,
) -> (u64, bool) {
    let mut body = body;
    let started = std::time::Instant::now();
    let mut check = PatternCheck::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return (check.offset, false);
        };
        if let Ok(data) = frame.into_data() {
            check.feed(&data);
            seen.consumed.fetch_add(data.len() as u64, Ordering::SeqCst);
            if started.elapsed() < slow_for {
                let pause = data.len() as f64 / slow_rate as f64;
                tokio::time::sleep(Duration::from_secs_f64(pause)).await;
            }
        }
    }
    (check.offset, check.intact)
}

/// An upstream that keeps connections alive between requests but closes each one after
/// `idle_close` without a new request (like Gunicorn's `--keep-alive`). It answers
/// every request with 200 "ok".
pub async fn closing_keepalive_upstream(idle_close: Duration) -> RunningUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Recorded::default());
    let recorded = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            recorded.connections.fetch_add(1, Ordering::SeqCst);
            let recorded = recorded.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let recorded = recorded.clone();
                    async move {
                        recorded.requests.lock().unwrap().push(SeenRequest {
                            method: req.method().clone(),
                            target: req.uri().to_string(),
                            headers: req.headers().clone(),
                        });
                        Ok::<_, Infallible>(text(StatusCode::OK, "ok"))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(idle_close)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    RunningUpstream { addr, seen, task }
}

/// A loopback port that was free a moment ago (for a process that must bind it itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A new empty directory under the system temp dir, unique to this process and call.
pub fn temp_dir(label: &str) -> std::path::PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "quadrige-proxy-test-{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits (bounded) until `condition` holds, polling every 10 ms.
pub async fn eventually(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    within(limit, what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------
// Helpers for the timer and error tests.

/// Runs `future` and says how long it took.
pub async fn timed<T>(future: impl Future<Output = T>) -> (T, Duration) {
    let start = tokio::time::Instant::now();
    let value = future.await;
    (value, start.elapsed())
}

/// Opens a connection to `addr` and sends `request` (the caller reads the answer).
pub async fn open(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    stream
}

/// A connection whose receive buffer is small (the kernel doubles `size`), so a client
/// that stops reading makes the sender block quickly.
pub async fn connect_with_small_receive_buffer(addr: SocketAddr, size: u32) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(size).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Waits, without consuming anything, until a complete response head has arrived.
pub async fn wait_for_head(stream: &TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = stream.peek(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before a response head");
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Asserts that the peer has closed (or reset) the connection: nothing more to read.
pub async fn assert_closed(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    let read = within(
        Duration::from_secs(2),
        "reading to the end of a closed connection",
        stream.read_to_end(&mut rest),
    )
    .await;
    if read.is_ok() {
        assert!(
            rest.is_empty(),
            "unexpected bytes after the response: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

/// A loopback address nothing listens on: a port bound then released.
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A loopback listener that never accepts, with its accept queue filled: the kernel
/// drops new SYNs, so a connect to it neither succeeds nor fails until the client gives
/// up. Keep the returned values alive for as long as the address must stay silent.
pub async fn unanswering_addr() -> (SocketAddr, TcpListener, Vec<TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => queued.push(stream),
            Ok(Err(e)) => panic!("connecting to fill the accept queue failed: {e}"),
            Err(_) => return (addr, listener, queued),
        }
    }
    panic!("the accept queue of a listen(1) socket never filled: SYNs are not dropped here");
}

/// The string value of `"key":"..."` in a flat JSON object (no unescaping).
pub fn json_str(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let rest = &json[start..];
    let mut end = 0;
    let bytes = rest.as_bytes();
    while end < bytes.len() {
        match bytes[end] {
            b'\\' => end += 2,
            b'"' => return Some(rest[..end].to_string()),
            _ => end += 1,
        }
    }
    None
}

/// An endless response body: `piece`, then another every `every` (an upstream that
/// streams slowly forever). It stops when the receiving side goes away.
pub fn trickle_stream(piece: &'static [u8], every: Duration) -> MockBody {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        loop {
            if tx.send(Bytes::from_static(piece)).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    ChannelBody(rx).boxed()
}

/// How a [`watched_stream`] producer ended.
#[derive(Debug, Clone, Copy)]
pub struct StreamEnd {
    /// Bytes handed to the response body.
    pub produced: u64,
    /// Whether the response body was dropped before the end (its connection failed).
    pub cut: bool,
    pub at: tokio::time::Instant,
}

/// Like [`counted_stream`], and reports on `ended` how and when the producer stopped.
pub fn watched_stream(
    total: u64,
    chunk: usize,
    seen: Arc<Recorded>,
    ended: mpsc::UnboundedSender<StreamEnd>,
) -> MockBody {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        let mut offset = 0u64;
        let mut cut = false;
        while offset < total {
            let len = chunk.min((total - offset) as usize);
            let data: Vec<u8> = (offset..offset + len as u64).map(pattern).collect();
            if tx.send(Bytes::from(data)).await.is_err() {
                cut = true;
                break;
            }
            seen.produced.fetch_add(len as u64, Ordering::SeqCst);
            offset += len as u64;
        }
        let _ = ended.send(StreamEnd {
            produced: offset,
            cut,
            at: tokio::time::Instant::now(),
        });
    });
    ChannelBody(rx).boxed()
}

// ---------------------------------------------------------------------------------
// Helpers for the hostile-input and fault tests.

/// What a [`recording_upstream`] read off the wire, connection by connection.
#[derive(Default)]
pub struct Wire {
    /// Every byte read, per connection, in accept order.
    pub connections: Mutex<Vec<Vec<u8>>>,
    /// Complete requests parsed (and answered), in order: `METHOD target body-length`.
    pub requests: Mutex<Vec<String>>,
    /// Connections whose peer (the proxy) closed or reset them.
    pub closed: AtomicUsize,
}

impl Wire {
    /// Every byte read, all connections concatenated in accept order.
    pub fn all_bytes(&self) -> Vec<u8> {
        self.connections.lock().unwrap().concat()
    }

    pub fn connection_count(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// The requests parsed from everything read, and the bytes that do not form one.
    pub fn split(&self) -> (Vec<WireRequest>, Vec<u8>) {
        let mut requests = Vec::new();
        let mut rest = Vec::new();
        for bytes in self.connections.lock().unwrap().iter() {
            let (mut found, left) = split_requests(bytes);
            requests.append(&mut found);
            rest.extend_from_slice(&left);
        }
        (requests, rest)
    }
}

/// One request as an upstream received it.
#[derive(Debug, Clone)]
pub struct WireRequest {
    /// The request line and headers, exactly as received (with the blank line).
    pub head: Vec<u8>,
    pub method: String,
    pub target: String,
    /// Names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body exactly as framed on the wire (chunk sizes and all).
    pub raw_body: Vec<u8>,
    /// The body with its framing removed.
    pub body: Vec<u8>,
}

impl WireRequest {
    /// Every value of header `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The only value of header `name` (panics when there are several).
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(all.len() <= 1, "several `{name}` headers: {all:?}");
        all.first().copied()
    }
}

/// Parses as many complete HTTP/1.1 requests as `bytes` holds, strictly (CRLF line
/// ends, Content-Length or a final `chunked` framing); returns them and the rest.
pub fn split_requests(bytes: &[u8]) -> (Vec<WireRequest>, Vec<u8>) {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some((request, used)) = parse_wire_request(&bytes[at..]) {
        found.push(request);
        at += used;
    }
    (found, bytes[at..].to_vec())
}

/// One complete request at the start of `bytes`, with the number of bytes it used.
pub fn parse_wire_request(bytes: &[u8]) -> Option<(WireRequest, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let head = &bytes[..head_len];
    // Strict: every line ends in CRLF and no bare CR or LF hides anywhere.
    let strict = head.iter().enumerate().all(|(i, b)| match b {
        b'\r' => head.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && head[i - 1] == b'\r',
        _ => true,
    });
    if !strict {
        return None;
    }
    let pairs: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let request = |raw_body: Vec<u8>, body: Vec<u8>| WireRequest {
        head: head.to_vec(),
        method: parsed.method.unwrap_or_default().to_string(),
        target: parsed.path.unwrap_or_default().to_string(),
        headers: pairs.clone(),
        raw_body,
        body,
    };
    let rest = &bytes[head_len..];
    let te: Vec<&str> = pairs
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .map(|(_, v)| v.as_str())
        .collect();
    if !te.is_empty() {
        if te.len() != 1 || !te[0].eq_ignore_ascii_case("chunked") {
            return None;
        }
        let (used, body) = decode_chunked_strictly(rest)?;
        return Some((request(rest[..used].to_vec(), body), head_len + used));
    }
    let lengths: Vec<&str> = pairs
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    let len = match lengths.as_slice() {
        [] => 0,
        [one] => one.parse::<usize>().ok()?,
        _ => return None,
    };
    if rest.len() < len {
        return None;
    }
    let body = rest[..len].to_vec();
    Some((request(body.clone(), body), head_len + len))
}

/// A complete chunked body at the start of `bytes` (no extensions, no trailers): the
/// bytes it used and the decoded content.
pub fn decode_chunked_strictly(bytes: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut at = 0;
    let mut body = Vec::new();
    loop {
        let line_end = at + bytes[at..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&bytes[at..line_end]).ok()?;
        if size_text.is_empty() || !size_text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let size = usize::from_str_radix(size_text, 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            return (bytes.get(at..at + 2)? == b"\r\n").then_some((at + 2, body));
        }
        body.extend_from_slice(bytes.get(at..at + size)?);
        at += size;
        if bytes.get(at..at + 2)? != b"\r\n" {
            return None;
        }
        at += 2;
    }
}

/// A [`recording_upstream`]; dropping it closes its listener and every connection.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    pub wire: Arc<Wire>,
    task: JoinHandle<()>,
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A raw upstream that keeps every byte it reads (see [`Wire`]) and answers each
/// complete request, after `delay`, with `200` and the body `METHOD target body-length`.
/// Bytes that do not parse as a request are kept but never answered.
pub async fn recording_upstream(delay: Duration) -> RecordingUpstream {
    start_recording(move |mut stream, wire, index| async move {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            wire.connections.lock().unwrap()[index].extend_from_slice(&chunk[..n]);
            buf.extend_from_slice(&chunk[..n]);
            while let Some((request, used)) = parse_wire_request(&buf) {
                buf.drain(..used);
                let summary =
                    format!("{} {} {}", request.method, request.target, request.body.len());
                wire.requests.lock().unwrap().push(summary.clone());
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{summary}",
                    summary.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
        wire.closed.fetch_add(1, Ordering::SeqCst);
    })
    .await
}

/// A parsed head's fields, names lowercased.
fn header_map(fields: &[httparse::Header<'_>]) -> HashMap<String, String> {
    fields
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// Every response in `bytes`, in order, and the bytes after the last complete one.
pub fn parse_responses(mut bytes: &[u8]) -> (Vec<RawResponse>, Vec<u8>) {
    let mut found = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = parsed.parse(bytes) else {
            break;
        };
        let status = parsed.code.unwrap();
        let headers = header_map(parsed.headers);
        let rest = &bytes[head_len..];
        let (body, used, complete) = if status == 204 || status == 304 || status < 200 {
            (Vec::new(), 0, true)
        } else if let Some(len) = headers.get("content-length") {
            let len: usize = len.parse().unwrap();
            let take = len.min(rest.len());
            (rest[..take].to_vec(), take, take == len)
        } else if headers
            .get("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            match decode_chunked_strictly(rest) {
                Some((used, body)) => (body, used, true),
                None => (rest.to_vec(), rest.len(), false),
            }
        } else {
            (rest.to_vec(), rest.len(), true)
        };
        found.push(RawResponse {
            status,
            headers,
            body,
            complete,
        });
        bytes = &rest[used..];
        if !complete {
            break;
        }
    }
    (found, bytes.to_vec())
}

/// Reads until the peer closes (or resets) the connection, for at most `limit`.
/// Returns the bytes and whether the connection was closed within the limit.
pub async fn read_until_close(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return (bytes, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (bytes, true),
            Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends `request` on a new connection, then reads everything until the proxy closes
/// it (at most `limit`): the responses parsed, and whether it closed.
pub async fn exchange_raw(
    addr: SocketAddr,
    request: &[u8],
    limit: Duration,
) -> (Vec<RawResponse>, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let (bytes, closed) = read_until_close(&mut stream, limit).await;
    let (responses, _) = parse_responses(&bytes);
    (responses, closed)
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Tasks alive on the current tokio runtime.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Open descriptors and live tasks, to compare before and after a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub fds: usize,
    pub tasks: usize,
}

impl Resources {
    pub fn now() -> Resources {
        Resources {
            fds: open_fds(),
            tasks: alive_tasks(),
        }
    }

    /// Waits (bounded) until descriptors and tasks are back to at most this baseline;
    /// panics with both counts when they are not.
    pub async fn settle_back(self, limit: Duration, what: &str) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let now = Resources::now();
            if now.fds <= self.fds && now.tasks <= self.tasks {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("{what}: leaked resources: baseline {self:?}, after {now:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A mock upstream that can be killed outright: [`KillableUpstream::kill`] closes the
/// listener and every open connection at once, like a restarted Gunicorn.
pub struct KillableUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Recorded>,
    task: JoinHandle<()>,
}

impl KillableUpstream {
    pub fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for KillableUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockUpstream {
    /// Starts on `addr` (port 0 for any), with every connection owned by the server's
    /// task so that [`KillableUpstream::kill`] ends them all.
    pub async fn start_killable(self, addr: SocketAddr) -> KillableUpstream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        let listener = socket.listen(1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Recorded::default());
        let routes = Arc::new(self.routes);
        let recorded = seen.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                recorded.connections.fetch_add(1, Ordering::SeqCst);
                let routes = routes.clone();
                let recorded = recorded.clone();
                connections.spawn(serve_mock(stream, routes, recorded));
                while connections.try_join_next().is_some() {}
            }
        });
        KillableUpstream { addr, seen, task }
    }
}

/// A scripted raw upstream like [`raw_upstream`], except that it keeps every byte it
/// reads in a [`Wire`], that [`Step::Stall`] waits (still reading) until the proxy
/// closes the connection, which [`Wire::closed`] then counts, and that the connection
/// is closed when the script ends. Dropping it ends every connection.
pub async fn scripted_upstream(script: Vec<Step>) -> RecordingUpstream {
    start_recording(move |mut stream, wire, index| {
        let script = script.clone();
        async move {
            let mut chunk = vec![0u8; 64 * 1024];
            // The request head first.
            loop {
                let n = match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        wire.closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Ok(n) => n,
                };
                let mut all = wire.connections.lock().unwrap();
                all[index].extend_from_slice(&chunk[..n]);
                if all[index].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            for step in script {
                match step {
                    Step::Write(bytes) => {
                        if stream.write_all(bytes).await.is_err() {
                            return;
                        }
                    }
                    Step::Sleep(d) => tokio::time::sleep(d).await,
                    Step::ReadHead => match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            wire.connections.lock().unwrap()[index].extend_from_slice(&chunk[..n])
                        }
                    },
                    Step::Stall => loop {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                wire.closed.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(n) => wire.connections.lock().unwrap()[index]
                                .extend_from_slice(&chunk[..n]),
                        }
                    },
                    Step::Reset => {
                        #[allow(deprecated)]
                        let _ = stream.set_linger(Some(Duration::ZERO));
                        return;
                    }
                }
            }
        }
    })
    .await
}

/// Accepts connections for a recording upstream: each gets its slot in
/// `Wire::connections` and is served by `serve(stream, wire, slot)`; finished connection
/// tasks are reaped as it goes, and dropping the upstream ends them all.
async fn start_recording<F, Fut>(serve: F) -> RecordingUpstream
where
    F: Fn(TcpStream, Arc<Wire>, usize) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let wire = Arc::new(Wire::default());
    let recorded = wire.clone();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let index = {
                let mut all = recorded.connections.lock().unwrap();
                all.push(Vec::new());
                all.len() - 1
            };
            connections.spawn(serve(stream, recorded.clone(), index));
            while connections.try_join_next().is_some() {}
        }
    });
    RecordingUpstream { addr, wire, task }
}

/// Sends a value on `tx` when dropped: put one in a handler to learn that hyper dropped
/// (cancelled) it.
pub struct DropSignal(pub Option<oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------------------------
// TLS clients.

/// Writes a fresh self-signed certificate for `localhost`; returns its DER.
pub fn write_certificate(dir: &Path) -> CertificateDer<'static> {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), generated.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), generated.signing_key.serialize_pem()).unwrap();
    generated.cert.der().clone()
}

/// Opens a TLS connection trusting only `trusted`, offering `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    trusted: &CertificateDer<'static>,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the proxy")
}
