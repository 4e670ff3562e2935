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
use quadrige_proxy::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

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
                tokio::spawn(async move {
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
                });
            }
        });
        RunningUpstream { addr, seen, task }
    }
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
        let addr = server.local_addrs()[0];
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestProxy {
            addr,
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
pub async fn read_response(stream: &mut TcpStream) -> RawResponse {
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
    let headers: HashMap<String, String> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
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

async fn read_exact_or_eof(stream: &mut TcpStream, buf: &mut Vec<u8>, len: usize) {
    let mut chunk = vec![0u8; 64 * 1024];
    while buf.len() < len {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn read_chunked(stream: &mut TcpStream, mut raw: Vec<u8>) -> (Vec<u8>, bool) {
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
