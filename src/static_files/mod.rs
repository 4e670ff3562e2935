//! Static files: GeoNature's frontend build, `backend/static` (with `custom/` winning)
//! and `backend/media`, served from disk like Apache's `Alias` with `Options -Indexes`,
//! never forwarded upstream.
//!
//! What a request gets:
//! - **Methods**: GET and HEAD; anything else is `405` with `Allow: GET, HEAD`.
//! - **Paths** ([`path`]): a broken `%` escape or a NUL byte is `400` (nginx's answer to
//!   a NUL); a dot segment (`..`, `%2e%2e`), an encoded slash (`%2f`, Apache's 404 with
//!   `AllowEncodedSlashes Off`) or a backslash is `404`, like a missing file, so a
//!   probe learns nothing. A symbolic link whose target is outside the root is `403`
//!   (what Apache and nginx answer for a refused link) unless `allow_symlinks_outside`,
//!   and so is a file the proxy may not read.
//! - **Directories**: never listed. `dir/` serves `dir/index.html` (`index`), or 404.
//!   `dir` without the slash is a `301` to `dir/` (Apache's `DirectorySlash`), query
//!   kept: GeoNature's `index.html` has `<base href="./">`, which resolves against the
//!   document's URL, so served at `/geonature` its `main.js` would be fetched from
//!   `/main.js`. Only a directory that has an index is redirected.
//! - **Validators** ([`conditional`]): a strong ETag from size and mtime, Last-Modified;
//!   `If-Match`/`If-Unmodified-Since` (412), `If-None-Match` before
//!   `If-Modified-Since` (304), in RFC 9110 §13.2.2's order.
//! - **Ranges**: one range gets `206`, an unsatisfiable one `416` with
//!   `Content-Range: bytes */len`, several the whole file; `If-Range` needs the current
//!   strong validator. Only on GET, only of the identity bytes.
//! - **Precompressed siblings**: `file.br` / `file.gz`, when the client accepts them
//!   and they are not older than `file`, are sent with `Content-Encoding`, the type of
//!   `file` and their own ETag. Never for a Range request. `Vary: Accept-Encoding` on
//!   every answer about a file that has a sibling or whose type the route compresses.
//! - **Bodies** stream from disk in 64 KiB reads ([`crate::body::FileStream`]).

mod conditional;
mod lookup;
mod mime;
pub mod path;

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};

use crate::body::{FileStream, ResponseBody};
use crate::compress;
use crate::config::{CompressConfig, Compression, StaticConfig};
use conditional::{Precondition, RangeAnswer, Validators};
use lookup::{Found, LookupError, Opened, Wanted};
use path::PathRefusal;

/// Answers a request for a static site that compresses nothing on the fly.
pub async fn serve(site: &StaticConfig, request: &Parts) -> Response<ResponseBody> {
    serve_for_route(site, None, request).await
}

