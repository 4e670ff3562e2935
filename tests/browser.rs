//! A real browser through the proxy: headless Chromium (Debian's `chromium` package)
//! loads a small GeoNature-like frontend over HTTPS and HTTP/2 from the static route,
//! its script calls the API through the proxy (JSON), then downloads a ZIP with
//! `fetch()` and hashes it with `crypto.subtle.digest`; the test reads the final DOM.
//!
//! Skipped, with a line saying why, when `/usr/bin/chromium` is missing (`.ci/run`
//! installs it, so CI always runs it).

mod support;

use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

const CHROMIUM: &str = "/usr/bin/chromium";
/// Chromium is killed (with all its helper processes) after this long.
const BROWSER_LIMIT: Duration = Duration::from_secs(30);
/// The download: a few MiB, not a multiple of any chunk size.
const ZIP_LEN: usize = 3 * 1024 * 1024 + 4_567;

#[tokio::test]
async fn chromium_loads_the_frontend_calls_the_api_and_downloads_a_zip_over_h2() {
    if !Path::new(CHROMIUM).exists() {
        // Straight to stderr: the test harness hides what passing tests print.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED browser test: {CHROMIUM} is missing (apt-get install chromium; .ci/run does)"
        );
        return;
    }
    let started = Instant::now();
    let dir = temp_dir("browser");
    let frontend = dir.join("dist");
    write_frontend(&frontend);
    let spki = write_certificate(&dir);
    let access_log = dir.join("access.log");

    let zip = Arc::new(zip_bytes(ZIP_LEN));
    let upstream = mock_geonature(zip.clone()).start().await;
    let config = format!(
        r#"[server]
listen = ["127.0.0.1:0"]
[server.tls]
listen = ["127.0.0.1:0"]
certificate = "{cert}"
key = "{key}"
[log]
access = "{log}"
format = "combined"
[upstreams.geonature]
address = "{{upstream}}"
[defaults]
compress = {{ types = ["application/json"], min_size = "1KiB" }}

[[routes]]
name = "geonature-api"
match = {{ path_prefix = "/geonature/api" }}

[[routes]]
name = "frontend"
match = {{ path_prefix = "/geonature" }}
static = {{ root = "{root}", strip_prefix = "/geonature" }}
"#,
        cert = dir.join("cert.pem").display(),
        key = dir.join("key.pem").display(),
        log = access_log.display(),
        root = frontend.display(),
    );
    let proxy = TestProxy::start(&config, upstream.addr).await;
    let tls = proxy.tls_addr.expect("the proxy has an HTTPS listener");
    let url = format!("https://localhost:{}/geonature/", tls.port());

    let run = run_chromium(&dir.join("profile"), &spki, &url).await;
    let dom = run.stdout;
    let context = || {
        format!(
            "\n--- DOM ---\n{dom}\n--- chromium stderr (last lines) ---\n{}\n--- upstream saw ---\n{:?}",
            tail(&run.stderr, 40),
            upstream
                .seen
                .requests
                .lock()
                .unwrap()
                .iter()
                .map(|r| format!("{} {}", r.method, r.target))
                .collect::<Vec<_>>()
        )
    };
    assert!(
        !run.timed_out,
        "chromium was killed after {BROWSER_LIMIT:?}{}",
        context()
    );

    assert_eq!(
        element(&dom, "status").as_deref(),
        Some("done"),
        "the page's script did not finish{}",
        context()
    );
    // The stylesheet was served as text/css (Chromium ignores it otherwise) and applied.
    assert_eq!(
        element(&dom, "css").as_deref(),
        Some("rgb(46, 125, 50)"),
        "{}",
        context()
    );
    // The API answer came back through the proxy, JSON parsed by the page.
    assert_eq!(
        element(&dom, "api").as_deref(),
        Some("synthese: 3 observations for taxon 61153 (3 items, 100 padding)"),
        "{}",
        context()
    );
    // Compressed on the way (JSON over 1 KiB), and the browser decoded it; the ZIP not.
    let api_encoding = element(&dom, "api-encoding").unwrap_or_default();
    assert!(
        api_encoding == "br" || api_encoding == "gzip",
        "the JSON answer was sent with encoding {api_encoding:?}{}",
        context()
    );
    assert_eq!(
        element(&dom, "zip-encoding").as_deref(),
        Some("none"),
        "{}",
        context()
    );
    // The download: every byte, and the headers GeoNature sends.
    let expected_sha = hex(sha256(&zip).as_ref());
    assert_eq!(
        element(&dom, "zip-length"),
        Some(ZIP_LEN.to_string()),
        "{}",
        context()
    );
    assert_eq!(
        element(&dom, "zip-sha256"),
        Some(expected_sha),
        "{}",
        context()
    );
    assert_eq!(
        element(&dom, "zip-type").as_deref(),
        Some("application/zip"),
        "{}",
        context()
    );
    assert_eq!(
        element(&dom, "zip-disposition").as_deref(),
        Some("attachment; filename=\"export_synthese.zip\""),
        "{}",
        context()
    );
    // HTTP/2 for everything the page loaded, as the browser saw it.
    let protocols = element(&dom, "protocols").unwrap_or_default();
    let entries: Vec<(&str, &str)> = protocols
        .lines()
        .filter_map(|line| line.trim().split_once(' '))
        .collect();
    for wanted in [
        "/geonature/",
        "/geonature/main.js",
        "/geonature/styles.css",
        "/geonature/api/synthese/for_web",
    ] {
        assert!(
            entries.iter().any(|(path, _)| *path == wanted),
            "no timing entry for {wanted}: {protocols:?}{}",
            context()
        );
    }
    assert!(
        entries.iter().all(|(_, protocol)| *protocol == "h2"),
        "not everything went over HTTP/2: {protocols:?}"
    );

    // The upstream saw the API call and the download (over HTTP/1.1, told it was HTTPS),
    // and none of the frontend's files: those came from disk.
    let seen = upstream.seen.requests.lock().unwrap().clone();
    let targets: Vec<String> = seen
        .iter()
        .map(|r| format!("{} {}", r.method, r.target))
        .collect();
    assert_eq!(
        targets,
        [
            "POST /geonature/api/synthese/for_web?limit=3",
            "GET /geonature/api/exports/export_synthese.zip"
        ],
        "{}",
        context()
    );
    for request in &seen {
        assert_eq!(request.headers["x-forwarded-proto"], "https");
    }

    // And the proxy's own access log says the browser spoke HTTP/2 to it.
    let expected_lines = [
        "\"GET /geonature/ HTTP/2.0\" 200 ",
        "\"GET /geonature/main.js HTTP/2.0\" 200 ",
        "\"GET /geonature/styles.css HTTP/2.0\" 200 ",
        "\"POST /geonature/api/synthese/for_web?limit=3 HTTP/2.0\" 200 ",
        &format!("\"GET /geonature/api/exports/export_synthese.zip HTTP/2.0\" 200 {ZIP_LEN} "),
    ];
    let mut log = String::new();
    let all_logged = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            log = std::fs::read_to_string(&access_log).unwrap_or_default();
            if expected_lines.iter().all(|line| log.contains(line)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        all_logged.is_ok(),
        "access log lacks an HTTP/2 line among {expected_lines:?}:\n{log}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "browser test: chromium ran {:.1?}, whole test {:.1?}",
        run.took,
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `index.html`, `main.js` and `styles.css`, like a (very) small GeoNature frontend build.
fn write_frontend(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("index.html"),
        r#"<!doctype html>
<html lang="fr">
<head>
  <meta charset="utf-8">
  <title>GeoNature</title>
  <link rel="icon" href="data:,">
  <base href="./">
  <link rel="stylesheet" href="styles.css">
</head>
<body>
  <h1>GeoNature</h1>
  <dl>
    <dt>css</dt><dd id="css">pending</dd>
    <dt>api</dt><dd id="api">pending</dd>
    <dt>api encoding</dt><dd id="api-encoding">pending</dd>
    <dt>zip type</dt><dd id="zip-type">pending</dd>
    <dt>zip disposition</dt><dd id="zip-disposition">pending</dd>
    <dt>zip encoding</dt><dd id="zip-encoding">pending</dd>
    <dt>zip length</dt><dd id="zip-length">pending</dd>
    <dt>zip sha256</dt><dd id="zip-sha256">pending</dd>
    <dt>protocols</dt><dd id="protocols">pending</dd>
    <dt>status</dt><dd id="status">running</dd>
  </dl>
  <script src="main.js"></script>
</body>
</html>
"#,
    )
    .unwrap();
    std::fs::write(dir.join("styles.css"), "h1 { color: rgb(46, 125, 50); }\n").unwrap();
    std::fs::write(
        dir.join("main.js"),
        r#""use strict";
function show(id, text) { document.getElementById(id).textContent = text; }
function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}
async function run() {
  show("css", getComputedStyle(document.querySelector("h1")).color);

  const api = await fetch("api/synthese/for_web?limit=3", {
    method: "POST",
    headers: { "Content-Type": "application/json", "Accept": "application/json" },
    body: JSON.stringify({ filter: "taxon 61153" }),
  });
  if (!api.ok) throw new Error("the API answered " + api.status);
  show("api-encoding", api.headers.get("content-encoding") || "none");
  const data = await api.json();
  show("api", data.module + ": " + data.items.length + " observations for " + data.echo.filter
    + " (" + data.items.length + " items, " + data.padding.length + " padding)");

  const zip = await fetch("api/exports/export_synthese.zip");
  if (!zip.ok) throw new Error("the download answered " + zip.status);
  show("zip-type", zip.headers.get("content-type"));
  show("zip-disposition", zip.headers.get("content-disposition"));
  show("zip-encoding", zip.headers.get("content-encoding") || "none");
  const bytes = await zip.arrayBuffer();
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  show("zip-length", String(bytes.byteLength));
  show("zip-sha256", hex(digest));

  const entries = performance.getEntriesByType("navigation")
    .concat(performance.getEntriesByType("resource"));
  show("protocols", entries.map((e) => new URL(e.name).pathname + " " + e.nextHopProtocol).join("\n"));
  show("status", "done");
}
run().catch((e) => show("status", "failed: " + e));
"#,
    )
    .unwrap();
}

