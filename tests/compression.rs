//! On-the-fly compression: gzip and brotli negotiation (q-values, q=0), the exclusions
//! (small bodies, other types, already encoded, ranges, ZIP, HEAD, no-transform), Vary
//! merging and ETag weakening, static files compressed when they have no precompressed
//! sibling, a large GeoJSON export streamed with the producer held back, a slow trickle
//! flushed to the client at once, and a failing upstream that aborts the transfer.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

const JSON_TYPES: &str = r#"types = ["application/json", "application/geo+json"]"#;

fn config() -> String {
    format!(
        r#"
[upstreams.gn]
address = "{{upstream}}"
[defaults]
compress = {{ {JSON_TYPES}, min_size = "1KiB" }}
[[routes]]
name = "gzip-only"
match = {{ path_prefix = "/gzip-only/" }}
compress = {{ types = ["application/json"], algorithms = ["gzip"] }}
[[routes]]
name = "gzip-first"
match = {{ path_prefix = "/gzip-first/" }}
compress = {{ types = ["application/json"], algorithms = ["gzip", "br"] }}
[[routes]]
name = "uncompressed"
match = {{ path_prefix = "/uncompressed/" }}
compress = {{ types = [] }}
"#
    )
}

/// A JSON document of about `len` bytes, repetitive enough to compress well.
fn json_body(len: usize) -> Vec<u8> {
    let mut out = b"[".to_vec();
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(
            format!("{{\"id\":{i},\"nom\":\"Observation {i}\",\"valide\":true}},").as_bytes(),
        );
        i += 1;
    }
    out.push(b']');
    out
}

fn answer(
    content_type: &str,
    extra: &[(&'static str, &str)],
    status: StatusCode,
    body: Vec<u8>,
) -> Response<MockBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("content-type", content_type.parse().unwrap());
    for (name, value) in extra {
        headers.append(*name, value.parse().unwrap());
    }
    response
}

/// An upstream answering by path with the usual GeoNature kinds of responses.
async fn upstream() -> RunningUpstream {
    let json = || json_body(20_000);
    MockUpstream::new()
        .route("/", move |_, _| async move {
            answer("application/json", &[], StatusCode::OK, json())
        })
        .route("/geojson", move |_, _| async move {
            answer(
                "application/geo+json; charset=utf-8",
                &[],
                StatusCode::OK,
                json(),
            )
        })
        .route("/small", |_, _| async {
            answer("application/json", &[], StatusCode::OK, json_body(500))
        })
        .route("/html", move |_, _| async move {
            answer("text/html", &[], StatusCode::OK, json())
        })
        .route("/zip", move |_, _| async move {
            answer("application/zip", &[], StatusCode::OK, json())
        })
        .route("/encoded", |_, _| async {
            answer(
                "application/json",
                &[("content-encoding", "gzip")],
                StatusCode::OK,
                gzip(&json_body(20_000)),
            )
        })
        .route("/range", move |_, _| async move {
            let body = json();
            let range = format!("bytes 0-{}/99999", body.len() - 1);
            answer(
                "application/json",
                &[("content-range", &range)],
                StatusCode::PARTIAL_CONTENT,
                body,
            )
        })
        .route("/vary", move |_, _| async move {
            answer(
                "application/json",
                &[("vary", "Origin"), ("vary", "Cookie")],
                StatusCode::OK,
                json(),
            )
        })
        .route("/etag", move |_, _| async move {
            answer(
                "application/json",
                &[("etag", "\"v42\"")],
                StatusCode::OK,
                json(),
            )
        })
        .route("/no-transform", move |_, _| async move {
            answer(
                "application/json",
                &[("cache-control", "private, no-transform")],
                StatusCode::OK,
                json(),
            )
        })
        .route("/created", move |_, _| async move {
            answer("application/json", &[], StatusCode::CREATED, json())
        })
        .route("/not-found", move |_, _| async move {
            answer("application/json", &[], StatusCode::NOT_FOUND, json())
        })
        .start()
        .await
}

async fn setup() -> (RunningUpstream, TestProxy) {
    let up = upstream().await;
    let proxy = TestProxy::start(&config(), up.addr).await;
    (up, proxy)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(data), &mut out)
        .expect("valid gzip");
    out
}

fn unbrotli(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut brotli::Decompressor::new(data, 4096), &mut out)
        .expect("valid brotli");
    out
}

async fn fetch(proxy: &TestProxy, path: &str, accept: &str) -> RawResponse {
    get(proxy.addr, path, &format!("Accept-Encoding: {accept}\r\n")).await
}

