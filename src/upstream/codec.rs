//! HTTP/1.1 towards the upstream, as bytes: the request head we write, the response head
//! we parse, and how the response body is delimited (RFC 9112 §6.3).
//!
//! The upstream is trusted to speak HTTP, not to speak it well: every response head is
//! bounded and validated, and anything ambiguous (conflicting lengths, an unknown
//! transfer coding, a stray upgrade) is refused or closes the connection after use, so a
//! confused upstream can never make one response bleed into the next.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};

/// The largest response head accepted; a larger one is a 502.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;
/// A chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 1024;
/// All trailer lines of a chunked body together (they are read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;

/// Why the upstream's bytes could not be taken as a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("unparsable response head ({0})")]
    Head(&'static str),
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnaskedUpgrade,
    #[error("invalid chunk size line")]
    ChunkSize,
    #[error("missing CRLF after a chunk")]
    ChunkEnd,
    #[error("trailers over {MAX_TRAILERS} bytes")]
    TrailersTooLarge,
}

/// How the response body is delimited, and how far it has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: HEAD, 204, 304.
    Empty,
    /// `Content-Length`: the bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
    /// Read to the end.
    Done,
}

/// Where a chunked body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: the bytes left in it.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer bytes seen so far.
    Trailers(usize),
}

impl Framing {
    /// Nothing more will come.
    pub fn is_end(&self) -> bool {
        matches!(self, Framing::Empty | Framing::Done | Framing::Length(0))
    }

    /// The exact body length, when the upstream declared it.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Framing::Length(n) => Some(*n),
            Framing::Empty | Framing::Done => Some(0),
            Framing::Chunked(_) | Framing::Close => None,
        }
    }
}

