//! Static routes: GeoNature's frontend (`/geonature` → `dist`), `/geonature/api/static`
//! with `custom/` winning over `backend/static`, content types, directory index and
//! trailing-slash redirect, validators and conditional GET, byte ranges, HEAD,
//! precompressed siblings, traversal and symlink refusals, no listings, a big file
//! streamed intact, and that none of it ever reaches the upstream.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "outside-the-root-secret";
const MAIN_JS: &str = "console.log('geonature main bundle');\n";
const INDEX: &str = "<!doctype html><html><head><base href=\"./\"></head><body><pnx-root></pnx-root><script src=\"main.js\"></script></body></html>\n";
const BIG_LEN: usize = 24 << 20;

/// A GeoNature-like tree in a fresh temporary folder, removed on drop.
struct Site {
    dir: PathBuf,
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Site {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn write(&self, rel: &str, data: &[u8]) {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }

    fn link(&self, target: &str, rel: &str) {
        std::os::unix::fs::symlink(target, self.path(rel)).unwrap();
    }

    fn set_mtime(&self, rel: &str, at: SystemTime) {
        let file = std::fs::File::options()
            .write(true)
            .open(self.path(rel))
            .unwrap();
        file.set_modified(at).unwrap();
    }
}

/// The first `len` bytes of the position-dependent test pattern.
fn pattern_data(len: usize) -> Vec<u8> {
    (0..len as u64).map(pattern).collect()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn brotli(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut writer = brotli::CompressorWriter::new(&mut out, 4096, 9, 20);
    writer.write_all(data).unwrap();
    drop(writer);
    out
}

fn build_site() -> Site {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "qp-static-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let site = Site { dir };
    site.write("dist/index.html", INDEX.as_bytes());
    site.write("dist/main.js", MAIN_JS.as_bytes());
    site.write("dist/sub/index.html", b"sub index\n");
    site.write(
        "dist/assets/logo.svg",
        b"<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
    );
    site.write("dist/assets/i18n/fr.json", b"{\"hello\":\"bonjour\"}");
    site.write("outside/secret.txt", SECRET.as_bytes());
    site.link("../outside/secret.txt", "dist/link-out.txt");
    site.link("../outside", "dist/dir-out");
    site.link("main.js", "dist/link-in.js");
    site.write("custom/css/metadata_pdf.css", b"/* custom */");
    site.write("backend/static/css/metadata_pdf.css", b"/* stock */");
    site.write("backend/static/css/other.css", b"/* stock other */");
    let app: Vec<u8> = MAIN_JS.repeat(200).into_bytes();
    site.write("dist/app.js", &app);
    site.write("dist/app.js.gz", &gzip(&app));
    site.write("dist/app.js.br", &brotli(&app));
    site.write("dist/big.bin", &pattern_data(BIG_LEN));
    site
}

/// Static routes for the frontend and `/geonature/api/static` (custom/ first), the API
/// proxied, and a route that allows links out of its root.
fn config(site: &Site) -> String {
    let d = site.dir.display();
    format!(
        r#"
[upstreams.gn]
address = "{{upstream}}"
[[routes]]
name = "api-static"
match = {{ path_prefix = "/geonature/api/static/" }}
static = {{ roots = ["{d}/custom", "{d}/backend/static"], strip_prefix = "/geonature/api/static" }}
[[routes]]
name = "api"
match = {{ path_prefix = "/geonature/api/" }}
[[routes]]
name = "linked"
match = {{ path_prefix = "/linked/" }}
static = {{ root = "{d}/dist", strip_prefix = "/linked", allow_symlinks_outside = true }}
[[routes]]
name = "frontend"
match = {{ path_prefix = "/geonature" }}
static = {{ root = "{d}/dist", strip_prefix = "/geonature", cache_control = "no-cache" }}
[log]
access = "{d}/access.log"
"#
    )
}

async fn setup() -> (Site, RunningUpstream, TestProxy) {
    let site = build_site();
    let upstream = MockUpstream::new().text("/", "from upstream").start().await;
    let proxy = TestProxy::start(&config(&site), upstream.addr).await;
    (site, upstream, proxy)
}

/// Sends `request`, reads until the proxy closes, and splits head from what follows.
async fn exchange(proxy: &TestProxy, request: &str) -> (RawResponse, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    within(
        Duration::from_secs(10),
        "reading the answer",
        stream.read_to_end(&mut raw),
    )
    .await
    .unwrap();
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = parsed.parse(&raw) else {
        panic!("no complete head in {:?}", String::from_utf8_lossy(&raw));
    };
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
    (head, raw[len..].to_vec())
}

async fn head_of(proxy: &TestProxy, path: &str, headers: &str) -> (RawResponse, Vec<u8>) {
    let request =
        format!("HEAD {path} HTTP/1.1\r\nHost: proxy.test\r\n{headers}Connection: close\r\n\r\n");
    exchange(proxy, &request).await
}

#[tokio::test]
async fn every_geonature_file_type_gets_its_content_type() {
    let (site, up, proxy) = setup().await;
    let types = [
        ("a.js", "text/javascript"),
        ("a.css", "text/css"),
        ("a.html", "text/html"),
        ("a.json", "application/json"),
        ("a.svg", "image/svg+xml"),
        ("a.png", "image/png"),
        ("a.jpg", "image/jpeg"),
        ("a.woff2", "font/woff2"),
        ("a.ico", "image/vnd.microsoft.icon"),
        ("a.csv", "text/csv"),
        ("a.zip", "application/zip"),
        ("a.pdf", "application/pdf"),
        ("a.geojson", "application/geo+json"),
        ("a.js.map", "application/json"),
        ("a.txt", "text/plain"),
        ("manifest.webmanifest", "application/manifest+json"),
        ("LICENSE", "application/octet-stream"),
    ];
    for (name, _) in types {
        site.write(&format!("dist/types/{name}"), name.as_bytes());
    }
    for (name, media) in types {
        let response = get(proxy.addr, &format!("/geonature/types/{name}"), "").await;
        assert_eq!(response.status, 200, "{name}");
        assert_eq!(response.header("content-type"), Some(media), "{name}");
        assert_eq!(response.body, name.as_bytes(), "{name}");
        assert_eq!(response.header("cache-control"), Some("no-cache"), "{name}");
        assert!(
            response.header("x-request-id").is_some(),
            "{name}: no request id"
        );
    }
    assert_eq!(up.seen.count(), 0, "static files were forwarded upstream");
}

#[tokio::test]
async fn the_frontend_root_redirects_to_its_slash_form_which_serves_the_index() {
    let (_site, up, proxy) = setup().await;
    let bare = get(proxy.addr, "/geonature", "").await;
    assert_eq!(bare.status, 301, "{}", bare.text());
    assert_eq!(bare.header("location"), Some("/geonature/"));
    let with_query = get(proxy.addr, "/geonature?lang=fr", "").await;
    assert_eq!(with_query.header("location"), Some("/geonature/?lang=fr"));
    // What a browser does next: the index, whose `<base href="./">` now resolves under
    // /geonature/.
    let index = get(proxy.addr, "/geonature/", "").await;
    assert_eq!(index.status, 200);
    assert_eq!(index.header("content-type"), Some("text/html"));
    assert_eq!(index.text(), INDEX);
    let sub = get(proxy.addr, "/geonature/sub", "").await;
    assert_eq!(
        (sub.status, sub.header("location")),
        (301, Some("/geonature/sub/"))
    );
    assert_eq!(
        get(proxy.addr, "/geonature/sub/", "").await.text(),
        "sub index\n"
    );
    assert_eq!(up.seen.count(), 0);
}

#[tokio::test]
async fn directories_are_never_listed() {
    let (_site, up, proxy) = setup().await;
    for path in [
        "/geonature/assets/",
        "/geonature/assets",
        "/geonature/assets/i18n/",
    ] {
        let response = get(proxy.addr, path, "").await;
        assert_eq!(response.status, 404, "{path}");
        assert!(
            !response.text().contains("logo.svg"),
            "{path}: {}",
            response.text()
        );
    }
    assert_eq!(get(proxy.addr, "/geonature/main.js/", "").await.status, 404);
    assert_eq!(
        get(proxy.addr, "/geonature/missing.js", "").await.status,
        404
    );
    assert_eq!(up.seen.count(), 0);
}

#[tokio::test]
async fn the_custom_folder_overrides_backend_static_file_by_file() {
    let (_site, up, proxy) = setup().await;
    let custom = get(proxy.addr, "/geonature/api/static/css/metadata_pdf.css", "").await;
    assert_eq!(
        (custom.status, custom.text().as_str()),
        (200, "/* custom */")
    );
    let stock = get(proxy.addr, "/geonature/api/static/css/other.css", "").await;
    assert_eq!(
        (stock.status, stock.text().as_str()),
        (200, "/* stock other */")
    );
    assert_eq!(up.seen.count(), 0);
    // The API next to it is still proxied.
    let api = get(proxy.addr, "/geonature/api/gn_commons/config", "").await;
    assert_eq!(api.text(), "from upstream");
    assert_eq!(up.seen.count(), 1);
}

#[tokio::test]
async fn conditional_get_answers_304_by_etag_first_then_by_date() {
    let (site, up, proxy) = setup().await;
    site.set_mtime(
        "dist/main.js",
        SystemTime::now() - Duration::from_secs(3600),
    );
    let first = get(proxy.addr, "/geonature/main.js", "").await;
    let etag = first.header("etag").expect("an ETag").to_string();
    let last_modified = first
        .header("last-modified")
        .expect("Last-Modified")
        .to_string();
    assert!(etag.starts_with('"'), "a strong ETag: {etag}");

    let by_etag = get(
        proxy.addr,
        "/geonature/main.js",
        &format!("If-None-Match: {etag}\r\n"),
    )
    .await;
    assert_eq!(by_etag.status, 304);
    assert!(by_etag.body.is_empty());
    assert_eq!(by_etag.header("etag"), Some(etag.as_str()));
    assert_eq!(by_etag.header("cache-control"), Some("no-cache"));
    let weak = get(
        proxy.addr,
        "/geonature/main.js",
        &format!("If-None-Match: \"x\", W/{etag}\r\n"),
    )
    .await;
    assert_eq!(weak.status, 304, "If-None-Match compares weakly");

    let by_date = get(
        proxy.addr,
        "/geonature/main.js",
        &format!("If-Modified-Since: {last_modified}\r\n"),
    )
    .await;
    assert_eq!(by_date.status, 304);
    let older = "If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT\r\n";
    assert_eq!(
        get(proxy.addr, "/geonature/main.js", older).await.status,
        200
    );
    // If-None-Match takes precedence: a stale tag means 200 even with a current date.
    let both = format!("If-None-Match: \"stale\"\r\nIf-Modified-Since: {last_modified}\r\n");
    let stale = get(proxy.addr, "/geonature/main.js", &both).await;
    assert_eq!((stale.status, stale.text().as_str()), (200, MAIN_JS));

    // A rebuilt file gets a new validator.
    site.write("dist/main.js", b"console.log('rebuilt');\n");
    let rebuilt = get(
        proxy.addr,
        "/geonature/main.js",
        &format!("If-None-Match: {etag}\r\n"),
    )
    .await;
    assert_eq!(rebuilt.status, 200);
    assert_ne!(rebuilt.header("etag"), Some(etag.as_str()));
    assert_eq!(up.seen.count(), 0);
}

#[tokio::test]
async fn single_ranges_get_exact_bytes_and_unsatisfiable_ones_416() {
    let (_site, up, proxy) = setup().await;
    let data = pattern_data(BIG_LEN);
    let len = BIG_LEN;
    let cases: [(String, std::ops::Range<usize>); 4] = [
        ("bytes=0-9".into(), 0..10),
        ("bytes=-10".into(), len - 10..len),
        (format!("bytes={}-", len - 5), len - 5..len),
        ("bytes=1000000-3000000".into(), 1_000_000..3_000_001),
    ];
    for (spec, bytes) in cases {
        let r = get(
            proxy.addr,
            "/geonature/big.bin",
            &format!("Range: {spec}\r\n"),
        )
        .await;
        assert_eq!(r.status, 206, "{spec}");
        let expected_range = format!("bytes {}-{}/{len}", bytes.start, bytes.end - 1);
        assert_eq!(
            r.header("content-range"),
            Some(expected_range.as_str()),
            "{spec}"
        );
        assert_eq!(
            r.header("content-length"),
            Some(bytes.len().to_string().as_str())
        );
        assert!(
            r.complete && r.body == data[bytes.clone()],
            "{spec}: wrong bytes"
        );
    }
    let open = get(proxy.addr, "/geonature/main.js", "Range: bytes=5-\r\n").await;
    assert_eq!(
        (open.status, open.body.as_slice()),
        (206, &MAIN_JS.as_bytes()[5..])
    );

    let beyond = get(
        proxy.addr,
        "/geonature/main.js",
        &format!("Range: bytes={}-\r\n", MAIN_JS.len()),
    )
    .await;
    assert_eq!(beyond.status, 416);
    assert_eq!(
        beyond.header("content-range"),
        Some(format!("bytes */{}", MAIN_JS.len()).as_str())
    );

    let multi = get(proxy.addr, "/geonature/main.js", "Range: bytes=0-1,5-6\r\n").await;
    assert_eq!((multi.status, multi.text().as_str()), (200, MAIN_JS));
    assert_eq!(multi.header("accept-ranges"), Some("bytes"));
    assert_eq!(up.seen.count(), 0);
}

#[tokio::test]
async fn if_range_gives_the_range_only_for_the_current_version() {
    let (_site, _up, proxy) = setup().await;
    let etag = get(proxy.addr, "/geonature/main.js", "")
        .await
        .header("etag")
        .unwrap()
        .to_string();
    let current = format!("Range: bytes=0-6\r\nIf-Range: {etag}\r\n");
    let partial = get(proxy.addr, "/geonature/main.js", &current).await;
    assert_eq!(
        (partial.status, partial.text().as_str()),
        (206, &MAIN_JS[..7])
    );
    let stale = "Range: bytes=0-6\r\nIf-Range: \"previous-build\"\r\n";
    let full = get(proxy.addr, "/geonature/main.js", stale).await;
    assert_eq!((full.status, full.text().as_str()), (200, MAIN_JS));
}

#[tokio::test]
async fn head_gives_the_headers_of_get_and_no_body() {
    let (_site, up, proxy) = setup().await;
    let (head, after) = head_of(&proxy, "/geonature/big.bin", "").await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(BIG_LEN.to_string().as_str())
    );
    assert_eq!(head.header("accept-ranges"), Some("bytes"));
    assert!(head.header("etag").is_some() && head.header("last-modified").is_some());
    assert!(after.is_empty(), "HEAD sent {} body bytes", after.len());
    let (index, after) = head_of(&proxy, "/geonature/", "").await;
    assert_eq!(index.header("content-type"), Some("text/html"));
    assert_eq!(
        index.header("content-length"),
        Some(INDEX.len().to_string().as_str())
    );
    assert!(after.is_empty());
    assert_eq!(up.seen.count(), 0);
}

#[tokio::test]
async fn other_methods_get_405_with_allow() {
    let (_site, up, proxy) = setup().await;
    let response = post(proxy.addr, "/geonature/main.js", "", b"x=1").await;
    assert_eq!(response.status, 405);
    assert_eq!(response.header("allow"), Some("GET, HEAD"));
    assert_eq!(up.seen.count(), 0);
}

#[tokio::test]
async fn precompressed_siblings_are_served_to_clients_that_accept_them() {
    let (site, up, proxy) = setup().await;
    let app = std::fs::read(site.path("dist/app.js")).unwrap();
    let gz = get(proxy.addr, "/geonature/app.js", "Accept-Encoding: gzip\r\n").await;
    assert_eq!(gz.status, 200);
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(gz.header("content-type"), Some("text/javascript"));
    assert_eq!(gz.header("vary"), Some("Accept-Encoding"));
    assert_eq!(gz.body, std::fs::read(site.path("dist/app.js.gz")).unwrap());
    let mut decoded = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(gz.body.as_slice()),
        &mut decoded,
    )
    .unwrap();
    assert_eq!(decoded, app);