/// The access log line of the first request for `target`, once the writer has it.
async fn logged(log: &std::path::Path, target: &str) -> String {
    let wanted = format!("\"GET {target} HTTP/1.1\" ");
    for _ in 0..100 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(&wanted)) {
            return line.to_string();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no access log line for {target}");
}

#[tokio::test]
async fn the_access_log_counts_the_compressed_bytes_sent() {
    let dir = std::env::temp_dir().join(format!("qp-compress-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let _ = std::fs::remove_file(&log);
    let up = upstream().await;
    let toml = format!("{}\n[log]\naccess = \"{}\"\n", config(), log.display());
    let proxy = TestProxy::start(&toml, up.addr).await;
    let gz = fetch(&proxy, "/api/synthese?logged=gzip", "gzip").await;
    let identity = fetch(&proxy, "/api/synthese?logged=identity", "identity").await;
    assert!(gz.body.len() < identity.body.len());
    let gz_line = logged(&log, "/api/synthese?logged=gzip").await;
    assert!(
        gz_line.contains(&format!("\" 200 {} ", gz.body.len())),
        "{gz_line}"
    );
    let identity_line = logged(&log, "/api/synthese?logged=identity").await;
    assert!(
        identity_line.contains(&format!("\" 200 {} ", identity.body.len())),
        "{identity_line}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn gzip_and_brotli_are_negotiated_and_decode_to_the_original() {
    let (_up, proxy) = setup().await;
    let original = json_body(20_000);
    let gz = fetch(&proxy, "/api/synthese", "gzip").await;
    assert_eq!(gz.status, 200);
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(gz.header("content-length"), None);
    assert_eq!(gz.header("vary"), Some("Accept-Encoding"));
    assert!(gz.complete);
    assert_eq!(gunzip(&gz.body), original);
    assert!(
        gz.body.len() < original.len() / 4,
        "gzip: {} -> {}",
        original.len(),
        gz.body.len()
    );

    let br = fetch(&proxy, "/api/synthese", "gzip, deflate, br").await;
    assert_eq!(
        br.header("content-encoding"),
        Some("br"),
        "brotli is preferred by default"
    );
    assert_eq!(unbrotli(&br.body), original);

    let preferred = fetch(&proxy, "/api/synthese", "br;q=0.5, gzip").await;
    assert_eq!(
        preferred.header("content-encoding"),
        Some("gzip"),
        "the client's q-values rank first"
    );
    let operator = fetch(&proxy, "/gzip-first/x", "br, gzip").await;
    assert_eq!(
        operator.header("content-encoding"),
        Some("gzip"),
        "then the route's order"
    );
    let geojson = fetch(&proxy, "/geojson", "gzip").await;
    assert_eq!(
        geojson.header("content-encoding"),
        Some("gzip"),
        "parameters ignored in the type"
    );
    assert_eq!(
        geojson.header("content-type"),
        Some("application/geo+json; charset=utf-8")
    );
    let created = fetch(&proxy, "/created", "gzip").await;
    assert_eq!(created.header("content-encoding"), Some("gzip"));
}

#[tokio::test]
async fn q_zero_and_unknown_codings_are_respected() {
    let (_up, proxy) = setup().await;
    let original = json_body(20_000);
    for accept in [
        "gzip;q=0, br;q=0",
        "identity",
        "deflate",
        "*;q=0",
        "gzip;q=0, br;q=0.0",
    ] {
        let r = fetch(&proxy, "/api/synthese", accept).await;
        assert_eq!(r.header("content-encoding"), None, "{accept}");
        assert_eq!(r.body, original, "{accept}");
        assert_eq!(
            r.header("vary"),
            Some("Accept-Encoding"),
            "{accept}: still varies"
        );
    }
    let no_header = get(proxy.addr, "/api/synthese", "").await;
    assert_eq!(no_header.header("content-encoding"), None);
    let star = fetch(&proxy, "/api/synthese", "*").await;
    assert_eq!(star.header("content-encoding"), Some("br"));
    let only_gzip = fetch(&proxy, "/gzip-only/x", "br").await;
    assert_eq!(
        only_gzip.header("content-encoding"),
        None,
        "br is not offered on this route"
    );
    let br_refused = fetch(&proxy, "/api/synthese", "br;q=0, gzip").await;
    assert_eq!(br_refused.header("content-encoding"), Some("gzip"));
}

#[tokio::test]
async fn what_must_not_be_compressed_is_passed_through_untouched() {
    let (_up, proxy) = setup().await;
    let accept = "gzip, br";
    let small = fetch(&proxy, "/small", accept).await;
    assert_eq!(
        (small.header("content-encoding"), small.header("vary")),
        (None, None),
        "below min_size"
    );
    assert_eq!(
        small.header("content-length"),
        Some(small.body.len().to_string().as_str())
    );
    for path in [
        "/html",
        "/zip",
        "/not-found",
        "/uncompressed/x",
        "/no-transform",
    ] {
        let r = fetch(&proxy, path, accept).await;
        assert_eq!(r.header("content-encoding"), None, "{path}");
        assert_eq!(r.body, json_body(20_000), "{path}");
        assert!(r.header("content-length").is_some(), "{path}");
    }
    let encoded = fetch(&proxy, "/encoded", accept).await;
    assert_eq!(
        encoded.header("content-encoding"),
        Some("gzip"),
        "not encoded twice"
    );
    assert_eq!(gunzip(&encoded.body), json_body(20_000));
    let range = fetch(&proxy, "/range", accept).await;
    assert_eq!(range.status, 206);
    assert_eq!(range.header("content-encoding"), None);
    assert_eq!(range.body, json_body(20_000));
}

#[tokio::test]
async fn head_is_never_compressed_but_says_it_varies() {
    let (_up, proxy) = setup().await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"HEAD /api/synthese HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    within(Duration::from_secs(5), "HEAD", stream.read_to_end(&mut raw))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(!text.contains("content-encoding"), "{text}");
    assert!(text.contains("vary: accept-encoding"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "HEAD carried a body: {text}");
}

#[tokio::test]
async fn vary_is_merged_and_a_strong_etag_weakened() {
    let (_up, proxy) = setup().await;
    let vary = fetch(&proxy, "/vary", "gzip").await;
    assert_eq!(vary.header("content-encoding"), Some("gzip"));
    assert_eq!(vary.header("vary"), Some("Origin, Cookie, Accept-Encoding"));
    let etag = fetch(&proxy, "/etag", "gzip").await;
    assert_eq!(etag.header("etag"), Some("W/\"v42\""));
    let identity = fetch(&proxy, "/etag", "identity").await;
    assert_eq!(
        identity.header("etag"),
        Some("\"v42\""),
        "the identity bytes keep the strong tag"
    );
}

// ---------------------------------------------------------------------------------------
// Static routes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn static_files_are_compressed_on_the_fly_unless_a_sibling_is_served() {
    let dir = std::env::temp_dir().join(format!("qp-compress-static-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = json_body(30_000);
    std::fs::write(dir.join("data.json"), &data).unwrap();
    std::fs::write(dir.join("app.js"), &data).unwrap();
    std::fs::write(dir.join("app.js.gz"), gzip(&data)).unwrap();
    std::fs::write(dir.join("archive.zip"), &data).unwrap();
    let toml = format!(
        "[upstreams.gn]\naddress = \"{{upstream}}\"\n[[routes]]\nname = \"files\"\nmatch = {{ path_prefix = \"/files/\" }}\nstatic = {{ root = \"{}\", strip_prefix = \"/files\" }}\ncompress = {{ types = [\"application/json\", \"text/javascript\"] }}\n",
        dir.display()
    );
    let up = MockUpstream::new().start().await;
    let proxy = TestProxy::start(&toml, up.addr).await;

    let json = fetch(&proxy, "/files/data.json", "br").await;
    assert_eq!(json.header("content-encoding"), Some("br"));
    assert_eq!(
        json.header("accept-ranges"),
        None,
        "no ranges of a compressed stream"
    );
    assert!(json.header("etag").is_some_and(|e| e.starts_with("W/")));
    assert_eq!(unbrotli(&json.body), data);
    let sibling = fetch(&proxy, "/files/app.js", "gzip").await;
    assert_eq!(sibling.header("content-encoding"), Some("gzip"));
    assert_eq!(
        sibling.body,
        std::fs::read(dir.join("app.js.gz")).unwrap(),
        "the sibling, as is"
    );
    let zip = fetch(&proxy, "/files/archive.zip", "gzip, br").await;
    assert_eq!(
        (zip.header("content-encoding"), zip.body.len()),
        (None, data.len())
    );
    let range = get(
        proxy.addr,
        "/files/data.json",
        "Accept-Encoding: gzip\r\nRange: bytes=0-9\r\n",
    )
    .await;
    assert_eq!(
        (range.status, range.header("content-encoding")),
        (206, None)
    );
    assert_eq!(range.header("vary"), Some("Accept-Encoding"));
    let etag = fetch(&proxy, "/files/data.json", "identity")
        .await
        .header("etag")
        .unwrap()
        .to_string();
    let revalidated = get(
        proxy.addr,
        "/files/data.json",
        &format!("Accept-Encoding: gzip\r\nIf-None-Match: {etag}\r\n"),
    )
    .await;
    assert_eq!(revalidated.status, 304);
    assert_eq!(
        revalidated.header("vary"),
        Some("Accept-Encoding"),
        "a 304 carries the Vary of its 200"
    );
    assert_eq!(up.seen.count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------

/// A response read piece by piece off a raw socket.
struct ChunkedClient {
    stream: TcpStream,
    raw: Vec<u8>,
    finished: bool,
}

impl ChunkedClient {
    /// Sends a GET and reads the head of a chunked response.
    async fn get(addr: SocketAddr, path: &str, accept: &str) -> (ChunkedClient, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: {accept}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        let client = ChunkedClient {
            stream,
            raw: raw[end..].to_vec(),
            finished: false,
        };
        (client, head)
    }

    /// The next piece of body data; `None` at the final chunk. Panics on a cut stream
    /// unless `Err` is wanted: returns `Err(())` when the connection ends mid-body.
    async fn next(&mut self) -> Result<Option<Vec<u8>>, ()> {
        loop {
            if let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") {
                let size_text = String::from_utf8_lossy(&self.raw[..line_end]).to_string();
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
                if size == 0 {
                    self.finished = true;
                    return Ok(None);
                }
                if self.raw.len() >= line_end + 2 + size + 2 {
                    let data = self.raw[line_end + 2..line_end + 2 + size].to_vec();
                    self.raw.drain(..line_end + 2 + size + 2);
                    return Ok(Some(data));
                }
            }
            let mut buf = vec![0u8; 64 * 1024];
            match self.stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Err(()),
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
            }
        }
    }
}

/// A streaming decoder for either coding, for checking data as it arrives.
enum Decoder {
    Gzip(Box<flate2::write::GzDecoder<Vec<u8>>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
}

impl Decoder {
    fn new(coding: &str) -> Decoder {
        match coding {
            "gzip" => Decoder::Gzip(Box::new(flate2::write::GzDecoder::new(Vec::new()))),
            _ => Decoder::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096))),
        }
    }

    /// Feeds compressed bytes; returns the decoded bytes now available.
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        match self {
            Decoder::Gzip(d) => {
                d.write_all(data).unwrap();
                d.flush().unwrap();
                std::mem::take(d.get_mut())
            }
            Decoder::Brotli(d) => {
                d.write_all(data).unwrap();
                d.flush().unwrap();
                std::mem::take(d.get_mut())
            }
        }
    }
}

/// Feature `i` of the generated export: realistic GeoJSON, with coordinates and names
/// varied enough that it compresses like a real one (about 5:1), not like zeros.
fn feature(i: u64) -> String {
    let mut x = i
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51afd7ed558ccd);
        x ^ (x >> 29)
    };
    let (a, b, c) = (next(), next(), next());
    format!(
        "{{\"type\":\"Feature\",\"id\":{i},\"geometry\":{{\"type\":\"Point\",\"coordinates\":[{:.6},{:.6}]}},\"properties\":{{\"cd_nom\":{},\"nom_cite\":\"Taxon {}\",\"date_min\":\"20{:02}-{:02}-{:02}\",\"observateurs\":\"Obs {}\"}}}},\n",
        -5.0 + (a % 10_000_000) as f64 / 1e6,
        42.0 + (b % 9_000_000) as f64 / 1e6,
        c % 1_000_000,
        c % 5_000,
        c % 25,
        1 + (a >> 40) % 12,
        1 + (b >> 40) % 28,
        (a >> 20) % 800
    )
}