/// GeoNature's side: a JSON API call that echoes its request, and a ZIP export streamed
/// in chunks with the headers Flask's `send_file` gives.
fn mock_geonature(zip: Arc<Vec<u8>>) -> MockUpstream {
    MockUpstream::new()
        .route("/geonature/api/synthese/for_web", |request, _| async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let echo = String::from_utf8_lossy(&body).into_owned();
            let items: Vec<String> = (1..=3)
                .map(|i| format!("{{\"id_synthese\":{i},\"cd_nom\":61153}}"))
                .collect();
            // Padding makes it big enough to be compressed on the way (min_size 1 KiB).
            let padding: Vec<String> = (0..100)
                .map(|i| format!("\"observation-{i:04}\""))
                .collect();
            let json = format!(
                "{{\"module\":\"synthese\",\"echo\":{echo},\"items\":[{}],\"padding\":[{}]}}",
                items.join(","),
                padding.join(",")
            );
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(full(json))
                .unwrap()
        })
        .route("/geonature/api/exports/", move |_, _| {
            let zip = zip.clone();
            async move {
                let (tx, rx) = mpsc::channel::<Bytes>(2);
                let len = zip.len();
                tokio::spawn(async move {
                    for piece in zip.chunks(50_000) {
                        if tx.send(Bytes::copy_from_slice(piece)).await.is_err() {
                            return;
                        }
                    }
                });
                Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, "application/zip")
                    .header(
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"export_synthese.zip\"",
                    )
                    .header(header::CONTENT_LENGTH, len)
                    .body(ChannelBody(rx).boxed())
                    .unwrap()
            }
        })
}