    let br = get(
        proxy.addr,
        "/geonature/app.js",
        "Accept-Encoding: gzip, deflate, br\r\n",
    )
    .await;
    assert_eq!(br.header("content-encoding"), Some("br"));
    assert_eq!(br.body, std::fs::read(site.path("dist/app.js.br")).unwrap());
    assert_ne!(
        br.header("etag"),
        gz.header("etag"),
        "each encoding has its own ETag"
    );

    let refused = get(
        proxy.addr,
        "/geonature/app.js",
        "Accept-Encoding: br;q=0, gzip;q=0\r\n",
    )
    .await;
    assert_eq!(refused.header("content-encoding"), None);
    assert_eq!(refused.body, app);
    let identity = get(proxy.addr, "/geonature/app.js", "").await;
    assert_eq!(identity.header("content-encoding"), None);
    assert_eq!(
        identity.header("vary"),
        Some("Accept-Encoding"),
        "the answer still varies"
    );
    assert_eq!(identity.body, app);
    assert_eq!(up.seen.count(), 0);
}

#[tokio::test]
async fn precompressed_siblings_are_never_used_for_ranges_nor_when_stale() {
    let (site, _up, proxy) = setup().await;
    let app = std::fs::read(site.path("dist/app.js")).unwrap();
    let range = get(
        proxy.addr,
        "/geonature/app.js",
        "Accept-Encoding: gzip, br\r\nRange: bytes=0-99\r\n",
    )
    .await;
    assert_eq!(range.status, 206);
    assert_eq!(range.header("content-encoding"), None);
    assert_eq!(range.body, &app[..100]);

    // A sibling older than its file is left over from a previous build.
    site.set_mtime(
        "dist/app.js.gz",
        SystemTime::now() - Duration::from_secs(86_400),
    );
    site.set_mtime(
        "dist/app.js.br",
        SystemTime::now() - Duration::from_secs(86_400),
    );
    let stale = get(
        proxy.addr,
        "/geonature/app.js",
        "Accept-Encoding: gzip, br\r\n",
    )
    .await;
    assert_eq!(stale.header("content-encoding"), None);
    assert_eq!(stale.body, app);
}