/// The export as the upstream sends it: `chunk`-sized pieces of features, produced
/// lazily; the same sequence every time, so the client can check what it decodes.
fn export_chunks(total: u64, chunk: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut i = 0u64;
    let mut sent = 0u64;
    std::iter::from_fn(move || {
        if sent >= total {
            return None;
        }
        let mut piece = Vec::with_capacity(chunk + 512);
        if sent == 0 {
            piece.extend_from_slice(b"{\"type\":\"FeatureCollection\",\"features\":[\n");
        }
        while piece.len() < chunk {
            piece.extend_from_slice(feature(i).as_bytes());
            i += 1;
        }
        sent += piece.len() as u64;
        Some(piece)
    })
}

/// Streams the export through a channel of one chunk, counting what was produced.
fn export_body(total: u64, seen: Arc<Recorded>) -> MockBody {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        for piece in export_chunks(total, 64 * 1024) {
            let len = piece.len() as u64;
            if tx.send(Bytes::from(piece)).await.is_err() {
                return;
            }
            seen.produced.fetch_add(len, Ordering::SeqCst);
        }
    });
    http_body_util::BodyExt::boxed(ChannelBody(rx))
}

const EXPORT_LEN: u64 = 160 << 20;

async fn export_upstream() -> RunningUpstream {
    MockUpstream::new()
        .route(
            "/geonature/api/synthese/export_observations",
            |_, seen| async move {
                let mut response = Response::new(export_body(EXPORT_LEN, seen));
                response
                    .headers_mut()
                    .insert("content-type", "application/geo+json".parse().unwrap());
                response
            },
        )
        .start()
        .await
}