/// Answers a request for a static route. `compress` is the route's compression, which
/// decides `Vary` here; the body itself is compressed later, by the caller.
pub async fn serve_for_route(
    site: &StaticConfig,
    compress: Option<&CompressConfig>,
    request: &Parts,
) -> Response<ResponseBody> {
    if request.method != Method::GET && request.method != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED);
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let path = match path::map(request.uri.path(), &site.strip_prefix) {
        Ok(path) => path,
        Err(refusal) => return refused(refusal, request),
    };
    let wanted = Wanted {
        path,
        codings: sibling_codings(site, request),
    };
    // A few small strings: cheaper than the disk access it lets run off the async threads.
    let owned = site.clone();
    match tokio::task::spawn_blocking(move || lookup::find(&owned, &wanted)).await {
        Ok(Ok(Found::File(opened))) => respond(site, compress, request, opened),
        Ok(Ok(Found::DirectoryWithoutSlash)) => redirect_to_directory(request),
        Ok(Err(error)) => lookup_failed(&error, request),
        Err(join) => {
            tracing::error!(
                path = request.uri.path(),
                "static file lookup failed: {join}"
            );
            plain(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

/// The codings a precompressed sibling may have for this request, best first.
fn sibling_codings(site: &StaticConfig, request: &Parts) -> Vec<Compression> {
    if !site.precompressed || request.headers.contains_key(header::RANGE) {
        return Vec::new();
    }
    let accept_encoding = compress::accept_encoding(&request.headers);
    compress::accepted(
        accept_encoding.as_deref(),
        &[Compression::Brotli, Compression::Gzip],
    )
}

/// 304 or 412 when a precondition decides, else the file (or part of it).
fn respond(
    site: &StaticConfig,
    compress: Option<&CompressConfig>,
    request: &Parts,
    opened: Opened,
) -> Response<ResponseBody> {
    let validators = Validators::new(opened.len, opened.modified);
    let content_type = HeaderValue::from_str(&mime::content_type(&opened.name))
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let varies = opened.varies
        || compress.is_some_and(|c| compress::compresses_type(c, Some(&content_type)));
    let mut head = cache_headers(site, &validators, varies);
    match conditional::evaluate(&request.headers, &validators) {
        Precondition::NotModified => {
            with_head(StatusCode::NOT_MODIFIED, head, ResponseBody::full(""))
        }
        Precondition::Failed => plain(StatusCode::PRECONDITION_FAILED),
        Precondition::Proceed => {
            head.insert(header::CONTENT_TYPE, content_type);
            head.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            if let Some(coding) = opened.encoding {
                let token = HeaderValue::from_static(coding.token());
                head.insert(header::CONTENT_ENCODING, token);
            }
            send_range(request, head, &validators, opened)
        }
    }
}

/// 200 with the whole file, 206 with one range of it, or 416. Ranges are only for GET
/// (RFC 9110 §14.2) and only of the identity bytes.
fn send_range(
    request: &Parts,
    mut head: HeaderMap,
    validators: &Validators,
    opened: Opened,
) -> Response<ResponseBody> {
    let len = opened.len;
    let range = if request.method == Method::GET && opened.encoding.is_none() {
        conditional::range(&request.headers, validators, len)
    } else {
        RangeAnswer::Full
    };
    match range {
        RangeAnswer::Full => send(request, head, opened, 0..len, StatusCode::OK),
        RangeAnswer::Partial(bytes) => {
            let value = format!("bytes {}-{}/{len}", bytes.start, bytes.end - 1);
            insert_str(&mut head, header::CONTENT_RANGE, &value);
            send(request, head, opened, bytes, StatusCode::PARTIAL_CONTENT)
        }
        RangeAnswer::Unsatisfiable => {
            let mut response = plain(StatusCode::RANGE_NOT_SATISFIABLE);
            let value = format!("bytes */{len}");
            insert_str(response.headers_mut(), header::CONTENT_RANGE, &value);
            response
        }
    }
}

/// The headers a 200, a 206 and a 304 all carry (RFC 9110 §15.4.5).
fn cache_headers(site: &StaticConfig, validators: &Validators, varies: bool) -> HeaderMap {
    let mut head = HeaderMap::new();
    if let Some(etag) = validators.etag_value() {
        head.insert(header::ETAG, etag);
    }
    if let Some(date) = validators.last_modified_value() {
        head.insert(header::LAST_MODIFIED, date);
    }
    if let Some(cc) = &site.cache_control {
        insert_str(&mut head, header::CACHE_CONTROL, cc);
    }
    if varies {
        head.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    head
}

/// The bytes `range` of the file (headers only for HEAD), streamed from disk.
fn send(
    request: &Parts,
    mut head: HeaderMap,
    opened: Opened,
    range: std::ops::Range<u64>,
    status: StatusCode,
) -> Response<ResponseBody> {
    let len = range.end - range.start;
    head.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if request.method == Method::HEAD {
        return with_head(status, head, ResponseBody::full(""));
    }
    match FileStream::new(opened.file, range.start, len) {
        Ok(stream) => with_head(status, head, ResponseBody::file(stream)),
        Err(e) => {
            tracing::error!(path = %opened.name.display(), "cannot seek in a static file: {e}");
            plain(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

/// `dir` → `dir/`, as a path-absolute `Location` (never `//host`, which a browser would
/// read as another site).
fn redirect_to_directory(request: &Parts) -> Response<ResponseBody> {
    let mut location = format!("/{}/", request.uri.path().trim_start_matches('/'));
    if let Some(query) = request.uri.query() {
        location.push('?');
        location.push_str(query);
    }
    let mut response = plain(StatusCode::MOVED_PERMANENTLY);
    insert_str(response.headers_mut(), header::LOCATION, &location);
    response
}

fn refused(refusal: PathRefusal, request: &Parts) -> Response<ResponseBody> {
    tracing::debug!(path = request.uri.path(), "static path refused: {refusal}");
    match refusal {
        PathRefusal::Malformed(_) => plain(StatusCode::BAD_REQUEST),
        PathRefusal::Unsafe(_) => plain(StatusCode::NOT_FOUND),
    }
}

fn lookup_failed(error: &LookupError, request: &Parts) -> Response<ResponseBody> {
    let path = request.uri.path();
    match error {
        LookupError::NotFound => plain(StatusCode::NOT_FOUND),
        LookupError::OutsideRoot { .. } | LookupError::Denied { .. } => {
            tracing::warn!(path, "static file refused: {error}");
            plain(StatusCode::FORBIDDEN)
        }
        LookupError::Io { .. } => {
            tracing::error!(path, "static file unreadable: {error}");
            plain(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

fn with_head(status: StatusCode, head: HeaderMap, body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = head;
    response
}

/// A short text answer naming the status.
fn plain(status: StatusCode) -> Response<ResponseBody> {
    let text = format!(
        "{} {}\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    let mut head = HeaderMap::new();
    head.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    with_head(status, head, ResponseBody::full(text))
}

/// Inserts a header whose text came from config or from the request; an invalid value
/// is left out rather than failing the answer.
fn insert_str(head: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        head.insert(name, value);
    }
}