#[tokio::test]
async fn traversal_attempts_are_refused_whatever_their_spelling() {
    let (_site, up, proxy) = setup().await;
    let attempts = [
        ("/geonature/../outside/secret.txt", 404),
        ("/geonature/assets/../../outside/secret.txt", 404),
        ("/geonature/%2e%2e/outside/secret.txt", 404),
        ("/geonature/%2E%2e/outside/secret.txt", 404),
        ("/geonature/..%2foutside%2fsecret.txt", 404),
        ("/geonature/..%2Foutside/secret.txt", 404),
        ("/geonature/..%5coutside%5csecret.txt", 404),
        ("/geonature//etc/passwd", 404),
        ("/geonature/%2fetc%2fpasswd", 404),
        ("/geonature/main.js%00.png", 400),
        ("/geonature/main.js%zz", 400),
        ("/geonature/api/static/../../../outside/secret.txt", 404),
        (
            "/geonature/api/static/%2e%2e/%2e%2e/outside/secret.txt",
            404,
        ),
    ];
    for (path, status) in attempts {
        let response = get(proxy.addr, path, "").await;
        assert_eq!(response.status, status, "{path}");
        assert!(
            !response.text().contains(SECRET),
            "{path} leaked the secret"
        );
    }
    // A raw backslash is not even a valid request target.
    let raw = get(proxy.addr, "/geonature/..\\outside\\secret.txt", "").await;
    assert!(matches!(raw.status, 400 | 404), "backslash: {}", raw.status);
    assert!(!raw.text().contains(SECRET));
    assert_eq!(
        up.seen.count(),
        0,
        "a traversal attempt was forwarded upstream"
    );
}