/// Fields written after those of the request's header map, in order. The proxy's own
/// (`X-Forwarded-*`, `X-Request-ID`) go here rather than into the map: `http` hashes a
/// name it does not know byte by byte on every insertion and lookup (written here, they
/// cost 800 instructions a request less, callgrind).
#[derive(Debug, Default, Clone)]
pub struct ExtraFields {
    fields: [Option<(&'static HeaderName, HeaderValue)>; MAX_EXTRA_FIELDS],
}

const MAX_EXTRA_FIELDS: usize = 5;

impl ExtraFields {
    /// Adds a field; one beyond the room is dropped (the proxy adds five at most).
    pub fn push(&mut self, name: &'static HeaderName, value: HeaderValue) {
        if let Some(slot) = self.fields.iter_mut().find(|slot| slot.is_none()) {
            *slot = Some((name, value));
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.fields
            .iter()
            .flatten()
            .map(|(name, value)| (*name, value))
    }

    /// The value of `name`, when it is one of these fields.
    pub fn get(&self, name: &str) -> Option<&HeaderValue> {
        self.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, value)| value)
    }
}

/// The request head as sent: the map's fields, then `extra`; `chunked` when the body's
/// length is unknown, in which case `Transfer-Encoding: chunked` is added (the client's
/// own was stripped as hop-by-hop).
pub fn encode_head<B>(request: &Request<B>, extra: &ExtraFields, chunked: bool) -> Vec<u8> {
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .as_bytes();
    let method = request.method().as_str().as_bytes();
    let fields = || request.headers().iter().chain(extra.iter());
    let size = method.len()
        + target.len()
        + 13
        + fields()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>()
        + if chunked { 28 } else { 0 }
        + 2;
    // Written straight from this buffer: a `Bytes` would cost a second allocation.
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in fields() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// RFC 9110 §9.2.2: sending the request twice has the effect of sending it once.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A complete response head taken from the front of a buffer.
pub struct Head {
    pub response: Response<Framing>,
    /// The connection may carry another exchange once this body is read.
    pub keep_alive: bool,
}

/// Parses the response head at the front of `buf`, taking it out when complete; interim
/// 1xx responses before it are dropped. `Ok(None)`: more bytes are needed.
pub fn take_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, Malformed> {
    while !buf.is_empty() {
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(Malformed::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Malformed::Head(parse_error(e))),
        };
        if len > MAX_HEAD {
            return Err(Malformed::HeadTooLarge);
        }
        let code = parsed.code.unwrap_or(0);
        if code == 101 {
            return Err(Malformed::UnaskedUpgrade);
        }
        if (100..200).contains(&code) {
            // 100 Continue, 103 Early Hints: nothing the client of a proxy needs.
            let _ = buf.split_to(len);
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| Malformed::Head("invalid status code"))?;
        let version = match parsed.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let mut spans = [(0, 0, 0, 0); MAX_HEADERS];
        let count = header_spans(buf.as_ptr(), parsed.headers, &mut spans);
        let head = buf.split_to(len).freeze();
        let (headers, connection) = header_map(&head, &spans[..count])?;
        return Ok(Some(head_of(status, version, headers, connection, method)?));
    }
    Ok(None)
}

fn parse_error(error: httparse::Error) -> &'static str {
    match error {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// Where each header's name and value sit in the buffer, so the values can share the
/// head's bytes instead of being copied one by one (offsets below `MAX_HEAD`).
type Span = (u16, u16, u16, u16);

fn header_spans(base: *const u8, headers: &[httparse::Header<'_>], spans: &mut [Span]) -> usize {
    let offset = |s: &[u8]| (s.as_ptr() as usize - base as usize) as u16;
    for (h, span) in headers.iter().zip(spans.iter_mut()) {
        let (name, value) = (offset(h.name.as_bytes()), offset(h.value));
        *span = (
            name,
            name + h.name.len() as u16,
            value,
            value + h.value.len() as u16,
        );
    }
    headers.len().min(spans.len())
}

/// What a browser's request head usually holds: 12 to 18 fields (see [`header_map`]).
const NEXT_REQUEST_FIELDS: usize = 18;

/// What the `Connection` fields of a response say about its connection.
#[derive(Debug, Default, Clone, Copy)]
struct ConnectionTokens {
    keep_alive: bool,
    close: bool,
}

impl ConnectionTokens {
    /// Notes one `Connection` line's tokens; says whether it holds nothing but
    /// `keep-alive`.
    fn note(&mut self, value: &[u8]) -> bool {
        let mut only_keep_alive = true;
        for token in value_tokens(value) {
            if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else {
                self.close |= token.eq_ignore_ascii_case(b"close");
                only_keep_alive = false;
            }
        }
        only_keep_alive
    }
}

fn header_map(head: &Bytes, spans: &[Span]) -> Result<(HeaderMap, ConnectionTokens), Malformed> {
    // Room for the `X-Request-ID` the response gets on its way to the client, and for
    // the connection's next request: hyper keeps a response's map, emptied, to parse
    // the next request head into. A map too small for it grows there (a new index
    // table, the entries moved: 1,300 instructions, callgrind).
    let mut headers = HeaderMap::with_capacity(spans.len().max(NEXT_REQUEST_FIELDS) + 1);
    let mut connection = ConnectionTokens::default();
    for &(name_start, name_end, value_start, value_end) in spans {
        let (name_start, name_end) = (usize::from(name_start), usize::from(name_end));
        let (value_start, value_end) = (usize::from(value_start), usize::from(value_end));
        let name = HeaderName::from_bytes(&head[name_start..name_end])
            .map_err(|_| Malformed::Head("invalid header name"))?;
        // `Connection: keep-alive` and `Keep-Alive` concern this connection only and
        // would be removed on the way to the client (RFC 9110 §7.6.1): never put in the
        // map, they cost no insertion and no removal. A `Connection` line naming other
        // fields, or `close`, goes in, for the hop-by-hop removal and the diagnosis of
        // Gunicorn's worker kills to see.
        let value = &head[value_start..value_end];
        let skip = match name {
            CONNECTION => connection.note(value),
            _ => name.as_str() == "keep-alive",
        };
        if skip {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
            .map_err(|_| Malformed::Head("invalid header value"))?;
        headers.append(name, value);
    }
    Ok((headers, connection))
}

fn head_of(
    status: StatusCode,
    version: Version,
    mut headers: HeaderMap,
    connection: ConnectionTokens,
    method: &Method,
) -> Result<Head, Malformed> {
    let mut keep_alive = match version {
        Version::HTTP_10 => connection.keep_alive,
        _ => !connection.close,
    };
    let bodiless = *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        Framing::Empty
    } else if headers.contains_key(TRANSFER_ENCODING) {
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and a message with
        // both may be an attempt at smuggling: it is framed by the former, the latter
        // goes, and the connection is not reused.
        if headers.remove(CONTENT_LENGTH).is_some() {
            keep_alive = false;
        }
        if last_coding_is_chunked(&headers) {
            Framing::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Framing::Close
        }
    } else if headers.contains_key(CONTENT_LENGTH) {
        Framing::Length(content_length(&headers)?)
    } else {
        keep_alive = false;
        Framing::Close
    };
    let mut response = Response::new(framing);
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Head {
        response,
        keep_alive,
    })
}

fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|value| value_tokens(value.as_bytes()))
}