/// Checks decoded bytes against the generated export, slice by slice.
struct ExportCheck {
    chunks: Box<dyn Iterator<Item = Vec<u8>> + Send>,
    expected: Vec<u8>,
    checked: u64,
}

impl ExportCheck {
    fn new() -> ExportCheck {
        ExportCheck {
            chunks: Box::new(export_chunks(EXPORT_LEN, 64 * 1024)),
            expected: Vec::new(),
            checked: 0,
        }
    }

    fn feed(&mut self, mut plain: &[u8]) -> bool {
        while !plain.is_empty() {
            if self.expected.is_empty() {
                match self.chunks.next() {
                    Some(chunk) => self.expected = chunk,
                    None => return false,
                }
            }
            let n = plain.len().min(self.expected.len());
            if plain[..n] != self.expected[..n] {
                return false;
            }
            self.expected.drain(..n);
            plain = &plain[n..];
            self.checked += n as u64;
        }
        true
    }
}

/// Waits until the producer has made no progress for `quiet`, and returns how much it
/// produced; fails if it never settles within `limit`.
async fn producer_settles(seen: &Recorded, quiet: Duration, limit: Duration) -> u64 {
    let started = std::time::Instant::now();
    let mut last = seen.produced.load(Ordering::SeqCst);
    loop {
        tokio::time::sleep(quiet).await;
        let now = seen.produced.load(Ordering::SeqCst);
        if now == last {
            return now;
        }
        assert!(
            started.elapsed() < limit,
            "the producer never stopped: {} MiB",
            now >> 20
        );
        last = now;
    }
}