/// `len` bytes that start like a ZIP file, then pseudo-random (xorshift), so no
/// compression or repetition can hide a lost or reordered chunk.
fn zip_bytes(len: usize) -> Vec<u8> {
    let mut bytes = b"PK\x03\x04".to_vec();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// Writes a self-signed certificate for `localhost` (cert.pem, key.pem); returns the
/// base64 SHA-256 of its public key, what `--ignore-certificate-errors-spki-list` takes.
fn write_certificate(dir: &Path) -> String {
    use rcgen::PublicKeyData;
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), generated.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), generated.signing_key.serialize_pem()).unwrap();
    base64(sha256(&generated.signing_key.subject_public_key_info()).as_ref())
}

/// SHA-256 from rustls' ring provider (no hashing crate of its own needed).
fn sha256(data: &[u8]) -> impl AsRef<[u8]> {
    let suite = tokio_rustls::rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    suite.tls13().unwrap().common.hash_provider.hash(data)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct BrowserRun {
    stdout: String,
    stderr: String,
    timed_out: bool,
    took: Duration,
}

/// Runs headless Chromium on `url` and returns the DOM it dumps once the page is done.
/// Chromium runs in its own process group, killed whole after [`BROWSER_LIMIT`].
async fn run_chromium(profile: &Path, spki: &str, url: &str) -> BrowserRun {
    std::fs::create_dir_all(profile).unwrap();
    let started = Instant::now();
    let mut child = tokio::process::Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
        .args(["--virtual-time-budget=10000", "--dump-dom"])
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");
    let pid = child.id().expect("chromium's pid");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let read_out = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text).await;
        text
    });
    let read_err = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let timed_out = tokio::time::timeout(BROWSER_LIMIT, child.wait())
        .await
        .is_err();
    // The whole group: the browser and its zygote, renderer, GPU and network helpers.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait().await;
    let stdout = within(Duration::from_secs(5), "chromium's stdout", read_out)
        .await
        .unwrap();
    let stderr = within(Duration::from_secs(5), "chromium's stderr", read_err)
        .await
        .unwrap();
    BrowserRun {
        stdout,
        stderr,
        timed_out,
        took: started.elapsed(),
    }
}