#[tokio::test]
async fn symbolic_links_must_stay_inside_the_root_unless_allowed() {
    let (_site, up, proxy) = setup().await;
    let out = get(proxy.addr, "/geonature/link-out.txt", "").await;
    assert_eq!(out.status, 403);
    assert!(!out.text().contains(SECRET));
    let dir_out = get(proxy.addr, "/geonature/dir-out/secret.txt", "").await;
    assert_eq!(dir_out.status, 403);
    assert!(!dir_out.text().contains(SECRET));
    let inside = get(proxy.addr, "/geonature/link-in.js", "").await;
    assert_eq!((inside.status, inside.text().as_str()), (200, MAIN_JS));
    assert_eq!(inside.header("content-type"), Some("text/javascript"));
    // A route with allow_symlinks_outside follows them.
    let allowed = get(proxy.addr, "/linked/link-out.txt", "").await;
    assert_eq!((allowed.status, allowed.text().as_str()), (200, SECRET));
    assert_eq!(up.seen.count(), 0);
}

#[tokio::test]
async fn a_big_file_streams_intact() {
    let (_site, up, proxy) = setup().await;
    let started = std::time::Instant::now();
    let response = within(
        Duration::from_secs(30),
        "big file",
        get(proxy.addr, "/geonature/big.bin", ""),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(response.status, 200);
    assert!(response.complete);
    assert_eq!(
        response.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(response.body.len(), BIG_LEN);
    assert!(
        response.body == pattern_data(BIG_LEN),
        "the file arrived altered"
    );
    eprintln!(
        "{} MiB in {elapsed:?} ({:.0} MiB/s)",
        BIG_LEN >> 20,
        (BIG_LEN >> 20) as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(up.seen.count(), 0);
}

/// The access log line of the first request for `target`, once the writer has it.
async fn logged(site: &Site, method: &str, target: &str) -> String {
    let wanted = format!("\"{method} {target} HTTP/1.1\" ");
    for _ in 0..100 {
        let text = std::fs::read_to_string(site.path("access.log")).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(&wanted)) {
            return line.to_string();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no access log line for {method} {target}");
}

#[tokio::test]
async fn the_access_log_counts_the_bytes_each_answer_sent() {
    let (site, _up, proxy) = setup().await;
    let full = get(proxy.addr, "/geonature/main.js?log=full", "").await;
    let etag = full.header("etag").unwrap().to_string();
    get(
        proxy.addr,
        "/geonature/main.js?log=range",
        "Range: bytes=0-9\r\n",
    )
    .await;
    let not_modified = format!("If-None-Match: {etag}\r\n");
    get(proxy.addr, "/geonature/main.js?log=304", &not_modified).await;
    head_of(&proxy, "/geonature/main.js?log=head", "").await;
    get(proxy.addr, "/geonature/../x?log=refused", "").await;
    let expect = [
        (
            "GET",
            "/geonature/main.js?log=full",
            format!("\" 200 {} ", MAIN_JS.len()),
        ),
        (
            "GET",
            "/geonature/main.js?log=range",
            "\" 206 10 ".to_string(),
        ),
        ("GET", "/geonature/main.js?log=304", "\" 304 - ".to_string()),
        (
            "HEAD",
            "/geonature/main.js?log=head",
            "\" 200 - ".to_string(),
        ),
        ("GET", "/geonature/../x?log=refused", "\" 404 ".to_string()),
    ];
    for (method, target, fields) in expect {
        let line = logged(&site, method, target).await;
        assert!(line.contains(&fields), "{line}");
    }
}

#[tokio::test]
async fn a_missing_root_is_a_404_not_an_error() {
    let site = build_site();
    let upstream = MockUpstream::new().start().await;
    let toml = format!(
        "[upstreams.gn]\naddress = \"{{upstream}}\"\n[[routes]]\nname = \"media\"\nmatch = {{ path_prefix = \"/geonature/api/media/\" }}\nstatic = {{ root = \"{}\", strip_prefix = \"/geonature/api/media\" }}\n",
        Path::new(&site.dir).join("no-such-dir").display()
    );
    let proxy = TestProxy::start(&toml, upstream.addr).await;
    assert_eq!(
        get(proxy.addr, "/geonature/api/media/x.jpg", "")
            .await
            .status,
        404
    );
    assert_eq!(upstream.seen.count(), 0);
}