#[tokio::test]
async fn a_large_geojson_export_is_compressed_on_the_fly_with_the_producer_held_back() {
    for coding in ["gzip", "br"] {
        let up = export_upstream().await;
        let proxy = TestProxy::start(&config(), up.addr).await;
        let path = "/geonature/api/synthese/export_observations?export_format=geojson";
        let (mut client, head) = ChunkedClient::get(proxy.addr, path, coding).await;
        assert!(
            head.contains(&format!("content-encoding: {coding}")),
            "{head}"
        );

        // The client reads nothing: backpressure must reach the producer and stop it,
        // far from the end of the export. What it got ahead by sits in socket buffers,
        // not in the proxy: the proxy's send buffer (tcp_wmem's 4 MiB at most) holds
        // compressed bytes worth ~7 times as much GeoJSON (~28 MiB), plus the upstream
        // side's buffers and one encoder block.
        let stalled = producer_settles(
            &up.seen,
            Duration::from_millis(400),
            Duration::from_secs(20),
        )
        .await;
        assert!(
            stalled < 48 << 20,
            "{coding}: the upstream produced {} MiB of {} for a client that read nothing",
            stalled >> 20,
            EXPORT_LEN >> 20
        );

        let started = std::time::Instant::now();
        let mut decoder = Decoder::new(coding);
        let mut check = ExportCheck::new();
        let mut compressed = 0u64;
        while let Some(piece) = within(Duration::from_secs(120), "export", client.next())
            .await
            .expect("not cut")
        {
            compressed += piece.len() as u64;
            assert!(
                check.feed(&decoder.feed(&piece)),
                "{coding}: corrupted after {} bytes",
                check.checked
            );
        }
        assert_eq!(
            check.checked,
            up.seen.produced.load(Ordering::SeqCst),
            "{coding}: bytes lost"
        );
        assert!(
            check.checked >= EXPORT_LEN
                && check.expected.is_empty()
                && check.chunks.next().is_none()
        );
        eprintln!(
            "{coding}: {} MiB -> {:.1} MiB ({:.1}:1) in {:.2?}; producer stopped {:.1} MiB ahead of a stalled client",
            check.checked >> 20,
            compressed as f64 / (1 << 20) as f64,
            check.checked as f64 / compressed as f64,
            started.elapsed(),
            stalled as f64 / (1 << 20) as f64
        );
    }
}