/// The non-empty items of a comma-separated field value.
fn value_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn last_coding_is_chunked(headers: &HeaderMap) -> bool {
    tokens(headers, TRANSFER_ENCODING)
        .last()
        .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
}

/// One length, however many times it is repeated (`42, 42` is 42; `42, 43` is refused).
fn content_length(headers: &HeaderMap) -> Result<u64, Malformed> {
    let mut length = None;
    for token in tokens(headers, CONTENT_LENGTH) {
        let value = parse_decimal(token).ok_or(Malformed::ContentLength)?;
        if length.is_some_and(|l| l != value) {
            return Err(Malformed::ContentLength);
        }
        length = Some(value);
    }
    length.ok_or(Malformed::ContentLength)
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// What the front of a chunked body's buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes to pass on.
    Data(Bytes),
    /// Framing consumed; look again.
    Again,
    /// More bytes are needed.
    Short,
}

/// Advances a chunked body over the front of `buf`: data is split off without copying,
/// framing lines are checked and dropped.
pub fn step_chunked(buf: &mut BytesMut, state: &mut Framing) -> Result<Step, Malformed> {
    let Framing::Chunked(chunk) = state else {
        return Ok(Step::Short);
    };
    match *chunk {
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::Short);
            }
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            *chunk = match left - n as u64 {
                0 => Chunk::DataEnd,
                rest => Chunk::Data(rest),
            };
            Ok(Step::Data(buf.split_to(n).freeze()))
        }
        Chunk::Size => {
            let Some(line) = take_line(buf, MAX_CHUNK_LINE, Malformed::ChunkSize)? else {
                return Ok(Step::Short);
            };
            *chunk = match chunk_size(&line)? {
                0 => Chunk::Trailers(0),
                size => Chunk::Data(size),
            };
            Ok(Step::Again)
        }
        Chunk::DataEnd => {
            let Some(line) = take_line(buf, 2, Malformed::ChunkEnd)? else {
                return Ok(Step::Short);
            };
            if !line.is_empty() {
                return Err(Malformed::ChunkEnd);
            }
            *chunk = Chunk::Size;
            Ok(Step::Again)
        }
        Chunk::Trailers(seen) => {
            let room = MAX_TRAILERS.saturating_sub(seen);
            let Some(line) = take_line(buf, room, Malformed::TrailersTooLarge)? else {
                return Ok(Step::Short);
            };
            if line.is_empty() {
                *state = Framing::Done;
            } else {
                *chunk = Chunk::Trailers(seen + line.len() + 2);
            }
            Ok(Step::Again)
        }
    }
}

/// Takes one line (CRLF or bare LF) of at most `max` bytes off the front of `buf`,
/// without its line ending.
fn take_line(buf: &mut BytesMut, max: usize, error: Malformed) -> Result<Option<Bytes>, Malformed> {
    let window = &buf[..buf.len().min(max + 2)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if window.len() >= max + 2 {
            Err(error)
        } else {
            Ok(None)
        };
    };
    let mut line = buf.split_to(lf + 1);
    line.truncate(lf);
    if line.last() == Some(&b'\r') {
        line.truncate(lf - 1);
    }
    if line.contains(&b'\r') {
        return Err(error);
    }
    Ok(Some(line.freeze()))
}