/// The text inside the element with `id="…"` in serialized HTML (entities for `&`, `<`,
/// `>` and `"` decoded), or None.
fn element(html: &str, id: &str) -> Option<String> {
    let start = html.find(&format!("id=\"{id}\""))?;
    let open_end = start + html[start..].find('>')? + 1;
    let close = open_end + html[open_end..].find("</")?;
    Some(
        html[open_end..close]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&amp;", "&"),
    )
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[tokio::test]
async fn the_status_page_renders_in_chromium_with_a_request_in_flight() {
    if !Path::new(CHROMIUM).exists() {
        eprintln!("SKIPPED status page browser test: {CHROMIUM} is missing");
        return;
    }
    let upstream = MockUpstream::new()
        .delayed("/geonature/api/slow", Duration::from_secs(20), "late")
        .start()
        .await;
    let config = "[admin]\nlisten = \"127.0.0.1:0\"\n[upstreams.gn]\naddress = \"{upstream}\"\nmax_connections = 4\n\
        [[routes]]\nname = \"exports\"\nmatch = { path_prefix = \"/geonature/api/slow\" }\ntimeouts = { response_header = \"1m\" }\n";
    let proxy = TestProxy::start(config, upstream.addr).await;
    let addr = proxy.addr;
    let _slow = tokio::spawn(async move { get(addr, "/geonature/api/slow-export", "").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admin = proxy.admin_addr.expect("admin listener");
    let profile = std::env::temp_dir().join(format!("qp-status-chromium-{}", std::process::id()));
    // `refresh=0`: a page that reloads itself never lets --dump-dom finish.
    let run = run_chromium(&profile, "none", &format!("http://{admin}/?refresh=0")).await;
    let _ = std::fs::remove_dir_all(&profile);
    assert!(!run.timed_out, "chromium hung: {}", tail(&run.stderr, 20));
    let dom = run.stdout;
    let table_start = dom.find("id=\"in-flight\"").expect("the in-flight table");
    let in_flight = &dom[table_start..table_start + dom[table_start..].find("</table>").unwrap()];
    assert!(
        in_flight.contains("GET /geonature/api/slow-export"),
        "{dom}"
    );
    assert!(dom.contains("waiting for the upstream"), "{dom}");
    assert!(dom.contains("exports"), "{dom}");
    assert!(
        dom.contains(&upstream.addr.to_string()),
        "the upstream's server is listed: {dom}"
    );
}