#[tokio::test]
async fn a_slow_trickle_is_flushed_to_the_client_at_once() {
    let first = json_body(3000);
    let rest = json_body(50_000);
    for coding in ["gzip", "br"] {
        let release = Arc::new(Notify::new());
        let rest_sent = Arc::new(AtomicBool::new(false));
        let (first_c, rest_c, release_c, sent_c) = (
            first.clone(),
            rest.clone(),
            release.clone(),
            rest_sent.clone(),
        );
        let up = MockUpstream::new()
            .route("/trickle", move |_, _| {
                let (first, rest, release, sent) = (
                    first_c.clone(),
                    rest_c.clone(),
                    release_c.clone(),
                    sent_c.clone(),
                );
                async move {
                    let (tx, rx) = mpsc::channel::<Bytes>(4);
                    tokio::spawn(async move {
                        let _ = tx.send(Bytes::from(first)).await;
                        release.notified().await;
                        sent.store(true, Ordering::SeqCst);
                        let _ = tx.send(Bytes::from(rest)).await;
                    });
                    let mut response =
                        Response::new(http_body_util::BodyExt::boxed(ChannelBody(rx)));
                    response
                        .headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    response
                }
            })
            .start()
            .await;
        let proxy = TestProxy::start(&config(), up.addr).await;
        let started = std::time::Instant::now();
        let (mut client, head) = ChunkedClient::get(proxy.addr, "/trickle", coding).await;
        assert!(
            head.contains(&format!("content-encoding: {coding}")),
            "{head}"
        );
        let mut decoder = Decoder::new(coding);
        let mut decoded = Vec::new();
        while decoded.len() < first.len() {
            // Without a flush the encoder would keep it until the upstream sends more,
            // which here is never: any bound proves the flush; the latency is printed.
            let piece = within(
                Duration::from_secs(5),
                "the first chunk, decoded",
                client.next(),
            )
            .await
            .expect("not cut")
            .expect("not the end");
            decoded.extend(decoder.feed(&piece));
        }
        let latency = started.elapsed();
        assert_eq!(decoded, first, "{coding}");
        assert!(
            !rest_sent.load(Ordering::SeqCst),
            "the upstream was still holding the rest"
        );
        release.notify_one();
        while let Some(piece) = within(Duration::from_secs(5), "the rest", client.next())
            .await
            .expect("not cut")
        {
            decoded.extend(decoder.feed(&piece));
        }
        assert_eq!(decoded.len(), first.len() + rest.len(), "{coding}");
        assert_eq!(&decoded[first.len()..], rest.as_slice(), "{coding}");
        eprintln!("{coding}: the first chunk reached the client decoded after {latency:?}");
    }
}

#[tokio::test]
async fn an_upstream_failure_mid_stream_aborts_the_compressed_transfer() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let up = MockUpstream::new()
        .route("/broken", |_, _| async {
            CALLS.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Bytes::from(json_body(40_000)))).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = tx.send(Err(std::io::Error::other("worker killed"))).await;
            });
            let mut response = Response::new(http_body_util::BodyExt::boxed(FallibleBody(rx)));
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            response
        })
        .start()
        .await;
    let proxy = TestProxy::start(&config(), up.addr).await;
    for coding in ["gzip", "br"] {
        let (mut client, _) = ChunkedClient::get(proxy.addr, "/broken", coding).await;
        let mut outcome = Ok(Some(Vec::new()));
        while let Ok(Some(_)) = outcome {
            outcome = within(Duration::from_secs(10), "the aborted body", client.next()).await;
        }
        assert!(
            outcome.is_err(),
            "{coding}: the transfer ended as if complete"
        );
        assert!(!client.finished);
    }
    assert_eq!(CALLS.load(Ordering::SeqCst), 2);
}

/// A response body fed by a channel of results: an `Err` fails the body mid-stream.
struct FallibleBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl http_body::Body for FallibleBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(hyper::body::Frame::data)))
    }
}