/// `1a;name=value` → 26. Extensions are ignored; whitespace is allowed before them.
fn chunk_size(line: &[u8]) -> Result<u64, Malformed> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 16 || !(rest.is_empty() || rest[0] == b';') {
        return Err(Malformed::ChunkSize);
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| Malformed::ChunkSize)?;
    u64::from_str_radix(hex, 16).map_err(|_| Malformed::ChunkSize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &str, method: Method) -> Result<Option<Head>, Malformed> {
        take_head(&mut BytesMut::from(bytes), &method)
    }

    fn framing(bytes: &str) -> (Framing, bool) {
        let head = head(bytes, Method::GET).expect("valid").expect("complete");
        (*head.response.body(), head.keep_alive)
    }

    #[test]
    fn the_request_head_carries_the_target_and_every_header() {
        let request = Request::post("http://ignored/a%20b?x=1")
            .header("host", "gn")
            .header("x-two", "1")
            .header("x-two", "2")
            .body(())
            .expect("request");
        static X_THREE: HeaderName = HeaderName::from_static("x-three");
        let mut extra = ExtraFields::default();
        extra.push(&X_THREE, HeaderValue::from_static("3"));
        let head = encode_head(&request, &extra, true);
        assert_eq!(
            &head[..],
            b"POST /a%20b?x=1 HTTP/1.1\r\nhost: gn\r\nx-two: 1\r\nx-two: 2\r\nx-three: 3\r\n\
              transfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn bodies_are_delimited_as_rfc_9112_says() {
        let ok = "HTTP/1.1 200 OK\r\n";
        assert_eq!(
            framing(&format!("{ok}Content-Length: 5\r\n\r\n")),
            (Framing::Length(5), true)
        );
        assert_eq!(
            framing(&format!("{ok}Content-Length: 5, 5\r\n\r\n")),
            (Framing::Length(5), true)
        );
        assert_eq!(
            framing(&format!("{ok}Transfer-Encoding: gzip, chunked\r\n\r\n")),
            (Framing::Chunked(Chunk::Size), true)
        );
        assert_eq!(
            framing(&format!(
                "{ok}Transfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n"
            )),
            (Framing::Chunked(Chunk::Size), false)
        );
        assert_eq!(
            framing(&format!("{ok}Transfer-Encoding: gzip\r\n\r\n")),
            (Framing::Close, false)
        );
        assert_eq!(framing(&format!("{ok}\r\n")), (Framing::Close, false));
        assert_eq!(
            framing(&format!(
                "{ok}Connection: close\r\nContent-Length: 0\r\n\r\n"
            )),
            (Framing::Length(0), false)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"),
            (Framing::Length(1), false)
        );
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
            (Framing::Empty, true)
        );
        let to_head = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            Method::HEAD,
        );
        assert_eq!(
            *to_head.expect("valid").expect("complete").response.body(),
            Framing::Empty
        );
    }

    #[test]
    fn connection_fields_decide_reuse_and_only_what_the_client_needs_stays() {
        let parsed = |bytes: &str| {
            let head = head(bytes, Method::GET).expect("valid").expect("complete");
            let names: Vec<String> = head
                .response
                .headers()
                .keys()
                .map(|n| n.as_str().to_owned())
                .collect();
            (head.keep_alive, names)
        };
        let cl = "Content-Length: 0\r\n\r\n";
        // Hop-by-hop and about this connection only: kept out of the map.
        assert_eq!(
            parsed(&format!(
                "HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nKeep-Alive: timeout=5\r\n{cl}"
            )),
            (true, vec!["content-length".to_owned()])
        );
        assert_eq!(
            parsed(&format!(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n{cl}"
            )),
            (true, vec!["content-length".to_owned()])
        );
        // `close` stays for the worker-kill diagnosis; a named field stays for the
        // hop-by-hop removal to find.
        assert_eq!(
            parsed(&format!("HTTP/1.1 500 Oops\r\nConnection: close\r\n{cl}")),
            (
                false,
                vec!["connection".to_owned(), "content-length".to_owned()]
            )
        );
        assert_eq!(
            parsed(&format!(
                "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-secret\r\nx-secret: 1\r\n{cl}"
            )),
            (
                true,
                vec![
                    "connection".to_owned(),
                    "x-secret".to_owned(),
                    "content-length".to_owned()
                ]
            )
        );
        let (keep_alive, _) = parsed(&format!(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\n{cl}"
        ));
        assert!(!keep_alive, "a close on any line closes");
        assert_eq!(
            parsed(&format!("HTTP/1.0 200 OK\r\n{cl}")),
            (false, vec!["content-length".to_owned()])
        );
    }

    #[test]
    fn ambiguous_or_broken_heads_are_refused() {
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(head(bad, Method::GET).is_err(), "{bad:?}");
        }
        let long = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(
            head(&long, Method::GET).err(),
            Some(Malformed::HeadTooLarge)
        );
        let endless = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(
            head(&endless, Method::GET).err(),
            Some(Malformed::HeadTooLarge)
        );
    }

    #[test]
    fn interim_responses_are_skipped_and_partial_heads_wait() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        );
        let head = take_head(&mut buf, &Method::POST)
            .expect("valid")
            .expect("complete");
        assert_eq!(head.response.status(), StatusCode::CREATED);
        assert_eq!(&buf[..], b"ok");
        let mut partial = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Le");
        assert!(take_head(&mut partial, &Method::GET)
            .expect("valid")
            .is_none());
        assert_eq!(partial.len(), 27);
    }

    #[test]
    fn header_values_share_the_heads_bytes() {
        let head = head(
            "HTTP/1.1 200 OK\r\nX-A: one\r\nx-a: two\r\nContent-Length: 0\r\n\r\n",
            Method::GET,
        )
        .expect("valid")
        .expect("complete");
        let values: Vec<_> = head.response.headers().get_all("x-a").iter().collect();
        assert_eq!(values, ["one", "two"]);
    }

    #[test]
    fn non_ascii_header_values_pass_as_bytes() {
        // A Quadrige export named after its programme, as Flask sends it.
        let wire = "HTTP/1.1 200 OK\r\nContent-Disposition: attachment; filename=\"données.csv\"\r\nContent-Length: 0\r\n\r\n";
        let head = head(wire, Method::GET).expect("valid").expect("complete");
        assert_eq!(
            head.response.headers()["content-disposition"].as_bytes(),
            "attachment; filename=\"données.csv\"".as_bytes()
        );
    }

    /// The body of `wire`, fed `split_every` bytes at a time, and what follows it.
    fn dechunk(wire: &[u8], split_every: usize) -> Result<(Vec<u8>, BytesMut), Malformed> {
        let mut state = Framing::Chunked(Chunk::Size);
        let (mut buf, mut out) = (BytesMut::new(), Vec::new());
        for piece in wire.chunks(split_every) {
            buf.extend_from_slice(piece);
            while state != Framing::Done {
                match step_chunked(&mut buf, &mut state)? {
                    Step::Data(data) => out.extend_from_slice(&data),
                    Step::Again => {}
                    Step::Short => break,
                }
            }
        }
        match state {
            Framing::Done => Ok((out, buf)),
            _ => Err(Malformed::ChunkEnd),
        }
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let wire = b"5;ext=1\r\nhello\r\n7 \r\n, world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for every in [1, 2, 3, 7, wire.len()] {
            let (body, rest) = dechunk(wire, every).expect("valid");
            assert_eq!(body, b"hello, world", "split every {every}");
            assert_eq!(&rest[..], b"NEXT");
        }
        let (body, _) = dechunk(b"3\nabc\n0\n\n", 4).expect("bare LF");
        assert_eq!(body, b"abc");
    }

    #[test]
    fn broken_chunking_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"-1\r\n",
            b"11111111111111111\r\n",
            b"5\r\nhelloX\r\n",
            b"5 x\r\nhello\r\n",
            b"5\rX\nhello\r\n",
        ] {
            assert!(
                dechunk(bad, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_line = format!("5;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(
            dechunk(long_line.as_bytes(), 64).err(),
            Some(Malformed::ChunkSize)
        );
        let trailers = format!("0\r\n{}", "T: x\r\n".repeat(MAX_TRAILERS / 6 + 2));
        assert_eq!(
            dechunk(trailers.as_bytes(), 4096).err(),
            Some(Malformed::TrailersTooLarge)
        );
    }
}
